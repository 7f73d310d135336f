//! The single appender: encodes records into the active segment, and the
//! roll to the next segment at `segment_bytes`.
//!
//! A roll never holds the writer lock across I/O. It marks the writer
//! `rolling` (appends then answer "no room", so their callers release
//! their shard locks and wait in [`Log::make_room`]), syncs the active
//! segment outside every lock but its own, swaps in the spare segment (made
//! and synced ahead of time, by the previous roll) under the writer lock,
//! and makes the spare for the next roll.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use std::sync::atomic::AtomicU64;

use bytes::Bytes;

use super::read::{ReadRecord, decode};
use super::record::{FRAME_HEADER, HEADER_LEN, Record, frame_header};
use super::{Log, Segment, new_header, pos, segment_name};
use crate::clock::Clock;
use crate::error::CorruptKind;
use crate::error::{Error, IoOp, Result};
use crate::options::Durability;
use crate::storage::{Storage, StorageFile};

/// The active segment, owned by whoever holds the writer lock.
#[derive(Debug)]
pub(super) struct Writer {
    slot: u64,
    number: u64,
    file: Arc<dyn StorageFile>,
    /// The end of what was appended: the file's bytes and `pending`.
    offset: u64,
    /// The end of what is in the file (`offset` minus `pending`).
    flushed: u64,
    closed: bool,
    /// A roll is under way: appends answer "no room" until it ends.
    rolling: bool,
    /// The engine closed and released the directory: nothing may change a
    /// file any more.
    released: bool,
    /// The record count of the active segment.
    records: Arc<AtomicU64>,
    /// Records appended but not yet written to the file: the bytes from
    /// `flushed` to `offset`. Written by [`Log::flush`] (once per
    /// group-commit round, when it grows past [`FLUSH_AT`], or by the
    /// flusher's timer), so a round of many records costs one write.
    pending: Vec<u8>,
}

/// Pending bytes past which an append writes them out before adding more.
pub(super) const FLUSH_AT: usize = 256 << 10;

impl Writer {
    pub fn new(
        slot: u64,
        number: u64,
        file: Arc<dyn StorageFile>,
        offset: u64,
        records: Arc<AtomicU64>,
    ) -> Writer {
        Writer {
            slot,
            number,
            file,
            offset,
            flushed: offset,
            closed: false,
            rolling: false,
            released: false,
            records,
            pending: Vec::new(),
        }
    }

    /// Cuts the active segment to `len` bytes (dropping whatever was not
    /// written yet) and syncs the cut.
    pub fn truncate_to(&mut self, len: u64) -> std::io::Result<()> {
        if len < self.offset {
            self.pending.clear();
            if len < self.flushed {
                self.file.truncate(len)?;
                self.file.sync()?;
            }
            self.offset = len;
            self.flushed = self.flushed.min(len);
        }
        Ok(())
    }

    /// The record at `at` if it is still in the pending buffer (a copy of
    /// its frame, CRC checked), or `None` if it is in the file.
    pub fn read_pending(&self, at: u64) -> Option<std::result::Result<ReadRecord, CorruptKind>> {
        let (slot, offset) = super::split(at);
        if slot != self.slot || offset < self.flushed || offset >= self.offset {
            return None;
        }
        let start = usize::try_from(offset - self.flushed).ok()?;
        let rest = self.pending.get(start..)?;
        let frame = frame_header(rest)
            .and_then(|(len, _)| rest.get(..FRAME_HEADER.saturating_add(len)))
            .ok_or(CorruptKind::Dangling);
        Some(frame.and_then(|frame| decode(&Bytes::copy_from_slice(frame))))
    }

    /// The slot of the active segment.
    pub fn slot(&self) -> u64 {
        self.slot
    }

    /// Whether nothing was appended to the active segment.
    pub fn is_empty(&self) -> bool {
        self.offset <= HEADER_LEN as u64
    }

    /// Whether the files were given up ([`Log::release_files`]).
    pub fn is_released(&self) -> bool {
        self.released
    }

    /// Marks the files given up.
    pub fn release(&mut self) {
        self.released = true;
    }

