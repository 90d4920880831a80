//! Per-request KV-cache bookkeeping on top of the block pool.

use foldhash::{HashMap, HashMapExt};

use crate::hash::BlockHash;
use crate::pool::{BlockId, BlockPool};

/// Identifies a sequence inside the engine (the engine maps user request ids to these).
pub type SeqId = u64;

#[derive(Debug, Default, Clone)]
struct SeqBlocks {
    blocks: Vec<BlockId>,
    /// Hashes of the leading full blocks already registered in the prefix cache.
    hashes: Vec<BlockHash>,
    /// Tokens the blocks have slots for (held now, or written by the step being run).
    num_tokens: usize,
}

/// A block to copy before the next step writes into it (copy-on-write of a block shared by
/// several sequences, such as the partial last prompt block of parallel samples).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockCopy {
    /// The shared block.
    pub src: BlockId,
    /// The sequence's new private copy.
    pub dst: BlockId,
}

/// The pool has too few free blocks for an allocation (nothing was changed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("out of free KV-cache blocks")]
pub struct NoFreeBlocks;

/// How well the cache in use is filled: the PagedAttention paper's waste measure.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvMemoryUsage {
    /// Blocks held by at least one sequence.
    pub blocks_in_use: usize,
    /// Token slots in those blocks (`blocks_in_use * block_size`).
    pub slots_in_use: usize,
    /// Distinct slots holding a token (a block shared by several sequences counts once).
    pub tokens_held: usize,
    /// Tokens the sequences hold, counting shared blocks once per sequence (what a cache
    /// without sharing would need).
    pub logical_tokens: usize,
}

impl KvMemoryUsage {
    /// Slots in use that hold no token, as a fraction of the slots in use (0 when idle).
    pub fn waste(&self) -> f64 {
        if self.slots_in_use == 0 {
            return 0.0;
        }
        (self.slots_in_use - self.tokens_held) as f64 / self.slots_in_use as f64
    }
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

    /// Makes room for `seq` to hold `total_tokens` tokens, of which the first `num_computed`
    /// are already in the cache, first adopting `hit` (only for a sequence that holds no blocks
    /// yet; then `num_computed` is `hit.num_tokens`).
    ///
    /// When the new tokens go into a partial block that other sequences share, the sequence
    /// gets a private copy of it: the returned [`BlockCopy`] must be applied to the cache
    /// before the step writes. Fails, changing nothing, when the pool is short of blocks.
    pub fn allocate_slots(
        &mut self,
        seq: SeqId,
        num_computed: usize,
        total_tokens: usize,
        hit: &CacheHit,
    ) -> Result<Option<BlockCopy>, NoFreeBlocks> {
        let (held, shared_tail) = match self.seqs.get(&seq) {
            Some(s) => {
                let j = num_computed / self.block_size;
                let writes_partial = !num_computed.is_multiple_of(self.block_size) && total_tokens > num_computed;
                let shared = writes_partial && j < s.blocks.len() && self.pool.ref_count(s.blocks[j]) > 1;
                (s.blocks.len(), shared.then_some(j))
            }
            None => (0, None),
        };
        debug_assert!(hit.blocks.is_empty() || held == 0, "cache hit for a running sequence");
        let needed =
            self.blocks_for(total_tokens).saturating_sub(held + hit.blocks.len()) + shared_tail.is_some() as usize;
        // Hit blocks with no other user are counted as free by the pool; reviving them takes
        // them out of the free queue.
        let revived = hit.blocks.iter().filter(|&&b| self.pool.ref_count(b) == 0).count();
        if needed + revived > self.pool.num_free() {
            return Err(NoFreeBlocks);
        }
        self.pool.touch(&hit.blocks);
        let mut new = self.pool.allocate(needed).ok_or(NoFreeBlocks)?;
        let entry = self.seqs.entry(seq).or_default();
        entry.num_tokens = entry.num_tokens.max(total_tokens);
        let copy = shared_tail.map(|j| {
            let dst = new.pop().expect("the copy's block was allocated");
            let src = std::mem::replace(&mut entry.blocks[j], dst);
            BlockCopy { src, dst }
        });
        if let Some(c) = copy {
            // The other holders keep the shared block (its ref count was above one).
            self.pool.free([c.src]);
        }
        let entry = self.seqs.get_mut(&seq).expect("entry created above");
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
        Ok(copy)
    }

