//! Rendering engine outputs as the API's responses: full completion, chat and `/generate`
//! responses and their streamed chunks (all typed, see `api.rs`), log probabilities in each
//! API's format, and beam search results.

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::{select_all, StreamExt};
use serde_json::{json, Value};
use tokio_stream::wrappers::ReceiverStream;
use vllm_engine::{CompletionOutput, Logprob, OutputStream, PositionLogprobs, RequestOutput};

use crate::api::{
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionResponse, ChatDelta, ChatMessage, CompletionChoice,
    CompletionChunk, CompletionChunkChoice, CompletionResponse, FunctionCallDelta, FunctionCallOut, GenerateResponse,
    ToolCallDelta, ToolCallOut, Usage,
};
use crate::error::ApiError;
use crate::protocol::StreamOptions;
use crate::routes::now;
use crate::tools::{ToolStream, ToolStreamEvent};

pub(crate) fn usage(outs: &[RequestOutput]) -> Usage {
    let p: usize = outs.iter().map(|o| o.prompt_token_ids.len()).sum();
    let c: usize = outs.iter().flat_map(|o| &o.outputs).map(|c| c.token_ids.len()).sum();
    let cached: usize = outs.iter().map(|o| o.num_cached_tokens).sum();
    Usage::new(p, c, cached)
}

/// What a choice looks like for each API.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Api {
    Completion,
    Chat,
    /// vLLM's simple API: each choice's whole text, prompt first (the prompt is the echo).
    Generate,
}

/// How choices are rendered: which API, what to echo before each prompt's output, whether
/// log probabilities are shown (and how many alternatives), and how tool calls are read.
#[derive(Clone)]
pub(crate) struct Render {
    pub api: Api,
    /// Per prompt: text put before the generated text (`echo`).
    pub echo: Vec<String>,
    /// Choices per prompt (`n`): prompt `i`'s output `j` is choice `i * n + j`.
    pub n: usize,
    pub top_logprobs: Option<usize>,
    pub tools: Tools,
    /// Chat with `--reasoning-parser`: each choice's split, at its start.
    pub reasoning: Option<crate::reasoning::Splitter>,
    /// Whether the thinking is returned (`include_reasoning`); it is split off either way.
    pub include_reasoning: bool,
    /// `return_tokens_as_token_ids`: log-probability tokens written `token_id:<id>`.
    pub token_ids_as_tokens: bool,
    /// `return_token_ids`: prompt and output token ids in the response.
    pub token_ids: bool,
}

/// How a chat output becomes tool calls.
#[derive(Clone, Default)]
pub(crate) enum Tools {
    /// Plain text (no tools, `tool_choice: none`, or no parser configured).
    #[default]
    Off,
    /// `auto`: the server's `--tool-call-parser` splits the text.
    Parse(std::sync::Arc<dyn crate::tools::ToolParser>),
    /// A named function forced by guided decoding: the text is its arguments object.
    Named(String),
    /// `required`: guided decoding made the text a JSON list of `{"name", "parameters"}`.
    Required,
}

impl Tools {
    /// The incremental reader of one streamed choice's calls (`None`: plain text).
    pub(crate) fn stream(&self) -> Option<Box<dyn ToolStream>> {
        match self {
            Tools::Off => None,
            Tools::Parse(p) => Some(p.stream()),
            Tools::Named(name) => Some(crate::tools::named_stream(name)),
            Tools::Required => Some(crate::tools::required_stream()),
        }
    }

