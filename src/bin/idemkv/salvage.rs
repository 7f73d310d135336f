//! The text `salvage` prints: a summary line, each rewritten segment file
//! with its quarantined ranges and the keys affected, then the totals.
//!
//! ```text
//! salvaged DIR: rewrote 2 of 15 segment files, quarantined 1 damaged range (163 bytes)
//! segment 00000a.log: header intact; kept 24 records (3847 bytes), dropped 1 record
//!   quarantined offset 2162, 163 bytes (record checksum mismatch, 1 record): DIR/00000a.log.872.quarantine
//!   affected: user shop-1 key nested (from a damaged record: its ids may be damaged too)
//! segment 000018.log: header intact; kept 0 records (56 bytes), dropped 0 records (rewritten for the token floor)
//! total: kept 419 records (52328 bytes), dropped 1 record, quarantined 163 bytes in 1 range
//! fencing tokens resume at 4194308 or above
//! ```

use std::io::Write;
use std::path::Path;

use idemkv::{Affected, HeaderRepair, SalvageReport, SegmentSalvage};

use crate::Failure;
use crate::render::text_or_hex;

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn header(repair: HeaderRepair) -> &'static str {
    match repair {
        HeaderRepair::Intact => "header intact",
        HeaderRepair::Restored => "header restored (its magic or version bytes were damaged)",
        HeaderRepair::Rebuilt => "header rebuilt from the file name",
        _ => "header repaired",
    }
}

fn why(affected: Affected) -> &'static str {
    match affected {
        Affected::Damaged => "from a damaged record: its ids may be damaged too",
        Affected::OrderUnknown => {
            "a valid record dropped: its place in the replay order was lost with the header"
        }
        _ => "dropped",
    }
}

fn file_name(segment: &SegmentSalvage) -> String {
    segment.path.file_name().map_or_else(
        || segment.path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

pub(crate) fn salvage_text(
    out: &mut impl Write,
    dir: &Path,
    report: &SalvageReport,
) -> Result<(), Failure> {
    if report.resumed {
        writeln!(out, "finished an interrupted salvage of {}", dir.display())?;
    }
    let files = report.segments.len() as u64;
    let ranges = report.ranges().count() as u64;
    if !report.changed() {
        writeln!(
            out,
            "nothing to salvage in {}: {}, {}, {} bytes, no damage",
            dir.display(),
            plural(files, "segment file", "segment files"),
            plural(report.records_kept, "record", "records"),
            report.bytes_kept
        )?;
    } else {
        let rewritten = report.segments.iter().filter(|s| s.rewritten).count();
        writeln!(
            out,
            "salvaged {}: rewrote {rewritten} of {}, quarantined {} ({} bytes)",
            dir.display(),
            plural(files, "segment file", "segment files"),
            plural(ranges, "damaged range", "damaged ranges"),
            report.bytes_quarantined
        )?;
    }
    for segment in report.segments.iter().filter(|s| s.rewritten) {
        let floor_only = segment.ranges.is_empty() && segment.header == HeaderRepair::Intact;
        writeln!(
            out,
            "segment {}: {}; kept {} ({} bytes), dropped {}{}",
            file_name(segment),
            header(segment.header),
            plural(segment.records_kept, "record", "records"),
            segment.bytes_kept,
            plural(segment.records_dropped, "record", "records"),
            if floor_only {
                " (rewritten for the token floor)"
            } else {
                ""
            }
        )?;
        for range in &segment.ranges {
            writeln!(
                out,
                "  quarantined offset {}, {} bytes ({}, {}): {}",
                range.offset,
                range.len,
                range.kind,
                plural(range.records, "record", "records"),
                range.quarantine.display()
            )?;
        }
        for key in &segment.affected {
            writeln!(
                out,
                "  affected: user {} key {} ({})",
                text_or_hex(&key.user),
                text_or_hex(&key.key),
                why(key.why)
            )?;
        }
    }
    for file in &report.superseded {
        writeln!(
            out,
            "left alone: {file:06x}.log (a compaction output replaces it; the next open removes it)"
        )?;
    }
    if report.changed() {
        writeln!(
            out,
            "total: kept {} ({} bytes), dropped {}, quarantined {} bytes in {}",
            plural(report.records_kept, "record", "records"),
            report.bytes_kept,
            plural(report.records_dropped, "record", "records"),
            report.bytes_quarantined,
            plural(ranges, "range", "ranges")
        )?;
    }
    if let Some(floor) = report.token_floor {
        writeln!(out, "fencing tokens resume at {floor} or above")?;
    }
    Ok(())
}
