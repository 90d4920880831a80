//! LoRA adapters against `transformers` + `peft`: adapters with seeded random weights on the
//! tiny fixtures (fixtures/lora/<name>/, written by scripts/make_lora_fixtures.py), installed
//! on the base model's layers and run through the paged batched path: float32 logits within the
//! parity tests' bound, greedy continuations equal; several adapters and the base model mixed
//! in one batch give each sequence its own reference; the same adapter on the base's GGUF file;
//! bad adapters refused whole. A mixture's fused experts (PEFT's `target_parameters`) are
//! installed on each expert's layers.

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{json, Value};
use vllm_models::lora::{LoraAdapter, LoraRegistry};
use vllm_models::{load_gguf_with, load_hf_dir_with, CausalLM, LoadOptions, MatrixFormat};

mod common;
use common::compare_lora;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn reference(name: &str) -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(root().join("fixtures/lora").join(name).join("reference.json")).unwrap(),
    )
    .unwrap()
}

/// The base model of an adapter fixture, loaded for adapters, with the adapters installed
/// (ids 1, 2, ... in order).
fn base_with(base: &str, adapters: &[&str]) -> (Box<dyn CausalLM>, Arc<LoraRegistry>) {
    let registry = Arc::new(LoraRegistry::default());
    let model = load_hf_dir_with(
        &root().join(base),
        LoadOptions { dtype: candle_core::DType::F32, matrices: MatrixFormat::Dense },
        &candle_core::Device::Cpu,
        Some(registry.clone()),
    )
    .unwrap();
    for (i, a) in adapters.iter().enumerate() {
        let adapter = LoraAdapter::from_peft_dir(&root().join("fixtures/lora").join(a), 64).unwrap();
        registry.install(i as u32 + 1, &adapter).unwrap_or_else(|e| panic!("{a}: {e}"));
    }
    (model, registry)
}

#[test]
fn every_adapter_matches_peft() {
    for name in [
        "llama_r8_qv",
        "llama_r4_all",
        "llama_rslora_r16",
        "llama_patterns",
        "llama_r8_qv_b",
        "qwen2_r8",
        "phi3_r8",
        "gpt2_r8",
        "qwen2_embed_head",
        "llama_save_embed_head",
        "mixtral_experts",
        "qwen3_moe_experts",
    ] {
        let r = reference(name);
        let base = r["base"].as_str().unwrap().to_string();
        let (model, _) = base_with(&base, &[name]);
        let n = r["cases"].as_array().unwrap().len();
        compare_lora(model.as_ref(), &r, 1e-4, false, &format!("{name} (float32)"), &vec![Some(1); n]);
    }
}

#[test]
fn adapters_and_the_base_share_a_batch() {
    let (model, _) =
        base_with("fixtures/models/llama", &["llama_r8_qv", "llama_r8_qv_b", "llama_r4_all", "llama_save_embed_head"]);
    let a = reference("llama_r8_qv");
    let b = reference("llama_r8_qv_b");
    let base: Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("fixtures/models/llama/reference.json")).unwrap())
            .unwrap();
    // Case i of the batch from the reference of the adapter it runs with: A, B and the base.
    let mixed = json!({"cases": [a["cases"][0], b["cases"][1], base["cases"][2]]});
    compare_lora(model.as_ref(), &mixed, 1e-4, false, "A + B + base in one batch", &[Some(1), Some(2), None]);
    let mixed = json!({"cases": [base["cases"][0], a["cases"][1], b["cases"][2]]});
    compare_lora(model.as_ref(), &mixed, 1e-4, false, "base + A + B in one batch", &[None, Some(1), Some(2)]);
    // An adapter with its own embedding and output head beside one without and the base.
    let save = reference("llama_save_embed_head");
    let mixed = json!({"cases": [save["cases"][0], base["cases"][1], a["cases"][2]]});
    compare_lora(model.as_ref(), &mixed, 1e-4, false, "own head + base + A", &[Some(4), None, Some(1)]);
}

/// The tiny Llama's float32 GGUF file, loaded for adapters.
fn gguf_base() -> (Box<dyn CausalLM>, Arc<LoraRegistry>) {
    let registry = Arc::new(LoraRegistry::default());
    let (model, _) = load_gguf_with(
        &root().join("fixtures/models/llama/model.f32.gguf"),
        LoadOptions { dtype: candle_core::DType::F32, matrices: MatrixFormat::Dense },
        &candle_core::Device::Cpu,
        Some(registry.clone()),
    )
    .unwrap();
    (model, registry)
}

