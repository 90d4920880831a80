//! CPU kernels over plain slices: writing K/V into the paged cache and attending through
//! block tables for a flattened batch of prompt chunks and decode tokens.

use multiversion::multiversion;
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

/// Query tokens of one sequence handled together (they share every key and value load).
const QUERY_TILE: usize = 16;

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Sixteen independent lanes let the compiler vectorise without reassociation flags.
    let mut acc = [0f32; 16];
    let mut ca = a.chunks_exact(16);
    let mut cb = b.chunks_exact(16);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s += x * y;
    }
    s
}

/// One unit of work: query tokens `first..first + rows / group` of one sequence (positions
/// `pos0..`) for the `group` query heads sharing KV head `kvh`.
struct Unit {
    seq: usize,
    kvh: usize,
    /// Index of the unit's first query token in the batch.
    token: usize,
    /// Query tokens in the unit.
    tokens: usize,
    /// Absolute position of the first of them.
    pos0: usize,
}

/// Causal attention for every query token of the batch through the paged cache.
///
/// `q` and `out` are `[num_tokens, num_heads, head_dim]`; the caches are
/// `[num_blocks, block_size, num_kv_heads, head_dim]` and already hold this step's K/V.
/// Query `i` of a sequence sits at position `context_len - query_len + i` and attends to
/// every cached position up to and including its own. The result for a token does not
/// depend on which other sequences share the batch.
///
/// Work is split into (sequence, KV head, tile of up to 16 query tokens) units, so each key
/// and value row is loaded once for all the query heads of its group and all the tile's
/// tokens; the arithmetic is compiled for AVX-512 / AVX2 / NEON and picked at run time.
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
    let num_tokens = meta.num_tokens();
    debug_assert_eq!(q.len(), num_tokens * num_heads * head_dim);
    debug_assert_eq!(out.len(), q.len());

    let mut units = Vec::new();
    let mut token = 0;
    for (seq, s) in meta.seqs.iter().enumerate() {
        let first = s.context_len - s.query_len;
        let mut i = 0;
        while i < s.query_len {
            let tokens = QUERY_TILE.min(s.query_len - i);
            for kvh in 0..num_kv_heads {
                units.push(Unit { seq, kvh, token: token + i, tokens, pos0: first + i });
            }
            i += tokens;
        }
        token += s.query_len;
    }
    let results: Vec<Vec<f32>> = units
        .par_iter()
        .map_init(Scratch::default, |scratch, u| attend_unit(q, key_cache, value_cache, meta, shape, scale, u, scratch))
        .collect();
    let group = num_heads / num_kv_heads;
    let width = group * head_dim;
    for (u, r) in units.iter().zip(&results) {
        for t in 0..u.tokens {
            let dst = ((u.token + t) * num_heads + u.kvh * group) * head_dim;
            out[dst..dst + width].copy_from_slice(&r[t * width..(t + 1) * width]);
        }
    }
}

/// Keys scored together by the transposed-key path.
const KEY_CHUNK: usize = 16;
/// Tiles with at least this many query rows (tokens x heads of a group) transpose each chunk
/// of keys once and score it with broadcast FMAs; smaller ones (decode) use dot products.
const TRANSPOSE_MIN_ROWS: usize = 8;

/// `e^x` for `x <= 0` (softmax inputs after subtracting the max) without a libm call, so
/// loops over it vectorize: `x = i ln 2 + f` (Cody-Waite split of ln 2 keeps `f` exact),
/// `e^f` by its degree-6 Taylor polynomial on `|f| <= ln 2 / 2`, `2^i` as exponent bits.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.max(-87.0);
    let i = (x * std::f32::consts::LOG2_E).round_ties_even();
    let f = (x - i * LN2_HI) - i * LN2_LO;
    let p = 1.0 + f * (1.0 + f * (0.5 + f * (1.0 / 6.0 + f * (1.0 / 24.0 + f * (1.0 / 120.0 + f * (1.0 / 720.0))))));
    p * f32::from_bits(((i as i32 + 127) as u32) << 23)
}

