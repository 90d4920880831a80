//! `vllm-server`: the OpenAI-compatible HTTP server of vllm-rs.
//!
//! `cargo run --release -p vllm-server` serves the default model (SmolLM2-135M-Instruct) on
//! 127.0.0.1:8000. Flags follow vLLM's (`--model`, `--port`, `--api-key`, ...); `--help`
//! lists them.

mod api;
mod batch;
mod error;
mod logging;
mod net;
mod protocol;
mod reasoning;
mod render;
mod routes;
mod state;
mod tools;

use std::future::IntoFuture;
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
    /// Serve the model over HTTP (the default): `vllm-server serve <model> [flags]`, as
    /// `vllm serve`.
    Serve(ServeCmd),
    /// Run an OpenAI batch file (JSONL of /v1/completions or /v1/chat/completions requests).
    RunBatch(BatchArgs),
    /// The GPU acceptance checks (kernels, fixtures, engine features, throughput) in one run;
    /// `--device cpu` rehearses them on the CPU. scripts/gpu_acceptance.sh runs it.
    GpuCheck(GpuCheckArgs),
}

#[derive(Args, Clone)]
struct GpuCheckArgs {
    /// cuda (cuda:N), or cpu to rehearse.
    #[arg(long, default_value = "cuda")]
    device: String,
    /// The fixtures folder of the source tree.
    #[arg(long, default_value = "fixtures/models")]
    fixtures: std::path::PathBuf,
    /// A model folder (config.json + safetensors) for the throughput run.
    #[arg(long)]
    bench_model: Option<std::path::PathBuf>,
    /// Prompts in the throughput run.
    #[arg(long, default_value_t = 1000)]
    bench_prompts: usize,
    /// Prompt tokens per throughput request.
    #[arg(long, default_value_t = 256)]
    bench_input_len: usize,
    /// Output tokens per throughput request.
    #[arg(long, default_value_t = 256)]
    bench_output_len: usize,
    /// Only these groups: kernels, fixtures, engine, bench (all when absent).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Write the report (every check and figure) here as JSON.
    #[arg(long)]
    report: Option<std::path::PathBuf>,
}

