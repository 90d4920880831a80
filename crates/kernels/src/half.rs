//! Matrix products over half-precision weights (bfloat16 or float16) with float32 activations.
//!
//! A bfloat16 or float16 checkpoint runs in its own precision: its matrices keep their 16 bits
//! per weight (half the bytes a decode step reads from a float32 copy) and are only repacked,
//! never rounded. Each weight is widened to float32 exactly as it is loaded, so a product is
//! the float32 product with the stored weights, up to float32 accumulation rounding.
//!
//! Layout: 16 output rows side by side per row group, two columns per lane: the block of
//! (row group `g`, column pair `p`) is 32 values (64 bytes, one cache line), and a row group's
//! blocks follow each other along the columns. Within a block, bfloat16 values are stored
//! lane by lane, each lane's two columns adjacent (`[lane][2]`): one 32-bit word per lane, so
//! a shift by 16 and an `and` give the two columns as float32, and the block is exactly the
//! operand of AVX-512 BF16's `vdpbf16ps`. Float16 values are stored column by column
//! (`[2][lane]`), so F16C's `vcvtph2ps` widens 8 lanes of one column per instruction.
//!
//! Kernels, picked at run time:
//! - AVX2 + FMA (+ F16C): widening loads, 4 activation rows per pass over a row group's
//!   blocks (prompts and batches), 4 row groups per pass for one row (decode).
//! - AVX-512 BF16 (bfloat16 weights, where [`crate::cpu_kernel_path`] is `vnni` and the CPU
//!   has `avx512bf16`): `vdpbf16ps` on the packed blocks, the activations rounded to
//!   bfloat16 per call (as a bfloat16 model computes anyway). **Not run on hardware by its
//!   author** (no such CPU was available); its test runs wherever the CPU has the feature.
//! - Portable loops over the same layout elsewhere (`multiversion`).
//!
//! In every kernel a row's accumulation order is fixed (column pairs in order, both columns
//! of a pair into one accumulator per lane), so a row's result does not depend on the batch
//! it is in.

use ::half::{bf16, f16};
use multiversion::multiversion;
use rayon::prelude::*;

/// Output rows packed side by side.
const LANES: usize = 16;
/// Values in one (row group, column pair) block.
const PAIR_BLOCK: usize = 2 * LANES;

/// Which half-precision format a matrix holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HalfFormat {
    /// bfloat16: float32's exponent, 8 significant bits.
    BF16,
    /// IEEE float16: 5 exponent bits, 11 significant bits.
    F16,
}

impl HalfFormat {
    /// Where column `c` (0 or 1) of lane `lane` sits in a block.
    #[inline(always)]
    fn slot(self, lane: usize, c: usize) -> usize {
        match self {
            Self::BF16 => lane * 2 + c,
            Self::F16 => c * LANES + lane,
        }
    }

    /// A stored value as float32 (exact).
    #[inline(always)]
    fn widen(self, bits: u16) -> f32 {
        match self {
            Self::BF16 => f32::from_bits((bits as u32) << 16),
            Self::F16 => f16::from_bits(bits).to_f32(),
        }
    }

    /// The format's name in logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::BF16 => "bfloat16",
            Self::F16 => "float16",
        }
    }
}

/// A `[rows, cols]` half-precision weight matrix (`y = x W^T`), packed for the kernels.
#[derive(Debug, Clone)]
pub struct HalfMatrix {
    rows: usize,
    cols: usize,
    format: HalfFormat,
    /// `[row_groups][cols / 2][32]` stored bits (see the module docs for the order within a
    /// block); rows past `rows` are zero.
    w: Vec<u16>,
}

impl HalfMatrix {
    /// Packs a row-major `[rows, cols]` matrix given as its values' bits. `None` unless `cols`
    /// is even and positive and `bits` has `rows * cols` values.
    pub fn from_bits(format: HalfFormat, bits: &[u16], rows: usize, cols: usize) -> Option<Self> {
        Self::pack(format, rows, cols, bits.len(), |i| bits[i])
    }

