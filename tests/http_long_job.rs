//! Long-running jobs through the HTTP layer (issue 13, feature 3), over a
//! real socket with hyper's client: `in_flight_status(202 Accepted)` gives a
//! retry of a job still running `202` with `Retry-After` and the `Location`
//! its handler published through [`InFlightLocation`]; the heartbeat keeps
//! a 15-minute job's 30 s lease alive for its whole run; a worker that
//! crashes mid-job leaves its lease to expire, and a retry then runs the job
//! again.
//!
//! Leases follow a [`ManualClock`]; the heartbeat runs in real time, every
//! 2 ms (`heartbeat_every`), so the tests move the clock 10 s (a third of
//! the lease) at a time and wait after each step for the heartbeat to
//! extend the lease from the new time (`Stats::heartbeats`): fifteen
//! minutes of job take well under a second. The transcoding tests print
//! their timelines (`cargo test --release --all-features --test
//! http_long_job -- --nocapture`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::header::LOCATION;
use axum::http::{HeaderValue, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Extension, Router};
use idemkv::http::{IdempotencyLayer, InFlightLocation, X_USER_ID};
use idemkv::{Clock, Durability, Engine, ManualClock, Options, RecordState};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio::sync::Notify;

mod client;
use client::{Reply, post as send, try_post};

/// The engine's lease: shorter than the job, so only the heartbeat keeps it.
const TTL: Duration = Duration::from_secs(30);
/// How long a transcode runs, on the engine's clock.
const JOB: Duration = Duration::from_secs(15 * 60);
/// How far the test moves the clock at a time: a third of the lease.
const STEP: Duration = Duration::from_secs(10);
/// The heartbeat's interval, in real time.
const BEAT: Duration = Duration::from_millis(2);
/// The heartbeat's limit (layer and engine): longer than any job here.
const LIMIT: Duration = Duration::from_secs(30 * 60);
/// Where the clock starts (ms since the Unix epoch).
const START_MS: u64 = 1_700_000_000_000;

const IN_PROGRESS_409: &str = r#"{"title":"Request in progress","status":409,"detail":"A request with this Idempotency-Key is still being processed; retry after Retry-After seconds."}"#;
const IN_PROGRESS_202: &str = r#"{"title":"Request in progress","status":202,"detail":"A request with this Idempotency-Key is still being processed; retry after Retry-After seconds."}"#;

fn options(clock: &Arc<ManualClock>) -> Options {
    Options {
        durability: Durability::Sync,
        lease_ttl: TTL,
        heartbeat_limit: LIMIT,
        clock: clock.clone(),
        ..Options::default()
    }
}

/// What the handlers share with the test.
struct Jobs {
    clock: Arc<ManualClock>,
    /// Runs of `POST /transcode` and `POST /gated`.
    runs: AtomicU64,
    /// `POST /gated` publishes its location once told to, then answers once
    /// told to.
    publish: Notify,
    finish: Notify,
}

impl Jobs {
    fn new(clock: &Arc<ManualClock>) -> Arc<Jobs> {
        Arc::new(Jobs {
            clock: clock.clone(),
            runs: AtomicU64::new(0),
            publish: Notify::new(),
            finish: Notify::new(),
        })
    }

    fn runs(&self) -> u64 {
        self.runs.load(Ordering::SeqCst)
    }
}

