//! Output: the text and JSON the commands print.

use std::io::Write;
use std::path::Path;

use idemkv::{
    CompactionReport, Inspection, RecordDump, RecordState, RecordView, SegmentInfo, Stats,
    VerifyReport,
};

use crate::Failure;

pub(crate) fn verify_text(
    out: &mut impl Write,
    dir: &Path,
    report: &VerifyReport,
) -> Result<(), Failure> {
    writeln!(
        out,
        "ok: {}: no corruption (segments: {}, records: {}, bytes: {})",
        dir.display(),
        report.segments,
        report.records,
        report.bytes
    )?;
    match &report.torn_tail {
        Some((file, offset)) => writeln!(
            out,
            "torn tail: {} at offset {offset} (an unfinished write from a crash, not \
             corruption; the next open cuts it off)",
            file.display()
        )?,
        None => writeln!(out, "torn tail: none")?,
    }
    Ok(())
}

// ---------------------------------------------------------------- get

pub(crate) fn get_text(
    out: &mut impl Write,
    user: &[u8],
    key: &[u8],
    view: &RecordView,
    body: Option<&[u8]>,
) -> Result<(), Failure> {
    writeln!(out, "user:          {}", text_or_hex(user))?;
    if is_derived(key) {
        writeln!(
            out,
            "key:           {} (derived by the HTTP layer: the request sent no key)",
            text_or_hex(key)
        )?;
    } else {
        writeln!(out, "key:           {}", text_or_hex(key))?;
    }
    writeln!(out, "state:         {}", state_name(view.state))?;
    writeln!(out, "token:         {}", view.token)?;
    writeln!(out, "lease expires: {}", deadline(view.lease_expires_at_ms))?;
    writeln!(out, "expires:       {}", deadline(view.expires_at_ms))?;
    match view.status {
        Some(status) => writeln!(out, "status:        {status}")?,
        None => writeln!(out, "status:        -")?,
    }
    match body {
        None if view.state == RecordState::InProgress => {
            writeln!(out, "body:          - (in progress)")?;
        }
        None => writeln!(out, "body:          - (expired while reading)")?,
        Some(body) => match std::str::from_utf8(body) {
            Ok(text) => {
                writeln!(out, "body:          {} bytes, UTF-8:", body.len())?;
                writeln!(out, "{text}")?;
            }
            Err(_) => {
                writeln!(out, "body:          {} bytes, not UTF-8, hex:", body.len())?;
                writeln!(out, "{}", hex(body))?;
            }
        },
    }
    Ok(())
}

/// `4102444830000 ms (2100-01-01T00:00:30.000Z)`, or `-`.
pub(crate) fn deadline(ms: Option<u64>) -> String {
    match ms {
        Some(ms) => format!("{ms} ms ({})", utc(ms)),
        None => "-".to_owned(),
    }
}

// ---------------------------------------------------------------- dump

/// The prefix of the keys the HTTP layer derives for requests that carry
/// none (`idemkv::http::DERIVED_KEY_PREFIX`, spelled out here because the
/// CLI is built without the `http` feature). No client key is stored with
/// it: the layer writes a client key's leading `d` as `%64`.
pub(crate) const DERIVED_KEY_PREFIX: &[u8] = b"derived:";

/// Whether `key` is one the HTTP layer derived.
pub(crate) fn is_derived(key: &[u8]) -> bool {
    key.starts_with(DERIVED_KEY_PREFIX)
}

/// One record as a JSON object (no newline). `derived` tells whether the
/// HTTP layer derived its key (`derive_missing_keys`).
pub(crate) fn dump_line(record: &RecordDump) -> String {
    let view = &record.view;
    let mut obj = JsonObject::new();
    obj.bytes("user", &record.user);
    obj.bytes("key", &record.key);
    obj.raw(
        "derived",
        if is_derived(&record.key) {
            "true"
        } else {
            "false"
        },
    );
    obj.string("state", state_name(view.state));
    obj.num("token", view.token);
    obj.opt_num("lease_expires_at_ms", view.lease_expires_at_ms);
    obj.opt_num("expires_at_ms", view.expires_at_ms);
    obj.opt_num("status", view.status.map(u64::from));
    obj.string(
        "fingerprint",
        &format!("{:032x}", record.fingerprint.as_u128()),
    );
    match &record.outcome {
        Some(outcome) => obj.bytes("body", &outcome.body),
        None => obj.raw("body", "null"),
    }
    obj.finish()
}

// ---------------------------------------------------------------- stats

/// The estimated live bytes of a segment: its size times its live fraction
/// (the estimate compaction uses).
pub(crate) fn live_bytes(seg: &SegmentInfo) -> u64 {
    if seg.records == 0 {
        return 0;
    }
    let live = u128::from(seg.live_records.min(seg.records));
    let estimate = u128::from(seg.bytes) * live / u128::from(seg.records);
    u64::try_from(estimate).unwrap_or(seg.bytes)
}

