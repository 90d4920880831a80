//! Engine configuration (vLLM's `EngineArgs`).

use std::str::FromStr;

use crate::Error;

/// The default model: served when no model is named.
pub const DEFAULT_MODEL: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";

/// Weight and activation precision (`--dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ModelDtype {
    /// float32 on CPU; the checkpoint's own precision for safetensors on GPU.
    #[default]
    Auto,
    /// float32.
    Float32,
    /// float16.
    Float16,
    /// bfloat16.
    BFloat16,
}

impl FromStr for ModelDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "auto" => Self::Auto,
            "float32" | "float" | "f32" => Self::Float32,
            "float16" | "half" | "f16" => Self::Float16,
            "bfloat16" | "bf16" => Self::BFloat16,
            _ => {
                return Err(Error::InvalidArgument {
                    param: "dtype",
                    message: format!("'{s}' (choose auto, float32, float16, bfloat16)"),
                })
            }
        })
    }
}

/// How weight matrices run (`--quantization`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quantization {
    /// The checkpoint's own quantization (vLLM's semantics), the default: a GGUF file's
    /// quantized matrices run in their own block format on our kernels (`Q4_0`, `Q4_1` on the
    /// 4-bit kernel, `Q4_K`, `Q5_K`, `Q6_K` on the k-quant kernel, `Q8_0` on the int8 kernel;
    /// other quantized types requantized to int8 for now; float tensors stay float); on CUDA,
    /// candle's quantized matmul. Unquantized checkpoints run in `dtype`.
    #[default]
    Auto,
    /// Dequantize every GGUF matrix to `dtype` at load time: the float32 path that reproduces
    /// the `transformers` reference.
    None,
    /// The GGUF file's own quantization (vLLM's `--quantization gguf`): as `Auto` for GGUF
    /// files.
    Gguf,
    /// Int8 weights (per block of 32, like Q8_0; activations quantized the same way per step)
    /// for every matmul, run by our AVX-512 VNNI kernel: 3x faster decode and 2x faster
    /// batched steps than float32 on SmolLM2-135M, a quarter of the memory, at the cost of
    /// int8 rounding (greedy output checked against the float32 reference in tests).
    Int8,
}

impl FromStr for Quantization {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "auto" | "" => Self::Auto,
            "none" => Self::None,
            "gguf" => Self::Gguf,
            "int8" => Self::Int8,
            _ => {
                return Err(Error::InvalidArgument {
                    param: "quantization",
                    message: format!("'{s}' (choose auto, none, gguf, int8)"),
                })
            }
        })
    }
}

/// What the paged KV cache holds (`--kv-cache-dtype`, vLLM's flag).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvCacheDtype {
    /// float16 on the CPU for quantized weights (a GGUF file run on its own blocks, or
    /// `--quantization int8`: half the cache memory and attention traffic; llama.cpp's
    /// default too); the model's dtype otherwise (float32 for the reference path).
    #[default]
    Auto,
    /// float32.
    Float32,
    /// float16 (values beyond its range saturate at 65504).
    Float16,
    /// bfloat16.
    BFloat16,
}

impl FromStr for KvCacheDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "auto" | "" => Self::Auto,
            "float32" | "float" | "fp32" | "f32" => Self::Float32,
            "float16" | "half" | "fp16" | "f16" => Self::Float16,
            "bfloat16" | "bf16" => Self::BFloat16,
            f if f.starts_with("fp8") => {
                return Err(Error::InvalidArgument {
                    param: "kv_cache_dtype",
                    message: format!(
                        "'{s}': fp8 caches are not supported yet (choose auto, float32, float16, bfloat16)"
                    ),
                })
            }
            _ => {
                return Err(Error::InvalidArgument {
                    param: "kv_cache_dtype",
                    message: format!("'{s}' (choose auto, float32, float16, bfloat16)"),
                })
            }
        })
    }
}

