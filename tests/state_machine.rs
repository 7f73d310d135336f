//! The state machine of DESIGN.md, one test per row and per transition:
//! what `begin` answers on an absent, in-progress or completed record; how
//! `release`, expiry and `complete_with_ttl` move a record; what `get`,
//! `outcome`, `wait` and `stats` report along the way.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::{
    Harness, LEASE_TTL, RECORD_TTL, START_MS, fp, in_flight, mismatch, ms, outcome, replayed,
    started,
};
use idemkv::{Begin, Durability, RecordState, RecordView};

const U: &str = "user-1";
const K: &str = "order-7";

// ---- begin: the rows of the table -------------------------------------

#[test]
fn begin_on_an_absent_key_starts_a_lease_owned_by_the_caller() {
    let h = Harness::new();
    let lease = started(h.begin(U, K, fp("charge 10")).unwrap());
    assert_eq!(lease.user(), U.as_bytes());
    assert_eq!(lease.key(), K.as_bytes());
    assert_eq!(lease.fingerprint(), fp("charge 10"));
    assert_eq!(lease.expires_at_ms(), START_MS + ms(LEASE_TTL));
    assert!(lease.token() >= 1, "tokens start above zero");
}

#[test]
fn completed_key_replays_the_exact_status_and_bytes_to_the_same_fingerprint() {
    let h = Harness::new();
    let lease = h.start(U, K, fp("charge 10"));
    let body: Vec<u8> = (0..=255u8).chain([0, 0, b'\n', 0xff]).collect();
    h.complete(&lease, outcome(201, body.clone())).unwrap();
    for _ in 0..3 {
        let replay = replayed(h.begin(U, K, fp("charge 10")).unwrap());
        assert_eq!(replay.status, 201);
        assert_eq!(&replay.body[..], &body[..]);
    }
}

#[test]
fn completed_key_with_an_empty_body_replays_an_empty_body() {
    let h = Harness::new();
    let lease = h.start(U, K, fp("a"));
    h.complete(&lease, outcome(204, "")).unwrap();
    assert_eq!(replayed(h.begin(U, K, fp("a")).unwrap()), outcome(204, ""));
}

#[test]
fn in_progress_key_is_in_flight_with_retry_after_equal_to_the_time_left_on_the_lease() {
    let h = Harness::new();
    let _lease = h.start(U, K, fp("a"));
    assert_eq!(in_flight(h.begin(U, K, fp("a")).unwrap()), LEASE_TTL);
    h.advance(Duration::from_millis(12_345));
    assert_eq!(
        in_flight(h.begin(U, K, fp("a")).unwrap()),
        LEASE_TTL - Duration::from_millis(12_345)
    );
    h.advance(LEASE_TTL - Duration::from_millis(12_346));
    assert_eq!(
        in_flight(h.begin(U, K, fp("a")).unwrap()),
        Duration::from_millis(1),
        "one millisecond before the deadline the lease is still live"
    );
}

#[test]
fn different_fingerprint_on_an_in_progress_key_is_a_mismatch() {
    let h = Harness::new();
    let _lease = h.start(U, K, fp("a"));
    mismatch(h.begin(U, K, fp("b")).unwrap());
}

#[test]
fn different_fingerprint_on_a_completed_key_is_a_mismatch_never_a_replay() {
    let h = Harness::new();
    let lease = h.start(U, K, fp("a"));
    h.complete(&lease, outcome(200, "secret")).unwrap();
    mismatch(h.begin(U, K, fp("b")).unwrap());
    mismatch(h.begin(U, K, idemkv::Fingerprint::from_u128(0)).unwrap());
}

#[test]
fn mismatch_changes_nothing_and_the_owner_still_completes() {
    let h = Harness::new();
    let lease = h.start(U, K, fp("a"));
    let before = h.get(U, K).unwrap();
    mismatch(h.begin(U, K, fp("b")).unwrap());
    assert_eq!(h.get(U, K).unwrap(), before);
    h.complete(&lease, outcome(200, "ok")).unwrap();
    assert_eq!(
        replayed(h.begin(U, K, fp("a")).unwrap()),
        outcome(200, "ok")
    );
}

