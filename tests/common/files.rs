//! Looking at a data directory's bytes from outside the engine: which files
//! hold a byte string, where the sealed records are, and changing one
//! byte of a record with its frame CRC fixed up (so that only the AEAD can
//! notice). The layout is docs/FORMAT.md's.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// Bytes of a segment header.
pub const HEADER_LEN: usize = 56;
/// The type byte of a sealed complete record.
pub const SEALED: u8 = 6;
/// The type byte of a plaintext complete record.
pub const COMPLETE: u8 = 2;

/// Every file in `dir` (not recursing) with its bytes, by name.
pub fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    out.sort();
    out
}

/// The files in `dir` whose bytes contain `needle`.
pub fn holding(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    files(dir)
        .into_iter()
        .filter(|(_, bytes)| bytes.windows(needle.len()).any(|w| w == needle))
        .map(|(p, _)| p)
        .collect()
}

/// One record frame of a segment file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Offset of the frame in its file.
    pub offset: usize,
    /// Bytes of the whole frame (the 8-byte frame header included).
    pub len: usize,
    /// The type byte.
    pub kind: u8,
    /// For a sealed record, the key id it names.
    pub key_id: Option<u32>,
    /// For a complete record (sealed or not), where its body starts in the
    /// frame (a sealed body: ciphertext, then the 16-byte tag).
    pub body_at: Option<usize>,
}

fn u16_at(b: &[u8], at: usize) -> usize {
    usize::from(u16::from_le_bytes([b[at], b[at + 1]]))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The frames of a segment file's bytes, in order (stops at the first one
/// that does not fit).
pub fn frames(bytes: &[u8]) -> Vec<Frame> {
    let mut out = Vec::new();
    let mut at = HEADER_LEN;
    while at + 8 + 53 <= bytes.len() {
        let len = u32_at(bytes, at) as usize + 8;
        if at + len > bytes.len() {
            break;
        }
        let kind = bytes[at + 8];
        // Content: type, token, deadline, time, lease, fingerprint (53
        // bytes with the two lengths), user, key, then for a complete
        // record its status (and, sealed, key id and nonce) and body length.
        let (user, key) = (u16_at(bytes, at + 8 + 49), u16_at(bytes, at + 8 + 51));
        let after_ids = 8 + 53 + user + key;
        let (key_id, body_at) = match kind {
            SEALED => (
                Some(u32_at(bytes, at + after_ids + 2)),
                Some(after_ids + 2 + 4 + 24 + 4),
            ),
            COMPLETE => (None, Some(after_ids + 2 + 4)),
            _ => (None, None),
        };
        out.push(Frame {
            offset: at,
            len,
            kind,
            key_id,
            body_at,
        });
        at += len;
    }
    out
}

/// Every frame of every segment file in `dir`, with its file.
pub fn all_frames(dir: &Path) -> Vec<(PathBuf, Frame)> {
    files(dir)
        .into_iter()
        .filter(|(p, _)| p.extension().is_some_and(|e| e == "log"))
        .flat_map(|(p, bytes)| frames(&bytes).into_iter().map(move |f| (p.clone(), f)))
        .collect()
}

/// XORs byte `at` of `frame` (an offset inside the frame) in `file` with
/// `mask`, and recomputes the frame's CRC, so that the change passes every
/// check but the AEAD's.
pub fn tamper(file: &Path, frame: Frame, at: usize, mask: u8) {
    let mut bytes = std::fs::read(file).unwrap();
    bytes[frame.offset + at] ^= mask;
    let content = &bytes[frame.offset + 8..frame.offset + frame.len];
    let crc = crc32fast::hash(content).to_le_bytes();
    bytes[frame.offset + 4..frame.offset + 8].copy_from_slice(&crc);
    std::fs::write(file, bytes).unwrap();
}
