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

/// Token comparisons one lookup may make beyond the scan itself.
const SEARCH_BUDGET: usize = 1 << 16;

/// Up to `k` tokens following the latest earlier occurrence of the longest n-gram (`min..=max`
/// tokens) that ends `tokens`. Occurrences followed by `k` tokens are preferred (in a
/// repeating sequence the latest occurrence is followed by too few); the others are looked at
/// only when none of those matches.
pub(crate) fn lookup(tokens: &[u32], min: usize, max: usize, k: usize) -> Vec<u32> {
    let n = tokens.len();
    if k == 0 || n < min + 1 {
        return Vec::new();
    }
    let full = (n - 1).saturating_sub(k);
    let best = search(tokens, min, max, (0..full).rev()).or_else(|| search(tokens, min, max, (full..n - 1).rev()));
    let Some((_, end)) = best else { return Vec::new() };
    tokens[end + 1..].iter().take(k).copied().collect()
}

/// The longest match (`min..=max` tokens) of the n-gram ending `tokens` that ends at one of
/// `ends` (latest first: on equal lengths the first found wins): (length, end position).
fn search(tokens: &[u32], min: usize, max: usize, ends: impl Iterator<Item = usize>) -> Option<(usize, usize)> {
    let n = tokens.len();
    let max = max.min(n - 1);
    let last = tokens[n - 1];
    let mut best: Option<(usize, usize)> = None;
    // A budget of comparisons bounds a step's work on degenerate sequences (one token
    // repeated: every position matches up to `max`); past it the best match so far stands.
    let mut budget = SEARCH_BUDGET;
    for end in ends {
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
        budget = budget.saturating_sub(len);
        if budget == 0 {
            break;
        }
    }
    best
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
        // A repeating sequence: the latest occurrence with a whole continuation.
        assert_eq!(lookup(&[1, 2, 3, 1, 2, 3, 1, 2, 3], 3, 3, 5), vec![1, 2, 3, 1, 2]);
        // One token repeated 100,000 times with the longest n-gram allowed: bounded work, and
        // still a proposal.
        let same = vec![7u32; 100_000];
        let t = std::time::Instant::now();
        assert_eq!(lookup(&same, 1, 1024, 4), vec![7; 4]);
        assert!(t.elapsed() < std::time::Duration::from_millis(200), "{:?}", t.elapsed());
        assert!(lookup(&[1, 2, 3], 1, 2, 3).is_empty());
    }
}
