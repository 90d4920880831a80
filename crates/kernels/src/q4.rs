//! 4-bit matrix products straight from GGUF's `Q4_0` and `Q4_1` blocks.
//!
//! A GGUF `Q4_0` / `Q4_1` block holds 32 weights of one row as 4-bit integers `q` with an f16
//! scale `d` (and, for `Q4_1`, an f16 offset `m`): `w = d (q - 8)` or `w = d q + m`. A decode
//! step is bound by reading the weights, so they stay in this form: 5 bits per weight for
//! `Q4_1` (as in the file), 4.5 for `Q4_0`. At load the blocks are only repacked, not
//! requantized: 16 rows side by side per 32-column block (a 256-byte tile), laid out for
//! AVX-512 VNNI's `vpdpbusd` (unsigned x signed bytes, four products summed into each of 16
//! `i32` lanes). Each 64-byte quarter of a tile holds two 4-column steps, one in the low
//! nibbles and one in the high nibbles, so a load, an `and` and a shift give two steps.
//!
//! Activations are quantized per call to symmetric `i8` per block of 32 (`x ~ s qx`, as
//! llama.cpp's `Q8_1`), with each block's `s * sum(qx)` kept, so that
//! `sum(w x) = d s sum(q qx) + m s sum(qx)` (with `m = -8 d` for `Q4_0`): one integer dot
//! product per block and lane, scaled once.
//!
//! The VNNI kernel is picked at run time, else an AVX2 one over the same tiles; elsewhere a
//! portable version over the same packed layout is compiled by `multiversion` (NEON, or
//! x86 without AVX2).

use half::f16;
use multiversion::multiversion;
use rayon::prelude::*;

/// Values per quantization block.
pub const BLOCK: usize = 32;
/// Output rows packed side by side (one 512-bit register of `i32` lanes).
const LANES: usize = 16;
/// Bytes of one packed (row group, block) tile: 16 rows x 32 weights x 4 bits.
const TILE: usize = LANES * BLOCK / 2;
/// Row groups per register tile (and per parallel task).
const GROUPS_PER_TASK: usize = 4;
/// Activation rows per register tile.
const MR: usize = 2;

/// Which GGUF 4-bit block format a matrix came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Q4Format {
    /// `w = d (q - 8)`: 18-byte blocks (f16 `d`, 16 bytes of nibbles).
    Q4_0,
    /// `w = d q + m`: 20-byte blocks (f16 `d`, f16 `m`, 16 bytes of nibbles).
    Q4_1,
}

impl Q4Format {
    /// Bytes of one GGUF block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
        }
    }

    /// One GGUF block's (scale, offset, 32 four-bit values in column order).
    fn decode(self, block: &[u8]) -> (u16, u16, [u8; BLOCK]) {
        let d = u16::from_le_bytes([block[0], block[1]]);
        let (m, qs) = match self {
            Self::Q4_0 => (0, &block[2..18]),
            Self::Q4_1 => (u16::from_le_bytes([block[2], block[3]]), &block[4..20]),
        };
        let mut q = [0u8; BLOCK];
        // Byte j holds value j in its low nibble and value j + 16 in its high nibble.
        for (j, &b) in qs.iter().enumerate() {
            q[j] = b & 0x0f;
            q[j + 16] = b >> 4;
        }
        (d, m, q)
    }
}

/// A `[rows, cols]` weight matrix (`y = x W^T`) in GGUF 4-bit blocks, packed for `vpdpbusd`.
#[derive(Debug, Clone)]
pub struct Q4Matrix {
    rows: usize,
    cols: usize,
    format: Q4Format,
    /// `[row_groups][blocks][4][LANES][4]` bytes: in quarter `k`, lane `l`, byte `c`, the low
    /// nibble is column `8k + c` of row `16 g + l` and the high nibble column `8k + 4 + c`.
    /// Rows past `rows` are zero.
    q: Vec<u8>,
    /// `[row_groups][blocks][LANES]` scales (f16 bits).
    d: Vec<u16>,
    /// `[row_groups][blocks][LANES]` offsets (f16 bits); empty for `Q4_0`.
    m: Vec<u16>,
}

