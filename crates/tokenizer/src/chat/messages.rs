//! Chat messages as vLLM hands them to a template (`parse_chat_messages` and
//! `_postprocess_messages` in `vllm/renderers/chat_utils.py`), whatever shape the client sent:
//!
//! - `content` may be a string, a list of parts or null. Text parts (`text`, `input_text`,
//!   `output_text`, `refusal`, `thinking`, and bare strings) become one string joined with
//!   `"\n"` for [`ContentFormat::String`] templates (null is `""`), or a list of
//!   `{"type": "text", "text": ..}` parts (their extra fields kept) for
//!   [`ContentFormat::OpenAi`] templates (null is `[]`). A `tool` message's text parts are
//!   always joined into one string. Media parts are refused: the server's models read text.
//! - An assistant's `tool_calls` are kept, each with `function.arguments` as an object: a
//!   JSON string is parsed, and arguments that are empty, not JSON or not an object become
//!   `{}` (vLLM 0.32's choice: a malformed call in the history must not make every later turn
//!   fail). An empty `tool_calls` list is dropped. Its `reasoning` is passed as `reasoning`
//!   and `reasoning_content`.
//! - `tool_call_id` (tool messages), `name`, `task` (strings) and a developer message's
//!   `tools` are passed through; every other field of a message is dropped, as vLLM does.

use serde_json::{Map, Value as Json};

use super::format::ContentFormat;
use crate::{Error, Result};

/// Content part types read as text, and the field holding their text.
const TEXT_PARTS: &[(&str, &str)] = &[
    ("text", "text"),
    ("input_text", "text"),
    ("output_text", "text"),
    ("refusal", "refusal"),
    ("thinking", "thinking"),
];

/// Fields of OpenAI's content parts; any other field of a text part is kept on it
/// (vLLM's `_collect_extra_fields`).
const KNOWN_PART_FIELDS: &[&str] = &[
    "audio_embeds",
    "audio_url",
    "closed",
    "data",
    "file",
    "image_embeds",
    "image_pil",
    "image_url",
    "input_audio",
    "name",
    "prompt_cache_breakpoint",
    "refusal",
    "text",
    "thinking",
    "type",
    "uuid",
    "video_embeds",
    "video_url",
];

/// Media part types (and the fields that mark a part without a `type` as media).
const MEDIA_PARTS: &[&str] = &[
    "image_url",
    "input_image",
    "image_embeds",
    "image_pil",
    "audio_url",
    "input_audio",
    "audio_embeds",
    "video_url",
    "video_embeds",
    "prompt_embeds",
    "file",
];

fn bad(index: usize, reason: impl Into<String>) -> Error {
    Error::InvalidMessage { index, reason: reason.into() }
}

/// One content part, read: a text, or a tool reference (kept structured for templates that
/// expand them).
enum Part {
    Text { text: String, extra: Map<String, Json> },
    ToolReference(String),
}

fn parse_part(index: usize, part: &Json) -> Result<Option<Part>> {
    let obj = match part {
        Json::String(s) => return Ok(Some(Part::Text { text: s.clone(), extra: Map::new() })),
        Json::Object(o) => o,
        _ => return Err(bad(index, "each content part must be a string or an object")),
    };
    let kind = match obj.get("type") {
        Some(Json::String(t)) => t.as_str(),
        Some(_) => return Err(bad(index, "invalid 'type' field in a content part")),
        None => match obj.keys().find(|k| MEDIA_PARTS.contains(&k.as_str())) {
            Some(k) => k.as_str(),
            None if obj.contains_key("tool_reference") => "tool_reference",
            None => return Err(bad(index, "missing 'type' field in a content part")),
        },
    };
    if let Some((_, field)) = TEXT_PARTS.iter().find(|(t, _)| *t == kind) {
        return match obj.get(*field) {
            None | Some(Json::Null) => Ok(None), // vLLM skips a part with no text
            Some(Json::String(s)) => {
                let extra = obj
                    .iter()
                    .filter(|(k, _)| !KNOWN_PART_FIELDS.contains(&k.as_str()))
                    .map(|(k, v)| (k.clone(), v.clone()));
                Ok(Some(Part::Text { text: s.clone(), extra: extra.collect() }))
            }
            Some(_) => Err(bad(index, format!("a '{kind}' content part's '{field}' must be a string"))),
        };
    }
    if kind == "tool_reference" {
        return match obj.get("name") {
            Some(Json::String(n)) => Ok(Some(Part::ToolReference(n.clone()))),
            _ => Err(bad(index, "a 'tool_reference' content part needs a string 'name'")),
        };
    }
    if MEDIA_PARTS.contains(&kind) {
        return Err(bad(
            index,
            format!("'{kind}' content parts are not supported: this server's models read text only"),
        ));
    }
    Err(bad(
        index,
        format!(
            "unsupported content part type '{kind}' (supported: {}, tool_reference)",
            TEXT_PARTS.iter().map(|(t, _)| *t).collect::<Vec<_>>().join(", ")
        ),
    ))
}

