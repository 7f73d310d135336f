//! [`IdempotencyStore`]: what a layer on top of idempotency records (the
//! HTTP layer, `http::IdempotencyLayer`, feature `http`)
//! asks of the store behind it: one local engine ([`AsyncEngine`]), or a
//! `cluster::Node` that forwards each call to the owner of the user's
//! partition.
//!
//! The calls are [`AsyncEngine`]'s, with its answers, errors and
//! invariants (see [`crate::Begin`] and the crate documentation): at most
//! one live lease per `(user, key)`, fencing tokens that strictly increase,
//! an exact replay only to the same fingerprint, and an `Ok` from `begin`'s
//! `Started` or from `complete` only once that state is durable. Beyond
//! them a store answers four things the HTTP layer needs:
//! [`lease_ttl`](IdempotencyStore::lease_ttl) (how far a heartbeat extends
//! a lease), and three provided methods a store may refine:
//! [`begin_waited`](IdempotencyStore::begin_waited),
//! [`heartbeat`](IdempotencyStore::heartbeat) and
//! [`release_now`](IdempotencyStore::release_now).
//!
//! # What the HTTP layer makes of a store's errors
//! - [`Error::InvalidKey`](crate::Error::InvalidKey) with [`KeyPart::User`](crate::KeyPart::User):
//!   `400` ("User id is invalid"); with [`KeyPart::Key`](crate::KeyPart::Key):
//!   `400` (the key is invalid). A store checks the lengths it accepts and
//!   answers with this error, never another, for a key or user id it refuses.
//! - [`Error::ResponseTooLarge`](crate::Error::ResponseTooLarge) from `complete`: the layer completes again
//!   with smaller forms (the response stored as not kept).
//! - Any other error from `begin`: `503`; from `complete`: the response is
//!   sent but not stored, and the key is left to its lease.

use std::future::Future;
use std::time::Duration;

use crate::engine::AsyncEngine;
use crate::error::Result;
use crate::heartbeat::Heartbeat;
use crate::outcome::{Begin, Fingerprint, Lease, Outcome, RecordView};

