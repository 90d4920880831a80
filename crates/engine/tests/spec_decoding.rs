//! Speculative decoding changes no output: greedy and seeded sampled requests give the same
//! tokens, log probabilities and finish reasons with `ngram`, `suffix` and `draft_model`
//! speculation as without it, alone and mixed with other requests in one step, with every sampling
//! parameter, `n`, stop strings, guided decoding, prefix caching and preemption; drafts are
//! accepted where the output repeats the input, and no KV block is left behind.

mod common;

use std::collections::HashMap;

use common::{assert_clean, llm_with};
use vllm_engine::{
    CompletionOutput, EngineArgs, GuidedDecodingParams, Prompt, RequestOutput, SamplingParams, SpecMethod, SpecStats,
    SpeculativeConfig, LLM,
};

/// `draft_model` with `model` drafting `k` tokens.
fn draft(model: &std::path::Path, k: usize) -> SpeculativeConfig {
    serde_json::json!({"model": model.to_string_lossy(), "num_speculative_tokens": k}).to_string().parse().unwrap()
}

fn methods() -> Vec<SpeculativeConfig> {
    vec![
        SpeculativeConfig::ngram(4),
        r#"{"method": "ngram", "num_speculative_tokens": 6, "prompt_lookup_min": 2, "prompt_lookup_max": 4}"#
            .parse()
            .unwrap(),
        SpeculativeConfig::suffix(),
        // The default model as its own draft.
        draft(&common::default_gguf(), 4),
    ]
}

/// Prompts whose answers repeat their input, and ordinary ones.
fn prompts() -> Vec<String> {
    let passage = "The river runs past the old mill, under the stone bridge, and into the town square \
                   where the market opens every Saturday morning at seven.";
    let code = "fn add(a: i32, b: i32) -> i32 {\n    a + b\n}\n\nfn sub(a: i32, b: i32) -> i32 {\n    a - b\n}\n";
    let chat = |q: &str| format!("<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n");
    vec![
        chat(&format!("Repeat this text exactly: {passage}")),
        chat(&format!("Rename the function add to plus in this code:\n{code}")),
        format!("{passage} {passage} {passage}"),
        chat("What is the capital of France?"),
        "Once upon a time".to_string(),
        chat(&format!("Extract the day of the market from this text: {passage}")),
    ]
}

fn with_spec(spec: Option<SpeculativeConfig>, f: impl FnOnce(&mut EngineArgs)) -> LLM {
    llm_with(|a| {
        a.speculative_config = spec;
        f(a)
    })
}

fn spec_stats(llm: &LLM) -> SpecStats {
    llm.with_engine(|e| e.stats()).spec.expect("speculation is on")
}

/// Everything an output reports that speculation must not change.
fn key(c: &CompletionOutput) -> (Vec<u32>, String, Option<vllm_engine::FinishReason>, String) {
    (c.token_ids.clone(), c.text.clone(), c.finish_reason, format!("{:?}{:?}", c.logprobs, c.cumulative_logprob))
}

/// [`key`] of every sample of every request.
type Keys = Vec<Vec<(Vec<u32>, String, Option<vllm_engine::FinishReason>, String)>>;

fn keys(outs: &[RequestOutput]) -> Keys {
    outs.iter().map(|o| o.outputs.iter().map(key).collect()).collect()
}

#[test]
fn greedy_outputs_are_identical_with_each_method_alone_and_mixed() {
    let prompts = prompts();
    let params = SamplingParams { ignore_eos: true, logprobs: Some(2), ..SamplingParams::greedy(40) };
    let base = with_spec(None, |_| {});
    let want = keys(&base.generate(&prompts, &params).unwrap());
    for spec in methods() {
        let llm = with_spec(Some(spec.clone()), |_| {});
        // Alone (batch 1: every step can verify a draft).
        for (i, p) in prompts.iter().enumerate() {
            let got = keys(&llm.generate([p.as_str()], &params).unwrap());
            assert_eq!(got[0], want[i], "{spec:?}: prompt {i} alone");
        }
        let alone = spec_stats(&llm);
        assert!(alone.num_accepted_tokens > 0, "{spec:?}: no draft token accepted on input-grounded prompts");
        if spec.method == SpecMethod::DraftModel {
            // The model drafting for itself agrees with itself (up to rounding between batch shapes).
            assert!(alone.acceptance_rate() > 0.9, "{alone:?}");
            // Full drafts of k = 4 but near max_tokens (the room left cuts them).
            assert!(alone.num_draft_tokens > alone.num_drafts * 3, "{alone:?}");
        }
        // Mixed: drafting and plain sequences (prefilling, or with no match) in the same steps.
        let got = keys(&llm.generate(&prompts, &params).unwrap());
        assert_eq!(got, want, "{spec:?}: mixed batch");
        assert!(spec_stats(&llm).num_drafts > alone.num_drafts, "{spec:?}: no drafts in the mixed batch");
        assert_clean(&llm);
    }
}

