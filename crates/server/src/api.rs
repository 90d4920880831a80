//! Typed responses of the HTTP API and the OpenAPI 3 document generated from them and from
//! the request types (`protocol.rs`), served at `/openapi.json`. Handlers build these types,
//! so the document cannot drift from what the server sends.

use serde::Serialize;
use serde_json::Value;
use utoipa::{OpenApi, ToSchema};

use crate::protocol::{
    ChatRequest, CompletionRequest, DetokenizeRequest, EmbeddingRequest, GenerateRequest, LoadLoraRequest,
    RerankRequest, SamplingFields, ScoreRequest, StreamOptions, TokenizeRequest, UnloadLoraRequest,
};

/// OpenAI's error body.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub message: String,
    /// The error class (`BadRequestError`, `NotFoundError`, ...).
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    /// The HTTP status.
    pub code: u16,
}

/// `{"error": {...}}`, for every 4xx and 5xx.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorResponse {
    pub error: ErrorBody,
}

/// Prompt tokens served from the prefix cache.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PromptTokensDetails {
    pub cached_tokens: usize,
}

/// Token counts of a response.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

impl Usage {
    pub fn new(prompt: usize, completion: usize, cached: usize) -> Self {
        Self {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            prompt_tokens_details: PromptTokensDetails { cached_tokens: cached },
        }
    }
}

/// One choice of a completion.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    /// OpenAI's completions log probabilities (`tokens`, `token_logprobs`, `top_logprobs`,
    /// `text_offset`), when asked for.
    #[schema(value_type = Option<Object>)]
    pub logprobs: Option<Value>,
    /// `stop`, `length` or `abort` (null while streaming).
    pub finish_reason: Option<String>,
    /// The stop string or stop token id that ended the choice.
    #[schema(value_type = Option<Object>)]
    pub stop_reason: Option<Value>,
    /// With `prompt_logprobs`: per prompt position, null or `{token_id: {logprob, rank,
    /// decoded_token}}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub prompt_logprobs: Option<Vec<Value>>,
    /// With `return_token_ids`: the prompt's token ids.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
    /// With `return_token_ids`: the generated token ids.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
}

/// `POST /v1/completions` (not streamed).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CompletionResponse {
    pub id: String,
    /// `text_completion`.
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    pub usage: Usage,
}

/// The assistant's message.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatMessage {
    /// `assistant`.
    pub role: String,
    /// The text; null when the message is only tool calls.
    pub content: Option<String>,
    /// The calls the model made (`--tool-call-parser`, or a required / named tool choice).
    pub tool_calls: Vec<ToolCallOut>,
    /// The thinking, split off by `--reasoning-parser` (vLLM's current name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<String>,
    /// The same, under the name vLLM used before 0.13 (clients still read it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
}

/// One tool call in a response: `{"id", "type": "function", "function": {"name",
/// "arguments"}}` (streamed: [`ToolCallDelta`]s).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ToolCallOut {
    pub id: String,
    /// `function`.
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionCallOut,
}

/// The function a tool call names and its arguments (a JSON object, as text).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FunctionCallOut {
    pub name: String,
    pub arguments: String,
}

/// One choice of a chat completion.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChoice {
    pub index: usize,
    pub message: ChatMessage,
    /// OpenAI's chat log probabilities (`{"content": [...]}`), when asked for.
    #[schema(value_type = Option<Object>)]
    pub logprobs: Option<Value>,
    pub finish_reason: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub stop_reason: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub prompt_logprobs: Option<Vec<Value>>,
    /// With `return_token_ids`: the generated token ids.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
}

/// `POST /v1/chat/completions` (not streamed).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatCompletionResponse {
    pub id: String,
    /// `chat.completion`.
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
    /// With `return_token_ids`: the prompt's token ids (vLLM's place for them in chat).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
}

