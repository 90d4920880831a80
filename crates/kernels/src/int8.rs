//! Int8 matrix products (weights and activations quantized per block of 32, like GGML's Q8_0).
//!
//! A decode step multiplies a handful of activation rows by every weight matrix, so it is
//! bound by reading the weights: float32 weights cost 4 bytes each, these cost 1 byte plus a
//! float scale per block of 32. Batched steps and prompts are bound by arithmetic instead, and
//! int8 dot products do four times the work of float32 FMAs per instruction.
//!
//! Weights are packed once at load for AVX-512 VNNI's `vpdpbusd` (unsigned x signed bytes,
//! four products summed into each of 16 `i32` lanes): 16 output rows side by side, 4 input
//! columns per lane, so one instruction advances 16 rows by 4 columns for one activation row,
//! and one weight load serves every activation row of a tile. Activations are quantized per
//! call, asymmetrically to `u8` (`x ~ min + scale * q`: twice the resolution of symmetric
//! `i8`, which matters for the outliers of LLM activations), so the inner loop is nothing but
//! `vpdpbusd`; each block's integer sum is scaled once, and the minimum's contribution
//! (`min * sum(w)`, the weight sums precomputed at load) is added once per block.
//!
//! The VNNI kernel is picked at run time (no `target-cpu=native`); elsewhere a portable
//! version over the same packed layout is compiled by `multiversion` for AVX-512, AVX2 and
//! NEON.

use multiversion::multiversion;
use rayon::prelude::*;

/// Values per quantization block.
pub const BLOCK: usize = 32;
/// Output rows packed side by side (one 512-bit register of `i32` lanes).
const LANES: usize = 16;
/// 4-column steps per block.
const STEPS: usize = BLOCK / 4;
/// Bytes of one packed (row group, block) tile.
const TILE: usize = LANES * BLOCK;

/// Quantizes a row of weights (a whole number of blocks) to symmetric `i8` values with one
/// scale per block (`absmax / 127`). Compiled per instruction set so rounding and the float to
/// integer conversion vectorize (this runs over every weight at load).
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma+sse4.1", "aarch64+neon"))]
fn quantize_row(x: &[f32], q: &mut [i8], scales: &mut [f32]) {
    for ((xb, qb), s) in x.chunks_exact(BLOCK).zip(q.chunks_exact_mut(BLOCK)).zip(scales.iter_mut()) {
        // Lane-wise maxima vectorize; a running scalar max would be a serial chain.
        let mut lanes = [0f32; 16];
        for ch in xb.chunks_exact(16) {
            for l in 0..16 {
                lanes[l] = lanes[l].max(ch[l].abs());
            }
        }
        let amax = lanes.iter().fold(0f32, |m, &v| m.max(v));
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        for (o, v) in qb.iter_mut().zip(xb) {
            // |v * inv| <= 127 by construction, so the i32 conversion cannot saturate.
            *o = (v * inv).round_ties_even() as i32 as i8;
        }
        *s = d;
    }
}

/// Quantized activations, row-major: per block of 32, `x ~ min + scale * q` with `q` in
/// `0..=255` (asymmetric, so the whole `u8` range covers the block's spread).
struct Activations {
    q: Vec<u8>,
    scales: Vec<f32>,
    mins: Vec<f32>,
}

impl Activations {
    fn quantize(x: &[f32], cols: usize) -> Self {
        debug_assert!(cols.is_multiple_of(BLOCK));
        let mut q = vec![0u8; x.len()];
        let mut scales = vec![0f32; x.len() / BLOCK];
        let mut mins = vec![0f32; x.len() / BLOCK];
        // Rows in parallel when there are many (prompts); one row is not worth a dispatch.
        let per_task = (16384 / cols).max(1) * cols;
        // On the team, as the 4-bit kernel's activations (`crate::q4`).
        let mut parts: Vec<_> = q
            .chunks_mut(per_task)
            .zip(scales.chunks_mut(per_task / BLOCK))
            .zip(mins.chunks_mut(per_task / BLOCK))
            .zip(x.chunks(per_task))
            .collect();
        crate::team::for_each_mut(&mut parts, |(((q, s), m), x)| {
            #[cfg(target_arch = "x86_64")]
            if vnni::available() {
                return vnni::quantize_activations(x, q, s, m);
            }
            quantize_activations(x, q, s, m)
        });
        drop(parts);
        Self { q, scales, mins }
    }
}

