//! Prefix-cache block hashes.
//!
//! A full block's identity is (its parent's hash, its token ids, extra keys such as a LoRA id
//! or a per-request cache salt). The hash value is a 64-bit digest, and the key also keeps the
//! block's tokens and parent digest, so two different blocks never compare equal even if their
//! digests collide.

use std::hash::{DefaultHasher, Hash, Hasher};

/// The prefix-cache key of one full block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockHash {
    /// Digest over (parent digest, tokens, extra keys).
    pub value: u64,
    /// Digest of the parent block (`None` for a sequence's first block).
    pub parent: Option<u64>,
    /// The block's token ids.
    pub tokens: Box<[u32]>,
    /// Extra keys (LoRA id, cache salt), empty when none.
    pub extra: Box<[u64]>,
}

impl BlockHash {
    /// Hashes a block given its parent's hash.
    pub fn new(parent: Option<&BlockHash>, tokens: &[u32], extra: &[u64]) -> Self {
        let parent = parent.map(|p| p.value);
        let mut h = DefaultHasher::new();
        parent.hash(&mut h);
        tokens.hash(&mut h);
        extra.hash(&mut h);
        Self { value: h.finish(), parent, tokens: tokens.into(), extra: extra.into() }
    }
}

/// Hashing a key hashes its digest only (equality still compares everything), so a lookup
/// costs one `u64` hash.
impl Hash for BlockHash {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.value.hash(state);
    }
}

/// Hashes of the full blocks of `tokens`, chained from the first block.
pub fn hash_block_tokens(tokens: &[u32], block_size: usize, extra: &[u64]) -> Vec<BlockHash> {
    let mut out: Vec<BlockHash> = Vec::with_capacity(tokens.len() / block_size);
    for chunk in tokens.chunks_exact(block_size) {
        let h = BlockHash::new(out.last(), chunk, extra);
        out.push(h);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_depends_on_parent_and_extra() {
        let a = hash_block_tokens(&[1, 2, 3, 4, 5, 6, 7, 8], 4, &[]);
        let b = hash_block_tokens(&[9, 9, 9, 9, 5, 6, 7, 8], 4, &[]);
        assert_eq!(a.len(), 2);
        assert_ne!(a[1], b[1], "same tokens under a different parent must differ");
        let salted = hash_block_tokens(&[1, 2, 3, 4], 4, &[42]);
        assert_ne!(a[0], salted[0]);
        assert_eq!(a[0], hash_block_tokens(&[1, 2, 3, 4, 0], 4, &[])[0]);
    }
}