#[test]
fn same_key_under_two_users_is_two_unrelated_records() {
    let h = Harness::new();
    let l1 = h.start("U1", K, fp("a"));
    // Not InFlight and not Mismatch: U2's K is another record.
    let l2 = h.start("U2", K, fp("b"));
    assert!(l2.token() > l1.token());
    h.complete(&l1, outcome(201, "for U1")).unwrap();
    assert_eq!(
        h.get("U2", K).unwrap().map(|v| v.state),
        Some(RecordState::InProgress)
    );
    h.complete(&l2, outcome(402, "for U2")).unwrap();
    assert_eq!(
        replayed(h.begin("U1", K, fp("a")).unwrap()),
        outcome(201, "for U1")
    );
    assert_eq!(
        replayed(h.begin("U2", K, fp("b")).unwrap()),
        outcome(402, "for U2")
    );
    mismatch(h.begin("U1", K, fp("b")).unwrap());
    // A third user has nothing under K.
    assert_eq!(h.get("U3", K).unwrap(), None);
}

#[test]
fn user_and_key_are_not_confused_by_concatenation() {
    let h = Harness::new();
    let l1 = h.start("ab", "c", fp("a"));
    h.complete(&l1, outcome(200, "ab/c")).unwrap();
    // ("a", "bc") concatenates to the same bytes but is another record.
    let l2 = h.start("a", "bc", fp("a"));
    h.complete(&l2, outcome(200, "a/bc")).unwrap();
    assert_eq!(
        replayed(h.begin("ab", "c", fp("a")).unwrap()),
        outcome(200, "ab/c")
    );
    assert_eq!(
        replayed(h.begin("a", "bc", fp("a")).unwrap()),
        outcome(200, "a/bc")
    );
}

// ---- release ------------------------------------------------------------

#[test]
fn released_key_lets_a_retry_start_with_a_greater_token() {
    let h = Harness::new();
    let first = h.start(U, K, fp("a"));
    h.release(&first).unwrap();
    assert_eq!(h.get(U, K).unwrap(), None);
    assert_eq!(h.outcome(U, K).unwrap(), None);
    let retry = h.start(U, K, fp("a"));
    assert!(retry.token() > first.token());
    h.complete(&retry, outcome(200, "second try")).unwrap();
    assert_eq!(
        replayed(h.begin(U, K, fp("a")).unwrap()),
        outcome(200, "second try")
    );
}

#[test]
fn released_key_can_start_with_another_fingerprint() {
    let h = Harness::new();
    let first = h.start(U, K, fp("a"));
    h.release(&first).unwrap();
    let other = h.start(U, K, fp("b"));
    assert_eq!(other.fingerprint(), fp("b"));
}

// ---- expiry -------------------------------------------------------------

#[test]
fn completed_record_replays_until_record_ttl_and_then_starts_whatever_the_fingerprint() {
    let h = Harness::new();
    let lease = h.start(U, K, fp("a"));
    h.advance(Duration::from_secs(1));
    h.complete(&lease, outcome(200, "done")).unwrap();
    let expires = START_MS + 1_000 + ms(RECORD_TTL);
    assert_eq!(h.get(U, K).unwrap().unwrap().expires_at_ms, Some(expires));

    h.clock.set(expires - 1);
    assert_eq!(
        replayed(h.begin(U, K, fp("a")).unwrap()),
        outcome(200, "done")
    );

    h.clock.set(expires);
    assert_eq!(h.get(U, K).unwrap(), None);
    assert_eq!(h.outcome(U, K).unwrap(), None);
    let fresh = started(h.begin(U, K, fp("b")).unwrap());
    assert!(fresh.token() > lease.token());
    assert_eq!(fresh.expires_at_ms(), expires + ms(LEASE_TTL));
}

#[test]
fn expired_completed_record_starts_again_for_the_same_fingerprint() {
    let h = Harness::new();
    let lease = h.start(U, K, fp("a"));
    h.complete(&lease, outcome(200, "done")).unwrap();
    h.advance(RECORD_TTL);
    let again = started(h.begin(U, K, fp("a")).unwrap());
    assert!(again.token() > lease.token());
    assert_eq!(h.stats().expirations, 1);
    assert_eq!(h.stats().takeovers, 0, "a completed record is not a lease");
}

