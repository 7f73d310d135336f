//! An HTTP integration: a [`tower::Layer`] that gives any service (an axum
//! `Router`, a tower stack) the semantics of the IETF httpapi
//! *The Idempotency-Key HTTP Header Field* draft, on an [`Engine`].
//!
//! Enabled by the cargo feature `http`.
//!
//! ```no_run
//! use std::sync::Arc;
//! use axum::{Router, routing::post};
//! use idemkv::{Engine, Options, http::IdempotencyLayer};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let engine = Arc::new(Engine::open("/var/lib/my-service/idem", Options::default())?);
//! let app = Router::new()
//!     .route("/charge", post(|| async { (axum::http::StatusCode::CREATED, "charged") }))
//!     .layer(IdempotencyLayer::new(engine).fixed_user("tenant-1"));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app).await?;
//! # Ok(()) }
//! ```
//!
//! # What a request gets
//! A request whose method is not in [`IdempotencyLayer::methods`] (by
//! default every method but `POST` and `PATCH`) goes to the inner service
//! untouched. For the others:
//!
//! | request | answer |
//! |---|---|
//! | no `Idempotency-Key` header | `400` problem (or passed through untouched, with [`IdempotencyLayer::key_required`]`(false)`) |
//! | a malformed key (repeated header, bad quoting, empty, too long, not visible ASCII), or no user id (or one longer than the engine's `max_user_len`) | `400` problem |
//! | a body over [`IdempotencyLayer::max_body_bytes`] | `413` problem |
//! | a new key (or an expired one) | the inner service runs; its response is stored if [`IdempotencyLayer::store_when`] says so (default: 2xx and 4xx), else the key is released so a retry runs again |
//! | the key completed for the same request | the stored status, kept headers and body, with `Idempotent-Replayed: true`; the inner service does not run |
//! | the key in flight (its first request still running) | `409` problem with `Retry-After` (after waiting up to [`IdempotencyLayer::wait_in_flight`] for it to finish) |
//! | the key used before with another request | `422` problem |
//! | the engine fails (closed, disk error) | `503` problem |
//!
//! Problem bodies are small RFC 9457 `application/problem+json` objects
//! with `title`, `status` and `detail`. The layer writes nothing to stdout
//! or stderr.
//!
//! # The request fingerprint
//! Two requests are "the same request" when their fingerprints are equal:
//!
//! ```text
//! Fingerprint::of(METHOD ␠ PATH-AND-QUERY ␤ BODY)
//! ```
//!
//! that is, the method (`POST`), one space, the path with its query string
//! as in the request line (`/charge?currency=EUR`, just `/charge` without a
//! query), one `\n`, then the request body bytes exactly as received. A
//! method or path cannot hold a space or newline, so the encoding is
//! unambiguous. Headers are not part of the fingerprint. Keys are scoped by
//! the user id, so the same key from two users names two records.
//!
//! # How a response is stored
//! [`Outcome::status`] holds the HTTP status; [`Outcome::body`] holds the
//! kept headers and the body, encoded by [`StoredResponse::encode`] (format
//! version 1, all integers big-endian):
//!
//! ```text
//! magic      4 bytes   "IKH1"
//! count      u16       number of header fields that follow
//! count times:
//!   name_len  u16      length of the header name
//!   name      bytes    the header name, lowercase
//!   value_len u32      length of the header value
//!   value     bytes    the header value
//! body       the rest  the response body bytes
//! ```
//!
//! A header that occurs several times is stored once per value, in order.
//! Only the headers in [`IdempotencyLayer::keep_header`] are kept (by
//! default `content-type` and `location`).
//!
//! # Failure handling
//! - The inner service's error (or a body that fails to stream) releases
//!   the key, so a retry runs the work again, and is passed on.
//! - When the response cannot be stored (larger than the engine's
//!   `max_response_len`, a lost lease, a disk error), the key is released
//!   (if it still can be) and the response is returned as is.
//! - A request dropped mid-work (the client hung up) leaves its lease to
//!   expire after the engine's `lease_ttl`: the work may have happened, so
//!   the key stays claimed (retries get `409`) until then.
//! - Every engine call blocks on fsync, so it runs on tokio's blocking pool
//!   ([`tokio::task::spawn_blocking`]); the layer needs a tokio runtime.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, HttpBody};
use bytes::{BufMut, Bytes, BytesMut};
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue, LOCATION, RETRY_AFTER};
use http::request::Parts;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, LengthLimitError, Limited};