#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
fn quantize_activations(x: &[f32], q: &mut [u8], scales: &mut [f32], mins: &mut [f32]) {
    for (((xb, qb), s), mn) in
        x.chunks_exact(BLOCK).zip(q.chunks_exact_mut(BLOCK)).zip(scales.iter_mut()).zip(mins.iter_mut())
    {
        let (mut los, mut his) = ([f32::INFINITY; 16], [f32::NEG_INFINITY; 16]);
        for ch in xb.chunks_exact(16) {
            for l in 0..16 {
                los[l] = los[l].min(ch[l]);
                his[l] = his[l].max(ch[l]);
            }
        }
        let lo = los.iter().fold(f32::INFINITY, |m, &v| m.min(v));
        let hi = his.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let d = (hi - lo) / 255.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        for (o, v) in qb.iter_mut().zip(xb) {
            // Non-negative, so adding 0.5 and truncating rounds to nearest (no libm call).
            *o = ((v - lo) * inv + 0.5).min(255.0) as u8;
        }
        *s = d;
        *mn = lo;
    }
}

/// A `[rows, cols]` weight matrix (`y = x W^T`) quantized to int8 per block of 32 and packed
/// for `vpdpbusd`.
#[derive(Debug, Clone)]
pub struct Int8Matrix {
    rows: usize,
    cols: usize,
    /// `[row_groups][blocks][STEPS][LANES][4]` signed bytes (rows past `rows` are zero).
    q: Vec<i8>,
    /// `[row_groups][blocks][LANES]` weight scales.
    scales: Vec<f32>,
    /// `[row_groups][blocks][LANES]`: `scale * sum(q)` over the block (the dequantized
    /// weights' sum), which the activation minimum multiplies.
    sums: Vec<f32>,
}

impl Int8Matrix {
    /// Quantizes and packs a row-major `[rows, cols]` float matrix; `None` unless `cols` is a
    /// multiple of [`BLOCK`].
    pub fn from_f32(w: &[f32], rows: usize, cols: usize) -> Option<Self> {
        if cols == 0 || !cols.is_multiple_of(BLOCK) || w.len() != rows * cols {
            return None;
        }
        let nb = cols / BLOCK;
        let groups = rows.div_ceil(LANES);
        let mut q = vec![0i8; groups * nb * TILE];
        let mut scales = vec![0f32; groups * nb * LANES];
        let mut sums = vec![0f32; groups * nb * LANES];
        q.par_chunks_mut(nb * TILE)
            .zip(scales.par_chunks_mut(nb * LANES))
            .zip(sums.par_chunks_mut(nb * LANES))
            .enumerate()
            .for_each(|(g, ((q, scales), sums))| {
                let mut qrow = vec![0i8; cols];
                let mut srow = vec![0f32; nb];
                for lane in 0..LANES {
                    let r = g * LANES + lane;
                    if r >= rows {
                        break;
                    }
                    quantize_row(&w[r * cols..(r + 1) * cols], &mut qrow, &mut srow);
                    for (b, (qb, &d)) in qrow.chunks_exact(BLOCK).zip(&srow).enumerate() {
                        pack_block(q, scales, sums, b, lane, qb, d);
                    }
                }
            });
        Some(Self { rows, cols, q, scales, sums })
    }