#[test]
fn complete_with_ttl_shortens_the_life_of_one_record() {
    let h = Harness::new();
    let short = h.start(U, "short", fp("a"));
    let long = h.start(U, "default", fp("a"));
    h.complete_with_ttl(&short, outcome(200, "s"), Duration::from_secs(5))
        .unwrap();
    h.complete(&long, outcome(200, "d")).unwrap();
    assert_eq!(
        h.get(U, "short").unwrap().unwrap().expires_at_ms,
        Some(START_MS + 5_000)
    );
    h.advance(Duration::from_millis(4_999));
    assert_eq!(replayed(h.begin(U, "short", fp("a")).unwrap()).body, "s");
    h.advance(Duration::from_millis(1));
    started(h.begin(U, "short", fp("a")).unwrap());
    assert_eq!(replayed(h.begin(U, "default", fp("a")).unwrap()).body, "d");
}

#[test]
fn complete_with_ttl_lengthens_the_life_of_one_record() {
    let h = Harness::new();
    let lease = h.start(U, K, fp("a"));
    h.complete_with_ttl(&lease, outcome(200, "kept"), RECORD_TTL * 2)
        .unwrap();
    h.advance(RECORD_TTL + Duration::from_secs(1));
    assert_eq!(replayed(h.begin(U, K, fp("a")).unwrap()).body, "kept");
    h.advance(RECORD_TTL);
    started(h.begin(U, K, fp("a")).unwrap());
}

// ---- get and outcome ----------------------------------------------------

#[test]
fn get_shows_an_in_progress_record_with_its_token_and_lease_deadline() {
    let h = Harness::new();
    let lease = h.start(U, K, fp("a"));
    assert_eq!(
        h.get(U, K).unwrap(),
        Some(RecordView {
            state: RecordState::InProgress,
            token: lease.token(),
            lease_expires_at_ms: Some(START_MS + ms(LEASE_TTL)),
            expires_at_ms: None,
            status: None,
        })
    );
}

#[test]
fn get_shows_a_completed_record_with_its_status_and_expiry() {
    let h = Harness::new();
    let lease = h.start(U, K, fp("a"));
    h.advance(Duration::from_secs(2));
    h.complete(&lease, outcome(409, "conflict")).unwrap();
    assert_eq!(
        h.get(U, K).unwrap(),
        Some(RecordView {
            state: RecordState::Completed,
            token: lease.token(),
            lease_expires_at_ms: None,
            expires_at_ms: Some(START_MS + 2_000 + ms(RECORD_TTL)),
            status: Some(409),
        })
    );
}

#[test]
fn get_returns_none_for_absent_keys_and_expired_leases() {
    let h = Harness::new();
    assert_eq!(h.get(U, K).unwrap(), None);
    let _lease = h.start(U, K, fp("a"));
    h.advance(LEASE_TTL - Duration::from_millis(1));
    assert!(h.get(U, K).unwrap().is_some());
    h.advance(Duration::from_millis(1));
    assert_eq!(h.get(U, K).unwrap(), None);
}

#[test]
fn outcome_loads_the_stored_body_of_a_completed_record() {
    let h = Harness::new();
    let lease = h.start(U, K, fp("a"));
    let body = vec![7u8; 100_000];
    h.complete(&lease, outcome(200, body.clone())).unwrap();
    let stored = h.outcome(U, K).unwrap().unwrap();
    assert_eq!(stored.status, 200);
    assert_eq!(&stored.body[..], &body[..]);
}

#[test]
fn outcome_is_none_while_absent_in_progress_or_expired() {
    let h = Harness::new();
    assert_eq!(h.outcome(U, K).unwrap(), None);
    let lease = h.start(U, K, fp("a"));
    assert_eq!(h.outcome(U, K).unwrap(), None);
    h.complete(&lease, outcome(200, "x")).unwrap();
    assert_eq!(h.outcome(U, K).unwrap(), Some(outcome(200, "x")));
    h.advance(RECORD_TTL);
    assert_eq!(h.outcome(U, K).unwrap(), None);
}

// ---- wait ---------------------------------------------------------------

/// A wall-clock bound far above any real wait, so only a hang fails it.
const GENEROUS: Duration = Duration::from_secs(10);

