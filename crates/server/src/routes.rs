//! Route handlers. Thin: parse the wire type, submit to the engine, shape the answer.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde_json::json;
use vllm_engine::{EngineHealth, OutputStream, Prompt, RequestOutput, SamplingParams};
use vllm_tokenizer::ChatRequest as TemplateRequest;

use crate::api::{
    ChatCompletionResponse, CompletionResponse, DetokenizeResponse, EmbeddingData, EmbeddingResponse, EmbeddingUsage,
    ErrorResponse, GenerateResponse, ModelCard, ModelList, ModelPermission, TokenizeResponse, VersionResponse,
};
use crate::error::ApiError;
use crate::protocol::*;
use crate::render::{beam_outputs, full_response, stream_response};
use crate::validate::{self, ValidRequest};

pub(crate) use crate::state::now;
pub use crate::state::{auth, AppState, Shared};

/// Parses a JSON body, turning every failure (too large, malformed, wrong types) into an
/// OpenAI-shaped error.
pub(crate) fn parse<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    serde_json::from_slice(&body_bytes(body)?).map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

/// The body, or the OpenAI-shaped error for one that could not be read (too large, ...).
fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| ApiError { status: e.status(), message: e.body_text(), param: None })
}

/// 200 while the engine runs; 503 once its core has died (the server is exiting).
#[utoipa::path(get, path = "/health", responses(
    (status = 200, description = "The engine is running"),
    (status = 503, description = "The engine core died; the server is exiting", body = ErrorResponse),
))]
pub async fn health(State(s): State<Shared>) -> Response {
    match s.engine.as_ref().map(|e| e.health()) {
        Some(EngineHealth::Dead(reason)) => {
            ApiError::unavailable(format!("the engine is dead: {reason}")).into_response()
        }
        _ => StatusCode::OK.into_response(),
    }
}

/// The OpenAPI 3 document of this API, generated from its request and response types.
pub async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    static DOC: std::sync::OnceLock<utoipa::openapi::OpenApi> = std::sync::OnceLock::new();
    Json(DOC.get_or_init(crate::api::document).clone())
}

/// Test hook (`--enable-crash-route-for-tests`): makes the engine core panic.
pub async fn crash_engine(State(s): State<Shared>) -> StatusCode {
    if let Some(e) = &s.engine {
        e.crash_for_tests();
    }
    StatusCode::ACCEPTED
}

/// Test hook (`--enable-crash-route-for-tests`): makes the engine's next step panic midway.
pub async fn fail_step(State(s): State<Shared>) -> StatusCode {
    if let Some(e) = &s.engine {
        e.fail_next_step_for_tests();
    }
    StatusCode::ACCEPTED
}

/// The runtime LoRA routes answer only with `VLLM_ALLOW_RUNTIME_LORA_UPDATING` set (vLLM's
/// switch), and only for an engine (or embedder) started with `--enable-lora`.
fn runtime_lora(s: &AppState) -> Result<std::sync::Arc<vllm_engine::lora::LoraManager>, ApiError> {
    if !s.runtime_lora_updates {
        return Err(ApiError::not_found("runtime LoRA updates are off (set VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)"));
    }
    s.lora().ok_or_else(|| ApiError::bad_request("start the server with --enable-lora"))
}

