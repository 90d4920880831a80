//! LoRA adapters on the one weight seam. A model loaded with a [`LoraRegistry`] records every
//! linear layer it builds under its checkpoint name; installing an adapter checks each of its
//! modules against those layers (present, shapes, finite weights) and then gives each layer its
//! pair of matrices under the adapter's id. Each step, the engine says which adapter each row
//! uses ([`with_step_adapters`]); [`crate::Linear::forward`] adds the rows' low-rank products
//! after the base product, grouped by adapter, so requests of many adapters and of the base
//! model share one step (Punica / S-LoRA). Model files are unchanged.
//!
//! Adapters are read from PEFT folders (`adapter_config.json` + `adapter_model.safetensors`):
//! `r`, `lora_alpha`, `use_rslora` (scale `alpha / sqrt(r)`), `rank_pattern` / `alpha_pattern`,
//! `target_modules` and `layers_to_transform` (the file's tensors say which modules it has),
//! `target_parameters` on a mixture's fused experts (installed on each expert's layers),
//! `bias: none`. A module name is the base checkpoint's (`model.layers.0.self_attn.q_proj`),
//! so a PEFT adapter applies to the same model's GGUF file too (its layers are named the
//! Hugging Face way).
//!
//! llama.cpp's adapter files (`convert_lora_to_gguf.py`: `general.type = adapter`,
//! `adapter.lora.alpha`, `blk.N.<tensor>.weight.lora_a` / `.lora_b`) are read too
//! ([`LoraAdapter::from_gguf`]), for the Llama family's GGUF architectures; their names map back
//! to the checkpoint's through the architecture's tensor map. llama.cpp's converter permutes a
//! `llama` adapter's query/key `B` rows as it permutes the base's, so such an adapter applies
//! to a GGUF base only (whose rows are in the same order).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
pub use vllm_kernels::lora::LoraPair;

use crate::{Error, Result};

mod experts;

/// What an adapter does to one module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraKind {
    /// A linear layer's low-rank product (`lora_A`, `lora_B`).
    Linear,
    /// An embedding's low-rank rows (`lora_embedding_A [rank, vocab]`, `lora_embedding_B
    /// [hidden, rank]`): `a` holds `A` transposed, `[vocab, rank]`, so a token's row is
    /// contiguous; `inp` is the vocabulary, `out` the hidden width.
    Embedding,
    /// PEFT's `modules_to_save` copy of `embed_tokens` or `lm_head`: the module's whole weight,
    /// `b` `[out, inp]` as stored (`[vocab, hidden]` for both), `a` empty, rank 0.
    Replace,
    /// A mixture's fused experts (PEFT's `target_parameters` on transformers 5's stacked
    /// `gate_up_proj` / `down_proj`) of this many experts: `a` `[experts * rank, in]`, `b`
    /// `[out, experts * rank]`, `rank` each expert's (see `lora/experts.rs`).
    Experts(usize),
}

/// One module's matrices in an adapter file: `A [rank, in]`, `B [out, rank]`, and its scale.
#[derive(Debug, Clone)]
pub struct LoraWeights {
    /// What it does to the module.
    pub kind: LoraKind,
    /// The rank.
    pub rank: usize,
    /// Input width.
    pub inp: usize,
    /// Output width.
    pub out: usize,
    /// `A`, `[rank, in]` row-major.
    pub a: Vec<f32>,
    /// `B`, `[out, rank]` row-major.
    pub b: Vec<f32>,
    /// `lora_alpha / r` (or `/ sqrt(r)` with rsLoRA), after the config's patterns.
    pub scale: f32,
    /// `B`'s rows are in llama.cpp's interleaved-rotary order of the query/key heads (a
    /// `llama` GGUF adapter's `q_proj` / `k_proj`), not the checkpoint's.
    pub gguf_rows: bool,
}

