//! The write-ahead log: segment files of framed records, appended by one
//! writer at a time and synced by group commit.
//!
//! A log position (`pos`) names a record's first byte as
//! `segment_id << 40 | offset`; positions grow in append order, so "the
//! record at `pos` is durable" is `durable > pos`.
//!
//! # Invariants
//! - Acked means synced: under `Durability::Sync`, [`Log::wait_durable`]
//!   returns `Ok` only once an fdatasync that started after the record was
//!   appended has succeeded.
//! - After a failed write or sync the log is poisoned: no later append or
//!   sync succeeds until the log is reopened, and no later sync is taken to
//!   cover data written before the failure.
//! - A closed segment is synced before the next one is created, so only the
//!   last segment can have a torn tail.

mod group_commit;
pub(crate) mod reader;
pub(crate) mod record;
mod writer;

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};

use crate::clock::Clock;
use crate::error::{CorruptKind, Error, IoOp, Result};
use crate::index::TOKEN_LIMIT;
use crate::options::{Durability, Options};
use crate::stats::Counters;
use crate::storage::{Storage, StorageFile};
use group_commit::GroupCommit;
use reader::{Tail, scan_segment};
use record::{FRAME_HEADER, HEADER_LEN, Record, SegmentHeader, check_frame, frame_header};
use writer::Writer;

/// Bits of a position that hold the offset inside a segment.
const OFFSET_BITS: u32 = 40;
/// The largest segment id a position can name.
const MAX_SEGMENT_ID: u64 = (1 << (64 - OFFSET_BITS)) - 1;

/// The position of `offset` in segment `id`.
pub(crate) fn pos(id: u64, offset: u64) -> u64 {
    id << OFFSET_BITS | offset
}

fn split(pos: u64) -> (u64, u64) {
    (pos >> OFFSET_BITS, pos & ((1 << OFFSET_BITS) - 1))
}

/// The file name of segment `id`.
pub(crate) fn segment_name(id: u64) -> String {
    format!("{id:06x}.log")
}

/// The segment id in a file name, if it is a segment's name.
fn parse_segment_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".log")?;
    if hex.len() != 6 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// A record read back from the log; its fields share one buffer.
#[derive(Clone, Debug)]
pub(crate) struct ReadRecord {
    pub token: u64,
    pub fingerprint: u128,
    pub user: Bytes,
    pub key: Bytes,
    pub status: u16,
    pub body: Bytes,
}

impl ReadRecord {
    fn new(content: &Bytes, rec: &Record<'_>) -> ReadRecord {
        ReadRecord {
            token: rec.token,
            fingerprint: rec.fingerprint,
            user: content.slice_ref(rec.user),
            key: content.slice_ref(rec.key),
            status: rec.status,
            body: content.slice_ref(rec.body),
        }
    }
}

/// The log: segments, the writer, and group commit.
#[derive(Debug)]
pub(crate) struct Log {
    storage: Arc<dyn Storage>,
    durability: Durability,
    segment_bytes: u64,
    clock: Arc<dyn Clock>,
    counters: Arc<Counters>,
    /// The active segment, appended under this lock.
    writer: Mutex<Writer>,
    /// Every segment on disk, for reads.
    segments: RwLock<BTreeMap<u64, Arc<dyn StorageFile>>>,
    /// End position of everything appended.
    written: AtomicU64,
    /// End position of everything known durable.
    durable: AtomicU64,
    /// Set once by the first failed write or sync.
    poison: OnceLock<io::ErrorKind>,
    /// The next fencing token to hand out.
    next_token: AtomicU64,
    commit: GroupCommit,
}

