//! The `metrics` feature's side: histogram handles registered at open, and
//! the publishing of counters and gauges from [`Stats`].

use std::sync::Once;
use std::time::Instant;

use metrics::{Histogram, Unit, counter, gauge, histogram};
use parking_lot::Mutex;

use super::Op;
use crate::stats::Stats;

/// The histograms the hot path records into, registered with the recorder
/// installed when the engine opened.
#[derive(Debug)]
pub(crate) struct Histograms {
    begin: Histogram,
    complete: Histogram,
    wait: Histogram,
    fsync: Histogram,
    fsync_records: Histogram,
    recovery: Histogram,
}

impl Default for Histograms {
    fn default() -> Histograms {
        describe();
        Histograms {
            begin: histogram!("idemkv_begin_seconds"),
            complete: histogram!("idemkv_complete_seconds"),
            wait: histogram!("idemkv_wait_seconds"),
            fsync: histogram!("idemkv_fsync_seconds"),
            fsync_records: histogram!("idemkv_fsync_records"),
            recovery: histogram!("idemkv_recovery_seconds"),
        }
    }
}

impl Histograms {
    /// Starts timing a call: recorded when the timer is dropped.
    pub fn time(&self, op: Op) -> Timer<'_> {
        Timer {
            histogram: match op {
                Op::Begin => &self.begin,
                Op::Complete => &self.complete,
                Op::Wait => &self.wait,
            },
            start: Instant::now(),
        }
    }

    /// One fdatasync: how long it took and how many records it covered.
    pub fn fsync(&self, seconds: f64, records: u64) {
        self.fsync.record(seconds);
        self.fsync_records.record(records as f64);
    }

    /// The recovery at open.
    pub fn recovery(&self, seconds: f64) {
        self.recovery.record(seconds);
    }
}

/// A call being timed; records its latency when dropped.
pub(crate) struct Timer<'a> {
    histogram: &'a Histogram,
    start: Instant,
}

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        self.histogram.record(self.start.elapsed().as_secs_f64());
    }
}

/// What an engine last published, so the next publish adds only the
/// difference (several engines in one process then add up).
#[derive(Debug, Default)]
pub(crate) struct Published {
    last: Mutex<Last>,
}

/// The last published values, and whether the engine withdrew (closed).
#[derive(Debug, Default)]
struct Last {
    stats: Stats,
    withdrawn: bool,
}

/// Reads one field of [`Stats`].
type Field = fn(&Stats) -> u64;

/// The counters: name, the `answer` label if any, and the field of
/// [`Stats`] each follows.
const COUNTERS: &[(&str, Option<&str>, Field)] = &[
    ("idemkv_begins_total", Some("started"), |s| s.started),
    ("idemkv_begins_total", Some("replay"), |s| s.replays),
    ("idemkv_begins_total", Some("in_flight"), |s| s.in_flight),
    ("idemkv_begins_total", Some("mismatch"), |s| s.mismatches),
    ("idemkv_takeovers_total", None, |s| s.takeovers),
    ("idemkv_lease_lost_total", None, |s| s.lease_lost),
    ("idemkv_completions_total", None, |s| s.completions),
    ("idemkv_releases_total", None, |s| s.releases),
    ("idemkv_heartbeats_total", None, |s| s.heartbeats),
    ("idemkv_expirations_swept_total", None, |s| s.swept),
    ("idemkv_compactions_total", None, |s| s.compactions),
    ("idemkv_compaction_failures_total", None, |s| {
        s.compaction_errors
    }),
    ("idemkv_io_errors_total", None, |s| s.io_errors),
    ("idemkv_fsyncs_total", None, |s| s.fsyncs),
    ("idemkv_written_bytes_total", None, |s| s.bytes_written),
];

/// The gauges and the field of [`Stats`] each follows.
const GAUGES: &[(&str, Field)] = &[
    ("idemkv_live_records", |s| s.live_records),
    ("idemkv_disk_bytes", |s| s.disk_bytes),
    ("idemkv_live_bytes", |s| s.live_bytes),
    ("idemkv_segments", |s| s.segments),
    ("idemkv_index_bytes", |s| s.index_bytes),
];

