//! Long-running jobs: what a retry gets while its key's first request is
//! still running ([`IdempotencyLayer::in_flight_status`], `409` or `202
//! Accepted`), the `Location` a running handler hands the layer early
//! ([`InFlightLocation`]), and how often a running request's lease is
//! extended ([`IdempotencyLayer::heartbeat_every`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue, LOCATION, RETRY_AFTER};
use http::{Extensions, Response, StatusCode};
use parking_lot::Mutex;

use super::stored::{conflict, retry_after_secs};
use super::{Config, IdempotencyLayer};
use crate::{IdempotencyStore, RecordState};

impl<S: IdempotencyStore> IdempotencyLayer<S> {
    /// The status a request gets while its key's first request is still
    /// running (after [`wait_in_flight`](Self::wait_in_flight), if set).
    /// Default: `409 Conflict`, a problem body and `Retry-After`.
    ///
    /// Any other status is answered with `Retry-After` (whole seconds until
    /// the running request's lease would end if its heartbeat stopped now)
    /// and a small JSON body: `application/json` for a 2xx or 3xx status,
    /// `application/problem+json` otherwise. With a 2xx or 3xx status, the
    /// answer also carries the `Location` the running handler published
    /// through its [`InFlightLocation`], if it did. The usual choice for
    /// long jobs is `202 Accepted`: a client that retries a 15-minute job at
    /// minute 14 is told "accepted, still running, look here", and the job
    /// does not run twice. An informational (1xx) status cannot end a
    /// response: it leaves the setting unchanged.
    pub fn in_flight_status(self, status: StatusCode) -> IdempotencyLayer<S> {
        if status.is_informational() {
            return self;
        }
        self.with(|c| c.in_flight_status = status)
    }

    /// How often the lease of a running request is extended (by the
    /// store's `lease_ttl`), in real time. Default (and with
    /// `Duration::ZERO`): a third of the store's `lease_ttl`. A shorter
    /// interval leaves more of the lease in hand when an extend is late (a
    /// slow disk, a paused process) at the cost of one log append per
    /// extend; the extends stop at [`heartbeat_limit`](Self::heartbeat_limit)
    /// either way. Set `heartbeat_limit` (and the engine's
    /// `Options::heartbeat_limit`) above the longest job: a 15-minute job
    /// needs more than the default 5 minutes.
    pub fn heartbeat_every(self, every: Duration) -> IdempotencyLayer<S> {
        self.with(|c| c.heartbeat_every = (!every.is_zero()).then_some(every))
    }
}

/// A handle through which a running handler publishes the `Location` of
/// its job before it ends, so that a retry that finds the key still in
/// flight is answered with it (see
/// [`IdempotencyLayer::in_flight_status`]).
///
/// The layer puts one in the request extensions of every request whose key
/// it started, before it calls the handler (`Extension<InFlightLocation>`
/// in axum; `request.extensions().get::<InFlightLocation>()` elsewhere).
/// A handler that runs for the whole job sets the location as soon as it
/// knows it:
///
/// ```no_run
/// use axum::{Extension, http::{HeaderValue, StatusCode, header::LOCATION}};
/// use idemkv::http::InFlightLocation;
///
/// async fn transcode(Extension(location): Extension<InFlightLocation>) -> (StatusCode, [(axum::http::HeaderName, String); 1], &'static str) {
///     let job = "/jobs/7";
///     location.set(HeaderValue::from_static("/jobs/7"));
///     // ... fifteen minutes of work, the lease kept alive by the heartbeat ...
///     (StatusCode::CREATED, [(LOCATION, job.to_owned())], "transcoded")
/// }
/// ```
///
/// The location is held in the memory of the process that runs the
/// handler, for as long as the handler runs: a retry served by that
/// process while the key is in flight gets it. A retry served by another
/// process (another replica on the same store), or after the running
/// process crashed, gets the in-flight status and `Retry-After` without a
/// `Location`; a location that must survive that is better derived from
/// the request (say, `/jobs/{idempotency key}`). Once the handler has
/// answered, retries are replayed its stored response, with the
/// `Location` it carries.
#[derive(Clone, Debug, Default)]
pub struct InFlightLocation {
    slot: Arc<Mutex<Option<HeaderValue>>>,
}

