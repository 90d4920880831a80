//! The engine core: requests in, one step at a time (schedule, run the model, sample, update),
//! outputs out.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::ops::Range;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use vllm_block::SeqId;
use vllm_kernels::KvCache;
use vllm_models::LoadOptions;
use vllm_sampler::{sample_batch, Guide, GuideCompiler, RequestOutputKind, SamplingParams, SeqSampler, TokenLogprobs};
use vllm_scheduler::{KvMemoryUsage, Request, Scheduler, SchedulerConfig, SchedulerOutput, StopConditions};
use vllm_tokenizer::{IncrementalDetokenizer, Tokenizer};

use crate::args::{EngineArgs, ModelDtype, Quantization};
use crate::output::{CompletionOutput, FinishReason, Logprob, PositionLogprobs, Prompt, RequestOutput, StopReason};
use crate::runner::ModelRunner;
use crate::source::{resolve, ModelFiles};
use crate::{Error, Result};

/// One generated sequence of a request (a request with `n` or `best_of` > 1 has several).
struct Child {
    seq: SeqId,
    detok: Option<IncrementalDetokenizer>,
    output_ids: Vec<u32>,
    logprobs: Option<Vec<PositionLogprobs>>,
    cumulative_logprob: Option<f64>,
    finish: Option<(FinishReason, Option<StopReason>)>,
    /// The text cut at a matched stop string.
    stopped_text: Option<String>,
    /// Bytes of text already searched for stop strings.
    stop_checked: usize,
    /// Tokens and text bytes already returned (`RequestOutputKind::Delta`).
    emitted: (usize, usize),
}

impl Child {
    fn text(&self) -> &str {
        match (&self.stopped_text, &self.detok) {
            (Some(t), _) => t,
            (None, Some(d)) => d.text(),
            (None, None) => "",
        }
    }

    /// Looks for a stop string in the text added since the last call; on a match, cuts the
    /// text and returns the string.
    fn find_stop(&mut self, stop: &[String], include: bool) -> Option<String> {
        let longest = stop.iter().map(String::len).max()?;
        let text = self.detok.as_ref()?.text();
        let mut from = self.stop_checked.saturating_sub(longest - 1);
        while !text.is_char_boundary(from) {
            from -= 1;
        }
        self.stop_checked = text.len();
        let (pos, s) =
            stop.iter().filter_map(|s| text[from..].find(s.as_str()).map(|i| (from + i, s))).min_by_key(|m| m.0)?;
        let end = if include { pos + s.len() } else { pos };
        self.stopped_text = Some(text[..end].to_string());
        Some(s.clone())
    }

    /// The output now. While running with stop strings, the last `longest - 1` bytes are held
    /// back (they may be the start of a stop string that must not be shown).
    fn output(&self, index: usize, hold_back: usize) -> CompletionOutput {
        let mut text = self.text();
        if self.finish.is_none() && hold_back > 0 {
            let mut end = text.len().saturating_sub(hold_back);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text = &text[..end];
        }
        CompletionOutput {
            index,
            text: text.to_string(),
            token_ids: self.output_ids.clone(),
            finish_reason: self.finish.as_ref().map(|f| f.0),
            stop_reason: self.finish.as_ref().and_then(|f| f.1.clone()),
            cumulative_logprob: self.cumulative_logprob,
            logprobs: self.logprobs.clone(),
        }
    }
}

/// A request: its prompt and its sequences. Parallel samples are forks of the first sequence:
/// the prompt is computed once, its blocks are shared by reference count and a shared partial
/// block is copied on write.
struct Group {
    request_id: String,
    prompt: Option<String>,
    prompt_ids: Vec<u32>,
    /// Sequences returned (the best `n` of `children` when `best_of` > `n`).
    n: usize,
    children: Vec<Child>,
    num_cached_tokens: usize,
    stop: Vec<String>,
    include_stop: bool,
    kind: RequestOutputKind,
    /// Top alternatives per prompt position, and the positions so far.
    prompt_logprobs: Option<(usize, Vec<Option<PositionLogprobs>>)>,
}

