//! OpenAI's Responses API: `POST /v1/responses`, `GET`, `DELETE` and `POST .../cancel` of
//! `/v1/responses/{response_id}`.
//!
//! A request becomes a chat request (`convert`), which chat's one conversion turns into the
//! engine request (template, tools, forced tool calls by guided decoding, reasoning split);
//! its output is rendered as output items (`render`), whole or streamed (`stream`). Responses
//! are stored (`store`) for retrieval and `previous_response_id`, scoped to the API key.

pub(crate) mod convert;
pub(crate) mod protocol;
mod render;
pub(crate) mod store;
mod stream;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{json, Value};

use self::protocol::{ResponseDeleted, ResponseObject, ResponsesRequest};
use self::store::{CancelError, Stored};
use crate::api::ErrorResponse;
use crate::error::ApiError;
use crate::routes::{collect, parse, submit};
use crate::state::{random_id, KeyScope, Shared};
use crate::validate;

fn not_found(id: &str, param: &str) -> ApiError {
    ApiError { param: Some(param.into()), ..ApiError::not_found(format!("Response with id '{id}' not found.")) }
}

/// The conversation a request continues: a stored response's, for the same key.
fn previous(s: &Shared, req: &ResponsesRequest, scope: KeyScope) -> Result<Arc<Vec<Value>>, ApiError> {
    let Some(id) = &req.previous_response_id else { return Ok(Arc::default()) };
    let (response, conversation) = s.responses.get(id, scope).ok_or_else(|| not_found(id, "previous_response_id"))?;
    if !matches!(response.status.as_str(), "completed" | "incomplete") {
        return Err(ApiError::invalid_param(
            "previous_response_id",
            format!("the response '{id}' is {}: only a finished response can be continued", response.status),
        ));
    }
    Ok(conversation)
}

/// `POST /v1/responses`: a response to `input` (after `instructions`, and after the stored
/// conversation `previous_response_id` names); streamed with `stream`, run in the background
/// with `background`.
#[utoipa::path(post, path = "/v1/responses", request_body = ResponsesRequest, responses(
    (status = 200, description = "The response; with `stream`, server-sent events (`response.created`, `response.output_item.added`, `response.output_text.delta`, `response.function_call_arguments.delta`, ..., `response.completed`), each with its `sequence_number`",
     content((ResponseObject = "application/json"), (String = "text/event-stream"))),
    (status = 400, body = ErrorResponse), (status = 401, body = ErrorResponse), (status = 404, body = ErrorResponse),
    (status = 413, body = ErrorResponse), (status = 503, body = ErrorResponse),
))]
pub async fn create(
    State(s): State<Shared>,
    scope: Option<Extension<KeyScope>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let scope = scope.map(|Extension(k)| k).unwrap_or_default();
    let req: ResponsesRequest = parse(body)?;
    let background = req.background == Some(true);
    let store = req.store.unwrap_or(true) && s.responses.enabled();
    if background {
        if req.store == Some(false) {
            return Err(ApiError::invalid_param("background", "background can only be used when `store` is true"));
        }
        if !s.responses.enabled() {
            return Err(ApiError::invalid_param(
                "background",
                "the response store is off on this server (--responses-store-max-entries 0)",
            ));
        }
        if req.stream {
            return Err(ApiError::unsupported("background", "together with stream"));
        }
    }
    // Counted before anything is copied: this request's items, then the whole conversation.
    let input = convert::input_messages(&req.input)?;
    let so_far = previous(&s, &req, scope)?;
    let max = validate::chat::MAX_MESSAGES;
    if so_far.len() + input.len() > max {
        return Err(ApiError::invalid_param(
            "previous_response_id",
            format!("the conversation would hold {} messages: at most {max}", so_far.len() + input.len()),
        ));
    }
    let conversation: Vec<Value> = so_far.iter().cloned().chain(input).collect();
    let mut messages = Vec::with_capacity(conversation.len() + 1);
    if let Some(i) = &req.instructions {
        messages.push(json!({"role": "system", "content": i}));
    }
    messages.extend(conversation.iter().cloned());
    let chat = convert::chat_request(&req, messages)?;
    let v = validate::chat::chat(&s, chat, &HeaderMap::new()).await.map_err(convert::rename_param)?;
    crate::routes::count_adapter(&v);
    let echo = render::Echo::new(random_id("resp"), v.model.clone(), &req, store);
    let streams =
        submit(&s, &s.new_id("req"), v.prompts, &v.params, v.lora.as_ref()).await.map_err(convert::rename_param)?;
    if req.stream {
        let store = store.then_some(stream::StoreAs { owner: scope, conversation });
        return Ok(stream::sse(s.clone(), echo, v.render, streams, store));
    }
    if background {
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let running = echo.response("in_progress", Vec::new(), None);
        let stored =
            Stored { owner: scope, response: running.clone(), conversation: Arc::default(), cancel: Some(stop) };
        if !s.responses.put(&echo.id, stored) {
            return Err(ApiError::invalid_param("background", "the response is too large for the response store"));
        }
        let (state, render) = (s.clone(), v.render);
        tokio::spawn(async move {
            // Cancelled (or evicted): dropping the streams aborts the engine request.
            let outs = tokio::select! { r = collect(streams) => r, _ = stopped => return };
            let response = match outs.as_ref().map(|o| o.first()) {
                Ok(Some(o)) => render::whole(&echo, &render, o),
                Ok(None) => echo.failed("no output".into()),
                Err(e) => echo.failed(e.message.clone()),
            };
            let mut conversation = conversation;
            conversation.push(render::assistant_message(&response.output));
            state.responses.finish(&echo.id, response, Arc::new(conversation));
        });
        return Ok(Json(running).into_response());
    }
    let outs = collect(streams).await?;
    let o = outs.first().ok_or_else(|| ApiError::internal("no output"))?;
    let response = render::whole(&echo, &v.render, o);
    if store {
        let mut conversation = conversation;
        conversation.push(render::assistant_message(&response.output));
        let stored =
            Stored { owner: scope, response: response.clone(), conversation: Arc::new(conversation), cancel: None };
        s.responses.put(&response.id, stored);
    }
    Ok(Json(response).into_response())
}

