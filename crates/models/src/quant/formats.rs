//! Each quantized format's tensors read into one form, [`Unpacked`]: the integers (or 8-bit
//! floats) of a `[out, in]` matrix in our orientation, with their scales and zero points per
//! group of input channels. Every shape and dtype is checked against the others first; an
//! error names the tensor.

use candle_core::safetensors::MmapedSafetensors;
use half::{bf16, f16};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use vllm_kernels::q4::{Q4Format, BLOCK};

use super::Scheme;
use crate::{Error, Result};

/// AutoAWQ packs eight output columns per 32-bit word: nibble `j` holds column `AWQ_ORDER[j]`.
const AWQ_ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

/// A quantized matrix's values.
#[derive(Debug)]
pub(crate) enum Values {
    /// Unsigned `bits`-bit integers `q[r * cols + c]` and, per row and group, the unsigned
    /// zero point: `w = s (q - z)`.
    Int { bits: u32, q: Vec<u8>, zeros: Vec<i32> },
    /// The weights, already dequantized (8-bit floats times their scales).
    Float(Vec<f32>),
}

/// A quantized `[rows = out, cols = in]` matrix, unpacked.
#[derive(Debug)]
pub(crate) struct Unpacked {
    pub rows: usize,
    pub cols: usize,
    /// Input channels per scale group (`cols` for one group per row).
    pub group: usize,
    /// `[rows][cols / group]` scales (unused for [`Values::Float`]).
    pub scales: Vec<f32>,
    pub values: Values,
    /// Act order: column `j` of the values is input channel `perm[j]` (channels sorted by
    /// group, so each group's channels are contiguous).
    pub perm: Option<Vec<u32>>,
}

impl Unpacked {
    /// The weights as floats, row-major, in the input's own channel order.
    pub fn dequantize_rows(&self) -> Vec<f32> {
        let (rows, cols) = (self.rows, self.cols);
        let mut w = match &self.values {
            Values::Float(w) => w.clone(),
            Values::Int { q, zeros, .. } => {
                let ng = cols / self.group;
                let mut w = vec![0f32; rows * cols];
                for r in 0..rows {
                    for c in 0..cols {
                        let g = r * ng + c / self.group;
                        w[r * cols + c] = self.scales[g] * (q[r * cols + c] as i32 - zeros[g]) as f32;
                    }
                }
                w
            }
        };
        if let Some(perm) = &self.perm {
            let mut orig = vec![0f32; rows * cols];
            for r in 0..rows {
                for (j, &p) in perm.iter().enumerate() {
                    orig[r * cols + p as usize] = w[r * cols + j];
                }
            }
            w = orig;
        }
        w
    }

    /// GGUF `Q4_0` / `Q4_1` blocks of the 4-bit values (`d = s`, and `m = -s z` for `Q4_1`).
    pub fn q4_blocks(&self, q: &[u8], zeros: &[i32], format: Q4Format) -> Vec<u8> {
        let (rows, cols) = (self.rows, self.cols);
        let (nb, ng, bb) = (cols / BLOCK, cols / self.group, format.block_bytes());
        let mut out = vec![0u8; rows * nb * bb];
        for r in 0..rows {
            for b in 0..nb {
                let g = r * ng + b * BLOCK / self.group;
                let s = self.scales[g];
                let block = &mut out[(r * nb + b) * bb..][..bb];
                block[..2].copy_from_slice(&f16::from_f32(s).to_bits().to_le_bytes());
                let qs = match format {
                    Q4Format::Q4_0 => &mut block[2..],
                    Q4Format::Q4_1 => {
                        let m = -s * zeros[g] as f32;
                        block[2..4].copy_from_slice(&f16::from_f32(m).to_bits().to_le_bytes());
                        &mut block[4..]
                    }
                };
                // Byte j holds value j in its low nibble and value j + 16 in its high nibble.
                let vals = &q[r * cols + b * BLOCK..][..BLOCK];
                for j in 0..16 {
                    qs[j] = (vals[j] & 0x0f) | (vals[j + 16] << 4);
                }
            }
        }
        out
    }

