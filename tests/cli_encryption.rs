//! The operator CLI on a store whose bodies are sealed (issue 14, section
//! 2; features `cli` and `encryption`): `get`, `dump` and `compact` take
//! `--key-file`; without it a sealed body is a typed error naming its key
//! id (exit 1), with a wrong key an authentication failure (exit 2);
//! `verify` needs no key; `compact --key-file` reseals every kept record
//! under the file's current key, which completes a rotation.
//!
//! The tests run one at a time ([`serial`]), as in `tests/cli.rs`: a child
//! forked by one test briefly inherits another test's directory lock.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use idemkv::{Begin, EncryptionKeys, Engine, Fingerprint, Options, Outcome};

#[path = "common/files.rs"]
mod files;
use files::{all_frames, holding};

fn serial() -> std::sync::MutexGuard<'static, ()> {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
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

/// The bytes of key `id`.
fn key(id: u32) -> [u8; 32] {
    std::array::from_fn(|i| (id as u8).wrapping_mul(29) ^ (i as u8) ^ 0xa5)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes a key file holding `ids` (the first current) as `name` in `dir`.
fn key_file(dir: &Path, name: &str, ids: &[u32]) -> PathBuf {
    let mut text = String::from("# idemkv keys: the first line seals\n\n");
    for id in ids {
        text.push_str(&format!("{id} {}\n", hex(&key(*id))));
    }
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn keys(ids: &[u32]) -> EncryptionKeys {
    let (first, rest) = ids.split_first().unwrap();
    rest.iter().fold(
        EncryptionKeys::new(*first, &key(*first)).unwrap(),
        |k, id| k.with_old_key(*id, &key(*id)).unwrap(),
    )
}

/// Body of record `i`: a marker the files are grepped for.
fn body(i: usize) -> String {
    format!("SEALED-CLI-BODY-{i}: the charge went through")
}

/// Completes `order-{i}` of user `u` for each `i` in `records`, under
/// `keys`.
fn write(dir: &Path, keys: EncryptionKeys, records: std::ops::Range<usize>) {
    let options = Options {
        background: false,
        encryption: Some(keys),
        ..Options::default()
    };
    let engine = Engine::open(dir, options).unwrap();
    for i in records {
        let key = format!("order-{i}");
        let Begin::Started(lease) = engine.begin("u", &key, Fingerprint::of(b"r")).unwrap() else {
            panic!("order-{i} not started");
        };
        let outcome = Outcome {
            status: 201,
            body: body(i).into(),
        };
        engine.complete(&lease, outcome).unwrap();
    }
    engine.close().unwrap();
}

/// A store with `order-0..3` under key 1 and `order-3..6` under key 2,
/// and a directory for key files beside it.
fn rotated_store() -> (tempfile::TempDir, tempfile::TempDir) {
    let data = tempfile::tempdir().unwrap();
    write(data.path(), keys(&[1]), 0..3);
    write(data.path(), keys(&[2, 1]), 3..6);
    (data, tempfile::tempdir().unwrap())
}

#[test]
fn get_and_dump_open_sealed_bodies_with_a_key_file_and_verify_needs_none() {
    let _one = serial();
    let (data, kf) = rotated_store();
    let d = arg(data.path());
    let both = key_file(kf.path(), "both", &[2, 1]);
    let run = idemkv(["verify", d]);
    assert_eq!(run.code, Some(0), "{run:?}");
    for i in [0, 5] {
        let key = format!("order-{i}");
        let run = idemkv(["get", d, "u", &key, "--key-file", arg(&both)]);
        assert_eq!(run.code, Some(0), "{run:?}");
        assert!(run.stdout.contains(&body(i)), "{run:?}");
    }
    let run = idemkv(["dump", d, "--key-file", arg(&both)]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.stdout.lines().count(), 6);
    for i in 0..6 {
        assert!(run.stdout.contains(&body(i)), "{i}: {run:?}");
    }
    // Without a key file, or with one that lacks key 1: exit 1, naming it.
    let only_2 = key_file(kf.path(), "only-2", &[2]);
    for extra in [vec![], vec!["--key-file", arg(&only_2)]] {
        let run = idemkv(["get", d, "u", "order-0"].into_iter().chain(extra.clone()));
        assert_eq!(run.code, Some(1), "{run:?}");
        assert!(run.stderr.contains("no key with id 1"), "{run:?}");
        assert!(run.stderr.contains("--key-file"), "{run:?}");
        let run = idemkv(["dump", d].into_iter().chain(extra));
        assert_eq!(run.code, Some(1), "{run:?}");
        assert!(run.stderr.contains("no key with id"), "{run:?}");
    }
    let run = idemkv(["get", d, "u", "order-4", "--key-file", arg(&only_2)]);
    assert_eq!(run.code, Some(0), "{run:?}");
}

#[test]
fn compact_with_a_key_file_reseals_every_record_under_its_current_key() {
    let _one = serial();
    let (data, kf) = rotated_store();
    let d = arg(data.path());
    // Rotation: key 3 becomes current, 1 and 2 are kept for reading.
    let all = key_file(kf.path(), "all", &[3, 2, 1]);
    let run = idemkv(["compact", d, "--key-file", arg(&all)]);
    assert_eq!(run.code, Some(0), "{run:?}");
    let resealed = run
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("records resealed"))
        .and_then(|l| l.split_whitespace().last())
        .map(|n| n.parse::<u64>().unwrap());
    assert_eq!(resealed, Some(6), "{run:?}");
    let ids: Vec<u32> = all_frames(data.path())
        .iter()
        .filter_map(|(_, f)| f.key_id)
        .collect();
    assert_eq!(ids, vec![3; 6]);
    // Now the old keys can go.
    let only_3 = key_file(kf.path(), "only-3", &[3]);
    let run = idemkv(["dump", d, "--key-file", arg(&only_3)]);
    assert_eq!(run.code, Some(0), "{run:?}");
    for i in 0..6 {
        assert!(run.stdout.contains(&body(i)), "{i}: {run:?}");
        assert!(holding(data.path(), body(i).as_bytes()).is_empty());
    }
    // A compaction without keys copies sealed records as they are.
    let run = idemkv(["compact", d]);
    assert_eq!(run.code, Some(0), "{run:?}");
    let run = idemkv(["get", d, "u", "order-2", "--key-file", arg(&only_3)]);
    assert_eq!(run.code, Some(0), "{run:?}");
}

#[test]
fn a_wrong_key_exits_2_and_a_bad_key_file_exits_1_naming_its_line() {
    let _one = serial();
    let (data, kf) = rotated_store();
    let d = arg(data.path());
    let mut wrong = key(2);
    wrong[0] ^= 0xff;
    let path = kf.path().join("wrong");
    std::fs::write(&path, format!("2 {}\n1 {}\n", hex(&wrong), hex(&key(1)))).unwrap();
    let run = idemkv(["get", d, "u", "order-4", "--key-file", arg(&path)]);
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.stderr.starts_with("corrupt: "), "{run:?}");
    assert!(run.stderr.contains("authentication under key 2"), "{run:?}");

    let bad = kf.path().join("bad");
    std::fs::write(&bad, format!("1 {}\n2 not-hex\n", hex(&key(1)))).unwrap();
    let run = idemkv(["get", d, "u", "order-0", "--key-file", arg(&bad)]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("line 2 of the key file"), "{run:?}");
    let missing = kf.path().join("missing");
    let run = idemkv(["compact", d, "--key-file", arg(&missing)]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("cannot read the key file"), "{run:?}");
    let run = idemkv(["--help"]);
    assert!(run.stdout.contains("KEY FILES"), "{run:?}");
}
