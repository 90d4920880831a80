//! `LLM::beam_search` against Hugging Face `generate(num_beams=..., length_penalty=...,
//! early_stopping=...)` on the float32 model (fixtures/beam_search.json, written by
//! scripts/make_beam_fixtures.py): the same best sequences for beam widths 2 and 4.

mod common;

use common::{assert_clean, llm_with};
use serde::Deserialize;
use serde_json::Value;
use vllm_engine::{BeamSearchParams, EarlyStopping, Error, Prompt};

#[derive(Deserialize)]
struct Beam {
    token_ids: Vec<u32>,
    score: f64,
}

#[derive(Deserialize)]
struct Case {
    prompt: String,
    prompt_ids: Vec<u32>,
    beam_width: usize,
    length_penalty: f32,
    early_stopping: Value,
    max_tokens: usize,
    beams: Vec<Beam>,
}

#[derive(Deserialize)]
struct Fixtures {
    cases: Vec<Case>,
}

fn early(v: &Value) -> EarlyStopping {
    match v {
        Value::Bool(true) => EarlyStopping::Finished,
        Value::String(s) if s == "never" => EarlyStopping::Never,
        _ => EarlyStopping::Heuristic,
    }
}

#[test]
fn beam_search_matches_hugging_face() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/beam_search.json");
    let fx: Fixtures = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    // The reference is float32: ask for the float32 path (the default runs the file's Q4_1).
    let llm = llm_with(|a| a.quantization = vllm_engine::Quantization::None);
    let mut widths = std::collections::BTreeSet::new();
    let mut eos_seen = false;
    for case in &fx.cases {
        let p = BeamSearchParams {
            beam_width: case.beam_width,
            max_tokens: case.max_tokens,
            length_penalty: case.length_penalty,
            early_stopping: early(&case.early_stopping),
            ..Default::default()
        };
        let out = llm.beam_search([Prompt::TokenIds(case.prompt_ids.clone())], &p).unwrap();
        let got = &out[0].sequences;
        let what = format!(
            "{:?} width {} lp {} early {}",
            case.prompt, case.beam_width, case.length_penalty, case.early_stopping
        );
        assert_eq!(got.len(), case.beam_width, "{what}");
        assert_eq!(got[0].token_ids, case.beams[0].token_ids, "best sequence, {what}: {:?}", got[0].text);
        assert!(
            (got[0].score - case.beams[0].score).abs() < 1e-3,
            "{what}: score {} vs {}",
            got[0].score,
            case.beams[0].score
        );
        // Every returned beam is one Hugging Face returned, with the same score.
        for g in got {
            if let Some(b) = case.beams.iter().find(|b| b.token_ids == g.token_ids) {
                assert!((g.score - b.score).abs() < 1e-3, "{what}");
            }
        }
        eos_seen |= got.iter().any(|g| g.finish_reason == vllm_engine::FinishReason::Stop);
        widths.insert(case.beam_width);
    }
    assert!(widths.contains(&2) && widths.contains(&4));
    assert!(eos_seen, "some fixture beams end with EOS");
    assert_clean(&llm);
}

#[test]
fn beam_search_validates_and_shares_blocks() {
    let llm = llm_with(|_| {});
    let bad = |p: BeamSearchParams| llm.beam_search(["Hello"], &p).unwrap_err();
    assert!(matches!(
        bad(BeamSearchParams { beam_width: 0, ..Default::default() }),
        Error::InvalidArgument { param: "beam_width", .. }
    ));
    assert!(matches!(
        bad(BeamSearchParams { beam_width: 11, ..Default::default() }),
        Error::InvalidArgument { param: "beam_width", .. }
    ));
    assert!(matches!(
        bad(BeamSearchParams { max_tokens: 0, ..Default::default() }),
        Error::InvalidArgument { param: "max_tokens", .. }
    ));
    assert!(matches!(
        bad(BeamSearchParams { temperature: -0.5, ..Default::default() }),
        Error::InvalidArgument { param: "temperature", .. }
    ));
    // Beams of a long prompt reuse its blocks through the prefix cache: the prompt is
    // computed about once, not once per beam and step.
    let prompt = "The history of the city goes back to the Roman era, when a small settlement grew up \
                  on the river bank. Over the centuries it became a market town, then an industrial centre.";
    let before = llm.with_engine(|e| e.stats());
    let out =
        llm.beam_search([prompt], &BeamSearchParams { beam_width: 4, max_tokens: 8, ..Default::default() }).unwrap();
    let after = llm.with_engine(|e| e.stats());
    let len = out[0].prompt_token_ids.len();
    let computed = (after.num_computed_prompt_tokens - before.num_computed_prompt_tokens) as usize;
    // At most each beam's last partial block is recomputed per step; without sharing every
    // beam would recompute its whole prompt every step (32 x {len} tokens).
    assert!(computed <= len + 4 * 8 * 16, "computed {computed} prompt tokens for a {len}-token prompt");
    assert!(computed < 32 * len / 2, "computed {computed} prompt tokens for a {len}-token prompt");
    assert!(out[0].sequences.windows(2).all(|w| w[0].score >= w[1].score), "best first");
    // Temperature scales the logits before the log-softmax that ranks beams: 1 changes
    // nothing, 2 flattens the distribution (lower log probabilities for the likely tokens).
    let p = |t: f32| BeamSearchParams { beam_width: 2, max_tokens: 4, temperature: t, ..Default::default() };
    let t0 = llm.beam_search(["The capital of France is"], &p(0.0)).unwrap();
    let t1 = llm.beam_search(["The capital of France is"], &p(1.0)).unwrap();
    let t2 = llm.beam_search(["The capital of France is"], &p(2.0)).unwrap();
    assert_eq!(t0[0].sequences[0].token_ids, t1[0].sequences[0].token_ids);
    assert!((t0[0].sequences[0].score - t1[0].sequences[0].score).abs() < 1e-6);
    assert!(t2[0].sequences[0].cumulative_logprob < t0[0].sequences[0].cumulative_logprob);
    assert_clean(&llm);
}
