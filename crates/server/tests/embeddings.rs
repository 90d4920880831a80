//! `POST /v1/embeddings` on the real `vllm-server` serving all-MiniLM-L6-v2: string and list
//! inputs, float and base64 encodings, usage, the OpenAI error shape, and generation routes
//! refused on an embedding model.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use reqwest::StatusCode;
use serde_json::{json, Value};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_endpoint() {
    let dir = vllm_engine::fetch_embedding_model_from_pypi().expect("embedding model for server tests");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let _server = Server(
        Command::new(env!("CARGO_BIN_EXE_vllm-server"))
            .args(["--model", &dir.to_string_lossy(), "--served-model-name", "minilm", "--port", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start vllm-server"),
    );
    let b = format!("http://127.0.0.1:{port}");
    let t = Instant::now();
    while !reqwest::get(format!("{b}/health")).await.is_ok_and(|r| r.status() == StatusCode::OK) {
        assert!(t.elapsed() < Duration::from_secs(120), "server did not become healthy");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let c = reqwest::Client::new();
    let post = |path: &str, body: Value| {
        let req = c.post(format!("{b}{path}")).json(&body);
        async move {
            let r = req.send().await.unwrap();
            (r.status(), r.json::<Value>().await.unwrap())
        }
    };
    let fixture: Value = serde_json::from_str(include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/minilm_embeddings.json"
    )))
    .unwrap();
    let (t0, e0) = (fixture["cases"][0]["text"].as_str().unwrap(), common::floats(&fixture["cases"][0]["embedding"]));
    let (t1, e1) = (fixture["cases"][1]["text"].as_str().unwrap(), common::floats(&fixture["cases"][1]["embedding"]));

    // One string.
    let (s, v) = post("/v1/embeddings", json!({"model": "minilm", "input": t0})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], "minilm");
    assert_eq!(v["data"][0]["object"], "embedding");
    assert!(common::cosine(&common::floats(&v["data"][0]["embedding"]), &e0) >= 0.9999, "{v}");
    let tokens = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(tokens > 2 && v["usage"]["total_tokens"] == tokens, "{v}");

    // A list, base64-encoded (little-endian float32, like OpenAI).
    let (s, v) = post("/v1/embeddings", json!({"input": [t0, t1], "encoding_format": "base64"})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    for (d, (i, want)) in data.iter().zip([(0, &e0), (1, &e1)]) {
        assert_eq!(d["index"], i);
        let bytes = base64::engine::general_purpose::STANDARD.decode(d["embedding"].as_str().unwrap()).unwrap();
        let got: Vec<f32> = bytes.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(got.len(), 384);
        assert!(common::cosine(&got, want) >= 0.9999);
    }

    // Errors: OpenAI shape, the parameter named.
    for (body, param) in [
        (json!({"input": "x", "encoding_format": "hex"}), Some("encoding_format")),
        (json!({"input": 42}), Some("input")),
        (json!({"input": []}), Some("input")),
        (json!({"input": "x", "dimensions": 12}), Some("dimensions")),
        (json!({"input": [[101, 99999999, 102]]}), Some("input")),
    ] {
        let (s, v) = post("/v1/embeddings", body.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert_eq!(v["error"]["param"].as_str(), param, "{v}");
        assert!(v["error"]["message"].is_string(), "{v}");
    }
    let (s, v) = post("/v1/embeddings", json!({"model": "other", "input": "x"})).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    // Generation is refused with a clear message; tokenize still works.
    let (s, v) = post("/v1/completions", json!({"prompt": "hi"})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("embedding model"), "{v}");
    let (s, v) = post("/tokenize", json!({"prompt": "hello world"})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let m: Value = c.get(format!("{b}/v1/models")).send().await.unwrap().json().await.unwrap();
    assert_eq!(m["data"][0]["id"], "minilm");
}
