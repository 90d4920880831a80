//! Every sampling field with the real model: a behaviour test each (stop strings across token
//! boundaries, penalties, bias, masks, bad words, truncation, detokenize, output kinds,
//! prompt log probabilities against the float32 reference), validation before queueing, and
//! seeded reproducibility across runs.

mod common;

use common::{assert_clean, fixtures, llm_with};
use vllm_engine::{Error, FinishReason, Prompt, RequestOutputKind, SamplingParams, StopReason, LLM};

fn greedy(n: usize) -> SamplingParams {
    SamplingParams { ignore_eos: true, ..SamplingParams::greedy(n) }
}

fn run(llm: &LLM, prompt: &str, p: SamplingParams) -> vllm_engine::CompletionOutput {
    llm.generate([prompt], p).unwrap().remove(0).outputs.remove(0)
}

#[test]
fn stop_strings_cut_the_text_across_token_boundaries() {
    let llm = llm_with(|_| {});
    let prompt = "Once upon a time, in a small village,";
    let free = run(&llm, prompt, greedy(24));
    // A stop string that starts inside one token and ends inside a later one.
    let text = free.text.clone();
    let start = text.char_indices().nth(7).unwrap().0;
    let stop: String = text[start..].chars().take(9).collect();
    assert!(!stop.trim().is_empty());
    let cut = run(&llm, prompt, SamplingParams { stop: vec![stop.clone(), "zzzz".into()], ..greedy(24) });
    assert_eq!(cut.text, text[..start], "text is cut before the stop string");
    assert_eq!(cut.finish_reason, Some(FinishReason::Stop));
    assert_eq!(cut.stop_reason, Some(StopReason::Text(stop.clone())));
    assert!(cut.token_ids.len() < free.token_ids.len() && free.token_ids.starts_with(&cut.token_ids));
    let kept =
        run(&llm, prompt, SamplingParams { stop: vec![stop.clone()], include_stop_str_in_output: true, ..greedy(24) });
    assert_eq!(kept.text, format!("{}{stop}", &text[..start]));
    // Never matched: length.
    let none = run(&llm, prompt, SamplingParams { stop: vec!["\u{1F980}".into()], ..greedy(24) });
    assert_eq!((none.text, none.finish_reason), (text.clone(), Some(FinishReason::Length)));

    // Streamed deltas never show a partial stop string and add up to the final text.
    let deltas = llm.with_engine(|e| {
        let p = SamplingParams { stop: vec![stop.clone()], output_kind: RequestOutputKind::Delta, ..greedy(24) };
        e.add_request("d", prompt.into(), p).unwrap();
        let mut parts = Vec::new();
        while e.has_unfinished_requests() {
            for o in e.step().unwrap() {
                parts.push((o.outputs[0].text.clone(), o.outputs[0].token_ids.len(), o.finished));
            }
        }
        parts
    });
    let joined: String = deltas.iter().map(|d| d.0.as_str()).collect();
    assert_eq!(joined, cut.text);
    assert_eq!(deltas.iter().map(|d| d.1).sum::<usize>(), cut.token_ids.len(), "each token is sent once");
    assert!(deltas.last().unwrap().2);
    assert_clean(&llm);
}

