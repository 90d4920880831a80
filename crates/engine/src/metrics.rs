//! Engine metrics, recorded in one place through the `metrics` facade with vLLM's names
//! (`vllm:` prefix), so existing dashboards work. The server installs a Prometheus recorder;
//! without one, recording is a no-op.

use std::time::Instant;

use crate::engine::EngineStats;

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
    if let Some(spec) = &s.spec {
        metrics::counter!("vllm:spec_decode_num_drafts_total").absolute(spec.num_drafts);
        metrics::counter!("vllm:spec_decode_num_draft_tokens_total").absolute(spec.num_draft_tokens);
        metrics::counter!("vllm:spec_decode_num_accepted_tokens_total").absolute(spec.num_accepted_tokens);
        let used = spec.accepted_per_pos.iter().rposition(|&c| c > 0).map_or(0, |p| p + 1);
        for (pos, &c) in spec.accepted_per_pos.iter().enumerate().take(used) {
            metrics::counter!("vllm:spec_decode_num_accepted_tokens_per_pos_total", "position" => pos.to_string())
                .absolute(c);
        }
    }
}

/// Per-request latency tracking.
pub(crate) struct StepMetrics {
    arrival: Instant,
    last: Instant,
    first: Option<Instant>,
    seen: usize,
    prompt_tokens: usize,
}

impl StepMetrics {
    pub(crate) fn new(arrival: Instant, prompt_tokens: usize) -> Self {
        Self { arrival, last: arrival, first: None, seen: 0, prompt_tokens }
    }

    /// Records `new` tokens of the request's first sequence; `finished` carries the finish
    /// reason once the request is done.
    /// Also logs the finished request (target `vllm_engine::requests`, which the server
    /// silences with `--disable-log-requests`).
    pub(crate) fn on_tokens(&mut self, request_id: &str, new: usize, finished: Option<&'static str>) {
        let now = Instant::now();
        if new > 0 {
            if self.seen == 0 {
                self.first = Some(now);
                metrics::histogram!("vllm:time_to_first_token_seconds").record((now - self.arrival).as_secs_f64());
                metrics::counter!("vllm:prompt_tokens_total").increment(self.prompt_tokens as u64);
            } else {
                let itl = (now - self.last).as_secs_f64() / new as f64;
                for _ in 0..new {
                    metrics::histogram!("vllm:inter_token_latency_seconds").record(itl);
                }
            }
            metrics::counter!("vllm:generation_tokens_total").increment(new as u64);
            self.seen += new;
            self.last = now;
        }
        if let Some(reason) = finished {
            let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
            tracing::info!(
                target: "vllm_engine::requests",
                request_id,
                prompt_tokens = self.prompt_tokens,
                generated_tokens = self.seen,
                finish_reason = reason,
                ttft_ms = self.first.map(|f| ms(f - self.arrival)),
                decode_ms = self.first.map(|f| ms(now - f)),
                e2e_ms = ms(now - self.arrival),
                "finished request"
            );
            metrics::histogram!("vllm:e2e_request_latency_seconds").record((now - self.arrival).as_secs_f64());
            metrics::counter!("vllm:request_success_total", "finished_reason" => reason).increment(1);
        }
    }
}

/// vLLM's periodic statistics line (every 10 s while requests run; target
/// `vllm_engine::stats`, which the server silences with `--disable-log-stats`): throughput,
/// running and waiting requests, KV cache usage, and speculative decoding's acceptance.
pub(crate) struct PeriodicLog {
    last: Instant,
    tokens: u64,
    prompt_tokens: u64,
    spec: crate::spec::SpecStats,
}

impl Default for PeriodicLog {
    fn default() -> Self {
        Self { last: Instant::now(), tokens: 0, prompt_tokens: 0, spec: Default::default() }
    }
}

impl PeriodicLog {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(10);

    pub(crate) fn tick(&mut self, s: &EngineStats) {
        let now = Instant::now();
        let secs = (now - self.last).as_secs_f64();
        if secs < Self::EVERY.as_secs_f64() {
            return;
        }
        let prompt = s.num_computed_prompt_tokens - self.prompt_tokens.min(s.num_computed_prompt_tokens);
        let all = s.num_computed_tokens - self.tokens.min(s.num_computed_tokens);
        let active = all > 0 || s.num_running > 0 || s.num_waiting > 0;
        if active {
            let spec = s.spec.map(|now| {
                let drafts = now.num_drafts - self.spec.num_drafts.min(now.num_drafts);
                let draft = now.num_draft_tokens - self.spec.num_draft_tokens.min(now.num_draft_tokens);
                let acc = now.num_accepted_tokens - self.spec.num_accepted_tokens.min(now.num_accepted_tokens);
                let rate = if draft > 0 { 100.0 * acc as f64 / draft as f64 } else { 0.0 };
                let len = if drafts > 0 { 1.0 + acc as f64 / drafts as f64 } else { 0.0 };
                format!(
                    ", SpecDecoding: accepted {acc}/{draft} draft tokens ({rate:.1}%), mean acceptance length {len:.2}"
                )
            });
            tracing::info!(
                target: "vllm_engine::stats",
                "Avg prompt throughput: {:.1} tokens/s, Avg generation throughput: {:.1} tokens/s, Running: {} reqs, \
                 Waiting: {} reqs, KV cache usage: {:.1}%{}",
                prompt as f64 / secs,
                (all - prompt) as f64 / secs,
                s.num_running,
                s.num_waiting,
                100.0 * s.kv_cache_usage,
                spec.unwrap_or_default()
            );
        }
        self.last = now;
        self.tokens = s.num_computed_tokens;
        self.prompt_tokens = s.num_computed_prompt_tokens;
        if let Some(spec) = s.spec {
            self.spec = spec;
        }
    }
}
