//! Partial request fingerprints (issue 13, feature 5), over a real socket
//! with hyper's client: `fingerprint_with(json_fields(..))` makes a retry
//! whose JSON body differs only in fields left out (a timestamp, a trace
//! id, the order of members, whitespace) a replay, and one that differs in
//! a chosen field (nested ones too, absent versus `null` too) a `422`; a
//! body that is not a JSON object gets a `400` problem and claims no key;
//! two endpoints taking the same fields never share a record. The default
//! fingerprint (the whole body) and a plain closure are checked beside it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use idemkv::http::{IdempotencyLayer, X_USER_ID, json_fields, request_fingerprint};
use idemkv::{Durability, Engine, ManualClock, Options};
use tempfile::TempDir;
use tokio::net::TcpListener;

mod client;
use client::{Reply, post as send};

const REUSED: &str = r#"{"title":"Idempotency-Key reused","status":422,"detail":"This Idempotency-Key was already used for a different request."}"#;
const NOT_JSON: &str = r#"{"title":"Request body is not JSON","status":400,"detail":"This operation identifies a request by fields of its JSON body, and the body is not valid JSON."}"#;
const NOT_OBJECT: &str = r#"{"title":"Request body is not a JSON object","status":400,"detail":"This operation identifies a request by fields of its JSON body, and the body is not a JSON object."}"#;

/// The fields that make two payment requests the same request.
const FIELDS: [&str; 3] = ["amount", "currency", "customer.id"];

/// `201` with the run number; every endpoint counts in one counter.
async fn pay(State(runs): State<Arc<AtomicU64>>, body: String) -> impl IntoResponse {
    let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
    (StatusCode::CREATED, format!("run {n}: {}", body.len()))
}

struct App {
    addr: SocketAddr,
    runs: Arc<AtomicU64>,
    _engine: Arc<Engine>,
    _dir: TempDir,
}

impl App {
    async fn start(configure: impl FnOnce(IdempotencyLayer) -> IdempotencyLayer) -> App {
        let dir = tempfile::tempdir().unwrap();
        let options = Options {
            durability: Durability::Sync,
            clock: Arc::new(ManualClock::new(1_700_000_000_000)),
            ..Options::default()
        };
        let engine = Arc::new(Engine::open(dir.path(), options).unwrap());
        let runs = Arc::new(AtomicU64::new(0));
        let layer = configure(IdempotencyLayer::new(Arc::clone(&engine)).user_header(X_USER_ID));
        let app = Router::new()
            .route("/charge", post(pay))
            .route("/refund", post(pay))
            .with_state(Arc::clone(&runs))
            .layer(layer);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        App {
            addr,
            runs,
            _engine: engine,
            _dir: dir,
        }
    }

    async fn json_fields() -> App {
        App::start(|layer| layer.fingerprint_with(json_fields(&FIELDS))).await
    }

    async fn post(&self, path: &str, key: &str, body: &str) -> Reply {
        let headers = [
            ("x-user-id", "alice"),
            ("idempotency-key", key),
            ("content-type", "application/json"),
        ];
        send(self.addr, path, &headers, body).await
    }

    fn runs(&self) -> u64 {
        self.runs.load(Ordering::SeqCst)
    }
}

const CHARGE: &str = r#"{"amount":1000,"currency":"EUR","customer":{"id":"cus_1","name":"Ada"},"timestamp":"2030-01-01T00:00:00Z","trace_id":"t-1"}"#;