    /// Packs a row-major `[rows, cols]` matrix stored as little-endian 16-bit values (a
    /// safetensors `BF16` / `F16` tensor's bytes). `None` unless `cols` is even and positive
    /// and `bytes` holds exactly `rows * cols` values.
    pub fn from_le_bytes(format: HalfFormat, bytes: &[u8], rows: usize, cols: usize) -> Option<Self> {
        if !bytes.len().is_multiple_of(2) {
            return None;
        }
        Self::pack(format, rows, cols, bytes.len() / 2, |i| u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]))
    }

    /// Rounds a row-major float32 matrix to `format` (round to nearest even) and packs it: for
    /// tests and benchmarks.
    pub fn from_f32(format: HalfFormat, w: &[f32], rows: usize, cols: usize) -> Option<Self> {
        Self::pack(format, rows, cols, w.len(), |i| match format {
            HalfFormat::BF16 => bf16::from_f32(w[i]).to_bits(),
            HalfFormat::F16 => f16::from_f32(w[i]).to_bits(),
        })
    }

    fn pack(
        format: HalfFormat,
        rows: usize,
        cols: usize,
        len: usize,
        at: impl Fn(usize) -> u16 + Sync,
    ) -> Option<Self> {
        if cols == 0 || !cols.is_multiple_of(2) || rows.checked_mul(cols)? != len {
            return None;
        }
        let np = cols / 2;
        let groups = rows.div_ceil(LANES);
        let mut w = vec![0u16; groups * np * PAIR_BLOCK];
        w.par_chunks_mut(np * PAIR_BLOCK).enumerate().for_each(|(g, dst)| {
            for lane in 0..LANES.min(rows - g * LANES) {
                let row = (g * LANES + lane) * cols;
                for (p, block) in dst.chunks_exact_mut(PAIR_BLOCK).enumerate() {
                    block[format.slot(lane, 0)] = at(row + 2 * p);
                    block[format.slot(lane, 1)] = at(row + 2 * p + 1);
                }
            }
        });
        Some(Self { rows, cols, format, w })
    }

    /// Row `r`'s weights as float32 (an embedding lookup in a tied output matrix).
    pub fn row(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.rows && out.len() == self.cols, "row {r} of {} into {} values", self.rows, out.len());
        let np = self.cols / 2;
        let (g, lane) = (r / LANES, r % LANES);
        let blocks = &self.w[g * np * PAIR_BLOCK..][..np * PAIR_BLOCK];
        for (o, block) in out.chunks_exact_mut(2).zip(blocks.chunks_exact(PAIR_BLOCK)) {
            o[0] = self.format.widen(block[self.format.slot(lane, 0)]);
            o[1] = self.format.widen(block[self.format.slot(lane, 1)]);
        }
    }

    /// The weights as float32, row-major `[rows, cols]` (exactly the stored values).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, row) in out.chunks_exact_mut(self.cols).enumerate() {
            self.row(r, row);
        }
        out
    }

    /// Stacks matrices of one format and input width (their rows one after another), so
    /// projections of the same input run as one product. `None` if formats or widths differ
    /// or a part's rows are not whole 16-row groups.
    pub fn concat(parts: &[&HalfMatrix]) -> Option<Self> {
        let first = parts.first()?;
        if parts.iter().any(|p| p.cols != first.cols || p.format != first.format || !p.rows.is_multiple_of(LANES)) {
            return None;
        }
        Some(Self {
            rows: parts.iter().map(|p| p.rows).sum(),
            cols: first.cols,
            format: first.format,
            w: parts.iter().flat_map(|p| p.w.iter().copied()).collect(),
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

    /// The stored format.
    pub fn format(&self) -> HalfFormat {
        self.format
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        2 * self.w.len()
    }

    /// `x @ W^T` for `m` float32 activation rows (`x` is `[m, cols]` row-major); returns
    /// `[m, rows]`.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.cols, "activation shape");
        if m == 0 {
            return Vec::new();
        }
        let path = Path::get(self.format);
        // AVX-512 BF16 multiplies bfloat16 pairs: the activations are rounded once per call.
        let pairs = if path == Path::Avx512Bf16 { bf16_pairs(x) } else { Vec::new() };
        // One row (decode) is bound by reading the weights: small tasks keep both threads busy
        // to the end of the matrix. Batches do more work per group.
        let groups = self.rows.div_ceil(LANES);
        let per_task = if m == 1 { (groups / 64).clamp(2, 8) } else { 4 };
        crate::int8::by_row_groups(self.rows, m, per_task, |g0, ng, out| match path {
            #[cfg(target_arch = "x86_64")]
            Path::Avx2 => avx2::groups(self, g0, ng, x, m, out),
            #[cfg(target_arch = "x86_64")]
            Path::Avx512Bf16 => avx512bf16::groups(self, g0, ng, &pairs, m, out),
            _ => groups_portable(self, g0, ng, x, m, out),
        })
    }
}

/// Which kernel a matrix of a format runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Avx512Bf16,
    Avx2,
    Portable,
}

