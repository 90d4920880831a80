//! `vllm-server run-batch`: vLLM's batch runner over the OpenAI batch file format. Every line
//! goes through the same route handlers as HTTP requests (in process, no socket), all at once,
//! so the engine batches them.

use std::path::Path;

use anyhow::{Context, Result};
use axum::body::Body;
use axum::http::Request;
use axum::Router;
use futures::future::join_all;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};
use tower::ServiceExt;

async fn one(router: Router, line_no: usize, line: String, bar: ProgressBar) -> Value {
    let out = async {
        let req: Value = serde_json::from_str(&line).map_err(|e| format!("line {line_no}: invalid JSON: {e}"))?;
        let custom_id = req.get("custom_id").cloned().unwrap_or(Value::Null);
        let url = req.get("url").and_then(|u| u.as_str()).unwrap_or_default().to_string();
        if !matches!(url.as_str(), "/v1/completions" | "/v1/chat/completions") {
            return Ok(json!({"id": format!("batch-{line_no}"), "custom_id": custom_id, "response": null,
                "error": {"message": format!("unsupported url '{url}' (use /v1/completions or /v1/chat/completions)")}}));
        }
        let body = req.get("body").cloned().unwrap_or(Value::Null);
        let http = Request::post(&url).header("content-type", "application/json").body(Body::from(body.to_string())).map_err(|e| e.to_string())?;
        let resp = router.oneshot(http).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.map_err(|e| e.to_string())?;
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let request_id = body.get("id").cloned().unwrap_or(Value::Null);
        Ok::<Value, String>(json!({"id": format!("batch-{line_no}"), "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": body}, "error": null}))
    }
    .await
    .unwrap_or_else(|e| json!({"id": format!("batch-{line_no}"), "custom_id": null, "response": null, "error": {"message": e}}));
    bar.inc(1);
    out
}

/// Runs every request of `input`, writes one result line per request (in input order).
pub async fn run(router: Router, input: &Path, output: &Path) -> Result<()> {
    let text = std::fs::read_to_string(input).with_context(|| format!("reading {}", input.display()))?;
    let lines: Vec<(usize, String)> =
        text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()).map(|(i, l)| (i + 1, l.to_string())).collect();
    let bar = ProgressBar::with_draw_target(Some(lines.len() as u64), ProgressDrawTarget::stderr());
    bar.set_style(ProgressStyle::with_template(
        "Running batch: {percent:>3}%|{wide_bar}| {pos}/{len} [{elapsed_precise}<{eta_precise}]",
    )?);
    let results = join_all(lines.into_iter().map(|(n, l)| one(router.clone(), n, l, bar.clone()))).await;
    bar.finish_and_clear();
    let mut out = String::new();
    for r in &results {
        out.push_str(&r.to_string());
        out.push('\n');
    }
    std::fs::write(output, out).with_context(|| format!("writing {}", output.display()))?;
    tracing::info!("wrote {} results to {}", results.len(), output.display());
    Ok(())
}
