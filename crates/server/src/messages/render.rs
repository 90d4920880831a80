//! Outputs as the assistant's content blocks: one builder, fed an output's [`Piece`]s, makes
//! the blocks and (when streaming) the `content_block_*` events announcing them; the stop
//! reason from how the output ended.

use serde_json::{json, Value};
use vllm_engine::{CompletionOutput, FinishReason, RequestOutput, StopReason};

use super::protocol::{BlockDelta, ContentBlock, MessagesResponse, MessagesUsage, StreamEvent};
use crate::pieces::{Piece, Pieces};
use crate::render::Render;
use crate::state::random_id;

/// The block being built.
enum Open {
    Text { text: String },
    Thinking { text: String },
    ToolUse { id: String, name: String, index: usize, args: String },
}

/// Builds content blocks from pieces, and with `stream` the events announcing them.
pub(crate) struct Blocks {
    blocks: Vec<ContentBlock>,
    open: Option<Open>,
    events: crate::pieces::Events<StreamEvent>,
}

impl Blocks {
    pub(crate) fn new(stream: bool) -> Self {
        Self { blocks: Vec::new(), open: None, events: crate::pieces::Events::new(stream) }
    }

    fn emit(&mut self, event: impl FnOnce() -> StreamEvent) {
        self.events.emit(event)
    }

    /// The events since the last call.
    pub(crate) fn events(&mut self) -> Vec<StreamEvent> {
        self.events.take()
    }

    /// Whether a `tool_use` block was made.
    pub(crate) fn used_tools(&self) -> bool {
        matches!(self.open, Some(Open::ToolUse { .. }))
            || self.blocks.iter().any(|b| matches!(b, ContentBlock::ToolUse { .. }))
    }

    /// Opens a block (closing the one before) unless one of the same kind is open.
    fn open(&mut self, same: fn(&Open) -> bool, block: ContentBlock, open: Open) {
        if self.open.as_ref().is_some_and(same) {
            return;
        }
        self.close();
        let index = self.blocks.len();
        self.emit(|| StreamEvent::ContentBlockStart { index, content_block: block });
        self.open = Some(open);
    }

    /// The next piece of the output.
    pub(crate) fn piece(&mut self, piece: Piece) {
        let delta = match piece {
            Piece::Text(t) => {
                let block = ContentBlock::Text { text: String::new() };
                self.open(|o| matches!(o, Open::Text { .. }), block, Open::Text { text: String::new() });
                let Some(Open::Text { text }) = self.open.as_mut() else { return };
                text.push_str(&t);
                BlockDelta::Text { text: t }
            }
            Piece::Reasoning(t) => {
                let block = ContentBlock::Thinking { thinking: String::new(), signature: String::new() };
                self.open(|o| matches!(o, Open::Thinking { .. }), block, Open::Thinking { text: String::new() });
                let Some(Open::Thinking { text }) = self.open.as_mut() else { return };
                text.push_str(&t);
                BlockDelta::Thinking { thinking: t }
            }
            Piece::CallStart { index: call, name } => {
                self.close();
                let id = random_id("toolu");
                let block = ContentBlock::ToolUse { id: id.clone(), name: name.clone(), input: json!({}) };
                self.open(|_| false, block, Open::ToolUse { id, name, index: call, args: String::new() });
                return;
            }
            Piece::CallArgs { index: call, delta } => {
                let Some(Open::ToolUse { index: open, args, .. }) = self.open.as_mut() else { return };
                if *open != call {
                    return;
                }
                args.push_str(&delta);
                BlockDelta::InputJson { partial_json: delta }
            }
        };
        // The open block's index (blocks before it are finished).
        let index = self.blocks.len();
        self.emit(|| StreamEvent::ContentBlockDelta { index, delta });
    }

    /// Finishes the block being built (a thinking block gets its signature first).
    pub(crate) fn close(&mut self) {
        let index = self.blocks.len();
        let block = match self.open.take() {
            None => return,
            Some(Open::Text { text }) => ContentBlock::Text { text },
            Some(Open::Thinking { text }) => {
                let signature = random_id("sig");
                let s = signature.clone();
                self.emit(|| StreamEvent::ContentBlockDelta { index, delta: BlockDelta::Signature { signature: s } });
                ContentBlock::Thinking { thinking: text, signature }
            }
            Some(Open::ToolUse { id, name, args, .. }) => {
                // The arguments are the object the tool mode read (forced choices are
                // constrained to their schema).
                let input = serde_json::from_str::<Value>(&args).ok().filter(Value::is_object).unwrap_or(json!({}));
                ContentBlock::ToolUse { id, name, input }
            }
        };
        self.emit(|| StreamEvent::ContentBlockStop { index });
        self.blocks.push(block);
    }

    /// The finished blocks.
    pub(crate) fn finish(mut self) -> Vec<ContentBlock> {
        self.close();
        self.blocks
    }
}