/// An adapter read from disk: its modules (by the base checkpoint's module names).
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// The largest rank of its modules.
    pub rank: usize,
    /// Its matrices, by the base checkpoint's module name.
    pub modules: BTreeMap<String, LoraWeights>,
    /// `base_model_name_or_path` of its `adapter_config.json`.
    pub base_model: Option<String>,
}

fn bad(path: &Path, msg: impl Into<String>) -> Error {
    Error::Format(format!("LoRA adapter {}: {}", path.display(), msg.into()))
}

/// A PEFT pattern key applies to a module when it matches its name's end (PEFT's
/// `re.match(rf"(.*\.)?({key})$", name)`).
fn pattern_matches(key: &str, module: &str) -> bool {
    regex::RegexBuilder::new(&format!(r"^(.*\.)?({key})$"))
        .size_limit(1 << 20)
        .build()
        .is_ok_and(|re| re.is_match(module))
}

impl LoraAdapter {
    /// Reads an adapter: a PEFT folder, or a llama.cpp GGUF adapter file.
    pub fn load(path: &Path, max_rank: usize) -> Result<Self> {
        if path.is_file() {
            Self::from_gguf(path, max_rank)
        } else {
            Self::from_peft_dir(path, max_rank)
        }
    }

    /// Reads a llama.cpp LoRA adapter (GGUF, `general.type = adapter`, `adapter.type = lora`):
    /// `blk.N.<name>.weight.lora_a` (`[rank, in]`) and `.lora_b` (`[out, rank]`) pairs in F32,
    /// F16, BF16 or Q8_0, scaled by `adapter.lora.alpha / rank` as llama.cpp does (1 when the
    /// file has no alpha). The file's sizes are checked before any tensor is read (`gguf.rs`).
    pub fn from_gguf(path: &Path, max_rank: usize) -> Result<Self> {
        use candle_core::quantized::GgmlDType;
        let crate::gguf::GgufFile { content, mut reader } = crate::gguf::open(path)?;
        let meta = |k: &str| content.metadata.get(k);
        let text = |k: &str| meta(k).and_then(|v| v.to_string().ok()).cloned();
        if text("general.type").as_deref() != Some("adapter") {
            return Err(bad(path, "not an adapter file (general.type is not 'adapter'): a model file?"));
        }
        if let Some(t) = text("adapter.type").filter(|t| t != "lora") {
            return Err(bad(path, format!("adapter.type '{t}': only LoRA adapters are served")));
        }
        let arch = text("general.architecture").unwrap_or_else(|| "llama".into());
        let Some(family) = crate::registry::by_gguf_name(&arch) else {
            return Err(bad(path, format!("architecture '{arch}' is not one we read")));
        };
        if !matches!(arch.as_str(), "llama" | "qwen2" | "qwen3" | "phi3" | "gemma2" | "gemma3") {
            return Err(bad(path, format!("GGUF adapters of '{arch}' are not read (the Llama family's are)")));
        }
        let alpha = match meta("adapter.lora.alpha") {
            None => None,
            Some(v) => Some(v.to_f32().map_err(|_| bad(path, "adapter.lora.alpha is not a float"))?),
        };
        let interleaved = family.rope == crate::attention::RopeStyle::Interleaved;
        let mut pairs: BTreeMap<String, (Option<Matrix>, Option<Matrix>)> = BTreeMap::new();
        for (name, info) in &content.tensor_infos {
            let (tensor, which) = match (name.strip_suffix(".lora_a"), name.strip_suffix(".lora_b")) {
                (Some(t), _) => (t, 0),
                (_, Some(t)) => (t, 1),
                _ => return Err(bad(path, format!("{name}: not a LoRA matrix (.lora_a / .lora_b)"))),
            };
            let module = gguf_module(&arch, tensor)
                .ok_or_else(|| bad(path, format!("{name}: no layer of a {arch} model has this name")))?;
            if !matches!(info.ggml_dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 | GgmlDType::Q8_0) {
                return Err(bad(
                    path,
                    format!("{name}: {:?} matrices are not read (F32, F16, BF16, Q8_0)", info.ggml_dtype),
                ));
            }
            let shape = info.shape.dims().to_vec();
            if shape.len() != 2 || (which == 0 && shape[0] > max_rank) || (which == 1 && shape[1] > max_rank) {
                return Err(bad(path, format!("{name}: {shape:?} is not a matrix of rank at most {max_rank}")));
            }
            let values = content
                .tensor(&mut reader, name, &candle_core::Device::Cpu)
                .and_then(|q| q.dequantize(&candle_core::Device::Cpu))
                .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
                .map_err(|e| bad(path, format!("{name}: {e}")))?;
            if let Some(v) = values.iter().find(|v| !v.is_finite()) {
                return Err(bad(path, format!("{name}: a weight of {v}")));
            }
            let entry = pairs.entry(module).or_default();
            let slot = if which == 0 { &mut entry.0 } else { &mut entry.1 };
            *slot = Some((shape, values));
        }
        let mut modules = BTreeMap::new();
        let mut max = 0;
        for (module, (a, b)) in pairs {
            let (Some((a_shape, a)), Some((b_shape, b))) = (a, b) else {
                return Err(bad(path, format!("{module} has only one of lora_a and lora_b")));
            };
            let (&[rank, inp], &[out, rank_b]) = (&a_shape[..], &b_shape[..]) else { unreachable!("checked above") };
            if rank != rank_b || rank == 0 {
                return Err(bad(
                    path,
                    format!("{module}: lora_a {a_shape:?} and lora_b {b_shape:?} disagree on the rank"),
                ));
            }
            // llama.cpp: `alpha / rank` when the file has an alpha, else 1.
            let scale = alpha.filter(|&a| a != 0.0).map_or(1.0, |a| a / rank as f32);
            if !scale.is_finite() {
                return Err(bad(path, format!("{module}: scale {scale}")));
            }
            let gguf_rows =
                interleaved && (module.ends_with("self_attn.q_proj") || module.ends_with("self_attn.k_proj"));
            max = max.max(rank);
            modules.insert(module, LoraWeights { kind: LoraKind::Linear, rank, inp, out, a, b, scale, gguf_rows });
        }
        if modules.is_empty() {
            return Err(bad(path, "it has no LoRA matrices"));
        }
        Ok(Self { rank: max, modules, base_model: text("general.base_model.0.name") })
    }