impl Q4Matrix {
    /// Repacks a row-major `[rows, cols]` matrix of GGUF blocks (`data` as stored in the file).
    /// `None` unless `cols` is a whole number of blocks and `data` has exactly their bytes.
    pub fn from_gguf(format: Q4Format, data: &[u8], rows: usize, cols: usize) -> Option<Self> {
        if cols == 0 || !cols.is_multiple_of(BLOCK) {
            return None;
        }
        let nb = cols / BLOCK;
        let bb = format.block_bytes();
        if rows.checked_mul(nb)?.checked_mul(bb)? != data.len() {
            return None;
        }
        let groups = rows.div_ceil(LANES);
        let mut q = vec![0u8; groups * nb * TILE];
        let mut d = vec![0u16; groups * nb * LANES];
        let mut m = if format == Q4Format::Q4_1 { vec![0u16; groups * nb * LANES] } else { Vec::new() };
        let has_min = !m.is_empty();
        let mut mins: Vec<&mut [u16]> =
            if has_min { m.chunks_mut(nb * LANES).collect() } else { (0..groups).map(|_| &mut [][..]).collect() };
        q.par_chunks_mut(nb * TILE).zip(d.par_chunks_mut(nb * LANES)).zip(mins.par_iter_mut()).enumerate().for_each(
            |(g, ((q, d), m))| {
                for lane in 0..LANES {
                    let r = g * LANES + lane;
                    if r >= rows {
                        break;
                    }
                    for b in 0..nb {
                        let (bd, bm, vals) = format.decode(&data[(r * nb + b) * bb..][..bb]);
                        d[b * LANES + lane] = bd;
                        if has_min {
                            m[b * LANES + lane] = bm;
                        }
                        let tile = &mut q[b * TILE..][..TILE];
                        for k in 0..4 {
                            for c in 0..4 {
                                tile[k * 64 + lane * 4 + c] = vals[8 * k + c] | (vals[8 * k + 4 + c] << 4);
                            }
                        }
                    }
                }
            },
        );
        Some(Self { rows, cols, format, q, d, m })
    }

