//! Weight sources: safetensors (mmap) and GGUF (quantized tensors kept quantized, or
//! dequantized to a float dtype), behind one path-based accessor.
//!
//! Model files ask for tensors by their Hugging Face checkpoint names
//! (`model.layers.0.self_attn.q_proj.weight`); a GGUF source maps those names to llama.cpp's
//! (`blk.0.attn_q.weight`), so one model file serves both formats.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::linear::Linear;
use crate::{Error, Result};

enum Source {
    Safetensors(MmapedSafetensors),
    Gguf {
        content: gguf_file::Content,
        reader: Mutex<BufReader<File>>,
        path: PathBuf,
        arch: String,
        /// The architecture's tensor-name map (none for an architecture we do not read).
        tensors: fn(&str) -> Option<GgufTensor>,
    },
}

/// How weights are materialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// Dtype of dense weights and activations.
    pub dtype: DType,
    /// The form linear layers' matrices take.
    pub matrices: MatrixFormat,
}

/// The form a checkpoint's matrices (linear layers' weights) are held in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatrixFormat {
    /// Float matrices in the load dtype, GGUF-quantized ones dequantized (the reference path).
    Dense,
    /// Every matrix quantized to int8 (per block of 32, like `Q8_0`), every matmul on
    /// our int8 kernel ([`vllm_kernels::int8`]); the float copies are dropped. CPU only.
    Int8,
    /// Every matrix in the checkpoint's own precision on our kernels. GGUF-quantized matrices
    /// in their own block format: `Q4_0` and `Q4_1` on [`vllm_kernels::q4`], k-quants on
    /// [`vllm_kernels::kquant`], `Q8_0` on [`vllm_kernels::int8`] (repacked, not
    /// requantized); other quantized types are requantized to int8 for now. A safetensors
    /// checkpoint's bfloat16 / float16 matrices in their stored bits on
    /// [`vllm_kernels::half`] (float32 activations); other float tensors (GGUF's, float32
    /// ones) stay float in the load dtype. CPU only.
    Native,
    /// GGUF-quantized matrices kept quantized on candle's quantized matmul (what CUDA runs).
    CandleQuantized,
}

impl LoadOptions {
    /// Float32 weights, dequantized (the reference path).
    pub fn float32() -> Self {
        Self { dtype: DType::F32, matrices: MatrixFormat::Dense }
    }
}

/// A handle on a checkpoint with a name prefix, like candle's `VarBuilder`.
#[derive(Clone)]
pub struct Weights {
    src: Arc<Source>,
    prefix: String,
    opts: LoadOptions,
    device: Device,
    /// A quantized safetensors checkpoint's `quantization_config`.
    quant: Option<Arc<crate::quant::QuantConfig>>,
    /// Where the layers are recorded for LoRA adapters (a model loaded for them).
    lora: Option<Arc<crate::lora::LoraRegistry>>,
}

/// Where a Hugging Face tensor lives in a GGUF file: llama.cpp's name, and for a mixture of
/// experts' expert matrices, the expert's index in the stacked `[experts, rows, cols]` tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTensor {
    /// llama.cpp's tensor name (`blk.0.attn_q.weight`).
    pub name: String,
    /// The expert, for a slice of a stacked expert tensor (`blk.0.ffn_up_exps.weight`).
    pub expert: Option<usize>,
}

/// Maps a Hugging Face tensor name to llama.cpp's GGUF name for a GGUF architecture
/// (`general.architecture`), as llama.cpp's converter writes them: the map of the
/// architecture's row in [`crate::registry::ARCHITECTURES`]; `None` for an architecture we do
/// not read.
pub fn gguf_name(arch: &str, hf: &str) -> Option<GgufTensor> {
    crate::registry::by_gguf_name(arch).and_then(|g| (g.tensors)(hf))
}

/// The Llama family's GGUF names (llama, qwen2, qwen3, qwen3moe, phi3).
pub(crate) fn llama_tensor(hf: &str) -> Option<GgufTensor> {
    llama_family_tensor(hf, false)
}

/// Gemma 2 and 3's GGUF names: the Llama family's, with Gemma's extra norms.
pub(crate) fn gemma_tensor(hf: &str) -> Option<GgufTensor> {
    llama_family_tensor(hf, true)
}