#[test]
fn wait_returns_the_outcome_to_another_thread_when_the_owner_completes() {
    let h = Harness::new();
    let lease = h.start(U, K, fp("a"));
    thread::scope(|s| {
        let waiter = s.spawn(|| {
            let t = Instant::now();
            (h.wait(U, K, fp("a"), Duration::from_secs(30)), t.elapsed())
        });
        thread::sleep(Duration::from_millis(50));
        h.complete(&lease, outcome(201, "made")).unwrap();
        let (got, took) = waiter.join().unwrap();
        assert_eq!(got.unwrap(), Some(outcome(201, "made")));
        assert!(took < GENEROUS, "wait took {took:?}");
    });
}

#[test]
fn wait_returns_none_when_the_owner_releases() {
    let h = Harness::new();
    let lease = h.start(U, K, fp("a"));
    thread::scope(|s| {
        let waiter = s.spawn(|| {
            let t = Instant::now();
            (h.wait(U, K, fp("a"), Duration::from_secs(30)), t.elapsed())
        });
        thread::sleep(Duration::from_millis(50));
        h.release(&lease).unwrap();
        let (got, took) = waiter.join().unwrap();
        assert_eq!(got.unwrap(), None);
        assert!(took < GENEROUS, "wait took {took:?}");
    });
}

#[test]
fn wait_returns_none_when_the_lease_expires_on_the_engine_clock() {
    let h = Harness::new();
    let _lease = h.start(U, K, fp("a"));
    thread::scope(|s| {
        let waiter = s.spawn(|| {
            let t = Instant::now();
            (h.wait(U, K, fp("a"), Duration::from_secs(30)), t.elapsed())
        });
        thread::sleep(Duration::from_millis(50));
        h.advance(LEASE_TTL);
        let (got, took) = waiter.join().unwrap();
        assert_eq!(got.unwrap(), None);
        assert!(took < GENEROUS, "wait took {took:?}");
    });
}

#[test]
fn wait_times_out_with_none_while_the_lease_is_held() {
    let h = Harness::new();
    let _lease = h.start(U, K, fp("a"));
    let timeout = Duration::from_millis(150);
    let t = Instant::now();
    assert_eq!(h.wait(U, K, fp("a"), timeout).unwrap(), None);
    let took = t.elapsed();
    assert!(
        took >= timeout,
        "returned after {took:?}, before the timeout"
    );
    assert!(took < GENEROUS, "wait took {took:?}");
    // The timeout follows wall time, not the engine clock.
    assert_eq!(h.now_ms(), START_MS);
    assert_eq!(
        h.get(U, K).unwrap().map(|v| v.state),
        Some(RecordState::InProgress)
    );
}

#[test]
fn wait_returns_at_once_for_absent_and_completed_keys() {
    let h = Harness::new();
    let t = Instant::now();
    assert_eq!(
        h.wait(U, K, fp("a"), Duration::from_secs(60)).unwrap(),
        None
    );
    assert!(t.elapsed() < GENEROUS);

    let lease = h.start(U, K, fp("a"));
    h.complete(&lease, outcome(200, "here")).unwrap();
    let t = Instant::now();
    assert_eq!(
        h.wait(U, K, fp("a"), Duration::from_secs(60)).unwrap(),
        Some(outcome(200, "here"))
    );
    assert!(t.elapsed() < GENEROUS);
}

#[test]
fn wait_ignores_changes_to_other_keys() {
    let h = Harness::new();
    let _mine = h.start(U, K, fp("a"));
    let other = h.start(U, "other", fp("a"));
    thread::scope(|s| {
        let waiter = s.spawn(|| h.wait(U, K, fp("a"), Duration::from_millis(300)));
        thread::sleep(Duration::from_millis(50));
        h.complete(&other, outcome(200, "not yours")).unwrap();
        assert_eq!(waiter.join().unwrap().unwrap(), None);
    });
}

// ---- stats --------------------------------------------------------------

