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
use std::sync::Arc;

use candle_core::quantized::gguf_file::Value;
use candle_core::{DType, Tensor};
use rayon::prelude::*;
use serde::Deserialize;
use vllm_kernels::{AttnParams, AttnShape, KvCache};

use crate::attention::{PagedAttention, RopeStyle, Rotary};
use crate::info::KvLayout;
use crate::layers::{check_caches, GgufKeys};
use crate::linear::Linear;
use crate::registry::DecoderConfig;
use crate::validate::{Experts, Names, Summary, TensorNames, MAX_LAYERS};
use crate::weights::{MatrixFormat, Weights};
use crate::{CausalLM, Error, ModelSpec, Result, StepInput};

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
    /// Mixture of experts: experts per layer (`num_local_experts` in Mixtral, `num_experts`
    /// in Qwen MoE); absent or 0 for a dense model.
    #[serde(default, alias = "num_local_experts")]
    pub num_experts: Option<usize>,
    /// Experts each token is routed to.
    #[serde(default)]
    pub num_experts_per_tok: Option<usize>,
    /// Each expert's MLP width (Qwen MoE); `intermediate_size` otherwise.
    #[serde(default)]
    pub moe_intermediate_size: Option<usize>,
    /// Whether the chosen experts' routing weights are renormalized to sum to 1 (Qwen MoE's
    /// flag; Mixtral always does).
    #[serde(default)]
    pub norm_topk_prob: Option<bool>,
    /// Qwen MoE: every `decoder_sparse_step`-th layer is sparse.
    #[serde(default)]
    pub decoder_sparse_step: Option<usize>,
    /// Qwen MoE: layers that keep a dense MLP.
    #[serde(default)]
    pub mlp_only_layers: Option<Vec<usize>>,
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

    /// Head size (`head_dim`, else width over heads; 0 without heads).
    pub fn head_size(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size.checked_div(self.num_attention_heads).unwrap_or(0))
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

    /// Reads the configuration from GGUF metadata (`{arch}.*` keys: llama, qwen2, qwen3,
    /// qwen3moe, phi3).
    pub fn from_gguf(md: &HashMap<String, Value>) -> Result<Self> {
        let g = GgufKeys::new(md);
        let experts = g.opt("expert_count").filter(|&e| e > 0);
        Ok(Self {
            hidden_size: g.req("embedding_length")?,
            intermediate_size: g.opt("feed_forward_length").unwrap_or(0),
            num_hidden_layers: g.req("block_count")?,
            num_attention_heads: g.req("attention.head_count")?,
            num_key_value_heads: g.opt("attention.head_count_kv"),
            head_dim: g.opt("attention.key_length").or(g.opt("rope.dimension_count")),
            rms_norm_eps: g.f32("attention.layer_norm_rms_epsilon").map_or(1e-5, f64::from),
            rope_theta: g.f32("rope.freq_base").unwrap_or(10_000.0),
            vocab_size: g.vocab_size(),
            max_position_embeddings: g.req("context_length")?,
            tie_word_embeddings: false,
            rope_parameters: None,
            sliding_window: g.opt("attention.sliding_window").filter(|&w| w > 0),
            use_sliding_window: None,
            layer_types: None,
            num_experts: experts,
            num_experts_per_tok: g.opt("expert_used_count"),
            moe_intermediate_size: g.opt("expert_feed_forward_length"),
            // llama.cpp renormalizes the chosen experts' weights for Mixtral (llama) and Qwen3 MoE.
            norm_topk_prob: experts.map(|_| g.bool("expert_weights_norm").unwrap_or(true)),
            decoder_sparse_step: None,
            mlp_only_layers: None,
        })
    }

    /// Whether layer `i` has a mixture of experts instead of a dense MLP.
    pub fn is_sparse(&self, i: usize) -> bool {
        let step = self.decoder_sparse_step.unwrap_or(1).max(1);
        self.num_experts.unwrap_or(0) > 0
            && !self.mlp_only_layers.as_ref().is_some_and(|l| l.contains(&i))
            && (i + 1).is_multiple_of(step)
    }
}

