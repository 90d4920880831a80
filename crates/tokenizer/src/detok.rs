//! Incremental detokenization: turning a growing list of token ids into text deltas.
//!
//! Byte-level BPE tokens can end in the middle of a multi-byte UTF-8 character, and
//! SentencePiece tokens decode differently with and without their left context. Like vLLM,
//! we decode a short window `tokens[prefix_offset..]` and compare it with the window's decoded
//! prefix `tokens[prefix_offset..read_offset]`; new text is emitted only once it no longer
//! ends in an incomplete character (U+FFFD).

use crate::{Result, Tokenizer};

/// Prompt tokens kept as left context for the first decoded output token.
const INITIAL_CONTEXT: usize = 5;

/// The detokenization state of one sequence.
#[derive(Debug, Clone)]
pub struct IncrementalDetokenizer {
    tokens: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special_tokens: bool,
    text: String,
}

impl IncrementalDetokenizer {
    /// Starts after `prompt` (only its last few tokens are kept, as context).
    pub fn new(prompt: &[u32], skip_special_tokens: bool) -> Self {
        let ctx = &prompt[prompt.len().saturating_sub(INITIAL_CONTEXT)..];
        Self {
            tokens: ctx.to_vec(),
            prefix_offset: 0,
            read_offset: ctx.len(),
            skip_special_tokens,
            text: String::new(),
        }
    }

    /// The text decoded so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Appends a token and returns the newly completed text (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, token: u32) -> Result<&str> {
        self.tokens.push(token);
        let prefix = tokenizer.decode(&self.tokens[self.prefix_offset..self.read_offset], self.skip_special_tokens)?;
        let full = tokenizer.decode(&self.tokens[self.prefix_offset..], self.skip_special_tokens)?;
        let start = self.text.len();
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            let delta = match full.get(prefix.len()..) {
                Some(d) if full.starts_with(&prefix) => d,
                // The window decoded differently with the new token: emit from the first
                // character boundary after the old prefix.
                _ => {
                    let mut cut = prefix.len().min(full.len());
                    while !full.is_char_boundary(cut) {
                        cut += 1;
                    }
                    &full[cut..]
                }
            };
            self.text.push_str(delta);
            self.prefix_offset = self.read_offset;
            self.read_offset = self.tokens.len();
        }
        Ok(&self.text[start..])
    }
}
