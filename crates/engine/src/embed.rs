//! Embedding models (`LLM::encode` / `LLM::embed`, the server's `/v1/embeddings`): a BERT
//! encoder with sentence-transformers pooling, run in padded batches outside the paged
//! cache (encoders attend both ways and keep no state between requests).

use std::path::Path;

use candle_core::Device;
use vllm_models::bert::BertEmbedder;
use vllm_models::{LoadOptions, MatrixFormat};
use vllm_tokenizer::Tokenizer;

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
}

impl Embedder {
    /// Loads a sentence-transformers folder (`BertModel`) onto `args.device`. Float32, or
    /// with `args.quantization` int8 every encoder matmul runs on int8 weights and activations
    /// (faster, vectors within about 1e-3 of float32's; see docs/models.md).
    pub fn load(dir: &Path, args: &EngineArgs) -> Result<Self> {
        let device: Device = crate::config::device(&args.device)?;
        let device = &device;
        let matrices = if args.quantization == Quantization::Int8 { MatrixFormat::Int8 } else { MatrixFormat::Dense };
        let opts = LoadOptions { dtype: candle_core::DType::F32, matrices };
        let model = BertEmbedder::load_dir(dir, opts, device)?;
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
        Ok(Self { model, tokenizer, max_len })
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
        let ids = prompts.iter().map(|p| self.tokens(p)).collect::<Result<Vec<_>>>()?;
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| ids[i].len());
        let mut vectors: Vec<Vec<f32>> = vec![Vec::new(); ids.len()];
        for chunk in order.chunks(BATCH) {
            let batch: Vec<Vec<u32>> = chunk.iter().map(|&i| ids[i].clone()).collect();
            for (&i, v) in chunk.iter().zip(self.model.embed(&batch)?) {
                vectors[i] = v;
            }
        }
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
