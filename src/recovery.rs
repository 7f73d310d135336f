//! Recovery on open: replay every segment into the index.
//!
//! The log decides what is valid (CRCs, torn tail or corruption; see
//! `log/reader.rs`); this module decides what each valid record does to the
//! index, through the same transition table as live calls (`state::replay`).
//! Fencing tokens resume above the highest token the log has seen.

use std::sync::Arc;

use crate::error::Result;
use crate::index::{Index, KeyId};
use crate::log::Log;
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
    let log = Log::open(storage, options, counters, |record, pos| {
        let id = KeyId::new(record.user, record.key);
        let mut shard = index.shard(&id).lock();
        match state::replay(shard.get(id.digest), &record, pos) {
            Some(entry) => shard.insert(id.digest, entry),
            None => shard.remove(id.digest, 0),
        }
    })?;
    let now = options.clock.now_ms();
    for shard in index.shards() {
        shard.lock().drop_expired(now);
    }
    Ok(log)
}
