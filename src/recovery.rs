//! Recovery on open: replay every segment into the index.
//!
//! The log decides what is valid (CRCs, torn tail or corruption; see
//! `log/reader.rs`) and in which order segments replay; this module decides
//! what each valid record does to the index, through the transition table
//! (`state::replay`). Fencing tokens resume above the highest token the
//! log has seen.

use std::sync::Arc;

use parking_lot::Mutex;

use crate::clock::{EngineClock, Now};
use crate::error::{CorruptKind, Error, Result};
use crate::index::{Index, KeyId, OFFSET_LIMIT, ShardMap, TOKEN_LIMIT};
use crate::log::record::{Kind, Record};
use crate::log::{Log, Replayed};
use crate::options::Options;
use crate::state;
use crate::stats::Counters;
use crate::storage::Storage;

/// Opens the log in `storage` and rebuilds `index` from it; records that are
/// expired at the clock's current time are dropped from memory.
pub(crate) fn recover(
    storage: Arc<dyn Storage>,
    options: &Options,
    clock: &EngineClock,
    counters: Arc<Counters>,
    index: &Index,
) -> Result<Arc<Log>> {
    #[cfg(feature = "tracing")]
    let started = std::time::Instant::now();
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    let lanes = lanes(index);
    let log = Log::open(
        storage,
        options,
        counters,
        lanes,
        |lane, record, pos, replayed| {
            if index.shard_no(record.user) % lanes != lane {
                return; // another lane's share
            }
            if let Err(e) = apply(index, &record, pos, replayed) {
                failure.lock().get_or_insert(e);
            }
        },
    )?;
    if let Some(e) = failure.into_inner() {
        return Err(e);
    }
    let now = clock.read();
    for shard in index.shards() {
        shard.lock().drop_expired(now);
    }
    crate::trace::event!(
        info,
        live = index.len(),
        segments = log.segment_count(),
        micros = started.elapsed().as_micros() as u64,
        "recovered"
    );
    Ok(log)
}

/// How many lanes replay side by side: one per core, at most 4 (every lane
/// scans and checks every frame and applies the records of its shards, so
/// more lanes than cores only add scanning), at most one per shard.
fn lanes(index: &Index) -> usize {
    // The collision tests force digests through a thread-local: replay on
    // the test's own thread so that recovery sees the same digests.
    #[cfg(test)]
    if crate::index::FORCED_DIGEST
        .with(|forced| forced.get())
        .is_some()
    {
        return 1;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cores.clamp(1, 4).min(index.shards().len().max(1))
}

/// Applies one replayed record to the index.
fn apply(index: &Index, record: &Record<'_>, pos: u64, replayed: &Replayed<'_>) -> Result<()> {
    if (pos & ((1 << 40) - 1)) >= OFFSET_LIMIT || record.token >= TOKEN_LIMIT {
        // Only a file not written by this engine has records there.
        let at = replayed.read(pos).err();
        return Err(at.unwrap_or(Error::Corrupt {
            file: std::path::PathBuf::new(),
            offset: pos & ((1 << 40) - 1),
            kind: CorruptKind::Malformed,
        }));
    }
    if record.kind == Kind::Reserve {
        // Belongs to no key; the log counts its token into the floor.
        return Ok(());
    }
    let (user, key) = (record.user, record.key);
    let id = KeyId::new(user, key);
    let mut shard = index.shard(&id).lock();
    apply_in_shard(&mut shard, &id, record, pos, 0, |at| {
        let theirs = replayed.read(at)?;
        Ok(theirs.user() == user && theirs.key() == key)
    })
}

/// Applies `record` (at log position `pos`) to its key's entry in `shard`
/// (locked): recovery's rule, and `Engine::ingest`'s. `removed_at` is the
/// position a removal is charged to (`ShardMap::remove`); `is_own` reads
/// the record at a position and says whether it is this key's (to tell a
/// colliding key's entry from an older one of this key).
pub(crate) fn apply_in_shard(
    shard: &mut ShardMap,
    id: &KeyId,
    record: &Record<'_>,
    pos: u64,
    removed_at: u64,
    is_own: impl FnOnce(u64) -> Result<bool>,
) -> Result<()> {
    let (user, key) = (record.user, record.key);
    if record.kind == Kind::Begin {
        if let Some(entry) = state::replay(None, record, pos) {
            match shard.locate(id, user, key) {
                // The same lease again (a duplicate copy of its begin, from
                // a segment compaction orphaned): this key's own entry.
                Some((e, _)) if e.token == record.token => shard.update(id, user, key, entry),
                Some(_) => shard.start(id, user, key, entry, Now::at(record.time_ms)),
                None => shard.insert_located_absent(id, entry),
            }
        }
        return Ok(());
    }
    // Whose entry is there? The spill table holds only this key's; the
    // digest table may hold a colliding key's. Tokens grow per key, so a
    // newer token than the record's is another key's, the same token is
    // this key's, and an older one is told apart by reading its record.
    let located = shard.locate(id, user, key);
    let own = match located {
        Some((e, true)) => Some(e),
        Some((e, false)) if e.token == record.token => Some(e),
        Some((e, false)) if e.token < record.token => is_own(e.pos)?.then_some(e),
        _ => None,
    };
    match (own, state::replay(own, record, pos)) {
        (Some(_), Some(entry)) => shard.update(id, user, key, entry),
        (None, Some(entry)) if located.is_none() => shard.insert_located_absent(id, entry),
        (None, Some(entry)) => shard.start(id, user, key, entry, Now::at(record.time_ms)),
        (Some(_), None) => shard.remove(id, user, key, removed_at),
        (None, None) => {}
    }
    Ok(())
}
