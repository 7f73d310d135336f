//! Concurrent callers (DESIGN.md invariant 3 and group commit): racing
//! `begin`s on one key grant exactly one lease; racing owner calls succeed
//! once; many writers share fsyncs under `Durability::Sync`.

mod common;

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use common::{Harness, LEASE_TTL, fp, lease_lost, outcome, replayed};
use idemkv::{Begin, Durability, Engine, Error, Lease, LostReason, Outcome};

// The engine is shared across threads by reference or `Arc`; a compile-time
// check that it (and what crosses threads with it) stays `Send + Sync`.
const _: () = {
    const fn send_sync_static<T: Send + Sync + 'static>() {}
    send_sync_static::<Engine>();
    send_sync_static::<Lease>();
    send_sync_static::<Outcome>();
    send_sync_static::<Begin>();
    send_sync_static::<Error>();
};

const U: &str = "user-1";
const K: &str = "order-7";

/// What `threads` callers racing `begin` on one key got, counted by answer.
#[derive(Debug, Default)]
struct Tally {
    started: Vec<Lease>,
    in_flight: usize,
    replays: usize,
    mismatches: usize,
}

impl Tally {
    fn of(answers: Vec<Begin>) -> Tally {
        let mut t = Tally::default();
        for answer in answers {
            match answer {
                Begin::Started(lease) => t.started.push(lease),
                Begin::InFlight { retry_after } => {
                    assert_eq!(retry_after, LEASE_TTL, "the clock does not move");
                    t.in_flight += 1;
                }
                Begin::Replay(_) => t.replays += 1,
                Begin::Mismatch => t.mismatches += 1,
            }
        }
        t
    }
}

