//! Speculative decoding: a proposer guesses each decoding sequence's next tokens, the next
//! step feeds them after the sequence's last token (more query rows of the same paged
//! attention), and the sampler keeps the ones the model agrees with.
//!
//! Verification is exact for every sampling parameter: the core draws each position's token
//! from the target model's logits with the sequence's own sampler (processors, penalties,
//! guide, seeded generator), in order, and stops at the first position where the draw differs
//! from the draft. Every emitted token is thus drawn from exactly the distribution plain
//! decoding would use, with the same random numbers, so outputs (greedy or seeded) are the
//! same with and without speculation; a draft only decides how many positions one step gets to.
//! This is the accept rule for deterministic proposers (n-gram, suffix, a greedy draft model).
//!
//! The scheduler carries the drafts ([`vllm_scheduler::Scheduler::propose`]) and rolls back
//! the slots of rejected tokens ([`vllm_scheduler::Scheduler::update_from_drafts`]).

mod config;
pub(crate) mod draft;
mod ngram;
mod suffix;

pub use config::{SpecMethod, SpeculativeConfig, MAX_SPECULATIVE_TOKENS};
pub use suffix::SUFFIX_MAX_CACHED_TOKENS;

use std::collections::HashMap;

use vllm_block::SeqId;
use vllm_scheduler::{Scheduler, SchedulerOutput};

use crate::{Error, Result};

/// With no `disable_by_batch_size`, a step gets drafts only while its decode rows plus draft
/// tokens stay within this many rows: below it a CPU step is bound by reading the weights, so
/// extra rows come almost free; beyond it each row costs its share of compute (measured with
/// `cargo xtask bench spec`, docs/benchmarks.md).
pub const AUTO_ROW_BUDGET: usize = 16;

/// Proposes draft tokens for a sequence.
pub(crate) trait Proposer: Send {
    /// Up to `k` tokens proposed to follow `tokens` (prompt, then output) of sequence `seq`.
    fn propose(&mut self, seq: SeqId, tokens: &[u32], num_prompt: usize, k: usize) -> Vec<u32>;
    /// The sequence ended (proposers that learn from outputs keep it; others forget it).
    fn finished(&mut self, _seq: SeqId) {}
}

/// Speculative-decoding counters (vLLM's `vllm:spec_decode_*`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpecStats {
    /// Sequence-steps that verified a draft.
    pub num_drafts: u64,
    /// Draft tokens verified.
    pub num_draft_tokens: u64,
    /// Draft tokens accepted.
    pub num_accepted_tokens: u64,
    /// Draft tokens accepted at each position of the draft.
    pub accepted_per_pos: [u64; MAX_SPECULATIVE_TOKENS],
}

impl Default for SpecStats {
    fn default() -> Self {
        Self {
            num_drafts: 0,
            num_draft_tokens: 0,
            num_accepted_tokens: 0,
            accepted_per_pos: [0; MAX_SPECULATIVE_TOKENS],
        }
    }
}

impl SpecStats {
    /// Accepted draft tokens per draft token (0 before any draft).
    pub fn acceptance_rate(&self) -> f64 {
        if self.num_draft_tokens == 0 {
            0.0
        } else {
            self.num_accepted_tokens as f64 / self.num_draft_tokens as f64
        }
    }

    /// Tokens emitted per verifying sequence-step (accepted drafts plus the sampled token).
    pub fn mean_acceptance_length(&self) -> f64 {
        if self.num_drafts == 0 {
            0.0
        } else {
            1.0 + self.num_accepted_tokens as f64 / self.num_drafts as f64
        }
    }
}

/// Where drafts come from.
enum Drafter {
    /// A proposer that looks at each sequence's tokens (n-gram, suffix).
    Lookup(Box<dyn Proposer>),
    /// A draft model, run over all the drafting sequences at once.
    Model(Box<draft::DraftModel>),
}

/// The engine core's speculation: the configuration, its proposer and the counters.
pub(crate) struct Speculator {
    config: SpeculativeConfig,
    drafter: Drafter,
    pub stats: SpecStats,
    /// Sequences whose last draft was wholly rejected: steps left before they draft again,
    /// and the current wait (doubled by each wholly rejected draft, up to [`MAX_BACKOFF`]),
    /// so text the proposer cannot predict costs few verification rows.
    backoff: HashMap<SeqId, (u32, u32)>,
}

/// Longest wait, in steps, of a sequence whose drafts keep being rejected.
const MAX_BACKOFF: u32 = 8;

