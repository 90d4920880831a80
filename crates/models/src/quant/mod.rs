//! Quantized safetensors checkpoints, as vLLM's quantization methods store them: the
//! `quantization_config` of `config.json` read into a [`QuantConfig`], and each quantized
//! linear layer repacked at load onto our kernels **without requantizing** (except FP8, whose
//! 8-bit floats become int8 blocks; the start log states the error).
//!
//! | `quant_method` | stored | runs on |
//! |----------------|--------|---------|
//! | `awq` (GEMM) | `qweight [in, out/8]` (nibbles in AWQ's [0,2,4,6,1,3,5,7] order), `qzeros`, `scales [in/g, out]` | 4-bit kernel, `w = s (q - z)` = a block with `d = s`, `m = -s z` |
//! | `gptq` (v1 and `gptq_v2`) | `qweight [in*bits/32, out]`, `qzeros` (v1: zero minus one), `scales`, `g_idx` | 4-bit kernel (`sym`: exactly `Q4_0`), int8 kernel for 8-bit symmetric; act order (`desc_act`) permutes the input channels once at load and the activations each step |
//! | `compressed-tensors` | `pack-quantized` (`weight_packed`, `weight_scale`, `weight_zero_point`, `weight_g_idx`, `weight_shape`; group, channel, tensor), `int-quantized` (int8 `weight` + scale), `float-quantized` (FP8) | 4-bit kernel, int8 kernel, FP8 as below; `ignore` honoured |
//! | `fp8` | e4m3 `weight` with a per-tensor `weight_scale` or 128x128 block `weight_scale_inv` | int8 kernel: each block of 32 requantized (the only lossy repacking) |
//!
//! A group of 4-bit values with scale `s` and zero point `z` is exactly a 4-bit block with
//! `d = s` and `m = -s z` for any group size that is a multiple of 32 (or one group per row);
//! `m` is stored in half precision like `d`, which rounds it by at most 2^-11 of `15 s`.

mod formats;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::Tensor;
use serde_json::Value;
use vllm_kernels::int8::Int8Matrix;
use vllm_kernels::q4::{Q4Format, Q4Matrix, BLOCK};

use crate::linear::Linear;
use crate::{Error, Result};

/// A quantization method, by vLLM's name for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantMethod {
    /// AutoAWQ's GEMM layout.
    Awq,
    /// GPTQ (AutoGPTQ / GPTQModel), v1 or v2 zero points.
    Gptq,
    /// llm-compressor's compressed-tensors.
    CompressedTensors,
    /// 8-bit floating-point weights (`quant_method: fp8`).
    Fp8,
}

impl QuantMethod {
    /// vLLM's name (`quant_method`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Awq => "awq",
            Self::Gptq => "gptq",
            Self::CompressedTensors => "compressed-tensors",
            Self::Fp8 => "fp8",
        }
    }

    /// The method a `quant_method` names.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "awq" => Self::Awq,
            "gptq" => Self::Gptq,
            "compressed-tensors" => Self::CompressedTensors,
            "fp8" => Self::Fp8,
            _ => return None,
        })
    }
}

/// A module-name pattern of compressed-tensors (`re:` regexes, class names, exact names) or
/// of AWQ/GPTQ's `modules_to_not_convert` (substrings).
#[derive(Debug)]
enum Pattern {
    Regex(regex::Regex),
    /// `Linear`: every linear layer.
    AnyLinear,
    /// A module name, or (for `modules_to_not_convert`) a part of one.
    Name {
        name: String,
        substring: bool,
    },
}

impl Pattern {
    fn parse(text: &str, substring: bool) -> Result<Self> {
        if let Some(re) = text.strip_prefix("re:") {
            // Anchored, as compressed-tensors matches (`re.match` of the whole name).
            let re = regex::RegexBuilder::new(&format!("^(?:{re})"))
                .size_limit(1 << 20)
                .build()
                .map_err(|e| Error::Config(format!("quantization_config: pattern '{text}': {e}")))?;
            return Ok(Self::Regex(re));
        }
        Ok(match text {
            "Linear" => Self::AnyLinear,
            _ => Self::Name { name: text.to_string(), substring },
        })
    }

    fn matches(&self, module: &str) -> bool {
        match self {
            Self::Regex(re) => re.is_match(module),
            Self::AnyLinear => true,
            Self::Name { name, substring: false } => module == name,
            Self::Name { name, substring: true } => module.contains(name.as_str()),
        }
    }
}

