//! The HTTP layer over a real socket: an axum app wrapped in
//! [`IdempotencyLayer`] listens on 127.0.0.1 (port 0), and a minimal
//! HTTP/1.1 client written here (a `std::net::TcpStream` on tokio's
//! blocking pool, as the crate does not enable tokio's `io-util`) talks to
//! it.
//!
//! The engine uses a [`ManualClock`] that never moves, so a `409`'s
//! `Retry-After` is exactly the lease TTL, rounded up (the heartbeat tests
//! use the system clock). Tests that must drop a request at a chosen
//! moment call the service in process instead.

use std::collections::HashMap;
use std::future::Future;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderName, Response, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::IntoResponse;
use axum::routing::post;
use idemkv::http::{IdempotencyLayer, X_USER_ID};
use idemkv::storage::SimDisk;
use idemkv::{Durability, Engine, ManualClock, Options, SystemClock};
use parking_lot::Mutex;
use tempfile::TempDir;
use tokio::net::TcpListener;

mod common;
use common::gate::{Call, Gated, Gates};
use tokio::sync::{Notify, mpsc};
use tower::ServiceExt;

/// 4.5 s: a `409` says `Retry-After: 5`.
const LEASE_TTL: Duration = Duration::from_millis(4500);

const MISSING_KEY: &str = r#"{"title":"Idempotency-Key is missing","status":400,"detail":"This operation requires an Idempotency-Key header."}"#;
const INVALID_KEY: &str = r#"{"title":"Idempotency-Key is invalid","status":400,"detail":"The Idempotency-Key header must occur once and hold a non-empty string (printable ASCII) within the length limit."}"#;
const NO_USER_SOURCE: &str = r#"{"title":"User source is not configured","status":400,"detail":"This service cannot tell whose Idempotency-Key this is, so it does not accept one."}"#;
const MISSING_USER: &str = r#"{"title":"User id is missing","status":400,"detail":"The request does not carry a valid user identity for its Idempotency-Key."}"#;
const REUSED: &str = r#"{"title":"Idempotency-Key reused","status":422,"detail":"This Idempotency-Key was already used for a different request."}"#;
const IN_PROGRESS: &str = r#"{"title":"Request in progress","status":409,"detail":"A request with this Idempotency-Key is still being processed; retry after Retry-After seconds."}"#;
const UNAVAILABLE: &str = r#"{"title":"Idempotency store unavailable","status":503,"detail":"The request was not processed; retry later with the same Idempotency-Key."}"#;
const TOO_LARGE: &str = r#"{"title":"Request body is too large","status":413,"detail":"The request body is larger than this service accepts."}"#;
const INVALID_USER: &str = r#"{"title":"User id is invalid","status":400,"detail":"The user id of the request is longer than the idempotency store accepts."}"#;
const PROBLEM: &str = "application/problem+json";

/// The body replayed for a `201` whose body was too large to store.
const NOT_KEPT_201: &str = r#"{"title":"Response body not kept","status":201,"detail":"The original response body was too large to store; this replay carries its status and headers only."}"#;

/// `http_body::Frame<Bytes>` (the tests reach `http-body` only through
/// `http-body-util`, which does not re-export the type).
type Frame = <<FrameFuture as Future>::Output as OptionResult>::Ok;
type FrameFuture = http_body_util::combinators::Frame<'static, http_body_util::Empty<Bytes>>;
trait OptionResult {
    type Ok;
}
impl<T, E> OptionResult for Option<Result<T, E>> {
    type Ok = T;
}

/// A response body fed by the test: each message is a chunk or an error;
/// closing the sender ends the body.
struct ChannelBody(mpsc::UnboundedReceiver<io::Result<Bytes>>);

impl HttpBody for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame, io::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|item| item.map(|chunk| chunk.map(Frame::data)))
    }
}

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
    /// Runs of `POST /big`, `POST /headers` and `POST /stream`.
    big: AtomicU64,
    headers: AtomicU64,
    streams: AtomicU64,
    /// The body `POST /stream` answers with (taken by its first run).
    stream: Mutex<Option<mpsc::UnboundedReceiver<io::Result<Bytes>>>>,
    /// Runs of `POST /status/{code}`, by code.
    statuses: Mutex<HashMap<u16, u64>>,
}

