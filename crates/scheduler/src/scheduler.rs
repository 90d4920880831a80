//! Continuous batching with chunked prefill and preemption by recompute.
//!
//! Every request advances `num_computed_tokens` toward `token_ids.len()` within a per-step
//! token budget. Running requests are served first (oldest first); when the cache runs out of
//! blocks the newest running request is preempted (its blocks freed, its progress reset) and
//! re-queued at the head of the waiting queue. Waiting requests join while budget, slots and
//! blocks last, reusing their longest cached prefix.
//!
//! Parallel samples ride on their first sequence ([`Request::forks`]) until its prompt is
//! computed; then they fork from it, sharing its blocks by reference count, and take their
//! first token from the same logits. A shared partial block is copied when first appended to
//! ([`SchedulerOutput::block_copies`]).

use std::collections::VecDeque;

use foldhash::{HashMap, HashMapExt};

use vllm_block::{BlockCopy, BlockId, CacheHit, KvCacheManager, NoFreeBlocks, SeqId};

use crate::request::{FinishReason, Request, Status};

/// Scheduler limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Most sequences in one step.
    pub max_num_seqs: usize,
    /// Most tokens computed in one step (the chunked-prefill budget).
    pub max_num_batched_tokens: usize,
    /// Longest sequence (prompt + output) the model accepts.
    pub max_model_len: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Blocks in the KV cache.
    pub num_blocks: usize,
    /// Reuse cached prompt prefixes.
    pub enable_prefix_caching: bool,
    /// A prompt chunk is at most this many tokens per step (fewer past 2,048 tokens of
    /// context, where attention makes each token dearer), so a long prompt delays other
    /// requests by one short step at a time (0: no limit).
    pub long_prefill_token_threshold: usize,
}

/// Why a request cannot be added.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SchedulerError {
    /// The sequence id is already known.
    #[error("sequence {0} is already scheduled")]
    DuplicateId(SeqId),
    /// The prompt is empty.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// Prompt plus `max_tokens` exceeds the model's context length.
    #[error(
        "prompt ({prompt} tokens) plus max_tokens ({max_tokens}) exceeds the maximum model length of {max_model_len} tokens"
    )]
    TooLong {
        /// Prompt tokens.
        prompt: usize,
        /// Requested output tokens.
        max_tokens: usize,
        /// The limit.
        max_model_len: usize,
    },
    /// The request could never fit into the whole KV cache.
    #[error("the request needs {needed} tokens of KV cache but the whole cache holds {capacity}")]
    ExceedsCache {
        /// Tokens needed (prompt + max_tokens).
        needed: usize,
        /// Tokens the cache holds.
        capacity: usize,
    },
    /// More parallel samples than sequences per step.
    #[error("{sequences} parallel sequences exceed max_num_seqs ({max_num_seqs})")]
    TooManySequences {
        /// Sequences the request asks for.
        sequences: usize,
        /// The limit.
        max_num_seqs: usize,
    },
}

/// One request's share of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledSeq {
    /// The sequence.
    pub id: SeqId,
    /// Token ids to feed this step.
    pub token_ids: Vec<u32>,
    /// Position of the first of them (= tokens already in the cache).
    pub start_pos: usize,
    /// The full block table.
    pub block_ids: Vec<BlockId>,
    /// Whether this step completes the sequence's known tokens, so it produces logits and a
    /// new token is sampled.
    pub sample: bool,
    /// Parallel samples forking from this sequence this step: each also samples a token from
    /// this sequence's logits (empty for most steps).
    pub forks: Vec<SeqId>,
    /// Logits are needed for every token of this step (a prompt chunk of a request with
    /// prompt log probabilities), not only the last.
    pub all_logits: bool,
    /// The LoRA adapter the sequence runs with, if any.
    pub lora: Option<u32>,
    /// The last `num_draft` of `token_ids` are proposed tokens (speculative decoding): the step
    /// computes logits for every token of the sequence, and [`Scheduler::update_from_drafts`]
    /// learns how many of them were accepted.
    pub num_draft: usize,
}

