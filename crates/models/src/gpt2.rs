//! GPT-2 (`GPT2LMHeadModel`).
//!
//! Reference: Hugging Face `transformers/models/gpt2/modeling_gpt2.py`. Learned absolute
//! positions, pre-LayerNorm blocks, one fused `c_attn` projection for Q/K/V, tanh-GELU MLP,
//! output tied to the token embeddings. Weights are `Conv1D`s stored `[in, out]` (transposed
//! on load); names with or without the `transformer.` prefix.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use candle_core::{DType, Tensor};
use rayon::prelude::*;
use serde::Deserialize;
use vllm_kernels::{AttnShape, KvCache};

use crate::attention::{PagedAttention, RopeStyle};
use crate::info::KvLayout;
use crate::layers::{check_caches, output_layer, GgufKeys, LayerNorm};
use crate::linear::Linear;
use crate::registry::DecoderConfig;
use crate::validate::{Field, Names, Summary, TensorNames};
use crate::weights::Weights;
use crate::{CausalLM, Error, ModelSpec, Result, StepInput};

/// `config.json` of a GPT-2 checkpoint.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Gpt2Config {
    /// Model width.
    pub n_embd: usize,
    /// Blocks.
    pub n_layer: usize,
    /// Attention heads.
    pub n_head: usize,
    /// MLP width (default 4 x width).
    #[serde(default)]
    pub n_inner: Option<usize>,
    /// Context length.
    pub n_positions: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// LayerNorm epsilon.
    #[serde(default = "eps")]
    pub layer_norm_epsilon: f64,
    /// MLP activation (`gelu_new`, the tanh approximation).
    #[serde(default = "gelu_new")]
    pub activation_function: String,
    /// Scores scaled by `1 / (layer + 1)` too (not supported).
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
}

fn eps() -> f64 {
    1e-5
}
fn gelu_new() -> String {
    "gelu_new".into()
}

/// A `Conv1D` (`[in, out]` weight) as a linear layer. llama.cpp's converter stores these
/// transposed (`[out, in]`), so a GGUF source is an ordinary linear layer, kept quantized.
fn conv1d(w: &Weights, name: &str) -> Result<Linear> {
    if w.gguf_arch().is_some() {
        return w.linear(name);
    }
    let weight = w.get(&format!("{name}.weight"))?.t()?.contiguous()?;
    let bias = Some(w.get(&format!("{name}.bias"))?);
    w.linear_from_named(name, weight, bias)
}

struct Block {
    ln_1: LayerNorm,
    c_attn: Linear,
    c_proj: Linear,
    ln_2: LayerNorm,
    c_fc: Linear,
    mlp_proj: Linear,
    attn: PagedAttention,
}

/// A GPT-2 causal language model.
pub struct Gpt2 {
    cfg: Gpt2Config,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: Linear,
    spec: ModelSpec,
}

impl Gpt2Config {
    /// Parses a Hugging Face `config.json`.
    pub fn from_hf(raw: serde_json::Value) -> Result<Self> {
        serde_json::from_value(raw).map_err(|e| Error::Config(format!("config.json: {e}")))
    }

    /// Reads the configuration from GGUF metadata (`gpt2.*` keys).
    pub fn from_gguf(md: &HashMap<String, Value>) -> Result<Self> {
        let g = GgufKeys::new(md);
        Ok(Self {
            n_embd: g.req("embedding_length")?,
            n_layer: g.req("block_count")?,
            n_head: g.req("attention.head_count")?,
            n_inner: g.opt("feed_forward_length"),
            n_positions: g.req("context_length")?,
            vocab_size: g.vocab_size(),
            layer_norm_epsilon: g.f32("attention.layer_norm_epsilon").map_or(1e-5, f64::from),
            activation_function: gelu_new(),
            scale_attn_by_inverse_layer_idx: false,
        })
    }

    /// The attention head layout (sizes the KV cache): multi-head, width over heads (0
    /// without heads).
    pub fn attn_shape(&self) -> AttnShape {
        let head_dim = self.n_embd.checked_div(self.n_head).unwrap_or(0);
        AttnShape { num_heads: self.n_head, num_kv_heads: self.n_head, head_dim }
    }

    /// The MLP width: `n_inner`, else four times the width.
    pub fn inner(&self) -> usize {
        self.n_inner.unwrap_or(self.n_embd.saturating_mul(4))
    }
}

/// GPT-2's `config.json` spelling.
const GPT2_NAMES: &[(Field, &str)] = &[
    (Field::Layers, "n_layer"),
    (Field::Hidden, "n_embd"),
    (Field::Heads, "n_head"),
    (Field::KvHeads, "n_head"),
    (Field::Intermediate, "n_inner"),
    (Field::Context, "n_positions"),
];

