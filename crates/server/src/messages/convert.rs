//! A Messages request as a chat request, as vLLM converts it: `system` first, each message's
//! blocks as chat's message fields (`text` as content, `tool_use` as `tool_calls`,
//! `tool_result` as `tool` messages before the user turn that carries them, `thinking` as
//! reasoning), `tools` with `input_schema` as function tools, `tool_choice` `any` / `tool` as
//! chat's `required` / named choice (so they are forced by guided decoding). Chat's
//! conversion (`validate::chat`) then does the rest.

use serde_json::{json, Map, Value};

use super::protocol::{CountTokensRequest, MessagesRequest};
use crate::error::ApiError;
use crate::protocol::{check_extra_fields, ChatRequest, SamplingFields};
use crate::validate::chat::MAX_MESSAGES;

/// Most content blocks (counting those inside tool results) over all messages.
pub(crate) const MAX_BLOCKS: usize = 16 * 1024;

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::invalid_param("messages", message)
}

/// `system`: a string or a list of `text` blocks.
fn system_text(system: &Option<Value>) -> Result<Option<String>, ApiError> {
    let bad = |m: &str| ApiError::invalid_param("system", m.to_string());
    match system {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(blocks)) => {
            let mut text = String::new();
            for b in blocks {
                match (b.get("type").and_then(Value::as_str), b.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    _ => return Err(bad("system blocks must be text blocks")),
                }
            }
            Ok(Some(text))
        }
        Some(_) => Err(bad("system must be a string or a list of text blocks")),
    }
}

/// A `tool_result`'s content as text: a string or `text` blocks (joined by newlines).
fn tool_result_text(content: Option<&Value>, blocks: &mut usize) -> Result<String, ApiError> {
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            *blocks += parts.len();
            if *blocks > MAX_BLOCKS {
                return Err(bad(format!("more than {MAX_BLOCKS} content blocks")));
            }
            let texts: Result<Vec<&str>, ApiError> = parts
                .iter()
                .map(|p| match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => Ok(t),
                    (Some(kind), _) => {
                        Err(bad(format!("'{kind}' blocks in a tool_result are not supported (text only)")))
                    }
                    _ => Err(bad("each tool_result block needs a 'type'")),
                })
                .collect();
            Ok(texts?.join("\n"))
        }
        Some(_) => Err(bad("a tool_result's content is a string or a list of text blocks")),
    }
}

