//! The lease of a started request: released if the request is dropped
//! before its handler is called ([`Claim`]), kept alive while the handler
//! runs and its body streams ([`heartbeat`], on the engine's heartbeat
//! thread).

use std::sync::Arc;
use std::time::Duration;

use crate::{Engine, Heartbeat, Lease};

/// A lease whose handler has not been called yet.
///
/// Dropping an armed claim releases the key at once (its record appended;
/// the fsync is not waited for): the request went away before any work
/// began, so a retry must be able to run. [`Claim::into_lease`] disarms it
/// just before the handler is called. A request dropped while its `begin`
/// is still waiting for the lease's fsync is covered by
/// [`AsyncEngine::begin`](crate::AsyncEngine::begin), which releases a lease
/// it granted but never handed out.
pub(super) struct Claim {
    engine: Arc<Engine>,
    lease: Lease,
    armed: bool,
    /// The record TTL its response is stored with (`None`: the engine's).
    pub(super) record_ttl: Option<Duration>,
}

impl Claim {
    pub(super) fn new(engine: Arc<Engine>, lease: Lease) -> Claim {
        Claim {
            engine,
            lease,
            armed: true,
            record_ttl: None,
        }
    }

    /// Stores the response with `ttl` (`None`: the engine's `record_ttl`).
    pub(super) fn record_ttl(mut self, ttl: Option<Duration>) -> Claim {
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

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // The release record is appended now (no fsync is waited for: if a
        // crash takes it back, the lease expires on its own). A failed
        // release leaves the lease to expire too.
        let _ = self.engine.release_unsynced(&self.lease);
    }
}

/// Starts the heartbeat of a request whose handler is about to run: every
/// `every` (by default a third of the engine's `lease_ttl`; see
/// `IdempotencyLayer::heartbeat_every`), the engine's heartbeat thread extends
/// the lease (by `lease_ttl`) until the handle is stopped or dropped, an
/// extend fails (the lease was lost, the engine failed or closed), or
/// `limit` (capped by the engine's `Options::heartbeat_limit`) has passed.
/// A zero `limit` starts nothing. No tokio task or timer is involved.
pub(super) fn heartbeat(
    engine: &Engine,
    lease: &Lease,
    every: Option<Duration>,
    limit: Duration,
) -> Heartbeat {
    let every = every.unwrap_or_else(|| (engine.lease_ttl() / 3).max(Duration::from_millis(1)));
    engine.heartbeat_within(lease, every, limit)
}