fn llama_family_tensor(hf: &str, gemma: bool) -> Option<GgufTensor> {
    let plain = |n: &str| Some(GgufTensor { name: n.to_string(), expert: None });
    match hf {
        "model.embed_tokens.weight" => return plain("token_embd.weight"),
        "model.norm.weight" => return plain("output_norm.weight"),
        "lm_head.weight" => return plain("output.weight"),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, name) = rest.split_once('.')?;
    let blk = |n: &str| Some(GgufTensor { name: format!("blk.{layer}.{n}"), expert: None });
    // Experts: `block_sparse_moe.experts.E.w1` (Mixtral), `mlp.experts.E.gate_proj` (Qwen MoE).
    let experts = name.strip_prefix("block_sparse_moe.experts.").or_else(|| name.strip_prefix("mlp.experts."));
    if let Some(e) = experts {
        let (expert, part) = e.split_once('.')?;
        let stacked = match part {
            "w1.weight" | "gate_proj.weight" => "ffn_gate_exps.weight",
            "w2.weight" | "down_proj.weight" => "ffn_down_exps.weight",
            "w3.weight" | "up_proj.weight" => "ffn_up_exps.weight",
            _ => return None,
        };
        return Some(GgufTensor { name: format!("blk.{layer}.{stacked}"), expert: Some(expert.parse().ok()?) });
    }
    let (base, suffix) = name.rsplit_once('.')?;
    let mapped = match base {
        "input_layernorm" => "attn_norm",
        // Gemma normalizes the attention output; the others the MLP input.
        "post_attention_layernorm" if gemma => "post_attention_norm",
        "post_attention_layernorm" => "ffn_norm",
        "pre_feedforward_layernorm" => "ffn_norm",
        "post_feedforward_layernorm" => "post_ffw_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.qkv_proj" => "attn_qkv",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        // Phi-3's fused gate/up projection is llama.cpp's `ffn_up`, twice as tall.
        "mlp.gate_up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "mlp.gate" | "block_sparse_moe.gate" => "ffn_gate_inp",
        _ => return None,
    };
    blk(&format!("{mapped}.{suffix}"))
}

/// GPT-2's GGUF names (with or without the `transformer.` prefix).
pub(crate) fn gpt2_tensor(hf: &str) -> Option<GgufTensor> {
    let hf = hf.strip_prefix("transformer.").unwrap_or(hf);
    let plain = |n: String| Some(GgufTensor { name: n, expert: None });
    let (base, suffix) = hf.rsplit_once('.')?;
    match base {
        "wte" => return plain(format!("token_embd.{suffix}")),
        "wpe" => return plain(format!("position_embd.{suffix}")),
        "ln_f" => return plain(format!("output_norm.{suffix}")),
        "lm_head" => return plain(format!("output.{suffix}")),
        _ => {}
    }
    let (layer, name) = base.strip_prefix("h.")?.split_once('.')?;
    let mapped = match name {
        "ln_1" => "attn_norm",
        "attn.c_attn" => "attn_qkv",
        "attn.c_proj" => "attn_output",
        "ln_2" => "ffn_norm",
        "mlp.c_fc" => "ffn_up",
        "mlp.c_proj" => "ffn_down",
        _ => return None,
    };
    plain(format!("blk.{layer}.{mapped}.{suffix}"))
}

/// The tensor-name map of a GGUF architecture we do not read: no tensor.
fn no_tensors(_: &str) -> Option<GgufTensor> {
    None
}

impl Weights {
    /// Memory-maps safetensors files (one, or the shards of a sharded checkpoint).
    pub fn from_safetensors(files: &[PathBuf], opts: LoadOptions, device: &Device) -> Result<Self> {
        // SAFETY: the files are mapped read-only; like every mmap-based loader (candle,
        // safetensors, PyTorch) we rely on them not being truncated while the model lives.
        #[allow(unsafe_code)]
        let st = unsafe { MmapedSafetensors::multi(files)? };
        Ok(Self {
            src: Arc::new(Source::Safetensors(st)),
            prefix: String::new(),
            opts,
            device: device.clone(),
            quant: None,
            lora: None,
        })
    }

    /// The handle with a quantized checkpoint's configuration: [`Self::linear`] repacks the
    /// layers it covers (see [`crate::quant`]).
    pub fn with_quantization(self, quant: Option<Arc<crate::quant::QuantConfig>>) -> Self {
        Self { quant, ..self }
    }

    /// The handle recording every linear layer it builds in `registry`, so LoRA adapters can
    /// be installed on them.
    pub fn with_lora(self, registry: Option<Arc<crate::lora::LoraRegistry>>) -> Self {
        Self { lora: registry, ..self }
    }

