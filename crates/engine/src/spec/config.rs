//! `--speculative-config` (vLLM's `SpeculativeConfig`), parsed from its JSON form with
//! vLLM's keys; unknown keys and methods are refused by name.

use std::str::FromStr;

use serde::Deserialize;

use crate::Error;

/// How draft tokens are proposed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpecMethod {
    /// Prompt lookup: the longest recent n-gram of the sequence found earlier in its prompt
    /// or output proposes the tokens that followed it there.
    Ngram,
    /// Suffix decoding: the sequence's longest suffix matched in its own tokens and in recent
    /// requests' outputs; the continuation follows the most frequent branch, as far as its
    /// frequency and the match's length allow.
    Suffix,
    /// A smaller model with the same tokenizer (`model`) drafts greedily.
    DraftModel,
}

impl SpecMethod {
    /// vLLM's name for the method.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ngram => "ngram",
            Self::Suffix => "suffix",
            Self::DraftModel => "draft_model",
        }
    }
}

/// The JSON as written, every key optional (vLLM's names).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    method: Option<String>,
    num_speculative_tokens: Option<usize>,
    prompt_lookup_min: Option<usize>,
    prompt_lookup_max: Option<usize>,
    model: Option<String>,
    draft_tensor_parallel_size: Option<usize>,
    disable_by_batch_size: Option<usize>,
    suffix_decoding_max_tree_depth: Option<usize>,
    suffix_decoding_max_spec_factor: Option<f32>,
    suffix_decoding_min_token_prob: Option<f32>,
    suffix_decoding_max_cached_requests: Option<usize>,
}

/// A validated speculative-decoding configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct SpeculativeConfig {
    /// How drafts are proposed.
    pub method: SpecMethod,
    /// Most draft tokens per sequence per step.
    pub num_speculative_tokens: usize,
    /// `ngram`: shortest n-gram matched (vLLM's default 5 when neither bound is given).
    pub prompt_lookup_min: usize,
    /// `ngram`: longest n-gram matched.
    pub prompt_lookup_max: usize,
    /// `draft_model`: the draft model (a folder, .gguf file or Hugging Face id).
    pub model: Option<String>,
    /// Speculation is off for a step when this many sequences or more are running; `None`:
    /// the engine's automatic rule (drafts only while the step stays small enough that the
    /// extra rows cost less than they save, see [`crate::spec::AUTO_ROW_BUDGET`]).
    pub disable_by_batch_size: Option<usize>,
    /// `suffix`: longest suffix matched (vLLM's default 24).
    pub suffix_max_tree_depth: usize,
    /// `suffix`: at most this many draft tokens per matched token (default 1.0).
    pub suffix_max_spec_factor: f32,
    /// `suffix`: a continuation stops where its estimated probability falls below this
    /// (default 0.1).
    pub suffix_min_token_prob: f32,
    /// `suffix`: finished requests whose outputs are remembered (default 10,000; also bounded
    /// by [`crate::spec::SUFFIX_MAX_CACHED_TOKENS`] tokens).
    pub suffix_max_cached_requests: usize,
}

/// Most draft tokens per step a configuration may ask for (each is a query row).
pub const MAX_SPECULATIVE_TOKENS: usize = 64;

fn invalid(message: impl Into<String>) -> Error {
    Error::InvalidArgument { param: "speculative_config", message: message.into() }
}

impl FromStr for SpeculativeConfig {
    type Err = Error;

    /// Parses the JSON object vLLM's `--speculative-config` takes.
    fn from_str(s: &str) -> Result<Self, Error> {
        if s.len() > 64 * 1024 {
            return Err(invalid("the JSON is longer than 64 KiB"));
        }
        let raw: Raw = serde_json::from_str(s).map_err(|e| invalid(format!("{e}")))?;
        Self::from_raw(raw)
    }
}

impl SpeculativeConfig {
    /// `ngram` with `k` draft tokens and vLLM's default n-gram bounds.
    pub fn ngram(k: usize) -> Self {
        Self::from_raw(Raw { method: Some("ngram".into()), num_speculative_tokens: Some(k), ..Raw::default() })
            .unwrap_or_else(|e| unreachable!("a valid config: {e}"))
    }

    /// `suffix` with vLLM's defaults.
    pub fn suffix() -> Self {
        Self::from_raw(Raw { method: Some("suffix".into()), ..Raw::default() })
            .unwrap_or_else(|e| unreachable!("a valid config: {e}"))
    }

