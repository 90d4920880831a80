//! Scheduler behaviour: budgets, chunked prefill, preemption, and random streams that must
//! always end with every block free.

use proptest::prelude::*;
use vllm_scheduler::{FinishReason, Request, Scheduler, SchedulerConfig, StopConditions};

fn config(num_blocks: usize, budget: usize, max_seqs: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_num_seqs: max_seqs,
        max_num_batched_tokens: budget,
        max_model_len: 256,
        block_size: 4,
        num_blocks,
        enable_prefix_caching: true,
    }
}

fn stop(max_tokens: usize) -> StopConditions {
    StopConditions { max_tokens, eos_token_ids: vec![0], ..Default::default() }
}

type Done = Vec<(u64, Vec<u32>, FinishReason)>;

/// Runs the scheduler to completion with a fake model that samples `token_fn(id, n_out)`,
/// checking invariants every step. Returns (id, outputs, reason) in completion order.
fn drive(s: &mut Scheduler, token_fn: impl Fn(u64, usize) -> u32) -> Done {
    let mut done = Vec::new();
    let mut outputs: std::collections::HashMap<u64, Vec<u32>> = Default::default();
    let mut steps = 0;
    while s.has_unfinished() {
        steps += 1;
        assert!(steps < 10_000, "scheduler made no progress");
        let out = s.schedule();
        assert!(out.num_batched_tokens <= s.config().max_num_batched_tokens);
        assert!(out.seqs.len() <= s.config().max_num_seqs);
        assert!(!out.is_empty() || !out.preempted.is_empty(), "nothing scheduled with work left");
        let sampled: Vec<u32> = out
            .seqs
            .iter()
            .filter(|q| q.sample)
            .map(|q| token_fn(q.id, outputs.get(&q.id).map_or(0, |o| o.len())))
            .collect();
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

#[derive(Debug, Clone)]
enum Op {
    Add { len: usize, max_tokens: usize, shared: bool },
    Abort(usize),
    Step,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (1usize..30, 1usize..12, any::<bool>()).prop_map(|(len, max_tokens, shared)| Op::Add {
            len,
            max_tokens,
            shared
        }),
        (0usize..64).prop_map(Op::Abort),
        Just(Op::Step),
        Just(Op::Step),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn random_streams_end_with_every_block_free(
        ops in proptest::collection::vec(op(), 1..80),
        blocks in 10usize..40, budget in 1usize..24, seqs in 1usize..6,
    ) {
        let mut s = Scheduler::new(config(blocks, budget, seqs));
        let mut next = 0u64;
        for op in ops {
            match op {
                Op::Add { len, max_tokens, shared } => {
                    let prompt: Vec<u32> = if shared {
                        (1..=len as u32).collect()
                    } else {
                        (0..len as u32).map(|t| 100 + t + next as u32 * 31).collect()
                    };
                    let _ = s.add_request(Request::new(next, prompt, stop(max_tokens)));
                    next += 1;
                }
                Op::Abort(k) => { s.abort(k as u64); }
                Op::Step => {
                    let out = s.schedule();
                    prop_assert!(out.num_batched_tokens <= budget);
                    prop_assert!(out.seqs.len() <= seqs);
                    let sampled: Vec<u32> = out.seqs.iter().filter(|q| q.sample)
                        .map(|q| 1 + (q.id % 7) as u32).collect();
                    s.update_from_output(&out, &sampled);
                }
            }
            s.kv_cache().check_invariants();
        }
        drive(&mut s, |id, n| 1 + ((id as usize + n) % 5) as u32);
        prop_assert_eq!(s.kv_cache().pool().num_free(), blocks);
        prop_assert_eq!(s.kv_cache().num_seqs(), 0);
    }
}
