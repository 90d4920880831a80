//! Sampling a batch of logit rows, each with its own parameters and seeded generator.

use std::collections::{HashMap, HashSet};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use vllm_kernels::cpu;

use crate::guided::Guide;

use crate::params::SamplingParams;

/// The sampling state of one sequence: its parameters, its own random generator (so a
/// seeded request draws the same numbers whatever else shares the batch) and what the logits
/// processors need (its output so far, its prompt's tokens for the repetition penalty).
#[derive(Debug, Clone)]
pub struct SeqSampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// Generated tokens so far.
    output: Vec<u32>,
    /// How often each token was generated (frequency and presence penalties).
    counts: HashMap<u32, u32>,
    /// Prompt tokens (repetition penalty; empty unless it is on).
    prompt_tokens: HashSet<u32>,
    /// Tokens masked while fewer than `min_tokens` were generated (EOS, stop token ids).
    stop_ids: Vec<u32>,
    /// Tokenized bad words.
    bad_words: Vec<Vec<u32>>,
    /// Log probabilities from the temperature-scaled logits instead of the raw ones.
    scaled_logprobs: bool,
    /// The guided-decoding automaton and this sequence's state in it.
    guide: Option<Guide>,
    /// Tokens after which the guide starts (a reasoning model's end-of-thinking tag): until
    /// the output ends with them the guide neither masks nor follows.
    guide_after: Option<Vec<u32>>,
}

impl SeqSampler {
    /// State for one sequence; `fallback_seed` is used when the params carry no seed.
    pub fn new(params: SamplingParams, fallback_seed: u64) -> Self {
        let seed = params.seed.unwrap_or(fallback_seed);
        Self {
            params,
            rng: ChaCha8Rng::seed_from_u64(seed),
            output: Vec::new(),
            counts: HashMap::new(),
            prompt_tokens: HashSet::new(),
            stop_ids: Vec::new(),
            bad_words: Vec::new(),
            scaled_logprobs: false,
            guide: None,
            guide_after: None,
        }
    }

    /// Constrains the sequence with a guided-decoding automaton.
    pub fn with_guide(mut self, guide: Guide) -> Self {
        self.guide = Some(guide);
        self
    }

    /// Holds the guide back until the output ends with `tokens` (vLLM's structured output
    /// after reasoning: the thinking is free, the answer constrained). Empty: no effect.
    pub fn with_guide_after(mut self, tokens: Vec<u32>) -> Self {
        self.guide_after = Some(tokens).filter(|t| !t.is_empty());
        self
    }

    /// Computes log probabilities after temperature scaling (`log_softmax(logits / T)`),
    /// as beam search ranks beams, instead of from the raw distribution.
    pub fn with_scaled_logprobs(mut self) -> Self {
        self.scaled_logprobs = true;
        self
    }

