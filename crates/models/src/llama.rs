//! Llama architecture and the family built on it: Llama 2/3, SmolLM, Mistral, Qwen2, Qwen3,
//! Phi-3.
//!
//! Reference: Hugging Face `transformers/models/llama/modeling_llama.py`. RMSNorm, rotary
//! embeddings (theta from the config, Llama 3's frequency scaling), grouped-query attention,
//! SwiGLU MLP, optionally tied embeddings. The relatives differ only in details this file
//! reads from the checkpoint:
//! - Mistral: a sliding attention window (`sliding_window`);
//! - Qwen2: biases on the Q/K/V projections (loaded whenever the checkpoint has them), and a
//!   window only with `use_sliding_window`;
//! - Qwen3: RMSNorm of each query and key head before the rotation (`q_norm`, `k_norm`);
//! - Phi-3: fused `qkv_proj` and `gate_up_proj` weights, split after the product.
//!
//! Loads from a Hugging Face folder (`config.json` + safetensors) or a GGUF file (metadata
//! `llama.*`, Q/K rows in llama.cpp's interleaved rotary order).

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use candle_core::{DType, Tensor};
use rayon::prelude::*;
use serde::Deserialize;
use vllm_kernels::{AttnParams, AttnShape, KvCache};

use crate::attention::{PagedAttention, RopeStyle, Rotary};
use crate::layers::check_caches;
use crate::weights::{Linear, Weights};
use crate::{CausalLM, Error, Result, StepInput};

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f32 {
    10_000.0
}
fn default_max_pos() -> usize {
    4096
}

/// `config.json` of a Llama-family checkpoint.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct LlamaConfig {
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (defaults to the query heads).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Head size (defaults to hidden / heads).
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// Rotary base.
    #[serde(default = "default_theta")]
    pub rope_theta: f32,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Context length.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Output projection shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Rotary parameters as transformers 5 writes them (`rope_theta`, `rope_type`, ...).
    #[serde(default, alias = "rope_scaling")]
    pub rope_parameters: Option<RopeParameters>,
    /// Attention window in tokens (Mistral, Qwen2 with `use_sliding_window`).
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Qwen2/Qwen3: whether `sliding_window` is used at all.
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    /// Per-layer attention kind (`full_attention` / `sliding_attention`).
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
}

/// `rope_parameters` (or the older `rope_scaling`) of a config.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct RopeParameters {
    /// Rotary base (transformers 5 moved it here from the top level).
    #[serde(default)]
    pub rope_theta: Option<f32>,
    /// `default`, or `llama3` (Llama 3.1's frequency scaling); others are rejected.
    #[serde(default, alias = "type")]
    pub rope_type: Option<String>,
    /// Llama 3 scaling: the context extension factor.
    #[serde(default)]
    pub factor: Option<f32>,
    /// Llama 3 scaling: wavelengths above `original / low_freq_factor` are scaled fully.
    #[serde(default)]
    pub low_freq_factor: Option<f32>,
    /// Llama 3 scaling: wavelengths below `original / high_freq_factor` are kept.
    #[serde(default)]
    pub high_freq_factor: Option<f32>,
    /// Llama 3 scaling: the pre-training context length.
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
    /// Fraction of each head that is rotated (Phi); only 1.0 is supported.
    #[serde(default)]
    pub partial_rotary_factor: Option<f32>,
}

