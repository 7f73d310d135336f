//! Measures how fast `Engine::open` replays a directory: writes N completed
//! records (160-byte bodies) into a temporary directory, closes it, then
//! times a few opens and prints records replayed per second.
//!
//! Run: `cargo run --release --example open_time -- 1000000`

use std::time::{Duration, Instant};

use idemkv::{Begin, Durability, Engine, Fingerprint, Options, Outcome};

fn main() -> idemkv::Result<()> {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let options = || Options {
        durability: Durability::None,
        background: false,
        ..Options::default()
    };
    {
        let engine = Engine::open(dir.path(), options())?;
        let body = bytes::Bytes::from(vec![b'r'; 160]);
        for i in 0..n {
            let key = format!("{i:016x}-0000-4000-8000-000000000000");
            if let Begin::Started(lease) =
                engine.begin("merchant", &key, Fingerprint::of(key.as_bytes()))?
            {
                engine.complete(
                    &lease,
                    Outcome {
                        status: 200,
                        body: body.clone(),
                    },
                )?;
            }
        }
        engine.compact()?; // keep only the live (completed) records
    }
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let engine = Engine::open(dir.path(), options())?;
        let took = t.elapsed();
        assert_eq!(engine.stats().live_records, n);
        best = best.min(took);
    }
    println!(
        "open with {n} live records: best of 3 {:.3} s, {:.2} M records/s",
        best.as_secs_f64(),
        n as f64 / best.as_secs_f64() / 1e6
    );
    Ok(())
}
