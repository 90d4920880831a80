//! The online benchmark (vLLM's `bench serve`): streams `/v1/completions` requests at a
//! Poisson rate to any OpenAI-compatible server and measures TTFT, TPOT, ITL and throughput.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::StreamExt;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use serde_json::{json, Value};

use super::dataset::{summarize, BenchRequest, Summary};

/// What one request saw.
#[derive(Debug, Clone, Default)]
pub struct RequestResult {
    /// Whether it completed.
    pub ok: bool,
    /// Why not.
    pub error: Option<String>,
    /// Prompt tokens.
    pub prompt_len: usize,
    /// Output tokens (the server's usage when reported, else the requested count).
    pub output_len: usize,
    /// Seconds from sending to the first text.
    pub ttft: f64,
    /// Seconds between successive text chunks.
    pub itl: Vec<f64>,
    /// Seconds from sending to the end.
    pub latency: f64,
}

/// A run's figures, named as vLLM's `bench serve` JSON.
#[derive(Debug, Clone, Serialize)]
pub struct ServeReport {
    /// The engine's label.
    pub engine: String,
    /// Requests per second asked for (`inf` as `f64::INFINITY` is written as null).
    pub request_rate: Option<f64>,
    /// Most requests in flight.
    pub max_concurrency: Option<usize>,
    /// Completed requests.
    pub completed: usize,
    /// Failed requests.
    pub failed: usize,
    /// First failure, if any.
    pub first_error: Option<String>,
    /// Wall time of the run.
    pub duration: f64,
    /// Prompt tokens sent.
    pub total_input_tokens: usize,
    /// Output tokens received.
    pub total_output_tokens: usize,
    /// Completed requests per second.
    pub request_throughput: f64,
    /// Output tokens per second.
    pub output_throughput: f64,
    /// Prompt + output tokens per second.
    pub total_token_throughput: f64,
    /// Time to first token, milliseconds.
    pub ttft_ms: Summary,
    /// Time per output token after the first, milliseconds.
    pub tpot_ms: Summary,
    /// Inter-token latency, milliseconds.
    pub itl_ms: Summary,
    /// End-to-end latency, milliseconds.
    pub e2el_ms: Summary,
    /// Every TTFT, for the distribution plots (milliseconds).
    #[serde(skip)]
    pub ttfts: Vec<f64>,
    /// Every ITL (milliseconds).
    #[serde(skip)]
    pub itls: Vec<f64>,
}

/// How to drive the server.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// e.g. `http://127.0.0.1:8000`.
    pub base_url: String,
    /// `model` field of the requests (left out when `None`: the server's default).
    pub model: Option<String>,
    /// Requests per second (None: all at once).
    pub request_rate: Option<f64>,
    /// Most requests in flight.
    pub max_concurrency: Option<usize>,
    /// Seed of the arrival process.
    pub seed: u64,
    /// Bearer token.
    pub api_key: Option<String>,
    /// Per-request time limit.
    pub timeout: Duration,
}

fn body(model: Option<&str>, r: &BenchRequest) -> Value {
    let mut v = json!({
        "prompt": r.prompt, "max_tokens": r.output_len, "temperature": 0.0,
        "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true},
        // llama-server would otherwise reuse the KV of a previous prompt between runs.
        "cache_prompt": false,
    });
    if let Some(m) = model {
        v["model"] = json!(m);
    }
    v
}

/// Sends one streamed request and times it.
pub async fn one(client: &reqwest::Client, cfg: &ServeConfig, r: &BenchRequest) -> RequestResult {
    let mut out = RequestResult { prompt_len: r.prompt.len(), ..Default::default() };
    let start = Instant::now();
    let mut req = client.post(format!("{}/v1/completions", cfg.base_url)).json(&body(cfg.model.as_deref(), r));
    if let Some(k) = &cfg.api_key {
        req = req.bearer_auth(k);
    }
    let resp = match req.send().await {
        Ok(r) if r.status().is_success() => r,
        Ok(r) => {
            let status = r.status();
            out.error = Some(format!("HTTP {status}: {}", r.text().await.unwrap_or_default()));
            return out;
        }
        Err(e) => {
            out.error = Some(e.to_string());
            return out;
        }
    };
    let mut stream = resp.bytes_stream();
    let mut buf = String::new();
    let mut last = start;
    let mut first = true;
    let mut usage = None;
    let mut chunks_with_text = 0usize;
    while let Some(piece) = stream.next().await {
        let piece = match piece {
            Ok(p) => p,
            Err(e) => {
                out.error = Some(e.to_string());
                return out;
            }
        };
        buf.push_str(&String::from_utf8_lossy(&piece));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            for line in event.lines() {
                let Some(data) = line.strip_prefix("data:").map(str::trim) else { continue };
                if data == "[DONE]" {
                    continue;
                }
                let Ok(v) = serde_json::from_str::<Value>(data) else { continue };
                if let Some(e) = v.get("error") {
                    out.error = Some(e.to_string());
                    return out;
                }
                if let Some(n) = v.pointer("/usage/completion_tokens").and_then(Value::as_u64) {
                    usage = Some(n as usize);
                }
                let text = v.pointer("/choices/0/text").and_then(Value::as_str).unwrap_or("");
                if !text.is_empty() {
                    let now = Instant::now();
                    if first {
                        out.ttft = (now - start).as_secs_f64();
                        first = false;
                    } else {
                        out.itl.push((now - last).as_secs_f64());
                    }
                    last = now;
                    chunks_with_text += 1;
                }
            }
        }
    }
    out.latency = start.elapsed().as_secs_f64();
    out.output_len = usage.unwrap_or(r.output_len.max(chunks_with_text));
    out.ok = !first;
    if !out.ok {
        out.error = Some("the stream ended without any text".into());
    }
    out
}

