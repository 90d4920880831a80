//! The offline API (vLLM's `LLM` class).

use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use vllm_sampler::SamplingParams;

use crate::args::EngineArgs;
use crate::beam::{BeamSearchOutput, BeamSearchParams};
use crate::embed::{Embedder, EmbeddingRequestOutput};
use crate::engine::{AbortHandle, LLMEngine};
use crate::lora::LoraRequest;
use crate::output::{Prompt, RequestOutput};
use crate::score::{ScoreInput, ScoringRequestOutput};
use crate::source::ModelFiles;
use crate::{Error, Result};

/// Sampling parameters for a batch: one for all prompts, or one per prompt.
#[derive(Debug, Clone)]
pub enum ParamsList {
    /// The same parameters for every prompt.
    One(Box<SamplingParams>),
    /// One per prompt, in order.
    PerPrompt(Vec<SamplingParams>),
}

impl From<SamplingParams> for ParamsList {
    fn from(p: SamplingParams) -> Self {
        ParamsList::One(Box::new(p))
    }
}
impl From<&SamplingParams> for ParamsList {
    fn from(p: &SamplingParams) -> Self {
        ParamsList::One(Box::new(p.clone()))
    }
}
impl From<Vec<SamplingParams>> for ParamsList {
    fn from(p: Vec<SamplingParams>) -> Self {
        ParamsList::PerPrompt(p)
    }
}
impl From<&[SamplingParams]> for ParamsList {
    fn from(p: &[SamplingParams]) -> Self {
        ParamsList::PerPrompt(p.to_vec())
    }
}

/// LoRA adapters for a batch (vLLM's `lora_request`): none, one for every prompt, or one (or
/// none) per prompt.
#[derive(Debug, Clone, Default)]
pub enum LoraList {
    /// The base model for every prompt.
    #[default]
    None,
    /// The same adapter for every prompt.
    One(LoraRequest),
    /// One per prompt, in order (`None`: the base model).
    PerPrompt(Vec<Option<LoraRequest>>),
}

impl From<LoraRequest> for LoraList {
    fn from(l: LoraRequest) -> Self {
        LoraList::One(l)
    }
}
impl From<Option<LoraRequest>> for LoraList {
    fn from(l: Option<LoraRequest>) -> Self {
        l.map_or(LoraList::None, LoraList::One)
    }
}
impl From<Vec<Option<LoraRequest>>> for LoraList {
    fn from(v: Vec<Option<LoraRequest>>) -> Self {
        LoraList::PerPrompt(v)
    }
}

impl LoraList {
    /// One entry per prompt of `n`; a per-prompt list of another length is an error naming
    /// `lora_request`.
    fn per_prompt(self, n: usize) -> Result<Vec<Option<LoraRequest>>> {
        match self {
            LoraList::None => Ok(vec![None; n]),
            LoraList::One(l) => Ok(vec![Some(l); n]),
            LoraList::PerPrompt(v) if v.len() == n => Ok(v),
            LoraList::PerPrompt(v) => Err(Error::InvalidArgument {
                param: "lora_request",
                message: format!("{} adapters for {n} prompts", v.len()),
            }),
        }
    }
}

/// One conversation (a list of `{"role", "content", ...}` messages) or a batch of them.
#[derive(Debug, Clone)]
pub enum Conversations {
    /// A single conversation.
    One(Vec<serde_json::Value>),
    /// Several conversations, answered in order.
    Many(Vec<Vec<serde_json::Value>>),
}

impl From<Vec<serde_json::Value>> for Conversations {
    fn from(m: Vec<serde_json::Value>) -> Self {
        Conversations::One(m)
    }
}
impl From<&[serde_json::Value]> for Conversations {
    fn from(m: &[serde_json::Value]) -> Self {
        Conversations::One(m.to_vec())
    }
}
impl From<Vec<Vec<serde_json::Value>>> for Conversations {
    fn from(m: Vec<Vec<serde_json::Value>>) -> Self {
        Conversations::Many(m)
    }
}

/// How [`LLM::chat`] renders conversations (vLLM's `LLM.chat` keyword arguments).
#[derive(Debug, Clone)]
pub struct ChatOptions {
    /// A Jinja template to use instead of the model's.
    pub chat_template: Option<String>,
    /// Open the assistant's turn after the conversation (default true).
    pub add_generation_prompt: bool,
    /// Leave the final (assistant) message open so the model continues it.
    pub continue_final_message: bool,
    /// Tool definitions, passed to the template as `tools`.
    pub tools: Option<serde_json::Value>,
    /// Documents, passed to the template as `documents`.
    pub documents: Option<serde_json::Value>,
    /// Extra template variables.
    pub chat_template_kwargs: Option<serde_json::Map<String, serde_json::Value>>,
    /// The LoRA adapter every conversation runs with (vLLM's `lora_request`).
    pub lora_request: Option<LoraRequest>,
}

