//! Handling one request: the key, the fingerprint, begin, and what to do
//! with each answer.

use crate::{Begin, Error, Fingerprint, IdempotencyStore, KeyPart, Outcome};
use axum::body::{Body, HttpBody};
use bytes::Bytes;
use http::header::HeaderName;
use http::request::Parts;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use std::sync::Arc;
use std::time::Duration;

use super::fingerprint::fingerprint;
use super::intake::{Intake, intake};
use super::lease::Claim;
use super::long_job::{Job, in_flight};
use super::observe::{Early, Verdict, observe};
use super::replay;
use super::respond::run;
use super::stored::*;
use super::*;

/// One request through the layer.
pub(super) async fn handle<St, S, B, ResBody>(
    config: Arc<Config<St>>,
    inner: S,
    request: Request<B>,
) -> Result<Response<Body>, S::Error>
where
    St: IdempotencyStore,
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
    // The key (from the header, the body or derived), the user id and the
    // body; or the answer of a request refused (or passed through) before
    // a key is claimed for it (intake.rs).
    let Intake {
        parts,
        body,
        user,
        key,
    } = match intake(&config, parts, body).await {
        Ok(intake) => intake,
        Err(early) => return early.answer(&config, inner).await,
    };
    let fingerprint = match fingerprint(&config, &parts, &body) {
        Ok(fingerprint) => fingerprint,
        // A body the fingerprint function refuses (`json_fields`: not a
        // JSON object): `400`, or in observe mode counted and run.
        Err(refused) => {
            let early = Early {
                verdict: Verdict::BadBody,
                refusal: Some(refused.response()),
                request: Request::from_parts(parts, Body::from(body)),
            };
            return early.answer(&config, inner).await;
        }
    };
    let (key, record_ttl) = key.key(&user, &parts, fingerprint);
    let call = Call {
        store: config.store.clone(),
        user: Bytes::from(user),
        key,
        fingerprint,
        record_ttl,
    };
    if config.rollout.observe {
        return observe(&config, inner, parts, body, call).await;
    }
    let answer = call.begin(config.wait).await;
    config.rollout.counts.answer(Verdict::of(&answer));
    match answer {
        Err(failure) => Ok(failure.response()),
        Ok(Answer::Started(claim)) => {
            let mut parts = parts;
            let token = claim.lease().token();
            let job = Job::start(&config, &call.user, &call.key, token, &mut parts.extensions);
            let request = Request::from_parts(parts, Body::from(body));
            let response = run(&config, inner, request, claim).await;
            drop(job);
            response
        }
        Ok(Answer::Replay(outcome, waited)) => Ok(replay::respond(
            config.on_replay.as_deref(),
            &parts,
            &outcome,
            waited,
        )),
        Ok(Answer::Mismatch) => Ok(problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Idempotency-Key reused",
            "This Idempotency-Key was already used for a different request.",
        )),
        Ok(Answer::InFlight { retry_after }) => {
            Ok(in_flight(&config, &call.user, &call.key, retry_after).await)
        }
    }
}

