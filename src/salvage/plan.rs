//! Planning a salvage: find the segment files, read their headers, walk
//! their frames (`log/resync.rs`), and decide what each file keeps, what
//! goes to quarantine, and which files are rewritten with which header.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use crate::error::{CorruptKind, Error, IoOp, Result};
use crate::index::{OFFSET_LIMIT, TOKEN_LIMIT};
use crate::log::record::{FIXED, FRAME_HEADER, HEADER_LEN, SegmentHeader, VERSION};
use crate::log::resync::{Piece, ids, walk};
use crate::log::{TOKEN_BLOCK, parse_name, read_all, segment_name};
use crate::storage::{Storage, StorageFile};

/// How a segment's header was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Header {
    /// It checks out.
    Intact(SegmentHeader),
    /// Its fields (bytes 16..56) pass their CRC and name this file, but the
    /// magic or version bytes are damaged (`kind` says which): it is
    /// written again with the same fields.
    Restored(SegmentHeader, CorruptKind),
    /// Nothing in it can be trusted: it is rebuilt from the file name.
    Lost(CorruptKind),
}

impl Header {
    fn read(head: &[u8], id: u64) -> Header {
        // A file replacing itself: fields no engine writes (recovery would
        // remove the file); as untrusted as a damaged header.
        let own = |h: &SegmentHeader| h.file == id && h.replaces != id;
        match SegmentHeader::decode(head) {
            Ok(h) if own(&h) => Header::Intact(h),
            Ok(_) => Header::Lost(CorruptKind::BadHeader),
            Err(kind) => match SegmentHeader::decode_fields(head) {
                Some(h) if own(&h) => Header::Restored(h, kind),
                _ => Header::Lost(kind),
            },
        }
    }

    /// The header's fields, if they can be trusted.
    pub fn fields(&self) -> Option<SegmentHeader> {
        match *self {
            Header::Intact(h) | Header::Restored(h, _) => Some(h),
            Header::Lost(_) => None,
        }
    }
}

/// A stretch of a segment file that goes to quarantine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Range {
    pub at: usize,
    pub end: usize,
    /// What the first damaged byte was.
    pub kind: CorruptKind,
}

/// One segment file and what the salvage does with it.
pub(super) struct Segment {
    pub id: u64,
    pub name: String,
    pub file: Arc<dyn StorageFile>,
    pub len: usize,
    pub header: Header,
    /// What the walk found; empty for a clean file (header intact, every
    /// byte in a valid frame), whose frames are only counted.
    pub pieces: Vec<Piece>,
    /// Valid frames in the file.
    pub frames: u64,
    /// Valid frames dropped because the header was lost, so where they
    /// replay is unknown, and their key has records that could replay on
    /// either side of them (by offset).
    pub unplaced: HashSet<usize>,
    /// Whether the file is written again.
    pub rewrite: bool,
}

impl Segment {
    fn clean(&self) -> bool {
        matches!(self.header, Header::Intact(_)) && self.pieces.is_empty()
    }

    /// Where the file replays, if its header says so.
    fn order(&self) -> Option<u64> {
        self.header.fields().map(|h| h.order)
    }

    /// The stretches that go to quarantine, in order: the header unless
    /// intact, every piece but a kept frame, adjacent ones merged.
    pub fn ranges(&self) -> Vec<Range> {
        let mut items = Vec::new();
        match self.header {
            Header::Intact(_) => {}
            Header::Restored(_, kind) | Header::Lost(kind) => items.push(Range {
                at: 0,
                end: self.len.min(HEADER_LEN),
                kind,
            }),
        }
        for piece in &self.pieces {
            let (at, end) = (piece.at(), piece.end());
            let kind = match piece.kind() {
                Some(kind) => kind,
                None if self.unplaced.contains(&at) => CorruptKind::BadHeader,
                None => continue,
            };
            items.push(Range { at, end, kind });
        }
        let mut ranges: Vec<Range> = Vec::new();
        for item in items.into_iter().filter(|r| r.end > r.at) {
            match ranges.last_mut() {
                Some(last) if last.end == item.at => last.end = item.end,
                _ => ranges.push(item),
            }
        }
        ranges
    }

    /// The header the rewritten file gets, with at least `floor` as its
    /// token floor.
    pub fn new_header(&self, floor: u64) -> SegmentHeader {
        match self.header.fields() {
            Some(h) => SegmentHeader {
                token_floor: h.token_floor.max(floor),
                ..h
            },
            None => SegmentHeader {
                file: self.id,
                order: self.id,
                replaces: 0,
                token_floor: floor,
                created_ms: 0,
            },
        }
    }

