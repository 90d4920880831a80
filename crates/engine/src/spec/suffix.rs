//! Suffix decoding (vLLM's `suffix` method, after Arctic Inference): the sequence's longest
//! suffix (up to `max_tree_depth` tokens) is matched in its own prompt and output and in the
//! outputs of recent requests; the occurrences of that suffix vote on what follows, and the
//! draft follows the most frequent branch token by token while the branch's estimated
//! probability stays above `min_token_prob`, for at most `max_spec_factor` tokens per matched
//! token.
//!
//! Both corpora are indexed by the hash of each position's last [`ANCHOR`] tokens, so a
//! lookup touches only the occurrences of the sequence's last few tokens (the latest
//! [`MAX_CANDIDATES`] of them), never a whole corpus. The cache of finished outputs is bounded in
//! requests and tokens; its index is rebuilt when evicted entries outnumber live ones.

use std::collections::{HashMap, VecDeque};

use vllm_block::SeqId;

use super::Proposer;
use crate::spec::SpeculativeConfig;

/// Tokens hashed per index entry: a match is at least this long.
const ANCHOR: usize = 2;
/// Occurrences of an anchor looked at per lookup (the latest ones).
const MAX_CANDIDATES: usize = 256;
/// Tokens of finished outputs kept, whatever `suffix_decoding_max_cached_requests` says.
pub const SUFFIX_MAX_CACHED_TOKENS: usize = 1 << 20;

fn anchor_key(t: &[u32]) -> u64 {
    // Two token ids packed; ANCHOR is 2.
    (u64::from(t[0]) << 32) | u64::from(t[1])
}

/// One running sequence: its tokens so far, indexed.
#[derive(Default)]
struct Own {
    tokens: Vec<u32>,
    num_prompt: usize,
    /// Anchor key -> end positions `p` (the anchor is `tokens[p + 1 - ANCHOR..=p]`), with a
    /// continuation at `p + 1`.
    index: HashMap<u64, Vec<u32>>,
    indexed: usize,
}

impl Own {
    /// Catches up with `tokens` (a sequence only grows; a shorter one restarts the index).
    fn update(&mut self, tokens: &[u32], num_prompt: usize) {
        if tokens.len() < self.tokens.len() || tokens[..self.tokens.len()] != self.tokens[..] {
            *self = Own::default();
        }
        self.num_prompt = num_prompt;
        self.tokens.extend_from_slice(&tokens[self.tokens.len()..]);
        // Positions with a continuation: up to len - 2.
        let end = self.tokens.len().saturating_sub(1);
        for p in self.indexed.max(ANCHOR - 1)..end {
            let key = anchor_key(&self.tokens[p + 1 - ANCHOR..=p]);
            self.index.entry(key).or_default().push(p as u32);
        }
        self.indexed = self.indexed.max(end);
    }
}

/// Finished outputs: a bounded FIFO of token sequences with one anchor index.
#[derive(Default)]
struct Cache {
    docs: VecDeque<Vec<u32>>,
    /// Number of the first doc in `docs` (docs are numbered as they arrive).
    first: u64,
    tokens: usize,
    /// Anchor key -> (doc number, end position); entries of evicted docs are skipped.
    index: HashMap<u64, Vec<(u64, u32)>>,
    stale: usize,
    live: usize,
}

impl Cache {
    fn doc(&self, no: u64) -> Option<&[u32]> {
        no.checked_sub(self.first).and_then(|i| self.docs.get(i as usize)).map(Vec::as_slice)
    }

    fn insert(&mut self, doc: Vec<u32>, max_docs: usize) {
        if doc.len() <= ANCHOR || max_docs == 0 {
            return;
        }
        let doc: Vec<u32> = doc.into_iter().take(SUFFIX_MAX_CACHED_TOKENS / 4).collect();
        let no = self.first + self.docs.len() as u64;
        for p in ANCHOR - 1..doc.len() - 1 {
            self.index.entry(anchor_key(&doc[p + 1 - ANCHOR..=p])).or_default().push((no, p as u32));
            self.live += 1;
        }
        self.tokens += doc.len();
        self.docs.push_back(doc);
        while self.docs.len() > max_docs || self.tokens > SUFFIX_MAX_CACHED_TOKENS {
            let Some(d) = self.docs.pop_front() else { break };
            self.first += 1;
            self.tokens -= d.len();
            let n = d.len().saturating_sub(ANCHOR);
            self.live -= n;
            self.stale += n;
        }
        if self.stale > self.live.max(1024) {
            let first = self.first;
            for v in self.index.values_mut() {
                v.retain(|&(no, _)| no >= first);
            }
            self.index.retain(|_, v| !v.is_empty());
            self.stale = 0;
        }
    }
}

/// The `suffix` proposer.
pub(crate) struct SuffixProposer {
    depth: usize,
    factor: f32,
    min_prob: f32,
    max_docs: usize,
    own: HashMap<SeqId, Own>,
    cache: Cache,
}

