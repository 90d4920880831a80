//! Scheduler behaviour: budgets, chunked prefill, preemption, and random streams that must
//! always end with every block free.

use proptest::prelude::*;
use vllm_scheduler::{
    FinishReason, Request, Scheduler, SchedulerConfig, SchedulerError, SchedulerOutput, StopConditions,
};

fn config(num_blocks: usize, budget: usize, max_seqs: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_num_seqs: max_seqs,
        max_num_batched_tokens: budget,
        max_model_len: 256,
        block_size: 4,
        num_blocks,
        enable_prefix_caching: true,
        long_prefill_token_threshold: 0,
    }
}

fn stop(max_tokens: usize) -> StopConditions {
    StopConditions { max_tokens, eos_token_ids: vec![0], ..Default::default() }
}

type Done = Vec<(u64, Vec<u32>, FinishReason)>;

/// A stand-in for the paged KV cache: the token each slot holds. Applying a step the way the
/// model runner does (block copies, then every scheduled token written to its slot) and then
/// reading back each sequence's context checks that no sequence ever attends over a slot
/// holding someone else's token: prefix-cache hits, shared blocks and copy-on-write included.
struct ShadowCache {
    slots: Vec<Option<u32>>,
    block_size: usize,
}

impl ShadowCache {
    fn new(s: &Scheduler) -> Self {
        let c = s.config();
        Self { slots: vec![None; c.num_blocks * c.block_size], block_size: c.block_size }
    }

    fn slot(&self, blocks: &[u32], pos: usize) -> usize {
        blocks[pos / self.block_size] as usize * self.block_size + pos % self.block_size
    }

    /// Runs `out` and checks every scheduled sequence's whole context against its tokens.
    fn apply(&mut self, s: &Scheduler, out: &SchedulerOutput) {
        self.copy(out);
        self.write(s, out);
    }

    /// The step's block copies (the model runner makes them before the first layer).
    fn copy(&mut self, out: &SchedulerOutput) {
        let bs = self.block_size;
        for c in &out.block_copies {
            let (src, dst) = (c.src as usize * bs, c.dst as usize * bs);
            self.slots.copy_within(src..src + bs, dst);
        }
    }

    /// The step's K/V writes, then every scheduled sequence's context checked (its draft
    /// tokens, not yet its own, sit after it).
    fn write(&mut self, s: &Scheduler, out: &SchedulerOutput) {
        for q in &out.seqs {
            for (i, &t) in q.token_ids.iter().enumerate() {
                let slot = self.slot(&q.block_ids, q.start_pos + i);
                self.slots[slot] = Some(t);
            }
        }
        for q in &out.seqs {
            // A held step's sequences may have been aborted while it was suspended.
            let Some(r) = s.request(q.id) else { continue };
            let tokens = &r.token_ids;
            assert_eq!(
                q.start_pos + q.token_ids.len() - q.num_draft,
                tokens.len().min(q.start_pos + q.token_ids.len())
            );
            let end = q.start_pos + q.token_ids.len() - q.num_draft;
            for (pos, &t) in tokens[..end].iter().enumerate() {
                let held = self.slots[self.slot(&q.block_ids, pos)];
                assert_eq!(held, Some(t), "sequence {} position {pos} reads a wrong K/V slot", q.id);
            }
        }
    }
}

/// Checks one step's plan against the limits.
fn check_limits(s: &Scheduler, out: &SchedulerOutput) {
    let c = s.config();
    assert!(out.num_batched_tokens <= c.max_num_batched_tokens, "token budget exceeded");
    assert_eq!(out.num_batched_tokens, out.seqs.iter().map(|q| q.token_ids.len()).sum::<usize>());
    assert!(out.seqs.len() <= c.max_num_seqs, "too many sequences in a step");
    assert!(s.num_running() <= c.max_num_seqs, "too many running sequences");
}

