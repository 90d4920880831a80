//! Matrix products straight from GGUF's k-quant super-blocks: `Q4_K`, `Q5_K` and `Q6_K` (what
//! Q4_K_M and Q5_K_M files are made of), held at the file's own bits per weight.
//!
//! A k-quant super-block holds 256 weights of one row:
//! - `Q4_K` (4.5 bits): f16 `d` and `dmin`, eight 6-bit scales `sc` and minimums `m` (one per
//!   32 weights, packed in 12 bytes), 4-bit values `q`: `w = d sc q - dmin m`;
//! - `Q5_K` (5.5 bits): the same with a fifth bit per value;
//! - `Q6_K` (6.56 bits): 6-bit values, sixteen signed 8-bit scales (one per 16 weights) and an
//!   f16 `d`: `w = d sc (q - 32)`.
//!
//! At load the super-blocks are repacked, not requantized, for AVX-512 VNNI's `vpdpbusd`:
//! 16 rows side by side, and per 32-column block the low four bits of every value in the
//! 4-bit kernel's tile ([`crate::q4`]: two 4-column steps per 64-byte quarter, low and high
//! nibbles), the fifth (and sixth) bits in a plane laid out so that a shift and an `and` put
//! them over the nibbles of the same quarter, and the scales side by side per row group (for
//! `Q4_K` / `Q5_K` still 6 bits each: low nibbles in a byte plane, high bits in a 32-bit word
//! per row). So memory holds exactly the file's bits per weight.
//!
//! Activations are quantized per block of 32 to `i8` as for the 4-bit kernel. Each 32-column
//! block's integer dot products are scaled once: `d sc s sum(q qx) - dmin m s sum(qx)` for
//! `Q4_K` / `Q5_K`; for `Q6_K`, per 16 columns, `d s sc (sum(q qx) - 32 sum(qx))` in integers.
//!
//! The VNNI kernel is picked at run time, else an AVX2 one over the same tiles; elsewhere a
//! portable version over the same packed layout is compiled by `multiversion` (NEON, or
//! x86 without AVX2).

use half::f16;
use multiversion::multiversion;
use rayon::prelude::*;

use crate::q4::{Activations, BLOCK};

/// Weights per super-block.
pub const SUPER: usize = 256;
/// Output rows packed side by side.
const LANES: usize = 16;
/// Bytes of low nibbles per (row group, 32-column block).
const TILE: usize = LANES * BLOCK / 2;
/// 32-column blocks per super-block.
const SUB: usize = SUPER / BLOCK;
/// Row groups per register tile (and per parallel task).
const GROUPS_PER_TASK: usize = 4;
/// Activation rows per register tile.
const MR: usize = 2;

/// Which GGUF k-quant a matrix came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KFormat {
    /// 4-bit values, 6-bit scales and minimums per 32.
    Q4K,
    /// 5-bit values, 6-bit scales and minimums per 32.
    Q5K,
    /// 6-bit values, 8-bit scales per 16.
    Q6K,
}

impl KFormat {
    /// Bytes of one GGUF super-block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
        }
    }

    /// Bytes of high-bit plane per (row group, 32-column block).
    const fn high_bytes(self) -> usize {
        match self {
            Self::Q4K => 0,
            Self::Q5K => 64,
            Self::Q6K => 128,
        }
    }

    /// Bytes of packed scales per (row group, super-block).
    const fn scale_bytes(self) -> usize {
        match self {
            // [8 sub-blocks][16 lanes] low nibbles of scale and minimum, [16 lanes] u32 high bits.
            Self::Q4K | Self::Q5K => 8 * LANES + 4 * LANES,
            // [16 sub-blocks][16 lanes] i8.
            Self::Q6K => 16 * LANES,
        }
    }

    /// f16 factors per (row group, super-block): `d` and `dmin` per lane, or `d`.
    const fn factors(self) -> usize {
        match self {
            Self::Q4K | Self::Q5K => 2 * LANES,
            Self::Q6K => LANES,
        }
    }
}

/// One super-block decoded: values (0..16, 0..32 or 0..64) in column order, `d`, `dmin`,
/// scales (for Q6_K the i8 bits) and minimums.
struct Decoded {
    q: [u8; SUPER],
    d: u16,
    dmin: u16,
    sc: [u8; 16],
    mn: [u8; 8],
}

/// llama.cpp's `get_scale_min_k4`: sub-block `j`'s 6-bit scale and minimum.
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

