//! The file side of compaction: listing closed segments, reading one, and
//! publishing its rewrite crash-safely.
//!
//! A rewrite of segment `F` is written to `M.log.tmp` (a fresh file number
//! `M`, and a free slot), synced, renamed to `M.log`, and the directory is
//! synced; only then does the index move to `M`, and only then is `F`
//! removed (and its slot freed). `M`'s header
//! carries `order = order(F)` (it replays where `F` did) and `replaces = F`,
//! so after a crash at any step recovery finds either `F` alone, or `M`
//! (whose presence retires `F`). An unfinished `.tmp` file is removed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use super::record::SegmentHeader;
use super::{Log, Pin, Segment, segment_name, temp_name};
use crate::error::{Error, IoOp, Result};

/// What the compactor sees of a closed (not active) segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ClosedSegment {
    /// Its slot (what log positions in it carry).
    pub file: u64,
    /// The number in its name and header.
    pub number: u64,
    /// Records in the file.
    pub records: u64,
    /// Records an earlier rewrite kept as tombstones.
    pub pinned: u64,
    /// Complete records not sealed under the sealing key.
    pub unsealed: u64,
    /// Size in bytes.
    pub bytes: u64,
}

impl Log {
    /// Every segment but the active one, in replay order, as of `now_ms`.
    pub fn closed_segments(&self, now_ms: u64) -> Vec<ClosedSegment> {
        let active = self.writer.lock().slot();
        let segments = self.segments.read();
        let mut closed: Vec<(u64, ClosedSegment)> = segments
            .iter()
            .filter(|(id, _)| **id != active)
            .map(|(&file, s)| {
                let info = ClosedSegment {
                    file,
                    number: s.number,
                    records: s.records.load(Ordering::Relaxed),
                    pinned: s.pinned.live(now_ms, active),
                    unsealed: s.unsealed,
                    bytes: s.file.len().unwrap_or(0),
                };
                (s.order, info)
            })
            .collect();
        closed.sort_unstable_by_key(|(order, _)| *order);
        closed.into_iter().map(|(_, c)| c).collect()
    }

    /// Every segment: slot, file number, path, size, records, and whether
    /// it is the active one; in file-number order.
    #[allow(clippy::type_complexity)]
    pub fn segments(&self) -> Vec<(u64, u64, std::path::PathBuf, u64, u64, bool)> {
        let active = self.writer.lock().slot();
        let mut all: Vec<_> = self
            .segments
            .read()
            .iter()
            .map(|(&slot, s)| {
                (
                    slot,
                    s.number,
                    self.storage.path(&segment_name(s.number)),
                    s.file.len().unwrap_or(0),
                    s.records.load(Ordering::Relaxed),
                    slot == active,
                )
            })
            .collect();
        all.sort_unstable_by_key(|s| s.1);
        all
    }

    /// The slot of the active segment, its record count and size.
    pub fn active_segment(&self) -> (u64, u64, u64) {
        let id = self.writer.lock().slot();
        let segments = self.segments.read();
        let (records, bytes) = segments.get(&id).map_or((0, 0), |s| {
            (s.records.load(Ordering::Relaxed), s.file.len().unwrap_or(0))
        });
        (id, records, bytes)
    }

    /// Rolls to a new active segment if the current one holds records, so
    /// that compaction can rewrite it.
    pub fn roll_if_used(&self) -> Result<()> {
        let mut spare = self.roll.lock();
        if self.writer.lock().is_empty() {
            return Ok(());
        }
        self.check_poison()?;
        self.roll(&mut spare)
    }

    /// Reads a whole segment (by slot).
    pub fn read_segment(&self, file: u64) -> Result<Vec<u8>> {
        let handle = self.segments.read().get(&file).map(|s| Arc::clone(&s.file));
        let path = self.path_of_slot(file);
        let handle = handle
            .ok_or_else(|| Error::io(IoOp::Open, &path, std::io::ErrorKind::NotFound.into()))?;
        let len = handle.len().map_err(|e| Error::io(IoOp::Read, &path, e))?;
        let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
        handle
            .read_at(0, &mut buf)
            .map_err(|e| Error::io(IoOp::Read, &path, e))?;
        Ok(buf)
    }