#[test]
fn input_grounded_greedy_decoding_takes_fewer_steps() {
    let prompt = &prompts()[0];
    let params = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(48) };
    let llm = with_spec(Some(SpeculativeConfig::ngram(4)), |_| {});
    let out = llm.generate([prompt.as_str()], &params).unwrap();
    let s = spec_stats(&llm);
    // Each verifying step emits its accepted drafts plus one token.
    assert!(s.mean_acceptance_length() > 1.5, "{s:?}");
    assert!(s.accepted_per_pos[0] >= s.accepted_per_pos[1] && s.accepted_per_pos[1] >= s.accepted_per_pos[3]);
    assert_eq!(out[0].outputs[0].token_ids.len(), 48);
}

#[test]
fn seeded_sampling_with_every_parameter_is_unchanged() {
    let prompts = prompts();
    let mut bias = std::collections::BTreeMap::new();
    bias.insert(13u32, 2.0f32);
    let params: Vec<SamplingParams> = (0..prompts.len())
        .map(|i| SamplingParams {
            temperature: 0.8,
            top_p: 0.95,
            top_k: 40,
            min_p: 0.02,
            seed: Some(100 + i as u64),
            max_tokens: Some(32),
            min_tokens: 4,
            presence_penalty: 0.3,
            frequency_penalty: 0.2,
            repetition_penalty: 1.05,
            logit_bias: bias.clone(),
            bad_words: vec!["dragon".into()],
            logprobs: Some(3),
            stop: vec!["\n\n".into()],
            ..Default::default()
        })
        .collect();
    let base = with_spec(None, |_| {});
    let want = keys(&base.generate(&prompts, params.clone()).unwrap());
    for spec in methods() {
        let llm = with_spec(Some(spec.clone()), |_| {});
        assert_eq!(keys(&llm.generate(&prompts, params.clone()).unwrap()), want, "{spec:?}");
        assert_clean(&llm);
    }
}

#[test]
fn parallel_samples_stop_strings_guides_prefix_hits_and_preemption_are_unchanged() {
    let prompts = prompts();
    let n3 = SamplingParams { n: 3, temperature: 1.0, seed: Some(7), max_tokens: Some(24), ..Default::default() };
    let stop = SamplingParams { stop: vec!["bridge".into(), "}".into()], ..SamplingParams::greedy(48) };
    let guided = SamplingParams {
        guided_decoding: Some(GuidedDecodingParams {
            regex: Some(r"(the \w+ ){2,6}runs".into()),
            ..Default::default()
        }),
        ..SamplingParams::greedy(32)
    };
    let run = |llm: &LLM| {
        let mut all = Vec::new();
        for p in [&n3, &stop, &guided] {
            all.push(keys(&llm.generate(&prompts, p).unwrap()));
            // The same prompts again: served from the prefix cache.
            all.push(keys(&llm.generate(&prompts, p).unwrap()));
        }
        all
    };
    // A cache of 24 blocks: six prompts of ~40-60 tokens and their outputs do not fit at
    // once, so some are preempted and recomputed.
    let small = |a: &mut EngineArgs| a.kv_cache_memory = 24 * common::BLOCK_BYTES;
    let base = with_spec(None, small);
    let want = run(&base);
    assert!(base.with_engine(|e| e.stats()).num_preemptions > 0, "the small cache preempts");
    for spec in methods() {
        // A draft model's cache takes as much per block again: 24 blocks too.
        let blocks = if spec.method == SpecMethod::DraftModel { 48 } else { 24 };
        let llm = with_spec(Some(spec.clone()), |a| a.kv_cache_memory = blocks * common::BLOCK_BYTES);
        assert_eq!(run(&llm), want, "{spec:?}");
        let stats = llm.with_engine(|e| e.stats());
        assert_eq!(stats.num_blocks, 24, "{spec:?}");
        assert!(stats.num_preemptions > 0 && stats.spec.unwrap().num_accepted_tokens > 0, "{spec:?}: {stats:?}");
        assert_clean(&llm);
    }
}