/// The same charge, retried: a new timestamp and trace id, another name,
/// members in another order, other whitespace, an escaped string.
const CHARGE_RETRIED: &str = "{ \"trace_id\": \"t-2\",\n  \"customer\": {\"name\": \"Ada L.\", \"id\": \"cus\\u005f1\"},\n  \"currency\": \"EUR\", \"timestamp\": \"2030-01-01T00:00:07Z\", \"amount\": 1000 }";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_fields_with_another_timestamp_and_trace_id_are_replayed() {
    let app = App::json_fields().await;
    let first = app.post("/charge", "k", CHARGE).await;
    assert_eq!(first.status, 201);
    let retry = app.post("/charge", "k", CHARGE_RETRIED).await;
    assert_eq!(retry.status, 201, "{retry:?}");
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(retry.body, first.body);
    assert_eq!(app.runs(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_amount_or_customer_id_is_a_422_mismatch() {
    let app = App::json_fields().await;
    assert_eq!(app.post("/charge", "k", CHARGE).await.status, 201);
    let amount = CHARGE.replace("1000", "1001");
    let reused = app.post("/charge", "k", &amount).await;
    assert_eq!((reused.status, reused.body.as_str()), (422, REUSED));
    // A nested path counts too.
    let customer = CHARGE.replace("cus_1", "cus_2");
    let reused = app.post("/charge", "k", &customer).await;
    assert_eq!((reused.status, reused.body.as_str()), (422, REUSED));
    // A change in a number's type counts: 1000 is not 1000.0.
    let float = CHARGE.replace("1000", "1000.0");
    assert_eq!(app.post("/charge", "k", &float).await.status, 422);
    assert_eq!(app.runs(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_is_not_a_json_object_is_a_400_problem_and_claims_no_key() {
    let app = App::json_fields().await;
    for (body, problem) in [
        ("amount=1000&currency=EUR", NOT_JSON),
        ("", NOT_JSON),
        (r#"{"amount":1000"#, NOT_JSON),
        ("[1000]", NOT_OBJECT),
        ("\"EUR\"", NOT_OBJECT),
    ] {
        let refused = app.post("/charge", "k", body).await;
        assert_eq!(refused.status, 400, "{body:?}: {refused:?}");
        assert_eq!(refused.body, problem, "{body:?}");
        assert_eq!(
            refused.header("content-type"),
            Some("application/problem+json")
        );
    }
    assert_eq!(app.runs(), 0);
    // The key was never claimed: a JSON retry runs.
    assert_eq!(app.post("/charge", "k", CHARGE).await.status, 201);
    assert_eq!(app.runs(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_field_and_a_null_field_are_different_requests() {
    let app = App::json_fields().await;
    let missing = r#"{"amount":5,"customer":{"id":"c"},"note":"first"}"#;
    assert_eq!(app.post("/charge", "k", missing).await.status, 201);
    // Missing again, with other fields changed: the same request.
    let missing_again = r#"{"customer":{"id":"c","x":1},"amount":5,"note":"second"}"#;
    let replay = app.post("/charge", "k", missing_again).await;
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    let null = r#"{"amount":5,"currency":null,"customer":{"id":"c"}}"#;
    let reused = app.post("/charge", "k", null).await;
    assert_eq!((reused.status, reused.body.as_str()), (422, REUSED));
    // And the other way round, on a key first used with null.
    assert_eq!(app.post("/charge", "n", null).await.status, 201);
    assert_eq!(app.post("/charge", "n", missing).await.status, 422);
    // `customer.id` is absent both when `customer` is and when it is not
    // an object: the path does not reach a value either way.
    let no_customer = r#"{"amount":5,"currency":null}"#;
    let null_customer = r#"{"amount":5,"currency":null,"customer":null}"#;
    assert_eq!(app.post("/charge", "c", no_customer).await.status, 201);
    let replay = app.post("/charge", "c", null_customer).await;
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    let null_id = r#"{"amount":5,"currency":null,"customer":{"id":null}}"#;
    assert_eq!(app.post("/charge", "c", null_id).await.status, 422);
    assert_eq!(app.runs(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_endpoints_with_the_same_fields_do_not_share_a_record() {
    let app = App::json_fields().await;
    assert_eq!(app.post("/charge", "k", CHARGE).await.status, 201);
    let refund = app.post("/refund", "k", CHARGE).await;
    assert_eq!((refund.status, refund.body.as_str()), (422, REUSED));
    assert_eq!(app.runs(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_fingerprint_is_the_whole_body() {
    let app = App::start(|layer| layer).await;
    assert_eq!(app.post("/charge", "k", CHARGE).await.status, 201);
    let retried = app.post("/charge", "k", CHARGE_RETRIED).await;
    assert_eq!((retried.status, retried.body.as_str()), (422, REUSED));
    // Not JSON is fine for the default.
    assert_eq!(app.post("/charge", "f", "amount=1").await.status, 201);
    assert_eq!(app.runs(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fingerprint_with_takes_a_plain_closure_over_parts_and_body() {
    // Only the first line of the body counts.
    let app = App::start(|layer| {
        layer.fingerprint_with(|parts, body| {
            let end = body.iter().position(|&b| b == b'\n').unwrap_or(body.len());
            request_fingerprint(&parts.method, &parts.uri, &body[..end])
        })
    })
    .await;
    assert_eq!(
        app.post("/charge", "k", "pay 10\nat 12:00").await.status,
        201
    );
    let retry = app.post("/charge", "k", "pay 10\nat 12:01").await;
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(
        app.post("/charge", "k", "pay 11\nat 12:00").await.status,
        422
    );
    assert_eq!(app.runs(), 1);
}

/// In observe mode a body `json_fields` refuses is not answered `400`: the
/// handler runs on it, and the refusal is counted as `bad_body`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_mode_runs_a_body_the_fingerprint_refuses_and_counts_it() {
    let slot: Arc<std::sync::Mutex<Option<IdempotencyLayer>>> = Arc::default();
    let kept = Arc::clone(&slot);
    let app = App::start(move |layer| {
        let layer = layer
            .observe_only(true)
            .fingerprint_with(json_fields(&FIELDS));
        *kept.lock().unwrap() = Some(layer.clone());
        layer
    })
    .await;
    let layer = slot.lock().unwrap().clone().unwrap();
    let plain = app.post("/charge", "k", "amount=1000").await;
    assert_eq!(plain.status, 201, "{plain:?}");
    assert_eq!(plain.body, "run 1: 11");
    let json = app.post("/charge", "k", CHARGE).await;
    assert_eq!(json.status, 201);
    assert_eq!(app.runs(), 2);
    let counts = layer.observed();
    assert_eq!((counts.bad_body, counts.started), (1, 1), "{counts:?}");
}
