//! Leases and fencing (DESIGN.md invariant 3): takeover after expiry, stale
//! owners refused with `LeaseLost`, `extend`, and fencing tokens that
//! strictly increase across keys and across a restart of the engine.

mod common;

use std::time::Duration;

use common::{
    Harness, LEASE_TTL, START_MS, fp, in_flight, lease_lost, mismatch, ms, outcome, replayed,
    started,
};
use idemkv::{Error, LostReason, RecordState};

const U: &str = "user-1";
const K: &str = "order-7";

// ---- takeover and fencing -----------------------------------------------

#[test]
fn begin_after_lease_expiry_takes_over_with_a_strictly_greater_token() {
    let h = Harness::new();
    let old = h.start(U, K, fp("a"));
    h.advance(LEASE_TTL - Duration::from_millis(1));
    in_flight(h.begin(U, K, fp("a")).unwrap());
    h.advance(Duration::from_millis(1));
    let new = started(h.begin(U, K, fp("a")).unwrap());
    assert!(
        new.token() > old.token(),
        "{} > {}",
        new.token(),
        old.token()
    );
    assert_eq!(new.expires_at_ms(), START_MS + 2 * ms(LEASE_TTL));
    let view = h.get(U, K).unwrap().unwrap();
    assert_eq!(view.token, new.token());
    assert_eq!(view.state, RecordState::InProgress);
    assert_eq!(h.stats().takeovers, 1);
}

#[test]
fn expired_lease_can_be_taken_over_by_another_fingerprint() {
    let h = Harness::new();
    let _old = h.start(U, K, fp("a"));
    h.advance(LEASE_TTL);
    let new = started(h.begin(U, K, fp("b")).unwrap());
    assert_eq!(new.fingerprint(), fp("b"));
    mismatch(h.begin(U, K, fp("a")).unwrap());
}

#[test]
fn superseded_lease_gets_lease_lost_from_complete_extend_and_release() {
    let h = Harness::new();
    let old = h.start(U, K, fp("a"));
    h.advance(LEASE_TTL);
    let new = h.start(U, K, fp("a"));
    let superseded = LostReason::Superseded {
        current: new.token(),
    };
    assert_eq!(
        lease_lost(h.complete(&old, outcome(200, "late"))),
        (old.token(), superseded)
    );
    assert_eq!(
        lease_lost(h.extend(&old, LEASE_TTL)),
        (old.token(), superseded)
    );
    assert_eq!(lease_lost(h.release(&old)), (old.token(), superseded));
    assert_eq!(h.stats().lease_lost, 3);
    // The new owner is untouched.
    let view = h.get(U, K).unwrap().unwrap();
    assert_eq!(view.token, new.token());
    assert_eq!(view.lease_expires_at_ms, Some(new.expires_at_ms()));
    h.complete(&new, outcome(200, "new")).unwrap();
}

#[test]
fn stale_lease_never_overwrites_the_new_owners_completion() {
    let h = Harness::new();
    let old = h.start(U, K, fp("a"));
    h.advance(LEASE_TTL);
    let new = h.start(U, K, fp("a"));
    h.complete(&new, outcome(201, "from the new owner"))
        .unwrap();

    let (token, reason) = lease_lost(h.complete(&old, outcome(500, "from the stale owner")));
    assert_eq!(token, old.token());
    assert_eq!(
        reason,
        LostReason::Superseded {
            current: new.token()
        }
    );
    lease_lost(h.complete_with_ttl(&old, outcome(500, "stale"), Duration::from_secs(1)));
    lease_lost(h.release(&old));

    assert_eq!(
        replayed(h.begin(U, K, fp("a")).unwrap()),
        outcome(201, "from the new owner")
    );
    assert_eq!(
        h.outcome(U, K).unwrap(),
        Some(outcome(201, "from the new owner"))
    );
    assert_eq!(h.get(U, K).unwrap().unwrap().token, new.token());
    assert_eq!(h.stats().completions, 1);
}

#[test]
fn stale_lease_cannot_complete_after_the_new_owner_released() {
    let h = Harness::new();
    let old = h.start(U, K, fp("a"));
    h.advance(LEASE_TTL);
    let new = h.start(U, K, fp("a"));
    h.release(&new).unwrap();
    let (token, reason) = lease_lost(h.complete(&old, outcome(200, "late")));
    assert_eq!(token, old.token());
    // Its own deadline has passed: expired, whatever happened since.
    assert_eq!(reason, LostReason::Expired);
    assert_eq!(h.get(U, K).unwrap(), None);
}