/// How the weights of one quantized layer are stored.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Scheme {
    /// AutoAWQ GEMM: 4-bit, zero points, `group` input channels per scale.
    Awq { group: Option<usize> },
    /// GPTQ: `bits`, `group` input channels per scale (`None`: one group), symmetric or not,
    /// act order, v2 zero points (stored as they are, not minus one).
    Gptq { bits: u32, group: Option<usize>, sym: bool, desc_act: bool, v2: bool },
    /// compressed-tensors integer weights (`pack-quantized` or `int-quantized`).
    CtInt { bits: u32, group: Option<usize>, sym: bool, packed: bool },
    /// 8-bit floats (compressed-tensors `float-quantized`, or `quant_method: fp8`): per-tensor,
    /// per-channel or block scales, as the checkpoint has them.
    Fp8,
}

impl Scheme {
    /// A word for the start log.
    fn describe(&self) -> String {
        let g = |g: &Option<usize>| g.map_or("one group per row".into(), |g| format!("groups of {g}"));
        match self {
            Self::Awq { group } => format!("AWQ 4-bit, {}", g(group)),
            Self::Gptq { bits, group, sym, desc_act, v2 } => format!(
                "GPTQ{} {bits}-bit, {}, {}{}",
                if *v2 { " v2" } else { "" },
                g(group),
                if *sym { "symmetric" } else { "zero points" },
                if *desc_act { ", act order" } else { "" }
            ),
            Self::CtInt { bits, group, sym, packed } => format!(
                "compressed-tensors {} {bits}-bit, {}, {}",
                if *packed { "pack-quantized" } else { "int-quantized" },
                g(group),
                if *sym { "symmetric" } else { "zero points" }
            ),
            Self::Fp8 => "FP8 (e4m3)".into(),
        }
    }
}

/// A checkpoint's quantization: its method, the scheme of each layer it covers (one, or one
/// per compressed-tensors config group) and the layers it leaves in full precision.
#[derive(Debug)]
pub struct QuantConfig {
    method: QuantMethod,
    /// Layer patterns and their scheme, first match wins.
    groups: Vec<(Vec<Pattern>, Scheme)>,
    /// Layers left unquantized, with whether each pattern matched a layer yet.
    ignore: Vec<(Pattern, String)>,
    ignored_hits: Mutex<Vec<bool>>,
    /// What the layers loaded so far run on (for the start log).
    stats: Mutex<std::collections::BTreeMap<String, usize>>,
    /// FP8 requantization error: the largest relative RMS over the matrices (f64 bits).
    fp8_error: AtomicU64,
}

fn cfg_err(msg: impl Into<String>) -> Error {
    Error::Config(format!("quantization_config: {}", msg.into()))
}

/// A group size field: -1 (or absent) is one group per row.
fn group_size(v: Option<&Value>, what: &str) -> Result<Option<usize>> {
    match v.and_then(Value::as_i64) {
        None | Some(-1) => Ok(None),
        Some(g) if g >= BLOCK as i64 && g % BLOCK as i64 == 0 && g <= 1 << 20 => Ok(Some(g as usize)),
        Some(g) => Err(cfg_err(format!("{what} {g}: group sizes must be -1 or a multiple of {BLOCK}"))),
    }
}

