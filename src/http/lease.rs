//! The lease of a started request: released if the request is dropped
//! before its handler is called ([`Claim`]), kept alive while the handler
//! runs and its body streams ([`Heartbeat`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::{AsyncEngine, Engine, Lease};

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
}

impl Claim {
    pub(super) fn new(engine: Arc<Engine>, lease: Lease) -> Claim {
        Claim {
            engine,
            lease,
            armed: true,
        }
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

/// Extends a lease every third of the engine's `lease_ttl` (by
/// `lease_ttl`) until it is stopped or dropped, or `limit` has passed since
/// it started, or an extend fails (the lease was lost, the engine failed).
///
/// # Invariants
/// After [`Heartbeat::stop`] returns, no extend of this heartbeat is
/// running or will run. Dropping it only asks the task to stop: an extend
/// already under way finishes (harmlessly: it fails once the lease is
/// completed or released).
pub(super) struct Heartbeat {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Heartbeat {
    /// Starts beating for `lease`; a zero `limit` starts nothing.
    pub(super) fn start(engine: &Arc<Engine>, lease: &Lease, limit: Duration) -> Heartbeat {
        if limit.is_zero() {
            return Heartbeat {
                stop: None,
                task: None,
            };
        }
        let (stop, mut stopped) = oneshot::channel::<()>();
        let ttl = engine.lease_ttl();
        let every = (ttl / 3).max(Duration::from_millis(1));
        let (engine, lease) = (AsyncEngine::new(Arc::clone(engine)), lease.clone());
        let task = tokio::spawn(async move {
            let started = Instant::now();
            loop {
                tokio::select! {
                    _ = &mut stopped => return,
                    () = tokio::time::sleep(every) => {}
                }
                if started.elapsed() >= limit {
                    return;
                }
                if engine.extend(&lease, ttl).await.is_err() {
                    return;
                }
            }
        });
        Heartbeat {
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops the heartbeat and waits for an extend in progress to end.
    pub(super) async fn stop(mut self) {
        drop(self.stop.take());
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        // Dropping the sender ends the task at its next wake-up.
        drop(self.stop.take());
    }
}
