//! The schema-prefix KV cache: the attention state after a prompt's database-dependent head, kept so that the next
//! question over the same schema prefills only its own tokens.
//!
//! Invariants:
//! - **Key = sha256(model identity, exact prefix token ids).** The prefix holds the system text and the schema
//!   context as the caller may see it, so two roles that see different tables have different prefixes and can never
//!   share an entry; a schema change gives new tokens and a new entry (the old one ages out).
//! - **Bounded memory**: the sum of the entries' K/V bytes never exceeds the limit; inserting evicts least recently
//!   used entries first; an entry larger than the whole limit is not kept. A limit of 0 disables the cache.
//! - Entries are immutable snapshots ([`KvCache`] clones share tensors that are never written in place), so a hit
//!   hands out a clone and the stored state stays valid for the next question.

use crate::engine::model::KvCache;
use sha2::{Digest, Sha256};
use std::collections::HashMap;

pub type PrefixKey = [u8; 32];

/// Hash of a model identity and a prefix's token ids.
pub fn prefix_key(model_id: &str, tokens: &[u32]) -> PrefixKey {
    let mut h = Sha256::new();
    h.update((model_id.len() as u64).to_le_bytes());
    h.update(model_id.as_bytes());
    h.update((tokens.len() as u64).to_le_bytes());
    for t in tokens {
        h.update(t.to_le_bytes());
    }
    h.finalize().into()
}

pub use crate::engine::backend::CacheStats;

struct Entry {
    kv: KvCache,
    bytes: usize,
    last_used: u64,
}

/// An LRU of prefix states bounded by bytes.
#[derive(Default)]
pub struct PrefixCache {
    entries: HashMap<PrefixKey, Entry>,
    bytes: usize,
    limit_bytes: usize,
    clock: u64,
    hits: u64,
    misses: u64,
    evictions: u64,
}

impl PrefixCache {
    pub fn new(limit_bytes: usize) -> PrefixCache {
        PrefixCache { limit_bytes, ..Default::default() }
    }

    pub fn limit_bytes(&self) -> usize {
        self.limit_bytes
    }

    /// Change the bound; shrinking evicts at once.
    pub fn set_limit(&mut self, limit_bytes: usize) {
        self.limit_bytes = limit_bytes;
        self.evict_to(limit_bytes);
    }

    pub fn enabled(&self) -> bool {
        self.limit_bytes > 0
    }

    /// The state for `key`, counting a hit or a miss.
    pub fn get(&mut self, key: &PrefixKey) -> Option<KvCache> {
        self.clock += 1;
        match self.entries.get_mut(key) {
            Some(e) => {
                e.last_used = self.clock;
                self.hits += 1;
                Some(e.kv.clone())
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }

    /// Whether an entry is kept under `key` (no hit or miss counted, no change to its age).
    pub fn contains(&self, key: &PrefixKey) -> bool {
        self.entries.contains_key(key)
    }

    /// Keep `kv` under `key`, evicting least recently used entries to stay within the limit. Returns false when
    /// the entry was not kept (cache disabled, or the entry alone exceeds the limit).
    pub fn insert(&mut self, key: PrefixKey, kv: KvCache) -> bool {
        let bytes = kv.bytes();
        if bytes > self.limit_bytes {
            return false;
        }
        if let Some(old) = self.entries.remove(&key) {
            self.bytes -= old.bytes;
        }
        self.evict_to(self.limit_bytes - bytes);
        self.clock += 1;
        self.entries.insert(key, Entry { kv, bytes, last_used: self.clock });
        self.bytes += bytes;
        true
    }

    fn evict_to(&mut self, target: usize) {
        while self.bytes > target {
            let Some((&oldest, _)) = self.entries.iter().min_by_key(|(_, e)| e.last_used) else { break };
            let e = self.entries.remove(&oldest).expect("key just found");
            self.bytes -= e.bytes;
            self.evictions += 1;
        }
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            entries: self.entries.len(),
            bytes: self.bytes,
            limit_bytes: self.limit_bytes,
            hits: self.hits,
            misses: self.misses,
            evictions: self.evictions,
        }
    }
}

/// How many leading tokens of `full` may be served from a cached prefix: the longest common head of the prefix
/// text's tokens and the full prompt's tokens (a BPE merge across the boundary makes the prefix's last token
/// differ), and never the whole prompt — at least one token must be run to get logits.
pub fn shared_prefix_len(prefix_tokens: &[u32], full: &[u32]) -> usize {
    let common = prefix_tokens.iter().zip(full).take_while(|(a, b)| a == b).count();
    common.min(full.len().saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::model::KvCache;

    fn kv_of(bytes_per_token: usize, tokens: usize) -> KvCache {
        KvCache::synthetic(bytes_per_token, tokens)
    }

    #[test]
    fn key_depends_on_model_and_every_token() {
        let a = prefix_key("m1", &[1, 2, 3]);
        assert_eq!(a, prefix_key("m1", &[1, 2, 3]));
        assert_ne!(a, prefix_key("m2", &[1, 2, 3]));
        assert_ne!(a, prefix_key("m1", &[1, 2, 4]));
        assert_ne!(a, prefix_key("m1", &[1, 2]));
        // No ambiguity between the model id and the tokens.
        assert_ne!(prefix_key("m", &[]), prefix_key("", &[u32::from_le_bytes(*b"m\0\0\0")]));
    }

    #[test]
    fn lru_stays_within_its_bound_and_evicts_the_oldest() {
        let mut c = PrefixCache::new(1000);
        let (k1, k2, k3) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        assert!(c.insert(k1, kv_of(8, 50))); // 400 bytes
        assert!(c.insert(k2, kv_of(8, 50))); // 800
        assert!(c.get(&k1).is_some()); // k1 is now the most recent
        assert!(c.insert(k3, kv_of(8, 50))); // 1200 > 1000: k2 goes
        let s = c.stats();
        assert_eq!((s.entries, s.bytes, s.evictions), (2, 800, 1));
        assert!(c.get(&k2).is_none());
        assert!(c.get(&k1).is_some() && c.get(&k3).is_some());
        assert_eq!((c.stats().hits, c.stats().misses), (3, 1));
        assert!(c.stats().bytes <= c.limit_bytes());
    }

    #[test]
    fn oversized_entries_and_a_zero_limit_keep_nothing() {
        let mut c = PrefixCache::new(100);
        assert!(!c.insert([9u8; 32], kv_of(8, 50)));
        assert_eq!(c.stats().entries, 0);
        let mut off = PrefixCache::new(0);
        assert!(!off.enabled());
        assert!(!off.insert([1u8; 32], kv_of(8, 1)));
    }

    #[test]
    fn shrinking_the_limit_evicts_and_reinserting_replaces() {
        let mut c = PrefixCache::new(1000);
        c.insert([1u8; 32], kv_of(8, 50));
        c.insert([2u8; 32], kv_of(8, 50));
        c.insert([2u8; 32], kv_of(8, 25)); // replaced, not added
        assert_eq!(c.stats().bytes, 600);
        c.set_limit(300);
        assert_eq!(c.stats().entries, 1);
        assert!(c.stats().bytes <= 300);
    }

    #[test]
    fn shared_prefix_stops_at_the_first_difference_and_leaves_one_token() {
        assert_eq!(shared_prefix_len(&[1, 2, 3, 9], &[1, 2, 3, 4, 5]), 3);
        assert_eq!(shared_prefix_len(&[1, 2, 3], &[1, 2, 3]), 2);
        assert_eq!(shared_prefix_len(&[], &[1]), 0);
        assert_eq!(shared_prefix_len(&[7], &[1, 2]), 0);
    }
}
