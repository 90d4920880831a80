//! Guided decoding with the real model: 50 samples at temperature 1 for each kind of
//! constraint all satisfy it; bad constraints are rejected before queueing; compiling a new
//! automaton does not stall other requests.

mod common;

use std::time::Instant;

use common::{assert_clean, llm_with};
use serde_json::{json, Value};
use vllm_engine::{Error, FinishReason, Guide, GuideCompiler, GuidedDecodingParams, Prompt, SamplingParams, LLM};

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

/// Checks a sample against the 5-field person schema.
fn check_person(t: &str) {
    let v: Value = serde_json::from_str(t).unwrap_or_else(|e| panic!("{t:?}: {e}"));
    let o = v.as_object().unwrap();
    assert_eq!(o.len(), 5, "{t}");
    assert!(o["name"].as_str().is_some_and(|s| s.chars().count() <= 20), "{t}");
    assert!(o["city"].as_str().is_some_and(|s| s.chars().count() <= 20), "{t}");
    assert!(o["age"].is_i64() || o["age"].is_u64(), "{t}");
    assert!(o["married"].is_boolean() && o["score"].is_number(), "{t}");
}

fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer"},
            "city": {"type": "string", "maxLength": 20},
            "married": {"type": "boolean"},
            "score": {"type": "number"}
        },
        "required": ["name", "age", "city", "married", "score"],
        "additionalProperties": false
    })
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
    let g = GuidedDecodingParams { json: Some(person_schema()), ..Default::default() };
    let t = Instant::now();
    let p = SamplingParams {
        n: 50,
        temperature: 1.0,
        seed: Some(1),
        max_tokens: Some(120),
        guided_decoding: Some(g),
        ..Default::default()
    };
    let outs = llm.generate([chat("Describe a person as JSON.")], p).unwrap().remove(0).outputs;
    println!("guided_json: 50 samples incl. compiling the automaton in {:.2}s", t.elapsed().as_secs_f64());
    // A number is unbounded too (`"score": 122.6832729191121742...` at temperature 1): a
    // sample cut by max_tokens is a prefix; every other one satisfies the schema.
    let mut cut = 0;
    for c in &outs {
        if c.finish_reason == Some(FinishReason::Length) {
            cut += 1;
            continue;
        }
        check_person(&c.text);
    }
    assert!(cut <= 5, "{cut} of 50 samples cut by max_tokens");
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
    compiler.backend(vllm_engine::GuideBackendKind::Outlines).unwrap();
    let vocab_s = t.elapsed().as_secs_f64();
    let constraint =
        GuidedDecodingParams { json: Some(person_schema()), backend: Some("outlines".into()), ..Default::default() }
            .constraint()
            .unwrap();
    let t = Instant::now();
    let index = compiler.compile(&constraint).unwrap();
    let compile_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    assert!(compiler.cached(&constraint).is_some());
    compiler.compile(&constraint).unwrap();
    let cached_s = t.elapsed().as_secs_f64();
    // Masking a 49k-token row at the start state (the widest: any opening whitespace or '{').
    let mut guide = Guide::new(&index);
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

    // The same schema with llguidance, and a Lark grammar: compiling is cheap, masks are
    // computed per step, so time them along a real walk (each step a new parser state).
    let t = Instant::now();
    compiler.backend(vllm_engine::GuideBackendKind::Guidance).unwrap();
    let trie_s = t.elapsed().as_secs_f64();
    let person = r#"{"name": "Alice Smith", "age": 42, "city": "Paris", "married": true, "score": 3.5}"#;
    let mut rows = Vec::new();
    for (what, g, text) in [
        (
            "outlines json",
            GuidedDecodingParams {
                json: Some(person_schema()),
                backend: Some("outlines".into()),
                ..Default::default()
            },
            person,
        ),
        (
            "guidance json",
            GuidedDecodingParams {
                json: Some(person_schema()),
                backend: Some("guidance".into()),
                ..Default::default()
            },
            person,
        ),
        (
            "guidance grammar",
            GuidedDecodingParams { grammar: Some(ARITHMETIC.into()), ..Default::default() },
            "(12 + 7) * 3 - 45",
        ),
    ] {
        let t = Instant::now();
        let compiled = compiler.compile(&g.constraint().unwrap()).unwrap();
        let compile_ms = t.elapsed().as_secs_f64() * 1e3;
        let ids = tok.encode(text, false).unwrap();
        let mut guide = Guide::new(&compiled);
        let (mut total, mut max) = (0.0f64, 0.0f64);
        for &id in &ids {
            let mut row = vec![0.5f32; tok.vocab_size()];
            let t = Instant::now();
            guide.mask(&mut row);
            let us = t.elapsed().as_secs_f64() * 1e6;
            assert!(row[id as usize].is_finite(), "{what}: token {id} of {text:?} is allowed");
            total += us;
            max = max.max(us);
            guide.advance(id);
        }
        assert!(guide.is_accepting(), "{what}: {text:?} is complete");
        rows.push(format!(
            "{what}: compile {compile_ms:.1} ms, mask {:.0} us/step mean, {max:.0} us max over {} steps",
            total / ids.len() as f64,
            ids.len()
        ));
    }
    println!("guidance token trie + lexer slices over the vocabulary: {trie_s:.2}s");
    for r in rows {
        println!("{r}");
    }
}

