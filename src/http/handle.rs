//! Handling one request: the key, the fingerprint, begin, and what to do
//! with each answer.

use crate::{Begin, Engine, Error, Fingerprint, KeyPart, Lease, Outcome};
use axum::body::{Body, HttpBody};
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::request::Parts;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use std::sync::Arc;
use std::time::Duration;

use super::stored::*;
use super::*;

/// One request through the layer.
pub(super) async fn handle<S, B, ResBody>(
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

/// Runs the inner service for a started key and stores or releases its
/// response.
pub(super) async fn run<S, ResBody>(
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
pub(super) async fn release(engine: &Arc<Engine>, lease: Lease) {
    let engine = Arc::clone(engine);
    let _ = blocking(move || engine.release(&lease)).await;
}

/// The engine calls of one request.
pub(super) struct Call {
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
        let fingerprint = self.fingerprint;
        blocking(move || engine.wait(user, key, fingerprint, timeout)).await
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
pub(super) enum Failure {
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
pub(super) async fn blocking<T, F>(f: F) -> Result<T, Failure>
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
pub(super) enum KeyHeader {
    Missing,
    Invalid,
    Key(Bytes),
}

/// Reads the key: a structured-field string (`"abc"`, with `\"` and `\\`
/// escapes) as the draft specifies, or, leniently, a bare token (`abc`).
/// The header must occur once. The engine checks the key itself.
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
pub(super) fn user_from_header(parts: &Parts, name: &HeaderName) -> Option<String> {
    match parts.headers.get(name) {
        None => Some(String::new()),
        Some(value) => value.to_str().ok().map(str::to_owned),
    }
}

/// The values of the `keep` headers, in the response's order.
pub(super) fn kept_headers(
    headers: &HeaderMap,
    keep: &[HeaderName],
) -> Vec<(HeaderName, HeaderValue)> {
    keep.iter()
        .flat_map(|name| {
            headers
                .get_all(name)
                .iter()
                .map(move |value| (name.clone(), value.clone()))
        })
        .collect()
}
