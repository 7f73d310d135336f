//! The write-ahead log: segment files of framed records, appended by one
//! writer at a time and synced by group commit.
//!
//! A segment has a **file number** (in its name and header; a 64-bit count
//! that is never reused, so it cannot run out) and, while the log is open, a
//! **slot**: a small in-memory number that log positions carry. A position
//! (`pos`) names a record's first byte as `slot << 40 | offset`; the index
//! packs the slot into 24 bits, so slots are reused: a new segment takes
//! the next free slot in round-robin order, so a slot comes back only after
//! 2^24 - 1 other segments were made (and a reader that finds another
//! record than it expected at a position looks its key up again).
//! Segments replay in the `order` their header gives: a new active segment
//! takes its file number as its order, and a compaction output takes the
//! order of the segment it replaces (`rewrite.rs`), so rewriting never
//! reorders records.
//!
//! # Invariants
//! - Acked means synced: under `Durability::Sync`, [`Log::wait_durable`]
//!   returns `Ok` only once an fdatasync that started after the record was
//!   appended has succeeded.
//! - After a failed write or sync the log is poisoned: no later append or
//!   sync succeeds until the log is reopened, and no later sync is taken to
//!   cover data written before the failure.
//! - A segment is synced before the next one takes a record (a roll stops
//!   appends, syncs the active segment, then swaps in the next one), and a
//!   compaction output is synced before it gets its name, so only the last
//!   segment that holds records can have a torn tail (the segments after it
//!   are empty: the spare a roll made ahead of time), and every position
//!   outside the active segment is durable.
//! - Appends go to the writer's pending buffer; a flush writes it with one
//!   write (the group commit leader before its sync, a roll before its
//!   seal, a compaction pass, close, a full buffer, the flusher's timer).
//!   Every sync the log makes is preceded by a flush of everything
//!   appended before it, so "synced" still covers every earlier append.
//! - No roll holds the writer lock across an fsync: appenders (who hold a shard
//!   lock) never wait for a disk, so neither do readers of that shard.

mod backup;
mod crc;
mod group_commit;
mod offload;
mod open;
mod read;
pub(crate) mod reader;
pub(crate) mod record;
pub(crate) mod resync;
mod rewrite;
mod seal;
pub(crate) mod syncer;
mod table;
mod writer;

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use parking_lot::Mutex;

use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::index::TOKEN_LIMIT;
use crate::options::Durability;
use crate::stats::Counters;
use crate::storage::{Storage, StorageFile};
use group_commit::GroupCommit;
use record::{HEADER_LEN, Record, SegmentHeader};
use writer::Writer;

pub(crate) use backup::BackupFile;
pub(crate) use offload::Chore;
pub(crate) use open::{Replayed, parse_name, read_all, verify};
pub(crate) use read::ReadRecord;
use read::{MapUse, read_from};
pub(crate) use rewrite::ClosedSegment;
pub(crate) use seal::Copied;
use table::SegmentTable;

/// Bits of a position that hold the offset inside a segment.
const OFFSET_BITS: u32 = 40;
/// Slots are 1 to `SLOTS - 1` (what 24 bits hold; 0 names no segment).
const SLOTS: u64 = 1 << (64 - OFFSET_BITS);

/// The position of `offset` in the segment in `slot`.
pub(crate) fn pos(slot: u64, offset: u64) -> u64 {
    slot << OFFSET_BITS | offset
}

pub(super) fn split(pos: u64) -> (u64, u64) {
    (pos >> OFFSET_BITS, pos & ((1 << OFFSET_BITS) - 1))
}

/// The slot of a position.
pub(crate) fn slot_of(pos: u64) -> u64 {
    split(pos).0
}

/// The file name of segment number `number`: at least six hex digits.
pub(crate) fn segment_name(number: u64) -> String {
    format!("{number:06x}.log")
}

/// The name a compaction output is written under before it is published.
fn temp_name(number: u64) -> String {
    format!("{number:06x}.log.tmp")
}

/// The slots in use, and where the round-robin search for a free one
/// resumes.
#[derive(Debug)]
pub(crate) struct Slots {
    next: u64,
    used: std::collections::HashSet<u64>,
}