/// Arithmetic in Lark: sums of products of numbers and parenthesized sums (one level deep, so
/// every sample ends).
const ARITHMETIC: &str = r#"
start: expr
expr: term ((" + " | " - ") term){0,2}
term: factor (" * " factor)?
factor: NUMBER | "(" inner ")"
inner: NUMBER ((" + " | " - ") NUMBER){1,2}
NUMBER: /[1-9][0-9]{0,2}/
"#;

/// An independent recursive-descent recognizer for [`ARITHMETIC`].
fn is_arithmetic(s: &str) -> bool {
    struct P<'a>(&'a [u8], usize);
    impl P<'_> {
        fn eat(&mut self, lit: &str) -> bool {
            let ok = self.0[self.1..].starts_with(lit.as_bytes());
            if ok {
                self.1 += lit.len();
            }
            ok
        }
        fn number(&mut self) -> bool {
            let digits = self.0[self.1..].iter().take_while(|b| b.is_ascii_digit()).count();
            let ok = (1..=3).contains(&digits) && self.0[self.1] != b'0';
            self.1 += digits;
            ok
        }
        fn op(&mut self) -> bool {
            self.eat(" + ") || self.eat(" - ")
        }
        fn inner(&mut self) -> bool {
            if !self.number() {
                return false;
            }
            let mut n = 0;
            while self.op() {
                if !self.number() {
                    return false;
                }
                n += 1;
            }
            (1..=2).contains(&n)
        }
        fn factor(&mut self) -> bool {
            if self.eat("(") {
                self.inner() && self.eat(")")
            } else {
                self.number()
            }
        }
        fn term(&mut self) -> bool {
            self.factor() && (!self.eat(" * ") || self.factor())
        }
        fn expr(&mut self) -> bool {
            if !self.term() {
                return false;
            }
            let mut n = 0;
            while self.op() {
                if !self.term() {
                    return false;
                }
                n += 1;
            }
            n <= 2
        }
    }
    let mut p = P(s.as_bytes(), 0);
    p.expr() && p.1 == s.len()
}

