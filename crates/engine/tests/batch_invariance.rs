//! A prompt's greedy output is the same alone, inside a batch of 32 mixed-length prompts, and
//! with chunked prefill forced small.

mod common;

use vllm_engine::{EngineArgs, RequestOutput, SamplingParams, LLM};

fn prompts() -> Vec<String> {
    let mut p: Vec<String> = common::fixtures().cases.into_iter().map(|c| c.text).collect();
    let sentence = "The quick brown fox jumps over the lazy dog while the sun sets over the quiet hills. ";
    let mut i = 0;
    while p.len() < 32 {
        // Lengths from a few tokens to ~200, so blocks end partially full at every offset.
        let reps = 1 + (i * 7) % 11;
        p.push(format!("{}Question {i}: what happens next?", sentence.repeat(reps)));
        i += 1;
    }
    p
}

fn llm(max_num_batched_tokens: Option<usize>) -> LLM {
    let mut args = EngineArgs::new(common::default_gguf().to_string_lossy());
    args.kv_cache_memory = 1 << 30;
    args.max_num_batched_tokens = max_num_batched_tokens;
    let mut llm = LLM::new(args).unwrap();
    llm.set_use_tqdm(false);
    llm
}

fn ids(outs: &[RequestOutput]) -> Vec<Vec<u32>> {
    outs.iter().map(|o| o.outputs[0].token_ids.clone()).collect()
}

#[test]
fn greedy_output_is_batch_invariant() {
    let prompts = prompts();
    assert_eq!(prompts.len(), 32);
    let params = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(12) };

    let engine = llm(None);
    let alone: Vec<Vec<u32>> =
        prompts.iter().map(|p| ids(&engine.generate([p.as_str()], &params).unwrap()).remove(0)).collect();
    let batched = ids(&engine.generate(&prompts, &params).unwrap());
    let free = engine.with_engine(|e| e.stats());
    assert_eq!(free.num_free_blocks, free.num_blocks, "every block is free after the batch");

    let chunked = ids(&llm(Some(8)).generate(&prompts, &params).unwrap());
    for i in 0..prompts.len() {
        assert_eq!(alone[i], batched[i], "prompt {i} ({:?}): alone vs batch of 32", prompts[i]);
        assert_eq!(alone[i], chunked[i], "prompt {i} ({:?}): alone vs 8-token chunked prefill", prompts[i]);
    }
}
