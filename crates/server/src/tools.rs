//! Tool-call parsers: a model's finished text split into plain content and tool calls, in the
//! format each model family was trained to write (vLLM's `--tool-call-parser` names).
//!
//! | name | format |
//! |------|--------|
//! | `hermes` (Qwen2.5, Hermes, many fine-tunes) | `<tool_call>{"name": .., "arguments": {..}}</tool_call>` |
//! | `llama3_json` (Llama 3.1-3.3) | `<\|python_tag\|>`? then `{"name": .., "parameters": {..}}`, `;`-separated |
//! | `mistral` | `[TOOL_CALLS][{"name": .., "arguments": {..}}]` or `[TOOL_CALLS]name[ARGS]{..}` |
//! | `pythonic` (Llama 3.2/4 pythonic) | `[get_weather(city="SF"), other()]` |
//! | `qwen3_xml` / `qwen3_coder` | `<tool_call><function=name><parameter=k>v</parameter></function></tool_call>` |
//! | `deepseek_v3` | `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>name` + fenced JSON |
//! | `openai` | a JSON object `{"tool_calls": [{"name": .., "arguments": {..}}]}` or a bare call list |
//!
//! Each parser is one `impl ToolParser`; malformed calls leave the text as content (never an
//! error, as in vLLM). Arguments are returned as JSON text.

use serde_json::{Map, Value};

/// One parsed call.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    /// The function's name.
    pub name: String,
    /// Its arguments, a JSON object as text.
    pub arguments: String,
}

/// A finished output split into content and calls.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Parsed {
    /// Text outside the calls (`None` when empty).
    pub content: Option<String>,
    /// The calls, in order.
    pub calls: Vec<ToolCall>,
}

impl Parsed {
    fn text(text: &str) -> Self {
        Self { content: Some(text.to_string()).filter(|t| !t.trim().is_empty()), calls: Vec::new() }
    }
}

/// A model family's tool-call format.
pub trait ToolParser: Send + Sync {
    /// Splits a finished output.
    fn parse(&self, text: &str) -> Parsed;
    /// The tag every call starts with, when the format has one: streamed content before it is
    /// sent at once. `None` (formats that are all JSON or a Python list): the whole output is
    /// held until it ends.
    fn start_marker(&self) -> Option<&'static str>;
}

/// Builds a parser.
type BuildParser = fn() -> Box<dyn ToolParser>;

/// The parsers' registry: each row the names `--tool-call-parser` takes for it (vLLM's
/// names and aliases) and how it is built. `--help`, the flag's check and [`parser`] read it.
const PARSERS: &[(&[&str], BuildParser)] = &[
    (&["hermes"], || Box::new(Hermes)),
    (&["llama3_json", "llama4_json"], || Box::new(Llama3Json)),
    (&["mistral"], || Box::new(Mistral)),
    (&["pythonic", "llama4_pythonic"], || Box::new(Pythonic)),
    (&["qwen3_xml", "qwen3_coder"], || Box::new(Qwen3Xml)),
    (&["deepseek_v3", "deepseek_v31"], || Box::new(DeepSeekV3)),
    (&["openai"], || Box::new(OpenAiJson)),
];

/// The parser `--tool-call-parser <name>` names.
pub fn parser(name: &str) -> Option<Box<dyn ToolParser>> {
    PARSERS.iter().find(|(names, _)| names.contains(&name)).map(|(_, build)| build())
}

/// Every name [`parser`] knows.
pub fn names() -> impl Iterator<Item = &'static str> + Clone {
    PARSERS.iter().flat_map(|(names, _)| names.iter().copied())
}

/// A call from a JSON object with `name` and `arguments` (or `parameters`), the arguments
/// given as an object or as JSON text.
fn call_from_json(v: &Value) -> Option<ToolCall> {
    let o = v.as_object()?;
    let name = o.get("name")?.as_str()?.to_string();
    let args = match o.get("arguments").or_else(|| o.get("parameters")) {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(Value::String(s)) => serde_json::from_str::<Value>(s).ok().filter(Value::is_object)?,
        Some(a @ Value::Object(_)) => a.clone(),
        Some(_) => return None,
    };
    Some(ToolCall { name, arguments: args.to_string() })
}

