//! BERT encoders for embeddings (`BertModel`, e.g. sentence-transformers' all-MiniLM-L6-v2).
//!
//! Reference: Hugging Face `transformers/models/bert/modeling_bert.py` and
//! sentence-transformers' `Pooling` / `Normalize` modules. Word + position + token-type
//! embeddings, post-LayerNorm blocks with bidirectional attention over each (padded) sequence,
//! exact-erf GELU; then the folder's pooling (`1_Pooling/config.json`: mean, CLS or max over
//! the tokens) and, when `modules.json` lists `Normalize`, unit length.
//!
//! Encoders do not use the paged cache: a batch is padded to its longest sequence and run
//! in one pass.
//!
//! LoRA adapters: loaded with a [`LoraRegistry`], every linear layer is recorded under its
//! checkpoint name (`encoder.layer.0.attention.self.query`, ...), the word embeddings as an
//! embedding, and the pooler's `dense` (never run) so that PEFT's `target_modules=["dense"]`,
//! which matches it too, installs; [`BertEmbedder::embed_with_adapters`] runs each sequence
//! with its adapter.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use serde::Deserialize;

use vllm_kernels::AttnShape;

use crate::info::KvLayout;
use crate::layers::LayerNorm;
use crate::linear::Linear;
use crate::lora::{LoraRegistry, LoraSlots, StepAdapters};
use crate::validate::{Names, Summary, TensorNames};
use crate::weights::{LoadOptions, Weights};
use crate::{registry, safetensors_files, Error, Result};

/// `config.json` of a BERT checkpoint.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct BertConfig {
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Longest input.
    pub max_position_embeddings: usize,
    /// LayerNorm epsilon.
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    /// MLP activation (`gelu`, exact).
    #[serde(default = "gelu")]
    pub hidden_act: String,
    /// Only `absolute` positions are supported.
    #[serde(default = "absolute")]
    pub position_embedding_type: String,
}

impl BertConfig {
    /// Parses a Hugging Face `config.json`.
    pub fn from_hf(raw: serde_json::Value) -> Result<Self> {
        let cfg: Self = serde_json::from_value(raw).map_err(|e| Error::Config(format!("config.json: {e}")))?;
        if cfg.hidden_act != "gelu" || cfg.position_embedding_type != "absolute" {
            return Err(Error::Config("BERT with other than gelu and absolute positions is not supported".into()));
        }
        Ok(cfg)
    }

    /// Its size, for [`Summary::validate`] (run before any weight is read) and model-info:
    /// multi-head attention of width over heads, learned positions.
    pub fn summary(&self) -> Summary {
        let heads = self.num_attention_heads;
        let shape = AttnShape {
            num_heads: heads,
            num_kv_heads: heads,
            head_dim: self.hidden_size.checked_div(heads).unwrap_or(0),
        };
        Summary {
            context_length: self.max_position_embeddings,
            kv: KvLayout::new(self.num_hidden_layers, shape, |_| None),
            hidden_size: self.hidden_size,
            intermediate_size: Some(self.intermediate_size),
            experts: None,
            vocab_size: self.vocab_size,
            head_dim_derived: true,
            rotary: false,
            scalars: vec![("layer_norm_eps", self.layer_norm_eps)],
            names: Names::CONFIG_JSON,
            tensors: TensorNames {
                embedding: &["bert.embeddings.word_embeddings.weight", "embeddings.word_embeddings.weight"],
                head: None,
                positions: Some((
                    &["bert.embeddings.position_embeddings.weight", "embeddings.position_embeddings.weight"],
                    0,
                )),
            },
        }
    }
}

fn eps() -> f64 {
    1e-12
}
fn gelu() -> String {
    "gelu".into()
}
fn absolute() -> String {
    "absolute".into()
}

/// How token states become one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolingMode {
    /// Mean over the tokens (sentence-transformers' default).
    Mean,
    /// The first (`[CLS]`) token.
    Cls,
    /// Element-wise maximum over the tokens.
    Max,
}

/// The folder's sentence-transformers pooling, or mean + normalize when it has none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pooling {
    /// How tokens are combined.
    pub mode: PoolingMode,
    /// Scaled to unit length afterwards.
    pub normalize: bool,
}