/// Runs the scheduler to completion with a fake model that samples `token_fn(id, n_out)`,
/// checking invariants and K/V contents every step. Returns (id, outputs, reason) in
/// completion order.
fn drive(s: &mut Scheduler, token_fn: impl Fn(u64, usize) -> u32) -> Done {
    let mut shadow = ShadowCache::new(s);
    drive_with(s, &mut shadow, token_fn)
}

/// [`drive`] continuing from steps already applied to `shadow`.
fn drive_with(s: &mut Scheduler, shadow: &mut ShadowCache, token_fn: impl Fn(u64, usize) -> u32) -> Done {
    let mut done = Vec::new();
    let mut outputs: std::collections::HashMap<u64, Vec<u32>> = Default::default();
    let mut steps = 0;
    while s.has_unfinished() {
        steps += 1;
        assert!(steps < 10_000, "scheduler made no progress");
        let out = s.schedule();
        check_limits(s, &out);
        assert!(!out.is_empty() || !out.preempted.is_empty(), "nothing scheduled with work left");
        shadow.apply(s, &out);
        let sampled: Vec<u32> =
            out.sampling_ids().map(|id| token_fn(id, outputs.get(&id).map_or(0, |o| o.len()))).collect();
        for u in s.update_from_output(&out, &sampled) {
            outputs.entry(u.id).or_default().push(u.new_token);
            if let Some(f) = u.finished {
                done.push((u.id, outputs.remove(&u.id).unwrap(), f));
            }
        }
        s.kv_cache().check_invariants();
    }
    done
}

#[test]
fn chunked_prefill_respects_budget_and_mixes_decode() {
    let mut s = Scheduler::new(config(64, 8, 4));
    s.add_request(Request::new(1, (1..=3).collect(), stop(4))).unwrap();
    let out = s.schedule();
    s.update_from_output(&out, &[7]);
    // A long prompt arrives while request 1 decodes: both share each step.
    s.add_request(Request::new(2, (1..=20).collect(), stop(2))).unwrap();
    let out = s.schedule();
    assert_eq!(out.seqs.len(), 2);
    assert_eq!(out.seqs[0].token_ids, vec![7], "decode of request 1 runs first");
    assert_eq!(out.seqs[1].token_ids.len(), 7, "prefill chunk gets the rest of the budget");
    assert!(!out.seqs[1].sample);
    assert_eq!(out.num_batched_tokens, 8);
}

#[test]
fn preemption_under_pressure_completes_everything_identically() {
    let token_fn = |id: u64, n: usize| 1 + ((id as usize * 7 + n * 3) % 50) as u32;
    let run = |blocks: usize| {
        let mut s = Scheduler::new(config(blocks, 16, 8));
        for id in 0..8u64 {
            let len = 5 + (id as usize * 3) % 11;
            s.add_request(Request::new(id, (1..=len as u32).collect(), stop(12))).unwrap();
        }
        let mut done = drive(&mut s, token_fn);
        done.sort_by_key(|d| d.0);
        (done, s.num_preemptions())
    };
    let (roomy, p0) = run(256);
    let (tight, p1) = run(8);
    assert_eq!(p0, 0);
    assert!(p1 > 0, "a tiny cache must force preemption");
    assert_eq!(roomy, tight, "preemption by recompute must not change outputs");
}

#[test]
fn impossible_requests_are_rejected_at_once() {
    let mut s = Scheduler::new(config(4, 16, 4));
    assert!(s.add_request(Request::new(1, vec![1; 10], stop(300))).is_err());
    assert!(s.add_request(Request::new(2, vec![1; 10], stop(20))).is_err(), "needs 29 slots of 16");
    assert!(s.add_request(Request::new(3, vec![], stop(2))).is_err());
    assert!(s.add_request(Request::new(4, vec![1; 10], stop(7))).is_ok());
}

