//! Scoring text pairs with a bi-encoder (vLLM's `LLM.score`, the server's `/score` and
//! `/rerank` on an embedding model): each text is embedded once, and a pair's score is the
//! cosine similarity of its two vectors.
//!
//! The pairs follow vLLM's rules: `text_1` one text and `text_2` one or many (1:1, 1:N: the
//! one text against each), or both lists of the same length (N:N, paired in order). Anything
//! else is an error naming the field before anything runs.

use crate::embed::Embedder;
use crate::lora::LoraRequest;
use crate::{Error, Prompt, Result};

/// One side of a scoring request: one text (or token ids), or a list of them.
#[derive(Debug, Clone, PartialEq)]
pub enum ScoreInput {
    /// A single text, scored against every text of the other side.
    One(Prompt),
    /// A list (a list of one behaves as [`ScoreInput::One`]).
    Many(Vec<Prompt>),
}

impl ScoreInput {
    /// The texts, in order.
    pub fn into_prompts(self) -> Vec<Prompt> {
        match self {
            ScoreInput::One(p) => vec![p],
            ScoreInput::Many(v) => v,
        }
    }
}

impl From<Prompt> for ScoreInput {
    fn from(p: Prompt) -> Self {
        ScoreInput::One(p)
    }
}
impl From<&str> for ScoreInput {
    fn from(s: &str) -> Self {
        ScoreInput::One(s.into())
    }
}
impl From<String> for ScoreInput {
    fn from(s: String) -> Self {
        ScoreInput::One(s.into())
    }
}
impl From<Vec<Prompt>> for ScoreInput {
    fn from(v: Vec<Prompt>) -> Self {
        ScoreInput::Many(v)
    }
}
impl From<Vec<String>> for ScoreInput {
    fn from(v: Vec<String>) -> Self {
        ScoreInput::Many(v.into_iter().map(Prompt::Text).collect())
    }
}
impl From<Vec<&str>> for ScoreInput {
    fn from(v: Vec<&str>) -> Self {
        ScoreInput::Many(v.into_iter().map(Prompt::from).collect())
    }
}
impl From<&[&str]> for ScoreInput {
    fn from(v: &[&str]) -> Self {
        ScoreInput::Many(v.iter().map(|&s| Prompt::from(s)).collect())
    }
}
impl<const N: usize> From<[&str; N]> for ScoreInput {
    fn from(v: [&str; N]) -> Self {
        ScoreInput::Many(v.iter().map(|&s| Prompt::from(s)).collect())
    }
}

/// vLLM's `ScoringOutput`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoringOutput {
    /// The pair's cosine similarity, in [-1, 1].
    pub score: f64,
}

/// vLLM's `ScoringRequestOutput`: one per pair, in pair order.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoringRequestOutput {
    /// `"0"`, `"1"`, ... in pair order.
    pub request_id: String,
    /// The pair's tokens: the first text's, then the second's (each truncated to the model's
    /// `max_seq_length`); their count is the pair's share of a response's usage.
    pub prompt_token_ids: Vec<u32>,
    /// The score.
    pub outputs: ScoringOutput,
    /// Always true.
    pub finished: bool,
}

/// How `n1` texts pair with `n2`: `Ok(true)` when the first side is one text against every
/// text of the second (1:1 or 1:N), `Ok(false)` for N:N in order; an empty side, or N:M with
/// N > 1 and N != M, is an error naming the field at fault (`text_1` / `text_2`).
pub fn pairing(n1: usize, n2: usize) -> Result<bool> {
    let bad = |param, message: String| Err(Error::InvalidArgument { param, message });
    if n1 == 0 {
        return bad("text_1", "at least one text must be given".into());
    }
    if n2 == 0 {
        return bad("text_2", "at least one text must be given".into());
    }
    if n1 == 1 {
        return Ok(true);
    }
    if n1 != n2 {
        return bad(
            "text_2",
            format!("{n2} texts for the {n1} of text_1: the counts must be 1:1, 1:N or N:N (vLLM's pairing)"),
        );
    }
    Ok(false)
}

/// Cosine similarity, accumulated in float64: `a . b / (|a| |b|)`, 0 when either is zero.
pub fn cosine_similarity(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let n = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let norms = n(a) * n(b);
    if norms == 0.0 {
        0.0
    } else {
        dot / norms
    }
}

impl Embedder {
    /// Scores the pairs of `text_1` and `text_2` (see the module's pairing rules), every text
    /// embedded with `lora` (or the base model). The texts are embedded in one
    /// [`Embedder::encode_with_lora`] call, `text_1`'s first (once, for 1:N), then
    /// `text_2`'s; a bad text or pairing is an error before anything runs.
    pub fn score_with_lora(
        &self,
        text_1: ScoreInput,
        text_2: ScoreInput,
        lora: Option<&LoraRequest>,
    ) -> Result<Vec<ScoringRequestOutput>> {
        let (left, right) = (text_1.into_prompts(), text_2.into_prompts());
        let one_to_many = pairing(left.len(), right.len())?;
        let n1 = left.len();
        let prompts: Vec<Prompt> = left.into_iter().chain(right).collect();
        let loras = match lora {
            Some(l) => vec![Some(l.clone()); prompts.len()],
            None => Vec::new(),
        };
        let outs = self.encode_with_lora(&prompts, &loras)?;
        let (first, second) = outs.split_at(n1);
        Ok(second
            .iter()
            .enumerate()
            .map(|(j, b)| {
                let a = &first[if one_to_many { 0 } else { j }];
                ScoringRequestOutput {
                    request_id: j.to_string(),
                    prompt_token_ids: [a.prompt_token_ids.as_slice(), b.prompt_token_ids.as_slice()].concat(),
                    outputs: ScoringOutput { score: cosine_similarity(&a.outputs.embedding, &b.outputs.embedding) },
                    finished: true,
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param(r: Result<bool>) -> &'static str {
        match r {
            Err(Error::InvalidArgument { param, .. }) => param,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pairs_follow_vllms_rules() {
        assert!(pairing(1, 1).unwrap());
        assert!(pairing(1, 5).unwrap());
        assert!(!pairing(3, 3).unwrap());
        assert_eq!(param(pairing(0, 3)), "text_1");
        assert_eq!(param(pairing(2, 0)), "text_2");
        assert_eq!(param(pairing(3, 2)), "text_2");
        // N:1 is not a pairing vLLM makes either.
        assert_eq!(param(pairing(3, 1)), "text_2");
    }

    #[test]
    fn cosine_of_known_vectors() {
        assert_eq!(cosine_similarity(&[1.0, 0.0], &[0.0, 2.0]), 0.0);
        assert!((cosine_similarity(&[1.0, 1.0], &[2.0, 2.0]) - 1.0).abs() < 1e-12);
        assert!((cosine_similarity(&[1.0, 0.0], &[-3.0, 0.0]) + 1.0).abs() < 1e-12);
        assert_eq!(cosine_similarity(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
    }
}