    /// Reads the whole file.
    pub fn read(&self, storage: &dyn Storage) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        read_all(&*self.file, &storage.path(&self.name), &mut buf)?;
        if buf.len() != self.len {
            // Offline, under the lock: only another program changes files.
            let changed = std::io::Error::other("the file changed during the salvage");
            return Err(Error::io(IoOp::Read, storage.path(&self.name), changed));
        }
        Ok(buf)
    }
}

/// What a salvage found, and what it is going to do.
pub(super) struct Plan {
    /// Every segment file examined, by file number.
    pub segments: Vec<Segment>,
    /// Segment files a compaction output replaces (the next open removes
    /// them): neither read nor changed.
    pub superseded: Vec<u64>,
    /// The token floor every rewritten file's header carries (at least),
    /// if any file is rewritten.
    pub token_floor: Option<u64>,
    /// Every file name in the directory.
    pub names: BTreeSet<String>,
}

/// The smallest frame: a frame header and a record's fixed part.
const MIN_FRAME: u64 = (FRAME_HEADER + FIXED) as u64;

/// Finds the segment files of `storage` and decides what to do with each.
///
/// # Errors
/// [`Error::InvalidArgument`] if there is no segment file;
/// [`Error::Corrupt`] with `UnsupportedVersion` for a file written by a
/// newer format (left alone); [`Error::Io`] if a file cannot be read.
pub(super) fn plan(storage: &dyn Storage) -> Result<Plan> {
    let dir = storage.path("");
    let names: BTreeSet<String> = storage
        .list()
        .map_err(|e| Error::io(IoOp::List, &dir, e))?
        .into_iter()
        .collect();
    let mut found = BTreeMap::new();
    for id in names.iter().filter_map(|n| parse_name(n, ".log")) {
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
        let mut head = vec![0u8; len.min(HEADER_LEN)];
        file.read_at(0, &mut head)
            .map_err(|e| Error::io(IoOp::Read, &path, e))?;
        found.insert(id, (name, file, len, Header::read(&head, id)));
    }
    if found.is_empty() {
        return Err(Error::InvalidArgument {
            name: "dir",
            problem: "holds no segment file (*.log)",
        });
    }
    let superseded: Vec<u64> = found
        .iter()
        .filter_map(|(&id, (_, _, _, h))| h.fields().map(|h| (id, h.replaces)))
        .filter(|&(id, r)| r != 0 && r != id && found.contains_key(&r))
        .map(|(_, r)| r)
        .collect::<BTreeSet<u64>>()
        .into_iter()
        .collect();
    let mut max_known = 0u64;
    let mut segments = Vec::new();
    for (id, (name, file, len, header)) in found {
        if superseded.contains(&id) {
            continue;
        }
        let mut segment = Segment {
            id,
            name,
            file,
            len,
            header,
            pieces: Vec::new(),
            frames: 0,
            unplaced: HashSet::new(),
            rewrite: false,
        };
        let buf = segment.read(storage)?;
        segment.pieces = within_limits(&buf, walk(&buf));
        refuse_newer_format(&buf, &segment.pieces, &storage.path(&segment.name))?;
        for piece in &segment.pieces {
            if let Piece::Frame { at, .. } = *piece {
                segment.frames += 1;
                max_known = max_known.max(token_at(&buf, at).saturating_add(1));
            }
        }
        if let Some(h) = segment.header.fields() {
            max_known = max_known.max(h.token_floor);
        }
        if segment
            .pieces
            .iter()
            .all(|p| matches!(p, Piece::Frame { .. }))
        {
            segment.pieces.clear();
        }
        segments.push(segment);
    }
    place_lost_headers(storage, &mut segments)?;
    let token_floor = decide_rewrites(&mut segments, max_known);
    Ok(Plan {
        segments,
        superseded,
        token_floor,
        names,
    })
}

/// A file whose magic is intact but whose version is another, and in
/// whose bytes after the header no version-1 frame is found, was written by
/// a newer format: a salvage cannot read it, and leaves it alone. (A
/// version-1 file whose version bytes were hit still holds valid frames.)
fn refuse_newer_format(buf: &[u8], pieces: &[Piece], path: &std::path::Path) -> Result<()> {
    let version = buf
        .get(8..12)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes);
    let Some(version) = version.filter(|v| *v != VERSION) else {
        return Ok(());
    };
    let readable = pieces.is_empty() || pieces.iter().any(|p| matches!(p, Piece::Frame { .. }));
    if SegmentHeader::has_magic(buf) && !readable {
        return Err(Error::Corrupt {
            file: path.to_path_buf(),
            offset: 8,
            kind: CorruptKind::UnsupportedVersion(version),
        });
    }
    Ok(())
}

