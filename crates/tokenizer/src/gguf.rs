//! Building a Hugging Face tokenizer from GGUF metadata (`tokenizer.ggml.*`).
//!
//! GGUF files written by llama.cpp's converter carry the vocabulary, each token's type and
//! either
//! - byte-level BPE (`tokenizer.ggml.model = gpt2`): the merges and a `tokenizer.ggml.pre`
//!   name for the pre-tokenizer; or
//! - SentencePiece (`llama`: Llama 2, Mistral, TinyLlama, Gemma, Phi-3): each piece's score,
//!   `<0xXX>` byte tokens for byte fallback, and whether a space is prepended
//!   (`tokenizer.ggml.add_space_prefix`).
//!
//! We rebuild the equivalent `tokenizer.json` and load it with the `tokenizers` crate, so
//! encoding matches the original Hugging Face tokenizer: for SentencePiece, the BPE that
//! transformers derives from a `tokenizer.model` (merges from the scores, byte fallback,
//! `▁` for spaces, a space prefixed to the text and to the text after each added token unless
//! it already starts with one). llama.cpp differs only there: it prefixes a space before a
//! leading space too; we follow transformers, as vLLM does.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use serde_json::{json, Value as Json};

use crate::{Error, Result};

/// llama.cpp token types.
const TOKEN_TYPE_UNKNOWN: i32 = 2;
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
    if model != "gpt2" && model != "llama" {
        return Err(Error::Unsupported(format!(
            "GGUF tokenizer model '{model}' (supported: 'gpt2' byte-level BPE, 'llama' SentencePiece)"
        )));
    }
    let tokens = strings(get(md, "tokenizer.ggml.tokens")?, "tokenizer.ggml.tokens")?;
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
        // The first id wins when a piece repeats (as in the tokenizers crate's own vocab).
        if !vocab.contains_key(tok) {
            vocab.insert(tok.clone(), json!(id));
        }
        let ty = types.get(id).copied().unwrap_or(1);
        if ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED {
            added.push(json!({"id": id, "content": tok, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": ty == TOKEN_TYPE_CONTROL}));
        }
    }
    // SentencePiece vocabularies without the ids use llama.cpp's defaults: `<s>` 1, `</s>` 2.
    let spm = |id: u32| (model == "llama" && (id as usize) < tokens.len()).then_some(id);
    let specials = GgufSpecials {
        bos: opt_u32(md, "tokenizer.ggml.bos_token_id").or_else(|| spm(1)),
        eos: opt_u32(md, "tokenizer.ggml.eos_token_id").or_else(|| spm(2)),
        add_bos: md.get("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(model == "llama"),
        chat_template: md.get("tokenizer.chat_template").and_then(|v| v.to_string().ok()).cloned(),
    };
    if model == "llama" {
        let scores: Vec<f32> = match md.get("tokenizer.ggml.scores") {
            Some(v) => v
                .to_vec()
                .map_err(|_| Error::BadMetadata("tokenizer.ggml.scores".into()))?
                .iter()
                .map(|x| x.to_f32().unwrap_or(0.0))
                .collect(),
            None => vec![0.0; tokens.len()],
        };
        let prefix = md.get("tokenizer.ggml.add_space_prefix").and_then(|v| v.to_bool().ok()).unwrap_or(true);
        let unk = types.iter().position(|&t| t == TOKEN_TYPE_UNKNOWN).map(|i| tokens[i].clone());
        let merges = sentencepiece_merges(&tokens, &scores);
        return Ok((sentencepiece_json(vocab, merges, added, prefix, unk).to_string(), specials));
    }
    let merges = strings(get(md, "tokenizer.ggml.merges")?, "tokenizer.ggml.merges")?;
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
    Ok((tj.to_string(), specials))
}

/// Largest vocabulary whose merges are derived (Gemma 3 has 262,144 pieces).
const MAX_SPM_VOCAB: usize = 1 << 20;

/// The merges transformers derives from a SentencePiece vocabulary (`generate_merges` with
/// scores): every split of a piece into two pieces of the vocabulary, a piece's splits in the
/// order of their halves' ids, all ordered by the merged piece's score, then by the halves'
/// lengths, highest first (a stable sort). Applied lowest rank first, this merges the
/// adjacent pair whose result scores highest, as SentencePiece and llama.cpp do.
fn sentencepiece_merges(tokens: &[String], scores: &[f32]) -> Vec<(String, String)> {
    let mut ids: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate().take(MAX_SPM_VOCAB) {
        ids.entry(t.as_str()).or_insert(i);
    }
    let mut merges: Vec<(usize, usize, f32, usize, usize)> = Vec::new();
    let mut local = Vec::new();
    for (i, piece) in tokens.iter().enumerate().take(MAX_SPM_VOCAB) {
        if ids.get(piece.as_str()) != Some(&i) {
            continue; // a repeated piece: its first id already counted it
        }
        local.clear();
        for (at, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(at);
            if let (Some(&a), Some(&b)) = (ids.get(l), ids.get(r)) {
                local.push((a, b, scores.get(i).copied().unwrap_or(0.0), l.chars().count(), r.chars().count()));
            }
        }
        local.sort_by_key(|m| (m.0, m.1));
        merges.extend_from_slice(&local);
    }
    merges.sort_by(|x, y| y.2.total_cmp(&x.2).then(y.3.cmp(&x.3)).then(y.4.cmp(&x.4)));
    merges.into_iter().map(|(a, b, ..)| (tokens[a].clone(), tokens[b].clone())).collect()
}

/// A SentencePiece vocabulary as transformers' (legacy) Llama tokenizer builds it: `▁` for
/// spaces, one prepended to every segment between added tokens when `prefix` (Metaspace,
/// `prepend_scheme` "always", as llama.cpp does), BPE with byte fallback, and the decoder
/// undoing both.
fn sentencepiece_json(
    vocab: serde_json::Map<String, Json>,
    merges: Vec<(String, String)>,
    added: Vec<Json>,
    prefix: bool,
    unk: Option<String>,
) -> Json {
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let merges: Vec<Json> = merges.into_iter().map(|(a, b)| json!([a, b])).collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "\u{2581}",
            "prepend_scheme": if prefix { "always" } else { "never" }, "split": false},
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab, "merges": merges},
    })
}
