//! Sampling on the logits' device: greedy and temperature / top-k / top-p draws for a whole
//! step, returning only token ids (a GPU step then copies 4 bytes per row to the host instead
//! of a row of logits). The CPU implementation here and the CUDA kernel
//! (`kernels/sampling.cu`) compute the same thing the same way:
//!
//! - temperature 0: the first index of the largest logit;
//! - otherwise `p_i = exp((l_i - max) / T)` (unnormalised; the best token gets 1), the top-k
//!   threshold `t_k` is the largest `t` with at least k tokens `p >= t`, and the top-p
//!   threshold the largest `t >= t_k` whose tokens `p >= t` hold at least `top_p` of the
//!   top-k set's mass (vLLM's order: top-k, then top-p renormalised within it). Both are
//!   found by binary search over the bit patterns of non-negative floats (which order like
//!   the values), so no sort is needed and the result is exact;
//! - the token is found by inverse CDF over the kept tokens in index order: the first whose
//!   running mass exceeds `u` times the kept mass, `u` drawn by the sequence's own seeded
//!   generator on the host.

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

/// How one row is drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowParams {
    /// 0: greedy.
    pub temperature: f32,
    /// 0: no top-k.
    pub top_k: u32,
    /// 1: no top-p.
    pub top_p: f32,
    /// A uniform draw in `[0, 1)`.
    pub u: f32,
}

/// One token per row of `logits` (`[rows, vocab]` f32), row `i` drawn by `params[i]`.
pub fn sample_rows(logits: &Tensor, params: &[RowParams]) -> Result<Vec<u32>> {
    let (rows, _) = logits.dims2()?;
    if rows != params.len() {
        bail!("sample_rows: {rows} rows, {} parameter sets", params.len());
    }
    if rows == 0 {
        return Ok(Vec::new());
    }
    let logits = logits.to_dtype(candle_core::DType::F32)?.contiguous()?;
    logits.apply_op1_no_bwd(&SampleOp { params })?.to_vec1::<u32>()
}

struct SampleOp<'a> {
    params: &'a [RowParams],
}

impl CustomOp1 for SampleOp<'_> {
    fn name(&self) -> &'static str {
        "sample_rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((a, b)) = l.contiguous_offsets() else { bail!("sample_rows: logits must be contiguous") };
        let CpuStorage::F32(data) = s else { bail!("sample_rows: f32 logits") };
        let (rows, vocab) = l.shape().dims2()?;
        let data = &data[a..b];
        let out: Vec<u32> = (0..rows).map(|r| sample_row(&data[r * vocab..(r + 1) * vocab], self.params[r])).collect();
        Ok((CpuStorage::U32(out), Shape::from(rows)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, vocab) = l.shape().dims2()?;
        let out = crate::cuda::sample_rows(s, l, rows, vocab, self.params)?;
        Ok((out, Shape::from(rows)))
    }
}

/// The first index of the largest value (NaN never wins).
pub fn argmax_first(row: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] || row[best].is_nan() && !v.is_nan() {
            best = i;
        }
    }
    best as u32
}

/// The largest `t` (over non-negative floats) for which `ok(t)` holds, given `ok` holds at 0
/// and is monotone (true up to some point, false after): binary search over bit patterns.
fn largest_threshold(ok: impl Fn(f32) -> bool) -> f32 {
    let (mut lo, mut hi) = (0u32, 1.0f32.to_bits() + 1); // ok(lo) holds; hi is past 1
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if ok(f32::from_bits(mid)) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    f32::from_bits(lo)
}

