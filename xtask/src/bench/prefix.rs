//! `cargo xtask bench prefix-caching`: requests sharing a long prefix (a system prompt, a
//! few-shot preamble), run with prefix caching off and then on in one invocation. Reports the
//! prompt tokens each run computed, the time, time to first token, and the KV memory report
//! (blocks in use against tokens held, sampled after every step).

use std::time::Instant;

use anyhow::Result;
use clap::Args;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use vllm_engine::{Prompt, SamplingParams, LLM};

use super::{dataset, set_threads, write_json, EngineOpts};

/// `bench prefix-caching`.
#[derive(Args)]
pub struct PrefixArgs {
    /// Requests.
    #[arg(long, default_value_t = 32)]
    num_prompts: usize,
    /// Tokens every prompt starts with.
    #[arg(long, default_value_t = 512)]
    prefix_len: usize,
    /// Distinct tokens after the shared prefix.
    #[arg(long, default_value_t = 32)]
    suffix_len: usize,
    /// Output tokens per request.
    #[arg(long, default_value_t = 16)]
    output_len: usize,
    /// Dataset seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write the results here.
    #[arg(long)]
    output_json: Option<std::path::PathBuf>,
    #[command(flatten)]
    engine: EngineOpts,
}

struct RunResult {
    caching: bool,
    elapsed: f64,
    ttft: dataset::Summary,
    prompt_tokens: usize,
    computed_prompt_tokens: u64,
    cached_tokens: u64,
    mean_waste: f64,
    peak_blocks: usize,
    outputs: Vec<Vec<u32>>,
}

fn run_once(a: &PrefixArgs, prompts: &[Vec<u32>], caching: bool) -> Result<RunResult> {
    let mut args = a.engine.engine_args()?;
    args.enable_prefix_caching = caching;
    let mut llm = LLM::new(args)?;
    llm.set_use_tqdm(false);
    // Warm-up on unrelated tokens (thread pools, first-touch of the cache).
    let warm: Vec<u32> = (0..64).map(|t| 30_000 + t).collect();
    llm.generate([Prompt::TokenIds(warm)], SamplingParams::greedy(2))?;
    let params = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(a.output_len) };
    llm.with_engine(|e| -> Result<RunResult> {
        let before = e.stats();
        let t = Instant::now();
        for (i, p) in prompts.iter().enumerate() {
            e.add_request(i.to_string(), Prompt::TokenIds(p.clone()), params.clone())?;
        }
        let mut first: Vec<Option<f64>> = vec![None; prompts.len()];
        let mut outputs: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
        let (mut waste, mut steps, mut peak) = (0.0, 0usize, 0usize);
        while e.has_unfinished_requests() {
            let outs = e.step()?;
            let now = t.elapsed().as_secs_f64();
            for o in outs {
                let i: usize = o.request_id.parse()?;
                first[i].get_or_insert(now);
                if o.finished {
                    outputs[i] = o.outputs[0].token_ids.clone();
                }
            }
            let m = e.stats().kv_memory;
            if m.blocks_in_use > 0 {
                waste += m.waste();
                steps += 1;
            }
            peak = peak.max(m.blocks_in_use);
        }
        let elapsed = t.elapsed().as_secs_f64();
        let after = e.stats();
        let mut ttft: Vec<f64> = first.into_iter().map(|f| f.unwrap_or(elapsed) * 1000.0).collect();
        Ok(RunResult {
            caching,
            elapsed,
            ttft: dataset::summarize(&mut ttft),
            prompt_tokens: prompts.iter().map(Vec::len).sum(),
            computed_prompt_tokens: after.num_computed_prompt_tokens - before.num_computed_prompt_tokens,
            cached_tokens: after.prefix_cache_hits - before.prefix_cache_hits,
            mean_waste: if steps > 0 { waste / steps as f64 } else { 0.0 },
            peak_blocks: peak,
            outputs,
        })
    })
}

/// Runs the benchmark.
pub fn run(a: PrefixArgs) -> Result<()> {
    set_threads(a.engine.threads);
    let mut rng = ChaCha8Rng::seed_from_u64(a.seed);
    let mut tokens = |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(1000..40_000)).collect() };
    let prefix = tokens(a.prefix_len);
    let prompts: Vec<Vec<u32>> = (0..a.num_prompts).map(|_| [prefix.clone(), tokens(a.suffix_len)].concat()).collect();
    eprintln!(
        "xtask bench: {} requests, {}-token shared prefix + {} distinct tokens, {} output tokens each",
        a.num_prompts, a.prefix_len, a.suffix_len, a.output_len
    );
    let runs = [run_once(&a, &prompts, false)?, run_once(&a, &prompts, true)?];
    println!(
        "{:<16}{:>12}{:>12}{:>12}{:>10}{:>15}{:>15}{:>12}{:>10}",
        "prefix caching",
        "prompt tok",
        "computed",
        "cached",
        "time s",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "peak blocks",
        "KV waste"
    );
    for r in &runs {
        println!(
            "{:<16}{:>12}{:>12}{:>12}{:>10.2}{:>15.0}{:>15.0}{:>12}{:>9.2}%",
            if r.caching { "on" } else { "off" },
            r.prompt_tokens,
            r.computed_prompt_tokens,
            r.cached_tokens,
            r.elapsed,
            r.ttft.median,
            r.ttft.p99,
            r.peak_blocks,
            r.mean_waste * 100.0
        );
    }
    let (off, on) = (&runs[0], &runs[1]);
    let saved_tokens = off.computed_prompt_tokens.saturating_sub(on.computed_prompt_tokens);
    println!(
        "saved: {saved_tokens} prefill tokens ({:.1}%), {:.2} s ({:.1}%); TTFT p50 {:.1}x lower; outputs identical: {}",
        100.0 * saved_tokens as f64 / off.computed_prompt_tokens.max(1) as f64,
        off.elapsed - on.elapsed,
        100.0 * (off.elapsed - on.elapsed) / off.elapsed,
        off.ttft.median / on.ttft.median.max(1e-9),
        off.outputs == on.outputs
    );
    let to_json = |r: &RunResult| -> Value {
        json!({"prefix_caching": r.caching, "elapsed_seconds": r.elapsed, "ttft_ms": r.ttft,
               "prompt_tokens": r.prompt_tokens, "computed_prompt_tokens": r.computed_prompt_tokens,
               "cached_tokens": r.cached_tokens, "mean_kv_waste": r.mean_waste, "peak_kv_blocks": r.peak_blocks})
    };
    write_json(
        &a.output_json,
        &json!({
            "config": {"num_prompts": a.num_prompts, "prefix_len": a.prefix_len, "suffix_len": a.suffix_len,
                       "output_len": a.output_len, "threads": a.engine.threads, "quantization": a.engine.quantization},
            "runs": runs.iter().map(to_json).collect::<Vec<_>>(),
            "saved_prefill_tokens": saved_tokens, "saved_seconds": off.elapsed - on.elapsed,
            "outputs_identical": off.outputs == on.outputs,
        }),
    )
}