/// The conversation as chat messages.
pub(crate) fn chat_messages(system: &Option<Value>, messages: &[Value]) -> Result<Vec<Value>, ApiError> {
    if messages.len() > MAX_MESSAGES {
        return Err(bad(format!("{} messages: at most {MAX_MESSAGES} per request", messages.len())));
    }
    let mut out = Vec::with_capacity(messages.len() + 1);
    if let Some(s) = system_text(system)? {
        out.push(json!({"role": "system", "content": s}));
    }
    let mut blocks = 0usize;
    for msg in messages {
        let role = msg.get("role").and_then(Value::as_str).unwrap_or("");
        if !matches!(role, "user" | "assistant" | "system") {
            return Err(bad(format!("message role '{role}' (user or assistant)")));
        }
        let content = match msg.get("content") {
            Some(Value::String(s)) => {
                out.push(json!({"role": role, "content": s}));
                continue;
            }
            Some(Value::Array(b)) => b,
            _ => return Err(bad("each message needs a 'content': a string or a list of blocks")),
        };
        blocks += content.len();
        if blocks > MAX_BLOCKS {
            return Err(bad(format!("more than {MAX_BLOCKS} content blocks")));
        }
        let (mut text, mut reasoning, mut calls) = (String::new(), None::<String>, Vec::new());
        let mut has_text = false;
        for b in content {
            let kind = b.get("type").and_then(Value::as_str).unwrap_or("");
            let str_field = |k: &str| {
                b.get(k).and_then(Value::as_str).ok_or_else(|| bad(format!("a '{kind}' block needs a string '{k}'")))
            };
            match kind {
                "text" => {
                    text.push_str(str_field("text")?);
                    has_text = true;
                }
                "thinking" => reasoning.get_or_insert_with(String::new).push_str(str_field("thinking")?),
                "redacted_thinking" => {}
                "tool_use" => {
                    let input = b.get("input").filter(|i| !i.is_null()).cloned().unwrap_or(json!({}));
                    calls.push(json!({"id": str_field("id")?, "type": "function",
                        "function": {"name": str_field("name")?, "arguments": input.to_string()}}));
                }
                "tool_result" if role == "user" => {
                    let result = tool_result_text(b.get("content"), &mut blocks)?;
                    let id = str_field("tool_use_id")?;
                    out.push(json!({"role": "tool", "tool_call_id": id, "content": result}));
                }
                "tool_result" => {
                    text.push_str("Tool result: ");
                    text.push_str(&tool_result_text(b.get("content"), &mut blocks)?);
                    has_text = true;
                }
                "" => return Err(bad("each content block needs a 'type'")),
                other => return Err(bad(format!("'{other}' content blocks are not supported"))),
            }
        }
        // A user turn of tool results only is its tool messages.
        if role == "user" && !has_text {
            continue;
        }
        let mut m = Map::new();
        m.insert("role".into(), json!(role));
        m.insert("content".into(), json!(text));
        if let Some(r) = reasoning {
            m.insert("reasoning".into(), json!(r));
            m.insert("reasoning_content".into(), json!(r));
        }
        if !calls.is_empty() {
            m.insert("tool_calls".into(), Value::Array(calls));
        }
        out.push(Value::Object(m));
    }
    Ok(out)
}

/// Client tools as chat's function tools.
fn tools(tools: &Option<Vec<Value>>) -> Result<Option<Value>, ApiError> {
    let Some(tools) = tools else { return Ok(None) };
    let bad = |m: String| ApiError::invalid_param("tools", m);
    let out: Result<Vec<Value>, ApiError> = tools
        .iter()
        .map(|t| {
            let kind = t.get("type").and_then(Value::as_str).unwrap_or("custom");
            if kind != "custom" {
                return Err(bad(format!("tools of type '{kind}' are not supported (client tools only)")));
            }
            let name = t.get("name").and_then(Value::as_str).ok_or_else(|| bad("each tool needs a 'name'".into()))?;
            let mut schema = match t.get("input_schema") {
                Some(Value::Object(o)) => o.clone(),
                _ => return Err(bad(format!("the tool '{name}' needs an 'input_schema' object"))),
            };
            schema.entry("type").or_insert(json!("object"));
            let mut f = json!({"name": name, "parameters": schema});
            if let Some(d) = t.get("description").filter(|d| !d.is_null()) {
                f["description"] = d.clone();
            }
            Ok(json!({"type": "function", "function": f}))
        })
        .collect();
    Ok(Some(Value::Array(out?)).filter(|t| t.as_array().is_some_and(|a| !a.is_empty())))
}

/// `tool_choice` as chat's, and whether calls may be parallel. `auto` is chat's default
/// (calls read with the server's `--tool-call-parser` when it has one).
fn tool_choice(choice: &Option<Value>) -> Result<(Option<Value>, Option<bool>), ApiError> {
    let Some(c) = choice.as_ref().filter(|c| !c.is_null()) else { return Ok((None, None)) };
    let bad = |m: &str| ApiError::invalid_param("tool_choice", m.to_string());
    let parallel = c.get("disable_parallel_tool_use").and_then(Value::as_bool).map(|d| !d);
    let chat = match c.get("type").and_then(Value::as_str) {
        Some("auto") => None,
        Some("any") => Some(json!("required")),
        Some("none") => Some(json!("none")),
        Some("tool") => {
            let name = c.get("name").and_then(Value::as_str).ok_or_else(|| bad("a 'tool' choice needs a 'name'"))?;
            Some(json!({"type": "function", "function": {"name": name}}))
        }
        _ => return Err(bad("tool_choice.type is auto, any, tool or none")),
    };
    Ok((chat, parallel))
}