use crate::{Begin, Engine, Error, Fingerprint, KeyPart, Lease, Outcome};

/// The request header that carries the key.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// The response header (`Idempotent-Replayed: true`) that marks a replayed
/// response.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// The default header the user id is read from.
pub const X_USER_ID: HeaderName = HeaderName::from_static("x-user-id");

/// The default for [`IdempotencyLayer::max_body_bytes`]: 1 MiB.
pub const DEFAULT_MAX_BODY: usize = 1 << 20;

/// An error type boxed by the bodies the layer reads.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How the user id is taken from a request.
type UserFn = dyn Fn(&Parts) -> Option<String> + Send + Sync;

/// Which response statuses are stored.
type StoreFn = dyn Fn(StatusCode) -> bool + Send + Sync;

/// A [`tower::Layer`] that answers requests carrying an `Idempotency-Key`
/// header from an [`Engine`]: see the [module documentation](self).
///
/// Built with [`IdempotencyLayer::new`] and configured with its builder
/// methods; cloning is cheap (an `Arc`).
#[derive(Clone)]
pub struct IdempotencyLayer {
    config: Arc<Config>,
}

/// The layer's settings, shared by every service it wraps.
#[derive(Clone)]
struct Config {
    engine: Arc<Engine>,
    methods: Vec<Method>,
    user: Arc<UserFn>,
    key_required: bool,
    max_body: usize,
    store: Arc<StoreFn>,
    wait: Duration,
    keep: Vec<HeaderName>,
}

impl IdempotencyLayer {
    /// A layer on `engine` with the defaults: keys required on `POST` and
    /// `PATCH`; the user id from the `X-User-Id` header (every request
    /// without it shares one anonymous scope, the empty user id); bodies up
    /// to [`DEFAULT_MAX_BODY`]; 2xx and 4xx responses stored, others
    /// released; `409` at once for a key in flight; `content-type` and
    /// `location` kept on replays.
    pub fn new(engine: Arc<Engine>) -> IdempotencyLayer {
        IdempotencyLayer {
            config: Arc::new(Config {
                engine,
                methods: vec![Method::POST, Method::PATCH],
                user: Arc::new(|parts: &Parts| user_from_header(parts, &X_USER_ID)),
                key_required: true,
                max_body: DEFAULT_MAX_BODY,
                store: Arc::new(|status: StatusCode| {
                    status.is_success() || status.is_client_error()
                }),
                wait: Duration::ZERO,
                keep: vec![CONTENT_TYPE, LOCATION],
            }),
        }
    }

    /// The methods the layer handles (replacing the default `POST`,
    /// `PATCH`). Requests with other methods pass through untouched, with
    /// or without a key.
    pub fn methods(self, methods: impl IntoIterator<Item = Method>) -> IdempotencyLayer {
        self.with(|c| c.methods = methods.into_iter().collect())
    }

    /// Takes the user id (the scope of the keys) from each request with
    /// `user`. A request for which it returns `None` gets `400`.
    pub fn user_id<F>(self, user: F) -> IdempotencyLayer
    where
        F: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    {
        self.with(|c| c.user = Arc::new(user))
    }

    /// Takes the user id from the header `name`; requests without it share
    /// the empty user id. A value that is not visible ASCII gets `400`.
    pub fn user_header(self, name: HeaderName) -> IdempotencyLayer {
        self.user_id(move |parts| user_from_header(parts, &name))
    }

    /// Scopes every key to the one user id `user` (a service with a single
    /// tenant, or one engine per tenant).
    pub fn fixed_user(self, user: impl Into<String>) -> IdempotencyLayer {
        let user = user.into();
        self.user_id(move |_| Some(user.clone()))
    }

