//! The main job: a payment service behind an unreliable network, kept
//! exactly-once by idemkv.
//!
//! Clients send charges with an idempotency key. The network drops
//! responses (the client retries with the same key), duplicates requests,
//! and users double-click (two identical requests at once). Some workers
//! crash after claiming a key and before charging: their lease expires and
//! a retry takes the key over. An independent ledger counts every charge
//! actually executed; the run fails unless each charge ran exactly once.
//!
//! Run: `cargo run --release --example payments`

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use idemkv::{Begin, Engine, Fingerprint, Options, Outcome};
use parking_lot::Mutex;

const CLIENTS: u64 = 16;
const CHARGES_PER_CLIENT: u64 = 400;
const MERCHANTS: u64 = 8;
const DROP_RESPONSE: u64 = 15; // percent of responses lost on the way back
const DUPLICATE: u64 = 5; // percent of requests the network delivers twice
const DOUBLE_CLICK: u64 = 5; // percent of charges sent twice at once
const WORKER_CRASH: u64 = 3; // percent of claims whose worker dies before charging

/// Counts of what happened, for the report.
#[derive(Default)]
struct Counts {
    requests: AtomicU64,
    executed: AtomicU64,
    replays: AtomicU64,
    in_flight: AtomicU64,
    crashes: AtomicU64,
    dropped: AtomicU64,
}

/// The payment processor's own record of executed charges: independent of
/// idemkv, it is what the check at the end trusts.
#[derive(Default)]
struct Ledger {
    charges: Mutex<HashMap<(String, String), u32>>,
}

/// A small deterministic generator (xorshift64*), so runs are repeatable.
struct Rng(u64);

impl Rng {
    fn percent(&mut self, p: u64) -> bool {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % 100 < p
    }
}

/// What the service answers one request.
enum Reply {
    Done(Outcome),
    Busy(Duration),
    Crashed,
}

/// The service's handler for `POST /charge`.
fn handle(
    engine: &Engine,
    ledger: &Ledger,
    counts: &Counts,
    rng: &mut Rng,
    user: &str,
    key: &str,
    body: &str,
) -> Reply {
    counts.requests.fetch_add(1, Ordering::Relaxed);
    match engine.begin(user, key, Fingerprint::of(body.as_bytes())) {
        Ok(Begin::Started(lease)) => {
            if rng.percent(WORKER_CRASH) {
                counts.crashes.fetch_add(1, Ordering::Relaxed);
                return Reply::Crashed; // the lease is abandoned and expires
            }
            *ledger
                .charges
                .lock()
                .entry((user.into(), key.into()))
                .or_default() += 1;
            counts.executed.fetch_add(1, Ordering::Relaxed);
            let receipt = format!(
                "{{\"charge\":\"ch_{user}_{key}\",\"token\":{}}}",
                lease.token()
            );
            let outcome = Outcome {
                status: 201,
                body: receipt.into(),
            };
            match engine.complete(&lease, outcome.clone()) {
                Ok(()) => Reply::Done(outcome),
                Err(e) => panic!("complete failed: {e}"),
            }
        }
        Ok(Begin::Replay(outcome)) => {
            counts.replays.fetch_add(1, Ordering::Relaxed);
            Reply::Done(outcome)
        }
        Ok(Begin::InFlight { retry_after }) => {
            counts.in_flight.fetch_add(1, Ordering::Relaxed);
            Reply::Busy(retry_after.min(Duration::from_millis(20)))
        }
        Ok(Begin::Mismatch) => panic!("a retry reused its key with another body"),
        Err(e) => panic!("begin failed: {e}"),
    }
}

