//! The HTTP layer on a store that is not the engine
//! (`IdempotencyLayer::with_store`, issue 15): a wrapper around an
//! `AsyncEngine`, defined here, that counts every call of the
//! `IdempotencyStore` trait and can be told to fail `begin` or `complete`.
//! It has no heartbeat of its own and cannot release from a `Drop` (the
//! trait's provided answers, as a remote store such as a cluster `Node`),
//! so the layer's own tokio-task heartbeat extends its leases through
//! `extend`. Every test checks the wrapper's counters: a layer that went
//! around the trait to the engine would leave them at zero.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderName, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use idemkv::http::IdempotencyLayer;
use idemkv::{
    AsyncEngine, Begin, Engine, Error, Fingerprint, IdempotencyStore, Lease, Options, Outcome,
    RecordState, RecordView, Result,
};
use parking_lot::Mutex;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::Notify;

mod client;
use client::{Reply, post as send};

/// The calls the layer made through the wrapper, by method.
#[derive(Default)]
struct Calls {
    begin: AtomicU64,
    begin_wait: AtomicU64,
    wait: AtomicU64,
    complete: AtomicU64,
    complete_with_ttl: AtomicU64,
    release: AtomicU64,
    extend: AtomicU64,
    outcome: AtomicU64,
    get: AtomicU64,
    /// `begin` answers `Error::Closed` while set.
    fail_begin: AtomicBool,
    /// `complete` answers `Error::Poisoned` while set.
    fail_complete: AtomicBool,
}

/// A counter's value.
fn count(of: &AtomicU64) -> u64 {
    of.load(Ordering::SeqCst)
}

/// A store that counts its calls and delegates them to an engine.
#[derive(Clone)]
struct Counting {
    engine: AsyncEngine,
    calls: Arc<Calls>,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::SeqCst);
}

impl IdempotencyStore for Counting {
    fn begin(
        &self,
        user: &[u8],
        key: &[u8],
        fingerprint: Fingerprint,
    ) -> impl Future<Output = Result<Begin>> + Send {
        bump(&self.calls.begin);
        let fail = self.calls.fail_begin.load(Ordering::SeqCst);
        async move {
            if fail {
                return Err(Error::Closed);
            }
            IdempotencyStore::begin(&self.engine, user, key, fingerprint).await
        }
    }

    fn begin_wait(
        &self,
        user: &[u8],
        key: &[u8],
        fingerprint: Fingerprint,
        timeout: Duration,
    ) -> impl Future<Output = Result<Begin>> + Send {
        bump(&self.calls.begin_wait);
        IdempotencyStore::begin_wait(&self.engine, user, key, fingerprint, timeout)
    }

    fn wait(
        &self,
        user: &[u8],
        key: &[u8],
        fingerprint: Fingerprint,
        timeout: Duration,
    ) -> impl Future<Output = Result<Option<Outcome>>> + Send {
        bump(&self.calls.wait);
        IdempotencyStore::wait(&self.engine, user, key, fingerprint, timeout)
    }

    fn complete(&self, lease: &Lease, outcome: Outcome) -> impl Future<Output = Result<()>> + Send {
        bump(&self.calls.complete);
        let fail = self.calls.fail_complete.load(Ordering::SeqCst);
        async move {
            if fail {
                return Err(Error::Poisoned {
                    kind: std::io::ErrorKind::Other,
                });
            }
            IdempotencyStore::complete(&self.engine, lease, outcome).await
        }
    }

    fn complete_with_ttl(
        &self,
        lease: &Lease,
        outcome: Outcome,
        ttl: Duration,
    ) -> impl Future<Output = Result<()>> + Send {
        bump(&self.calls.complete_with_ttl);
        IdempotencyStore::complete_with_ttl(&self.engine, lease, outcome, ttl)
    }

    fn release(&self, lease: &Lease) -> impl Future<Output = Result<()>> + Send {
        bump(&self.calls.release);
        IdempotencyStore::release(&self.engine, lease)
    }

    fn extend(&self, lease: &Lease, by: Duration) -> impl Future<Output = Result<Lease>> + Send {
        bump(&self.calls.extend);
        IdempotencyStore::extend(&self.engine, lease, by)
    }

    fn outcome(
        &self,
        user: &[u8],
        key: &[u8],
    ) -> impl Future<Output = Result<Option<Outcome>>> + Send {
        bump(&self.calls.outcome);
        IdempotencyStore::outcome(&self.engine, user, key)
    }

    fn get(
        &self,
        user: &[u8],
        key: &[u8],
    ) -> impl Future<Output = Result<Option<RecordView>>> + Send {
        bump(&self.calls.get);
        IdempotencyStore::get(&self.engine, user, key)
    }

    fn lease_ttl(&self) -> Duration {
        IdempotencyStore::lease_ttl(&self.engine)
    }
    // `begin_waited`, `heartbeat` and `release_now`: the provided answers.
}

