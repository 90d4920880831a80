//! `vllm-server gpu-check --device cpu`: the GPU acceptance run rehearsed on the CPU, so that
//! a GPU's minutes go to running it, not fixing it. Every group runs (the throughput one on
//! the tiny llama fixture) and the JSON report is read back.

use std::path::Path;
use std::process::Command;

#[test]
fn the_gpu_acceptance_run_passes_on_the_cpu() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let report = tempfile::NamedTempFile::new().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vllm-server"))
        .args(["gpu-check", "--device", "cpu", "--bench-prompts", "4", "--bench-input-len", "16"])
        .args(["--bench-output-len", "8", "--fixtures"])
        .arg(root.join("fixtures/models"))
        .arg("--bench-model")
        .arg(root.join("fixtures/models/llama"))
        .arg("--report")
        .arg(report.path())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(report.path()).unwrap()).unwrap();
    let checks = r["checks"].as_array().unwrap();
    let names: Vec<&str> = checks.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert!(checks.iter().all(|c| c["pass"] == true), "{stdout}");
    // 3 cache types x (2 + 4 window/soft-cap + 7 head sizes) attention cases, block copies,
    // sampling, 13 fixtures, 3 engine checks, throughput.
    assert_eq!(checks.len(), 3 * 13 + 2 + 13 + 3 + 1, "{names:?}");
    for want in ["attention BF16 head size 80", "fixture qwen3_hd128", "prefix caching", "throughput (offline)"] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    assert!(r["bench"]["output_tokens_per_s"].as_f64().unwrap() > 0.0);
    // A failing group fails the command: no fixtures where it looks.
    let bad = Command::new(env!("CARGO_BIN_EXE_vllm-server"))
        .args(["gpu-check", "--device", "cpu", "--only", "fixtures", "--fixtures", "/nonexistent"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stdout).contains("FAIL fixtures: no fixtures"));
}
