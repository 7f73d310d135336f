//! Walking a damaged segment for a salvage: which bytes are whole valid
//! frames, which are damaged frames that their own length field still
//! delimits, and which are garbage that no frame accounts for.
//!
//! # The resynchronisation rule
//! The walk starts after the 56-byte header and goes frame by frame. A
//! frame that passes every check of [`check_frame`] (length, CRC, fields)
//! is kept. At a frame that fails:
//! 1. if its length field claims a frame (at least a record's fixed part),
//!    and so on from frame to frame, until one ends exactly at the end of
//!    the file or where a valid frame starts, the damage is those frames
//!    (records whose length survived: a CRC or a field failed), and the
//!    walk goes on after them. Their bodies are never searched for frames,
//!    so a stored response that holds the bytes of a frame does not come
//!    back as a record when the record around it is damaged (unless its
//!    length field is damaged too);
//! 2. otherwise the walk resynchronises at the first later offset where a
//!    valid frame starts, or where a frame starts that rule 1 delimits; the
//!    bytes in between are garbage (up to the end of the file if no such
//!    offset exists).
//!
//! A valid frame needs a matching CRC-32 over the length it claims and
//! fields that decode exactly to that length, so random bytes pass with
//! probability below 2^-32 per offset: garbage does not make up records.
//! Like [`valid_frame_after`](super::reader), the search takes time linear
//! in the bytes it passes: an offset is first checked for everything but
//! its CRC, and CRCs come from one [`RangeCrc`] of the whole file.

use super::crc::RangeCrc;
use super::record::{FIXED, FRAME_HEADER, HEADER_LEN, frame_header, frame_shape};
use crate::error::CorruptKind;

/// One stretch of a segment's bytes after its header, as the walk found it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Piece {
    /// A whole valid frame: `buf[at..end]`.
    Frame { at: usize, end: usize },
    /// A frame that fails its checks but whose length field delimits it
    /// (rule 1): `buf[at..end]`, one record lost.
    Bad {
        at: usize,
        end: usize,
        kind: CorruptKind,
    },
    /// Bytes no frame accounts for (rule 2): `buf[at..end]`.
    Garbage {
        at: usize,
        end: usize,
        kind: CorruptKind,
    },
}

impl Piece {
    /// The first byte of the piece.
    pub fn at(&self) -> usize {
        match *self {
            Piece::Frame { at, .. } | Piece::Bad { at, .. } | Piece::Garbage { at, .. } => at,
        }
    }

    /// One past the last byte of the piece.
    pub fn end(&self) -> usize {
        match *self {
            Piece::Frame { end, .. } | Piece::Bad { end, .. } | Piece::Garbage { end, .. } => end,
        }
    }
}

/// Frame checks over one segment image, sharing one [`RangeCrc`].
struct Frames<'a> {
    buf: &'a [u8],
    crcs: RangeCrc<'a>,
}

impl Frames<'_> {
    /// Where the valid frame starting at `at` ends, if one does.
    fn valid_at(&mut self, at: usize) -> Option<usize> {
        let (crc, len) = frame_shape(self.buf.get(at..)?)?;
        let start = at.checked_add(FRAME_HEADER)?;
        let end = start.checked_add(len)?;
        (self.crcs.crc(start, end)? == crc).then_some(end)
    }

    /// Where the frame starting at `at` ends, by its length field, if that
    /// claims at least a record's fixed part and fits the buffer.
    fn claimed_end(&self, at: usize) -> Option<usize> {
        let (len, _) = frame_header(self.buf.get(at..)?)?;
        let end = at.checked_add(FRAME_HEADER)?.checked_add(len)?;
        (len >= FIXED && end <= self.buf.len()).then_some(end)
    }

    /// Whether a valid frame starts at `at`, or the buffer ends there.
    fn lands(&mut self, at: usize) -> bool {
        at == self.buf.len() || self.valid_at(at).is_some()
    }

    /// Where the frame starting at `at` ends if its length field lands on
    /// a valid frame or the end of the buffer (rule 1, one frame).
    fn delimited_at(&mut self, at: usize) -> Option<usize> {
        let end = self.claimed_end(at)?;
        self.lands(end).then_some(end)
    }

    /// The ends of the frames that length fields chain from `at` until one
    /// lands on a valid frame or the end of the buffer (rule 1), at most
    /// [`MAX_CHAIN`] of them; `None` if the chain breaks first.
    fn delimited_chain(&mut self, mut at: usize) -> Option<Vec<usize>> {
        let mut ends = Vec::new();
        while ends.len() < MAX_CHAIN {
            let end = self.claimed_end(at)?;
            ends.push(end);
            if self.lands(end) {
                return Some(ends);
            }
            at = end;
        }
        None
    }
}

