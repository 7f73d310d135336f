//! Reading one record back by its position: from the writer's pending
//! buffer, a read-only map of its segment, or `pread`, always checking the
//! record's CRC.

use std::collections::BTreeMap;
use std::ops::Range;

use bytes::Bytes;

use super::record::{FRAME_HEADER, Record, Seal, check_frame, frame_header};
use super::seal::{Keyring, SealError};
use super::{Segment, segment_name, split};
use crate::error::{CorruptKind, Error, IoOp, Result};
use crate::storage::Storage;

/// A record read back from the log: its frame (shared with the segment's
/// map, or its own buffer) and where its fields are in it. Reading a field
/// takes no reference count: only [`ReadRecord::into_outcome`] hands out a
/// buffer, and it reuses the frame's, so a replay costs one count (a sealed
/// body is opened into a buffer of its own).
#[derive(Clone, Debug)]
pub(crate) struct ReadRecord {
    pub token: u64,
    pub fingerprint: u128,
    pub status: u16,
    /// `Some` if the body is sealed.
    pub seal: Option<Seal>,
    frame: Bytes,
    user: Range<usize>,
    key: Range<usize>,
    body: Range<usize>,
}

impl ReadRecord {
    /// The stored outcome (status and body) of a complete record, its body
    /// opened with `keys` if it is sealed.
    pub fn into_outcome(
        self,
        keys: &Keyring,
    ) -> std::result::Result<crate::outcome::Outcome, SealError> {
        if let Some(seal) = self.seal {
            let aad = self
                .frame
                .get(FRAME_HEADER..self.body.start)
                .unwrap_or_default();
            let sealed = self.frame.get(self.body.clone()).unwrap_or_default();
            let body = keys.open(seal, aad, sealed)?;
            return Ok(crate::outcome::Outcome {
                status: self.status,
                body: Bytes::from(body),
            });
        }
        let mut body = self.frame;
        body.truncate(self.body.end);
        bytes::Buf::advance(&mut body, self.body.start);
        Ok(crate::outcome::Outcome {
            status: self.status,
            body,
        })
    }

    /// The user id it was written for.
    /// The whole frame, as the log stores it.
    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    pub fn frame(&self) -> &Bytes {
        &self.frame
    }

    pub fn user(&self) -> &[u8] {
        self.frame.get(self.user.clone()).unwrap_or_default()
    }

    /// The key it was written for.
    pub fn key(&self) -> &[u8] {
        self.frame.get(self.key.clone()).unwrap_or_default()
    }

    /// The user id and key as buffers of their own (sharing the frame's).
    pub fn user_and_key(&self) -> (Bytes, Bytes) {
        (
            self.frame.slice(self.user.clone()),
            self.frame.slice(self.key.clone()),
        )
    }

    fn new(content: &Bytes, rec: &Record<'_>) -> ReadRecord {
        // Every field is a slice of `content` (`check_frame` parsed it);
        // an empty one may point anywhere, so keep any range inside.
        let range = |part: &[u8]| {
            let start = (part.as_ptr() as usize).wrapping_sub(content.as_ptr() as usize);
            match start.checked_add(part.len()) {
                Some(end) if end <= content.len() => start..end,
                _ => 0..0,
            }
        };
        ReadRecord {
            token: rec.token,
            fingerprint: rec.fingerprint,
            status: rec.status,
            seal: rec.seal,
            user: range(rec.user),
            key: range(rec.key),
            body: range(rec.body),
            frame: content.clone(),
        }
    }
}

/// Bytes read at once when a record is read back: the whole of a record with
/// a body of up to about 400 bytes.
const FIRST_READ: usize = 512;

/// How a read may use a segment's map.
#[derive(Clone, Copy, Debug)]
pub(super) enum MapUse {
    /// Not at all: `pread` (`Options::mmap_reads` off).
    Off,
    /// Copy the record out of the map: it is not durable yet, so a failed
    /// sync may still cut it off the file (which the caller's segment read
    /// lock keeps from happening during the copy).
    Copy(u64),
    /// Share the map: the record is durable, and no byte below the durable
    /// end is ever cut off a file, so the body may outlive every lock.
    Share(u64),
}

/// Reads the record at `at` from `segments` (by slot), checking its CRC:
/// from the segment's map when `map` allows, else with `pread`.
pub(super) fn read_from(
    storage: &dyn Storage,
    segments: &BTreeMap<u64, Segment>,
    at: u64,
    map: MapUse,
) -> Result<ReadRecord> {
    let (slot, offset) = split(at);
    let segment = segments.get(&slot);
    let path = || {
        segment.map_or_else(
            || storage.path(""),
            |s| storage.path(&segment_name(s.number)),
        )
    };
    let dangling = || Error::Corrupt {
        file: path(),
        offset,
        kind: CorruptKind::Dangling,
    };
    let segment = segment.ok_or_else(dangling)?;
    let file = &segment.file;
    let file_len = file.len().map_err(|e| Error::io(IoOp::Read, path(), e))?;
    let available = file_len.saturating_sub(offset);
    let corrupt = |kind| Error::Corrupt {
        file: path(),
        offset,
        kind,
    };
    if let MapUse::Copy(capacity) | MapUse::Share(capacity) = map
        && let Some(mapped) = segment.map(capacity)
    {
        // Only bytes the file holds (the map may reach past its end).
        let end = (mapped.len() as u64).min(file_len);
        if let (Ok(start), Ok(end)) = (usize::try_from(offset), usize::try_from(end))
            && let Some(rest) = mapped.get(start..end)
        {
            let (len, _) = frame_header(rest).ok_or_else(dangling)?;
            let total = FRAME_HEADER.saturating_add(len);
            if let Some(bytes) = rest.get(..total) {
                let frame = match map {
                    MapUse::Share(_) => mapped.slice(start..start + total),
                    _ => Bytes::copy_from_slice(bytes),
                };
                return decode(&frame).map_err(corrupt);
            }
            if total as u64 > available {
                return Err(dangling());
            }
            // Longer than the map (a record bigger than a segment): read it.
        }
    }
    // One read covers a typical record (header, ids, a body of a few
    // hundred bytes); a longer one takes a second read for the rest. The
    // frame's length is checked against the file before anything is
    // allocated for it.
    let read = |at: u64, buf: &mut [u8]| {
        file.read_at(at, buf)
            .map_err(|e| Error::io(IoOp::Read, path(), e))
    };
    let first = usize::try_from(available.min(FIRST_READ as u64)).unwrap_or(FIRST_READ);
    let mut frame = vec![0u8; first];
    read(offset, &mut frame)?;
    let (len, _) = frame_header(&frame).ok_or_else(dangling)?;
    let total = FRAME_HEADER.saturating_add(len);
    if total as u64 > available {
        return Err(dangling());
    }
    if total > first {
        frame.resize(total, 0);
        if let Some(rest) = frame.get_mut(first..) {
            read(offset + first as u64, rest)?;
        }
    } else {
        frame.truncate(total);
    }
    let frame = Bytes::from(frame);
    decode(&frame).map_err(corrupt)
}

/// The record in `frame` (one whole frame), CRC checked.
pub(super) fn decode(frame: &Bytes) -> std::result::Result<ReadRecord, CorruptKind> {
    check_frame(frame).map(|(rec, _)| ReadRecord::new(frame, &rec))
}
