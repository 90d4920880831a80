//! Guided decoding with the real model: 50 samples at temperature 1 for each kind of
//! constraint all satisfy it; bad constraints are rejected before queueing; compiling a new
//! automaton does not stall other requests.

mod common;

use std::time::Instant;

use common::{assert_clean, llm_with};
use serde_json::{json, Value};
use vllm_engine::{Error, Guide, GuideCompiler, GuidedDecodingParams, Prompt, SamplingParams, LLM};

fn sample(llm: &LLM, prompt: &str, g: GuidedDecodingParams, max_tokens: usize) -> Vec<String> {
    let p = SamplingParams {
        n: 50,
        temperature: 1.0,
        seed: Some(1),
        max_tokens: Some(max_tokens),
        guided_decoding: Some(g),
        ..Default::default()
    };
    let out = llm.generate([prompt], p).unwrap().remove(0);
    assert_eq!(out.outputs.len(), 50);
    out.outputs.into_iter().map(|c| c.text).collect()
}

fn chat(q: &str) -> String {
    format!("<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n")
}

#[test]
fn every_sample_satisfies_its_constraint() {
    let llm = llm_with(|_| {});
    // Choice.
    let choices = vec!["Paris".to_string(), "London".into(), "Berlin".into(), "Rome".into()];
    let g = GuidedDecodingParams { choice: Some(choices.clone()), ..Default::default() };
    for t in sample(&llm, &chat("What is the capital of France?"), g, 8) {
        assert!(choices.contains(&t), "{t:?}");
    }
    // Regex.
    let re = r"\(\d{3}\) \d{3}-\d{4}";
    let full = regex::Regex::new(&format!("^(?:{re})$")).unwrap();
    let g = GuidedDecodingParams { regex: Some(re.into()), ..Default::default() };
    for t in sample(&llm, &chat("Give me a US phone number."), g, 20) {
        assert!(full.is_match(&t), "{t:?}");
    }
    // A 5-field JSON schema, timed (the first use also builds the vocabulary's byte table).
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer"},
            "city": {"type": "string", "maxLength": 20},
            "married": {"type": "boolean"},
            "score": {"type": "number"}
        },
        "required": ["name", "age", "city", "married", "score"]
    });
    let g = GuidedDecodingParams { json: Some(schema.clone()), ..Default::default() };
    let t = Instant::now();
    let outs = sample(&llm, &chat("Describe a person as JSON."), g, 120);
    println!("guided_json: 50 samples incl. compiling the automaton in {:.2}s", t.elapsed().as_secs_f64());
    for t in outs {
        let v: Value = serde_json::from_str(&t).unwrap_or_else(|e| panic!("{t:?}: {e}"));
        let o = v.as_object().unwrap();
        assert_eq!(o.len(), 5, "{t}");
        assert!(o["name"].is_string() && o["city"].is_string(), "{t}");
        assert!(o["age"].is_i64() || o["age"].is_u64(), "{t}");
        assert!(o["married"].is_boolean() && o["score"].is_number(), "{t}");
    }
    // Any JSON object. Keys and strings are unbounded, so at temperature 1 a sample can run
    // into max_tokens before closing its object: those are cut (finish_reason length, as in
    // vLLM); every sample that ended by itself is a JSON object, and most end by themselves.
    let g = GuidedDecodingParams { json_object: true, ..Default::default() };
    let p = SamplingParams {
        n: 50,
        temperature: 1.0,
        seed: Some(1),
        max_tokens: Some(160),
        guided_decoding: Some(g),
        ..Default::default()
    };
    let out = llm.generate([chat("Reply with a JSON object.")], p).unwrap().remove(0);
    let mut cut = 0;
    for c in &out.outputs {
        if c.finish_reason == Some(vllm_engine::FinishReason::Length) {
            cut += 1;
            continue;
        }
        let v: Value = serde_json::from_str(&c.text).unwrap_or_else(|e| panic!("{:?}: {e}", c.text));
        assert!(v.is_object(), "{}", c.text);
    }
    println!("json_object: {cut} of 50 samples cut by max_tokens");
    assert!(cut <= 20, "{cut} of 50 samples cut by max_tokens");
    assert_clean(&llm);
}