/// A transcode: publishes `/jobs/{run}` as its location at once, then runs
/// for [`JOB`] on the engine's clock, then answers `201` with that location.
async fn transcode(
    State(jobs): State<Arc<Jobs>>,
    Extension(location): Extension<InFlightLocation>,
    body: String,
) -> impl IntoResponse {
    let run = jobs.runs.fetch_add(1, Ordering::SeqCst) + 1;
    let job = format!("/jobs/{run}");
    location.set(HeaderValue::from_str(&job).unwrap());
    let end = jobs.clock.now_ms() + JOB.as_millis() as u64;
    while jobs.clock.now_ms() < end {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    (
        StatusCode::CREATED,
        [(LOCATION, job)],
        format!("{body}: transcoded by run {run}"),
    )
}

/// A job the test steps through: publishes `/jobs/{run}` when told to,
/// answers `201` when told to.
async fn gated(
    State(jobs): State<Arc<Jobs>>,
    Extension(location): Extension<InFlightLocation>,
) -> impl IntoResponse {
    let run = jobs.runs.fetch_add(1, Ordering::SeqCst) + 1;
    let job = format!("/jobs/{run}");
    jobs.publish.notified().await;
    location.set(HeaderValue::from_str(&job).unwrap());
    jobs.finish.notified().await;
    (StatusCode::CREATED, [(LOCATION, job)], format!("run {run}"))
}

/// A server on a runtime of its own, so that the test can crash it.
struct Worker {
    runtime: Runtime,
    addr: SocketAddr,
}

impl Worker {
    /// Serves `/transcode` and `/gated` on `engine` through the layer
    /// `configure` makes from one that takes the user from `X-User-Id`.
    fn start(
        engine: &Arc<Engine>,
        jobs: &Arc<Jobs>,
        configure: impl FnOnce(IdempotencyLayer) -> IdempotencyLayer,
    ) -> Worker {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let layer = configure(IdempotencyLayer::new(Arc::clone(engine)).user_header(X_USER_ID));
        let app = Router::new()
            .route("/transcode", post(transcode))
            .route("/gated", post(gated))
            .with_state(Arc::clone(jobs))
            .layer(layer);
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        runtime.spawn(async move { axum::serve(listener, app).await.unwrap() });
        Worker { runtime, addr }
    }

    /// The worker dies mid-job: its runtime is shut down, dropping every
    /// task (the connection, the handler's future, the layer's request and
    /// with it the lease's heartbeat) without running any of them further.
    fn crash(self) {
        self.runtime.shutdown_timeout(Duration::from_secs(5));
    }
}

/// The long-job layer: `202 Accepted` in flight, a fast heartbeat, a
/// limit above the job's length.
fn long_jobs(layer: IdempotencyLayer) -> IdempotencyLayer {
    layer
        .in_flight_status(StatusCode::ACCEPTED)
        .heartbeat_every(BEAT)
        .heartbeat_limit(LIMIT)
}

/// The headers of a request by `studio` with `key`.
fn headers(key: &str) -> [(&str, &str); 2] {
    [("x-user-id", "studio"), ("idempotency-key", key)]
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

/// Waits for two heartbeat extends counted after this call: the second
/// read the clock after the call (the first may have been under way).
fn wait_beats(engine: &Engine) {
    let seen = engine.stats().heartbeats;
    wait_until("heartbeat extends", || {
        engine.stats().heartbeats >= seen + 2
    });
}

/// A job's printed timeline, on the engine's clock (`mm:ss` since the
/// start); printed as one block when the test ends (or fails).
struct Timeline {
    title: &'static str,
    clock: Arc<ManualClock>,
    lines: Vec<String>,
}

impl Timeline {
    fn new(title: &'static str, clock: &Arc<ManualClock>) -> Timeline {
        Timeline {
            title,
            clock: clock.clone(),
            lines: Vec::new(),
        }
    }

    /// The engine clock's time since the start, as `mm:ss`.
    fn now(&self) -> String {
        let secs = (self.clock.now_ms() - START_MS) / 1000;
        format!("{:02}:{:02}", secs / 60, secs % 60)
    }

    fn log(&mut self, what: impl AsRef<str>) {
        let line = format!("  {}  {}", self.now(), what.as_ref());
        self.lines.push(line);
    }

    /// Moves the clock to `until` after the start, [`STEP`] at a time;
    /// while `beating`, waits after each step for the heartbeat to extend
    /// the lease from the new time. Logs the lease of `key` each minute.
    fn advance_to(&mut self, engine: &Engine, key: &str, until: Duration, beating: bool) {
        let until = START_MS + until.as_millis() as u64;
        while self.clock.now_ms() < until {
            self.clock.advance(STEP);
            if beating {
                wait_beats(engine);
            }
            let at = self.clock.now_ms() - START_MS;
            if beating && at.is_multiple_of(60_000) {
                let lease = self.lease_end(engine, key);
                let beats = engine.stats().heartbeats;
                self.log(format!(
                    "job running; heartbeat extends so far: {beats}; lease ends at {lease}"
                ));
            }
        }
    }

    /// When the lease of `key` ends, as `mm:ss`, or what else the record is.
    fn lease_end(&self, engine: &Engine, key: &str) -> String {
        match engine.get("studio", key).unwrap() {
            Some(view) if view.state == RecordState::InProgress => {
                let secs = (view.lease_expires_at_ms.unwrap() - START_MS) / 1000;
                format!("{:02}:{:02}", secs / 60, secs % 60)
            }
            Some(_) => "completed".to_owned(),
            None => "none: no live record".to_owned(),
        }
    }

    fn reply(&mut self, what: &str, reply: &Reply, runs: u64) {
        let mut line = format!("{what} -> {}", reply.status);
        for name in ["retry-after", "location", "idempotent-replayed"] {
            if let Some(value) = reply.header(name) {
                line.push_str(&format!(", {name}: {value}"));
            }
        }
        line.push_str(&format!(" | body {:?} | handler runs: {runs}", reply.body));
        self.log(line);
    }
}

impl Drop for Timeline {
    fn drop(&mut self) {
        println!("{}\n{}\n", self.title, self.lines.join("\n"));
    }
}

#[test]
fn a_fifteen_minute_job_keeps_its_key_and_a_retry_at_minute_14_gets_202() {
    let clock = Arc::new(ManualClock::new(START_MS));
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(Engine::open(dir.path(), options(&clock)).unwrap());
    let jobs = Jobs::new(&clock);
    let worker = Worker::start(&engine, &jobs, long_jobs);
    let client = Runtime::new().unwrap();
    let addr = worker.addr;
    let mut t = Timeline::new(
        "transcode job-1: 15 minutes of work, a 30 s lease, a retry at minute 14",
        &clock,
    );

    let first =
        client.spawn(async move { send(addr, "/transcode", &headers("job-1"), "movie.mov").await });
    wait_until("the job to start", || jobs.runs() == 1);
    t.log(format!(
        "POST /transcode (Idempotency-Key: job-1) -> handler run 1 starts; lease ends at {}",
        t.lease_end(&engine, "job-1")
    ));

    t.advance_to(&engine, "job-1", Duration::from_secs(14 * 60), true);
    let retry = client.block_on(send(addr, "/transcode", &headers("job-1"), "movie.mov"));
    t.reply("retry", &retry, jobs.runs());
    assert_eq!(retry.status, 202, "{retry:?}");
    assert_eq!(retry.body, IN_PROGRESS_202);
    assert_eq!(retry.header("content-type"), Some("application/json"));
    assert_eq!(retry.header("location"), Some("/jobs/1"));
    let retry_after: u64 = retry.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=30).contains(&retry_after), "{retry:?}");
    assert_eq!(retry.header("idempotent-replayed"), None);
    assert_eq!(
        jobs.runs(),
        1,
        "the retry at minute 14 must not run the job"
    );

    // The last step: the job ends at 15:00 and answers.
    t.advance_to(&engine, "job-1", JOB - STEP, true);
    clock.advance(STEP);
    let done = client.block_on(first).unwrap();
    t.reply("the first request's answer", &done, jobs.runs());
    assert_eq!(done.status, 201);
    assert_eq!(done.header("location"), Some("/jobs/1"));
    assert_eq!(done.body, "movie.mov: transcoded by run 1");

    let again = client.block_on(send(addr, "/transcode", &headers("job-1"), "movie.mov"));
    t.reply("retry", &again, jobs.runs());
    assert_eq!(again.status, 201);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.header("location"), Some("/jobs/1"));
    assert_eq!(again.body, done.body);
    assert_eq!(jobs.runs(), 1);
    let stats = engine.stats();
    t.log(format!(
        "heartbeat extends: {}, takeovers: {}",
        stats.heartbeats, stats.takeovers
    ));
    assert_eq!(stats.takeovers, 0, "the lease never expired");
    worker.crash();
}

