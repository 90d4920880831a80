//! Wire types of the OpenAI-compatible API, and their conversion ("parse, don't validate")
//! into engine inputs. Parameters this server cannot honour yet are rejected with a 400 naming
//! them, never silently ignored.

use serde::Deserialize;
use serde_json::Value;
use utoipa::ToSchema;

use crate::error::ApiError;

/// Sampling fields shared by completions, chat and `/generate` (OpenAI's and vLLM's extras).
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct SamplingFields {
    pub max_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i32>,
    pub min_p: Option<f32>,
    pub n: Option<usize>,
    pub best_of: Option<usize>,
    /// Any 64-bit integer (vLLM's range); negative seeds are as good as positive ones.
    pub seed: Option<i64>,
    pub stop: Option<Value>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub ignore_eos: Option<bool>,
    pub min_tokens: Option<usize>,
    pub skip_special_tokens: Option<bool>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub logit_bias: Option<Value>,
    pub include_stop_str_in_output: Option<bool>,
    pub use_beam_search: Option<bool>,
    pub length_penalty: Option<f32>,
    pub guided_json: Option<Value>,
    pub guided_regex: Option<String>,
    pub guided_choice: Option<Value>,
    pub guided_grammar: Option<String>,
    pub bad_words: Option<Value>,
    pub allowed_token_ids: Option<Value>,
    pub prompt_logprobs: Option<Value>,
    pub truncate_prompt_tokens: Option<Value>,
    pub priority: Option<i64>,
    pub cache_salt: Option<String>,
    pub spaces_between_special_tokens: Option<bool>,
    pub early_stopping: Option<Value>,
    pub guided_whitespace_pattern: Option<String>,
    pub guided_decoding_backend: Option<String>,
    /// OpenAI's structured output: `{"type": "text" | "json_object" | "json_schema", ...}`.
    pub response_format: Option<Value>,
    /// vLLM >= 0.12's constraint object (`json`, `regex`, `choice`, `grammar`, `json_object`,
    /// `whitespace_pattern`).
    pub structured_outputs: Option<Value>,
    /// vLLM's: the response's id is `<prefix>-<request_id>` (at most 128 printable ASCII
    /// characters); the `X-Request-Id` header does the same.
    pub request_id: Option<String>,
    /// vLLM's: log-probability tokens are written `token_id:<id>` (for tokens that are not
    /// valid UTF-8 on their own).
    pub return_tokens_as_token_ids: Option<bool>,
    /// vLLM's: the prompt's and the output's token ids in the response.
    pub return_token_ids: Option<bool>,
    /// vLLM's: add the tokenizer's special tokens (BOS) to the prompt; default true for
    /// completions, false for chat (the template writes them).
    pub add_special_tokens: Option<bool>,
}

/// Request fields that OpenAI or vLLM define and that this server cannot honour: a 400 naming
/// the field, never a silent drop.
const UNSUPPORTED_FIELDS: &[&str] = &[
    "functions",
    "function_call",
    "parallel_tool_calls",
    "audio",
    "modalities",
    "prediction",
    "web_search_options",
    "reasoning_effort",
    "logits_processors",
    "prompt_embeds",
    "mm_processor_kwargs",
    "kv_transfer_params",
    "vllm_xargs",
    "structural_tag",
    "verbosity",
    "thinking_token_budget",
];

/// Informational fields that change nothing in the output: accepted and ignored.
const INFORMATIONAL_FIELDS: &[&str] =
    &["user", "metadata", "store", "service_tier", "n_threads", "prompt_cache_key", "safety_identifier"];

/// The policy for request fields this server does not know: a field OpenAI or vLLM defines
/// and this server cannot honour is a 400 naming it; an informational one is ignored; any
/// other is ignored with a warning in the log (vLLM's behaviour, so clients that send
/// extra fields keep working).
pub fn check_extra_fields(extra: &serde_json::Map<String, Value>) -> Result<(), ApiError> {
    for (k, v) in extra {
        if v.is_null() || INFORMATIONAL_FIELDS.contains(&k.as_str()) {
            continue;
        }
        if UNSUPPORTED_FIELDS.contains(&k.as_str()) {
            return Err(ApiError::unsupported(k, "(this feature)"));
        }
        tracing::warn!(field = %k, "the request has a field this server does not know; it is ignored");
    }
    Ok(())
}