impl Group {
    fn finished(&self) -> bool {
        self.children.iter().all(|c| c.finish.is_some())
    }

    /// The request's output now; `None` while a `best_of` request is still running (its
    /// candidates are only ranked once all are done) or a final-only one is. Delta outputs
    /// hold only what is new since the previous call.
    fn output(&mut self) -> Option<RequestOutput> {
        let finished = self.finished();
        if !finished && (self.children.len() > self.n || self.kind == RequestOutputKind::FinalOnly) {
            return None;
        }
        let hold_back = self.stop.iter().map(String::len).max().unwrap_or(1) - 1;
        let order: Vec<usize> = if self.children.len() > self.n {
            let mut order: Vec<usize> = (0..self.children.len()).collect();
            let score = |i: usize| self.children[i].cumulative_logprob.unwrap_or(f64::NEG_INFINITY);
            order.sort_by(|&a, &b| score(b).total_cmp(&score(a)).then(a.cmp(&b)));
            order.truncate(self.n);
            order
        } else {
            (0..self.children.len()).collect()
        };
        let delta = self.kind == RequestOutputKind::Delta;
        let outputs = order
            .iter()
            .enumerate()
            .map(|(k, &i)| {
                let c = &mut self.children[i];
                let mut o = c.output(k, hold_back);
                if delta {
                    let (tokens, bytes) = c.emitted;
                    c.emitted = (o.token_ids.len(), o.text.len());
                    o.token_ids.drain(..tokens.min(o.token_ids.len()));
                    o.text.drain(..bytes.min(o.text.len()));
                    if let Some(lp) = o.logprobs.as_mut() {
                        lp.drain(..tokens.min(lp.len()));
                    }
                }
                o
            })
            .collect();
        Some(RequestOutput {
            request_id: self.request_id.clone(),
            prompt: self.prompt.clone(),
            prompt_token_ids: self.prompt_ids.clone(),
            outputs,
            finished,
            num_cached_tokens: self.num_cached_tokens,
            prompt_logprobs: self.prompt_logprobs.as_ref().map(|p| p.1.clone()),
        })
    }
}

/// Engine-wide statistics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EngineStats {
    /// Requests in the running batch.
    pub num_running: usize,
    /// Queued requests.
    pub num_waiting: usize,
    /// Fraction of KV blocks in use.
    pub kv_cache_usage: f32,
    /// Free KV blocks.
    pub num_free_blocks: usize,
    /// Total KV blocks.
    pub num_blocks: usize,
    /// Preemptions so far.
    pub num_preemptions: u64,
    /// Prompt tokens looked up in / served from the prefix cache.
    pub prefix_cache_queries: u64,
    /// Prompt tokens served from the prefix cache.
    pub prefix_cache_hits: u64,
    /// Tokens run through the model so far.
    pub num_computed_tokens: u64,
    /// Prompt tokens run through the model so far (prefix-cache hits and prompts shared by
    /// parallel samples are not recomputed, so they do not count).
    pub num_computed_prompt_tokens: u64,
    /// KV blocks in use against the tokens they hold ([`KvMemoryUsage::waste`] is the share of
    /// allocated slots holding no token).
    pub kv_memory: KvMemoryUsage,
}

/// Aborts requests from any thread: the engine frees their blocks at its next step, and
/// that step returns their final outputs with `finish_reason` abort.
#[derive(Debug, Clone, Default)]
pub struct AbortHandle {
    pending: Arc<Mutex<Vec<String>>>,
}

impl AbortHandle {
    /// Asks the engine to abort `request_id` (ignored if unknown or already finished).
    pub fn abort(&self, request_id: impl Into<String>) {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).push(request_id.into());
    }

    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// The synchronous engine (vLLM's `LLMEngine`).
