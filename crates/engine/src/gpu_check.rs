//! The GPU acceptance run in one command (`vllm-server gpu-check`, which
//! `scripts/gpu_acceptance.sh` runs on the GPU machine): every kernel against the naive
//! reference, the fixtures through the whole engine on the device against `transformers`,
//! the engine features a GPU changes (parallel samples, prefix caching, chunked prefill, CUDA
//! graphs against eager steps, sampling on the device), and a throughput run. With
//! `--device cpu` every step runs on the CPU, so the command is rehearsed without a GPU.
//!
//! Each check prints one `PASS`/`FAIL` line as it finishes; the report (checks and figures)
//! is also returned for a JSON file.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use vllm_kernels::{check, AttnShape, KvCache, CUDA_HEAD_SIZES};

use crate::{EngineArgs, ModelDtype, Prompt, RequestOutput, Result, SamplingParams, LLM};

/// What to run.
#[derive(Debug, Clone)]
pub struct GpuCheckOptions {
    /// `cuda` (or `cpu` to rehearse).
    pub device: String,
    /// The fixtures folder (`fixtures/models` of the source tree).
    pub fixtures: PathBuf,
    /// A model folder (config.json + safetensors, no tokenizer needed) for the throughput run.
    pub bench_model: Option<PathBuf>,
    /// Prompts in the throughput run.
    pub bench_prompts: usize,
    /// Prompt and output tokens of each.
    pub bench_len: (usize, usize),
    /// Only these groups (kernels, fixtures, engine, bench); all when empty.
    pub only: Vec<String>,
}

/// One check's result.
#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    /// What was checked.
    pub name: String,
    /// Whether it passed.
    pub pass: bool,
    /// Figures and, on failure, why.
    pub detail: String,
}

/// Everything the run found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GpuCheckReport {
    /// The device, in words.
    pub device: String,
    /// Every check in order.
    pub checks: Vec<CheckResult>,
    /// Throughput figures, if the run had a model for them.
    pub bench: Option<serde_json::Value>,
}

impl GpuCheckReport {
    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.pass)
    }

    fn record(&mut self, name: impl Into<String>, outcome: std::result::Result<String, String>) {
        let name = name.into();
        let (pass, detail) = match outcome {
            Ok(d) => (true, d),
            Err(d) => (false, d),
        };
        println!("{} {name}: {detail}", if pass { "PASS" } else { "FAIL" });
        self.checks.push(CheckResult { name, pass, detail });
    }
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Runs the acceptance checks.
pub fn run(opts: &GpuCheckOptions) -> Result<GpuCheckReport> {
    let dev = crate::config::device(&opts.device)?;
    let mut report = GpuCheckReport { device: format!("{:?}", dev.location()), ..Default::default() };
    let want = |g: &str| opts.only.is_empty() || opts.only.iter().any(|o| o == g);
    if want("kernels") {
        kernels(&dev, &mut report);
    }
    if want("fixtures") {
        fixtures(opts, &mut report);
    }
    if want("engine") {
        engine(opts, &mut report);
    }
    if want("bench") {
        if let Some(model) = &opts.bench_model {
            bench(opts, model, &dev, &mut report);
        }
    }
    let failed = report.checks.iter().filter(|c| !c.pass).count();
    println!("gpu-check: {} checks, {failed} failed, on {}", report.checks.len(), report.device);
    Ok(report)
}

/// Paged attention in every cache type and head size against the naive reference; block
/// copies and the sampler against the CPU.
fn kernels(dev: &Device, report: &mut GpuCheckReport) {
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let tol = check::tolerance(dtype);
        let mut cases: Vec<(String, check::Case, u64)> = vec![
            ("gqa mixed prefill/decode".into(), check::gqa_mixed_case(), 2),
            ("head size 128, 301-token context".into(), check::head_dim_128_case(), 5),
        ];
        for (i, c) in check::window_and_softcap_cases().into_iter().enumerate() {
            cases.push((
                format!("window {:?} softcap {:?}", c.params.sliding_window, c.params.softcap),
                c,
                4 + i as u64,
            ));
        }
        for &d in CUDA_HEAD_SIZES {
            cases.push((format!("head size {d}"), check::head_size_case(d), 6));
        }
        for (name, case, seed) in cases {
            let outcome = check::max_error(&case, seed, dev, dtype).map_err(err).and_then(|e| {
                let line = format!("max abs error {e:.2e} (tolerance {tol:.0e})");
                if e < tol {
                    Ok(line)
                } else {
                    Err(line)
                }
            });
            report.record(format!("attention {dtype:?} {name}"), outcome);
        }
    }
    report.record("copy_blocks (chained copies)", copy_blocks(dev).map_err(err));
    report.record("sampling on the device", sampling(dev).map_err(err));
}