/// Everything needed to build an engine. `Default` gives vLLM's defaults and the default
/// model.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineArgs {
    /// A local folder, a `.gguf` file, or a Hugging Face model id.
    pub model: String,
    /// Weight and activation precision.
    pub dtype: ModelDtype,
    /// How weight matrices run (default: the checkpoint's own quantization).
    pub quantization: Quantization,
    /// Seed for requests that bring none.
    pub seed: u64,
    /// Longest sequence (prompt + output); defaults to the model's context length.
    pub max_model_len: Option<usize>,
    /// Most sequences per step.
    pub max_num_seqs: usize,
    /// Most tokens per step (the chunked-prefill budget); defaults to
    /// `max(2048, max_num_seqs)`.
    pub max_num_batched_tokens: Option<usize>,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Bytes of KV cache (CPU).
    pub kv_cache_memory: u64,
    /// What the KV cache holds (default: float16 on the CPU for quantized weights).
    pub kv_cache_dtype: KvCacheDtype,
    /// Reuse cached prompt prefixes.
    pub enable_prefix_caching: bool,
    /// `cpu`, or `cuda` / `cuda:N` when built with the `cuda` feature.
    pub device: String,
    /// Fraction of the GPU's memory this engine may take for weights, activations and the KV
    /// cache together (vLLM's `gpu_memory_utilization`, default 0.9); the KV cache gets what is
    /// left after the weights and a profiled step of `max_num_batched_tokens`. CUDA only (the
    /// CPU cache is sized by `kv_cache_memory`).
    pub gpu_memory_utilization: f64,
    /// Run every step eagerly: no CUDA graphs for decode steps (vLLM's `enforce_eager`).
    pub enforce_eager: bool,
    /// Longest context a captured decode graph covers (vLLM's `max_seq_len_to_capture`,
    /// default 8192); steps with a longer sequence run eagerly.
    pub max_seq_len_to_capture: usize,
    /// Sample on the model's device (greedy and temperature / top-k / top-p steps; only token
    /// ids come back): `None` does so on a GPU only, where it saves copying every logit row to
    /// the host; `Some(true)` also on the CPU (tests use it to run that path here).
    pub device_sampling: Option<bool>,
    /// Decode steps in fixed shapes, padded to batch-size buckets (see `max_seq_len_to_capture`):
    /// `None` on a GPU unless `enforce_eager`, where each bucket is captured once as a CUDA
    /// graph and replayed; `Some(true)` also on the CPU, where the same padded steps run
    /// eagerly (tests compare them with plain steps).
    pub cuda_graphs: Option<bool>,
    /// Prompts are computed at most this many tokens per step, so a request arriving during
    /// a long prefill waits one short step, not the whole prefill (vLLM's
    /// `long_prefill_token_threshold`); `None`: 4% of `max_model_len`, at least 256 tokens;
    /// 0: no limit.
    pub long_prefill_token_threshold: Option<usize>,
    /// Requests queued beyond the running batch; past this, new requests get a capacity
    /// error (a 503 on the server).
    pub max_waiting_requests: usize,
    /// Steps of output buffered for a request whose consumer is not reading; past this the
    /// request is aborted (its blocks freed).
    pub max_output_buffer_steps: usize,
    /// Guided-decoding budgets: constraint sizes, compile time and threads, cache bytes.
    pub guided_decoding: vllm_sampler::GuideLimits,
    /// A tokenizer other than the model's: a folder with `tokenizer.json` (and
    /// `tokenizer_config.json`), or a Hugging Face id (vLLM's `--tokenizer`).
    pub tokenizer: Option<String>,
    /// Hugging Face Hub revision (branch, tag or commit) of the model and tokenizer.
    pub revision: Option<String>,
    /// Where Hub downloads go (and are looked for), instead of the Hugging Face cache.
    pub download_dir: Option<std::path::PathBuf>,
}

impl Default for EngineArgs {
    fn default() -> Self {
        Self {
            model: DEFAULT_MODEL.to_string(),
            dtype: ModelDtype::Auto,
            quantization: Quantization::Auto,
            seed: 0,
            max_model_len: None,
            max_num_seqs: 256,
            max_num_batched_tokens: None,
            block_size: 16,
            kv_cache_memory: 4 << 30,
            kv_cache_dtype: KvCacheDtype::Auto,
            enable_prefix_caching: true,
            device: "cpu".to_string(),
            gpu_memory_utilization: 0.9,
            enforce_eager: false,
            max_seq_len_to_capture: 8192,
            device_sampling: None,
            cuda_graphs: None,
            long_prefill_token_threshold: None,
            max_waiting_requests: 1024,
            max_output_buffer_steps: 1024,
            guided_decoding: vllm_sampler::GuideLimits::default(),
            tokenizer: None,
            revision: None,
            download_dir: None,
        }
    }
}

impl EngineArgs {
    /// Default args for a given model.
    pub fn new(model: impl Into<String>) -> Self {
        Self { model: model.into(), ..Self::default() }
    }

    /// Where Hub files come from.
    pub fn hub(&self) -> crate::source::HubOptions {
        crate::source::HubOptions { revision: self.revision.clone(), download_dir: self.download_dir.clone() }
    }
}

/// Parses a byte size such as `4GiB`, `512MiB`, `2G`, `1000000`.
pub fn parse_bytes(s: &str) -> Result<u64, Error> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || Error::InvalidArgument { param: "kv_cache_memory", message: format!("'{s}' is not a size like 4GiB") };
    let n: f64 = num.parse().map_err(|_| bad())?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(bad()),
    };
    Ok((n * mult) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("4GiB").unwrap(), 4 << 30);
        assert_eq!(parse_bytes("512 MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("1000").unwrap(), 1000);
        assert!(parse_bytes("lots").is_err());
        assert_eq!("half".parse::<ModelDtype>().unwrap(), ModelDtype::Float16);
        assert!("int3".parse::<ModelDtype>().is_err());
        assert_eq!("fp16".parse::<KvCacheDtype>().unwrap(), KvCacheDtype::Float16);
        assert_eq!("bfloat16".parse::<KvCacheDtype>().unwrap(), KvCacheDtype::BFloat16);
        let e = "fp8_e4m3".parse::<KvCacheDtype>().unwrap_err().to_string();
        assert!(e.contains("fp8"), "{e}");
    }
}