/// `pieces` with every valid frame that recovery would refuse as not
/// written by this engine (a fencing token at or past `TOKEN_LIMIT`, an
/// offset at or past `OFFSET_LIMIT`) made a damaged one, so that the
/// salvaged directory opens.
fn within_limits(buf: &[u8], pieces: Vec<Piece>) -> Vec<Piece> {
    pieces
        .into_iter()
        .map(|p| match p {
            Piece::Frame { at, end }
                if token_at(buf, at) >= TOKEN_LIMIT || at as u64 >= OFFSET_LIMIT =>
            {
                Piece::Bad { at, end }
            }
            p => p,
        })
        .collect()
}

/// The fencing token of the (valid) frame at `at`.
fn token_at(buf: &[u8], at: usize) -> u64 {
    buf.get(at + FRAME_HEADER + 1..at + FRAME_HEADER + 9)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

/// A digest of a record's user and key, to compare keys across files.
fn key_digest(user: &[u8], key: &[u8]) -> u128 {
    let mut bytes = Vec::with_capacity(2 + user.len() + key.len());
    bytes.extend_from_slice(&(user.len() as u64).to_le_bytes());
    bytes.extend_from_slice(user);
    bytes.extend_from_slice(key);
    xxhash_rust::xxh3::xxh3_128(&bytes)
}

/// The keys of the valid frames of `segment`, by offset.
fn frame_keys(storage: &dyn Storage, segment: &Segment) -> Result<Vec<(usize, u128)>> {
    let buf = segment.read(storage)?;
    let pieces = if segment.pieces.is_empty() {
        walk(&buf)
    } else {
        segment.pieces.clone()
    };
    Ok(pieces
        .iter()
        .filter_map(|p| match *p {
            Piece::Frame { at, end } => ids(&buf, at, end).map(|(u, k)| (at, key_digest(u, k))),
            _ => None,
        })
        .collect())
}

/// A file whose header was lost replays, once rebuilt, at its file number:
/// right for a segment the log made, wrong for a compaction output (which
/// replays at the order of the file it replaced, an earlier one). Its
/// records are kept where the difference cannot change any answer: those
/// of keys with no record in another file that replays before its file
/// number (or whose place is unknown too), and token reservations (which
/// belong to no key). The others are dropped as `unplaced`.
fn place_lost_headers(storage: &dyn Storage, segments: &mut [Segment]) -> Result<()> {
    let lost: Vec<usize> = (0..segments.len())
        .filter(|&i| {
            segments
                .get(i)
                .is_some_and(|s| s.header.fields().is_none() && s.frames > 0)
        })
        .collect();
    for i in lost {
        let Some(id) = segments.get(i).map(|s| s.id) else {
            continue;
        };
        let mut before = HashSet::new();
        for other in segments.iter().filter(|s| s.id != id) {
            if other.order().is_none_or(|o| o < id) {
                before.extend(frame_keys(storage, other)?.into_iter().map(|(_, k)| k));
            }
        }
        let Some(segment) = segments.get_mut(i) else {
            continue;
        };
        let own = frame_keys(storage, segment)?;
        segment.unplaced = own
            .into_iter()
            .filter(|(_, k)| before.contains(k))
            .map(|(at, _)| at)
            .collect();
    }
    Ok(())
}

/// Marks the files to rewrite and returns the token floor they carry:
/// every file that is not clean, and, if there is one, the file that
/// replays last (the one the next open appends to), so that the floor
/// survives until a token is handed out above it.
///
/// The floor is above every token and floor the kept files show, plus one
/// reservation block (`TOKEN_BLOCK` + 1) for each record the quarantined
/// bytes could hold and one more: the engine reserves tokens in blocks
/// above the last reservation, so each lost record can hide at most one
/// block of tokens handed out.
fn decide_rewrites(segments: &mut [Segment], max_known: u64) -> Option<u64> {
    let mut quarantined = 0u64;
    for s in segments.iter_mut() {
        if !s.clean() || !s.unplaced.is_empty() {
            s.rewrite = true;
            quarantined += s
                .ranges()
                .iter()
                .map(|r| (r.end - r.at) as u64)
                .sum::<u64>();
        }
    }
    if !segments.iter().any(|s| s.rewrite) {
        return None;
    }
    let blocks = quarantined.div_ceil(MIN_FRAME).saturating_add(1);
    let floor = max_known
        .saturating_add((TOKEN_BLOCK + 1).saturating_mul(blocks))
        .min(TOKEN_LIMIT);
    let last = segments
        .iter_mut()
        .max_by_key(|s| (s.order().unwrap_or(s.id), s.id));
    if let Some(last) = last
        && last.new_header(0).token_floor < floor
    {
        last.rewrite = true;
    }
    Some(floor)
}
