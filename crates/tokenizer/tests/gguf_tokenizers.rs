//! SentencePiece tokenizers from GGUF (`tokenizer.ggml.model = llama`): tokenizers trained with
//! the `sentencepiece` package and written into GGUF files by llama.cpp's converter
//! (scripts/make_tokenizer_fixtures.py, fixtures/tokenizers/). Our ids must equal transformers'
//! tokenizer built from the same `tokenizer.model` on tricky text (leading, repeated and
//! trailing spaces, digits, CJK, emoji, accents, unseen characters through byte fallback, tabs,
//! newlines, added and control tokens inside text), and decoding must give the text back.
//! Where llama.cpp's own ids were recorded, they are compared too: equal except where llama.cpp
//! prepends a space transformers does not (a leading space, text after a special token).

use std::collections::HashMap;

use candle_core::quantized::gguf_file;
use serde_json::Value;
use vllm_tokenizer::Tokenizer;

fn load(name: &str) -> (Tokenizer, Value) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/tokenizers");
    let mut f = std::fs::File::open(format!("{dir}/{name}.gguf")).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let md: HashMap<String, gguf_file::Value> = content.metadata;
    let tok = Tokenizer::from_gguf(&md).unwrap_or_else(|e| panic!("{name}: {e}"));
    let fx = serde_json::from_str(&std::fs::read_to_string(format!("{dir}/{name}.json")).unwrap()).unwrap();
    (tok, fx)
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn check(name: &str) {
    let (tok, fx) = load(name);
    let (mut llama_cpp_equal, mut llama_cpp_cases) = (0, 0);
    for case in fx["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let ours = tok.encode(text, false).unwrap();
        assert_eq!(ours, ids(&case["hf"]), "{name}: {text:?}");
        // Decoding gives what transformers' decode gives (the text, less a prefix space).
        let back = tok.decode(&ours, false).unwrap();
        assert_eq!(back, case["hf_decoded"].as_str().unwrap(), "{name}: decode of {ours:?}");
        if let Some(l) = case.get("llama_cpp") {
            llama_cpp_cases += 1;
            if ids(l) == ours {
                llama_cpp_equal += 1;
            } else {
                // The only allowed difference: llama.cpp's extra space prefix.
                let leading_space = text.starts_with(' ');
                let after_special = text.contains("<ctrl>") || text.contains("<tool>");
                assert!(leading_space || after_special, "{name}: {text:?}: llama.cpp {l}, ours {ours:?}");
            }
        }
    }
    println!(
        "{name}: {} texts equal to transformers; llama.cpp equal on {llama_cpp_equal} of {llama_cpp_cases}",
        fx["cases"].as_array().unwrap().len()
    );
}

#[test]
fn sentencepiece_with_space_prefix_like_llama() {
    check("spm_llama");
}

#[test]
fn sentencepiece_without_space_prefix_like_gemma() {
    check("spm_gemma");
}

/// BOS comes from the metadata and is added for SentencePiece models.
#[test]
fn sentencepiece_bos() {
    let (tok, _) = load("spm_llama");
    assert_eq!(tok.encode("Hello", true).unwrap()[0], 1);
}
