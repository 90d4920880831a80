//! With the `cuda` feature: compiles `kernels/*.cu` (the workspace's top-level `kernels/`) to
//! portable PTX for compute capability 9.0 (loaded by the driver on sm_90 and newer) and checks
//! that it assembles for sm_90 (`ptxas`), printing register and shared-memory use. Needs `nvcc`
//! (`CUDA_ROOT`/bin or on `PATH`; `cargo xtask build-cuda` installs CUDA 13.0 from PyPI).
//! Without the feature it does nothing.

use std::path::PathBuf;
use std::process::Command;

const KERNELS: &[&str] = &["paged_attention", "sampling"];

fn main() {
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("../../kernels");
    for k in KERNELS {
        println!("cargo:rerun-if-changed={}", dir.join(format!("{k}.cu")).display());
    }
    println!("cargo:rerun-if-env-changed=CUDA_ROOT");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let root = std::env::var_os("CUDA_ROOT").map(PathBuf::from);
    let nvcc = root.as_ref().map(|r| r.join("bin").join("nvcc")).unwrap_or_else(|| "nvcc".into());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    for k in KERNELS {
        let src = dir.join(format!("{k}.cu"));
        let mut include = Vec::new();
        if let Some(r) = &root {
            include.push(format!("-I{}", r.join("include").display()));
        }
        let ptx = out.join(format!("{k}.ptx"));
        let run = |args: &[&str], what: &str| {
            let o = Command::new(&nvcc).args(&include).args(args).arg(&src).output().unwrap_or_else(|e| {
                panic!("running {} for {what}: {e} (set CUDA_ROOT or put nvcc on PATH)", nvcc.display())
            });
            if !o.status.success() {
                panic!("nvcc {what} of {} failed:\n{}", src.display(), String::from_utf8_lossy(&o.stderr));
            }
            String::from_utf8_lossy(&o.stderr).into_owned()
        };
        run(&["-O3", "-ptx", "-arch=compute_90", "-o", ptx.to_str().unwrap()], "PTX");
        let cubin = out.join(format!("{k}.sm_90.cubin"));
        let info = run(&["-O3", "-cubin", "-arch=sm_90", "-Xptxas", "-v", "-o", cubin.to_str().unwrap()], "sm_90");
        for line in info.lines().filter(|l| l.contains("registers")) {
            println!("cargo:warning={k}: {}", line.trim_start_matches("ptxas info    : "));
        }
    }
}