/// Bytes on disk, estimated live bytes, estimated dead bytes.
pub(crate) fn byte_totals(inspection: &Inspection) -> (u64, u64, u64) {
    let disk: u64 = inspection.segments.iter().map(|s| s.bytes).sum();
    let live: u64 = inspection.segments.iter().map(live_bytes).sum();
    (disk, live, disk.saturating_sub(live))
}

/// Every [`Stats`] counter with its name.
pub(crate) fn counters(s: &Stats) -> [(&'static str, u64); 24] {
    [
        ("begins", s.begins),
        ("started", s.started),
        ("replays", s.replays),
        ("in_flight", s.in_flight),
        ("mismatches", s.mismatches),
        ("takeovers", s.takeovers),
        ("lease_lost", s.lease_lost),
        ("expirations", s.expirations),
        ("completions", s.completions),
        ("releases", s.releases),
        ("bytes_written", s.bytes_written),
        ("records_written", s.records_written),
        ("fsyncs", s.fsyncs),
        ("live_records", s.live_records),
        ("segments", s.segments),
        ("swept", s.swept),
        ("segments_compacted", s.segments_compacted),
        ("bytes_reclaimed", s.bytes_reclaimed),
        ("last_compaction_us", s.last_compaction_us),
        ("disk_bytes", s.disk_bytes),
        ("live_bytes", s.live_bytes),
        ("compaction_errors", s.compaction_errors),
        ("compactions", s.compactions),
        ("io_errors", s.io_errors),
    ]
}

pub(crate) fn segment_name(seg: &SegmentInfo) -> String {
    match seg.path.file_name() {
        Some(name) => name.to_string_lossy().into_owned(),
        None => seg.path.display().to_string(),
    }
}

pub(crate) fn stats_text(
    out: &mut impl Write,
    dir: &Path,
    inspection: &Inspection,
    stats: &Stats,
) -> Result<(), Failure> {
    let (disk, live, dead) = byte_totals(inspection);
    writeln!(out, "data directory: {}", dir.display())?;
    writeln!(out, "records:")?;
    writeln!(
        out,
        "  in progress            {:>12}",
        inspection.in_progress
    )?;
    writeln!(out, "  completed              {:>12}", inspection.completed)?;
    writeln!(out, "  expired, not swept     {:>12}", inspection.expired)?;
    writeln!(out, "segments: {}", inspection.segments.len())?;
    writeln!(
        out,
        "  {:<16} {:>12} {:>10} {:>10}  active",
        "file", "bytes", "records", "live"
    )?;
    for seg in &inspection.segments {
        writeln!(
            out,
            "  {:<16} {:>12} {:>10} {:>10}  {}",
            segment_name(seg),
            seg.bytes,
            seg.records,
            seg.live_records,
            if seg.active { "yes" } else { "no" }
        )?;
    }
    writeln!(
        out,
        "bytes (live: each segment's size times its live fraction):"
    )?;
    writeln!(out, "  on disk                {disk:>12}")?;
    writeln!(out, "  live, estimated        {live:>12}")?;
    writeln!(out, "  dead, estimated        {dead:>12}")?;
    writeln!(out, "counters (of this command's engine, since it opened):")?;
    for (name, value) in counters(stats) {
        writeln!(out, "  {name:<22} {value:>12}")?;
    }
    Ok(())
}

pub(crate) fn stats_json(
    out: &mut impl Write,
    dir: &Path,
    inspection: &Inspection,
    stats: &Stats,
) -> Result<(), Failure> {
    let (disk, live, dead) = byte_totals(inspection);
    let mut records = JsonObject::new();
    records.num("in_progress", inspection.in_progress);
    records.num("completed", inspection.completed);
    records.num("expired", inspection.expired);
    let segments: Vec<String> = inspection
        .segments
        .iter()
        .map(|seg| {
            let mut obj = JsonObject::new();
            obj.num("file", seg.file);
            obj.string("name", &segment_name(seg));
            obj.num("bytes", seg.bytes);
            obj.num("records", seg.records);
            obj.num("live_records", seg.live_records);
            obj.raw("active", if seg.active { "true" } else { "false" });
            obj.finish()
        })
        .collect();
    let mut bytes = JsonObject::new();
    bytes.num("disk", disk);
    bytes.num("live_estimate", live);
    bytes.num("dead_estimate", dead);
    let mut counters_obj = JsonObject::new();
    for (name, value) in counters(stats) {
        counters_obj.num(name, value);
    }
    let mut obj = JsonObject::new();
    obj.string("dir", &dir.to_string_lossy());
    obj.raw("records", &records.finish());
    obj.raw("segments", &format!("[{}]", segments.join(",")));
    obj.raw("bytes", &bytes.finish());
    obj.raw("stats", &counters_obj.finish());
    writeln!(out, "{}", obj.finish())?;
    Ok(())
}

// ---------------------------------------------------------------- compact

pub(crate) fn compact_text(
    out: &mut impl Write,
    dir: &Path,
    report: &CompactionReport,
) -> Result<(), Failure> {
    writeln!(out, "compacted {}:", dir.display())?;
    writeln!(out, "  expired records swept  {:>12}", report.expired)?;
    writeln!(
        out,
        "  segments compacted     {:>12}",
        report.segments_compacted
    )?;
    writeln!(out, "  records kept           {:>12}", report.records_kept)?;
    writeln!(
        out,
        "  records dropped        {:>12}",
        report.records_dropped
    )?;
    writeln!(
        out,
        "  records resealed       {:>12}",
        report.records_resealed
    )?;
    writeln!(out, "  bytes before           {:>12}", report.bytes_before)?;
    writeln!(out, "  bytes after            {:>12}", report.bytes_after)?;
    writeln!(
        out,
        "  duration               {:>9.3} ms",
        report.duration.as_secs_f64() * 1000.0
    )?;
    Ok(())
}

// ---------------------------------------------------------------- formats

pub(crate) fn state_name(state: RecordState) -> &'static str {
    match state {
        RecordState::InProgress => "in_progress",
        RecordState::Completed => "completed",
    }
}

