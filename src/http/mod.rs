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
//! [`Outcome::status`](crate::Outcome::status) holds the HTTP status; [`Outcome::body`](crate::Outcome::body) holds the
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
use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderName, LOCATION};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode};

mod handle;
mod stored;
#[cfg(test)]
mod tests;

pub use handle::request_fingerprint;
use handle::*;
pub use stored::StoredResponse;

use crate::Engine;

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