/// `threads` callers pass a barrier together and `begin` the same key, each
/// with the fingerprint `fingerprint(i)`.
fn race_begin(
    engine: &Engine,
    threads: usize,
    fingerprint: impl Fn(usize) -> String + Sync,
) -> Vec<Begin> {
    let barrier = Barrier::new(threads);
    thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let (barrier, fingerprint) = (&barrier, &fingerprint);
                s.spawn(move || {
                    barrier.wait();
                    engine.begin(U, K, fp(&fingerprint(i))).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn exactly_one_of_racing_begins_starts(threads: usize, durability: Durability) {
    let h = Harness::with(|o| o.durability = durability);
    let tally = Tally::of(race_begin(&h, threads, |_| "same".into()));
    assert_eq!(tally.started.len(), 1, "{tally:?}");
    assert_eq!(tally.in_flight, threads - 1, "{tally:?}");
    assert_eq!((tally.replays, tally.mismatches), (0, 0), "{tally:?}");
    let s = h.stats();
    assert_eq!(s.begins, threads as u64);
    assert_eq!(s.started, 1);
    assert_eq!(s.in_flight, threads as u64 - 1);
    // The begin, and the token reservation before the first lease.
    assert_eq!(s.records_written, 1 + 1);
    assert_eq!(
        h.get(U, K).unwrap().unwrap().token,
        tally.started[0].token()
    );
    // The one owner completes; everyone retrying now gets the replay.
    h.complete(&tally.started[0], outcome(200, "once")).unwrap();
    let tally = Tally::of(race_begin(&h, threads, |_| "same".into()));
    assert_eq!(tally.replays, threads, "{tally:?}");
}

#[test]
fn one_of_16_racing_begins_on_one_key_starts_and_15_are_in_flight() {
    exactly_one_of_racing_begins_starts(16, Durability::Sync);
}

#[test]
fn one_of_32_racing_begins_on_one_key_starts_and_31_are_in_flight() {
    exactly_one_of_racing_begins_starts(32, Durability::Sync);
}

#[test]
fn one_of_64_racing_begins_on_one_key_starts_and_63_are_in_flight() {
    exactly_one_of_racing_begins_starts(64, Durability::Sync);
}

#[test]
fn one_of_16_racing_begins_starts_under_durability_none() {
    exactly_one_of_racing_begins_starts(16, Durability::None);
}

#[test]
fn one_of_32_racing_begins_starts_under_durability_none() {
    exactly_one_of_racing_begins_starts(32, Durability::None);
}

#[test]
fn one_of_64_racing_begins_starts_under_durability_none() {
    exactly_one_of_racing_begins_starts(64, Durability::None);
}

#[test]
fn racing_begins_with_different_fingerprints_start_one_and_the_rest_mismatch() {
    let h = Harness::new();
    let tally = Tally::of(race_begin(&h, 32, |i| format!("request {i}")));
    assert_eq!(tally.started.len(), 1, "{tally:?}");
    assert_eq!(tally.mismatches, 31, "{tally:?}");
    assert_eq!((tally.in_flight, tally.replays), (0, 0), "{tally:?}");
}

#[test]
fn racing_takeovers_of_an_expired_lease_start_exactly_one() {
    let h = Harness::new();
    let old = h.start(U, K, fp("same"));
    h.advance(LEASE_TTL);
    let tally = Tally::of(race_begin(&h, 32, |_| "same".into()));
    assert_eq!(tally.started.len(), 1, "{tally:?}");
    assert_eq!(tally.in_flight, 31, "{tally:?}");
    let new = &tally.started[0];
    assert!(new.token() > old.token());
    assert_eq!(h.stats().takeovers, 1);
    assert_eq!(
        lease_lost(h.complete(&old, outcome(200, "stale"))),
        (
            old.token(),
            LostReason::Superseded {
                current: new.token()
            }
        )
    );
}

#[test]
fn racing_completes_of_one_lease_succeed_exactly_once() {
    let h = Harness::new();
    let lease = h.start(U, K, fp("a"));
    let threads = 16;
    let barrier = Barrier::new(threads);
    let results: Vec<_> = thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let (barrier, lease, h) = (&barrier, &lease, &h);
                s.spawn(move || {
                    barrier.wait();
                    let r = h.complete(lease, outcome(200, format!("from {i}")));
                    (i, r)
                })
            })
            .collect();
        handles.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let winners: Vec<usize> = results
        .iter()
        .filter(|(_, r)| r.is_ok())
        .map(|(i, _)| *i)
        .collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    for (_, r) in results.into_iter().filter(|(_, r)| r.is_err()) {
        assert_eq!(lease_lost(r), (lease.token(), LostReason::Completed));
    }
    assert_eq!(
        replayed(h.begin(U, K, fp("a")).unwrap()).body,
        format!("from {}", winners[0])
    );
    assert_eq!(h.stats().completions, 1);
}

#[test]
fn racing_complete_and_release_of_one_lease_apply_exactly_one() {
    let h = Harness::new();
    for round in 0..20 {
        let key = format!("k{round}");
        let lease = h.start(U, &key, fp("a"));
        let barrier = Barrier::new(2);
        let (completed, released) = thread::scope(|s| {
            let c = s.spawn(|| {
                barrier.wait();
                h.complete(&lease, outcome(200, "done"))
            });
            let r = s.spawn(|| {
                barrier.wait();
                h.release(&lease)
            });
            (c.join().unwrap(), r.join().unwrap())
        });
        match (completed, released) {
            (Ok(()), Err(e)) => {
                assert_eq!(lease_lost(Err::<(), _>(e)).1, LostReason::Completed);
                assert_eq!(replayed(h.begin(U, &key, fp("a")).unwrap()).body, "done");
            }
            (Err(e), Ok(())) => {
                assert_eq!(lease_lost(Err::<(), _>(e)).1, LostReason::Gone);
                assert_eq!(h.get(U, &key).unwrap(), None);
            }
            other => panic!("exactly one of complete and release must win: {other:?}"),
        }
    }
}

#[test]
fn many_threads_on_many_keys_of_one_user_complete_and_share_fsyncs() {
    let h = Harness::new();
    let (threads, keys_per_thread) = (16, 20);
    let barrier = Barrier::new(threads);
    thread::scope(|s| {
        for t in 0..threads {
            let (barrier, h) = (&barrier, &h);
            s.spawn(move || {
                barrier.wait();
                for k in 0..keys_per_thread {
                    let key = format!("t{t}-k{k}");
                    let lease = h.start(U, &key, fp(&key));
                    h.complete(&lease, outcome(200, key.clone())).unwrap();
                }
            });
        }
    });
    let n = (threads * keys_per_thread) as u64;
    let s = h.stats();
    assert_eq!(s.started, n, "{s:?}");
    assert_eq!(s.completions, n, "{s:?}");
    // A begin and a complete per key, and one token reservation.
    assert_eq!(s.records_written, 2 * n + 1, "{s:?}");
    assert_eq!(s.live_records, n, "{s:?}");
    assert!(s.fsyncs > 0, "{s:?}");
    assert!(
        s.fsyncs < s.records_written,
        "group commit should share fsyncs between concurrent writers: {s:?}"
    );
    for t in 0..threads {
        for k in 0..keys_per_thread {
            let key = format!("t{t}-k{k}");
            assert_eq!(
                replayed(h.begin(U, &key, fp(&key)).unwrap()),
                outcome(200, key.clone())
            );
        }
    }
    // Everything acknowledged is there after a restart.
    let h = h.reopen();
    assert_eq!(h.stats().live_records, n);
}

#[test]
fn engine_in_an_arc_serves_spawned_threads() {
    let h = Harness::new();
    let engine = Arc::new(Engine::open(h.dir.path().join("shared"), h.options.clone()).unwrap());
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let engine = Arc::clone(&engine);
            thread::spawn(move || {
                let key = format!("k{i}");
                let lease = common::started(engine.begin(U, &key, fp("a")).unwrap());
                engine.complete(&lease, outcome(200, key)).unwrap();
                lease.token()
            })
        })
        .collect();
    let mut tokens: Vec<u64> = handles.into_iter().map(|t| t.join().unwrap()).collect();
    tokens.sort_unstable();
    tokens.dedup();
    assert_eq!(tokens.len(), 8, "every lease has its own token");
    assert_eq!(engine.stats().completions, 8);
}

