//! Log probabilities (checked against the float32 reference), parallel sampling (`n`), and
//! `best_of` ranking, on the real model.

mod common;

use vllm_engine::{SamplingParams, LLM};

use common::assert_clean;

fn llm() -> LLM {
    common::llm_with(|_| {})
}

#[test]
fn logprobs_match_the_float32_reference() {
    let llm = common::llm_with(|a| a.quantization = vllm_engine::Quantization::None);
    let fx = common::fixtures();
    let prompts: Vec<Vec<u32>> = fx.cases.iter().map(|c| c.prompt_ids.clone()).collect();
    let params = SamplingParams { logprobs: Some(5), ..SamplingParams::greedy(2) };
    let outs = llm.generate(prompts, &params).unwrap();
    let mut worst = 0f32;
    for (case, out) in fx.cases.iter().zip(&outs) {
        let c = &out.outputs[0];
        let lps = c.logprobs.as_ref().expect("logprobs were asked for");
        assert_eq!(lps.len(), c.token_ids.len(), "one entry per generated token");
        let first = &lps[0];
        assert_eq!(first.sampled.token_id, c.token_ids[0]);
        assert_eq!(first.sampled.rank, 1, "greedy picks the most likely token");
        assert_eq!(first.top.len(), 5);
        for (got, &(id, want)) in first.top.iter().zip(&case.first_top5) {
            assert_eq!(got.token_id, id, "{:?}: top-5 order", case.text);
            worst = worst.max((got.logprob - want).abs());
        }
        assert_eq!(first.top[0].logprob, first.sampled.logprob);
        assert_eq!(
            first.sampled.decoded_token,
            llm.with_engine(|e| e.tokenizer().decode(&c.token_ids[..1], false).unwrap())
        );
        let cum: f64 = lps.iter().map(|p| p.sampled.logprob as f64).sum();
        assert!((c.cumulative_logprob.unwrap() - cum).abs() < 1e-6);
    }
    assert!(worst < 1e-3, "largest logprob error against transformers float32: {worst}");
    // Without the option there are none, and no cumulative figure.
    let plain = llm.generate(["Hello"], SamplingParams::greedy(2)).unwrap();
    assert!(plain[0].outputs[0].logprobs.is_none() && plain[0].outputs[0].cumulative_logprob.is_none());
    assert_clean(&llm);
}

#[test]
fn parallel_samples_are_seeded_like_vllm_and_share_the_prompt() {
    let llm = llm();
    // A prompt of several full blocks, so sharing shows in the prefix-cache counters.
    let prompt = "The history of the city goes back to the Roman era, when a small settlement grew up \
                  on the river bank. Over the centuries it became a market town, then an industrial \
                  centre, and today it is known for";
    let params =
        SamplingParams { n: 4, seed: Some(7), temperature: 1.0, ignore_eos: true, ..SamplingParams::greedy(12) };
    let before = llm.with_engine(|e| e.stats());
    let outs = llm.generate([prompt], &params).unwrap();
    let after = llm.with_engine(|e| e.stats());
    let o = &outs[0];
    assert_eq!(o.outputs.len(), 4);
    assert!(o.outputs.iter().enumerate().all(|(i, c)| c.index == i && c.token_ids.len() == 12));
    let prompt_len = o.prompt_token_ids.len();
    assert!(prompt_len >= 32, "prompt of {prompt_len} tokens");
    let computed = after.num_computed_prompt_tokens - before.num_computed_prompt_tokens;
    assert_eq!(computed as usize, prompt_len, "the four samples share one computation of the prompt");
    // Sample i is the request with seed + i, alone.
    for i in [0usize, 3] {
        let single = SamplingParams { n: 1, seed: Some(7 + i as u64), ..params.clone() };
        let alone = llm.generate([prompt], &single).unwrap();
        assert_eq!(alone[0].outputs[0].token_ids, o.outputs[i].token_ids, "sample {i}");
    }
    let distinct: std::collections::HashSet<&Vec<u32>> = o.outputs.iter().map(|c| &c.token_ids).collect();
    assert!(distinct.len() > 1, "temperature 1 samples should differ");
    assert_clean(&llm);
}

#[test]
fn best_of_returns_the_n_most_likely_candidates() {
    let llm = llm();
    let prompt = "Once upon a time";
    let base = SamplingParams { temperature: 1.0, seed: Some(11), ..SamplingParams::greedy(8) };
    // The same five candidates, all returned, with their cumulative log probabilities.
    let all = llm.generate([prompt], &SamplingParams { n: 5, logprobs: Some(0), ..base.clone() }).unwrap();
    let mut ranked: Vec<(f64, Vec<u32>)> =
        all[0].outputs.iter().map(|c| (c.cumulative_logprob.unwrap(), c.token_ids.clone())).collect();
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
    let best = llm.generate([prompt], &SamplingParams { n: 2, best_of: Some(5), ..base }).unwrap();
    let got: Vec<(f64, Vec<u32>)> =
        best[0].outputs.iter().map(|c| (c.cumulative_logprob.unwrap(), c.token_ids.clone())).collect();
    assert_eq!(got.len(), 2);
    assert_eq!(best[0].outputs[1].index, 1);
    for (g, r) in got.iter().zip(&ranked) {
        assert_eq!(g.1, r.1);
        assert!((g.0 - r.0).abs() < 1e-9);
    }
    assert_clean(&llm);
}

#[test]
fn aborting_a_parallel_request_frees_every_sample() {
    let llm = llm();
    llm.with_engine(|e| {
        let p = SamplingParams { n: 3, temperature: 1.0, ..SamplingParams::greedy(50) };
        e.add_request("r", "Tell me a story".into(), p).unwrap();
        e.step().unwrap();
        e.step().unwrap();
        let out = e.abort_request("r").expect("known request");
        assert_eq!(out.outputs.len(), 3);
        assert!(out.finished);
        assert!(out.outputs.iter().all(|c| c.finish_reason == Some(vllm_engine::FinishReason::Abort)));
    });
    assert_clean(&llm);
}