/// What to compute in one step: plain data for the model runner.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchedulerOutput {
    /// Scheduled sequences, in batch order.
    pub seqs: Vec<ScheduledSeq>,
    /// Total tokens this step.
    pub num_batched_tokens: usize,
    /// Sequences preempted this step (they lost their cache and will recompute).
    pub preempted: Vec<SeqId>,
    /// Blocks to copy before the step runs (copy-on-write of shared partial blocks).
    pub block_copies: Vec<BlockCopy>,
}

impl SchedulerOutput {
    /// Whether there is nothing to run.
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Sequences that get a token this step, in the order [`Scheduler::update_from_output`]
    /// expects their tokens: each sampling sequence, followed by its forks.
    pub fn sampling_ids(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.seqs.iter().filter(|s| s.sample).flat_map(|s| std::iter::once(s.id).chain(s.forks.iter().copied()))
    }
}

/// A sequence's news after a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqUpdate {
    /// The sequence.
    pub id: SeqId,
    /// The token sampled this step.
    pub new_token: u32,
    /// Set when the sequence finished (its blocks are already freed).
    pub finished: Option<FinishReason>,
}

/// The continuous-batching scheduler.
#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    kv: KvCacheManager,
    requests: HashMap<SeqId, Request>,
    waiting: VecDeque<SeqId>,
    /// Running sequences, oldest first.
    running: Vec<SeqId>,
    /// Each not-yet-forked parallel sample and the sequence it will fork from.
    fork_parent: HashMap<SeqId, SeqId>,
    /// Running slots promised to the pending forks of running sequences.
    reserved: usize,
    num_preemptions: u64,
    /// Tokens scheduled so far, and how many of them were prompt tokens.
    computed: (u64, u64),
    /// A step suspended mid-way ([`Self::hold`]), while other steps run.
    held: Option<Held>,
    /// Most distinct LoRA adapters in one step (`--max-loras`); 0: no limit.
    max_loras: usize,
    /// Copies made by [`Self::reserve_slots`] since the last step: the next step's output
    /// carries them.
    pending_copies: Vec<BlockCopy>,
}

/// The sequences of a suspended step and what they keep until it completes.
#[derive(Debug, Default)]
struct Held {
    /// Its sequences (out of `running` meanwhile).
    seqs: Vec<SeqId>,
    /// `running` when it was suspended (its order is restored).
    order: Vec<SeqId>,
    /// Blocks the step is writing: not yet valid for a prefix-cache hit.
    writing: foldhash::HashSet<BlockId>,
    /// Its sequences aborted meanwhile: their blocks are freed once it completes.
    freed: Vec<SeqId>,
}

impl Scheduler {
    /// A scheduler with an empty cache.
    pub fn new(config: SchedulerConfig) -> Self {
        let kv = KvCacheManager::new(config.num_blocks, config.block_size, config.enable_prefix_caching);
        Self {
            config,
            kv,
            requests: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            fork_parent: HashMap::new(),
            reserved: 0,
            num_preemptions: 0,
            computed: (0, 0),
            held: None,
            max_loras: 0,
            pending_copies: Vec::new(),
        }
    }

    /// At most `n` distinct LoRA adapters run in one step (vLLM's `max_loras`): a waiting
    /// request of another adapter waits, keeping its place, while requests after it that fit
    /// are admitted.
    pub fn with_max_loras(mut self, n: usize) -> Self {
        self.max_loras = n;
        self
    }

    /// The adapters of the running and held sequences, and of the waiting ones.
    pub fn lora_sets(&self) -> (std::collections::BTreeSet<u32>, std::collections::BTreeSet<u32>) {
        let held = self.held.iter().flat_map(|h| h.seqs.iter());
        let running = self.running.iter().chain(held).filter_map(|id| self.requests.get(id)?.lora).collect();
        let waiting = self.waiting.iter().filter_map(|id| self.requests.get(id)?.lora).collect();
        (running, waiting)
    }

