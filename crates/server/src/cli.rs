//! The command line: vLLM's flags, parsed once into typed values. The engine's flags are
//! [`EngineArgs`] itself, flattened in (not copied); this file holds only what the server
//! adds (network, API, parsers, logging) and the flags vLLM launch scripts pass that change
//! nothing here.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, Parser, Subcommand};
use vllm_engine::EngineArgs;

use crate::{protocol, reasoning, tools};

#[derive(Parser)]
#[command(name = "vllm-server", version, about = "OpenAI-compatible LLM server (vllm-rs)")]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// `--chat-template-content-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ContentFormatArg {
    /// Detected from the template, as vLLM detects it.
    #[default]
    Auto,
    /// One string per message (text parts joined with newlines).
    String,
    /// OpenAI's list of `{"type": "text", "text"}` parts per message.
    Openai,
}

impl ContentFormatArg {
    /// The forced format (`None`: each template's own).
    pub fn forced(self) -> Option<vllm_tokenizer::ContentFormat> {
        match self {
            Self::Auto => None,
            Self::String => Some(vllm_tokenizer::ContentFormat::String),
            Self::Openai => Some(vllm_tokenizer::ContentFormat::OpenAi),
        }
    }
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once, at start-up
pub(crate) enum Command {
    /// Serve the model over HTTP (the default): `vllm-server serve <model> [flags]`, as
    /// `vllm serve`.
    Serve(ServeCmd),
    /// Run an OpenAI batch file (JSONL of /v1/completions or /v1/chat/completions requests).
    RunBatch(BatchArgs),
    /// The GPU acceptance checks (kernels, fixtures, engine features, throughput) in one run;
    /// `--device cpu` rehearses them on the CPU. scripts/gpu_acceptance.sh runs it.
    GpuCheck(GpuCheckArgs),
}

/// `serve [model]`: the model as vLLM's positional argument, or `--model`.
#[derive(Args, Clone)]
pub(crate) struct ServeCmd {
    /// Model: a local folder, a .gguf file, or a Hugging Face id (overrides --model).
    pub model_tag: Option<String>,
    #[command(flatten)]
    pub args: ServeArgs,
}

impl ServeCmd {
    pub fn into_args(self) -> ServeArgs {
        let mut args = self.args;
        if let Some(m) = self.model_tag {
            args.engine.model = m;
        }
        args
    }
}

#[derive(Args, Clone)]
pub(crate) struct BatchArgs {
    /// Input JSONL: {"custom_id", "method": "POST", "url", "body"} per line.
    #[arg(short = 'i', long = "input-file")]
    pub input: PathBuf,
    /// Output JSONL: {"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}.
    #[arg(short = 'o', long = "output-file")]
    pub output: PathBuf,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Args, Clone)]