impl Slots {
    /// Slots `1..=taken` in use, the search resuming after them.
    fn with_taken(taken: u64) -> Slots {
        Slots {
            next: taken % (SLOTS - 1) + 1,
            used: (1..=taken).collect(),
        }
    }

    /// Takes the next free slot.
    ///
    /// # Errors
    /// [`Error::Exhausted`] with 2^24 - 1 segments open at once.
    fn take(&mut self) -> Result<u64> {
        if self.used.len() as u64 >= SLOTS - 1 {
            return Err(Error::Exhausted {
                what: "segment slots (2^24 - 1 segments at once)",
            });
        }
        loop {
            let slot = self.next;
            self.next = slot % (SLOTS - 1) + 1;
            if self.used.insert(slot) {
                return Ok(slot);
            }
        }
    }

    /// Gives a slot back.
    fn free(&mut self, slot: u64) {
        self.used.remove(&slot);
    }
}

/// One segment file.
#[derive(Debug)]
pub(crate) struct Segment {
    file: Arc<dyn StorageFile>,
    /// The number in its name and header.
    number: u64,
    /// Where it replays.
    order: u64,
    /// Records in the file (the writer counts appends to the active one).
    records: Arc<AtomicU64>,
    /// Records a rewrite kept although the index does not point at them.
    pinned: Pin,
    /// Complete records not sealed under the sealing key (none without
    /// one), which a full compaction seals: counted when the segment is
    /// opened or written by a rewrite; records appended since are sealed.
    unsealed: u64,
    /// A read-only map of the file, made by the first read that wants one
    /// (`None` inside: the storage cannot map). See [`read_from`].
    map: Arc<OnceLock<Option<Bytes>>>,
    /// This table copy's own buffer over `map` (see `table.rs`): replays
    /// through it count references on a line only this copy's readers use.
    local: OnceLock<Option<Bytes>>,
}

impl Segment {
    /// A new active segment: it replays in the order of its file number.
    fn active(file: &Arc<dyn StorageFile>, number: u64) -> Segment {
        Segment {
            file: Arc::clone(file),
            number,
            order: number,
            records: Arc::new(AtomicU64::new(0)),
            pinned: Pin::default(),
            unsealed: 0,
            map: Arc::default(),
            local: OnceLock::new(),
        }
    }

    /// The segment for one copy of the table: the same file, counters and
    /// map, with a buffer of its own over the map.
    fn copy(&self) -> Segment {
        Segment {
            file: Arc::clone(&self.file),
            number: self.number,
            order: self.order,
            records: Arc::clone(&self.records),
            pinned: self.pinned,
            unsealed: self.unsealed,
            map: Arc::clone(&self.map),
            local: OnceLock::new(),
        }
    }

    /// The segment's map, made on first use: `capacity` bytes (or the
    /// file's length if larger), so the active segment can grow into it
    /// without a new map.
    fn map(&self, capacity: u64) -> Option<&Bytes> {
        self.local
            .get_or_init(|| {
                let shared = self.map.get_or_init(|| {
                    let len = self.file.len().ok()?.max(capacity);
                    self.file.map(len).ok().flatten()
                });
                shared.clone().map(Bytes::from_owner)
            })
            .as_ref()
    }
}

/// Records a compaction kept although the index does not point at them
/// (tombstones, and records whose successor was not yet durable): they
/// count as live, so the rewrite is not rewritten again at once, but only
/// until the reason to keep them is gone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Pin {
    /// How many records.
    pub count: u64,
    /// The latest lease deadline among the tombstones: after it, none is
    /// needed any more.
    pub until_ms: u64,
    /// If some were kept because their successor was not durable: the
    /// active segment then; once it has rolled, they are settled.
    pub unsettled_in: Option<u64>,
}

impl Pin {
    /// How many of the records still count as live at `now_ms`, with
    /// `active` the active segment now.
    fn live(&self, now_ms: u64, active: u64) -> u64 {
        let held = now_ms < self.until_ms || self.unsettled_in == Some(active);
        if held { self.count } else { 0 }
    }
}

