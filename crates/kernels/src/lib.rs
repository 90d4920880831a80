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

pub mod check;
pub mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
pub mod half;
pub mod int8;
pub mod kquant;
pub mod lora;
mod ops;
pub mod q4;
pub mod sample;
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

/// Attention metadata for one step, shared by every layer: built once per step, and on a GPU
/// uploaded once per step ([`AttnMetadata::upload`]) so that no layer copies anything to the
/// device (which is also what lets a decode step be captured as a CUDA graph).
#[derive(Debug, Clone)]
pub struct AttnMetadata {
    /// Tokens per block.
    pub block_size: usize,
    /// Sequences in batch order; their query tokens are contiguous in that order.
    pub seqs: Vec<SeqAttn>,
    /// Cache slot of each query token (`block * block_size + offset`); negative slots
    /// (padding rows of a graph-shaped step) are not written.
    pub slot_mapping: Vec<i64>,
    device: Option<DeviceMeta>,
}

impl PartialEq for AttnMetadata {
    fn eq(&self, other: &Self) -> bool {
        self.block_size == other.block_size && self.seqs == other.seqs && self.slot_mapping == other.slot_mapping
    }
}

/// The per-row form of a step's metadata that the GPU kernels read: each query row's
/// sequence and visible context, and the block tables padded to one width.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelRows {
    /// Sequence index of each query row.
    pub row_seq: Vec<i32>,
    /// Tokens row r sees (causal: a prompt token at position p sees p + 1).
    pub row_ctx: Vec<i32>,
    /// `[num_seqs, max_blocks]` block tables, padded with block 0.
    pub tables: Vec<i32>,
    /// Width of `tables`.
    pub max_blocks: usize,
}

/// A step's metadata on the device (see [`AttnMetadata::upload`]).
#[derive(Debug, Clone)]
pub struct DeviceMeta {
    /// `slot_mapping` as i64.
    pub slots: candle_core::Tensor,
    /// [`KernelRows::row_seq`] as i32.
    pub row_seq: candle_core::Tensor,
    /// [`KernelRows::row_ctx`] as i32.
    pub row_ctx: candle_core::Tensor,
    /// [`KernelRows::tables`] as i32, `[num_seqs, max_blocks]`.
    pub tables: candle_core::Tensor,
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
        Self { block_size, seqs, slot_mapping, device: None }
    }

    /// Metadata with an explicit slot per token (negative: not written), for steps padded to
    /// a fixed shape.
    pub fn with_slots(block_size: usize, seqs: Vec<SeqAttn>, slot_mapping: Vec<i64>) -> Self {
        Self { block_size, seqs, slot_mapping, device: None }
    }

    /// Query tokens in the batch.
    pub fn num_tokens(&self) -> usize {
        self.slot_mapping.len()
    }

    /// The per-row form the GPU kernels read; tables padded to at least `min_blocks` wide.
    pub fn kernel_rows(&self, min_blocks: usize) -> KernelRows {
        let max_blocks = self.seqs.iter().map(|s| s.block_table.len()).max().unwrap_or(0).max(min_blocks).max(1);
        let mut r = KernelRows { row_seq: Vec::new(), row_ctx: Vec::new(), tables: Vec::new(), max_blocks };
        for (i, s) in self.seqs.iter().enumerate() {
            for q in 0..s.query_len {
                r.row_seq.push(i as i32);
                r.row_ctx.push((s.context_len - s.query_len + q + 1) as i32);
            }
            r.tables.extend(s.block_table.iter().map(|&b| b as i32));
            r.tables.extend(std::iter::repeat_n(0, max_blocks - s.block_table.len()));
        }
        r
    }

    /// Copies the step's metadata to `device` once, for every layer's kernels to read. Does
    /// nothing on the CPU, whose kernels read the host vectors.
    pub fn upload(&mut self, device: &candle_core::Device) -> candle_core::Result<()> {
        self.upload_padded(device, 1)
    }

    /// [`Self::upload`] with block tables at least `min_blocks` wide (fixed-shape steps).
    pub fn upload_padded(&mut self, device: &candle_core::Device, min_blocks: usize) -> candle_core::Result<()> {
        if device.is_cpu() {
            return Ok(());
        }
        let r = self.kernel_rows(min_blocks);
        let n = self.slot_mapping.len();
        self.device = Some(DeviceMeta {
            slots: candle_core::Tensor::from_slice(&self.slot_mapping, n, device)?,
            row_seq: candle_core::Tensor::from_slice(&r.row_seq, r.row_seq.len(), device)?,
            row_ctx: candle_core::Tensor::from_slice(&r.row_ctx, r.row_ctx.len(), device)?,
            tables: candle_core::Tensor::from_slice(&r.tables, (self.seqs.len(), r.max_blocks), device)?,
        });
        Ok(())
    }

    /// Uses tensors already on the device (a captured step's static buffers) as this step's
    /// device metadata.
    pub fn set_device(&mut self, meta: DeviceMeta) {
        self.device = Some(meta);
    }

    /// The metadata on the device, if uploaded.
    pub fn device(&self) -> Option<&DeviceMeta> {
        self.device.as_ref()
    }
}

