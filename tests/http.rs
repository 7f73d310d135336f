//! The HTTP layer over a real socket: an axum app wrapped in
//! [`IdempotencyLayer`] listens on 127.0.0.1 (port 0), and a minimal
//! HTTP/1.1 client written here (a `std::net::TcpStream` on tokio's
//! blocking pool, as the crate does not enable tokio's `io-util`) talks to
//! it.
//!
//! The engine uses a [`ManualClock`] that never moves, so a `409`'s
//! `Retry-After` is exactly the lease TTL, rounded up.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderName, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::post;
use idemkv::http::IdempotencyLayer;
use idemkv::{Durability, Engine, ManualClock, Options};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// 4.5 s: a `409` says `Retry-After: 5`.
const LEASE_TTL: Duration = Duration::from_millis(4500);

const MISSING_KEY: &str = r#"{"title":"Idempotency-Key is missing","status":400,"detail":"This operation requires an Idempotency-Key header."}"#;
const INVALID_KEY: &str = r#"{"title":"Idempotency-Key is invalid","status":400,"detail":"The Idempotency-Key header must occur once and hold a non-empty string of visible ASCII."}"#;
const REUSED: &str = r#"{"title":"Idempotency-Key reused","status":422,"detail":"This Idempotency-Key was already used for a different request."}"#;
const IN_PROGRESS: &str = r#"{"title":"Request in progress","status":409,"detail":"A request with this Idempotency-Key is still being processed; retry after Retry-After seconds."}"#;
const UNAVAILABLE: &str = r#"{"title":"Idempotency store unavailable","status":503,"detail":"The request was not processed; retry later with the same Idempotency-Key."}"#;
const TOO_LARGE: &str = r#"{"title":"Request body is too large","status":413,"detail":"The request body is larger than this service accepts."}"#;
const INVALID_USER: &str = r#"{"title":"User id is invalid","status":400,"detail":"The user id of the request is longer than the idempotency store accepts."}"#;
const PROBLEM: &str = "application/problem+json";

/// What the handlers count and wait on.
#[derive(Default)]
struct Handlers {
    /// Runs of `POST /charge`.
    charges: AtomicU64,
    /// Runs of `POST /slow`.
    slow: AtomicU64,
    /// Runs of `POST /flaky`.
    flaky: AtomicU64,
    /// Notified when `POST /slow` has started.
    entered: Notify,
    /// `POST /slow` waits for this before it answers.
    proceed: Notify,
}

/// `201` with a new charge id: `content-type` and `location` (kept by
/// default), `x-charge-id` (kept by the tests' layer) and `x-request-id`
/// (not kept).
async fn charge(State(h): State<Arc<Handlers>>, body: String) -> impl IntoResponse {
    let n = h.charges.fetch_add(1, Ordering::SeqCst) + 1;
    (
        StatusCode::CREATED,
        [
            (header::CONTENT_TYPE, "application/json".to_owned()),
            (header::LOCATION, format!("/charges/ch_{n}")),
            (HeaderName::from_static("x-charge-id"), format!("ch_{n}")),
            (HeaderName::from_static("x-request-id"), format!("req-{n}")),
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

/// `500 boom` on its first run, `201 ok N` after.
async fn flaky(State(h): State<Arc<Handlers>>) -> impl IntoResponse {
    let n = h.flaky.fetch_add(1, Ordering::SeqCst) + 1;
    if n == 1 {
        (StatusCode::INTERNAL_SERVER_ERROR, "boom".to_owned())
    } else {
        (StatusCode::CREATED, format!("ok {n}"))
    }
}

/// `GET /charge`: how many charges ran (GET is not keyed).
async fn count(State(h): State<Arc<Handlers>>) -> String {
    h.charges.load(Ordering::SeqCst).to_string()
}

/// A running app.
struct App {
    addr: SocketAddr,
    handlers: Arc<Handlers>,
    engine: Arc<Engine>,
    _dir: TempDir,
}

impl App {
    /// Starts the app with the layer `configure` makes from the default one
    /// (which also keeps `x-charge-id`).
    async fn start(configure: impl FnOnce(IdempotencyLayer) -> IdempotencyLayer) -> App {
        let dir = tempfile::tempdir().unwrap();
        let options = Options {
            durability: Durability::Sync,
            lease_ttl: LEASE_TTL,
            clock: Arc::new(ManualClock::new(1_700_000_000_000)),
            ..Options::default()
        };
        let engine = Arc::new(Engine::open(dir.path(), options).unwrap());
        let handlers = Arc::new(Handlers::default());
        let layer = configure(
            IdempotencyLayer::new(Arc::clone(&engine))
                .keep_header(HeaderName::from_static("x-charge-id")),
        );
        let app = Router::new()
            .route("/charge", post(charge).get(count))
            .route("/slow", post(slow))
            .route("/flaky", post(flaky))
            .with_state(Arc::clone(&handlers))
            .layer(layer);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        App {
            addr,
            handlers,
            engine,
            _dir: dir,
        }
    }

    /// `POST path` with `body`, as user `alice`, with `Idempotency-Key: key`
    /// unless `key` is `None`.
    async fn post(&self, path: &str, key: Option<&str>, body: &str) -> Reply {
        let mut headers = vec![("X-User-Id", "alice")];
        if let Some(key) = key {
            headers.push(("Idempotency-Key", key));
        }
        send(self.addr, "POST", path, &headers, body).await
    }

    fn charges(&self) -> u64 {
        self.handlers.charges.load(Ordering::SeqCst)
    }
}

/// A parsed HTTP/1.1 response.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    /// The values of header `name` (lowercase), in order.
    fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The single value of header `name`; panics if it is absent or repeated.
    fn header(&self, name: &str) -> &str {
        match self.all(name)[..] {
            [value] => value,
            ref other => panic!("header {name}: {other:?} in {self:?}"),
        }
    }

    fn has(&self, name: &str) -> bool {
        !self.all(name).is_empty()
    }
}

/// Sends one request on a new connection (`Connection: close`) and reads
/// the whole response.
async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    // tokio's io-util feature is off: a blocking std socket on tokio's
    // blocking pool.
    let raw = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).unwrap();
        raw
    })
    .await
    .unwrap();
    parse(&raw)
}