#[test]
fn compile_time_and_masking_cost() {
    let llm = llm_with(|_| {});
    let tok = llm.with_engine(|e| e.tokenizer().clone());
    let t = Instant::now();
    let tokens: Vec<(u32, Vec<u8>)> =
        (0..tok.vocab_size() as u32).filter_map(|id| tok.token_bytes(id).map(|b| (id, b))).collect();
    let compiler = GuideCompiler::new(tokens, tok.eos_token_ids()[0]);
    let vocab_s = t.elapsed().as_secs_f64();
    let schema = json!({"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"},
        "city": {"type": "string", "maxLength": 20}, "married": {"type": "boolean"}, "score": {"type": "number"}},
        "required": ["name", "age", "city", "married", "score"]});
    let regex = GuidedDecodingParams { json: Some(schema), ..Default::default() }.to_regex().unwrap();
    let t = Instant::now();
    let index = compiler.compile(&regex).unwrap();
    let compile_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    assert!(compiler.cached(&regex).is_some());
    compiler.compile(&regex).unwrap();
    let cached_s = t.elapsed().as_secs_f64();
    // Masking a 49k-token row at the start state (the widest: any opening whitespace or '{').
    let guide = Guide::new(index);
    let mut row = vec![0.5f32; tok.vocab_size()];
    let t = Instant::now();
    for _ in 0..100 {
        guide.mask(&mut row);
    }
    let mask_us = t.elapsed().as_secs_f64() * 1e6 / 100.0;
    // ... and inside a string value, where most of the vocabulary is allowed.
    let mut inside = guide.clone();
    for id in tok.encode("{\"name\": \"Al", false).unwrap() {
        inside.advance(id);
    }
    let t = Instant::now();
    let mut allowed = 0;
    for _ in 0..100 {
        let mut row = vec![0.5f32; tok.vocab_size()];
        inside.mask(&mut row);
        allowed = row.iter().filter(|v| v.is_finite()).count();
    }
    let wide_us = t.elapsed().as_secs_f64() * 1e6 / 100.0;
    assert!(allowed > 10_000, "inside a string most tokens are allowed ({allowed})");
    println!(
        "guided_json 5-field schema over {} tokens: vocabulary {vocab_s:.2}s, compile {compile_s:.2}s, cached {:.1}us, mask {mask_us:.0}us/row at the start, {wide_us:.0}us/row inside a string ({allowed} allowed)",
        tok.vocab_size(),
        cached_s * 1e6
    );
    assert!(cached_s < 0.01, "a cached automaton is reused");
}

#[test]
fn bad_constraints_are_rejected_before_queueing() {
    let llm = llm_with(|_| {});
    let bad = |g: GuidedDecodingParams| match llm
        .generate(["hi"], SamplingParams { guided_decoding: Some(g), ..Default::default() })
    {
        Err(Error::InvalidParams(e)) => e.param,
        other => panic!("{other:?}"),
    };
    assert_eq!(bad(GuidedDecodingParams { regex: Some("(unclosed".into()), ..Default::default() }), "guided_regex");
    assert_eq!(bad(GuidedDecodingParams { choice: Some(vec![]), ..Default::default() }), "guided_choice");
    assert_eq!(
        bad(GuidedDecodingParams { regex: Some("a".into()), choice: Some(vec!["a".into()]), ..Default::default() }),
        "guided_decoding"
    );
    assert_eq!(
        bad(GuidedDecodingParams { json: Some(json!({"type": "no-such-type"})), ..Default::default() }),
        "guided_json"
    );
    assert_eq!(
        bad(GuidedDecodingParams { grammar: Some("root ::= \"a\"".into()), ..Default::default() }),
        "guided_grammar"
    );
    assert_eq!(
        bad(GuidedDecodingParams { regex: Some("a".into()), backend: Some("xgrammar".into()), ..Default::default() }),
        "guided_decoding_backend"
    );
    assert_clean(&llm);
}

#[test]
fn compiling_a_new_automaton_does_not_stall_other_requests() {
    let llm = llm_with(|_| {});
    llm.with_engine(|e| {
        e.add_request("plain", Prompt::Text("Once upon a time".into()), SamplingParams { ignore_eos: true, ..SamplingParams::greedy(30) }).unwrap();
        e.step().unwrap();
        let schema = json!({"type": "object", "properties": {"a": {"type": "string", "maxLength": 8}, "b": {"type": "integer", "maximum": 999}}, "required": ["a", "b"]});
        let g = GuidedDecodingParams { json: Some(schema), ..Default::default() };
        e.add_request("guided", Prompt::Text(chat("JSON please")), SamplingParams { guided_decoding: Some(g), max_tokens: Some(40), ..SamplingParams::greedy(40) }).unwrap();
        // The next step decodes the plain request whether or not the automaton is ready.
        let outs = e.step().unwrap();
        assert!(outs.iter().any(|o| o.request_id == "plain"));
        let mut guided = None;
        while e.has_unfinished_requests() {
            for o in e.step().unwrap() {
                if o.request_id == "guided" && o.finished {
                    guided = Some(o.outputs[0].text.clone());
                }
            }
        }
        let v: Value = serde_json::from_str(guided.as_deref().unwrap()).unwrap();
        assert!(v["a"].is_string() && v["b"].is_i64());
    });
    assert_clean(&llm);
}