    /// The quantized checkpoint's configuration, if any.
    pub fn quantization(&self) -> Option<&crate::quant::QuantConfig> {
        self.quant.as_deref()
    }

    /// Opens a GGUF file (metadata is read now, tensors on demand). Every tensor's size is
    /// checked to lie inside the file first (`gguf.rs`).
    pub fn from_gguf(path: &Path, opts: LoadOptions, device: &Device) -> Result<Self> {
        let crate::gguf::GgufFile { content, reader } = crate::gguf::open(path)?;
        let arch = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_else(|| "llama".into());
        let tensors = crate::registry::by_gguf_name(&arch).map_or(no_tensors as fn(&str) -> _, |g| g.tensors);
        let src = Source::Gguf { content, reader: Mutex::new(reader), path: path.to_path_buf(), arch, tensors };
        Ok(Self { src: Arc::new(src), prefix: String::new(), opts, device: device.clone(), quant: None, lora: None })
    }

    /// GGUF metadata (empty for safetensors).
    pub fn gguf_metadata(&self) -> Option<&HashMap<String, gguf_file::Value>> {
        match &*self.src {
            Source::Gguf { content, .. } => Some(&content.metadata),
            Source::Safetensors(_) => None,
        }
    }

    /// The load options.
    pub fn options(&self) -> LoadOptions {
        self.opts
    }