    /// The content and the calls (as OpenAI's `tool_calls` entries) of a finished text.
    pub(crate) fn split(&self, text: &str, id: &str) -> (Option<String>, Vec<ToolCallOut>) {
        let parsed = match self {
            Tools::Off => return (Some(text.to_string()), Vec::new()),
            Tools::Parse(p) => p.parse(text),
            Tools::Named(name) => match serde_json::from_str::<Value>(text) {
                Ok(v) if v.is_object() => crate::tools::Parsed {
                    content: None,
                    calls: vec![crate::tools::ToolCall { name: name.clone(), arguments: v.to_string() }],
                },
                // Cut short (max_tokens): the partial text is returned as content.
                _ => return (Some(text.to_string()), Vec::new()),
            },
            Tools::Required => match serde_json::from_str::<Value>(text) {
                Ok(Value::Array(list)) => crate::tools::Parsed {
                    content: None,
                    calls: list
                        .iter()
                        .filter_map(|c| {
                            Some(crate::tools::ToolCall {
                                name: c.get("name")?.as_str()?.to_string(),
                                arguments: c.get("parameters").cloned().unwrap_or(json!({})).to_string(),
                            })
                        })
                        .collect(),
                },
                _ => return (Some(text.to_string()), Vec::new()),
            },
        };
        let calls = parsed
            .calls
            .iter()
            .enumerate()
            .map(|(k, c)| ToolCallOut {
                id: tool_call_id(id, k),
                kind: "function".into(),
                function: FunctionCallOut { name: c.name.clone(), arguments: c.arguments.clone() },
            })
            .collect();
        (parsed.content, calls)
    }
}

/// The id of a choice's `k`th call (`choice`: the response id and the choice's index).
fn tool_call_id(choice: &str, k: usize) -> String {
    format!("chatcmpl-tool-{choice}-{k}")
}

/// A streamed choice's tool-call events as chat deltas: content as content; a call's start
/// with its id, type and name (arguments `""`), then its argument fragments, as vLLM sends
/// them.
fn tool_deltas(events: Vec<ToolStreamEvent>, choice: &str) -> Vec<ChatDelta> {
    events
        .into_iter()
        .filter_map(|e| {
            let call = |index, id: Option<String>, name: Option<String>, arguments: String| ChatDelta {
                tool_calls: vec![ToolCallDelta {
                    index,
                    kind: id.as_ref().map(|_| "function"),
                    id,
                    function: FunctionCallDelta { name, arguments },
                }],
                ..Default::default()
            };
            match e {
                ToolStreamEvent::Content(c) => Some(ChatDelta { content: Some(c), ..Default::default() }),
                ToolStreamEvent::Start { index, name } => {
                    Some(call(index, Some(tool_call_id(choice, index)), Some(name), String::new()))
                }
                ToolStreamEvent::Arguments { index, fragment } => Some(call(index, None, None, fragment)),
                ToolStreamEvent::End { .. } => None,
            }
        })
        .collect()
}

/// OpenAI's completions `logprobs` object for a run of positions; `offset` is the text offset
/// (in characters) of the first token.
fn completion_logprobs(positions: &[PositionLogprobs], mut offset: usize, ids: bool) -> Value {
    let mut tokens = Vec::new();
    let mut token_logprobs = Vec::new();
    let mut top = Vec::new();
    let mut offsets = Vec::new();
    for p in positions {
        tokens.push(json!(token_text(&p.sampled, ids)));
        token_logprobs.push(json!(p.sampled.logprob));
        let mut m = serde_json::Map::new();
        for t in &p.top {
            m.entry(token_text(t, ids)).or_insert(json!(t.logprob));
        }
        m.entry(token_text(&p.sampled, ids)).or_insert(json!(p.sampled.logprob));
        top.push(Value::Object(m));
        offsets.push(json!(offset));
        offset += p.sampled.decoded_token.chars().count();
    }
    json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets})
}

/// A log probability's token as the response writes it: its text, or `token_id:<id>`
/// (`return_tokens_as_token_ids`).
fn token_text(t: &Logprob, ids: bool) -> String {
    if ids {
        format!("token_id:{}", t.token_id)
    } else {
        t.decoded_token.clone()
    }
}

/// OpenAI's chat `logprobs` object (`{"content": [...]}`) for a run of positions.
fn chat_logprobs(positions: &[PositionLogprobs], k: usize, ids: bool) -> Value {
    let entry =
        |t: &Logprob| json!({"token": token_text(t, ids), "logprob": t.logprob, "bytes": t.decoded_token.as_bytes()});
    let content: Vec<Value> = positions
        .iter()
        .map(|p| {
            let mut e = entry(&p.sampled);
            e["top_logprobs"] = Value::Array(p.top.iter().take(k).map(entry).collect());
            e
        })
        .collect();
    json!({"content": content})
}