    /// Whether a request with a handled method but no `Idempotency-Key`
    /// gets `400` (`true`, the default) or passes through untouched.
    pub fn key_required(self, required: bool) -> IdempotencyLayer {
        self.with(|c| c.key_required = required)
    }

    /// The largest request body the layer buffers, in bytes; a larger one
    /// gets `413`. Default: [`DEFAULT_MAX_BODY`].
    pub fn max_body_bytes(self, max: usize) -> IdempotencyLayer {
        self.with(|c| c.max_body = max)
    }

    /// Which response statuses are stored and replayed; for the others the
    /// key is released so that a retry runs the work again. Default: 2xx
    /// and 4xx stored.
    pub fn store_when<F>(self, store: F) -> IdempotencyLayer
    where
        F: Fn(StatusCode) -> bool + Send + Sync + 'static,
    {
        self.with(|c| c.store = Arc::new(store))
    }

    /// How long a request whose key is in flight waits for the first
    /// request to finish (then it gets that request's answer, or runs if
    /// the key was released) before it is answered `409`. Default: zero,
    /// `409` at once.
    pub fn wait_in_flight(self, wait: Duration) -> IdempotencyLayer {
        self.with(|c| c.wait = wait)
    }

    /// Also keeps the response header `name` (every value of it) in stored
    /// responses and on replays, besides `content-type` and `location`.
    pub fn keep_header(self, name: HeaderName) -> IdempotencyLayer {
        self.with(|c| {
            if !c.keep.contains(&name) {
                c.keep.push(name);
            }
        })
    }

    /// Applies `change` to the configuration (copied if shared).
    fn with(mut self, change: impl FnOnce(&mut Config)) -> IdempotencyLayer {
        change(Arc::make_mut(&mut self.config));
        self
    }
}

impl fmt::Debug for IdempotencyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("methods", &self.config.methods)
            .field("key_required", &self.config.key_required)
            .field("max_body", &self.config.max_body)
            .field("wait", &self.config.wait)
            .field("keep", &self.config.keep)
            .finish_non_exhaustive()
    }
}

impl<S> tower::Layer<S> for IdempotencyLayer {
    type Service = IdempotencyService<S>;

    fn layer(&self, inner: S) -> IdempotencyService<S> {
        IdempotencyService {
            inner,
            config: Arc::clone(&self.config),
        }
    }
}

/// The [`tower::Service`] made by [`IdempotencyLayer`] around `S`.
///
/// It takes requests with any body and hands the inner service an
/// [`axum::body::Body`]; its responses have an `axum::body::Body`. Its
/// error is the inner service's.
#[derive(Clone)]
pub struct IdempotencyService<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S: fmt::Debug> fmt::Debug for IdempotencyService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyService")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, B, ResBody> tower::Service<Request<B>> for IdempotencyService<S>
where
    S: tower::Service<Request<Body>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    ResBody: HttpBody<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // The clone that was polled ready goes with the request.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(handle(Arc::clone(&self.config), inner, request))
    }
}

