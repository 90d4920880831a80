//! # vllm-sampler
//!
//! Turning logits into tokens for vllm-rs: [`SamplingParams`] with vLLM's names, defaults and
//! validation, and a batched sampler ([`sample_batch`]) where each sequence keeps its own
//! seeded generator ([`SeqSampler`]): greedy, temperature, top-k, top-p and min-p.
//!
//! ```
//! use vllm_sampler::{sample_batch, SamplingParams, SeqSampler};
//!
//! let mut greedy = SeqSampler::new(SamplingParams::greedy(8), 0);
//! let mut seeded = SeqSampler::new(SamplingParams { seed: Some(1), top_p: 0.9, ..Default::default() }, 0);
//! let mut logits = vec![0.0, 4.0, 1.0, /* row 2 */ 0.5, 0.1, 0.2];
//! let tokens = sample_batch(&mut logits, 3, &mut [&mut greedy, &mut seeded]);
//! assert_eq!(tokens[0].token, 1);
//! ```

mod compile;
mod guided;
mod params;
mod sampler;

pub use compile::{parse_bytes, GuideCompiler, GuideError, GuideLimits};
pub use guided::{CompiledGuide, Constraint, Guide, GuideBackend, GuideBackendKind, GuideState, GuidedDecodingParams};
pub use params::{InvalidParam, RequestOutputKind, SamplingParams, MAX_LOGPROBS, SAMPLING_EPS};
pub use sampler::{
    argmax, log_sum_exp, sample_batch, sample_batch_on_device, top_k_indices, Sample, SeqSampler, TokenLogprobs,
};
