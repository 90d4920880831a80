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

/// DeepSeek LLM (7B/67B): letters of Latin, Greek, Cyrillic and other alphabets, ASCII and
/// full-width punctuation, trailing space, CJK runs and digit runs are split apart.
const DEEPSEEK_LLM: &[&str] = &[
    "[\r\n]",
    "\\s?[A-Za-z\u{b5}\u{c0}-\u{d6}\u{d8}-\u{f6}\u{f8}-\u{1ba}\u{1bc}-\u{1bf}\u{1c4}-\u{293}\u{295}-\u{2af}\u{370}-\u{373}\u{376}\u{377}\u{37b}-\u{37d}\u{37f}\u{386}\u{388}-\u{38a}\u{38c}\u{38e}-\u{3a1}\u{3a3}-\u{3f5}\u{3f7}-\u{481}\u{48a}-\u{52f}\u{531}-\u{556}\u{10a0}-\u{10c5}\u{13a0}-\u{13f5}\u{13f8}-\u{13fd}\u{1c90}-\u{1cba}\u{1cbd}-\u{1cbf}\u{1d00}-\u{1d2b}\u{1d6b}-\u{1d77}\u{1d79}-\u{1d9a}\u{1e00}-\u{1f15}\u{1f18}-\u{1f1d}\u{1f20}-\u{1f45}\u{1f48}-\u{1f4d}\u{1f50}-\u{1f57}\u{1f59}\u{1f5b}\u{1f5d}\u{1f5f}-\u{1f7d}\u{1f80}-\u{1fb4}\u{1fb6}-\u{1fbc}\u{1fbe}\u{1fc2}-\u{1fc4}\u{1fc6}-\u{1fcc}\u{1fd0}-\u{1fd3}\u{1fd6}-\u{1fdb}\u{1fe0}-\u{1fec}\u{1ff2}-\u{1ff4}\u{1ff6}-\u{1ffc}\u{2102}\u{2107}\u{210a}-\u{2113}\u{2115}\u{2119}-\u{211d}\u{2124}\u{2126}\u{2128}\u{212a}-\u{212d}\u{212f}-\u{2134}\u{2139}\u{213c}-\u{213f}\u{2145}-\u{2149}\u{214e}\u{2183}\u{2184}\u{2c00}-\u{2c7b}\u{2c7e}-\u{2ce4}\u{2ceb}-\u{2cee}\u{2cf2}\u{2cf3}\u{a640}-\u{a66d}\u{a680}-\u{a69b}\u{a722}-\u{a76f}\u{a771}-\u{a787}\u{a78b}-\u{a78e}\u{ab70}-\u{abbf}\u{fb00}-\u{fb06}\u{fb13}-\u{fb17}\u{ff21}-\u{ff3a}\u{ff41}-\u{ff5a}\u{10400}-\u{1044f}\u{104b0}-\u{104d3}\u{104d8}-\u{104fb}\u{10c80}-\u{10cb2}\u{10cc0}-\u{10cf2}\u{118a0}-\u{118df}\u{1e900}-\u{1e943}]+",
    "\\s?[!-/:-~\u{ff01}-\u{ff0f}\u{ff1a}-\u{ff5e}\u{2018}-\u{201f}\u{3000}-\u{3002}]+",
    "\\s+$",
    "[\u{4e00}-\u{9fa5}\u{800}-\u{4e00}\u{ac00}-\u{d7ff}]+",
    "\\p{N}+",
];
/// DeepSeek Coder.
const DEEPSEEK_CODER: &[&str] =
    &["[\r\n]", "\\s?\\p{L}+", "\\s?\\p{P}+", "[\u{4e00}-\u{9fa5}\u{800}-\u{4e00}\u{ac00}-\u{d7ff}]+", "\\p{N}"];
/// DeepSeek V3 / R1.
const DEEPSEEK_V3: &[&str] = &[
    "\\p{N}{1,3}",
    "[\u{4e00}-\u{9fa5}\u{3040}-\u{309f}\u{30a0}-\u{30ff}]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
];
/// Mistral's Tekken (Mistral Nemo and later).
const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// GPT-4o's (o200k) split, used by Phi-4-mini and Llama 4.
const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Splits by each pattern in turn, then byte-level without its own regex.
fn splits_then_bytes(patterns: &[&str]) -> Json {
    let mut seq: Vec<Json> = patterns.iter().map(|p| split(p)).collect();
    seq.push(byte_level(false));
    json!({"type": "Sequence", "pretokenizers": seq})
}