    /// Marks the writer closed; true the first time.
    pub fn close(&mut self) -> bool {
        !std::mem::replace(&mut self.closed, true)
    }

    /// The active file, its slot and the end position of what was appended
    /// to it.
    pub fn tail(&self) -> (Arc<dyn StorageFile>, u64, u64) {
        (
            Arc::clone(&self.file),
            self.slot,
            pos(self.slot, self.offset),
        )
    }
}

/// A segment made ahead of time for the next roll: created with its header,
/// synced, and its name made durable; not yet in the log's segment table
/// (it holds no record), so compaction does not see it.
#[derive(Debug)]
pub(crate) struct Spare {
    slot: u64,
    number: u64,
    file: Arc<dyn StorageFile>,
    /// The token floor in its header.
    floor: u64,
}

/// Creates segment `number` with its header, synced, and syncs the
/// directory.
pub(super) fn create_segment(
    storage: &dyn Storage,
    number: u64,
    token_floor: u64,
    clock: &dyn Clock,
) -> Result<Arc<dyn StorageFile>> {
    let name = segment_name(number);
    let path = storage.path(&name);
    let file = storage
        .create(&name)
        .map_err(|e| Error::io(IoOp::Create, &path, e))?;
    let finished = file
        .append(&new_header(number, token_floor, clock))
        .map_err(|e| Error::io(IoOp::Write, &path, e))
        .and_then(|()| file.sync().map_err(|e| Error::io(IoOp::Sync, &path, e)))
        .and_then(|()| {
            storage
                .sync_dir()
                .map_err(|e| Error::io(IoOp::SyncDir, &path, e))
        });
    if let Err(e) = finished {
        // Do not leave a half-made segment behind: a restart without a
        // crash would append acknowledged records to a file whose header
        // (or name) may never reach the disk. Best effort; if the removal
        // fails too, the engine is poisoned and recovery judges the file.
        let _ = storage.remove(&name);
        let _ = storage.sync_dir();
        return Err(e);
    }
    Ok(file)
}

/// How long an appender spins on a taken writer lock before sleeping.
const SPIN_FOR: std::time::Duration = std::time::Duration::from_micros(20);

impl Log {
    /// Takes the next file number and a free slot for a new segment.
    ///
    /// # Errors
    /// [`Error::Exhausted`] with 2^24 - 1 segments at once (file numbers
    /// are 64-bit and never run out).
    pub(super) fn new_segment_ids(&self) -> Result<(u64, u64)> {
        let slot = self.slots.lock().take()?;
        Ok((slot, self.next_file.fetch_add(1, Ordering::SeqCst)))
    }

    /// Gives a slot back (its segment is gone).
    pub(super) fn free_slot(&self, slot: u64) {
        self.slots.lock().free(slot);
    }

    /// Appends one record and returns its position. It is not durable yet:
    /// see [`Log::wait_durable`]. The caller holds the key's shard lock, so
    /// records of one key reach the log in the order of their transitions.
    ///
    /// Returns `None`, changing nothing, when the record does not fit in
    /// the active segment: the caller releases its shard lock, calls
    /// [`Log::make_room`] (which may fsync) and tries again, so that no
    /// shard lock is ever held across an fsync.
    pub fn append(&self, record: &Record<'_>) -> Result<Option<u64>> {
        let mut w = self.lock_writer_spinning();
        if w.closed {
            return Err(Error::Closed);
        }
        self.check_poison()?;
        let len = record.encoded_len();
        if w.rolling || self.needs_roll(&w, len as u64) {
            return Ok(None);
        }
        if !w.pending.is_empty() && w.pending.len() + len > FLUSH_AT {
            // Write out what waits first, so that a failure leaves this
            // record unappended (its caller sees the error) rather than
            // half written.
            self.flush_locked(&mut w)?;
        }
        let at = pos(w.slot, w.offset);
        record.encode(&mut w.pending);
        w.offset += len as u64;
        w.records.fetch_add(1, Ordering::Relaxed);
        self.written.store(pos(w.slot, w.offset), Ordering::Release);
        self.counters
            .bytes_written
            .fetch_add(len as u64, Ordering::Relaxed);
        self.counters
            .records_written
            .fetch_add(1, Ordering::Relaxed);
        Ok(Some(at))
    }