impl Path {
    fn get(format: HalfFormat) -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            use crate::int8::KernelPath;
            let path = crate::int8::kernel_path();
            if format == HalfFormat::BF16 && path == KernelPath::Vnni && avx512bf16::available() {
                return Self::Avx512Bf16;
            }
            if path != KernelPath::Portable
                && std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
            {
                return Self::Avx2;
            }
        }
        let _ = format;
        Self::Portable
    }
}

/// What the half-precision kernel for `format` runs on this machine, for the start log.
pub fn kernel_name(format: HalfFormat) -> &'static str {
    match Path::get(format) {
        Path::Avx512Bf16 => "AVX-512 BF16 vdpbf16ps",
        Path::Avx2 => "AVX2 widening loads",
        Path::Portable => "portable loops",
    }
}

/// Each activation row's column pairs rounded to bfloat16 (round to nearest even), the pair
/// in one 32-bit word (first column in the low half): `vdpbf16ps`'s broadcast operand.
fn bf16_pairs(x: &[f32]) -> Vec<u32> {
    x.chunks_exact(2)
        .map(|p| bf16::from_f32(p[0]).to_bits() as u32 | (bf16::from_f32(p[1]).to_bits() as u32) << 16)
        .collect()
}

/// Row groups `g0..g0 + ng` times every activation row, into `out` laid out `[ng][m][LANES]`.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
fn groups_portable(w: &HalfMatrix, g0: usize, ng: usize, x: &[f32], m: usize, out: &mut [f32]) {
    let np = w.cols / 2;
    let f = w.format;
    for gi in 0..ng {
        let blocks = &w.w[(g0 + gi) * np * PAIR_BLOCK..][..np * PAIR_BLOCK];
        for i in 0..m {
            let xr = &x[i * w.cols..][..w.cols];
            let mut acc = [0f32; LANES];
            for (xp, block) in xr.chunks_exact(2).zip(blocks.chunks_exact(PAIR_BLOCK)) {
                for (lane, a) in acc.iter_mut().enumerate() {
                    let t = *a + f.widen(block[f.slot(lane, 0)]) * xp[0];
                    *a = t + f.widen(block[f.slot(lane, 1)]) * xp[1];
                }
            }
            out[(gi * m + i) * LANES..][..LANES].copy_from_slice(&acc);
        }
    }
}