/// `thinking` as template variables: `disabled` turns thinking off (`enable_thinking: false`,
/// `reasoning_effort: "none"`), `enabled` / `adaptive` on (a budget is not enforced:
/// `max_tokens` bounds the output).
fn thinking(thinking: &Option<Value>, kwargs: &mut Map<String, Value>) -> Result<(), ApiError> {
    let Some(t) = thinking.as_ref().filter(|t| !t.is_null()) else { return Ok(()) };
    match t.get("type").and_then(Value::as_str) {
        Some("disabled") => {
            kwargs.entry("enable_thinking").or_insert(json!(false));
            kwargs.entry("reasoning_effort").or_insert(json!("none"));
        }
        Some("enabled" | "adaptive") => {
            kwargs.entry("enable_thinking").or_insert(json!(true));
        }
        _ => return Err(ApiError::invalid_param("thinking", "thinking.type is enabled, disabled or adaptive")),
    }
    Ok(())
}

/// `output_config`: its `format` as chat's `response_format`, its `effort` as the template's
/// `reasoning_effort`.
fn output_config(config: &Option<Value>, kwargs: &mut Map<String, Value>) -> Result<Option<Value>, ApiError> {
    let Some(c) = config.as_ref().filter(|c| !c.is_null()) else { return Ok(None) };
    if let Some(effort) = c.get("effort").filter(|e| !e.is_null()) {
        kwargs.entry("reasoning_effort").or_insert(effort.clone());
    }
    match c.get("format").filter(|f| !f.is_null()) {
        None => Ok(None),
        Some(f) => match (f.get("type").and_then(Value::as_str), f.get("schema")) {
            (Some("json_schema"), Some(schema)) => {
                Ok(Some(json!({"type": "json_schema", "json_schema": {"name": "output", "schema": schema}})))
            }
            _ => Err(ApiError::invalid_param(
                "output_config",
                "output_config.format is {\"type\": \"json_schema\", \"schema\"}",
            )),
        },
    }
}

/// The fields both Messages routes build their prompt from.
struct Parts<'a> {
    model: &'a Option<String>,
    system: &'a Option<Value>,
    messages: &'a [Value],
    tools: &'a Option<Vec<Value>>,
    tool_choice: &'a Option<Value>,
    thinking: &'a Option<Value>,
    output_config: &'a Option<Value>,
    kwargs: &'a Option<Map<String, Value>>,
    extra: &'a Map<String, Value>,
}

impl Parts<'_> {
    /// The chat request of the conversation, tools, tool choice and template variables.
    fn chat(&self) -> Result<ChatRequest, ApiError> {
        check_extra_fields(self.extra)?;
        let mut kwargs = self.kwargs.clone().unwrap_or_default();
        thinking(self.thinking, &mut kwargs)?;
        let response_format = output_config(self.output_config, &mut kwargs)?;
        let (tool_choice, parallel_tool_calls) = tool_choice(self.tool_choice)?;
        Ok(ChatRequest {
            sampling: SamplingFields { response_format, ..SamplingFields::default() },
            model: self.model.clone(),
            messages: chat_messages(self.system, self.messages)?,
            tools: tools(self.tools)?,
            tool_choice,
            parallel_tool_calls,
            chat_template_kwargs: Some(kwargs).filter(|k| !k.is_empty()),
            ..ChatRequest::default()
        })
    }
}

/// `POST /v1/messages` as a chat request.
pub(crate) fn chat_request(r: &MessagesRequest) -> Result<ChatRequest, ApiError> {
    let mut chat = Parts {
        model: &r.model,
        system: &r.system,
        messages: &r.messages,
        tools: &r.tools,
        tool_choice: &r.tool_choice,
        thinking: &r.thinking,
        output_config: &r.output_config,
        kwargs: &r.chat_template_kwargs,
        extra: &r.extra,
    }
    .chat()?;
    chat.stream = r.stream;
    chat.sampling = SamplingFields {
        max_tokens: Some(r.max_tokens),
        temperature: r.temperature,
        top_p: r.top_p,
        top_k: r.top_k,
        stop: r.stop_sequences.as_ref().map(|s| json!(s)),
        ..chat.sampling
    };
    Ok(chat)
}

