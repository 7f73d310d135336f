//! The replicating storage against an in-memory changelog: what every
//! acknowledged call leaves in the changelog, what a refused send leaves
//! behind, and what a copy finds after crashes at any point.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use parking_lot::Mutex;

use super::replicate::{Changelog, ReplicatingStorage, Replication, reconcile};
use crate::outcome::{Begin, Fingerprint, Outcome};
use crate::storage::{SimDisk, Storage, Tear};
use crate::{Engine, Error, Options};

/// A changelog in memory: messages in order, the fence checked like
/// JetStream's expected-last-sequence, and failures on demand.
#[derive(Debug, Default)]
struct MemoryLog {
    /// `None`: purged.
    messages: Mutex<Vec<Option<Bytes>>>,
    /// Appends from this count on fail (`u64::MAX`: none).
    fail_from: AtomicU64,
    /// Whether a failing append lands anyway (the ack was lost).
    lands_anyway: AtomicBool,
    appends: AtomicU64,
    /// At this append (`u64::MAX`: never) the process dies or the power
    /// fails (per the tear number): the disk as that leaves it is kept in
    /// `crashed`, and the append fails (landing per `lands_anyway`).
    crash_at: AtomicU64,
    disk: Mutex<Option<(SimDisk, u64)>>,
    crashed: Mutex<Option<SimDisk>>,
    /// At this append (`u64::MAX`: never) another writer's message lands
    /// first and this one is accepted anyway, one past where it expected
    /// (JetStream's expected-sequence pre-check racing a leader change).
    interleave_at: AtomicU64,
}

impl MemoryLog {
    fn new() -> Arc<MemoryLog> {
        let log = MemoryLog::default();
        log.fail_from.store(u64::MAX, Ordering::SeqCst);
        log.crash_at.store(u64::MAX, Ordering::SeqCst);
        log.interleave_at.store(u64::MAX, Ordering::SeqCst);
        Arc::new(log)
    }

    /// The messages after `seq` that were not purged.
    fn since(&self, seq: u64) -> Vec<(u64, Bytes)> {
        let m = self.messages.lock();
        (seq as usize..m.len())
            .filter_map(|i| Some((i as u64 + 1, m[i].clone()?)))
            .collect()
    }

    /// Purges every message before `seq`.
    fn purge_before(&self, seq: u64) {
        let mut m = self.messages.lock();
        for slot in m.iter_mut().take(seq.saturating_sub(1) as usize) {
            *slot = None;
        }
    }

    fn last(&self) -> u64 {
        self.messages.lock().len() as u64
    }
}

impl Changelog for MemoryLog {
    fn append(&self, frames: Bytes, expected_last: u64) -> io::Result<u64> {
        let n = self.appends.fetch_add(1, Ordering::SeqCst);
        let mut m = self.messages.lock();
        if n == self.interleave_at.load(Ordering::SeqCst) && m.len() as u64 == expected_last {
            m.push(Some(Bytes::new())); // the other writer's (a fence)
            m.push(Some(frames));
            return Ok(m.len() as u64);
        }
        if m.len() as u64 != expected_last {
            return Err(io::Error::other("wrong last sequence"));
        }
        if n == self.crash_at.load(Ordering::SeqCst)
            && let Some((disk, tear)) = self.disk.lock().take()
        {
            // Odd: the process dies (every byte it wrote survives, the
            // mark too); even: the machine loses power.
            let after = if tear % 2 == 1 {
                disk.kill()
            } else {
                disk.crash(Tear::Prefix(tear))
            };
            *self.crashed.lock() = Some(after);
            if self.lands_anyway.load(Ordering::SeqCst) {
                m.push(Some(frames));
            }
            return Err(io::Error::other("the process died here"));
        }
        if n >= self.fail_from.load(Ordering::SeqCst) {
            if self.lands_anyway.load(Ordering::SeqCst) {
                m.push(Some(frames));
            }
            return Err(io::Error::other("injected changelog failure"));
        }
        m.push(Some(frames));
        Ok(m.len() as u64)
    }
}

fn options() -> Options {
    Options {
        background: false,
        ..Options::default()
    }
}

