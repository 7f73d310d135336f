//! The sweeper and the compactor: bounded memory and disk under churn, and
//! no live record lost or dead record resurrected, whatever step a crash or
//! an I/O error interrupts (DESIGN.md invariants 1 and 6).

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use idemkv::storage::{Fault, SimDisk, SimOp, Storage, Tear};
use idemkv::{
    Begin, Durability, Engine, Fingerprint, Lease, ManualClock, Options, Outcome, RecordState,
};

const HOUR: Duration = Duration::from_secs(3600);

fn options(clock: &Arc<ManualClock>) -> Options {
    Options {
        durability: Durability::Sync,
        background: false,
        record_ttl: HOUR,
        lease_ttl: Duration::from_secs(30),
        segment_bytes: 64 * 1024,
        clock: clock.clone(),
        ..Options::default()
    }
}

fn sim_engine(disk: &SimDisk, clock: &Arc<ManualClock>) -> Engine {
    let storage: Arc<dyn Storage> = Arc::new(disk.clone());
    Engine::open_with_storage(storage, options(clock)).expect("open on the simulated disk")
}

fn started(engine: &Engine, user: &str, key: &str) -> Lease {
    match engine
        .begin(user, key, Fingerprint::of(key.as_bytes()))
        .expect("begin")
    {
        Begin::Started(lease) => lease,
        other => panic!("{user}/{key}: expected Started, got {other:?}"),
    }
}

fn body(key: &str) -> Outcome {
    Outcome {
        status: 201,
        body: format!("receipt for {key} {}", "x".repeat(key.len() * 7 % 300)).into(),
    }
}

/// The state every key must have: completed with its body, in progress
/// with a token, or absent.
#[derive(Clone, Debug, PartialEq)]
enum Want {
    Done(Outcome),
    Leased(u64),
    Absent,
}

fn check(engine: &Engine, want: &BTreeMap<String, Want>) {
    for (key, want) in want {
        let view = engine.get("u", key).expect("get");
        match want {
            Want::Done(outcome) => {
                assert_eq!(
                    engine.outcome("u", key).expect("outcome").as_ref(),
                    Some(outcome),
                    "{key}"
                );
                match engine
                    .begin("u", key, Fingerprint::of(key.as_bytes()))
                    .expect("begin")
                {
                    Begin::Replay(got) => assert_eq!(&got, outcome, "{key}"),
                    other => panic!("{key}: expected Replay, got {other:?}"),
                }
            }
            Want::Leased(token) => {
                let view = view.unwrap_or_else(|| panic!("{key}: lease lost"));
                assert_eq!(
                    (view.state, view.token),
                    (RecordState::InProgress, *token),
                    "{key}"
                );
            }
            Want::Absent => assert_eq!(view, None, "{key}: came back"),
        }
    }
}

/// Writes a mix: completed keys (some expiring soon), released keys,
/// in-progress leases (one extended), a short-TTL completion whose lease
/// deadline outlives it, then moves the clock so a part expires.
fn populate(engine: &Engine, clock: &ManualClock) -> BTreeMap<String, Want> {
    let mut want = BTreeMap::new();
    for i in 0..60 {
        let key = format!("done-{i:03}");
        let lease = started(engine, "u", &key);
        if i % 3 == 0 {
            engine
                .complete_with_ttl(&lease, body(&key), Duration::from_secs(60))
                .unwrap();
            want.insert(key, Want::Absent);
        } else {
            engine.complete(&lease, body(&key)).unwrap();
            let done = Want::Done(body(&key));
            want.insert(key, done);
        }
    }
    for i in 0..10 {
        let key = format!("released-{i}");
        let lease = started(engine, "u", &key);
        engine.release(&lease).unwrap();
        want.insert(key, Want::Absent);
    }
    let short = started(engine, "u", "short-ttl");
    engine
        .complete_with_ttl(&short, body("short-ttl"), Duration::from_millis(1))
        .unwrap();
    want.insert("short-ttl".into(), Want::Absent);
    clock.advance(Duration::from_secs(2));
    let leased = started(engine, "u", "leased");
    let extended = started(engine, "u", "extended");
    let extended = engine.extend(&extended, Duration::from_secs(600)).unwrap();
    clock.advance(Duration::from_secs(61));
    want.insert("leased".into(), Want::Absent); // its 30 s lease ran out
    want.insert("extended".into(), Want::Leased(extended.token()));
    let _ = leased;
    want
}

