//! # vllm-tokenizer
//!
//! Tokenizers for vllm-rs: Hugging Face `tokenizer.json` files through the `tokenizers`
//! crate, tokenizers rebuilt from GGUF metadata (byte-level BPE with the model's
//! pre-tokenizer, matching the original ids), special tokens (BOS/EOS), the model's chat
//! template string, and an [`IncrementalDetokenizer`] for streaming text.
//!
//! ```no_run
//! use vllm_tokenizer::{IncrementalDetokenizer, Tokenizer};
//!
//! let tok = Tokenizer::from_hf_dir("path/to/model".as_ref()).unwrap();
//! let ids = tok.encode("Hello world", true).unwrap();
//! let mut detok = IncrementalDetokenizer::new(&ids, true);
//! for &t in &ids {
//!     print!("{}", detok.push(&tok, t).unwrap());
//! }
//! ```

mod chat;
mod detok;
mod gguf;

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;

use candle_core::quantized::gguf_file::Value;

pub use chat::{
    normalize_messages, ChatRequest, ChatTemplate, ContentFormat, CHAT_TEMPLATE_FUEL, CHAT_TEMPLATE_RECURSION_LIMIT,
    MAX_RENDERED_BYTES,
};
pub use detok::IncrementalDetokenizer;

/// Tokenizer errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The `tokenizers` crate rejected a file or an input.
    #[error("tokenizer error: {0}")]
    Tokenizers(#[from] tokenizers::Error),
    /// A GGUF metadata key is missing.
    #[error("GGUF metadata has no '{0}'")]
    MissingMetadata(String),
    /// A GGUF metadata key has the wrong type.
    #[error("GGUF metadata '{0}' has an unexpected type")]
    BadMetadata(String),
    /// A tokenizer kind we do not implement.
    #[error("unsupported tokenizer: {0}")]
    Unsupported(String),
    /// The chat template failed to compile or render, or the model has none.
    #[error("chat template: {0}")]
    Template(String),
    /// A chat message cannot be given to a template (a media content part, a tool call that
    /// is not a function, a message that is not an object with a role).
    #[error("messages[{index}]: {reason}")]
    InvalidMessage {
        /// The message's position in the conversation.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// A token id outside the vocabulary.
    #[error("token id {id} is outside the vocabulary (size {vocab_size})")]
    InvalidTokenId {
        /// The id.
        id: u32,
        /// Vocabulary size.
        vocab_size: usize,
    },
}

/// Crate result type.
pub type Result<T> = std::result::Result<T, Error>;

/// A tokenizer with the model's special tokens and chat template.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_token_id: Option<u32>,
    eos_token_ids: Vec<u32>,
    add_bos: bool,
    chat_template: Option<String>,
    vocab_size: usize,
}

/// Runs one of the `tokenizers` crate's operations. Some of its parts panic on settings a
/// hostile `tokenizer.json` can hold (a `Strip` decoder cutting more than an empty text has):
/// that is contained here and becomes an error, never a panic in a request.
fn guard<T>(op: impl FnOnce() -> tokenizers::Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(op))
        .unwrap_or_else(|_| Err("the tokenizer failed on this input (a part of it is malformed)".into()))
        .map_err(Error::from)
}

/// Parses a `tokenizer.json`. The `tokenizers` crate panics on some malformed files (an
/// `expect` where a decoder or normalizer fails to deserialize): that is contained here and
/// becomes an error like any other malformed file.
fn parse(json: &str) -> Result<tokenizers::Tokenizer> {
    // Not JSON at all: said plainly (the crate's decoder reader panics on some syntax errors).
    serde_json::from_str::<serde::de::IgnoredAny>(json).map_err(|e| Error::Tokenizers(e.into()))?;
    std::panic::catch_unwind(|| tokenizers::Tokenizer::from_str(json))
        .unwrap_or_else(|_| {
            Err("tokenizer.json is malformed (the tokenizers crate could not read one of its parts)".into())
        })
        .map_err(Error::from)
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.display().to_string(), source })
}

impl Tokenizer {
    /// The tokenizer, once it has encoded and decoded a few things without failing (a
    /// tokenizer that cannot is refused when it loads, not at each request).
    fn wrap(
        inner: tokenizers::Tokenizer,
        bos: Option<u32>,
        eos: Vec<u32>,
        add_bos: bool,
        tpl: Option<String>,
    ) -> Result<Self> {
        let vocab_size = inner.get_vocab_size(true);
        let t = Self { inner, bos_token_id: bos, eos_token_ids: eos, add_bos, chat_template: tpl, vocab_size };
        let some_ids: Vec<u32> = (0..vocab_size.min(8) as u32).collect();
        let probe = || -> Result<()> {
            for skip in [false, true] {
                t.decode(&[], skip)?;
                t.decode(&some_ids, skip)?;
            }
            t.encode("Hello world, 123 héllo", true)?;
            Ok(())
        };
        probe().map_err(|e| Error::Tokenizers(format!("the tokenizer does not work: {e}").into()))?;
        Ok(t)
    }

