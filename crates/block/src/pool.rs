//! The block pool: a flat arena of KV-cache blocks, their reference counts, an
//! index-linked free queue (O(1) removal from the middle) and the prefix-cache map.

use foldhash::{HashMap, HashMapExt};

use crate::hash::BlockHash;

/// Index of a block in the paged KV cache.
pub type BlockId = u32;

const NIL: u32 = u32::MAX;

#[derive(Debug, Clone)]
struct Block {
    ref_cnt: u32,
    /// Set once the block is full and its contents hashed; kept while the block is free so a
    /// later request can reuse it, cleared on eviction.
    hash: Option<BlockHash>,
    /// Free-queue links (indices into `blocks`, `sentinel` for the list ends).
    prev: u32,
    next: u32,
    in_free_queue: bool,
}

/// Owns every block id of the cache.
///
/// Free blocks (ref count zero) sit in an LRU queue: allocation takes from the head, frees
/// append to the tail. A free block that still carries a hash can be revived by a prefix-cache
/// hit, which unlinks it from the middle of the queue in O(1).
#[derive(Debug, Clone)]
pub struct BlockPool {
    blocks: Vec<Block>,
    /// Index of the sentinel node (== number of blocks); its `next` is the head, `prev` the tail.
    sentinel: u32,
    num_free: usize,
    cached: HashMap<BlockHash, BlockId>,
    enable_caching: bool,
}

impl BlockPool {
    /// A pool of `num_blocks` free blocks.
    pub fn new(num_blocks: usize, enable_caching: bool) -> Self {
        assert!(num_blocks < NIL as usize, "too many blocks");
        let n = num_blocks as u32;
        let mut blocks: Vec<Block> = (0..=n)
            .map(|i| Block {
                ref_cnt: 0,
                hash: None,
                prev: if i == 0 { n } else { i - 1 },
                next: if i == n { 0 } else { i + 1 },
                in_free_queue: i != n,
            })
            .collect();
        if num_blocks == 0 {
            blocks[0].next = 0;
            blocks[0].prev = 0;
        }
        Self { blocks, sentinel: n, num_free: num_blocks, cached: HashMap::new(), enable_caching }
    }

    /// Total number of blocks.
    pub fn num_blocks(&self) -> usize {
        self.sentinel as usize
    }

    /// Blocks with ref count zero (including cached ones that may be evicted).
    pub fn num_free(&self) -> usize {
        self.num_free
    }

    /// Whether prefix caching is on.
    pub fn caching_enabled(&self) -> bool {
        self.enable_caching
    }

    /// Fraction of blocks in use, in [0, 1].
    pub fn usage(&self) -> f32 {
        if self.num_blocks() == 0 {
            return 0.0;
        }
        1.0 - self.num_free as f32 / self.num_blocks() as f32
    }

    /// Reference count of a block (for tests and invariant checks).
    pub fn ref_count(&self, id: BlockId) -> u32 {
        self.blocks[id as usize].ref_cnt
    }

    /// Hash of a block, if it holds a full, hashed block of tokens.
    pub fn block_hash(&self, id: BlockId) -> Option<&BlockHash> {
        self.blocks[id as usize].hash.as_ref()
    }

    /// Number of blocks held in the prefix cache (in use or free).
    pub fn num_cached(&self) -> usize {
        self.cached.len()
    }

    fn unlink(&mut self, id: u32) {
        let (prev, next) = {
            let b = &self.blocks[id as usize];
            debug_assert!(b.in_free_queue);
            (b.prev, b.next)
        };
        self.blocks[prev as usize].next = next;
        self.blocks[next as usize].prev = prev;
        let b = &mut self.blocks[id as usize];
        b.prev = NIL;
        b.next = NIL;
        b.in_free_queue = false;
        self.num_free -= 1;
    }

    fn push_tail(&mut self, id: u32) {
        let s = self.sentinel;
        let tail = self.blocks[s as usize].prev;
        self.blocks[tail as usize].next = id;
        self.blocks[s as usize].prev = id;
        let b = &mut self.blocks[id as usize];
        b.prev = tail;
        b.next = s;
        b.in_free_queue = true;
        self.num_free += 1;
    }

