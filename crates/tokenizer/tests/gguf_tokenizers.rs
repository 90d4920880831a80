//! Tokenizers from GGUF files written by llama.cpp's converter (fixtures/tokenizers/):
//! - SentencePiece (`tokenizer.ggml.model = llama`, scripts/make_tokenizer_fixtures.py):
//!   trained with the `sentencepiece` package, with and without the space prefix;
//! - byte-level BPE (`gpt2`, scripts/make_bpe_tokenizer_fixtures.py): one trained with the
//!   `tokenizers` package behind each pre-tokenizer we rebuild from `tokenizer.ggml.pre`.
//!
//! Our ids must equal transformers' tokenizer of the same model on tricky text (leading,
//! repeated and trailing spaces, digits, CJK, emoji, accents, unseen characters through byte
//! fallback, tabs, newlines, added and control tokens inside text), and decoding must give
//! what transformers' decode gives. llama.cpp's own ids on the same GGUF are compared too and
//! every difference is accounted for (see `llama_cpp_difference`).

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
                assert!(llama_cpp_difference(name, text), "{name}: {text:?}: llama.cpp {l}, ours {ours:?}");
            }
        }
    }
    println!(
        "{name}: {} texts equal to transformers; llama.cpp equal on {llama_cpp_equal} of {llama_cpp_cases}",
        fx["cases"].as_array().unwrap().len()
    );
}

/// Where llama.cpp's tokenizer is known to differ from transformers' (and ours):
/// - SentencePiece with a space prefix: llama.cpp prefixes a space even when the text (or
///   the text after an added token) already starts with one; transformers does not.
/// - byte-level BPE: none; all nine pre-tokenizers agree on every text.
fn llama_cpp_difference(name: &str, text: &str) -> bool {
    if name == "spm_llama" {
        return text.starts_with(' ') || text.contains("> ");
    }
    false
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

macro_rules! bpe {
    ($($test:ident => $name:literal),* $(,)?) => {$(
        #[test]
        fn $test() {
            check($name);
        }
    )*};
}

bpe! {
    bpe_gpt2 => "bpe_gpt-2",
    bpe_smollm => "bpe_smollm",
    bpe_llama3 => "bpe_llama-bpe",
    bpe_qwen2 => "bpe_qwen2",
    bpe_deepseek_llm => "bpe_deepseek-llm",
    bpe_deepseek_coder => "bpe_deepseek-coder",
    bpe_deepseek_v3 => "bpe_deepseek-v3",
    bpe_tekken => "bpe_tekken",
    bpe_gpt4o => "bpe_gpt-4o",
}
