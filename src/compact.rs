//! The sweeper and the compactor, and the background thread that runs them.
//!
//! The **sweeper** drops expired records and leases from the index, one
//! shard at a time, and counts the live entries of every segment. The
//! **compactor** rewrites a closed segment whose live fraction fell below
//! the threshold: it keeps each record the index still points at, and each
//! other record whose lease has had a deadline that is still ahead (its
//! `lease_ms`): dropping it could let an older record of that lease look
//! live again. The rest is dropped.
//! The rewrite replays where the segment did (`log/rewrite.rs`), so replay
//! order never changes, and a crash at any step leaves either the old file
//! or its complete replacement.
//!
//! # Invariants
//! - No live record is lost: a record the index points at is copied, and
//!   the index moves to the copy only after the copy is durable and named.
//! - Nothing dead comes back: a dropped record is superseded (by a durable
//!   record), expired, or a tombstone whose lease has expired, so whatever
//!   older records remain replay to an expired or superseded state.
//! - Nothing acknowledged is lost to a crash: a record superseded by one
//!   that is not yet durable is kept, and a poisoned log is not compacted.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::clock::{EngineClock, Now};
use crate::error::{Error, Result};
use crate::index::{Index, KeyId, OFFSET_LIMIT, PARTS};
use crate::log::reader::scan_segment;
use crate::log::record::{FRAME_HEADER, frame_header};
use crate::log::{ClosedSegment, Copied, Log, Pin, pos, slot_of};
use crate::metrics::Published;
use crate::stats::{Counters, Stats};

/// What one [`Engine::compact`](crate::Engine::compact) (or one background
/// pass) did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CompactionReport {
    /// Expired records and leases the sweep removed from the index.
    pub expired: u64,
    /// Segments rewritten or removed.
    pub segments_compacted: u64,
    /// Records copied into rewritten segments (live ones and tombstones).
    pub records_kept: u64,
    /// Records dropped.
    pub records_dropped: u64,
    /// Of the records kept, complete records sealed under the current key
    /// (`Options::encryption`) as they were copied: plaintext ones, and ones
    /// sealed under an older key.
    pub records_resealed: u64,
    /// Bytes in segment files before the pass.
    pub bytes_before: u64,
    /// Bytes in segment files after the pass.
    pub bytes_after: u64,
    /// How long the pass took.
    pub duration: Duration,
}

/// The parts of an engine the sweeper and compactor work on.
#[derive(Debug)]
pub(crate) struct Compactor {
    pub log: Arc<Log>,
    pub index: Arc<Index>,
    pub clock: Arc<EngineClock>,
    pub counters: Arc<Counters>,
    /// Rewrite segments whose live fraction is below this.
    pub threshold: f64,
    /// One pass (or one pause) at a time.
    running: Mutex<()>,
    /// The thread that holds `running` (see [`thread_no`]), 0 for none: a
    /// call that would wait for its own thread gets an error instead.
    holder: AtomicU64,
    /// Set by [`Compactor::shut`]: no pass starts, and a running pass stops
    /// at the next segment.
    shut: AtomicBool,
    /// Set while `shut` waits for a pass, so the pass stops early.
    stopping: AtomicBool,
}

/// A number for the calling thread, unique in the process and never 0.
fn thread_no() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        static NO: u64 = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    NO.with(|n| *n)
}

/// Holds the compactor's `running` lock; clears the holder when dropped.
pub(crate) struct Exclusive<'a> {
    compactor: &'a Compactor,
    _guard: parking_lot::MutexGuard<'a, ()>,
}

impl Drop for Exclusive<'_> {
    fn drop(&mut self) {
        self.compactor.holder.store(0, Ordering::Release);
    }
}

impl Compactor {
    pub fn new(
        log: Arc<Log>,
        index: Arc<Index>,
        clock: Arc<EngineClock>,
        counters: Arc<Counters>,
        threshold: f64,
    ) -> Compactor {
        Compactor {
            log,
            index,
            clock,
            counters,
            threshold,
            running: Mutex::new(()),
            holder: AtomicU64::new(0),
            shut: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
        }
    }

