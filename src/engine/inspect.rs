//! The operator's views: records by state and segments by liveness
//! ([`Engine::inspect`]), every live record ([`Engine::for_each_record`]),
//! and a read-only check of a data directory ([`verify`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::Engine;
use crate::error::{CorruptKind, Error, IoOp, Result};
use crate::log::slot_of;
use crate::outcome::{Fingerprint, Outcome, RecordState, RecordView};
use crate::storage::{FsStorage, Storage};

/// What [`Engine::inspect`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Inspection {
    /// Live records in progress (under a live lease).
    pub in_progress: u64,
    /// Live completed records.
    pub completed: u64,
    /// Entries still in memory whose lease or TTL has passed (the sweeper
    /// has not reached them yet).
    pub expired: u64,
    /// Every segment file, in file-number order.
    pub segments: Vec<SegmentInfo>,
}

/// One segment file, as [`Engine::inspect`] sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SegmentInfo {
    /// The number in the file name.
    pub file: u64,
    /// The file's path.
    pub path: PathBuf,
    /// Size in bytes.
    pub bytes: u64,
    /// Records in the file.
    pub records: u64,
    /// Records the index points at (live or not yet swept).
    pub live_records: u64,
    /// Whether it is the segment being appended to.
    pub active: bool,
}

/// One live record, as [`Engine::for_each_record`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecordDump {
    /// The user id.
    pub user: Bytes,
    /// The idempotency key.
    pub key: Bytes,
    /// State, token, deadlines and status.
    pub view: RecordView,
    /// The fingerprint of the request that created the record.
    pub fingerprint: Fingerprint,
    /// The stored outcome, for a completed record.
    pub outcome: Option<Outcome>,
}

/// What [`verify`] found in a healthy data directory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifyReport {
    /// Segment files checked.
    pub segments: u64,
    /// Records whose CRC and layout check out.
    pub records: u64,
    /// Bytes read.
    pub bytes: u64,
    /// A torn tail at the end of the last segment (file and offset): what a
    /// crash left unfinished and the next open cuts off. Not corruption.
    pub torn_tail: Option<(PathBuf, u64)>,
}

/// Checks every record of every segment in the data directory `dir`
/// against its CRC and layout, with the rules recovery uses, changing
/// nothing. Takes the directory lock while it reads.
///
/// # Errors
/// [`Error::Corrupt`] naming the file and offset of the first damage that
/// is not a torn tail; [`Error::Locked`] if an engine holds the directory;
/// [`Error::SalvagePending`] if a salvage was interrupted after its commit
/// point; [`Error::Io`] if `dir` does not exist or cannot be read.
pub fn verify(dir: impl AsRef<Path>) -> Result<VerifyReport> {
    let dir = dir.as_ref();
    if !dir.is_dir() {
        let missing = std::io::Error::new(std::io::ErrorKind::NotFound, "no such data directory");
        return Err(Error::io(IoOp::Open, dir, missing));
    }
    let storage = FsStorage::open(dir)?;
    let result = verify_storage(&storage);
    storage.close();
    result
}

/// [`verify`] on any [`Storage`].
///
/// # Errors
/// As [`verify`], without the lock.
pub fn verify_storage(storage: &dyn Storage) -> Result<VerifyReport> {
    let found = crate::log::verify(storage)?;
    Ok(VerifyReport {
        segments: found.segments,
        records: found.records,
        bytes: found.bytes,
        torn_tail: found.torn_tail,
    })
}

impl Engine {
    /// Counts records by state and segments by liveness. Walks the whole
    /// index (each shard's lock in turn): an operator's call, not a hot
    /// path.
    pub fn inspect(&self) -> Inspection {
        let now = self.clock.read();
        let mut out = Inspection::default();
        let mut live_by_file: HashMap<u64, u64> = HashMap::new();
        for shard in self.index.shards() {
            shard.lock().for_each(|e| {
                *live_by_file.entry(slot_of(e.pos)).or_insert(0) += 1;
                match (e.is_live(now), e.state) {
                    (false, _) => out.expired += 1,
                    (true, RecordState::InProgress) => out.in_progress += 1,
                    (true, RecordState::Completed) => out.completed += 1,
                }
            });
        }
        out.segments = self
            .log
            .segments()
            .into_iter()
            .map(|(slot, file, path, bytes, records, active)| SegmentInfo {
                file,
                path,
                bytes,
                records,
                live_records: live_by_file.get(&slot).copied().unwrap_or(0),
                active,
            })
            .collect();
        out
    }

    /// The engine clock's wall time now (ms since the Unix epoch): what a
    /// completed record's `expires_at_ms` is measured against.
    #[cfg(feature = "cluster")]
    pub(crate) fn wall_now_ms(&self) -> u64 {
        self.clock.read().wall
    }

    /// Calls `f` with every live record, optionally only those of `user`,
    /// reading each record's key and body back from the log. Compaction
    /// (and `close`) waits while this runs, so no record moves under it;
    /// `compact`, `compact_below`, `close` or `for_each_record` called from
    /// inside `f` fail with [`Error::Reentrant`] instead of waiting for
    /// themselves.
    ///
    /// # Errors
    /// [`Error::Closed`]; [`Error::Reentrant`] if called from inside
    /// another `for_each_record` callback; [`Error::Io`] or
    /// [`Error::Corrupt`] if a record cannot be read back (or, sealed,
    /// fails authentication); [`Error::MissingKey`] for a sealed body whose
    /// key is not configured.
    pub fn for_each_record(
        &self,
        user: Option<&[u8]>,
        mut f: impl FnMut(&RecordDump),
    ) -> Result<()> {
        self.check_open()?;
        let _no_compaction = self.compactor.pause("for_each_record")?;
        let now = self.clock.read();
        for shard in self.index.shards() {
            let mut entries = Vec::new();
            shard.lock().for_each(|e| {
                if e.is_live(now) {
                    entries.push(*e);
                }
            });
            for entry in entries {
                self.log.wait_durable(entry.pos)?;
                let record = self.log.read(entry.pos)?;
                if user.is_some_and(|u| u != record.user()) {
                    continue;
                }
                if record.token != entry.token {
                    return Err(Error::Corrupt {
                        file: self.log.path_of(entry.pos),
                        offset: self.log.offset_of(entry.pos),
                        kind: CorruptKind::WrongRecord,
                    });
                }
                let (record_user, record_key) = record.user_and_key();
                let fingerprint = Fingerprint(record.fingerprint);
                let outcome = match entry.state {
                    RecordState::Completed => Some(self.log.outcome(record, entry.pos)?),
                    RecordState::InProgress => None,
                };
                f(&RecordDump {
                    user: record_user,
                    key: record_key,
                    view: entry.view(),
                    fingerprint,
                    outcome,
                });
            }
        }
        Ok(())
    }
}
