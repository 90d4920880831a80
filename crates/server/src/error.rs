//! Errors as OpenAI's error shape (Anthropic's on the Messages routes), mapped to HTTP status
//! in one place.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use vllm_engine::GuideError;

use crate::api::{ErrorBody, ErrorResponse};
use crate::messages::protocol::{AnthropicErrorBody, AnthropicErrorResponse};

/// An error answered as `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message: message.into(), param: None }
    }

    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message: message.into(), param: Some(param.to_string()) }
    }

    pub fn unsupported(param: &str, what: &str) -> Self {
        Self::invalid_param(param, format!("'{param}' {what} is not supported by this server yet"))
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self { status: StatusCode::NOT_FOUND, message: message.into(), param: None }
    }

    /// Capacity or a dead engine: a 503 with `Retry-After`.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self { status: StatusCode::SERVICE_UNAVAILABLE, message: message.into(), param: None }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self { status: StatusCode::INTERNAL_SERVER_ERROR, message: message.into(), param: None }
    }

    pub fn unauthorized() -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            message: "Unauthorized: invalid or missing API key".into(),
            param: None,
        }
    }

    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "AuthenticationError",
            StatusCode::NOT_FOUND => "NotFoundError",
            StatusCode::METHOD_NOT_ALLOWED => "MethodNotAllowedError",
            StatusCode::PAYLOAD_TOO_LARGE => "PayloadTooLargeError",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "UnsupportedMediaTypeError",
            StatusCode::SERVICE_UNAVAILABLE => "ServiceUnavailableError",
            s if s.is_client_error() => "BadRequestError",
            _ => "InternalServerError",
        }
    }

    /// The typed body.
    pub fn response(&self) -> ErrorResponse {
        ErrorResponse {
            error: ErrorBody {
                message: self.message.clone(),
                kind: self.kind().into(),
                param: self.param.clone(),
                code: self.status.as_u16(),
            },
        }
    }

    /// The JSON body (also used inside SSE streams).
    pub fn body(&self) -> serde_json::Value {
        json!(self.response())
    }
}

/// Seconds a client is asked to wait before retrying a 503.
const RETRY_AFTER_SECONDS: &str = "1";

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.response())).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from_static(RETRY_AFTER_SECONDS));
        }
        r
    }
}

/// The same error answered in Anthropic's shape, `{"type": "error", "error": {"type",
/// "message"}}`, for the Messages routes (`/v1/messages*`).
#[derive(Debug, Clone)]
pub struct AnthropicError(pub ApiError);

impl From<ApiError> for AnthropicError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl AnthropicError {
    /// Anthropic's error type for the status.
    fn kind(&self) -> &'static str {
        match self.0.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::SERVICE_UNAVAILABLE => "overloaded_error",
            s if s.is_client_error() => "invalid_request_error",
            _ => "api_error",
        }
    }

    /// The typed body (also sent as a stream's `error` event).
    pub fn response(&self) -> AnthropicErrorResponse {
        let message = match &self.0.param {
            Some(p) if !self.0.message.contains(p.as_str()) => format!("{p}: {}", self.0.message),
            _ => self.0.message.clone(),
        };
        AnthropicErrorResponse { kind: "error", error: AnthropicErrorBody { kind: self.kind().into(), message } }
    }
}

impl IntoResponse for AnthropicError {
    fn into_response(self) -> Response {
        let mut r = (self.0.status, Json(self.response())).into_response();
        if self.0.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from_static(RETRY_AFTER_SECONDS));
        }
        r
    }
}

/// Whether a path is one of Anthropic's routes, whose errors take Anthropic's shape.
pub fn is_anthropic_path(path: &str) -> bool {
    path == "/v1/messages" || path.starts_with("/v1/messages/")
}

/// An error answered in the shape of the route family `path` belongs to (for the layers and
/// fallbacks that run before a handler: keys, unknown routes, wrong methods).
pub fn for_path(path: &str, e: ApiError) -> Response {
    if is_anthropic_path(path) {
        AnthropicError(e).into_response()
    } else {
        e.into_response()
    }
}

impl From<vllm_engine::Error> for ApiError {
    fn from(e: vllm_engine::Error) -> Self {
        use vllm_engine::Error as E;
        match &e {
            E::InvalidParams(p) => Self::invalid_param(p.param, e.to_string()),
            E::InvalidPrompt(_) | E::PromptTooLong { .. } | E::Scheduler(_) | E::Tokenizer(_) => {
                Self::invalid_param("prompt", e.to_string())
            }
            E::InvalidArgument { param, .. } => Self::invalid_param(param, e.to_string()),
            E::DuplicateRequestId(_) => Self::bad_request(e.to_string()),
            E::Guided(g) => match g {
                GuideError::Invalid(p) => Self::invalid_param(p.param, p.to_string()),
                GuideError::Timeout { param, .. } => Self::invalid_param(param, e.to_string()),
                GuideError::Busy => Self::unavailable(e.to_string()),
                GuideError::Cancelled => Self::bad_request(e.to_string()),
            },
            E::Overloaded(_) | E::EngineDead(_) | E::Aborted(_) => Self::unavailable(e.to_string()),
            _ => Self::internal(e.to_string()),
        }
    }
}

impl ApiError {
    /// An engine error whose message already says what is wrong with its field (the
    /// embedder's, the scoring pairs'): a 400 naming the field with that message alone, or
    /// the usual mapping for any other error.
    pub fn from_field_error(e: vllm_engine::Error) -> Self {
        match e {
            vllm_engine::Error::InvalidArgument { param, message } => Self::invalid_param(param, message),
            e => Self::from(e),
        }
    }
}

impl From<vllm_tokenizer::Error> for ApiError {
    fn from(e: vllm_tokenizer::Error) -> Self {
        Self::bad_request(e.to_string())
    }
}
