//! The model runner: owns the model and its paged KV cache, turns a `SchedulerOutput` into
//! one flattened batch and returns logits for the rows that sample.

use std::ops::Range;

use candle_core::{DType, Device, Tensor};
use vllm_kernels::{AttnMetadata, KvCache, SeqAttn};
use vllm_models::{CausalLM, StepInput};
use vllm_scheduler::SchedulerOutput;

use crate::Result;

/// Runs the model over the paged cache.
pub struct ModelRunner {
    model: Box<dyn CausalLM>,
    caches: Vec<KvCache>,
    block_size: usize,
    device: Device,
}

impl ModelRunner {
    /// Allocates `num_blocks` blocks of cache holding `kv_dtype` values for every layer.
    pub fn new(
        model: Box<dyn CausalLM>,
        num_blocks: usize,
        block_size: usize,
        kv_dtype: DType,
        device: Device,
    ) -> Result<Self> {
        let shape = model.attn_shape();
        let caches = (0..model.num_layers())
            .map(|_| KvCache::with_dtype(num_blocks, block_size, shape, kv_dtype, &device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { model, caches, block_size, device })
    }

    /// The model.
    pub fn model(&self) -> &dyn CausalLM {
        &*self.model
    }

    /// Runs one step; returns `[rows, vocab]` f32 logits flattened and, per scheduled
    /// sequence, its rows: every token's with `all_logits`, else the last token's with
    /// `sample`, else none. `between_layers` runs before each decoder layer but the first.
    pub fn execute(
        &self,
        out: &SchedulerOutput,
        between_layers: Option<&dyn Fn(usize)>,
    ) -> Result<(Logits, Vec<Range<usize>>)> {
        if !out.block_copies.is_empty() {
            let pairs: Vec<(u32, u32)> = out.block_copies.iter().map(|c| (c.src, c.dst)).collect();
            for cache in &self.caches {
                cache.copy_blocks(&pairs)?;
            }
        }
        let n: usize = out.seqs.iter().map(|s| s.token_ids.len()).sum();
        let mut ids = Vec::with_capacity(n);
        let mut positions = Vec::with_capacity(n);
        let mut rows = Vec::new();
        let mut seqs = Vec::with_capacity(out.seqs.len());
        let mut ranges = Vec::with_capacity(out.seqs.len());
        for s in &out.seqs {
            let len = s.token_ids.len();
            let first_row = rows.len();
            if s.all_logits {
                rows.extend((ids.len()..ids.len() + len).map(|r| r as u32));
            } else if s.sample {
                rows.push((ids.len() + len - 1) as u32);
            }
            ranges.push(first_row..rows.len());
            ids.extend_from_slice(&s.token_ids);
            positions.extend((s.start_pos..s.start_pos + len).map(|p| p as u32));
            seqs.push(SeqAttn { query_len: len, context_len: s.start_pos + len, block_table: s.block_ids.clone() });
        }
        if rows.is_empty() {
            // Still write the K/V of prompt chunks, but no logits are needed: compute one row
            // anyway (cheap) to keep a single code path.
            rows.push((ids.len() - 1) as u32);
        }
        // Built once for the step; on a GPU uploaded once, and every layer reads that copy.
        let mut meta = AttnMetadata::new(self.block_size, seqs);
        meta.upload(&self.device)?;
        let num_rows = rows.len();
        let input = StepInput {
            input_ids: Tensor::from_vec(ids, n, &self.device)?,
            positions: Tensor::from_vec(positions, n, &self.device)?,
            logits_indices: Tensor::from_vec(rows, num_rows, &self.device)?,
            attn: &meta,
            between_layers,
        };
        let logits = self.model.forward(&input, &self.caches)?.to_dtype(DType::F32)?;
        Ok((Logits(logits), ranges))
    }
}

/// A step's logits, `[rows, vocab]` f32, where the model computed them (the GPU's stay there
/// unless the sampler needs them on the host).
pub struct Logits(pub Tensor);

impl Logits {
    /// Every row on the host, flattened.
    pub fn to_host(&self) -> Result<Vec<f32>> {
        Ok(self.0.flatten_all()?.to_vec1::<f32>()?)
    }
}

/// The largest step the engine will run, run once before the KV cache is sized so that its
/// activation peak can be measured (vLLM's profile run).
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CPU sizes its cache by bytes
pub(crate) struct ProfileStep {
    /// Prompt tokens in the step (`max_num_batched_tokens`, at most `max_model_len`).
    pub tokens: usize,
    /// Rows of logits it computes (`max_num_seqs`: a full decode batch).
    pub rows: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// The KV cache's type.
    pub kv_dtype: DType,
}

/// Runs `step` through `model` over a throwaway cache just large enough for it.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn profile_step(model: &dyn CausalLM, step: ProfileStep, device: &Device) -> Result<()> {
    let n = step.tokens.max(1);
    let blocks = n.div_ceil(step.block_size);
    let caches = (0..model.num_layers())
        .map(|_| KvCache::with_dtype(blocks, step.block_size, model.attn_shape(), step.kv_dtype, device))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let mut meta = AttnMetadata::new(
        step.block_size,
        vec![SeqAttn { query_len: n, context_len: n, block_table: (0..blocks as u32).collect() }],
    );
    meta.upload(device)?;
    let rows = step.rows.clamp(1, n);
    let input = StepInput {
        input_ids: Tensor::zeros(n, DType::U32, device)?,
        positions: Tensor::arange(0u32, n as u32, device)?,
        logits_indices: Tensor::arange((n - rows) as u32, n as u32, device)?,
        attn: &meta,
        between_layers: None,
    };
    let logits = model.forward(&input, &caches)?;
    // Wait for the device: the peak is read after the step has run.
    logits.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    Ok(())
}
