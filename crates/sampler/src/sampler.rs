//! Sampling a batch of logit rows, each with its own parameters and seeded generator.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::params::SamplingParams;

/// The sampling state of one sequence: its parameters and its own random generator, so a
/// seeded request draws the same numbers whatever else shares the batch.
#[derive(Debug, Clone)]
pub struct SeqSampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

impl SeqSampler {
    /// State for one sequence; `fallback_seed` is used when the params carry no seed.
    pub fn new(params: SamplingParams, fallback_seed: u64) -> Self {
        let seed = params.seed.unwrap_or(fallback_seed);
        Self { params, rng: ChaCha8Rng::seed_from_u64(seed) }
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Samples one token from a row of logits (the row is used as scratch space), with its
    /// log probabilities when the parameters ask for them.
    pub fn sample(&mut self, logits: &mut [f32]) -> Sample {
        let raw = self.params.needs_logprobs().then(|| logits.to_vec());
        let token =
            if self.params.is_greedy() { argmax(logits) } else { sample_random(logits, &self.params, &mut self.rng) };
        let logprobs = raw.map(|raw| TokenLogprobs::new(&raw, token, self.params.logprobs.unwrap_or(0)));
        Sample { token, logprobs }
    }
}

/// One sampled token.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The token id.
    pub token: u32,
    /// Its log probabilities, when requested.
    pub logprobs: Option<TokenLogprobs>,
}

/// Log probabilities at one position, from the raw (unprocessed) distribution.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// The chosen token's log probability.
    pub logprob: f32,
    /// The chosen token's rank (1 = most likely).
    pub rank: u32,
    /// The `k` most likely tokens, most likely first (lower id first on ties).
    pub top: Vec<(u32, f32)>,
}

impl TokenLogprobs {
    /// Log probabilities of `token` and the `k` most likely entries of a raw logits row.
    pub fn new(raw: &[f32], token: u32, k: usize) -> Self {
        let lse = log_sum_exp(raw);
        let chosen = raw[token as usize];
        let rank = 1 + raw.iter().filter(|&&v| v > chosen).count() as u32;
        let top = top_k_indices(raw, k).into_iter().map(|i| (i, raw[i as usize] - lse)).collect();
        Self { logprob: chosen - lse, rank, top }
    }
}

/// `log(sum(exp(row)))`, computed stably.
pub fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return max;
    }
    let sum: f64 = row.iter().map(|&v| ((v - max) as f64).exp()).sum();
    max + sum.ln() as f32
}

/// Indices of the `k` largest values, largest first (lower index first on ties).
pub fn top_k_indices(row: &[f32], k: usize) -> Vec<u32> {
    let k = k.min(row.len());
    if k == 0 {
        return Vec::new();
    }
    let by_desc = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
    let mut idx: Vec<u32> = (0..row.len() as u32).collect();
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, by_desc);
        idx.truncate(k);
    }
    idx.sort_unstable_by(by_desc);
    idx
}

/// Index of the largest value (the first one on ties); NaN never wins.
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in row.iter().enumerate() {
        if v > best_v {
            best_v = v;
            best = i;
        }
    }
    best as u32
}

fn sample_random(logits: &mut [f32], p: &SamplingParams, rng: &mut ChaCha8Rng) -> u32 {
    let inv_t = 1.0 / p.temperature;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return argmax(logits);
    }
    // Unnormalised probabilities relative to the most likely token (which gets 1.0).
    for l in logits.iter_mut() {
        *l = ((*l - max) * inv_t).exp();
    }
    let min_p = p.min_p;
    let mut cand: Vec<u32> =
        (0..logits.len() as u32).filter(|&i| logits[i as usize] > 0.0 && logits[i as usize] >= min_p).collect();
    let by_prob_desc = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    if let Some(k) = p.top_k() {
        if k < cand.len() {
            cand.select_nth_unstable_by(k - 1, by_prob_desc);
            cand.truncate(k);
        }
    }
    if p.top_p < 1.0 {
        cand.sort_unstable_by(by_prob_desc);
        let total: f32 = cand.iter().map(|&i| logits[i as usize]).sum();
        let target = p.top_p * total;
        let mut acc = 0.0;
        let mut keep = cand.len();
        for (n, &i) in cand.iter().enumerate() {
            acc += logits[i as usize];
            if acc >= target {
                keep = n + 1;
                break;
            }
        }
        cand.truncate(keep.max(1));
    } else {
        cand.sort_unstable();
    }
    let total: f32 = cand.iter().map(|&i| logits[i as usize]).sum();
    let mut u = rng.random::<f32>() * total;
    for &i in &cand {
        u -= logits[i as usize];
        if u <= 0.0 {
            return i;
        }
    }
    *cand.last().unwrap_or(&0)
}