impl QuantConfig {
    /// The `quantization_config` of a parsed `config.json`, if it has one.
    pub fn from_config(raw: &Value) -> Result<Option<Self>> {
        let Some(q) = raw.get("quantization_config").filter(|q| !q.is_null()) else { return Ok(None) };
        let method_name = q.get("quant_method").and_then(Value::as_str).unwrap_or_default();
        let method = QuantMethod::from_name(method_name).ok_or_else(|| {
            cfg_err(format!(
                "quant_method '{method_name}' is not one we run (awq, gptq, compressed-tensors, fp8; GGUF files \
                 carry their own)"
            ))
        })?;
        let bits = |v: Option<&Value>| v.and_then(Value::as_u64).unwrap_or(4) as u32;
        let mut ignore_names: Vec<(String, bool)> = Vec::new();
        let groups = match method {
            QuantMethod::Awq => {
                let version = q.get("version").and_then(Value::as_str).unwrap_or("gemm").to_ascii_lowercase();
                if version != "gemm" {
                    return Err(cfg_err(format!("AWQ version '{version}': only the GEMM layout is stored this way")));
                }
                let b = bits(q.get("bits").or(q.get("w_bit")));
                if b != 4 {
                    return Err(cfg_err(format!("AWQ with {b} bits: only 4-bit AWQ exists")));
                }
                if q.get("zero_point").and_then(Value::as_bool) == Some(false) {
                    return Err(cfg_err("AWQ without zero points is not a layout AutoAWQ writes"));
                }
                let group = group_size(q.get("group_size").or(q.get("q_group_size")), "group_size")?;
                for m in q.get("modules_to_not_convert").and_then(Value::as_array).into_iter().flatten() {
                    ignore_names.extend(m.as_str().map(|s| (s.to_string(), true)));
                }
                vec![(vec![Pattern::AnyLinear], Scheme::Awq { group })]
            }
            QuantMethod::Gptq => {
                let b = bits(q.get("bits"));
                if b != 4 && b != 8 {
                    return Err(cfg_err(format!("GPTQ with {b} bits: we run 4-bit and 8-bit GPTQ")));
                }
                let group = group_size(q.get("group_size"), "group_size")?;
                let sym = q.get("sym").and_then(Value::as_bool).unwrap_or(true);
                let desc_act = q.get("desc_act").and_then(Value::as_bool).unwrap_or(false);
                let format = q.get("checkpoint_format").and_then(Value::as_str).unwrap_or("gptq");
                let v2 = match format {
                    "gptq" => false,
                    "gptq_v2" => true,
                    other => return Err(cfg_err(format!("GPTQ checkpoint_format '{other}' (gptq or gptq_v2)"))),
                };
                for m in q.get("modules_to_not_convert").and_then(Value::as_array).into_iter().flatten() {
                    ignore_names.extend(m.as_str().map(|s| (s.to_string(), true)));
                }
                vec![(vec![Pattern::AnyLinear], Scheme::Gptq { bits: b, group, sym, desc_act, v2 })]
            }
            QuantMethod::Fp8 => {
                if let Some(fmt) = q.get("activation_scheme").and_then(Value::as_str) {
                    if fmt != "dynamic" && fmt != "static" {
                        return Err(cfg_err(format!("activation_scheme '{fmt}'")));
                    }
                }
                for m in q.get("modules_to_not_convert").and_then(Value::as_array).into_iter().flatten() {
                    ignore_names.extend(m.as_str().map(|s| (s.to_string(), true)));
                }
                vec![(vec![Pattern::AnyLinear], Scheme::Fp8)]
            }
            QuantMethod::CompressedTensors => {
                let top_format = q.get("format").and_then(Value::as_str);
                let cgs = q
                    .get("config_groups")
                    .and_then(Value::as_object)
                    .ok_or_else(|| cfg_err("compressed-tensors without config_groups"))?;
                let mut groups = Vec::new();
                for (gname, g) in cgs {
                    let targets: Vec<Pattern> = g
                        .get("targets")
                        .and_then(Value::as_array)
                        .ok_or_else(|| cfg_err(format!("config group '{gname}' has no targets")))?
                        .iter()
                        .map(|t| {
                            t.as_str()
                                .map_or_else(|| Err(cfg_err("targets must be strings")), |t| Pattern::parse(t, false))
                        })
                        .collect::<Result<_>>()?;
                    let w = g
                        .get("weights")
                        .filter(|w| !w.is_null())
                        .ok_or_else(|| cfg_err(format!("config group '{gname}' quantizes no weights")))?;
                    let format = g.get("format").and_then(Value::as_str).or(top_format).unwrap_or("pack-quantized");
                    let kind = w.get("type").and_then(Value::as_str).unwrap_or("int");
                    let b = bits(w.get("num_bits"));
                    let sym = w.get("symmetric").and_then(Value::as_bool).unwrap_or(true);
                    let strategy = w.get("strategy").and_then(Value::as_str).unwrap_or("tensor");
                    let group = match strategy {
                        "group" => Some(
                            group_size(w.get("group_size"), "group_size")?
                                .ok_or_else(|| cfg_err("the group strategy needs a group_size"))?,
                        ),
                        "channel" | "tensor" => None,
                        "block" if kind == "float" => None,
                        other => return Err(cfg_err(format!("weight strategy '{other}' for {kind} weights"))),
                    };
                    let scheme = match (format, kind) {
                        ("pack-quantized", "int") if b == 4 || b == 8 => {
                            Scheme::CtInt { bits: b, group, sym, packed: true }
                        }
                        ("int-quantized", "int") if b == 8 => Scheme::CtInt { bits: 8, group, sym, packed: false },
                        ("float-quantized" | "naive-quantized", "float") if b == 8 => Scheme::Fp8,
                        _ => {
                            return Err(cfg_err(format!(
                                "format '{format}' with {b}-bit {kind} weights (we run pack-quantized 4/8-bit, \
                                 int-quantized 8-bit and float-quantized 8-bit)"
                            )))
                        }
                    };
                    groups.push((targets, scheme));
                }
                for m in q.get("ignore").and_then(Value::as_array).into_iter().flatten() {
                    ignore_names.extend(m.as_str().map(|s| (s.to_string(), false)));
                }
                groups
            }
        };
        let mut ignore = Vec::with_capacity(ignore_names.len());
        for (text, substring) in ignore_names {
            ignore.push((Pattern::parse(&text, substring)?, text));
        }
        let hits = vec![false; ignore.len()];
        Ok(Some(Self {
            method,
            groups,
            ignore,
            ignored_hits: Mutex::new(hits),
            stats: Mutex::default(),
            fp8_error: AtomicU64::new(0),
        }))
    }

