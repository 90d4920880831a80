//! Beam search (vLLM's `LLM.beam_search`), with Hugging Face's selection rules.
//!
//! It runs above the engine, as in vLLM v1: each round, every running beam is one ordinary
//! engine request of one token that returns the top `2 * beam_width` log probabilities of its
//! next position ([`BeamSearch::round`]); a driver submits them, waits for their outputs and
//! [`BeamSearch::advance`]s the search ([`run`] on the synchronous engine, `AsyncEngine::
//! beam_search` between the other requests of the async one). The engine core knows nothing
//! of beams. The prefix cache makes the beams of a prompt share the blocks of their prompt and
//! common prefix by reference count, so a round computes little more than each beam's last
//! partial block. Candidates are ranked exactly
//! like `transformers`' `generate(num_beams=..., length_penalty=..., early_stopping=...)`:
//! the top `2 * beam_width` continuations over all beams; an EOS (or a continuation reaching
//! `max_tokens`) among the first `beam_width` of them becomes a finished hypothesis scored
//! `cumulative_logprob / generated_len ^ length_penalty`; the best `beam_width` others run on.

use std::collections::HashMap;

use serde::Serialize;
use vllm_sampler::{RequestOutputKind, SamplingParams, MAX_LOGPROBS};

use crate::engine::LLMEngine;
use crate::input::{EngineRequest, InputProcessor};
use crate::output::{FinishReason, Prompt, RequestOutput};
use crate::{Error, Result, Tokenizer};

/// When beam search stops (Hugging Face's `early_stopping`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EarlyStopping {
    /// `False`: stop when no running beam can beat the worst finished one, estimating a
    /// running beam's best score at its current length (the default).
    #[default]
    Heuristic,
    /// `True`: stop as soon as `beam_width` hypotheses have finished.
    Finished,
    /// `"never"`: like `Heuristic`, but with a positive length penalty a running beam is
    /// assumed to reach `max_tokens` (the canonical beam search).
    Never,
}

/// vLLM's `BeamSearchParams`.
#[derive(Debug, Clone, PartialEq)]
pub struct BeamSearchParams {
    /// Beams kept per prompt, and sequences returned.
    pub beam_width: usize,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Keep going past EOS.
    pub ignore_eos: bool,
    /// Beams are ranked by `log_softmax(logits / temperature)`; 0 (the default) and 1 rank
    /// by the model's own log probabilities.
    pub temperature: f32,
    /// Scores are `cumulative_logprob / generated_len ^ length_penalty`: above 1 favours longer
    /// sequences, below 1 shorter ones.
    pub length_penalty: f32,
    /// When to stop.
    pub early_stopping: EarlyStopping,
}

impl Default for BeamSearchParams {
    fn default() -> Self {
        Self {
            beam_width: 4,
            max_tokens: 16,
            ignore_eos: false,
            temperature: 0.0,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::Heuristic,
        }
    }
}

impl BeamSearchParams {
    fn validate(&self) -> Result<()> {
        let bad = |param: &'static str, message: String| Err(Error::InvalidArgument { param, message });
        if self.beam_width == 0 || self.beam_width > MAX_LOGPROBS / 2 {
            return bad("beam_width", format!("must be in 1..={}, got {}", MAX_LOGPROBS / 2, self.beam_width));
        }
        if self.max_tokens == 0 {
            return bad("max_tokens", "must be at least 1, got 0".into());
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad("temperature", format!("must be >= 0, got {}", self.temperature));
        }
        if !self.length_penalty.is_finite() {
            return bad("length_penalty", format!("must be finite, got {}", self.length_penalty));
        }
        Ok(())
    }
}

/// One returned beam.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BeamSequence {
    /// Generated token ids (ending with EOS when the beam stopped there).
    pub token_ids: Vec<u32>,
    /// Their text (special tokens skipped).
    pub text: String,
    /// Sum of the tokens' log probabilities.
    pub cumulative_logprob: f64,
    /// The ranking score, `cumulative_logprob / len(token_ids) ^ length_penalty`.
    pub score: f64,
    /// `stop` at EOS, `length` otherwise.
    pub finish_reason: FinishReason,
}

/// The beams of one prompt, best first (vLLM's `BeamSearchOutput`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BeamSearchOutput {
    /// The prompt text, when given as text.
    pub prompt: Option<String>,
    /// The prompt's token ids.
    pub prompt_token_ids: Vec<u32>,
    /// `beam_width` sequences, highest score first.
    pub sequences: Vec<BeamSequence>,
}

struct Hypothesis {
    tokens: Vec<u32>,
    cum: f64,
    score: f64,
}

