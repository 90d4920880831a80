//! The application: the shared state built from the flags, the router, and serving it until
//! a signal or the engine's death (graceful shutdown, then the exit status).

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use vllm_engine::{AsyncEngine, Embedder};

use crate::cli::ServeArgs;
use crate::net;
use crate::routes::{self, AppState};

/// How long a server whose engine died keeps answering (503s) before it exits.
const DEATH_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

pub(crate) fn router(state: Arc<AppState>, max_body: usize, crash_route: bool) -> Router {
    let mut r = Router::new();
    if crash_route {
        r = r
            .route("/debug/crash-engine", post(routes::crash_engine))
            .route("/debug/fail-step", post(routes::fail_step));
    }
    r.route("/v1/models", get(routes::models))
        .route("/v1/completions", post(routes::completions))
        .route("/v1/chat/completions", post(routes::chat))
        .route("/v1/embeddings", post(routes::embeddings))
        .route("/score", post(crate::score::score))
        .route("/v1/score", post(crate::score::score_v1))
        .route("/rerank", post(crate::score::rerank))
        .route("/v1/rerank", post(crate::score::rerank_v1))
        .route("/v2/rerank", post(crate::score::rerank_v2))
        .route("/v1/responses", post(crate::responses::create))
        .route("/v1/responses/{response_id}", get(crate::responses::retrieve).delete(crate::responses::delete))
        .route("/v1/responses/{response_id}/cancel", post(crate::responses::cancel))
        .route("/v1/messages", post(crate::messages::create))
        .route("/v1/messages/count_tokens", post(crate::messages::count_tokens))
        .route("/generate", post(routes::generate))
        .route("/tokenize", post(routes::tokenize))
        .route("/detokenize", post(routes::detokenize))
        .route("/v1/load_lora_adapter", post(routes::load_lora_adapter))
        .route("/v1/unload_lora_adapter", post(routes::unload_lora_adapter))
        .route("/health", get(routes::health))
        .route("/ping", get(routes::health).post(routes::health))
        .route("/invocations", post(routes::invocations))
        .route("/version", get(routes::version))
        .route("/metrics", get(routes::metrics))
        .route("/openapi.json", get(routes::openapi))
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), routes::auth))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// Loads the engine and builds the shared state.
pub(crate) async fn build_state(
    args: &ServeArgs,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
) -> Result<Arc<AppState>> {
    let chat_template = args.chat_template()?;
    let tool_parser = args.tool_parser()?;
    let reasoning_parser = args.reasoning_parser()?;
    let (default_guided_backend, constrain_reasoning) = args.structured_outputs_config()?;
    let model_names = args.model_names();
    let lora_modules = args.lora_modules(&model_names)?;
    let engine_args = args.engine.clone();
    tracing::info!(model = %engine_args.model, cpu_kernels = vllm_engine::cpu_kernel_path(), "loading the model");
    // An embedding model (BertModel) gets an encoder and serves /v1/embeddings; any other
    // model gets the generation engine.
    let a = args.clone();
    let (engine, embedder, sampling_defaults) = tokio::task::spawn_blocking(move || -> Result<_> {
        let files = vllm_engine::resolve_with(&engine_args.model, &engine_args.hub())?;
        let dir = match &files {
            vllm_engine::ModelFiles::HfDir(dir) => Some(dir.clone()),
            vllm_engine::ModelFiles::Gguf(_) => None,
        };
        let defaults = a.sampling_defaults(dir.as_deref())?;
        if let Some(dir) = &dir {
            if Embedder::is_embedding_model(dir) {
                return Ok((None, Some(Arc::new(Embedder::load(dir, &engine_args)?)), defaults));
            }
        }
        Ok((Some(AsyncEngine::from_files(engine_args, files)?), None, defaults))
    })
    .await??;
    // `--lora-modules` are loaded now: a bad adapter stops the start.
    let mut adapters = std::collections::BTreeMap::new();
    if !lora_modules.is_empty() {
        let manager = crate::state::lora_manager(engine.as_ref(), embedder.as_deref())
            .context("--lora-modules needs --enable-lora")?;
        for (i, (name, path)) in lora_modules.into_iter().enumerate() {
            let req = vllm_engine::LoraRequest::new(name.clone(), i as u32 + 1, path);
            let m = manager.clone();
            let r = req.clone();
            tokio::task::spawn_blocking(move || m.load(&r)).await?.with_context(|| format!("--lora-modules {name}"))?;
            adapters.insert(name, req);
        }
    }
    let next_lora_id = adapters.len() as u32 + 1;
    let runtime_lora_updates = std::env::var("VLLM_ALLOW_RUNTIME_LORA_UPDATING")
        .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes"));
    if runtime_lora_updates {
        tracing::warn!("VLLM_ALLOW_RUNTIME_LORA_UPDATING: LoRA adapters may be loaded and unloaded by requests");
    }
    let content_format = args.chat_template_content_format.forced();
    if let Some(tpl) = engine.as_ref().and_then(|e| e.tokenizer().chat_template_for(chat_template.as_deref()).ok()) {
        let detected = tpl.content_format().as_str();
        match content_format {
            None => tracing::info!(
                "the chat template's content format is '{detected}' (detected; --chat-template-content-format overrides it)"
            ),
            Some(f) if f.as_str() != detected => tracing::warn!(
                "--chat-template-content-format {} differs from the format detected in the chat template ('{detected}')",
                f.as_str()
            ),
            Some(_) => {}
        }
    }
    Ok(Arc::new(AppState {
        engine,
        embedder,
        model_name: model_names[0].clone(),
        model_names,
        api_keys: args.api_key.clone(),
        chat_template,
        content_format,
        metrics,
        next_id: AtomicU64::new(0),
        tool_parser,
        reasoning_parser,
        constrain_reasoning,
        default_guided_backend,
        sampling_defaults,
        max_logprobs: args.max_logprobs,
        adapters: std::sync::RwLock::new(adapters),
        next_lora_id: std::sync::atomic::AtomicU32::new(next_lora_id),
        runtime_lora_updates,
        responses: crate::responses::store::ResponseStore::new(
            args.responses_store_max_entries,
            usize::try_from(args.responses_store_max_bytes).unwrap_or(usize::MAX),
        ),
    }))
}

