//! Reasoning output through the real server, vLLM's way (`--reasoning-parser`):
//! - the thinking comes back as `reasoning` (and `reasoning_content`), the answer as
//!   `content`, streamed and not, assembling to the same split; `include_reasoning: false`
//!   leaves it out. The model is made to write each fixture with a one-choice constraint that
//!   applies from the first token (`--structured-outputs-config '{"enable_in_reasoning": true}'`);
//! - by default a constraint waits for the end of the thinking (the default model never
//!   writes `</think>`, so it runs free to `max_tokens`), and applies at once when the prompt
//!   closed the thinking (Qwen3's `enable_thinking: false` form);
//! - a template that opens the thinking makes the output's start reasoning.

mod common;

use common::{client, post, start};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// A streamed chat response's reasoning and content, assembled from their deltas; also
/// whether any content came before the last reasoning delta.
async fn streamed(c: &reqwest::Client, url: &str, body: Value) -> (String, String, bool) {
    let text = c.post(url).json(&body).send().await.unwrap().text().await.unwrap();
    let (mut reasoning, mut content, mut out_of_order) = (String::new(), String::new(), false);
    for v in common::sse_chunks(&text) {
        for ch in v["choices"].as_array().unwrap() {
            let d = &ch["delta"];
            if let Some(r) = d["reasoning"].as_str() {
                assert_eq!(d["reasoning_content"], d["reasoning"], "{d}");
                out_of_order |= !content.is_empty();
                reasoning.push_str(r);
            }
            if let Some(t) = d["content"].as_str() {
                content.push_str(t);
            }
        }
    }
    (reasoning, content, out_of_order)
}

fn ask(fixture: &str) -> Value {
    json!({"messages": [{"role": "user", "content": "What is 2 + 2?"}], "max_tokens": 60,
           "structured_outputs": {"choice": [fixture]}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thinking_is_split_from_the_answer_streamed_and_not() {
    let cases: [(&str, &str, &str, &str); 3] = [
        ("deepseek_r1", "Let me add: 2 and 2.\n</think>\n\nIt is 4.", "Let me add: 2 and 2.\n", "\n\nIt is 4."),
        ("qwen3", "<think>\nSimple sum.\n</think>\n\nFour.", "\nSimple sum.\n", "\n\nFour."),
        ("mistral", "[THINK]2+2[/THINK]4", "2+2", "4"),
    ];
    for (parser, fixture, want_reasoning, want_content) in cases {
        let server =
            start(&["--reasoning-parser", parser, "--structured-outputs-config", r#"{"enable_in_reasoning": true}"#])
                .await;
        let (c, url) = (client(), format!("{}/v1/chat/completions", server.base));
        let (s, v) = post(&c, &url, ask(fixture)).await;
        assert_eq!(s, StatusCode::OK, "{parser}: {v}");
        let m = &v["choices"][0]["message"];
        assert_eq!(m["reasoning"], want_reasoning, "{parser}: {v}");
        assert_eq!(m["reasoning_content"], want_reasoning, "{parser}: {v}");
        assert_eq!(m["content"], want_content, "{parser}: {v}");

        let mut body = ask(fixture);
        body["stream"] = json!(true);
        let (r, content, out_of_order) = streamed(&c, &url, body).await;
        assert_eq!((r.as_str(), content.as_str()), (want_reasoning, want_content), "{parser} streamed");
        assert!(!out_of_order, "{parser}: reasoning deltas came after content");

        if parser == "qwen3" {
            // The official openai client reads the split too (extra fields it keeps).
            common::openai_script("openai_reasoning.py", &[&server.base, common::KEY]);
        }

        let mut body = ask(fixture);
        body["include_reasoning"] = json!(false);
        let (_, v) = post(&c, &url, body).await;
        let m = &v["choices"][0]["message"];
        assert!(m.get("reasoning").is_none() && m.get("reasoning_content").is_none(), "{parser}: {v}");
        assert_eq!(m["content"], want_content, "{parser}: {v}");
    }

    // Without a parser the tags are plain text.
    let server = start(&[]).await;
    let (s, v) = post(&client(), &format!("{}/v1/chat/completions", server.base), ask("<think>a</think>b")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["choices"][0]["message"]["content"], "<think>a</think>b");
    assert!(v["choices"][0]["message"].get("reasoning").is_none(), "{v}");
}

/// A ChatML template whose generation prompt opens (`open`) or closes (`closed`) the thinking.
fn template(generation_prompt: &str) -> String {
    format!(
        "{{% for m in messages %}}<|im_start|>{{{{ m.role }}}}\n{{{{ m.content }}}}<|im_end|>\n{{% endfor %}}\
         {{% if add_generation_prompt %}}<|im_start|>assistant\n{generation_prompt}{{% endif %}}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn constraints_wait_for_the_end_of_the_thinking() {
    let server = start(&["--reasoning-parser", "qwen3"]).await;
    let (c, url) = (client(), format!("{}/v1/chat/completions", server.base));
    let poem = |tpl: Option<String>| {
        let mut b = json!({"messages": [{"role": "user", "content": "Write a long poem about the sea."}],
                           "max_tokens": 12, "temperature": 0, "structured_outputs": {"choice": ["yes"]}});
        if let Some(t) = tpl {
            b["chat_template"] = json!(t);
        }
        b
    };
    // The thinking is still to come (the prompt says nothing): the model runs free.
    let (s, v) = post(&c, &url, poem(None)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length", "the constraint applied too early: {v}");
    assert_ne!(v["choices"][0]["message"]["content"], "yes", "{v}");
    // The prompt closed the thinking (enable_thinking: false): constrained from the start.
    let (s, v) = post(&c, &url, poem(Some(template("<think>\n\n</think>\n\n")))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], "yes", "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    assert!(v["choices"][0]["message"].get("reasoning").is_none(), "{v}");
    // The prompt opened the thinking: what the model writes first is reasoning.
    let (s, v) = post(&c, &url, poem(Some(template("<think>\n")))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let m = &v["choices"][0]["message"];
    assert!(m["reasoning"].as_str().is_some_and(|r| !r.is_empty()), "{v}");
    assert!(m["content"].is_null(), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_parsers_and_settings_stop_the_start() {
    for args in [
        &["--reasoning-parser", "nope"][..],
        &["--structured-outputs-config", r#"{"enable_in_reasoning": "yes"}"#][..],
        &["--structured-outputs-config", "not json"][..],
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_vllm-server")).args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(args[0]), "{args:?}: {err}");
    }
}
