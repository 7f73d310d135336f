//! The replay hook: [`IdempotencyLayer::on_replay`] sees (and may change
//! the headers of) every replay before it is sent.

use std::sync::Arc;

use axum::body::Body;
use bytes::Bytes;
use http::header::{CONTENT_LENGTH, HeaderValue, TRANSFER_ENCODING};
use http::request::Parts;
use http::{HeaderMap, Response, StatusCode};

use super::stored::{StoredResponse, replay};
use super::{IDEMPOTENT_BODY_NOT_KEPT, IDEMPOTENT_REPLAYED, IdempotencyLayer};
use crate::{IdempotencyStore, Outcome};

/// How a replay hook is called.
pub(super) type ReplayFn = dyn Fn(&mut Replay<'_>) + Send + Sync;

impl<S: IdempotencyStore> IdempotencyLayer<S> {
    /// Calls `hook` before each replay is sent (a request answered from a
    /// stored response; not a first run, a `409`/in-flight answer or a
    /// problem), with the request's parts, the status, headers and body
    /// about to be sent, and whether the replay was served after waiting
    /// for the key's first request ([`wait_in_flight`](Self::wait_in_flight)).
    /// The hook may change the headers; the status and the body are the
    /// stored ones and cannot be changed.
    ///
    /// The layer's own headers stay as the layer set them, whatever the hook
    /// does: `Idempotent-Replayed: true` (and `Idempotent-Body-Not-Kept:
    /// true` on a replay whose body was not kept) are put back, and
    /// `Content-Length` and `Transfer-Encoding` (the body's framing, which
    /// the server writes) are removed. A stored response the layer cannot
    /// decode is answered `500` without calling the hook. The hook runs on
    /// the request's task: keep it short and non-blocking.
    ///
    /// ```no_run
    /// # use std::sync::Arc;
    /// # use idemkv::{Engine, Options, http::IdempotencyLayer};
    /// use axum::http::{HeaderName, HeaderValue};
    ///
    /// # let engine = Arc::new(Engine::open("/tmp/idem", Options::default()).unwrap());
    /// let layer = IdempotencyLayer::new(engine)
    ///     .fixed_user("tenant")
    ///     .on_replay(|replay| {
    ///         // Tell the client which request this replay answers now.
    ///         if let Some(id) = replay.parts().headers.get("x-request-id").cloned() {
    ///             replay.headers_mut().insert(HeaderName::from_static("x-request-id"), id);
    ///         }
    ///         let waited = if replay.waited() { "waited" } else { "stored" };
    ///         replay.headers_mut().insert(
    ///             HeaderName::from_static("x-idempotency-replay"),
    ///             HeaderValue::from_static(waited),
    ///         );
    ///     });
    /// ```
    pub fn on_replay<F>(self, hook: F) -> IdempotencyLayer<S>
    where
        F: Fn(&mut Replay<'_>) + Send + Sync + 'static,
    {
        self.with(|c| c.on_replay = Some(Arc::new(hook)))
    }
}

/// What an [`IdempotencyLayer::on_replay`] hook sees of a replay: the
/// request it answers, and the response about to be sent, whose headers it
/// may change.
#[derive(Debug)]
pub struct Replay<'a> {
    parts: &'a Parts,
    status: StatusCode,
    headers: &'a mut HeaderMap,
    body: &'a Bytes,
    waited: bool,
}

impl Replay<'_> {
    /// The request being answered (method, URI, headers, extensions; its
    /// body was read by the layer).
    pub fn parts(&self) -> &Parts {
        self.parts
    }

    /// The stored status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The headers about to be sent: the stored (kept) headers and
    /// `Idempotent-Replayed: true`.
    pub fn headers(&self) -> &HeaderMap {
        self.headers
    }

    /// The headers about to be sent, to change. The layer's markers and
    /// the framing headers are restored after the hook (see
    /// [`IdempotencyLayer::on_replay`]).
    pub fn headers_mut(&mut self) -> &mut HeaderMap {
        self.headers
    }

    /// The body about to be sent: the stored body, or the small problem
    /// body of a replay whose original body was not kept.
    pub fn body(&self) -> &Bytes {
        self.body
    }

    /// Whether this replay was served after waiting: the key was in flight
    /// when the request arrived, and the layer waited
    /// ([`IdempotencyLayer::wait_in_flight`]) for its first request to be
    /// stored. `false` for a key already completed when the request
    /// arrived.
    pub fn waited(&self) -> bool {
        self.waited
    }
}

/// The replay of `outcome` to the request with `parts`, through the hook
/// if one is set (`waited`: served after waiting for an in-flight key).
pub(super) fn respond(
    hook: Option<&ReplayFn>,
    parts: &Parts,
    outcome: &Outcome,
    waited: bool,
) -> Response<Body> {
    let response = replay(outcome);
    let Some(hook) = hook else {
        return response;
    };
    // A stored response that could not be decoded is a 500 problem, not a
    // replay: the hook does not see it.
    if !response.headers().contains_key(IDEMPOTENT_REPLAYED) {
        return response;
    }
    let not_kept = response.headers().contains_key(IDEMPOTENT_BODY_NOT_KEPT);
    let body = StoredResponse::decode(&outcome.body).map_or_else(Bytes::new, |s| s.body);
    let (mut head, sent) = response.into_parts();
    hook(&mut Replay {
        parts,
        status: head.status,
        headers: &mut head.headers,
        body: &body,
        waited,
    });
    let headers = &mut head.headers;
    headers.remove(CONTENT_LENGTH);
    headers.remove(TRANSFER_ENCODING);
    headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    if not_kept {
        headers.insert(IDEMPOTENT_BODY_NOT_KEPT, HeaderValue::from_static("true"));
    } else {
        headers.remove(IDEMPOTENT_BODY_NOT_KEPT);
    }
    Response::from_parts(head, sent)
}
