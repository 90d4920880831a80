//! The CUDA side of the cache ops: `kernels/paged_attention.cu` (compiled to PTX by build.rs)
//! launched from candle custom ops' `cuda_fwd`. Same cache layouts as the CPU kernels; f32,
//! f16 and bf16 caches; attention for the head sizes of [`crate::CUDA_HEAD_SIZES`]. The
//! step's metadata is read from the tensors [`AttnMetadata::upload`] put on the device once
//! per step (uploaded here only when a caller skipped that), so a layer copies nothing to the
//! device.
// Kernel launches are FFI: each `unsafe` block states what the kernel reads and writes.
#![allow(unsafe_code)]

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result, Storage, Tensor};
use half::{bf16, f16};

use crate::{AttnMetadata, AttnParams, AttnShape, DeviceMeta};

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

/// The step's device metadata: uploaded once per step by the runner, or now for callers that
/// did not.
fn device_meta<'a>(meta: &'a AttnMetadata, dev: &CudaDevice) -> Result<std::borrow::Cow<'a, DeviceMeta>> {
    if let Some(d) = meta.device() {
        return Ok(std::borrow::Cow::Borrowed(d));
    }
    let mut m = meta.clone();
    m.upload(&candle_core::Device::Cuda(dev.clone()))?;
    Ok(std::borrow::Cow::Owned(m.device().expect("just uploaded").clone()))
}

/// The contiguous device data of a metadata tensor, for as long as `guard` lives.
fn meta_view<'a, T: CudaDType>(
    guard: &'a (candle_core::StorageRef<'_>, &Layout),
    what: &str,
) -> Result<CudaView<'a, T>> {
    match &*guard.0 {
        Storage::Cuda(s) => view::<T>((s, guard.1), what),
        _ => bail!("step metadata ({what}) is not on the GPU"),
    }
}

fn lock(t: &Tensor) -> (candle_core::StorageRef<'_>, &Layout) {
    t.storage_and_layout()
}

/// The contiguous part of a storage its layout covers.
fn view<'a, T: CudaDType>((s, l): (&'a CudaStorage, &Layout), what: &str) -> Result<CudaView<'a, T>> {
    let Some((a, b)) = l.contiguous_offsets() else { bail!("paged attention: {what} must be contiguous") };
    Ok(T::as_cuda_slice(s)?.slice(a..b))
}

