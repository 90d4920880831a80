//! The offline API (vLLM's `LLM` class).

use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use vllm_sampler::SamplingParams;

use crate::args::EngineArgs;
use crate::beam::{BeamSearchOutput, BeamSearchParams};
use crate::engine::{AbortHandle, LLMEngine};
use crate::output::{Prompt, RequestOutput};
use crate::{Error, Result};

/// Sampling parameters for a batch: one for all prompts, or one per prompt.
#[derive(Debug, Clone)]
pub enum ParamsList {
    /// The same parameters for every prompt.
    One(Box<SamplingParams>),
    /// One per prompt, in order.
    PerPrompt(Vec<SamplingParams>),
}

impl From<SamplingParams> for ParamsList {
    fn from(p: SamplingParams) -> Self {
        ParamsList::One(Box::new(p))
    }
}
impl From<&SamplingParams> for ParamsList {
    fn from(p: &SamplingParams) -> Self {
        ParamsList::One(Box::new(p.clone()))
    }
}
impl From<Vec<SamplingParams>> for ParamsList {
    fn from(p: Vec<SamplingParams>) -> Self {
        ParamsList::PerPrompt(p)
    }
}
impl From<&[SamplingParams]> for ParamsList {
    fn from(p: &[SamplingParams]) -> Self {
        ParamsList::PerPrompt(p.to_vec())
    }
}

/// An engine for offline batch inference.
///
/// ```no_run
/// use vllm_engine::{EngineArgs, SamplingParams, LLM};
///
/// let llm = LLM::new(EngineArgs::default())?; // SmolLM2-135M-Instruct
/// let params = SamplingParams { temperature: 0.8, top_p: 0.95, ..Default::default() };
/// for out in llm.generate(["Hello, my name is", "The capital of France is"], &params)? {
///     println!("{:?} -> {:?}", out.prompt, out.outputs[0].text);
/// }
/// # Ok::<(), vllm_engine::Error>(())
/// ```
pub struct LLM {
    engine: Mutex<LLMEngine>,
    aborts: AbortHandle,
    use_tqdm: bool,
    counter: Mutex<u64>,
}

impl LLM {
    /// Loads the model and allocates the cache.
    pub fn new(args: EngineArgs) -> Result<Self> {
        let engine = LLMEngine::new(args)?;
        Ok(Self { aborts: engine.abort_handle(), engine: Mutex::new(engine), use_tqdm: true, counter: Mutex::new(0) })
    }

    /// Aborts requests of a running [`Self::generate`] from another thread. Requests are
    /// numbered like vLLM's: `"0"`, `"1"`, ... across calls, in prompt order (the outputs'
    /// `request_id`). An aborted request's output ends with `finish_reason` abort.
    pub fn abort_handle(&self) -> AbortHandle {
        self.aborts.clone()
    }

    /// Shows (the default) or hides the progress bar. It is never drawn when standard error
    /// is not a terminal.
    pub fn set_use_tqdm(&mut self, on: bool) {
        self.use_tqdm = on;
    }

    /// Runs `f` with the engine locked (statistics, tokenizer, low-level requests).
    pub fn with_engine<T>(&self, f: impl FnOnce(&mut LLMEngine) -> T) -> T {
        let mut e = self.engine.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut e)
    }

    /// Beam search for every prompt (vLLM's `LLM.beam_search`); returns one output per
    /// prompt, in input order, each with `beam_width` sequences best first. The beams are
    /// ranked like Hugging Face `generate(num_beams=...)` (see [`crate::beam`]).
    pub fn beam_search<P: Into<Prompt>>(
        &self,
        prompts: impl IntoIterator<Item = P>,
        params: &BeamSearchParams,
    ) -> Result<Vec<BeamSearchOutput>> {
        let prompts: Vec<Prompt> = prompts.into_iter().map(Into::into).collect();
        let mut engine = self.engine.lock().unwrap_or_else(|p| p.into_inner());
        crate::beam::run(&mut engine, prompts, params)
    }

    /// Generates completions for every prompt; returns one output per prompt, in input order.
    /// If any prompt or parameter is invalid, nothing runs and the error names it.
    pub fn generate<P: Into<Prompt>>(
        &self,
        prompts: impl IntoIterator<Item = P>,
        params: impl Into<ParamsList>,
    ) -> Result<Vec<RequestOutput>> {
        let prompts: Vec<Prompt> = prompts.into_iter().map(Into::into).collect();
        let params = match params.into() {
            ParamsList::One(p) => vec![*p; prompts.len()],
            ParamsList::PerPrompt(v) if v.len() == prompts.len() => v,
            ParamsList::PerPrompt(v) => {
                return Err(Error::InvalidArgument {
                    param: "sampling_params",
                    message: format!("{} parameter sets for {} prompts", v.len(), prompts.len()),
                })
            }
        };
        let mut engine = self.engine.lock().unwrap_or_else(|p| p.into_inner());
        let base = {
            let mut c = self.counter.lock().unwrap_or_else(|p| p.into_inner());
            let b = *c;
            *c += prompts.len() as u64;
            b
        };
        let ids: Vec<String> = (0..prompts.len()).map(|i| format!("{}", base + i as u64)).collect();
        for (i, (prompt, p)) in prompts.into_iter().zip(params).enumerate() {
            if let Err(e) = engine.add_request(ids[i].clone(), prompt, p) {
                for id in &ids[..i] {
                    engine.abort_request(id);
                }
                return Err(e);
            }
        }
        let bar = if self.use_tqdm {
            ProgressBar::with_draw_target(Some(ids.len() as u64), ProgressDrawTarget::stderr())
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "Processed prompts: {percent:>3}%|{wide_bar}| {pos}/{len} [{elapsed_precise}<{eta_precise}, {per_sec}]",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let mut results: Vec<Option<RequestOutput>> = vec![None; ids.len()];
        let mut done = 0;
        while done < ids.len() {
            let outs = match engine.step() {
                Ok(o) => o,
                Err(e) => {
                    for id in &ids {
                        engine.abort_request(id);
                    }
                    return Err(e);
                }
            };
            if outs.is_empty() && !engine.has_unfinished_requests() {
                break;
            }
            for o in outs.into_iter().filter(|o| o.finished) {
                if let Some(i) = o.request_id.parse::<u64>().ok().and_then(|n| n.checked_sub(base)) {
                    if let Some(slot) = results.get_mut(i as usize) {
                        *slot = Some(o);
                        done += 1;
                        bar.inc(1);
                    }
                }
            }
        }
        bar.finish_and_clear();
        results.into_iter().map(|r| r.ok_or(Error::Internal("a request ended without output"))).collect()
    }
}