/// The log: segments, the writer, and group commit.
#[derive(Debug)]
pub(crate) struct Log {
    storage: Arc<dyn Storage>,
    durability: Durability,
    segment_bytes: u64,
    /// `Options::mmap_reads`.
    mmap_reads: bool,
    /// The keys that seal and open stored bodies (`seal.rs`).
    keys: seal::Keyring,
    clock: Arc<dyn Clock>,
    counters: Arc<Counters>,
    /// The active segment, appended under this lock.
    writer: Mutex<Writer>,
    /// Set while an appender spins on a taken writer lock (at most one).
    spinning: AtomicBool,
    /// Every segment on disk by slot, for reads and compaction.
    segments: SegmentTable,
    /// The slots in use.
    slots: Mutex<Slots>,
    /// The next file number to create.
    next_file: AtomicU64,
    /// Held by a roll from start to end (and by close), so rolls run one at
    /// a time; holds the spare segment made ahead of time for the next roll.
    roll: Mutex<Option<writer::Spare>>,
    /// Bytes of the spare's file (its header), or 0 without a spare.
    spare_bytes: AtomicU64,
    /// End position of everything appended.
    written: AtomicU64,
    /// End position of everything written to the active file (appends wait
    /// in the writer's pending buffer until a flush).
    flushed: AtomicU64,
    /// End position of everything known durable in the active segment.
    durable: AtomicU64,
    /// Set once by the first failed write or sync.
    poison: OnceLock<io::ErrorKind>,
    /// The next fencing token to hand out.
    next_token: AtomicU64,
    /// Tokens below this are reserved durably (a synced `Reserve` record
    /// or segment header says so) and may be handed out.
    token_limit: AtomicU64,
    /// The highest limit any reservation has asked for (durable or not):
    /// the token floor of every segment created from now on.
    reserve_target: AtomicU64,
    /// One reservation at a time.
    reserving: Mutex<()>,
    commit: GroupCommit,
    /// The thread that syncs for futures ([`syncer::Durable`]).
    syncer: syncer::Syncer,
    /// Rolls and reservations run for futures ([`Log::offload`]).
    offload: offload::Offload,
}

/// How many fencing tokens one reservation covers: about a second of
/// leases at a million a second, and 2^28 restarts before the 2^48 tokens
/// run out even if every restart wastes a whole block.
pub(crate) const TOKEN_BLOCK: u64 = 1 << 20;

impl Log {
    /// Hands out a fencing token greater than every token handed out or
    /// recovered before, in every durability mode and across crashes: only
    /// tokens below a durable reservation are handed out. Returns `None`
    /// when the reservation is used up: the caller releases its shard lock,
    /// calls [`Log::reserve_tokens`] (which syncs) and tries again. The
    /// caller holds the key's shard lock.
    ///
    /// # Errors
    /// [`Error::Exhausted`] past 2^48 tokens (about 9 years at a million
    /// leases a second).
    pub fn next_token(&self) -> Result<Option<u64>> {
        let mut token = self.next_token.load(Ordering::SeqCst);
        loop {
            if token >= TOKEN_LIMIT {
                return Err(Error::Exhausted {
                    what: "fencing tokens",
                });
            }
            if token >= self.token_limit.load(Ordering::SeqCst) {
                return Ok(None);
            }
            match self.next_token.compare_exchange_weak(
                token,
                token + 1,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return Ok(Some(token)),
                Err(now) => token = now,
            }
        }
    }

    /// Reserves the next block of fencing tokens durably: appends a
    /// `Reserve` record and syncs it (whatever the durability mode) before
    /// raising the limit [`Log::next_token`] hands tokens out below. Call
    /// it holding no shard lock.
    ///
    /// # Errors
    /// As [`Log::append`] and the sync: [`Error::Io`], [`Error::NoSpace`],
    /// [`Error::Poisoned`], [`Error::Closed`].
    pub fn reserve_tokens(&self) -> Result<()> {
        let _one = self.reserving.lock();
        let next = self.next_token.load(Ordering::SeqCst);
        if next < self.token_limit.load(Ordering::SeqCst) {
            return Ok(()); // another caller reserved meanwhile
        }
        let limit = next.saturating_add(TOKEN_BLOCK).min(TOKEN_LIMIT);
        // Segments created from now on carry the new limit as their floor,
        // so that compaction dropping this record (or its whole segment)
        // never lowers what recovery finds.
        self.reserve_target.fetch_max(limit, Ordering::SeqCst);
        let record = Record {
            kind: record::Kind::Reserve,
            token: limit - 1,
            deadline_ms: 0,
            time_ms: self.clock.now_ms(),
            lease_ms: 0,
            fingerprint: 0,
            user: b"",
            key: b"",
            status: 0,
            body: b"",
            seal: None,
        };
        let at = loop {
            match self.append(&record)? {
                Some(at) => break at,
                None => self.make_room(record.encoded_len())?,
            }
        };
        self.sync_past(at)?;
        self.token_limit.store(limit, Ordering::SeqCst);
        Ok(())
    }

