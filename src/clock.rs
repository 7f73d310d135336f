//! The engine's one door to time.
//!
//! Leases, record TTLs and expiry read the time only through a [`Clock`], so
//! tests can move it with a [`ManualClock`]. A clock has two readings:
//! wall time (milliseconds since the Unix epoch), which record TTLs follow
//! because records outlive the process, and a monotonic reading, which lease
//! deadlines follow within a process, so that a step of the wall clock (an
//! NTP correction) neither hands a running lease to a retry nor keeps a dead
//! one alive. The engine's *lease time* is the wall time at open plus the
//! monotonic time elapsed since ([`EngineClock`]); lease deadlines are kept
//! and logged in it, so after a restart they are judged against the wall
//! clock again.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};
use crate::index::MAX_DEADLINE_MS;

/// A source of the current time.
///
/// The engine never reads the system time directly; it asks its clock.
/// Implementations must be cheap: `begin` reads the clock once per call.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// The current wall time in milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;

    /// A monotonic reading in milliseconds from an arbitrary origin: it never
    /// goes back and is not moved by changes to the wall clock. Lease
    /// deadlines follow it within a process. The default returns
    /// [`Clock::now_ms`] (leases then follow wall time); [`SystemClock`]
    /// reads [`Instant`].
    fn monotonic_ms(&self) -> u64 {
        self.now_ms()
    }

    /// Both readings, `(wall, monotonic)`, as the engine takes them for
    /// every call. The default reads [`Clock::now_ms`] and
    /// [`Clock::monotonic_ms`]; [`SystemClock`] reads the wall clock again
    /// only when the monotonic millisecond moved on (its wall reading is
    /// then at most a millisecond old), which saves a system clock read on
    /// most calls under load.
    fn readings(&self) -> (u64, u64) {
        (self.now_ms(), self.monotonic_ms())
    }
}

/// The clocks of the machine: [`SystemTime`] for wall time, [`Instant`] for
/// the monotonic reading.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    fn monotonic_ms(&self) -> u64 {
        static ORIGIN: OnceLock<Instant> = OnceLock::new();
        millis(ORIGIN.get_or_init(Instant::now).elapsed())
    }

    fn readings(&self) -> (u64, u64) {
        // The last wall reading and the monotonic millisecond it was taken
        // in (`u64::MAX`: none yet). A reader that sees a millisecond sees
        // the wall reading stored before it (or a later one): a race only
        // ever pairs a millisecond with a wall reading a millisecond apart.
        static WALL: AtomicU64 = AtomicU64::new(0);
        static AT: AtomicU64 = AtomicU64::new(u64::MAX);
        let monotonic = self.monotonic_ms();
        if AT.load(Ordering::Acquire) == monotonic {
            return (WALL.load(Ordering::Acquire), monotonic);
        }
        let wall = self.now_ms();
        WALL.store(wall, Ordering::Release);
        AT.store(monotonic, Ordering::Release);
        (wall, monotonic)
    }
}

/// A clock that moves only when told to; for tests.
///
/// Its wall and monotonic readings start equal. [`ManualClock::advance`]
/// moves both, as time passing does; [`ManualClock::jump_wall_forward`] and
/// [`ManualClock::jump_wall_back`] move the wall reading alone, as a step of
/// the system clock does.
///
/// ```
/// use std::{sync::Arc, time::Duration};
/// use idemkv::{Clock, ManualClock};
///
/// let clock = Arc::new(ManualClock::new(1_000));
/// clock.advance(Duration::from_secs(2));
/// assert_eq!((clock.now_ms(), clock.monotonic_ms()), (3_000, 3_000));
/// clock.jump_wall_forward(Duration::from_secs(60));
/// assert_eq!((clock.now_ms(), clock.monotonic_ms()), (63_000, 3_000));
/// ```
#[derive(Debug, Default)]
pub struct ManualClock {
    wall: AtomicU64,
    monotonic: AtomicU64,
}

impl ManualClock {
    /// A clock whose wall and monotonic readings are `start_ms` until moved.
    pub fn new(start_ms: u64) -> ManualClock {
        ManualClock {
            wall: AtomicU64::new(start_ms),
            monotonic: AtomicU64::new(start_ms),
        }
    }