#[test]
fn stale_lease_cannot_complete_after_the_new_owner_also_expired() {
    let h = Harness::new();
    let old = h.start(U, K, fp("a"));
    h.advance(LEASE_TTL);
    let new = h.start(U, K, fp("a"));
    h.advance(LEASE_TTL);
    let (token, _) = lease_lost(h.complete(&old, outcome(200, "late")));
    assert_eq!(token, old.token());
    assert_eq!(
        lease_lost(h.complete(&new, outcome(200, "late too"))),
        (new.token(), LostReason::Expired)
    );
    assert_eq!(h.get(U, K).unwrap(), None);
}

// ---- the owner's own lease ------------------------------------------------

#[test]
fn expired_lease_cannot_complete_with_old_token_even_without_takeover() {
    let h = Harness::new();
    let lease = h.start(U, K, fp("a"));
    h.advance(LEASE_TTL);
    assert_eq!(
        lease_lost(h.complete(&lease, outcome(200, "late"))),
        (lease.token(), LostReason::Expired)
    );
    assert_eq!(
        lease_lost(h.extend(&lease, LEASE_TTL)),
        (lease.token(), LostReason::Expired)
    );
    assert_eq!(
        lease_lost(h.release(&lease)),
        (lease.token(), LostReason::Expired)
    );
    assert_eq!(h.get(U, K).unwrap(), None);
    assert_eq!(h.outcome(U, K).unwrap(), None);
    started(h.begin(U, K, fp("a")).unwrap());
}

#[test]
fn complete_twice_is_lease_lost_completed_and_keeps_the_first_outcome() {
    let h = Harness::new();
    let lease = h.start(U, K, fp("a"));
    h.complete(&lease, outcome(200, "first")).unwrap();
    assert_eq!(
        lease_lost(h.complete(&lease, outcome(500, "second"))),
        (lease.token(), LostReason::Completed)
    );
    assert_eq!(
        lease_lost(h.extend(&lease, LEASE_TTL)),
        (lease.token(), LostReason::Completed)
    );
    assert_eq!(
        lease_lost(h.release(&lease)),
        (lease.token(), LostReason::Completed)
    );
    assert_eq!(
        replayed(h.begin(U, K, fp("a")).unwrap()),
        outcome(200, "first")
    );
}

#[test]
fn released_lease_is_lost_for_every_later_owner_call() {
    let h = Harness::new();
    let lease = h.start(U, K, fp("a"));
    h.release(&lease).unwrap();
    assert_eq!(
        lease_lost(h.complete(&lease, outcome(200, "late"))),
        (lease.token(), LostReason::Gone)
    );
    assert_eq!(
        lease_lost(h.release(&lease)),
        (lease.token(), LostReason::Gone)
    );
    assert_eq!(
        lease_lost(h.extend(&lease, LEASE_TTL)),
        (lease.token(), LostReason::Gone)
    );
    assert_eq!(h.get(U, K).unwrap(), None);
}

#[test]
fn released_lease_cannot_complete_over_a_retry_that_started_after_it() {
    let h = Harness::new();
    let first = h.start(U, K, fp("a"));
    h.release(&first).unwrap();
    let retry = h.start(U, K, fp("a"));
    let (token, reason) = lease_lost(h.complete(&first, outcome(200, "stale")));
    assert_eq!(token, first.token());
    assert_eq!(
        reason,
        LostReason::Superseded {
            current: retry.token()
        }
    );
    h.complete(&retry, outcome(200, "retry")).unwrap();
    assert_eq!(replayed(h.begin(U, K, fp("a")).unwrap()).body, "retry");
}

// ---- extend ---------------------------------------------------------------

#[test]
fn extend_keeps_a_lease_alive_past_its_original_deadline() {
    let h = Harness::new();
    let lease = h.start(U, K, fp("a"));
    let original = lease.expires_at_ms();
    h.advance(Duration::from_secs(20));
    let extended = h.extend(&lease, Duration::from_secs(60)).unwrap();
    assert_eq!(extended.token(), lease.token());
    assert_eq!(extended.user(), lease.user());
    assert_eq!(extended.key(), lease.key());
    assert_eq!(extended.fingerprint(), lease.fingerprint());
    assert_eq!(extended.expires_at_ms(), START_MS + 20_000 + 60_000);
    assert!(extended.expires_at_ms() > original);
    assert_eq!(
        h.get(U, K).unwrap().unwrap().lease_expires_at_ms,
        Some(extended.expires_at_ms())
    );

    // Past the original deadline nobody can take over.
    h.clock.set(original + 1);
    assert_eq!(
        in_flight(h.begin(U, K, fp("a")).unwrap()),
        Duration::from_millis(extended.expires_at_ms() - original - 1)
    );
    h.complete(&extended, outcome(200, "done late but in time"))
        .unwrap();
    assert_eq!(
        replayed(h.begin(U, K, fp("a")).unwrap()).body,
        "done late but in time"
    );
}

