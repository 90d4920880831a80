//! `--speculative-config` through the real binary: vLLM's JSON on the launch line, the same
//! completions as a server without it, vLLM's `vllm:spec_decode_*` counters, and a bad config
//! refused at start naming the key.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{client, metric, post, start, wait_idle};
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn completions_match_and_spec_metrics_count() {
    let spec = start(&[
        "--speculative-config",
        r#"{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 2}"#,
    ])
    .await;
    let plain = start(&[]).await;
    let c = client();
    let passage = "The river runs past the old mill, under the stone bridge, and into the town square.";
    let body = json!({
        "model": "smol",
        "messages": [{"role": "user", "content": format!("Repeat this text exactly: {passage}")}],
        "max_tokens": 40,
        "temperature": 0,
        "logprobs": true,
        "top_logprobs": 2,
    });
    let (s1, a) = post(&c, &format!("{}/v1/chat/completions", spec.base), body.clone()).await;
    let (s2, b) = post(&c, &format!("{}/v1/chat/completions", plain.base), body).await;
    assert_eq!((s1.as_u16(), s2.as_u16()), (200, 200), "{a} {b}");
    assert_eq!(a["choices"], b["choices"]);
    assert_eq!(a["usage"]["completion_tokens"], b["usage"]["completion_tokens"]);
    // Streamed: the same text, delta by delta.
    let stream = json!({"model": "smol", "prompt": format!("{passage} {passage}"), "max_tokens": 30, "temperature": 0, "stream": true});
    let text = |base: String, body: serde_json::Value| {
        let c = c.clone();
        async move {
            let r = c.post(format!("{base}/v1/completions")).json(&body).send().await.unwrap();
            let t = r.text().await.unwrap();
            common::sse_chunks(&t)
                .iter()
                .filter_map(|v| v["choices"][0]["text"].as_str().map(String::from))
                .collect::<String>()
        }
    };
    assert_eq!(text(spec.base.clone(), stream.clone()).await, text(plain.base.clone(), stream).await);
    wait_idle(&c, &spec.base, Duration::from_secs(10)).await;
    let drafts = metric(&c, &spec.base, "vllm:spec_decode_num_drafts_total").await;
    let draft_tokens = metric(&c, &spec.base, "vllm:spec_decode_num_draft_tokens_total").await;
    let accepted = metric(&c, &spec.base, "vllm:spec_decode_num_accepted_tokens_total").await;
    let first = metric(&c, &spec.base, "vllm:spec_decode_num_accepted_tokens_per_pos_total{position=\"0\"}").await;
    assert!(
        drafts > 0.0 && draft_tokens >= drafts && accepted > 0.0 && accepted <= draft_tokens,
        "{drafts} {draft_tokens} {accepted}"
    );
    assert!(first > 0.0 && first <= drafts, "{first}");
    // Without speculation there are no such series.
    assert!(metric(&c, &plain.base, "vllm:spec_decode_num_drafts_total").await.is_nan());
}

#[test]
fn a_bad_speculative_config_fails_at_start_naming_the_key() {
    for (config, named) in [
        (r#"{"method": "ngram", "num_speculative_tokens": 3, "lookahead": 2}"#, "lookahead"),
        (r#"{"method": "telepathy"}"#, "telepathy"),
        (r#"{"method": "ngram"}"#, "num_speculative_tokens"),
        ("not json", "speculative"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_vllm-server"))
            .args(["serve", "/nonexistent/model.gguf", "--speculative-config", config])
            .output()
            .expect("run vllm-server");
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(named) && err.contains("--speculative-config"), "{config}: {err}");
    }
}