#[test]
fn compact_keeps_live_records_and_drops_dead_ones_across_reopen() {
    let disk = SimDisk::new();
    let clock = Arc::new(ManualClock::new(1_000_000));
    let engine = sim_engine(&disk, &clock);
    let want = populate(&engine, &clock);
    let before = engine.stats().disk_bytes;
    let report = engine.compact().unwrap();
    assert!(report.segments_compacted >= 1, "{report:?}");
    assert!(report.records_dropped > 0, "{report:?}");
    assert!(report.bytes_after < before, "{report:?} vs {before}");
    check(&engine, &want);
    drop(engine);
    let engine = sim_engine(&disk.crash(Tear::Clean), &clock);
    check(&engine, &want);
    // A second pass after a reopen finds nothing new to drop for live keys.
    engine.compact().unwrap();
    check(&engine, &want);
}

#[test]
fn compact_with_every_record_expired_leaves_little_more_than_headers() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(0));
    let engine = Engine::open(
        dir.path(),
        Options {
            durability: Durability::None,
            ..options(&clock)
        },
    )
    .unwrap();
    for i in 0..5_000 {
        let key = format!("k{i}");
        let lease = started(&engine, "u", &key);
        engine.complete(&lease, body(&key)).unwrap();
    }
    assert!(engine.stats().segments > 5);
    clock.advance(HOUR * 2);
    let report = engine.compact().unwrap();
    assert_eq!(report.records_kept, 0, "{report:?}");
    let stats = engine.stats();
    assert_eq!((stats.segments, stats.live_records), (1, 0));
    let on_disk: u64 = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(on_disk <= 128, "{on_disk} bytes left in the directory");
    drop(engine);
    let engine = Engine::open(dir.path(), options(&clock)).unwrap();
    assert_eq!(engine.stats().live_records, 0);
}

#[test]
fn a_released_key_stays_released_after_its_segment_is_compacted() {
    let disk = SimDisk::new();
    let clock = Arc::new(ManualClock::new(0));
    let engine = sim_engine(&disk, &clock);
    let lease = started(&engine, "u", "k");
    engine.release(&lease).unwrap();
    engine.compact().unwrap();
    let engine2 = sim_engine(&disk.crash(Tear::Clean), &clock);
    assert_eq!(engine2.get("u", "k").unwrap(), None);
    drop(engine2);
    // After the lease would have expired the tombstone goes, and still
    // nothing comes back.
    clock.advance(Duration::from_secs(31));
    engine.compact().unwrap();
    drop(engine);
    let engine = sim_engine(&disk.crash(Tear::Clean), &clock);
    assert_eq!(engine.get("u", "k").unwrap(), None);
    started(&engine, "u", "k");
}

#[test]
fn a_lease_completed_with_a_short_ttl_does_not_come_back_after_compaction() {
    let disk = SimDisk::new();
    let clock = Arc::new(ManualClock::new(0));
    let engine = sim_engine(&disk, &clock);
    let lease = started(&engine, "u", "k");
    engine
        .complete_with_ttl(&lease, body("k"), Duration::from_millis(5))
        .unwrap();
    // Roll the segment with the begin away, then compact with the complete
    // expired but its lease deadline (30 s) still ahead.
    engine.compact().unwrap();
    clock.advance(Duration::from_secs(1));
    engine.compact().unwrap();
    drop(engine);
    let engine = sim_engine(&disk.crash(Tear::Clean), &clock);
    assert_eq!(engine.get("u", "k").unwrap(), None);
    assert!(matches!(
        engine.begin("u", "k", Fingerprint::of(b"k")).unwrap(),
        Begin::Started(_)
    ));
}

#[test]
fn an_extended_lease_survives_compaction_of_its_begin() {
    let disk = SimDisk::new();
    let clock = Arc::new(ManualClock::new(0));
    let engine = sim_engine(&disk, &clock);
    let lease = started(&engine, "u", "k");
    engine.compact().unwrap(); // the begin now sits in a closed segment
    let lease = engine.extend(&lease, Duration::from_secs(300)).unwrap();
    engine.compact().unwrap(); // the begin is dead, the extend is live
    clock.advance(Duration::from_secs(100));
    drop(engine);
    let engine = sim_engine(&disk.crash(Tear::Clean), &clock);
    let view = engine.get("u", "k").unwrap().expect("lease kept");
    assert_eq!(
        (view.token, view.lease_expires_at_ms),
        (lease.token(), Some(lease.expires_at_ms()))
    );
    // The lease of the engine before the crash is refused by this one; the
    // key stays claimed until the lease expires.
    assert!(matches!(
        engine.complete(&lease, body("k")),
        Err(idemkv::Error::ForeignLease { .. })
    ));
    assert!(engine.get("u", "k").unwrap().is_some());
}

