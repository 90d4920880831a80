//! A Responses request as a chat request: `instructions` and the input items as chat messages
//! (after a stored conversation it continues), function tools and `tool_choice` in chat's
//! spelling, `text.format` as `response_format`. Chat's conversion (`validate::chat`) then does
//! the rest, so templates, tools, forced tool calls and reasoning work as they do in chat.

use serde_json::{json, Map, Value};

use super::protocol::ResponsesRequest;
use crate::error::ApiError;
use crate::protocol::{check_extra_fields, ChatRequest};

/// Most input items one request may carry (counted before any is converted).
pub(crate) const MAX_INPUT_ITEMS: usize = crate::validate::chat::MAX_MESSAGES;

/// A chat message being assembled from items (several items can make one message: a
/// reasoning item, the text and the function calls of one assistant turn).
#[derive(Default)]
struct Msg {
    role: String,
    content: Option<String>,
    reasoning: Option<String>,
    tool_calls: Vec<Value>,
    tool_call_id: Option<String>,
}

impl Msg {
    fn assistant() -> Self {
        Self { role: "assistant".into(), ..Self::default() }
    }

    /// As a chat message. A missing content is an empty string (templates that add strings
    /// fail on null).
    fn into_value(self) -> Value {
        let mut m = Map::new();
        m.insert("role".into(), json!(self.role));
        m.insert("content".into(), json!(self.content.unwrap_or_default()));
        if let Some(r) = self.reasoning {
            m.insert("reasoning".into(), json!(r));
            m.insert("reasoning_content".into(), json!(r));
        }
        if !self.tool_calls.is_empty() {
            m.insert("tool_calls".into(), Value::Array(self.tool_calls));
        }
        if let Some(id) = self.tool_call_id {
            m.insert("tool_call_id".into(), json!(id));
        }
        Value::Object(m)
    }
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::invalid_param("input", message)
}

/// The text of a message's content: a string, or a list of text parts (`input_text`,
/// `output_text`, `text`; a `refusal` part's refusal).
fn text_of(content: &Value, what: &str) -> Result<String, ApiError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => {
            let mut text = String::new();
            for p in parts {
                let kind = p.get("type").and_then(Value::as_str).unwrap_or("");
                match (kind, p.get("text").or_else(|| p.get("refusal")).and_then(Value::as_str)) {
                    ("input_text" | "output_text" | "text" | "refusal", Some(t)) => text.push_str(t),
                    ("input_image" | "input_file" | "input_audio", _) => {
                        return Err(bad(format!("{what}: '{kind}' parts are not supported (text only)")))
                    }
                    _ => return Err(bad(format!("{what}: each content part needs a 'type' and its text"))),
                }
            }
            Ok(text)
        }
        _ => Err(bad(format!("{what}: content must be a string or a list of parts"))),
    }
}

/// A required string field of an item.
fn field<'a>(item: &'a Map<String, Value>, key: &str, kind: &str) -> Result<&'a str, ApiError> {
    item.get(key).and_then(Value::as_str).ok_or_else(|| bad(format!("a '{kind}' item needs a string '{key}'")))
}