    /// The device tensors are loaded on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A handle whose names are prefixed with `name.`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() { name.to_string() } else { format!("{}.{name}", self.prefix) };
        Self { prefix, ..self.clone() }
    }

    fn full(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// The GGUF architecture (`general.architecture`); `None` for safetensors.
    pub fn gguf_arch(&self) -> Option<&str> {
        match &*self.src {
            Source::Gguf { arch, .. } => Some(arch),
            Source::Safetensors(_) => None,
        }
    }

    fn qtensor(&self, hf: &str) -> Result<Option<QTensor>> {
        let Source::Gguf { content, reader, path, tensors, .. } = &*self.src else {
            return Ok(None);
        };
        let Some(GgufTensor { name, expert }) = tensors(hf) else {
            return Ok(None);
        };
        let Some(info) = content.tensor_infos.get(&name) else {
            return Ok(None);
        };
        let mut r = reader.lock().map_err(|_| Error::Format("GGUF reader poisoned".into()))?;
        let bad = |e: candle_core::Error| Error::Format(format!("{}: reading {name}: {e}", path.display()));
        let Some(e) = expert else {
            return content.tensor(&mut *r, &name, &self.device).map(Some).map_err(bad);
        };
        // One expert's `[rows, cols]` slice of the stacked tensor: its bytes alone are read.
        let &[experts, rows, cols] = info.shape.dims() else {
            return Err(Error::Format(format!("{}: {name} is not a stacked expert tensor", path.display())));
        };
        if e >= experts {
            return Err(Error::Format(format!("{}: {name} has {experts} experts, not {}", path.display(), e + 1)));
        }
        let dtype = info.ggml_dtype;
        // (The whole stacked tensor was checked to lie inside the file, in whole blocks: one
        // expert's slice is smaller.)
        let bytes = rows * cols / dtype.block_size() * dtype.type_size();
        let start = content.tensor_data_offset + info.offset + (e * bytes) as u64;
        let mut raw = vec![0u8; bytes];
        let io = |source| Error::Io { path: path.display().to_string(), source };
        r.seek(SeekFrom::Start(start)).map_err(io)?;
        r.read_exact(&mut raw).map_err(io)?;
        Ok(Some(qtensor_from_ggml(dtype, &raw, vec![rows, cols], &self.device).map_err(bad)?))
    }

    /// The shape of tensor `name` (under the prefix) from the file's headers, without reading
    /// it; `None` if absent (or one expert's slice of a stacked GGUF tensor).
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let full = self.full(name);
        match &*self.src {
            Source::Safetensors(st) => st.get(&full).ok().map(|v| v.shape().to_vec()),
            Source::Gguf { content, tensors, .. } => {
                let t = tensors(&full).filter(|t| t.expert.is_none())?;
                content.tensor_infos.get(&t.name).map(|i| i.shape.dims().to_vec())
            }
        }
    }

    /// The name tensor `name` (under the prefix) has in the file: llama.cpp's in a GGUF file.
    pub fn stored_name(&self, name: &str) -> String {
        let full = self.full(name);
        match &*self.src {
            Source::Gguf { tensors, .. } => tensors(&full).map_or(full, |t| t.name),
            Source::Safetensors(_) => full,
        }
    }

    /// Whether the checkpoint has tensor `name` (under the prefix).
    pub fn contains(&self, name: &str) -> bool {
        let full = self.full(name);
        match &*self.src {
            Source::Safetensors(st) => st.get(&full).is_ok(),
            Source::Gguf { content, tensors, .. } => {
                tensors(&full).is_some_and(|t| content.tensor_infos.contains_key(&t.name))
            }
        }
    }

    /// A dense tensor in the load dtype.
    pub fn get(&self, name: &str) -> Result<Tensor> {
        Ok(self.get_raw(name)?.to_dtype(self.opts.dtype)?)
    }

    /// A tensor in its stored dtype (GGUF tensors dequantized to float32).
    fn get_raw(&self, name: &str) -> Result<Tensor> {
        let full = self.full(name);
        let t = match &*self.src {
            Source::Safetensors(st) => {
                let view = st.get(&full).map_err(|_| Error::MissingTensor(full.clone()))?;
                // Integer or 8-bit float storage is a quantized checkpoint's: read as plain
                // floats it would run without its scales (garbage), so it is refused.
                use safetensors::Dtype as D;
                if !matches!(view.dtype(), D::F32 | D::F16 | D::BF16 | D::F64) {
                    return Err(Error::Format(format!(
                        "{full} is stored as {:?}, not as floats: a quantized checkpoint needs its \
                         quantization_config (with its scales) in config.json",
                        view.dtype()
                    )));
                }
                st.load(&full, &self.device).map_err(|_| Error::MissingTensor(full.clone()))?
            }
            Source::Gguf { .. } => {
                self.qtensor(&full)?.ok_or_else(|| Error::MissingTensor(full.clone()))?.dequantize(&self.device)?
            }
        };
        Ok(t)
    }

    /// A linear layer `name.weight` (+ `name.bias` if present), recorded for LoRA adapters
    /// when the model is loaded for them.
    pub fn linear(&self, name: &str) -> Result<Linear> {
        let linear = self.linear_weights(name)?;
        self.recorded(name, linear)
    }

    /// [`Self::linear_from`] for layer `name` (a weight the model file prepared, such as a
    /// transposed `Conv1D`), recorded for LoRA adapters like [`Self::linear`].
    pub fn linear_from_named(&self, name: &str, weight: Tensor, bias: Option<Tensor>) -> Result<Linear> {
        let linear = self.linear_from(weight, bias)?;
        self.recorded(name, linear)
    }

    /// This handle without LoRA recording (a matrix that is not a layer of its own name, such
    /// as a tied embedding read as the output head).
    pub(crate) fn without_lora(&self) -> Self {
        Self { lora: None, ..self.clone() }
    }

    /// The adapter slots of embedding `name` (`[vocab, hidden]`), when the model is loaded for
    /// LoRA adapters; the model adds its rows' adapters after the lookup
    /// ([`crate::lora::add_embedding_adapters`]).
    pub(crate) fn embedding_lora(
        &self,
        name: &str,
        vocab: usize,
        hidden: usize,
    ) -> Option<Arc<crate::lora::LoraSlots>> {
        self.lora.as_ref().map(|r| r.embedding(&self.full(name), vocab, hidden))
    }

    /// Records checkpoint layer `name` for LoRA adapters without building it: a layer the
    /// model never runs (BERT's pooler, which sentence-transformers' pooling skips), so an
    /// adapter that targets it too (PEFT's `dense` matches it) installs, and changes nothing
    /// there, as in the reference. Nothing when the checkpoint has no such matrix.
    pub(crate) fn record_unused(&self, name: &str) {
        if let (Some(registry), Some(&[out, inp])) = (&self.lora, self.shape(&format!("{name}.weight")).as_deref()) {
            registry.layer(&self.full(name), out, inp, None);
        }
    }

    /// `linear`, recorded as layer `name` when the model is loaded for LoRA adapters (also a
    /// matrix read under another name, such as a tied output head PEFT calls `lm_head`).
    pub(crate) fn recorded(&self, name: &str, linear: Linear) -> Result<Linear> {
        Ok(match &self.lora {
            Some(registry) => {
                let (full, out, inp) = (self.full(name), linear.out_features()?, linear.in_features()?);
                let perm = self.gguf_row_permutation(&full, out);
                linear.with_lora(registry.layer(&full, out, inp, perm))
            }
            None => linear,
        })
    }

    /// How a GGUF file orders a layer's output rows, when not as the Hugging Face checkpoint
    /// does: llama.cpp's converter permutes a `llama` model's query and key rows for
    /// interleaved rotary (per head, row `2b + a` of the file is row `a d/2 + b` of the
    /// checkpoint). Row `g` of the layer is checkpoint row `perm[g]`.
    fn gguf_row_permutation(&self, module: &str, out: usize) -> Option<Vec<u32>> {
        let Source::Gguf { content, arch, .. } = &*self.src else { return None };
        if crate::registry::by_gguf_name(arch)?.rope != crate::attention::RopeStyle::Interleaved {
            return None;
        }
        let key = if module.ends_with("self_attn.q_proj") {
            "attention.head_count"
        } else if module.ends_with("self_attn.k_proj") {
            "attention.head_count_kv"
        } else {
            return None;
        };
        let heads = content.metadata.get(&format!("{arch}.{key}")).and_then(|v| v.to_u32().ok())? as usize;
        let hd = out.checked_div(heads).filter(|&d| d > 0 && d % 2 == 0 && d * heads == out)?;
        Some(
            (0..out)
                .map(|g| {
                    let (h, w) = (g / hd, g % hd);
                    (h * hd + (w % 2) * (hd / 2) + w / 2) as u32
                })
                .collect(),
        )
    }

    /// The linear layer `name` in the format the load options and the checkpoint ask for.
    fn linear_weights(&self, name: &str) -> Result<Linear> {
        let w = format!("{name}.weight");
        let bias = if self.contains(&format!("{name}.bias")) { Some(self.get(&format!("{name}.bias"))?) } else { None };
        if let (Some(q), Source::Safetensors(st)) = (&self.quant, &*self.src) {
            // A quantized checkpoint's layer on our kernels, or dequantized for the reference
            // path (`MatrixFormat::Dense`); other formats are refused by the engine.
            let dense = self.opts.matrices == MatrixFormat::Dense;
            if let Some(l) = q.load_linear(st, &self.full(name), bias.clone(), dense, &self.device)? {
                return Ok(l);
            }
        }
        if self.opts.matrices == MatrixFormat::Native && self.device.is_cpu() {
            if let Some(l) = self.half_linear(&w, &bias)? {
                return Ok(l);
            }
            if let Some(q) = self.qtensor(&self.full(&w))? {
                if let Some(l) = Linear::native(&q, bias.clone())? {
                    return Ok(l);
                }
                let dense = q.dequantize(&self.device)?;
                if matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
                    return self.linear_from(dense, bias);
                }
                // A quantized type without a kernel of its own yet: int8 (8.5 bits per weight).
                if let Some(l) = Linear::int8(&dense, bias.clone())? {
                    return Ok(l);
                }
                return self.linear_from(dense, bias);
            }
        }
        if self.opts.matrices == MatrixFormat::CandleQuantized {
            if let Some(q) = self.qtensor(&self.full(&w))? {
                if bias.is_none() {
                    return Linear::candle_quantized(q);
                }
            }
        }
        self.linear_from(self.get_raw(&w)?, bias)
    }

    /// A safetensors matrix stored as bfloat16 or float16, in its stored bits on the
    /// half-precision kernel; `None` for any other tensor (or a width the kernel does not take).
    fn half_linear(&self, name: &str, bias: &Option<Tensor>) -> Result<Option<Linear>> {
        use vllm_kernels::half::{HalfFormat, HalfMatrix};
        let Source::Safetensors(st) = &*self.src else { return Ok(None) };
        let full = self.full(name);
        let view = st.get(&full).map_err(|_| Error::MissingTensor(full.clone()))?;
        let format = match view.dtype() {
            safetensors::Dtype::BF16 => HalfFormat::BF16,
            safetensors::Dtype::F16 => HalfFormat::F16,
            _ => return Ok(None),
        };
        let &[rows, cols] = view.shape() else { return Ok(None) };
        Ok(HalfMatrix::from_le_bytes(format, view.data(), rows, cols).map(|m| Linear::half(m, bias.clone())))
    }

    /// A linear layer over an already loaded `[out, in]` weight (e.g. tied embeddings), in the
    /// form the load options ask for (int8 or dense).
    pub fn linear_from(&self, weight: Tensor, bias: Option<Tensor>) -> Result<Linear> {
        if self.opts.matrices == MatrixFormat::Int8 {
            if let Some(l) = Linear::int8(&weight, bias.clone())? {
                return Ok(l);
            }
        }
        Linear::dense(weight.to_dtype(self.opts.dtype)?, bias)
    }
}