#[test]
fn penalties_bias_masks_and_bad_words_change_what_is_generated() {
    let llm = llm_with(|_| {});
    let prompt = "Here is a list of fruits: apple, banana, apple, cherry, apple,";
    let max_repeat = |ids: &[u32]| {
        let mut c = std::collections::HashMap::new();
        ids.iter().for_each(|t| *c.entry(*t).or_insert(0) += 1);
        c.into_values().max().unwrap_or(0)
    };
    let plain = run(&llm, prompt, greedy(64));
    let freq = run(&llm, prompt, SamplingParams { frequency_penalty: 2.0, ..greedy(64) });
    let pres = run(&llm, prompt, SamplingParams { presence_penalty: 2.0, ..greedy(64) });
    let rep = run(&llm, prompt, SamplingParams { repetition_penalty: 2.0, ..greedy(64) });
    assert!(max_repeat(&plain.token_ids) >= 8, "the plain output repeats: {:?}", plain.text);
    for (name, o) in [("frequency", &freq), ("presence", &pres), ("repetition", &rep)] {
        assert!(max_repeat(&o.token_ids) < max_repeat(&plain.token_ids), "{name} penalty: {:?}", o.text);
    }
    // The repetition penalty also covers prompt tokens: fewer of them are generated.
    let prompt_ids = llm.with_engine(|e| e.prompt_ids(&Prompt::Text(prompt.into()))).unwrap();
    let from_prompt = |ids: &[u32]| ids.iter().filter(|t| prompt_ids.contains(t)).count();
    assert!(from_prompt(&rep.token_ids) < from_prompt(&plain.token_ids));
    let apple = llm.with_engine(|e| e.tokenizer().encode(" apple", false).unwrap())[0];

    let bias = run(&llm, prompt, SamplingParams { logit_bias: [(apple, 100.0)].into(), ..greedy(8) });
    assert!(bias.token_ids.iter().all(|&t| t == apple), "bias +100 forces the token");
    let allowed = vec![apple, 28, 30];
    let only = run(&llm, "Hello there", SamplingParams { allowed_token_ids: Some(allowed.clone()), ..greedy(8) });
    assert!(only.token_ids.iter().all(|t| allowed.contains(t)), "{:?}", only.token_ids);

    let capital = run(&llm, "The capital of France is", greedy(6));
    assert!(capital.text.contains("Paris"), "{:?}", capital.text);
    let banned = run(&llm, "The capital of France is", SamplingParams { bad_words: vec!["Paris".into()], ..greedy(6) });
    assert!(!banned.text.contains("Paris"), "{:?}", banned.text);
    assert_clean(&llm);
}

#[test]
fn truncation_detokenize_and_output_kinds() {
    let llm = llm_with(|_| {});
    let ids = llm.with_engine(|e| e.prompt_ids(&Prompt::Text("Hello, my name is John and I live in".into()))).unwrap();
    let t = llm
        .generate(
            ["Hello, my name is John and I live in"],
            SamplingParams { truncate_prompt_tokens: Some(4), ..greedy(5) },
        )
        .unwrap();
    assert_eq!(t[0].prompt_token_ids, ids[ids.len() - 4..]);
    let direct = llm.generate([Prompt::TokenIds(ids[ids.len() - 4..].to_vec())], greedy(5)).unwrap();
    assert_eq!(t[0].outputs[0].token_ids, direct[0].outputs[0].token_ids);

    let with_text = run(&llm, "The weather today", greedy(6));
    let no_text = run(&llm, "The weather today", SamplingParams { detokenize: false, ..greedy(6) });
    assert_eq!(no_text.token_ids, with_text.token_ids);
    assert_eq!(no_text.text, "");

    let collect = |kind: RequestOutputKind| {
        llm.with_engine(|e| {
            e.add_request("k", "The weather today".into(), SamplingParams { output_kind: kind, ..greedy(6) }).unwrap();
            let mut outs = Vec::new();
            while e.has_unfinished_requests() {
                outs.extend(e.step().unwrap());
            }
            outs
        })
    };
    let cumulative = collect(RequestOutputKind::Cumulative);
    assert_eq!(cumulative.len(), 6);
    assert_eq!(cumulative.last().unwrap().outputs[0].token_ids, with_text.token_ids);
    let final_only = collect(RequestOutputKind::FinalOnly);
    assert_eq!(final_only.len(), 1);
    assert!(final_only[0].finished);
    assert_eq!(final_only[0].outputs[0].text, with_text.text);
    let delta = collect(RequestOutputKind::Delta);
    assert!(delta.iter().all(|o| o.outputs[0].token_ids.len() == 1));
    let joined: String = delta.iter().map(|o| o.outputs[0].text.as_str()).collect();
    assert_eq!(joined, with_text.text);
    assert_clean(&llm);
}