impl DecoderConfig for LlamaConfig {
    fn summary(&self) -> Summary {
        let kv = KvLayout::new(self.num_hidden_layers, self.attn_shape(), |i| self.window(i));
        let experts = self.num_experts.filter(|&e| e > 0).map(|count| Experts {
            count,
            per_token: self.num_experts_per_tok.unwrap_or(2),
            width: self.moe_intermediate_size.unwrap_or(self.intermediate_size),
        });
        let dense = experts.is_none() || (0..self.num_hidden_layers.min(MAX_LAYERS)).any(|i| !self.is_sparse(i));
        let mut scalars = vec![("rope_theta", f64::from(self.rope_theta)), ("rms_norm_eps", self.rms_norm_eps)];
        if let Some(rp) = self.rope_parameters.as_ref().filter(|r| r.rope_type.as_deref() == Some("llama3")) {
            let f = |v: Option<f32>, default: f32| f64::from(v.unwrap_or(default));
            scalars.extend([
                ("rope_parameters.factor", f(rp.factor, 8.0)),
                ("rope_parameters.low_freq_factor", f(rp.low_freq_factor, 1.0)),
                ("rope_parameters.high_freq_factor", f(rp.high_freq_factor, 4.0)),
                (
                    "rope_parameters.original_max_position_embeddings",
                    rp.original_max_position_embeddings.unwrap_or(8192) as f64,
                ),
            ]);
        }
        Summary {
            context_length: self.max_position_embeddings,
            kv,
            hidden_size: self.hidden_size,
            intermediate_size: dense.then_some(self.intermediate_size),
            experts,
            vocab_size: self.vocab_size,
            head_dim_derived: self.head_dim.is_none(),
            rotary: true,
            scalars,
            names: Names::CONFIG_JSON,
            tensors: TensorNames::LLAMA,
        }
    }

    fn load(self: Box<Self>, w: &Weights, rope: RopeStyle) -> Result<Box<dyn CausalLM>> {
        Ok(Box::new(Llama::load(w, *self, rope)?))
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
    mlp: Mlp,
    attn: PagedAttention,
}

/// A SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
struct SwiGlu {
    gate_up: Projections,
    down: Linear,
}

impl SwiGlu {
    /// `gate_proj`/`up_proj`/`down_proj` (or Phi-3's fused `gate_up_proj` of two `width`s).
    fn load(m: &Weights, width: usize) -> Result<Self> {
        // (A GGUF file names Phi-3's fused matrix like an ordinary up projection: fused only
        // when there is no separate gate.)
        let gate_up = if m.contains("gate_up_proj.weight") && !m.contains("gate_proj.weight") {
            Projections { layers: vec![m.linear("gate_up_proj")?], split: vec![width; 2] }
        } else if m.contains("w1.weight") {
            // Mixtral's expert names.
            Projections::new(vec![m.linear("w1")?, m.linear("w3")?])
        } else {
            Projections::new(vec![m.linear("gate_proj")?, m.linear("up_proj")?])
        };
        let down = if m.contains("w2.weight") { m.linear("w2")? } else { m.linear("down_proj")? };
        Ok(Self { gate_up, down })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gu = self.gate_up.forward(x)?;
        self.down.forward(&(candle_nn::ops::silu(&gu[0])? * &gu[1])?)
    }
}

/// A layer's feed-forward block.
enum Mlp {
    Dense(SwiGlu),
    /// Mixture of experts: a softmax router picks `top_k` experts per token; each expert runs
    /// once per step on all the tokens routed to it (one batched product, quantized kernels
    /// included), and its outputs are added back weighted.
    Experts {
        /// `[experts, hidden]` router, in float32 (routing decides which weights run).
        router: Linear,
        experts: Vec<SwiGlu>,
        top_k: usize,
        /// Renormalize the chosen experts' weights to sum to 1.
        norm: bool,
    },
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (router, experts, top_k, norm) = match self {
            Mlp::Dense(m) => return m.forward(x),
            Mlp::Experts { router, experts, top_k, norm } => (router, experts, *top_k, *norm),
        };
        let logits = router.forward(&x.to_dtype(DType::F32)?)?.to_vec2::<f32>()?;
        let routes = route(&logits, experts.len(), top_k, norm);
        // Each token row's LoRA adapter, when the step has any: an expert's layers see only its
        // tokens' rows, so they run with those rows' adapters.
        let adapters = crate::lora::current_rows(x.dim(0)?)?;
        let mut out = x.zeros_like()?;
        for (expert, (tokens, weights)) in experts.iter().zip(routes) {
            if tokens.is_empty() {
                continue;
            }
            let n = tokens.len();
            let step = adapters.as_ref().map(|rows| {
                let tokens = tokens.iter().map(|&t| rows.get(t as usize).copied().flatten()).collect();
                std::sync::Arc::new(crate::lora::StepAdapters { tokens, logits: Vec::new() })
            });
            let idx = Tensor::from_vec(tokens, n, x.device())?;
            let xs = x.index_select(&idx, 0)?;
            let y = crate::lora::with_step_adapters(step, || expert.forward(&xs))?;
            let w = Tensor::from_vec(weights, (n, 1), x.device())?.to_dtype(y.dtype())?;
            out = out.index_add(&idx, &y.broadcast_mul(&w)?, 0)?;
        }
        Ok(out)
    }
}