#[test]
fn a_worker_crash_at_minute_5_lets_a_retry_run_the_job_again_once_the_lease_expires() {
    let clock = Arc::new(ManualClock::new(START_MS));
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(Engine::open(dir.path(), options(&clock)).unwrap());
    let jobs = Jobs::new(&clock);
    let worker = Worker::start(&engine, &jobs, long_jobs);
    let client = Runtime::new().unwrap();
    let mut t = Timeline::new("transcode job-2: the worker crashes at minute 5", &clock);

    let addr = worker.addr;
    let first = client
        .spawn(async move { try_post(addr, "/transcode", &headers("job-2"), "movie.mov").await });
    wait_until("the job to start", || jobs.runs() == 1);
    t.log("POST /transcode (Idempotency-Key: job-2) on worker A -> handler run 1 starts");
    t.advance_to(&engine, "job-2", Duration::from_secs(5 * 60), true);

    worker.crash();
    let cut = client.block_on(first).unwrap();
    assert!(cut.is_err(), "the crashed worker answered: {cut:?}");
    let beats = engine.stats().heartbeats;
    t.log(format!(
        "worker A crashes mid-job (its runtime is shut down: handler dropped, heartbeat stopped); \
         the client sees {:?}",
        cut.unwrap_err()
    ));
    // The process is gone with its engine: the store is reopened from disk.
    engine.close().unwrap();
    drop(engine);
    let engine = Arc::new(Engine::open(dir.path(), options(&clock)).unwrap());
    let lease_end = t.lease_end(&engine, "job-2");
    t.log(format!(
        "the store is reopened from disk: job-2 in flight, lease ends at {lease_end}; worker B starts"
    ));
    assert_eq!(lease_end, "05:30");
    let worker = Worker::start(&engine, &jobs, long_jobs);
    let addr = worker.addr;

    t.advance_to(&engine, "job-2", Duration::from_secs(5 * 60 + 10), false);
    let early = client.block_on(send(addr, "/transcode", &headers("job-2"), "movie.mov"));
    t.reply("retry on worker B (lease still live)", &early, jobs.runs());
    assert_eq!(early.status, 202, "{early:?}");
    assert_eq!(early.header("retry-after"), Some("20"));
    // Worker A's location died with it.
    assert_eq!(early.header("location"), None);
    assert_eq!(jobs.runs(), 1);
    assert!(beats > 0);
    assert_eq!(
        t.lease_end(&engine, "job-2"),
        "05:30",
        "nothing extends the dead worker's lease"
    );

    t.advance_to(&engine, "job-2", Duration::from_secs(5 * 60 + 40), false);
    t.log(format!(
        "the lease has expired (engine.get: {})",
        t.lease_end(&engine, "job-2")
    ));
    let second =
        client.spawn(async move { send(addr, "/transcode", &headers("job-2"), "movie.mov").await });
    wait_until("the job to run again", || jobs.runs() == 2);
    t.log("retry on worker B -> takes the expired key over: handler run 2 starts");
    assert_eq!(engine.stats().takeovers, 1);

    t.advance_to(&engine, "job-2", Duration::from_secs(19 * 60 + 40), true);
    let during = client.block_on(send(addr, "/transcode", &headers("job-2"), "movie.mov"));
    t.reply("retry during run 2", &during, jobs.runs());
    assert_eq!(during.status, 202);
    assert_eq!(during.header("location"), Some("/jobs/2"));
    assert_eq!(jobs.runs(), 2);

    t.advance_to(&engine, "job-2", Duration::from_secs(20 * 60 + 30), true);
    clock.advance(STEP);
    let done = client.block_on(second).unwrap();
    t.reply(
        "run 2's answer (to the retry that ran it)",
        &done,
        jobs.runs(),
    );
    assert_eq!(done.status, 201);
    assert_eq!(done.body, "movie.mov: transcoded by run 2");

    let replay = client.block_on(send(addr, "/transcode", &headers("job-2"), "movie.mov"));
    t.reply("retry", &replay, jobs.runs());
    assert_eq!(replay.status, 201);
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(replay.body, done.body);
    assert_eq!(jobs.runs(), 2, "run once before the crash, once after");
    worker.crash();
}

