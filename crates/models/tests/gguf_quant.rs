//! GGUF quantization types beyond the Q4_1 of the packaged SmolLM2: a synthetic Llama (2
//! layers, hidden 256 so every row is a whole number of 256-value K-quant super-blocks) is
//! written as GGUF once per type with candle's quantizers and `gguf_file::write`, read back by
//! `load_gguf` and run through the paged batched path (3 prompts prefilled together, then 8
//! decode steps of all three at once, the reference model's greedy tokens fed to both).
//!
//! Three comparisons per type:
//! - kept quantized (candle's quantized matmul) against the float32 model the weights were
//!   quantized from: the quantization error, which must shrink with more bits;
//! - dequantized at load against a float32 GGUF of the same dequantized values: reading the
//!   type back (block layout, offsets, names) must be exact;
//! - kept quantized against that float32 GGUF: only the quantized matmul's own rounding of
//!   activations remains.

use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use vllm_models::{load_gguf, CausalLM, LoadOptions, MatrixFormat};

mod common;
use common::{argmax, caches, step};

const HIDDEN: usize = 256;
const FFN: usize = 512;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;
const VOCAB: usize = 256;
const LAYERS: usize = 2;
const DECODE_STEPS: usize = 8;

/// Deterministic pseudo-normal values (xorshift + Box-Muller), so the test needs no fixture.
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 + 0.5) / (1u64 << 24) as f32
    }

    fn normal(&mut self, n: usize, mean: f32, std: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let (u, v) = (self.uniform(), self.uniform());
                mean + std * (-2.0 * u.ln()).sqrt() * (2.0 * std::f32::consts::PI * v).cos()
            })
            .collect()
    }
}

/// The synthetic checkpoint: GGUF tensor names and float32 values.
fn checkpoint() -> Vec<(String, Tensor)> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut t = |name: String, shape: &[usize], mean: f32, std: f32| {
        let n = shape.iter().product();
        (name, Tensor::from_vec(rng.normal(n, mean, std), shape, &Device::Cpu).unwrap())
    };
    let mut out = vec![
        t("token_embd.weight".into(), &[VOCAB, HIDDEN], 0.0, 1.0),
        t("output_norm.weight".into(), &[HIDDEN], 1.0, 0.1),
        t("output.weight".into(), &[VOCAB, HIDDEN], 0.0, 1.0 / (HIDDEN as f32).sqrt()),
    ];
    let w = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();
    for l in 0..LAYERS {
        let b = |n: &str| format!("blk.{l}.{n}.weight");
        out.extend([
            t(b("attn_norm"), &[HIDDEN], 1.0, 0.1),
            t(b("ffn_norm"), &[HIDDEN], 1.0, 0.1),
            t(b("attn_q"), &[HIDDEN, HIDDEN], 0.0, w(HIDDEN)),
            t(b("attn_k"), &[KV_HEADS * HEAD_DIM, HIDDEN], 0.0, w(HIDDEN)),
            t(b("attn_v"), &[KV_HEADS * HEAD_DIM, HIDDEN], 0.0, w(HIDDEN)),
            t(b("attn_output"), &[HIDDEN, HIDDEN], 0.0, w(HIDDEN)),
            t(b("ffn_gate"), &[FFN, HIDDEN], 0.0, w(HIDDEN)),
            t(b("ffn_up"), &[FFN, HIDDEN], 0.0, w(HIDDEN)),
            t(b("ffn_down"), &[HIDDEN, FFN], 0.0, w(FFN)),
        ]);
    }
    out
}

/// Writes a GGUF with `dtype_of(name)` for every matrix (vectors stay float32); returns the
/// quantized tensors as written.
fn write_gguf(path: &Path, weights: &[(String, Tensor)], dtype_of: impl Fn(&str) -> GgmlDType) -> Vec<QTensor> {
    use gguf_file::Value;
    let md: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.block_count", Value::U32(LAYERS as u32)),
        ("llama.embedding_length", Value::U32(HIDDEN as u32)),
        ("llama.feed_forward_length", Value::U32(FFN as u32)),
        ("llama.attention.head_count", Value::U32(HEADS as u32)),
        ("llama.attention.head_count_kv", Value::U32(KV_HEADS as u32)),
        ("llama.rope.dimension_count", Value::U32(HEAD_DIM as u32)),
        ("llama.context_length", Value::U32(256)),
        ("llama.vocab_size", Value::U32(VOCAB as u32)),
        ("llama.rope.freq_base", Value::F32(10_000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
    ];
    let qs: Vec<QTensor> = weights
        .iter()
        .map(|(name, t)| {
            let dtype = if t.rank() == 2 { dtype_of(name) } else { GgmlDType::F32 };
            QTensor::quantize(t, dtype).unwrap()
        })
        .collect();
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let tensors: Vec<(&str, &QTensor)> = weights.iter().map(|(n, _)| n.as_str()).zip(&qs).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md_refs, &tensors).unwrap();
    qs
}