pub(crate) struct GpuCheckArgs {
    /// cuda (cuda:N), or cpu to rehearse.
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// The fixtures folder of the source tree.
    #[arg(long, default_value = "fixtures/models")]
    pub fixtures: PathBuf,
    /// A model folder (config.json + safetensors) for the throughput run.
    #[arg(long)]
    pub bench_model: Option<PathBuf>,
    /// Prompts in the throughput run.
    #[arg(long, default_value_t = 1000)]
    pub bench_prompts: usize,
    /// Prompt tokens per throughput request.
    #[arg(long, default_value_t = 256)]
    pub bench_input_len: usize,
    /// Output tokens per throughput request.
    #[arg(long, default_value_t = 256)]
    pub bench_output_len: usize,
    /// Only these groups: kernels, fixtures, engine, bench (all when absent).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Write the report (every check and figure) here as JSON.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

/// The server's flags, named as vLLM's, with the engine's flattened in.
#[derive(Args, Clone)]
pub(crate) struct ServeArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Names the API accepts in `model` and lists in /v1/models; responses report the first
    /// (defaults to --model). Several may follow the flag, as in vLLM.
    #[arg(long, num_args = 1..)]
    pub served_model_name: Vec<String>,
    /// Address to bind. 127.0.0.1 serves this machine only; use 0.0.0.0 to expose it.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to bind.
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer <key>` on every computing route; several keys may
    /// follow the flag (any one is accepted).
    #[arg(long, env = "VLLM_API_KEY", hide_env_values = true, num_args = 1..)]
    pub api_key: Vec<String>,
    /// A path prefix a proxy adds (vLLM's --root-path): routes answer under it and at /.
    #[arg(long)]
    pub root_path: Option<String>,
    /// CORS: the origins allowed, a JSON list (vLLM's default: any).
    #[arg(long, default_value = r#"["*"]"#)]
    pub allowed_origins: String,
    /// CORS: the methods allowed, a JSON list.
    #[arg(long, default_value = r#"["*"]"#)]
    pub allowed_methods: String,
    /// CORS: the request headers allowed, a JSON list.
    #[arg(long, default_value = r#"["*"]"#)]
    pub allowed_headers: String,
    /// CORS: allow credentials (cookies, Authorization) on cross-origin requests.
    #[arg(long)]
    pub allow_credentials: bool,
    /// TLS: the private key (PEM). With --ssl-certfile the server speaks HTTPS only.
    #[arg(long, requires = "ssl_certfile")]
    pub ssl_keyfile: Option<PathBuf>,
    /// TLS: the certificate chain (PEM).
    #[arg(long, requires = "ssl_keyfile")]
    pub ssl_certfile: Option<PathBuf>,
    /// TLS: CA certificates (PEM) for client certificates.
    #[arg(long)]
    pub ssl_ca_certs: Option<PathBuf>,
    /// TLS: client certificates 0 not asked for, 1 optional, 2 required (Python's ssl numbers).
    #[arg(long, default_value_t = 0)]
    pub ssl_cert_reqs: u8,
    /// Most log probabilities a request may ask for (logprobs, top_logprobs,
    /// prompt_logprobs), as vLLM's flag.
    #[arg(long, default_value_t = 20)]
    pub max_logprobs: usize,
    /// Sampling defaults for fields a request leaves out: auto (the model's
    /// generation_config.json, vLLM's default), vllm (none), or a folder holding a
    /// generation_config.json.
    #[arg(long, default_value = "auto")]
    pub generation_config: String,
    /// JSON applied over the generation config's defaults, e.g. '{"temperature": 0.6}'
    /// (temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens).
    #[arg(long)]
    pub override_generation_config: Option<String>,
    /// LoRA adapters served from the start (with --enable-lora): `name=path` each, or vLLM's
    /// JSON form `{"name": .., "path": .., "base_model_name": ..}`; requests select one by
    /// naming it as their `model`.
    #[arg(long, num_args = 1..)]
    pub lora_modules: Vec<String>,
    /// Chat template: a file path or the template text (overrides the model's).
    #[arg(long)]
    pub chat_template: Option<String>,
    /// How message content is given to the chat template (vLLM's flag): `auto` detects it
    /// from the template (one that loops over a message's content gets OpenAI's list of
    /// parts, any other one string), `string` or `openai` forces one.
    #[arg(long, value_enum, ignore_case = true, default_value = "auto")]
    pub chat_template_content_format: ContentFormatArg,
    /// Reuse cached prompt prefixes: on by default (`--no-enable-prefix-caching` turns it off;
    /// of the two, the last given wins).
    #[arg(long = "enable-prefix-caching", overrides_with = "enable_prefix_caching")]
    pub enable_prefix_caching_flag: bool,
    /// Largest accepted request body, in bytes.
    #[arg(long, default_value_t = 32 << 20)]
    pub max_body_bytes: usize,
    /// Most responses kept for `GET /v1/responses/{id}` and `previous_response_id` (the
    /// oldest evicted first); 0 stores none (`store` is then ignored, `background` refused).
    #[arg(long, default_value_t = 10_000)]
    pub responses_store_max_entries: usize,
    /// Most bytes of stored responses (their output and conversation as JSON), e.g. 256MiB;
    /// the oldest are evicted first.
    #[arg(long, value_parser = vllm_engine::parse_bytes, default_value = "256MiB")]
    pub responses_store_max_bytes: u64,
    /// On SIGTERM/Ctrl-C, seconds to let in-flight requests finish before exiting anyway.
    #[arg(long, default_value_t = 30.0)]
    pub shutdown_timeout: f64,
    /// Do not log each request (vLLM's flag); errors are still logged.
    #[arg(long)]
    pub disable_log_requests: bool,
    /// Log format.
    #[arg(long, value_parser = ["text", "json"], default_value = "text")]
    pub log_format: String,
    /// Read tool calls from `auto` tool-choice outputs (vLLM's flag; needs --tool-call-parser).
    #[arg(long)]
    pub enable_auto_tool_choice: bool,
    /// The model family's tool-call format.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(tools::names()))]
    pub tool_call_parser: Option<String>,
    /// Split thinking models' outputs into `reasoning` and `content` (vLLM's flag).
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(reasoning::names()))]
    pub reasoning_parser: Option<String>,
    /// vLLM's structured-output settings as JSON: `backend` (auto, guidance, outlines) and
    /// `enable_in_reasoning` (constraints apply while the model thinks too).
    #[arg(long)]
    pub structured_outputs_config: Option<String>,
    /// Connection limits and deadlines.
    #[command(flatten)]
    pub conn: crate::conn::ConnLimits,
    #[command(flatten)]
    pub compat: CompatArgs,
    /// Test hook: `POST /debug/crash-engine` makes the engine core panic, so tests can check
    /// what the server does when its core dies. Never enable it in production.
    #[arg(long, hide = true)]
    pub enable_crash_route_for_tests: bool,
}

/// vLLM's deployment flags that change nothing on this server (parallelism, swap space,
/// remote code): accepted so launch scripts start, with one log line each.
#[derive(Args, Clone, Default)]
pub(crate) struct CompatArgs {
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
    /// (vLLM) Do not log the periodic engine statistics line (throughput, running and waiting
    /// requests, KV cache usage, speculative decoding's acceptance).
    #[arg(long)]
    pub disable_log_stats: bool,
    /// (vLLM) Uvicorn's log level: sets this server's log level (RUST_LOG still wins).
    #[arg(long)]
    pub uvicorn_log_level: Option<String>,
}

impl CompatArgs {
    /// Errors for values we cannot serve; a log line for each flag that has no effect (the
    /// GPU flags among the engine's, given on the command line for a CPU engine, too).
    pub fn check(&self, engine: &EngineArgs, matches: &ArgMatches) -> Result<()> {
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
        let cpu = !engine.device.starts_with("cuda");
        let given =
            |id: &str| matches.try_get_raw(id).is_ok() && matches.value_source(id) == Some(ValueSource::CommandLine);
        let unused = [
            ("--gpu-memory-utilization", cpu && given("gpu_memory_utilization")),
            ("--enforce-eager", cpu && engine.enforce_eager),
            ("--max-seq-len-to-capture", cpu && given("max_seq_len_to_capture")),
            ("--swap-space", self.swap_space.is_some()),
            ("--cpu-offload-gb", self.cpu_offload_gb.is_some()),
            ("--distributed-executor-backend", self.distributed_executor_backend.is_some()),
            ("--disable-custom-all-reduce", self.disable_custom_all_reduce),
            ("--trust-remote-code", self.trust_remote_code),
        ];
        for (flag, set) in unused {
            if set {
                tracing::info!("{flag} has no effect on this server (accepted for vLLM launch scripts)");
            }
        }
        Ok(())
    }
}

impl ServeArgs {
    /// The served names: `--served-model-name`s, else the model argument.
    pub fn model_names(&self) -> Vec<String> {
        if self.served_model_name.is_empty() {
            vec![self.engine.model.clone()]
        } else {
            self.served_model_name.clone()
        }
    }

    /// `--lora-modules` as (name, path) pairs: a JSON form's `base_model_name` must be a served
    /// name, names must be unique and not a served name.
    pub fn lora_modules(&self, served: &[String]) -> Result<Vec<(String, PathBuf)>> {
        let mut out: Vec<(String, PathBuf)> = Vec::new();
        for m in &self.lora_modules {
            let (name, path) = if m.trim_start().starts_with('{') {
                let v: serde_json::Value =
                    serde_json::from_str(m).with_context(|| format!("--lora-modules {m}: not JSON"))?;
                let field = |k: &str| v.get(k).and_then(|x| x.as_str()).map(String::from);
                let (Some(name), Some(path)) = (field("name"), field("path")) else {
                    anyhow::bail!("--lora-modules {m}: the JSON form needs \"name\" and \"path\"");
                };
                if let Some(base) = field("base_model_name") {
                    if !served.contains(&base) {
                        anyhow::bail!(
                            "--lora-modules {name}: base_model_name '{base}' is not the served model ({})",
                            served.join(", ")
                        );
                    }
                }
                (name, PathBuf::from(path))
            } else {
                let Some((name, path)) = m.split_once('=') else {
                    anyhow::bail!("--lora-modules {m}: give name=path or a JSON object");
                };
                (name.to_string(), PathBuf::from(path))
            };
            if name.is_empty() || served.contains(&name) || out.iter().any(|(n, _)| *n == name) {
                anyhow::bail!("--lora-modules {name}: an adapter needs a name of its own (not empty, not a served name, not repeated)");
            }
            out.push((name, path));
        }
        if !out.is_empty() && !self.engine.enable_lora {
            anyhow::bail!("--lora-modules needs --enable-lora");
        }
        Ok(out)
    }

    /// The `auto` tool-call parser, as vLLM requires it: both flags or neither.
    pub fn tool_parser(&self) -> Result<Option<Arc<dyn tools::ToolParser>>> {
        match (self.enable_auto_tool_choice, &self.tool_call_parser) {
            (false, None) => Ok(None),
            (true, None) => anyhow::bail!(
                "--enable-auto-tool-choice needs --tool-call-parser <name> ({})",
                tools::names().collect::<Vec<_>>().join(", ")
            ),
            (false, Some(_)) => anyhow::bail!("--tool-call-parser needs --enable-auto-tool-choice"),
            (true, Some(name)) => {
                Ok(Some(Arc::from(tools::parser(name).with_context(|| format!("--tool-call-parser {name}"))?)))
            }
        }
    }

    pub fn reasoning_parser(&self) -> Result<Option<reasoning::ReasoningParser>> {
        let Some(name) = &self.reasoning_parser else { return Ok(None) };
        Ok(Some(reasoning::parser(name).with_context(|| format!("--reasoning-parser {name}"))?))
    }

    /// `--structured-outputs-config`: (default backend, constrain while reasoning).
    pub fn structured_outputs_config(&self) -> Result<(Option<String>, bool)> {
        let Some(text) = &self.structured_outputs_config else { return Ok((None, false)) };
        let v: serde_json::Value = serde_json::from_str(text).context("--structured-outputs-config is not JSON")?;
        let obj = v.as_object().context("--structured-outputs-config must be a JSON object")?;
        let (mut backend, mut in_reasoning) = (None, false);
        for (k, v) in obj {
            match (k.as_str(), v) {
                ("backend", serde_json::Value::String(b)) if b == "xgrammar" => {
                    tracing::info!(
                        "--structured-outputs-config backend xgrammar: using llguidance (xgrammar is not built in)"
                    );
                    backend = Some("guidance".into());
                }
                ("backend", serde_json::Value::String(b)) => {
                    if vllm_engine::GuideBackendKind::from_name(b).is_none() {
                        anyhow::bail!(
                            "--structured-outputs-config: backend '{b}' is not one of {}, xgrammar",
                            vllm_engine::GuideBackendKind::names().collect::<Vec<_>>().join(", ")
                        );
                    }
                    backend = Some(b.clone());
                }
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
    pub fn sampling_defaults(&self, dir: Option<&std::path::Path>) -> Result<protocol::SamplingDefaults> {
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

    /// `--chat-template`: a file's text, or the flag's own.
    pub fn chat_template(&self) -> Result<Option<String>> {
        let Some(t) = &self.chat_template else { return Ok(None) };
        let p = std::path::Path::new(t);
        if p.is_file() {
            return Ok(Some(std::fs::read_to_string(p).with_context(|| format!("reading {t}"))?));
        }
        Ok(Some(t.clone()))
    }

    /// `--shutdown-timeout` as a duration.
    pub fn shutdown_timeout(&self) -> Result<std::time::Duration> {
        std::time::Duration::try_from_secs_f64(self.shutdown_timeout)
            .context("--shutdown-timeout must be a non-negative number of seconds")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    fn parse(args: &[&str]) -> ServeArgs {
        let cli = Cli::try_parse_from(std::iter::once("vllm-server").chain(args.iter().copied())).unwrap();
        match cli.command {
            Some(Command::Serve(c)) => c.into_args(),
            None => cli.serve,
            _ => unreachable!(),
        }
    }

    #[test]
    fn engine_flags_parse_into_engine_args() {
        let a = parse(&["serve", "m.gguf", "--dtype", "BF16", "--kv-cache-memory", "1GiB", "--max-num-seqs", "8"]);
        assert_eq!(a.engine.model, "m.gguf");
        assert_eq!(a.engine.dtype, vllm_engine::ModelDtype::BFloat16);
        assert_eq!(a.engine.kv_cache_memory, 1 << 30);
        assert_eq!(a.engine.max_num_seqs, 8);
        assert!(a.engine.enable_prefix_caching);
        assert!(!parse(&["--no-enable-prefix-caching"]).engine.enable_prefix_caching);
        assert!(parse(&["--no-enable-prefix-caching", "--enable-prefix-caching"]).engine.enable_prefix_caching);
        assert!(!parse(&["--enable-prefix-caching", "--no-enable-prefix-caching"]).engine.enable_prefix_caching);
        let g = parse(&["--guided-decoding-compile-timeout", "2.5", "--guided-decoding-cache", "1MiB"]);
        assert_eq!(g.engine.guided_decoding.compile_timeout, std::time::Duration::from_millis(2500));
        assert_eq!(g.engine.guided_decoding.cache_bytes, 1 << 20);
        // Bad values are refused by the parser, naming the flag.
        for bad in [
            &["--dtype", "int3"][..],
            &["--kv-cache-memory", "lots"],
            &["--guided-decoding-compile-timeout", "nan"],
            &["--guided-decoding-compile-threads", "0"],
            &["--tool-call-parser", "nope"],
        ] {
            let err = Cli::try_parse_from(std::iter::once("vllm-server").chain(bad.iter().copied()))
                .err()
                .unwrap_or_else(|| panic!("{bad:?} parsed"))
                .to_string();
            assert!(err.contains(bad[0]), "{bad:?}: {err}");
        }
    }
}
