//! Opening the log: find the segments, drop what a crash or a compaction
//! left behind, and replay the rest in order.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

use super::group_commit::GroupCommit;
use super::reader::{Tail, replay_segment, scan_segment};
use super::record::{HEADER_LEN, Record, SegmentHeader};
use super::seal::{keyring, needs_seal};
use super::table::SegmentTable;
use super::writer::{Writer, create_segment};
use super::{Log, Pin, ReadRecord, Segment, Slots, pos, read_from, segment_name};
use crate::error::{CorruptKind, Error, IoOp, Result};
use crate::options::{Durability, Options};
use crate::stats::Counters;
use crate::storage::{Storage, StorageFile};

/// Reads records during recovery, for checks that need an earlier record.
pub(crate) struct Replayed<'a> {
    storage: &'a dyn Storage,
    segments: &'a BTreeMap<u64, Segment>,
}

impl Replayed<'_> {
    /// The record at `at` (already replayed).
    pub fn read(&self, at: u64) -> Result<ReadRecord> {
        read_from(self.storage, self.segments, at, super::MapUse::Off)
    }
}

/// The file number in a segment's name (6 to 16 hex digits), if it is one.
pub(crate) fn parse_name(name: &str, suffix: &str) -> Option<u64> {
    let hex = name.strip_suffix(suffix)?;
    if !(6..=16).contains(&hex.len()) || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let number = u64::from_str_radix(hex, 16).ok()?;
    // One spelling per number: what `segment_name` writes.
    (segment_name(number).strip_suffix(".log") == Some(hex)).then_some(number)
}

/// Reads a whole file into `buf` (reused from segment to segment, so a
/// long replay does not fault fresh pages in for every segment).
pub(crate) fn read_all(
    file: &dyn StorageFile,
    path: &std::path::Path,
    buf: &mut Vec<u8>,
) -> Result<()> {
    let len = file.len().map_err(|e| Error::io(IoOp::Read, path, e))?;
    let len = usize::try_from(len).map_err(|_| Error::Corrupt {
        file: path.to_path_buf(),
        offset: 0,
        kind: CorruptKind::Malformed,
    })?;
    buf.clear();
    buf.resize(len, 0);
    file.read_at(0, buf)
        .map_err(|e| Error::io(IoOp::Read, path, e))?;
    Ok(())
}

/// Segments smaller than this replay their lanes one after another on the
/// opening thread.
const PARALLEL_MIN: usize = 256 << 10;

