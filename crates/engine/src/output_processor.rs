//! The output processor: per request, outside the engine core, it turns the core's per-step
//! deltas into vLLM's [`RequestOutput`]s: incremental detokenization, stop strings (with the
//! possible start of one held back while streaming), decoded log probabilities, `best_of`
//! ranking, and the output kinds (cumulative, delta, final only). Cumulative outputs are built
//! only for requests that ask for them.

use vllm_sampler::{RequestOutputKind, TokenLogprobs};
use vllm_tokenizer::IncrementalDetokenizer;

use crate::core::{CoreOutput, Finish};
use crate::input::EngineRequest;
use crate::output::{CompletionOutput, FinishReason, Logprob, PositionLogprobs, RequestOutput, StopReason};
use crate::{Result, Tokenizer};

/// One generated sequence of a request.
struct Seq {
    detok: Option<IncrementalDetokenizer>,
    output_ids: Vec<u32>,
    logprobs: Option<Vec<PositionLogprobs>>,
    cumulative_logprob: Option<f64>,
    finish: Option<Finish>,
    /// The text cut at a matched stop string.
    stopped_text: Option<String>,
    /// Bytes of text already searched for stop strings.
    stop_checked: usize,
    /// Tokens and text bytes already returned (`RequestOutputKind::Delta`).
    emitted: (usize, usize),
}

impl Seq {
    fn text(&self) -> &str {
        match (&self.stopped_text, &self.detok) {
            (Some(t), _) => t,
            (None, Some(d)) => d.text(),
            (None, None) => "",
        }
    }

    /// Looks for a stop string in the text added since the last call; on a match, cuts the
    /// text and returns the string.
    fn find_stop(&mut self, stop: &[String], include: bool) -> Option<String> {
        let longest = stop.iter().map(String::len).max()?;
        let text = self.detok.as_ref()?.text();
        let mut from = self.stop_checked.saturating_sub(longest - 1);
        while !text.is_char_boundary(from) {
            from -= 1;
        }
        self.stop_checked = text.len();
        let (pos, s) =
            stop.iter().filter_map(|s| text[from..].find(s.as_str()).map(|i| (from + i, s))).min_by_key(|m| m.0)?;
        let end = if include { pos + s.len() } else { pos };
        self.stopped_text = Some(text[..end].to_string());
        Some(s.clone())
    }

    /// The output from token `from.0` and text byte `from.1` on. While running with stop
    /// strings, the last `hold_back` bytes are held back (they may start a stop string).
    fn output(&self, index: usize, hold_back: usize, from: (usize, usize)) -> CompletionOutput {
        let text = self.text();
        let mut end = text.len();
        if self.finish.is_none() && hold_back > 0 {
            end = end.saturating_sub(hold_back);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
        }
        let start = from.1.min(end);
        CompletionOutput {
            index,
            text: text.get(start..end).unwrap_or_default().to_string(),
            token_ids: self.output_ids.get(from.0..).unwrap_or_default().to_vec(),
            finish_reason: self.finish.as_ref().map(|f| f.0),
            stop_reason: self.finish.as_ref().and_then(|f| f.1.clone()),
            cumulative_logprob: self.cumulative_logprob,
            logprobs: self.logprobs.as_ref().map(|l| l.get(from.0..).unwrap_or_default().to_vec()),
        }
    }
}

/// What processing one core output produced.
pub(crate) struct Processed {
    /// The request's output now, when its kind wants one.
    pub output: Option<RequestOutput>,
    /// Sequences this processor ended (a stop string): the core should stop them.
    pub stopped: Vec<usize>,
}

/// A request's output state.
pub(crate) struct RequestState {
    request_id: String,
    prompt: Option<String>,
    prompt_ids: Vec<u32>,
    /// Sequences returned (the best `n` of `seqs` when `best_of` > `n`).
    n: usize,
    seqs: Vec<Seq>,
    num_cached_tokens: usize,
    stop: Vec<String>,
    include_stop: bool,
    kind: RequestOutputKind,
    /// Top alternatives per prompt position so far (the first position has none).
    prompt_logprobs: Option<Vec<Option<PositionLogprobs>>>,
    /// Whether an output was returned yet (delta outputs carry the prompt only in the first).
    sent_any: bool,
    /// Whether tokens are decoded (`detokenize`): without it, log probabilities carry no
    /// token text either.
    detokenize: bool,
}

impl RequestState {
    /// The state of a request about to be added to the core.
    pub(crate) fn new(req: &EngineRequest) -> Self {
        let p = &req.params;
        let seq = || Seq {
            detok: p.detokenize.then(|| IncrementalDetokenizer::new(&req.prompt_ids, p.skip_special_tokens)),
            output_ids: Vec::new(),
            logprobs: p.logprobs.map(|_| Vec::new()),
            cumulative_logprob: p.needs_logprobs().then_some(0.0),
            finish: None,
            stopped_text: None,
            stop_checked: 0,
            emitted: (0, 0),
        };
        Self {
            request_id: req.request_id.clone(),
            prompt: req.prompt.clone(),
            prompt_ids: req.prompt_ids.clone(),
            n: p.n,
            seqs: (0..p.num_sequences()).map(|_| seq()).collect(),
            num_cached_tokens: 0,
            stop: p.stop.clone(),
            include_stop: p.include_stop_str_in_output,
            kind: p.output_kind,
            prompt_logprobs: p.prompt_logprobs.map(|_| vec![None]),
            sent_any: false,
            detokenize: p.detokenize,
        }
    }

    /// The request's id.
    pub(crate) fn request_id(&self) -> &str {
        &self.request_id
    }

