//! Counters an operator can export: a plain [`Stats`] snapshot read from
//! relaxed atomics that the hot path bumps.

use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of the engine's counters since open ([`Engine::stats`](crate::Engine::stats)).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Calls to `begin` that passed validation.
    pub begins: u64,
    /// `begin` calls answered `Started` (takeovers included).
    pub started: u64,
    /// `begin` calls answered `Replay`.
    pub replays: u64,
    /// `begin` calls answered `InFlight`.
    pub in_flight: u64,
    /// `begin` calls answered `Mismatch`.
    pub mismatches: u64,
    /// `Started` answers that took over an expired lease.
    pub takeovers: u64,
    /// `complete`, `extend` and `release` calls refused with `LeaseLost`.
    pub lease_lost: u64,
    /// Expired records or leases found (and treated as absent) by `begin`.
    pub expirations: u64,
    /// Successful `complete` calls.
    pub completions: u64,
    /// Successful `release` calls.
    pub releases: u64,
    /// Lease extends made by the engine's heartbeat thread
    /// (`Engine::heartbeat`, `run_once_with`'s heartbeat, the HTTP layer);
    /// `Engine::extend` calls are not counted.
    pub heartbeats: u64,
    /// Bytes appended to the log (framing included).
    pub bytes_written: u64,
    /// Records appended to the log.
    pub records_written: u64,
    /// fdatasync calls on log segments.
    pub fsyncs: u64,
    /// Write system calls on log segments: appends are buffered by the log
    /// and written once per group-commit round (or when the buffer fills,
    /// or on a short timer without `Durability::Sync`).
    pub log_writes: u64,
    /// Bytes appended to the log but not yet written to its file (a
    /// gauge): they reach the file at the next group-commit round, when
    /// the buffer fills, or on the flusher's timer without `Sync`.
    pub log_pending_bytes: u64,
    /// Records held by the index (expired ones not yet swept included).
    pub live_records: u64,
    /// Log segment files on disk that belong to the log (the empty spare a
    /// roll makes ahead of time for the next roll is not counted).
    pub segments: u64,
    /// Expired records and leases the sweeper removed from the index.
    pub swept: u64,
    /// Segments rewritten or removed by compaction.
    pub segments_compacted: u64,
    /// Bytes of segment files compaction gave back.
    pub bytes_reclaimed: u64,
    /// How long the last compaction pass took, in microseconds.
    pub last_compaction_us: u64,
    /// Bytes in all segment files now (the spare's header included).
    pub disk_bytes: u64,
    /// Estimated bytes of live records on disk, as of the last compaction
    /// pass (each segment's size times its live fraction).
    pub live_bytes: u64,
    /// Compaction passes that failed, background ones and `compact` /
    /// `compact_pass` calls (each one left every file as it was, or
    /// replaced by its complete rewrite, and removed its unfinished output;
    /// the background's next pass tries again). A pass refused before it
    /// started (the engine closed, a reentrant call) is not counted. With
    /// the `tracing` feature each background failure is also an error
    /// event.
    pub compaction_errors: u64,
    /// Compaction passes that ran to the end, background ones and calls.
    pub compactions: u64,
    /// I/O errors the log met: failed writes, syncs and file removals (each
    /// also poisons the log), failed reads of records, and the I/O errors
    /// of failed compaction passes. Errors at open are returned, not
    /// counted.
    pub io_errors: u64,
    /// Slots allocated by the index's digest tables, empty ones included
    /// (each [`INDEX_SLOT_BYTES`] plus a control byte). The tables grow by
    /// doubling, so this is between about 1.14 and 2.3 times `live_records`.
    pub index_slots: u64,
    /// Estimated heap bytes of the index: its tables' slots and control
    /// bytes, and the full keys of the rare spilled (digest-colliding) live
    /// keys. The allocator's own overhead is not included.
    pub index_bytes: u64,
}

