//! Observe mode (`IdempotencyLayer::observe_only`) over a real socket, with
//! hyper's HTTP/1.1 client: one recorded run of mixed traffic (retries,
//! reuse with another body, missing and malformed keys, a missing user, an
//! oversize body, concurrent duplicates, a failing handler) goes through an
//! enforcing layer on a fresh store and through an observing layer on
//! another. The observing layer must count exactly what the enforcing one
//! answered, while every request ran its handler and got the handler's
//! response; then an enforcing layer on the observed store must replay
//! what observe mode recorded (the first responses, not the retries').

mod http_client;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderName, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::post;
use http_client::{Http, Reply, T0, serve};
use idemkv::http::{IdempotencyLayer, ObservedCounts, X_USER_ID};
use idemkv::{Durability, Engine, ManualClock, Options};
use tempfile::TempDir;
use tokio::sync::Notify;

/// What the handlers count and wait on.
#[derive(Default)]
struct Handlers {
    /// Runs of `POST /charge`.
    charges: AtomicU64,
    /// Runs of `POST /hold`.
    holds: AtomicU64,
    /// Runs of `POST /flaky`.
    flaky: AtomicU64,
    /// Notified when the first run of `POST /hold` has started.
    entered: Notify,
    /// The first run of `POST /hold` waits for this.
    proceed: Notify,
}

/// `201` with a new charge id (body, `location`, `x-charge-id`) and the
/// request body echoed.
async fn charge(State(h): State<Arc<Handlers>>, body: String) -> impl IntoResponse {
    let n = h.charges.fetch_add(1, Ordering::SeqCst) + 1;
    (
        StatusCode::CREATED,
        [
            (header::LOCATION, format!("/charges/ch_{n}")),
            (HeaderName::from_static("x-charge-id"), format!("ch_{n}")),
        ],
        format!(r#"{{"id":"ch_{n}","request":"{body}"}}"#),
    )
}

/// `201 held N: BODY`; the first run waits until the test lets it go.
async fn hold(State(h): State<Arc<Handlers>>, body: String) -> impl IntoResponse {
    let n = h.holds.fetch_add(1, Ordering::SeqCst) + 1;
    if n == 1 {
        h.entered.notify_one();
        h.proceed.notified().await;
    }
    (StatusCode::CREATED, format!("held {n}: {body}"))
}

/// `500 boom` on its first run, `201 ok N` after.
async fn flaky(State(h): State<Arc<Handlers>>) -> impl IntoResponse {
    let n = h.flaky.fetch_add(1, Ordering::SeqCst) + 1;
    if n == 1 {
        (StatusCode::INTERNAL_SERVER_ERROR, "boom".to_owned())
    } else {
        (StatusCode::CREATED, format!("ok {n}"))
    }
}

/// A store: an engine on a manual clock that never moves.
struct Store {
    engine: Arc<Engine>,
    _dir: TempDir,
}

impl Store {
    fn new() -> Store {
        let dir = tempfile::tempdir().unwrap();
        let options = Options {
            durability: Durability::Sync,
            clock: Arc::new(ManualClock::new(T0)),
            ..Options::default()
        };
        let engine = Arc::new(Engine::open(dir.path(), options).unwrap());
        Store { engine, _dir: dir }
    }
}

/// A running app: the layer (a clone of the one serving), its handlers and
/// a client.
struct App {
    http: Http,
    handlers: Arc<Handlers>,
    layer: IdempotencyLayer,
}

/// The layer of these tests on `engine`: users from `X-User-Id`, request
/// bodies up to 64 bytes, then `configure`.
async fn start(
    engine: &Arc<Engine>,
    configure: impl FnOnce(IdempotencyLayer) -> IdempotencyLayer,
) -> App {
    let layer = configure(
        IdempotencyLayer::new(Arc::clone(engine))
            .user_header(X_USER_ID)
            .max_body_bytes(64),
    );
    let handlers = Arc::new(Handlers::default());
    let app = Router::new()
        .route("/charge", post(charge))
        .route("/hold", post(hold))
        .route("/flaky", post(flaky))
        .with_state(Arc::clone(&handlers))
        .layer(layer.clone());
    App {
        http: Http::new(serve(app).await),
        handlers,
        layer,
    }
}

impl App {
    /// `POST path` as `user` (none if empty) with `key` (none if empty).
    async fn post(&self, path: &str, user: &str, key: &str, body: &str) -> Reply {
        let mut headers = Vec::new();
        if !user.is_empty() {
            headers.push(("x-user-id", user));
        }
        if !key.is_empty() {
            headers.push(("idempotency-key", key));
        }
        self.http.post(path, &headers, body).await
    }

    fn runs(&self) -> (u64, u64, u64) {
        let h = &self.handlers;
        (
            h.charges.load(Ordering::SeqCst),
            h.holds.load(Ordering::SeqCst),
            h.flaky.load(Ordering::SeqCst),
        )
    }
}

/// The recorded traffic, in order: each step's name and reply.
async fn traffic(app: &App) -> Vec<(&'static str, Reply)> {
    let mut replies = Vec::new();
    let mut step = |name: &'static str, reply: Reply| replies.push((name, reply));
    step(
        "alice k1 first",
        app.post("/charge", "alice", "k1", "1000").await,
    );
    step(
        "alice k1 retry",
        app.post("/charge", "alice", "k1", "1000").await,
    );
    step(
        "alice k1 retry again",
        app.post("/charge", "alice", "k1", "1000").await,
    );
    step(
        "alice k1 other body",
        app.post("/charge", "alice", "k1", "5").await,
    );
    step(
        "bob k1 first",
        app.post("/charge", "bob", "k1", "1000").await,
    );
    step(
        "alice no key",
        app.post("/charge", "alice", "", "1000").await,
    );
    step(
        "alice bad key",
        app.post("/charge", "alice", "\"open", "1000").await,
    );
    step("no user k2", app.post("/charge", "", "k2", "1000").await);
    let big = "x".repeat(100);
    step(
        "alice k3 body too large",
        app.post("/charge", "alice", "k3", &big).await,
    );

    // Concurrent duplicates: the first request for k4 is held in its
    // handler while a duplicate and a reuse with another body arrive.
    let first = tokio::spawn({
        let http = app.http.clone();
        async move {
            http.post(
                "/hold",
                &[("x-user-id", "alice"), ("idempotency-key", "k4")],
                "1",
            )
            .await
        }
    });
    app.handlers.entered.notified().await;
    step(
        "alice k4 duplicate in flight",
        app.post("/hold", "alice", "k4", "1").await,
    );
    step(
        "alice k4 other body in flight",
        app.post("/hold", "alice", "k4", "2").await,
    );
    app.handlers.proceed.notify_one();
    step("alice k4 first (held)", first.await.unwrap());
    step(
        "alice k4 retry after",
        app.post("/hold", "alice", "k4", "1").await,
    );

    // A 500 is released: the retry runs; the one after replays.
    step(
        "alice k5 first (500)",
        app.post("/flaky", "alice", "k5", "").await,
    );
    step(
        "alice k5 retry (runs)",
        app.post("/flaky", "alice", "k5", "").await,
    );
    step(
        "alice k5 retry again",
        app.post("/flaky", "alice", "k5", "").await,
    );
    replies
}

/// What an enforcing layer answered, from the reply alone.
fn enforced(reply: &Reply) -> &'static str {
    if reply.replayed() {
        return "replay";
    }
    match (reply.status, reply.problem_title()) {
        (409, Some("Request in progress")) => "in_flight",
        (422, Some("Idempotency-Key reused")) => "mismatch",
        (413, Some("Request body is too large")) => "too_large",
        (400, Some("Idempotency-Key is missing")) => "missing_key",
        (400, Some("Idempotency-Key is invalid")) => "bad_key",
        (400, Some("User id is missing")) => "bad_user",
        (201 | 500, None) => "started",
        other => panic!("unexpected reply {other:?}: {reply:?}"),
    }
}