#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct StreamOptions {
    /// A last chunk with the whole request's usage.
    #[serde(default)]
    pub include_usage: bool,
    /// vLLM's: every chunk carries the usage so far.
    #[serde(default)]
    pub continuous_usage_stats: bool,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Value,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub logprobs: Option<usize>,
    #[serde(default)]
    pub echo: bool,
    pub suffix: Option<String>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
    /// Fields not named above (see [`check_extra_fields`]).
    #[serde(flatten)]
    #[schema(ignore)]
    pub extra: serde_json::Map<String, Value>,
}

/// A prompt as the completions API accepts it.
#[derive(Debug, Clone)]
pub enum WirePrompt {
    Text(String),
    Ids(Vec<u32>),
}

/// `prompt`: a string, a list of strings, a list of token ids, or a list of lists of ids.
pub fn parse_prompts(v: &Value) -> Result<Vec<WirePrompt>, ApiError> {
    let bad = || {
        ApiError::invalid_param(
            "prompt",
            "prompt must be a string, a list of strings, a list of token ids, or a list of lists of token ids",
        )
    };
    let ids = |a: &Vec<Value>| -> Option<Vec<u32>> {
        a.iter().map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok())).collect()
    };
    let out = match v {
        Value::String(s) => vec![WirePrompt::Text(s.clone())],
        Value::Array(a) if a.is_empty() => return Err(ApiError::invalid_param("prompt", "prompt must not be empty")),
        Value::Array(a) if a.iter().all(|x| x.is_string()) => {
            a.iter().map(|x| WirePrompt::Text(x.as_str().unwrap_or_default().to_string())).collect()
        }
        Value::Array(a) if a.iter().all(|x| x.is_number()) => vec![WirePrompt::Ids(ids(a).ok_or_else(bad)?)],
        Value::Array(a) if a.iter().all(|x| x.is_array()) => a
            .iter()
            .map(|x| x.as_array().and_then(ids).map(WirePrompt::Ids).ok_or_else(bad))
            .collect::<Result<_, _>>()?,
        _ => return Err(bad()),
    };
    Ok(out)
}

/// `POST /v1/chat/completions` (also what the Responses and Messages routes convert into).
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<Value>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub max_completion_tokens: Option<usize>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<usize>,
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    /// `false`: at most one tool call (OpenAI's default is `true`).
    pub parallel_tool_calls: Option<bool>,
    pub add_generation_prompt: Option<bool>,
    #[serde(default)]
    pub continue_final_message: bool,
    #[serde(default)]
    pub echo: bool,
    pub chat_template: Option<String>,
    pub chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    pub documents: Option<Value>,
    /// With `--reasoning-parser`: `false` leaves the thinking out of the response (vLLM).
    pub include_reasoning: Option<bool>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
    /// Fields not named above (see [`check_extra_fields`]).
    #[serde(flatten)]
    #[schema(ignore)]
    pub extra: serde_json::Map<String, Value>,
}

/// `POST /generate` (vLLM's simple API).
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct GenerateRequest {
    /// A LoRA adapter's name selects it; the served name (or none) is the base model.
    pub model: Option<String>,
    pub prompt: String,
    #[serde(default)]
    pub stream: bool,
    #[serde(flatten)]
    pub sampling: SamplingFields,
    /// Fields not named above (see [`check_extra_fields`]).
    #[serde(flatten)]
    #[schema(ignore)]
    pub extra: serde_json::Map<String, Value>,
}

/// `POST /v1/load_lora_adapter` (vLLM's, with `VLLM_ALLOW_RUNTIME_LORA_UPDATING`).
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct LoadLoraRequest {
    pub lora_name: String,
    pub lora_path: String,
}

/// `POST /v1/unload_lora_adapter`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct UnloadLoraRequest {
    pub lora_name: String,
}

/// `POST /tokenize`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub messages: Option<Vec<Value>>,
    #[serde(default = "yes")]
    pub add_special_tokens: bool,
    #[serde(default = "yes")]
    pub add_generation_prompt: bool,
}