    /// Suspends a scheduled step: until [`Self::release`], its sequences are left out of the
    /// steps planned meanwhile (never scheduled, preempted or counted as free slots), their
    /// blocks stay allocated even if they are aborted, and the blocks it writes give no
    /// prefix-cache hits. One step at a time.
    pub fn hold(&mut self, out: &SchedulerOutput) {
        debug_assert!(self.held.is_none(), "one held step at a time");
        let bs = self.config.block_size;
        let mut held = Held { order: self.running.clone(), ..Held::default() };
        for s in &out.seqs {
            held.seqs.push(s.id);
            let end = s.start_pos + s.token_ids.len();
            if end > s.start_pos {
                held.writing.extend(s.block_ids.iter().take(end.div_ceil(bs)).skip(s.start_pos / bs).copied());
            }
        }
        self.running.retain(|id| !held.seqs.contains(id));
        self.held = Some(held);
    }

    /// Resumes the held step's sequences (before its [`Self::update_from_output`]): they go
    /// back to their places in `running`, and the blocks of those aborted meanwhile are freed.
    pub fn release(&mut self) {
        let Some(held) = self.held.take() else { return };
        let now: foldhash::HashSet<SeqId> = self.running.iter().copied().collect();
        let before: foldhash::HashSet<SeqId> = held.order.iter().copied().collect();
        let mut running: Vec<SeqId> = held
            .order
            .iter()
            .copied()
            .filter(|id| {
                now.contains(id)
                    || (held.seqs.contains(id) && self.requests.get(id).is_some_and(|r| r.status == Status::Running))
            })
            .collect();
        running.extend(self.running.iter().copied().filter(|id| !before.contains(id)));
        self.running = running;
        for id in held.freed {
            self.kv.free(id);
        }
    }

    /// The configuration.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// The KV-cache manager (read-only: usage, stats, invariants).
    pub fn kv_cache(&self) -> &KvCacheManager {
        &self.kv
    }

    /// Number of queued requests.
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Number of running requests.
    pub fn num_running(&self) -> usize {
        self.running.len() + self.held.as_ref().map_or(0, |h| h.seqs.len())
    }

    /// Total preemptions so far.
    pub fn num_preemptions(&self) -> u64 {
        self.num_preemptions
    }

    /// Tokens run through the model so far: (all, prompt tokens only). Prompt tokens served
    /// from the prefix cache or shared with a parallel sample's parent are not counted; a
    /// preempted request's recomputed prompt is.
    pub fn num_computed_tokens(&self) -> (u64, u64) {
        self.computed
    }

    /// Whether any request is unfinished.
    pub fn has_unfinished(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty() || self.held.as_ref().is_some_and(|h| !h.seqs.is_empty())
    }

    /// A tracked request.
    pub fn request(&self, id: SeqId) -> Option<&Request> {
        self.requests.get(&id)
    }

    /// Queues a request (and its parallel samples), rejecting at once one that could never
    /// complete.
    pub fn add_request(&mut self, mut req: Request) -> Result<(), SchedulerError> {
        let known = |id: &SeqId| self.requests.contains_key(id) || self.fork_parent.contains_key(id);
        if known(&req.id) {
            return Err(SchedulerError::DuplicateId(req.id));
        }
        for (i, f) in req.forks.iter().enumerate() {
            if known(f) || *f == req.id || req.forks[..i].contains(f) {
                return Err(SchedulerError::DuplicateId(*f));
            }
        }
        let sequences = 1 + req.forks.len();
        if sequences > self.config.max_num_seqs {
            return Err(SchedulerError::TooManySequences { sequences, max_num_seqs: self.config.max_num_seqs });
        }
        if req.token_ids.is_empty() {
            return Err(SchedulerError::EmptyPrompt);
        }
        let prompt = req.token_ids.len();
        let max_tokens = req.stop.max_tokens;
        if prompt.checked_add(max_tokens).is_none_or(|total| total > self.config.max_model_len) {
            return Err(SchedulerError::TooLong { prompt, max_tokens, max_model_len: self.config.max_model_len });
        }
        let capacity = self.config.num_blocks * self.config.block_size;
        // The last sampled token is never fed back, so it needs no slot.
        let needed = prompt.saturating_add(max_tokens.saturating_sub(1));
        if needed > capacity {
            return Err(SchedulerError::ExceedsCache { needed, capacity });
        }
        req.status = Status::Waiting;
        for &f in &req.forks {
            self.fork_parent.insert(f, req.id);
        }
        self.waiting.push_back(req.id);
        self.requests.insert(req.id, req);
        Ok(())
    }