impl LlamaConfig {
    /// Key/value heads (all heads without grouped-query attention).
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Head size (`head_dim`, else width over heads).
    pub fn head_size(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// The attention head layout (sizes the KV cache).
    pub fn attn_shape(&self) -> AttnShape {
        AttnShape { num_heads: self.num_attention_heads, num_kv_heads: self.kv_heads(), head_dim: self.head_size() }
    }

    /// Parses a Hugging Face `config.json`, folding transformers 5's `rope_parameters` in.
    pub fn from_hf(raw: serde_json::Value) -> Result<Self> {
        let top_theta = raw.get("rope_theta").is_some();
        let mut cfg: Self = serde_json::from_value(raw).map_err(|e| Error::Config(e.to_string()))?;
        if let Some(rp) = &cfg.rope_parameters {
            if let (false, Some(t)) = (top_theta, rp.rope_theta) {
                cfg.rope_theta = t;
            }
            match rp.rope_type.as_deref() {
                None | Some("default") | Some("llama3") => {}
                Some(other) => {
                    return Err(Error::Config(format!("rope type '{other}' is not supported (default, llama3)")))
                }
            }
            if rp.partial_rotary_factor.is_some_and(|f| f != 1.0) {
                return Err(Error::Config("partial_rotary_factor other than 1.0 is not supported".into()));
            }
        }
        Ok(cfg)
    }

    /// The attention window of layer `i`, if it has one.
    pub fn window(&self, i: usize) -> Option<usize> {
        let w = self.sliding_window?;
        match &self.layer_types {
            Some(types) => (types.get(i).map(String::as_str) == Some("sliding_attention")).then_some(w),
            None if self.use_sliding_window == Some(false) => None,
            None => Some(w),
        }
    }

    /// Rotary inverse frequencies, with Llama 3's scaling when the config asks for it.
    pub fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_size();
        let base: Vec<f32> = (0..d / 2).map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f32 / d as f32)).collect();
        let Some(rp) = self.rope_parameters.as_ref().filter(|r| r.rope_type.as_deref() == Some("llama3")) else {
            return base;
        };
        let factor = rp.factor.unwrap_or(8.0);
        let (low, high) = (rp.low_freq_factor.unwrap_or(1.0), rp.high_freq_factor.unwrap_or(4.0));
        let old = rp.original_max_position_embeddings.unwrap_or(8192) as f32;
        let (low_wavelen, high_wavelen) = (old / low, old / high);
        base.into_iter()
            .map(|f| {
                let wavelen = 2.0 * std::f32::consts::PI / f;
                if wavelen < high_wavelen {
                    f
                } else if wavelen > low_wavelen {
                    f / factor
                } else {
                    let smooth = (old / wavelen - low) / (high - low);
                    (1.0 - smooth) * f / factor + smooth * f
                }
            })
            .collect()
    }

    /// Reads the configuration from GGUF metadata (`{arch}.*` keys).
    pub fn from_gguf(md: &HashMap<String, Value>) -> Result<Self> {
        let arch =
            md.get("general.architecture").and_then(|v| v.to_string().ok()).cloned().unwrap_or_else(|| "llama".into());
        let key = |k: &str| format!("{arch}.{k}");
        let req = |k: &str| -> Result<u32> {
            md.get(&key(k))
                .and_then(|v| v.to_u32().ok())
                .ok_or_else(|| Error::Config(format!("GGUF metadata lacks {}", key(k))))
        };
        let opt_f32 = |k: &str| md.get(&key(k)).and_then(|v| v.to_f32().ok());
        let hidden = req("embedding_length")? as usize;
        let heads = req("attention.head_count")? as usize;
        let vocab = match md.get(&key("vocab_size")).and_then(|v| v.to_u32().ok()) {
            Some(v) => v as usize,
            None => md.get("tokenizer.ggml.tokens").and_then(|v| v.to_vec().ok()).map(|v| v.len()).unwrap_or(0),
        };
        Ok(Self {
            hidden_size: hidden,
            intermediate_size: req("feed_forward_length")? as usize,
            num_hidden_layers: req("block_count")? as usize,
            num_attention_heads: heads,
            num_key_value_heads: md
                .get(&key("attention.head_count_kv"))
                .and_then(|v| v.to_u32().ok())
                .map(|v| v as usize),
            head_dim: md.get(&key("rope.dimension_count")).and_then(|v| v.to_u32().ok()).map(|v| v as usize),
            rms_norm_eps: opt_f32("attention.layer_norm_rms_epsilon").map_or(1e-5, |v| v as f64),
            rope_theta: opt_f32("rope.freq_base").unwrap_or(10_000.0),
            vocab_size: vocab,
            max_position_embeddings: req("context_length")? as usize,
            tie_word_embeddings: false,
            rope_parameters: None,
            sliding_window: md.get(&key("attention.sliding_window")).and_then(|v| v.to_u32().ok()).map(|v| v as usize),
            use_sliding_window: None,
            layer_types: None,
        })
    }
}

