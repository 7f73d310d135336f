//! The HTTP layer's replay hook (issue 13, feature 4), over a real socket
//! with hyper's client: `IdempotencyLayer::on_replay` is called for
//! replays only, may change their headers but not their body (nor the
//! layer's own markers and framing), and sees `waited()` true only for a
//! replay served after waiting for an in-flight key.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use idemkv::http::{IDEMPOTENT_REPLAYED, IdempotencyLayer, Replay, X_USER_ID};
use idemkv::{Durability, Engine, ManualClock, Options};
use parking_lot::Mutex;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::Notify;

mod client;
use client::{Reply, post as send};

/// What the handlers count and wait on.
#[derive(Default)]
struct Handlers {
    charges: AtomicU64,
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

/// Blocks until the test lets it go, then `201 slow done`.
async fn slow(State(h): State<Arc<Handlers>>) -> impl IntoResponse {
    h.slow.fetch_add(1, Ordering::SeqCst);
    h.entered.notify_one();
    h.proceed.notified().await;
    (StatusCode::CREATED, "slow done")
}

/// What the hook saw of one replay.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    status: u16,
    waited: bool,
    body: String,
    request_id: Option<String>,
}

/// A running app whose layer's hook records what it sees and changes the
/// replay's headers: adds `x-replay-for` (the request's `x-request-id`)
/// and `x-waited`, removes `x-charge-id`, and tries to change the layer's
/// marker and the framing.
struct App {
    addr: SocketAddr,
    handlers: Arc<Handlers>,
    engine: Arc<Engine>,
    seen: Arc<Mutex<Vec<Seen>>>,
    _dir: TempDir,
}

impl App {
    async fn start(configure: impl FnOnce(IdempotencyLayer) -> IdempotencyLayer) -> App {
        let dir = tempfile::tempdir().unwrap();
        let options = Options {
            durability: Durability::Sync,
            lease_ttl: Duration::from_secs(30),
            clock: Arc::new(ManualClock::new(1_700_000_000_000)),
            ..Options::default()
        };
        let engine = Arc::new(Engine::open(dir.path(), options).unwrap());
        let handlers = Arc::new(Handlers::default());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        let hook = move |replay: &mut Replay<'_>| {
            let request_id = replay
                .parts()
                .headers
                .get("x-request-id")
                .map(|v| v.to_str().unwrap().to_owned());
            log.lock().push(Seen {
                status: replay.status().as_u16(),
                waited: replay.waited(),
                body: String::from_utf8(replay.body().to_vec()).unwrap(),
                request_id: request_id.clone(),
            });
            let waited = if replay.waited() { "true" } else { "false" };
            let headers = replay.headers_mut();
            if let Some(id) = request_id {
                headers.insert("x-replay-for", HeaderValue::from_str(&id).unwrap());
            }
            headers.insert("x-waited", HeaderValue::from_static(waited));
            headers.remove("x-charge-id");
            // Not the hook's to change: put back, and removed.
            headers.remove(IDEMPOTENT_REPLAYED);
            headers.insert(CONTENT_LENGTH, HeaderValue::from_static("1"));
        };
        let layer = configure(
            IdempotencyLayer::new(Arc::clone(&engine))
                .user_header(X_USER_ID)
                .on_replay(hook),
        );
        let app = Router::new()
            .route("/charge", post(charge))
            .route("/slow", post(slow))
            .with_state(Arc::clone(&handlers))
            .layer(layer);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        App {
            addr,
            handlers,
            engine,
            seen,
            _dir: dir,
        }
    }

    /// `POST path` as alice with `key`, `x-request-id: request_id` and
    /// `body`.
    async fn post(&self, path: &str, key: &str, request_id: &str, body: &str) -> Reply {
        let headers = [
            ("x-user-id", "alice"),
            ("idempotency-key", key),
            ("x-request-id", request_id),
        ];
        send(self.addr, path, &headers, body).await
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().clone()
    }
}

