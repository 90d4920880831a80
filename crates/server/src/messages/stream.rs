//! A streamed message: server-sent events, each with its `event:` line: `message_start` (the
//! message without content, its prompt's token count), `ping`, per block
//! `content_block_start`, `content_block_delta`s (`text_delta`, `input_json_delta`,
//! `thinking_delta`, then `signature_delta`) and `content_block_stop`, then `message_delta`
//! (stop reason, output tokens) and `message_stop`. An engine error ends the stream with an
//! `error` event in Anthropic's shape.

use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::Value;
use tokio_stream::wrappers::ReceiverStream;
use vllm_engine::OutputStream;

use super::protocol::{DeltaUsage, MessageDelta, MessagesUsage, StreamEvent};
use super::render::{message, stop_reason, Blocks};
use crate::error::{AnthropicError, ApiError};
use crate::pieces::Pieces;
use crate::render::Render;

/// Sends one event; false once the client has gone.
async fn send(tx: &tokio::sync::mpsc::Sender<SseEvent>, event: StreamEvent) -> bool {
    let v = serde_json::to_value(event).unwrap_or(Value::Null);
    let name = v.get("type").and_then(Value::as_str).unwrap_or("error").to_string();
    tx.send(SseEvent::default().event(name).data(v.to_string())).await.is_ok()
}

/// Streams one request's output as Messages events. The task ends when the client goes away
/// (the event channel closes), dropping the engine stream, which aborts the request.
pub(crate) fn sse(
    id: String,
    model: String,
    render: Render,
    mut streams: Vec<OutputStream>,
    prompt: usize,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<SseEvent>(64);
    let Some(mut stream) = streams.pop() else {
        return AnthropicError(ApiError::internal("no stream")).into_response();
    };
    tokio::spawn(async move {
        let start = message(&id, &model, MessagesUsage::new(prompt, 0, 0));
        if !send(&tx, StreamEvent::MessageStart { message: Box::new(start) }).await
            || !send(&tx, StreamEvent::Ping).await
        {
            return;
        }
        let mut pieces = Pieces::new(&render);
        let mut blocks = Blocks::new(true);
        let (mut generated, mut end) = (0usize, (None, None));
        while let Some(res) = stream.recv().await {
            let o = match res {
                Ok(o) => o,
                Err(e) => {
                    let error = AnthropicError(ApiError::from(e)).response().error;
                    let _ = send(&tx, StreamEvent::Error { error }).await;
                    return;
                }
            };
            for c in &o.outputs {
                generated += c.token_ids.len();
                for piece in pieces.feed(&c.text) {
                    blocks.piece(piece);
                }
                if c.finished() {
                    for piece in pieces.finish() {
                        blocks.piece(piece);
                    }
                    blocks.close();
                    end = (c.finish_reason, c.stop_reason.clone());
                }
            }
            for event in blocks.events() {
                if !send(&tx, event).await {
                    return;
                }
            }
        }
        let (stop_reason, stop_sequence) = stop_reason(end.0, end.1.as_ref(), blocks.used_tools());
        let delta = MessageDelta { stop_reason, stop_sequence };
        let _ = send(&tx, StreamEvent::MessageDelta { delta, usage: DeltaUsage { output_tokens: generated } }).await
            && send(&tx, StreamEvent::MessageStop).await;
    });
    Sse::new(ReceiverStream::new(rx).map(Ok::<_, std::convert::Infallible>)).into_response()
}
