//! The input layout of the `log_decode` and `salvage` targets: arbitrary
//! bytes as up to three segment files.
//!
//! Input layout: byte 0 picks the number of segment files (1 to 3, low two
//! bits) and the id of the first (bits 2..4, plus one), whether ids skip
//! one (bit 5) and whether checksums are repaired (bit 6: the header's and
//! every frame's CRC is recomputed, so that changed record contents reach
//! the replay rules instead of failing their checksum); then a
//! little-endian `u16` per extra file gives its length's share of the
//! rest; the rest is the files' bytes, in order.

/// Bytes of a segment header (docs/FORMAT.md); its CRC covers 16..56.
const HEADER_LEN: usize = 56;

/// Recomputes the CRCs of a segment's header and of every frame that fits.
fn repair(bytes: &mut [u8]) {
    if let Some(body) = bytes.get(16..HEADER_LEN) {
        let crc = crc32fast::hash(body).to_le_bytes();
        bytes[12..16].copy_from_slice(&crc);
    }
    let mut at = HEADER_LEN;
    while let Some(head) = bytes.get(at..at + 8) {
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let Some(content) = bytes.get(at + 8..at + 8 + len) else {
            break;
        };
        let crc = crc32fast::hash(content).to_le_bytes();
        bytes[at + 4..at + 8].copy_from_slice(&crc);
        at += 8 + len;
    }
}

/// The segment files of an input: `(name, bytes)`.
pub fn files(data: &[u8]) -> Vec<(String, Vec<u8>)> {
    let Some((&head, mut rest)) = data.split_first() else {
        return vec![("000001.log".to_owned(), Vec::new())];
    };
    let count = usize::from(head & 3) % 3 + 1;
    let first = u64::from((head >> 2) & 7) + 1;
    let step = if head & 0x20 != 0 { 2 } else { 1 };
    let mut shares = Vec::new();
    for _ in 1..count {
        let (n, tail) = rest.split_at_checked(2).unwrap_or((&[0, 0][..], &[][..]));
        shares.push(usize::from(u16::from_le_bytes([n[0], n[1]])));
        rest = tail;
    }
    let mut out = Vec::new();
    let mut id = first;
    for share in shares {
        let len = (rest.len() * share / 65_536).min(rest.len());
        let (file, tail) = rest.split_at(len);
        out.push((format!("{id:06x}.log"), file.to_vec()));
        rest = tail;
        id += step;
    }
    out.push((format!("{id:06x}.log"), rest.to_vec()));
    if head & 0x40 != 0 {
        for (_, bytes) in &mut out {
            repair(bytes);
        }
    }
    out
}
