//! The in-memory index: shards chosen by a hash of the user id, each a
//! locked table of 28-byte slots (a 64-bit digest of `(user, key)` and a
//! packed [`Entry`]).
//!
//! The digest is xxh3-64 of the length-prefixed user id followed by the
//! key. The full user id and key stay in the log: every read of a record
//! compares them, so a digest collision never replays one key's outcome for
//! another; colliding live keys are kept apart in a spill table (see
//! `shard.rs`).

mod entry;
mod shard;

pub(crate) use entry::{Entry, MAX_DEADLINE_MS, OFFSET_LIMIT, TOKEN_LIMIT};
pub(crate) use shard::{PARTS, Shard};

use xxhash_rust::xxh3::{Xxh3, xxh3_64};

/// Identities up to this size are hashed from a stack buffer.
const STACK_IDENTITY: usize = 512;

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
    /// Hashes a `(user, key)` pair. `user` is at most 65 535 bytes (checked
    /// by the engine), so its length fits the 2-byte prefix.
    pub fn new(user: &[u8], key: &[u8]) -> KeyId {
        let prefix = (user.len() as u16).to_le_bytes();
        let total = 2 + user.len() + key.len();
        let digest = if total <= STACK_IDENTITY {
            let mut buf = [0u8; STACK_IDENTITY];
            let parts = [&prefix[..], user, key];
            let mut at = 0;
            for part in parts {
                if let Some(dst) = buf.get_mut(at..at + part.len()) {
                    dst.copy_from_slice(part);
                }
                at += part.len();
            }
            xxh3_64(buf.get(..total).unwrap_or_default())
        } else {
            let mut h = Xxh3::new();
            h.update(&prefix);
            h.update(user);
            h.update(key);
            h.digest()
        };
        #[cfg(test)]
        let digest = FORCED_DIGEST.with(|forced| forced.get()).unwrap_or(digest);
        KeyId {
            user_hash: xxh3_64(user),
            digest,
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

    /// Entries held, expired ones included.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }
}