impl Default for ChatOptions {
    fn default() -> Self {
        Self {
            chat_template: None,
            add_generation_prompt: true,
            continue_final_message: false,
            tools: None,
            documents: None,
            chat_template_kwargs: None,
            lora_request: None,
        }
    }
}

/// An engine for offline batch inference.
///
/// ```no_run
/// use vllm_engine::{EngineArgs, SamplingParams, LLM};
///
/// let llm = LLM::new(EngineArgs::default())?; // SmolLM2-135M-Instruct
/// let params = SamplingParams { temperature: 0.8, top_p: 0.95, ..Default::default() };
/// for out in llm.generate(["Hello, my name is", "The capital of France is"], &params)? {
///     println!("{:?} -> {:?}", out.prompt, out.outputs[0].text);
/// }
/// # Ok::<(), vllm_engine::Error>(())
/// ```
pub struct LLM {
    /// The generation engine (`None` for an embedding model).
    engine: Option<Mutex<LLMEngine>>,
    /// The encoder of an embedding model.
    embedder: Option<Embedder>,
    model: String,
    aborts: AbortHandle,
    use_tqdm: bool,
    counter: Mutex<u64>,
}

impl LLM {
    /// Loads the model and allocates the cache.
    /// An embedding model (`BertModel` with sentence-transformers pooling) gets an encoder
    /// for [`Self::encode`] instead.
    pub fn new(args: EngineArgs) -> Result<Self> {
        let model = args.model.clone();
        let files = crate::source::resolve_with(&args.model, &args.hub())?;
        if let ModelFiles::HfDir(dir) = &files {
            if Embedder::is_embedding_model(dir) {
                let embedder = Embedder::load(dir, &args)?;
                return Ok(Self {
                    engine: None,
                    embedder: Some(embedder),
                    model,
                    aborts: AbortHandle::default(),
                    use_tqdm: true,
                    counter: Mutex::new(0),
                });
            }
        }
        let engine = LLMEngine::from_files(args, files)?;
        Ok(Self {
            aborts: engine.abort_handle(),
            engine: Some(Mutex::new(engine)),
            embedder: None,
            model,
            use_tqdm: true,
            counter: Mutex::new(0),
        })
    }