#[test]
fn every_grammar_sample_is_accepted() {
    assert!(is_arithmetic("(12 + 7) * 3 - 45") && is_arithmetic("5"));
    for bad in ["", "05", "1 +", "(1)", "1 * 2 * 3", "1 + 2 + 3 + 4", "(1 + (2 + 3))", "1234"] {
        assert!(!is_arithmetic(bad), "{bad:?}");
    }
    let llm = llm_with(|_| {});
    let g = GuidedDecodingParams { grammar: Some(ARITHMETIC.into()), ..Default::default() };
    let p = SamplingParams {
        n: 50,
        temperature: 1.0,
        seed: Some(2),
        max_tokens: Some(120),
        guided_decoding: Some(g),
        ..Default::default()
    };
    let t = Instant::now();
    let out = llm.generate([chat("Write an arithmetic expression.")], p).unwrap().remove(0);
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(out.outputs.len(), 50);
    for c in &out.outputs {
        assert_eq!(c.finish_reason, Some(FinishReason::Stop), "{:?} ended by itself", c.text);
        assert!(is_arithmetic(&c.text), "{:?} is accepted by the grammar", c.text);
    }
    let distinct: std::collections::HashSet<_> = out.outputs.iter().map(|c| &c.text).collect();
    assert!(distinct.len() > 10, "temperature 1 gives varied expressions ({} distinct)", distinct.len());
    println!("guided_grammar: 50 samples in {secs:.1}s, {} distinct, e.g. {:?}", distinct.len(), out.outputs[0].text);

    // The JSON schema through the guidance backend too. llguidance follows JSON Schema, where
    // other keys are allowed unless `additionalProperties` is false (outlines never allows
    // them), and any JSON whitespace unless a pattern is given (outlines: `[ ]?`).
    let mut schema = person_schema();
    schema["additionalProperties"] = json!(false);
    let g = GuidedDecodingParams {
        json: Some(schema),
        backend: Some("guidance".into()),
        whitespace_pattern: Some("[ ]?".into()),
        ..Default::default()
    };
    let t = Instant::now();
    for text in sample(&llm, &chat("Describe a person as JSON."), g, 120) {
        check_person(&text);
    }
    println!("guided_json with guidance: 50 samples in {:.1}s", t.elapsed().as_secs_f64());
    assert_clean(&llm);
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

/// Constraints compile in the input processor, off the engine thread: a request whose
/// automaton takes a while to build (outlines, a fresh schema) does not hold back the tokens of
/// a request already running.
#[test]
fn compiling_a_new_automaton_does_not_stall_other_requests() {
    let mut args = vllm_engine::EngineArgs::new(common::default_gguf().to_string_lossy());
    args.kv_cache_memory = 256 << 20;
    let engine = vllm_engine::AsyncEngine::new(args).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let plain = SamplingParams {
            ignore_eos: true,
            output_kind: vllm_engine::RequestOutputKind::Delta,
            ..SamplingParams::greedy(400)
        };
        let mut stream = engine.generate("plain".into(), Prompt::Text("Once upon a time".into()), plain).await.unwrap();
        stream.recv().await.unwrap().unwrap();
        let schema = json!({"type": "object", "properties": {"a": {"type": "string", "maxLength": 8}, "b": {"type": "integer", "maximum": 999}}, "required": ["a", "b"]});
        let g = GuidedDecodingParams { json: Some(schema), backend: Some("outlines".into()), ..Default::default() };
        let guided = SamplingParams { guided_decoding: Some(g), ..SamplingParams::greedy(40) };
        let compiling = engine.generate("guided".into(), Prompt::Text(chat("JSON please")), guided);
        tokio::pin!(compiling);
        // Tokens of the plain request keep arriving while the automaton compiles.
        let mut during = 0;
        let mut guided_stream = loop {
            tokio::select! {
                s = &mut compiling => break s.unwrap(),
                o = stream.recv() => { o.unwrap().unwrap(); during += 1; }
            }
        };
        assert!(during >= 2, "only {during} tokens of the running request arrived during the compile");
        let mut text = String::new();
        while let Some(o) = guided_stream.recv().await {
            let o = o.unwrap();
            if o.finished {
                text = o.outputs[0].text.clone();
            }
        }
        let v: Value = serde_json::from_str(&text).unwrap();
        assert!(v["a"].is_string() && v["b"].is_i64());
    });
    engine.shutdown();
}