    /// Reads a PEFT adapter folder; `max_rank` bounds every module's rank.
    pub fn from_peft_dir(dir: &Path, max_rank: usize) -> Result<Self> {
        if !dir.is_dir() {
            return Err(bad(dir, "no such folder"));
        }
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| bad(dir, format!("adapter_config.json: {e}")))?;
        if text.len() > 1 << 20 {
            return Err(bad(dir, "adapter_config.json is larger than 1 MiB"));
        }
        let cfg: Value = serde_json::from_str(&text).map_err(|e| bad(dir, format!("adapter_config.json: {e}")))?;
        let peft_type = cfg.get("peft_type").and_then(Value::as_str).unwrap_or("LORA");
        if !peft_type.eq_ignore_ascii_case("lora") {
            return Err(bad(dir, format!("peft_type {peft_type}: only LoRA adapters are served")));
        }
        match cfg.get("bias").and_then(Value::as_str).unwrap_or("none") {
            "none" => {}
            other => return Err(bad(dir, format!("bias '{other}': only adapters without biases ('none') are served"))),
        }
        if cfg.get("use_dora").and_then(Value::as_bool) == Some(true) {
            return Err(bad(dir, "DoRA adapters (use_dora) are not served"));
        }
        let r = cfg.get("r").and_then(Value::as_u64).ok_or_else(|| bad(dir, "adapter_config.json has no rank 'r'"))?;
        let alpha = cfg.get("lora_alpha").and_then(Value::as_f64).unwrap_or(r as f64);
        let rslora = cfg.get("use_rslora").and_then(Value::as_bool).unwrap_or(false);
        let patterns = |k: &str| -> Vec<(String, f64)> {
            cfg.get(k)
                .and_then(Value::as_object)
                .map(|o| o.iter().filter_map(|(k, v)| Some((k.clone(), v.as_f64()?))).collect())
                .unwrap_or_default()
        };
        let (rank_pattern, alpha_pattern) = (patterns("rank_pattern"), patterns("alpha_pattern"));
        let base_model = cfg.get("base_model_name_or_path").and_then(Value::as_str).map(String::from);
        let st_path = dir.join("adapter_model.safetensors");
        if !st_path.is_file() {
            return Err(bad(
                dir,
                if dir.join("adapter_model.bin").is_file() {
                    "adapter_model.bin is a PyTorch pickle, which is never loaded: save the adapter as safetensors \
                     (PEFT's default, safe_serialization=True)"
                } else {
                    "no adapter_model.safetensors in it"
                },
            ));
        }
        let bytes = std::fs::read(&st_path).map_err(|e| bad(dir, format!("adapter_model.safetensors: {e}")))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(dir, format!("adapter_model.safetensors is not a safetensors file: {e}")))?;
        // Per module: lora_A, lora_B, lora_embedding_A, lora_embedding_B, a modules_to_save copy.
        let mut parts: BTreeMap<String, [Option<Matrix>; 5]> = BTreeMap::new();
        for (name, view) in st.tensors() {
            let suffixes = [".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B"];
            let (module, which) = match suffixes.iter().enumerate().find_map(|(i, s)| Some((name.strip_suffix(s)?, i)))
            {
                Some(found) => found,
                // PEFT saves a targeted embedding's (and head's) base weight beside its adapter
                // (`save_embedding_layers`): the served base's own is used.
                None if name.ends_with(".base_layer.weight") => continue,
                None => match name.strip_suffix(".weight") {
                    Some(m) if m.ends_with("embed_tokens") || m.ends_with("lm_head") => (m, 4),
                    Some(m) if !m.contains(".lora_") => {
                        return Err(bad(
                            dir,
                            format!("{name}: modules_to_save of {m} is not served (embed_tokens and lm_head are)"),
                        ))
                    }
                    _ => return Err(bad(dir, format!("{name}: not a LoRA matrix (lora_A / lora_B)"))),
                },
            };
            let module = module.strip_prefix("base_model.model.").unwrap_or(module).to_string();
            let values = floats(&view).map_err(|m| bad(dir, format!("{name}: {m}")))?;
            if let Some(v) = values.iter().find(|v| !v.is_finite()) {
                return Err(bad(dir, format!("{name}: a weight of {v}")));
            }
            if view.shape().len() != 2 {
                return Err(bad(dir, format!("{name}: {:?} is not a matrix", view.shape())));
            }
            parts.entry(module).or_default()[which] = Some((view.shape().to_vec(), values));
        }
        let mut modules = BTreeMap::new();
        let mut max = 0;
        for (module, [a, b, ea, eb, full]) in parts {
            let (kind, a, b) = match (a, b, ea, eb, full) {
                (None, None, None, None, Some((shape, w))) => {
                    let w = LoraWeights {
                        kind: LoraKind::Replace,
                        rank: 0,
                        inp: shape[1],
                        out: shape[0],
                        a: Vec::new(),
                        b: w,
                        scale: 1.0,
                        gguf_rows: false,
                    };
                    modules.insert(module, w);
                    continue;
                }
                (Some(a), Some(b), None, None, None) => (LoraKind::Linear, a, b),
                (None, None, Some(a), Some(b), None) => (LoraKind::Embedding, a, b),
                _ => return Err(bad(dir, format!("{module}: not one lora_A/lora_B or lora_embedding_A/_B pair, or a modules_to_save copy with them"))),
            };
            let ((a_shape, a), (b_shape, b)) = (a, b);
            let (rows, inp, out, cols) = (a_shape[0], a_shape[1], b_shape[0], b_shape[1]);
            if rows != cols || rows == 0 {
                return Err(bad(dir, format!("{module}: A {a_shape:?} and B {b_shape:?} disagree on the rank")));
            }
            let key_rank = rank_pattern.iter().find(|(k, _)| pattern_matches(k, &module)).map_or(r as f64, |p| p.1);
            let key_alpha = alpha_pattern.iter().find(|(k, _)| pattern_matches(k, &module)).map_or(alpha, |p| p.1);
            // A mixture's fused experts: A holds every expert's rows of rank r, one after another.
            let (kind, rank) = match experts::owner(&module) {
                Some(_) if kind == LoraKind::Linear => {
                    let r = key_rank as usize;
                    if r == 0 || rows % r != 0 {
                        return Err(bad(dir, format!("{module}: A {a_shape:?} is not experts of rank {key_rank}")));
                    }
                    (LoraKind::Experts(rows / r), r)
                }
                _ => (kind, rows),
            };
            if rank > max_rank {
                return Err(bad(dir, format!("{module} has rank {rank}, above --max-lora-rank {max_rank}")));
            }
            if key_rank as usize != rank {
                return Err(bad(dir, format!("{module}: rank {rank} in the file, {key_rank} in adapter_config.json")));
            }
            let scale = if rslora { key_alpha / (key_rank).sqrt() } else { key_alpha / key_rank } as f32;
            if !scale.is_finite() {
                return Err(bad(dir, format!("{module}: scale {scale}")));
            }
            // An embedding's A is kept transposed: a token's rank values side by side.
            let a = if kind == LoraKind::Embedding {
                (0..inp).flat_map(|t| (0..rank).map(move |k| (t, k))).map(|(t, k)| a[k * inp + t]).collect()
            } else {
                a
            };
            max = max.max(rank);
            modules.insert(module, LoraWeights { kind, rank, inp, out, a, b, scale, gguf_rows: false });
        }
        if modules.is_empty() {
            return Err(bad(dir, "it has no LoRA matrices"));
        }
        Ok(Self { rank: max, modules, base_model })
    }
}