    /// Quantizes a row-major float matrix into GGUF blocks of `format` (round to nearest, as
    /// llama.cpp's reference quantizer) and packs them: for tests and benchmarks.
    pub fn quantize(format: Q4Format, w: &[f32], rows: usize, cols: usize) -> Option<Self> {
        if cols == 0 || !cols.is_multiple_of(BLOCK) || w.len() != rows * cols {
            return None;
        }
        let mut data = Vec::with_capacity(rows * cols / BLOCK * format.block_bytes());
        for xb in w.chunks_exact(BLOCK) {
            let (d, m, q): (f32, f32, Vec<u8>) = match format {
                Q4Format::Q4_0 => {
                    // The value of largest magnitude maps to -8.
                    let max = xb.iter().fold(0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
                    let d = max / -8.0;
                    let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
                    (d, 0.0, xb.iter().map(|v| ((v * inv + 8.5) as i32).clamp(0, 15) as u8).collect())
                }
                Q4Format::Q4_1 => {
                    let lo = xb.iter().fold(f32::INFINITY, |a, &v| a.min(v));
                    let hi = xb.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
                    let d = (hi - lo) / 15.0;
                    let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
                    (d, lo, xb.iter().map(|v| (((v - lo) * inv + 0.5) as i32).clamp(0, 15) as u8).collect())
                }
            };
            data.extend_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
            if format == Q4Format::Q4_1 {
                data.extend_from_slice(&f16::from_f32(m).to_bits().to_le_bytes());
            }
            for j in 0..16 {
                data.push(q[j] | (q[j + 16] << 4));
            }
        }
        Self::from_gguf(format, &data, rows, cols)
    }

    /// The weights as floats, row-major `[rows, cols]` (what the blocks encode).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, row) in out.chunks_exact_mut(self.cols).enumerate() {
            self.row(r, row);
        }
        out
    }

    /// Row `r`'s weights as floats (an embedding lookup in a tied output matrix).
    pub fn row(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.rows && out.len() == self.cols, "row {r} of {} into {} values", self.rows, out.len());
        let nb = self.cols / BLOCK;
        let (g, lane) = (r / LANES, r % LANES);
        for (b, ob) in out.chunks_exact_mut(BLOCK).enumerate() {
            let i = (g * nb + b) * LANES + lane;
            let d = f16::from_bits(self.d[i]).to_f32();
            let m = if self.m.is_empty() { -8.0 * d } else { f16::from_bits(self.m[i]).to_f32() };
            let tile = &self.q[(g * nb + b) * TILE..][..TILE];
            for k in 0..4 {
                for c in 0..4 {
                    let byte = tile[k * 64 + lane * 4 + c];
                    ob[8 * k + c] = d * (byte & 0x0f) as f32 + m;
                    ob[8 * k + 4 + c] = d * (byte >> 4) as f32 + m;
                }
            }
        }
    }

    /// Stacks matrices of one format and input width (their rows one after another), so
    /// projections of the same input run as one product. `None` if formats or widths differ or
    /// a part's rows are not whole 16-row groups.
    pub fn concat(parts: &[&Q4Matrix]) -> Option<Self> {
        let first = parts.first()?;
        if parts.iter().any(|p| p.cols != first.cols || p.format != first.format || !p.rows.is_multiple_of(LANES)) {
            return None;
        }
        let cat = |f: &dyn Fn(&Q4Matrix) -> &[u8]| parts.iter().flat_map(|p| f(p).iter().copied()).collect::<Vec<_>>();
        let cat16 =
            |f: &dyn Fn(&Q4Matrix) -> &[u16]| parts.iter().flat_map(|p| f(p).iter().copied()).collect::<Vec<_>>();
        Some(Self {
            rows: parts.iter().map(|p| p.rows).sum(),
            cols: first.cols,
            format: first.format,
            q: cat(&|p| &p.q),
            d: cat16(&|p| &p.d),
            m: cat16(&|p| &p.m),
        })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The block format.
    pub fn format(&self) -> Q4Format {
        self.format
    }

    /// Bytes held (weights, scales and offsets).
    pub fn bytes(&self) -> usize {
        self.q.len() + 2 * (self.d.len() + self.m.len())
    }

    /// `x @ W^T` for `m` activation rows (`x` is `[m, cols]` row-major); returns `[m, rows]`.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.cols, "activation shape");
        let a = Activations::quantize(x, self.cols);
        crate::int8::by_row_groups(self.rows, m, GROUPS_PER_TASK, |g0, ng, out| {
            groups_times_activations(self, g0, ng, &a, m, out)
        })
    }
}

/// Activations quantized per block of 32 to symmetric `i8` (`x ~ scale * q`).
pub(crate) struct Activations {
    pub(crate) q: Vec<i8>,
    pub(crate) scales: Vec<f32>,
    /// `scale * sum(q)` per block (what the weights' offsets multiply).
    pub(crate) sums: Vec<f32>,
    /// `sum(q)` per 16 values (Q6_K's offset of 32 per 16-weight sub-block).
    pub(crate) half_sums: Vec<i32>,
}

impl Activations {
    pub(crate) fn quantize(x: &[f32], cols: usize) -> Self {
        debug_assert!(cols.is_multiple_of(BLOCK));
        let mut q = vec![0i8; x.len()];
        let mut scales = vec![0f32; x.len() / BLOCK];
        let mut sums = vec![0f32; x.len() / BLOCK];
        let mut half_sums = vec![0i32; 2 * x.len() / BLOCK];
        // Rows in parallel on the team when there are many (prompts; on rayon, its workers
        // would compete for the cores with the team's spinning ones); one row runs here.
        let per_task = (16384 / cols).max(1) * cols;
        let mut parts: Vec<_> = q
            .chunks_mut(per_task)
            .zip(scales.chunks_mut(per_task / BLOCK))
            .zip(sums.chunks_mut(per_task / BLOCK))
            .zip(half_sums.chunks_mut(2 * per_task / BLOCK))
            .zip(x.chunks(per_task))
            .collect();
        crate::team::for_each_mut(&mut parts, |((((q, s), m), h), x)| quantize_activations(x, q, s, m, h));
        drop(parts);
        Self { q, scales, sums, half_sums }
    }
}