/// Every complete `open ... close` section of `text`: the content outside, the insides.
fn sections<'a>(text: &'a str, open: &str, close: &str) -> (String, Vec<&'a str>) {
    let (mut content, mut inside, mut rest) = (String::new(), Vec::new(), text);
    while let Some(i) = rest.find(open) {
        content.push_str(&rest[..i]);
        let after = &rest[i + open.len()..];
        match after.find(close) {
            Some(j) => {
                inside.push(&after[..j]);
                rest = &after[j + close.len()..];
            }
            None => {
                // An unterminated last call (the output was cut at its end tag): take the rest.
                inside.push(after);
                rest = "";
            }
        }
    }
    content.push_str(rest);
    (content, inside)
}

fn finish(content: String, calls: Vec<ToolCall>, text: &str) -> Parsed {
    if calls.is_empty() {
        return Parsed::text(text);
    }
    Parsed { content: Some(content.trim().to_string()).filter(|c| !c.is_empty()), calls }
}

struct Hermes;

impl ToolParser for Hermes {
    fn parse(&self, text: &str) -> Parsed {
        let (content, inside) = sections(text, "<tool_call>", "</tool_call>");
        let calls: Option<Vec<ToolCall>> = inside
            .iter()
            .map(|s| serde_json::from_str::<Value>(s.trim()).ok().as_ref().and_then(call_from_json))
            .collect();
        finish(content, calls.unwrap_or_default(), text)
    }

    fn start_marker(&self) -> Option<&'static str> {
        Some("<tool_call>")
    }
}

struct Llama3Json;

impl ToolParser for Llama3Json {
    fn parse(&self, text: &str) -> Parsed {
        let body = text.trim_start();
        let body = body.strip_prefix("<|python_tag|>").unwrap_or(body).trim();
        if !body.starts_with('{') {
            return Parsed::text(text);
        }
        // One or more objects, separated by `;` (Llama 3.1's multiple-call form).
        let mut calls = Vec::new();
        let mut rest = body;
        while !rest.is_empty() {
            let mut one = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
            let Some(Ok(v)) = one.next() else { return Parsed::text(text) };
            let Some(c) = call_from_json(&v) else { return Parsed::text(text) };
            calls.push(c);
            rest = rest[one.byte_offset()..].trim_start();
            if let Some(next) = rest.strip_prefix(';') {
                rest = next.trim_start();
            } else if !rest.is_empty() {
                return Parsed::text(text);
            }
        }
        finish(String::new(), calls, text)
    }

    fn start_marker(&self) -> Option<&'static str> {
        None
    }
}

struct Mistral;

impl ToolParser for Mistral {
    fn parse(&self, text: &str) -> Parsed {
        let Some(i) = text.find("[TOOL_CALLS]") else { return Parsed::text(text) };
        let content = text[..i].to_string();
        let rest = text[i + "[TOOL_CALLS]".len()..].trim_start();
        let mut calls = Vec::new();
        if rest.starts_with('[') {
            // v0.3: a JSON list of calls.
            let Ok(Value::Array(list)) =
                serde_json::Deserializer::from_str(rest).into_iter::<Value>().next().unwrap_or(Ok(Value::Null))
            else {
                return Parsed::text(text);
            };
            for v in &list {
                match call_from_json(v) {
                    Some(c) => calls.push(c),
                    None => return Parsed::text(text),
                }
            }
        } else {
            // v11+ tokenizers: `name[ARGS]{...}`, repeated with `[TOOL_CALLS]`.
            for part in rest.split("[TOOL_CALLS]") {
                let Some((name, args)) = part.split_once("[ARGS]") else { return Parsed::text(text) };
                let Some(Ok(v)) = serde_json::Deserializer::from_str(args.trim()).into_iter::<Value>().next() else {
                    return Parsed::text(text);
                };
                if !v.is_object() {
                    return Parsed::text(text);
                }
                calls.push(ToolCall { name: name.trim().to_string(), arguments: v.to_string() });
            }
        }
        finish(content, calls, text)
    }

    fn start_marker(&self) -> Option<&'static str> {
        Some("[TOOL_CALLS]")
    }
}

struct Qwen3Xml;

