//! The CUDA side of the cache ops: `kernels/paged_attention.cu` (compiled to PTX by build.rs)
//! launched from candle custom ops' `cuda_fwd`. Same cache layouts as the CPU kernels; f32,
//! f16 and bf16 caches; attention for head sizes 64 and 128.
// Kernel launches are FFI: each `unsafe` block states what the kernel reads and writes.
#![allow(unsafe_code)]

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result};
use half::{bf16, f16};

use crate::{AttnMetadata, AttnParams, AttnShape};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/paged_attention.ptx"));
const MODULE: &str = "vllm_paged_attention";

fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        d => bail!("CUDA paged cache: unsupported dtype {d:?} (f32, f16, bf16)"),
    })
}

/// Writes `src` (`[tokens, kv_heads, head_dim]`, contiguous) into the cache at `slots`.
pub(crate) fn reshape_and_cache(
    cache: &mut CudaStorage,
    cache_l: &Layout,
    src: &CudaStorage,
    src_l: &Layout,
    slots: &[i64],
    shape: AttnShape,
    key_block_size: Option<usize>,
) -> Result<()> {
    fn typed<T: CudaDType + DeviceRepr>(
        cache: &mut CudaStorage,
        cache_l: &Layout,
        src: &CudaStorage,
        src_l: &Layout,
        slots: &CudaSlice<i64>,
        func: &str,
        shape: AttnShape,
        key_block_size: Option<usize>,
    ) -> Result<()> {
        let dev = src.device.clone();
        let (Some((s0, s1)), Some((c0, c1))) = (src_l.contiguous_offsets(), cache_l.contiguous_offsets()) else {
            bail!("reshape_and_cache: cache and input must be contiguous");
        };
        let src = T::as_cuda_slice(src)?.slice(s0..s1);
        let cache = T::as_cuda_slice_mut(cache)?;
        let mut cache = cache.slice_mut(c0..c1);
        let f = dev.get_or_load_custom_func(func, MODULE, PTX)?;
        let tokens = slots.len();
        let cfg = LaunchConfig { grid_dim: (tokens as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        let (kv, hd) = (shape.num_kv_heads as i32, shape.head_dim as i32);
        let mut b = f.builder();
        b.arg(&src);
        b.arg(&mut cache);
        b.arg(slots);
        b.arg(&kv);
        b.arg(&hd);
        let bs = key_block_size.map_or(0, |bs| bs as i32); // values ignore it
        b.arg(&bs);
        // SAFETY: the kernel reads `tokens` rows of `kv_heads * head_dim` values from `src`
        // (checked by the caller's shape test) and writes only slots from `slots`, which the
        // block manager keeps inside the cache.
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }
    if slots.is_empty() {
        return Ok(());
    }
    let dev = &src.device;
    let slots_d = dev.clone_htod(slots)?;
    let which = if key_block_size.is_some() { "cache_keys" } else { "cache_values" };
    let dtype = src.dtype();
    let func = format!("{which}_{}", suffix(dtype)?);
    match dtype {
        DType::F32 => typed::<f32>(cache, cache_l, src, src_l, &slots_d, &func, shape, key_block_size),
        DType::F16 => typed::<f16>(cache, cache_l, src, src_l, &slots_d, &func, shape, key_block_size),
        _ => typed::<bf16>(cache, cache_l, src, src_l, &slots_d, &func, shape, key_block_size),
    }
}

/// Per-row inputs of the attention kernel: each row's sequence and visible context, and the
/// block tables padded to one width.
struct Rows {
    row_seq: Vec<i32>,
    row_ctx: Vec<i32>,
    tables: Vec<i32>,
    max_blocks: usize,
}

fn rows(meta: &AttnMetadata) -> Rows {
    let max_blocks = meta.seqs.iter().map(|s| s.block_table.len()).max().unwrap_or(0).max(1);
    let mut r = Rows { row_seq: Vec::new(), row_ctx: Vec::new(), tables: Vec::new(), max_blocks };
    for (i, s) in meta.seqs.iter().enumerate() {
        for q in 0..s.query_len {
            r.row_seq.push(i as i32);
            r.row_ctx.push((s.context_len - s.query_len + q + 1) as i32);
        }
        r.tables.extend(s.block_table.iter().map(|&b| b as i32));
        r.tables.extend(std::iter::repeat_n(0, max_blocks - s.block_table.len()));
    }
    r
}

/// The contiguous part of a storage its layout covers.
fn view<'a, T: CudaDType>((s, l): (&'a CudaStorage, &Layout), what: &str) -> Result<CudaView<'a, T>> {
    let Some((a, b)) = l.contiguous_offsets() else { bail!("paged attention: {what} must be contiguous") };
    Ok(T::as_cuda_slice(s)?.slice(a..b))
}

