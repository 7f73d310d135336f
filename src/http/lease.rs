//! The lease of a started request: released if the request is dropped
//! before its handler is called ([`Claim`]), kept alive while the handler
//! runs and its body streams ([`heartbeat`]: the store's own heartbeat,
//! the engine's heartbeat thread for an [`AsyncEngine`](crate::AsyncEngine),
//! else a tokio task, `task_heartbeat.rs`).

use std::time::Duration;

use super::task_heartbeat;
use crate::store::KeepAlive;
use crate::{IdempotencyStore, Lease};

/// A lease whose handler has not been called yet.
///
/// Dropping an armed claim releases the key at once: the request went away
/// before any work began, so a retry must be able to run. The store
/// releases it from the drop if it can
/// ([`IdempotencyStore::release_now`]: the engine appends the release
/// record and does not wait for its fsync); otherwise the release runs on a
/// task of the current tokio runtime (none: the lease expires).
/// [`Claim::into_lease`] disarms it just before the handler is called. A
/// request dropped while its `begin` is still waiting for the lease's
/// fsync is covered by [`AsyncEngine::begin`](crate::AsyncEngine::begin),
/// which releases a lease it granted but never handed out.
pub(super) struct Claim<St: IdempotencyStore> {
    store: St,
    lease: Lease,
    armed: bool,
    /// The record TTL its response is stored with (`None`: the store's).
    pub(super) record_ttl: Option<Duration>,
}

impl<St: IdempotencyStore> Claim<St> {
    pub(super) fn new(store: St, lease: Lease) -> Claim<St> {
        Claim {
            store,
            lease,
            armed: true,
            record_ttl: None,
        }
    }

    /// Stores the response with `ttl` (`None`: the store's `record_ttl`).
    pub(super) fn record_ttl(mut self, ttl: Option<Duration>) -> Claim<St> {
        self.record_ttl = ttl;
        self
    }

    /// The lease (still released on drop).
    pub(super) fn lease(&self) -> &Lease {
        &self.lease
    }

    /// The lease, no longer released on drop: its handler is about to run.
    pub(super) fn into_lease(mut self) -> Lease {
        self.armed = false;
        self.lease.clone()
    }
}

impl<St: IdempotencyStore> Drop for Claim<St> {
    fn drop(&mut self) {
        if !self.armed || self.store.release_now(&self.lease) {
            return;
        }
        // A store that releases only asynchronously: on a task. A failed
        // release (or no runtime) leaves the lease to expire.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (store, lease) = (self.store.clone(), self.lease.clone());
            runtime.spawn(async move {
                let _ = store.release(&lease).await;
            });
        }
    }
}

/// Starts the heartbeat of a request whose handler is about to run: every
/// `every` (by default a third of the store's `lease_ttl`; see
/// `IdempotencyLayer::heartbeat_every`) the lease is extended (by
/// `lease_ttl`) until the guard is stopped or dropped, an extend fails
/// (the lease was lost, the store failed or closed), or `limit` has passed.
/// A zero `limit` starts nothing. The store's own heartbeat does it if it
/// has one ([`IdempotencyStore::heartbeat`]; the engine's heartbeat thread,
/// capped by `Options::heartbeat_limit` too, no tokio task or timer), else
/// a tokio task ([`task_heartbeat::start`]).
pub(super) fn heartbeat<St: IdempotencyStore>(
    store: &St,
    lease: &Lease,
    every: Option<Duration>,
    limit: Duration,
) -> KeepAlive {
    let ttl = store.lease_ttl();
    let every = every.unwrap_or_else(|| (ttl / 3).max(Duration::from_millis(1)));
    match store.heartbeat(lease, every, limit) {
        Some(heartbeat) => heartbeat,
        None => task_heartbeat::start(store, lease, every, limit),
    }
}
