//! Model sources: a Hugging Face folder (config.json + safetensors + tokenizer.json), the
//! standard Hugging Face cache layout, and quick, explanatory offline failures.
//!
//! The HF folder is made from the default GGUF: weights dequantized to float32, Q/K rows
//! un-permuted back to Hugging Face's rotary layout, tokenizer.json from our GGUF tokenizer.
//! Loading it through the safetensors path must give exactly the GGUF path's greedy tokens.

mod common;

use std::time::Instant;

use candle_core::DType;
use vllm_engine::{EngineArgs, Error, ModelDtype, ModelFiles, SamplingParams, LLM};

fn generate(model: &str, dtype: ModelDtype, prompts: &[&str], n: usize) -> Vec<Vec<u32>> {
    let mut args = EngineArgs::new(model);
    args.dtype = dtype;
    // Both sources in float (the GGUF file's own Q4_1 would differ from the dequantized folder).
    args.quantization = vllm_engine::Quantization::None;
    args.kv_cache_memory = 128 << 20;
    let mut llm = LLM::new(args).unwrap();
    llm.set_use_tqdm(false);
    let p = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(n) };
    llm.generate(prompts.iter().copied(), &p).unwrap().into_iter().map(|o| o.outputs[0].token_ids.clone()).collect()
}

#[test]
fn hf_folder_and_hf_cache_layout() {
    let gguf = common::default_gguf();
    let home = tempfile::tempdir().unwrap();
    let rev = "0123456789abcdef0123456789abcdef01234567";
    let repo = home.path().join("hub").join("models--Test--SmolLM2-HF");
    let snap = repo.join("snapshots").join(rev);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), rev).unwrap();
    common::write_hf_folder(&gguf, &snap, DType::F32);

    let prompts = ["The capital of France is", "def fibonacci(n):", "Les mathématiques sont"];
    let from_gguf = generate(&gguf.to_string_lossy(), ModelDtype::Float32, &prompts, 16);
    let from_dir = generate(&snap.to_string_lossy(), ModelDtype::Float32, &prompts, 16);
    assert_eq!(from_gguf, from_dir, "safetensors path (HF rotary layout) vs GGUF path (interleaved)");

    // bf16 activations and weights from the same folder still answer sensibly.
    let bf16 = generate(&snap.to_string_lossy(), ModelDtype::BFloat16, &prompts[..1], 1);
    assert_eq!(bf16[0][0], from_gguf[0][0], "bf16 first token for {:?}", prompts[0]);

    // The same folder found by id in the standard Hugging Face cache, without any network.
    // (Environment changes stay in this test binary, which has this one test.)
    std::env::set_var("HF_HOME", home.path());
    std::env::set_var("HF_HUB_OFFLINE", "1");
    assert_eq!(vllm_engine::resolve("Test/SmolLM2-HF").unwrap(), ModelFiles::HfDir(snap.clone()));
    // --tokenizer by id finds the cached tokenizer's folder; a .gguf gives its own file.
    let hub = vllm_engine::HubOptions::default();
    assert_eq!(vllm_engine::resolve_tokenizer("Test/SmolLM2-HF", &hub).unwrap(), snap);
    assert_eq!(vllm_engine::resolve_tokenizer(&gguf.to_string_lossy(), &hub).unwrap(), gguf);
    assert!(vllm_engine::resolve_tokenizer("Test/none", &hub).is_err());

    // --download-dir and --revision: another cache folder, a named revision in it.
    let downloads = tempfile::tempdir().unwrap();
    let rev2 = "fedcba9876543210fedcba9876543210fedcba98";
    let repo2 = downloads.path().join("models--Test--SmolLM2-HF");
    let snap2 = repo2.join("snapshots").join(rev2);
    std::fs::create_dir_all(&snap2).unwrap();
    std::fs::create_dir_all(repo2.join("refs")).unwrap();
    std::fs::write(repo2.join("refs").join("v1"), rev2).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"] {
        std::os::unix::fs::symlink(snap.join(f), snap2.join(f)).unwrap();
    }
    let at = |revision: Option<&str>| vllm_engine::HubOptions {
        revision: revision.map(String::from),
        download_dir: Some(downloads.path().to_path_buf()),
    };
    assert_eq!(
        vllm_engine::resolve_with("Test/SmolLM2-HF", &at(Some("v1"))).unwrap(),
        ModelFiles::HfDir(snap2.clone())
    );
    assert!(vllm_engine::resolve_with("Test/SmolLM2-HF", &at(Some("v2"))).is_err(), "a revision not there");
    assert!(vllm_engine::resolve_with("Test/SmolLM2-HF", &at(None)).is_err(), "main is not in the download dir");
    // The model from the download dir at that revision, with the tokenizer from the GGUF.
    let mut args = EngineArgs::new("Test/SmolLM2-HF");
    args.revision = Some("v1".into());
    args.download_dir = Some(downloads.path().to_path_buf());
    args.tokenizer = Some(gguf.to_string_lossy().to_string());
    args.dtype = ModelDtype::Float32;
    args.kv_cache_memory = 64 << 20;
    let llm = vllm_engine::LLM::new(args).unwrap();
    let p = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(16) };
    let out = llm.generate(prompts.iter().copied(), &p).unwrap();
    let ids: Vec<Vec<u32>> = out.into_iter().map(|o| o.outputs[0].token_ids.clone()).collect();
    assert_eq!(ids, from_gguf, "same weights, same tokenizer, same tokens");

    // An unknown id fails fast and says what was tried.
    let t = Instant::now();
    let e = vllm_engine::resolve("Test/does-not-exist").unwrap_err();
    assert!(t.elapsed().as_secs() < 5, "offline failure must be quick");
    let Error::ModelNotFound { tried, .. } = &e else { panic!("{e}") };
    let msg = e.to_string();
    assert!(tried.len() >= 3 && msg.contains("Hugging Face cache") && msg.contains("HF_HUB_OFFLINE"), "{msg}");
}
