//! Gemma 2 (`Gemma2ForCausalLM`) and Gemma 3 text (`Gemma3ForCausalLM`).
//!
//! References: Hugging Face `transformers/models/gemma2/modeling_gemma2.py` and
//! `gemma3/modeling_gemma3.py`. Llama-like, with: embeddings scaled by `sqrt(hidden_size)`;
//! RMSNorm by `(1 + weight)`; four norms per layer (before and after attention, before and
//! after the MLP); GeGLU (tanh GELU) MLP; attention scaled by `query_pre_attn_scalar^-1/2`;
//! sliding-window and global layers interleaved (`layer_types`; else Gemma 2's even layers,
//! Gemma 3's five of every six); tied embeddings. Gemma 2 soft-caps attention scores and final
//! logits. Gemma 3 normalizes each query and key head (`q_norm`, `k_norm`, also `1 + w`) and
//! rotates local layers with their own base (`rope_local_base_freq`, 10,000) and global ones
//! with `rope_theta` (1,000,000), linear scaling on global layers only.
//!
//! From GGUF (`gemma2`, `gemma3`): llama.cpp's converter stores the norms with the 1 already
//! added; the attention scale and the local base follow llama.cpp's choices.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use candle_core::{DType, Tensor};
use rayon::prelude::*;
use vllm_kernels::{AttnParams, AttnShape, KvCache};

use crate::attention::{PagedAttention, RopeStyle, Rotary};
use crate::info::KvLayout;
use crate::layers::{check_caches, output_layer, GgufKeys};
use crate::linear::Linear;
use crate::llama::head_rms_norm;
use crate::registry::DecoderConfig;
use crate::validate::{Names, Summary, TensorNames, MAX_LAYERS};
use crate::weights::Weights;
use crate::{CausalLM, Error, ModelSpec, Result, StepInput};

/// The configuration of a Gemma 2 or Gemma 3 (text) checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Gemma2Config {
    /// Gemma 3 (Q/K norms, two rotary bases) rather than Gemma 2.
    pub gemma3: bool,
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
    pub rms_norm_eps: f64,
    /// Rotary base of global layers (and of every layer in Gemma 2).
    pub rope_theta: f32,
    /// Rotary base of sliding-window layers (Gemma 3).
    pub rope_local_theta: f32,
    /// Linear position scaling of global layers (Gemma 3's `rope_scaling`), 1 for none.
    pub rope_factor: f32,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Context length.
    pub max_position_embeddings: usize,
    /// Attention scale is `query_pre_attn_scalar^-1/2`.
    pub query_pre_attn_scalar: f32,
    /// Scores become `cap * tanh(score / cap)`.
    pub attn_logit_softcapping: Option<f32>,
    /// Logits become `cap * tanh(logit / cap)`.
    pub final_logit_softcapping: Option<f32>,
    /// Window of the sliding layers.
    pub sliding_window: Option<usize>,
    /// Which layers slide.
    pub sliding: Vec<bool>,
}

/// A rotary section (`rope_parameters` or one layer type's entry in it): base and linear factor.
fn rope_section(v: Option<&serde_json::Value>) -> (Option<f32>, Option<f32>) {
    let Some(v) = v else { return (None, None) };
    let theta = v.get("rope_theta").and_then(|x| x.as_f64()).map(|x| x as f32);
    let linear = v.get("rope_type").or(v.get("type")).and_then(|t| t.as_str()) == Some("linear");
    let factor = if linear { v.get("factor").and_then(|x| x.as_f64()).map(|x| x as f32) } else { None };
    (theta, factor)
}

