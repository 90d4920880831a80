//! CPU kernels over plain slices: writing K/V into the paged cache and attending through
//! block tables for a flattened batch of prompt chunks and decode tokens.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use multiversion::multiversion;
use rayon::prelude::*;

use crate::{AttnMetadata, AttnParams, AttnShape};

/// A paged cache's storage as the attention kernel reads it: float32, or half precision
/// (converted to float32 a key block and a value row at a time, with the CPU's conversion
/// instructions where it has them).
#[derive(Debug, Clone, Copy)]
pub enum KvSlice<'a> {
    /// float32 values, read in place.
    F32(&'a [f32]),
    /// IEEE half precision.
    F16(&'a [f16]),
    /// bfloat16.
    BF16(&'a [bf16]),
}

impl<'a> From<&'a [f32]> for KvSlice<'a> {
    fn from(s: &'a [f32]) -> Self {
        Self::F32(s)
    }
}

impl<'a> KvSlice<'a> {
    /// Values `start..start + len` as float32: in place for a float32 cache, else converted
    /// into `buf`.
    #[inline]
    fn read<'b>(self, start: usize, len: usize, buf: &'b mut Vec<f32>) -> &'b [f32]
    where
        'a: 'b,
    {
        match self {
            Self::F32(s) => &s[start..start + len],
            Self::F16(s) => {
                buf.resize(len, 0.0);
                f16_to_f32(&s[start..start + len], buf);
                buf
            }
            Self::BF16(s) => {
                buf.resize(len, 0.0);
                bf16_to_f32(&s[start..start + len], buf);
                buf
            }
        }
    }
}

/// float16 to float32, 16 values an instruction with AVX-512, else `half`'s slice conversion
/// (F16C where the CPU has it). That conversion calls a function per 8 values and checks the
/// CPU's features on every call: 7% of a one-stream decode step at 512-token contexts went
/// there.
fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "conversion lengths");
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F; the lengths are equal (asserted).
        #[allow(unsafe_code)]
        return unsafe { f16_to_f32_avx512(src, dst) };
    }
    src.convert_to_f32_slice(dst);
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f")]
unsafe fn f16_to_f32_avx512(src: &[f16], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = src.len() / 16 * 16;
    let (s, d) = (src.as_ptr() as *const u8, dst.as_mut_ptr());
    for i in (0..n).step_by(16) {
        // SAFETY: i + 16 <= n <= both lengths.
        let v = _mm256_loadu_si256(s.add(2 * i) as *const __m256i);
        _mm512_storeu_ps(d.add(i), _mm512_cvtph_ps(v));
    }
    src[n..].convert_to_f32_slice(&mut dst[n..]);
}

/// bfloat16 to float32: the bits shifted into the upper half (the compiler vectorizes it).
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
fn bf16_to_f32(src: &[bf16], dst: &mut [f32]) {
    for (o, v) in dst.iter_mut().zip(src) {
        *o = f32::from_bits(u32::from(v.to_bits()) << 16);
    }
}

/// Writes each new token's keys (`[num_tokens, num_kv_heads, head_dim]`) into the key cache,
/// laid out `[num_blocks, num_kv_heads, head_dim, block_size]`: a block's keys are stored
/// transposed, so attention scores a whole block with broadcast FMAs and no shuffles.
/// Slots `< 0` are padding and skipped.
pub fn reshape_and_cache_keys<T: Copy>(
    src: &[T],
    cache: &mut [T],
    slot_mapping: &[i64],
    num_kv_heads: usize,
    head_dim: usize,
    block_size: usize,
) {
    let width = num_kv_heads * head_dim;
    debug_assert_eq!(src.len(), slot_mapping.len() * width);
    for (t, &slot) in slot_mapping.iter().enumerate() {
        if slot < 0 {
            continue;
        }
        let (block, off) = (slot as usize / block_size, slot as usize % block_size);
        for (i, &v) in src[t * width..(t + 1) * width].iter().enumerate() {
            cache[(block * width + i) * block_size + off] = v;
        }
    }
}

