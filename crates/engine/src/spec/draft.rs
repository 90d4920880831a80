//! The `draft_model` proposer: a smaller model with the target's vocabulary drafts `k`
//! tokens greedily for each decoding sequence.
//!
//! The draft runs over its own paged KV cache laid out like the target's (same number of
//! blocks, same block size), so a sequence's block table from the scheduler serves both:
//! before drafting, [`Scheduler::reserve_slots`] gives the sequence the slots its draft will
//! write, and every copy-on-write of a block is applied to both caches. The draft's cache is
//! filled lazily: at each proposal a sequence first feeds the tokens its draft cache lacks
//! (the prompt too, the first time), batched with the other sequences' and bounded by the
//! step budget, whose last row gives the first draft token; then `k - 1` one-token steps,
//! batched across sequences, give the rest.
//!
//! What the draft cache holds is tracked per sequence: the positions written, valid up to the
//! target's own computed tokens (the slots of rejected drafts are given back and rewritten),
//! and forgotten when the sequence is preempted (its blocks are gone).

use std::collections::HashMap;

use candle_core::{DType, D};
use vllm_block::{BlockCopy, SeqId};
use vllm_models::CausalLM;
use vllm_scheduler::{ScheduledSeq, Scheduler, SchedulerOutput};

use crate::config::EngineConfig;
use crate::runner::ModelRunner;
use crate::spec::SpecMethod;
use crate::{Error, Result};

fn invalid(message: impl Into<String>) -> Error {
    Error::InvalidArgument { param: "speculative_config", message: message.into() }
}

/// A loaded draft model, before its cache is allocated.
pub(crate) struct LoadedDraft {
    pub model: Box<dyn CausalLM>,
    /// What its KV cache holds.
    pub kv_dtype: DType,
    /// Its context length.
    max_len: usize,
    device: candle_core::Device,
}

/// Loads the draft model of a `draft_model` configuration (`None` for other methods): the
/// target's arguments (device, dtype, KV cache dtype) applied to the draft's checkpoint. A
/// draft that cannot draft for the target (another vocabulary, an encoder) is refused.
pub(crate) fn load(config: &EngineConfig, target: &dyn CausalLM) -> Result<Option<LoadedDraft>> {
    let Some(spec) = config.speculative.as_ref().filter(|s| s.method == SpecMethod::DraftModel) else {
        return Ok(None);
    };
    let name = spec.model.as_deref().ok_or_else(|| invalid("method draft_model needs 'model'"))?;
    let fail = |e: Error| invalid(format!("draft model '{name}': {e}"));
    let files = crate::source::resolve_with(name, &config.args.hub()).map_err(fail)?;
    let mut args = config.args.clone();
    args.model = name.to_string();
    args.tokenizer = None;
    args.max_model_len = None;
    args.speculative_config = None;
    args.enable_lora = false;
    // A quantization method names the target's checkpoint; int8 and none apply to both.
    if !matches!(args.quantization, crate::args::Quantization::Int8 | crate::args::Quantization::None) {
        args.quantization = crate::args::Quantization::Auto;
    }
    let draft = EngineConfig::resolve(&args, files).map_err(fail)?;
    if draft.info.kv.is_none() {
        return Err(invalid(format!(
            "draft model '{name}' is an encoder ({}): a draft must generate text",
            draft.info.architecture
        )));
    }
    let (model, _) = crate::engine::load_model(&draft.files, draft.load, &draft.device, None, false).map_err(fail)?;
    if model.vocab_size() != target.vocab_size() {
        return Err(invalid(format!(
            "draft model '{name}' has a vocabulary of {} tokens, the model {}: a draft must share the target's \
             vocabulary",
            model.vocab_size(),
            target.vocab_size()
        )));
    }
    crate::runner::warm_up(&*model, config.block_size, draft.kv_dtype, &draft.device).map_err(fail)?;
    tracing::info!(draft = name, architecture = %draft.info.architecture, "speculative decoding draft model");
    let max_len = draft.max_model_len.min(model.max_model_len());
    Ok(Some(LoadedDraft { model, kv_dtype: draft.kv_dtype, max_len, device: draft.device }))
}

impl LoadedDraft {
    /// The proposer, with a cache of `num_blocks` blocks (the target's count); each catch-up
    /// step feeds at most `max_tokens` tokens.
    pub(crate) fn into_proposer(self, num_blocks: usize, block_size: usize, max_tokens: usize) -> Result<DraftModel> {
        let runner = ModelRunner::new(self.model, num_blocks, block_size, self.kv_dtype, self.device)?;
        Ok(DraftModel {
            runner,
            max_len: self.max_len,
            max_tokens: max_tokens.max(1),
            seqs: HashMap::new(),
            applied: Vec::new(),
        })
    }
}

/// What a sequence's draft cache holds.
#[derive(Debug, Clone, Copy)]
struct DraftSeq {
    /// Positions written (valid up to the target's computed tokens).
    computed: usize,
    /// The sequence's preemptions when they were written.
    preemptions: u32,
}

/// The draft model and its cache.
pub(crate) struct DraftModel {
    runner: ModelRunner,
    /// Longest context the draft takes.
    max_len: usize,
    /// Most tokens one catch-up step feeds.
    max_tokens: usize,
    seqs: HashMap<SeqId, DraftSeq>,
    /// Copies applied at proposal time, which the next step's output carries again.
    applied: Vec<BlockCopy>,
}