/// One row, as described in the module docs.
pub fn sample_row(logits: &[f32], p: RowParams) -> u32 {
    if p.temperature <= 0.0 {
        return argmax_first(logits);
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return argmax_first(logits);
    }
    let probs: Vec<f32> = logits.iter().map(|&l| ((l - max) / p.temperature).exp()).collect();
    let count = |t: f32| probs.iter().filter(|&&q| q >= t).count();
    let mass = |t: f32| probs.iter().filter(|&&q| q >= t).sum::<f32>();
    let vocab = probs.len();
    let t_k = match p.top_k as usize {
        k if k > 0 && k < vocab => largest_threshold(|t| count(t) >= k),
        _ => 0.0,
    };
    let t = if p.top_p < 1.0 {
        let target = p.top_p * mass(t_k);
        largest_threshold(|t| mass(t.max(t_k)) >= target).max(t_k)
    } else {
        t_k
    };
    let kept = mass(t);
    let target = p.u * kept;
    let (mut acc, mut last) = (0.0f32, None);
    for (i, &q) in probs.iter().enumerate() {
        if q >= t && q > 0.0 {
            acc += q;
            last = Some(i);
            if acc > target {
                return i as u32;
            }
        }
    }
    last.map_or_else(|| argmax_first(logits), |i| i as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The kept set by sorting (vLLM's definition), then the same inverse CDF.
    fn reference(logits: &[f32], p: RowParams) -> u32 {
        if p.temperature <= 0.0 {
            return argmax_first(logits);
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let probs: Vec<f32> = logits.iter().map(|&l| ((l - max) / p.temperature).exp()).collect();
        let mut order: Vec<usize> = (0..probs.len()).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
        let k = if p.top_k > 0 { (p.top_k as usize).min(probs.len()) } else { probs.len() };
        let top: Vec<usize> = order[..k].to_vec();
        let total: f32 = top.iter().map(|&i| probs[i]).sum();
        let mut keep = Vec::new();
        let mut acc = 0.0;
        for &i in &top {
            keep.push(i);
            acc += probs[i];
            if p.top_p < 1.0 && acc >= p.top_p * total {
                break;
            }
        }
        keep.sort_unstable();
        let kept: f32 = keep.iter().map(|&i| probs[i]).sum();
        let mut run = 0.0;
        for &i in &keep {
            run += probs[i];
            if run > p.u * kept {
                return i as u32;
            }
        }
        *keep.last().unwrap() as u32
    }

    fn logits(seed: u64, n: usize) -> Vec<f32> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-6.0f32..6.0)).collect()
    }

    #[test]
    fn matches_the_sorting_definition() {
        let mut checked = 0;
        for seed in 0..40u64 {
            let row = logits(seed, 500);
            for (t, k, top_p) in
                [(1.0, 0, 1.0), (0.7, 20, 1.0), (1.3, 0, 0.9), (0.8, 50, 0.5), (1.0, 1, 1.0), (2.0, 499, 0.99)]
            {
                for u in [0.0, 0.13, 0.5, 0.77, 0.999] {
                    let p = RowParams { temperature: t, top_k: k, top_p, u };
                    assert_eq!(sample_row(&row, p), reference(&row, p), "seed {seed} {p:?}");
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 40 * 6 * 5);
    }

    #[test]
    fn greedy_top_k_one_and_tiny_top_p_are_argmax() {
        let row = logits(3, 1000);
        let best = argmax_first(&row);
        for p in [
            RowParams { temperature: 0.0, top_k: 0, top_p: 1.0, u: 0.5 },
            RowParams { temperature: 1.0, top_k: 1, top_p: 1.0, u: 0.9 },
            RowParams { temperature: 1.0, top_k: 0, top_p: 1e-6, u: 0.9 },
        ] {
            assert_eq!(sample_row(&row, p), best, "{p:?}");
        }
        // Ties: the first index wins, and NaN never does.
        assert_eq!(argmax_first(&[1.0, 3.0, f32::NAN, 3.0]), 1);
        assert_eq!(argmax_first(&[f32::NAN, 0.5]), 1);
    }

    #[test]
    fn draws_follow_the_distribution() {
        // Three tokens with probabilities 0.5, 0.3, 0.2 at temperature 1: u sweeps [0, 1).
        let row = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let mut counts = [0usize; 3];
        for i in 0..1000 {
            let p = RowParams { temperature: 1.0, top_k: 0, top_p: 1.0, u: i as f32 / 1000.0 };
            counts[sample_row(&row, p) as usize] += 1;
        }
        assert!(counts.iter().zip([500, 300, 200]).all(|(&c, w)| c.abs_diff(w) <= 2), "{counts:?}");
        // top_p 0.6 keeps the first two, renormalised: 0.625 / 0.375.
        let mut counts = [0usize; 3];
        for i in 0..1000 {
            let p = RowParams { temperature: 1.0, top_k: 0, top_p: 0.6, u: i as f32 / 1000.0 };
            counts[sample_row(&row, p) as usize] += 1;
        }
        assert!(counts[2] == 0 && counts[0].abs_diff(625) <= 2, "{counts:?}");
    }

    #[test]
    fn the_op_runs_every_row_with_its_own_params() {
        let rows: Vec<Vec<f32>> = (0..4).map(|s| logits(s, 300)).collect();
        let params: Vec<RowParams> =
            (0..4).map(|i| RowParams { temperature: i as f32 * 0.5, top_k: 10 * i, top_p: 0.9, u: 0.3 }).collect();
        let t = Tensor::from_vec(rows.concat(), (4, 300), &Device::Cpu).unwrap();
        let got = sample_rows(&t, &params).unwrap();
        let want: Vec<u32> = rows.iter().zip(&params).map(|(r, &p)| reference(r, p)).collect();
        assert_eq!(got, want);
        assert!(sample_rows(&t, &params[..3]).is_err());
    }
}