#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma+sse4.1", "aarch64+neon"))]
fn quantize_activations(x: &[f32], q: &mut [i8], scales: &mut [f32], sums: &mut [f32], half_sums: &mut [i32]) {
    for ((((xb, qb), s), sum), hs) in x
        .chunks_exact(BLOCK)
        .zip(q.chunks_exact_mut(BLOCK))
        .zip(scales.iter_mut())
        .zip(sums.iter_mut())
        .zip(half_sums.chunks_exact_mut(2))
    {
        // Written so that the compiler vectorizes it (a comparison for the maximum, not
        // `f32::max`'s NaN rule; rounding by adding 1.5 x 2^23, not a saturating cast).
        let mut lanes = [0f32; 16];
        for ch in xb.chunks_exact(16) {
            for l in 0..16 {
                let a = ch[l].abs();
                lanes[l] = if a > lanes[l] { a } else { lanes[l] };
            }
        }
        let amax = lanes.iter().fold(0f32, |m, &v| if v > m { v } else { m });
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut halves = [0i32; 2];
        for ((h, xs), qs) in halves.iter_mut().zip(xb.chunks_exact(16)).zip(qb.chunks_exact_mut(16)) {
            for (o, &v) in qs.iter_mut().zip(xs) {
                let r = round_small(v * inv);
                // Wrapping: a non-finite input gives garbage here, never a panic.
                *h = h.wrapping_add(r);
                *o = r as i8;
            }
        }
        *s = d;
        *sum = d * halves[0].wrapping_add(halves[1]) as f32;
        hs.copy_from_slice(&halves);
    }
}

/// `v` rounded to the nearest integer, ties to even, for `|v| < 2^22` (here at most 127 by
/// construction): adding 1.5 x 2^23 leaves the rounded integer in the low mantissa bits,
/// which vectorizes where a float-to-int cast (saturating, NaN to 0) does not.
#[inline(always)]
pub(crate) fn round_small(v: f32) -> i32 {
    const MAGIC: f32 = 12_582_912.0;
    (v + MAGIC).to_bits() as i32 - MAGIC.to_bits() as i32
}

/// Row groups `g0..g0 + ng` (at most [`GROUPS_PER_TASK`]) times every activation row, into
/// `out` laid out `[ng][m][LANES]`.
fn groups_times_activations(w: &Q4Matrix, g0: usize, ng: usize, a: &Activations, m: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::int8::vnni_available() {
        return vnni::groups(w, g0, ng, a, m, out);
    }
    #[cfg(target_arch = "x86_64")]
    if crate::int8::avx2_selected() {
        return avx2::groups(w, g0, ng, a, m, out);
    }
    groups_portable(w, g0, ng, a, m, out);
}

#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
fn groups_portable(w: &Q4Matrix, g0: usize, ng: usize, a: &Activations, m: usize, out: &mut [f32]) {
    let nb = w.cols / BLOCK;
    for gi in 0..ng {
        let g = g0 + gi;
        for i in 0..m {
            let mut acc = [0f32; LANES];
            for b in 0..nb {
                let tile = &w.q[(g * nb + b) * TILE..][..TILE];
                let xq = &a.q[i * w.cols + b * BLOCK..][..BLOCK];
                let mut isum = [0i32; LANES];
                for k in 0..4 {
                    for (lane, s) in isum.iter_mut().enumerate() {
                        for c in 0..4 {
                            let byte = tile[k * 64 + lane * 4 + c];
                            *s += (byte & 0x0f) as i32 * xq[8 * k + c] as i32
                                + (byte >> 4) as i32 * xq[8 * k + 4 + c] as i32;
                        }
                    }
                }
                let (xs, xsum) = (a.scales[i * nb + b], a.sums[i * nb + b]);
                let base = (g * nb + b) * LANES;
                for lane in 0..LANES {
                    let d = f16::from_bits(w.d[base + lane]).to_f32();
                    let mn = if w.m.is_empty() { -8.0 * d } else { f16::from_bits(w.m[base + lane]).to_f32() };
                    acc[lane] += isum[lane] as f32 * (d * xs) + mn * xsum;
                }
            }
            out[(gi * m + i) * LANES..][..LANES].copy_from_slice(&acc);
        }
    }
}

