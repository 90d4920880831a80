//! CPU kernels over plain slices: writing K/V into the paged cache and attending through
//! block tables for a flattened batch of prompt chunks and decode tokens.

use rayon::prelude::*;

use crate::{AttnMetadata, AttnShape};

/// Writes each new token's key/value (`[num_tokens, kv_width]`) into its cache slot
/// (`slot = block_id * block_size + offset`; the cache is `[num_slots, kv_width]`).
/// Slots `< 0` are padding and skipped.
pub fn reshape_and_cache(src: &[f32], cache: &mut [f32], slot_mapping: &[i64], kv_width: usize) {
    debug_assert_eq!(src.len(), slot_mapping.len() * kv_width);
    for (t, &slot) in slot_mapping.iter().enumerate() {
        if slot < 0 {
            continue;
        }
        let dst = slot as usize * kv_width;
        cache[dst..dst + kv_width].copy_from_slice(&src[t * kv_width..(t + 1) * kv_width]);
    }
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent accumulators let the compiler vectorise without reassociation flags.
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += a[c * 8 + l] * b[c * 8 + l];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for i in chunks * 8..a.len() {
        s += a[i] * b[i];
    }
    s
}

/// Causal attention for every query token of the batch through the paged cache.
///
/// `q` and `out` are `[num_tokens, num_heads, head_dim]`; the caches are
/// `[num_blocks, block_size, num_kv_heads, head_dim]` and already hold this step's K/V.
/// Query `i` of a sequence sits at position `context_len - query_len + i` and attends to
/// every cached position up to and including its own. The result for a token does not
/// depend on which other sequences share the batch.
pub fn paged_attention(
    q: &[f32],
    key_cache: &[f32],
    value_cache: &[f32],
    meta: &AttnMetadata,
    shape: AttnShape,
    scale: f32,
    out: &mut [f32],
) {
    let AttnShape { num_heads, num_kv_heads, head_dim } = shape;
    let group = num_heads / num_kv_heads;
    let bs = meta.block_size;
    let num_tokens = meta.num_tokens();
    debug_assert_eq!(q.len(), num_tokens * num_heads * head_dim);
    debug_assert_eq!(out.len(), q.len());

    // token index -> (sequence index, absolute position)
    let mut token_seq = Vec::with_capacity(num_tokens);
    for (si, s) in meta.seqs.iter().enumerate() {
        let first = s.context_len - s.query_len;
        for i in 0..s.query_len {
            token_seq.push((si, first + i));
        }
    }

    out.par_chunks_mut(head_dim).enumerate().for_each_init(Vec::new, |scores: &mut Vec<f32>, (idx, o)| {
        let t = idx / num_heads;
        let h = idx % num_heads;
        let kvh = h / group;
        let (si, pos) = token_seq[t];
        let table = &meta.seqs[si].block_table;
        let qv = &q[idx * head_dim..(idx + 1) * head_dim];
        let n = pos + 1;
        scores.clear();
        let mut max = f32::NEG_INFINITY;
        for j in 0..n {
            let slot = table[j / bs] as usize * bs + j % bs;
            let base = (slot * num_kv_heads + kvh) * head_dim;
            let s = dot(qv, &key_cache[base..base + head_dim]) * scale;
            max = max.max(s);
            scores.push(s);
        }
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        o.fill(0.0);
        for (j, &p) in scores.iter().enumerate() {
            let slot = table[j / bs] as usize * bs + j % bs;
            let base = (slot * num_kv_heads + kvh) * head_dim;
            let w = p * inv;
            for (od, vd) in o.iter_mut().zip(&value_cache[base..base + head_dim]) {
                *od += w * vd;
            }
        }
    });
}