/// Opens a copy of the partition on `disk`: reconciles, opens, copies in
/// the changelog past the mark, and (if `own`) fences and takes ownership.
fn open_copy(disk: &SimDisk, log: &Arc<MemoryLog>, own: bool) -> (Engine, Arc<Replication>) {
    let seq = reconcile(disk).unwrap();
    let changelog: Arc<dyn Changelog> = log.clone();
    let inner: Arc<dyn Storage> = Arc::new(disk.clone());
    let replication = Replication::new(changelog, Arc::clone(&inner), true, seq);
    let storage = ReplicatingStorage::new(inner, Arc::clone(&replication));
    let engine = Engine::open_as(Arc::new(storage), options(), 7).unwrap();
    for (seq, frames) in log.since(seq) {
        if let Some(last) = engine.ingest(&frames).unwrap() {
            engine.wait_ingested(last).unwrap();
        }
        replication.copied(seq);
    }
    if own {
        let fence = log.append(Bytes::new(), log.last()).unwrap();
        replication.take_ownership(fence);
    }
    (engine, replication)
}

/// The state a fresh copy builds from the whole changelog.
fn rebuilt(log: &Arc<MemoryLog>) -> Engine {
    let (engine, _) = open_copy(&SimDisk::new(), log, false);
    engine
}

fn outcome(body: String) -> Outcome {
    Outcome {
        status: 200,
        body: body.into(),
    }
}

fn keys() -> impl Iterator<Item = String> {
    (0..12).map(|k| format!("k{k}"))
}

#[test]
fn every_acknowledged_record_is_in_the_changelog() {
    let disk = SimDisk::new();
    let log = MemoryLog::new();
    let (engine, _) = open_copy(&disk, &log, true);
    let fp = Fingerprint::of(b"r");
    for key in keys() {
        let Begin::Started(lease) = engine.begin("u", &key, fp).unwrap() else {
            panic!("fresh key")
        };
        engine.complete(&lease, outcome(key.clone())).unwrap();
    }
    // Nothing of this copy's files is consulted: the changelog alone.
    let copy = rebuilt(&log);
    for key in keys() {
        assert_eq!(copy.outcome("u", &key).unwrap(), Some(outcome(key)));
    }
}

#[test]
fn a_refused_send_fails_the_call_and_a_reopened_copy_drops_what_was_not_sent() {
    // (lands_anyway, interleaved): refused; refused but landed (the ack was
    // lost); accepted one past where it expected, after another writer's
    // message (JetStream's expected-sequence pre-check racing a leader
    // change): the copy lacks what landed between, so it must not answer.
    for (lands_anyway, interleaved) in [(false, false), (true, false), (false, true)] {
        let disk = SimDisk::new();
        let log = MemoryLog::new();
        let (engine, _) = open_copy(&disk, &log, true);
        let fp = Fingerprint::of(b"r");
        let Begin::Started(a) = engine.begin("u", "a", fp).unwrap() else {
            panic!()
        };
        engine.complete(&a, outcome("a".into())).unwrap();
        log.lands_anyway.store(lands_anyway, Ordering::SeqCst);
        let next = log.appends.load(Ordering::SeqCst);
        if interleaved {
            log.interleave_at.store(next, Ordering::SeqCst);
        } else {
            log.fail_from.store(next, Ordering::SeqCst);
        }
        let Err(err) = engine.begin("u", "b", fp) else {
            panic!("a begin whose record was refused or interleaved was acknowledged")
        };
        assert!(
            matches!(err, Error::Io { .. } | Error::Poisoned { .. }),
            "{err:?}"
        );
        // Refused or not, a poisoned copy takes no more writes.
        assert!(engine.begin("u", "c", fp).is_err());
        // A process crash: every byte written survives, sent or not.
        drop(engine);
        log.fail_from.store(u64::MAX, Ordering::SeqCst);
        let (copy, _) = open_copy(&disk, &log, true);
        assert_eq!(copy.outcome("u", "a").unwrap(), Some(outcome("a".into())));
        // `b` is in flight only if its record reached the changelog.
        let b = copy.begin("u", "b", fp).unwrap();
        assert_eq!(
            matches!(b, Begin::InFlight { .. }),
            lands_anyway || interleaved,
            "lands_anyway {lands_anyway}, interleaved {interleaved}: {b:?}"
        );
    }
}