/// The checkpoint module a GGUF adapter tensor (`blk.3.attn_q.weight`) belongs to
/// (`model.layers.3.self_attn.q_proj`): the Llama family's module whose GGUF name it is
/// (Phi-3's fused projections first).
fn gguf_module(arch: &str, tensor: &str) -> Option<String> {
    const MODULES: [&str; 9] = [
        "self_attn.qkv_proj",
        "mlp.gate_up_proj",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ];
    let layer: usize = tensor.strip_prefix("blk.")?.split_once('.')?.0.parse().ok()?;
    let fused = arch == "phi3";
    MODULES.iter().filter(|m| fused || !m.contains("qkv") && !m.contains("gate_up")).find_map(|m| {
        let module = format!("model.layers.{layer}.{m}");
        let g = crate::weights::gguf_name(arch, &format!("{module}.weight"))?;
        (g.name == tensor && g.expert.is_none()).then_some(module)
    })
}

/// A matrix read from a file: its shape and values.
type Matrix = (Vec<usize>, Vec<f32>);

/// A tensor's values as `f32` (F32, F16 or BF16 storage).
fn floats(v: &safetensors::tensor::TensorView) -> std::result::Result<Vec<f32>, String> {
    let d = v.data();
    Ok(match v.dtype() {
        Dtype::F32 => d.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::F16 => d.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::BF16 => d.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        other => return Err(format!("stored as {other:?}, not floats")),
    })
}

