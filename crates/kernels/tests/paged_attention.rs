//! The paged-attention kernel against a naive causal attention on contiguous K/V: on the CPU,
//! and with `--features cuda` the same cases on the GPU in f32, f16 and bf16 (module `cuda`,
//! which needs a CUDA device: it fails, not skips, without one).

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use vllm_kernels::{cpu, AttnMetadata, AttnParams, AttnShape, KvCache, SeqAttn};

/// softmax(q k^T * scale) v for one head over keys 0..=pos (the last `window` of them, scores
/// soft-capped), on contiguous per-sequence K/V.
fn naive(q: &[f32], ks: &[Vec<f32>], vs: &[Vec<f32>], pos: usize, p: AttnParams) -> Vec<f32> {
    let lo = p.sliding_window.map_or(0, |w| (pos + 1).saturating_sub(w));
    let scores: Vec<f64> = (0..=pos)
        .map(|j| {
            let s = q.iter().zip(&ks[j]).map(|(a, b)| (*a as f64) * (*b as f64)).sum::<f64>() * p.scale as f64;
            let s = p.softcap.map_or(s, |c| c as f64 * (s / c as f64).tanh());
            if j < lo {
                f64::NEG_INFINITY
            } else {
                s
            }
        })
        .collect();
    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    let d = q.len();
    let mut out = vec![0f64; d];
    for j in 0..=pos {
        for i in 0..d {
            out[i] += e[j] / sum * vs[j][i] as f64;
        }
    }
    out.into_iter().map(|x| x as f32).collect()
}

struct Case {
    shape: AttnShape,
    block_size: usize,
    /// (tokens already cached, new query tokens) per sequence
    seqs: Vec<(usize, usize)>,
    /// Window and soft-cap (the scale is 1 / sqrt(head_dim) whatever this says).
    params: AttnParams,
}

fn run_case(case: Case, seed: u64) {
    run_case_on(&case, seed, &Device::Cpu, DType::F32, 1e-5);
}