#[test]
fn extended_lease_still_refuses_another_fingerprint() {
    let h = Harness::new();
    let lease = h.start(U, K, fp("a"));
    h.advance(Duration::from_secs(20));
    h.extend(&lease, Duration::from_secs(60)).unwrap();
    h.advance(Duration::from_secs(20));
    mismatch(h.begin(U, K, fp("b")).unwrap());
    assert_eq!(
        in_flight(h.begin(U, K, fp("a")).unwrap()),
        Duration::from_secs(40)
    );
}

#[test]
fn the_lease_from_before_an_extend_still_completes_because_the_token_is_the_same() {
    let h = Harness::new();
    let lease = h.start(U, K, fp("a"));
    h.advance(Duration::from_secs(20));
    let _extended = h.extend(&lease, Duration::from_secs(60)).unwrap();
    h.advance(Duration::from_secs(20));
    h.complete(&lease, outcome(200, "ok")).unwrap();
}

#[test]
fn extended_lease_expires_at_its_new_deadline() {
    let h = Harness::new();
    let lease = h.start(U, K, fp("a"));
    let extended = h.extend(&lease, Duration::from_secs(45)).unwrap();
    h.clock.set(extended.expires_at_ms());
    assert_eq!(
        lease_lost(h.complete(&extended, outcome(200, "late"))),
        (lease.token(), LostReason::Expired)
    );
    let next = started(h.begin(U, K, fp("a")).unwrap());
    assert!(next.token() > lease.token());
}

#[test]
fn extend_can_be_repeated_as_a_heartbeat() {
    let h = Harness::new();
    let mut lease = h.start(U, K, fp("a"));
    for _ in 0..10 {
        h.advance(LEASE_TTL - Duration::from_secs(1));
        lease = h.extend(&lease, LEASE_TTL).unwrap();
        in_flight(h.begin(U, K, fp("a")).unwrap());
    }
    assert_eq!(h.now_ms(), START_MS + 10 * 29_000);
    h.complete(&lease, outcome(200, "after ten heartbeats"))
        .unwrap();
    assert_eq!(h.stats().takeovers, 0);
}

// ---- tokens ---------------------------------------------------------------

#[test]
fn tokens_strictly_increase_across_keys_and_users() {
    let h = Harness::new();
    let mut last = 0;
    for i in 0..50 {
        let user = format!("user-{}", i % 7);
        let key = format!("key-{i}");
        let lease = h.start(&user, &key, fp("a"));
        assert!(lease.token() > last, "token {} after {last}", lease.token());
        last = lease.token();
        if i % 2 == 0 {
            h.complete(&lease, outcome(200, "x")).unwrap();
        } else {
            h.release(&lease).unwrap();
        }
    }
}

#[test]
fn tokens_keep_growing_after_the_engine_is_dropped_and_reopened() {
    let mut h = Harness::new();
    let mut last = 0;
    for round in 0..3 {
        for i in 0..5 {
            let key = format!("r{round}-k{i}");
            let lease = h.start(U, &key, fp("a"));
            assert!(lease.token() > last, "token {} after {last}", lease.token());
            last = lease.token();
            match i % 3 {
                0 => h.complete(&lease, outcome(200, "x")).unwrap(),
                1 => h.release(&lease).unwrap(),
                _ => {} // left in progress
            }
        }
        h = h.reopen();
    }
}

#[test]
fn tokens_keep_growing_across_many_segments_and_reopens() {
    let mut h = Harness::with(|o| o.segment_bytes = 4096);
    let mut last = 0;
    for round in 0..3 {
        for i in 0..100 {
            let key = format!("round-{round}-key-{i}");
            let lease = h.start(U, &key, fp("a"));
            assert!(lease.token() > last, "token {} after {last}", lease.token());
            last = lease.token();
            h.complete(&lease, outcome(200, key)).unwrap();
        }
        assert!(h.stats().segments > 1, "{:?}", h.stats());
        h = h.reopen();
        for r in 0..=round {
            for i in 0..100 {
                let key = format!("round-{r}-key-{i}");
                assert_eq!(replayed(h.begin(U, &key, fp("a")).unwrap()).body, key);
            }
        }
    }
}

