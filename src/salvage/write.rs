//! Carrying a plan out: each rewritten segment file and each quarantine
//! file written under its temporary name, then the commit, and the report.

use std::collections::BTreeSet;

use bytes::Bytes;

use super::commit::{self, Entry, QUARANTINE_SUFFIX, TEMP_SUFFIX};
use super::plan::{Header, Plan, Segment};
use super::report::{
    Affected, AffectedKey, HeaderRepair, QuarantinedRange, SalvageReport, SegmentSalvage,
};
use crate::error::Result;
use crate::log::resync::{Piece, chained, ids, walk};
use crate::storage::Storage;

/// Writes what `plan` decided, commits it, and reports.
pub(super) fn run(storage: &dyn Storage, plan: Plan) -> Result<SalvageReport> {
    let mut report = SalvageReport {
        superseded: plan.superseded.clone(),
        token_floor: plan.token_floor,
        ..SalvageReport::default()
    };
    let mut taken = plan.names.clone();
    let mut entries = Vec::new();
    for segment in &plan.segments {
        let done = match plan.token_floor {
            Some(floor) if segment.rewrite => {
                rewrite(storage, segment, floor, &mut taken, &mut entries)
            }
            _ => Ok(unchanged(storage, segment)),
        };
        match done {
            Ok(s) => report.segments.push(s),
            Err(e) => {
                commit::discard(storage, &entries);
                return Err(e);
            }
        }
    }
    if !entries.is_empty() {
        commit::commit(storage, &entries)?;
    }
    for s in &report.segments {
        report.records_kept += s.records_kept;
        report.records_dropped += s.records_dropped;
        report.bytes_kept += s.bytes_kept;
        report.bytes_quarantined += s.ranges.iter().map(|r| r.len).sum::<u64>();
    }
    Ok(report)
}

fn repair(header: &Header) -> HeaderRepair {
    match header {
        Header::Intact(_) => HeaderRepair::Intact,
        Header::Restored(..) => HeaderRepair::Restored,
        Header::Lost(_) => HeaderRepair::Rebuilt,
    }
}

/// A file left as it is (clean, and not the last one needing a floor).
fn unchanged(storage: &dyn Storage, segment: &Segment) -> SegmentSalvage {
    SegmentSalvage {
        file: segment.id,
        path: storage.path(&segment.name),
        header: repair(&segment.header),
        records_kept: segment.frames,
        records_dropped: 0,
        bytes_kept: segment.len as u64,
        rewritten: false,
        ranges: Vec::new(),
        affected: Vec::new(),
    }
}

/// A name for the quarantine file of the range at `at` in `segment` that
/// no file in the directory has, nor a salvage's temporary file.
fn quarantine_name(segment: &str, at: usize, taken: &mut BTreeSet<String>) -> String {
    let base = format!("{segment}.{at:x}");
    let free = |name: &String, taken: &BTreeSet<String>| {
        !taken.contains(name) && !taken.contains(&format!("{name}{TEMP_SUFFIX}"))
    };
    let mut name = format!("{base}{QUARANTINE_SUFFIX}");
    let mut n = 1u64;
    while !free(&name, taken) {
        name = format!("{base}-{n}{QUARANTINE_SUFFIX}");
        n += 1;
    }
    taken.insert(name.clone());
    name
}

/// A record a salvage drops: its offset, the user and key that can still
/// be read of it, and why.
type Dropped<'a> = (usize, Option<(&'a [u8], &'a [u8])>, Affected);

/// The records a salvage drops from `buf`.
fn dropped<'a>(buf: &'a [u8], pieces: &[Piece], segment: &Segment) -> Vec<Dropped<'a>> {
    let mut out = Vec::new();
    for piece in pieces {
        match *piece {
            Piece::Frame { at, end } if segment.unplaced.contains(&at) => {
                out.push((at, ids(buf, at, end), Affected::OrderUnknown));
            }
            Piece::Frame { .. } => {}
            Piece::Bad { at, end, .. } => out.push((at, ids(buf, at, end), Affected::Damaged)),
            Piece::Garbage { at, end, .. } => {
                for (at, end) in chained(buf, at, end) {
                    out.push((at, ids(buf, at, end), Affected::Damaged));
                }
            }
        }
    }
    out
}

/// Writes the salvaged `segment` and its quarantine files under temporary
/// names (appending their entries to `entries`), and reports it.
fn rewrite(
    storage: &dyn Storage,
    segment: &Segment,
    floor: u64,
    taken: &mut BTreeSet<String>,
    entries: &mut Vec<Entry>,
) -> Result<SegmentSalvage> {
    let buf = segment.read(storage)?;
    let pieces = if segment.pieces.is_empty() {
        walk(&buf)
    } else {
        segment.pieces.clone()
    };
    let header = segment.new_header(floor).encode();
    let mut parts: Vec<&[u8]> = vec![&header];
    for piece in &pieces {
        if let Piece::Frame { at, end } = *piece
            && !segment.unplaced.contains(&at)
        {
            parts.extend(buf.get(at..end));
        }
    }
    let entry = commit::write_temp(storage, &segment.name, &parts)?;
    let bytes_kept = entry.len;
    entries.push(entry);
    let dropped = dropped(&buf, &pieces, segment);
    let mut ranges = Vec::new();
    for range in segment.ranges() {
        let name = quarantine_name(&segment.name, range.at, taken);
        let bytes = buf.get(range.at..range.end).unwrap_or_default();
        entries.push(commit::write_temp(storage, &name, &[bytes])?);
        ranges.push(QuarantinedRange {
            file: storage.path(&segment.name),
            offset: range.at as u64,
            len: (range.end - range.at) as u64,
            kind: range.kind,
            records: dropped
                .iter()
                .filter(|(at, ..)| (range.at..range.end).contains(at))
                .count() as u64,
            quarantine: storage.path(&name),
        });
    }
    let affected = dropped
        .iter()
        .filter_map(|&(at, ids, why)| {
            let (user, key) = ids?;
            Some(AffectedKey {
                user: Bytes::copy_from_slice(user),
                key: Bytes::copy_from_slice(key),
                file: segment.id,
                offset: at as u64,
                why,
            })
        })
        .collect();
    Ok(SegmentSalvage {
        file: segment.id,
        path: storage.path(&segment.name),
        header: repair(&segment.header),
        records_kept: (parts.len() - 1) as u64,
        records_dropped: dropped.len() as u64,
        bytes_kept,
        rewritten: true,
        ranges,
        affected,
    })
}
