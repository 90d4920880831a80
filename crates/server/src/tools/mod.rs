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
//!
//! Streamed, each parser's [`ToolStream`] reads the text as it is generated and reports
//! [`ToolStreamEvent`]s, like vLLM's incremental parsers: text that cannot be part of a call at
//! once, a call's name as soon as it is complete, then its arguments as they are written, then
//! its end. Text that could still turn out to be a call is held until that is decided, so
//! nothing sent as content is ever part of a call. A call's argument fragments concatenate to
//! the same text as its `arguments` in [`ToolParser::parse`]'s result for the whole output
//! (JSON re-written as serde_json writes it: `json.rs`).
//!
//! | module | formats |
//! |--------|---------|
//! | `tagged.rs` | the formats whose calls follow a tag: `hermes`, `qwen3_xml`, `mistral`, `deepseek_v3` |
//! | `bare.rs` | the formats whose whole output is the calls: `llama3_json`, `openai`, forced tool choices |
//! | `pythonic.rs` | `pythonic` |
//! | `json.rs` | JSON read incrementally and re-written |

mod bare;
mod json;
mod pythonic;
mod tagged;

use serde_json::{Map, Value};

pub(crate) use bare::{named_stream, required_stream};

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
    /// A reader of one output as it is generated.
    fn stream(&self) -> Box<dyn ToolStream>;
}

/// What an incremental tool parser reports as an output's text arrives
/// ([`ToolStream::feed`]). Calls are numbered from 0 in the order they start; a call's events
/// come in the order `Start`, `Arguments`..., `End`, and a call ends before the next starts.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolStreamEvent {
    /// Text that is not part of any call (the message's content).
    Content(String),
    /// Call `index` starts: the function's name, complete.
    Start { index: usize, name: String },
    /// More of call `index`'s arguments (JSON text). A call's fragments concatenate to the
    /// `arguments` [`ToolParser::parse`] gives that call.
    Arguments { index: usize, fragment: String },
    /// Call `index` is complete.
    End { index: usize },
}

/// One output's tool calls, read as the text is generated: feed each text delta, then
/// `finish` once when the output ends (it closes any call still open).
pub trait ToolStream: Send {
    /// Reads the next piece of text; returns what it decided.
    fn feed(&mut self, delta: &str) -> Vec<ToolStreamEvent>;
    /// The output ended: what was held is decided.
    fn finish(&mut self) -> Vec<ToolStreamEvent>;
}

/// What a format's reader of calls says after a character.
#[derive(Debug, PartialEq)]
enum Step {
    More,
    /// The calls are read (their closing tags included).
    Done,
    /// This is not a call: its text is content.
    NotCalls,
}

/// The calls after a format's tag (or a whole output), read a character at a time.
trait Body: Send {
    fn push(&mut self, c: char, ev: &mut Events) -> Step;
    /// The output ended inside the body: close what is open.
    fn finish(&mut self, ev: &mut Events);
}

/// Events being gathered: consecutive content, and consecutive fragments of one call, are
/// merged into one event.
#[derive(Debug, Default)]
struct Events {
    out: Vec<ToolStreamEvent>,
    /// Calls started so far.
    calls: usize,
    /// A call is started and not ended.
    open: bool,
}

impl Events {
    fn content(&mut self, s: &str) {
        if s.is_empty() {
            return;
        }
        match self.out.last_mut() {
            Some(ToolStreamEvent::Content(c)) => c.push_str(s),
            _ => self.out.push(ToolStreamEvent::Content(s.to_string())),
        }
    }

    fn start(&mut self, name: String) {
        self.end();
        self.out.push(ToolStreamEvent::Start { index: self.calls, name });
        self.calls += 1;
        self.open = true;
    }

    fn args(&mut self, s: &str) {
        if !self.open || s.is_empty() {
            return;
        }
        let index = self.calls - 1;
        match self.out.last_mut() {
            Some(ToolStreamEvent::Arguments { index: i, fragment }) if *i == index => fragment.push_str(s),
            _ => self.out.push(ToolStreamEvent::Arguments { index, fragment: s.to_string() }),
        }
    }

    fn end(&mut self) {
        if self.open {
            self.out.push(ToolStreamEvent::End { index: self.calls - 1 });
            self.open = false;
        }
    }

    /// What a JSON reader found.
    fn found(&mut self, found: &mut Vec<json::Found>) {
        for f in found.drain(..) {
            match f {
                json::Found::Name(n) => self.start(n),
                json::Found::Args(a) => self.args(&a),
                json::Found::End => self.end(),
            }
        }
    }

    fn take(&mut self) -> Vec<ToolStreamEvent> {
        std::mem::take(&mut self.out)
    }
}

/// Builds a parser.
type BuildParser = fn() -> Box<dyn ToolParser>;

/// The parsers' registry: each row the names `--tool-call-parser` takes for it (vLLM's
/// names and aliases) and how it is built. `--help`, the flag's check and [`parser`] read it.
const PARSERS: &[(&[&str], BuildParser)] = &[
    (&["hermes"], || Box::new(tagged::Hermes)),
    (&["llama3_json", "llama4_json"], || Box::new(bare::Llama3Json)),
    (&["mistral"], || Box::new(tagged::Mistral)),
    (&["pythonic", "llama4_pythonic"], || Box::new(pythonic::Pythonic)),
    (&["qwen3_xml", "qwen3_coder"], || Box::new(tagged::Qwen3Xml)),
    (&["deepseek_v3", "deepseek_v31"], || Box::new(tagged::DeepSeekV3)),
    (&["openai"], || Box::new(bare::OpenAiJson)),
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

#[cfg(test)]
mod tests;