/// Writes each new token's value (`[num_tokens, kv_width]`) into its cache slot
/// (`slot = block_id * block_size + offset`; the cache is `[num_slots, kv_width]`).
/// Slots `< 0` are padding and skipped.
pub fn reshape_and_cache<T: Copy>(src: &[T], cache: &mut [T], slot_mapping: &[i64], kv_width: usize) {
    debug_assert_eq!(src.len(), slot_mapping.len() * kv_width);
    for (t, &slot) in slot_mapping.iter().enumerate() {
        if slot < 0 {
            continue;
        }
        let dst = slot as usize * kv_width;
        cache[dst..dst + kv_width].copy_from_slice(&src[t * kv_width..(t + 1) * kv_width]);
    }
}

/// Copies whole blocks of `block_len` elements, `(src, dst)`, in order. Both cache layouts
/// keep each block contiguous, so one routine serves keys and values.
pub fn copy_blocks<T: Copy>(cache: &mut [T], pairs: &[(u32, u32)], block_len: usize) {
    for &(src, dst) in pairs {
        let (s, d) = (src as usize * block_len, dst as usize * block_len);
        cache.copy_within(s..s + block_len, d);
    }
}

/// `x[i] = exp((x[i] - shift) * scale)` for values `<= shift` with `scale >= 0` (softmax
/// numerators relative to the row maximum, as the sampler needs them), vectorized.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma+sse4.1", "aarch64+neon"))]
pub fn exp_shifted(x: &mut [f32], shift: f32, scale: f32) {
    for v in x.iter_mut() {
        *v = exp_nonpositive(((*v - shift) * scale).min(0.0));
    }
}

/// Exact GELU, `x * (1 + erf(x / sqrt 2)) / 2` (BERT's `gelu`), of `x` into `out`, vectorized
/// and split over the thread pool. erfc by Numerical Recipes' Chebyshev fit (relative error
/// below 1.2e-7) with our polynomial `exp`, instead of a scalar libm `erf` call per value.
pub fn gelu_erf(x: &[f32], out: &mut [f32]) {
    const CHUNK: usize = 8192;
    out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(o, x)| gelu_erf_chunk(x, o));
}

#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
fn gelu_erf_chunk(x: &[f32], out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = gelu_erf_one(v);
    }
}

