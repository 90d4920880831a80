//! Route handlers. Thin: parse the wire type, submit to the engine, shape the answer.

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use futures::stream::StreamExt;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use vllm_engine::{
    BeamSearchParams, EngineHealth, OutputStream, Prompt, RequestOutput, RequestOutputKind, SamplingParams,
};
use vllm_tokenizer::ChatRequest as TemplateRequest;

use crate::api::{
    ChatCompletionResponse, CompletionResponse, DetokenizeResponse, EmbeddingData, EmbeddingResponse, EmbeddingUsage,
    ErrorResponse, GenerateResponse, ModelCard, ModelList, ModelPermission, TokenizeResponse, VersionResponse,
};
use crate::error::ApiError;
use crate::render::{beam_outputs, full_response, sse, Api, Render, Tools};

/// Longest chat template a request may bring (`chat_template`).
const MAX_REQUEST_TEMPLATE_BYTES: usize = 64 << 10;
use crate::protocol::*;

pub(crate) use crate::state::now;
pub use crate::state::{auth, AppState, Shared};

/// Parses a JSON body, turning every failure (too large, malformed, wrong types) into an
/// OpenAI-shaped error.
fn parse<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
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

/// Unknown routes: a 404 in the OpenAI error shape.
pub async fn not_found(req: Request) -> ApiError {
    ApiError::not_found(format!("no route for {} {}", req.method(), req.uri().path()))
}

