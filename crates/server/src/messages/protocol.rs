//! Wire types of Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`): the
//! requests, the message, its content blocks, the streamed events and the error shape, as the
//! official `anthropic` client reads them.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

/// `POST /v1/messages`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct MessagesRequest {
    pub model: Option<String>,
    /// The conversation: `{"role": "user" | "assistant", "content"}`, content a string or
    /// blocks (`text`, `tool_use` in assistant turns, `tool_result` in user turns, `thinking`).
    #[schema(value_type = Vec<Object>)]
    pub messages: Vec<Value>,
    /// The most tokens to generate (required).
    pub max_tokens: usize,
    /// A string or `text` blocks: the system prompt.
    pub system: Option<Value>,
    pub stop_sequences: Option<Vec<String>>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i32>,
    #[serde(default)]
    pub stream: bool,
    /// Client tools: `{"name", "description", "input_schema"}`.
    #[schema(value_type = Option<Vec<Object>>)]
    pub tools: Option<Vec<Value>>,
    /// `{"type": "auto" | "any" | "tool" | "none", "name", "disable_parallel_tool_use"}`;
    /// `any` and `tool` are enforced by guided decoding over the tools' schemas.
    #[schema(value_type = Option<Object>)]
    pub tool_choice: Option<Value>,
    /// `{"type": "enabled" | "adaptive" | "disabled"}`: given to the chat template as
    /// `enable_thinking` (a `budget_tokens` is not enforced; `max_tokens` bounds the output).
    #[schema(value_type = Option<Object>)]
    pub thinking: Option<Value>,
    /// `{"format": {"type": "json_schema", "schema"}, "effort"}`: structured output (guided
    /// decoding), and the effort given to the chat template as `reasoning_effort`.
    #[schema(value_type = Option<Object>)]
    pub output_config: Option<Value>,
    /// vLLM's: extra variables for the chat template.
    pub chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    /// Fields not named above (`metadata` and `service_tier` are accepted and ignored; others
    /// ignored with a warning, as on the other routes).
    #[serde(flatten)]
    #[schema(ignore)]
    pub extra: serde_json::Map<String, Value>,
}

/// `POST /v1/messages/count_tokens`: the fields of a message request that make its prompt.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct CountTokensRequest {
    pub model: Option<String>,
    #[schema(value_type = Vec<Object>)]
    pub messages: Vec<Value>,
    pub system: Option<Value>,
    #[schema(value_type = Option<Vec<Object>>)]
    pub tools: Option<Vec<Value>>,
    #[schema(value_type = Option<Object>)]
    pub tool_choice: Option<Value>,
    #[schema(value_type = Option<Object>)]
    pub thinking: Option<Value>,
    #[schema(value_type = Option<Object>)]
    pub output_config: Option<Value>,
    pub chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    #[serde(flatten)]
    #[schema(ignore)]
    pub extra: serde_json::Map<String, Value>,
}

/// `{"input_tokens": n}`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CountTokensResponse {
    pub input_tokens: usize,
}

/// A block of the assistant's message.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentBlock {
    Text {
        text: String,
    },
    /// A call of one of the request's tools (answer it with a `tool_result` block).
    ToolUse {
        /// `toolu_...`.
        id: String,
        name: String,
        /// The arguments, a JSON object.
        #[schema(value_type = Object)]
        input: Value,
    },
    /// The model's thinking (`--reasoning-parser`); the signature is a random token.
    Thinking {
        thinking: String,
        signature: String,
    },
}

/// Token counts (Anthropic's: `input_tokens` excludes the prompt tokens read from the cache).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct MessagesUsage {
    pub input_tokens: usize,
    pub output_tokens: usize,
    pub cache_creation_input_tokens: usize,
    pub cache_read_input_tokens: usize,
}

impl MessagesUsage {
    pub(crate) fn new(prompt: usize, output: usize, cached: usize) -> Self {
        Self {
            input_tokens: prompt.saturating_sub(cached),
            output_tokens: output,
            cache_creation_input_tokens: 0,
            cache_read_input_tokens: cached,
        }
    }
}

/// The assistant's message.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct MessagesResponse {
    /// `msg_...`.
    pub id: String,
    /// `message`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `assistant`.
    pub role: String,
    pub content: Vec<ContentBlock>,
    pub model: String,
    /// `end_turn`, `max_tokens`, `stop_sequence` or `tool_use` (null in `message_start`).
    pub stop_reason: Option<String>,
    /// The stop sequence that ended it (`stop_reason: "stop_sequence"`).
    pub stop_sequence: Option<String>,
    pub usage: MessagesUsage,
}

/// Anthropic's error detail.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AnthropicErrorBody {
    /// `invalid_request_error`, `authentication_error`, `not_found_error`,
    /// `request_too_large`, `overloaded_error`, `api_error`.
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
}

/// `{"type": "error", "error": {"type", "message"}}`: every error of the Messages routes.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AnthropicErrorResponse {
    /// `error`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub error: AnthropicErrorBody,
}

/// What a `content_block_delta` adds to its block.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type")]
pub(crate) enum BlockDelta {
    #[serde(rename = "text_delta")]
    Text { text: String },
    #[serde(rename = "input_json_delta")]
    InputJson { partial_json: String },
    #[serde(rename = "thinking_delta")]
    Thinking { thinking: String },
    #[serde(rename = "signature_delta")]
    Signature { signature: String },
}

/// The end of the message: why it stopped.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct MessageDelta {
    pub stop_reason: Option<String>,
    pub stop_sequence: Option<String>,
}

/// The output tokens, in `message_delta`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct DeltaUsage {
    pub output_tokens: usize,
}

/// The Messages stream's events (each sent with its `event:` line named as its `type`).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum StreamEvent {
    MessageStart { message: Box<MessagesResponse> },
    Ping,
    ContentBlockStart { index: usize, content_block: ContentBlock },
    ContentBlockDelta { index: usize, delta: BlockDelta },
    ContentBlockStop { index: usize },
    MessageDelta { delta: MessageDelta, usage: DeltaUsage },
    MessageStop,
    Error { error: AnthropicErrorBody },
}