#[test]
fn in_flight_stays_409_by_default_even_when_the_handler_published_a_location() {
    let clock = Arc::new(ManualClock::new(START_MS));
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(Engine::open(dir.path(), options(&clock)).unwrap());
    let jobs = Jobs::new(&clock);
    let worker = Worker::start(&engine, &jobs, |layer| layer);
    let client = Runtime::new().unwrap();
    let addr = worker.addr;
    let first = client.spawn(async move { send(addr, "/gated", &headers("k"), "").await });
    wait_until("the job to start", || jobs.runs() == 1);
    jobs.publish.notify_one();
    std::thread::sleep(Duration::from_millis(20));
    let retry = client.block_on(send(addr, "/gated", &headers("k"), ""));
    assert_eq!(retry.status, 409);
    assert_eq!(retry.body, IN_PROGRESS_409);
    assert_eq!(
        retry.header("content-type"),
        Some("application/problem+json")
    );
    assert_eq!(retry.header("retry-after"), Some("30"));
    assert_eq!(retry.header("location"), None);
    jobs.finish.notify_one();
    assert_eq!(client.block_on(first).unwrap().status, 201);
    assert_eq!(jobs.runs(), 1);
    worker.crash();
}

#[test]
fn in_flight_202_carries_a_location_only_once_the_handler_published_one() {
    let clock = Arc::new(ManualClock::new(START_MS));
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(Engine::open(dir.path(), options(&clock)).unwrap());
    let jobs = Jobs::new(&clock);
    let worker = Worker::start(&engine, &jobs, long_jobs);
    let client = Runtime::new().unwrap();
    let addr = worker.addr;
    let first = client.spawn(async move { send(addr, "/gated", &headers("k"), "").await });
    wait_until("the job to start", || jobs.runs() == 1);

    let before = client.block_on(send(addr, "/gated", &headers("k"), ""));
    assert_eq!(before.status, 202, "{before:?}");
    assert_eq!(before.header("retry-after"), Some("30"));
    assert_eq!(before.header("location"), None);

    jobs.publish.notify_one();
    let mut after = client.block_on(send(addr, "/gated", &headers("k"), ""));
    let start = Instant::now();
    while after.header("location").is_none() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
        after = client.block_on(send(addr, "/gated", &headers("k"), ""));
    }
    assert_eq!(after.status, 202);
    assert_eq!(after.header("location"), Some("/jobs/1"));
    assert_eq!(jobs.runs(), 1);

    jobs.finish.notify_one();
    let done = client.block_on(first).unwrap();
    assert_eq!((done.status, done.body.as_str()), (201, "run 1"));
    let replay = client.block_on(send(addr, "/gated", &headers("k"), ""));
    assert_eq!(replay.status, 201);
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(replay.header("location"), Some("/jobs/1"));
    assert_eq!(jobs.runs(), 1);
    worker.crash();
}

