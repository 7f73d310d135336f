//! The byte layout of log records and segment headers.
//!
//! # Frame
//! Every record is one frame; integers are fixed-width little-endian.
//!
//! | offset | size | field                                             |
//! |-------:|-----:|---------------------------------------------------|
//! | 0      | 4    | `len`: bytes that follow the 8-byte frame header  |
//! | 4      | 4    | `crc`: CRC-32 (IEEE) of those bytes               |
//! | 8      | 1    | `type`: 1 begin, 2 complete, 3 release, 4 extend, |
//! |        |      | 5 token reservation, 6 sealed complete            |
//! | 9      | 8    | `token`: the fencing token of the lease            |
//! | 17     | 8    | `deadline_ms`: lease deadline, or record expiry   |
//! | 25     | 8    | `time_ms`: the engine clock when it was written   |
//! | 33     | 8    | `lease_ms`: the deadline of the lease the record  |
//! |        |      | belongs to, as of this record                     |
//! | 41     | 16   | `fingerprint`: the request's 128-bit digest       |
//! | 57     | 2    | `user_len`                                         |
//! | 59     | 2    | `key_len`                                          |
//! | 61     | …    | `user`, then `key`                                 |
//!
//! A complete record continues with `status: u16`, `body_len: u32` and the
//! body. A **sealed** complete record (type 6, written with
//! `Options::encryption`) continues with `status: u16`, `key_id: u32`,
//! `nonce: [u8; 24]`, `body_len: u32` and the sealed body: the
//! XChaCha20-Poly1305 ciphertext of the body, then its 16-byte tag
//! (`body_len` counts both, so it is at least 16). Its associated data is
//! every byte of the content before the sealed body (type through
//! `body_len`). See `seal.rs`. `len` must equal the bytes the fields take,
//! exactly. The key is
//! non-empty, except in a token reservation, whose user and key are empty
//! and whose `token` is the highest token it reserves (every token handed
//! out before the next reservation is at most that).
//!
//! # Segment header (56 bytes)
//! `magic: [u8; 8] = "IDEMKVLG"`, `version: u32 = 1`, `crc: u32` (of bytes
//! 16..56), `file: u64` (the number in the file name), `order: u64` (the
//! replay position: segments replay in `order`), `replaces: u64` (for a
//! compaction output, the file number it replaces; 0 otherwise),
//! `token_floor: u64` (every token issued before this segment was created is
//! below it), `created_ms: u64`.

use super::crc;
use crate::error::CorruptKind;

/// Bytes of the frame header (`len`, `crc`).
pub(crate) const FRAME_HEADER: usize = 8;
/// Bytes of the fixed part of a record (type through `key_len`).
pub(crate) const FIXED: usize = 1 + 8 + 8 + 8 + 8 + 16 + 2 + 2;
/// Bytes of a segment header.
pub(crate) const HEADER_LEN: usize = 56;
/// The segment magic.
const MAGIC: &[u8; 8] = b"IDEMKVLG";
/// The format version this build writes and reads.
pub(crate) const VERSION: u32 = 1;
/// The type byte of a complete record whose body is sealed: it decodes to
/// [`Kind::Complete`] with a [`Seal`]. A build from before it rejects the
/// record as malformed rather than misreading it.
const SEALED_COMPLETE: u8 = 6;
/// Bytes of an AEAD nonce (XChaCha20-Poly1305: 192 bits).
pub(crate) const NONCE_LEN: usize = 24;
/// Bytes of the AEAD tag that ends a sealed body.
pub(crate) const TAG_LEN: usize = 16;
/// Bytes a sealed complete record has beyond its plaintext form: key id,
/// nonce and tag.
pub(crate) const SEAL_OVERHEAD: usize = 4 + NONCE_LEN + TAG_LEN;

/// How the body of a sealed complete record was sealed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Seal {
    /// The id of the key it was sealed under (`EncryptionKeys`).
    pub key_id: u32,
    /// The nonce, fresh for every record.
    pub nonce: [u8; NONCE_LEN],
}

