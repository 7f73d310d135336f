//! The operator CLI (`src/bin/idemkv.rs`), run as a process against data
//! directories the library wrote.
//!
//! The records are written under a manual clock set to 2100-01-01, so they
//! are still live when the CLI reads them with the system clock, and every
//! deadline the CLI prints is a known value. One record is written at 2001
//! and has long expired: no command may show it.
//!
//! The tests run one at a time ([`serial`]): a child process forked by one
//! test briefly inherits the directory-lock descriptor of an engine another
//! test holds (until its `exec`), and an `open` in that window would see
//! the directory as locked.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use idemkv::{Begin, Durability, Engine, Fingerprint, ManualClock, Options, Outcome};

/// 2100-01-01T00:00:00Z: when the live records were written.
const T0: u64 = 4_102_444_800_000;
/// 2001-09-09T01:46:40Z: when the expired record was written.
const OLD: u64 = 1_000_000_000_000;

/// The completed records `populate` writes: user, key, status, body.
const COMPLETED: [(&[u8], &str, u16, &[u8]); 5] = [
    (b"a", "k1", 201, b"charged"),
    (b"a", "k2", 200, b"say \"hi\"\n\ttab\\ end"),
    (b"b", "k1", 200, b"b's body"),
    (b"b", "bin", 200, &[0xff, 0x00, 0x41]),
    (&[0xff, b'u'], "k", 204, b""),
];

/// The `dump` line of every live record `populate` leaves, sorted.
const DUMP: [&str; 6] = [
    r#"{"user":"a","key":"k1","derived":false,"state":"completed","token":1048577,"lease_expires_at_ms":null,"expires_at_ms":4102531200000,"status":201,"fingerprint":"3f02cbbe837576ca81afbf86b72a36c5","body":"charged"}"#,
    r#"{"user":"a","key":"k2","derived":false,"state":"completed","token":1048578,"lease_expires_at_ms":null,"expires_at_ms":4102531200000,"status":200,"fingerprint":"a1a457543d344da1d432ac1f4882e181","body":"say \"hi\"\n\ttab\\ end"}"#,
    r#"{"user":"a","key":"pending","derived":false,"state":"in_progress","token":1048582,"lease_expires_at_ms":4102444830000,"expires_at_ms":null,"status":null,"fingerprint":"456aa137600852292bde81750deadbfd","body":null}"#,
    r#"{"user":"b","key":"bin","derived":false,"state":"completed","token":1048580,"lease_expires_at_ms":null,"expires_at_ms":4102531200000,"status":200,"fingerprint":"b824dd863159c42be55f229e1ff2dc15","body_hex":"ff0041"}"#,
    r#"{"user":"b","key":"k1","derived":false,"state":"completed","token":1048579,"lease_expires_at_ms":null,"expires_at_ms":4102531200000,"status":200,"fingerprint":"3f02cbbe837576ca81afbf86b72a36c5","body":"b's body"}"#,
    r#"{"user_hex":"ff75","key":"k","derived":false,"state":"completed","token":1048581,"lease_expires_at_ms":null,"expires_at_ms":4102531200000,"status":204,"fingerprint":"04c37d9993e28be6a921e3704fda881d","body":""}"#,
];

/// Records in the segment after `populate`: a begin and a complete per
/// completed key (the expired one included), one begin, and the token
/// reservation each of the two engines wrote before its first lease.
const RECORDS: u64 = 2 * 6 + 1 + 2;

fn options(clock_ms: u64) -> Options {
    Options {
        durability: Durability::Sync,
        background: false,
        clock: Arc::new(ManualClock::new(clock_ms)),
        ..Options::default()
    }
}

fn started(engine: &Engine, user: &[u8], key: &str) -> idemkv::Lease {
    match engine
        .begin(user, key, Fingerprint::of(key.as_bytes()))
        .unwrap()
    {
        Begin::Started(lease) => lease,
        other => panic!("{key}: {other:?}"),
    }
}