/// AVX-512 VNNI: `vpdpbusd` on the packed tiles, `NG` row groups x `R` activation rows of
/// accumulators in registers.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod vnni {
    use std::arch::x86_64::*;

    use super::{Activations, Q4Matrix, BLOCK, GROUPS_PER_TASK, LANES, MR, TILE};

    /// Safe entry: checks every bound the kernel relies on. The caller checked that the CPU
    /// has AVX-512 VNNI.
    pub(super) fn groups(w: &Q4Matrix, g0: usize, ng: usize, a: &Activations, m: usize, out: &mut [f32]) {
        let nb = w.cols / BLOCK;
        assert!(ng <= GROUPS_PER_TASK && out.len() == ng * m * LANES);
        assert!(w.q.len() >= (g0 + ng) * nb * TILE && w.d.len() >= (g0 + ng) * nb * LANES);
        assert!(w.m.is_empty() || w.m.len() == w.d.len());
        assert!(a.q.len() == m * w.cols && a.scales.len() == m * nb && a.sums.len() == m * nb);
        let has_min = !w.m.is_empty();
        let mut i = 0;
        while i < m {
            let r = MR.min(m - i);
            macro_rules! go {
                ($ng:literal, $r:literal) => {
                    // SAFETY: CPU features checked by the caller; the asserts above bound every
                    // access: groups g0..g0+ng, activation rows i..i+r < m, blocks < nb, and
                    // the offsets are only read when present.
                    unsafe {
                        if has_min {
                            tile::<$ng, $r, true>(w, g0, a, i, m, out)
                        } else {
                            tile::<$ng, $r, false>(w, g0, a, i, m, out)
                        }
                    }
                };
            }
            match (ng, r) {
                (4, 2) => go!(4, 2),
                (4, 1) => go!(4, 1),
                (3, 2) => go!(3, 2),
                (3, 1) => go!(3, 1),
                (2, 2) => go!(2, 2),
                (2, 1) => go!(2, 1),
                (1, 2) => go!(1, 2),
                (1, 1) => go!(1, 1),
                _ => unreachable!("tile sizes are bounded by GROUPS_PER_TASK and MR"),
            }
            i += r;
        }
    }

    // The register tile is indexed [group][row] from several loops at once.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn tile<const NG: usize, const R: usize, const MIN: bool>(
        w: &Q4Matrix,
        g0: usize,
        a: &Activations,
        i0: usize,
        m: usize,
        out: &mut [f32],
    ) {
        let cols = w.cols;
        let nb = cols / BLOCK;
        let low = _mm512_set1_epi8(0x0f);
        let mut acc = [[_mm512_setzero_ps(); R]; NG];
        for b in 0..nb {
            let mut isum = [[_mm512_setzero_si512(); R]; NG];
            for k in 0..4 {
                let mut lo = [_mm512_setzero_si512(); NG];
                let mut hi = [_mm512_setzero_si512(); NG];
                for g in 0..NG {
                    let v = _mm512_loadu_si512(w.q.as_ptr().add(((g0 + g) * nb + b) * TILE + k * 64) as *const _);
                    lo[g] = _mm512_and_si512(v, low);
                    hi[g] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
                }
                for r in 0..R {
                    let x = a.q.as_ptr().add((i0 + r) * cols + b * BLOCK + 8 * k);
                    let xl = _mm512_set1_epi32((x as *const i32).read_unaligned());
                    let xh = _mm512_set1_epi32((x.add(4) as *const i32).read_unaligned());
                    for g in 0..NG {
                        isum[g][r] = _mm512_dpbusd_epi32(isum[g][r], lo[g], xl);
                        isum[g][r] = _mm512_dpbusd_epi32(isum[g][r], hi[g], xh);
                    }
                }
            }
            for g in 0..NG {
                let at = ((g0 + g) * nb + b) * LANES;
                let d = _mm512_cvtph_ps(_mm256_loadu_si256(w.d.as_ptr().add(at) as *const __m256i));
                let mn = if MIN {
                    _mm512_cvtph_ps(_mm256_loadu_si256(w.m.as_ptr().add(at) as *const __m256i))
                } else {
                    _mm512_mul_ps(d, _mm512_set1_ps(-8.0))
                };
                for r in 0..R {
                    let xa = (i0 + r) * nb + b;
                    let scale = _mm512_mul_ps(d, _mm512_set1_ps(*a.scales.get_unchecked(xa)));
                    let t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[g][r]), scale, acc[g][r]);
                    acc[g][r] = _mm512_fmadd_ps(mn, _mm512_set1_ps(*a.sums.get_unchecked(xa)), t);
                }
            }
        }
        for g in 0..NG {
            for r in 0..R {
                _mm512_storeu_ps(out.as_mut_ptr().add((g * m + i0 + r) * LANES), acc[g][r]);
            }
        }
    }
}