    /// Makes `child` share every block of `parent` (one more reference each), as parallel
    /// samples share their prompt. Later writes into a shared partial block copy it first
    /// (see [`Self::allocate_slots`]).
    pub fn fork(&mut self, parent: SeqId, child: SeqId) {
        let Some(p) = self.seqs.get(&parent).cloned() else {
            return;
        };
        debug_assert!(!self.seqs.contains_key(&child), "fork into a sequence that holds blocks");
        self.pool.touch(&p.blocks);
        self.seqs.insert(child, p);
    }

    /// Blocks in use against the tokens they hold (shared blocks counted once).
    pub fn memory_usage(&self) -> KvMemoryUsage {
        // Private blocks are counted directly; only shared ones need a per-block maximum.
        let mut shared: HashMap<BlockId, usize> = HashMap::new();
        let (mut private, mut logical) = (0, 0);
        for s in self.seqs.values() {
            logical += s.num_tokens;
            for (j, &b) in s.blocks.iter().enumerate() {
                let n = s.num_tokens.saturating_sub(j * self.block_size).min(self.block_size);
                if self.pool.ref_count(b) == 1 {
                    private += n;
                } else {
                    let e = shared.entry(b).or_insert(0);
                    *e = (*e).max(n);
                }
            }
        }
        let blocks_in_use = self.pool.num_blocks() - self.pool.num_free();
        KvMemoryUsage {
            blocks_in_use,
            slots_in_use: blocks_in_use * self.block_size,
            tokens_held: private + shared.values().sum::<usize>(),
            logical_tokens: logical,
        }
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

    /// Shrinks `seq` to `num_tokens` tokens, freeing its blocks past them (the slots of
    /// rejected draft tokens). Blocks registered in the prefix cache are kept.
    pub fn trim(&mut self, seq: SeqId, num_tokens: usize) {
        let keep = self.blocks_for(num_tokens);
        let Some(entry) = self.seqs.get_mut(&seq) else {
            return;
        };
        let keep = keep.max(entry.hashes.len());
        entry.num_tokens = entry.num_tokens.min(num_tokens.max(entry.hashes.len() * self.block_size));
        if entry.blocks.len() > keep {
            let freed = entry.blocks.split_off(keep);
            self.pool.free(freed.into_iter().rev());
        }
    }

    /// Releases every block of `seq` (last block first, so it is evicted first).
    pub fn free(&mut self, seq: SeqId) {
        if let Some(s) = self.seqs.remove(&seq) {
            self.pool.free(s.blocks.into_iter().rev());
        }
    }

    /// Checks pool invariants, that every block's ref count equals the number of sequences
    /// holding it, and that no sequence holds a block twice. For tests.
    pub fn check_invariants(&self) {
        self.pool.check_invariants();
        let mut counts = vec![0u32; self.pool.num_blocks()];
        for (id, s) in &self.seqs {
            let mut own = s.blocks.clone();
            own.sort_unstable();
            own.dedup();
            assert_eq!(own.len(), s.blocks.len(), "sequence {id} holds a block twice");
            assert!(s.blocks.len() >= self.blocks_for(s.num_tokens), "sequence {id} has too few blocks");
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
        assert_eq!(m.allocate_slots(1, 0, 12, &CacheHit::default()), Ok(None));
        m.cache_full_blocks(1, &prompt, 12, &[]);
        let first = m.block_ids(1).to_vec();
        m.free(1);
        // Same 12-token prompt: only 2 blocks may be reused (the last token must be computed).
        let hit = m.find_cached_prefix(&prompt, &[]);
        assert_eq!(hit.num_tokens, 8);
        assert_eq!(hit.blocks, first[..2].to_vec());
        assert_eq!(m.allocate_slots(2, 8, 13, &hit), Ok(None));
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
        assert!(m.allocate_slots(1, 0, 5, &CacheHit::default()).is_ok());
        assert_eq!(m.allocate_slots(2, 0, 1, &CacheHit::default()), Err(NoFreeBlocks));
        assert_eq!(m.block_ids(2).len(), 0);
        m.check_invariants();
    }

    #[test]
    fn forked_sequences_copy_the_shared_partial_block_on_write() {
        let mut m = KvCacheManager::new(8, 4, true);
        // A 6-token prompt: one full block and a partial one.
        m.allocate_slots(1, 0, 6, &CacheHit::default()).unwrap();
        m.fork(1, 2);
        m.fork(1, 3);
        let shared = m.block_ids(1).to_vec();
        assert_eq!(m.block_ids(2), shared.as_slice());
        assert_eq!(m.pool().ref_count(shared[1]), 3);
        m.check_invariants();
        // Each appends its first sampled token at position 6: the first two writers copy the
        // partial block, the last one writes in place.
        let c2 = m.allocate_slots(2, 6, 7, &CacheHit::default()).unwrap().expect("copy");
        assert_eq!(c2.src, shared[1]);
        let c3 = m.allocate_slots(3, 6, 7, &CacheHit::default()).unwrap().expect("copy");
        assert_eq!(m.allocate_slots(1, 6, 7, &CacheHit::default()), Ok(None));
        assert_eq!(m.pool().ref_count(shared[0]), 3, "the full block stays shared");
        assert_eq!(m.pool().ref_count(shared[1]), 1);
        assert_ne!(c2.dst, c3.dst);
        assert_eq!(m.block_ids(2), &[shared[0], c2.dst]);
        m.check_invariants();
        let u = m.memory_usage();
        assert_eq!((u.blocks_in_use, u.tokens_held, u.logical_tokens), (4, 4 + 3 * 3, 21));
        for s in [1, 2, 3] {
            m.free(s);
        }
        m.check_invariants();
        assert_eq!(m.pool().num_free(), 8);
    }

    #[test]
    fn a_copy_needs_a_free_block() {
        let mut m = KvCacheManager::new(2, 4, false);
        m.allocate_slots(1, 0, 6, &CacheHit::default()).unwrap();
        m.fork(1, 2);
        assert_eq!(m.allocate_slots(2, 6, 7, &CacheHit::default()), Err(NoFreeBlocks));
        assert_eq!(m.pool().ref_count(m.block_ids(1)[1]), 2, "failed copy changes nothing");
        m.check_invariants();
    }

    #[test]
    fn evicts_least_recently_freed_cached_blocks_first() {
        let mut m = KvCacheManager::new(4, 2, true);
        let (a, b): (Vec<u32>, Vec<u32>) = (vec![1, 2, 3], vec![7, 8, 9]);
        m.allocate_slots(1, 0, 3, &CacheHit::default()).unwrap();
        m.cache_full_blocks(1, &a, 3, &[]);
        m.free(1);
        m.allocate_slots(2, 0, 3, &CacheHit::default()).unwrap();
        m.cache_full_blocks(2, &b, 3, &[]);
        m.free(2);
        assert_eq!(m.pool().num_cached(), 2);
        // Three blocks are taken from the head of the free queue in the order they were freed
        // (a's partial block, a's cached block, b's partial block), so b's cached block, freed
        // last, stays reusable.
        m.allocate_slots(3, 0, 6, &CacheHit::default()).unwrap();
        assert_eq!(m.find_cached_prefix(&a, &[]).num_tokens, 0, "a was evicted");
        assert_eq!(m.find_cached_prefix(&b, &[]).num_tokens, 2, "b is still cached");
        m.free(3);
        m.check_invariants();
    }
}
