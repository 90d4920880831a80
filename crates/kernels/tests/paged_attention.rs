//! The paged-attention kernel against a naive causal attention on contiguous K/V: on the CPU,
//! and with `--features cuda` the same cases on the GPU in f32, f16 and bf16 (module `cuda`,
//! which needs a CUDA device: it fails, not skips, without one).

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use vllm_kernels::check::{gqa_mixed_case, head_dim_128_case, max_error, window_and_softcap_cases, Case};
use vllm_kernels::{cpu, AttnMetadata, AttnParams, AttnShape, KvCache, SeqAttn};

fn run_case(case: Case, seed: u64) {
    run_case_on(&case, seed, &Device::Cpu, DType::F32, 1e-5);
}

/// Runs `case` in `dtype` on `dev` against the naive attention.
fn run_case_on(case: &Case, seed: u64, dev: &Device, dtype: DType, tol: f32) {
    let err = max_error(case, seed, dev, dtype).unwrap();
    assert!(err < tol, "{dev:?} {dtype:?}: max abs error {err} (tolerance {tol})");
}

#[test]
fn sliding_window_and_softcap() {
    for case in window_and_softcap_cases() {
        run_case(case, 4);
    }
}

#[test]
fn single_prompt_mha() {
    run_case(
        Case {
            shape: AttnShape { num_heads: 4, num_kv_heads: 4, head_dim: 16 },
            block_size: 4,
            seqs: vec![(0, 11)],
            params: AttnParams::new(1.0),
        },
        1,
    );
}

#[test]
fn gqa_mixed_prefill_chunks_and_decodes_with_partial_blocks() {
    run_case(gqa_mixed_case(), 2);
}

#[test]
fn odd_head_dim_and_block_size_one() {
    run_case(
        Case {
            shape: AttnShape { num_heads: 2, num_kv_heads: 1, head_dim: 13 },
            block_size: 1,
            seqs: vec![(5, 3), (0, 7)],
            params: AttnParams::new(1.0),
        },
        3,
    );
}

/// A float16 or bfloat16 cache on the CPU (`--kv-cache-dtype`): the same cases within the
/// half types' rounding, through the 16-key register path, the generic path (odd head size,
/// one-token blocks), sliding windows and soft-capping.
#[test]
fn half_precision_caches_on_the_cpu() {
    let odd = || Case {
        shape: AttnShape { num_heads: 2, num_kv_heads: 1, head_dim: 13 },
        block_size: 1,
        seqs: vec![(5, 3), (0, 7)],
        params: AttnParams::new(1.0),
    };
    for (dtype, tol) in [(DType::F16, 5e-3), (DType::BF16, 3e-2)] {
        run_case_on(&gqa_mixed_case(), 2, &Device::Cpu, dtype, tol);
        run_case_on(&head_dim_128_case(), 5, &Device::Cpu, dtype, tol);
        run_case_on(&odd(), 3, &Device::Cpu, dtype, tol);
        for case in window_and_softcap_cases() {
            run_case_on(&case, 4, &Device::Cpu, dtype, tol);
        }
    }
}

/// A float32 key beyond float16's range is stored as float16's largest value, not infinity
/// (which would turn the sequence's every later softmax into NaN).
#[test]
fn float16_cache_saturates_instead_of_overflowing() {
    let shape = AttnShape { num_heads: 1, num_kv_heads: 1, head_dim: 4 };
    let cache = KvCache::with_dtype(2, 2, shape, DType::F16, &Device::Cpu).unwrap();
    let meta = AttnMetadata::new(2, vec![SeqAttn { query_len: 2, context_len: 2, block_table: vec![1] }]);
    let k = Tensor::from_vec(vec![1e6f32, -1e6, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5], (2, 1, 4), &Device::Cpu).unwrap();
    cache.write(&k, &k, &meta).unwrap();
    let q = Tensor::ones((2, 1, 4), DType::F32, &Device::Cpu).unwrap();
    let out = cache.attend(&q, &meta, 1e-3).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(out.iter().all(|v| v.is_finite()), "{out:?}");
    assert_eq!(out[0], 65504.0, "the first token sees only itself");
    assert_eq!(KvCache::bytes_per_token(shape, DType::F16) * 2, KvCache::bytes_per_token(shape, DType::F32));
    assert!(KvCache::with_dtype(2, 2, shape, DType::U8, &Device::Cpu).is_err());
}

#[test]
fn padding_slots_are_skipped() {
    let mut cache = vec![1f32; 8];
    cpu::reshape_and_cache(&[5.0, 6.0, 7.0, 8.0], &mut cache, &[-1, 2], 2);
    assert_eq!(cache, vec![1.0, 1.0, 1.0, 1.0, 7.0, 8.0, 1.0, 1.0]);
}

