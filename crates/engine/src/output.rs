//! Request inputs and outputs, shaped like vLLM's.

use serde::Serialize;

/// A prompt: text (tokenized by the model's tokenizer) or token ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    /// Text.
    Text(String),
    /// Pre-tokenized ids.
    TokenIds(Vec<u32>),
}

impl From<&str> for Prompt {
    fn from(s: &str) -> Self {
        Prompt::Text(s.to_string())
    }
}
impl From<String> for Prompt {
    fn from(s: String) -> Self {
        Prompt::Text(s)
    }
}
impl From<&String> for Prompt {
    fn from(s: &String) -> Self {
        Prompt::Text(s.clone())
    }
}
impl From<Vec<u32>> for Prompt {
    fn from(ids: Vec<u32>) -> Self {
        Prompt::TokenIds(ids)
    }
}
impl From<&[u32]> for Prompt {
    fn from(ids: &[u32]) -> Self {
        Prompt::TokenIds(ids.to_vec())
    }
}

/// Why a sequence ended (vLLM's `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// EOS, a stop token or a stop string.
    Stop,
    /// `max_tokens` or the context length.
    Length,
    /// Aborted.
    Abort,
}

impl FinishReason {
    /// vLLM's string.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

impl std::fmt::Display for FinishReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A token with its log probability (vLLM's `Logprob`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Logprob {
    /// The token id.
    pub token_id: u32,
    /// Its log probability under the model's raw distribution.
    pub logprob: f32,
    /// Its rank among all tokens (1 = most likely).
    pub rank: u32,
    /// The token decoded on its own.
    pub decoded_token: String,
}

/// Log probabilities at one generated position: the sampled token and the top-k alternatives.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PositionLogprobs {
    /// The token that was sampled.
    pub sampled: Logprob,
    /// The `logprobs` most likely tokens, most likely first (may include the sampled one).
    pub top: Vec<Logprob>,
}

/// What ended a sequence with `finish_reason` stop, besides EOS (serialized as vLLM does: the
/// token id as a number, the string as a string).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum StopReason {
    /// A `stop_token_ids` entry.
    Token(u32),
    /// A `stop` string.
    Text(String),
}

/// One generated sequence (vLLM's `CompletionOutput`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CompletionOutput {
    /// Index among the request's sequences.
    pub index: usize,
    /// Generated text so far.
    pub text: String,
    /// Generated token ids so far (including a final EOS or stop token).
    pub token_ids: Vec<u32>,
    /// Set once finished.
    pub finish_reason: Option<FinishReason>,
    /// The stop token id or stop string that ended the sequence, if one did (vLLM's
    /// `stop_reason`; `None` for EOS and `length`).
    pub stop_reason: Option<StopReason>,
    /// Sum of the sampled tokens' log probabilities (when log probabilities were computed).
    pub cumulative_logprob: Option<f64>,
    /// Per generated token, when `logprobs` was requested.
    pub logprobs: Option<Vec<PositionLogprobs>>,
}

impl CompletionOutput {
    /// Whether the sequence is done.
    pub fn finished(&self) -> bool {
        self.finish_reason.is_some()
    }
}

/// The output of one request (vLLM's `RequestOutput`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestOutput {
    /// The request's id.
    pub request_id: String,
    /// The prompt text, when the prompt was text.
    pub prompt: Option<String>,
    /// The prompt's token ids.
    pub prompt_token_ids: Vec<u32>,
    /// The generated sequences.
    pub outputs: Vec<CompletionOutput>,
    /// Whether the whole request is done.
    pub finished: bool,
    /// Prompt tokens served from the prefix cache.
    pub num_cached_tokens: usize,
    /// With `prompt_logprobs`: per prompt position, the prompt token's log probability and
    /// the top alternatives (`None` for the first position, which has no context).
    pub prompt_logprobs: Option<Vec<Option<PositionLogprobs>>>,
}