#[test]
fn churn_keeps_disk_and_memory_proportional_to_live_records() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(0));
    let engine = Engine::open(
        dir.path(),
        Options {
            durability: Durability::None,
            segment_bytes: 1 << 20,
            ..options(&clock)
        },
    )
    .unwrap();
    let payload = Outcome {
        status: 200,
        body: vec![b'r'; 160].into(),
    };
    let mut round_bytes = 0;
    for round in 0..20 {
        let before = engine.stats().disk_bytes;
        for i in 0..20_000 {
            let key = format!("{round:02}-{i:08x}-0000-4000-8000-000000000000");
            let lease = started(&engine, "merchant", &key);
            engine.complete(&lease, payload.clone()).unwrap();
        }
        if round == 0 {
            round_bytes = engine.stats().disk_bytes - before;
        }
        assert_eq!(engine.stats().live_records, 20_000, "round {round}");
        clock.advance(HOUR + Duration::from_secs(1));
        engine.compact().unwrap();
        let stats = engine.stats();
        assert_eq!(
            stats.live_records, 0,
            "round {round}: memory back to the live count"
        );
        assert!(
            stats.disk_bytes <= round_bytes / 10,
            "round {round}: {} bytes on disk after a compaction, one round writes {round_bytes}",
            stats.disk_bytes
        );
    }
    let stats = engine.stats();
    assert_eq!(stats.swept, 20 * 20_000);
    assert!(stats.bytes_reclaimed >= 19 * round_bytes);
}

#[test]
fn churn_with_live_data_stays_within_a_constant_factor_of_one_round() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(0));
    let engine = Engine::open(
        dir.path(),
        Options {
            durability: Durability::None,
            segment_bytes: 256 << 10,
            ..options(&clock)
        },
    )
    .unwrap();
    let payload = Outcome {
        status: 200,
        body: vec![b'r'; 160].into(),
    };
    let mut one_round = 0;
    for round in 0..20 {
        let before = engine.stats().disk_bytes;
        for i in 0..20_000 {
            let key = format!("{round:02}-{i:08x}");
            let lease = started(&engine, "merchant", &key);
            engine.complete(&lease, payload.clone()).unwrap();
        }
        if round == 0 {
            one_round = engine.stats().disk_bytes - before;
        }
        // Half a TTL per round: each round's records live two rounds.
        clock.advance(HOUR / 2 + Duration::from_secs(1));
        engine.compact().unwrap();
        let stats = engine.stats();
        assert!(
            stats.live_records <= 40_000,
            "round {round}: {} live",
            stats.live_records
        );
        assert!(
            stats.disk_bytes <= 3 * one_round,
            "round {round}: {} bytes on disk, a round is {one_round}",
            stats.disk_bytes
        );
    }
}

#[test]
fn the_background_thread_sweeps_and_compacts_on_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(0));
    let engine = Engine::open(
        dir.path(),
        Options {
            durability: Durability::None,
            background: true,
            sweep_interval: Duration::from_millis(20),
            segment_bytes: 4096,
            ..options(&clock)
        },
    )
    .unwrap();
    for i in 0..500 {
        let key = format!("k{i}");
        let lease = started(&engine, "u", &key);
        engine.complete(&lease, body(&key)).unwrap();
    }
    let segments = engine.stats().segments;
    clock.advance(HOUR * 2);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while engine.stats().swept < 500 || engine.stats().segments > 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "background pass never ran: {:?}",
            engine.stats()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(engine.stats().segments < segments);
    // Close joins the thread promptly.
    let started_close = std::time::Instant::now();
    engine.close().unwrap();
    assert!(started_close.elapsed() < Duration::from_secs(5));
}

#[test]
fn writes_during_compaction_are_never_lost() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(0));
    let engine = Engine::open(
        dir.path(),
        Options {
            durability: Durability::None,
            segment_bytes: 8192,
            ..options(&clock)
        },
    )
    .unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            for _ in 0..50 {
                engine.compact().unwrap();
            }
        });
        for i in 0..3_000 {
            let key = format!("k{i}");
            let lease = started(&engine, "u", &key);
            if i % 4 == 0 {
                engine.release(&lease).unwrap();
            } else {
                engine.complete(&lease, body(&key)).unwrap();
            }
        }
    });
    engine.compact().unwrap();
    drop(engine);
    let engine = Engine::open(dir.path(), options(&clock)).unwrap();
    for i in 0..3_000 {
        let key = format!("k{i}");
        if i % 4 == 0 {
            assert_eq!(engine.get("u", &key).unwrap(), None, "{key}");
        } else {
            assert_eq!(
                engine.outcome("u", &key).unwrap(),
                Some(body(&key)),
                "{key}"
            );
        }
    }
}