/// A message's content as the template reads it.
fn content(index: usize, content: Option<&Json>, format: ContentFormat, is_tool: bool) -> Result<Json> {
    let parts: Vec<Part> = match content {
        None | Some(Json::Null) => Vec::new(),
        Some(Json::String(s)) => vec![Part::Text { text: s.clone(), extra: Map::new() }],
        Some(Json::Array(list)) => {
            let mut parts = Vec::with_capacity(list.len());
            for p in list {
                parts.extend(parse_part(index, p)?);
            }
            parts
        }
        Some(_) => return Err(bad(index, "content must be a string, a list of parts or null")),
    };
    let all_text = parts.iter().all(|p| matches!(p, Part::Text { .. }));
    if format == ContentFormat::String || (is_tool && all_text) {
        // Joined: text parts and, in string format, a tool reference's name.
        let texts: Vec<&str> = parts
            .iter()
            .map(|p| match p {
                Part::Text { text, .. } => text.as_str(),
                Part::ToolReference(name) => name.as_str(),
            })
            .collect();
        return Ok(Json::String(texts.join("\n")));
    }
    Ok(Json::Array(
        parts
            .into_iter()
            .map(|p| match p {
                Part::Text { text, extra } => {
                    let mut o = Map::new();
                    o.insert("type".into(), "text".into());
                    o.insert("text".into(), text.into());
                    o.extend(extra);
                    Json::Object(o)
                }
                Part::ToolReference(name) => serde_json::json!({"type": "tool_reference", "name": name}),
            })
            .collect(),
    ))
}

/// An assistant's tool calls, arguments as objects (vLLM's `_postprocess_messages`).
fn tool_calls(index: usize, calls: &Json) -> Result<Option<Json>> {
    let Json::Array(list) = calls else { return Err(bad(index, "tool_calls must be a list")) };
    if list.is_empty() {
        return Ok(None); // keeps the template on its plain-assistant path
    }
    let mut out = Vec::with_capacity(list.len());
    for call in list {
        let Json::Object(call) = call else { return Err(bad(index, "assistant tool_calls entries must be objects")) };
        let mut call = call.clone();
        let kind_ok = call.get("type").is_none_or(|t| t == "function");
        let Some(Json::Object(function)) = call.get_mut("function").filter(|_| kind_ok) else {
            return Err(bad(index, "chat messages only support assistant tool_calls of type 'function'"));
        };
        let args = match function.get("arguments") {
            Some(Json::Object(o)) => Json::Object(o.clone()),
            Some(Json::String(s)) if !s.is_empty() => {
                serde_json::from_str::<Json>(s).ok().filter(Json::is_object).unwrap_or_else(|| Json::Object(Map::new()))
            }
            _ => Json::Object(Map::new()),
        };
        function.insert("arguments".into(), args);
        out.push(Json::Object(call));
    }
    Ok(Some(Json::Array(out)))
}

/// The messages a template is given: each one rebuilt from the fields vLLM passes on, its
/// content in `format`. Errors name the message at fault.
pub fn normalize_messages(messages: &[Json], format: ContentFormat) -> Result<Vec<Json>> {
    messages
        .iter()
        .enumerate()
        .map(|(index, m)| {
            let Json::Object(m) = m else { return Err(bad(index, "each message must be an object")) };
            let Some(Json::String(role)) = m.get("role") else {
                return Err(bad(index, "each message needs a string 'role'"));
            };
            let mut out = Map::new();
            out.insert("role".into(), Json::String(role.clone()));
            out.insert("content".into(), content(index, m.get("content"), format, role == "tool")?);
            match role.as_str() {
                "assistant" => {
                    if let Some(calls) = m.get("tool_calls").filter(|c| !c.is_null()) {
                        if let Some(calls) = tool_calls(index, calls)? {
                            out.insert("tool_calls".into(), calls);
                        }
                    }
                    if let Some(r) = m.get("reasoning").filter(|r| !r.is_null()) {
                        out.insert("reasoning".into(), r.clone());
                        out.insert("reasoning_content".into(), r.clone());
                    }
                }
                "tool" => {
                    if let Some(id) = m.get("tool_call_id") {
                        out.insert("tool_call_id".into(), id.clone());
                    }
                }
                _ => {}
            }
            for key in ["name", "task"] {
                if let Some(v @ Json::String(_)) = m.get(key) {
                    out.insert(key.into(), v.clone());
                }
            }
            if role == "developer" {
                out.insert("tools".into(), m.get("tools").cloned().unwrap_or(Json::Null));
            }
            Ok(Json::Object(out))
        })
        .collect()
}

