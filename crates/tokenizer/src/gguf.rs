//! Building a Hugging Face tokenizer from GGUF metadata (`tokenizer.ggml.*`).
//!
//! GGUF files written by llama.cpp's converter carry the vocabulary, the BPE merges, each
//! token's type and a `tokenizer.ggml.pre` name for the pre-tokenizer. We rebuild the
//! equivalent `tokenizer.json` (byte-level BPE with that pre-tokenizer) and load it with the
//! `tokenizers` crate, so encoding matches the original Hugging Face tokenizer.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use serde_json::{json, Value as Json};

use crate::{Error, Result};

/// llama.cpp token types.
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// GPT-2's split regex, which `ByteLevel { use_regex: true }` applies.
fn byte_level(use_regex: bool) -> Json {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn split(pattern: &str) -> Json {
    json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false})
}

const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer for a `tokenizer.ggml.pre` name (the names llama.cpp's converter writes).
fn pre_tokenizer(pre: &str) -> Result<Json> {
    Ok(match pre {
        // SmolLM, StarCoder: single digits, then GPT-2's byte-level split.
        "smollm" | "starcoder" | "refact" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "gpt2" | "default" | "gpt-2" | "olmo" | "phi-2" | "jina-v2-code" => byte_level(true),
        "llama-bpe" | "llama3" | "dbrx" | "smaug-bpe" => {
            json!({"type": "Sequence", "pretokenizers": [
            split(LLAMA3_PATTERN), byte_level(false)]})
        }
        "qwen2" | "deepseek-r1-qwen" => json!({"type": "Sequence", "pretokenizers": [
            split(QWEN2_PATTERN), byte_level(false)]}),
        other => {
            return Err(Error::Unsupported(format!(
                "GGUF pre-tokenizer '{other}' (supported: smollm, starcoder, gpt2, llama-bpe, qwen2)"
            )))
        }
    })
}

fn get<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<&'a Value> {
    md.get(key).ok_or_else(|| Error::MissingMetadata(key.to_string()))
}

fn strings(v: &Value, key: &str) -> Result<Vec<String>> {
    let arr = v.to_vec().map_err(|_| Error::BadMetadata(key.to_string()))?;
    arr.iter().map(|x| x.to_string().cloned().map_err(|_| Error::BadMetadata(key.to_string()))).collect()
}

/// Special-token facts read from the metadata.
#[derive(Debug, Clone, Default)]
pub(crate) struct GgufSpecials {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
    pub chat_template: Option<String>,
}

fn opt_u32(md: &HashMap<String, Value>, key: &str) -> Option<u32> {
    md.get(key).and_then(|v| v.to_u32().ok())
}

/// Builds the `tokenizer.json` text and the special-token facts from GGUF metadata.
pub(crate) fn tokenizer_json(md: &HashMap<String, Value>) -> Result<(String, GgufSpecials)> {
    let model =
        get(md, "tokenizer.ggml.model")?.to_string().map_err(|_| Error::BadMetadata("tokenizer.ggml.model".into()))?;
    if model != "gpt2" {
        return Err(Error::Unsupported(format!(
            "GGUF tokenizer model '{model}' (only byte-level BPE, 'gpt2', is supported so far)"
        )));
    }
    let tokens = strings(get(md, "tokenizer.ggml.tokens")?, "tokenizer.ggml.tokens")?;
    let merges = strings(get(md, "tokenizer.ggml.merges")?, "tokenizer.ggml.merges")?;
    let types: Vec<i32> = match md.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()
            .map_err(|_| Error::BadMetadata("tokenizer.ggml.token_type".into()))?
            .iter()
            .map(|x| x.to_i32().unwrap_or(1))
            .collect(),
        None => vec![1; tokens.len()],
    };
    let pre = md.get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).map_or("default", |s| s.as_str());

    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    let mut added = Vec::new();
    for (id, tok) in tokens.iter().enumerate() {
        vocab.insert(tok.clone(), json!(id));
        let ty = types.get(id).copied().unwrap_or(1);
        if ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED {
            added.push(json!({"id": id, "content": tok, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": ty == TOKEN_TYPE_CONTROL}));
        }
    }
    let tj = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer(pre)?,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges},
    });
    let specials = GgufSpecials {
        bos: opt_u32(md, "tokenizer.ggml.bos_token_id"),
        eos: opt_u32(md, "tokenizer.ggml.eos_token_id"),
        add_bos: md.get("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(false),
        chat_template: md.get("tokenizer.chat_template").and_then(|v| v.to_string().ok()).cloned(),
    };
    Ok((tj.to_string(), specials))
}