/// A fixed `Date` that hyper would not write (it dates a response now).
const FIXED_DATE: &str = "Tue, 01 Jan 2030 00:00:00 GMT";

/// `201` with a 2000-byte body and headers that describe it
/// (`content-type`, `content-encoding`, `etag`) or not (`location`,
/// `x-charge-id`).
async fn big(State(h): State<Arc<Handlers>>) -> Response<Body> {
    let n = h.big.fetch_add(1, Ordering::SeqCst) + 1;
    Response::builder()
        .status(StatusCode::CREATED)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_ENCODING, "gzip")
        .header(header::ETAG, "\"v1\"")
        .header(header::LOCATION, format!("/charges/big_{n}"))
        .header("x-charge-id", format!("big_{n}"))
        .body(Body::from("b".repeat(2000)))
        .unwrap()
}

/// `201 hello` with end-to-end headers, `set-cookie` and a fixed `date`.
async fn with_headers(State(h): State<Arc<Handlers>>) -> Response<Body> {
    let n = h.headers.fetch_add(1, Ordering::SeqCst) + 1;
    Response::builder()
        .status(StatusCode::CREATED)
        .header(header::CONTENT_TYPE, "text/plain")
        .header(header::CONTENT_ENCODING, "gzip")
        .header(header::CACHE_CONTROL, "no-store")
        .header(header::VARY, "accept-encoding")
        .header("x-request-id", format!("req-{n}"))
        .header(header::SET_COOKIE, "session=s3cr3t")
        .header(header::DATE, FIXED_DATE)
        .body(Body::from("hello"))
        .unwrap()
}

/// `201` with the test's [`ChannelBody`].
async fn stream(State(h): State<Arc<Handlers>>) -> Response<Body> {
    h.streams.fetch_add(1, Ordering::SeqCst);
    let body = h.stream.lock().take().expect("the test set a stream");
    Response::builder()
        .status(StatusCode::CREATED)
        .header(header::CONTENT_TYPE, "text/plain")
        .header("x-charge-id", "streamed")
        .body(Body::new(ChannelBody(body)))
        .unwrap()
}

/// Answers `code`, with how many times it ran for that code.
async fn status(State(h): State<Arc<Handlers>>, Path(code): Path<u16>) -> Response<Body> {
    let runs = {
        let mut statuses = h.statuses.lock();
        let runs = statuses.entry(code).or_insert(0);
        *runs += 1;
        *runs
    };
    let mut response = Response::new(Body::from(format!("{code} run {runs}")));
    *response.status_mut() = StatusCode::from_u16(code).unwrap();
    if response.status().is_redirection() {
        response.headers_mut().insert(
            header::LOCATION,
            header::HeaderValue::from_static("/elsewhere"),
        );
    }
    response
}

/// `201` with a new charge id, in the body and in the `location`,
/// `x-charge-id` and `x-request-id` headers.
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

/// The engine options of the tests: synced, a 4.5 s lease, a clock that
/// never moves.
fn options() -> Options {
    Options {
        durability: Durability::Sync,
        lease_ttl: LEASE_TTL,
        clock: Arc::new(ManualClock::new(1_700_000_000_000)),
        ..Options::default()
    }
}

/// The test routes on `handlers`.
fn routes(handlers: &Arc<Handlers>) -> Router {
    Router::new()
        .route("/charge", post(charge).get(count))
        .route("/slow", post(slow))
        .route("/flaky", post(flaky))
        .route("/big", post(big))
        .route("/headers", post(with_headers))
        .route("/stream", post(stream))
        .route("/status/{code}", post(status))
        .with_state(Arc::clone(handlers))
}

impl App {
    /// Starts the app with the layer `configure` makes from one that takes
    /// the user id from `X-User-Id` (the tests' client is the trusted
    /// proxy).
    async fn start(configure: impl FnOnce(IdempotencyLayer) -> IdempotencyLayer) -> App {
        App::start_with(options(), |l| configure(l.user_header(X_USER_ID))).await
    }

