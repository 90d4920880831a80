//! The scoring routes' requests (`/score`, `/rerank`), checked against the model and the
//! server's limits before anything is tokenized: the same per-request item limit as
//! `/v1/embeddings`, the pairing rules of [`vllm_engine::score`], a pooling model.

use serde_json::Value;
use vllm_engine::{LoraRequest, ScoreInput};

use super::{check_count, MAX_EMBEDDING_INPUTS};
use crate::error::ApiError;
use crate::protocol::{RerankRequest, ScoreRequest};
use crate::state::AppState;

/// A score request, checked.
pub(crate) struct ValidScore {
    pub text_1: ScoreInput,
    pub text_2: ScoreInput,
    /// The LoRA adapter the request's `model` names, if any.
    pub lora: Option<LoraRequest>,
    /// The model name to answer with.
    pub model: String,
}

/// A rerank request, checked.
pub(crate) struct ValidRerank {
    pub query: String,
    pub documents: Vec<String>,
    /// How many results to return (at least 1, at most the documents').
    pub top_n: usize,
    pub return_documents: bool,
    pub lora: Option<LoraRequest>,
    pub model: String,
}

/// The served model must pool (vLLM answers a generative model's score and rerank requests
/// with a 400 saying which API it does not support); then `model` must name it or one of its
/// adapters (any other name is a 404).
fn pooling_model(s: &AppState, model: Option<&str>, api: &str) -> Result<(Option<LoraRequest>, String), ApiError> {
    if s.embedder.is_none() {
        return Err(ApiError::invalid_param(
            "model",
            format!(
                "The model `{}` does not support {api} API (serve an embedding model such as {}).",
                s.model_name,
                vllm_engine::EMBEDDING_MODEL
            ),
        ));
    }
    let lora = s.resolve_model(model)?;
    let name = lora.as_ref().map_or_else(|| s.model_name.clone(), |l| l.name.clone());
    Ok((lora, name))
}

/// A string (one text) or a list of strings, at most [`MAX_EMBEDDING_INPUTS`].
fn texts(param: &str, v: &Value) -> Result<Vec<String>, ApiError> {
    let bad = || ApiError::invalid_param(param, format!("'{param}' must be a string or a list of strings"));
    match v {
        Value::String(t) => Ok(vec![t.clone()]),
        Value::Array(items) => {
            check_count(param, items.len(), MAX_EMBEDDING_INPUTS, "texts")?;
            items.iter().map(|t| t.as_str().map(str::to_string).ok_or_else(bad)).collect()
        }
        _ => Err(bad()),
    }
}

/// The engine's pairing rule (1:1, 1:N, N:N), its error naming `text_1` or `text_2`.
fn check_pairing(n1: usize, n2: usize) -> Result<(), ApiError> {
    vllm_engine::score::pairing(n1, n2).map(|_| ()).map_err(ApiError::from_field_error)
}

/// `POST /score`, `/v1/score`.
pub(crate) fn score(s: &AppState, req: &ScoreRequest) -> Result<ValidScore, ApiError> {
    let (lora, model) = pooling_model(s, req.model.as_deref(), "Score")?;
    let text_1 = texts("text_1", &req.text_1)?;
    let text_2 = texts("text_2", &req.text_2)?;
    check_pairing(text_1.len(), text_2.len())?;
    Ok(ValidScore { text_1: text_1.into(), text_2: text_2.into(), lora, model })
}

/// `POST /rerank`, `/v1/rerank`, `/v2/rerank`: `query` a string, `documents` a non-empty list
/// of strings, `top_n` 0 (every document; vLLM's default) or positive.
pub(crate) fn rerank(s: &AppState, req: &RerankRequest) -> Result<ValidRerank, ApiError> {
    let (lora, model) = pooling_model(s, req.model.as_deref(), "Rerank (Score)")?;
    let query = req.query.as_str().ok_or_else(|| ApiError::invalid_param("query", "'query' must be a string"))?;
    let documents = texts("documents", &req.documents)?;
    if documents.is_empty() {
        return Err(ApiError::invalid_param("documents", "at least one document must be given"));
    }
    let top_n = match req.top_n {
        n if n < 0 => {
            return Err(ApiError::invalid_param("top_n", format!("{n}: must be positive (or 0 for every document)")))
        }
        0 => documents.len(),
        n => documents.len().min(usize::try_from(n).unwrap_or(usize::MAX)),
    };
    Ok(ValidRerank {
        query: query.to_string(),
        documents,
        top_n,
        return_documents: req.return_documents.unwrap_or(true),
        lora,
        model,
    })
}
