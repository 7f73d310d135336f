//! Reading segments back: the scan that recovery runs, and the rule that
//! tells a torn tail from corruption.
//!
//! The rule: bad bytes after which no valid frame follows (garbage, zeros, a
//! half record) are a torn tail, which was never acknowledged and is cut off.
//! A bad frame followed by a valid one is corruption, reported with its offset.
//! Telling them apart is linear in the bytes after the bad frame (see
//! [`valid_frame_after`]), however many later offsets look like frames.

use super::crc::RangeCrc;
use super::record::{FRAME_HEADER, HEADER_LEN, Record, SegmentHeader, check_frame, frame_shape};
use crate::error::CorruptKind;

/// How a segment's bytes ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tail {
    /// Every byte belongs to a valid frame.
    Clean,
    /// The bytes from `at` on are a torn tail (no valid frame follows).
    Torn { at: usize },
    /// The header itself is missing or torn, and nothing valid follows: the
    /// file holds no record.
    TornHeader,
}

/// What a scan found wrong: the offset and kind of the first bad bytes.
pub(crate) type Damage = (usize, CorruptKind);

/// Scans one segment image, calling `apply(record, offset)` for every valid
/// frame in order, and reports how the bytes end. `expected_id` is the id in
/// the file's name.
pub(crate) fn scan_segment<'a>(
    buf: &'a [u8],
    expected_id: u64,
    apply: impl FnMut(Record<'a>, u64),
) -> Result<(SegmentHeader, Tail), Damage> {
    let header = match SegmentHeader::decode(buf) {
        Ok(h) if h.file == expected_id => h,
        Ok(_) => return Err((0, CorruptKind::BadHeader)),
        Err(kind) => {
            return if valid_frame_after(buf, 0) {
                Err((0, kind))
            } else {
                Ok((
                    SegmentHeader {
                        file: expected_id,
                        order: expected_id,
                        replaces: 0,
                        token_floor: 0,
                        created_ms: 0,
                    },
                    Tail::TornHeader,
                ))
            };
        }
    };
    match apply_frames(buf, apply) {
        None => Ok((header, Tail::Clean)),
        Some((at, kind)) => {
            if valid_frame_after(buf, at) {
                Err((at, kind))
            } else {
                Ok((header, Tail::Torn { at }))
            }
        }
    }
}

/// Calls `apply(record, offset)` for exactly the frames [`scan_segment`]
/// would, without deciding how the bytes end: for a replay lane, whose
/// segment another scan of the same bytes classifies.
pub(crate) fn replay_segment<'a>(
    buf: &'a [u8],
    expected_id: u64,
    apply: impl FnMut(Record<'a>, u64),
) {
    if matches!(SegmentHeader::decode(buf), Ok(h) if h.file == expected_id) {
        let _ = apply_frames(buf, apply);
    }
}

/// Calls `apply(record, offset)` for every valid frame after the header,
/// in order, up to the first bad one: returns its offset and kind, or
/// `None` if every byte belongs to a valid frame.
fn apply_frames<'a>(buf: &'a [u8], mut apply: impl FnMut(Record<'a>, u64)) -> Option<Damage> {
    let mut at = HEADER_LEN;
    while at < buf.len() {
        let rest = buf.get(at..).unwrap_or_default();
        match check_frame(rest) {
            Ok((record, used)) => {
                apply(record, at as u64);
                at += used;
            }
            Err(kind) => return Some((at, kind)),
        }
    }
    None
}

