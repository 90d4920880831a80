//! `POST /v1/chat/completions` as an engine request: messages normalized, the chat template
//! rendered under its budgets (on the blocking pool), the tools' mode and constraint, and the
//! reasoning parser's start.

use axum::http::HeaderMap;
use serde_json::{json, Value};
use vllm_engine::{Prompt, SamplingParams};
use vllm_tokenizer::{ChatRequest as TemplateRequest, ContentFormat};

use super::{check_count, default_backend, engine_params, Family, ValidRequest};
use crate::error::ApiError;
use crate::protocol::{check_extra_fields, ChatRequest};
use crate::render::{Api, Render, Tools};
use crate::state::AppState;

/// Longest chat template a request may bring (`chat_template`).
const MAX_REQUEST_TEMPLATE_BYTES: usize = 64 << 10;
/// Most messages in one conversation.
pub(crate) const MAX_MESSAGES: usize = 4096;
/// Most tools one request may offer (OpenAI's limit is 128).
const MAX_TOOLS: usize = 1024;
/// Most documents one request may give the template.
const MAX_DOCUMENTS: usize = 1024;

/// `POST /v1/chat/completions`.
pub(crate) async fn chat(s: &AppState, req: ChatRequest, headers: &HeaderMap) -> Result<ValidRequest, ApiError> {
    let lora = s.resolve_model(req.model.as_deref())?;
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
    // Lists are counted before any of them is copied or rendered.
    check_count("messages", req.messages.len(), MAX_MESSAGES, "messages")?;
    for (param, v, max) in [("tools", &req.tools, MAX_TOOLS), ("documents", &req.documents, MAX_DOCUMENTS)] {
        if let Some(list) = v.as_ref().and_then(Value::as_array) {
            check_count(param, list.len(), max, param)?;
        }
    }
    check_messages(&req.messages)?;
    let mut fields = req.sampling.clone();
    fields.max_tokens = req.max_completion_tokens.or(fields.max_tokens);
    let top_logprobs = (req.logprobs == Some(true)).then(|| req.top_logprobs.unwrap_or(0));
    let (mut params, beam) = engine_params(s, &fields, Family::Chat, req.stream, top_logprobs)?;
    let tools = tool_mode(s, &req, &mut params)?;
    default_backend(s, &mut params);
    // The template runs on the blocking pool under its instruction and output budgets.
    let engine = s.engine()?.clone();
    let (server_template, content_format) = (s.chat_template.clone(), s.content_format);
    let reasoning_parser = s.reasoning_parser;
    let add_special = fields.add_special_tokens.unwrap_or(false);
    let r = req.clone();
    let (ids, thinking) = s
        .blocking(move || {
            let template = r.chat_template.as_deref().or(server_template.as_deref());
            let text = render_conversation(
                engine.tokenizer(),
                template,
                content_format,
                &TemplateRequest {
                    messages: &r.messages,
                    add_generation_prompt: r.add_generation_prompt.unwrap_or(!r.continue_final_message),
                    continue_final_message: r.continue_final_message,
                    tools: r.tools.as_ref(),
                    documents: r.documents.as_ref(),
                    kwargs: r.chat_template_kwargs.as_ref(),
                },
            )?;
            let thinking = reasoning_parser.as_ref().map(|p| crate::reasoning::prompt_state(p, &text));
            // The template already wrote any BOS the model wants; the engine checks the length.
            let ids =
                engine.input_processor().encode_text(&text, add_special).map_err(|e| match ApiError::from(e) {
                    e if e.param.as_deref() == Some("prompt") => ApiError { param: Some("messages".into()), ..e },
                    e => e,
                })?;
            Ok((ids, thinking))
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
    // vLLM's `echo`: the new message starts with the last message when it has the same role.
    let echo = match req.messages.last() {
        Some(m) if req.echo && m.get("role").and_then(|r| r.as_str()) == Some("assistant") => content_text(m),
        _ => String::new(),
    };
    Ok(ValidRequest {
        id: s.response_id("chatcmpl", fields.request_id.as_deref(), headers)?,
        model: lora.as_ref().map_or_else(|| s.model_name.clone(), |l| l.name.clone()),
        lora,
        prompts: vec![Prompt::TokenIds(ids)],
        beam,
        stream: req.stream.then(|| req.stream_options.clone().unwrap_or_default()),
        render: Render {
            api: Api::Chat,
            echo: vec![echo],
            n: params.n,
            top_logprobs,
            tools,
            reasoning,
            include_reasoning: req.include_reasoning != Some(false),
            token_ids_as_tokens: fields.return_tokens_as_token_ids == Some(true),
            token_ids: fields.return_token_ids == Some(true),
        },
        params,
    })
}

/// A conversation rendered by `template` (a request's or the server's, else the model's),
/// as text, its messages' content given in `format` (`--chat-template-content-format`; `None`:
/// the format detected in the template); errors name the field at fault. Runs under the
/// template's budgets: call it on the blocking pool.
pub(crate) fn render_conversation(
    tok: &vllm_engine::Tokenizer,
    template: Option<&str>,
    format: Option<ContentFormat>,
    req: &TemplateRequest,
) -> Result<String, ApiError> {
    let mut tpl =
        tok.chat_template_for(template).map_err(|e| ApiError::invalid_param("chat_template", e.to_string()))?;
    if let Some(f) = format {
        tpl = tpl.with_content_format(f);
    }
    tpl.render(req).map_err(|e| ApiError::invalid_param("messages", e.to_string()))
}

/// A conversation's first check: it has a message. Each message is read, checked and
/// normalized for its template's content format as the template renders
/// (`vllm_tokenizer::normalize_messages`, vLLM's rules).
pub(crate) fn check_messages(messages: &[Value]) -> Result<(), ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid_param("messages", "messages must not be empty"));
    }
    Ok(())
}

/// The text of a message's content (its text parts joined with newlines, as a string-format
/// template reads them).
fn content_text(message: &Value) -> String {
    match message.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.as_str().or_else(|| p.get("text").and_then(Value::as_str)))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
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
