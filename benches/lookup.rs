//! `Engine::get` (memory only: the index, never the log) on stores of 1 M
//! and 10 M completed records spread over 10 000 users: hits and misses,
//! uniform and hot-key (Zipf, s = 1.0) access, on 1 and 2 threads.
//!
//! Run: `cargo bench --bench lookup` (about 2.5 minutes on 2 cores;
//! filling the 10 M store takes about 35 s, and the process peaks at about
//! 700 MB of RAM). Skip the 10 M store with
//! `IDEMKV_BENCH_BIG=0 cargo bench --bench lookup`; pick benchmarks with a
//! filter, e.g. `cargo bench --bench lookup -- 'lookup_1M/hit'`.
//!
//! - Each store is filled once (begin + complete per key,
//!   `Durability::None`, no background thread), when the first benchmark
//!   that needs it runs, and reused for all its benchmarks.
//! - Record `i` has user `user-{i % 10000}` and key
//!   `{i * 0x9e3779b97f4a7c15:016x}-{i:08x}` (the same shape as the other
//!   benches). Hits probe records `0..n`, misses keys `n..2n`, which were
//!   never written.
//! - The probed keys are generated before measuring (SplitMix64, fixed
//!   seeds): 2^20 probes per store and access pattern, with user and key
//!   bytes inline, read in order and wrapping around. Uniform draws indices
//!   evenly; hot-key draws a Zipf rank `k` (P(k) ∝ 1/k, exact
//!   rejection-inversion sampling) and probes index `k - 1`, so record 0
//!   is the hottest.
//! - Every benchmark runs through `iter_custom`; 1 thread runs on the
//!   benchmark thread. With 2 threads, both are started for each sample (in
//!   a `std::thread::scope`) and wait on a barrier until both are up; then
//!   each notes its start, does `iters` lookups from its own half of the
//!   probe array and notes its end. The time returned is the wall time from
//!   the first start to the last end (thread start-up is not timed).
//!   Throughput is `Elements(threads)` per iteration, so criterion's
//!   `thrpt` is the aggregate lookups/s over all threads, and its `time` is
//!   the wall time of one round of one lookup per thread.
//! - Each thread counts the hits it got and the benchmark fails if a hit
//!   probe missed or a miss probe hit.

mod common;

use common::{KEY_LEN, key};

use std::cell::OnceCell;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use idemkv::{Begin, Durability, Engine, Fingerprint, Options, Outcome};

/// Distinct user ids the records are spread over.
const USERS: u64 = 10_000;
/// Probes generated per store and access pattern (a power of two).
const PROBES: usize = 1 << 20;
/// Body of every stored outcome; `get` never reads it.
const BODY: &[u8] = &[b'x'; 32];
const USER_MAX: usize = 9; // "user-9999"

/// One `(user, key)` to look up, stored inline so that reading it costs no
/// pointer chase.
#[derive(Clone, Copy)]
struct Probe {
    user: [u8; USER_MAX],
    user_len: u8,
    key: [u8; KEY_LEN],
}

impl Probe {
    /// The user and key of record `i`.
    fn of(i: u64) -> Probe {
        let mut user = [0u8; USER_MAX];
        let text = format!("user-{}", i % USERS);
        user[..text.len()].copy_from_slice(text.as_bytes());
        Probe {
            user,
            user_len: text.len() as u8,
            key: key(i),
        }
    }

    fn user(&self) -> &[u8] {
        &self.user[..usize::from(self.user_len)]
    }
}

/// SplitMix64: a small deterministic generator for the probe indices.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Zipf ranks `1..=n` with P(k) ∝ 1/k: rejection-inversion sampling
/// (Hörmann and Derflinger 1996) specialised to exponent 1, where the
/// integral of the hat function is `ln x`.
struct Zipf {
    n: u64,
    h_x1: f64,
    h_n: f64,
    squeeze: f64,
}

impl Zipf {
    fn new(n: u64) -> Zipf {
        Zipf {
            n,
            h_x1: 1.5f64.ln() - 1.0,
            h_n: (n as f64 + 0.5).ln(),
            squeeze: 2.0 - (2.5f64.ln() - 0.5).exp(),
        }
    }