    /// Packs a row-major `[rows, cols]` matrix of GGUF `Q8_0` blocks (34 bytes each: an f16
    /// scale and 32 signed bytes, `w = d q`) as they are: no requantization. `None` unless
    /// `cols` is a whole number of blocks and `data` has exactly their bytes.
    pub fn from_gguf_q8_0(data: &[u8], rows: usize, cols: usize) -> Option<Self> {
        const BYTES: usize = 2 + BLOCK;
        if cols == 0 || !cols.is_multiple_of(BLOCK) {
            return None;
        }
        let nb = cols / BLOCK;
        if rows.checked_mul(nb)?.checked_mul(BYTES)? != data.len() {
            return None;
        }
        let groups = rows.div_ceil(LANES);
        let mut q = vec![0i8; groups * nb * TILE];
        let mut scales = vec![0f32; groups * nb * LANES];
        let mut sums = vec![0f32; groups * nb * LANES];
        q.par_chunks_mut(nb * TILE)
            .zip(scales.par_chunks_mut(nb * LANES))
            .zip(sums.par_chunks_mut(nb * LANES))
            .enumerate()
            .for_each(|(g, ((q, scales), sums))| {
                for lane in 0..LANES {
                    let r = g * LANES + lane;
                    if r >= rows {
                        break;
                    }
                    for b in 0..nb {
                        let block = &data[(r * nb + b) * BYTES..][..BYTES];
                        let d = half::f16::from_bits(u16::from_le_bytes([block[0], block[1]])).to_f32();
                        let qb: Vec<i8> = block[2..].iter().map(|&v| v as i8).collect();
                        pack_block(q, scales, sums, b, lane, &qb, d);
                    }
                }
            });
        Some(Self { rows, cols, q, scales, sums })
    }

    /// Packs a row-major `[rows, cols]` matrix of signed 8-bit integers with one `f32` scale
    /// per row and block of 32 (`scales[r * cols / 32 + b]`, `w = d q`) as they are: an int8
    /// checkpoint (GPTQ 8-bit, compressed-tensors W8A8 / W8A16) without requantization. `None`
    /// unless `cols` is a whole number of blocks and the lengths match.
    pub fn from_blocks(q: &[i8], scales: &[f32], rows: usize, cols: usize) -> Option<Self> {
        if cols == 0 || !cols.is_multiple_of(BLOCK) {
            return None;
        }
        let nb = cols / BLOCK;
        if rows.checked_mul(cols)? != q.len() || rows.checked_mul(nb)? != scales.len() {
            return None;
        }
        let groups = rows.div_ceil(LANES);
        let mut packed = vec![0i8; groups * nb * TILE];
        let mut block_scales = vec![0f32; groups * nb * LANES];
        let mut sums = vec![0f32; groups * nb * LANES];
        packed
            .par_chunks_mut(nb * TILE)
            .zip(block_scales.par_chunks_mut(nb * LANES))
            .zip(sums.par_chunks_mut(nb * LANES))
            .enumerate()
            .for_each(|(g, ((packed, block_scales), sums))| {
                for lane in 0..LANES {
                    let r = g * LANES + lane;
                    if r >= rows {
                        break;
                    }
                    for b in 0..nb {
                        let qb = &q[r * cols + b * BLOCK..][..BLOCK];
                        pack_block(packed, block_scales, sums, b, lane, qb, scales[r * nb + b]);
                    }
                }
            });
        Some(Self { rows, cols, q: packed, scales: block_scales, sums })
    }

    /// Row `r`'s weights as floats (an embedding lookup in a tied output matrix).
    pub fn row(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.rows && out.len() == self.cols, "row {r} of {} into {} values", self.rows, out.len());
        let nb = self.cols / BLOCK;
        let (g, lane) = (r / LANES, r % LANES);
        for (b, ob) in out.chunks_exact_mut(BLOCK).enumerate() {
            let d = self.scales[(g * nb + b) * LANES + lane];
            let tile = &self.q[(g * nb + b) * TILE..][..TILE];
            for (c, o) in ob.iter_mut().enumerate() {
                *o = d * tile[((c / 4) * LANES + lane) * 4 + c % 4] as f32;
            }
        }
    }

    /// The weights as floats, row-major `[rows, cols]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let nb = self.cols / BLOCK;
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, row) in out.chunks_exact_mut(self.cols).enumerate() {
            let (g, lane) = (r / LANES, r % LANES);
            for b in 0..nb {
                let d = self.scales[(g * nb + b) * LANES + lane];
                for c in 0..BLOCK {
                    let (s, k) = (c / 4, c % 4);
                    row[b * BLOCK + c] = d * self.q[(g * nb + b) * TILE + (s * LANES + lane) * 4 + k] as f32;
                }
            }
        }
        out
    }

    /// Stacks matrices with the same input width into one (their rows one after another), so
    /// projections of the same input (Q/K/V, gate/up) run as one product with one activation
    /// quantization. `None` if the widths differ or a part's rows are not whole 16-row groups.
    pub fn concat(parts: &[&Int8Matrix]) -> Option<Self> {
        let cols = parts.first()?.cols;
        if parts.iter().any(|p| p.cols != cols || !p.rows.is_multiple_of(LANES)) {
            return None;
        }
        let cat = |f: &dyn Fn(&Int8Matrix) -> usize| parts.iter().map(|p| f(p)).sum::<usize>();
        let (mut q, mut scales, mut sums) =
            (Vec::with_capacity(cat(&|p| p.q.len())), Vec::with_capacity(cat(&|p| p.scales.len())), Vec::new());
        for p in parts {
            q.extend_from_slice(&p.q);
            scales.extend_from_slice(&p.scales);
            sums.extend_from_slice(&p.sums);
        }
        Some(Self { rows: cat(&|p| p.rows), cols, q, scales, sums })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// `x @ W^T` for `m` activation rows (`x` is `[m, cols]` row-major); returns `[m, rows]`.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.cols, "activation shape");
        let a = Activations::quantize(x, self.cols);
        by_row_groups(self.rows, m, GROUPS_PER_TASK, |g0, ng, out| groups_times_activations(self, g0, ng, &a, m, out))
    }
}