    /// Loads `tokenizer.json` from a model folder, with `tokenizer_config.json` (BOS/EOS,
    /// `add_bos_token`, `chat_template`) and `generation_config.json` (EOS ids) when present.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let mut inner = parse(&read(&dir.join("tokenizer.json"))?)?;
        // Truncation and padding saved in tokenizer.json (sentence-transformers folders set
        // both to 128) are the engine's business (max_seq_length, truncate_prompt_tokens).
        inner.with_truncation(None)?;
        inner.with_padding(None);
        let config: serde_json::Value = read(&dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default();
        let token_id = |key: &str| -> Option<u32> {
            let v = config.get(key)?;
            let s = v.as_str().or_else(|| v.get("content").and_then(|c| c.as_str()))?;
            inner.token_to_id(s)
        };
        let bos = token_id("bos_token");
        let mut eos: Vec<u32> = token_id("eos_token").into_iter().collect();
        if let Some(gen) = read(&dir.join("generation_config.json"))
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        {
            match gen.get("eos_token_id") {
                Some(serde_json::Value::Number(n)) => eos.extend(n.as_u64().map(|x| x as u32)),
                Some(serde_json::Value::Array(a)) => eos.extend(a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32)),
                _ => {}
            }
        }
        eos.sort_unstable();
        eos.dedup();
        let add_bos = config.get("add_bos_token").and_then(|v| v.as_bool()).unwrap_or(false);
        let tpl = config.get("chat_template").and_then(|v| v.as_str()).map(String::from);
        Self::wrap(inner, bos, eos, add_bos, tpl)
    }

    /// Loads a bare `tokenizer.json` with the given special tokens.
    pub fn from_file(path: &Path, bos: Option<u32>, eos: Vec<u32>) -> Result<Self> {
        let inner = parse(&read(path)?)?;
        Self::wrap(inner, bos, eos, false, None)
    }

    /// Rebuilds the tokenizer from GGUF metadata.
    pub fn from_gguf(metadata: &HashMap<String, Value>) -> Result<Self> {
        let (json, sp) = gguf::tokenizer_json(metadata)?;
        let inner = parse(&json)?;
        Self::wrap(inner, sp.bos, sp.eos.into_iter().collect(), sp.add_bos, sp.chat_template)
    }

    /// Encodes text. With `add_special_tokens`, BOS is prepended if the model asks for it.
    /// Special tokens written in the text (`<|im_start|>`) are always recognised.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = guard(|| self.inner.encode(text, false))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_special_tokens && self.add_bos {
            if let Some(b) = self.bos_token_id {
                ids.push(b);
            }
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Encodes with the tokenizer's own post-processor (e.g. BERT's `[CLS] ... [SEP]`), as
    /// encoder models expect.
    pub fn encode_with_post_processor(&self, text: &str) -> Result<Vec<u32>> {
        Ok(guard(|| self.inner.encode(text, true))?.get_ids().to_vec())
    }

    /// Decodes ids to text, optionally dropping special tokens.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        guard(|| self.inner.decode(ids, skip_special_tokens))
    }

    /// Checks that every id is inside the vocabulary.
    pub fn check_ids(&self, ids: &[u32]) -> Result<()> {
        match ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            Some(&id) => Err(Error::InvalidTokenId { id, vocab_size: self.vocab_size }),
            None => Ok(()),
        }
    }

    /// The text of one token, as stored in the vocabulary.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The raw bytes a token stands for, for guided decoding's automata: byte-level BPE
    /// tokens are mapped back through GPT-2's byte-to-unicode table, SentencePiece tokens
    /// have `▁` as a space and `<0xNN>` as a byte. `None` for special (added) tokens, which
    /// are not text.
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        if self.inner.get_added_tokens_decoder().get(&id).is_some_and(|t| t.special) {
            return None;
        }
        let tok = self.inner.id_to_token(id)?;
        if let Some(hex) = tok.strip_prefix("<0x").and_then(|t| t.strip_suffix('>')) {
            return u8::from_str_radix(hex, 16).ok().map(|b| vec![b]);
        }
        if tok.contains('\u{2581}') {
            return Some(tok.replace('\u{2581}', " ").into_bytes());
        }
        tok.chars().map(byte_level_byte).collect()
    }

    /// The id of a token string.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Beginning-of-sequence token.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }

    /// End-of-sequence tokens (several for some chat models).
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// Whether encoding with special tokens prepends BOS.
    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    /// The model's Jinja chat template, if it ships one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Compiles the chat template: `override_template` (a `--chat-template`) or the model's.
    pub fn chat_template_for(&self, override_template: Option<&str>) -> Result<ChatTemplate> {
        let src = override_template
            .or(self.chat_template.as_deref())
            .ok_or_else(|| Error::Template("the model has no chat template; pass one with --chat-template".into()))?;
        let tok = |id: Option<u32>| id.and_then(|i| self.inner.id_to_token(i));
        ChatTemplate::new(src, tok(self.bos_token_id), tok(self.eos_token_ids.first().copied()))
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// The byte a GPT-2 byte-level character stands for: printable bytes map to themselves, the
/// others (0-32, 127-160, 173) to U+0100 onwards, in order.
fn byte_level_byte(c: char) -> Option<u8> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let code = c as u32;
    if code < 256 && printable(code) {
        return Some(code as u8);
    }
    let n = code.checked_sub(256)?;
    (0u32..256).filter(|&b| !printable(b)).nth(n as usize).map(|b| b as u8)
}
