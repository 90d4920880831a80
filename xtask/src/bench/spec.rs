//! `cargo xtask bench spec`: speculative decoding against plain decoding, side by side in one
//! run: one stream on input-grounded prompts (rewrite a given passage, edit given code,
//! extract fields from a given document) and on ordinary prompts, and many concurrent streams,
//! each with and without speculation (`ngram` and `suffix`). Greedy, so every configuration
//! emits the same tokens (checked); the figures are output tokens per second of decoding
//! (from each request's first token on) and the acceptance rates.
//!
//! A draft model is one more configuration, e.g. SmolLM2-135M drafting for SmolLM2-1.7B
//! (same vocabulary): `cargo xtask bench spec --model <1.7B> --configs '{"model": "<135M>",
//! "num_speculative_tokens": 4}'`. The draft's prompt pass runs at the first decoding step,
//! so it counts as decoding time here.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{ensure, Result};
use clap::Args;
use serde_json::{json, Value};
use vllm_engine::{SamplingParams, SpeculativeConfig, LLM};

#[derive(Args)]
pub struct SpecArgs {
    #[command(flatten)]
    engine: super::EngineOpts,
    /// Most output tokens per request (requests stop at EOS as they would in use).
    #[arg(long, default_value_t = 128)]
    output_len: usize,
    /// Concurrent streams in the batched runs (one run per value).
    #[arg(long, value_delimiter = ',', default_value = "4,32")]
    concurrency: Vec<usize>,
    /// Speculative configurations (vLLM's JSON), separated by `;` (`ngram`, `suffix`, or
    /// `draft_model` with `"model"` naming the draft).
    #[arg(
        long,
        value_delimiter = ';',
        default_value = r#"{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 2, "prompt_lookup_max": 5};{"method": "suffix", "num_speculative_tokens": 8}"#
    )]
    configs: Vec<String>,
    /// Runs of each workload per engine (the engines take turns; the best counts).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Write the figures here as JSON.
    #[arg(long)]
    output_json: Option<PathBuf>,
}

fn chat(q: &str) -> String {
    format!("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n")
}

/// Prompts whose answers repeat their input.
fn grounded() -> Vec<String> {
    let passage = "The old lighthouse stood at the end of the northern pier for more than a century. Its keeper, \
        a quiet man named Thomas Hale, climbed the one hundred and twelve steps every evening to light the lamp, and \
        every morning he wrote the weather, the ships that passed and the state of the sea in a leather notebook. When \
        the harbour authority replaced the lamp with an automatic beacon in 1962, Thomas kept writing in his notebook \
        for another eleven years, until the day he moved to his daughter's house in the valley.";
    let code = "def total_price(items, tax_rate):\n    subtotal = 0\n    for item in items:\n        subtotal += \
        item.price * item.quantity\n    tax = subtotal * tax_rate\n    return subtotal + tax\n\n\ndef \
        average_price(items):\n    if not items:\n        return 0\n    total = 0\n    for item in items:\n        \
        total += item.price\n    return total / len(items)\n";
    let doc = "Invoice number: INV-2024-0042\nDate: 14 March 2024\nCustomer: Northwind Traders, 12 Harbour Road, \
        Portsmouth\nItems: 3 x oak desk at 240.00, 6 x office chair at 85.50, 1 x filing cabinet at 130.00\nTotal: \
        1363.00 GBP\nPayment due: 13 April 2024";
    vec![
        chat(&format!("Rewrite the following passage, keeping every sentence, and correct any spelling:\n\n{passage}")),
        chat(&format!(
            "Rename the function total_price to compute_total in this code and return the whole code:\n\n{code}"
        )),
        chat(&format!("Copy the customer line and the items line from this invoice:\n\n{doc}")),
        chat(&format!("Repeat this passage word for word:\n\n{passage}")),
    ]
}

/// Prompts whose answers do not repeat their input.
fn ordinary() -> Vec<String> {
    vec![
        chat("Write a short story about a fox who learns to sail."),
        chat("Explain how a refrigerator keeps food cold."),
        chat("Give me five ideas for a rainy weekend."),
        chat("What are the benefits of learning a second language?"),
    ]
}

struct Run {
    tokens: Vec<Vec<u32>>,
    /// Output tokens after each request's first, and the time they took: one stream, from
    /// each request's first token to its last; concurrent, from the moment every request has
    /// its first token (every prompt is in) to the end.
    decode_tokens: usize,
    decode_seconds: f64,
}

/// Runs `prompts` (all at once when `batch`, else one after another) step by step, timing
/// the decode phase.
fn run(llm: &LLM, prompts: &[String], params: &SamplingParams, batch: bool) -> Result<Run> {
    let groups: Vec<&[String]> = if batch { vec![prompts] } else { prompts.chunks(1).collect() };
    let mut tokens = Vec::new();
    let (mut decode_tokens, mut decode_seconds) = (0, 0.0);
    for group in groups {
        let (t, n, secs) = llm.with_engine(|e| -> Result<_> {
            for (i, p) in group.iter().enumerate() {
                e.add_request(i.to_string(), p.as_str().into(), params.clone())?;
            }
            let mut lens = vec![0usize; group.len()];
            let mut started: Option<(Instant, usize)> = None;
            let mut out = vec![Vec::new(); group.len()];
            while e.has_unfinished_requests() {
                for o in e.step()? {
                    let i: usize = o.request_id.parse()?;
                    lens[i] = o.outputs[0].token_ids.len();
                    out[i] = o.outputs[0].token_ids.clone();
                }
                if started.is_none() && lens.iter().all(|&l| l > 0) {
                    started = Some((Instant::now(), lens.iter().sum()));
                }
            }
            let (t0, before) = started.unwrap_or((Instant::now(), 0));
            Ok((out, lens.iter().sum::<usize>() - before, t0.elapsed().as_secs_f64()))
        })?;
        tokens.extend(t);
        decode_tokens += n;
        decode_seconds += secs;
    }
    Ok(Run { tokens, decode_tokens, decode_seconds })
}

