//! What a model file may say. Every load path ([`crate::load_gguf`], [`crate::load_hf_dir`],
//! [`crate::bert::BertEmbedder::load_dir`] and [`crate::inspect`]) reads a checkpoint's
//! configuration into one [`Summary`] and runs [`Summary::validate`] on it, then (loaders only)
//! [`Summary::check_tensors`] against the tensor shapes in the file's headers, before any weight
//! is read. A configuration that passes has every dimension positive, below a bound no real
//! checkpoint comes near, and consistent with the others and with the tensors, and every size
//! product derived from it fits 64 bits: no later step can divide by zero, overflow a size or
//! index past a row. docs/models.md, "Hostile files".

use std::fmt;

use crate::info::KvLayout;
use crate::weights::Weights;
use crate::{Error, Result};

/// Decoder (or encoder) layers: real checkpoints have at most a few hundred.
pub const MAX_LAYERS: usize = 1 << 12;
/// Model and MLP widths (Llama 3.1 405B: 16,384 and 53,248).
pub const MAX_WIDTH: usize = 1 << 18;
/// Attention heads, query or key/value.
pub const MAX_HEADS: usize = 1 << 12;
/// One head's size (the largest in use: 256).
pub const MAX_HEAD_DIM: usize = 1 << 12;
/// Vocabulary (Gemma 3: 262,144 tokens).
pub const MAX_VOCAB: usize = 1 << 24;
/// Experts per layer (the largest in use: a few hundred).
pub const MAX_EXPERTS: usize = 1 << 12;
/// Context length: positions are 32-bit.
pub const MAX_CONTEXT: usize = u32::MAX as usize;

/// A number a configuration sets, by what it means (the file's own key is [`Names::of`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// Decoder layers.
    Layers,
    /// Model width.
    Hidden,
    /// Query heads.
    Heads,
    /// Key/value heads.
    KvHeads,
    /// One head's size.
    HeadDim,
    /// The dense MLP's width.
    Intermediate,
    /// Vocabulary size.
    Vocab,
    /// Context length.
    Context,
    /// Experts per layer.
    Experts,
    /// Experts each token is routed to.
    ExpertsPerToken,
    /// One expert's MLP width.
    ExpertWidth,
}

impl Field {
    /// The `config.json` key in Llama's (and most architectures') spelling.
    pub fn config_json(self) -> &'static str {
        match self {
            Field::Layers => "num_hidden_layers",
            Field::Hidden => "hidden_size",
            Field::Heads => "num_attention_heads",
            Field::KvHeads => "num_key_value_heads",
            Field::HeadDim => "head_dim",
            Field::Intermediate => "intermediate_size",
            Field::Vocab => "vocab_size",
            Field::Context => "max_position_embeddings",
            Field::Experts => "num_experts",
            Field::ExpertsPerToken => "num_experts_per_tok",
            Field::ExpertWidth => "moe_intermediate_size",
        }
    }

    /// The GGUF key, after the `{arch}.` prefix.
    pub fn gguf(self) -> &'static str {
        match self {
            Field::Layers => "block_count",
            Field::Hidden => "embedding_length",
            Field::Heads => "attention.head_count",
            Field::KvHeads => "attention.head_count_kv",
            Field::HeadDim => "attention.key_length",
            Field::Intermediate => "feed_forward_length",
            Field::Vocab => "vocab_size",
            Field::Context => "context_length",
            Field::Experts => "expert_count",
            Field::ExpertsPerToken => "expert_used_count",
            Field::ExpertWidth => "expert_feed_forward_length",
        }
    }
}

/// How the file spells its keys, so an error names the key the file has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Names {
    /// `config.json`: Llama's spelling ([`Field::config_json`]) but for the architecture's
    /// own names of some fields.
    ConfigJson(&'static [(Field, &'static str)]),
    /// GGUF metadata of this `general.architecture`.
    Gguf(String),
}

impl Names {
    /// `config.json` in Llama's spelling.
    pub const CONFIG_JSON: Names = Names::ConfigJson(&[]);

    /// The key holding `field`.
    pub fn of(&self, field: Field) -> String {
        match self {
            Names::ConfigJson(own) => {
                own.iter().find(|(f, _)| *f == field).map_or(field.config_json(), |(_, name)| name).to_string()
            }
            Names::Gguf(arch) => format!("{arch}.{}", field.gguf()),
        }
    }
}

