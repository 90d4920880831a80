//! # vllm-models
//!
//! The model zoo of vllm-rs. A model is a configuration, weights ([`Weights`]: safetensors via
//! mmap, or GGUF with quantized tensors kept quantized or dequantized) and a forward pass over
//! a flattened batch ([`StepInput`]) that writes K/V into the paged cache and returns logits
//! only for the rows that sample. Every architecture shares [`attention::PagedAttention`], and
//! every linear layer is one [`Linear`] whatever format its weight is stored in.
//!
//! The architectures are the rows of [`registry::ARCHITECTURES`]; docs/models.md holds their
//! table (`config.json` classes, GGUF names, model file, what is special), rendered by
//! [`registry::markdown_table`] and checked by a test.
//!
//! ```no_run
//! use candle_core::{DType, Device};
//! use vllm_models::{load_gguf, LoadOptions, MatrixFormat};
//!
//! let opts = LoadOptions { dtype: DType::F32, matrices: MatrixFormat::Dense };
//! let (model, weights) = load_gguf("model.gguf".as_ref(), opts, &Device::Cpu).unwrap();
//! println!("{} layers", model.num_layers());
//! # let _ = weights;
//! ```

pub mod attention;
pub mod bert;
pub mod gemma2;
mod gguf;
pub mod gpt2;
pub mod info;
mod layers;
mod linear;
pub mod llama;
pub mod lora;
pub mod opt;
pub mod quant;
pub mod registry;
pub mod validate;
mod weights;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use vllm_kernels::{AttnMetadata, AttnShape, KvCache};

pub use info::{inspect, KvLayout, ModelInfo};
pub use linear::Linear;
pub use quant::{QuantConfig, QuantMethod};
pub use weights::{gguf_name, GgufTensor, LoadOptions, MatrixFormat, Weights};

/// Model errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A file is not in the expected format.
    #[error("{0}")]
    Format(String),
    /// The checkpoint lacks a tensor (named as in the checkpoint).
    #[error("missing tensor '{0}' in the checkpoint")]
    MissingTensor(String),
    /// The configuration is invalid or incomplete.
    #[error("invalid model configuration: {0}")]
    Config(String),
    /// A configuration value no model can have, or one that disagrees with another value or
    /// with the tensors ([`validate::Summary::validate`]).
    #[error("invalid model configuration: {field} = {value}: {reason}")]
    InvalidConfig {
        /// The key, as the file spells it (`vocab_size`, `llama.context_length`).
        field: String,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An architecture we do not implement.
    #[error("unsupported architecture '{name}' (supported: {supported})")]
    UnsupportedArchitecture {
        /// The architecture named by the checkpoint.
        name: String,
        /// What we support.
        supported: String,
    },
}

/// Crate result type.
pub type Result<T> = std::result::Result<T, Error>;

/// One step's flattened batch, as the model sees it.
#[derive(Clone)]
pub struct StepInput<'a> {
    /// Token ids of every scheduled token, `[tokens]` u32.
    pub input_ids: Tensor,
    /// Their positions, `[tokens]` u32.
    pub positions: Tensor,
    /// Rows (into the tokens) that produce logits, `[rows]` u32.
    pub logits_indices: Tensor,
    /// Paged-attention metadata.
    pub attn: &'a AttnMetadata,
    /// Called before each decoder layer but the first, with that layer's index: the engine
    /// core runs other requests' short steps there while a long step is suspended (the step's
    /// state is its hidden activations; the layers already run have written their K/V).
    pub between_layers: Option<&'a dyn Fn(usize)>,
}

impl StepInput<'_> {
    /// Runs the between-layers hook before layer `layer` (not before the first).
    pub fn before_layer(&self, layer: usize) {
        if let (Some(hook), true) = (self.between_layers, layer > 0) {
            hook(layer);
        }
    }
}

impl std::fmt::Debug for StepInput<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepInput")
            .field("input_ids", &self.input_ids)
            .field("positions", &self.positions)
            .field("logits_indices", &self.logits_indices)
            .field("attn", &self.attn)
            .field("between_layers", &self.between_layers.is_some())
            .finish()
    }
}

/// What the engine needs to know of a loaded model to size its cache and read its outputs;
/// each model builds it once at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelSpec {
    /// Attention head layout (for sizing the cache).
    pub attn_shape: AttnShape,
    /// Decoder layers (one cache each).
    pub num_layers: usize,
    /// Logit rows' width.
    pub vocab_size: usize,
    /// Context length the model was trained for.
    pub max_model_len: usize,
    /// Activation dtype.
    pub dtype: DType,
}

/// A causal language model running on the paged cache.
pub trait CausalLM: Send + Sync {
    /// Runs one step; returns f32 logits `[rows, vocab]` for `input.logits_indices`.
    fn forward(&self, input: &StepInput, caches: &[KvCache]) -> Result<Tensor>;
    /// The model's shape and dtype.
    fn spec(&self) -> &ModelSpec;
    /// Attention head layout (for sizing the cache).
    fn attn_shape(&self) -> AttnShape {
        self.spec().attn_shape
    }
    /// Decoder layers (one cache each).
    fn num_layers(&self) -> usize {
        self.spec().num_layers
    }
    /// Logit rows' width.
    fn vocab_size(&self) -> usize {
        self.spec().vocab_size
    }
    /// Context length the model was trained for.
    fn max_model_len(&self) -> usize {
        self.spec().max_model_len
    }
    /// Activation dtype.
    fn dtype(&self) -> DType {
        self.spec().dtype
    }
}