/// AVX2 (with FMA and F16C): the VNNI kernel's arithmetic on the same tiles, each 16-row
/// group as two halves of 8 lanes, `vpdpbusd` done by `vpmaddubsw` and `vpmaddwd` by ones
/// (see [`crate::kquant`]'s AVX2 kernel). One row group x up to 2 activation rows.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Activations, Q4Matrix, BLOCK, LANES, TILE};

    /// Safe entry: checks every bound the kernel relies on. The caller checked that the CPU
    /// has AVX2, FMA and F16C.
    pub(super) fn groups(w: &Q4Matrix, g0: usize, ng: usize, a: &Activations, m: usize, out: &mut [f32]) {
        let nb = w.cols / BLOCK;
        assert!(out.len() == ng * m * LANES);
        assert!(w.q.len() >= (g0 + ng) * nb * TILE && w.d.len() >= (g0 + ng) * nb * LANES);
        assert!(w.m.is_empty() || w.m.len() == w.d.len());
        assert!(a.q.len() == m * w.cols && a.scales.len() == m * nb && a.sums.len() == m * nb);
        let has_min = !w.m.is_empty();
        for gi in 0..ng {
            let mut i = 0;
            while i < m {
                // Prompts and batches: 4 activation rows per pass over the group's tiles.
                let r = if m - i >= 4 { 4 } else { 2.min(m - i) };
                // SAFETY: CPU features checked by the caller; the asserts above bound every
                // access: group g0 + gi, rows i..i+r < m, blocks < nb, offsets only when present.
                unsafe {
                    match (has_min, r) {
                        (true, 4) => group::<4, true>(w, g0 + gi, gi, a, i, m, out),
                        (false, 4) => group::<4, false>(w, g0 + gi, gi, a, i, m, out),
                        (true, 2) => group::<2, true>(w, g0 + gi, gi, a, i, m, out),
                        (true, _) => group::<1, true>(w, g0 + gi, gi, a, i, m, out),
                        (false, 2) => group::<2, false>(w, g0 + gi, gi, a, i, m, out),
                        (false, _) => group::<1, false>(w, g0 + gi, gi, a, i, m, out),
                    }
                }
                i += r;
            }
        }
    }

    #[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn group<const R: usize, const MIN: bool>(
        w: &Q4Matrix,
        g: usize,
        gi: usize,
        a: &Activations,
        i0: usize,
        m: usize,
        out: &mut [f32],
    ) {
        let cols = w.cols;
        let nb = cols / BLOCK;
        let low = _mm256_set1_epi8(0x0f);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_ps(); R]; 2];
        for b in 0..nb {
            let tile = w.q.as_ptr().add((g * nb + b) * TILE);
            for half in 0..2 {
                let mut isum = [_mm256_setzero_si256(); R];
                for k in 0..4 {
                    let v = _mm256_loadu_si256(tile.add(k * 64 + 32 * half) as *const __m256i);
                    let lo = _mm256_and_si256(v, low);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
                    for r in 0..R {
                        let x = a.q.as_ptr().add((i0 + r) * cols + b * BLOCK + 8 * k);
                        let xl = _mm256_set1_epi32((x as *const i32).read_unaligned());
                        let xh = _mm256_set1_epi32((x.add(4) as *const i32).read_unaligned());
                        // At most 2 x 2 x 15 x 127 per 16-bit sum: no saturation.
                        let p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh));
                        isum[r] = _mm256_add_epi32(isum[r], _mm256_madd_epi16(p, ones));
                    }
                }
                let at = (g * nb + b) * LANES + 8 * half;
                let d = _mm256_cvtph_ps(_mm_loadu_si128(w.d.as_ptr().add(at) as *const __m128i));
                let mn = if MIN {
                    _mm256_cvtph_ps(_mm_loadu_si128(w.m.as_ptr().add(at) as *const __m128i))
                } else {
                    _mm256_mul_ps(d, _mm256_set1_ps(-8.0))
                };
                for r in 0..R {
                    let xa = (i0 + r) * nb + b;
                    let scale = _mm256_mul_ps(d, _mm256_set1_ps(*a.scales.get_unchecked(xa)));
                    let t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r]), scale, acc[half][r]);
                    acc[half][r] = _mm256_fmadd_ps(mn, _mm256_set1_ps(*a.sums.get_unchecked(xa)), t);
                }
            }
        }
        for half in 0..2 {
            for r in 0..R {
                _mm256_storeu_ps(out.as_mut_ptr().add((gi * m + i0 + r) * LANES + 8 * half), acc[half][r]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// `y` against the exact product with the dequantized weights, within the activations'
    /// quantization error (half a step of 1/127 of each block's largest value).
    fn check(y: &[f32], w: &[f32], x: &[f32], rows: usize, cols: usize, m: usize) {
        for j in 0..m {
            for r in 0..rows {
                let exact: f32 = (0..cols).map(|i| x[j * cols + i] * w[r * cols + i]).sum();
                let norm: f32 = (0..cols).map(|i| (x[j * cols + i] * w[r * cols + i]).abs()).sum();
                let got = y[j * rows + r];
                assert!((got - exact).abs() <= 0.01 * norm + 1e-5, "m={m} row {j} col {r}: {got} vs {exact}");
            }
        }
    }

    #[test]
    fn rounding_by_the_magic_constant_is_round_ties_even() {
        for i in -300_000..=300_000 {
            let v = i as f32 / 1000.0;
            assert_eq!(round_small(v), v.round_ties_even() as i32, "{v}");
        }
        for v in [0.5f32, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5, 127.0, -127.0, 0.49999997, -0.0] {
            assert_eq!(round_small(v), v.round_ties_even() as i32, "{v}");
        }
    }

    #[test]
    fn q4_matmul_matches_the_dequantized_weights() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        // 130 rows: 8 full row groups and a partial one; 3 blocks of columns.
        let (rows, cols) = (130, 96);
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.random::<f32>() - 0.3).collect();
        for format in [Q4Format::Q4_0, Q4Format::Q4_1] {
            let q = Q4Matrix::quantize(format, &w, rows, cols).unwrap();
            let deq = q.dequantize();
            // The blocks are a 4-bit rounding of the weights.
            for (a, b) in w.iter().zip(&deq) {
                assert!((a - b).abs() <= 0.07, "{format:?}: {a} dequantized to {b}");
            }
            for m in [1, 2, 3, 5, 64] {
                let x: Vec<f32> = (0..m * cols).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
                let y = q.matmul(&x, m);
                assert_eq!(y.len(), m * rows);
                check(&y, &deq, &x, rows, cols, m);
            }
            assert_eq!(q.bytes(), 9 * 3 * (TILE + 2 * LANES * if format == Q4Format::Q4_1 { 2 } else { 1 }));
        }
    }

    #[test]
    fn gguf_blocks_are_read_in_llama_cpp_order() {
        // One row of one Q4_1 block: d = 0.5, m = -1, value j = j % 16.
        let mut block = Vec::new();
        block.extend_from_slice(&f16::from_f32(0.5).to_bits().to_le_bytes());
        block.extend_from_slice(&f16::from_f32(-1.0).to_bits().to_le_bytes());
        for j in 0..16u8 {
            block.push(j | (j << 4));
        }
        let q = Q4Matrix::from_gguf(Q4Format::Q4_1, &block, 1, 32).unwrap();
        let want: Vec<f32> = (0..32).map(|j| 0.5 * (j % 16) as f32 - 1.0).collect();
        assert_eq!(q.dequantize(), want);
        // Q4_0: w = d (q - 8).
        let mut block = f16::from_f32(2.0).to_bits().to_le_bytes().to_vec();
        block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let q = Q4Matrix::from_gguf(Q4Format::Q4_0, &block, 1, 32).unwrap();
        let want: Vec<f32> =
            (0..32).map(|j| if j < 16 { 2.0 * (j as f32 - 8.0) } else { 2.0 * (7.0 - (j - 16) as f32) }).collect();
        assert_eq!(q.dequantize(), want);
        assert!(Q4Matrix::from_gguf(Q4Format::Q4_0, &block[..17], 1, 32).is_none(), "short data");
        assert!(Q4Matrix::from_gguf(Q4Format::Q4_0, &block, 1, 16).is_none(), "partial block");
    }

    #[test]
    fn dispatched_kernel_matches_the_portable_one() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let (rows, cols, m) = (64, 128, 5);
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.random::<f32>() - 0.5).collect();
        let x: Vec<f32> = (0..m * cols).map(|_| rng.random::<f32>() - 0.5).collect();
        for format in [Q4Format::Q4_0, Q4Format::Q4_1] {
            let q = Q4Matrix::quantize(format, &w, rows, cols).unwrap();
            let a = Activations::quantize(&x, cols);
            let mut fast = vec![0f32; 4 * m * LANES];
            let mut portable = vec![0f32; 4 * m * LANES];
            groups_times_activations(&q, 0, 4, &a, m, &mut fast);
            groups_portable(&q, 0, 4, &a, m, &mut portable);
            for (f, p) in fast.iter().zip(&portable) {
                assert!((f - p).abs() <= 1e-4 * p.abs().max(1.0), "{format:?}: {f} vs {p}");
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_kernel_matches_the_portable_one() {
        assert!(crate::int8::avx2_present(), "the test machines have AVX2; this one does not");
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let (rows, cols) = (64, 128);
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.random::<f32>() - 0.5).collect();
        for format in [Q4Format::Q4_0, Q4Format::Q4_1] {
            let q = Q4Matrix::quantize(format, &w, rows, cols).unwrap();
            for m in [1, 2, 3, 4, 7] {
                let x: Vec<f32> = (0..m * cols).map(|_| rng.random::<f32>() - 0.5).collect();
                let a = Activations::quantize(&x, cols);
                let mut fast = vec![0f32; 4 * m * LANES];
                let mut portable = vec![0f32; 4 * m * LANES];
                avx2::groups(&q, 0, 4, &a, m, &mut fast);
                groups_portable(&q, 0, 4, &a, m, &mut portable);
                for (f, p) in fast.iter().zip(&portable) {
                    assert!((f - p).abs() <= 1e-4 * p.abs().max(1.0), "{format:?} m={m}: {f} vs {p}");
                }
            }
        }
    }

    #[test]
    fn a_row_does_not_depend_on_its_batch_and_stacking_changes_nothing() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let (rows, cols, m) = (96, 576, 11);
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.random::<f32>() - 0.5).collect();
        let x: Vec<f32> = (0..m * cols).map(|_| rng.random::<f32>() - 0.5).collect();
        let q = Q4Matrix::quantize(Q4Format::Q4_1, &w, rows, cols).unwrap();
        let all = q.matmul(&x, m);
        for j in 0..m {
            let one = q.matmul(&x[j * cols..(j + 1) * cols], 1);
            assert_eq!(&all[j * rows..(j + 1) * rows], &one[..], "row {j}");
        }
        let (a, b) = (
            Q4Matrix::quantize(Q4Format::Q4_1, &w[..32 * cols], 32, cols).unwrap(),
            Q4Matrix::quantize(Q4Format::Q4_1, &w[32 * cols..], 64, cols).unwrap(),
        );
        let ab = Q4Matrix::concat(&[&a, &b]).unwrap();
        assert_eq!(ab.matmul(&x, m), all);
        let q0 = Q4Matrix::quantize(Q4Format::Q4_0, &w[..32 * cols], 32, cols).unwrap();
        assert!(Q4Matrix::concat(&[&a, &q0]).is_none(), "formats differ");
    }
}