/// Random K/V in a device cache and a CPU cache, the same chained block copies on both, then
/// every value compared.
fn copy_blocks(dev: &Device) -> candle_core::Result<String> {
    let shape = AttnShape { num_heads: 4, num_kv_heads: 2, head_dim: 64 };
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let vals: Vec<f32> = (0..8 * 2 * 64 * 16).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let pairs = [(0u32, 1u32), (1, 2), (3, 4), (5, 3), (6, 7)];
    let mut out = Vec::new();
    for d in [dev, &Device::Cpu] {
        let cache = KvCache::with_dtype(8, 16, shape, DType::BF16, d)?;
        let key = Tensor::from_slice(&vals, cache.key.shape(), &Device::Cpu)?.to_dtype(DType::BF16)?.to_device(d)?;
        let value =
            Tensor::from_slice(&vals, cache.value.shape(), &Device::Cpu)?.to_dtype(DType::BF16)?.to_device(d)?;
        cache.key.slice_set(&key, 0, 0)?;
        cache.value.slice_set(&value, 0, 0)?;
        cache.copy_blocks(&pairs)?;
        let k = cache.key.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let v = cache.value.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        out.push((k, v));
    }
    if out[0] != out[1] {
        candle_core::bail!("the device's cache differs from the CPU's after the same copies");
    }
    Ok(format!("{} copies in {} rounds, identical to the CPU", pairs.len(), vllm_kernels::copy_rounds(&pairs).len()))
}

/// Greedy rows exactly the CPU's; sampled rows the CPU's but for float rounding at the edges.
fn sampling(dev: &Device) -> candle_core::Result<String> {
    use vllm_kernels::sample::{sample_row, sample_rows, RowParams};
    let (rows, vocab) = (256usize, 32000usize);
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let logits: Vec<f32> = (0..rows * vocab).map(|_| rng.random_range(-8.0f32..8.0)).collect();
    let params: Vec<RowParams> = (0..rows)
        .map(|i| RowParams {
            temperature: [0.0, 0.7, 1.0, 1.5][i % 4],
            top_k: [0, 1, 50, 1000][(i / 4) % 4],
            top_p: [1.0, 0.9, 0.5][(i / 16) % 3],
            u: rng.random_range(0.0f32..1.0),
        })
        .collect();
    let t = Tensor::from_slice(&logits, (rows, vocab), &Device::Cpu)?.to_device(dev)?;
    let t0 = Instant::now();
    let got = sample_rows(&t, &params)?;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut same = 0;
    for (r, p) in params.iter().enumerate() {
        let want = sample_row(&logits[r * vocab..(r + 1) * vocab], *p);
        if p.temperature == 0.0 && got[r] != want {
            candle_core::bail!("greedy row {r}: {} on the device, {want} on the CPU", got[r]);
        }
        same += usize::from(got[r] == want);
    }
    if same * 100 < rows * 97 {
        candle_core::bail!("only {same} of {rows} rows drew the CPU's token");
    }
    Ok(format!("{same}/{rows} rows equal to the CPU's draw (greedy all), {rows} x {vocab} in {ms:.1} ms"))
}

/// A fixture folder as a model the engine loads: its config and weights, and a word-level
/// tokenizer over its vocabulary (the fixtures are token-id models).
fn fixture_model(src: &Path, vocab: usize, into: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(into)?;
    for f in ["config.json", "model.safetensors", "generation_config.json"] {
        if src.join(f).exists() && !into.join(f).exists() {
            std::os::unix::fs::symlink(std::fs::canonicalize(src.join(f))?, into.join(f))?;
        }
    }
    let tok = into.join("tokenizer.json");
    if !tok.exists() {
        let vocab: serde_json::Map<String, serde_json::Value> =
            (0..vocab).map(|i| (format!("t{i}"), serde_json::Value::from(i))).collect();
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": null,
            "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}
        });
        std::fs::write(tok, json.to_string())?;
    }
    Ok(())
}

fn vocab_of(dir: &Path) -> Option<usize> {
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).ok()?).ok()?;
    cfg.get("vocab_size")
        .or_else(|| cfg.get("text_config").and_then(|t| t.get("vocab_size")))?
        .as_u64()
        .map(|v| v as usize)
}

fn log_softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f32>().ln();
    row.iter().map(|v| v - lse).collect()
}

