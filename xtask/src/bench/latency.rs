//! `cargo xtask bench latency`: one request at a time, prompt and decode speed measured step by
//! step on our engine, the same workload through a peer's server, and the machine's read
//! bandwidth as the decode bound.

use super::*;

/// Our single-request figures: (prompt tokens/s, decode tokens/s), step by step.
fn our_latency(llm: &LLM, prompt: Vec<u32>, decode_prompt: Vec<u32>, output_len: usize) -> Result<(f64, f64)> {
    llm.with_engine(|e| -> Result<(f64, f64)> {
        let n = prompt.len();
        let t = Instant::now();
        e.add_request("prompt", Prompt::TokenIds(prompt), SamplingParams::greedy(1))?;
        while e.has_unfinished_requests() {
            e.step()?;
        }
        let pp = n as f64 / t.elapsed().as_secs_f64();
        let p = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(output_len) };
        e.add_request("decode", Prompt::TokenIds(decode_prompt), p)?;
        e.step()?; // prompt + first token
        let t = Instant::now();
        let mut steps = 0;
        while e.has_unfinished_requests() {
            e.step()?;
            steps += 1;
        }
        Ok((pp, steps as f64 / t.elapsed().as_secs_f64()))
    })
}

/// Our single-request figures over the iterations (the first is a warm-up): medians of
/// (prompt tokens/s, decode tokens/s), and the load time.
fn our_medians(opts: &EngineOpts, prompts: &Prompts, short: &Prompts, output_len: usize) -> Result<(f64, f64, f64)> {
    let (llm, load_s) = load(opts)?;
    eprintln!("xtask bench: {} loaded in {load_s:.2}s", opts.model_path()?);
    let (mut pp, mut tg) = (Vec::new(), Vec::new());
    for i in 0..prompts.len() {
        let (p, d) = our_latency(&llm, prompts[i].prompt.clone(), short[i].prompt.clone(), output_len)?;
        if i > 0 {
            pp.push(p);
            tg.push(d);
        }
    }
    Ok((summarize(&mut pp).median, summarize(&mut tg).median, load_s))
}