#[test]
fn stats_count_every_kind_of_answer_and_write() {
    let h = Harness::new();
    assert_eq!(h.stats().begins, 0);

    // A: started, in flight, mismatch, completed, replayed.
    let a = h.start(U, "A", fp("a"));
    in_flight(h.begin(U, "A", fp("a")).unwrap());
    mismatch(h.begin(U, "A", fp("z")).unwrap());
    h.complete(&a, outcome(200, "a")).unwrap();
    replayed(h.begin(U, "A", fp("a")).unwrap());
    // B: started, released.
    let b = h.start(U, "B", fp("b"));
    h.release(&b).unwrap();
    // C: started, expired, taken over; the stale owner is refused.
    let c = h.start(U, "C", fp("c"));
    h.advance(LEASE_TTL);
    let c2 = h.start(U, "C", fp("c"));
    common::lease_lost(h.complete(&c, outcome(200, "late")));
    common::lease_lost(h.extend(&c, LEASE_TTL));
    // A successful extend is a write but no completion.
    h.extend(&c2, LEASE_TTL).unwrap();

    let s = h.stats();
    assert_eq!(s.begins, 7, "{s:?}");
    assert_eq!(s.started, 4, "{s:?}");
    assert_eq!(s.replays, 1, "{s:?}");
    assert_eq!(s.in_flight, 1, "{s:?}");
    assert_eq!(s.mismatches, 1, "{s:?}");
    assert_eq!(s.takeovers, 1, "{s:?}");
    assert_eq!(s.expirations, 1, "{s:?}");
    assert_eq!(s.lease_lost, 2, "{s:?}");
    assert_eq!(s.completions, 1, "{s:?}");
    assert_eq!(s.releases, 1, "{s:?}");
    // begin A, complete A, begin B, release B, begin C, begin C2, extend C2.
    // And the token reservation before the first lease.
    assert_eq!(s.records_written, 7 + 1, "{s:?}");
    assert!(s.bytes_written > 7 * 8, "{s:?}");
    // Serial acknowledged writes under Sync each need their own fsync.
    assert!(s.fsyncs > 0, "{s:?}");
    assert!(s.fsyncs >= s.records_written, "{s:?}");
    // A (completed) and C (in progress); B was released.
    assert_eq!(s.live_records, 2, "{s:?}");
    assert!(s.segments >= 1, "{s:?}");
}

#[test]
fn stats_do_not_count_reads() {
    let h = Harness::new();
    let lease = h.start(U, K, fp("a"));
    h.complete(&lease, outcome(200, "x")).unwrap();
    let before = h.stats();
    h.get(U, K).unwrap();
    h.outcome(U, K).unwrap();
    h.wait(U, K, fp("a"), Duration::from_secs(1)).unwrap();
    assert_eq!(h.stats(), before);
}

#[test]
fn durability_none_acknowledges_writes_without_fsync() {
    let h = Harness::with(|o| o.durability = Durability::None);
    let lease = h.start(U, K, fp("a"));
    h.complete(&lease, outcome(200, "x")).unwrap();
    assert_eq!(replayed(h.begin(U, K, fp("a")).unwrap()).body, "x");
    let s = h.stats();
    // A begin, a complete and the token reservation; only the reservation
    // is synced (it must survive a crash in every mode).
    assert_eq!(s.records_written, 2 + 1, "{s:?}");
    assert_eq!(s.fsyncs, 1, "{s:?}");
}

#[test]
fn begin_answers_are_the_four_variants_of_the_table() {
    // A compile-time reminder that the table has exactly four rows: adding a
    // variant to `Begin` must revisit these tests.
    fn row(answer: &Begin) -> &'static str {
        match answer {
            Begin::Started(_) => "started",
            Begin::Replay(_) => "replay",
            Begin::InFlight { .. } => "in flight",
            Begin::Mismatch => "mismatch",
        }
    }
    let h = Harness::new();
    assert_eq!(row(&h.begin(U, K, fp("a")).unwrap()), "started");
    assert_eq!(row(&h.begin(U, K, fp("a")).unwrap()), "in flight");
    assert_eq!(row(&h.begin(U, K, fp("b")).unwrap()), "mismatch");
}