/// Whether any valid frame starts after offset `from`: whether
/// [`check_frame`] accepts the bytes at some later offset.
///
/// A random 4-byte CRC matches by chance with probability 2^-32 per offset,
/// and the frame must also decode, so garbage is not mistaken for a record.
///
/// Linear in `buf.len() - from`: calling `check_frame` at every offset
/// would hash the length each offset claims, quadratic in all. Instead an
/// offset is first checked for everything but its CRC ([`frame_shape`],
/// O(1)); the CRC of an offset that passes comes from prefix CRCs
/// ([`RangeCrc`], built on the first such offset), which hash each byte up
/// to the farthest end claimed once, plus under `2 * STEP` bytes per offset.
fn valid_frame_after(buf: &[u8], from: usize) -> bool {
    let mut crcs: Option<RangeCrc<'_>> = None;
    (from + 1..buf.len()).any(|at| {
        let Some((crc, len)) = buf.get(at..).and_then(frame_shape) else {
            return false;
        };
        let start = at + FRAME_HEADER;
        // Every later candidate's content starts after this one's.
        let crcs = crcs.get_or_insert_with(|| RangeCrc::new(buf, start));
        crcs.crc(start, start + len) == Some(crc)
    })
}

#[cfg(test)]
mod tests {
    use super::super::crc::hashed_bytes;
    use super::super::record::Kind;
    use super::*;
    use proptest::prelude::*;

    fn segment(records: usize) -> (Vec<u8>, Vec<usize>) {
        let mut buf = SegmentHeader {
            file: 1,
            order: 1,
            replaces: 0,
            token_floor: 1,
            created_ms: 0,
        }
        .encode()
        .to_vec();
        let mut starts = Vec::new();
        for i in 0..records {
            starts.push(buf.len());
            Record {
                kind: Kind::Begin,
                token: i as u64,
                deadline_ms: 10,
                time_ms: 0,
                lease_ms: 10,
                fingerprint: 1,
                user: b"u",
                key: b"k",
                status: 0,
                body: b"",
                seal: None,
            }
            .encode(&mut buf);
        }
        (buf, starts)
    }

    fn count(buf: &[u8]) -> Result<(usize, Tail), Damage> {
        let mut n = 0;
        let (_, tail) = scan_segment(buf, 1, |_, _| n += 1)?;
        Ok((n, tail))
    }

    #[test]
    fn clean_segment_yields_every_record() {
        let (buf, _) = segment(5);
        assert_eq!(count(&buf), Ok((5, Tail::Clean)));
    }

    #[test]
    fn half_record_at_the_end_is_a_torn_tail() {
        let (buf, starts) = segment(3);
        let cut = starts[2] + 10;
        assert_eq!(count(&buf[..cut]), Ok((2, Tail::Torn { at: starts[2] })));
    }

    #[test]
    fn zeros_and_garbage_after_the_last_record_are_a_torn_tail() {
        let (mut buf, _) = segment(2);
        let end = buf.len();
        buf.extend_from_slice(&[0u8; 100]);
        assert_eq!(count(&buf), Ok((2, Tail::Torn { at: end })));
        buf.truncate(end);
        buf.extend((0..300u32).map(|i| (i * 7 + 3) as u8));
        assert_eq!(count(&buf), Ok((2, Tail::Torn { at: end })));
    }

    #[test]
    fn a_bad_record_followed_by_a_good_one_is_corruption() {
        let (mut buf, starts) = segment(3);
        buf[starts[1] + 12] ^= 0xff;
        assert_eq!(count(&buf), Err((starts[1], CorruptKind::Checksum)));
    }

    #[test]
    fn a_torn_header_with_nothing_after_it_is_torn() {
        let (buf, _) = segment(0);
        assert_eq!(count(&buf[..13]), Ok((0, Tail::TornHeader)));
        assert_eq!(count(&[]), Ok((0, Tail::TornHeader)));
    }

    #[test]
    fn a_damaged_header_before_records_is_corruption() {
        let (mut buf, _) = segment(2);
        buf[40] ^= 1;
        assert_eq!(count(&buf), Err((0, CorruptKind::BadHeader)));
    }

    /// The rule as first written: try `check_frame` at every later offset.
    fn valid_frame_after_by_brute_force(buf: &[u8], from: usize) -> bool {
        (from + 1..buf.len()).any(|at| check_frame(&buf[at..]).is_ok())
    }

