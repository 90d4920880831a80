//! Every architecture against `transformers`: tiny random checkpoints written by
//! `scripts/make_model_fixtures.py` (fixtures/models/<name>/), run through the paged batched
//! path (all prompts prefilled in one step, then decoded together one token per step, blocks
//! of 4 interleaved between sequences). Float32 logits of every prompt position within 1e-4
//! of the reference (relative to the row's largest logit), 16-token greedy continuations equal.
//! The same checkpoints stored in f16 and bf16 and run in that dtype stay within 2e-2 / 1e-1
//! and follow the reference continuation up to a near tie.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use vllm_models::{load_hf_dir, CausalLM, LoadOptions};

mod common;
use common::{argmax, caches, step};

/// Loads a fixture in `dtype`: float32 as committed; half precision from a copy of the
/// checkpoint whose tensors are stored in that dtype (as f16/bf16 checkpoints ship).
fn fixture(name: &str, dtype: DType) -> (Box<dyn CausalLM>, Value) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models").join(name);
    let text = std::fs::read_to_string(dir.join("reference.json")).unwrap();
    let opts = LoadOptions { dtype, keep_quantized: false, int8: false, native: false };
    let model = if dtype == DType::F32 {
        load_hf_dir(&dir, opts, &Device::Cpu)
    } else {
        let copy = tempfile::tempdir().unwrap();
        std::fs::copy(dir.join("config.json"), copy.path().join("config.json")).unwrap();
        let tensors = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
        let converted: HashMap<String, Tensor> =
            tensors.into_iter().map(|(k, t)| (k, t.to_dtype(dtype).unwrap())).collect();
        candle_core::safetensors::save(&converted, copy.path().join("model.safetensors")).unwrap();
        load_hf_dir(copy.path(), opts, &Device::Cpu)
    };
    let model = model.unwrap_or_else(|e| panic!("{name} ({dtype:?}): {e}"));
    (model, serde_json::from_str(&text).unwrap())
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Logit tolerance relative to the row's largest logit: float32 matches transformers' float32
/// to rounding; f16 keeps 11 significant bits and bf16 8, through every layer.
fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 1e-4,
        DType::F16 => 2e-2,
        _ => 1e-1,
    }
}

/// Returns the largest logit error relative to each row's largest absolute logit.
fn check(name: &str) -> f32 {
    check_dtype(name, DType::F32)
}

fn check_dtype(name: &str, dtype: DType) -> f32 {
    let (model, reference) = fixture(name, dtype);
    let cases = reference["cases"].as_array().unwrap();
    let caches = caches(model.as_ref(), 64);
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["prompt"])).collect();
    // Prefill every prompt in one step, all rows' logits.
    let logits = step(model.as_ref(), &caches, &prompts.iter().map(|p| (p.clone(), 0)).collect::<Vec<_>>(), true);
    let mut max_err = 0f32;
    let mut row = 0;
    for c in cases {
        for expected in c["logits"].as_array().unwrap() {
            let expected: Vec<f32> = expected.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
            let got = &logits[row];
            assert_eq!(got.len(), expected.len(), "{name}: vocabulary");
            let scale = expected.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
            let err = got.iter().zip(&expected).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
            max_err = max_err.max(err);
            row += 1;
        }
    }
    let tolerance = tolerance(dtype);
    assert!(max_err < tolerance, "{name} ({dtype:?}): logits differ by {max_err:e} (relative)");
    // Greedy: the last prompt row's argmax, then 15 decode steps with every sequence at once.
    // In float32 the continuations must be equal. In half precision a sequence may leave the
    // reference only where the reference token was a near tie: its logit within the logit
    // tolerance (twice, both sides err) of our top logit; it is not compared after that.
    let wants: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["greedy"])).collect();
    let mut diverged: Vec<Option<usize>> = vec![None; cases.len()];
    let mut outputs: Vec<Vec<u32>> = vec![Vec::new(); cases.len()];
    let mut rows: Vec<Vec<f32>> = prompts
        .iter()
        .scan(0, |end, p| {
            *end += p.len();
            Some(logits[*end - 1].clone())
        })
        .collect();
    for k in 0..16 {
        for (i, row) in rows.iter().enumerate() {
            let (ours, want) = (argmax(row), wants[i][k]);
            outputs[i].push(ours);
            if diverged[i].is_none() && ours != want {
                let scale = row.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
                let margin = (row[ours as usize] - row[want as usize]) / scale;
                assert!(
                    dtype != DType::F32 && margin <= 2.0 * tolerance,
                    "{name} ({dtype:?}): greedy continuation of {:?} is {:?}, want {:?} (step {k}, not a near tie: \
                     margin {margin:e})",
                    prompts[i],
                    outputs[i],
                    wants[i]
                );
                diverged[i] = Some(k);
            }
        }
        if k == 15 {
            break;
        }
        let seqs: Vec<(Vec<u32>, usize)> =
            prompts.iter().zip(&outputs).map(|(p, o)| (vec![*o.last().unwrap()], p.len() + o.len() - 1)).collect();
        rows = step(model.as_ref(), &caches, &seqs, false);
    }
    let left: Vec<String> = diverged.iter().flatten().map(|k| format!("step {k}")).collect();
    let greedy =
        if left.is_empty() { "greedy equal".to_string() } else { format!("greedy left at a near tie at {left:?}") };
    println!("{name} ({}, {dtype:?}): max logit error {max_err:.2e} (relative), {greedy}", reference["architecture"]);
    max_err
}

#[test]
fn llama() {
    check("llama");
}

#[test]
fn mistral_sliding_window() {
    check("mistral");
}

#[test]
fn qwen2_qkv_bias() {
    check("qwen2");
}

#[test]
fn qwen3_qk_norm() {
    check("qwen3");
}

#[test]
fn phi3_fused_projections() {
    check("phi3");
}

#[test]
fn gemma2_softcapping_alternating_windows() {
    check("gemma2");
}

#[test]
fn opt() {
    check("opt");
}

#[test]
fn gpt2() {
    check("gpt2");
}

#[test]
fn unknown_architectures_are_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), r#"{"architectures": ["FalconForCausalLM"]}"#).unwrap();
    std::fs::write(dir.path().join("model.safetensors"), b"").unwrap();
    let opts = LoadOptions { dtype: DType::F32, keep_quantized: false, int8: false, native: false };
    let err = load_hf_dir(dir.path(), opts, &Device::Cpu).err().expect("unsupported").to_string();
    assert!(
        err.contains("FalconForCausalLM") && err.contains("Gemma2ForCausalLM") && err.contains("OPTForCausalLM"),
        "{err}"
    );
}

/// The same fixtures loaded from f16 and bf16 checkpoints and run in that dtype, against the
/// float32 reference.
#[test]
fn half_precision_checkpoints() {
    for name in ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "opt", "gpt2"] {
        check_dtype(name, DType::F16);
        check_dtype(name, DType::BF16);
    }
}
