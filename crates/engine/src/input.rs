//! The input processor: the one conversion from a request (a prompt and [`SamplingParams`])
//! into a validated [`EngineRequest`], done before the engine core sees it and off its thread.
//!
//! Everything whose cost grows with the request happens here, under a budget: tokenizing
//! (text longer than the context could ever hold is refused before it is tokenized), every
//! limit and integer checked without overflow, bad words encoded, token lists deduplicated,
//! and the guided-decoding constraint compiled on the bounded compile pool (deadline,
//! cancellation, byte-budgeted cache). A failure is an error for this request alone.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};

use vllm_sampler::{CompiledGuide, GuideCompiler, GuideError, GuideLimits, InvalidParam, SamplingParams};
use vllm_scheduler::StopConditions;

use crate::output::Prompt;
use crate::{Error, Result, Tokenizer};

/// Most stop strings and bad words per request (each is checked at every generated token).
pub const MAX_STOP_STRINGS: usize = 256;
/// Longest stop string or bad word, in bytes.
pub const MAX_STOP_STRING_BYTES: usize = 1024;

/// A request ready for the engine core: tokenized, truncated, checked, with its constraint
/// compiled. Building one is the input processor's job ([`InputProcessor::process`]); adding
/// one to the core costs O(prompt) and nothing else.
pub struct EngineRequest {
    pub(crate) request_id: String,
    /// The prompt text, when the prompt was text.
    pub(crate) prompt: Option<String>,
    pub(crate) prompt_ids: Vec<u32>,
    pub(crate) params: SamplingParams,
    pub(crate) stop: StopConditions,
    /// Ids held back until `min_tokens` (EOS and stop token ids).
    pub(crate) min_tokens_stop_ids: Vec<u32>,
    pub(crate) bad_words: Vec<Vec<u32>>,
    pub(crate) guide: Option<Arc<dyn CompiledGuide>>,
    /// Tokens the output must end with before the guide starts (reasoning's end tag).
    pub(crate) guide_after: Vec<u32>,
    /// Log probabilities after temperature scaling (beam search ranks by them).
    pub(crate) scaled_logprobs: bool,
    /// The LoRA adapter it runs with, held until it finishes.
    pub(crate) lora: Option<crate::lora::LoraLease>,
}

impl EngineRequest {
    /// The request's id.
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// The prompt's token ids.
    pub fn prompt_token_ids(&self) -> &[u32] {
        &self.prompt_ids
    }

    /// The checked sampling parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }
}

impl std::fmt::Debug for EngineRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineRequest")
            .field("request_id", &self.request_id)
            .field("prompt_tokens", &self.prompt_ids.len())
            .field("max_tokens", &self.stop.max_tokens)
            .finish_non_exhaustive()
    }
}

struct Inner {
    tokenizer: Tokenizer,
    vocab_size: usize,
    max_model_len: usize,
    max_num_seqs: usize,
    /// Bytes of the longest token: text longer than `max_model_len` times this cannot fit.
    max_token_bytes: usize,
    guide_limits: GuideLimits,
    guides: OnceLock<GuideCompiler>,
    /// The adapters, with `--enable-lora`.
    lora: Option<Arc<crate::lora::LoraManager>>,
}

/// Turns requests into [`EngineRequest`]s. Cheap to clone; safe to use from many threads.
#[derive(Clone)]
pub struct InputProcessor {
    inner: Arc<Inner>,
}

fn invalid(param: &'static str, message: impl Into<String>) -> Error {
    Error::InvalidParams(InvalidParam { param, message: message.into() })
}

impl InputProcessor {
    /// A processor for a model with `vocab_size` logits, `max_model_len` context and
    /// `max_num_seqs` sequences per step.
    pub fn new(
        tokenizer: Tokenizer,
        vocab_size: usize,
        max_model_len: usize,
        max_num_seqs: usize,
        guide_limits: GuideLimits,
    ) -> Self {
        // A token's stored string is at least as long as the bytes it stands for (byte-level
        // BPE maps each byte to a 1-2 byte character; SentencePiece writes "▁" and "<0xNN>"),
        // so its length bounds them without decoding every token.
        let max_token_bytes = (0..tokenizer.vocab_size() as u32)
            .filter_map(|id| tokenizer.id_to_token(id))
            .map(|t| t.len())
            .max()
            .unwrap_or(1)
            .max(1);
        let inner = Inner {
            tokenizer,
            vocab_size,
            max_model_len,
            max_num_seqs,
            max_token_bytes,
            guide_limits,
            guides: OnceLock::new(),
            lora: None,
        };
        Self { inner: Arc::new(inner) }
    }

