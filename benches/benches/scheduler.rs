//! The scheduler's share of a decode step: one `schedule()` + `update_from_output()` with 256
//! running requests (512-token prompts, decoding), prefix caching on (each block that fills is
//! hashed and registered). Everything the engine does per step besides the model and sampler.
//!
//! Run: `cargo bench -p vllm-benches --bench scheduler`.

#![allow(missing_docs)]

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use vllm_scheduler::{Request, Scheduler, SchedulerConfig, StopConditions};

const PROMPT: usize = 512;

/// `n` requests past their prompts, in steady decode.
fn decoding(n: usize) -> Scheduler {
    let mut s = Scheduler::new(SchedulerConfig {
        max_num_seqs: 256,
        max_num_batched_tokens: 8192,
        max_model_len: 8192,
        block_size: 16,
        num_blocks: n * 8192 / 16,
        enable_prefix_caching: true,
        long_prefill_token_threshold: 0,
    });
    for id in 0..n as u64 {
        let prompt = (0..PROMPT as u32).map(|t| 1000 + t * 13 + id as u32 * 7919).collect();
        let stop = StopConditions { max_tokens: 4096, ..Default::default() };
        s.add_request(Request::new(id, prompt, stop)).unwrap();
    }
    while s.num_running() < n || s.num_waiting() > 0 || !s.schedule_is_decode_only() {
        let out = s.schedule();
        let sampled: Vec<u32> = out.sampling_ids().map(|id| id as u32).collect();
        s.update_from_output(&out, &sampled);
    }
    s
}

/// Whether every running request is decoding (helper for the setup loop).
trait DecodeOnly {
    fn schedule_is_decode_only(&self) -> bool;
}

impl DecodeOnly for Scheduler {
    fn schedule_is_decode_only(&self) -> bool {
        (0..self.num_running() as u64).all(|id| self.request(id).is_some_and(|r| r.num_output_tokens() > 0))
    }
}

fn step(c: &mut Criterion) {
    let mut g = c.benchmark_group("scheduler_step");
    for n in [64usize, 256] {
        g.bench_with_input(BenchmarkId::new("decode", n), &n, |b, &n| {
            b.iter_custom(|iters| {
                let mut s = decoding(n);
                let mut total = Duration::ZERO;
                for i in 0..iters {
                    if i % 2000 == 1999 {
                        s = decoding(n); // keep contexts realistic (untimed)
                    }
                    let t = Instant::now();
                    let out = s.schedule();
                    let sampled: Vec<u32> = out.sampling_ids().map(|id| 100 + id as u32).collect();
                    let updates = s.update_from_output(&out, &sampled);
                    total += t.elapsed();
                    assert_eq!(updates.len(), n);
                }
                total
            })
        });
    }
    g.finish();
}

criterion_group!(benches, step);
criterion_main!(benches);
