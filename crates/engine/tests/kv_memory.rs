//! KV memory and scheduling with the real model: prefix caching (on, off, salted), parallel
//! samples sharing their prompt with copy-on-write, abort from another thread, preemption of
//! forked samples, chunked prefill of a long prompt, and the memory report.

mod common;

use std::time::Duration;

use common::{assert_clean, llm_with};
use vllm_engine::{FinishReason, Prompt, SamplingParams, LLM};

const SYSTEM: &str = "You are a careful assistant for a city library. You answer questions about \
    opening hours, borrowing rules, late fees, the reading rooms, the children's section, \
    the archive of old newspapers, public computers, printing, events and membership. Keep \
    answers short, friendly and accurate, and say when you do not know something. ";

fn greedy(n: usize) -> SamplingParams {
    SamplingParams { ignore_eos: true, ..SamplingParams::greedy(n) }
}

fn ids(llm: &LLM, text: &str) -> Vec<u32> {
    llm.with_engine(|e| e.prompt_ids(&Prompt::Text(text.into()))).unwrap()
}

#[test]
fn shared_prefix_is_computed_once_and_the_salt_separates_tenants() {
    let llm = llm_with(|_| {});
    let questions = ["When do you open on Sundays?", "How much is a late fee?", "Can I print in colour?"];
    let prompts: Vec<String> = questions.iter().map(|q| format!("{SYSTEM}Question: {q}")).collect();
    let lens: Vec<usize> = prompts.iter().map(|p| ids(&llm, p).len()).collect();
    let first = ids(&llm, &prompts[0]);
    llm.generate([&prompts[0]], greedy(4)).unwrap();
    let before = llm.with_engine(|e| e.stats());
    let cached = llm.generate(&prompts[1..], greedy(4)).unwrap();
    let after = llm.with_engine(|e| e.stats());
    // Each later prompt reuses the full blocks it shares with the first one.
    let mut expect_hits = 0;
    for p in &prompts[1..] {
        let t = ids(&llm, p);
        let common = t.iter().zip(&first).take_while(|(a, b)| a == b).count();
        expect_hits += common.min(t.len() - 1) / 16 * 16;
    }
    assert!(expect_hits >= 2 * 48, "the system prompt spans several blocks");
    assert_eq!((after.prefix_cache_hits - before.prefix_cache_hits) as usize, expect_hits);
    let computed = (after.num_computed_prompt_tokens - before.num_computed_prompt_tokens) as usize;
    assert_eq!(computed, lens[1] + lens[2] - expect_hits, "only the uncached rest is computed");

    // The same requests without prefix caching give the same tokens and never hit.
    let plain = llm_with(|a| a.enable_prefix_caching = false);
    let want = plain.generate(&prompts[1..], greedy(4)).unwrap();
    for (w, g) in want.iter().zip(&cached) {
        assert_eq!(w.outputs[0].token_ids, g.outputs[0].token_ids);
        assert_eq!(w.num_cached_tokens, 0);
    }
    plain.generate(&prompts[1..], greedy(1)).unwrap();
    assert_eq!(plain.with_engine(|e| e.stats()).prefix_cache_hits, 0, "caching off never hits");

    // A salted request does not see the unsalted blocks, but sees those of its own salt.
    let salted = |salt: &str| SamplingParams { cache_salt: Some(salt.into()), ..greedy(2) };
    let a1 = llm.generate([&prompts[0]], salted("tenant-a")).unwrap();
    assert_eq!(a1[0].num_cached_tokens, 0, "another salt must miss");
    let a2 = llm.generate([&prompts[0]], salted("tenant-a")).unwrap();
    assert!(a2[0].num_cached_tokens >= 48, "the same salt hits ({})", a2[0].num_cached_tokens);
    let b = llm.generate([&prompts[0]], salted("tenant-b")).unwrap();
    assert_eq!(b[0].num_cached_tokens, 0);
    assert_eq!(a1[0].outputs[0].token_ids, a2[0].outputs[0].token_ids);
    assert_clean(&llm);
}