impl Log {
    /// Opens the log in `storage`: scans every segment in order, calling
    /// `apply(record, pos)` for each valid record, cuts a torn tail off the
    /// last segment, and makes the last segment the active one (creating the
    /// first segment of an empty directory).
    pub fn open(
        storage: Arc<dyn Storage>,
        options: &Options,
        counters: Arc<Counters>,
        mut apply: impl FnMut(Record<'_>, u64),
    ) -> Result<Arc<Log>> {
        let names = storage
            .list()
            .map_err(|e| Error::io(IoOp::List, storage.path(""), e))?;
        let mut ids: Vec<u64> = names.iter().filter_map(|n| parse_segment_name(n)).collect();
        ids.sort_unstable();

        let mut segments = BTreeMap::new();
        let mut max_token = 0u64;
        let mut active = None;
        for (i, &id) in ids.iter().enumerate() {
            let name = segment_name(id);
            let path = storage.path(&name);
            let file = storage
                .open(&name)
                .map_err(|e| Error::io(IoOp::Open, &path, e))?;
            let len = file.len().map_err(|e| Error::io(IoOp::Read, &path, e))?;
            let len = usize::try_from(len).map_err(|_| Error::Corrupt {
                file: path.clone(),
                offset: 0,
                kind: CorruptKind::Malformed,
            })?;
            let mut buf = vec![0u8; len];
            file.read_at(0, &mut buf)
                .map_err(|e| Error::io(IoOp::Read, &path, e))?;
            let is_last = i + 1 == ids.len();
            let scanned = scan_segment(&buf, id, |rec, offset| {
                max_token = max_token.max(rec.token);
                apply(rec, pos(id, offset));
            });
            let (header, tail) = scanned.map_err(|(offset, kind)| Error::Corrupt {
                file: path.clone(),
                offset: offset as u64,
                kind,
            })?;
            max_token = max_token.max(header.token_floor.saturating_sub(1));
            let end = match tail {
                Tail::Clean => len,
                Tail::Torn { at } if is_last => at,
                Tail::TornHeader if is_last => 0,
                Tail::Torn { at } => {
                    return Err(Error::Corrupt {
                        file: path,
                        offset: at as u64,
                        kind: CorruptKind::Malformed,
                    });
                }
                Tail::TornHeader => {
                    return Err(Error::Corrupt {
                        file: path,
                        offset: 0,
                        kind: CorruptKind::BadHeader,
                    });
                }
            };
            if end < len {
                file.truncate(end as u64)
                    .and_then(|()| file.sync())
                    .map_err(|e| Error::io(IoOp::Truncate, &path, e))?;
            }
            if is_last {
                active = Some((id, Arc::clone(&file), end as u64));
            }
            segments.insert(id, file);
        }

        let next_token = max_token.saturating_add(1);
        let (id, file, offset) = match active {
            Some((id, file, 0)) => {
                // The last segment lost its header in a crash while it was
                // being created: write it again.
                let header = new_header(id, next_token, options.clock.as_ref());
                let path = storage.path(&segment_name(id));
                file.append(&header)
                    .and_then(|()| file.sync())
                    .map_err(|e| Error::io(IoOp::Write, path, e))?;
                (id, file, HEADER_LEN as u64)
            }
            Some(active) => active,
            None => {
                let file =
                    writer::create_segment(&*storage, 1, next_token, options.clock.as_ref())?;
                segments.insert(1, Arc::clone(&file));
                (1, file, HEADER_LEN as u64)
            }
        };
        let end = pos(id, offset);
        let log = Arc::new(Log {
            storage,
            durability: options.durability,
            segment_bytes: options.segment_bytes,
            clock: Arc::clone(&options.clock),
            counters,
            writer: Mutex::new(Writer::new(id, file, offset)),
            segments: RwLock::new(segments),
            written: AtomicU64::new(end),
            durable: AtomicU64::new(end),
            poison: OnceLock::new(),
            next_token: AtomicU64::new(next_token),
            commit: GroupCommit::default(),
        });
        if let Durability::Periodic(every) = options.durability {
            GroupCommit::start_flusher(&log, every);
        }
        Ok(log)
    }

    /// Hands out a fencing token greater than every token handed out or
    /// recovered before. The caller holds the key's shard lock.
    ///
    /// # Errors
    /// [`Error::Exhausted`] past 2^48 tokens (about 9 years at a million
    /// leases a second).
    pub fn next_token(&self) -> Result<u64> {
        let token = self.next_token.fetch_add(1, Ordering::SeqCst);
        if token >= TOKEN_LIMIT {
            return Err(Error::Exhausted {
                what: "fencing tokens",
            });
        }
        Ok(token)
    }

    /// Fails if an earlier write or sync failed.
    fn check_poison(&self) -> Result<()> {
        match self.poison.get() {
            Some(&kind) => Err(Error::Poisoned { kind }),
            None => Ok(()),
        }
    }

    fn set_poison(&self, kind: io::ErrorKind) {
        let _ = self.poison.set(kind);
    }

    /// Reads the record at `pos`, checking its CRC.
    pub fn read(&self, at: u64) -> Result<ReadRecord> {
        let (id, offset) = split(at);
        let file = self.segments.read().get(&id).cloned();
        let path = || self.storage.path(&segment_name(id));
        let dangling = || Error::Corrupt {
            file: path(),
            offset,
            kind: CorruptKind::Dangling,
        };
        let file = file.ok_or_else(dangling)?;
        let mut head = [0u8; FRAME_HEADER];
        file.read_at(offset, &mut head)
            .map_err(|e| Error::io(IoOp::Read, path(), e))?;
        let (len, _) = frame_header(&head).ok_or_else(dangling)?;
        let mut frame = vec![0u8; FRAME_HEADER + len];
        file.read_at(offset, &mut frame)
            .map_err(|e| Error::io(IoOp::Read, path(), e))?;
        let frame = Bytes::from(frame);
        let (rec, _) = check_frame(&frame).map_err(|kind| Error::Corrupt {
            file: path(),
            offset,
            kind,
        })?;
        Ok(ReadRecord::new(&frame, &rec))
    }

    /// Waits until the record at `pos` is as durable as the mode promises:
    /// synced under `Sync`; at once otherwise.
    pub fn wait_durable(&self, at: u64) -> Result<()> {
        match self.durability {
            Durability::Sync => self.sync_past(at),
            Durability::Periodic(_) | Durability::None => Ok(()),
        }
    }

    /// The path of the segment that holds `pos`, for error messages.
    pub fn path_of(&self, at: u64) -> std::path::PathBuf {
        self.storage.path(&segment_name(split(at).0))
    }

    /// The offset of `pos` inside its segment.
    pub fn offset_of(&self, at: u64) -> u64 {
        split(at).1
    }

    /// Number of segment files.
    pub fn segment_count(&self) -> usize {
        self.segments.read().len()
    }

    /// Stops the flusher, refuses further appends and syncs what was written.
    pub fn close(&self) -> Result<()> {
        let first = self.writer.lock().close();
        self.commit.stop_flusher();
        if !first {
            return Ok(());
        }
        let end = self.written.load(Ordering::Acquire);
        if self.poison.get().is_some() || self.durable.load(Ordering::Acquire) >= end {
            return Ok(());
        }
        self.sync_past(end.saturating_sub(1))
    }
}

/// The header bytes of a new segment.
fn new_header(id: u64, token_floor: u64, clock: &dyn Clock) -> [u8; HEADER_LEN] {
    SegmentHeader {
        segment_id: id,
        token_floor,
        created_ms: clock.now_ms(),
    }
    .encode()
}