    /// The start of a complete record's frame whose content claims `len`
    /// bytes: it parses (kind, lengths and body length add up), but its CRC
    /// is wrong for any content but a 2^-32 few.
    fn parsing_frame(len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&u32::try_from(len).unwrap().to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.push(Kind::Complete as u8);
        out.extend_from_slice(&[9; 48]);
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&1u16.to_le_bytes());
        out.push(b'k');
        out.extend_from_slice(&200u16.to_le_bytes());
        let fixed = out.len() - 8;
        out.extend_from_slice(&u32::try_from(len - fixed - 4).unwrap().to_le_bytes());
        out
    }

    /// Bytes between the frames that parse in [`torn_tail_of_parsing_frames`].
    const PITCH: usize = 128;

    /// Two records, then a torn tail of `tail` bytes: the start of a record
    /// that claims a 1 MiB body, then, every [`PITCH`] bytes, a frame that
    /// parses and claims every byte up to the end. Returns the bytes and
    /// where the tail starts.
    fn torn_tail_of_parsing_frames(tail: usize) -> (Vec<u8>, usize) {
        let (mut buf, _) = segment(2);
        let at = buf.len();
        let end = at + tail;
        buf.extend(parsing_frame(1 << 20));
        loop {
            buf.resize(buf.len().next_multiple_of(PITCH), 7);
            let here = buf.len();
            if here + PITCH > end {
                break;
            }
            buf.extend(parsing_frame(end - here - FRAME_HEADER));
        }
        buf.resize(end, 7);
        (buf, at)
    }

    /// Issue 11, item 13: telling a torn tail from corruption computed a
    /// CRC over the length that every later offset claimed, so a torn tail
    /// full of frames that parse took time quadratic in its length.
    #[test]
    fn checking_a_torn_tail_is_linear_in_its_length() {
        const TAIL: usize = 256 << 10;
        let (buf, at) = torn_tail_of_parsing_frames(TAIL);
        let parsing = (at + 1..buf.len())
            .filter(|&a| frame_shape(&buf[a..]).is_some())
            .count();
        assert!(parsing >= TAIL / PITCH - 2, "only {parsing} frames parse");
        let before = hashed_bytes();
        assert_eq!(count(&buf), Ok((2, Tail::Torn { at })));
        let hashed = hashed_bytes() - before;
        // The records before the tail once, the tail once, and under two
        // marks' worth (2 * 64 bytes) per frame that parses.
        assert!(
            hashed <= 3 * buf.len() as u64,
            "hashed {hashed} bytes to check a {TAIL}-byte tail"
        );
    }

    #[test]
    fn a_replay_lane_applies_the_records_without_checking_the_tail_again() {
        let (buf, at) = torn_tail_of_parsing_frames(64 << 10);
        let (mut scanned, mut replayed) = (Vec::new(), Vec::new());
        let _ = scan_segment(&buf, 1, |_, offset| scanned.push(offset));
        let before = hashed_bytes();
        replay_segment(&buf, 1, |_, offset| replayed.push(offset));
        // The header and the two records before the tail, nothing of it.
        assert!(hashed_bytes() - before < at as u64);
        assert_eq!(replayed, scanned);
        assert_eq!(replayed.len(), 2);
        let mut nothing = Vec::new();
        replay_segment(&buf, 2, |_, offset| nothing.push(offset));
        replay_segment(&buf[..13], 1, |_, offset| nothing.push(offset));
        assert!(nothing.is_empty());
    }

    #[test]
    fn a_valid_frame_anywhere_after_the_damage_is_corruption() {
        let (torn, at) = torn_tail_of_parsing_frames(2048);
        let mut valid = Vec::new();
        Record {
            kind: Kind::Complete,
            token: 99,
            deadline_ms: 10,
            time_ms: 0,
            lease_ms: 10,
            fingerprint: 3,
            user: b"u",
            key: b"k",
            status: 200,
            body: b"a body",
            seal: None,
        }
        .encode(&mut valid);
        // From just after the damage to the very last bytes, inside the
        // range the damaged frame claims and over frames that parse.
        let last = torn.len() - valid.len();
        for start in (at + 1..=last).step_by(7).chain([last]) {
            let mut buf = torn.clone();
            buf[start..start + valid.len()].copy_from_slice(&valid);
            assert!(valid_frame_after_by_brute_force(&buf, at));
            assert_eq!(
                count(&buf),
                Err((at, CorruptKind::Malformed)),
                "valid frame at {start}"
            );
        }
    }

    #[test]
    fn a_bad_record_with_a_valid_frame_in_its_body_is_corruption() {
        let (mut buf, starts) = segment(1);
        let mut inner = Vec::new();
        Record {
            kind: Kind::Begin,
            token: 5,
            deadline_ms: 10,
            time_ms: 0,
            lease_ms: 10,
            fingerprint: 1,
            user: b"u",
            key: b"k",
            status: 0,
            body: b"",
            seal: None,
        }
        .encode(&mut inner);
        let at = buf.len();
        Record {
            kind: Kind::Complete,
            token: 6,
            deadline_ms: 10,
            time_ms: 0,
            lease_ms: 10,
            fingerprint: 1,
            user: b"u",
            key: b"k",
            status: 200,
            body: &inner,
            seal: None,
        }
        .encode(&mut buf);
        assert_eq!(count(&buf), Ok((2, Tail::Clean)));
        // The outer record's token: its CRC fails; the inner frame, which
        // ends the file, is intact.
        buf[at + 9] ^= 1;
        assert_eq!(count(&buf), Err((at, CorruptKind::Checksum)));
        assert!(starts[0] < at);
    }

    /// Pieces a segment's bytes are built from in the property below.
    #[derive(Clone, Debug)]
    enum Piece {
        Record(u16),
        Parsing(u16),
        Bytes(Vec<u8>),
    }

    fn piece() -> impl Strategy<Value = Piece> {
        prop_oneof![
            1 => (0..40u16).prop_map(Piece::Record),
            3 => (62..600u16).prop_map(Piece::Parsing),
            2 => proptest::collection::vec(any::<u8>(), 0..40).prop_map(Piece::Bytes),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        /// The linear check decides as trying every offset does, on bytes
        /// made of records, frames that parse but fail their CRC, and
        /// garbage, with a few bytes changed.
        #[test]
        fn the_torn_tail_check_decides_as_trying_every_offset(
            pieces in proptest::collection::vec(piece(), 0..16),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
            from in any::<prop::sample::Index>(),
        ) {
            let (mut buf, _) = segment(1);
            for p in pieces {
                match p {
                    Piece::Record(n) => Record {
                        kind: Kind::Complete,
                        token: 1,
                        deadline_ms: 10,
                        time_ms: 0,
                        lease_ms: 10,
                        fingerprint: 1,
                        user: b"u",
                        key: b"k",
                        status: 200,
                        body: &vec![b'b'; usize::from(n)],
                        seal: None,
                    }
                    .encode(&mut buf),
                    Piece::Parsing(len) => buf.extend(parsing_frame(usize::from(len))),
                    Piece::Bytes(b) => buf.extend(b),
                }
            }
            for (at, byte) in edits {
                let at = at.index(buf.len());
                buf[at] = byte;
            }
            let from = from.index(buf.len());
            prop_assert_eq!(
                valid_frame_after(&buf, from),
                valid_frame_after_by_brute_force(&buf, from)
            );
            let (mut scanned, mut replayed) = (Vec::new(), Vec::new());
            let _ = scan_segment(&buf, 1, |_, at| scanned.push(at));
            replay_segment(&buf, 1, |_, at| replayed.push(at));
            prop_assert_eq!(scanned, replayed);
        }
    }
}
