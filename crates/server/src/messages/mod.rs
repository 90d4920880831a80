//! Anthropic's Messages API: `POST /v1/messages` and `POST /v1/messages/count_tokens`, with
//! errors in Anthropic's shape and `x-api-key` accepted as the API key.
//!
//! A request becomes a chat request (`convert`), which chat's one conversion turns into the
//! engine request (template, tools, forced tool use by guided decoding, reasoning split); its
//! output is rendered as content blocks (`render`), whole or streamed (`stream`).

mod convert;
pub(crate) mod protocol;
mod render;
mod stream;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use vllm_engine::Prompt;

use self::protocol::{
    AnthropicErrorResponse, CountTokensRequest, CountTokensResponse, MessagesRequest, MessagesResponse,
};
use crate::error::AnthropicError;
use crate::routes::{collect, parse, submit};
use crate::state::{random_id, Shared};
use crate::validate::{self, ValidRequest};

/// The prompt's token count (chat's conversion tokenizes it).
fn prompt_tokens(v: &ValidRequest) -> usize {
    v.prompts
        .iter()
        .map(|p| match p {
            Prompt::TokenIds(ids) => ids.len(),
            Prompt::Text(_) => 0,
        })
        .sum()
}

/// `POST /v1/messages`: the assistant's next message; streamed with `stream`.
#[utoipa::path(post, path = "/v1/messages", request_body = MessagesRequest, responses(
    (status = 200, description = "The message; with `stream`, server-sent events (`message_start`, `content_block_start`, `content_block_delta`, `content_block_stop`, `message_delta`, `message_stop`)",
     content((MessagesResponse = "application/json"), (String = "text/event-stream"))),
    (status = 400, body = AnthropicErrorResponse), (status = 401, body = AnthropicErrorResponse),
    (status = 404, body = AnthropicErrorResponse), (status = 413, body = AnthropicErrorResponse),
    (status = 503, body = AnthropicErrorResponse),
))]
pub async fn create(State(s): State<Shared>, body: Result<Bytes, BytesRejection>) -> Result<Response, AnthropicError> {
    let req: MessagesRequest = parse(body)?;
    let chat = convert::chat_request(&req)?;
    let v = validate::chat::chat(&s, chat, &HeaderMap::new()).await.map_err(convert::rename_param)?;
    crate::routes::count_adapter(&v);
    let (id, prompt) = (random_id("msg"), prompt_tokens(&v));
    let streams =
        submit(&s, &s.new_id("req"), v.prompts, &v.params, v.lora.as_ref()).await.map_err(convert::rename_param)?;
    if req.stream {
        return Ok(stream::sse(id, v.model, v.render, streams, prompt));
    }
    let outs = collect(streams).await?;
    let o = outs.first().ok_or_else(|| crate::error::ApiError::internal("no output"))?;
    Ok(Json(render::whole(&id, &v.model, &v.render, o)).into_response())
}

/// `POST /v1/messages/count_tokens`: the prompt's token count for a message request (its
/// system, messages and tools through the chat template).
#[utoipa::path(post, path = "/v1/messages/count_tokens", request_body = CountTokensRequest, responses(
    (status = 200, body = CountTokensResponse),
    (status = 400, body = AnthropicErrorResponse), (status = 401, body = AnthropicErrorResponse),
    (status = 404, body = AnthropicErrorResponse), (status = 413, body = AnthropicErrorResponse),
    (status = 503, body = AnthropicErrorResponse),
))]
pub async fn count_tokens(
    State(s): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<CountTokensResponse>, AnthropicError> {
    let req: CountTokensRequest = parse(body)?;
    let chat = convert::count_request(&req)?;
    let v = validate::chat::chat(&s, chat, &HeaderMap::new()).await.map_err(convert::rename_param)?;
    Ok(Json(CountTokensResponse { input_tokens: prompt_tokens(&v) }))
}
