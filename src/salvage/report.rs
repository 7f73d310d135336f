//! What a salvage reports: per segment file and in total.

use std::path::PathBuf;

use bytes::Bytes;

use crate::error::CorruptKind;

/// What [`salvage`](crate::salvage) found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SalvageReport {
    /// Every segment file examined, in file-number order (files that a
    /// compaction output replaces are not examined: see
    /// [`superseded`](Self::superseded)).
    pub segments: Vec<SegmentSalvage>,
    /// File numbers of segment files a complete compaction output replaces:
    /// left alone, since the next open removes them.
    pub superseded: Vec<u64>,
    /// Records kept, in all files.
    pub records_kept: u64,
    /// Records dropped that could be counted, in all files (see
    /// [`SegmentSalvage::records_dropped`]).
    pub records_dropped: u64,
    /// Bytes of the segment files after the salvage.
    pub bytes_kept: u64,
    /// Bytes moved to quarantine files.
    pub bytes_quarantined: u64,
    /// The token floor written into the header of every rewritten file
    /// (`None` if no file was rewritten): the next fencing token is at
    /// least this.
    pub token_floor: Option<u64>,
    /// Whether an earlier salvage, interrupted after its commit point, was
    /// finished first (the figures above are of this run's own pass, made
    /// after that).
    pub resumed: bool,
}

impl SalvageReport {
    /// Whether any file was changed (rewritten, quarantined) by this run's
    /// own pass.
    pub fn changed(&self) -> bool {
        self.segments.iter().any(|s| s.rewritten)
    }

    /// Every damaged range moved to quarantine, file by file.
    pub fn ranges(&self) -> impl Iterator<Item = &QuarantinedRange> {
        self.segments.iter().flat_map(|s| s.ranges.iter())
    }

    /// Every (user, key) pair affected, file by file.
    pub fn affected(&self) -> impl Iterator<Item = &AffectedKey> {
        self.segments.iter().flat_map(|s| s.affected.iter())
    }
}

/// What [`salvage`](crate::salvage) did with one segment file.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SegmentSalvage {
    /// The number in the file name.
    pub file: u64,
    /// The file's path.
    pub path: PathBuf,
    /// What was found of the header, and what was done with it.
    pub header: HeaderRepair,
    /// Valid records kept.
    pub records_kept: u64,
    /// Records dropped that could be counted: damaged records whose length
    /// field still delimited them, and valid records dropped because their
    /// place in the replay order was lost with the header. Records in bytes
    /// that no length field accounts for (garbage, a cut file) are not
    /// counted.
    pub records_dropped: u64,
    /// The file's size after the salvage.
    pub bytes_kept: u64,
    /// Whether the file was written again (damage, a lost header, or a
    /// higher token floor for the file that replays last).
    pub rewritten: bool,
    /// The damaged ranges moved to quarantine, in file order.
    pub ranges: Vec<QuarantinedRange>,
    /// The (user, key) pairs of the dropped records whose ids could still
    /// be read, in file order.
    pub affected: Vec<AffectedKey>,
}

/// What a salvage found of a segment file's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HeaderRepair {
    /// It checked out.
    Intact,
    /// Its fields passed their CRC but the magic or version bytes were
    /// damaged: written again with the same fields.
    Restored,
    /// It could not be trusted: rebuilt from the file name (order = file
    /// number, replaces nothing). The records whose place in the replay
    /// order that could change were dropped ([`Affected::OrderUnknown`]).
    Rebuilt,
}

/// A damaged byte range of a segment file, moved to a quarantine file.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct QuarantinedRange {
    /// The segment file it was in.
    pub file: PathBuf,
    /// Where it started in that file, before the salvage.
    pub offset: u64,
    /// Its length in bytes.
    pub len: u64,
    /// What was wrong with its first bytes (for a range of valid records
    /// whose place was lost with the header: [`CorruptKind::BadHeader`]).
    pub kind: CorruptKind,
    /// The records in it that could be counted (see
    /// [`SegmentSalvage::records_dropped`]).
    pub records: u64,
    /// The quarantine file holding its bytes, exactly as they were.
    pub quarantine: PathBuf,
}

/// A (user, key) pair whose record a salvage dropped.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct AffectedKey {
    /// The user id.
    pub user: Bytes,
    /// The idempotency key.
    pub key: Bytes,
    /// The segment file the record was in.
    pub file: u64,
    /// Where the record started in that file, before the salvage.
    pub offset: u64,
    /// Why it was dropped.
    pub why: Affected,
}

/// Why a salvage dropped a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Affected {
    /// The record failed its checks. Its ids were read from the damaged
    /// bytes, so they may be damaged too: a hint, not a certainty.
    Damaged,
    /// The record was valid, but its file's header was lost, and its key
    /// has records in files that could replay on either side of it.
    OrderUnknown,
}