pub(super) fn latency(a: LatencyArgs) -> Result<()> {
    let iters = a.num_iters.max(1);
    // Fresh random prompts every iteration: the prefix cache must not help.
    let prompts = dataset::make(Dataset::Random, iters + 1, a.input_len, 1, 1);
    let short = dataset::make(Dataset::Random, iters + 1, 8, 1, 2);
    let (pp, tg, load_s) = our_medians(&a.engine, &prompts, &short, a.output_len)?;
    let ours = (pp, tg);
    // Other precisions or checkpoints of ours, measured the same way.
    let mut others = Vec::new();
    if let Some(dtype) = &a.compare_dtype {
        let opts = EngineOpts { dtype: dtype.clone(), ..a.engine.clone() };
        let (p, d, _) = our_medians(&opts, &prompts, &short, a.output_len)?;
        others.push((format!("vllm-rs --dtype {dtype}"), p, d));
    }
    for m in &a.compare_model {
        let opts = EngineOpts { model: Some(m.clone()), ..a.engine.clone() };
        let (p, d, _) = our_medians(&opts, &prompts, &short, a.output_len)?;
        others.push((format!("vllm-rs {m}"), p, d));
    }
    let mut report = json!({
        "input_len": a.input_len, "output_len": a.output_len, "threads": a.engine.threads,
        "quantization": a.engine.quantization, "dtype": a.engine.dtype, "load_seconds": load_s,
        "model": a.engine.model_path()?,
        "vllm-rs": {"prompt_tokens_per_second": ours.0, "decode_tokens_per_second": ours.1},
    });
    for (label, p, d) in &others {
        report[label.as_str()] = json!({"prompt_tokens_per_second": p, "decode_tokens_per_second": d});
    }
    let mut peer_fig = None;
    if let Some(peer) = a.peer {
        let model = PathBuf::from(a.engine.model_path()?);
        let rt = tokio::runtime::Runtime::new()?;
        let ctx = (a.input_len + a.output_len + 64).max(2048);
        let fig = match peer {
            Peer::LlamaCpp => rt.block_on(llama_cpp_latency(&model, a.engine.threads, ctx, &prompts, &short, &a))?,
            Peer::Vllm => rt.block_on(vllm_latency(&model, a.engine.threads, ctx, &prompts, &short, &a))?,
        };
        report[peer.label()] =
            json!({"prompt_tokens_per_second": fig.0, "decode_tokens_per_second": fig.1, "command": fig.2});
        peer_fig = Some((fig.0, fig.1));
    }
    let peer_name = a.peer.map_or("peer", Peer::label);
    println!("{:<28}{:>14}{:>14}{:>10}", "single request", "vllm-rs", peer_name, "ratio");
    let row = |name: &str, ours: f64, theirs: Option<f64>| match theirs {
        Some(t) => println!("{name:<28}{ours:>14.1}{t:>14.1}{:>10.2}", ours / t),
        None => println!("{name:<28}{ours:>14.1}{:>14}{:>10}", "-", "-"),
    };
    row(&format!("prompt tok/s ({} tokens)", a.input_len), ours.0, peer_fig.map(|f| f.0));
    row(&format!("decode tok/s ({} tokens)", a.output_len), ours.1, peer_fig.map(|f| f.1));
    for (label, p, d) in &others {
        println!(
            "{label}: prompt {p:.1} tok/s, decode {d:.1} tok/s (the first / this: prompt {:.2}x, decode {:.2}x)",
            ours.0 / p,
            ours.1 / d
        );
    }
    // The bandwidth bound of one-stream decode: every step reads every weight once, about the
    // model file's size (a folder's safetensors files).
    let file_bytes = weight_bytes(&PathBuf::from(a.engine.model_path()?)) as f64;
    let bw = read_bandwidth(a.engine.threads);
    if file_bytes > 0.0 {
        let bound = bw / file_bytes;
        println!(
            "read bandwidth ({} threads) {:.1} GB/s; model file {:.1} MB: decode bound {:.0} tok/s; \
             vllm-rs at {:.0}%{}",
            a.engine.threads,
            bw / 1e9,
            file_bytes / 1e6,
            bound,
            100.0 * ours.1 / bound,
            peer_fig.map(|f| format!(", {peer_name} at {:.0}%", 100.0 * f.1 / bound)).unwrap_or_default()
        );
        report["read_bandwidth_gb_per_s"] = json!(bw / 1e9);
        report["model_file_bytes"] = json!(file_bytes);
        report["decode_bound_tokens_per_second"] = json!(bound);
    }
    // The prompt pass is bound by arithmetic: about one multiply-add per weight per token,
    // against this CPU's int8 peak (`bench roofline`).
    let params = vllm_models::inspect(std::path::Path::new(&a.engine.model_path()?)).map_or(0, |i| i.parameters) as f64;
    if params > 0.0 {
        let roof = super::roofline::measure(a.engine.threads);
        let share = |tps: f64| 100.0 * tps * params / roof.int8_macs;
        println!(
            "int8 peak ({}, {} threads) {:.0} G multiply-adds/s; {:.0}M parameters: prompt at {:.1}% of it{}",
            roof.int8_isa,
            a.engine.threads,
            roof.int8_macs / 1e9,
            params / 1e6,
            share(ours.0),
            peer_fig.map(|f| format!(", {peer_name} at {:.1}%", share(f.0))).unwrap_or_default()
        );
        report["int8_peak_macs_per_second"] = json!(roof.int8_macs);
        report["prompt_share_of_int8_peak"] = json!(share(ours.0) / 100.0);
    }
    report["cpu"] = json!(stall::cpu_model());
    report["cpu_details"] = stall::cpu_details();
    report["versions"] = peer::versions();
    // Which of our kernels ran (VLLM_CPU_KERNEL can ask for a lower path than the CPU's best).
    report["cpu_kernel"] = json!(vllm_engine::cpu_kernel_path());
    write_json(&a.output_json, &report)
}

/// Prompts of each iteration (warm-up first), as `latency` makes them.
type Prompts = [dataset::BenchRequest];

/// llama.cpp's single-request figures through its server's own timings: (prompt tokens/s,
/// decode tokens/s, its command line).
async fn llama_cpp_latency(
    model: &std::path::Path,
    threads: usize,
    ctx: usize,
    prompts: &Prompts,
    short: &Prompts,
    a: &LatencyArgs,
) -> Result<(f64, f64, Vec<String>)> {
    let engine = peer::Engine::LlamaCpp { parallel: 1, ctx };
    let server = peer::start(&engine, model, threads, Duration::from_secs(120)).await?;
    let client = reqwest::Client::new();
    let timing = |prompt: Vec<u32>, n: usize| {
        let client = client.clone();
        let url = format!("{}/completion", server.base_url);
        async move {
            let v: Value = client
                .post(url)
                .json(&json!({"prompt": prompt, "n_predict": n, "ignore_eos": true, "cache_prompt": false, "temperature": 0.0}))
                .send()
                .await?
                .json()
                .await?;
            let t = v.get("timings").cloned().context("llama-server returned no timings")?;
            anyhow::Ok(t)
        }
    };
    let mut pp = Vec::new();
    let mut tg = Vec::new();
    for i in 0..prompts.len() {
        let t = timing(prompts[i].prompt.clone(), 1).await?;
        let d = timing(short[i].prompt.clone(), a.output_len).await?;
        if i > 0 {
            pp.push(t["prompt_per_second"].as_f64().unwrap_or(0.0));
            tg.push(d["predicted_per_second"].as_f64().unwrap_or(0.0));
        }
    }
    Ok((summarize(&mut pp).median, summarize(&mut tg).median, server.command.clone()))
}

