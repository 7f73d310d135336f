//! Wake-ups for [`Engine::wait`](crate::Engine::wait): a generation counter
//! bumped by every completion and release, and a condition variable.
//!
//! A waiter registers ([`Waiters::enter`]) before it reads the generation
//! and looks at the record, so a notifier that finds no waiter registered
//! ran before the waiter's look and the waiter sees the new state.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

/// The waiters of one engine.
#[derive(Debug, Default)]
pub(crate) struct Waiters {
    generation: Mutex<u64>,
    changed: Condvar,
    count: AtomicUsize,
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

    /// Wakes every waiter; nearly free when nobody waits.
    pub fn notify(&self) {
        if self.count.load(Ordering::SeqCst) > 0 {
            *self.generation.lock() += 1;
            self.changed.notify_all();
        }
    }
}