impl Pooling {
    /// Reads `modules.json` and the pooling module's `config.json` from a folder.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let read = |p: &Path| -> Result<Option<serde_json::Value>> {
            match std::fs::read_to_string(p) {
                Ok(t) => serde_json::from_str(&t).map(Some).map_err(|e| Error::Config(format!("{}: {e}", p.display()))),
                Err(_) => Ok(None),
            }
        };
        let Some(modules) = read(&dir.join("modules.json"))? else {
            return Ok(Self { mode: PoolingMode::Mean, normalize: true });
        };
        let modules = modules.as_array().cloned().unwrap_or_default();
        let kind = |m: &serde_json::Value| m["type"].as_str().unwrap_or_default().to_string();
        let normalize = modules.iter().any(|m| kind(m).ends_with("Normalize"));
        let mut mode = PoolingMode::Mean;
        if let Some(p) = modules.iter().find(|m| kind(m).ends_with("Pooling")) {
            let cfg =
                read(&dir.join(p["path"].as_str().unwrap_or("1_Pooling")).join("config.json"))?.unwrap_or_default();
            let on = |k: &str| cfg.get(k).and_then(|v| v.as_bool()).unwrap_or(false);
            mode = if on("pooling_mode_cls_token") {
                PoolingMode::Cls
            } else if on("pooling_mode_max_tokens") {
                PoolingMode::Max
            } else if on("pooling_mode_mean_sqrt_len_tokens") || on("pooling_mode_weightedmean_tokens") {
                return Err(Error::Config("only mean, cls and max pooling are supported".into()));
            } else {
                PoolingMode::Mean
            };
        }
        Ok(Self { mode, normalize })
    }
}

struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    inter: Linear,
    out: Linear,
    out_norm: LayerNorm,
}

/// A BERT encoder with its pooling: text in, one vector per input out.
pub struct BertEmbedder {
    cfg: BertConfig,
    word: Tensor,
    /// The word embeddings' adapter slots (a model loaded for LoRA adapters).
    word_lora: Option<Arc<LoraSlots>>,
    position: Tensor,
    token_type: Tensor,
    emb_norm: LayerNorm,
    layers: Vec<Layer>,
    pooling: Pooling,
    device: Device,
}

impl BertEmbedder {
    /// Loads a folder (`config.json` with `BertModel`, safetensors, sentence-transformers
    /// pooling files).
    pub fn load_dir(dir: &Path, opts: LoadOptions, device: &Device) -> Result<Self> {
        Self::load_dir_with(dir, opts, device, None)
    }