/// Known routes with the wrong method: a 405 in the OpenAI error shape.
pub async fn method_not_allowed(req: Request) -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        message: format!("{} is not allowed on {}", req.method(), req.uri().path()),
        param: None,
    }
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
    let data = s
        .model_names
        .iter()
        .map(|name| ModelCard {
            id: name.clone(),
            object: "model".into(),
            created,
            owned_by: "vllm".into(),
            root: root.clone(),
            parent: None,
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
        })
        .collect();
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
    s.check_model(req.model.as_deref())?;
    let max_bytes = s.max_prompt_bytes();
    let state = s.clone();
    let tokens = s
        .blocking(move || {
            let tok = state.tokenizer();
            let text = match (&req.prompt, &req.messages) {
                (Some(p), None) => p.clone(),
                (None, Some(m)) => {
                    let msgs = normalize_messages(m)?;
                    let tpl = tok.chat_template_for(state.chat_template.as_deref())?;
                    tpl.render(&TemplateRequest {
                        messages: &msgs,
                        add_generation_prompt: req.add_generation_prompt,
                        ..Default::default()
                    })?
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
    s.check_model(req.model.as_deref())?;
    s.tokenizer().check_ids(&req.tokens).map_err(|e| ApiError::invalid_param("tokens", e.to_string()))?;
    let state = s.clone();
    let text = s.blocking(move || Ok(state.tokenizer().decode(&req.tokens, false)?)).await?;
    Ok(Json(DetokenizeResponse { prompt: text }))
}

/// Submits one request per prompt; on any rejection the already-submitted streams are dropped,
/// which aborts them.
async fn submit(
    s: &AppState,
    id: &str,
    prompts: Vec<Prompt>,
    params: &SamplingParams,
) -> Result<Vec<OutputStream>, ApiError> {
    let mut streams = Vec::with_capacity(prompts.len());
    for (i, p) in prompts.into_iter().enumerate() {
        streams.push(s.engine()?.generate(format!("{id}-{i}"), p, params.clone()).await?);
    }
    Ok(streams)
}

/// Waits for each stream's final output (the streams were submitted final-only).
async fn collect(streams: Vec<OutputStream>) -> Result<Vec<RequestOutput>, ApiError> {
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

/// Submits the prompts and answers: a stream of server-sent events, or the full response.
async fn respond(
    s: &AppState,
    render: Render,
    id: String,
    prompts: Vec<Prompt>,
    params: &SamplingParams,
    stream: Option<Option<StreamOptions>>,
    beam: Option<BeamSearchParams>,
) -> Result<Response, ApiError> {
    if let Some(beam) = beam {
        if stream.is_some() {
            return Err(ApiError::unsupported("use_beam_search", "together with stream"));
        }
        let outs = beam_outputs(&id, s.engine()?.beam_search(prompts, beam).await?);
        return Ok(full_response(&s.model_name, &render, &id, &outs));
    }
    // Streams carry only what is new each step; a full response needs only the final output.
    let kind = if stream.is_some() { RequestOutputKind::Delta } else { RequestOutputKind::FinalOnly };
    let mut params = SamplingParams { output_kind: kind, ..params.clone() };
    for (field, k) in [("logprobs", params.logprobs), ("prompt_logprobs", params.prompt_logprobs)] {
        if let Some(k) = k.filter(|&k| k > s.max_logprobs) {
            return Err(ApiError::invalid_param(
                field,
                format!(
                    "{k} log probabilities asked for; this server returns at most {} (--max-logprobs)",
                    s.max_logprobs
                ),
            ));
        }
    }
    if let Some(g) = params.guided_decoding.as_mut() {
        if g.backend.is_none() {
            g.backend = s.default_guided_backend.clone();
        }
    }
    // The engine's ids are the server's own: a client's `request_id` names only the response.
    let streams = submit(s, &s.new_id("req"), prompts, &params).await?;
    if let Some(opts) = stream {
        let opts = opts.unwrap_or_default();
        return Ok(sse(render, id, s.model_name.clone(), streams, params.n, opts));
    }
    let outs = collect(streams).await?;
    Ok(full_response(&s.model_name, &render, &id, &outs))
}

/// Streaming sends every sequence as it is generated: `best_of` candidates cannot be ranked.
fn check_stream(stream: bool, params: &SamplingParams) -> Result<(), ApiError> {
    if stream && params.num_sequences() > params.n {
        return Err(ApiError::invalid_param("best_of", "best_of must equal n when streaming"));
    }
    Ok(())
}

#[utoipa::path(post, path = "/v1/completions", request_body = CompletionRequest, responses(
    (status = 200, description = "The completion; with `stream`, server-sent events of `text_completion` chunks",
     content((CompletionResponse = "application/json"), (String = "text/event-stream"))),
    (status = 400, body = ErrorResponse), (status = 401, body = ErrorResponse), (status = 404, body = ErrorResponse),
    (status = 413, body = ErrorResponse), (status = 503, body = ErrorResponse),
))]
pub async fn completions(
    State(s): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse(body)?;
    s.check_model(req.model.as_deref())?;
    check_extra_fields(&req.extra)?;
    if req.suffix.is_some() {
        return Err(ApiError::unsupported("suffix", "(fill-in-the-middle)"));
    }
    if req.echo && req.logprobs.is_some() {
        return Err(ApiError::unsupported("echo", "together with logprobs (prompt log probabilities)"));
    }
    let prompts: Vec<Prompt> = parse_prompts(&req.prompt)?
        .into_iter()
        .map(|p| match p {
            WirePrompt::Text(t) => Prompt::Text(t),
            WirePrompt::Ids(i) => Prompt::TokenIds(i),
        })
        .collect();
    let mut params = s.sampling_fields(&req.sampling).to_params(Some(16))?;
    params.logprobs = req.logprobs;
    check_stream(req.stream, &params)?;
    let tok = s.engine()?.tokenizer();
    let echo = prompts
        .iter()
        .map(|p| match (req.echo, p) {
            (false, _) => Ok(String::new()),
            (true, Prompt::Text(t)) => Ok(t.clone()),
            (true, Prompt::TokenIds(ids)) => tok.decode(ids, false).map_err(ApiError::from),
        })
        .collect::<Result<Vec<_>, _>>()?;
    // `add_special_tokens: false`: the prompt is tokenized here without BOS (off the async
    // threads, each text first checked against the context's byte bound).
    let prompts = if req.sampling.add_special_tokens == Some(false) {
        let (engine, max) = (s.engine()?.clone(), s.engine()?.input_processor().max_prompt_bytes());
        s.blocking(move || {
            prompts
                .into_iter()
                .map(|p| match p {
                    Prompt::Text(t) if t.len() > max => Err(ApiError::invalid_param(
                        "prompt",
                        format!("the prompt has {} bytes, more than the context holds", t.len()),
                    )),
                    Prompt::Text(t) => Ok(Prompt::TokenIds(engine.tokenizer().encode(&t, false)?)),
                    p => Ok(p),
                })
                .collect::<Result<Vec<_>, ApiError>>()
        })
        .await?
    } else {
        prompts
    };
    let render = Render {
        api: Api::Completion,
        echo,
        top_logprobs: req.logprobs,
        tools: Tools::Off,
        reasoning: None,
        include_reasoning: false,
        token_ids_as_tokens: req.sampling.return_tokens_as_token_ids == Some(true),
        token_ids: req.sampling.return_token_ids == Some(true),
    };
    let stream = req.stream.then_some(req.stream_options);
    let beam = req.sampling.beam_params(&params)?;
    let id = s.response_id("cmpl", req.sampling.request_id.as_deref(), &headers)?;
    respond(&s, render, id, prompts, &params, stream, beam).await
}

#[utoipa::path(post, path = "/v1/chat/completions", request_body = ChatRequest, responses(
    (status = 200, description = "The chat completion; with `stream`, server-sent events of `chat.completion.chunk`s",
     content((ChatCompletionResponse = "application/json"), (String = "text/event-stream"))),
    (status = 400, body = ErrorResponse), (status = 401, body = ErrorResponse), (status = 404, body = ErrorResponse),
    (status = 413, body = ErrorResponse), (status = 503, body = ErrorResponse),
))]
pub async fn chat(
    State(s): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: ChatRequest = parse(body)?;
    s.check_model(req.model.as_deref())?;
    check_extra_fields(&req.extra)?;
    if req.top_logprobs.is_some() && req.logprobs != Some(true) {
        return Err(ApiError::invalid_param("top_logprobs", "top_logprobs needs logprobs set to true"));
    }
    if req.chat_template.as_ref().is_some_and(|t| t.len() > MAX_REQUEST_TEMPLATE_BYTES) {
        return Err(ApiError::invalid_param(
            "chat_template",
            format!("a request's chat template is limited to {MAX_REQUEST_TEMPLATE_BYTES} bytes"),
        ));
    }
    let messages = normalize_messages(&req.messages)?;
    let mut sampling = req.sampling.clone();
    sampling.max_tokens = req.max_completion_tokens.or(sampling.max_tokens);
    let sampling = s.sampling_fields(&sampling);
    let mut params = sampling.to_params(None)?;
    let tools = tool_mode(&s, &req, &mut params)?;
    // The template runs on the blocking pool under its instruction and output budgets.
    let engine = s.engine()?.clone();
    let (state, msgs) = (s.clone(), messages.clone());
    let reasoning_parser = s.reasoning_parser;
    let add_special = sampling.add_special_tokens.unwrap_or(false);
    let (ids, thinking) = s
        .blocking(move || {
            let tok = engine.tokenizer();
            let tpl = tok
                .chat_template_for(req.chat_template.as_deref().or(state.chat_template.as_deref()))
                .map_err(|e| ApiError::invalid_param("chat_template", e.to_string()))?;
            let text = tpl
                .render(&TemplateRequest {
                    messages: &msgs,
                    add_generation_prompt: req.add_generation_prompt.unwrap_or(!req.continue_final_message),
                    continue_final_message: req.continue_final_message,
                    tools: req.tools.as_ref(),
                    documents: req.documents.as_ref(),
                    kwargs: req.chat_template_kwargs.as_ref(),
                })
                .map_err(|e| ApiError::invalid_param("messages", e.to_string()))?;
            // The template already wrote any BOS the model wants; the engine checks the length.
            let max = engine.input_processor().max_prompt_bytes();
            if text.len() > max {
                return Err(ApiError::invalid_param(
                    "messages",
                    format!("the conversation has {} bytes, more than the context holds", text.len()),
                ));
            }
            let thinking = state.reasoning_parser.as_ref().map(|p| crate::reasoning::prompt_state(p, &text));
            Ok((tok.encode(&text, add_special)?, thinking))
        })
        .await?;
    // With a reasoning parser, a constraint (structured output, a required or named tool)
    // starts once the thinking ends, unless the prompt closed it.
    let reasoning = match (&reasoning_parser, thinking) {
        (Some(p), Some(state)) => {
            if let Some(g) = params.guided_decoding.as_mut() {
                if state != crate::reasoning::PromptState::Closed && !s.constrain_reasoning {
                    g.starts_after = Some(p.end.to_string());
                }
            }
            Some(crate::reasoning::Splitter::new(p, state))
        }
        _ => None,
    };
    let top_logprobs = (req.logprobs == Some(true)).then(|| req.top_logprobs.unwrap_or(0));
    params.logprobs = top_logprobs;
    check_stream(req.stream, &params)?;
    // vLLM's `echo`: the new message starts with the last message when it has the same role.
    let echo = match messages.last() {
        Some(m) if req.echo && m.get("role").and_then(|r| r.as_str()) == Some("assistant") => {
            m.get("content").and_then(|c| c.as_str()).unwrap_or_default().to_string()
        }
        _ => String::new(),
    };
    let render = Render {
        api: Api::Chat,
        echo: vec![echo],
        top_logprobs,
        tools,
        reasoning,
        include_reasoning: req.include_reasoning != Some(false),
        token_ids_as_tokens: sampling.return_tokens_as_token_ids == Some(true),
        token_ids: sampling.return_token_ids == Some(true),
    };
    let stream = req.stream.then_some(req.stream_options.clone());
    let beam = sampling.beam_params(&params)?;
    let id = s.response_id("chatcmpl", sampling.request_id.as_deref(), &headers)?;
    respond(&s, render, id, vec![Prompt::TokenIds(ids)], &params, stream, beam).await
}

