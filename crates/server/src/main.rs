//! `vllm-server`: the OpenAI-compatible HTTP server of vllm-rs.
//!
//! `cargo run --release -p vllm-server` serves the default model (SmolLM2-135M-Instruct) on
//! 127.0.0.1:8000. Flags follow vLLM's (`--model`, `--port`, `--api-key`, ...); `--help`
//! lists them.
//!
//! | module | holds |
//! |--------|-------|
//! | `cli` | the command line (the engine's `EngineArgs` flattened in) |
//! | `app` | the shared state, the router, serving and shutdown |
//! | `conn` | the accept loop: connection and TLS-handshake admission, deadlines |
//! | `validate` | each route family's one conversion from its wire request to the engine's |
//! | `routes` | thin handlers: validate, submit, render |
//! | `render` | engine outputs as responses and server-sent events |
//! | `responses`, `messages` | OpenAI's Responses API and Anthropic's Messages API, converted into chat requests |
//! | `pieces` | a chat output as typed pieces (reasoning, text, tool calls), what those two render |
//! | `protocol`, `api` | the wire types (requests; responses and stream chunks) and the OpenAPI document |
//! | `tools`, `reasoning` | the tool-call and reasoning parser registries |

mod api;
mod app;
mod batch;
mod cli;
mod conn;
mod error;
mod logging;
mod messages;
mod net;
mod pieces;
mod protocol;
mod reasoning;
mod render;
mod responses;
mod routes;
mod score;
mod state;
mod tools;
mod validate;

use anyhow::{Context, Result};
use clap::{CommandFactory, FromArgMatches};

use crate::cli::{Cli, Command, GpuCheckArgs, ServeCmd};

/// Runs the acceptance checks; fails when one fails.
fn gpu_check(a: GpuCheckArgs) -> Result<()> {
    let opts = vllm_engine::gpu_check::GpuCheckOptions {
        device: a.device,
        fixtures: a.fixtures,
        bench_model: a.bench_model,
        bench_prompts: a.bench_prompts,
        bench_len: (a.bench_input_len, a.bench_output_len),
        only: a.only,
    };
    let report = vllm_engine::gpu_check::run(&opts)?;
    if let Some(path) = a.report {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if !report.passed() {
        anyhow::bail!("{} of {} checks failed", report.checks.iter().filter(|c| !c.pass).count(), report.checks.len());
    }
    Ok(())
}

/// A failing start prints its error and the causes under it on one line each, never a
/// backtrace (even with RUST_BACKTRACE set), and exits 1.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let sub_matches = matches.subcommand().map_or(&matches, |(_, m)| m);
    let command = match cli.command {
        Some(Command::GpuCheck(a)) => {
            logging::init("text", false, false, None)?;
            return gpu_check(a);
        }
        Some(Command::Serve(c)) => Command::Serve(ServeCmd { model_tag: None, args: c.into_args() }),
        Some(c) => c,
        None => Command::Serve(ServeCmd { model_tag: None, args: cli.serve }),
    };
    let serve_args = match &command {
        Command::Serve(c) => &c.args,
        Command::RunBatch(b) => &b.serve,
        Command::GpuCheck(_) => unreachable!("handled above"),
    };
    logging::init(
        &serve_args.log_format,
        !serve_args.disable_log_requests,
        !serve_args.compat.disable_log_stats,
        serve_args.compat.uvicorn_log_level.as_deref(),
    )?;
    serve_args.compat.check(&serve_args.engine, sub_matches)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match command {
        Command::GpuCheck(a) => gpu_check(a),
        Command::Serve(c) => rt.block_on(app::serve(c.args)),
        Command::RunBatch(b) => rt.block_on(async {
            let mut serve = b.serve.clone();
            serve.api_key = Vec::new();
            let state = app::build_state(&serve, None).await?;
            let engine = state.engine.clone();
            let r = batch::run(app::router(state, usize::MAX, false), &b.input, &b.output).await;
            if let Some(engine) = engine {
                tokio::task::spawn_blocking(move || engine.shutdown()).await?;
            }
            r
        }),
    }
}
