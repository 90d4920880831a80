//! The one linear layer every architecture uses: `y = x W^T + b` over whichever format the
//! weight is stored in. Model files build it through [`crate::Weights::linear`] and call
//! [`Linear::forward`]; they never look at the format.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use vllm_kernels::half::{HalfFormat, HalfMatrix};
use vllm_kernels::int8::Int8Matrix;
use vllm_kernels::kquant::{KFormat, KMatrix};
use vllm_kernels::q4::{Q4Format, Q4Matrix};

use crate::lora::LoraSlots;
use crate::{Error, Result};

/// A linear layer: a weight in one of the stored formats and an optional bias.
///
/// Every product of a model goes through [`Linear::forward`], so a new weight format is a new
/// [`LinearWeight`] variant (and a constructor), not a change to any model file.
///
/// LoRA goes here too: the adapters' low-rank products are added in [`Linear::forward`], after
/// the base product and the bias, for each row with the adapter that row's request uses (the
/// step's per-row adapter slots reach the layer the same way the activations do). Model files
/// keep calling `forward(x)`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    /// `[out_features]`.
    bias: Option<Tensor>,
    /// Act-order checkpoints: the weight's column `j` is input channel `perm[j]`, so the
    /// input's columns are gathered in that order first (`[in_features]` u32).
    input_perm: Option<Tensor>,
    /// LoRA adapters of this layer (of each part of a fused layer, with the part's first
    /// output column): their products are added for the rows whose request uses one.
    lora: Vec<(usize, Arc<LoraSlots>)>,
}

/// The stored formats of a linear layer's weight.
#[derive(Debug, Clone)]
enum LinearWeight {
    /// A float matrix, `[in_features, out_features]`: stored transposed and contiguous, so the
    /// matmul streams rows (about 30% faster than a transposed view for the vocabulary-sized
    /// head).
    Dense(Tensor),
    /// An int8 matrix on our kernel ([`crate::MatrixFormat::Int8`], or a GGUF `Q8_0` matrix).
    Int8(Arc<Int8Matrix>),
    /// A GGUF 4-bit matrix (`Q4_0`, `Q4_1`) on our kernel.
    Q4(Arc<Q4Matrix>),
    /// A GGUF k-quant matrix (`Q4_K`, `Q5_K`, `Q6_K`) on our kernel.
    K(Arc<KMatrix>),
    /// A bfloat16 or float16 matrix in its stored bits on our half-precision kernel.
    Half(Arc<HalfMatrix>),
    /// A GGUF quantized matrix on candle's quantized matmul (CUDA).
    Quantized(QMatMul),
}