/// Block `b` of one row (lane `lane` of its row group) into a row group's packed tiles, its
/// scale and the dequantized weights' sum.
fn pack_block(q: &mut [i8], scales: &mut [f32], sums: &mut [f32], b: usize, lane: usize, qb: &[i8], d: f32) {
    scales[b * LANES + lane] = d;
    sums[b * LANES + lane] = d * qb.iter().map(|&v| v as i32).sum::<i32>() as f32;
    for s in 0..STEPS {
        let dst = b * TILE + (s * LANES + lane) * 4;
        q[dst..dst + 4].copy_from_slice(&qb[s * 4..s * 4 + 4]);
    }
}

/// The product of a matrix packed in 16-row groups with `m` activation rows, `[m, rows]`:
/// `f(g0, ng, out)` computes row groups `g0..g0 + ng` (at most `per_task`) into `out`, laid
/// out `[ng][m][16]`, as one task of the thread team.
pub(crate) fn by_row_groups(
    rows: usize,
    m: usize,
    per_task: usize,
    f: impl Fn(usize, usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    let groups = rows.div_ceil(LANES);
    let mut out_g = vec![0f32; groups * m * LANES];
    crate::team::for_each_chunk_mut(&mut out_g, per_task * m * LANES, |t, out| {
        f(t * per_task, out.len() / (m * LANES), out)
    });
    if m == 1 && rows == groups * LANES {
        return out_g;
    }
    let mut out = vec![0f32; m * rows];
    for (g, og) in out_g.chunks_exact(m * LANES).enumerate() {
        let width = LANES.min(rows - g * LANES);
        for (i, o) in og.chunks_exact(LANES).enumerate() {
            out[i * rows + g * LANES..][..width].copy_from_slice(&o[..width]);
        }
    }
    out
}

/// Whether the CPU has AVX-512 VNNI (the int8 and 4-bit kernels' fast path) and
/// `VLLM_CPU_KERNEL` does not ask for another path.
#[cfg(target_arch = "x86_64")]
pub(crate) fn vnni_available() -> bool {
    kernel_path() == KernelPath::Vnni
}

/// Which hand-written kernels the quantized matmuls run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KernelPath {
    /// AVX-512 VNNI (`vpdpbusd`).
    Vnni,
    /// AVX2 with FMA and F16C (`vpmaddubsw` + `vpmaddwd` doing `vpdpbusd`'s work in the 4-bit
    /// and k-quant kernels, `vpmaddwd` on widened bytes in the int8 kernel).
    Avx2,
    /// Plain loops compiled by `multiversion` for what the CPU has.
    Portable,
}

