//! The async engine (issue 12, first part): the same answers as the
//! blocking calls on every executor (tokio current-thread and multi-thread,
//! `futures::executor::block_on`), durable futures that do not block the
//! thread polling them, a dropped `begin` future that releases the lease it
//! granted, and a failed sync that wakes every waiting future with the
//! error.

mod common;

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use common::gate::{Call, Gated, Gates};
use idemkv::storage::{Fault, SimDisk, SimOp, Storage};
use idemkv::{
    AsyncEngine, Begin, Durability, Engine, Error, Fingerprint, ManualClock, Options, Outcome,
    RecordState,
};

fn options(clock: &Arc<ManualClock>) -> Options {
    Options {
        durability: Durability::Sync,
        background: false,
        clock: clock.clone(),
        ..Options::default()
    }
}

fn fp(s: &str) -> Fingerprint {
    Fingerprint::of(s.as_bytes())
}

fn outcome(status: u16, body: &str) -> Outcome {
    Outcome {
        status,
        body: Bytes::from(body.to_owned()),
    }
}

/// The contract of the sync API, asked through the async one.
async fn contract(engine: &AsyncEngine, clock: &ManualClock) {
    let Begin::Started(lease) = engine.begin("u", "k", fp("a")).await.unwrap() else {
        panic!("a fresh key is started")
    };
    assert!(matches!(
        engine.begin("u", "k", fp("a")).await.unwrap(),
        Begin::InFlight { .. }
    ));
    assert!(matches!(
        engine.begin("u", "k", fp("b")).await.unwrap(),
        Begin::Mismatch
    ));
    let view = engine.get("u", "k").await.unwrap().expect("in progress");
    assert_eq!(
        (view.state, view.token),
        (RecordState::InProgress, lease.token())
    );
    assert_eq!(engine.outcome("u", "k").await.unwrap(), None);
    assert!(matches!(
        engine.extend(&lease, Duration::ZERO).await,
        Err(Error::InvalidArgument { .. })
    ));
    let lease = engine
        .extend(&lease, Duration::from_secs(60))
        .await
        .unwrap();
    engine
        .complete(&lease, outcome(201, "charged"))
        .await
        .unwrap();
    match engine.begin("u", "k", fp("a")).await.unwrap() {
        Begin::Replay(o) => assert_eq!(o, outcome(201, "charged")),
        other => panic!("expected a replay, got {other:?}"),
    }
    assert_eq!(
        engine.outcome("u", "k").await.unwrap(),
        Some(outcome(201, "charged"))
    );
    assert!(matches!(
        engine.complete(&lease, outcome(200, "again")).await,
        Err(Error::LeaseLost { .. })
    ));
    // Release, and a takeover after expiry.
    let Begin::Started(second) = engine.begin("u", "k2", fp("a")).await.unwrap() else {
        panic!("a fresh key is started")
    };
    engine.release(&second).await.unwrap();
    assert_eq!(engine.get("u", "k2").await.unwrap(), None);
    let Begin::Started(third) = engine.begin("u", "k2", fp("a")).await.unwrap() else {
        panic!("a released key starts again")
    };
    assert!(third.token() > second.token());
    clock.advance(Duration::from_secs(31));
    let Begin::Started(fourth) = engine.begin("u", "k2", fp("a")).await.unwrap() else {
        panic!("an expired lease is taken over")
    };
    assert!(fourth.token() > third.token());
    engine
        .complete_with_ttl(&fourth, outcome(200, "short"), Duration::from_secs(1))
        .await
        .unwrap();
    // Bad input is refused as by the sync API.
    assert!(matches!(
        engine.begin("u", "", fp("a")).await,
        Err(Error::InvalidKey { .. })
    ));
    assert!(matches!(
        engine.get("u", "bad key").await,
        Err(Error::InvalidKey { .. })
    ));
}

fn fresh() -> (tempfile::TempDir, Arc<ManualClock>, AsyncEngine) {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let engine = Engine::open(dir.path(), options(&clock)).unwrap();
    (dir, clock, AsyncEngine::new(Arc::new(engine)))
}

#[test]
fn the_async_api_answers_as_the_sync_one_under_block_on() {
    let (_dir, clock, engine) = fresh();
    futures::executor::block_on(contract(&engine, &clock));
}

#[test]
fn the_async_api_answers_as_the_sync_one_on_a_current_thread_runtime() {
    let (_dir, clock, engine) = fresh();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(contract(&engine, &clock));
}

#[test]
fn the_async_api_answers_as_the_sync_one_on_a_multi_thread_runtime() {
    let (_dir, clock, engine) = fresh();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let (e, c) = (engine.clone(), Arc::clone(&clock));
    rt.block_on(async move { tokio::spawn(async move { contract(&e, &c).await }).await })
        .unwrap();
}

