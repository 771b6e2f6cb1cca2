//! Ids a producer sends, hashed once per lookup. A sharded table takes the shard from the key's
//! hash and finds the entry in that shard's `hashbrown::HashTable` with the same hash, where a map
//! in each shard would hash the key a second time. SipHash keyed per table (std's `RandomState`):
//! a producer can aim its ids at neither a shard nor a bucket, nor make two of them collide where
//! only the hash is kept (the watchdog's open tool calls).

use std::hash::{BuildHasher, RandomState};

/// Hashes the keys of one sharded table.
#[derive(Debug, Default)]
pub struct KeyHasher(RandomState);

impl KeyHasher {
    pub fn hash<'a>(&self, key: &'a str) -> Hashed<'a> {
        Hashed {
            hash: self.0.hash_one(key),
            key,
        }
    }
}

/// A key with its hash.
#[derive(Debug, Clone, Copy)]
pub struct Hashed<'a> {
    pub hash: u64,
    pub key: &'a str,
}

impl Hashed<'_> {
    /// The shard of `shards` the key belongs to. Taken from the hash's upper half: a
    /// `HashTable` places entries by its low bits and tells them apart by its top seven, so the
    /// entries of one shard still spread over all of that shard's buckets.
    pub fn shard(&self, shards: usize) -> usize {
        (self.hash >> 32) as usize % shards
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_hashes_alike_every_time_and_keys_spread_over_shards() {
        let hasher = KeyHasher::default();
        assert_eq!(hasher.hash("run_1").hash, hasher.hash("run_1").hash);
        let mut used = [0usize; 16];
        for n in 0..1600 {
            used[hasher.hash(&format!("run_{n}")).shard(16)] += 1;
        }
        assert!(used.iter().all(|&n| n > 50), "{used:?}");
    }
}
