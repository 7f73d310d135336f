//! The syncer: the log's own thread that fdatasyncs for futures.
//!
//! A [`Durable`] future registers its position and waker; the syncer thread
//! (started by the first registration) syncs everything appended so far
//! through the same group commit as blocking callers (so both share
//! fdatasyncs), then wakes every future its sync covered. No future ever
//! blocks the thread that polls it: that is what lets the async engine run
//! on any executor (tokio, smol, a plain `block_on`) without a blocking pool.
//!
//! # Invariants
//! - A future resolves `Ok` only once `Log::is_durable` says its position
//!   is durable (under `Durability::Sync`; other modes resolve at once).
//! - After a failed sync every registered future is woken and resolves with
//!   the error ([`Error::Poisoned`]); after `close` a future whose position
//!   is not durable resolves with [`Error::Closed`]. No waker is lost: a
//!   future re-checks after registering.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};

use super::Log;
use crate::error::{Error, Result};

/// The futures waiting for a sync, and the thread that serves them.
#[derive(Debug, Default)]
pub(crate) struct Syncer {
    state: Mutex<SyncerState>,
    wake: Condvar,
    /// Set by `Log::close` (under the state lock, so that a registration
    /// and the thread see it in order with the waiters): the thread ends,
    /// waking everyone.
    stopped: AtomicBool,
    /// Set when no thread could be started (futures then sync inline).
    unavailable: AtomicBool,
}

#[derive(Debug, Default)]
struct SyncerState {
    /// Registered futures: position and waker.
    waiting: Vec<(u64, Waker)>,
    thread: Option<JoinHandle<()>>,
    /// The thread sleeps for want of waiters: a registration wakes it (and
    /// only then, so a crowd of futures costs one wake-up, not one each).
    idle: bool,
}

impl Syncer {
    /// Registers a waker for position `at`, starting the thread if needed.
    fn register(&self, log: &Arc<Log>, at: u64, waker: &Waker) {
        let mut s = self.state.lock();
        if self.stopped.load(Ordering::Acquire) {
            drop(s);
            waker.wake_by_ref();
            return;
        }
        s.waiting.push((at, waker.clone()));
        if s.thread.is_none() {
            let weak = Arc::downgrade(log);
            s.thread = std::thread::Builder::new()
                .name("idemkv-sync".into())
                .spawn(move || run(&weak))
                .ok();
            if s.thread.is_none() {
                // No thread: wake the future, which then syncs inline.
                self.unavailable.store(true, Ordering::Release);
                drop(s);
                waker.wake_by_ref();
                return;
            }
        }
        let idle = std::mem::replace(&mut s.idle, false);
        drop(s);
        if idle {
            self.wake.notify_one();
        }
    }

    /// Whether the thread could not be started (futures then sync inline).
    fn unavailable(&self) -> bool {
        self.unavailable.load(Ordering::Acquire)
    }

    /// Stops the thread, waking every registered future; joins it.
    pub fn stop(&self) {
        let (waiting, thread) = {
            let mut s = self.state.lock();
            self.stopped.store(true, Ordering::Release);
            (std::mem::take(&mut s.waiting), s.thread.take())
        };
        self.wake.notify_all();
        for (_, w) in waiting {
            w.wake();
        }
        if let Some(t) = thread
            && t.thread().id() != std::thread::current().id()
        {
            let _ = t.join();
        }
    }
}

/// The syncer thread: sleep until a future waits, sync what was appended,
/// wake the futures that sync covered (all of them after a failure).
fn run(log: &Weak<Log>) {
    let mut last_round = 0usize;
    loop {
        let Some(log) = log.upgrade() else { return };
        {
            let mut s = log.syncer.state.lock();
            while s.waiting.is_empty() && !log.syncer.stopped.load(Ordering::Acquire) {
                s.idle = true;
                log.syncer.wake.wait(&mut s);
            }
            s.idle = false;
            if log.syncer.stopped.load(Ordering::Acquire) {
                return;
            }
        }
        // Postgres' `commit_delay` / `commit_siblings`: under load (the
        // last round woke `SIBLINGS` futures or more), wait a little before
        // syncing, so one fdatasync covers more records (an fdatasync costs
        // the VM tens of microseconds of CPU; under load CPU is what runs
        // out). Measured with `benches/http_load.sh`'s fresh keys, 256
        // connections: 29-35 k requests/s with 150-300 µs against 28-30 k
        // without (noisy, one session); `begin_complete_async`: 64 tasks
        // 44.4 k pairs/s against 46.8 k without, 4 096 tasks 326 k against
        // 317 k. Idle, a lone future waits no more.
        if last_round >= SIBLINGS {
            std::thread::sleep(COMMIT_DELAY);
        }
        let end = log.written.load(std::sync::atomic::Ordering::Acquire);
        let result = log.sync_past(end.saturating_sub(1));
        // A failed sync ends every wait, also one this thread did not run:
        // a round led by a blocking caller that failed cut the log back to
        // its durable end, so `sync_past` of that end answers `Ok` while the
        // futures whose records it dropped can never become durable.
        let failed = result.is_err() || log.is_poisoned();
        let ready: Vec<Waker> = {
            let mut s = log.syncer.state.lock();
            let mut ready = Vec::new();
            s.waiting.retain(|(at, w)| {
                let done = failed || log.is_durable(*at);
                if done {
                    ready.push(w.clone());
                }
                !done
            });
            ready
        };
        last_round = ready.len();
        for w in ready {
            w.wake();
        }
    }
}

/// Futures a round must have woken for the next one to wait
/// [`COMMIT_DELAY`] first.
const SIBLINGS: usize = 8;

/// How long the syncer waits before a round under load.
const COMMIT_DELAY: std::time::Duration = std::time::Duration::from_micros(200);

/// A future that resolves once the record at a log position is as durable
/// as the engine's mode promises (see the module docs). Dropping it changes
/// nothing: the record was appended already and becomes durable with the
/// next sync (or is lost in a crash, like any record not yet acknowledged).
#[derive(Debug)]
pub(crate) struct Durable {
    log: Arc<Log>,
    at: u64,
    /// The waker last registered: a poll with a waker that would wake the
    /// same task does not register again (the syncer wakes a registered
    /// future only once its position is durable or the log failed).
    registered: Option<Waker>,
}

impl Durable {
    /// Waits for position `at` of `log`.
    pub fn new(log: &Arc<Log>, at: u64) -> Durable {
        Durable {
            log: Arc::clone(log),
            at,
            registered: None,
        }
    }

    fn check(&self) -> Option<Result<()>> {
        if self.log.is_durable_enough(self.at) {
            return Some(Ok(()));
        }
        if let Err(e) = self.log.check_poison() {
            return Some(Err(e));
        }
        if self.log.syncer.stopped.load(Ordering::Acquire) {
            return Some(Err(Error::Closed));
        }
        None
    }
}

impl Future for Durable {
    type Output = Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        if let Some(done) = self.check() {
            return Poll::Ready(done);
        }
        if self
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            return Poll::Pending;
        }
        self.log.syncer.register(&self.log, self.at, cx.waker());
        self.registered = Some(cx.waker().clone());
        if self.log.syncer.unavailable() {
            // No syncer thread could be started: sync here.
            return Poll::Ready(self.log.wait_durable(self.at));
        }
        // Re-check: the sync may have landed between the check and the
        // registration.
        match self.check() {
            Some(done) => Poll::Ready(done),
            None => Poll::Pending,
        }
    }
}