/// The API contract's shapes: `user` and `key` are independent generic
/// parameters, `Options` is built as a literal over `Default`, and an
/// `Arc<ManualClock>` fits the `Arc<dyn Clock>` field.
#[test]
fn the_contract_shapes_compile_and_work() {
    let manual = std::sync::Arc::new(idemkv::ManualClock::new(5_000));
    let dir = tempfile::tempdir().unwrap();
    let options = idemkv::Options {
        durability: idemkv::Durability::Sync,
        clock: manual.clone(),
        ..idemkv::Options::default()
    };
    let engine = idemkv::Engine::open(dir.path(), options).unwrap();
    let user = String::from("user");
    let key = String::from("key");
    let fp = idemkv::Fingerprint::of(b"body");
    let idemkv::Begin::Started(lease) = engine.begin(user.clone(), &key, fp).unwrap() else {
        panic!("a new key starts");
    };
    assert_eq!(lease.expires_at_ms(), 5_000 + 30_000);
    engine
        .complete(
            &lease,
            idemkv::Outcome {
                status: 201,
                body: bytes::Bytes::from_static(b"ok"),
            },
        )
        .unwrap();
    match engine.begin(&user[..], key.as_bytes(), fp).unwrap() {
        idemkv::Begin::Replay(out) => assert_eq!(
            out,
            idemkv::Outcome {
                status: 201,
                body: bytes::Bytes::from_static(b"ok")
            }
        ),
        other => panic!("{other:?}"),
    }
    let stats: idemkv::Stats = engine.stats();
    assert_eq!((stats.started, stats.replays), (1, 1));
}

// ---- wait and begin_wait check the fingerprint (issue 11, item 6) -------

#[test]
fn wait_never_returns_another_requests_outcome() {
    // Regression: a retry of request A waiting on the key was handed request
    // B's stored body.
    let h = Harness::new();
    let lease = h.start(U, K, fp("b"));
    thread::scope(|s| {
        let waiter = s.spawn(|| h.wait(U, K, fp("a"), Duration::from_secs(30)));
        thread::sleep(Duration::from_millis(50));
        h.complete(&lease, outcome(200, "b's body")).unwrap();
        assert_eq!(waiter.join().unwrap().unwrap(), None);
    });
    // Completed for B: A's wait answers None at once, B's gets the body.
    assert_eq!(h.wait(U, K, fp("a"), GENEROUS).unwrap(), None);
    assert_eq!(
        h.wait(U, K, fp("b"), GENEROUS).unwrap(),
        Some(outcome(200, "b's body"))
    );
}

#[test]
fn begin_wait_replays_the_holders_outcome_for_the_same_request() {
    let h = Harness::new();
    let lease = h.start(U, K, fp("a"));
    thread::scope(|s| {
        let waiter = s.spawn(|| h.begin_wait(U, K, fp("a"), Duration::from_secs(30)));
        thread::sleep(Duration::from_millis(50));
        h.complete(&lease, outcome(201, "made")).unwrap();
        assert_eq!(
            replayed(waiter.join().unwrap().unwrap()),
            outcome(201, "made")
        );
    });
}

#[test]
fn begin_wait_answers_mismatch_for_another_request() {
    let h = Harness::new();
    let lease = h.start(U, K, fp("b"));
    thread::scope(|s| {
        let waiter = s.spawn(|| h.begin_wait(U, K, fp("a"), Duration::from_secs(30)));
        mismatch(waiter.join().unwrap().unwrap());
        h.complete(&lease, outcome(201, "b")).unwrap();
    });
    mismatch(h.begin_wait(U, K, fp("a"), GENEROUS).unwrap());
}

#[test]
fn begin_wait_starts_when_the_holder_releases_or_its_lease_expires() {
    let h = Harness::new();
    let first = h.start(U, K, fp("a"));
    thread::scope(|s| {
        let waiter = s.spawn(|| h.begin_wait(U, K, fp("a"), Duration::from_secs(30)));
        thread::sleep(Duration::from_millis(50));
        h.release(&first).unwrap();
        let lease = started(waiter.join().unwrap().unwrap());
        assert!(lease.token() > first.token());
    });
    let h = Harness::new();
    let first = h.start(U, K, fp("a"));
    thread::scope(|s| {
        let waiter = s.spawn(|| h.begin_wait(U, K, fp("a"), Duration::from_secs(30)));
        thread::sleep(Duration::from_millis(50));
        h.advance(LEASE_TTL);
        let lease = started(waiter.join().unwrap().unwrap());
        assert!(lease.token() > first.token());
    });
}

#[test]
fn begin_wait_answers_in_flight_only_after_its_timeout() {
    let h = Harness::new();
    let _lease = h.start(U, K, fp("a"));
    let timeout = Duration::from_millis(150);
    let t = Instant::now();
    in_flight(h.begin_wait(U, K, fp("a"), timeout).unwrap());
    assert!(t.elapsed() >= timeout, "answered before the timeout");
    // A zero timeout is begin.
    in_flight(h.begin_wait(U, K, fp("a"), Duration::ZERO).unwrap());
}