impl Render {
    /// A choice's log probabilities for `positions`; `offset` is the character offset of the
    /// first one's text in the choice's whole text.
    fn logprobs(&self, c: &CompletionOutput, positions: &[PositionLogprobs], offset: usize) -> Option<Value> {
        match (self.top_logprobs, c.logprobs.is_some()) {
            (Some(k), true) => match self.api {
                Api::Completion => Some(completion_logprobs(positions, offset, self.token_ids_as_tokens)),
                Api::Chat => Some(chat_logprobs(positions, k, self.token_ids_as_tokens)),
                Api::Generate => None,
            },
            _ => None,
        }
    }
}

/// vLLM's prompt log probabilities: per prompt position, null or `{token_id: {logprob, rank,
/// decoded_token}}`.
fn prompt_logprobs(p: &[Option<PositionLogprobs>]) -> Vec<Value> {
    p.iter()
        .map(|pos| match pos {
            None => Value::Null,
            Some(pos) => {
                let mut m = serde_json::Map::new();
                for t in std::iter::once(&pos.sampled).chain(&pos.top) {
                    m.entry(t.token_id.to_string())
                        .or_insert(json!({"logprob": t.logprob, "rank": t.rank, "decoded_token": t.decoded_token}));
                }
                Value::Object(m)
            }
        })
        .collect()
}

/// A non-streamed response: prompt `i`'s output `j` is choice `i * n + j` (vLLM's order).
pub(crate) fn full_response(model: &str, render: &Render, id: &str, outs: &[RequestOutput]) -> Response {
    let mut completion = Vec::new();
    let mut chat = Vec::new();
    let mut texts = Vec::new();
    for (i, o) in outs.iter().enumerate() {
        let n = o.outputs.len();
        let prompt_lps = o.prompt_logprobs.as_deref().map(prompt_logprobs);
        for (j, c) in o.outputs.iter().enumerate() {
            let echo = &render.echo[i];
            let text = format!("{echo}{}", c.text);
            let positions = c.logprobs.as_deref().unwrap_or_default();
            let logprobs = render.logprobs(c, positions, echo.chars().count());
            let finish_reason = c.finish_reason.map(|r| r.as_str().to_string());
            let stop_reason = c.stop_reason.as_ref().map(|r| json!(r));
            let index = i * n + j;
            match render.api {
                Api::Generate => texts.push(text),
                Api::Completion => completion.push(CompletionChoice {
                    index,
                    text,
                    logprobs,
                    finish_reason,
                    stop_reason,
                    prompt_logprobs: prompt_lps.clone(),
                    prompt_token_ids: render.token_ids.then(|| o.prompt_token_ids.clone()),
                    token_ids: render.token_ids.then(|| c.token_ids.clone()),
                }),
                Api::Chat => {
                    let (reasoning, text) = match &render.reasoning {
                        Some(sp) => {
                            let split = sp.clone().split_all(&c.text);
                            let r = Some(split.reasoning).filter(|r| render.include_reasoning && !r.is_empty());
                            (r, format!("{echo}{}", split.content))
                        }
                        None => (None, text),
                    };
                    let (mut content, tool_calls) = render.tools.split(&text, &format!("{id}-{index}"));
                    if render.reasoning.is_some() && content.as_deref() == Some("") {
                        content = None; // all thinking (vLLM: null, not "")
                    }
                    let finish_reason = if tool_calls.is_empty() { finish_reason } else { Some("tool_calls".into()) };
                    chat.push(ChatChoice {
                        index,
                        message: ChatMessage {
                            role: "assistant".into(),
                            content,
                            tool_calls,
                            reasoning_content: reasoning.clone(),
                            reasoning,
                        },
                        logprobs,
                        finish_reason,
                        stop_reason,
                        prompt_logprobs: prompt_lps.clone(),
                        token_ids: render.token_ids.then(|| c.token_ids.clone()),
                    })
                }
            }
        }
    }
    let (id, created, model, usage) = (id.to_string(), now(), model.to_string(), usage(outs));
    match render.api {
        Api::Generate => Json(GenerateResponse { text: texts }).into_response(),
        Api::Completion => Json(CompletionResponse {
            id,
            object: "text_completion".into(),
            created,
            model,
            choices: completion,
            usage,
        })
        .into_response(),
        Api::Chat => {
            let prompt_token_ids =
                (render.token_ids).then(|| outs.first().map(|o| o.prompt_token_ids.clone()).unwrap_or_default());
            Json(ChatCompletionResponse {
                id,
                object: "chat.completion".into(),
                created,
                model,
                choices: chat,
                usage,
                prompt_token_ids,
            })
            .into_response()
        }
    }
}

