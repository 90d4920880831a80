//! `vllm-server`: the OpenAI-compatible HTTP server of vllm-rs.
//!
//! The HTTP server itself lands with issue #3 (routes, streaming, auth, metrics). Until then
//! this binary says so and exits with an error instead of pretending to serve; run the offline
//! quickstart instead: `cargo run --release -p vllm-engine --example offline_inference`.

fn main() -> std::process::ExitCode {
    eprintln!(
        "vllm-server: the HTTP server is not implemented yet (see issue #3).\n\
         Offline inference works today: cargo run --release -p vllm-engine --example offline_inference"
    );
    std::process::ExitCode::from(2)
}
