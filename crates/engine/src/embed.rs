//! Embedding models (`LLM::encode` / `LLM::embed`, the server's `/v1/embeddings`): a BERT
//! encoder with sentence-transformers pooling, run in padded batches outside the paged
//! cache (encoders attend both ways and keep no state between requests).
//!
//! With `--enable-lora` the encoder's layers are recorded for LoRA adapters and an input may
//! name one ([`Embedder::encode_with_lora`]): the same adapter store as the generation
//! engine's ([`LoraManager`]: loaded on first use, `--max-cpu-loras` resident, leases), and
//! inputs of several adapters and of the base model share a batch, at most `--max-loras`
//! adapters in one.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::Device;
use vllm_models::bert::BertEmbedder;
use vllm_models::lora::LoraRegistry;
use vllm_models::{LoadOptions, MatrixFormat};
use vllm_tokenizer::Tokenizer;

use crate::lora::{LoraLease, LoraLimits, LoraManager, LoraRequest};
use crate::{EngineArgs, Error, Prompt, Quantization, Result};

/// vLLM's `EmbeddingOutput`.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingOutput {
    /// The vector (unit length when the model normalizes).
    pub embedding: Vec<f32>,
}

/// vLLM's `EmbeddingRequestOutput`.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingRequestOutput {
    /// `"0"`, `"1"`, ... in input order.
    pub request_id: String,
    /// The tokens encoded (after truncation to the model's `max_seq_length`).
    pub prompt_token_ids: Vec<u32>,
    /// The embedding.
    pub outputs: EmbeddingOutput,
    /// Always true.
    pub finished: bool,
}

/// Sequences encoded in one pass.
const BATCH: usize = 32;

/// An embedding model and its tokenizer.
pub struct Embedder {
    model: BertEmbedder,
    tokenizer: Tokenizer,
    max_len: usize,
    /// The adapters, with `--enable-lora`.
    lora: Option<Arc<LoraManager>>,
}

impl Embedder {
    /// Loads a sentence-transformers folder (`BertModel`) onto `args.device`. Float32, or
    /// with `args.quantization` int8 every encoder matmul runs on int8 weights and activations
    /// (faster, vectors within about 1e-3 of float32's; see docs/models.md). With
    /// `args.enable_lora` its layers are recorded for LoRA adapters.
    pub fn load(dir: &Path, args: &EngineArgs) -> Result<Self> {
        let device: Device = crate::config::device(&args.device)?;
        let device = &device;
        let matrices = if args.quantization == Quantization::Int8 { MatrixFormat::Int8 } else { MatrixFormat::Dense };
        let opts = LoadOptions { dtype: candle_core::DType::F32, matrices };
        let limits = LoraLimits::from_args(args, device)?;
        let registry = limits.map(|_| Arc::new(LoraRegistry::default()));
        let model = BertEmbedder::load_dir_with(dir, opts, device, registry.clone())?;
        let lora = limits.zip(registry).map(|(limits, registry)| Arc::new(LoraManager::new(registry, limits)));
        let tokenizer = Tokenizer::from_hf_dir(dir)?;
        // Every id the tokenizer makes must have an embedding row.
        if tokenizer.vocab_size() > model.config().vocab_size {
            return Err(crate::Error::InvalidArgument {
                param: "model",
                message: format!(
                    "its tokenizer has {} tokens, more than the model's {} embeddings",
                    tokenizer.vocab_size(),
                    model.config().vocab_size
                ),
            });
        }
        // sentence-transformers truncates to `max_seq_length` (sentence_bert_config.json).
        let st_max = std::fs::read_to_string(dir.join("sentence_bert_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v.get("max_seq_length").and_then(|m| m.as_u64()))
            .map(|m| m as usize);
        let max_len = st_max.unwrap_or(usize::MAX).min(model.config().max_position_embeddings);
        Ok(Self { model, tokenizer, max_len, lora })
    }

    /// The LoRA adapters, with `--enable-lora`.
    pub fn lora(&self) -> Option<&Arc<LoraManager>> {
        self.lora.as_ref()
    }

    /// Whether a folder holds an embedding model this type loads (an encoder row of the
    /// model registry).
    pub fn is_embedding_model(dir: &Path) -> bool {
        vllm_models::read_hf_config(dir)
            .is_ok_and(|(_, arch)| vllm_models::registry::by_hf_class(&arch).is_some_and(|a| a.is_encoder()))
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Vector width.
    pub fn dimensions(&self) -> usize {
        self.model.hidden_size()
    }

    /// Longest input in tokens; longer ones are truncated (keeping the final `[SEP]`).
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// The token ids of one input, truncated to [`Self::max_len`].
    pub fn tokens(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        let mut ids = match prompt {
            Prompt::Text(t) => self.tokenizer.encode_with_post_processor(t)?,
            Prompt::TokenIds(ids) => ids.clone(),
        };
        if ids.is_empty() {
            return Err(Error::InvalidArgument { param: "input", message: "an input has no tokens".into() });
        }
        let vocab = self.model.config().vocab_size;
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::InvalidArgument {
                param: "input",
                message: format!("token id {bad} is outside the vocabulary (size {vocab})"),
            });
        }
        if ids.len() > self.max_len {
            let last = *ids.last().expect("not empty");
            ids.truncate(self.max_len - 1);
            ids.push(last);
        }
        Ok(ids)
    }

    /// Embeds every input, in order. Inputs are batched by length to limit padding.
    pub fn encode(&self, prompts: &[Prompt]) -> Result<Vec<EmbeddingRequestOutput>> {
        self.encode_with_lora(prompts, &[])
    }

    /// [`Self::encode`] with input `i` run with LoRA adapter `loras[i]` (`None`: the base
    /// model; `loras` empty: the base model for every input). Each adapter is loaded on first
    /// use; a bad one, or one asked of an embedder without `--enable-lora`, is an error before
    /// anything runs. Inputs are batched by adapter, then by length.
    pub fn encode_with_lora(
        &self,
        prompts: &[Prompt],
        loras: &[Option<LoraRequest>],
    ) -> Result<Vec<EmbeddingRequestOutput>> {
        if !loras.is_empty() && loras.len() != prompts.len() {
            return Err(Error::InvalidArgument {
                param: "lora_request",
                message: format!("{} adapters for {} inputs", loras.len(), prompts.len()),
            });
        }
        let ids = prompts.iter().map(|p| self.tokens(p)).collect::<Result<Vec<_>>>()?;
        // Every adapter held (installed and kept so) until the inputs are embedded.
        let mut leases: HashMap<u32, LoraLease> = HashMap::new();
        let mut adapter_of = vec![None; ids.len()];
        for (slot, req) in adapter_of.iter_mut().zip(loras) {
            if let Some(lease) = crate::lora::lease(self.lora.as_deref(), req.as_ref())? {
                *slot = Some(lease.id);
                leases.entry(lease.id).or_insert(lease);
            }
        }
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| (adapter_of[i], ids[i].len()));
        let max_loras = self.lora.as_ref().map_or(usize::MAX, |m| m.limits().max_loras);
        let mut vectors: Vec<Vec<f32>> = vec![Vec::new(); ids.len()];
        for chunk in batches(&order, &adapter_of, max_loras) {
            let batch: Vec<Vec<u32>> = chunk.iter().map(|&i| ids[i].clone()).collect();
            let adapters: Vec<Option<u32>> = chunk.iter().map(|&i| adapter_of[i]).collect();
            for (&i, v) in chunk.iter().zip(self.model.embed_with_adapters(&batch, &adapters)?) {
                vectors[i] = v;
            }
        }
        drop(leases);
        Ok(ids
            .into_iter()
            .zip(vectors)
            .enumerate()
            .map(|(i, (prompt_token_ids, embedding))| EmbeddingRequestOutput {
                request_id: i.to_string(),
                prompt_token_ids,
                outputs: EmbeddingOutput { embedding },
                finished: true,
            })
            .collect())
    }
}

