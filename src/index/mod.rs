//! The in-memory index: shards chosen by a hash of the user id, each a
//! locked table of 28-byte slots (a 64-bit digest of `(user, key)` and a
//! packed [`Entry`]).
//!
//! The digest is xxh3-64 of the key, seeded with the xxh3-64 hash of the
//! user id (which also picks the shard). The full user id and key stay in
//! the log: every read of a record compares them, so a digest collision
//! never replays one key's outcome for another; colliding live keys are
//! kept apart in a spill table (see `shard.rs`).

mod entry;
mod shard;

pub(crate) use entry::{Entry, MAX_DEADLINE_MS, OFFSET_LIMIT, TOKEN_LIMIT};
pub(crate) use shard::{Memory, PARTS, SLOT_BYTES, Shard, ShardMap};

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

#[cfg(test)]
thread_local! {
    /// Test hook: when set, every key hashed on this thread gets this
    /// digest, as if all of them collided.
    pub(crate) static FORCED_DIGEST: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// Where a `(user, key)` lives in the index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct KeyId {
    /// Hash of the user id; picks the shard.
    pub user_hash: u64,
    /// Digest of the pair; the key of the shard's table.
    pub digest: u64,
}

impl KeyId {
    /// Hashes a `(user, key)` pair: the user id once (which picks the
    /// shard), then the key seeded with the user's hash (the digest), so
    /// neither is hashed twice or copied.
    pub fn new(user: &[u8], key: &[u8]) -> KeyId {
        let user_hash = xxh3_64(user);
        let digest = xxh3_64_with_seed(key, user_hash);
        #[cfg(test)]
        let digest = FORCED_DIGEST.with(|forced| forced.get()).unwrap_or(digest);
        KeyId { user_hash, digest }
    }
}

/// The shards.
#[derive(Debug)]
pub(crate) struct Index {
    shards: Box<[Shard]>,
}

impl Index {
    /// An empty index of `shards` shards (at least one).
    pub fn new(shards: usize) -> Index {
        Index {
            shards: (0..shards.max(1)).map(|_| Shard::default()).collect(),
        }
    }

    /// The number of the shard that holds every key of `user`.
    pub fn shard_no(&self, user: &[u8]) -> usize {
        self.shard_of(xxh3_64(user))
    }

    fn shard_of(&self, user_hash: u64) -> usize {
        let n = self.shards.len() as u64;
        usize::try_from(user_hash % n).unwrap_or(0)
    }

    /// The shard that holds every key of `id`'s user.
    pub fn shard(&self, id: &KeyId) -> &Shard {
        let i = self.shard_of(id.user_hash);
        // In bounds: `i < n`, and `new` makes at least one shard.
        #[allow(clippy::indexing_slicing)]
        &self.shards[i]
    }

    /// Every shard, for whole-index passes.
    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// What every shard's tables hold in memory.
    pub fn memory(&self) -> Memory {
        let mut m = Memory::default();
        for s in self.shards.iter() {
            m += s.lock().memory();
        }
        m
    }

    /// Entries held, expired ones included.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }
}