#[test]
fn a_fenced_former_owner_cannot_append() {
    let log = MemoryLog::new();
    let (old, _) = open_copy(&SimDisk::new(), &log, true);
    let fp = Fingerprint::of(b"r");
    let Begin::Started(lease) = old.begin("u", "a", fp).unwrap() else {
        panic!()
    };
    // Another node takes the partition over: it copies in and fences.
    let (new, _) = open_copy(&SimDisk::new(), &log, true);
    assert!(matches!(
        new.begin("u", "a", fp).unwrap(),
        Begin::InFlight { .. }
    ));
    // The former owner's complete and begin are refused, not acknowledged.
    assert!(old.complete(&lease, outcome("late".into())).is_err());
    assert!(old.begin("u", "z", fp).is_err());
    // The new owner completes the lease (same partition, same token).
    new.complete(&lease, outcome("a".into())).unwrap();
    assert_eq!(
        rebuilt(&log).outcome("u", "a").unwrap(),
        Some(outcome("a".into()))
    );
}

/// A small deterministic generator (the test must be reproducible from
/// its seed, printed on failure).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn crashes_and_refusals_at_random_lose_no_acknowledged_record() {
    for seed in 1..=300u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut disk = SimDisk::new();
        let log = MemoryLog::new();
        // Acknowledged completions, and the highest acknowledged token of
        // each key.
        let mut completed: HashMap<String, Outcome> = HashMap::new();
        let mut tokens: HashMap<String, u64> = HashMap::new();
        // Completions that failed: their record may have landed anyway.
        let mut maybe: HashMap<String, Outcome> = HashMap::new();
        for epoch in 0..4 {
            let (engine, _) = open_copy(&disk, &log, true);
            for (key, want) in &completed {
                assert_eq!(
                    engine.outcome("u", key).unwrap().as_ref(),
                    Some(want),
                    "seed {seed} epoch {epoch}: acknowledged completion of {key} lost"
                );
            }
            log.lands_anyway.store(rng.below(2) == 0, Ordering::SeqCst);
            let at = log.appends.load(Ordering::SeqCst) + rng.below(12);
            match rng.below(3) {
                0 => log.fail_from.store(at, Ordering::SeqCst),
                1 => {
                    *log.disk.lock() = Some((disk.clone(), rng.next()));
                    log.crash_at.store(at, Ordering::SeqCst);
                }
                _ => {}
            }
            for _ in 0..rng.below(30) {
                let key = format!("k{}", rng.below(12));
                let fp = Fingerprint::of(key.as_bytes());
                match engine.begin("u", &key, fp) {
                    Ok(Begin::Started(lease)) => {
                        let top = tokens.entry(key.clone()).or_default();
                        assert!(
                            lease.token() > *top,
                            "seed {seed}: token reissued for {key}"
                        );
                        *top = lease.token();
                        let body = outcome(format!("{key}@{epoch}"));
                        match rng.below(3) {
                            0 => {
                                if engine.complete(&lease, body.clone()).is_ok() {
                                    completed.insert(key, body);
                                } else {
                                    maybe.insert(key, body);
                                }
                            }
                            1 => {
                                let _ = engine.release(&lease);
                            }
                            _ => {}
                        }
                    }
                    Ok(Begin::Replay(o)) => assert!(
                        Some(&o) == completed.get(&key) || Some(&o) == maybe.get(&key),
                        "seed {seed}: replay of {key}: {o:?}"
                    ),
                    Ok(_) | Err(_) => {}
                }
            }
            log.fail_from.store(u64::MAX, Ordering::SeqCst);
            log.crash_at.store(u64::MAX, Ordering::SeqCst);
            log.disk.lock().take();
            if let Some(died) = log.crashed.lock().take() {
                // The process died in a send: what ran after it is gone.
                drop(engine);
                disk = died;
                continue;
            }
            // Crash: a power loss (unsynced bytes torn or lost) or a clean
            // process death, and sometimes an orderly close.
            disk = match rng.below(4) {
                0 => {
                    let _ = engine.close();
                    disk
                }
                1 => disk.kill(),
                2 => disk.crash(Tear::Prefix(rng.next())),
                _ => disk.crash(Tear::Garbage(rng.next())),
            };
        }
        // The copy on disk and a copy built from the changelog alone agree.
        let (engine, _) = open_copy(&disk, &log, false);
        let fresh = rebuilt(&log);
        for key in keys() {
            let view = |e: &Engine| {
                e.get("u", &key)
                    .unwrap()
                    .map(|v| (v.state, v.token, v.status))
            };
            assert_eq!(view(&engine), view(&fresh), "seed {seed}: {key}");
            assert_eq!(
                engine.outcome("u", &key).unwrap(),
                fresh.outcome("u", &key).unwrap(),
                "seed {seed}: {key}"
            );
            let found = engine.outcome("u", &key).unwrap();
            match completed.get(&key) {
                Some(want) => assert_eq!(found.as_ref(), Some(want), "seed {seed}: {key}"),
                None => assert!(
                    found.is_none() || found.as_ref() == maybe.get(&key),
                    "seed {seed}: {key} holds {found:?}, never written"
                ),
            }
        }
    }
}