/// The unit's output, `[tokens][group][head_dim]`. `scores` is scratch.
#[allow(clippy::too_many_arguments)]
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
fn attend_unit(
    q: &[f32],
    key_cache: &[f32],
    value_cache: &[f32],
    meta: &AttnMetadata,
    shape: AttnShape,
    scale: f32,
    u: &Unit,
    scratch: &mut Scratch,
) -> Vec<f32> {
    let AttnShape { num_heads, num_kv_heads, head_dim } = shape;
    let group = num_heads / num_kv_heads;
    let bs = meta.block_size;
    let table = &meta.seqs[u.seq].block_table;
    let rows = u.tokens * group;
    // Keys visible to the tile's last token; row (t, g) sees the first pos0 + t + 1 of them.
    let n = u.pos0 + u.tokens;
    let Scratch { scores, offsets, kt, qs } = scratch;
    // Cache offset of each key row (block-table lookups once per unit, not per query).
    offsets.clear();
    for (b, &block) in table.iter().enumerate().take(n.div_ceil(bs)) {
        let first = block as usize * bs;
        for c in 0..bs.min(n - b * bs) {
            offsets.push(((first + c) * num_kv_heads + u.kvh) * head_dim);
        }
    }
    // The tile's queries, contiguous `[rows][head_dim]` and pre-scaled.
    qs.clear();
    for t in 0..u.tokens {
        let base = ((u.token + t) * num_heads + u.kvh * group) * head_dim;
        qs.extend(q[base..base + group * head_dim].iter().map(|v| v * scale));
    }
    let visible = |r: usize| u.pos0 + r / group + 1;
    scores.clear();
    scores.resize(rows * n, 0.0);
    if rows >= TRANSPOSE_MIN_ROWS {
        kt.resize(head_dim * KEY_CHUNK, 0.0);
        for j0 in (0..n).step_by(KEY_CHUNK) {
            let cnt = KEY_CHUNK.min(n - j0);
            for (c, &off) in offsets[j0..j0 + cnt].iter().enumerate() {
                for (d, &k) in key_cache[off..off + head_dim].iter().enumerate() {
                    kt[d * KEY_CHUNK + c] = k;
                }
            }
            for r in 0..rows {
                if visible(r) <= j0 {
                    continue;
                }
                let mut acc = [0f32; KEY_CHUNK];
                for (d, &qd) in qs[r * head_dim..(r + 1) * head_dim].iter().enumerate() {
                    let kd = &kt[d * KEY_CHUNK..(d + 1) * KEY_CHUNK];
                    for c in 0..KEY_CHUNK {
                        acc[c] += qd * kd[c];
                    }
                }
                scores[r * n + j0..r * n + j0 + cnt].copy_from_slice(&acc[..cnt]);
            }
        }
    } else {
        for (j, &off) in offsets.iter().enumerate() {
            let k = &key_cache[off..off + head_dim];
            for r in 0..rows {
                if visible(r) > j {
                    scores[r * n + j] = dot(&qs[r * head_dim..(r + 1) * head_dim], k);
                }
            }
        }
    }
    let mut out = vec![0f32; rows * head_dim];
    for r in 0..rows {
        let row = &mut scores[r * n..r * n + visible(r)];
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        for s in row.iter_mut() {
            *s = exp_nonpositive(*s - max);
        }
        let mut lanes = [0f32; 16];
        let mut chunks = row.chunks_exact(16);
        for ch in &mut chunks {
            for l in 0..16 {
                lanes[l] += ch[l];
            }
        }
        let inv = 1.0 / (lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>());
        let o = &mut out[r * head_dim..(r + 1) * head_dim];
        for (&p, &off) in row.iter().zip(offsets.iter()) {
            let w = p * inv;
            for (od, vd) in o.iter_mut().zip(&value_cache[off..off + head_dim]) {
                *od += w * vd;
            }
        }
    }
    out
}

/// Per-thread scratch buffers of [`attend_unit`].
#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    offsets: Vec<usize>,
    kt: Vec<f32>,
    qs: Vec<f32>,
}

#[cfg(test)]
mod tests {
    use super::exp_nonpositive;

    #[test]
    fn fast_exp_matches_libm() {
        let mut x = 0f32;
        while x > -100.0 {
            let (want, got) = (x.exp(), exp_nonpositive(x));
            assert!((got - want).abs() <= 4e-7 * want + 1e-37, "exp({x}): {got} vs {want}");
            x -= 0.013;
        }
        assert_eq!(exp_nonpositive(0.0), 1.0);
    }
}
