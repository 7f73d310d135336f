//! Group commit: one leader fdatasyncs for everyone waiting.
//!
//! Syncs run in numbered rounds, one at a time. A caller that needs its
//! record durable leads a round if none is in flight: it reads the end of
//! what was appended (the round's target), syncs the active file outside
//! every lock, and publishes the new durable position. Otherwise:
//! - if its record is below the in-flight round's target, it sleeps until
//!   that round ends (one wake-up, and it returns);
//! - if not, the first such caller claims the next round and sleeps until
//!   the in-flight round ends, then leads at once; the others sleep until
//!   the next round ends.
//!
//! So a caller is woken once per record in the common case, instead of at
//! the end of every round, and the next sync starts as soon as the previous
//! one ends. Every wait re-checks `is_durable` before returning: a wake-up
//! is only a hint, and waits that depend on another caller's promise are
//! bounded (`RECHECK`), so a lost wake-up costs time, never an answer.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use super::writer::Writer;
use super::{Log, slot_of};
use crate::error::{Error, IoOp, Result};
use crate::storage::StorageFile;

/// The state shared by the callers of one log's syncs.
#[derive(Debug, Default)]
pub(super) struct GroupCommit {
    /// Held across every fdatasync of a segment (group commit and roll), so
    /// that a sync that succeeds after another one failed is never taken to
    /// cover the data the failed one dropped.
    serial: Mutex<()>,
    /// The rounds: what is in flight, what has ended.
    rounds: Mutex<Rounds>,
    /// `ended[r % 2]` is signalled when round `r` ends.
    ended: [Condvar; 2],
    /// Signalled when a round ends and a caller claimed the next one.
    next: Condvar,
    /// The periodic flusher, if the mode has one.
    flusher: Mutex<Option<JoinHandle<()>>>,
    /// Set to stop the flusher; signalled through `stop_cv`.
    stop: Mutex<bool>,
    stop_cv: Condvar,
}

/// The numbered sync rounds (see the module docs).
#[derive(Debug, Default)]
struct Rounds {
    /// Rounds started so far.
    started: u64,
    /// Rounds ended so far (`finished == started` unless one is in flight).
    finished: u64,
    /// The log position the in-flight round makes durable (exclusive).
    target: u64,
    /// A caller waits to lead the round after the in-flight one.
    next_claimed: bool,
}

impl Rounds {
    /// Whether a round is in flight (its number is `started`).
    fn leading(&self) -> bool {
        self.started > self.finished
    }
}

/// Longest sleep on a promise made by another caller (that it will lead
/// the next round) before checking again.
const RECHECK: Duration = Duration::from_millis(2);

/// How often the flusher writes pending appends out without `Sync`.
pub(super) const FLUSH_EVERY: Duration = Duration::from_millis(5);

impl GroupCommit {
    /// The condition variable signalled when round `round` ends.
    fn ended(&self, round: u64) -> &Condvar {
        let [even, odd] = &self.ended;
        if round.is_multiple_of(2) { even } else { odd }
    }

    /// Starts the flusher of `Durability::Periodic` and `Durability::None`:
    /// every [`FLUSH_EVERY`] it writes the appends still pending in memory to
    /// the file (so a killed process loses at most that much), and with
    /// `sync_every` it also syncs that often. Without `write_ticks` (no
    /// background thread: `Options::background` is off) it only syncs, so
    /// pending appends wait for the buffer to fill, a sync, a roll, a
    /// compaction or close.
    pub fn start_flusher(log: &Arc<Log>, sync_every: Option<Duration>, write_ticks: bool) {
        let tick = match (sync_every, write_ticks) {
            (None, false) => return,
            (None, true) => FLUSH_EVERY,
            (Some(every), false) => every,
            (Some(every), true) => every.min(FLUSH_EVERY),
        };
        let weak = Arc::downgrade(log);
        let handle = std::thread::Builder::new()
            .name("idemkv-flush".into())
            .spawn(move || {
                let mut synced = std::time::Instant::now();
                loop {
                    let Some(log) = weak.upgrade() else { return };
                    {
                        let mut stop = log.commit.stop.lock();
                        if *stop {
                            return;
                        }
                        let _ = log.commit.stop_cv.wait_for(&mut stop, tick);
                        if *stop {
                            return;
                        }
                    }
                    if log.poison.get().is_some() {
                        continue;
                    }
                    let end = log.written.load(Ordering::Acquire);
                    let sync_due = sync_every.is_some_and(|every| synced.elapsed() >= every);
                    if sync_due {
                        synced = std::time::Instant::now();
                        if end > 0 && !log.is_durable(end - 1) {
                            // A failure poisons the log; callers see it on
                            // their next write.
                            let _ = log.sync_past(end - 1);
                        }
                    } else if log.pending_bytes() > 0 {
                        let _ = log.flush();
                    }
                }
            });
        if let Ok(handle) = handle {
            *log.commit.flusher.lock() = Some(handle);
        }
    }

    /// Stops and joins the flusher, if any.
    pub fn stop_flusher(&self) {
        *self.stop.lock() = true;
        self.stop_cv.notify_all();
        if let Some(handle) = self.flusher.lock().take() {
            let _ = handle.join();
        }
    }
}