/// Scans `buf` once per lane, the lanes side by side: lane 0 on this thread,
/// counting records and the highest token; lane `l` calls
/// `apply(l, record, pos)` for every valid record, so that each lane can
/// apply its own share of the records in log order. Every lane sees the
/// same bytes, so every lane's scan ends the same way: only lane 0 decides
/// how the bytes end (torn tail or corruption), and its result is
/// returned. A lane whose thread cannot be started runs here afterwards,
/// and so do all lanes of a segment under [`PARALLEL_MIN`] bytes, whose
/// replay takes less time than starting a thread.
fn scan_lanes<F>(
    buf: &[u8],
    id: u64,
    slot: u64,
    lanes: usize,
    sealing: Option<u32>,
    apply: &F,
) -> (
    std::result::Result<(SegmentHeader, Tail), super::reader::Damage>,
    Counted,
)
where
    F: Fn(usize, Record<'_>, u64) + Sync,
{
    // Lane 0 decides how the bytes end; the other lanes only apply records.
    let lane = |l: usize| replay_segment(buf, id, |rec, offset| apply(l, rec, pos(slot, offset)));
    std::thread::scope(|s| {
        let mut inline = Vec::new();
        for l in 1..lanes {
            if buf.len() < PARALLEL_MIN {
                inline.push(l);
                continue;
            }
            let spawned = std::thread::Builder::new()
                .name("idemkv-recover".into())
                .spawn_scoped(s, move || lane(l));
            if spawned.is_err() {
                inline.push(l);
            }
        }
        let mut counted = Counted::default();
        let scanned = scan_segment(buf, id, |rec, offset| {
            counted.records += 1;
            counted.max_token = counted.max_token.max(rec.token);
            counted.unsealed += u64::from(needs_seal(sealing, &rec));
            apply(0, rec, pos(slot, offset));
        });
        for l in inline {
            lane(l);
        }
        (scanned, counted)
    })
}

/// What the scan of a segment counted.
#[derive(Clone, Copy, Debug, Default)]
struct Counted {
    records: u64,
    max_token: u64,
    /// Complete records that a full compaction would seal.
    unsealed: u64,
}

/// What a data directory holds, found without changing anything.
struct Survey {
    /// Segments by file number, with their header (`None` if torn).
    found: BTreeMap<u64, (Arc<dyn StorageFile>, Option<SegmentHeader>)>,
    /// Segments a complete compaction output replaces (still present).
    replaced: Vec<u64>,
    /// Unfinished compaction outputs.
    temps: Vec<String>,
}

fn survey(storage: &dyn Storage) -> Result<Survey> {
    let dir = storage.path("");
    let names = storage.list().map_err(|e| Error::io(IoOp::List, &dir, e))?;
    if names.iter().any(|n| n == crate::salvage::MANIFEST) {
        // Some segments may be salvaged and others not yet: never replay a mix.
        return Err(Error::SalvagePending {
            // `path("")` ends with a separator: spell the directory as given.
            dir: dir.components().collect(),
        });
    }
    let temps = names
        .iter()
        .filter(|n| parse_name(n, ".log.tmp").is_some())
        .cloned()
        .collect();
    let mut found = BTreeMap::new();
    for id in names.iter().filter_map(|n| parse_name(n, ".log")) {
        let name = segment_name(id);
        let path = storage.path(&name);
        let file = storage
            .open(&name)
            .map_err(|e| Error::io(IoOp::Open, &path, e))?;
        let len = file.len().map_err(|e| Error::io(IoOp::Read, &path, e))?;
        let mut head = [0u8; HEADER_LEN];
        let header = if len >= HEADER_LEN as u64 {
            file.read_at(0, &mut head)
                .map_err(|e| Error::io(IoOp::Read, &path, e))?;
            SegmentHeader::decode(&head).ok().filter(|h| h.file == id)
        } else {
            None
        };
        found.insert(id, (file, header));
    }
    let replaced = found
        .values()
        .filter_map(|(_, h)| h.map(|h| h.replaces))
        .filter(|r| *r != 0 && found.contains_key(r))
        .collect();
    Ok(Survey {
        found,
        replaced,
        temps,
    })
}

/// File numbers in replay order; a segment with a torn header replays last
/// (it can only be the active segment a crash interrupted while creating).
fn replay_order(found: &BTreeMap<u64, (Arc<dyn StorageFile>, Option<SegmentHeader>)>) -> Vec<u64> {
    let mut ordered: Vec<(u64, u64)> = found
        .iter()
        .map(|(&id, (_, h))| (h.map_or(u64::MAX, |h| h.order), id))
        .collect();
    ordered.sort_unstable();
    ordered.into_iter().map(|(_, id)| id).collect()
}

/// Where the valid bytes of a segment of `len` bytes end, given how its
/// scan ended: a torn tail is tolerated only in the last segment that holds
/// records (the one a crash can have interrupted: `is_last` is true when
/// every later segment is empty, like the spare a roll makes ahead of
/// time); anywhere else it is corruption.
fn valid_end(tail: Tail, len: usize, is_last: bool, path: &std::path::Path) -> Result<usize> {
    match tail {
        Tail::Clean => Ok(len),
        Tail::Torn { at } if is_last => Ok(at),
        Tail::TornHeader if is_last => Ok(0),
        Tail::Torn { at } => Err(Error::Corrupt {
            file: path.to_path_buf(),
            offset: at as u64,
            kind: CorruptKind::Malformed,
        }),
        Tail::TornHeader => Err(Error::Corrupt {
            file: path.to_path_buf(),
            offset: 0,
            kind: CorruptKind::BadHeader,
        }),
    }
}

/// For each segment in `ordered`, whether every segment after it holds no
/// record (its file is no longer than a segment header).
fn later_empty(
    ordered: &[u64],
    found: &BTreeMap<u64, (Arc<dyn StorageFile>, Option<SegmentHeader>)>,
) -> Vec<bool> {
    let empty: Vec<bool> = ordered
        .iter()
        .map(|id| {
            found
                .get(id)
                .is_none_or(|(file, _)| file.len().is_ok_and(|len| len <= HEADER_LEN as u64))
        })
        .collect();
    let mut out = vec![true; ordered.len()];
    let mut all_empty = true;
    for (i, e) in empty.iter().enumerate().rev() {
        if let Some(slot) = out.get_mut(i) {
            *slot = all_empty;
        }
        all_empty &= *e;
    }
    out
}

/// What [`verify`] found in a data directory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Verified {
    pub segments: u64,
    pub records: u64,
    pub bytes: u64,
    /// A torn tail at the end of the last segment (file, offset): what the
    /// next open will cut off. Not corruption.
    pub torn_tail: Option<(std::path::PathBuf, u64)>,
}