impl Gemma2Config {
    /// Parses a Hugging Face `config.json` (`gemma2`, `gemma3_text`; transformers 4's
    /// `rope_theta`/`rope_local_base_freq`/`rope_scaling` or transformers 5's per-layer-type
    /// `rope_parameters`).
    pub fn from_hf(raw: serde_json::Value) -> Result<Self> {
        let gemma3 = raw.get("architectures").and_then(|a| a.get(0)).and_then(|a| a.as_str())
            == Some("Gemma3ForCausalLM")
            || raw.get("model_type").and_then(|m| m.as_str()).is_some_and(|m| m.starts_with("gemma3"));
        let usize_of = |k: &str| raw.get(k).and_then(|v| v.as_u64()).map(|v| v as usize);
        let f32_of = |k: &str| raw.get(k).and_then(|v| v.as_f64()).map(|v| v as f32);
        let req = |k: &str| usize_of(k).ok_or_else(|| Error::Config(format!("config.json lacks {k}")));
        let (hidden, heads, layers) = (req("hidden_size")?, req("num_attention_heads")?, req("num_hidden_layers")?);
        let head_dim = usize_of("head_dim").unwrap_or(hidden / heads.max(1));
        let rp = raw.get("rope_parameters");
        let (flat_theta, _) = rope_section(rp);
        let (global_theta, global_factor) = rope_section(rp.and_then(|r| r.get("full_attention")));
        let (local_theta, _) = rope_section(rp.and_then(|r| r.get("sliding_attention")));
        let (_, legacy_factor) = rope_section(raw.get("rope_scaling"));
        let default_theta = if gemma3 { 1_000_000.0 } else { 10_000.0 };
        let sliding = match raw.get("layer_types").and_then(|t| t.as_array()) {
            Some(t) => t.iter().map(|x| x.as_str() == Some("sliding_attention")).collect(),
            None => default_pattern(gemma3, layers, usize_of("sliding_window_pattern")),
        };
        let positive = |v: Option<f32>| v.filter(|c| *c > 0.0);
        Ok(Self {
            gemma3,
            hidden_size: hidden,
            intermediate_size: req("intermediate_size")?,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: usize_of("num_key_value_heads").unwrap_or(heads),
            head_dim,
            rms_norm_eps: f32_of("rms_norm_eps").map_or(1e-6, f64::from),
            rope_theta: f32_of("rope_theta").or(global_theta).or(flat_theta).unwrap_or(default_theta),
            rope_local_theta: f32_of("rope_local_base_freq").or(local_theta).unwrap_or(10_000.0),
            rope_factor: global_factor.or(legacy_factor).unwrap_or(1.0),
            vocab_size: req("vocab_size")?,
            max_position_embeddings: req("max_position_embeddings")?,
            query_pre_attn_scalar: f32_of("query_pre_attn_scalar").unwrap_or(head_dim as f32),
            attn_logit_softcapping: positive(f32_of("attn_logit_softcapping")),
            final_logit_softcapping: positive(f32_of("final_logit_softcapping")),
            sliding_window: usize_of("sliding_window"),
            sliding,
        })
    }

    /// Reads the configuration from GGUF metadata (`gemma2.*` / `gemma3.*`), as llama.cpp
    /// does: the attention scale is `head_dim^-1/2` (width over heads for the 27B models), the
    /// local rotary base 10,000, and Gemma 3 slides five layers of every six unless the file
    /// names its own pattern.
    pub fn from_gguf(md: &HashMap<String, Value>) -> Result<Self> {
        let g = GgufKeys::new(md);
        let gemma3 = g.arch() == "gemma3";
        let (hidden, heads, layers) =
            (g.req("embedding_length")?, g.req("attention.head_count")?, g.req("block_count")?);
        let head_dim = g.opt("attention.key_length").unwrap_or(hidden / heads.max(1));
        let is_27b = (!gemma3 && layers == 46) || (gemma3 && layers == 62);
        let linear = g.string("rope.scaling.type").as_deref() == Some("linear");
        Ok(Self {
            gemma3,
            hidden_size: hidden,
            intermediate_size: g.req("feed_forward_length")?,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: g.opt("attention.head_count_kv").unwrap_or(heads),
            head_dim,
            rms_norm_eps: g.f32("attention.layer_norm_rms_epsilon").map_or(1e-6, f64::from),
            rope_theta: g.f32("rope.freq_base").unwrap_or(if gemma3 { 1_000_000.0 } else { 10_000.0 }),
            rope_local_theta: g.f32("rope.freq_base_swa").unwrap_or(10_000.0),
            rope_factor: if linear { g.f32("rope.scaling.factor").unwrap_or(1.0) } else { 1.0 },
            vocab_size: g.vocab_size(),
            max_position_embeddings: g.req("context_length")?,
            query_pre_attn_scalar: if is_27b { (hidden / heads.max(1)) as f32 } else { head_dim as f32 },
            attn_logit_softcapping: g.f32("attn_logit_softcapping").filter(|c| *c > 0.0),
            final_logit_softcapping: g.f32("final_logit_softcapping").filter(|c| *c > 0.0),
            sliding_window: g.opt("attention.sliding_window").filter(|&w| w > 0),
            sliding: default_pattern(gemma3, layers, g.opt("attention.sliding_window_pattern")),
        })
    }

