//! AVX-512 VNNI: `vpdpbusd` on the packed tiles, `NG` row groups x `R` activation rows of
//! accumulators in registers.

use std::arch::x86_64::*;

use super::{Activations, KFormat, KMatrix, BLOCK, GROUPS_PER_TASK, LANES, MR, SUB, SUPER, TILE};

/// Blocks ahead to prefetch (one super-block; 16 measured slower, 4 no better).
const PREFETCH: usize = 8;

/// Safe entry: checks every bound the kernel relies on. The caller checked that the CPU
/// has AVX-512 VNNI.
pub(super) fn groups(w: &KMatrix, g0: usize, ng: usize, a: &Activations, m: usize, out: &mut [f32]) {
    let nb = w.cols / BLOCK;
    let ns = w.cols / SUPER;
    assert!(ng <= GROUPS_PER_TASK && out.len() == ng * m * LANES);
    assert!(w.q.len() >= (g0 + ng) * nb * TILE && w.h.len() >= (g0 + ng) * nb * w.format.high_bytes());
    assert!(w.sm.len() >= (g0 + ng) * ns * w.format.scale_bytes());
    assert!(w.dm.len() >= (g0 + ng) * ns * w.format.factors());
    assert!(a.q.len() == m * w.cols && a.scales.len() == m * nb && a.sums.len() == m * nb);
    assert!(a.half_sums.len() == 2 * m * nb);
    let mut i = 0;
    while i < m {
        // Prompts and batches: 4 activation rows x 2 row groups per register tile, so each
        // weight load and each block's scale decode serve 4 rows.
        if m - i >= 4 {
            let mut gs = 0;
            while gs < ng {
                let n2 = 2.min(ng - gs);
                let o = &mut out[gs * m * LANES..];
                // SAFETY: as below; the tile writes rows (g * m + i + r) of `o` for g < n2,
                // inside `out` since gs + n2 <= ng.
                unsafe {
                    match (n2, w.format) {
                        (2, KFormat::Q4K) => tile::<2, 4, 4>(w, g0 + gs, a, i, m, o),
                        (2, KFormat::Q5K) => tile::<2, 4, 5>(w, g0 + gs, a, i, m, o),
                        (2, KFormat::Q6K) => tile::<2, 4, 6>(w, g0 + gs, a, i, m, o),
                        (_, KFormat::Q4K) => tile::<1, 4, 4>(w, g0 + gs, a, i, m, o),
                        (_, KFormat::Q5K) => tile::<1, 4, 5>(w, g0 + gs, a, i, m, o),
                        (_, KFormat::Q6K) => tile::<1, 4, 6>(w, g0 + gs, a, i, m, o),
                    }
                }
                gs += n2;
            }
            i += 4;
            continue;
        }
        let r = MR.min(m - i);
        macro_rules! go {
            ($ng:literal, $r:literal) => {
                // SAFETY: CPU features checked by the caller; the asserts above bound every
                // access: groups g0..g0+ng, activation rows i..i+r < m, blocks < nb,
                // super-blocks < ns.
                unsafe {
                    match w.format {
                        KFormat::Q4K => tile::<$ng, $r, 4>(w, g0, a, i, m, out),
                        KFormat::Q5K => tile::<$ng, $r, 5>(w, g0, a, i, m, out),
                        KFormat::Q6K => tile::<$ng, $r, 6>(w, g0, a, i, m, out),
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

/// The values of quarter `k` of a block as bytes: `(low-nibble columns, high-nibble
/// columns)`, with the high bits of `BITS`-bit values put back from the plane at `h`.
#[inline(always)]
unsafe fn quarter<const BITS: u32>(tile: *const u8, h: *const u8, k: usize) -> (__m512i, __m512i) {
    let low = _mm512_set1_epi8(0x0f);
    let v = _mm512_loadu_si512(tile.add(k * 64) as *const _);
    let mut lo = _mm512_and_si512(v, low);
    let mut hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
    if BITS == 5 {
        let hv = _mm512_loadu_si512(h as *const _);
        let one = _mm512_set1_epi8(0x10);
        // Bit 2k (low-nibble value) and 2k + 1 (high-nibble value) move to bit 4.
        let (l, hh) = match k {
            0 => (_mm512_slli_epi16::<4>(hv), _mm512_slli_epi16::<3>(hv)),
            1 => (_mm512_slli_epi16::<2>(hv), _mm512_slli_epi16::<1>(hv)),
            2 => (hv, _mm512_srli_epi16::<1>(hv)),
            _ => (_mm512_srli_epi16::<2>(hv), _mm512_srli_epi16::<3>(hv)),
        };
        lo = _mm512_or_si512(lo, _mm512_and_si512(l, one));
        hi = _mm512_or_si512(hi, _mm512_and_si512(hh, one));
    } else if BITS == 6 {
        let hv = _mm512_loadu_si512(h.add((k / 2) * 64) as *const _);
        let two = _mm512_set1_epi8(0x30);
        let (l, hh) = if k.is_multiple_of(2) {
            (_mm512_slli_epi16::<4>(hv), _mm512_slli_epi16::<2>(hv))
        } else {
            (hv, _mm512_srli_epi16::<2>(hv))
        };
        lo = _mm512_or_si512(lo, _mm512_and_si512(l, two));
        hi = _mm512_or_si512(hi, _mm512_and_si512(hh, two));
    }
    (lo, hi)
}

// The register tile is indexed [group][row] from several loops at once.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile<const NG: usize, const R: usize, const BITS: u32>(
    w: &KMatrix,
    g0: usize,
    a: &Activations,
    i0: usize,
    m: usize,
    out: &mut [f32],
) {
    let cols = w.cols;
    let nb = cols / BLOCK;
    let ns = cols / SUPER;
    let (hb, sb, fb) = (w.format.high_bytes(), w.format.scale_bytes(), w.format.factors());
    let mut acc = [[_mm512_setzero_ps(); R]; NG];
    for s in 0..ns {
        // Per group: d (and dmin) as floats, Q4_K/Q5_K's scale high bits.
        let mut d = [_mm512_setzero_ps(); NG];
        let mut dmin = [_mm512_setzero_ps(); NG];
        let mut high = [_mm512_setzero_si512(); NG];
        for g in 0..NG {
            let gs = (g0 + g) * ns + s;
            d[g] = _mm512_cvtph_ps(_mm256_loadu_si256(w.dm.as_ptr().add(gs * fb) as *const __m256i));
            if BITS != 6 {
                dmin[g] = _mm512_cvtph_ps(_mm256_loadu_si256(w.dm.as_ptr().add(gs * fb + LANES) as *const __m256i));
                high[g] = _mm512_loadu_si512(w.sm.as_ptr().add(gs * sb + 8 * LANES) as *const _);
            }
        }
        for j in 0..SUB {
            let b = s * SUB + j;
            // Each group's planes are a separate stream; asking for the block a super-block
            // ahead into L2 keeps more reads in flight than the hardware prefetchers alone
            // (a 1.1B Q4_K_M decode reads ~680 MB per token).
            if b + PREFETCH < nb {
                for g in 0..NG {
                    let gb = (g0 + g) * nb + b + PREFETCH;
                    let t = w.q.as_ptr().add(gb * TILE);
                    for line in 0..TILE / 64 {
                        _mm_prefetch::<_MM_HINT_T1>(t.add(line * 64) as *const i8);
                    }
                    let h = w.h.as_ptr().add(gb * hb);
                    for line in 0..hb / 64 {
                        _mm_prefetch::<_MM_HINT_T1>(h.add(line * 64) as *const i8);
                    }
                }
            }
            // Q6_K: the two 16-column halves' integer sums; Q4_K/Q5_K: one.
            let mut isum = [[[_mm512_setzero_si512(); R]; NG]; 2];
            for k in 0..4 {
                let half = if BITS == 6 { k / 2 } else { 0 };
                let mut lo = [_mm512_setzero_si512(); NG];
                let mut hi = [_mm512_setzero_si512(); NG];
                for g in 0..NG {
                    let gb = (g0 + g) * nb + b;
                    (lo[g], hi[g]) = quarter::<BITS>(w.q.as_ptr().add(gb * TILE), w.h.as_ptr().add(gb * hb), k);
                }
                for r in 0..R {
                    let x = a.q.as_ptr().add((i0 + r) * cols + b * BLOCK + 8 * k);
                    let xl = _mm512_set1_epi32((x as *const i32).read_unaligned());
                    let xh = _mm512_set1_epi32((x.add(4) as *const i32).read_unaligned());
                    for g in 0..NG {
                        isum[half][g][r] = _mm512_dpbusd_epi32(isum[half][g][r], lo[g], xl);
                        isum[half][g][r] = _mm512_dpbusd_epi32(isum[half][g][r], hi[g], xh);
                    }
                }
            }
            for g in 0..NG {
                let gs = (g0 + g) * ns + s;
                let sm = w.sm.as_ptr().add(gs * sb);
                if BITS == 6 {
                    let sc0 = _mm512_cvtepi8_epi32(_mm_loadu_si128(sm.add(2 * j * LANES) as *const __m128i));
                    let sc1 = _mm512_cvtepi8_epi32(_mm_loadu_si128(sm.add((2 * j + 1) * LANES) as *const __m128i));
                    for r in 0..R {
                        let xa = (i0 + r) * nb + b;
                        // sc (sum(q qx) - 32 sum(qx)) per 16 columns, in integers.
                        let s0 = _mm512_set1_epi32(32 * *a.half_sums.get_unchecked(2 * xa));
                        let s1 = _mm512_set1_epi32(32 * *a.half_sums.get_unchecked(2 * xa + 1));
                        let t0 = _mm512_mullo_epi32(_mm512_sub_epi32(isum[0][g][r], s0), sc0);
                        let t1 = _mm512_mullo_epi32(_mm512_sub_epi32(isum[1][g][r], s1), sc1);
                        let scale = _mm512_mul_ps(d[g], _mm512_set1_ps(*a.scales.get_unchecked(xa)));
                        acc[g][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(t0, t1)), scale, acc[g][r]);
                    }
                } else {
                    let lows = _mm512_cvtepu8_epi32(_mm_loadu_si128(sm.add(j * LANES) as *const __m128i));
                    let three = _mm512_set1_epi32(3);
                    let shift = _mm_cvtsi32_si128(2 * j as i32);
                    let shift_m = _mm_cvtsi32_si128(16 + 2 * j as i32);
                    let sc_hi = _mm512_and_si512(_mm512_srl_epi32(high[g], shift), three);
                    let mn_hi = _mm512_and_si512(_mm512_srl_epi32(high[g], shift_m), three);
                    let sc =
                        _mm512_or_si512(_mm512_and_si512(lows, _mm512_set1_epi32(0x0f)), _mm512_slli_epi32::<4>(sc_hi));
                    let mn = _mm512_or_si512(_mm512_srli_epi32::<4>(lows), _mm512_slli_epi32::<4>(mn_hi));
                    let scale = _mm512_mul_ps(d[g], _mm512_cvtepi32_ps(sc));
                    let min = _mm512_mul_ps(dmin[g], _mm512_cvtepi32_ps(mn));
                    for r in 0..R {
                        let xa = (i0 + r) * nb + b;
                        let t = _mm512_mul_ps(scale, _mm512_set1_ps(*a.scales.get_unchecked(xa)));
                        let y = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[0][g][r]), t, acc[g][r]);
                        acc[g][r] = _mm512_fnmadd_ps(min, _mm512_set1_ps(*a.sums.get_unchecked(xa)), y);
                    }
                }
            }
        }
    }
    for g in 0..NG {
        for r in 0..R {
            _mm512_storeu_ps(out.as_mut_ptr().add((g * m + i0 + r) * LANES), acc[g][r]);
        }
    }
}