/// The text of a normalized message's content, as Hugging Face's `continue_final_message`
/// reads it: the string, or the last part with a text.
pub(crate) fn final_text(content: Option<&Json>) -> Option<&str> {
    match content? {
        Json::String(s) => Some(s),
        Json::Array(parts) => parts.iter().rev().find_map(|p| p.get("text")?.as_str()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn null_content_and_string_arguments() {
        let msgs = [
            json!({"role": "user", "content": [{"type": "text", "text": "a"}, "b", {"type": "text", "text": null}]}),
            json!({"role": "assistant", "content": null, "extra": 1, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}},
                {"id": "c2", "function": {"name": "g", "arguments": "not json"}},
                {"id": "c3", "type": "function", "function": {"name": "h", "arguments": {"y": [2]}}},
                {"id": "c4", "type": "function", "function": {"name": "k", "arguments": "[1]"}}]}),
            json!({"role": "tool", "tool_call_id": "c1", "name": "f", "content": [{"type": "text", "text": "21"}, {"type": "text", "text": "C"}]}),
            json!({"role": "assistant", "content": "ok", "tool_calls": [], "reasoning": "hm"}),
        ];
        let s = normalize_messages(&msgs, ContentFormat::String).unwrap();
        assert_eq!(s[0], json!({"role": "user", "content": "a\nb"}));
        assert_eq!(s[1]["content"], "");
        assert!(s[1].get("extra").is_none());
        let args: Vec<&Json> =
            s[1]["tool_calls"].as_array().unwrap().iter().map(|c| &c["function"]["arguments"]).collect();
        assert_eq!(args, [&json!({"x": 1}), &json!({}), &json!({"y": [2]}), &json!({})]);
        assert_eq!(s[1]["tool_calls"][0]["id"], "c1");
        assert_eq!(s[2], json!({"role": "tool", "content": "21\nC", "tool_call_id": "c1", "name": "f"}));
        assert_eq!(s[3], json!({"role": "assistant", "content": "ok", "reasoning": "hm", "reasoning_content": "hm"}));
        let o = normalize_messages(&msgs, ContentFormat::OpenAi).unwrap();
        assert_eq!(o[0]["content"], json!([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]));
        assert_eq!(o[1]["content"], json!([]));
        assert_eq!(o[2]["content"], "21\nC");
        assert_eq!(o[3]["content"], json!([{"type": "text", "text": "ok"}]));
        // Idempotent: normalized messages normalize to themselves.
        assert_eq!(normalize_messages(&s, ContentFormat::String).unwrap(), s);
        assert_eq!(normalize_messages(&o, ContentFormat::OpenAi).unwrap(), o);
    }

    #[test]
    fn refuses_what_a_text_template_cannot_take() {
        for (m, want) in [
            (json!("hi"), "must be an object"),
            (json!({"content": "x"}), "string 'role'"),
            (json!({"role": "user", "content": 3}), "content must be"),
            (json!({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}), "not supported"),
            (json!({"role": "user", "content": [{"image_url": "x"}]}), "not supported"),
            (json!({"role": "user", "content": [{"type": "mystery"}]}), "unsupported content part type"),
            (json!({"role": "user", "content": [{"text": "no type"}]}), "missing 'type'"),
            (json!({"role": "assistant", "tool_calls": [1]}), "must be objects"),
            (json!({"role": "assistant", "tool_calls": [{"type": "custom", "function": {}}]}), "of type 'function'"),
        ] {
            let e = normalize_messages(&[json!({"role": "user", "content": "ok"}), m.clone()], ContentFormat::String)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want) && e.contains("messages[1]"), "{m}: {e}");
        }
    }
}
