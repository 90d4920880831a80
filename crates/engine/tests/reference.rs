//! The default model against float32 references from Hugging Face `transformers`
//! (fixtures/smollm2_reference.json, written by scripts/make_reference_fixtures.py).

mod common;

use candle_core::{DType, Device};
use common::{default_gguf, fixtures, next_token_logprobs};
use vllm_engine::{EngineArgs, Quantization, SamplingParams, LLM};
use vllm_models::LoadOptions;

#[test]
fn gguf_tokenizer_matches_the_reference_ids() {
    let path = default_gguf();
    let (_, w) = vllm_models::load_gguf(
        &path,
        LoadOptions { dtype: DType::F32, keep_quantized: true, int8: false, native: false },
        &Device::Cpu,
    )
    .unwrap();
    let tok = vllm_tokenizer::Tokenizer::from_gguf(w.gguf_metadata().unwrap()).unwrap();
    for case in fixtures().cases {
        assert_eq!(tok.encode(&case.text, true).unwrap(), case.prompt_ids, "prompt {:?}", case.text);
        // Incremental detokenization of the reference continuation equals a full decode and
        // never emits a broken character, even for emoji and accents split across tokens.
        let mut detok = vllm_tokenizer::IncrementalDetokenizer::new(&case.prompt_ids, false);
        let mut streamed = String::new();
        for &t in &case.greedy_ids {
            let delta = detok.push(&tok, t).unwrap();
            assert!(!delta.contains('\u{FFFD}'), "broken character in delta {delta:?}");
            streamed.push_str(delta);
        }
        assert_eq!(streamed, tok.decode(&case.greedy_ids, false).unwrap());
        assert_eq!(streamed, case.greedy_text, "our decode vs transformers' decode");
    }
}

#[test]
fn float32_path_reproduces_reference_greedy_and_logprobs() {
    let fx = fixtures();
    let path = default_gguf();
    // Logprobs through the model's paged path.
    let (model, _) = vllm_models::load_gguf(
        &path,
        LoadOptions { dtype: DType::F32, keep_quantized: false, int8: false, native: false },
        &Device::Cpu,
    )
    .unwrap();
    let mut max_lp_err = 0f32;
    for case in &fx.cases {
        let lp = next_token_logprobs(&*model, &case.prompt_ids);
        for &(id, want) in &case.first_top5 {
            let err = (lp[id as usize] - want).abs();
            max_lp_err = max_lp_err.max(err);
            assert!(err < 1e-3, "{:?}: logprob of {id}: {} vs reference {want}", case.text, lp[id as usize]);
        }
    }
    drop(model);
    // Greedy continuations through the whole engine, all prompts in one batch, on the float32
    // path (asked for explicitly: the default runs the file's own quantization).
    let mut args = EngineArgs::new(path.to_string_lossy());
    args.quantization = Quantization::None;
    args.kv_cache_memory = 512 << 20;
    let mut llm = LLM::new(args).unwrap();
    llm.set_use_tqdm(false);
    let params = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(32) };
    let prompts: Vec<Vec<u32>> = fx.cases.iter().map(|c| c.prompt_ids.clone()).collect();
    let outs = llm.generate(prompts, &params).unwrap();
    let mut near_ties = Vec::new();
    for (case, out) in fx.cases.iter().zip(&outs) {
        let got = &out.outputs[0].token_ids;
        assert_eq!(got.len(), 32);
        if let Some(i) = got.iter().zip(&case.greedy_ids).position(|(a, b)| a != b) {
            // Allowed only where the reference itself is within 1e-3 of a tie.
            assert!(
                case.top2_gaps[i] < 1e-3,
                "{:?}: token {i} is {} but the reference says {} (top-2 gap {}, not a near-tie)",
                case.text,
                got[i],
                case.greedy_ids[i],
                case.top2_gaps[i]
            );
            near_ties.push((case.text.clone(), i));
        }
    }
    eprintln!("max first-token logprob error {max_lp_err:.2e}; divergences at reference near-ties: {near_ties:?}");
}