/// A store of idempotency records, as the HTTP layer uses it: the calls of
/// [`AsyncEngine`] (which implements it by delegating to its own methods),
/// as futures that are `Send`, so a layer can run them on any task.
///
/// Implemented by [`AsyncEngine`] and (issue 15) the cluster's `Node`; a
/// wrapper (metrics, fault injection in tests) implements it by
/// delegating. Clones share the store (a clone per request must be cheap:
/// an `Arc`).
///
/// Every method answers as the [`AsyncEngine`] method of the same name
/// does (see the [module documentation](self) for the errors the HTTP
/// layer tells apart). A call must not park the thread that polls it (on an
/// fsync, a network round trip or a wait for an in-flight key): the HTTP
/// layer polls these futures on its runtime's worker threads.
pub trait IdempotencyStore: Clone + Send + Sync + 'static {
    /// Begins `(user, key)` for a request with `fingerprint`: `Started`
    /// (this caller owns the key, under a lease of
    /// [`lease_ttl`](Self::lease_ttl)), `Replay`, `InFlight` or `Mismatch`,
    /// as [`AsyncEngine::begin`].
    ///
    /// Cancellation: a future dropped after the store granted a lease but
    /// before it resolved should release that lease (the caller never saw
    /// it, so no work ran); otherwise the key stays claimed until the lease
    /// expires.
    ///
    /// # Errors
    /// As [`AsyncEngine::begin`]: [`Error::InvalidKey`](crate::Error::InvalidKey) for a key or user
    /// id the store refuses; a store failure ([`Error::Closed`](crate::Error::Closed),
    /// [`Error::Io`](crate::Error::Io), ...) otherwise.
    fn begin(
        &self,
        user: &[u8],
        key: &[u8],
        fingerprint: Fingerprint,
    ) -> impl Future<Output = Result<Begin>> + Send;

    /// [`begin`](Self::begin), but while another live lease holds the key,
    /// waits (holding no thread) up to `timeout` of wall time for it to
    /// end; `InFlight` only once `timeout` has passed, as
    /// [`AsyncEngine::begin_wait`].
    ///
    /// # Errors
    /// As [`begin`](Self::begin).
    fn begin_wait(
        &self,
        user: &[u8],
        key: &[u8],
        fingerprint: Fingerprint,
        timeout: Duration,
    ) -> impl Future<Output = Result<Begin>> + Send;

    /// Waits (holding no thread) up to `timeout` for `(user, key)` to be
    /// completed for `fingerprint`: its outcome, or `None` once the record
    /// ends otherwise or `timeout` passes, as [`AsyncEngine::wait`].
    ///
    /// # Errors
    /// As [`AsyncEngine::wait`].
    fn wait(
        &self,
        user: &[u8],
        key: &[u8],
        fingerprint: Fingerprint,
        timeout: Duration,
    ) -> impl Future<Output = Result<Option<Outcome>>> + Send;

    /// Stores `outcome` for the key `lease` owns, kept for the store's
    /// record TTL, as [`AsyncEngine::complete`]: `Ok` once it is durable.
    ///
    /// # Errors
    /// As [`AsyncEngine::complete`]: [`Error::LeaseLost`](crate::Error::LeaseLost) for a lease that
    /// no longer owns its key (expired and taken over, completed,
    /// released); [`Error::ResponseTooLarge`](crate::Error::ResponseTooLarge) for an outcome over the
    /// store's limit; a store failure otherwise.
    fn complete(&self, lease: &Lease, outcome: Outcome) -> impl Future<Output = Result<()>> + Send;

    /// [`complete`](Self::complete), kept for `ttl` instead of the store's
    /// record TTL (the HTTP layer's derived keys), as
    /// [`AsyncEngine::complete_with_ttl`].
    ///
    /// # Errors
    /// As [`complete`](Self::complete).
    fn complete_with_ttl(
        &self,
        lease: &Lease,
        outcome: Outcome,
        ttl: Duration,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Forgets the key `lease` owns, so that a retry runs the work again,
    /// as [`AsyncEngine::release`].
    ///
    /// # Errors
    /// As [`AsyncEngine::release`]: [`Error::LeaseLost`](crate::Error::LeaseLost); a store failure.
    fn release(&self, lease: &Lease) -> impl Future<Output = Result<()>> + Send;

    /// Moves the deadline of `lease` to `by` from now and returns the
    /// updated lease (same token), as [`AsyncEngine::extend`].
    ///
    /// # Errors
    /// As [`AsyncEngine::extend`]: [`Error::LeaseLost`](crate::Error::LeaseLost) for a lease that
    /// no longer owns its key, completed or released included (so an
    /// extend that arrives after the key's `complete` changes nothing);
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) for a zero `by`; a store failure.
    fn extend(&self, lease: &Lease, by: Duration) -> impl Future<Output = Result<Lease>> + Send;

    /// The stored outcome of `(user, key)`, if it is completed, as
    /// [`AsyncEngine::outcome`].
    ///
    /// # Errors
    /// As [`AsyncEngine::outcome`].
    fn outcome(
        &self,
        user: &[u8],
        key: &[u8],
    ) -> impl Future<Output = Result<Option<Outcome>>> + Send;

    /// What the store holds for `(user, key)` (state, token, deadline), if
    /// it is live, as [`AsyncEngine::get`]. The HTTP layer asks it before
    /// it shows a running handler's `Location`: the handler must still hold
    /// the key (same token, in progress).
    ///
    /// # Errors
    /// As [`AsyncEngine::get`].
    fn get(
        &self,
        user: &[u8],
        key: &[u8],
    ) -> impl Future<Output = Result<Option<RecordView>>> + Send;

    /// The lease TTL the store grants: a heartbeat extends a lease by it,
    /// and the HTTP layer's heartbeat runs every third of it by default.
    /// A store must answer it because only the store knows how long its
    /// leases last.
    fn lease_ttl(&self) -> Duration;

    /// [`begin_wait`](Self::begin_wait), and whether it waited: `true` once
    /// a `begin` found the key in flight and the call waited for it. The
    /// HTTP layer needs it for its replay hook
    /// (`http::Replay::waited`); with a zero
    /// `timeout` it is `begin`.
    ///
    /// Provided: `begin`, then, if that found the key in flight and
    /// `timeout` is not zero, `begin_wait` (answering `true`).
    /// [`AsyncEngine`] answers it in one call.
    ///
    /// # Errors
    /// As [`begin`](Self::begin).
    fn begin_waited(
        &self,
        user: &[u8],
        key: &[u8],
        fingerprint: Fingerprint,
        timeout: Duration,
    ) -> impl Future<Output = Result<(Begin, bool)>> + Send {
        async move {
            let answer = self.begin(user, key, fingerprint).await?;
            if timeout.is_zero() || !matches!(answer, Begin::InFlight { .. }) {
                return Ok((answer, false));
            }
            let answer = self.begin_wait(user, key, fingerprint, timeout).await?;
            Ok((answer, true))
        }
    }

    /// Keeps `lease` alive for long work, if the store has a heartbeat of
    /// its own: extends it (by [`lease_ttl`](Self::lease_ttl)) every
    /// `every` until the returned guard is stopped or dropped, an extend
    /// fails, or `limit` has passed (a zero `every` or `limit` starts
    /// nothing). Once the guard's stop returns, no extend of the lease
    /// should start (one sent before may still arrive: `extend` after
    /// `complete` or `release` is [`Error::LeaseLost`](crate::Error::LeaseLost), so it changes
    /// nothing).
    ///
    /// Provided: `None`, "no heartbeat of its own": the caller keeps the
    /// lease alive itself with [`extend`](Self::extend) (the HTTP layer
    /// runs a tokio task that does). [`AsyncEngine`] answers with the
    /// engine's heartbeat thread ([`Engine::heartbeat`](crate::Engine::heartbeat),
    /// capped by its `Options::heartbeat_limit` too), which serves every
    /// lease with no task or timer per request.
    fn heartbeat(&self, lease: &Lease, every: Duration, limit: Duration) -> Option<KeepAlive> {
        let _ = (lease, every, limit);
        None
    }

    /// Releases `lease` from synchronous code, without waiting for the
    /// release to be durable, and answers `true`; or answers `false` (the
    /// provided answer) when the store can only release asynchronously.
    /// The HTTP layer calls it when a request is dropped after its key was
    /// claimed but before its handler ran (a `Drop`, which cannot await);
    /// on `false` it spawns [`release`](Self::release) on its tokio
    /// runtime. A failed release is not reported: the lease then expires.
    ///
    /// [`AsyncEngine`] appends the release record at once (the next sync
    /// makes it durable; if a crash takes it back, the lease expires).
    fn release_now(&self, lease: &Lease) -> bool {
        let _ = lease;
        false
    }
}