/// The input as chat messages, merged as vLLM merges them: an assistant turn's reasoning,
/// text and function calls become one assistant message; a `function_call_output` a `tool`
/// message.
pub(crate) fn input_messages(input: &Value) -> Result<Vec<Value>, ApiError> {
    let items = match input {
        Value::String(s) => return Ok(vec![json!({"role": "user", "content": s})]),
        Value::Array(items) => items,
        _ => return Err(bad("input must be a string or a list of items")),
    };
    if items.len() > MAX_INPUT_ITEMS {
        return Err(bad(format!("{} input items: at most {MAX_INPUT_ITEMS} per request", items.len())));
    }
    let mut msgs: Vec<Msg> = Vec::with_capacity(items.len());
    for item in items {
        let item = item.as_object().ok_or_else(|| bad("each input item must be an object"))?;
        let kind = item.get("type").and_then(Value::as_str).unwrap_or("message");
        // The assistant message the item can join (vLLM's merging), if the last one is.
        let last_assistant = msgs.last_mut().filter(|m| m.role == "assistant");
        match kind {
            "message" => {
                let role = field(item, "role", kind)?;
                let role = match role {
                    "user" | "assistant" | "system" => role,
                    "developer" => "system",
                    other => return Err(bad(format!("message role '{other}' (user, assistant, system, developer)"))),
                };
                let text = text_of(item.get("content").unwrap_or(&Value::Null), "message")?;
                match last_assistant {
                    Some(m) if role == "assistant" && m.content.is_none() => m.content = Some(text),
                    _ => msgs.push(Msg { role: role.into(), content: Some(text), ..Msg::default() }),
                }
            }
            "function_call" => {
                let arguments = match item.get("arguments") {
                    Some(Value::String(s)) => s.clone(),
                    Some(v @ Value::Object(_)) => v.to_string(),
                    None | Some(Value::Null) => "{}".into(),
                    Some(_) => return Err(bad("a 'function_call' item's arguments are a JSON object (as text)")),
                };
                let call = json!({"id": field(item, "call_id", kind)?, "type": "function",
                    "function": {"name": field(item, "name", kind)?, "arguments": arguments}});
                match last_assistant {
                    Some(m) => m.tool_calls.push(call),
                    None => msgs.push(Msg { tool_calls: vec![call], ..Msg::assistant() }),
                }
            }
            "function_call_output" => {
                let output = text_of(item.get("output").unwrap_or(&Value::Null), "function_call_output")?;
                msgs.push(Msg {
                    role: "tool".into(),
                    content: Some(output),
                    tool_call_id: Some(field(item, "call_id", kind)?.to_string()),
                    ..Msg::default()
                });
            }
            "reasoning" => {
                if item.get("encrypted_content").is_some_and(|e| !e.is_null()) {
                    return Err(bad("reasoning items with encrypted_content are not supported"));
                }
                let first_text = |key: &str| {
                    item.get(key).and_then(Value::as_array).and_then(|a| a.first()).and_then(|p| p.get("text"))
                };
                let text = first_text("content").or_else(|| first_text("summary")).and_then(Value::as_str);
                let text = text.unwrap_or_default().to_string();
                match last_assistant {
                    Some(m) if m.reasoning.is_none() => m.reasoning = Some(text),
                    _ => msgs.push(Msg { reasoning: Some(text), ..Msg::assistant() }),
                }
            }
            other => return Err(bad(format!("input items of type '{other}' are not supported"))),
        }
    }
    Ok(msgs.into_iter().map(Msg::into_value).collect())
}

/// A finished output as the assistant message a continuation sees: its text and its calls
/// (the reasoning is left out, as vLLM does).
pub(crate) fn output_message(text: &str, calls: &[(String, String, String)]) -> Value {
    let tool_calls = calls
        .iter()
        .map(|(id, name, args)| json!({"id": id, "type": "function", "function": {"name": name, "arguments": args}}))
        .collect();
    Msg { content: Some(text.to_string()), tool_calls, ..Msg::assistant() }.into_value()
}

/// Function tools in chat's spelling (`{"type": "function", "function": {...}}`).
fn tools(tools: &[Value]) -> Result<Vec<Value>, ApiError> {
    tools
        .iter()
        .map(|t| {
            let kind = t.get("type").and_then(Value::as_str).unwrap_or("");
            if kind != "function" {
                return Err(ApiError::invalid_param(
                    "tools",
                    format!("tools of type '{kind}' are not supported (function tools only)"),
                ));
            }
            let name = t.get("name").and_then(Value::as_str).ok_or_else(|| {
                ApiError::invalid_param(
                    "tools",
                    "a function tool is {\"type\": \"function\", \"name\", \"parameters\"}",
                )
            })?;
            let mut f = json!({"name": name});
            for k in ["description", "parameters", "strict"] {
                if let Some(v) = t.get(k).filter(|v| !v.is_null()) {
                    f[k] = v.clone();
                }
            }
            Ok(json!({"type": "function", "function": f}))
        })
        .collect()
}

