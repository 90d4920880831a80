//! # vllm-scheduler
//!
//! The continuous-batching scheduler of vllm-rs. It works on token ids and block ids only:
//! each step, [`Scheduler::schedule`] returns a [`SchedulerOutput`] saying which sequences
//! compute how many tokens (chunked prefill and decode mixed freely within
//! `max_num_batched_tokens`), and [`Scheduler::update_from_output`] takes the sampled tokens
//! back, applies stop rules and frees finished sequences' blocks.
//!
//! ```
//! use vllm_scheduler::{Request, Scheduler, SchedulerConfig, StopConditions};
//!
//! let mut s = Scheduler::new(SchedulerConfig {
//!     max_num_seqs: 8, max_num_batched_tokens: 4, max_model_len: 64,
//!     block_size: 4, num_blocks: 8, enable_prefix_caching: true, long_prefill_token_threshold: 0,
//! });
//! let stop = StopConditions { max_tokens: 2, ..Default::default() };
//! s.add_request(Request::new(1, vec![5, 6, 7, 8, 9, 10], stop)).unwrap();
//! let step = s.schedule();                 // a 4-token prefill chunk
//! assert_eq!(step.num_batched_tokens, 4);
//! assert!(!step.seqs[0].sample);
//! s.update_from_output(&step, &[]);
//! let step = s.schedule();                 // the last 2 prompt tokens, then sample
//! assert!(step.seqs[0].sample);
//! ```

mod request;
mod scheduler;

pub use request::{FinishReason, Request, Status, StopConditions};
pub use scheduler::{ScheduledSeq, Scheduler, SchedulerConfig, SchedulerError, SchedulerOutput, SeqUpdate};
pub use vllm_block::{BlockCopy, KvMemoryUsage};
