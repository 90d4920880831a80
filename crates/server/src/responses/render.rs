//! Outputs as Responses output items: one builder, fed an output's [`Piece`]s, makes the items
//! and (when streaming) the events that announce them, so a streamed response and a whole one
//! hold the same items.

use serde_json::{json, Value};
use vllm_engine::{FinishReason, RequestOutput};

use super::protocol::{
    ContentPart, Event, IncompleteDetails, OutputItem, ResponseError, ResponseObject, ResponseUsage, ResponsesRequest,
};
use crate::pieces::{Piece, Pieces};
use crate::render::Render;
use crate::state::random_id;

/// What a response repeats of its request: everything but its status, output and usage.
#[derive(Debug, Clone, Default)]
pub(crate) struct Echo {
    pub id: String,
    pub created_at: u64,
    pub model: String,
    pub instructions: Option<String>,
    pub metadata: Option<Value>,
    pub parallel_tool_calls: bool,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub tool_choice: Value,
    pub tools: Vec<Value>,
    pub max_output_tokens: Option<usize>,
    pub previous_response_id: Option<String>,
    pub reasoning: Option<Value>,
    pub text: Value,
    pub background: bool,
    pub store: bool,
}

impl Echo {
    pub(crate) fn new(id: String, model: String, req: &ResponsesRequest, store: bool) -> Self {
        Self {
            id,
            created_at: crate::state::now(),
            model,
            instructions: req.instructions.clone(),
            metadata: req.metadata.clone(),
            parallel_tool_calls: req.parallel_tool_calls.unwrap_or(true),
            temperature: req.sampling.temperature,
            top_p: req.sampling.top_p,
            tool_choice: req.tool_choice.clone().filter(|c| !c.is_null()).unwrap_or(json!("auto")),
            tools: req.tools.clone().unwrap_or_default(),
            max_output_tokens: req.max_output_tokens,
            previous_response_id: req.previous_response_id.clone(),
            reasoning: req.reasoning.clone(),
            text: req.text.clone().filter(|t| !t.is_null()).unwrap_or(json!({"format": {"type": "text"}})),
            background: req.background == Some(true),
            store,
        }
    }

    /// The response in `status` with `output`.
    pub(crate) fn response(
        &self,
        status: &str,
        output: Vec<OutputItem>,
        usage: Option<ResponseUsage>,
    ) -> ResponseObject {
        let e = self.clone();
        ResponseObject {
            id: e.id,
            object: "response".into(),
            created_at: e.created_at,
            status: status.into(),
            model: e.model,
            output,
            usage,
            error: None,
            incomplete_details: (status == "incomplete")
                .then(|| IncompleteDetails { reason: "max_output_tokens".into() }),
            instructions: e.instructions,
            metadata: e.metadata,
            parallel_tool_calls: e.parallel_tool_calls,
            temperature: e.temperature,
            top_p: e.top_p,
            tool_choice: e.tool_choice,
            tools: e.tools,
            max_output_tokens: e.max_output_tokens,
            previous_response_id: e.previous_response_id,
            reasoning: e.reasoning,
            text: e.text,
            truncation: "disabled".into(),
            background: e.background,
            store: e.store,
            service_tier: "default".into(),
            top_logprobs: 0,
        }
    }

    /// A background response whose run failed.
    pub(crate) fn failed(&self, message: String) -> ResponseObject {
        ResponseObject {
            error: Some(ResponseError { code: "server_error".into(), message }),
            ..self.response("failed", Vec::new(), None)
        }
    }
}

/// The item being built.
enum Open {
    Message { id: String, text: String },
    Reasoning { id: String, text: String },
    Call { id: String, call_id: String, name: String, index: usize, args: String },
}

/// Builds the output items from pieces, and with `stream` the events announcing them.
pub(crate) struct Builder {
    items: Vec<OutputItem>,
    open: Option<Open>,
    events: crate::pieces::Events<Event>,
}

impl Builder {
    pub(crate) fn new(stream: bool) -> Self {
        Self { items: Vec::new(), open: None, events: crate::pieces::Events::new(stream) }
    }

    fn emit(&mut self, event: impl FnOnce() -> Event) {
        self.events.emit(event)
    }

    /// The events since the last call.
    pub(crate) fn events(&mut self) -> Vec<Event> {
        self.events.take()
    }

