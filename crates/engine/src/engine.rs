//! The synchronous engine (vLLM's `LLMEngine`): the three stages in one thread. Requests go
//! through the input processor ([`InputProcessor`]), the engine core runs the steps, and each
//! request's output processor turns the core's deltas into [`RequestOutput`]s. The offline
//! [`crate::LLM`] drives it; the server uses [`crate::AsyncEngine`], which runs the same
//! stages on different threads.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device};
use vllm_kernels::KvCache;
use vllm_models::{LoadOptions, MatrixFormat};
use vllm_sampler::SamplingParams;
use vllm_scheduler::{KvMemoryUsage, Scheduler, SchedulerConfig};

use crate::args::{EngineArgs, KvCacheDtype, ModelDtype, Quantization};
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
/// input processor over the same model.
pub(crate) fn build(args: EngineArgs, files: ModelFiles) -> Result<(EngineCore, InputProcessor)> {
    if args.device.starts_with("cuda") && args.quantization == Quantization::Int8 {
        return Err(Error::InvalidArgument {
            param: "quantization",
            message: "int8: our int8 kernels are CPU kernels; on CUDA leave --quantization out (GGUF files run \
                      on candle's CUDA quantized matmul, other checkpoints in their own dtype)"
                .into(),
        });
    }
    let dev = device(&args.device)?;
    let path = match &files {
        ModelFiles::Gguf(p) | ModelFiles::HfDir(p) => p.clone(),
    };
    let info = vllm_models::inspect(&path).ok();
    let dtype = resolve_dtype(args.dtype, dev.is_cuda(), info.as_ref().map(|i| &i.dtypes));
    let matrices = match args.quantization {
        Quantization::Int8 => MatrixFormat::Int8,
        // Our quantized kernels are CPU kernels; on CUDA, candle's quantized matmul.
        Quantization::Auto | Quantization::Gguf if dev.is_cpu() => MatrixFormat::Native,
        Quantization::Auto | Quantization::Gguf => MatrixFormat::CandleQuantized,
        Quantization::None => MatrixFormat::Dense,
    };
    let opts = LoadOptions { dtype, matrices };
    let files_kind = match &files {
        ModelFiles::Gguf(_) => FilesKind::Gguf,
        ModelFiles::HfDir(_) => FilesKind::HfDir,
    };
    if let Some(info) = &info {
        log_what_is_served(info, &files, &args, dtype, &dev);
    }
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
    // `--tokenizer`: another tokenizer, as long as its ids fit the model's vocabulary.
    let tokenizer = match &args.tokenizer {
        None => tokenizer,
        Some(spec) => {
            let at = crate::source::resolve_tokenizer(spec, &args.hub())?;
            let t = if at.is_file() { tokenizer_from_gguf(&at, opts)? } else { Tokenizer::from_hf_dir(&at)? };
            if t.vocab_size() > model.vocab_size() {
                return Err(Error::InvalidArgument {
                    param: "tokenizer",
                    message: format!(
                        "{spec} has {} tokens, more than the model's {} embeddings",
                        t.vocab_size(),
                        model.vocab_size()
                    ),
                });
            }
            tracing::info!(tokenizer = %spec, "using a tokenizer other than the model's");
            t
        }
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
    let quantized = match opts.matrices {
        MatrixFormat::Int8 => true,
        MatrixFormat::Native => matches!(files_kind, FilesKind::Gguf),
        MatrixFormat::Dense | MatrixFormat::CandleQuantized => false,
    };
    let kv_dtype = match args.kv_cache_dtype {
        KvCacheDtype::Auto if dev.is_cpu() && quantized => DType::F16,
        KvCacheDtype::Auto => dtype,
        KvCacheDtype::Float32 => DType::F32,
        KvCacheDtype::Float16 => DType::F16,
        KvCacheDtype::BFloat16 => DType::BF16,
    };
    let max_num_batched_tokens = args.max_num_batched_tokens.unwrap_or(2048.max(args.max_num_seqs));
    if max_num_batched_tokens == 0 {
        return Err(Error::InvalidArgument { param: "max_num_batched_tokens", message: "must be positive".into() });
    }
    let per_block = KvCache::bytes_per_token(model.attn_shape(), kv_dtype) * model.num_layers() * args.block_size;
    let num_blocks = if dev.is_cpu() {
        let n = (args.kv_cache_memory / per_block as u64) as usize;
        if n == 0 {
            return Err(Error::InvalidArgument {
                param: "kv_cache_memory",
                message: format!("{} bytes hold no block (one block takes {per_block} bytes)", args.kv_cache_memory),
            });
        }
        n
    } else {
        let step = crate::runner::ProfileStep {
            tokens: max_num_batched_tokens.min(max_model_len),
            rows: args.max_num_seqs.min(max_num_batched_tokens),
            block_size: args.block_size,
            kv_dtype,
        };
        let mem = crate::cuda::memory_after_profile(&dev, &*model, step)?;
        gpu_kv_blocks(mem, args.gpu_memory_utilization, per_block as u64)?
    };
    // No point in more blocks than max_num_seqs full-length sequences.
    let num_blocks = num_blocks.min(args.max_num_seqs.saturating_mul(max_model_len.div_ceil(args.block_size))).max(1);
    let scheduler = Scheduler::new(SchedulerConfig {
        max_num_seqs: args.max_num_seqs,
        max_num_batched_tokens,
        max_model_len,
        block_size: args.block_size,
        num_blocks,
        enable_prefix_caching: args.enable_prefix_caching,
        long_prefill_token_threshold: args
            .long_prefill_token_threshold
            .unwrap_or_else(|| (max_model_len / 25).max(256)),
    });
    tracing::info!(dtype = ?kv_dtype, blocks = num_blocks, block_size = args.block_size, "KV cache");
    let on_gpu = dev.is_cuda();
    let mut runner = ModelRunner::new(model, num_blocks, args.block_size, kv_dtype, dev)?;
    if args.cuda_graphs.unwrap_or(on_gpu && !args.enforce_eager) && args.max_seq_len_to_capture > 0 {
        let max_len = args.max_seq_len_to_capture.min(max_model_len);
        runner = runner.with_graphs(crate::runner::DecodeGraphs::new(max_len, args.max_num_seqs));
        tracing::info!(max_len, "decode steps in fixed shapes{}", if on_gpu { " (CUDA graphs)" } else { "" });
    }
    let vocab = runner.model().vocab_size();
    let input = InputProcessor::new(tokenizer, vocab, max_model_len, args.max_num_seqs, args.guided_decoding.clone());
    let eos = input.tokenizer().eos_token_ids().to_vec();
    let mut core = EngineCore::new(scheduler, runner, args.seed, eos);
    core.device_sampling = args.device_sampling.unwrap_or(on_gpu);
    Ok((core, input))
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

/// One line at start: which file, its format and stored precision, and how it will run.
fn log_what_is_served(
    info: &vllm_models::ModelInfo,
    files: &ModelFiles,
    args: &EngineArgs,
    dtype: DType,
    dev: &Device,
) {
    let path = &info.path;
    let stored: Vec<String> = info
        .dtypes
        .iter()
        .map(|(t, n)| format!("{t} {:.0}%", *n as f64 * 100.0 / info.parameters.max(1) as f64))
        .collect();
    let run = match (args.quantization, matches!(files, ModelFiles::Gguf(_))) {
        (Quantization::Int8, _) => "every matrix requantized to int8".to_string(),
        (Quantization::None, true) => format!("dequantized to {dtype:?}"),
        (_, true) if info.quantization.is_some() && dev.is_cuda() => {
            format!("kept in its own quantization (candle's CUDA kernels), other tensors {dtype:?}")
        }
        (_, true) if info.quantization.is_some() => format!(
            "kept in its own quantization ({} kernels), other tensors {dtype:?}",
            vllm_kernels::cpu_kernel_path()
        ),
        _ => format!("in {dtype:?}"),
    };
    let on = if dev.is_cuda() { "CUDA" } else { "CPU" };
    tracing::info!(
        "serving {} ({}, {}, {:.1}M parameters, stored {}) on the {on}: {run}",
        path.display(),
        info.format,
        info.architecture,
        info.parameters as f64 / 1e6,
        stored.join(", ")
    );
}

/// The dtype weights and activations run in. `auto` is float32 on the CPU (quantized weights
/// keep their own formats there); on a GPU it is the checkpoint's own half precision, as in
/// vLLM: float16 for a float16 checkpoint, bfloat16 for bfloat16 and float32 ones and for
/// GGUF files (whose float tensors are dequantized to it). `stored` counts parameters per
/// stored dtype (`F16`, `BF16`, `F32`, `Q4_K`, ...).
pub(crate) fn resolve_dtype(requested: ModelDtype, cuda: bool, stored: Option<&BTreeMap<String, u64>>) -> DType {
    match requested {
        ModelDtype::Float32 => DType::F32,
        ModelDtype::Float16 => DType::F16,
        ModelDtype::BFloat16 => DType::BF16,
        ModelDtype::Auto if !cuda => DType::F32,
        ModelDtype::Auto => {
            let count = |k: &str| stored.and_then(|m| m.get(k)).copied().unwrap_or(0);
            if count("F16") > count("BF16") && count("F16") >= count("F32") {
                DType::F16
            } else {
                DType::BF16
            }
        }
    }
}

/// GPU memory as the KV-cache sizing sees it, after the weights are loaded and one profiled
/// step of the largest batch has run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GpuMemory {
    /// The device's memory.
    pub total: u64,
    /// Taken now: weights, the CUDA context, other processes.
    pub in_use: u64,
    /// What the profiled step allocated on top of `in_use` at its peak (activations, logits).
    pub activation_peak: u64,
}

/// KV blocks that fit in `utilization` of the GPU once the weights and the activation peak are
/// accounted for (vLLM's sizing): `total * utilization - in_use - activation_peak` bytes.
pub(crate) fn gpu_kv_blocks(mem: GpuMemory, utilization: f64, per_block: u64) -> Result<usize> {
    if !(utilization > 0.0 && utilization <= 1.0) {
        return Err(Error::InvalidArgument {
            param: "gpu_memory_utilization",
            message: format!("{utilization} (a fraction in (0, 1])"),
        });
    }
    let budget = (mem.total as f64 * utilization) as u64;
    let needed = mem.in_use.saturating_add(mem.activation_peak);
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let blocks = budget.saturating_sub(needed) / per_block.max(1);
    if blocks == 0 {
        return Err(Error::InvalidArgument {
            param: "gpu_memory_utilization",
            message: format!(
                "{utilization}: {:.2} GiB of the GPU's {:.2} GiB leaves no room for the KV cache after {:.2} GiB in \
                 use (weights, context) and a {:.2} GiB activation peak; raise it, or lower --max-num-batched-tokens \
                 / --max-num-seqs",
                gib(budget),
                gib(mem.total),
                gib(mem.in_use),
                gib(mem.activation_peak)
            ),
        });
    }
    tracing::info!(
        "GPU memory: {:.2} GiB total, {:.2} GiB in use after loading, {:.2} GiB activation peak; KV cache {:.2} GiB \
         ({blocks} blocks) within --gpu-memory-utilization {utilization}",
        gib(mem.total),
        gib(mem.in_use),
        gib(mem.activation_peak),
        gib(blocks * per_block)
    );
    usize::try_from(blocks).map_err(|_| Error::Internal("block count overflows"))
}

enum FilesKind {
    Gguf,
    HfDir,
}

/// The device a name asks for: `cpu`, or `cuda` / `cuda:N` (a GPU, with one explicit stream
/// that loading, every step and the sampler share) when built with the `cuda` feature.
pub(crate) fn device(name: &str) -> Result<Device> {
    let ordinal = match name {
        "cpu" | "" => return Ok(Device::Cpu),
        "cuda" => 0,
        n => match n.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => i,
            _ => {
                return Err(Error::InvalidArgument {
                    param: "device",
                    message: format!("'{name}' (choose cpu, cuda or cuda:N)"),
                })
            }
        },
    };
    crate::cuda::open(ordinal)
}