    /// Starts the app on an engine opened with `options`, with the layer
    /// `configure` makes from [`IdempotencyLayer::new`].
    async fn start_with(
        options: Options,
        configure: impl FnOnce(IdempotencyLayer) -> IdempotencyLayer,
    ) -> App {
        let dir = tempfile::tempdir().unwrap();
        let engine = Arc::new(Engine::open(dir.path(), options).unwrap());
        let handlers = Arc::new(Handlers::default());
        let layer = configure(IdempotencyLayer::new(Arc::clone(&engine)));
        let app = routes(&handlers).layer(layer);
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

    fn slow_runs(&self) -> u64 {
        self.handlers.slow.load(Ordering::SeqCst)
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
    send_raw(addr, request.into_bytes()).await
}

/// Sends the bytes of a request and reads the whole response.
async fn send_raw(addr: SocketAddr, request: Vec<u8>) -> Reply {
    // tokio's io-util feature is off: a blocking std socket on tokio's
    // blocking pool.
    let raw = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        stream.write_all(&request).unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).unwrap();
        raw
    })
    .await
    .unwrap();
    parse(&raw)
}

/// A request whose response is read in two steps: up to a marker, then to
/// the end.
struct Streaming {
    stream: TcpStream,
    raw: Vec<u8>,
}