impl InFlightLocation {
    /// Publishes `location` for retries of this request's key while the
    /// handler runs (replacing one set before).
    pub fn set(&self, location: HeaderValue) {
        *self.slot.lock() = Some(location);
    }

    /// The location set so far, if any.
    pub fn get(&self) -> Option<HeaderValue> {
        self.slot.lock().clone()
    }
}

/// The `(user, key)` of a record, as given to the engine.
type KeyOf = (Bytes, Bytes);

/// The locations published by the handlers this layer is running, by key.
///
/// # Invariants
/// An entry lives exactly as long as the [`Job`] that made it: a job
/// removes its own entry (same fencing token) when it ends or is dropped,
/// and never another job's.
#[derive(Debug, Default)]
pub(super) struct Locations {
    running: Mutex<HashMap<KeyOf, (u64, InFlightLocation)>>,
}

/// A started request's entry in [`Locations`], removed on drop.
pub(super) struct Job {
    /// `None`: nothing registered (the in-flight status shows no location).
    entry: Option<(Arc<Locations>, KeyOf, u64)>,
}

impl Job {
    /// Puts an [`InFlightLocation`] in `extensions` for the request whose
    /// key `(user, key)` was started with fencing token `token`, and, if
    /// the in-flight status can carry a `Location`, registers it so that
    /// retries see it while the returned job is alive.
    pub(super) fn start<St: IdempotencyStore>(
        config: &Config<St>,
        user: &Bytes,
        key: &Bytes,
        token: u64,
        extensions: &mut Extensions,
    ) -> Job {
        let location = InFlightLocation::default();
        extensions.insert(location.clone());
        if !shows_location(config.in_flight_status) {
            return Job { entry: None };
        }
        let id = (user.clone(), key.clone());
        let locations = Arc::clone(&config.locations);
        locations
            .running
            .lock()
            .insert(id.clone(), (token, location));
        Job {
            entry: Some((locations, id, token)),
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        if let Some((locations, id, token)) = self.entry.take() {
            let mut running = locations.running.lock();
            if running.get(&id).is_some_and(|(t, _)| *t == token) {
                running.remove(&id);
            }
        }
    }
}

/// Whether an in-flight answer with `status` carries a `Location`.
fn shows_location(status: StatusCode) -> bool {
    status.is_success() || status.is_redirection()
}

/// The answer to a request whose key `(user, key)` is in flight, its lease
/// ending in `retry_after`: `409` (the default), or the configured
/// in-flight status with `Retry-After` and the running handler's
/// `Location`.
pub(super) async fn in_flight<St: IdempotencyStore>(
    config: &Config<St>,
    user: &Bytes,
    key: &Bytes,
    retry_after: Duration,
) -> Response<Body> {
    let status = config.in_flight_status;
    if status == StatusCode::CONFLICT {
        return conflict(retry_after);
    }
    let body = format!(
        r#"{{"title":"Request in progress","status":{},"detail":"A request with this Idempotency-Key is still being processed; retry after Retry-After seconds."}}"#,
        status.as_u16()
    );
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    let content_type = if shows_location(status) {
        "application/json"
    } else {
        "application/problem+json"
    };
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        RETRY_AFTER,
        HeaderValue::from(retry_after_secs(retry_after)),
    );
    if shows_location(status)
        && let Some(location) = running_location(config, user, key).await
    {
        headers.insert(LOCATION, location);
    }
    response
}

/// The location published by the handler running `(user, key)` here, if
/// it still holds the key: a handler whose lease was taken over (by a
/// retry in another process, after its lease expired) no longer speaks for
/// the key.
async fn running_location<St: IdempotencyStore>(
    config: &Config<St>,
    user: &Bytes,
    key: &Bytes,
) -> Option<HeaderValue> {
    let id = (user.clone(), key.clone());
    let (token, location) = config.locations.running.lock().get(&id).cloned()?;
    let location = location.get()?;
    let view = config.store.get(user, key).await.ok()??;
    (view.state == RecordState::InProgress && view.token == token).then_some(location)
}