    /// The attention head layout (sizes the KV cache).
    pub fn attn_shape(&self) -> AttnShape {
        AttnShape {
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads,
            head_dim: self.head_dim,
        }
    }

    /// The window of layer `i`, if it slides.
    pub(crate) fn window(&self, i: usize) -> Option<usize> {
        if self.sliding.get(i).copied().unwrap_or(false) {
            self.sliding_window
        } else {
            None
        }
    }
}

impl DecoderConfig for Gemma2Config {
    fn summary(&self) -> Summary {
        let kv = KvLayout::new(self.num_hidden_layers, self.attn_shape(), |i| self.window(i));
        let mut scalars = vec![
            ("rope_theta", f64::from(self.rope_theta)),
            ("rms_norm_eps", self.rms_norm_eps),
            ("query_pre_attn_scalar", f64::from(self.query_pre_attn_scalar)),
            ("rope_scaling.factor", f64::from(self.rope_factor)),
        ];
        if self.gemma3 {
            scalars.push(("rope_local_base_freq", f64::from(self.rope_local_theta)));
        }
        scalars.extend(self.attn_logit_softcapping.map(|c| ("attn_logit_softcapping", f64::from(c))));
        scalars.extend(self.final_logit_softcapping.map(|c| ("final_logit_softcapping", f64::from(c))));
        Summary {
            context_length: self.max_position_embeddings,
            kv,
            hidden_size: self.hidden_size,
            intermediate_size: Some(self.intermediate_size),
            experts: None,
            vocab_size: self.vocab_size,
            head_dim_derived: false,
            rotary: true,
            scalars,
            names: Names::CONFIG_JSON,
            tensors: TensorNames::LLAMA,
        }
    }

    fn load(self: Box<Self>, w: &Weights, _rope: RopeStyle) -> Result<Box<dyn CausalLM>> {
        Ok(Box::new(Gemma2::load(w, *self)?))
    }
}

/// Which layers slide when the config does not list them: Gemma 2's even layers; Gemma 3's
/// all but every `pattern`-th (6). (At most [`MAX_LAYERS`]: validation refuses more.)
fn default_pattern(gemma3: bool, layers: usize, pattern: Option<usize>) -> Vec<bool> {
    let pattern = pattern.unwrap_or(if gemma3 { 6 } else { 2 }).max(1);
    (0..layers.min(MAX_LAYERS)).map(|i| !(i + 1).is_multiple_of(pattern)).collect()
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
    /// Gemma 3's per-head query and key norms.
    qk_norm: Option<(Tensor, Tensor)>,
    /// Whether the layer uses the local rotary tables.
    local: bool,
    attn: PagedAttention,
}

/// Gemma's norm weights are stored as `weight` and applied as `1 + weight` (llama.cpp's
/// converter stores `1 + weight` in GGUF files).
fn gemma_norm(w: &Weights, name: &str) -> Result<Tensor> {
    let t = w.get(name)?;
    Ok(if w.gguf_arch().is_some() { t } else { (t + 1.0)? })
}

