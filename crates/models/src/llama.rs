//! Llama architecture (Llama 2/3, SmolLM, and the family built on it).
//!
//! Reference: Hugging Face `transformers/models/llama/modeling_llama.py`. RMSNorm, rotary
//! embeddings (theta from the config), grouped-query attention, SwiGLU MLP, optionally tied
//! embeddings. Loads from a Hugging Face folder (`config.json` + safetensors) or a GGUF file
//! (metadata `llama.*`, Q/K rows in llama.cpp's interleaved rotary order).

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use candle_core::{DType, Tensor};
use rayon::prelude::*;
use serde::Deserialize;
use vllm_kernels::{AttnShape, KvCache};

use crate::attention::{PagedAttention, RopeStyle, Rotary};
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
}

impl LlamaConfig {
    fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    fn head_size(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
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
    o: Linear,
    gate_up: Projections,
    down: Linear,
    attn: PagedAttention,
}

impl Layer {
    fn load(w: &Weights, cfg: &LlamaConfig, shape: AttnShape) -> Result<Self> {
        let a = w.pp("self_attn");
        let m = w.pp("mlp");
        Ok(Self {
            input_norm: w.get("input_layernorm.weight")?,
            post_norm: w.get("post_attention_layernorm.weight")?,
            qkv: Projections::new(vec![a.linear("q_proj")?, a.linear("k_proj")?, a.linear("v_proj")?]),
            o: a.linear("o_proj")?,
            gate_up: Projections::new(vec![m.linear("gate_proj")?, m.linear("up_proj")?]),
            down: m.linear("down_proj")?,
            attn: PagedAttention::new(shape, 1.0 / (cfg.head_size() as f32).sqrt()),
        })
    }
}

/// A Llama-family causal language model.
pub struct Llama {
    cfg: LlamaConfig,
    embed: Tensor,
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
        let shape =
            AttnShape { num_heads: cfg.num_attention_heads, num_kv_heads: cfg.kv_heads(), head_dim: cfg.head_size() };
        if !shape.num_heads.is_multiple_of(shape.num_kv_heads) {
            return Err(Error::Config(format!(
                "{} heads not divisible by {} kv heads",
                shape.num_heads, shape.num_kv_heads
            )));
        }
        let model = w.pp("model");
        let embed = model.get("embed_tokens.weight")?;
        // Layers load in parallel: dequantizing and repacking weights is most of a cold start.
        let layers = (0..cfg.num_hidden_layers)
            .into_par_iter()
            .map(|i| Layer::load(&model.pp(format!("layers.{i}")), &cfg, shape))
            .collect::<Result<Vec<_>>>()?;
        let lm_head = if !cfg.tie_word_embeddings && w.contains("lm_head.weight") {
            w.linear("lm_head")?
        } else if w.options().keep_quantized {
            // Tied: the embedding matrix, kept quantized when it is.
            model.linear("embed_tokens")?
        } else {
            // Tied: reuse the embedding tensor already loaded.
            w.linear_from(embed.clone(), None)?
        };
        let dtype = w.options().dtype;
        let rotary = Rotary::new(cfg.rope_theta, shape.head_dim, cfg.max_position_embeddings, rope, dtype, w.device())?;
        Ok(Self { norm: model.get("norm.weight")?, embed, layers, lm_head, rotary, shape, cfg, dtype })
    }

    /// The configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }
}

impl CausalLM for Llama {
    fn forward(&self, input: &StepInput, caches: &[KvCache]) -> Result<Tensor> {
        if caches.len() != self.layers.len() {
            return Err(Error::Config(format!("{} caches for {} layers", caches.len(), self.layers.len())));
        }
        let eps = self.cfg.rms_norm_eps as f32;
        let mut x = self.embed.index_select(&input.input_ids, 0)?;
        let (cos, sin) = self.rotary.for_positions(&input.positions)?;
        for (layer, cache) in self.layers.iter().zip(caches) {
            let h = candle_nn::ops::rms_norm(&x, &layer.input_norm, eps)?;
            let qkv = layer.qkv.forward(&h)?;
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
