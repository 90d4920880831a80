//! The paged cache as candle tensors, with the kernels attached as candle custom ops.

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp3, DType, Device, InplaceOp1, InplaceOp2, Layout, Result, Shape, Tensor,
};

use crate::cpu::{self, KvSlice};
use crate::{AttnMetadata, AttnParams, AttnShape};

/// The K and V cache of one attention layer.
#[derive(Debug, Clone)]
pub struct KvCache {
    /// Keys, `[num_blocks, num_kv_heads, head_dim, block_size]` (each block transposed).
    pub key: Tensor,
    /// Values, `[num_blocks, block_size, num_kv_heads, head_dim]`.
    pub value: Tensor,
    block_size: usize,
    shape: AttnShape,
}

fn contiguous<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else { bail!("{what}: expected an f32 tensor") };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("{what}: tensor must be contiguous"),
    }
}

/// A contiguous cache tensor's values, whichever of the cache types it holds.
fn cache_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<KvSlice<'a>> {
    let Some((a, b)) = l.contiguous_offsets() else { bail!("{what}: tensor must be contiguous") };
    Ok(match s {
        CpuStorage::F32(d) => KvSlice::F32(&d[a..b]),
        CpuStorage::F16(d) => KvSlice::F16(&d[a..b]),
        CpuStorage::BF16(d) => KvSlice::BF16(&d[a..b]),
        other => bail!("{what}: a {:?} cache (float32, float16 or bfloat16 expected)", other.dtype()),
    })
}

struct WriteCache<'a> {
    meta: &'a AttnMetadata,
    shape: AttnShape,
    /// `Some(block_size)` for the (block-transposed) key cache.
    keys: Option<usize>,
}

impl WriteCache<'_> {
    fn write<T: Copy>(&self, src: &[T], cache: &mut [T]) {
        let AttnShape { num_kv_heads, head_dim, .. } = self.shape;
        match self.keys {
            Some(bs) => cpu::reshape_and_cache_keys(src, cache, &self.meta.slot_mapping, num_kv_heads, head_dim, bs),
            None => cpu::reshape_and_cache(src, cache, &self.meta.slot_mapping, num_kv_heads * head_dim),
        }
    }
}

impl InplaceOp2 for WriteCache<'_> {
    fn name(&self) -> &'static str {
        "reshape_and_cache"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dst_l: &Layout, src: &CpuStorage, src_l: &Layout) -> Result<()> {
        let Some((a, b)) = dst_l.contiguous_offsets() else { bail!("kv cache must be contiguous") };
        let Some((sa, sb)) = src_l.contiguous_offsets() else { bail!("new key/value must be contiguous") };
        match (dst, src) {
            (CpuStorage::F32(cache), CpuStorage::F32(src)) => self.write(&src[sa..sb], &mut cache[a..b]),
            (CpuStorage::F16(cache), CpuStorage::F16(src)) => self.write(&src[sa..sb], &mut cache[a..b]),
            (CpuStorage::BF16(cache), CpuStorage::BF16(src)) => self.write(&src[sa..sb], &mut cache[a..b]),
            (cache, src) => bail!("writing {:?} keys/values into a {:?} cache", src.dtype(), cache.dtype()),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        dst_l: &Layout,
        src: &candle_core::CudaStorage,
        src_l: &Layout,
    ) -> Result<()> {
        crate::cuda::reshape_and_cache(dst, dst_l, src, src_l, self.meta, self.shape, self.keys)
    }
}

struct CopyBlocks<'a> {
    pairs: &'a [(u32, u32)],
    block_len: usize,
}

impl InplaceOp1 for CopyBlocks<'_> {
    fn name(&self) -> &'static str {
        "copy_blocks"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, l: &Layout) -> Result<()> {
        let Some((a, b)) = l.contiguous_offsets() else { bail!("kv cache must be contiguous") };
        match dst {
            CpuStorage::F32(cache) => cpu::copy_blocks(&mut cache[a..b], self.pairs, self.block_len),
            CpuStorage::F16(cache) => cpu::copy_blocks(&mut cache[a..b], self.pairs, self.block_len),
            CpuStorage::BF16(cache) => cpu::copy_blocks(&mut cache[a..b], self.pairs, self.block_len),
            other => bail!("a {:?} kv cache", other.dtype()),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, dst: &mut candle_core::CudaStorage, l: &Layout) -> Result<()> {
        crate::cuda::copy_blocks(dst, l, self.pairs, self.block_len)
    }
}

struct Attend<'a> {
    meta: &'a AttnMetadata,
    shape: AttnShape,
    params: AttnParams,
}

impl CustomOp3 for Attend<'_> {
    fn name(&self) -> &'static str {
        "paged_attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let q = contiguous(q, ql, "query")?;
        let k = cache_slice(k, kl, "key cache")?;
        let v = cache_slice(v, vl, "value cache")?;
        let mut out = vec![0f32; q.len()];
        cpu::paged_attention(q, k, v, self.meta, self.shape, self.params, &mut out);
        Ok((CpuStorage::F32(out), ql.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        ql: &Layout,
        k: &candle_core::CudaStorage,
        kl: &Layout,
        v: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda::attend(q, ql, k, kl, v, vl, self.meta, self.shape, self.params)?;
        Ok((out, ql.shape().clone()))
    }
}

struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "gelu_erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(s, l, "gelu input")?;
        let mut out = vec![0f32; x.len()];
        cpu::gelu_erf(x, &mut out);
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