    /// [`Self::load_dir`], recording every layer in `lora` for LoRA adapters.
    pub fn load_dir_with(
        dir: &Path,
        opts: LoadOptions,
        device: &Device,
        lora: Option<Arc<LoraRegistry>>,
    ) -> Result<Self> {
        let (raw, arch) = crate::read_hf_config(dir)?;
        if !registry::by_hf_class(&arch).is_some_and(|a| a.is_encoder()) {
            let supported = registry::encoder_classes().collect::<Vec<_>>().join(", ");
            return Err(Error::UnsupportedArchitecture { name: arch, supported });
        }
        let cfg = BertConfig::from_hf(raw)?;
        let summary = cfg.summary();
        summary.validate()?;
        // Encoders run in float32 (their cost is small; pooling is sensitive).
        let opts = LoadOptions { dtype: DType::F32, ..opts };
        let w = Weights::from_safetensors(&safetensors_files(dir)?, opts, device)?.with_lora(lora);
        summary.check_tensors(&w)?;
        let w = if w.contains("bert.embeddings.word_embeddings.weight") { w.pp("bert") } else { w };
        w.record_unused("pooler.dense");
        let e = w.pp("embeddings");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = w.pp(format!("encoder.layer.{i}"));
                Ok(Layer {
                    q: l.linear("attention.self.query")?,
                    k: l.linear("attention.self.key")?,
                    v: l.linear("attention.self.value")?,
                    attn_out: l.linear("attention.output.dense")?,
                    attn_norm: LayerNorm::load(&l, "attention.output.LayerNorm")?,
                    inter: l.linear("intermediate.dense")?,
                    out: l.linear("output.dense")?,
                    out_norm: LayerNorm::load(&l, "output.LayerNorm")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let word = e.get("word_embeddings.weight")?;
        let word_lora = e.embedding_lora("word_embeddings", word.dim(0)?, word.dim(1)?);
        Ok(Self {
            word,
            word_lora,
            position: e.get("position_embeddings.weight")?,
            token_type: e.get("token_type_embeddings.weight")?,
            emb_norm: LayerNorm::load(&e, "LayerNorm")?,
            layers,
            pooling: Pooling::from_dir(dir)?,
            device: device.clone(),
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &BertConfig {
        &self.cfg
    }

    /// The pooling applied after the encoder.
    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    /// Vector width.
    pub fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }

    /// Encodes a batch of token-id sequences (each at most `max_position_embeddings`, none
    /// empty) into one vector each.
    pub fn embed(&self, batch: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        self.embed_with_adapters(batch, &[])
    }

    /// [`Self::embed`] with sequence `i` run with LoRA adapter `adapters[i]`: an id installed
    /// in the model's registry, or `None` for the base model (`adapters` empty: the base for
    /// every sequence). Sequences of several adapters and of the base share the pass.
    pub fn embed_with_adapters(&self, batch: &[Vec<u32>], adapters: &[Option<u32>]) -> Result<Vec<Vec<f32>>> {
        if !adapters.is_empty() && adapters.len() != batch.len() {
            return Err(Error::Config(format!("{} adapters for {} sequences", adapters.len(), batch.len())));
        }
        let len = batch.iter().map(Vec::len).max().unwrap_or(0);
        // Every row of the padded batch (each sequence's padding too) runs with its sequence's.
        let step = adapters.iter().any(Option::is_some).then(|| {
            let tokens = adapters.iter().flat_map(|&a| std::iter::repeat_n(a, len)).collect();
            Arc::new(StepAdapters { tokens, logits: Vec::new() })
        });
        crate::lora::with_step_adapters(step, || self.forward(batch))
    }

    fn forward(&self, batch: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let b = batch.len();
        let len = batch.iter().map(Vec::len).max().unwrap_or(0);
        if len == 0 || len > self.cfg.max_position_embeddings {
            return Err(Error::Config(format!("inputs must have 1 to {} tokens", self.cfg.max_position_embeddings)));
        }
        let (h, heads) = (self.cfg.hidden_size, self.cfg.num_attention_heads);
        let d = h / heads;
        let eps = self.cfg.layer_norm_eps as f32;
        let mut ids = Vec::with_capacity(b * len);
        let mut mask = Vec::with_capacity(b * len);
        for s in batch {
            ids.extend(s.iter().copied().chain(std::iter::repeat_n(0, len - s.len())));
            mask.extend((0..len).map(|i| if i < s.len() { 1f32 } else { 0.0 }));
        }
        let ids = Tensor::from_vec(ids, b * len, &self.device)?;
        let mask = Tensor::from_vec(mask, (b, len), &self.device)?;
        // Padded keys get -inf-like scores: [b, 1, 1, len].
        let bias = ((mask.clone() - 1.0)? * 1e9)?.reshape((b, 1, 1, len))?;
        let pos = self.position.narrow(0, 0, len)?.repeat((b, 1))?;
        let words = self.word.index_select(&ids, 0)?;
        let words = match &self.word_lora {
            Some(slots) => crate::lora::add_embedding_adapters(slots, &ids, words)?,
            None => words,
        };
        let x = (words + pos)?.broadcast_add(&self.token_type.get(0)?)?;
        let mut x = self.emb_norm.forward(&x, eps)?;
        let heads_of =
            |t: Tensor| -> Result<Tensor> { Ok(t.reshape((b, len, heads, d))?.transpose(1, 2)?.contiguous()?) };
        for l in &self.layers {
            let (q, k, v) = (heads_of(l.q.forward(&x)?)?, heads_of(l.k.forward(&x)?)?, heads_of(l.v.forward(&x)?)?);
            let scores = (q.matmul(&k.t()?)? * (1.0 / (d as f64).sqrt()))?.broadcast_add(&bias)?;
            let p = candle_nn::ops::softmax_last_dim(&scores)?;
            let ctx = p.matmul(&v)?.transpose(1, 2)?.contiguous()?.reshape((b * len, h))?;
            let a = l.attn_norm.forward(&(l.attn_out.forward(&ctx)? + &x)?, eps)?;
            let m = vllm_kernels::gelu_erf(&l.inter.forward(&a)?)?;
            x = l.out_norm.forward(&(l.out.forward(&m)? + a)?, eps)?;
        }
        let x = x.reshape((b, len, h))?;
        let pooled = match self.pooling.mode {
            PoolingMode::Cls => x.narrow(1, 0, 1)?.squeeze(1)?,
            PoolingMode::Mean => {
                let m = mask.unsqueeze(2)?;
                let sum = x.broadcast_mul(&m)?.sum(1)?;
                sum.broadcast_div(&m.sum(1)?.clamp(1e-9, f64::MAX)?)?
            }
            PoolingMode::Max => {
                let m = ((mask.unsqueeze(2)? - 1.0)? * 1e9)?;
                x.broadcast_add(&m)?.max(1)?
            }
        };
        let pooled = if self.pooling.normalize {
            let norm = pooled.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
            pooled.broadcast_div(&norm)?
        } else {
            pooled
        };
        Ok(pooled.to_vec2::<f32>()?)
    }
}
