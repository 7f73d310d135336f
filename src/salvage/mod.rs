//! Salvage: the way back from a damaged data directory that [`Engine::open`]
//! refuses with [`Error::Corrupt`], short of deleting it.
//!
//! [`salvage`] (and `idemkv salvage DIR`) keeps every record whose frame
//! and CRC are valid, in its own segment file and in its original order
//! (file numbers and replay order unchanged: recovery depends on them),
//! moves every damaged byte range to a quarantine file beside the data, and
//! leaves a directory that [`Engine::open`] opens and that answers every
//! kept record as before. It is offline (it holds the directory lock) and
//! safe to interrupt.
//!
//! The rules, the files it writes and why an interruption is safe are in
//! the docs of [`salvage`].
//!
//! [`Engine::open`]: crate::Engine::open

mod commit;
mod plan;
mod report;
mod write;

use std::path::Path;

pub(crate) use commit::MANIFEST;
pub use report::{
    Affected, AffectedKey, HeaderRepair, QuarantinedRange, SalvageReport, SegmentSalvage,
};

#[cfg(doc)]
use crate::error::CorruptKind;
use crate::error::{Error, IoOp, Result};
use crate::storage::{FsStorage, Storage};

/// Salvages the data directory `dir`: keeps every valid record, moves every
/// damaged byte range to a quarantine file, and leaves a directory that
/// [`Engine::open`] opens and that answers every kept record as before. A
/// healthy directory is left as it is. Offline: takes the directory lock.
///
/// If an earlier salvage was interrupted after its commit point, it is
/// finished first ([`SalvageReport::resumed`]).
///
/// # What is kept
/// Each segment file (`NNNNNN.log`) is walked frame by frame. A frame that
/// fails only its CRC (its lengths agree) is dropped alone, its body not
/// searched for frames; after any other damage the walk resynchronises on
/// the next offset where a whole valid frame starts (CRC and layout
/// checked), so no valid frame is skipped and garbage makes up none
/// (`docs/DURABILITY.md`, Salvage). Valid frames that recovery would refuse
/// (a token past 2^48) are dropped too. Files that a complete compaction
/// output replaces are left alone (the next open removes them); so are
/// unfinished compaction outputs (`.log.tmp`, removed by the next open).
///
/// A damaged **segment header** is
/// - written again with the same fields when its fields (bytes 16..56)
///   still pass their CRC and name the file (only the magic or version
///   bytes were hit); a file whose magic is intact, whose version is
///   another and in which no version-1 frame is found is from a newer
///   format, and the salvage refuses to run
///   ([`CorruptKind::UnsupportedVersion`]) rather than touch it;
/// - otherwise rebuilt from the file name (order = file number,
///   `replaces` = 0). That order is right for a segment the log wrote but
///   not for a compaction output (whose records replay where the file it
///   replaced did), so the file keeps only the records whose place cannot
///   change an answer: token reservations, and records of keys that have
///   no record in any other file replaying before its file number (or
///   whose header was lost too). The others are dropped and reported as
///   [`Affected::OrderUnknown`].
///
/// Every rewritten file's header carries a token floor above every token
/// and floor the kept files show, plus one reservation block per record
/// the quarantined bytes could hold, and the file that replays last is
/// rewritten too if its floor is lower: fencing tokens handed out before
/// the damage are not handed out again after it.
///
/// # Files
/// - `NNNNNN.log.OFFSET.quarantine` (`OFFSET` in lowercase hex: where the
///   range started in the original file; `-1`, `-2`, ... is added before
///   `.quarantine` if the name is taken): the bytes of one damaged range,
///   exactly as they were. Recovery and `Storage::list` users ignore them;
///   delete them once they are no longer wanted.
/// - `*.salvage`: a salvaged file being written (removed by the next
///   salvage, or renamed into place by it if `SALVAGE` names it).
/// - `SALVAGE` (written as `SALVAGE.tmp` first): the commit record of a
///   salvage under way (see below); [`Engine::open`] refuses a directory
///   holding it with [`Error::SalvagePending`].
///
/// # Interruption
/// Nothing the engine reads is changed until the commit point. The salvage
/// writes every new segment file and quarantine file under a `.salvage`
/// name and fsyncs each, fsyncs the directory, then writes the manifest
/// `SALVAGE.tmp` (each rename it will make, with the length and CRC of the
/// file renamed), fsyncs it, renames it to `SALVAGE` and fsyncs the
/// directory: **the commit point**. Then it renames each file into place
/// (a segment's salvaged file replaces the original), fsyncs the
/// directory, removes `SALVAGE` and fsyncs the directory again. A crash
/// before the commit point leaves the original files (plus `.salvage`
/// files that nothing reads, removed by the next salvage); after it, the
/// directory holds `SALVAGE`, which every open refuses, and the next
/// salvage finishes the renames (checking each file's length and CRC)
/// before it does anything else. So no engine ever opens a mix.
///
/// [`Engine::open`]: crate::Engine::open
///
/// # Errors
/// [`Error::Locked`] if an engine holds the directory; [`Error::Io`] if
/// `dir` does not exist or a file cannot be read or written (nothing the
/// engine reads was changed, unless the commit point was passed: then the
/// directory refuses every open with [`Error::SalvagePending`] until a
/// salvage runs again); [`Error::InvalidArgument`] if `dir` holds no
/// segment file; [`Error::Corrupt`] for a segment file of a newer format
/// (nothing changed) or a `SALVAGE` manifest that is damaged or names a
/// file that does not match it.
pub fn salvage(dir: impl AsRef<Path>) -> Result<SalvageReport> {
    let dir = dir.as_ref();
    if !dir.is_dir() {
        let missing = std::io::Error::new(std::io::ErrorKind::NotFound, "no such data directory");
        return Err(Error::io(IoOp::Open, dir, missing));
    }
    let storage = FsStorage::open(dir)?;
    let result = salvage_storage(&storage);
    storage.close();
    result
}

/// [`salvage`] on any [`Storage`] (for example the simulated disk
/// [`SimDisk`](crate::storage::SimDisk), with faults and crashes).
///
/// # Errors
/// As [`salvage`], without the lock.
pub fn salvage_storage(storage: &dyn Storage) -> Result<SalvageReport> {
    let resumed = commit::resume(storage)?;
    commit::clean_up(storage)?;
    let plan = plan::plan(storage)?;
    let mut report = write::run(storage, plan)?;
    report.resumed = resumed;
    Ok(report)
}
