//! `cargo xtask bench stall`: does anything one client does hold everyone else back?
//!
//! Measures the time to first token of short streamed requests on an idle server, then while
//! (a) a long prompt prefills, (b) hostile constraints compile, (c) eight clients stop reading
//! their streams; and the server's resident memory after many distinct regex constraints and
//! under the unread streams. Each scenario's p99 is compared with the idle one.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::{json, Value};

use super::dataset::BenchRequest;
use super::peer;
use super::serve::{one, ServeConfig};

/// `bench stall`.
#[derive(Args)]
pub struct StallArgs {
    /// Short requests measured per scenario.
    #[arg(long, default_value_t = 30)]
    num_short: usize,
    /// Prompt tokens of the long prompt in scenario (a).
    #[arg(long, default_value_t = 8000)]
    long_prompt: usize,
    /// Distinct regex constraints sent for the memory figure.
    #[arg(long, default_value_t = 1000)]
    num_regex: usize,
    /// Extra flags for our server.
    #[arg(long, default_value = "--kv-cache-memory 1GiB", allow_hyphen_values = true)]
    server_args: String,
    /// Threads for the engine.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Model file (default: the SmolLM2 Q4_1 GGUF).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Write the results here.
    #[arg(long)]
    output_json: Option<PathBuf>,
}

/// Nearest-rank percentile of `v` (milliseconds).
fn pct(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    s[rank.min(s.len()) - 1]
}

/// The first CPU's model name.
pub fn cpu_model() -> String {
    cpuinfo_field(&std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default(), "model name")
        .unwrap_or_else(|| "unknown".into())
}

/// The first value of `name` in `/proc/cpuinfo`'s text.
fn cpuinfo_field(info: &str, name: &str) -> Option<String> {
    info.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == name).then(|| v.trim().to_string())
    })
}

/// What a report needs to say which CPU it ran on: the model name (a VM often shows only
/// "Intel(R) Xeon(R) Processor"), vendor, family / model / stepping, the SIMD extensions our
/// kernels and llama.cpp's choose between, the last-level cache and the logical CPUs.
pub fn cpu_details() -> serde_json::Value {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| cpuinfo_field(&info, name).unwrap_or_default();
    let flags = field("flags");
    let isa: Vec<&str> = flags
        .split_whitespace()
        .filter(|f| {
            matches!(*f, "avx2" | "fma" | "f16c" | "avx512f" | "avx512bw" | "avx512vl" | "avx512_vnni" | "avx_vnni")
                || f.starts_with("avx512_bf16")
                || f.starts_with("avx512_fp16")
                || f.starts_with("amx")
        })
        .collect();
    let l3 = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/cache/index3/size")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    serde_json::json!({
        "model_name": field("model name"), "vendor": field("vendor_id"), "family": field("cpu family"),
        "model": field("model"), "stepping": field("stepping"), "isa": isa, "l3": l3,
        "logical_cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
    })
}

fn rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmRSS:")
}

