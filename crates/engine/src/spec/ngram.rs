//! Prompt lookup (vLLM's `ngram` method): the longest n-gram ending the sequence, between
//! `prompt_lookup_min` and `prompt_lookup_max` tokens, found earlier in the sequence (prompt or
//! output) proposes the tokens that followed its latest earlier occurrence.

use vllm_block::SeqId;

use super::Proposer;

/// The `ngram` proposer. Stateless: each step searches the sequence (one pass, at most
/// `max` comparisons per position).
pub(crate) struct NgramProposer {
    pub min: usize,
    pub max: usize,
}

impl Proposer for NgramProposer {
    fn propose(&mut self, _seq: SeqId, tokens: &[u32], _num_prompt: usize, k: usize) -> Vec<u32> {
        lookup(tokens, self.min, self.max, k)
    }
}

/// Up to `k` tokens following the latest earlier occurrence of the longest n-gram (`min..=max`
/// tokens) that ends `tokens`.
pub(crate) fn lookup(tokens: &[u32], min: usize, max: usize, k: usize) -> Vec<u32> {
    let n = tokens.len();
    if k == 0 || n < min + 1 {
        return Vec::new();
    }
    let max = max.min(n - 1);
    let last = tokens[n - 1];
    // `best`: (match length, end position of the earlier occurrence).
    let mut best: Option<(usize, usize)> = None;
    // Latest occurrences first, so on equal lengths the latest wins.
    for end in (0..n - 1).rev() {
        if tokens[end] != last {
            continue;
        }
        let mut len = 1;
        while len < max && len <= end && tokens[end - len] == tokens[n - 1 - len] {
            len += 1;
        }
        if len >= min && best.is_none_or(|(b, _)| len > b) {
            best = Some((len, end));
            if len == max {
                break;
            }
        }
    }
    let Some((_, end)) = best else { return Vec::new() };
    tokens[end + 1..].iter().take(k).copied().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proposes_what_followed_the_longest_latest_match() {
        // "1 2 3" occurred before, followed by 4 5 6.
        let t = [1, 2, 3, 4, 5, 6, 9, 1, 2, 3];
        assert_eq!(lookup(&t, 2, 3, 3), vec![4, 5, 6]);
        assert_eq!(lookup(&t, 2, 3, 10), vec![4, 5, 6, 9, 1, 2, 3]);
        // Too short a match.
        assert!(lookup(&t, 4, 4, 3).is_empty());
        // The longer match wins over a later shorter one: "7 3" later, "2 3" earlier.
        let t = [2, 3, 8, 7, 3, 5, 2, 3];
        assert_eq!(lookup(&t, 1, 2, 2), vec![8, 7]);
        // On equal lengths the latest occurrence wins.
        let t = [3, 1, 3, 2, 3];
        assert_eq!(lookup(&t, 1, 1, 1), vec![2]);
        assert!(lookup(&[1], 1, 1, 3).is_empty());
        assert!(lookup(&[1, 2, 3], 1, 2, 3).is_empty());
    }
}