pub(crate) async fn serve(args: ServeArgs) -> Result<()> {
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[
            0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
            80.0,
        ])
        .ok()
        .and_then(|b| b.install_recorder().ok());
    // The network settings are checked before the model loads, so a typo fails fast.
    let cors = net::cors(&args.allowed_origins, &args.allowed_methods, &args.allowed_headers, args.allow_credentials)?;
    let root = args.root_path.as_deref().map(net::root_path).transpose()?.flatten();
    let root_label = root.clone().unwrap_or_default();
    let tls = match (&args.ssl_certfile, &args.ssl_keyfile) {
        (Some(cert), Some(key)) => Some(net::tls_config(cert, key, args.ssl_ca_certs.as_deref(), args.ssl_cert_reqs)?),
        _ => None,
    };
    let state = build_state(&args, metrics).await?;
    let engine = state.engine.clone();
    let addr = format!("{}:{}", args.host, args.port);
    let listener = tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("binding {addr}"))?;
    // Stops on SIGTERM/Ctrl-C, or when the engine core dies (then the process exits non-zero,
    // so a supervisor restarts it).
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(None::<String>);
    let watch_engine = engine.clone();
    tokio::spawn(async move {
        let dead = async {
            match &watch_engine {
                Some(e) => {
                    let reason = e.dead().await;
                    tracing::error!(%reason, "the engine core died: /health answers 503; exiting in {DEATH_GRACE:?}");
                    // Long enough for a supervisor's health probe to see the 503.
                    tokio::time::sleep(DEATH_GRACE).await;
                    Some(reason)
                }
                None => std::future::pending().await,
            }
        };
        let reason = tokio::select! { _ = shutdown_signal() => None, r = dead => r };
        let _ = stop_tx.send(Some(reason.unwrap_or_default()));
    });
    let mut graceful = stop_rx.clone();
    let graceful = async move {
        let _ = graceful.wait_for(Option::is_some).await;
    };
    let model_name = state.model_name.clone();
    let app = router(state, args.max_body_bytes, args.enable_crash_route_for_tests);
    let app = tower::ServiceBuilder::new()
        .map_request(move |mut req: axum::extract::Request| {
            if let Some(uri) = root.as_deref().and_then(|p| net::strip_prefix(req.uri(), p)) {
                *req.uri_mut() = uri;
            }
            req
        })
        .layer(cors)
        .service(app);
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(model = %model_name, "serving on {scheme}://{addr}{} (OpenAI-compatible routes under /v1)", root_label);
    let server = crate::conn::serve(listener, tls, app, args.conn, graceful);
    let mut deadline = stop_rx.clone();
    let drain = args.shutdown_timeout()?;
    tokio::select! {
        () = server => {}
        _ = async {
            let _ = deadline.wait_for(Option::is_some).await;
            tracing::info!("shutting down: letting in-flight requests finish for up to {drain:?}");
            tokio::time::sleep(drain).await;
        } => tracing::warn!("shutdown deadline reached: closing the remaining connections"),
    }
    let dead = stop_rx.borrow().clone().filter(|r| !r.is_empty());
    if let Some(engine) = engine {
        tokio::task::spawn_blocking(move || engine.shutdown()).await?;
    }
    if let Some(reason) = dead {
        tracing::error!(%reason, "the engine core died: exiting with an error");
        std::process::exit(1);
    }
    tracing::info!("stopped");
    Ok(())
}
