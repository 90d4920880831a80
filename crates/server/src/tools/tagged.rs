//! The formats whose calls follow a tag, so that text before the tag is content: `hermes`,
//! `qwen3_xml`, `mistral`, `deepseek_v3`. Streamed by [`Tagged`]: text streams as content
//! until the tag (less a tail that could begin it); from the tag on, the format's [`Body`]
//! reads the calls. A body that turns out not to hold a call gives its text back as content.

use serde_json::{Map, Value};

use super::json::{ArgsReader, CallsReader, Shape};
use super::{
    call_from_json, finish, sections, Body, Events, Parsed, Step, ToolCall, ToolParser, ToolStream, ToolStreamEvent,
};
use crate::render::partial_tail;

/// Longest function name (or V3 head) read before its separator.
const MAX_NAME: usize = 512;

enum Phase {
    Text,
    Body(Box<dyn Body>),
}

/// A stream of a tagged format.
struct Tagged {
    tag: &'static str,
    body: fn() -> Box<dyn Body>,
    ev: Events,
    phase: Phase,
    /// Text not yet sent (in the text phase).
    text: String,
    /// The current body's text, the tag included (given back if it is not a call).
    raw: String,
    /// Calls started before the current body.
    calls_before: usize,
}

impl Tagged {
    fn new(tag: &'static str, body: fn() -> Box<dyn Body>) -> Self {
        Self {
            tag,
            body,
            ev: Events::default(),
            phase: Phase::Text,
            text: String::new(),
            raw: String::new(),
            calls_before: 0,
        }
    }

    /// Content, except whitespace between calls.
    fn content(&mut self, s: &str) {
        if !(self.ev.calls > 0 && s.trim().is_empty()) {
            self.ev.content(s);
        }
    }

    fn push(&mut self, c: char) {
        match &mut self.phase {
            Phase::Text => {
                self.text.push(c);
                if self.text.ends_with(self.tag) {
                    let before = self.text[..self.text.len() - self.tag.len()].to_string();
                    self.content(&before);
                    self.text.clear();
                    self.raw = self.tag.to_string();
                    self.calls_before = self.ev.calls;
                    self.phase = Phase::Body((self.body)());
                }
            }
            Phase::Body(body) => {
                if self.ev.calls == self.calls_before {
                    self.raw.push(c);
                }
                match body.push(c, &mut self.ev) {
                    Step::More => {}
                    Step::Done => self.phase = Phase::Text,
                    Step::NotCalls => {
                        if self.ev.calls == self.calls_before {
                            let raw = std::mem::take(&mut self.raw);
                            self.ev.content(&raw);
                        }
                        self.ev.end();
                        self.phase = Phase::Text;
                    }
                }
            }
        }
    }
}

impl ToolStream for Tagged {
    fn feed(&mut self, delta: &str) -> Vec<ToolStreamEvent> {
        delta.chars().for_each(|c| self.push(c));
        if let Phase::Text = self.phase {
            // Sent now: all but a tail that could begin the tag; between calls, whitespace
            // waits for more text.
            let keep = partial_tail(&self.text, self.tag);
            let out = self.text[..self.text.len() - keep].to_string();
            if !(self.ev.calls > 0 && out.trim().is_empty()) {
                self.ev.content(&out);
                self.text.drain(..out.len());
            }
        }
        self.ev.take()
    }

    fn finish(&mut self) -> Vec<ToolStreamEvent> {
        match std::mem::replace(&mut self.phase, Phase::Text) {
            Phase::Body(mut body) => {
                body.finish(&mut self.ev);
                if self.ev.calls == self.calls_before {
                    let raw = std::mem::take(&mut self.raw);
                    self.ev.content(&raw);
                }
            }
            Phase::Text => {
                let rest = std::mem::take(&mut self.text);
                self.content(&rest);
            }
        }
        self.ev.end();
        self.ev.take()
    }
}

/// Skips text until `tag`.
#[derive(Default)]
struct Until {
    buf: String,
}

impl Until {
    fn seen(&mut self, c: char, tag: &str) -> bool {
        self.buf.push(c);
        if self.buf.ends_with(tag) {
            self.buf.clear();
            return true;
        }
        // Only a tail that could begin the tag matters.
        let keep = partial_tail(&self.buf, tag);
        self.buf.drain(..self.buf.len() - keep);
        false
    }
}

pub(super) struct Hermes;

