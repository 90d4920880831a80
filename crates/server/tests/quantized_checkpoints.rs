//! Quantized checkpoints through the real binary (issue #30): an AWQ, a GPTQ act-order, a
//! compressed-tensors and an FP8 folder (fixtures/quant, tiny token-id models given a
//! word-level tokenizer here) start and answer, the start log says what their layers run on,
//! `--quantization` is checked against the checkpoint, and every bad checkpoint stops the
//! start with exit 1 and an error naming the tensor or field.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/quant").join(name)
}

/// A copy of a fixture folder the server can load (a word-level tokenizer over its ids).
fn servable(name: &str, into: &Path) -> PathBuf {
    common::token_id_model(&fixture(name), 256, &into.join(name))
}

/// Runs the server until it exits (a start that must fail); its status and stderr.
fn failed_start(model: &Path, extra: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vllm-server"))
        .arg("--model")
        .arg(model)
        .args(["--port", &common::free_port().to_string()])
        .args(extra)
        .output()
        .expect("run vllm-server");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).to_string())
}

#[test]
fn bad_quantized_checkpoints_stop_the_start_naming_what_is_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, wants) in [
        ("bad_awq_missing_scales", &["model.layers.1.self_attn.v_proj.scales"][..]),
        ("bad_gptq_bits3", &["3 bits"]),
        ("bad_unknown_method", &["bitsandbytes"]),
        ("bad_fp8_no_scale", &["v_proj.weight_scale"]),
        ("bad_awq_group_shape", &["qzeros"]),
        ("ct_w4a16_ignore_mismatch", &["does_not_exist"]),
    ] {
        let (code, err) = failed_start(&servable(name, tmp.path()), &[]);
        assert_eq!(code, Some(1), "{name}: {err}");
        assert!(wants.iter().any(|w| err.contains(w)), "{name}: {err}");
        assert!(!err.to_lowercase().contains("panicked"), "{name}: {err}");
    }
    // --quantization names the checkpoint's method, or it is refused.
    let awq = servable("awq_g32", tmp.path());
    for (flag, want) in
        [("gptq", "quantized with awq"), ("int8", "runs on its own quantization"), ("gguf", "not a GGUF")]
    {
        let (code, err) = failed_start(&awq, &["--quantization", flag]);
        assert_eq!(code, Some(1), "{flag}: {err}");
        assert!(err.contains(want), "{flag}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quantized_checkpoints_are_served() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, flag, log) in [
        ("awq_g32", "auto", "AWQ 4-bit, groups of 32 -> 4-bit kernel (Q4_1 blocks)"),
        ("gptq_desc_act", "gptq_marlin", "act order -> 4-bit kernel"),
        ("ct_w8a8_int", "compressed-tensors", "int-quantized 8-bit"),
        ("fp8_block_16x32", "fp8", "FP8 weights requantized to int8"),
    ] {
        let dir = servable(name, tmp.path());
        let port = common::free_port();
        let log_file = tmp.path().join(format!("{name}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_vllm-server"))
            .arg("--model")
            .arg(&dir)
            .args(["--port", &port.to_string(), "--quantization", flag, "--max-model-len", "128"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_file).unwrap())
            .spawn()
            .expect("start vllm-server");
        let server = common::Server { child, base: format!("http://127.0.0.1:{port}"), port };
        let t = Instant::now();
        while reqwest::get(format!("{}/health", server.base)).await.map(|r| r.status().as_u16()).unwrap_or(0) != 200 {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "{name} did not start: {}",
                std::fs::read_to_string(&log_file).unwrap()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let body = json!({"prompt": [1, 17, 200, 3, 45], "max_tokens": 8, "temperature": 0, "ignore_eos": true});
        let r =
            reqwest::Client::new().post(format!("{}/v1/completions", server.base)).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 200, "{name}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["usage"]["completion_tokens"], 8, "{name}: {v}");
        let text = std::fs::read_to_string(&log_file).unwrap();
        assert!(text.contains(log), "{name}: the start log should say '{log}':\n{text}");
        drop(server);
    }
}