#[test]
fn eos_stops_but_not_before_min_tokens() {
    let mut s = Scheduler::new(config(16, 16, 4));
    let mut st = stop(10);
    st.min_tokens = 2;
    s.add_request(Request::new(1, vec![1, 2], st)).unwrap();
    let done = drive(&mut s, |_, _| 0); // always EOS
    assert_eq!(done[0].1, vec![0, 0]);
    assert_eq!(done[0].2, FinishReason::Stop(0));
}

#[test]
fn prefix_cache_skips_shared_prompt_blocks() {
    let mut s = Scheduler::new(config(64, 64, 4));
    let prompt: Vec<u32> = (1..=17).collect();
    s.add_request(Request::new(1, prompt.clone(), stop(1))).unwrap();
    drive(&mut s, |_, _| 9);
    s.add_request(Request::new(2, prompt, stop(1))).unwrap();
    let out = s.schedule();
    assert_eq!(out.seqs[0].start_pos, 16);
    assert_eq!(out.seqs[0].token_ids, vec![17]);
    assert_eq!(s.request(2).unwrap().num_cached_tokens, 16);
}

#[test]
fn parallel_samples_fork_after_the_prompt_and_copy_the_shared_block() {
    let mut s = Scheduler::new(config(16, 64, 4));
    let mut shadow = ShadowCache::new(&s);
    // A 6-token prompt: one full block of 4 and a partial one, shared by three samples.
    s.add_request(Request::new(1, (1..=6).collect(), stop(3)).with_forks(vec![2, 3])).unwrap();
    let out = s.schedule();
    shadow.apply(&s, &out);
    assert_eq!(out.seqs.len(), 1, "the prompt is computed once");
    assert_eq!(out.seqs[0].forks, vec![2, 3]);
    assert_eq!(out.sampling_ids().collect::<Vec<_>>(), vec![1, 2, 3]);
    let updates = s.update_from_output(&out, &[10, 20, 30]);
    assert_eq!(updates.iter().map(|u| (u.id, u.new_token)).collect::<Vec<_>>(), vec![(1, 10), (2, 20), (3, 30)]);
    let blocks = s.kv_cache().block_ids(1).to_vec();
    assert_eq!(s.kv_cache().block_ids(3), blocks.as_slice(), "samples share the prompt's blocks");
    assert_eq!(s.kv_cache().pool().ref_count(blocks[1]), 3);
    // Each sample appends at position 6, inside the shared partial block: the first two
    // writers get a copy, the last writes in place.
    let out = s.schedule();
    shadow.apply(&s, &out);
    let sampled: Vec<u32> = out.sampling_ids().map(|id| id as u32 * 10 + 1).collect();
    s.update_from_output(&out, &sampled);
    assert_eq!(out.seqs.len(), 3);
    assert_eq!(out.block_copies.len(), 2);
    assert!(out.block_copies.iter().all(|c| c.src == blocks[1]));
    assert_eq!(s.kv_cache().pool().ref_count(blocks[0]), 3, "the full block stays shared");
    s.kv_cache().check_invariants();
    let done = drive_with(&mut s, &mut shadow, |id, n| (id * 10 + n as u64) as u32);
    assert_eq!(done.len(), 3);
    assert_eq!(s.kv_cache().pool().num_free(), 16);
}

