//! A chat output as typed pieces (reasoning, text, tool calls), fed its text as it streams:
//! the one seam the Responses and Messages renderers read, streamed or not (a whole output is
//! fed at once, then finished), so both protocols split outputs exactly as chat does.
//!
//! What a piece of text is follows the chat request's [`Render`]: `--reasoning-parser`'s split
//! first, then the tool mode's (`Tools`). Streamed, the tool mode's incremental reader
//! (`Tools::stream`, the one chat's stream uses) gives text as soon as it cannot be a call, a
//! [`Piece::CallStart`] once a call's name is complete and a [`Piece::CallArgs`] per argument
//! fragment as generated. A whole output is read as chat's non-streamed response reads it.

use crate::reasoning::Splitter;
use crate::render::{Render, Tools};
use crate::tools::{ToolStream, ToolStreamEvent};

/// One piece of an output, in the order generated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Piece {
    /// Thinking (with `--reasoning-parser`, when it is returned).
    Reasoning(String),
    /// Answer text.
    Text(String),
    /// Tool call `index` (its position among the output's calls) begins.
    CallStart { index: usize, name: String },
    /// More of call `index`'s arguments (JSON text; the fragments concatenate to an object).
    CallArgs { index: usize, delta: String },
}

/// One output's split, fed as it streams.
pub(crate) struct Pieces {
    tools: Tools,
    /// The tool mode's incremental reader (streaming; `None` without tools or for a whole
    /// output).
    stream: Option<Box<dyn ToolStream>>,
    reasoning: Option<Splitter>,
    include_reasoning: bool,
    /// A whole output's answer text, read at the end as chat's non-streamed response reads it.
    held: String,
    /// Whole-output mode ([`Pieces::split_all`]).
    whole: bool,
    /// Calls given so far.
    calls: usize,
    /// Whitespace the tool reader gave as text, held until text follows (before a call, or
    /// at the end of an output with calls, it is not part of the answer).
    pending_ws: String,
}

impl Pieces {
    /// A split for one streamed output of a chat request rendered by `render`.
    pub(crate) fn new(render: &Render) -> Self {
        Self {
            tools: render.tools.clone(),
            stream: render.tools.stream(),
            reasoning: render.reasoning.clone(),
            include_reasoning: render.include_reasoning,
            held: String::new(),
            whole: false,
            calls: 0,
            pending_ws: String::new(),
        }
    }

    /// A whole output, split at once: its calls read as chat's non-streamed response reads
    /// them (streaming gives the same calls, argument fragments concatenated).
    pub(crate) fn split_all(render: &Render, text: &str) -> Vec<Piece> {
        let mut p = Self { stream: None, whole: true, ..Self::new(render) };
        let mut out = p.feed(text);
        out.extend(p.finish());
        out
    }

    /// The next text of the output; what it could still turn out to be is held back.
    pub(crate) fn feed(&mut self, delta: &str) -> Vec<Piece> {
        let mut out = Vec::new();
        let content = match self.reasoning.as_mut() {
            Some(sp) => {
                let split = sp.feed(delta);
                if self.include_reasoning && !split.reasoning.is_empty() {
                    out.push(Piece::Reasoning(split.reasoning));
                }
                split.content
            }
            None => delta.to_string(),
        };
        self.content(content, &mut out);
        out
    }

    /// The output ended: what was held goes out, the calls among it read.
    pub(crate) fn finish(&mut self) -> Vec<Piece> {
        let mut out = Vec::new();
        if let Some(sp) = self.reasoning.as_mut() {
            let rest = sp.finish();
            if self.include_reasoning && !rest.reasoning.is_empty() {
                out.push(Piece::Reasoning(rest.reasoning));
            }
            self.content(rest.content, &mut out);
        }
        if let Some(stream) = self.stream.as_mut() {
            let events = stream.finish();
            self.events(events, &mut out);
        }
        let ws = std::mem::take(&mut self.pending_ws);
        if self.calls == 0 && !ws.is_empty() {
            out.push(Piece::Text(ws));
        }
        let held = std::mem::take(&mut self.held);
        if self.whole && !held.is_empty() {
            self.calls(&held, &mut out);
        }
        out
    }

    /// Answer text: given at once without tools; with them, through the tool mode's reader
    /// (streaming) or held whole.
    fn content(&mut self, text: String, out: &mut Vec<Piece>) {
        if self.whole && !matches!(self.tools, Tools::Off) {
            self.held.push_str(&text);
            return;
        }
        match self.stream.as_mut() {
            Some(stream) => {
                let events = stream.feed(&text);
                self.events(events, out);
            }
            None if !text.is_empty() => out.push(Piece::Text(text)),
            None => {}
        }
    }

    /// A tool reader's events as pieces (a call's end is implied by what follows).
    fn events(&mut self, events: Vec<ToolStreamEvent>, out: &mut Vec<Piece>) {
        for e in events {
            match e {
                ToolStreamEvent::Content(t) if t.trim().is_empty() => self.pending_ws.push_str(&t),
                ToolStreamEvent::Content(t) => {
                    let ws = std::mem::take(&mut self.pending_ws);
                    out.push(Piece::Text(ws + &t));
                }
                ToolStreamEvent::End { .. } => {}
                ToolStreamEvent::Start { index, name } => {
                    self.pending_ws.clear();
                    self.calls += 1;
                    out.push(Piece::CallStart { index, name });
                }
                ToolStreamEvent::Arguments { index, fragment } => out.push(Piece::CallArgs { index, delta: fragment }),
            }
        }
    }

