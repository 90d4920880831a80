//! Engine metrics, recorded in one place through the `metrics` facade with vLLM's names
//! (`vllm:` prefix), so existing dashboards work. The server installs a Prometheus recorder;
//! without one, recording is a no-op.

use std::time::Instant;

use crate::engine::EngineStats;
use crate::output::RequestOutput;

/// Gauges and cumulative counters from the engine's statistics.
pub(crate) fn record_stats(s: &EngineStats) {
    metrics::gauge!("vllm:num_requests_running").set(s.num_running as f64);
    metrics::gauge!("vllm:num_requests_waiting").set(s.num_waiting as f64);
    metrics::gauge!("vllm:kv_cache_usage_perc").set(s.kv_cache_usage as f64);
    metrics::counter!("vllm:prefix_cache_queries_total").absolute(s.prefix_cache_queries);
    metrics::counter!("vllm:prefix_cache_hits_total").absolute(s.prefix_cache_hits);
    metrics::counter!("vllm:num_preemptions_total").absolute(s.num_preemptions);
    metrics::gauge!("vllm:kv_cache_blocks_in_use").set(s.kv_memory.blocks_in_use as f64);
    metrics::gauge!("vllm:kv_cache_tokens_held").set(s.kv_memory.tokens_held as f64);
    metrics::gauge!("vllm:kv_cache_waste_perc").set(s.kv_memory.waste());
}

/// Per-request latency tracking.
pub(crate) struct StepMetrics {
    arrival: Instant,
    last: Instant,
    seen: usize,
}

impl StepMetrics {
    pub(crate) fn new(arrival: Instant) -> Self {
        Self { arrival, last: arrival, seen: 0 }
    }

    pub(crate) fn on_output(&mut self, o: &RequestOutput) {
        let now = Instant::now();
        let n = o.outputs.first().map_or(0, |c| c.token_ids.len());
        let new = n.saturating_sub(self.seen);
        if new > 0 {
            if self.seen == 0 {
                metrics::histogram!("vllm:time_to_first_token_seconds").record((now - self.arrival).as_secs_f64());
                metrics::counter!("vllm:prompt_tokens_total").increment(o.prompt_token_ids.len() as u64);
            } else {
                let itl = (now - self.last).as_secs_f64() / new as f64;
                for _ in 0..new {
                    metrics::histogram!("vllm:inter_token_latency_seconds").record(itl);
                }
            }
            metrics::counter!("vllm:generation_tokens_total").increment(new as u64);
            self.seen = n;
            self.last = now;
        }
        if o.finished {
            metrics::histogram!("vllm:e2e_request_latency_seconds").record((now - self.arrival).as_secs_f64());
            let reason = o.outputs.first().and_then(|c| c.finish_reason).map_or("abort", |r| r.as_str());
            metrics::counter!("vllm:request_success_total", "finished_reason" => reason).increment(1);
        }
    }
}