/// The search state of one prompt.
struct Search {
    prompt: Vec<u32>,
    /// Running beams: generated tokens and cumulative log probability, best first.
    running: Vec<(Vec<u32>, f64)>,
    /// Finished hypotheses, best first, at most `beam_width`.
    finished: Vec<Hypothesis>,
    /// Whether a running beam may still beat the worst finished hypothesis.
    improvable: bool,
    done: bool,
}

impl Search {
    /// Advances one step given each running beam's top next-token log probabilities.
    fn advance(&mut self, p: &BeamSearchParams, eos: &[u32], tops: &[Vec<(u32, f32)>]) {
        let width = p.beam_width;
        let k = 2 * width;
        let mut cands: Vec<(f64, usize, u32)> = Vec::with_capacity(tops.len() * k);
        for (b, top) in tops.iter().enumerate() {
            let cum = self.running[b].1;
            cands.extend(top.iter().map(|&(t, lp)| (cum + lp as f64, b, t)));
        }
        // Highest first; ties by (beam, token) like a top-k over the flattened scores.
        cands.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        cands.truncate(k);
        let len = self.running[0].0.len() + 1;
        let hits = |t: u32| (!p.ignore_eos && eos.contains(&t)) || len >= p.max_tokens;
        let full = self.finished.len() == width && p.early_stopping == EarlyStopping::Finished;
        if self.improvable && !full {
            let norm = (len as f64).powf(p.length_penalty as f64);
            for &(acc, b, t) in cands.iter().take(width).filter(|c| hits(c.2)) {
                let mut tokens = self.running[b].0.clone();
                tokens.push(t);
                self.finished.push(Hypothesis { tokens, cum: acc, score: acc / norm });
            }
            self.finished.sort_by(|a, b| b.score.total_cmp(&a.score));
            self.finished.truncate(width);
        }
        let all_hit = cands.iter().all(|c| hits(c.2));
        self.running = cands
            .iter()
            .filter(|c| !hits(c.2))
            .take(width)
            .map(|&(acc, b, t)| {
                let mut tokens = self.running[b].0.clone();
                tokens.push(t);
                (tokens, acc)
            })
            .collect();
        if self.finished.len() == width {
            let best_len = match p.early_stopping {
                EarlyStopping::Never if p.length_penalty > 0.0 => p.max_tokens,
                _ => len,
            };
            if let Some((_, best)) = self.running.first() {
                let best_possible = best / (best_len as f64).powf(p.length_penalty as f64);
                let worst = self.finished.last().map_or(f64::NEG_INFINITY, |h| h.score);
                self.improvable &= best_possible > worst;
            }
        }
        let full = self.finished.len() == width && p.early_stopping == EarlyStopping::Finished;
        self.done = !self.improvable || full || all_hit || self.running.is_empty();
    }
}

/// Which search and which of its running beams a round's request is for.
pub(crate) type BeamKey = (usize, usize);

/// A beam search over several prompts, one round at a time (see the module docs).
pub(crate) struct BeamSearch {
    params: BeamSearchParams,
    eos: Vec<u32>,
    searches: Vec<Search>,
    texts: Vec<Option<String>>,
    /// The LoRA adapter every beam runs with.
    lora: Option<crate::lora::LoraLease>,
}

impl BeamSearch {
    /// Validates and tokenizes (the input processor's work: call it off the engine thread).
    pub(crate) fn new(input: &InputProcessor, prompts: Vec<Prompt>, p: BeamSearchParams) -> Result<Self> {
        p.validate()?;
        let mut searches = Vec::with_capacity(prompts.len());
        let mut texts = Vec::with_capacity(prompts.len());
        for prompt in &prompts {
            let ids = input.prompt_ids(prompt, None)?;
            let max_model_len = input.max_model_len();
            if ids.len().checked_add(p.max_tokens).is_none_or(|total| total > max_model_len) {
                return Err(Error::PromptTooLong {
                    prompt_tokens: ids.len().saturating_add(p.max_tokens),
                    max_model_len,
                });
            }
            texts.push(match prompt {
                Prompt::Text(t) => Some(t.clone()),
                Prompt::TokenIds(_) => None,
            });
            searches.push(Search {
                prompt: ids,
                running: vec![(Vec::new(), 0.0)],
                finished: Vec::new(),
                improvable: true,
                done: false,
            });
        }
        let eos = input.tokenizer().eos_token_ids().to_vec();
        Ok(Self { params: p, eos, searches, texts, lora: None })
    }

    /// The search run with a LoRA adapter (loaded on first use).
    pub(crate) fn with_lora(mut self, input: &InputProcessor, lora: Option<&crate::LoraRequest>) -> Result<Self> {
        self.lora = input.lora_lease(lora)?;
        Ok(self)
    }

