//! Recovery on open: what survives a reopen, how a torn tail is cut off, and
//! how corruption before the tail is reported (DESIGN.md invariants 1 and 2).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use idemkv::{
    Begin, CorruptKind, Durability, Engine, Error, Fingerprint, Lease, ManualClock, Options,
    Outcome,
};

fn options(clock: &Arc<ManualClock>) -> Options {
    Options {
        durability: Durability::Sync,
        clock: clock.clone(),
        ..Options::default()
    }
}

fn started(engine: &Engine, user: &str, key: &str, fp: &[u8]) -> Lease {
    match engine.begin(user, key, Fingerprint::of(fp)).expect("begin") {
        Begin::Started(lease) => lease,
        other => panic!("expected Started for {user}/{key}, got {other:?}"),
    }
}

fn outcome(status: u16, body: &str) -> Outcome {
    Outcome {
        status,
        body: body.to_owned().into(),
    }
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    files.sort();
    files
}

fn last_segment(dir: &Path) -> PathBuf {
    segments(dir).pop().expect("a segment")
}

fn append_bytes(path: &Path, bytes: &[u8]) {
    let mut f = OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(bytes).unwrap();
}

fn replay(engine: &Engine, user: &str, key: &str, fp: &[u8]) -> Outcome {
    match engine.begin(user, key, Fingerprint::of(fp)).expect("begin") {
        Begin::Replay(outcome) => outcome,
        other => panic!("expected Replay for {user}/{key}, got {other:?}"),
    }
}

/// Writes three completed records and one in-progress lease, then closes.
fn populate(dir: &Path, clock: &Arc<ManualClock>) -> Lease {
    let engine = Engine::open(dir, options(clock)).unwrap();
    for i in 0..3 {
        let lease = started(&engine, "u", &format!("k{i}"), b"req");
        engine
            .complete(&lease, outcome(200 + i, &format!("body-{i}")))
            .unwrap();
    }
    started(&engine, "u", "pending", b"req")
}

#[test]
fn everything_acknowledged_survives_drop_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_000_000));
    let pending = populate(dir.path(), &clock);

    let engine = Engine::open(dir.path(), options(&clock)).unwrap();
    for i in 0..3u16 {
        let got = replay(&engine, "u", &format!("k{i}"), b"req");
        assert_eq!(got, outcome(200 + i, &format!("body-{i}")));
    }
    assert!(matches!(
        engine
            .begin("u", "pending", Fingerprint::of(b"req"))
            .unwrap(),
        Begin::InFlight { .. }
    ));
    // The lease from before the restart still owns its record (nobody
    // else can start it), but this engine refuses it: another open issued it.
    assert!(matches!(
        engine.complete(&pending, outcome(201, "late")),
        Err(idemkv::Error::ForeignLease { .. })
    ));
    assert_eq!(
        engine.get("u", "pending").unwrap().map(|v| v.token),
        Some(pending.token())
    );
}

#[test]
fn fencing_tokens_keep_growing_across_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(0));
    let mut last = 0;
    for round in 0..4 {
        let engine = Engine::open(dir.path(), options(&clock)).unwrap();
        let lease = started(&engine, "u", &format!("k{round}"), b"x");
        assert!(lease.token() > last, "token {} after {last}", lease.token());
        last = lease.token();
        engine.release(&lease).unwrap();
    }
}

#[test]
fn a_released_record_stays_released_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(0));
    {
        let engine = Engine::open(dir.path(), options(&clock)).unwrap();
        let lease = started(&engine, "u", "k", b"x");
        engine.release(&lease).unwrap();
    }
    let engine = Engine::open(dir.path(), options(&clock)).unwrap();
    assert_eq!(engine.get("u", "k").unwrap(), None);
    started(&engine, "u", "k", b"another payload");
}

#[test]
fn records_expired_while_closed_are_absent_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(0));
    populate(dir.path(), &clock);
    clock.advance(Duration::from_secs(25 * 3600));
    let engine = Engine::open(dir.path(), options(&clock)).unwrap();
    assert_eq!(engine.stats().live_records, 0);
    started(&engine, "u", "k0", b"different");
}