/// A draft model's reservation: a prefilling sequence gets none; a sample writing into its
/// shared partial block gets its copy now and in the next step's copies; unused slots go back
/// after the step; a reservation leaves a free block per running sequence.
#[test]
fn reserved_draft_slots_copy_shared_blocks_and_go_back_unused() {
    let mut s = Scheduler::new(config(8, 64, 4));
    let mut shadow = ShadowCache::new(&s);
    s.add_request(Request::new(1, (1..=6).collect(), stop(20)).with_forks(vec![2])).unwrap();
    assert!(s.reserve_slots(1, 9).is_err(), "not decoding yet");
    let out = s.schedule();
    shadow.apply(&s, &out);
    s.update_from_output(&out, &[10, 20]);
    let shared = s.kv_cache().block_ids(2)[1];
    // Sample 2 reserves slots for 7 tokens and 3 drafts: its partial block is copied now.
    let copy = s.reserve_slots(2, 10).unwrap().expect("a copy of the shared block");
    assert_eq!(copy.src, shared);
    assert_eq!(s.kv_cache().block_ids(2).len(), 3);
    s.kv_cache().check_invariants();
    // Two running sequences: a reservation leaving fewer than two free blocks is refused.
    assert!(s.reserve_slots(1, 6 + 4 * 4).is_err());
    let out = s.schedule();
    assert_eq!(out.block_copies, vec![copy]);
    shadow.apply(&s, &out);
    s.update_from_output(&out, &[11, 21]);
    assert_eq!(s.kv_cache().block_ids(2).len(), 2, "the unused reserved block went back");
    s.kv_cache().check_invariants();
    let done = drive_with(&mut s, &mut shadow, |id, n| (id * 10 + n as u64) as u32);
    assert_eq!(done.len(), 2);
    assert_eq!(s.kv_cache().pool().num_free(), 8);
}

#[test]
fn a_request_and_its_samples_must_fit_in_max_num_seqs() {
    let mut s = Scheduler::new(config(64, 64, 3));
    let too_many = s.add_request(Request::new(1, vec![1, 2], stop(2)).with_forks(vec![2, 3, 4]));
    assert!(matches!(too_many, Err(SchedulerError::TooManySequences { sequences: 4, max_num_seqs: 3 })));
    assert!(matches!(
        s.add_request(Request::new(5, vec![1, 2], stop(2)).with_forks(vec![5])),
        Err(SchedulerError::DuplicateId(5))
    ));
    // Two 2-sample requests and max_num_seqs 3: the second waits for room for both samples.
    s.add_request(Request::new(10, vec![1, 2, 3], stop(4)).with_forks(vec![11])).unwrap();
    s.add_request(Request::new(20, vec![4, 5, 6], stop(4)).with_forks(vec![21])).unwrap();
    let out = s.schedule();
    assert_eq!(out.seqs.iter().map(|q| q.id).collect::<Vec<_>>(), vec![10]);
    let done = drive(&mut s, |id, n| (id + n as u64) as u32);
    assert_eq!(done.len(), 4);
}

#[test]
fn aborting_a_pending_sample_or_its_parent() {
    let mut s = Scheduler::new(config(16, 4, 4));
    let mut shadow = ShadowCache::new(&s);
    s.add_request(Request::new(1, (1..=10).collect(), stop(2)).with_forks(vec![2, 3])).unwrap();
    let out = s.schedule(); // first prefill chunk; the samples have not forked
    shadow.apply(&s, &out);
    s.update_from_output(&out, &[]);
    assert!(s.abort(3), "a pending sample can be aborted alone");
    let done = drive_with(&mut s, &mut shadow, |id, _| id as u32);
    let mut ids: Vec<u64> = done.iter().map(|d| d.0).collect();
    ids.sort();
    assert_eq!(ids, vec![1, 2]);
    s.add_request(Request::new(4, (1..=10).collect(), stop(2)).with_forks(vec![5])).unwrap();
    let out = s.schedule();
    s.update_from_output(&out, &[]);
    assert!(s.abort(4), "aborting the parent takes its pending sample along");
    assert!(!s.abort(5));
    assert!(!s.has_unfinished());
    assert_eq!(s.kv_cache().pool().num_free(), 16);
}

#[test]
fn decode_keeps_running_while_a_long_prompt_is_prefilled() {
    // Budget 8: a 200-token prompt takes 25+ steps to prefill; the decoding request must get
    // a token in every one of them (no head-of-line blocking).
    let mut s = Scheduler::new(config(128, 8, 4));
    s.add_request(Request::new(1, vec![1, 2, 3], stop(40))).unwrap();
    let out = s.schedule();
    s.update_from_output(&out, &[7]);
    s.add_request(Request::new(2, (1..=200).collect(), stop(1))).unwrap();
    let mut prefill_steps = 0;
    while s.request(2).is_some_and(|r| r.num_output_tokens() == 0) {
        let out = s.schedule();
        assert!(out.seqs.iter().any(|q| q.id == 1 && q.sample), "request 1 decodes every step");
        if out.seqs.iter().any(|q| q.id == 2) {
            prefill_steps += 1;
        }
        let sampled: Vec<u32> = out.sampling_ids().map(|_| 7).collect();
        s.update_from_output(&out, &sampled);
    }
    assert!(prefill_steps >= 200 / 7, "the prompt was chunked ({prefill_steps} steps)");
}