/// 1.5 s: long enough for a retry to find a key in flight on a busy
/// machine, short enough for a test to outlast it.
const LEASE_TTL: Duration = Duration::from_millis(1500);

const UNAVAILABLE: &str = r#"{"title":"Idempotency store unavailable","status":503,"detail":"The request was not processed; retry later with the same Idempotency-Key."}"#;

/// What the handlers count and wait on.
#[derive(Default)]
struct Handlers {
    charges: AtomicU64,
    jobs: AtomicU64,
    slow: AtomicU64,
    /// Notified when `POST /slow` has started.
    entered: Notify,
    /// `POST /slow` waits for this before it answers.
    proceed: Notify,
}

/// `201` with a new charge id in the body and in `x-charge-id`.
async fn charge(State(h): State<Arc<Handlers>>, body: String) -> impl IntoResponse {
    let n = h.charges.fetch_add(1, Ordering::SeqCst) + 1;
    (
        StatusCode::CREATED,
        [
            (CONTENT_TYPE, "application/json".to_owned()),
            (HeaderName::from_static("x-charge-id"), format!("ch_{n}")),
        ],
        format!(r#"{{"id":"ch_{n}","amount":{body}}}"#),
    )
}

/// A job that runs 400 ms: eight heartbeats of 50 ms.
async fn job(State(h): State<Arc<Handlers>>) -> impl IntoResponse {
    h.jobs.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(400)).await;
    (StatusCode::OK, "job done")
}

/// Blocks until the test lets it go, then `201 slow done`.
async fn slow(State(h): State<Arc<Handlers>>) -> impl IntoResponse {
    h.slow.fetch_add(1, Ordering::SeqCst);
    h.entered.notify_one();
    h.proceed.notified().await;
    (StatusCode::CREATED, "slow done")
}

/// A running app: the routes behind `IdempotencyLayer::with_store` on a
/// [`Counting`] store.
struct App {
    addr: SocketAddr,
    handlers: Arc<Handlers>,
    calls: Arc<Calls>,
    engine: Arc<Engine>,
    _dir: TempDir,
}

impl App {
    async fn start(
        configure: impl FnOnce(IdempotencyLayer<Counting>) -> IdempotencyLayer<Counting>,
    ) -> App {
        let dir = tempfile::tempdir().unwrap();
        let options = Options {
            lease_ttl: LEASE_TTL,
            ..Options::default()
        };
        let engine = Arc::new(Engine::open(dir.path(), options).unwrap());
        let calls = Arc::new(Calls::default());
        let store = Counting {
            engine: AsyncEngine::new(Arc::clone(&engine)),
            calls: Arc::clone(&calls),
        };
        let handlers = Arc::new(Handlers::default());
        let layer = configure(IdempotencyLayer::with_store(store).fixed_user("alice"));
        let app = Router::new()
            .route("/charge", post(charge))
            .route("/job", post(job))
            .route("/slow", post(slow))
            .with_state(Arc::clone(&handlers))
            .layer(layer);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        App {
            addr,
            handlers,
            calls,
            engine,
            _dir: dir,
        }
    }