    /// Makes every token handed out from now on, and the floor of every
    /// segment created from now on, greater than `token`: a record copied
    /// in from another copy of the log (`Engine::ingest`)
    /// carries tokens this log never handed out. If that passes the
    /// reserved limit, the next `begin` reserves a new block first.
    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    pub(crate) fn raise_tokens_past(&self, token: u64) {
        let above = token.saturating_add(1);
        self.next_token.fetch_max(above, Ordering::SeqCst);
        self.reserve_target.fetch_max(above, Ordering::SeqCst);
    }

    /// A token at least as high as every token handed out so far, or that
    /// may be handed out before the next reservation (0 if none was).
    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    pub(crate) fn highest_token(&self) -> u64 {
        let next = self.next_token.load(Ordering::SeqCst);
        next.max(self.reserve_target.load(Ordering::SeqCst))
            .saturating_sub(1)
    }

    /// The token floor of a segment created now: above every token handed
    /// out, or that may be handed out before the next reservation.
    pub(super) fn token_floor(&self) -> u64 {
        self.reserve_target.load(Ordering::SeqCst)
    }

    /// Fails if an earlier write or sync failed.
    pub fn check_poison(&self) -> Result<()> {
        match self.poison.get() {
            Some(&kind) => Err(Error::Poisoned { kind }),
            None => Ok(()),
        }
    }

    /// Whether an earlier write or sync failed.
    pub fn is_poisoned(&self) -> bool {
        self.poison.get().is_some()
    }

    fn set_poison(&self, kind: io::ErrorKind) {
        self.counters.io_errors.fetch_add(1, Ordering::Relaxed);
        if self.poison.set(kind).is_ok() {
            crate::trace::event!(
                error,
                ?kind,
                "write or fsync failed: the log refuses writes until reopened"
            );
        }
    }

    /// Poisons the log if `result` is an I/O failure.
    fn poison_on<T>(&self, result: Result<T>) -> Result<T> {
        if let Err(Error::Io { source, .. } | Error::NoSpace { source, .. }) = &result {
            self.set_poison(source.kind());
        }
        result
    }

    /// Reads the record at `pos`, checking its CRC. A position in a segment
    /// that compaction retired is [`CorruptKind::Dangling`]: look the entry
    /// up again.
    pub fn read(&self, at: u64) -> Result<ReadRecord> {
        let flushed = self.flushed.load(Ordering::Acquire);
        if slot_of(at) == slot_of(flushed) && at >= flushed {
            // Not written to the file yet (or just now): copy it out of the
            // writer's pending buffer.
            let w = self.writer.lock();
            if let Some(read) = w.read_pending(at) {
                return read.map_err(|kind| Error::Corrupt {
                    file: self.path_of(at),
                    offset: self.offset_of(at),
                    kind,
                });
            }
        }
        let map = match (self.mmap_reads, self.is_durable(at)) {
            (false, _) => MapUse::Off,
            (true, true) => MapUse::Share(self.segment_bytes),
            (true, false) => MapUse::Copy(self.segment_bytes),
        };
        let read = read_from(&*self.storage, &self.segments.read(), at, map);
        if let Err(Error::Io { .. } | Error::NoSpace { .. }) = read {
            self.counters.io_errors.fetch_add(1, Ordering::Relaxed);
        }
        read
    }

    /// Whether the record at `at` is durable: it is outside the active
    /// segment (closed segments and compaction outputs are synced before
    /// they are left or published), or before the synced end.
    pub fn is_durable(&self, at: u64) -> bool {
        let durable = self.durable.load(Ordering::Acquire);
        slot_of(at) != slot_of(durable) || at < durable
    }

