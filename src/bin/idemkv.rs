//! `idemkv`: the operator CLI for an idemkv data directory.
//!
//! ```sh
//! cargo run --release --features cli --bin idemkv -- verify DIR
//! ```
//!
//! Commands: `stats` (records by state, segments, live and dead bytes,
//! counters; `--json` for one JSON object), `verify` (a read-only check of
//! every record), `get` (one record and its body), `dump` (every live record
//! as JSON lines) and `compact` (a full sweep and compaction).
//!
//! # Output conventions
//! - JSON is written by hand (no serde). A byte string that is valid UTF-8
//!   is a JSON string, escaped per RFC 8259 (`\"`, `\\`, `\n`, `\r`, `\t`,
//!   `\b`, `\f`, other control characters as `\u00XX`). A byte string that
//!   is not valid UTF-8 is written as lowercase hex under the field name
//!   with `_hex` appended (`user_hex`, `key_hex`, `body_hex`), never as a
//!   lossy string.
//! - Deadlines are milliseconds since the Unix epoch; the text output adds
//!   the UTC time (`2100-01-01T00:00:30.000Z`).
//! - Errors are one line on stderr; the exit codes are in [`LONG_ABOUT`].

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::indexing_slicing))]

use std::ffi::{OsStr, OsString};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use idemkv::{
    CompactionReport, CorruptKind, Engine, Error, Inspection, Options, RecordDump, RecordState,
    RecordView, SegmentInfo, Stats, VerifyReport,
};

/// Success.
const EXIT_OK: u8 = 0;
/// Any error other than corruption: a missing or locked directory, I/O, a
/// rejected argument.
const EXIT_ERROR: u8 = 1;
/// The log holds damaged bytes (not a torn tail).
const EXIT_CORRUPT: u8 = 2;
/// `get`: no live record for the user and key.
const EXIT_NOT_FOUND: u8 = 3;
/// The command line did not parse (sysexits' `EX_USAGE`).
const EXIT_USAGE: u8 = 64;

/// The `--help` text: what the commands touch, and the exit codes.
const LONG_ABOUT: &str = "\
Inspect and maintain an idemkv data directory.

Every command except `verify` opens the directory as an engine (no
background thread, Durability::Sync). Like any open, this cuts off a torn
tail left by a crash, and it fails if a running engine holds the directory.
These commands refuse a directory that holds no segment file (*.log), so a
mistyped path is never turned into a new data directory. `verify` only
reads (it holds the directory lock while it does).

JSON output (`stats --json`, `dump`) is written by hand: byte strings that
are valid UTF-8 are JSON strings; others are lowercase hex under a field
name ending in `_hex` (`user_hex`, `key_hex`, `body_hex`).

Exit codes:
  0   success (verify: no corruption; a torn tail is reported, but it is
      not corruption)
  1   error: no such directory, directory locked by a running engine, I/O
      error, rejected user id or key
  2   corruption: damaged bytes in the log; stderr names the file and
      offset (`corrupt: <file> at offset <n>: <kind>`)
  3   get: no live record for that user and key
  64  the command line did not parse";

/// The operator CLI for an idemkv data directory.
#[derive(Debug, Parser)]
#[command(name = "idemkv", version, about, long_about = LONG_ABOUT)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Records by state, segments, live and dead bytes, and the counters.
    Stats {
        /// The data directory.
        dir: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check every record's checksum and layout without changing anything.
    ///
    /// Exit 0 if healthy (a torn tail is reported, but is not corruption),
    /// 2 on corruption (stderr names the file and offset), 1 on other errors.
    Verify {
        /// The data directory.
        dir: PathBuf,
    },
    /// Show one record: state, token, deadlines, status and body.
    ///
    /// The body is printed as is if it is UTF-8, else as hex. Exit 3 if
    /// there is no live record for the user and key.
    Get {
        /// The data directory.
        dir: PathBuf,
        /// The user id (the key's scope; may be empty).
        user: OsString,
        /// The idempotency key.
        key: OsString,
    },
    /// Print every live record as one JSON object per line (in no
    /// particular order).
    Dump {
        /// The data directory.
        dir: PathBuf,
        /// Only the records of this user id.
        #[arg(long)]
        user: Option<OsString>,
    },
    /// Sweep expired records and rewrite every segment holding dead ones.
    Compact {
        /// The data directory.
        dir: PathBuf,
    },
}

