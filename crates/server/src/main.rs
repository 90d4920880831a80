//! `vllm-server`: the OpenAI-compatible HTTP server of vllm-rs.
//!
//! `cargo run --release -p vllm-server` serves the default model (SmolLM2-135M-Instruct) on
//! 127.0.0.1:8000. Flags follow vLLM's (`--model`, `--port`, `--api-key`, ...); `--help`
//! lists them.

mod batch;
mod error;
mod protocol;
mod routes;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use clap::{Args, Parser, Subcommand};
use vllm_engine::{AsyncEngine, Embedder, EngineArgs, DEFAULT_MODEL};

use crate::routes::AppState;

#[derive(Parser)]
#[command(name = "vllm-server", version, about = "OpenAI-compatible LLM server (vllm-rs)")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the model over HTTP (the default).
    Serve(ServeArgs),
    /// Run an OpenAI batch file (JSONL of /v1/completions or /v1/chat/completions requests).
    RunBatch(BatchArgs),
}

#[derive(Args, Clone)]
struct BatchArgs {
    /// Input JSONL: {"custom_id", "method": "POST", "url", "body"} per line.
    #[arg(short = 'i', long = "input-file")]
    input: std::path::PathBuf,
    /// Output JSONL: {"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}.
    #[arg(short = 'o', long = "output-file")]
    output: std::path::PathBuf,
    #[command(flatten)]
    serve: ServeArgs,
}

/// Engine and server flags, named as vLLM's.
#[derive(Args, Clone)]
struct ServeArgs {
    /// Model: a local folder, a .gguf file, or a Hugging Face id.
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: String,
    /// Name the API reports and accepts in `model` (defaults to --model).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Address to bind. 127.0.0.1 serves this machine only; use 0.0.0.0 to expose it.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to bind.
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer <key>` on /v1 routes.
    #[arg(long, env = "VLLM_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Weight/activation dtype: auto, float32, float16, bfloat16.
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// GGUF handling: none (dequantize to float32, the CPU default), gguf (keep quantized), or
    /// int8 (int8 weights and activations for every matmul, our VNNI kernel: the fastest on CPU).
    #[arg(long, default_value = "none")]
    quantization: String,
    /// Context length (prompt + output); defaults to the model's.
    #[arg(long)]
    max_model_len: Option<usize>,
    /// Most sequences per step.
    #[arg(long, default_value_t = 256)]
    max_num_seqs: usize,
    /// Most tokens per step (chunked-prefill budget).
    #[arg(long)]
    max_num_batched_tokens: Option<usize>,
    /// Tokens per KV-cache block.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Reuse cached prompt prefixes (on by default).
    #[arg(long, overrides_with = "no_enable_prefix_caching")]
    enable_prefix_caching: bool,
    /// Turn prefix caching off.
    #[arg(long)]
    no_enable_prefix_caching: bool,
    /// KV-cache size on CPU, e.g. 4GiB.
    #[arg(long, default_value = "4GiB")]
    kv_cache_memory: String,
    /// Chat template: a file path or the template text (overrides the model's).
    #[arg(long)]
    chat_template: Option<String>,
    /// Seed for requests without one.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Device: cpu (cuda needs a build with --features cuda).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Largest accepted request body, in bytes.
    #[arg(long, default_value_t = 32 << 20)]
    max_body_bytes: usize,
}

impl ServeArgs {
    fn engine_args(&self) -> Result<EngineArgs> {
        Ok(EngineArgs {
            model: self.model.clone(),
            dtype: self.dtype.parse()?,
            quantization: self.quantization.parse()?,
            seed: self.seed,
            max_model_len: self.max_model_len,
            max_num_seqs: self.max_num_seqs,
            max_num_batched_tokens: self.max_num_batched_tokens,
            block_size: self.block_size,
            kv_cache_memory: vllm_engine::parse_bytes(&self.kv_cache_memory)?,
            enable_prefix_caching: !self.no_enable_prefix_caching,
            device: self.device.clone(),
        })
    }

    fn chat_template(&self) -> Result<Option<String>> {
        let Some(t) = &self.chat_template else { return Ok(None) };
        let p = std::path::Path::new(t);
        if p.is_file() {
            return Ok(Some(std::fs::read_to_string(p).with_context(|| format!("reading {t}"))?));
        }
        Ok(Some(t.clone()))
    }
}

pub(crate) fn router(state: Arc<AppState>, max_body: usize) -> Router {
    Router::new()
        .route("/v1/models", get(routes::models))
        .route("/v1/completions", post(routes::completions))
        .route("/v1/chat/completions", post(routes::chat))
        .route("/v1/embeddings", post(routes::embeddings))
        .route("/generate", post(routes::generate))
        .route("/tokenize", post(routes::tokenize))
        .route("/detokenize", post(routes::detokenize))
        .route("/health", get(routes::health))
        .route("/version", get(routes::version))
        .route("/metrics", get(routes::metrics))
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
    eprintln!("vllm-server: shutting down (finishing in-flight requests)");
}

/// Loads the engine and builds the shared state.
async fn build_state(
    args: &ServeArgs,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
) -> Result<Arc<AppState>> {
    let chat_template = args.chat_template()?;
    let engine_args = args.engine_args()?;
    eprintln!("vllm-server: loading {}", engine_args.model);
    // An embedding model (BertModel) gets an encoder and serves /v1/embeddings; any other
    // model gets the generation engine.
    let (engine, embedder) = tokio::task::spawn_blocking(move || -> Result<_> {
        let files = vllm_engine::resolve(&engine_args.model)?;
        if let vllm_engine::ModelFiles::HfDir(dir) = &files {
            if Embedder::is_embedding_model(dir) {
                return Ok((None, Some(Arc::new(Embedder::load(dir, &engine_args)?))));
            }
        }
        Ok((Some(AsyncEngine::from_files(engine_args, files)?), None))
    })
    .await??;
    Ok(Arc::new(AppState {
        engine,
        embedder,
        model_name: args.served_model_name.clone().unwrap_or_else(|| args.model.clone()),
        api_key: args.api_key.clone(),
        chat_template,
        metrics,
        next_id: AtomicU64::new(0),
    }))
}

async fn serve(args: ServeArgs) -> Result<()> {
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[
            0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
            80.0,
        ])
        .ok()
        .and_then(|b| b.install_recorder().ok());
    let state = build_state(&args, metrics).await?;
    let engine = state.engine.clone();
    let addr = format!("{}:{}", args.host, args.port);
    let listener = tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("binding {addr}"))?;
    eprintln!("vllm-server: serving {} on http://{addr} (OpenAI-compatible routes under /v1)", state.model_name);
    axum::serve(listener, router(state, args.max_body_bytes)).with_graceful_shutdown(shutdown_signal()).await?;
    if let Some(engine) = engine {
        tokio::task::spawn_blocking(move || engine.shutdown()).await?;
    }
    eprintln!("vllm-server: stopped");
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command {
        Some(Command::Serve(a)) => rt.block_on(serve(a)),
        None => rt.block_on(serve(cli.serve)),
        Some(Command::RunBatch(b)) => rt.block_on(async {
            let mut serve = b.serve.clone();
            serve.api_key = None;
            let state = build_state(&serve, None).await?;
            let engine = state.engine.clone();
            let r = batch::run(router(state, usize::MAX), &b.input, &b.output).await;
            if let Some(engine) = engine {
                tokio::task::spawn_blocking(move || engine.shutdown()).await?;
            }
            r
        }),
    }
}
