//! The in-memory index: shards chosen by a hash of the user id, each a
//! locked table of compact entries keyed by a 128-bit digest of
//! `(user, key)`.
//!
//! The digest is xxh3-128 of the length-prefixed user id followed by the
//! key; two different pairs share a digest with probability about 2^-128.
//! The full user id and key are kept in the log and compared on every read
//! of a record, so a collision could never replay one user's outcome to
//! another: it would surface as an error.

mod entry;
mod shard;

pub(crate) use entry::Entry;
pub(crate) use shard::Shard;

use xxhash_rust::xxh3::{Xxh3, xxh3_64};

/// Where a `(user, key)` lives in the index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct KeyId {
    /// Hash of the user id; picks the shard.
    pub user_hash: u64,
    /// Digest of the pair; the key of the shard's table.
    pub digest: u128,
}

impl KeyId {
    /// Hashes a `(user, key)` pair. `user` is at most 65 535 bytes.
    pub fn new(user: &[u8], key: &[u8]) -> KeyId {
        let mut h = Xxh3::new();
        h.update(&(user.len() as u64).to_le_bytes());
        h.update(user);
        h.update(key);
        KeyId {
            user_hash: xxh3_64(user),
            digest: h.digest128(),
        }
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

    /// The shard that holds every key of `id`'s user.
    pub fn shard(&self, id: &KeyId) -> &Shard {
        let n = self.shards.len() as u64;
        let i = usize::try_from(id.user_hash % n).unwrap_or(0);
        // In bounds: `i < n`, and `new` makes at least one shard.
        #[allow(clippy::indexing_slicing)]
        &self.shards[i]
    }

    /// Every shard, for whole-index passes.
    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// Entries held, expired ones included.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }
}
