//! Logs through `tracing`: human-readable text (the default) or one JSON object per line
//! (`--log-format json`). `RUST_LOG` filters as usual (default `info`).

use anyhow::{bail, Result};
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber; `log_requests: false` silences the per-request lines and
/// `log_stats: false` the periodic statistics line; `level` (vLLM's `--uvicorn-log-level`: critical, error, warning, info, debug, trace) sets
/// the level.
pub fn init(format: &str, log_requests: bool, log_stats: bool, level: Option<&str>) -> Result<()> {
    let level = match level.map(str::to_ascii_lowercase).as_deref() {
        None | Some("info") => "info",
        Some("critical" | "error") => "error",
        Some("warning" | "warn") => "warn",
        Some("debug") => "debug",
        Some("trace") => "trace",
        Some(other) => bail!("--uvicorn-log-level: '{other}' (critical, error, warning, info, debug, trace)"),
    };
    let mut default = level.to_string();
    if !log_requests {
        default.push_str(",vllm_engine::requests=off,vllm_server::requests=off");
    }
    if !log_stats {
        default.push_str(",vllm_engine::stats=off");
    }
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let installed = match format {
        "text" => builder.with_target(false).try_init(),
        "json" => builder.json().flatten_event(true).with_current_span(true).with_span_list(false).try_init(),
        other => bail!("--log-format: '{other}' (choose text or json)"),
    };
    // A second server in one process (tests) keeps the first subscriber.
    let _ = installed;
    Ok(())
}
