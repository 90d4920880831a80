//! Small pieces several architectures share: LayerNorm with bias, the tied-or-separate output
//! layer, and the cache-count check of a forward pass.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use candle_core::Tensor;

use crate::linear::Linear;
use crate::weights::Weights;
use crate::{Error, Result};

/// LayerNorm with weight and bias (OPT, GPT-2, BERT).
pub(crate) struct LayerNorm {
    w: Tensor,
    b: Tensor,
}

impl LayerNorm {
    /// Loads `{name}.weight` and `{name}.bias`.
    pub(crate) fn load(w: &Weights, name: &str) -> Result<Self> {
        Ok(Self { w: w.get(&format!("{name}.weight"))?, b: w.get(&format!("{name}.bias"))? })
    }

    pub(crate) fn forward(&self, x: &Tensor, eps: f32) -> Result<Tensor> {
        Ok(candle_nn::ops::layer_norm(x, &self.w, &self.b, eps)?)
    }
}

/// `lm_head` when the checkpoint has one, else the (tied) embedding matrix.
pub(crate) fn output_layer(w: &Weights, embed: &Tensor) -> Result<Linear> {
    if w.contains("lm_head.weight") {
        w.linear("lm_head")
    } else {
        w.linear_from(embed.clone(), None)
    }
}

/// A forward pass gets one cache per layer.
pub(crate) fn check_caches(caches: usize, layers: usize) -> Result<()> {
    if caches != layers {
        return Err(Error::Config(format!("{caches} caches for {layers} layers")));
    }
    Ok(())
}

/// GGUF metadata under the file's architecture prefix (`{arch}.block_count`, ...).
pub(crate) struct GgufKeys<'a> {
    md: &'a HashMap<String, Value>,
    arch: String,
}

impl<'a> GgufKeys<'a> {
    pub(crate) fn new(md: &'a HashMap<String, Value>) -> Self {
        let arch =
            md.get("general.architecture").and_then(|v| v.to_string().ok()).cloned().unwrap_or_else(|| "llama".into());
        Self { md, arch }
    }

    /// The architecture name.
    pub(crate) fn arch(&self) -> &str {
        &self.arch
    }

    fn get(&self, k: &str) -> Option<&Value> {
        self.md.get(&format!("{}.{k}", self.arch))
    }

    /// An integer key, if present (any integer type).
    pub(crate) fn opt(&self, k: &str) -> Option<usize> {
        let v = self.get(k)?;
        v.to_u32()
            .map(|x| x as usize)
            .or_else(|_| v.to_u64().map(|x| x as usize))
            .or_else(|_| v.to_i32().map(|x| x.max(0) as usize))
            .ok()
    }

    /// A required integer key.
    pub(crate) fn req(&self, k: &str) -> Result<usize> {
        self.opt(k).ok_or_else(|| Error::Config(format!("GGUF metadata lacks {}.{k}", self.arch)))
    }

    /// A float key, if present.
    pub(crate) fn f32(&self, k: &str) -> Option<f32> {
        let v = self.get(k)?;
        v.to_f32().or_else(|_| v.to_f64().map(|x| x as f32)).ok()
    }

    /// A boolean key, if present.
    pub(crate) fn bool(&self, k: &str) -> Option<bool> {
        self.get(k)?.to_bool().ok()
    }

    /// A string key, if present.
    pub(crate) fn string(&self, k: &str) -> Option<String> {
        self.get(k)?.to_string().ok().cloned()
    }

    /// `{arch}.vocab_size`, else the tokenizer's token count.
    pub(crate) fn vocab_size(&self) -> usize {
        self.opt("vocab_size").unwrap_or_else(|| {
            self.md.get("tokenizer.ggml.tokens").and_then(|v| v.to_vec().ok()).map(|v| v.len()).unwrap_or(0)
        })
    }
}
