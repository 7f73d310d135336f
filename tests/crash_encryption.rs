//! The crash checker of `tests/common/crash_model.rs` with encryption at
//! rest on (issue 14, section 2; feature `encryption`): the same seeded
//! operation sequences, power losses (between and inside operations, torn
//! and garbled tails) and injected EIO/ENOSPC as `tests/crash.rs`, with
//! every body sealed, in every durability mode. The model compares every
//! replayed body byte for byte, so the engine must answer exactly as it
//! does without encryption. A second run rotates the key at every restart
//! (key `n + 1` seals after the `n`-th restart, every earlier key kept for
//! reading) and compacts with crash points and faults inside, so resealing
//! under a new key is crashed at every step too.

#[path = "common/crash_model.rs"]
mod crash_model;

use std::time::Instant;

use crash_model::{
    Case, LONG_PERIOD, Op, RunStats, decode, decode_compaction, run_case, run_case_with,
};
use idemkv::{Durability, EncryptionKeys, Options};

/// The bytes of key `id`.
fn key(id: u32) -> [u8; 32] {
    std::array::from_fn(|i| (id as u8).wrapping_mul(101) ^ (i as u8) ^ 0x5c)
}

/// Key 1 alone.
fn one_key(options: &mut Options, _opens: u64) {
    options.encryption = Some(EncryptionKeys::new(1, &key(1)).unwrap());
}

/// After `opens` opens: key `opens + 1` seals, keys `1..=opens` open.
fn rotating(options: &mut Options, opens: u64) {
    let current = u32::try_from(opens).unwrap() + 1;
    let keys = (1..current).fold(
        EncryptionKeys::new(current, &key(current)).unwrap(),
        |k, id| k.with_old_key(id, &key(id)).unwrap(),
    );
    options.encryption = Some(keys);
}

/// xorshift64*: the input bytes of seed `seed`.
fn input(seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let len = 16 + (next() % 200) as usize;
    (0..len).map(|_| (next() >> 56) as u8).collect()
}

/// How many seeded cases each test runs (fewer in a debug build);
/// `CRASH_CASES` overrides it, `CRASH_SEED` moves the first seed.
fn cases() -> (u64, u64) {
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse().ok());
    let default = if cfg!(debug_assertions) { 300 } else { 5_000 };
    (
        env("CRASH_SEED").unwrap_or(0),
        env("CRASH_CASES").unwrap_or(default),
    )
}

/// The case of `seed`, in the mode `seed` picks (the first input byte
/// picks it too, but evenly here: Sync, Periodic(1 h), None).
fn case_of(seed: u64, compaction: bool) -> Case {
    let bytes = input(seed);
    let mut case = if compaction {
        decode_compaction(&bytes)
    } else {
        decode(&bytes)
    };
    case.config.durability = match seed % 3 {
        0 => Durability::Sync,
        1 => Durability::Periodic(LONG_PERIOD),
        _ => Durability::None,
    };
    case
}

/// Runs the seeded cases with `tweak`; panics naming the first failing one.
fn run_seeded(compaction: bool, tweak: &dyn Fn(&mut Options, u64)) -> RunStats {
    let (first, cases) = cases();
    let start = Instant::now();
    let mut total = RunStats::default();
    for seed in first..first.saturating_add(cases) {
        let case = case_of(seed, compaction);
        match run_case_with(&case, tweak) {
            Ok(stats) => total += stats,
            Err(e) => panic!("seed {seed}: {e}\nops: {:#?}", case.ops),
        }
    }
    eprintln!(
        "crash model with encryption ({}): {cases} cases, {} ops, {} crash points ({} inside an \
         operation), {} clean reopens, {} faults fired, in {:.1?}",
        if compaction {
            "compactions, rotating keys"
        } else {
            "one key"
        },
        total.ops,
        total.crashes,
        total.mid_op_crashes,
        total.reopens,
        total.faults,
        start.elapsed()
    );
    if cases >= 100 {
        assert!(total.crashes >= cases, "too few crash points: {total:?}");
        assert!(
            total.mid_op_crashes >= cases / 4,
            "too few mid-op crashes: {total:?}"
        );
        assert!(
            total.faults >= cases / 20,
            "too few faults fired: {total:?}"
        );
    }
    total
}

#[test]
fn seeded_sequences_with_sealed_bodies_survive_every_crash_point() {
    run_seeded(false, &one_key);
}

#[test]
fn seeded_compactions_rotating_the_key_at_every_restart_survive_every_crash_point() {
    let total = run_seeded(true, &rotating);
    assert!(total.reopens + total.crashes > 0);
}

/// The checker sees the bodies the engine opens: without the key after a
/// restart, the replay it expects fails. (So the runs above had every body
/// sealed, and a checker that passes them proves the engine answered the
/// same.)
#[test]
fn the_checker_fails_a_restart_that_loses_the_key() {
    let ops = vec![
        Op::Begin {
            user: 0,
            key: 0,
            fp: 0,
        },
        Op::Complete {
            lease: 0,
            status: 0,
            body: 2,
            ttl: 0,
        },
        Op::Reopen,
        Op::Begin {
            user: 0,
            key: 0,
            fp: 0,
        },
    ];
    let case = Case {
        ops,
        ..case_of(0, false)
    };
    let plain = run_case(&case);
    assert!(plain.is_ok(), "{plain:?}");
    let sealed = run_case_with(&case, &one_key);
    assert!(sealed.is_ok(), "{sealed:?}");
    let lost = run_case_with(&case, &|options, opens| {
        if opens == 0 {
            one_key(options, opens);
        }
    });
    let why = lost.expect_err("a replay without the key passed the checker");
    assert!(why.contains("MissingKey"), "{why}");
}