impl ToolParser for Hermes {
    fn parse(&self, text: &str) -> Parsed {
        let (content, inside) = sections(text, "<tool_call>", "</tool_call>");
        let calls: Option<Vec<ToolCall>> = inside
            .iter()
            .map(|s| serde_json::from_str::<Value>(s.trim()).ok().as_ref().and_then(call_from_json))
            .collect();
        finish(content, calls.unwrap_or_default(), text)
    }

    fn stream(&self) -> Box<dyn ToolStream> {
        Box::new(Tagged::new("<tool_call>", || {
            Box::new(HermesBody { reader: Some(CallsReader::new(Shape::Object)), close: Until::default() })
        }))
    }
}

/// `{"name", "arguments"}` then `</tool_call>`.
struct HermesBody {
    /// `None` once the object is read.
    reader: Option<CallsReader>,
    close: Until,
}

impl Body for HermesBody {
    fn push(&mut self, c: char, ev: &mut Events) -> Step {
        let Some(reader) = self.reader.as_mut() else {
            return if self.close.seen(c, "</tool_call>") { Step::Done } else { Step::More };
        };
        let mut found = Vec::new();
        let ok = reader.push(c, &mut found).is_ok();
        ev.found(&mut found);
        if !ok {
            // A call already named ends here (the rest up to the closing tag is skipped).
            if !ev.open {
                return Step::NotCalls;
            }
            ev.end();
            self.reader = None;
        } else if reader.done() {
            self.reader = None;
        }
        Step::More
    }

    fn finish(&mut self, ev: &mut Events) {
        ev.end();
    }
}

pub(super) struct Qwen3Xml;

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
                args.insert(key.to_string(), xml_value(raw));
            }
            calls.push(ToolCall { name, arguments: Value::Object(args).to_string() });
        }
        finish(content, calls, text)
    }

    fn stream(&self) -> Box<dyn ToolStream> {
        Box::new(Tagged::new("<tool_call>", || Box::new(XmlBody::default())))
    }
}

/// A parameter's value: written bare, numbers, booleans, objects as JSON, the rest as text.
fn xml_value(raw: &str) -> Value {
    serde_json::from_str::<Value>(raw).ok().filter(|v| !v.is_string()).unwrap_or(Value::String(raw.to_string()))
}

#[derive(Default, PartialEq)]
enum Xml {
    /// Before `<function=`.
    #[default]
    Seek,
    Name,
    /// Between parameters.
    Params,
    Key,
    /// A value: `text` mode once it can only be text (then streamed as it comes).
    Value {
        text: bool,
    },
    /// After `</function>`, until `</tool_call>`.
    Close,
}

/// `<function=name>` then `<parameter=key>value</parameter>`..., `</function>`,
/// `</tool_call>`: the name when its `>` comes, each parameter as it closes (a value that can
/// only be text streams as it is written).
#[derive(Default)]
struct XmlBody {
    state: Xml,
    buf: String,
    key: String,
    params: usize,
    /// Bytes of a text value already sent (after its leading newlines).
    sent: usize,
    close: Until,
}

impl XmlBody {
    /// `"key":` (after a comma but for the first parameter).
    fn key_prefix(&mut self) -> String {
        let comma = if self.params > 0 { "," } else { "" };
        self.params += 1;
        format!("{comma}{}:", Value::String(std::mem::take(&mut self.key)))
    }

    /// Text value bytes that can be sent: all but trailing newlines and a tail that could
    /// begin a closing tag.
    fn sendable(&self) -> usize {
        let hold = partial_tail(&self.buf, "</parameter>").max(partial_tail(&self.buf, "</function>"));
        self.buf[..self.buf.len() - hold].trim_end_matches('\n').len()
    }

    fn send_text(&mut self, upto: usize, ev: &mut Events) {
        let start = self.buf.len() - self.buf.trim_start_matches('\n').len();
        let from = self.sent.max(start);
        if upto > from {
            let mut s = String::new();
            self.buf[from..upto].chars().for_each(|c| super::json::escape_into(c, &mut s));
            ev.args(&s);
            self.sent = upto;
        }
    }

    /// The value in `buf` is complete.
    fn end_value(&mut self, ev: &mut Events, text: bool) {
        let raw = self.buf.trim_matches('\n').to_string();
        if text {
            let end = self.buf.trim_end_matches('\n').len();
            self.send_text(end, ev);
            ev.args("\"");
        } else {
            let prefix = self.key_prefix();
            ev.args(&format!("{prefix}{}", xml_value(&raw)));
        }
        self.buf.clear();
        self.sent = 0;
    }