/// Why a command failed; each kind has its own exit code.
#[derive(Debug)]
enum Failure {
    /// Exit 1 with this message.
    Error(String),
    /// Exit 2: damage in the log.
    Corrupt {
        file: PathBuf,
        offset: u64,
        kind: CorruptKind,
    },
    /// Exit 3 with this message.
    NotFound(String),
}

impl From<Error> for Failure {
    fn from(err: Error) -> Failure {
        match err {
            Error::Corrupt { file, offset, kind } => Failure::Corrupt { file, offset, kind },
            Error::Locked { dir } => {
                Failure::Error(format!("{} is locked by a running engine", dir.display()))
            }
            other => Failure::Error(with_sources(&other)),
        }
    }
}

impl From<io::Error> for Failure {
    fn from(err: io::Error) -> Failure {
        Failure::Error(format!("cannot write the output: {err}"))
    }
}

impl Failure {
    /// Prints the one-line message on stderr and gives the exit code.
    fn report(self) -> ExitCode {
        let (code, line) = match self {
            Failure::Error(msg) => (EXIT_ERROR, format!("error: {msg}")),
            Failure::Corrupt { file, offset, kind } => {
                let file = if file.as_os_str().is_empty() {
                    "<unknown file>".to_owned()
                } else {
                    file.display().to_string()
                };
                (
                    EXIT_CORRUPT,
                    format!("corrupt: {file} at offset {offset}: {kind}"),
                )
            }
            Failure::NotFound(msg) => (EXIT_NOT_FOUND, format!("not found: {msg}")),
        };
        // Nothing more to do if stderr itself is gone.
        let _ = writeln!(io::stderr().lock(), "{line}");
        ExitCode::from(code)
    }
}

/// An error and its sources on one line: `a: b: c`.
fn with_sources(err: &dyn std::error::Error) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // `--help` and `--version` are not errors.
            let code = if e.use_stderr() { EXIT_USAGE } else { EXIT_OK };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    let result = run(cli.command, &mut out).and_then(|()| out.flush().map_err(Failure::from));
    match result {
        Ok(()) => ExitCode::from(EXIT_OK),
        Err(failure) => {
            // Whatever was printed before the failure goes out first.
            let _ = out.flush();
            failure.report()
        }
    }
}

fn run(command: Command, out: &mut impl Write) -> Result<(), Failure> {
    match command {
        Command::Stats { dir, json } => {
            let engine = open(&dir)?;
            let inspection = engine.inspect();
            let stats = engine.stats();
            engine.close()?;
            if json {
                stats_json(out, &dir, &inspection, &stats)
            } else {
                stats_text(out, &dir, &inspection, &stats)
            }
        }
        Command::Verify { dir } => {
            require_dir(&dir)?;
            let report = idemkv::verify(&dir)?;
            verify_text(out, &dir, &report)
        }
        Command::Get { dir, user, key } => {
            let engine = open(&dir)?;
            let (user, key) = (user.as_encoded_bytes(), key.as_encoded_bytes());
            let view = engine.get(user, key)?;
            let body = match view {
                Some(v) if v.state == RecordState::Completed => {
                    engine.outcome(user, key)?.map(|o| o.body)
                }
                _ => None,
            };
            engine.close()?;
            let Some(view) = view else {
                return Err(Failure::NotFound(format!(
                    "no live record for user {} and key {}",
                    text_or_hex(user),
                    text_or_hex(key)
                )));
            };
            get_text(out, user, key, &view, body.as_deref())
        }
        Command::Dump { dir, user } => {
            let engine = open(&dir)?;
            let mut written: io::Result<()> = Ok(());
            engine.for_each_record(user.as_deref().map(OsStr::as_encoded_bytes), |record| {
                if written.is_ok() {
                    written = writeln!(out, "{}", dump_line(record));
                }
            })?;
            engine.close()?;
            Ok(written?)
        }
        Command::Compact { dir } => {
            let engine = open(&dir)?;
            let report = engine.compact()?;
            engine.close()?;
            compact_text(out, &dir, &report)
        }
    }
}