/// Runs every request against the server; returns the report.
pub async fn run(engine: &str, cfg: &ServeConfig, requests: &[BenchRequest]) -> Result<ServeReport> {
    // A fresh connection per request: llama-server closes idle keep-alive connections, and a
    // reused dead connection would count as a failed request.
    let client =
        reqwest::Client::builder().timeout(cfg.timeout).pool_max_idle_per_host(0).build().context("HTTP client")?;
    let sem = cfg.max_concurrency.map(|c| Arc::new(tokio::sync::Semaphore::new(c)));
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let start = Instant::now();
    let mut at = 0.0f64;
    let mut tasks = Vec::with_capacity(requests.len());
    for r in requests {
        let (client, task_cfg, r, sem) = (client.clone(), cfg.clone(), r.clone(), sem.clone());
        let delay = Duration::from_secs_f64(at);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(tokio::time::Instant::from_std(start + delay)).await;
            let _permit = match &sem {
                Some(s) => Some(s.clone().acquire_owned().await.expect("semaphore is never closed")),
                None => None,
            };
            one(&client, &task_cfg, &r).await
        }));
        if let Some(rate) = cfg.request_rate {
            // Poisson process: exponential gaps with mean 1 / rate.
            let u: f64 = rng.random::<f64>().max(1e-12);
            at += -u.ln() / rate;
        }
    }
    let mut results = Vec::with_capacity(tasks.len());
    for t in tasks {
        results.push(t.await.context("benchmark task")?);
    }
    let duration = start.elapsed().as_secs_f64();
    Ok(report(engine, cfg, &results, duration))
}

fn report(engine: &str, cfg: &ServeConfig, results: &[RequestResult], duration: f64) -> ServeReport {
    let ok: Vec<&RequestResult> = results.iter().filter(|r| r.ok).collect();
    let input: usize = ok.iter().map(|r| r.prompt_len).sum();
    let output: usize = ok.iter().map(|r| r.output_len).sum();
    let ms = |v: f64| v * 1000.0;
    let mut ttfts: Vec<f64> = ok.iter().map(|r| ms(r.ttft)).collect();
    let mut itls: Vec<f64> = ok.iter().flat_map(|r| r.itl.iter().map(|&x| ms(x))).collect();
    let mut tpots: Vec<f64> =
        ok.iter().filter(|r| r.output_len > 1).map(|r| ms((r.latency - r.ttft) / (r.output_len - 1) as f64)).collect();
    let mut e2el: Vec<f64> = ok.iter().map(|r| ms(r.latency)).collect();
    let ttft_ms = summarize(&mut ttfts);
    let itl_ms = summarize(&mut itls);
    ServeReport {
        engine: engine.to_string(),
        request_rate: cfg.request_rate,
        max_concurrency: cfg.max_concurrency,
        completed: ok.len(),
        failed: results.len() - ok.len(),
        first_error: results.iter().find_map(|r| r.error.clone()),
        duration,
        total_input_tokens: input,
        total_output_tokens: output,
        request_throughput: ok.len() as f64 / duration,
        output_throughput: output as f64 / duration,
        total_token_throughput: (input + output) as f64 / duration,
        ttft_ms,
        tpot_ms: summarize(&mut tpots),
        itl_ms,
        e2el_ms: summarize(&mut e2el),
        ttfts,
        itls,
    }
}

/// vLLM-style printout of one run.
pub fn print(r: &ServeReport) {
    let line = |k: &str, v: String| println!("{k:<40}{v:>12}");
    println!("{:=^52}", format!(" Serving Benchmark Result: {} ", r.engine));
    line("Successful requests:", r.completed.to_string());
    line("Failed requests:", r.failed.to_string());
    if let Some(c) = r.max_concurrency {
        line("Maximum request concurrency:", c.to_string());
    }
    line("Benchmark duration (s):", format!("{:.2}", r.duration));
    line("Total input tokens:", r.total_input_tokens.to_string());
    line("Total generated tokens:", r.total_output_tokens.to_string());
    line("Request throughput (req/s):", format!("{:.2}", r.request_throughput));
    line("Output token throughput (tok/s):", format!("{:.2}", r.output_throughput));
    line("Total Token throughput (tok/s):", format!("{:.2}", r.total_token_throughput));
    for (name, s) in [("TTFT", r.ttft_ms), ("TPOT", r.tpot_ms), ("ITL", r.itl_ms)] {
        line(&format!("Mean {name} (ms):"), format!("{:.2}", s.mean));
        line(&format!("Median {name} (ms):"), format!("{:.2}", s.median));
        line(&format!("P99 {name} (ms):"), format!("{:.2}", s.p99));
    }
    if let Some(e) = &r.first_error {
        println!("first error: {e}");
    }
    println!("{}", "=".repeat(52));
}