#[test]
fn waste_on_a_mixed_length_workload_is_under_four_percent() {
    // Block size 16, prompts of 20 to 1000 tokens and outputs of 10 to 300: measure, after
    // every step, the allocated slots that hold no token against the slots in use.
    let mut c = config(4096, 2048, 64);
    c.block_size = 16;
    c.max_model_len = 2048;
    c.enable_prefix_caching = false;
    let mut s = Scheduler::new(c);
    let mut rng = 12345u64;
    let mut next = || {
        rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (rng >> 33) as usize
    };
    for id in 0..200u64 {
        let len = 20 + next() % 980;
        let out = 10 + next() % 290;
        s.add_request(Request::new(id, (0..len as u32).map(|t| t + id as u32).collect(), stop(out))).unwrap();
    }
    let (mut slots, mut held) = (0usize, 0usize);
    while s.has_unfinished() {
        let out = s.schedule();
        let sampled: Vec<u32> = out.sampling_ids().map(|id| 1 + id as u32).collect();
        s.update_from_output(&out, &sampled);
        let u = s.kv_cache().memory_usage();
        assert!(u.tokens_held <= u.slots_in_use);
        slots += u.slots_in_use;
        held += u.tokens_held;
    }
    let waste = 1.0 - held as f64 / slots as f64;
    println!("KV waste over the run: {:.2}% of the slots in use", waste * 100.0);
    assert!(waste < 0.04, "waste {:.2}%", waste * 100.0);
}

#[derive(Debug, Clone)]
enum Op {
    Add {
        len: usize,
        max_tokens: usize,
        shared: bool,
        samples: usize,
    },
    Abort(usize),
    Step,
    /// A step where each decoding sequence proposes `len` draft tokens, the first `right` of
    /// them what the fake model then samples; with `reserve`, their slots are reserved first
    /// (as a draft model does, to write its own K/V there).
    SpecStep {
        len: usize,
        right: usize,
        reserve: bool,
    },
    /// A step suspended while the inner ops run (they must not touch it), its K/V written last.
    Held(Vec<Op>),
    /// Inside `Held`: aborts one of the held step's sequences.
    AbortHeld(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => plain_op(),
        1 => proptest::collection::vec(held_op(), 0..8).prop_map(Op::Held),
    ]
}

fn held_op() -> impl Strategy<Value = Op> {
    prop_oneof![3 => plain_op(), 1 => (0usize..8).prop_map(Op::AbortHeld)]
}

fn plain_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (1usize..30, 1usize..12, any::<bool>(), 1usize..4).prop_map(|(len, max_tokens, shared, samples)| Op::Add {
            len,
            max_tokens,
            shared,
            samples
        }),
        (0usize..96).prop_map(Op::Abort),
        Just(Op::Step),
        Just(Op::Step),
        Just(Op::Step),
        (1usize..6, 0usize..7, any::<bool>()).prop_map(|(len, right, reserve)| Op::SpecStep { len, right, reserve }),
    ]
}

/// The fake model's token for a sequence with `n` tokens (so drafts can agree with it).
fn truth(id: u64, n: usize) -> u32 {
    1 + ((id as usize * 3 + n) % 7) as u32
}

