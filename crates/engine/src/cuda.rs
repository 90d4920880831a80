//! The engine's GPU side: opening a device with its own stream, and measuring memory for the
//! KV-cache sizing. Without the `cuda` feature, asking for a GPU is a clear error.
// Driver calls (memory-pool statistics, graph objects) are FFI: each `unsafe` states why it is
// sound.
#![cfg_attr(feature = "cuda", allow(unsafe_code))]

use candle_core::Device;
use vllm_models::CausalLM;

use crate::runner::ProfileStep;
use crate::{Error, Result};

/// GPU memory as the KV-cache sizing sees it, after the weights are loaded and one profiled
/// step of the largest batch has run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GpuMemory {
    /// The device's memory.
    pub total: u64,
    /// Taken now: weights, the CUDA context, other processes.
    pub in_use: u64,
    /// What the profiled step allocated on top of `in_use` at its peak (activations, logits).
    pub activation_peak: u64,
}

/// KV blocks that fit in `utilization` of the GPU once the weights and the activation peak are
/// accounted for (vLLM's sizing): `total * utilization - in_use - activation_peak` bytes.
pub(crate) fn gpu_kv_blocks(mem: GpuMemory, utilization: f64, per_block: u64) -> Result<usize> {
    if !(utilization > 0.0 && utilization <= 1.0) {
        return Err(Error::InvalidArgument {
            param: "gpu_memory_utilization",
            message: format!("{utilization} (a fraction in (0, 1])"),
        });
    }
    let budget = (mem.total as f64 * utilization) as u64;
    let needed = mem.in_use.saturating_add(mem.activation_peak);
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let blocks = budget.saturating_sub(needed) / per_block.max(1);
    if blocks == 0 {
        return Err(Error::InvalidArgument {
            param: "gpu_memory_utilization",
            message: format!(
                "{utilization}: {:.2} GiB of the GPU's {:.2} GiB leaves no room for the KV cache after {:.2} GiB in \
                 use (weights, context) and a {:.2} GiB activation peak; raise it, or lower --max-num-batched-tokens \
                 / --max-num-seqs",
                gib(budget),
                gib(mem.total),
                gib(mem.in_use),
                gib(mem.activation_peak)
            ),
        });
    }
    tracing::info!(
        "GPU memory: {:.2} GiB total, {:.2} GiB in use after loading, {:.2} GiB activation peak; KV cache {:.2} GiB \
         ({blocks} blocks) within --gpu-memory-utilization {utilization}",
        gib(mem.total),
        gib(mem.in_use),
        gib(mem.activation_peak),
        gib(blocks * per_block)
    );
    usize::try_from(blocks).map_err(|_| Error::Internal("block count overflows"))
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn open(ordinal: usize) -> Result<Device> {
    Err(Error::InvalidArgument {
        param: "device",
        message: format!("cuda:{ordinal}: this build has no CUDA support (build with `cargo xtask build-cuda`)"),
    })
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn memory_after_profile(_: &Device, _: &dyn CausalLM, _: ProfileStep) -> Result<GpuMemory> {
    Err(Error::Internal("GPU memory asked of a build without CUDA"))
}

/// GPU `ordinal` with one explicit stream of its own: loading, every step, the sampler and
/// graph captures all run on it (candle's default device uses the per-thread default stream,
/// and the engine loads on one thread and steps on another).
#[cfg(feature = "cuda")]
pub(crate) fn open(ordinal: usize) -> Result<Device> {
    let dev = candle_core::CudaDevice::new_with_stream(ordinal)
        .map_err(|e| Error::InvalidArgument { param: "device", message: format!("cuda:{ordinal}: {e}") })?;
    Ok(Device::Cuda(dev))
}

/// Runs the profile step and reads the device's memory: what is in use with the weights
/// loaded, and the step's allocation peak, from the stream-ordered pool's high-water mark
/// (candle allocates through `cuMemAllocAsync`).
#[cfg(feature = "cuda")]
pub(crate) fn memory_after_profile(dev: &Device, model: &dyn CausalLM, step: ProfileStep) -> Result<GpuMemory> {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    let Device::Cuda(cuda) = dev else { return Err(Error::Internal("GPU memory asked of a CPU device")) };
    let stream = cuda.cuda_stream();
    let ctx = stream.context().clone();
    let gpu = |e: candle_core::cuda_backend::cudarc::driver::DriverError| Error::StepFailed(format!("CUDA: {e}"));
    stream.synchronize().map_err(gpu)?;
    ctx.bind_to_thread().map_err(gpu)?;
    // SAFETY: the pool is the device's current one (valid for the context's life), and each
    // attribute is read into / written from a u64, the type the driver documents for these.
    let pool = unsafe { result::device::get_mem_pool(ctx.cu_device()) }.map_err(gpu)?;
    let attr = |a: sys::CUmemPool_attribute| -> Result<u64> {
        let mut v = 0u64;
        // SAFETY: as above; `v` is a u64 that outlives the call.
        unsafe { result::mem_pool::get_attribute(pool, a, (&mut v as *mut u64).cast()) }.map_err(gpu)?;
        Ok(v)
    };
    let mut zero = 0u64;
    // SAFETY: resetting the high-water mark takes a u64 zero, the only value it accepts.
    unsafe {
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            (&mut zero as *mut u64).cast(),
        )
    }
    .map_err(gpu)?;
    let before = attr(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?;
    let t0 = std::time::Instant::now();
    crate::runner::profile_step(model, step, dev)?;
    stream.synchronize().map_err(gpu)?;
    let high = attr(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?;
    // Hand the step's freed memory back, so that "in use" below is the weights and context.
    // SAFETY: the pool is valid (above); trimming frees only memory no allocation holds.
    unsafe { result::mem_pool::trim_to(pool, 0) }.map_err(gpu)?;
    let (free, total) = ctx.mem_get_info().map_err(gpu)?;
    let (total, free) = (total as u64, free as u64);
    let mut peak = high.saturating_sub(before);
    if peak == 0 {
        // Synchronous allocation (no pool statistics): assume a tenth of the device.
        peak = total / 10;
        tracing::warn!(
            "no allocation statistics from the CUDA memory pool; assuming a {} MiB activation peak",
            peak >> 20
        );
    }
    tracing::info!(
        tokens = step.tokens,
        rows = step.rows,
        "profile step: {:.0} ms, activation peak {} MiB",
        t0.elapsed().as_secs_f64() * 1e3,
        peak >> 20
    );
    Ok(GpuMemory { total, in_use: total - free.min(total), activation_peak: peak })
}

/// Captured decode graphs, one per batch-size bucket (see [`crate::runner::DecodeGraphs`]).
#[cfg(feature = "cuda")]
#[derive(Default)]
pub(crate) struct Captures {
    by_bucket: std::collections::HashMap<usize, Captured>,
    /// A capture failed (a model whose step copies to the host, say): eager from then on.
    failed: bool,
}

/// One bucket's graph and the device buffers it reads and writes: each replay copies the
/// step's inputs into them and launches the graph, which leaves the logits in `logits`.
#[cfg(feature = "cuda")]
struct Captured {
    graph: candle_core::cuda_backend::cudarc::driver::CudaGraph,
    ids: candle_core::Tensor,
    positions: candle_core::Tensor,
    meta: vllm_kernels::DeviceMeta,
    _rows: candle_core::Tensor,
    logits: candle_core::Tensor,
}

// SAFETY: a graph is used only under the `Captures` mutex, so by one thread at a time, and on
// the stream it was captured on (the device's one stream).
#[cfg(feature = "cuda")]
unsafe impl Send for Captured {}

/// Runs a fixed-shape decode step through its bucket's graph (captured on first use).
#[cfg(feature = "cuda")]
pub(crate) fn run_decode_graph(
    runner: &crate::runner::ModelRunner,
    graphs: &crate::runner::DecodeGraphs,
    meta: &vllm_kernels::AttnMetadata,
    ids: &[u32],
    positions: &[u32],
    bucket: usize,
    width: usize,
) -> Result<candle_core::Tensor> {
    use candle_core::Tensor;
    let dev = runner.device().clone();
    let mut caps = graphs.captured.lock().unwrap_or_else(|p| p.into_inner());
    if !caps.failed && !caps.by_bucket.contains_key(&bucket) {
        match capture(runner, &dev, bucket, width) {
            Ok(c) => {
                tracing::info!(bucket, "captured a CUDA graph for decode steps of this batch size");
                caps.by_bucket.insert(bucket, c);
            }
            Err(e) => {
                tracing::warn!("CUDA graph capture failed, decode steps run eagerly from now on: {e}");
                caps.failed = true;
            }
        }
    }
    let Some(c) = caps.by_bucket.get(&bucket) else {
        return runner.forward_fixed_shape(meta.clone(), ids, positions, bucket, width);
    };
    let rows = meta.kernel_rows(width);
    c.ids.slice_set(&Tensor::from_slice(ids, bucket, &dev)?, 0, 0)?;
    c.positions.slice_set(&Tensor::from_slice(positions, bucket, &dev)?, 0, 0)?;
    c.meta.slots.slice_set(&Tensor::from_slice(&meta.slot_mapping, bucket, &dev)?, 0, 0)?;
    c.meta.row_seq.slice_set(&Tensor::from_slice(&rows.row_seq, bucket, &dev)?, 0, 0)?;
    c.meta.row_ctx.slice_set(&Tensor::from_slice(&rows.row_ctx, bucket, &dev)?, 0, 0)?;
    c.meta.tables.slice_set(&Tensor::from_slice(&rows.tables, (bucket, width), &dev)?, 0, 0)?;
    c.graph.launch().map_err(|e| Error::StepFailed(format!("CUDA graph launch: {e}")))?;
    Ok(c.logits.clone())
}

/// Captures one bucket's decode step: static buffers, one eager warm-up (kernels loaded,
/// candle's upload cache filled), then the same forward recorded as a graph.
#[cfg(feature = "cuda")]
fn capture(runner: &crate::runner::ModelRunner, dev: &Device, bucket: usize, width: usize) -> Result<Captured> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::{DType, Tensor};
    use vllm_kernels::{AttnMetadata, DeviceMeta, SeqAttn};
    let Device::Cuda(cuda) = dev else { return Err(Error::Internal("graph capture on a CPU device")) };
    // Every buffer a real allocation (not a broadcast view): replays copy into them.
    let ids = Tensor::from_vec(vec![0u32; bucket], bucket, dev)?;
    let positions = Tensor::from_vec(vec![0u32; bucket], bucket, dev)?;
    let rows = Tensor::from_vec((0..bucket as u32).collect::<Vec<_>>(), bucket, dev)?;
    let dm = DeviceMeta {
        slots: Tensor::from_vec(vec![-1i64; bucket], bucket, dev)?,
        row_seq: Tensor::from_vec((0..bucket as i32).collect::<Vec<_>>(), bucket, dev)?,
        row_ctx: Tensor::from_vec(vec![1i32; bucket], bucket, dev)?,
        tables: Tensor::from_vec(vec![0i32; bucket * width], (bucket, width), dev)?,
    };
    let mut meta = AttnMetadata::with_slots(
        runner.block_size(),
        vec![SeqAttn { query_len: 1, context_len: 1, block_table: vec![0] }; bucket],
        vec![-1; bucket],
    );
    meta.set_device(dm.clone());
    let input = vllm_models::StepInput {
        input_ids: ids.clone(),
        positions: positions.clone(),
        logits_indices: rows.clone(),
        attn: &meta,
        between_layers: None,
    };
    let vocab = runner.model().vocab_size();
    let logits = Tensor::from_vec(vec![0f32; bucket * vocab], (bucket, vocab), dev)?;
    let step = || -> Result<()> {
        let l = runner.model().forward(&input, runner.caches())?.to_dtype(DType::F32)?;
        logits.slice_set(&l, 0, 0)?;
        Ok(())
    };
    let _uploads = cuda.enable_cuda_graph_htod_cache();
    step()?;
    let stream = cuda.cuda_stream();
    let gpu = |what: &str, e: candle_core::cuda_backend::cudarc::driver::DriverError| {
        Error::StepFailed(format!("CUDA graph {what}: {e}"))
    };
    stream.synchronize().map_err(|e| gpu("warm-up", e))?;
    stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).map_err(|e| gpu("begin", e))?;
    let recorded = step();
    // End the capture whatever happened, so the stream leaves capture mode.
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
    recorded?;
    let graph =
        graph.map_err(|e| gpu("instantiate", e))?.ok_or(Error::StepFailed("CUDA graph: nothing captured".into()))?;
    graph.upload().map_err(|e| gpu("upload", e))?;
    Ok(Captured { graph, ids, positions, meta: dm, _rows: rows, logits })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gpu_cache_gets_what_the_utilization_leaves() {
        let gib = 1u64 << 30;
        // An 80 GiB GPU, 16 GiB of weights and context, a 2 GiB activation peak, 2 MiB blocks:
        // 0.9 * 80 - 18 = 54 GiB of cache.
        let mem = GpuMemory { total: 80 * gib, in_use: 16 * gib, activation_peak: 2 * gib };
        let blocks = gpu_kv_blocks(mem, 0.9, 2 << 20).unwrap();
        assert_eq!(blocks as u64, (72 * gib - 18 * gib) / (2 << 20));
        assert!(gpu_kv_blocks(mem, 0.5, 2 << 20).unwrap() < blocks);
        // Nothing left, or a nonsense fraction: a clear error naming the flag.
        let err = gpu_kv_blocks(mem, 0.2, 2 << 20).unwrap_err().to_string();
        assert!(err.contains("gpu_memory_utilization") && err.contains("no room"), "{err}");
        for bad in [0.0, -0.5, 1.5, f64::NAN] {
            assert!(gpu_kv_blocks(mem, bad, 2 << 20).is_err(), "{bad}");
        }
        // Counts near the limits neither overflow nor panic.
        let huge = GpuMemory { total: u64::MAX, in_use: u64::MAX, activation_peak: u64::MAX };
        assert!(gpu_kv_blocks(huge, 1.0, 1).is_err());
    }
}
