//! Reference checks of the paged-attention kernels against a naive attention on contiguous
//! K/V, for any device and cache type: the CPU tests (`tests/paged_attention.rs`) and the GPU
//! acceptance check (`vllm-server gpu-check`) run the same cases.

use candle_core::{DType, Device, Result, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{AttnMetadata, AttnParams, AttnShape, KvCache, SeqAttn};

/// Largest acceptable error per cache type: the reference uses the unrounded float32 inputs.
pub fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 1e-5,
        DType::F16 => 5e-3,
        _ => 3e-2,
    }
}

/// softmax(q k^T * scale) v for one head over keys 0..=pos (the last `window` of them, scores
/// soft-capped), on contiguous per-sequence K/V.
pub fn naive(q: &[f32], ks: &[Vec<f32>], vs: &[Vec<f32>], pos: usize, p: AttnParams) -> Vec<f32> {
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

/// One attention case: a head layout, a block size and a batch of sequences.
pub struct Case {
    /// Head layout.
    pub shape: AttnShape,
    /// Tokens per block.
    pub block_size: usize,
    /// (tokens already cached, new query tokens) per sequence
    pub seqs: Vec<(usize, usize)>,
    /// Window and soft-cap (the scale is 1 / sqrt(head_dim) whatever this says).
    pub params: AttnParams,
}

/// Runs `case` with the cache and queries in `dtype` on `dev` and returns the largest absolute
/// error against [`naive`], which uses the float32 values before rounding to `dtype`.
pub fn max_error(case: &Case, seed: u64, dev: &Device, dtype: DType) -> Result<f32> {
    let AttnShape { num_heads, num_kv_heads, head_dim } = case.shape;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut randv = |n: usize| (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect::<Vec<f32>>();
    let bs = case.block_size;
    let total_blocks: usize = case.seqs.iter().map(|(c, q)| (c + q).div_ceil(bs)).sum::<usize>() + 3;
    // Hand out blocks in a scrambled order so tables are not contiguous.
    let mut free: Vec<u32> = (0..total_blocks as u32).rev().collect();
    free.swap(0, total_blocks / 2);
    let cache = KvCache::with_dtype(total_blocks, bs, case.shape, dtype, dev)?;
    let tensor = |v: Vec<f32>, shape: (usize, usize, usize)| -> Result<Tensor> {
        Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)?.to_device(dev)
    };
    let kvw = num_kv_heads * head_dim;

    // Per sequence: full K/V history [len][kv_heads*d].
    let mut hist_k = Vec::new();
    let mut hist_v = Vec::new();
    let mut seqs = Vec::new();
    for &(cached, new) in &case.seqs {
        let len = cached + new;
        let table: Vec<u32> = (0..len.div_ceil(bs)).map(|_| free.pop().expect("enough blocks")).collect();
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
        cache.write(&tensor(kf, (n, num_kv_heads, head_dim))?, &tensor(vf, (n, num_kv_heads, head_dim))?, &prev)?;
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
    cache.write(&tensor(kf, (n, num_kv_heads, head_dim))?, &tensor(vf, (n, num_kv_heads, head_dim))?, &meta)?;
    let q = randv(n * num_heads * head_dim);
    let params = AttnParams { scale: 1.0 / (head_dim as f32).sqrt(), ..case.params };
    let qt = tensor(q.clone(), (n, num_heads, head_dim))?;
    let out = cache.attend_with(&qt, &meta, params)?;
    if out.dtype() != dtype {
        candle_core::bail!("attention returned {:?} for {dtype:?} inputs", out.dtype());
    }
    let out = out.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;

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
    Ok(max_err)
}

/// Sliding windows and soft-capping, with GQA and mixed prefill/decode rows.
pub fn window_and_softcap_cases() -> Vec<Case> {
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

/// GQA with a fresh prompt, decodes after cached tokens, a prompt chunk and a block edge.
pub fn gqa_mixed_case() -> Case {
    Case {
        shape: AttnShape { num_heads: 9, num_kv_heads: 3, head_dim: 64 },
        block_size: 16,
        // fresh prompt, a decode token after 37 cached, a prompt chunk after 20, a decode at a block edge
        seqs: vec![(0, 23), (37, 1), (20, 13), (31, 1), (0, 1)],
        params: AttnParams::new(1.0),
    }
}

/// Head size 128, four query heads per key/value head, a 301-token context.
pub fn head_dim_128_case() -> Case {
    Case {
        shape: AttnShape { num_heads: 8, num_kv_heads: 2, head_dim: 128 },
        block_size: 16,
        seqs: vec![(0, 21), (17, 1), (5, 9), (300, 1)],
        params: AttnParams::new(1.0),
    }
}

/// The mixed GQA case with another head size (every size the GPU kernels are built for).
pub fn head_size_case(head_dim: usize) -> Case {
    Case { shape: AttnShape { num_heads: 8, num_kv_heads: 2, head_dim }, ..gqa_mixed_case() }
}
