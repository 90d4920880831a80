//! OPT (`OPTForCausalLM`, vLLM's quickstart model `facebook/opt-125m`).
//!
//! Reference: Hugging Face `transformers/models/opt/modeling_opt.py`. Learned absolute
//! positions (offset by 2), LayerNorm before (or, with `do_layer_norm_before: false`, after)
//! each block, biased projections, ReLU MLP, no rotation; the output shares the embedding
//! matrix. Checkpoints whose embeddings are narrower than the model (`project_in/out`,
//! opt-350m) are rejected.

use candle_core::{DType, Tensor};
use rayon::prelude::*;
use serde::Deserialize;
use vllm_kernels::{AttnShape, KvCache};

use crate::attention::{PagedAttention, RopeStyle};
use crate::info::KvLayout;
use crate::layers::{check_caches, output_layer, LayerNorm};
use crate::linear::Linear;
use crate::registry::DecoderConfig;
use crate::validate::{Field, Names, Summary, TensorNames};
use crate::weights::Weights;
use crate::{CausalLM, Error, ModelSpec, Result, StepInput};

/// `config.json` of an OPT checkpoint.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct OptConfig {
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub ffn_dim: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Context length.
    pub max_position_embeddings: usize,
    /// Embedding width (must equal `hidden_size`).
    #[serde(default)]
    pub word_embed_proj_dim: Option<usize>,
    /// Pre-LayerNorm (true for every size but 350m).
    #[serde(default = "yes")]
    pub do_layer_norm_before: bool,
    /// MLP activation (`relu`).
    #[serde(default = "relu")]
    pub activation_function: String,
}

fn yes() -> bool {
    true
}
fn relu() -> String {
    "relu".into()
}

/// OPT's learned positions start at index 2 (1 is padding).
const POSITION_OFFSET: u32 = 2;
const LN_EPS: f32 = 1e-5;

struct Layer {
    attn_norm: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    ffn_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    attn: PagedAttention,
}

/// An OPT causal language model.
pub struct Opt {
    cfg: OptConfig,
    embed: Tensor,
    positions: Tensor,
    layers: Vec<Layer>,
    final_norm: Option<LayerNorm>,
    lm_head: Linear,
    spec: ModelSpec,
}

impl OptConfig {
    /// Parses a Hugging Face `config.json`.
    pub fn from_hf(raw: serde_json::Value) -> Result<Self> {
        let cfg: Self = serde_json::from_value(raw).map_err(|e| Error::Config(format!("config.json: {e}")))?;
        if cfg.word_embed_proj_dim.is_some_and(|d| d != cfg.hidden_size) {
            return Err(Error::Config(
                "OPT with word_embed_proj_dim != hidden_size (project_in/out) is not supported".into(),
            ));
        }
        if cfg.activation_function != "relu" {
            return Err(Error::Config(format!("OPT activation '{}' is not supported (relu)", cfg.activation_function)));
        }
        Ok(cfg)
    }

    /// The attention head layout (sizes the KV cache): multi-head, width over heads (0
    /// without heads).
    pub fn attn_shape(&self) -> AttnShape {
        let heads = self.num_attention_heads;
        AttnShape { num_heads: heads, num_kv_heads: heads, head_dim: self.hidden_size.checked_div(heads).unwrap_or(0) }
    }
}

/// OPT's `config.json` spelling: Llama's, but `ffn_dim` for the MLP width.
const OPT_NAMES: &[(Field, &str)] = &[(Field::Intermediate, "ffn_dim")];

impl DecoderConfig for OptConfig {
    fn summary(&self) -> Summary {
        let kv = KvLayout::new(self.num_hidden_layers, self.attn_shape(), |_| None);
        Summary {
            context_length: self.max_position_embeddings,
            kv,
            hidden_size: self.hidden_size,
            intermediate_size: Some(self.ffn_dim),
            experts: None,
            vocab_size: self.vocab_size,
            head_dim_derived: true,
            rotary: false,
            scalars: Vec::new(),
            names: Names::ConfigJson(OPT_NAMES),
            tensors: TensorNames {
                embedding: &["model.decoder.embed_tokens.weight"],
                head: Some("lm_head.weight"),
                positions: Some((&["model.decoder.embed_positions.weight"], POSITION_OFFSET as usize)),
            },
        }
    }

