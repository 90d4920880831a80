//! Per-request KV-cache bookkeeping on top of the block pool.

use std::collections::HashMap;

use crate::hash::BlockHash;
use crate::pool::{BlockId, BlockPool};

/// Identifies a sequence inside the engine (the engine maps user request ids to these).
pub type SeqId = u64;

#[derive(Debug, Default, Clone)]
struct SeqBlocks {
    blocks: Vec<BlockId>,
    /// Hashes of the leading full blocks already registered in the prefix cache.
    hashes: Vec<BlockHash>,
}

/// A prefix-cache lookup result: blocks to reuse and the tokens they cover.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheHit {
    /// Blocks holding the cached prefix, in order.
    pub blocks: Vec<BlockId>,
    /// Number of prompt tokens they cover (a multiple of the block size).
    pub num_tokens: usize,
}

/// Hands out and reclaims the blocks of each sequence.
#[derive(Debug, Clone)]
pub struct KvCacheManager {
    pool: BlockPool,
    block_size: usize,
    seqs: HashMap<SeqId, SeqBlocks>,
    /// Prefix-cache statistics: queried and hit tokens.
    queries: u64,
    hits: u64,
}

impl KvCacheManager {
    /// A manager over `num_blocks` blocks of `block_size` tokens.
    pub fn new(num_blocks: usize, block_size: usize, enable_caching: bool) -> Self {
        assert!(block_size > 0, "block_size must be positive");
        Self { pool: BlockPool::new(num_blocks, enable_caching), block_size, seqs: HashMap::new(), queries: 0, hits: 0 }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// The underlying pool (read-only).
    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// Fraction of blocks in use.
    pub fn usage(&self) -> f32 {
        self.pool.usage()
    }

    /// (queried tokens, hit tokens) over the manager's lifetime.
    pub fn prefix_cache_stats(&self) -> (u64, u64) {
        (self.queries, self.hits)
    }

    /// Number of sequences holding blocks.
    pub fn num_seqs(&self) -> usize {
        self.seqs.len()
    }

    /// The block table of a sequence (empty if it holds none).
    pub fn block_ids(&self, seq: SeqId) -> &[BlockId] {
        self.seqs.get(&seq).map(|s| s.blocks.as_slice()).unwrap_or(&[])
    }

    /// Blocks needed to hold `num_tokens` tokens.
    pub fn blocks_for(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.block_size)
    }

    /// Finds the longest cached prefix of `tokens`. At least one token is always left to
    /// compute (the last prompt token must run through the model to produce logits).
    /// Pure lookup: statistics are recorded separately ([`Self::record_prefix_lookup`]) once the
    /// request is admitted, so a request that waits several steps is counted once.
    pub fn find_cached_prefix(&self, tokens: &[u32], extra: &[u64]) -> CacheHit {
        if !self.pool.caching_enabled() || tokens.is_empty() {
            return CacheHit::default();
        }
        let max_blocks = (tokens.len() - 1) / self.block_size;
        let mut hit = CacheHit::default();
        let mut parent: Option<BlockHash> = None;
        for chunk in tokens.chunks_exact(self.block_size).take(max_blocks) {
            let h = BlockHash::new(parent.as_ref(), chunk, extra);
            match self.pool.lookup(&h) {
                Some(id) => hit.blocks.push(id),
                None => break,
            }
            parent = Some(h);
        }
        hit.num_tokens = hit.blocks.len() * self.block_size;
        hit
    }

    /// Counts one admitted request's prefix-cache lookup (queried and hit tokens).
    pub fn record_prefix_lookup(&mut self, queried: usize, hit: usize) {
        if self.pool.caching_enabled() {
            self.queries += queried as u64;
            self.hits += hit as u64;
        }
    }

