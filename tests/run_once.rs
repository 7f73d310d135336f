//! The one-call API: `run_once` runs the work at most once per key and
//! request, stores or releases by the work's verdict, and `consume_once`
//! deduplicates queue messages.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use idemkv::{
    Delivery, Durability, Engine, ManualClock, Options, Outcome, RunError, RunOptions, WorkError,
};

fn engine(clock: &Arc<ManualClock>) -> (tempfile::TempDir, Engine) {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(
        dir.path(),
        Options {
            durability: Durability::None,
            background: false,
            clock: clock.clone(),
            ..Options::default()
        },
    )
    .unwrap();
    (dir, engine)
}

fn created(body: &str) -> Outcome {
    Outcome {
        status: 201,
        body: body.to_owned().into(),
    }
}

#[test]
fn the_work_runs_once_and_retries_get_the_stored_outcome() {
    let clock = Arc::new(ManualClock::new(0));
    let (_dir, engine) = engine(&clock);
    let runs = AtomicU32::new(0);
    let work = |_: &idemkv::RunContext<'_>| -> Result<Outcome, WorkError<String>> {
        let n = runs.fetch_add(1, Ordering::SeqCst);
        Ok(created(&format!("charge {n}")))
    };
    let first = engine.run_once("u", "k", b"req", work).unwrap();
    let second = engine.run_once("u", "k", b"req", work).unwrap();
    assert_eq!((first.replayed, second.replayed), (false, true));
    assert_eq!(second.outcome, created("charge 0"));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(matches!(
        engine.run_once("u", "k", b"other", work),
        Err(RunError::Mismatch)
    ));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[test]
fn a_retryable_error_releases_the_key_and_a_final_one_is_stored() {
    let clock = Arc::new(ManualClock::new(0));
    let (_dir, engine) = engine(&clock);
    let failing =
        |_: &idemkv::RunContext<'_>| -> Result<Outcome, WorkError<&str>> { Err("timeout")? };
    match engine.run_once("u", "k", b"req", failing) {
        Err(RunError::Work { error, stored }) => assert_eq!((error, stored), ("timeout", false)),
        other => panic!("{other:?}"),
    }
    // Released: the retry runs the work, which now fails for good.
    let declined = |_: &idemkv::RunContext<'_>| -> Result<Outcome, WorkError<&str>> {
        Err(WorkError::Final(
            "card declined",
            Outcome {
                status: 402,
                body: "declined".into(),
            },
        ))
    };
    match engine.run_once("u", "k", b"req", declined) {
        Err(RunError::Work { error, stored }) => {
            assert_eq!((error, stored), ("card declined", true))
        }
        other => panic!("{other:?}"),
    }
    let never =
        |_: &idemkv::RunContext<'_>| -> Result<Outcome, WorkError<&str>> { panic!("must not run") };
    let replay = engine.run_once("u", "k", b"req", never).unwrap();
    assert_eq!((replay.outcome.status, replay.replayed), (402, true));
}

#[test]
fn a_key_in_flight_is_reported_or_waited_for() {
    let clock = Arc::new(ManualClock::new(0));
    let (_dir, engine) = engine(&clock);
    let idemkv::Begin::Started(lease) = engine
        .begin("u", "k", idemkv::Fingerprint::of(b"req"))
        .unwrap()
    else {
        panic!()
    };
    let never =
        |_: &idemkv::RunContext<'_>| -> Result<Outcome, WorkError<()>> { panic!("must not run") };
    assert!(matches!(
        engine.run_once("u", "k", b"req", never),
        Err(RunError::InFlight { .. })
    ));
    std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            let wait = RunOptions {
                wait: Duration::from_secs(10),
                ..RunOptions::default()
            };
            engine.run_once_with("u", "k", b"req", wait, never)
        });
        std::thread::sleep(Duration::from_millis(50));
        engine
            .complete(&lease, created("from the first caller"))
            .unwrap();
        let done = waiter.join().unwrap().unwrap();
        assert_eq!(
            (done.outcome, done.replayed),
            (created("from the first caller"), true)
        );
    });
}

#[test]
fn the_heartbeat_keeps_long_work_owning_its_key() {
    let dir = tempfile::tempdir().unwrap();
    // Real time here: a 300 ms lease, 900 ms of work, a beat every 100 ms.
    let engine = Engine::open(
        dir.path(),
        Options {
            durability: Durability::None,
            background: false,
            lease_ttl: Duration::from_millis(300),
            ..Options::default()
        },
    )
    .unwrap();
    let options = RunOptions {
        heartbeat: Some(Duration::from_millis(100)),
        ..RunOptions::default()
    };
    let done = engine
        .run_once_with(
            "u",
            "k",
            b"req",
            options,
            |ctx| -> Result<Outcome, WorkError<()>> {
                for _ in 0..9 {
                    std::thread::sleep(Duration::from_millis(100));
                    // Nobody else can take the key over meanwhile.
                    let other = engine
                        .begin("u", "k", idemkv::Fingerprint::of(b"req"))
                        .unwrap();
                    assert!(matches!(other, idemkv::Begin::InFlight { .. }), "{other:?}");
                }
                Ok(created(&format!("token {}", ctx.token())))
            },
        )
        .unwrap();
    assert!(!done.replayed);
}