#[test]
fn prompt_logprobs_match_the_float32_reference() {
    let fx = fixtures();
    let llm = llm_with(|a| a.quantization = vllm_engine::Quantization::None);
    for case in fx.cases.iter().take(4) {
        // Prompt + its first greedy token: the last prompt position's log probabilities are
        // the reference's first generated position.
        let mut ids = case.prompt_ids.clone();
        ids.push(case.greedy_ids[0]);
        let p = SamplingParams { prompt_logprobs: Some(5), ..greedy(1) };
        let o = llm.generate([Prompt::TokenIds(ids.clone())], p).unwrap().remove(0);
        let lps = o.prompt_logprobs.expect("prompt logprobs were asked for");
        assert_eq!(lps.len(), ids.len());
        assert!(lps[0].is_none(), "the first position has no context");
        assert!(lps[1..].iter().all(Option::is_some));
        let last = lps.last().unwrap().as_ref().unwrap();
        assert_eq!(last.sampled.token_id, case.greedy_ids[0]);
        assert_eq!(last.sampled.rank, 1, "greedy token is the most likely");
        assert_eq!(last.top.len(), 5);
        for (got, want) in last.top.iter().zip(&case.first_top5) {
            assert_eq!(got.token_id, want.0, "{:?}", case.text);
            assert!((got.logprob - want.1).abs() < 1e-3, "{} vs {}", got.logprob, want.1);
        }
        // Each position's token is the prompt token that follows.
        for (pos, lp) in lps.iter().enumerate().skip(1) {
            assert_eq!(lp.as_ref().unwrap().sampled.token_id, ids[pos]);
        }
    }
    // With prompt logprobs the prompt is computed even when cached, chunked or not.
    let chunked = llm_with(|a| {
        a.quantization = vllm_engine::Quantization::None;
        a.max_num_batched_tokens = Some(8);
    });
    let ids = fx.cases[0].prompt_ids.clone();
    let p = SamplingParams { prompt_logprobs: Some(2), ..greedy(1) };
    let a = chunked.generate([Prompt::TokenIds(ids.clone())], p.clone()).unwrap().remove(0);
    let b = chunked.generate([Prompt::TokenIds(ids.clone())], p.clone()).unwrap().remove(0);
    let whole = llm.generate([Prompt::TokenIds(ids)], p).unwrap().remove(0);
    assert_eq!(a.prompt_logprobs, b.prompt_logprobs);
    let (a, w) = (a.prompt_logprobs.unwrap(), whole.prompt_logprobs.unwrap());
    for (x, y) in a.iter().zip(&w).skip(1) {
        let (x, y) = (x.as_ref().unwrap(), y.as_ref().unwrap());
        assert_eq!(x.sampled.token_id, y.sampled.token_id);
        assert!((x.sampled.logprob - y.sampled.logprob).abs() < 1e-3);
    }
    assert_clean(&chunked);
}

#[test]
fn invalid_fields_are_rejected_before_queueing() {
    let llm = llm_with(|_| {});
    let bad = |p: SamplingParams| match llm.generate(["hi"], p) {
        Err(Error::InvalidParams(e)) => e.param,
        other => panic!("expected a parameter error, got {other:?}"),
    };
    assert_eq!(bad(SamplingParams { logit_bias: [(10_000_000, 1.0)].into(), ..greedy(2) }), "logit_bias");
    assert_eq!(bad(SamplingParams { allowed_token_ids: Some(vec![49_152]), ..greedy(2) }), "allowed_token_ids");
    assert_eq!(bad(SamplingParams { presence_penalty: 3.0, ..greedy(2) }), "presence_penalty");
    assert_eq!(bad(SamplingParams { repetition_penalty: -1.0, ..greedy(2) }), "repetition_penalty");
    assert_eq!(bad(SamplingParams { min_tokens: 5, ..greedy(2) }), "min_tokens");
    assert_eq!(bad(SamplingParams { n: 3, best_of: Some(2), ..greedy(2) }), "best_of");
    assert_eq!(bad(SamplingParams { top_p: 0.0, ..greedy(2) }), "top_p");
    assert_eq!(bad(SamplingParams { temperature: -1.0, ..greedy(2) }), "temperature");
    assert_eq!(bad(SamplingParams { prompt_logprobs: Some(50), ..greedy(2) }), "prompt_logprobs");
    assert_clean(&llm);
}

#[test]
fn seeded_sampling_is_reproducible_across_runs_and_preemption() {
    let prompts: Vec<String> = (0..6).map(|i| format!("Story {i}: the dragon and the")).collect();
    let p = SamplingParams {
        temperature: 0.8,
        top_p: 0.9,
        top_k: 40,
        frequency_penalty: 0.5,
        seed: Some(42),
        ..greedy(32)
    };
    let a = llm_with(|_| {}).generate(&prompts, p.clone()).unwrap();
    let b = llm_with(|_| {}).generate(&prompts, p.clone()).unwrap();
    let tight = llm_with(|a| a.kv_cache_memory = 10 * common::BLOCK_BYTES);
    let c = tight.generate(&prompts, p).unwrap();
    assert!(tight.with_engine(|e| e.stats()).num_preemptions > 0);
    for ((x, y), z) in a.iter().zip(&b).zip(&c) {
        assert_eq!(x.outputs[0].token_ids, y.outputs[0].token_ids, "across runs");
        assert_eq!(x.outputs[0].token_ids, z.outputs[0].token_ids, "after preemption");
    }
    assert_clean(&tight);
}