/// Polls `condition` every millisecond; panics after 10 s.
async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_replay_changes_the_headers_of_replays_only_and_never_the_body() {
    let app = App::start(|layer| layer).await;
    let first = app.post("/charge", "k1", "client-1", "100").await;
    assert_eq!(first.status, 201);
    assert_eq!(first.body, r#"{"id":"ch_1","amount":100}"#);
    assert_eq!(first.header("x-charge-id"), Some("ch_1"));
    assert_eq!(first.header("x-replay-for"), None);
    assert!(app.seen().is_empty(), "the hook ran on a first run");

    let retry = app.post("/charge", "k1", "client-2", "100").await;
    assert_eq!(retry.status, 201);
    assert_eq!(retry.body, first.body, "the body is the stored one");
    assert_eq!(retry.header("content-length"), Some("26"));
    assert_eq!(retry.header("content-type"), Some("application/json"));
    assert_eq!(retry.header("x-replay-for"), Some("client-2"));
    assert_eq!(retry.header("x-waited"), Some("false"));
    assert_eq!(retry.header("x-charge-id"), None, "the hook removed it");
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(
        app.seen(),
        [Seen {
            status: 201,
            waited: false,
            body: first.body.clone(),
            request_id: Some("client-2".to_owned()),
        }]
    );

    // Neither a mismatch nor a new key calls the hook.
    let reused = app.post("/charge", "k1", "client-3", "999").await;
    assert_eq!(reused.status, 422);
    assert_eq!(reused.header("x-replay-for"), None);
    let other = app.post("/charge", "k2", "client-4", "5").await;
    assert_eq!(other.status, 201);
    assert_eq!(app.seen().len(), 1);
    assert_eq!(app.handlers.charges.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waited_is_true_only_for_a_replay_served_after_waiting_for_an_in_flight_key() {
    let app = Arc::new(App::start(|layer| layer.wait_in_flight(Duration::from_secs(20))).await);
    let first = tokio::spawn({
        let app = Arc::clone(&app);
        async move { app.post("/slow", "w", "first", "").await }
    });
    app.handlers.entered.notified().await;
    let in_flight = app.engine.stats().in_flight;
    let waiter = tokio::spawn({
        let app = Arc::clone(&app);
        async move { app.post("/slow", "w", "waiter", "").await }
    });
    // The waiter found the key in flight and is waiting.
    wait_until("the retry to find the key in flight", || {
        app.engine.stats().in_flight > in_flight
    })
    .await;
    app.handlers.proceed.notify_one();
    let first = first.await.unwrap();
    assert_eq!((first.status, first.body.as_str()), (201, "slow done"));
    assert_eq!(first.header("x-waited"), None);
    let waited = waiter.await.unwrap();
    assert_eq!((waited.status, waited.body.as_str()), (201, "slow done"));
    assert_eq!(waited.header("idempotent-replayed"), Some("true"));
    assert_eq!(waited.header("x-waited"), Some("true"));

    let later = app.post("/slow", "w", "later", "").await;
    assert_eq!(later.header("idempotent-replayed"), Some("true"));
    assert_eq!(later.header("x-waited"), Some("false"));
    let waits: Vec<(Option<String>, bool)> = app
        .seen()
        .into_iter()
        .map(|s| (s.request_id, s.waited))
        .collect();
    assert_eq!(
        waits,
        [
            (Some("waiter".to_owned()), true),
            (Some("later".to_owned()), false)
        ]
    );
    assert_eq!(app.handlers.slow.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_flight_answer_is_not_a_replay_and_does_not_call_the_hook() {
    let app = Arc::new(App::start(|layer| layer).await);
    let first = tokio::spawn({
        let app = Arc::clone(&app);
        async move { app.post("/slow", "f", "first", "").await }
    });
    app.handlers.entered.notified().await;
    let retry = app.post("/slow", "f", "retry", "").await;
    assert_eq!(retry.status, 409);
    assert_eq!(retry.header("x-waited"), None);
    app.handlers.proceed.notify_one();
    assert_eq!(first.await.unwrap().status, 201);
    assert!(app.seen().is_empty());
    assert_eq!(app.handlers.slow.load(Ordering::SeqCst), 1);
}
