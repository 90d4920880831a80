//! `cargo xtask bench spec`: speculative decoding against plain decoding, side by side in one
//! run: one stream on input-grounded prompts (rewrite a given passage, edit given code,
//! extract fields from a given document) and on ordinary prompts, and many concurrent streams,
//! each with and without speculation (`ngram` and `suffix`). Greedy, so every configuration
//! emits the same tokens (checked); the figures are output tokens per second of decoding
//! (each request's prompt pass, timed separately, taken out) and the acceptance rates.
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
    /// Concurrent streams in the batched run.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Speculative configurations (vLLM's JSON), separated by `;` (`ngram`, `suffix`, or
    /// `draft_model` with `"model"` naming the draft).
    #[arg(
        long,
        value_delimiter = ';',
        default_value = r#"{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 2, "prompt_lookup_max": 5};{"method": "suffix", "num_speculative_tokens": 8}"#
    )]
    configs: Vec<String>,
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
    seconds: f64,
}

/// Runs `prompts` (all at once when `batch`, else one after another) and times them.
fn run(llm: &LLM, prompts: &[String], params: &SamplingParams, batch: bool) -> Result<Run> {
    let t = Instant::now();
    let tokens = if batch {
        llm.generate(prompts, params)?.into_iter().map(|o| o.outputs[0].token_ids.clone()).collect()
    } else {
        let mut v = Vec::new();
        for p in prompts {
            v.push(llm.generate([p.as_str()], params)?.remove(0).outputs[0].token_ids.clone());
        }
        v
    };
    Ok(Run { tokens, seconds: t.elapsed().as_secs_f64() })
}

/// Decode output tokens per second: the run's tokens (after each first one) over its time
/// minus the prompt passes' (`prefill`, the same prompts with one output token).
fn decode_rate(r: &Run, prefill: f64) -> f64 {
    let tokens: usize = r.tokens.iter().map(|t| t.len().saturating_sub(1)).sum();
    tokens as f64 / (r.seconds - prefill).max(1e-9)
}

pub fn run_bench(a: SpecArgs) -> Result<()> {
    super::set_threads(a.engine.threads);
    let configs: Vec<SpeculativeConfig> =
        a.configs.iter().map(|c| c.parse().map_err(anyhow::Error::msg)).collect::<Result<_>>()?;
    let mut args = a.engine.engine_args()?;
    // Every run computes its prompts (no hits from the run before).
    args.enable_prefix_caching = false;
    args.max_num_seqs = args.max_num_seqs.max(a.concurrency);
    let params = SamplingParams::greedy(a.output_len);
    let one = SamplingParams::greedy(1);
    let batch: Vec<String> = grounded().into_iter().chain(ordinary()).cycle().take(a.concurrency).collect();
    let sets: [(&str, Vec<String>, bool); 3] = [
        ("one stream, input-grounded", grounded(), false),
        ("one stream, ordinary", ordinary(), false),
        ("concurrent (mixed)", batch, true),
    ];
    let mut engines: Vec<(String, LLM)> = Vec::new();
    let mut plain = LLM::new(args.clone())?;
    plain.set_use_tqdm(false);
    engines.push(("plain".into(), plain));
    for c in &configs {
        let mut args = args.clone();
        args.speculative_config = Some(c.clone());
        let mut llm = LLM::new(args)?;
        llm.set_use_tqdm(false);
        engines.push((format!("{} k={}", c.method.name(), c.num_speculative_tokens), llm));
    }
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
        // Warm-up pass on every engine, then the prompt passes' time.
        for (_, llm) in &engines {
            run(llm, &prompts[..prompts.len().min(2)], &one, *batched)?;
        }
        let prefill = run(&engines[0].1, prompts, &one, *batched)?.seconds;
        let mut base: Option<(Vec<Vec<u32>>, f64)> = None;
        for (engine, llm) in &engines {
            let before = llm.with_engine(|e| e.stats()).spec.unwrap_or_default();
            let r = run(llm, prompts, &params, *batched)?;
            let after = llm.with_engine(|e| e.stats()).spec.unwrap_or_default();
            let rate = decode_rate(&r, prefill);
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
                "{:<30}{:<16}{:>12.1}{:>9.2}{:>11.1}%{:>11.2}",
                label,
                engine,
                rate,
                ratio,
                100.0 * acceptance,
                mean_len
            );
            report.push(json!({
                "workload": label, "engine": engine, "decode_tokens_per_second": rate, "vs_plain": ratio,
                "output_tokens": r.tokens.iter().map(Vec::len).sum::<usize>(), "seconds": r.seconds,
                "prefill_seconds": prefill, "drafts": drafts, "draft_tokens": drafted, "accepted_tokens": accepted,
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