/// A running heartbeat ([`IdempotencyStore::heartbeat`]): while it is
/// alive, the store keeps extending the lease. Dropping it, or
/// [`KeepAlive::stop`], ends it. `Send`.
#[must_use = "the heartbeat stops when the guard is dropped"]
pub struct KeepAlive {
    stop: Option<Stop>,
}

/// How a [`KeepAlive`] ends its heartbeat.
enum Stop {
    /// The engine's heartbeat thread: dropping the handle waits for an
    /// extend under way, then unregisters it.
    Engine(Heartbeat),
    /// Any other heartbeat: its own stop.
    Custom(Box<dyn FnOnce() + Send>),
}

impl KeepAlive {
    /// A heartbeat that `stop` ends: called once, when the guard is
    /// stopped or dropped. For a store whose heartbeat is its own (a task,
    /// a thread, a remote registration).
    pub fn new(stop: impl FnOnce() + Send + 'static) -> KeepAlive {
        KeepAlive {
            stop: Some(Stop::Custom(Box::new(stop))),
        }
    }

    /// A guard with nothing to stop (no heartbeat was started: a zero
    /// interval or limit, a closed store).
    pub fn inert() -> KeepAlive {
        KeepAlive { stop: None }
    }

    /// Ends the heartbeat; the same as dropping the guard. For the
    /// engine's heartbeat, no extend of the lease runs once this returns.
    pub fn stop(self) {
        drop(self);
    }
}

