//! The offline API's behaviour: outputs, stop rules, seeds, preemption, and typed errors that
//! leave no request or block behind.

mod common;

use std::time::Instant;

use vllm_engine::{EngineArgs, Error, FinishReason, Prompt, SamplingParams, LLM};

use common::{assert_clean, llm_with};

#[test]
fn outputs_are_in_input_order_and_shaped_like_vllm() {
    let llm = llm_with(|_| {});
    let params = vec![SamplingParams::greedy(3), SamplingParams::greedy(7)];
    let outs = llm.generate(["The capital of France is", "Hello, my name is"], params).unwrap();
    assert_eq!(outs.len(), 2);
    assert_eq!(outs[0].prompt.as_deref(), Some("The capital of France is"));
    assert_eq!(outs[0].prompt_token_ids, vec![504, 3575, 282, 4649, 314]);
    assert_eq!(outs[0].outputs[0].token_ids.len(), 3);
    assert_eq!(outs[1].outputs[0].token_ids.len(), 7);
    assert_eq!(outs[0].outputs[0].finish_reason, Some(FinishReason::Length));
    assert!(outs[0].outputs[0].text.starts_with(" Paris"), "{:?}", outs[0].outputs[0].text);
    assert!(outs.iter().all(|o| o.finished));
    // Token-id prompts give the same result as the text they encode.
    let by_ids = llm.generate([Prompt::TokenIds(outs[0].prompt_token_ids.clone())], SamplingParams::greedy(3)).unwrap();
    assert_eq!(by_ids[0].outputs[0].token_ids, outs[0].outputs[0].token_ids);
    assert_eq!(by_ids[0].prompt, None);
    assert_clean(&llm);
}

#[test]
fn chat_answer_stops_at_eos_and_hides_it() {
    let llm = llm_with(|_| {});
    let prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    let out = &llm.generate([prompt], SamplingParams::greedy(64)).unwrap()[0].outputs[0];
    assert_eq!(out.finish_reason, Some(FinishReason::Stop));
    assert_eq!(out.stop_reason, None, "EOS is not a stop_token_id");
    assert_eq!(*out.token_ids.last().unwrap(), 2, "<|im_end|> (EOS) ends the ids");
    assert_eq!(out.text, "The capital of France is Paris.");
    // ignore_eos keeps going to max_tokens.
    let p = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(20) };
    let out = &llm.generate([prompt], &p).unwrap()[0].outputs[0];
    assert_eq!((out.token_ids.len(), out.finish_reason), (20, Some(FinishReason::Length)));
}

#[test]
fn stop_token_ids_and_min_tokens() {
    let llm = llm_with(|_| {});
    let prompt = "Once upon a time, in a small village,";
    let free = llm.generate([prompt], &SamplingParams { ignore_eos: true, ..SamplingParams::greedy(10) }).unwrap();
    let ids = free[0].outputs[0].token_ids.clone();
    let stop_at = ids[3];
    let first = ids.iter().position(|&t| t == stop_at).unwrap();
    let p = SamplingParams { stop_token_ids: vec![stop_at], ..SamplingParams::greedy(10) };
    let out = &llm.generate([prompt], &p).unwrap()[0].outputs[0];
    assert_eq!(out.token_ids, ids[..=first].to_vec());
    assert_eq!(
        (out.finish_reason, out.stop_reason.clone()),
        (Some(FinishReason::Stop), Some(vllm_engine::StopReason::Token(stop_at)))
    );
    // min_tokens: stop tokens cannot be generated before it (vLLM masks them).
    let p = SamplingParams {
        stop_token_ids: vec![stop_at],
        min_tokens: first + 2,
        ignore_eos: true,
        ..SamplingParams::greedy(10)
    };
    let out = &llm.generate([prompt], &p).unwrap()[0].outputs[0];
    assert!(out.token_ids.len() > first + 1);
    assert_eq!(out.token_ids[..first], ids[..first]);
    assert!(!out.token_ids[..first + 2].contains(&stop_at), "{:?}", out.token_ids);
}

#[test]
fn seeded_sampling_is_reproducible_whatever_the_batch() {
    let llm = llm_with(|_| {});
    let seeded =
        SamplingParams { temperature: 1.0, top_p: 0.9, top_k: 50, seed: Some(1234), ..SamplingParams::greedy(24) };
    let other = SamplingParams { temperature: 1.2, ..SamplingParams::greedy(24) };
    let alone = llm.generate(["The future of AI is"], &seeded).unwrap()[0].outputs[0].token_ids.clone();
    let batch = llm
        .generate(
            ["Hello, my name is", "The future of AI is", "def fibonacci(n):"],
            vec![other.clone(), seeded.clone(), other],
        )
        .unwrap();
    assert_eq!(alone, batch[1].outputs[0].token_ids, "same seed, same tokens, alone or batched");
    let reseeded = SamplingParams { seed: Some(99), ..seeded };
    let different = llm.generate(["The future of AI is"], &reseeded).unwrap()[0].outputs[0].token_ids.clone();
    assert_ne!(alone, different, "another seed should sample differently");
}

