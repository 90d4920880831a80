//! The async engine: vLLM v1's three stages on their own threads.
//!
//! 1. **Input processing** runs on tokio's blocking pool, at most a few requests at a time:
//!    tokenizing, validation and constraint compiles ([`InputProcessor`]) never touch the
//!    engine thread. A request that fails here fails alone.
//! 2. **The engine core** runs the step loop on its own thread and sends each request only its
//!    per-step deltas, into a **bounded** channel. A request whose consumer stops reading
//!    fills its channel and is aborted (its blocks freed); one whose consumer goes away is
//!    aborted at the next step.
//! 3. **Output processing** (detokenizing, stop strings, rendering) happens in the consumer's
//!    task, when it reads its [`OutputStream`].
//!
//! If the core panics, every request in flight gets an error, [`AsyncEngine::health`] reports
//! the engine dead, and new requests are refused; the server then exits non-zero so that a
//! supervisor restarts it.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use vllm_sampler::SamplingParams;

use crate::beam::{BeamSearch, BeamSearchOutput, BeamSearchParams};
use crate::core::{CoreOutput, EngineCore};
use crate::engine::EngineStats;
use crate::input::{EngineRequest, InputProcessor};
use crate::metrics::StepMetrics;
use crate::output::{Prompt, RequestOutput};
use crate::output_processor::RequestState;
use crate::{EngineArgs, Error, Result, Tokenizer};

/// Requests processed (tokenized, compiled) at once; others wait their turn without holding a
/// thread.
const INPUT_WORKERS: usize = 4;

enum Command {
    Add {
        req: Box<EngineRequest>,
        accepted: oneshot::Sender<Result<()>>,
        out: mpsc::Sender<Result<CoreOutput>>,
    },
    Abort(String),
    /// The output processor matched a stop string: the core stops the sequence.
    FinishSeq(String, usize),
    /// Makes the core thread panic (tests of the liveness path).
    #[doc(hidden)]
    Crash,
    /// Makes the next step panic midway (tests of the step-failure path).
    #[doc(hidden)]
    FailNextStep,
    Shutdown,
}

/// Facts about the loaded model, readable without going through the engine thread.
#[derive(Debug, Clone)]
pub struct EngineInfo {
    /// The model argument the engine was built with.
    pub model: String,
    /// Effective context length.
    pub max_model_len: usize,
}

/// The LoRA adapters running and waiting (vLLM's `vllm:lora_requests_info`), as of the last
/// step, and when the sets last changed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoraInfo {
    /// `--max-loras`.
    pub max_loras: usize,
    /// Names of the adapters of running requests, sorted.
    pub running: Vec<String>,
    /// Names of the adapters of waiting requests, sorted.
    pub waiting: Vec<String>,
    /// Unix time (seconds) of the last change.
    pub updated_at: f64,
}

/// Whether the engine core is alive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineHealth {
    /// Stepping.
    Alive,
    /// The core died (the reason); nothing more will run.
    Dead(String),
}

