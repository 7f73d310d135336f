//! The operator's views: `verify` checks a directory without changing it and
//! names the file and offset of damage; `inspect` and `for_each_record`
//! report what the engine holds.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use idemkv::{
    Begin, CorruptKind, Durability, Engine, Error, Fingerprint, Lease, ManualClock, Options,
    Outcome, RecordState, verify,
};

fn options(clock: &Arc<ManualClock>) -> Options {
    Options {
        durability: Durability::None,
        background: false,
        clock: clock.clone(),
        ..Options::default()
    }
}

fn started(engine: &Engine, user: &str, key: &str) -> Lease {
    match engine
        .begin(user, key, Fingerprint::of(key.as_bytes()))
        .unwrap()
    {
        Begin::Started(lease) => lease,
        other => panic!("{key}: {other:?}"),
    }
}

fn body(key: &str) -> Outcome {
    Outcome {
        status: 200,
        body: format!("body of {key}").into(),
    }
}

fn segment(dir: &Path) -> PathBuf {
    let mut segs: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    segs.sort();
    segs.pop().unwrap()
}

/// Three completed keys for user "a", one for "b", one lease in progress,
/// one completed key expired.
fn populate(dir: &Path, clock: &Arc<ManualClock>) {
    let engine = Engine::open(dir, options(clock)).unwrap();
    for key in ["k1", "k2", "k3"] {
        let lease = started(&engine, "a", key);
        engine.complete(&lease, body(key)).unwrap();
    }
    let lease = started(&engine, "b", "k1");
    engine.complete(&lease, body("b-k1")).unwrap();
    let short = started(&engine, "a", "short");
    engine
        .complete_with_ttl(&short, body("short"), Duration::from_secs(1))
        .unwrap();
    started(&engine, "a", "pending");
    clock.advance(Duration::from_secs(2));
}

#[test]
fn verify_counts_the_records_of_a_healthy_directory() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(0));
    populate(dir.path(), &clock);
    let report = verify(dir.path()).unwrap();
    // Six begins, five completes and a token reservation.
    assert_eq!(
        (report.segments, report.records, report.torn_tail),
        (1, 12, None)
    );
}

#[test]
fn verify_names_the_file_and_offset_of_a_flipped_byte_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(0));
    populate(dir.path(), &clock);
    let seg = segment(dir.path());
    let mut bytes = fs::read(&seg).unwrap();
    bytes[70] ^= 0x20; // inside the first record, which starts after the 56-byte header
    fs::write(&seg, &bytes).unwrap();
    match verify(dir.path()) {
        Err(Error::Corrupt { file, offset, kind }) => {
            assert_eq!(
                (file, offset, kind),
                (seg.clone(), 56, CorruptKind::Checksum)
            );
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert_eq!(fs::read(&seg).unwrap(), bytes, "verify must not repair");
}

#[test]
fn verify_reports_a_torn_tail_without_calling_it_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(0));
    populate(dir.path(), &clock);
    let seg = segment(dir.path());
    let len = fs::metadata(&seg).unwrap().len();
    let mut f = fs::OpenOptions::new().append(true).open(&seg).unwrap();
    std::io::Write::write_all(&mut f, &[0xEE; 30]).unwrap();
    let report = verify(dir.path()).unwrap();
    assert_eq!(report.torn_tail, Some((seg.clone(), len)));
    assert_eq!(
        fs::metadata(&seg).unwrap().len(),
        len + 30,
        "verify must not truncate"
    );
}

#[test]
fn verify_refuses_a_locked_or_missing_directory() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(0));
    let engine = Engine::open(dir.path(), options(&clock)).unwrap();
    assert!(matches!(verify(dir.path()), Err(Error::Locked { .. })));
    drop(engine);
    assert!(verify(dir.path()).is_ok());
    let missing = dir.path().join("nope");
    assert!(matches!(verify(&missing), Err(Error::Io { .. })));
    assert!(!missing.exists(), "verify must not create the directory");
}