    async fn post(&self, path: &str, key: &str, body: &str) -> Reply {
        send(self.addr, path, &[("Idempotency-Key", key)], body).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fresh_key_runs_once_through_the_store_and_its_retry_is_replayed_byte_for_byte() {
    let app = App::start(|l| l).await;
    let calls = &app.calls;
    let first = app.post("/charge", "k1", "1000").await;
    assert_eq!(first.status, 201);
    assert_eq!(first.body, r#"{"id":"ch_1","amount":1000}"#);
    assert_eq!(first.header("x-charge-id"), Some("ch_1"));
    assert_eq!(first.header("idempotent-replayed"), None);
    assert_eq!(count(&calls.begin), 1);
    assert_eq!(count(&calls.complete), 1);

    let retry = app.post("/charge", "k1", "1000").await;
    assert_eq!(retry.status, first.status);
    assert_eq!(retry.body, first.body);
    assert_eq!(retry.header("x-charge-id"), Some("ch_1"));
    assert_eq!(retry.header("content-type"), Some("application/json"));
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    // Every header but the date and the marker is the first response's.
    let others = |reply: &Reply| {
        let mut headers = reply.headers.clone();
        headers.remove("date");
        headers.remove("idempotent-replayed");
        headers
    };
    assert_eq!(others(&retry), others(&first));
    assert_eq!(app.handlers.charges.load(Ordering::SeqCst), 1);

    // Every call went through the store: two begins, one complete, and
    // nothing else (no wait was asked for, nothing was released).
    assert_eq!(count(&calls.begin), 2);
    assert_eq!(count(&calls.complete), 1);
    for other in [
        &calls.begin_wait,
        &calls.wait,
        &calls.complete_with_ttl,
        &calls.release,
        &calls.outcome,
    ] {
        assert_eq!(count(other), 0);
    }
    let stats = app.engine.stats();
    assert_eq!((stats.begins, stats.completions), (2, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_error_on_begin_is_the_503_problem_and_runs_nothing() {
    let app = App::start(|l| l).await;
    app.calls.fail_begin.store(true, Ordering::SeqCst);
    let reply = app.post("/charge", "k1", "1000").await;
    assert_eq!(reply.status, 503);
    assert_eq!(
        reply.header("content-type"),
        Some("application/problem+json")
    );
    assert_eq!(reply.body, UNAVAILABLE);
    assert_eq!(app.handlers.charges.load(Ordering::SeqCst), 0);
    assert_eq!(count(&app.calls.begin), 1);

    // The store is back: the key was never claimed, so the request runs.
    app.calls.fail_begin.store(false, Ordering::SeqCst);
    let reply = app.post("/charge", "k1", "1000").await;
    assert_eq!(reply.status, 201);
    assert_eq!(app.handlers.charges.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_error_on_complete_returns_the_response_unstored_and_leaves_the_key_to_its_lease() {
    let app = App::start(|l| l.heartbeat_limit(Duration::ZERO)).await;
    app.calls.fail_complete.store(true, Ordering::SeqCst);
    let first = app.post("/charge", "k1", "1000").await;
    // The work ran: its response is passed on as is (not a 503, which
    // would invite a retry that runs the work again), and not stored.
    assert_eq!(first.status, 201);
    assert_eq!(first.body, r#"{"id":"ch_1","amount":1000}"#);
    assert_eq!(count(&app.calls.complete), 1);
    // Not released either: the key stays claimed until its lease ends.
    assert_eq!(count(&app.calls.release), 0);
    let view = app.engine.get("alice", "k1").unwrap().expect("still held");
    assert_eq!(view.state, RecordState::InProgress);

    app.calls.fail_complete.store(false, Ordering::SeqCst);
    let retry = app.post("/charge", "k1", "1000").await;
    assert_eq!(retry.status, 409);
    assert!(retry.header("retry-after").is_some());
    assert_eq!(app.handlers.charges.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_jobs_heartbeat_extends_its_lease_through_the_store_and_stops_when_it_is_stored() {
    let app = App::start(|l| l.heartbeat_every(Duration::from_millis(50))).await;
    let reply = app.post("/job", "j1", "").await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "job done"));
    // 400 ms of work, an extend every 50 ms: about 8 (a slow machine
    // makes fewer), all of them through the store.
    let extends = count(&app.calls.extend);
    assert!(extends >= 3, "{extends} extends in a 400 ms job");
    assert_eq!(count(&app.calls.complete), 1);
    // The heartbeat stopped when the response was stored.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(count(&app.calls.extend), extends);
    let retry = app.post("/job", "j1", "").await;
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(app.handlers.jobs.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_heartbeat_keeps_a_job_longer_than_the_lease_ttl_from_a_retry() {
    let app = App::start(|l| l.heartbeat_every(Duration::from_millis(50))).await;
    let addr = app.addr;
    let first =
        tokio::spawn(async move { send(addr, "/slow", &[("Idempotency-Key", "s1")], "").await });
    app.handlers.entered.notified().await;
    // Twice the lease TTL: only the heartbeat (through the store's
    // `extend`) keeps the key from expiring.
    tokio::time::sleep(LEASE_TTL * 2).await;
    // (Had the lease expired, the retry would run the handler again, which
    // blocks: the timeout fails the test instead.)
    let retry = tokio::time::timeout(Duration::from_secs(5), app.post("/slow", "s1", ""))
        .await
        .expect("the retry is answered at once, not run");
    assert_eq!(retry.status, 409);
    assert!(count(&app.calls.extend) >= 3);
    app.handlers.proceed.notify_one();
    let first = first.await.unwrap();
    assert_eq!((first.status, first.body.as_str()), (201, "slow done"));
    assert_eq!(app.handlers.slow.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiting_for_a_key_in_flight_goes_through_the_stores_begin_wait() {
    let waited = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&waited);
    let app = App::start(move |l| {
        l.wait_in_flight(Duration::from_secs(10))
            .on_replay(move |replay| seen.lock().push(replay.waited()))
    })
    .await;
    let addr = app.addr;
    let first =
        tokio::spawn(async move { send(addr, "/slow", &[("Idempotency-Key", "w1")], "").await });
    app.handlers.entered.notified().await;
    let second =
        tokio::spawn(async move { send(addr, "/slow", &[("Idempotency-Key", "w1")], "").await });
    // The second request found the key in flight and waits in the store's
    // `begin_wait` (the trait's provided `begin_waited`).
    while count(&app.calls.begin_wait) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    app.handlers.proceed.notify_one();
    let (first, second) = (first.await.unwrap(), second.await.unwrap());
    assert_eq!((first.status, first.body.as_str()), (201, "slow done"));
    assert_eq!((second.status, second.body.as_str()), (201, "slow done"));
    assert_eq!(second.header("idempotent-replayed"), Some("true"));
    assert_eq!(*waited.lock(), vec![true]);
    assert_eq!(app.handlers.slow.load(Ordering::SeqCst), 1);
}
