//! What a request must bring before its key is claimed: a key (from the
//! `Idempotency-Key` header, from the body through `key_from`, or
//! derived), a user id, and a body within the limit, read whole. A request
//! without them is answered early ([`Early`]): refused, or passed through.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, HttpBody};
use bytes::{Bytes, BytesMut};
use http::request::Parts;
use http::{Request, StatusCode};
use http_body_util::BodyExt;

use super::derive::{body_key, derived_key};
use super::handle::{KeyHeader, idempotency_key};
use super::observe::{Early, Source, Verdict};
use super::stored::{bad_key, problem};
use super::{BoxError, Config};
use crate::{Fingerprint, IdempotencyStore};

/// A request ready for `begin`.
pub(super) struct Intake {
    pub(super) parts: Parts,
    /// The whole request body.
    pub(super) body: Bytes,
    /// The user id (not empty).
    pub(super) user: String,
    pub(super) key: KeySource,
}

/// Where a request's key comes from, in the order the layer looks.
pub(super) enum KeySource {
    /// The `Idempotency-Key` header, as the engine is given it.
    Header(Bytes),
    /// The body, through `key_from`, as the engine is given it.
    Body(Bytes),
    /// No key: one is derived, stored for this record TTL.
    Derived(Duration),
}

impl KeySource {
    /// The key the engine is given and the record TTL of its response
    /// (`None`: the engine's `record_ttl`), for a request with
    /// `fingerprint`.
    pub(super) fn key(
        self,
        user: &str,
        parts: &Parts,
        fingerprint: Fingerprint,
    ) -> (Bytes, Option<Duration>) {
        match self {
            KeySource::Header(key) | KeySource::Body(key) => (key, None),
            KeySource::Derived(window) => (derived_key(user, parts, fingerprint), Some(window)),
        }
    }
}

/// Finds the request's key, user id and body, in the order of the module
/// documentation's table; or the early answer.
///
/// With a header key, the user is checked before the body is read. Without
/// one, when `key_from` or derived keys are configured, the body is read
/// first (the key may be in it), then `key_from` is asked, then a key is
/// derived, and the user is checked once there is a key.
pub(super) async fn intake<St, B>(
    config: &Config<St>,
    parts: Parts,
    body: B,
) -> Result<Intake, Early>
where
    St: IdempotencyStore,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let rollout = &config.rollout;
    let header = match idempotency_key(&parts.headers) {
        KeyHeader::Key(key) => match user_of(config, &parts) {
            Ok(user) => Some((key, user)),
            Err(no) => return Err(early(Verdict::BadUser, Some(no.refusal()), parts, body)),
        },
        KeyHeader::Invalid => return Err(early(Verdict::BadKey, Some(bad_key()), parts, body)),
        KeyHeader::Missing if rollout.finds_keys() => None,
        KeyHeader::Missing => return Err(no_key(config, parts, body)),
    };
    // The body is read before the key is claimed: a slow or endless body
    // holds no key.
    let body = match read(body, config.max_body).await {
        Read::Whole(bytes) => bytes,
        Read::Over(resumed) => {
            let refusal = problem(
                StatusCode::PAYLOAD_TOO_LARGE,
                "Request body is too large",
                "The request body is larger than this service accepts.",
            );
            return Err(early(Verdict::TooLarge, Some(refusal), parts, resumed));
        }
        Read::Failed(resumed) => {
            let refusal = problem(
                StatusCode::BAD_REQUEST,
                "Request body could not be read",
                "The request body ended before it was complete.",
            );
            return Err(early(Verdict::BadBody, Some(refusal), parts, resumed));
        }
    };
    let (key, user) = match header {
        Some((key, user)) => (KeySource::Header(key), user),
        None => {
            let found = rollout.key_from.as_ref().and_then(|f| f(&parts, &body));
            let key = match (found, rollout.derive) {
                (Some(found), _) => match body_key(&found) {
                    Some(key) => KeySource::Body(key),
                    None => {
                        return Err(early(Verdict::BadKey, Some(bad_key()), parts, whole(body)));
                    }
                },
                (None, Some(window)) => KeySource::Derived(window),
                (None, None) => return Err(no_key(config, parts, whole(body))),
            };
            let user = match user_of(config, &parts) {
                Ok(user) => user,
                Err(no) => {
                    let refusal = Some(no.refusal());
                    return Err(early(Verdict::BadUser, refusal, parts, whole(body)));
                }
            };
            rollout.counts.source(match key {
                KeySource::Derived(_) => Source::Derived,
                _ => Source::Body,
            });
            (key, user)
        }
    };
    Ok(Intake {
        parts,
        body,
        user,
        key,
    })
}