#[test]
fn waiters_on_one_key_all_get_the_outcome() {
    let h = Harness::new();
    let lease = h.start(U, K, fp("a"));
    thread::scope(|s| {
        let waiters: Vec<_> = (0..8)
            .map(|_| s.spawn(|| h.wait(U, K, fp("a"), Duration::from_secs(30))))
            .collect();
        thread::sleep(Duration::from_millis(50));
        h.complete(&lease, outcome(200, "for all")).unwrap();
        for w in waiters {
            assert_eq!(w.join().unwrap().unwrap(), Some(outcome(200, "for all")));
        }
    });
}

/// Group commit under load: 48 durable callers on many users, with
/// segments small enough that rolls keep interleaving with sync rounds
/// (a roll makes a whole segment durable at once, outside any round).
/// Every call must return (a lost wake-up would hang: the watchdog fails
/// the test instead), share fsyncs, and survive a restart.
#[test]
fn durable_callers_across_rolls_all_return_share_fsyncs_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let options = || idemkv::Options {
        durability: Durability::Sync,
        segment_bytes: 8 << 10,
        background: false,
        ..idemkv::Options::default()
    };
    let (threads, pairs) = (48, 40);
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let path = dir.path().to_path_buf();
    let worker = thread::spawn(move || {
        let engine = Engine::open(&path, options()).unwrap();
        thread::scope(|s| {
            for t in 0..threads {
                let engine = &engine;
                s.spawn(move || {
                    for k in 0..pairs {
                        let (user, key) = (format!("u{}", (t * 7 + k) % 50), format!("t{t}-k{k}"));
                        let Begin::Started(lease) =
                            engine.begin(user.as_str(), &key, fp(&key)).unwrap()
                        else {
                            panic!("{user}/{key} not started");
                        };
                        engine.complete(&lease, outcome(200, key.clone())).unwrap();
                    }
                });
            }
        });
        let stats = engine.stats();
        engine.close().unwrap();
        let _ = done_tx.send(stats);
    });
    let stats = done_rx
        .recv_timeout(Duration::from_secs(120))
        .expect("durable callers did not all return within 120 s");
    worker.join().unwrap();
    let n = (threads * pairs) as u64;
    assert_eq!(stats.completions, n, "{stats:?}");
    assert!(stats.segments > 3, "rolls should interleave: {stats:?}");
    assert!(stats.fsyncs < stats.records_written, "{stats:?}");
    let engine = Engine::open(dir.path(), options()).unwrap();
    assert_eq!(engine.stats().live_records, n);
    for t in 0..threads {
        for k in 0..pairs {
            let (user, key) = (format!("u{}", (t * 7 + k) % 50), format!("t{t}-k{k}"));
            assert_eq!(
                replayed(engine.begin(user.as_str(), &key, fp(&key)).unwrap()),
                outcome(200, key.clone())
            );
        }
    }
}