impl From<Heartbeat> for KeepAlive {
    /// The engine's heartbeat ([`Engine::heartbeat`](crate::Engine::heartbeat))
    /// as a guard.
    fn from(heartbeat: Heartbeat) -> KeepAlive {
        KeepAlive {
            stop: Some(Stop::Engine(heartbeat)),
        }
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        match self.stop.take() {
            Some(Stop::Engine(heartbeat)) => heartbeat.stop(),
            Some(Stop::Custom(stop)) => stop(),
            None => {}
        }
    }
}

impl std::fmt::Debug for KeepAlive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.stop {
            Some(Stop::Engine(_)) => "engine",
            Some(Stop::Custom(_)) => "custom",
            None => "inert",
        };
        f.debug_tuple("KeepAlive").field(&kind).finish()
    }
}

/// The local engine as a store: every call is [`AsyncEngine`]'s own.
impl IdempotencyStore for AsyncEngine {
    fn begin(
        &self,
        user: &[u8],
        key: &[u8],
        fingerprint: Fingerprint,
    ) -> impl Future<Output = Result<Begin>> + Send {
        AsyncEngine::begin(self, user, key, fingerprint)
    }

    fn begin_wait(
        &self,
        user: &[u8],
        key: &[u8],
        fingerprint: Fingerprint,
        timeout: Duration,
    ) -> impl Future<Output = Result<Begin>> + Send {
        AsyncEngine::begin_wait(self, user, key, fingerprint, timeout)
    }

    fn wait(
        &self,
        user: &[u8],
        key: &[u8],
        fingerprint: Fingerprint,
        timeout: Duration,
    ) -> impl Future<Output = Result<Option<Outcome>>> + Send {
        AsyncEngine::wait(self, user, key, fingerprint, timeout)
    }

    fn complete(&self, lease: &Lease, outcome: Outcome) -> impl Future<Output = Result<()>> + Send {
        AsyncEngine::complete(self, lease, outcome)
    }

    fn complete_with_ttl(
        &self,
        lease: &Lease,
        outcome: Outcome,
        ttl: Duration,
    ) -> impl Future<Output = Result<()>> + Send {
        AsyncEngine::complete_with_ttl(self, lease, outcome, ttl)
    }

    fn release(&self, lease: &Lease) -> impl Future<Output = Result<()>> + Send {
        AsyncEngine::release(self, lease)
    }

    fn extend(&self, lease: &Lease, by: Duration) -> impl Future<Output = Result<Lease>> + Send {
        AsyncEngine::extend(self, lease, by)
    }

    fn outcome(
        &self,
        user: &[u8],
        key: &[u8],
    ) -> impl Future<Output = Result<Option<Outcome>>> + Send {
        AsyncEngine::outcome(self, user, key)
    }

    fn get(
        &self,
        user: &[u8],
        key: &[u8],
    ) -> impl Future<Output = Result<Option<RecordView>>> + Send {
        AsyncEngine::get(self, user, key)
    }

    fn lease_ttl(&self) -> Duration {
        self.engine().lease_ttl()
    }

    fn begin_waited(
        &self,
        user: &[u8],
        key: &[u8],
        fingerprint: Fingerprint,
        timeout: Duration,
    ) -> impl Future<Output = Result<(Begin, bool)>> + Send {
        AsyncEngine::begin_waited(self, user, key, fingerprint, timeout)
    }

    fn heartbeat(&self, lease: &Lease, every: Duration, limit: Duration) -> Option<KeepAlive> {
        Some(self.engine().heartbeat_within(lease, every, limit).into())
    }

    fn release_now(&self, lease: &Lease) -> bool {
        let _ = self.engine().release_unsynced(lease);
        true
    }
}
