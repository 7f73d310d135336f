//! The single appender: encodes records into the active segment and rolls
//! to a new segment at `segment_bytes`.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use std::sync::atomic::AtomicU64;

use super::record::{HEADER_LEN, Record};
use super::{Log, MAX_SEGMENT_ID, Segment, new_header, pos, segment_name};
use crate::clock::Clock;
use crate::error::{Error, IoOp, Result};
use crate::options::Durability;
use crate::storage::{Storage, StorageFile};

/// The active segment, owned by whoever holds the writer lock.
#[derive(Debug)]
pub(super) struct Writer {
    id: u64,
    file: Arc<dyn StorageFile>,
    offset: u64,
    closed: bool,
    /// The record count of the active segment.
    records: Arc<AtomicU64>,
    /// Scratch space for encoding, reused across appends.
    buf: Vec<u8>,
}

impl Writer {
    pub fn new(
        id: u64,
        file: Arc<dyn StorageFile>,
        offset: u64,
        records: Arc<AtomicU64>,
    ) -> Writer {
        Writer {
            id,
            file,
            offset,
            closed: false,
            records,
            buf: Vec::new(),
        }
    }

    /// Cuts the active segment to `len` bytes and syncs the cut.
    pub fn truncate_to(&mut self, len: u64) -> std::io::Result<()> {
        if len < self.offset {
            self.file.truncate(len)?;
            self.offset = len;
            self.file.sync()?;
        }
        Ok(())
    }

    /// The file number of the active segment.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Whether nothing was appended to the active segment.
    pub fn is_empty(&self) -> bool {
        self.offset <= HEADER_LEN as u64
    }

    /// Marks the writer closed; true the first time.
    pub fn close(&mut self) -> bool {
        !std::mem::replace(&mut self.closed, true)
    }

    /// The active file and the end position of what was appended to it.
    pub fn tail(&self) -> (Arc<dyn StorageFile>, u64, u64) {
        (Arc::clone(&self.file), self.id, pos(self.id, self.offset))
    }
}

/// Creates segment `id` with its header, synced, and syncs the directory.
pub(super) fn create_segment(
    storage: &dyn Storage,
    id: u64,
    token_floor: u64,
    clock: &dyn Clock,
) -> Result<Arc<dyn StorageFile>> {
    let name = segment_name(id);
    let path = storage.path(&name);
    let file = storage
        .create(&name)
        .map_err(|e| Error::io(IoOp::Create, &path, e))?;
    let finished = file
        .append(&new_header(id, token_floor, clock))
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
    /// Takes the next file number.
    pub(super) fn new_file_number(&self) -> Result<u64> {
        let id = self.next_file.fetch_add(1, Ordering::SeqCst);
        if id > MAX_SEGMENT_ID {
            return Err(Error::Exhausted {
                what: "segment file numbers",
            });
        }
        Ok(id)
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
        let len = record.encoded_len() as u64;
        if self.needs_roll(&w, len) {
            return Ok(None);
        }
        let mut buf = std::mem::take(&mut w.buf);
        buf.clear();
        record.encode(&mut buf);
        let at = pos(w.id, w.offset);
        let result = w.file.append(&buf);
        w.buf = buf;
        if let Err(e) = result {
            self.set_poison(e.kind());
            // Best effort: cut off whatever prefix of the record got written,
            // so a restart without a crash finds a clean end.
            let _ = w.file.truncate(w.offset);
            return Err(Error::io(
                IoOp::Write,
                self.storage.path(&segment_name(w.id)),
                e,
            ));
        }
        w.offset += len;
        w.records.fetch_add(1, Ordering::Relaxed);
        self.written.store(pos(w.id, w.offset), Ordering::Release);
        self.counters
            .bytes_written
            .fetch_add(len, Ordering::Relaxed);
        self.counters
            .records_written
            .fetch_add(1, Ordering::Relaxed);
        Ok(Some(at))
    }

    /// Takes the writer lock for an append. The lock is held for one short
    /// positional write, so without `Durability::Sync` a caller that finds
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
    /// the active one. Call it holding no shard lock: it fsyncs.
    pub fn make_room(&self, len: usize) -> Result<()> {
        let mut w = self.writer.lock();
        if w.closed {
            return Err(Error::Closed);
        }
        self.check_poison()?;
        if self.needs_roll(&w, len as u64) {
            self.roll(&mut w)?;
        }
        Ok(())
    }

    /// Closes the active segment (synced) and starts the next one.
    pub(super) fn roll(&self, w: &mut Writer) -> Result<()> {
        if let Err(e) = self.sync_segment(&w.file, w.id, pos(w.id, w.offset)) {
            self.drop_unsynced(w);
            return Err(e);
        }
        let id = self.new_file_number()?;
        let floor = self.token_floor();
        let file = self.poison_on(create_segment(
            &*self.storage,
            id,
            floor,
            self.clock.as_ref(),
        ))?;
        let segment = Segment::active(&file, id);
        let records = Arc::clone(&segment.records);
        self.segments.write().insert(id, segment);
        w.id = id;
        w.file = file;
        w.offset = HEADER_LEN as u64;
        w.records = records;
        let start = pos(id, w.offset);
        self.written.store(start, Ordering::Release);
        self.durable.fetch_max(start, Ordering::AcqRel);
        Ok(())
    }
}