    /// The generation engine, or an error naming the model when it only embeds.
    fn engine(&self) -> Result<std::sync::MutexGuard<'_, LLMEngine>> {
        match &self.engine {
            Some(e) => Ok(e.lock().unwrap_or_else(|p| p.into_inner())),
            None => Err(Error::InvalidArgument {
                param: "model",
                message: format!("'{}' is an embedding model: use encode / embed", self.model),
            }),
        }
    }

    /// Embeds each prompt (vLLM's `LLM.encode` for pooling models); one output per prompt,
    /// in input order. Texts longer than the model's `max_seq_length` are truncated like
    /// sentence-transformers does. A generative model is an error naming `model`.
    pub fn encode<P: Into<Prompt>>(&self, prompts: impl IntoIterator<Item = P>) -> Result<Vec<EmbeddingRequestOutput>> {
        self.encode_with_lora(prompts, LoraList::None)
    }

    /// [`Self::encode`] with LoRA adapters (vLLM's `lora_request`): one for every prompt, or
    /// one (or none) per prompt; the engine needs `enable_lora`. Prompts of different adapters
    /// and of the base model are embedded in the same batches.
    pub fn encode_with_lora<P: Into<Prompt>>(
        &self,
        prompts: impl IntoIterator<Item = P>,
        loras: impl Into<LoraList>,
    ) -> Result<Vec<EmbeddingRequestOutput>> {
        let embedder = self.pooling("encode")?;
        let prompts: Vec<Prompt> = prompts.into_iter().map(Into::into).collect();
        let loras = loras.into().per_prompt(prompts.len())?;
        embedder.encode_with_lora(&prompts, &loras)
    }

    /// The same as [`Self::encode`] (vLLM's `LLM.embed`).
    pub fn embed<P: Into<Prompt>>(&self, prompts: impl IntoIterator<Item = P>) -> Result<Vec<EmbeddingRequestOutput>> {
        self.encode(prompts)
    }

    /// Scores text pairs (vLLM's `LLM.score`) with an embedding model: the cosine similarity
    /// of each pair's vectors, one output per pair in order. `text_1` one text and `text_2`
    /// one or a list (1:1, 1:N), or two lists of the same length (N:N); other counts are an
    /// error naming `text_1` or `text_2`, and a generative model one naming `model`.
    ///
    /// ```no_run
    /// # let llm = vllm_engine::LLM::new(vllm_engine::EngineArgs::new("all-MiniLM-L6-v2"))?;
    /// let outs = llm.score("What is the capital of France?", ["Paris is.", "Cats sit."])?;
    /// assert!(outs[0].outputs.score > outs[1].outputs.score);
    /// # Ok::<(), vllm_engine::Error>(())
    /// ```
    pub fn score(
        &self,
        text_1: impl Into<ScoreInput>,
        text_2: impl Into<ScoreInput>,
    ) -> Result<Vec<ScoringRequestOutput>> {
        self.pooling("score")?.score_with_lora(text_1.into(), text_2.into(), None)
    }

    /// The encoder, or an error naming `model` when this is a generative model (`api`: the
    /// call refused).
    fn pooling(&self, api: &str) -> Result<&Embedder> {
        self.embedder.as_ref().ok_or_else(|| Error::InvalidArgument {
            param: "model",
            message: format!(
                "'{}' is not an embedding model, so it does not support {api} (supported: {})",
                self.model,
                vllm_models::registry::encoder_classes().collect::<Vec<_>>().join(", ")
            ),
        })
    }

    /// The encoder, for an embedding model.
    pub fn embedder(&self) -> Option<&Embedder> {
        self.embedder.as_ref()
    }

    /// Aborts requests of a running [`Self::generate`] from another thread. Requests are
    /// numbered like vLLM's: `"0"`, `"1"`, ... across calls, in prompt order (the outputs'
    /// `request_id`). An aborted request's output ends with `finish_reason` abort.
    pub fn abort_handle(&self) -> AbortHandle {
        self.aborts.clone()
    }

    /// Shows (the default) or hides the progress bar. It is never drawn when standard error
    /// is not a terminal.
    pub fn set_use_tqdm(&mut self, on: bool) {
        self.use_tqdm = on;
    }

    /// Runs `f` with the engine locked (statistics, tokenizer, low-level requests).
    ///
    /// # Panics
    /// On an embedding model, which has no generation engine (see [`Self::embedder`]).
    pub fn with_engine<T>(&self, f: impl FnOnce(&mut LLMEngine) -> T) -> T {
        let mut e = self.engine().expect("with_engine needs a generative model");
        f(&mut e)
    }

    /// Generates a reply to each conversation, rendered with the model's chat template (or
    /// `opts.chat_template`) like vLLM's `LLM.chat`; one output per conversation, in order.
    /// A model without a template, or a conversation the template refuses, is an error
    /// naming `chat_template` or `messages`, and nothing runs.
    pub fn chat(
        &self,
        conversations: impl Into<Conversations>,
        params: impl Into<ParamsList>,
        opts: &ChatOptions,
    ) -> Result<Vec<RequestOutput>> {
        let conversations = match conversations.into() {
            Conversations::One(m) => vec![m],
            Conversations::Many(m) => m,
        };
        let prompts = self.with_engine(|e| -> Result<Vec<Prompt>> {
            let tok = e.tokenizer();
            let tpl = tok
                .chat_template_for(opts.chat_template.as_deref())
                .map_err(|err| Error::InvalidArgument { param: "chat_template", message: err.to_string() })?;
            conversations
                .iter()
                .map(|messages| {
                    let text = tpl
                        .render(&vllm_tokenizer::ChatRequest {
                            messages,
                            add_generation_prompt: opts.add_generation_prompt,
                            continue_final_message: opts.continue_final_message,
                            tools: opts.tools.as_ref(),
                            documents: opts.documents.as_ref(),
                            kwargs: opts.chat_template_kwargs.as_ref(),
                        })
                        .map_err(|err| Error::InvalidArgument { param: "messages", message: err.to_string() })?;
                    // The template writes any BOS the model wants.
                    Ok(Prompt::TokenIds(tok.encode(&text, false)?))
                })
                .collect()
        })?;
        self.generate_with_lora(prompts, params, opts.lora_request.clone())
    }

    /// Beam search for every prompt (vLLM's `LLM.beam_search`); returns one output per
    /// prompt, in input order, each with `beam_width` sequences best first. The beams are
    /// ranked like Hugging Face `generate(num_beams=...)` (see [`crate::beam`]).
    pub fn beam_search<P: Into<Prompt>>(
        &self,
        prompts: impl IntoIterator<Item = P>,
        params: &BeamSearchParams,
    ) -> Result<Vec<BeamSearchOutput>> {
        self.beam_search_with_lora(prompts, params, None)
    }

    /// [`Self::beam_search`] with a LoRA adapter.
    pub fn beam_search_with_lora<P: Into<Prompt>>(
        &self,
        prompts: impl IntoIterator<Item = P>,
        params: &BeamSearchParams,
        lora: Option<&LoraRequest>,
    ) -> Result<Vec<BeamSearchOutput>> {
        let prompts: Vec<Prompt> = prompts.into_iter().map(Into::into).collect();
        let mut engine = self.engine()?;
        crate::beam::run(&mut engine, prompts, params, lora)
    }

    /// Generates completions for every prompt; returns one output per prompt, in input order.
    /// If any prompt or parameter is invalid, nothing runs and the error names it.
    pub fn generate<P: Into<Prompt>>(
        &self,
        prompts: impl IntoIterator<Item = P>,
        params: impl Into<ParamsList>,
    ) -> Result<Vec<RequestOutput>> {
        self.generate_with_lora(prompts, params, LoraList::None)
    }

    /// [`Self::generate`] with LoRA adapters (vLLM's `lora_request`): one for every prompt, or
    /// one (or none) per prompt; requests of different adapters and of the base model run
    /// together in the same steps.
    pub fn generate_with_lora<P: Into<Prompt>>(
        &self,
        prompts: impl IntoIterator<Item = P>,
        params: impl Into<ParamsList>,
        loras: impl Into<LoraList>,
    ) -> Result<Vec<RequestOutput>> {
        let prompts: Vec<Prompt> = prompts.into_iter().map(Into::into).collect();
        let loras = loras.into().per_prompt(prompts.len())?;
        let params = match params.into() {
            ParamsList::One(p) => vec![*p; prompts.len()],
            ParamsList::PerPrompt(v) if v.len() == prompts.len() => v,
            ParamsList::PerPrompt(v) => {
                return Err(Error::InvalidArgument {
                    param: "sampling_params",
                    message: format!("{} parameter sets for {} prompts", v.len(), prompts.len()),
                })
            }
        };
        let mut engine = self.engine()?;
        let base = {
            let mut c = self.counter.lock().unwrap_or_else(|p| p.into_inner());
            let b = *c;
            *c += prompts.len() as u64;
            b
        };
        let ids: Vec<String> = (0..prompts.len()).map(|i| format!("{}", base + i as u64)).collect();
        for (i, (prompt, p)) in prompts.into_iter().zip(params).enumerate() {
            // Only final outputs are returned: nothing cumulative is built per step.
            let p = SamplingParams { output_kind: vllm_sampler::RequestOutputKind::FinalOnly, ..p };
            if let Err(e) = engine.add_request_with_lora(ids[i].clone(), prompt, p, loras[i].as_ref()) {
                for id in &ids[..i] {
                    engine.abort_request(id);
                }
                return Err(e);
            }
        }
        let bar = if self.use_tqdm {
            ProgressBar::with_draw_target(Some(ids.len() as u64), ProgressDrawTarget::stderr())
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "Processed prompts: {percent:>3}%|{wide_bar}| {pos}/{len} [{elapsed_precise}<{eta_precise}, {per_sec}]",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let mut results: Vec<Option<RequestOutput>> = vec![None; ids.len()];
        let mut done = 0;
        while done < ids.len() {
            let outs = match engine.step() {
                Ok(o) => o,
                Err(e) => {
                    for id in &ids {
                        engine.abort_request(id);
                    }
                    return Err(e);
                }
            };
            if outs.is_empty() && !engine.has_unfinished_requests() {
                break;
            }
            for o in outs.into_iter().filter(|o| o.finished) {
                if let Some(i) = o.request_id.parse::<u64>().ok().and_then(|n| n.checked_sub(base)) {
                    if let Some(slot) = results.get_mut(i as usize) {
                        *slot = Some(o);
                        done += 1;
                        bar.inc(1);
                    }
                }
            }
        }
        bar.finish_and_clear();
        results.into_iter().map(|r| r.ok_or(Error::Internal("a request ended without output"))).collect()
    }
}
