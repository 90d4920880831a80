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
    pub(crate) fn response(&self, status: &str, output: Vec<OutputItem>, usage: Option<ResponseUsage>) -> ResponseObject {
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
    stream: bool,
    events: Vec<Event>,
}

impl Builder {
    pub(crate) fn new(stream: bool) -> Self {
        Self { items: Vec::new(), open: None, stream, events: Vec::new() }
    }

    fn emit(&mut self, event: impl FnOnce() -> Event) {
        if self.stream {
            self.events.push(event());
        }
    }

    /// The events since the last call.
    pub(crate) fn events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// The next piece of the output.
    pub(crate) fn piece(&mut self, piece: Piece) {
        let output_index = self.items.len();
        match piece {
            Piece::Text(delta) => {
                if !matches!(self.open, Some(Open::Message { .. })) {
                    self.close();
                    let id = random_id("msg");
                    let item = OutputItem::Message {
                        id: id.clone(),
                        role: "assistant".into(),
                        status: "in_progress".into(),
                        content: Vec::new(),
                    };
                    self.emit(|| Event::ItemAdded { output_index, item });
                    let item_id = id.clone();
                    let part = ContentPart::output_text(String::new());
                    self.emit(|| Event::PartAdded { item_id, output_index, content_index: 0, part });
                    self.open = Some(Open::Message { id, text: String::new() });
                }
                let Some(Open::Message { id, text }) = self.open.as_mut() else { return };
                text.push_str(&delta);
                let item_id = id.clone();
                self.emit(|| Event::TextDelta { item_id, output_index, content_index: 0, delta, logprobs: Vec::new() });
            }
            Piece::Reasoning(delta) => {
                if !matches!(self.open, Some(Open::Reasoning { .. })) {
                    self.close();
                    let id = random_id("rs");
                    let item = OutputItem::Reasoning {
                        id: id.clone(),
                        summary: Vec::new(),
                        content: Vec::new(),
                        status: "in_progress".into(),
                    };
                    self.emit(|| Event::ItemAdded { output_index, item });
                    let item_id = id.clone();
                    let part = ContentPart::ReasoningText { text: String::new() };
                    self.emit(|| Event::PartAdded { item_id, output_index, content_index: 0, part });
                    self.open = Some(Open::Reasoning { id, text: String::new() });
                }
                let Some(Open::Reasoning { id, text }) = self.open.as_mut() else { return };
                text.push_str(&delta);
                let item_id = id.clone();
                self.emit(|| Event::ReasoningDelta { item_id, output_index, content_index: 0, delta });
            }
            Piece::CallStart { index, name } => {
                self.close();
                let (id, call_id) = (random_id("fc"), random_id("call"));
                let item = OutputItem::FunctionCall {
                    id: id.clone(),
                    call_id: call_id.clone(),
                    name: name.clone(),
                    arguments: String::new(),
                    status: "in_progress".into(),
                };
                self.emit(|| Event::ItemAdded { output_index, item });
                self.open = Some(Open::Call { id, call_id, name, index, args: String::new() });
            }
            Piece::CallArgs { index, delta } => {
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
                self.emit(|| Event::TextDone { item_id, output_index, content_index: 0, text: done, logprobs: Vec::new() });
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
    let mut items = b.finish();
    // Whitespace around a parsed call is not an answer.
    if items.iter().any(|i| matches!(i, OutputItem::FunctionCall { .. })) {
        items.retain(|i| !matches!(i, OutputItem::Message { content, .. } if content.iter().all(blank)));
    }
    echo.response(status(c.finish_reason), items, Some(usage(o)))
}

fn blank(part: &ContentPart) -> bool {
    matches!(part, ContentPart::OutputText { text, .. } if text.trim().is_empty())
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