/// AVX2 + FMA (+ F16C for float16): each block widened as loaded, `NG` row groups x `R`
/// activation rows of accumulators (two 8-lane halves per group) in registers.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{HalfFormat, HalfMatrix, LANES, PAIR_BLOCK};

    /// Safe entry: checks every bound the kernel relies on. The caller checked that the CPU
    /// has AVX2, FMA and F16C.
    pub(super) fn groups(w: &HalfMatrix, g0: usize, ng: usize, x: &[f32], m: usize, out: &mut [f32]) {
        let np = w.cols / 2;
        assert!(out.len() == ng * m * LANES && x.len() == m * w.cols);
        assert!(w.w.len() >= (g0 + ng) * np * PAIR_BLOCK);
        let bf = w.format == HalfFormat::BF16;
        let mut i = 0;
        while i < m {
            // Prompts and batches: 4 activation rows per pass over a group's blocks (each
            // widened weight serves 4 rows); one row: 4 groups per pass (independent sums).
            let r = (m - i).min(4);
            let per = match r {
                1 => 4,
                2 => 2,
                _ => 1,
            };
            let mut gi = 0;
            while gi < ng {
                let n = (ng - gi).min(per);
                macro_rules! go {
                    ($ng:literal, $r:literal) => {
                        // SAFETY: CPU features checked by the caller; the asserts above bound
                        // every access: groups g0 + gi + n <= g0 + ng, rows i + r <= m, column
                        // pairs < np.
                        unsafe {
                            if bf {
                                tile::<$ng, $r, true>(w, g0, gi, x, i, m, out)
                            } else {
                                tile::<$ng, $r, false>(w, g0, gi, x, i, m, out)
                            }
                        }
                    };
                }
                match (n, r) {
                    (4, 1) => go!(4, 1),
                    (3, 1) => go!(3, 1),
                    (2, 1) => go!(2, 1),
                    (1, 1) => go!(1, 1),
                    (2, 2) => go!(2, 2),
                    (1, 2) => go!(1, 2),
                    (1, 3) => go!(1, 3),
                    (1, 4) => go!(1, 4),
                    _ => unreachable!("tile sizes are bounded above"),
                }
                gi += n;
            }
            i += r;
        }
    }

    /// How far ahead (bytes) a decode tile prefetches each row group's blocks.
    const PREFETCH: usize = 4096;

    /// Groups `g0 + gi .. + NG` times rows `i0 .. i0 + R`.
    #[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile<const NG: usize, const R: usize, const BF: bool>(
        w: &HalfMatrix,
        g0: usize,
        gi: usize,
        x: &[f32],
        i0: usize,
        m: usize,
        out: &mut [f32],
    ) {
        let cols = w.cols;
        let np = cols / 2;
        let high = _mm256_set1_epi32(0xffff_0000u32 as i32);
        let mut acc = [[[_mm256_setzero_ps(); R]; 2]; NG];
        for p in 0..np {
            let mut wv = [[[_mm256_setzero_ps(); 2]; 2]; NG];
            for g in 0..NG {
                let block = w.w.as_ptr().add(((g0 + gi + g) * np + p) * PAIR_BLOCK);
                if R == 1 {
                    // One row is bound by reading the weights: each group's stream is fetched
                    // 4 KiB ahead (a hint: never faults, past the end included).
                    _mm_prefetch::<_MM_HINT_T0>(block.wrapping_byte_add(PREFETCH) as *const i8);
                }
                for h in 0..2 {
                    wv[g][h] = if BF {
                        // 8 lanes x (column 2p, column 2p + 1): each 32-bit word's low half
                        // shifted up, and its high half masked, are the two columns in f32.
                        let v = _mm256_loadu_si256(block.add(16 * h) as *const __m256i);
                        [
                            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v)),
                            _mm256_castsi256_ps(_mm256_and_si256(v, high)),
                        ]
                    } else {
                        [
                            _mm256_cvtph_ps(_mm_loadu_si128(block.add(8 * h) as *const __m128i)),
                            _mm256_cvtph_ps(_mm_loadu_si128(block.add(LANES + 8 * h) as *const __m128i)),
                        ]
                    };
                }
            }
            for r in 0..R {
                let xr = x.as_ptr().add((i0 + r) * cols + 2 * p);
                let x0 = _mm256_broadcast_ss(&*xr);
                let x1 = _mm256_broadcast_ss(&*xr.add(1));
                for g in 0..NG {
                    for h in 0..2 {
                        let t = _mm256_fmadd_ps(wv[g][h][0], x0, acc[g][h][r]);
                        acc[g][h][r] = _mm256_fmadd_ps(wv[g][h][1], x1, t);
                    }
                }
            }
        }
        for g in 0..NG {
            for r in 0..R {
                for h in 0..2 {
                    _mm256_storeu_ps(out.as_mut_ptr().add(((gi + g) * m + i0 + r) * LANES + 8 * h), acc[g][h][r]);
                }
            }
        }
    }
}