/// Counts a request in flight while alive.
struct InflightGuard(Arc<AtomicUsize>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Sets a flag when dropped: a request's input processing gives up once its caller has gone.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A cheap-to-clone handle on the engine.
#[derive(Clone)]
pub struct AsyncEngine {
    tx: std_mpsc::Sender<Command>,
    info: Arc<EngineInfo>,
    input: InputProcessor,
    stats: Arc<Mutex<EngineStats>>,
    health: watch::Receiver<EngineHealth>,
    lora_info: Arc<Mutex<Option<LoraInfo>>>,
    inflight: Arc<AtomicUsize>,
    max_inflight: usize,
    output_buffer: usize,
    input_permits: Arc<Semaphore>,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl AsyncEngine {
    /// Loads the model (on the calling thread) and starts the engine thread.
    pub fn new(args: EngineArgs) -> Result<Self> {
        let files = crate::source::resolve_with(&args.model, &args.hub())?;
        Self::from_files(args, files)
    }

    /// [`Self::new`] for a model already resolved (`args.model` only names it).
    pub fn from_files(args: EngineArgs, files: crate::ModelFiles) -> Result<Self> {
        Self::from_config(crate::EngineConfig::resolve(&args, files)?)
    }

    /// Builds the engine for a resolved configuration and starts its thread.
    pub fn from_config(config: crate::EngineConfig) -> Result<Self> {
        let model = config.model.clone();
        let max_inflight = config.max_num_seqs.saturating_add(config.args.max_waiting_requests);
        let output_buffer = config.args.max_output_buffer_steps.max(1);
        let (core, input) = crate::engine::build(config)?;
        let info = Arc::new(EngineInfo { model, max_model_len: input.max_model_len() });
        let stats = Arc::new(Mutex::new(EngineStats::of(&core)));
        let (tx, rx) = std_mpsc::channel();
        let (health_tx, health) = watch::channel(EngineHealth::Alive);
        let st = stats.clone();
        let lora_info = Arc::new(Mutex::new(None));
        let lora = input.lora().cloned().map(|m| (m, lora_info.clone()));
        let thread = std::thread::Builder::new()
            .name("vllm-engine-core".into())
            .spawn(move || run_core(core, rx, st, health_tx, lora))
            .map_err(|_| Error::Internal("cannot start the engine thread"))?;
        Ok(Self {
            tx,
            info,
            input,
            stats,
            health,
            lora_info,
            inflight: Arc::new(AtomicUsize::new(0)),
            max_inflight,
            output_buffer,
            input_permits: Arc::new(Semaphore::new(INPUT_WORKERS)),
            thread: Arc::new(Mutex::new(Some(thread))),
        })
    }

    /// Model facts.
    pub fn info(&self) -> &EngineInfo {
        &self.info
    }

    /// The model's tokenizer (the input processor's).
    pub fn tokenizer(&self) -> &Tokenizer {
        self.input.tokenizer()
    }

    /// The input processor (tokenizing and validation, usable from any thread).
    pub fn input_processor(&self) -> &InputProcessor {
        &self.input
    }

    /// Statistics as of the last step.
    pub fn stats(&self) -> EngineStats {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the engine core is alive.
    pub fn health(&self) -> EngineHealth {
        self.health.borrow().clone()
    }

    /// The LoRA adapters running and waiting, with `--enable-lora`.
    pub fn lora_info(&self) -> Option<LoraInfo> {
        self.lora_info.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Resolves when the engine core dies (never, while it lives); gives the reason.
    pub async fn dead(&self) -> String {
        let mut h = self.health.clone();
        loop {
            if let EngineHealth::Dead(reason) = &*h.borrow_and_update() {
                return reason.clone();
            }
            if h.changed().await.is_err() {
                return "the engine thread has stopped".into();
            }
        }
    }

    /// The most requests in flight at once (`max_num_seqs + max_waiting_requests`): a batch
    /// that needs more sequences than this can never be admitted.
    pub fn max_inflight(&self) -> usize {
        self.max_inflight
    }

    /// Requests submitted and not yet finished (including those being processed).
    pub fn num_inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    fn send(&self, cmd: Command) -> Result<()> {
        self.tx.send(cmd).map_err(|_| self.stopped())
    }

    fn stopped(&self) -> Error {
        match self.health() {
            EngineHealth::Dead(reason) => Error::EngineDead(reason),
            EngineHealth::Alive => Error::EngineDead("the engine has stopped".into()),
        }
    }

    /// Admits one more request, or refuses it when the engine is dead or full.
    fn admit(&self) -> Result<InflightGuard> {
        if let EngineHealth::Dead(reason) = self.health() {
            return Err(Error::EngineDead(reason));
        }
        let n = self.inflight.fetch_add(1, Ordering::Relaxed);
        let guard = InflightGuard(self.inflight.clone());
        if n >= self.max_inflight {
            return Err(Error::Overloaded(format!(
                "{n} requests are in flight (the limit is max_num_seqs + max_waiting_requests = {})",
                self.max_inflight
            )));
        }
        Ok(guard)
    }

    /// Runs `f` on the blocking pool, at most [`INPUT_WORKERS`] at a time; a panic in it is an
    /// error for this call alone.
    async fn off_thread<T: Send + 'static>(&self, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
        let _permit = self.input_permits.acquire().await.map_err(|_| Error::Internal("input pool closed"))?;
        tokio::task::spawn_blocking(f).await.map_err(|e| {
            if e.is_panic() {
                Error::Internal("processing this request's input failed (a bug, reported in the log)")
            } else {
                Error::Internal("input processing was cancelled")
            }
        })?
    }

    /// Processes a request (off the engine thread) and submits it; returns its output stream
    /// once the core has queued it, or the error.
    pub async fn generate(&self, id: String, prompt: Prompt, params: SamplingParams) -> Result<OutputStream> {
        self.generate_with_lora(id, prompt, params, None).await
    }

    /// [`Self::generate`] with a LoRA adapter (loaded on first use, off the engine thread).
    pub async fn generate_with_lora(
        &self,
        id: String,
        prompt: Prompt,
        params: SamplingParams,
        lora: Option<crate::LoraRequest>,
    ) -> Result<OutputStream> {
        let guard = self.admit()?;
        let cancel = Arc::new(AtomicBool::new(false));
        let _cancel_on_drop = CancelOnDrop(cancel.clone());
        let input = self.input.clone();
        let req = self.off_thread(move || input.process_with_lora(id, prompt, params, lora.as_ref(), &cancel)).await?;
        self.submit(req, Some(guard)).await
    }

    /// Queues a processed request; its stream once the core has it. `guard`: the admission it
    /// counts against (a beam search's requests share their search's).
    async fn submit(&self, req: EngineRequest, guard: Option<InflightGuard>) -> Result<OutputStream> {
        let state = RequestState::new(&req);
        let prompt_tokens = req.prompt_ids.len();
        let (accepted, accepted_rx) = oneshot::channel();
        let (out, rx) = mpsc::channel(self.output_buffer);
        self.send(Command::Add { req: Box::new(req), accepted, out })?;
        accepted_rx.await.map_err(|_| self.stopped())??;
        Ok(OutputStream {
            rx,
            state,
            tokenizer: self.input.clone(),
            tx: self.tx.clone(),
            metrics: StepMetrics::new(Instant::now(), prompt_tokens),
            done: false,
            _inflight: guard,
        })
    }

    /// Beam search for every prompt: a driver above the engine (prompts are tokenized off the
    /// engine thread); each round's beams are ordinary requests that run between the others.
    /// Dropping the future aborts the round in flight.
    pub async fn beam_search(&self, prompts: Vec<Prompt>, params: BeamSearchParams) -> Result<Vec<BeamSearchOutput>> {
        self.beam_search_with_lora(prompts, params, None).await
    }

    /// [`Self::beam_search`] with a LoRA adapter.
    pub async fn beam_search_with_lora(
        &self,
        prompts: Vec<Prompt>,
        params: BeamSearchParams,
        lora: Option<crate::LoraRequest>,
    ) -> Result<Vec<BeamSearchOutput>> {
        let _guard = self.admit()?;
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let prefix = format!("\u{1}beam-{}", COUNTER.fetch_add(1, Ordering::Relaxed));
        let input = self.input.clone();
        let mut search =
            self.off_thread(move || BeamSearch::new(&input, prompts, params)?.with_lora(&input, lora.as_ref())).await?;
        for round in 1.. {
            let reqs = search.round(&self.input, &prefix, round)?;
            if reqs.is_empty() {
                break;
            }
            let mut streams = Vec::with_capacity(reqs.len());
            for (req, key) in reqs {
                streams.push((key, self.submit(req, None).await?));
            }
            let results = futures::future::try_join_all(streams.into_iter().map(|(key, mut s)| async move {
                let out = s.final_output().await?;
                Ok::<_, Error>((key, crate::beam::tops(&out)?))
            }))
            .await?;
            search.advance(results);
        }
        let input = self.input.clone();
        self.off_thread(move || search.finish(input.tokenizer())).await
    }

    /// Aborts a request (no-op if unknown or finished).
    pub fn abort(&self, id: &str) {
        let _ = self.tx.send(Command::Abort(id.to_string()));
    }

    /// Makes the engine core panic, as a bug would: every request in flight fails and the
    /// engine reports itself dead. For tests of what a server does then.
    #[doc(hidden)]
    pub fn crash_for_tests(&self) {
        let _ = self.tx.send(Command::Crash);
    }

    /// Makes the next engine step panic midway, as a bug in a request's step would: the
    /// requests in flight fail, and the engine goes on serving. For tests of that path.
    #[doc(hidden)]
    pub fn fail_next_step_for_tests(&self) {
        let _ = self.tx.send(Command::FailNextStep);
    }

    /// Stops the engine thread after aborting everything in flight, and waits for it.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown);
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

/// A request's outputs (as its `output_kind` asks), the last one with `finished` set. Output
/// processing runs here, in the reader's task. Dropping the stream aborts the request.
pub struct OutputStream {
    rx: mpsc::Receiver<Result<CoreOutput>>,
    state: RequestState,
    tokenizer: InputProcessor,
    tx: std_mpsc::Sender<Command>,
    metrics: StepMetrics,
    done: bool,
    _inflight: Option<InflightGuard>,
}

impl OutputStream {
    /// The next output; `None` after the final one.
    pub async fn recv(&mut self) -> Option<Result<RequestOutput>> {
        while !self.done {
            let out =
                match self.rx.recv().await {
                    Some(Ok(out)) => out,
                    Some(Err(e)) => return Some(self.fail(e)),
                    None => return Some(
                        self.fail(Error::Aborted(
                            "the request was aborted: its output buffer filled up (the client stopped reading) or the \
                         engine stopped"
                                .into(),
                        )),
                    ),
                };
            let new_tokens = out.seqs.iter().filter(|d| d.index == 0 && d.token.is_some()).count();
            let processed =
                std::panic::catch_unwind(AssertUnwindSafe(|| self.state.process(out, self.tokenizer.tokenizer())));
            let processed =
                match processed {
                    Ok(Ok(p)) => p,
                    Ok(Err(e)) => return Some(self.fail(e)),
                    Err(_) => {
                        return Some(self.fail(Error::Internal(
                            "processing this request's output failed (a bug, reported in the log)",
                        )))
                    }
                };
            let id = self.state.request_id().to_string();
            for index in processed.stopped {
                let _ = self.tx.send(Command::FinishSeq(id.clone(), index));
            }
            let finished = self.state.finished();
            self.metrics.on_tokens(&id, new_tokens, finished.then(|| self.state.finish_reason()));
            if finished {
                self.done = true;
                // Frees anything the core still runs for it (sequences this side stopped).
                let _ = self.tx.send(Command::Abort(id));
            }
            if let Some(o) = processed.output {
                return Some(Ok(o));
            }
        }
        None
    }

    /// The request's final output (the others are skipped); an error if it ends without one.
    pub async fn final_output(&mut self) -> Result<RequestOutput> {
        while let Some(o) = self.recv().await {
            let o = o?;
            if o.finished {
                return Ok(o);
            }
        }
        Err(Error::Aborted(format!("the request {} was aborted", self.state.request_id())))
    }

    /// Ends the stream with an error (the request is aborted).
    fn fail(&mut self, e: Error) -> Result<RequestOutput> {
        self.done = true;
        let _ = self.tx.send(Command::Abort(self.state.request_id().to_string()));
        Err(e)
    }

    /// The stream as a `futures` stream.
    pub fn into_stream(self) -> impl futures::Stream<Item = Result<RequestOutput>> + Send {
        futures::stream::unfold(self, |mut s| async move { s.recv().await.map(|o| (o, s)) })
    }
}

impl Drop for OutputStream {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.tx.send(Command::Abort(self.state.request_id().to_string()));
        }
    }
}

/// The core thread's state: the core, and what it answers to.
struct CoreLoop {
    core: EngineCore,
    fe: Frontend,
}

/// The adapters and where their running and waiting sets are published.
type LoraPublish = (Arc<crate::lora::LoraManager>, Arc<Mutex<Option<LoraInfo>>>);

/// The core thread's side of the requests: where outputs go, the stats.
struct Frontend {
    lora: Option<LoraPublish>,
    live: HashMap<String, mpsc::Sender<Result<CoreOutput>>>,
    stats: Arc<Mutex<EngineStats>>,
    /// A shutdown arrived while a step was suspended.
    stopping: bool,
    /// A request arrived while a step was suspended and has not had a step yet.
    fresh: bool,
    /// The periodic statistics line.
    log: crate::metrics::PeriodicLog,
}

fn run_core(
    core: EngineCore,
    rx: std_mpsc::Receiver<Command>,
    stats: Arc<Mutex<EngineStats>>,
    health: watch::Sender<EngineHealth>,
    lora: Option<LoraPublish>,
) {
    let fe = Frontend { lora, live: HashMap::new(), stats, stopping: false, fresh: false, log: Default::default() };
    let mut state = CoreLoop { core, fe };
    let run = std::panic::catch_unwind(AssertUnwindSafe(|| state.run(&rx)));
    match run {
        Ok(()) => state.fe.shutdown(&mut state.core),
        Err(panic) => {
            let reason = format!("the engine core panicked: {}", panic_message(&*panic));
            health.send_replace(EngineHealth::Dead(reason.clone()));
            // The core's state may be broken: tell everyone and touch nothing else.
            for (_, out) in state.fe.live.drain() {
                let _ = out.try_send(Err(Error::EngineDead(reason.clone())));
            }
            // Commands still queued get their reply channels dropped (an error each).
            drop(rx);
        }
    }
}

impl CoreLoop {
    fn run(&mut self, rx: &std_mpsc::Receiver<Command>) {
        loop {
            if self.fe.stopping {
                return;
            }
            if !self.core.has_unfinished() {
                crate::metrics::record_stats(&EngineStats::of(&self.core));
                match rx.recv() {
                    Ok(cmd) => {
                        if !self.fe.handle(&mut self.core, cmd) {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
            while let Ok(cmd) = rx.try_recv() {
                if !self.fe.handle(&mut self.core, cmd) {
                    return;
                }
            }
            self.fe.reap(&mut self.core);
            self.fe.fresh = false;
            let fe = &mut self.fe;
            let core = &mut self.core;
            let step = std::panic::catch_unwind(AssertUnwindSafe(|| {
                core.step_interruptible(&mut |core| fe.between_layers(core, rx))
            }));
            match step {
                Ok(result) => self.fe.after_step(&mut self.core, result),
                Err(panic) => self.fe.recover(&mut self.core, panic),
            }
        }
    }
}

/// The payload of a requested crash (`crash_for_tests`): never recovered from.
struct CoreCrash;

/// A panic's message.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .or_else(|| panic.is::<CoreCrash>().then(|| "crash requested (crash_for_tests)".to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

impl Frontend {
    /// Applies one command; false on shutdown.
    fn handle(&mut self, core: &mut EngineCore, cmd: Command) -> bool {
        match cmd {
            Command::Add { req, accepted, out } => {
                let id = req.request_id.clone();
                match core.add(*req) {
                    Ok(()) => {
                        if accepted.send(Ok(())).is_err() {
                            core.abort(&id);
                        } else {
                            self.live.insert(id, out);
                            self.fresh = true;
                        }
                    }
                    Err(e) => {
                        let _ = accepted.send(Err(e));
                    }
                }
            }
            Command::Abort(id) => {
                core.abort(&id);
                self.live.remove(&id);
            }
            Command::FinishSeq(id, index) => core.finish_seq(&id, index),
            Command::Crash => std::panic::panic_any(CoreCrash),
            Command::FailNextStep => core.panic_next_step = true,
            Command::Shutdown => return false,
        }
        true
    }

    /// Runs while a long step is suspended between two layers: takes the commands that
    /// arrived, and gives requests that arrived meanwhile a step of their own (the suspended
    /// step's sequences are held out of it), so their first token waits for one layer of the
    /// long step rather than all of it.
    fn between_layers(&mut self, core: &mut EngineCore, rx: &std_mpsc::Receiver<Command>) {
        while !self.stopping {
            match rx.try_recv() {
                Ok(cmd) => self.stopping = !self.handle(core, cmd),
                Err(_) => break,
            }
        }
        if self.fresh && !self.stopping {
            self.fresh = false;
            self.reap(core);
            let result = core.step();
            self.after_step(core, result);
        }
    }

    /// Clients that went away: aborted before anything is computed for them.
    fn reap(&mut self, core: &mut EngineCore) {
        let gone: Vec<String> = self.live.iter().filter(|(_, o)| o.is_closed()).map(|(id, _)| id.clone()).collect();
        for id in gone {
            core.abort(&id);
            self.live.remove(&id);
        }
    }

    /// Sends a step's outputs to their requests' channels.
    fn after_step(&mut self, core: &mut EngineCore, result: Result<Vec<CoreOutput>>) {
        // The gauges first: a client that reads its output and then /metrics sees the step.
        self.publish_stats(core);
        match result {
            Ok(outs) => {
                for o in outs {
                    self.deliver(core, o);
                }
            }
            Err(e) => {
                // A failed step fails every request in flight (and frees their blocks).
                let msg = e.to_string();
                for (id, out) in self.live.drain() {
                    core.abort(&id);
                    let _ = out.try_send(Err(Error::StepFailed(msg.clone())));
                }
            }
        }
        // Again: delivery may have aborted requests whose clients stopped reading.
        self.publish_stats(core);
    }

    /// After a step panicked: its requests (every request in the core) fail with an error,
    /// their blocks are freed, and the core goes on if that left it whole. If it did not (the
    /// panic broke its bookkeeping), the panic goes on and the engine is declared dead.
    fn recover(&mut self, core: &mut EngineCore, panic: Box<dyn std::any::Any + Send>) {
        let what = panic_message(&*panic);
        tracing::error!(panic = %what, "an engine step panicked (a bug): failing its requests");
        if panic.is::<CoreCrash>() {
            std::panic::resume_unwind(panic);
        }
        let cleared = std::panic::catch_unwind(AssertUnwindSafe(|| {
            // A step suspended between layers left its sequences held out of the others.
            core.scheduler.release();
            let ids = core.abort_all();
            core.is_empty().then_some(ids)
        }));
        let Ok(Some(ids)) = cleared else {
            std::panic::resume_unwind(panic);
        };
        for id in ids {
            if let Some(out) = self.live.remove(&id) {
                let _ = out.try_send(Err(Error::StepFailed(format!("the engine step failed (a bug): {what}"))));
            }
        }
        metrics::counter!("vllm:num_failed_steps_total").increment(1);
        self.publish_stats(core);
    }

    fn publish_stats(&mut self, core: &EngineCore) {
        let s = EngineStats::of(core);
        crate::metrics::record_stats(&s);
        self.log.tick(&s);
        *self.stats.lock().unwrap_or_else(|p| p.into_inner()) = s;
        if let Some((manager, info)) = &self.lora {
            let (running, waiting) = core.scheduler.lora_sets();
            let names = manager.names();
            let named = |ids: std::collections::BTreeSet<u32>| -> Vec<String> {
                let mut v: Vec<String> =
                    ids.iter().map(|id| names.get(id).cloned().unwrap_or_else(|| id.to_string())).collect();
                v.sort();
                v
            };
            let (running, waiting) = (named(running), named(waiting));
            let mut info = info.lock().unwrap_or_else(|p| p.into_inner());
            let changed = info.as_ref().is_none_or(|i| i.running != running || i.waiting != waiting);
            if changed {
                let now =
                    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
                *info = Some(LoraInfo { max_loras: manager.limits().max_loras, running, waiting, updated_at: now });
            }
        }
    }

    /// Sends a request its step output; a full channel (the consumer is not reading) or a
    /// closed one aborts the request.
    fn deliver(&mut self, core: &mut EngineCore, o: CoreOutput) {
        let id = o.request_id.clone();
        let Some(out) = self.live.get(&id) else { return };
        let finished = o.finished;
        match out.try_send(Ok(o)) {
            Ok(()) if !finished => {}
            Ok(()) => {
                self.live.remove(&id);
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics::counter!("vllm:num_aborted_slow_consumers_total").increment(1);
                core.abort(&id);
                self.live.remove(&id);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                core.abort(&id);
                self.live.remove(&id);
            }
        }
    }

    /// Aborts everything in flight; each request gets its final (aborted) output.
    fn shutdown(&mut self, core: &mut EngineCore) {
        for (id, out) in self.live.drain() {
            if let Some(o) = core.abort(&id) {
                let _ = out.try_send(Ok(o));
            }
        }
        *self.stats.lock().unwrap_or_else(|p| p.into_inner()) = EngineStats::of(core);
    }
}
