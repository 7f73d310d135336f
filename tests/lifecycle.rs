//! Closing and reopening while other calls run: `close` waits for a running
//! compaction, nothing an engine started touches the directory after its
//! `close` returned, and a stress run interleaving close, compact, open,
//! segment rolls and appends (through a storage that delays its calls)
//! loses no acknowledged write.

mod common;

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use bytes::Bytes;
use common::gate::{Call, Gated, Gates};
use idemkv::storage::{FsStorage, Storage};
use idemkv::{Begin, Durability, Engine, Error, Fingerprint, Options, Outcome};

fn options(durability: Durability) -> Options {
    Options {
        durability,
        segment_bytes: 4096,
        background: false,
        ..Options::default()
    }
}

fn open_gated(dir: &std::path::Path, gates: &Arc<Gates>, durability: Durability) -> Engine {
    let fs: Arc<dyn Storage> = Arc::new(FsStorage::open(dir).expect("lock the directory"));
    Engine::open_with_storage(Gated::new(fs, gates), options(durability)).expect("open")
}

fn body(key: &str) -> Outcome {
    Outcome {
        status: 201,
        body: Bytes::from(format!("charged {key} {}", "x".repeat(100))),
    }
}

fn fp(key: &str) -> Fingerprint {
    Fingerprint::of(key.as_bytes())
}

/// `begin` + `complete` of `key`; true once both were acknowledged.
fn write(engine: &Engine, key: &str) -> bool {
    match engine.begin("u", key, fp(key)) {
        Ok(Begin::Started(lease)) => engine.complete(&lease, body(key)).is_ok(),
        _ => false,
    }
}

fn assert_replays(engine: &Engine, keys: &[String]) {
    for key in keys {
        match engine.begin("u", key, fp(key)).unwrap() {
            Begin::Replay(o) => assert_eq!(o, body(key), "{key}"),
            other => panic!("acknowledged {key} was lost: begin answered {other:?}"),
        }
    }
}

/// Regression (issue 11, item 1): thread A ran `compact()`, thread B called
/// `close()` then `Engine::open` on the same directory, and A's rewrite
/// renamed its output over the new engine's live segments (52 of 80
/// acknowledged completes lost in one run).
#[test]
fn close_waits_for_a_running_compaction_and_the_next_open_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let gates = Arc::new(Gates::default());
    let engine = Arc::new(open_gated(dir.path(), &gates, Durability::Sync));
    let mut keys = Vec::new();
    for i in 0..80 {
        let key = format!("order-{i}");
        assert!(write(&engine, &key));
        keys.push(key);
        // Released keys leave dead records for compaction to drop.
        let Begin::Started(lease) = engine.begin("u", format!("gone-{i}"), fp("gone")).unwrap()
        else {
            panic!("fresh key not started")
        };
        engine.release(&lease).unwrap();
    }
    gates.close(Call::Rename);
    let compactor = Arc::clone(&engine);
    let compaction = thread::spawn(move || compactor.compact());
    assert!(
        gates.wait_entered(Call::Rename, 1, Duration::from_secs(30)),
        "compaction never reached a rename"
    );
    let (closed_tx, closed_rx) = mpsc::channel();
    let closer = Arc::clone(&engine);
    let close = thread::spawn(move || {
        let result = closer.close();
        let _ = closed_tx.send(());
        result
    });
    // close must not return while the compaction is inside its rename.
    assert!(
        closed_rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "close returned while a compaction was still running"
    );
    gates.fence();
    gates.open(Call::Rename);
    close.join().unwrap().unwrap();
    let late = gates.late_calls();
    // The compaction finished its segment or stopped; either way it ended.
    match compaction.join().unwrap() {
        Ok(_) | Err(Error::Closed) => {}
        Err(e) => panic!("compaction failed: {e:?}"),
    }
    assert_eq!(
        gates.late_calls(),
        late,
        "the old engine touched the directory after close returned"
    );
    let reopened = Engine::open(dir.path(), options(Durability::Sync)).unwrap();
    assert_replays(&reopened, &keys);
}

#[test]
fn compact_after_close_is_refused_with_closed() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path(), options(Durability::None)).unwrap();
    assert!(write(&engine, "k"));
    engine.close().unwrap();
    assert!(matches!(engine.compact(), Err(Error::Closed)));
    assert!(matches!(engine.compact_below(0.5), Err(Error::Closed)));
}