    /// One scale per row and block of 32.
    pub fn block_scales(&self) -> Vec<f32> {
        let (nb, ng) = (self.cols / BLOCK, self.cols / self.group);
        (0..self.rows * nb).map(|i| self.scales[(i / nb) * ng + (i % nb) * BLOCK / self.group]).collect()
    }
}

/// A tensor of the layer, or an error naming it.
fn tensor<'a>(st: &'a MmapedSafetensors, module: &str, suffix: &str) -> Result<TensorView<'a>> {
    st.get(&format!("{module}.{suffix}")).map_err(|_| Error::MissingTensor(format!("{module}.{suffix}")))
}

fn shape_err(module: &str, suffix: &str, got: &[usize], want: &str) -> Error {
    Error::Format(format!("{module}.{suffix}: shape {got:?}, expected {want}"))
}

/// A 2-D tensor's shape, as the format requires.
fn dims2(v: &TensorView, module: &str, suffix: &str) -> Result<(usize, usize)> {
    match v.shape() {
        &[a, b] => Ok((a, b)),
        s => Err(shape_err(module, suffix, s, "two dimensions")),
    }
}

/// A tensor's values as `i32` (`I32` storage).
fn i32s(v: &TensorView, module: &str, suffix: &str) -> Result<Vec<i32>> {
    if v.dtype() != Dtype::I32 {
        return Err(Error::Format(format!("{module}.{suffix}: stored as {:?}, expected I32", v.dtype())));
    }
    Ok(v.data().chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

/// A float tensor's values (F16, BF16 or F32 storage).
fn floats(v: &TensorView, module: &str, suffix: &str) -> Result<Vec<f32>> {
    let d = v.data();
    let vals: Vec<f32> = match v.dtype() {
        Dtype::F16 => d.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::BF16 => d.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::F32 => d.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        other => return Err(Error::Format(format!("{module}.{suffix}: stored as {other:?}, expected a float scale"))),
    };
    if let Some(bad) = vals.iter().find(|v| !v.is_finite()) {
        return Err(Error::Format(format!("{module}.{suffix}: a scale of {bad}")));
    }
    Ok(vals)
}

/// `cols / group` groups per row, with `group` a multiple of the block.
fn groups(module: &str, cols: usize, group: Option<usize>) -> Result<(usize, usize)> {
    let g = group.unwrap_or(cols);
    if cols == 0 || !cols.is_multiple_of(BLOCK) || !cols.is_multiple_of(g) {
        return Err(Error::Format(format!(
            "{module}: {cols} input channels do not split into groups of {g} and blocks of {BLOCK}"
        )));
    }
    Ok((g, cols / g))
}

/// Act order from a `g_idx` (each input channel's group): the channels sorted by group, when
/// that is not the order they are in. Each group must hold exactly `group` channels.
fn act_order(module: &str, suffix: &str, g_idx: &[i32], group: usize, ng: usize) -> Result<Option<Vec<u32>>> {
    let bad = |m: String| Error::Format(format!("{module}.{suffix}: {m}"));
    let mut counts = vec![0usize; ng];
    for &g in g_idx {
        let g = usize::try_from(g).ok().filter(|&g| g < ng).ok_or_else(|| bad(format!("group {g} of {ng}")))?;
        counts[g] += 1;
    }
    if counts.iter().any(|&n| n != group) {
        return Err(bad(format!("groups must each hold {group} channels")));
    }
    if g_idx.iter().enumerate().all(|(i, &g)| g as usize == i / group) {
        return Ok(None);
    }
    let mut perm: Vec<u32> = (0..g_idx.len() as u32).collect();
    perm.sort_by_key(|&i| g_idx[i as usize]);
    Ok(Some(perm))
}

/// Reads layer `module` stored as `scheme`.
pub(crate) fn read(st: &MmapedSafetensors, module: &str, scheme: &Scheme) -> Result<Unpacked> {
    match scheme {
        Scheme::Awq { group } => awq(st, module, *group),
        Scheme::Gptq { bits, group, sym: _, desc_act: _, v2 } => gptq(st, module, *bits, *group, *v2),
        Scheme::CtInt { bits, group, sym, packed } => ct_int(st, module, *bits, *group, *sym, *packed),
        Scheme::Fp8 => fp8(st, module),
    }
}

fn awq(st: &MmapedSafetensors, module: &str, group: Option<usize>) -> Result<Unpacked> {
    let qw = tensor(st, module, "qweight")?;
    let (cols, words) = dims2(&qw, module, "qweight")?;
    let rows = words * 8;
    let (g, ng) = groups(module, cols, group)?;
    let qz = tensor(st, module, "qzeros")?;
    let sc = tensor(st, module, "scales")?;
    if dims2(&qz, module, "qzeros")? != (ng, words) {
        return Err(shape_err(module, "qzeros", qz.shape(), &format!("[{ng}, {words}]")));
    }
    if dims2(&sc, module, "scales")? != (ng, rows) {
        return Err(shape_err(module, "scales", sc.shape(), &format!("[{ng}, {rows}]")));
    }
    let (qw, qz, sc) = (i32s(&qw, module, "qweight")?, i32s(&qz, module, "qzeros")?, floats(&sc, module, "scales")?);
    let mut q = vec![0u8; rows * cols];
    for i in 0..cols {
        for w in 0..words {
            let word = qw[i * words + w] as u32;
            for (j, &o) in AWQ_ORDER.iter().enumerate() {
                q[(w * 8 + o) * cols + i] = ((word >> (4 * j)) & 0xf) as u8;
            }
        }
    }
    let mut zeros = vec![0i32; rows * ng];
    let mut scales = vec![0f32; rows * ng];
    for gi in 0..ng {
        for w in 0..words {
            let word = qz[gi * words + w] as u32;
            for (j, &o) in AWQ_ORDER.iter().enumerate() {
                zeros[(w * 8 + o) * ng + gi] = ((word >> (4 * j)) & 0xf) as i32;
            }
        }
        for o in 0..rows {
            scales[o * ng + gi] = sc[gi * rows + o];
        }
    }
    Ok(Unpacked { rows, cols, group: g, scales, values: Values::Int { bits: 4, q, zeros }, perm: None })
}

fn gptq(st: &MmapedSafetensors, module: &str, bits: u32, group: Option<usize>, v2: bool) -> Result<Unpacked> {
    let per = (32 / bits) as usize;
    let mask = (1u32 << bits) - 1;
    let qw = tensor(st, module, "qweight")?;
    let (in_words, rows) = dims2(&qw, module, "qweight")?;
    let cols = in_words * per;
    let (g, ng) = groups(module, cols, group)?;
    let qz = tensor(st, module, "qzeros")?;
    let sc = tensor(st, module, "scales")?;
    let zero_words = rows.div_ceil(per);
    if dims2(&qz, module, "qzeros")? != (ng, zero_words) {
        return Err(shape_err(module, "qzeros", qz.shape(), &format!("[{ng}, {zero_words}] for group size {g}")));
    }
    if dims2(&sc, module, "scales")? != (ng, rows) {
        return Err(shape_err(module, "scales", sc.shape(), &format!("[{ng}, {rows}] for group size {g}")));
    }
    let (qw, qz, sc) = (i32s(&qw, module, "qweight")?, i32s(&qz, module, "qzeros")?, floats(&sc, module, "scales")?);
    let perm = match st.get(&format!("{module}.g_idx")) {
        Ok(v) => {
            if v.shape() != [cols] {
                return Err(shape_err(module, "g_idx", v.shape(), &format!("[{cols}]")));
            }
            act_order(module, "g_idx", &i32s(&v, module, "g_idx")?, g, ng)?
        }
        Err(_) => None,
    };
    // Input channel `i`'s value for output `o`, in the stored order.
    let mut stored = vec![0u8; rows * cols];
    for r in 0..in_words {
        for o in 0..rows {
            let word = qw[r * rows + o] as u32;
            for j in 0..per {
                stored[o * cols + r * per + j] = ((word >> (bits as usize * j)) & mask) as u8;
            }
        }
    }
    let mut zeros = vec![0i32; rows * ng];
    let mut scales = vec![0f32; rows * ng];
    for gi in 0..ng {
        for o in 0..rows {
            let word = qz[gi * zero_words + o / per] as u32;
            let z = ((word >> (bits as usize * (o % per))) & mask) as i32;
            // v1 stores the zero point minus one.
            zeros[o * ng + gi] = if v2 { z } else { z + 1 };
            scales[o * ng + gi] = sc[gi * rows + o];
        }
    }
    let q = match &perm {
        None => stored,
        Some(p) => {
            let mut q = vec![0u8; rows * cols];
            for o in 0..rows {
                for (j, &i) in p.iter().enumerate() {
                    q[o * cols + j] = stored[o * cols + i as usize];
                }
            }
            q
        }
    };
    Ok(Unpacked { rows, cols, group: g, scales, values: Values::Int { bits, q, zeros }, perm })
}

/// compressed-tensors' dense little-endian packing: element `i` of a row at bit `i * bits`.
fn unpack_row(words: &[i32], bits: u32, n: usize, out: &mut [u8]) {
    let mask = (1u64 << bits) - 1;
    for (i, o) in out.iter_mut().enumerate().take(n) {
        let bit = i * bits as usize;
        let (w, off) = (bit / 32, bit % 32);
        let lo = words[w] as u32 as u64;
        let hi = words.get(w + 1).map_or(0, |&h| h as u32 as u64);
        *o = (((lo | (hi << 32)) >> off) & mask) as u8;
    }
}

/// Per-row group scales from a compressed-tensors scale of shape `[rows, ng]`, `[rows, 1]`
/// (channel) or `[1]` / `[1, 1]` (tensor).
fn ct_scales(v: &TensorView, module: &str, suffix: &str, rows: usize, ng: usize) -> Result<Vec<f32>> {
    let s = floats(v, module, suffix)?;
    match v.shape() {
        [r, n] if *r == rows && *n == ng => Ok(s),
        [r, 1] if *r == rows => Ok((0..rows * ng).map(|i| s[i / ng]).collect()),
        [1] | [1, 1] | [] => Ok(vec![s[0]; rows * ng]),
        got => Err(shape_err(module, suffix, got, &format!("[{rows}, {ng}], [{rows}, 1] or [1]"))),
    }
}

fn ct_int(
    st: &MmapedSafetensors,
    module: &str,
    bits: u32,
    group: Option<usize>,
    sym: bool,
    packed: bool,
) -> Result<Unpacked> {
    let offset = 1i32 << (bits - 1);
    let (rows, cols, q) = if packed {
        let shape = tensor(st, module, "weight_shape")?;
        let dims: Vec<i64> = match shape.dtype() {
            Dtype::I64 => {
                shape.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8]))).collect()
            }
            Dtype::I32 => {
                shape.data().chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64).collect()
            }
            other => return Err(Error::Format(format!("{module}.weight_shape: stored as {other:?}"))),
        };
        let [rows, cols] = dims[..] else {
            return Err(Error::Format(format!("{module}.weight_shape: {dims:?}, expected two dimensions")));
        };
        let (rows, cols) = (usize::try_from(rows).unwrap_or(0), usize::try_from(cols).unwrap_or(0));
        let wp = tensor(st, module, "weight_packed")?;
        let words = cols.checked_mul(bits as usize).map(|b| b.div_ceil(32)).unwrap_or(0);
        if rows == 0 || cols == 0 || dims2(&wp, module, "weight_packed")? != (rows, words) {
            return Err(shape_err(
                module,
                "weight_packed",
                wp.shape(),
                &format!("[{rows}, {words}] for {rows} x {cols}"),
            ));
        }
        let wp = i32s(&wp, module, "weight_packed")?;
        let mut q = vec![0u8; rows * cols];
        for r in 0..rows {
            unpack_row(&wp[r * words..(r + 1) * words], bits, cols, &mut q[r * cols..(r + 1) * cols]);
        }
        (rows, cols, q)
    } else {
        let w = tensor(st, module, "weight")?;
        if w.dtype() != Dtype::I8 {
            return Err(Error::Format(format!("{module}.weight: stored as {:?}, expected I8", w.dtype())));
        }
        let (rows, cols) = dims2(&w, module, "weight")?;
        // Signed bytes to the unsigned range the zero points are in.
        (rows, cols, w.data().iter().map(|&b| (b as i8 as i32 + offset) as u8).collect())
    };
    let (g, ng) = groups(module, cols, group)?;
    let scales = ct_scales(&tensor(st, module, "weight_scale")?, module, "weight_scale", rows, ng)?;
    let mut zeros = vec![offset; rows * ng];
    if !sym {
        let zp = tensor(st, module, "weight_zero_point")?;
        let signed: Vec<i32> = if packed {
            // Packed along the output rows: `[ceil(rows * bits / 32), ng]`.
            let zw = rows.checked_mul(bits as usize).map(|b| b.div_ceil(32)).unwrap_or(0);
            if dims2(&zp, module, "weight_zero_point")? != (zw, ng) {
                return Err(shape_err(module, "weight_zero_point", zp.shape(), &format!("[{zw}, {ng}]")));
            }
            let words = i32s(&zp, module, "weight_zero_point")?;
            let mut out = vec![0i32; rows * ng];
            let mut col = vec![0i32; zw];
            let mut vals = vec![0u8; rows];
            for gi in 0..ng {
                for (w, c) in col.iter_mut().enumerate() {
                    *c = words[w * ng + gi];
                }
                unpack_row(&col, bits, rows, &mut vals);
                for o in 0..rows {
                    out[o * ng + gi] = vals[o] as i32 - offset;
                }
            }
            out
        } else {
            match zp.dtype() {
                Dtype::I8 => zp.data().iter().map(|&b| b as i8 as i32).collect(),
                other => return Err(Error::Format(format!("{module}.weight_zero_point: stored as {other:?}"))),
            }
        };
        let expanded: Vec<i32> = match zp.shape().len() {
            _ if signed.len() == rows * ng => signed,
            _ if signed.len() == rows => (0..rows * ng).map(|i| signed[i / ng]).collect(),
            _ if signed.len() == 1 => vec![signed[0]; rows * ng],
            _ => return Err(shape_err(module, "weight_zero_point", zp.shape(), &format!("{rows} x {ng} values"))),
        };
        for (z, zp) in zeros.iter_mut().zip(expanded) {
            *z = offset + zp;
        }
    }
    let perm = match st.get(&format!("{module}.weight_g_idx")) {
        Ok(v) => act_order(module, "weight_g_idx", &i32s(&v, module, "weight_g_idx")?, g, ng)?,
        Err(_) => None,
    };
    let q = match &perm {
        None => q,
        Some(p) => {
            let mut out = vec![0u8; rows * cols];
            for o in 0..rows {
                for (j, &i) in p.iter().enumerate() {
                    out[o * cols + j] = q[o * cols + i as usize];
                }
            }
            out
        }
    };
    Ok(Unpacked { rows, cols, group: g, scales, values: Values::Int { bits, q, zeros }, perm })
}

