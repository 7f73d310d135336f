//! Measures resident memory per live record: opens an engine, writes N
//! completed records with 160-byte bodies spread over `--users` user ids,
//! and prints the RSS growth divided by N, with a breakdown of the index's
//! own share. Bodies stay on disk, so this is the index's cost per record.
//!
//! Run (issue 12's shape: 2 M records, 100 000 users, 32-character keys):
//! `cargo run --release --example memory -- 2000000 --users 100000 --key-len 32`
//!
//! Without flags: 1 000 users and 35-character UUID-like keys;
//! `cargo run --release --example memory -- 2000000` still works.

use idemkv::{Begin, Durability, Engine, Fingerprint, Options, Outcome};

/// A field of `/proc/self/status` in bytes (`VmRSS`, `VmHWM`).
fn status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

struct Args {
    records: u64,
    users: u64,
    key_len: Option<usize>,
}

fn args() -> Args {
    let mut a = Args {
        records: 1_000_000,
        users: 1000,
        key_len: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("{name} needs a number"))
        };
        match arg.as_str() {
            "--users" => a.users = value("--users").max(1),
            "--key-len" => a.key_len = Some(value("--key-len").clamp(1, 255) as usize),
            n => a.records = n.parse().unwrap_or_else(|_| panic!("not a count: {n}")),
        }
    }
    a
}

/// Record `i`'s key: the historical 35-character UUID-like key, or exactly
/// `len` hex characters ending in `i` (unique while `i < 16^len`).
fn key_of(i: u64, len: Option<usize>) -> String {
    match len {
        None => format!(
            "{:08x}-{:04x}-4{:03x}-{:012x}",
            i.wrapping_mul(2_654_435_761),
            i & 0xffff,
            i & 0xfff,
            i
        ),
        Some(len) => {
            let tail = format!("{:016x}{i:016x}", i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut key = tail.repeat(len.div_ceil(tail.len()));
            key.drain(..key.len() - len);
            key
        }
    }
}

fn main() -> idemkv::Result<()> {
    let a = args();
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(
        dir.path(),
        Options {
            durability: Durability::None,
            ..Options::default()
        },
    )?;
    let body = bytes::Bytes::from(vec![b'x'; 160]);
    let before = status_bytes("VmRSS");
    for i in 0..a.records {
        let key = key_of(i, a.key_len);
        let user = format!("user-{}", i % a.users);
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
    let after = status_bytes("VmRSS");
    let stats = engine.stats();
    let live = stats.live_records.max(1) as f64;
    let grew = after.saturating_sub(before) as f64;
    let key_len = a.key_len.map_or(35, |l| l);
    println!(
        "{} live records, {} users, {key_len}-char keys: RSS grew {:.1} MiB, {:.1} bytes per record (peak RSS {:.1} MiB)",
        stats.live_records,
        a.users,
        grew / (1 << 20) as f64,
        grew / live,
        status_bytes("VmHWM") as f64 / (1 << 20) as f64,
    );
    // The index's own share: its tables (slots and control bytes), the
    // rest of what it counts (a control tail per table, the full keys of
    // spilled, digest-colliding keys), and what is left of the growth
    // (allocator slack, buffers). The index keeps nothing per user or per
    // key byte: the user id only picks the shard and seeds the digest, and
    // keys stay in the log.
    let slots = stats.index_slots as f64;
    let table = slots * (idemkv::INDEX_SLOT_BYTES + 1) as f64;
    let other = stats.index_bytes as f64 - table;
    println!(
        "  tables: {} slots x ({} + 1 control) bytes = {:.1} B/record (load {:.2})",
        stats.index_slots,
        idemkv::INDEX_SLOT_BYTES,
        table / live,
        live / slots.max(1.0),
    );
    println!(
        "  other index bytes (control tails, spilled keys) {:.2} B/record, per user 0, rest of the growth {:.1} B/record",
        other.max(0.0) / live,
        (grew - stats.index_bytes as f64) / live,
    );
    Ok(())
}
