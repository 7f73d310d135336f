//! Recovery on open: replay every segment into the index.
//!
//! The log decides what is valid (CRCs, torn tail or corruption; see
//! `log/reader.rs`); this module decides what each valid record does to the
//! index, through the same transition table as live calls (`state::replay`).
//! Fencing tokens resume above the highest token the log has seen.

use std::sync::Arc;

use crate::error::{CorruptKind, Error, Result};
use crate::index::{Index, KeyId, OFFSET_LIMIT, TOKEN_LIMIT};
use crate::log::Log;
use crate::log::record::Kind;
use crate::options::Options;
use crate::state;
use crate::stats::Counters;
use crate::storage::Storage;

/// Opens the log in `storage` and rebuilds `index` from it; records that are
/// expired at the clock's current time are dropped from memory.
pub(crate) fn recover(
    storage: Arc<dyn Storage>,
    options: &Options,
    counters: Arc<Counters>,
    index: &Index,
) -> Result<Arc<Log>> {
    let mut failure = None;
    let log = Log::open(storage, options, counters, |record, pos| {
        if failure.is_some() {
            return;
        }
        if (pos & ((1 << 40) - 1)) >= OFFSET_LIMIT || record.token >= TOKEN_LIMIT {
            // Only a file not written by this engine has records there.
            failure = Some(pos);
            return;
        }
        let id = KeyId::new(record.user, record.key);
        let (user, key) = (record.user, record.key);
        let mut shard = index.shard(&id).lock();
        if record.kind == Kind::Begin {
            let entry = state::replay(None, &record, pos);
            if let Some(entry) = entry {
                shard.start(&id, user, key, entry, record.time_ms);
            }
            return;
        }
        let current = shard.get(&id, user, key);
        match (current, state::replay(current, &record, pos)) {
            (_, Some(entry)) => shard.update(&id, user, key, entry),
            (Some(_), None) => shard.remove(&id, user, key, 0),
            (None, None) => {}
        }
    })?;
    if let Some(pos) = failure {
        return Err(Error::Corrupt {
            file: log.path_of(pos),
            offset: log.offset_of(pos),
            kind: CorruptKind::Malformed,
        });
    }
    let now = options.clock.now_ms();
    for shard in index.shards() {
        shard.lock().drop_expired(now);
    }
    Ok(log)
}