/// Loads a GGUF checkpoint; returns the model and the weight handle (for its metadata). The
/// architecture is the row of [`registry::ARCHITECTURES`] whose GGUF names hold the file's
/// `general.architecture`.
///
/// llama.cpp's converter permutes the query and key rows of `llama` checkpoints (Llama,
/// Mistral, Mixtral, SmolLM) for its interleaved rotary layout; the other architectures keep
/// Hugging Face's (NeoX) layout ([`registry::GgufForm::rope`]).
///
/// The configuration is validated, and checked against the tensors' shapes, before any
/// weight is read ([`validate`]).
pub fn load_gguf(path: &Path, opts: LoadOptions, device: &Device) -> Result<(Box<dyn CausalLM>, Weights)> {
    load_gguf_with(path, opts, device, None)
}

/// [`load_gguf`], recording every linear layer in `lora` for LoRA adapters.
pub fn load_gguf_with(
    path: &Path,
    opts: LoadOptions,
    device: &Device,
    lora: Option<std::sync::Arc<lora::LoraRegistry>>,
) -> Result<(Box<dyn CausalLM>, Weights)> {
    let w = Weights::from_gguf(path, opts, device)?.with_lora(lora);
    let md = w.gguf_metadata().expect("a GGUF source has metadata");
    let arch = w.gguf_arch().unwrap_or_default();
    let Some(gguf) = registry::by_gguf_name(arch) else {
        return Err(Error::UnsupportedArchitecture { name: arch.into(), supported: registry::supported() });
    };
    let config = (gguf.config)(md)?;
    let summary = config.summary().from_gguf(arch);
    summary.validate()?;
    summary.check_tensors(&w)?;
    let model = config.load(&w, gguf.rope)?;
    Ok((model, w))
}

/// Reads a folder's `config.json` and its first `architectures` entry.
pub fn read_hf_config(dir: &Path) -> Result<(serde_json::Value, String)> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path)
        .map_err(|e| Error::Io { path: cfg_path.display().to_string(), source: e })?;
    let raw: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", cfg_path.display())))?;
    let arch = raw.get("architectures").and_then(|a| a.get(0)).and_then(|a| a.as_str()).unwrap_or_default().to_string();
    Ok((raw, arch))
}

/// Loads a Hugging Face folder (`config.json` + safetensors, single or sharded); the model
/// class comes from `config.json`'s `architectures`, looked up in [`registry::ARCHITECTURES`].
/// The configuration is validated, and checked against the tensors' shapes, before any
/// weight is read ([`validate`]).
pub fn load_hf_dir(dir: &Path, opts: LoadOptions, device: &Device) -> Result<Box<dyn CausalLM>> {
    load_hf_dir_with(dir, opts, device, None)
}

/// [`load_hf_dir`], recording every linear layer in `lora` for LoRA adapters.
pub fn load_hf_dir_with(
    dir: &Path,
    opts: LoadOptions,
    device: &Device,
    lora: Option<std::sync::Arc<lora::LoraRegistry>>,
) -> Result<Box<dyn CausalLM>> {
    let (raw, arch) = read_hf_config(dir)?;
    let Some(registry::Kind::Decoder { config, .. }) = registry::by_hf_class(&arch).map(|a| &a.kind) else {
        let supported = registry::causal_classes().collect::<Vec<_>>().join(", ");
        return Err(Error::UnsupportedArchitecture { name: arch, supported });
    };
    let quant = quant::QuantConfig::from_config(&raw)?.map(std::sync::Arc::new);
    if let Some(q) = &quant {
        if !matches!(opts.matrices, MatrixFormat::Native | MatrixFormat::Dense) {
            return Err(Error::Config(format!(
                "a {} checkpoint runs on its own quantization ({:?} asked for: leave --quantization at auto, \
                 or none to dequantize it)",
                q.method().name(),
                opts.matrices
            )));
        }
    }
    let config = config(raw)?;
    let summary = config.summary();
    summary.validate()?;
    let files = safetensors_files(dir)?;
    let w = Weights::from_safetensors(&files, opts, device)?.with_quantization(quant.clone()).with_lora(lora);
    summary.check_tensors(&w)?;
    let model = config.load(&w, attention::RopeStyle::Halves)?;
    if let Some(q) = &quant {
        q.check_ignore_matched()?;
        tracing::info!("{} checkpoint: {}", q.method().name(), q.summary());
    }
    Ok(model)
}

/// The safetensors files of a folder: the shards listed in `model.safetensors.index.json`, or
/// every `*.safetensors` file.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if let Ok(text) = std::fs::read_to_string(&index) {
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::Format(format!("{}: {e}", index.display())))?;
        let mut files: Vec<String> = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .map(|m| m.values().filter_map(|f| f.as_str().map(String::from)).collect())
            .unwrap_or_default();
        files.sort();
        files.dedup();
        // Shards are files of the folder: a name reaching elsewhere (`../x`, `/x`) is refused.
        if let Some(bad) = files.iter().find(|f| Path::new(f).file_name() != Some(std::ffi::OsStr::new(f.as_str()))) {
            return Err(Error::Format(format!("{}: shard '{bad}' is not a file name of the folder", index.display())));
        }
        if files.is_empty() {
            return Err(Error::Format(format!("{}: the weight map lists no file", index.display())));
        }
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let rd = std::fs::read_dir(dir).map_err(|e| Error::Io { path: dir.display().to_string(), source: e })?;
    let mut files: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::Format(format!("no .safetensors files in {}", dir.display())));
    }
    Ok(files)
}