#[test]
fn inspect_counts_records_by_state_and_segments_by_liveness() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(0));
    populate(dir.path(), &clock);
    let engine = Engine::open(dir.path(), options(&clock)).unwrap();
    let started_now = started(&engine, "c", "fresh");
    let _ = started_now;
    let seen = engine.inspect();
    // Recovery dropped the expired record; the new lease is in progress.
    assert_eq!((seen.completed, seen.in_progress, seen.expired), (4, 2, 0));
    assert_eq!(seen.segments.len(), 1);
    let seg = &seen.segments[0];
    assert!(seg.active);
    // populate's 12 records, the reopened engine's token reservation and
    // the fresh begin.
    assert_eq!((seg.records, seg.live_records), (14, 6));
    clock.advance(Duration::from_secs(31));
    let later = engine.inspect();
    assert_eq!(
        (later.completed, later.in_progress, later.expired),
        (4, 0, 2)
    );
}

#[test]
fn for_each_record_dumps_every_live_record_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(0));
    populate(dir.path(), &clock);
    let engine = Engine::open(dir.path(), options(&clock)).unwrap();
    let mut all = Vec::new();
    engine
        .for_each_record(None, |r| all.push(r.clone()))
        .unwrap();
    all.sort_by(|x, y| (&x.user, &x.key).cmp(&(&y.user, &y.key)));
    let got: Vec<(String, String, RecordState, Option<Outcome>)> = all
        .iter()
        .map(|r| {
            (
                String::from_utf8(r.user.to_vec()).unwrap(),
                String::from_utf8(r.key.to_vec()).unwrap(),
                r.view.state,
                r.outcome.clone(),
            )
        })
        .collect();
    let done = |u: &str, k: &str, b: &str| {
        (
            u.to_owned(),
            k.to_owned(),
            RecordState::Completed,
            Some(body(b)),
        )
    };
    assert_eq!(
        got,
        vec![
            done("a", "k1", "k1"),
            done("a", "k2", "k2"),
            done("a", "k3", "k3"),
            (
                "a".to_owned(),
                "pending".to_owned(),
                RecordState::InProgress,
                None
            ),
            done("b", "k1", "b-k1"),
        ]
    );
    assert!(all.iter().all(|r| r.fingerprint == Fingerprint::of(&r.key)));
    let mut only_b = Vec::new();
    engine
        .for_each_record(Some(b"b"), |r| only_b.push(r.key.clone()))
        .unwrap();
    assert_eq!(only_b, vec![bytes::Bytes::from_static(b"k1")]);
}

/// Regression (issue 11, item 11): `compact()` called from inside a
/// `for_each_record` callback deadlocked (the callback holds compaction
/// off). It is an error now, and so are `close` and a nested
/// `for_each_record`; all of them work once the callback returned.
#[test]
fn compact_or_close_inside_for_each_record_is_an_error_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(0));
    let engine = Engine::open(dir.path(), options(&clock)).unwrap();
    let lease = started(&engine, "u", "k");
    engine.complete(&lease, body("k")).unwrap();
    let mut seen = 0;
    engine
        .for_each_record(None, |_| {
            seen += 1;
            assert!(matches!(
                engine.compact(),
                Err(Error::Reentrant { call: "compact" })
            ));
            assert!(matches!(
                engine.compact_below(0.5),
                Err(Error::Reentrant { .. })
            ));
            assert!(matches!(
                engine.close(),
                Err(Error::Reentrant { call: "close" })
            ));
            assert!(matches!(
                engine.for_each_record(None, |_| {}),
                Err(Error::Reentrant { .. })
            ));
        })
        .unwrap();
    assert_eq!(seen, 1);
    // Still open, and both work from outside the callback.
    assert!(engine.get("u", "k").unwrap().is_some());
    engine.compact().unwrap();
    engine.close().unwrap();
}
