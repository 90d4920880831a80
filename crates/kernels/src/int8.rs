//! Int8 matrix-vector products for decode steps.
//!
//! A decode step multiplies a handful of activation rows by every weight matrix, so it is
//! bound by reading the weights: float32 weights cost 4 bytes each, these cost 1 byte plus a
//! float scale per block of 32. Weights and activations are quantized per block of 32 values
//! to `i8` with a scale (absmax / 127, like GGML's Q8_0); a block's dot product is an exact
//! integer sum, scaled once.
//!
//! On CPUs with AVX-512 VNNI the block dot products use `vpdpbusd` (detected at run time, no
//! `target-cpu=native`). Elsewhere a portable loop written so the compiler vectorizes it (16
//! `i32` lanes of partial sums per block) is compiled by `multiversion` for AVX-512, AVX2 and
//! NEON, again picked at run time.

use multiversion::multiversion;
use rayon::prelude::*;

/// Values per quantization block.
pub const BLOCK: usize = 32;

/// Quantizes `x` (length a multiple of [`BLOCK`]) to `q` with one scale per block.
fn quantize_into(x: &[f32], q: &mut [i8], scales: &mut [f32]) {
    for ((xb, qb), s) in x.chunks_exact(BLOCK).zip(q.chunks_exact_mut(BLOCK)).zip(scales.iter_mut()) {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        for (o, v) in qb.iter_mut().zip(xb) {
            *o = (v * inv).round().clamp(-127.0, 127.0) as i8;
        }
        *s = d;
    }
}

/// `sum_b scale_w[b] * scale_x[b] * sum_i w[b,i] * x[b,i]` over whole blocks.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
fn dot_portable(w: &[i8], ws: &[f32], x: &[i8], xs: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    for ((wb, xb), (&sw, &sx)) in w.chunks_exact(BLOCK).zip(x.chunks_exact(BLOCK)).zip(ws.iter().zip(xs)) {
        let mut p = [0i32; 16];
        for half in 0..2 {
            for l in 0..16 {
                p[l] += wb[half * 16 + l] as i32 * xb[half * 16 + l] as i32;
            }
        }
        let s = sw * sx;
        for l in 0..16 {
            acc[l] += p[l] as f32 * s;
        }
    }
    acc.iter().sum()
}

/// The block dot product with the best kernel this CPU has (checked at run time).
fn dot(w: &[i8], ws: &[f32], x: &[i8], xs: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if vnni::available() {
        return vnni::dot(w, ws, x, xs);
    }
    dot_portable(w, ws, x, xs)
}

/// AVX-512 VNNI: 64 int8 products per `vpdpbusd`, two blocks per iteration.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod vnni {
    use std::arch::x86_64::*;

    use super::BLOCK;

    pub(super) fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }

    /// Safe wrapper: the caller checked [`available`].
    pub(super) fn dot(w: &[i8], ws: &[f32], x: &[i8], xs: &[f32]) -> f32 {
        assert!(w.len() == x.len() && ws.len() == xs.len() && w.len() == ws.len() * BLOCK);
        // SAFETY: the CPU features were detected at run time (`available`), and the lengths
        // checked above keep every 64-byte load inside `w` and `x`.
        unsafe { dot_vnni(w, ws, x, xs) }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn dot_vnni(w: &[i8], ws: &[f32], x: &[i8], xs: &[f32]) -> f32 {
        let nb = ws.len();
        let zero = _mm512_setzero_si512();
        let mut acc = _mm512_setzero_ps();
        let mut b = 0;
        while b + 2 <= nb {
            let wv = _mm512_loadu_si512(w.as_ptr().add(b * BLOCK) as *const _);
            let xv = _mm512_loadu_si512(x.as_ptr().add(b * BLOCK) as *const _);
            // vpdpbusd multiplies unsigned by signed bytes: use |w| and move w's sign onto x.
            let neg = _mm512_movepi8_mask(wv);
            let aw = _mm512_abs_epi8(wv);
            let sx = _mm512_mask_sub_epi8(xv, neg, zero, xv);
            let sums = _mm512_dpbusd_epi32(zero, aw, sx); // lanes 0-7: block b, 8-15: block b+1
            let s0 = _mm256_set1_ps(ws[b] * xs[b]);
            let s1 = _mm256_set1_ps(ws[b + 1] * xs[b + 1]);
            let scale = _mm512_insertf32x8::<1>(_mm512_castps256_ps512(s0), s1);
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), scale, acc);
            b += 2;
        }
        let mut total = _mm512_reduce_add_ps(acc);
        if b < nb {
            total += super::dot_portable(&w[b * BLOCK..], &ws[b..], &x[b * BLOCK..], &xs[b..]);
        }
        total
    }
}

