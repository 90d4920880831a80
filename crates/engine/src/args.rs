//! Engine configuration (vLLM's `EngineArgs`).

use std::str::FromStr;

use crate::Error;

/// The default model: served when no model is named.
pub const DEFAULT_MODEL: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";

/// Weight and activation precision (`--dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ModelDtype {
    /// The checkpoint's own precision where we have a kernel for it: on the CPU a bfloat16 /
    /// float16 safetensors checkpoint keeps its matrices in their stored bits on our
    /// half-precision kernel (activations float32, KV cache in the checkpoint's dtype), and
    /// other checkpoints run in float32; on a GPU the checkpoint's half precision.
    #[default]
    Auto,
    /// float32 (on the CPU, a half-precision checkpoint's matrices widened to float32 and run
    /// densely: the reference path).
    #[value(alias = "float", alias = "f32")]
    Float32,
    /// float16.
    #[value(alias = "half", alias = "f16")]
    Float16,
    /// bfloat16.
    #[value(name = "bfloat16", alias = "bf16")]
    BFloat16,
}

/// How weight matrices run (`--quantization`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Quantization {
    /// The checkpoint's own quantization (vLLM's semantics), the default: a GGUF file's
    /// quantized matrices run in their own block format on our kernels (`Q4_0`, `Q4_1` on the
    /// 4-bit kernel, `Q4_K`, `Q5_K`, `Q6_K` on the k-quant kernel, `Q8_0` on the int8 kernel;
    /// other quantized types requantized to int8 for now; float tensors stay float); on CUDA,
    /// candle's quantized matmul. Unquantized checkpoints run in `dtype`.
    #[default]
    #[value(alias = "")]
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
    /// An AWQ checkpoint (`quant_method: awq`), on our 4-bit kernel (`awq_marlin`, vLLM's
    /// GPU kernel's name, is the same here).
    #[value(alias = "awq_marlin")]
    Awq,
    /// A GPTQ checkpoint (`quant_method: gptq`), on our 4-bit or int8 kernel (`gptq_marlin`
    /// is the same here).
    #[value(alias = "gptq_marlin")]
    Gptq,
    /// A compressed-tensors checkpoint (llm-compressor's W4A16, W8A16, W8A8, FP8).
    #[value(name = "compressed-tensors", alias = "compressed_tensors")]
    CompressedTensors,
    /// An FP8 checkpoint (`quant_method: fp8`), its 8-bit floats as int8 blocks on the CPU.
    Fp8,
}

impl Quantization {
    /// The `quant_method` a checkpoint must have for this choice, when it names one.
    pub fn quant_method(self) -> Option<&'static str> {
        match self {
            Self::Awq => Some("awq"),
            Self::Gptq => Some("gptq"),
            Self::CompressedTensors => Some("compressed-tensors"),
            Self::Fp8 => Some("fp8"),
            Self::Auto | Self::None | Self::Gguf | Self::Int8 => None,
        }
    }
}

/// What the paged KV cache holds (`--kv-cache-dtype`, vLLM's flag).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum KvCacheDtype {
    /// float16 on the CPU for quantized weights (a GGUF file run on its own blocks, or
    /// `--quantization int8`: half the cache memory and attention traffic; llama.cpp's
    /// default too); a half-precision checkpoint's own dtype on its half-precision kernel;
    /// the model's dtype otherwise (float32 for the reference path).
    #[default]
    #[value(alias = "")]
    Auto,
    /// float32.
    #[value(alias = "float", alias = "fp32", alias = "f32")]
    Float32,
    /// float16 (values beyond its range saturate at 65504).
    #[value(alias = "half", alias = "fp16", alias = "f16")]
    Float16,
    /// bfloat16.
    #[value(name = "bfloat16", alias = "bf16")]
    BFloat16,
}

/// Parses one of a [`clap::ValueEnum`]'s names (case-insensitive, aliases included), or says
/// which names there are.
fn parse_choice<T: clap::ValueEnum>(param: &'static str, s: &str) -> Result<T, Error> {
    T::from_str(s, true).map_err(|_| {
        let names: Vec<String> = T::value_variants()
            .iter()
            .filter_map(|v| v.to_possible_value())
            .map(|p| p.get_name().to_string())
            .collect();
        let hint = if param == "kv_cache_dtype" && s.to_ascii_lowercase().starts_with("fp8") {
            ": fp8 caches are not supported yet"
        } else {
            ""
        };
        Error::InvalidArgument { param, message: format!("'{s}'{hint} (choose {})", names.join(", ")) }
    })
}

impl FromStr for ModelDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        parse_choice("dtype", s)
    }
}

impl FromStr for Quantization {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        parse_choice("quantization", s)
    }
}

impl FromStr for KvCacheDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        parse_choice("kv_cache_dtype", s)
    }
}

