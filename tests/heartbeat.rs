//! Lease heartbeats by the engine's own thread (issue 12): a heartbeat
//! keeps a lease past its TTL, ends when its handle is dropped or stopped,
//! when an extend fails, at `Options::heartbeat_limit` and at `close`; one
//! thread serves a thousand leases; its extends wait for no fsync; async
//! `run_once_with` keeps a long work's key.
//!
//! Leases follow a `ManualClock`; the heartbeat's interval and limit are
//! real time, so the tests use intervals of a few milliseconds and wait for
//! the extends they need through `Stats::heartbeats`.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Waker};
use std::time::{Duration, Instant};

use idemkv::{
    AsyncEngine, Begin, Durability, Engine, Fingerprint, Lease, ManualClock, Options, Outcome,
    RunOptions, WorkError,
};

const TTL: Duration = Duration::from_secs(1);
const EVERY: Duration = Duration::from_millis(2);

fn options(clock: &Arc<ManualClock>) -> Options {
    Options {
        durability: Durability::None,
        background: false,
        lease_ttl: TTL,
        clock: clock.clone(),
        ..Options::default()
    }
}

fn open(options: Options) -> (tempfile::TempDir, Engine) {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path(), options).unwrap();
    (dir, engine)
}

fn fp() -> Fingerprint {
    Fingerprint::of(b"req")
}

fn started(engine: &Engine, key: &str) -> Lease {
    match engine.begin("u", key, fp()).unwrap() {
        Begin::Started(lease) => lease,
        other => panic!("expected Started for {key}, got {other:?}"),
    }
}

fn ok() -> Outcome {
    Outcome {
        status: 200,
        body: "done".into(),
    }
}