/// One request through the layer.
async fn handle<S, B, ResBody>(
    config: Arc<Config>,
    inner: S,
    request: Request<B>,
) -> Result<Response<Body>, S::Error>
where
    S: tower::Service<Request<Body>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    ResBody: HttpBody<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    if !config.methods.contains(request.method()) {
        return pass_through(inner, request.map(Body::new)).await;
    }
    let (parts, body) = request.into_parts();
    let key = match idempotency_key(&parts.headers) {
        KeyHeader::Missing if !config.key_required => {
            return pass_through(inner, Request::from_parts(parts, Body::new(body))).await;
        }
        KeyHeader::Missing => {
            return Ok(problem(
                StatusCode::BAD_REQUEST,
                "Idempotency-Key is missing",
                "This operation requires an Idempotency-Key header.",
            ));
        }
        KeyHeader::Invalid => return Ok(bad_key()),
        KeyHeader::Key(key) => key,
    };
    let Some(user) = (config.user)(&parts) else {
        return Ok(problem(
            StatusCode::BAD_REQUEST,
            "User id is missing",
            "The request does not name the user its Idempotency-Key belongs to.",
        ));
    };
    let body = match Limited::new(body, config.max_body).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return Ok(problem(
                StatusCode::PAYLOAD_TOO_LARGE,
                "Request body is too large",
                "The request body is larger than this service accepts.",
            ));
        }
        Err(_) => {
            return Ok(problem(
                StatusCode::BAD_REQUEST,
                "Request body could not be read",
                "The request body ended before it was complete.",
            ));
        }
    };
    let fingerprint = request_fingerprint(&parts.method, &parts.uri, &body);
    let call = Call {
        engine: Arc::clone(&config.engine),
        user: Bytes::from(user),
        key,
        fingerprint,
    };
    let mut waited = false;
    loop {
        let answer = match call.begin().await {
            Ok(answer) => answer,
            Err(failure) => return Ok(failure.response()),
        };
        let retry_after = match answer {
            Begin::Started(lease) => {
                let request = Request::from_parts(parts, Body::from(body));
                return run(&config, inner, request, lease).await;
            }
            Begin::Replay(outcome) => return Ok(replay(&outcome)),
            Begin::Mismatch => {
                return Ok(problem(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Idempotency-Key reused",
                    "This Idempotency-Key was already used for a different request.",
                ));
            }
            Begin::InFlight { retry_after } => retry_after,
        };
        if waited || config.wait.is_zero() {
            return Ok(conflict(retry_after));
        }
        waited = true;
        if let Err(failure) = call.wait(config.wait).await {
            return Ok(failure.response());
        }
        // Ask again: the first request may have completed (a replay, with
        // the fingerprint checked), been released (this one runs) or still
        // be running (409).
    }
}

/// Hands a request the layer does not handle to the inner service.
async fn pass_through<S, ResBody>(
    mut inner: S,
    request: Request<Body>,
) -> Result<Response<Body>, S::Error>
where
    S: tower::Service<Request<Body>, Response = Response<ResBody>>,
    ResBody: HttpBody<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    Ok(inner.call(request).await?.map(Body::new))
}

/// Runs the inner service for a started key and stores or releases its
/// response.
async fn run<S, ResBody>(
    config: &Config,
    mut inner: S,
    request: Request<Body>,
    lease: Lease,
) -> Result<Response<Body>, S::Error>
where
    S: tower::Service<Request<Body>, Response = Response<ResBody>>,
    ResBody: HttpBody<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let engine = &config.engine;
    let response = match inner.call(request).await {
        Ok(response) => response,
        Err(e) => {
            release(engine, lease).await;
            return Err(e);
        }
    };
    let (parts, body) = response.into_parts();
    // (`.ok()`: the body's error need not be `Send`, and must not live
    // across the await below.)
    let body = match body.collect().await.ok() {
        Some(collected) => collected.to_bytes(),
        None => {
            release(engine, lease).await;
            return Ok(problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Response failed",
                "The response body could not be produced.",
            ));
        }
    };
    if (config.store)(parts.status) {
        let stored = StoredResponse {
            headers: kept_headers(&parts.headers, &config.keep),
            body: body.clone(),
        };
        let outcome = Outcome {
            status: parts.status.as_u16(),
            body: stored.encode(),
        };
        let engine_ = Arc::clone(engine);
        let lease_ = lease.clone();
        if blocking(move || engine_.complete(&lease_, outcome))
            .await
            .is_err()
        {
            // Not stored (too large, lease lost, disk error): free the key
            // if this lease still holds it, and answer with what ran.
            release(engine, lease).await;
        }
    } else {
        release(engine, lease).await;
    }
    Ok(Response::from_parts(parts, Body::from(body)))
}

/// Releases a lease, ignoring failure (a lost lease no longer holds the
/// key; a failing engine lets the lease expire).
async fn release(engine: &Arc<Engine>, lease: Lease) {
    let engine = Arc::clone(engine);
    let _ = blocking(move || engine.release(&lease)).await;
}

/// The engine calls of one request.
struct Call {
    engine: Arc<Engine>,
    user: Bytes,
    key: Bytes,
    fingerprint: Fingerprint,
}