fn engine_on(opts: &GpuCheckOptions, model: &Path, f: impl FnOnce(&mut EngineArgs)) -> Result<LLM> {
    let mut args = EngineArgs::new(model.to_string_lossy());
    args.device = opts.device.clone();
    args.kv_cache_memory = 64 << 20;
    args.gpu_memory_utilization = 0.3;
    f(&mut args);
    let mut llm = LLM::new(args)?;
    llm.set_use_tqdm(false);
    Ok(llm)
}

fn token_ids(out: &[RequestOutput]) -> Vec<Vec<u32>> {
    out.iter().flat_map(|o| o.outputs.iter().map(|c| c.token_ids.clone())).collect()
}

/// Every fixture through the engine on the device: float32 greedy continuations equal to
/// transformers' and first-token log probabilities within 1e-3; bfloat16 within 0.15; CUDA
/// graphs against eager steps identical.
fn fixtures(opts: &GpuCheckOptions, report: &mut GpuCheckReport) {
    let tmp = std::env::temp_dir().join(format!("vllm-rs-gpu-check-{}", std::process::id()));
    let mut names: Vec<PathBuf> = std::fs::read_dir(&opts.fixtures)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.join("reference.json").exists()).collect())
        .unwrap_or_default();
    names.sort();
    if names.is_empty() {
        report.record("fixtures", Err(format!("no fixtures under {}", opts.fixtures.display())));
    }
    for src in names {
        let name = src.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let outcome = (|| -> std::result::Result<String, String> {
            let reference: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(src.join("reference.json")).map_err(err)?)
                    .map_err(err)?;
            let vocab = vocab_of(&src).ok_or("no vocab_size in config.json")?;
            let dir = tmp.join(&name);
            fixture_model(&src, vocab, &dir).map_err(err)?;
            let cases = reference["cases"].as_array().ok_or("no cases")?;
            let prompts: Vec<Prompt> = cases
                .iter()
                .map(|c| {
                    Prompt::TokenIds(
                        c["prompt"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|v| v.as_u64())
                            .map(|v| v as u32)
                            .collect(),
                    )
                })
                .collect();
            let greedy: Vec<Vec<u32>> = cases
                .iter()
                .map(|c| {
                    c["greedy"].as_array().into_iter().flatten().filter_map(|v| v.as_u64()).map(|v| v as u32).collect()
                })
                .collect();
            let first: Vec<Vec<f32>> = cases
                .iter()
                .map(|c| {
                    let rows = c["logits"].as_array().cloned().unwrap_or_default();
                    let last = rows.last().and_then(|r| r.as_array().cloned()).unwrap_or_default();
                    log_softmax(&last.iter().filter_map(|v| v.as_f64()).map(|v| v as f32).collect::<Vec<_>>())
                })
                .collect();
            let mut line = Vec::new();
            for (dtype, tol) in [(ModelDtype::Float32, 1e-3f32), (ModelDtype::BFloat16, 0.15)] {
                let llm = engine_on(opts, &dir, |a| a.dtype = dtype).map_err(err)?;
                let p = SamplingParams { ignore_eos: true, logprobs: Some(5), ..SamplingParams::greedy(16) };
                let out = llm.generate(prompts.clone(), p).map_err(err)?;
                let mut lp_err = 0f32;
                let mut equal = 0;
                for ((o, want), reference) in out.iter().zip(&greedy).zip(&first) {
                    let c = &o.outputs[0];
                    equal += usize::from(&c.token_ids == want);
                    if let Some(pos) = c.logprobs.as_ref().and_then(|l| l.first()) {
                        for l in std::iter::once(&pos.sampled).chain(&pos.top) {
                            lp_err = lp_err.max((l.logprob - reference[l.token_id as usize]).abs());
                        }
                    }
                }
                if lp_err > tol || (dtype == ModelDtype::Float32 && equal != greedy.len()) {
                    return Err(format!(
                        "{dtype:?}: {equal}/{} greedy continuations equal, first-token logprob error {lp_err:.2e}",
                        greedy.len()
                    ));
                }
                line.push(format!("{dtype:?} {equal}/{} greedy equal, logprob error {lp_err:.1e}", greedy.len()));
            }
            // Sampling on the device and fixed-shape (graph) decode steps against eager host
            // sampling: the same greedy tokens.
            let p = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(16) };
            let graphs = engine_on(opts, &dir, |a| {
                a.dtype = ModelDtype::Float32;
                a.cuda_graphs = Some(true);
                a.device_sampling = Some(true);
            })
            .map_err(err)?;
            let eager = engine_on(opts, &dir, |a| {
                a.dtype = ModelDtype::Float32;
                a.enforce_eager = true;
                a.cuda_graphs = Some(false);
                a.device_sampling = Some(false);
            })
            .map_err(err)?;
            let (a, b) = (
                token_ids(&graphs.generate(prompts.clone(), p.clone()).map_err(err)?),
                token_ids(&eager.generate(prompts.clone(), p).map_err(err)?),
            );
            let stats = graphs.with_engine(|e| e.stats());
            if a != b {
                return Err("graph steps with device sampling differ from eager steps".into());
            }
            line.push(format!(
                "graphs = eager ({} graph steps, {} tokens sampled on the device)",
                stats.num_graph_steps, stats.num_device_sampled_tokens
            ));
            Ok(line.join("; "))
        })();
        report.record(format!("fixture {name}"), outcome);
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