/// Runs the acceptance checks; fails when one fails.
fn gpu_check(a: GpuCheckArgs) -> Result<()> {
    let opts = vllm_engine::gpu_check::GpuCheckOptions {
        device: a.device,
        fixtures: a.fixtures,
        bench_model: a.bench_model,
        bench_prompts: a.bench_prompts,
        bench_len: (a.bench_input_len, a.bench_output_len),
        only: a.only,
    };
    let report = vllm_engine::gpu_check::run(&opts)?;
    if let Some(path) = a.report {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if !report.passed() {
        anyhow::bail!("{} of {} checks failed", report.checks.iter().filter(|c| !c.pass).count(), report.checks.len());
    }
    Ok(())
}

/// `serve [model]`: the model as vLLM's positional argument, or `--model`.
#[derive(Args, Clone)]
struct ServeCmd {
    /// Model: a local folder, a .gguf file, or a Hugging Face id (overrides --model).
    model_tag: Option<String>,
    #[command(flatten)]
    args: ServeArgs,
}

impl ServeCmd {
    fn into_args(self) -> ServeArgs {
        let mut args = self.args;
        if let Some(m) = self.model_tag {
            args.model = m;
        }
        args
    }
}

/// vLLM's GPU and deployment flags. GPU memory and CUDA graphs act with `--device cuda`; the
/// rest (parallelism, swap space, remote code), and the GPU ones on the CPU, change nothing
/// here and are accepted for launch scripts, with one log line each.
#[derive(Args, Clone, Default)]
struct GpuOnlyArgs {
    /// (vLLM, GPU) Fraction of GPU memory for weights, activations and KV cache (default
    /// 0.9); no effect on CPU (see --kv-cache-memory).
    #[arg(long)]
    gpu_memory_utilization: Option<f64>,
    /// (vLLM, GPU) Run decode steps eagerly, without CUDA graphs; no effect on CPU.
    #[arg(long)]
    enforce_eager: bool,
    /// (vLLM, GPU) Longest context a captured decode graph covers (default 8192); no effect
    /// on CPU.
    #[arg(long)]
    max_seq_len_to_capture: Option<usize>,
    /// (vLLM) CPU swap space per GPU in GiB: no effect (preemption recomputes).
    #[arg(long)]
    swap_space: Option<f64>,
    /// (vLLM) CPU offload of weights in GiB: no effect (weights live on the CPU).
    #[arg(long)]
    cpu_offload_gb: Option<f64>,
    /// (vLLM) Tensor-parallel workers: only 1 here.
    #[arg(long, short = 't')]
    tensor_parallel_size: Option<usize>,
    /// (vLLM) Pipeline stages: only 1 here.
    #[arg(long)]
    pipeline_parallel_size: Option<usize>,
    /// (vLLM) Executor for several workers: no effect (one process).
    #[arg(long)]
    distributed_executor_backend: Option<String>,
    /// (vLLM, GPU) Disable the custom all-reduce kernel: no effect.
    #[arg(long)]
    disable_custom_all_reduce: bool,
    /// (vLLM) Run the model repository's own Python code: never done here (every
    /// architecture is built in); accepted so launch scripts start.
    #[arg(long)]
    trust_remote_code: bool,
    /// (vLLM) Chunked prefill: always on here (--long-prefill-token-threshold tunes it).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    enable_chunked_prefill: Option<bool>,
    /// (vLLM) Do not log engine statistics: no periodic statistics are logged here.
    #[arg(long)]
    disable_log_stats: bool,
    /// (vLLM) Uvicorn's log level: sets this server's log level (RUST_LOG still wins).
    #[arg(long)]
    uvicorn_log_level: Option<String>,
}

impl GpuOnlyArgs {
    /// Errors for values we cannot serve; a log line for each flag that has no effect.
    fn check(&self, device: &str) -> Result<()> {
        for (flag, n) in [
            ("--tensor-parallel-size", self.tensor_parallel_size),
            ("--pipeline-parallel-size", self.pipeline_parallel_size),
        ] {
            if let Some(n) = n.filter(|&n| n != 1) {
                anyhow::bail!("{flag} {n}: this server runs one worker on one device; use {flag} 1 (or leave it out)");
            }
        }
        if self.enable_chunked_prefill == Some(false) {
            tracing::warn!("--enable-chunked-prefill false: prompts are always prefilled in chunks here; set --long-prefill-token-threshold 0 to turn the per-step limit off");
        }
        let cpu = !device.starts_with("cuda");
        let unused = [
            ("--gpu-memory-utilization", cpu && self.gpu_memory_utilization.is_some()),
            ("--enforce-eager", cpu && self.enforce_eager),
            ("--max-seq-len-to-capture", cpu && self.max_seq_len_to_capture.is_some()),
            ("--swap-space", self.swap_space.is_some()),
            ("--cpu-offload-gb", self.cpu_offload_gb.is_some()),
            ("--distributed-executor-backend", self.distributed_executor_backend.is_some()),
            ("--disable-custom-all-reduce", self.disable_custom_all_reduce),
            ("--trust-remote-code", self.trust_remote_code),
            ("--disable-log-stats", self.disable_log_stats),
        ];
        for (flag, set) in unused {
            if set {
                tracing::info!("{flag} has no effect on this server (accepted for vLLM launch scripts)");
            }
        }
        Ok(())
    }
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
    /// Names the API accepts in `model` and lists in /v1/models; responses report the first
    /// (defaults to --model). Several may follow the flag, as in vLLM.
    #[arg(long, num_args = 1..)]
    served_model_name: Vec<String>,
    /// Address to bind. 127.0.0.1 serves this machine only; use 0.0.0.0 to expose it.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to bind.
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer <key>` on every computing route; several keys may
    /// follow the flag (any one is accepted).
    #[arg(long, env = "VLLM_API_KEY", hide_env_values = true, num_args = 1..)]
    api_key: Vec<String>,
    /// A path prefix a proxy adds (vLLM's --root-path): routes answer under it and at /.
    #[arg(long)]
    root_path: Option<String>,
    /// CORS: the origins allowed, a JSON list (vLLM's default: any).
    #[arg(long, default_value = r#"["*"]"#)]
    allowed_origins: String,
    /// CORS: the methods allowed, a JSON list.
    #[arg(long, default_value = r#"["*"]"#)]
    allowed_methods: String,
    /// CORS: the request headers allowed, a JSON list.
    #[arg(long, default_value = r#"["*"]"#)]
    allowed_headers: String,
    /// CORS: allow credentials (cookies, Authorization) on cross-origin requests.
    #[arg(long)]
    allow_credentials: bool,
    /// TLS: the private key (PEM). With --ssl-certfile the server speaks HTTPS only.
    #[arg(long, requires = "ssl_certfile")]
    ssl_keyfile: Option<std::path::PathBuf>,
    /// TLS: the certificate chain (PEM).
    #[arg(long, requires = "ssl_keyfile")]
    ssl_certfile: Option<std::path::PathBuf>,
    /// TLS: CA certificates (PEM) for client certificates.
    #[arg(long)]
    ssl_ca_certs: Option<std::path::PathBuf>,
    /// TLS: client certificates 0 not asked for, 1 optional, 2 required (Python's ssl numbers).
    #[arg(long, default_value_t = 0)]
    ssl_cert_reqs: u8,
    /// A tokenizer other than the model's: a folder with tokenizer.json, that file, or a
    /// Hugging Face id.
    #[arg(long)]
    tokenizer: Option<String>,
    /// Hugging Face Hub revision (branch, tag or commit) of the model.
    #[arg(long)]
    revision: Option<String>,
    /// Where Hub downloads go (and are looked for) instead of the Hugging Face cache.
    #[arg(long)]
    download_dir: Option<std::path::PathBuf>,
    /// Most log probabilities a request may ask for (logprobs, top_logprobs,
    /// prompt_logprobs), as vLLM's flag.
    #[arg(long, default_value_t = 20)]
    max_logprobs: usize,
    /// Sampling defaults for fields a request leaves out: auto (the model's
    /// generation_config.json, vLLM's default), vllm (none), or a folder holding a
    /// generation_config.json.
    #[arg(long, default_value = "auto")]
    generation_config: String,
    /// JSON applied over the generation config's defaults, e.g. '{"temperature": 0.6}'
    /// (temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens).
    #[arg(long)]
    override_generation_config: Option<String>,
    /// Weight/activation dtype: auto, float32, float16, bfloat16.
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// How weight matrices run: auto (the checkpoint's own quantization: a GGUF file's Q4_0,
    /// Q4_1, Q4_K, Q5_K, Q6_K and Q8_0 blocks on our kernels as they are), gguf (the same,
    /// vLLM's name), none
    /// (dequantize to float32: the reference path), or int8 (every matrix requantized to int8).
    #[arg(long, default_value = "auto")]
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
    /// What the KV cache holds: auto (float16 on the CPU for quantized weights, the model's
    /// dtype otherwise), float32, float16, bfloat16.
    #[arg(long, default_value = "auto")]
    kv_cache_dtype: String,
    /// Chat template: a file path or the template text (overrides the model's).
    #[arg(long)]
    chat_template: Option<String>,
    /// Seed for requests without one.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Device: cpu, or cuda / cuda:N (a build with --features cuda: `cargo xtask build-cuda`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Largest accepted request body, in bytes.
    #[arg(long, default_value_t = 32 << 20)]
    max_body_bytes: usize,
    /// Prompts are computed at most this many tokens per step, so a request arriving during
    /// a long prefill waits one short step (default: 4% of --max-model-len, at least 256;
    /// 0 turns it off).
    #[arg(long)]
    long_prefill_token_threshold: Option<usize>,
    /// Requests queued beyond the running batch; past this, new requests get 503 with
    /// Retry-After.
    #[arg(long, default_value_t = 1024)]
    max_waiting_requests: usize,
    /// Steps of output buffered for a client that is not reading its stream; past this the
    /// request is aborted and its KV blocks freed.
    #[arg(long, default_value_t = 1024)]
    max_output_buffer_steps: usize,
    /// Seconds a request waits for its guided-decoding constraint to compile (then 400).
    #[arg(long, default_value_t = 10.0)]
    guided_decoding_compile_timeout: f64,
    /// Threads compiling guided-decoding constraints.
    #[arg(long, default_value_t = 1)]
    guided_decoding_compile_threads: usize,
    /// Memory kept for compiled constraints (least recently used evicted), e.g. 512MiB.
    #[arg(long, default_value = "512MiB")]
    guided_decoding_cache: String,
    /// Longest guided-decoding constraint (schema, regex, choices, grammar), in bytes.
    #[arg(long, default_value_t = 64 << 10)]
    guided_decoding_max_constraint_bytes: usize,
    /// On SIGTERM/Ctrl-C, seconds to let in-flight requests finish before exiting anyway.
    #[arg(long, default_value_t = 30.0)]
    shutdown_timeout: f64,
    /// Do not log each request (vLLM's flag); errors are still logged.
    #[arg(long)]
    disable_log_requests: bool,
    /// Log format: text or json.
    #[arg(long, default_value = "text")]
    log_format: String,
    /// Read tool calls from `auto` tool-choice outputs (vLLM's flag; needs --tool-call-parser).
    #[arg(long)]
    enable_auto_tool_choice: bool,
    /// The model family's tool-call format: hermes, llama3_json, mistral, pythonic, qwen3_xml
    /// (qwen3_coder), deepseek_v3 (deepseek_v31), openai.
    #[arg(long)]
    tool_call_parser: Option<String>,
    /// Split thinking models' outputs into `reasoning` and `content` (vLLM's flag):
    /// deepseek_r1, qwen3, glm45, mistral.
    #[arg(long)]
    reasoning_parser: Option<String>,
    /// vLLM's structured-output settings as JSON: `backend` (auto, guidance, outlines) and
    /// `enable_in_reasoning` (constraints apply while the model thinks too).
    #[arg(long)]
    structured_outputs_config: Option<String>,
    #[command(flatten)]
    gpu_only: GpuOnlyArgs,
    /// Test hook: `POST /debug/crash-engine` makes the engine core panic, so tests can check
    /// what the server does when its core dies. Never enable it in production.
    #[arg(long, hide = true)]
    enable_crash_route_for_tests: bool,
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
            kv_cache_dtype: self.kv_cache_dtype.parse()?,
            enable_prefix_caching: !self.no_enable_prefix_caching,
            device: self.device.clone(),
            gpu_memory_utilization: self.gpu_only.gpu_memory_utilization.unwrap_or(0.9),
            enforce_eager: self.gpu_only.enforce_eager,
            max_seq_len_to_capture: self.gpu_only.max_seq_len_to_capture.unwrap_or(8192),
            device_sampling: None,
            cuda_graphs: None,
            long_prefill_token_threshold: self.long_prefill_token_threshold,
            max_waiting_requests: self.max_waiting_requests,
            max_output_buffer_steps: self.max_output_buffer_steps,
            tokenizer: self.tokenizer.clone(),
            revision: self.revision.clone(),
            download_dir: self.download_dir.clone(),
            guided_decoding: vllm_engine::GuideLimits {
                compile_timeout: seconds("--guided-decoding-compile-timeout", self.guided_decoding_compile_timeout)?,
                compile_threads: self.guided_decoding_compile_threads.max(1),
                cache_bytes: usize::try_from(vllm_engine::parse_bytes(&self.guided_decoding_cache)?)
                    .context("--guided-decoding-cache")?,
                max_spec_bytes: self.guided_decoding_max_constraint_bytes,
                ..Default::default()
            },
        })
    }

    /// The `auto` tool-call parser, as vLLM requires it: both flags or neither.
    fn tool_parser(&self) -> Result<Option<Arc<dyn tools::ToolParser>>> {
        match (self.enable_auto_tool_choice, &self.tool_call_parser) {
            (false, None) => Ok(None),
            (true, None) => anyhow::bail!(
                "--enable-auto-tool-choice needs --tool-call-parser <name> ({})",
                tools::PARSERS.join(", ")
            ),
            (false, Some(_)) => anyhow::bail!("--tool-call-parser needs --enable-auto-tool-choice"),
            (true, Some(name)) => match tools::parser(name) {
                Some(p) => Ok(Some(Arc::from(p))),
                None => anyhow::bail!("--tool-call-parser: '{name}' is not one of {}", tools::PARSERS.join(", ")),
            },
        }
    }

    fn reasoning_parser(&self) -> Result<Option<reasoning::ReasoningParser>> {
        let Some(name) = &self.reasoning_parser else { return Ok(None) };
        match reasoning::parser(name) {
            Some(p) => Ok(Some(p)),
            None => anyhow::bail!("--reasoning-parser: '{name}' is not one of {}", reasoning::PARSERS.join(", ")),
        }
    }

    /// `--structured-outputs-config`: (default backend, constrain while reasoning).
    fn structured_outputs_config(&self) -> Result<(Option<String>, bool)> {
        let Some(text) = &self.structured_outputs_config else { return Ok((None, false)) };
        let v: serde_json::Value = serde_json::from_str(text).context("--structured-outputs-config is not JSON")?;
        let obj = v.as_object().context("--structured-outputs-config must be a JSON object")?;
        let (mut backend, mut in_reasoning) = (None, false);
        for (k, v) in obj {
            match (k.as_str(), v) {
                ("backend", serde_json::Value::String(b)) => match b.as_str() {
                    "auto" | "guidance" | "llguidance" | "outlines" => backend = Some(b.clone()),
                    "xgrammar" => {
                        tracing::info!("--structured-outputs-config backend xgrammar: using llguidance (xgrammar is not built in)");
                        backend = Some("guidance".into());
                    }
                    other => anyhow::bail!("--structured-outputs-config: backend '{other}' is not one of auto, guidance, outlines, xgrammar"),
                },
                ("enable_in_reasoning", serde_json::Value::Bool(b)) => in_reasoning = *b,
                ("reasoning_parser", serde_json::Value::String(_)) => {
                    anyhow::bail!("--structured-outputs-config: give the reasoning parser as --reasoning-parser")
                }
                ("disable_fallback" | "disable_any_whitespace" | "disable_additional_properties", _) => {
                    tracing::info!("--structured-outputs-config {k} has no effect on this server");
                }
                _ => anyhow::bail!("--structured-outputs-config: unknown or mistyped setting '{k}'"),
            }
        }
        Ok((backend, in_reasoning))
    }

    /// The sampling defaults from `--generation-config` (for a model folder `dir`, with
    /// `auto`) and `--override-generation-config`.
    fn sampling_defaults(&self, dir: Option<&std::path::Path>) -> Result<protocol::SamplingDefaults> {
        let mut d = protocol::SamplingDefaults::default();
        let file = match self.generation_config.as_str() {
            "vllm" => None,
            "auto" => dir.map(|d| d.join("generation_config.json")).filter(|f| f.is_file()),
            folder => {
                let f = std::path::Path::new(folder).join("generation_config.json");
                if !f.is_file() {
                    anyhow::bail!(
                        "--generation-config {folder}: no generation_config.json there (or say auto or vllm)"
                    );
                }
                Some(f)
            }
        };
        if let Some(f) = &file {
            let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("{} is not JSON", f.display()))?;
            d.merge(&v, false).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
        }
        if let Some(o) = &self.override_generation_config {
            let v: serde_json::Value = serde_json::from_str(o).context("--override-generation-config is not JSON")?;
            d.merge(&v, true).map_err(|e| anyhow::anyhow!("--override-generation-config: {e}"))?;
        }
        if !d.is_empty() {
            tracing::info!(defaults = ?d, source = ?file, "sampling defaults for fields a request leaves out (the model's generation config; --generation-config vllm turns them off)");
        }
        Ok(d)
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

/// How long a server whose engine died keeps answering (503s) before it exits.
const DEATH_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// A non-negative, finite number of seconds.
fn seconds(flag: &str, s: f64) -> Result<std::time::Duration> {
    std::time::Duration::try_from_secs_f64(s)
        .with_context(|| format!("{flag} must be a non-negative number of seconds"))
}

pub(crate) fn router(state: Arc<AppState>, max_body: usize, crash_route: bool) -> Router {
    let mut r = Router::new();
    if crash_route {
        r = r.route("/debug/crash-engine", post(routes::crash_engine));
    }
    r.route("/v1/models", get(routes::models))
        .route("/v1/completions", post(routes::completions))
        .route("/v1/chat/completions", post(routes::chat))
        .route("/v1/embeddings", post(routes::embeddings))
        .route("/generate", post(routes::generate))
        .route("/tokenize", post(routes::tokenize))
        .route("/detokenize", post(routes::detokenize))
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
async fn build_state(
    args: &ServeArgs,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
) -> Result<Arc<AppState>> {
    let chat_template = args.chat_template()?;
    let tool_parser = args.tool_parser()?;
    let reasoning_parser = args.reasoning_parser()?;
    let (default_guided_backend, constrain_reasoning) = args.structured_outputs_config()?;
    let model_names =
        if args.served_model_name.is_empty() { vec![args.model.clone()] } else { args.served_model_name.clone() };
    let engine_args = args.engine_args()?;
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
    Ok(Arc::new(AppState {
        engine,
        embedder,
        model_name: model_names[0].clone(),
        model_names,
        api_keys: args.api_key.clone(),
        chat_template,
        metrics,
        next_id: AtomicU64::new(0),
        tool_parser,
        reasoning_parser,
        constrain_reasoning,
        default_guided_backend,
        sampling_defaults,
        max_logprobs: args.max_logprobs,
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
    let make = axum::ServiceExt::<axum::extract::Request>::into_make_service(app);
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(model = %model_name, "serving on {scheme}://{addr}{} (OpenAI-compatible routes under /v1)", root_label);
    let server: std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<()>> + Send>> = match tls {
        Some(config) => Box::pin(
            axum::serve(net::TlsListener::new(listener, config)?, make).with_graceful_shutdown(graceful).into_future(),
        ),
        None => Box::pin(axum::serve(listener, make).with_graceful_shutdown(graceful).into_future()),
    };
    let mut deadline = stop_rx.clone();
    let drain = seconds("--shutdown-timeout", args.shutdown_timeout)?;
    tokio::select! {
        r = server => r?,
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

/// A failing start prints its error and the causes under it on one line each, never a
/// backtrace (even with RUST_BACKTRACE set), and exits 1.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    let command = match cli.command {
        Some(Command::GpuCheck(a)) => {
            logging::init("text", false, None)?;
            return gpu_check(a);
        }
        Some(Command::Serve(c)) => Command::Serve(ServeCmd { model_tag: None, args: c.into_args() }),
        Some(c) => c,
        None => Command::Serve(ServeCmd { model_tag: None, args: cli.serve }),
    };
    let serve_args = match &command {
        Command::Serve(c) => &c.args,
        Command::RunBatch(b) => &b.serve,
        Command::GpuCheck(_) => unreachable!("handled above"),
    };
    logging::init(
        &serve_args.log_format,
        !serve_args.disable_log_requests,
        serve_args.gpu_only.uvicorn_log_level.as_deref(),
    )?;
    serve_args.gpu_only.check(&serve_args.device)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match command {
        Command::GpuCheck(a) => gpu_check(a),
        Command::Serve(c) => rt.block_on(serve(c.args)),
        Command::RunBatch(b) => rt.block_on(async {
            let mut serve = b.serve.clone();
            serve.api_key = Vec::new();
            let state = build_state(&serve, None).await?;
            let engine = state.engine.clone();
            let r = batch::run(router(state, usize::MAX, false), &b.input, &b.output).await;
            if let Some(engine) = engine {
                tokio::task::spawn_blocking(move || engine.shutdown()).await?;
            }
            r
        }),
    }
}