/// Polls `condition` every millisecond; panics after 1.5 s.
fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(
            start.elapsed() < Duration::from_millis(1500),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits for `n` heartbeat extends counted after this call: with `n >= 2`,
/// at least one of them read the clock after the call (the first may have
/// been under way).
fn wait_beats(engine: &Engine, n: u64) {
    let seen = engine.stats().heartbeats;
    wait_until("heartbeat extends", || {
        engine.stats().heartbeats >= seen + n
    });
}

/// Moves the manual clock 3 TTLs forward in half-TTL steps, waiting after
/// each step for the heartbeat to extend the lease from the new time.
fn outlive_the_ttl(engine: &Engine, clock: &ManualClock) {
    for _ in 0..6 {
        clock.advance(TTL / 2);
        wait_beats(engine, 2);
    }
}

fn in_flight(engine: &Engine, key: &str) -> bool {
    matches!(
        engine.begin("u", key, fp()).unwrap(),
        Begin::InFlight { .. }
    )
}

#[test]
fn a_heartbeat_keeps_a_lease_alive_past_its_ttl() {
    let clock = Arc::new(ManualClock::new(0));
    let (_dir, engine) = open(options(&clock));
    let lease = started(&engine, "k");
    let heartbeat = engine.heartbeat(&lease, EVERY);
    assert!(heartbeat.is_running());
    outlive_the_ttl(&engine, &clock);
    // Three TTLs later another begin finds the key in flight, not expired.
    assert!(in_flight(&engine, "k"));
    assert!(heartbeat.is_running());
    heartbeat.stop();
    engine.complete(&lease, ok()).unwrap();
    assert_eq!(engine.stats().takeovers, 0);
}

#[test]
fn dropping_the_handle_stops_the_extends_and_the_lease_expires() {
    let clock = Arc::new(ManualClock::new(0));
    let (_dir, engine) = open(options(&clock));
    let lease = started(&engine, "k");
    let heartbeat = engine.heartbeat(&lease, EVERY);
    wait_beats(&engine, 2);
    drop(heartbeat);
    let before = engine.stats();
    std::thread::sleep(Duration::from_millis(30));
    let after = engine.stats();
    assert_eq!(after.heartbeats, before.heartbeats, "still extending");
    assert_eq!(after.records_written, before.records_written);
    clock.advance(TTL);
    started(&engine, "k");
    assert_eq!(engine.stats().takeovers, 1);
}

#[test]
fn stop_ends_the_heartbeat_before_it_returns() {
    let clock = Arc::new(ManualClock::new(0));
    let (_dir, engine) = open(options(&clock));
    let lease = started(&engine, "k");
    let heartbeat = engine.heartbeat(&lease, Duration::from_micros(100));
    wait_beats(&engine, 2);
    heartbeat.stop();
    // No extend runs once stop returned: the count never moves again.
    let stopped_at = engine.stats().heartbeats;
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(engine.stats().heartbeats, stopped_at);
}

#[test]
fn the_heartbeat_limit_stops_a_heartbeat() {
    let clock = Arc::new(ManualClock::new(0));
    let limit = Duration::from_millis(100);
    let (_dir, engine) = open(Options {
        heartbeat_limit: limit,
        ..options(&clock)
    });
    let lease = started(&engine, "k");
    let start = Instant::now();
    let heartbeat = engine.heartbeat(&lease, EVERY);
    wait_beats(&engine, 2);
    wait_until("the limit", || !heartbeat.is_running());
    assert!(
        start.elapsed() >= limit,
        "stopped early: {:?}",
        start.elapsed()
    );
    let beats = engine.stats().heartbeats;
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(engine.stats().heartbeats, beats, "extended past the limit");
    // The lease ends at most one TTL after the last extend.
    clock.advance(TTL);
    started(&engine, "k");
    assert_eq!(engine.stats().takeovers, 1);
}

#[test]
fn the_handle_is_send_and_sync() {
    fn shared<T: Send + Sync>() {}
    shared::<idemkv::Heartbeat>();
}

#[test]
fn a_zero_interval_or_limit_gives_a_handle_that_does_nothing() {
    let clock = Arc::new(ManualClock::new(0));
    let (_dir, engine) = open(options(&clock));
    let lease = started(&engine, "k");
    assert!(!engine.heartbeat(&lease, Duration::ZERO).is_running());
    let (_dir2, off) = open(Options {
        heartbeat_limit: Duration::ZERO,
        ..options(&clock)
    });
    let lease = started(&off, "k");
    let heartbeat = off.heartbeat(&lease, EVERY);
    assert!(!heartbeat.is_running());
    std::thread::sleep(Duration::from_millis(10));
    assert_eq!(off.stats().heartbeats, 0);
}

#[test]
fn a_heartbeat_stops_once_its_lease_is_completed() {
    let clock = Arc::new(ManualClock::new(0));
    let (_dir, engine) = open(options(&clock));
    let lease = started(&engine, "k");
    let heartbeat = engine.heartbeat(&lease, EVERY);
    wait_beats(&engine, 1);
    engine.complete(&lease, ok()).unwrap();
    // The next extend fails (the lease completed), which ends it.
    wait_until("the failed extend", || !heartbeat.is_running());
    assert!(matches!(
        engine.begin("u", "k", fp()).unwrap(),
        Begin::Replay(_)
    ));
}

/// The threads of this process, and those named for the heartbeat (Linux
/// keeps 15 bytes of a thread's name).
fn threads() -> (usize, usize) {
    let mut all = 0;
    let mut heartbeat = 0;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        all += 1;
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end() == "idemkv-heartbea" {
            heartbeat += 1;
        }
    }
    (all, heartbeat)
}

#[test]
fn one_thread_heartbeats_a_thousand_leases() {
    let clock = Arc::new(ManualClock::new(0));
    let (_dir, engine) = open(options(&clock));
    let keys: Vec<String> = (0..1000).map(|i| format!("k{i}")).collect();
    let leases: Vec<Lease> = keys.iter().map(|k| started(&engine, k)).collect();
    let (before, _) = threads();
    let every = Duration::from_millis(20);
    let heartbeats: Vec<_> = leases.iter().map(|l| engine.heartbeat(l, every)).collect();
    wait_beats(&engine, 1000);
    let (after, named) = threads();
    // Other tests of this binary may start a few threads meanwhile; a
    // thread (or a task runtime) per lease would add about a thousand.
    assert!(
        after < before + 50,
        "{before} threads before, {after} after"
    );
    assert!(named >= 1, "no idemkv-heartbeat thread");
    // Past the TTL, with every lease extended from the new time on the
    // way: 2 001 extends after each step cover all 1 000 leases (they are
    // served in due order).
    for _ in 0..2 {
        clock.advance(TTL * 3 / 5);
        wait_beats(&engine, 2001);
    }
    assert!(keys.iter().all(|k| in_flight(&engine, k)));
    assert!(heartbeats.iter().all(idemkv::Heartbeat::is_running));
    drop(heartbeats);
    assert_eq!(engine.stats().takeovers, 0);
}