impl DecoderConfig for Gpt2Config {
    fn summary(&self) -> Summary {
        Summary {
            context_length: self.n_positions,
            kv: KvLayout::new(self.n_layer, self.attn_shape(), |_| None),
            hidden_size: self.n_embd,
            intermediate_size: Some(self.inner()),
            experts: None,
            vocab_size: self.vocab_size,
            head_dim_derived: true,
            rotary: false,
            scalars: vec![("layer_norm_epsilon", self.layer_norm_epsilon)],
            names: Names::ConfigJson(GPT2_NAMES),
            tensors: TensorNames {
                embedding: &["transformer.wte.weight", "wte.weight"],
                head: Some("lm_head.weight"),
                positions: Some((&["transformer.wpe.weight", "wpe.weight"], 0)),
            },
        }
    }

    /// GPT-2 has no rotary embeddings: `rope` is not used.
    fn load(self: Box<Self>, w: &Weights, _rope: RopeStyle) -> Result<Box<dyn CausalLM>> {
        Ok(Box::new(Gpt2::load(w, *self)?))
    }
}

impl Gpt2 {
    /// Loads from a Hugging Face weight source.
    pub fn load(w: &Weights, cfg: Gpt2Config) -> Result<Self> {
        cfg.summary().validate()?;
        if !matches!(cfg.activation_function.as_str(), "gelu_new" | "gelu_pytorch_tanh") {
            return Err(Error::Config(format!(
                "GPT-2 activation '{}' is not supported (gelu_new)",
                cfg.activation_function
            )));
        }
        if cfg.scale_attn_by_inverse_layer_idx {
            return Err(Error::Config("scale_attn_by_inverse_layer_idx is not supported".into()));
        }
        let t = if w.contains("transformer.wte.weight") { w.pp("transformer") } else { w.clone() };
        let shape = cfg.attn_shape();
        let blocks = (0..cfg.n_layer)
            .into_par_iter()
            .map(|i| {
                let b = t.pp(format!("h.{i}"));
                Ok(Block {
                    ln_1: LayerNorm::load(&b, "ln_1")?,
                    c_attn: conv1d(&b, "attn.c_attn")?,
                    c_proj: conv1d(&b, "attn.c_proj")?,
                    ln_2: LayerNorm::load(&b, "ln_2")?,
                    c_fc: conv1d(&b, "mlp.c_fc")?,
                    mlp_proj: conv1d(&b, "mlp.c_proj")?,
                    attn: PagedAttention::new(shape, 1.0 / (shape.head_dim as f32).sqrt()),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let wte = t.get("wte.weight")?;
        let lm_head = output_layer(w, &wte)?;
        Ok(Self {
            wpe: t.get("wpe.weight")?,
            ln_f: LayerNorm::load(&t, "ln_f")?,
            wte,
            spec: ModelSpec {
                attn_shape: shape,
                num_layers: blocks.len(),
                vocab_size: cfg.vocab_size,
                max_model_len: cfg.n_positions,
                dtype: w.options().dtype,
            },
            blocks,
            lm_head,
            cfg,
        })
    }
}

impl CausalLM for Gpt2 {
    fn forward(&self, input: &StepInput, caches: &[KvCache]) -> Result<Tensor> {
        check_caches(caches.len(), self.blocks.len())?;
        let eps = self.cfg.layer_norm_epsilon as f32;
        let d = self.cfg.n_embd;
        let mut x = (self.wte.index_select(&input.input_ids, 0)? + self.wpe.index_select(&input.positions, 0)?)?;
        for (i, (b, cache)) in self.blocks.iter().zip(caches).enumerate() {
            input.before_layer(i);
            let qkv = b.c_attn.forward(&b.ln_1.forward(&x, eps)?)?;
            let (q, k, v) = (qkv.narrow(1, 0, d)?, qkv.narrow(1, d, d)?, qkv.narrow(1, 2 * d, d)?);
            let a = b.attn.forward(&q.contiguous()?, &k.contiguous()?, &v.contiguous()?, None, cache, input)?;
            x = (x + b.c_proj.forward(&a)?)?;
            let m = b.c_fc.forward(&b.ln_2.forward(&x, eps)?)?.gelu()?;
            x = (x + b.mlp_proj.forward(&m)?)?;
        }
        let x = self.ln_f.forward(&x.index_select(&input.logits_indices, 0)?, eps)?;
        Ok(self.lm_head.forward(&x)?.to_dtype(DType::F32)?)
    }

    fn spec(&self) -> &ModelSpec {
        &self.spec
    }
}