#[test]
fn garbage_appended_to_the_last_segment_is_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(0));
    populate(dir.path(), &clock);
    let seg = last_segment(dir.path());
    let clean_len = fs::metadata(&seg).unwrap().len();
    append_bytes(&seg, &[0xAB; 77]);

    let engine = Engine::open(dir.path(), options(&clock)).unwrap();
    assert_eq!(fs::metadata(&seg).unwrap().len(), clean_len);
    assert_eq!(replay(&engine, "u", "k2", b"req"), outcome(202, "body-2"));
    // New writes land after the cut and survive another reopen.
    let lease = started(&engine, "u", "after", b"req");
    engine
        .complete(&lease, outcome(200, "after the cut"))
        .unwrap();
    drop(engine);
    let engine = Engine::open(dir.path(), options(&clock)).unwrap();
    assert_eq!(
        replay(&engine, "u", "after", b"req"),
        outcome(200, "after the cut")
    );
}

#[test]
fn zeros_after_the_last_record_are_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(0));
    populate(dir.path(), &clock);
    let seg = last_segment(dir.path());
    append_bytes(&seg, &[0; 4096]);
    let engine = Engine::open(dir.path(), options(&clock)).unwrap();
    assert_eq!(replay(&engine, "u", "k0", b"req"), outcome(200, "body-0"));
}

#[test]
fn every_truncation_of_the_last_record_recovers_the_records_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(0));
    {
        let engine = Engine::open(dir.path(), options(&clock)).unwrap();
        let a = started(&engine, "u", "a", b"req");
        engine.complete(&a, outcome(200, "first")).unwrap();
    }
    let seg = last_segment(dir.path());
    let before = fs::metadata(&seg).unwrap().len();
    {
        let engine = Engine::open(dir.path(), options(&clock)).unwrap();
        let b = started(&engine, "u", "b", b"req");
        engine
            .complete(&b, outcome(200, "second record, to be torn"))
            .unwrap();
    }
    let full = fs::read(&seg).unwrap();
    for cut in before as usize..full.len() {
        fs::write(&seg, &full[..cut]).unwrap();
        let engine = Engine::open(dir.path(), options(&clock)).unwrap();
        assert_eq!(replay(&engine, "u", "a", b"req"), outcome(200, "first"));
        // "b" is either absent, or in progress if its begin record was whole.
        match engine.get("u", "b").unwrap() {
            None => {}
            Some(view) => assert_eq!(view.state, idemkv::RecordState::InProgress, "cut at {cut}"),
        }
        assert!(fs::metadata(&seg).unwrap().len() <= cut as u64);
    }
}

#[test]
fn a_flipped_byte_mid_log_is_reported_as_corruption_with_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(0));
    populate(dir.path(), &clock);
    let seg = last_segment(dir.path());
    let mut bytes = fs::read(&seg).unwrap();
    // Byte 70 is inside the first record (the header is 56 bytes).
    bytes[70] ^= 0x01;
    fs::write(&seg, &bytes).unwrap();

    match Engine::open(dir.path(), options(&clock)) {
        Err(Error::Corrupt { file, offset, kind }) => {
            assert_eq!(file, seg);
            assert_eq!(offset, 56);
            assert_eq!(kind, CorruptKind::Checksum);
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    // The failed open released the lock and changed nothing on disk.
    assert_eq!(fs::read(&seg).unwrap(), bytes);
}

#[test]
fn every_single_byte_flip_gives_corruption_or_a_consistent_store_never_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(0));
    populate(dir.path(), &clock);
    let seg = last_segment(dir.path());
    let pristine = fs::read(&seg).unwrap();
    for i in 0..pristine.len() {
        let mut bytes = pristine.clone();
        bytes[i] ^= 0x80;
        fs::write(&seg, &bytes).unwrap();
        match Engine::open(
            dir.path(),
            Options {
                durability: Durability::None,
                ..options(&clock)
            },
        ) {
            Err(Error::Corrupt { .. }) => {}
            // A flip in the last record is a torn tail: the others survive.
            Ok(engine) => assert_eq!(replay(&engine, "u", "k0", b"req"), outcome(200, "body-0")),
            Err(other) => panic!("flip at {i}: unexpected {other:?}"),
        }
    }
}

#[test]
fn records_spread_over_many_segments_all_recover() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(0));
    let opts = || Options {
        segment_bytes: 4096,
        durability: Durability::None,
        ..options(&clock)
    };
    {
        let engine = Engine::open(dir.path(), opts()).unwrap();
        for i in 0..300 {
            let lease = started(&engine, "u", &format!("k{i}"), b"req");
            engine
                .complete(&lease, outcome(200, &format!("body {i:04}")))
                .unwrap();
        }
        assert!(engine.stats().segments > 5);
    }
    assert!(segments(dir.path()).len() > 5);
    let engine = Engine::open(dir.path(), opts()).unwrap();
    for i in 0..300 {
        assert_eq!(
            replay(&engine, "u", &format!("k{i}"), b"req"),
            outcome(200, &format!("body {i:04}"))
        );
    }
}