/// An e4m3 byte as a float (`NaN` for the one NaN pattern).
pub(crate) fn e4m3(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let (e, m) = ((b >> 3) & 0x0f, b & 0x07);
    if e == 0x0f && m == 0x07 {
        return f32::NAN;
    }
    let v = if e == 0 { m as f32 / 8.0 * 2f32.powi(-6) } else { (1.0 + m as f32 / 8.0) * 2f32.powi(e as i32 - 7) };
    sign * v
}

/// 8-bit float weights times their scales: per tensor (`weight_scale` of one value), per row
/// (`[rows, 1]`), per group of the row (`[rows, cols / g]`), or per block (`weight_scale_inv`
/// or a block `weight_scale` of `[ceil(rows / b0), ceil(cols / b1)]`).
fn fp8(st: &MmapedSafetensors, module: &str) -> Result<Unpacked> {
    let w = tensor(st, module, "weight")?;
    if w.dtype() != Dtype::F8_E4M3 {
        return Err(Error::Format(format!("{module}.weight: stored as {:?}, expected F8_E4M3", w.dtype())));
    }
    let (rows, cols) = dims2(&w, module, "weight")?;
    let (suffix, sv) = match st.get(&format!("{module}.weight_scale_inv")) {
        Ok(v) => ("weight_scale_inv", v),
        Err(_) => ("weight_scale", tensor(st, module, "weight_scale")?),
    };
    let s = floats(&sv, module, suffix)?;
    // The scale of element (r, c).
    let at: Box<dyn Fn(usize, usize) -> f32> = match sv.shape() {
        [] | [1] | [1, 1] => Box::new(|_, _| s[0]),
        [r, 1] if *r == rows => Box::new(|r, _| s[r]),
        [r, n] if *r == rows && cols.is_multiple_of(*n) => {
            let (n, g) = (*n, cols / *n);
            Box::new(move |r, c| s[r * n + c / g])
        }
        [a, b] if *a > 0 && *b > 0 => {
            // Blocks: the smallest block size that covers the matrix in `a x b` blocks.
            let (b0, b1) = (rows.div_ceil(*a), cols.div_ceil(*b));
            if rows.div_ceil(b0) != *a || cols.div_ceil(b1) != *b {
                return Err(shape_err(module, suffix, sv.shape(), "a block grid over the weight"));
            }
            let n = *b;
            Box::new(move |r, c| s[(r / b0) * n + c / b1])
        }
        got => return Err(shape_err(module, suffix, got, &format!("[1], [{rows}, 1] or a block grid"))),
    };
    let data = w.data();
    let mut out = vec![0f32; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            let v = e4m3(data[r * cols + c]);
            if !v.is_finite() {
                return Err(Error::Format(format!("{module}.weight: a NaN at [{r}, {c}]")));
            }
            out[r * cols + c] = v * at(r, c);
        }
    }
    if !cols.is_multiple_of(BLOCK) {
        return Err(Error::Format(format!("{module}: {cols} input channels are not whole blocks of {BLOCK}")));
    }
    Ok(Unpacked { rows, cols, group: cols, scales: vec![1.0; rows], values: Values::Float(out), perm: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_values() {
        assert_eq!(e4m3(0x00), 0.0);
        assert_eq!(e4m3(0x38), 1.0); // e = 7, m = 0
        assert_eq!(e4m3(0xb8), -1.0);
        assert_eq!(e4m3(0x7e), 448.0); // the largest
        assert_eq!(e4m3(0x01), 2f32.powi(-9)); // the smallest subnormal
        assert!(e4m3(0x7f).is_nan());
    }

    #[test]
    fn dense_packing_round_trips() {
        // Four-bit values 0..16 repeated, packed as compressed-tensors packs them.
        let vals: Vec<u8> = (0..40).map(|i| (i % 16) as u8).collect();
        let mut words = vec![0i32; 40usize.div_ceil(8)];
        for (i, &v) in vals.iter().enumerate() {
            words[i / 8] |= (v as i32) << (4 * (i % 8));
        }
        let mut out = vec![0u8; 40];
        unpack_row(&words, 4, 40, &mut out);
        assert_eq!(out, vals);
    }

    #[test]
    fn act_order_sorts_channels_by_group() {
        let g_idx = [1, 0, 1, 0];
        assert_eq!(act_order("m", "g_idx", &g_idx, 2, 2).unwrap(), Some(vec![1, 3, 0, 2]));
        assert_eq!(act_order("m", "g_idx", &[0, 0, 1, 1], 2, 2).unwrap(), None);
        assert!(act_order("m", "g_idx", &[0, 0, 0, 1], 2, 2).is_err());
        assert!(act_order("m", "g_idx", &[0, 0, 5, 1], 2, 2).is_err());
    }
}