impl Streaming {
    /// Sends `POST path` as alice with `Idempotency-Key: key` and reads
    /// until the raw response holds `marker`, or 10 s pass (then
    /// `seen_marker` is false).
    async fn start(
        addr: SocketAddr,
        path: &str,
        key: &str,
        marker: &'static str,
    ) -> (Streaming, bool) {
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\nX-User-Id: alice\r\nIdempotency-Key: {key}\r\n\r\n"
        );
        tokio::task::spawn_blocking(move || {
            let mut stream = TcpStream::connect(addr).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            stream.write_all(request.as_bytes()).unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut raw = Vec::new();
            let mut buf = vec![0; 64 << 10];
            let seen = loop {
                if contains(&raw, marker.as_bytes()) {
                    break true;
                }
                if Instant::now() > deadline {
                    break false;
                }
                match stream.read(&mut buf) {
                    Ok(0) => break contains(&raw, marker.as_bytes()),
                    Ok(n) => raw.extend_from_slice(&buf[..n]),
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => break false,
                }
            };
            (Streaming { stream, raw }, seen)
        })
        .await
        .unwrap()
    }

    /// Reads the rest of the response (until the server closes, or fails
    /// the connection) and returns all its raw bytes.
    async fn finish(self) -> Vec<u8> {
        tokio::task::spawn_blocking(move || {
            let Streaming {
                mut stream,
                mut raw,
            } = self;
            stream
                .set_read_timeout(Some(Duration::from_secs(60)))
                .unwrap();
            let mut buf = vec![0; 64 << 10];
            while let Ok(n @ 1..) = stream.read(&mut buf) {
                raw.extend_from_slice(&buf[..n]);
            }
            raw
        })
        .await
        .unwrap()
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
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

    // A malformed key is 400 too: a repeated header, a bare token with a
    // space (only a quoted sf-string may hold one), an unterminated or
    // empty quoted string.
    for headers in [
        &[("Idempotency-Key", "a"), ("Idempotency-Key", "b")][..],
        &[("Idempotency-Key", "a b")],
        &[("Idempotency-Key", "\"abc")],
        &[("Idempotency-Key", "\"\"")],
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
        // Every end-to-end header is kept, the first run's request id too.
        assert_eq!(replay.header("x-request-id"), "req-1");
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
    // The waiting retry saw the key in flight (it looks again at every
    // completion and every 10 ms tick while it waits).
    assert!(app.engine.stats().in_flight >= 1);
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

/// `POST path` as alice with `Idempotency-Key: key` and no body.
async fn post_key(app: &App, path: &str, key: &str) -> Reply {
    app.post(path, Some(key), "").await
}

// Issue 11, item 7: a response too large to store released the key, so a
// retry ran the work (and charged) a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn response_too_large_to_store_is_replayed_as_status_and_headers_without_running_again() {
    let app = App::start_with(
        Options {
            max_response_len: 512,
            ..options()
        },
        |l| l.user_header(X_USER_ID),
    )
    .await;
    let first = post_key(&app, "/big", "b").await;
    assert_eq!(first.status, 201);
    assert_eq!(first.body, "b".repeat(2000), "the first client gets it all");
    assert_eq!(first.header("content-encoding"), "gzip");
    assert!(!first.has("idempotent-body-not-kept"));

    let replay = post_key(&app, "/big", "b").await;
    assert_eq!(replay.status, 201);
    assert_eq!(replay.header("idempotent-replayed"), "true");
    assert_eq!(replay.header("idempotent-body-not-kept"), "true");
    assert_eq!(replay.header("location"), "/charges/big_1");
    assert_eq!(replay.header("x-charge-id"), "big_1");
    // The headers that described the original body are gone with it.
    assert_eq!(replay.header("content-type"), PROBLEM);
    assert!(
        !replay.has("content-encoding") && !replay.has("etag"),
        "{replay:?}"
    );
    assert_eq!(replay.body, NOT_KEPT_201);
    assert_eq!(
        replay.header("content-length"),
        NOT_KEPT_201.len().to_string()
    );
    assert_eq!(app.handlers.big.load(Ordering::SeqCst), 1);
    let stats = app.engine.stats();
    assert_eq!((stats.releases, stats.completions), (0, 1));
}

// Issue 11, item 18: the whole response body was buffered without limit,
// so a response larger than the engine keeps reached the client only once
// it had ended (a never-ending stream never did).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn response_larger_than_the_store_streams_as_produced_and_replays_as_not_kept() {
    let app = App::start(|l| l).await;
    let (chunks, body) = mpsc::unbounded_channel();
    *app.handlers.stream.lock() = Some(body);
    // More than the default 1 MiB the layer buffers, then a pause.
    let first_chunk = format!("{}FIRST", "a".repeat(1 << 20));
    chunks.send(Ok(Bytes::from(first_chunk.clone()))).unwrap();

    let (streaming, seen) = Streaming::start(app.addr, "/stream", "s", "FIRST").await;
    assert!(
        seen,
        "the first chunk reaches the client before the body ends"
    );
    chunks.send(Ok(Bytes::from_static(b"LAST"))).unwrap();
    drop(chunks);
    let first = parse(&streaming.finish().await);
    assert_eq!(first.status, 201);
    assert_eq!(first.body, format!("{first_chunk}LAST"));
    assert!(!first.has("idempotent-body-not-kept"));

    let replay = post_key(&app, "/stream", "s").await;
    assert_eq!(replay.status, 201);
    assert_eq!(replay.header("idempotent-replayed"), "true");
    assert_eq!(replay.header("idempotent-body-not-kept"), "true");
    assert_eq!(replay.header("x-charge-id"), "streamed");
    assert_eq!(replay.body, NOT_KEPT_201);
    assert_eq!(app.handlers.streams.load(Ordering::SeqCst), 1);
    assert_eq!(app.engine.stats().releases, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streamed_body_that_fails_midway_releases_the_key() {
    let app = App::start(|l| l).await;
    let (chunks, body) = mpsc::unbounded_channel();
    *app.handlers.stream.lock() = Some(body);
    chunks
        .send(Ok(Bytes::from(format!("{}FIRST", "a".repeat(1 << 20)))))
        .unwrap();
    let (streaming, seen) = Streaming::start(app.addr, "/stream", "f", "FIRST").await;
    assert!(seen);
    chunks.send(Err(io::Error::other("disk gone"))).unwrap();
    let raw = streaming.finish().await;
    // The client sees a cut response (no last chunk), never a whole one.
    assert!(!raw.ends_with(b"0\r\n\r\n"));

    // The work failed: the key is free, and a retry runs again.
    let (chunks, body) = mpsc::unbounded_channel();
    *app.handlers.stream.lock() = Some(body);
    chunks.send(Ok(Bytes::from_static(b"ok"))).unwrap();
    drop(chunks);
    let retry = post_key(&app, "/stream", "f").await;
    assert_eq!((retry.status, retry.body.as_str()), (201, "ok"));
    assert!(!retry.has("idempotent-replayed"));
    assert_eq!(app.handlers.streams.load(Ordering::SeqCst), 2);
}

// Issue 11, item 15: a request without `X-User-Id` landed in a shared
// empty-user scope, and the header was trusted without being configured.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keyed_request_without_a_user_source_is_400() {
    let app = App::start_with(options(), |l| l).await;
    let reply = app.post("/charge", Some("k"), "1000").await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.header("content-type"), PROBLEM);
    assert_eq!(reply.body, NO_USER_SOURCE);
    assert_eq!(app.charges(), 0);
    // Unkeyed methods still pass through.
    let reply = send(app.addr, "GET", "/charge", &[], "").await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "0"));
}