/// Per streamed choice: characters already sent, whether its first chunk went out, and its
/// readers of reasoning and tool calls.
#[derive(Default)]
struct Sent {
    chars: usize,
    started: bool,
    /// The tool-call reader (a chat request with tools).
    tools: Option<Box<dyn ToolStream>>,
    /// Calls started.
    calls: usize,
    /// The reasoning split, with `--reasoning-parser`.
    reasoning: Option<crate::reasoning::Splitter>,
}

/// Bytes at the end of `text` that could be the start of `marker` (held back while streaming).
pub(crate) fn partial_tail(text: &str, marker: &str) -> usize {
    (1..marker.len().min(text.len() + 1))
        .rev()
        .find(|&n| text.is_char_boundary(text.len() - n) && marker.is_char_boundary(n) && text.ends_with(&marker[..n]))
        .unwrap_or(0)
}

/// One streamed choice, of either API.
enum ChunkChoice {
    Completion(CompletionChunkChoice),
    Chat(ChatChunkChoice),
}

/// A chat choice's chunk: its delta, and the finish reason on its last.
fn chat_choice(index: usize, delta: ChatDelta, finish: Option<String>, stop: Option<Value>) -> ChunkChoice {
    ChunkChoice::Chat(ChatChunkChoice {
        index,
        delta,
        logprobs: None,
        finish_reason: finish,
        stop_reason: stop,
        token_ids: None,
    })
}

/// Builds a stream's events: every chunk carries the stream's id, creation time and model,
/// and with `continuous_usage_stats` the usage so far.
struct Chunker {
    id: String,
    model: String,
    created: u64,
    continuous: bool,
}

impl Chunker {
    /// The event of one chunk: `choice` (none in the usage chunk); `usage` for the last one,
    /// else (continuous usage) the counts so far.
    fn event(&self, api: Api, choice: Option<ChunkChoice>, usage: Option<Usage>, so_far: (usize, usize)) -> Event {
        let usage = usage.or_else(|| self.continuous.then(|| Usage::new(so_far.0, so_far.1, 0)));
        let (id, created, model) = (self.id.clone(), self.created, self.model.clone());
        let data = match api {
            Api::Chat => serde_json::to_string(&ChatCompletionChunk {
                id,
                object: "chat.completion.chunk",
                created,
                model,
                choices: match choice {
                    Some(ChunkChoice::Chat(c)) => vec![c],
                    _ => Vec::new(),
                },
                usage,
            }),
            _ => serde_json::to_string(&CompletionChunk {
                id,
                object: "text_completion",
                created,
                model,
                choices: match choice {
                    Some(ChunkChoice::Completion(c)) => vec![c],
                    _ => Vec::new(),
                },
                usage,
            }),
        };
        Event::default().data(data.unwrap_or_default())
    }
}

/// A streamed answer: server-sent events of chunks for the OpenAI routes, NUL-terminated
/// objects of each choice's whole text for `/generate` (the streams were submitted with delta
/// outputs).
pub(crate) fn stream_response(
    render: Render,
    id: String,
    model: String,
    streams: Vec<OutputStream>,
    options: StreamOptions,
) -> Response {
    if render.api == Api::Generate {
        return generate_stream(render, streams);
    }
    sse(render, Chunker { id, model, created: now(), continuous: options.continuous_usage_stats }, streams, options)
}

