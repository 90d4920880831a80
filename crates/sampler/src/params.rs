//! `SamplingParams`, with vLLM's field names, defaults and validation.

use serde::{Deserialize, Serialize};

/// Why sampling parameters were rejected: the parameter and the rule it broke.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid value for '{param}': {message}")]
pub struct InvalidParam {
    /// The parameter's name (vLLM's spelling).
    pub param: &'static str,
    /// What is allowed, and what was given.
    pub message: String,
}

fn invalid(param: &'static str, message: impl Into<String>) -> InvalidParam {
    InvalidParam { param, message: message.into() }
}

/// How to sample one request (vLLM's `SamplingParams`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Output sequences returned per prompt.
    pub n: usize,
    /// Sequences generated per prompt (`>= n`, default `n`); the `n` with the highest
    /// cumulative log probability are returned.
    pub best_of: Option<usize>,
    /// Randomness: 0 is greedy; higher is more random.
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability sums to `top_p`.
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens; 0 or -1 disables.
    pub top_k: i32,
    /// Drop tokens less likely than `min_p` times the most likely one.
    pub min_p: f32,
    /// Per-request seed: the same seed gives the same output, whatever else is batched.
    pub seed: Option<u64>,
    /// Most tokens to generate (`None`: up to the model's context length).
    pub max_tokens: Option<usize>,
    /// EOS and stop tokens are ignored before this many tokens.
    pub min_tokens: usize,
    /// Keep generating after EOS.
    pub ignore_eos: bool,
    /// Token ids that end generation (the token is kept in the output ids).
    pub stop_token_ids: Vec<u32>,
    /// Drop special tokens from the output text.
    pub skip_special_tokens: bool,
    /// Return the sampled token's log probability and the `logprobs` most likely tokens' at
    /// each step (`Some(0)`: the sampled token's only). Computed from the model's raw
    /// distribution, before temperature and filtering (vLLM's default `raw_logprobs`).
    pub logprobs: Option<usize>,
    /// Salt for the prefix cache: requests reuse each other's cached blocks only when their
    /// salts are equal (vLLM's `cache_salt`, against timing attacks across tenants).
    pub cache_salt: Option<String>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            n: 1,
            best_of: None,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
            max_tokens: Some(16),
            min_tokens: 0,
            ignore_eos: false,
            stop_token_ids: Vec::new(),
            skip_special_tokens: true,
            logprobs: None,
            cache_salt: None,
        }
    }
}

/// The most top log probabilities a request may ask for (vLLM's default `max_logprobs`).
pub const MAX_LOGPROBS: usize = 20;

/// Below this temperature sampling is greedy (vLLM's `_SAMPLING_EPS`).
pub const SAMPLING_EPS: f32 = 1e-5;

impl SamplingParams {
    /// Greedy decoding of up to `max_tokens` tokens.
    pub fn greedy(max_tokens: usize) -> Self {
        Self { temperature: 0.0, max_tokens: Some(max_tokens), ..Self::default() }
    }

    /// Sequences generated for the prompt (`best_of`, or `n`).
    pub fn num_sequences(&self) -> usize {
        self.best_of.unwrap_or(self.n).max(self.n)
    }

    /// Whether the sampled tokens' log probabilities are needed (asked for, or to rank
    /// `best_of` candidates).
    pub fn needs_logprobs(&self) -> bool {
        self.logprobs.is_some() || self.num_sequences() > self.n
    }

    /// Whether the request is decoded greedily.
    pub fn is_greedy(&self) -> bool {
        self.temperature < SAMPLING_EPS
    }

    /// The effective top-k (`None` when disabled).
    pub fn top_k(&self) -> Option<usize> {
        (self.top_k > 0).then_some(self.top_k as usize)
    }

    /// Checks every field against its allowed range.
    pub fn validate(&self, vocab_size: usize) -> Result<(), InvalidParam> {
        if self.n == 0 {
            return Err(invalid("n", "must be at least 1, got 0"));
        }
        if let Some(b) = self.best_of {
            if b < self.n {
                return Err(invalid("best_of", format!("must be >= n ({}), got {b}", self.n)));
            }
        }
        if let Some(k) = self.logprobs {
            if k > MAX_LOGPROBS {
                return Err(invalid("logprobs", format!("must be at most {MAX_LOGPROBS}, got {k}")));
            }
        }
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(invalid("temperature", format!("must be >= 0, got {}", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(invalid("top_p", format!("must be in (0, 1], got {}", self.top_p)));
        }
        if self.top_k < -1 {
            return Err(invalid("top_k", format!("must be -1 or 0 (disable) or at least 1, got {}", self.top_k)));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(invalid("min_p", format!("must be in [0, 1], got {}", self.min_p)));
        }
        if self.max_tokens == Some(0) {
            return Err(invalid("max_tokens", "must be at least 1, got 0"));
        }
        if let Some(max) = self.max_tokens {
            if self.min_tokens > max {
                return Err(invalid("min_tokens", format!("must be <= max_tokens ({max}), got {}", self.min_tokens)));
            }
        }
        if let Some(&bad) = self.stop_token_ids.iter().find(|&&t| t as usize >= vocab_size) {
            return Err(invalid(
                "stop_token_ids",
                format!("token id {bad} is outside the vocabulary (size {vocab_size})"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_vllm() {
        let p = SamplingParams::default();
        assert_eq!((p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.max_tokens), (1, 1.0, 1.0, 0, 0.0, Some(16)));
        assert!(p.validate(10).is_ok());
    }

    #[test]
    fn out_of_range_values_name_the_parameter() {
        let cases: Vec<(SamplingParams, &str)> = vec![
            (SamplingParams { temperature: -0.5, ..Default::default() }, "temperature"),
            (SamplingParams { top_p: 0.0, ..Default::default() }, "top_p"),
            (SamplingParams { top_p: 1.5, ..Default::default() }, "top_p"),
            (SamplingParams { top_k: -3, ..Default::default() }, "top_k"),
            (SamplingParams { min_p: 2.0, ..Default::default() }, "min_p"),
            (SamplingParams { max_tokens: Some(0), ..Default::default() }, "max_tokens"),
            (SamplingParams { min_tokens: 20, ..Default::default() }, "min_tokens"),
            (SamplingParams { stop_token_ids: vec![99], ..Default::default() }, "stop_token_ids"),
            (SamplingParams { n: 0, ..Default::default() }, "n"),
            (SamplingParams { n: 3, best_of: Some(2), ..Default::default() }, "best_of"),
            (SamplingParams { logprobs: Some(21), ..Default::default() }, "logprobs"),
        ];
        for (p, name) in cases {
            assert_eq!(p.validate(50).unwrap_err().param, name);
        }
    }
}
