//! `cargo xtask bench roofline`: this CPU's own peaks, measured with small kernels, so that
//! every other figure can be read as a share of what the silicon allows:
//!
//! - int8 dot products: AVX-512 VNNI `vpdpbusd` where present, else AVX2's `vpmaddubsw` +
//!   `vpmaddwd` (what our 4-bit and k-quant kernels issue there): multiply-adds per second
//!   (one op = one multiply-add of two 8-bit values);
//! - float FMA (AVX-512 or AVX2): float multiply-adds per second;
//! - streaming reads of 1 GiB (`latency`'s measure): bytes per second;
//!
//! each with 1 thread and with `--threads`. Register-only loops with independent accumulators
//! (enough to cover the instructions' latency), repeated, best of five.

use std::time::Instant;

use anyhow::Result;
use clap::Args;
use serde_json::json;

#[derive(Args)]
pub struct RooflineArgs {
    /// Threads for the all-cores figures (1 is always measured too).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Write the figures here as JSON.
    #[arg(long)]
    output_json: Option<std::path::PathBuf>,
}

/// The peaks at one thread count.
#[derive(Debug, Clone, Copy)]
pub struct Roof {
    /// Which int8 instructions were measured.
    pub int8_isa: &'static str,
    /// int8 multiply-adds per second.
    pub int8_macs: f64,
    /// float32 multiply-adds per second.
    pub f32_fmas: f64,
    /// Streaming read bytes per second.
    pub read_bytes: f64,
}

const ITERS: usize = 20_000_000;

/// Runs `f` (returning multiply-adds done) on `threads` threads at once; the best rate of five.
fn rate(threads: usize, f: fn() -> f64) -> f64 {
    (0..5)
        .map(|_| {
            let t = Instant::now();
            let ops: f64 = std::thread::scope(|s| {
                let hs: Vec<_> = (0..threads.max(1)).map(|_| s.spawn(f)).collect();
                hs.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
            });
            ops / t.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}

/// Measures the peaks with `threads` threads (int8 and FMA: a second or so each).
pub fn measure(threads: usize) -> Roof {
    let (int8_isa, int8): (&'static str, fn() -> f64) = kernels::int8();
    Roof {
        int8_isa,
        int8_macs: rate(threads, int8),
        f32_fmas: rate(threads, kernels::fma()),
        read_bytes: super::latency::read_bandwidth(threads),
    }
}

pub fn run(a: RooflineArgs) -> Result<()> {
    let one = measure(1);
    let all = measure(a.threads);
    println!("CPU: {}; int8 path: {}", super::stall::cpu_model(), one.int8_isa);
    println!("{:<34}{:>14}{:>14}", "peak", "1 thread", format!("{} threads", a.threads));
    println!("{:<34}{:>14.1}{:>14.1}", "int8 multiply-adds, G/s", one.int8_macs / 1e9, all.int8_macs / 1e9);
    println!("{:<34}{:>14.1}{:>14.1}", "float32 FMAs, G/s", one.f32_fmas / 1e9, all.f32_fmas / 1e9);
    println!("{:<34}{:>14.1}{:>14.1}", "streaming read, GB/s", one.read_bytes / 1e9, all.read_bytes / 1e9);
    let fig = |r: &Roof| {
        json!({"int8_macs_per_second": r.int8_macs, "f32_fmas_per_second": r.f32_fmas,
               "read_bytes_per_second": r.read_bytes})
    };
    let report = json!({
        "cpu": super::stall::cpu_model(), "cpu_details": super::stall::cpu_details(), "int8_isa": one.int8_isa,
        "threads": a.threads, "one_thread": fig(&one), "all_threads": fig(&all),
    });
    super::write_json(&a.output_json, &report)
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod kernels {
    use std::arch::x86_64::*;

    /// The best int8 kernel this CPU has.
    pub fn int8() -> (&'static str, fn() -> f64) {
        if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512bw") {
            ("AVX-512 VNNI (vpdpbusd)", || {
                // SAFETY: the features were detected above.
                unsafe { vnni() }
            })
        } else if is_x86_feature_detected!("avx2") {
            ("AVX2 (vpmaddubsw + vpmaddwd)", || {
                // SAFETY: the feature was detected above.
                unsafe { avx2_int8() }
            })
        } else {
            ("none", || 0.0)
        }
    }

    /// The widest FMA this CPU has.
    pub fn fma() -> fn() -> f64 {
        if is_x86_feature_detected!("avx512f") {
            || {
                // SAFETY: the feature was detected above.
                unsafe { fma512() }
            }
        } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            || {
                // SAFETY: the features were detected above.
                unsafe { fma256() }
            }
        } else {
            || 0.0
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn vnni() -> f64 {
        let a = _mm512_set1_epi8(std::hint::black_box(3));
        let b = _mm512_set1_epi8(std::hint::black_box(-2));
        // (Each vpdpbusd accumulates into its register: nothing to hoist.)
        let mut acc = [_mm512_setzero_si512(); 10];
        for _ in 0..super::ITERS / 10 {
            for v in acc.iter_mut() {
                *v = _mm512_dpbusd_epi32(*v, a, b);
            }
        }
        std::hint::black_box(acc);
        // 64 byte products per instruction.
        (super::ITERS / 10 * 10 * 64) as f64
    }

    #[target_feature(enable = "avx2")]
    unsafe fn avx2_int8() -> f64 {
        let b = _mm256_set1_epi8(std::hint::black_box(-2));
        let step = _mm256_set1_epi8(std::hint::black_box(1));
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_si256(); 8];
        // Activations that change every iteration (as a kernel's loads do), so the products
        // cannot be hoisted out of the loop.
        let mut xs = [_mm256_setzero_si256(); 8];
        for (i, x) in xs.iter_mut().enumerate() {
            *x = _mm256_set1_epi8(i as i8);
        }
        for _ in 0..super::ITERS / 8 {
            for (v, x) in acc.iter_mut().zip(xs.iter_mut()) {
                *x = _mm256_add_epi8(*x, step);
                *v = _mm256_add_epi32(*v, _mm256_madd_epi16(_mm256_maddubs_epi16(*x, b), ones));
            }
        }
        std::hint::black_box((acc, xs));
        // 32 byte products per vpmaddubsw (and its vpmaddwd + add).
        (super::ITERS / 8 * 8 * 32) as f64
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn fma512() -> f64 {
        let a = _mm512_set1_ps(std::hint::black_box(0.999));
        let b = _mm512_set1_ps(std::hint::black_box(0.001));
        let mut acc = [_mm512_setzero_ps(); 12];
        for _ in 0..super::ITERS / 12 {
            for v in acc.iter_mut() {
                *v = _mm512_fmadd_ps(*v, a, b);
            }
        }
        std::hint::black_box(acc);
        (super::ITERS / 12 * 12 * 16) as f64
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn fma256() -> f64 {
        let a = _mm256_set1_ps(std::hint::black_box(0.999));
        let b = _mm256_set1_ps(std::hint::black_box(0.001));
        let mut acc = [_mm256_setzero_ps(); 12];
        for _ in 0..super::ITERS / 12 {
            for v in acc.iter_mut() {
                *v = _mm256_fmadd_ps(*v, a, b);
            }
        }
        std::hint::black_box(acc);
        (super::ITERS / 12 * 12 * 8) as f64
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod kernels {
    /// No hand-written peak kernel here yet.
    pub fn int8() -> (&'static str, fn() -> f64) {
        ("none", || 0.0)
    }

    /// No hand-written peak kernel here yet.
    pub fn fma() -> fn() -> f64 {
        || 0.0
    }
}
