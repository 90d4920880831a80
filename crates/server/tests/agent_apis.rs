//! OpenAI's Responses API and Anthropic's Messages API against the real binary: the official
//! `openai` and `anthropic` Python clients (installed into `.venv` by `cargo xtask test`) read
//! every answer into their own types; hostile inputs on the new routes get 4xx before any
//! work, the response store stays bounded and scoped to its key, and capacity is a 503 in each
//! API's error shape.

mod common;

use std::time::{Duration, Instant};

use common::{client, openai_script, post, start, wait_idle, KEY};
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};

/// A second API key: its responses and the first key's are invisible to each other.
const OTHER: &str = "other-key-456";

fn client_with(key: &str) -> Client {
    let mut h = reqwest::header::HeaderMap::new();
    h.insert("authorization", format!("Bearer {key}").parse().unwrap());
    Client::builder().default_headers(h).pool_max_idle_per_host(0).build().unwrap()
}

/// An error in Anthropic's shape, of `kind`.
fn assert_anthropic_error(status: StatusCode, v: &Value, want: StatusCode, kind: &str) {
    assert_eq!(status, want, "{v}");
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], kind, "{v}");
    assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
}

/// An error in OpenAI's shape naming `param`.
fn assert_openai_error(status: StatusCode, v: &Value, want: StatusCode, param: Option<&str>) {
    assert_eq!(status, want, "{v}");
    assert_eq!(v["error"]["code"], want.as_u16(), "{v}");
    if let Some(p) = param {
        assert_eq!(v["error"]["param"], p, "{v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn responses_through_the_official_openai_client() {
    let server = start(&[]).await;
    let log = openai_script("openai_responses.py", &[&server.base, KEY]);
    eprintln!("{}", log.trim());
    wait_idle(&client(), &server.base, Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messages_through_the_official_anthropic_client() {
    let server = start(&[]).await;
    let log = openai_script("anthropic_messages.py", &[&server.base, KEY]);
    eprintln!("{}", log.trim());
    wait_idle(&client(), &server.base, Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_inputs_on_the_agent_routes() {
    let server = start(&[
        "--api-key",
        OTHER,
        "--max-model-len",
        "512",
        "--max-num-seqs",
        "1",
        "--max-waiting-requests",
        "0",
        "--responses-store-max-entries",
        "16",
    ])
    .await;
    let (c, other, b) = (client(), client_with(OTHER), server.base.clone());
    let (responses, messages) = (format!("{b}/v1/responses"), format!("{b}/v1/messages"));
    let rss_start = server.rss_mib();

    // 10^5 input items, messages or blocks: 400 naming the field, before any work.
    let t = Instant::now();
    let items: Vec<Value> = (0..100_000).map(|_| json!({"role": "user", "content": "x"})).collect();
    let (s, v) = post(&c, &responses, json!({"model": "smol", "input": items})).await;
    assert_openai_error(s, &v, StatusCode::BAD_REQUEST, Some("input"));
    let (s, v) = post(&c, &messages, json!({"model": "smol", "max_tokens": 4, "messages": items})).await;
    assert_anthropic_error(s, &v, StatusCode::BAD_REQUEST, "invalid_request_error");
    let blocks: Vec<Value> = (0..100_000).map(|_| json!({"type": "text", "text": "x"})).collect();
    let one = json!([{"role": "user", "content": blocks}]);
    let (s, v) = post(&c, &messages, json!({"model": "smol", "max_tokens": 4, "messages": one})).await;
    assert_anthropic_error(s, &v, StatusCode::BAD_REQUEST, "invalid_request_error");
    assert!(t.elapsed() < Duration::from_secs(10), "counting took {:?}", t.elapsed());

    // 10 MB of tool output: 4xx (the prompt could never fit), memory bounded.
    let big = "x".repeat(10 << 20);
    let input = json!([
        {"role": "user", "content": "Weather?"},
        {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": big},
    ]);
    let (s, v) = post(&c, &responses, json!({"model": "smol", "input": input})).await;
    assert!(s.is_client_error(), "{s} {v}");
    let conversation = json!([
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "w", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": big}]},
    ]);
    let (s, v) = post(&c, &messages, json!({"model": "smol", "max_tokens": 4, "messages": conversation})).await;
    assert!(s.is_client_error(), "{s} {v}");
    assert_eq!(v["type"], "error", "{v}");
    let grown = server.rss_mib() - rss_start;
    assert!(grown < 400.0, "10 MB inputs grew the server by {grown:.0} MiB");

    // A stored response is its key's: another key gets the 404 an unknown id gets.
    let (s, v) = post(&c, &responses, json!({"model": "smol", "input": "Hi", "max_output_tokens": 2})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let r = c.get(format!("{responses}/{id}")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    for req in [
        other.get(format!("{responses}/{id}")),
        other.post(format!("{responses}/{id}/cancel")),
        other.delete(format!("{responses}/{id}")),
        other.post(&responses).json(&json!({"model": "smol", "input": "x", "previous_response_id": id})),
    ] {
        let r = req.send().await.unwrap();
        let s = r.status();
        assert_openai_error(s, &r.json().await.unwrap(), StatusCode::NOT_FOUND, None);
    }
    assert_eq!(c.get(format!("{responses}/{id}")).send().await.unwrap().status(), StatusCode::OK);
    let (s, v) = post(&c, &responses, json!({"model": "smol", "input": "x", "background": true, "store": false})).await;
    assert_openai_error(s, &v, StatusCode::BAD_REQUEST, Some("background"));

    // A previous_response_id chain: each link's conversation grows, so a chain ends with a
    // 400 once it cannot fit the context (here 512 tokens), never later than the message
    // limit; the store keeps only the newest 16.
    let t = Instant::now();
    let mut chain = vec![id];
    let last = loop {
        assert!(chain.len() < 10_000, "the chain never ended");
        let body =
            json!({"model": "smol", "input": "Hi", "max_output_tokens": 1, "previous_response_id": chain.last()});
        let (s, v) = post(&c, &responses, body).await;
        if s != StatusCode::OK {
            break (s, v);
        }
        chain.push(v["id"].as_str().unwrap().to_string());
    };
    assert_eq!(last.0, StatusCode::BAD_REQUEST, "{}", last.1);
    assert!(chain.len() > 16 && chain.len() < 300, "{} links", chain.len());
    eprintln!("a chain of {} links ended with {} in {:?}", chain.len(), last.1, t.elapsed());
    let status = |id: &str| c.get(format!("{responses}/{id}")).send();
    assert_eq!(status(&chain[0]).await.unwrap().status(), StatusCode::NOT_FOUND, "evicted");
    assert_eq!(status(chain.last().unwrap()).await.unwrap().status(), StatusCode::OK);

    // Keys: x-api-key as well as Bearer; errors on /v1/messages in Anthropic's shape.
    let count = json!({"model": "smol", "messages": [{"role": "user", "content": "Hi"}]});
    let r = Client::new().post(format!("{messages}/count_tokens")).header("x-api-key", OTHER).json(&count);
    let v: Value = r.send().await.unwrap().json().await.unwrap();
    assert!(v["input_tokens"].as_u64().unwrap() > 0, "{v}");
    let r = Client::new().post(format!("{messages}/count_tokens")).json(&count).send().await.unwrap();
    let s = r.status();
    assert_anthropic_error(s, &r.json().await.unwrap(), StatusCode::UNAUTHORIZED, "authentication_error");
    let r = Client::new().post(&responses).header("x-api-key", "wrong").json(&count).send().await.unwrap();
    let s = r.status();
    assert_openai_error(s, &r.json().await.unwrap(), StatusCode::UNAUTHORIZED, None);
    let r = c.post(format!("{messages}/nope")).json(&count).send().await.unwrap();
    let s = r.status();
    assert_anthropic_error(s, &r.json().await.unwrap(), StatusCode::NOT_FOUND, "not_found_error");

    // Capacity: one slot, no queue. A background response holds it; both routes answer 503
    // (with Retry-After) in their shapes; cancelling frees it.
    let long = json!({"model": "smol", "input": "Tell a story.", "background": true, "max_output_tokens": 400,
                      "ignore_eos": true});
    let (s, v) = post(&c, &responses, long).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let bg = v["id"].as_str().unwrap().to_string();
    let t = Instant::now();
    while common::metric(&c, &b, "vllm:num_requests_running").await < 1.0 {
        assert!(t.elapsed() < Duration::from_secs(30), "the background response never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = c.post(&responses).json(&json!({"model": "smol", "input": "Hi", "max_output_tokens": 1})).send();
    let r = r.await.unwrap();
    assert_eq!(r.headers().get("retry-after").and_then(|h| h.to_str().ok()), Some("1"));
    let s = r.status();
    assert_openai_error(s, &r.json().await.unwrap(), StatusCode::SERVICE_UNAVAILABLE, None);
    let body = json!({"model": "smol", "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]});
    let (s, v) = post(&c, &messages, body).await;
    assert_anthropic_error(s, &v, StatusCode::SERVICE_UNAVAILABLE, "overloaded_error");
    let (s, v) = post(&c, &format!("{responses}/{bg}/cancel"), json!({})).await;
    assert_eq!((s, v["status"].as_str()), (StatusCode::OK, Some("cancelled")), "{v}");
    wait_idle(&c, &b, Duration::from_secs(10)).await;

    // Still serving.
    let (s, v) = post(&c, &responses, json!({"model": "smol", "input": "Hi", "max_output_tokens": 2})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(reqwest::get(format!("{b}/health")).await.unwrap().status(), StatusCode::OK);
}

/// With `--reasoning-parser` and `--tool-call-parser`, a Responses output's thinking is a
/// `reasoning` item and its parsed call a `function_call` item, streamed and not alike. The
/// model is made to write the fixture with a one-choice constraint from its first token.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reasoning_and_parsed_calls_become_items() {
    let server = start(&[
        "--reasoning-parser",
        "qwen3",
        "--structured-outputs-config",
        r#"{"enable_in_reasoning": true}"#,
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        "hermes",
    ])
    .await;
    let (c, url) = (client(), format!("{}/v1/responses", server.base));
    let fixture = "<think>\nThe tool knows.\n</think>\n\n\
                   <tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}</tool_call>";
    let tool = json!({"type": "function", "name": "get_weather",
                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}});
    let body = json!({"model": "smol", "input": "Weather in Paris?", "tools": [tool], "max_output_tokens": 200,
                      "structured_outputs": {"choice": [fixture]}});
    // Items without their random ids.
    let shape = |output: &Value| -> Vec<Value> {
        output
            .as_array()
            .unwrap()
            .iter()
            .map(|i| match i["type"].as_str().unwrap() {
                "reasoning" => json!(["reasoning", i["content"][0]["text"]]),
                "function_call" => json!(["function_call", i["name"], i["arguments"], i["status"]]),
                other => json!([other, i["content"]]),
            })
            .collect()
    };
    let want = vec![
        json!(["reasoning", "\nThe tool knows.\n"]),
        json!(["function_call", "get_weather", "{\"city\":\"Paris\"}", "completed"]),
    ];

    let (s, v) = post(&c, &url, body.clone()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(shape(&v["output"]), want, "{v}");

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let text = c.post(&url).json(&streamed).send().await.unwrap().text().await.unwrap();
    let events = common::sse_chunks(&text);
    let names: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    let numbers: Vec<u64> = events.iter().map(|e| e["sequence_number"].as_u64().unwrap()).collect();
    assert_eq!(numbers, (0..events.len() as u64).collect::<Vec<_>>());
    for name in
        ["response.reasoning_text.delta", "response.reasoning_text.done", "response.function_call_arguments.done"]
    {
        assert!(names.contains(&name), "{name} missing: {names:?}");
    }
    let reasoning: String = events
        .iter()
        .filter(|e| e["type"] == "response.reasoning_text.delta")
        .map(|e| e["delta"].as_str().unwrap())
        .collect();
    assert_eq!(reasoning, "\nThe tool knows.\n");
    let done = events.last().unwrap();
    assert_eq!(done["type"], "response.completed");
    assert_eq!(shape(&done["response"]["output"]), want, "{done}");
    // Each item's events carry its own output_index.
    for e in events.iter().filter(|e| e["type"] == "response.output_item.done") {
        let i = e["output_index"].as_u64().unwrap() as usize;
        assert_eq!(shape(&json!([e["item"]]))[0], want[i], "{e}");
    }

    // include_reasoning: false leaves the thinking out.
    let mut quiet = body;
    quiet["include_reasoning"] = json!(false);
    let (s, v) = post(&c, &url, quiet).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(shape(&v["output"]), want[1..], "{v}");
}
