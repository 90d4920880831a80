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

use crate::beam::{BeamJob, BeamSearchOutput, BeamSearchParams};
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
    BeamSearch {
        prompts: Vec<Prompt>,
        params: BeamSearchParams,
        reply: oneshot::Sender<Result<Vec<BeamSearchOutput>>>,
    },
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
        let files = crate::source::resolve(&args.model)?;
        Self::from_files(args, files)
    }

    /// [`Self::new`] for a model already resolved (`args.model` only names it).
    pub fn from_files(args: EngineArgs, files: crate::ModelFiles) -> Result<Self> {
        let model = args.model.clone();
        let engine = LLMEngine::from_files(args, files)?;
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

    /// Beam search for every prompt, run by the engine thread between its other requests'
    /// steps; dropping the future aborts it.
    pub async fn beam_search(&self, prompts: Vec<Prompt>, params: BeamSearchParams) -> Result<Vec<BeamSearchOutput>> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::BeamSearch { prompts, params, reply })
            .map_err(|_| Error::Internal("the engine has stopped"))?;
        rx.await.map_err(|_| Error::Internal("the engine has stopped"))?
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

/// A beam search the engine thread is running, and where its result goes.
struct BeamTask {
    job: BeamJob,
    reply: oneshot::Sender<Result<Vec<BeamSearchOutput>>>,
}

fn run_loop(mut engine: LLMEngine, rx: std_mpsc::Receiver<Command>, stats: Arc<Mutex<EngineStats>>) {
    let mut live: HashMap<String, Live> = HashMap::new();
    let mut beams: Vec<BeamTask> = Vec::new();
    let mut beam_counter = 0u64;
    let mut handle =
        |engine: &mut LLMEngine, live: &mut HashMap<String, Live>, beams: &mut Vec<BeamTask>, cmd: Command| -> bool {
            match cmd {
                Command::BeamSearch { prompts, params, reply } => {
                    beam_counter += 1;
                    let prefix = format!("\u{1}beam-{beam_counter}");
                    let started = BeamJob::new(engine, prefix, prompts, params)
                        .and_then(|mut job| job.submit(engine).map(|submitted| (job, submitted)));
                    match started {
                        Ok((job, true)) => beams.push(BeamTask { job, reply }),
                        Ok((job, false)) => {
                            let _ = reply.send(job.finish(engine.tokenizer()));
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
                    true
                }
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
                    if !handle(&mut engine, &mut live, &mut beams, cmd) {
                        break 'outer;
                    }
                }
                Err(_) => break 'outer,
            }
        }
        while let Ok(cmd) = rx.try_recv() {
            if !handle(&mut engine, &mut live, &mut beams, cmd) {
                break 'outer;
            }
        }
        // Beam searches whose caller went away.
        beams.retain_mut(|b| {
            if b.reply.is_closed() {
                b.job.abort(&mut engine);
            }
            !b.reply.is_closed()
        });
        // Clients that went away: abort before computing for them.
        let gone: Vec<String> = live.iter().filter(|(_, l)| l.out.is_closed()).map(|(id, _)| id.clone()).collect();
        for id in gone {
            engine.abort_request(&id);
            live.remove(&id);
        }
        match engine.step() {
            Ok(outs) => {
                'outputs: for o in outs {
                    for b in beams.iter_mut() {
                        match b.job.accept(&o) {
                            Ok(true) => continue 'outputs,
                            Ok(false) => {}
                            Err(e) => {
                                b.job.abort(&mut engine);
                                let reply = std::mem::replace(&mut b.reply, oneshot::channel().0);
                                let _ = reply.send(Err(e));
                            }
                        }
                    }
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
                // Beam searches whose round is complete: the next round, or the answer.
                let mut i = 0;
                while i < beams.len() {
                    let b = &mut beams[i];
                    if b.reply.is_closed() || !b.job.round_done() {
                        i += 1;
                        continue;
                    }
                    b.job.advance();
                    match b.job.submit(&mut engine) {
                        Ok(true) => i += 1,
                        Ok(false) => {
                            let b = beams.swap_remove(i);
                            let _ = b.reply.send(b.job.finish(engine.tokenizer()));
                        }
                        Err(e) => {
                            let b = beams.swap_remove(i);
                            let _ = b.reply.send(Err(e));
                        }
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
                for mut b in beams.drain(..) {
                    b.job.abort(&mut engine);
                    let _ = b.reply.send(Err(Error::StepFailed(msg.clone())));
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
    for mut b in beams.drain(..) {
        b.job.abort(&mut engine);
        let _ = b.reply.send(Err(Error::Internal("the engine has stopped")));
    }
    *stats.lock().unwrap_or_else(|p| p.into_inner()) = engine.stats();
}