/// `POST /v1/load_lora_adapter {"lora_name", "lora_path"}`: reads, checks and installs the
/// adapter now (its first request is not slowed by it); a name taken or a bad adapter is a
/// 400 and changes nothing.
#[utoipa::path(post, path = "/v1/load_lora_adapter", request_body = LoadLoraRequest, responses(
    (status = 200, description = "Loaded", content_type = "text/plain"),
    (status = 400, body = ErrorResponse), (status = 401, body = ErrorResponse), (status = 404, body = ErrorResponse),
    (status = 503, body = ErrorResponse),
))]
pub async fn load_lora_adapter(
    State(s): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let manager = runtime_lora(&s)?;
    let req: LoadLoraRequest = parse(body)?;
    let name = req.lora_name.trim().to_string();
    if name.is_empty() || name.len() > 256 || s.model_names.contains(&name) {
        return Err(ApiError::invalid_param("lora_name", "an adapter needs a name of its own (1 to 256 bytes)"));
    }
    if s.adapters.read().unwrap_or_else(|p| p.into_inner()).contains_key(&name) {
        return Err(ApiError::invalid_param(
            "lora_name",
            format!("The lora adapter '{name}' has already been loaded."),
        ));
    }
    let id = s.next_lora_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let lora = vllm_engine::LoraRequest::new(name.clone(), id, req.lora_path);
    let l = lora.clone();
    tokio::task::spawn_blocking(move || manager.load(&l))
        .await
        .map_err(|_| ApiError::internal("loading the adapter failed"))?
        .map_err(|e| match e {
            vllm_engine::Error::InvalidArgument { message, .. } => ApiError::invalid_param("lora_path", message),
            e => ApiError::from(e),
        })?;
    let mut adapters = s.adapters.write().unwrap_or_else(|p| p.into_inner());
    if adapters.contains_key(&name) {
        return Err(ApiError::invalid_param(
            "lora_name",
            format!("The lora adapter '{name}' has already been loaded."),
        ));
    }
    adapters.insert(name.clone(), lora);
    Ok(format!("Success: LoRA adapter '{name}' added successfully.").into_response())
}

/// `POST /v1/unload_lora_adapter {"lora_name"}`: new requests can no longer name it; those
/// running with it finish with it.
#[utoipa::path(post, path = "/v1/unload_lora_adapter", request_body = UnloadLoraRequest, responses(
    (status = 200, description = "Unloaded", content_type = "text/plain"),
    (status = 400, body = ErrorResponse), (status = 401, body = ErrorResponse), (status = 404, body = ErrorResponse),
))]
pub async fn unload_lora_adapter(
    State(s): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let manager = runtime_lora(&s)?;
    let req: UnloadLoraRequest = parse(body)?;
    let Some(lora) = s.adapters.write().unwrap_or_else(|p| p.into_inner()).remove(&req.lora_name) else {
        return Err(ApiError::not_found(format!("The lora adapter '{}' cannot be found.", req.lora_name)));
    };
    manager.unload(&lora.name);
    Ok(format!("Success: LoRA adapter '{}' removed successfully.", lora.name).into_response())
}

/// Unknown routes: a 404 in the OpenAI error shape (Anthropic's under `/v1/messages`).
pub async fn not_found(req: Request) -> Response {
    let path = req.uri().path();
    crate::error::for_path(path, ApiError::not_found(format!("no route for {} {path}", req.method())))
}

/// Known routes with the wrong method: a 405 in the OpenAI error shape (Anthropic's under
/// `/v1/messages`).
pub async fn method_not_allowed(req: Request) -> Response {
    let path = req.uri().path();
    let e = ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        message: format!("{} is not allowed on {path}", req.method()),
        param: None,
    };
    crate::error::for_path(path, e)
}

#[utoipa::path(get, path = "/version", responses((status = 200, body = VersionResponse)))]
pub async fn version() -> Json<VersionResponse> {
    Json(VersionResponse { version: env!("CARGO_PKG_VERSION").to_string() })
}

#[utoipa::path(get, path = "/v1/models", responses(
    (status = 200, body = ModelList),
    (status = 401, body = ErrorResponse),
))]
pub async fn models(State(s): State<Shared>) -> Json<ModelList> {
    let root = s.engine.as_ref().map_or_else(|| s.model_name.clone(), |e| e.info().model.clone());
    let created = now();
    let card = |id: String, root: String, parent: Option<String>| ModelCard {
        id,
        object: "model".into(),
        created,
        owned_by: "vllm".into(),
        root,
        parent,
        max_model_len: s.max_model_len(),
        permission: vec![ModelPermission {
            id: s.new_id("modelperm"),
            object: "model_permission".into(),
            created,
            allow_create_engine: false,
            allow_sampling: true,
            allow_logprobs: true,
            allow_search_indices: false,
            allow_view: true,
            allow_fine_tuning: false,
            organization: "*".into(),
            group: None,
            is_blocking: false,
        }],
    };
    let mut data: Vec<ModelCard> = s.model_names.iter().map(|name| card(name.clone(), root.clone(), None)).collect();
    // LoRA adapters: their folder as the root, the base model as the parent (vLLM's cards).
    for (name, l) in s.adapters.read().unwrap_or_else(|p| p.into_inner()).iter() {
        data.push(card(name.clone(), l.path.display().to_string(), Some(s.model_name.clone())));
    }
    Json(ModelList { object: "list".into(), data })
}

