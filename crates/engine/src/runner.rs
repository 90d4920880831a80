//! The model runner: owns the model and its paged KV cache, turns a `SchedulerOutput` into
//! one flattened batch and returns logits for the rows that sample.

use std::ops::Range;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use vllm_kernels::{AttnMetadata, KvCache, SeqAttn};
use vllm_models::lora::StepAdapters;
use vllm_models::{CausalLM, StepInput};
use vllm_scheduler::SchedulerOutput;

use crate::Result;

/// Runs the model over the paged cache.
pub struct ModelRunner {
    model: Box<dyn CausalLM>,
    caches: Vec<KvCache>,
    block_size: usize,
    device: Device,
    graphs: Option<DecodeGraphs>,
}

/// Decode steps in fixed shapes (vLLM's CUDA graphs): a step whose sequences each feed one
/// token, with no context past `max_len`, is padded to the next batch-size bucket (padding
/// rows write no cache slot) and its block tables to `max_len / block_size` columns, so every
/// step of a bucket has the same shapes and the same device buffers. On a GPU each bucket's
/// step is captured once as a CUDA graph and replayed; on the CPU the same padded steps run
/// eagerly (the shape path is tested here without a GPU).
pub(crate) struct DecodeGraphs {
    /// Longest context a fixed-shape step covers (`max_seq_len_to_capture`).
    pub max_len: usize,
    /// The largest bucket (`max_num_seqs`, rounded up to a bucket).
    pub max_batch: usize,
    /// Steps run in fixed shapes so far.
    steps: std::sync::atomic::AtomicU64,
    #[cfg(feature = "cuda")]
    pub(crate) captured: std::sync::Mutex<crate::cuda::Captures>,
}

/// The batch sizes fixed-shape steps are padded to (vLLM's capture sizes): 1, 2, 4, then every
/// multiple of 8.
pub(crate) fn graph_bucket(n: usize) -> usize {
    match n {
        0..=1 => 1,
        2 => 2,
        3..=4 => 4,
        _ => n.div_ceil(8) * 8,
    }
}