    /// Time passes: moves both readings forward by `by` (saturating, at
    /// millisecond precision).
    pub fn advance(&self, by: Duration) {
        let ms = millis(by);
        add(&self.wall, ms);
        add(&self.monotonic, ms);
    }

    /// Sets the wall reading to `now_ms`. Forward, the monotonic reading
    /// moves by as much (time passed); backward, it stays (a step of the
    /// wall clock: the monotonic reading never goes back).
    pub fn set(&self, now_ms: u64) {
        let before = self.wall.swap(now_ms, Ordering::SeqCst);
        add(&self.monotonic, now_ms.saturating_sub(before));
    }

    /// Steps the wall reading forward by `by`, the monotonic one staying (an
    /// NTP step forward): record TTLs see it, lease deadlines do not.
    pub fn jump_wall_forward(&self, by: Duration) {
        add(&self.wall, millis(by));
    }

    /// Steps the wall reading back by `by` (saturating at 0), the monotonic
    /// one staying.
    pub fn jump_wall_back(&self, by: Duration) {
        let ms = millis(by);
        let _ = self
            .wall
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |now| {
                Some(now.saturating_sub(ms))
            });
    }
}

/// Adds `ms` to `cell`, saturating.
fn add(cell: &AtomicU64, ms: u64) {
    let _ = cell.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |now| {
        Some(now.saturating_add(ms))
    });
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.wall.load(Ordering::SeqCst)
    }

    fn monotonic_ms(&self) -> u64 {
        self.monotonic.load(Ordering::SeqCst)
    }
}

/// One reading of the engine's two times, in ms: `wall` for record TTLs,
/// `lease` (see [`EngineClock`]) for lease deadlines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Now {
    /// Wall time, ms since the Unix epoch.
    pub wall: u64,
    /// Lease time: wall time at open plus monotonic time since.
    pub lease: u64,
}

impl Now {
    /// Both times at `ms` (recovery judges a record by its logged time).
    pub fn at(ms: u64) -> Now {
        Now {
            wall: ms,
            lease: ms,
        }
    }
}

/// An engine's view of its [`Clock`]: wall time, and lease time anchored
/// to wall time when the engine opened and moved by the monotonic reading
/// since.
#[derive(Debug)]
pub(crate) struct EngineClock {
    clock: Arc<dyn Clock>,
    wall_at_open: u64,
    monotonic_at_open: u64,
}

impl EngineClock {
    /// Anchors lease time to `clock`'s wall time now.
    pub fn new(clock: Arc<dyn Clock>) -> EngineClock {
        EngineClock {
            wall_at_open: clock.now_ms(),
            monotonic_at_open: clock.monotonic_ms(),
            clock,
        }
    }

    /// Both readings, unchecked (for the sweeper and operator views).
    pub fn read(&self) -> Now {
        let (wall, monotonic) = self.clock.readings();
        let elapsed = monotonic.saturating_sub(self.monotonic_at_open);
        Now {
            wall,
            lease: self.wall_at_open.saturating_add(elapsed),
        }
    }

    /// Both readings, checked against what the index can represent.
    ///
    /// # Errors
    /// [`Error::ClockOutOfRange`] when either is at or past 2^43 - 1 ms
    /// (the year 2248): every deadline would be clamped there and nothing
    /// would ever be live.
    pub fn now(&self) -> Result<Now> {
        let now = self.read();
        let now_ms = now.wall.max(now.lease);
        if now_ms >= MAX_DEADLINE_MS {
            return Err(Error::ClockOutOfRange {
                now_ms,
                max_ms: MAX_DEADLINE_MS - 1,
            });
        }
        Ok(now)
    }
}

/// A duration in whole milliseconds, saturating.
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::{Clock, SystemClock};
    use std::time::Duration;

    #[test]
    fn system_readings_follow_the_wall_clock_within_a_millisecond_or_two() {
        let clock = SystemClock;
        for round in 0..200 {
            let before = clock.now_ms();
            let (wall, monotonic) = clock.readings();
            let after = clock.now_ms();
            // Cached within one monotonic millisecond, whose boundaries are
            // not the wall clock's: at most two wall milliseconds old.
            assert!(
                wall + 2 >= before && wall <= after,
                "round {round}: wall {wall} read between {before} and {after}"
            );
            assert!(monotonic <= clock.monotonic_ms());
            if round % 50 == 0 {
                std::thread::sleep(Duration::from_millis(3));
            }
        }
    }
}