#[test]
fn other_in_flight_statuses_are_problems_with_retry_after_and_no_location() {
    let clock = Arc::new(ManualClock::new(START_MS));
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(Engine::open(dir.path(), options(&clock)).unwrap());
    let jobs = Jobs::new(&clock);
    let worker = Worker::start(&engine, &jobs, |layer| {
        // A 1xx status cannot end a response: it leaves the setting alone.
        layer
            .in_flight_status(StatusCode::SERVICE_UNAVAILABLE)
            .in_flight_status(StatusCode::CONTINUE)
    });
    let client = Runtime::new().unwrap();
    let addr = worker.addr;
    let first = client.spawn(async move { send(addr, "/gated", &headers("k"), "").await });
    wait_until("the job to start", || jobs.runs() == 1);
    jobs.publish.notify_one();
    std::thread::sleep(Duration::from_millis(20));
    let retry = client.block_on(send(addr, "/gated", &headers("k"), ""));
    assert_eq!(retry.status, 503);
    assert!(retry.body.contains(r#""status":503"#), "{retry:?}");
    assert_eq!(
        retry.header("content-type"),
        Some("application/problem+json")
    );
    assert_eq!(retry.header("retry-after"), Some("30"));
    assert_eq!(retry.header("location"), None);
    jobs.finish.notify_one();
    assert_eq!(client.block_on(first).unwrap().status, 201);
    assert_eq!(jobs.runs(), 1);
    worker.crash();
}