/// The PEFT adapter on the base's GGUF file (llama.cpp's layout, its query and key rows
/// permuted for interleaved rotary): the same outputs.
#[test]
fn a_peft_adapter_on_the_gguf_base() {
    let (model, registry) = gguf_base();
    for (id, name) in [(1, "llama_r8_qv"), (2, "llama_r4_all")] {
        let adapter = LoraAdapter::from_peft_dir(&root().join("fixtures/lora").join(name), 64).unwrap();
        registry.install(id, &adapter).unwrap();
        let r = reference(name);
        compare_lora(model.as_ref(), &r, 1e-4, false, &format!("{name} on the GGUF base"), &[Some(id); 3]);
    }
}

/// llama.cpp's own adapter file (convert_lora_to_gguf.py) of the same PEFT adapter, on the
/// GGUF base: the same outputs (its query/key rows come permuted as the base's are); on the
/// Hugging Face base it is refused (the rows' orders differ); a model file is not an adapter.
#[test]
fn a_llama_cpp_adapter_on_the_gguf_base() {
    let (model, registry) = gguf_base();
    let file = root().join("fixtures/lora/llama_r8_qv/adapter.gguf");
    let adapter = LoraAdapter::load(&file, 64).unwrap();
    let peft = LoraAdapter::from_peft_dir(&root().join("fixtures/lora/llama_r8_qv"), 64).unwrap();
    assert_eq!(adapter.modules.keys().collect::<Vec<_>>(), peft.modules.keys().collect::<Vec<_>>());
    assert!(adapter.modules.iter().all(|(m, w)| w.scale == peft.modules[m].scale && w.rank == 8));
    registry.install(1, &adapter).unwrap();
    let r = reference("llama_r8_qv");
    compare_lora(model.as_ref(), &r, 1e-4, false, "adapter.gguf on the GGUF base", &[Some(1); 3]);

    let (_, hf) = base_with("fixtures/models/llama", &[]);
    let err = hf.install(1, &adapter).unwrap_err().to_string();
    assert!(err.contains("llama.cpp's order"), "{err}");
    let err = LoraAdapter::load(&root().join("fixtures/models/llama/model.f32.gguf"), 64).unwrap_err().to_string();
    assert!(err.contains("not an adapter file"), "{err}");
    let err = LoraAdapter::load(&file, 4).unwrap_err().to_string();
    assert!(err.contains("rank at most 4"), "{err}");
}

#[test]
fn bad_adapters_are_refused_whole() {
    let (model, registry) = base_with("fixtures/models/llama", &["llama_r8_qv"]);
    for (name, max_rank, want) in [
        ("bad_rank_64", 32, "above --max-lora-rank 32"),
        ("bad_target_missing", 64, "model.layers.7.self_attn.q_proj"),
        ("bad_shape", 64, "q_proj"),
        ("bad_nan", 64, "NaN"),
        ("bad_bin_only", 64, "adapter_model.bin"),
        ("bad_not_safetensors", 64, "not a safetensors file"),
        ("does_not_exist", 64, "no such folder"),
    ] {
        let dir = root().join("fixtures/lora").join(name);
        let err = match LoraAdapter::from_peft_dir(&dir, max_rank) {
            Err(e) => e.to_string(),
            Ok(a) => match registry.install(9, &a) {
                Err(e) => e.to_string(),
                Ok(()) => panic!("{name} was installed"),
            },
        };
        assert!(err.contains(want), "{name}: {err}");
    }
    // Nothing of a refused adapter was installed: adapter 1 alone still matches its reference.
    let r = reference("llama_r8_qv");
    compare_lora(model.as_ref(), &r, 1e-4, false, "after refusals", &[Some(1); 3]);
    // Id 9 holds nothing: a row asking for it runs the base model (the engine never asks).
    let base: Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("fixtures/models/llama/reference.json")).unwrap())
            .unwrap();
    compare_lora(model.as_ref(), &json!({"cases": [base["cases"][0]]}), 1e-4, false, "id 9 is empty", &[Some(9)]);
}

/// A reference vector of the BERT adapter fixture (`embedding` or `base_embedding`).
fn vector(case: &Value, key: &str) -> Vec<f32> {
    case[key].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect()
}

/// Cosine similarity and largest difference of two vectors.
fn closeness(a: &[f32], b: &[f32]) -> (f64, f32) {
    assert_eq!(a.len(), b.len());
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let n = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    (dot / (n(a) * n(b)), a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max))
}