/// The early answer of a request.
fn early<B>(verdict: Verdict, refusal: Option<http::Response<Body>>, parts: Parts, body: B) -> Early
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    Early {
        verdict,
        refusal,
        request: Request::from_parts(parts, Body::new(body)),
    }
}

/// A body already read.
fn whole(body: Bytes) -> Body {
    Body::from(body)
}

/// A request without a key: `400`, or passed through when keys are not
/// required.
fn no_key<St, B>(config: &Config<St>, parts: Parts, body: B) -> Early
where
    St: IdempotencyStore,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    if !config.key_required {
        return early(Verdict::Unkeyed, None, parts, body);
    }
    let refusal = problem(
        StatusCode::BAD_REQUEST,
        "Idempotency-Key is missing",
        "This operation requires an Idempotency-Key header.",
    );
    early(Verdict::MissingKey, Some(refusal), parts, body)
}

/// The user id of a keyed request, or why there is none: no source
/// configured, or none (or the empty user id, which would be a scope
/// shared by every such request) for this request.
fn user_of<St: IdempotencyStore>(config: &Config<St>, parts: &Parts) -> Result<String, NoUser> {
    let Some(user_of) = &config.user else {
        return Err(NoUser::NoSource);
    };
    user_of(parts)
        .filter(|user| !user.is_empty())
        .ok_or(NoUser::Missing)
}

/// Why a keyed request has no user id.
enum NoUser {
    /// No user source is configured.
    NoSource,
    /// The source found no user (or the empty one).
    Missing,
}

impl NoUser {
    /// The `400` problem.
    fn refusal(self) -> http::Response<Body> {
        match self {
            NoUser::NoSource => problem(
                StatusCode::BAD_REQUEST,
                "User source is not configured",
                "This service cannot tell whose Idempotency-Key this is, so it does not accept one.",
            ),
            NoUser::Missing => problem(
                StatusCode::BAD_REQUEST,
                "User id is missing",
                "The request does not carry a valid user identity for its Idempotency-Key.",
            ),
        }
    }
}

/// A request body read up to a limit.
enum Read<B> {
    /// The whole body, within the limit.
    Whole(Bytes),
    /// More than the limit: what was read, then the rest.
    Over(Resumed<B>),
    /// The body failed: what was read, then its error.
    Failed(Resumed<B>),
}

/// Reads `body` until it ends, fails, or holds more than `limit` bytes.
/// Trailers of a body that fits are dropped.
async fn read<B>(body: B, limit: usize) -> Read<B>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let mut body = Box::pin(body);
    let mut bytes = BytesMut::new();
    loop {
        match body.frame().await {
            None => return Read::Whole(bytes.freeze()),
            Some(Err(e)) => {
                return Read::Failed(Resumed {
                    prefix: Some(bytes.freeze()),
                    rest: Rest::Failed(Some(e.into())),
                });
            }
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    bytes.extend_from_slice(&data);
                    if bytes.len() > limit {
                        return Read::Over(Resumed {
                            prefix: Some(bytes.freeze()),
                            rest: Rest::Body(body),
                        });
                    }
                }
            }
        }
    }
}

/// `http_body::Frame<Bytes>`, named through `http-body-util` (as in
/// `respond.rs`).
type Frame = <<FrameFuture as std::future::Future>::Output as OptionResult>::Ok;

/// A future whose output is `Option<Result<http_body::Frame<Bytes>, _>>`.
type FrameFuture = http_body_util::combinators::Frame<'static, http_body_util::Empty<Bytes>>;

/// Names the `T` of an `Option<Result<T, E>>`.
trait OptionResult {
    type Ok;
}

impl<T, E> OptionResult for Option<Result<T, E>> {
    type Ok = T;
}

/// A request body the layer began to read and gives back whole (observe
/// mode runs the handler on it): the bytes read, then the rest of the
/// body, or the error it failed with.
struct Resumed<B> {
    prefix: Option<Bytes>,
    rest: Rest<B>,
}

/// What follows the bytes already read.
enum Rest<B> {
    Body(Pin<Box<B>>),
    Failed(Option<BoxError>),
}

impl<B> HttpBody for Resumed<B>
where
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
        if let Some(prefix) = this.prefix.take().filter(|p| !p.is_empty()) {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        match &mut this.rest {
            Rest::Body(body) => body
                .as_mut()
                .poll_frame(cx)
                .map(|frame| frame.map(|f| f.map_err(Into::into))),
            Rest::Failed(error) => Poll::Ready(error.take().map(Err)),
        }
    }
}