/// A mixture of experts' sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Experts {
    /// Experts per sparse layer.
    pub count: usize,
    /// Experts each token is routed to.
    pub per_token: usize,
    /// Each expert's MLP width.
    pub width: usize,
}

/// Where a configuration meets the tensors (Hugging Face names; of each list, the first name
/// the checkpoint holds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorNames {
    /// The token embedding: `[vocab, hidden]`.
    pub embedding: &'static [&'static str],
    /// The output head, when the checkpoint has its own: `[vocab, hidden]`.
    pub head: Option<&'static str>,
    /// A learned position table (`[positions, hidden]`) and how many of its rows precede
    /// position 0 (OPT: 2): it must cover the context.
    pub positions: Option<(&'static [&'static str], usize)>,
}

impl TensorNames {
    /// The Llama family's (and Gemma's) names: `model.embed_tokens`, `lm_head`, rotary positions.
    pub const LLAMA: TensorNames =
        TensorNames { embedding: &["model.embed_tokens.weight"], head: Some("lm_head.weight"), positions: None };
}

/// What a configuration says about a model's size, read before any weight is loaded: what
/// [`Summary::validate`] checks and what model-info prints.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Context length the model was trained for.
    pub context_length: usize,
    /// The attention layout (sizes the KV cache).
    pub kv: KvLayout,
    /// Model width.
    pub hidden_size: usize,
    /// The dense MLP's width; `None` when no layer has a dense MLP.
    pub intermediate_size: Option<usize>,
    /// The mixture of experts, if any.
    pub experts: Option<Experts>,
    /// Vocabulary size: the logits' width.
    pub vocab_size: usize,
    /// Whether the head size is the width over the heads (then the heads must divide it).
    pub head_dim_derived: bool,
    /// Whether heads are rotated (then the head size is even).
    pub rotary: bool,
    /// Other numbers the configuration sets (rotary bases, norm epsilons, scales), by key:
    /// each must be finite and positive.
    pub scalars: Vec<(&'static str, f64)>,
    /// How the file spells its keys.
    pub names: Names,
    /// Where the configuration meets the tensors.
    pub tensors: TensorNames,
}

/// A refusal naming the key, its value and why.
fn refuse(names: &Names, field: Field, value: impl fmt::Display, reason: impl Into<String>) -> Error {
    Error::InvalidConfig { field: names.of(field), value: value.to_string(), reason: reason.into() }
}

impl Summary {
    /// The same configuration read from GGUF metadata of `arch` (errors name GGUF keys).
    pub fn from_gguf(self, arch: &str) -> Self {
        Self { names: Names::Gguf(arch.to_string()), ..self }
    }

    fn refuse(&self, field: Field, value: impl fmt::Display, reason: impl Into<String>) -> Error {
        refuse(&self.names, field, value, reason)
    }

