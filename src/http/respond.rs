//! Running the handler of a started key, and storing (or releasing) what
//! it answered: buffered up to the storable size, streamed past it.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::body::{Body, HttpBody};
use bytes::{Bytes, BytesMut};
use http::header::CONTENT_LENGTH;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;

use super::headers::{not_kept_headers, not_kept_marker};
use super::lease::{Claim, heartbeat};
use super::stored::{StoredResponse, problem};
use super::{BoxError, Config};
use crate::store::KeepAlive;
use crate::{Error, IdempotencyStore, Lease, Outcome};

/// `http_body::Frame<Bytes>`, named through `http-body-util` (the crate
/// has no direct dependency on `http-body`, and neither axum nor
/// `http-body-util` re-exports the type).
type Frame = <<FrameFuture as Future>::Output as OptionResult>::Ok;

/// A future whose output is `Option<Result<http_body::Frame<Bytes>, _>>`.
type FrameFuture = http_body_util::combinators::Frame<'static, http_body_util::Empty<Bytes>>;

/// Names the `T` of an `Option<Result<T, E>>`.
trait OptionResult {
    type Ok;
}

impl<T, E> OptionResult for Option<Result<T, E>> {
    type Ok = T;
}

/// Runs the inner service for a started key and stores or releases its
/// response (see the module documentation, "How a response is stored" and
/// "Failure handling").
pub(super) async fn run<St, S, ResBody>(
    config: &Config<St>,
    mut inner: S,
    request: Request<Body>,
    claim: Claim<St>,
) -> Result<Response<Body>, S::Error>
where
    St: IdempotencyStore,
    S: tower::Service<Request<Body>, Response = Response<ResBody>>,
    ResBody: HttpBody<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let store = &config.store;
    // From here on the work may happen: a dropped request no longer
    // releases the key (its lease expires), and the heartbeat keeps it.
    let record_ttl = claim.record_ttl;
    let lease = claim.into_lease();
    let heartbeat = heartbeat(
        store,
        &lease,
        config.heartbeat_every,
        config.heartbeat_limit,
    );
    let response = match inner.call(request).await {
        Ok(response) => response,
        Err(e) => {
            let _ = settle(heartbeat, release(store, lease)).await;
            return Err(e);
        }
    };
    let (mut parts, body) = response.into_parts();
    if !(config.store_when)(parts.status) {
        let _ = settle(heartbeat, release(store, lease)).await;
        return Ok(Response::from_parts(parts, Body::new(body)));
    }
    let kept = config.headers.kept(&parts.headers);
    let stored = Stored {
        store: store.clone(),
        lease,
        status: parts.status.as_u16(),
        kept,
        record_ttl,
    };
    let limit = config
        .max_response
        .saturating_sub(StoredResponse::encoded_len(&stored.kept, 0));
    match buffer(body, limit).await {
        Buffered::Whole(bytes) => {
            let body = bytes.clone();
            let _ = settle(heartbeat, stored.store(Some(body))).await;
            Ok(Response::from_parts(parts, Body::from(bytes)))
        }
        Buffered::Failed => {
            let _ = settle(heartbeat, release(store, stored.lease)).await;
            Ok(problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Response failed",
                "The response body could not be produced.",
            ))
        }
        Buffered::Over { prefix, body } => {
            // The body is re-framed (chunked): hyper must poll it to its
            // end, where the key is completed, rather than stop once a
            // declared length has been written.
            parts.headers.remove(CONTENT_LENGTH);
            let streamed = Streamed {
                body,
                prefix: Some(prefix),
                end: Some(Box::new((stored, heartbeat))),
                finishing: None,
                done: false,
            };
            Ok(Response::from_parts(parts, Body::new(streamed)))
        }
    }
}

/// What the layer does once the handler's answer is known: stops the
/// heartbeat (at once: it waits at most for an extend of this lease under
/// way, an append to the log, so that none runs after the store or
/// release; a store's own heartbeat stops as it documents), then runs
/// `then` (an async store call, which holds no thread while its fsync or
/// round trip runs) to its end: in place, and if the request is
/// dropped first (the client hung up after the work was done), what is
/// left of it on a task of its own ([`Finish`]).
fn settle(heartbeat: KeepAlive, then: impl Future<Output = ()> + Send + 'static) -> Finish {
    heartbeat.stop();
    Finish(Some(Box::pin(then)))
}

/// A store or release that always runs to its end: awaited in place (no
/// task per request), and handed to a task of its own if dropped before it
/// ended. (Dropped outside a tokio runtime, it is dropped: the lease then
/// expires.)
pub(super) struct Finish(Option<Pin<Box<dyn Future<Output = ()> + Send>>>);

impl Future for Finish {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if let Some(then) = self.0.as_mut() {
            ready!(then.as_mut().poll(cx));
            self.0 = None;
        }
        Poll::Ready(())
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        if let Some(then) = self.0.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(then);
        }
    }
}

/// Releases `lease`, ignoring failure (a lost lease no longer holds the
/// key; a failing store lets the lease expire).
fn release<St: IdempotencyStore>(
    store: &St,
    lease: Lease,
) -> impl Future<Output = ()> + Send + 'static {
    let store = store.clone();
    async move {
        let _ = store.release(&lease).await;
    }
}

/// A response body read up to a limit.
enum Buffered<B> {
    /// The whole body, within the limit.
    Whole(Bytes),
    /// The body failed before it ended.
    Failed,
    /// The body is larger than the limit: the bytes read so far (more than
    /// `limit`) and the rest of the body.
    Over { prefix: Bytes, body: Pin<Box<B>> },
}