#[test]
fn parallel_samples_share_the_prompt_copy_on_write_and_survive_preemption() {
    let prompt = format!("{SYSTEM}Question: Tell me a short story about the archive.");
    let params = SamplingParams { n: 4, seed: Some(5), temperature: 0.9, ..greedy(24) };
    let llm = llm_with(|_| {});
    let len = ids(&llm, &prompt).len();
    assert_ne!(len % 16, 0, "the last prompt block must be partial for copy-on-write to happen");
    let before = llm.with_engine(|e| e.stats());
    let outs = llm.generate([&prompt], &params).unwrap();
    let after = llm.with_engine(|e| e.stats());
    assert_eq!(
        (after.num_computed_prompt_tokens - before.num_computed_prompt_tokens) as usize,
        len,
        "the prompt is computed once for all four samples"
    );
    // One seed makes the whole request reproducible, and sample i is seed + i alone.
    let again = llm.generate([&prompt], &params).unwrap();
    assert_eq!(outs[0].outputs, again[0].outputs);
    let alone = llm.generate([&prompt], &SamplingParams { n: 1, seed: Some(5 + 2), ..params.clone() }).unwrap();
    assert_eq!(alone[0].outputs[0].token_ids, outs[0].outputs[2].token_ids);
    assert_clean(&llm);

    // A cache of 8 blocks holds the prompt and one sample's tail, not all four: samples
    // are preempted and recomputed, with the same result.
    let tight = llm_with(|a| a.kv_cache_memory = 8 * common::BLOCK_BYTES);
    let got = tight.generate([&prompt], &params).unwrap();
    assert!(tight.with_engine(|e| e.stats()).num_preemptions > 0, "the tiny cache must force preemption");
    assert_eq!(got[0].outputs, outs[0].outputs);
    assert_clean(&tight);
}

#[test]
fn abort_from_another_thread_ends_the_request_and_frees_its_blocks() {
    let llm = llm_with(|_| {});
    let handle = llm.abort_handle();
    let aborter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        handle.abort("0");
    });
    // Request "0" would take minutes; "1" is short.
    let params = vec![greedy(4000), greedy(8)];
    let outs = llm.generate(["Write a very long essay about rivers.", "Hello"], params).unwrap();
    aborter.join().unwrap();
    assert_eq!(outs[0].outputs[0].finish_reason, Some(FinishReason::Abort));
    assert!(outs[0].outputs[0].token_ids.len() < 4000);
    assert!(outs[0].finished);
    assert_eq!(outs[1].outputs[0].finish_reason, Some(FinishReason::Length));
    assert_clean(&llm);

    // Through the engine: the abort lands at the next step, which returns the final output.
    llm.with_engine(|e| {
        e.add_request("x", "Once upon a time".into(), greedy(100)).unwrap();
        e.step().unwrap();
        let used = e.stats().num_blocks - e.stats().num_free_blocks;
        assert!(used > 0);
        e.abort_handle().abort("x");
        e.abort_handle().abort("never-existed");
        let outs = e.step().unwrap();
        assert_eq!(outs.len(), 1);
        assert_eq!(outs[0].request_id, "x");
        assert_eq!(outs[0].outputs[0].finish_reason, Some(FinishReason::Abort));
        assert_eq!(e.stats().num_free_blocks, e.stats().num_blocks);
    });
    assert_clean(&llm);
}

/// A ~2000-token prompt of varied sentences.
fn long_prompt(llm: &LLM) -> Vec<u32> {
    let mut text = String::new();
    let things = ["river", "mountain", "library", "market", "harbour", "garden", "bridge", "tower"];
    let mut i = 0;
    while text.is_empty() || ids(llm, &text).len() < 2000 {
        for _ in 0..20 {
            text += &format!(
                "Note {i}: the {} near the {} was built in {} and rebuilt after the flood of {}. ",
                things[i % 8],
                things[(i * 3 + 1) % 8],
                1700 + i * 7 % 300,
                1800 + i * 13 % 200
            );
            i += 1;
        }
    }
    let mut t = ids(llm, &text);
    t.truncate(2000);
    t
}