fn apply_op(s: &mut Scheduler, shadow: &mut ShadowCache, next: &mut u64, op: Op) {
    match op {
        Op::Add { len, max_tokens, shared, samples } => {
            let prompt: Vec<u32> = if shared {
                (1..=len as u32).collect()
            } else {
                (0..len as u32).map(|t| 100 + t + *next as u32 * 31).collect()
            };
            let forks = (1..samples as u64).map(|k| *next + k).collect();
            let _ = s.add_request(Request::new(*next, prompt, stop(max_tokens)).with_forks(forks));
            *next += samples as u64;
        }
        Op::Abort(k) => {
            s.abort(k as u64);
        }
        Op::Step => {
            let out = s.schedule();
            check_limits(s, &out);
            shadow.apply(s, &out);
            let sampled: Vec<u32> = out.sampling_ids().map(|id| 1 + (id % 7) as u32).collect();
            s.update_from_output(&out, &sampled);
        }
        Op::SpecStep { len, right, reserve } => {
            let proposals: Vec<(u64, usize)> = s.draftable().map(|r| (r.id, r.token_ids.len())).collect();
            for (id, n) in proposals {
                // A refused reservation (short of blocks) leaves the draft to the step's own.
                if reserve && s.reserve_slots(id, n - 1 + len).is_ok() {
                    assert!(s.kv_cache().block_ids(id).len() * s.config().block_size >= n - 1 + len);
                }
                let draft = (0..len).map(|j| if j < right { truth(id, n + j) } else { 90 + j as u32 }).collect();
                s.propose(id, draft);
            }
            let out = s.schedule();
            check_limits(s, &out);
            shadow.apply(s, &out);
            // Verify: the model's token at each drafted position, up to the first disagreement.
            let mut accepted = Vec::new();
            let mut sampled = Vec::new();
            for q in &out.seqs {
                let n = q.start_pos + q.token_ids.len() - q.num_draft;
                let draft = &q.token_ids[q.token_ids.len() - q.num_draft..];
                let a = (0..q.num_draft).take_while(|&j| draft[j] == truth(q.id, n + j)).count();
                accepted.push(a);
                if q.sample {
                    sampled.push(truth(q.id, n + a));
                    sampled.extend(q.forks.iter().map(|&f| truth(f, n)));
                }
            }
            let before: Vec<(u64, usize)> = out
                .seqs
                .iter()
                .filter(|q| q.sample)
                .filter_map(|q| Some((q.id, s.request(q.id)?.token_ids.len())))
                .collect();
            let updates = s.update_from_drafts(&out, &sampled, &accepted);
            for (id, n) in before {
                let got: Vec<u32> = updates.iter().filter(|u| u.id == id).map(|u| u.new_token).collect();
                let want: Vec<u32> = (0..got.len()).map(|j| truth(id, n + j)).collect();
                assert_eq!(got, want, "sequence {id} gets the model's tokens");
                if let Some(r) = s.request(id) {
                    // Its known tokens but the last are computed; no block past them.
                    assert_eq!(r.num_computed_tokens + 1, r.token_ids.len());
                    let bs = s.config().block_size;
                    assert!(s.kv_cache().block_ids(id).len() <= r.token_ids.len().div_ceil(bs).max(1) + 1);
                }
            }
        }
        Op::Held(_) | Op::AbortHeld(_) => unreachable!("only a held step's inner ops"),
    }
    s.kv_cache().check_invariants();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    /// Random streams of add (with shared prompts and parallel samples) / abort / step on tiny
    /// pools: the budget and `max_num_seqs` always hold, every block's ref count equals its
    /// holders, no sequence holds a block twice, every sequence reads only its own tokens'
    /// K/V (prefix hits and copies included), and everything ends free.
    #[test]
    fn random_streams_keep_the_invariants_and_end_with_every_block_free(
        ops in proptest::collection::vec(op(), 1..80),
        blocks in 10usize..40, budget in 1usize..24, seqs in 1usize..6,
    ) {
        let mut s = Scheduler::new(config(blocks, budget, seqs));
        let mut shadow = ShadowCache::new(&s);
        let mut next = 0u64;
        for op in ops {
            match op {
                Op::Held(inner) => {
                    let out = s.schedule();
                    check_limits(&s, &out);
                    s.hold(&out);
                    // Its block copies are made before its first layer, so before anything
                    // runs meanwhile; its K/V lands last.
                    shadow.copy(&out);
                    for op in inner {
                        let op = match op {
                            Op::AbortHeld(i) if !out.seqs.is_empty() => Op::Abort(out.seqs[i % out.seqs.len()].id as usize),
                            Op::AbortHeld(_) => Op::Step,
                            op => op,
                        };
                        apply_op(&mut s, &mut shadow, &mut next, op);
                        let held = out.seqs.len();
                        prop_assert!(s.num_running() <= s.config().max_num_seqs, "{} running with {held} held", s.num_running());
                    }
                    // The suspended step's K/V lands last: steps run meanwhile read none of it.
                    shadow.write(&s, &out);
                    s.release();
                    let sampled: Vec<u32> = out.sampling_ids().map(|id| 1 + (id % 7) as u32).collect();
                    s.update_from_output(&out, &sampled);
                }
                op => apply_op(&mut s, &mut shadow, &mut next, op),
            }
            s.kv_cache().check_invariants();
        }
        drive_with(&mut s, &mut shadow, |id, n| 1 + ((id as usize + n) % 5) as u32);
        prop_assert_eq!(s.kv_cache().pool().num_free(), blocks);
        prop_assert_eq!(s.kv_cache().num_seqs(), 0);
        for b in 0..blocks as u32 {
            prop_assert_eq!(s.kv_cache().pool().ref_count(b), 0);
        }
    }
}