/// The most damaged frames in a row that rule 1 follows from the start of
/// a damage (a bound on the work a crafted file can cause).
const MAX_CHAIN: usize = 1024;

/// Walks the frames of segment image `buf` (after its header), covering
/// every byte from [`HEADER_LEN`] to the end with pieces, in order.
pub(crate) fn walk(buf: &[u8]) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut frames = Frames {
        buf,
        crcs: RangeCrc::new(buf, HEADER_LEN + FRAME_HEADER),
    };
    let mut at = HEADER_LEN;
    while at < buf.len() {
        if let Some(end) = frames.valid_at(at) {
            pieces.push(Piece::Frame { at, end });
            at = end;
            continue;
        }
        // Only the CRC fails if everything else parses.
        let kind = match buf.get(at..).and_then(frame_shape) {
            Some(_) => CorruptKind::Checksum,
            None => CorruptKind::Malformed,
        };
        if let Some(ends) = frames.delimited_chain(at) {
            let mut kind = kind;
            for end in ends {
                pieces.push(Piece::Bad { at, end, kind });
                at = end;
                kind = match buf.get(at..).and_then(frame_shape) {
                    Some(_) => CorruptKind::Checksum,
                    None => CorruptKind::Malformed,
                };
            }
            continue;
        }
        let end = (at + 1..buf.len())
            .find(|&p| frames.valid_at(p).is_some() || frames.delimited_at(p).is_some())
            .unwrap_or(buf.len());
        pieces.push(Piece::Garbage { at, end, kind });
        at = end;
    }
    pieces
}

/// The frames that length fields delimit inside garbage `buf[at..end]`,
/// following them from `at` for as long as each claims at least a record's
/// fixed part and fits: the records a salvage can still count (and try to
/// name) in it. Best effort: the lengths themselves may be damaged.
pub(crate) fn chained(buf: &[u8], mut at: usize, end: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    while let Some((len, _)) = buf.get(at..end).and_then(frame_header) {
        let Some(next) = at.checked_add(FRAME_HEADER + len) else {
            break;
        };
        if len < FIXED || next > end {
            break;
        }
        out.push((at, next));
        at = next;
    }
    out
}

/// The user id and key of the frame `buf[at..end]` if its kind, lengths
/// and ids can still be read, without checking its CRC (the ids may be
/// damaged themselves). `None` for a token reservation (it has no key).
pub(crate) fn ids(buf: &[u8], at: usize, end: usize) -> Option<(&[u8], &[u8])> {
    let content = buf.get(at.checked_add(FRAME_HEADER)?..end)?;
    let kind = *content.first()?;
    if !(1..=4).contains(&kind) {
        return None;
    }
    let lens = content.get(FIXED - 4..FIXED)?;
    let user_len = usize::from(u16::from_le_bytes([*lens.first()?, *lens.get(1)?]));
    let key_len = usize::from(u16::from_le_bytes([*lens.get(2)?, *lens.get(3)?]));
    let user = content.get(FIXED..FIXED + user_len)?;
    let key = content.get(FIXED + user_len..FIXED + user_len + key_len)?;
    (!key.is_empty()).then_some((user, key))
}

#[cfg(test)]
mod tests {
    use super::super::record::{Kind, Record, SegmentHeader, check_frame};
    use super::*;

    fn header() -> Vec<u8> {
        SegmentHeader {
            file: 1,
            order: 1,
            replaces: 0,
            token_floor: 1,
            created_ms: 0,
        }
        .encode()
        .to_vec()
    }

    fn record<'a>(key: &'a [u8], body: &'a [u8]) -> Record<'a> {
        Record {
            kind: Kind::Complete,
            token: 3,
            deadline_ms: 10,
            time_ms: 1,
            lease_ms: 10,
            fingerprint: 7,
            user: b"u",
            key,
            status: 200,
            body,
        }
    }

    /// The header and frames with these keys; returns where each starts.
    fn segment(keys: &[&[u8]]) -> (Vec<u8>, Vec<usize>) {
        let mut buf = header();
        let mut starts = Vec::new();
        for key in keys {
            starts.push(buf.len());
            record(key, b"some body bytes").encode(&mut buf);
        }
        starts.push(buf.len());
        (buf, starts)
    }