    /// Drops a sequence wherever it is and frees its blocks. A sequence whose parallel samples
    /// have not forked yet takes them along (they hold nothing of their own). Returns false if
    /// unknown.
    pub fn abort(&mut self, id: SeqId) -> bool {
        if let Some(parent) = self.fork_parent.remove(&id) {
            let p = self.requests.get_mut(&parent).expect("a pending fork's parent is tracked");
            p.forks.retain(|&f| f != id);
            if p.status == Status::Running {
                self.reserved -= 1;
            }
            return true;
        }
        let Some(r) = self.requests.remove(&id) else {
            return false;
        };
        for f in &r.forks {
            self.fork_parent.remove(f);
        }
        if r.status == Status::Running {
            self.reserved -= r.forks.len();
        }
        self.waiting.retain(|&w| w != id);
        self.running.retain(|&x| x != id);
        match self.held.as_mut() {
            // The suspended step still writes its blocks.
            Some(h) if h.seqs.contains(&id) => h.freed.push(id),
            _ => self.kv.free(id),
        }
        true
    }

    fn preempt(&mut self, id: SeqId) {
        self.kv.free(id);
        self.running.retain(|&r| r != id);
        if let Some(r) = self.requests.get_mut(&id) {
            r.num_computed_tokens = 0;
            r.draft.clear();
            r.status = Status::Waiting;
            r.num_preemptions += 1;
            self.reserved -= r.forks.len();
        }
        self.waiting.push_front(id);
        self.num_preemptions += 1;
    }

    /// `num_new` tokens of `id` from its first uncomputed one, then `num_draft` of its draft.
    fn scheduled(&mut self, id: SeqId, num_new: usize, num_draft: usize) -> ScheduledSeq {
        let r = &self.requests[&id];
        let start = r.num_computed_tokens;
        let sample = start + num_new == r.token_ids.len();
        let prompt = (start + num_new).min(r.num_prompt_tokens).saturating_sub(start);
        self.computed.0 += (num_new + num_draft) as u64;
        self.computed.1 += prompt as u64;
        let mut token_ids = r.token_ids[start..start + num_new].to_vec();
        token_ids.extend_from_slice(&r.draft[..num_draft]);
        ScheduledSeq {
            id,
            token_ids,
            start_pos: start,
            block_ids: self.kv.block_ids(id).to_vec(),
            sample,
            forks: if sample { r.forks.clone() } else { Vec::new() },
            all_logits: r.all_logits && start < r.num_prompt_tokens,
            lora: r.lora,
            num_draft,
        }
    }

    /// Proposes `draft` as the next tokens of running sequence `id` (speculative decoding):
    /// the next step verifies them with its last token, if the sequence is decoding (all but
    /// its last token computed), has no pending parallel samples, and the budget and blocks
    /// allow; otherwise (or in part) they are dropped. Returns whether it was taken.
    pub fn propose(&mut self, id: SeqId, mut draft: Vec<u32>) -> bool {
        let Some(r) = self.requests.get(&id) else { return false };
        let decoding = r.status == Status::Running && r.num_computed_tokens + 1 == r.token_ids.len();
        if !decoding || !r.forks.is_empty() {
            return false;
        }
        draft.truncate(self.draft_room(r));
        let Some(r) = self.requests.get_mut(&id) else { return false };
        r.draft = draft;
        !r.draft.is_empty()
    }