    /// Writes the pending records of the active segment to its file, with
    /// one write. The caller holds the writer lock.
    ///
    /// # Errors
    /// [`Error::Io`] / [`Error::NoSpace`] (the log is poisoned then, and
    /// the pending records are dropped: none of them was acknowledged
    /// under `Sync`, and without `Sync` every later call is refused).
    pub(super) fn flush_locked(&self, w: &mut Writer) -> Result<()> {
        if w.pending.is_empty() {
            return Ok(());
        }
        if w.released {
            return Err(Error::Closed);
        }
        let result = w.file.append(&w.pending);
        self.counters.log_writes.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = result {
            self.set_poison(e.kind());
            // Best effort: cut off whatever prefix got written, so a
            // restart without a crash finds a clean end.
            let _ = w.file.truncate(w.flushed);
            w.pending.clear();
            w.offset = w.flushed;
            self.written.store(pos(w.slot, w.offset), Ordering::Release);
            return Err(Error::io(
                IoOp::Write,
                self.storage.path(&segment_name(w.number)),
                e,
            ));
        }
        w.flushed = w.offset;
        w.pending.clear();
        if w.pending.capacity() > 4 * FLUSH_AT {
            // One huge record grew it: give the memory back.
            w.pending = Vec::new();
        }
        self.flushed
            .store(pos(w.slot, w.flushed), Ordering::Release);
        Ok(())
    }

    /// Writes the pending records out (see [`Log::flush_locked`]) and
    /// returns the active file, its slot and the end of what it now holds:
    /// what a sync of it makes durable.
    pub(super) fn flush(&self) -> Result<(Arc<dyn StorageFile>, u64, u64)> {
        let mut w = self.writer.lock();
        self.flush_locked(&mut w)?;
        Ok(w.tail())
    }