    /// The method.
    pub fn method(&self) -> QuantMethod {
        self.method
    }

    /// What the checkpoint's layers are, in words (model-info): each scheme, and the layers
    /// left unquantized.
    pub fn describe(&self) -> String {
        let mut parts: Vec<String> = self.groups.iter().map(|(_, s)| s.describe()).collect();
        parts.dedup();
        if !self.ignore.is_empty() {
            let names: Vec<&str> = self.ignore.iter().map(|(_, t)| t.as_str()).collect();
            parts.push(format!("unquantized: {}", names.join(", ")));
        }
        format!("{} ({})", self.method.name(), parts.join("; "))
    }

    /// How many weights one stored element of tensor `name` holds: 32 / bits for the int32
    /// words of packed 4- and 8-bit weights, 0 for a quantization's own metadata (scales,
    /// zero points, group indices, shapes), 1 otherwise.
    pub fn weights_per_element(&self, name: &str) -> u64 {
        let suffix = name.rsplit('.').next().unwrap_or_default();
        let bits = self.groups.iter().find_map(|(_, s)| match s {
            Scheme::Awq { .. } => Some(4),
            Scheme::Gptq { bits, .. } | Scheme::CtInt { bits, .. } => Some(*bits),
            Scheme::Fp8 => None,
        });
        match suffix {
            "qweight" | "weight_packed" => 32 / u64::from(bits.unwrap_or(32)),
            "qzeros" | "scales" | "g_idx" | "weight_scale" | "weight_scale_inv" | "weight_zero_point"
            | "weight_shape" | "weight_g_idx" | "input_scale" => 0,
            _ => 1,
        }
    }

    /// The scheme of layer `module` (`model.layers.0.self_attn.q_proj`), or `None` when the
    /// checkpoint leaves it in full precision.
    fn scheme(&self, module: &str) -> Option<&Scheme> {
        let mut hits = self.ignored_hits.lock().unwrap_or_else(|p| p.into_inner());
        let mut ignored = false;
        for (i, (p, _)) in self.ignore.iter().enumerate() {
            if p.matches(module) {
                hits[i] = true;
                ignored = true;
            }
        }
        if ignored {
            return None;
        }
        self.groups.iter().find(|(targets, _)| targets.iter().any(|t| t.matches(module))).map(|(_, s)| s)
    }

    /// Loads layer `module` from `st` repacked for our kernels (`dense`: dequantized to float
    /// instead, the reference path), or `None` when it is not quantized. `None` too when the
    /// checkpoint has a plain `.weight` for it (a layer the quantizer skipped).
    pub fn load_linear(
        &self,
        st: &MmapedSafetensors,
        module: &str,
        bias: Option<Tensor>,
        dense: bool,
        device: &candle_core::Device,
    ) -> Result<Option<Linear>> {
        let Some(scheme) = self.scheme(module) else { return Ok(None) };
        let has = |suffix: &str| st.get(&format!("{module}.{suffix}")).is_ok();
        // An integer or 8-bit float `.weight` is this scheme's, scales or not.
        let stored_quantized = st.get(&format!("{module}.weight")).is_ok_and(|v| {
            !matches!(v.dtype(), safetensors::Dtype::F32 | safetensors::Dtype::F16 | safetensors::Dtype::BF16)
        });
        let quantized_here = match scheme {
            Scheme::Awq { .. } | Scheme::Gptq { .. } => has("qweight"),
            Scheme::CtInt { packed: true, .. } => has("weight_packed"),
            Scheme::CtInt { packed: false, .. } | Scheme::Fp8 => stored_quantized,
        };
        if !quantized_here {
            // A layer the scheme covers but the file stores in full precision (a quantizer that
            // skipped it): its `.weight` must be a float tensor, which the caller checks.
            return Ok(None);
        }
        let m = formats::read(st, module, scheme)?;
        let linear = if dense {
            let (rows, cols) = (m.rows, m.cols);
            let w = Tensor::from_vec(m.dequantize_rows(), (rows, cols), device)?;
            Linear::dense(w, bias)?
        } else {
            self.repack(m, bias, module)?
        };
        let what = format!("{} -> {}", scheme.describe(), if dense { "dequantized" } else { linear.kernel_name() });
        *self.stats.lock().unwrap_or_else(|p| p.into_inner()).entry(what).or_default() += 1;
        Ok(Some(linear))
    }