/// On a current-thread runtime, one OS thread polls every task: had a
/// durable call blocked it on its fsync, every write would have had an
/// fdatasync of its own. Group commit across the tasks shows that their
/// futures were pending side by side while the syncer synced.
#[test]
fn durable_futures_do_not_block_the_thread_that_polls_them() {
    let (_dir, _clock, engine) = fresh();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let tasks = 64;
    let per_task = 10;
    rt.block_on(async {
        let mut handles = Vec::new();
        for t in 0..tasks {
            let engine = engine.clone();
            handles.push(tokio::spawn(async move {
                for i in 0..per_task {
                    let key = format!("t{t}-{i}");
                    let Begin::Started(lease) = engine.begin("u", &key, fp(&key)).await.unwrap()
                    else {
                        panic!("fresh key")
                    };
                    engine.complete(&lease, outcome(200, &key)).await.unwrap();
                }
            }));
        }
        for h in handles {
            h.await.unwrap();
        }
    });
    let s = engine.engine().stats();
    assert_eq!(s.completions, (tasks * per_task) as u64);
    assert!(
        s.fsyncs * 4 < s.records_written,
        "no group commit across tasks: {} fsyncs for {} records",
        s.fsyncs,
        s.records_written
    );
}

/// Polls `f` once with a waker that does nothing.
fn poll_once<F: Future>(f: std::pin::Pin<&mut F>) -> Poll<F::Output> {
    let waker = futures::task::noop_waker();
    f.poll(&mut Context::from_waker(&waker))
}

#[test]
fn a_dropped_begin_future_releases_the_lease_it_granted() {
    let gates = Arc::new(Gates::default());
    let disk = SimDisk::new();
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let storage: Arc<dyn Storage> = Gated::new(Arc::new(disk), &gates);
    let engine = Arc::new(Engine::open_with_storage(storage, options(&clock)).unwrap());
    let ae = AsyncEngine::new(Arc::clone(&engine));
    // The first lease also reserves tokens (a sync of its own): take it now.
    let Begin::Started(warm) = engine.begin("u", "warm-up", fp("a")).unwrap() else {
        panic!("fresh key")
    };
    engine.release(&warm).unwrap();
    gates.close(Call::Sync);
    {
        let begin = pin!(ae.begin("u", "k", fp("a")));
        let mut begin = begin;
        // The lease is granted in memory; its record waits for a sync that
        // the gate holds.
        assert!(poll_once(begin.as_mut()).is_pending());
        assert!(gates.wait_entered(Call::Sync, 1, Duration::from_secs(10)));
    } // dropped here, before the lease was acknowledged
    gates.open(Call::Sync);
    assert_eq!(
        engine.get("u", "k").unwrap(),
        None,
        "the key stayed claimed"
    );
    assert_eq!(engine.stats().releases, 2);
    assert!(matches!(
        engine.begin("u", "k", fp("a")).unwrap(),
        Begin::Started(_)
    ));
}