/// Parallel samples, prefix caching and chunked prefill on the device (the llama fixture).
fn engine(opts: &GpuCheckOptions, report: &mut GpuCheckReport) {
    let tmp = std::env::temp_dir().join(format!("vllm-rs-gpu-engine-{}", std::process::id()));
    let dir = tmp.join("llama");
    if let Err(e) = fixture_model(&opts.fixtures.join("llama"), 256, &dir) {
        report.record("engine", Err(err(e)));
        return;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut ids = |n: usize| Prompt::TokenIds((0..n).map(|_| rng.random_range(3u32..256)).collect());
    let prompts: Vec<Prompt> = (0..4).map(|_| ids(40)).collect();
    let long = ids(110);

    let outcome = (|| -> std::result::Result<String, String> {
        let llm = engine_on(opts, &dir, |_| {}).map_err(err)?;
        let p = SamplingParams {
            n: 2,
            seed: Some(9),
            temperature: 0.8,
            ignore_eos: true,
            max_tokens: Some(16),
            ..Default::default()
        };
        let out = llm.generate(prompts.clone(), p).map_err(err)?;
        let two = out.iter().all(|o| o.outputs.len() == 2 && o.outputs.iter().all(|c| c.token_ids.len() == 16));
        let differ = out.iter().any(|o| o.outputs[0].token_ids != o.outputs[1].token_ids);
        let s = llm.with_engine(|e| e.stats());
        if !two || !differ || s.num_free_blocks != s.num_blocks {
            return Err(format!(
                "two samples each: {two}, independent: {differ}, blocks back: {}",
                s.num_free_blocks == s.num_blocks
            ));
        }
        Ok("n = 2: two independent 16-token samples per prompt, every block freed".into())
    })();
    report.record("LLM::generate n = 2 (copy-on-write blocks)", outcome);

    let outcome = (|| -> std::result::Result<String, String> {
        let llm = engine_on(opts, &dir, |_| {}).map_err(err)?;
        let p = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(8) };
        let first = token_ids(&llm.generate(prompts.clone(), p.clone()).map_err(err)?);
        let before = llm.with_engine(|e| e.stats().prefix_cache_hits);
        let again = token_ids(&llm.generate(prompts.clone(), p).map_err(err)?);
        let hits = llm.with_engine(|e| e.stats().prefix_cache_hits) - before;
        if first != again || hits == 0 {
            return Err(format!("same tokens: {}, prefix hits: {hits}", first == again));
        }
        Ok(format!("{hits} prompt tokens served from the cache, same tokens"))
    })();
    report.record("prefix caching", outcome);

    let outcome = (|| -> std::result::Result<String, String> {
        let p = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(8) };
        let whole = engine_on(opts, &dir, |a| a.dtype = ModelDtype::Float32).map_err(err)?;
        let chunked = engine_on(opts, &dir, |a| {
            a.dtype = ModelDtype::Float32;
            a.max_num_batched_tokens = Some(32);
            a.long_prefill_token_threshold = Some(16);
        })
        .map_err(err)?;
        let a = token_ids(&whole.generate([long.clone()], p.clone()).map_err(err)?);
        let b = token_ids(&chunked.generate([long.clone()], p).map_err(err)?);
        if a != b {
            return Err(format!("{a:?} whole, {b:?} in 16-token chunks"));
        }
        Ok("a 110-token prompt in 16-token chunks gives the whole prompt's tokens".into())
    })();
    report.record("chunked prefill", outcome);
    let _ = std::fs::remove_dir_all(&tmp);
}