/// `POST /v1/messages/count_tokens` as a chat request (its prompt is what is counted).
pub(crate) fn count_request(r: &CountTokensRequest) -> Result<ChatRequest, ApiError> {
    Parts {
        model: &r.model,
        system: &r.system,
        messages: &r.messages,
        tools: &r.tools,
        tool_choice: &r.tool_choice,
        thinking: &r.thinking,
        output_config: &r.output_config,
        kwargs: &r.chat_template_kwargs,
        extra: &r.extra,
    }
    .chat()
}

/// A chat error's field in the Messages request's spelling.
pub(crate) fn rename_param(mut e: ApiError) -> ApiError {
    if e.param.as_deref() == Some("stop") {
        e.param = Some("stop_sequences".into());
    }
    if e.param.as_deref() == Some("prompt") {
        e.param = Some("messages".into());
    }
    if e.param.as_deref() == Some("response_format") {
        e.param = Some("output_config".into());
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tool_loop_as_chat_messages() {
        let messages = [
            json!({"role": "user", "content": "Weather in Paris?"}),
            json!({"role": "assistant", "content": [
                {"type": "thinking", "thinking": "use the tool", "signature": "s"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]}),
            json!({"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "sunny"}]}]}),
            json!({"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_2", "content": "20C"},
                {"type": "text", "text": "And?"}]}),
        ];
        let m = chat_messages(&Some(json!([{"type": "text", "text": "Be brief."}])), &messages).unwrap();
        assert_eq!(m[0], json!({"role": "system", "content": "Be brief."}));
        assert_eq!(m[1], json!({"role": "user", "content": "Weather in Paris?"}));
        assert_eq!(m[2]["content"], "Checking.");
        assert_eq!(m[2]["reasoning"], "use the tool");
        assert_eq!(
            m[2]["tool_calls"][0]["function"],
            json!({"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"})
        );
        assert_eq!(m[3], json!({"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"}));
        // The tool result comes before the text of the turn that carries it.
        assert_eq!(m[4], json!({"role": "tool", "tool_call_id": "toolu_2", "content": "20C"}));
        assert_eq!(m[5], json!({"role": "user", "content": "And?"}));
        assert_eq!(m.len(), 6);
    }

    #[test]
    fn refusals_name_the_field() {
        let img = json!([{"role": "user", "content": [{"type": "image", "source": {}}]}]);
        assert_eq!(chat_messages(&None, img.as_array().unwrap()).unwrap_err().param.as_deref(), Some("messages"));
        assert!(chat_messages(&None, &[json!({"role": "robot", "content": "x"})]).is_err());
        assert!(chat_messages(&Some(json!(3)), &[]).unwrap_err().param.as_deref() == Some("system"));
        assert!(tools(&Some(vec![json!({"type": "web_search_20250305", "name": "w"})])).is_err());
        assert!(tools(&Some(vec![json!({"name": "w"})])).is_err());
        let t = tools(&Some(vec![json!({"name": "w", "input_schema": {"properties": {}}})])).unwrap().unwrap();
        assert_eq!(t[0]["function"]["parameters"]["type"], "object");
        assert_eq!(tool_choice(&Some(json!({"type": "any"}))).unwrap(), (Some(json!("required")), None));
        let (c, p) =
            tool_choice(&Some(json!({"type": "tool", "name": "w", "disable_parallel_tool_use": true}))).unwrap();
        assert_eq!((c.unwrap()["function"]["name"].clone(), p), (json!("w"), Some(false)));
        assert!(tool_choice(&Some(json!({"type": "tool"}))).is_err());
    }
}