#[test]
fn a_failed_sync_wakes_every_waiting_future_with_the_error() {
    let disk = SimDisk::new();
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let storage: Arc<dyn Storage> = Arc::new(disk.clone());
    let engine = Arc::new(Engine::open_with_storage(storage, options(&clock)).unwrap());
    let ae = AsyncEngine::new(Arc::clone(&engine));
    let Begin::Started(warm) = engine.begin("u", "warm-up", fp("a")).unwrap() else {
        panic!("fresh key")
    };
    engine.release(&warm).unwrap();
    disk.inject(Fault {
        op: SimOp::Sync,
        after: 0,
        kind: std::io::ErrorKind::Other,
        sticky: true,
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let results = rt.block_on(async {
        let mut handles = Vec::new();
        for i in 0..16 {
            let ae = ae.clone();
            handles.push(tokio::spawn(async move {
                ae.begin("u", format!("k{i}"), fp("a")).await
            }));
        }
        let mut results = Vec::new();
        for h in handles {
            results.push(h.await.unwrap());
        }
        results
    });
    for r in &results {
        assert!(
            matches!(r, Err(Error::Io { .. } | Error::Poisoned { .. })),
            "a begin whose record was never synced answered {r:?}"
        );
    }
    disk.clear_faults();
}

#[test]
fn futures_after_close_answer_closed() {
    let (_dir, _clock, engine) = fresh();
    engine.engine().close().unwrap();
    futures::executor::block_on(async {
        assert!(matches!(
            engine.begin("u", "k", fp("a")).await,
            Err(Error::Closed)
        ));
        assert!(matches!(engine.get("u", "k").await, Err(Error::Closed)));
    });
}

/// Futures dropped at random points, many times: a dropped `begin` never
/// leaves its key claimed, and a dropped `complete` leaves the record
/// either completed with its outcome or still in progress, never anything
/// else.
#[test]
fn futures_dropped_at_random_points_leave_no_key_claimed_and_nothing_half_done() {
    let (_dir, _clock, engine) = fresh();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let mut owned = Vec::new();
    let mut dropped = Vec::new();
    for i in 0..300 {
        let key = format!("k{i}");
        let polls = next(4);
        let mut begin = Box::pin(engine.begin("u", key.clone(), fp("a")));
        let mut answer = None;
        for _ in 0..polls {
            if let Poll::Ready(r) = poll_once(begin.as_mut()) {
                answer = Some(r.unwrap());
                break;
            }
            if next(2) == 0 {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        drop(begin);
        match answer {
            Some(Begin::Started(lease)) => owned.push((key, lease)),
            Some(other) => panic!("{key}: a fresh key answered {other:?}"),
            None => dropped.push(key),
        }
    }
    // Dropped begins: the key is free (released, or never begun).
    for key in &dropped {
        assert_eq!(
            engine.engine().get("u", key).unwrap(),
            None,
            "{key} stayed claimed by a dropped begin"
        );
    }
    // Completes dropped at random points: completed or in progress, whole.
    for (key, lease) in &owned {
        let polls = next(3);
        let mut complete = Box::pin(engine.complete(lease, outcome(201, key)));
        for _ in 0..polls {
            if poll_once(complete.as_mut()).is_ready() {
                break;
            }
        }
        drop(complete);
        let view = engine.engine().get("u", key).unwrap().expect("still there");
        match view.state {
            RecordState::Completed => assert_eq!(
                engine.engine().outcome("u", key).unwrap(),
                Some(outcome(201, key))
            ),
            RecordState::InProgress => assert_eq!(view.token, lease.token()),
        }
    }
    assert!(!dropped.is_empty() && !owned.is_empty(), "both paths ran");
}

#[test]
fn async_begin_wait_answers_as_the_sync_one() {
    let (_dir, clock, engine) = fresh();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        // Replay for the same request once the holder completes.
        let Begin::Started(lease) = engine.begin("u", "k", fp("a")).await.unwrap() else {
            panic!("fresh key")
        };
        let (e, l) = (engine.clone(), lease.clone());
        let waiter = tokio::spawn(async move {
            e.begin_wait("u", "k", fp("a"), Duration::from_secs(30))
                .await
        });
        tokio::time::sleep(Duration::from_millis(30)).await;
        engine.complete(&l, outcome(201, "made")).await.unwrap();
        match waiter.await.unwrap().unwrap() {
            Begin::Replay(o) => assert_eq!(o, outcome(201, "made")),
            other => panic!("expected a replay, got {other:?}"),
        }
        // Mismatch at once for another request.
        assert!(matches!(
            engine
                .begin_wait("u", "k", fp("b"), Duration::from_secs(30))
                .await
                .unwrap(),
            Begin::Mismatch
        ));
        // Started once the holder's lease expires on the engine clock.
        let Begin::Started(held) = engine.begin("u", "k2", fp("a")).await.unwrap() else {
            panic!("fresh key")
        };
        let e = engine.clone();
        let waiter = tokio::spawn(async move {
            e.begin_wait("u", "k2", fp("a"), Duration::from_secs(30))
                .await
        });
        tokio::time::sleep(Duration::from_millis(30)).await;
        clock.advance(Duration::from_secs(31));
        match waiter.await.unwrap().unwrap() {
            Begin::Started(next) => assert!(next.token() > held.token()),
            other => panic!("expected Started, got {other:?}"),
        }
        // InFlight only after the timeout.
        let t = std::time::Instant::now();
        assert!(matches!(
            engine
                .begin_wait("u", "k2", fp("a"), Duration::from_millis(80))
                .await
                .unwrap(),
            Begin::InFlight { .. }
        ));
        assert!(t.elapsed() >= Duration::from_millis(80));
    });
}

#[test]
fn async_wait_returns_only_an_outcome_stored_for_the_same_request() {
    let (_dir, _clock, engine) = fresh();
    futures::executor::block_on(async {
        let Begin::Started(lease) = engine.begin("u", "k", fp("b")).await.unwrap() else {
            panic!("fresh key")
        };
        let (e, l) = (engine.clone(), lease.clone());
        let completer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            e.engine().complete(&l, outcome(200, "b's body")).unwrap();
        });
        assert_eq!(
            engine
                .wait("u", "k", fp("a"), Duration::from_secs(30))
                .await
                .unwrap(),
            None,
            "request a got request b's body"
        );
        completer.join().unwrap();
        assert_eq!(
            engine
                .wait("u", "k", fp("b"), Duration::from_secs(30))
                .await
                .unwrap(),
            Some(outcome(200, "b's body"))
        );
    });
}