/// `GET /v1/responses/{response_id}`: a stored response (only for the key that created it).
#[utoipa::path(get, path = "/v1/responses/{response_id}",
    params(("response_id" = String, Path, description = "The response's id (`resp_...`)")),
    responses(
        (status = 200, body = ResponseObject),
        (status = 401, body = ErrorResponse), (status = 404, body = ErrorResponse),
))]
pub async fn retrieve(
    State(s): State<Shared>,
    scope: Option<Extension<KeyScope>>,
    Path(id): Path<String>,
) -> Result<Json<ResponseObject>, ApiError> {
    let scope = scope.map(|Extension(k)| k).unwrap_or_default();
    s.responses.get(&id, scope).map(|(r, _)| Json(r)).ok_or_else(|| not_found(&id, "response_id"))
}

/// `DELETE /v1/responses/{response_id}`: forgets a stored response (a running one stops).
#[utoipa::path(delete, path = "/v1/responses/{response_id}",
    params(("response_id" = String, Path, description = "The response's id (`resp_...`)")),
    responses(
        (status = 200, body = ResponseDeleted),
        (status = 401, body = ErrorResponse), (status = 404, body = ErrorResponse),
))]
pub async fn delete(
    State(s): State<Shared>,
    scope: Option<Extension<KeyScope>>,
    Path(id): Path<String>,
) -> Result<Json<ResponseDeleted>, ApiError> {
    let scope = scope.map(|Extension(k)| k).unwrap_or_default();
    if !s.responses.delete(&id, scope) {
        return Err(not_found(&id, "response_id"));
    }
    Ok(Json(ResponseDeleted { id, object: "response".into(), deleted: true }))
}

/// `POST /v1/responses/{response_id}/cancel`: stops a background response that is still
/// running (its status becomes `cancelled`); a finished background response is returned as
/// it is; any other response cannot be cancelled (400).
#[utoipa::path(post, path = "/v1/responses/{response_id}/cancel",
    params(("response_id" = String, Path, description = "The response's id (`resp_...`)")),
    responses(
        (status = 200, body = ResponseObject),
        (status = 400, body = ErrorResponse), (status = 401, body = ErrorResponse), (status = 404, body = ErrorResponse),
))]
pub async fn cancel(
    State(s): State<Shared>,
    scope: Option<Extension<KeyScope>>,
    Path(id): Path<String>,
) -> Result<Json<ResponseObject>, ApiError> {
    let scope = scope.map(|Extension(k)| k).unwrap_or_default();
    match s.responses.cancel(&id, scope) {
        Ok(r) => Ok(Json(r)),
        Err(CancelError::NotFound) => Err(not_found(&id, "response_id")),
        Err(CancelError::NotRunning(r)) if r.background => Ok(Json(*r)),
        Err(CancelError::NotRunning(_)) => {
            Err(ApiError::invalid_param("response_id", "Cannot cancel a synchronous response."))
        }
    }
}
