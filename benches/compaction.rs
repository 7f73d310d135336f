//! Foreground latency of begin+complete with and without compaction running
//! in the background, and open time after churn vs. the same live records
//! written once.
//!
//! Run: `cargo bench --bench compaction`. Besides criterion's estimates it
//! prints p50/p99 of single begin+complete calls measured in one run.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use idemkv::{Begin, Durability, Engine, Fingerprint, ManualClock, Options, Outcome};

fn options(clock: &Arc<ManualClock>) -> Options {
    Options {
        durability: Durability::None,
        background: false,
        segment_bytes: 4 << 20,
        record_ttl: Duration::from_secs(3600),
        clock: clock.clone(),
        ..Options::default()
    }
}

fn pair(engine: &Engine, key: &str, body: &bytes::Bytes) {
    let Begin::Started(lease) = engine
        .begin("merchant", key, Fingerprint::of(key.as_bytes()))
        .expect("begin")
    else {
        panic!("{key} not started");
    };
    engine
        .complete(
            &lease,
            Outcome {
                status: 200,
                body: body.clone(),
            },
        )
        .expect("complete");
}

/// Keeps a compaction pass running in a loop while `f` runs; each pass moves
/// the clock one second, so records (20 s TTL here) keep expiring and every
/// pass has work, while a lease (30 s) never expires inside one call.
fn with_compaction<T>(engine: &Engine, clock: &ManualClock, on: bool, f: impl FnOnce() -> T) -> T {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        if on {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    clock.advance(Duration::from_secs(1));
                    engine.compact().expect("compact");
                }
            });
        }
        let out = f();
        stop.store(true, Ordering::Relaxed);
        out
    })
}

fn percentiles(label: &str, mut samples: Vec<Duration>) {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize];
    println!(
        "{label}: n={} p50={:?} p99={:?} p99.9={:?}",
        samples.len(),
        at(0.50),
        at(0.99),
        at(0.999)
    );
}

fn foreground_latency(c: &mut Criterion) {
    let body = bytes::Bytes::from(vec![b'r'; 160]);
    let short = |clock: &Arc<ManualClock>| Options {
        record_ttl: Duration::from_secs(20),
        ..options(clock)
    };
    let mut group = c.benchmark_group("begin_complete_under_compaction");
    group.throughput(Throughput::Elements(1));
    for on in [false, true] {
        let label = if on { "compacting" } else { "idle" };
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(ManualClock::new(0));
        let engine = Engine::open(dir.path(), short(&clock)).expect("open");
        // One run of single-call latencies for the percentiles.
        let samples = with_compaction(&engine, &clock, on, || {
            (0..200_000u64)
                .map(|i| {
                    let key = format!("p-{i:016x}");
                    let t = Instant::now();
                    pair(&engine, &key, &body);
                    t.elapsed()
                })
                .collect::<Vec<_>>()
        });
        percentiles(&format!("begin+complete, {label}"), samples);
        let mut i = 0u64;
        with_compaction(&engine, &clock, on, || {
            group.bench_function(BenchmarkId::new("pair", label), |b| {
                b.iter(|| {
                    i += 1;
                    pair(&engine, &format!("c-{i:016x}"), &body)
                })
            });
        });
    }
    group.finish();
}

fn recovery(c: &mut Criterion) {
    let live = 1_000_000u64;
    let body = bytes::Bytes::from(vec![b'r'; 160]);
    let clock = Arc::new(ManualClock::new(0));
    let churn_clock = Arc::new(ManualClock::new(0));
    // The same live records written once, and after four rounds of churn
    // (each round's records expire and are compacted away).
    let once = tempfile::tempdir().expect("tempdir");
    let churned = tempfile::tempdir().expect("tempdir");
    {
        let engine = Engine::open(once.path(), options(&clock)).expect("open");
        for i in 0..live {
            pair(&engine, &format!("live-{i:016x}"), &body);
        }
    }
    {
        let engine = Engine::open(churned.path(), options(&churn_clock)).expect("open");
        for round in 0..4 {
            for i in 0..live {
                pair(&engine, &format!("churn-{round}-{i:016x}"), &body);
            }
            churn_clock.advance(Duration::from_secs(3601));
            engine.compact().expect("compact");
        }
        for i in 0..live {
            pair(&engine, &format!("live-{i:016x}"), &body);
        }
        engine.compact().expect("compact");
    }
    let mut group = c.benchmark_group("recovery");
    group.sample_size(10);
    group.throughput(Throughput::Elements(live));
    for (label, dir, clock) in [
        ("written_once", &once, &clock),
        ("after_churn", &churned, &churn_clock),
    ] {
        group.bench_function(BenchmarkId::new("open_1M_live", label), |b| {
            b.iter(|| {
                let engine = Engine::open(dir.path(), options(clock)).expect("open");
                assert_eq!(engine.stats().live_records, live);
                engine
            })
        });
    }
    group.finish();
}

criterion_group!(benches, foreground_latency, recovery);
criterion_main!(benches);
