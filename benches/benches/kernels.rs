//! Micro-benchmarks of the hot kernels, at the SmolLM2-135M shapes (hidden 576, 9 query heads,
//! 3 KV heads, head size 64, MLP 1536, vocabulary 49152) and batch 1 / 16 / 64:
//! - paged attention for decode over 256-token contexts;
//! - the MLP up-projection as a float32 matmul, our int8 kernel (every matmul under `--quantization int8`),
//!   and candle's Q4_1 / Q8_0 quantized matmul (what `--quantization gguf` runs);
//! - the sampler over the whole batch (top-p + top-k at temperature 1, and greedy).
//!
//! Run: `cargo bench -p vllm-benches` (add `-- attention` to filter).

#![allow(missing_docs)]

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use vllm_kernels::int8::Int8Matrix;
use vllm_kernels::q4::{Q4Format, Q4Matrix};
use vllm_kernels::{AttnMetadata, AttnShape, KvCache, SeqAttn};
use vllm_sampler::{sample_batch, SamplingParams, SeqSampler};

const BATCHES: [usize; 3] = [1, 16, 64];

fn attention(c: &mut Criterion) {
    let dev = Device::Cpu;
    let shape = AttnShape { num_heads: 9, num_kv_heads: 3, head_dim: 64 };
    let (bs, ctx) = (16, 256);
    let mut g = c.benchmark_group("paged_attention_decode");
    for &b in &BATCHES {
        let blocks_per_seq = ctx / bs;
        let cache = KvCache::new(b * blocks_per_seq, bs, shape, &dev).unwrap();
        let seqs: Vec<SeqAttn> = (0..b)
            .map(|s| SeqAttn {
                query_len: 1,
                context_len: ctx,
                block_table: (0..blocks_per_seq as u32).map(|i| (s * blocks_per_seq) as u32 + i).collect(),
            })
            .collect();
        let meta = AttnMetadata::new(bs, seqs);
        let q = Tensor::randn(0f32, 1.0, (b, 9, 64), &dev).unwrap();
        let kv = Tensor::randn(0f32, 1.0, (b, 3, 64), &dev).unwrap();
        g.throughput(Throughput::Elements(b as u64));
        g.bench_with_input(BenchmarkId::from_parameter(b), &b, |bench, _| {
            bench.iter(|| {
                cache.write(&kv, &kv, &meta).unwrap();
                cache.attend(&q, &meta, 0.125).unwrap()
            })
        });
    }
    g.finish();
}

fn matmul(c: &mut Criterion) {
    let dev = Device::Cpu;
    let (k, n) = (576, 1536);
    let w = Tensor::randn(0f32, 0.05, (n, k), &dev).unwrap();
    let w_t = w.t().unwrap().contiguous().unwrap();
    let mut g = c.benchmark_group("mlp_up_576x1536");
    for &b in &BATCHES {
        let x = Tensor::randn(0f32, 1.0, (b, k), &dev).unwrap();
        g.throughput(Throughput::Elements(b as u64));
        g.bench_with_input(BenchmarkId::new("f32", b), &b, |bench, _| bench.iter(|| x.matmul(&w_t).unwrap()));
        let w_host: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
        let int8 = Int8Matrix::from_f32(&w_host, n, k).unwrap();
        let x_host: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        g.bench_with_input(BenchmarkId::new("int8", b), &b, |bench, _| bench.iter(|| int8.matmul(&x_host, b)));
        // Our 4-bit kernel on the GGUF blocks (the default for Q4_0 / Q4_1 files).
        for (name, format) in [("ours_q4_1", Q4Format::Q4_1), ("ours_q4_0", Q4Format::Q4_0)] {
            let q4 = Q4Matrix::quantize(format, &w_host, n, k).unwrap();
            g.bench_with_input(BenchmarkId::new(name, b), &b, |bench, _| bench.iter(|| q4.matmul(&x_host, b)));
        }
        for (name, dt) in [("q4_1", GgmlDType::Q4_1), ("q8_0", GgmlDType::Q8_0)] {
            let qm = QMatMul::from_qtensor(QTensor::quantize(&w, dt).unwrap()).unwrap();
            g.bench_with_input(BenchmarkId::new(name, b), &b, |bench, _| bench.iter(|| qm.forward(&x).unwrap()));
        }
    }
    g.finish();
}

fn sampler(c: &mut Criterion) {
    let vocab = 49152;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut g = c.benchmark_group("sampler_49k_vocab");
    for &b in &BATCHES {
        // Shaped like a language model's: a broad bulk (std 1.5) and, per row, 20 plausible
        // tokens 12-16 above it holding most of the probability.
        let mut logits: Vec<f32> = (0..b * vocab)
            .map(|_| (rng.random::<f32>() + rng.random::<f32>() + rng.random::<f32>() - 1.5) * 3.0)
            .collect();
        for row in logits.chunks_mut(vocab) {
            for _ in 0..20 {
                row[rng.random_range(0..vocab)] = rng.random_range(12.0..16.0);
            }
        }
        let penalties = SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
            presence_penalty: 0.5,
            frequency_penalty: 0.5,
            repetition_penalty: 1.1,
            ..Default::default()
        };
        for (name, params) in [
            ("greedy", SamplingParams::greedy(16)),
            ("top_p_top_k", SamplingParams { temperature: 1.0, top_p: 0.9, top_k: 50, ..Default::default() }),
            ("top_p_penalties", penalties),
        ] {
            // Each sequence has a 512-token prompt (repetition penalty) and draws from logits
            // shaped like a model's: a few likely tokens, a long tail.
            let prompt: Vec<u32> = (0..512).map(|_| rng.random_range(0..vocab as u32)).collect();
            let mut seqs: Vec<SeqSampler> = (0..b)
                .map(|i| SeqSampler::new(params.clone(), i as u64).with_context(&prompt, vec![0], vec![]))
                .collect();
            // 32 tokens of history (what the penalties count), then every iteration starts
            // from that state.
            for _ in 0..32 {
                let mut refs: Vec<&mut SeqSampler> = seqs.iter_mut().collect();
                sample_batch(&mut logits.clone(), vocab, &mut refs);
            }
            g.throughput(Throughput::Elements(b as u64));
            g.bench_with_input(BenchmarkId::new(name, b), &b, |bench, _| {
                bench.iter_batched_ref(
                    || (logits.clone(), seqs.clone()),
                    |(l, seqs)| {
                        let mut refs: Vec<&mut SeqSampler> = seqs.iter_mut().collect();
                        sample_batch(l, vocab, &mut refs)
                    },
                    criterion::BatchSize::LargeInput,
                )
            });
        }
    }
    g.finish();
}

criterion_group!(benches, attention, matmul, sampler);
criterion_main!(benches);