/// The adapters one linear layer holds, by adapter id.
#[derive(Debug)]
pub struct LoraSlots {
    out: usize,
    inp: usize,
    /// The layer's output row `g` is the checkpoint module's row `out_perm[g]` (a GGUF file
    /// stores a `llama` model's query and key rows permuted for interleaved rotary): an
    /// adapter's `B` rows are permuted the same way when installed.
    out_perm: Option<Vec<u32>>,
    /// An embedding's slots (`inp` the vocabulary, `out` the hidden width), not a linear layer's.
    embedding: bool,
    pairs: RwLock<HashMap<u32, Arc<LoraPair>>>,
}

impl LoraSlots {
    /// The pairs held now (read-locked for a step's products).
    pub(crate) fn pairs(&self) -> std::sync::RwLockReadGuard<'_, HashMap<u32, Arc<LoraPair>>> {
        self.pairs.read().unwrap_or_else(|p| p.into_inner())
    }
}

/// Every layer of a model that adapters may target, by its checkpoint module name.
#[derive(Debug, Default)]
pub struct LoraRegistry {
    layers: Mutex<HashMap<String, Arc<LoraSlots>>>,
}

impl LoraRegistry {
    /// The slots of layer `module` (`[out, in]`), created on first use (at load).
    pub(crate) fn layer(&self, module: &str, out: usize, inp: usize, out_perm: Option<Vec<u32>>) -> Arc<LoraSlots> {
        let mut layers = self.layers.lock().unwrap_or_else(|p| p.into_inner());
        layers
            .entry(module.to_string())
            .or_insert_with(|| Arc::new(LoraSlots { out, inp, out_perm, embedding: false, pairs: RwLock::default() }))
            .clone()
    }