/// One streamed choice of a completion.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CompletionChunkChoice {
    pub index: usize,
    /// The new text.
    pub text: String,
    /// The new tokens' log probabilities (OpenAI's completions format), when asked for.
    #[schema(value_type = Option<Object>)]
    pub logprobs: Option<Value>,
    /// Set on the choice's last chunk.
    pub finish_reason: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub stop_reason: Option<Value>,
    /// With `return_token_ids`: this chunk's new token ids.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
}

/// A server-sent event of a streamed `POST /v1/completions`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CompletionChunk {
    pub id: String,
    /// `text_completion`.
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    /// The choices that progressed (none in the usage chunk).
    pub choices: Vec<CompletionChunkChoice>,
    /// The usage so far (`continuous_usage_stats`), or the whole request's in a last chunk
    /// (`include_usage`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// A streamed piece of a tool call: its first carries `id`, `type` and the function's `name`
/// (with `arguments: ""`), the next ones only argument fragments (OpenAI's and vLLM's chunks).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ToolCallDelta {
    /// The call's position in the choice.
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `function`, in the call's first piece.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub function: FunctionCallDelta,
}

/// A tool call piece's function: the name in the first, then argument fragments.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FunctionCallDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub arguments: String,
}

/// What a chat chunk adds to its choice's message.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct ChatDelta {
    /// `assistant`, in each choice's first chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Thinking (`--reasoning-parser`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<String>,
    /// The same, under its older name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallDelta>,
}

/// One streamed choice of a chat completion.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: ChatDelta,
    /// The new tokens' log probabilities (OpenAI's chat format), when asked for.
    #[schema(value_type = Option<Object>)]
    pub logprobs: Option<Value>,
    /// Set on the choice's last chunk (`tool_calls` when it made calls).
    pub finish_reason: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub stop_reason: Option<Value>,
    /// With `return_token_ids`: this chunk's new token ids.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
}

/// A server-sent event of a streamed `POST /v1/chat/completions`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatCompletionChunk {
    pub id: String,
    /// `chat.completion.chunk`.
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    /// As in [`CompletionChunk`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// A served model.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelCard {
    pub id: String,
    /// `model`.
    pub object: String,
    pub created: u64,
    pub owned_by: String,
    pub root: String,
    pub parent: Option<String>,
    pub max_model_len: usize,
    /// vLLM's permission record (always the same: sampling and log probabilities allowed).
    pub permission: Vec<ModelPermission>,
}

/// vLLM's `ModelPermission`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelPermission {
    pub id: String,
    /// `model_permission`.
    pub object: String,
    pub created: u64,
    pub allow_create_engine: bool,
    pub allow_sampling: bool,
    pub allow_logprobs: bool,
    pub allow_search_indices: bool,
    pub allow_view: bool,
    pub allow_fine_tuning: bool,
    pub organization: String,
    pub group: Option<String>,
    pub is_blocking: bool,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelList {
    /// `list`.
    pub object: String,
    pub data: Vec<ModelCard>,
}

/// `POST /tokenize`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TokenizeResponse {
    pub count: usize,
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
}

/// `POST /detokenize`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DetokenizeResponse {
    pub prompt: String,
}

/// `POST /generate`: each sequence's text, prompt included (vLLM's simple API).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct GenerateResponse {
    pub text: Vec<String>,
}

/// `GET /version`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct VersionResponse {
    pub version: String,
}

/// One embedding.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct EmbeddingData {
    /// `embedding`.
    pub object: String,
    pub index: usize,
    /// A list of floats, or a base64 string of little-endian float32 (`encoding_format`).
    #[schema(value_type = Object)]
    pub embedding: Value,
}

/// Token counts of an embedding response.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct EmbeddingUsage {
    pub prompt_tokens: usize,
    pub total_tokens: usize,
}

/// `POST /v1/embeddings`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct EmbeddingResponse {
    /// `list`.
    pub object: String,
    pub id: String,
    pub created: u64,
    pub model: String,
    pub data: Vec<EmbeddingData>,
    pub usage: EmbeddingUsage,
}

/// One pair's score.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ScoreData {
    /// The pair's position (the order of `text_2`).
    pub index: usize,
    /// `score`.
    pub object: String,
    /// The cosine similarity of the pair's embeddings.
    pub score: f64,
}