    /// Whether the record at `at` is as durable as the mode promises now
    /// ([`Log::wait_durable`] would return at once).
    pub fn is_durable_enough(&self, at: u64) -> bool {
        self.durability != Durability::Sync || self.is_durable(at)
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
    pub fn path_of(&self, at: u64) -> PathBuf {
        self.path_of_slot(slot_of(at))
    }

    /// The path of the segment in `slot` (the directory if none is there).
    pub(crate) fn path_of_slot(&self, slot: u64) -> PathBuf {
        match self.segments.read().get(&slot) {
            Some(s) => self.storage.path(&segment_name(s.number)),
            None => self.storage.path(""),
        }
    }

    /// The offset of `pos` inside its segment.
    pub fn offset_of(&self, at: u64) -> u64 {
        split(at).1
    }

    /// Bytes appended but not yet written to the active file.
    pub fn pending_bytes(&self) -> u64 {
        let flushed = self.flushed.load(Ordering::Acquire);
        let written = self.written.load(Ordering::Acquire);
        if slot_of(written) == slot_of(flushed) {
            written.saturating_sub(flushed)
        } else {
            0
        }
    }

    /// Writes the appends still pending in memory to the active file (no
    /// sync). A compaction pass calls it first, so that every fdatasync the
    /// engine makes finds nothing of earlier calls held back in memory.
    pub fn flush_pending(&self) -> Result<()> {
        self.flush().map(|_| ())
    }

    /// Number of segment files.
    pub fn segment_count(&self) -> usize {
        self.segments.read().len()
    }

    /// Bytes in all segment files.
    pub fn disk_bytes(&self) -> u64 {
        let segments: u64 = self
            .segments
            .read()
            .values()
            .map(|s| s.file.len().unwrap_or(0))
            .sum();
        segments + self.spare_bytes.load(Ordering::Relaxed)
    }

    /// Marks the files given up (the engine released the directory): no
    /// call still running may change a file after this returns.
    pub fn release_files(&self) {
        self.writer.lock().release();
    }

    /// Waits for a roll in progress, stops the flusher, refuses further
    /// appends and syncs what was written.
    pub fn close(&self) -> Result<()> {
        let _no_roll = self.roll.lock();
        let first = self.writer.lock().close();
        self.commit.stop_flusher();
        if !first {
            return Ok(());
        }
        let result = self.check_poison().and_then(|()| {
            let end = self.written.load(Ordering::Acquire);
            if self.is_durable(end.saturating_sub(1)) {
                return Ok(());
            }
            self.sync_past(end.saturating_sub(1))
        });
        // Futures still waiting see the final sync's result (or Closed).
        self.syncer.stop();
        result
    }

    /// A future that resolves once the record at `at` is as durable as the
    /// mode promises, woken by the syncer thread (see `syncer.rs`).
    pub fn durable(self: &Arc<Self>, at: u64) -> syncer::Durable {
        syncer::Durable::new(self, at)
    }
}

/// The header bytes of a new active segment: it replays after every
/// existing segment, in the order of its file number.
fn new_header(number: u64, token_floor: u64, clock: &dyn Clock) -> [u8; HEADER_LEN] {
    SegmentHeader {
        file: number,
        order: number,
        replaces: 0,
        token_floor,
        created_ms: clock.now_ms(),
    }
    .encode()
}

#[cfg(test)]
mod slot_tests {
    use super::{SLOTS, Slots};

    #[test]
    fn slots_are_taken_round_robin_skipping_used_ones_and_wrap_past_the_last() {
        let mut slots = Slots::with_taken(3);
        assert_eq!(slots.take().unwrap(), 4);
        slots.free(2);
        // A freed slot comes back only after the search wraps around.
        assert_eq!(slots.take().unwrap(), 5);
        slots.next = SLOTS - 1;
        assert_eq!(slots.take().unwrap(), SLOTS - 1);
        // Past the last slot the search wraps to 1 (never 0), skipping the
        // slots in use.
        assert_eq!(slots.take().unwrap(), 2);
        assert_eq!(slots.take().unwrap(), 6);
    }
}