    /// Checks the configuration on its own (see the module docs): every dimension in 1..=its
    /// bound, heads dividing the width when the head size is derived from it, key/value heads
    /// dividing the query heads, an even head size when rotated, at least one and at most all
    /// experts per token, finite positive scalars, and every size product in 64 bits.
    pub fn validate(&self) -> Result<()> {
        let kv = &self.kv;
        let mut bounded = vec![
            (Field::Layers, kv.layers, MAX_LAYERS),
            (Field::Hidden, self.hidden_size, MAX_WIDTH),
            (Field::Heads, kv.heads, MAX_HEADS),
            (Field::KvHeads, kv.kv_heads, MAX_HEADS),
            (Field::HeadDim, kv.head_dim, MAX_HEAD_DIM),
            (Field::Vocab, self.vocab_size, MAX_VOCAB),
            (Field::Context, self.context_length, MAX_CONTEXT),
        ];
        bounded.extend(self.intermediate_size.map(|w| (Field::Intermediate, w, MAX_WIDTH)));
        if let Some(e) = &self.experts {
            bounded.extend([
                (Field::Experts, e.count, MAX_EXPERTS),
                (Field::ExpertsPerToken, e.per_token, MAX_EXPERTS),
                (Field::ExpertWidth, e.width, MAX_WIDTH),
            ]);
        }
        for (field, value, max) in bounded {
            if value == 0 || value > max {
                return Err(self.refuse(field, value, format!("must be between 1 and {max}")));
            }
        }
        if self.head_dim_derived && !self.hidden_size.is_multiple_of(kv.heads) {
            let hidden = self.names.of(Field::Hidden);
            return Err(self.refuse(
                Field::Heads,
                kv.heads,
                format!("does not divide {hidden} ({})", self.hidden_size),
            ));
        }
        if !kv.heads.is_multiple_of(kv.kv_heads) {
            let heads = self.names.of(Field::Heads);
            return Err(self.refuse(Field::KvHeads, kv.kv_heads, format!("does not divide {heads} ({})", kv.heads)));
        }
        if self.rotary && kv.head_dim % 2 == 1 {
            return Err(self.refuse(Field::HeadDim, kv.head_dim, "rotary embeddings need an even head size"));
        }
        if let Some(e) = self.experts.filter(|e| e.per_token > e.count) {
            let count = self.names.of(Field::Experts);
            return Err(self.refuse(Field::ExpertsPerToken, e.per_token, format!("more than {count} ({})", e.count)));
        }
        if let Some((key, value)) = self.scalars.iter().find(|(_, v)| !(v.is_finite() && *v > 0.0)) {
            return Err(Error::InvalidConfig {
                field: key.to_string(),
                value: value.to_string(),
                reason: "must be a finite positive number".into(),
            });
        }
        if self.parameters().is_none() || kv.checked_bytes_per_token(8).is_none() {
            return Err(self.refuse(Field::Hidden, self.hidden_size, "the sizes' products overflow 64 bits"));
        }
        Ok(())
    }

    /// The parameters of the matrices the configuration implies (embedding, output head,
    /// attention and MLP projections), in checked arithmetic: `None` if a product overflows.
    pub fn parameters(&self) -> Option<u64> {
        let n = |v: usize| v as u64;
        let kv = &self.kv;
        let (hidden, head) = (n(self.hidden_size), n(kv.head_dim));
        let q = n(kv.heads).checked_mul(head)?;
        let k = n(kv.kv_heads).checked_mul(head)?;
        // Q, K, V in; the output projection back.
        let attention = hidden.checked_mul(q.checked_mul(2)?.checked_add(k.checked_mul(2)?)?)?;
        let dense = hidden.checked_mul(n(self.intermediate_size.unwrap_or(0)))?.checked_mul(3)?;
        let sparse = match self.experts {
            Some(e) => hidden.checked_mul(n(e.width))?.checked_mul(3)?.checked_mul(n(e.count))?,
            None => 0,
        };
        let layer = attention.checked_add(dense)?.checked_add(sparse)?;
        let embeddings = n(self.vocab_size).checked_mul(hidden)?.checked_mul(2)?;
        n(kv.layers).checked_mul(layer)?.checked_add(embeddings)
    }

