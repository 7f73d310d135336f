//! An HTTP integration: a [`tower::Layer`] that gives any service (an axum
//! `Router`, a tower stack) the semantics of the IETF httpapi
//! *The Idempotency-Key HTTP Header Field* draft, on an
//! [`Engine`](crate::Engine) or any other [`IdempotencyStore`].
//!
//! Enabled by the cargo feature `http`.
//!
//! ```no_run
//! use std::sync::Arc;
//! use axum::{Router, routing::post};
//! use idemkv::{Engine, Options, http::IdempotencyLayer};
//!
//! /// The caller's identity, put in the request's extensions by the
//! /// service's authentication middleware (which runs before the layer).
//! #[derive(Clone)]
//! struct Authenticated(String);
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let engine = Arc::new(Engine::open("/var/lib/my-service/idem", Options::default())?);
//! let idempotency = IdempotencyLayer::new(engine)
//!     .user_from(|parts| parts.extensions.get::<Authenticated>().map(|a| a.0.clone()));
//! let app = Router::new()
//!     .route("/charge", post(|| async { (axum::http::StatusCode::CREATED, "charged") }))
//!     .layer(idempotency);
//!     // .layer(your_authentication_layer) goes here, outside the idempotency layer.
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app).await?;
//! # Ok(()) }
//! ```
//!
//! # Any store
//! The layer runs on any [`IdempotencyStore`]. [`IdempotencyLayer::new`]
//! takes an engine (`Arc<Engine>`) and calls it through its
//! [`AsyncEngine`]; [`IdempotencyLayer::with_store`] takes any store, such
//! as a `cluster::Node` (which forwards each call to the owner of the
//! user's partition) or a wrapper that counts or fails calls, and every
//! `begin`, `complete`, `release`, `extend` and `get` of every request goes
//! through it. What this page says of the engine holds of the store: its
//! `lease_ttl`, its limits (a key or user id it refuses with
//! `Error::InvalidKey` gets `400`), its failures (`503`). A store that has
//! no heartbeat of its own ([`IdempotencyStore::heartbeat`] answers
//! `None`) has a running request's lease extended by a tokio task per
//! request that calls its `extend` (the runtime needs its time driver);
//! one that cannot release from a `Drop` ([`IdempotencyStore::release_now`]
//! answers `false`) has a claim dropped before its handler ran released by
//! a tokio task.
//!
//! # Whose key it is: the user source
//! Keys are scoped by a user id, so the same key from two users names two
//! records, and a stored response is replayed only inside its scope. The
//! layer takes the user id from the source it is given, and from nowhere
//! else:
//! - [`IdempotencyLayer::user_from`]: a closure over the request's
//!   [`Parts`], typically reading an authenticated identity from its
//!   extensions. The recommended source.
//! - [`IdempotencyLayer::user_header`]: a request header, such as
//!   [`X_USER_ID`]. **Only behind a trusted proxy** that authenticates the
//!   client, sets the header, and strips any copy the client sent: a
//!   header taken from the client lets anyone pick any scope, and so
//!   replay another user's stored responses.
//! - [`IdempotencyLayer::fixed_user`]: one scope for every request (a
//!   single-tenant service).
//!
//! There is no default source and no shared scope: with no source
//! configured every keyed request gets `400` ("User source is not
//! configured"), and a request for which the source yields no user (or the
//! empty user id) gets `400` ("User id is missing"); neither runs the
//! handler.
//!
//! # What a request gets
//! A request whose method is not in [`IdempotencyLayer::methods`] (by
//! default every method but `POST` and `PATCH`) goes to the inner service
//! untouched. For the others:
//!
//! | request | answer |
//! |---|---|
//! | no `Idempotency-Key` header | `400` problem (or passed through untouched, with [`IdempotencyLayer::key_required`]`(false)`) |
//! | a malformed key (repeated header, bad quoting, empty, too long, not printable ASCII) | `400` problem |
//! | no user source configured, or no user for this request (or one longer than the engine's `max_user_len`) | `400` problem |
//! | a body over [`IdempotencyLayer::max_body_bytes`] | `413` problem |
//! | a new key (or an expired one) | the inner service runs; its response is stored if [`IdempotencyLayer::store_when`] says so (default [`stored_by_default`]: 2xx, 3xx, and 4xx but `401`, `403`, `408`, `409`, `425`, `429`), else the key is released so a retry runs again |
//! | the key completed for the same request | the stored status, kept headers and body, with `Idempotent-Replayed: true` (after [`IdempotencyLayer::on_replay`]'s hook, if set, changed its headers); the inner service does not run. If the original body was too large to store: the status, the kept headers, and a small problem body, with `Idempotent-Body-Not-Kept: true` too |
//! | the key in flight (its first request still running) | `409` problem with `Retry-After`, or the status set by [`IdempotencyLayer::in_flight_status`] (`202` with `Location`: see "Long-running jobs") (after waiting up to [`IdempotencyLayer::wait_in_flight`] for the first request's lease to end; if it ended by a release or expiry, this request runs instead) |
//! | the key used before with another request | `422` problem |
//! | the engine fails (closed, disk error) | `503` problem |
//!
//! In observe mode ([`IdempotencyLayer::observe_only`]) every request runs
//! the inner service instead, and with [`IdempotencyLayer::key_from`] or
//! [`IdempotencyLayer::derive_missing_keys`] a request without the header
//! may still have a key: see "Rolling out to a running service" below.
//!
//! Problem bodies are small RFC 9457 `application/problem+json` objects
//! with `title`, `status` and `detail`. The layer writes nothing to stdout
//! or stderr. The checks run in the order of the table, and the request
//! body is read (up to its limit) before the key is claimed, so a slow or
//! endless request body holds no key.
//!
//! # The key
//! The header must occur once and hold an RFC 8941 sf-string, as the draft
//! specifies: `"order 7"`, printable ASCII (0x20-0x7E) between double
//! quotes, with `\"` and `\\` as the only escapes. Leniently, a bare token
//! of visible ASCII (`order-7`) is the same key as its quoted form
//! (`"order-7"`). Parameters (`"k";a=1`) are not accepted.
//!
//! The engine is given the key with each space written `%20` and each `%`
//! written `%25` (every other character is itself): visible ASCII, which
//! the engine's default `Options::ascii_keys` requires, and injective, so
//! two keys never share a record. The engine's `max_key_len` (default 255)
//! applies to that form: escapes in the header do not count, but each
//! space or `%` in the key counts three bytes.
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
//! unambiguous. Headers are not part of the fingerprint.
//!
//! That default, [`request_fingerprint`], treats a retry whose body differs
//! in any byte (a fresh timestamp, a trace id, reordered JSON members) as
//! another request (`422`). [`IdempotencyLayer::fingerprint_with`]`(f)`
//! replaces it with `f(&Parts, &Bytes) -> Fingerprint`; `f` may return a
//! `Result<Fingerprint, FingerprintError>` to refuse a request (`400`
//! problem, no key claimed). With the `json` feature, `json_fields(&["amount",
//! "currency", "customer.id"])` is such an `f`: the method, the path and
//! query, and the named (dotted) fields of a JSON object body, canonical
//! (member order, whitespace and escapes do not count; a missing field is
//! not `null`); a body that is not a JSON object gets `400`.
//!
//! # Long-running jobs
//! A handler that runs for the whole job (a 15-minute transcode) keeps its
//! key by the heartbeat (set [`IdempotencyLayer::heartbeat_limit`], and the
//! engine's `Options::heartbeat_limit`, above the job's length;
//! [`IdempotencyLayer::heartbeat_every`] sets the interval). With
//! [`IdempotencyLayer::in_flight_status`]`(StatusCode::ACCEPTED)`, a retry
//! that finds the key in flight gets `202`, `Retry-After` and a small JSON
//! body instead of `409`, and the job does not run twice. Its `Location`:
//! the layer cannot see the handler's response before the job ends, so the
//! handler hands it over early through the [`InFlightLocation`] the layer
//! puts in the request extensions (`location.set(..)`); the retries this
//! process serves while the handler runs carry it. A process that crashes
//! mid-job takes its heartbeat and its locations with it: the lease
//! expires at most one `lease_ttl` later, and a retry then runs the job
//! again (on any process on the store).
//!
//! # Replay hook
//! [`IdempotencyLayer::on_replay`]`(f)` calls `f` with a [`Replay`] before
//! each replay is sent: the request's parts, the stored status, body and
//! headers, and `waited()` (whether the replay was served after waiting
//! for an in-flight key, [`IdempotencyLayer::wait_in_flight`]). It may
//! change the headers, not the status or body; the layer's markers and the
//! framing headers are restored after it. `run_once` has the same:
//! [`RunOptions::on_replay`](crate::RunOptions::on_replay).
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
//! Trailers are not stored.
//!
//! **Kept headers.** Every end-to-end header of the response is kept,
//! except `date` (a replay is a new message, dated when it is sent) and
//! `set-cookie` (a session is not handed to whoever replays the key);
//! [`IdempotencyLayer::keep_header`] keeps those too, and
//! [`IdempotencyLayer::drop_header`] leaves out any other. Never kept, not
//! even with `keep_header`: the hop-by-hop headers (`connection`,
//! `keep-alive`, `proxy-connection`, `proxy-authenticate`,
//! `proxy-authorization`, `te`, `trailer`, `trailers`,
//! `transfer-encoding`, `upgrade`, and any header named in `Connection`),
//! `content-length` (a replay's body is sent whole, and its length is
//! written for it), and the layer's own `Idempotent-Replayed` and
//! `Idempotent-Body-Not-Kept`.
//!
//! **Size.** The layer buffers a response up to
//! [`IdempotencyLayer::max_response_bytes`] (counted as stored: encoded
//! kept headers plus body; default 1 MiB, the engine's default
//! `max_response_len`) and then stores it; the client gets it once it is
//! stored. A larger response is streamed to the client as the inner
//! service produces it (without its `Content-Length`: it is sent chunked
//! so that its end is seen). A response that is too large, whether found
//! so while buffering or by the engine (`Error::ResponseTooLarge`), is
//! stored **as not kept**: the first client gets the full response; the
//! key is completed, never released, so the work does not run again; and
//! a retry is replayed the original status, the kept headers minus those
//! that described the body (`content-*`, `etag`, `last-modified`),
//! `Content-Type: application/problem+json`, `Idempotent-Body-Not-Kept:
//! true` (beside `Idempotent-Replayed: true`), and this body (with the
//! original status in it):
//!
//! ```text
//! {"title":"Response body not kept","status":201,"detail":"The original response body was too large to store; this replay carries its status and headers only."}
//! ```
//!
//! (If even that does not fit the engine's limit, the marker header alone
//! is stored, then nothing but the status; both replay with the marker.)
//! A streamed response is stored when its body ends, before the client
//! sees the end.
//!
//! # Leases and heartbeat
//! `begin` gives the request a lease of the engine's `lease_ttl`. From the
//! moment the inner service is called, the lease is extended every third
//! of `lease_ttl` (or every [`IdempotencyLayer::heartbeat_every`]; by
//! `lease_ttl`), while the handler runs and while a
//! streamed body is sent, so a slow handler keeps its key and a retry gets
//! `409` instead of running the work a second time. On an engine the
//! extends are made by its heartbeat thread ([`Engine::heartbeat`](crate::Engine::heartbeat)),
//! which serves every request's lease: no task or timer per request (on
//! another store, by its own heartbeat or a tokio task: "Any store"). The
//! heartbeat stops when the response is stored or released (before the
//! store or release is written), when the request is dropped, when an
//! extend fails, or once [`IdempotencyLayer::heartbeat_limit`] (default 5
//! minutes, and never more than the engine's `Options::heartbeat_limit`)
//! has passed; the lease then ends at most one `lease_ttl` later.
//!
//! # Failure handling
//! - The inner service's error, or a response body that fails before the
//!   layer has sent any of it, releases the key (the work failed; a retry
//!   runs it again); the error is passed on, or answered `500`.
//! - A streamed body that fails midway releases the key too, though part
//!   of the body was sent: the client sees the response cut off (the
//!   connection is closed without the final chunk, or the HTTP/2 stream
//!   reset), never a complete one, so it retries, and the retry runs the
//!   work again, as for any failed work.
//! - A response that is not stored for another reason (a lost lease, a
//!   disk error, a closed engine) is returned as is, and its key is left
//!   to its lease: the work ran, so the layer does not release the key;
//!   once the lease expires, a retry runs again.
//! - A request dropped after `begin` claimed its key but before the inner
//!   service was called (even while `begin` itself was still running)
//!   releases the key: no work began.
//! - A request dropped once the inner service was called, while it runs
//!   or while its response body is produced (the client hung up mid-work,
//!   or mid-stream), leaves its lease to expire after `lease_ttl` (the
//!   heartbeat stops): the work may have happened, so the key stays
//!   claimed (retries get `409`) until then. Once the layer has the whole
//!   answer, its store (or release) runs on a task of its own and
//!   finishes even if the request is dropped meanwhile.
//! - Store calls are the store's futures (an engine's go through
//!   [`AsyncEngine`]): a durable call awaits its fsync without holding a
//!   thread (no `spawn_blocking`), and a request waiting for an in-flight
//!   key (`wait_in_flight`) holds no thread either. The layer needs a tokio
//!   runtime for its store-or-release task (on an engine the heartbeat
//!   runs on the engine's thread).
//!
//! # Defaults
//! [`IdempotencyLayer::new`]: methods `POST` and `PATCH`; key required; no
//! user source (every keyed request `400`); request bodies up to
//! [`DEFAULT_MAX_BODY`]; [`stored_by_default`]; no wait for keys in
//! flight; every end-to-end header but `date` and `set-cookie` kept;
//! responses up to [`DEFAULT_MAX_RESPONSE`] buffered; heartbeat up to
//! [`DEFAULT_HEARTBEAT_LIMIT`], extended every third of `lease_ttl`; `409`
//! for a key in flight; [`request_fingerprint`]; no replay hook; enforcing
//! (not observe mode), no key from the body, no derived keys.
//!
#![doc = include_str!("rollout.md")]

