//! The scheduler's view of a request: token ids and progress, no text, no tensors.

use vllm_block::SeqId;

/// When a sequence stops, as plain data (the engine derives it from the sampling params).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StopConditions {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Stop tokens (EOS, `stop_token_ids`) are ignored before this many outputs.
    pub min_tokens: usize,
    /// End-of-sequence token ids of the model (several for some chat models).
    pub eos_token_ids: Vec<u32>,
    /// Extra token ids that end the sequence.
    pub stop_token_ids: Vec<u32>,
    /// Keep going past EOS (stop token ids still apply).
    pub ignore_eos: bool,
}

/// Why a sequence finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An EOS or stop token was generated (its id).
    Stop(u32),
    /// `max_tokens` or the model's context length was reached.
    Length,
    /// The engine stopped it (a stop string, or `abort`).
    Abort,
}

/// Where a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Queued, holding no blocks.
    Waiting,
    /// In the running batch.
    Running,
    /// Done.
    Finished(FinishReason),
}

/// A request as the scheduler tracks it.
#[derive(Debug, Clone)]
pub struct Request {
    /// Engine-assigned sequence id.
    pub id: SeqId,
    /// Prompt tokens followed by the generated ones.
    pub token_ids: Vec<u32>,
    /// Length of the prompt inside `token_ids`.
    pub num_prompt_tokens: usize,
    /// Tokens whose K/V are in the cache.
    pub num_computed_tokens: usize,
    /// Prompt tokens served from the prefix cache at first schedule.
    pub num_cached_tokens: usize,
    /// Stop rules.
    pub stop: StopConditions,
    /// Extra prefix-cache keys (cache salt, LoRA id).
    pub cache_extra: Vec<u64>,
    /// Current state.
    pub status: Status,
    /// How many times it was preempted.
    pub num_preemptions: u32,
    /// Parallel samples that branch off this request once its prompt is computed: they share
    /// its prompt blocks (copy-on-write) and take their first token from the same logits.
    /// Emptied when they fork.
    pub forks: Vec<SeqId>,
    /// Logits are needed at every prompt position (prompt log probabilities): the prompt is
    /// always computed, never served from the prefix cache.
    pub all_logits: bool,
    /// The LoRA adapter the request runs with (its id), if any.
    pub lora: Option<u32>,
    /// Proposed next tokens (speculative decoding) that the next step verifies along with the
    /// last token; set by [`crate::Scheduler::propose`], consumed by the next schedule.
    pub draft: Vec<u32>,
}

impl Request {
    /// A new waiting request.
    pub fn new(id: SeqId, prompt: Vec<u32>, stop: StopConditions) -> Self {
        Self {
            id,
            num_prompt_tokens: prompt.len(),
            token_ids: prompt,
            num_computed_tokens: 0,
            num_cached_tokens: 0,
            stop,
            cache_extra: Vec::new(),
            status: Status::Waiting,
            num_preemptions: 0,
            forks: Vec::new(),
            all_logits: false,
            lora: None,
            draft: Vec::new(),
        }
    }

    /// Sets the LoRA adapter the request runs with.
    pub fn with_lora(mut self, lora: Option<u32>) -> Self {
        self.lora = lora;
        self
    }

    /// Adds parallel samples (`n` / `best_of` > 1) that fork from this request after its
    /// prompt, with the ids given.
    pub fn with_forks(mut self, ids: Vec<SeqId>) -> Self {
        self.forks = ids;
        self
    }

    /// Sets the extra prefix-cache keys (a cache salt, a LoRA id).
    pub fn with_cache_extra(mut self, extra: Vec<u64>) -> Self {
        self.cache_extra = extra;
        self
    }

    /// Generated tokens so far.
    pub fn output_ids(&self) -> &[u32] {
        &self.token_ids[self.num_prompt_tokens..]
    }

    /// Number of generated tokens.
    pub fn num_output_tokens(&self) -> usize {
        self.token_ids.len() - self.num_prompt_tokens
    }

    /// Checks the stop rules after a token was appended.
    pub(crate) fn check_stop(&self, max_model_len: usize) -> Option<FinishReason> {
        let n_out = self.num_output_tokens();
        let last = *self.token_ids.last()?;
        if n_out >= self.stop.min_tokens
            && ((!self.stop.ignore_eos && self.stop.eos_token_ids.contains(&last))
                || self.stop.stop_token_ids.contains(&last))
        {
            return Some(FinishReason::Stop(last));
        }
        if n_out >= self.stop.max_tokens || self.token_ids.len() >= max_model_len {
            return Some(FinishReason::Length);
        }
        None
    }
}
