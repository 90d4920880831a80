//! The formats whose whole output is the calls: `llama3_json`, `openai`, and the forced tool
//! choices (`required`: a JSON list of `{"name", "parameters"}`; a named function: its
//! arguments object). Streamed by [`Bare`]: an output that does not begin like calls streams
//! as content at once; one that does is read by the format's [`Body`], and given back as
//! content if it turns out not to be calls.

use serde_json::Value;

use super::json::{ArgsReader, CallsReader, Shape};
use super::{call_from_json, finish, Body, Events, Parsed, Step, ToolCall, ToolParser, ToolStream, ToolStreamEvent};

enum Phase {
    /// Blanks and an optional leading tag, until the first character decides.
    Prelude,
    Body(Box<dyn Body>),
    /// Not calls: everything is content.
    Content,
    /// After the calls: the rest is dropped (the whole-text parse would not read it either).
    Ignore,
}

/// A stream of a format whose output is all calls.
pub(super) struct Bare {
    /// Tags that may come first (`<|python_tag|>`).
    tags: &'static [&'static str],
    /// Characters calls begin with.
    opens: &'static [char],
    body: fn() -> Box<dyn Body>,
    ev: Events,
    phase: Phase,
    /// The text while it could still be content.
    held: String,
    /// Bytes of blanks `held` begins with.
    blank: usize,
}

impl Bare {
    pub(super) fn new(tags: &'static [&'static str], opens: &'static [char], body: fn() -> Box<dyn Body>) -> Self {
        Self { tags, opens, body, ev: Events::default(), phase: Phase::Prelude, held: String::new(), blank: 0 }
    }

    fn push(&mut self, c: char) {
        match &mut self.phase {
            Phase::Prelude => {
                self.held.push(c);
                if c.is_whitespace() && self.held.len() == self.blank + c.len_utf8() {
                    self.blank = self.held.len(); // still only blanks: nothing to decide
                    return;
                }
                let t = &self.held[self.blank..];
                let rest = match self.tags.iter().find_map(|tag| t.strip_prefix(tag)) {
                    Some(rest) => rest.trim_start(),
                    None if self.tags.iter().any(|tag| tag.starts_with(t)) => return,
                    None => t,
                };
                let Some(first) = rest.chars().next() else { return };
                if self.opens.contains(&first) {
                    self.phase = Phase::Body((self.body)());
                    let rest = rest.to_string();
                    rest.chars().for_each(|c| self.body_push(c));
                } else {
                    let held = std::mem::take(&mut self.held);
                    self.ev.content(&held);
                    self.phase = Phase::Content;
                }
            }
            Phase::Body(_) => {
                if self.ev.calls == 0 {
                    self.held.push(c);
                }
                self.body_push(c);
            }
            Phase::Content => self.ev.content(&c.to_string()),
            Phase::Ignore => {}
        }
    }

    fn body_push(&mut self, c: char) {
        let Phase::Body(body) = &mut self.phase else { return };
        match body.push(c, &mut self.ev) {
            Step::More => {}
            Step::Done => self.phase = Phase::Ignore,
            Step::NotCalls if self.ev.calls == 0 => {
                let held = std::mem::take(&mut self.held);
                self.ev.content(&held);
                self.phase = Phase::Content;
            }
            Step::NotCalls => {
                self.ev.end();
                self.phase = Phase::Ignore;
            }
        }
        if self.ev.calls > 0 {
            self.held.clear();
        }
    }
}

impl ToolStream for Bare {
    fn feed(&mut self, delta: &str) -> Vec<ToolStreamEvent> {
        delta.chars().for_each(|c| self.push(c));
        self.ev.take()
    }

    fn finish(&mut self) -> Vec<ToolStreamEvent> {
        match std::mem::replace(&mut self.phase, Phase::Ignore) {
            Phase::Prelude if !self.held.trim().is_empty() => {
                let held = std::mem::take(&mut self.held);
                self.ev.content(&held);
            }
            Phase::Body(mut body) => {
                body.finish(&mut self.ev);
                if self.ev.calls == 0 {
                    let held = std::mem::take(&mut self.held);
                    self.ev.content(&held);
                }
            }
            _ => {}
        }
        self.ev.end();
        self.ev.take()
    }
}

/// Call objects in one JSON value (`shape`); with `repeat`, more objects may follow, each
/// after a `;` (Llama 3.1's multiple calls).
struct JsonBody {
    shape: Shape,
    reader: CallsReader,
    repeat: bool,
    between: bool,
}

impl JsonBody {
    fn boxed(shape: Shape, repeat: bool) -> Box<dyn Body> {
        Box::new(Self { shape, reader: CallsReader::new(shape), repeat, between: false })
    }
}

impl Body for JsonBody {
    fn push(&mut self, c: char, ev: &mut Events) -> Step {
        if self.between {
            return match c {
                c if c.is_whitespace() => Step::More,
                ';' if self.repeat => {
                    self.reader = CallsReader::new(self.shape);
                    self.between = false;
                    Step::More
                }
                _ => Step::Done,
            };
        }
        let mut found = Vec::new();
        let ok = self.reader.push(c, &mut found).is_ok();
        ev.found(&mut found);
        if !ok {
            if ev.open {
                ev.end();
                return Step::Done;
            }
            return Step::NotCalls;
        }
        if self.reader.done() {
            self.between = true;
        }
        Step::More
    }

    fn finish(&mut self, ev: &mut Events) {
        ev.end();
    }
}

pub(super) struct Llama3Json;

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

    fn stream(&self) -> Box<dyn ToolStream> {
        Box::new(Bare::new(&["<|python_tag|>"], &['{'], || JsonBody::boxed(Shape::Object, true)))
    }
}

pub(super) struct OpenAiJson;

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

    fn stream(&self) -> Box<dyn ToolStream> {
        Box::new(Bare::new(&[], &['{', '['], || JsonBody::boxed(Shape::Any, false)))
    }
}

/// `tool_choice: "required"`: guided decoding makes the output a JSON list of
/// `{"name", "parameters"}`.
pub(crate) fn required_stream() -> Box<dyn ToolStream> {
    Box::new(Bare::new(&[], &['['], || JsonBody::boxed(Shape::List, false)))
}

/// A named `tool_choice`: guided decoding makes the output the function's arguments object;
/// the call starts with the output.
pub(crate) fn named_stream(name: &str) -> Box<dyn ToolStream> {
    Box::new(Named { name: Some(name.to_string()), reader: ArgsReader::new(), ev: Events::default(), reading: true })
}

struct Named {
    /// Given with the output's first text.
    name: Option<String>,
    reader: ArgsReader,
    ev: Events,
    /// Until the object is complete (or broken).
    reading: bool,
}

impl ToolStream for Named {
    fn feed(&mut self, delta: &str) -> Vec<ToolStreamEvent> {
        if delta.is_empty() {
            return Vec::new();
        }
        if let Some(name) = self.name.take() {
            self.ev.start(name);
        }
        let mut out = String::new();
        for c in delta.chars() {
            if !self.reading {
                break;
            }
            self.reading = matches!(self.reader.push(c, &mut out), Ok(false));
        }
        self.ev.args(&out);
        self.ev.take()
    }

    fn finish(&mut self) -> Vec<ToolStreamEvent> {
        self.ev.end();
        self.ev.take()
    }
}