impl SuffixProposer {
    pub(crate) fn new(c: &SpeculativeConfig) -> Self {
        Self {
            depth: c.suffix_max_tree_depth,
            factor: c.suffix_max_spec_factor,
            min_prob: c.suffix_min_token_prob,
            max_docs: c.suffix_max_cached_requests,
            own: HashMap::new(),
            cache: Cache::default(),
        }
    }
}

/// Length of the common suffix of `a[..=end]` and `b` (at most `max`).
fn match_len(a: &[u32], end: usize, b: &[u32], max: usize) -> usize {
    let mut len = 0;
    while len < max && len <= end && len < b.len() && a[end - len] == b[b.len() - 1 - len] {
        len += 1;
    }
    len
}

impl Proposer for SuffixProposer {
    fn propose(&mut self, seq: SeqId, tokens: &[u32], num_prompt: usize, k: usize) -> Vec<u32> {
        let own = self.own.entry(seq).or_default();
        own.update(tokens, num_prompt);
        let n = tokens.len();
        if k == 0 || n < ANCHOR {
            return Vec::new();
        }
        let key = anchor_key(&tokens[n - ANCHOR..]);
        // Every occurrence as (its corpus, end position), with its match length.
        let mut cands: Vec<(&[u32], usize, usize)> = Vec::new();
        if let Some(ps) = own.index.get(&key) {
            for &p in ps.iter().rev().take(MAX_CANDIDATES) {
                let p = p as usize;
                cands.push((&own.tokens, p, match_len(&own.tokens, p, tokens, self.depth)));
            }
        }
        if let Some(ps) = self.cache.index.get(&key) {
            for &(no, p) in ps.iter().rev().take(MAX_CANDIDATES) {
                if let Some(d) = self.cache.doc(no) {
                    let p = p as usize;
                    cands.push((d, p, match_len(d, p, tokens, self.depth)));
                }
            }
        }
        let Some(best) = cands.iter().map(|c| c.2).max().filter(|&b| b >= ANCHOR) else {
            return Vec::new();
        };
        // The deepest matched node's occurrences vote on each next token.
        let mut live: Vec<(&[u32], usize)> = cands.iter().filter(|c| c.2 == best).map(|c| (c.0, c.1)).collect();
        let limit = k.min(((best as f32) * self.factor).ceil().max(1.0) as usize);
        let mut draft = Vec::with_capacity(limit);
        let mut prob = 1.0f32;
        let mut votes: HashMap<u32, usize> = HashMap::new();
        while draft.len() < limit {
            let j = draft.len() + 1;
            votes.clear();
            let mut total = 0usize;
            for &(d, p) in &live {
                if let Some(&t) = d.get(p + j) {
                    *votes.entry(t).or_default() += 1;
                    total += 1;
                }
            }
            // Most votes; the lower id on ties (deterministic).
            let Some((&t, &c)) = votes.iter().max_by_key(|&(&t, &c)| (c, std::cmp::Reverse(t))) else { break };
            prob *= c as f32 / total as f32;
            if prob < self.min_prob {
                break;
            }
            draft.push(t);
            live.retain(|&(d, p)| d.get(p + j) == Some(&t));
        }
        draft
    }

    fn finished(&mut self, seq: SeqId) {
        if let Some(own) = self.own.remove(&seq) {
            let output = own.tokens[own.num_prompt.min(own.tokens.len())..].to_vec();
            self.cache.insert(output, self.max_docs);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proposer() -> SuffixProposer {
        SuffixProposer::new(&SpeculativeConfig::suffix())
    }

    #[test]
    fn follows_the_sequence_own_earlier_text() {
        let mut p = proposer();
        // "5 6 7 8 9" earlier; the sequence now ends with "5 6 7".
        let t = [1, 5, 6, 7, 8, 9, 2, 5, 6, 7];
        // Matched 3 tokens (factor 1.0): at most 3 drafted.
        assert_eq!(p.propose(0, &t, 2, 10), vec![8, 9, 2]);
        assert_eq!(p.propose(0, &t, 2, 2), vec![8, 9]);
    }

    #[test]
    fn learns_from_finished_outputs_and_stops_at_unlikely_branches() {
        let mut p = proposer();
        p.propose(1, &[100, 1, 2, 3, 4, 5], 1, 4);
        p.finished(1);
        // A new request whose output starts like the finished one.
        assert_eq!(p.propose(2, &[200, 201, 1, 2], 2, 4), vec![3, 4]);
        // Ten more outputs that branch after "1 2": eleven branches, each below 0.1.
        for i in 0..10u32 {
            p.propose(10 + u64::from(i), &[9, 1, 2, 50 + i, 60], 1, 4);
            p.finished(10 + u64::from(i));
        }
        let d = p.propose(30, &[7, 7, 1, 2], 2, 4);
        assert!(d.len() <= 1, "{d:?}");
    }

    #[test]
    fn the_cache_is_bounded() {
        let mut c = Cache::default();
        for i in 0..50u32 {
            c.insert((0..100).map(|j| i * 1000 + j).collect(), 10);
        }
        assert_eq!(c.docs.len(), 10);
        assert!(c.index.values().map(Vec::len).sum::<usize>() <= 2 * 10 * 100 + 1024);
    }
}