/// What a record does to its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Kind {
    /// A lease was granted (`Started`).
    Begin = 1,
    /// The lease's owner stored an outcome.
    Complete = 2,
    /// The lease's owner gave the key up.
    Release = 3,
    /// The lease's owner moved its deadline.
    Extend = 4,
    /// Fencing tokens up to `token` were reserved (synced before any of
    /// them is handed out), so that a token handed out before a crash is
    /// never handed out again, in every durability mode. Belongs to no key.
    Reserve = 5,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::Begin),
            2 => Some(Kind::Complete),
            3 => Some(Kind::Release),
            4 => Some(Kind::Extend),
            5 => Some(Kind::Reserve),
            _ => None,
        }
    }
}

/// One decoded record, borrowing its variable-length fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Record<'a> {
    pub kind: Kind,
    pub token: u64,
    pub deadline_ms: u64,
    /// The engine clock when the record was written; recovery decides with
    /// it as the live call did.
    pub time_ms: u64,
    /// A deadline of the lease this record belongs to, at least as late as
    /// the deadline the record replaced: for a begin, `deadline_ms`; for an
    /// extend, the later of the old and new deadlines; for a complete or
    /// release, the deadline the lease had when it ended. Compaction keeps a
    /// record that is not current while this is ahead, so no older record
    /// of the lease can look live again.
    pub lease_ms: u64,
    pub fingerprint: u128,
    pub user: &'a [u8],
    pub key: &'a [u8],
    /// Only for `Complete`; zero otherwise.
    pub status: u16,
    /// Only for `Complete`; empty otherwise. For a sealed record, the
    /// sealed body (ciphertext, then tag).
    pub body: &'a [u8],
    /// Only for `Complete`: `Some` if `body` is sealed (type 6 on disk).
    pub seal: Option<Seal>,
}

impl Record<'_> {
    /// Appends the whole frame to `out`. The caller has checked the lengths
    /// (user and key fit in `u16`, body in `u32`).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; FRAME_HEADER]);
        self.encode_fields(out, self.body.len());
        if self.kind == Kind::Complete {
            out.extend_from_slice(self.body);
        }
        let content = out.get(start + FRAME_HEADER..).unwrap_or_default();
        let len = u32::try_from(content.len()).unwrap_or(u32::MAX);
        let crc = crc::hash(content);
        let mut header = [0u8; FRAME_HEADER];
        let (len_bytes, crc_bytes) = header.split_at_mut(4);
        len_bytes.copy_from_slice(&len.to_le_bytes());
        crc_bytes.copy_from_slice(&crc.to_le_bytes());
        if let Some(slot) = out.get_mut(start..start + FRAME_HEADER) {
            slot.copy_from_slice(&header);
        }
    }

    /// Appends the frame's content up to the body: every field, and for a
    /// complete record its status, seal and `body_len` (given, so that a
    /// body about to be sealed can be counted with its tag). For a sealed
    /// record these are the bytes its AEAD authenticates as associated data.
    pub fn encode_fields(&self, out: &mut Vec<u8>, body_len: usize) {
        let seal = self.seal.filter(|_| self.kind == Kind::Complete);
        out.push(if seal.is_some() {
            SEALED_COMPLETE
        } else {
            self.kind as u8
        });
        out.extend_from_slice(&self.token.to_le_bytes());
        out.extend_from_slice(&self.deadline_ms.to_le_bytes());
        out.extend_from_slice(&self.time_ms.to_le_bytes());
        out.extend_from_slice(&self.lease_ms.to_le_bytes());
        out.extend_from_slice(&self.fingerprint.to_le_bytes());
        out.extend_from_slice(&len16(self.user).to_le_bytes());
        out.extend_from_slice(&len16(self.key).to_le_bytes());
        out.extend_from_slice(self.user);
        out.extend_from_slice(self.key);
        if self.kind == Kind::Complete {
            out.extend_from_slice(&self.status.to_le_bytes());
            if let Some(seal) = seal {
                out.extend_from_slice(&seal.key_id.to_le_bytes());
                out.extend_from_slice(&seal.nonce);
            }
            let body_len = u32::try_from(body_len).unwrap_or(u32::MAX);
            out.extend_from_slice(&body_len.to_le_bytes());
        }
    }

    /// The size of the encoded frame.
    pub fn encoded_len(&self) -> usize {
        let body = match (self.kind, self.seal) {
            (Kind::Complete, None) => 6 + self.body.len(),
            (Kind::Complete, Some(_)) => 6 + 4 + NONCE_LEN + self.body.len(),
            _ => 0,
        };
        FRAME_HEADER + FIXED + self.user.len() + self.key.len() + body
    }
}