/// The `tokenizer.ggml.pre` names we rebuild.
pub const SUPPORTED_PRE: &[&str] = &[
    "smollm",
    "starcoder",
    "refact",
    "gpt2",
    "default",
    "gpt-2",
    "olmo",
    "phi-2",
    "jina-v2-code",
    "llama-bpe",
    "llama3",
    "dbrx",
    "smaug-bpe",
    "qwen2",
    "deepseek-r1-qwen",
    "deepseek-llm",
    "deepseek-coder",
    "deepseek-v3",
    "tekken",
    "gpt-4o",
    "llama4",
];

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
        "deepseek-llm" => splits_then_bytes(DEEPSEEK_LLM),
        "deepseek-coder" => splits_then_bytes(DEEPSEEK_CODER),
        "deepseek-v3" => splits_then_bytes(DEEPSEEK_V3),
        "tekken" => splits_then_bytes(&[TEKKEN]),
        "gpt-4o" | "llama4" => splits_then_bytes(&[GPT4O]),
        other => {
            return Err(Error::Unsupported(format!(
                "GGUF pre-tokenizer '{other}' (supported: {})",
                SUPPORTED_PRE.join(", ")
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
        let merges = sentencepiece_merges(&tokens, &scores)?;
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
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            // Llama 3 looks a whole pre-token up before merging (tokenizer.json's
            // `ignore_merges`; llama.cpp does the same for these names).
            "ignore_merges": matches!(pre, "llama-bpe" | "llama3" | "llama-v3"),
            "vocab": vocab, "merges": merges},
    });
    Ok((tj.to_string(), specials))
}

/// Largest vocabulary whose merges are derived (Gemma 3 has 262,144 pieces).
const MAX_SPM_VOCAB: usize = 1 << 20;
/// Bound on the work of deriving merges: the sum over pieces of (characters)², one lookup per
/// split point of a piece, each hashing the piece. Gemma 3's 262,144 pieces need about 2e7; a
/// file whose pieces are made long to stall the load is refused.
const MAX_SPM_MERGE_WORK: u64 = 1 << 30;

/// The merges transformers derives from a SentencePiece vocabulary (`generate_merges` with
/// scores): every split of a piece into two pieces of the vocabulary, a piece's splits in the
/// order of their halves' ids, all ordered by the merged piece's score, then by the halves'
/// lengths, highest first (a stable sort). Applied lowest rank first, this merges the
/// adjacent pair whose result scores highest, as SentencePiece and llama.cpp do.
fn sentencepiece_merges(tokens: &[String], scores: &[f32]) -> Result<Vec<(String, String)>> {
    if tokens.len() > MAX_SPM_VOCAB {
        return Err(Error::BadMetadata(format!(
            "tokenizer.ggml.tokens: {} pieces (at most {MAX_SPM_VOCAB})",
            tokens.len()
        )));
    }
    let work: u64 = tokens.iter().map(|t| (t.len() as u64).pow(2)).sum();
    if work > MAX_SPM_MERGE_WORK {
        return Err(Error::BadMetadata(format!(
            "tokenizer.ggml.tokens: pieces too long to derive merges from ({work} > {MAX_SPM_MERGE_WORK})"
        )));
    }
    let mut ids: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        ids.entry(t.as_str()).or_insert(i);
    }
    let mut merges: Vec<(usize, usize, f32, usize, usize)> = Vec::new();
    let mut local = Vec::new();
    for (i, piece) in tokens.iter().enumerate() {
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
    Ok(merges.into_iter().map(|(a, b, ..)| (tokens[a].clone(), tokens[b].clone())).collect())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Merges follow the merged piece's score, and a vocabulary built to stall the derivation
    /// (long pieces) is refused instead.
    #[test]
    fn sentencepiece_merges_by_score_and_bounded() {
        let tokens: Vec<String> = ["a", "b", "c", "ab", "bc", "abc"].iter().map(|s| s.to_string()).collect();
        let scores = [0.0, 0.0, 0.0, -2.0, -1.0, -3.0];
        let merges = sentencepiece_merges(&tokens, &scores).unwrap();
        let names: Vec<String> = merges.iter().map(|(a, b)| format!("{a}+{b}")).collect();
        // bc (-1) before ab (-2) before abc (-3), whose splits go longer left half first (as
        // transformers' `generate_merges` sorts them).
        assert_eq!(names, ["b+c", "a+b", "ab+c", "a+bc"]);
        let long = vec!["x".repeat(40_000); 1];
        assert!(matches!(sentencepiece_merges(&long, &[0.0]), Err(Error::BadMetadata(_))));
    }
}