/// 1 000 retries waiting on one in-flight key hold no thread: on a
/// current-thread runtime (one thread for everything) an unrelated request
/// runs to its end while all of them still wait.
#[test]
fn a_thousand_waiting_retries_do_not_hold_the_only_thread() {
    let (_dir, _clock, engine) = fresh();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let Begin::Started(lease) = engine.begin("u", "hot", fp("a")).await.unwrap() else {
            panic!("fresh key")
        };
        let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut waiters = Vec::new();
        for _ in 0..1_000 {
            let (e, done) = (engine.clone(), Arc::clone(&done));
            waiters.push(tokio::spawn(async move {
                let answer = e
                    .begin_wait("u", "hot", fp("a"), Duration::from_secs(60))
                    .await
                    .unwrap();
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                answer
            }));
        }
        tokio::task::yield_now().await;
        // The unrelated request.
        let Begin::Started(other) = engine.begin("v", "cold", fp("a")).await.unwrap() else {
            panic!("fresh key")
        };
        engine.complete(&other, outcome(200, "cold")).await.unwrap();
        assert_eq!(
            done.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "the waiters finished before the holder completed"
        );
        engine.complete(&lease, outcome(201, "hot")).await.unwrap();
        for w in waiters {
            assert!(matches!(w.await.unwrap(), Begin::Replay(_)));
        }
    });
}

#[test]
fn async_run_once_runs_the_work_once_and_stores_or_releases_by_its_verdict() {
    use idemkv::{AsyncRunContext, RunError, WorkError};
    use std::sync::atomic::{AtomicU32, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let engine = Engine::open(
        dir.path(),
        Options {
            max_response_len: 64,
            ..options(&clock)
        },
    )
    .unwrap();
    let engine = AsyncEngine::new(Arc::new(engine));
    let runs = Arc::new(AtomicU32::new(0));
    futures::executor::block_on(async {
        let counted = |body: &'static str| {
            let runs = Arc::clone(&runs);
            move |ctx: AsyncRunContext| async move {
                assert!(ctx.token() > 0);
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, WorkError<String>>(outcome(201, body))
            }
        };
        let first = engine
            .run_once("u", "k", b"req", counted("charged"))
            .await
            .unwrap();
        let retry = engine
            .run_once("u", "k", b"req", counted("charged"))
            .await
            .unwrap();
        assert_eq!((first.replayed, retry.replayed), (false, true));
        assert_eq!(retry.outcome, outcome(201, "charged"));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert!(matches!(
            engine.run_once("u", "k", b"other", counted("x")).await,
            Err(RunError::Mismatch)
        ));
        // Too large to keep: stored as the status and BODY_NOT_KEPT, never
        // released.
        let big: &'static str = Box::leak("y".repeat(100).into_boxed_str());
        let done = engine
            .run_once("u", "big", b"req", counted(big))
            .await
            .unwrap();
        assert_eq!(done.outcome.body.len(), 100);
        let retry = engine
            .run_once("u", "big", b"req", counted(big))
            .await
            .unwrap();
        assert!(retry.replayed);
        assert_eq!(&retry.outcome.body[..], idemkv::BODY_NOT_KEPT);
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        // Retryable: released, so the next try runs again.
        let failing = |_: AsyncRunContext| async {
            Err::<Outcome, _>(WorkError::Retryable("timeout".to_owned()))
        };
        assert!(matches!(
            engine.run_once("u", "flaky", b"req", failing).await,
            Err(RunError::Work { stored: false, .. })
        ));
        let done = engine
            .run_once("u", "flaky", b"req", counted("ok"))
            .await
            .unwrap();
        assert!(!done.replayed);
        // Final: stored and replayed.
        let declined = |_: AsyncRunContext| async {
            Err::<Outcome, _>(WorkError::Final("no".to_owned(), outcome(402, "declined")))
        };
        assert!(matches!(
            engine.run_once("u", "card", b"req", declined).await,
            Err(RunError::Work { stored: true, .. })
        ));
        let retry = engine
            .run_once("u", "card", b"req", counted("never"))
            .await
            .unwrap();
        assert_eq!(retry.outcome, outcome(402, "declined"));
    });
}

