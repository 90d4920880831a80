//! The engine core: requests in, one step at a time (schedule, run the model, sample, update),
//! outputs out.

use std::collections::HashMap;

use candle_core::{DType, Device};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use vllm_block::SeqId;
use vllm_kernels::KvCache;
use vllm_models::LoadOptions;
use vllm_sampler::{sample_batch, SamplingParams, SeqSampler};
use vllm_scheduler::{Request, Scheduler, SchedulerConfig, StopConditions};
use vllm_tokenizer::{IncrementalDetokenizer, Tokenizer};

use crate::args::{EngineArgs, ModelDtype, Quantization};
use crate::output::{CompletionOutput, FinishReason, Prompt, RequestOutput};
use crate::runner::ModelRunner;
use crate::source::{resolve, ModelFiles};
use crate::{Error, Result};

struct ReqState {
    request_id: String,
    prompt: Option<String>,
    prompt_ids: Vec<u32>,
    detok: IncrementalDetokenizer,
    output_ids: Vec<u32>,
    num_cached_tokens: usize,
}

/// Engine-wide statistics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EngineStats {
    /// Requests in the running batch.
    pub num_running: usize,
    /// Queued requests.
    pub num_waiting: usize,
    /// Fraction of KV blocks in use.
    pub kv_cache_usage: f32,
    /// Free KV blocks.
    pub num_free_blocks: usize,
    /// Total KV blocks.
    pub num_blocks: usize,
    /// Preemptions so far.
    pub num_preemptions: u64,
    /// Prompt tokens looked up in / served from the prefix cache.
    pub prefix_cache_queries: u64,
    /// Prompt tokens served from the prefix cache.
    pub prefix_cache_hits: u64,
}

/// The synchronous engine (vLLM's `LLMEngine`).
pub struct LLMEngine {
    scheduler: Scheduler,
    runner: ModelRunner,
    tokenizer: Tokenizer,
    states: HashMap<SeqId, ReqState>,
    samplers: HashMap<SeqId, SeqSampler>,
    ids: HashMap<String, SeqId>,
    next_seq: SeqId,
    seed_rng: ChaCha8Rng,
    max_model_len: usize,
}

fn device(name: &str) -> Result<Device> {
    match name {
        "cpu" | "" => Ok(Device::Cpu),
        "cuda" => Err(Error::InvalidArgument {
            param: "device",
            message: "cuda: this build has no CUDA support (build with --features cuda)".into(),
        }),
        other => Err(Error::InvalidArgument { param: "device", message: format!("'{other}' (choose cpu or cuda)") }),
    }
}

