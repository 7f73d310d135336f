//! The log buffers appends in memory and writes them with one system call
//! per group-commit round (or when the buffer fills, or on the flusher's
//! timer without `Sync`): what that must and must not change.

use std::sync::Arc;
use std::time::{Duration, Instant};

use idemkv::{Begin, Durability, Engine, Fingerprint, Options, Outcome};

fn outcome(i: usize) -> Outcome {
    Outcome {
        status: 200,
        body: format!("body of {i}: {}", "x".repeat(i % 300))
            .into_bytes()
            .into(),
    }
}

fn open(dir: &std::path::Path, durability: Durability, background: bool) -> Engine {
    Engine::open(
        dir,
        Options {
            durability,
            background,
            ..Options::default()
        },
    )
    .expect("open")
}

/// Under `Sync`, concurrent callers share one write as well as one
/// fdatasync per round: far fewer writes than records, never more writes
/// than syncs.
#[test]
fn concurrent_durable_callers_share_one_write_per_round() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(open(dir.path(), Durability::Sync, false));
    let threads = 32;
    let per = 40;
    std::thread::scope(|s| {
        for t in 0..threads {
            let engine = Arc::clone(&engine);
            s.spawn(move || {
                for i in 0..per {
                    let key = format!("t{t}-{i}");
                    let Begin::Started(lease) =
                        engine.begin("u", &key, Fingerprint::of(b"r")).unwrap()
                    else {
                        panic!("{key} not started");
                    };
                    engine.complete(&lease, outcome(i)).unwrap();
                }
            });
        }
    });
    let stats = engine.stats();
    assert!(
        stats.records_written >= (threads * per * 2) as u64,
        "{stats:?}"
    );
    assert!(
        stats.log_writes <= stats.fsyncs,
        "a write that no sync followed: {stats:?}"
    );
    assert!(
        stats.log_writes * 2 <= stats.records_written,
        "records were not grouped into shared writes: {stats:?}"
    );
    assert_eq!(stats.log_pending_bytes, 0, "{stats:?}");
}

/// Without `Sync` and without the background timer, appends wait in memory;
/// every read sees them (bodies included), and a clean close writes them.
#[test]
fn buffered_appends_are_read_back_and_written_by_close() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), Durability::None, false);
    let n = 300;
    for i in 0..n {
        let key = format!("k{i}");
        let Begin::Started(lease) = engine.begin("u", &key, Fingerprint::of(b"r")).unwrap() else {
            panic!("{key} not started");
        };
        engine.complete(&lease, outcome(i)).unwrap();
        // Read back at once, while the record is still in the buffer.
        let replay = engine.begin("u", &key, Fingerprint::of(b"r")).unwrap();
        assert!(
            matches!(&replay, Begin::Replay(o) if *o == outcome(i)),
            "{key}: {replay:?}"
        );
    }
    let stats = engine.stats();
    assert!(stats.log_pending_bytes > 0, "nothing buffered: {stats:?}");
    assert!(
        stats.log_writes < (n / 10) as u64,
        "appends were not buffered: {stats:?}"
    );
    let all_there = |engine: &Engine| {
        for i in 0..n {
            let key = format!("k{i}");
            assert_eq!(
                engine.outcome("u", &key).unwrap(),
                Some(outcome(i)),
                "{key}"
            );
        }
    };
    all_there(&engine);
    engine.close().unwrap();
    all_there(&open(dir.path(), Durability::None, false));
}

/// With the background thread on, the flusher writes buffered appends out
/// within a few milliseconds, so a killed process loses only that much.
#[test]
fn the_flusher_writes_buffered_appends_without_sync() {
    for durability in [
        Durability::None,
        Durability::Periodic(Duration::from_secs(3600)),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let engine = open(dir.path(), durability, true);
        let Begin::Started(lease) = engine.begin("u", "k", Fingerprint::of(b"r")).unwrap() else {
            panic!("not started");
        };
        engine.complete(&lease, outcome(7)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while engine.stats().log_pending_bytes > 0 {
            assert!(
                Instant::now() < deadline,
                "{durability:?}: never written: {:?}",
                engine.stats()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        // Written to the file (not synced): a second reader of the files
        // sees the record although the engine was never closed.
        let copy = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let entry = entry.unwrap();
            if entry.file_name().to_string_lossy().ends_with(".log") {
                std::fs::copy(entry.path(), copy.path().join(entry.file_name())).unwrap();
            }
        }
        let reader = open(copy.path(), Durability::None, false);
        assert_eq!(
            reader.outcome("u", "k").unwrap(),
            Some(outcome(7)),
            "{durability:?}"
        );
        engine.close().unwrap();
    }
}

/// A record larger than the buffer's threshold still goes through it
/// whole, and the next round writes it.
#[test]
fn a_record_larger_than_the_buffer_is_written_whole() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), Durability::Sync, false);
    let big = Outcome {
        status: 201,
        body: vec![b'z'; 900 << 10].into(),
    };
    let Begin::Started(lease) = engine.begin("u", "big", Fingerprint::of(b"r")).unwrap() else {
        panic!("not started");
    };
    engine.complete(&lease, big.clone()).unwrap();
    assert_eq!(engine.stats().log_pending_bytes, 0);
    engine.close().unwrap();
    let engine = open(dir.path(), Durability::Sync, false);
    assert_eq!(engine.outcome("u", "big").unwrap(), Some(big));
}