#[test]
fn a_snapshot_and_what_follows_it_rebuild_the_state_without_the_history() {
    let log = MemoryLog::new();
    let (engine, replication) = open_copy(&SimDisk::new(), &log, true);
    let fp = Fingerprint::of(b"r");
    let mut top = 0;
    // A history with every kind of record: completed, released, extended,
    // in flight, completed then begun again under another fingerprint.
    for (i, key) in keys().enumerate() {
        let Begin::Started(lease) = engine.begin("u", &key, fp).unwrap() else {
            panic!()
        };
        top = top.max(lease.token());
        match i % 4 {
            0 => engine.complete(&lease, outcome(key.clone())).unwrap(),
            1 => engine.release(&lease).unwrap(),
            2 => {
                let lease = engine
                    .extend(&lease, std::time::Duration::from_secs(90))
                    .unwrap();
                engine.complete(&lease, outcome(key.clone())).unwrap();
            }
            _ => {}
        }
    }
    // The last lease before the snapshot is released: its token is the
    // highest, and no live record carries it.
    let Begin::Started(gone) = engine.begin("u", "gone", fp).unwrap() else {
        panic!()
    };
    top = top.max(gone.token());
    engine.release(&gone).unwrap();
    let first = replication
        .send_snapshot(|| engine.snapshot_frames().map_err(io::Error::other))
        .unwrap();
    // From the snapshot alone, tokens go on above the released one.
    log.purge_before(first);
    let Begin::Started(after) = rebuilt(&log).begin("u", "gone", fp).unwrap() else {
        panic!("gone was released")
    };
    assert!(
        after.token() > top,
        "token {} reissued (top {top})",
        after.token()
    );
    assert!(
        first > 1 && first <= log.last(),
        "snapshot at {first} of {}",
        log.last()
    );
    // Writes after the snapshot, then the trim.
    let Begin::Started(late) = engine.begin("u", "late", fp).unwrap() else {
        panic!()
    };
    top = top.max(late.token());
    engine.complete(&late, outcome("late".into())).unwrap();
    log.purge_before(first);
    assert!(log.since(0).iter().all(|(seq, _)| *seq >= first));
    let copy = rebuilt(&log);
    for key in keys().chain(["late".to_owned()]) {
        let view = |e: &Engine| {
            e.get("u", &key)
                .unwrap()
                .map(|v| (v.state, v.token, v.status))
        };
        assert_eq!(view(&copy), view(&engine), "{key}");
        assert_eq!(
            copy.outcome("u", &key).unwrap(),
            engine.outcome("u", &key).unwrap(),
            "{key}"
        );
    }
    // Tokens go on above every token of the history, purged or not.
    let Begin::Started(next) = copy.begin("u", "k1", fp).unwrap() else {
        panic!("k1 was released")
    };
    assert!(
        next.token() > top,
        "token {} reissued (top {top})",
        next.token()
    );
}