#[inline(always)]
fn gelu_erf_one(x: f32) -> f32 {
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -1.265_512_2
        + t * (1.000_023_7
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_204 + t * (1.488_515_9 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let erfc = t * exp_nonpositive((poly - z * z).min(0.0));
    0.5 * x * if x >= 0.0 { 2.0 - erfc } else { erfc }
}

/// The largest value of `x` (NaN is ignored; `-inf` for an empty or all-NaN slice),
/// vectorized.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
pub fn max_value(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = x.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    rest.iter().chain(&lanes).fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// Query tokens of one sequence handled together (they share every key and value load).
const QUERY_TILE: usize = 16;

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
/// `q` and `out` are `[num_tokens, num_heads, head_dim]`; the key cache is
/// `[num_blocks, num_kv_heads, head_dim, block_size]` (see [`reshape_and_cache_keys`]), the
/// value cache `[num_blocks, block_size, num_kv_heads, head_dim]`; both already hold this
/// step's K/V.
/// Query `i` of a sequence sits at position `context_len - query_len + i` and attends to
/// every cached position up to and including its own. The result for a token does not
/// depend on which other sequences share the batch.
///
/// Work is split into (sequence, KV head, tile of up to 16 query tokens) units, so each key
/// block and value row is loaded once for all the query heads of its group and all the tile's
/// tokens; the arithmetic is compiled for AVX-512 / AVX2 / NEON and picked at run time.
pub fn paged_attention<'a>(
    q: &[f32],
    key_cache: impl Into<KvSlice<'a>>,
    value_cache: impl Into<KvSlice<'a>>,
    meta: &AttnMetadata,
    shape: AttnShape,
    params: AttnParams,
    out: &mut [f32],
) {
    let (key_cache, value_cache) = (key_cache.into(), value_cache.into());
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
    let mut results: Vec<Vec<f32>> = vec![Vec::new(); units.len()];
    crate::team::for_each_chunk_mut(&mut results, 1, |i, r| {
        SCRATCH.with(|s| {
            r[0] = attend_unit(q, key_cache, value_cache, meta, shape, params, &units[i], &mut s.borrow_mut());
        })
    });
    let group = num_heads / num_kv_heads;
    let width = group * head_dim;
    for (u, r) in units.iter().zip(&results) {
        for t in 0..u.tokens {
            let dst = ((u.token + t) * num_heads + u.kvh * group) * head_dim;
            out[dst..dst + width].copy_from_slice(&r[t * width..(t + 1) * width]);
        }
    }
}

/// Block size of the register-tiled scoring path (the default block size).
const KEY_BLOCK: usize = 16;

/// Scores of `NR` query rows (`qs` is `[NR][head_dim]`) against one full 16-key block
/// (`kt` is `[head_dim][16]`): `NR` independent FMA chains sharing each key load.
#[inline(always)]
fn score_block<const NR: usize>(qs: &[f32], kt: &[f32], head_dim: usize) -> [[f32; KEY_BLOCK]; NR] {
    let mut acc = [[0f32; KEY_BLOCK]; NR];
    for d in 0..head_dim {
        let k: &[f32; KEY_BLOCK] = kt[d * KEY_BLOCK..(d + 1) * KEY_BLOCK].try_into().expect("16 keys");
        for (i, a) in acc.iter_mut().enumerate() {
            let qd = qs[i * head_dim + d];
            for c in 0..KEY_BLOCK {
                a[c] += qd * k[c];
            }
        }
    }
    acc
}

/// `out[i] = sum_j p[i][j] * V[j]` for `NR` rows of probabilities (`p` rows are `n` apart,
/// `keys` of them used) with `D`-wide value rows: the accumulators stay in registers and each
/// value row is loaded once for all `NR` rows.
#[inline(always)]
fn weighted_values<const D: usize, const NR: usize>(
    p: &[f32],
    n: usize,
    keys: usize,
    offsets: &[usize],
    value_cache: &[f32],
    out: &mut [f32],
) {
    let mut acc = [[0f32; D]; NR];
    for (j, &off) in offsets.iter().enumerate().take(keys) {
        let v: &[f32; D] = value_cache[off..off + D].try_into().expect("D values");
        for (i, a) in acc.iter_mut().enumerate() {
            let w = p[i * n + j];
            for d in 0..D {
                a[d] += w * v[d];
            }
        }
    }
    for (o, a) in out.chunks_exact_mut(D).zip(&acc) {
        o.copy_from_slice(a);
    }
}

/// `e^x` for `x <= 0` (softmax inputs after subtracting the max) without a libm call, so
/// loops over it vectorize: `x = i ln 2 + f` (Cody-Waite split of ln 2 keeps `f` exact),
/// `e^f` by its degree-6 Taylor polynomial on `|f| <= ln 2 / 2`, `2^i` as exponent bits.
/// `i` is rounded by adding 1.5 * 2^23 (it lands in the low mantissa bits), not by a float
/// to integer cast: Rust's saturating casts would scalarize the loop.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const SHIFTER: f32 = 12_582_912.0;
    let x = x.max(-87.0);
    let r = x * std::f32::consts::LOG2_E + SHIFTER;
    let i = r - SHIFTER;
    let f = (x - i * LN2_HI) - i * LN2_LO;
    let p = 1.0 + f * (1.0 + f * (0.5 + f * (1.0 / 6.0 + f * (1.0 / 24.0 + f * (1.0 / 120.0 + f * (1.0 / 720.0))))));
    // i in [-126, 0]: its two's complement sits in r's low bits; add the exponent bias.
    p * f32::from_bits(r.to_bits().wrapping_sub(SHIFTER.to_bits()).wrapping_add(127) << 23)
}

/// The unit's output, `[tokens][group][head_dim]`; `scratch` holds reusable buffers.
#[allow(clippy::too_many_arguments)]
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
fn attend_unit(
    q: &[f32],
    key_cache: KvSlice,
    value_cache: KvSlice,
    meta: &AttnMetadata,
    shape: AttnShape,
    params: AttnParams,
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
    let Scratch { scores, offsets, qs, keys: key_buf, values: value_buf, row } = scratch;
    // Value-cache offset of each key position (block-table lookups once per unit).
    offsets.clear();
    for (b, &block) in table.iter().enumerate().take(n.div_ceil(bs)) {
        let first = block as usize * bs;
        for c in 0..bs.min(n - b * bs) {
            offsets.push(((first + c) * num_kv_heads + u.kvh) * head_dim);
        }
    }
    // A half-precision value cache is read once per unit into contiguous float32 rows.
    let value_cache: &[f32] = match value_cache {
        KvSlice::F32(v) => v,
        half => {
            value_buf.clear();
            for off in offsets.iter_mut() {
                value_buf.extend_from_slice(half.read(*off, head_dim, row));
                *off = value_buf.len() - head_dim;
            }
            value_buf
        }
    };
    // The tile's queries, contiguous `[rows][head_dim]` and pre-scaled.
    qs.clear();
    for t in 0..u.tokens {
        let base = ((u.token + t) * num_heads + u.kvh * group) * head_dim;
        qs.extend(q[base..base + group * head_dim].iter().map(|v| v * params.scale));
    }
    let visible = |r: usize| u.pos0 + r / group + 1;
    scores.clear();
    scores.resize(rows * n, 0.0);
    // Scores a block at a time: keys are stored `[head_dim][block_size]`, so each query
    // element multiplies a contiguous run of the block's keys.
    for (b, &block) in table.iter().enumerate().take(n.div_ceil(bs)) {
        let j0 = b * bs;
        let cnt = bs.min(n - j0);
        let kt = key_cache.read((block as usize * num_kv_heads + u.kvh) * head_dim * bs, head_dim * bs, key_buf);
        // Rows (t, g) with t >= j0 - pos0 see at least one key of this block.
        let r_min = j0.saturating_sub(u.pos0) * group;
        if cnt == KEY_BLOCK && bs == KEY_BLOCK {
            let mut r = r_min;
            while r < rows {
                let nr = 4.min(rows - r);
                let q = &qs[r * head_dim..(r + nr) * head_dim];
                let mut put =
                    |i: usize, a: &[f32; KEY_BLOCK]| scores[(r + i) * n + j0..][..KEY_BLOCK].copy_from_slice(a);
                match nr {
                    4 => score_block::<4>(q, kt, head_dim).iter().enumerate().for_each(|(i, a)| put(i, a)),
                    3 => score_block::<3>(q, kt, head_dim).iter().enumerate().for_each(|(i, a)| put(i, a)),
                    2 => score_block::<2>(q, kt, head_dim).iter().enumerate().for_each(|(i, a)| put(i, a)),
                    _ => score_block::<1>(q, kt, head_dim).iter().enumerate().for_each(|(i, a)| put(i, a)),
                }
                r += nr;
            }
        } else {
            for r in r_min..rows {
                let srow = &mut scores[r * n + j0..r * n + j0 + cnt];
                for (d, &qd) in qs[r * head_dim..(r + 1) * head_dim].iter().enumerate() {
                    for (s, &k) in srow.iter_mut().zip(&kt[d * bs..d * bs + cnt]) {
                        *s += qd * k;
                    }
                }
            }
        }
    }
    // Softmax of each row over its visible keys; the invisible rest becomes 0 so rows of
    // different lengths can share the value pass.
    for r in 0..rows {
        let vis = visible(r);
        let (row, hidden) = scores[r * n..(r + 1) * n].split_at_mut(vis);
        hidden.fill(0.0);
        // A sliding window sees only the last `w` keys (itself included), like Hugging Face's
        // `kv_idx > q_idx - sliding_window`.
        let lo = params.sliding_window.map_or(0, |w| vis.saturating_sub(w));
        let (outside, row) = row.split_at_mut(lo);
        outside.fill(0.0);
        if let Some(cap) = params.softcap {
            let inv = 1.0 / cap;
            row.iter_mut().for_each(|s| *s = cap * (*s * inv).tanh());
        }
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
        for s in row.iter_mut() {
            *s *= inv;
        }
    }
    let mut out = vec![0f32; rows * head_dim];
    let mut r = 0;
    while r < rows {
        let nr = 4.min(rows - r);
        let keys = visible(r + nr - 1);
        let p = &scores[r * n..];
        let o = &mut out[r * head_dim..(r + nr) * head_dim];
        match (head_dim, nr) {
            (64, 4) => weighted_values::<64, 4>(p, n, keys, offsets, value_cache, o),
            (64, 3) => weighted_values::<64, 3>(p, n, keys, offsets, value_cache, o),
            (64, 2) => weighted_values::<64, 2>(p, n, keys, offsets, value_cache, o),
            (64, 1) => weighted_values::<64, 1>(p, n, keys, offsets, value_cache, o),
            (128, 2) => weighted_values::<128, 2>(p, n, keys, offsets, value_cache, o),
            (128, 1) => weighted_values::<128, 1>(p, n, keys, offsets, value_cache, o),
            (128, _) => {
                weighted_values::<128, 2>(p, n, keys, offsets, value_cache, &mut o[..2 * head_dim]);
                r += 2;
                continue;
            }
            _ => {
                for i in 0..nr {
                    let oi = &mut o[i * head_dim..(i + 1) * head_dim];
                    for (j, &off) in offsets.iter().enumerate().take(keys) {
                        let w = p[i * n + j];
                        for (od, vd) in oi.iter_mut().zip(&value_cache[off..off + head_dim]) {
                            *od += w * vd;
                        }
                    }
                }
            }
        }
        r += nr;
    }
    out
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// Per-thread scratch buffers of [`attend_unit`].
#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    offsets: Vec<usize>,
    qs: Vec<f32>,
    /// One key block of a half-precision cache, as float32.
    keys: Vec<f32>,
    /// The unit's value rows of a half-precision cache, as float32.
    values: Vec<f32>,
    /// One converted value row.
    row: Vec<f32>,
}

#[cfg(test)]
mod tests {
    use half::{bf16, f16};

    use super::{bf16_to_f32, exp_nonpositive, f16_to_f32, gelu_erf};

    #[test]
    fn half_precision_reads_convert_every_bit_pattern_exactly() {
        // Every 16-bit pattern, at an odd length so the vector loop's tail runs too.
        let bits: Vec<u16> = (0..=u16::MAX).chain(0..7).collect();
        let h: Vec<f16> = bits.iter().map(|&b| f16::from_bits(b)).collect();
        let b: Vec<bf16> = bits.iter().map(|&b| bf16::from_bits(b)).collect();
        let mut out = vec![0f32; bits.len()];
        f16_to_f32(&h, &mut out);
        for (v, o) in h.iter().zip(&out) {
            let want = v.to_f32();
            assert!(want.to_bits() == o.to_bits() || (want.is_nan() && o.is_nan()), "f16 {:#06x}", v.to_bits());
        }
        bf16_to_f32(&b, &mut out);
        for (v, o) in b.iter().zip(&out) {
            let want = v.to_f32();
            assert!(want.to_bits() == o.to_bits() || (want.is_nan() && o.is_nan()), "bf16 {:#06x}", v.to_bits());
        }
    }

    /// erf by its Taylor series (|x| < 3) or asymptotic expansion, in f64.
    fn erf_ref(x: f64) -> f64 {
        if x.abs() < 3.0 {
            let (mut term, mut sum, mut n) = (x, x, 0.0);
            while term.abs() > 1e-17 {
                n += 1.0;
                term *= -x * x / n;
                sum += term / (2.0 * n + 1.0);
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            let z = x.abs();
            let (mut term, mut sum) = (1.0, 1.0);
            for k in 1..8 {
                term *= -(2.0 * k as f64 - 1.0) / (2.0 * z * z);
                sum += term;
            }
            x.signum() * (1.0 - (-z * z).exp() / (z * std::f64::consts::PI.sqrt()) * sum)
        }
    }

    #[test]
    fn gelu_erf_matches_the_definition() {
        let xs: Vec<f32> = (-2000..=2000).map(|i| i as f32 * 0.005).chain([-30.0, -12.0, 15.0, 40.0]).collect();
        let mut out = vec![0f32; xs.len()];
        gelu_erf(&xs, &mut out);
        for (&x, &got) in xs.iter().zip(&out) {
            let x64 = f64::from(x);
            let want = 0.5 * x64 * (1.0 + erf_ref(x64 / std::f64::consts::SQRT_2));
            let err = (f64::from(got) - want).abs();
            assert!(err <= 4e-7 * want.abs() + 1e-7 * x64.abs().min(1.0) + 1e-30, "gelu({x}) = {got}, want {want}");
        }
    }

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