    /// Makes room for `seq` to hold `total_tokens` tokens, first adopting `hit` (only for a
    /// sequence that holds no blocks yet). Returns false, changing nothing, when the pool is
    /// short of blocks.
    pub fn allocate_slots(&mut self, seq: SeqId, total_tokens: usize, hit: &CacheHit) -> bool {
        let held = self.seqs.get(&seq).map_or(0, |s| s.blocks.len());
        debug_assert!(hit.blocks.is_empty() || held == 0, "cache hit for a running sequence");
        let needed = self.blocks_for(total_tokens).saturating_sub(held + hit.blocks.len());
        // Hit blocks with no other user are counted as free by the pool; reviving them takes
        // them out of the free queue.
        let revived = hit.blocks.iter().filter(|&&b| self.pool.ref_count(b) == 0).count();
        if needed + revived > self.pool.num_free() {
            return false;
        }
        self.pool.touch(&hit.blocks);
        let new = self.pool.allocate(needed).expect("free count checked above");
        let entry = self.seqs.entry(seq).or_default();
        if !hit.blocks.is_empty() {
            entry.blocks.extend_from_slice(&hit.blocks);
            // The hit blocks are full and already hashed: record their hashes so the chain
            // continues from them.
            for &b in &hit.blocks {
                let h = self.pool.block_hash(b).expect("cached block has a hash").clone();
                entry.hashes.push(h);
            }
        }
        entry.blocks.extend(new);
        true
    }

    /// Registers the full blocks of `tokens[..num_computed]` in the prefix cache (their K/V are
    /// written). Call after each step with the sequence's tokens and computed count.
    pub fn cache_full_blocks(&mut self, seq: SeqId, tokens: &[u32], num_computed: usize, extra: &[u64]) {
        if !self.pool.caching_enabled() {
            return;
        }
        let Some(entry) = self.seqs.get_mut(&seq) else {
            return;
        };
        let full = (num_computed.min(tokens.len()) / self.block_size).min(entry.blocks.len());
        while entry.hashes.len() < full {
            let i = entry.hashes.len();
            let chunk = &tokens[i * self.block_size..(i + 1) * self.block_size];
            let h = BlockHash::new(entry.hashes.last(), chunk, extra);
            self.pool.cache_block(entry.blocks[i], h.clone());
            entry.hashes.push(h);
        }
    }

    /// Releases every block of `seq` (last block first, so it is evicted first).
    pub fn free(&mut self, seq: SeqId) {
        if let Some(s) = self.seqs.remove(&seq) {
            self.pool.free(s.blocks.into_iter().rev());
        }
    }

    /// Checks pool invariants and that every block's ref count equals the number of sequences
    /// holding it. For tests.
    pub fn check_invariants(&self) {
        self.pool.check_invariants();
        let mut counts = vec![0u32; self.pool.num_blocks()];
        for s in self.seqs.values() {
            for &b in &s.blocks {
                counts[b as usize] += 1;
            }
        }
        for (b, &c) in counts.iter().enumerate() {
            assert_eq!(self.pool.ref_count(b as BlockId), c, "ref count of block {b}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_hit_reuses_blocks_and_leaves_one_token() {
        let mut m = KvCacheManager::new(8, 4, true);
        let prompt: Vec<u32> = (0..12).collect();
        assert!(m.allocate_slots(1, 12, &CacheHit::default()));
        m.cache_full_blocks(1, &prompt, 12, &[]);
        let first = m.block_ids(1).to_vec();
        m.free(1);
        // Same 12-token prompt: only 2 blocks may be reused (the last token must be computed).
        let hit = m.find_cached_prefix(&prompt, &[]);
        assert_eq!(hit.num_tokens, 8);
        assert_eq!(hit.blocks, first[..2].to_vec());
        assert!(m.allocate_slots(2, 13, &hit));
        assert_eq!(m.block_ids(2)[..2], first[..2]);
        m.check_invariants();
        // A different salt misses.
        assert_eq!(m.find_cached_prefix(&prompt, &[5]).num_tokens, 0);
        m.free(2);
        m.check_invariants();
        assert_eq!(m.pool().num_free(), 8);
    }

    #[test]
    fn failed_allocation_changes_nothing() {
        let mut m = KvCacheManager::new(2, 4, true);
        assert!(m.allocate_slots(1, 5, &CacheHit::default()));
        assert!(!m.allocate_slots(2, 1, &CacheHit::default()));
        assert_eq!(m.block_ids(2).len(), 0);
        m.check_invariants();
    }
}