/// `order` (inputs sorted by adapter, then length) cut into batches of at most [`BATCH`]
/// inputs and `max_loras` distinct adapters (the base model not counted).
fn batches(order: &[usize], adapter_of: &[Option<u32>], max_loras: usize) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut adapters = 0;
    for &i in order {
        let a = adapter_of[i];
        // Sorted by adapter: one other than the previous input's is new to the batch.
        let new = a.is_some() && out.last().and_then(|c| c.last()).map(|&j| adapter_of[j]) != Some(a);
        let fits = out.last().is_some_and(|c| c.len() < BATCH) && !(new && adapters >= max_loras);
        if !fits {
            out.push(Vec::new());
            adapters = 0;
        }
        if a.is_some() && (new || !fits) {
            adapters += 1;
        }
        if let Some(c) = out.last_mut() {
            c.push(i);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_hold_at_most_max_loras_adapters() {
        // Sorted by adapter: 3 base inputs, 2 of adapter 1, 1 of adapter 2, 2 of adapter 3.
        let adapter_of = [None, None, None, Some(1), Some(1), Some(2), Some(3), Some(3)];
        let order: Vec<usize> = (0..adapter_of.len()).collect();
        assert_eq!(batches(&order, &adapter_of, 2), [vec![0, 1, 2, 3, 4, 5], vec![6, 7]]);
        assert_eq!(batches(&order, &adapter_of, 1), [vec![0, 1, 2, 3, 4], vec![5], vec![6, 7]]);
        assert_eq!(batches(&order, &adapter_of, usize::MAX), [order]);
        // And at most BATCH inputs: an adapter's inputs go on in the next batch, counted there.
        let many: Vec<Option<u32>> = (0..BATCH + 3).map(|i| Some(1 + (i >= BATCH - 1) as u32)).collect();
        let order: Vec<usize> = (0..many.len()).collect();
        let b = batches(&order, &many, 1);
        assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), [BATCH - 1, 4]);
        let b = batches(&order, &many, 2);
        assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), [BATCH, 3]);
    }
}
