//! What a checkpoint is, read from its headers only (no weight is loaded): architecture,
//! parameter count, stored dtypes, quantization, context length and the paged KV cache's bytes
//! per token, so users can size memory before serving (`cargo xtask model-info`).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::DType;

use vllm_kernels::AttnShape;

use crate::registry::{self, Kind};
use crate::{read_hf_config, safetensors_files, Result};

/// The attention layout that sizes the KV cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvLayout {
    /// Layers with a cache.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (fewer than `heads` with grouped-query attention).
    pub kv_heads: usize,
    /// Head size.
    pub head_dim: usize,
    /// Layers attending within a sliding window, and its size.
    pub sliding: Option<(usize, usize)>,
}

impl KvLayout {
    /// The layout of `layers` layers of `shape`; `window(i)` is layer i's sliding window.
    /// Only the first [`crate::validate::MAX_LAYERS`] layers are looked at: more is refused
    /// by validation, which runs on the layout.
    pub(crate) fn new(layers: usize, shape: AttnShape, window: impl Fn(usize) -> Option<usize>) -> Self {
        let windows: Vec<usize> = (0..layers.min(crate::validate::MAX_LAYERS)).filter_map(window).collect();
        Self {
            layers,
            heads: shape.num_heads,
            kv_heads: shape.num_kv_heads,
            head_dim: shape.head_dim,
            sliding: windows.first().map(|&w| (windows.len(), w)),
        }
    }

    /// Bytes one token takes in the cache (keys and values of every layer) at `dtype` (of a
    /// validated layout: it cannot overflow).
    pub fn bytes_per_token(&self, dtype: DType) -> usize {
        self.checked_bytes_per_token(dtype.size_in_bytes()).unwrap_or(usize::MAX)
    }

    /// [`Self::bytes_per_token`] for values of `bytes` bytes; `None` if it overflows.
    pub fn checked_bytes_per_token(&self, bytes: usize) -> Option<usize> {
        [self.layers, self.kv_heads, self.head_dim, bytes].iter().try_fold(2usize, |n, &d| n.checked_mul(d))
    }
}

/// A checkpoint's description (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// The file or folder described.
    pub path: PathBuf,
    /// `GGUF` or `safetensors (N files)`.
    pub format: String,
    /// `config.json`'s architecture, or GGUF's `general.architecture`.
    pub architecture: String,
    /// Whether we run it (generation or embeddings) or only describe it.
    pub supported: bool,
    /// Total parameters (each stored tensor counted once: tied embeddings count once).
    pub parameters: u64,
    /// Bytes of the stored tensors.
    pub weight_bytes: u64,
    /// Parameters per stored dtype (`F32`, `BF16`, `Q4_K`, ...).
    pub dtypes: BTreeMap<String, u64>,
    /// The quantization: a GGUF file type, `quantization_config.quant_method`, or `None`.
    pub quantization: Option<String>,
    /// A quantized safetensors checkpoint's schemes in words (bits, groups, zero points, act
    /// order, the layers left unquantized).
    pub quantization_detail: Option<String>,
    /// Context length the model was trained for.
    pub context_length: Option<usize>,
    /// The KV-cache layout; `None` for encoder (embedding) models, which keep no cache.
    pub kv: Option<KvLayout>,
}

/// llama.cpp's `general.file_type` names (`llama_ftype`).
fn gguf_file_type(t: u32) -> Option<&'static str> {
    Some(match t {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        32 => "BF16",
        _ => return None,
    })
}

/// llama.cpp's spelling of a tensor type (`Q4_K`, not candle's `Q4K`).
fn ggml_name(t: GgmlDType) -> String {
    let name = format!("{t:?}").to_uppercase();
    match name.strip_suffix('K') {
        Some(stem) if stem.starts_with('Q') && !stem.contains('_') => format!("{stem}_K"),
        _ => name,
    }
}

/// Describes a GGUF file or a Hugging Face folder.
pub fn inspect(path: &Path) -> Result<ModelInfo> {
    if path.is_dir() {
        inspect_hf_dir(path)
    } else {
        inspect_gguf(path)
    }
}