impl Linear {
    /// A float layer over a `[out_features, in_features]` weight, kept in its dtype.
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Ok(Self { weight: LinearWeight::Dense(weight.t()?.contiguous()?), bias, input_perm: None, lora: Vec::new() })
    }

    /// A 4-bit matrix already packed (a quantized safetensors checkpoint's groups).
    pub fn q4(matrix: Q4Matrix, bias: Option<Tensor>) -> Self {
        Self { weight: LinearWeight::Q4(Arc::new(matrix)), bias, input_perm: None, lora: Vec::new() }
    }

    /// A bfloat16 / float16 matrix already packed (a half-precision checkpoint's own bits).
    pub fn half(matrix: HalfMatrix, bias: Option<Tensor>) -> Self {
        Self { weight: LinearWeight::Half(Arc::new(matrix)), bias, input_perm: None, lora: Vec::new() }
    }

    /// An int8 matrix already packed (an 8-bit checkpoint's blocks).
    pub fn int8_matrix(matrix: Int8Matrix, bias: Option<Tensor>) -> Self {
        Self { weight: LinearWeight::Int8(Arc::new(matrix)), bias, input_perm: None, lora: Vec::new() }
    }

    /// The layer with its weight's columns in `perm` order of the input channels (act order):
    /// each step gathers the input's columns in that order before the product.
    pub fn with_input_permutation(self, perm: Vec<u32>) -> Result<Self> {
        let (_, inp) = self.dims()?;
        if perm.len() != inp || perm.iter().any(|&p| p as usize >= inp) {
            return Err(Error::Format(format!("an input permutation of {} for {inp} channels", perm.len())));
        }
        let n = perm.len();
        Ok(Self { input_perm: Some(Tensor::from_vec(perm, n, &Device::Cpu)?), ..self })
    }

    /// The layer with adapter slots (a model loaded for LoRA: see [`crate::lora`]).
    pub(crate) fn with_lora(mut self, slots: Arc<LoraSlots>) -> Self {
        self.lora = vec![(0, slots)];
        self
    }

    /// Adds the products of the adapters the rows use (`ids[r]`) to `y` (`[rows, out]`) for
    /// the input `x` (`[rows, in]`).
    fn add_lora(&self, x: &[f32], y: &mut [f32], out: usize, ids: &[Option<u32>]) {
        for (offset, slots) in &self.lora {
            let pairs = slots.pairs();
            if pairs.is_empty() {
                continue;
            }
            let rows: Vec<Option<&vllm_kernels::lora::LoraPair>> =
                ids.iter().map(|id| id.and_then(|id| pairs.get(&id)).map(|p| &**p)).collect();
            vllm_kernels::lora::add_lora(x, y, out, *offset, &rows);
        }
    }

    /// The kernel the weight runs on, for the start log.
    pub fn kernel_name(&self) -> &'static str {
        match &self.weight {
            LinearWeight::Dense(_) => "dense matmul",
            LinearWeight::Int8(_) => "int8 kernel",
            LinearWeight::Q4(m) if m.format() == Q4Format::Q4_0 => "4-bit kernel (Q4_0 blocks)",
            LinearWeight::Q4(_) => "4-bit kernel (Q4_1 blocks)",
            LinearWeight::K(_) => "k-quant kernel",
            LinearWeight::Half(m) if m.format() == HalfFormat::BF16 => "bfloat16 kernel",
            LinearWeight::Half(_) => "float16 kernel",
            LinearWeight::Quantized(_) => "candle quantized matmul",
        }
    }

    /// A float `[out_features, in_features]` weight on CPU quantized to int8 (per block of 32,
    /// like `Q8_0`); `None` when it is not on CPU or its width is not whole blocks.
    pub fn int8(weight: &Tensor, bias: Option<Tensor>) -> Result<Option<Self>> {
        if !weight.device().is_cpu() {
            return Ok(None);
        }
        let (rows, cols) = weight.dims2()?;
        let matrix = with_f32_slice(weight, |w| Int8Matrix::from_f32(w, rows, cols))?;
        Ok(matrix.map(|m| Self { weight: LinearWeight::Int8(Arc::new(m)), bias, input_perm: None, lora: Vec::new() }))
    }

    /// A GGUF-quantized matrix on our kernels in its own block format: `Q4_0` and `Q4_1` on
    /// the 4-bit kernel, `Q4_K`/`Q5_K`/`Q6_K` on the k-quant kernel, `Q8_0` on the int8 kernel
    /// (repacked, not requantized). `None` for types without a kernel of their own (float
    /// types, and quantized types the caller requantizes).
    pub fn native(q: &QTensor, bias: Option<Tensor>) -> Result<Option<Self>> {
        let Ok((rows, cols)) = q.shape().dims2() else { return Ok(None) };
        let data = q.data()?;
        let weight = match q.dtype() {
            GgmlDType::Q4_0 => {
                Q4Matrix::from_gguf(Q4Format::Q4_0, &data, rows, cols).map(|m| LinearWeight::Q4(m.into()))
            }
            GgmlDType::Q4_1 => {
                Q4Matrix::from_gguf(Q4Format::Q4_1, &data, rows, cols).map(|m| LinearWeight::Q4(m.into()))
            }
            GgmlDType::Q4K => KMatrix::from_gguf(KFormat::Q4K, &data, rows, cols).map(|m| LinearWeight::K(m.into())),
            GgmlDType::Q5K => KMatrix::from_gguf(KFormat::Q5K, &data, rows, cols).map(|m| LinearWeight::K(m.into())),
            GgmlDType::Q6K => KMatrix::from_gguf(KFormat::Q6K, &data, rows, cols).map(|m| LinearWeight::K(m.into())),
            GgmlDType::Q8_0 => Int8Matrix::from_gguf_q8_0(&data, rows, cols).map(|m| LinearWeight::Int8(m.into())),
            _ => None,
        };
        Ok(weight.map(|weight| Self { weight, bias, input_perm: None, lora: Vec::new() }))
    }

    /// A GGUF matrix on candle's quantized matmul (no bias).
    pub fn candle_quantized(q: QTensor) -> Result<Self> {
        Ok(Self {
            weight: LinearWeight::Quantized(QMatMul::from_qtensor(q)?),
            bias: None,
            input_perm: None,
            lora: Vec::new(),
        })
    }

    /// Whether the weight is held quantized (int8, 4-bit, k-quant, or candle's quantized
    /// matmul) rather than as a float matrix.
    pub fn is_quantized(&self) -> bool {
        match &self.weight {
            LinearWeight::Dense(_) | LinearWeight::Half(_) => false,
            LinearWeight::Quantized(q) => matches!(q, QMatMul::QTensor(_)),
            LinearWeight::Int8(_) | LinearWeight::Q4(_) | LinearWeight::K(_) => true,
        }
    }

    /// Whether [`Self::rows`] reads rows out of this weight (our CPU kernels' formats:
    /// quantized or half precision), so a tied embedding need not also be held as floats.
    pub fn has_rows(&self) -> bool {
        self.input_perm.is_none()
            && matches!(
                self.weight,
                LinearWeight::Int8(_) | LinearWeight::Q4(_) | LinearWeight::K(_) | LinearWeight::Half(_)
            )
    }

    /// `(out_features, in_features)`.
    fn dims(&self) -> Result<(usize, usize)> {
        Ok(match &self.weight {
            LinearWeight::Dense(w_t) => {
                let (i, o) = w_t.dims2()?;
                (o, i)
            }
            LinearWeight::Int8(m) => (m.rows(), m.cols()),
            LinearWeight::Q4(m) => (m.rows(), m.cols()),
            LinearWeight::K(m) => (m.rows(), m.cols()),
            LinearWeight::Half(m) => (m.rows(), m.cols()),
            LinearWeight::Quantized(QMatMul::QTensor(q)) => q.shape().dims2()?,
            LinearWeight::Quantized(QMatMul::Tensor(w) | QMatMul::TensorF16(w)) => w.dims2()?,
        })
    }

    /// Output width (rows of the weight).
    pub fn out_features(&self) -> Result<usize> {
        Ok(self.dims()?.0)
    }

    /// Input width (columns of the weight).
    pub fn in_features(&self) -> Result<usize> {
        Ok(self.dims()?.1)
    }

    /// One layer computing every part's outputs side by side (for projections of the same
    /// input), with each part's output width, when all parts are int8 (or all 4-bit, or all
    /// k-quants, or all half precision, of one format) without bias and stack; `None`
    /// otherwise.
    pub fn fuse(parts: &[&Linear]) -> Option<(Linear, Vec<usize>)> {
        if parts.iter().any(|p| p.bias.is_some()) {
            return None;
        }
        // Fused parts share one input: they must gather it the same way.
        let perm = parts.first()?.input_perm.as_ref().map(|t| t.to_vec1::<u32>().ok()).unwrap_or(Some(Vec::new()))?;
        for p in parts {
            let other = p.input_perm.as_ref().map(|t| t.to_vec1::<u32>().ok()).unwrap_or(Some(Vec::new()))?;
            if other != perm {
                return None;
            }
        }
        let (weight, widths) = match &parts.first()?.weight {
            LinearWeight::K(_) => {
                let mats = all_of(parts, |w| if let LinearWeight::K(m) = w { Some(&**m) } else { None })?;
                (LinearWeight::K(Arc::new(KMatrix::concat(&mats)?)), mats.iter().map(|m| m.rows()).collect())
            }
            LinearWeight::Q4(_) => {
                let mats = all_of(parts, |w| if let LinearWeight::Q4(m) = w { Some(&**m) } else { None })?;
                (LinearWeight::Q4(Arc::new(Q4Matrix::concat(&mats)?)), mats.iter().map(|m| m.rows()).collect())
            }
            LinearWeight::Int8(_) => {
                let mats = all_of(parts, |w| if let LinearWeight::Int8(m) = w { Some(&**m) } else { None })?;
                (LinearWeight::Int8(Arc::new(Int8Matrix::concat(&mats)?)), mats.iter().map(|m| m.rows()).collect())
            }
            LinearWeight::Half(_) => {
                let mats = all_of(parts, |w| if let LinearWeight::Half(m) = w { Some(&**m) } else { None })?;
                (LinearWeight::Half(Arc::new(HalfMatrix::concat(&mats)?)), mats.iter().map(|m| m.rows()).collect())
            }
            LinearWeight::Dense(_) | LinearWeight::Quantized(_) => return None,
        };
        // Each part's adapters act on its own columns of the fused output.
        let mut lora = Vec::new();
        let mut offset = 0;
        for (p, w) in parts.iter().zip(&widths) {
            lora.extend(p.lora.iter().map(|(o, s)| (offset + o, s.clone())));
            offset += w;
        }
        Some((Linear { weight, bias: None, input_perm: parts.first()?.input_perm.clone(), lora }, widths))
    }

    /// Rows `ids` of a weight on our quantized or half-precision kernels as a float
    /// `[ids, in_features]` tensor (embedding lookups in a tied output matrix, so the
    /// embedding is not also held as floats); `None` for other formats. An id past the rows is
    /// an error.
    pub fn rows(&self, ids: &Tensor, dtype: DType) -> Result<Option<Tensor>> {
        type RowFn<'a> = &'a dyn Fn(usize, &mut [f32]);
        if self.input_perm.is_some() {
            return Ok(None);
        }
        let (rows, cols, row): (usize, usize, RowFn) = match &self.weight {
            LinearWeight::Int8(m) => (m.rows(), m.cols(), &|r, o| m.row(r, o)),
            LinearWeight::Q4(m) => (m.rows(), m.cols(), &|r, o| m.row(r, o)),
            LinearWeight::K(m) => (m.rows(), m.cols(), &|r, o| m.row(r, o)),
            LinearWeight::Half(m) => (m.rows(), m.cols(), &|r, o| m.row(r, o)),
            LinearWeight::Dense(_) | LinearWeight::Quantized(_) => return Ok(None),
        };
        let ids = ids.to_vec1::<u32>()?;
        let mut out = vec![0f32; ids.len() * cols];
        for (&id, o) in ids.iter().zip(out.chunks_exact_mut(cols)) {
            if id as usize >= rows {
                return Err(Error::Format(format!("token id {id} is past the embedding's {rows} rows")));
            }
            row(id as usize, o);
        }
        Ok(Some(Tensor::from_vec(out, (ids.len(), cols), &Device::Cpu)?.to_dtype(dtype)?))
    }

    /// `x @ W^T (+ b)` for `x` of shape `[tokens, in_features]`. Any other shape is an error
    /// (the kernels assert theirs: a checkpoint whose matrices disagree with its configuration
    /// must not reach them).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (out, inp) = self.dims()?;
        if x.rank() != 2 || x.dim(1)? != inp {
            return Err(Error::Format(format!("a {:?} input to a [{out}, {inp}] linear layer", x.dims())));
        }
        // The adapter of each row, when this step has any and this layer holds adapters.
        let adapters = if self.lora.is_empty() { None } else { crate::lora::current_rows(x.dim(0)?)? };
        // Act order: the base product reads the input's columns in the weight's order; the
        // adapters read them in the input's own (then added apart from the base product).
        let (base_x, fused_lora) = match &self.input_perm {
            Some(perm) => (x.index_select(&perm.to_device(x.device())?, 1)?.contiguous()?, None),
            None => (x.clone(), adapters.as_deref()),
        };
        let y = match &self.weight {
            LinearWeight::Dense(weight_t) => base_x.matmul(weight_t)?,
            LinearWeight::Int8(m) => self.host_matmul(&base_x, out, fused_lora, |h, rows| m.matmul(h, rows))?,
            LinearWeight::Q4(m) => self.host_matmul(&base_x, out, fused_lora, |h, rows| m.matmul(h, rows))?,
            LinearWeight::K(m) => self.host_matmul(&base_x, out, fused_lora, |h, rows| m.matmul(h, rows))?,
            LinearWeight::Half(m) => self.host_matmul(&base_x, out, fused_lora, |h, rows| m.matmul(h, rows))?,
            LinearWeight::Quantized(q) => {
                if adapters.is_some() {
                    return Err(Error::Config(
                        "LoRA adapters on candle's quantized matmul (CUDA) are not served".into(),
                    ));
                }
                q.forward(&base_x.to_dtype(DType::F32)?)?.to_dtype(base_x.dtype())?
            }
        };
        let host_fused = fused_lora.is_some() && !matches!(self.weight, LinearWeight::Dense(_));
        let y = match (&adapters, host_fused) {
            (Some(ids), false) => {
                // Dense weights, or act order: the products added to the finished output.
                let (rows, dtype) = (y.dim(0)?, y.dtype());
                let mut host = y.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                with_f32_slice(x, |xs| self.add_lora(xs, &mut host, out, ids))?;
                Tensor::from_vec(host, (rows, out), x.device())?.to_dtype(dtype)?
            }
            _ => y,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// Every part's matrix, when all are of the format `pick` accepts.
fn all_of<'a, M>(parts: &[&'a Linear], pick: impl Fn(&'a LinearWeight) -> Option<&'a M>) -> Option<Vec<&'a M>> {
    parts.iter().map(|p| pick(&p.weight)).collect()
}