/// Projections of one input (Q/K/V, gate/up): separate layers, or one fused int8 layer whose
/// output is split (one product and one activation quantization instead of several).
struct Projections {
    layers: Vec<Linear>,
    /// Output widths of the parts when fused.
    split: Vec<usize>,
}

impl Projections {
    fn new(parts: Vec<Linear>) -> Self {
        let refs: Vec<&Linear> = parts.iter().collect();
        match Linear::fuse(&refs) {
            Some((fused, split)) => Self { layers: vec![fused], split },
            None => Self { layers: parts, split: Vec::new() },
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        if self.split.is_empty() {
            return self.layers.iter().map(|l| l.forward(x)).collect();
        }
        let y = self.layers[0].forward(x)?;
        let mut off = 0;
        let mut out = Vec::with_capacity(self.split.len());
        for &w in &self.split {
            out.push(y.narrow(1, off, w)?.contiguous()?);
            off += w;
        }
        Ok(out)
    }
}

struct Layer {
    input_norm: Tensor,
    post_norm: Tensor,
    qkv: Projections,
    /// Qwen3's per-head RMSNorm of queries and keys.
    qk_norm: Option<(Tensor, Tensor)>,
    o: Linear,
    gate_up: Projections,
    down: Linear,
    attn: PagedAttention,
}

impl Layer {
    fn load(w: &Weights, cfg: &LlamaConfig, shape: AttnShape, index: usize) -> Result<Self> {
        let a = w.pp("self_attn");
        let m = w.pp("mlp");
        let (q, kv) = (shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim);
        // Phi-3 stores Q/K/V and gate/up fused; split after the product.
        let qkv = if a.contains("qkv_proj.weight") {
            Projections { layers: vec![a.linear("qkv_proj")?], split: vec![q, kv, kv] }
        } else {
            Projections::new(vec![a.linear("q_proj")?, a.linear("k_proj")?, a.linear("v_proj")?])
        };
        let gate_up = if m.contains("gate_up_proj.weight") {
            Projections { layers: vec![m.linear("gate_up_proj")?], split: vec![cfg.intermediate_size; 2] }
        } else {
            Projections::new(vec![m.linear("gate_proj")?, m.linear("up_proj")?])
        };
        let qk_norm =
            if a.contains("q_norm.weight") { Some((a.get("q_norm.weight")?, a.get("k_norm.weight")?)) } else { None };
        let params =
            AttnParams { sliding_window: cfg.window(index), ..AttnParams::new(1.0 / (cfg.head_size() as f32).sqrt()) };
        Ok(Self {
            input_norm: w.get("input_layernorm.weight")?,
            post_norm: w.get("post_attention_layernorm.weight")?,
            qkv,
            qk_norm,
            o: a.linear("o_proj")?,
            gate_up,
            down: m.linear("down_proj")?,
            attn: PagedAttention::with_params(shape, params),
        })
    }
}

/// RMSNorm of each `width`-sized head of `x` (`[tokens, heads * width]`).
pub(crate) fn head_rms_norm(x: &Tensor, weight: &Tensor, width: usize, eps: f32) -> Result<Tensor> {
    let (t, all) = x.dims2()?;
    let y = candle_nn::ops::rms_norm(&x.reshape((t * all / width, width))?, weight, eps)?;
    Ok(y.reshape((t, all))?)
}

/// A Llama-family causal language model.
pub struct Llama {
    cfg: LlamaConfig,
    /// `None` when the embedding is the quantized output matrix (tied weights).
    embed: Option<Tensor>,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    rotary: Rotary,
    shape: AttnShape,
    dtype: DType,
}

impl Llama {
    /// Loads from a weight source. `rope` is `Interleaved` for GGUF checkpoints.
    pub fn load(w: &Weights, cfg: LlamaConfig, rope: RopeStyle) -> Result<Self> {
        let shape = cfg.attn_shape();
        if !shape.num_heads.is_multiple_of(shape.num_kv_heads) {
            return Err(Error::Config(format!(
                "{} heads not divisible by {} kv heads",
                shape.num_heads, shape.num_kv_heads
            )));
        }
        let model = w.pp("model");
        let tied = cfg.tie_word_embeddings || !w.contains("lm_head.weight");
        // Tied, on our kernels: the output matrix in the file's own form. When that is quantized
        // the embedding is looked up in it, not also held dequantized.
        let native_head =
            if tied && w.options().native && w.device().is_cpu() { Some(model.linear("embed_tokens")?) } else { None };
        let embed = match &native_head {
            Some(Linear::Int8 { .. } | Linear::Q4 { .. } | Linear::K { .. }) => None,
            _ => Some(model.get("embed_tokens.weight")?),
        };
        // Layers load in parallel: dequantizing and repacking weights is most of a cold start.
        let layers = (0..cfg.num_hidden_layers)
            .into_par_iter()
            .map(|i| Layer::load(&model.pp(format!("layers.{i}")), &cfg, shape, i))
            .collect::<Result<Vec<_>>>()?;
        let lm_head = match (native_head, &embed) {
            (Some(l), _) => l,
            _ if !tied => w.linear("lm_head")?,
            // Tied: the embedding matrix, kept quantized when it is.
            _ if w.options().keep_quantized => model.linear("embed_tokens")?,
            // Tied: reuse the embedding tensor already loaded.
            (None, Some(e)) => w.linear_from(e.clone(), None)?,
            (None, None) => unreachable!("the embedding is loaded unless the output matrix is"),
        };
        let dtype = w.options().dtype;
        let rotary = Rotary::from_inv_freq(&cfg.inv_freq(), cfg.max_position_embeddings, rope, dtype, w.device())?;
        Ok(Self { norm: model.get("norm.weight")?, embed, layers, lm_head, rotary, shape, cfg, dtype })
    }