    /// Publishes `frames` (whole encoded records, `records` of them, of which
    /// `pinned` were kept although no entry points at them, and `unsealed`
    /// are complete records not sealed under the sealing key) as the
    /// replacement of the segment in slot `input`, and returns the slot of
    /// the output. Durable and named when this returns.
    pub fn publish_rewrite(
        &self,
        input: u64,
        frames: &[u8],
        records: u64,
        pinned: Pin,
        unsealed: u64,
    ) -> Result<u64> {
        self.check_poison()?;
        let (order, replaces) = self
            .segments
            .read()
            .get(&input)
            .map(|s| (s.order, s.number))
            .ok_or_else(|| {
                Error::io(
                    IoOp::Open,
                    self.path_of_slot(input),
                    std::io::ErrorKind::NotFound.into(),
                )
            })?;
        let (slot, id) = self.new_segment_ids()?;
        let published = self.write_rewrite(id, order, replaces, frames);
        let file = match published {
            Ok(file) => file,
            Err(e) => {
                self.free_slot(slot);
                return Err(e);
            }
        };
        self.segments.write().insert(
            slot,
            Segment {
                file,
                number: id,
                order,
                records: Arc::new(AtomicU64::new(records)),
                pinned,
                unsealed,
                map: Arc::default(),
                local: OnceLock::new(),
            },
        );
        Ok(slot)
    }

    /// Writes, syncs and names compaction output number `id`; removes its
    /// temporary file if any step fails.
    fn write_rewrite(
        &self,
        id: u64,
        order: u64,
        replaces: u64,
        frames: &[u8],
    ) -> Result<Arc<dyn crate::storage::StorageFile>> {
        let header = SegmentHeader {
            file: id,
            order,
            replaces,
            token_floor: self.token_floor(),
            created_ms: self.clock.now_ms(),
        }
        .encode();
        let (tmp, name) = (temp_name(id), segment_name(id));
        let tmp_path = self.storage.path(&tmp);
        let file = self
            .storage
            .create(&tmp)
            .map_err(|e| Error::io(IoOp::Create, &tmp_path, e))?;
        let written = (|| {
            file.append(&header)
                .and_then(|()| file.append(frames))
                .map_err(|e| Error::io(IoOp::Write, &tmp_path, e))?;
            // A failed sync here loses nothing acknowledged (the input still
            // holds every record), but the file's state is unknown: fail-stop.
            if let Err(e) = file.sync() {
                self.set_poison(e.kind());
                return Err(Error::io(IoOp::Sync, &tmp_path, e));
            }
            self.storage
                .rename(&tmp, &name)
                .map_err(|e| Error::io(IoOp::Rename, &tmp_path, e))?;
            Ok(file)
        })();
        let file = match written {
            Ok(file) => file,
            Err(e) => {
                // Do not leave the unfinished output behind until the next
                // open (best effort: recovery removes it otherwise).
                let _ = self.storage.remove(&tmp);
                return Err(e);
            }
        };
        self.sync_dir()?;
        Ok(file)
    }

    /// Forgets segment `file` and removes it. The removal becomes durable
    /// with the next [`Log::sync_dir`]; until then a crash may bring it
    /// back, and recovery removes it again (its replacement names it).
    ///
    /// A failed removal poisons the log: the file stays behind, and once a
    /// later compaction rewrote its replacement nothing would name it any
    /// more, so recovery would replay its stale records again.
    pub fn retire(&self, file: u64) -> Result<()> {
        let Some(segment) = self.segments.write().remove(file) else {
            return Ok(());
        };
        self.free_slot(file);
        let name = segment_name(segment.number);
        let result = self
            .storage
            .remove(&name)
            .map_err(|e| Error::io(IoOp::Remove, self.storage.path(&name), e));
        self.poison_on(result)
    }

    /// Makes creations, renames and removals in the directory durable.
    pub fn sync_dir(&self) -> Result<()> {
        let result = self
            .storage
            .sync_dir()
            .map_err(|e| Error::io(IoOp::SyncDir, self.storage.path(""), e));
        self.poison_on(result)
    }
}
