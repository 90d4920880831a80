//! `SamplingParams`, with vLLM's field names, defaults and validation.

use std::collections::BTreeMap;

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
    /// Penalizes tokens that already appear in the output (added once per distinct token;
    /// negative values encourage them). In [-2, 2].
    pub presence_penalty: f32,
    /// Penalizes tokens by how often they appear in the output. In [-2, 2].
    pub frequency_penalty: f32,
    /// Divides positive logits (multiplies negative ones) of tokens in the prompt or output;
    /// 1 disables, above 1 discourages repetition. Positive.
    pub repetition_penalty: f32,
    /// Strings that end generation; the text is cut before the match (the token ids are kept).
    pub stop: Vec<String>,
    /// Keep the matched stop string at the end of the text.
    pub include_stop_str_in_output: bool,
    /// Log probabilities of each prompt token and the `k` most likely alternatives at each
    /// prompt position (the first position has none). Requests with it skip the prefix cache.
    pub prompt_logprobs: Option<usize>,
    /// Put spaces between special tokens when they are not skipped. Byte-level BPE tokenizers
    /// (every GGUF and `tokenizer.json` model here) decode special tokens verbatim, so, as
    /// with vLLM's fast tokenizers, this has no effect on their text.
    pub spaces_between_special_tokens: bool,
    /// Keep only the last `k` prompt tokens (left truncation).
    pub truncate_prompt_tokens: Option<usize>,
    /// Only these tokens may be generated.
    pub allowed_token_ids: Option<Vec<u32>>,
    /// Added to the logits of the given token ids before sampling (clamped to [-100, 100]).
    pub logit_bias: BTreeMap<u32, f32>,
    /// Words that must not be generated: the last token of a word is banned when the output
    /// ends with the word's other tokens (each word with and without a leading space).
    pub bad_words: Vec<String>,
    /// Produce text (false: token ids only; stop strings need text).
    pub detokenize: bool,
    /// What each output carries: everything so far, only what is new, or only the final one.
    pub output_kind: RequestOutputKind,
    /// Constrain the output to a JSON schema, a regex, a list of choices or any JSON object.
    pub guided_decoding: Option<crate::guided::GuidedDecodingParams>,
}

/// What a request's outputs carry (vLLM's `RequestOutputKind`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestOutputKind {
    /// Every output holds all tokens and text so far.
    #[default]
    Cumulative,
    /// Every output holds only the tokens and text new since the previous one.
    Delta,
    /// Only the final output is returned.
    FinalOnly,
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
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            stop: Vec::new(),
            include_stop_str_in_output: false,
            prompt_logprobs: None,
            spaces_between_special_tokens: true,
            truncate_prompt_tokens: None,
            allowed_token_ids: None,
            logit_bias: BTreeMap::new(),
            bad_words: Vec::new(),
            detokenize: true,
            output_kind: RequestOutputKind::Cumulative,
            guided_decoding: None,
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

    /// Whether any logits processor (penalties, bias, masks) applies to this request.
    pub fn has_processors(&self) -> bool {
        self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
            || self.repetition_penalty != 1.0
            || self.allowed_token_ids.is_some()
            || !self.logit_bias.is_empty()
            || !self.bad_words.is_empty()
            || self.min_tokens > 0
            || self.guided_decoding.is_some()
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
        if let Some(k) = self.prompt_logprobs {
            if k > MAX_LOGPROBS {
                return Err(invalid("prompt_logprobs", format!("must be at most {MAX_LOGPROBS}, got {k}")));
            }
        }
        for (name, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(invalid(name, format!("must be in [-2, 2], got {v}")));
            }
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(invalid("repetition_penalty", format!("must be > 0, got {}", self.repetition_penalty)));
        }
        if self.truncate_prompt_tokens == Some(0) {
            return Err(invalid("truncate_prompt_tokens", "must be at least 1, got 0"));
        }
        if let Some(allowed) = &self.allowed_token_ids {
            if allowed.is_empty() {
                return Err(invalid("allowed_token_ids", "must not be empty"));
            }
            if let Some(&bad) = allowed.iter().find(|&&t| t as usize >= vocab_size) {
                return Err(invalid(
                    "allowed_token_ids",
                    format!("token id {bad} is outside the vocabulary (size {vocab_size})"),
                ));
            }
        }
        for (&t, &b) in &self.logit_bias {
            if t as usize >= vocab_size {
                return Err(invalid(
                    "logit_bias",
                    format!("token id {t} is outside the vocabulary (size {vocab_size})"),
                ));
            }
            if !b.is_finite() {
                return Err(invalid("logit_bias", format!("bias of token {t} must be finite, got {b}")));
            }
        }
        if self.stop.iter().any(String::is_empty) {
            return Err(invalid("stop", "stop strings must not be empty"));
        }
        if !self.detokenize && !self.stop.is_empty() {
            return Err(invalid("stop", "stop strings need detokenize = true"));
        }
        // The constraint itself is checked when it is compiled (by the input processor, on
        // the compile pool: checking a grammar can be as costly as compiling it).
        if let Some(g) = &self.guided_decoding {
            g.check_shape(usize::MAX)?;
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
            (SamplingParams { prompt_logprobs: Some(21), ..Default::default() }, "prompt_logprobs"),
            (SamplingParams { presence_penalty: 2.5, ..Default::default() }, "presence_penalty"),
            (SamplingParams { frequency_penalty: -3.0, ..Default::default() }, "frequency_penalty"),
            (SamplingParams { repetition_penalty: 0.0, ..Default::default() }, "repetition_penalty"),
            (SamplingParams { truncate_prompt_tokens: Some(0), ..Default::default() }, "truncate_prompt_tokens"),
            (SamplingParams { allowed_token_ids: Some(vec![]), ..Default::default() }, "allowed_token_ids"),
            (SamplingParams { allowed_token_ids: Some(vec![3, 50]), ..Default::default() }, "allowed_token_ids"),
            (SamplingParams { logit_bias: [(50, 1.0)].into(), ..Default::default() }, "logit_bias"),
            (SamplingParams { logit_bias: [(5, f32::NAN)].into(), ..Default::default() }, "logit_bias"),
            (SamplingParams { stop: vec![String::new()], ..Default::default() }, "stop"),
            (SamplingParams { stop: vec!["x".into()], detokenize: false, ..Default::default() }, "stop"),
        ];
        for (p, name) in cases {
            assert_eq!(p.validate(50).unwrap_err().param, name);
        }
    }
}
