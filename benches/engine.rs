//! Criterion benchmarks of the hot paths: `get` lookups, the
//! begin → complete cycle in each durability mode, and replays.
//!
//! Run: `cargo bench --bench engine`

use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use idemkv::{Begin, Durability, Engine, Fingerprint, Options, Outcome};

const BODY: &[u8; 160] = &[b'x'; 160];

fn open(durability: Durability) -> (tempfile::TempDir, Engine) {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(
        dir.path(),
        Options {
            durability,
            ..Options::default()
        },
    )
    .expect("open");
    (dir, engine)
}

fn key(i: u64) -> String {
    format!("{:016x}-{:08x}", i.wrapping_mul(0x9e37_79b9_7f4a_7c15), i)
}

fn fill(engine: &Engine, n: u64) {
    for i in 0..n {
        fill_one(engine, i);
    }
}

fn lookup(c: &mut Criterion) {
    let n = 100_000;
    let (_dir, engine) = open(Durability::None);
    fill(&engine, n);
    let keys: Vec<String> = (0..n).map(key).collect();
    let mut group = c.benchmark_group("lookup");
    group.throughput(Throughput::Elements(1));
    group.bench_function(BenchmarkId::new("get_hit", n), |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = (i + 7919) % keys.len();
            engine.get("user", &keys[i]).expect("get")
        })
    });
    group.bench_function(BenchmarkId::new("get_miss", n), |b| {
        let mut i = 0u64;
        b.iter(|| {
            i += 1;
            engine.get("user", key(n + i)).expect("get")
        })
    });
    group.bench_function(BenchmarkId::new("replay", n), |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = (i + 7919) % keys.len();
            engine
                .begin("user", &keys[i], Fingerprint::of(b"req"))
                .expect("begin")
        })
    });
    group.finish();
}

fn begin_complete(c: &mut Criterion) {
    let mut group = c.benchmark_group("begin_complete");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(5));
    for (name, durability) in [("none", Durability::None), ("sync", Durability::Sync)] {
        let (_dir, engine) = open(durability);
        let engine = Arc::new(engine);
        let mut i = 0u64;
        group.bench_function(BenchmarkId::new(name, 1), |b| {
            b.iter(|| {
                i += 1;
                fill_one(&engine, i)
            })
        });
        if durability == Durability::Sync {
            // 64 concurrent callers: elements are begin+complete pairs.
            let threads = 64u64;
            group.throughput(Throughput::Elements(threads));
            group.bench_function(BenchmarkId::new(name, threads), |b| {
                b.iter(|| {
                    i += threads;
                    let base = i;
                    std::thread::scope(|s| {
                        for t in 0..threads {
                            let engine = &engine;
                            s.spawn(move || fill_one(engine, base * 1000 + t));
                        }
                    });
                })
            });
            group.throughput(Throughput::Elements(1));
        }
    }
    group.finish();
}

fn fill_one(engine: &Engine, i: u64) {
    let Begin::Started(lease) = engine
        .begin("user", key(i), Fingerprint::of(b"req"))
        .expect("begin")
    else {
        panic!("fresh key not started");
    };
    engine
        .complete(
            &lease,
            Outcome {
                status: 200,
                body: BODY[..].into(),
            },
        )
        .expect("complete");
}

criterion_group!(benches, lookup, begin_complete);
criterion_main!(benches);
