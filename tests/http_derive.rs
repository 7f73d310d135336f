//! Derived keys (`IdempotencyLayer::derive_missing_keys`) over a real
//! socket, with hyper's HTTP/1.1 client: a request without a key gets one
//! derived from its user, method, path and query, and body, stored for the
//! window; the engine runs on a [`ManualClock`] the tests move past the
//! window. The CLI's `dump` (run as a process) marks derived records.

mod http_client;

use std::ffi::OsStr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderName, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use http_client::{Http, Reply, T0, serve};
use idemkv::http::{DERIVED_KEY_PREFIX, IdempotencyLayer, X_USER_ID};
use idemkv::{Durability, Engine, ManualClock, Options, RecordState};
use tempfile::TempDir;

/// The derivation window of these tests.
const WINDOW: Duration = Duration::from_secs(60);

/// `201` with a new charge id (body and `x-charge-id`).
async fn charge(State(runs): State<Arc<AtomicU64>>, body: String) -> impl IntoResponse {
    let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
    (
        StatusCode::CREATED,
        [(HeaderName::from_static("x-charge-id"), format!("ch_{n}"))],
        format!(r#"{{"id":"ch_{n}","request":"{body}"}}"#),
    )
}

/// A running app on an engine in a temporary directory.
struct App {
    http: Http,
    runs: Arc<AtomicU64>,
    clock: Arc<ManualClock>,
    engine: Arc<Engine>,
    layer: IdempotencyLayer,
    dir: TempDir,
}

/// Serves `POST /charge` and `POST /refund` (both [`charge`]) behind the
/// layer `configure` makes from one with users from `X-User-Id`.
async fn start(configure: impl FnOnce(IdempotencyLayer) -> IdempotencyLayer) -> App {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let options = Options {
        durability: Durability::Sync,
        clock: Arc::clone(&clock) as _,
        ..Options::default()
    };
    let engine = Arc::new(Engine::open(dir.path(), options).unwrap());
    let layer = configure(IdempotencyLayer::new(Arc::clone(&engine)).user_header(X_USER_ID));
    let runs = Arc::new(AtomicU64::new(0));
    let app = Router::new()
        .route("/charge", post(charge))
        .route("/refund", post(charge))
        .with_state(Arc::clone(&runs))
        .layer(layer.clone());
    App {
        http: Http::new(serve(app).await),
        runs,
        clock,
        engine,
        layer,
        dir,
    }
}

impl App {
    /// `POST path` with `body` as `user` (none if empty), without a key.
    async fn post(&self, path: &str, user: &str, body: &str) -> Reply {
        let headers: &[(&str, &str)] = if user.is_empty() {
            &[]
        } else {
            &[("x-user-id", user)]
        };
        self.http.post(path, headers, body).await
    }

    fn runs(&self) -> u64 {
        self.runs.load(Ordering::SeqCst)
    }

    /// Every live record: user, key, state, expiry.
    fn records(&self) -> Vec<(String, String, RecordState, Option<u64>)> {
        let mut records = Vec::new();
        self.engine
            .for_each_record(None, |r| {
                records.push((
                    String::from_utf8(r.user.to_vec()).unwrap(),
                    String::from_utf8(r.key.to_vec()).unwrap(),
                    r.view.state,
                    r.view.expires_at_ms,
                ))
            })
            .unwrap();
        records.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        records
    }
}

/// The charge id of a reply.
fn charge_id(reply: &Reply) -> &str {
    reply.header("x-charge-id").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identical_requests_without_a_key_dedupe_within_the_window_and_run_again_after() {
    let app = start(|l| l.derive_missing_keys(WINDOW)).await;
    let first = app.post("/charge", "alice", "1000").await;
    assert_eq!((first.status, first.replayed()), (201, false), "{first:?}");
    assert_eq!(charge_id(&first), "ch_1");
    let retry = app.post("/charge", "alice", "1000").await;
    assert!(retry.replayed(), "{retry:?}");
    assert_eq!((retry.status, &retry.body), (201, &first.body));
    assert_eq!(app.runs(), 1);

    // One derived record, stored for the window (not the engine's day).
    let records = app.records();
    assert_eq!(records.len(), 1, "{records:?}");
    let (user, key, state, expires) = &records[0];
    assert_eq!((user.as_str(), *state), ("alice", RecordState::Completed));
    let hex = key.strip_prefix(DERIVED_KEY_PREFIX).unwrap();
    assert_eq!(hex.len(), 32, "{key}");
    assert_eq!(*expires, Some(T0 + 60_000));

    // Still inside the window: a replay.
    app.clock.advance(Duration::from_secs(59));
    let late_retry = app.post("/charge", "alice", "1000").await;
    assert!(late_retry.replayed(), "{late_retry:?}");
    assert_eq!(app.runs(), 1);

    // Past it: the same request is a new one, and is then deduplicated
    // for a window of its own.
    app.clock.advance(Duration::from_secs(2));
    let again = app.post("/charge", "alice", "1000").await;
    assert_eq!((again.status, again.replayed()), (201, false), "{again:?}");
    assert_eq!(charge_id(&again), "ch_2");
    let retry = app.post("/charge", "alice", "1000").await;
    assert!(retry.replayed(), "{retry:?}");
    assert_eq!(charge_id(&retry), "ch_2");
    assert_eq!(app.runs(), 2);
    let records = app.records();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].3, Some(T0 + 61_000 + 60_000));
    let counts = app.layer.observed();
    assert_eq!(
        (counts.started, counts.replays, counts.derived_keys),
        (2, 3, 5),
        "{counts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn different_bodies_paths_queries_or_users_get_different_derived_keys() {
    let app = start(|l| l.derive_missing_keys(WINDOW)).await;
    let requests = [
        ("/charge", "alice", "1000"),
        ("/charge", "alice", "1001"),
        ("/charge?currency=EUR", "alice", "1000"),
        ("/refund", "alice", "1000"),
        ("/charge", "bob", "1000"),
    ];
    let mut ids = Vec::new();
    for (path, user, body) in requests {
        let reply = app.post(path, user, body).await;
        assert_eq!(
            (reply.status, reply.replayed()),
            (201, false),
            "{path} {user} {body}"
        );
        ids.push(charge_id(&reply).to_owned());
    }
    assert_eq!(app.runs(), 5);
    // Each is deduplicated against itself only.
    for ((path, user, body), id) in requests.iter().zip(&ids) {
        let reply = app.post(path, user, body).await;
        assert!(reply.replayed(), "{path} {user} {body}: {reply:?}");
        assert_eq!(charge_id(&reply), id);
    }
    assert_eq!(app.runs(), 5);
    let records = app.records();
    assert_eq!(records.len(), 5, "{records:?}");
    assert!(records.iter().all(|r| r.1.starts_with(DERIVED_KEY_PREFIX)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_header_key_wins_and_a_derived_key_needs_a_user() {
    let app = start(|l| l.derive_missing_keys(WINDOW)).await;
    // Keys are required (the default), but a derived key is a key.
    let derived = app.post("/charge", "alice", "1000").await;
    assert_eq!((derived.status, derived.replayed()), (201, false));
    // With a header, the header's key is used: the same body runs again
    // under it, and its record keeps the engine's record TTL.
    let keyed = app
        .http
        .post(
            "/charge",
            &[("x-user-id", "alice"), ("idempotency-key", "k1")],
            "1000",
        )
        .await;
    assert_eq!((keyed.status, keyed.replayed()), (201, false), "{keyed:?}");
    assert_eq!(app.runs(), 2);
    let records = app.records();
    let k1 = records.iter().find(|r| r.1 == "k1").unwrap();
    assert_eq!(k1.3, Some(T0 + 24 * 60 * 60 * 1000));
    // No user: no scope to derive a key in.
    let anonymous = app.post("/charge", "", "1000").await;
    assert_eq!(
        (anonymous.status, anonymous.problem_title()),
        (400, Some("User id is missing"))
    );
    assert_eq!(app.runs(), 2);
    let counts = app.layer.observed();
    assert_eq!(
        (counts.started, counts.bad_user, counts.derived_keys),
        (2, 1, 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn derived_keys_in_observe_mode_count_what_derivation_would_deduplicate() {
    let app = start(|l| l.derive_missing_keys(WINDOW).observe_only(true)).await;
    for _ in 0..3 {
        let reply = app.post("/charge", "alice", "1000").await;
        assert_eq!((reply.status, reply.replayed()), (201, false), "{reply:?}");
    }
    assert_eq!(app.runs(), 3);
    let counts = app.layer.observed();
    assert_eq!(
        (counts.started, counts.replays, counts.derived_keys),
        (1, 2, 3),
        "{counts:?}"
    );
    // The first response was recorded under the derived key.
    let records = app.records();
    assert_eq!(records.len(), 1, "{records:?}");
    assert!(records[0].1.starts_with(DERIVED_KEY_PREFIX));
}

/// Runs the CLI.
fn idemkv<S: AsRef<OsStr>>(args: impl IntoIterator<Item = S>) -> (Option<i32>, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_idemkv"))
        .args(args)
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8(output.stdout).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dump_marks_derived_records_and_a_client_key_cannot_pose_as_one() {
    let app = start(|l| l.derive_missing_keys(WINDOW)).await;
    app.post("/charge", "alice", "1000").await;
    let derived = app.records()[0].1.clone();
    let with_header = |key: &str| {
        let http = app.http.clone();
        let key = key.to_owned();
        async move {
            http.post(
                "/charge",
                &[("x-user-id", "alice"), ("idempotency-key", &key)],
                "2000",
            )
            .await
        }
    };
    assert_eq!(with_header("k1").await.status, 201);
    // A client sending the derived key's text gets a record of its own,
    // stored with its `d` escaped: never taken for a derived one.
    let spoof = with_header(&derived).await;
    assert_eq!((spoof.status, spoof.replayed()), (201, false), "{spoof:?}");
    assert_eq!(app.runs(), 3);
    app.engine.close().unwrap();

    let dir = app.dir.path().to_str().unwrap();
    let (code, out) = idemkv(["dump", dir]);
    assert_eq!(code, Some(0), "{out}");
    println!("{out}");
    let mut lines: Vec<&str> = out.lines().collect();
    lines.sort();
    assert_eq!(lines.len(), 3, "{out}");
    let spoofed = format!("%64{}", &derived[1..]);
    let expect = [
        (spoofed.as_str(), false),
        (derived.as_str(), true),
        ("k1", false),
    ];
    for (line, (key, is_derived)) in lines.iter().zip(expect) {
        let head = format!(r#"{{"user":"alice","key":"{key}","derived":{is_derived},"#);
        assert!(line.starts_with(&head), "{line} does not start with {head}");
    }

    let (code, out) = idemkv(["get", dir, "alice", &derived]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.starts_with(&format!(
            "user:          alice\nkey:           {derived} (derived by the HTTP layer: the request sent no key)\n"
        )),
        "{out}"
    );
    let (_, out) = idemkv(["get", dir, "alice", "k1"]);
    assert!(out.contains("key:           k1\n"), "{out}");
}
