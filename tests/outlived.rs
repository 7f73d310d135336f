//! A lease that expires while its record is being made durable (a sync
//! slower than the lease TTL) is never handed out: found by the cluster's
//! failover test, where a sync waits on a JetStream quorum that lost a
//! server, and several `begin`s of one key each got `Started`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::gate::{Call, Gated, Gates};
use idemkv::storage::{SimDisk, Storage};
use idemkv::{
    AsyncEngine, Begin, Clock, Durability, Engine, Fingerprint, Lease, ManualClock, Options,
};

/// Two begins of one key across a sync that outlives the first's lease:
/// `asynch` runs them through `AsyncEngine`, else through `Engine`.
fn two_begins_across_a_stalled_sync(asynch: bool) -> (Arc<ManualClock>, [Begin; 2]) {
    let (gates, clock) = (
        Arc::new(Gates::default()),
        Arc::new(ManualClock::new(1_000)),
    );
    let storage: Arc<dyn Storage> = Gated::new(Arc::new(SimDisk::new()), &gates);
    let options = Options {
        durability: Durability::Sync,
        background: false,
        lease_ttl: Duration::from_secs(2),
        clock: clock.clone(),
        ..Options::default()
    };
    let engine = Arc::new(Engine::open_with_storage(storage, options).unwrap());
    let fp = Fingerprint::of(b"charge");
    // A first claim reserves fencing tokens (a sync): before the gate.
    let Begin::Started(warm) = engine.begin("u", "warm", fp).unwrap() else {
        panic!("fresh key")
    };
    engine.release(&warm).unwrap();
    let begin = {
        let engine = Arc::clone(&engine);
        move || {
            if asynch {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap();
                runtime.block_on(AsyncEngine::new(Arc::clone(&engine)).begin("u", "k", fp))
            } else {
                engine.begin("u", "k", fp)
            }
        }
    };
    gates.close(Call::Sync);
    let first = std::thread::spawn(begin.clone());
    // The first begin has claimed the key and its record waits at the gate.
    assert!(gates.wait_entered(Call::Sync, 1, Duration::from_secs(30)));
    // Its lease expires meanwhile; a second begin finds it expired.
    clock.advance(Duration::from_secs(3));
    let second = std::thread::spawn(begin);
    std::thread::sleep(Duration::from_millis(20));
    gates.open(Call::Sync);
    let answers = [
        first.join().unwrap().unwrap(),
        second.join().unwrap().unwrap(),
    ];
    (clock, answers)
}

#[test]
fn a_lease_that_expired_before_its_record_was_durable_is_not_handed_out() {
    for asynch in [false, true] {
        let (clock, answers) = two_begins_across_a_stalled_sync(asynch);
        // Exactly one holder, and its lease is live: the first begin's
        // lease expired before its record was durable, so it was not handed
        // out (the first begin looked again: it took the key over itself,
        // or found the second's claim in flight).
        let started: Vec<&Lease> = answers
            .iter()
            .filter_map(|a| match a {
                Begin::Started(lease) => Some(lease),
                _ => None,
            })
            .collect();
        assert_eq!(started.len(), 1, "asynch {asynch}: {answers:?}");
        assert!(
            started[0].expires_at_ms() > clock.now_ms(),
            "asynch {asynch}: an expired lease was handed out: {answers:?}"
        );
    }
}