    /// Takes the `running` lock for `call`.
    ///
    /// # Errors
    /// [`Error::Reentrant`] if this thread already holds it (a `compact` or
    /// `close` from inside a `for_each_record` callback would wait for
    /// itself); [`Error::Closed`] once [`Compactor::shut`] ran.
    fn exclusive(&self, call: &'static str) -> Result<Exclusive<'_>> {
        let me = thread_no();
        if self.holder.load(Ordering::Acquire) == me {
            return Err(Error::Reentrant { call });
        }
        let guard = self.running.lock();
        if self.shut.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        self.holder.store(me, Ordering::Release);
        Ok(Exclusive {
            compactor: self,
            _guard: guard,
        })
    }

    /// Holds off compaction until the guard is dropped.
    ///
    /// # Errors
    /// As [`Compactor::exclusive`].
    pub fn pause(&self, call: &'static str) -> Result<Exclusive<'_>> {
        self.exclusive(call)
    }

    /// Whether this thread holds the `running` lock (so `shut` would wait
    /// for itself).
    pub fn held_here(&self) -> bool {
        self.holder.load(Ordering::Acquire) == thread_no()
    }

    /// Asks a running pass to stop at its next segment (the first step of
    /// closing, before the background thread is joined).
    pub fn request_stop(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    /// Stops compaction for good: asks a running pass to stop at its next
    /// segment, waits for it, and refuses every later pass. After this
    /// returns no compaction touches the directory. The caller checks
    /// [`Compactor::held_here`] first.
    pub fn shut(&self) {
        self.stopping.store(true, Ordering::Release);
        let _guard = self.running.lock();
        self.shut.store(true, Ordering::Release);
    }

    /// Sweeps every shard; returns how many entries expired and the live
    /// entries per segment file.
    fn sweep(&self, now: Now) -> (u64, HashMap<u64, u64>) {
        let mut expired = 0;
        let mut live = HashMap::new();
        // One part of one shard per lock hold, so foreground calls on that
        // shard wait for at most a sixteenth of it.
        for shard in self.index.shards() {
            for part in 0..PARTS {
                let mut shard = shard.lock();
                expired += shard.drop_expired_in(part, now) as u64;
                shard.for_each_in(part, |e| *live.entry(slot_of(e.pos)).or_insert(0) += 1);
            }
        }
        self.counters.swept.fetch_add(expired, Ordering::Relaxed);
        (expired, live)
    }

    /// The engine's [`Stats`]: the counters, and the gauges read from the
    /// index and the log now.
    pub fn stats(&self) -> Stats {
        let mut stats = self.counters.snapshot();
        stats.live_records = self.index.len() as u64;
        let memory = self.index.memory();
        stats.index_slots = memory.slots as u64;
        stats.index_bytes = memory.bytes as u64;
        stats.segments = self.log.segment_count() as u64;
        stats.disk_bytes = self.log.disk_bytes();
        stats.log_pending_bytes = self.log.pending_bytes();
        stats
    }

    /// One pass: sweep, then rewrite closed segments. A full pass rolls the
    /// active segment first and rewrites every segment with a dead record;
    /// otherwise only segments whose live fraction is below `threshold`
    /// (`None`: the configured one) are rewritten.
    /// Counted: a pass that ran to the end in `compactions`, one that
    /// failed once it started in `compaction_errors` (and `io_errors` for
    /// an I/O failure).
    pub fn run(&self, full: bool, threshold: Option<f64>) -> Result<CompactionReport> {
        let threshold = threshold.unwrap_or(self.threshold);
        let one = self.exclusive("compact")?;
        let result = self.pass(full, threshold);
        drop(one);
        let c = &self.counters;
        match &result {
            Ok(_) => c.compactions.fetch_add(1, Ordering::Relaxed),
            // Stopped between two segments because the engine is closing.
            Err(Error::Closed) => 0,
            Err(e) => {
                if matches!(e, Error::Io { .. } | Error::NoSpace { .. }) {
                    c.io_errors.fetch_add(1, Ordering::Relaxed);
                }
                c.compaction_errors.fetch_add(1, Ordering::Relaxed)
            }
        };
        result
    }

    /// [`Compactor::run`]'s pass, under the exclusive guard.
    fn pass(&self, full: bool, threshold: f64) -> Result<CompactionReport> {
        // After a failed write or sync the index may show states that never
        // reached the disk; dropping what they superseded could lose data.
        self.log.check_poison()?;
        self.log.flush_pending()?;
        let started = Instant::now();
        let mut report = CompactionReport {
            bytes_before: self.log.disk_bytes(),
            ..CompactionReport::default()
        };
        if full {
            self.log.roll_if_used()?;
        }
        let now = self.clock.read();
        let (expired, live) = self.sweep(now);
        report.expired = expired;
        let mut live_bytes = 0u64;
        let mut retired = false;
        for seg in self.log.closed_segments(now.lease) {
            let live_here = live.get(&seg.file).copied().unwrap_or(0) + seg.pinned;
            let fraction = if seg.records == 0 {
                0.0
            } else {
                live_here as f64 / seg.records as f64
            };
            let due = if full {
                // A full pass also seals what is not sealed under the
                // sealing key (a rotation completes by compacting).
                live_here < seg.records || seg.records == 0 || seg.unsealed > 0
            } else {
                fraction < threshold
            };
            if !due {
                live_bytes += (seg.bytes as f64 * fraction.min(1.0)) as u64;
                continue;
            }
            if self.stopping.load(Ordering::Acquire) {
                // The engine is closing: stop between two segments (every
                // file is as it was, or replaced by its complete rewrite).
                if retired {
                    self.log.sync_dir()?;
                }
                return Err(Error::Closed);
            }
            let done = self.rewrite(&seg, now)?;
            report.segments_compacted += 1;
            report.records_kept += done.kept;
            report.records_dropped += done.dropped;
            report.records_resealed += done.resealed;
            live_bytes += done.bytes;
            retired = true;
        }
        if retired {
            self.log.sync_dir()?;
        }
        let (active, records, bytes) = self.log.active_segment();
        let live_active = live.get(&active).copied().unwrap_or(0);
        if records > 0 {
            live_bytes += (bytes as f64 * (live_active as f64 / records as f64).min(1.0)) as u64;
        }
        report.bytes_after = self.log.disk_bytes();
        report.duration = started.elapsed();
        let c = &self.counters;
        c.segments_compacted
            .fetch_add(report.segments_compacted, Ordering::Relaxed);
        c.bytes_reclaimed.fetch_add(
            report.bytes_before.saturating_sub(report.bytes_after),
            Ordering::Relaxed,
        );
        c.last_compaction_us.store(
            u64::try_from(report.duration.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        c.live_bytes.store(live_bytes, Ordering::Relaxed);
        crate::trace::event!(
            info,
            expired = report.expired,
            segments = report.segments_compacted,
            kept = report.records_kept,
            dropped = report.records_dropped,
            bytes_before = report.bytes_before,
            bytes_after = report.bytes_after,
            micros = report.duration.as_micros() as u64,
            "compaction pass"
        );
        Ok(report)
    }

    /// Rewrites one closed segment, sealing the complete records it keeps
    /// under the sealing key if there is one.
    fn rewrite(&self, seg: &ClosedSegment, now: Now) -> Result<Rewritten> {
        let buf = self.log.read_segment(seg.file)?;
        let (active, _, _) = self.log.active_segment();
        let mut frames = Vec::new();
        let mut moved = Vec::new();
        let (mut kept, mut dropped, mut resealed) = (0u64, 0u64, 0u64);
        let mut pin = Pin::default();
        let mut unsealed = 0u64;
        let mut failed = None;
        // A rewrite that seals records grows: past `seg.bytes + room` its
        // positions would not fit an index entry (see `Log::copy_frame`).
        let room = OFFSET_LIMIT.saturating_sub(seg.bytes);
        let scanned = scan_segment(&buf, seg.number, |rec, offset| {
            if failed.is_some() {
                return;
            }
            let at = pos(seg.file, offset);
            let id = KeyId::new(rec.user, rec.key);
            // Current: the index points here. Unsettled: what superseded
            // this record (a newer record, or a release) is not durable yet,
            // so a crash could still make this record the key's state again.
            let (current, unsettled) = {
                let shard = self.index.shard(&id).lock();
                match shard.get(&id, rec.user, rec.key) {
                    Some(e) if e.pos == at => (e.is_live(now), false),
                    Some(e) => (false, !self.log.is_durable(e.pos)),
                    None => (false, !self.log.is_durable(shard.removed_pos())),
                }
            };
            // A record that is no longer current may still be what stops an
            // older record of its lease from looking live again: keep it
            // while any deadline its lease has had is ahead (`lease_ms`).
            let tombstone = rec.lease_ms > now.lease;
            if !current && !tombstone && !unsettled {
                dropped += 1;
                return;
            }
            let start = usize::try_from(offset).unwrap_or(usize::MAX);
            let len = buf
                .get(start..)
                .and_then(frame_header)
                .map_or(0, |(len, _)| FRAME_HEADER + len);
            let new_offset = (crate::log::record::HEADER_LEN + frames.len()) as u64;
            let frame = buf.get(start..start + len).unwrap_or_default();
            // Output bytes may exceed input bytes by at most `room` at the
            // end of this record: then every later offset still fits.
            let left = (start + len) as u64 + room;
            let left = left.saturating_sub(new_offset + len as u64);
            match self.log.copy_frame(&rec, frame, at, left, &mut frames) {
                Ok(Copied::Resealed) => resealed += 1,
                Ok(Copied::Unsealed) => unsealed += 1,
                Ok(Copied::AsIs) => {}
                Err(e) => {
                    failed = Some(e);
                    return;
                }
            }
            kept += 1;
            if current {
                moved.push((at, new_offset, rec.user, rec.key));
            } else {
                pin.count += 1;
                if tombstone {
                    pin.until_ms = pin.until_ms.max(rec.lease_ms);
                }
                if unsettled {
                    pin.unsettled_in = Some(active);
                }
            }
        });
        if let Err((offset, kind)) = scanned {
            return Err(Error::Corrupt {
                file: self.log.path_of(pos(seg.file, 0)),
                offset: offset as u64,
                kind,
            });
        }
        if let Some(e) = failed {
            return Err(e);
        }
        let mut bytes = 0;
        if kept > 0 {
            let out = self
                .log
                .publish_rewrite(seg.file, &frames, kept, pin, unsealed)?;
            bytes = (crate::log::record::HEADER_LEN + frames.len()) as u64;
            for (from, offset, user, key) in moved {
                let id = KeyId::new(user, key);
                self.index
                    .shard(&id)
                    .lock()
                    .repoint(&id, user, key, from, pos(out, offset));
            }
        }
        self.log.retire(seg.file)?;
        Ok(Rewritten {
            kept,
            dropped,
            resealed,
            bytes,
        })
    }
}

/// What rewriting one segment did.
#[derive(Clone, Copy, Debug)]
struct Rewritten {
    /// Records copied (live ones and tombstones).
    kept: u64,
    /// Records dropped.
    dropped: u64,
    /// Of the records copied, those sealed under the current key.
    resealed: u64,
    /// Bytes of the replacement (0 if nothing was kept).
    bytes: u64,
}

/// How often the background thread publishes metrics (`metrics` feature).
pub(crate) const PUBLISH_EVERY: Duration = Duration::from_secs(1);

/// The background thread: a compaction pass every interval until stopped.
#[derive(Debug, Default)]
pub(crate) struct Background {
    handle: Mutex<Option<JoinHandle<()>>>,
    stop: Arc<(Mutex<bool>, Condvar)>,
}

impl Background {
    /// Starts the thread. With the `metrics` feature it also publishes the
    /// engine's counters and gauges every [`PUBLISH_EVERY`].
    pub fn start(
        compactor: Arc<Compactor>,
        every: Duration,
        published: Arc<Published>,
    ) -> Background {
        let stop: Arc<(Mutex<bool>, Condvar)> = Arc::default();
        let signal = Arc::clone(&stop);
        let nap = if cfg!(feature = "metrics") {
            every.min(PUBLISH_EVERY)
        } else {
            every
        };
        let handle = std::thread::Builder::new()
            .name("idemkv-compact".into())
            .spawn(move || {
                let mut passed = Instant::now();
                loop {
                    {
                        let (flag, cv) = &*signal;
                        let mut stopped = flag.lock();
                        if !*stopped {
                            let left = every.saturating_sub(passed.elapsed());
                            let _ = cv.wait_for(&mut stopped, nap.min(left));
                        }
                        if *stopped {
                            return;
                        }
                    }
                    if cfg!(feature = "metrics") {
                        published.publish(&compactor.stats());
                    }
                    if passed.elapsed() < every {
                        continue;
                    }
                    passed = Instant::now();
                    if compactor.log.is_poisoned() {
                        continue;
                    }
                    // A failed pass leaves every file as it was (or replaced
                    // by its complete rewrite) and removes its unfinished
                    // output; the next pass tries again (an I/O failure that
                    // matters to foreground writes poisons the log on its
                    // own). It is counted and traced.
                    // `run` counts the pass, failed or not.
                    match compactor.run(false, None) {
                        Ok(_) | Err(Error::Closed) => {}
                        Err(_e) => {
                            crate::trace::event!(error, error = %_e, "background compaction pass failed");
                        }
                    }
                }
            })
            .ok();
        Background {
            handle: Mutex::new(handle),
            stop,
        }
    }

    /// Stops the thread and waits for it (at most one pass).
    pub fn stop(&self) {
        let (flag, cv) = &*self.stop;
        *flag.lock() = true;
        cv.notify_all();
        if let Some(handle) = self.handle.lock().take() {
            let _ = handle.join();
        }
    }
}