/// Exact (erf) GELU: our vectorized kernel for f32 CPU tensors ([`cpu::gelu_erf`]), candle's
/// `gelu_erf` otherwise.
pub fn gelu_erf(t: &Tensor) -> Result<Tensor> {
    if t.device().is_cpu() && t.dtype() == DType::F32 {
        t.contiguous()?.apply_op1_no_bwd(&GeluErf)
    } else {
        t.gelu_erf()
    }
}

/// A zeroed tensor whose pages are only touched when written: candle fills half-precision
/// zeros value by value (touching a whole multi-GiB cache at start-up), so on the CPU those
/// come from a zero-allocated `u16` buffer reinterpreted.
fn zeros(shape: (usize, usize, usize, usize), dtype: DType, device: &Device) -> Result<Tensor> {
    use half::vec::HalfBitsVecExt;
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    match dtype {
        DType::F16 if device.is_cpu() => Tensor::from_vec(vec![0u16; n].reinterpret_into::<half::f16>(), shape, device),
        DType::BF16 if device.is_cpu() => {
            Tensor::from_vec(vec![0u16; n].reinterpret_into::<half::bf16>(), shape, device)
        }
        _ => Tensor::zeros(shape, dtype, device),
    }
}

impl KvCache {
    /// A zeroed float32 cache of `num_blocks` blocks (the CPU kernels' type).
    pub fn new(num_blocks: usize, block_size: usize, shape: AttnShape, device: &Device) -> Result<Self> {
        Self::with_dtype(num_blocks, block_size, shape, DType::F32, device)
    }

    /// A zeroed cache holding `dtype` values: float32, float16 or bfloat16. On the CPU,
    /// attention reads a half-precision cache converted to float32 as it goes (half the
    /// memory and memory traffic of float32).
    pub fn with_dtype(
        num_blocks: usize,
        block_size: usize,
        shape: AttnShape,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            bail!("a paged cache holds float32, float16 or bfloat16, not {dtype:?}");
        }
        let key_shape = (num_blocks, shape.num_kv_heads, shape.head_dim, block_size);
        let value_shape = (num_blocks, block_size, shape.num_kv_heads, shape.head_dim);
        Ok(Self { key: zeros(key_shape, dtype, device)?, value: zeros(value_shape, dtype, device)?, block_size, shape })
    }

    /// Bytes a cache of `dtype` holds per token slot (K and V).
    pub fn bytes_per_token(shape: AttnShape, dtype: DType) -> usize {
        2 * shape.num_kv_heads * shape.head_dim * dtype.size_in_bytes()
    }

    /// The type the cache holds.
    pub fn dtype(&self) -> DType {
        self.key.dtype()
    }

    /// Writes this step's keys and values (`[num_tokens, num_kv_heads, head_dim]`) into their
    /// slots.
    pub fn write(&self, k: &Tensor, v: &Tensor, meta: &AttnMetadata) -> Result<()> {
        let expect = (meta.num_tokens(), self.shape.num_kv_heads, self.shape.head_dim);
        for (t, cache, keys) in [(k, &self.key, Some(self.block_size)), (v, &self.value, None)] {
            if t.dims() != [expect.0, expect.1, expect.2] {
                bail!("new key/value shape {:?}, expected {expect:?}", t.dims());
            }
            // float16 saturates instead of overflowing to infinity (which would poison every
            // later softmax of the sequence with NaN).
            let t = if cache.dtype() == DType::F16 { t.clamp(-65504f32, 65504f32)? } else { t.clone() };
            let t = t.to_dtype(cache.dtype())?.contiguous()?;
            cache.inplace_op2(&t, &WriteCache { meta, shape: self.shape, keys })?;
        }
        Ok(())
    }

    /// Copies whole blocks, `(src, dst)`, in order (copy-on-write of shared blocks).
    pub fn copy_blocks(&self, pairs: &[(u32, u32)]) -> Result<()> {
        if pairs.is_empty() {
            return Ok(());
        }
        let num_blocks = self.key.dim(0)?;
        if let Some(&(s, d)) = pairs.iter().find(|&&(s, d)| s as usize >= num_blocks || d as usize >= num_blocks) {
            bail!("block copy {s} -> {d} outside a cache of {num_blocks} blocks");
        }
        let block_len = self.block_size * self.shape.num_kv_heads * self.shape.head_dim;
        for cache in [&self.key, &self.value] {
            cache.inplace_op1(&CopyBlocks { pairs, block_len })?;
        }
        Ok(())
    }

    /// Attention of `q` (`[num_tokens, num_heads, head_dim]`) over the cache; returns the same
    /// shape and dtype as `q`.
    pub fn attend(&self, q: &Tensor, meta: &AttnMetadata, scale: f32) -> Result<Tensor> {
        self.attend_with(q, meta, AttnParams::new(scale))
    }

    /// [`KvCache::attend`] with a sliding window or score soft-capping.
    pub fn attend_with(&self, q: &Tensor, meta: &AttnMetadata, params: AttnParams) -> Result<Tensor> {
        let s = self.shape;
        if q.dims() != [meta.num_tokens(), s.num_heads, s.head_dim] {
            bail!("query shape {:?}, expected [{}, {}, {}]", q.dims(), meta.num_tokens(), s.num_heads, s.head_dim);
        }
        let dtype = q.dtype();
        // The CPU kernel takes float32 queries whatever the cache holds; CUDA's, the cache's type.
        let q32 = if q.device().is_cpu() { q.to_dtype(DType::F32)? } else { q.to_dtype(self.key.dtype())? };
        let q32 = q32.contiguous()?;
        let out = q32.apply_op3_no_bwd(&self.key, &self.value, &Attend { meta, shape: s, params })?;
        out.to_dtype(dtype)
    }
}
