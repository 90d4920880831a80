//! The engine's GPU side: opening a device with its own stream, and measuring memory for the
//! KV-cache sizing. Without the `cuda` feature, asking for a GPU is a clear error.

use candle_core::Device;
use vllm_models::CausalLM;

use crate::engine::GpuMemory;
use crate::runner::ProfileStep;
use crate::{Error, Result};

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
        unsafe { result::mem_pool::get_attribute(pool, a, (&mut v as *mut u64).cast()) }.map_err(gpu)?;
        Ok(v)
    };
    let mut zero = 0u64;
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