/// vLLM's single-request figures through its OpenAI `/v1/completions` stream (token-id
/// prompts, greedy, `ignore_eos`): a one-token request's time to first token for the prompt,
/// `(tokens - 1) / (last token's time - first token's time)` for decode. Both include its
/// HTTP streaming (ours are measured in-process, step by step).
async fn vllm_latency(
    model: &std::path::Path,
    threads: usize,
    ctx: usize,
    prompts: &Prompts,
    short: &Prompts,
    a: &LatencyArgs,
) -> Result<(f64, f64, Vec<String>)> {
    let engine = peer::Engine::Vllm {
        max_model_len: ctx,
        bind_all: a.vllm_cpu_bind == VllmBind::All,
        extra: a.vllm_args.split_whitespace().map(String::from).collect(),
    };
    eprintln!("xtask bench: starting vLLM's CPU backend (about two minutes: it compiles the model)");
    let server = peer::start(&engine, model, threads, Duration::from_secs(900)).await?;
    eprintln!("xtask bench: vLLM up (cold start to first token {:.1}s)", server.cold_start);
    let client = reqwest::Client::new();
    let cfg = serve::ServeConfig {
        base_url: server.base_url.clone(),
        model: Some(peer::VLLM_SERVED_NAME.into()),
        request_rate: None,
        max_concurrency: None,
        seed: 0,
        api_key: None,
        timeout: Duration::from_secs(600),
    };
    let mut pp = Vec::new();
    let mut tg = Vec::new();
    for i in 0..prompts.len() {
        let p = serve::one(&client, &cfg, &dataset::BenchRequest { prompt: prompts[i].prompt.clone(), output_len: 1 })
            .await;
        let d = serve::one(
            &client,
            &cfg,
            &dataset::BenchRequest { prompt: short[i].prompt.clone(), output_len: a.output_len },
        )
        .await;
        for r in [&p, &d] {
            if !r.ok {
                anyhow::bail!("vLLM request failed: {}", r.error.clone().unwrap_or_default());
            }
        }
        let decode_time = d.latency - d.ttft;
        if d.output_len < 2 || decode_time <= 0.0 {
            anyhow::bail!("vLLM returned {} tokens for {} asked", d.output_len, a.output_len);
        }
        if i > 0 {
            pp.push(p.prompt_len as f64 / p.ttft);
            tg.push((d.output_len - 1) as f64 / decode_time);
        }
    }
    Ok((summarize(&mut pp).median, summarize(&mut tg).median, server.command.clone()))
}

/// Bytes of a checkpoint's weights: a file's size, or a folder's safetensors files.
fn weight_bytes(path: &std::path::Path) -> u64 {
    if !path.is_dir() {
        return std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    }
    std::fs::read_dir(path)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// The machine's read bandwidth in bytes per second with `threads` threads: the best of ten
/// passes summing a 1 GiB buffer (four times the largest L3 seen on these machines, 260 MiB),
/// split evenly, alternately with plain loads and with software prefetches 8 KiB ahead.
/// On a core whose reads are bound by the misses it can keep in flight (Sapphire/Emerald
/// Rapids: 9.7 GB/s a core plainly, 13.6 with prefetches), the plain figure understates what
/// a kernel that prefetches (ours) can read; the bound takes the better of the two.
pub(super) fn read_bandwidth(threads: usize) -> f64 {
    let words = (1usize << 30) / 8;
    let buf: Vec<u64> = (0..words as u64).collect();
    let threads = threads.max(1);
    let part = words.div_ceil(threads);
    let mut best = 0f64;
    for pass in 0..10 {
        let prefetch = pass % 2 == 1;
        let t = Instant::now();
        let total: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = buf
                .chunks(part)
                .map(|c| {
                    s.spawn(move || {
                        // Eight independent sums, so the loop is bound by loads, not by adds.
                        let mut acc = [0u64; 8];
                        for ch in c.chunks_exact(8) {
                            if prefetch {
                                prefetch_ahead(ch.as_ptr().wrapping_add(1024));
                            }
                            for (a, v) in acc.iter_mut().zip(ch) {
                                *a = a.wrapping_add(*v);
                            }
                        }
                        acc.iter().fold(0u64, |x, y| x.wrapping_add(*y))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0)).fold(0u64, |x, y| x.wrapping_add(y))
        });
        std::hint::black_box(total);
        best = best.max((words * 8) as f64 / t.elapsed().as_secs_f64());
    }
    best
}

/// A hint to fetch the cache line at `p` into L2 (nothing elsewhere).
#[allow(unsafe_code)]
fn prefetch_ahead(p: *const u64) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults or reads into the program, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(p.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}