/// Everything needed to build an engine, named as vLLM's `EngineArgs`; the server flattens it
/// into its command line (each field's flag is `--` plus its name in kebab case). `Default`
/// gives vLLM's defaults and the default model: the values written on the flags below, read
/// back by parsing an empty command line, so the defaults live in one place.
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct EngineArgs {
    /// Model: a local folder, a .gguf file, or a Hugging Face id.
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Weight and activation precision (auto: the checkpoint's own precision: on the CPU a
    /// bfloat16 / float16 checkpoint's matrices on our half-precision kernel with float32
    /// activations, float32 otherwise; on a GPU the checkpoint's half precision). float32 is
    /// the reference path.
    #[arg(long, value_enum, ignore_case = true, default_value = "auto")]
    pub dtype: ModelDtype,
    /// How weight matrices run: auto (the checkpoint's own quantization on our kernels: a GGUF
    /// file's blocks, an AWQ / GPTQ / compressed-tensors / FP8 folder's groups), a method by
    /// vLLM's name (gguf, awq, gptq, compressed-tensors, fp8: checked against the
    /// checkpoint), none (dequantize to float32: the reference path), or int8 (every float
    /// matrix requantized to int8).
    #[arg(long, value_enum, ignore_case = true, default_value = "auto")]
    pub quantization: Quantization,
    /// Seed for requests that bring none.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Longest sequence (prompt + output); defaults to the model's context length.
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Most sequences per step.
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: usize,
    /// Most tokens per step (the chunked-prefill budget); defaults to
    /// `max(2048, max_num_seqs)`.
    #[arg(long)]
    pub max_num_batched_tokens: Option<usize>,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Bytes of KV cache on the CPU, e.g. 4GiB.
    #[arg(long, value_parser = parse_bytes, default_value = "4GiB")]
    pub kv_cache_memory: u64,
    /// What the KV cache holds: auto (float16 on the CPU for quantized weights, a half-precision
    /// checkpoint's own dtype on the half-precision kernel, the model's dtype otherwise),
    /// float32, float16, bfloat16.
    #[arg(long, value_enum, ignore_case = true, default_value = "auto")]
    pub kv_cache_dtype: KvCacheDtype,
    /// Reuse cached prompt prefixes (on by default; `--no-enable-prefix-caching` turns it off).
    #[arg(long = "no-enable-prefix-caching", action = clap::ArgAction::SetFalse)]
    pub enable_prefix_caching: bool,
    /// Device: cpu, or cuda / cuda:N (a build with --features cuda: `cargo xtask build-cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// (GPU) Fraction of the GPU's memory this engine may take for weights, activations and
    /// the KV cache together (vLLM's `gpu_memory_utilization`); the KV cache gets what is left
    /// after the weights and a profiled step of `max_num_batched_tokens`. No effect on the CPU
    /// (its cache is sized by `kv_cache_memory`).
    #[arg(long, default_value_t = 0.9)]
    pub gpu_memory_utilization: f64,
    /// (GPU) Run every step eagerly: no CUDA graphs for decode steps (vLLM's `enforce_eager`).
    #[arg(long)]
    pub enforce_eager: bool,
    /// (GPU) Longest context a captured decode graph covers; steps with a longer sequence run
    /// eagerly.
    #[arg(long, default_value_t = 8192)]
    pub max_seq_len_to_capture: usize,
    /// Sample on the model's device (greedy and temperature / top-k / top-p steps; only token
    /// ids come back): `None` does so on a GPU only, where it saves copying every logit row to
    /// the host; `Some(true)` also on the CPU (tests use it to run that path here).
    #[arg(skip)]
    pub device_sampling: Option<bool>,
    /// Decode steps in fixed shapes, padded to batch-size buckets (see `max_seq_len_to_capture`):
    /// `None` on a GPU unless `enforce_eager`, where each bucket is captured once as a CUDA
    /// graph and replayed; `Some(true)` also on the CPU, where the same padded steps run
    /// eagerly (tests compare them with plain steps).
    #[arg(skip)]
    pub cuda_graphs: Option<bool>,
    /// Prompts are computed at most this many tokens per step, so a request arriving during
    /// a long prefill waits one short step, not the whole prefill (vLLM's
    /// `long_prefill_token_threshold`; default: 4% of `max_model_len`, at least 256; 0: no
    /// limit).
    #[arg(long)]
    pub long_prefill_token_threshold: Option<usize>,
    /// Requests queued beyond the running batch; past this, new requests get a capacity
    /// error (a 503 with Retry-After on the server).
    #[arg(long, default_value_t = 1024)]
    pub max_waiting_requests: usize,
    /// Steps of output buffered for a request whose consumer is not reading; past this the
    /// request is aborted (its KV blocks freed).
    #[arg(long, default_value_t = 1024)]
    pub max_output_buffer_steps: usize,
    /// Guided-decoding budgets: constraint sizes, compile time and threads, cache bytes.
    #[command(flatten)]
    pub guided_decoding: vllm_sampler::GuideLimits,
    /// Serve LoRA adapters: every linear layer is recorded so adapters can be installed on it
    /// (a request names its adapter; see `--max-loras` and the server's `--lora-modules`).
    #[arg(long)]
    pub enable_lora: bool,
    /// Most distinct LoRA adapters in one step (requests of others wait their turn).
    #[arg(long, default_value_t = 1)]
    pub max_loras: usize,
    /// Largest LoRA rank an adapter may have.
    #[arg(long, default_value_t = 16)]
    pub max_lora_rank: usize,
    /// Most LoRA adapters kept loaded at once (least recently used unloaded first); defaults
    /// to --max-loras.
    #[arg(long)]
    pub max_cpu_loras: Option<usize>,
    /// The dtype adapters compute in: auto (float32 here, whatever the base's dtype), float32.
    #[arg(long, default_value = "auto", value_parser = ["auto", "float32", "float16", "bfloat16"])]
    pub lora_dtype: String,
    /// Speculative decoding, as vLLM's JSON: `{"method": "ngram", "num_speculative_tokens": 4,
    /// "prompt_lookup_max": 4}`, `{"method": "suffix"}` or `{"model": "<draft>",
    /// "num_speculative_tokens": 4}` (a smaller model with the same vocabulary drafts) (keys:
    /// method, num_speculative_tokens, prompt_lookup_min/max, model, draft_tensor_parallel_size,
    /// disable_by_batch_size, suffix_decoding_max_tree_depth/_max_spec_factor/_min_token_prob/
    /// _max_cached_requests). Outputs are the same as without it; n-gram and suffix pay off
    /// where the output repeats the input, a draft model where it predicts the target well.
    #[arg(long, value_parser = parse_speculative_config)]
    pub speculative_config: Option<crate::spec::SpeculativeConfig>,
    /// A tokenizer other than the model's: a folder with `tokenizer.json` (and
    /// `tokenizer_config.json`), that file, or a Hugging Face id (vLLM's `--tokenizer`).
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// Hugging Face Hub revision (branch, tag or commit) of the model and tokenizer.
    #[arg(long)]
    pub revision: Option<String>,
    /// Where Hub downloads go (and are looked for), instead of the Hugging Face cache.
    #[arg(long)]
    pub download_dir: Option<std::path::PathBuf>,
}

impl Default for EngineArgs {
    fn default() -> Self {
        #[derive(clap::Parser)]
        struct Defaults {
            #[command(flatten)]
            args: EngineArgs,
        }
        <Defaults as clap::Parser>::try_parse_from(["vllm-rs"])
            .map(|d| d.args)
            .unwrap_or_else(|e| unreachable!("the flags' defaults parse: {e}"))
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

pub use vllm_sampler::parse_bytes;

fn parse_speculative_config(s: &str) -> Result<crate::spec::SpeculativeConfig, String> {
    s.parse().map_err(|e: Error| e.to_string())
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
        assert!(parse_bytes("1e300GiB").is_err());
        assert_eq!("half".parse::<ModelDtype>().unwrap(), ModelDtype::Float16);
        assert!("int3".parse::<ModelDtype>().is_err());
        assert_eq!("fp16".parse::<KvCacheDtype>().unwrap(), KvCacheDtype::Float16);
        assert_eq!("bfloat16".parse::<KvCacheDtype>().unwrap(), KvCacheDtype::BFloat16);
        let e = "fp8_e4m3".parse::<KvCacheDtype>().unwrap_err().to_string();
        assert!(e.contains("fp8") && e.contains("float16"), "{e}");
        assert_eq!("BF16".parse::<ModelDtype>().unwrap(), ModelDtype::BFloat16);
        assert!("int3".parse::<Quantization>().unwrap_err().to_string().contains("auto, none, gguf, int8, awq"));
        assert_eq!("gptq_marlin".parse::<Quantization>().unwrap(), Quantization::Gptq);
        assert_eq!("compressed-tensors".parse::<Quantization>().unwrap(), Quantization::CompressedTensors);
    }

    /// The defaults written on the flags are `EngineArgs::default()` (one place for them).
    #[test]
    fn defaults_come_from_the_flags() {
        let d = EngineArgs::default();
        assert_eq!(d.model, DEFAULT_MODEL);
        assert_eq!((d.max_num_seqs, d.block_size, d.kv_cache_memory), (256, 16, 4 << 30));
        assert!(d.enable_prefix_caching);
        assert_eq!(d.guided_decoding, vllm_sampler::GuideLimits::default());
        assert_eq!(d.device, "cpu");
    }
}
