//! Wire types of OpenAI's Responses API (`/v1/responses`): the request, the response object
//! and its output items, and the streamed events. Field names and values follow OpenAI's
//! (and vLLM 0.32's) so the official clients read them into their own types.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::protocol::SamplingFields;

/// `POST /v1/responses`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ResponsesRequest {
    pub model: Option<String>,
    /// A string (one user message), or a list of items: messages (`{"role", "content"}`, with
    /// or without `"type": "message"`; content a string or `input_text` / `output_text`
    /// parts), `function_call`, `function_call_output` and `reasoning` items.
    pub input: Value,
    /// A system message before the input (not carried over by `previous_response_id`).
    pub instructions: Option<String>,
    /// Function tools: `{"type": "function", "name", "description", "parameters", "strict"}`.
    pub tools: Option<Vec<Value>>,
    /// `none`, `auto` (the default), `required`, or `{"type": "function", "name"}`; the last
    /// two are enforced by guided decoding over the tools' schemas.
    pub tool_choice: Option<Value>,
    /// `false`: at most one call (default `true`).
    pub parallel_tool_calls: Option<bool>,
    /// Most tokens generated (default: the rest of the context).
    pub max_output_tokens: Option<usize>,
    /// `{"format": {"type": "text" | "json_object" | "json_schema", "name", "schema",
    /// "strict"}}`: structured output.
    pub text: Option<Value>,
    /// `{"effort": ...}`: given to the chat template as `reasoning_effort` (and
    /// `enable_thinking: effort != "none"`).
    pub reasoning: Option<Value>,
    /// Keep the response for `GET /v1/responses/{id}` and `previous_response_id` (default true).
    pub store: Option<bool>,
    /// Run it in the background: answered at once (`in_progress`); poll with `GET`, stop with
    /// `POST .../cancel`. Needs `store`; not with `stream`.
    pub background: Option<bool>,
    /// Continue a stored response's conversation (its inputs and its output come first).
    pub previous_response_id: Option<String>,
    #[serde(default)]
    pub stream: bool,
    /// Echoed in the response.
    pub metadata: Option<Value>,
    /// Extra output to include; accepted and ignored, except `message.output_text.logprobs`
    /// (not supported: 400).
    pub include: Option<Vec<String>>,
    /// `disabled` only.
    pub truncation: Option<String>,
    /// 0 only.
    pub top_logprobs: Option<usize>,
    /// Not supported (400 when set).
    pub max_tool_calls: Option<usize>,
    /// vLLM's: `false` leaves the reasoning out of the output (with `--reasoning-parser`).
    pub include_reasoning: Option<bool>,
    /// vLLM's: extra variables for the chat template.
    pub chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    /// vLLM's sampling extras (`top_k`, `seed`, `stop`, penalties, `structured_outputs`, ...);
    /// `max_tokens`, `n`, `best_of`, `use_beam_search` and `response_format` are refused here
    /// (their Responses spellings are `max_output_tokens` and `text.format`).
    #[serde(flatten)]
    pub sampling: SamplingFields,
    /// Fields not named above (see `check_extra_fields`).
    #[serde(flatten)]
    #[schema(ignore)]
    pub extra: serde_json::Map<String, Value>,
}

/// A part of an output item's content.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    /// Answer text.
    OutputText {
        text: String,
        /// Always empty.
        #[schema(value_type = Vec<Object>)]
        annotations: Vec<Value>,
        /// Always empty (log probabilities are not offered on this route).
        #[schema(value_type = Vec<Object>)]
        logprobs: Vec<Value>,
    },
    /// Thinking (`--reasoning-parser`).
    ReasoningText { text: String },
}

impl ContentPart {
    pub(crate) fn output_text(text: String) -> Self {
        Self::OutputText { text, annotations: Vec::new(), logprobs: Vec::new() }
    }
}

/// One item of a response's output.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OutputItem {
    /// The assistant's text.
    Message {
        /// `msg_...`.
        id: String,
        /// `assistant`.
        role: String,
        /// `in_progress` while streamed, then `completed` (`incomplete` when cut short).
        status: String,
        content: Vec<ContentPart>,
    },
    /// A function call (send its result back as a `function_call_output` item).
    FunctionCall {
        /// `fc_...`.
        id: String,
        /// `call_...`: what the `function_call_output` names.
        call_id: String,
        name: String,
        /// A JSON object, as text.
        arguments: String,
        status: String,
    },
    /// The model's thinking (`--reasoning-parser`).
    Reasoning {
        /// `rs_...`.
        id: String,
        /// Always empty (no summaries).
        #[schema(value_type = Vec<Object>)]
        summary: Vec<Value>,
        content: Vec<ContentPart>,
        status: String,
    },
}

