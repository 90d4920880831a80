//! vLLM's quickstart, in Rust: offline batched inference on the default model.
//!
//! Run: `cargo run --release -p vllm-engine --example offline_inference`
//! (first run fetches SmolLM2-135M-Instruct; add `-- MODEL` to use another model).
//!
//! Prints, for each of the four prompts, `Prompt: ..., Generated text: ...`, then the decode
//! speed of the batch.

use std::time::Instant;

use vllm_engine::{EngineArgs, SamplingParams, LLM};

fn main() -> anyhow::Result<()> {
    let prompts = [
        "Hello, my name is",
        "The president of the United States is",
        "The capital of France is",
        "The future of AI is",
    ];
    let sampling_params = SamplingParams { temperature: 0.8, top_p: 0.95, ..Default::default() };

    let mut args = EngineArgs::default();
    if let Some(model) = std::env::args().nth(1) {
        args.model = model;
    }
    let llm = LLM::new(args)?;

    let start = Instant::now();
    let outputs = llm.generate(prompts, &sampling_params)?;
    let elapsed = start.elapsed().as_secs_f64();

    let mut generated = 0;
    for output in &outputs {
        let prompt = output.prompt.as_deref().unwrap_or_default();
        let text = &output.outputs[0].text;
        generated += output.outputs[0].token_ids.len();
        println!("Prompt: {prompt:?}, Generated text: {text:?}");
    }
    println!(
        "{generated} tokens in {elapsed:.2} s ({:.1} output tokens/s for the batch of {})",
        generated as f64 / elapsed,
        outputs.len()
    );
    Ok(())
}
