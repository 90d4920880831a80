//! End-to-end: the real `vllm-server` binary on the default model, driven over HTTP with
//! `reqwest`: every route, streaming, auth, errors, client disconnect, concurrency, shutdown.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{client, post, KEY};
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};

/// The float32 path (`--quantization none`): the exact answers below are the float32 model's;
/// the default (the file's own Q4_1) is served by the other server tests.
async fn start() -> common::Server {
    common::start(&[
        "--kv-cache-memory",
        "256MiB",
        "--max-model-len",
        "2048",
        "--max-body-bytes",
        "100000",
        "--quantization",
        "none",
    ])
    .await
}

async fn metric(c: &reqwest::Client, base: &str, name: &str) -> f64 {
    common::metric(c, base, name).await
}

async fn wait_idle(c: &reqwest::Client, base: &str) {
    common::wait_idle(c, base, Duration::from_secs(30)).await
}

fn assert_openai_error(v: &Value, param: Option<&str>) {
    let e = &v["error"];
    assert!(e["message"].is_string() && e["type"].is_string() && e.get("code").is_some(), "{v}");
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{v}");
    }
}

/// Parses an SSE body into its `data:` payloads.
fn sse_data(text: &str) -> Vec<String> {
    text.lines().filter_map(|l| l.strip_prefix("data: ")).map(String::from).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_end_to_end() {
    let server = start().await;
    let b = server.base.clone();
    let c = client();

    // Auth: /v1 needs the key, /health does not.
    let r = reqwest::get(format!("{b}/v1/models")).await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_openai_error(&r.json().await.unwrap(), None);
    let bad = Client::new().get(format!("{b}/v1/models")).bearer_auth("wrong").send().await.unwrap();
    assert_eq!(bad.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(reqwest::get(format!("{b}/health")).await.unwrap().status(), StatusCode::OK);

    // Models and version.
    let m: Value = c.get(format!("{b}/v1/models")).send().await.unwrap().json().await.unwrap();
    assert_eq!(m["data"][0]["id"], "smol");
    assert_eq!(m["data"][0]["max_model_len"], 2048);
    let v: Value = c.get(format!("{b}/version")).send().await.unwrap().json().await.unwrap();
    assert!(v["version"].is_string());

    // Completion, greedy.
    let (s, v) = post(
        &c,
        &format!("{b}/v1/completions"),
        json!({"model": "smol", "prompt": "The capital of France is", "max_tokens": 5, "temperature": 0}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert!(v["choices"][0]["text"].as_str().unwrap().starts_with(" Paris"), "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["prompt_tokens"], 5);
    assert_eq!(v["usage"]["completion_tokens"], 5);
    let full_text = v["choices"][0]["text"].as_str().unwrap().to_string();

    // Several prompts, as strings and as token ids.
    let (s, v) = post(&c, &format!("{b}/v1/completions"), json!({"prompt": [[504, 3575, 282, 4649, 314], [19556, 28, 957, 1462, 314]], "max_tokens": 5, "temperature": 0})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    assert_eq!(v["choices"][0]["text"], full_text.as_str(), "token-id prompt = text prompt");

    // Streaming completion: deltas add up to the non-streamed text; usage; [DONE].
    let r = c.post(format!("{b}/v1/completions"))
        .json(&json!({"prompt": "The capital of France is", "max_tokens": 5, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}}))
        .send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let data = sse_data(&r.text().await.unwrap());
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    let streamed: String =
        chunks.iter().filter_map(|c| c["choices"].get(0)).filter_map(|c| c["text"].as_str()).collect();
    assert_eq!(streamed, full_text);
    let last_choice = chunks.iter().rev().find(|c| !c["choices"].as_array().unwrap().is_empty()).unwrap();
    assert_eq!(last_choice["choices"][0]["finish_reason"], "length");
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 5);

    // Chat, plain and streamed, with text-part content.
    let msgs = json!([{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]);
    let (s, v) = post(
        &c,
        &format!("{b}/v1/chat/completions"),
        json!({"messages": msgs, "temperature": 0, "max_completion_tokens": 30}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], "The capital of France is Paris.");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let r = c
        .post(format!("{b}/v1/chat/completions"))
        .json(&json!({"messages": msgs, "temperature": 0, "max_tokens": 30, "stream": true}))
        .send()
        .await
        .unwrap();
    let data = sse_data(&r.text().await.unwrap());
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, "The capital of France is Paris.");
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "stop");

    // /generate, /tokenize, /detokenize.
    let (s, v) = post(
        &c,
        &format!("{b}/generate"),
        json!({"prompt": "The capital of France is", "max_tokens": 5, "temperature": 0}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["text"][0], format!("The capital of France is{full_text}"));
    let (_, v) = post(&c, &format!("{b}/tokenize"), json!({"prompt": "The capital of France is"})).await;
    assert_eq!(v["tokens"], json!([504, 3575, 282, 4649, 314]));
    assert_eq!(v["count"], 5);
    let (_, v) = post(&c, &format!("{b}/detokenize"), json!({"tokens": [504, 3575, 282, 4649, 314]})).await;
    assert_eq!(v["prompt"], "The capital of France is");

    // Prefix caching with a per-tenant salt: a repeated prompt is served from the cache
    // (usage.prompt_tokens_details.cached_tokens), but not across salts.
    let long = "The library opens at nine on weekdays and at ten on Saturdays; it is closed on Sundays. ";
    let cached = |salt: &'static str| {
        let (c, b) = (c.clone(), b.clone());
        async move {
            let body = json!({"prompt": long, "max_tokens": 1, "temperature": 0, "cache_salt": salt});
            let (s, v) = post(&c, &format!("{b}/v1/completions"), body).await;
            assert_eq!(s, StatusCode::OK, "{v}");
            v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap()
        }
    };
    assert_eq!(cached("tenant-a").await, 0);
    assert_eq!(cached("tenant-a").await, 16, "the same salt reuses the full block");
    assert_eq!(cached("tenant-b").await, 0, "another salt does not");

    // Sampling fields over HTTP: a stop string cuts the text and is reported; logit_bias,
    // penalties and prompt_logprobs are honoured.
    let (s, v) = post(
        &c,
        &format!("{b}/v1/completions"),
        json!({"prompt": "The capital of France is", "max_tokens": 5, "temperature": 0, "stop": ["aris"]}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["choices"][0]["text"], " P");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["choices"][0]["stop_reason"], "aris");
    let (s, v) = post(
        &c,
        &format!("{b}/v1/completions"),
        json!({"prompt": "The capital of France is", "max_tokens": 3, "temperature": 0, "logit_bias": {"28": 100},
               "frequency_penalty": 0.5, "presence_penalty": 0.1, "repetition_penalty": 1.1, "prompt_logprobs": 1}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["choices"][0]["text"], ",,,", "bias +100 on ',' (28)");
    let plp = v["choices"][0]["prompt_logprobs"].as_array().unwrap();
    assert_eq!(plp.len(), 5);
    assert!(plp[0].is_null() && plp[1]["3575"]["logprob"].as_f64().unwrap() < 0.0, "{plp:?}");

    // Guided decoding: a choice, a regex, and chat's response_format json_object.
    let (s, v) = post(
        &c,
        &format!("{b}/v1/completions"),
        json!({"prompt": "The capital of France is", "max_tokens": 8, "temperature": 1.0, "seed": 3,
               "guided_choice": ["Paris", "Lyon"]}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(["Paris", "Lyon"].contains(&v["choices"][0]["text"].as_str().unwrap()), "{v}");
    let (s, v) = post(
        &c,
        &format!("{b}/v1/completions"),
        json!({"prompt": "Year:", "max_tokens": 8, "temperature": 1.0, "guided_regex": "(19|20)[0-9]{2}"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let year = v["choices"][0]["text"].as_str().unwrap();
    assert!(year.len() == 4 && (year.starts_with("19") || year.starts_with("20")), "{v}");
    // A Lark grammar (the guidance backend, picked by auto for grammars).
    let (s, v) = post(
        &c,
        &format!("{b}/v1/completions"),
        json!({"prompt": "Answer yes or no:", "max_tokens": 8, "temperature": 1.0, "seed": 5,
               "guided_grammar": "start: ANSWER \".\"\nANSWER: \"yes\" | \"no\""}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(["yes.", "no."].contains(&v["choices"][0]["text"].as_str().unwrap()), "{v}");
    let (s, v) = post(&c, &format!("{b}/v1/chat/completions"),
        json!({"messages": [{"role": "user", "content": "Give a JSON object with a name."}], "max_tokens": 200,
               "temperature": 0, "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema":
               {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}}, "required": ["name"]}}}})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let obj: Value = serde_json::from_str(v["choices"][0]["message"]["content"].as_str().unwrap()).unwrap();
    assert!(obj["name"].is_string(), "{v}");

    // A generative model has no embeddings.
    let (s, v) = post(&c, &format!("{b}/v1/embeddings"), json!({"input": "hi"})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_openai_error(&v, None);

    // Beam search through the completions API (vLLM's use_beam_search): n beams, best first,
    // equal to the engine's own beam search (tests/beam_search.rs checks it against HF).
    let (s, v) = post(
        &c,
        &format!("{b}/v1/completions"),
        json!({"prompt": "The capital of France is", "max_tokens": 6, "n": 2, "use_beam_search": true,
               "length_penalty": 1.0, "early_stopping": false}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    assert!(v["choices"][0]["text"].as_str().unwrap().contains("Paris"), "{v}");
    let (s, v) =
        post(&c, &format!("{b}/v1/completions"), json!({"prompt": "hi", "use_beam_search": true, "stream": true}))
            .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, v) = post(&c, &format!("{b}/v1/completions"), json!({"prompt": "hi", "length_penalty": 0.5})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_openai_error(&v, Some("length_penalty"));

    // Errors: right status, OpenAI shape, nothing panics.
    let raw = c
        .post(format!("{b}/v1/completions"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), StatusCode::BAD_REQUEST);
    assert_openai_error(&raw.json().await.unwrap(), None);
    let cases = [
        (json!({"prompt": 42}), StatusCode::BAD_REQUEST, Some("prompt")),
        (json!({"prompt": "hi", "temperature": "hot"}), StatusCode::BAD_REQUEST, None),
        (json!({"prompt": "hi", "model": "nope"}), StatusCode::NOT_FOUND, None),
        (json!({"prompt": "hi", "temperature": -1}), StatusCode::BAD_REQUEST, Some("temperature")),
        (json!({"prompt": "hi", "top_p": 2}), StatusCode::BAD_REQUEST, Some("top_p")),
        (json!({"prompt": "hi", "n": 2, "best_of": 1}), StatusCode::BAD_REQUEST, Some("best_of")),
        (json!({"prompt": "hi", "n": 0}), StatusCode::BAD_REQUEST, Some("n")),
        (json!({"prompt": "hi", "logprobs": 99}), StatusCode::BAD_REQUEST, Some("logprobs")),
        (json!({"prompt": "hi", "suffix": "x"}), StatusCode::BAD_REQUEST, Some("suffix")),
        (json!({"prompt": "hi", "guided_regex": "(a"}), StatusCode::BAD_REQUEST, Some("guided_regex")),
        (json!({"prompt": "hi", "guided_choice": []}), StatusCode::BAD_REQUEST, Some("guided_choice")),
        (json!({"prompt": "hi", "guided_grammar": "start: nope"}), StatusCode::BAD_REQUEST, Some("guided_grammar")),
        (
            json!({"prompt": "hi", "guided_regex": "a", "guided_decoding_backend": "xgrammar"}),
            StatusCode::BAD_REQUEST,
            Some("guided_decoding_backend"),
        ),
        (
            json!({"prompt": "hi", "guided_regex": "a", "guided_choice": ["a"]}),
            StatusCode::BAD_REQUEST,
            Some("guided_decoding"),
        ),
        (json!({"prompt": "hi", "logit_bias": {"99999999": 1}}), StatusCode::BAD_REQUEST, Some("logit_bias")),
        (json!({"prompt": "hi", "logit_bias": {"x": 1}}), StatusCode::BAD_REQUEST, Some("logit_bias")),
        (json!({"prompt": "hi", "stop": 5}), StatusCode::BAD_REQUEST, Some("stop")),
        (json!({"prompt": "hi", "presence_penalty": 9}), StatusCode::BAD_REQUEST, Some("presence_penalty")),
        (json!({"prompt": "word ".repeat(3000)}), StatusCode::BAD_REQUEST, Some("prompt")),
        (json!({"prompt": [1, 99999999]}), StatusCode::BAD_REQUEST, Some("prompt")),
        (json!({"prompt": "x".repeat(200_000)}), StatusCode::PAYLOAD_TOO_LARGE, None),
    ];
    for (body, status, param) in cases {
        let (s, v) = post(&c, &format!("{b}/v1/completions"), body.clone()).await;
        assert_eq!(s, status, "{body:.80} -> {v}");
        assert_openai_error(&v, param);
    }
    let (s, v) = post(&c, &format!("{b}/v1/chat/completions"), json!({"messages": []})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_openai_error(&v, Some("messages"));
    let (s, _) = post(
        &c,
        &format!("{b}/v1/chat/completions"),
        json!({"messages": msgs, "add_generation_prompt": true, "continue_final_message": true}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    // Client disconnect mid-stream aborts the request and frees its blocks.
    wait_idle(&c, &b).await;
    let mut r = c
        .post(format!("{b}/v1/completions"))
        .json(&json!({"prompt": "Tell me a long story.", "max_tokens": 1000, "ignore_eos": true, "stream": true}))
        .send()
        .await
        .unwrap();
    let first = r.chunk().await.unwrap().unwrap();
    assert!(!first.is_empty());
    assert!(metric(&c, &b, "vllm:kv_cache_usage_perc").await > 0.0, "the stream holds blocks while running");
    drop(r);
    wait_idle(&c, &b).await;

    // 64 concurrent streaming clients: all complete, nothing leaks.
    let mut tasks = Vec::new();
    for i in 0..64 {
        let c = c.clone();
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            let r = c.post(format!("{b}/v1/completions"))
                .json(&json!({"prompt": format!("Request {i}: the weather today is"), "max_tokens": 16, "ignore_eos": true, "stream": true, "seed": i}))
                .send().await.unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            let data = sse_data(&r.text().await.unwrap());
            assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
            assert!(data.iter().all(|d| !d.contains("\"error\"")));
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    wait_idle(&c, &b).await;

    // Metrics with vLLM's names.
    let text = c.get(format!("{b}/metrics")).send().await.unwrap().text().await.unwrap();
    for name in [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:time_to_first_token_seconds",
        "vllm:inter_token_latency_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
    ] {
        assert!(text.contains(name), "metric {name} missing");
    }
    assert!(metric(&c, &b, "vllm:generation_tokens_total").await >= 64.0 * 16.0);

    // curl, as in vLLM's quickstart.
    let out = Command::new("curl")
        .args([
            "-sS",
            &format!("{b}/v1/completions"),
            "-H",
            "Content-Type: application/json",
            "-H",
            &format!("Authorization: Bearer {KEY}"),
        ])
        .args(["-d", r#"{"model": "smol", "prompt": "The capital of France is", "max_tokens": 5, "temperature": 0}"#])
        .output()
        .expect("curl must be installed for the end-to-end tests");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("curl output {e}: {:?}", out));
    assert_eq!(v["choices"][0]["text"], full_text.as_str());

    // The official `openai` Python client (installed into .venv by `cargo xtask test`).
    let log = common::openai_script("openai_client.py", &[&b, KEY]);
    eprintln!("{}", log.trim());
    wait_idle(&c, &b).await;

    // Graceful shutdown on SIGTERM: exit code 0.
    let mut server = server;
    let pid = server.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let t = Instant::now();
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "server did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "exit status {status}");
}