/// A model drafting for itself keeps its draft cache right through preemption (its blocks are
/// gone, none comes back from the prefix cache: the draft starts over) and through catch-ups chunked by a small step budget: greedy
/// drafts are still almost all accepted, and outputs unchanged.
#[test]
fn a_draft_model_stays_in_step_through_preemption_and_chunked_catch_up() {
    let prompts = prompts();
    let params = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(48) };
    let small = |blocks: u64| {
        move |a: &mut EngineArgs| {
            a.kv_cache_memory = blocks * common::BLOCK_BYTES;
            a.max_num_batched_tokens = Some(32);
            // A preempted sequence's blocks do not come back from the prefix cache.
            a.enable_prefix_caching = false;
        }
    };
    let want = keys(&with_spec(None, small(24)).generate(&prompts, &params).unwrap());
    // Every sequence drafts (no row budget), so preemption hits drafting sequences.
    let mut spec = draft(&common::default_gguf(), 4);
    spec.disable_by_batch_size = Some(64);
    let llm = with_spec(Some(spec), small(48));
    assert_eq!(keys(&llm.generate(&prompts, &params).unwrap()), want);
    let stats = llm.with_engine(|e| e.stats());
    let spec = stats.spec.unwrap();
    assert!(stats.num_preemptions > 0, "{stats:?}");
    assert!(spec.num_drafts > 10 && spec.acceptance_rate() > 0.9, "{spec:?}");
    assert_clean(&llm);
}

/// Token-id prompts for a fixture model (a word-level tokenizer `t0 t1 ...` over its vocabulary).
fn fixture_llm(arch: &str, spec: Option<SpeculativeConfig>, tmp: &std::path::Path) -> LLM {
    let mut llm = LLM::new(fixture_args(arch, spec, tmp)).unwrap();
    llm.set_use_tqdm(false);
    llm
}

/// The arguments of [`fixture_llm`], whose folder (with a tokenizer) is `tmp/arch`.
fn fixture_args(arch: &str, spec: Option<SpeculativeConfig>, tmp: &std::path::Path) -> EngineArgs {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models").join(arch);
    let dir = tmp.join(arch);
    std::fs::create_dir_all(&dir).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let vocab = config["vocab_size"].as_u64().unwrap() as usize;
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let words: serde_json::Map<String, serde_json::Value> =
        (0..vocab).map(|i| (format!("t{i}"), serde_json::Value::from(i))).collect();
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": words, "unk_token": "t0"}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    let mut args = EngineArgs::new(dir.to_string_lossy());
    args.kv_cache_memory = 64 << 20;
    args.speculative_config = spec;
    args
}

fn fixture_prompts() -> Vec<Prompt> {
    // Repeating patterns (so drafts exist) and a plain ramp.
    let pattern: Vec<u32> = [5u32, 9, 14, 3, 27, 8].iter().cycle().take(30).copied().collect();
    let ramp: Vec<u32> = (1..25).collect();
    let mixed: Vec<u32> = (0..40).map(|i| [11u32, 4, 19, 4, 11][i % 5] + (i as u32 / 10)).collect();
    vec![Prompt::TokenIds(pattern), Prompt::TokenIds(ramp), Prompt::TokenIds(mixed)]
}

#[test]
fn every_fixture_architecture_decodes_identically_with_speculation() {
    let tmp = tempfile::tempdir().unwrap();
    let archs = [
        "llama",
        "llama_hd64",
        "mistral",
        "mixtral",
        "qwen2",
        "qwen3",
        "qwen3_hd128",
        "qwen3_moe",
        "gemma2",
        "gemma3",
        "phi3",
        "gpt2",
        "opt",
    ];
    let greedy = SamplingParams { ignore_eos: true, logprobs: Some(1), ..SamplingParams::greedy(24) };
    let mut drafted = HashMap::new();
    for arch in archs {
        let want = keys(&fixture_llm(arch, None, tmp.path()).generate(fixture_prompts(), &greedy).unwrap());
        let itself = draft(&tmp.path().join(arch), 3);
        for spec in [SpeculativeConfig::ngram(3), SpeculativeConfig::suffix(), itself] {
            let llm = fixture_llm(arch, Some(spec.clone()), tmp.path());
            // Batched, then each prompt alone.
            assert_eq!(keys(&llm.generate(fixture_prompts(), &greedy).unwrap()), want, "{arch} {spec:?}");
            for (i, p) in fixture_prompts().into_iter().enumerate() {
                assert_eq!(keys(&llm.generate([p], &greedy).unwrap())[0], want[i], "{arch} {spec:?} prompt {i}");
            }
            assert_clean(&llm);
            *drafted.entry(arch).or_insert(0) += spec_stats(&llm).num_draft_tokens;
        }
    }
    for (arch, n) in drafted {
        assert!(n > 0, "{arch}: no draft was ever verified");
    }
}