#[test]
fn chunked_prefill_of_a_long_prompt_matches_and_decode_keeps_running() {
    let whole = llm_with(|_| {});
    let prompt = long_prompt(&whole);
    let want = whole.generate([Prompt::TokenIds(prompt.clone())], greedy(8)).unwrap();
    drop(whole);
    let chunked = llm_with(|a| a.max_num_batched_tokens = Some(64));
    let got = chunked.generate([Prompt::TokenIds(prompt.clone())], greedy(8)).unwrap();
    assert_eq!(got[0].outputs[0].token_ids, want[0].outputs[0].token_ids, "chunking changed the output");

    // While the long prompt is prefilled 63 tokens a step, a decoding request gets a token
    // in every step: no head-of-line blocking. (A different first token keeps the prefix
    // cache from serving the prompt computed above.)
    let mut fresh = prompt;
    fresh[0] = fresh[1];
    chunked.with_engine(|e| {
        e.add_request("short", "The weather today".into(), greedy(60)).unwrap();
        e.step().unwrap();
        e.add_request("long", Prompt::TokenIds(fresh), greedy(1)).unwrap();
        let mut steps = 0;
        loop {
            let outs = e.step().unwrap();
            steps += 1;
            let short = outs.iter().find(|o| o.request_id == "short").expect("the short request advanced");
            assert_eq!(short.outputs[0].token_ids.len(), steps + 1);
            if outs.iter().any(|o| o.request_id == "long") {
                break;
            }
        }
        assert!(steps >= 2000 / 63, "the prompt took {steps} steps");
        e.abort_request("short");
    });
    assert_clean(&chunked);
}

#[test]
fn memory_report_counts_blocks_tokens_and_sharing() {
    let llm = llm_with(|_| {});
    llm.with_engine(|e| {
        let lens = [37usize, 100, 5];
        for (i, &n) in lens.iter().enumerate() {
            let prompt: Vec<u32> = (0..n as u32).map(|t| 1000 + t * 7 + i as u32 * 1000).collect();
            e.add_request(format!("r{i}"), Prompt::TokenIds(prompt), greedy(3)).unwrap();
        }
        e.step().unwrap(); // every prompt in one step
        let m = e.stats().kv_memory;
        assert_eq!(m.tokens_held, 142);
        assert_eq!(m.blocks_in_use, 3 + 7 + 1);
        assert_eq!(m.slots_in_use, 11 * 16);
        assert_eq!(m.logical_tokens, 142);
        assert!((m.waste() - (176.0 - 142.0) / 176.0).abs() < 1e-9);
        while e.has_unfinished_requests() {
            e.step().unwrap();
        }
        // Four samples of a 40-token prompt after the fork: the prompt's blocks are held once.
        let p = SamplingParams { n: 4, temperature: 1.0, ..greedy(3) };
        e.add_request("n4", Prompt::TokenIds((2000..2040).collect()), p).unwrap();
        e.step().unwrap();
        let m = e.stats().kv_memory;
        assert_eq!((m.blocks_in_use, m.tokens_held, m.logical_tokens), (3, 40, 160));
        while e.has_unfinished_requests() {
            e.step().unwrap();
        }
        assert_eq!(e.stats().kv_memory, Default::default());
    });
    assert_clean(&llm);
}

/// `--kv-cache-dtype`: `auto` holds float16 for the GGUF file's own quantization (twice the
/// blocks of float32 in the same memory) and float32 on the reference path; explicit types
/// override it; every choice generates.
#[test]
fn kv_cache_dtype_sizes_the_cache_and_generates() {
    use vllm_engine::{KvCacheDtype, Quantization};
    let mem = 40 * common::BLOCK_BYTES;
    let cases = [
        (Quantization::Auto, KvCacheDtype::Auto, 40),
        (Quantization::None, KvCacheDtype::Auto, 20),
        (Quantization::Int8, KvCacheDtype::Auto, 40),
        (Quantization::Auto, KvCacheDtype::Float32, 20),
        (Quantization::Auto, KvCacheDtype::BFloat16, 40),
        (Quantization::None, KvCacheDtype::Float16, 40),
    ];
    for (quantization, dtype, blocks) in cases {
        let llm = llm_with(|a| {
            a.kv_cache_memory = mem;
            a.quantization = quantization;
            a.kv_cache_dtype = dtype;
        });
        assert_eq!(llm.with_engine(|e| e.stats()).num_blocks, blocks, "{quantization:?} {dtype:?}");
        let out = llm.generate(["The capital of France is"], greedy(6)).unwrap();
        let text = &out[0].outputs[0].text;
        assert_eq!(out[0].outputs[0].token_ids.len(), 6, "{quantization:?} {dtype:?}");
        assert!(text.contains("Paris"), "{quantization:?} {dtype:?}: {text:?}");
        assert_clean(&llm);
    }
}