    /// Takes `n` blocks from the head of the free queue (evicting their cached hashes), each
    /// with ref count one. Returns `None`, changing nothing, when fewer than `n` are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if n > self.num_free {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let head = self.blocks[self.sentinel as usize].next;
            self.unlink(head);
            if let Some(h) = self.blocks[head as usize].hash.take() {
                if self.cached.get(&h) == Some(&head) {
                    self.cached.remove(&h);
                }
            }
            self.blocks[head as usize].ref_cnt = 1;
            out.push(head);
        }
        Some(out)
    }

    /// Takes one more reference on blocks found by a prefix-cache lookup, reviving them from
    /// the free queue when their ref count was zero.
    pub fn touch(&mut self, ids: &[BlockId]) {
        for &id in ids {
            if self.blocks[id as usize].ref_cnt == 0 {
                self.unlink(id);
            }
            self.blocks[id as usize].ref_cnt += 1;
        }
    }

    /// Drops one reference on each block, in the order given; blocks reaching zero join the
    /// tail of the free queue (keeping their hash, so they stay reusable until evicted).
    pub fn free(&mut self, ids: impl IntoIterator<Item = BlockId>) {
        for id in ids {
            let b = &mut self.blocks[id as usize];
            assert!(b.ref_cnt > 0, "block {id} freed twice");
            b.ref_cnt -= 1;
            if b.ref_cnt == 0 {
                self.push_tail(id);
            }
        }
    }

    /// Looks up a full block by hash.
    pub fn lookup(&self, hash: &BlockHash) -> Option<BlockId> {
        if !self.enable_caching {
            return None;
        }
        self.cached.get(hash).copied()
    }

    /// Records that `id` now holds the full block described by `hash`. A block whose hash is
    /// already cached elsewhere stays uncached (the existing copy wins).
    pub fn cache_block(&mut self, id: BlockId, hash: BlockHash) {
        if !self.enable_caching || self.blocks[id as usize].hash.is_some() {
            return;
        }
        if self.cached.contains_key(&hash) {
            return;
        }
        self.cached.insert(hash.clone(), id);
        self.blocks[id as usize].hash = Some(hash);
    }

    /// Drops every cached hash (blocks in use keep their contents but become private).
    pub fn reset_prefix_cache(&mut self) {
        self.cached.clear();
        for b in &mut self.blocks {
            b.hash = None;
        }
    }

    /// Checks the free queue against the ref counts; panics on a broken invariant. For tests.
    pub fn check_invariants(&self) {
        let mut seen = 0;
        let mut cur = self.blocks[self.sentinel as usize].next;
        while cur != self.sentinel {
            let b = &self.blocks[cur as usize];
            assert!(b.in_free_queue && b.ref_cnt == 0, "block {cur} in free queue with refs");
            seen += 1;
            assert!(seen <= self.num_blocks(), "free queue has a cycle");
            cur = b.next;
        }
        assert_eq!(seen, self.num_free, "free count mismatch");
        let zero = self.blocks[..self.num_blocks()].iter().filter(|b| b.ref_cnt == 0).count();
        assert_eq!(zero, self.num_free, "blocks with zero refs not all in the free queue");
        for (h, &id) in &self.cached {
            assert_eq!(self.blocks[id as usize].hash.as_ref(), Some(h), "cache map out of sync");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_and_free_roundtrip() {
        let mut pool = BlockPool::new(4, true);
        let a = pool.allocate(3).unwrap();
        assert_eq!(a, vec![0, 1, 2]);
        assert_eq!(pool.num_free(), 1);
        assert!(pool.allocate(2).is_none());
        assert_eq!(pool.num_free(), 1, "failed allocation must not change the pool");
        pool.free(a.iter().rev().copied());
        assert_eq!(pool.num_free(), 4);
        // Tail-first free: the last block of the request (2) went back first, so after the
        // never-used block 3 it is the next evicted.
        assert_eq!(pool.allocate(2).unwrap(), vec![3, 2]);
        pool.check_invariants();
    }

    #[test]
    fn cached_block_survives_free_and_is_revived_from_the_middle() {
        let mut pool = BlockPool::new(3, true);
        let ids = pool.allocate(3).unwrap();
        let h = BlockHash::new(None, &[1, 2, 3, 4], &[]);
        pool.cache_block(ids[1], h.clone());
        pool.free(ids.clone());
        assert_eq!(pool.lookup(&h), Some(ids[1]));
        pool.touch(&[ids[1]]);
        assert_eq!(pool.ref_count(ids[1]), 1);
        assert_eq!(pool.num_free(), 2);
        pool.check_invariants();
        // Evicting: allocate the two other blocks, then free the cached one and allocate it.
        let rest = pool.allocate(2).unwrap();
        assert!(!rest.contains(&ids[1]));
        pool.free([ids[1]]);
        let again = pool.allocate(1).unwrap();
        assert_eq!(again, vec![ids[1]]);
        assert_eq!(pool.lookup(&h), None, "evicted block must leave the cache");
        pool.check_invariants();
    }

    #[test]
    fn caching_disabled_never_hits() {
        let mut pool = BlockPool::new(2, false);
        let ids = pool.allocate(1).unwrap();
        let h = BlockHash::new(None, &[7], &[]);
        pool.cache_block(ids[0], h.clone());
        assert_eq!(pool.lookup(&h), None);
    }
}