    /// Most draft tokens a request may take: every accepted draft token and the token after
    /// them must fit the output and the context (`max_tokens - outputs - 1` and
    /// `max_model_len - len - 1`).
    pub fn draft_room(&self, r: &Request) -> usize {
        r.stop
            .max_tokens
            .saturating_sub(r.num_output_tokens() + 1)
            .min(self.config.max_model_len.saturating_sub(r.token_ids.len() + 1))
    }

    /// Gives decoding sequence `id` K/V slots for its first `total_tokens` tokens now, ahead
    /// of the next step (a draft model writes its draft's K/V in the same blocks of its own
    /// cache). A copy-on-write of a shared partial block is returned, to be applied to the
    /// other caches now; the next step's [`SchedulerOutput::block_copies`] carries it too.
    /// Fails, changing nothing, for a sequence that is not decoding, or when taking the blocks
    /// would leave fewer free blocks than running sequences (each may need one for its next
    /// token). Slots the next step does not use are given back after it.
    pub fn reserve_slots(&mut self, id: SeqId, total_tokens: usize) -> Result<Option<BlockCopy>, NoFreeBlocks> {
        let r = self.requests.get(&id).ok_or(NoFreeBlocks)?;
        let computed = r.num_computed_tokens;
        if r.status != Status::Running || computed + 1 != r.token_ids.len() {
            return Err(NoFreeBlocks);
        }
        // Counting a possible copy-on-write block.
        let needed = self.kv.blocks_for(total_tokens).saturating_sub(self.kv.block_ids(id).len()) + 1;
        if self.kv.pool().num_free() < needed + self.running.len() {
            return Err(NoFreeBlocks);
        }
        let copy = self.kv.allocate_slots(id, computed, total_tokens, &CacheHit::default())?;
        self.pending_copies.extend(copy);
        Ok(copy)
    }

