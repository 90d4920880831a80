//! AVX2 (with FMA): `vpdpbusd`'s work on the same packed tiles, exactly. `vpmaddubsw` would
//! saturate (unsigned activations up to 255 times weights down to -128, two per 16-bit sum),
//! so weights and activations are widened to 16 bits and multiplied by `vpmaddwd`: each
//! 16-row step is four registers of 4 rows x 4 columns, whose pairs of column sums are
//! folded into rows once per block. One row group x up to 2 activation rows per pass; a row's
//! arithmetic is the same whatever rows share its pass.

use std::arch::x86_64::*;

use super::{Activations, Int8Matrix, BLOCK, LANES, STEPS, TILE};

/// Safe entry: checks every bound the kernel relies on. The caller checked that the CPU
/// has AVX2 and FMA.
pub(super) fn groups(w: &Int8Matrix, g0: usize, ng: usize, a: &Activations, m: usize, out: &mut [f32]) {
    let nb = w.cols / BLOCK;
    assert!(out.len() == ng * m * LANES);
    assert!(w.q.len() >= (g0 + ng) * nb * TILE && w.scales.len() >= (g0 + ng) * nb * LANES);
    assert!(w.sums.len() == w.scales.len() && a.q.len() == m * w.cols);
    assert!(a.scales.len() == m * nb && a.mins.len() == m * nb);
    for gi in 0..ng {
        let mut i = 0;
        while i < m {
            let r = 2.min(m - i);
            // SAFETY: CPU features checked by the caller; the asserts above bound every
            // access: group g0 + gi, rows i..i+r < m, blocks < nb.
            unsafe {
                if r == 2 {
                    group::<2>(w, g0 + gi, gi, a, i, m, out)
                } else {
                    group::<1>(w, g0 + gi, gi, a, i, m, out)
                }
            }
            i += r;
        }
    }
}

#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx2,fma")]
unsafe fn group<const R: usize>(
    w: &Int8Matrix,
    g: usize,
    gi: usize,
    a: &Activations,
    i0: usize,
    m: usize,
    out: &mut [f32],
) {
    let cols = w.cols;
    let nb = cols / BLOCK;
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for b in 0..nb {
        let tile = w.q.as_ptr().add((g * nb + b) * TILE);
        // Per row: 4 registers, one per 4 weight rows, of (row, column pair) sums.
        let mut sums = [[_mm256_setzero_si256(); 4]; R];
        for s in 0..STEPS {
            let p = tile.add(s * LANES * 4);
            let mut wq = [_mm256_setzero_si256(); 4];
            for (q, v) in wq.iter_mut().enumerate() {
                *v = _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(16 * q) as *const __m128i));
            }
            for r in 0..R {
                let x = a.q.as_ptr().add((i0 + r) * cols + b * BLOCK + s * 4);
                // The 4 activations as 16-bit values, repeated for 4 weight rows.
                let xw = _mm256_cvtepu8_epi16(_mm_set1_epi32((x as *const i32).read_unaligned()));
                for q in 0..4 {
                    sums[r][q] = _mm256_add_epi32(sums[r][q], _mm256_madd_epi16(wq[q], xw));
                }
            }
        }
        for half in 0..2 {
            let at = (g * nb + b) * LANES + 8 * half;
            let ws = _mm256_loadu_ps(w.scales.as_ptr().add(at));
            let wsum = _mm256_loadu_ps(w.sums.as_ptr().add(at));
            for r in 0..R {
                // [r0 r1 r4 r5 | r2 r3 r6 r7] of this half's 8 rows, then in order.
                let h = _mm256_hadd_epi32(sums[r][2 * half], sums[r][2 * half + 1]);
                let rows = _mm256_permute4x64_epi64::<0b11_01_10_00>(h);
                let xa = (i0 + r) * nb + b;
                let scale = _mm256_mul_ps(ws, _mm256_set1_ps(*a.scales.get_unchecked(xa)));
                let t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(rows), scale, acc[r][half]);
                acc[r][half] = _mm256_fmadd_ps(wsum, _mm256_set1_ps(*a.mins.get_unchecked(xa)), t);
            }
        }
    }
    for r in 0..R {
        for half in 0..2 {
            _mm256_storeu_ps(out.as_mut_ptr().add((gi * m + i0 + r) * LANES + 8 * half), acc[r][half]);
        }
    }
}
