//! The one attention module every architecture shares: rotary embeddings, the paged-cache
//! write and the paged attention over a flattened batch.

use candle_core::{DType, Device, Tensor};
use vllm_kernels::{AttnParams, AttnShape, KvCache};

use crate::{Result, StepInput};

/// How rotary embeddings pair up the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Hugging Face layout: dimension `i` pairs with `i + d/2`.
    Halves,
    /// llama.cpp/GGUF layout (Q/K rows permuted): dimension `2i` pairs with `2i + 1`.
    Interleaved,
}

/// Rotary embeddings. The cosines and sines of a step's positions are computed when the step
/// runs (positions times the inverse frequencies, in float32, then `cos` and `sin`), all on the
/// device: nothing is sized by the context length, so a checkpoint claiming a context of 2^32
/// tokens costs no more memory than one of 2,048. On the CPU the values are bit-identical to
/// a precomputed table's (the same float32 product and float32 `cos`/`sin`).
#[derive(Debug, Clone)]
pub struct Rotary {
    /// `[1, d/2]` float32 inverse frequencies.
    inv_freq: Tensor,
    /// The dtype of the cosines and sines (the activations').
    dtype: DType,
    style: RopeStyle,
}

impl Rotary {
    /// Rotary embeddings of a `head_dim`-sized head with base `theta`.
    pub fn new(theta: f32, head_dim: usize, style: RopeStyle, dtype: DType, dev: &Device) -> Result<Self> {
        let inv: Vec<f32> = (0..head_dim / 2).map(|i| 1.0 / theta.powf(2.0 * i as f32 / head_dim as f32)).collect();
        Self::from_inv_freq(&inv, style, dtype, dev)
    }

    /// Rotary embeddings with explicit inverse frequencies (one per dimension pair).
    pub fn from_inv_freq(inv: &[f32], style: RopeStyle, dtype: DType, dev: &Device) -> Result<Self> {
        Ok(Self { inv_freq: Tensor::from_slice(inv, (1, inv.len()), dev)?, dtype, style })
    }

    /// Per-token cosines and sines for a step's `[tokens]` u32 positions: `[tokens, 1, d/2]`
    /// each.
    pub fn for_positions(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = positions.dim(0)?;
        let half = self.inv_freq.dim(1)?;
        let angles = positions.to_dtype(DType::F32)?.reshape((n, 1))?.broadcast_mul(&self.inv_freq)?;
        let cos = angles.cos()?.to_dtype(self.dtype)?.reshape((n, 1, half))?;
        let sin = angles.sin()?.to_dtype(self.dtype)?.reshape((n, 1, half))?;
        Ok((cos, sin))
    }

    /// Rotates `x` of shape `[tokens, heads, head_dim]` by each token's own position.
    pub fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (t, h, d) = x.dims3()?;
        // Seen as (batch = tokens, heads, seq = 1, d) with one table row per batch entry.
        let x4 = x.contiguous()?.reshape((t, h, 1, d))?;
        let y = match self.style {
            RopeStyle::Halves => candle_nn::rotary_emb::rope(&x4, cos, sin)?,
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&x4, cos, sin)?,
        };
        Ok(y.reshape((t, h, d))?)
    }
}

/// Paged attention for one layer: takes projected Q, K, V, rotates Q and K, writes K/V into
/// the layer's cache and attends.
#[derive(Debug, Clone)]
pub struct PagedAttention {
    shape: AttnShape,
    params: AttnParams,
}

impl PagedAttention {
    /// An attention with the given head layout and softmax scale.
    pub fn new(shape: AttnShape, scale: f32) -> Self {
        Self::with_params(shape, AttnParams::new(scale))
    }

    /// An attention with a sliding window or soft-capped scores.
    pub fn with_params(shape: AttnShape, params: AttnParams) -> Self {
        Self { shape, params }
    }

    /// The head layout.
    pub fn shape(&self) -> AttnShape {
        self.shape
    }

    /// `q`: `[tokens, heads * d]`, `k`/`v`: `[tokens, kv_heads * d]`; returns
    /// `[tokens, heads * d]`.
    pub fn forward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        rope: Option<(&Rotary, &Tensor, &Tensor)>,
        cache: &KvCache,
        input: &StepInput,
    ) -> Result<Tensor> {
        let AttnShape { num_heads, num_kv_heads, head_dim } = self.shape;
        let t = q.dim(0)?;
        let mut q = q.reshape((t, num_heads, head_dim))?;
        let mut k = k.reshape((t, num_kv_heads, head_dim))?;
        let v = v.reshape((t, num_kv_heads, head_dim))?;
        if let Some((rot, cos, sin)) = rope {
            q = rot.apply(&q, cos, sin)?;
            k = rot.apply(&k, cos, sin)?;
        }
        cache.write(&k, &v, input.attn)?;
        let o = cache.attend_with(&q, input.attn, self.params)?;
        Ok(o.reshape((t, num_heads * head_dim))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A step's cosines and sines are a precomputed table's, bit for bit (the reference tests
    /// rely on it), at any position a u32 holds.
    #[test]
    fn cosines_match_a_table_bit_for_bit() {
        let inv: Vec<f32> = (0..32).map(|i| 1.0 / 10_000f32.powf(2.0 * i as f32 / 64.0)).collect();
        let rotary = Rotary::from_inv_freq(&inv, RopeStyle::Halves, DType::F32, &Device::Cpu).unwrap();
        let positions = [0u32, 1, 7, 4095, 1 << 20, (1 << 24) + 1, u32::MAX];
        let (cos, sin) = rotary.for_positions(&Tensor::new(&positions, &Device::Cpu).unwrap()).unwrap();
        assert_eq!(cos.dims(), [positions.len(), 1, inv.len()]);
        let (cos, sin) = (cos.flatten_all().unwrap().to_vec1::<f32>().unwrap(), sin.flatten_all().unwrap());
        let sin = sin.to_vec1::<f32>().unwrap();
        for (i, &p) in positions.iter().enumerate() {
            for (j, &f) in inv.iter().enumerate() {
                let a = p as f32 * f;
                assert_eq!(cos[i * inv.len() + j].to_bits(), a.cos().to_bits(), "cos at position {p}, pair {j}");
                assert_eq!(sin[i * inv.len() + j].to_bits(), a.sin().to_bits(), "sin at position {p}, pair {j}");
            }
        }
    }
}