/// Bytes of one slot of the index's digest tables: a 64-bit digest of
/// `(user, key)` and a packed entry (see [`Stats::index_slots`]).
pub const INDEX_SLOT_BYTES: usize = crate::index::SLOT_BYTES;

/// The live counters behind [`Stats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub begins: Striped,
    pub started: Striped,
    pub replays: Striped,
    pub in_flight: Striped,
    pub mismatches: Striped,
    pub takeovers: AtomicU64,
    pub lease_lost: AtomicU64,
    pub expirations: AtomicU64,
    pub completions: Striped,
    pub releases: Striped,
    pub heartbeats: AtomicU64,
    pub bytes_written: AtomicU64,
    pub records_written: AtomicU64,
    pub fsyncs: AtomicU64,
    pub log_writes: AtomicU64,
    pub swept: AtomicU64,
    pub segments_compacted: AtomicU64,
    pub bytes_reclaimed: AtomicU64,
    pub last_compaction_us: AtomicU64,
    pub live_bytes: AtomicU64,
    pub compaction_errors: AtomicU64,
    pub compactions: AtomicU64,
    pub io_errors: AtomicU64,
    /// `records_written` as of the last segment sync (the next sync's
    /// group size is the difference).
    pub synced_records: AtomicU64,
    /// The `metrics` feature's histograms (nothing without it).
    pub histograms: crate::metrics::Histograms,
}

/// Adds one to a counter.
pub(crate) fn bump(counter: &impl Bump) {
    counter.bump();
}

/// A counter [`bump`] can add one to.
pub(crate) trait Bump {
    /// Adds one.
    fn bump(&self);
}

impl Bump for AtomicU64 {
    fn bump(&self) {
        self.fetch_add(1, Ordering::Relaxed);
    }
}

/// Stripes of a counter bumped on every call: each thread adds to a stripe
/// of its own cache line, so two cores replaying records at millions a
/// second do not pass one line back and forth (measured: a shared counter
/// bumped twice per replay costs about a cache miss each). Reads sum them.
#[derive(Debug, Default)]
pub(crate) struct Striped([Stripe; STRIPES]);

/// How many stripes: enough for the cores this runs on; threads share them
/// round robin beyond that.
const STRIPES: usize = 8;

#[derive(Debug, Default)]
#[repr(align(128))]
struct Stripe(AtomicU64);

impl Striped {
    /// The sum of the stripes.
    pub fn get(&self) -> u64 {
        self.0
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }
}

impl Bump for Striped {
    fn bump(&self) {
        thread_local! {
            static STRIPE: usize = {
                static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
                NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES
            };
        }
        let i = STRIPE.with(|s| *s);
        if let Some(stripe) = self.0.get(i) {
            stripe.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Counters {
    /// Reads every counter; the caller fills in the gauges.
    pub fn snapshot(&self) -> Stats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            begins: self.begins.get(),
            started: self.started.get(),
            replays: self.replays.get(),
            in_flight: self.in_flight.get(),
            mismatches: self.mismatches.get(),
            takeovers: get(&self.takeovers),
            lease_lost: get(&self.lease_lost),
            expirations: get(&self.expirations),
            completions: self.completions.get(),
            releases: self.releases.get(),
            heartbeats: get(&self.heartbeats),
            bytes_written: get(&self.bytes_written),
            records_written: get(&self.records_written),
            fsyncs: get(&self.fsyncs),
            log_writes: get(&self.log_writes),
            log_pending_bytes: 0,
            live_records: 0,
            segments: 0,
            swept: get(&self.swept),
            segments_compacted: get(&self.segments_compacted),
            bytes_reclaimed: get(&self.bytes_reclaimed),
            last_compaction_us: get(&self.last_compaction_us),
            disk_bytes: 0,
            live_bytes: get(&self.live_bytes),
            compaction_errors: get(&self.compaction_errors),
            compactions: get(&self.compactions),
            io_errors: get(&self.io_errors),
            index_slots: 0,
            index_bytes: 0,
        }
    }
}