fn inspect_gguf(path: &Path) -> Result<ModelInfo> {
    let content = crate::gguf::open(path)?.content;
    let md = &content.metadata;
    let arch = md.get("general.architecture").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
    let (mut parameters, mut weight_bytes, mut dtypes) = (0u64, 0u64, BTreeMap::new());
    let mut quantized: BTreeMap<String, u64> = BTreeMap::new();
    for info in content.tensor_infos.values() {
        let n = info.shape.elem_count() as u64;
        let t = info.ggml_dtype;
        // (Each tensor's size was checked to fit the file; tensors may overlap, so the sums
        // saturate.)
        parameters = parameters.saturating_add(n);
        weight_bytes = weight_bytes.saturating_add(n / t.block_size() as u64 * t.type_size() as u64);
        let name = ggml_name(t);
        let add = |e: &mut u64| *e = e.saturating_add(n);
        add(dtypes.entry(name.clone()).or_default());
        if t.block_size() > 1 {
            add(quantized.entry(name).or_default());
        }
    }
    let file_type = md.get("general.file_type").and_then(|v| v.to_u32().ok());
    let quantization = match file_type.and_then(gguf_file_type) {
        Some(name) if name.starts_with('Q') => Some(format!("{name} (GGUF file type {})", file_type.unwrap_or(0))),
        // No (known) file type: the quantized type holding the most parameters.
        _ => quantized.iter().max_by_key(|(_, n)| **n).map(|(t, _)| t.clone()),
    };
    let (supported, context_length, kv) = match registry::by_gguf_name(&arch) {
        Some(gguf) => {
            let s = (gguf.config)(md)?.summary().from_gguf(&arch);
            s.validate()?;
            (true, Some(s.context_length), Some(s.kv))
        }
        None => {
            let ctx = md.get(&format!("{arch}.context_length")).and_then(|v| v.to_u32().ok()).map(|v| v as usize);
            (false, ctx, None)
        }
    };
    Ok(ModelInfo {
        path: path.to_path_buf(),
        format: format!("GGUF ({} tensors)", content.tensor_infos.len()),
        architecture: arch,
        supported,
        parameters,
        weight_bytes,
        dtypes,
        quantization,
        quantization_detail: None,
        context_length,
        kv,
    })
}

fn inspect_hf_dir(dir: &Path) -> Result<ModelInfo> {
    let (raw, arch) = read_hf_config(dir)?;
    let files = safetensors_files(dir)?;
    // SAFETY: read-only mapping of the headers' files, dropped before returning.
    #[allow(unsafe_code)]
    let st = unsafe { MmapedSafetensors::multi(&files)? };
    let quant = crate::quant::QuantConfig::from_config(&raw)?;
    let (mut parameters, mut weight_bytes, mut dtypes) = (0u64, 0u64, BTreeMap::new());
    for (tensor, view) in st.tensors() {
        // Packed words hold several weights; scales and zero points are not parameters.
        let per = quant.as_ref().map_or(1, |q| q.weights_per_element(&tensor));
        let n = view.shape().iter().product::<usize>() as u64 * per;
        weight_bytes += view.data().len() as u64;
        if n == 0 {
            continue;
        }
        parameters += n;
        let name = match DType::try_from(view.dtype()) {
            // Packed words: the weights' own width.
            Ok(_) if per > 1 => format!("I{} (packed)", 32 / per),
            Ok(d) => d.as_str().to_uppercase(),
            Err(_) => format!("{:?}", view.dtype()),
        };
        *dtypes.entry(name).or_default() += n;
    }
    let quantization = quant.as_ref().map(|q| q.method().name().to_string());
    let quantization_detail = quant.as_ref().map(|q| q.describe());
    let (supported, context_length, kv) = match registry::by_hf_class(&arch).map(|a| &a.kind) {
        Some(Kind::Decoder { config, .. }) => {
            let s = config(raw.clone())?.summary();
            s.validate()?;
            (true, Some(s.context_length), Some(s.kv))
        }
        Some(Kind::Encoder { summary }) => {
            let s = summary(raw.clone())?;
            s.validate()?;
            (true, Some(s.context_length), None)
        }
        None => {
            let ctx = ["max_position_embeddings", "n_positions", "max_sequence_length"]
                .iter()
                .find_map(|k| raw.get(*k).and_then(|v| v.as_u64()))
                .map(|v| v as usize);
            (false, ctx, None)
        }
    };
    Ok(ModelInfo {
        path: dir.to_path_buf(),
        format: format!("safetensors ({} file{})", files.len(), if files.len() == 1 { "" } else { "s" }),
        architecture: arch,
        supported,
        parameters,
        weight_bytes,
        dtypes,
        quantization,
        quantization_detail,
        context_length,
        kv,
    })
}