    /// The slots of embedding `module` (`[vocab, hidden]`), created on first use (at load).
    pub(crate) fn embedding(&self, module: &str, vocab: usize, hidden: usize) -> Arc<LoraSlots> {
        let mut layers = self.layers.lock().unwrap_or_else(|p| p.into_inner());
        let slots = LoraSlots { out: hidden, inp: vocab, out_perm: None, embedding: true, pairs: RwLock::default() };
        layers.entry(module.to_string()).or_insert_with(|| Arc::new(slots)).clone()
    }

    /// The layer an adapter's module name means: the same name, or the one name that differs
    /// only by a leading prefix (PEFT writes GPT-2's `transformer.h.0.attn.c_attn` where the
    /// model's layer may be `h.0.attn.c_attn`, and the other way round).
    fn find<'a>(layers: &'a HashMap<String, Arc<LoraSlots>>, module: &str) -> Option<&'a Arc<LoraSlots>> {
        if let Some(s) = layers.get(module) {
            return Some(s);
        }
        let ends = |long: &str, short: &str| {
            long.len() > short.len() && long.ends_with(short) && long[..long.len() - short.len()].ends_with('.')
        };
        let mut found = layers.iter().filter(|(k, _)| ends(module, k) || ends(k, module));
        match (found.next(), found.next()) {
            (Some((_, s)), None) => Some(s),
            _ => None,
        }
    }

    /// Whether the model has layer `module`.
    pub fn has_layer(&self, module: &str) -> bool {
        self.layers.lock().unwrap_or_else(|p| p.into_inner()).contains_key(module)
    }

    /// Installs `adapter` under `id`: every module is checked first (a layer of the model, of
    /// the same shape), then each layer gets its pair.
    /// Nothing changes on error.
    pub fn install(&self, id: u32, adapter: &LoraAdapter) -> Result<()> {
        for (slots, pair) in self.plan(adapter)? {
            slots.pairs.write().unwrap_or_else(|p| p.into_inner()).insert(id, Arc::new(pair));
        }
        Ok(())
    }

    /// Whether [`Self::install`] would take `adapter` (every module checked), installing
    /// nothing: a store makes room for an adapter only once it knows it fits the model.
    pub fn check(&self, adapter: &LoraAdapter) -> Result<()> {
        self.plan(adapter).map(drop)
    }

    /// Each module's layer and the pair it gets there, every module checked first.
    fn plan(&self, adapter: &LoraAdapter) -> Result<Vec<(Arc<LoraSlots>, LoraPair)>> {
        let layers = self.layers.lock().unwrap_or_else(|p| p.into_inner());
        let mut plan = Vec::with_capacity(adapter.modules.len());
        for (module, w) in &adapter.modules {
            if let LoraKind::Experts(count) = w.kind {
                plan.extend(experts::plan(&layers, module, w, count)?);
                continue;
            }
            let Some(slots) = Self::find(&layers, module) else {
                return Err(Error::Config(format!("the adapter targets {module}, which this model does not have")));
            };
            // A modules_to_save copy of an embedding is stored [vocab, hidden], like its slots'
            // (inp, out); every other matrix [out, in].
            let shape = if slots.embedding && w.kind == LoraKind::Replace { (w.inp, w.out) } else { (w.out, w.inp) };
            if shape != (slots.out, slots.inp) {
                return Err(Error::Config(format!(
                    "the adapter's {module} is [{}, {}], the model's layer is [{}, {}]",
                    w.out, w.inp, slots.out, slots.inp
                )));
            }
            if slots.embedding != (w.kind != LoraKind::Linear) && w.kind != LoraKind::Replace {
                return Err(Error::Config(format!(
                    "the adapter's {module} is {} adapter, the model's layer {}",
                    if w.kind == LoraKind::Embedding { "an embedding" } else { "a linear" },
                    if slots.embedding { "an embedding" } else { "a linear layer" }
                )));
            }
            // The base's rows and the adapter's: both the checkpoint's order, both llama.cpp's
            // (no permutation), or the checkpoint's on a GGUF base (permuted here).
            let perm = match (&slots.out_perm, w.gguf_rows) {
                (Some(perm), false) => Some(perm),
                (_, true) if slots.out_perm.is_some() => None,
                (_, true) => {
                    return Err(Error::Config(format!(
                        "{module}: this llama.cpp adapter's query/key rows are in llama.cpp's order, which \
                         only a GGUF base shares: serve the GGUF model, or the adapter's PEFT folder"
                    )))
                }
                (None, false) => None,
            };
            // B's rows (a replacing copy's rows: r = in) scaled, in the layer's row order.
            let r = if w.kind == LoraKind::Replace { w.inp } else { w.rank };
            let b: Vec<f32> = match perm {
                Some(perm) => perm
                    .iter()
                    .flat_map(|&p| w.b[p as usize * r..(p as usize + 1) * r].iter().map(|v| v * w.scale))
                    .collect(),
                None => w.b.iter().map(|v| v * w.scale).collect(),
            };
            // (In the layer's terms: an embedding's `inp` is its vocabulary, whatever the file's layout.)
            let (inp, out) = (slots.inp, slots.out);
            let pair = LoraPair { rank: w.rank, inp, out, a: w.a.clone(), b, replace: w.kind == LoraKind::Replace };
            plan.push((slots.clone(), pair));
        }
        Ok(plan)
    }

    /// Removes adapter `id` from every layer.
    pub fn remove(&self, id: u32) {
        for slots in self.layers.lock().unwrap_or_else(|p| p.into_inner()).values() {
            slots.pairs.write().unwrap_or_else(|p| p.into_inner()).remove(&id);
        }
    }
}

