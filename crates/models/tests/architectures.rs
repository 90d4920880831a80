//! Every architecture against `transformers`: tiny random checkpoints written by
//! `scripts/make_model_fixtures.py` (fixtures/models/<name>/), run through the paged batched
//! path (all prompts prefilled in one step, then decoded together one token per step, blocks
//! of 4 interleaved between sequences). Float32 logits of every prompt position within 1e-4
//! of the reference (relative to the row's largest logit), 16-token greedy continuations equal.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use vllm_kernels::{AttnMetadata, KvCache, SeqAttn};
use vllm_models::{load_hf_dir, CausalLM, LoadOptions, StepInput};

const BLOCK: usize = 4;

fn fixture(name: &str) -> (Box<dyn CausalLM>, Value) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models").join(name);
    let opts = LoadOptions { dtype: DType::F32, keep_quantized: false, int8: false };
    let model = load_hf_dir(&dir, opts, &Device::Cpu).unwrap_or_else(|e| panic!("{name}: {e}"));
    let text = std::fs::read_to_string(dir.join("reference.json")).unwrap();
    (model, serde_json::from_str(&text).unwrap())
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// One step over several sequences: `(tokens, context before them)` each; returns the logits
/// of every row when `all_rows`, else of each sequence's last row.
fn step(model: &dyn CausalLM, caches: &[KvCache], seqs: &[(Vec<u32>, usize)], all_rows: bool) -> Vec<Vec<f32>> {
    let n = seqs.len();
    let mut input = Vec::new();
    let mut positions = Vec::new();
    let mut rows = Vec::new();
    let mut attn = Vec::new();
    for (i, (toks, ctx)) in seqs.iter().enumerate() {
        let first = input.len();
        input.extend(toks);
        positions.extend((*ctx..ctx + toks.len()).map(|p| p as u32));
        if all_rows {
            rows.extend((first..input.len()).map(|r| r as u32));
        } else {
            rows.push(input.len() as u32 - 1);
        }
        let len = ctx + toks.len();
        // Sequence i owns blocks i, i + n, i + 2n, ...: interleaved, never contiguous.
        let table = (0..len.div_ceil(BLOCK)).map(|b| (i + b * n) as u32).collect();
        attn.push(SeqAttn { query_len: toks.len(), context_len: len, block_table: table });
    }
    let meta = AttnMetadata::new(BLOCK, attn);
    let t = |v: Vec<u32>| Tensor::new(v, &Device::Cpu).unwrap();
    let step = StepInput { input_ids: t(input), positions: t(positions), logits_indices: t(rows), attn: &meta };
    model.forward(&step, caches).unwrap().to_vec2::<f32>().unwrap()
}

fn argmax(row: &[f32]) -> u32 {
    row.iter().enumerate().fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) }).0
        as u32
}

/// Returns the largest logit error relative to each row's largest absolute logit.
fn check(name: &str) -> f32 {
    let (model, reference) = fixture(name);
    let cases = reference["cases"].as_array().unwrap();
    let caches: Vec<KvCache> =
        (0..model.num_layers()).map(|_| KvCache::new(64, BLOCK, model.attn_shape(), &Device::Cpu).unwrap()).collect();
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["prompt"])).collect();
    // Prefill every prompt in one step, all rows' logits.
    let logits = step(model.as_ref(), &caches, &prompts.iter().map(|p| (p.clone(), 0)).collect::<Vec<_>>(), true);
    let mut max_err = 0f32;
    let mut row = 0;
    for (c, p) in cases.iter().zip(&prompts) {
        for expected in c["logits"].as_array().unwrap() {
            let expected: Vec<f32> = expected.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
            let got = &logits[row];
            assert_eq!(got.len(), expected.len(), "{name}: vocabulary");
            let scale = expected.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
            let err = got.iter().zip(&expected).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
            max_err = max_err.max(err);
            row += 1;
        }
        let _ = p;
    }
    assert!(max_err < 1e-4, "{name}: logits differ by {max_err:e} (relative)");
    // Greedy: the last prompt row's argmax, then 15 decode steps with every sequence at once.
    let mut last: Vec<u32> = prompts
        .iter()
        .scan(0, |end, p| {
            *end += p.len();
            Some(argmax(&logits[*end - 1]))
        })
        .collect();
    let mut outputs: Vec<Vec<u32>> = last.iter().map(|&t| vec![t]).collect();
    for _ in 1..16 {
        let seqs: Vec<(Vec<u32>, usize)> =
            prompts.iter().zip(&outputs).zip(&last).map(|((p, o), &t)| (vec![t], p.len() + o.len() - 1)).collect();
        let rows = step(model.as_ref(), &caches, &seqs, false);
        last = rows.iter().map(|r| argmax(r)).collect();
        for (o, &t) in outputs.iter_mut().zip(&last) {
            o.push(t);
        }
    }
    for (c, o) in cases.iter().zip(&outputs) {
        assert_eq!(o, &ids(&c["greedy"]), "{name}: greedy continuation of {:?}", ids(&c["prompt"]));
    }
    println!("{name} ({}): max logit error {max_err:.2e} (relative), greedy equal", reference["architecture"]);
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
    let opts = LoadOptions { dtype: DType::F32, keep_quantized: false, int8: false };
    let err = load_hf_dir(dir.path(), opts, &Device::Cpu).err().expect("unsupported").to_string();
    assert!(
        err.contains("FalconForCausalLM") && err.contains("Gemma2ForCausalLM") && err.contains("OPTForCausalLM"),
        "{err}"
    );
}
