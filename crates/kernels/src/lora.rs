//! LoRA's low-rank products for a batch of rows that use different adapters (Punica /
//! S-LoRA's shrink and expand): for each row with an adapter, `y += (x A^T) B^T` with that
//! adapter's `A [rank, in]` and `B [out, rank]` (the scale folded into `B`).
//!
//! Each row is computed on its own, in a fixed order of additions, so a row's result never
//! depends on which other rows (or adapters) share the batch: the same request gives the same
//! output alone and mixed with others. Rows are spread over the thread team.

/// One adapter's matrices for one layer.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// Its rank.
    pub rank: usize,
    /// Input width.
    pub inp: usize,
    /// Output width.
    pub out: usize,
    /// `A`, `[rank, in]` row-major.
    pub a: Vec<f32>,
    /// `B` times the adapter's scale, `[out, rank]` row-major; with `replace`, the adapter's
    /// own weight `W`, `[out, in]`.
    pub b: Vec<f32>,
    /// The row's output is `x W^T` (`b`), not the base's plus a low-rank product.
    pub replace: bool,
}

/// A dot product in a fixed order: eight running sums over the length, then added pairwise.
#[inline]
fn dot(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (xc, yc) = (x.chunks_exact(8), y.chunks_exact(8));
    let (xr, yr) = (xc.remainder(), yc.remainder());
    for (a, b) in xc.zip(yc) {
        for k in 0..8 {
            acc[k] += a[k] * b[k];
        }
    }
    let mut tail = 0f32;
    for (a, b) in xr.iter().zip(yr) {
        tail += a * b;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// Adds the adapters' products to `y` (`[rows, y_width]`, the layer's output; this layer's
/// outputs start at column `offset`) for `x` (`[rows, in]`): row `r` uses `pairs[r]`, or
/// nothing for `None`.
pub fn add_lora(x: &[f32], y: &mut [f32], y_width: usize, offset: usize, pairs: &[Option<&LoraPair>]) {
    let rows = pairs.len();
    debug_assert!(rows == 0 || (x.len().is_multiple_of(rows) && y.len() == rows * y_width));
    if rows == 0 || pairs.iter().all(Option::is_none) {
        return;
    }
    let inp = x.len() / rows;
    crate::team::for_each_chunk_mut(y, y_width, |r, y_row| {
        let Some(p) = pairs[r] else { return };
        if p.inp != inp || offset + p.out > y_width {
            return; // checked when the adapter was installed
        }
        let x_row = &x[r * inp..(r + 1) * inp];
        if p.replace {
            for (o, yo) in y_row[offset..offset + p.out].iter_mut().enumerate() {
                *yo = dot(x_row, &p.b[o * inp..(o + 1) * inp]);
            }
            return;
        }
        let mut t = [0f32; 512];
        let mut heap = Vec::new();
        let t: &mut [f32] = if p.rank <= t.len() {
            &mut t[..p.rank]
        } else {
            heap.resize(p.rank, 0.0);
            &mut heap
        };
        for (k, tk) in t.iter_mut().enumerate() {
            *tk = dot(x_row, &p.a[k * inp..(k + 1) * inp]);
        }
        for (o, yo) in y_row[offset..offset + p.out].iter_mut().enumerate() {
            *yo += dot(t, &p.b[o * p.rank..(o + 1) * p.rank]);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(rank: usize, inp: usize, out: usize, seed: f32) -> LoraPair {
        let a = (0..rank * inp).map(|i| ((i as f32 * 0.37 + seed).sin()) * 0.1).collect();
        let b = (0..out * rank).map(|i| ((i as f32 * 0.11 + seed).cos()) * 0.1).collect();
        LoraPair { rank, inp, out, a, b, replace: false }
    }

    /// Against a plain double-precision reference, and the same row alone or among others.
    #[test]
    fn rows_get_their_own_adapter_and_nothing_else() {
        let (inp, out, rows) = (40, 24, 5);
        let (p1, p2) = (pair(4, inp, out, 0.0), pair(16, inp, out, 1.0));
        let x: Vec<f32> = (0..rows * inp).map(|i| (i as f32 * 0.013).sin()).collect();
        let which = [Some(&p1), None, Some(&p2), Some(&p1), None];
        let mut y = vec![1f32; rows * out];
        add_lora(&x, &mut y, out, 0, &which);
        for r in 0..rows {
            for o in 0..out {
                let want = match which[r] {
                    None => 1.0,
                    Some(p) => {
                        let t: Vec<f64> = (0..p.rank)
                            .map(|k| (0..inp).map(|i| x[r * inp + i] as f64 * p.a[k * inp + i] as f64).sum())
                            .collect();
                        1.0 + (0..p.rank).map(|k| t[k] * p.b[o * p.rank + k] as f64).sum::<f64>()
                    }
                };
                assert!((y[r * out + o] as f64 - want).abs() < 1e-5, "row {r} out {o}");
            }
        }
        // Row 2 alone gives bit-identical results.
        let mut alone = vec![1f32; out];
        add_lora(&x[2 * inp..3 * inp], &mut alone, out, 0, &[Some(&p2)]);
        assert_eq!(&alone[..], &y[2 * out..3 * out]);
        // A replacing pair overwrites its rows with x W^T and leaves the others alone.
        let w: Vec<f32> = (0..out * inp).map(|i| (i as f32 * 0.07).cos() * 0.1).collect();
        let full = LoraPair { rank: 0, inp, out, a: Vec::new(), b: w.clone(), replace: true };
        let mut z = y.clone();
        add_lora(&x, &mut z, out, 0, &[None, Some(&full), None, None, None]);
        for o in 0..out {
            let want: f64 = (0..inp).map(|i| x[inp + i] as f64 * w[o * inp + i] as f64).sum();
            assert!((z[out + o] as f64 - want).abs() < 1e-5);
        }
        assert_eq!(&z[..out], &y[..out]);
        assert_eq!(&z[2 * out..], &y[2 * out..]);
        // A layer whose outputs start at an offset of a fused output leaves the rest alone.
        let mut fused = vec![0f32; rows * (out + 8)];
        add_lora(&x, &mut fused, out + 8, 8, &which);
        for r in 0..rows {
            assert!(fused[r * (out + 8)..r * (out + 8) + 8].iter().all(|&v| v == 0.0));
            let got: Vec<f32> = fused[r * (out + 8) + 8..(r + 1) * (out + 8)].iter().map(|v| v + 1.0).collect();
            assert_eq!(&got[..], &y[r * out..(r + 1) * out]);
        }
    }
}