impl LLMEngine {
    /// Resolves the model, loads weights and tokenizer, sizes and allocates the KV cache.
    pub fn new(args: EngineArgs) -> Result<Self> {
        let dev = device(&args.device)?;
        let dtype = match args.dtype {
            ModelDtype::Auto | ModelDtype::Float32 => DType::F32,
            ModelDtype::Float16 => DType::F16,
            ModelDtype::BFloat16 => DType::BF16,
        };
        let opts = LoadOptions { dtype, keep_quantized: args.quantization == Quantization::Gguf };
        let (model, tokenizer) = match resolve(&args.model)? {
            ModelFiles::Gguf(path) => {
                let (model, w) = vllm_models::load_gguf(&path, opts, &dev)?;
                let md = w.gguf_metadata().ok_or_else(|| Error::InvalidArgument {
                    param: "model",
                    message: format!("{}: GGUF without metadata", path.display()),
                })?;
                (model, Tokenizer::from_gguf(md)?)
            }
            ModelFiles::HfDir(dir) => (vllm_models::load_hf_dir(&dir, opts, &dev)?, Tokenizer::from_hf_dir(&dir)?),
        };
        let model_max = model.max_model_len();
        let max_model_len = args.max_model_len.unwrap_or(model_max);
        if max_model_len == 0 || max_model_len > model_max {
            return Err(Error::InvalidArgument {
                param: "max_model_len",
                message: format!("{max_model_len} (the model supports 1 to {model_max})"),
            });
        }
        if args.block_size == 0 || args.max_num_seqs == 0 {
            return Err(Error::InvalidArgument {
                param: "block_size",
                message: "block_size and max_num_seqs must be positive".into(),
            });
        }
        let per_block = KvCache::bytes_per_token(model.attn_shape()) * model.num_layers() * args.block_size;
        let num_blocks = (args.kv_cache_memory / per_block as u64) as usize;
        if num_blocks == 0 {
            return Err(Error::InvalidArgument {
                param: "kv_cache_memory",
                message: format!("{} bytes hold no block (one block takes {per_block} bytes)", args.kv_cache_memory),
            });
        }
        // No point in more blocks than max_num_seqs full-length sequences.
        let num_blocks = num_blocks.min(args.max_num_seqs * max_model_len.div_ceil(args.block_size)).max(1);
        let max_num_batched_tokens = args.max_num_batched_tokens.unwrap_or(2048.max(args.max_num_seqs));
        if max_num_batched_tokens == 0 {
            return Err(Error::InvalidArgument { param: "max_num_batched_tokens", message: "must be positive".into() });
        }
        let scheduler = Scheduler::new(SchedulerConfig {
            max_num_seqs: args.max_num_seqs,
            max_num_batched_tokens,
            max_model_len,
            block_size: args.block_size,
            num_blocks,
            enable_prefix_caching: args.enable_prefix_caching,
        });
        let runner = ModelRunner::new(model, num_blocks, args.block_size, dev)?;
        Ok(Self {
            scheduler,
            runner,
            tokenizer,
            states: HashMap::new(),
            samplers: HashMap::new(),
            ids: HashMap::new(),
            next_seq: 0,
            seed_rng: ChaCha8Rng::seed_from_u64(args.seed),
            max_model_len,
        })
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The effective context length.
    pub fn max_model_len(&self) -> usize {
        self.max_model_len
    }

    /// The scheduler (read-only).
    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    /// Current statistics.
    pub fn stats(&self) -> EngineStats {
        let kv = self.scheduler.kv_cache();
        let (q, h) = kv.prefix_cache_stats();
        EngineStats {
            num_running: self.scheduler.num_running(),
            num_waiting: self.scheduler.num_waiting(),
            kv_cache_usage: kv.usage(),
            num_free_blocks: kv.pool().num_free(),
            num_blocks: kv.pool().num_blocks(),
            num_preemptions: self.scheduler.num_preemptions(),
            prefix_cache_queries: q,
            prefix_cache_hits: h,
        }
    }

    /// Tokenizes (if needed) and validates a prompt.
    pub fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        let ids = match prompt {
            Prompt::Text(t) => self.tokenizer.encode(t, true)?,
            Prompt::TokenIds(ids) => {
                self.tokenizer.check_ids(ids)?;
                ids.clone()
            }
        };
        if ids.is_empty() {
            return Err(Error::InvalidPrompt("the prompt is empty".into()));
        }
        let vocab = self.runner.model().vocab_size();
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::InvalidPrompt(format!("token id {bad} is outside the model's vocabulary ({vocab})")));
        }
        Ok(ids)
    }

    /// Queues a request. Everything is validated first: nothing is queued on error.
    pub fn add_request(&mut self, request_id: impl Into<String>, prompt: Prompt, params: SamplingParams) -> Result<()> {
        let request_id = request_id.into();
        if self.ids.contains_key(&request_id) {
            return Err(Error::DuplicateRequestId(request_id));
        }
        params.validate(self.runner.model().vocab_size())?;
        let prompt_ids = self.prompt_ids(&prompt)?;
        if prompt_ids.len() >= self.max_model_len {
            return Err(Error::PromptTooLong { prompt_tokens: prompt_ids.len(), max_model_len: self.max_model_len });
        }
        let max_tokens = params.max_tokens.unwrap_or(self.max_model_len - prompt_ids.len());
        let stop = StopConditions {
            max_tokens,
            min_tokens: params.min_tokens,
            eos_token_ids: self.tokenizer.eos_token_ids().to_vec(),
            stop_token_ids: params.stop_token_ids.clone(),
            ignore_eos: params.ignore_eos,
        };
        let seq = self.next_seq;
        self.scheduler.add_request(Request::new(seq, prompt_ids.clone(), stop))?;
        self.next_seq += 1;
        let fallback_seed = self.seed_rng.next_u64();
        let detok = IncrementalDetokenizer::new(&prompt_ids, params.skip_special_tokens);
        self.samplers.insert(seq, SeqSampler::new(params, fallback_seed));
        let prompt = match prompt {
            Prompt::Text(t) => Some(t),
            Prompt::TokenIds(_) => None,
        };
        self.states.insert(
            seq,
            ReqState {
                request_id: request_id.clone(),
                prompt,
                prompt_ids,
                detok,
                output_ids: Vec::new(),
                num_cached_tokens: 0,
            },
        );
        self.ids.insert(request_id, seq);
        Ok(())
    }

    /// Aborts a request: its blocks are freed now. Returns its final output, if it was known.
    pub fn abort_request(&mut self, request_id: &str) -> Option<RequestOutput> {
        let seq = self.ids.remove(request_id)?;
        self.scheduler.abort(seq);
        self.samplers.remove(&seq);
        let st = self.states.remove(&seq)?;
        Some(Self::output(&st, Some(FinishReason::Abort), None, st.num_cached_tokens))
    }

    /// Whether any request is unfinished.
    pub fn has_unfinished_requests(&self) -> bool {
        self.scheduler.has_unfinished()
    }

    fn output(st: &ReqState, finish: Option<FinishReason>, stop_reason: Option<u32>, cached: usize) -> RequestOutput {
        RequestOutput {
            request_id: st.request_id.clone(),
            prompt: st.prompt.clone(),
            prompt_token_ids: st.prompt_ids.clone(),
            outputs: vec![CompletionOutput {
                index: 0,
                text: st.detok.text().to_string(),
                token_ids: st.output_ids.clone(),
                finish_reason: finish,
                stop_reason,
            }],
            finished: finish.is_some(),
            num_cached_tokens: cached,
        }
    }

    /// Runs one step. Returns the (cumulative) outputs of the requests that got a new token.
    pub fn step(&mut self) -> Result<Vec<RequestOutput>> {
        let out = self.scheduler.schedule();
        if out.is_empty() {
            return Ok(Vec::new());
        }
        let mut logits = self.runner.execute(&out)?;
        let sample_ids: Vec<SeqId> = out.seqs.iter().filter(|s| s.sample).map(|s| s.id).collect();
        let tokens = if sample_ids.is_empty() {
            Vec::new()
        } else {
            let vocab = logits.len() / sample_ids.len();
            let mut taken: Vec<SeqSampler> = sample_ids
                .iter()
                .map(|id| self.samplers.remove(id).expect("scheduled request has a sampler"))
                .collect();
            let mut refs: Vec<&mut SeqSampler> = taken.iter_mut().collect();
            let tokens = sample_batch(&mut logits, vocab, &mut refs);
            for (id, s) in sample_ids.iter().zip(taken) {
                self.samplers.insert(*id, s);
            }
            tokens
        };
        for s in &out.seqs {
            if let (Some(st), Some(r)) = (self.states.get_mut(&s.id), self.scheduler.request(s.id)) {
                st.num_cached_tokens = r.num_cached_tokens;
            }
        }
        let updates = self.scheduler.update_from_output(&out, &tokens);
        let mut outputs = Vec::with_capacity(updates.len());
        for u in updates {
            let Some(st) = self.states.get_mut(&u.id) else {
                continue;
            };
            st.output_ids.push(u.new_token);
            st.detok.push(&self.tokenizer, u.new_token)?;
            let (finish, stop_reason) = match u.finished {
                None => (None, None),
                Some(vllm_scheduler::FinishReason::Stop(t)) => {
                    let eos = self.tokenizer.eos_token_ids().contains(&t);
                    (Some(FinishReason::Stop), if eos { None } else { Some(t) })
                }
                Some(vllm_scheduler::FinishReason::Length) => (Some(FinishReason::Length), None),
                Some(vllm_scheduler::FinishReason::Abort) => (Some(FinishReason::Abort), None),
            };
            outputs.push(Self::output(st, finish, stop_reason, st.num_cached_tokens));
            if finish.is_some() {
                self.ids.remove(&st.request_id);
                self.states.remove(&u.id);
                self.samplers.remove(&u.id);
            }
        }
        Ok(outputs)
    }
}
