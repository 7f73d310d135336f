//! The salvage's commit: files written under temporary names, a manifest
//! of the renames that publish them, the renames, and rolling an
//! interrupted salvage forward (the mechanism is in the module docs of
//! `salvage`).
//!
//! # Manifest (`SALVAGE`)
//! Integers little-endian: magic `IDEMKVSV` (8 bytes), version `1` (u32),
//! the entry count (u32); per entry the temporary name (u16 length, bytes),
//! the final name (u16 length, bytes), the file's length (u64) and CRC-32
//! (u32); then the CRC-32 of every byte before it (u32).

use std::sync::Arc;

use crate::error::{CorruptKind, Error, IoOp, Result};
use crate::log::parse_name;
use crate::storage::{Storage, StorageFile};

/// The manifest of a salvage past its commit point.
pub(crate) const MANIFEST: &str = "SALVAGE";
/// The manifest while it is written.
const MANIFEST_TEMP: &str = "SALVAGE.tmp";
/// Added to a file's final name while it is written.
pub(super) const TEMP_SUFFIX: &str = ".salvage";
/// The end of a quarantine file's name.
pub(super) const QUARANTINE_SUFFIX: &str = ".quarantine";
const MAGIC: &[u8; 8] = b"IDEMKVSV";
const VERSION: u32 = 1;

/// One rename the manifest records: `temp` becomes `name`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Entry {
    pub temp: String,
    pub name: String,
    pub len: u64,
    pub crc: u32,
}

fn io(storage: &dyn Storage, op: IoOp, name: &str) -> impl FnOnce(std::io::Error) -> Error {
    let path = storage.path(name);
    move |e| Error::io(op, path, e)
}

fn sync_dir(storage: &dyn Storage) -> Result<()> {
    storage.sync_dir().map_err(io(storage, IoOp::SyncDir, ""))
}

/// Writes `parts` as `name` + [`TEMP_SUFFIX`] and fsyncs it; on failure
/// removes it (best effort).
pub(super) fn write_temp(storage: &dyn Storage, name: &str, parts: &[&[u8]]) -> Result<Entry> {
    let temp = format!("{name}{TEMP_SUFFIX}");
    let file = storage
        .create(&temp)
        .map_err(io(storage, IoOp::Create, &temp))?;
    let mut hasher = crc32fast::Hasher::new();
    let mut len = 0u64;
    let written = parts.iter().try_for_each(|part| {
        hasher.update(part);
        len += part.len() as u64;
        file.append(part).map_err(io(storage, IoOp::Write, &temp))
    });
    let synced = written.and_then(|()| file.sync().map_err(io(storage, IoOp::Sync, &temp)));
    if let Err(e) = synced {
        let _ = storage.remove(&temp);
        return Err(e);
    }
    Ok(Entry {
        temp,
        name: name.to_owned(),
        len,
        crc: hasher.finalize(),
    })
}

/// Removes the temporary files of `entries` (best effort: a later salvage
/// removes what is left).
pub(super) fn discard(storage: &dyn Storage, entries: &[Entry]) {
    for e in entries {
        let _ = storage.remove(&e.temp);
    }
}

/// Publishes `entries` (every temporary file written and synced): the
/// commit point, then the renames.
/// A failure before the manifest has its name removes the temporary files
/// (best effort); after it, they stay for the next salvage to publish.
pub(super) fn commit(storage: &dyn Storage, entries: &[Entry]) -> Result<()> {
    if let Err(e) = stage(storage, entries) {
        let named = list(storage).map_or(true, |names| names.iter().any(|n| n == MANIFEST));
        if !named {
            discard(storage, entries);
            let _ = storage.remove(MANIFEST_TEMP);
        }
        return Err(e);
    }
    // The commit point: from here on, every open refuses the directory
    // until the renames below are done.
    sync_dir(storage)?;
    publish(storage, entries, false)
}

