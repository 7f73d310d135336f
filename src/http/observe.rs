//! What the layer answers a request, counted ([`ObservedCounts`]); and
//! observe mode, where every request runs its handler and the answer
//! enforcement would have given is only counted and traced.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::{Body, HttpBody};
use bytes::Bytes;
use http::request::Parts;
use http::{Request, Response};

use super::handle::{Answer, Call, Failure, pass_through};
use super::respond::run;
use super::{BoxError, Config};
use crate::stats::{Striped, bump};
use crate::{Error, IdempotencyStore, KeyPart};

/// What an [`IdempotencyLayer`](super::IdempotencyLayer) answered its
/// handled requests (those with a method in
/// [`methods`](super::IdempotencyLayer::methods)), by kind: read with
/// [`IdempotencyLayer::observed`](super::IdempotencyLayer::observed). In
/// observe mode, what enforcement would have answered them (the handler
/// ran for every one). Each request counts under exactly one answer; the
/// key-source counts (`derived_keys`, `body_keys`) count some of them a
/// second time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ObservedCounts {
    /// A new (or free again) key: the handler runs, and its response is
    /// stored or the key released.
    pub started: u64,
    /// A key completed for the same request: the stored response is
    /// replayed without running the handler.
    pub replays: u64,
    /// A key whose first request is still running: `409` (in observe mode
    /// the layer does not wait, whatever
    /// [`wait_in_flight`](super::IdempotencyLayer::wait_in_flight) says).
    pub in_flight: u64,
    /// A key used before for another request: `422`.
    pub mismatches: u64,
    /// No key (no header, none in the body, none derived) while keys are
    /// required: `400`.
    pub missing_key: u64,
    /// No key, keys not required: passed to the handler untouched.
    pub unkeyed: u64,
    /// A malformed `Idempotency-Key` header, an invalid key from
    /// [`key_from`](super::IdempotencyLayer::key_from), or a key longer
    /// than the engine accepts: `400`.
    pub bad_key: u64,
    /// No user source, no user for the request, or a user id longer than
    /// the engine accepts: `400`.
    pub bad_user: u64,
    /// A request body over
    /// [`max_body_bytes`](super::IdempotencyLayer::max_body_bytes): `413`.
    pub too_large: u64,
    /// A request body that failed before its end, or that the fingerprint
    /// function refused
    /// ([`json_fields`](super::IdempotencyLayer::fingerprint_with): not a
    /// JSON object): `400`.
    pub bad_body: u64,
    /// The engine failed (closed, disk error): `503`.
    pub unavailable: u64,
    /// Requests that were given a derived key
    /// ([`derive_missing_keys`](super::IdempotencyLayer::derive_missing_keys));
    /// each is counted under its answer too.
    pub derived_keys: u64,
    /// Requests whose valid key came from the body
    /// ([`key_from`](super::IdempotencyLayer::key_from)); each is counted
    /// under its answer too.
    pub body_keys: u64,
}

/// The layer's answer to one request, as counted (its discriminant is its
/// counter's index: keep `Unavailable` last).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    Started,
    Replay,
    InFlight,
    Mismatch,
    MissingKey,
    Unkeyed,
    BadKey,
    BadUser,
    TooLarge,
    BadBody,
    Unavailable,
}

impl Verdict {
    /// How many kinds of answer there are.
    const COUNT: usize = Verdict::Unavailable as usize + 1;

    /// The name in `tracing` events (the field names of
    /// [`ObservedCounts`], singular where they count answers).
    #[cfg_attr(not(feature = "tracing"), allow(dead_code))]
    pub(super) fn name(self) -> &'static str {
        match self {
            Verdict::Started => "started",
            Verdict::Replay => "replay",
            Verdict::InFlight => "in_flight",
            Verdict::Mismatch => "mismatch",
            Verdict::MissingKey => "missing_key",
            Verdict::Unkeyed => "unkeyed",
            Verdict::BadKey => "bad_key",
            Verdict::BadUser => "bad_user",
            Verdict::TooLarge => "too_large",
            Verdict::BadBody => "bad_body",
            Verdict::Unavailable => "unavailable",
        }
    }

    /// What `begin` (or its failure) means.
    pub(super) fn of<St: IdempotencyStore>(answer: &Result<Answer<St>, Failure>) -> Verdict {
        match answer {
            Ok(Answer::Started(_)) => Verdict::Started,
            Ok(Answer::Replay(..)) => Verdict::Replay,
            Ok(Answer::InFlight { .. }) => Verdict::InFlight,
            Ok(Answer::Mismatch) => Verdict::Mismatch,
            // As `Failure::response` answers.
            Err(Failure::Store(Error::InvalidKey {
                part: KeyPart::User,
                ..
            })) => Verdict::BadUser,
            Err(Failure::Store(Error::InvalidKey { .. })) => Verdict::BadKey,
            Err(Failure::Store(_)) => Verdict::Unavailable,
        }
    }
}

/// Where a request's key came from, as counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Source {
    Derived,
    Body,
}