#[test]
fn heartbeat_extends_wait_for_no_fsync() {
    let clock = Arc::new(ManualClock::new(0));
    let (_dir, engine) = open(Options {
        durability: Durability::Sync,
        ..options(&clock)
    });
    let lease = started(&engine, "k");
    let fsyncs = engine.stats().fsyncs;
    let heartbeat = engine.heartbeat(&lease, EVERY);
    wait_beats(&engine, 10);
    heartbeat.stop();
    assert_eq!(engine.stats().fsyncs, fsyncs, "a heartbeat extend synced");
    // The owner's complete syncs them along with its own record.
    engine.complete(&lease, ok()).unwrap();
    assert!(engine.stats().fsyncs > fsyncs);
}

#[test]
fn close_stops_the_heartbeats_and_later_ones_do_nothing() {
    let clock = Arc::new(ManualClock::new(0));
    let (_dir, engine) = open(options(&clock));
    let lease = started(&engine, "k");
    let heartbeat = engine.heartbeat(&lease, EVERY);
    wait_beats(&engine, 2);
    engine.close().unwrap();
    assert!(!heartbeat.is_running());
    let beats = engine.stats().heartbeats;
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(engine.stats().heartbeats, beats, "extended after close");
    heartbeat.stop();
    assert!(!engine.heartbeat(&lease, EVERY).is_running());
}

#[test]
fn async_run_once_with_a_heartbeat_keeps_a_long_works_key() {
    let clock = Arc::new(ManualClock::new(0));
    let (_dir, engine) = open(options(&clock));
    let engine = Arc::new(engine);
    let async_engine = AsyncEngine::new(Arc::clone(&engine));
    let options = RunOptions {
        heartbeat: Some(EVERY),
        ..RunOptions::default()
    };
    let work = |ctx: idemkv::AsyncRunContext| {
        let (engine, clock) = (Arc::clone(&engine), Arc::clone(&clock));
        async move {
            // (Blocking waits are fine on `block_on`'s own thread.)
            outlive_the_ttl(&engine, &clock);
            assert!(in_flight(&engine, "k"), "the key was taken over");
            Ok::<_, WorkError<()>>(Outcome {
                status: 201,
                body: format!("token {}", ctx.token()).into(),
            })
        }
    };
    let done =
        futures::executor::block_on(async_engine.run_once_with("u", "k", b"req", options, work))
            .unwrap();
    assert!(!done.replayed);
    let stats = engine.stats();
    assert_eq!((stats.takeovers, stats.lease_lost), (0, 0));
    assert!(stats.heartbeats >= 12);
}

#[test]
fn a_dropped_async_run_once_with_stops_its_heartbeat() {
    let clock = Arc::new(ManualClock::new(0));
    let (_dir, engine) = open(options(&clock));
    let engine = Arc::new(engine);
    let async_engine = AsyncEngine::new(Arc::clone(&engine));
    let options = RunOptions {
        heartbeat: Some(EVERY),
        ..RunOptions::default()
    };
    {
        let run = async_engine.run_once_with("u", "k", b"req", options, |_| {
            std::future::pending::<Result<Outcome, WorkError<()>>>()
        });
        let mut run = pin!(run);
        let mut cx = Context::from_waker(Waker::noop());
        // Begins (the first lease's token reservation runs on a thread of
        // its own: poll again until the key is claimed) and parks in the
        // work.
        wait_until("the claim", || {
            assert!(run.as_mut().poll(&mut cx).is_pending());
            engine.get("u", "k").unwrap().is_some()
        });
        assert!(run.as_mut().poll(&mut cx).is_pending());
        wait_beats(&engine, 2);
    }
    let beats = engine.stats().heartbeats;
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(engine.stats().heartbeats, beats, "extended after the drop");
    // The work may have run: the key is left to its lease.
    assert!(in_flight(&engine, "k"));
    clock.advance(TTL);
    started(&engine, "k");
}
