//! LoRA adapters against `transformers` + `peft`: adapters with seeded random weights on the
//! tiny fixtures (fixtures/lora/<name>/, written by scripts/make_lora_fixtures.py), installed
//! on the base model's layers and run through the paged batched path: float32 logits within the
//! parity tests' bound, greedy continuations equal; several adapters and the base model mixed
//! in one batch give each sequence its own reference; the same adapter on the base's GGUF file;
//! bad adapters refused whole.

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