#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn metrics(State(s): State<Shared>) -> Response {
    let mut text = s.metrics.as_ref().map(|h| h.render()).unwrap_or_default();
    if let (true, Some(engine)) = (text.is_empty(), &s.engine) {
        let stats = engine.stats();
        // No recorder installed (a second server in one process): report the gauges directly.
        text = format!(
            "vllm:num_requests_running {}\nvllm:num_requests_waiting {}\nvllm:kv_cache_usage_perc {}\n",
            stats.num_running, stats.num_waiting, stats.kv_cache_usage
        );
    }
    if let Some(info) = s.engine.as_ref().and_then(|e| e.lora_info()) {
        // One series, its labels the current sets, as the Gateway API inference extension's
        // endpoint picker reads it (comma-separated names, no spaces).
        text.push_str(&format!(
            "# HELP vllm:lora_requests_info Running stats on LoRA requests.\n# TYPE vllm:lora_requests_info gauge\n\
             vllm:lora_requests_info{{max_lora=\"{}\",running_lora_adapters=\"{}\",waiting_lora_adapters=\"{}\"}} {}\n",
            info.max_loras,
            info.running.join(","),
            info.waiting.join(","),
            info.updated_at
        ));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

#[utoipa::path(post, path = "/tokenize", request_body = TokenizeRequest, responses(
    (status = 200, body = TokenizeResponse),
    (status = 400, body = ErrorResponse), (status = 401, body = ErrorResponse), (status = 404, body = ErrorResponse),
    (status = 413, body = ErrorResponse), (status = 503, body = ErrorResponse),
))]
pub async fn tokenize(
    State(s): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    let req: TokenizeRequest = parse(body)?;
    // An adapter shares the base model's tokenizer.
    s.resolve_model(req.model.as_deref())?;
    if let Some(m) = &req.messages {
        validate::check_count("messages", m.len(), validate::chat::MAX_MESSAGES, "messages")?;
    }
    let max_bytes = s.max_prompt_bytes();
    let state = s.clone();
    let tokens = s
        .blocking(move || {
            let tok = state.tokenizer();
            let text = match (&req.prompt, &req.messages) {
                (Some(p), None) => p.clone(),
                (None, Some(m)) => {
                    validate::chat::check_messages(m)?;
                    validate::chat::render_conversation(
                        tok,
                        state.chat_template.as_deref(),
                        state.content_format,
                        &TemplateRequest {
                            messages: m,
                            add_generation_prompt: req.add_generation_prompt,
                            ..Default::default()
                        },
                    )?
                }
                _ => return Err(ApiError::bad_request("give exactly one of 'prompt' or 'messages'")),
            };
            if text.len() > max_bytes {
                return Err(ApiError::invalid_param(
                    "prompt",
                    format!("{} bytes: more than the context could hold (at most {max_bytes} bytes)", text.len()),
                ));
            }
            Ok(tok.encode(&text, req.add_special_tokens)?)
        })
        .await?;
    Ok(Json(TokenizeResponse { count: tokens.len(), max_model_len: s.max_model_len(), tokens }))
}