use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderName;
use http::request::Parts;
use http::{Method, StatusCode};

mod derive;
mod fingerprint;
mod handle;
mod headers;
mod intake;
#[cfg(feature = "json")]
mod json_fields;
mod lease;
mod long_job;
mod observe;
#[cfg(all(test, feature = "tracing"))]
mod observe_tests;
mod replay;
mod respond;
mod rollout;
mod service;
mod settings;
mod stored;
mod task_heartbeat;
#[cfg(test)]
mod tests;

pub use derive::DERIVED_KEY_PREFIX;
pub use fingerprint::{FingerprintError, IntoFingerprint};
pub use handle::request_fingerprint;
use headers::HeaderPolicy;
#[cfg(feature = "json")]
pub use json_fields::json_fields;
pub use long_job::InFlightLocation;
pub use observe::ObservedCounts;
pub use replay::Replay;
use rollout::Rollout;
pub use service::IdempotencyService;
pub use stored::StoredResponse;

use crate::{AsyncEngine, IdempotencyStore};

/// The request header that carries the key.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// The response header (`Idempotent-Replayed: true`) that marks a replayed
/// response.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// The response header (`Idempotent-Body-Not-Kept: true`) that marks a
/// replay whose original body was too large to store: it carries the
/// original status and headers, and a small problem body in place of the
/// original body (see the module documentation).
pub const IDEMPOTENT_BODY_NOT_KEPT: HeaderName =
    HeaderName::from_static("idempotent-body-not-kept");