pub struct LLMEngine {
    scheduler: Scheduler,
    runner: ModelRunner,
    tokenizer: Tokenizer,
    groups: HashMap<String, Group>,
    /// Each running sequence's request id and child index.
    owners: HashMap<SeqId, (String, usize)>,
    samplers: HashMap<SeqId, SeqSampler>,
    next_seq: SeqId,
    seed_rng: ChaCha8Rng,
    max_model_len: usize,
    aborts: AbortHandle,
    /// Guided-decoding automata over this tokenizer (built on first use).
    guides: Option<GuideCompiler>,
    /// Guided requests waiting for their automaton, compiled on another thread.
    compiling: Vec<Compiling>,
}

/// A guided request whose automaton is being compiled off the engine loop.
struct Compiling {
    request_id: String,
    prompt: Prompt,
    params: SamplingParams,
    scaled_logprobs: bool,
    done: std::sync::mpsc::Receiver<std::result::Result<(), String>>,
}

pub(crate) fn device(name: &str) -> Result<Device> {
    match name {
        "cpu" | "" => Ok(Device::Cpu),
        "cuda" if cfg!(feature = "cuda") => Err(Error::InvalidArgument {
            param: "device",
            message: "cuda: this build has the CUDA kernels (vllm-kernels), but the engine's CUDA path is not \
                      wired yet (docs/cuda.md)"
                .into(),
        }),
        "cuda" => Err(Error::InvalidArgument {
            param: "device",
            message: "cuda: this build has no CUDA support (build with `cargo xtask build-cuda`)".into(),
        }),
        other => Err(Error::InvalidArgument { param: "device", message: format!("'{other}' (choose cpu or cuda)") }),
    }
}

impl LLMEngine {
    /// Resolves the model, loads weights and tokenizer, sizes and allocates the KV cache.
    pub fn new(args: EngineArgs) -> Result<Self> {
        let files = resolve(&args.model)?;
        Self::from_files(args, files)
    }

