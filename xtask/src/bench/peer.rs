//! The servers a benchmark runs: ours (the release `vllm-server` binary) and llama.cpp's own
//! C++ `llama-server`, built once from the llama.cpp sources vendored in the PyPI sdist of
//! `llama-cpp-python` (cmake and ninja come from PyPI too) into the project cache.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::dataset::BenchRequest;
use super::serve::{one, ServeConfig};

/// The llama-cpp-python release whose vendored llama.cpp we build.
pub const LLAMA_CPP_PYTHON: &str = "0.3.36";

const NO_AMX: &str = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16";

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    eprintln!("xtask bench: {what}");
    let status = cmd.status().with_context(|| format!("starting: {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// `<cache>/peers/llama.cpp-<version>/bin/llama-server`, building it (with `llama-bench` and
/// `llama-quantize`, which `scripts/make_random_llama_gguf.py` uses) on first use (about ten
/// minutes on two cores). The build log is kept next to it.
pub fn llama_server() -> Result<PathBuf> {
    let root = vllm_engine::cache_dir().join("peers");
    let out = root.join(format!("llama.cpp-{LLAMA_CPP_PYTHON}"));
    let bin = out.join("bin").join("llama-server");
    if bin.exists() && out.join("bin").join("llama-quantize").exists() {
        return Ok(bin);
    }
    std::fs::create_dir_all(&root)?;
    eprintln!(
        "xtask bench: building llama.cpp's llama-server (from the llama-cpp-python=={LLAMA_CPP_PYTHON} sdist) into {}; \
         this takes about ten minutes once",
        out.display()
    );
    let venv = root.join("buildenv");
    if !venv.join("bin").join("cmake").exists() {
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv), "creating a venv for cmake and ninja")?;
        run(
            Command::new(venv.join("bin").join("python")).args(["-m", "pip", "install", "-q", "cmake", "ninja"]),
            "pip install cmake ninja",
        )?;
    }
    let sdist_dir = root.join("sdist");
    let tarball = sdist_dir.join(format!("llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"));
    if !tarball.exists() {
        run(
            Command::new("python3")
                .args(["-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python", "-d"])
                .arg(&sdist_dir)
                .arg(format!("llama-cpp-python=={LLAMA_CPP_PYTHON}")),
            "pip download the llama-cpp-python sdist",
        )?;
    }
    let src = root.join("src");
    std::fs::create_dir_all(&src)?;
    run(Command::new("tar").arg("xzf").arg(&tarball).arg("-C").arg(&src), "unpacking the sdist")?;
    let llama = src.join(format!("llama_cpp_python-{LLAMA_CPP_PYTHON}")).join("vendor").join("llama.cpp");
    let build = root.join(format!("build-{LLAMA_CPP_PYTHON}"));
    let path = format!("{}:{}", venv.join("bin").display(), std::env::var("PATH").unwrap_or_default());
    run(
        Command::new(venv.join("bin").join("cmake"))
            .env("PATH", &path)
            .arg("-S")
            .arg(&llama)
            .arg("-B")
            .arg(&build)
            .args(["-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF"])
            .args([
                "-DBUILD_SHARED_LIBS=OFF",
                "-DLLAMA_BUILD_TESTS=OFF",
                "-DLLAMA_BUILD_EXAMPLES=OFF",
                "-DLLAMA_OPENSSL=OFF",
            ])
            // Native flags, minus AMX: ggml's AMX matmul crashes (SIGSEGV in
            // ggml_backend_amx_mul_mat) on this machine's CPU, which reports AMX.
            .arg(format!("-DCMAKE_C_FLAGS={NO_AMX}"))
            .arg(format!("-DCMAKE_CXX_FLAGS={NO_AMX}"))
            .stdout(Stdio::null()),
        "cmake configure (llama.cpp, Release, CPU)",
    )?;
    run(
        Command::new(venv.join("bin").join("cmake"))
            .env("PATH", &path)
            .arg("--build")
            .arg(&build)
            .args(["--target", "llama-server", "llama-bench", "llama-quantize", "-j"])
            .arg(std::thread::available_parallelism().map_or(2, |n| n.get()).to_string())
            .stdout(Stdio::null()),
        "cmake --build (llama-server, llama-bench, llama-quantize)",
    )?;
    std::fs::create_dir_all(out.join("bin"))?;
    for b in ["llama-server", "llama-bench", "llama-quantize"] {
        std::fs::copy(build.join("bin").join(b), out.join("bin").join(b))?;
    }
    Ok(bin)
}

/// Our release server binary, built if needed.
pub fn our_server() -> Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--release", "--quiet", "-p", "vllm-server"])
            .current_dir(&root),
        "cargo build --release -p vllm-server",
    )?;
    Ok(crate::target_dir().join("release").join("vllm-server"))
}

