//! Parse, don't validate: each route family's one conversion from its wire request into a
//! [`ValidRequest`], the engine request with every default filled and every limit checked,
//! plus what the response needs. Handlers call one of these, submit, and render; nothing
//! downstream reads the wire type again.
//!
//! | route family | conversion | `max_tokens` when absent |
//! |--------------|------------|--------------------------|
//! | `/v1/completions` | [`completion`] | [`DEFAULT_MAX_TOKENS`] |
//! | `/v1/chat/completions` | [`chat::chat`] | the rest of the context |
//! | `/generate` | [`generate`] | [`DEFAULT_MAX_TOKENS`] |
//! | `/v1/embeddings` | [`embedding`] | (no generation) |
//! | `/score`, `/rerank` | [`score::score`], [`score::rerank`] | (no generation) |
//!
//! (The model's `generation_config.json` and `--override-generation-config` come first: a
//! `max_new_tokens` there is the default for every route.)

pub(crate) mod chat;
mod sampling;
pub(crate) mod score;

use axum::http::HeaderMap;
use vllm_engine::{BeamSearchParams, Prompt, RequestOutputKind, SamplingParams};

use crate::error::ApiError;
use crate::protocol::{
    check_extra_fields, parse_prompts, CompletionRequest, EmbeddingRequest, GenerateRequest, SamplingFields,
    StreamOptions, WirePrompt,
};
use crate::render::{Api, Render, Tools};
use crate::state::AppState;

/// OpenAI's default `max_tokens` for completions (and vLLM's `/generate`).
pub(crate) const DEFAULT_MAX_TOKENS: usize = 16;

/// Most inputs one embeddings request may carry (OpenAI's limit).
pub(crate) const MAX_EMBEDDING_INPUTS: usize = 2048;

/// A request list's length against its limit, checked before any of it is processed.
pub(crate) fn check_count(param: &str, count: usize, max: usize, what: &str) -> Result<(), ApiError> {
    if count > max {
        return Err(ApiError::invalid_param(param, format!("{count} {what}: at most {max} per request")));
    }
    Ok(())
}

/// How many prompts a `prompt` / `input` field holds (a list of strings or of token lists is
/// several), counted without converting any of them.
fn count_prompts(v: &serde_json::Value) -> usize {
    match v.as_array() {
        Some(a) if a.iter().all(|x| x.is_string() || x.is_array()) => a.len(),
        _ => 1,
    }
}

/// The sequences a request would add (prompts times samples or beams) against what the
/// engine can ever hold in flight: a batch past that could never be admitted, so it is refused
/// before anything is tokenized or queued.
fn check_capacity(s: &AppState, prompts: usize, per_prompt: usize) -> Result<(), ApiError> {
    let capacity = s.engine()?.max_inflight();
    if prompts <= 1 {
        // One prompt's `n` / `best_of` are checked by the engine, which names them.
        return Ok(());
    }
    let seqs = prompts.saturating_mul(per_prompt);
    if seqs > capacity {
        return Err(ApiError::invalid_param(
            "prompt",
            format!(
                "{prompts} prompts of {per_prompt} sequences each: more than the {capacity} this server holds in \
                 flight (--max-num-seqs + --max-waiting-requests)"
            ),
        ));
    }
    Ok(())
}

/// A request ready for the engine, and how its answer is shaped.
pub(crate) struct ValidRequest {
    /// The response's id (`<prefix>-<request_id>` when the client named the request).
    pub id: String,
    /// The model name the response reports (the served name, or the adapter's).
    pub model: String,
    /// The LoRA adapter the request's `model` names, if any.
    pub lora: Option<vllm_engine::LoraRequest>,
    /// One engine request per prompt.
    pub prompts: Vec<Prompt>,
    /// Complete engine parameters: output kind, log probabilities, the constraint with its
    /// backend and start, limits checked against the server's flags.
    pub params: SamplingParams,
    /// `use_beam_search`: the prompts run as a beam search instead.
    pub beam: Option<BeamSearchParams>,
    /// `Some` when streamed (with the stream's options).
    pub stream: Option<StreamOptions>,
    /// How outputs become the response.
    pub render: Render,
}

/// Which wire format a request came in, for the parts of the conversion they share.
#[derive(Clone, Copy)]
enum Family {
    Completion,
    Chat,
    Generate,
}