impl ToolParser for Qwen3Xml {
    fn parse(&self, text: &str) -> Parsed {
        let (content, inside) = sections(text, "<tool_call>", "</tool_call>");
        let mut calls = Vec::new();
        for call in inside {
            let Some(f) = call.find("<function=") else { return Parsed::text(text) };
            let after = &call[f + "<function=".len()..];
            let Some(gt) = after.find('>') else { return Parsed::text(text) };
            let name = after[..gt].trim().to_string();
            let body = after[gt + 1..].split("</function>").next().unwrap_or("");
            let mut args = Map::new();
            let (_, params) = sections(body, "<parameter=", "</parameter>");
            for p in params {
                let Some(gt) = p.find('>') else { return Parsed::text(text) };
                let (key, raw) = (p[..gt].trim(), p[gt + 1..].trim_matches('\n'));
                // Values are written bare: numbers, booleans, objects as JSON, the rest as text.
                let value = serde_json::from_str::<Value>(raw)
                    .ok()
                    .filter(|v| !v.is_string())
                    .unwrap_or(Value::String(raw.to_string()));
                args.insert(key.to_string(), value);
            }
            calls.push(ToolCall { name, arguments: Value::Object(args).to_string() });
        }
        finish(content, calls, text)
    }

    fn start_marker(&self) -> Option<&'static str> {
        Some("<tool_call>")
    }
}

struct DeepSeekV3;

const DS_BEGIN: &str = "<｜tool▁calls▁begin｜>";
const DS_END: &str = "<｜tool▁calls▁end｜>";
const DS_CALL: &str = "<｜tool▁call▁begin｜>";
const DS_CALL_END: &str = "<｜tool▁call▁end｜>";
const DS_SEP: &str = "<｜tool▁sep｜>";

impl ToolParser for DeepSeekV3 {
    fn parse(&self, text: &str) -> Parsed {
        let Some(i) = text.find(DS_BEGIN) else { return Parsed::text(text) };
        let content = text[..i].to_string();
        let block = text[i + DS_BEGIN.len()..].split(DS_END).next().unwrap_or("");
        let (_, inside) = sections(block, DS_CALL, DS_CALL_END);
        let mut calls = Vec::new();
        for call in inside {
            // V3: `function<sep>name\n```json\n{..}\n````; V3.1: `name<sep>{..}`.
            let Some((head, tail)) = call.split_once(DS_SEP) else { return Parsed::text(text) };
            let (name, json) = if head.trim() == "function" {
                let Some((name, rest)) = tail.split_once('\n') else { return Parsed::text(text) };
                (name.trim(), rest.trim().trim_start_matches("```json").trim_end_matches("```").trim())
            } else {
                (head.trim(), tail.trim())
            };
            match serde_json::from_str::<Value>(json) {
                Ok(v) if v.is_object() => calls.push(ToolCall { name: name.to_string(), arguments: v.to_string() }),
                _ => return Parsed::text(text),
            }
        }
        finish(content, calls, text)
    }

    fn start_marker(&self) -> Option<&'static str> {
        Some(DS_BEGIN)
    }
}

struct OpenAiJson;

impl ToolParser for OpenAiJson {
    fn parse(&self, text: &str) -> Parsed {
        let Ok(v) = serde_json::from_str::<Value>(text.trim()) else { return Parsed::text(text) };
        let list = match &v {
            Value::Object(o) if o.contains_key("tool_calls") => o["tool_calls"].as_array().cloned().unwrap_or_default(),
            Value::Array(a) => a.clone(),
            Value::Object(_) => vec![v.clone()],
            _ => return Parsed::text(text),
        };
        let calls: Option<Vec<ToolCall>> =
            list.iter().map(|c| call_from_json(c.get("function").unwrap_or(c))).collect();
        finish(String::new(), calls.unwrap_or_default(), text)
    }

    fn start_marker(&self) -> Option<&'static str> {
        None
    }
}

struct Pythonic;

impl ToolParser for Pythonic {
    fn parse(&self, text: &str) -> Parsed {
        let body = text.trim();
        let body = body.strip_prefix("<|python_start|>").unwrap_or(body);
        let body = body.strip_suffix("<|python_end|>").unwrap_or(body).trim();
        let Some(list) = body.strip_prefix('[').and_then(|b| b.strip_suffix(']')) else { return Parsed::text(text) };
        let mut p = Py { s: list.as_bytes(), i: 0 };
        let mut calls = Vec::new();
        loop {
            p.ws();
            if p.i >= p.s.len() {
                break;
            }
            match p.call() {
                Some(c) => calls.push(c),
                None => return Parsed::text(text),
            }
            p.ws();
            if p.eat(b',') {
                continue;
            }
            if p.i < p.s.len() {
                return Parsed::text(text);
            }
        }
        finish(String::new(), calls, text)
    }

