//! The synchronous engine (vLLM's `LLMEngine`): the three stages in one thread. Requests go
//! through the input processor ([`InputProcessor`]), the engine core runs the steps, and each
//! request's output processor turns the core's deltas into [`RequestOutput`]s. The offline
//! [`crate::LLM`] drives it; the server uses [`crate::AsyncEngine`], which runs the same
//! stages on different threads.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use candle_core::Device;
use vllm_kernels::KvCache;
use vllm_models::LoadOptions;
use vllm_sampler::SamplingParams;
use vllm_scheduler::{KvMemoryUsage, Scheduler, SchedulerConfig};

use crate::args::EngineArgs;
use crate::config::{EngineConfig, KvBudget};
use crate::core::EngineCore;
use crate::input::{EngineRequest, InputProcessor};
use crate::output::{Prompt, RequestOutput};
use crate::output_processor::RequestState;
use crate::runner::ModelRunner;
use crate::source::ModelFiles;
use crate::{Error, Result, Tokenizer};

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
    /// Tokens drawn on the model's device so far (only their ids came back to the host).
    pub num_device_sampled_tokens: u64,
    /// Decode steps run in fixed shapes (replayed CUDA graphs on a GPU) so far.
    pub num_graph_steps: u64,
    /// Speculative decoding's counters (`None` without `--speculative-config`).
    pub spec: Option<crate::spec::SpecStats>,
}

impl EngineStats {
    /// The statistics of an engine core now.
    pub(crate) fn of(core: &EngineCore) -> Self {
        let scheduler = &core.scheduler;
        let kv = scheduler.kv_cache();
        let (q, h) = kv.prefix_cache_stats();
        EngineStats {
            num_running: scheduler.num_running(),
            num_waiting: scheduler.num_waiting(),
            kv_cache_usage: kv.usage(),
            num_free_blocks: kv.pool().num_free(),
            num_blocks: kv.pool().num_blocks(),
            num_preemptions: scheduler.num_preemptions(),
            prefix_cache_queries: q,
            prefix_cache_hits: h,
            num_computed_tokens: scheduler.num_computed_tokens().0,
            num_computed_prompt_tokens: scheduler.num_computed_tokens().1,
            kv_memory: kv.memory_usage(),
            num_device_sampled_tokens: core.device_sampled_tokens,
            num_graph_steps: core.runner.fixed_shape_steps(),
            spec: core.spec.as_ref().map(|s| s.stats),
        }
    }
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

