//! # vllm-block
//!
//! Paged KV-cache memory management for vllm-rs, with no tensors in sight: the
//! [`BlockPool`] owns block ids, reference counts and an O(1) LRU free queue; the
//! [`KvCacheManager`] gives each sequence its block table and reuses cached prefixes by
//! chained block hashes ([`BlockHash`]).
//!
//! ```
//! use vllm_block::{CacheHit, KvCacheManager};
//!
//! let mut kv = KvCacheManager::new(16, 16, true);
//! assert!(kv.allocate_slots(7, 0, 40, &CacheHit::default()).is_ok()); // 40 tokens -> 3 blocks
//! assert_eq!(kv.block_ids(7).len(), 3);
//! kv.free(7);
//! assert_eq!(kv.pool().num_free(), 16);
//! ```

mod hash;
mod manager;
mod pool;

pub use hash::{hash_block_tokens, BlockHash};
pub use manager::{BlockCopy, CacheHit, KvCacheManager, KvMemoryUsage, NoFreeBlocks, SeqId};
pub use pool::{BlockId, BlockPool};