impl Family {
    /// `max_tokens` when neither the request nor the generation config gives one.
    fn default_max_tokens(self) -> Option<usize> {
        match self {
            Family::Completion | Family::Generate => Some(DEFAULT_MAX_TOKENS),
            Family::Chat => None,
        }
    }
}

/// The sampling fields as complete engine parameters, shared by every generating route:
/// the server's defaults under the request's fields, the route's `max_tokens` default, the
/// output kind (deltas when streamed, the final output otherwise), `--max-logprobs`, the
/// default guided-decoding backend, and beam search's own parameters.
fn engine_params(
    s: &AppState,
    fields: &SamplingFields,
    family: Family,
    stream: bool,
    logprobs: Option<usize>,
) -> Result<(SamplingParams, Option<BeamSearchParams>), ApiError> {
    let mut fields = fields.clone();
    s.sampling_defaults.apply(&mut fields);
    let mut params = sampling::sampling_params(&fields, family.default_max_tokens())?;
    params.logprobs = logprobs;
    params.output_kind = if stream { RequestOutputKind::Delta } else { RequestOutputKind::FinalOnly };
    for (field, k) in [("logprobs", params.logprobs), ("prompt_logprobs", params.prompt_logprobs)] {
        if let Some(k) = k.filter(|&k| k > s.max_logprobs) {
            return Err(ApiError::invalid_param(
                field,
                format!(
                    "{k} log probabilities asked for; this server returns at most {} (--max-logprobs)",
                    s.max_logprobs
                ),
            ));
        }
    }
    default_backend(s, &mut params);
    // Streaming sends every sequence as it is generated: `best_of` candidates cannot be ranked.
    if stream && params.num_sequences() > params.n {
        return Err(ApiError::invalid_param("best_of", "best_of must equal n when streaming"));
    }
    let beam = sampling::beam_params(&fields, &params)?;
    if beam.is_some() && stream {
        return Err(ApiError::unsupported("use_beam_search", "together with stream"));
    }
    Ok((params, beam))
}

/// A constraint that names no backend gets the server's (`--structured-outputs-config`).
fn default_backend(s: &AppState, params: &mut SamplingParams) {
    if let Some(g) = params.guided_decoding.as_mut() {
        if g.backend.is_none() {
            g.backend = s.default_guided_backend.clone();
        }
    }
}

/// Wire prompts as engine prompts.
fn prompts(v: &serde_json::Value) -> Result<Vec<Prompt>, ApiError> {
    Ok(parse_prompts(v)?
        .into_iter()
        .map(|p| match p {
            WirePrompt::Text(t) => Prompt::Text(t),
            WirePrompt::Ids(i) => Prompt::TokenIds(i),
        })
        .collect())
}

/// `POST /v1/completions`.
pub(crate) async fn completion(
    s: &AppState,
    req: CompletionRequest,
    headers: &HeaderMap,
) -> Result<ValidRequest, ApiError> {
    let lora = s.resolve_model(req.model.as_deref())?;
    check_extra_fields(&req.extra)?;
    if req.suffix.is_some() {
        return Err(ApiError::unsupported("suffix", "(fill-in-the-middle)"));
    }
    if req.echo && req.logprobs.is_some() {
        return Err(ApiError::unsupported("echo", "together with logprobs (prompt log probabilities)"));
    }
    let (params, beam) = engine_params(s, &req.sampling, Family::Completion, req.stream, req.logprobs)?;
    let per_prompt = beam.as_ref().map_or(params.num_sequences(), |b| b.beam_width);
    check_capacity(s, count_prompts(&req.prompt), per_prompt)?;
    let prompts = prompts(&req.prompt)?;
    let engine = s.engine()?;
    let echo = prompts
        .iter()
        .map(|p| match (req.echo, p) {
            (false, _) => Ok(String::new()),
            (true, Prompt::Text(t)) => Ok(t.clone()),
            (true, Prompt::TokenIds(ids)) => engine.tokenizer().decode(ids, false).map_err(ApiError::from),
        })
        .collect::<Result<Vec<_>, _>>()?;
    // `add_special_tokens: false`: the prompt is tokenized here without BOS, on the blocking
    // pool, by the input processor (which refuses text that cannot fit first).
    let prompts = if req.sampling.add_special_tokens == Some(false) {
        let input = engine.input_processor().clone();
        s.blocking(move || {
            prompts
                .into_iter()
                .map(|p| match p {
                    Prompt::Text(t) => Ok(Prompt::TokenIds(input.encode_text(&t, false)?)),
                    p => Ok(p),
                })
                .collect::<Result<Vec<_>, ApiError>>()
        })
        .await?
    } else {
        prompts
    };
    let f = &req.sampling;
    Ok(ValidRequest {
        id: s.response_id("cmpl", f.request_id.as_deref(), headers)?,
        model: lora.as_ref().map_or_else(|| s.model_name.clone(), |l| l.name.clone()),
        lora,
        prompts,
        beam,
        stream: req.stream.then(|| req.stream_options.unwrap_or_default()),
        render: Render {
            api: Api::Completion,
            echo,
            n: params.n,
            top_logprobs: req.logprobs,
            tools: Tools::Off,
            reasoning: None,
            include_reasoning: false,
            token_ids_as_tokens: f.return_tokens_as_token_ids == Some(true),
            token_ids: f.return_token_ids == Some(true),
        },
        params,
    })
}