/// Adds the adapters of an embedding lookup's rows to `x` (`[ids, hidden]`, the base's rows of
/// tokens `ids`): `A^T[t] B^T` for a LoRA embedding, or the adapter's own row for a
/// `modules_to_save` copy. Each row on its own, in a fixed order (batch-invariant).
pub fn add_embedding_adapters(
    slots: &LoraSlots,
    ids: &candle_core::Tensor,
    x: candle_core::Tensor,
) -> Result<candle_core::Tensor> {
    let pairs = slots.pairs();
    if pairs.is_empty() {
        return Ok(x);
    }
    let ids = ids.to_vec1::<u32>()?;
    let Some(rows) = current_rows(ids.len())? else { return Ok(x) };
    let used: Vec<Option<&LoraPair>> = rows.iter().map(|id| id.and_then(|id| pairs.get(&id)).map(|p| &**p)).collect();
    if used.iter().all(Option::is_none) {
        return Ok(x);
    }
    let (dtype, device, hidden) = (x.dtype(), x.device().clone(), slots.out);
    let mut h = x.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    for ((&t, p), row) in ids.iter().zip(used).zip(h.chunks_exact_mut(hidden)) {
        let (Some(p), t) = (p, t as usize) else { continue };
        if t >= p.inp {
            continue; // the base's lookup refused it already
        }
        if p.replace {
            row.copy_from_slice(&p.b[t * hidden..(t + 1) * hidden]);
            continue;
        }
        let a = &p.a[t * p.rank..(t + 1) * p.rank];
        for (o, v) in row.iter_mut().enumerate() {
            *v += a.iter().zip(&p.b[o * p.rank..(o + 1) * p.rank]).fold(0f32, |s, (x, y)| s + x * y);
        }
    }
    Ok(candle_core::Tensor::from_vec(h, (ids.len(), hidden), &device)?.to_dtype(dtype)?)
}

