//! AVX2 (with FMA and F16C): the VNNI kernel's arithmetic on the same tiles, each 16-row
//! group as two halves of 8 lanes, `vpdpbusd` done by `vpmaddubsw` (pairs of byte products
//! into 16 bits: at most 2 x 63 x 127, so the two nibble columns' sums still fit) and
//! `vpmaddwd` by ones. One row group x up to 4 activation rows in registers.

use std::arch::x86_64::*;

use super::{Activations, KMatrix, BLOCK, LANES, SUB, SUPER, TILE};

/// Safe entry: checks every bound the kernel relies on. The caller checked that the CPU
/// has AVX2, FMA and F16C.
pub(super) fn groups(w: &KMatrix, g0: usize, ng: usize, a: &Activations, m: usize, out: &mut [f32]) {
    let nb = w.cols / BLOCK;
    let ns = w.cols / SUPER;
    assert!(out.len() == ng * m * LANES);
    assert!(w.q.len() >= (g0 + ng) * nb * TILE && w.h.len() >= (g0 + ng) * nb * w.format.high_bytes());
    assert!(w.sm.len() >= (g0 + ng) * ns * w.format.scale_bytes());
    assert!(w.dm.len() >= (g0 + ng) * ns * w.format.factors());
    assert!(a.q.len() == m * w.cols && a.scales.len() == m * nb && a.sums.len() == m * nb);
    assert!(a.half_sums.len() == 2 * m * nb);
    for gi in 0..ng {
        let mut i = 0;
        while i < m {
            // Prompts and batches: 4 activation rows per pass, so each weight load and
            // its high-bit merge serve 4 rows.
            let r = if m - i >= 4 { 4 } else { 2.min(m - i) };
            // SAFETY: CPU features checked by the caller; the asserts above bound every
            // access: group g0 + gi < g0 + ng, rows i..i+r < m, blocks < nb.
            unsafe {
                match (w.format, r) {
                    (super::KFormat::Q4K, 4) => group::<4, 4>(w, g0 + gi, gi, a, i, m, out),
                    (super::KFormat::Q5K, 4) => group::<4, 5>(w, g0 + gi, gi, a, i, m, out),
                    (super::KFormat::Q6K, 4) => group::<4, 6>(w, g0 + gi, gi, a, i, m, out),
                    (super::KFormat::Q4K, 2) => group::<2, 4>(w, g0 + gi, gi, a, i, m, out),
                    (super::KFormat::Q4K, _) => group::<1, 4>(w, g0 + gi, gi, a, i, m, out),
                    (super::KFormat::Q5K, 2) => group::<2, 5>(w, g0 + gi, gi, a, i, m, out),
                    (super::KFormat::Q5K, _) => group::<1, 5>(w, g0 + gi, gi, a, i, m, out),
                    (super::KFormat::Q6K, 2) => group::<2, 6>(w, g0 + gi, gi, a, i, m, out),
                    (super::KFormat::Q6K, _) => group::<1, 6>(w, g0 + gi, gi, a, i, m, out),
                }
            }
            i += r;
        }
    }
}

/// Half `half` of quarter `k`'s values: `(low-nibble columns, high-nibble columns)`.
#[inline(always)]
unsafe fn quarter<const BITS: u32>(tile: *const u8, h: *const u8, k: usize, half: usize) -> (__m256i, __m256i) {
    let low = _mm256_set1_epi8(0x0f);
    let v = _mm256_loadu_si256(tile.add(k * 64 + 32 * half) as *const __m256i);
    let mut lo = _mm256_and_si256(v, low);
    let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
    if BITS == 5 {
        let hv = _mm256_loadu_si256(h.add(32 * half) as *const __m256i);
        let one = _mm256_set1_epi8(0x10);
        let (l, hh) = match k {
            0 => (_mm256_slli_epi16::<4>(hv), _mm256_slli_epi16::<3>(hv)),
            1 => (_mm256_slli_epi16::<2>(hv), _mm256_slli_epi16::<1>(hv)),
            2 => (hv, _mm256_srli_epi16::<1>(hv)),
            _ => (_mm256_srli_epi16::<2>(hv), _mm256_srli_epi16::<3>(hv)),
        };
        lo = _mm256_or_si256(lo, _mm256_and_si256(l, one));
        hi = _mm256_or_si256(hi, _mm256_and_si256(hh, one));
    } else if BITS == 6 {
        let hv = _mm256_loadu_si256(h.add((k / 2) * 64 + 32 * half) as *const __m256i);
        let two = _mm256_set1_epi8(0x30);
        let (l, hh) = if k.is_multiple_of(2) {
            (_mm256_slli_epi16::<4>(hv), _mm256_slli_epi16::<2>(hv))
        } else {
            (hv, _mm256_srli_epi16::<2>(hv))
        };
        lo = _mm256_or_si256(lo, _mm256_and_si256(l, two));
        hi = _mm256_or_si256(hi, _mm256_and_si256(hh, two));
    }
    (lo, hi)
}