/// `POST /generate` (vLLM's simple API): `{"text": [prompt + output, ...]}`.
pub(crate) fn generate(s: &AppState, req: GenerateRequest) -> Result<ValidRequest, ApiError> {
    let lora = s.resolve_model(req.model.as_deref())?;
    check_extra_fields(&req.extra)?;
    // `/generate` answers `{"text": [...]}`: the OpenAI routes' response options mean nothing.
    let f = &req.sampling;
    for (field, set) in [
        ("request_id", f.request_id.is_some()),
        ("return_token_ids", f.return_token_ids.is_some()),
        ("return_tokens_as_token_ids", f.return_tokens_as_token_ids.is_some()),
        ("add_special_tokens", f.add_special_tokens.is_some()),
    ] {
        if set {
            return Err(ApiError::unsupported(field, "on /generate (use /v1/completions)"));
        }
    }
    let (params, beam) = engine_params(s, f, Family::Generate, req.stream, None)?;
    s.engine()?;
    Ok(ValidRequest {
        id: s.new_id("gen"),
        model: lora.as_ref().map_or_else(|| s.model_name.clone(), |l| l.name.clone()),
        lora,
        prompts: vec![Prompt::Text(req.prompt.clone())],
        beam,
        stream: req.stream.then(StreamOptions::default),
        render: Render {
            api: Api::Generate,
            // Each text starts with the prompt (vLLM's simple API).
            echo: vec![req.prompt],
            n: params.n,
            top_logprobs: None,
            tools: Tools::Off,
            reasoning: None,
            include_reasoning: false,
            token_ids_as_tokens: false,
            token_ids: false,
        },
        params,
    })
}

/// An embedding request, checked against the model.
pub(crate) struct ValidEmbedding {
    pub prompts: Vec<Prompt>,
    /// `encoding_format: base64`.
    pub base64: bool,
    /// The LoRA adapter the request's `model` names, if any.
    pub lora: Option<vllm_engine::LoraRequest>,
    /// The model name to answer with (the adapter's, or the served name).
    pub model: String,
}

/// `POST /v1/embeddings`: a string, a list of strings, token ids or lists of token ids;
/// `encoding_format` `float` (default) or `base64`; `model` the served name or a LoRA
/// adapter's (any other is a 404).
pub(crate) fn embedding(s: &AppState, req: &EmbeddingRequest) -> Result<ValidEmbedding, ApiError> {
    let lora = s.resolve_model(req.model.as_deref())?;
    let Some(embedder) = &s.embedder else {
        return Err(ApiError::bad_request(format!(
            "The model `{}` does not support embeddings (serve an embedding model such as {}).",
            s.model_name,
            vllm_engine::EMBEDDING_MODEL
        )));
    };
    check_count("input", count_prompts(&req.input), MAX_EMBEDDING_INPUTS, "inputs")?;
    let prompts = req.prompts()?;
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid_param("encoding_format", format!("'{other}' (choose float or base64)")))
        }
    };
    if req.dimensions.is_some_and(|d| d != embedder.dimensions()) {
        return Err(ApiError::invalid_param(
            "dimensions",
            format!("this model's embeddings have {} dimensions", embedder.dimensions()),
        ));
    }
    let model = lora.as_ref().map_or_else(|| s.model_name.clone(), |l| l.name.clone());
    Ok(ValidEmbedding { prompts, base64, lora, model })
}