fn yes() -> bool {
    true
}

/// `POST /detokenize`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Vec<u32>,
}

/// `POST /v1/embeddings`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct EmbeddingRequest {
    pub model: Option<String>,
    /// A string, a list of strings, token ids, or lists of token ids.
    pub input: Value,
    /// `float` (default) or `base64`.
    pub encoding_format: Option<String>,
    /// Must equal the model's width when given (no truncated embeddings).
    pub dimensions: Option<usize>,
}

/// `POST /score`, `/v1/score` (vLLM's `ScoreRequest`): `text_1` one string and `text_2` one
/// or a list (1:1, 1:N), or two lists of the same length (N:N).
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ScoreRequest {
    pub model: Option<String>,
    /// A string or a list of strings.
    pub text_1: Value,
    /// A string or a list of strings.
    pub text_2: Value,
}

/// `POST /rerank`, `/v1/rerank`, `/v2/rerank` (vLLM's `RerankRequest`, Jina's and Cohere's
/// shape): the documents ranked by their score against the query.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct RerankRequest {
    pub model: Option<String>,
    /// A string.
    pub query: Value,
    /// A list of strings.
    pub documents: Value,
    /// The most results, best first; 0 (the default) returns every document.
    #[serde(default)]
    pub top_n: i64,
    /// Whether each result carries its document's text (default true, as vLLM does).
    pub return_documents: Option<bool>,
}

impl EmbeddingRequest {
    /// The inputs as engine prompts (`input` errors name `input`).
    pub fn prompts(&self) -> Result<Vec<vllm_engine::Prompt>, ApiError> {
        let prompts = parse_prompts(&self.input).map_err(|e| ApiError { param: Some("input".into()), ..e })?;
        Ok(prompts
            .into_iter()
            .map(|p| match p {
                WirePrompt::Text(t) => vllm_engine::Prompt::Text(t),
                WirePrompt::Ids(ids) => vllm_engine::Prompt::TokenIds(ids),
            })
            .collect())
    }
}

/// Sampling defaults for requests that leave a field out: the model's
/// `generation_config.json` (vLLM's `--generation-config auto`, the default), a folder's, or
/// none (`vllm`), with `--override-generation-config` on top. vLLM reads the same keys.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SamplingDefaults {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    /// `max_new_tokens`.
    pub max_tokens: Option<usize>,
}

impl SamplingDefaults {
    /// Takes the keys vLLM takes from a generation config (others are ignored, as there);
    /// `strict`: an unknown key is an error (for the override flag, where it is a typo).
    pub fn merge(&mut self, v: &Value, strict: bool) -> Result<(), String> {
        let obj = v.as_object().ok_or("a generation config is a JSON object")?;
        for (k, x) in obj {
            let num = || x.as_f64().ok_or_else(|| format!("{k} must be a number"));
            match k.as_str() {
                "temperature" => self.temperature = Some(num()? as f32),
                "top_p" => self.top_p = Some(num()? as f32),
                "min_p" => self.min_p = Some(num()? as f32),
                "repetition_penalty" => self.repetition_penalty = Some(num()? as f32),
                "top_k" => {
                    self.top_k = Some(x.as_i64().and_then(|n| i32::try_from(n).ok()).ok_or("top_k must be an integer")?)
                }
                "max_new_tokens" => {
                    self.max_tokens =
                        Some(x.as_u64().and_then(|n| usize::try_from(n).ok()).ok_or("max_new_tokens must be a count")?)
                }
                _ if strict => {
                    return Err(format!(
                        "unknown key '{k}' (temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens)"
                    ))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Whether any default is set.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Fills the fields a request left out.
    pub fn apply(&self, f: &mut SamplingFields) {
        f.temperature = f.temperature.or(self.temperature);
        f.top_p = f.top_p.or(self.top_p);
        f.top_k = f.top_k.or(self.top_k);
        f.min_p = f.min_p.or(self.min_p);
        f.repetition_penalty = f.repetition_penalty.or(self.repetition_penalty);
        f.max_tokens = f.max_tokens.or(self.max_tokens);
    }
}