#[test]
fn damage_in_a_closed_segment_is_corruption_even_at_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(0));
    let opts = || Options {
        segment_bytes: 4096,
        durability: Durability::None,
        ..options(&clock)
    };
    {
        let engine = Engine::open(dir.path(), opts()).unwrap();
        for i in 0..100 {
            let lease = started(&engine, "u", &format!("k{i}"), b"req");
            engine.complete(&lease, outcome(200, "x")).unwrap();
        }
    }
    let first = segments(dir.path()).remove(0);
    let len = fs::metadata(&first).unwrap().len();
    let f = OpenOptions::new().write(true).open(&first).unwrap();
    f.set_len(len - 3).unwrap();
    assert!(matches!(
        Engine::open(dir.path(), opts()),
        Err(Error::Corrupt { file, .. }) if file == first
    ));
}

#[test]
fn a_last_segment_torn_while_being_created_is_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(0));
    populate(dir.path(), &clock);
    // A crash right after creating the next segment: its header is half there.
    let next = dir.path().join("000002.log");
    fs::write(&next, b"IDEMKV").unwrap();
    let engine = Engine::open(dir.path(), options(&clock)).unwrap();
    assert_eq!(replay(&engine, "u", "k1", b"req"), outcome(201, "body-1"));
    let lease = started(&engine, "u", "new", b"req");
    engine
        .complete(&lease, outcome(200, "in the rewritten segment"))
        .unwrap();
    drop(engine);
    assert!(fs::metadata(&next).unwrap().len() > 56);
    let engine = Engine::open(dir.path(), options(&clock)).unwrap();
    assert_eq!(
        replay(&engine, "u", "new", b"req"),
        outcome(200, "in the rewritten segment")
    );
}

#[test]
fn unknown_files_in_the_directory_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(0));
    populate(dir.path(), &clock);
    fs::write(dir.path().join("notes.txt"), b"operator notes").unwrap();
    let engine = Engine::open(dir.path(), options(&clock)).unwrap();
    assert_eq!(replay(&engine, "u", "k0", b"req"), outcome(200, "body-0"));
}

/// Recovery replays in parallel lanes, each applying the records of its
/// own shards (keys are sharded by user). Many users put records in every
/// lane; every key must come back in its exact state, and fencing tokens
/// must resume above every token in the log whichever lane saw it.
#[test]
fn records_of_many_users_recover_in_every_state() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(0));
    let opts = || Options {
        segment_bytes: 16 << 10,
        durability: Durability::None,
        ..options(&clock)
    };
    let users: Vec<String> = (0..97).map(|u| format!("user-{u}")).collect();
    let mut pending = Vec::new();
    let mut top_token = 0;
    {
        let engine = Engine::open(dir.path(), opts()).unwrap();
        for (u, user) in users.iter().enumerate() {
            for k in 0..12 {
                let key = format!("k{k}");
                let lease = started(&engine, user, &key, b"req");
                top_token = top_token.max(lease.token());
                match (u + k) % 4 {
                    0 | 1 => engine
                        .complete(&lease, outcome(200, &format!("{user}/{key}")))
                        .unwrap(),
                    2 => engine.release(&lease).unwrap(),
                    _ => pending.push((user.clone(), key, lease)),
                }
            }
        }
        assert!(engine.stats().segments > 3);
    }
    let engine = Engine::open(dir.path(), opts()).unwrap();
    for (u, user) in users.iter().enumerate() {
        for k in 0..12 {
            let key = format!("k{k}");
            match (u + k) % 4 {
                0 | 1 => assert_eq!(
                    replay(&engine, user, &key, b"req"),
                    outcome(200, &format!("{user}/{key}"))
                ),
                2 => assert!(engine.get(user.as_str(), &key).unwrap().is_none()),
                _ => assert!(matches!(
                    engine
                        .begin(user.as_str(), &key, Fingerprint::of(b"req"))
                        .unwrap(),
                    Begin::InFlight { .. }
                )),
            }
        }
    }
    for (user, key, lease) in &pending {
        assert_eq!(
            engine.get(user.as_str(), key).unwrap().map(|v| v.token),
            Some(lease.token())
        );
    }
    let fresh = started(&engine, "user-0", "after-reopen", b"req");
    assert!(
        fresh.token() > top_token,
        "{} <= {top_token}",
        fresh.token()
    );
}