#[test]
fn preemption_by_recompute_keeps_greedy_outputs() {
    let prompts: Vec<String> = (0..8)
        .map(|i| {
            format!(
                "Story {i}: once upon a time, a dragon named {} lived",
                ["Ada", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal"][i]
            )
        })
        .collect();
    let params = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(40) };
    let roomy = llm_with(|_| {});
    let want = roomy.generate(&prompts, &params).unwrap();
    // 12 blocks (of common::BLOCK_BYTES) hold 192 tokens, far less than the 8 x ~55 the batch needs at once.
    let tight = llm_with(|a| a.kv_cache_memory = 12 * common::BLOCK_BYTES);
    let got = tight.generate(&prompts, &params).unwrap();
    let stats = tight.with_engine(|e| e.stats());
    assert_eq!(stats.num_blocks, 12);
    assert!(stats.num_preemptions > 0, "the tiny cache must force preemption");
    for (w, g) in want.iter().zip(&got) {
        assert_eq!(w.outputs[0].token_ids, g.outputs[0].token_ids);
    }
    assert_clean(&tight);
}

#[test]
fn bad_input_is_a_typed_error_and_leaves_nothing_behind() {
    let llm = llm_with(|a| a.max_model_len = Some(64));
    let g = |p: Prompt, s: SamplingParams| llm.generate([p], &s).unwrap_err();
    assert!(matches!(g(Prompt::Text(String::new()), SamplingParams::default()), Error::InvalidPrompt(_)));
    assert!(matches!(g(Prompt::TokenIds(vec![1, 999_999]), SamplingParams::default()), Error::InvalidPrompt(_)));
    let long = "word ".repeat(100);
    assert!(matches!(g(Prompt::Text(long), SamplingParams::default()), Error::PromptTooLong { max_model_len: 64, .. }));
    let e = g("hi".into(), SamplingParams { temperature: -1.0, ..Default::default() });
    assert!(matches!(&e, Error::InvalidParams(p) if p.param == "temperature"), "{e}");
    let e = g("hi".into(), SamplingParams { max_tokens: Some(100), ..Default::default() });
    assert!(
        matches!(&e, Error::InvalidParams(p) if p.param == "max_tokens"),
        "prompt + max_tokens beyond max_model_len: {e}"
    );
    // A bad prompt in the middle of a batch: nothing runs, nothing leaks.
    let e = llm.generate(
        [Prompt::from("fine"), Prompt::TokenIds(vec![]), Prompt::from("also fine")],
        SamplingParams::default(),
    );
    assert!(e.is_err());
    let e = llm.generate(["a", "b"], vec![SamplingParams::default()]).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { param: "sampling_params", .. }));
    assert_clean(&llm);
    // The engine still works afterwards.
    assert_eq!(llm.generate(["hi"], SamplingParams::greedy(2)).unwrap()[0].outputs[0].token_ids.len(), 2);
}

#[test]
fn request_larger_than_the_whole_cache_is_rejected_at_once() {
    let llm = llm_with(|a| a.kv_cache_memory = 2 * common::BLOCK_BYTES); // 32 token slots
    let e = llm.generate(["The capital of France is"], SamplingParams::greedy(100)).unwrap_err();
    assert!(matches!(e, Error::Scheduler(vllm_scheduler::SchedulerError::ExceedsCache { .. })), "{e}");
    assert_clean(&llm);
}

#[test]
fn engine_args_are_validated() {
    let path = common::default_gguf().to_string_lossy().to_string();
    let bad = |f: &dyn Fn(&mut EngineArgs)| {
        let mut a = EngineArgs::new(path.clone());
        f(&mut a);
        LLM::new(a).err().expect("invalid args must fail")
    };
    assert!(matches!(bad(&|a| a.max_model_len = Some(1 << 20)), Error::InvalidArgument { param: "max_model_len", .. }));
    assert!(matches!(bad(&|a| a.kv_cache_memory = 1000), Error::InvalidArgument { param: "kv_cache_memory", .. }));
    assert!(matches!(bad(&|a| a.device = "tpu".into()), Error::InvalidArgument { param: "device", .. }));
    let t = Instant::now();
    let e = LLM::new(EngineArgs::new("./no/such/model")).err().unwrap();
    assert!(matches!(e, Error::ModelNotFound { .. }), "{e}");
    assert!(t.elapsed().as_secs() < 5);
}
