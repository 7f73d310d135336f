//! Keys from the body (`IdempotencyLayer::key_from`) over a real socket,
//! with hyper's HTTP/1.1 client: the key is a JSON-ish `"message_id"`
//! field; the header wins over it, a derived key comes after it, and an
//! invalid one is the layer's `400`.

mod http_client;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::IntoResponse;
use axum::routing::post;
use http_client::{Http, Reply, T0, serve};
use idemkv::http::{IdempotencyLayer, X_USER_ID};
use idemkv::{Durability, Engine, ManualClock, Options};
use tempfile::TempDir;

/// `201 run N`.
async fn consume(State(runs): State<Arc<AtomicU64>>) -> impl IntoResponse {
    let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
    (StatusCode::CREATED, format!("run {n}"))
}

/// The value of the `"message_id"` string field of a JSON-ish body (a
/// plain scan, enough for the test bodies).
fn message_id(_parts: &Parts, body: &Bytes) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    let (_, rest) = text.split_once(r#""message_id":""#)?;
    Some(rest.split_once('"')?.0.to_owned())
}

/// A running app.
struct App {
    http: Http,
    runs: Arc<AtomicU64>,
    /// How often `key_from` was called.
    asked: Arc<AtomicU64>,
    engine: Arc<Engine>,
    layer: IdempotencyLayer,
    _dir: TempDir,
}

/// Serves `POST /messages` behind a layer with users from `X-User-Id`,
/// keys from [`message_id`] (counted), then `configure`.
async fn start(configure: impl FnOnce(IdempotencyLayer) -> IdempotencyLayer) -> App {
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        durability: Durability::Sync,
        clock: Arc::new(ManualClock::new(T0)),
        ..Options::default()
    };
    let engine = Arc::new(Engine::open(dir.path(), options).unwrap());
    let asked = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&asked);
    let layer = configure(
        IdempotencyLayer::new(Arc::clone(&engine))
            .user_header(X_USER_ID)
            .key_from(move |parts, body| {
                counted.fetch_add(1, Ordering::SeqCst);
                message_id(parts, body)
            }),
    );
    let runs = Arc::new(AtomicU64::new(0));
    let app = Router::new()
        .route("/messages", post(consume))
        .with_state(Arc::clone(&runs))
        .layer(layer.clone());
    App {
        http: Http::new(serve(app).await),
        runs,
        asked,
        engine,
        layer,
        _dir: dir,
    }
}

impl App {
    /// `POST /messages` as alice with `body`, and the `Idempotency-Key`
    /// header `key` unless it is `None`.
    async fn post(&self, key: Option<&str>, body: &str) -> Reply {
        let mut headers = vec![("x-user-id", "alice")];
        if let Some(key) = key {
            headers.push(("idempotency-key", key));
        }
        self.http.post("/messages", &headers, body).await
    }

    fn runs(&self) -> u64 {
        self.runs.load(Ordering::SeqCst)
    }

    fn asked(&self) -> u64 {
        self.asked.load(Ordering::SeqCst)
    }

    /// Whether alice has a live record for `key`.
    fn has(&self, key: &str) -> bool {
        self.engine.get("alice", key).unwrap().is_some()
    }
}