#[utoipa::path(post, path = "/detokenize", request_body = DetokenizeRequest, responses(
    (status = 200, body = DetokenizeResponse),
    (status = 400, body = ErrorResponse), (status = 401, body = ErrorResponse), (status = 404, body = ErrorResponse),
    (status = 413, body = ErrorResponse), (status = 503, body = ErrorResponse),
))]
pub async fn detokenize(
    State(s): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    let req: DetokenizeRequest = parse(body)?;
    s.resolve_model(req.model.as_deref())?;
    s.tokenizer().check_ids(&req.tokens).map_err(|e| ApiError::invalid_param("tokens", e.to_string()))?;
    let state = s.clone();
    let text = s.blocking(move || Ok(state.tokenizer().decode(&req.tokens, false)?)).await?;
    Ok(Json(DetokenizeResponse { prompt: text }))
}

/// Submits one request per prompt; on any rejection the already-submitted streams are dropped,
/// which aborts them.
pub(crate) async fn submit(
    s: &AppState,
    id: &str,
    prompts: Vec<Prompt>,
    params: &SamplingParams,
    lora: Option<&vllm_engine::LoraRequest>,
) -> Result<Vec<OutputStream>, ApiError> {
    let mut streams = Vec::with_capacity(prompts.len());
    for (i, p) in prompts.into_iter().enumerate() {
        streams.push(s.engine()?.generate_with_lora(format!("{id}-{i}"), p, params.clone(), lora.cloned()).await?);
    }
    Ok(streams)
}

/// Waits for each stream's final output (the streams were submitted final-only).
pub(crate) async fn collect(streams: Vec<OutputStream>) -> Result<Vec<RequestOutput>, ApiError> {
    let mut finals = Vec::with_capacity(streams.len());
    for mut rx in streams {
        let mut last = None;
        while let Some(o) = rx.recv().await {
            let o = o?;
            let done = o.finished;
            last = Some(o);
            if done {
                break;
            }
        }
        finals.push(last.ok_or_else(|| ApiError::bad_request("the request was aborted"))?);
    }
    Ok(finals)
}

/// Counts a request's prompts for its LoRA adapter (`vllm:lora_requests_total`).
pub(crate) fn count_adapter(v: &ValidRequest) {
    if let Some(l) = &v.lora {
        metrics::counter!("vllm:lora_requests_total", "lora_name" => l.name.clone()).increment(v.prompts.len() as u64);
    }
}

/// Runs a validated request and answers: a stream (server-sent events, or `/generate`'s
/// NUL-separated objects), or the whole response.
async fn respond(s: &AppState, v: ValidRequest) -> Result<Response, ApiError> {
    count_adapter(&v);
    if let Some(beam) = v.beam {
        let outs = beam_outputs(&v.id, s.engine()?.beam_search_with_lora(v.prompts, beam, v.lora.clone()).await?);
        return Ok(full_response(&v.model, &v.render, &v.id, &outs));
    }
    // The engine's ids are the server's own: a client's `request_id` names only the response.
    let streams = submit(s, &s.new_id("req"), v.prompts, &v.params, v.lora.as_ref()).await?;
    match v.stream {
        Some(opts) => Ok(stream_response(v.render, v.id, v.model, streams, opts)),
        None => Ok(full_response(&v.model, &v.render, &v.id, &collect(streams).await?)),
    }
}

#[utoipa::path(post, path = "/v1/completions", request_body = CompletionRequest, responses(
    (status = 200, description = "The completion; with `stream`, server-sent events of `text_completion` chunks (`CompletionChunk`)",
     content((CompletionResponse = "application/json"), (String = "text/event-stream"))),
    (status = 400, body = ErrorResponse), (status = 401, body = ErrorResponse), (status = 404, body = ErrorResponse),
    (status = 413, body = ErrorResponse), (status = 503, body = ErrorResponse),
))]
pub async fn completions(
    State(s): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let v = validate::completion(&s, parse(body)?, &headers).await?;
    respond(&s, v).await
}

#[utoipa::path(post, path = "/v1/chat/completions", request_body = ChatRequest, responses(
    (status = 200, description = "The chat completion; with `stream`, server-sent events of `chat.completion.chunk`s (`ChatCompletionChunk`)",
     content((ChatCompletionResponse = "application/json"), (String = "text/event-stream"))),
    (status = 400, body = ErrorResponse), (status = 401, body = ErrorResponse), (status = 404, body = ErrorResponse),
    (status = 413, body = ErrorResponse), (status = 503, body = ErrorResponse),
))]
pub async fn chat(
    State(s): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let v = validate::chat::chat(&s, parse(body)?, &headers).await?;
    respond(&s, v).await
}