impl Log {
    /// fdatasyncs the segment in `slot` and, on success, publishes `end` as
    /// durable (if that segment is still the active one: a roll publishes
    /// the start of the next one).
    /// Serialized with every other segment sync; refuses to sync once the
    /// log is poisoned (after a failed fsync, a later successful one proves
    /// nothing about the pages the failure dropped).
    pub(super) fn sync_segment(
        &self,
        file: &Arc<dyn StorageFile>,
        slot: u64,
        end: u64,
    ) -> Result<()> {
        let _serial = self.commit.serial.lock();
        self.check_poison()?;
        let started = std::time::Instant::now();
        let result = file.sync();
        let c = &self.counters;
        c.fsyncs.fetch_add(1, Ordering::Relaxed);
        let records = c.records_written.load(Ordering::Relaxed);
        let group = records.saturating_sub(c.synced_records.swap(records, Ordering::Relaxed));
        c.histograms.fsync(started.elapsed().as_secs_f64(), group);
        match result {
            Ok(()) => {
                // Slots are not ordered: move `durable` forward only within
                // the segment it is in.
                let _ = self
                    .durable
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
                        (slot_of(now) == slot_of(end) && end > now).then_some(end)
                    });
                Ok(())
            }
            Err(e) => {
                self.set_poison(e.kind());
                Err(Error::io(IoOp::Sync, self.path_of_slot(slot), e))
            }
        }
    }

    /// After a failed sync: cuts the active segment back to what is known
    /// durable, so that a restart without a crash does not read (and build
    /// on) records whose pages the failed sync may have dropped. Best
    /// effort: if this fails too, recovery still treats what follows the
    /// last durable record as a torn tail or reports it.
    pub(super) fn drop_unsynced(&self, w: &mut Writer) {
        if w.is_released() {
            // The engine closed and gave the directory up: another engine
            // may own these files now.
            return;
        }
        let durable = self.durable.load(Ordering::Acquire);
        if slot_of(durable) == w.slot() {
            let keep = durable & ((1 << 40) - 1);
            // Readers copying a record that is not durable out of the
            // segment's map hold the segment table's read lock: the cut
            // waits for them, and later ones see the shorter file.
            let _segments = self.segments.write();
            let _ = w.truncate_to(keep);
            let (_, _, end) = w.tail();
            self.written.store(end, Ordering::Release);
            self.flushed.store(end, Ordering::Release);
        }
    }

    /// Returns once the byte at position `at` is durable, leading or joining
    /// a group commit round as needed (see the module docs).
    ///
    /// # Errors
    /// The leader's sync error for the leader; [`Error::Poisoned`] for every
    /// caller after a failed sync.
    pub(crate) fn sync_past(&self, at: u64) -> Result<()> {
        loop {
            if self.is_durable(at) {
                return Ok(());
            }
            self.check_poison()?;
            let mut r = self.commit.rounds.lock();
            if self.is_durable(at) {
                return Ok(());
            }
            if r.leading() {
                let in_flight = r.started;
                if slot_of(at) == slot_of(r.target) && at < r.target {
                    // Covered: the in-flight leader always ends its round
                    // and signals.
                    while r.finished < in_flight {
                        self.commit.ended(in_flight).wait(&mut r);
                    }
                    continue;
                }
                if r.next_claimed {
                    // The claimer leads the next round, whose target is
                    // past this record (appended before that round starts).
                    let round = in_flight + 1;
                    while r.finished < round && (r.next_claimed || r.started >= round) {
                        if self
                            .commit
                            .ended(round)
                            .wait_for(&mut r, RECHECK)
                            .timed_out()
                        {
                            break;
                        }
                    }
                    continue;
                }
                r.next_claimed = true;
                while r.finished < in_flight {
                    self.commit.next.wait(&mut r);
                }
                if r.leading() {
                    // Another caller started the next round first (which
                    // took over the claim): it covers this record, or the
                    // loop claims again.
                    continue;
                }
            }
            // Like Postgres' `commit_delay`, but for one scheduler slice:
            // give the callers that are about to append (woken by the
            // previous round, or still encoding) the core first, so the
            // round covers them too. Measured with 64 callers on 2 cores
            // (`cargo bench --bench begin_complete -- begin_complete/sync/64`):
            // one yield 54-60 k pairs/s against 38-45 k without; two or four
            // yields, or parking waiters to be unparked by the leader, did
            // worse. With no other runnable thread it returns at once.
            parking_lot::MutexGuard::unlocked(&mut r, std::thread::yield_now);
            if r.leading() || self.is_durable(at) {
                continue;
            }
            // Lead a round.
            r.started += 1;
            r.next_claimed = false;
            let round = r.started;
            // The round covers everything appended so far; the write of
            // the pending records (one write for all of them, and those
            // appended meanwhile) runs outside the rounds lock, so callers
            // joining the round do not queue behind it.
            r.target = self.written.load(Ordering::Acquire);
            drop(r);
            let result = self
                .flush()
                .and_then(|(file, id, end)| self.sync_segment(&file, id, end));
            let mut r = self.commit.rounds.lock();
            r.finished = round;
            let wake_next = r.next_claimed;
            drop(r);
            self.commit.ended(round).notify_all();
            if wake_next {
                self.commit.next.notify_all();
            }
            if result.is_err() {
                let mut w = self.writer.lock();
                self.drop_unsynced(&mut w);
            }
            result?;
        }
    }
}
