//! Lease heartbeats: the engine's own thread extends registered leases.
//!
//! [`Engine::heartbeat`](crate::Engine::heartbeat) registers a lease with
//! [`Heartbeats`]; one thread per engine ("idemkv-heartbeat", started by the
//! first registration, joined by `Engine::close`) keeps the registrations in
//! a map ordered by when each is next due, sleeps on a condition variable
//! until the first is due (or a new registration or a stop wakes it), and
//! extends that lease through the owner write (`owner.rs`, [`Beat`]). A
//! thousand heartbeats are a thousand map entries, not a thousand threads
//! or tasks, and sync, async and HTTP callers share them.
//!
//! Locks: the schedule's lock, then a registration's `phase` lock, never the
//! other way round. Neither is held across an extend: the thread marks the
//! registration [`Phase::Extending`], lets go of both, extends (an append
//! under the shard lock; a segment roll at worst), then reschedules it.
//!
//! # Invariants
//! - After [`Heartbeat::stop`] (or the handle's drop) returns, no extend of
//!   that registration is running or will start: stop waits, on the
//!   registration's own condition variable and holding no other lock, for
//!   an extend in progress to end, then marks it stopped; the thread never
//!   extends a stopped registration.
//! - No registration is extended past `limit` after it was made, or after
//!   an extend of it failed, or once the engine closed.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::engine::Beat;
use crate::outcome::Lease;

/// The heartbeats of one engine, and the thread that serves them.
#[derive(Debug, Default)]
pub(crate) struct Heartbeats {
    schedule: Mutex<Schedule>,
    /// Wakes the thread: a registration or a stop.
    wake: Condvar,
}

#[derive(Debug, Default)]
struct Schedule {
    /// Running registrations by when they are next due (ties broken by id).
    due: BTreeMap<(Instant, u64), Arc<Registration>>,
    next_id: u64,
    /// Set by `Engine::close`: the thread ends, and no registration starts.
    stopped: bool,
    thread: Option<JoinHandle<()>>,
    /// How the thread sleeps now: `None` while it runs (it looks at the
    /// schedule before it sleeps again), `Some(None)` with nothing due,
    /// `Some(Some(t))` until `t`. A registration wakes it only if it is
    /// due before then: most handlers end long before their first beat, so
    /// a registration does not cost the thread a wake-up.
    sleeping: Option<Option<Instant>>,
}

/// One registered lease.
#[derive(Debug)]
struct Registration {
    id: u64,
    lease: Lease,
    every: Duration,
    /// When the registration stops: made plus the limit.
    until: Instant,
    phase: Mutex<Phase>,
    /// Signalled when an extend of this registration ends.
    idle: Condvar,
}

/// Where a registration is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// In the schedule, due at this instant.
    Waiting(Instant),
    /// Taken out of the schedule by the thread: being extended.
    Extending,
    /// Ended for good (stopped, failed, past its limit, engine closed).
    Stopped,
}

/// `now + d`, or about 34 years from now if that overflows.
fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(1 << 30)))
        .unwrap_or(now)
}

impl Heartbeats {
    /// Registers `lease`, to be extended every `every` until `limit` has
    /// passed, starting the thread (which extends through `beat()`) if
    /// needed. An engine whose heartbeats stopped, or whose thread cannot be
    /// started, gives an inert handle.
    pub fn register(
        self: &Arc<Self>,
        lease: &Lease,
        every: Duration,
        limit: Duration,
        beat: impl FnOnce() -> Beat,
    ) -> Heartbeat {
        let now = Instant::now();
        let until = later(now, limit);
        let first = later(now, every).min(until);
        let mut s = self.schedule.lock();
        if s.stopped {
            return Heartbeat::inert();
        }
        if s.thread.is_none() {
            let (weak, beat) = (Arc::downgrade(self), beat());
            s.thread = std::thread::Builder::new()
                .name("idemkv-heartbeat".into())
                .spawn(move || run(&weak, &beat))
                .ok();
            if s.thread.is_none() {
                return Heartbeat::inert();
            }
        }
        let id = s.next_id;
        s.next_id += 1;
        let registration = Arc::new(Registration {
            id,
            lease: lease.clone(),
            every,
            until,
            phase: Mutex::new(Phase::Waiting(first)),
            idle: Condvar::new(),
        });
        s.due.insert((first, id), Arc::clone(&registration));
        let wake = match s.sleeping {
            None => false,
            Some(None) => true,
            Some(Some(until)) => first < until,
        };
        drop(s);
        if wake {
            self.wake.notify_one();
        }
        Heartbeat {
            registration: Some(registration),
            beats: Arc::downgrade(self),
        }
    }

    /// Stops the thread and joins it (an extend under way ends first), then
    /// marks every registration stopped. Later registrations are inert.
    pub fn stop(&self) {
        let thread = {
            let mut s = self.schedule.lock();
            s.stopped = true;
            s.thread.take()
        };
        self.wake.notify_all();
        if let Some(t) = thread
            && t.thread().id() != std::thread::current().id()
        {
            let _ = t.join();
        }
        let left = std::mem::take(&mut self.schedule.lock().due);
        for registration in left.into_values() {
            registration.end();
        }
    }

