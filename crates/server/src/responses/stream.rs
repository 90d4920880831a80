//! A streamed response: server-sent events, each with its `event:` line and a
//! `sequence_number` counting from 0: `response.created`, `response.in_progress`, then per
//! output item `response.output_item.added`, its content's events
//! (`response.content_part.added`, `response.output_text.delta` ... `.done`,
//! `response.function_call_arguments.delta` ... `.done`, `response.reasoning_text.*`),
//! `response.output_item.done`, and last `response.completed` (its status `incomplete` when cut
//! at `max_output_tokens`, as vLLM sends it). An engine error ends the stream with an `error`
//! event.

use std::sync::Arc;

use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::Value;
use tokio_stream::wrappers::ReceiverStream;
use vllm_engine::OutputStream;

use super::protocol::{Event, ResponseUsage, StreamEvent};
use super::render::{assistant_message, status, Builder, Echo};
use super::store::Stored;
use crate::error::ApiError;
use crate::pieces::Pieces;
use crate::render::Render;
use crate::state::{KeyScope, Shared};

/// Where a finished streamed response is stored: its key and its conversation so far.
pub(crate) struct StoreAs {
    pub owner: KeyScope,
    pub conversation: Vec<Value>,
}

/// Numbers and frames the events.
struct Sender {
    tx: tokio::sync::mpsc::Sender<SseEvent>,
    seq: u64,
}

impl Sender {
    /// Sends one event; false once the client has gone.
    async fn send(&mut self, event: Event) -> bool {
        let v = serde_json::to_value(StreamEvent { event, sequence_number: self.seq }).unwrap_or(Value::Null);
        self.seq += 1;
        let name = v.get("type").and_then(Value::as_str).unwrap_or("error").to_string();
        self.tx.send(SseEvent::default().event(name).data(v.to_string())).await.is_ok()
    }
}

/// Streams one request's output as Responses events. The task ends when the client goes away
/// (the event channel closes), dropping the engine stream, which aborts the request.
pub(crate) fn sse(
    s: Shared,
    echo: Echo,
    render: Render,
    mut streams: Vec<OutputStream>,
    store: Option<StoreAs>,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<SseEvent>(64);
    let Some(mut stream) = streams.pop() else { return ApiError::internal("no stream").into_response() };
    tokio::spawn(async move {
        let mut out = Sender { tx, seq: 0 };
        let start = Box::new(echo.response("in_progress", Vec::new(), None));
        if !out.send(Event::Created { response: start.clone() }).await
            || !out.send(Event::InProgress { response: start }).await
        {
            return;
        }
        let mut pieces = Pieces::new(&render);
        let mut builder = Builder::new(true);
        // Token counts: the output's summed over the deltas; the prompt's (and its cached
        // part) from the last output, which carries them.
        let (mut finish, mut generated, mut prompt, mut cached) = (None, 0, 0, 0);
        while let Some(res) = stream.recv().await {
            let o = match res {
                Ok(o) => o,
                Err(e) => {
                    let e = ApiError::from(e);
                    let code = Some(e.status.as_u16().to_string());
                    let _ = out.send(Event::Error { code, message: e.message, param: e.param }).await;
                    return;
                }
            };
            if o.finished {
                (prompt, cached) = (o.prompt_token_ids.len(), o.num_cached_tokens);
            }
            for c in &o.outputs {
                generated += c.token_ids.len();
                for piece in pieces.feed(&c.text) {
                    builder.piece(piece);
                }
                if c.finished() {
                    for piece in pieces.finish() {
                        builder.piece(piece);
                    }
                    builder.close();
                    finish = c.finish_reason;
                }
            }
            for event in builder.events() {
                if !out.send(event).await {
                    return;
                }
            }
        }
        let items = builder.finish();
        let response = echo.response(status(finish), items, Some(ResponseUsage::new(prompt, generated, cached)));
        if let Some(StoreAs { owner, mut conversation }) = store {
            conversation.push(assistant_message(&response.output));
            let stored =
                Stored { owner, response: response.clone(), conversation: Arc::new(conversation), cancel: None };
            s.responses.put(&response.id, stored);
        }
        let _ = out.send(Event::Completed { response: Box::new(response) }).await;
    });
    Sse::new(ReceiverStream::new(rx).map(Ok::<_, std::convert::Infallible>)).into_response()
}