/// Each expert's tokens and their routing weights: softmax over the router's logits, the
/// `top_k` largest (ties to the lower expert), renormalized when `norm`.
fn route(logits: &[Vec<f32>], experts: usize, top_k: usize, norm: bool) -> Vec<(Vec<u32>, Vec<f32>)> {
    let mut routes = vec![(Vec::new(), Vec::new()); experts];
    let mut order: Vec<usize> = Vec::with_capacity(experts);
    for (t, row) in logits.iter().enumerate() {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let sum: f32 = row.iter().map(|&v| (v - max).exp()).sum();
        order.clear();
        order.extend(0..row.len().min(experts));
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        let chosen = &order[..top_k.min(order.len())];
        let total: f32 = chosen.iter().map(|&e| (row[e] - max).exp() / sum).sum();
        for &e in chosen {
            let p = (row[e] - max).exp() / sum;
            routes[e].0.push(t as u32);
            routes[e].1.push(if norm { p / total } else { p });
        }
    }
    routes
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
        let mlp = if cfg.is_sparse(index) {
            // Mixtral keeps its experts under `block_sparse_moe`, Qwen MoE under `mlp`.
            let m = if w.contains("block_sparse_moe.gate.weight") { w.pp("block_sparse_moe") } else { m };
            // (Validated: 1 <= top_k <= experts.)
            let experts = cfg.num_experts.unwrap_or(0);
            let top_k = cfg.num_experts_per_tok.unwrap_or(2);
            let width = cfg.moe_intermediate_size.unwrap_or(cfg.intermediate_size);
            // The router stays in float32 whatever the activation dtype: it is tiny, and a
            // rounded score flips which experts run.
            let router = m.get("gate.weight")?.to_dtype(DType::F32)?;
            Mlp::Experts {
                router: Linear::dense(router, None)?,
                experts: (0..experts)
                    .map(|e| SwiGlu::load(&m.pp(format!("experts.{e}")), width))
                    .collect::<Result<_>>()?,
                top_k,
                // Mixtral renormalizes; Qwen MoE when its config says so.
                norm: cfg.norm_topk_prob.unwrap_or(true),
            }
        } else {
            Mlp::Dense(SwiGlu::load(&m, cfg.intermediate_size)?)
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
            mlp,
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
    /// The embedding's LoRA adapters (`embed_tokens` adapters and `modules_to_save` copies),
    /// when loaded for adapters.
    embed_lora: Option<Arc<crate::lora::LoraSlots>>,
    rotary: Rotary,
    spec: ModelSpec,
}

impl Llama {
    /// Loads from a weight source. `rope` is `Interleaved` for GGUF checkpoints.
    pub fn load(w: &Weights, cfg: LlamaConfig, rope: RopeStyle) -> Result<Self> {
        cfg.summary().validate()?;
        let shape = cfg.attn_shape();
        let model = w.pp("model");
        let tied = cfg.tie_word_embeddings || !w.contains("lm_head.weight");
        // Tied, on our kernels: the output matrix in the file's own form. When that is quantized
        // (or half precision) the embedding is looked up in it, not also held as floats.
        let native_head = if tied && w.options().matrices == MatrixFormat::Native && w.device().is_cpu() {
            Some(model.without_lora().linear("embed_tokens")?)
        } else {
            None
        };
        let embed = match &native_head {
            Some(head) if head.has_rows() => None,
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
            _ if w.options().matrices == MatrixFormat::CandleQuantized => {
                model.without_lora().linear("embed_tokens")?
            }
            // Tied: reuse the embedding tensor already loaded.
            (None, Some(e)) => w.linear_from(e.clone(), None)?,
            (None, None) => unreachable!("the embedding is loaded unless the output matrix is"),
        };
        // Adapters name the output head `lm_head` whatever matrix it shares (an untied head was
        // recorded under that name as it loaded).
        let lm_head = if tied { w.recorded("lm_head", lm_head)? } else { lm_head };
        let embed_lora = model.embedding_lora("embed_tokens", cfg.vocab_size, cfg.hidden_size);
        let dtype = w.options().dtype;
        let rotary = Rotary::from_inv_freq(&cfg.inv_freq(), rope, dtype, w.device())?;
        let spec = ModelSpec {
            attn_shape: shape,
            num_layers: layers.len(),
            vocab_size: cfg.vocab_size,
            max_model_len: cfg.max_position_embeddings,
            dtype,
        };
        Ok(Self { norm: model.get("norm.weight")?, embed, layers, lm_head, embed_lora, rotary, spec, cfg })
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
            None => {
                self.lm_head.rows(&input.input_ids, self.spec.dtype)?.ok_or(Error::Config("no embedding".into()))?
            }
        };
        if let Some(slots) = &self.embed_lora {
            x = crate::lora::add_embedding_adapters(slots, &input.input_ids, x)?;
        }
        let (cos, sin) = self.rotary.for_positions(&input.positions)?;
        for (i, (layer, cache)) in self.layers.iter().zip(caches).enumerate() {
            input.before_layer(i);
            let h = candle_nn::ops::rms_norm(&x, &layer.input_norm, eps)?;
            let mut qkv = layer.qkv.forward(&h)?;
            if let Some((qn, kn)) = &layer.qk_norm {
                qkv[0] = head_rms_norm(&qkv[0], qn, self.spec.attn_shape.head_dim, eps)?;
                qkv[1] = head_rms_norm(&qkv[1], kn, self.spec.attn_shape.head_dim, eps)?;
            }
            let a = layer.attn.forward(&qkv[0], &qkv[1], &qkv[2], Some((&self.rotary, &cos, &sin)), cache, input)?;
            x = (x + layer.o.forward(&a)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.post_norm, eps)?;
            x = (x + layer.mlp.forward(&h)?)?;
        }
        let x = x.index_select(&input.logits_indices, 0)?;
        let x = candle_nn::ops::rms_norm(&x, &self.norm, eps)?;
        let logits = self.lm_head.forward(&x)?;
        Ok(logits.to_dtype(DType::F32)?)
    }

    fn spec(&self) -> &ModelSpec {
        &self.spec
    }
}