/// The best path this CPU has, unless the `VLLM_CPU_KERNEL` environment variable (`vnni`,
/// `avx2` or `portable`) asks for a lower one (to measure or test the others on one
/// machine); decided once.
pub(crate) fn kernel_path() -> KernelPath {
    static PATH: std::sync::OnceLock<KernelPath> = std::sync::OnceLock::new();
    *PATH.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        let best = if vnni::available() {
            KernelPath::Vnni
        } else if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            KernelPath::Avx2
        } else {
            KernelPath::Portable
        };
        #[cfg(not(target_arch = "x86_64"))]
        let best = KernelPath::Portable;
        let rank = |p: KernelPath| match p {
            KernelPath::Portable => 0,
            KernelPath::Avx2 => 1,
            KernelPath::Vnni => 2,
        };
        let asked = match std::env::var("VLLM_CPU_KERNEL").ok().as_deref().map(str::to_ascii_lowercase).as_deref() {
            Some("portable") => Some(KernelPath::Portable),
            Some("avx2") => Some(KernelPath::Avx2),
            _ => None,
        };
        match asked {
            Some(p) if rank(p) < rank(best) => p,
            _ => best,
        }
    })
}

/// Whether the quantized kernels run their AVX2 versions.
#[cfg(target_arch = "x86_64")]
pub(crate) fn avx2_selected() -> bool {
    kernel_path() == KernelPath::Avx2
}

/// Whether this CPU could run the AVX2 kernels (tests compare them with the portable ones
/// whatever path is selected).
#[cfg(all(test, target_arch = "x86_64"))]
pub(crate) fn avx2_present() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
}

/// Row groups per register tile (and per parallel task).
const GROUPS_PER_TASK: usize = 4;
/// Activation rows per register tile.
const MR: usize = 3;