/// A conventional header for the user id, for
/// [`IdempotencyLayer::user_header`] behind a proxy that sets it. The
/// layer never reads it unless told to.
pub const X_USER_ID: HeaderName = HeaderName::from_static("x-user-id");

/// The default for [`IdempotencyLayer::max_body_bytes`]: 1 MiB.
pub const DEFAULT_MAX_BODY: usize = 1 << 20;

/// The default for [`IdempotencyLayer::max_response_bytes`]: 1 MiB, the
/// engine's default `Options::max_response_len`.
pub const DEFAULT_MAX_RESPONSE: usize = 1 << 20;

/// The default for [`IdempotencyLayer::heartbeat_limit`]: 5 minutes.
pub const DEFAULT_HEARTBEAT_LIMIT: Duration = Duration::from_secs(5 * 60);

/// An error type boxed by the bodies the layer reads.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How the user id is taken from a request.
type UserFn = dyn Fn(&Parts) -> Option<String> + Send + Sync;

/// Which response statuses are stored.
type StoreFn = dyn Fn(StatusCode) -> bool + Send + Sync;

/// Whether the layer stores a response with `status` by default (see
/// [`IdempotencyLayer::store_when`]): 2xx, 3xx, and 4xx except `401`,
/// `403`, `408`, `409`, `425` and `429`, which say "not now" or "not you"
/// rather than "done", so a retry must run again. 1xx and 5xx are not
/// stored either.
///
/// ```
/// use idemkv::http::stored_by_default;
/// use http::StatusCode;
///
/// assert!(stored_by_default(StatusCode::CREATED));
/// assert!(stored_by_default(StatusCode::UNPROCESSABLE_ENTITY));
/// assert!(!stored_by_default(StatusCode::TOO_MANY_REQUESTS));
/// assert!(!stored_by_default(StatusCode::SERVICE_UNAVAILABLE));
/// ```
pub fn stored_by_default(status: StatusCode) -> bool {
    if status.is_success() || status.is_redirection() {
        return true;
    }
    status.is_client_error() && !matches!(status.as_u16(), 401 | 403 | 408 | 409 | 425 | 429)
}