#[test]
fn token_after_reopen_is_greater_even_if_the_last_lease_was_released() {
    let h = Harness::new();
    let lease = h.start(U, K, fp("a"));
    h.release(&lease).unwrap();
    let h = h.reopen();
    let next = h.start(U, "other", fp("a"));
    assert!(next.token() > lease.token());
}

#[test]
fn in_progress_leases_and_completed_records_survive_reopen() {
    let h = Harness::new();
    let done = h.start(U, "done", fp("a"));
    h.complete(&done, outcome(201, vec![0u8, 1, 2, 255]))
        .unwrap();
    let running = h.start(U, "running", fp("a"));
    h.advance(Duration::from_secs(5));
    let extended = h.start(U, "extended", fp("a"));
    let extended = h.extend(&extended, Duration::from_secs(100)).unwrap();
    let released = h.start(U, "released", fp("a"));
    h.release(&released).unwrap();
    let views: Vec<_> = ["done", "running", "extended", "released"]
        .iter()
        .map(|k| h.get(U, k).unwrap())
        .collect();

    let h = h.reopen();
    let after: Vec<_> = ["done", "running", "extended", "released"]
        .iter()
        .map(|k| h.get(U, k).unwrap())
        .collect();
    assert_eq!(after, views);
    assert_eq!(after[3], None);
    assert_eq!(
        replayed(h.begin(U, "done", fp("a")).unwrap()),
        outcome(201, vec![0u8, 1, 2, 255])
    );
    mismatch(h.begin(U, "done", fp("b")).unwrap());
    assert_eq!(
        in_flight(h.begin(U, "running", fp("a")).unwrap()),
        LEASE_TTL - Duration::from_secs(5)
    );
    assert_eq!(
        h.get(U, "extended").unwrap().unwrap().lease_expires_at_ms,
        Some(extended.expires_at_ms())
    );
    started(h.begin(U, "released", fp("a")).unwrap());
    assert_eq!(h.get(U, "running").unwrap().unwrap().token, running.token());
}

/// Regression (issue 11, item 3): an engine accepted a lease it did not
/// issue (from another directory, or from its own earlier open) and stored
/// that lease's fingerprint and body.
#[test]
fn a_lease_from_an_earlier_open_is_refused_and_changes_nothing() {
    let h = Harness::new();
    let lease = h.start(U, K, fp("a"));
    let h = h.reopen();
    h.advance(Duration::from_secs(10));
    let foreign = |r: idemkv::Result<()>| match r {
        Err(Error::ForeignLease { token }) => assert_eq!(token, lease.token()),
        other => panic!("expected ForeignLease, got {other:?}"),
    };
    foreign(h.complete(&lease, outcome(200, "finished across a restart")));
    foreign(h.release(&lease));
    foreign(h.extend(&lease, LEASE_TTL).map(|_| ()));
    // The key is still held by the lease (which expires on its own).
    let view = h.get(U, K).unwrap().expect("still in progress");
    assert_eq!(view.state, RecordState::InProgress);
    assert_eq!(view.token, lease.token());
    h.advance(LEASE_TTL);
    let new = started(h.begin(U, K, fp("a")).unwrap());
    assert!(new.token() > lease.token());
}

#[test]
fn a_lease_from_another_directory_is_refused_and_changes_nothing() {
    let a = Harness::new();
    let b = Harness::new();
    let from_a = a.start(U, K, fp("a"));
    let from_b = b.start(U, K, fp("b"));
    // Same user and key, maybe even the same token: still refused.
    assert!(matches!(
        b.complete(&from_a, outcome(200, "a's body")),
        Err(Error::ForeignLease { .. })
    ));
    b.complete(&from_b, outcome(201, "b's body")).unwrap();
    assert_eq!(
        replayed(b.begin(U, K, fp("b")).unwrap()),
        outcome(201, "b's body")
    );
    mismatch(b.begin(U, K, fp("a")).unwrap());
    a.complete(&from_a, outcome(200, "a's body")).unwrap();
}

#[test]
fn old_lease_expired_across_reopen_cannot_complete_and_is_taken_over() {
    let h = Harness::new();
    let lease = h.start(U, K, fp("a"));
    h.advance(LEASE_TTL);
    let h = h.reopen();
    assert!(matches!(
        h.complete(&lease, outcome(200, "late")),
        Err(Error::ForeignLease { .. })
    ));
    let new = started(h.begin(U, K, fp("a")).unwrap());
    assert!(new.token() > lease.token());
}