/// How a chat request's tools are honoured, as vLLM does: `none` (or no tools) is plain text;
/// `auto` (the default with tools) reads calls with the server's `--tool-call-parser`;
/// `required` and a named function are enforced by guided decoding over the tools' parameter
/// schemas (a list of `{"name", "parameters"}`, or the named function's arguments object), so
/// the arguments always parse and validate.
fn tool_mode(s: &AppState, req: &ChatRequest, params: &mut SamplingParams) -> Result<Tools, ApiError> {
    let bad = |m: &str| ApiError::invalid_param("tool_choice", m.to_string());
    let tools: Vec<&Value> = match &req.tools {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.iter().collect(),
        Some(_) => return Err(ApiError::invalid_param("tools", "tools must be a list")),
    };
    let function = |t: &Value| t.get("function").cloned().unwrap_or(Value::Null);
    for t in &tools {
        if function(t).get("name").and_then(Value::as_str).is_none() {
            return Err(ApiError::invalid_param(
                "tools",
                "each tool needs {\"type\": \"function\", \"function\": {\"name\", ...}}",
            ));
        }
    }
    let parallel = req.parallel_tool_calls.unwrap_or(true);
    let mut constrain = |schema: Value| -> Result<(), ApiError> {
        if params.guided_decoding.is_some() {
            return Err(bad("a required or named tool choice cannot be combined with another output constraint"));
        }
        params.guided_decoding = Some(vllm_engine::GuidedDecodingParams { json: Some(schema), ..Default::default() });
        Ok(())
    };
    let parameters = |t: &Value| function(t).get("parameters").cloned().unwrap_or(json!({"type": "object"}));
    match &req.tool_choice {
        None | Some(Value::Null) if tools.is_empty() => Ok(Tools::Off),
        None | Some(Value::Null) => Ok(s.tool_parser.clone().map_or(Tools::Off, Tools::Parse)),
        Some(Value::String(c)) if c == "none" => Ok(Tools::Off),
        Some(Value::String(c)) if c == "auto" => match (&s.tool_parser, tools.is_empty()) {
            (_, true) => Ok(Tools::Off),
            (Some(p), false) => Ok(Tools::Parse(p.clone())),
            (None, false) => {
                Err(bad("\"auto\" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set"))
            }
        },
        Some(Value::String(c)) if c == "required" => {
            if tools.is_empty() {
                return Err(bad("tool_choice \"required\" needs at least one tool"));
            }
            let one_of: Vec<Value> = tools
                .iter()
                .map(|t| {
                    json!({"type": "object", "properties": {
                        "name": {"type": "string", "enum": [function(t)["name"]]},
                        "parameters": parameters(t)}, "required": ["name", "parameters"]})
                })
                .collect();
            let mut schema = json!({"type": "array", "minItems": 1, "items": {"anyOf": one_of}});
            if !parallel {
                schema["maxItems"] = json!(1);
            }
            constrain(schema)?;
            Ok(Tools::Required)
        }
        Some(Value::Object(o)) => {
            let name =
                o.get("function").and_then(|f| f.get("name")).and_then(Value::as_str).ok_or_else(|| {
                    bad("a named tool choice is {\"type\": \"function\", \"function\": {\"name\": ...}}")
                })?;
            let tool = tools
                .iter()
                .find(|t| function(t)["name"] == name)
                .ok_or_else(|| bad(&format!("tool_choice names `{name}`, which is not among the tools")))?;
            constrain(parameters(tool))?;
            Ok(Tools::Named(name.to_string()))
        }
        Some(other) => Err(bad(&format!("tool_choice {other} (choose none, auto, required or a named function)"))),
    }
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
    let req: GenerateRequest = parse(body)?;
    check_extra_fields(&req.extra)?;
    // `/generate` answers `{"text": [...]}`: the OpenAI routes' response options mean nothing.
    let f = &req.sampling;
    for (field, set) in [
        ("request_id", f.request_id.is_some()),
        ("return_token_ids", f.return_token_ids.is_some()),
        ("return_tokens_as_token_ids", f.return_tokens_as_token_ids.is_some()),
        ("add_special_tokens", f.add_special_tokens.is_some()),
    ] {
        if set {
            return Err(ApiError::unsupported(field, "on /generate (use /v1/completions)"));
        }
    }
    let params = s.sampling_fields(&req.sampling).to_params(Some(16))?;
    check_stream(req.stream, &params)?;
    let id = s.new_id("gen");
    let prompt = req.prompt.clone();
    let with_prompt =
        |outs: &RequestOutput| -> Vec<String> { outs.outputs.iter().map(|c| format!("{prompt}{}", c.text)).collect() };
    if let Some(beam) = req.sampling.beam_params(&params)? {
        if req.stream {
            return Err(ApiError::unsupported("use_beam_search", "together with stream"));
        }
        let outs = beam_outputs(&id, s.engine()?.beam_search(vec![Prompt::Text(req.prompt.clone())], beam).await?);
        return Ok(Json(GenerateResponse { text: with_prompt(&outs[0]) }).into_response());
    }
    if !req.stream {
        let params = SamplingParams { output_kind: RequestOutputKind::FinalOnly, ..params };
        let outs = collect(submit(&s, &id, vec![Prompt::Text(req.prompt.clone())], &params).await?).await?;
        return Ok(Json(GenerateResponse { text: with_prompt(&outs[0]) }).into_response());
    }
    // vLLM's stream sends each choice's whole text so far: rebuilt here from the deltas.
    let params = SamplingParams { output_kind: RequestOutputKind::Delta, ..params };
    let rx = submit(&s, &id, vec![Prompt::Text(req.prompt.clone())], &params).await?.remove(0);
    let mut texts: Vec<String> = vec![req.prompt; params.n];
    let body = rx.into_stream().map(move |o| {
        let v = match o {
            Ok(o) => {
                for c in &o.outputs {
                    if let Some(t) = texts.get_mut(c.index) {
                        t.push_str(&c.text);
                    }
                }
                json!({"text": texts})
            }
            Err(e) => ApiError::from(e).body(),
        };
        Ok::<_, std::convert::Infallible>(Bytes::from(format!("{v}\0")))
    });
    // NUL-terminated JSON objects (vLLM's simple API), not one JSON document.
    Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .body(Body::from_stream(body))
        .map_err(|e| ApiError::internal(e.to_string()))
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
    s.check_model(req.model.as_deref())?;
    let Some(embedder) = s.embedder.clone() else {
        return Err(ApiError::bad_request(format!(
            "The model `{}` does not support embeddings (serve an embedding model such as {}).",
            s.model_name,
            vllm_engine::EMBEDDING_MODEL
        )));
    };
    let prompts = req.prompts()?;
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid_param("encoding_format", format!("'{other}' (choose float or base64)")))
        }
    };
    if req.dimensions.is_some_and(|d| d != embedder.dimensions()) {
        return Err(ApiError::invalid_param(
            "dimensions",
            format!("this model's embeddings have {} dimensions", embedder.dimensions()),
        ));
    }
    let outs = tokio::task::spawn_blocking(move || embedder.encode(&prompts))
        .await
        .map_err(|e| ApiError { status: StatusCode::INTERNAL_SERVER_ERROR, message: e.to_string(), param: None })?
        .map_err(|e| match e {
            vllm_engine::Error::InvalidArgument { param, message } => ApiError::invalid_param(param, message),
            e => ApiError::from(e),
        })?;
    let tokens: usize = outs.iter().map(|o| o.prompt_token_ids.len()).sum();
    let data: Vec<EmbeddingData> = outs
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let v = &o.outputs.embedding;
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(&bytes))
            } else {
                json!(v)
            };
            EmbeddingData { object: "embedding".into(), index: i, embedding }
        })
        .collect();
    Ok(Json(EmbeddingResponse {
        object: "list".into(),
        id: s.new_id("embd"),
        created: now(),
        model: s.model_name.clone(),
        data,
        usage: EmbeddingUsage { prompt_tokens: tokens, total_tokens: tokens },
    }))
}