// Issue 11, item 15: a request without the user header shared the empty
// user's scope.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn user_header_absent_repeated_empty_or_not_ascii_is_400() {
    let app = App::start(|l| l).await;
    let key = ("Idempotency-Key", "k");
    for headers in [
        &[key][..],
        &[key, ("X-User-Id", "alice"), ("X-User-Id", "bob")],
        &[key, ("X-User-Id", "")],
    ] {
        let reply = send(app.addr, "POST", "/charge", headers, "1000").await;
        assert_eq!(reply.status, 400, "{headers:?}");
        assert_eq!(reply.body, MISSING_USER);
    }
    let mut raw = b"POST /charge HTTP/1.1\r\nHost: h\r\nConnection: close\r\nContent-Length: 4\r\nIdempotency-Key: k\r\nX-User-Id: \xff\xfe\r\n\r\n1000".to_vec();
    let reply = send_raw(app.addr, std::mem::take(&mut raw)).await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.body, MISSING_USER);
    assert_eq!(app.charges(), 0);
}

/// The identity an authentication middleware puts in the extensions.
#[derive(Clone)]
struct Authenticated(String);

/// Authenticates `Authorization: Bearer <user>` (a stand-in for real
/// token checking).
async fn authenticate(mut request: Request, next: Next) -> Response<Body> {
    let user = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    if let Some(user) = user {
        request.extensions_mut().insert(Authenticated(user));
    }
    next.run(request).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn user_from_scopes_keys_by_the_authenticated_identity() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(Engine::open(dir.path(), options()).unwrap());
    let handlers = Arc::new(Handlers::default());
    let layer = IdempotencyLayer::new(Arc::clone(&engine))
        .user_from(|parts| parts.extensions.get::<Authenticated>().map(|a| a.0.clone()));
    let app = routes(&handlers)
        .layer(layer)
        .layer(middleware::from_fn(authenticate));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let as_user = |auth: &'static str| async move {
        send(
            addr,
            "POST",
            "/charge",
            &[("Authorization", auth), ("Idempotency-Key", "k")],
            "1000",
        )
        .await
    };
    let alice = as_user("Bearer alice").await;
    assert_eq!(alice.body, r#"{"id":"ch_1","amount":1000}"#);
    let again = as_user("Bearer alice").await;
    assert_eq!(again.body, r#"{"id":"ch_1","amount":1000}"#);
    assert_eq!(again.header("idempotent-replayed"), "true");
    let bob = as_user("Bearer bob").await;
    assert_eq!(bob.body, r#"{"id":"ch_2","amount":1000}"#);
    assert!(!bob.has("idempotent-replayed"));
    // X-User-Id is not a source here: unauthenticated is 400.
    let anonymous = send(
        addr,
        "POST",
        "/charge",
        &[("X-User-Id", "alice"), ("Idempotency-Key", "k")],
        "1000",
    )
    .await;
    assert_eq!(
        (anonymous.status, anonymous.body.as_str()),
        (400, MISSING_USER)
    );
    assert_eq!(handlers.charges.load(Ordering::SeqCst), 2);
}

// Issue 11, item 16: every 4xx was stored, so a 429, 401 or 409 was
// replayed for the record's whole TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retry_later_statuses_are_released_and_final_ones_stored_by_default() {
    let app = App::start(|l| l).await;
    let runs = |code: u16| app.handlers.statuses.lock().get(&code).copied();
    for code in [401, 403, 408, 409, 425, 429, 500, 503] {
        let (path, key) = (format!("/status/{code}"), format!("k{code}"));
        let first = post_key(&app, &path, &key).await;
        assert_eq!(first.status, code);
        let retry = post_key(&app, &path, &key).await;
        assert_eq!(
            (retry.status, retry.body.as_str()),
            (code, format!("{code} run 2").as_str()),
            "{code} is released"
        );
        assert!(!retry.has("idempotent-replayed"));
        assert_eq!(runs(code), Some(2));
    }
    for code in [200, 201, 303, 400, 404, 410, 422] {
        let (path, key) = (format!("/status/{code}"), format!("k{code}"));
        let first = post_key(&app, &path, &key).await;
        assert_eq!(first.status, code);
        let retry = post_key(&app, &path, &key).await;
        assert_eq!(
            (retry.status, retry.body.as_str()),
            (code, format!("{code} run 1").as_str()),
            "{code} is stored"
        );
        assert_eq!(retry.header("idempotent-replayed"), "true");
        assert_eq!(runs(code), Some(1));
    }
}

// Issue 11, item 17: replays kept only `content-type` and `location`, so a
// gzip body was replayed without its `content-encoding`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replay_keeps_end_to_end_headers_but_not_date_set_cookie_or_length() {
    let app = App::start(|l| l).await;
    let first = post_key(&app, "/headers", "h").await;
    assert_eq!(first.header("set-cookie"), "session=s3cr3t");
    assert_eq!(first.header("date"), FIXED_DATE);

    let replay = post_key(&app, "/headers", "h").await;
    assert_eq!((replay.status, replay.body.as_str()), (201, "hello"));
    assert_eq!(replay.header("idempotent-replayed"), "true");
    assert_eq!(replay.header("content-type"), "text/plain");
    assert_eq!(replay.header("content-encoding"), "gzip");
    assert_eq!(replay.header("cache-control"), "no-store");
    assert_eq!(replay.header("vary"), "accept-encoding");
    assert_eq!(replay.header("x-request-id"), "req-1");
    assert!(!replay.has("set-cookie"), "{replay:?}");
    // A replay is a new message: hyper dates it now.
    assert_ne!(replay.header("date"), FIXED_DATE);
    // One length, the right one.
    assert_eq!(replay.header("content-length"), "5");
    assert_eq!(app.handlers.headers.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keep_header_and_drop_header_change_what_is_replayed() {
    let app = App::start(|l| {
        l.keep_header(header::DATE)
            .drop_header(HeaderName::from_static("x-request-id"))
            .drop_header(header::VARY)
            .keep_header(header::VARY)
    })
    .await;
    post_key(&app, "/headers", "h").await;
    let replay = post_key(&app, "/headers", "h").await;
    assert_eq!(replay.header("idempotent-replayed"), "true");
    assert_eq!(replay.header("date"), FIXED_DATE);
    assert!(!replay.has("x-request-id"), "{replay:?}");
    assert_eq!(
        replay.header("vary"),
        "accept-encoding",
        "the later call wins"
    );
    assert!(!replay.has("set-cookie"));
}

/// The system clock, a 900 ms lease, no fsync: for the heartbeat tests.
fn short_lease() -> Options {
    Options {
        durability: Durability::None,
        lease_ttl: Duration::from_millis(900),
        clock: Arc::new(SystemClock),
        ..Options::default()
    }
}

// Issue 11, item 19: with no heartbeat, a handler slower than `lease_ttl`
// lost its key, and a retry ran the work a second time, concurrently.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_handler_keeps_its_key_past_the_lease_ttl() {
    let app = App::start_with(short_lease(), |l| l.user_header(X_USER_ID)).await;
    let addr = app.addr;
    let slow_request = move || async move {
        send(
            addr,
            "POST",
            "/slow",
            &[("X-User-Id", "alice"), ("Idempotency-Key", "hb")],
            "x",
        )
        .await
    };
    let first = tokio::spawn(slow_request());
    app.handlers.entered.notified().await;
    // Well over two lease TTLs.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let retry = tokio::time::timeout(Duration::from_secs(5), slow_request())
        .await
        .expect("the retry is answered at once, not run");
    assert_eq!(retry.status, 409);
    assert_eq!(retry.body, IN_PROGRESS);
    assert_eq!(app.slow_runs(), 1);

    app.handlers.proceed.notify_one();
    let first = first.await.unwrap();
    assert_eq!((first.status, first.body.as_str()), (201, "slow done"));
    let replay = slow_request().await;
    assert_eq!(replay.header("idempotent-replayed"), "true");
    // The heartbeat stopped with the handler: no extend of a completed key.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stats = app.engine.stats();
    assert_eq!((stats.lease_lost, stats.takeovers), (0, 0));
    assert_eq!(app.slow_runs(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn heartbeat_stops_at_heartbeat_limit() {
    let app = App::start_with(short_lease(), |l| {
        l.user_header(X_USER_ID)
            .heartbeat_limit(Duration::from_millis(300))
    })
    .await;
    let addr = app.addr;
    let slow_request = move || async move {
        send(
            addr,
            "POST",
            "/slow",
            &[("X-User-Id", "alice"), ("Idempotency-Key", "hl")],
            "x",
        )
        .await
    };
    let first = tokio::spawn(slow_request());
    app.handlers.entered.notified().await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // The lease ended at most a lease TTL after the limit: a retry runs.
    let second = tokio::spawn(slow_request());
    app.handlers.entered.notified().await;
    assert_eq!(app.slow_runs(), 2);
    app.handlers.proceed.notify_one();
    app.handlers.proceed.notify_one();
    assert_eq!(first.await.unwrap().status, 201);
    assert_eq!(second.await.unwrap().status, 201);
    assert_eq!(app.engine.stats().takeovers, 1);
}

/// Waits up to 5 s for `done`.
async fn eventually(mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    true
}

// Issue 11, item 20: a request dropped after its `begin` claimed the key
// but before its handler ran left the key answering 409 for `lease_ttl`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn request_dropped_before_its_handler_runs_releases_the_key() {
    let gates = Arc::new(Gates::default());
    let disk = Gated::new(Arc::new(SimDisk::new()), &gates);
    let options = Options {
        background: false,
        ..options()
    };
    let engine = Arc::new(Engine::open_with_storage(disk, options).unwrap());
    let handlers = Arc::new(Handlers::default());
    let service =
        routes(&handlers).layer(IdempotencyLayer::new(Arc::clone(&engine)).fixed_user("alice"));
    let request = || {
        axum::http::Request::post("/charge")
            .header("idempotency-key", "k")
            .body(Body::from("1000"))
            .unwrap()
    };

    // The first lease of an engine also reserves fencing tokens (a sync of
    // its own): take it now, so that the gated sync below is the begin's.
    match engine
        .begin("warm-up", "k", idemkv::Fingerprint::of(b""))
        .unwrap()
    {
        idemkv::Begin::Started(lease) => engine.release(&lease).unwrap(),
        other => panic!("warm-up: {other:?}"),
    }

    // The request's begin waits for its fsync; the request is dropped then.
    gates.close(Call::Sync);
    let dropped = tokio::spawn(service.clone().oneshot(request()));
    let waiting = Arc::clone(&gates);
    let blocked = tokio::task::spawn_blocking(move || {
        waiting.wait_entered(Call::Sync, 1, Duration::from_secs(5))
    });
    assert!(blocked.await.unwrap(), "begin never reached its fsync");
    dropped.abort();
    assert!(dropped.await.unwrap_err().is_cancelled());
    gates.open(Call::Sync);

    // Its begin returns Started to nobody: the key is released anyway.
    assert!(
        eventually(|| engine.get("alice", "k").unwrap().is_none()).await,
        "the abandoned lease still holds the key: {:?}",
        engine.get("alice", "k")
    );
    let response = service.oneshot(request()).await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(handlers.charges.load(Ordering::SeqCst), 1);
    assert_eq!(engine.stats().releases, 1 + 1);
}

// Issue 11, item 21: a quoted key holding a space (`"order 7"`) got 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quoted_key_with_spaces_or_escapes_is_a_key() {
    let app = App::start(|l| l).await;
    let first = app.post("/charge", Some("\"order 7\""), "1000").await;
    assert_eq!(first.status, 201, "{first:?}");
    assert_eq!(first.body, r#"{"id":"ch_1","amount":1000}"#);
    let replay = app.post("/charge", Some("\"order 7\""), "1000").await;
    assert_eq!(replay.body, r#"{"id":"ch_1","amount":1000}"#);
    assert_eq!(replay.header("idempotent-replayed"), "true");
    // What the engine stores for it is not a key a client can also name.
    for other in ["order%207", "order%20", "\"order  7\""] {
        let reply = app.post("/charge", Some(other), "1000").await;
        assert_eq!(reply.status, 201, "{other}: {reply:?}");
        assert!(!reply.has("idempotent-replayed"), "{other}");
    }
    assert_eq!(app.charges(), 4);

    // A 255-character key (the engine's max_key_len) with escapes is a
    // longer header value, and still a key; 256 characters is not.
    let key = format!("{}\"\\", "k".repeat(253));
    let quoted = format!("\"{}\"", key.replace('\\', "\\\\").replace('"', "\\\""));
    assert_eq!(quoted.len(), 259);
    let reply = app.post("/charge", Some(&quoted), "1000").await;
    assert_eq!(reply.status, 201, "{reply:?}");
    let replay = app.post("/charge", Some(&quoted), "1000").await;
    assert_eq!(replay.header("idempotent-replayed"), "true");
    let too_long = format!("\"{}\"", "k".repeat(256));
    let reply = app.post("/charge", Some(&too_long), "1000").await;
    assert_eq!((reply.status, reply.body.as_str()), (400, INVALID_KEY));
    assert_eq!(app.charges(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_request_body_holds_no_key() {
    let app = App::start(|l| l).await;
    // A client that sends 2 of its 10 body bytes, then stalls.
    let mut stalled = TcpStream::connect(app.addr).unwrap();
    stalled
        .write_all(b"POST /charge HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\nX-User-Id: alice\r\nIdempotency-Key: k\r\n\r\n10")
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The key is not claimed until the body is in: the same key runs.
    let reply = app.post("/charge", Some("k"), "1000").await;
    assert_eq!(reply.status, 201);
    assert_eq!(app.engine.stats().in_flight, 0);
    drop(stalled);
}

/// Issue 12: the layer runs on `AsyncEngine`. 1 000 retries waiting on one
/// in-flight key, on a runtime with 2 workers and 2 blocking threads, hold
/// no thread: an unrelated request runs to its end while the key's first
/// request is still running (before, each wait held a blocking-pool thread
/// and the unrelated request's engine calls queued behind them).
#[test]
fn a_thousand_waiting_retries_do_not_delay_an_unrelated_request() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let engine =
            Arc::new(Engine::open_with_storage(Arc::new(SimDisk::new()), options()).unwrap());
        let handlers = Arc::new(Handlers::default());
        let service = routes(&handlers).layer(
            IdempotencyLayer::new(Arc::clone(&engine))
                .fixed_user("alice")
                .wait_in_flight(Duration::from_secs(60)),
        );
        let request = |path: &str, key: &str| {
            axum::http::Request::post(path)
                .header("idempotency-key", key)
                .body(Body::from("1"))
                .unwrap()
        };
        let first = tokio::spawn(service.clone().oneshot(request("/slow", "hot")));
        handlers.entered.notified().await;
        let retries: Vec<_> = (0..1_000)
            .map(|_| tokio::spawn(service.clone().oneshot(request("/slow", "hot"))))
            .collect();
        // Every retry has seen the key in flight and is waiting.
        while engine.stats().in_flight < 1_000 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let unrelated = tokio::time::timeout(
            Duration::from_secs(20),
            service.clone().oneshot(request("/charge", "cold")),
        )
        .await
        .expect("the unrelated request was held up by the waiting retries")
        .unwrap();
        assert_eq!(unrelated.status(), StatusCode::CREATED);
        assert_eq!(handlers.slow.load(Ordering::SeqCst), 1);
        handlers.proceed.notify_one();
        assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::CREATED);
        for r in retries {
            let r = r.await.unwrap().unwrap();
            assert_eq!(r.status(), StatusCode::CREATED);
            assert_eq!(r.headers()["idempotent-replayed"], "true");
        }
        assert_eq!(handlers.slow.load(Ordering::SeqCst), 1);
    });
}
