//! Open time per million live records: `Engine::open` (which replays the
//! log into the index) followed by `close`, on a directory holding
//! 1 000 000 completed records (160-byte bodies, spread over 10 000 users).
//!
//! Run: `cargo bench --bench recovery` (about 30 seconds).
//!
//! - `as_written`: the log as the records were written, a begin and a
//!   complete record per key.
//! - `compacted`: the same records after `Engine::compact`, run once every
//!   lease had expired, so only the complete records remain.
//!
//! Each directory is built once (`Durability::None`, no background thread)
//! and closed, then opened and closed repeatedly; the files stay in the
//! page cache, so this is the CPU cost of recovery, not the disk's read
//! speed. Throughput is `Elements(1_000_000)` per open, so criterion's
//! `thrpt` reads as records recovered per second. Both directories use a
//! `ManualClock` that does not move while measuring, so no record expires
//! and every open recovers all of them (checked). `benches/compaction.rs`
//! measures open time after churn.

use std::cell::OnceCell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{
    BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use idemkv::{Begin, Durability, Engine, Fingerprint, ManualClock, Options, Outcome};

const RECORDS: u64 = 1_000_000;
/// Distinct user ids the records are spread over.
const USERS: u64 = 10_000;
const BODY: &[u8] = &[b'x'; 160];
/// 2026-01-01T00:00:00Z in ms: where the manual clock starts.
const START_MS: u64 = 1_767_225_600_000;

fn options(clock: &Arc<ManualClock>) -> Options {
    Options {
        durability: Durability::None,
        background: false,
        clock: clock.clone(),
        ..Options::default()
    }
}

/// A directory with `RECORDS` completed records, compacted (after every
/// lease expired) or as written.
fn build(compacted: bool, clock: &Arc<ManualClock>) -> tempfile::TempDir {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(dir.path(), options(clock)).expect("open");
    let users: Vec<String> = (0..USERS).map(|u| format!("user-{u}")).collect();
    let fingerprint = Fingerprint::of(b"req");
    for i in 0..RECORDS {
        let key = format!("{:016x}-{:08x}", i.wrapping_mul(0x9e37_79b9_7f4a_7c15), i);
        let user = &users[(i % USERS) as usize];
        let Begin::Started(lease) = engine.begin(user, &key, fingerprint).expect("begin") else {
            panic!("record {i}: a fresh key was not started");
        };
        let outcome = Outcome {
            status: 200,
            body: bytes::Bytes::from_static(BODY),
        };
        engine.complete(&lease, outcome).expect("complete");
    }
    if compacted {
        // Past every lease (30 s), well before the records expire (24 h):
        // compaction can then drop the superseded begin records.
        clock.advance(Duration::from_secs(60));
        let report = engine.compact().expect("compact");
        eprintln!(
            "recovery: compaction kept {} records, dropped {}, {} -> {} bytes",
            report.records_kept, report.records_dropped, report.bytes_before, report.bytes_after
        );
    }
    let stats = engine.stats();
    assert_eq!(stats.live_records, RECORDS);
    engine.close().expect("close");
    eprintln!(
        "recovery: built {} ({} segments, {} bytes) in {:.1} s",
        if compacted { "compacted" } else { "as_written" },
        stats.segments,
        stats.disk_bytes,
        started.elapsed().as_secs_f64()
    );
    dir
}

fn recovery(c: &mut Criterion) {
    let mut group = c.benchmark_group("recovery_open");
    // Each open takes a large fraction of a second: the same number of
    // opens per sample, about one.
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Elements(RECORDS));
    for (name, compacted) in [("as_written", false), ("compacted", true)] {
        let clock = Arc::new(ManualClock::new(START_MS));
        // Built by the first sample (not at all if filtered out).
        let dir = OnceCell::new();
        group.bench_function(BenchmarkId::new(name, "1M_records"), |b| {
            let dir = dir.get_or_init(|| build(compacted, &clock));
            b.iter(|| {
                let engine = Engine::open(dir.path(), options(&clock)).expect("open");
                assert_eq!(engine.stats().live_records, RECORDS);
                engine.close().expect("close");
            })
        });
    }
    group.finish();
}

criterion_group!(benches, recovery);
criterion_main!(benches);
