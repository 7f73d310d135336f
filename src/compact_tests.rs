//! Tombstones: a record that ended a lease must outlive the lease's own
//! records. These tests leave an older segment holding a lease's begin
//! uncompacted (it is mostly live) while the newer segment holding the
//! release or the short-lived completion is compacted; dropping the ending
//! record there would bring the lease back after a restart.

use std::sync::Arc;
use std::time::Duration;

use crate::storage::{SimDisk, Storage, Tear};
use crate::{Begin, Durability, Engine, Fingerprint, Lease, ManualClock, Options, Outcome};

fn open(disk: &SimDisk, clock: &Arc<ManualClock>) -> Engine {
    let storage: Arc<dyn Storage> = Arc::new(disk.clone());
    Engine::open_with_storage(
        storage,
        Options {
            durability: Durability::Sync,
            background: false,
            segment_bytes: 4096,
            lease_ttl: Duration::from_secs(30),
            clock: clock.clone(),
            ..Options::default()
        },
    )
    .unwrap()
}

fn started(engine: &Engine, key: &str) -> Lease {
    match engine
        .begin("u", key, Fingerprint::of(key.as_bytes()))
        .unwrap()
    {
        Begin::Started(lease) => lease,
        other => panic!("{key}: expected Started, got {other:?}"),
    }
}

fn done() -> Outcome {
    Outcome {
        status: 200,
        body: "ok".into(),
    }
}

/// A begin of "k" next to twenty live records, compacted into a segment
/// that stays mostly live.
fn lease_in_a_live_segment(engine: &Engine) -> Lease {
    let lease = started(engine, "k");
    for i in 0..20 {
        let other = started(engine, &format!("live-{i}"));
        engine.complete(&other, done()).unwrap();
    }
    engine.compact().unwrap();
    lease
}

/// Fills the active segment with dead records until it rolls.
fn roll_with_dead_records(engine: &Engine) {
    let segments = engine.stats().segments;
    let mut i = 0;
    while engine.stats().segments == segments {
        let lease = started(engine, &format!("dead-{i}"));
        engine.release(&lease).unwrap();
        i += 1;
    }
}

#[test]
fn a_release_outlives_the_begin_it_ended() {
    let disk = SimDisk::new();
    let clock = Arc::new(ManualClock::new(0));
    let engine = open(&disk, &clock);
    let lease = lease_in_a_live_segment(&engine);
    engine.release(&lease).unwrap();
    roll_with_dead_records(&engine);
    let report = engine.compact_below(0.5).unwrap();
    assert!(report.segments_compacted >= 1, "{report:?}");
    drop(engine);
    let engine = open(&disk.crash(Tear::Clean), &clock);
    assert_eq!(
        engine.get("u", "k").unwrap(),
        None,
        "the released lease came back"
    );
}

#[test]
fn a_short_lived_completion_outlives_the_begin_it_ended() {
    let disk = SimDisk::new();
    let clock = Arc::new(ManualClock::new(0));
    let engine = open(&disk, &clock);
    let lease = lease_in_a_live_segment(&engine);
    engine
        .complete_with_ttl(&lease, done(), Duration::from_millis(1))
        .unwrap();
    roll_with_dead_records(&engine);
    clock.advance(Duration::from_secs(1));
    let report = engine.compact_below(0.5).unwrap();
    assert!(report.segments_compacted >= 1, "{report:?}");
    drop(engine);
    let engine = open(&disk.crash(Tear::Clean), &clock);
    assert_eq!(
        engine.get("u", "k").unwrap(),
        None,
        "the completed lease came back"
    );
    // Once the lease's own deadline has passed the tombstone may go.
    clock.advance(Duration::from_secs(60));
    engine.compact().unwrap();
    drop(engine);
    let engine = open(&disk.crash(Tear::Clean), &clock);
    assert_eq!(engine.get("u", "k").unwrap(), None);
}

/// Regression (found by the `compaction_crash` fuzz target): an extend that
/// shortened a lease was dropped by compaction while the lease's begin, with
/// its later deadline, stayed in a segment left alone; after a crash the
/// lease was back in progress.
#[test]
fn an_extend_that_shortened_a_lease_outlives_the_begin_it_overrode() {
    let disk = SimDisk::new();
    let clock = Arc::new(ManualClock::new(0));
    let engine = open(&disk, &clock);
    let lease = lease_in_a_live_segment(&engine);
    // Shorten the lease to end in 1 ms: the key is absent from then on.
    engine.extend(&lease, Duration::from_millis(1)).unwrap();
    clock.advance(Duration::from_millis(1));
    assert_eq!(engine.get("u", "k").unwrap(), None);
    roll_with_dead_records(&engine);
    clock.advance(Duration::from_secs(1));
    let report = engine.compact_below(0.5).unwrap();
    assert!(report.segments_compacted >= 1, "{report:?}");
    drop(engine);
    let engine = open(&disk.crash(Tear::Clean), &clock);
    assert_eq!(
        engine.get("u", "k").unwrap(),
        None,
        "the shortened lease came back"
    );
}

/// Regression (a flaky background test): a rewrite that kept only
/// tombstones counted them as live for good, so it was never compacted
/// again and the directory did not shrink after the leases expired.
#[test]
fn kept_tombstones_stop_counting_once_their_leases_are_over() {
    let disk = SimDisk::new();
    let clock = Arc::new(ManualClock::new(0));
    let engine = open(&disk, &clock);
    let lease = lease_in_a_live_segment(&engine);
    engine.release(&lease).unwrap();
    roll_with_dead_records(&engine);
    let first = engine.compact_below(0.5).unwrap();
    assert!(
        first.records_kept >= 1,
        "the release is kept as a tombstone: {first:?}"
    );
    let segments = engine.stats().segments;
    // Once every lease involved is over, the tombstones' segment is dead.
    clock.advance(Duration::from_secs(31));
    let second = engine.compact_below(0.5).unwrap();
    assert!(second.segments_compacted >= 1, "{second:?}");
    assert!(engine.stats().segments < segments, "{second:?}");
}
