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