/// The distribution of sampled continuations: 300 seeded draws of the first four tokens on a
/// tiny model, with and without speculation (with each method). The total-variation distance
/// between the two histograms is bounded (the draws are in fact identical seed by seed: the
/// same numbers drawn from the same distributions).
#[test]
fn sampled_distribution_is_preserved() {
    let tmp = tempfile::tempdir().unwrap();
    let prompt: Vec<u32> = [5u32, 9, 14, 3].iter().cycle().take(24).copied().collect();
    let draws = |spec: Option<SpeculativeConfig>| -> Vec<Vec<u32>> {
        let llm = fixture_llm("llama", spec, tmp.path());
        let params: Vec<SamplingParams> = (0..300)
            .map(|seed| SamplingParams {
                temperature: 1.0,
                seed: Some(seed),
                max_tokens: Some(4),
                ignore_eos: true,
                ..Default::default()
            })
            .collect();
        let prompts = vec![Prompt::TokenIds(prompt.clone()); 300];
        llm.generate(prompts, params).unwrap().into_iter().map(|o| o.outputs[0].token_ids.clone()).collect()
    };
    let hist = |d: &[Vec<u32>]| {
        let mut h: HashMap<Vec<u32>, f64> = HashMap::new();
        for x in d {
            *h.entry(x.clone()).or_default() += 1.0 / d.len() as f64;
        }
        h
    };
    let base = draws(None);
    let hb = hist(&base);
    let itself = draft(&tmp.path().join("llama"), 3);
    for spec in [SpeculativeConfig::ngram(3), SpeculativeConfig::suffix(), itself] {
        let got = draws(Some(spec.clone()));
        let hs = hist(&got);
        let keys: std::collections::HashSet<&Vec<u32>> = hb.keys().chain(hs.keys()).collect();
        let tv: f64 =
            keys.iter().map(|k| (hb.get(*k).unwrap_or(&0.0) - hs.get(*k).unwrap_or(&0.0)).abs()).sum::<f64>() / 2.0;
        assert!(tv <= 0.05, "{spec:?}: total variation {tv}");
        assert_eq!(got, base, "{spec:?}: seeded draws differ");
    }
}

/// Another architecture drafts (the llama fixture for qwen3, same vocabulary): outputs are the
/// same whatever the draft proposes, and its agreement is counted.
#[test]
fn another_architecture_drafts_without_changing_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let greedy = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(24) };
    let want = keys(&fixture_llm("qwen3", None, tmp.path()).generate(fixture_prompts(), &greedy).unwrap());
    let llama = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/llama");
    let llm = fixture_llm("qwen3", Some(draft(&llama, 5)), tmp.path());
    assert_eq!(keys(&llm.generate(fixture_prompts(), &greedy).unwrap()), want);
    let s = spec_stats(&llm);
    assert!(s.num_draft_tokens > 0 && s.num_accepted_tokens < s.num_draft_tokens, "{s:?}");
    assert_clean(&llm);
}

#[test]
fn a_bad_speculative_config_is_refused_at_start() {
    let refused = |args: EngineArgs| LLM::new(args).err().expect("refused").to_string();
    let gguf = common::default_gguf();
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
    // A draft that is not there, one with another vocabulary, an encoder.
    for (draft_model, why) in [
        (std::path::PathBuf::from("/no/such/draft"), "not found"),
        (fixtures.join("models/llama"), "vocabulary of 256 tokens"),
        (fixtures.join("embedding/bert"), "encoder"),
    ] {
        let mut args = EngineArgs::new(gguf.to_string_lossy());
        args.speculative_config = Some(draft(&draft_model, 3));
        let e = refused(args);
        assert!(e.contains("speculative_config") && e.contains(why), "{e}");
    }
}
