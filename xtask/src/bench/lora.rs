//! `cargo xtask bench lora`: output throughput of concurrent requests spread over several LoRA
//! adapters, against the same requests on the base model (an engine without LoRA), in one run.
//!
//! The adapters are written here: PEFT folders of seeded random weights on every attention
//! projection (q, k, v, o) of every layer of the model, at each rank asked for.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use rand::{Rng, SeedableRng};
use serde_json::json;
use vllm_engine::{LoraList, LoraRequest, Prompt, SamplingParams, LLM};

use super::dataset::{self, Dataset};

#[derive(Args)]
pub struct LoraArgs {
    #[command(flatten)]
    engine: super::EngineOpts,
    /// Concurrent requests (all submitted at once).
    #[arg(long, default_value_t = 32)]
    num_prompts: usize,
    /// Prompt tokens per request.
    #[arg(long, default_value_t = 128)]
    input_len: usize,
    /// Output tokens per request.
    #[arg(long, default_value_t = 128)]
    output_len: usize,
    /// Numbers of adapters the requests are spread over (round-robin).
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    adapters: Vec<usize>,
    /// Adapter ranks.
    #[arg(long, value_delimiter = ',', default_value = "16,64")]
    ranks: Vec<usize>,
    /// Write the figures here as JSON.
    #[arg(long)]
    output_json: Option<PathBuf>,
}

/// Writes a PEFT adapter of rank `rank` on every attention projection of a model of `layers`
/// layers, width `hidden` and `kv` key/value width.
fn write_adapter(dir: &Path, rank: usize, layers: usize, hidden: usize, kv: usize, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let cfg = json!({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "bias": "none",
                     "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]});
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string())?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for l in 0..layers {
        for (m, inp, out) in
            [("q_proj", hidden, hidden), ("k_proj", hidden, kv), ("v_proj", hidden, kv), ("o_proj", hidden, hidden)]
        {
            let name = format!("base_model.model.model.layers.{l}.self_attn.{m}");
            for (which, shape) in [("lora_A", vec![rank, inp]), ("lora_B", vec![out, rank])] {
                let n: usize = shape.iter().product();
                let bytes: Vec<u8> = (0..n).flat_map(|_| (rng.random::<f32>() * 0.02 - 0.01).to_le_bytes()).collect();
                tensors.push((format!("{name}.{which}.weight"), shape, bytes));
            }
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, b)| Ok((n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)?)))
        .collect::<Result<_>>()?;
    safetensors::serialize_to_file(views, None, &dir.join("adapter_model.safetensors"))?;
    Ok(())
}

/// Output tokens per second of `prompts` run at once (a warm-up run first).
fn rate(llm: &LLM, prompts: &[Prompt], params: &SamplingParams, loras: &[Option<LoraRequest>]) -> Result<f64> {
    llm.generate_with_lora(prompts.to_vec(), params, LoraList::PerPrompt(loras.to_vec()))?;
    let t = Instant::now();
    let outs = llm.generate_with_lora(prompts.to_vec(), params, LoraList::PerPrompt(loras.to_vec()))?;
    let tokens: usize = outs.iter().map(|o| o.outputs[0].token_ids.len()).sum();
    Ok(tokens as f64 / t.elapsed().as_secs_f64())
}

pub fn run(a: LoraArgs) -> Result<()> {
    super::set_threads(a.engine.threads);
    let model = a.engine.model_path()?;
    let info = vllm_models::inspect(Path::new(&model))?;
    let kv = info.kv.clone().context("the model has no KV layout (an encoder?)")?;
    let (hidden, kv_width) = (kv.heads * kv.head_dim, kv.kv_heads * kv.head_dim);
    let tmp = std::env::temp_dir().join("vllm-rs-bench-lora");
    let most = a.adapters.iter().copied().max().unwrap_or(1);
    let mut adapters: Vec<(usize, Vec<LoraRequest>)> = Vec::new();
    let mut id = 0;
    for &rank in &a.ranks {
        let mut list = Vec::new();
        for i in 0..most {
            let dir = tmp.join(format!("r{rank}-{i}"));
            write_adapter(&dir, rank, kv.layers, hidden, kv_width, (rank * 100 + i) as u64)?;
            id += 1;
            list.push(LoraRequest::new(format!("r{rank}-{i}"), id, dir));
        }
        adapters.push((rank, list));
    }
    let reqs = dataset::make(Dataset::Random, a.num_prompts, a.input_len, a.output_len, 7);
    let prompts: Vec<Prompt> = reqs.iter().map(|r| Prompt::TokenIds(r.prompt.clone())).collect();
    let params =
        SamplingParams { ignore_eos: true, max_tokens: Some(a.output_len), ..SamplingParams::greedy(a.output_len) };
    let mut args = a.engine.engine_args()?;
    args.max_num_seqs = args.max_num_seqs.max(a.num_prompts);
    let mut base = LLM::new(args.clone())?;
    base.set_use_tqdm(false);
    let base_rate = rate(&base, &prompts, &params, &vec![None; prompts.len()])?;
    drop(base);
    args.enable_lora = true;
    args.max_loras = most;
    args.max_lora_rank = a.ranks.iter().copied().max().unwrap_or(16);
    args.max_cpu_loras = Some(id as usize);
    let mut llm = LLM::new(args)?;
    llm.set_use_tqdm(false);
    println!("{:<34}{:>14}{:>10}", format!("{} requests at once", a.num_prompts), "output tok/s", "vs base");
    println!("{:<34}{:>14.1}{:>10}", "base model (no LoRA)", base_rate, "1.00");
    let mut runs = Vec::new();
    for (rank, list) in &adapters {
        for &n in &a.adapters {
            let loras: Vec<Option<LoraRequest>> = (0..prompts.len()).map(|i| Some(list[i % n].clone())).collect();
            let r = rate(&llm, &prompts, &params, &loras)?;
            println!("{:<34}{:>14.1}{:>10.2}", format!("{n} adapter(s) of rank {rank}"), r, r / base_rate);
            runs.push(json!({"adapters": n, "rank": rank, "output_tokens_per_second": r, "vs_base": r / base_rate}));
        }
    }
    let report = json!({
        "model": model, "num_prompts": a.num_prompts, "input_len": a.input_len, "output_len": a.output_len,
        "threads": a.engine.threads, "targets": "q_proj, k_proj, v_proj, o_proj of every layer",
        "base_output_tokens_per_second": base_rate, "runs": runs,
        "cpu": super::stall::cpu_model(), "cpu_kernel": vllm_engine::cpu_kernel_path(),
    });
    super::write_json(&a.output_json, &report)
}