/// Adds one `answer` to `counts`.
fn tally(counts: &mut ObservedCounts, answer: &str) {
    let field = match answer {
        "started" => &mut counts.started,
        "replay" => &mut counts.replays,
        "in_flight" => &mut counts.in_flight,
        "mismatch" => &mut counts.mismatches,
        "missing_key" => &mut counts.missing_key,
        "bad_key" => &mut counts.bad_key,
        "bad_user" => &mut counts.bad_user,
        "too_large" => &mut counts.too_large,
        other => panic!("no counter for {other}"),
    };
    *field += 1;
}

/// The reply to the step called `name`.
fn reply<'a>(replies: &'a [(&str, Reply)], name: &str) -> &'a Reply {
    &replies.iter().find(|(n, _)| *n == name).unwrap().1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn observe_mode_counts_what_enforcement_answers_and_enforcement_replays_what_it_recorded() {
    // The same traffic, enforced on a fresh store.
    let enforcing_store = Store::new();
    let enforcing = start(&enforcing_store.engine, |l| l).await;
    let enforced_replies = traffic(&enforcing).await;
    let mut from_replies = ObservedCounts::default();
    for (_, reply) in &enforced_replies {
        tally(&mut from_replies, enforced(reply));
    }

    // And observed on another fresh store.
    let observed_store = Store::new();
    let observing = start(&observed_store.engine, |l| l.observe_only(true)).await;
    let observed_replies = traffic(&observing).await;

    println!("{:<32} {:<22} observe mode", "step", "enforcement");
    for ((name, enforced_reply), (_, observed_reply)) in
        enforced_replies.iter().zip(&observed_replies)
    {
        println!(
            "{name:<32} {:<22} {} {}",
            format!("{} {}", enforced_reply.status, enforced(enforced_reply)),
            observed_reply.status,
            observed_reply.body
        );
    }
    let observed = observing.layer.observed();
    println!("counted from the enforcing layer's replies: {from_replies:?}");
    println!(
        "enforcing layer's observed():              {:?}",
        enforcing.layer.observed()
    );
    println!("observing layer's observed():              {observed:?}");

    let mut expected = ObservedCounts::default();
    expected.started = 5;
    expected.replays = 4;
    expected.mismatches = 2;
    expected.in_flight = 1;
    expected.missing_key = 1;
    expected.bad_key = 1;
    expected.bad_user = 1;
    expected.too_large = 1;
    assert_eq!(from_replies, expected);
    assert_eq!(enforcing.layer.observed(), expected);
    assert_eq!(observed, expected);

    // Enforcement ran the handlers only for the started keys.
    assert_eq!(enforcing.runs(), (2, 1, 2));
    // Observe mode ran every request and returned the handler's response,
    // unchanged: a new charge each time, the body echoed whole (the
    // oversize one too), no replay or problem, no added header.
    assert_eq!(observing.runs(), (9, 4, 3));
    let mut charge = 0;
    for (name, reply) in &observed_replies {
        assert!(!reply.replayed(), "{name}: {reply:?}");
        assert!(reply.problem_title().is_none(), "{name}: {reply:?}");
        assert!(reply.header("retry-after").is_none(), "{name}: {reply:?}");
        let expected_status = if *name == "alice k5 first (500)" {
            500
        } else {
            201
        };
        assert_eq!(reply.status, expected_status, "{name}: {reply:?}");
        if reply.body.starts_with(r#"{"id":"ch_"#) {
            charge += 1;
            assert!(
                reply.body.starts_with(&format!(r#"{{"id":"ch_{charge}","#)),
                "{name}: {reply:?}"
            );
        }
    }
    assert_eq!(charge, 9);
    let too_large = reply(&observed_replies, "alice k3 body too large");
    assert!(too_large.body.contains(&"x".repeat(100)), "{too_large:?}");
    assert_eq!(
        reply(&observed_replies, "alice k4 duplicate in flight").body,
        "held 2: 1"
    );

    // Enforcement on the observed store replays what observe mode stored:
    // each key's first response, never a retry's.
    let later = start(&observed_store.engine, |l| l).await;
    let first = reply(&observed_replies, "alice k1 first");
    let replayed = later.post("/charge", "alice", "k1", "1000").await;
    assert!(replayed.replayed(), "{replayed:?}");
    assert_eq!(
        (
            replayed.status,
            &replayed.body,
            replayed.header("x-charge-id")
        ),
        (201, &first.body, Some("ch_1"))
    );
    let bob = later.post("/charge", "bob", "k1", "1000").await;
    assert!(bob.replayed(), "{bob:?}");
    assert_eq!(bob.body, reply(&observed_replies, "bob k1 first").body);
    let reused = later.post("/charge", "alice", "k1", "5").await;
    assert_eq!(reused.status, 422, "{reused:?}");
    let held = later.post("/hold", "alice", "k4", "1").await;
    assert!(held.replayed(), "{held:?}");
    assert_eq!(held.body, "held 1: 1");
    let flaky = later.post("/flaky", "alice", "k5", "").await;
    assert!(flaky.replayed(), "{flaky:?}");
    assert_eq!(flaky.body, "ok 2");
    // Keys observe mode could not record run now.
    let unkeyed = later.post("/charge", "alice", "", "1000").await;
    assert_eq!(unkeyed.status, 400, "{unkeyed:?}");
    assert_eq!(later.runs(), (0, 0, 0));
    let mut later_counts = ObservedCounts::default();
    later_counts.replays = 4;
    later_counts.mismatches = 1;
    later_counts.missing_key = 1;
    assert_eq!(later.layer.observed(), later_counts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn observe_mode_runs_a_duplicate_in_flight_at_once_even_with_wait_in_flight() {
    let store = Store::new();
    let app = start(&store.engine, |l| {
        l.observe_only(true).wait_in_flight(Duration::from_secs(30))
    })
    .await;
    let first = tokio::spawn({
        let http = app.http.clone();
        async move {
            http.post(
                "/hold",
                &[("x-user-id", "alice"), ("idempotency-key", "k")],
                "1",
            )
            .await
        }
    });
    app.handlers.entered.notified().await;
    let start = Instant::now();
    let duplicate = app.post("/hold", "alice", "k", "1").await;
    assert!(start.elapsed() < Duration::from_secs(10), "it waited");
    assert_eq!(
        (duplicate.status, duplicate.body.as_str()),
        (201, "held 2: 1")
    );
    app.handlers.proceed.notify_one();
    assert_eq!(first.await.unwrap().body, "held 1: 1");
    let counts = app.layer.observed();
    assert_eq!((counts.started, counts.in_flight), (1, 1), "{counts:?}");
}