/// A [`tower::Layer`] that answers requests carrying an `Idempotency-Key`
/// header from an [`IdempotencyStore`] (by default the [`AsyncEngine`] of
/// an [`Engine`](crate::Engine)): see the [module documentation](self).
///
/// Built with [`IdempotencyLayer::new`] (on an engine) or
/// [`IdempotencyLayer::with_store`] (on any store: a cluster `Node`, a
/// wrapper) and configured with its builder methods; cloning is cheap (an
/// `Arc`). A layer must be given a user
/// source ([`user_from`](IdempotencyLayer::user_from),
/// [`user_header`](IdempotencyLayer::user_header) or
/// [`fixed_user`](IdempotencyLayer::fixed_user)): without one, every keyed
/// request is refused with `400`.
#[derive(Clone)]
pub struct IdempotencyLayer<S: IdempotencyStore = AsyncEngine> {
    config: Arc<Config<S>>,
}

/// The layer's settings, shared by every service it wraps.
#[derive(Clone)]
struct Config<S: IdempotencyStore> {
    /// Where the records are kept (`new`: the engine's [`AsyncEngine`]).
    store: S,
    methods: Vec<Method>,
    /// `None`: no user source configured (every keyed request gets `400`).
    user: Option<Arc<UserFn>>,
    key_required: bool,
    max_body: usize,
    store_when: Arc<StoreFn>,
    wait: Duration,
    headers: HeaderPolicy,
    max_response: usize,
    heartbeat_limit: Duration,
    /// Observe mode, derived keys, keys from the body (rollout.rs).
    rollout: Rollout,
    // Long jobs, replay hook, partial fingerprints (long_job.rs, replay.rs,
    // fingerprint.rs hold their builder methods).
    /// The answer to a key in flight (`in_flight_status`).
    in_flight_status: StatusCode,
    /// `None`: a third of the store's `lease_ttl` (`heartbeat_every`).
    heartbeat_every: Option<Duration>,
    /// The `Location`s running handlers published, by key.
    locations: Arc<long_job::Locations>,
    on_replay: Option<Arc<replay::ReplayFn>>,
    /// `None`: [`request_fingerprint`].
    fingerprint: Option<Arc<fingerprint::FingerprintFn>>,
}
