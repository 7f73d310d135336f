//! The write path and `begin`'s answers:
//! - `begin_complete`: a full claim → complete cycle (`begin` answers
//!   `Started`, then `complete` with a 160-byte body) on a fresh key, in
//!   each durability mode (`Durability::None`, `Periodic(100 ms)`, `Sync`),
//!   with 1, 8 and 64 concurrent callers.
//! - `replay`: `begin` on a completed key (same fingerprint), which reads
//!   the stored outcome back from the log; 1 caller, over 100 000
//!   completed keys, with the engine opened in `None` and in `Sync` mode.
//! - `contention`: 1, 8 and 64 callers racing `begin` on one key that is
//!   in progress (every answer is `InFlight`) and on one completed key
//!   (every answer is `Replay`), `Durability::Sync`.
//!
//! - `encryption`: what sealing bodies costs (`Options::encryption`, feature
//!   `encryption`): begin+complete (1 caller, `Durability::None`, so that
//!   no fdatasync hides it) and replay (`begin` on one of 10 000 completed
//!   keys, which opens the body), with 160-byte and 4 KiB bodies, `plain`
//!   and `sealed` side by side in one run. Without the feature only the
//!   `plain` rows run.
//!
//! Run: `cargo bench --bench begin_complete` (about 2 minutes), or one
//! group: `cargo bench --bench begin_complete -- contention`; the
//! encryption rows: `cargo bench --features encryption --bench
//! begin_complete -- encryption`.
//!
//! How the numbers read: every benchmark runs through `iter_custom`. With
//! `c` callers, `c` threads are started for each sample (in a
//! `std::thread::scope`) and wait on a barrier until all are up; then each
//! notes its start, does `iters` operations (pairs, or `begin` calls) and
//! notes its end. The time returned is the wall time from the first start
//! to the last end (thread start-up is not timed). Throughput is
//! `Elements(c)` per iteration, so criterion's `thrpt` is the aggregate
//! rate over all callers (begin+complete pairs/s, or begins/s), and its
//! `time` is the wall time of one round of one operation per caller. One
//! caller runs on the benchmark thread itself.
//!
//! Every pair uses a fresh `(user, key)` from an atomic counter: record
//! `i` has user `user-{i % 10000}` and key
//! `{i * 0x9e3779b97f4a7c15:016x}-{i:08x}`. Each `begin_complete` benchmark
//! gets a fresh engine in a fresh temporary directory, no background
//! thread, other options at their defaults. Every answer is checked.

mod common;

use common::{KEY_LEN, key};

use std::cell::OnceCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use idemkv::{AsyncEngine, Begin, Durability, Engine, Fingerprint, Options, Outcome};

/// Distinct user ids the records are spread over.
const USERS: u64 = 10_000;
/// The stored response body.
const BODY: &[u8] = &[b'x'; 160];
/// The interval of the `Periodic` mode measured.
const PERIODIC: Duration = Duration::from_millis(100);
/// Completed keys the replay benchmark cycles through.
const REPLAY_KEYS: u64 = 100_000;

/// The `USERS` user ids, formatted once.
fn users() -> Vec<String> {
    (0..USERS).map(|u| format!("user-{u}")).collect()
}

fn options(durability: Durability) -> Options {
    Options {
        durability,
        background: false,
        ..Options::default()
    }
}

fn open(dir: &tempfile::TempDir, options: Options) -> Engine {
    Engine::open(dir.path(), options).expect("open")
}

/// An engine on a temporary directory of its own.
struct Scratch {
    // Declared before `_dir`: the engine closes before the directory goes.
    engine: Engine,
    _dir: tempfile::TempDir,
}

impl Scratch {
    fn open(options: Options) -> Scratch {
        let dir = tempfile::tempdir().expect("tempdir");
        Scratch {
            engine: open(&dir, options),
            _dir: dir,
        }
    }
}

/// Runs `work(caller)` on `callers` threads started together; see
/// [`common::timed_threads`].
fn timed_callers(callers: usize, work: impl Fn(usize) + Sync) -> Duration {
    common::timed_threads(callers, work)
}

/// One begin → complete cycle on the fresh record `i`.
fn pair(engine: &Engine, users: &[String], i: u64, fingerprint: Fingerprint) {
    let user = &users[(i % USERS) as usize];
    let Begin::Started(lease) = engine.begin(user, key(i), fingerprint).expect("begin") else {
        panic!("record {i}: a fresh key was not started");
    };
    let outcome = Outcome {
        status: 200,
        body: bytes::Bytes::from_static(BODY),
    };
    engine.complete(&lease, outcome).expect("complete");
}