/// Samples one token per row of `logits` (`[rows, vocab]` flattened), row `i` with `seqs[i]`.
/// Rows are independent: the result of a row never depends on the others.
pub fn sample_batch(logits: &mut [f32], vocab: usize, seqs: &mut [&mut SeqSampler]) -> Vec<Sample> {
    assert_eq!(logits.len(), vocab * seqs.len(), "one logits row per sequence");
    if seqs.iter().all(|s| s.params.is_greedy() && !s.params.needs_logprobs()) {
        return logits.chunks(vocab).map(|r| Sample { token: argmax(r), logprobs: None }).collect();
    }
    logits.par_chunks_mut(vocab).zip(seqs.par_iter_mut()).map(|(row, s)| s.sample(row)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(t: f32) -> SamplingParams {
        SamplingParams { temperature: t, ..Default::default() }
    }

    #[test]
    fn greedy_is_argmax() {
        let mut s = SeqSampler::new(SamplingParams::greedy(4), 0);
        assert_eq!(s.sample(&mut [0.1, 3.0, -1.0, 3.0]).token, 1);
    }

    #[test]
    fn same_seed_same_draws_regardless_of_batch() {
        let row: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let p = SamplingParams { seed: Some(7), ..params(1.0) };
        let alone: Vec<u32> = {
            let mut s = SeqSampler::new(p.clone(), 0);
            (0..20).map(|_| s.sample(&mut row.clone()).token).collect()
        };
        let mut a = SeqSampler::new(p, 0);
        let mut b = SeqSampler::new(params(1.0), 99);
        let mut batched = Vec::new();
        for _ in 0..20 {
            let mut l = [row.clone(), row.clone()].concat();
            batched.push(sample_batch(&mut l, 100, &mut [&mut a, &mut b])[0].token);
        }
        assert_eq!(alone, batched);
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let row = vec![0.0, 1.0, 5.0, 2.0];
        for p in [SamplingParams { top_k: 1, ..params(1.0) }, SamplingParams { top_p: 1e-6, ..params(1.0) }] {
            let mut s = SeqSampler::new(p, 3);
            for _ in 0..50 {
                assert_eq!(s.sample(&mut row.clone()).token, 2);
            }
        }
    }

    #[test]
    fn logprobs_come_from_the_raw_distribution() {
        // Raw probabilities 0.5 / 0.25 / 0.125 / 0.125, whatever the temperature.
        let row = vec![0.125f32.ln(), 0.5f32.ln(), 0.25f32.ln(), 0.125f32.ln()];
        let p = SamplingParams { temperature: 0.0, logprobs: Some(3), ..Default::default() };
        let mut s = SeqSampler::new(p, 0);
        let out = s.sample(&mut row.clone());
        assert_eq!(out.token, 1);
        let lp = out.logprobs.expect("logprobs were asked for");
        assert!((lp.logprob - 0.5f32.ln()).abs() < 1e-6);
        assert_eq!(lp.rank, 1);
        let ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![1, 2, 0], "most likely first, lower id first on ties");
        assert!((lp.top[1].1 - 0.25f32.ln()).abs() < 1e-6);
        // A sampled token's rank counts the strictly more likely tokens.
        let p = SamplingParams { temperature: 1.0, logprobs: Some(0), seed: Some(3), ..Default::default() };
        let mut s = SeqSampler::new(p, 0);
        for _ in 0..50 {
            let out = s.sample(&mut row.clone());
            let lp = out.logprobs.unwrap();
            assert!(lp.top.is_empty());
            let expected_rank = match out.token {
                1 => 1,
                2 => 2,
                _ => 3,
            };
            assert_eq!(lp.rank, expected_rank);
            assert!((lp.logprob - row[out.token as usize]).abs() < 1e-6);
        }
    }

    #[test]
    fn min_p_filters_unlikely_tokens() {
        // exp(-3) ~ 0.05 < 0.1: only tokens 0 and 1 (prob ratio 1 and e^-1) survive.
        let row = vec![3.0, 2.0, 0.0, 0.0];
        let mut s = SeqSampler::new(SamplingParams { min_p: 0.1, ..params(1.0) }, 1);
        for _ in 0..200 {
            assert!(s.sample(&mut row.clone()).token < 2);
        }
    }

    #[test]
    fn temperature_sampling_follows_the_distribution() {
        // Probabilities 0.5 / 0.25 / 0.25.
        let row = vec![2f32.ln(), 0.0, 0.0];
        let mut s = SeqSampler::new(params(1.0), 5);
        let mut counts = [0usize; 3];
        for _ in 0..20_000 {
            counts[s.sample(&mut row.clone()).token as usize] += 1;
        }
        let f0 = counts[0] as f64 / 20_000.0;
        assert!((f0 - 0.5).abs() < 0.02, "token 0 frequency {f0}");
        let f1 = counts[1] as f64 / 20_000.0;
        assert!((f1 - 0.25).abs() < 0.02, "token 1 frequency {f1}");
    }
}