fn len16(b: &[u8]) -> u16 {
    u16::try_from(b.len()).unwrap_or(u16::MAX)
}

/// A little-endian cursor over untrusted bytes; every read is checked.
struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.buf.split_at_checked(n)?;
        self.buf = rest;
        Some(head)
    }
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.array()?))
    }
    fn u128(&mut self) -> Option<u128> {
        Some(u128::from_le_bytes(self.array()?))
    }
}

/// Reads a frame header: `(len, crc)` of the content that follows.
pub(crate) fn frame_header(buf: &[u8]) -> Option<(usize, u32)> {
    let mut c = Cursor { buf };
    let len = usize::try_from(c.u32()?).ok()?;
    Some((len, c.u32()?))
}

/// Decodes a frame's content (after the frame header), already checksummed.
pub(crate) fn decode(content: &[u8]) -> Result<Record<'_>, CorruptKind> {
    decode_inner(content).ok_or(CorruptKind::Malformed)
}

fn decode_inner(content: &[u8]) -> Option<Record<'_>> {
    let mut c = Cursor { buf: content };
    let (kind, sealed) = match c.u8()? {
        SEALED_COMPLETE => (Kind::Complete, true),
        b => (Kind::from_u8(b)?, false),
    };
    let token = c.u64()?;
    let deadline_ms = c.u64()?;
    let time_ms = c.u64()?;
    let lease_ms = c.u64()?;
    let fingerprint = c.u128()?;
    let user_len = usize::from(c.u16()?);
    let key_len = usize::from(c.u16()?);
    let user = c.take(user_len)?;
    let key = c.take(key_len)?;
    let (status, seal, body) = if kind == Kind::Complete {
        let status = c.u16()?;
        let seal = if sealed {
            Some(Seal {
                key_id: c.u32()?,
                nonce: c.array()?,
            })
        } else {
            None
        };
        let body_len = usize::try_from(c.u32()?).ok()?;
        if sealed && body_len < TAG_LEN {
            return None;
        }
        (status, seal, c.take(body_len)?)
    } else {
        (0, None, &[][..])
    };
    if !c.buf.is_empty()
        || (key.is_empty() != (kind == Kind::Reserve))
        || (kind == Kind::Reserve && !user.is_empty())
    {
        return None;
    }
    Some(Record {
        kind,
        token,
        deadline_ms,
        time_ms,
        lease_ms,
        fingerprint,
        user,
        key,
        status,
        body,
        seal,
    })
}

/// The stored CRC and the content of a frame at the start of `buf`, if its
/// length is at least a record's fixed part and its content is all there.
fn frame_parts(buf: &[u8]) -> Option<(u32, &[u8])> {
    let (len, crc) = frame_header(buf)?;
    if len < FIXED {
        return None;
    }
    let content = buf.get(FRAME_HEADER..)?.get(..len)?;
    Some((crc, content))
}

/// Checks a frame at the start of `buf`: returns its decoded record and its
/// total length, or why it is bad.
pub(crate) fn check_frame(buf: &[u8]) -> Result<(Record<'_>, usize), CorruptKind> {
    let (crc, content) = frame_parts(buf).ok_or(CorruptKind::Malformed)?;
    if crc::hash(content) != crc {
        return Err(CorruptKind::Checksum);
    }
    Ok((decode(content)?, FRAME_HEADER + content.len()))
}

/// Every check of [`check_frame`] but the CRC, in O(1) (the content's
/// fields are parsed, its bytes not hashed): the stored CRC and the
/// content's length, if the length fits `buf` and the content decodes.
/// [`check_frame`] accepts the frame exactly when this is `Some((crc, len))`
/// and the CRC-32 of `buf[FRAME_HEADER..FRAME_HEADER + len]` is `crc`.
pub(crate) fn frame_shape(buf: &[u8]) -> Option<(u32, usize)> {
    let (crc, content) = frame_parts(buf)?;
    decode_inner(content)?;
    Some((crc, content.len()))
}

/// The fields of a segment header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SegmentHeader {
    /// The file number (in the name, and in every log position).
    pub file: u64,
    /// Where the segment replays: segments replay in ascending `order`.
    pub order: u64,
    /// For a compaction output, the file it replaces; 0 otherwise.
    pub replaces: u64,
    pub token_floor: u64,
    pub created_ms: u64,
}

/// Bytes of the header covered by its CRC.
const HEADER_BODY: usize = HEADER_LEN - 16;

