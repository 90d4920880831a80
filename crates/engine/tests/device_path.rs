//! The engine paths a GPU takes, run here on the CPU so that they are tested without one:
//! sampling on the device (only token ids come back; `device_sampling: Some(true)` turns it on
//! for the CPU), per-step metadata, and the GPU flags' validation. The same checks run on a
//! GPU in scripts/gpu_acceptance.sh.

mod common;

use common::{assert_clean, llm_with};
use vllm_engine::{EngineArgs, Error, Quantization, SamplingParams, LLM};

const PROMPTS: [&str; 3] =
    ["The capital of France is", "def fibonacci(n):", "Three things to pack for a trip to the mountains:"];

fn on_device(on: bool) -> LLM {
    llm_with(|a| a.device_sampling = Some(on))
}

fn sampled_tokens(llm: &LLM) -> u64 {
    llm.with_engine(|e| e.stats().num_device_sampled_tokens)
}

#[test]
fn greedy_on_the_device_is_the_host_samplers_argmax() {
    let host = on_device(false);
    let dev = on_device(true);
    let p = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(16) };
    let a = host.generate(PROMPTS, p.clone()).unwrap();
    let b = dev.generate(PROMPTS, p).unwrap();
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.outputs[0].token_ids, y.outputs[0].token_ids, "{}", x.prompt.as_deref().unwrap_or(""));
    }
    assert_eq!(sampled_tokens(&host), 0);
    assert_eq!(sampled_tokens(&dev), 3 * 16, "every token drawn on the device");
    assert_clean(&dev);
}

#[test]
fn seeded_draws_on_the_device_repeat_and_parallel_samples_differ() {
    let dev = on_device(true);
    let p = SamplingParams {
        n: 2,
        temperature: 0.9,
        top_k: 40,
        top_p: 0.95,
        seed: Some(11),
        ignore_eos: true,
        max_tokens: Some(24),
        ..Default::default()
    };
    let first = dev.generate(PROMPTS, p.clone()).unwrap();
    let again = dev.generate(PROMPTS, p).unwrap();
    for (x, y) in first.iter().zip(&again) {
        let ids = |o: &vllm_engine::RequestOutput| o.outputs.iter().map(|c| c.token_ids.clone()).collect::<Vec<_>>();
        assert_eq!(ids(x), ids(y), "a seeded request repeats");
        assert_eq!(x.outputs.len(), 2);
        assert!(x.outputs.iter().all(|c| c.token_ids.len() == 24));
    }
    // Two samples of one prompt draw independently (24 tokens at temperature 0.9: equal
    // continuations for all three prompts would mean they shared their draws).
    assert!(first.iter().any(|o| o.outputs[0].token_ids != o.outputs[1].token_ids));
    assert_eq!(sampled_tokens(&dev), 2 * 3 * 2 * 24);
    assert_clean(&dev);
}

#[test]
fn steps_that_need_the_logits_fall_back_to_the_host_sampler() {
    let dev = on_device(true);
    // Log probabilities, penalties and prompt log probabilities need every logit on the host:
    // those steps sample there, the rest of the batch with them.
    let plain = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(8) };
    let with_logprobs = SamplingParams { logprobs: Some(3), ..plain.clone() };
    let penalised = SamplingParams { repetition_penalty: 1.3, ..plain.clone() };
    let prompt_lp = SamplingParams { prompt_logprobs: Some(1), ..plain.clone() };
    let out = dev.generate(PROMPTS, vec![with_logprobs, penalised, prompt_lp]).unwrap();
    assert_eq!(out[0].outputs[0].logprobs.as_ref().map(Vec::len), Some(8));
    assert!(out[2].prompt_logprobs.is_some());
    assert_eq!(sampled_tokens(&dev), 0, "no step of this batch could sample on the device");
    // Alone, the plain request samples there again, with the host's greedy result.
    let host = on_device(false).generate([PROMPTS[1]], plain.clone()).unwrap();
    let alone = dev.generate([PROMPTS[1]], plain).unwrap();
    assert_eq!(host[0].outputs[0].token_ids, alone[0].outputs[0].token_ids);
    assert_eq!(sampled_tokens(&dev), 8);
    assert_clean(&dev);
}