/// Makes the temporary files' names durable, then writes, syncs and names
/// the manifest.
fn stage(storage: &dyn Storage, entries: &[Entry]) -> Result<()> {
    // The temporary files' names must be durable before the manifest is.
    sync_dir(storage)?;
    let file = storage
        .create(MANIFEST_TEMP)
        .map_err(io(storage, IoOp::Create, MANIFEST_TEMP))?;
    file.append(&encode(entries))
        .map_err(io(storage, IoOp::Write, MANIFEST_TEMP))?;
    file.sync()
        .map_err(io(storage, IoOp::Sync, MANIFEST_TEMP))?;
    storage
        .rename(MANIFEST_TEMP, MANIFEST)
        .map_err(io(storage, IoOp::Rename, MANIFEST_TEMP))
}

/// Finishes a salvage interrupted after its commit point, if `SALVAGE` is
/// there; returns whether it was.
pub(super) fn resume(storage: &dyn Storage) -> Result<bool> {
    let names = list(storage)?;
    if !names.iter().any(|n| n == MANIFEST) {
        return Ok(false);
    }
    let file = storage
        .open(MANIFEST)
        .map_err(io(storage, IoOp::Open, MANIFEST))?;
    let bytes = read(storage, &*file, MANIFEST)?;
    let entries = decode(&bytes).map_err(|(offset, kind)| Error::Corrupt {
        file: storage.path(MANIFEST),
        offset: offset as u64,
        kind,
    })?;
    publish(storage, &entries, true)?;
    Ok(true)
}

/// Renames every entry's temporary file into place (one already renamed by
/// an interrupted run is skipped), fsyncs the directory, then removes the
/// manifest. With `check`, every file is first checked against the length
/// and CRC the manifest records, and nothing is renamed unless all match.
fn publish(storage: &dyn Storage, entries: &[Entry], check: bool) -> Result<()> {
    let names = list(storage)?;
    let pending = |e: &Entry| names.contains(&e.temp);
    if check {
        // Every file first, so that a mismatch renames nothing.
        for e in entries {
            check_file(storage, if pending(e) { &e.temp } else { &e.name }, e)?;
        }
    }
    for e in entries.iter().filter(|e| pending(e)) {
        storage
            .rename(&e.temp, &e.name)
            .map_err(io(storage, IoOp::Rename, &e.temp))?;
    }
    sync_dir(storage)?;
    storage
        .remove(MANIFEST)
        .map_err(io(storage, IoOp::Remove, MANIFEST))?;
    sync_dir(storage)
}

/// Removes what an unfinished salvage left before its commit point: every
/// `*.salvage` file and `SALVAGE.tmp`.
pub(super) fn clean_up(storage: &dyn Storage) -> Result<()> {
    let mut removed = false;
    for name in list(storage)? {
        if name.ends_with(TEMP_SUFFIX) || name == MANIFEST_TEMP {
            storage
                .remove(&name)
                .map_err(io(storage, IoOp::Remove, &name))?;
            removed = true;
        }
    }
    if removed {
        sync_dir(storage)?;
    }
    Ok(())
}

fn list(storage: &dyn Storage) -> Result<Vec<String>> {
    storage.list().map_err(io(storage, IoOp::List, ""))
}

fn read(storage: &dyn Storage, file: &dyn StorageFile, name: &str) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    crate::log::read_all(file, &storage.path(name), &mut buf)?;
    Ok(buf)
}

/// Fails unless `name` holds what `entry` records.
fn check_file(storage: &dyn Storage, name: &str, entry: &Entry) -> Result<()> {
    let file: Arc<dyn StorageFile> = storage.open(name).map_err(io(storage, IoOp::Open, name))?;
    let bytes = read(storage, &*file, name)?;
    if bytes.len() as u64 != entry.len || crc32fast::hash(&bytes) != entry.crc {
        return Err(Error::Corrupt {
            file: storage.path(name),
            offset: 0,
            kind: CorruptKind::Checksum,
        });
    }
    Ok(())
}

/// Whether the manifest may rename `temp` to `name`: one of the files a
/// salvage writes, under its own temporary name.
fn allowed(temp: &str, name: &str) -> bool {
    let flat = !name.is_empty() && !name.contains('/') && name != "." && name != "..";
    let kind = parse_name(name, ".log").is_some() || name.ends_with(QUARANTINE_SUFFIX);
    flat && kind && temp.strip_suffix(TEMP_SUFFIX) == Some(name)
}