/// Fails unless `dir` is an existing directory.
fn require_dir(dir: &Path) -> Result<(), Failure> {
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(Failure::Error(format!(
            "{} is not a directory",
            dir.display()
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(Failure::Error(format!(
            "no data directory at {}",
            dir.display()
        ))),
        Err(e) => Err(Failure::Error(format!(
            "cannot open {}: {e}",
            dir.display()
        ))),
    }
}

/// Opens the engine on an existing data directory. Checks first, because
/// `Engine::open` creates a missing directory and an empty log.
fn open(dir: &Path) -> Result<Engine, Failure> {
    require_dir(dir)?;
    let entries = std::fs::read_dir(dir)
        .map_err(|e| Failure::Error(format!("cannot list {}: {e}", dir.display())))?;
    let mut has_segment = false;
    for entry in entries {
        let entry =
            entry.map_err(|e| Failure::Error(format!("cannot list {}: {e}", dir.display())))?;
        if entry.file_name().as_encoded_bytes().ends_with(b".log") {
            has_segment = true;
            break;
        }
    }
    if !has_segment {
        return Err(Failure::Error(format!(
            "no idemkv data in {} (no segment file *.log)",
            dir.display()
        )));
    }
    let options = Options {
        background: false,
        ..Options::default()
    };
    Ok(Engine::open(dir, options)?)
}

// ---------------------------------------------------------------- verify

fn verify_text(out: &mut impl Write, dir: &Path, report: &VerifyReport) -> Result<(), Failure> {
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

fn get_text(
    out: &mut impl Write,
    user: &[u8],
    key: &[u8],
    view: &RecordView,
    body: Option<&[u8]>,
) -> Result<(), Failure> {
    writeln!(out, "user:          {}", text_or_hex(user))?;
    writeln!(out, "key:           {}", text_or_hex(key))?;
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
fn deadline(ms: Option<u64>) -> String {
    match ms {
        Some(ms) => format!("{ms} ms ({})", utc(ms)),
        None => "-".to_owned(),
    }
}

// ---------------------------------------------------------------- dump

/// One record as a JSON object (no newline).
fn dump_line(record: &RecordDump) -> String {
    let view = &record.view;
    let mut obj = JsonObject::new();
    obj.bytes("user", &record.user);
    obj.bytes("key", &record.key);
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
fn live_bytes(seg: &SegmentInfo) -> u64 {
    if seg.records == 0 {
        return 0;
    }
    let live = u128::from(seg.live_records.min(seg.records));
    let estimate = u128::from(seg.bytes) * live / u128::from(seg.records);
    u64::try_from(estimate).unwrap_or(seg.bytes)
}

/// Bytes on disk, estimated live bytes, estimated dead bytes.
fn byte_totals(inspection: &Inspection) -> (u64, u64, u64) {
    let disk: u64 = inspection.segments.iter().map(|s| s.bytes).sum();
    let live: u64 = inspection.segments.iter().map(live_bytes).sum();
    (disk, live, disk.saturating_sub(live))
}

/// Every [`Stats`] counter with its name.
fn counters(s: &Stats) -> [(&'static str, u64); 21] {
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
    ]
}

fn segment_name(seg: &SegmentInfo) -> String {
    match seg.path.file_name() {
        Some(name) => name.to_string_lossy().into_owned(),
        None => seg.path.display().to_string(),
    }
}

fn stats_text(
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

fn stats_json(
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

fn compact_text(
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

fn state_name(state: RecordState) -> &'static str {
    match state {
        RecordState::InProgress => "in_progress",
        RecordState::Completed => "completed",
    }
}

/// Bytes as text if UTF-8, else `hex:` and lowercase hex.
fn text_or_hex(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_owned(),
        Err(_) => format!("hex:{}", hex(bytes)),
    }
}

/// Lowercase hex, two digits a byte.
fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(nibble(b >> 4));
        s.push(nibble(b & 0x0f));
    }
    s
}

fn nibble(n: u8) -> char {
    char::from_digit(u32::from(n), 16).unwrap_or('?')
}

/// A JSON string literal, quotes included (RFC 8259 escaping).
fn json_string(s: &str) -> String {
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
struct JsonObject {
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
fn utc(ms: u64) -> String {
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
fn civil_from_days(days: u64) -> (u64, u64, u64) {
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
