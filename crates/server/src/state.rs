//! The server's shared state (the engine, the served names, keys, parsers and request
//! defaults) and the middleware every route runs under (API keys, panic isolation, request
//! logs).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::PrometheusHandle;
use subtle::ConstantTimeEq;
use vllm_engine::{AsyncEngine, Embedder};

use crate::error::ApiError;

/// Shared server state (cheap to clone through the `Arc`).
pub struct AppState {
    /// The generation engine (`None` when serving an embedding model).
    pub engine: Option<AsyncEngine>,
    /// The encoder of an embedding model (`/v1/embeddings`, `/score`, `/rerank`).
    pub embedder: Option<Arc<Embedder>>,
    /// The first `--served-model-name`: what responses report.
    pub model_name: String,
    /// Every `--served-model-name`: each is accepted in `model` and listed by /v1/models.
    pub model_names: Vec<String>,
    /// `--api-key`s (any one of them is accepted); empty: no key needed.
    pub api_keys: Vec<String>,
    pub chat_template: Option<String>,
    /// `--chat-template-content-format string|openai` (`None`: detected per template).
    pub content_format: Option<vllm_tokenizer::ContentFormat>,
    pub metrics: Option<PrometheusHandle>,
    pub next_id: AtomicU64,
    /// `--enable-auto-tool-choice --tool-call-parser <name>`: how `auto` tool calls are read.
    pub tool_parser: Option<Arc<dyn crate::tools::ToolParser>>,
    /// `--reasoning-parser <name>`: how chat outputs split into reasoning and answer.
    pub reasoning_parser: Option<crate::reasoning::ReasoningParser>,
    /// `--structured-outputs-config '{"enable_in_reasoning": true}'`: constraints apply
    /// from the output's first token even while the model thinks.
    pub constrain_reasoning: bool,
    /// `--structured-outputs-config '{"backend": ...}'`: the backend for requests that name none.
    pub default_guided_backend: Option<String>,
    /// Defaults for the sampling fields a request leaves out (`--generation-config`).
    pub sampling_defaults: crate::protocol::SamplingDefaults,
    /// `--max-logprobs`: the most `logprobs` / `top_logprobs` / `prompt_logprobs` a request
    /// may ask for.
    pub max_logprobs: usize,
    /// The LoRA adapters served (`--lora-modules`, and those loaded at run time), by name.
    pub adapters: std::sync::RwLock<std::collections::BTreeMap<String, vllm_engine::LoraRequest>>,
    /// The next adapter id to give.
    pub next_lora_id: std::sync::atomic::AtomicU32,
    /// `VLLM_ALLOW_RUNTIME_LORA_UPDATING`: adapters may be loaded and unloaded by requests.
    pub runtime_lora_updates: bool,
    /// Stored Responses (`/v1/responses`), bounded in count and bytes.
    pub(crate) responses: crate::responses::store::ResponseStore,
}

pub type Shared = Arc<AppState>;

pub(crate) fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// An id no client can guess: `<prefix>_` and 128 random bits in hex (the ids of stored
/// responses and of messages).
pub(crate) fn random_id(prefix: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    // Each `RandomState` is keyed from the operating system's randomness (per thread, then
    // incremented): hashing a counter with it gives unpredictable bits.
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let bits = |salt: u64| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed) ^ salt);
        h.finish()
    };
    format!("{prefix}_{:016x}{:016x}", bits(0), bits(u64::MAX))
}

impl AppState {
    pub(crate) fn new_id(&self, prefix: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{:x}{n:06x}", now())
    }

    /// A response's id: `<prefix>-<request_id>` when the client names the request (the
    /// `request_id` field, else the `X-Request-Id` header, as vLLM), else a fresh one.
    pub(crate) fn response_id(
        &self,
        prefix: &str,
        request_id: Option<&str>,
        headers: &HeaderMap,
    ) -> Result<String, ApiError> {
        let given = request_id.or_else(|| headers.get("x-request-id").and_then(|v| v.to_str().ok()));
        match given {
            None => Ok(self.new_id(prefix)),
            Some(r) if !r.is_empty() && r.len() <= 128 && r.bytes().all(|b| b.is_ascii_graphic()) => {
                Ok(format!("{prefix}-{r}"))
            }
            Some(_) => {
                Err(ApiError::invalid_param("request_id", "a request id is 1 to 128 printable ASCII characters"))
            }
        }
    }

    /// The generation engine, or a 400 saying this server only embeds.
    pub(crate) fn engine(&self) -> Result<&AsyncEngine, ApiError> {
        self.engine.as_ref().ok_or_else(|| {
            ApiError::bad_request(format!(
                "The model `{}` is an embedding model: it serves /v1/embeddings, /score and /rerank only.",
                self.model_name
            ))
        })
    }

    /// The LoRA adapters of the engine or the embedder, with `--enable-lora`.
    pub(crate) fn lora(&self) -> Option<Arc<vllm_engine::lora::LoraManager>> {
        lora_manager(self.engine.as_ref(), self.embedder.as_deref())
    }