    /// The first returned sequence's finish reason (`abort` while unfinished), for metrics.
    pub(crate) fn finish_reason(&self) -> &'static str {
        self.seqs.first().and_then(|c| c.finish.as_ref()).map_or("abort", |f| f.0.as_str())
    }

    /// Whether every sequence has ended.
    pub(crate) fn finished(&self) -> bool {
        self.seqs.iter().all(|c| c.finish.is_some())
    }

    /// Applies one step's deltas.
    pub(crate) fn process(&mut self, out: CoreOutput, tok: &Tokenizer) -> Result<Processed> {
        self.num_cached_tokens = out.num_cached_tokens;
        if let Some(lps) = self.prompt_logprobs.as_mut() {
            for (token, lp) in &out.prompt_logprobs {
                lps.push(Some(position_logprobs(tok, *token, lp, self.detokenize)));
            }
        }
        let mut stopped = Vec::new();
        for d in out.seqs {
            let Some(c) = self.seqs.get_mut(d.index) else { continue };
            // A sequence this processor already stopped may still get a token or two from the
            // core before it hears about it: they are dropped.
            if c.finish.is_some() {
                continue;
            }
            if let Some(token) = d.token {
                c.output_ids.push(token);
                if let Some(det) = c.detok.as_mut() {
                    det.push(tok, token)?;
                }
                if let Some(lp) = &d.logprobs {
                    if let Some(cum) = c.cumulative_logprob.as_mut() {
                        *cum += lp.logprob as f64;
                    }
                    if let Some(v) = c.logprobs.as_mut() {
                        v.push(position_logprobs(tok, token, lp, self.detokenize));
                    }
                }
            }
            c.finish = d.finish;
            // A stop string ends the sequence even when the token also did (vLLM checks
            // strings after tokens, and cuts the text either way).
            if !self.stop.is_empty() {
                if let Some(matched) = c.find_stop(&self.stop, self.include_stop) {
                    if c.finish.is_none() {
                        stopped.push(d.index);
                    }
                    c.finish = Some((FinishReason::Stop, Some(StopReason::Text(matched))));
                }
            }
        }
        // The core ended the request (an abort) without ending every sequence.
        if out.finished {
            for c in self.seqs.iter_mut().filter(|c| c.finish.is_none()) {
                c.finish = Some((FinishReason::Abort, None));
            }
        }
        Ok(Processed { output: self.output(), stopped })
    }

    /// Ends every running sequence with `abort`; the final output.
    pub(crate) fn abort(&mut self) -> Option<RequestOutput> {
        for c in self.seqs.iter_mut().filter(|c| c.finish.is_none()) {
            c.finish = Some((FinishReason::Abort, None));
        }
        // An aborted best_of request returns its first n candidates unranked.
        self.seqs.truncate(self.n);
        self.output()
    }

    /// The request's output now; `None` while a `best_of` request is still running (its
    /// candidates are only ranked once all are done) or a final-only one is. Delta outputs
    /// hold only what is new since the previous call.
    fn output(&mut self) -> Option<RequestOutput> {
        let finished = self.finished();
        if !finished && (self.seqs.len() > self.n || self.kind == RequestOutputKind::FinalOnly) {
            return None;
        }
        let hold_back = self.stop.iter().map(String::len).max().unwrap_or(1) - 1;
        let order: Vec<usize> = if self.seqs.len() > self.n {
            let mut order: Vec<usize> = (0..self.seqs.len()).collect();
            let score = |i: usize| self.seqs[i].cumulative_logprob.unwrap_or(f64::NEG_INFINITY);
            order.sort_by(|&a, &b| score(b).total_cmp(&score(a)).then(a.cmp(&b)));
            order.truncate(self.n);
            order
        } else {
            (0..self.seqs.len()).collect()
        };
        let delta = self.kind == RequestOutputKind::Delta;
        let outputs = order
            .iter()
            .enumerate()
            .map(|(k, &i)| {
                let c = &mut self.seqs[i];
                let from = if delta { c.emitted } else { (0, 0) };
                let o = c.output(k, hold_back, from);
                if delta {
                    c.emitted = (from.0 + o.token_ids.len(), from.1 + o.text.len());
                }
                o
            })
            .collect();
        // Delta outputs carry the prompt in the first and the last output only.
        let with_prompt = !delta || !self.sent_any || finished;
        self.sent_any = true;
        Some(RequestOutput {
            request_id: self.request_id.clone(),
            prompt: if with_prompt { self.prompt.clone() } else { None },
            prompt_token_ids: if with_prompt { self.prompt_ids.clone() } else { Vec::new() },
            outputs,
            finished,
            num_cached_tokens: self.num_cached_tokens,
            prompt_logprobs: if !delta || finished { self.prompt_logprobs.clone() } else { None },
        })
    }
}

/// A position's log probabilities, with decoded tokens when `detokenize`.
fn position_logprobs(tokenizer: &Tokenizer, token: u32, lp: &TokenLogprobs, detokenize: bool) -> PositionLogprobs {
    let decode = |id: u32| if detokenize { tokenizer.decode(&[id], false).unwrap_or_default() } else { String::new() };
    PositionLogprobs {
        sampled: Logprob { token_id: token, logprob: lp.logprob, rank: lp.rank, decoded_token: decode(token) },
        top: lp
            .top
            .iter()
            .enumerate()
            .map(|(r, &(id, logprob))| Logprob { token_id: id, logprob, rank: r as u32 + 1, decoded_token: decode(id) })
            .collect(),
    }
}