    /// The processor with LoRA adapters (at build, before it is shared).
    pub(crate) fn with_lora(mut self, manager: Arc<crate::lora::LoraManager>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.lora = Some(manager);
        }
        self
    }

    /// The LoRA adapters, with `--enable-lora`.
    pub fn lora(&self) -> Option<&Arc<crate::lora::LoraManager>> {
        self.inner.lora.as_ref()
    }

    /// A lease on `req`'s adapter (loading it on first use); an error without `--enable-lora`.
    pub fn lora_lease(&self, req: Option<&crate::lora::LoraRequest>) -> Result<Option<crate::lora::LoraLease>> {
        crate::lora::lease(self.inner.lora.as_deref(), req)
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.inner.tokenizer
    }

    /// The context length.
    pub fn max_model_len(&self) -> usize {
        self.inner.max_model_len
    }

    /// The most bytes of prompt text worth tokenizing: longer text cannot fit the context.
    pub fn max_prompt_bytes(&self) -> usize {
        self.inner.max_model_len.saturating_add(16).saturating_mul(self.inner.max_token_bytes)
    }

    /// The guided-decoding compiler over this tokenizer's vocabulary (built on first use).
    pub fn guide_compiler(&self) -> &GuideCompiler {
        let inner = &self.inner;
        inner.guides.get_or_init(|| {
            let tok = &inner.tokenizer;
            let eos = tok.eos_token_ids().first().copied().unwrap_or(0);
            let tokens = (0..tok.vocab_size() as u32).filter_map(|id| tok.token_bytes(id).map(|b| (id, b)));
            GuideCompiler::with_limits(tokens.collect::<Vec<_>>(), eos, inner.guide_limits.clone())
        })
    }

    /// Tokenizes text that is to be a prompt (or a rendered conversation), refusing first
    /// what could never fit the context: more bytes than [`Self::max_prompt_bytes`].
    /// `add_special_tokens`: the tokenizer's BOS (and the like) are added.
    pub fn encode_text(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        self.check_text_bytes(text)?;
        Ok(self.inner.tokenizer.encode(text, add_special_tokens)?)
    }

    /// Text longer than [`Self::max_prompt_bytes`] cannot fit the context.
    fn check_text_bytes(&self, text: &str) -> Result<()> {
        if text.len() > self.max_prompt_bytes() {
            return Err(Error::InvalidPrompt(format!(
                "the prompt has {} bytes: more than the {} tokens of the context can hold (no token is longer than {} \
                 bytes)",
                text.len(),
                self.inner.max_model_len,
                self.inner.max_token_bytes
            )));
        }
        Ok(())
    }

    /// Tokenizes (if needed) and checks a prompt; with `truncate` keeps only its last
    /// `truncate` tokens. Text that could never fit the context is refused before tokenizing.
    pub fn prompt_ids(&self, prompt: &Prompt, truncate: Option<usize>) -> Result<Vec<u32>> {
        let inner = &self.inner;
        let max_len = inner.max_model_len;
        let mut ids = match prompt {
            Prompt::Text(t) => {
                let cap = match truncate {
                    Some(k) => k.min(max_len).saturating_add(16).saturating_mul(inner.max_token_bytes),
                    None => self.max_prompt_bytes(),
                };
                if truncate.is_none() {
                    self.check_text_bytes(t)?;
                }
                // With truncation only the tail can survive: tokenize no more of it than that.
                let mut from = t.len().saturating_sub(cap);
                while !t.is_char_boundary(from) {
                    from += 1;
                }
                inner.tokenizer.encode(&t[from..], true)?
            }
            Prompt::TokenIds(ids) => ids.clone(),
        };
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= inner.vocab_size) {
            return Err(Error::InvalidPrompt(format!(
                "token id {bad} is outside the model's vocabulary ({})",
                inner.vocab_size
            )));
        }
        if let Some(k) = truncate {
            ids.drain(..ids.len().saturating_sub(k));
        }
        if ids.is_empty() {
            return Err(Error::InvalidPrompt("the prompt is empty".into()));
        }
        if ids.len() >= max_len {
            return Err(Error::PromptTooLong { prompt_tokens: ids.len(), max_model_len: max_len });
        }
        Ok(ids)
    }

    /// Checks limits that depend on the engine (not only on the parameters themselves).
    fn check_params(&self, params: &SamplingParams) -> Result<()> {
        params.validate(self.inner.vocab_size)?;
        let seqs = params.num_sequences();
        if seqs > self.inner.max_num_seqs {
            let param = if params.best_of.is_some_and(|b| b > params.n) { "best_of" } else { "n" };
            return Err(invalid(
                param,
                format!(
                    "{seqs} sequences exceed max_num_seqs ({}), the most one request may ask for",
                    self.inner.max_num_seqs
                ),
            ));
        }
        for (param, list) in [("stop", &params.stop), ("bad_words", &params.bad_words)] {
            if list.len() > MAX_STOP_STRINGS {
                return Err(invalid(param, format!("at most {MAX_STOP_STRINGS} entries, got {}", list.len())));
            }
            if let Some(s) = list.iter().find(|s| s.len() > MAX_STOP_STRING_BYTES) {
                return Err(invalid(
                    param,
                    format!("entries are limited to {MAX_STOP_STRING_BYTES} bytes, got {}", s.len()),
                ));
            }
        }
        Ok(())
    }

    /// The one conversion from a request to an [`EngineRequest`]: checks, tokenizes, compiles
    /// the constraint (giving up when `cancel` is set). Nothing is queued here.
    pub fn process(
        &self,
        request_id: impl Into<String>,
        prompt: Prompt,
        params: SamplingParams,
        cancel: &AtomicBool,
    ) -> Result<EngineRequest> {
        self.process_with_lora(request_id, prompt, params, None, cancel)
    }

    /// [`Self::process`] for a request that runs with a LoRA adapter (loaded here on first
    /// use: its reading and checking happen off the engine thread too).
    pub fn process_with_lora(
        &self,
        request_id: impl Into<String>,
        prompt: Prompt,
        mut params: SamplingParams,
        lora: Option<&crate::lora::LoraRequest>,
        cancel: &AtomicBool,
    ) -> Result<EngineRequest> {
        let lease = self.lora_lease(lora)?;
        self.check_params(&params)?;
        let prompt_ids = self.prompt_ids(&prompt, params.truncate_prompt_tokens)?;
        let guide = match &params.guided_decoding {
            Some(g) => Some(self.guide_compiler().compile_request(g, cancel).map_err(|e| match e {
                GuideError::Invalid(p) => Error::InvalidParams(p),
                e => Error::Guided(e),
            })?),
            None => None,
        };
        // Token lists are applied at every step: keep each id once.
        for list in [Some(&mut params.stop_token_ids), params.allowed_token_ids.as_mut()].into_iter().flatten() {
            list.sort_unstable();
            list.dedup();
        }
        let tok = &self.inner.tokenizer;
        let mut bad_words: Vec<Vec<u32>> = Vec::new();
        for w in &params.bad_words {
            // Banned with and without a leading space, like vLLM.
            for variant in [w.clone(), format!(" {}", w.trim_start())] {
                let ids = tok.encode(&variant, false)?;
                if !ids.is_empty() && !bad_words.contains(&ids) {
                    bad_words.push(ids);
                }
            }
        }
        let params_after = params.guided_decoding.as_ref().and_then(|g| g.starts_after.clone());
        let mut req = self.request_from_ids(request_id.into(), prompt_ids, params)?;
        req.prompt = match prompt {
            Prompt::Text(t) => Some(t),
            Prompt::TokenIds(_) => None,
        };
        req.bad_words = bad_words;
        if guide.is_some() {
            if let Some(after) = params_after {
                if after.len() > 256 {
                    return Err(invalid("guided_decoding", "starts_after is limited to 256 bytes"));
                }
                req.guide_after = tok.encode(&after, false)?;
            }
        }
        req.guide = guide;
        req.lora = lease;
        Ok(req)
    }

    /// An [`EngineRequest`] for prompt ids already checked by [`Self::prompt_ids`] (beam
    /// search's steps), with stop conditions worked out.
    pub(crate) fn request_from_ids(
        &self,
        request_id: String,
        prompt_ids: Vec<u32>,
        params: SamplingParams,
    ) -> Result<EngineRequest> {
        let max_len = self.inner.max_model_len;
        let prompt_len = prompt_ids.len();
        if prompt_len >= max_len {
            return Err(Error::PromptTooLong { prompt_tokens: prompt_len, max_model_len: max_len });
        }
        let max_tokens = params.max_tokens.unwrap_or(max_len - prompt_len);
        if prompt_len.checked_add(max_tokens).is_none_or(|total| total > max_len) {
            return Err(invalid(
                "max_tokens",
                format!(
                    "This model's maximum context length is {max_len} tokens. However, you requested {} tokens \
                     ({prompt_len} in the prompt, {max_tokens} in the completion). Please reduce the length of the \
                     prompt or completion.",
                    prompt_len.saturating_add(max_tokens)
                ),
            ));
        }
        let eos = self.inner.tokenizer.eos_token_ids().to_vec();
        let stop = StopConditions {
            max_tokens,
            min_tokens: params.min_tokens,
            eos_token_ids: eos,
            stop_token_ids: params.stop_token_ids.clone(),
            ignore_eos: params.ignore_eos,
        };
        let min_tokens_stop_ids = if params.min_tokens > 0 {
            stop.eos_token_ids.iter().chain(&stop.stop_token_ids).copied().collect()
        } else {
            Vec::new()
        };
        Ok(EngineRequest {
            request_id,
            prompt: None,
            prompt_ids,
            params,
            stop,
            min_tokens_stop_ids,
            bad_words: Vec::new(),
            guide: None,
            guide_after: Vec::new(),
            scaled_logprobs: false,
            lora: None,
        })
    }
}
