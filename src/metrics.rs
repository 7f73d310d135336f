//! Counters, gauges and histograms through the [`metrics`] facade (the
//! `metrics` cargo feature), so any exporter works: Prometheus, StatsD,
//! OpenTelemetry. Without the feature nothing here is compiled in and
//! [`Engine::stats`](crate::Engine::stats) is the way to read the same
//! numbers.
//!
//! # The metrics
//!
//! | name | type | labels | what |
//! |---|---|---|---|
//! | `idemkv_begins_total` | counter | `answer`: `started`, `replay`, `in_flight`, `mismatch` | `begin` answers (sync, async and HTTP callers, `begin_wait`'s included) |
//! | `idemkv_takeovers_total` | counter | | `started` answers that took over an expired lease |
//! | `idemkv_lease_lost_total` | counter | | `complete`, `extend`, `release` refused with `LeaseLost` |
//! | `idemkv_completions_total` | counter | | successful `complete` calls |
//! | `idemkv_releases_total` | counter | | successful `release` calls |
//! | `idemkv_heartbeats_total` | counter | | lease extends made by the heartbeat thread |
//! | `idemkv_expirations_swept_total` | counter | | expired records and leases the sweeper removed from memory |
//! | `idemkv_compactions_total` | counter | | compaction passes that ran to the end (background and `compact`) |
//! | `idemkv_compaction_failures_total` | counter | | compaction passes that failed |
//! | `idemkv_io_errors_total` | counter | | I/O errors the log met: failed writes, syncs and file removals (each poisons the log), failed reads, failed compaction steps |
//! | `idemkv_fsyncs_total` | counter | | fdatasync calls on log segments |
//! | `idemkv_written_bytes_total` | counter | | bytes appended to the log |
//! | `idemkv_live_records` | gauge | | records in memory (expired ones not yet swept included) |
//! | `idemkv_disk_bytes` | gauge | | bytes of all segment files |
//! | `idemkv_live_bytes` | gauge | | estimated bytes of live records on disk (as of the last compaction pass) |
//! | `idemkv_segments` | gauge | | segment files |
//! | `idemkv_index_bytes` | gauge | | estimated heap bytes of the in-memory index |
//! | `idemkv_begin_seconds` | histogram | | latency of `begin` (and each try of `begin_wait`) |
//! | `idemkv_complete_seconds` | histogram | | latency of `complete` and `complete_with_ttl` |
//! | `idemkv_wait_seconds` | histogram | | latency of `wait` and `begin_wait` (a nonzero timeout), whole calls |
//! | `idemkv_fsync_seconds` | histogram | | latency of one fdatasync of a log segment |
//! | `idemkv_fsync_records` | histogram | | records appended since the previous fdatasync (the group commit's size) |
//! | `idemkv_recovery_seconds` | histogram | | time `Engine::open` took to recover the log |
//!
//! Latencies are seconds, sizes bytes, as Prometheus names them. A latency
//! covers calls that failed too; an async call's covers its future from the
//! first poll to its answer (a dropped future records nothing).
//!
//! # How values reach the recorder
//!
//! - **Histograms** are recorded as the events happen, on handles the
//!   engine registers when it opens: install the recorder (for example
//!   `metrics_exporter_prometheus::PrometheusBuilder::install_recorder`)
//!   **before** `Engine::open`, or an engine's histograms go nowhere. Each
//!   timed call reads the clock twice more; that is all the feature costs
//!   the hot path.
//! - **Counters and gauges** are copied from the engine's own counters by
//!   [`Engine::publish_metrics`](crate::Engine::publish_metrics): the
//!   background thread (`Options::background`) calls it every second,
//!   `close` calls it a last time and takes the closed engine's gauges back
//!   out. Call it yourself right before rendering a scrape to serve exact
//!   numbers (the `axum_service` example does). The hot path keeps bumping
//!   only the per-thread counters it bumps anyway.
//! - Several engines in one process add up: each one publishes the
//!   increments since its last publish (and its gauges' changes), so the
//!   recorder holds their sums. Label them apart, if needed, in the
//!   exporter (e.g. one process per engine, or global labels).

#[cfg(feature = "metrics")]
mod on;

#[cfg(feature = "metrics")]
pub(crate) use on::{Histograms, Published};

#[cfg(not(feature = "metrics"))]
mod off {
    use crate::stats::Stats;

    /// Without the `metrics` feature: nothing.
    #[derive(Debug, Default)]
    pub(crate) struct Histograms;

    /// Without the `metrics` feature: nothing.
    pub(crate) struct Timer;

    /// Without the `metrics` feature: nothing.
    #[derive(Debug, Default)]
    pub(crate) struct Published;

    impl Histograms {
        pub fn time(&self, _op: super::Op) -> Timer {
            Timer
        }
        pub fn fsync(&self, _seconds: f64, _records: u64) {}
        pub fn recovery(&self, _seconds: f64) {}
    }

    impl Published {
        pub fn publish(&self, _now: &Stats) {}
        pub fn withdraw(&self) {}
    }
}

#[cfg(not(feature = "metrics"))]
pub(crate) use off::{Histograms, Published};

/// A timed call.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Op {
    Begin,
    Complete,
    Wait,
}