impl Linear {
    /// `x @ W^T` by one of our CPU kernels: `matmul(x as float32, rows of x)` returns the
    /// `[rows, out]` product, to which the rows' adapters are added, cast back to `x`'s dtype.
    fn host_matmul(
        &self,
        x: &Tensor,
        out: usize,
        adapters: Option<&[Option<u32>]>,
        matmul: impl FnOnce(&[f32], usize) -> Vec<f32>,
    ) -> Result<Tensor> {
        let rows = x.dim(0)?;
        let y = with_f32_slice(x, |host| {
            let mut y = matmul(host, rows);
            if let Some(ids) = adapters {
                self.add_lora(host, &mut y, out, ids);
            }
            y
        })?;
        Ok(Tensor::from_vec(y, (rows, out), x.device())?.to_dtype(x.dtype())?)
    }
}

/// Runs `f` on a CPU tensor's values as float32, borrowing its storage when it already is a
/// contiguous float32 tensor (no copy of a weight matrix or of a step's activations).
fn with_f32_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.to_dtype(DType::F32)?.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Err(Error::Format("int8 matrices run on CPU tensors only".into()));
    };
    let (start, end) = layout.contiguous_offsets().expect("made contiguous above");
    Ok(f(&cpu.as_slice::<f32>()?[start..end]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(rows: usize, cols: usize) -> Tensor {
        let values = (0..rows * cols).map(|i| ((i % 97) as f32 - 48.0) / 50.0).collect::<Vec<f32>>();
        Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap()
    }

    /// Each GGUF quantization type runs on the kernel made for it, in its own format.
    #[test]
    fn quantized_types_get_their_own_kernels() {
        let w = matrix(32, 512);
        for (t, want) in [
            (GgmlDType::Q4_0, "Q4(Q4_0)"),
            (GgmlDType::Q4_1, "Q4(Q4_1)"),
            (GgmlDType::Q4K, "K(Q4K)"),
            (GgmlDType::Q5K, "K(Q5K)"),
            (GgmlDType::Q6K, "K(Q6K)"),
            (GgmlDType::Q8_0, "Int8"),
            (GgmlDType::Q5_0, "none"),
            (GgmlDType::F16, "none"),
        ] {
            let q = QTensor::quantize(&w, t).unwrap();
            let got = match Linear::native(&q, None).unwrap().map(|l| l.weight) {
                Some(LinearWeight::Q4(m)) => format!("Q4({:?})", m.format()),
                Some(LinearWeight::K(m)) => format!("K({:?})", m.format()),
                Some(LinearWeight::Int8(_)) => "Int8".into(),
                Some(_) => "other".into(),
                None => "none".into(),
            };
            assert_eq!(got, want, "{t:?}");
        }
    }

    /// Every format reports the weight's `[out, in]` shape; fusing stacks the outputs of parts
    /// of one quantized format (and nothing else), and the fused product is the parts' side
    /// by side.
    #[test]
    fn shapes_and_fusion() {
        let (a, b) = (matrix(32, 256), matrix(64, 256));
        let dense = Linear::dense(a.clone(), None).unwrap();
        let int8 = Linear::int8(&a, None).unwrap().unwrap();
        let q4 = Linear::native(&QTensor::quantize(&b, GgmlDType::Q4_0).unwrap(), None).unwrap().unwrap();
        let k = Linear::native(&QTensor::quantize(&b, GgmlDType::Q6K).unwrap(), None).unwrap().unwrap();
        for l in [&dense, &int8] {
            assert_eq!((l.out_features().unwrap(), l.in_features().unwrap()), (32, 256));
        }
        for l in [&q4, &k] {
            assert_eq!((l.out_features().unwrap(), l.in_features().unwrap()), (64, 256));
        }
        assert!(!dense.is_quantized() && int8.is_quantized() && q4.is_quantized() && k.is_quantized());
        assert!(Linear::fuse(&[&dense, &dense]).is_none());
        assert!(Linear::fuse(&[&int8, &q4]).is_none());
        let biased = Linear::int8(&a, Some(Tensor::zeros(32, DType::F32, &Device::Cpu).unwrap())).unwrap().unwrap();
        assert!(Linear::fuse(&[&int8, &biased]).is_none());
        let int8_b = Linear::int8(&b, None).unwrap().unwrap();
        let (fused, widths) = Linear::fuse(&[&int8, &int8_b]).unwrap();
        assert_eq!(widths, [32, 64]);
        let x = matrix(3, 256);
        let y = fused.forward(&x).unwrap();
        let parts = Tensor::cat(&[int8.forward(&x).unwrap(), int8_b.forward(&x).unwrap()], 1).unwrap();
        let diff = (y - parts).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "{diff}");
        let (_, widths) = Linear::fuse(&[&k, &k]).unwrap();
        assert_eq!(widths, [64, 64]);
    }

    /// Rows read back from a quantized matrix are its dequantized rows; a float matrix has no
    /// rows to read, and an id past the rows is an error.
    #[test]
    fn rows_of_a_quantized_matrix() {
        let w = matrix(8, 256);
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let want = q.dequantize(&Device::Cpu).unwrap();
        let l = Linear::native(&q, None).unwrap().unwrap();
        let ids = Tensor::new(&[5u32, 0], &Device::Cpu).unwrap();
        let got = l.rows(&ids, DType::F32).unwrap().unwrap();
        let want = want.index_select(&ids, 0).unwrap();
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-6, "{diff}");
        assert!(Linear::dense(w, None).unwrap().rows(&ids, DType::F32).unwrap().is_none());
        assert!(l.rows(&Tensor::new(&[8u32], &Device::Cpu).unwrap(), DType::F32).is_err());
    }

    /// A half-precision layer: the product and rows of its stored weights widened, fusing
    /// with half-precision parts of its format only, and `has_rows` (a tied embedding is
    /// looked up in it).
    #[test]
    fn half_precision_layers() {
        let (a, b) = (matrix(32, 256), matrix(48, 256));
        let half = |m: &Tensor, format| {
            let (rows, cols) = m.dims2().unwrap();
            Linear::half(
                HalfMatrix::from_f32(format, &m.flatten_all().unwrap().to_vec1().unwrap(), rows, cols).unwrap(),
                None,
            )
        };
        let (ha, hb) = (half(&a, HalfFormat::BF16), half(&b, HalfFormat::BF16));
        assert_eq!(
            (ha.out_features().unwrap(), ha.in_features().unwrap(), ha.kernel_name()),
            (32, 256, "bfloat16 kernel")
        );
        assert!(!ha.is_quantized() && ha.has_rows() && !Linear::dense(a.clone(), None).unwrap().has_rows());
        let widened = a.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap();
        let x = matrix(3, 256);
        let want = x.matmul(&widened.t().unwrap()).unwrap();
        let diff =
            (ha.forward(&x).unwrap() - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-4, "{diff}");
        let ids = Tensor::new(&[31u32, 2], &Device::Cpu).unwrap();
        assert_eq!(
            ha.rows(&ids, DType::F32).unwrap().unwrap().to_vec2::<f32>().unwrap(),
            widened.index_select(&ids, 0).unwrap().to_vec2::<f32>().unwrap()
        );
        let (fused, widths) = Linear::fuse(&[&ha, &hb]).unwrap();
        assert_eq!(widths, [32, 48]);
        let parts = Tensor::cat(&[ha.forward(&x).unwrap(), hb.forward(&x).unwrap()], 1).unwrap();
        let diff =
            (fused.forward(&x).unwrap() - parts).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff, 0.0);
        assert!(Linear::fuse(&[&ha, &half(&b, HalfFormat::F16)]).is_none());
        assert!(Linear::fuse(&[&ha, &Linear::int8(&b, None).unwrap().unwrap()]).is_none());
    }

    /// An input of the wrong width is an error in every format (the quantized kernels would
    /// assert).
    #[test]
    fn a_wrong_input_width_is_an_error() {
        let w = matrix(32, 256);
        let layers = [
            Linear::dense(w.clone(), None).unwrap(),
            Linear::int8(&w, None).unwrap().unwrap(),
            Linear::native(&QTensor::quantize(&w, GgmlDType::Q4_0).unwrap(), None).unwrap().unwrap(),
            Linear::native(&QTensor::quantize(&w, GgmlDType::Q6K).unwrap(), None).unwrap().unwrap(),
        ];
        for l in &layers {
            assert_eq!(l.forward(&matrix(3, 256)).unwrap().dims(), [3, 32]);
            for bad in [matrix(3, 128), matrix(1, 768).reshape((3, 256)).unwrap().unsqueeze(0).unwrap()] {
                let err = l.forward(&bad).unwrap_err().to_string();
                assert!(err.contains("input to a [32, 256] linear layer"), "{err}");
            }
        }
    }
}