    /// Whether a value so far can only be text: its first non-blank character cannot begin
    /// JSON, or a literal it began is broken.
    fn only_text(&self) -> bool {
        let hold = partial_tail(&self.buf, "</parameter>").max(partial_tail(&self.buf, "</function>"));
        let t = self.buf[..self.buf.len() - hold].trim_start_matches(['\n', ' ', '\t', '\r']);
        let Some(first) = t.chars().next() else { return false };
        match first {
            '"' => true,
            't' | 'f' | 'n' => {
                let t = t.trim_end_matches(['\n', ' ', '\t', '\r']);
                !["true", "false", "null"].iter().any(|l| l.starts_with(t))
            }
            c => !(c == '-' || c == '[' || c == '{' || c.is_ascii_digit()),
        }
    }
}

impl Body for XmlBody {
    fn push(&mut self, c: char, ev: &mut Events) -> Step {
        match self.state {
            Xml::Seek => {
                self.buf.push(c);
                if self.buf.ends_with("<function=") {
                    self.buf.clear();
                    self.state = Xml::Name;
                } else if self.buf.ends_with("</tool_call>") {
                    return Step::NotCalls;
                }
            }
            Xml::Name => {
                if c == '>' {
                    ev.start(self.buf.trim().to_string());
                    ev.args("{");
                    self.buf.clear();
                    self.state = Xml::Params;
                } else if self.buf.len() > MAX_NAME {
                    return Step::NotCalls;
                } else {
                    self.buf.push(c);
                }
            }
            Xml::Params => {
                self.buf.push(c);
                if self.buf.ends_with("<parameter=") {
                    self.buf.clear();
                    self.state = Xml::Key;
                } else if self.buf.ends_with("</function>") {
                    self.buf.clear();
                    ev.args("}");
                    ev.end();
                    self.state = Xml::Close;
                } else if self.buf.ends_with("</tool_call>") {
                    ev.args("}");
                    ev.end();
                    return Step::Done;
                }
            }
            Xml::Key => {
                if c == '>' {
                    self.key = self.buf.trim().to_string();
                    self.buf.clear();
                    self.state = Xml::Value { text: false };
                } else {
                    self.buf.push(c);
                }
            }
            Xml::Value { text } => {
                self.buf.push(c);
                for (tag, next) in [("</parameter>", Xml::Params), ("</function>", Xml::Close)] {
                    if self.buf.ends_with(tag) {
                        self.buf.truncate(self.buf.len() - tag.len());
                        self.end_value(ev, text);
                        if next == Xml::Close {
                            ev.args("}");
                            ev.end();
                        }
                        self.state = next;
                        return Step::More;
                    }
                }
                if !text && self.only_text() {
                    let prefix = self.key_prefix();
                    ev.args(&format!("{prefix}\""));
                    self.state = Xml::Value { text: true };
                }
                if self.state == (Xml::Value { text: true }) {
                    let upto = self.sendable();
                    self.send_text(upto, ev);
                }
            }
            Xml::Close => {
                if self.close.seen(c, "</tool_call>") {
                    return Step::Done;
                }
            }
        }
        Step::More
    }

    fn finish(&mut self, ev: &mut Events) {
        // Cut short: the value read so far, and the object closed (as the whole-text parse
        // reads an unterminated call).
        if let Xml::Value { text } = self.state {
            self.end_value(ev, text);
        }
        if ev.open {
            ev.args("}");
        }
        ev.end();
    }
}

pub(super) struct Mistral;

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

    fn stream(&self) -> Box<dyn ToolStream> {
        Box::new(Tagged::new("[TOOL_CALLS]", || Box::new(MistralBody::Start)))
    }
}

/// A JSON list of calls, or `name[ARGS]{...}`.
enum MistralBody {
    Start,
    List(Box<CallsReader>),
    Name(String),
    Args(ArgsReader),
}