/// Token counts of a score response (vLLM's `UsageInfo`): each pair counts both its texts.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ScoreUsage {
    pub prompt_tokens: usize,
    pub total_tokens: usize,
    /// Always 0.
    pub completion_tokens: usize,
}

/// `POST /score`, `/v1/score` (vLLM's `ScoreResponse`).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ScoreResponse {
    pub id: String,
    /// `list`.
    pub object: String,
    pub created: u64,
    pub model: String,
    pub data: Vec<ScoreData>,
    pub usage: ScoreUsage,
}

/// A ranked document's text.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RerankDocument {
    pub text: String,
}

/// One ranked document.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RerankResult {
    /// Its position in the request's `documents`.
    pub index: usize,
    /// Left out with `return_documents: false`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub document: Option<RerankDocument>,
    /// The cosine similarity of its embedding and the query's.
    pub relevance_score: f64,
}

/// Token counts of a rerank response: the query's tokens once per document, and each
/// document's.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RerankUsage {
    pub prompt_tokens: usize,
    pub total_tokens: usize,
}

/// `POST /rerank`, `/v1/rerank`, `/v2/rerank` (vLLM's `RerankResponse` on all three): the
/// results best first, at most `top_n`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RerankResponse {
    pub id: String,
    pub model: String,
    pub usage: RerankUsage,
    pub results: Vec<RerankResult>,
}

/// The routes, their request and response types.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "vllm-rs",
        description = "vLLM's OpenAI-compatible API, served by vllm-rs, with OpenAI's Responses API (/v1/responses) and Anthropic's Messages API (/v1/messages). With --api-key, every route but /health, /ping, /version, /metrics and /openapi.json needs `Authorization: Bearer <key>` (or `x-api-key: <key>`). Streamed completions are server-sent events whose data are `CompletionChunk`s or `ChatCompletionChunk`s, then `[DONE]`; streamed Responses and Messages are their APIs' typed events. Errors have OpenAI's shape, except on /v1/messages, where they have Anthropic's (`AnthropicErrorResponse`)."
    ),
    paths(
        crate::routes::models,
        crate::routes::completions,
        crate::routes::chat,
        crate::routes::embeddings,
        crate::score::score,
        crate::score::score_v1,
        crate::score::rerank,
        crate::score::rerank_v1,
        crate::score::rerank_v2,
        crate::responses::create,
        crate::responses::retrieve,
        crate::responses::delete,
        crate::responses::cancel,
        crate::messages::create,
        crate::messages::count_tokens,
        crate::routes::generate,
        crate::routes::tokenize,
        crate::routes::detokenize,
        crate::routes::load_lora_adapter,
        crate::routes::unload_lora_adapter,
        crate::routes::health,
        crate::routes::version,
        crate::routes::metrics,
    ),
    components(schemas(
        CompletionRequest,
        ChatRequest,
        GenerateRequest,
        TokenizeRequest,
        DetokenizeRequest,
        EmbeddingRequest,
        ScoreRequest,
        RerankRequest,
        LoadLoraRequest,
        UnloadLoraRequest,
        SamplingFields,
        StreamOptions,
        ErrorResponse,
        CompletionResponse,
        ChatCompletionResponse,
        CompletionChunk,
        ChatCompletionChunk,
        ModelList,
        ModelPermission,
        TokenizeResponse,
        DetokenizeResponse,
        GenerateResponse,
        VersionResponse,
        EmbeddingResponse,
        ScoreResponse,
        RerankResponse,
        crate::responses::protocol::ResponsesRequest,
        crate::responses::protocol::ResponseObject,
        crate::responses::protocol::ResponseDeleted,
        crate::messages::protocol::MessagesRequest,
        crate::messages::protocol::MessagesResponse,
        crate::messages::protocol::CountTokensRequest,
        crate::messages::protocol::CountTokensResponse,
        crate::messages::protocol::AnthropicErrorResponse,
    ))
)]
pub struct ApiDoc;

/// The OpenAPI document.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}