#[test]
fn wrong_shapes_are_errors_not_panics() {
    let shape = AttnShape { num_heads: 2, num_kv_heads: 1, head_dim: 4 };
    let cache = KvCache::new(2, 2, shape, &Device::Cpu).unwrap();
    let meta = AttnMetadata::new(2, vec![SeqAttn { query_len: 1, context_len: 1, block_table: vec![0] }]);
    let bad = Tensor::zeros((2, 1, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(cache.write(&bad, &bad, &meta).is_err());
    assert!(cache.attend(&bad, &meta, 1.0).is_err());
}

#[test]
fn long_chunks_span_several_query_tiles() {
    // 16-token query tiles: a 40-token prompt, a 35-token chunk after 10 cached, and a decode.
    run_case(
        Case {
            shape: AttnShape { num_heads: 6, num_kv_heads: 2, head_dim: 32 },
            block_size: 8,
            seqs: vec![(0, 40), (10, 35), (3, 1)],
            params: AttnParams::new(1.0),
        },
        4,
    );
}

#[test]
fn head_dim_128_with_four_heads_per_kv_head() {
    run_case(head_dim_128_case(), 5);
}

#[test]
fn copied_block_attends_like_the_original() {
    // A 6-token sequence in blocks [0, 1]; block 1 copied to 3. Attending through [0, 3] must
    // give exactly what [0, 1] gives (copy-on-write of a shared partial block).
    let shape = AttnShape { num_heads: 2, num_kv_heads: 1, head_dim: 8 };
    let dev = Device::Cpu;
    let cache = KvCache::new(4, 4, shape, &dev).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut rand = |n: usize| (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect::<Vec<f32>>();
    let write = SeqAttn { query_len: 6, context_len: 6, block_table: vec![0, 1] };
    let meta = AttnMetadata::new(4, vec![write]);
    let k = Tensor::from_vec(rand(6 * 8), (6, 1, 8), &dev).unwrap();
    let v = Tensor::from_vec(rand(6 * 8), (6, 1, 8), &dev).unwrap();
    cache.write(&k, &v, &meta).unwrap();
    cache.copy_blocks(&[(1, 3)]).unwrap();
    let q = Tensor::from_vec(rand(2 * 8), (1, 2, 8), &dev).unwrap();
    let attend = |table: Vec<u32>| {
        let meta = AttnMetadata::new(4, vec![SeqAttn { query_len: 1, context_len: 6, block_table: table }]);
        cache.attend(&q, &meta, 0.3).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    assert_eq!(attend(vec![0, 1]), attend(vec![0, 3]));
    assert!(cache.copy_blocks(&[(1, 4)]).is_err(), "out-of-range copy is an error");
}

#[test]
fn sampler_helpers_match_scalar_math() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let x: Vec<f32> = (0..1003).map(|_| rng.random_range(-30.0f32..30.0)).collect();
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    assert_eq!(cpu::max_value(&x), max);
    assert_eq!(cpu::max_value(&[f32::NAN, 1.0, f32::NAN]), 1.0, "NaN is ignored");
    assert_eq!(cpu::max_value(&[]), f32::NEG_INFINITY);
    let mut e = x.clone();
    cpu::exp_shifted(&mut e, max, 0.7);
    for (a, &v) in e.iter().zip(&x) {
        let want = ((v - max) * 0.7).exp();
        assert!((a - want).abs() <= 1e-6 * want.max(1e-30) + 1e-38, "{a} vs {want}");
    }
}

/// The same cases on the GPU (`cargo xtask build-cuda` builds them; run on a CUDA machine with
/// `cargo test -p vllm-kernels --features cuda`).
#[cfg(feature = "cuda")]
mod cuda {
    use super::*;

    fn gpu() -> Device {
        Device::new_cuda(0).expect("built with --features cuda: these tests need a CUDA device")
    }

    /// (dtype, tolerance): the reference uses the unrounded float32 inputs.
    const DTYPES: [(DType, f32); 3] = [(DType::F32, 1e-5), (DType::F16, 5e-3), (DType::BF16, 3e-2)];

    #[test]
    fn gqa_mixed_prefill_and_decode() {
        for (dtype, tol) in DTYPES {
            run_case_on(&gqa_mixed_case(), 2, &gpu(), dtype, tol);
        }
    }

    #[test]
    fn head_dim_128() {
        for (dtype, tol) in DTYPES {
            run_case_on(&head_dim_128_case(), 5, &gpu(), dtype, tol);
        }
    }

    #[test]
    fn sliding_window_and_softcap() {
        for case in window_and_softcap_cases() {
            for (dtype, tol) in DTYPES {
                run_case_on(&case, 4, &gpu(), dtype, tol);
            }
        }
    }

    #[test]
    fn every_head_size() {
        for &d in vllm_kernels::CUDA_HEAD_SIZES {
            for (dtype, tol) in DTYPES {
                run_case_on(&vllm_kernels::check::head_size_case(d), 6, &gpu(), dtype, tol);
            }
        }
    }

    #[test]
    fn unsupported_head_size_is_an_error() {
        let shape = AttnShape { num_heads: 2, num_kv_heads: 1, head_dim: 48 };
        let dev = gpu();
        let cache = KvCache::with_dtype(2, 2, shape, DType::F32, &dev).unwrap();
        let meta = AttnMetadata::new(2, vec![SeqAttn { query_len: 1, context_len: 1, block_table: vec![0] }]);
        let q = Tensor::zeros((1, 2, 48), DType::F32, &dev).unwrap();
        let err = cache.attend(&q, &meta, 1.0).unwrap_err().to_string();
        assert!(err.contains("not 48"), "{err}");
    }
}

/// A large half-precision cache costs no memory until its blocks are written: allocating one
/// must not touch its pages (candle's own zeros would write every value, so a 4 GiB default
/// cache took 10 s to start and 4 GiB of RSS).
#[cfg(target_os = "linux")]
#[test]
fn half_precision_cache_pages_are_touched_only_when_written() {
    fn rss_mib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() / 1024
    }
    let shape = AttnShape { num_heads: 8, num_kv_heads: 8, head_dim: 64 };
    for dtype in [DType::F16, DType::BF16] {
        let before = rss_mib();
        // 4096 blocks x 16 tokens x 8 heads x 64 x 2 bytes = 64 MiB per tensor, K and V: 128 MiB.
        let cache = KvCache::with_dtype(4096, 16, shape, dtype, &Device::Cpu).unwrap();
        let after = rss_mib();
        assert!(after < before + 32, "{dtype:?}: RSS grew from {before} to {after} MiB on allocation");
        drop(cache);
    }
}