/// A memory figure of a process's `/proc/<pid>/status` (`VmRSS:`, `VmHWM:`, ...) in MiB.
pub fn status_mib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// `n` short streamed requests, one every 150 ms; their TTFTs in milliseconds.
async fn shorts(cfg: &ServeConfig, n: usize, salt: u32) -> Vec<f64> {
    let client = reqwest::Client::new();
    let mut out = Vec::with_capacity(n);
    for i in 0..n as u32 {
        // Distinct prompts, so no request is served from the prefix cache.
        let prompt: Vec<u32> = (0..16).map(|k| 1000 + (salt * 7919 + i * 131 + k * 17) % 40_000).collect();
        let r = one(&client, cfg, &BenchRequest { prompt, output_len: 4 }).await;
        if r.ok {
            out.push(r.ttft * 1e3);
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    out
}

async fn post(client: &reqwest::Client, base: &str, body: Value) -> Result<Value> {
    Ok(client.post(format!("{base}/v1/completions")).json(&body).send().await?.json().await?)
}

/// Waits until the server runs and queues nothing (what a scenario left behind is aborted
/// once its client went away, at the server's next step).
async fn wait_idle(client: &reqwest::Client, base: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while std::time::Instant::now() < deadline {
        let text = match client.get(format!("{base}/metrics")).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        let busy = text.lines().any(|l| {
            (l.starts_with("vllm:num_requests_running ") || l.starts_with("vllm:num_requests_waiting "))
                && !l.ends_with(" 0")
        });
        if !busy {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `load` in a loop in the background while `n` short requests are measured.
async fn under<F, Fut>(cfg: &ServeConfig, n: usize, salt: u32, load: F) -> (Vec<f64>, usize)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicUsize::new(0));
    let (s, c) = (stop.clone(), count.clone());
    let bg = tokio::spawn(async move {
        while !s.load(Ordering::Relaxed) {
            load(c.fetch_add(1, Ordering::Relaxed)).await;
        }
    });
    // Let the load get going first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = shorts(cfg, n, salt).await;
    stop.store(true, Ordering::Relaxed);
    bg.abort();
    (t, count.load(Ordering::Relaxed))
}

/// Writes all of `buf` (tokio's `io-util` is not needed for this one use).
async fn write_all(s: &tokio::net::TcpStream, buf: &[u8]) -> std::io::Result<()> {
    let mut off = 0;
    while off < buf.len() {
        s.writable().await?;
        match s.try_write(&buf[off..]) {
            Ok(n) => off += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Opens a streaming request with a tiny receive window and never reads it.
async fn unread_stream(port: u16) -> Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    let s = socket.connect(([127, 0, 0, 1], port).into()).await?;
    let body = json!({"prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": true, "stream": true,
                      "logprobs": 20, "temperature": 1.0})
    .to_string();
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    write_all(&s, req.as_bytes()).await?;
    Ok(s)
}

pub fn run(a: StallArgs) -> Result<()> {
    let model = match &a.model {
        Some(m) => m.clone(),
        None => vllm_engine::fetch_default_from_pypi().map_err(anyhow::Error::msg)?,
    };
    let cpu = cpu_model();
    let rt = tokio::runtime::Runtime::new()?;
    let extra: Vec<String> = a.server_args.split_whitespace().map(String::from).collect();
    let report = rt.block_on(async {
        let server =
            peer::start(&peer::Engine::Ours { extra: extra.clone() }, &model, a.threads, Duration::from_secs(300)).await?;
        let base = server.base_url.clone();
        let port: u16 = base.rsplit(':').next().and_then(|p| p.parse().ok()).context("server port")?;
        let pid = server.pid();
        let cfg = ServeConfig {
            base_url: base.clone(),
            model: None,
            request_rate: None,
            max_concurrency: None,
            seed: 0,
            api_key: None,
            timeout: Duration::from_secs(600),
        };
        let client = reqwest::Client::new();
        let rss_start = rss_mib(pid);
        eprintln!("xtask bench stall: warm-up");
        shorts(&cfg, 5, 999).await;

        eprintln!("xtask bench stall: idle ({} short requests)", a.num_short);
        let idle = shorts(&cfg, a.num_short, 1).await;

        eprintln!("xtask bench stall: (a) while {}-token prompts prefill", a.long_prompt);
        let (c, b, n) = (client.clone(), base.clone(), a.long_prompt);
        let (prefill, long_done) = under(&cfg, a.num_short, 2, move |i| {
            let (c, b) = (c.clone(), b.clone());
            async move {
                let prompt: Vec<u32> = (0..n as u32).map(|k| 1000 + (k * 7 + i as u32 * 13) % 40_000).collect();
                let _ = post(&c, &b, json!({"prompt": prompt, "max_tokens": 1})).await;
            }
        })
        .await;

        wait_idle(&client, &base).await;
        eprintln!("xtask bench stall: (b) while hostile constraints compile");
        let (c, b) = (client.clone(), base.clone());
        let (compile, compiles) = under(&cfg, a.num_short, 3, move |i| {
            let (c, b) = (c.clone(), b.clone());
            async move {
                // Distinct each time, so nothing comes from the compile cache.
                let body = match i % 3 {
                    0 => {
                        let mut nested = json!({"type": "integer", "description": format!("v{i}")});
                        for _ in 0..60 {
                            nested = json!({"type": "array", "items": nested});
                        }
                        json!({"guided_json": nested})
                    }
                    1 => {
                        let props: serde_json::Map<String, Value> =
                            (0..1000).map(|k| (format!("p{i}_{k}"), json!({"type": "integer"}))).collect();
                        json!({"guided_json": {"type": "object", "properties": props}})
                    }
                    _ => json!({"guided_regex": format!("[0-9a-f]{{1,{}}}", 200 + i), "guided_decoding_backend": "outlines"}),
                };
                let mut body = body;
                body["prompt"] = json!("Output:");
                body["max_tokens"] = json!(2);
                let _ = post(&c, &b, body).await;
            }
        })
        .await;

        wait_idle(&client, &base).await;
        eprintln!("xtask bench stall: memory after {} distinct regex constraints", a.num_regex);
        let rss_before_regex = rss_mib(pid);
        for i in 0..a.num_regex {
            let body = json!({"prompt": "Code:", "max_tokens": 1, "guided_regex": format!("[a-z]{{1,{}}}x", 10 + i)});
            post(&client, &base, body).await?;
        }
        let rss_after_regex = rss_mib(pid);

        eprintln!("xtask bench stall: (c) while 8 clients stop reading their streams");
        let mut sockets = Vec::new();
        for _ in 0..8 {
            sockets.push(unread_stream(port).await?);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let unread = shorts(&cfg, a.num_short, 4).await;
        let rss_unread = rss_mib(pid);
        drop(sockets);

        let scen = |name: &str, t: &[f64], extra: Value| {
            json!({"scenario": name, "ttft_p50_ms": pct(t, 50.0), "ttft_p99_ms": pct(t, 99.0),
                   "p99_vs_idle": pct(t, 99.0) / pct(&idle, 99.0), "samples": t.len(), "load": extra})
        };
        anyhow::Ok(json!({
            "cpu": cpu, "threads": a.threads, "server_args": a.server_args,
            "scenarios": [
                scen("idle", &idle, json!(null)),
                scen("long prefill", &prefill, json!({"long_prompts_sent": long_done, "prompt_tokens": a.long_prompt})),
                scen("hostile constraints", &compile, json!({"constraints_sent": compiles})),
                scen("8 unread streams", &unread, json!(null)),
            ],
            // The KV cache's pages are touched lazily as requests use new blocks; scenario (a)
            // cycles through all of them, so "before_regex" is the baseline for constraints.
            "rss_mib": {"start": rss_start, "before_regex": rss_before_regex, "after_regex": rss_after_regex,
                        "regex_ratio": rss_after_regex / rss_before_regex, "num_regex": a.num_regex,
                        "with_8_unread_streams": rss_unread},
        }))
    })?;
    println!("\nbench stall on {} ({} threads, server {})", report["cpu"], a.threads, a.server_args);
    println!("{:<22}{:>14}{:>14}{:>14}", "scenario", "TTFT p50 ms", "TTFT p99 ms", "p99 / idle");
    for s in report["scenarios"].as_array().into_iter().flatten() {
        println!(
            "{:<22}{:>14.1}{:>14.1}{:>14.2}",
            s["scenario"].as_str().unwrap_or_default(),
            s["ttft_p50_ms"].as_f64().unwrap_or(f64::NAN),
            s["ttft_p99_ms"].as_f64().unwrap_or(f64::NAN),
            s["p99_vs_idle"].as_f64().unwrap_or(f64::NAN)
        );
    }
    let m = &report["rss_mib"];
    println!(
        "RSS MiB: start {:.0} (KV cache untouched), before the regexes {:.0}, after {} distinct regexes {:.0} ({:.2}x), \
         with 8 unread streams {:.0}",
        m["start"].as_f64().unwrap_or(f64::NAN),
        m["before_regex"].as_f64().unwrap_or(f64::NAN),
        a.num_regex,
        m["after_regex"].as_f64().unwrap_or(f64::NAN),
        m["regex_ratio"].as_f64().unwrap_or(f64::NAN),
        m["with_8_unread_streams"].as_f64().unwrap_or(f64::NAN)
    );
    super::write_json(&a.output_json, &report)
}