/// Q4_1 matmuls (llama.cpp's arithmetic: Q4_1 weights times Q8_1 activations, run through
/// candle), our own kernels on the file's blocks (the default) and our int8 path all stay
/// close to the float32 reference on the first token; the default and int8 at least as close
/// as llama.cpp's arithmetic.
#[test]
fn quantized_first_tokens_stay_close_to_the_reference() {
    let f32 = LoadOptions::float32();
    let q4_1 = quantized_first_tokens_stay_close("Q4_1 (candle)", LoadOptions { keep_quantized: true, ..f32 });
    let native = quantized_first_tokens_stay_close("Q4_1 (ours, default)", LoadOptions { native: true, ..f32 });
    let int8 = quantized_first_tokens_stay_close("int8", LoadOptions { int8: true, ..f32 });
    assert!(native <= q4_1, "the default's max logprob error {native} exceeds llama.cpp arithmetic's {q4_1}");
    assert!(int8 <= q4_1, "int8 max logprob error {int8} exceeds Q4_1's {q4_1}");
}

/// The largest first-token top-5 logprob error over the fixture prompts.
fn quantized_first_tokens_stay_close(what: &str, opts: LoadOptions) -> f32 {
    let fx = fixtures();
    let path = default_gguf();
    let (model, _) = vllm_models::load_gguf(&path, opts, &Device::Cpu).unwrap();
    let mut max_err = 0f32;
    for case in &fx.cases {
        let lp = next_token_logprobs(&*model, &case.prompt_ids);
        for &(id, want) in &case.first_top5 {
            let err = (lp[id as usize] - want).abs();
            max_err = max_err.max(err);
            assert!(err < 0.5, "{:?}: {what} logprob of {id}: {} vs reference {want}", case.text, lp[id as usize]);
        }
        if case.top2_gaps[0] > 0.5 {
            let ours = common::top_k(&lp, 1)[0].0;
            assert_eq!(ours, case.greedy_ids[0], "{:?}: {what} first token", case.text);
        }
    }
    eprintln!("{what} max first-token top-5 logprob error {max_err:.3}");
    max_err
}

#[test]
fn quantized_engine_runs_end_to_end() {
    let mut args = EngineArgs::new(default_gguf().to_string_lossy());
    args.quantization = Quantization::Gguf;
    args.kv_cache_memory = 64 << 20;
    let mut llm = LLM::new(args).unwrap();
    llm.set_use_tqdm(false);
    let out = llm.generate(["The capital of France is"], SamplingParams::greedy(8)).unwrap();
    assert_eq!(out[0].outputs[0].token_ids.len(), 8);
}

/// Greedy continuations (32 tokens) of the 16 fixture prompts under a quantization mode:
/// checks that every divergence from the float32 reference happens at a near tie of the
/// reference distribution (top-2 logprob gap under 1) and prints how many are identical.
fn greedy_identical(mode: Quantization) {
    let fx = fixtures();
    let mut args = EngineArgs::new(default_gguf().to_string_lossy());
    args.quantization = mode;
    args.kv_cache_memory = 64 << 20;
    let mut llm = LLM::new(args).unwrap();
    llm.set_use_tqdm(false);
    let prompts: Vec<Vec<u32>> = fx.cases.iter().map(|c| c.prompt_ids.clone()).collect();
    let outs = llm.generate(prompts, SamplingParams::greedy(32)).unwrap();
    let mut identical = 0;
    for (case, out) in fx.cases.iter().zip(&outs) {
        let got = &out.outputs[0].token_ids;
        match got.iter().zip(&case.greedy_ids).position(|(a, b)| a != b) {
            None => identical += 1,
            Some(i) => assert!(
                case.top2_gaps[i] < 1.0,
                "{:?}: {mode:?} diverged at token {i} where the reference's top-2 gap is {}",
                case.text,
                case.top2_gaps[i]
            ),
        }
    }
    eprintln!("{mode:?}: {identical}/{} greedy continuations identical to the reference", fx.cases.len());
}

/// Whole greedy continuations under `--quantization int8` and the default (Q4_1 on our kernel) part from the
/// float32 reference only at near ties. (How many stay identical is printed, not asserted:
/// which near ties flip changes with any rounding difference, e.g. a summation order.)
#[test]
fn quantized_greedy_diverges_only_at_near_ties() {
    greedy_identical(Quantization::Int8);
    greedy_identical(Quantization::Auto);
}