/// `acc + sum over each lane's 8 byte products` of `lo x xl` and `hi x xh`.
#[inline(always)]
unsafe fn dot(acc: __m256i, lo: __m256i, xl: __m256i, hi: __m256i, xh: __m256i) -> __m256i {
    let p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh));
    _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)))
}

// The register tile is indexed [half][row] from several loops at once.
#[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group<const R: usize, const BITS: u32>(
    w: &KMatrix,
    g: usize,
    gi: usize,
    a: &Activations,
    i0: usize,
    m: usize,
    out: &mut [f32],
) {
    let cols = w.cols;
    let nb = cols / BLOCK;
    let ns = cols / SUPER;
    let (hb, sb, fb) = (w.format.high_bytes(), w.format.scale_bytes(), w.format.factors());
    let mut acc = [[_mm256_setzero_ps(); R]; 2];
    for s in 0..ns {
        let gs = g * ns + s;
        let sm = w.sm.as_ptr().add(gs * sb);
        let dm = w.dm.as_ptr().add(gs * fb);
        for j in 0..SUB {
            let b = s * SUB + j;
            let tile = w.q.as_ptr().add((g * nb + b) * TILE);
            let h = w.h.as_ptr().add((g * nb + b) * hb);
            for half in 0..2 {
                let mut isum = [[_mm256_setzero_si256(); R]; 2];
                for k in 0..4 {
                    let part = if BITS == 6 { k / 2 } else { 0 };
                    let (lo, hi) = quarter::<BITS>(tile, h, k, half);
                    for r in 0..R {
                        let x = a.q.as_ptr().add((i0 + r) * cols + b * BLOCK + 8 * k);
                        let xl = _mm256_set1_epi32((x as *const i32).read_unaligned());
                        let xh = _mm256_set1_epi32((x.add(4) as *const i32).read_unaligned());
                        isum[part][r] = dot(isum[part][r], lo, xl, hi, xh);
                    }
                }
                let d = _mm256_cvtph_ps(_mm_loadu_si128(dm.add(8 * half) as *const __m128i));
                if BITS == 6 {
                    let sc = |k: usize| {
                        _mm256_cvtepi8_epi32(_mm_loadl_epi64(sm.add(k * LANES + 8 * half) as *const __m128i))
                    };
                    let (sc0, sc1) = (sc(2 * j), sc(2 * j + 1));
                    for r in 0..R {
                        let xa = (i0 + r) * nb + b;
                        let s0 = _mm256_set1_epi32(32 * *a.half_sums.get_unchecked(2 * xa));
                        let s1 = _mm256_set1_epi32(32 * *a.half_sums.get_unchecked(2 * xa + 1));
                        let t0 = _mm256_mullo_epi32(_mm256_sub_epi32(isum[0][r], s0), sc0);
                        let t1 = _mm256_mullo_epi32(_mm256_sub_epi32(isum[1][r], s1), sc1);
                        let scale = _mm256_mul_ps(d, _mm256_set1_ps(*a.scales.get_unchecked(xa)));
                        acc[half][r] =
                            _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(t0, t1)), scale, acc[half][r]);
                    }
                } else {
                    let dmin = _mm256_cvtph_ps(_mm_loadu_si128(dm.add(LANES + 8 * half) as *const __m128i));
                    let lows = _mm256_cvtepu8_epi32(_mm_loadl_epi64(sm.add(j * LANES + 8 * half) as *const __m128i));
                    let high = _mm256_loadu_si256(sm.add(8 * LANES + 32 * half) as *const __m256i);
                    let three = _mm256_set1_epi32(3);
                    let sc_hi = _mm256_and_si256(_mm256_srl_epi32(high, _mm_cvtsi32_si128(2 * j as i32)), three);
                    let mn_hi = _mm256_and_si256(_mm256_srl_epi32(high, _mm_cvtsi32_si128(16 + 2 * j as i32)), three);
                    let sc =
                        _mm256_or_si256(_mm256_and_si256(lows, _mm256_set1_epi32(0x0f)), _mm256_slli_epi32::<4>(sc_hi));
                    let mn = _mm256_or_si256(_mm256_srli_epi32::<4>(lows), _mm256_slli_epi32::<4>(mn_hi));
                    let scale = _mm256_mul_ps(d, _mm256_cvtepi32_ps(sc));
                    let min = _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(mn));
                    for r in 0..R {
                        let xa = (i0 + r) * nb + b;
                        let t = _mm256_mul_ps(scale, _mm256_set1_ps(*a.scales.get_unchecked(xa)));
                        let y = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[0][r]), t, acc[half][r]);
                        acc[half][r] = _mm256_fnmadd_ps(min, _mm256_set1_ps(*a.sums.get_unchecked(xa)), y);
                    }
                }
            }
        }
    }
    for half in 0..2 {
        for r in 0..R {
            _mm256_storeu_ps(out.as_mut_ptr().add((gi * m + i0 + r) * LANES + 8 * half), acc[half][r]);
        }
    }
}
