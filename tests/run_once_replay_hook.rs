//! `RunOptions::on_replay` (issue 13, feature 4), for the blocking and the
//! async `run_once_with`: called with the stored outcome for replays only
//! (not for a first run, a retryable failure, a mismatch or a key in
//! flight), and told `waited()` only for a replay served after waiting for
//! an in-flight key.

use std::sync::Arc;
use std::time::{Duration, Instant};

use idemkv::{
    AsyncEngine, Begin, Durability, Engine, Fingerprint, ManualClock, Options, Outcome, ReplayHook,
    RunError, RunOptions, WorkError,
};
use parking_lot::Mutex;

fn engine() -> (tempfile::TempDir, Arc<Engine>) {
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        durability: Durability::None,
        background: false,
        clock: Arc::new(ManualClock::new(1_700_000_000_000)),
        ..Options::default()
    };
    let engine = Arc::new(Engine::open(dir.path(), options).unwrap());
    (dir, engine)
}

fn created(body: &'static str) -> Outcome {
    Outcome {
        status: 201,
        body: body.into(),
    }
}

/// Each replay's outcome and `waited()`, as the hook saw them.
type Seen = Arc<Mutex<Vec<(Outcome, bool)>>>;

/// A hook that records each replay's outcome and `waited()`.
fn recording() -> (ReplayHook, Seen) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    let hook = ReplayHook::new(move |replay| {
        log.lock().push((replay.outcome().clone(), replay.waited()));
    });
    (hook, seen)
}

/// Polls `condition` every millisecond; panics after 10 s.
fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn the_hook_is_called_with_the_stored_outcome_for_replays_only() {
    let (_dir, engine) = engine();
    let (hook, seen) = recording();
    let options = RunOptions {
        on_replay: Some(hook),
        ..RunOptions::default()
    };
    let run = |key: &str, request: &[u8], result: Result<Outcome, WorkError<&'static str>>| {
        engine.run_once_with("u", key, request, options.clone(), |_| result)
    };
    // A retryable failure: released, no replay.
    assert!(matches!(
        run("k", b"req", Err(WorkError::Retryable("timeout"))),
        Err(RunError::Work { stored: false, .. })
    ));
    let first = run("k", b"req", Ok(created("ch_1"))).unwrap();
    assert!(!first.replayed);
    assert!(seen.lock().is_empty(), "the hook ran on a run of the work");

    let retry = run("k", b"req", Ok(created("must not run"))).unwrap();
    assert!(retry.replayed);
    assert_eq!(retry.outcome, created("ch_1"));
    assert_eq!(*seen.lock(), [(created("ch_1"), false)]);

    // A mismatch and a key in flight are not replays.
    assert!(matches!(
        run("k", b"other", Ok(created("x"))),
        Err(RunError::Mismatch)
    ));
    let Begin::Started(lease) = engine.begin("u", "held", Fingerprint::of(b"req")).unwrap() else {
        panic!("a new key is started")
    };
    assert!(matches!(
        run("held", b"req", Ok(created("x"))),
        Err(RunError::InFlight { .. })
    ));
    engine.release(&lease).unwrap();
    assert_eq!(seen.lock().len(), 1);
}

#[test]
fn waited_is_true_for_a_replay_served_after_waiting_for_the_first_caller() {
    let (_dir, engine) = engine();
    let (hook, seen) = recording();
    let options = RunOptions {
        wait: Duration::from_secs(20),
        on_replay: Some(hook),
        ..RunOptions::default()
    };
    let Begin::Started(lease) = engine.begin("u", "k", Fingerprint::of(b"req")).unwrap() else {
        panic!("a new key is started")
    };
    let in_flight = engine.stats().in_flight;
    std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            engine.run_once_with("u", "k", b"req", options.clone(), |_| {
                Ok::<_, WorkError<()>>(created("must not run"))
            })
        });
        wait_until("the caller to find the key in flight", || {
            engine.stats().in_flight > in_flight
        });
        engine.complete(&lease, created("first")).unwrap();
        let done = waiter.join().unwrap().unwrap();
        assert!(done.replayed);
        assert_eq!(done.outcome, created("first"));
    });
    // A later caller finds it completed: no wait.
    let later = engine
        .run_once_with("u", "k", b"req", options, |_| {
            Ok::<_, WorkError<()>>(created("must not run"))
        })
        .unwrap();
    assert!(later.replayed);
    assert_eq!(
        *seen.lock(),
        [(created("first"), true), (created("first"), false)]
    );
}

#[test]
fn the_async_run_once_calls_the_hook_for_replays_and_tells_whether_it_waited() {
    let (_dir, engine) = engine();
    let asynch = AsyncEngine::new(Arc::clone(&engine));
    let (hook, seen) = recording();
    let options = RunOptions {
        wait: Duration::from_secs(20),
        on_replay: Some(hook),
        ..RunOptions::default()
    };
    let work = |outcome: Outcome| {
        move |_ctx: idemkv::AsyncRunContext| async move { Ok::<_, WorkError<()>>(outcome) }
    };
    let first = futures::executor::block_on(asynch.run_once_with(
        "u",
        "a",
        b"req",
        options.clone(),
        work(created("async")),
    ))
    .unwrap();
    assert!(!first.replayed);
    assert!(seen.lock().is_empty());
    let retry = futures::executor::block_on(asynch.run_once_with(
        "u",
        "a",
        b"req",
        options.clone(),
        work(created("must not run")),
    ))
    .unwrap();
    assert!(retry.replayed);
    assert_eq!(*seen.lock(), [(created("async"), false)]);

    let Begin::Started(lease) = engine.begin("u", "b", Fingerprint::of(b"req")).unwrap() else {
        panic!("a new key is started")
    };
    let in_flight = engine.stats().in_flight;
    std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            futures::executor::block_on(asynch.run_once_with(
                "u",
                "b",
                b"req",
                options.clone(),
                work(created("must not run")),
            ))
        });
        wait_until("the caller to find the key in flight", || {
            engine.stats().in_flight > in_flight
        });
        engine.complete(&lease, created("held")).unwrap();
        assert!(waiter.join().unwrap().unwrap().replayed);
    });
    assert_eq!(
        *seen.lock(),
        [(created("async"), false), (created("held"), true)]
    );
}