/// A `[rows, cols]` weight matrix (`y = x W^T`) quantized to int8 per block of 32.
#[derive(Debug, Clone)]
pub struct Int8Matrix {
    rows: usize,
    cols: usize,
    q: Vec<i8>,
    scales: Vec<f32>,
}

impl Int8Matrix {
    /// Quantizes a row-major `[rows, cols]` float matrix; `None` unless `cols` is a multiple
    /// of [`BLOCK`].
    pub fn from_f32(w: &[f32], rows: usize, cols: usize) -> Option<Self> {
        if cols == 0 || !cols.is_multiple_of(BLOCK) || w.len() != rows * cols {
            return None;
        }
        let mut q = vec![0i8; rows * cols];
        let mut scales = vec![0f32; rows * cols / BLOCK];
        q.par_chunks_mut(cols)
            .zip(scales.par_chunks_mut(cols / BLOCK))
            .zip(w.par_chunks(cols))
            .for_each(|((q, s), w)| quantize_into(w, q, s));
        Some(Self { rows, cols, q, scales })
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
        let nb = self.cols / BLOCK;
        let mut xq = vec![0i8; x.len()];
        let mut xs = vec![0f32; m * nb];
        for ((xr, q), s) in x.chunks_exact(self.cols).zip(xq.chunks_exact_mut(self.cols)).zip(xs.chunks_exact_mut(nb)) {
            quantize_into(xr, q, s);
        }
        // Output columns in chunks across threads; each weight row is read once for all m rows.
        const CHUNK: usize = 64;
        let mut out_t = vec![0f32; self.rows * m];
        out_t.par_chunks_mut(CHUNK * m).enumerate().for_each(|(c, o)| {
            for (i, o_row) in o.chunks_exact_mut(m).enumerate() {
                let r = c * CHUNK + i;
                let w = &self.q[r * self.cols..(r + 1) * self.cols];
                let ws = &self.scales[r * nb..(r + 1) * nb];
                for (j, v) in o_row.iter_mut().enumerate() {
                    *v = dot(w, ws, &xq[j * self.cols..(j + 1) * self.cols], &xs[j * nb..(j + 1) * nb]);
                }
            }
        });
        if m == 1 {
            return out_t;
        }
        let mut out = vec![0f32; m * self.rows];
        for r in 0..self.rows {
            for j in 0..m {
                out[j * self.rows + r] = out_t[r * m + j];
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn int8_matmul_is_close_to_float() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let (rows, cols) = (130, 96);
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.random::<f32>() - 0.5).collect();
        let q = Int8Matrix::from_f32(&w, rows, cols).unwrap();
        for m in [1, 3] {
            let x: Vec<f32> = (0..m * cols).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
            let y = q.matmul(&x, m);
            for j in 0..m {
                for r in 0..rows {
                    let exact: f32 = (0..cols).map(|i| x[j * cols + i] * w[r * cols + i]).sum();
                    let norm: f32 = (0..cols).map(|i| (x[j * cols + i] * w[r * cols + i]).abs()).sum();
                    assert!((y[j * rows + r] - exact).abs() <= 0.02 * norm, "row {r}: {} vs {exact}", y[j * rows + r]);
                }
            }
        }
        assert!(Int8Matrix::from_f32(&w[..rows * 10], rows, 10).is_none(), "cols must be whole blocks");
        // The dispatched kernel and the portable one agree (odd block count: 3 blocks).
        let a: Vec<i8> = (0..96).map(|i| ((i * 37) % 255) as i8).collect();
        let b: Vec<i8> = (0..96).map(|i| ((i * 11) % 253) as i8).collect();
        let (sa, sb) = ([0.5f32, 0.25, 2.0], [1.0f32, 3.0, 0.125]);
        assert!((dot(&a, &sa, &b, &sb) - dot_portable(&a, &sa, &b, &sb)).abs() < 1e-3);
    }
}