/// vLLM's `/generate` stream: each output sends every choice's whole text so far (prompt
/// first), rebuilt here from the deltas, as a JSON object followed by a NUL byte.
fn generate_stream(render: Render, mut streams: Vec<OutputStream>) -> Response {
    let Some(rx) = streams.pop() else { return ApiError::internal("no stream").into_response() };
    let prompt = render.echo.first().cloned().unwrap_or_default();
    let mut texts: Vec<String> = vec![prompt; render.n];
    let body = rx.into_stream().map(move |o| {
        let v = match o {
            Ok(o) => {
                for c in &o.outputs {
                    if let Some(t) = texts.get_mut(c.index) {
                        t.push_str(&c.text);
                    }
                }
                json!(GenerateResponse { text: texts.clone() })
            }
            Err(e) => ApiError::from(e).body(),
        };
        Ok::<_, std::convert::Infallible>(Bytes::from(format!("{v}\0")))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .body(Body::from_stream(body))
        .unwrap_or_else(|e| ApiError::internal(e.to_string()).into_response())
}

/// Streams deltas as server-sent events. The producer task ends when the client goes away
/// (the event channel closes), dropping the engine streams, which aborts their requests. A
/// client that stops reading fills the event channel, then its requests' output buffers, and
/// is aborted.
fn sse(render: Render, chunker: Chunker, streams: Vec<OutputStream>, options: StreamOptions) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(64);
    let num_prompts = streams.len();
    let n = render.n;
    tokio::spawn(async move {
        let api = render.api;
        // Token counts so far, per prompt (its length) and over all choices (generated).
        let mut prompt_lens = vec![0usize; num_prompts];
        let mut generated = 0usize;
        if api == Api::Chat {
            for i in 0..num_prompts * n {
                let delta = ChatDelta { role: Some("assistant"), content: Some(String::new()), ..Default::default() };
                if tx.send(chunker.event(api, Some(chat_choice(i, delta, None, None)), None, (0, 0))).await.is_err() {
                    return;
                }
            }
        }
        let mut merged =
            select_all(streams.into_iter().enumerate().map(|(i, rx)| rx.into_stream().map(move |o| (i, o)).boxed()));
        let mut sent: Vec<Sent> = (0..num_prompts * n)
            .map(|_| Sent { reasoning: render.reasoning.clone(), tools: render.tools.stream(), ..Sent::default() })
            .collect();
        let (mut prompt_tokens, mut completion_tokens, mut cached) = (0, 0, 0);
        while let Some((i, res)) = merged.next().await {
            let o = match res {
                Ok(o) => o,
                Err(e) => {
                    let _ = tx.send(Event::default().data(ApiError::from(e).body().to_string())).await;
                    return;
                }
            };
            if o.finished {
                prompt_tokens += o.prompt_token_ids.len();
                cached += o.num_cached_tokens;
            }
            if !o.prompt_token_ids.is_empty() {
                prompt_lens[i] = o.prompt_token_ids.len();
            }
            generated += o.outputs.iter().map(|c| c.token_ids.len()).sum::<usize>();
            for (j, c) in o.outputs.iter().enumerate() {
                let k = i * n + j;
                let st = &mut sent[k];
                completion_tokens += c.token_ids.len();
                let so_far = (prompt_lens.iter().sum(), generated);
                let emit = |choice: ChunkChoice| chunker.event(api, Some(choice), None, so_far);
                // The echoed prompt goes in front of the choice's first chunk.
                let echo = if st.started { "" } else { render.echo[i].as_str() };
                st.started = true;
                let mut delta = format!("{echo}{}", c.text);
                let positions = c.logprobs.as_deref().unwrap_or_default();
                if let Some(sp) = st.reasoning.as_mut() {
                    // The thinking goes out as `reasoning` deltas; the answer continues below.
                    let mut split = sp.feed(&c.text);
                    if c.finished() {
                        let rest = sp.finish();
                        split.reasoning.push_str(&rest.reasoning);
                        split.content.push_str(&rest.content);
                    }
                    if render.include_reasoning && !split.reasoning.is_empty() {
                        let r = split.reasoning;
                        let d =
                            ChatDelta { reasoning: Some(r.clone()), reasoning_content: Some(r), ..Default::default() };
                        if tx.send(emit(chat_choice(k, d, None, None))).await.is_err() {
                            return;
                        }
                    }
                    delta = format!("{echo}{}", split.content);
                }
                if let Some(reader) = st.tools.as_mut() {
                    // Tool calls are read as the text comes (`tools::ToolStream`): text that
                    // cannot be part of a call goes out as content, a call as its name, then
                    // its argument fragments.
                    let mut events = reader.feed(&delta);
                    if c.finished() {
                        events.extend(reader.finish());
                    }
                    st.calls += events.iter().filter(|e| matches!(e, ToolStreamEvent::Start { .. })).count();
                    for d in tool_deltas(events, &format!("{}-{k}", chunker.id)) {
                        if tx.send(emit(chat_choice(k, d, None, None))).await.is_err() {
                            return;
                        }
                    }
                    if c.finished() {
                        let reason = if st.calls == 0 {
                            c.finish_reason.map(|r| r.as_str().to_string())
                        } else {
                            Some("tool_calls".to_string())
                        };
                        let stop = c.stop_reason.as_ref().map(|r| json!(r));
                        if tx.send(emit(chat_choice(k, ChatDelta::default(), reason, stop))).await.is_err() {
                            return;
                        }
                    }
                    continue;
                }
                // Character offset of the first new token in the choice's whole text.
                let offset = st.chars + echo.chars().count();
                st.chars += delta.chars().count();
                if !delta.is_empty() || !positions.is_empty() || c.finished() {
                    let logprobs = render.logprobs(c, positions, offset);
                    let finish_reason = c.finish_reason.map(|r| r.as_str().to_string());
                    let stop_reason = c.stop_reason.as_ref().map(|r| json!(r));
                    let token_ids = render.token_ids.then(|| c.token_ids.clone()); // this chunk's new ids
                    let choice = match api {
                        Api::Chat => ChunkChoice::Chat(ChatChunkChoice {
                            index: k,
                            delta: ChatDelta { content: Some(delta).filter(|d| !d.is_empty()), ..Default::default() },
                            logprobs,
                            finish_reason,
                            stop_reason,
                            token_ids,
                        }),
                        _ => ChunkChoice::Completion(CompletionChunkChoice {
                            index: k,
                            text: delta,
                            logprobs,
                            finish_reason,
                            stop_reason,
                            token_ids,
                        }),
                    };
                    if tx.send(emit(choice)).await.is_err() {
                        return;
                    }
                }
            }
        }
        if options.include_usage
            && tx
                .send(chunker.event(api, None, Some(Usage::new(prompt_tokens, completion_tokens, cached)), (0, 0)))
                .await
                .is_err()
        {
            return;
        }
        let _ = tx.send(Event::default().data("[DONE]")).await;
    });
    Sse::new(ReceiverStream::new(rx).map(Ok::<_, std::convert::Infallible>)).into_response()
}

/// Beam search results as request outputs (one per prompt, its beams as choices).
pub(crate) fn beam_outputs(id: &str, outs: Vec<vllm_engine::BeamSearchOutput>) -> Vec<RequestOutput> {
    outs.into_iter()
        .enumerate()
        .map(|(i, b)| RequestOutput {
            request_id: format!("{id}-{i}"),
            prompt: b.prompt,
            prompt_token_ids: b.prompt_token_ids,
            outputs: b
                .sequences
                .into_iter()
                .enumerate()
                .map(|(index, q)| CompletionOutput {
                    index,
                    text: q.text,
                    token_ids: q.token_ids,
                    finish_reason: Some(q.finish_reason),
                    stop_reason: None,
                    cumulative_logprob: Some(q.cumulative_logprob),
                    logprobs: None,
                })
                .collect(),
            finished: true,
            num_cached_tokens: 0,
            prompt_logprobs: None,
        })
        .collect()
}