impl LLMEngine {
    /// Resolves the model, loads weights and tokenizer, sizes and allocates the KV cache.
    pub fn new(args: EngineArgs) -> Result<Self> {
        let files = crate::source::resolve_with(&args.model, &args.hub())?;
        Self::from_files(args, files)
    }

    /// [`Self::new`] for a model already resolved (`args.model` only names it).
    pub fn from_files(args: EngineArgs, files: ModelFiles) -> Result<Self> {
        let (core, input) = build(args, files)?;
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
        let request_id = request_id.into();
        if self.core.contains(&request_id) {
            return Err(Error::DuplicateRequestId(request_id));
        }
        let req = self.input.process(request_id, prompt, params, &AtomicBool::new(false))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_dtype_is_float32_on_the_cpu_and_the_checkpoints_half_precision_on_a_gpu() {
        let stored = |pairs: &[(&str, u64)]| pairs.iter().map(|(k, n)| (k.to_string(), *n)).collect::<BTreeMap<_, _>>();
        let bf16 = stored(&[("BF16", 1000), ("F32", 10)]);
        let f16 = stored(&[("F16", 1000), ("F32", 10)]);
        let f32 = stored(&[("F32", 1000)]);
        let gguf = stored(&[("Q4_K", 900), ("Q6_K", 90), ("F32", 10)]);
        for m in [&bf16, &f16, &f32, &gguf] {
            assert_eq!(resolve_dtype(ModelDtype::Auto, false, Some(m)), DType::F32);
        }
        assert_eq!(resolve_dtype(ModelDtype::Auto, true, Some(&bf16)), DType::BF16);
        assert_eq!(resolve_dtype(ModelDtype::Auto, true, Some(&f16)), DType::F16);
        assert_eq!(resolve_dtype(ModelDtype::Auto, true, Some(&f32)), DType::BF16);
        assert_eq!(resolve_dtype(ModelDtype::Auto, true, Some(&gguf)), DType::BF16);
        assert_eq!(resolve_dtype(ModelDtype::Auto, true, None), DType::BF16);
        assert_eq!(resolve_dtype(ModelDtype::Float16, true, Some(&bf16)), DType::F16);
        assert_eq!(resolve_dtype(ModelDtype::Float32, true, Some(&bf16)), DType::F32);
    }

    #[test]
    fn the_gpu_cache_gets_what_the_utilization_leaves() {
        let gib = 1u64 << 30;
        // An 80 GiB GPU, 16 GiB of weights and context, a 2 GiB activation peak, 2 MiB blocks:
        // 0.9 * 80 - 18 = 54 GiB of cache.
        let mem = GpuMemory { total: 80 * gib, in_use: 16 * gib, activation_peak: 2 * gib };
        let blocks = gpu_kv_blocks(mem, 0.9, 2 << 20).unwrap();
        assert_eq!(blocks as u64, (72 * gib - 18 * gib) / (2 << 20));
        assert!(gpu_kv_blocks(mem, 0.5, 2 << 20).unwrap() < blocks);
        // Nothing left, or a nonsense fraction: a clear error naming the flag.
        let err = gpu_kv_blocks(mem, 0.2, 2 << 20).unwrap_err().to_string();
        assert!(err.contains("gpu_memory_utilization") && err.contains("no room"), "{err}");
        for bad in [0.0, -0.5, 1.5, f64::NAN] {
            assert!(gpu_kv_blocks(mem, bad, 2 << 20).is_err(), "{bad}");
        }
        // Counts near the limits neither overflow nor panic.
        let huge = GpuMemory { total: u64::MAX, in_use: u64::MAX, activation_peak: u64::MAX };
        assert!(gpu_kv_blocks(huge, 1.0, 1).is_err());
    }

    #[test]
    fn device_names() {
        assert!(matches!(device("cpu"), Ok(Device::Cpu)));
        for bad in ["tpu", "cuda:x", "cuda:", "CUDA"] {
            let err = device(bad).unwrap_err().to_string();
            assert!(err.contains("choose cpu, cuda or cuda:N"), "{bad}: {err}");
        }
        if !cfg!(feature = "cuda") {
            let err = device("cuda:1").unwrap_err().to_string();
            assert!(err.contains("no CUDA support") && err.contains("build-cuda"), "{err}");
        }
    }
}