/// vLLM's simple API: `{"prompt", "stream", ...sampling}` -> `{"text": [prompt + output]}`;
/// streamed as NUL-terminated JSON objects, like vLLM's `api_server`.
#[utoipa::path(post, path = "/generate", request_body = GenerateRequest, responses(
    (status = 200, description = "Each sequence's text, prompt included; with `stream`, NUL-terminated JSON objects of the same shape",
     content((GenerateResponse = "application/json"), (String = "application/octet-stream"))),
    (status = 400, body = ErrorResponse), (status = 401, body = ErrorResponse), (status = 404, body = ErrorResponse),
    (status = 413, body = ErrorResponse), (status = 503, body = ErrorResponse),
))]
pub async fn generate(State(s): State<Shared>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let v = validate::generate(&s, parse(body)?)?;
    respond(&s, v).await
}

/// SageMaker's `POST /invocations`, as vLLM routes it: a body with `messages` is a chat
/// completion, one with `prompt` a completion, one with `input` an embedding request.
pub async fn invocations(
    State(s): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = body_bytes(body)?;
    let probe: serde_json::Value = parse(Ok(bytes.clone()))?;
    let has = |k: &str| probe.get(k).is_some();
    if has("messages") {
        chat(State(s), headers, Ok(bytes)).await
    } else if has("prompt") {
        completions(State(s), headers, Ok(bytes)).await
    } else if has("input") {
        Ok(embeddings(State(s), Ok(bytes)).await?.into_response())
    } else {
        Err(ApiError::bad_request(
            "/invocations needs a chat request (`messages`), a completion request (`prompt`) or an embedding \
             request (`input`)",
        ))
    }
}

#[utoipa::path(post, path = "/v1/embeddings", request_body = EmbeddingRequest, responses(
    (status = 200, body = EmbeddingResponse),
    (status = 400, body = ErrorResponse), (status = 401, body = ErrorResponse), (status = 404, body = ErrorResponse),
    (status = 413, body = ErrorResponse), (status = 503, body = ErrorResponse),
))]
/// `POST /v1/embeddings`: a string, a list of strings, token ids or lists of token ids;
/// `encoding_format` `float` (default) or `base64` (little-endian float32, like OpenAI).
pub async fn embeddings(
    State(s): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<EmbeddingResponse>, ApiError> {
    let req: EmbeddingRequest = parse(body)?;
    let v = validate::embedding(&s, &req)?;
    let embedder = s.embedder.clone().ok_or_else(|| ApiError::internal("no embedder"))?;
    let prompts = v.prompts;
    let loras = match &v.lora {
        Some(l) => {
            metrics::counter!("vllm:lora_requests_total", "lora_name" => l.name.clone())
                .increment(prompts.len() as u64);
            vec![Some(l.clone()); prompts.len()]
        }
        None => Vec::new(),
    };
    let outs = tokio::task::spawn_blocking(move || embedder.encode_with_lora(&prompts, &loras))
        .await
        .map_err(|e| ApiError { status: StatusCode::INTERNAL_SERVER_ERROR, message: e.to_string(), param: None })?
        .map_err(ApiError::from_field_error)?;
    let tokens: usize = outs.iter().map(|o| o.prompt_token_ids.len()).sum();
    let data: Vec<EmbeddingData> = outs
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let e = &o.outputs.embedding;
            let embedding = if v.base64 {
                let bytes: Vec<u8> = e.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(&bytes))
            } else {
                json!(e)
            };
            EmbeddingData { object: "embedding".into(), index: i, embedding }
        })
        .collect();
    Ok(Json(EmbeddingResponse {
        object: "list".into(),
        id: s.new_id("embd"),
        created: now(),
        model: v.model,
        data,
        usage: EmbeddingUsage { prompt_tokens: tokens, total_tokens: tokens },
    }))
}