/// The atomic counters behind [`ObservedCounts`]. The answers are bumped
/// on every handled request, so they are striped per thread (as the
/// engine's hot counters are): two cores answering requests do not pass
/// one cache line back and forth.
#[derive(Debug, Default)]
pub(super) struct Counters {
    answers: [Striped; Verdict::COUNT],
    derived_keys: AtomicU64,
    body_keys: AtomicU64,
}

impl Counters {
    /// Counts one answer.
    pub(super) fn answer(&self, verdict: Verdict) {
        let slot = verdict as usize;
        if let Some(counter) = self.answers.get(slot) {
            bump(counter);
        }
    }

    /// Counts one key from `source`.
    pub(super) fn source(&self, source: Source) {
        let counter = match source {
            Source::Derived => &self.derived_keys,
            Source::Body => &self.body_keys,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The counts now (each read on its own: a request counted meanwhile
    /// may show in one count and not yet in another).
    pub(super) fn snapshot(&self) -> ObservedCounts {
        let get = |verdict: Verdict| self.answers.get(verdict as usize).map_or(0, Striped::get);
        ObservedCounts {
            started: get(Verdict::Started),
            replays: get(Verdict::Replay),
            in_flight: get(Verdict::InFlight),
            mismatches: get(Verdict::Mismatch),
            missing_key: get(Verdict::MissingKey),
            unkeyed: get(Verdict::Unkeyed),
            bad_key: get(Verdict::BadKey),
            bad_user: get(Verdict::BadUser),
            too_large: get(Verdict::TooLarge),
            bad_body: get(Verdict::BadBody),
            unavailable: get(Verdict::Unavailable),
            derived_keys: self.derived_keys.load(Ordering::Relaxed),
            body_keys: self.body_keys.load(Ordering::Relaxed),
        }
    }
}

/// A request answered before a key was claimed for it: refused (or, with
/// no key and none required, passed through), with the request as it
/// reached the layer, for observe mode to run.
pub(super) struct Early {
    pub(super) verdict: Verdict,
    /// What enforcement answers; `None`: the request is passed through.
    pub(super) refusal: Option<Response<Body>>,
    pub(super) request: Request<Body>,
}

impl Early {
    /// Counts the answer; enforcing, gives the refusal; observing (or
    /// passing through), runs the inner service on the request.
    pub(super) async fn answer<St, S, ResBody>(
        self,
        config: &Config<St>,
        inner: S,
    ) -> Result<Response<Body>, S::Error>
    where
        St: IdempotencyStore,
        S: tower::Service<Request<Body>, Response = Response<ResBody>>,
        ResBody: HttpBody<Data = Bytes> + Send + 'static,
        ResBody::Error: Into<BoxError>,
    {
        config.rollout.counts.answer(self.verdict);
        if config.rollout.observe {
            let (parts, body) = self.request.into_parts();
            trace(self.verdict, &parts, None);
            return pass_through(inner, Request::from_parts(parts, body)).await;
        }
        match self.refusal {
            Some(refusal) => Ok(refusal),
            None => pass_through(inner, self.request).await,
        }
    }
}

/// A keyed request in observe mode: `begin` without waiting, counted and
/// traced; the inner service runs in every case. A new key is run as
/// enforcement runs it (its response stored, or the key released); for
/// any other answer nothing is written, so a record another request made
/// is never changed.
pub(super) async fn observe<St, S, ResBody>(
    config: &Config<St>,
    inner: S,
    parts: Parts,
    body: Bytes,
    call: Call<St>,
) -> Result<Response<Body>, S::Error>
where
    St: IdempotencyStore,
    S: tower::Service<Request<Body>, Response = Response<ResBody>>,
    ResBody: HttpBody<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let answer = call.begin(Duration::ZERO).await;
    let verdict = Verdict::of(&answer);
    config.rollout.counts.answer(verdict);
    trace(verdict, &parts, Some((&call.user, &call.key)));
    let request = Request::from_parts(parts, Body::from(body));
    match answer {
        Ok(Answer::Started(claim)) => run(config, inner, request, claim).await,
        _ => pass_through(inner, request).await,
    }
}

/// The `tracing` event of an observed request (feature `tracing`; target
/// `idemkv::http::observe`): `debug` when enforcement would have let the
/// request run (`started`, `unkeyed`), `info` when it would have answered
/// otherwise.
#[cfg_attr(not(feature = "tracing"), allow(unused_variables))]
fn trace(verdict: Verdict, parts: &Parts, id: Option<(&Bytes, &Bytes)>) {
    #[cfg(feature = "tracing")]
    {
        let answer = verdict.name();
        let (user, key) = match id {
            Some((user, key)) => (
                String::from_utf8_lossy(user).into_owned(),
                String::from_utf8_lossy(key).into_owned(),
            ),
            None => (String::new(), String::new()),
        };
        let (method, path) = (parts.method.as_str(), parts.uri.path());
        if matches!(verdict, Verdict::Started | Verdict::Unkeyed) {
            tracing::debug!(target: "idemkv::http::observe", answer, method, path, user, key,
                "observe mode: enforcement would run this request");
        } else {
            tracing::info!(target: "idemkv::http::observe", answer, method, path, user, key,
                "observe mode: enforcement would answer {answer}; the handler ran");
        }
    }
}
