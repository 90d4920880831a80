//! The input processor over arbitrary requests: it never panics, and every request it accepts
//! is one the engine core can queue and finish without leaking a block.

mod common;

use std::sync::atomic::AtomicBool;

use proptest::prelude::*;
use vllm_engine::{Error, GuidedDecodingParams, Prompt, SamplingParams};

/// Integers around every boundary that matters (0, 1, the limits, the type's ends).
fn edgy_usize() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(0usize),
        Just(1),
        Just(255),
        Just(256),
        Just(257),
        Just(2047),
        Just(2048),
        Just(usize::MAX),
        Just(usize::MAX - 1),
        Just(1usize << 63),
        0usize..64,
        any::<usize>(),
    ]
}

fn params() -> impl Strategy<Value = SamplingParams> {
    (
        (
            prop_oneof![3 => 1usize..4, 1 => edgy_usize()],
            proptest::option::of(edgy_usize()),
            proptest::option::of(prop_oneof![3 => 1usize..8, 1 => edgy_usize()]),
            prop_oneof![3 => Just(0usize), 1 => edgy_usize()],
        ),
        (
            proptest::option::of(prop_oneof![3 => 0usize..5, 1 => edgy_usize()]),
            proptest::option::of(prop_oneof![3 => 0usize..5, 1 => edgy_usize()]),
            proptest::option::of(edgy_usize()),
        ),
        (
            prop_oneof![3 => 0.0f32..2.0, 1 => any::<f32>()],
            prop_oneof![3 => 0.05f32..=1.0, 1 => any::<f32>()],
            prop_oneof![3 => -1i32..50, 1 => any::<i32>()],
            prop_oneof![3 => 0.0f32..=1.0, 1 => any::<f32>()],
        ),
        (
            proptest::collection::vec("[a-z ]{1,4}", 0..4),
            prop_oneof![3 => Just(Vec::new()), 1 => proptest::collection::vec(any::<u32>(), 0..4)],
        ),
        (
            prop_oneof![3 => Just(None), 1 => proptest::option::of(proptest::collection::vec(0u32..60_000, 0..4))],
            any::<bool>(),
            prop_oneof![3 => Just(true), 1 => any::<bool>()],
        ),
        prop_oneof![3 => Just(None), 1 => proptest::option::of(prop_oneof![
            Just(GuidedDecodingParams { regex: Some("[ab]{1,3}".into()), ..Default::default() }),
            Just(GuidedDecodingParams { regex: Some("\\bx\\b".into()), ..Default::default() }),
            Just(GuidedDecodingParams { choice: Some(vec![]), ..Default::default() }),
            Just(GuidedDecodingParams { json_object: true, regex: Some("a".into()), ..Default::default() }),
        ])],
    )
        .prop_map(
            |(
                (n, best_of, max_tokens, min_tokens),
                (logprobs, prompt_logprobs, truncate),
                (temperature, top_p, top_k, min_p),
                (stop, stop_token_ids),
                (allowed, ignore_eos, detokenize),
                guided,
            )| SamplingParams {
                n,
                best_of,
                max_tokens,
                min_tokens,
                logprobs,
                prompt_logprobs,
                truncate_prompt_tokens: truncate,
                temperature,
                top_p,
                top_k,
                min_p,
                stop,
                stop_token_ids,
                allowed_token_ids: allowed,
                ignore_eos,
                detokenize,
                guided_decoding: guided,
                ..Default::default()
            },
        )
}

fn prompt() -> impl Strategy<Value = Prompt> {
    prop_oneof![
        ".{0,40}".prop_map(Prompt::Text),
        proptest::collection::vec(any::<u32>(), 0..8).prop_map(Prompt::TokenIds),
        proptest::collection::vec(0u32..49152, 1..8).prop_map(Prompt::TokenIds),
        proptest::collection::vec(0u32..49152, 0..3000).prop_map(Prompt::TokenIds),
        Just(Prompt::Text("word ".repeat(100_000))),
    ]
}

#[test]
fn arbitrary_requests_never_panic_and_accepted_ones_run_clean() {
    let llm = common::llm_with(|a| {
        a.max_model_len = Some(2048);
        a.max_num_seqs = 8;
    });
    let input = llm.with_engine(|e| e.input_processor().clone());
    let never = AtomicBool::new(false);
    let accepted = std::cell::Cell::new(0usize);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig { cases: 400, ..ProptestConfig::default() });
    runner
        .run(&(prompt(), params()), |(prompt, params)| {
            match input.process("p", prompt, params, &never) {
                Ok(req) => {
                    // Whatever was accepted fits the engine's limits.
                    let p = req.params();
                    prop_assert!(p.num_sequences() <= 8);
                    let max = p.max_tokens.unwrap_or(0);
                    prop_assert!(req.prompt_token_ids().len() + max <= 2048);
                    prop_assert!(!req.prompt_token_ids().is_empty() && req.prompt_token_ids().len() < 2048);
                    accepted.set(accepted.get() + 1);
                    // Run a few of the cheap ones through the engine.
                    if p.max_tokens.is_some_and(|m| m <= 4)
                        && p.num_sequences() <= 2
                        && req.prompt_token_ids().len() <= 64
                    {
                        llm.with_engine(|e| -> Result<(), TestCaseError> {
                            e.add_processed(req).map_err(|e| TestCaseError::fail(e.to_string()))?;
                            while e.has_unfinished_requests() {
                                e.step().map_err(|e| TestCaseError::fail(e.to_string()))?;
                            }
                            Ok(())
                        })?;
                        common::assert_clean(&llm);
                    }
                }
                Err(Error::InvalidParams(p)) => prop_assert!(!p.param.is_empty()),
                Err(Error::InvalidPrompt(_) | Error::PromptTooLong { .. } | Error::Guided(_) | Error::Tokenizer(_)) => {
                }
                Err(other) => prop_assert!(false, "unexpected error kind: {other:?}"),
            }
            Ok(())
        })
        .unwrap();
    let accepted = accepted.get();
    assert!(accepted > 10, "the generator should produce some valid requests ({accepted})");
}