fn load(path: &Path, keep_quantized: bool) -> Box<dyn CausalLM> {
    let matrices = if keep_quantized { MatrixFormat::CandleQuantized } else { MatrixFormat::Dense };
    load_with(path, LoadOptions { matrices, ..LoadOptions::float32() })
}

fn load_with(path: &Path, opts: LoadOptions) -> Box<dyn CausalLM> {
    load_gguf(path, opts, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display())).0
}

const PROMPTS: [&[u32]; 3] =
    [&[1, 17, 42, 99, 200, 7, 7, 31], &[5, 250, 3], &[128, 64, 32, 16, 8, 4, 2, 1, 0, 255, 77]];

/// Logits of every prompt row (all prompts in one step), then of `DECODE_STEPS` decode steps
/// of all sequences at once, feeding `tokens[i][k]` to sequence `i` at step `k`.
fn run(model: &dyn CausalLM, tokens: &[Vec<u32>]) -> Vec<Vec<f32>> {
    let cache = caches(model, 64);
    let mut rows = step(model, &cache, &PROMPTS.iter().map(|p| (p.to_vec(), 0)).collect::<Vec<_>>(), true);
    for k in 0..DECODE_STEPS {
        let seqs: Vec<(Vec<u32>, usize)> = PROMPTS.iter().zip(tokens).map(|(p, t)| (vec![t[k]], p.len() + k)).collect();
        rows.extend(step(model, &cache, &seqs, false));
    }
    rows
}

/// The reference model's greedy continuations (the tokens both models are fed).
fn greedy(model: &dyn CausalLM) -> Vec<Vec<u32>> {
    let cache = caches(model, 64);
    let last = step(model, &cache, &PROMPTS.iter().map(|p| (p.to_vec(), 0)).collect::<Vec<_>>(), false);
    let mut out: Vec<Vec<u32>> = last.iter().map(|r| vec![argmax(r)]).collect();
    for k in 0..DECODE_STEPS - 1 {
        let seqs: Vec<(Vec<u32>, usize)> = PROMPTS.iter().zip(&out).map(|(p, o)| (vec![o[k]], p.len() + k)).collect();
        for (o, r) in out.iter_mut().zip(step(model, &cache, &seqs, false)) {
            o.push(argmax(&r));
        }
    }
    out
}

/// How far one run's logits are from another's.
struct Diff {
    /// Largest error relative to its reference row's largest absolute logit.
    max: f32,
    /// Root-mean-square error over the root-mean-square reference logit (all rows).
    rms: f32,
    /// Share of rows whose argmax agrees.
    top1: f32,
}

fn compare(got: &[Vec<f32>], want: &[Vec<f32>]) -> Diff {
    assert_eq!(got.len(), want.len());
    let (mut max, mut err2, mut ref2, mut agree) = (0f32, 0f64, 0f64, 0);
    for (g, w) in got.iter().zip(want) {
        let scale = w.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        max = max.max(g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale);
        err2 += g.iter().zip(w).map(|(a, b)| f64::from(a - b).powi(2)).sum::<f64>();
        ref2 += w.iter().map(|b| f64::from(*b).powi(2)).sum::<f64>();
        agree += usize::from(argmax(g) == argmax(w));
    }
    Diff { max, rms: (err2 / ref2).sqrt() as f32, top1: agree as f32 / got.len() as f32 }
}