/// AVX-512 BF16: `vdpbf16ps` multiplies a block (16 lanes x a column pair) by an activation
/// pair broadcast to every lane and adds both products into each lane's float32 sum. Not run
/// on hardware by its author (see the module docs).
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx512bf16 {
    use std::arch::x86_64::*;

    use super::{HalfFormat, HalfMatrix, LANES, PAIR_BLOCK};

    pub(super) fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bf16")
    }

    /// Safe entry: checks every bound the kernel relies on. The caller checked [`available`];
    /// `pairs` is [`super::bf16_pairs`] of the `[m, cols]` activations.
    pub(super) fn groups(w: &HalfMatrix, g0: usize, ng: usize, pairs: &[u32], m: usize, out: &mut [f32]) {
        let np = w.cols / 2;
        assert!(w.format == HalfFormat::BF16);
        assert!(out.len() == ng * m * LANES && pairs.len() == m * np);
        assert!(w.w.len() >= (g0 + ng) * np * PAIR_BLOCK);
        let mut i = 0;
        while i < m {
            let r = (m - i).min(4);
            let per = if r == 1 { 4 } else { 1 };
            let mut gi = 0;
            while gi < ng {
                let n = (ng - gi).min(per);
                // SAFETY: CPU features checked by the caller; the asserts above bound every
                // access: groups g0 + gi + n <= g0 + ng, rows i + r <= m, pairs < np.
                unsafe {
                    match (n, r) {
                        (4, 1) => tile::<4, 1>(w, g0, gi, pairs, i, m, out),
                        (3, 1) => tile::<3, 1>(w, g0, gi, pairs, i, m, out),
                        (2, 1) => tile::<2, 1>(w, g0, gi, pairs, i, m, out),
                        (1, 1) => tile::<1, 1>(w, g0, gi, pairs, i, m, out),
                        (1, 2) => tile::<1, 2>(w, g0, gi, pairs, i, m, out),
                        (1, 3) => tile::<1, 3>(w, g0, gi, pairs, i, m, out),
                        (1, 4) => tile::<1, 4>(w, g0, gi, pairs, i, m, out),
                        _ => unreachable!("tile sizes are bounded above"),
                    }
                }
                gi += n;
            }
            i += r;
        }
    }

    #[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn tile<const NG: usize, const R: usize>(
        w: &HalfMatrix,
        g0: usize,
        gi: usize,
        pairs: &[u32],
        i0: usize,
        m: usize,
        out: &mut [f32],
    ) {
        let np = w.cols / 2;
        let mut acc = [[_mm512_setzero_ps(); R]; NG];
        for p in 0..np {
            let mut wv = [_mm512_setzero_si512(); NG];
            for g in 0..NG {
                wv[g] = _mm512_loadu_si512(w.w.as_ptr().add(((g0 + gi + g) * np + p) * PAIR_BLOCK) as *const _);
            }
            for r in 0..R {
                let xp = _mm512_set1_epi32(*pairs.get_unchecked((i0 + r) * np + p) as i32);
                for g in 0..NG {
                    // SAFETY (of the transmutes): __m512i and __m512bh are both 512 bits of
                    // plain data; the blocks and pairs hold bfloat16 bits.
                    acc[g][r] = _mm512_dpbf16_ps(
                        acc[g][r],
                        std::mem::transmute::<__m512i, __m512bh>(wv[g]),
                        std::mem::transmute::<__m512i, __m512bh>(xp),
                    );
                }
            }
        }
        for g in 0..NG {
            for r in 0..R {
                _mm512_storeu_ps(out.as_mut_ptr().add(((gi + g) * m + i0 + r) * LANES), acc[g][r]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// `y` against the float32 product with the exactly widened weights: within float32
    /// accumulation rounding (`cols` roundings of at most 2^-24 of the sum of magnitudes), or,
    /// when the activations are rounded to bfloat16 (`vdpbf16ps`), within 2^-8 of it.
    fn check(y: &[f32], w: &[f32], x: &[f32], rows: usize, cols: usize, m: usize, rel: f32) {
        for j in 0..m {
            for r in 0..rows {
                let exact: f64 = (0..cols).map(|i| x[j * cols + i] as f64 * w[r * cols + i] as f64).sum();
                let norm: f64 = (0..cols).map(|i| (x[j * cols + i] as f64 * w[r * cols + i] as f64).abs()).sum();
                let got = y[j * rows + r] as f64;
                assert!((got - exact).abs() <= rel as f64 * norm + 1e-30, "m={m} row {j} col {r}: {got} vs {exact}");
            }
        }
    }

    /// The tolerance of the kernel this machine runs for `format`.
    fn tolerance(format: HalfFormat, cols: usize) -> f32 {
        match Path::get(format) {
            Path::Avx512Bf16 => 2f32.powi(-8),
            _ => cols as f32 * 2f32.powi(-24),
        }
    }

    fn random(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
    }

    #[test]
    fn matmul_matches_the_widened_weights() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        // 130 rows: 8 full row groups and a partial one.
        for (rows, cols) in [(130, 96), (16, 2), (48, 576)] {
            let w = random(&mut rng, rows * cols);
            for format in [HalfFormat::BF16, HalfFormat::F16] {
                let h = HalfMatrix::from_f32(format, &w, rows, cols).unwrap();
                let widened = h.dequantize();
                for (a, b) in w.iter().zip(&widened) {
                    let step = if format == HalfFormat::BF16 { 2f32.powi(-8) } else { 2f32.powi(-11) };
                    assert!((a - b).abs() <= step * a.abs(), "{format:?}: {a} stored as {b}");
                }
                for m in [1, 2, 3, 4, 5, 7, 64] {
                    let x = random(&mut rng, m * cols);
                    let y = h.matmul(&x, m);
                    assert_eq!(y.len(), m * rows);
                    check(&y, &widened, &x, rows, cols, m, tolerance(format, cols));
                }
                assert_eq!(h.bytes(), rows.div_ceil(16) * 16 * cols * 2);
            }
        }
    }

    #[test]
    fn stored_bits_are_kept_and_read_in_order() {
        // Row r, column c holds the value r + c / 1000 (exact in neither format: rounded once).
        let (rows, cols) = (20, 6);
        let bits: Vec<u16> =
            (0..rows * cols).map(|i| bf16::from_f32((i / cols) as f32 + (i % cols) as f32 / 8.0).to_bits()).collect();
        let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        let a = HalfMatrix::from_bits(HalfFormat::BF16, &bits, rows, cols).unwrap();
        let b = HalfMatrix::from_le_bytes(HalfFormat::BF16, &bytes, rows, cols).unwrap();
        let want: Vec<f32> = bits.iter().map(|&b| bf16::from_bits(b).to_f32()).collect();
        assert_eq!(a.dequantize(), want);
        assert_eq!(b.dequantize(), want);
        let f: Vec<u16> = (0..rows * cols).map(|i| f16::from_f32(i as f32 * 0.25).to_bits()).collect();
        let h = HalfMatrix::from_bits(HalfFormat::F16, &f, rows, cols).unwrap();
        assert_eq!(h.dequantize(), (0..rows * cols).map(|i| i as f32 * 0.25).collect::<Vec<_>>());
        let mut row = vec![0f32; cols];
        h.row(17, &mut row);
        assert_eq!(row, (0..cols).map(|c| (17 * cols + c) as f32 * 0.25).collect::<Vec<_>>());
        // One product by hand: a one-hot activation picks a column.
        let mut x = vec![0f32; cols];
        x[3] = 1.0;
        let y = a.matmul(&x, 1);
        assert_eq!(y, (0..rows).map(|r| r as f32 + 3.0 / 8.0).collect::<Vec<_>>());
        // Odd widths, wrong lengths.
        assert!(HalfMatrix::from_bits(HalfFormat::BF16, &bits[..rows * 5], rows, 5).is_none());
        assert!(HalfMatrix::from_bits(HalfFormat::BF16, &bits[1..], rows, cols).is_none());
        assert!(HalfMatrix::from_le_bytes(HalfFormat::BF16, &bytes[1..], rows, cols).is_none());
        assert!(HalfMatrix::from_bits(HalfFormat::BF16, &[], 0, 0).is_none());
    }

    /// A task's `[ng][m][16]` output as `[m, rows]`.
    fn unpack(out: &[f32], rows: usize, m: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * rows];
        for i in 0..m {
            for r in 0..rows {
                y[i * rows + r] = out[((r / LANES) * m + i) * LANES + r % LANES];
            }
        }
        y
    }

    #[test]
    fn portable_kernel_matches_the_widened_weights() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let (rows, cols) = (64, 128);
        let w = random(&mut rng, rows * cols);
        for format in [HalfFormat::BF16, HalfFormat::F16] {
            let h = HalfMatrix::from_f32(format, &w, rows, cols).unwrap();
            for m in [1, 2, 3, 4, 6] {
                let x = random(&mut rng, m * cols);
                let mut out = vec![0f32; 4 * m * LANES];
                groups_portable(&h, 0, 4, &x, m, &mut out);
                check(&unpack(&out, rows, m), &h.dequantize(), &x, rows, cols, m, cols as f32 * 2f32.powi(-23));
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_kernel_matches_the_widened_weights() {
        assert!(crate::int8::avx2_present(), "the test machines have AVX2; this one does not");
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let (rows, cols) = (112, 256);
        let w = random(&mut rng, rows * cols);
        for format in [HalfFormat::BF16, HalfFormat::F16] {
            let h = HalfMatrix::from_f32(format, &w, rows, cols).unwrap();
            for m in [1, 2, 3, 4, 5, 9] {
                let x = random(&mut rng, m * cols);
                let mut out = vec![0f32; 7 * m * LANES];
                avx2::groups(&h, 0, 7, &x, m, &mut out);
                check(&unpack(&out, rows, m), &h.dequantize(), &x, rows, cols, m, cols as f32 * 2f32.powi(-24));
            }
        }
    }

    /// Where the CPU has AVX-512 BF16: `vdpbf16ps` against the product with bfloat16-rounded
    /// activations (what it computes), whatever path is selected.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_bf16_kernel_matches_rounded_activations() {
        if !avx512bf16::available() {
            eprintln!("no AVX-512 BF16 on this CPU: not run");
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let (rows, cols) = (80, 192);
        let w = random(&mut rng, rows * cols);
        let h = HalfMatrix::from_f32(HalfFormat::BF16, &w, rows, cols).unwrap();
        let widened = h.dequantize();
        for m in [1, 2, 3, 4, 5, 9] {
            let x = random(&mut rng, m * cols);
            let rounded: Vec<f32> = x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
            let pairs = bf16_pairs(&x);
            let mut out = vec![0f32; 5 * m * LANES];
            avx512bf16::groups(&h, 0, 5, &pairs, m, &mut out);
            check(&unpack(&out, rows, m), &widened, &rounded, rows, cols, m, cols as f32 * 2f32.powi(-23));
        }
    }

    #[test]
    fn a_row_does_not_depend_on_its_batch_and_stacking_changes_nothing() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let (rows, cols, m) = (96, 576, 11);
        let w = random(&mut rng, rows * cols);
        let x = random(&mut rng, m * cols);
        for format in [HalfFormat::BF16, HalfFormat::F16] {
            let h = HalfMatrix::from_f32(format, &w, rows, cols).unwrap();
            let all = h.matmul(&x, m);
            for j in 0..m {
                let one = h.matmul(&x[j * cols..(j + 1) * cols], 1);
                assert_eq!(&all[j * rows..(j + 1) * rows], &one[..], "{format:?} row {j}");
            }
            let (a, b) = (
                HalfMatrix::from_f32(format, &w[..32 * cols], 32, cols).unwrap(),
                HalfMatrix::from_f32(format, &w[32 * cols..], 64, cols).unwrap(),
            );
            let ab = HalfMatrix::concat(&[&a, &b]).unwrap();
            assert_eq!(ab.matmul(&x, m), all);
        }
        let a = HalfMatrix::from_f32(HalfFormat::BF16, &w[..32 * cols], 32, cols).unwrap();
        let f = HalfMatrix::from_f32(HalfFormat::F16, &w[..32 * cols], 32, cols).unwrap();
        assert!(HalfMatrix::concat(&[&a, &f]).is_none(), "formats differ");
        let odd = HalfMatrix::from_f32(HalfFormat::BF16, &w[..20 * cols], 20, cols).unwrap();
        assert!(HalfMatrix::concat(&[&odd, &a]).is_none(), "a partial row group");
        assert!(h_empty().matmul(&[], 0).is_empty());
    }

    fn h_empty() -> HalfMatrix {
        HalfMatrix::from_f32(HalfFormat::BF16, &[0.0; 4], 2, 2).unwrap()
    }
}