/// Reads `body` until it ends, fails, or holds more than `limit` bytes.
/// Trailers of a body that fits are dropped (they are not stored).
async fn buffer<B>(body: B, limit: usize) -> Buffered<B>
where
    B: HttpBody<Data = Bytes>,
{
    let mut body = Box::pin(body);
    let mut bytes = BytesMut::new();
    loop {
        match body.frame().await {
            None => return Buffered::Whole(bytes.freeze()),
            Some(Err(_)) => return Buffered::Failed,
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    bytes.extend_from_slice(&data);
                    if bytes.len() > limit {
                        return Buffered::Over {
                            prefix: bytes.freeze(),
                            body,
                        };
                    }
                }
            }
        }
    }
}

/// What a completed key stores: the status and kept headers of the
/// response, for the lease that ran it.
pub(super) struct Stored<St: IdempotencyStore> {
    pub(super) store: St,
    pub(super) lease: Lease,
    pub(super) status: u16,
    pub(super) kept: Vec<(HeaderName, HeaderValue)>,
    /// The record TTL (`None`: the store's `record_ttl`).
    pub(super) record_ttl: Option<Duration>,
}

impl<St: IdempotencyStore> Stored<St> {
    /// [`Stored::store_forms`], ignoring failure: a lost lease or a store
    /// error leaves the lease to expire (the work ran, so the key is not
    /// released).
    async fn store(self, body: Option<Bytes>) {
        let _ = self.store_forms(body).await;
    }

    /// Completes the lease with the response and `body`; with `None`, or if
    /// that is larger than the store keeps, with the not-kept forms, each
    /// smaller than the last: the status, the headers that do not describe
    /// the body, `Idempotent-Body-Not-Kept: true` and the not-kept problem
    /// body; else the status and the marker alone; else the status with an
    /// empty stored body (replayed with the marker too).
    pub(super) async fn store_forms(&self, body: Option<Bytes>) -> crate::Result<()> {
        let full = body.map(|body| StoredResponse {
            headers: self.kept.clone(),
            body,
        });
        let not_kept = StoredResponse {
            headers: not_kept_headers(&self.kept),
            body: not_kept_body(self.status),
        };
        let marker = StoredResponse {
            headers: vec![not_kept_marker()],
            body: Bytes::new(),
        };
        let forms = full
            .into_iter()
            .chain([not_kept, marker])
            .map(|stored| stored.encode())
            .chain([Bytes::new()]);
        let forms: Vec<Bytes> = forms.collect();
        let mut result = Ok(());
        for body in forms {
            let outcome = Outcome {
                status: self.status,
                body,
            };
            result = match self.record_ttl {
                Some(ttl) => {
                    self.store
                        .complete_with_ttl(&self.lease, outcome, ttl)
                        .await
                }
                None => self.store.complete(&self.lease, outcome).await,
            };
            if !matches!(result, Err(Error::ResponseTooLarge { .. })) {
                break;
            }
        }
        result
    }
}

/// The body stored in place of one too large to keep: a small
/// `application/problem+json` object with the original status.
pub(super) fn not_kept_body(status: u16) -> Bytes {
    Bytes::from(format!(
        r#"{{"title":"Response body not kept","status":{status},"detail":"The original response body was too large to store; this replay carries its status and headers only."}}"#
    ))
}

/// The body of a response too large to store, streamed to the client as
/// it is produced: first the bytes already read, then the rest. When it
/// ends, the key is stored as not kept before the end is passed on; when
/// it fails, the key is released before the error is passed on. Dropped
/// before either (the client went away), it stops the heartbeat and
/// leaves the lease to expire.
struct Streamed<B, St: IdempotencyStore> {
    body: Pin<Box<B>>,
    prefix: Option<Bytes>,
    /// What to store at the end, and the heartbeat to stop then (boxed:
    /// the body is `Unpin` whatever the store).
    end: Option<Box<(Stored<St>, KeepAlive)>>,
    /// The store or release in progress, and the error to pass on after it
    /// (`None`: the end of the body).
    finishing: Option<(Finish, Option<BoxError>)>,
    done: bool,
}

impl<B, St: IdempotencyStore> Streamed<B, St> {
    /// Starts storing (the body ended: `error` is `None`) or releasing (it
    /// failed with `error`).
    fn finish(&mut self, error: Option<BoxError>) {
        let finishing = match self.end.take().map(|end| *end) {
            Some((stored, heartbeat)) if error.is_some() => {
                settle(heartbeat, release(&stored.store, stored.lease))
            }
            Some((stored, heartbeat)) => settle(heartbeat, stored.store(None)),
            // (Not reached: the body finishes once.)
            None => Finish(None),
        };
        self.finishing = Some((finishing, error));
    }
}

impl<B, St> HttpBody for Streamed<B, St>
where
    St: IdempotencyStore,
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame, BoxError>>> {
        let this = self.get_mut();
        loop {
            if let Some((finishing, _)) = this.finishing.as_mut() {
                // (A failed task only means the store or release did not
                // happen: the lease expires.)
                ready!(Pin::new(finishing).poll(cx));
                let error = this.finishing.take().and_then(|(_, error)| error);
                this.done = true;
                return Poll::Ready(error.map(Err));
            }
            if this.done {
                return Poll::Ready(None);
            }
            if let Some(prefix) = this.prefix.take() {
                return Poll::Ready(Some(Ok(Frame::data(prefix))));
            }
            match ready!(this.body.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => return Poll::Ready(Some(Ok(frame))),
                Some(Err(e)) => this.finish(Some(e.into())),
                None => this.finish(None),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}