/// Decode output tokens per second.
fn decode_rate(r: &Run) -> f64 {
    r.decode_tokens as f64 / r.decode_seconds.max(1e-9)
}

pub fn run_bench(a: SpecArgs) -> Result<()> {
    super::set_threads(a.engine.threads);
    let configs: Vec<SpeculativeConfig> =
        a.configs.iter().map(|c| c.parse().map_err(anyhow::Error::msg)).collect::<Result<_>>()?;
    let mut args = a.engine.engine_args()?;
    // Every run computes its prompts (no hits from the run before).
    args.enable_prefix_caching = false;
    args.max_num_seqs = args.max_num_seqs.max(a.concurrency.iter().copied().max().unwrap_or(1));
    let params = SamplingParams::greedy(a.output_len);
    let one = SamplingParams::greedy(1);
    let mut sets: Vec<(&str, Vec<String>, bool)> =
        vec![("one stream, input-grounded", grounded(), false), ("one stream, ordinary", ordinary(), false)];
    for &c in &a.concurrency {
        sets.push(("concurrent (mixed)", grounded().into_iter().chain(ordinary()).cycle().take(c).collect(), true));
    }
    // Fresh engines for every run: the suffix proposer learns from the outputs it has seen,
    // and a rerun of the same prompts would flatter it.
    let names: Vec<String> = std::iter::once("plain".to_string())
        .chain(configs.iter().map(|c| format!("{} k={}", c.method.name(), c.num_speculative_tokens)))
        .collect();
    let make = || -> Result<Vec<LLM>> {
        std::iter::once(None)
            .chain(configs.iter().cloned().map(Some))
            .map(|spec| {
                let mut args = args.clone();
                args.speculative_config = spec;
                let mut llm = LLM::new(args)?;
                llm.set_use_tqdm(false);
                Ok(llm)
            })
            .collect()
    };
    println!(
        "CPU: {} ({} kernels), {} threads",
        super::stall::cpu_model(),
        vllm_engine::cpu_kernel_path(),
        a.engine.threads
    );
    println!(
        "{:<30}{:<16}{:>12}{:>9}{:>12}{:>11}",
        "workload", "engine", "decode tok/s", "vs plain", "acceptance", "mean len"
    );
    let mut report: Vec<Value> = Vec::new();
    for (name, prompts, batched) in &sets {
        let label = if *batched { format!("{name}, {} streams", prompts.len()) } else { name.to_string() };
        // Each engine runs the workload `repeats` times, fresh each time and warmed up, the
        // engines taking turns (so a slow moment of the machine does not fall on one
        // engine); its best run counts.
        let mut best: Vec<Option<(Run, f64, vllm_engine::SpecStats, vllm_engine::SpecStats)>> =
            names.iter().map(|_| None).collect();
        for _ in 0..a.repeats {
            let engines = make()?;
            for llm in &engines {
                run(llm, &prompts[..prompts.len().min(2)], &one, *batched)?;
            }
            for (i, llm) in engines.iter().enumerate() {
                let before = llm.with_engine(|e| e.stats()).spec.unwrap_or_default();
                let r = run(llm, prompts, &params, *batched)?;
                let after = llm.with_engine(|e| e.stats()).spec.unwrap_or_default();
                let rate = decode_rate(&r);
                if best[i].as_ref().is_none_or(|b| rate > b.1) {
                    best[i] = Some((r, rate, before, after));
                }
            }
        }
        let mut base: Option<(Vec<Vec<u32>>, f64)> = None;
        for (engine, b) in names.iter().zip(best) {
            let Some((r, rate, before, after)) = b else { continue };
            let (drafts, drafted, accepted) = (
                after.num_drafts - before.num_drafts,
                after.num_draft_tokens - before.num_draft_tokens,
                after.num_accepted_tokens - before.num_accepted_tokens,
            );
            let acceptance = if drafted > 0 { accepted as f64 / drafted as f64 } else { 0.0 };
            let mean_len = if drafts > 0 { 1.0 + accepted as f64 / drafts as f64 } else { 1.0 };
            let ratio = match &base {
                None => {
                    base = Some((r.tokens.clone(), rate));
                    1.0
                }
                Some((tokens, b)) => {
                    ensure!(*tokens == r.tokens, "{engine} on {label}: outputs differ from plain decoding");
                    rate / b
                }
            };
            println!(
                "{:<32}{:<16}{:>12.1}{:>9.2}{:>11.1}%{:>11.2}",
                label,
                engine,
                rate,
                ratio,
                100.0 * acceptance,
                mean_len
            );
            report.push(json!({
                "workload": label, "engine": engine, "decode_tokens_per_second": rate, "vs_plain": ratio,
                "output_tokens": r.tokens.iter().map(Vec::len).sum::<usize>(),
                "decode_tokens": r.decode_tokens, "decode_seconds": r.decode_seconds, "drafts": drafts, "draft_tokens": drafted, "accepted_tokens": accepted,
                "acceptance_rate": acceptance, "mean_acceptance_length": mean_len,
            }));
        }
    }
    let report = json!({
        "model": a.engine.model_path()?, "threads": a.engine.threads, "output_len": a.output_len,
        "concurrency": a.concurrency, "configs": a.configs, "auto_row_budget": vllm_engine::spec::AUTO_ROW_BUDGET,
        "cpu": super::stall::cpu_model(), "cpu_kernel": vllm_engine::cpu_kernel_path(), "runs": report,
    });
    super::write_json(&a.output_json, &report)
}