    /// The configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }
}

impl CausalLM for Llama {
    fn forward(&self, input: &StepInput, caches: &[KvCache]) -> Result<Tensor> {
        check_caches(caches.len(), self.layers.len())?;
        let eps = self.cfg.rms_norm_eps as f32;
        let mut x = match &self.embed {
            Some(e) => e.index_select(&input.input_ids, 0)?,
            None => self.lm_head.rows(&input.input_ids, self.dtype)?.ok_or(Error::Config("no embedding".into()))?,
        };
        let (cos, sin) = self.rotary.for_positions(&input.positions)?;
        for (i, (layer, cache)) in self.layers.iter().zip(caches).enumerate() {
            input.before_layer(i);
            let h = candle_nn::ops::rms_norm(&x, &layer.input_norm, eps)?;
            let mut qkv = layer.qkv.forward(&h)?;
            if let Some((qn, kn)) = &layer.qk_norm {
                qkv[0] = head_rms_norm(&qkv[0], qn, self.shape.head_dim, eps)?;
                qkv[1] = head_rms_norm(&qkv[1], kn, self.shape.head_dim, eps)?;
            }
            let a = layer.attn.forward(&qkv[0], &qkv[1], &qkv[2], Some((&self.rotary, &cos, &sin)), cache, input)?;
            x = (x + layer.o.forward(&a)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.post_norm, eps)?;
            let gu = layer.gate_up.forward(&h)?;
            let m = (candle_nn::ops::silu(&gu[0])? * &gu[1])?;
            x = (x + layer.down.forward(&m)?)?;
        }
        let x = x.index_select(&input.logits_indices, 0)?;
        let x = candle_nn::ops::rms_norm(&x, &self.norm, eps)?;
        let logits = self.lm_head.forward(&x)?;
        Ok(logits.to_dtype(DType::F32)?)
    }

    fn attn_shape(&self) -> AttnShape {
        self.shape
    }

    fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn max_model_len(&self) -> usize {
        self.cfg.max_position_embeddings
    }

    fn dtype(&self) -> DType {
        self.dtype
    }
}
