//! Walking a damaged segment for a salvage: which bytes are whole valid
//! frames, which are damaged frames whose own fields still delimit them,
//! and which are garbage that no frame accounts for.
//!
//! # The resynchronisation rule
//! The walk starts after the 56-byte header and goes frame by frame, from
//! one frame boundary to the next. A frame that passes every check of
//! [`check_frame`](super::record::check_frame) (length, CRC, fields) is
//! kept. At a frame that fails:
//! 1. if everything but its CRC checks out (its length field and the
//!    lengths of its user, key and body agree, its kind is one), the
//!    damage is that frame alone, as its length says, and the walk goes on
//!    after it. Its body is not searched for frames: a stored response
//!    that holds the bytes of a frame does not come back as a record when
//!    damage to the record around it leaves its lengths intact;
//! 2. otherwise the walk resynchronises at the first later offset where a
//!    whole valid frame starts; the bytes in between are garbage (up to the
//!    end of the file if no valid frame follows).
//!
//! Rule 2 never skips a valid frame, and rule 1 trusts a length only when
//! two independent lengths agree, so a kept record is never lost to a
//! guessed boundary. The one case the rules cannot tell apart: damage that
//! destroys a record's lengths while leaving a whole frame inside its body
//! (a response that stores the bytes of a record) lets rule 2 take that
//! inner frame for a record.
//!
//! A valid frame needs a matching CRC-32 over the length it claims and
//! fields that decode exactly to that length, so random bytes pass with
//! probability below 2^-32 per offset: garbage does not make up records.
//! Like the torn-tail check (`reader.rs`), the search takes time linear in
//! the bytes it passes: an offset is first checked for everything but its
//! CRC, and CRCs come from one [`RangeCrc`] of the whole file.

use super::crc::RangeCrc;
use super::record::{FIXED, FRAME_HEADER, HEADER_LEN, Kind, decode, frame_header, frame_shape};
use crate::error::CorruptKind;

/// One stretch of a segment's bytes after its header, as the walk found it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Piece {
    /// A whole valid frame: `buf[at..end]`.
    Frame { at: usize, end: usize },
    /// A frame whose CRC fails but whose fields delimit it (rule 1):
    /// `buf[at..end]`, one record lost.
    Bad { at: usize, end: usize },
    /// Bytes no frame accounts for (rule 2): `buf[at..end]`.
    Garbage { at: usize, end: usize },
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

    /// What was wrong with the piece's first bytes (`None` for a frame).
    pub fn kind(&self) -> Option<CorruptKind> {
        match self {
            Piece::Frame { .. } => None,
            Piece::Bad { .. } => Some(CorruptKind::Checksum),
            Piece::Garbage { .. } => Some(CorruptKind::Malformed),
        }
    }
}

/// The type byte of a token reservation, which has no key.
const RESERVE: u8 = Kind::Reserve as u8;

/// Where the valid frame starting at `at` ends, if one does.
fn valid_at(buf: &[u8], crcs: &mut RangeCrc<'_>, at: usize) -> Option<usize> {
    let (crc, len) = frame_shape(buf.get(at..)?)?;
    let start = at.checked_add(FRAME_HEADER)?;
    let end = start.checked_add(len)?;
    (crcs.crc(start, end)? == crc).then_some(end)
}

/// Walks the frames of segment image `buf` (after its header), covering
/// every byte from [`HEADER_LEN`] to the end with pieces, in order.
pub(crate) fn walk(buf: &[u8]) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut crcs = RangeCrc::new(buf, HEADER_LEN + FRAME_HEADER);
    let mut at = HEADER_LEN;
    while at < buf.len() {
        if let Some(end) = valid_at(buf, &mut crcs, at) {
            pieces.push(Piece::Frame { at, end });
            at = end;
        } else if let Some((_, len)) = buf.get(at..).and_then(frame_shape) {
            let end = at + FRAME_HEADER + len;
            pieces.push(Piece::Bad { at, end });
            at = end;
        } else {
            let end = (at + 1..buf.len())
                .find(|&p| valid_at(buf, &mut crcs, p).is_some())
                .unwrap_or(buf.len());
            pieces.push(Piece::Garbage { at, end });
            at = end;
        }
    }
    pieces
}

/// Where the frame at `at` ends by the lengths in its fields (user, key,
/// and a complete record's body), whatever its length field says, if its
/// kind byte is one.
fn fields_end(buf: &[u8], at: usize) -> Option<usize> {
    let content = buf.get(at.checked_add(FRAME_HEADER)?..)?;
    let u16_at = |i: usize| {
        let b = content.get(i..i + 2)?;
        Some(usize::from(u16::from_le_bytes(b.try_into().ok()?)))
    };
    let ids = FIXED + u16_at(FIXED - 4)? + u16_at(FIXED - 2)?;
    let len = match *content.first()? {
        1 | 3 | 4 | 5 => ids,
        2 => {
            let body = content.get(ids + 2..ids + 6)?;
            ids + 6 + usize::try_from(u32::from_le_bytes(body.try_into().ok()?)).ok()?
        }
        _ => return None,
    };
    at.checked_add(FRAME_HEADER)?.checked_add(len)
}

