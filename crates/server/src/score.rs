//! The scoring routes of an embedding model, as vLLM serves them for a bi-encoder: `/score`
//! and `/v1/score` (text pairs, 1:1, 1:N or N:N), `/rerank`, `/v1/rerank` (Jina's and
//! Cohere's v1 shape) and `/v2/rerank` (Cohere's v2 path; vLLM answers it with the same
//! body). A pair's score is the cosine similarity of the two texts' embeddings
//! ([`vllm_engine::Embedder::score_with_lora`]). Thin: check the request
//! ([`crate::validate::score`]), score on the blocking pool, shape the answer.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::Json;
use vllm_engine::{LoraRequest, ScoreInput, ScoringRequestOutput};

use crate::api::{
    ErrorResponse, RerankDocument, RerankResponse, RerankResult, RerankUsage, ScoreData, ScoreResponse, ScoreUsage,
};
use crate::error::ApiError;
use crate::protocol::{RerankRequest, ScoreRequest};
use crate::routes::{now, parse, AppState, Shared};
use crate::validate;

/// Scores the pairs on the blocking pool, counted for the adapter's metric.
async fn run(
    s: &AppState,
    text_1: ScoreInput,
    text_2: ScoreInput,
    lora: Option<LoraRequest>,
) -> Result<Vec<ScoringRequestOutput>, ApiError> {
    let embedder = s.embedder.clone().ok_or_else(|| ApiError::internal("no embedder"))?;
    if let Some(l) = &lora {
        metrics::counter!("vllm:lora_requests_total", "lora_name" => l.name.clone()).increment(1);
    }
    s.blocking(move || embedder.score_with_lora(text_1, text_2, lora.as_ref()).map_err(ApiError::from_field_error))
        .await
}

async fn score_route(s: &AppState, body: Result<Bytes, BytesRejection>) -> Result<Json<ScoreResponse>, ApiError> {
    let req: ScoreRequest = parse(body)?;
    let v = validate::score::score(s, &req)?;
    let outs = run(s, v.text_1, v.text_2, v.lora).await?;
    let tokens: usize = outs.iter().map(|o| o.prompt_token_ids.len()).sum();
    let data = outs
        .iter()
        .enumerate()
        .map(|(index, o)| ScoreData { index, object: "score".into(), score: o.outputs.score })
        .collect();
    Ok(Json(ScoreResponse {
        id: s.new_id("score"),
        object: "list".into(),
        created: now(),
        model: v.model,
        data,
        usage: ScoreUsage { prompt_tokens: tokens, total_tokens: tokens, completion_tokens: 0 },
    }))
}

async fn rerank_route(s: &AppState, body: Result<Bytes, BytesRejection>) -> Result<Json<RerankResponse>, ApiError> {
    let req: RerankRequest = parse(body)?;
    let v = validate::score::rerank(s, &req)?;
    let outs = run(s, v.query.into(), v.documents.clone().into(), v.lora).await?;
    let tokens: usize = outs.iter().map(|o| o.prompt_token_ids.len()).sum();
    let mut results: Vec<RerankResult> = outs
        .iter()
        .zip(v.documents)
        .enumerate()
        .map(|(index, (o, text))| RerankResult {
            index,
            document: v.return_documents.then_some(RerankDocument { text }),
            relevance_score: o.outputs.score,
        })
        .collect();
    // Best first; a stable sort keeps equal scores in document order.
    results.sort_by(|a, b| b.relevance_score.total_cmp(&a.relevance_score));
    results.truncate(v.top_n);
    Ok(Json(RerankResponse {
        id: s.new_id("rerank"),
        model: v.model,
        usage: RerankUsage { prompt_tokens: tokens, total_tokens: tokens },
        results,
    }))
}

/// `POST /score`: the score of each pair, in pair order.
#[utoipa::path(post, path = "/score", request_body = ScoreRequest, responses(
    (status = 200, body = ScoreResponse),
    (status = 400, description = "A bad text list or pairing, or a generative model", body = ErrorResponse),
    (status = 401, body = ErrorResponse), (status = 404, body = ErrorResponse),
    (status = 413, body = ErrorResponse), (status = 503, body = ErrorResponse),
))]
pub async fn score(
    State(s): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ScoreResponse>, ApiError> {
    score_route(&s, body).await
}

/// `POST /v1/score`: the same as `/score`.
#[utoipa::path(post, path = "/v1/score", request_body = ScoreRequest, responses(
    (status = 200, body = ScoreResponse),
    (status = 400, body = ErrorResponse), (status = 401, body = ErrorResponse), (status = 404, body = ErrorResponse),
    (status = 413, body = ErrorResponse), (status = 503, body = ErrorResponse),
))]
pub async fn score_v1(
    State(s): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ScoreResponse>, ApiError> {
    score_route(&s, body).await
}

/// `POST /rerank`: the documents best first, at most `top_n`.
#[utoipa::path(post, path = "/rerank", request_body = RerankRequest, responses(
    (status = 200, body = RerankResponse),
    (status = 400, description = "Empty or too many documents, a negative top_n, or a generative model", body = ErrorResponse),
    (status = 401, body = ErrorResponse), (status = 404, body = ErrorResponse),
    (status = 413, body = ErrorResponse), (status = 503, body = ErrorResponse),
))]
pub async fn rerank(
    State(s): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<RerankResponse>, ApiError> {
    rerank_route(&s, body).await
}

/// `POST /v1/rerank`: the same as `/rerank`.
#[utoipa::path(post, path = "/v1/rerank", request_body = RerankRequest, responses(
    (status = 200, body = RerankResponse),
    (status = 400, body = ErrorResponse), (status = 401, body = ErrorResponse), (status = 404, body = ErrorResponse),
    (status = 413, body = ErrorResponse), (status = 503, body = ErrorResponse),
))]
pub async fn rerank_v1(
    State(s): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<RerankResponse>, ApiError> {
    rerank_route(&s, body).await
}

/// `POST /v2/rerank` (Cohere's v2 path): the same request and response as `/rerank`, as vLLM
/// serves it.
#[utoipa::path(post, path = "/v2/rerank", request_body = RerankRequest, responses(
    (status = 200, body = RerankResponse),
    (status = 400, body = ErrorResponse), (status = 401, body = ErrorResponse), (status = 404, body = ErrorResponse),
    (status = 413, body = ErrorResponse), (status = 503, body = ErrorResponse),
))]
pub async fn rerank_v2(
    State(s): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<RerankResponse>, ApiError> {
    rerank_route(&s, body).await
}
