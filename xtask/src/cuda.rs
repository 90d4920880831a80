//! `cargo xtask cuda-toolkit` and `cargo xtask build-cuda`: the CUDA 13.0 toolkit from PyPI
//! (no system CUDA, no GPU needed to build), and a `--features cuda` release build against it.
//!
//! The wheels put everything under one tree, `<cache>/cuda13/nvidia/cu13`; they lack the
//! unversioned link names, which are added as symlinks, and the driver library (`libcuda.so`),
//! for which a link-only stub with soname `libcuda.so.1` is built from the driver entry points
//! cudarc references (the GPU machine's real driver is used at run time).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// CUDA 13.0 wheels: the GPU machine's driver (580) runs CUDA 13.0 and its PyTorch ships
/// cuBLAS 13 / cuRAND 10 / cudart 13, so the binary must link against these versions.
const WHEELS: &[&str] = &[
    "nvidia-cuda-nvcc==13.0.88",
    "nvidia-cuda-crt==13.0.88",
    "nvidia-nvvm==13.0.88",
    "nvidia-cuda-runtime==13.0.96",
    "nvidia-cuda-cccl==13.0.85",
    "nvidia-cuda-nvrtc==13.0.88",
    "nvidia-curand==10.4.0.35",
    "nvidia-cublas==13.0.2.14",
];

/// Link names the wheels lack: `(link name, versioned file)`.
const LINKS: &[(&str, &str)] = &[
    ("libcudart.so", "libcudart.so.13"),
    ("libcublas.so", "libcublas.so.13"),
    ("libcublasLt.so", "libcublasLt.so.13"),
    ("libnvrtc.so", "libnvrtc.so.13"),
    ("libcurand.so", "libcurand.so.10"),
];

/// The toolkit root (`CUDA_ROOT`).
pub fn root() -> PathBuf {
    vllm_engine::cache_dir().join("cuda13").join("nvidia").join("cu13")
}

/// Installs the toolkit if missing; returns its root.
pub fn toolkit() -> Result<PathBuf> {
    let root = root();
    let nvcc = root.join("bin").join("nvcc");
    if !nvcc.exists() {
        let target = vllm_engine::cache_dir().join("cuda13");
        eprintln!("xtask: installing the CUDA 13.0 toolkit from PyPI into {} (about 1.2 GB)", target.display());
        let ok = Command::new("python3")
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", "--target"])
            .arg(&target)
            .args(WHEELS)
            .status()
            .context("running python3 -m pip")?;
        if !ok.success() || !nvcc.exists() {
            bail!("pip install of the CUDA wheels failed ({}); nvcc expected at {}", WHEELS.join(" "), nvcc.display());
        }
    }
    let lib = root.join("lib");
    for (link, file) in LINKS {
        let (l, f) = (lib.join(link), lib.join(file));
        if !f.exists() {
            bail!("{} missing from the CUDA wheels", f.display());
        }
        if !l.exists() {
            std::os::unix::fs::symlink(file, &l).with_context(|| format!("linking {}", l.display()))?;
        }
    }
    let stub = lib.join("stubs").join("libcuda.so");
    if !stub.exists() {
        driver_stub(&stub)?;
    }
    // The name the binary asks the loader for, so that the CUDA build also starts here (its
    // CPU half runs; `--device cuda` fails with the stub's error).
    let soname = lib.join("stubs").join("libcuda.so.1");
    if !soname.exists() {
        std::os::unix::fs::symlink("libcuda.so", &soname).with_context(|| format!("linking {}", soname.display()))?;
    }
    eprintln!("xtask: CUDA toolkit at {} ({})", root.display(), nvcc_version(&nvcc)?);
    Ok(root)
}

fn nvcc_version(nvcc: &Path) -> Result<String> {
    let out = Command::new(nvcc).arg("--version").output().context("running nvcc --version")?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.lines().rev().find(|l| l.contains("release")).unwrap_or("unknown release").trim().to_string())
}

/// Every `cu*` driver entry point cudarc declares, as do-nothing functions in a library
/// named `libcuda.so.1`: enough to link; never loaded on the GPU machine, which has the driver.
fn driver_stub(path: &Path) -> Result<()> {
    let cudarc = cudarc_source().context("finding cudarc's sources (run `cargo fetch --features cuda` first)")?;
    let mut names = std::collections::BTreeSet::new();
    for entry in walk(&cudarc.join("src").join("driver").join("sys"))? {
        let text = std::fs::read_to_string(&entry)?;
        for line in text.lines() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("pub fn cu").or_else(|| line.strip_prefix("pub unsafe fn cu")) {
                let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                names.insert(format!("cu{name}"));
            }
        }
    }
    if names.is_empty() {
        bail!("no driver entry points found under {}", cudarc.display());
    }
    let c: String = names.iter().map(|n| format!("int {n}(void) {{ return 999; }}\n")).collect();
    let dir = path.parent().expect("stub path has a parent");
    std::fs::create_dir_all(dir)?;
    let src = dir.join("libcuda_stub.c");
    std::fs::write(&src, c)?;
    let ok = Command::new("cc")
        .args(["-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o"])
        .arg(path)
        .arg(&src)
        .status()
        .context("running cc for the libcuda stub")?;
    if !ok.success() {
        bail!("building the libcuda link stub failed");
    }
    eprintln!("xtask: libcuda link stub with {} entry points at {}", names.len(), path.display());
    Ok(())
}

fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        if p.is_dir() {
            out.extend(walk(&p)?);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    Ok(out)
}

/// cudarc's source folder in the cargo registry (the version in Cargo.lock).
fn cudarc_source() -> Result<PathBuf> {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["metadata", "--format-version", "1", "--features", "vllm-server/cuda"])
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!("cargo metadata failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let pkg = v["packages"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "cudarc"))
        .context("cudarc is not in the dependency graph")?;
    let manifest = pkg["manifest_path"].as_str().context("cudarc manifest path")?;
    Ok(Path::new(manifest).parent().context("cudarc folder")?.to_path_buf())
}

/// The environment a CUDA build needs.
pub fn env(root: &Path) -> Vec<(String, String)> {
    let path = format!("{}:{}", root.join("bin").display(), std::env::var("PATH").unwrap_or_default());
    let lib = root.join("lib");
    let search = format!("-L native={} -L native={}", lib.display(), lib.join("stubs").display());
    let flags = match std::env::var("RUSTFLAGS") {
        Ok(f) if !f.is_empty() => format!("{f} {search}"),
        _ => search,
    };
    vec![
        ("CUDA_ROOT".into(), root.display().to_string()),
        ("CUDA_PATH".into(), root.display().to_string()),
        ("PATH".into(), path),
        ("CUDA_COMPUTE_CAP".into(), "90".into()),
        ("RUSTFLAGS".into(), flags),
        ("CARGO_TARGET_DIR".into(), "target/cuda".into()),
    ]
}

/// `cargo build --release -p vllm-server --features cuda` against the PyPI toolkit, into
/// `target/cuda` (so the CPU build's artifacts are not invalidated by the flags).
pub fn build() -> Result<()> {
    let root = toolkit()?;
    let args = ["build", "--release", "-p", "vllm-server", "--features", "cuda"];
    eprintln!("xtask: cargo {} (CUDA_ROOT={})", args.join(" "), root.display());
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .envs(env(&root))
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("the CUDA build failed ({status})");
    }
    let tests = ["test", "--release", "--no-run", "-p", "vllm-kernels", "--features", "cuda"];
    eprintln!("xtask: cargo {}", tests.join(" "));
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(tests)
        .envs(env(&root))
        .status()
        .context("running cargo test --no-run")?;
    if !status.success() {
        bail!("building the CUDA kernel tests failed ({status})");
    }
    eprintln!("xtask: built target/cuda/release/vllm-server and the CUDA kernel tests");
    Ok(())
}

/// Most bytes the bundle may take: what goes to the GPU machine (64 MiB) less the tracked
/// source tree (about 21 MiB, fixtures included) and a margin.
const BUNDLE_LIMIT: u64 = 36 << 20;

/// `build`, then the server binary stripped and xz-compressed into
/// target/gpu-bundle/vllm-server.xz.
pub fn bundle() -> Result<()> {
    build()?;
    let bin = Path::new("target/cuda/release/vllm-server");
    let dir = Path::new("target/gpu-bundle");
    std::fs::create_dir_all(dir)?;
    let stripped = dir.join("vllm-server");
    std::fs::copy(bin, &stripped).with_context(|| format!("copying {}", bin.display()))?;
    let ok = Command::new("strip").arg(&stripped).status().context("running strip")?;
    if !ok.success() {
        bail!("strip failed on {}", stripped.display());
    }
    let xz = dir.join("vllm-server.xz");
    let _ = std::fs::remove_file(&xz);
    eprintln!("xtask: compressing {} ({} MiB) with xz -9", stripped.display(), size(&stripped)? >> 20);
    let ok = Command::new("xz").args(["-9", "-T0", "-k", "-f"]).arg(&stripped).status().context("running xz")?;
    if !ok.success() {
        bail!("xz failed on {}", stripped.display());
    }
    let bytes = size(&xz)?;
    eprintln!(
        "xtask: {} is {:.1} MiB (stripped binary {:.1} MiB); on the GPU machine run scripts/gpu_acceptance.sh",
        xz.display(),
        bytes as f64 / (1u64 << 20) as f64,
        size(&stripped)? as f64 / (1u64 << 20) as f64
    );
    if bytes > BUNDLE_LIMIT {
        bail!("the bundle is {} MiB, over the {} MiB it may take", bytes >> 20, BUNDLE_LIMIT >> 20);
    }
    std::fs::remove_file(&stripped)?;
    Ok(())
}

fn size(p: &Path) -> Result<u64> {
    Ok(std::fs::metadata(p).with_context(|| format!("reading {}", p.display()))?.len())
}