/// Attention of `q` (`[tokens, heads, head_dim]`) over the cache, every row causal.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend(
    q: &CudaStorage,
    ql: &Layout,
    k: &CudaStorage,
    kl: &Layout,
    v: &CudaStorage,
    vl: &Layout,
    meta: &AttnMetadata,
    shape: AttnShape,
    params: AttnParams,
) -> Result<CudaStorage> {
    fn typed<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        q: (&CudaStorage, &Layout),
        k: (&CudaStorage, &Layout),
        v: (&CudaStorage, &Layout),
        rows: &Rows,
        func: &str,
        shape: AttnShape,
        block_size: usize,
        params: AttnParams,
    ) -> Result<CudaStorage> {
        let (qs, ks, vs) = (view::<T>(q, "query")?, view::<T>(k, "key cache")?, view::<T>(v, "value cache")?);
        let n_rows = rows.row_seq.len();
        // SAFETY: every element is written by the kernel before it is read.
        let out = unsafe { dev.alloc::<T>(n_rows * shape.num_heads * shape.head_dim)? };
        let (row_seq, row_ctx, tables) =
            (dev.clone_htod(&rows.row_seq)?, dev.clone_htod(&rows.row_ctx)?, dev.clone_htod(&rows.tables)?);
        let f = dev.get_or_load_custom_func(func, MODULE, PTX)?;
        let cfg = LaunchConfig {
            grid_dim: (shape.num_heads as u32, n_rows as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let ints = [rows.max_blocks as i32, shape.num_heads as i32, shape.num_kv_heads as i32, block_size as i32];
        let window = params.sliding_window.map_or(0, |w| w as i32);
        let softcap = params.softcap.unwrap_or(0.0);
        let mut b = f.builder();
        b.arg(&out);
        b.arg(&qs);
        b.arg(&ks);
        b.arg(&vs);
        b.arg(&tables);
        b.arg(&row_seq);
        b.arg(&row_ctx);
        for i in &ints {
            b.arg(i);
        }
        b.arg(&params.scale);
        b.arg(&window);
        b.arg(&softcap);
        // SAFETY: grid (heads, rows) reads rows' query vectors and the cache blocks named by
        // the tables (inside the cache: block ids come from the block manager) and writes
        // each (row, head) output vector once.
        unsafe { b.launch(cfg) }.w()?;
        Ok(T::wrap_cuda_slice(out, dev.clone()))
    }
    if !matches!(shape.head_dim, 64 | 128) {
        bail!("CUDA paged attention supports head sizes 64 and 128, not {}", shape.head_dim);
    }
    let dtype = q.dtype();
    if k.dtype() != dtype || v.dtype() != dtype {
        bail!("paged attention: query {dtype:?} and cache {:?} dtypes differ", k.dtype());
    }
    let func = format!("paged_attention_{}_{}", suffix(dtype)?, shape.head_dim);
    let r = rows(meta);
    let dev = &q.device;
    let args = ((q, ql), (k, kl), (v, vl));
    match dtype {
        DType::F32 => typed::<f32>(dev, args.0, args.1, args.2, &r, &func, shape, meta.block_size, params),
        DType::F16 => typed::<f16>(dev, args.0, args.1, args.2, &r, &func, shape, meta.block_size, params),
        _ => typed::<bf16>(dev, args.0, args.1, args.2, &r, &func, shape, meta.block_size, params),
    }
}
