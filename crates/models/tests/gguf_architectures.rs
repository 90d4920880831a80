//! Every architecture from GGUF files written by llama.cpp's own converter and quantizer
//! (`scripts/make_gguf_fixtures.py`: fixtures/models/<name>/model.{f32,q8_0,q4_k_m}.gguf, from
//! the same tiny checkpoints as tests/architectures.rs), against transformers' float32 logits.
//!
//! - Float32: logits within 1e-4 of transformers (relative to the row's largest logit) and the
//!   same 16-token greedy continuations, as from safetensors (Mistral: the converter drops the
//!   sliding window, so as far from transformers as llama.cpp's run of the file).
//! - Quantized, loaded as the engine loads them (each type on its own kernel, kept quantized):
//!   no further from transformers than llama.cpp's own run of the same file (the mean over
//!   prompt positions of the row error, measured by the script into gguf.json), with a small
//!   allowance for rounding in a different order.

use std::path::PathBuf;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device};
use serde_json::Value;
use vllm_models::{load_gguf, LoadOptions, MatrixFormat};

mod common;
use common::{compare, logit_error};

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models").join(name)
}

fn json(path: PathBuf) -> Value {
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// Loads `model.<kind>.gguf` of a fixture: float32 on the reference path, quantized files
/// with the engine's default options (`--quantization auto`).
fn check(name: &str, kind: &str) {
    let reference = json(dir(name).join("reference.json"));
    let path = dir(name).join(format!("model.{kind}.gguf"));
    let opts = if kind == "f32" {
        LoadOptions::float32()
    } else {
        LoadOptions { dtype: DType::F32, matrices: MatrixFormat::Native }
    };
    let (model, _) = load_gguf(&path, opts, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let label = format!("{name} GGUF {kind}");
    let llama_cpp = &json(dir(name).join("gguf.json"))[kind];
    let (their_max, their_mean) = (
        llama_cpp["llama_cpp_max_logit_error"].as_f64().unwrap() as f32,
        llama_cpp["llama_cpp_mean_logit_error"].as_f64().unwrap() as f32,
    );
    // Whether llama.cpp's own float32 run already differs from transformers: the file is not
    // the checkpoint (below); greedy continuations are then not compared with transformers'.
    let file_differs = json(dir(name).join("gguf.json"))["f32"]["llama_cpp_max_logit_error"].as_f64().unwrap() > 1e-2;
    if kind == "f32" && file_differs {
        // The file is not the checkpoint: llama.cpp's converter drops Mistral's sliding window
        // (GGUF `llama` has no key for it), so llama.cpp and we both attend over the whole
        // context. Then we must be exactly as far from transformers as llama.cpp is.
        let ours = logit_error(model.as_ref(), &reference);
        println!("{label}: ours {ours:?}, llama.cpp max {their_max:.3e}");
        assert!((ours.max - their_max).abs() < 1e-3, "{label}: ours {ours:?}, llama.cpp max {their_max:e}");
        return;
    }
    if kind == "f32" {
        compare(model.as_ref(), &reference, 1e-4, false, &label);
        return;
    }
    // Quantized: the mean over positions of the row error is no larger than llama.cpp's, with
    // 25% + 0.005 of slack for rounding activations in another order; greedy continuations
    // may part only at near ties of the worst row's size.
    let ours = if file_differs {
        logit_error(model.as_ref(), &reference)
    } else {
        compare(model.as_ref(), &reference, their_max.max(0.05) * 2.0, true, &label)
    };
    println!(
        "{label}: ours mean {:.3e} max {:.3e}, llama.cpp mean {their_mean:.3e} max {their_max:.3e}",
        ours.mean, ours.max
    );
    assert!(
        ours.mean <= their_mean * 1.25 + 0.005,
        "{label}: mean logit error {:.3e}, llama.cpp's {their_mean:.3e}",
        ours.mean
    );
}

fn all_kinds(name: &str) {
    for kind in ["f32", "q8_0", "q4_k_m"] {
        check(name, kind);
    }
}

#[test]
fn llama_permuted_qk() {
    all_kinds("llama");
}

#[test]
fn mistral() {
    all_kinds("mistral");
}

#[test]
fn qwen2() {
    all_kinds("qwen2");
}

#[test]
fn qwen3() {
    all_kinds("qwen3");
}

#[test]
fn phi3() {
    all_kinds("phi3");
}

#[test]
fn gemma2() {
    all_kinds("gemma2");
}

#[test]
fn gemma3() {
    all_kinds("gemma3");
}

#[test]
fn gpt2() {
    all_kinds("gpt2");
}

#[test]
fn mixtral_stacked_experts() {
    all_kinds("mixtral");
}

#[test]
fn qwen3_moe_stacked_experts() {
    all_kinds("qwen3_moe");
}

/// A GGUF architecture we do not implement is named in the error with everything we support.
#[test]
fn unsupported_gguf_architecture_lists_the_supported_ones() {
    let file = tempfile::NamedTempFile::new().unwrap();
    let md = [("general.architecture", gguf_file::Value::String("falcon".into()))];
    let refs: Vec<(&str, &gguf_file::Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    gguf_file::write(&mut std::fs::File::create(file.path()).unwrap(), &refs, &[]).unwrap();
    let err = load_gguf(file.path(), LoadOptions::float32(), &Device::Cpu).err().expect("unsupported").to_string();
    for want in ["falcon", "qwen3moe", "gemma3", "gpt2", "Gemma3ForCausalLM", "MixtralForCausalLM"] {
        assert!(err.contains(want), "{want} missing from: {err}");
    }
}

/// One row of docs/models.md's model table: the fixture, its classes, and the measured errors.
fn table_row(name: &str) -> String {
    let reference = json(dir(name).join("reference.json"));
    let arch = reference["architecture"].as_str().unwrap().to_string();
    let hf = vllm_models::load_hf_dir(&dir(name), LoadOptions::float32(), &Device::Cpu).unwrap();
    let mut cells = vec![format!("{:.1e}", logit_error(hf.as_ref(), &reference).max)];
    let gguf = dir(name).join("gguf.json");
    let mut gguf_arch = "—".to_string();
    if gguf.exists() {
        let measured = json(gguf);
        for kind in ["f32", "q8_0", "q4_k_m"] {
            let native = LoadOptions { dtype: DType::F32, matrices: MatrixFormat::Native };
            let opts = if kind == "f32" { LoadOptions::float32() } else { native };
            let (model, w) = load_gguf(&dir(name).join(format!("model.{kind}.gguf")), opts, &Device::Cpu).unwrap();
            gguf_arch = w.gguf_arch().unwrap_or_default().to_string();
            let e = logit_error(model.as_ref(), &reference);
            let theirs = &measured[kind];
            let (ours, llama_cpp) = if kind == "f32" {
                (e.max, theirs["llama_cpp_max_logit_error"].as_f64().unwrap())
            } else {
                (e.mean, theirs["llama_cpp_mean_logit_error"].as_f64().unwrap())
            };
            cells.push(format!("{ours:.1e} ({llama_cpp:.1e})"));
        }
    } else {
        cells.extend(["—".to_string(), "—".to_string(), "—".to_string()]);
    }
    format!("| {name} | `{arch}` | `{gguf_arch}` | {} |", cells.join(" | "))
}

/// The numbers of a table row (cells like `1.4e-6` or `3.9e-2 (4.1e-2)`).
fn numbers(row: &str) -> Vec<f64> {
    row.split(|c: char| c == '|' || c == '(' || c == ')' || c.is_whitespace())
        .filter_map(|t| t.parse::<f64>().ok().filter(|_| t.contains('e')))
        .collect()
}

/// docs/models.md's model table is what these fixtures measure now: each number within 20%
/// (or 1e-6) of a fresh measurement. `VLLM_UPDATE_MODEL_TABLE=1` rewrites the table instead.
#[test]
fn model_table_in_the_docs_is_current() {
    let names =
        ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "mixtral", "qwen3_moe", "gpt2", "opt"];
    let rows: Vec<String> = names.iter().map(|n| table_row(n)).collect();
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/models.md");
    let doc = std::fs::read_to_string(&path).unwrap();
    let (start, end) = ("<!-- model-table:start -->", "<!-- model-table:end -->");
    let (a, b) = (doc.find(start).expect("table start marker"), doc.find(end).expect("table end marker"));
    if std::env::var("VLLM_UPDATE_MODEL_TABLE").is_ok_and(|v| v == "1") {
        let header = "| fixture | `config.json` | GGUF | safetensors f32 | GGUF F32 | GGUF Q8_0 | GGUF Q4_K_M |\n\
                      |---|---|---|---|---|---|---|\n";
        let table = format!("{start}\n{header}{}\n", rows.join("\n"));
        std::fs::write(&path, format!("{}{table}{}", &doc[..a], &doc[b..])).unwrap();
        return;
    }
    let table = &doc[a..b];
    for (name, row) in names.iter().zip(&rows) {
        let line = table
            .lines()
            .find(|l| l.starts_with(&format!("| {name} |")))
            .unwrap_or_else(|| panic!("docs/models.md has no row for {name}; measured: {row}"));
        let (want, got) = (numbers(row), numbers(line));
        assert_eq!(want.len(), got.len(), "{name}: docs {line:?}, measured {row:?}");
        for (w, g) in want.iter().zip(&got) {
            assert!((w - g).abs() <= 0.2 * w.abs() + 1e-6, "{name}: docs {line:?}, measured {row:?}");
        }
    }
}

/// A fixture's GGUF with some metadata replaced, written to a temporary file.
fn with_metadata(name: &str, kind: &str, edits: &[(&str, gguf_file::Value)]) -> tempfile::NamedTempFile {
    let path = dir(name).join(format!("model.{kind}.gguf"));
    let mut f = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let mut md = content.metadata.clone();
    for (k, v) in edits {
        md.insert(k.to_string(), v.clone());
    }
    let tensors: Vec<(String, candle_core::quantized::QTensor)> =
        content.tensor_infos.keys().map(|n| (n.clone(), content.tensor(&mut f, n, &Device::Cpu).unwrap())).collect();
    let out = tempfile::NamedTempFile::new().unwrap();
    let md_refs: Vec<(&str, &gguf_file::Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &candle_core::quantized::QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut std::fs::File::create(out.path()).unwrap(), &md_refs, &t_refs).unwrap();
    out
}

/// A file whose metadata lies gets a configuration error, not a panic or a huge allocation:
/// no heads, more experts per token than experts, more experts than the stacked tensors hold.
#[test]
fn inconsistent_gguf_metadata_is_an_error() {
    let cases: [(&str, &str, gguf_file::Value); 4] = [
        ("qwen2", "qwen2.attention.head_count", gguf_file::Value::U32(0)),
        ("gemma3", "gemma3.attention.head_count_kv", gguf_file::Value::U32(0)),
        ("mixtral", "llama.expert_used_count", gguf_file::Value::U32(9)),
        ("qwen3_moe", "qwen3moe.expert_count", gguf_file::Value::U32(1_000_000)),
    ];
    for (name, key, value) in cases {
        let file = with_metadata(name, "q8_0", &[(key, value.clone())]);
        let native = LoadOptions { dtype: DType::F32, matrices: MatrixFormat::Native };
        let err =
            load_gguf(file.path(), native, &Device::Cpu).err().unwrap_or_else(|| panic!("{name}: {key} accepted"));
        println!("{name} {key}={value:?}: {err}");
    }
}
