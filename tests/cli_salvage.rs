//! `idemkv salvage DIR` (issue 14, section 4): what it prints, its exit
//! codes, a directory a running engine holds refused, a path without
//! segment files refused, and an interrupted salvage that every other
//! command refuses until `salvage` finishes it.
//!
//! The tests run one at a time ([`serial`]), as in `tests/cli.rs`: a child
//! forked by one test briefly inherits the directory lock another holds.

#[path = "common/salvage_store.rs"]
mod salvage_store;

use std::io;
use std::path::Path;
use std::process::{Command, Output};

use idemkv::storage::{Fault, SimDisk, SimOp, Tear};
use salvage_store::{build, files};

fn serial() -> std::sync::MutexGuard<'static, ()> {
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE.lock().unwrap_or_else(|e| e.into_inner())
}

fn idemkv(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_idemkv"))
        .args(args)
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// Writes every file of `disk` into `dir`.
fn copy(disk: &SimDisk, dir: &Path) {
    for name in disk.names() {
        std::fs::write(dir.join(&name), disk.read_file(&name).unwrap()).unwrap();
    }
}

/// The store with the body of one completed record damaged: its file name,
/// the record's offset and length, and its key.
fn damaged() -> (SimDisk, String, usize, usize, String) {
    let store = build();
    let files = files(&store.disk);
    let (file, range, key) = files
        .iter()
        .find_map(|f| {
            let (r, k) = f
                .frames
                .iter()
                .find(|(r, k)| k.is_some() && f.bytes[r.start + 8] == 2)?;
            Some((f, r.clone(), k.clone()?))
        })
        .unwrap();
    let disk = store.disk.crash(Tear::Clean);
    let mut bytes = file.bytes.clone();
    bytes[range.end - 1] ^= 1;
    disk.write_file(&file.name, &bytes);
    (disk, file.name.clone(), range.start, range.len(), key)
}

#[test]
fn salvage_prints_what_it_kept_and_dropped_and_leaves_a_directory_that_verifies() {
    let _one = serial();
    let (disk, name, offset, len, key) = damaged();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    std::fs::create_dir(&dir).unwrap();
    copy(&disk, &dir);
    let d = dir.to_str().unwrap();

    let verify = idemkv(&["verify", d]);
    assert_eq!(verify.status.code(), Some(2), "{verify:?}");
    assert_eq!(
        text(&verify.stderr),
        format!("corrupt: {d}/{name} at offset {offset}: record checksum mismatch\n")
    );

    // Held by a running engine (its lock): refused, nothing changed.
    let lock = idemkv::storage::FsStorage::open(&dir).unwrap();
    let locked = idemkv(&["salvage", d]);
    assert_eq!(locked.status.code(), Some(1), "{locked:?}");
    assert_eq!(
        text(&locked.stderr),
        format!("error: {d} is locked by a running engine\n")
    );
    assert!(locked.stdout.is_empty());
    drop(lock);

    let run = idemkv(&["salvage", d]);
    assert_eq!(run.status.code(), Some(0), "{run:?}");
    assert!(run.stderr.is_empty(), "{run:?}");
    let stdout = text(&run.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    let segments = files(&disk).len();
    assert_eq!(
        lines[0],
        format!(
            "salvaged {d}: rewrote 2 of {segments} segment files, quarantined 1 damaged range ({len} bytes)"
        ),
        "{stdout}"
    );
    assert!(
        lines[1].starts_with(&format!("segment {name}: header intact; kept "))
            && lines[1].ends_with(", dropped 1 record"),
        "{stdout}"
    );
    assert_eq!(
        lines[2],
        format!(
            "  quarantined offset {offset}, {len} bytes (record checksum mismatch, 1 record): {d}/{name}.{offset:x}.quarantine"
        )
    );
    assert_eq!(
        lines[3],
        format!(
            "  affected: user shop-1 key {key} (from a damaged record: its ids may be damaged too)"
        )
    );
    assert!(
        lines[4].ends_with("dropped 0 records (rewritten for the token floor)"),
        "{stdout}"
    );
    assert!(
        lines[5].starts_with("total: kept ")
            && lines[5].ends_with(&format!(
                ", dropped 1 record, quarantined {len} bytes in 1 range"
            )),
        "{stdout}"
    );
    assert!(
        lines[6].starts_with("fencing tokens resume at "),
        "{stdout}"
    );
    assert_eq!(lines.len(), 7, "{stdout}");
    let quarantine = std::fs::read(dir.join(format!("{name}.{offset:x}.quarantine"))).unwrap();
    assert_eq!(quarantine.len(), len);

    let verify = idemkv(&["verify", d]);
    assert_eq!(verify.status.code(), Some(0), "{verify:?}");
    let again = idemkv(&["salvage", d]);
    assert_eq!(again.status.code(), Some(0), "{again:?}");
    assert!(
        text(&again.stdout).starts_with(&format!(
            "nothing to salvage in {d}: {segments} segment files, "
        )),
        "{again:?}"
    );
    assert!(
        text(&again.stdout).ends_with(" bytes, no damage\n"),
        "{again:?}"
    );
}

#[test]
fn salvage_refuses_a_missing_path_and_a_directory_without_segment_files() {
    let _one = serial();
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing");
    let run = idemkv(&["salvage", missing.to_str().unwrap()]);
    assert_eq!(run.status.code(), Some(1));
    assert_eq!(
        text(&run.stderr),
        format!("error: no data directory at {}\n", missing.display())
    );
    assert!(!missing.exists());
    std::fs::write(tmp.path().join("notes.txt"), b"x").unwrap();
    let run = idemkv(&["salvage", tmp.path().to_str().unwrap()]);
    assert_eq!(run.status.code(), Some(1));
    assert_eq!(
        text(&run.stderr),
        format!(
            "error: no idemkv data in {} (no segment file *.log)\n",
            tmp.path().display()
        )
    );
    let names: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["notes.txt"]);
    let usage = idemkv(&["salvage"]);
    assert_eq!(usage.status.code(), Some(64));
}

#[test]
fn an_interrupted_salvage_is_refused_by_the_other_commands_until_salvage_finishes_it() {
    let _one = serial();
    let (disk, ..) = damaged();
    // Past its commit point: the first rename after the manifest's fails.
    disk.inject(Fault {
        op: SimOp::Rename,
        after: 1,
        kind: io::ErrorKind::Other,
        sticky: false,
    });
    assert!(idemkv::salvage_storage(&disk).is_err());
    assert!(disk.names().iter().any(|n| n == "SALVAGE"));
    let tmp = tempfile::tempdir().unwrap();
    copy(&disk, tmp.path());
    let d = tmp.path().to_str().unwrap();
    let pending = format!(
        "error: an interrupted salvage of {d} is pending; run `idemkv salvage {d}` to finish it\n"
    );
    for command in ["stats", "verify", "dump", "compact"] {
        let run = idemkv(&[command, d]);
        assert_eq!(run.status.code(), Some(1), "{command}: {run:?}");
        assert_eq!(text(&run.stderr), pending, "{command}");
    }
    let run = idemkv(&["salvage", d]);
    assert_eq!(run.status.code(), Some(0), "{run:?}");
    let stdout = text(&run.stdout);
    assert!(
        stdout.starts_with(&format!(
            "finished an interrupted salvage of {d}\nnothing to salvage in {d}: "
        )),
        "{stdout}"
    );
    assert_eq!(idemkv(&["verify", d]).status.code(), Some(0));
}

#[test]
fn a_damaged_salvage_manifest_exits_2_and_changes_nothing() {
    let _one = serial();
    let (disk, ..) = damaged();
    disk.inject(Fault {
        op: SimOp::Rename,
        after: 1,
        kind: io::ErrorKind::Other,
        sticky: false,
    });
    assert!(idemkv::salvage_storage(&disk).is_err());
    let tmp = tempfile::tempdir().unwrap();
    copy(&disk, tmp.path());
    let manifest = tmp.path().join("SALVAGE");
    let mut bytes = std::fs::read(&manifest).unwrap();
    bytes[9] ^= 1;
    std::fs::write(&manifest, &bytes).unwrap();
    let d = tmp.path().to_str().unwrap();
    let run = idemkv(&["salvage", d]);
    assert_eq!(run.status.code(), Some(2), "{run:?}");
    assert!(
        text(&run.stderr).starts_with(&format!("corrupt: {d}/SALVAGE at offset ")),
        "{run:?}"
    );
    assert_eq!(std::fs::read(&manifest).unwrap(), bytes);
}

#[test]
fn help_lists_salvage_and_its_exit_codes() {
    let _one = serial();
    let help = idemkv(&["--help"]);
    assert_eq!(help.status.code(), Some(0));
    let out = text(&help.stdout);
    assert!(out.contains("salvage"), "{out}");
    assert!(
        out.contains("Keep every valid record of a damaged directory"),
        "{out}"
    );
    assert!(out.contains("salvage: the directory opens now"), "{out}");
    let sub = idemkv(&["salvage", "--help"]);
    assert!(text(&sub.stdout).contains("quarantine"), "{sub:?}");
}