/// Bytes as text if UTF-8, else `hex:` and lowercase hex.
pub(crate) fn text_or_hex(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_owned(),
        Err(_) => format!("hex:{}", hex(bytes)),
    }
}

/// Lowercase hex, two digits a byte.
pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(nibble(b >> 4));
        s.push(nibble(b & 0x0f));
    }
    s
}

pub(crate) fn nibble(n: u8) -> char {
    char::from_digit(u32::from(n), 16).unwrap_or('?')
}

/// A JSON string literal, quotes included (RFC 8259 escaping).
pub(crate) fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if u32::from(c) < 0x20 => {
                // A control character: one byte, so the cast is exact.
                let b = c as u8;
                out.push_str("\\u00");
                out.push(nibble(b >> 4));
                out.push(nibble(b & 0x0f));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A JSON object built field by field, in insertion order.
pub(crate) struct JsonObject {
    buf: String,
}

impl JsonObject {
    fn new() -> JsonObject {
        JsonObject {
            buf: String::from("{"),
        }
    }

    /// A field whose value is already JSON.
    fn raw(&mut self, name: &str, value: &str) {
        if self.buf.len() > 1 {
            self.buf.push(',');
        }
        self.buf.push_str(&json_string(name));
        self.buf.push(':');
        self.buf.push_str(value);
    }

    fn string(&mut self, name: &str, value: &str) {
        self.raw(name, &json_string(value));
    }

    fn num(&mut self, name: &str, value: u64) {
        self.raw(name, &value.to_string());
    }

    fn opt_num(&mut self, name: &str, value: Option<u64>) {
        match value {
            Some(v) => self.num(name, v),
            None => self.raw(name, "null"),
        }
    }

    /// `name` as a string if `value` is UTF-8, else `name_hex` as hex.
    fn bytes(&mut self, name: &str, value: &[u8]) {
        match std::str::from_utf8(value) {
            Ok(text) => self.string(name, text),
            Err(_) => self.string(&format!("{name}_hex"), &hex(value)),
        }
    }

    fn finish(mut self) -> String {
        self.buf.push('}');
        self.buf
    }
}

/// `ms` since the Unix epoch as UTC: `2100-01-01T00:00:30.000Z`.
pub(crate) fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, day_secs) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        day_secs / 3600,
        day_secs % 3600 / 60,
        day_secs % 60,
        ms % 1000
    )
}

/// Year, month and day of the `days`-th day after 1970-01-01 (Howard
/// Hinnant's `civil_from_days`, for days on or after the epoch).
pub(crate) fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(utc(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(utc(4_102_444_830_000), "2100-01-01T00:00:30.000Z");
        assert_eq!(utc(4_107_542_399_999), "2100-02-28T23:59:59.999Z");
        assert_eq!(utc(4_107_542_400_000), "2100-03-01T00:00:00.000Z");
    }

    #[test]
    fn json_strings_escape_quotes_backslashes_and_controls() {
        assert_eq!(
            json_string("a\"b\\c\nd\te\u{1}f\u{7f}é"),
            "\"a\\\"b\\\\c\\nd\\te\\u0001f\u{7f}é\""
        );
    }

    #[test]
    fn bytes_that_are_not_utf8_go_to_a_hex_field() {
        let mut obj = JsonObject::new();
        obj.bytes("body", b"ok");
        obj.bytes("user", &[0xff, 0x00, 0x41]);
        assert_eq!(obj.finish(), r#"{"body":"ok","user_hex":"ff0041"}"#);
    }
}