/// Row groups `g0..g0 + ng` (at most [`GROUPS_PER_TASK`]) times every activation row, into
/// `out` laid out `[ng][m][LANES]`.
fn groups_times_activations(w: &Int8Matrix, g0: usize, ng: usize, a: &Activations, m: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if vnni_available() {
        return vnni::groups(w, g0, ng, a, m, out);
    }
    #[cfg(target_arch = "x86_64")]
    if avx2_selected() {
        return avx2::groups(w, g0, ng, a, m, out);
    }
    groups_portable(w, g0, ng, a, m, out);
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2;

#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
fn groups_portable(w: &Int8Matrix, g0: usize, ng: usize, a: &Activations, m: usize, out: &mut [f32]) {
    let nb = w.cols / BLOCK;
    for gi in 0..ng {
        let g = g0 + gi;
        for i in 0..m {
            let mut acc = [0f32; LANES];
            for b in 0..nb {
                let tile = &w.q[(g * nb + b) * TILE..][..TILE];
                let xq = &a.q[i * w.cols + b * BLOCK..][..BLOCK];
                let mut sums = [0i32; LANES];
                for s in 0..STEPS {
                    for (lane, sum) in sums.iter_mut().enumerate() {
                        for k in 0..4 {
                            *sum += xq[s * 4 + k] as i32 * tile[(s * LANES + lane) * 4 + k] as i32;
                        }
                    }
                }
                let (xs, xmin) = (a.scales[i * nb + b], a.mins[i * nb + b]);
                let ws = &w.scales[(g * nb + b) * LANES..][..LANES];
                let wsum = &w.sums[(g * nb + b) * LANES..][..LANES];
                for lane in 0..LANES {
                    acc[lane] += sums[lane] as f32 * ws[lane] * xs + wsum[lane] * xmin;
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

    use super::{Activations, Int8Matrix, BLOCK, GROUPS_PER_TASK, LANES, MR, STEPS, TILE};

    pub(super) fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }

    /// Safe entry: checks every bound the kernel relies on. The caller checked [`available`].
    pub(super) fn groups(w: &Int8Matrix, g0: usize, ng: usize, a: &Activations, m: usize, out: &mut [f32]) {
        let nb = w.cols / BLOCK;
        assert!(ng <= GROUPS_PER_TASK && out.len() == ng * m * LANES);
        assert!(w.q.len() >= (g0 + ng) * nb * TILE && w.scales.len() >= (g0 + ng) * nb * LANES);
        assert!(w.sums.len() == w.scales.len() && a.q.len() == m * w.cols);
        assert!(a.scales.len() == m * nb && a.mins.len() == m * nb);
        let mut i = 0;
        while i < m {
            let r = MR.min(m - i);
            macro_rules! go {
                ($ng:literal, $r:literal) => {
                    // SAFETY: CPU features detected at run time; the asserts above bound every
                    // access: groups g0..g0+ng, activation rows i..i+r < m, blocks < nb.
                    unsafe { tile::<$ng, $r>(w, g0, a, i, m, out) }
                };
            }
            match (ng, r) {
                (4, 3) => go!(4, 3),
                (4, 2) => go!(4, 2),
                (4, 1) => go!(4, 1),
                (3, 3) => go!(3, 3),
                (3, 2) => go!(3, 2),
                (3, 1) => go!(3, 1),
                (2, 3) => go!(2, 3),
                (2, 2) => go!(2, 2),
                (2, 1) => go!(2, 1),
                (1, 3) => go!(1, 3),
                (1, 2) => go!(1, 2),
                (1, 1) => go!(1, 1),
                _ => unreachable!("tile sizes are bounded by GROUPS_PER_TASK and MR"),
            }
            i += r;
        }
    }

    /// [`super::quantize_activations`] with AVX-512: a block is two registers.
    pub(super) fn quantize_activations(x: &[f32], q: &mut [u8], scales: &mut [f32], mins: &mut [f32]) {
        let nb = x.len() / BLOCK;
        assert!(x.len() == nb * BLOCK && q.len() == x.len() && scales.len() == nb && mins.len() == nb);
        // SAFETY: CPU features detected at run time; every block access is within the lengths
        // asserted above.
        unsafe { quantize_avx512(x, q, scales, mins) }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn quantize_avx512(x: &[f32], q: &mut [u8], scales: &mut [f32], mins: &mut [f32]) {
        for b in 0..scales.len() {
            let v0 = _mm512_loadu_ps(x.as_ptr().add(b * BLOCK));
            let v1 = _mm512_loadu_ps(x.as_ptr().add(b * BLOCK + 16));
            let lo = _mm512_reduce_min_ps(_mm512_min_ps(v0, v1));
            let hi = _mm512_reduce_max_ps(_mm512_max_ps(v0, v1));
            let d = (hi - lo) / 255.0;
            let inv = _mm512_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
            let lov = _mm512_set1_ps(lo);
            for (h, v) in [v0, v1].into_iter().enumerate() {
                // Round to nearest (the default MXCSR mode), then saturate to u8.
                let i = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(v, lov), inv));
                let bytes = _mm512_cvtusepi32_epi8(_mm512_max_epi32(i, _mm512_setzero_si512()));
                _mm_storeu_si128(q.as_mut_ptr().add(b * BLOCK + h * 16) as *mut __m128i, bytes);
            }
            scales[b] = d;
            mins[b] = lo;
        }
    }

    // The register tile is indexed [group][row] from several loops at once.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn tile<const NG: usize, const R: usize>(
        w: &Int8Matrix,
        g0: usize,
        a: &Activations,
        i0: usize,
        m: usize,
        out: &mut [f32],
    ) {
        let cols = w.cols;
        let nb = cols / BLOCK;
        let mut acc = [[_mm512_setzero_ps(); R]; NG];
        for b in 0..nb {
            let mut sums = [[_mm512_setzero_si512(); R]; NG];
            for s in 0..STEPS {
                let mut wv = [_mm512_setzero_si512(); NG];
                for (g, v) in wv.iter_mut().enumerate() {
                    *v = _mm512_loadu_si512(w.q.as_ptr().add(((g0 + g) * nb + b) * TILE + s * LANES * 4) as *const _);
                }
                for r in 0..R {
                    let x4 = (a.q.as_ptr().add((i0 + r) * cols + b * BLOCK + s * 4) as *const i32).read_unaligned();
                    let xv = _mm512_set1_epi32(x4);
                    for g in 0..NG {
                        sums[g][r] = _mm512_dpbusd_epi32(sums[g][r], xv, wv[g]);
                    }
                }
            }
            for g in 0..NG {
                let ws = _mm512_loadu_ps(w.scales.as_ptr().add(((g0 + g) * nb + b) * LANES));
                let wsum = _mm512_loadu_ps(w.sums.as_ptr().add(((g0 + g) * nb + b) * LANES));
                for r in 0..R {
                    let xa = (i0 + r) * nb + b;
                    let scale = _mm512_mul_ps(ws, _mm512_set1_ps(*a.scales.get_unchecked(xa)));
                    let t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[g][r]), scale, acc[g][r]);
                    acc[g][r] = _mm512_fmadd_ps(wsum, _mm512_set1_ps(*a.mins.get_unchecked(xa)), t);
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

#[cfg(test)]
mod from_blocks_tests {
    use super::*;

    /// Integer blocks with their own scales come back exactly.
    #[test]
    fn blocks_pack_as_they_are() {
        let (rows, cols) = (20, 64);
        let q: Vec<i8> = (0..rows * cols).map(|i| ((i * 37) % 255) as i32 as i8).collect();
        let scales: Vec<f32> = (0..rows * cols / BLOCK).map(|i| 0.001 * (i + 1) as f32).collect();
        let m = Int8Matrix::from_blocks(&q, &scales, rows, cols).unwrap();
        let w = m.dequantize();
        for (i, (&v, &qv)) in w.iter().zip(&q).enumerate() {
            assert_eq!(v, scales[i / BLOCK] * qv as f32, "{i}");
        }
        assert!(Int8Matrix::from_blocks(&q, &scales, rows, cols + 1).is_none());
        assert!(Int8Matrix::from_blocks(&q[1..], &scales, rows, cols).is_none());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn check(y: &[f32], w: &[f32], x: &[f32], rows: usize, cols: usize, m: usize) {
        for j in 0..m {
            for r in 0..rows {
                let exact: f32 = (0..cols).map(|i| x[j * cols + i] * w[r * cols + i]).sum();
                let norm: f32 = (0..cols).map(|i| (x[j * cols + i] * w[r * cols + i]).abs()).sum();
                let got = y[j * rows + r];
                assert!((got - exact).abs() <= 0.02 * norm, "m={m} row {j} col {r}: {got} vs {exact}");
            }
        }
    }

    #[test]
    fn int8_matmul_is_close_to_float() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        // 130 rows: 8 full row groups and a partial one; 3 blocks of columns.
        let (rows, cols) = (130, 96);
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.random::<f32>() - 0.5).collect();
        let q = Int8Matrix::from_f32(&w, rows, cols).unwrap();
        for m in [1, 2, 3, 4, 7, 64] {
            let x: Vec<f32> = (0..m * cols).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
            let y = q.matmul(&x, m);
            assert_eq!(y.len(), m * rows);
            check(&y, &w, &x, rows, cols, m);
        }
        assert!(Int8Matrix::from_f32(&w[..rows * 10], rows, 10).is_none(), "cols must be whole blocks");
        // Stacking equals running the parts one by one.
        let (a, b) = (
            Int8Matrix::from_f32(&w[..32 * cols], 32, cols).unwrap(),
            Int8Matrix::from_f32(&w[32 * cols..96 * cols], 64, cols).unwrap(),
        );
        let ab = Int8Matrix::concat(&[&a, &b]).unwrap();
        let x: Vec<f32> = (0..2 * cols).map(|_| rng.random::<f32>() - 0.5).collect();
        let (ya, yb, yab) = (a.matmul(&x, 2), b.matmul(&x, 2), ab.matmul(&x, 2));
        for j in 0..2 {
            assert_eq!(&yab[j * 96..j * 96 + 32], &ya[j * 32..(j + 1) * 32]);
            assert_eq!(&yab[j * 96 + 32..(j + 1) * 96], &yb[j * 64..(j + 1) * 64]);
        }
        assert!(Int8Matrix::concat(&[&q, &a]).is_none(), "130 rows are not whole groups");
    }

    #[test]
    fn gguf_q8_0_blocks_are_packed_as_they_are() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (rows, cols) = (20, 64);
        let mut data = Vec::new();
        let mut want = Vec::new();
        for _ in 0..rows * cols / BLOCK {
            let d = half::f16::from_f32(rng.random::<f32>() * 0.01);
            data.extend_from_slice(&d.to_bits().to_le_bytes());
            for _ in 0..BLOCK {
                let q: i8 = rng.random();
                data.push(q as u8);
                want.push(d.to_f32() * q as f32);
            }
        }
        let m = Int8Matrix::from_gguf_q8_0(&data, rows, cols).unwrap();
        assert_eq!(m.dequantize(), want);
        let mut row = vec![0f32; cols];
        m.row(17, &mut row);
        assert_eq!(row, &want[17 * cols..18 * cols]);
        let x: Vec<f32> = (0..3 * cols).map(|_| rng.random::<f32>() - 0.5).collect();
        check(&m.matmul(&x, 3), &want, &x, rows, cols, 3);
        assert!(Int8Matrix::from_gguf_q8_0(&data[1..], rows, cols).is_none());
    }

    #[test]
    fn dispatched_quantization_matches_the_portable_one() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let x: Vec<f32> = (0..7 * 96).map(|_| rng.random::<f32>() * 4.0 - 3.0).collect();
        let a = Activations::quantize(&x, 96);
        let (mut q, mut s, mut m) = (vec![0u8; x.len()], vec![0f32; x.len() / BLOCK], vec![0f32; x.len() / BLOCK]);
        quantize_activations(&x, &mut q, &mut s, &mut m);
        assert_eq!((&a.scales, &a.mins), (&s, &m));
        // Ties may round either way; nothing else differs.
        assert!(a.q.iter().zip(&q).all(|(a, b)| a.abs_diff(*b) <= 1));
        for (b, xb) in x.chunks(BLOCK).enumerate() {
            for (i, v) in xb.iter().enumerate() {
                let back = m[b] + s[b] * q[b * BLOCK + i] as f32;
                assert!((back - v).abs() <= 0.5001 * s[b], "{v} came back as {back}");
            }
        }
    }

    /// The AVX2 kernel, whatever path is selected, against the portable one: integer sums are
    /// exact, so only the float scaling's rounding differs. Odd row counts and a partial group.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_kernel_matches_the_portable_one() {
        if !avx2_present() {
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (rows, cols) = (56, 96);
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
        let q = Int8Matrix::from_f32(&w, rows, cols).unwrap();
        for m in [1, 2, 3, 6] {
            // Large activations: every byte near 0 or 255 against weights near +-127.
            let x: Vec<f32> =
                (0..m * cols).map(|i| if i % 3 == 0 { -40.0 } else { 40.0 * rng.random::<f32>() }).collect();
            let a = Activations::quantize(&x, cols);
            let mut fast = vec![0f32; 4 * m * LANES];
            let mut portable = vec![0f32; 4 * m * LANES];
            avx2::groups(&q, 0, 4, &a, m, &mut fast);
            groups_portable(&q, 0, 4, &a, m, &mut portable);
            for (f, p) in fast.iter().zip(&portable) {
                assert!((f - p).abs() <= 1e-4 * p.abs().max(1.0), "m={m}: {f} vs {p}");
            }
        }
    }

    #[test]
    fn dispatched_kernel_matches_the_portable_one() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let (rows, cols, m) = (64, 64, 5);
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.random::<f32>() - 0.5).collect();
        let x: Vec<f32> = (0..m * cols).map(|_| rng.random::<f32>() - 0.5).collect();
        let q = Int8Matrix::from_f32(&w, rows, cols).unwrap();
        let a = Activations::quantize(&x, cols);
        let mut fast = vec![0f32; 4 * m * LANES];
        let mut portable = vec![0f32; 4 * m * LANES];
        groups_times_activations(&q, 0, 4, &a, m, &mut fast);
        groups_portable(&q, 0, 4, &a, m, &mut portable);
        for (f, p) in fast.iter().zip(&portable) {
            assert!((f - p).abs() <= 1e-4 * p.abs().max(1.0), "{f} vs {p}");
        }
    }
}

#[cfg(test)]
mod rows_independent {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn a_row_does_not_depend_on_its_batch() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let (rows, cols, m) = (200, 576, 11);
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.random::<f32>() - 0.5).collect();
        let x: Vec<f32> = (0..m * cols).map(|_| rng.random::<f32>() - 0.5).collect();
        let q = Int8Matrix::from_f32(&w, rows, cols).unwrap();
        let all = q.matmul(&x, m);
        for j in 0..m {
            let one = q.matmul(&x[j * cols..(j + 1) * cols], 1);
            assert_eq!(&all[j * rows..(j + 1) * rows], &one[..], "row {j}");
        }
    }
}
