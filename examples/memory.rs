//! Measures resident memory per live record: opens an engine, writes N
//! completed records with 160-byte bodies, and prints the RSS growth divided
//! by N. Bodies stay on disk, so this is the index's cost per record.
//!
//! Run: `cargo run --release --example memory -- 2000000`

use idemkv::{Begin, Durability, Engine, Fingerprint, Options, Outcome};

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn main() -> idemkv::Result<()> {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(
        dir.path(),
        Options {
            durability: Durability::None,
            ..Options::default()
        },
    )?;
    let body = bytes::Bytes::from(vec![b'x'; 160]);
    let before = rss_bytes();
    for i in 0..n {
        let key = format!(
            "{:08x}-{:04x}-4{:03x}-{:012x}",
            i.wrapping_mul(2_654_435_761),
            i & 0xffff,
            i & 0xfff,
            i
        );
        let user = format!("user-{}", i % 1000);
        if let Begin::Started(lease) = engine.begin(&user, &key, Fingerprint::of(key.as_bytes()))? {
            engine.complete(
                &lease,
                Outcome {
                    status: 200,
                    body: body.clone(),
                },
            )?;
        }
    }
    let after = rss_bytes();
    let live = engine.stats().live_records;
    println!(
        "{live} live records: RSS grew {:.1} MiB, {:.1} bytes per record",
        (after - before) as f64 / (1 << 20) as f64,
        (after - before) as f64 / live as f64
    );
    Ok(())
}
