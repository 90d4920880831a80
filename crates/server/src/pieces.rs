//! A chat output as typed pieces (reasoning, text, tool calls), fed its text as it streams:
//! the one seam the Responses and Messages renderers read, streamed or not (a whole output is
//! fed at once, then finished), so both protocols split outputs exactly as chat does.
//!
//! What a piece of text is follows the chat request's [`Render`]: `--reasoning-parser`'s split
//! first, then the tool mode's (`Tools`): plain text streams as it comes; with a parser, text
//! before the format's call tag streams and the rest is held; with a forced choice
//! (`required`, named) all of it is held. Held text is read once the output ends, and each call
//! is given as one [`Piece::CallStart`] and one [`Piece::CallArgs`] holding all its arguments.
//! Whitespace before a call is not text.
//!
//! Incremental tool-call arguments (issue #32, item 5) plug in at [`Pieces::calls`]: a parser
//! that reads calls as they are generated gives a `CallStart` once a call's name is known and a
//! `CallArgs` per argument fragment from [`Pieces::feed`]; the renderers already handle any
//! number of `CallArgs` per call.

use crate::reasoning::Splitter;
use crate::render::{partial_tail, Render, Tools};

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
    reasoning: Option<Splitter>,
    include_reasoning: bool,
    /// Text withheld while it may hold tool calls.
    held: String,
    /// The format's call tag was seen: everything from it on is held.
    in_call: bool,
    /// Calls given so far.
    calls: usize,
}

impl Pieces {
    /// A split for one output of a chat request rendered by `render`.
    pub(crate) fn new(render: &Render) -> Self {
        Self {
            tools: render.tools.clone(),
            reasoning: render.reasoning.clone(),
            include_reasoning: render.include_reasoning,
            held: String::new(),
            in_call: false,
            calls: 0,
        }
    }

    /// A whole output, split at once (the same pieces as streaming it would give).
    pub(crate) fn split_all(render: &Render, text: &str) -> Vec<Piece> {
        let mut p = Self::new(render);
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
        let held = std::mem::take(&mut self.held);
        if self.tools.buffers() && !held.is_empty() {
            self.calls(&held, &mut out);
        }
        out
    }

    /// Answer text: given at once without tools; with them, held from the call tag on (all of
    /// it, for formats without a tag and forced choices).
    fn content(&mut self, text: String, out: &mut Vec<Piece>) {
        if !self.tools.buffers() {
            if !text.is_empty() {
                out.push(Piece::Text(text));
            }
            return;
        }
        self.held.push_str(&text);
        let marker = match &self.tools {
            Tools::Parse(p) => p.start_marker(),
            _ => None,
        };
        if let (Some(m), false) = (marker, self.in_call) {
            let cut = match self.held.find(m) {
                Some(at) => {
                    self.in_call = true;
                    at
                }
                None => self.held.len() - partial_tail(&self.held, m),
            };
            // Trailing whitespace waits: before a call it is not part of the answer.
            let cut = self.held[..cut].trim_end().len();
            if cut > 0 {
                out.push(Piece::Text(self.held.drain(..cut).collect()));
            }
        }
    }

    /// The seam for incremental tool-call events: today the held text is read once it is
    /// complete, and each call goes out as its name and then all of its arguments in one
    /// fragment (text outside the calls, or an output the mode could not read as calls, as
    /// text).
    fn calls(&mut self, held: &str, out: &mut Vec<Piece>) {
        let (content, calls) = self.tools.split(held, "");
        if let Some(c) = content.filter(|c| !c.is_empty()) {
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
        // Cut short: the text is given as text, never a broken call.
        assert_eq!(
            both(&Render { ..render(Tools::Named("f".into())) }, "{\"x\": "),
            vec![Piece::Text("{\"x\": ".into())]
        );
    }
}