    /// Takes the writer lock for an append. The lock is held to encode one
    /// record into the pending buffer (and now and then to write the buffer
    /// out), so without `Durability::Sync` a caller that finds
    /// it taken spins for a few microseconds before sleeping: sleeping and
    /// being woken costs tens of microseconds on a virtual machine, many
    /// times the wait and the whole call (2 threads: p99 of a `begin` 31 µs
    /// without the spin, 4.5 µs with it). Under `Sync` the call waits for
    /// an fdatasync anyway and spinning only takes CPU from the group
    /// commit (measured: 5-10 % fewer durable pairs/s with 64 callers).
    /// Only one caller spins at a time; the others sleep at once, so a
    /// crowd of callers on few cores does not burn the cores the holder
    /// needs.
    fn lock_writer_spinning(&self) -> parking_lot::MutexGuard<'_, Writer> {
        if let Some(w) = self.writer.try_lock() {
            return w;
        }
        if self.durability != Durability::Sync
            && self
                .spinning
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        {
            let started = std::time::Instant::now();
            let mut got = None;
            'spin: while started.elapsed() < SPIN_FOR {
                for _ in 0..32 {
                    std::hint::spin_loop();
                    if !self.writer.is_locked()
                        && let Some(w) = self.writer.try_lock()
                    {
                        got = Some(w);
                        break 'spin;
                    }
                }
            }
            self.spinning.store(false, Ordering::Release);
            if let Some(w) = got {
                return w;
            }
        }
        self.writer.lock()
    }

    /// Whether a record of `len` bytes must go into a new segment.
    fn needs_roll(&self, w: &Writer, len: u64) -> bool {
        w.offset + len > self.segment_bytes && w.offset > HEADER_LEN as u64
    }

    /// Rolls to a new segment if a record of `len` bytes does not fit in
    /// the active one, or waits for a roll under way. Call it holding no
    /// shard lock: it may fsync.
    pub fn make_room(&self, len: usize) -> Result<()> {
        let mut spare = self.roll.lock();
        {
            let w = self.writer.lock();
            if w.closed {
                return Err(Error::Closed);
            }
            self.check_poison()?;
            if !self.needs_roll(&w, len as u64) {
                return Ok(());
            }
        }
        self.roll(&mut spare)
    }

    /// Rolls: stops appends to the active segment, syncs it, swaps in the
    /// spare (or a new segment), then makes the spare for the next roll.
    /// The caller holds the roll lock (`spare` is behind it) and no shard
    /// lock; the writer lock is taken only to flip `rolling` and to swap.
    pub(super) fn roll(&self, spare: &mut Option<Spare>) -> Result<()> {
        let (file, slot, end) = {
            let mut w = self.writer.lock();
            if w.closed {
                return Err(Error::Closed);
            }
            w.rolling = true;
            if let Err(e) = self.flush_locked(&mut w) {
                w.rolling = false;
                return Err(e);
            }
            w.tail()
        };
        let result = self.seal_and_swap(spare, &file, slot, end);
        self.writer.lock().rolling = false;
        result?;
        // Ahead of time, for the next roll: its appenders then wait only
        // for the fdatasync of the segment they filled.
        let made = self.make_spare();
        *spare = Some(self.poison_on(made)?);
        self.spare_bytes.store(HEADER_LEN as u64, Ordering::Relaxed);
        Ok(())
    }

    /// The roll's I/O and its swap (see [`Log::roll`]).
    fn seal_and_swap(
        &self,
        spare: &mut Option<Spare>,
        file: &Arc<dyn StorageFile>,
        slot: u64,
        end: u64,
    ) -> Result<()> {
        if let Err(e) = self.sync_segment(file, slot, end) {
            let mut w = self.writer.lock();
            self.drop_unsynced(&mut w);
            return Err(e);
        }
        loop {
            // A spare made before a token reservation has a floor below it:
            // were it the active segment when the reservation's record is
            // compacted away, a crash could reissue reserved tokens. Make a
            // new one then (rare: once per reservation).
            self.spare_bytes.store(0, Ordering::Relaxed);
            let next = match spare.take() {
                Some(s) if s.floor >= self.token_floor() => s,
                stale => {
                    if let Some(s) = stale {
                        let removed = self.discard(s);
                        self.poison_on(removed)?;
                    }
                    let made = self.make_spare();
                    self.poison_on(made)?
                }
            };
            let mut w = self.writer.lock();
            if w.closed {
                // Not reached: close waits for the roll lock. Leave the
                // spare (an empty segment replays nothing).
                return Err(Error::Closed);
            }
            if next.floor < self.token_floor() {
                // A reservation came in meanwhile: make another one.
                drop(w);
                let removed = self.discard(next);
                self.poison_on(removed)?;
                continue;
            }
            let segment = Segment::active(&next.file, next.number);
            let records = Arc::clone(&segment.records);
            self.segments.write().insert(next.slot, segment);
            w.slot = next.slot;
            w.number = next.number;
            w.file = next.file;
            w.offset = HEADER_LEN as u64;
            w.flushed = w.offset;
            w.records = records;
            let start = pos(next.slot, w.offset);
            self.written.store(start, Ordering::Release);
            self.flushed.store(start, Ordering::Release);
            self.durable.store(start, Ordering::Release);
            return Ok(());
        }
    }

    /// Makes a spare segment: a new file number and slot, the file created
    /// with its header (the current token floor), synced, its name durable.
    fn make_spare(&self) -> Result<Spare> {
        let (slot, number) = self.new_segment_ids()?;
        let floor = self.token_floor();
        match create_segment(&*self.storage, number, floor, self.clock.as_ref()) {
            Ok(file) => Ok(Spare {
                slot,
                number,
                file,
                floor,
            }),
            Err(e) => {
                self.free_slot(slot);
                Err(e)
            }
        }
    }

    /// Drops a spare that will not be used: removes its file. (Were the
    /// removal lost, the empty segment would replay nothing, and compaction
    /// removes it once it is not the last; a failure still fails the call.)
    fn discard(&self, spare: Spare) -> Result<()> {
        let name = segment_name(spare.number);
        self.free_slot(spare.slot);
        self.storage
            .remove(&name)
            .map_err(|e| Error::io(IoOp::Remove, self.storage.path(&name), e))
    }
}
