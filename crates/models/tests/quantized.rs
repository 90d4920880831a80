//! Quantized safetensors checkpoints (AWQ, GPTQ, compressed-tensors, FP8) against
//! `transformers` on their dequantized twins: fixtures/quant/<name>/ written by
//! scripts/make_quant_fixtures.py from the tiny Llama fixture, each packing checked there
//! against the format's own reference dequantization.
//!
//! - Dequantized (`MatrixFormat::Dense`, the reference path): every format unpacks to exactly
//!   the twin's weights, so the logits are the twin's to float32 rounding and the greedy
//!   continuations equal.
//! - On our kernels (`MatrixFormat::Native`): 4-bit checkpoints run on the 4-bit kernel and
//!   8-bit ones on the int8 kernel as stored (activations quantized per step, as for GGUF
//!   files), FP8 requantized to int8 blocks; within the bounds of those paths.
//! - The same integers stored as AWQ, GPTQ (v1 and v2) and compressed-tensors give identical
//!   logits.
//! - Bad checkpoints fail to load with an error naming the tensor or field.

use std::path::PathBuf;

use serde_json::Value;
use vllm_models::{load_hf_dir, CausalLM, LoadOptions, MatrixFormat};

mod common;
use common::compare;

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/quant").join(name)
}

fn load(name: &str, matrices: MatrixFormat) -> vllm_models::Result<Box<dyn CausalLM>> {
    load_hf_dir(&dir(name), LoadOptions { dtype: candle_core::DType::F32, matrices }, &candle_core::Device::Cpu)
}

fn reference(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir(name).join("reference.json")).unwrap()).unwrap()
}

/// Every fixture with a reference, and its bound on our kernels (relative logit error): the
/// weights run exactly as stored, so what differs is the per-step int8 quantization of the
/// activations (and FP8's requantization), as for GGUF files (docs/models.md: Q8_0 4e-2 on
/// the same tiny Llama, llama.cpp's own arithmetic 4e-2).
const FIXTURES: &[(&str, f32)] = &[
    ("awq_g32", 1e-1),
    ("awq_gneg1", 1e-1),
    ("gptq_g32_asym", 1e-1),
    ("gptq_g32_sym", 1e-1),
    ("gptq_v2_g32", 1e-1),
    ("gptq_desc_act", 1e-1),
    ("gptq_8bit", 1e-1),
    ("ct_w4a16_group", 1e-1),
    ("ct_w4a16_asym_group", 1e-1),
    ("ct_w8a16_channel", 1e-1),
    ("ct_w8a8_int", 1e-1),
    ("ct_fp8_channel", 1e-1),
    ("fp8_block", 1e-1),
    ("fp8_block_16x32", 1e-1),
];

#[test]
fn dequantized_checkpoints_are_their_twins() {
    for &(name, _) in FIXTURES {
        let model = load(name, MatrixFormat::Dense).unwrap_or_else(|e| panic!("{name}: {e}"));
        compare(model.as_ref(), &reference(name), 1e-4, false, &format!("{name} (dequantized)"));
    }
}

#[test]
fn quantized_checkpoints_run_on_our_kernels() {
    for &(name, bound) in FIXTURES {
        let model = load(name, MatrixFormat::Native).unwrap_or_else(|e| panic!("{name}: {e}"));
        compare(model.as_ref(), &reference(name), bound, true, &format!("{name} (our kernels)"));
    }
}

/// The logits of every prompt position, on our kernels.
fn logits(name: &str) -> Vec<Vec<f32>> {
    let model = load(name, MatrixFormat::Native).unwrap_or_else(|e| panic!("{name}: {e}"));
    let r = reference(name);
    let prompts: Vec<(Vec<u32>, usize)> = r["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["prompt"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect(), 0))
        .collect();
    let caches = common::caches(model.as_ref(), 64);
    common::step(model.as_ref(), &caches, &prompts, true)
}

#[test]
fn the_same_integers_in_every_format_give_the_same_logits() {
    for group in
        [&["awq_g32", "gptq_g32_asym", "gptq_v2_g32", "ct_w4a16_asym_group"][..], &["gptq_g32_sym", "ct_w4a16_group"]]
    {
        let first = logits(group[0]);
        for other in &group[1..] {
            assert_eq!(logits(other), first, "{other} vs {}", group[0]);
        }
    }
}

#[test]
fn bad_checkpoints_name_what_is_wrong() {
    for (name, wants) in [
        ("bad_awq_missing_scales", &["model.layers.1.self_attn.v_proj.scales"][..]),
        ("bad_gptq_bits3", &["3 bits"]),
        ("bad_unknown_method", &["bitsandbytes"]),
        ("bad_fp8_no_scale", &["model.layers.1.self_attn.v_proj.weight_scale"]),
        ("bad_awq_group_shape", &["qzeros", "group size", "groups of 64"]),
        ("ct_w4a16_ignore_mismatch", &["does_not_exist"]),
    ] {
        for matrices in [MatrixFormat::Native, MatrixFormat::Dense] {
            let err = match load(name, matrices) {
                Ok(_) => panic!("{name} loaded"),
                Err(e) => e.to_string(),
            };
            assert!(wants.iter().any(|w| err.contains(w)), "{name}: {err}");
        }
    }
    // Int8 requantization or candle's quantized matmul are not this checkpoint's formats.
    let err = load("awq_g32", MatrixFormat::Int8).err().expect("int8 over AWQ").to_string();
    assert!(err.contains("awq"), "{err}");
}