/// Writes `src` (`[tokens, kv_heads, head_dim]`, contiguous) into the cache at the step's
/// slots (negative slots are skipped).
pub(crate) fn reshape_and_cache(
    cache: &mut CudaStorage,
    cache_l: &Layout,
    src: &CudaStorage,
    src_l: &Layout,
    meta: &AttnMetadata,
    shape: AttnShape,
    key_block_size: Option<usize>,
) -> Result<()> {
    #[allow(clippy::too_many_arguments)]
    fn typed<T: CudaDType + DeviceRepr>(
        cache: &mut CudaStorage,
        cache_l: &Layout,
        src: &CudaStorage,
        src_l: &Layout,
        slots: &CudaView<i64>,
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
    if meta.slot_mapping.is_empty() {
        return Ok(());
    }
    let dm = device_meta(meta, &src.device)?;
    let g = lock(&dm.slots);
    let slots = meta_view::<i64>(&g, "slots")?;
    let which = if key_block_size.is_some() { "cache_keys" } else { "cache_values" };
    let dtype = src.dtype();
    let func = format!("{which}_{}", suffix(dtype)?);
    match dtype {
        DType::F32 => typed::<f32>(cache, cache_l, src, src_l, &slots, &func, shape, key_block_size),
        DType::F16 => typed::<f16>(cache, cache_l, src, src_l, &slots, &func, shape, key_block_size),
        _ => typed::<bf16>(cache, cache_l, src, src_l, &slots, &func, shape, key_block_size),
    }
}

/// Copies whole blocks (`block_len` elements each) of one cache, in order: each round of
/// [`crate::copy_rounds`] is one launch.
pub(crate) fn copy_blocks(cache: &mut CudaStorage, l: &Layout, pairs: &[(u32, u32)], block_len: usize) -> Result<()> {
    fn typed<T: CudaDType + DeviceRepr>(
        cache: &mut CudaStorage,
        l: &Layout,
        rounds: &[Vec<(u32, u32)>],
        block_len: usize,
    ) -> Result<()> {
        let dev = cache.device.clone();
        let Some((a, b)) = l.contiguous_offsets() else { bail!("copy_blocks: the cache must be contiguous") };
        let func = format!("copy_blocks_{}", suffix(cache.dtype())?);
        let f = dev.get_or_load_custom_func(&func, MODULE, PTX)?;
        let slice = T::as_cuda_slice_mut(cache)?;
        let mut slice = slice.slice_mut(a..b);
        for round in rounds {
            let flat: Vec<i64> = round.iter().flat_map(|&(s, d)| [s as i64, d as i64]).collect();
            let pairs = dev.clone_htod(&flat)?;
            let cfg =
                LaunchConfig { grid_dim: (round.len() as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            let len = block_len as i64;
            let mut bld = f.builder();
            bld.arg(&mut slice);
            bld.arg(&pairs);
            bld.arg(&len);
            // SAFETY: every pair names blocks inside the cache (checked by KvCache::copy_blocks);
            // within a round no block is both read and written, so the blocks run independently.
            unsafe { bld.launch(cfg) }.w()?;
        }
        Ok(())
    }
    let rounds = crate::copy_rounds(pairs);
    match cache.dtype() {
        DType::F32 => typed::<f32>(cache, l, &rounds, block_len),
        DType::F16 => typed::<f16>(cache, l, &rounds, block_len),
        DType::BF16 => typed::<bf16>(cache, l, &rounds, block_len),
        d => bail!("copy_blocks: a {d:?} cache"),
    }
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
    #[allow(clippy::too_many_arguments)]
    fn typed<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        q: (&CudaStorage, &Layout),
        k: (&CudaStorage, &Layout),
        v: (&CudaStorage, &Layout),
        dm: &DeviceMeta,
        func: &str,
        shape: AttnShape,
        block_size: usize,
        params: AttnParams,
    ) -> Result<CudaStorage> {
        let (qs, ks, vs) = (view::<T>(q, "query")?, view::<T>(k, "key cache")?, view::<T>(v, "value cache")?);
        let (gs, gc, gt) = (lock(&dm.row_seq), lock(&dm.row_ctx), lock(&dm.tables));
        let (row_seq, row_ctx, tables) =
            (meta_view::<i32>(&gs, "row_seq")?, meta_view::<i32>(&gc, "row_ctx")?, meta_view::<i32>(&gt, "tables")?);
        let n_rows = row_seq.len();
        let max_blocks = dm.tables.dim(1)?;
        // SAFETY: every element is written by the kernel before it is read.
        let out = unsafe { dev.alloc::<T>(n_rows * shape.num_heads * shape.head_dim)? };
        let f = dev.get_or_load_custom_func(func, MODULE, PTX)?;
        let cfg = LaunchConfig {
            grid_dim: (shape.num_heads as u32, n_rows as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let ints = [max_blocks as i32, shape.num_heads as i32, shape.num_kv_heads as i32, block_size as i32];
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
    if !crate::CUDA_HEAD_SIZES.contains(&shape.head_dim) {
        bail!("CUDA paged attention supports head sizes {:?}, not {}", crate::CUDA_HEAD_SIZES, shape.head_dim);
    }
    let dtype = q.dtype();
    if k.dtype() != dtype || v.dtype() != dtype {
        bail!("paged attention: query {dtype:?} and cache {:?} dtypes differ", k.dtype());
    }
    let func = format!("paged_attention_{}_{}", suffix(dtype)?, shape.head_dim);
    let dev = &q.device;
    let dm = device_meta(meta, dev)?;
    let args = ((q, ql), (k, kl), (v, vl));
    match dtype {
        DType::F32 => typed::<f32>(dev, args.0, args.1, args.2, &dm, &func, shape, meta.block_size, params),
        DType::F16 => typed::<f16>(dev, args.0, args.1, args.2, &dm, &func, shape, meta.block_size, params),
        _ => typed::<bf16>(dev, args.0, args.1, args.2, &dm, &func, shape, meta.block_size, params),
    }
}

const SAMPLING_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/sampling.ptx"));
const SAMPLING_MODULE: &str = "vllm_sampling";

/// One token per row of `[rows, vocab]` f32 logits (see [`crate::sample`]); the parameters
/// go up as four small arrays, the token ids come back.
pub(crate) fn sample_rows(
    s: &CudaStorage,
    l: &Layout,
    rows: usize,
    vocab: usize,
    params: &[crate::sample::RowParams],
) -> Result<CudaStorage> {
    let dev = s.device.clone();
    let logits = view::<f32>((s, l), "logits")?;
    let temperature: Vec<f32> = params.iter().map(|p| p.temperature).collect();
    let top_k: Vec<u32> = params.iter().map(|p| p.top_k).collect();
    let top_p: Vec<f32> = params.iter().map(|p| p.top_p).collect();
    let uniform: Vec<f32> = params.iter().map(|p| p.u).collect();
    let (temperature, top_k, top_p, uniform) =
        (dev.clone_htod(&temperature)?, dev.clone_htod(&top_k)?, dev.clone_htod(&top_p)?, dev.clone_htod(&uniform)?);
    // SAFETY: the kernel writes every row's token before it is read.
    let out = unsafe { dev.alloc::<u32>(rows)? };
    let f = dev.get_or_load_custom_func("sample_rows", SAMPLING_MODULE, SAMPLING_PTX)?;
    let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
    let v = vocab as i32;
    let mut b = f.builder();
    b.arg(&out);
    b.arg(&logits);
    b.arg(&temperature);
    b.arg(&top_k);
    b.arg(&top_p);
    b.arg(&uniform);
    b.arg(&v);
    // SAFETY: grid (rows) reads row r's `vocab` logits and its parameters, writes out[r].
    unsafe { b.launch(cfg) }.w()?;
    Ok(u32::wrap_cuda_slice(out, dev))
}