    fn from_raw(raw: Raw) -> Result<Self, Error> {
        let method = match (raw.method.as_deref(), &raw.model) {
            (Some("ngram" | "[ngram]"), _) => SpecMethod::Ngram,
            (Some("suffix"), _) => SpecMethod::Suffix,
            (Some("draft_model"), _) | (None, Some(_)) => SpecMethod::DraftModel,
            (Some(m @ ("eagle" | "eagle3" | "medusa" | "mlp_speculator" | "mtp" | "deepseek_mtp")), _) => {
                return Err(invalid(format!(
                    "method '{m}' is not supported yet (supported: ngram, suffix, draft_model)"
                )))
            }
            (Some(m), _) => {
                return Err(invalid(format!("unknown method '{m}' (supported: ngram, suffix, draft_model)")))
            }
            (None, None) => return Err(invalid("'method' is required (ngram, suffix or draft_model)")),
        };
        if let Some(tp) = raw.draft_tensor_parallel_size.filter(|&t| t != 1) {
            return Err(invalid(format!("draft_tensor_parallel_size {tp}: only 1 is supported")));
        }
        if method == SpecMethod::DraftModel && raw.model.is_none() {
            return Err(invalid("method draft_model needs 'model' (the draft model)"));
        }
        if method != SpecMethod::DraftModel && raw.model.is_some() {
            return Err(invalid(format!("'model' is for draft_model, not {}", method.name())));
        }
        let depth = raw.suffix_decoding_max_tree_depth.unwrap_or(24);
        let k = match (raw.num_speculative_tokens, method) {
            (Some(k), _) => k,
            (None, SpecMethod::Suffix) => depth,
            (None, _) => return Err(invalid(format!("method {} needs num_speculative_tokens", method.name()))),
        };
        if k == 0 || k > MAX_SPECULATIVE_TOKENS {
            return Err(invalid(format!("num_speculative_tokens {k}: must be 1 to {MAX_SPECULATIVE_TOKENS}")));
        }
        let (min, max) = match (raw.prompt_lookup_min, raw.prompt_lookup_max) {
            (None, None) => (5, 5),
            (Some(n), None) | (None, Some(n)) => (n, n),
            (Some(a), Some(b)) => (a, b),
        };
        if min == 0 || min > max || max > 1024 {
            return Err(invalid(format!(
                "prompt_lookup_min {min} / prompt_lookup_max {max}: need 1 <= min <= max <= 1024"
            )));
        }
        if !(1..=1024).contains(&depth) {
            return Err(invalid(format!("suffix_decoding_max_tree_depth {depth}: must be 1 to 1024")));
        }
        let factor = raw.suffix_decoding_max_spec_factor.unwrap_or(1.0);
        if !(factor.is_finite() && factor > 0.0) {
            return Err(invalid(format!("suffix_decoding_max_spec_factor {factor}: must be positive")));
        }
        let prob = raw.suffix_decoding_min_token_prob.unwrap_or(0.1);
        if !(0.0..=1.0).contains(&prob) {
            return Err(invalid(format!("suffix_decoding_min_token_prob {prob}: must be in [0, 1]")));
        }
        if raw.disable_by_batch_size == Some(0) {
            return Err(invalid("disable_by_batch_size 0: must be positive"));
        }
        Ok(Self {
            method,
            num_speculative_tokens: k,
            prompt_lookup_min: min,
            prompt_lookup_max: max,
            model: raw.model,
            disable_by_batch_size: raw.disable_by_batch_size,
            suffix_max_tree_depth: depth,
            suffix_max_spec_factor: factor,
            suffix_min_token_prob: prob,
            suffix_max_cached_requests: raw.suffix_decoding_max_cached_requests.unwrap_or(10_000),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(s: &str) -> String {
        s.parse::<SpeculativeConfig>().unwrap_err().to_string()
    }

    #[test]
    fn vllm_json_parses_with_vllm_defaults() {
        let c: SpeculativeConfig =
            r#"{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}"#.parse().unwrap();
        assert_eq!(
            (c.method, c.num_speculative_tokens, c.prompt_lookup_min, c.prompt_lookup_max),
            (SpecMethod::Ngram, 4, 3, 3)
        );
        let c: SpeculativeConfig = r#"{"method": "suffix"}"#.parse().unwrap();
        assert_eq!((c.num_speculative_tokens, c.suffix_max_tree_depth), (24, 24));
        let c: SpeculativeConfig = r#"{"model": "draft", "num_speculative_tokens": 3}"#.parse().unwrap();
        assert_eq!(c.method, SpecMethod::DraftModel);
        assert_eq!(SpeculativeConfig::ngram(3).prompt_lookup_min, 5);
    }

    #[test]
    fn unknown_keys_methods_and_bad_values_are_named() {
        assert!(err(r#"{"method": "ngram", "num_speculative_tokens": 2, "lookahead": 3}"#).contains("lookahead"));
        assert!(err(r#"{"method": "magic"}"#).contains("unknown method 'magic'"));
        assert!(err(r#"{"method": "eagle", "num_speculative_tokens": 2}"#).contains("not supported yet"));
        assert!(err(r#"{"method": "ngram"}"#).contains("num_speculative_tokens"));
        assert!(err(r#"{"method": "ngram", "num_speculative_tokens": 100000}"#).contains("1 to 64"));
        assert!(err(
            r#"{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2}"#
        )
        .contains("prompt_lookup_min"));
        assert!(err(r#"{"method": "draft_model", "num_speculative_tokens": 2}"#).contains("needs 'model'"));
        assert!(err(r#"{"method": "ngram", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 2}"#)
            .contains("only 1"));
        assert!(err("[1, 2]").contains("speculative_config"));
    }
}