/// Every step of a compaction can fail; after the failure and a crash,
/// recovery finds every live record and nothing dead.
#[test]
fn a_crash_at_any_step_of_compaction_loses_nothing_and_resurrects_nothing() {
    let ops = [
        SimOp::Create,
        SimOp::Append,
        SimOp::Sync,
        SimOp::Rename,
        SimOp::SyncDir,
        SimOp::Remove,
    ];
    let mut cases = 0;
    for op in ops {
        for after in 0..4 {
            for tear in [Tear::Clean, Tear::Prefix(after), Tear::Garbage(after + 7)] {
                let disk = SimDisk::new();
                let clock = Arc::new(ManualClock::new(1_000_000));
                let engine = sim_engine(&disk, &clock);
                let want = populate(&engine, &clock);
                disk.inject(Fault {
                    op,
                    after,
                    kind: io::ErrorKind::Other,
                    sticky: false,
                });
                let _ = engine.compact();
                disk.clear_faults();
                let crashed = disk.crash(tear);
                drop(engine);
                let engine = sim_engine(&crashed, &clock);
                check(&engine, &want);
                // And a full compaction after recovery still keeps it all.
                engine.compact().unwrap();
                check(&engine, &want);
                drop(engine);
                check(&sim_engine(&crashed.crash(Tear::Clean), &clock), &want);
                cases += 1;
            }
        }
    }
    assert_eq!(cases, 72);
}

#[path = "common/crash_model.rs"]
mod crash_model;

/// The `compaction_crash` fuzz target's check, in every test run: seeded
/// inputs decoded into sequences with a full compaction after every third
/// operation and a power loss or fault inside it, against the model.
#[test]
fn seeded_compactions_survive_power_loss_inside_them() {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut crashes = 0;
    for case_no in 0..3000 {
        let len = 8 + (case_no % 90);
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let case = crash_model::decode_compaction(&bytes);
        match crash_model::run_case(&case) {
            Ok(stats) => crashes += stats.crashes,
            Err(e) => panic!("case {case_no} ({bytes:?}): {e}\n{case:#?}"),
        }
    }
    eprintln!("{crashes} power losses checked");
    assert!(crashes > 5_000, "only {crashes} power losses were checked");
}

/// Regression (issue 11, item 14): a failed compaction left its `.tmp`
/// output behind until the next open, and background failures were silent.
#[test]
fn a_failed_compaction_removes_its_unfinished_output_and_is_counted() {
    for op in [SimOp::Rename, SimOp::Append] {
        // Segments with both live and dead records, so a pass has work; made
        // again if a background pass already rewrote them (a loaded machine
        // can take longer than one interval to write them).
        let (disk, engine) = (0..20)
            .find_map(|_| {
                let disk = SimDisk::new();
                let clock = Arc::new(ManualClock::new(0));
                let storage: Arc<dyn Storage> = Arc::new(disk.clone());
                let engine = Engine::open_with_storage(
                    storage,
                    Options {
                        durability: Durability::Sync,
                        segment_bytes: 4096,
                        background: true,
                        sweep_interval: Duration::from_millis(100),
                        ..options(&clock)
                    },
                )
                .unwrap();
                for i in 0..200 {
                    let key = format!("k{i}");
                    let lease = started(&engine, "u", &key);
                    if i % 4 == 0 {
                        engine.complete(&lease, body(&key)).unwrap();
                    } else {
                        engine.release(&lease).unwrap();
                    }
                }
                (engine.stats().segments_compacted == 0).then_some((disk, engine))
            })
            .expect("20 tries, and a background pass always ran before the setup ended");
        // The fault is for the compactor's writes: under `Sync` nothing of
        // the engine's own waits in the log's buffer.
        assert_eq!(engine.stats().log_pending_bytes, 0);
        disk.inject(Fault {
            op,
            after: 0,
            kind: io::ErrorKind::Other,
            sticky: true,
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while engine.stats().compaction_errors < 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "{op:?}: no background failure counted: {:?}",
                engine.stats()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let tmp: Vec<String> = disk
            .names()
            .into_iter()
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(tmp.is_empty(), "{op:?}: left behind: {tmp:?}");
        let before = engine.stats();
        assert!(before.io_errors >= 2, "{op:?}: {before:?}");
        assert!(engine.compact().is_err());
        // A failed `compact` call is counted like a background pass.
        let after = engine.stats();
        assert!(
            after.compaction_errors > before.compaction_errors,
            "{op:?}: {after:?}"
        );
        assert!(after.io_errors > before.io_errors, "{op:?}: {after:?}");
        assert_eq!(after.compactions, before.compactions);
        assert!(
            !disk.names().iter().any(|n| n.ends_with(".tmp")),
            "{op:?}: a failed compact() left its output"
        );
        disk.clear_faults();
        drop(engine);
    }
}