impl Published {
    /// Adds to every counter what it grew by since the last publish, and
    /// moves every gauge by what its value changed.
    /// Nothing once [`Published::withdraw`] ran: a publish racing `close`
    /// must not put a closed engine's gauges back.
    pub fn publish(&self, now: &Stats) {
        let mut guard = self.last.lock();
        if guard.withdrawn {
            return;
        }
        let last = &mut guard.stats;
        for &(name, answer, field) in COUNTERS {
            let by = field(now).saturating_sub(field(last));
            if by > 0 {
                match answer {
                    Some(answer) => counter!(name, "answer" => answer).increment(by),
                    None => counter!(name).increment(by),
                }
            }
        }
        for &(name, field) in GAUGES {
            let (new, old) = (field(now), field(last));
            if new != old {
                gauge!(name).increment(new as f64 - old as f64);
            }
        }
        *last = now.clone();
    }

    /// Takes this engine's share back out of every gauge (it closed).
    pub fn withdraw(&self) {
        let mut guard = self.last.lock();
        guard.withdrawn = true;
        let last = &mut guard.stats;
        for &(name, field) in GAUGES {
            let old = field(last);
            if old != 0 {
                gauge!(name).decrement(old as f64);
            }
        }
        // Every field `GAUGES` reads.
        last.live_records = 0;
        last.disk_bytes = 0;
        last.live_bytes = 0;
        last.segments = 0;
        last.index_bytes = 0;
    }
}

/// Describes every metric to the recorder (units and help texts), once per
/// process.
fn describe() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        use metrics::{describe_counter, describe_gauge, describe_histogram};
        describe_counter!(
            "idemkv_begins_total",
            Unit::Count,
            "begin answers, by answer"
        );
        describe_counter!(
            "idemkv_takeovers_total",
            Unit::Count,
            "started answers that took over an expired lease"
        );
        describe_counter!(
            "idemkv_lease_lost_total",
            Unit::Count,
            "complete, extend and release calls refused with LeaseLost"
        );
        describe_counter!(
            "idemkv_completions_total",
            Unit::Count,
            "successful complete calls"
        );
        describe_counter!(
            "idemkv_releases_total",
            Unit::Count,
            "successful release calls"
        );
        describe_counter!(
            "idemkv_heartbeats_total",
            Unit::Count,
            "lease extends made by the heartbeat thread"
        );
        describe_counter!(
            "idemkv_expirations_swept_total",
            Unit::Count,
            "expired records and leases removed from memory by the sweeper"
        );
        describe_counter!(
            "idemkv_compactions_total",
            Unit::Count,
            "compaction passes that ran to the end"
        );
        describe_counter!(
            "idemkv_compaction_failures_total",
            Unit::Count,
            "compaction passes that failed"
        );
        describe_counter!(
            "idemkv_io_errors_total",
            Unit::Count,
            "I/O errors met by the log (writes, syncs, removals, reads, compaction)"
        );
        describe_counter!(
            "idemkv_fsyncs_total",
            Unit::Count,
            "fdatasync calls on log segments"
        );
        describe_counter!(
            "idemkv_written_bytes_total",
            Unit::Bytes,
            "bytes appended to the log"
        );
        describe_gauge!("idemkv_live_records", Unit::Count, "records in memory");
        describe_gauge!(
            "idemkv_disk_bytes",
            Unit::Bytes,
            "bytes of all segment files"
        );
        describe_gauge!(
            "idemkv_live_bytes",
            Unit::Bytes,
            "estimated bytes of live records on disk, as of the last compaction pass"
        );
        describe_gauge!("idemkv_segments", Unit::Count, "segment files");
        describe_gauge!(
            "idemkv_index_bytes",
            Unit::Bytes,
            "estimated heap bytes of the in-memory index"
        );
        describe_histogram!("idemkv_begin_seconds", Unit::Seconds, "latency of begin");
        describe_histogram!(
            "idemkv_complete_seconds",
            Unit::Seconds,
            "latency of complete"
        );
        describe_histogram!(
            "idemkv_wait_seconds",
            Unit::Seconds,
            "latency of wait and begin_wait"
        );
        describe_histogram!(
            "idemkv_fsync_seconds",
            Unit::Seconds,
            "latency of one fdatasync of a log segment"
        );
        describe_histogram!(
            "idemkv_fsync_records",
            Unit::Count,
            "records appended since the previous fdatasync (group commit size)"
        );
        describe_histogram!(
            "idemkv_recovery_seconds",
            Unit::Seconds,
            "time open took to recover the log"
        );
    });
}
