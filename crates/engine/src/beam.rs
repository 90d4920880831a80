//! Beam search (vLLM's `LLM.beam_search`), with Hugging Face's selection rules.
//!
//! Each step every running beam is one engine request of one token that returns the top
//! `2 * beam_width` log probabilities of its next position; the prefix cache makes the beams of
//! a prompt share the blocks of their prompt and common prefix by reference count, so a step
//! computes little more than each beam's last partial block. Candidates are ranked exactly
//! like `transformers`' `generate(num_beams=..., length_penalty=..., early_stopping=...)`:
//! the top `2 * beam_width` continuations over all beams; an EOS (or a continuation reaching
//! `max_tokens`) among the first `beam_width` of them becomes a finished hypothesis scored
//! `cumulative_logprob / generated_len ^ length_penalty`; the best `beam_width` others run on.

use std::collections::HashMap;

use serde::Serialize;
use vllm_sampler::{SamplingParams, MAX_LOGPROBS};

use crate::core::{CoreOutput, EngineCore};
use crate::engine::LLMEngine;
use crate::input::InputProcessor;
use crate::output::{FinishReason, Prompt};
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

/// A beam search in progress, driven by whoever steps the engine (`LLM::beam_search` in a
/// loop of its own; the async engine between its other requests): each round submits one
/// request per running beam, collects their outputs and advances every prompt's search.
pub(crate) struct BeamJob {
    prefix: String,
    params: BeamSearchParams,
    eos: Vec<u32>,
    searches: Vec<Search>,
    texts: Vec<Option<String>>,
    round: u64,
    /// Request id of each submitted beam -> (prompt, beam).
    pending: HashMap<String, (usize, usize)>,
    tops: Vec<Vec<Vec<(u32, f32)>>>,
}

impl BeamJob {
    /// Validates and tokenizes (the input processor's work: call it off the engine thread);
    /// request ids start with `prefix`.
    pub(crate) fn new(
        input: &InputProcessor,
        prefix: String,
        prompts: Vec<Prompt>,
        p: BeamSearchParams,
    ) -> Result<Self> {
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
        Ok(Self { prefix, params: p, eos, searches, texts, round: 0, pending: HashMap::new(), tops: Vec::new() })
    }

    /// Submits the next round; false when every search is done (nothing submitted).
    pub(crate) fn submit(&mut self, core: &mut EngineCore, input: &InputProcessor) -> Result<bool> {
        if self.searches.iter().all(|s| s.done) {
            return Ok(false);
        }
        self.round += 1;
        let params = SamplingParams {
            logprobs: Some(2 * self.params.beam_width),
            ignore_eos: true,
            temperature: self.params.temperature,
            seed: Some(0),
            ..SamplingParams::greedy(1)
        };
        self.tops = self.searches.iter().map(|s| vec![Vec::new(); if s.done { 0 } else { s.running.len() }]).collect();
        for (i, s) in self.searches.iter().enumerate().filter(|(_, s)| !s.done) {
            for (b, (gen, _)) in s.running.iter().enumerate() {
                let id = format!("{}-{}-{i}-{b}", self.prefix, self.round);
                let ids = [s.prompt.as_slice(), gen].concat();
                let added = input.request_from_ids(id.clone(), ids, params.clone()).and_then(|mut req| {
                    req.scaled_logprobs = true;
                    core.add(req)
                });
                if let Err(e) = added {
                    self.abort(core);
                    return Err(e);
                }
                self.pending.insert(id, (i, b));
            }
        }
        Ok(true)
    }

    /// Takes a finished output of this job's current round; false if it is not one.
    pub(crate) fn accept(&mut self, o: &CoreOutput) -> Result<bool> {
        if !self.pending.contains_key(&o.request_id) {
            return Ok(false);
        }
        let Some(lp) = o.seqs.first().and_then(|d| d.logprobs.as_ref()) else {
            // Not this round's token yet (a prompt chunk), or an abort.
            return if o.finished { Err(Error::Internal("beam step without logprobs")) } else { Ok(true) };
        };
        if let Some((i, b)) = self.pending.remove(&o.request_id) {
            self.tops[i][b] = lp.top.clone();
        }
        Ok(true)
    }

    /// Whether the current round's outputs are all in.
    pub(crate) fn round_done(&self) -> bool {
        self.pending.is_empty()
    }

    /// Advances every search with the round's results.
    pub(crate) fn advance(&mut self) {
        for (s, top) in self.searches.iter_mut().zip(&self.tops).filter(|(s, _)| !s.done) {
            s.advance(&self.params, &self.eos, top);
        }
    }

    /// Aborts the round's requests (their blocks are freed).
    pub(crate) fn abort(&mut self, core: &mut EngineCore) {
        for id in self.pending.keys() {
            core.abort(id);
        }
        self.pending.clear();
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

/// Runs beam search for every prompt on `engine`, stepping it until done (`LLM::beam_search`;
/// other requests on the engine keep running, their outputs are dropped).
pub(crate) fn run(engine: &mut LLMEngine, prompts: Vec<Prompt>, p: &BeamSearchParams) -> Result<Vec<BeamSearchOutput>> {
    let mut job = BeamJob::new(engine.input_processor(), "\u{1}beam".into(), prompts, p.clone())?;
    loop {
        let (core, input) = engine.parts();
        if !job.submit(core, input)? {
            break;
        }
        while !job.round_done() {
            let mut accepted = Ok(());
            let stepped = engine.step_with(|o| {
                if let Err(e) = job.accept(&o) {
                    accepted = Err(e);
                }
            });
            if let Err(e) = stepped.and(accepted) {
                job.abort(engine.parts().0);
                return Err(e);
            }
        }
        job.advance();
    }
    job.finish(engine.tokenizer())
}