impl Call {
    async fn begin(&self) -> Result<Begin, Failure> {
        let (engine, user, key) = self.parts();
        let fingerprint = self.fingerprint;
        blocking(move || engine.begin(user, key, fingerprint)).await
    }

    async fn wait(&self, timeout: Duration) -> Result<Option<Outcome>, Failure> {
        let (engine, user, key) = self.parts();
        blocking(move || engine.wait(user, key, timeout)).await
    }

    fn parts(&self) -> (Arc<Engine>, Bytes, Bytes) {
        (
            Arc::clone(&self.engine),
            self.user.clone(),
            self.key.clone(),
        )
    }
}

/// Why an engine call gave no answer.
enum Failure {
    /// The engine returned an error.
    Engine(Error),
    /// The blocking task panicked or was cancelled.
    Task,
}

impl Failure {
    /// `400` for a key or user id the engine rejects, else `503`.
    fn response(&self) -> Response<Body> {
        match self {
            Failure::Engine(Error::InvalidKey {
                part: KeyPart::User,
                ..
            }) => problem(
                StatusCode::BAD_REQUEST,
                "User id is invalid",
                "The user id of the request is longer than the idempotency store accepts.",
            ),
            Failure::Engine(Error::InvalidKey { .. }) => bad_key(),
            Failure::Engine(_) | Failure::Task => problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "Idempotency store unavailable",
                "The request was not processed; retry later with the same Idempotency-Key.",
            ),
        }
    }
}

/// Runs a blocking engine call on tokio's blocking pool.
async fn blocking<T, F>(f: F) -> Result<T, Failure>
where
    F: FnOnce() -> crate::Result<T> + Send + 'static,
    T: Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(Failure::Engine(e)),
        Err(_) => Err(Failure::Task),
    }
}

/// The fingerprint of a request: `Fingerprint::of(METHOD ␠ PATH-AND-QUERY
/// ␤ BODY)` (see the module documentation).
pub fn request_fingerprint(method: &Method, uri: &http::Uri, body: &[u8]) -> Fingerprint {
    let target = uri.path_and_query().map_or(uri.path(), |pq| pq.as_str());
    let mut bytes = Vec::with_capacity(method.as_str().len() + target.len() + 2 + body.len());
    bytes.extend_from_slice(method.as_str().as_bytes());
    bytes.push(b' ');
    bytes.extend_from_slice(target.as_bytes());
    bytes.push(b'\n');
    bytes.extend_from_slice(body);
    Fingerprint::of(&bytes)
}

/// What the `Idempotency-Key` header of a request holds.
enum KeyHeader {
    Missing,
    Invalid,
    Key(Bytes),
}

/// Reads the key: a structured-field string (`"abc"`, with `\"` and `\\`
/// escapes) as the draft specifies, or, leniently, a bare token (`abc`).
/// The header must occur once. The engine checks the key itself.
fn idempotency_key(headers: &HeaderMap) -> KeyHeader {
    let mut values = headers.get_all(&IDEMPOTENCY_KEY).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return if headers.contains_key(&IDEMPOTENCY_KEY) {
            KeyHeader::Invalid
        } else {
            KeyHeader::Missing
        };
    };
    let raw = value.as_bytes().trim_ascii();
    let Some(quoted) = raw.strip_prefix(b"\"") else {
        return KeyHeader::Key(Bytes::copy_from_slice(raw));
    };
    let mut key = Vec::with_capacity(quoted.len());
    let mut bytes = quoted.iter();
    while let Some(&b) = bytes.next() {
        match b {
            b'\\' => match bytes.next() {
                Some(&e @ (b'"' | b'\\')) => key.push(e),
                _ => return KeyHeader::Invalid,
            },
            b'"' => {
                // The closing quote must end the value.
                return if bytes.next().is_none() {
                    KeyHeader::Key(Bytes::from(key))
                } else {
                    KeyHeader::Invalid
                };
            }
            0x20..=0x7e => key.push(b),
            _ => return KeyHeader::Invalid,
        }
    }
    KeyHeader::Invalid
}