    /// An unpacked matrix on the kernel made for its bits.
    fn repack(&self, m: formats::Unpacked, bias: Option<Tensor>, module: &str) -> Result<Linear> {
        let bad = |what: String| Error::Format(format!("{module}: {what}"));
        let perm = m.perm.clone();
        let linear = match &m.values {
            formats::Values::Int { bits: 4, q, zeros } => {
                // Exactly `Q4_0` when every zero point is the middle of the range.
                let symmetric = zeros.iter().all(|&z| z == 8);
                let format = if symmetric { Q4Format::Q4_0 } else { Q4Format::Q4_1 };
                let blocks = m.q4_blocks(q, zeros, format);
                let matrix = Q4Matrix::from_gguf(format, &blocks, m.rows, m.cols)
                    .ok_or_else(|| bad(format!("{} x {} cannot be packed in blocks of {BLOCK}", m.rows, m.cols)))?;
                Linear::q4(matrix, bias)
            }
            formats::Values::Int { bits: 8, q, zeros } => {
                if zeros.iter().any(|&z| z != 128) {
                    return Err(bad(
                        "8-bit weights with zero points other than the middle of the range are not supported \
                         (asymmetric 8-bit): quantize them symmetric"
                            .into(),
                    ));
                }
                let signed: Vec<i8> = q.iter().map(|&v| (v as i16 - 128) as i8).collect();
                let scales = m.block_scales();
                let matrix = Int8Matrix::from_blocks(&signed, &scales, m.rows, m.cols)
                    .ok_or_else(|| bad(format!("{} x {} cannot be packed in blocks of {BLOCK}", m.rows, m.cols)))?;
                Linear::int8_matrix(matrix, bias)
            }
            formats::Values::Int { bits, .. } => return Err(bad(format!("{bits}-bit weights are not supported"))),
            formats::Values::Float(_) => {
                let w = m.dequantize_rows();
                let matrix = Int8Matrix::from_f32(&w, m.rows, m.cols)
                    .ok_or_else(|| bad(format!("{} x {} cannot be packed in blocks of {BLOCK}", m.rows, m.cols)))?;
                let error = relative_rms(&w, &matrix.dequantize());
                self.fp8_error.fetch_max(error.to_bits(), Ordering::Relaxed);
                Linear::int8_matrix(matrix, bias)
            }
        };
        Ok(match perm {
            Some(p) => linear.with_input_permutation(p)?,
            None => linear,
        })
    }

    /// Every `ignore` / `modules_to_not_convert` pattern must name a layer of the model.
    pub fn check_ignore_matched(&self) -> Result<()> {
        let hits = self.ignored_hits.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(((_, text), _)) = self.ignore.iter().zip(hits.iter()).find(|(_, &hit)| !hit) {
            return Err(cfg_err(format!("the ignore pattern '{text}' matches no layer of this model")));
        }
        Ok(())
    }

    /// What the quantized layers run on, for the start log: one line per kind with its count,
    /// and the FP8 requantization error when there was one.
    pub fn summary(&self) -> String {
        let stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let mut parts: Vec<String> = stats.iter().map(|(k, n)| format!("{n} x {k}")).collect();
        let e = f64::from_bits(self.fp8_error.load(Ordering::Relaxed));
        if e > 0.0 {
            parts.push(format!("FP8 weights requantized to int8 blocks of 32: at most {:.2}% RMS error", e * 100.0));
        }
        parts.join("; ")
    }
}

/// `sqrt(sum (a - b)^2 / sum a^2)`.
fn relative_rms(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        num += ((x - y) as f64).powi(2);
        den += (x as f64).powi(2);
    }
    if den == 0.0 {
        0.0
    } else {
        (num / den).sqrt()
    }
}

/// The `quantization_config` of a folder's `config.json` (for callers that hold a path).
pub fn quant_config_of(dir: &Path) -> Result<Option<Arc<QuantConfig>>> {
    let (raw, _) = crate::read_hf_config(dir)?;
    Ok(QuantConfig::from_config(&raw)?.map(Arc::new))
}