    fn frames(pieces: &[Piece]) -> Vec<usize> {
        pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Frame { at, .. } => Some(*at),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_clean_segment_is_all_frames() {
        let (buf, starts) = segment(&[b"a", b"b", b"c"]);
        let pieces = walk(&buf);
        assert_eq!(frames(&pieces), starts[..3]);
        assert_eq!(pieces.len(), 3);
        assert!(walk(&header()).is_empty());
        assert!(walk(&[]).is_empty());
    }

    #[test]
    fn a_flipped_body_bit_is_one_bad_frame_delimited_by_its_length() {
        let (mut buf, starts) = segment(&[b"a", b"b", b"c"]);
        buf[starts[2] - 3] ^= 4;
        let pieces = walk(&buf);
        assert_eq!(
            pieces[1],
            Piece::Bad {
                at: starts[1],
                end: starts[2],
                kind: CorruptKind::Checksum
            }
        );
        assert_eq!(frames(&pieces), [starts[0], starts[2]]);
        assert_eq!(
            ids(&buf, starts[1], starts[2]),
            Some((&b"u"[..], &b"b"[..]))
        );
    }

    #[test]
    fn garbage_resynchronises_on_the_next_valid_frame() {
        let (mut buf, starts) = segment(&[b"a", b"b", b"c", b"d"]);
        // From inside the first frame to inside the third.
        for b in &mut buf[starts[0] + 3..starts[2] + 5] {
            *b = 0xa5;
        }
        let pieces = walk(&buf);
        assert_eq!(frames(&pieces), [starts[3]]);
        assert_eq!(
            pieces[0],
            Piece::Garbage {
                at: starts[0],
                end: starts[3],
                kind: CorruptKind::Malformed
            }
        );
    }

    #[test]
    fn a_cut_frame_at_the_end_is_garbage_to_the_end() {
        let (buf, starts) = segment(&[b"a", b"b"]);
        let cut = &buf[..starts[1] + 20];
        let pieces = walk(cut);
        assert_eq!(frames(&pieces), [starts[0]]);
        assert_eq!(pieces[1].end(), cut.len());
    }

    /// A response body holding a whole valid frame: when the record around
    /// it is damaged, the walk must not keep the frame inside it.
    #[test]
    fn a_frame_inside_a_damaged_record_body_is_never_kept() {
        let mut inner = Vec::new();
        record(b"victim", b"forged").encode(&mut inner);
        let mut buf = header();
        let outer = buf.len();
        record(b"outer", &inner).encode(&mut buf);
        let after = buf.len();
        record(b"next", b"x").encode(&mut buf);
        for flip in [outer + 4, outer + 9, outer + 20, after - 1] {
            let mut bad = buf.clone();
            bad[flip] ^= 1;
            let pieces = walk(&bad);
            assert_eq!(frames(&pieces), [after], "flip at {flip}");
        }
        // The record after it damaged too: the lengths still chain to the
        // end of the file.
        let mut bad = buf.clone();
        bad[outer + 20] ^= 1;
        let end = bad.len();
        bad[end - 1] ^= 1;
        assert!(frames(&walk(&bad)).is_empty());
    }

    #[test]
    fn chained_lengths_count_records_inside_garbage() {
        let (mut buf, starts) = segment(&[b"a", b"b", b"c"]);
        // Zero the second frame's length: the first is delimited by its
        // own length, the second is garbage up to the third.
        buf[starts[0] + 9] ^= 1;
        for b in &mut buf[starts[1]..starts[1] + 4] {
            *b = 0;
        }
        let pieces = walk(&buf);
        assert!(matches!(pieces[0], Piece::Garbage { .. }), "{pieces:?}");
        assert_eq!(
            chained(&buf, starts[0], pieces[0].end()),
            [(starts[0], starts[1])]
        );
        assert!(check_frame(&buf[starts[2]..]).is_ok());
        assert_eq!(frames(&pieces), [starts[2]]);
    }

    #[test]
    fn random_bytes_walk_without_panicking_and_cover_every_byte() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for len in 0..400 {
            let mut buf = header();
            buf.extend((0..len).map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            }));
            let pieces = walk(&buf);
            let mut at = HEADER_LEN;
            for p in &pieces {
                assert_eq!(p.at(), at);
                assert!(p.end() > at);
                at = p.end();
            }
            assert_eq!(at, buf.len().max(HEADER_LEN));
            assert!(frames(&pieces).is_empty());
        }
    }
}