#[cfg(test)]
mod tests {
    use super::route;

    /// Top-k of the softmax, ties to the lower expert, renormalized or not.
    #[test]
    fn routing_picks_the_top_k_and_renormalizes() {
        let logits = vec![vec![0.0, 2.0, 1.0, 2.0], vec![3.0, 0.0, 0.0, 0.0]];
        let routes = route(&logits, 4, 2, true);
        // Token 0: experts 1 and 3 tie at the top (equal weights); token 1: expert 0, then the
        // lowest of the tied zeros, expert 1.
        assert_eq!(routes[0].0, vec![1]);
        assert_eq!(routes[1].0, vec![0, 1]);
        assert_eq!(routes[2].0, Vec::<u32>::new());
        assert_eq!(routes[3].0, vec![0]);
        assert!((routes[1].1[0] - 0.5).abs() < 1e-6 && (routes[3].1[0] - 0.5).abs() < 1e-6);
        let e3 = 3f32.exp();
        assert!((routes[0].1[0] - e3 / (e3 + 1.0)).abs() < 1e-6);
        // Without renormalization the weights are the softmax probabilities themselves.
        let raw = route(&logits, 4, 2, false);
        let total = 1.0 + 2.0 * 2f32.exp() + 1f32.exp();
        assert!((raw[1].1[0] - 2f32.exp() / total).abs() < 1e-6);
    }
}