    pub(crate) fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// The synchronous engine (vLLM's `LLMEngine`).
pub struct LLMEngine {
    core: EngineCore,
    input: InputProcessor,
    /// Each unfinished request's output state.
    states: HashMap<String, RequestState>,
    max_model_len: usize,
    aborts: AbortHandle,
}

/// The parts an engine is built from: the core (scheduler, model runner, samplers) and the
/// input processor over the same model, for a resolved configuration.
pub(crate) fn build(config: EngineConfig) -> Result<(EngineCore, InputProcessor)> {
    tracing::info!("{config}");
    let EngineConfig { files, device: dev, load: opts, max_model_len, kv_dtype, block_size, args, .. } = &config;
    // With LoRA, every linear layer is recorded so adapters can be installed on it.
    let lora = config.lora.map(|limits| (Arc::new(vllm_models::lora::LoraRegistry::default()), limits));
    let registry = lora.as_ref().map(|(r, _)| r.clone());
    let (model, tokenizer) = load_model(files, *opts, dev, registry, true)?;
    let tokenizer = tokenizer.ok_or(Error::Internal("a tokenizer was asked for"))?;
    // `--tokenizer`: another tokenizer. Either way its ids must fit the model's vocabulary.
    let (tokenizer, param, name) = match &args.tokenizer {
        None => (tokenizer, "model", "its tokenizer".to_string()),
        Some(spec) => {
            let at = crate::source::resolve_tokenizer(spec, &args.hub())?;
            let t = if at.is_file() { tokenizer_from_gguf(&at, *opts)? } else { Tokenizer::from_hf_dir(&at)? };
            tracing::info!(tokenizer = %spec, "using a tokenizer other than the model's");
            (t, "tokenizer", spec.clone())
        }
    };
    if tokenizer.vocab_size() > model.vocab_size() {
        return Err(Error::InvalidArgument {
            param,
            message: format!(
                "{name} has {} tokens, more than the model's {} embeddings",
                tokenizer.vocab_size(),
                model.vocab_size()
            ),
        });
    }
    let max_model_len = *max_model_len;
    if max_model_len > model.max_model_len() {
        return Err(Error::InvalidArgument {
            param: "max_model_len",
            message: format!("{max_model_len} (the model supports 1 to {})", model.max_model_len()),
        });
    }
    // A draft model (speculative decoding) is loaded before the cache is sized: its weights
    // take memory, and its own cache shares the target's blocks, so a block costs both.
    let draft = crate::spec::draft::load(&config, &*model)?;
    let block_bytes = |model: &dyn vllm_models::CausalLM, kv_dtype| {
        KvCache::bytes_per_token(model.attn_shape(), kv_dtype)
            .checked_mul(model.num_layers())
            .and_then(|b| b.checked_mul(*block_size))
            .ok_or_else(|| Error::InvalidArgument {
                param: "block_size",
                message: format!("{block_size} tokens per block: one block's bytes overflow"),
            })
    };
    let mut per_block = block_bytes(&*model, *kv_dtype)?;
    if let Some(d) = &draft {
        let draft_bytes = block_bytes(&*d.model, d.kv_dtype)?;
        tracing::info!(target_bytes = per_block, draft_bytes, "KV block of the target and the draft model");
        per_block = per_block.checked_add(draft_bytes).ok_or_else(|| Error::InvalidArgument {
            param: "block_size",
            message: format!("{block_size} tokens per block: one block's bytes overflow"),
        })?;
    }
    let num_blocks = match config.kv_budget {
        KvBudget::Bytes(bytes) => {
            let n = (bytes / per_block as u64) as usize;
            if n == 0 {
                return Err(Error::InvalidArgument {
                    param: "kv_cache_memory",
                    message: format!("{bytes} bytes hold no block (one block takes {per_block} bytes)"),
                });
            }
            n
        }
        KvBudget::GpuFraction(utilization) => {
            let step = crate::runner::ProfileStep {
                tokens: config.max_num_batched_tokens.min(max_model_len),
                rows: config.max_num_seqs.min(config.max_num_batched_tokens),
                block_size: *block_size,
                kv_dtype: *kv_dtype,
            };
            let mem = crate::cuda::memory_after_profile(dev, &*model, step)?;
            crate::cuda::gpu_kv_blocks(mem, utilization, per_block as u64)?
        }
    };
    // One token through the model (over a one-block cache) before the cache is allocated: a
    // shape the file's headers did not reveal fails here, at start, not in every request.
    crate::runner::warm_up(&*model, *block_size, *kv_dtype, dev)?;
    // No point in more blocks than max_num_seqs full-length sequences.
    let num_blocks = num_blocks.min(config.max_num_seqs.saturating_mul(max_model_len.div_ceil(*block_size))).max(1);
    let scheduler = Scheduler::new(SchedulerConfig {
        max_num_seqs: config.max_num_seqs,
        max_num_batched_tokens: config.max_num_batched_tokens,
        max_model_len,
        block_size: *block_size,
        num_blocks,
        enable_prefix_caching: config.enable_prefix_caching,
        long_prefill_token_threshold: config.long_prefill_token_threshold,
    })
    .with_max_loras(config.lora.map_or(0, |l| l.max_loras));
    tracing::info!(dtype = ?kv_dtype, blocks = num_blocks, block_size, "KV cache");
    let mut runner = ModelRunner::new(model, num_blocks, *block_size, *kv_dtype, dev.clone())?;
    if let Some(max_len) = config.fixed_shape_decode {
        runner = runner.with_graphs(crate::runner::DecodeGraphs::new(max_len, config.max_num_seqs));
        tracing::info!(max_len, "decode steps in fixed shapes{}", if dev.is_cuda() { " (CUDA graphs)" } else { "" });
    }
    let vocab = runner.model().vocab_size();
    let mut input =
        InputProcessor::new(tokenizer, vocab, max_model_len, config.max_num_seqs, args.guided_decoding.clone());
    if let Some((registry, limits)) = lora {
        input = input.with_lora(Arc::new(crate::lora::LoraManager::new(registry, limits)));
    }
    let eos = input.tokenizer().eos_token_ids().to_vec();
    let mut core = EngineCore::new(scheduler, runner, args.seed, eos);
    core.device_sampling = config.device_sampling;
    if let Some(spec) = &config.speculative {
        let draft =
            draft.map(|d| d.into_proposer(num_blocks, *block_size, config.max_num_batched_tokens)).transpose()?;
        core.spec = Some(crate::spec::Speculator::new(spec.clone(), draft)?);
        tracing::info!(method = spec.method.name(), k = spec.num_speculative_tokens, "speculative decoding");
    }
    Ok((core, input))
}

/// Loads a checkpoint's model (its linear layers recorded in `lora` for adapters), and its
/// tokenizer when `with_tokenizer`.
pub(crate) fn load_model(
    files: &ModelFiles,
    opts: LoadOptions,
    dev: &Device,
    lora: Option<Arc<vllm_models::lora::LoraRegistry>>,
    with_tokenizer: bool,
) -> Result<(Box<dyn vllm_models::CausalLM>, Option<Tokenizer>)> {
    Ok(match files {
        ModelFiles::Gguf(path) => {
            let (model, w) = vllm_models::load_gguf_with(path, opts, dev, lora)?;
            let tokenizer = if with_tokenizer {
                let md = w.gguf_metadata().ok_or_else(|| Error::InvalidArgument {
                    param: "model",
                    message: format!("{}: GGUF without metadata", path.display()),
                })?;
                Some(Tokenizer::from_gguf(md)?)
            } else {
                None
            };
            (model, tokenizer)
        }
        ModelFiles::HfDir(dir) => {
            let model = vllm_models::load_hf_dir_with(dir, opts, dev, lora)?;
            (model, if with_tokenizer { Some(Tokenizer::from_hf_dir(dir)?) } else { None })
        }
    })
}

/// The tokenizer stored in a GGUF file (opening it reads the metadata only).
fn tokenizer_from_gguf(path: &std::path::Path, opts: LoadOptions) -> Result<Tokenizer> {
    let w = vllm_models::Weights::from_gguf(path, opts, &Device::Cpu)?;
    let md = w.gguf_metadata().ok_or_else(|| Error::InvalidArgument {
        param: "tokenizer",
        message: format!("{}: GGUF without metadata", path.display()),
    })?;
    Ok(Tokenizer::from_gguf(md)?)
}

impl LLMEngine {
    /// Resolves the model, loads weights and tokenizer, sizes and allocates the KV cache.
    pub fn new(args: EngineArgs) -> Result<Self> {
        let files = crate::source::resolve_with(&args.model, &args.hub())?;
        Self::from_files(args, files)
    }

