//! A real non-Llama GGUF end to end: Gemma 3 270M (Q4_K_M, as llama.cpp's tools write it:
//! `gemma3` metadata, 18 layers of 5 local : 1 global attention, Q/K norms, a 262,144-piece
//! SentencePiece vocabulary without space prefix, Q4_K/Q6_K/Q5_0/Q8_0 tensors), fetched from
//! PyPI by the project's own code like the default model, against llama.cpp's own run of the
//! same file (fixtures/gemma3_270m_llama_cpp.json, scripts/make_gemma3_gguf_fixture.py):
//! - prompt ids equal llama.cpp's (BOS, then SentencePiece pieces);
//! - 16 greedy tokens per prompt follow llama.cpp's; where they part, llama.cpp's token was a
//!   near tie in our distribution (within 0.5 nats of our top token); at least one is equal
//!   throughout.

use serde_json::Value;
use vllm_engine::{EngineArgs, SamplingParams, LLM};

fn gemma3() -> LLM {
    let path = vllm_engine::fetch_gemma3_from_pypi()
        .unwrap_or_else(|e| panic!("this test needs {}; fetching it failed: {e}", vllm_engine::GEMMA3_GGUF_PYPI));
    let mut args = EngineArgs::new(path.to_string_lossy());
    args.kv_cache_memory = 128 << 20;
    let mut llm = LLM::new(args).unwrap_or_else(|e| panic!("loading {}: {e}", path.display()));
    llm.set_use_tqdm(false);
    llm
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn real_gemma3_gguf_follows_llama_cpp() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/gemma3_270m_llama_cpp.json");
    let fx: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = fx["cases"].as_array().unwrap();
    let llm = gemma3();
    let prompts: Vec<&str> = cases.iter().map(|c| c["prompt"].as_str().unwrap()).collect();
    for (c, p) in cases.iter().zip(&prompts) {
        let ours = llm.with_engine(|e| e.tokenizer().encode(p, true).unwrap());
        assert_eq!(ours, ids(&c["prompt_ids"]), "{p:?}");
    }
    let mut params = SamplingParams::greedy(16);
    params.logprobs = Some(20);
    params.ignore_eos = true;
    let out = llm.generate(prompts.clone(), params).unwrap();
    let mut identical = 0;
    for (c, o) in cases.iter().zip(&out) {
        let (want, got) = (ids(&c["greedy"]), &o.outputs[0].token_ids);
        let logprobs = o.outputs[0].logprobs.as_ref().unwrap();
        let parted = want.iter().zip(got).position(|(a, b)| a != b);
        println!("{:?}: ours {:?} | llama.cpp {:?} | parted at {parted:?}", c["prompt"], o.outputs[0].text, c["text"]);
        match parted {
            None => identical += 1,
            Some(k) => {
                let top = logprobs[k].top[0].logprob;
                let theirs = logprobs[k].top.iter().find(|l| l.token_id == want[k]);
                println!("  token {k}: our top {top:.3}, llama.cpp's choice {:?}", theirs.map(|l| l.logprob));
                assert!(
                    theirs.is_some_and(|l| top - l.logprob < 0.5),
                    "{:?}: at token {k} llama.cpp chose {} ({theirs:?}), we chose {} ({top}): not a near tie",
                    c["prompt"],
                    want[k],
                    got[k]
                );
            }
        }
    }
    // Greedy decoding of a 4-bit model sits on near ties often: llama.cpp's own runs of this
    // file part from each other on the second prompt at token 2 (a fresh run against one that
    // reuses a cached prefix), where ours follows the cached-prefix one.
    assert!(identical >= 1, "no continuation equals llama.cpp's");
}