/// `tool_choice` in chat's spelling. `auto` is chat's default: calls are read with the
/// server's `--tool-call-parser` when it has one (plain text otherwise, as vLLM's Responses).
fn tool_choice(choice: &Option<Value>) -> Result<Option<Value>, ApiError> {
    let bad = |m: String| ApiError::invalid_param("tool_choice", m);
    match choice {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(c)) => match c.as_str() {
            "auto" => Ok(None),
            "none" | "required" => Ok(Some(json!(c))),
            other => Err(bad(format!("tool_choice '{other}' (none, auto, required or a function)"))),
        },
        Some(Value::Object(o)) => {
            match (o.get("type").and_then(Value::as_str), o.get("name").and_then(Value::as_str)) {
                (Some("function"), Some(name)) => Ok(Some(json!({"type": "function", "function": {"name": name}}))),
                (kind, _) => Err(bad(format!(
                    "tool_choice {{\"type\": {}}} is not supported (use {{\"type\": \"function\", \"name\"}})",
                    kind.unwrap_or("?")
                ))),
            }
        }
        Some(other) => Err(bad(format!("tool_choice {other} (none, auto, required or a function)"))),
    }
}

/// `text.format` as chat's `response_format`.
fn response_format(text: &Option<Value>) -> Result<Option<Value>, ApiError> {
    let Some(format) = text.as_ref().and_then(|t| t.get("format")).filter(|f| !f.is_null()) else {
        return Ok(None);
    };
    let bad = |m: &str| ApiError::invalid_param("text.format", m.to_string());
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "json_object"}))),
        Some("json_schema") => {
            let schema = format.get("schema").cloned().ok_or_else(|| bad("a json_schema format needs a 'schema'"))?;
            let name = format.get("name").cloned().unwrap_or(json!("response"));
            Ok(Some(json!({"type": "json_schema", "json_schema": {"name": name, "schema": schema}})))
        }
        _ => Err(bad("text.format.type is text, json_object or json_schema")),
    }
}

/// The request's fields this conversion cannot honour: a 400 naming each.
fn refuse_unsupported(req: &ResponsesRequest) -> Result<(), ApiError> {
    check_extra_fields(&req.extra)?;
    for field in ["prompt", "conversation"] {
        if req.extra.get(field).is_some_and(|v| !v.is_null()) {
            return Err(ApiError::unsupported(field, "(stored prompts and conversations)"));
        }
    }
    let f = &req.sampling;
    let refused = [
        ("max_tokens", f.max_tokens.is_some(), "on /v1/responses (use max_output_tokens)"),
        ("response_format", f.response_format.is_some(), "on /v1/responses (use text.format)"),
        ("n", f.n.is_some_and(|n| n != 1), "(one output per response)"),
        ("best_of", f.best_of.is_some_and(|n| n != 1), "(one output per response)"),
        ("use_beam_search", f.use_beam_search == Some(true), "on /v1/responses"),
        ("request_id", f.request_id.is_some(), "on /v1/responses"),
        ("return_token_ids", f.return_token_ids == Some(true), "on /v1/responses"),
        ("return_tokens_as_token_ids", f.return_tokens_as_token_ids == Some(true), "on /v1/responses"),
        ("prompt_logprobs", f.prompt_logprobs.as_ref().is_some_and(|v| !v.is_null()), "on /v1/responses"),
        ("top_logprobs", req.top_logprobs.is_some_and(|n| n != 0), "(log probabilities)"),
        ("max_tool_calls", req.max_tool_calls.is_some(), ""),
        ("truncation", req.truncation.as_deref().is_some_and(|t| t != "disabled"), "other than 'disabled'"),
        (
            "include",
            req.include.iter().flatten().any(|i| i == "message.output_text.logprobs"),
            "message.output_text.logprobs",
        ),
    ];
    for (param, set, what) in refused {
        if set {
            return Err(ApiError::unsupported(param, what));
        }
    }
    Ok(())
}

