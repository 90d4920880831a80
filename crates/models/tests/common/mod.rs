//! Helpers shared by the model tests: one paged batched step over several sequences.

use candle_core::{Device, Tensor};
use vllm_kernels::{AttnMetadata, KvCache, SeqAttn};
use vllm_models::{CausalLM, StepInput};

/// Cache block size of the tests (small, so sequences span several interleaved blocks).
pub const BLOCK: usize = 4;

/// One step over several sequences: `(tokens, context before them)` each; returns the logits
/// of every row when `all_rows`, else of each sequence's last row.
pub fn step(model: &dyn CausalLM, caches: &[KvCache], seqs: &[(Vec<u32>, usize)], all_rows: bool) -> Vec<Vec<f32>> {
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
    let step = StepInput {
        input_ids: t(input),
        positions: t(positions),
        logits_indices: t(rows),
        attn: &meta,
        between_layers: None,
    };
    model.forward(&step, caches).unwrap().to_vec2::<f32>().unwrap()
}

/// Index of the largest value (the first on ties).
pub fn argmax(row: &[f32]) -> u32 {
    row.iter().enumerate().fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) }).0
        as u32
}

/// One paged cache per layer, `blocks` blocks each.
pub fn caches(model: &dyn CausalLM, blocks: usize) -> Vec<KvCache> {
    (0..model.num_layers()).map(|_| KvCache::new(blocks, BLOCK, model.attn_shape(), &Device::Cpu).unwrap()).collect()
}