/// An embedding model's adapter (PEFT on the tiny BERT, every linear layer, the pooler's and
/// the word embeddings): the pooled vectors equal peft's (cosine >= 0.99999, within 1e-4), one
/// sequence at a time and in one padded batch with base-model sequences, whose vectors stay
/// the base's; modules the BERT lacks, and a rank above the limit, are refused.
#[test]
fn an_embedding_models_adapter_matches_peft() {
    use vllm_models::bert::BertEmbedder;
    let r = reference("bert_r4");
    let registry = Arc::new(LoraRegistry::default());
    let model = BertEmbedder::load_dir_with(
        &root().join(r["base"].as_str().unwrap()),
        LoadOptions::float32(),
        &candle_core::Device::Cpu,
        Some(registry.clone()),
    )
    .unwrap();
    let adapter = LoraAdapter::from_peft_dir(&root().join("fixtures/lora/bert_r4"), 8).unwrap();
    assert_eq!(adapter.modules.len(), 2 * 6 + 2, "6 linear layers a layer, the pooler, the word embeddings");
    registry.install(1, &adapter).unwrap();
    let cases = r["cases"].as_array().unwrap();
    let prompts: Vec<Vec<u32>> = cases
        .iter()
        .map(|c| c["prompt"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect())
        .collect();
    let check = |got: &[f32], want: &[f32], what: &str| {
        let (cos, diff) = closeness(got, want);
        assert!(cos >= 0.99999 && diff <= 1e-4, "{what}: cosine {cos}, largest difference {diff}");
    };
    for (c, p) in cases.iter().zip(&prompts) {
        let alone = model.embed_with_adapters(std::slice::from_ref(p), &[Some(1)]).unwrap();
        check(&alone[0], &vector(c, "embedding"), &format!("{:?} alone", c["text"]));
        let base = model.embed(std::slice::from_ref(p)).unwrap();
        check(&base[0], &vector(c, "base_embedding"), &format!("{:?} base", c["text"]));
        assert!(closeness(&alone[0], &base[0]).0 < 0.999, "{:?}: the adapter changes the vector", c["text"]);
    }
    // One padded batch, adapter and base sequences alternating.
    let adapters: Vec<Option<u32>> = (0..prompts.len()).map(|i| (i % 2 == 0).then_some(1)).collect();
    let batch = model.embed_with_adapters(&prompts, &adapters).unwrap();
    for ((c, got), a) in cases.iter().zip(&batch).zip(&adapters) {
        let key = if a.is_some() { "embedding" } else { "base_embedding" };
        check(got, &vector(c, key), &format!("{:?} in a mixed batch", c["text"]));
    }

    // A Llama adapter names modules a BERT lacks; the rank is checked on reading.
    let llama = LoraAdapter::from_peft_dir(&root().join("fixtures/lora/llama_r8_qv"), 64).unwrap();
    let err = registry.install(2, &llama).unwrap_err().to_string();
    assert!(err.contains("model.layers.0.self_attn.q_proj, which this model does not have"), "{err}");
    let err = LoraAdapter::from_peft_dir(&root().join("fixtures/lora/bert_r4"), 2).unwrap_err().to_string();
    assert!(err.contains("has rank 4, above --max-lora-rank 2"), "{err}");
    // And a BERT adapter on a Llama.
    let (_, llama_registry) = base_with("fixtures/models/llama", &[]);
    let err = llama_registry.install(1, &adapter).unwrap_err().to_string();
    assert!(err.contains("which this model does not have"), "{err}");
}

/// PEFT's adapters of a mixture's fused experts (`target_parameters`, fixtures/lora/
/// mixtral_experts and qwen3_moe_experts) on each expert's layers: in one batch with base-model
/// sequences each sequence gets its own reference (an expert's rows run with their own
/// adapters); experts of another shape or count, or a model without experts, refuse them.
#[test]
fn adapters_of_a_mixtures_experts() {
    let (model, _) = base_with("fixtures/models/mixtral", &["mixtral_experts"]);
    let a = reference("mixtral_experts");
    let base: Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("fixtures/models/mixtral/reference.json")).unwrap())
            .unwrap();
    let mixed = json!({"cases": [a["cases"][0], base["cases"][1], a["cases"][2]]});
    compare_lora(model.as_ref(), &mixed, 1e-4, false, "experts + base in one batch", &[Some(1), None, Some(1)]);

    let adapter = LoraAdapter::from_peft_dir(&root().join("fixtures/lora/mixtral_experts"), 64).unwrap();
    let (_, qwen3_moe) = base_with("fixtures/models/qwen3_moe", &[]);
    let err = qwen3_moe.install(1, &adapter).unwrap_err().to_string();
    assert!(err.contains("neither the model's gate_up_proj [128, 64] nor its down_proj [64, 64]"), "{err}");
    let (_, llama) = base_with("fixtures/models/llama", &[]);
    let err = llama.install(1, &adapter).unwrap_err().to_string();
    assert!(err.contains("the experts of model.layers.0.mlp.experts, which this model does not have"), "{err}");
    let err = LoraAdapter::from_peft_dir(&root().join("fixtures/lora/mixtral_experts"), 2).unwrap_err().to_string();
    assert!(err.contains("has rank 4, above --max-lora-rank 2"), "{err}");
}