/// Which adapter each row of a step uses: per token row (every layer's input) and per logits
/// row (the output head's input); `None` is the base model.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepAdapters {
    /// Per token row of the step.
    pub tokens: Vec<Option<u32>>,
    /// Per logits row (the rows that sample).
    pub logits: Vec<Option<u32>>,
}

thread_local! {
    /// The steps running on this thread, innermost last (a suspended step runs others between
    /// its layers).
    static STEPS: RefCell<Vec<Option<Arc<StepAdapters>>>> = const { RefCell::new(Vec::new()) };
}

/// Pops the step when dropped (also on a panic).
struct StepGuard;

impl Drop for StepGuard {
    fn drop(&mut self) {
        STEPS.with(|s| s.borrow_mut().pop());
    }
}

/// Runs `f` (a model's forward pass) with `step` saying which adapter each row uses.
pub fn with_step_adapters<R>(step: Option<Arc<StepAdapters>>, f: impl FnOnce() -> R) -> R {
    STEPS.with(|s| s.borrow_mut().push(step));
    let _guard = StepGuard;
    f()
}

/// The adapter of each of an input's `rows` rows under the current step, when any row has one:
/// token rows, or the output head's logits rows.
pub(crate) fn current_rows(rows: usize) -> Result<Option<Vec<Option<u32>>>> {
    STEPS.with(|s| {
        let s = s.borrow();
        let Some(Some(step)) = s.last() else { return Ok(None) };
        if !step.tokens.iter().any(Option::is_some) {
            return Ok(None);
        }
        if rows == step.tokens.len() {
            Ok(Some(step.tokens.clone()))
        } else if rows == step.logits.len() {
            Ok(Some(step.logits.clone()))
        } else {
            Err(Error::Config(format!(
                "a layer's input of {rows} rows is neither the step's {} tokens nor its {} logits rows",
                step.tokens.len(),
                step.logits.len()
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_patterns_match_name_ends() {
        assert!(pattern_matches("q_proj", "model.layers.0.self_attn.q_proj"));
        assert!(pattern_matches("layers.1.self_attn.q_proj", "model.layers.1.self_attn.q_proj"));
        assert!(!pattern_matches("q_proj", "model.layers.0.self_attn.qq_proj"));
        assert!(!pattern_matches("layers.1.self_attn.q_proj", "model.layers.11.self_attn.q_proj"));
    }

    #[test]
    fn steps_nest_and_unwind() {
        assert_eq!(current_rows(3).unwrap(), None);
        let outer = Arc::new(StepAdapters { tokens: vec![Some(1), None, Some(1)], logits: vec![Some(1)] });
        with_step_adapters(Some(outer), || {
            assert_eq!(current_rows(3).unwrap(), Some(vec![Some(1), None, Some(1)]));
            assert_eq!(current_rows(1).unwrap(), Some(vec![Some(1)]));
            assert!(current_rows(2).is_err());
            with_step_adapters(None, || assert_eq!(current_rows(3).unwrap(), None));
            assert!(current_rows(3).unwrap().is_some());
        });
        assert_eq!(current_rows(3).unwrap(), None);
    }
}