/// One record completed at 2001 (expired now), the five of [`COMPLETED`]
/// and one in progress ("a", "pending") written at 2100.
fn populate(dir: &Path) {
    let old = Engine::open(dir, options(OLD)).unwrap();
    let lease = started(&old, b"a", "old");
    old.complete(
        &lease,
        Outcome {
            status: 200,
            body: "old".into(),
        },
    )
    .unwrap();
    old.close().unwrap();

    let engine = Engine::open(dir, options(T0)).unwrap();
    for (user, key, status, body) in COMPLETED {
        let lease = started(&engine, user, key);
        let body = bytes::Bytes::copy_from_slice(body);
        engine.complete(&lease, Outcome { status, body }).unwrap();
    }
    let pending = started(&engine, b"a", "pending");
    // Tokens resume above the first engine's reservation (1 + 2^20).
    assert_eq!(
        (pending.token(), pending.expires_at_ms()),
        (1_048_582, T0 + 30_000)
    );
    engine.close().unwrap();
}

/// Holds the other tests of this file off until the returned guard drops.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A populated data directory.
fn populated() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    populate(dir.path());
    dir
}

/// The one segment file of a directory `populate` wrote.
fn segment(dir: &Path) -> PathBuf {
    let seg = dir.join("000001.log");
    assert!(seg.is_file(), "{} is missing", seg.display());
    seg
}

/// What one run of the CLI did.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn idemkv<S: AsRef<OsStr>>(args: impl IntoIterator<Item = S>) -> Run {
    let output = Command::new(env!("CARGO_BIN_EXE_idemkv"))
        .args(args)
        .output()
        .unwrap();
    Run {
        code: output.status.code(),
        stdout: String::from_utf8(output.stdout).unwrap(),
        stderr: String::from_utf8(output.stderr).unwrap(),
    }
}

fn arg(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// The number at the end of the line of `text` that starts with `label`.
fn field(text: &str, label: &str) -> u64 {
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with(label))
        .unwrap_or_else(|| panic!("no {label:?} in:\n{text}"));
    line.split_whitespace().last().unwrap().parse().unwrap()
}

fn sorted_lines(text: &str) -> Vec<&str> {
    let mut lines: Vec<&str> = text.lines().collect();
    lines.sort_unstable();
    lines
}

// ---------------------------------------------------------------- verify

