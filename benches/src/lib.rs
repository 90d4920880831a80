//! Criterion micro-benchmarks live in `benches/` (`cargo bench -p vllm-benches`); this library
//! is empty.