/// Both engines' versions for a report: ours (the workspace version and the checkout's commit,
/// `-dirty` with uncommitted changes) and llama.cpp's (what its `llama-server --version` says,
/// and the sdist it was built from); a peer that is not built yet is reported as such.
pub fn versions() -> serde_json::Value {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(&root)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    let ours = format!("{} ({commit}{})", env!("CARGO_PKG_VERSION"), if dirty { "-dirty" } else { "" });
    let bin = vllm_engine::cache_dir().join("peers").join(format!("llama.cpp-{LLAMA_CPP_PYTHON}")).join("bin");
    let theirs = Command::new(bin.join("llama-server"))
        .arg("--version")
        .output()
        .ok()
        .map(|o| {
            let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
            text.lines().find(|l| l.starts_with("version")).unwrap_or("version unknown").trim().to_string()
        })
        .map(|v| format!("{v}, from the llama-cpp-python=={LLAMA_CPP_PYTHON} sdist, native flags minus AMX"))
        .unwrap_or_else(|| "not built".into());
    serde_json::json!({"vllm-rs": ours, "llama.cpp": theirs})
}

/// A free local port.
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A running server, killed on drop.
pub struct Server {
    /// Its label in reports.
    pub name: String,
    /// `http://127.0.0.1:<port>`.
    pub base_url: String,
    /// Process start to the first streamed token of a first request, seconds.
    pub cold_start: f64,
    /// The command line it was started with (program first), for the report.
    pub command: Vec<String>,
    child: Child,
}

impl Server {
    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Which engine to start.
#[derive(Debug, Clone)]
pub enum Engine {
    /// vllm-rs with extra server flags.
    Ours { extra: Vec<String> },
    /// Another build of vllm-rs (a baseline, e.g. the previous commit's binary), labelled.
    OursAt { bin: PathBuf, label: String, extra: Vec<String> },
    /// llama.cpp's llama-server with `parallel` slots and `ctx` total context.
    LlamaCpp { parallel: usize, ctx: usize },
}

/// Starts `engine` on `model` with `threads` threads, then times a first request (process
/// start to its first token). Fails if it is not serving within `limit`.
pub async fn start(engine: &Engine, model: &Path, threads: usize, limit: Duration) -> Result<Server> {
    let port = free_port()?;
    let base_url = format!("http://127.0.0.1:{port}");
    let log = vllm_engine::cache_dir().join("peers");
    std::fs::create_dir_all(&log)?;
    let (name, mut cmd) = match engine {
        Engine::Ours { extra } => {
            let mut c = Command::new(our_server()?);
            c.arg("--model").arg(model).args(["--port", &port.to_string()]).args(extra);
            c.env("RAYON_NUM_THREADS", threads.to_string());
            ("vllm-rs".to_string(), c)
        }
        Engine::OursAt { bin, label, extra } => {
            let mut c = Command::new(bin);
            c.arg("--model").arg(model).args(["--port", &port.to_string()]).args(extra);
            c.env("RAYON_NUM_THREADS", threads.to_string());
            (label.clone(), c)
        }
        Engine::LlamaCpp { parallel, ctx } => {
            let mut c = Command::new(llama_server()?);
            c.arg("-m").arg(model).args(["--host", "127.0.0.1", "--port", &port.to_string()]);
            c.args(["-np", &parallel.to_string(), "-c", &ctx.to_string()]);
            c.args(["-t", &threads.to_string(), "-tb", &threads.to_string()]);
            ("llama.cpp".to_string(), c)
        }
    };
    let command: Vec<String> =
        std::iter::once(cmd.get_program()).chain(cmd.get_args()).map(|a| a.to_string_lossy().into_owned()).collect();
    let logfile = std::fs::File::create(log.join(format!("{name}-server.log")))?;
    let t0 = Instant::now();
    let child = cmd
        .stdout(Stdio::from(logfile.try_clone()?))
        .stderr(Stdio::from(logfile))
        .spawn()
        .with_context(|| format!("starting the {name} server"))?;
    let mut server = Server { name: name.clone(), base_url, cold_start: 0.0, command, child };
    // Time to the first token of a first request, retrying until the server answers.
    let client = reqwest::Client::new();
    let cfg = ServeConfig {
        base_url: server.base_url.clone(),
        model: None,
        request_rate: None,
        max_concurrency: None,
        seed: 0,
        api_key: None,
        timeout: limit,
    };
    // A short prompt of ordinary token ids (both servers accept token-id prompts).
    let first = BenchRequest { prompt: vec![19556, 28], output_len: 2 };
    loop {
        if t0.elapsed() > limit {
            bail!("the {name} server did not serve a request within {limit:?} (log in {})", log.display());
        }
        if let Some(status) = server.child.try_wait()? {
            bail!("the {name} server exited ({status}); log in {}", log.display());
        }
        let sent_at = t0.elapsed().as_secs_f64();
        let r = one(&client, &cfg, &first).await;
        if r.ok {
            server.cold_start = sent_at + r.ttft;
            return Ok(server);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