fn callers_id(callers: usize) -> String {
    if callers == 1 {
        "1_caller".to_string()
    } else {
        format!("{callers}_callers")
    }
}

fn begin_complete(c: &mut Criterion) {
    common::check_key();
    let users = users();
    let fingerprint = Fingerprint::of(b"req");
    let mut group = c.benchmark_group("begin_complete");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(5));
    let modes = [
        ("none", Durability::None),
        ("periodic_100ms", Durability::Periodic(PERIODIC)),
        ("sync", Durability::Sync),
    ];
    for (mode, durability) in modes {
        for callers in [1usize, 8, 64] {
            group.throughput(Throughput::Elements(callers as u64));
            // Opened by the first sample (not at all if the benchmark is
            // filtered out), closed and deleted when the benchmark is done.
            let scratch = OnceCell::new();
            let next = AtomicU64::new(0);
            group.bench_function(BenchmarkId::new(mode, callers_id(callers)), |b| {
                let engine = &scratch
                    .get_or_init(|| Scratch::open(options(durability)))
                    .engine;
                b.iter_custom(|iters| {
                    timed_callers(callers, |_| {
                        for _ in 0..iters {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            pair(engine, &users, i, fingerprint);
                        }
                    })
                });
            });
        }
    }
    group.finish();
}

fn replay(c: &mut Criterion) {
    let users = users();
    let fingerprint = Fingerprint::of(b"req");
    // Written once without syncs, then reopened in each mode.
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let engine = open(&dir, options(Durability::None));
        for i in 0..REPLAY_KEYS {
            pair(&engine, &users, i, fingerprint);
        }
        engine.close().expect("close");
    }
    let probes: Vec<(&str, [u8; KEY_LEN])> = (0..REPLAY_KEYS)
        .map(|i| (users[(i % USERS) as usize].as_str(), key(i)))
        .collect();
    let mut group = c.benchmark_group("replay");
    group.sample_size(20);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Elements(1));
    for (mode, durability) in [("none", Durability::None), ("sync", Durability::Sync)] {
        // Opened by the first sample, closed before the next mode opens.
        let engine = OnceCell::new();
        let mut at = 0usize;
        group.bench_function(BenchmarkId::new(mode, callers_id(1)), |b| {
            let engine = engine.get_or_init(|| open(&dir, options(durability)));
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    // A stride coprime with the key count visits every key.
                    at = (at + 7919) % probes.len();
                    let (user, key) = probes[at];
                    match engine.begin(user, key, fingerprint).expect("begin") {
                        Begin::Replay(outcome) => assert_eq!(outcome.body.len(), BODY.len()),
                        other => panic!("expected a replay, got {other:?}"),
                    }
                }
                start.elapsed()
            });
        });
    }
    group.finish();
}

fn contention(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = open(
        &dir,
        Options {
            // The in-progress key must not be taken over while measuring.
            lease_ttl: Duration::from_secs(24 * 60 * 60),
            ..options(Durability::Sync)
        },
    );
    let fingerprint = Fingerprint::of(b"req");
    let Begin::Started(_held) = engine
        .begin("user-1", "hot-in-progress", fingerprint)
        .expect("begin")
    else {
        panic!("hot-in-progress was not started");
    };
    pair(&engine, &users(), 0, fingerprint);
    let done_key = key(0);
    let mut group = c.benchmark_group("contention");
    group.sample_size(20);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    let targets: [(&str, &[u8], bool); 2] = [
        ("in_progress", b"hot-in-progress", false),
        ("completed", &done_key, true),
    ];
    for (name, key, completed) in targets {
        let user = if completed { "user-0" } else { "user-1" };
        for callers in [1usize, 8, 64] {
            group.throughput(Throughput::Elements(callers as u64));
            group.bench_function(BenchmarkId::new(name, callers_id(callers)), |b| {
                b.iter_custom(|iters| {
                    timed_callers(callers, |_| {
                        for _ in 0..iters {
                            match engine.begin(user, key, fingerprint).expect("begin") {
                                Begin::Replay(_) if completed => {}
                                Begin::InFlight { .. } if !completed => {}
                                other => panic!("{name}: unexpected answer {other:?}"),
                            }
                        }
                    })
                })
            });
        }
    }
    group.finish();
    engine.close().expect("close");
}