/// Prompt tokens served from the prefix cache.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct InputTokensDetails {
    pub cached_tokens: usize,
}

/// Output tokens spent thinking (not counted separately: 0).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OutputTokensDetails {
    pub reasoning_tokens: usize,
}

/// Token counts of a response.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ResponseUsage {
    pub input_tokens: usize,
    pub input_tokens_details: InputTokensDetails,
    pub output_tokens: usize,
    pub output_tokens_details: OutputTokensDetails,
    pub total_tokens: usize,
}

impl ResponseUsage {
    pub(crate) fn new(input: usize, output: usize, cached: usize) -> Self {
        Self {
            input_tokens: input,
            input_tokens_details: InputTokensDetails { cached_tokens: cached },
            output_tokens: output,
            output_tokens_details: OutputTokensDetails { reasoning_tokens: 0 },
            total_tokens: input + output,
        }
    }
}

/// Why a response is `incomplete`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct IncompleteDetails {
    /// `max_output_tokens`.
    pub reason: String,
}

/// Why a background response `failed`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ResponseError {
    pub code: String,
    pub message: String,
}

/// A response (`object: "response"`): what `POST /v1/responses` answers, `GET` returns and
/// the stream's `response.*` events carry.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ResponseObject {
    /// `resp_...`.
    pub id: String,
    /// `response`.
    pub object: String,
    pub created_at: u64,
    /// `queued`, `in_progress`, `completed`, `incomplete` (cut at `max_output_tokens`),
    /// `cancelled` or `failed`.
    pub status: String,
    pub model: String,
    pub output: Vec<OutputItem>,
    pub usage: Option<ResponseUsage>,
    pub error: Option<ResponseError>,
    pub incomplete_details: Option<IncompleteDetails>,
    pub instructions: Option<String>,
    pub metadata: Option<Value>,
    pub parallel_tool_calls: bool,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// As requested (`auto` when not given).
    pub tool_choice: Value,
    #[schema(value_type = Vec<Object>)]
    pub tools: Vec<Value>,
    pub max_output_tokens: Option<usize>,
    pub previous_response_id: Option<String>,
    pub reasoning: Option<Value>,
    /// As requested (`{"format": {"type": "text"}}` when not given).
    pub text: Value,
    /// `disabled`.
    pub truncation: String,
    pub background: bool,
    pub store: bool,
    /// `default`.
    pub service_tier: String,
    pub top_logprobs: usize,
}

/// `DELETE /v1/responses/{response_id}`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ResponseDeleted {
    pub id: String,
    /// `response`.
    pub object: String,
    pub deleted: bool,
}

/// One server-sent event of a streamed response (its `event:` line is its `type`); every
/// event carries the stream's `sequence_number`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct StreamEvent {
    #[serde(flatten)]
    pub event: Event,
    pub sequence_number: u64,
}

/// The Responses stream's event types (those this server sends).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type")]
pub(crate) enum Event {
    #[serde(rename = "response.created")]
    Created { response: Box<ResponseObject> },
    #[serde(rename = "response.in_progress")]
    InProgress { response: Box<ResponseObject> },
    #[serde(rename = "response.completed")]
    Completed { response: Box<ResponseObject> },
    #[serde(rename = "response.output_item.added")]
    ItemAdded { output_index: usize, item: OutputItem },
    #[serde(rename = "response.output_item.done")]
    ItemDone { output_index: usize, item: OutputItem },
    #[serde(rename = "response.content_part.added")]
    PartAdded { item_id: String, output_index: usize, content_index: usize, part: ContentPart },
    #[serde(rename = "response.content_part.done")]
    PartDone { item_id: String, output_index: usize, content_index: usize, part: ContentPart },
    #[serde(rename = "response.output_text.delta")]
    TextDelta { item_id: String, output_index: usize, content_index: usize, delta: String, logprobs: Vec<Value> },
    #[serde(rename = "response.output_text.done")]
    TextDone { item_id: String, output_index: usize, content_index: usize, text: String, logprobs: Vec<Value> },
    #[serde(rename = "response.reasoning_text.delta")]
    ReasoningDelta { item_id: String, output_index: usize, content_index: usize, delta: String },
    #[serde(rename = "response.reasoning_text.done")]
    ReasoningDone { item_id: String, output_index: usize, content_index: usize, text: String },
    #[serde(rename = "response.function_call_arguments.delta")]
    ArgumentsDelta { item_id: String, output_index: usize, delta: String },
    #[serde(rename = "response.function_call_arguments.done")]
    ArgumentsDone { item_id: String, output_index: usize, name: String, arguments: String },
    /// The stream failed (the engine's error); nothing follows.
    #[serde(rename = "error")]
    Error { code: Option<String>, message: String, param: Option<String> },
}