/// A Gemma 2 causal language model.
pub struct Gemma2 {
    cfg: Gemma2Config,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    rotary: Rotary,
    /// Gemma 3's local-layer tables.
    local_rotary: Option<Rotary>,
    spec: ModelSpec,
}

impl Gemma2 {
    /// Loads from a Hugging Face weight source.
    pub fn load(w: &Weights, cfg: Gemma2Config) -> Result<Self> {
        cfg.summary().validate()?;
        let shape = cfg.attn_shape();
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
                let qk_norm = if a.contains("q_norm.weight") {
                    Some((gemma_norm(&a, "q_norm.weight")?, gemma_norm(&a, "k_norm.weight")?))
                } else {
                    None
                };
                Ok(Layer {
                    qk_norm,
                    local: cfg.gemma3 && cfg.window(i).is_some(),
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
        let inv = |theta: f32, factor: f32| -> Vec<f32> {
            let d = cfg.head_dim;
            (0..d / 2).map(|i| 1.0 / theta.powf(2.0 * i as f32 / d as f32) / factor).collect()
        };
        let table = |inv: &[f32]| Rotary::from_inv_freq(inv, RopeStyle::Halves, dtype, w.device());
        let rotary = table(&inv(cfg.rope_theta, cfg.rope_factor))?;
        let local_rotary = if cfg.gemma3 { Some(table(&inv(cfg.rope_local_theta, 1.0))?) } else { None };
        let spec = ModelSpec {
            attn_shape: shape,
            num_layers: layers.len(),
            vocab_size: cfg.vocab_size,
            max_model_len: cfg.max_position_embeddings,
            dtype,
        };
        Ok(Self { norm: gemma_norm(&model, "norm.weight")?, embed, layers, lm_head, rotary, local_rotary, spec, cfg })
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
            Tensor::new((self.cfg.hidden_size as f32).sqrt(), self.embed.device())?.to_dtype(self.spec.dtype)?;
        let mut x = self.embed.index_select(&input.input_ids, 0)?.broadcast_mul(&normalizer)?;
        let global = self.rotary.for_positions(&input.positions)?;
        let local = self.local_rotary.as_ref().map(|r| r.for_positions(&input.positions)).transpose()?;
        for (i, (l, cache)) in self.layers.iter().zip(caches).enumerate() {
            input.before_layer(i);
            let h = rms(&x, &l.input_norm, eps)?;
            let (mut q, mut k) = (l.q.forward(&h)?, l.k.forward(&h)?);
            if let Some((qn, kn)) = &l.qk_norm {
                q = head_rms_norm(&q, qn, self.spec.attn_shape.head_dim, eps)?;
                k = head_rms_norm(&k, kn, self.spec.attn_shape.head_dim, eps)?;
            }
            let rope = match (&self.local_rotary, &local) {
                (Some(r), Some((cos, sin))) if l.local => (r, cos, sin),
                _ => (&self.rotary, &global.0, &global.1),
            };
            let a = l.attn.forward(&q, &k, &l.v.forward(&h)?, Some(rope), cache, input)?;
            x = (x + rms(&l.o.forward(&a)?, &l.post_attn_norm, eps)?)?;
            let h = rms(&x, &l.pre_ffn_norm, eps)?;
            let m = (l.gate.forward(&h)?.gelu()? * l.up.forward(&h)?)?;
            x = (x + rms(&l.down.forward(&m)?, &l.post_ffn_norm, eps)?)?;
        }
        let x = x.index_select(&input.logits_indices, 0)?;
        let logits = self.lm_head.forward(&rms(&x, &self.norm, eps)?)?.to_dtype(DType::F32)?;
        softcap(&logits, self.cfg.final_logit_softcapping)
    }

    fn spec(&self) -> &ModelSpec {
        &self.spec
    }
}