/// The frames that lengths delimit inside garbage `buf[at..end]`, followed
/// from `at` for as long as one fits: by its length field, else by the
/// lengths of its fields. The records a salvage can still count (and try
/// to name) in it; best effort, since the lengths may be damaged too.
pub(crate) fn chained(buf: &[u8], mut at: usize, end: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    while at < end {
        let fits = |e: &usize| *e >= at + FRAME_HEADER + FIXED && *e <= end;
        let by_length = buf
            .get(at..end)
            .and_then(frame_header)
            .and_then(|(len, _)| at.checked_add(FRAME_HEADER + len));
        let next = by_length
            .filter(fits)
            .or_else(|| fields_end(buf, at).filter(fits));
        let Some(next) = next else {
            break;
        };
        out.push((at, next));
        at = next;
    }
    out
}

/// The user id and key of the frame `buf[at..end]`: for a valid frame,
/// as it decodes; for a damaged one, if its lengths and ids can still be
/// read where every kind of record has them, without checking its CRC (the
/// ids may be damaged themselves). `None` for a token reservation (it has
/// no key).
pub(crate) fn ids(buf: &[u8], at: usize, end: usize) -> Option<(&[u8], &[u8])> {
    let content = buf.get(at.checked_add(FRAME_HEADER)?..end)?;
    if let Ok(record) = decode(content) {
        return (record.kind != Kind::Reserve).then_some((record.user, record.key));
    }
    if matches!(*content.first()?, 0 | RESERVE) {
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
            seal: None,
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

    /// A response body holding a whole valid frame, and the frames around.
    fn nested() -> (Vec<u8>, usize, usize) {
        let mut inner = Vec::new();
        record(b"victim", b"forged").encode(&mut inner);
        let mut buf = header();
        let outer = buf.len();
        record(b"outer", &inner).encode(&mut buf);
        let after = buf.len();
        record(b"next", b"x").encode(&mut buf);
        (buf, outer, after)
    }

    /// When the record around it is damaged but its lengths are not, the
    /// walk must not keep the frame inside it.
    #[test]
    fn a_frame_inside_a_damaged_record_body_is_never_kept() {
        let (buf, outer, after) = nested();
        // The CRC, the token, the fingerprint, a byte of the inner frame,
        // the body's last byte.
        for flip in [outer + 4, outer + 9, outer + 50, outer + 100, after - 1] {
            let mut bad = buf.clone();
            bad[flip] ^= 1;
            let pieces = walk(&bad);
            assert_eq!(frames(&pieces), [after], "flip at {flip}");
            assert_eq!(
                pieces[0],
                Piece::Bad {
                    at: outer,
                    end: after
                }
            );
        }
        // The record after it damaged too.
        let mut bad = buf.clone();
        bad[outer + 20] ^= 1;
        let end = bad.len();
        bad[end - 1] ^= 1;
        assert!(frames(&walk(&bad)).is_empty());
    }

    /// The limit of the rules, pinned: damage to the length field of the
    /// record around a frame leaves nothing to delimit it by, and the
    /// search takes the inner frame for a record (module docs).
    #[test]
    fn a_frame_inside_a_record_whose_length_is_destroyed_is_taken_for_a_record() {
        let (buf, outer, after) = nested();
        let mut bad = buf.clone();
        bad[outer] ^= 1;
        let inner = frames(&walk(&bad));
        assert_eq!(inner.len(), 2);
        assert!(inner[0] > outer && inner[0] < after && inner[1] == after);
    }

    #[test]
    fn a_record_whose_length_field_is_lost_is_garbage_counted_by_its_fields() {
        let (mut buf, starts) = segment(&[b"a", b"b", b"c"]);
        for b in &mut buf[starts[1]..starts[1] + 4] {
            *b = 0;
        }
        let pieces = walk(&buf);
        assert_eq!(
            pieces[1],
            Piece::Garbage {
                at: starts[1],
                end: starts[2],
            }
        );
        assert_eq!(frames(&pieces), [starts[0], starts[2]]);
        assert_eq!(
            chained(&buf, starts[1], starts[2]),
            [(starts[1], starts[2])]
        );
        assert_eq!(
            ids(&buf, starts[1], starts[2]),
            Some((&b"u"[..], &b"b"[..]))
        );
    }

    #[test]
    fn zeroed_frames_inside_garbage_are_not_counted() {
        let (mut buf, starts) = segment(&[b"a", b"b", b"c"]);
        for b in &mut buf[starts[1]..starts[2]] {
            *b = 0;
        }
        let pieces = walk(&buf);
        assert_eq!(
            pieces[1],
            Piece::Garbage {
                at: starts[1],
                end: starts[2]
            }
        );
        assert!(chained(&buf, starts[1], starts[2]).is_empty());
        assert!(check_frame(&buf[starts[2]..]).is_ok());
        assert_eq!(frames(&pieces), [starts[0], starts[2]]);
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
