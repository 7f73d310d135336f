//! One shard of the index: a locked hash table of entries keyed by digest.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use parking_lot::{Mutex, MutexGuard};

use super::entry::Entry;

/// A hasher for keys that are already uniform digests: it keeps the low
/// 64 bits instead of hashing them again.
#[derive(Default)]
pub(crate) struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u128(&mut self, n: u128) {
        self.0 = n as u64;
    }
}

/// The table inside a shard's lock.
///
/// # Invariants
/// - One live lease per key: an entry is replaced by a new `InProgress`
///   entry only when it is absent or expired (decided by `state.rs` under
///   this lock), so two live leases never coexist.
/// - Fencing tokens strictly increase: every new lease takes the next token
///   of the log's counter while this lock is held.
/// - `removed_pos` is at least the log position of every release applied to
///   this shard, so an answer of "absent" can wait until that is durable.
#[derive(Debug, Default)]
pub(crate) struct ShardMap {
    map: HashMap<u128, Entry, BuildHasherDefault<DigestHasher>>,
    removed_pos: u64,
}

impl ShardMap {
    /// The entry for `digest`, expired or not.
    pub fn get(&self, digest: u128) -> Option<Entry> {
        self.map.get(&digest).copied()
    }

    /// Installs or replaces an entry.
    pub fn insert(&mut self, digest: u128, entry: Entry) {
        self.map.insert(digest, entry);
    }

    /// Removes an entry because of the log record at `pos`.
    pub fn remove(&mut self, digest: u128, pos: u64) {
        self.map.remove(&digest);
        self.removed_pos = self.removed_pos.max(pos);
    }

    /// The position of the latest release in this shard.
    pub fn removed_pos(&self) -> u64 {
        self.removed_pos
    }

    /// Number of entries, expired ones included.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Drops every entry that is expired at `now_ms`; returns how many.
    pub fn drop_expired(&mut self, now_ms: u64) -> usize {
        let before = self.map.len();
        self.map.retain(|_, e| e.is_live(now_ms));
        before - self.map.len()
    }
}

/// A shard: its table behind a parking_lot mutex.
#[derive(Debug, Default)]
pub(crate) struct Shard {
    map: Mutex<ShardMap>,
}

impl Shard {
    /// Locks the shard. Never hold the guard across an fsync.
    pub fn lock(&self) -> MutexGuard<'_, ShardMap> {
        self.map.lock()
    }
}