/// Head sizes the CUDA paged-attention kernel is built for.
pub const CUDA_HEAD_SIZES: &[usize] = &[16, 32, 64, 80, 96, 128, 256];

/// Splits block copies into rounds that can each run in parallel (one GPU launch) with the
/// same result as running every copy in order: a copy starts a new round when it reads or
/// writes a block an earlier copy of the round wrote, or writes one it read.
pub fn copy_rounds(pairs: &[(u32, u32)]) -> Vec<Vec<(u32, u32)>> {
    let mut rounds: Vec<Vec<(u32, u32)>> = Vec::new();
    let (mut read, mut written) = (std::collections::HashSet::new(), std::collections::HashSet::new());
    for &(src, dst) in pairs {
        let conflict = written.contains(&src) || written.contains(&dst) || read.contains(&dst);
        if conflict || rounds.is_empty() {
            rounds.push(Vec::new());
            read.clear();
            written.clear();
        }
        read.insert(src);
        written.insert(dst);
        rounds.last_mut().expect("a round was pushed").push((src, dst));
    }
    rounds
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Running each round's copies "at once" (all reads before any write) equals running
    /// every copy in order.
    #[test]
    fn copy_rounds_keep_the_order_of_chained_copies() {
        let cases: &[&[(u32, u32)]] = &[
            &[(0, 1), (2, 3), (4, 5)],
            &[(0, 1), (1, 2)],
            &[(0, 1), (2, 0)],
            &[(3, 4), (3, 5), (4, 6), (6, 3), (7, 7)],
            &[],
        ];
        for pairs in cases {
            let mut seq: Vec<u32> = (0..8).map(|b| b * 10).collect();
            for &(s, d) in *pairs {
                seq[d as usize] = seq[s as usize];
            }
            let mut par: Vec<u32> = (0..8).map(|b| b * 10).collect();
            let rounds = copy_rounds(pairs);
            assert_eq!(rounds.concat(), pairs.to_vec());
            for round in rounds {
                let read: Vec<u32> = round.iter().map(|&(s, _)| par[s as usize]).collect();
                for (&(_, d), v) in round.iter().zip(read) {
                    par[d as usize] = v;
                }
            }
            assert_eq!(par, seq, "{pairs:?}");
        }
        assert_eq!(copy_rounds(&[(0, 1), (2, 3)]).len(), 1, "independent copies share one launch");
    }

    #[test]
    fn kernel_rows_pad_tables_and_give_each_row_its_causal_context() {
        let meta = AttnMetadata::new(
            4,
            vec![
                SeqAttn { query_len: 3, context_len: 5, block_table: vec![7, 2] },
                SeqAttn { query_len: 1, context_len: 9, block_table: vec![1, 4, 6] },
            ],
        );
        let r = meta.kernel_rows(4);
        assert_eq!(r.row_seq, [0, 0, 0, 1]);
        assert_eq!(r.row_ctx, [3, 4, 5, 9]);
        assert_eq!(r.max_blocks, 4);
        assert_eq!(r.tables, [7, 2, 0, 0, 1, 4, 6, 0]);
        assert_eq!(meta.slot_mapping, [7 * 4 + 2, 7 * 4 + 3, 2 * 4, 6 * 4]);
    }
}