fn encode(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(
        &u32::try_from(entries.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    for e in entries {
        for name in [&e.temp, &e.name] {
            let len = u16::try_from(name.len()).unwrap_or(u16::MAX);
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(name.as_bytes());
        }
        out.extend_from_slice(&e.len.to_le_bytes());
        out.extend_from_slice(&e.crc.to_le_bytes());
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// A checked reader over the manifest's bytes.
struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], (usize, CorruptKind)> {
        let bytes = self
            .buf
            .get(self.at..)
            .and_then(|rest| rest.get(..n))
            .ok_or((self.at, CorruptKind::Malformed))?;
        self.at += n;
        Ok(bytes)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], (usize, CorruptKind)> {
        let at = self.at;
        self.take(N)?
            .try_into()
            .map_err(|_| (at, CorruptKind::Malformed))
    }
    fn name(&mut self) -> Result<String, (usize, CorruptKind)> {
        let len = usize::from(u16::from_le_bytes(self.array()?));
        let at = self.at;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| (at, CorruptKind::Malformed))
    }
}

fn decode(buf: &[u8]) -> Result<Vec<Entry>, (usize, CorruptKind)> {
    let body_len = buf
        .len()
        .checked_sub(4)
        .ok_or((0, CorruptKind::Malformed))?;
    let (body, crc) = buf.split_at(body_len);
    if crc32fast::hash(body).to_le_bytes() != crc {
        return Err((body_len, CorruptKind::Checksum));
    }
    let mut r = Reader { buf: body, at: 0 };
    if r.take(MAGIC.len())? != MAGIC {
        return Err((0, CorruptKind::BadMagic));
    }
    let version = u32::from_le_bytes(r.array()?);
    if version != VERSION {
        return Err((8, CorruptKind::UnsupportedVersion(version)));
    }
    let count = u32::from_le_bytes(r.array()?);
    let mut entries = Vec::new();
    for _ in 0..count {
        let at = r.at;
        let temp = r.name()?;
        let name = r.name()?;
        let len = u64::from_le_bytes(r.array()?);
        let crc = u32::from_le_bytes(r.array()?);
        if !allowed(&temp, &name) {
            return Err((at, CorruptKind::Malformed));
        }
        entries.push(Entry {
            temp,
            name,
            len,
            crc,
        });
    }
    if r.at != body.len() {
        return Err((r.at, CorruptKind::Malformed));
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries() -> Vec<Entry> {
        vec![
            Entry {
                temp: "000003.log.salvage".into(),
                name: "000003.log".into(),
                len: 4096,
                crc: 0xdead_beef,
            },
            Entry {
                temp: "000003.log.40.quarantine.salvage".into(),
                name: "000003.log.40.quarantine".into(),
                len: 12,
                crc: 7,
            },
        ]
    }

    #[test]
    fn a_manifest_round_trips_and_rejects_every_flipped_bit() {
        let bytes = encode(&entries());
        assert_eq!(decode(&bytes), Ok(entries()));
        for i in 0..bytes.len() * 8 {
            let mut bad = bytes.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(decode(&bad).is_err(), "bit {i}");
        }
        for n in 0..bytes.len() {
            assert!(decode(&bytes[..n]).is_err(), "prefix {n}");
        }
    }

    #[test]
    fn a_manifest_renames_only_a_salvage_file_onto_its_own_name() {
        assert!(allowed("000003.log.salvage", "000003.log"));
        assert!(allowed(
            "000003.log.40.quarantine.salvage",
            "000003.log.40.quarantine"
        ));
        assert!(!allowed("000004.log.salvage", "000003.log"));
        assert!(!allowed("LOCK.salvage", "LOCK"));
        assert!(!allowed("../x.log.salvage", "../x.log"));
        let mut bad = entries();
        bad[0].name = "SALVAGE".into();
        bad[0].temp = "SALVAGE.salvage".into();
        assert!(decode(&encode(&bad)).is_err());
    }
}