    /// Running sequences that may take a draft: decoding, with no pending parallel samples.
    pub fn draftable(&self) -> impl Iterator<Item = &Request> + '_ {
        self.running.iter().filter_map(|id| self.requests.get(id)).filter(|r| {
            r.status == Status::Running && r.num_computed_tokens + 1 == r.token_ids.len() && r.forks.is_empty()
        })
    }

    /// Registers the blocks this step fills in the prefix cache right away, so that a request
    /// admitted later in the same step with the same prefix (a parallel sample, a shared system
    /// prompt) reuses them instead of computing them again. Safe because every layer writes the
    /// whole batch's K/V before any attention reads it, and a failed step fails every request.
    fn cache_scheduled_blocks(&mut self, id: SeqId, num_tokens: usize) {
        let r = &self.requests[&id];
        self.kv.cache_full_blocks(id, &r.token_ids, num_tokens, &r.cache_extra);
    }

    /// Plans the next step.
    pub fn schedule(&mut self) -> SchedulerOutput {
        let mut out = SchedulerOutput { block_copies: std::mem::take(&mut self.pending_copies), ..Default::default() };
        let mut budget = self.config.max_num_batched_tokens;
        // Prompt chunks stay short, so that a request arriving during a long prefill waits at
        // most one short step for its own turn.
        // Attention makes a chunk's cost grow with the context before it, so past 2,048 tokens
        // of context the chunk shrinks to keep (chunk x context) at the threshold's cost at
        // 2,048, down to a floor of 32 tokens; while other requests share the steps, to a
        // quarter of that (floor 16), so that their tokens wait for short steps only.
        let threshold = self.config.long_prefill_token_threshold;
        let shared = self.running.len() + self.waiting.len() > 1;
        let chunk = |num_new: usize, computed: usize, prompt: usize| {
            if threshold == 0 || computed >= prompt {
                return num_new;
            }
            if computed + threshold <= 2048 {
                return num_new.min(threshold);
            }
            let (work, floor) = if shared { (threshold * 2048 / 4, 16) } else { (threshold * 2048, 32) };
            num_new.min(threshold.min((work / (computed + threshold)).max(floor)))
        };

        // 1. Running requests, oldest first; preempt the newest when blocks run out.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let (computed, total, prompt) = {
                let r = &self.requests[&id];
                (r.num_computed_tokens, r.token_ids.len(), r.num_prompt_tokens)
            };
            let num_new = chunk((total - computed).min(budget), computed, prompt);
            if num_new == 0 {
                i += 1;
                continue;
            }
            // A draft rides along with the last token, within the budget; without blocks for
            // it, it is dropped before anyone is preempted.
            let mut num_draft =
                if computed + num_new == total { self.requests[&id].draft.len().min(budget - num_new) } else { 0 };
            let copy = loop {
                match self.kv.allocate_slots(id, computed, computed + num_new + num_draft, &CacheHit::default()) {
                    Ok(copy) => break Some(copy),
                    Err(NoFreeBlocks) if num_draft > 0 => num_draft = 0,
                    Err(NoFreeBlocks) => {
                        let victim = *self.running.last().expect("running is not empty");
                        out.preempted.push(victim);
                        self.preempt(victim);
                        if victim == id {
                            break None;
                        }
                    }
                }
            };
            let Some(copy) = copy else { break };
            out.block_copies.extend(copy);
            self.cache_scheduled_blocks(id, computed + num_new);
            out.seqs.push(self.scheduled(id, num_new, num_draft));
            self.requests.get_mut(&id).expect("running is tracked").draft.clear();
            budget -= num_new + num_draft;
            i += 1;
        }

        // 2. Waiting requests, unless this step had to preempt. With a LoRA limit, a request
        // whose adapter would be one too many keeps its place and later ones may go first.
        let mut adapters: std::collections::BTreeSet<u32> =
            if self.max_loras > 0 { self.lora_sets().0 } else { Default::default() };
        if out.preempted.is_empty() {
            let mut idx = 0;
            while budget > 0 {
                let Some(&id) = self.waiting.get(idx) else {
                    break;
                };
                let r = &self.requests[&id];
                if let Some(l) = r.lora.filter(|_| self.max_loras > 0) {
                    if !adapters.contains(&l) && adapters.len() >= self.max_loras {
                        idx += 1;
                        continue;
                    }
                }
                // A request joins with room for all its parallel samples.
                let held = self.held.as_ref().map_or(0, |h| h.seqs.len());
                if self.running.len() + held + self.reserved + 1 + r.forks.len() > self.config.max_num_seqs {
                    break;
                }
                let total = r.token_ids.len();
                let mut hit = if r.all_logits {
                    CacheHit::default()
                } else {
                    self.kv.find_cached_prefix(&r.token_ids, &r.cache_extra)
                };
                if let Some(h) = &self.held {
                    // Blocks a suspended step is still writing are not a valid prefix yet.
                    if let Some(cut) = hit.blocks.iter().position(|b| h.writing.contains(b)) {
                        hit.blocks.truncate(cut);
                        hit.num_tokens = cut * self.config.block_size;
                    }
                }
                let computed = hit.num_tokens;
                let num_new = chunk((total - computed).min(budget), computed, r.num_prompt_tokens);
                // A new sequence shares no partial block, so nothing is copied.
                if self.kv.allocate_slots(id, computed, computed + num_new, &hit).is_err() {
                    break;
                }
                self.waiting.remove(idx);
                self.kv.record_prefix_lookup(total, computed);
                let r = self.requests.get_mut(&id).expect("waiting request is tracked");
                r.num_computed_tokens = computed;
                if r.num_preemptions == 0 {
                    r.num_cached_tokens = computed;
                }
                r.status = Status::Running;
                adapters.extend(r.lora);
                self.reserved += r.forks.len();
                self.running.push(id);
                self.cache_scheduled_blocks(id, computed + num_new);
                out.seqs.push(self.scheduled(id, num_new, 0));
                budget -= num_new;
            }
        }
        // Drafts are for one step: those of sequences left out of it are dropped.
        for id in &self.running {
            if let Some(r) = self.requests.get_mut(id) {
                r.draft.clear();
            }
        }
        out.num_batched_tokens = self.config.max_num_batched_tokens - budget;
        out
    }

    /// Appends a sampled token; a sequence that finishes is dropped and its blocks freed (the
    /// caller removes it from `running`).
    fn append_token(&mut self, id: SeqId, token: u32) -> Option<FinishReason> {
        let r = self.requests.get_mut(&id).expect("sequence is tracked");
        r.token_ids.push(token);
        let finished = r.check_stop(self.config.max_model_len)?;
        self.kv.free(id);
        self.requests.remove(&id);
        Some(finished)
    }

    /// Applies a step's results: advances progress, appends sampled tokens, checks stop rules
    /// and frees finished sequences. `sampled` holds one token per sequence of
    /// [`SchedulerOutput::sampling_ids`], in that order (a sampling sequence, then its forks).
    pub fn update_from_output(&mut self, out: &SchedulerOutput, sampled: &[u32]) -> Vec<SeqUpdate> {
        self.update_from_drafts(out, sampled, &[])
    }

    /// [`Self::update_from_output`] for a step that verified drafts: `accepted[i]` is how many
    /// of `out.seqs[i]`'s draft tokens were accepted (missing entries: none), which land before
    /// its sampled token (each checked against the stop rules, so a stop among them ends the
    /// sequence there). The K/V slots of rejected draft tokens are given up: their blocks
    /// beyond the accepted tokens are freed.
    pub fn update_from_drafts(&mut self, out: &SchedulerOutput, sampled: &[u32], accepted: &[usize]) -> Vec<SeqUpdate> {
        let mut updates = Vec::with_capacity(sampled.len());
        let mut finished_ids = Vec::new();
        let mut tokens = sampled.iter().copied();
        for (i, s) in out.seqs.iter().enumerate() {
            let accepted = accepted.get(i).copied().unwrap_or(0).min(s.num_draft);
            let mut next = |sample: bool| if sample { tokens.next() } else { None };
            let token = next(s.sample);
            let fork_tokens: Vec<Option<u32>> = s.forks.iter().map(|_| next(s.sample)).collect();
            let Some(r) = self.requests.get_mut(&s.id) else {
                continue;
            };
            if r.status != Status::Running {
                continue; // preempted or aborted after scheduling
            }
            // The blocks this step filled were registered in the prefix cache when scheduled.
            // Slots past the computed tokens (rejected drafts', or reserved and unused) go back.
            r.num_computed_tokens = s.start_pos + s.token_ids.len() - (s.num_draft - accepted);
            self.kv.trim(s.id, r.num_computed_tokens);
            let Some(token) = token else { continue };
            // Parallel samples fork before their parent's token lands (and before the parent
            // may finish and free the blocks they share).
            let forks: Vec<(SeqId, u32)> = s
                .forks
                .iter()
                .zip(fork_tokens)
                .filter(|(f, _)| r.forks.contains(f))
                .filter_map(|(&f, t)| Some((f, t?)))
                .collect();
            r.forks.clear();
            if !forks.is_empty() {
                let template = r.clone();
                for &(f, _) in &forks {
                    self.fork_parent.remove(&f);
                    self.reserved -= 1;
                    self.kv.fork(s.id, f);
                    self.requests.insert(f, Request { id: f, num_preemptions: 0, ..template.clone() });
                    self.running.push(f);
                }
            }
            let drafted = &s.token_ids[s.token_ids.len() - s.num_draft..][..accepted];
            for &t in drafted {
                let finished = self.append_token(s.id, t);
                updates.push(SeqUpdate { id: s.id, new_token: t, finished });
                if finished.is_some() {
                    finished_ids.push(s.id);
                    break;
                }
            }
            if finished_ids.last() == Some(&s.id) {
                continue; // it stopped on a draft token: its sampled token is dropped
            }
            for (id, token) in std::iter::once((s.id, token)).chain(forks) {
                let finished = self.append_token(id, token);
                if finished.is_some() {
                    finished_ids.push(id);
                }
                updates.push(SeqUpdate { id, new_token: token, finished });
            }
        }
        if !finished_ids.is_empty() {
            finished_ids.sort_unstable();
            self.running.retain(|x| finished_ids.binary_search(x).is_err());
        }
        updates
    }
}