/// Checks every frame of every segment in `storage` without changing
/// anything: the same rules as recovery.
pub(crate) fn verify(storage: &dyn Storage) -> Result<Verified> {
    let survey = survey(storage)?;
    let mut found = survey.found;
    for id in &survey.replaced {
        found.remove(id);
    }
    let ordered = replay_order(&found);
    let last = later_empty(&ordered, &found);
    let mut report = Verified::default();
    let mut buf = Vec::new();
    for (i, &id) in ordered.iter().enumerate() {
        let path = storage.path(&segment_name(id));
        let Some((file, _)) = found.get(&id) else {
            continue;
        };
        read_all(&**file, &path, &mut buf)?;
        let mut records = 0;
        let scanned = scan_segment(&buf, id, |_, _| records += 1);
        let (_, tail) = scanned.map_err(|(offset, kind)| Error::Corrupt {
            file: path.clone(),
            offset: offset as u64,
            kind,
        })?;
        let end = valid_end(tail, buf.len(), last.get(i) == Some(&true), &path)?;
        if end < buf.len() {
            report.torn_tail = Some((path, end as u64));
        }
        report.segments += 1;
        report.records += records;
        report.bytes += buf.len() as u64;
    }
    Ok(report)
}

impl Log {
    /// Opens the log in `storage`: removes unfinished compaction outputs
    /// and segments a finished one replaced, replays every segment in order
    /// (calling `apply(lane, record, pos, replayed)` for each valid record in
    /// each of `lanes` lanes, which run in parallel; see [`scan_lanes`]),
    /// cuts a torn tail off the last segment and makes it the active one
    /// (creating the first segment of an empty directory).
    pub fn open(
        storage: Arc<dyn Storage>,
        options: &Options,
        counters: Arc<Counters>,
        lanes: usize,
        apply: impl Fn(usize, Record<'_>, u64, &Replayed<'_>) + Sync,
    ) -> Result<Arc<Log>> {
        let dir = storage.path("");
        let Survey {
            mut found,
            replaced,
            temps,
        } = survey(&*storage)?;
        for name in &temps {
            storage
                .remove(name)
                .map_err(|e| Error::io(IoOp::Remove, storage.path(name), e))?;
        }
        for id in replaced {
            found.remove(&id);
            let name = segment_name(id);
            storage
                .remove(&name)
                .map_err(|e| Error::io(IoOp::Remove, storage.path(&name), e))?;
        }
        // Always sync the directory: besides the removals above, a restart
        // after a failed roll (without a crash) can list a segment whose
        // name never reached the disk, and records are about to go into it.
        storage
            .sync_dir()
            .map_err(|e| Error::io(IoOp::SyncDir, &dir, e))?;
        let ordered = replay_order(&found);
        let last = later_empty(&ordered, &found);
        let max_file = found.keys().copied().max().unwrap_or(0);
        // Slots 1..=n, in replay order.
        let slot_of: BTreeMap<u64, u64> =
            ordered.iter().zip(1u64..).map(|(&n, s)| (n, s)).collect();
        let segments: BTreeMap<u64, Segment> = found
            .into_iter()
            .filter_map(|(id, (file, h))| {
                let segment = Segment {
                    file,
                    number: id,
                    order: h.map_or(id, |h| h.order),
                    records: Arc::new(AtomicU64::new(0)),
                    pinned: Pin::default(),
                    unsealed: 0,
                    map: Arc::default(),
                    local: OnceLock::new(),
                };
                Some((*slot_of.get(&id)?, segment))
            })
            .collect();

        let mut max_token = 0u64;
        let mut active = None;
        let mut active_header: Option<SegmentHeader> = None;
        let replayed = Replayed {
            storage: &*storage,
            segments: &segments,
        };
        let apply = |lane, rec: Record<'_>, at| apply(lane, rec, at, &replayed);
        let keys = keyring(options);
        let mut unsealed = BTreeMap::new();
        let mut buf = Vec::new();
        for (i, &id) in ordered.iter().enumerate() {
            let path = storage.path(&segment_name(id));
            let Some(&slot) = slot_of.get(&id) else {
                continue;
            };
            let Some(segment) = segments.get(&slot) else {
                continue;
            };
            let file = Arc::clone(&segment.file);
            read_all(&*file, &path, &mut buf)?;
            let len = buf.len();
            let is_last = i + 1 == ordered.len();
            let (scanned, counted) =
                scan_lanes(&buf, id, slot, lanes.max(1), keys.current(), &apply);
            max_token = max_token.max(counted.max_token);
            unsealed.insert(slot, counted.unsealed);
            let (header, tail) = scanned.map_err(|(offset, kind)| Error::Corrupt {
                file: path.clone(),
                offset: offset as u64,
                kind,
            })?;
            segment
                .records
                .store(counted.records, std::sync::atomic::Ordering::Relaxed);
            max_token = max_token.max(header.token_floor.saturating_sub(1));
            let end = valid_end(tail, len, last.get(i) == Some(&true), &path)?;
            if end < len {
                crate::trace::event!(warn, file = %path.display(), offset = end, dropped = len - end, "cutting off a torn tail");
                file.truncate(end as u64)
                    .and_then(|()| file.sync())
                    .map_err(|e| Error::io(IoOp::Truncate, &path, e))?;
            }
            if last.get(i) == Some(&true) && end == len {
                // The last segment holding records (and the empty ones after
                // it) may hold bytes the previous engine appended but never
                // synced, still in the page cache: sync them now, so that
                // nothing this engine shows (and builds on) can be taken
                // back by a power loss. (A cut tail was synced above.)
                file.sync().map_err(|e| Error::io(IoOp::Sync, &path, e))?;
            }
            if is_last {
                active = Some((slot, id, Arc::clone(&segment.records), file, end as u64));
                active_header = Some(header);
            }
        }

        let mut segments = segments;
        for (slot, segment) in &mut segments {
            segment.unsealed = unsealed.get(slot).copied().unwrap_or(0);
        }
        let next_token = max_token.saturating_add(1);
        let taken = segments.len() as u64;
        let mut slots = Slots::with_taken(taken);
        let (slot, id, records, file, offset) = match active {
            Some((slot, id, records, file, 0)) => {
                // The last segment lost its header in a crash while it was
                // being created: write it again. It replays last: give it
                // an order above every other segment's.
                let order = segments
                    .values()
                    .map(|s| s.order)
                    .filter(|o| *o != u64::MAX)
                    .max()
                    .unwrap_or(0)
                    .max(id)
                    .saturating_add(1);
                let header = SegmentHeader {
                    file: id,
                    order,
                    replaces: 0,
                    token_floor: next_token,
                    created_ms: options.clock.now_ms(),
                }
                .encode();
                let path = storage.path(&segment_name(id));
                file.append(&header)
                    .and_then(|()| file.sync())
                    .map_err(|e| Error::io(IoOp::Write, path, e))?;
                if let Some(segment) = segments.get_mut(&slot) {
                    segment.order = order;
                }
                (slot, id, records, file, HEADER_LEN as u64)
            }
            Some((slot, id, records, file, offset))
                if offset == HEADER_LEN as u64
                    && active_header.is_some_and(|h| h.token_floor < next_token) =>
            {
                // The spare a roll made ahead of time, empty, with a token
                // floor from before a reservation in an earlier segment:
                // were that segment compacted away while this one is
                // active, a crash would hand its tokens out again. It holds
                // no record: write its header again with the floor now.
                let header = SegmentHeader {
                    token_floor: next_token,
                    ..active_header.unwrap_or(SegmentHeader {
                        file: id,
                        order: id,
                        replaces: 0,
                        token_floor: next_token,
                        created_ms: 0,
                    })
                }
                .encode();
                let path = storage.path(&segment_name(id));
                file.truncate(0)
                    .and_then(|()| file.append(&header))
                    .and_then(|()| file.sync())
                    .map_err(|e| Error::io(IoOp::Write, path, e))?;
                (slot, id, records, file, offset)
            }
            Some(active) => active,
            None => {
                let id = max_file + 1;
                let slot = slots.take()?;
                let file = create_segment(&*storage, id, next_token, options.clock.as_ref())?;
                let segment = Segment::active(&file, id);
                let records = Arc::clone(&segment.records);
                segments.insert(slot, segment);
                (slot, id, records, file, HEADER_LEN as u64)
            }
        };
        let end = pos(slot, offset);
        let next_file = segments
            .values()
            .map(|s| s.number)
            .max()
            .unwrap_or(id)
            .max(id)
            .saturating_add(1);
        let log = Arc::new(Log {
            storage,
            durability: options.durability,
            segment_bytes: options.segment_bytes,
            mmap_reads: options.mmap_reads,
            keys,
            clock: Arc::clone(&options.clock),
            counters,
            writer: Mutex::new(Writer::new(slot, id, file, offset, records)),
            spinning: AtomicBool::new(false),
            segments: SegmentTable::new(&segments),
            slots: Mutex::new(slots),
            next_file: AtomicU64::new(next_file),
            roll: Mutex::new(None),
            spare_bytes: AtomicU64::new(0),
            written: AtomicU64::new(end),
            flushed: AtomicU64::new(end),
            durable: AtomicU64::new(end),
            poison: OnceLock::new(),
            next_token: AtomicU64::new(next_token),
            // Nothing is reserved beyond what the files show: the first
            // lease reserves a block.
            token_limit: AtomicU64::new(next_token),
            reserve_target: AtomicU64::new(next_token),
            reserving: Mutex::new(()),
            commit: GroupCommit::default(),
            syncer: super::syncer::Syncer::default(),
            offload: super::offload::Offload::default(),
        });
        match options.durability {
            Durability::Periodic(every) => {
                GroupCommit::start_flusher(&log, Some(every), options.background);
            }
            Durability::None => GroupCommit::start_flusher(&log, None, options.background),
            Durability::Sync => {}
        }
        Ok(log)
    }
}