    /// Round `round`'s requests, ids starting with `prefix`: one per running beam, of one
    /// token, asking for the top `2 * beam_width` log probabilities after temperature (and
    /// nothing detokenized). None once every search is done.
    pub(crate) fn round(
        &self,
        input: &InputProcessor,
        prefix: &str,
        round: u64,
    ) -> Result<Vec<(EngineRequest, BeamKey)>> {
        let params = SamplingParams {
            logprobs: Some(2 * self.params.beam_width),
            ignore_eos: true,
            temperature: self.params.temperature,
            seed: Some(0),
            detokenize: false,
            output_kind: RequestOutputKind::FinalOnly,
            ..SamplingParams::greedy(1)
        };
        let mut reqs = Vec::new();
        for (i, s) in self.searches.iter().enumerate().filter(|(_, s)| !s.done) {
            for (b, (gen, _)) in s.running.iter().enumerate() {
                let ids = [s.prompt.as_slice(), gen].concat();
                let mut req = input.request_from_ids(format!("{prefix}-{round}-{i}-{b}"), ids, params.clone())?;
                req.scaled_logprobs = true;
                req.lora = self.lora.clone();
                reqs.push((req, (i, b)));
            }
        }
        Ok(reqs)
    }

    /// Advances every search with a round's results: each beam's top continuations.
    pub(crate) fn advance(&mut self, results: Vec<(BeamKey, Vec<(u32, f32)>)>) {
        let mut tops: Vec<Vec<Vec<(u32, f32)>>> =
            self.searches.iter().map(|s| vec![Vec::new(); if s.done { 0 } else { s.running.len() }]).collect();
        for ((i, b), top) in results {
            if let Some(slot) = tops.get_mut(i).and_then(|t| t.get_mut(b)) {
                *slot = top;
            }
        }
        for (s, top) in self.searches.iter_mut().zip(&tops).filter(|(s, _)| !s.done) {
            s.advance(&self.params, &self.eos, top);
        }
    }

    /// The outputs, once every search is done.
    pub(crate) fn finish(self, tok: &Tokenizer) -> Result<Vec<BeamSearchOutput>> {
        let (eos, ignore_eos) = (self.eos, self.params.ignore_eos);
        self.searches
            .into_iter()
            .zip(self.texts)
            .map(|(s, prompt)| {
                let sequences = s
                    .finished
                    .into_iter()
                    .map(|h| {
                        let stopped = h.tokens.last().is_some_and(|t| eos.contains(t)) && !ignore_eos;
                        Ok(BeamSequence {
                            text: tok.decode(&h.tokens, true)?,
                            token_ids: h.tokens,
                            cumulative_logprob: h.cum,
                            score: h.score,
                            finish_reason: if stopped { FinishReason::Stop } else { FinishReason::Length },
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(BeamSearchOutput { prompt, prompt_token_ids: s.prompt, sequences })
            })
            .collect()
    }
}

/// The top continuations in a beam request's final output.
pub(crate) fn tops(o: &RequestOutput) -> Result<Vec<(u32, f32)>> {
    let position = o.outputs.first().and_then(|c| c.logprobs.as_ref()).and_then(|lp| lp.first());
    let Some(p) = position else {
        return Err(Error::Aborted(format!("beam search step {} ended without its token", o.request_id)));
    };
    Ok(p.top.iter().map(|t| (t.token_id, t.logprob)).collect())
}

/// Runs beam search for every prompt on `engine`, stepping it until done (`LLM::beam_search`;
/// other requests on the engine keep running, their outputs are dropped).
pub(crate) fn run(
    engine: &mut LLMEngine,
    prompts: Vec<Prompt>,
    p: &BeamSearchParams,
    lora: Option<&crate::LoraRequest>,
) -> Result<Vec<BeamSearchOutput>> {
    let input = engine.input_processor().clone();
    let mut search = BeamSearch::new(&input, prompts, p.clone())?.with_lora(&input, lora)?;
    for round in 1.. {
        let reqs = search.round(engine.input_processor(), "\u{1}beam", round)?;
        if reqs.is_empty() {
            break;
        }
        let mut pending: HashMap<String, BeamKey> = HashMap::with_capacity(reqs.len());
        let mut results = Vec::with_capacity(reqs.len());
        let outcome = (|| {
            for (req, key) in reqs {
                pending.insert(req.request_id().to_string(), key);
                engine.add_processed(req)?;
            }
            while !pending.is_empty() {
                for o in engine.step()? {
                    if let Some(key) = pending.remove(&o.request_id) {
                        results.push((key, tops(&o)?));
                    }
                }
            }
            Ok(())
        })();
        if let Err(e) = outcome {
            for id in pending.keys() {
                engine.abort_request(id);
            }
            return Err(e);
        }
        search.advance(results);
    }
    search.finish(engine.tokenizer())
}