    /// A whole output's held text read as chat's non-streamed response reads it: each call as
    /// its name and all of its arguments (text outside the calls, or an output the mode could
    /// not read as calls, as text).
    fn calls(&mut self, held: &str, out: &mut Vec<Piece>) {
        let (content, calls) = self.tools.split(held, "");
        if let Some(c) = content.filter(|c| !c.trim().is_empty()) {
            out.push(Piece::Text(c));
        }
        for call in calls {
            let index = self.calls;
            self.calls += 1;
            out.push(Piece::CallStart { index, name: call.function.name });
            out.push(Piece::CallArgs { index, delta: call.function.arguments });
        }
    }
}

/// The stream events a protocol's renderer announces its pieces with: kept only when the
/// response streams, handed out by [`Events::take`].
pub(crate) struct Events<E> {
    stream: bool,
    pending: Vec<E>,
}

impl<E> Events<E> {
    pub(crate) fn new(stream: bool) -> Self {
        Self { stream, pending: Vec::new() }
    }

    /// Records the event `event` makes, when streaming (a whole response makes none).
    pub(crate) fn emit(&mut self, event: impl FnOnce() -> E) {
        if self.stream {
            self.pending.push(event());
        }
    }

    /// The events since the last call.
    pub(crate) fn take(&mut self) -> Vec<E> {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::Api;

    fn render(tools: Tools) -> Render {
        Render {
            api: Api::Chat,
            echo: vec![String::new()],
            n: 1,
            top_logprobs: None,
            tools,
            reasoning: crate::reasoning::parser("qwen3")
                .map(|p| Splitter::new(&p, crate::reasoning::PromptState::Unsaid)),
            include_reasoning: true,
            token_ids_as_tokens: false,
            token_ids: false,
        }
    }

    /// Streamed a character at a time, the pieces (merged by kind) are those of the whole text.
    fn both(r: &Render, text: &str) -> Vec<Piece> {
        let whole = merge(Pieces::split_all(r, text));
        let mut p = Pieces::new(r);
        let mut streamed = Vec::new();
        for ch in text.chars() {
            streamed.extend(p.feed(&ch.to_string()));
        }
        streamed.extend(p.finish());
        assert_eq!(merge(streamed), whole, "streamed and whole differ on {text:?}");
        whole
    }

    fn merge(pieces: Vec<Piece>) -> Vec<Piece> {
        let mut out: Vec<Piece> = Vec::new();
        for p in pieces {
            match (out.last_mut(), p) {
                (Some(Piece::Text(a)), Piece::Text(b)) | (Some(Piece::Reasoning(a)), Piece::Reasoning(b)) => {
                    a.push_str(&b)
                }
                (Some(Piece::CallArgs { index: i, delta: a }), Piece::CallArgs { index: j, delta: b }) if *i == j => {
                    a.push_str(&b)
                }
                (_, p) => out.push(p),
            }
        }
        out
    }

    #[test]
    fn plain_text_and_reasoning() {
        let r = render(Tools::Off);
        assert_eq!(
            both(&r, "<think>hm</think>Hello"),
            vec![Piece::Reasoning("hm".into()), Piece::Text("Hello".into())]
        );
        assert_eq!(both(&r, "Hi"), vec![Piece::Text("Hi".into())]);
    }

    #[test]
    fn parsed_calls_after_streamed_text() {
        let r = render(Tools::Parse(crate::tools::parser("hermes").unwrap().into()));
        let text = "Let me look.<tool_call>{\"name\": \"f\", \"arguments\": {\"a\": 1}}</tool_call>";
        assert_eq!(
            both(&r, text),
            vec![
                Piece::Text("Let me look.".into()),
                Piece::CallStart { index: 0, name: "f".into() },
                Piece::CallArgs { index: 0, delta: "{\"a\":1}".into() },
            ]
        );
    }

    #[test]
    fn whitespace_before_a_call_is_not_text() {
        let r = render(Tools::Parse(crate::tools::parser("hermes").unwrap().into()));
        let text = "\n\n<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>";
        assert_eq!(both(&r, text)[0], Piece::CallStart { index: 0, name: "f".into() });
        assert_eq!(both(&r, "Hi\n\nthere"), vec![Piece::Text("Hi\n\nthere".into())]);
        assert_eq!(both(&r, &format!("Hi\n\n{text}"))[0], Piece::Text("Hi".into()));
    }

    #[test]
    fn forced_calls() {
        let r = render(Tools::Named("f".into()));
        assert_eq!(
            both(&r, "{\"x\": 2}"),
            vec![
                Piece::CallStart { index: 0, name: "f".into() },
                Piece::CallArgs { index: 0, delta: "{\"x\":2}".into() }
            ]
        );
        let r = render(Tools::Required);
        let pieces = both(&r, "[{\"name\": \"f\", \"parameters\": {}}, {\"name\": \"g\", \"parameters\": {\"y\": 1}}]");
        assert_eq!(pieces.len(), 4);
        assert_eq!(pieces[2], Piece::CallStart { index: 1, name: "g".into() });
        // Cut short (max_tokens): whole, the text is given as text; streamed, what was
        // generated of the call has gone out (as vLLM streams it).
        let r = render(Tools::Named("f".into()));
        assert_eq!(Pieces::split_all(&r, "{\"x\": "), vec![Piece::Text("{\"x\": ".into())]);
        let mut p = Pieces::new(&r);
        let mut streamed = p.feed("{\"x\": ");
        streamed.extend(p.finish());
        assert_eq!(streamed[0], Piece::CallStart { index: 0, name: "f".into() });
    }
}