    /// Checks the configuration against the tensors it sizes, from the file's headers (no
    /// tensor is read): the token embedding and any output head are `[vocab, hidden]` (vLLM
    /// and llama.cpp refuse a mismatch too), and a learned position table covers the context.
    pub fn check_tensors(&self, w: &Weights) -> Result<()> {
        let t = &self.tensors;
        let found = |names: &'static [&'static str]| names.iter().copied().find(|n| w.contains(n));
        // A tensor's shape, and its name in the file (for errors).
        let matrix = |name: &str| -> Result<(usize, usize, String)> {
            let stored = w.stored_name(name);
            match w.shape(name).as_deref() {
                Some(&[rows, cols]) => Ok((rows, cols, stored)),
                other => Err(Error::Format(format!("tensor {stored} has shape {other:?}, not a matrix"))),
            }
        };
        let embedding = found(t.embedding).ok_or_else(|| Error::MissingTensor(t.embedding[0].to_string()))?;
        let head = t.head.filter(|h| w.contains(h));
        for name in std::iter::once(embedding).chain(head) {
            let (rows, cols, name) = matrix(name)?;
            if rows != self.vocab_size {
                return Err(self.refuse(Field::Vocab, self.vocab_size, format!("{name} has {rows} rows")));
            }
            if cols != self.hidden_size {
                return Err(self.refuse(Field::Hidden, self.hidden_size, format!("{name} has {cols} columns")));
            }
        }
        if let Some((names, offset)) = t.positions {
            let name = found(names).ok_or_else(|| Error::MissingTensor(names[0].to_string()))?;
            let (rows, cols, name) = matrix(name)?;
            if rows.saturating_sub(offset) < self.context_length || cols != self.hidden_size {
                return Err(self.refuse(
                    Field::Context,
                    self.context_length,
                    format!(
                        "the learned position table {name} is [{rows}, {cols}]: room for {} positions of width {}",
                        rows.saturating_sub(offset),
                        self.hidden_size
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm() -> Summary {
        Summary {
            context_length: 8192,
            kv: KvLayout { layers: 30, heads: 9, kv_heads: 3, head_dim: 64, sliding: None },
            hidden_size: 576,
            intermediate_size: Some(1536),
            experts: None,
            vocab_size: 49152,
            head_dim_derived: true,
            rotary: true,
            scalars: vec![("rope_theta", 100_000.0), ("rms_norm_eps", 1e-5)],
            names: Names::CONFIG_JSON,
            tensors: TensorNames::LLAMA,
        }
    }

    /// A change to a configuration.
    type Edit = fn(&mut Summary);

    /// The default model passes; each hostile value is refused naming its key, in the
    /// spelling of the file it came from.
    #[test]
    fn hostile_values_are_refused_by_name() {
        smollm().validate().unwrap();
        // SmolLM2-135M: 30 layers of (576 x (576 + 2 x 192 + 576)) attention and 3 x 576 x 1536
        // MLP, and two 49152 x 576 embeddings (tied in the file, counted twice here).
        assert_eq!(smollm().parameters(), Some(30 * (576 * 1536 + 3 * 576 * 1536) + 2 * 49152 * 576));
        let cases: &[(Edit, &str)] = &[
            (|s| s.vocab_size = 1 << 31, "vocab_size = 2147483648: must be between 1 and 16777216"),
            (|s| s.context_length = u32::MAX as usize + 1, "max_position_embeddings = 4294967296"),
            (|s| s.kv.heads = 0, "num_attention_heads = 0"),
            (|s| s.hidden_size = 0, "hidden_size = 0"),
            (|s| s.kv.heads = 7, "num_attention_heads = 7: does not divide hidden_size (576)"),
            (|s| s.kv.kv_heads = 2, "num_key_value_heads = 2: does not divide num_attention_heads (9)"),
            (|s| s.kv.head_dim = 63, "head_dim = 63: rotary embeddings need an even head size"),
            (|s| s.kv.layers = 1_000_000_000, "num_hidden_layers = 1000000000"),
            (|s| s.intermediate_size = Some(0), "intermediate_size = 0"),
            (|s| s.scalars[0].1 = f64::NAN, "rope_theta = NaN: must be a finite positive number"),
            (
                |s| s.experts = Some(Experts { count: 8, per_token: 9, width: 64 }),
                "num_experts_per_tok = 9: more than num_experts (8)",
            ),
        ];
        for (edit, want) in cases {
            let mut s = smollm();
            edit(&mut s);
            let err = s.validate().unwrap_err().to_string();
            assert!(err.contains(want), "{err} (want {want})");
        }
        let mut s = smollm().from_gguf("llama");
        s.vocab_size = 1 << 31;
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("llama.vocab_size = 2147483648"), "{err}");
    }

    /// At the bounds every product still fits 64 bits, so nothing sized from a configuration
    /// that passes can overflow.
    #[test]
    fn products_at_the_bounds_fit() {
        let mut s = smollm();
        s.kv = KvLayout {
            layers: MAX_LAYERS,
            heads: MAX_HEADS,
            kv_heads: MAX_HEADS,
            head_dim: MAX_HEAD_DIM,
            sliding: None,
        };
        s.hidden_size = MAX_WIDTH;
        s.intermediate_size = Some(MAX_WIDTH);
        s.experts = Some(Experts { count: MAX_EXPERTS, per_token: MAX_EXPERTS, width: MAX_WIDTH });
        s.vocab_size = MAX_VOCAB;
        s.context_length = MAX_CONTEXT;
        s.validate().unwrap();
    }
}