/// Offline throughput on a model folder: `bench_prompts` random prompts, every output token
/// generated (ignore_eos); one-stream decode time against the weight-bytes bound.
fn bench(opts: &GpuCheckOptions, model: &Path, dev: &Device, report: &mut GpuCheckReport) {
    let outcome = (|| -> std::result::Result<serde_json::Value, String> {
        let vocab = vocab_of(model).ok_or("no vocab_size in the bench model's config.json")?;
        let tmp = std::env::temp_dir().join(format!("vllm-rs-gpu-bench-{}", std::process::id()));
        fixture_model(model, vocab, &tmp).map_err(err)?;
        let weight_bytes: u64 = std::fs::read_dir(model)
            .map_err(err)?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
            .filter_map(|e| e.metadata().ok().map(|m| m.len()))
            .sum();
        let t_load = Instant::now();
        let llm = engine_on(opts, &tmp, |a| {
            a.gpu_memory_utilization = 0.9;
            a.kv_cache_memory = 8 << 30;
            a.max_num_seqs = 256;
        })
        .map_err(err)?;
        let load_s = t_load.elapsed().as_secs_f64();
        let (n_in, n_out) = opts.bench_len;
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let mut prompt = || Prompt::TokenIds((0..n_in).map(|_| rng.random_range(100u32..vocab as u32)).collect());
        // Warm-up (kernels loaded, graphs captured), then one stream, then the batch.
        let p = |n: usize| SamplingParams { ignore_eos: true, max_tokens: Some(n), ..Default::default() };
        llm.generate((0..8).map(|_| prompt()).collect::<Vec<_>>(), p(16)).map_err(err)?;
        let one = prompt();
        let t1 = Instant::now();
        llm.generate([one.clone()], p(1)).map_err(err)?;
        let prefill_s = t1.elapsed().as_secs_f64();
        let t1 = Instant::now();
        llm.generate([one], p(n_out)).map_err(err)?;
        let step_ms = (t1.elapsed().as_secs_f64() - prefill_s) * 1e3 / (n_out.max(2) - 1) as f64;
        let bandwidth = copy_bandwidth(dev).map_err(err)?;
        let bound_ms = weight_bytes as f64 / bandwidth * 1e3;
        let prompts: Vec<Prompt> = (0..opts.bench_prompts).map(|_| prompt()).collect();
        let t = Instant::now();
        let out = llm.generate(prompts, p(n_out)).map_err(err)?;
        let secs = t.elapsed().as_secs_f64();
        let generated: usize = out.iter().map(|o| o.outputs[0].token_ids.len()).sum();
        let total = opts.bench_prompts * n_in + generated;
        let stats = llm.with_engine(|e| e.stats());
        Ok(serde_json::json!({
            "model": model.display().to_string(),
            "weight_bytes": weight_bytes,
            "load_seconds": load_s,
            "prompts": opts.bench_prompts,
            "input_len": n_in,
            "output_len": n_out,
            "seconds": secs,
            "total_tokens_per_s": total as f64 / secs,
            "output_tokens_per_s": generated as f64 / secs,
            "one_stream_decode_step_ms": step_ms,
            "device_copy_bandwidth_gb_s": bandwidth / 1e9,
            "weight_bytes_bound_ms": bound_ms,
            "step_vs_bound": step_ms / bound_ms,
            "kv_blocks": stats.num_blocks,
            "graph_steps": stats.num_graph_steps,
            "device_sampled_tokens": stats.num_device_sampled_tokens,
        }))
    })();
    match outcome {
        Ok(v) => {
            let line = format!(
                "{:.0} total tok/s, {:.0} output tok/s; one-stream decode step {:.2} ms vs {:.2} ms weight-bytes bound",
                v["total_tokens_per_s"].as_f64().unwrap_or(0.0),
                v["output_tokens_per_s"].as_f64().unwrap_or(0.0),
                v["one_stream_decode_step_ms"].as_f64().unwrap_or(0.0),
                v["weight_bytes_bound_ms"].as_f64().unwrap_or(0.0)
            );
            report.record("throughput (offline)", Ok(line));
            report.bench = Some(v);
        }
        Err(e) => report.record("throughput (offline)", Err(e)),
    }
}

/// Bytes per second of a device-to-device copy of 1 GiB (read + write counted), the median of
/// five after a warm-up: the memory bandwidth the one-stream decode is set against.
fn copy_bandwidth(dev: &Device) -> candle_core::Result<f64> {
    let n = if dev.is_cpu() { 32 << 20 } else { 256 << 20 }; // f32 elements
    let a = Tensor::ones(n, DType::F32, dev)?;
    let mut times = Vec::new();
    for i in 0..6 {
        let t = Instant::now();
        let b = a.copy()?;
        b.get(n - 1)?.to_scalar::<f32>()?;
        if i > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(2.0 * (n * 4) as f64 / times[times.len() / 2])
}