    /// OPT has no rotary embeddings: `rope` is not used.
    fn load(self: Box<Self>, w: &Weights, _rope: RopeStyle) -> Result<Box<dyn CausalLM>> {
        Ok(Box::new(Opt::load(w, *self)?))
    }
}

impl Opt {
    /// Loads from a Hugging Face weight source.
    pub fn load(w: &Weights, cfg: OptConfig) -> Result<Self> {
        cfg.summary().validate()?;
        let shape = cfg.attn_shape();
        let d = w.pp("model.decoder");
        let layers = (0..cfg.num_hidden_layers)
            .into_par_iter()
            .map(|i| {
                let l = d.pp(format!("layers.{i}"));
                let a = l.pp("self_attn");
                Ok(Layer {
                    attn_norm: LayerNorm::load(&l, "self_attn_layer_norm")?,
                    q: a.linear("q_proj")?,
                    k: a.linear("k_proj")?,
                    v: a.linear("v_proj")?,
                    out: a.linear("out_proj")?,
                    ffn_norm: LayerNorm::load(&l, "final_layer_norm")?,
                    fc1: l.linear("fc1")?,
                    fc2: l.linear("fc2")?,
                    attn: PagedAttention::new(shape, 1.0 / (shape.head_dim as f32).sqrt()),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let embed = d.get("embed_tokens.weight")?;
        let lm_head = output_layer(w, &embed)?;
        let final_norm =
            if d.contains("final_layer_norm.weight") { Some(LayerNorm::load(&d, "final_layer_norm")?) } else { None };
        Ok(Self {
            positions: d.get("embed_positions.weight")?,
            embed,
            spec: ModelSpec {
                attn_shape: shape,
                num_layers: layers.len(),
                vocab_size: cfg.vocab_size,
                max_model_len: cfg.max_position_embeddings,
                dtype: w.options().dtype,
            },
            layers,
            final_norm,
            lm_head,
            cfg,
        })
    }
}

impl CausalLM for Opt {
    fn forward(&self, input: &StepInput, caches: &[KvCache]) -> Result<Tensor> {
        check_caches(caches.len(), self.layers.len())?;
        let pos = (&input.positions + POSITION_OFFSET as f64)?;
        let mut x = (self.embed.index_select(&input.input_ids, 0)? + self.positions.index_select(&pos, 0)?)?;
        let pre = self.cfg.do_layer_norm_before;
        for (i, (l, cache)) in self.layers.iter().zip(caches).enumerate() {
            input.before_layer(i);
            let h = if pre { l.attn_norm.forward(&x, LN_EPS)? } else { x.clone() };
            let a = l.attn.forward(&l.q.forward(&h)?, &l.k.forward(&h)?, &l.v.forward(&h)?, None, cache, input)?;
            x = (x + l.out.forward(&a)?)?;
            if !pre {
                x = l.attn_norm.forward(&x, LN_EPS)?;
            }
            let h = if pre { l.ffn_norm.forward(&x, LN_EPS)? } else { x.clone() };
            x = (x + l.fc2.forward(&l.fc1.forward(&h)?.relu()?)?)?;
            if !pre {
                x = l.ffn_norm.forward(&x, LN_EPS)?;
            }
        }
        let mut x = x.index_select(&input.logits_indices, 0)?;
        if let Some(n) = &self.final_norm {
            x = n.forward(&x, LN_EPS)?;
        }
        Ok(self.lm_head.forward(&x)?.to_dtype(DType::F32)?)
    }

    fn spec(&self) -> &ModelSpec {
        &self.spec
    }
}
