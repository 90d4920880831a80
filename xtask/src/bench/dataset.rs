//! Benchmark workloads: seeded prompts of token ids, so every engine gets the same input
//! whatever its tokenizer front end does.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Which prompt/output lengths to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Dataset {
    /// Every request has exactly `--input-len` prompt tokens and `--output-len` output tokens
    /// (random token ids, like vLLM's `random` dataset).
    Random,
    /// Lengths drawn from a log-normal fit of ShareGPT's conversation turns (prompt median
    /// ~200 tokens, output median ~180), seeded. The real ShareGPT file cannot be downloaded
    /// here, so this reproduces its length distribution, not its text.
    SharegptLike,
}

/// One benchmark request.
#[derive(Debug, Clone)]
pub struct BenchRequest {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Tokens to generate (`ignore_eos` makes the count exact).
    pub output_len: usize,
}

/// Token ids used for random prompts: ordinary vocabulary entries, away from the special
/// tokens at the start of the SmolLM2 / GPT-2 style vocabularies.
const TOKEN_RANGE: std::ops::Range<u32> = 1000..40_000;

fn log_normal(rng: &mut ChaCha8Rng, median: f64, sigma: f64) -> f64 {
    // Box-Muller for a standard normal draw.
    let u1: f64 = rng.random::<f64>().max(1e-12);
    let u2: f64 = rng.random();
    let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
    median * (sigma * z).exp()
}

/// `num` requests, reproducible from `seed`.
pub fn make(dataset: Dataset, num: usize, input_len: usize, output_len: usize, seed: u64) -> Vec<BenchRequest> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..num)
        .map(|_| {
            let (inp, out) = match dataset {
                Dataset::Random => (input_len, output_len),
                Dataset::SharegptLike => (
                    (log_normal(&mut rng, 200.0, 1.0) as usize).clamp(4, 1024),
                    (log_normal(&mut rng, 180.0, 0.9) as usize).clamp(4, 1024),
                ),
            };
            let prompt = (0..inp).map(|_| rng.random_range(TOKEN_RANGE)).collect();
            BenchRequest { prompt, output_len: out }
        })
        .collect()
}

/// Mean, median and 99th percentile of a sample (zeros when empty).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Summary {
    /// Mean.
    pub mean: f64,
    /// Median.
    pub median: f64,
    /// 99th percentile.
    pub p99: f64,
}

/// Summarises `v` (sorted in place).
pub fn summarize(v: &mut [f64]) -> Summary {
    if v.is_empty() {
        return Summary::default();
    }
    v.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        let idx = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
        v[idx.min(v.len() - 1)]
    };
    Summary { mean: v.iter().sum::<f64>() / v.len() as f64, median: pct(50.0), p99: pct(99.0) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datasets_are_seeded_and_sized() {
        let a = make(Dataset::Random, 5, 17, 9, 1);
        assert!(a.iter().all(|r| r.prompt.len() == 17 && r.output_len == 9));
        assert_eq!(a[0].prompt, make(Dataset::Random, 5, 17, 9, 1)[0].prompt);
        let s = make(Dataset::SharegptLike, 400, 0, 0, 2);
        let mut lens: Vec<f64> = s.iter().map(|r| r.prompt.len() as f64).collect();
        let m = summarize(&mut lens).median;
        assert!((120.0..300.0).contains(&m), "median prompt length {m}");
    }

    #[test]
    fn summary_percentiles() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = summarize(&mut v);
        assert_eq!((s.mean, s.median, s.p99), (50.5, 51.0, 99.0));
    }
}