/// Writes, reads back and checks one quantization scheme (`dtype_of` per matrix name).
/// Returns the kept-quantized model's distance from the float32 weights it came from.
fn check(label: &str, dtype_of: impl Fn(&str) -> GgmlDType, reference: &[Vec<f32>], tokens: &[Vec<u32>]) -> Diff {
    let dir = tempfile::tempdir().unwrap();
    let weights = checkpoint();
    let quant_path = dir.path().join("quant.gguf");
    let qs = write_gguf(&quant_path, &weights, dtype_of);

    // The file says what was written.
    let mut f = std::fs::File::open(&quant_path).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    for ((name, _), q) in weights.iter().zip(&qs) {
        assert_eq!(content.tensor_infos[name].ggml_dtype, q.dtype(), "{label}: {name}");
    }

    // A float32 GGUF of exactly the values the quantized file decodes to.
    let dequantized: Vec<(String, Tensor)> =
        weights.iter().zip(&qs).map(|((n, _), q)| (n.clone(), q.dequantize(&Device::Cpu).unwrap())).collect();
    let f32_path = dir.path().join("dequantized.gguf");
    write_gguf(&f32_path, &dequantized, |_| GgmlDType::F32);
    let exact = run(load(&f32_path, false).as_ref(), tokens);

    let read = compare(&run(load(&quant_path, false).as_ref(), tokens), &exact);
    assert!(read.max < 1e-5, "{label}: dequantized at load differs from the float32 copy by {:e}", read.max);

    let kept = run(load(&quant_path, true).as_ref(), tokens);
    let matmul = compare(&kept, &exact);
    let quant = compare(&kept, reference);
    // The default (`--quantization auto`): our kernels on the file's own blocks (Q4_0, Q4_1 on
    // the 4-bit kernel, Q4_K, Q5_K, Q6_K on the k-quant kernel, Q8_0 on the int8 kernel; the
    // rest requantized to int8).
    let ours = compare(
        &run(
            load_with(&quant_path, LoadOptions { matrices: MatrixFormat::Native, ..LoadOptions::float32() }).as_ref(),
            tokens,
        ),
        &exact,
    );
    println!(
        "{label:>6}: ours vs dequantized weights: rms {:.2e} (candle's quantized matmul {:.2e})",
        ours.rms, matmul.rms
    );
    assert!(ours.rms < 0.03, "{label}: our kernels are {} (rms) from the dequantized weights", ours.rms);
    println!(
        "{label:>6}: vs float32 weights: rms {:.2e}, max {:.2e}, top-1 {:>3.0}% | quantized matmul vs \
         dequantized weights: rms {:.2e} | read back: max {:.1e}",
        quant.rms,
        quant.max,
        quant.top1 * 100.0,
        matmul.rms,
        read.max
    );
    assert!(matmul.rms < 0.03, "{label}: quantized matmul is {} (rms) from the dequantized weights", matmul.rms);
    quant
}

#[test]
fn quantization_types_load_and_run() {
    let dir = tempfile::tempdir().unwrap();
    let f32_path = dir.path().join("f32.gguf");
    write_gguf(&f32_path, &checkpoint(), |_| GgmlDType::F32);
    let model = load(&f32_path, false);
    let tokens = greedy(model.as_ref());
    let reference = run(model.as_ref(), &tokens);

    let single = |dtype: GgmlDType| move |_: &str| dtype;
    let q8_0 = check("Q8_0", single(GgmlDType::Q8_0), &reference, &tokens);
    let q6_k = check("Q6_K", single(GgmlDType::Q6K), &reference, &tokens);
    let q5_k = check("Q5_K", single(GgmlDType::Q5K), &reference, &tokens);
    let q4_k = check("Q4_K", single(GgmlDType::Q4K), &reference, &tokens);
    let q4_0 = check("Q4_0", single(GgmlDType::Q4_0), &reference, &tokens);
    let q4_1 = check("Q4_1", single(GgmlDType::Q4_1), &reference, &tokens);
    // llama.cpp's Q4_K_M mix: Q6_K for the output, V and down projections, Q4_K elsewhere.
    let q4_k_m = check(
        "Q4_K_M",
        |name: &str| {
            if name == "output.weight" || name.ends_with("attn_v.weight") || name.ends_with("ffn_down.weight") {
                GgmlDType::Q6K
            } else {
                GgmlDType::Q4K
            }
        },
        &reference,
        &tokens,
    );

    // More bits, less error. (Measured: rms 2.2% for Q8_0, of which 1.7% is the quantized
    // matmul rounding activations to 8 bits; 4.8% Q6_K, 9.5% Q5_K, 15% Q4_K_M, 18-22% for the
    // 4-bit types. This random model has no outliers to protect, so these are upper figures.)
    let order = [("Q8_0", &q8_0), ("Q6_K", &q6_k), ("Q5_K", &q5_k), ("Q4_K_M", &q4_k_m), ("Q4_K", &q4_k)];
    for pair in order.windows(2) {
        let ((a, da), (b, db)) = (pair[0], pair[1]);
        assert!(da.rms < db.rms, "{a} (rms {}) should be closer to float32 than {b} (rms {})", da.rms, db.rms);
    }
    for (label, d, bound) in [
        ("Q8_0", &q8_0, 0.04),
        ("Q6_K", &q6_k, 0.08),
        ("Q5_K", &q5_k, 0.15),
        ("Q4_K_M", &q4_k_m, 0.3),
        ("Q4_K", &q4_k, 0.3),
        ("Q4_0", &q4_0, 0.3),
        ("Q4_1", &q4_1, 0.3),
    ] {
        assert!(d.rms < bound, "{label}: rms logit error {} above {bound}", d.rms);
    }
    assert!(q8_0.top1 >= 0.9, "Q8_0 top-1 agreement {}", q8_0.top1);
}