/// The chat request for `messages` (the conversation so far and this request's input, with
/// the `instructions` first).
pub(crate) fn chat_request(req: &ResponsesRequest, messages: Vec<Value>) -> Result<ChatRequest, ApiError> {
    refuse_unsupported(req)?;
    let mut sampling = req.sampling.clone();
    sampling.max_tokens = req.max_output_tokens;
    sampling.response_format = response_format(&req.text)?;
    let mut kwargs = req.chat_template_kwargs.clone().unwrap_or_default();
    if let Some(effort) = req.reasoning.as_ref().and_then(|r| r.get("effort")).and_then(Value::as_str) {
        kwargs.entry("reasoning_effort").or_insert(json!(effort));
        kwargs.entry("enable_thinking").or_insert(json!(effort != "none"));
    }
    let tools = req.tools.as_deref().map(tools).transpose()?;
    Ok(ChatRequest {
        model: req.model.clone(),
        messages,
        stream: req.stream,
        tools: tools.filter(|t| !t.is_empty()).map(Value::Array),
        tool_choice: tool_choice(&req.tool_choice)?,
        parallel_tool_calls: req.parallel_tool_calls,
        chat_template_kwargs: Some(kwargs).filter(|k| !k.is_empty()),
        include_reasoning: req.include_reasoning,
        sampling,
        ..ChatRequest::default()
    })
}

/// A chat error's field in the Responses request's spelling.
pub(crate) fn rename_param(mut e: ApiError) -> ApiError {
    e.param = e.param.map(|p| {
        match p.as_str() {
            "messages" | "prompt" => "input",
            "max_tokens" => "max_output_tokens",
            "response_format" => "text.format",
            other => other,
        }
        .to_string()
    });
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_merge_into_chat_turns() {
        let input = json!([
            {"role": "developer", "content": "Be brief."},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
            {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "call it"}]},
            {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{\"city\":\"Paris\"}"},
            {"type": "function_call", "call_id": "c2", "name": "w", "arguments": {"city": "Rome"}},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "rain"}]},
            {"role": "assistant", "content": [{"type": "output_text", "text": "Sunny and rain."}]},
        ]);
        let m = input_messages(&input).unwrap();
        assert_eq!(m.len(), 6, "{m:#?}");
        assert_eq!(m[0], json!({"role": "system", "content": "Be brief."}));
        assert_eq!(m[1]["content"], "Weather?");
        assert_eq!(m[2]["role"], "assistant");
        assert_eq!(m[2]["content"], "");
        assert_eq!(m[2]["reasoning"], "call it");
        assert_eq!(m[2]["tool_calls"].as_array().unwrap().len(), 2);
        assert_eq!(m[2]["tool_calls"][1]["function"]["arguments"], "{\"city\":\"Rome\"}");
        assert_eq!(m[3], json!({"role": "tool", "content": "sunny", "tool_call_id": "c1"}));
        assert_eq!(m[4]["content"], "rain");
        assert_eq!(m[5], json!({"role": "assistant", "content": "Sunny and rain."}));
    }

    #[test]
    fn refused_items() {
        for bad in [
            json!(5),
            json!([1]),
            json!([{"type": "item_reference", "id": "x"}]),
            json!([{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]),
            json!([{"type": "function_call", "name": "f"}]),
            json!([{"type": "reasoning", "encrypted_content": "abc", "summary": []}]),
            json!([{"role": "robot", "content": "x"}]),
        ] {
            let e = input_messages(&bad).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("input"), "{bad}");
        }
        let many = Value::Array(vec![json!("x"); MAX_INPUT_ITEMS + 1]);
        assert!(input_messages(&many).unwrap_err().message.contains("at most"));
    }

    #[test]
    fn tools_and_choices_in_chat_spelling() {
        let t = tools(&[json!({"type": "function", "name": "f", "parameters": {"type": "object"}})]).unwrap();
        assert_eq!(t[0], json!({"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}));
        assert!(tools(&[json!({"type": "web_search"})]).is_err());
        assert_eq!(tool_choice(&Some(json!("auto"))).unwrap(), None);
        assert_eq!(tool_choice(&Some(json!("required"))).unwrap(), Some(json!("required")));
        assert_eq!(
            tool_choice(&Some(json!({"type": "function", "name": "f"}))).unwrap(),
            Some(json!({"type": "function", "function": {"name": "f"}}))
        );
        assert!(tool_choice(&Some(json!({"type": "allowed_tools"}))).is_err());
        let f = response_format(&Some(json!({"format": {"type": "json_schema", "name": "x", "schema": {}}})));
        assert_eq!(f.unwrap().unwrap()["json_schema"]["schema"], json!({}));
    }
}
