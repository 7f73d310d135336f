//! Reading segments back: the scan that recovery runs, and the rule that
//! tells a torn tail from corruption.
//!
//! The rule: bad bytes after which no valid frame follows (garbage, zeros, a
//! half record) are a torn tail, which was never acknowledged and is cut off.
//! A bad frame followed by a valid one is corruption, reported with its offset.

use super::record::{HEADER_LEN, Record, SegmentHeader, check_frame};
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
    mut apply: impl FnMut(Record<'a>, u64),
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
    let mut at = HEADER_LEN;
    while at < buf.len() {
        let rest = buf.get(at..).unwrap_or_default();
        match check_frame(rest) {
            Ok((record, used)) => {
                apply(record, at as u64);
                at += used;
            }
            Err(kind) => {
                return if valid_frame_after(buf, at) {
                    Err((at, kind))
                } else {
                    Ok((header, Tail::Torn { at }))
                };
            }
        }
    }
    Ok((header, Tail::Clean))
}

/// Whether any valid frame starts after offset `from`.
///
/// A random 4-byte CRC matches by chance with probability 2^-32 per offset,
/// and the frame must also decode, so garbage is not mistaken for a record.
fn valid_frame_after(buf: &[u8], from: usize) -> bool {
    (from + 1..buf.len()).any(|at| check_frame(buf.get(at..).unwrap_or_default()).is_ok())
}

#[cfg(test)]
mod tests {
    use super::super::record::Kind;
    use super::*;

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
}