/// One sequence's share of a proposal.
struct Plan {
    id: SeqId,
    /// Its tokens.
    len: usize,
    /// Draft tokens to propose (0: it only catches up this time).
    k: usize,
    block_ids: Vec<u32>,
    draft: Vec<u32>,
}

impl DraftModel {
    /// Drafts for each `(sequence, k)` of `wants` (decoding sequences, `k` within their room):
    /// up to `k` tokens, greedily. A sequence whose slots cannot be reserved gets none.
    pub(crate) fn propose(
        &mut self,
        scheduler: &mut Scheduler,
        wants: &[(SeqId, usize)],
    ) -> Result<Vec<(SeqId, Vec<u32>)>> {
        let mut budget = self.max_tokens;
        let mut plans = Vec::new();
        let mut catch_up = SchedulerOutput::default();
        for &(id, k) in wants {
            let Some(r) = scheduler.request(id) else { continue };
            let len = r.token_ids.len();
            // Draft positions reach len + k - 2: within the draft's context.
            let k = k.min((self.max_len + 1).saturating_sub(len));
            if k == 0 || budget == 0 {
                continue;
            }
            let state = self.seqs.entry(id).or_insert(DraftSeq { computed: 0, preemptions: r.num_preemptions });
            if state.preemptions != r.num_preemptions {
                *state = DraftSeq { computed: 0, preemptions: r.num_preemptions };
            }
            let from = state.computed.min(r.num_computed_tokens);
            let tokens = r.token_ids[from..len].to_vec();
            if tokens.len() > budget {
                // A chunk of what is missing (slots the target already holds); drafts later.
                let token_ids = tokens[..budget].to_vec();
                state.computed = from + budget;
                let block_ids = scheduler.kv_cache().block_ids(id).to_vec();
                catch_up.seqs.push(step_seq(id, token_ids, from, block_ids, false));
                budget = 0;
                continue;
            }
            // Slots for the last token and the k - 1 drafts fed back.
            match scheduler.reserve_slots(id, len + k - 1) {
                Ok(copy) => {
                    if let Some(c) = copy {
                        self.runner.copy_blocks(&[c])?;
                        self.applied.push(c);
                    }
                }
                Err(_) => continue,
            }
            budget -= tokens.len();
            let block_ids = scheduler.kv_cache().block_ids(id).to_vec();
            catch_up.seqs.push(step_seq(id, tokens, from, block_ids.clone(), true));
            plans.push(Plan { id, len, k, block_ids, draft: Vec::with_capacity(k) });
        }
        if catch_up.seqs.is_empty() {
            return Ok(Vec::new());
        }
        let firsts = self.greedy(&catch_up)?;
        for (plan, t) in plans.iter_mut().zip(firsts) {
            plan.draft.push(t);
        }
        let longest = plans.iter().map(|p| p.k).max().unwrap_or(0);
        for j in 1..longest {
            let mut step = SchedulerOutput::default();
            let going: Vec<usize> = (0..plans.len()).filter(|&i| plans[i].k > j).collect();
            for &i in &going {
                let p = &plans[i];
                step.seqs.push(step_seq(p.id, vec![p.draft[j - 1]], p.len + j - 1, p.block_ids.clone(), true));
            }
            for (i, t) in going.into_iter().zip(self.greedy(&step)?) {
                plans[i].draft.push(t);
            }
        }
        for p in &plans {
            if let Some(s) = self.seqs.get_mut(&p.id) {
                s.computed = p.len + p.k - 1;
            }
        }
        Ok(plans.into_iter().map(|p| (p.id, p.draft)).collect())
    }

    /// Runs a step over the draft's cache: the greedy token of each sampling sequence, in order.
    fn greedy(&self, step: &SchedulerOutput) -> Result<Vec<u32>> {
        let (logits, ranges) = self.runner.execute(step, None)?;
        let best = logits.0.argmax(D::Minus1)?.to_vec1::<u32>()?;
        step.seqs
            .iter()
            .zip(&ranges)
            .filter(|(s, _)| s.sample)
            .map(|(_, r)| best.get(r.start).copied().ok_or(Error::Internal("a draft step without its logits row")))
            .collect()
    }

    /// Applies a scheduled step's copy-on-write copies to the draft's cache (those made at
    /// proposal time already were).
    pub(crate) fn after_schedule(&mut self, copies: &[BlockCopy]) -> Result<()> {
        let applied = std::mem::take(&mut self.applied);
        let todo: Vec<BlockCopy> = copies.iter().filter(|c| !applied.contains(c)).copied().collect();
        self.runner.copy_blocks(&todo)
    }

    /// After a step's update: what the draft cache holds is valid only up to what the target
    /// computed (the slots past it were given back, and the tokens there may differ).
    pub(crate) fn after_step(&mut self, scheduler: &Scheduler, out: &SchedulerOutput) {
        for s in &out.seqs {
            if let (Some(state), Some(r)) = (self.seqs.get_mut(&s.id), scheduler.request(s.id)) {
                state.computed = state.computed.min(r.num_computed_tokens);
            }
        }
    }

    /// A sequence ended: its draft state goes.
    pub(crate) fn finished(&mut self, seq: SeqId) {
        self.seqs.remove(&seq);
    }
}

/// A sequence's share of a draft step (its logits row when `sample`).
fn step_seq(id: SeqId, token_ids: Vec<u32>, start_pos: usize, block_ids: Vec<u32>, sample: bool) -> ScheduledSeq {
    ScheduledSeq {
        id,
        token_ids,
        start_pos,
        block_ids,
        sample,
        forks: Vec::new(),
        all_logits: false,
        lora: None,
        num_draft: 0,
    }
}
