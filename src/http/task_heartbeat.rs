//! The heartbeat of a store that has none of its own
//! ([`IdempotencyStore::heartbeat`] answers `None`: a remote store, a
//! wrapper): a tokio task per running request that calls
//! [`IdempotencyStore::extend`].
//!
//! An [`AsyncEngine`](crate::AsyncEngine) never comes here: the engine's
//! heartbeat thread serves all its leases with no task or timer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::store::KeepAlive;
use crate::{IdempotencyStore, Lease};

/// Starts a task on the current tokio runtime that extends `lease` (by the
/// store's `lease_ttl`) every `every` of real time, with the lease each
/// extend returns, until the guard is stopped or dropped, an extend fails,
/// or `limit` has passed since now (as the engine's heartbeat: no extend
/// at or after the limit). A zero `every`, `limit` or `lease_ttl`, or no
/// runtime, starts nothing (the lease lasts `lease_ttl`).
///
/// Stopping marks the task stopped (it starts no extend afterwards) and
/// aborts it; an extend already sent may still reach the store after the
/// request's `complete`, where it is refused (`LeaseLost`) and changes
/// nothing. The task needs the runtime's time driver (`enable_time`, which
/// `#[tokio::main]` turns on); without it the task ends at its first sleep
/// and the lease lasts `lease_ttl`.
pub(super) fn start<St: IdempotencyStore>(
    store: &St,
    lease: &Lease,
    every: Duration,
    limit: Duration,
) -> KeepAlive {
    let by = store.lease_ttl();
    if every.is_zero() || limit.is_zero() || by.is_zero() {
        return KeepAlive::inert();
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return KeepAlive::inert();
    };
    let stopped = Arc::new(AtomicBool::new(false));
    let beat = Beat {
        store: store.clone(),
        lease: lease.clone(),
        every,
        by,
        until: later(Instant::now(), limit),
        stopped: Arc::clone(&stopped),
    };
    let task = runtime.spawn(beat.run());
    KeepAlive::new(move || {
        stopped.store(true, Ordering::Release);
        task.abort();
    })
}

/// One request's heartbeat task.
struct Beat<St> {
    store: St,
    lease: Lease,
    every: Duration,
    /// How far each extend moves the deadline: the store's `lease_ttl`.
    by: Duration,
    /// No extend starts at or after this instant.
    until: Instant,
    /// Set by the guard's stop.
    stopped: Arc<AtomicBool>,
}

impl<St: IdempotencyStore> Beat<St> {
    /// Sleeps `every` (or until the limit), extends, repeats; ends at the
    /// limit, on a stop, or when an extend fails (the request's own
    /// `complete` or `release` reports a lost lease).
    async fn run(mut self) {
        loop {
            let next = later(Instant::now(), self.every).min(self.until);
            tokio::time::sleep_until(next).await;
            if Instant::now() >= self.until || self.stopped.load(Ordering::Acquire) {
                return;
            }
            match self.store.extend(&self.lease, self.by).await {
                Ok(extended) => self.lease = extended,
                Err(_) => return,
            }
        }
    }
}

/// `now + d`, or about 34 years from now if that overflows.
fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(1 << 30)))
        .unwrap_or(now)
}