#[test]
fn consume_once_runs_a_handler_once_per_message_id() {
    let clock = Arc::new(ManualClock::new(0));
    let (_dir, engine) = engine(&clock);
    let handled = AtomicU32::new(0);
    let handler = || -> Result<(), String> {
        handled.fetch_add(1, Ordering::SeqCst);
        Ok(())
    };
    assert_eq!(
        engine
            .consume_once("orders/3", "msg-1", b"payload", handler)
            .unwrap(),
        Delivery::Processed
    );
    assert_eq!(
        engine
            .consume_once("orders/3", "msg-1", b"payload", handler)
            .unwrap(),
        Delivery::Duplicate
    );
    assert_eq!(
        engine
            .consume_once("orders/4", "msg-1", b"payload", handler)
            .unwrap(),
        Delivery::Processed
    );
    assert_eq!(handled.load(Ordering::SeqCst), 2);
    // A failing handler leaves the message to be redelivered.
    let failing = || -> Result<(), String> { Err("db down".into()) };
    assert!(matches!(
        engine.consume_once("orders/3", "msg-2", b"p", failing),
        Err(RunError::Work { stored: false, .. })
    ));
    assert_eq!(
        engine
            .consume_once("orders/3", "msg-2", b"p", handler)
            .unwrap(),
        Delivery::Processed
    );
}

#[test]
fn an_outcome_too_large_to_store_never_makes_the_work_run_twice() {
    // Regression (issue 11, item 7): run_once released the key when complete
    // failed with ResponseTooLarge, so the retry charged again.
    let clock = Arc::new(ManualClock::new(0));
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(
        dir.path(),
        Options {
            durability: Durability::None,
            background: false,
            max_response_len: 64,
            clock: clock.clone(),
            ..Options::default()
        },
    )
    .unwrap();
    let runs = AtomicU32::new(0);
    let work = |_: &idemkv::RunContext<'_>| -> Result<Outcome, WorkError<String>> {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok(created(&"x".repeat(100)))
    };
    let first = engine.run_once("u", "k", b"req", work).unwrap();
    assert!(!first.replayed);
    assert_eq!(first.outcome, created(&"x".repeat(100)));
    let retry = engine.run_once("u", "k", b"req", work).unwrap();
    assert!(retry.replayed);
    assert_eq!(retry.outcome.status, 201, "the original status is kept");
    assert_eq!(&retry.outcome.body[..], idemkv::BODY_NOT_KEPT);
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the work ran twice");

    // A final outcome too large to keep is stored the same way.
    let failing = |_: &idemkv::RunContext<'_>| -> Result<Outcome, WorkError<String>> {
        runs.fetch_add(1, Ordering::SeqCst);
        Err(WorkError::Final(
            "declined".into(),
            Outcome {
                status: 402,
                body: "declined: ".repeat(10).into(),
            },
        ))
    };
    assert!(matches!(
        engine.run_once("u", "k2", b"req", failing),
        Err(RunError::Work { stored: true, .. })
    ));
    let retry = engine.run_once("u", "k2", b"req", failing).unwrap();
    assert_eq!(retry.outcome.status, 402);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[test]
fn a_panic_in_the_work_propagates_and_stops_the_heartbeat() {
    // Regression (issue 11, item 8): with a heartbeat, a panicking work never
    // returned and extended its lease forever.
    let clock = Arc::new(ManualClock::new(0));
    let (_dir, engine) = engine(&clock);
    let engine = Arc::new(engine);
    let options = RunOptions {
        heartbeat: Some(Duration::from_millis(5)),
        ..RunOptions::default()
    };
    let (tx, rx) = std::sync::mpsc::channel();
    // A detached thread: if run_once_with hangs, the test fails instead of
    // hanging with it.
    let runner = Arc::clone(&engine);
    std::thread::spawn(move || {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            runner.run_once_with(
                "u",
                "k",
                b"req",
                options,
                |_| -> Result<Outcome, WorkError<()>> {
                    std::thread::sleep(Duration::from_millis(30));
                    panic!("the work failed")
                },
            )
        }));
        let _ = tx.send(result.is_err());
    });
    let panicked = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("run_once_with did not return after the work panicked");
    assert!(panicked, "the panic did not propagate");
    // The heartbeat stopped: no extends once it returned, and the lease is
    // left to expire (not released: the work may have had effects).
    let before = engine.stats().records_written;
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(engine.stats().records_written, before, "still extending");
    let view = engine.get("u", "k").unwrap().expect("still claimed");
    assert_eq!(view.state, idemkv::RecordState::InProgress);
    clock.advance(Duration::from_secs(31));
    assert!(engine.get("u", "k").unwrap().is_none());
}