/// Anthropic's `stop_reason` and `stop_sequence` for how an output ended: `max_tokens` when
/// cut short, `tool_use` when it called a tool, `stop_sequence` when a stop sequence ended
/// it, else `end_turn`.
pub(crate) fn stop_reason(
    finish: Option<FinishReason>,
    stop: Option<&StopReason>,
    used_tools: bool,
) -> (Option<String>, Option<String>) {
    let (reason, sequence) = match (finish, stop) {
        (Some(FinishReason::Length), _) => ("max_tokens", None),
        _ if used_tools => ("tool_use", None),
        (_, Some(StopReason::Text(s))) => ("stop_sequence", Some(s.clone())),
        _ => ("end_turn", None),
    };
    (Some(reason.to_string()), sequence)
}

/// The message's skeleton (`message_start`'s, and the whole message's before its content).
pub(crate) fn message(id: &str, model: &str, usage: MessagesUsage) -> MessagesResponse {
    MessagesResponse {
        id: id.to_string(),
        kind: "message".into(),
        role: "assistant".into(),
        content: Vec::new(),
        model: model.to_string(),
        stop_reason: None,
        stop_sequence: None,
        usage,
    }
}

/// A whole (not streamed) output as the assistant's message.
pub(crate) fn whole(id: &str, model: &str, render: &Render, o: &RequestOutput) -> MessagesResponse {
    let empty = CompletionOutput {
        index: 0,
        text: String::new(),
        token_ids: Vec::new(),
        finish_reason: None,
        stop_reason: None,
        cumulative_logprob: None,
        logprobs: None,
    };
    let c = o.outputs.first().unwrap_or(&empty);
    let mut blocks = Blocks::new(false);
    for piece in Pieces::split_all(render, &c.text) {
        blocks.piece(piece);
    }
    let used_tools = blocks.used_tools();
    let mut content = blocks.finish();
    if content.is_empty() {
        // Anthropic's shape of an empty answer: one empty text block.
        content.push(ContentBlock::Text { text: String::new() });
    }
    let (stop_reason, stop_sequence) = stop_reason(c.finish_reason, c.stop_reason.as_ref(), used_tools);
    let usage = MessagesUsage::new(o.prompt_token_ids.len(), c.token_ids.len(), o.num_cached_tokens);
    MessagesResponse { content, stop_reason, stop_sequence, ..message(id, model, usage) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_and_the_events_announcing_them() {
        let mut b = Blocks::new(true);
        for p in [
            Piece::Reasoning("a".into()),
            Piece::Reasoning("b".into()),
            Piece::Text("Hi".into()),
            Piece::CallStart { index: 0, name: "f".into() },
            Piece::CallArgs { index: 0, delta: "{\"x\":".into() },
            Piece::CallArgs { index: 0, delta: "1}".into() },
        ] {
            b.piece(p);
        }
        b.close();
        let events: Vec<Value> = b.events().into_iter().map(|e| serde_json::to_value(e).unwrap()).collect();
        let kinds: Vec<String> = events
            .iter()
            .map(|e| match e["delta"]["type"].as_str() {
                Some(d) => format!("{}:{d}@{}", e["type"].as_str().unwrap(), e["index"]),
                None => format!("{}@{}", e["type"].as_str().unwrap(), e["index"]),
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "content_block_start@0",
                "content_block_delta:thinking_delta@0",
                "content_block_delta:thinking_delta@0",
                "content_block_delta:signature_delta@0",
                "content_block_stop@0",
                "content_block_start@1",
                "content_block_delta:text_delta@1",
                "content_block_stop@1",
                "content_block_start@2",
                "content_block_delta:input_json_delta@2",
                "content_block_delta:input_json_delta@2",
                "content_block_stop@2",
            ]
        );
        assert_eq!(
            events[8]["content_block"],
            json!({"type": "tool_use", "id": events[8]["content_block"]["id"], "name": "f", "input": {}})
        );
        assert!(b.used_tools());
        let blocks = serde_json::to_value(b.finish()).unwrap();
        assert_eq!(blocks[0]["thinking"], "ab");
        assert_eq!(blocks[0]["signature"], events[3]["delta"]["signature"]);
        assert_eq!(blocks[2]["input"], json!({"x": 1}));
    }

    #[test]
    fn stop_reasons() {
        let stop = StopReason::Text("END".into());
        assert_eq!(stop_reason(Some(FinishReason::Length), None, true).0.as_deref(), Some("max_tokens"));
        assert_eq!(stop_reason(Some(FinishReason::Stop), None, true).0.as_deref(), Some("tool_use"));
        assert_eq!(
            stop_reason(Some(FinishReason::Stop), Some(&stop), false),
            (Some("stop_sequence".into()), Some("END".into()))
        );
        assert_eq!(stop_reason(Some(FinishReason::Stop), None, false).0.as_deref(), Some("end_turn"));
    }
}
