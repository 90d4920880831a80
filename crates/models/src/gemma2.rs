//! Gemma 2 (`Gemma2ForCausalLM`).
//!
//! Reference: Hugging Face `transformers/models/gemma2/modeling_gemma2.py`. Llama-like, with:
//! embeddings scaled by `sqrt(hidden_size)`; RMSNorm by `(1 + weight)`; four norms per layer
//! (before and after attention, before and after the MLP); GeGLU (tanh GELU) MLP; attention
//! scaled by `query_pre_attn_scalar^-1/2` with scores soft-capped (`attn_logit_softcapping`);
//! sliding-window and global layers alternating (`layer_types`, or even layers windowed);
//! final logits soft-capped (`final_logit_softcapping`); tied embeddings.

use candle_core::{DType, Tensor};
use rayon::prelude::*;
use serde::Deserialize;
use vllm_kernels::{AttnParams, AttnShape, KvCache};

use crate::attention::{PagedAttention, RopeStyle, Rotary};
use crate::layers::{check_caches, output_layer};
use crate::llama::RopeParameters;
use crate::weights::{Linear, Weights};
use crate::{CausalLM, Error, Result, StepInput};

/// `config.json` of a Gemma 2 checkpoint.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Gemma2Config {
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    pub num_key_value_heads: usize,
    /// Head size.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    #[serde(default = "eps")]
    pub rms_norm_eps: f64,
    /// Rotary base (older configs).
    #[serde(default)]
    pub rope_theta: Option<f32>,
    /// Rotary parameters (transformers 5).
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Context length.
    pub max_position_embeddings: usize,
    /// Attention scale is `query_pre_attn_scalar^-1/2`.
    pub query_pre_attn_scalar: f32,
    /// Scores become `cap * tanh(score / cap)`.
    #[serde(default)]
    pub attn_logit_softcapping: Option<f32>,
    /// Logits become `cap * tanh(logit / cap)`.
    #[serde(default)]
    pub final_logit_softcapping: Option<f32>,
    /// Window of the sliding layers.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Per-layer attention kind (`sliding_attention` / `full_attention`).
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
}

fn eps() -> f64 {
    1e-6
}

impl Gemma2Config {
    fn theta(&self) -> f32 {
        self.rope_theta.or(self.rope_parameters.as_ref().and_then(|r| r.rope_theta)).unwrap_or(10_000.0)
    }

    /// The attention head layout (sizes the KV cache).
    pub fn attn_shape(&self) -> AttnShape {
        AttnShape {
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads,
            head_dim: self.head_dim,
        }
    }

    /// The window of layer `i`: from `layer_types`, else every even layer (Gemma 2's pattern).
    pub(crate) fn window(&self, i: usize) -> Option<usize> {
        let sliding = match &self.layer_types {
            Some(t) => t.get(i).map(String::as_str) == Some("sliding_attention"),
            None => i.is_multiple_of(2),
        };
        if sliding {
            self.sliding_window
        } else {
            None
        }
    }
}

struct Layer {
    input_norm: Tensor,
    post_attn_norm: Tensor,
    pre_ffn_norm: Tensor,
    post_ffn_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    gate: Linear,
    up: Linear,
    down: Linear,
    attn: PagedAttention,
}

/// Gemma's norm weights are stored as `weight` and applied as `1 + weight`.
fn gemma_norm(w: &Weights, name: &str) -> Result<Tensor> {
    Ok((w.get(name)? + 1.0)?)
}

/// A Gemma 2 causal language model.
pub struct Gemma2 {
    cfg: Gemma2Config,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    rotary: Rotary,
    shape: AttnShape,
    dtype: DType,
}