/// Durable begin+complete pairs through `AsyncEngine`: `tasks` tasks on a
/// 2-worker tokio runtime, each running `iters` pairs (issue 12's target
/// row: 4 096 tasks).
fn begin_complete_async(c: &mut Criterion) {
    let users = Arc::new(users());
    let fingerprint = Fingerprint::of(b"req");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("begin_complete_async");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(5));
    for tasks in [64usize, 4096] {
        group.throughput(Throughput::Elements(tasks as u64));
        let scratch: OnceCell<(AsyncEngine, tempfile::TempDir)> = OnceCell::new();
        let next = Arc::new(AtomicU64::new(0));
        group.bench_function(BenchmarkId::new("sync", format!("{tasks}_tasks")), |b| {
            let (engine, _) = scratch.get_or_init(|| {
                let dir = tempfile::tempdir().expect("tempdir");
                let engine = open(&dir, options(Durability::Sync));
                (AsyncEngine::new(Arc::new(engine)), dir)
            });
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let started = Instant::now();
                    let handles: Vec<_> = (0..tasks)
                        .map(|_| {
                            let (engine, users, next) =
                                (engine.clone(), Arc::clone(&users), Arc::clone(&next));
                            tokio::spawn(async move {
                                for _ in 0..iters {
                                    let i = next.fetch_add(1, Ordering::Relaxed);
                                    let user = &users[(i % USERS) as usize];
                                    let Begin::Started(lease) = engine
                                        .begin(user, key(i), fingerprint)
                                        .await
                                        .expect("begin")
                                    else {
                                        panic!("record {i}: a fresh key was not started");
                                    };
                                    let outcome = Outcome {
                                        status: 200,
                                        body: bytes::Bytes::from_static(BODY),
                                    };
                                    engine.complete(&lease, outcome).await.expect("complete");
                                }
                            })
                        })
                        .collect();
                    for h in handles {
                        h.await.expect("task");
                    }
                    started.elapsed()
                })
            });
        });
    }
    group.finish();
}

/// `options` sealing bodies under one key if `sealed` (and the
/// `encryption` feature is on); else `options`.
fn sealing(options: Options, sealed: bool) -> Options {
    #[cfg(feature = "encryption")]
    if sealed {
        let keys = idemkv::EncryptionKeys::new(1, &[0x5a; 32]).expect("a 32-byte key");
        return Options {
            encryption: Some(keys),
            ..options
        };
    }
    let _ = sealed;
    options
}

/// Keys written before the encryption group's replays.
const SEALED_REPLAY_KEYS: u64 = 10_000;

fn encryption(c: &mut Criterion) {
    let users = users();
    let fingerprint = Fingerprint::of(b"req");
    let variants: &[(&str, bool)] = if cfg!(feature = "encryption") {
        &[("plain", false), ("sealed", true)]
    } else {
        &[("plain", false)]
    };
    let mut group = c.benchmark_group("encryption");
    group.sample_size(20);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Elements(1));
    for body_len in [160usize, 4096] {
        let body = bytes::Bytes::from(vec![b'x'; body_len]);
        for &(name, sealed) in variants {
            let scratch = Scratch::open(sealing(options(Durability::None), sealed));
            let engine = &scratch.engine;
            let mut next = 0u64;
            let id = format!("{name}_{body_len}B");
            group.bench_function(BenchmarkId::new("begin_complete", &id), |b| {
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let i = next;
                        next += 1;
                        let user = &users[(i % USERS) as usize];
                        let Begin::Started(lease) =
                            engine.begin(user, key(i), fingerprint).expect("begin")
                        else {
                            panic!("record {i}: a fresh key was not started");
                        };
                        let outcome = Outcome {
                            status: 200,
                            body: body.clone(),
                        };
                        engine.complete(&lease, outcome).expect("complete");
                    }
                    start.elapsed()
                })
            });
            drop(scratch);
            let scratch = Scratch::open(sealing(options(Durability::None), sealed));
            let engine = &scratch.engine;
            for i in 0..SEALED_REPLAY_KEYS {
                let user = &users[(i % USERS) as usize];
                let Begin::Started(lease) = engine.begin(user, key(i), fingerprint).expect("begin")
                else {
                    panic!("record {i}: a fresh key was not started");
                };
                let outcome = Outcome {
                    status: 200,
                    body: body.clone(),
                };
                engine.complete(&lease, outcome).expect("complete");
            }
            let mut at = 0u64;
            group.bench_function(BenchmarkId::new("replay", &id), |b| {
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    for _ in 0..iters {
                        at = (at + 7919) % SEALED_REPLAY_KEYS;
                        let user = &users[(at % USERS) as usize];
                        match engine.begin(user, key(at), fingerprint).expect("begin") {
                            Begin::Replay(outcome) => assert_eq!(outcome.body.len(), body_len),
                            other => panic!("expected a replay, got {other:?}"),
                        }
                    }
                    start.elapsed()
                })
            });
        }
    }
    group.finish();
}

criterion_group!(
    benches,
    begin_complete,
    replay,
    contention,
    begin_complete_async,
    encryption
);
criterion_main!(benches);