#[test]
fn verify_exits_0_on_a_healthy_directory_and_counts_its_records() {
    let _serial = serial();
    let dir = populated();
    let bytes = fs::metadata(segment(dir.path())).unwrap().len();
    let run = idemkv(["verify", arg(dir.path())]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(
        run.stdout,
        format!(
            "ok: {}: no corruption (segments: 1, records: {RECORDS}, bytes: {bytes})\n\
             torn tail: none\n",
            dir.path().display()
        )
    );
    assert_eq!(run.stderr, "");
}

#[test]
fn verify_exits_2_naming_the_file_and_offset_of_a_flipped_byte() {
    let _serial = serial();
    let dir = populated();
    let seg = segment(dir.path());
    let mut bytes = fs::read(&seg).unwrap();
    bytes[70] ^= 0x20; // inside the first record, which starts after the 56-byte header
    fs::write(&seg, &bytes).unwrap();

    let run = idemkv(["verify", arg(dir.path())]);
    assert_eq!(run.code, Some(2), "{run:?}");
    assert_eq!(
        run.stderr,
        format!(
            "corrupt: {} at offset 56: record checksum mismatch\n",
            seg.display()
        )
    );
    assert_eq!(run.stdout, "");
    assert_eq!(fs::read(&seg).unwrap(), bytes, "verify must not repair");
}

#[test]
fn commands_that_open_the_engine_exit_2_on_corruption() {
    let _serial = serial();
    let dir = populated();
    let seg = segment(dir.path());
    let mut bytes = fs::read(&seg).unwrap();
    bytes[70] ^= 0x20;
    fs::write(&seg, &bytes).unwrap();
    let d = arg(dir.path());
    for args in [
        vec!["stats", d],
        vec!["get", d, "a", "k1"],
        vec!["dump", d],
        vec!["compact", d],
    ] {
        let run = idemkv(&args);
        assert_eq!(run.code, Some(2), "{args:?}: {run:?}");
        assert!(
            run.stderr
                .starts_with(&format!("corrupt: {} at offset ", seg.display())),
            "{args:?}: {run:?}"
        );
        assert_eq!(run.stderr.lines().count(), 1, "{args:?}: {run:?}");
    }
    assert_eq!(fs::read(&seg).unwrap(), bytes);
}

#[test]
fn verify_reports_a_torn_tail_and_still_exits_0() {
    let _serial = serial();
    let dir = populated();
    let seg = segment(dir.path());
    let len = fs::metadata(&seg).unwrap().len();
    let mut f = fs::OpenOptions::new().append(true).open(&seg).unwrap();
    std::io::Write::write_all(&mut f, &[0xEE; 30]).unwrap();
    drop(f);

    let run = idemkv(["verify", arg(dir.path())]);
    assert_eq!(run.code, Some(0), "{run:?}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{run:?}");
    assert_eq!(
        lines[0],
        format!(
            "ok: {}: no corruption (segments: 1, records: {RECORDS}, bytes: {})",
            dir.path().display(),
            len + 30
        )
    );
    assert!(
        lines[1].starts_with(&format!("torn tail: {} at offset {len} (", seg.display())),
        "{run:?}"
    );
    assert!(lines[1].contains("not corruption"), "{run:?}");
    assert_eq!(
        fs::metadata(&seg).unwrap().len(),
        len + 30,
        "verify must not truncate"
    );
}

// ---------------------------------------------------------------- get

#[test]
fn get_prints_state_deadlines_and_the_exact_body() {
    let _serial = serial();
    let dir = populated();
    let d = arg(dir.path());

    let run = idemkv(["get", d, "a", "k2"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(
        run.stdout,
        "user:          a\n\
         key:           k2\n\
         state:         completed\n\
         token:         1048578\n\
         lease expires: -\n\
         expires:       4102531200000 ms (2100-01-02T00:00:00.000Z)\n\
         status:        200\n\
         body:          18 bytes, UTF-8:\n\
         say \"hi\"\n\ttab\\ end\n"
    );

    let run = idemkv(["get", d, "b", "bin"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(
        run.stdout.ends_with(
            "status:        200\n\
             body:          3 bytes, not UTF-8, hex:\n\
             ff0041\n"
        ),
        "{run:?}"
    );

    let run = idemkv(["get", d, "a", "pending"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(
        run.stdout,
        "user:          a\n\
         key:           pending\n\
         state:         in_progress\n\
         token:         1048582\n\
         lease expires: 4102444830000 ms (2100-01-01T00:00:30.000Z)\n\
         expires:       -\n\
         status:        -\n\
         body:          - (in progress)\n"
    );
}

#[cfg(unix)]
#[test]
fn get_takes_a_user_id_that_is_not_utf8() {
    let _serial = serial();
    use std::os::unix::ffi::OsStrExt;
    let dir = populated();
    let user = OsStr::from_bytes(&[0xff, b'u']);
    let run = idemkv([
        OsStr::new("get"),
        dir.path().as_os_str(),
        user,
        OsStr::new("k"),
    ]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(
        run.stdout.starts_with("user:          hex:ff75\n"),
        "{run:?}"
    );
    assert!(
        run.stdout
            .ends_with("status:        204\nbody:          0 bytes, UTF-8:\n\n"),
        "{run:?}"
    );
}

#[test]
fn get_exits_3_when_the_record_is_absent_or_expired() {
    let _serial = serial();
    let dir = populated();
    let d = arg(dir.path());
    for key in ["nope", "old"] {
        let run = idemkv(["get", d, "a", key]);
        assert_eq!(run.code, Some(3), "{key}: {run:?}");
        assert_eq!(run.stdout, "");
        assert_eq!(
            run.stderr,
            format!("not found: no live record for user a and key {key}\n")
        );
    }
    // A key the engine rejects is an error, not an absent record.
    let run = idemkv(["get", d, "a", "has space"]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert_eq!(
        run.stderr,
        "error: invalid idempotency key: byte 0x20 at index 3 is not visible ASCII\n"
    );
}

// ---------------------------------------------------------------- dump

#[test]
fn dump_prints_one_json_line_per_live_record() {
    let _serial = serial();
    let dir = populated();
    let run = idemkv(["dump", arg(dir.path())]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.stderr, "");
    assert!(run.stdout.ends_with('\n'));
    assert_eq!(sorted_lines(&run.stdout), DUMP);
    for line in run.stdout.lines() {
        assert_json_object(line);
    }
}

#[test]
fn dump_with_a_user_prints_only_that_users_records() {
    let _serial = serial();
    let dir = populated();
    let run = idemkv(["dump", arg(dir.path()), "--user", "b"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(sorted_lines(&run.stdout), DUMP[3..5]);
    let run = idemkv(["dump", arg(dir.path()), "--user", "nobody"]);
    assert_eq!((run.code, run.stdout.as_str()), (Some(0), ""));
}

/// Checks that `line` is one JSON object whose values are strings, numbers,
/// booleans or null (all that `dump` writes), with only the escapes JSON allows.
fn assert_json_object(line: &str) {
    let b = line.as_bytes();
    let mut i = 0;
    let string = |i: &mut usize| {
        assert_eq!(b[*i], b'"', "{line} at {i}");
        *i += 1;
        loop {
            match b[*i] {
                b'"' => break,
                b'\\' => {
                    *i += 1;
                    match b[*i] {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {}
                        b'u' => {
                            assert!(b[*i + 1..*i + 5].iter().all(u8::is_ascii_hexdigit));
                            *i += 4;
                        }
                        other => panic!("bad escape {other} in {line}"),
                    }
                }
                c => assert!(c >= 0x20, "raw control byte in {line}"),
            }
            *i += 1;
        }
        *i += 1;
    };
    assert_eq!(b[i], b'{');
    i += 1;
    loop {
        string(&mut i);
        assert_eq!(b[i], b':', "{line} at {i}");
        i += 1;
        if b[i] == b'"' {
            string(&mut i);
        } else if line[i..].starts_with("null") || line[i..].starts_with("true") {
            i += 4;
        } else if line[i..].starts_with("false") {
            i += 5;
        } else {
            let start = i;
            while b[i].is_ascii_digit() {
                i += 1;
            }
            assert!(i > start, "{line} at {i}");
        }
        match b[i] {
            b',' => i += 1,
            b'}' => break,
            other => panic!("unexpected {other} in {line} at {i}"),
        }
    }
    assert_eq!(i + 1, b.len(), "trailing bytes in {line}");
}

// ---------------------------------------------------------------- stats

#[test]
fn stats_reports_records_by_state_segments_and_bytes() {
    let _serial = serial();
    let dir = populated();
    let seg_bytes = fs::metadata(segment(dir.path())).unwrap().len();
    // Six index entries (five completed, one in progress) of 15 records.
    let live = seg_bytes * 6 / RECORDS;

    let run = idemkv(["stats", arg(dir.path())]);
    assert_eq!(run.code, Some(0), "{run:?}");
    let text = &run.stdout;
    assert_eq!(field(text, "in progress"), 1);
    assert_eq!(field(text, "completed"), 5);
    assert_eq!(field(text, "expired, not swept"), 0);
    assert_eq!(field(text, "segments:"), 1);
    let row: Vec<&str> = text
        .lines()
        .find(|l| l.trim_start().starts_with("000001.log"))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        row,
        [
            "000001.log",
            &seg_bytes.to_string(),
            &RECORDS.to_string(),
            "6",
            "yes"
        ]
    );
    assert_eq!(field(text, "on disk"), seg_bytes);
    assert_eq!(field(text, "live, estimated"), live);
    assert_eq!(field(text, "dead, estimated"), seg_bytes - live);
    assert_eq!(field(text, "live_records"), 6);
    assert_eq!(field(text, "disk_bytes"), seg_bytes);

    let run = idemkv(["stats", "--json", arg(dir.path())]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(
        run.stdout,
        format!(
            concat!(
                r#"{{"dir":"{dir}","#,
                r#""records":{{"in_progress":1,"completed":5,"expired":0}},"#,
                r#""segments":[{{"file":1,"name":"000001.log","bytes":{bytes},"records":{records},"live_records":6,"active":true}}],"#,
                r#""bytes":{{"disk":{bytes},"live_estimate":{live},"dead_estimate":{dead}}},"#,
                r#""stats":{{"begins":0,"started":0,"replays":0,"in_flight":0,"mismatches":0,"takeovers":0,"#,
                r#""lease_lost":0,"expirations":0,"completions":0,"releases":0,"bytes_written":0,"#,
                r#""records_written":0,"fsyncs":0,"live_records":6,"segments":1,"swept":0,"#,
                r#""segments_compacted":0,"bytes_reclaimed":0,"last_compaction_us":0,"#,
                r#""disk_bytes":{bytes},"live_bytes":0,"compaction_errors":0,"compactions":0,"io_errors":0}}}}"#,
                "\n"
            ),
            dir = dir.path().display(),
            bytes = seg_bytes,
            records = RECORDS,
            live = live,
            dead = seg_bytes - live,
        )
    );
}

// ---------------------------------------------------------------- compact

#[test]
fn compact_rewrites_the_segment_and_keeps_every_live_record() {
    let _serial = serial();
    let dir = populated();
    let before = fs::metadata(segment(dir.path())).unwrap().len();
    let run = idemkv(["compact", arg(dir.path())]);
    assert_eq!(run.code, Some(0), "{run:?}");
    let text = &run.stdout;
    assert_eq!(field(text, "segments compacted"), 1);
    // The six live records stay, and so do the five begins they superseded:
    // their leases' deadlines (written in 2100) are still ahead, so each is
    // kept as a tombstone. Both records of the key that expired in 2001 go,
    // and so do the two token reservations (the segment headers carry them).
    assert_eq!(field(text, "records kept"), 11);
    assert_eq!(field(text, "records dropped"), 4);
    assert_eq!(field(text, "bytes before"), before);
    let on_disk: u64 = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .map(|p| fs::metadata(p).unwrap().len())
        .sum();
    assert_eq!(field(text, "bytes after"), on_disk);
    assert!(on_disk < before, "{run:?}");

    let run = idemkv(["dump", arg(dir.path())]);
    assert_eq!(sorted_lines(&run.stdout), DUMP);
    let run = idemkv(["verify", arg(dir.path())]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.contains("records: 11,"), "{run:?}");
}

// ---------------------------------------------------------------- errors

#[test]
fn a_missing_directory_is_reported_and_not_created() {
    let _serial = serial();
    let parent = tempfile::tempdir().unwrap();
    let missing = parent.path().join("nope");
    let m = arg(&missing);
    for args in [
        vec!["verify", m],
        vec!["stats", m],
        vec!["get", m, "a", "k1"],
        vec!["dump", m],
        vec!["compact", m],
    ] {
        let run = idemkv(&args);
        assert_eq!(run.code, Some(1), "{args:?}: {run:?}");
        assert_eq!(
            run.stderr,
            format!("error: no data directory at {}\n", missing.display())
        );
        assert!(!missing.exists(), "{args:?} created the directory");
    }
}

#[test]
fn a_directory_without_segments_is_refused_and_left_empty() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let run = idemkv(["stats", arg(dir.path())]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert_eq!(
        run.stderr,
        format!(
            "error: no idemkv data in {} (no segment file *.log)\n",
            dir.path().display()
        )
    );
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn a_directory_held_by_a_running_engine_is_reported_as_locked() {
    let _serial = serial();
    let dir = populated();
    let engine = Engine::open(dir.path(), options(T0)).unwrap();
    let d = arg(dir.path());
    for args in [
        vec!["verify", d],
        vec!["stats", d],
        vec!["get", d, "a", "k1"],
        vec!["dump", d],
        vec!["compact", d],
    ] {
        let run = idemkv(&args);
        assert_eq!(run.code, Some(1), "{args:?}: {run:?}");
        assert_eq!(
            run.stderr,
            format!(
                "error: {} is locked by a running engine\n",
                dir.path().display()
            ),
            "{args:?}"
        );
        assert_eq!(run.stdout, "");
    }
    engine.close().unwrap();
    assert_eq!(idemkv(["verify", d]).code, Some(0));
}

#[test]
fn help_documents_the_exit_codes_and_bad_usage_exits_64() {
    let _serial = serial();
    let run = idemkv(["--help"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    for line in [
        "Exit codes:",
        "  0   success",
        "  1   error",
        "  2   corruption",
        "  3   get: no live record",
        "  64  the command line did not parse",
    ] {
        assert!(
            run.stdout.contains(line),
            "{line:?} missing from:\n{}",
            run.stdout
        );
    }
    let run = idemkv(["frobnicate"]);
    assert_eq!(run.code, Some(64), "{run:?}");
    let run = idemkv(["get", "dir-only"]);
    assert_eq!(run.code, Some(64), "{run:?}");
}