/// The user id in header `name`: `""` when absent, `None` when not
/// visible ASCII.
fn user_from_header(parts: &Parts, name: &HeaderName) -> Option<String> {
    match parts.headers.get(name) {
        None => Some(String::new()),
        Some(value) => value.to_str().ok().map(str::to_owned),
    }
}

/// The values of the `keep` headers, in the response's order.
fn kept_headers(headers: &HeaderMap, keep: &[HeaderName]) -> Vec<(HeaderName, HeaderValue)> {
    keep.iter()
        .flat_map(|name| {
            headers
                .get_all(name)
                .iter()
                .map(move |value| (name.clone(), value.clone()))
        })
        .collect()
}

/// A response as the layer stores it: the kept headers and the body (the
/// status is [`Outcome::status`]). See the module documentation for the
/// byte format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredResponse {
    /// The kept header fields, in order; a name may repeat.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The response body.
    pub body: Bytes,
}

/// The first bytes of an encoded [`StoredResponse`]: magic and version 1.
const MAGIC: &[u8; 4] = b"IKH1";

impl StoredResponse {
    /// Encodes the response into the bytes stored as [`Outcome::body`].
    /// Header fields past the 65 535th, and any whose name or value does
    /// not fit its length field, are left out.
    pub fn encode(&self) -> Bytes {
        let fields: Vec<(&[u8], &[u8], u16, u32)> = self
            .headers
            .iter()
            .filter_map(|(name, value)| {
                let (name, value) = (name.as_str().as_bytes(), value.as_bytes());
                let name_len = u16::try_from(name.len()).ok()?;
                let value_len = u32::try_from(value.len()).ok()?;
                Some((name, value, name_len, value_len))
            })
            .take(usize::from(u16::MAX))
            .collect();
        let size = MAGIC.len()
            + 2
            + fields
                .iter()
                .map(|(name, value, _, _)| 6 + name.len() + value.len())
                .sum::<usize>()
            + self.body.len();
        let mut out = BytesMut::with_capacity(size);
        out.put_slice(MAGIC);
        out.put_u16(u16::try_from(fields.len()).unwrap_or(u16::MAX));
        for (name, value, name_len, value_len) in fields {
            out.put_u16(name_len);
            out.put_slice(name);
            out.put_u32(value_len);
            out.put_slice(value);
        }
        out.put_slice(&self.body);
        out.freeze()
    }

    /// Decodes bytes made by [`StoredResponse::encode`]; `None` if they are
    /// not such bytes (wrong magic, truncated, an invalid header). The body
    /// shares `bytes`' memory.
    pub fn decode(bytes: &Bytes) -> Option<StoredResponse> {
        let mut reader = Reader { bytes, at: 0 };
        if reader.take(MAGIC.len())? != MAGIC {
            return None;
        }
        let count = reader.u16()?;
        let mut headers = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let name_len = usize::from(reader.u16()?);
            let name = HeaderName::from_bytes(reader.take(name_len)?).ok()?;
            let value_len = usize::try_from(reader.u32()?).ok()?;
            let value = HeaderValue::from_bytes(reader.take(value_len)?).ok()?;
            headers.push((name, value));
        }
        Some(StoredResponse {
            headers,
            body: bytes.slice(reader.at..),
        })
    }
}

/// A cursor over encoded bytes.
struct Reader<'a> {
    bytes: &'a Bytes,
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let slice = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(slice)
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
}