    pub(crate) fn tokenizer(&self) -> &vllm_engine::Tokenizer {
        match (&self.engine, &self.embedder) {
            (Some(e), _) => e.tokenizer(),
            (None, Some(m)) => m.tokenizer(),
            (None, None) => unreachable!("a server has an engine or an embedder"),
        }
    }

    pub(crate) fn max_model_len(&self) -> usize {
        match (&self.engine, &self.embedder) {
            (Some(e), _) => e.info().max_model_len,
            (None, Some(m)) => m.max_len(),
            (None, None) => 0,
        }
    }

    /// Runs request-sized work (templates, tokenizing) on the blocking pool, at most a few at
    /// a time; a panic in it fails this request alone.
    pub(crate) async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        static PERMITS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);
        let _permit = PERMITS.acquire().await.map_err(|_| ApiError::internal("the worker pool is closed"))?;
        tokio::task::spawn_blocking(f).await.map_err(|_| ApiError::internal("processing this request failed"))?
    }

    /// The most prompt bytes worth tokenizing (more cannot fit the context).
    pub(crate) fn max_prompt_bytes(&self) -> usize {
        match &self.engine {
            Some(e) => e.input_processor().max_prompt_bytes(),
            None => self.max_model_len().saturating_mul(64),
        }
    }

    /// What a request's `model` names: the base model (a served name, or none given), or a
    /// LoRA adapter; any other name is a 404.
    pub(crate) fn resolve_model(&self, model: Option<&str>) -> Result<Option<vllm_engine::LoraRequest>, ApiError> {
        let Some(m) = model else { return Ok(None) };
        if self.model_names.iter().any(|n| n == m) {
            return Ok(None);
        }
        match self.adapters.read().unwrap_or_else(|p| p.into_inner()).get(m) {
            Some(l) => Ok(Some(l.clone())),
            None => Err(ApiError::not_found(format!("The model `{m}` does not exist."))),
        }
    }
}

/// The LoRA adapters of a server's engine or embedder, with `--enable-lora`.
pub(crate) fn lora_manager(
    engine: Option<&AsyncEngine>,
    embedder: Option<&Embedder>,
) -> Option<Arc<vllm_engine::lora::LoraManager>> {
    match (engine, embedder) {
        (Some(e), _) => e.input_processor().lora().cloned(),
        (None, Some(m)) => m.lora().cloned(),
        (None, None) => None,
    }
}

/// Routes that compute nothing for the caller stay open when an API key is set (a load
/// balancer's health check, the version, Prometheus, the API description): everything else
/// needs the key.
const OPEN_ROUTES: &[&str] = &["/health", "/ping", "/version", "/metrics", "/openapi.json"];

/// Which `--api-key` a request presented (its position among the keys), set by [`auth`] on
/// every request that needed one; `None` when the server has no key. Stored responses are
/// scoped by it: one key cannot read another's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KeyScope(pub Option<u64>);

/// `Authorization: Bearer <key>` (or Anthropic's `x-api-key: <key>`) on every route but
/// [`OPEN_ROUTES`] when an API key is set (constant-time); the key's position goes into the
/// request as its [`KeyScope`]. Also turns a panic while handling one request into a 500 for
/// it alone.
pub async fn auth(State(s): State<Shared>, mut req: Request, next: Next) -> Response {
    use futures::FutureExt;
    use subtle::ConditionallySelectable;
    let mut scope = KeyScope(None);
    if !s.api_keys.is_empty() && !OPEN_ROUTES.contains(&req.uri().path()) {
        let headers = req.headers();
        let bearer = headers.get(header::AUTHORIZATION).and_then(|h| h.to_str().ok());
        let given = match bearer {
            Some(h) => h.strip_prefix("Bearer ").unwrap_or(""),
            None => headers.get("x-api-key").and_then(|h| h.to_str().ok()).unwrap_or(""),
        };
        // Every key is compared (constant time each), so timing tells nothing about which.
        let (mut ok, mut index) = (subtle::Choice::from(0), 0u64);
        for (i, key) in s.api_keys.iter().enumerate() {
            let eq = given.as_bytes().ct_eq(key.as_bytes());
            index.conditional_assign(&(i as u64), eq);
            ok |= eq;
        }
        if !bool::from(ok) {
            return crate::error::for_path(req.uri().path(), ApiError::unauthorized());
        }
        scope = KeyScope(Some(index));
    }
    req.extensions_mut().insert(scope);
    use tracing::Instrument;
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let started = std::time::Instant::now();
    // A span per HTTP request: the engine's "finished request" lines carry it.
    let span = tracing::info_span!("http", %method, %path);
    let response = match std::panic::AssertUnwindSafe(next.run(req).instrument(span.clone())).catch_unwind().await {
        Ok(r) => r,
        Err(_) => crate::error::for_path(
            &path,
            ApiError::internal("the request failed unexpectedly (a bug, reported in the log)"),
        ),
    };
    let (status, ms) = (response.status().as_u16(), started.elapsed().as_millis() as u64);
    if response.status().is_server_error() {
        tracing::warn!(parent: &span, status, ms, "request failed");
    } else {
        tracing::info!(target: "vllm_server::requests", parent: &span, status, ms, "request");
    }
    response
}
