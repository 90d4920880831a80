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

/// Precomputed rotary tables.
#[derive(Debug, Clone)]
pub struct Rotary {
    cos: Tensor,
    sin: Tensor,
    style: RopeStyle,
}

impl Rotary {
    /// Tables for `max_positions` positions of a `head_dim`-sized head.
    pub fn new(
        theta: f32,
        head_dim: usize,
        max_positions: usize,
        style: RopeStyle,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        let inv: Vec<f32> = (0..head_dim / 2).map(|i| 1.0 / theta.powf(2.0 * i as f32 / head_dim as f32)).collect();
        Self::from_inv_freq(&inv, max_positions, style, dtype, dev)
    }

    /// Tables from explicit inverse frequencies (one per dimension pair).
    pub fn from_inv_freq(
        inv: &[f32],
        max_positions: usize,
        style: RopeStyle,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        let half = inv.len();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for &f in inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (max_positions, half), dev)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, (max_positions, half), dev)?.to_dtype(dtype)?,
            style,
        })
    }

    /// Per-token tables for a step: `[tokens, 1, d/2]` each.
    pub fn for_positions(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = positions.dim(0)?;
        let half = self.cos.dim(1)?;
        let cos = self.cos.index_select(positions, 0)?.reshape((n, 1, half))?;
        let sin = self.sin.index_select(positions, 0)?.reshape((n, 1, half))?;
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