    /// [`Self::new`] for a model already resolved (`args.model` only names it).
    pub fn from_files(args: EngineArgs, files: ModelFiles) -> Result<Self> {
        Self::from_config(EngineConfig::resolve(&args, files)?)
    }

    /// An engine for a resolved configuration.
    pub fn from_config(config: EngineConfig) -> Result<Self> {
        let (core, input) = build(config)?;
        let max_model_len = input.max_model_len();
        Ok(Self { core, input, states: HashMap::new(), max_model_len, aborts: AbortHandle::default() })
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        self.input.tokenizer()
    }

    /// The input processor (tokenizing, validation, constraint compiles).
    pub fn input_processor(&self) -> &InputProcessor {
        &self.input
    }

    /// The effective context length.
    pub fn max_model_len(&self) -> usize {
        self.max_model_len
    }

    /// The scheduler (read-only).
    pub fn scheduler(&self) -> &Scheduler {
        &self.core.scheduler
    }

    /// Current statistics.
    pub fn stats(&self) -> EngineStats {
        EngineStats::of(&self.core)
    }

    /// A handle that aborts requests from any thread (see [`AbortHandle`]).
    pub fn abort_handle(&self) -> AbortHandle {
        self.aborts.clone()
    }

    /// Tokenizes (if needed) and checks a prompt.
    pub fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        self.input.prompt_ids(prompt, None)
    }

    /// Processes and queues a request (with `n` / `best_of` > 1, one sequence per sample,
    /// all sharing the prompt's blocks). Everything is checked first, and a guided-decoding
    /// constraint compiled: nothing is queued on error.
    pub fn add_request(&mut self, request_id: impl Into<String>, prompt: Prompt, params: SamplingParams) -> Result<()> {
        self.add_request_with_lora(request_id, prompt, params, None)
    }

    /// [`Self::add_request`] with a LoRA adapter (vLLM's `lora_request`; loaded on first use).
    pub fn add_request_with_lora(
        &mut self,
        request_id: impl Into<String>,
        prompt: Prompt,
        params: SamplingParams,
        lora: Option<&crate::LoraRequest>,
    ) -> Result<()> {
        let request_id = request_id.into();
        if self.core.contains(&request_id) {
            return Err(Error::DuplicateRequestId(request_id));
        }
        let req = self.input.process_with_lora(request_id, prompt, params, lora, &AtomicBool::new(false))?;
        self.add_processed(req)
    }

    /// Queues a request the input processor already built.
    pub fn add_processed(&mut self, req: EngineRequest) -> Result<()> {
        let state = RequestState::new(&req);
        let id = req.request_id.clone();
        self.core.add(req)?;
        self.states.insert(id, state);
        Ok(())
    }

    /// Aborts a request: its blocks are freed now. Returns its final output, if it was known.
    pub fn abort_request(&mut self, request_id: &str) -> Option<RequestOutput> {
        self.core.abort(request_id);
        self.states.remove(request_id)?.abort()
    }

    /// Whether any request is unfinished.
    pub fn has_unfinished_requests(&self) -> bool {
        self.core.has_unfinished()
    }

    /// Runs one step. Returns the outputs of the requests that progressed (as their output
    /// kind asks), and the final outputs of requests aborted through an [`AbortHandle`] since
    /// the last step.
    pub fn step(&mut self) -> Result<Vec<RequestOutput>> {
        let mut outputs: Vec<RequestOutput> =
            self.aborts.take().iter().filter_map(|id| self.abort_request(id)).collect();
        for out in self.core.step()? {
            let Some(state) = self.states.get_mut(&out.request_id) else { continue };
            let processed = state.process(out, self.input.tokenizer())?;
            for index in processed.stopped {
                self.core.finish_seq(state.request_id(), index);
            }
            if state.finished() {
                let id = state.request_id().to_string();
                self.core.abort(&id);
                self.states.remove(&id);
            }
            outputs.extend(processed.output);
        }
        Ok(outputs)
    }
}
