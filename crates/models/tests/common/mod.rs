//! Helpers shared by the model tests: one paged batched step over several sequences.
#![allow(dead_code)]

use candle_core::{Device, Tensor};
use vllm_kernels::{AttnMetadata, KvCache, SeqAttn};
use vllm_models::{CausalLM, StepInput};

/// Cache block size of the tests (small, so sequences span several interleaved blocks).
pub const BLOCK: usize = 4;

/// One step over several sequences: `(tokens, context before them)` each; returns the logits
/// of every row when `all_rows`, else of each sequence's last row.
pub fn step(model: &dyn CausalLM, caches: &[KvCache], seqs: &[(Vec<u32>, usize)], all_rows: bool) -> Vec<Vec<f32>> {
    step_lora(model, caches, seqs, all_rows, &[])
}

/// [`step`] with sequence `i` running with LoRA adapter `loras[i]` (none when `loras` is
/// empty or the entry is `None`).
pub fn step_lora(
    model: &dyn CausalLM,
    caches: &[KvCache],
    seqs: &[(Vec<u32>, usize)],
    all_rows: bool,
    loras: &[Option<u32>],
) -> Vec<Vec<f32>> {
    let lora = |i: usize| loras.get(i).copied().flatten();
    let adapters = (!loras.is_empty()).then(|| {
        let tokens = seqs.iter().enumerate().flat_map(|(i, (t, _))| std::iter::repeat_n(lora(i), t.len())).collect();
        let logits = seqs
            .iter()
            .enumerate()
            .flat_map(|(i, (t, _))| std::iter::repeat_n(lora(i), if all_rows { t.len() } else { 1 }))
            .collect();
        std::sync::Arc::new(vllm_models::lora::StepAdapters { tokens, logits })
    });
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
    let t = |v: Vec<u32>| Tensor::new(v, &device()).unwrap();
    let step = StepInput {
        input_ids: t(input),
        positions: t(positions),
        logits_indices: t(rows),
        attn: &meta,
        between_layers: None,
    };
    vllm_models::lora::with_step_adapters(adapters, || model.forward(&step, caches)).unwrap().to_vec2::<f32>().unwrap()
}

/// The device the model tests run on: the CPU, or the GPU with `VLLM_TEST_DEVICE=cuda` (a
/// build with `--features cuda`; asking for a GPU that is not there fails the tests, it never
/// falls back).
pub fn device() -> Device {
    match std::env::var("VLLM_TEST_DEVICE").as_deref() {
        Err(_) | Ok("") | Ok("cpu") => Device::Cpu,
        Ok("cuda") => Device::new_cuda(0).unwrap_or_else(|e| panic!("VLLM_TEST_DEVICE=cuda: {e}")),
        Ok(other) => panic!("VLLM_TEST_DEVICE={other}: cpu or cuda"),
    }
}

/// Index of the largest value (the first on ties).
pub fn argmax(row: &[f32]) -> u32 {
    row.iter().enumerate().fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) }).0
        as u32
}

/// One paged cache per layer, `blocks` blocks each.
pub fn caches(model: &dyn CausalLM, blocks: usize) -> Vec<KvCache> {
    (0..model.num_layers()).map(|_| KvCache::new(blocks, BLOCK, model.attn_shape(), &device()).unwrap()).collect()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Logit error against a reference: per row, the largest absolute difference relative to
/// the row's largest absolute logit; the largest (`max`) and the mean (`mean`) over rows.
#[derive(Debug, Clone, Copy)]
pub struct LogitError {
    pub max: f32,
    pub mean: f32,
}

/// A prefilled fixture: the caches, the prompts, every position's logits and their error.
struct Prefilled {
    caches: Vec<KvCache>,
    prompts: Vec<Vec<u32>>,
    logits: Vec<Vec<f32>>,
    error: LogitError,
}

/// Prefills a fixture's `reference.json` prompts (scripts/make_model_fixtures.py) in one
/// paged batched step and measures every position's logits.
fn prefill(model: &dyn CausalLM, reference: &serde_json::Value, loras: &[Option<u32>]) -> Prefilled {
    let cases = reference["cases"].as_array().unwrap();
    let caches = caches(model, 64);
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["prompt"])).collect();
    let logits = step_lora(model, &caches, &prompts.iter().map(|p| (p.clone(), 0)).collect::<Vec<_>>(), true, loras);
    let (mut max, mut sum, mut row) = (0f32, 0f32, 0);
    for c in cases {
        for expected in c["logits"].as_array().unwrap() {
            let expected: Vec<f32> = expected.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
            let got = &logits[row];
            assert_eq!(got.len(), expected.len(), "vocabulary");
            let scale = expected.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
            let err = got.iter().zip(&expected).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
            max = max.max(err);
            sum += err;
            row += 1;
        }
    }
    Prefilled { caches, prompts, logits, error: LogitError { max, mean: sum / row.max(1) as f32 } }
}

/// Only the prompt positions' logit error (no greedy comparison).
pub fn logit_error(model: &dyn CausalLM, reference: &serde_json::Value) -> LogitError {
    prefill(model, reference, &[]).error
}

/// Runs a fixture's `reference.json` cases through the paged batched path: every prompt
/// prefilled in one step (all rows' logits), then 15 decode steps with every sequence at once.
/// The largest logit error relative to each row's largest absolute logit must stay under
/// `tolerance`. Greedy continuations must be equal; with `near_ties` a sequence may leave the
/// reference where the reference token was a near tie (its logit within twice the tolerance
/// of our top logit) and is not compared after that.
pub fn compare(
    model: &dyn CausalLM,
    reference: &serde_json::Value,
    tolerance: f32,
    near_ties: bool,
    label: &str,
) -> LogitError {
    compare_lora(model, reference, tolerance, near_ties, label, &[])
}

/// [`compare`] with case `i` running with LoRA adapter `loras[i]` (all in the same steps).
pub fn compare_lora(
    model: &dyn CausalLM,
    reference: &serde_json::Value,
    tolerance: f32,
    near_ties: bool,
    label: &str,
    loras: &[Option<u32>],
) -> LogitError {
    let cases = reference["cases"].as_array().unwrap();
    let Prefilled { caches, prompts, logits, error } = prefill(model, reference, loras);
    let max_err = error.max;
    assert!(max_err < tolerance, "{label}: logits differ by {max_err:e} (relative)");
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
                    near_ties && margin <= 2.0 * tolerance,
                    "{label}: greedy continuation of {:?} is {:?}, want {:?} (step {k}, not a near tie: margin {margin:e})",
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
        rows = step_lora(model, &caches, &seqs, false, loras);
    }
    let left: Vec<String> = diverged.iter().flatten().map(|k| format!("step {k}")).collect();
    let greedy =
        if left.is_empty() { "greedy equal".to_string() } else { format!("greedy left at a near tie at {left:?}") };
    println!("{label}: max logit error {max_err:.2e} (relative, mean {:.2e}), {greedy}", error.mean);
    error
}