    /// Finishes the item being built and opens `open`, announcing `item` (and its content
    /// part, for items with content).
    fn start(&mut self, open: Open, item: OutputItem, part: Option<ContentPart>) {
        self.close();
        let output_index = self.items.len();
        let item_id = match &open {
            Open::Message { id, .. } | Open::Reasoning { id, .. } | Open::Call { id, .. } => id.clone(),
        };
        self.emit(|| Event::ItemAdded { output_index, item });
        if let Some(part) = part {
            self.emit(|| Event::PartAdded { item_id, output_index, content_index: 0, part });
        }
        self.open = Some(open);
    }

    /// The next piece of the output.
    pub(crate) fn piece(&mut self, piece: Piece) {
        match piece {
            Piece::Text(delta) => {
                if !matches!(self.open, Some(Open::Message { .. })) {
                    let id = random_id("msg");
                    let item = OutputItem::Message {
                        id: id.clone(),
                        role: "assistant".into(),
                        status: "in_progress".into(),
                        content: Vec::new(),
                    };
                    let part = ContentPart::output_text(String::new());
                    self.start(Open::Message { id, text: String::new() }, item, Some(part));
                }
                let output_index = self.items.len();
                let Some(Open::Message { id, text }) = self.open.as_mut() else { return };
                text.push_str(&delta);
                let item_id = id.clone();
                self.emit(|| Event::TextDelta { item_id, output_index, content_index: 0, delta, logprobs: Vec::new() });
            }
            Piece::Reasoning(delta) => {
                if !matches!(self.open, Some(Open::Reasoning { .. })) {
                    let id = random_id("rs");
                    let item = OutputItem::Reasoning {
                        id: id.clone(),
                        summary: Vec::new(),
                        content: Vec::new(),
                        status: "in_progress".into(),
                    };
                    let part = ContentPart::ReasoningText { text: String::new() };
                    self.start(Open::Reasoning { id, text: String::new() }, item, Some(part));
                }
                let output_index = self.items.len();
                let Some(Open::Reasoning { id, text }) = self.open.as_mut() else { return };
                text.push_str(&delta);
                let item_id = id.clone();
                self.emit(|| Event::ReasoningDelta { item_id, output_index, content_index: 0, delta });
            }
            Piece::CallStart { index, name } => {
                let (id, call_id) = (random_id("fc"), random_id("call"));
                let item = OutputItem::FunctionCall {
                    id: id.clone(),
                    call_id: call_id.clone(),
                    name: name.clone(),
                    arguments: String::new(),
                    status: "in_progress".into(),
                };
                self.start(Open::Call { id, call_id, name, index, args: String::new() }, item, None);
            }
            Piece::CallArgs { index, delta } => {
                let output_index = self.items.len();
                let Some(Open::Call { id, index: open, args, .. }) = self.open.as_mut() else { return };
                if *open != index {
                    return;
                }
                args.push_str(&delta);
                let item_id = id.clone();
                self.emit(|| Event::ArgumentsDelta { item_id, output_index, delta });
            }
        }
    }

    /// Finishes the item being built.
    pub(crate) fn close(&mut self) {
        let output_index = self.items.len();
        let item = match self.open.take() {
            None => return,
            Some(Open::Message { id, text }) => {
                let (item_id, done) = (id.clone(), text.clone());
                self.emit(|| Event::TextDone {
                    item_id,
                    output_index,
                    content_index: 0,
                    text: done,
                    logprobs: Vec::new(),
                });
                let part = ContentPart::output_text(text);
                let (item_id, p) = (id.clone(), part.clone());
                self.emit(|| Event::PartDone { item_id, output_index, content_index: 0, part: p });
                OutputItem::Message { id, role: "assistant".into(), status: "completed".into(), content: vec![part] }
            }
            Some(Open::Reasoning { id, text }) => {
                let (item_id, done) = (id.clone(), text.clone());
                self.emit(|| Event::ReasoningDone { item_id, output_index, content_index: 0, text: done });
                let part = ContentPart::ReasoningText { text };
                let (item_id, p) = (id.clone(), part.clone());
                self.emit(|| Event::PartDone { item_id, output_index, content_index: 0, part: p });
                OutputItem::Reasoning { id, summary: Vec::new(), content: vec![part], status: "completed".into() }
            }
            Some(Open::Call { id, call_id, name, args, .. }) => {
                let (item_id, n, a) = (id.clone(), name.clone(), args.clone());
                self.emit(|| Event::ArgumentsDone { item_id, output_index, name: n, arguments: a });
                OutputItem::FunctionCall { id, call_id, name, arguments: args, status: "completed".into() }
            }
        };
        let done = item.clone();
        self.emit(|| Event::ItemDone { output_index, item: done });
        self.items.push(item);
    }