/// Runs `case` with the cache and queries in `dtype` on `dev`; the reference uses the float32
/// values before rounding to `dtype`, so `tol` covers that rounding.
fn run_case_on(case: &Case, seed: u64, dev: &Device, dtype: DType, tol: f32) {
    let AttnShape { num_heads, num_kv_heads, head_dim } = case.shape;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut randv = |n: usize| (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect::<Vec<f32>>();
    let bs = case.block_size;
    let total_blocks: usize = case.seqs.iter().map(|(c, q)| (c + q).div_ceil(bs)).sum::<usize>() + 3;
    // Hand out blocks in a scrambled order so tables are not contiguous.
    let mut free: Vec<u32> = (0..total_blocks as u32).rev().collect();
    free.swap(0, total_blocks / 2);
    let cache = KvCache::with_dtype(total_blocks, bs, case.shape, dtype, dev).unwrap();
    let tensor = |v: Vec<f32>, shape: (usize, usize, usize)| {
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap().to_device(dev).unwrap()
    };
    let kvw = num_kv_heads * head_dim;

    // Per sequence: full K/V history [len][kv_heads*d].
    let mut hist_k = Vec::new();
    let mut hist_v = Vec::new();
    let mut seqs = Vec::new();
    for &(cached, new) in &case.seqs {
        let len = cached + new;
        let table: Vec<u32> = (0..len.div_ceil(bs)).map(|_| free.pop().unwrap()).collect();
        hist_k.push((0..len).map(|_| randv(kvw)).collect::<Vec<_>>());
        hist_v.push((0..len).map(|_| randv(kvw)).collect::<Vec<_>>());
        seqs.push((cached, table));
    }
    // Step 1: write the already-cached part (as a previous step would have).
    let prev = AttnMetadata::new(
        bs,
        seqs.iter()
            .filter(|(c, _)| *c > 0)
            .map(|(c, t)| SeqAttn { query_len: *c, context_len: *c, block_table: t.clone() })
            .collect(),
    );
    let flat = |h: &Vec<Vec<Vec<f32>>>, range: &dyn Fn(usize) -> std::ops::Range<usize>| -> Vec<f32> {
        h.iter().enumerate().flat_map(|(i, s)| s[range(i)].iter().flatten().copied().collect::<Vec<_>>()).collect()
    };
    if prev.num_tokens() > 0 {
        let kf = flat(&hist_k, &|i| 0..case.seqs[i].0);
        let vf = flat(&hist_v, &|i| 0..case.seqs[i].0);
        let n = prev.num_tokens();
        cache.write(&tensor(kf, (n, num_kv_heads, head_dim)), &tensor(vf, (n, num_kv_heads, head_dim)), &prev).unwrap();
    }
    // Step 2: the mixed batch.
    let meta = AttnMetadata::new(
        bs,
        case.seqs
            .iter()
            .zip(&seqs)
            .map(|(&(c, n), (_, t))| SeqAttn { query_len: n, context_len: c + n, block_table: t.clone() })
            .collect(),
    );
    let n = meta.num_tokens();
    let kf = flat(&hist_k, &|i| case.seqs[i].0..case.seqs[i].0 + case.seqs[i].1);
    let vf = flat(&hist_v, &|i| case.seqs[i].0..case.seqs[i].0 + case.seqs[i].1);
    cache.write(&tensor(kf, (n, num_kv_heads, head_dim)), &tensor(vf, (n, num_kv_heads, head_dim)), &meta).unwrap();
    let q = randv(n * num_heads * head_dim);
    let params = AttnParams { scale: 1.0 / (head_dim as f32).sqrt(), ..case.params };
    let qt = tensor(q.clone(), (n, num_heads, head_dim));
    let out = cache.attend_with(&qt, &meta, params).unwrap();
    assert_eq!(out.dtype(), dtype);
    let out = out.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();

    let group = num_heads / num_kv_heads;
    let mut t = 0;
    let mut max_err = 0f32;
    for (si, &(c, nq)) in case.seqs.iter().enumerate() {
        for i in 0..nq {
            let pos = c + i;
            for h in 0..num_heads {
                let kvh = h / group;
                let ks: Vec<Vec<f32>> =
                    hist_k[si].iter().map(|r| r[kvh * head_dim..(kvh + 1) * head_dim].to_vec()).collect();
                let vs: Vec<Vec<f32>> =
                    hist_v[si].iter().map(|r| r[kvh * head_dim..(kvh + 1) * head_dim].to_vec()).collect();
                let qv = &q[(t * num_heads + h) * head_dim..][..head_dim];
                let want = naive(qv, &ks, &vs, pos, params);
                let got = &out[(t * num_heads + h) * head_dim..][..head_dim];
                for (a, b) in want.iter().zip(got) {
                    max_err = max_err.max((a - b).abs());
                }
            }
            t += 1;
        }
    }
    assert!(max_err < tol, "{dev:?} {dtype:?}: max abs error {max_err} (tolerance {tol})");
}

fn window_and_softcap_cases() -> Vec<Case> {
    [(Some(5), None), (None, Some(0.5)), (Some(16), Some(1.0)), (Some(1), None)]
        .into_iter()
        .map(|(window, softcap)| Case {
            shape: AttnShape { num_heads: 8, num_kv_heads: 2, head_dim: 64 },
            block_size: 16,
            seqs: vec![(0, 23), (37, 1), (20, 13), (3, 1)],
            params: AttnParams { scale: 1.0, sliding_window: window, softcap },
        })
        .collect()
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

fn gqa_mixed_case() -> Case {
    Case {
        shape: AttnShape { num_heads: 9, num_kv_heads: 3, head_dim: 64 },
        block_size: 16,
        // fresh prompt, a decode token after 37 cached, a prompt chunk after 20, a decode at a block edge
        seqs: vec![(0, 23), (37, 1), (20, 13), (31, 1), (0, 1)],
        params: AttnParams::new(1.0),
    }
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

fn head_dim_128_case() -> Case {
    Case {
        shape: AttnShape { num_heads: 8, num_kv_heads: 2, head_dim: 128 },
        block_size: 16,
        seqs: vec![(0, 21), (17, 1), (5, 9), (300, 1)],
        params: AttnParams::new(1.0),
    }
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
    fn unsupported_head_size_is_an_error() {
        let shape = AttnShape { num_heads: 2, num_kv_heads: 1, head_dim: 32 };
        let dev = gpu();
        let cache = KvCache::with_dtype(2, 2, shape, DType::F32, &dev).unwrap();
        let meta = AttnMetadata::new(2, vec![SeqAttn { query_len: 1, context_len: 1, block_table: vec![0] }]);
        let q = Tensor::zeros((1, 2, 32), DType::F32, &dev).unwrap();
        let err = cache.attend(&q, &meta, 1.0).unwrap_err().to_string();
        assert!(err.contains("head sizes 64 and 128"), "{err}");
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