impl DecodeGraphs {
    pub(crate) fn new(max_len: usize, max_num_seqs: usize) -> Self {
        Self {
            max_len,
            max_batch: graph_bucket(max_num_seqs),
            steps: Default::default(),
            #[cfg(feature = "cuda")]
            captured: Default::default(),
        }
    }
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
        Ok(Self { model, caches, block_size, device, graphs: None })
    }

    /// Runs decode steps in fixed shapes (see [`DecodeGraphs`]).
    pub(crate) fn with_graphs(mut self, graphs: DecodeGraphs) -> Self {
        self.graphs = Some(graphs);
        self
    }

    /// The bucket a step runs in, if it is a decode step a fixed shape covers.
    fn graph_shape(&self, out: &SchedulerOutput, between_layers: bool) -> Option<usize> {
        let g = self.graphs.as_ref()?;
        let width = g.max_len.div_ceil(self.block_size);
        let fits = !between_layers
            && !out.seqs.is_empty()
            && out.seqs.len() <= g.max_batch
            && out.seqs.iter().all(|s| {
                s.token_ids.len() == 1
                    && s.lora.is_none()
                    && s.sample
                    && !s.all_logits
                    && s.start_pos < g.max_len
                    && s.block_ids.len() <= width
            });
        fits.then(|| graph_bucket(out.seqs.len()))
    }

    /// A decode step padded to `bucket` rows and `max_len / block_size` table columns.
    fn execute_fixed_shape(&self, out: &SchedulerOutput, bucket: usize) -> Result<(Logits, Vec<Range<usize>>)> {
        let g = self.graphs.as_ref().ok_or(crate::Error::Internal("fixed-shape step without graphs"))?;
        g.steps.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let n = out.seqs.len();
        let mut ids = vec![0u32; bucket];
        let mut positions = vec![0u32; bucket];
        let mut slots = vec![-1i64; bucket];
        let mut seqs = Vec::with_capacity(bucket);
        for (i, s) in out.seqs.iter().enumerate() {
            ids[i] = s.token_ids[0];
            positions[i] = s.start_pos as u32;
            let block = s.block_ids[s.start_pos / self.block_size] as i64;
            slots[i] = block * self.block_size as i64 + (s.start_pos % self.block_size) as i64;
            seqs.push(SeqAttn { query_len: 1, context_len: s.start_pos + 1, block_table: s.block_ids.clone() });
        }
        // Padding rows: one token of context in block 0, never written (slot -1).
        seqs.resize(bucket, SeqAttn { query_len: 1, context_len: 1, block_table: vec![0] });
        let meta = AttnMetadata::with_slots(self.block_size, seqs, slots);
        let table_width = g.max_len.div_ceil(self.block_size);
        let ranges = (0..n).map(|i| i..i + 1).collect();
        #[cfg(feature = "cuda")]
        if self.device.is_cuda() {
            let logits = crate::cuda::run_decode_graph(self, g, &meta, &ids, &positions, bucket, table_width)?;
            return Ok((Logits(logits.narrow(0, 0, n)?), ranges));
        }
        let logits = self.forward_fixed_shape(meta, &ids, &positions, bucket, table_width)?;
        Ok((Logits(logits.narrow(0, 0, n)?), ranges))
    }

    /// A fixed-shape step run eagerly: `[bucket, vocab]` f32 logits.
    pub(crate) fn forward_fixed_shape(
        &self,
        mut meta: AttnMetadata,
        ids: &[u32],
        positions: &[u32],
        bucket: usize,
        table_width: usize,
    ) -> Result<Tensor> {
        meta.upload_padded(&self.device, table_width)?;
        let input = StepInput {
            input_ids: Tensor::from_slice(ids, bucket, &self.device)?,
            positions: Tensor::from_slice(positions, bucket, &self.device)?,
            logits_indices: Tensor::arange(0u32, bucket as u32, &self.device)?,
            attn: &meta,
            between_layers: None,
        };
        Ok(self.model.forward(&input, &self.caches)?.to_dtype(DType::F32)?)
    }

    /// The device the model runs on.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn device(&self) -> &Device {
        &self.device
    }

    /// Tokens per KV block.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn block_size(&self) -> usize {
        self.block_size
    }

    /// Decode steps run in fixed shapes (CUDA graphs on a GPU) so far.
    pub(crate) fn fixed_shape_steps(&self) -> u64 {
        self.graphs.as_ref().map_or(0, |g| g.steps.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// The caches (one per layer).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn caches(&self) -> &[KvCache] {
        &self.caches
    }

    /// The model.
    pub fn model(&self) -> &dyn CausalLM {
        &*self.model
    }

    /// Copies blocks in every layer's cache (copy-on-write of shared partial blocks).
    pub(crate) fn copy_blocks(&self, copies: &[vllm_scheduler::BlockCopy]) -> Result<()> {
        if !copies.is_empty() {
            let pairs: Vec<(u32, u32)> = copies.iter().map(|c| (c.src, c.dst)).collect();
            for cache in &self.caches {
                cache.copy_blocks(&pairs)?;
            }
        }
        Ok(())
    }

    /// Runs one step; returns `[rows, vocab]` f32 logits flattened and, per scheduled
    /// sequence, its rows: every token's with `all_logits`, else the last token's with
    /// `sample`, else none. `between_layers` runs before each decoder layer but the first.
    pub fn execute(
        &self,
        out: &SchedulerOutput,
        between_layers: Option<&dyn Fn(usize)>,
    ) -> Result<(Logits, Vec<Range<usize>>)> {
        self.copy_blocks(&out.block_copies)?;
        if let Some(bucket) = self.graph_shape(out, between_layers.is_some()) {
            return self.execute_fixed_shape(out, bucket);
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
            if s.all_logits || s.num_draft > 0 {
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
        let adapters = step_adapters(out, &ranges, &rows);
        let num_rows = rows.len();
        let input = StepInput {
            input_ids: Tensor::from_vec(ids, n, &self.device)?,
            positions: Tensor::from_vec(positions, n, &self.device)?,
            logits_indices: Tensor::from_vec(rows, num_rows, &self.device)?,
            attn: &meta,
            between_layers,
        };
        let logits = vllm_models::lora::with_step_adapters(adapters, || self.model.forward(&input, &self.caches))?;
        Ok((Logits(logits.to_dtype(DType::F32)?), ranges))
    }
}

/// Which LoRA adapter each token and logits row of a step uses; `None` when no sequence
/// of the step runs with one.
fn step_adapters(out: &SchedulerOutput, ranges: &[Range<usize>], rows: &[u32]) -> Option<Arc<StepAdapters>> {
    if out.seqs.iter().all(|s| s.lora.is_none()) {
        return None;
    }
    let tokens: Vec<Option<u32>> =
        out.seqs.iter().flat_map(|s| std::iter::repeat_n(s.lora, s.token_ids.len())).collect();
    let mut logits = vec![None; rows.len()];
    for (s, r) in out.seqs.iter().zip(ranges) {
        for l in &mut logits[r.clone()] {
            *l = s.lora;
        }
    }
    // The one row computed for a step that samples nothing (a prompt chunk).
    if rows.len() == 1 && ranges.iter().all(|r| r.is_empty()) {
        logits[0] = tokens.last().copied().flatten();
    }
    Some(Arc::new(StepAdapters { tokens, logits }))
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
/// activation peak can be measured (vLLM's profile run); and the one-token warm-up step.
#[derive(Debug, Clone, Copy)]
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

/// Runs one token through `model` (over a one-block throwaway cache) and checks that its
/// logits are one row as wide as its vocabulary: the engine runs it at start, so a checkpoint
/// whose shapes disagree fails there, not at each request.
pub(crate) fn warm_up(model: &dyn CausalLM, block_size: usize, kv_dtype: DType, device: &Device) -> Result<()> {
    let step = ProfileStep { tokens: 1, rows: 1, block_size, kv_dtype };
    let dims = profile_step(model, step, device).map_err(|e| crate::Error::InvalidArgument {
        param: "model",
        message: format!("a first step fails ({e}); do the checkpoint's tensors match its configuration?"),
    })?;
    if dims != [1, model.vocab_size()] {
        return Err(crate::Error::InvalidArgument {
            param: "model",
            message: format!(
                "a first step gives logits of shape {dims:?}, not [1, {}] (the vocabulary): the checkpoint's tensors \
                 disagree with its configuration",
                model.vocab_size()
            ),
        });
    }
    Ok(())
}

/// Runs `step` through `model` over a throwaway cache just large enough for it; returns the
/// logits' shape.
pub(crate) fn profile_step(model: &dyn CausalLM, step: ProfileStep, device: &Device) -> Result<Vec<usize>> {
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
    Ok(logits.dims().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_one_two_four_then_multiples_of_eight() {
        let got: Vec<usize> = [1, 2, 3, 4, 5, 8, 9, 16, 17, 255, 256].iter().map(|&n| graph_bucket(n)).collect();
        assert_eq!(got, [1, 2, 4, 4, 8, 8, 16, 16, 24, 256, 256]);
        assert_eq!(DecodeGraphs::new(8192, 100).max_batch, 104);
    }

    /// The profile step (the GPU's KV sizing runs it) over a real model on the CPU.
    #[test]
    fn the_profile_step_runs_a_full_batch() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/models/llama");
        let opts = vllm_models::LoadOptions::float32();
        let model = vllm_models::load_hf_dir(dir.as_ref(), opts, &Device::Cpu).unwrap();
        let step = ProfileStep { tokens: 100, rows: 8, block_size: 16, kv_dtype: DType::F16 };
        assert_eq!(profile_step(&*model, step, &Device::Cpu).unwrap(), [8, model.vocab_size()]);
        warm_up(&*model, 16, DType::F16, &Device::Cpu).unwrap();
    }
}