/// The stress test: writers append across frequent segment rolls while a
/// compactor loops, and the main thread closes the engine and reopens the
/// directory over and over; every storage call is delayed a little at
/// random. Every acknowledged write must replay in the end, and no call of
/// a closed engine may change the directory.
#[test]
fn close_compact_open_rolls_and_appends_interleaved_lose_nothing() {
    for durability in [Durability::Sync, Durability::None] {
        let dir = tempfile::tempdir().unwrap();
        let acked: Arc<Mutex<Vec<String>>> = Arc::default();
        for round in 0..8 {
            let gates = Arc::new(Gates::default());
            gates.jitter(200);
            let engine = Arc::new(open_gated(dir.path(), &gates, durability));
            assert_replays(&engine, &acked.lock().unwrap());
            thread::scope(|s| {
                for w in 0..2 {
                    let (engine, acked) = (Arc::clone(&engine), Arc::clone(&acked));
                    s.spawn(move || {
                        for i in 0.. {
                            let key = format!("r{round}-w{w}-{i}");
                            if !write(&engine, &key) {
                                return; // closed under it
                            }
                            acked.lock().unwrap().push(key);
                        }
                    });
                }
                let compactor = Arc::clone(&engine);
                s.spawn(move || {
                    loop {
                        match compactor.compact() {
                            Ok(_) => {}
                            Err(Error::Closed) => return,
                            Err(e) => panic!("compaction failed: {e:?}"),
                        }
                    }
                });
                thread::sleep(Duration::from_millis(150));
                engine.close().unwrap();
                gates.fence();
            });
            assert_eq!(
                gates.late_calls(),
                0,
                "round {round}: a call of the closed engine changed the directory"
            );
        }
        let engine = Engine::open(dir.path(), options(durability)).unwrap();
        let acked = acked.lock().unwrap();
        assert!(acked.len() > 16, "too few writes: {}", acked.len());
        assert_replays(&engine, &acked);
    }
}

/// Regression (issue 11, item 12): a segment roll held the writer lock
/// across its fsyncs while appenders waited on it holding their shard lock,
/// so a memory-only `get` on that shard waited for the disk (450 ns became
/// 801 ms with slow syncs). Here every fsync is held at a gate while a roll
/// is under way and another appender of the same shard is waiting; `get`
/// must answer before the gate opens.
#[test]
fn get_never_waits_for_a_roll_or_a_compaction_on_its_shard() {
    for via_compaction in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let gates = Arc::new(Gates::default());
        let engine = Arc::new(open_gated(dir.path(), &gates, Durability::None));
        assert!(write(&engine, "reader"));
        gates.close(Call::Sync);
        thread::scope(|s| {
            // The roller: appends until a roll starts (or a full compaction,
            // which rolls first), then blocks in the roll's fsync.
            let roller = Arc::clone(&engine);
            s.spawn(move || {
                if via_compaction {
                    let _ = roller.compact();
                } else {
                    for i in 0..1_000 {
                        if !write(&roller, &format!("fill-{i}")) {
                            break;
                        }
                    }
                }
            });
            assert!(
                gates.wait_entered(Call::Sync, 1, Duration::from_secs(30)),
                "no fsync started"
            );
            // Another appender of the same user (so the same shard) runs
            // into the roll.
            let appender = Arc::clone(&engine);
            s.spawn(move || write(&appender, "waits-for-the-roll"));
            thread::sleep(Duration::from_millis(50));
            let (tx, rx) = mpsc::channel();
            let reader = Arc::clone(&engine);
            s.spawn(move || {
                let _ = tx.send(reader.get("u", "reader").map(|v| v.is_some()));
            });
            let got = rx.recv_timeout(Duration::from_secs(10));
            gates.open(Call::Sync);
            assert!(
                matches!(got, Ok(Ok(true))),
                "get waited for the disk during a roll (compaction: {via_compaction}): {got:?}"
            );
        });
        engine.close().unwrap();
    }
}

/// Regression (issue 11, item 4): segment file numbers were 24 bits and
/// never reused, so every roll and compaction output used one up until
/// every roll failed with `Exhausted`. File numbers are 64-bit now (names
/// grow past six hex digits) and positions carry a reused slot instead.
#[test]
fn segment_numbers_past_two_to_the_24_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    {
        let engine = Engine::open(dir.path(), options(Durability::None)).unwrap();
        assert!(write(&engine, "before"));
    }
    // Renumber the only segment to 2^24 - 2, as if that many had been made.
    let number = (1u64 << 24) - 2;
    let old = dir.path().join("000001.log");
    let mut bytes = std::fs::read(&old).unwrap();
    set_header_number(&mut bytes, number);
    std::fs::remove_file(&old).unwrap();
    std::fs::write(dir.path().join(format!("{number:06x}.log")), &bytes).unwrap();

    let mut keys = vec!["before".to_owned()];
    for round in 0..3 {
        let engine = Engine::open(dir.path(), options(Durability::None)).unwrap();
        assert_replays(&engine, &keys);
        for i in 0..120 {
            let key = format!("r{round}-{i}");
            assert!(write(&engine, &key), "{key}");
            keys.push(key);
        }
        engine.compact().unwrap();
        assert_replays(&engine, &keys);
    }
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".log"))
        .collect();
    assert!(
        names.iter().all(|n| n.len() > "000000.log".len()),
        "every segment is numbered past 2^24 now: {names:?}"
    );
    let engine = Engine::open(dir.path(), options(Durability::None)).unwrap();
    assert_replays(&engine, &keys);
    drop(engine);
    let report = idemkv::verify(dir.path()).unwrap();
    assert!(report.records > 0, "{report:?}");
}

/// Rewrites a segment header's `file` and `order` fields (docs/FORMAT.md:
/// magic 8, version 4, crc 4 of bytes 16..56, then file, order, replaces,
/// token_floor, created_ms as u64 LE).
fn set_header_number(bytes: &mut [u8], number: u64) {
    bytes[16..24].copy_from_slice(&number.to_le_bytes());
    bytes[24..32].copy_from_slice(&number.to_le_bytes());
    let crc = crc32fast::hash(&bytes[16..56]);
    bytes[12..16].copy_from_slice(&crc.to_le_bytes());
}