/// One client: sends a charge and retries with the same key until it gets
/// a response through the lossy network.
fn send_until_answered(
    engine: &Engine,
    ledger: &Ledger,
    counts: &Counts,
    rng: &mut Rng,
    user: &str,
    key: &str,
    body: &str,
) {
    loop {
        if rng.percent(DUPLICATE) {
            // The network delivers the request twice; the copy's answer is lost.
            let _ = handle(engine, ledger, counts, rng, user, key, body);
        }
        match handle(engine, ledger, counts, rng, user, key, body) {
            Reply::Done(outcome) => {
                assert_eq!(outcome.status, 201);
                if rng.percent(DROP_RESPONSE) {
                    counts.dropped.fetch_add(1, Ordering::Relaxed);
                    continue; // the response never arrived: retry
                }
                return;
            }
            Reply::Busy(wait) => std::thread::sleep(wait),
            Reply::Crashed => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn main() -> ExitCode {
    let dir = match tempfile::tempdir() {
        Ok(dir) => dir,
        Err(e) => {
            eprintln!("cannot create a temporary directory: {e}");
            return ExitCode::FAILURE;
        }
    };
    let options = Options {
        lease_ttl: Duration::from_millis(100),
        ..Options::default()
    };
    let engine = match Engine::open(dir.path(), options) {
        Ok(engine) => Arc::new(engine),
        Err(e) => {
            eprintln!("cannot open the engine: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "payments demo: {CLIENTS} clients x {CHARGES_PER_CLIENT} charges, {MERCHANTS} merchants, durability Sync, data in {}",
        dir.path().display()
    );
    let ledger = Arc::new(Ledger::default());
    let counts = Arc::new(Counts::default());
    let done = Arc::new(AtomicBool::new(false));
    let start = Instant::now();

    let progress = {
        let (counts, done) = (Arc::clone(&counts), Arc::clone(&done));
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(500));
                eprint!(
                    "\r  {:>6} requests, {:>6} charges executed, {:>6} replays ...",
                    counts.requests.load(Ordering::Relaxed),
                    counts.executed.load(Ordering::Relaxed),
                    counts.replays.load(Ordering::Relaxed),
                );
            }
            eprintln!();
        })
    };

    std::thread::scope(|s| {
        for client in 0..CLIENTS {
            let (engine, ledger, counts) = (&engine, &ledger, &counts);
            s.spawn(move || {
                let mut rng =
                    Rng(0x9e37_79b9_7f4a_7c15 ^ (client + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9));
                let user = format!("merchant-{}", client % MERCHANTS);
                for n in 0..CHARGES_PER_CLIENT {
                    let key = format!("{client:04x}-{n:08x}-charge");
                    let body = format!("{{\"amount\":{},\"currency\":\"EUR\"}}", 100 + n);
                    if rng.percent(DOUBLE_CLICK) {
                        // Two identical requests at once: both must get the same charge.
                        std::thread::scope(|inner| {
                            let mut other = Rng(rng.0 ^ 0xdead_beef);
                            let (user, key, body) = (&user, &key, &body);
                            inner.spawn(move || {
                                send_until_answered(
                                    engine, ledger, counts, &mut other, user, key, body,
                                )
                            });
                            send_until_answered(engine, ledger, counts, &mut rng, user, key, body);
                        });
                    } else {
                        send_until_answered(engine, ledger, counts, &mut rng, &user, &key, &body);
                    }
                }
            });
        }
    });
    done.store(true, Ordering::Relaxed);
    let _ = progress.join();
    let elapsed = start.elapsed();

    let charges = ledger.charges.lock();
    let expected = CLIENTS * CHARGES_PER_CLIENT;
    let duplicates: u64 = charges
        .values()
        .map(|&n| u64::from(n.saturating_sub(1)))
        .sum();
    let missing = expected - charges.len() as u64;
    let stats = engine.stats();
    let requests = counts.requests.load(Ordering::Relaxed);
    println!("requests sent:               {requests}");
    println!("distinct charges requested:  {expected}");
    println!(
        "charges executed:            {}",
        counts.executed.load(Ordering::Relaxed)
    );
    println!(
        "duplicates prevented:        {}",
        requests - counts.executed.load(Ordering::Relaxed)
    );
    println!(
        "replays served:              {}",
        counts.replays.load(Ordering::Relaxed)
    );
    println!(
        "answered in-flight (409):    {}",
        counts.in_flight.load(Ordering::Relaxed)
    );
    println!(
        "responses lost by network:   {}",
        counts.dropped.load(Ordering::Relaxed)
    );
    println!(
        "workers crashed mid-request: {}",
        counts.crashes.load(Ordering::Relaxed)
    );
    println!("leases taken over:           {}", stats.takeovers);
    println!(
        "fsyncs (group commit):       {} for {} log records",
        stats.fsyncs, stats.records_written
    );
    println!(
        "throughput:                  {:.0} requests/s ({:.2} s)",
        requests as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64()
    );
    println!("charges never executed:      {missing}");
    println!("duplicate charges: {duplicates}");
    if duplicates == 0 && missing == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