/// `1234567` -> `1,234,567`.
fn grouped(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Parameters as `134.5M` / `8.03B`.
fn short_count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

/// Bytes as `85.3 MiB`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

impl fmt::Display for ModelInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let support = if self.supported { "" } else { " (not supported by vllm-rs: description only)" };
        writeln!(f, "model:           {}", self.path.display())?;
        writeln!(f, "format:          {}", self.format)?;
        writeln!(f, "architecture:    {}{support}", self.architecture)?;
        writeln!(f, "parameters:      {} ({})", short_count(self.parameters), grouped(self.parameters))?;
        writeln!(f, "weights:         {}", bytes(self.weight_bytes))?;
        let mut by_size: Vec<_> = self.dtypes.iter().collect();
        by_size.sort_by(|a, b| b.1.cmp(a.1));
        let dtypes: Vec<String> = by_size
            .iter()
            .map(|(d, n)| match **n as f64 * 100.0 / self.parameters.max(1) as f64 {
                share if share < 0.1 => format!("{d} <0.1%"),
                share => format!("{d} {share:.1}%"),
            })
            .collect();
        writeln!(f, "dtype:           {} (share of parameters)", dtypes.join(", "))?;
        let q = self.quantization_detail.as_deref().or(self.quantization.as_deref()).unwrap_or("none");
        writeln!(f, "quantization:    {q}")?;
        match self.context_length {
            Some(c) => writeln!(f, "context length:  {} tokens", grouped(c as u64))?,
            None => writeln!(f, "context length:  unknown")?,
        }
        let Some(kv) = &self.kv else {
            let why = if self.supported { "an encoder (embedding) model keeps no KV cache" } else { "unknown layout" };
            return writeln!(f, "KV cache:        none ({why})");
        };
        writeln!(
            f,
            "attention:       {} layers, {} query heads, {} KV heads, head size {}",
            kv.layers, kv.heads, kv.kv_heads, kv.head_dim
        )?;
        if let Some((layers, window)) = kv.sliding {
            writeln!(
                f,
                "sliding window:  {window} tokens on {layers} of {} layers (the paged cache still keeps every token)",
                kv.layers
            )?;
        }
        let (f32_tok, half_tok) = (kv.bytes_per_token(DType::F32), kv.bytes_per_token(DType::BF16));
        writeln!(
            f,
            "KV cache:        {} bytes/token in f32 (the CPU cache), {} bytes/token in f16/bf16",
            grouped(f32_tok as u64),
            grouped(half_tok as u64)
        )?;
        if let Some(c) = self.context_length {
            writeln!(
                f,
                "                 one full {}-token sequence: {} in f32, {} in f16/bf16",
                grouped(c as u64),
                bytes((f32_tok as u64).saturating_mul(c as u64)),
                bytes((half_tok as u64).saturating_mul(c as u64))
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        assert_eq!(grouped(134_515_008), "134,515,008");
        assert_eq!(grouped(999), "999");
        assert_eq!(short_count(134_515_008), "134.5M");
        assert_eq!(short_count(8_030_261_248), "8.03B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(12), "12 B");
    }

    #[test]
    fn kv_bytes_per_token() {
        // Llama 3 8B: 32 layers, 8 KV heads of 128: 128 KiB per token in bf16.
        let kv = KvLayout { layers: 32, heads: 32, kv_heads: 8, head_dim: 128, sliding: None };
        assert_eq!(kv.bytes_per_token(DType::BF16), 131_072);
        assert_eq!(kv.bytes_per_token(DType::F32), 262_144);
    }
}