/// A record damaged on disk while the engine runs (its frame length now
/// says 4 GiB) reads back as `Corrupt` naming the file and offset: the
/// engine checks the length against the file before reading or
/// allocating that much, and never panics.
#[test]
fn a_damaged_length_under_a_running_engine_reads_back_as_corruption() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(0));
    let engine = Engine::open(dir.path(), options(&clock)).unwrap();
    let _lease = started(&engine, "u", "k", b"req");
    // The first record (the token reservation, 61 bytes) starts right after
    // the 56-byte segment header; the begin follows it. A frame's first 4
    // bytes are its length.
    let file = OpenOptions::new()
        .write(true)
        .open(last_segment(dir.path()))
        .unwrap();
    file.write_all_at(&[0xff, 0xff, 0xff, 0xf0], 56 + 61)
        .unwrap();
    match engine.begin("u", "k", Fingerprint::of(b"req")) {
        Err(Error::Corrupt { file, offset, .. }) => {
            assert_eq!(offset, 56 + 61);
            assert!(file.ends_with(last_segment(dir.path()).file_name().unwrap()));
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

/// The same with one large segment (over 1 MiB), whose lanes replay on
/// threads side by side rather than one after another.
#[test]
fn a_large_segment_of_many_users_recovers_with_parallel_lanes() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(0));
    let opts = || Options {
        durability: Durability::None,
        ..options(&clock)
    };
    let (users, keys) = (64, 400);
    {
        let engine = Engine::open(dir.path(), opts()).unwrap();
        for u in 0..users {
            for k in 0..keys {
                let (user, key) = (format!("user-{u}"), format!("k{k}"));
                let lease = started(&engine, &user, &key, b"req");
                if k % 5 != 0 {
                    engine.complete(&lease, outcome(200, &key)).unwrap();
                }
            }
        }
        assert_eq!(engine.stats().segments, 1);
        assert!(engine.stats().disk_bytes > 1 << 20, "{:?}", engine.stats());
    }
    let engine = Engine::open(dir.path(), opts()).unwrap();
    assert_eq!(engine.stats().live_records, (users * keys) as u64);
    for u in 0..users {
        for k in 0..keys {
            let (user, key) = (format!("user-{u}"), format!("k{k}"));
            if k % 5 != 0 {
                assert_eq!(replay(&engine, &user, &key, b"req"), outcome(200, &key));
            } else {
                let view = engine
                    .get(user.as_str(), &key)
                    .unwrap()
                    .expect("in progress");
                assert_eq!(view.state, idemkv::RecordState::InProgress);
            }
        }
    }
}

/// Directories written by the format before token reservations, 64-bit
/// segment numbers and spare segments (made by commit c974420 with
/// `tests/fixtures/v1-written-by-c974420/make_fixture.rs.txt`) still open,
/// replay exactly, and hand out tokens above every token they hold.
#[test]
fn a_directory_written_before_the_hardening_opens_and_replays_exactly() {
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/v1-written-by-c974420");
    let dir = tempfile::tempdir().unwrap();
    for entry in fs::read_dir(&fixture).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "log") {
            fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    assert!(idemkv::verify(dir.path()).is_ok());
    // The fixture was written at 2100-01-01 (ms 4_102_444_800_000).
    let clock = Arc::new(ManualClock::new(4_102_444_800_000));
    let engine = Engine::open(dir.path(), options(&clock)).unwrap();
    for i in 0..40 {
        let body = format!("receipt {i} {}", "x".repeat(90));
        assert_eq!(
            replay(&engine, "u", &format!("done-{i}"), b"req"),
            outcome(201, &body)
        );
    }
    for i in 40..45 {
        assert_eq!(
            replay(&engine, "", &format!("done-{i}"), b"req"),
            outcome(200, "after compaction")
        );
    }
    assert_eq!(engine.get("u", "released").unwrap(), None);
    let pending = engine.get("w", "pending").unwrap().expect("in progress");
    assert_eq!(pending.state, idemkv::RecordState::InProgress);
    let fresh = started(&engine, "u", "fresh", b"req");
    assert!(fresh.token() > 45, "token {} reissued", fresh.token());
    drop(engine);
    let engine = Engine::open(dir.path(), options(&clock)).unwrap();
    assert_eq!(
        replay(&engine, "", "done-44", b"req"),
        outcome(200, "after compaction")
    );
}