/// Hands a request the layer does not handle to the inner service.
pub(super) async fn pass_through<S, ResBody>(
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

/// What `begin` answered, with a started lease held by a [`Claim`].
pub(super) enum Answer<St: IdempotencyStore> {
    Started(Claim<St>),
    /// The stored outcome, and whether it was served after waiting for the
    /// key's first request.
    Replay(Outcome, bool),
    Mismatch,
    InFlight {
        retry_after: Duration,
    },
}

/// The store calls of one request.
pub(super) struct Call<St: IdempotencyStore> {
    pub(super) store: St,
    pub(super) user: Bytes,
    pub(super) key: Bytes,
    pub(super) fingerprint: Fingerprint,
    /// The record TTL of the response (`None`: the store's).
    pub(super) record_ttl: Option<Duration>,
}

impl<St: IdempotencyStore> Call<St> {
    /// `begin_wait` with `wait`: while another request holds the key, waits
    /// up to `wait` for its lease to end, holding no thread. A started
    /// lease is wrapped in a [`Claim`] in the same poll that receives it;
    /// a request dropped before that is covered by the store's `begin`
    /// (the engine's releases a lease it granted but never handed out).
    pub(super) async fn begin(&self, wait: Duration) -> Result<Answer<St>, Failure> {
        let (answer, waited) = self
            .store
            .begin_waited(&self.user, &self.key, self.fingerprint, wait)
            .await
            .map_err(Failure::Store)?;
        Ok(match answer {
            Begin::Started(lease) => {
                Answer::Started(Claim::new(self.store.clone(), lease).record_ttl(self.record_ttl))
            }
            Begin::Replay(outcome) => Answer::Replay(outcome, waited),
            Begin::Mismatch => Answer::Mismatch,
            Begin::InFlight { retry_after } => Answer::InFlight { retry_after },
        })
    }
}

/// Why a store call gave no answer.
pub(super) enum Failure {
    /// The store returned an error.
    Store(Error),
}

impl Failure {
    /// `400` for a key or user id the store rejects, else `503`.
    fn response(&self) -> Response<Body> {
        match self {
            Failure::Store(Error::InvalidKey {
                part: KeyPart::User,
                ..
            }) => problem(
                StatusCode::BAD_REQUEST,
                "User id is invalid",
                "The user id of the request is longer than the idempotency store accepts.",
            ),
            Failure::Store(Error::InvalidKey { .. }) => bad_key(),
            Failure::Store(_) => problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "Idempotency store unavailable",
                "The request was not processed; retry later with the same Idempotency-Key.",
            ),
        }
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
pub(super) enum KeyHeader {
    Missing,
    Invalid,
    /// The key as passed to the engine (see [`engine_key`]).
    Key(Bytes),
}

/// Reads the key: an RFC 8941 sf-string (`"order 7"`: printable ASCII
/// 0x20-0x7E, with `\"` and `\\` escapes) as the draft specifies, or,
/// leniently, a bare token of visible ASCII (`order-7`, the same key as
/// `"order-7"`). The header must occur once; an empty key is invalid. The
/// key is returned as [`engine_key`] encodes it; the engine checks its
/// length.
pub(super) fn idempotency_key(headers: &HeaderMap) -> KeyHeader {
    let mut values = headers.get_all(&IDEMPOTENCY_KEY).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return if headers.contains_key(&IDEMPOTENCY_KEY) {
            KeyHeader::Invalid
        } else {
            KeyHeader::Missing
        };
    };
    let raw = value.as_bytes().trim_ascii();
    let key = match raw.strip_prefix(b"\"") {
        Some(quoted) => sf_string(quoted),
        None if raw.iter().all(u8::is_ascii_graphic) => Some(raw.to_vec()),
        None => None,
    };
    match key {
        Some(key) if !key.is_empty() => KeyHeader::Key(engine_key(&key)),
        _ => KeyHeader::Invalid,
    }
}

/// The content of an sf-string whose opening quote is already consumed:
/// `None` unless a closing quote ends `quoted`.
fn sf_string(quoted: &[u8]) -> Option<Vec<u8>> {
    let mut key = Vec::with_capacity(quoted.len());
    let mut bytes = quoted.iter();
    while let Some(&b) = bytes.next() {
        match b {
            b'\\' => match bytes.next() {
                Some(&e @ (b'"' | b'\\')) => key.push(e),
                _ => return None,
            },
            // The closing quote must end the value.
            b'"' => return bytes.next().is_none().then_some(key),
            0x20..=0x7e => key.push(b),
            _ => return None,
        }
    }
    None
}

/// The key as the engine stores it: the key with each space written `%20`
/// and each `%` written `%25`, so that it is visible ASCII (the engine's
/// default `ascii_keys`) and two keys never share an encoding. Every other
/// byte is itself.
///
/// A key that starts with [`DERIVED_KEY_PREFIX`] has its `d` written
/// `%64`, so that no client key is stored as a derived key would be.
pub(super) fn engine_key(key: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(key.len() + 2);
    let mut key = key;
    if key.starts_with(DERIVED_KEY_PREFIX.as_bytes()) {
        out.extend_from_slice(b"%64");
        key = key.get(1..).unwrap_or_default();
    }
    for &b in key {
        match b {
            b' ' => out.extend_from_slice(b"%20"),
            b'%' => out.extend_from_slice(b"%25"),
            _ => out.push(b),
        }
    }
    Bytes::from(out)
}

/// The user id in header `name`: `None` when the header is absent,
/// repeated, or not printable ASCII.
pub(super) fn user_from_header(parts: &Parts, name: &HeaderName) -> Option<String> {
    let mut values = parts.headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (Some(value), None) => value.to_str().ok().map(str::to_owned),
        _ => None,
    }
}