impl SegmentHeader {
    /// The header bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut body = Vec::with_capacity(HEADER_BODY);
        for field in [
            self.file,
            self.order,
            self.replaces,
            self.token_floor,
            self.created_ms,
        ] {
            body.extend_from_slice(&field.to_le_bytes());
        }
        let mut head = Vec::with_capacity(HEADER_LEN);
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&VERSION.to_le_bytes());
        head.extend_from_slice(&crc::hash(&body).to_le_bytes());
        head.extend_from_slice(&body);
        let mut out = [0u8; HEADER_LEN];
        out.copy_from_slice(&head);
        out
    }

    /// Parses the fields of a header (bytes 16..56) if they pass the CRC
    /// stored at 12..16, whatever the magic and version bytes hold: what a
    /// salvage can still trust of a header whose first 12 bytes are damaged.
    pub fn decode_fields(buf: &[u8]) -> Option<SegmentHeader> {
        let mut c = Cursor {
            buf: buf.get(MAGIC.len() + 4..)?,
        };
        let crc = c.u32()?;
        let body = c.take(HEADER_BODY)?;
        if crc::hash(body) != crc {
            return None;
        }
        let mut b = Cursor { buf: body };
        Some(SegmentHeader {
            file: b.u64()?,
            order: b.u64()?,
            replaces: b.u64()?,
            token_floor: b.u64()?,
            created_ms: b.u64()?,
        })
    }

    /// Whether `buf` starts with the segment magic.
    pub fn has_magic(buf: &[u8]) -> bool {
        buf.get(..MAGIC.len()) == Some(&MAGIC[..])
    }

    /// Parses a header; `buf` may be longer than the header.
    pub fn decode(buf: &[u8]) -> Result<SegmentHeader, CorruptKind> {
        let mut c = Cursor { buf };
        if c.take(MAGIC.len()) != Some(&MAGIC[..]) {
            return Err(CorruptKind::BadMagic);
        }
        let version = c.u32().ok_or(CorruptKind::BadHeader)?;
        if version != VERSION {
            return Err(CorruptKind::UnsupportedVersion(version));
        }
        let crc = c.u32().ok_or(CorruptKind::BadHeader)?;
        let body = c.take(HEADER_BODY).ok_or(CorruptKind::BadHeader)?;
        if crc::hash(body) != crc {
            return Err(CorruptKind::BadHeader);
        }
        let mut b = Cursor { buf: body };
        let bad = CorruptKind::BadHeader;
        Ok(SegmentHeader {
            file: b.u64().ok_or(bad)?,
            order: b.u64().ok_or(bad)?,
            replaces: b.u64().ok_or(bad)?,
            token_floor: b.u64().ok_or(bad)?,
            created_ms: b.u64().ok_or(bad)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(kind: Kind) -> Record<'static> {
        Record {
            kind,
            token: 7,
            deadline_ms: 1234,
            time_ms: 1000,
            lease_ms: 1500,
            fingerprint: 0xdead_beef_u128 << 64 | 42,
            user: b"user-1",
            key: b"key-1",
            status: if kind == Kind::Complete { 201 } else { 0 },
            body: if kind == Kind::Complete {
                b"hello"
            } else {
                b""
            },
            seal: None,
        }
    }

    #[test]
    fn a_token_reservation_round_trips_and_only_it_has_an_empty_key() {
        let rec = Record {
            user: b"",
            key: b"",
            ..sample(Kind::Reserve)
        };
        let mut buf = Vec::new();
        rec.encode(&mut buf);
        assert_eq!(check_frame(&buf).unwrap().0, rec);
        for kind in [Kind::Begin, Kind::Complete, Kind::Release, Kind::Extend] {
            let mut buf = Vec::new();
            Record {
                key: b"",
                ..sample(kind)
            }
            .encode(&mut buf);
            assert!(check_frame(&buf).is_err(), "{kind:?} with an empty key");
        }
        let mut buf = Vec::new();
        sample(Kind::Reserve).encode(&mut buf);
        assert!(check_frame(&buf).is_err(), "a reservation with a key");
    }

    #[test]
    fn every_kind_round_trips_through_a_frame() {
        for kind in [Kind::Begin, Kind::Complete, Kind::Release, Kind::Extend] {
            let rec = sample(kind);
            let mut buf = Vec::new();
            rec.encode(&mut buf);
            assert_eq!(buf.len(), rec.encoded_len());
            let (back, used) = check_frame(&buf).unwrap();
            assert_eq!(back, rec);
            assert_eq!(used, buf.len());
        }
    }

    #[test]
    fn a_sealed_complete_round_trips_as_type_6_and_needs_a_whole_tag() {
        let body = [5u8; 40];
        let rec = Record {
            seal: Some(Seal {
                key_id: 9,
                nonce: [7; NONCE_LEN],
            }),
            body: &body,
            ..sample(Kind::Complete)
        };
        let mut buf = Vec::new();
        rec.encode(&mut buf);
        assert_eq!(buf.len(), rec.encoded_len());
        assert_eq!(buf[FRAME_HEADER], SEALED_COMPLETE);
        assert_eq!(check_frame(&buf).unwrap(), (rec, buf.len()));
        // The associated data: every content byte before the sealed body.
        let mut fields = Vec::new();
        rec.encode_fields(&mut fields, body.len());
        assert_eq!(&buf[FRAME_HEADER..buf.len() - body.len()], &fields[..]);
        for i in 0..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x10;
            assert!(check_frame(&bad).is_err(), "flip at {i} accepted");
        }
        for (len, ok) in [(TAG_LEN - 1, false), (TAG_LEN, true)] {
            let mut buf = Vec::new();
            Record {
                body: &body[..len],
                ..rec
            }
            .encode(&mut buf);
            assert_eq!(check_frame(&buf).is_ok(), ok, "sealed body of {len} bytes");
        }
    }

    #[test]
    fn a_flipped_bit_anywhere_is_rejected() {
        let mut buf = Vec::new();
        sample(Kind::Complete).encode(&mut buf);
        for i in 0..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x10;
            assert!(check_frame(&bad).is_err(), "flip at {i} accepted");
        }
    }

    #[test]
    fn every_truncation_is_rejected() {
        let mut buf = Vec::new();
        sample(Kind::Complete).encode(&mut buf);
        for n in 0..buf.len() {
            assert!(check_frame(&buf[..n]).is_err(), "prefix {n} accepted");
        }
    }

    proptest::proptest! {
        /// `frame_shape` and a CRC decide exactly as `check_frame` does, for
        /// frames with any bytes changed, cut short or extended.
        #[test]
        fn the_shape_and_a_crc_accept_exactly_what_check_frame_accepts(
            kind in 0..4usize,
            edits in proptest::collection::vec((0..200usize, proptest::prelude::any::<u8>()), 0..4),
            cut in 0..300usize,
            repair in proptest::prelude::any::<bool>(),
        ) {
            let kinds = [Kind::Begin, Kind::Complete, Kind::Release, Kind::Extend];
            let mut buf = Vec::new();
            sample(kinds[kind]).encode(&mut buf);
            buf.extend_from_slice(&[2; 40]);
            for (at, byte) in edits {
                let at = at % buf.len();
                buf[at] = byte;
            }
            buf.truncate(cut);
            if repair && let Some((len, _)) = frame_header(&buf) && let Some(content) = buf.get(8..8 + len) {
                let crc = crc32fast::hash(content).to_le_bytes();
                buf[4..8].copy_from_slice(&crc);
            }
            let shaped = frame_shape(&buf)
                .is_some_and(|(crc, len)| crc32fast::hash(&buf[8..8 + len]) == crc);
            proptest::prop_assert_eq!(check_frame(&buf).is_ok(), shaped);
        }
    }

    #[test]
    fn segment_header_round_trips_and_rejects_damage() {
        let h = SegmentHeader {
            file: 3,
            order: 2,
            replaces: 1,
            token_floor: 99,
            created_ms: 5,
        };
        let bytes = h.encode();
        assert_eq!(SegmentHeader::decode(&bytes), Ok(h));
        let mut bad = bytes;
        bad[20] ^= 1;
        assert_eq!(SegmentHeader::decode(&bad), Err(CorruptKind::BadHeader));
        let mut bad = bytes;
        bad[0] = b'X';
        assert_eq!(SegmentHeader::decode(&bad), Err(CorruptKind::BadMagic));
        let mut bad = bytes;
        bad[8] = 9;
        assert_eq!(
            SegmentHeader::decode(&bad),
            Err(CorruptKind::UnsupportedVersion(9))
        );
    }
}