    /// Adds what the processors need to know about the request: its prompt (for the
    /// repetition penalty), the ids `min_tokens` holds back (EOS and stop token ids) and the
    /// token ids of its bad words.
    pub fn with_context(mut self, prompt: &[u32], stop_ids: Vec<u32>, bad_words: Vec<Vec<u32>>) -> Self {
        if self.params.repetition_penalty != 1.0 {
            self.prompt_tokens = prompt.iter().copied().collect();
        }
        self.stop_ids = stop_ids;
        self.bad_words = bad_words.into_iter().filter(|w| !w.is_empty()).collect();
        self
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Applies the logits processors in vLLM's order: allowed-token mask, `min_tokens` stop
    /// mask, bad words, logit bias, then repetition, frequency and presence penalties.
    fn process(&mut self, logits: &mut [f32]) {
        let p = &self.params;
        if let (Some(g), None) = (self.guide.as_mut(), &self.guide_after) {
            g.mask(logits);
        }
        if let Some(allowed) = &p.allowed_token_ids {
            let keep: Vec<(u32, f32)> = allowed.iter().map(|&t| (t, logits[t as usize])).collect();
            logits.fill(f32::NEG_INFINITY);
            for (t, v) in keep {
                logits[t as usize] = v;
            }
        }
        if self.output.len() < p.min_tokens {
            for &t in &self.stop_ids {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        for w in &self.bad_words {
            let (last, prefix) = w.split_last().expect("bad words are not empty");
            if self.output.ends_with(prefix) {
                if let Some(l) = logits.get_mut(*last as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        for (&t, &b) in &p.logit_bias {
            logits[t as usize] += b.clamp(-100.0, 100.0);
        }
        if p.repetition_penalty != 1.0 {
            let r = p.repetition_penalty;
            for &t in self.prompt_tokens.iter().chain(self.counts.keys().filter(|t| !self.prompt_tokens.contains(t))) {
                let l = &mut logits[t as usize];
                *l = if *l > 0.0 { *l / r } else { *l * r };
            }
        }
        if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            for (&t, &c) in &self.counts {
                logits[t as usize] -= c as f32 * p.frequency_penalty + p.presence_penalty;
            }
        }
    }

    /// Notes a generated token: the penalties' history and the guide's state.
    fn record(&mut self, token: u32) {
        self.output.push(token);
        *self.counts.entry(token).or_insert(0) += 1;
        match &self.guide_after {
            Some(after) => {
                if self.output.ends_with(after) {
                    self.guide_after = None;
                }
            }
            None => {
                if let Some(g) = self.guide.as_mut() {
                    g.advance(token);
                }
            }
        }
    }

    /// Whether this sequence's next token can be drawn on the model's device
    /// ([`vllm_kernels::sample`]): greedy or temperature / top-k / top-p with nothing else
    /// (no logprobs, penalties, bias, masks, min_p or guide), so only its id has to come back.
    pub fn device_eligible(&self) -> bool {
        !self.params.needs_logprobs()
            && !self.params.has_processors()
            && self.params.min_p <= 0.0
            && self.guide.is_none()
    }

    /// The device sampler's parameters for this sequence's next token, with a uniform draw
    /// from its own seeded generator (so a seeded request repeats on the same device).
    fn device_params(&mut self) -> vllm_kernels::sample::RowParams {
        let greedy = self.params.is_greedy();
        vllm_kernels::sample::RowParams {
            temperature: if greedy { 0.0 } else { self.params.temperature },
            top_k: self.params.top_k().map_or(0, |k| k.min(u32::MAX as usize) as u32),
            top_p: self.params.top_p,
            u: if greedy { 0.0 } else { self.rng.random::<f32>() },
        }
    }

    /// Notes a token the device sampler drew for this sequence.
    fn record_device_sample(&mut self, token: u32) -> Sample {
        self.record(token);
        Sample { token, logprobs: None }
    }

    /// Samples one token from a row of logits (the row is used as scratch space), with its
    /// log probabilities when the parameters ask for them. Log probabilities come from the
    /// raw row, before any processor, penalty or temperature (vLLM's `raw_logprobs`).
    pub fn sample(&mut self, logits: &mut [f32]) -> Sample {
        let raw = self.params.needs_logprobs().then(|| {
            let mut row = logits.to_vec();
            if self.scaled_logprobs && !self.params.is_greedy() {
                let inv_t = 1.0 / self.params.temperature;
                row.iter_mut().for_each(|v| *v *= inv_t);
            }
            row
        });
        if self.params.has_processors() {
            self.process(logits);
        }
        let token =
            if self.params.is_greedy() { argmax(logits) } else { sample_random(logits, &self.params, &mut self.rng) };
        self.record(token);
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
    let max = cpu::max_value(row);
    row.iter().position(|&v| v == max).unwrap_or(0) as u32
}

fn sample_random(logits: &mut [f32], p: &SamplingParams, rng: &mut ChaCha8Rng) -> u32 {
    let inv_t = 1.0 / p.temperature;
    let max = cpu::max_value(logits);
    if !max.is_finite() {
        return argmax(logits);
    }
    // Unnormalised probabilities relative to the most likely token (which gets 1.0).
    cpu::exp_shifted(logits, max, inv_t);
    let min_p = p.min_p;
    let kept = |v: f32| v > 0.0 && v >= min_p;
    // Language models put almost all the mass on a few tokens. The largest threshold `t`
    // (relative to the best token's probability, 1) whose tokens already satisfy top-k (at
    // least k of them) and top-p (their mass reaches top_p of the total) bounds the
    // candidates: only tokens >= t can be kept, so the rest of the vocabulary is skipped
    // (exact, not an approximation).
    let full_total = || count_and_mass_at_least(logits, min_p.max(f32::MIN_POSITIVE)).1;
    let mut total_all = None;
    let mut threshold = None;
    if p.top_k().is_some() || p.top_p < 1.0 {
        let target = (p.top_k().is_none() && p.top_p < 1.0).then(|| {
            let t = full_total();
            total_all = Some(t);
            p.top_p * t * 1.001
        });
        for e in 1..=12 {
            let t = 10f32.powi(-e).max(min_p);
            let (count, mass) = count_and_mass_at_least(logits, t);
            if p.top_k().is_none_or(|k| count >= k) && target.is_none_or(|target| mass >= target) {
                threshold = Some(t);
                break;
            }
        }
    }
    let mut cand: Vec<u32> = match threshold {
        Some(t) => (0..logits.len() as u32).filter(|&i| logits[i as usize] >= t).collect(),
        None => (0..logits.len() as u32).filter(|&i| kept(logits[i as usize])).collect(),
    };
    let by_prob_desc = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    let mut top_k_applied = false;
    if let Some(k) = p.top_k() {
        if k < cand.len() {
            cand.select_nth_unstable_by(k - 1, by_prob_desc);
            cand.truncate(k);
        }
        top_k_applied = true;
    }
    if p.top_p < 1.0 {
        // Sort only the most likely candidates, a growing chunk at a time, until they cover
        // `top_p` of the mass (of the top-k set, or of every token).
        let total: f32 = match (top_k_applied, total_all) {
            (false, Some(t)) => t,
            (false, None) => full_total(),
            (true, _) => cand.iter().map(|&i| logits[i as usize]).sum(),
        };
        let target = p.top_p * total;
        let (mut done, mut chunk, mut acc) = (0, 256, 0.0f32);
        while done < cand.len() {
            // Bring the next most likely `chunk` candidates to `done..end`, in order.
            let end = (done + chunk).min(cand.len());
            if end < cand.len() {
                cand[done..].select_nth_unstable_by(end - done - 1, by_prob_desc);
            }
            cand[done..end].sort_unstable_by(by_prob_desc);
            let keep = cand[done..end].iter().position(|&i| {
                acc += logits[i as usize];
                acc >= target
            });
            if let Some(n) = keep {
                cand.truncate(done + n + 1);
                break;
            }
            done = end;
            chunk *= 4;
        }
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

/// How many values are `>= t`, and their sum (vectorizable lanes).
fn count_and_mass_at_least(x: &[f32], t: f32) -> (usize, f32) {
    let (mut count, mut mass) = ([0u32; 16], [0f32; 16]);
    let chunks = x.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..16 {
            let ge = c[i] >= t;
            count[i] += ge as u32;
            mass[i] += if ge { c[i] } else { 0.0 };
        }
    }
    let (c, m) = rest.iter().filter(|&&v| v >= t).fold((0usize, 0f32), |(c, m), &v| (c + 1, m + v));
    (c + count.iter().map(|&n| n as usize).sum::<usize>(), m + mass.iter().sum::<f32>())
}

/// Samples one token per row of `logits` (`[rows, vocab]` flattened), row `i` with `seqs[i]`.
/// Rows are independent: the result of a row never depends on the others.
pub fn sample_batch(logits: &mut [f32], vocab: usize, seqs: &mut [&mut SeqSampler]) -> Vec<Sample> {
    assert_eq!(logits.len(), vocab * seqs.len(), "one logits row per sequence");
    if seqs.iter().all(|s| s.params.is_greedy() && !s.params.needs_logprobs() && !s.params.has_processors()) {
        // Fast path: plain greedy batch.
        return logits
            .chunks(vocab)
            .zip(seqs.iter_mut())
            .map(|(r, s)| {
                let token = argmax(r);
                s.record(token);
                Sample { token, logprobs: None }
            })
            .collect();
    }
    logits.par_chunks_mut(vocab).zip(seqs.par_iter_mut()).map(|(row, s)| s.sample(row)).collect()
}

/// Samples one token per row of `logits` (a `[rows, vocab]` tensor on the model's device)
/// on that device, row `i` with `seqs[i]`: only the ids come back. Every sequence must be
/// [`SeqSampler::device_eligible`]; each draws with its own seeded generator, so a seeded
/// request repeats on the same device.
pub fn sample_batch_on_device(
    logits: &candle_core::Tensor,
    seqs: &mut [&mut SeqSampler],
) -> candle_core::Result<Vec<Sample>> {
    let params: Vec<vllm_kernels::sample::RowParams> = seqs.iter_mut().map(|s| s.device_params()).collect();
    let tokens = vllm_kernels::sample::sample_rows(logits, &params)?;
    Ok(seqs.iter_mut().zip(tokens).map(|(s, t)| s.record_device_sample(t)).collect())
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
    fn penalties_follow_vllm_formulas() {
        let p = SamplingParams {
            repetition_penalty: 2.0,
            frequency_penalty: 0.5,
            presence_penalty: 0.25,
            ..SamplingParams::greedy(8)
        };
        let mut s = SeqSampler::new(p, 0).with_context(&[0], vec![], vec![]);
        s.output = vec![1, 1, 2];
        s.counts = [(1, 2), (2, 1)].into();
        let mut row = vec![4.0, 3.0, -1.0, 0.5];
        s.process(&mut row);
        // Token 0 (prompt): 4 / 2. Token 1 (output twice): 3 / 2 - 2 * 0.5 - 0.25.
        // Token 2 (output once): -1 * 2 - 0.5 - 0.25. Token 3 untouched.
        assert_eq!(row, vec![2.0, 0.25, -2.75, 0.5]);
    }

    #[test]
    fn masks_and_bias_shape_the_choice() {
        let row = vec![5.0, 4.0, 3.0, 2.0];
        let pick = |p: SamplingParams, stop: Vec<u32>, bad: Vec<Vec<u32>>, out: Vec<u32>| {
            let mut s = SeqSampler::new(p, 0).with_context(&[], stop, bad);
            s.output = out;
            s.sample(&mut row.clone()).token
        };
        let g = SamplingParams::greedy(8);
        assert_eq!(pick(g.clone(), vec![], vec![], vec![]), 0);
        assert_eq!(
            pick(SamplingParams { allowed_token_ids: Some(vec![2, 3]), ..g.clone() }, vec![], vec![], vec![]),
            2
        );
        assert_eq!(pick(SamplingParams { logit_bias: [(3, 10.0)].into(), ..g.clone() }, vec![], vec![], vec![]), 3);
        // min_tokens holds EOS (0) back until enough tokens were generated.
        let min = SamplingParams { min_tokens: 2, ..g.clone() };
        assert_eq!(pick(min.clone(), vec![0], vec![], vec![7]), 1);
        assert_eq!(pick(min, vec![0], vec![], vec![7, 7]), 0);
        // A one-token bad word is always banned; a two-token one only after its first token.
        let bad = SamplingParams { bad_words: vec!["x".into()], ..g };
        assert_eq!(pick(bad.clone(), vec![], vec![vec![0]], vec![]), 1);
        assert_eq!(pick(bad.clone(), vec![], vec![vec![9, 0]], vec![1]), 0);
        assert_eq!(pick(bad, vec![], vec![vec![9, 0]], vec![1, 9]), 1);
    }

    #[test]
    fn top_p_nucleus_matches_a_full_sort() {
        // A long-tailed 5000-token distribution: the nucleus spans more than the first 256
        // candidates, so the selection grows; the draws must equal a plain full-sort sampler.
        let row: Vec<f32> = (0..5000).map(|i| -((i as f32) + 1.0).ln() * 0.6).collect();
        let p = SamplingParams { top_p: 0.9, seed: Some(1), ..params(1.0) };
        let mut s = SeqSampler::new(p.clone(), 0);
        let got: Vec<u32> = (0..300).map(|_| s.sample(&mut row.clone()).token).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let want: Vec<u32> = (0..300)
            .map(|_| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let probs: Vec<f32> = row.iter().map(|l| (l - max).exp()).collect();
                let mut idx: Vec<u32> = (0..5000).collect();
                idx.sort_by(|&a, &b| probs[b as usize].total_cmp(&probs[a as usize]).then(a.cmp(&b)));
                let total: f32 = probs.iter().sum();
                let mut acc = 0.0;
                let n = idx.iter().position(|&i| {
                    acc += probs[i as usize];
                    acc >= 0.9 * total
                });
                idx.truncate(n.unwrap() + 1);
                let total: f32 = idx.iter().map(|&i| probs[i as usize]).sum();
                let mut u = rng.random::<f32>() * total;
                for &i in &idx {
                    u -= probs[i as usize];
                    if u <= 0.0 {
                        return i;
                    }
                }
                *idx.last().unwrap()
            })
            .collect();
        assert!(got.iter().any(|&t| t > 256), "the nucleus reaches past 256 tokens");
        assert_eq!(got, want);
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

#[cfg(test)]
mod guide_after_tests {
    use super::*;
    use crate::{GuideCompiler, GuidedDecodingParams};

    /// Byte vocabulary: token `b` is byte `b`, EOS 256. The guide allows only "ok"; it waits
    /// for "</t>" (the reasoning's end), before which the model's own choices pass.
    #[test]
    fn the_guide_starts_after_the_end_tag() {
        let compiler = GuideCompiler::new((0..=255u32).map(|b| (b, vec![b as u8])), 256);
        let g = GuidedDecodingParams { choice: Some(vec!["ok".into()]), ..Default::default() };
        let compiled = compiler.compile(&g.constraint().unwrap()).unwrap();
        let params = SamplingParams { guided_decoding: Some(g), ..SamplingParams::greedy(16) };
        let after: Vec<u32> = "</t>".bytes().map(u32::from).collect();
        let mut s = SeqSampler::new(params, 0).with_guide(Guide::new(&compiled)).with_guide_after(after);
        // The model wants "hm</t>zz": "hm</t>" passes untouched, then the guide forces "ok".
        let mut out = Vec::new();
        for want in "hm</t>zz".bytes() {
            let mut row = vec![0.0f32; 257];
            row[want as usize] = 10.0;
            out.push(s.sample(&mut row).token as u8);
        }
        assert_eq!(&out[..6], b"hm</t>");
        assert_eq!(&out[6..], b"ok");
        let mut row = vec![0.0f32; 257];
        row[b'z' as usize] = 10.0;
        assert_eq!(s.sample(&mut row).token, 256, "the constraint is complete: only EOS");
    }
}