    fn start_marker(&self) -> Option<&'static str> {
        None
    }
}

/// A small reader of Python call syntax with literal arguments: `name(k=v, ...)`, where a
/// value is a string, number, `True`/`False`/`None`, list, tuple or dict of such. Nesting is
/// bounded.
struct Py<'a> {
    s: &'a [u8],
    i: usize,
}

const PY_MAX_DEPTH: usize = 32;

impl Py<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        self.ws();
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn ident(&mut self) -> Option<String> {
        self.ws();
        let start = self.i;
        while self.i < self.s.len() && (self.s[self.i].is_ascii_alphanumeric() || b"_.-".contains(&self.s[self.i])) {
            self.i += 1;
        }
        (self.i > start).then(|| String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }

    fn call(&mut self) -> Option<ToolCall> {
        let name = self.ident()?;
        if !self.eat(b'(') {
            return None;
        }
        let mut args = Map::new();
        if !self.eat(b')') {
            loop {
                let key = self.ident()?;
                if !self.eat(b'=') {
                    return None;
                }
                args.insert(key, self.value(0)?);
                if self.eat(b')') {
                    break;
                }
                if !self.eat(b',') {
                    return None;
                }
                if self.eat(b')') {
                    break;
                }
            }
        }
        Some(ToolCall { name, arguments: Value::Object(args).to_string() })
    }

    fn value(&mut self, depth: usize) -> Option<Value> {
        if depth > PY_MAX_DEPTH {
            return None;
        }
        self.ws();
        let c = *self.s.get(self.i)?;
        match c {
            b'"' | b'\'' => self.string(c).map(Value::String),
            b'[' | b'(' => {
                let close = if c == b'[' { b']' } else { b')' };
                self.i += 1;
                let mut items = Vec::new();
                loop {
                    if self.eat(close) {
                        return Some(Value::Array(items));
                    }
                    items.push(self.value(depth + 1)?);
                    if !self.eat(b',') && !self.eat(close) {
                        return None;
                    } else if self.s.get(self.i - 1) == Some(&close) {
                        return Some(Value::Array(items));
                    }
                }
            }
            b'{' => {
                self.i += 1;
                let mut map = Map::new();
                loop {
                    if self.eat(b'}') {
                        return Some(Value::Object(map));
                    }
                    let key = match self.value(depth + 1)? {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    if !self.eat(b':') {
                        return None;
                    }
                    map.insert(key, self.value(depth + 1)?);
                    if !self.eat(b',') && !self.eat(b'}') {
                        return None;
                    } else if self.s.get(self.i - 1) == Some(&b'}') {
                        return Some(Value::Object(map));
                    }
                }
            }
            _ => {
                let start = self.i;
                while self.i < self.s.len() && !b",)]}: \t\n".contains(&self.s[self.i]) {
                    self.i += 1;
                }
                let word = std::str::from_utf8(&self.s[start..self.i]).ok()?;
                match word {
                    "True" => Some(Value::Bool(true)),
                    "False" => Some(Value::Bool(false)),
                    "None" => Some(Value::Null),
                    w => serde_json::from_str::<serde_json::Number>(w).ok().map(Value::Number),
                }
            }
        }
    }

    fn string(&mut self, quote: u8) -> Option<String> {
        self.i += 1;
        let mut out = Vec::new();
        while let Some(&c) = self.s.get(self.i) {
            self.i += 1;
            match c {
                b'\\' => {
                    let e = *self.s.get(self.i)?;
                    self.i += 1;
                    out.push(match e {
                        b'n' => b'\n',
                        b't' => b'\t',
                        other => other,
                    });
                }
                c if c == quote => return String::from_utf8(out).ok(),
                c => out.push(c),
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn calls(parser: &str, text: &str) -> Parsed {
        super::parser(parser).unwrap().parse(text)
    }

    fn call(name: &str, args: Value) -> ToolCall {
        ToolCall { name: name.into(), arguments: args.to_string() }
    }

    #[test]
    fn hermes() {
        let p = calls(
            "hermes",
            "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n\
             <tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>",
        );
        assert_eq!(p.content.as_deref(), Some("Let me check."));
        assert_eq!(
            p.calls,
            vec![call("get_weather", serde_json::json!({"city": "Paris"})), call("get_time", serde_json::json!({}))]
        );
        // Not JSON inside: all content.
        let p = calls("hermes", "<tool_call>not json</tool_call>");
        assert!(p.calls.is_empty() && p.content.is_some());
        assert_eq!(calls("hermes", "Just text.").content.as_deref(), Some("Just text."));
    }

    #[test]
    fn llama3_json() {
        let p = calls("llama3_json", "<|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"SF\"}}");
        assert_eq!(p.calls, vec![call("get_weather", serde_json::json!({"city": "SF"}))]);
        assert_eq!(p.content, None);
        let p = calls(
            "llama3_json",
            "{\"name\": \"a\", \"parameters\": {\"x\": 1}}; {\"name\": \"b\", \"parameters\": {\"y\": [1, 2]}}",
        );
        assert_eq!(p.calls.len(), 2);
        assert_eq!(p.calls[1], call("b", serde_json::json!({"y": [1, 2]})));
        assert!(calls("llama3_json", "The answer is {x}.").calls.is_empty());
    }

    #[test]
    fn mistral() {
        let p = calls("mistral", "[TOOL_CALLS][{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Lyon\"}}]");
        assert_eq!(p.calls, vec![call("get_weather", serde_json::json!({"city": "Lyon"}))]);
        let p = calls("mistral", "Sure.[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Nice\"}[TOOL_CALLS]noop[ARGS]{}");
        assert_eq!(p.content.as_deref(), Some("Sure."));
        assert_eq!(
            p.calls,
            vec![call("get_weather", serde_json::json!({"city": "Nice"})), call("noop", serde_json::json!({}))]
        );
    }

    #[test]
    fn pythonic() {
        let p = calls(
            "pythonic",
            "[get_weather(city='San Francisco', unit=\"c\", days=3), lookup(ids=[1, 2], opts={'a': True, 'b': None})]",
        );
        assert_eq!(
            p.calls,
            vec![
                call("get_weather", serde_json::json!({"city": "San Francisco", "unit": "c", "days": 3})),
                call("lookup", serde_json::json!({"ids": [1, 2], "opts": {"a": true, "b": null}})),
            ]
        );
        assert!(calls("pythonic", "[not a call]").calls.is_empty());
        // Nesting past the bound is not parsed (and does not recurse without end).
        let deep = format!("[f(x={}1{})]", "[".repeat(100), "]".repeat(100));
        assert!(calls("pythonic", &deep).calls.is_empty());
    }

    #[test]
    fn qwen3_xml() {
        let p = calls(
            "qwen3_xml",
            "<tool_call>\n<function=get_weather>\n<parameter=city>\nBeijing\n</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>",
        );
        assert_eq!(p.calls, vec![call("get_weather", serde_json::json!({"city": "Beijing", "days": 3}))]);
    }

    #[test]
    fn deepseek_v3() {
        let text = "Checking.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Tokyo\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
        let p = calls("deepseek_v3", text);
        assert_eq!(p.content.as_deref(), Some("Checking."));
        assert_eq!(p.calls, vec![call("get_weather", serde_json::json!({"city": "Tokyo"}))]);
        let v31 = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"city\": \"Oslo\"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
        assert_eq!(calls("deepseek_v31", v31).calls, vec![call("get_weather", serde_json::json!({"city": "Oslo"}))]);
    }

    #[test]
    fn openai_json() {
        let p = calls("openai", "{\"tool_calls\": [{\"name\": \"f\", \"arguments\": \"{\\\"a\\\": 1}\"}]}");
        assert_eq!(p.calls, vec![call("f", serde_json::json!({"a": 1}))]);
    }

    #[test]
    fn every_listed_parser_exists() {
        assert_eq!(names().count(), 11);
        for name in names() {
            assert!(parser(name).is_some(), "{name}");
        }
        assert!(parser("nope").is_none());
    }
}
