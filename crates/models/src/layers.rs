//! Small pieces several architectures share: LayerNorm with bias, the tied-or-separate output
//! layer, and the cache-count check of a forward pass.

use candle_core::Tensor;

use crate::weights::{Linear, Weights};
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
