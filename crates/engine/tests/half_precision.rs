//! Half-precision checkpoints on the CPU: a Hugging Face folder of the default model with
//! every tensor stored in bfloat16 (or float16), as such checkpoints ship. `--dtype auto` (the
//! default) runs its matrices in their stored bits on the half-precision kernel with float32
//! activations and a KV cache in the checkpoint's dtype; `--dtype float32` and `--quantization
//! none` keep the dense float32 reference path.

mod common;

use candle_core::DType;
use vllm_engine::{EngineArgs, EngineConfig, ModelDtype, ModelFiles, Quantization, SamplingParams, LLM};
use vllm_models::MatrixFormat;

fn resolve(dir: &std::path::Path, f: impl FnOnce(&mut EngineArgs)) -> EngineConfig {
    let mut args = EngineArgs::new(dir.to_string_lossy());
    f(&mut args);
    EngineConfig::resolve(&args, ModelFiles::HfDir(dir.to_path_buf())).unwrap()
}

#[test]
fn a_bfloat16_folder_runs_in_its_own_precision_by_default() {
    let gguf = common::default_gguf();
    let bf16 = tempfile::tempdir().unwrap();
    common::write_hf_folder(&gguf, bf16.path(), DType::BF16);

    // The choices, before any weight is read.
    let auto = resolve(bf16.path(), |_| {});
    assert_eq!((auto.load.dtype, auto.load.matrices, auto.kv_dtype), (DType::F32, MatrixFormat::Native, DType::BF16));
    let text = auto.to_string();
    assert!(
        text.contains("matrices kept in bfloat16 on our half-precision kernel") && text.contains("BF16 100%"),
        "{text}"
    );
    for reference in [
        resolve(bf16.path(), |a| a.dtype = ModelDtype::Float32),
        resolve(bf16.path(), |a| a.quantization = Quantization::None),
    ] {
        assert_eq!(
            (reference.load.dtype, reference.load.matrices, reference.kv_dtype),
            (DType::F32, MatrixFormat::Dense, DType::F32)
        );
        assert!(reference.to_string().contains("in F32"), "{reference}");
    }
    let f32_cache = resolve(bf16.path(), |a| a.kv_cache_dtype = vllm_engine::KvCacheDtype::Float32);
    assert_eq!((f32_cache.load.matrices, f32_cache.kv_dtype), (MatrixFormat::Native, DType::F32));
    let f16 = tempfile::tempdir().unwrap();
    common::write_hf_folder(&gguf, f16.path(), DType::F16);
    let auto16 = resolve(f16.path(), |_| {});
    assert_eq!((auto16.load.matrices, auto16.kv_dtype), (MatrixFormat::Native, DType::F16));
    assert!(auto16.to_string().contains("kept in float16"), "{auto16}");

    // Both paths through the whole engine on the same folder: the same greedy first token
    // wherever the float32 reference's top-2 gap exceeds 0.5, and the same continuations up
    // to near ties (the half kernel sums in another order; its KV cache rounds to bfloat16).
    let fx = common::fixtures();
    let prompts: Vec<Vec<u32>> = fx.cases.iter().map(|c| c.prompt_ids.clone()).collect();
    let run = |dtype: ModelDtype| {
        let mut args = EngineArgs::new(bf16.path().to_string_lossy());
        args.dtype = dtype;
        args.kv_cache_memory = 256 << 20;
        let mut llm = LLM::new(args).unwrap();
        llm.set_use_tqdm(false);
        let params = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(16) };
        let outs = llm.generate(prompts.clone(), &params).unwrap();
        outs.into_iter().map(|o| o.outputs[0].token_ids.clone()).collect::<Vec<_>>()
    };
    let (ours, dense) = (run(ModelDtype::Auto), run(ModelDtype::Float32));
    let mut same = 0;
    for ((case, a), b) in fx.cases.iter().zip(&ours).zip(&dense) {
        if case.top2_gaps[0] > 0.5 {
            assert_eq!((a[0], b[0]), (case.greedy_ids[0], case.greedy_ids[0]), "{:?}: first token", case.text);
        }
        same += a.iter().zip(b).take_while(|(x, y)| x == y).count();
    }
    let total: usize = ours.iter().map(Vec::len).sum();
    eprintln!("half kernel vs dense float32 on the bf16 folder: {same} of {total} greedy tokens before any divergence");
    assert!(same * 4 >= total * 3, "{same} of {total} tokens agree before the paths diverge");
}