/// The stored response, with `Idempotent-Replayed: true`.
fn replay(outcome: &Outcome) -> Response<Body> {
    let (Ok(status), Some(stored)) = (
        StatusCode::from_u16(outcome.status),
        StoredResponse::decode(&outcome.body),
    ) else {
        return problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Stored response is unreadable",
            "The response stored for this Idempotency-Key could not be decoded.",
        );
    };
    let mut response = Response::new(Body::from(stored.body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    for (name, value) in stored.headers {
        headers.append(name, value);
    }
    headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    response
}

/// `409` with `Retry-After`.
fn conflict(retry_after: Duration) -> Response<Body> {
    let mut response = problem(
        StatusCode::CONFLICT,
        "Request in progress",
        "A request with this Idempotency-Key is still being processed; retry after Retry-After seconds.",
    );
    response.headers_mut().insert(
        RETRY_AFTER,
        HeaderValue::from(retry_after_secs(retry_after)),
    );
    response
}

/// Whole seconds for `Retry-After`: rounded up, at least 1.
fn retry_after_secs(retry_after: Duration) -> u64 {
    let secs = retry_after
        .as_secs()
        .saturating_add(u64::from(retry_after.subsec_nanos() > 0));
    secs.max(1)
}

/// `400` for a malformed key.
fn bad_key() -> Response<Body> {
    problem(
        StatusCode::BAD_REQUEST,
        "Idempotency-Key is invalid",
        "The Idempotency-Key header must occur once and hold a non-empty string of visible ASCII.",
    )
}

/// An `application/problem+json` response. `title` and `detail` are
/// constants without characters that need JSON escaping.
fn problem(status: StatusCode, title: &'static str, detail: &'static str) -> Response<Body> {
    let body = format!(
        r#"{{"title":"{title}","status":{},"detail":"{detail}"}}"#,
        status.as_u16()
    );
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1000)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(30)), 30);
    }

    #[test]
    fn stored_response_round_trips_with_exact_bytes() {
        let stored = StoredResponse {
            headers: vec![
                (CONTENT_TYPE, HeaderValue::from_static("text/plain")),
                (LOCATION, HeaderValue::from_static("/c/1")),
            ],
            body: Bytes::from_static(b"hi"),
        };
        let bytes = stored.encode();
        let mut expected = b"IKH1\x00\x02".to_vec();
        expected.extend_from_slice(b"\x00\x0ccontent-type\x00\x00\x00\x0atext/plain");
        expected.extend_from_slice(b"\x00\x08location\x00\x00\x00\x04/c/1");
        expected.extend_from_slice(b"hi");
        assert_eq!(&bytes[..], &expected[..]);
        assert_eq!(StoredResponse::decode(&bytes), Some(stored));
        // Every prefix that cuts into the magic or a header field fails
        // to decode (one that ends after them is a shorter body).
        for cut in 0..expected.len() - 2 {
            assert_eq!(
                StoredResponse::decode(&bytes.slice(..cut)),
                None,
                "cut {cut}"
            );
        }
        assert_eq!(
            StoredResponse::decode(&Bytes::from_static(b"XKH1\0\0")),
            None
        );
    }

    #[test]
    fn fingerprint_is_method_target_newline_body() {
        let uri: http::Uri = "/charge?x=1".parse().unwrap();
        assert_eq!(
            request_fingerprint(&Method::POST, &uri, b"{}"),
            Fingerprint::of(b"POST /charge?x=1\n{}")
        );
        let uri: http::Uri = "http://h/charge".parse().unwrap();
        assert_eq!(
            request_fingerprint(&Method::PATCH, &uri, b""),
            Fingerprint::of(b"PATCH /charge\n")
        );
    }

    #[test]
    fn key_header_forms() {
        let parse = |values: &[&'static str]| {
            let mut headers = HeaderMap::new();
            for v in values {
                headers.append(IDEMPOTENCY_KEY, HeaderValue::from_static(v));
            }
            match idempotency_key(&headers) {
                KeyHeader::Missing => "missing".to_owned(),
                KeyHeader::Invalid => "invalid".to_owned(),
                KeyHeader::Key(k) => String::from_utf8(k.to_vec()).unwrap(),
            }
        };
        assert_eq!(parse(&[]), "missing");
        assert_eq!(parse(&["abc"]), "abc");
        assert_eq!(parse(&["\"8e03978e-40d5\""]), "8e03978e-40d5");
        assert_eq!(parse(&[r#""a\"b\\c""#]), r#"a"b\c"#);
        assert_eq!(parse(&["\"abc"]), "invalid");
        assert_eq!(parse(&["\"a\"b"]), "invalid");
        assert_eq!(parse(&[r#""a\x""#]), "invalid");
        assert_eq!(parse(&["a", "b"]), "invalid");
    }
}