/// At most `max_loras` distinct adapters per step: a request of one adapter too many waits,
/// keeping its place, while later requests of adapters already running (or none) go ahead;
/// it is admitted as soon as an adapter's last sequence finishes.
#[test]
fn at_most_max_loras_adapters_run_at_once() {
    let mut s = Scheduler::new(config(64, 64, 8)).with_max_loras(2);
    let add = |s: &mut Scheduler, id: u64, lora: Option<u32>, max_tokens: usize| {
        s.add_request(Request::new(id, vec![1, 2, 3], stop(max_tokens)).with_lora(lora)).unwrap();
    };
    add(&mut s, 0, Some(10), 1);
    add(&mut s, 1, Some(20), 4);
    add(&mut s, 2, Some(30), 4); // a third adapter: waits
    add(&mut s, 3, Some(10), 4); // adapter 10 is running: goes ahead of request 2
    add(&mut s, 4, None, 4); // the base model: always fits
    let out = s.schedule();
    let ids: Vec<u64> = out.seqs.iter().map(|q| q.id).collect();
    assert_eq!(ids, vec![0, 1, 3, 4]);
    assert_eq!(out.seqs.iter().map(|q| q.lora).collect::<Vec<_>>(), vec![Some(10), Some(20), Some(10), None]);
    let (running, waiting) = s.lora_sets();
    assert_eq!(
        (running.into_iter().collect::<Vec<_>>(), waiting.into_iter().collect::<Vec<_>>()),
        (vec![10, 20], vec![30])
    );
    // Request 0 finishes after one token; adapter 10 still runs (request 3): 30 still waits.
    s.update_from_output(&out, &[5, 5, 5, 5]);
    let out = s.schedule();
    assert!(out.seqs.iter().all(|q| q.id != 2), "{out:?}");
    s.update_from_output(&out, &vec![5; out.seqs.len()]);
    // Finish everything but request 2, which then runs.
    for _ in 0..8 {
        let out = s.schedule();
        if out.seqs.iter().any(|q| q.id == 2) {
            assert!(out.seqs.iter().filter_map(|q| q.lora).collect::<std::collections::BTreeSet<_>>().len() <= 2);
            return;
        }
        s.update_from_output(&out, &vec![5; out.seqs.len()]);
    }
    panic!("the request of the third adapter never ran");
}