#[test]
fn gpu_flags_are_checked_before_anything_loads() {
    let gguf = common::default_gguf();
    let args = |f: &dyn Fn(&mut EngineArgs)| {
        let mut a = EngineArgs::new(gguf.to_string_lossy());
        f(&mut a);
        a
    };
    // int8 is a CPU kernel: refused on CUDA whatever the build.
    let err = LLM::new(args(&|a| {
        a.device = "cuda".into();
        a.quantization = Quantization::Int8;
    }))
    .err()
    .expect("int8 on cuda");
    assert!(matches!(err, Error::InvalidArgument { param: "quantization", .. }), "{err}");
    let err = LLM::new(args(&|a| a.device = "gpu".into())).err().expect("unknown device");
    assert!(err.to_string().contains("choose cpu, cuda or cuda:N"), "{err}");
    if !cfg!(feature = "cuda") {
        let err = LLM::new(args(&|a| a.device = "cuda".into())).err().expect("no CUDA in this build");
        assert!(err.to_string().contains("build-cuda"), "{err}");
    }
}

fn fixed_shape(max_len: usize) -> LLM {
    llm_with(|a| {
        a.cuda_graphs = Some(true);
        a.max_seq_len_to_capture = max_len;
    })
}

/// Decode steps padded to batch-size buckets with fixed-width block tables (what a CUDA graph
/// replays) give the plain steps' results: the padding rows write nothing and are dropped.
#[test]
fn fixed_shape_decode_steps_match_plain_steps() {
    let plain = on_device(false);
    // 40 tokens of context at most in fixed shapes: these prompts (6-14 tokens) decode 32
    // tokens, so steps switch from fixed shapes to plain ones mid-request.
    let graphs = fixed_shape(40);
    let p = SamplingParams { ignore_eos: true, logprobs: Some(2), ..SamplingParams::greedy(32) };
    // 1, 3 (bucket 4) and 5 (bucket 8) sequences at once.
    for batch in [&PROMPTS[..1], &PROMPTS[..], &[PROMPTS[0], PROMPTS[1], PROMPTS[2], "Hello", "Water boils at"][..]] {
        let a = plain.generate(batch.iter().copied(), p.clone()).unwrap();
        let b = graphs.generate(batch.iter().copied(), p.clone()).unwrap();
        for (x, y) in a.iter().zip(&b) {
            let (x, y) = (&x.outputs[0], &y.outputs[0]);
            assert_eq!(x.token_ids, y.token_ids);
            for (lx, ly) in x.logprobs.as_ref().unwrap().iter().zip(y.logprobs.as_ref().unwrap()) {
                for (l, m) in
                    std::iter::once(&lx.sampled).chain(&lx.top).zip(std::iter::once(&ly.sampled).chain(&ly.top))
                {
                    assert_eq!(l.token_id, m.token_id);
                    assert!((l.logprob - m.logprob).abs() < 1e-3, "{} vs {}", l.logprob, m.logprob);
                }
            }
        }
    }
    // Parallel samples (forked blocks, copy-on-write) and a prefix-cache hit, in fixed shapes.
    let p = SamplingParams {
        n: 2,
        seed: Some(5),
        temperature: 0.8,
        ignore_eos: true,
        max_tokens: Some(12),
        ..Default::default()
    };
    let a = plain.generate(PROMPTS, p.clone()).unwrap();
    let b = graphs.generate(PROMPTS, p.clone()).unwrap();
    let ids = |o: &[vllm_engine::RequestOutput]| {
        o.iter().flat_map(|r| r.outputs.iter().map(|c| c.token_ids.clone())).collect::<Vec<_>>()
    };
    assert_eq!(ids(&a), ids(&b));
    assert_eq!(ids(&graphs.generate(PROMPTS, p).unwrap()), ids(&b), "prefix-cached prompts");
    let steps = |l: &LLM| l.with_engine(|e| e.stats().num_graph_steps);
    assert_eq!(steps(&plain), 0);
    // Each batch of 32 tokens runs at most 40 - 6 of its decode steps in fixed shapes; the
    // two n = 2 runs, 11 each.
    let fixed = steps(&graphs);
    assert!((3 * 20 + 2 * 11..=3 * 31 + 2 * 11).contains(&fixed), "{fixed} fixed-shape steps");
    assert_clean(&graphs);
}