    /// The finished items.
    pub(crate) fn finish(mut self) -> Vec<OutputItem> {
        self.close();
        self.items
    }
}

/// The status an output's finish gives its response.
pub(crate) fn status(finish: Option<FinishReason>) -> &'static str {
    match finish {
        Some(FinishReason::Length) => "incomplete",
        _ => "completed",
    }
}

/// The usage of one request's output.
pub(crate) fn usage(o: &RequestOutput) -> ResponseUsage {
    let output = o.outputs.iter().map(|c| c.token_ids.len()).sum();
    ResponseUsage::new(o.prompt_token_ids.len(), output, o.num_cached_tokens)
}

/// A whole (not streamed) output as its response.
pub(crate) fn whole(echo: &Echo, render: &Render, o: &RequestOutput) -> ResponseObject {
    let Some(c) = o.outputs.first() else {
        return echo.response("completed", Vec::new(), Some(usage(o)));
    };
    let mut b = Builder::new(false);
    for piece in Pieces::split_all(render, &c.text) {
        b.piece(piece);
    }
    echo.response(status(c.finish_reason), b.finish(), Some(usage(o)))
}

/// The assistant message a continuation (`previous_response_id`) sees for `output`: its text
/// and its calls.
pub(crate) fn assistant_message(output: &[OutputItem]) -> Value {
    let mut text = String::new();
    let mut calls = Vec::new();
    for item in output {
        match item {
            OutputItem::Message { content, .. } => {
                for p in content {
                    if let ContentPart::OutputText { text: t, .. } = p {
                        text.push_str(t);
                    }
                }
            }
            OutputItem::FunctionCall { call_id, name, arguments, .. } => {
                calls.push((call_id.clone(), name.clone(), arguments.clone()))
            }
            OutputItem::Reasoning { .. } => {}
        }
    }
    super::convert::output_message(&text, &calls)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces() -> Vec<Piece> {
        vec![
            Piece::Reasoning("a".into()),
            Piece::Reasoning("b".into()),
            Piece::Text("Hi".into()),
            Piece::CallStart { index: 0, name: "f".into() },
            Piece::CallArgs { index: 0, delta: "{\"x\":".into() },
            Piece::CallArgs { index: 0, delta: "1}".into() },
        ]
    }

    #[test]
    fn items_and_the_events_announcing_them() {
        let mut b = Builder::new(true);
        for p in pieces() {
            b.piece(p);
        }
        b.close();
        let events: Vec<Value> = b.events().into_iter().map(|e| serde_json::to_value(e).unwrap()).collect();
        let names: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        let item = ["response.output_item.added", "response.content_part.added"];
        let done = ["response.content_part.done", "response.output_item.done"];
        let mut want = item.to_vec();
        want.extend(["response.reasoning_text.delta", "response.reasoning_text.delta", "response.reasoning_text.done"]);
        want.extend(done);
        want.extend(item);
        want.extend(["response.output_text.delta", "response.output_text.done"]);
        want.extend(done);
        want.extend(["response.output_item.added", "response.function_call_arguments.delta"]);
        want.extend(["response.function_call_arguments.delta", "response.function_call_arguments.done"]);
        want.push("response.output_item.done");
        assert_eq!(names, want);
        let indexes: Vec<u64> = events.iter().map(|e| e["output_index"].as_u64().unwrap()).collect();
        assert_eq!(indexes, [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2]);
        assert_eq!(events[16]["arguments"], "{\"x\":1}");

        // Not streamed: the same items, no events.
        let mut whole = Builder::new(false);
        for p in pieces() {
            whole.piece(p);
        }
        assert!(whole.events().is_empty());
        let items = serde_json::to_value(whole.finish()).unwrap();
        assert_eq!(items[0]["content"][0], serde_json::json!({"type": "reasoning_text", "text": "ab"}));
        assert_eq!(items[1]["content"][0]["text"], "Hi");
        assert_eq!((&items[2]["name"], &items[2]["arguments"]), (&json!("f"), &json!("{\"x\":1}")));
        let msg = assistant_message(&whole_items());
        assert_eq!(msg["content"], "Hi");
        assert_eq!(msg["tool_calls"][0]["function"]["arguments"], "{\"x\":1}");
    }

    fn whole_items() -> Vec<OutputItem> {
        let mut b = Builder::new(false);
        for p in pieces() {
            b.piece(p);
        }
        b.finish()
    }
}