impl Speculator {
    /// The speculation of `config`; `draft` is the draft model of `draft_model`.
    pub(crate) fn new(config: SpeculativeConfig, draft: Option<draft::DraftModel>) -> Result<Self> {
        let drafter = match (config.method, draft) {
            (SpecMethod::Ngram, _) => Drafter::Lookup(Box::new(ngram::NgramProposer {
                min: config.prompt_lookup_min,
                max: config.prompt_lookup_max,
            })),
            (SpecMethod::Suffix, _) => Drafter::Lookup(Box::new(suffix::SuffixProposer::new(&config))),
            (SpecMethod::DraftModel, Some(d)) => Drafter::Model(Box::new(d)),
            (SpecMethod::DraftModel, None) => return Err(Error::Internal("draft_model without a loaded draft")),
        };
        Ok(Self { config, drafter, stats: SpecStats::default(), backoff: HashMap::new() })
    }

    /// Proposes drafts for the decoding sequences of the next step.
    pub(crate) fn propose(&mut self, scheduler: &mut Scheduler) -> Result<()> {
        let running = scheduler.num_running();
        let mut rows_left = match self.config.disable_by_batch_size {
            Some(b) if running >= b => return Ok(()),
            Some(_) => usize::MAX,
            None => AUTO_ROW_BUDGET.saturating_sub(running),
        };
        let k = self.config.num_speculative_tokens;
        let mut drafts = Vec::new();
        match &mut self.drafter {
            Drafter::Lookup(proposer) => {
                for r in scheduler.draftable() {
                    if rows_left == 0 {
                        break;
                    }
                    if waits(&mut self.backoff, r.id) {
                        continue;
                    }
                    let draft = proposer.propose(r.id, &r.token_ids, r.num_prompt_tokens, k.min(rows_left));
                    if !draft.is_empty() {
                        rows_left -= draft.len().min(rows_left);
                        drafts.push((r.id, draft));
                    }
                }
            }
            Drafter::Model(model) => {
                // Each draft token costs a draft step: only as many as the sequence may take.
                let mut wants = Vec::new();
                for r in scheduler.draftable() {
                    if waits(&mut self.backoff, r.id) {
                        continue;
                    }
                    let k = k.min(rows_left).min(scheduler.draft_room(r));
                    if k > 0 {
                        rows_left -= k;
                        wants.push((r.id, k));
                    }
                }
                drafts = model.propose(scheduler, &wants)?;
            }
        }
        for (id, draft) in drafts {
            scheduler.propose(id, draft);
        }
        Ok(())
    }

    /// The next step was scheduled: its block copies go to the draft model's cache too.
    pub(crate) fn scheduled(&mut self, out: &SchedulerOutput) -> Result<()> {
        match &mut self.drafter {
            Drafter::Model(model) => model.after_schedule(&out.block_copies),
            Drafter::Lookup(_) => Ok(()),
        }
    }

    /// A step's results were applied to the scheduler.
    pub(crate) fn updated(&mut self, scheduler: &Scheduler, out: &SchedulerOutput) {
        if let Drafter::Model(model) = &mut self.drafter {
            model.after_step(scheduler, out);
        }
    }

    /// A sequence ended.
    pub(crate) fn finished(&mut self, seq: SeqId) {
        self.backoff.remove(&seq);
        match &mut self.drafter {
            Drafter::Lookup(proposer) => proposer.finished(seq),
            Drafter::Model(model) => model.finished(seq),
        }
    }

    /// Counts one verified draft of `seq` of `drafted` tokens of which `accepted` were kept.
    pub(crate) fn record(&mut self, seq: SeqId, drafted: usize, accepted: usize) {
        if drafted == 0 {
            return;
        }
        if accepted == 0 {
            let (left, wait) = self.backoff.entry(seq).or_insert((0, 0));
            *wait = (*wait * 2).clamp(1, MAX_BACKOFF);
            *left = *wait;
        } else {
            self.backoff.remove(&seq);
        }
        self.stats.num_drafts += 1;
        self.stats.num_draft_tokens += drafted as u64;
        self.stats.num_accepted_tokens += accepted as u64;
        for c in self.stats.accepted_per_pos.iter_mut().take(accepted) {
            *c += 1;
        }
    }
}

/// Whether `seq` waits this step (and counts the step).
fn waits(backoff: &mut HashMap<SeqId, (u32, u32)>, seq: SeqId) -> bool {
    match backoff.get_mut(&seq) {
        Some((left, _)) if *left > 0 => {
            *left -= 1;
            true
        }
        _ => false,
    }
}