    /// Takes `registration` out of the schedule, if it is there at `due`.
    fn unschedule(&self, due: Instant, id: u64) {
        self.schedule.lock().due.remove(&(due, id));
    }
}

impl Registration {
    /// Marks it stopped (it must not be extending) and wakes a stop that
    /// waits for it.
    fn end(&self) {
        *self.phase.lock() = Phase::Stopped;
        self.idle.notify_all();
    }
}

/// The thread: sleep until the first registration is due, extend it,
/// schedule it again `every` later (or at its limit), repeat.
fn run(beats: &Weak<Heartbeats>, beat: &Beat) {
    loop {
        let Some(hb) = beats.upgrade() else { return };
        let Some(registration) = next_due(&hb) else {
            return;
        };
        // No lock held: a stop of this registration waits on `idle`.
        let guard = EndIfPanics(&registration);
        let ok = beat.extend(&registration.lease).is_ok();
        drop(guard);
        let mut s = hb.schedule.lock();
        let mut phase = registration.phase.lock();
        if ok && !s.stopped {
            let next = later(Instant::now(), registration.every).min(registration.until);
            *phase = Phase::Waiting(next);
            s.due
                .insert((next, registration.id), Arc::clone(&registration));
        } else {
            // A failed extend (the lease was lost, completed or released;
            // the engine failed) ends the heartbeat; the owner's own call
            // reports it.
            *phase = Phase::Stopped;
        }
        drop(phase);
        drop(s);
        registration.idle.notify_all();
    }
}

/// Ends a registration whose extend panicked (it does not; but a stop
/// waiting for the extend to end must not wait forever).
struct EndIfPanics<'a>(&'a Registration);

impl Drop for EndIfPanics<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.end();
        }
    }
}

/// Waits for the first registration to be due and takes it out of the
/// schedule, marked [`Phase::Extending`]; `None` once the heartbeats
/// stopped. A registration found stopped is dropped; one past its limit is
/// stopped.
fn next_due(hb: &Heartbeats) -> Option<Arc<Registration>> {
    let mut s = hb.schedule.lock();
    loop {
        if s.stopped {
            return None;
        }
        let Some((&(due, _), _)) = s.due.first_key_value() else {
            s.sleeping = Some(None);
            hb.wake.wait(&mut s);
            s.sleeping = None;
            continue;
        };
        let now = Instant::now();
        if due > now {
            s.sleeping = Some(Some(due));
            let _ = hb.wake.wait_until(&mut s, due);
            s.sleeping = None;
            continue;
        }
        let Some((_, registration)) = s.due.pop_first() else {
            continue;
        };
        let mut phase = registration.phase.lock();
        if *phase == Phase::Stopped {
            continue;
        }
        if now >= registration.until {
            *phase = Phase::Stopped;
            drop(phase);
            registration.idle.notify_all();
            continue;
        }
        *phase = Phase::Extending;
        drop(phase);
        return Some(registration);
    }
}

/// A running lease heartbeat ([`Engine::heartbeat`](crate::Engine::heartbeat)):
/// while it runs, the engine's heartbeat thread extends the lease.
/// Dropping it, or [`Heartbeat::stop`], ends it. `Send + Sync`.
///
/// Stopping waits for an extend of this lease that is under way (an append
/// to the log, not an fsync; a segment roll at worst), so that once it
/// returns nothing extends the lease any more: a `complete` or `release`
/// that follows is the lease's last word.
#[must_use = "the heartbeat stops when the handle is dropped"]
#[derive(Debug)]
pub struct Heartbeat {
    registration: Option<Arc<Registration>>,
    beats: Weak<Heartbeats>,
}

impl Heartbeat {
    /// A handle that does nothing (a zero interval or limit, a closed
    /// engine).
    pub(crate) fn inert() -> Heartbeat {
        Heartbeat {
            registration: None,
            beats: Weak::new(),
        }
    }

    /// Whether the heartbeat still runs: false once it was stopped, an
    /// extend failed, its limit passed or the engine closed (and for a
    /// handle that never ran: a zero interval or limit).
    pub fn is_running(&self) -> bool {
        self.registration
            .as_ref()
            .is_some_and(|r| *r.phase.lock() != Phase::Stopped)
    }

    /// Stops the heartbeat: once this returns, no extend of the lease is
    /// running or will start. The same as dropping the handle.
    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        let Some(registration) = self.registration.take() else {
            return;
        };
        let mut phase = registration.phase.lock();
        while *phase == Phase::Extending {
            registration.idle.wait(&mut phase);
        }
        let was = std::mem::replace(&mut *phase, Phase::Stopped);
        drop(phase);
        if let (Phase::Waiting(due), Some(beats)) = (was, self.beats.upgrade()) {
            beats.unschedule(due, registration.id);
        }
    }
}