impl Body for MistralBody {
    fn push(&mut self, c: char, ev: &mut Events) -> Step {
        match self {
            MistralBody::Start if c.is_whitespace() => Step::More,
            MistralBody::Start if c == '[' => {
                *self = MistralBody::List(Box::new(CallsReader::new(Shape::List)));
                self.push(c, ev)
            }
            MistralBody::Start => {
                *self = MistralBody::Name(String::new());
                self.push(c, ev)
            }
            MistralBody::List(reader) => {
                let mut found = Vec::new();
                let ok = reader.push(c, &mut found).is_ok();
                ev.found(&mut found);
                match (ok, reader.done()) {
                    (false, _) if !ev.open => Step::NotCalls,
                    (false, _) | (true, true) => {
                        ev.end();
                        Step::Done
                    }
                    _ => Step::More,
                }
            }
            MistralBody::Name(name) => {
                name.push(c);
                if let Some(n) = name.strip_suffix("[ARGS]") {
                    ev.start(n.trim().to_string());
                    *self = MistralBody::Args(ArgsReader::new());
                    Step::More
                } else if name.len() > MAX_NAME || name.ends_with("[TOOL_CALLS]") {
                    Step::NotCalls
                } else {
                    Step::More
                }
            }
            MistralBody::Args(reader) => {
                let mut out = String::new();
                let r = reader.push(c, &mut out);
                ev.args(&out);
                match r {
                    Ok(false) => Step::More,
                    Ok(true) | Err(_) => {
                        ev.end();
                        Step::Done
                    }
                }
            }
        }
    }

    fn finish(&mut self, ev: &mut Events) {
        ev.end();
    }
}

pub(super) struct DeepSeekV3;

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

    fn stream(&self) -> Box<dyn ToolStream> {
        Box::new(Tagged::new(DS_BEGIN, || {
            Box::new(DeepSeekBody { state: Ds::Seek, buf: String::new(), until: Until::default() })
        }))
    }
}

enum Ds {
    /// Before a call's begin tag, or the block's end tag.
    Seek,
    /// The head, up to the separator.
    Head,
    /// V3's name, up to its line's end.
    Name,
    /// V3's fence (```` ```json ````) and blanks before the arguments.
    Fence,
    Args(ArgsReader),
    /// After the arguments, until the call's end tag.
    CallEnd,
}

/// `<call begin>function<sep>name\n```json\n{..}\n```<call end>` (V3) or
/// `<call begin>name<sep>{..}<call end>` (V3.1), repeated, then the block's end tag.
struct DeepSeekBody {
    state: Ds,
    buf: String,
    until: Until,
}

impl Body for DeepSeekBody {
    fn push(&mut self, c: char, ev: &mut Events) -> Step {
        match &mut self.state {
            Ds::Seek => {
                self.buf.push(c);
                if self.buf.ends_with(DS_CALL) {
                    self.buf.clear();
                    self.state = Ds::Head;
                } else if self.buf.ends_with(DS_END) {
                    return Step::Done;
                } else {
                    let keep = partial_tail(&self.buf, DS_CALL).max(partial_tail(&self.buf, DS_END));
                    self.buf.drain(..self.buf.len() - keep);
                }
            }
            Ds::Head => {
                self.buf.push(c);
                if let Some(head) = self.buf.strip_suffix(DS_SEP) {
                    let head = head.trim().to_string();
                    self.buf.clear();
                    if head == "function" {
                        self.state = Ds::Name;
                    } else {
                        ev.start(head);
                        self.state = Ds::Fence;
                    }
                } else if self.buf.len() > MAX_NAME {
                    return Step::NotCalls;
                }
            }
            Ds::Name => {
                if c == '\n' {
                    ev.start(self.buf.trim().to_string());
                    self.buf.clear();
                    self.state = Ds::Fence;
                } else if self.buf.len() > MAX_NAME {
                    return Step::NotCalls;
                } else {
                    self.buf.push(c);
                }
            }
            Ds::Fence => {
                if c == '{' {
                    self.buf.clear();
                    self.state = Ds::Args(ArgsReader::new());
                    return self.push(c, ev);
                }
                self.buf.push(c);
                let fence = self.buf.trim_start();
                if !(c.is_whitespace()
                    || "```json".starts_with(fence)
                    || fence.strip_prefix("```json").is_some_and(|r| r.trim().is_empty()))
                {
                    ev.end();
                    self.state = Ds::CallEnd;
                }
            }
            Ds::Args(reader) => {
                let mut out = String::new();
                let r = reader.push(c, &mut out);
                ev.args(&out);
                if !matches!(r, Ok(false)) {
                    ev.end();
                    self.state = Ds::CallEnd;
                }
            }
            Ds::CallEnd => {
                if self.until.seen(c, DS_CALL_END) {
                    self.buf.clear();
                    self.state = Ds::Seek;
                }
            }
        }
        Step::More
    }

    fn finish(&mut self, ev: &mut Events) {
        ev.end();
    }
}