/// Parses a response: status line, headers, and a body framed by
/// `Content-Length` or chunked.
fn parse(raw: &[u8]) -> Reply {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of headers");
    let head = std::str::from_utf8(&raw[..split]).unwrap();
    let rest = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let mut parts = status_line.splitn(3, ' ');
    assert_eq!(parts.next(), Some("HTTP/1.1"), "{status_line}");
    let status = parts.next().unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|line| {
            let (name, value) = line.split_once(':').unwrap();
            (name.trim().to_ascii_lowercase(), value.trim().to_owned())
        })
        .collect();
    let find = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v);
    let body = if let Some(len) = find("content-length") {
        let len: usize = len.parse().unwrap();
        assert_eq!(rest.len(), len, "body length");
        rest.to_vec()
    } else if find("transfer-encoding").is_some_and(|te| te == "chunked") {
        dechunk(rest)
    } else {
        rest.to_vec()
    };
    Reply {
        status,
        headers,
        body: String::from_utf8(body).unwrap(),
    }
}

/// Decodes a chunked body.
fn dechunk(mut rest: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let eol = rest.windows(2).position(|w| w == b"\r\n").unwrap();
        let size_field = std::str::from_utf8(&rest[..eol]).unwrap();
        let size = usize::from_str_radix(size_field.split(';').next().unwrap().trim(), 16).unwrap();
        rest = &rest[eol + 2..];
        if size == 0 {
            return body;
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn missing_key_is_400_and_other_methods_pass_through() {
    let app = App::start(|l| l).await;

    let reply = app.post("/charge", None, "1000").await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.header("content-type"), PROBLEM);
    assert_eq!(reply.body, MISSING_KEY);
    assert_eq!(app.charges(), 0);

    // GET is not a keyed method: it runs without a key.
    let reply = send(app.addr, "GET", "/charge", &[], "").await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "0"));

    // A malformed key is 400 too: a repeated header, a space (the engine
    // takes visible ASCII only), an unterminated quoted string.
    for headers in [
        &[("Idempotency-Key", "a"), ("Idempotency-Key", "b")][..],
        &[("Idempotency-Key", "\"a b\"")],
        &[("Idempotency-Key", "\"abc")],
    ] {
        let reply = send(app.addr, "POST", "/charge", headers, "1000").await;
        assert_eq!(reply.status, 400, "{headers:?}");
        assert_eq!(reply.header("content-type"), PROBLEM);
        assert_eq!(reply.body, INVALID_KEY);
    }
    // A user id longer than the engine's max_user_len (255).
    let long_user = "u".repeat(256);
    let headers = [("X-User-Id", long_user.as_str()), ("Idempotency-Key", "k")];
    let reply = send(app.addr, "POST", "/charge", &headers, "1000").await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.body, INVALID_USER);
    assert_eq!(app.charges(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn missing_key_passes_through_when_not_required() {
    let app = App::start(|l| l.key_required(false)).await;
    let reply = app.post("/charge", None, "1000").await;
    assert_eq!(reply.status, 201);
    assert_eq!(reply.body, r#"{"id":"ch_1","amount":1000}"#);
    assert!(!reply.has("idempotent-replayed"));
    let reply = app.post("/charge", None, "1000").await;
    assert_eq!(reply.body, r#"{"id":"ch_2","amount":1000}"#);
    assert_eq!(app.charges(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn first_request_runs_once_and_retries_replay() {
    let app = App::start(|l| l).await;

    let first = app.post("/charge", Some("\"order-7\""), "1000").await;
    assert_eq!(first.status, 201);
    assert_eq!(first.body, r#"{"id":"ch_1","amount":1000}"#);
    assert_eq!(first.header("content-type"), "application/json");
    assert_eq!(first.header("location"), "/charges/ch_1");
    assert_eq!(first.header("x-charge-id"), "ch_1");
    assert_eq!(first.header("x-request-id"), "req-1");
    assert!(!first.has("idempotent-replayed"));
    assert_eq!(app.charges(), 1);

    // The same request again, twice (once with the key as a bare token,
    // which names the same key): replayed, the handler does not run.
    for key in ["\"order-7\"", "order-7"] {
        let replay = app.post("/charge", Some(key), "1000").await;
        assert_eq!(replay.status, 201);
        assert_eq!(replay.body, r#"{"id":"ch_1","amount":1000}"#);
        assert_eq!(replay.header("content-type"), "application/json");
        assert_eq!(replay.header("location"), "/charges/ch_1");
        assert_eq!(replay.header("x-charge-id"), "ch_1");
        assert_eq!(replay.header("idempotent-replayed"), "true");
        assert_eq!(replay.header("content-length"), "27");
        // Headers the layer does not keep are not replayed.
        assert!(!replay.has("x-request-id"), "{replay:?}");
        assert_eq!(app.charges(), 1);
    }

    // Keys are scoped by user: bob's "order-7" is another record.
    let bob = send(
        app.addr,
        "POST",
        "/charge",
        &[("X-User-Id", "bob"), ("Idempotency-Key", "\"order-7\"")],
        "1000",
    )
    .await;
    assert_eq!(bob.status, 201);
    assert_eq!(bob.body, r#"{"id":"ch_2","amount":1000}"#);
    assert!(!bob.has("idempotent-replayed"));
    assert_eq!(app.charges(), 2);

    let stats = app.engine.stats();
    assert_eq!((stats.started, stats.replays, stats.completions), (2, 2, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn same_key_with_another_request_is_422() {
    let app = App::start(|l| l).await;
    let first = app.post("/charge", Some("k"), "1000").await;
    assert_eq!(first.status, 201);

    // Another body.
    let reply = app.post("/charge", Some("k"), "2000").await;
    assert_eq!(reply.status, 422);
    assert_eq!(reply.header("content-type"), PROBLEM);
    assert_eq!(reply.body, REUSED);
    // Another path (the path is part of the fingerprint).
    let reply = app.post("/charge?currency=EUR", Some("k"), "1000").await;
    assert_eq!(reply.status, 422);
    assert_eq!(reply.body, REUSED);
    assert_eq!(app.charges(), 1);

    // The original request still replays.
    let replay = app.post("/charge", Some("k"), "1000").await;
    assert_eq!(replay.status, 201);
    assert_eq!(replay.body, r#"{"id":"ch_1","amount":1000}"#);
    assert_eq!(replay.header("idempotent-replayed"), "true");
    assert_eq!(app.engine.stats().mismatches, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_in_flight_is_409_with_retry_after() {
    let app = App::start(|l| l).await;
    let addr = app.addr;
    let first = tokio::spawn(async move {
        send(
            addr,
            "POST",
            "/slow",
            &[("X-User-Id", "alice"), ("Idempotency-Key", "s")],
            "x",
        )
        .await
    });
    app.handlers.entered.notified().await;

    let reply = app.post("/slow", Some("s"), "x").await;
    assert_eq!(reply.status, 409);
    assert_eq!(reply.header("retry-after"), "5");
    assert_eq!(reply.header("content-type"), PROBLEM);
    assert_eq!(reply.body, IN_PROGRESS);
    assert_eq!(app.handlers.slow.load(Ordering::SeqCst), 1);

    app.handlers.proceed.notify_one();
    let first = first.await.unwrap();
    assert_eq!((first.status, first.body.as_str()), (201, "slow done"));
    assert!(!first.has("idempotent-replayed"));

    let replay = app.post("/slow", Some("s"), "x").await;
    assert_eq!((replay.status, replay.body.as_str()), (201, "slow done"));
    assert_eq!(replay.header("content-type"), "text/plain; charset=utf-8");
    assert_eq!(replay.header("idempotent-replayed"), "true");
    assert_eq!(app.handlers.slow.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_in_flight_waits_for_the_answer_when_configured() {
    let app = App::start(|l| l.wait_in_flight(Duration::from_secs(30))).await;
    let addr = app.addr;
    let request = move || async move {
        send(
            addr,
            "POST",
            "/slow",
            &[("X-User-Id", "alice"), ("Idempotency-Key", "w")],
            "x",
        )
        .await
    };
    let first = tokio::spawn(request());
    app.handlers.entered.notified().await;
    let second = tokio::spawn(request());
    // Let the first go once the second has seen the key in flight (and so
    // is waiting).
    while app.engine.stats().in_flight == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    app.handlers.proceed.notify_one();

    let first = first.await.unwrap();
    assert_eq!((first.status, first.body.as_str()), (201, "slow done"));
    assert!(!first.has("idempotent-replayed"));
    let second = second.await.unwrap();
    assert_eq!((second.status, second.body.as_str()), (201, "slow done"));
    assert_eq!(second.header("idempotent-replayed"), "true");
    assert_eq!(app.handlers.slow.load(Ordering::SeqCst), 1);
    assert_eq!(app.engine.stats().in_flight, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_error_is_released_so_a_retry_runs_again() {
    let app = App::start(|l| l).await;
    let flaky = || app.handlers.flaky.load(Ordering::SeqCst);

    let reply = app.post("/flaky", Some("f"), "").await;
    assert_eq!((reply.status, reply.body.as_str()), (500, "boom"));
    assert_eq!(flaky(), 1);

    let reply = app.post("/flaky", Some("f"), "").await;
    assert_eq!((reply.status, reply.body.as_str()), (201, "ok 2"));
    assert!(!reply.has("idempotent-replayed"));
    assert_eq!(flaky(), 2);

    let reply = app.post("/flaky", Some("f"), "").await;
    assert_eq!((reply.status, reply.body.as_str()), (201, "ok 2"));
    assert_eq!(reply.header("idempotent-replayed"), "true");
    assert_eq!(flaky(), 2);

    let stats = app.engine.stats();
    assert_eq!((stats.releases, stats.completions), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stored_statuses_are_configurable() {
    // Store everything, 5xx included: the 500 is replayed.
    let app = App::start(|l| l.store_when(|_| true)).await;
    let reply = app.post("/flaky", Some("f"), "").await;
    assert_eq!((reply.status, reply.body.as_str()), (500, "boom"));
    let reply = app.post("/flaky", Some("f"), "").await;
    assert_eq!((reply.status, reply.body.as_str()), (500, "boom"));
    assert_eq!(reply.header("idempotent-replayed"), "true");
    assert_eq!(app.handlers.flaky.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversize_body_is_413() {
    let app = App::start(|l| l.max_body_bytes(4)).await;
    let reply = app.post("/charge", Some("big"), "12345").await;
    assert_eq!(reply.status, 413);
    assert_eq!(reply.header("content-type"), PROBLEM);
    assert_eq!(reply.body, TOO_LARGE);
    let reply = app.post("/charge", Some("big"), "1234").await;
    assert_eq!(reply.status, 201);
    assert_eq!(app.charges(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn engine_failure_is_503() {
    let app = App::start(|l| l).await;
    app.engine.close().unwrap();
    let reply = app.post("/charge", Some("k"), "1000").await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.header("content-type"), PROBLEM);
    assert_eq!(reply.body, UNAVAILABLE);
    assert_eq!(app.charges(), 0);
}
