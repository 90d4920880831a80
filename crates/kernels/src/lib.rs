//! # vllm-kernels
//!
//! Attention and paged KV-cache operations for vllm-rs.
//!
//! The cache of one layer is a pair of tensors: values laid out
//! `[num_blocks, block_size, num_kv_heads, head_dim]`, keys `[num_blocks, num_kv_heads,
//! head_dim, block_size]` (each block transposed, so a block of keys is scored with
//! broadcast FMAs, like vLLM's key-cache layout). Each step, the new tokens' keys and
//! values are written into their slots ([`KvCache::write`]), then every query token of the
//! flattened batch attends through its sequence's block table ([`KvCache::attend`]). Prompt
//! chunks and single decode tokens mix freely in one call.
//!
//! | feature | what it adds |
//! |---------|--------------|
//! | (none)  | CPU kernels in Rust, parallel over tokens and heads with rayon |
//!
//! The CPU kernels over plain slices live in [`cpu`] and are unit-tested against a naive
//! attention. Devices without a kernel return a clear error from the candle op.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use vllm_kernels::{AttnMetadata, AttnShape, KvCache, SeqAttn};
//!
//! let shape = AttnShape { num_heads: 2, num_kv_heads: 1, head_dim: 4 };
//! let cache = KvCache::new(4, 2, shape, &Device::Cpu).unwrap();
//! // One sequence, a 3-token prompt in blocks [1, 3].
//! let meta = AttnMetadata::new(2, vec![SeqAttn { query_len: 3, context_len: 3, block_table: vec![1, 3] }]);
//! let k = Tensor::ones((3, 1, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
//! cache.write(&k, &k, &meta).unwrap();
//! let q = Tensor::ones((3, 2, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
//! let out = cache.attend(&q, &meta, 0.5).unwrap();
//! assert_eq!(out.dims(), &[3, 2, 4]);
//! ```

pub mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
pub mod int8;
pub mod kquant;
mod ops;
pub mod q4;
pub mod team;

pub use ops::{gelu_erf, KvCache};

/// Which hand-written kernels the quantized matmuls run on this machine: `"vnni"`
/// (AVX-512 VNNI), `"avx2"` or `"portable"` (the best the CPU has, unless the
/// `VLLM_CPU_KERNEL` environment variable asks for a lower one).
pub fn cpu_kernel_path() -> &'static str {
    match int8::kernel_path() {
        int8::KernelPath::Vnni => "vnni",
        int8::KernelPath::Avx2 => "avx2",
        int8::KernelPath::Portable => "portable",
    }
}

/// Head layout of an attention layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (divides `num_heads`; fewer means grouped-query attention).
    pub num_kv_heads: usize,
    /// Size of each head.
    pub head_dim: usize,
}

/// How a layer attends: the softmax scale, and the variants some architectures use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnParams {
    /// Multiplies the query-key products (usually `1 / sqrt(head_dim)`).
    pub scale: f32,
    /// Each query sees only the last `w` keys, itself included (Mistral, Gemma 2).
    pub sliding_window: Option<usize>,
    /// Scores become `cap * tanh(score / cap)` before the softmax (Gemma 2).
    pub softcap: Option<f32>,
}

impl AttnParams {
    /// Plain causal attention with a scale.
    pub fn new(scale: f32) -> Self {
        Self { scale, sliding_window: None, softcap: None }
    }
}

/// One sequence's part of a flattened batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqAttn {
    /// Query tokens of this sequence in the batch (a prompt chunk, or 1 for decode).
    pub query_len: usize,
    /// Tokens in the cache after this step's write (= position of the last query + 1).
    pub context_len: usize,
    /// Block ids holding the sequence's tokens, in order.
    pub block_table: Vec<u32>,
}

/// Attention metadata for one step, shared by every layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttnMetadata {
    /// Tokens per block.
    pub block_size: usize,
    /// Sequences in batch order; their query tokens are contiguous in that order.
    pub seqs: Vec<SeqAttn>,
    /// Cache slot of each query token (`block * block_size + offset`).
    pub slot_mapping: Vec<i64>,
}

impl AttnMetadata {
    /// Builds the metadata, deriving each token's slot from the block tables.
    pub fn new(block_size: usize, seqs: Vec<SeqAttn>) -> Self {
        let mut slot_mapping = Vec::new();
        for s in &seqs {
            for pos in s.context_len - s.query_len..s.context_len {
                let block = s.block_table[pos / block_size] as i64;
                slot_mapping.push(block * block_size as i64 + (pos % block_size) as i64);
            }
        }
        Self { block_size, seqs, slot_mapping }
    }

    /// Query tokens in the batch.
    pub fn num_tokens(&self) -> usize {
        self.slot_mapping.len()
    }
}