/// A storage that remembers which threads synced a file or the directory
/// (an fdatasync a future must never run on its executor's thread).
#[derive(Debug)]
struct SyncThreads {
    inner: Arc<dyn Storage>,
    threads: Arc<parking_lot::Mutex<Vec<std::thread::ThreadId>>>,
}

#[derive(Debug)]
struct SyncThreadsFile {
    inner: Arc<dyn idemkv::storage::StorageFile>,
    threads: Arc<parking_lot::Mutex<Vec<std::thread::ThreadId>>>,
}

impl Storage for SyncThreads {
    fn create(&self, name: &str) -> std::io::Result<Arc<dyn idemkv::storage::StorageFile>> {
        let inner = self.inner.create(name)?;
        Ok(Arc::new(SyncThreadsFile {
            inner,
            threads: Arc::clone(&self.threads),
        }))
    }
    fn open(&self, name: &str) -> std::io::Result<Arc<dyn idemkv::storage::StorageFile>> {
        let inner = self.inner.open(name)?;
        Ok(Arc::new(SyncThreadsFile {
            inner,
            threads: Arc::clone(&self.threads),
        }))
    }
    fn list(&self) -> std::io::Result<Vec<String>> {
        self.inner.list()
    }
    fn remove(&self, name: &str) -> std::io::Result<()> {
        self.inner.remove(name)
    }
    fn rename(&self, from: &str, to: &str) -> std::io::Result<()> {
        self.inner.rename(from, to)
    }
    fn sync_dir(&self) -> std::io::Result<()> {
        self.threads.lock().push(std::thread::current().id());
        self.inner.sync_dir()
    }
    fn path(&self, name: &str) -> std::path::PathBuf {
        self.inner.path(name)
    }
}

impl idemkv::storage::StorageFile for SyncThreadsFile {
    fn append(&self, data: &[u8]) -> std::io::Result<()> {
        self.inner.append(data)
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.inner.read_at(offset, buf)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn sync(&self) -> std::io::Result<()> {
        self.threads.lock().push(std::thread::current().id());
        self.inner.sync()
    }
    fn truncate(&self, len: u64) -> std::io::Result<()> {
        self.inner.truncate(len)
    }
}

/// Segment rolls (a full segment is synced, a spare made and synced) and
/// token reservations (synced) run off the executor's thread too: on a
/// current-thread runtime with the smallest segments, no fdatasync of any
/// kind runs on the thread that polls the futures.
#[test]
fn rolls_and_token_reservations_never_sync_on_the_executor_thread() {
    let threads = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let storage: Arc<dyn Storage> = Arc::new(SyncThreads {
        inner: Arc::new(SimDisk::new()),
        threads: Arc::clone(&threads),
    });
    let engine = Arc::new(
        Engine::open_with_storage(
            storage,
            Options {
                segment_bytes: 4096,
                ..options(&clock)
            },
        )
        .unwrap(),
    );
    threads.lock().clear(); // what open synced
    let ae = AsyncEngine::new(Arc::clone(&engine));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let executor = std::thread::current().id();
    rt.block_on(async {
        let mut handles = Vec::new();
        for t in 0..16 {
            let ae = ae.clone();
            handles.push(tokio::spawn(async move {
                for i in 0..40 {
                    let key = format!("t{t}-{i}");
                    let Begin::Started(lease) = ae.begin("u", &key, fp(&key)).await.unwrap() else {
                        panic!("fresh key")
                    };
                    match i % 3 {
                        0 => ae.complete(&lease, outcome(200, &key)).await.unwrap(),
                        1 => ae.release(&lease).await.unwrap(),
                        _ => {
                            let lease = ae.extend(&lease, Duration::from_secs(5)).await.unwrap();
                            ae.complete(&lease, outcome(201, &key)).await.unwrap();
                        }
                    }
                }
            }));
        }
        for h in handles {
            h.await.unwrap();
        }
    });
    let stats = engine.stats();
    assert!(stats.segments > 10, "too few rolls to tell: {stats:?}");
    let synced = threads.lock().clone();
    assert!(!synced.is_empty());
    let on_executor = synced.iter().filter(|t| **t == executor).count();
    assert_eq!(
        on_executor,
        0,
        "{on_executor} of {} syncs ran on the executor thread",
        synced.len()
    );
    for t in 0..16 {
        for i in 0..40 {
            let key = format!("t{t}-{i}");
            let want = match i % 3 {
                0 => Some(outcome(200, &key)),
                1 => None,
                _ => Some(outcome(201, &key)),
            };
            assert_eq!(engine.outcome("u", &key).unwrap(), want, "{key}");
        }
    }
}
