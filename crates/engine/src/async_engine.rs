//! The async engine: the engine core runs the step loop on its own thread; callers (the HTTP
//! server) submit requests through a channel and get a stream of cumulative outputs back.
//!
//! Dropping a request's stream aborts it: its KV blocks are freed at the next step.

use std::collections::HashMap;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};
use vllm_sampler::SamplingParams;

use crate::engine::{EngineStats, LLMEngine};
use crate::metrics::StepMetrics;
use crate::output::{Prompt, RequestOutput};
use crate::{EngineArgs, Error, Result, Tokenizer};

/// A request's outputs, cumulative, the last one with `finished` set.
pub type OutputStream = mpsc::UnboundedReceiver<Result<RequestOutput>>;

enum Command {
    Add {
        id: String,
        prompt: Prompt,
        params: Box<SamplingParams>,
        accepted: oneshot::Sender<Result<()>>,
        out: mpsc::UnboundedSender<Result<RequestOutput>>,
    },
    Abort(String),
    Shutdown,
}

/// Facts about the loaded model, readable without going through the engine thread.
#[derive(Debug, Clone)]
pub struct EngineInfo {
    /// The model argument the engine was built with.
    pub model: String,
    /// Effective context length.
    pub max_model_len: usize,
    /// The tokenizer (cheap to clone).
    pub tokenizer: Tokenizer,
}

/// A cheap-to-clone handle on the engine thread.
#[derive(Clone)]
pub struct AsyncEngine {
    tx: std_mpsc::Sender<Command>,
    info: Arc<EngineInfo>,
    stats: Arc<Mutex<EngineStats>>,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl AsyncEngine {
    /// Loads the model (on the calling thread) and starts the engine thread.
    pub fn new(args: EngineArgs) -> Result<Self> {
        let model = args.model.clone();
        let engine = LLMEngine::new(args)?;
        let info = Arc::new(EngineInfo {
            model,
            max_model_len: engine.max_model_len(),
            tokenizer: engine.tokenizer().clone(),
        });
        let stats = Arc::new(Mutex::new(engine.stats()));
        let (tx, rx) = std_mpsc::channel();
        let st = stats.clone();
        let thread = std::thread::Builder::new()
            .name("vllm-engine-core".into())
            .spawn(move || run_loop(engine, rx, st))
            .map_err(|_| Error::Internal("cannot start the engine thread"))?;
        Ok(Self { tx, info, stats, thread: Arc::new(Mutex::new(Some(thread))) })
    }

    /// Model facts.
    pub fn info(&self) -> &EngineInfo {
        &self.info
    }

    /// Statistics as of the last step.
    pub fn stats(&self) -> EngineStats {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Submits a request; returns its output stream once the engine has validated and queued
    /// it, or the validation error.
    pub async fn generate(&self, id: String, prompt: Prompt, params: SamplingParams) -> Result<OutputStream> {
        let (accepted, accepted_rx) = oneshot::channel();
        let (out, out_rx) = mpsc::unbounded_channel();
        self.tx
            .send(Command::Add { id, prompt, params: Box::new(params), accepted, out })
            .map_err(|_| Error::Internal("the engine has stopped"))?;
        accepted_rx.await.map_err(|_| Error::Internal("the engine has stopped"))??;
        Ok(out_rx)
    }

    /// Aborts a request (no-op if unknown or finished).
    pub fn abort(&self, id: &str) {
        let _ = self.tx.send(Command::Abort(id.to_string()));
    }

    /// Stops the engine thread after aborting everything in flight, and waits for it.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown);
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

struct Live {
    out: mpsc::UnboundedSender<Result<RequestOutput>>,
    metrics: StepMetrics,
}

fn run_loop(mut engine: LLMEngine, rx: std_mpsc::Receiver<Command>, stats: Arc<Mutex<EngineStats>>) {
    let mut live: HashMap<String, Live> = HashMap::new();
    let handle = |engine: &mut LLMEngine, live: &mut HashMap<String, Live>, cmd: Command| -> bool {
        match cmd {
            Command::Add { id, prompt, params, accepted, out } => {
                let arrival = Instant::now();
                match engine.add_request(id.clone(), prompt, *params) {
                    Ok(()) => {
                        if accepted.send(Ok(())).is_err() {
                            engine.abort_request(&id);
                        } else {
                            live.insert(id, Live { out, metrics: StepMetrics::new(arrival) });
                        }
                    }
                    Err(e) => {
                        let _ = accepted.send(Err(e));
                    }
                }
                true
            }
            Command::Abort(id) => {
                engine.abort_request(&id);
                live.remove(&id);
                true
            }
            Command::Shutdown => false,
        }
    };
    'outer: loop {
        if !engine.has_unfinished_requests() {
            crate::metrics::record_stats(&engine.stats());
            match rx.recv() {
                Ok(cmd) => {
                    if !handle(&mut engine, &mut live, cmd) {
                        break 'outer;
                    }
                }
                Err(_) => break 'outer,
            }
        }
        while let Ok(cmd) = rx.try_recv() {
            if !handle(&mut engine, &mut live, cmd) {
                break 'outer;
            }
        }
        // Clients that went away: abort before computing for them.
        let gone: Vec<String> = live.iter().filter(|(_, l)| l.out.is_closed()).map(|(id, _)| id.clone()).collect();
        for id in gone {
            engine.abort_request(&id);
            live.remove(&id);
        }
        match engine.step() {
            Ok(outs) => {
                for o in outs {
                    let finished = o.finished;
                    if let Some(l) = live.get_mut(&o.request_id) {
                        l.metrics.on_output(&o);
                        if l.out.send(Ok(o.clone())).is_err() {
                            engine.abort_request(&o.request_id);
                            live.remove(&o.request_id);
                            continue;
                        }
                    }
                    if finished {
                        live.remove(&o.request_id);
                    }
                }
            }
            Err(e) => {
                // A failed step fails every request in flight (and frees their blocks).
                let msg = e.to_string();
                for (id, l) in live.drain() {
                    engine.abort_request(&id);
                    let _ = l.out.send(Err(Error::StepFailed(msg.clone())));
                }
            }
        }
        let s = engine.stats();
        crate::metrics::record_stats(&s);
        *stats.lock().unwrap_or_else(|p| p.into_inner()) = s;
    }
    for (id, l) in live.drain() {
        if let Some(o) = engine.abort_request(&id) {
            let _ = l.out.send(Ok(o));
        }
    }
    *stats.lock().unwrap_or_else(|p| p.into_inner()) = engine.stats();
}