const M1: &str = r#"{"message_id":"m-1","amount":5}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_in_the_body_dedupes_a_redelivered_message() {
    let app = start(|l| l).await;
    let first = app.post(None, M1).await;
    assert_eq!(
        (first.status, first.replayed(), first.body.as_str()),
        (201, false, "run 1")
    );
    let redelivered = app.post(None, M1).await;
    assert!(redelivered.replayed(), "{redelivered:?}");
    assert_eq!(redelivered.body, "run 1");
    assert_eq!(app.runs(), 1);
    assert!(app.has("m-1"));
    // The same message id with another payload is a reuse.
    let reused = app.post(None, r#"{"message_id":"m-1","amount":6}"#).await;
    assert_eq!(
        (reused.status, reused.problem_title()),
        (422, Some("Idempotency-Key reused"))
    );
    // A key with a space is encoded as a header key's would be.
    let spaced = app.post(None, r#"{"message_id":"order 7"}"#).await;
    assert_eq!(spaced.status, 201);
    assert!(app.has("order%207"));
    let counts = app.layer.observed();
    assert_eq!(
        (
            counts.started,
            counts.replays,
            counts.mismatches,
            counts.body_keys
        ),
        (2, 1, 1, 4),
        "{counts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_header_wins_over_the_body_and_names_the_same_keys() {
    let app = start(|l| l).await;
    // A header key is used as is; key_from is not even asked.
    let keyed = app.post(Some("h-1"), M1).await;
    assert_eq!((keyed.status, keyed.replayed()), (201, false));
    assert_eq!(app.asked(), 0);
    assert!(app.has("h-1") && !app.has("m-1"));
    // An invalid header is refused, not replaced by the body's key.
    let bad_header = app.post(Some("\"open"), M1).await;
    assert_eq!(
        (bad_header.status, bad_header.problem_title()),
        (400, Some("Idempotency-Key is invalid"))
    );
    assert_eq!(app.asked(), 0);
    // The body's key and a header key of the same text are one key.
    let from_body = app.post(None, M1).await;
    assert_eq!((from_body.status, from_body.body.as_str()), (201, "run 2"));
    assert_eq!(app.asked(), 1);
    let as_header = app.post(Some("m-1"), M1).await;
    assert!(as_header.replayed(), "{as_header:?}");
    assert_eq!(as_header.body, "run 2");
    assert_eq!(app.runs(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_invalid_key_in_the_body_is_400_and_runs_nothing() {
    let app = start(|l| l).await;
    let too_long = format!(r#"{{"message_id":"{}"}}"#, "k".repeat(300));
    for body in [
        r#"{"message_id":""}"#.to_owned(),
        "{\"message_id\":\"caf\u{e9}\"}".to_owned(),
        "{\"message_id\":\"a\u{7f}b\"}".to_owned(),
        too_long,
    ] {
        let reply = app.post(None, &body).await;
        assert_eq!(
            (reply.status, reply.problem_title()),
            (400, Some("Idempotency-Key is invalid")),
            "{body}: {reply:?}"
        );
    }
    assert_eq!(app.runs(), 0);
    assert_eq!(app.layer.observed().bad_key, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_body_without_a_key_is_missing_or_derived_and_the_body_key_comes_first() {
    // Keys required: no header and no body key is the usual 400.
    let app = start(|l| l).await;
    let missing = app.post(None, r#"{"amount":5}"#).await;
    assert_eq!(
        (missing.status, missing.problem_title()),
        (400, Some("Idempotency-Key is missing"))
    );
    // Keys not required: passed through, body whole.
    let app = start(|l| l.key_required(false)).await;
    let unkeyed = app.post(None, r#"{"amount":5}"#).await;
    assert_eq!((unkeyed.status, unkeyed.body.as_str()), (201, "run 1"));
    let unkeyed = app.post(None, r#"{"amount":5}"#).await;
    assert_eq!((unkeyed.status, unkeyed.body.as_str()), (201, "run 2"));
    assert_eq!(app.layer.observed().unkeyed, 2);

    // With derived keys too: a body key is used before a key is derived.
    let app = start(|l| l.derive_missing_keys(Duration::from_secs(60))).await;
    assert_eq!(app.post(None, M1).await.status, 201);
    assert!(app.has("m-1"));
    let derived = app.post(None, r#"{"amount":5}"#).await;
    assert_eq!(derived.status, 201);
    let again = app.post(None, r#"{"amount":5}"#).await;
    assert!(again.replayed(), "{again:?}");
    assert_eq!(app.runs(), 2);
    let counts = app.layer.observed();
    assert_eq!(
        (counts.body_keys, counts.derived_keys),
        (1, 2),
        "{counts:?}"
    );
}