    /// [`Self::new`] for a model already resolved (`args.model` only names it).
    pub fn from_files(args: EngineArgs, files: ModelFiles) -> Result<Self> {
        let dev = device(&args.device)?;
        let dtype = match args.dtype {
            ModelDtype::Auto | ModelDtype::Float32 => DType::F32,
            ModelDtype::Float16 => DType::F16,
            ModelDtype::BFloat16 => DType::BF16,
        };
        let opts = LoadOptions {
            dtype,
            keep_quantized: args.quantization == Quantization::Gguf,
            int8: args.quantization == Quantization::Int8,
        };
        let (model, tokenizer) = match files {
            ModelFiles::Gguf(path) => {
                let (model, w) = vllm_models::load_gguf(&path, opts, &dev)?;
                let md = w.gguf_metadata().ok_or_else(|| Error::InvalidArgument {
                    param: "model",
                    message: format!("{}: GGUF without metadata", path.display()),
                })?;
                (model, Tokenizer::from_gguf(md)?)
            }
            ModelFiles::HfDir(dir) => (vllm_models::load_hf_dir(&dir, opts, &dev)?, Tokenizer::from_hf_dir(&dir)?),
        };
        let model_max = model.max_model_len();
        let max_model_len = args.max_model_len.unwrap_or(model_max);
        if max_model_len == 0 || max_model_len > model_max {
            return Err(Error::InvalidArgument {
                param: "max_model_len",
                message: format!("{max_model_len} (the model supports 1 to {model_max})"),
            });
        }
        if args.block_size == 0 || args.max_num_seqs == 0 {
            return Err(Error::InvalidArgument {
                param: "block_size",
                message: "block_size and max_num_seqs must be positive".into(),
            });
        }
        let per_block = KvCache::bytes_per_token(model.attn_shape()) * model.num_layers() * args.block_size;
        let num_blocks = (args.kv_cache_memory / per_block as u64) as usize;
        if num_blocks == 0 {
            return Err(Error::InvalidArgument {
                param: "kv_cache_memory",
                message: format!("{} bytes hold no block (one block takes {per_block} bytes)", args.kv_cache_memory),
            });
        }
        // No point in more blocks than max_num_seqs full-length sequences.
        let num_blocks = num_blocks.min(args.max_num_seqs * max_model_len.div_ceil(args.block_size)).max(1);
        let max_num_batched_tokens = args.max_num_batched_tokens.unwrap_or(2048.max(args.max_num_seqs));
        if max_num_batched_tokens == 0 {
            return Err(Error::InvalidArgument { param: "max_num_batched_tokens", message: "must be positive".into() });
        }
        let scheduler = Scheduler::new(SchedulerConfig {
            max_num_seqs: args.max_num_seqs,
            max_num_batched_tokens,
            max_model_len,
            block_size: args.block_size,
            num_blocks,
            enable_prefix_caching: args.enable_prefix_caching,
        });
        let runner = ModelRunner::new(model, num_blocks, args.block_size, dev)?;
        Ok(Self {
            scheduler,
            runner,
            tokenizer,
            groups: HashMap::new(),
            owners: HashMap::new(),
            samplers: HashMap::new(),
            next_seq: 0,
            seed_rng: ChaCha8Rng::seed_from_u64(args.seed),
            max_model_len,
            aborts: AbortHandle::default(),
            guides: None,
            compiling: Vec::new(),
        })
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The effective context length.
    pub fn max_model_len(&self) -> usize {
        self.max_model_len
    }

    /// The scheduler (read-only).
    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    /// Current statistics.
    pub fn stats(&self) -> EngineStats {
        let kv = self.scheduler.kv_cache();
        let (q, h) = kv.prefix_cache_stats();
        EngineStats {
            num_running: self.scheduler.num_running(),
            num_waiting: self.scheduler.num_waiting(),
            kv_cache_usage: kv.usage(),
            num_free_blocks: kv.pool().num_free(),
            num_blocks: kv.pool().num_blocks(),
            num_preemptions: self.scheduler.num_preemptions(),
            prefix_cache_queries: q,
            prefix_cache_hits: h,
            num_computed_tokens: self.scheduler.num_computed_tokens().0,
            num_computed_prompt_tokens: self.scheduler.num_computed_tokens().1,
            kv_memory: kv.memory_usage(),
        }
    }

    /// A handle that aborts requests from any thread (see [`AbortHandle`]).
    pub fn abort_handle(&self) -> AbortHandle {
        self.aborts.clone()
    }

    /// Tokenizes (if needed) and validates a prompt.
    pub fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        let ids = match prompt {
            Prompt::Text(t) => self.tokenizer.encode(t, true)?,
            Prompt::TokenIds(ids) => {
                self.tokenizer.check_ids(ids)?;
                ids.clone()
            }
        };
        if ids.is_empty() {
            return Err(Error::InvalidPrompt("the prompt is empty".into()));
        }
        let vocab = self.runner.model().vocab_size();
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::InvalidPrompt(format!("token id {bad} is outside the model's vocabulary ({vocab})")));
        }
        Ok(ids)
    }

    /// Queues a request (with `n` / `best_of` > 1, one sequence per sample, all sharing the
    /// prompt's blocks). Everything is validated first: nothing is queued on error.
    pub fn add_request(&mut self, request_id: impl Into<String>, prompt: Prompt, params: SamplingParams) -> Result<()> {
        self.add_request_inner(request_id.into(), prompt, params, false)
    }

    /// [`Self::add_request`], with log probabilities after temperature scaling when
    /// `scaled_logprobs` (beam search ranks beams by them).
    pub(crate) fn add_request_inner(
        &mut self,
        request_id: String,
        prompt: Prompt,
        params: SamplingParams,
        scaled_logprobs: bool,
    ) -> Result<()> {
        if self.groups.contains_key(&request_id) || self.compiling.iter().any(|c| c.request_id == request_id) {
            return Err(Error::DuplicateRequestId(request_id));
        }
        params.validate(self.runner.model().vocab_size())?;
        let mut prompt_ids = self.prompt_ids(&prompt)?;
        // Guided decoding: use a cached automaton, or compile it on another thread and queue
        // the request once it is ready (other requests keep decoding meanwhile).
        let mut compiled_guide = None;
        if let Some(g) = &params.guided_decoding {
            let constraint = g.constraint()?;
            let compiler = self.guide_compiler().clone();
            match compiler.cached(&constraint) {
                Some(c) => compiled_guide = Some(c),
                None => {
                    if prompt_ids.len() >= self.max_model_len {
                        return Err(Error::PromptTooLong {
                            prompt_tokens: prompt_ids.len(),
                            max_model_len: self.max_model_len,
                        });
                    }
                    let (tx, rx) = std::sync::mpsc::channel();
                    std::thread::Builder::new()
                        .name("vllm-guide-compile".into())
                        .spawn(move || {
                            let _ = tx.send(compiler.compile(&constraint).map(|_| ()));
                        })
                        .map_err(|_| Error::Internal("cannot start the guide compiler thread"))?;
                    self.compiling.push(Compiling { request_id, prompt, params, scaled_logprobs, done: rx });
                    return Ok(());
                }
            }
        }
        if let Some(k) = params.truncate_prompt_tokens {
            prompt_ids.drain(..prompt_ids.len().saturating_sub(k));
        }
        if prompt_ids.len() >= self.max_model_len {
            return Err(Error::PromptTooLong { prompt_tokens: prompt_ids.len(), max_model_len: self.max_model_len });
        }
        let max_tokens = params.max_tokens.unwrap_or(self.max_model_len - prompt_ids.len());
        let stop = StopConditions {
            max_tokens,
            min_tokens: params.min_tokens,
            eos_token_ids: self.tokenizer.eos_token_ids().to_vec(),
            stop_token_ids: params.stop_token_ids.clone(),
            ignore_eos: params.ignore_eos,
        };
        let num_seqs = params.num_sequences();
        let first = self.next_seq;
        let forks: Vec<SeqId> = (1..num_seqs as SeqId).map(|i| first + i).collect();
        let extra = params.cache_salt.as_deref().map(salt_key).into_iter().collect();
        // min_tokens holds back EOS and the stop token ids; bad words are banned with and
        // without a leading space, like vLLM.
        let stop_ids: Vec<u32> = if params.min_tokens > 0 {
            stop.eos_token_ids.iter().chain(&stop.stop_token_ids).copied().collect()
        } else {
            Vec::new()
        };
        let mut bad_words: Vec<Vec<u32>> = Vec::new();
        for w in &params.bad_words {
            for variant in [w.clone(), format!(" {}", w.trim_start())] {
                let ids = self.tokenizer.encode(&variant, false)?;
                if !ids.is_empty() && !bad_words.contains(&ids) {
                    bad_words.push(ids);
                }
            }
        }
        // Rejects a request that could never fit before anything is recorded.
        let mut request = Request::new(first, prompt_ids.clone(), stop).with_forks(forks).with_cache_extra(extra);
        request.all_logits = params.prompt_logprobs.is_some();
        self.scheduler.add_request(request)?;
        let mut children = Vec::with_capacity(num_seqs);
        for i in 0..num_seqs {
            let seq = first + i as SeqId;
            // Sample i of a seeded request uses seed + i (vLLM's parallel sampling).
            let fallback_seed = self.seed_rng.next_u64();
            let child_params = SamplingParams { seed: params.seed.map(|s| s.wrapping_add(i as u64)), ..params.clone() };
            let mut sampler = SeqSampler::new(child_params, fallback_seed).with_context(
                &prompt_ids,
                stop_ids.clone(),
                bad_words.clone(),
            );
            if scaled_logprobs {
                sampler = sampler.with_scaled_logprobs();
            }
            if let Some(c) = &compiled_guide {
                sampler = sampler.with_guide(Guide::new(c));
            }
            self.samplers.insert(seq, sampler);
            self.owners.insert(seq, (request_id.clone(), i));
            children.push(Child {
                seq,
                detok: params.detokenize.then(|| IncrementalDetokenizer::new(&prompt_ids, params.skip_special_tokens)),
                output_ids: Vec::new(),
                logprobs: params.logprobs.map(|_| Vec::new()),
                cumulative_logprob: params.needs_logprobs().then_some(0.0),
                finish: None,
                stopped_text: None,
                stop_checked: 0,
                emitted: (0, 0),
            });
        }
        self.next_seq += num_seqs as SeqId;
        let prompt = match prompt {
            Prompt::Text(t) => Some(t),
            Prompt::TokenIds(_) => None,
        };
        self.groups.insert(
            request_id.clone(),
            Group {
                request_id,
                prompt,
                prompt_ids,
                n: params.n,
                children,
                num_cached_tokens: 0,
                stop: params.stop.clone(),
                include_stop: params.include_stop_str_in_output,
                kind: params.output_kind,
                prompt_logprobs: params.prompt_logprobs.map(|k| (k, vec![None])),
            },
        );
        Ok(())
    }

    /// Aborts a request: its blocks are freed now. Returns its final output, if it was known.
    pub fn abort_request(&mut self, request_id: &str) -> Option<RequestOutput> {
        if let Some(i) = self.compiling.iter().position(|c| c.request_id == request_id) {
            let c = self.compiling.remove(i);
            return Some(Self::empty_output(c.request_id, c.prompt));
        }
        let mut group = self.groups.remove(request_id)?;
        for c in &mut group.children {
            if c.finish.is_none() {
                self.scheduler.abort(c.seq);
                c.finish = Some((FinishReason::Abort, None));
            }
            self.samplers.remove(&c.seq);
            self.owners.remove(&c.seq);
        }
        // An aborted best_of request returns its first n candidates unranked.
        group.children.truncate(group.n);
        group.output()
    }

    /// Whether any request is unfinished.
    pub fn has_unfinished_requests(&self) -> bool {
        self.scheduler.has_unfinished() || !self.compiling.is_empty()
    }

    /// Runs one step. Returns the (cumulative) outputs of the requests that got a new token,
    /// and the final outputs of requests aborted through an [`AbortHandle`] since the last
    /// step.
    pub fn step(&mut self) -> Result<Vec<RequestOutput>> {
        let failed = self.admit_compiled();
        let aborted: Vec<RequestOutput> = self.aborts.take().iter().filter_map(|id| self.abort_request(id)).collect();
        let mut outputs = self.run_step()?;
        if !aborted.is_empty() || !failed.is_empty() {
            outputs.splice(0..0, aborted.into_iter().chain(failed));
        }
        Ok(outputs)
    }

    /// The guided-decoding compiler over this tokenizer's vocabulary.
    fn guide_compiler(&mut self) -> &GuideCompiler {
        let tok = &self.tokenizer;
        self.guides.get_or_insert_with(|| {
            let eos = tok.eos_token_ids().first().copied().unwrap_or(0);
            let tokens = (0..tok.vocab_size() as u32).filter_map(|id| tok.token_bytes(id).map(|b| (id, b)));
            GuideCompiler::new(tokens.collect::<Vec<_>>(), eos)
        })
    }

    /// Queues guided requests whose automaton is ready; returns the final (empty) outputs of
    /// those whose constraint could not be compiled or that no longer fit. Waits briefly when
    /// only compilations are in flight, so callers looping on `step` do not spin.
    fn admit_compiled(&mut self) -> Vec<RequestOutput> {
        let mut failed = Vec::new();
        if self.compiling.is_empty() {
            return failed;
        }
        // With nothing else to run, wait briefly for the oldest compilation.
        let mut wait = !self.scheduler.has_unfinished();
        let mut i = 0;
        while i < self.compiling.len() {
            let done = &self.compiling[i].done;
            let result = if std::mem::take(&mut wait) {
                match done.recv_timeout(std::time::Duration::from_millis(20)) {
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
                    r => Some(matches!(r, Ok(Ok(())))),
                }
            } else {
                match done.try_recv() {
                    Err(std::sync::mpsc::TryRecvError::Empty) => None,
                    r => Some(matches!(r, Ok(Ok(())))),
                }
            };
            let Some(compiled) = result else {
                i += 1;
                continue;
            };
            let c = self.compiling.remove(i);
            let (id, prompt) = (c.request_id.clone(), c.prompt.clone());
            if !(compiled && self.add_request_inner(c.request_id, c.prompt, c.params, c.scaled_logprobs).is_ok()) {
                failed.push(Self::empty_output(id, prompt));
            }
        }
        failed
    }

    /// The final output of a request that never ran.
    fn empty_output(request_id: String, prompt: Prompt) -> RequestOutput {
        let (prompt, prompt_token_ids) = match prompt {
            Prompt::Text(t) => (Some(t), Vec::new()),
            Prompt::TokenIds(ids) => (None, ids),
        };
        RequestOutput {
            request_id,
            prompt,
            prompt_token_ids,
            outputs: Vec::new(),
            finished: true,
            num_cached_tokens: 0,
            prompt_logprobs: None,
        }
    }

    fn run_step(&mut self) -> Result<Vec<RequestOutput>> {
        let out = self.scheduler.schedule();
        if out.is_empty() {
            return Ok(Vec::new());
        }
        let (logits, ranges) = self.runner.execute(&out)?;
        let vocab = self.runner.model().vocab_size();
        self.record_prompt_logprobs(&out, &logits, &ranges, vocab);
        let sample_ids: Vec<SeqId> = out.sampling_ids().collect();
        let samples = if sample_ids.is_empty() {
            Vec::new()
        } else {
            // Each sampling sequence's last row, once per sequence drawing from it (forks draw
            // from their parent's row, each from its own copy).
            let mut rows = Vec::with_capacity(sample_ids.len() * vocab);
            for (s, r) in out.seqs.iter().zip(&ranges).filter(|(s, _)| s.sample) {
                let last = r.end - 1;
                for _ in 0..=s.forks.len() {
                    rows.extend_from_slice(&logits[last * vocab..(last + 1) * vocab]);
                }
            }
            drop(logits);
            let mut taken: Vec<SeqSampler> = sample_ids
                .iter()
                .map(|id| self.samplers.remove(id).expect("scheduled request has a sampler"))
                .collect();
            let mut refs: Vec<&mut SeqSampler> = taken.iter_mut().collect();
            let samples = sample_batch(&mut rows, vocab, &mut refs);
            for (id, s) in sample_ids.iter().zip(taken) {
                self.samplers.insert(*id, s);
            }
            samples
        };
        for s in &out.seqs {
            if let (Some((rid, 0)), Some(r)) = (self.owners.get(&s.id), self.scheduler.request(s.id)) {
                if let Some(g) = self.groups.get_mut(rid) {
                    g.num_cached_tokens = r.num_cached_tokens;
                }
            }
        }
        let token_ids: Vec<u32> = samples.iter().map(|s| s.token).collect();
        let mut sample_of: HashMap<SeqId, vllm_sampler::Sample> = sample_ids.into_iter().zip(samples).collect();
        let updates = self.scheduler.update_from_output(&out, &token_ids);
        let eos = self.tokenizer.eos_token_ids().to_vec();
        let mut touched: Vec<String> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for u in updates {
            let Some((rid, idx)) = self.owners.get(&u.id).cloned() else {
                continue;
            };
            let lp = sample_of
                .remove(&u.id)
                .and_then(|s| s.logprobs)
                .map(|lp| (lp.logprob, position_logprobs(&self.tokenizer, u.new_token, &lp)));
            let Some(g) = self.groups.get_mut(&rid) else {
                continue;
            };
            let c = &mut g.children[idx];
            c.output_ids.push(u.new_token);
            if let Some(d) = c.detok.as_mut() {
                d.push(&self.tokenizer, u.new_token)?;
            }
            if let Some((logprob, pos)) = lp {
                if let Some(cum) = c.cumulative_logprob.as_mut() {
                    *cum += logprob as f64;
                }
                if let Some(v) = c.logprobs.as_mut() {
                    v.push(pos);
                }
            }
            c.finish = match u.finished {
                None => None,
                Some(vllm_scheduler::FinishReason::Stop(t)) => {
                    Some((FinishReason::Stop, (!eos.contains(&t)).then_some(StopReason::Token(t))))
                }
                Some(vllm_scheduler::FinishReason::Length) => Some((FinishReason::Length, None)),
                Some(vllm_scheduler::FinishReason::Abort) => Some((FinishReason::Abort, None)),
            };
            // A stop string ends the sequence even when the token also did (vLLM checks
            // strings after tokens, and cuts the text either way).
            if !g.stop.is_empty() {
                if let Some(matched) = c.find_stop(&g.stop, g.include_stop) {
                    if c.finish.is_none() {
                        self.scheduler.abort(u.id);
                    }
                    c.finish = Some((FinishReason::Stop, Some(StopReason::Text(matched))));
                }
            }
            if c.finish.is_some() {
                self.owners.remove(&u.id);
                self.samplers.remove(&u.id);
            }
            if seen.insert(rid.clone()) {
                touched.push(rid);
            }
        }
        let mut outputs = Vec::with_capacity(touched.len());
        for rid in touched {
            let Some(g) = self.groups.get_mut(&rid) else { continue };
            let done = g.finished();
            if let Some(o) = g.output() {
                outputs.push(o);
            }
            if done {
                self.groups.remove(&rid);
            }
        }
        Ok(outputs)
    }

    /// Records prompt log probabilities from the rows of prompt chunks that asked for every
    /// row: the row at position `p` scores prompt token `p + 1`.
    fn record_prompt_logprobs(&mut self, out: &SchedulerOutput, logits: &[f32], ranges: &[Range<usize>], vocab: usize) {
        for (s, r) in out.seqs.iter().zip(ranges).filter(|(s, _)| s.all_logits) {
            let Some((rid, 0)) = self.owners.get(&s.id).cloned() else { continue };
            let Some(g) = self.groups.get_mut(&rid) else { continue };
            let prompt = &g.prompt_ids;
            let Some((k, lps)) = g.prompt_logprobs.as_mut() else { continue };
            for (j, row) in r.clone().enumerate() {
                let pos = s.start_pos + j;
                // Positions arrive in order; a recomputed prompt (after preemption) is skipped.
                if pos + 1 >= prompt.len() || lps.len() != pos + 1 {
                    continue;
                }
                let next = prompt[pos + 1];
                let lp = TokenLogprobs::new(&logits[row * vocab..(row + 1) * vocab], next, *k);
                lps.push(Some(position_logprobs(&self.tokenizer, next, &lp)));
            }
        }
    }
}

/// A position's log probabilities with decoded tokens.
fn position_logprobs(tokenizer: &Tokenizer, token: u32, lp: &TokenLogprobs) -> PositionLogprobs {
    let decode = |id: u32| tokenizer.decode(&[id], false).unwrap_or_default();
    PositionLogprobs {
        sampled: Logprob { token_id: token, logprob: lp.logprob, rank: lp.rank, decoded_token: decode(token) },
        top: lp
            .top
            .iter()
            .enumerate()
            .map(|(r, &(id, logprob))| Logprob { token_id: id, logprob, rank: r as u32 + 1, decoded_token: decode(id) })
            .collect(),
    }
}

/// The prefix-cache key of a cache salt.
fn salt_key(salt: &str) -> u64 {
    let mut h = DefaultHasher::new();
    salt.hash(&mut h);
    h.finish()
}