    fn sample(&self, rng: &mut SplitMix64) -> u64 {
        loop {
            let u = self.h_n + rng.unit() * (self.h_x1 - self.h_n);
            let x = u.exp();
            let k = ((x + 0.5) as u64).clamp(1, self.n);
            let kf = k as f64;
            if kf - x <= self.squeeze || u >= (kf + 0.5).ln() - 1.0 / kf {
                return k;
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Access {
    Uniform,
    Zipf,
}

/// `PROBES` probes of records `base..base + n` drawn with `access`.
fn probes(n: u64, base: u64, access: Access, seed: u64) -> Vec<Probe> {
    let mut rng = SplitMix64(seed);
    let zipf = Zipf::new(n);
    (0..PROBES)
        .map(|_| {
            let i = match access {
                Access::Uniform => rng.below(n),
                Access::Zipf => zipf.sample(&mut rng) - 1,
            };
            Probe::of(base + i)
        })
        .collect()
}

/// A filled engine and the probe arrays its benchmarks read.
struct Store {
    // Declared before `_dir`: the engine closes before the directory goes.
    engine: Engine,
    _dir: tempfile::TempDir,
    hit_uniform: Vec<Probe>,
    hit_zipf: Vec<Probe>,
    miss_uniform: Vec<Probe>,
    miss_zipf: Vec<Probe>,
}

impl Store {
    fn build(n: u64) -> Store {
        let started = Instant::now();
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = Engine::open(
            dir.path(),
            Options {
                durability: Durability::None,
                background: false,
                ..Options::default()
            },
        )
        .expect("open");
        let fingerprint = Fingerprint::of(b"req");
        let body = bytes::Bytes::from_static(BODY);
        for i in 0..n {
            let probe = Probe::of(i);
            let Begin::Started(lease) = engine
                .begin(probe.user(), probe.key, fingerprint)
                .expect("begin")
            else {
                panic!("record {i}: a fresh key was not started");
            };
            let outcome = Outcome {
                status: 200,
                body: body.clone(),
            };
            engine.complete(&lease, outcome).expect("complete");
        }
        assert_eq!(engine.stats().live_records, n);
        let store = Store {
            engine,
            _dir: dir,
            hit_uniform: probes(n, 0, Access::Uniform, 1),
            hit_zipf: probes(n, 0, Access::Zipf, 2),
            miss_uniform: probes(n, n, Access::Uniform, 3),
            miss_zipf: probes(n, n, Access::Zipf, 4),
        };
        eprintln!(
            "lookup: filled {n} records and built the probes in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        store
    }

    fn probes(&self, hit: bool, access: Access) -> &[Probe] {
        match (hit, access) {
            (true, Access::Uniform) => &self.hit_uniform,
            (true, Access::Zipf) => &self.hit_zipf,
            (false, Access::Uniform) => &self.miss_uniform,
            (false, Access::Zipf) => &self.miss_zipf,
        }
    }
}

/// `iters` lookups on each of `threads` threads, started together; returns
/// the wall time from the first thread's start to the last one's end.
fn timed_lookups(
    engine: &Engine,
    probes: &[Probe],
    threads: usize,
    iters: u64,
    hit: bool,
) -> Duration {
    let work = |thread: usize| {
        let mut at = thread * probes.len() / threads;
        let mut found = 0u64;
        for _ in 0..iters {
            let probe = &probes[at];
            at = (at + 1) & (PROBES - 1);
            let view = engine.get(probe.user(), probe.key).expect("get");
            found += u64::from(black_box(view).is_some());
        }
        let expected = if hit { iters } else { 0 };
        assert_eq!(found, expected, "{iters} lookups found {found} records");
    };
    common::timed_threads(threads, work)
}

fn lookup(c: &mut Criterion) {
    common::check_key();
    let big = std::env::var("IDEMKV_BENCH_BIG").map_or(true, |v| v != "0");
    let mut sizes = vec![("1M", 1_000_000u64)];
    if big {
        sizes.push(("10M", 10_000_000));
    } else {
        eprintln!("lookup: IDEMKV_BENCH_BIG=0, skipping the 10 M store");
    }
    for (label, n) in sizes {
        // Built by the first benchmark that runs (none if all are filtered
        // out), dropped before the next size is built.
        let store: OnceCell<Store> = OnceCell::new();
        let mut group = c.benchmark_group(format!("lookup_{label}"));
        group.sample_size(20);
        group.warm_up_time(Duration::from_secs(1));
        group.measurement_time(Duration::from_secs(3));
        for threads in [1usize, 2] {
            group.throughput(Throughput::Elements(threads as u64));
            let parameter = if threads == 1 {
                "1_thread".to_string()
            } else {
                format!("{threads}_threads")
            };
            let cases = [
                ("hit_uniform", true, Access::Uniform),
                ("hit_zipf", true, Access::Zipf),
                ("miss_uniform", false, Access::Uniform),
                ("miss_zipf", false, Access::Zipf),
            ];
            for (name, hit, access) in cases {
                group.bench_function(BenchmarkId::new(name, &parameter), |b| {
                    let store = store.get_or_init(|| Store::build(n));
                    let probes = store.probes(hit, access);
                    b.iter_custom(|iters| timed_lookups(&store.engine, probes, threads, iters, hit))
                });
            }
        }
        group.finish();
    }
}

criterion_group!(benches, lookup);
criterion_main!(benches);
