//! Wake-ups for [`Engine::wait`](crate::Engine::wait) and the async waits:
//! a generation counter bumped by every completion and release, a condition
//! variable for blocking waiters, and wakers for futures.
//!
//! A waiter registers ([`Waiters::enter`]) before it reads the generation
//! and looks at the record, so a notifier that finds no waiter registered
//! ran before the waiter's look and the waiter sees the new state.
//!
//! A future ([`Change`]) registers its waker; a completion or release wakes
//! every registered future, and so does a ticker thread every
//! [`TICK`] while any future waits, because a lease's expiry and a wait's
//! timeout are only seen by looking again (the engine's clock may be a
//! manual one). The ticker holds no lock while it sleeps and stops with the
//! engine.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// How often waiting futures look again without a notification.
pub(crate) const TICK: Duration = Duration::from_millis(10);

/// The waiters of one engine.
#[derive(Debug, Default)]
pub(crate) struct Waiters {
    generation: Mutex<u64>,
    changed: Condvar,
    count: AtomicUsize,
    futures: Mutex<Futures>,
    /// Whether any future's waker is registered (so `notify` stays a
    /// single atomic load when nobody waits).
    any_future: std::sync::atomic::AtomicBool,
    tick: Condvar,
}

#[derive(Debug, Default)]
struct Futures {
    wakers: Vec<Waker>,
    stopped: bool,
    ticker: Option<JoinHandle<()>>,
}

/// Registration of one waiter; dropping it unregisters.
pub(crate) struct Waiting<'a>(&'a Waiters);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Waiters {
    /// Registers a waiter.
    pub fn enter(&self) -> Waiting<'_> {
        self.count.fetch_add(1, Ordering::SeqCst);
        Waiting(self)
    }

    /// The current generation.
    pub fn generation(&self) -> u64 {
        *self.generation.lock()
    }

    /// Sleeps until the generation moves past `seen`, or `at_most` passes.
    pub fn wait(&self, seen: u64, at_most: Duration) {
        let mut generation = self.generation.lock();
        if *generation == seen {
            let _ = self.changed.wait_for(&mut generation, at_most);
        }
    }

    /// Wakes every waiter, blocking or future; nearly free when nobody
    /// waits.
    pub fn notify(&self) {
        if self.count.load(Ordering::SeqCst) > 0 {
            *self.generation.lock() += 1;
            self.changed.notify_all();
        }
        self.wake_futures();
    }

    fn wake_futures(&self) {
        if !self.any_future.load(Ordering::SeqCst) {
            return;
        }
        let wakers = {
            let mut f = self.futures.lock();
            self.any_future.store(false, Ordering::SeqCst);
            std::mem::take(&mut f.wakers)
        };
        for w in wakers {
            w.wake();
        }
    }

    /// Registers a future's waker (woken by the next notification or tick),
    /// starting the ticker if needed. Returns false once stopped.
    fn register(self: &Arc<Self>, waker: &Waker) -> bool {
        let mut f = self.futures.lock();
        if f.stopped {
            return false;
        }
        if !f.wakers.iter().any(|w| w.will_wake(waker)) {
            f.wakers.push(waker.clone());
        }
        self.any_future.store(true, Ordering::SeqCst);
        if f.ticker.is_none() {
            let weak = Arc::downgrade(self);
            f.ticker = std::thread::Builder::new()
                .name("idemkv-tick".into())
                .spawn(move || tick(&weak))
                .ok();
        }
        drop(f);
        self.tick.notify_one();
        true
    }

    /// Stops the ticker and wakes every future (the engine closed).
    pub fn stop(&self) {
        let ticker = {
            let mut f = self.futures.lock();
            f.stopped = true;
            f.ticker.take()
        };
        self.tick.notify_all();
        self.wake_futures();
        if let Some(t) = ticker
            && t.thread().id() != std::thread::current().id()
        {
            let _ = t.join();
        }
    }
}

/// The ticker: while futures wait, wake them every [`TICK`].
fn tick(waiters: &std::sync::Weak<Waiters>) {
    loop {
        let Some(w) = waiters.upgrade() else { return };
        {
            let mut f = w.futures.lock();
            if f.stopped {
                return;
            }
            if f.wakers.is_empty() {
                w.tick.wait(&mut f);
                continue;
            }
            let _ = w.tick.wait_for(&mut f, TICK);
            if f.stopped {
                return;
            }
        }
        w.wake_futures();
    }
}

/// A future that resolves at the next completion or release of any key, the
/// next tick, or `deadline`, whichever comes first (it resolves at once if
/// the generation already moved past `seen`, or the waiters stopped).
pub(crate) struct Change {
    waiters: Arc<Waiters>,
    seen: u64,
    deadline: Instant,
    registered: bool,
}

impl Change {
    /// A wait for a change after generation `seen`, until `deadline`.
    pub fn new(waiters: &Arc<Waiters>, seen: u64, deadline: Instant) -> Change {
        Change {
            waiters: Arc::clone(waiters),
            seen,
            deadline,
            registered: false,
        }
    }
}

impl Future for Change {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // Woken after registering: a notification or a tick; look again.
        if self.registered || Instant::now() >= self.deadline {
            return Poll::Ready(());
        }
        let w = Arc::clone(&self.waiters);
        if !w.register(cx.waker()) || w.generation() != self.seen {
            return Poll::Ready(());
        }
        self.registered = true;
        Poll::Pending
    }
}
