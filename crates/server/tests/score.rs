//! The scoring routes on the real `vllm-server`: `/score`, `/v1/score`, `/rerank`,
//! `/v1/rerank` and `/v2/rerank` serving the tiny BERT fixture (fixtures/embedding/bert) behind
//! `--api-key`, their scores exactly the offline `LLM::score`'s, every bad input a 400 naming
//! its field (a 404 for another model's name, a 401 without the key), the routes in the
//! OpenAPI document; and a generative model refusing them with vLLM's 400.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{client, free_port, post, Server, KEY};
use reqwest::StatusCode;
use serde_json::{json, Value};

fn bert_dir() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/embedding/bert")
}

/// The server on the tiny BERT embedder, served as `bert` with the test key.
async fn start_bert() -> Server {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_vllm-server"))
        .args(["--model", &bert_dir().to_string_lossy(), "--served-model-name", "bert"])
        .args(["--port", &port.to_string(), "--api-key", KEY])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start vllm-server");
    let server = Server { child, base: format!("http://127.0.0.1:{port}"), port };
    let t = Instant::now();
    while !reqwest::get(format!("{}/health", server.base)).await.is_ok_and(|r| r.status() == StatusCode::OK) {
        assert!(t.elapsed() < Duration::from_secs(120), "server did not become healthy");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    server
}

/// A JSON number equal to `want` up to its decimal round trip.
fn close(v: &Value, want: f64) -> bool {
    v.as_f64().is_some_and(|x| (x - want).abs() <= 1e-12)
}

const QUERY: &str = "The cat sits outside.";
const DOCS: [&str; 4] = ["A man is playing guitar.", "The cat sits outside.", "xyz", "Rust gives memory safety."];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn score_and_rerank_routes() {
    let server = start_bert().await;
    let b = &server.base;
    let c = client();
    // The offline scores of the same model (the same batches and arithmetic: equal up to the
    // JSON round trip).
    let llm = vllm_engine::LLM::new(vllm_engine::EngineArgs::new(bert_dir().to_string_lossy())).unwrap();
    let want: Vec<f64> = llm.score(QUERY, DOCS).unwrap().iter().map(|o| o.outputs.score).collect();
    let tokens: u64 = llm.score(QUERY, DOCS).unwrap().iter().map(|o| o.prompt_token_ids.len() as u64).sum();

    // /score and /v1/score: 1:N, then 1:1 and N:N.
    for path in ["/score", "/v1/score"] {
        let (s, v) = post(&c, &format!("{b}{path}"), json!({"model": "bert", "text_1": QUERY, "text_2": DOCS})).await;
        assert_eq!(s, StatusCode::OK, "{path}: {v}");
        assert!(v["id"].as_str().unwrap().starts_with("score-"), "{v}");
        assert_eq!(v["object"], "list");
        assert_eq!(v["model"], "bert");
        assert!(v["created"].as_u64().unwrap() > 0);
        let data = v["data"].as_array().unwrap();
        assert_eq!(data.len(), DOCS.len());
        for (i, d) in data.iter().enumerate() {
            assert_eq!(d["index"], i);
            assert_eq!(d["object"], "score");
            assert!(close(&d["score"], want[i]), "{path} pair {i}: {d}");
        }
        assert_eq!(v["usage"]["prompt_tokens"], tokens, "{v}");
        assert_eq!(v["usage"]["total_tokens"], tokens, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 0, "{v}");
    }
    let (s, v) = post(&c, &format!("{b}/score"), json!({"text_1": QUERY, "text_2": DOCS[1]})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["data"].as_array().unwrap().len(), 1);
    assert!((v["data"][0]["score"].as_f64().unwrap() - 1.0).abs() < 1e-6, "a text against itself: {v}");
    let (s, v) =
        post(&c, &format!("{b}/v1/score"), json!({"text_1": [DOCS[0], QUERY], "text_2": [QUERY, DOCS[0]]})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(close(&v["data"][0]["score"], v["data"][1]["score"].as_f64().unwrap()), "N:N in order: {v}");

    // Rerank on all three paths: best first, `top_n`, `return_documents`.
    let mut order: Vec<usize> = (0..DOCS.len()).collect();
    order.sort_by(|&i, &j| want[j].total_cmp(&want[i]));
    assert_eq!(order[0], 1, "the query's own text ranks first");
    for path in ["/rerank", "/v1/rerank", "/v2/rerank"] {
        let (s, v) = post(&c, &format!("{b}{path}"), json!({"model": "bert", "query": QUERY, "documents": DOCS})).await;
        assert_eq!(s, StatusCode::OK, "{path}: {v}");
        assert!(v["id"].as_str().unwrap().starts_with("rerank-"), "{v}");
        assert_eq!(v["model"], "bert");
        assert_eq!(v["usage"]["total_tokens"], tokens, "{v}");
        let results = v["results"].as_array().unwrap();
        assert_eq!(results.len(), DOCS.len(), "no top_n: every document");
        for (r, &i) in results.iter().zip(&order) {
            assert_eq!(r["index"], i, "{path}: {v}");
            assert_eq!(r["document"]["text"], DOCS[i]);
            assert!(close(&r["relevance_score"], want[i]), "{r}");
        }
        let (s, v) = post(
            &c,
            &format!("{b}{path}"),
            json!({"query": QUERY, "documents": DOCS, "top_n": 2, "return_documents": false}),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{path}: {v}");
        let results = v["results"].as_array().unwrap();
        assert_eq!(results.len(), 2, "{v}");
        assert_eq!(results[0]["index"], order[0]);
        assert_eq!(results[1]["index"], order[1]);
        assert!(results.iter().all(|r| r.get("document").is_none()), "{v}");
    }
    // top_n 0 is vLLM's default (every document); one past the count gives them all.
    for top_n in [0, 9] {
        let (s, v) = post(&c, &format!("{b}/rerank"), json!({"query": QUERY, "documents": DOCS, "top_n": top_n})).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["results"].as_array().unwrap().len(), DOCS.len(), "top_n {top_n}");
    }

    // Bad inputs: 400 in OpenAI's shape naming the field.
    let many: Vec<String> = (0..2049).map(|i| format!("d{i}")).collect();
    let huge: Vec<&str> = vec!["a"; 1_000_000];
    for (path, body, param) in [
        ("/rerank", json!({"query": QUERY, "documents": []}), "documents"),
        ("/v1/rerank", json!({"query": QUERY, "documents": many}), "documents"),
        ("/v2/rerank", json!({"query": QUERY, "documents": huge}), "documents"),
        ("/rerank", json!({"query": QUERY, "documents": [1, 2]}), "documents"),
        ("/rerank", json!({"query": QUERY, "documents": DOCS, "top_n": -1}), "top_n"),
        ("/v2/rerank", json!({"query": ["a"], "documents": DOCS}), "query"),
        ("/score", json!({"text_1": ["a", "b", "c"], "text_2": ["d", "e"]}), "text_2"),
        ("/v1/score", json!({"text_1": ["a", "b"], "text_2": "d"}), "text_2"),
        ("/score", json!({"text_1": [], "text_2": "d"}), "text_1"),
        ("/score", json!({"text_1": 42, "text_2": "d"}), "text_1"),
        ("/v1/score", json!({"text_1": "a", "text_2": many}), "text_2"),
    ] {
        let (s, v) = post(&c, &format!("{b}{path}"), body.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{path} {}: {v}", &body.to_string()[..body.to_string().len().min(200)]);
        assert_eq!(v["error"]["param"], param, "{path}: {v}");
        assert_eq!(v["error"]["type"], "BadRequestError", "{v}");
        assert_eq!(v["error"]["code"], 400, "{v}");
        assert!(v["error"]["message"].is_string(), "{v}");
    }
    // Another model's name: 404, as /v1/embeddings.
    for (path, body) in [
        ("/score", json!({"model": "other", "text_1": "a", "text_2": "b"})),
        ("/v1/rerank", json!({"model": "other", "query": "a", "documents": ["b"]})),
    ] {
        let (s, v) = post(&c, &format!("{b}{path}"), body).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{path}: {v}");
        assert_eq!(v["error"]["type"], "NotFoundError", "{v}");
    }
    // Behind the API key, like every computing route.
    for path in ["/score", "/v1/score", "/rerank", "/v1/rerank", "/v2/rerank"] {
        let r = reqwest::Client::new()
            .post(format!("{b}{path}"))
            .json(&json!({"text_1": "a", "text_2": "b", "query": "a", "documents": ["b"]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{path}");
    }
    // In the OpenAPI document.
    let doc: Value = reqwest::get(format!("{b}/openapi.json")).await.unwrap().json().await.unwrap();
    for path in ["/score", "/v1/score", "/rerank", "/v1/rerank", "/v2/rerank"] {
        assert!(doc["paths"][path]["post"].is_object(), "{path} missing from /openapi.json");
    }
    for schema in ["ScoreRequest", "ScoreResponse", "RerankRequest", "RerankResponse"] {
        assert!(doc["components"]["schemas"][schema].is_object(), "{schema} missing from /openapi.json");
    }
}

/// A generative model refuses the scoring routes as vLLM does: a 400 naming `model`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generative_models_refuse_scoring() {
    let server = common::start(&[]).await;
    let c = client();
    for (path, body, api) in [
        ("/score", json!({"text_1": "a", "text_2": "b"}), "Score API"),
        ("/v1/score", json!({"model": "smol", "text_1": "a", "text_2": ["b"]}), "Score API"),
        ("/rerank", json!({"query": "a", "documents": ["b"]}), "Rerank (Score) API"),
        ("/v1/rerank", json!({"query": "a", "documents": ["b"]}), "Rerank (Score) API"),
        ("/v2/rerank", json!({"query": "a", "documents": ["b"]}), "Rerank (Score) API"),
    ] {
        let (s, v) = post(&c, &format!("{}{path}", server.base), body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{path}: {v}");
        assert_eq!(v["error"]["param"], "model", "{v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(&format!("does not support {api}")), "{path}: {message}");
    }
}