fn decode(format: KFormat, b: &[u8]) -> Decoded {
    let f16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
    let mut out = Decoded { q: [0; SUPER], d: 0, dmin: 0, sc: [0; 16], mn: [0; 8] };
    match format {
        KFormat::Q4K | KFormat::Q5K => {
            out.d = f16_at(0);
            out.dmin = f16_at(2);
            let scales = &b[4..16];
            for j in 0..8 {
                (out.sc[j], out.mn[j]) = scale_min_k4(j, scales);
            }
            let (qh, qs) = if format == KFormat::Q5K { (&b[16..48], &b[48..176]) } else { (&[][..], &b[16..144]) };
            // Sub-blocks 2i and 2i + 1 are the low and high nibbles of bytes 32i..32i + 32;
            // Q5_K's fifth bit of sub-block j, value l is bit j of qh[l].
            for j in 0..8 {
                for l in 0..32 {
                    let byte = qs[32 * (j / 2) + l];
                    let low = if j % 2 == 0 { byte & 0x0f } else { byte >> 4 };
                    let high = if qh.is_empty() { 0 } else { ((qh[l] >> j) & 1) << 4 };
                    out.q[32 * j + l] = low | high;
                }
            }
        }
        KFormat::Q6K => {
            let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
            out.d = f16_at(208);
            out.sc.copy_from_slice(sc);
            // llama.cpp's dequantize_row_q6_K: two halves of 128 values.
            for n in 0..2 {
                let (ql, qh) = (&ql[64 * n..], &qh[32 * n..]);
                for l in 0..32 {
                    let y = &mut out.q[128 * n..];
                    y[l] = (ql[l] & 0x0f) | ((qh[l] & 3) << 4);
                    y[l + 32] = (ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4);
                    y[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                    y[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                }
            }
        }
    }
    out
}

/// A `[rows, cols]` weight matrix (`y = x W^T`) in GGUF k-quant super-blocks, packed for
/// `vpdpbusd`.
#[derive(Debug, Clone)]
pub struct KMatrix {
    rows: usize,
    cols: usize,
    format: KFormat,
    /// `[groups][blocks][4][LANES][4]`: the low four bits of each value, as [`crate::q4`]'s
    /// tiles (quarter `k`, lane `l`, byte `c`: low nibble column `8k + c`, high nibble column
    /// `8k + 4 + c`).
    q: Vec<u8>,
    /// `[groups][blocks][high_bytes]`: the values' higher bits. `Q6_K`: two 64-byte vectors
    /// per block (quarters 0-1 and 2-3); in byte `4l + c` of vector `k / 2`, bits
    /// `4 (k % 2)..+2` are the low-nibble value's and the next two the high-nibble value's.
    /// `Q5_K`: one 64-byte vector; bit `2k` of byte `4l + c` the low-nibble value's, `2k + 1`
    /// the high-nibble value's.
    h: Vec<u8>,
    /// `[groups][super-blocks][scale_bytes]` (see [`KFormat::scale_bytes`]).
    sm: Vec<u8>,
    /// `[groups][super-blocks][factors]` f16 bits.
    dm: Vec<u16>,
}

impl KMatrix {
    /// Repacks a row-major `[rows, cols]` matrix of GGUF k-quant super-blocks (`data` as
    /// stored in the file). `None` unless `cols` is a whole number of super-blocks and `data`
    /// has exactly their bytes.
    pub fn from_gguf(format: KFormat, data: &[u8], rows: usize, cols: usize) -> Option<Self> {
        if cols == 0 || !cols.is_multiple_of(SUPER) {
            return None;
        }
        let ns = cols / SUPER;
        let nb = cols / BLOCK;
        let bb = format.block_bytes();
        if rows.checked_mul(ns)?.checked_mul(bb)? != data.len() {
            return None;
        }
        let groups = rows.div_ceil(LANES);
        let (hb, sb, fb) = (format.high_bytes(), format.scale_bytes(), format.factors());
        let mut q = vec![0u8; groups * nb * TILE];
        let mut h = vec![0u8; groups * nb * hb];
        let mut sm = vec![0u8; groups * ns * sb];
        let mut dm = vec![0u16; groups * ns * fb];
        let hchunk = (nb * hb).max(1);
        let mut hparts: Vec<&mut [u8]> =
            if hb > 0 { h.chunks_mut(hchunk).collect() } else { (0..groups).map(|_| &mut [][..]).collect() };
        q.par_chunks_mut(nb * TILE)
            .zip(hparts.par_iter_mut())
            .zip(sm.par_chunks_mut(ns * sb))
            .zip(dm.par_chunks_mut(ns * fb))
            .enumerate()
            .for_each(|(g, (((q, h), sm), dm))| {
                for lane in 0..LANES {
                    let r = g * LANES + lane;
                    if r >= rows {
                        break;
                    }
                    for s in 0..ns {
                        let dec = decode(format, &data[(r * ns + s) * bb..][..bb]);
                        pack_super(format, &dec, lane, s, q, h, &mut sm[s * sb..][..sb], &mut dm[s * fb..][..fb]);
                    }
                }
            });
        Some(Self { rows, cols, format, q, h, sm, dm })
    }

    /// The weights as floats, row-major `[rows, cols]` (what the super-blocks encode).
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
        let (g, lane) = (r / LANES, r % LANES);
        let ns = self.cols / SUPER;
        for (s, os) in out.chunks_exact_mut(SUPER).enumerate() {
            let (sc, mn, d, dmin) = self.lane_scales(g * ns + s, lane);
            for (j, ob) in os.chunks_exact_mut(BLOCK).enumerate() {
                let b = s * SUB + j;
                for (col, o) in ob.iter_mut().enumerate() {
                    let v = self.value(g, b, lane, col) as f32;
                    *o = match self.format {
                        KFormat::Q4K | KFormat::Q5K => d * sc[j] as f32 * v - dmin * mn[j] as f32,
                        KFormat::Q6K => d * (sc[2 * j + col / 16] as i8) as f32 * (v - 32.0),
                    };
                }
            }
        }
    }

    /// Value `col` (0..32) of lane `lane` in block `b` of row group `g`.
    fn value(&self, g: usize, b: usize, lane: usize, col: usize) -> u8 {
        let nb = self.cols / BLOCK;
        let (k, c) = (col / 8, col % 8);
        let byte = self.q[(g * nb + b) * TILE + k * 64 + lane * 4 + c % 4];
        let low = if c < 4 { byte & 0x0f } else { byte >> 4 };
        let hb = self.format.high_bytes();
        let high = match self.format {
            KFormat::Q4K => 0,
            KFormat::Q5K => {
                let hbyte = self.h[(g * nb + b) * hb + lane * 4 + c % 4];
                ((hbyte >> (2 * k + usize::from(c >= 4))) & 1) << 4
            }
            KFormat::Q6K => {
                let hbyte = self.h[(g * nb + b) * hb + (k / 2) * 64 + lane * 4 + c % 4];
                ((hbyte >> (4 * (k % 2) + 2 * usize::from(c >= 4))) & 3) << 4
            }
        };
        low | high
    }

    /// One lane's scales (for Q6_K the i8 bits), minimums, `d` and `dmin` in super-block
    /// `gs` (= group x super-blocks + super-block).
    fn lane_scales(&self, gs: usize, lane: usize) -> ([u8; 16], [u8; 8], f32, f32) {
        let sm = &self.sm[gs * self.format.scale_bytes()..][..self.format.scale_bytes()];
        let dm = &self.dm[gs * self.format.factors()..][..self.format.factors()];
        let (mut sc, mut mn) = ([0u8; 16], [0u8; 8]);
        match self.format {
            KFormat::Q4K | KFormat::Q5K => {
                let hi = u32::from_le_bytes(sm[8 * LANES + 4 * lane..][..4].try_into().expect("4 bytes"));
                for j in 0..8 {
                    let low = sm[j * LANES + lane];
                    sc[j] = (low & 0x0f) | ((((hi >> (2 * j)) & 3) as u8) << 4);
                    mn[j] = (low >> 4) | ((((hi >> (16 + 2 * j)) & 3) as u8) << 4);
                }
                (sc, mn, f16::from_bits(dm[lane]).to_f32(), f16::from_bits(dm[LANES + lane]).to_f32())
            }
            KFormat::Q6K => {
                for (k, s) in sc.iter_mut().enumerate() {
                    *s = sm[k * LANES + lane];
                }
                (sc, mn, f16::from_bits(dm[lane]).to_f32(), 0.0)
            }
        }
    }

    /// Stacks matrices of one format and input width (their rows one after another), so
    /// projections of the same input run as one product. `None` if formats or widths differ or
    /// a part's rows are not whole 16-row groups.
    pub fn concat(parts: &[&KMatrix]) -> Option<Self> {
        let first = parts.first()?;
        if parts.iter().any(|p| p.cols != first.cols || p.format != first.format || !p.rows.is_multiple_of(LANES)) {
            return None;
        }
        let cat = |f: &dyn Fn(&KMatrix) -> &[u8]| parts.iter().flat_map(|p| f(p).iter().copied()).collect::<Vec<_>>();
        Some(Self {
            rows: parts.iter().map(|p| p.rows).sum(),
            cols: first.cols,
            format: first.format,
            q: cat(&|p| &p.q),
            h: cat(&|p| &p.h),
            sm: cat(&|p| &p.sm),
            dm: parts.iter().flat_map(|p| p.dm.iter().copied()).collect(),
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

    /// The super-block format.
    pub fn format(&self) -> KFormat {
        self.format
    }

    /// Bytes held (values, high bits, scales and factors).
    pub fn bytes(&self) -> usize {
        self.q.len() + self.h.len() + self.sm.len() + 2 * self.dm.len()
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

/// Writes one lane's decoded super-block `s` into a row group's planes.
#[allow(clippy::too_many_arguments)]
fn pack_super(
    format: KFormat,
    dec: &Decoded,
    lane: usize,
    s: usize,
    q: &mut [u8],
    h: &mut [u8],
    sm: &mut [u8],
    dm: &mut [u16],
) {
    let hb = format.high_bytes();
    for j in 0..SUB {
        let b = s * SUB + j;
        let vals = &dec.q[BLOCK * j..][..BLOCK];
        let tile = &mut q[b * TILE..][..TILE];
        for k in 0..4 {
            for c in 0..4 {
                let (lo, hi) = (vals[8 * k + c], vals[8 * k + 4 + c]);
                tile[k * 64 + lane * 4 + c] = (lo & 0x0f) | ((hi & 0x0f) << 4);
                match format {
                    KFormat::Q4K => {}
                    KFormat::Q5K => {
                        h[b * hb + lane * 4 + c] |= ((lo >> 4) << (2 * k)) | ((hi >> 4) << (2 * k + 1));
                    }
                    KFormat::Q6K => {
                        let shift = 4 * (k % 2);
                        h[b * hb + (k / 2) * 64 + lane * 4 + c] |= ((lo >> 4) << shift) | ((hi >> 4) << (shift + 2));
                    }
                }
            }
        }
    }
    match format {
        KFormat::Q4K | KFormat::Q5K => {
            let mut hi = 0u32;
            for j in 0..8 {
                sm[j * LANES + lane] = (dec.sc[j] & 0x0f) | ((dec.mn[j] & 0x0f) << 4);
                hi |= u32::from(dec.sc[j] >> 4) << (2 * j) | u32::from(dec.mn[j] >> 4) << (16 + 2 * j);
            }
            sm[8 * LANES + 4 * lane..][..4].copy_from_slice(&hi.to_le_bytes());
            dm[lane] = dec.d;
            dm[LANES + lane] = dec.dmin;
        }
        KFormat::Q6K => {
            for k in 0..16 {
                sm[k * LANES + lane] = dec.sc[k];
            }
            dm[lane] = dec.d;
        }
    }
}

/// Row groups `g0..g0 + ng` (at most [`GROUPS_PER_TASK`]) times every activation row, into
/// `out` laid out `[ng][m][LANES]`.
fn groups_times_activations(w: &KMatrix, g0: usize, ng: usize, a: &Activations, m: usize, out: &mut [f32]) {
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

/// The same arithmetic as the VNNI kernel in plain loops (each block's values decoded once,
/// then integer dot products the compiler vectorizes), for CPUs without AVX-512 VNNI.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
fn groups_portable(w: &KMatrix, g0: usize, ng: usize, a: &Activations, m: usize, out: &mut [f32]) {
    let nb = w.cols / BLOCK;
    let ns = w.cols / SUPER;
    let hb = w.format.high_bytes();
    let mut acc = vec![[0f32; LANES]; m];
    for gi in 0..ng {
        let g = g0 + gi;
        acc.iter_mut().for_each(|a| *a = [0.0; LANES]);
        for s in 0..ns {
            // Per lane: Q4_K/Q5_K's d sc and dmin m per 32 columns; Q6_K's d and its i8 scales.
            let mut scale = [[0f32; SUB]; LANES];
            let mut min = [[0f32; SUB]; LANES];
            let mut d6 = [0f32; LANES];
            let mut sc6 = [[0i32; 16]; LANES];
            for lane in 0..LANES {
                let (sc, mn, d, dmin) = w.lane_scales(g * ns + s, lane);
                for j in 0..SUB {
                    scale[lane][j] = d * sc[j] as f32;
                    min[lane][j] = dmin * mn[j] as f32;
                }
                d6[lane] = d;
                for (o, &v) in sc6[lane].iter_mut().zip(&sc) {
                    *o = (v as i8) as i32;
                }
            }
            for j in 0..SUB {
                let b = s * SUB + j;
                let tile = &w.q[(g * nb + b) * TILE..][..TILE];
                let h = &w.h[(g * nb + b) * hb..][..hb];
                // The block's values in the tile's own order (quarter, lane, byte): the
                // low-nibble and high-nibble columns, high bits merged in, once for all rows.
                let mut lo = [[0u8; 64]; 4];
                let mut hi = [[0u8; 64]; 4];
                for k in 0..4 {
                    let q = &tile[k * 64..][..64];
                    for t in 0..64 {
                        lo[k][t] = q[t] & 0x0f;
                        hi[k][t] = q[t] >> 4;
                    }
                    match w.format {
                        KFormat::Q4K => {}
                        KFormat::Q5K => {
                            let hv = &h[..64];
                            for t in 0..64 {
                                lo[k][t] |= ((hv[t] >> (2 * k)) & 1) << 4;
                                hi[k][t] |= ((hv[t] >> (2 * k + 1)) & 1) << 4;
                            }
                        }
                        KFormat::Q6K => {
                            let hv = &h[(k / 2) * 64..][..64];
                            let shift = 4 * (k % 2);
                            for t in 0..64 {
                                lo[k][t] |= ((hv[t] >> shift) & 3) << 4;
                                hi[k][t] |= ((hv[t] >> (shift + 2)) & 3) << 4;
                            }
                        }
                    }
                }
                for (i, acc) in acc.iter_mut().enumerate() {
                    let xq = &a.q[i * w.cols + b * BLOCK..][..BLOCK];
                    let xa = i * nb + b;
                    let xs = a.scales[xa];
                    // Integer dot products as `vpdpbusd` forms them; Q6_K keeps its two
                    // 16-column halves apart.
                    let mut isum = [[0i32; LANES]; 2];
                    for k in 0..4 {
                        let half = if w.format == KFormat::Q6K { k / 2 } else { 0 };
                        let (xl, xh) = (&xq[8 * k..8 * k + 4], &xq[8 * k + 4..8 * k + 8]);
                        for (lane, sum) in isum[half].iter_mut().enumerate() {
                            for c in 0..4 {
                                *sum += lo[k][lane * 4 + c] as i32 * xl[c] as i32
                                    + hi[k][lane * 4 + c] as i32 * xh[c] as i32;
                            }
                        }
                    }
                    for lane in 0..LANES {
                        match w.format {
                            KFormat::Q4K | KFormat::Q5K => {
                                let y = (isum[0][lane] as f32).mul_add(scale[lane][j] * xs, acc[lane]);
                                acc[lane] = (-min[lane][j]).mul_add(a.sums[xa], y);
                            }
                            KFormat::Q6K => {
                                let t0 = (isum[0][lane] - 32 * a.half_sums[2 * xa]) * sc6[lane][2 * j];
                                let t1 = (isum[1][lane] - 32 * a.half_sums[2 * xa + 1]) * sc6[lane][2 * j + 1];
                                acc[lane] = ((t0 + t1) as f32).mul_add(d6[lane] * xs, acc[lane]);
                            }
                        }
                    }
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            out[(gi * m + i) * LANES..][..LANES].copy_from_slice(acc);
        }
    }
}

/// The AVX-512 VNNI kernel (`vpdpbusd` on the packed tiles).
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod vnni;

/// The AVX2 kernel (the same arithmetic with `vpmaddubsw` + `vpmaddwd`).
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2;

#[cfg(test)]
mod tests {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    const FORMATS: [(KFormat, GgmlDType); 3] =
        [(KFormat::Q4K, GgmlDType::Q4K), (KFormat::Q5K, GgmlDType::Q5K), (KFormat::Q6K, GgmlDType::Q6K)];

    /// A random matrix quantized by candle (a port of ggml's quantizers) and its dequantized
    /// floats.
    fn quantized(t: GgmlDType, rows: usize, cols: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.random::<f32>() - 0.4).collect();
        let q = QTensor::quantize(&Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap(), t).unwrap();
        let deq = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        (q.data().unwrap().into_owned(), deq)
    }

    #[test]
    fn super_blocks_decode_as_ggml_does_and_keep_the_files_bits() {
        // 40 rows: two full row groups and a partial one; 2 super-blocks of columns.
        let (rows, cols) = (40, 512);
        for (format, t) in FORMATS {
            let (data, want) = quantized(t, rows, cols, 3);
            let m = KMatrix::from_gguf(format, &data, rows, cols).unwrap();
            for (i, (a, b)) in m.dequantize().iter().zip(&want).enumerate() {
                assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{format:?} weight {i}: {a} vs ggml's {b}");
            }
            // Padded to 48 rows, the packed matrix holds the file's bytes per row exactly.
            assert_eq!(m.bytes(), 48 * (cols / SUPER) * format.block_bytes());
            assert!(KMatrix::from_gguf(format, &data[1..], rows, cols).is_none(), "short data");
            assert!(KMatrix::from_gguf(format, &data, rows * 4, cols / 4).is_none(), "partial super-block");
        }
    }

    /// `y` against the exact product with the dequantized weights, within the activations'
    /// quantization error.
    fn check(y: &[f32], w: &[f32], x: &[f32], rows: usize, cols: usize, m: usize, what: &str) {
        for j in 0..m {
            for r in 0..rows {
                let exact: f32 = (0..cols).map(|i| x[j * cols + i] * w[r * cols + i]).sum();
                let norm: f32 = (0..cols).map(|i| (x[j * cols + i] * w[r * cols + i]).abs()).sum();
                let got = y[j * rows + r];
                assert!((got - exact).abs() <= 0.01 * norm + 1e-5, "{what} m={m} row {j} col {r}: {got} vs {exact}");
            }
        }
    }

    #[test]
    fn k_quant_matmul_matches_the_dequantized_weights() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let (rows, cols) = (72, 768);
        for (format, t) in FORMATS {
            let (data, deq) = quantized(t, rows, cols, 4);
            let q = KMatrix::from_gguf(format, &data, rows, cols).unwrap();
            for m in [1, 2, 3, 5, 33] {
                let x: Vec<f32> = (0..m * cols).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
                check(&q.matmul(&x, m), &deq, &x, rows, cols, m, &format!("{format:?}"));
            }
        }
    }

    #[test]
    fn dispatched_kernel_matches_the_portable_one() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let (rows, cols, m) = (64, 512, 5);
        for (format, t) in FORMATS {
            let (data, _) = quantized(t, rows, cols, 6);
            let q = KMatrix::from_gguf(format, &data, rows, cols).unwrap();
            let x: Vec<f32> = (0..m * cols).map(|_| rng.random::<f32>() - 0.5).collect();
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
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let (rows, cols) = (64, 512);
        for (format, t) in FORMATS {
            let (data, _) = quantized(t, rows, cols, 13);
            let q = KMatrix::from_gguf(format, &data, rows, cols).unwrap();
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
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let (rows, cols, m) = (48, 256, 7);
        let x: Vec<f32> = (0..m * cols).map(|_| rng.random::<f32>() - 0.5).collect();
        for (format, t) in FORMATS {
            let (data, _) = quantized(t, rows, cols, 10);
            let q = KMatrix::from_gguf(format, &data, rows, cols).unwrap();
            let all = q.matmul(&x, m);
            for j in 0..m {
                assert_eq!(&all[j * rows..(j + 1) * rows], &q.matmul(&x[j * cols..(j + 1) * cols], 1)[..], "row {j}");
            }
            let per_row = data.len() / rows;
            let a = KMatrix::from_gguf(format, &data[..16 * per_row], 16, cols).unwrap();
            let b = KMatrix::from_gguf(format, &data[16 * per_row..], 32, cols).unwrap();
            assert_eq!(KMatrix::concat(&[&a, &b]).unwrap().matmul(&x, m), all, "{format:?}");
        }
        let (d4, _) = quantized(GgmlDType::Q4K, 16, 256, 1);
        let (d6, _) = quantized(GgmlDType::Q6K, 16, 256, 1);
        let (a, b) = (
            KMatrix::from_gguf(KFormat::Q4K, &d4, 16, 256).unwrap(),
            KMatrix::from_gguf(KFormat::Q6K, &d6, 16, 256).unwrap(),
        );
        assert!(KMatrix::concat(&[&a, &b]).is_none(), "formats differ");
    }
}