#[test]
fn lease_taken_over_after_reopen_fences_the_pre_restart_owner() {
    let h = Harness::new();
    let old = h.start(U, K, fp("a"));
    let h = h.reopen();
    h.advance(LEASE_TTL);
    let new = started(h.begin(U, K, fp("a")).unwrap());
    assert!(new.token() > old.token());
    assert!(matches!(
        h.complete(&old, outcome(200, "stale")),
        Err(Error::ForeignLease { .. })
    ));
    h.complete(&new, outcome(200, "new")).unwrap();
    let h = h.reopen();
    assert_eq!(replayed(h.begin(U, K, fp("a")).unwrap()).body, "new");
    assert_eq!(h.get(U, K).unwrap().unwrap().token, new.token());
}

// ---- the reason a lease was lost does not depend on the sweeper -----------

/// Regression (issue 11, item 10): an expired lease got `Expired` before the
/// sweeper ran and `Gone` after.
#[test]
fn the_reason_of_a_lost_lease_is_the_same_before_and_after_the_sweep() {
    type Then = fn(&Harness, &idemkv::Lease);
    let cases: [(&str, Then); 3] = [
        ("expired", |h, _| h.advance(LEASE_TTL)),
        (
            "expired and taken over, the successor expired too",
            |h, _| {
                h.advance(LEASE_TTL);
                let next = h.start(U, K, fp("a"));
                h.complete_with_ttl(&next, outcome(200, "x"), Duration::from_secs(1))
                    .unwrap();
                h.advance(Duration::from_secs(2));
            },
        ),
        (
            "completed, and the record expired before the lease would have",
            |h, l| {
                h.complete_with_ttl(l, outcome(200, "x"), Duration::from_secs(1))
                    .unwrap();
                h.advance(Duration::from_secs(2));
            },
        ),
    ];
    for (what, then) in cases {
        let h = Harness::new();
        let lease = h.start(U, K, fp("a"));
        then(&h, &lease);
        let before = lease_lost(h.complete(&lease, outcome(200, "late")));
        let swept = h.compact().unwrap().expired;
        assert!(swept > 0, "{what}: nothing was swept");
        let after = lease_lost(h.complete(&lease, outcome(200, "late")));
        assert_eq!(before, after, "{what}");
        assert_eq!(
            lease_lost(h.extend(&lease, LEASE_TTL)),
            after,
            "{what}: extend"
        );
        assert_eq!(lease_lost(h.release(&lease)), after, "{what}: release");
    }
}

// ---- lease deadlines follow a monotonic clock (issue 11, item 22) ---------

/// Regression: lease expiry followed wall time, so an NTP step forward
/// larger than `lease_ttl` let a retry take over work still running.
#[test]
fn a_wall_clock_step_forward_does_not_hand_a_running_lease_to_a_retry() {
    let h = Harness::new();
    let lease = h.start(U, K, fp("a"));
    h.clock.jump_wall_forward(LEASE_TTL * 10);
    in_flight(h.begin(U, K, fp("a")).unwrap());
    assert_eq!(
        h.get(U, K).unwrap().map(|v| v.state),
        Some(RecordState::InProgress)
    );
    // The holder still owns the key and stores its outcome; the record's
    // TTL runs from the (stepped) wall time.
    let lease = h.extend(&lease, LEASE_TTL).unwrap();
    h.complete(&lease, outcome(201, "once")).unwrap();
    assert_eq!(
        replayed(h.begin(U, K, fp("a")).unwrap()),
        outcome(201, "once")
    );
}

#[test]
fn a_wall_clock_step_back_does_not_keep_an_expired_lease_alive() {
    let h = Harness::new();
    let old = h.start(U, K, fp("a"));
    h.clock.jump_wall_back(LEASE_TTL * 10);
    h.advance(LEASE_TTL);
    let new = started(h.begin(U, K, fp("a")).unwrap());
    assert!(new.token() > old.token());
    assert_eq!(
        lease_lost(h.complete(&old, outcome(200, "late"))).1,
        LostReason::Superseded {
            current: new.token()
        }
    );
}

#[test]
fn record_ttls_follow_wall_time() {
    let h = Harness::new();
    let lease = h.start(U, K, fp("a"));
    h.complete_with_ttl(&lease, outcome(200, "x"), Duration::from_secs(60))
        .unwrap();
    h.clock.jump_wall_forward(Duration::from_secs(61));
    // The stored outcome expired with wall time: the key starts afresh.
    started(h.begin(U, K, fp("a")).unwrap());
}