impl Gemma2 {
    /// Loads from a Hugging Face weight source.
    pub fn load(w: &Weights, cfg: Gemma2Config) -> Result<Self> {
        let shape = cfg.attn_shape();
        if !shape.num_heads.is_multiple_of(shape.num_kv_heads) {
            return Err(Error::Config(format!(
                "{} heads not divisible by {} kv heads",
                shape.num_heads, shape.num_kv_heads
            )));
        }
        let model = w.pp("model");
        let layers = (0..cfg.num_hidden_layers)
            .into_par_iter()
            .map(|i| {
                let l = model.pp(format!("layers.{i}"));
                let (a, m) = (l.pp("self_attn"), l.pp("mlp"));
                let params = AttnParams {
                    scale: cfg.query_pre_attn_scalar.powf(-0.5),
                    sliding_window: cfg.window(i),
                    softcap: cfg.attn_logit_softcapping,
                };
                Ok(Layer {
                    input_norm: gemma_norm(&l, "input_layernorm.weight")?,
                    post_attn_norm: gemma_norm(&l, "post_attention_layernorm.weight")?,
                    pre_ffn_norm: gemma_norm(&l, "pre_feedforward_layernorm.weight")?,
                    post_ffn_norm: gemma_norm(&l, "post_feedforward_layernorm.weight")?,
                    q: a.linear("q_proj")?,
                    k: a.linear("k_proj")?,
                    v: a.linear("v_proj")?,
                    o: a.linear("o_proj")?,
                    gate: m.linear("gate_proj")?,
                    up: m.linear("up_proj")?,
                    down: m.linear("down_proj")?,
                    attn: PagedAttention::with_params(shape, params),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let embed = model.get("embed_tokens.weight")?;
        let lm_head = output_layer(w, &embed)?;
        let dtype = w.options().dtype;
        let rotary =
            Rotary::new(cfg.theta(), cfg.head_dim, cfg.max_position_embeddings, RopeStyle::Halves, dtype, w.device())?;
        Ok(Self { norm: gemma_norm(&model, "norm.weight")?, embed, layers, lm_head, rotary, shape, dtype, cfg })
    }
}

fn softcap(x: &Tensor, cap: Option<f32>) -> Result<Tensor> {
    Ok(match cap {
        Some(c) => ((x / c as f64)?.tanh()? * c as f64)?,
        None => x.clone(),
    })
}

impl CausalLM for Gemma2 {
    fn forward(&self, input: &StepInput, caches: &[KvCache]) -> Result<Tensor> {
        check_caches(caches.len(), self.layers.len())?;
        let eps = self.cfg.rms_norm_eps as f32;
        let rms = candle_nn::ops::rms_norm;
        // The normalizer is rounded to the activation dtype, as in transformers.
        let normalizer =
            Tensor::new((self.cfg.hidden_size as f32).sqrt(), self.embed.device())?.to_dtype(self.dtype)?;
        let mut x = self.embed.index_select(&input.input_ids, 0)?.broadcast_mul(&normalizer)?;
        let (cos, sin) = self.rotary.for_positions(&input.positions)?;
        for (i, (l, cache)) in self.layers.iter().zip(caches).enumerate() {
            input.before_layer(i);
            let h = rms(&x, &l.input_norm, eps)?;
            let a = l.attn.forward(
                &l.q.forward(&h)?,
                &l.k.forward(&h)?,
                &l.v.forward(&h)?,
                Some((&self.rotary, &cos, &sin)),
                cache,
                input,
            )?;
            x = (x + rms(&l.o.forward(&a)?, &l.post_attn_norm, eps)?)?;
            let h = rms(&x, &l.pre_ffn_norm, eps)?;
            let m = (l.gate.forward(&h)?.gelu()? * l.up.forward(&h)?)?;
            x = (x + rms(&l.down.forward(&m)?, &l.post_ffn_norm, eps)?)?;
        }
        let x = x.index_select(&input.logits_indices, 0)?;
        let logits = self.lm_head.forward(&rms(&x, &self.norm, eps)?)?.to_dtype(DType::F32)?;
        softcap(&logits, self.cfg.final_logit_softcapping)
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
