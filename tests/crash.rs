//! Crash durability (DESIGN.md invariants 1 to 4 under power loss): the
//! checker of `tests/common/crash_model.rs` run on thousands of seeded
//! operation sequences with power losses between and inside operations,
//! torn and garbled tails and injected EIO/ENOSPC, on its byte decoder
//! through proptest, and on named scenarios that once were (or could be)
//! bugs; in each durability mode, against the promise that mode makes
//! (docs/DURABILITY.md): under `Sync` every acknowledged state survives;
//! under `Periodic` and `None` a power loss takes back at most a suffix of
//! the acknowledged but unsynced operations, a clean restart nothing, and
//! no fencing token is ever handed out twice.
//!
//! The same checker is the `ops_crash` fuzz target (`fuzz/`); a fuzz
//! finding becomes a named scenario here.

#[path = "common/crash_model.rs"]
mod crash_model;

use std::time::{Duration, Instant};

use crash_model::{
    Case, Config, FaultKind, FaultOp, LONG_PERIOD, Op, RunStats, TearKind, decode, encode,
    run_case, run_in, shrink,
};
use idemkv::Durability;
use proptest::prelude::*;

// ---------------------------------------------------------------------------
// Seeded sequences.

/// xorshift64*: a small deterministic generator, no dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
    fn tear(&mut self) -> TearKind {
        [TearKind::Clean, TearKind::Prefix, TearKind::Garbage][self.below(3) as usize]
    }
}

/// One op, weighted towards a few keys so each sees many transitions.
fn gen_op(rng: &mut Rng) -> Op {
    let user = [0u8, 0, 0, 1, 1, 2][rng.below(6) as usize];
    let key = [0u8, 0, 1, 2][rng.below(4) as usize];
    let lease = if rng.below(4) == 0 {
        rng.byte()
    } else {
        rng.below(3) as u8
    };
    match rng.below(100) {
        0..=25 => Op::Begin {
            user,
            key,
            fp: u8::from(rng.below(5) == 0),
        },
        26..=45 => Op::Complete {
            lease,
            status: rng.below(4) as u8,
            body: [0u8, 1, 1, 2, 2, 3, 3, 4][rng.below(8) as usize],
            ttl: [0u8, 0, 0, 0, 1, 2][rng.below(6) as usize],
        },
        46..=51 => Op::Release { lease },
        52..=57 => Op::Extend {
            lease,
            by: rng.below(4) as u8,
        },
        58..=66 => Op::Advance {
            by: rng.below(8) as u8,
        },
        67..=69 => Op::Check,
        70..=76 => Op::Crash {
            tear: rng.tear(),
            seed: rng.byte(),
        },
        77..=87 => Op::CrashInNext {
            point: rng.byte(),
            tear: rng.tear(),
            seed: rng.byte(),
        },
        88..=89 => Op::Reopen,
        90..=94 => Op::Compact,
        _ => Op::Fault {
            op: [
                FaultOp::Append,
                FaultOp::Append,
                FaultOp::Sync,
                FaultOp::Sync,
                FaultOp::Create,
                FaultOp::SyncDir,
                FaultOp::Rename,
                FaultOp::Remove,
            ][rng.below(8) as usize],
            kind: if rng.below(3) == 0 {
                FaultKind::NoSpace
            } else {
                FaultKind::Eio
            },
            nth: [0u8, 0, 1, 3][rng.below(4) as usize],
        },
    }
}

/// The three modes, `Periodic` with an interval the flusher never reaches
/// during a case (so only rolls, token reservations, compactions and close
/// sync, and every run replays exactly).
const MODES: [Durability; 3] = [
    Durability::Sync,
    Durability::Periodic(LONG_PERIOD),
    Durability::None,
];

/// The case of `seed` under `durability` (the same operations in every
/// mode).
fn gen_case(seed: u64, durability: Durability) -> Case {
    let mut rng = Rng::new(seed);
    let config = Config {
        small_segments: rng.below(4) != 0,
        one_shard: rng.below(4) == 0,
        restart_after_failed_sync: true,
        durability,
        restart_syncs_what_it_found: true,
    };
    let len = 10 + rng.below(70) as usize;
    Case {
        config,
        ops: (0..len).map(|_| gen_op(&mut rng)).collect(),
    }
}

/// How many seeded cases `cargo test` runs per mode (fewer in a debug
/// build); `CRASH_CASES` overrides it, `CRASH_SEED` moves the first seed.
fn seeded_cases() -> (u64, u64) {
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse().ok());
    let default = if cfg!(debug_assertions) {
        2_000
    } else {
        20_000
    };
    (
        env("CRASH_SEED").unwrap_or(0),
        env("CRASH_CASES").unwrap_or(default),
    )
}

/// Runs `cases` seeded cases from `first` under `durability`; on a failure,
/// panics with the case shrunk.
fn run_seeded(durability: Durability, first: u64, cases: u64) -> RunStats {
    let start = Instant::now();
    let mut total = RunStats::default();
    for seed in first..first.saturating_add(cases) {
        let case = gen_case(seed, durability);
        match run_case(&case) {
            Ok(stats) => total += stats,
            Err(e) => {
                let small = shrink(&case);
                let why = run_case(&small).err().unwrap_or_default();
                panic!(
                    "{durability:?}, seed {seed}: {e}\n\nshrunk to {} ops: {why}\nops: {:#?}\n\
                     bytes: {:?}",
                    small.ops.len(),
                    small,
                    encode(&small)
                )
            }
        }
    }
    eprintln!(
        "crash model, {durability:?}: {cases} cases, {} ops, {} crash points ({} inside an \
         operation, {} taking back acknowledged states), {} clean reopens, {} durable points, \
         {} faults fired, {} calls refused, in {:.1?}",
        total.ops,
        total.crashes,
        total.mid_op_crashes,
        total.rollbacks,
        total.reopens,
        total.durable_points,
        total.faults,
        total.refused,
        start.elapsed()
    );
    if cases >= 1_000 {
        assert!(
            total.crashes >= 3 * cases,
            "too few crash points: {total:?}"
        );
        assert!(
            total.mid_op_crashes >= cases,
            "too few mid-op crashes: {total:?}"
        );
        assert!(
            total.faults >= cases / 10,
            "too few faults fired: {total:?}"
        );
    }
    total
}

#[test]
fn seeded_sequences_survive_every_crash_point() {
    let (first, cases) = seeded_cases();
    let total = run_seeded(Durability::Sync, first, cases);
    assert_eq!(total.rollbacks, 0, "Sync took back acknowledged states");
}

/// The seeded sequences under `durability` without `Sync`: a power loss
/// must actually take acknowledged states back now and then (else the
/// checks of the mode would not be exercised), and a sync must now and
/// then make everything durable.
fn seeded_sequences_lose_only_unsynced_suffixes(durability: Durability) {
    let (first, cases) = seeded_cases();
    // Fewer than under Sync, so that the test stays fast on two cores:
    // `Periodic` starts (and joins) a flusher thread at every open.
    let share = if durability == Durability::None { 2 } else { 4 };
    let cases = (cases / share).max(1);
    let total = run_seeded(durability, first, cases);
    if cases >= 1_000 {
        assert!(
            total.rollbacks >= cases / 10,
            "too few power losses took acknowledged states back: {total:?}"
        );
        assert!(
            total.durable_points >= cases,
            "too few durable points: {total:?}"
        );
    }
}

#[test]
fn seeded_sequences_in_periodic_mode_lose_only_an_unsynced_suffix() {
    seeded_sequences_lose_only_unsynced_suffixes(Durability::Periodic(LONG_PERIOD));
}

#[test]
fn seeded_sequences_in_none_mode_lose_only_an_unsynced_suffix() {
    seeded_sequences_lose_only_unsynced_suffixes(Durability::None);
}

/// With a 1 ms interval the flusher syncs at moments no case chooses, so
/// runs do not replay: each key is checked against the states it had (the
/// per-key rule), and the faults are skipped (one could fire in the
/// flusher, where no caller sees it).
#[test]
fn seeded_sequences_with_a_short_flush_interval_keep_states_each_key_had() {
    let (first, cases) = seeded_cases();
    let cases = (cases / 40).max(1);
    let durability = Durability::Periodic(Duration::from_millis(1));
    for seed in first..first.saturating_add(cases) {
        let case = gen_case(seed, durability);
        if let Err(e) = run_case(&case) {
            panic!("{durability:?}, seed {seed}: {e}\nops: {case:#?}");
        }
    }
}

// ---------------------------------------------------------------------------
// The decoder the fuzzer drives.

fn proptest_config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(proptest_config())]

    /// Any bytes decode (no panic) to a case that re-encodes to itself and
    /// passes the checker.
    #[test]
    fn any_bytes_decode_to_a_case_that_holds(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let case = decode(&bytes);
        prop_assert!(case.ops.len() <= crash_model::MAX_OPS);
        prop_assert_eq!(decode(&encode(&case)), case.clone());
        if let Err(e) = run_case(&case) {
            return Err(TestCaseError::fail(format!("{e}\ncase: {case:#?}")));
        }
    }
}

// ---------------------------------------------------------------------------
// Named scenarios.

fn begin(user: u8, key: u8) -> Op {
    Op::Begin { user, key, fp: 0 }
}

/// Completes the newest lease with body `body` (index into `BODY_LENS`).
fn complete(body: u8) -> Op {
    Op::Complete {
        lease: 0,
        status: 1,
        body,
        ttl: 0,
    }
}

const TEARS: [TearKind; 3] = [TearKind::Clean, TearKind::Prefix, TearKind::Garbage];

/// Runs `ops` (small segments, 64 shards) in every mode.
fn must_hold(ops: &[Op]) {
    for durability in MODES {
        must_hold_in(durability, ops);
    }
}

fn must_hold_in(durability: Durability, ops: &[Op]) -> RunStats {
    match run_in(durability, ops) {
        Ok(stats) => stats,
        Err(e) => panic!("{durability:?}: {e}\nops: {ops:#?}"),
    }
}

#[test]
fn crash_right_after_a_complete_keeps_the_outcome() {
    for tear in TEARS {
        for seed in 0..8 {
            must_hold(&[
                begin(0, 0),
                complete(2),
                Op::Crash { tear, seed },
                // The acknowledged lease is fenced: a second complete is lost.
                complete(1),
                begin(0, 0),
                Op::Crash { tear, seed },
            ]);
        }
    }
}

#[test]
fn crash_right_after_begin_keeps_the_lease_usable() {
    for tear in TEARS {
        must_hold(&[
            begin(1, 2),
            Op::Crash { tear, seed: 3 },
            // The lease acknowledged before the crash still owns the key.
            complete(3),
            Op::Crash { tear, seed: 4 },
        ]);
    }
}

/// Power goes out inside `complete` before each of its storage calls (the
/// append, then the sync): the unsynced complete record is torn at every
/// kind of tail, and the key shows either the lease or the whole outcome.
#[test]
fn torn_tail_in_the_middle_of_a_complete_record() {
    for tear in TEARS {
        for seed in 0..=255u8 {
            for point in 0..2 {
                must_hold(&[
                    begin(0, 0),
                    Op::CrashInNext { point, tear, seed },
                    complete(3),
                    // Whatever survived, the lease's owner can act again.
                    complete(2),
                    begin(0, 1),
                ]);
            }
        }
    }
}

/// A failed append leaves half a complete record behind; a power loss then
/// keeps a prefix of it (or garbage): recovery cuts it off.
#[test]
fn half_written_complete_after_failed_append_is_cut_off() {
    for tear in TEARS {
        for seed in 0..32 {
            for kind in [FaultKind::Eio, FaultKind::NoSpace] {
                must_hold(&[
                    begin(2, 1),
                    Op::Fault {
                        op: FaultOp::Append,
                        kind,
                        nth: 0,
                    },
                    complete(4),
                    complete(1),
                    begin(0, 0),
                    Op::Crash { tear, seed },
                    complete(1),
                    begin(0, 0),
                ]);
            }
        }
    }
}

/// Power goes out before every storage call of an append that rolls to a
/// new segment: the old segment's sync, the new file's creation, its
/// header, its sync, the directory sync, the record and its sync.
#[test]
fn crash_during_a_segment_roll() {
    let mut setup = Vec::new();
    // Two 1.5 KB outcomes leave less than 1.5 KB in the 4 KiB segment.
    for key in 0..2 {
        setup.push(begin(0, key));
        setup.push(complete(3));
    }
    for tear in TEARS {
        for point in 0..10 {
            let mut ops = setup.clone();
            ops.extend([
                begin(1, 0),
                Op::CrashInNext {
                    point,
                    tear,
                    seed: point,
                },
                complete(3),
                begin(1, 1),
                complete(4),
                Op::Crash { tear, seed: 9 },
            ]);
            must_hold(&ops);
        }
    }
}

/// A fault on each call of a roll (old segment sync, create, header sync,
/// directory sync): the append fails, the engine refuses writes, and a
/// power loss then a reopen find everything acknowledged.
#[test]
fn fault_during_a_segment_roll() {
    let cases = [
        (FaultOp::Sync, 0),
        (FaultOp::Create, 0),
        (FaultOp::Append, 0),
        (FaultOp::Sync, 1),
        (FaultOp::SyncDir, 0),
    ];
    for (op, nth) in cases {
        for kind in [FaultKind::Eio, FaultKind::NoSpace] {
            let mut ops = vec![begin(0, 0), complete(3), begin(0, 1), complete(3)];
            ops.extend([
                begin(1, 0),
                Op::Fault { op, kind, nth },
                complete(3),
                begin(1, 1),
                Op::Crash {
                    tear: TearKind::Prefix,
                    seed: 1,
                },
                complete(3),
                begin(1, 1),
                complete(4),
                Op::Reopen,
            ]);
            must_hold(&ops);
        }
    }
}

/// fsync fails (EIO) during `complete`: the call returns the error, later
/// writes are refused with `Poisoned`, and after a power loss the lease is
/// intact or completed with the exact body, and writes work again.
#[test]
fn fsync_eio_during_complete_then_crash() {
    for tear in TEARS {
        must_hold(&[
            begin(0, 0),
            complete(2),
            begin(0, 1),
            Op::Fault {
                op: FaultOp::Sync,
                kind: FaultKind::Eio,
                nth: 0,
            },
            complete(3),
            begin(0, 2),
            complete(1),
            Op::Check,
            Op::Crash { tear, seed: 5 },
            begin(0, 2),
            complete(1),
            Op::Crash { tear, seed: 6 },
        ]);
    }
}

/// Power goes out inside recovery itself (while it cuts a torn tail): the
/// second recovery finds the same state.
#[test]
fn crash_during_recovery_of_a_torn_tail() {
    for tear in TEARS {
        for point in 0..3 {
            must_hold(&[
                begin(0, 0),
                complete(1),
                begin(0, 1),
                Op::Fault {
                    op: FaultOp::Append,
                    kind: FaultKind::Eio,
                    nth: 0,
                },
                complete(3),
                Op::CrashInNext {
                    point,
                    tear,
                    seed: 7,
                },
                Op::Crash {
                    tear: TearKind::Prefix,
                    seed: 200,
                },
                complete(1),
            ]);
        }
    }
}

/// Regression: a restart after a roll whose directory sync failed found the
/// new segment in the listing, appended acknowledged records to it, and a
/// power loss then took the segment's name, and those records, away (the
/// name was never made durable). Recovery now syncs the directory before
/// the log is appended to.
#[test]
fn restart_after_failed_directory_sync_keeps_later_writes() {
    for kind in [FaultKind::Eio, FaultKind::NoSpace] {
        must_hold(&[
            Op::Begin {
                user: 1,
                key: 0,
                fp: 1,
            },
            Op::Fault {
                op: FaultOp::SyncDir,
                kind,
                nth: 0,
            },
            // Too big for the first 4 KiB segment: rolls, and the roll fails.
            complete(4),
            Op::Reopen,
            complete(3),
            Op::Crash {
                tear: TearKind::Clean,
                seed: 0,
            },
        ]);
    }
}

/// Runs `ops` in every mode with restarts after a failed fsync made real
/// restarts on the same disk (not power losses): see
/// `Config::restart_after_failed_sync`.
fn must_hold_with_real_restarts(ops: &[Op]) {
    for durability in MODES {
        let case = Case {
            config: Config {
                small_segments: true,
                one_shard: false,
                restart_after_failed_sync: true,
                durability,
                restart_syncs_what_it_found: true,
            },
            ops: ops.to_vec(),
        };
        if let Err(e) = run_case(&case) {
            panic!("{durability:?}: {e}\nops: {ops:#?}");
        }
    }
}

/// Regression: after a failed fsync, a restart without a power loss read
/// the page cache, showed the failed release as applied and built on it
/// (a new lease with token 2); the power loss then took the release back
/// and the acknowledged lease with it. A failed sync now cuts the active
/// segment back to its durable end.
#[test]
fn restart_after_failed_fsync_shows_only_durable_state() {
    must_hold_with_real_restarts(&[
        Op::Fault {
            op: FaultOp::Sync,
            kind: FaultKind::Eio,
            nth: 1,
        },
        begin(0, 1),
        Op::Release { lease: 0 },
        Op::Reopen,
        Op::Begin {
            user: 0,
            key: 1,
            fp: 1,
        },
    ]);
}

/// Regression (found by the checker with real restarts): a roll whose new
/// segment header failed its fsync left the segment in the directory with
/// the header only in the page cache. A restart without a power loss made it
/// the active segment and acknowledged records in it; the power loss then
/// left zeros where the header was, followed by valid records, and open
/// failed with `Corrupt { 000002.log, offset 0, BadMagic }`. A failed roll
/// now removes the file it made.
#[test]
fn restart_after_failed_header_sync_in_a_roll() {
    must_hold_with_real_restarts(&[
        begin(0, 0),
        // The compaction's roll syncs the old segment (let through), then
        // the new segment's header (fails).
        Op::Fault {
            op: FaultOp::Sync,
            kind: FaultKind::Eio,
            nth: 1,
        },
        Op::Compact,
        Op::Reopen,
        begin(1, 0),
    ]);
}

// ---------------------------------------------------------------------------
// Without Sync: what a power loss may take back, and what it may not.

/// Two 1.5 KB outcomes, then a third that no longer fits in the first 4 KiB
/// segment: its `complete` rolls, which syncs everything before it. Then
/// more acknowledged calls that no sync covers.
fn roll_then_unsynced_calls() -> Vec<Op> {
    let mut ops = Vec::new();
    for key in 0..2 {
        ops.extend([begin(0, key), complete(3)]);
    }
    ops.extend([
        begin(1, 0),
        // Rolls: the two outcomes above are now durable.
        complete(3),
        begin(1, 1),
        complete(2),
        begin(2, 2),
        Op::Extend { lease: 0, by: 3 },
        Op::Release { lease: 1 },
    ]);
    ops
}

/// Under `Periodic` (with an interval longer than the case) a power loss
/// takes back acknowledged calls that no sync covered, as a suffix, and
/// nothing a sync covered: the outcomes written before the segment roll
/// survive, the calls after it may be lost. The checker fails the run if a
/// state from before the roll is lost, or if the keys show no common prefix.
#[test]
fn periodic_crash_loses_only_unsynced_acknowledged_states() {
    let durability = Durability::Periodic(LONG_PERIOD);
    let mut rolled_back = 0;
    for tear in TEARS {
        for seed in 0..16 {
            let mut ops = roll_then_unsynced_calls();
            ops.extend([
                Op::Crash { tear, seed },
                begin(1, 1),
                begin(0, 0),
                Op::Check,
            ]);
            let stats = must_hold_in(durability, &ops);
            assert!(
                stats.durable_points >= 1,
                "the roll was not seen: {stats:?}"
            );
            rolled_back += stats.rollbacks;
        }
    }
    // A clean tear loses every unsynced byte, so at least those 16 runs
    // took acknowledged states back (and the checker accepted only that).
    assert!(
        rolled_back >= 16,
        "only {rolled_back} power losses lost anything"
    );
}

/// Acknowledged `begin`s that no sync covered, then a power loss that takes
/// them (and so the largest tokens on disk) back: the restarted engine
/// must hand out tokens above every token handed out before, which it can
/// only do if it reserved them durably (a synced `Reserve` record) before
/// handing them out. The checker compares every `Started` token with the
/// highest one handed out, crash or not.
fn begins_then_crash(tear: TearKind, seed: u8) -> Vec<Op> {
    vec![
        begin(0, 0),
        begin(0, 1),
        begin(1, 2),
        Op::Begin {
            user: 2,
            key: 0,
            fp: 1,
        },
        Op::Crash { tear, seed },
        begin(0, 0),
        begin(2, 1),
        Op::CrashInNext {
            point: 0,
            tear,
            seed,
        },
        begin(1, 1),
        begin(1, 2),
        Op::Reopen,
        begin(0, 1),
    ]
}

#[test]
fn none_mode_crash_never_reissues_a_token() {
    for durability in [Durability::None, Durability::Periodic(LONG_PERIOD)] {
        let mut rolled_back = 0;
        for tear in TEARS {
            for seed in 0..8 {
                rolled_back += must_hold_in(durability, &begins_then_crash(tear, seed)).rollbacks;
            }
        }
        assert!(rolled_back >= 8, "{durability:?}: no begin was taken back");
    }
}

/// A clean restart (drop closes the engine, which syncs) loses nothing
/// acknowledged without `Sync` either: after it every key shows exactly its
/// last acknowledged state, and a power loss right after takes nothing
/// back.
fn calls_then_clean_reopen() -> Vec<Op> {
    vec![
        begin(0, 0),
        complete(2),
        begin(0, 1),
        Op::Extend { lease: 0, by: 3 },
        begin(1, 2),
        Op::Release { lease: 0 },
        begin(2, 0),
        Op::Complete {
            lease: 0,
            status: 2,
            body: 1,
            ttl: 1,
        },
        Op::Reopen,
        Op::Check,
        Op::Crash {
            tear: TearKind::Clean,
            seed: 0,
        },
        Op::Check,
    ]
}

#[test]
fn clean_reopen_in_none_mode_loses_nothing_acknowledged() {
    for durability in [Durability::None, Durability::Periodic(LONG_PERIOD)] {
        let stats = must_hold_in(durability, &calls_then_clean_reopen());
        assert_eq!(stats.rollbacks, 0, "{durability:?}: {stats:?}");
        // And with the segment rolls of the longer sequence in between.
        let mut ops = roll_then_unsynced_calls();
        ops.extend(calls_then_clean_reopen());
        let stats = must_hold_in(durability, &ops);
        assert_eq!(stats.rollbacks, 0, "{durability:?}: {stats:?}");
    }
}

/// Without `Sync` a failed write or sync poisons the engine, and then
/// every call is refused, reads included (the index may show states that
/// never reached the disk). A failed sync in a roll also cuts the active
/// segment back to what was synced, so a restart, clean or not, finds the
/// states of the last sync: acknowledged calls after it are taken back,
/// never the ones before, and never half of one.
fn fault_in_a_roll_then_calls(op: FaultOp, kind: FaultKind) -> Vec<Op> {
    let mut ops = vec![
        begin(0, 0),
        complete(3),
        begin(0, 1),
        complete(3),
        begin(1, 0),
        Op::Fault { op, kind, nth: 0 },
        // Rolls, and the roll fails.
        complete(3),
        Op::Check,
        begin(1, 1),
        Op::Compact,
        Op::Release { lease: 0 },
    ];
    ops.extend([
        Op::Reopen,
        begin(1, 1),
        complete(4),
        Op::Crash {
            tear: TearKind::Prefix,
            seed: 3,
        },
        begin(1, 0),
        complete(3),
        Op::Reopen,
    ]);
    ops
}

#[test]
fn failed_roll_without_sync_refuses_every_call_and_keeps_what_was_synced() {
    for durability in [Durability::None, Durability::Periodic(LONG_PERIOD)] {
        for op in [FaultOp::Sync, FaultOp::Create, FaultOp::SyncDir] {
            for kind in [FaultKind::Eio, FaultKind::NoSpace] {
                let stats = must_hold_in(durability, &fault_in_a_roll_then_calls(op, kind));
                assert!(stats.refused >= 2, "{durability:?} {op:?}: {stats:?}");
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Seed corpora of the fuzz targets.

/// The cases committed as `fuzz/corpus/ops_crash/`: the named scenarios
/// above and a few seeded sequences.
fn ops_crash_seeds() -> Vec<(String, Case)> {
    let config = Config {
        small_segments: true,
        one_shard: false,
        restart_after_failed_sync: true,
        durability: Durability::Sync,
        restart_syncs_what_it_found: true,
    };
    let named = |name: &str, ops: Vec<Op>| (name.to_owned(), Case { config, ops });
    let mut seeds = vec![
        named(
            "complete-then-crash",
            vec![
                begin(0, 0),
                complete(2),
                Op::Crash {
                    tear: TearKind::Prefix,
                    seed: 1,
                },
                begin(0, 0),
            ],
        ),
        named(
            "torn-complete",
            vec![
                begin(0, 0),
                Op::CrashInNext {
                    point: 1,
                    tear: TearKind::Garbage,
                    seed: 3,
                },
                complete(3),
                complete(2),
            ],
        ),
        named(
            "fsync-eio-during-complete",
            vec![
                begin(0, 1),
                Op::Fault {
                    op: FaultOp::Sync,
                    kind: FaultKind::Eio,
                    nth: 0,
                },
                complete(3),
                begin(0, 2),
                Op::Crash {
                    tear: TearKind::Prefix,
                    seed: 5,
                },
                complete(1),
            ],
        ),
        named(
            "failed-directory-sync-then-restart",
            vec![
                begin(1, 0),
                Op::Fault {
                    op: FaultOp::SyncDir,
                    kind: FaultKind::Eio,
                    nth: 0,
                },
                complete(4),
                Op::Reopen,
                complete(3),
                Op::Crash {
                    tear: TearKind::Clean,
                    seed: 0,
                },
            ],
        ),
    ];
    let mut roll = Vec::new();
    for key in 0..2 {
        roll.extend([begin(0, key), complete(3)]);
    }
    roll.extend([
        begin(1, 0),
        Op::CrashInNext {
            point: 4,
            tear: TearKind::Prefix,
            seed: 4,
        },
        complete(3),
        Op::Advance { by: 3 },
        begin(1, 0),
    ]);
    seeds.push(named("crash-during-roll", roll));
    for seed in [1u64, 2, 3, 7, 11] {
        seeds.push((format!("seeded-{seed}"), gen_case(seed, Durability::Sync)));
    }
    seeds.extend(non_sync_seeds());
    seeds
}

/// Seeds in the modes without `Sync` (bits 3 and 4 of the first byte).
fn non_sync_seeds() -> Vec<(String, Case)> {
    let config = |durability| Config {
        small_segments: true,
        one_shard: false,
        restart_after_failed_sync: true,
        durability,
        restart_syncs_what_it_found: true,
    };
    let periodic = Durability::Periodic(LONG_PERIOD);
    let named = |name: &str, durability, ops: Vec<Op>| {
        (
            name.to_owned(),
            Case {
                config: config(durability),
                ops,
            },
        )
    };
    let mut roll_then_crash = roll_then_unsynced_calls();
    roll_then_crash.extend([
        Op::Crash {
            tear: TearKind::Prefix,
            seed: 5,
        },
        begin(1, 1),
    ]);
    let mut seeds = vec![
        named("periodic-roll-then-crash", periodic, roll_then_crash),
        named(
            "none-begins-then-crash",
            Durability::None,
            begins_then_crash(TearKind::Clean, 0),
        ),
        named(
            "none-clean-reopen",
            Durability::None,
            calls_then_clean_reopen(),
        ),
        named(
            "none-fsync-eio-in-a-roll",
            Durability::None,
            fault_in_a_roll_then_calls(FaultOp::Sync, FaultKind::Eio),
        ),
    ];
    for (name, durability, seed) in [
        ("periodic-seeded-3", periodic, 3u64),
        ("none-seeded-7", Durability::None, 7),
    ] {
        let mut case = gen_case(seed, durability);
        case.config.durability = durability;
        seeds.push((name.to_owned(), case));
    }
    seeds
}

/// Segment files written by the engine on a simulated disk: completes of
/// every body size (so small segments roll), a release, an extend, a lease
/// left in progress, and optionally a torn tail (the first half of a
/// record after the last one, as a failed append leaves).
fn engine_segments(torn: bool) -> Vec<Vec<u8>> {
    use idemkv::storage::{SimDisk, Storage};
    use idemkv::{Begin, Durability, Engine, Fingerprint, ManualClock, Options, Outcome};
    use std::sync::Arc;
    use std::time::Duration;

    let disk = SimDisk::new();
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let options = Options {
        durability: Durability::Sync,
        segment_bytes: 4096,
        clock: clock.clone(),
        ..Options::default()
    };
    let storage: Arc<dyn Storage> = Arc::new(disk.clone());
    let engine = Engine::open_with_storage(storage, options).expect("open");
    let start = |user: &str, key: &str| match engine.begin(user, key, Fingerprint::of(b"r")) {
        Ok(Begin::Started(lease)) => lease,
        other => panic!("expected Started, got {other:?}"),
    };
    for (i, len) in [0usize, 3, 200, 1500, 2500, 3000, 1000]
        .into_iter()
        .enumerate()
    {
        let lease = start("u", &format!("k{i}"));
        let outcome = Outcome {
            status: 200 + i as u16,
            body: vec![b'a' + i as u8; len].into(),
        };
        engine.complete(&lease, outcome).expect("complete");
    }
    let released = start("", "order-7");
    engine.release(&released).expect("release");
    let extended = start("u", "k");
    engine
        .extend(&extended, Duration::from_secs(60))
        .expect("extend");
    drop(engine);
    let mut names = disk.names();
    names.sort();
    let mut files: Vec<Vec<u8>> = names
        .iter()
        .filter(|n| n.ends_with(".log"))
        .map(|n| disk.read_file(n).expect("segment"))
        .collect();
    if torn {
        // Half of the first record of the first segment (which starts
        // after the segment header), after the last segment's records.
        let first = files.first().cloned().unwrap_or_default();
        let header = 56; // the segment header, docs/FORMAT.md
        let half: Vec<u8> = first.iter().skip(header).take(30).copied().collect();
        if let Some(last) = files.last_mut() {
            last.extend(half);
        }
    }
    files
}

/// A `log_decode` input holding `files` as consecutive segments from id
/// `first` (see `fuzz/fuzz_targets/log_decode.rs` for the layout).
fn log_decode_input(first: usize, files: &[Vec<u8>]) -> Vec<u8> {
    assert!((1..=3).contains(&files.len()) && (1..=8).contains(&first));
    let total: usize = files.iter().map(Vec::len).sum();
    let mut out = vec![(files.len() - 1) as u8 | ((first - 1) as u8) << 2];
    let mut rest = total;
    for file in &files[..files.len() - 1] {
        // The share whose floor(rest * share / 65536) is exactly the length.
        let share = (0..=u16::MAX)
            .find(|&s| rest * usize::from(s) / 65_536 == file.len())
            .expect("a share for the file length");
        out.extend(share.to_le_bytes());
        rest -= file.len();
    }
    for file in files {
        out.extend_from_slice(file);
    }
    out
}

/// Writes the seed corpora under `fuzz/corpus/`. Run it by hand after a
/// format change:
/// `cargo test --release --test crash -- --ignored write_fuzz_seed_corpora`.
#[test]
#[ignore = "writes fuzz/corpus; run by hand"]
fn write_fuzz_seed_corpora() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).expect("corpus dir");
        std::fs::write(dir.join(name), bytes).expect("write seed");
    };
    for (name, case) in ops_crash_seeds() {
        let bytes = encode(&case);
        assert_eq!(decode(&bytes), case, "seed {name} round-trips");
        write("ops_crash", &name, &bytes);
    }
    let whole = engine_segments(false);
    let torn = engine_segments(true);
    assert!(whole.len() >= 3, "the seeds need rolled segments");
    write("log_decode", "empty", &[]);
    write(
        "log_decode",
        "one-segment",
        &log_decode_input(1, &whole[..1]),
    );
    write(
        "log_decode",
        "two-segments",
        &log_decode_input(1, &whole[..2]),
    );
    let from = whole.len() - 3;
    write(
        "log_decode",
        "three-segments-last-ones",
        &log_decode_input(from + 1, &whole[from..]),
    );
    let from = torn.len() - 2;
    write(
        "log_decode",
        "torn-tail",
        &log_decode_input(from + 1, &torn[from..]),
    );
    // Bit 6 of the first byte: the target repairs checksums, so mutations
    // of record contents reach the replay rules.
    for (name, files, first) in [
        ("one-segment-repaired", &whole[..1], 1),
        (
            "three-segments-repaired",
            &whole[whole.len() - 3..],
            whole.len() - 2,
        ),
    ] {
        let mut input = log_decode_input(first, files);
        input[0] |= 0x40;
        write("log_decode", name, &input);
    }
}

/// The committed seeds still pass (the fuzz targets' smoke run starts from
/// them).
#[test]
fn ops_crash_seeds_hold() {
    for (name, case) in ops_crash_seeds() {
        if let Err(e) = run_case(&case) {
            panic!("seed {name}: {e}");
        }
    }
}

/// Regression (found by the seeded loop): a compaction whose removal of
/// its input segment failed went on without poisoning the log; a second
/// compaction then rewrote the replacement, so no segment named the first
/// input any more and recovery replayed its stale records again. A
/// duplicate `begin` of a completed lease was taken for a colliding key's
/// and brought the lease back once the completion expired. A failed
/// removal now poisons the log, so recovery still finds the name.
#[test]
fn failed_segment_removal_in_compaction_does_not_resurrect_records() {
    let ops = [
        begin(0, 1),
        Op::Extend { lease: 0, by: 2 },
        begin(2, 2),
        begin(2, 0),
        Op::Fault {
            op: FaultOp::Remove,
            kind: FaultKind::Eio,
            nth: 0,
        },
        Op::Compact,
        Op::Complete {
            lease: 49,
            status: 1,
            body: 3,
            ttl: 0,
        },
        Op::Compact,
        Op::Reopen,
        Op::Compact,
        Op::Extend { lease: 0, by: 1 },
        // A 1 ms record: it expires with the next clock move.
        Op::Complete {
            lease: 2,
            status: 3,
            body: 2,
            ttl: 1,
        },
        Op::Advance { by: 0 },
        Op::Crash {
            tear: TearKind::Clean,
            seed: 0,
        },
    ];
    must_hold(&ops);
    // The same without the restart, which the fix makes refuse writes.
    let mut without_reopen = ops.to_vec();
    without_reopen.retain(|op| *op != Op::Reopen);
    must_hold(&without_reopen);
}

/// Regression (found by `ops_crash` on a work-in-progress tree that cut the
/// active segment back after a failed fsync): a compaction that ran after
/// the failed fsync trusted the index, which showed the failed `complete`
/// as done, so it dropped the lease's `begin` as superseded and removed its
/// segment; the power loss then took the never-synced `complete` too, and
/// the acknowledged lease was gone. Compaction now refuses a poisoned log
/// and keeps records whose successors are not yet durable.
#[test]
fn compaction_after_failed_fsync_keeps_the_acknowledged_lease() {
    for nth in 0..2 {
        must_hold(&[
            begin(2, 1),
            // Rolls, so the begin sits in a closed segment.
            Op::Compact,
            Op::Fault {
                op: FaultOp::Sync,
                kind: FaultKind::Eio,
                nth,
            },
            complete(3),
            complete(3),
            Op::Compact,
            Op::Crash {
                tear: TearKind::Garbage,
                seed: 0,
            },
        ]);
    }
}

/// Regression (issue 11, item 2): under `Durability::Periodic` and
/// `Durability::None` a power loss took back the begin records, and the
/// restarted engine handed out the same fencing tokens again (token 1
/// before the crash, 1 again after). A token handed out after a restart
/// must be above every token handed out before, crash or not, in every mode.
#[test]
fn fencing_tokens_are_never_reissued_after_a_crash_in_any_durability_mode() {
    use idemkv::storage::{SimDisk, Storage, Tear};
    use idemkv::{Begin, Durability, Engine, Fingerprint, ManualClock, Options};
    use std::sync::Arc;
    use std::time::Duration;

    for durability in [
        Durability::Sync,
        Durability::Periodic(Duration::from_secs(3600)),
        Durability::None,
    ] {
        for tear in [Tear::Clean, Tear::Prefix(7), Tear::Garbage(9)] {
            let mut disk = SimDisk::new();
            let clock = Arc::new(ManualClock::new(1_700_000_000_000));
            let options = Options {
                durability,
                segment_bytes: 4096,
                background: false,
                clock: clock.clone(),
                ..Options::default()
            };
            let mut highest = 0;
            for round in 0..4 {
                let storage: Arc<dyn Storage> = Arc::new(disk.clone());
                let engine = Engine::open_with_storage(storage, options.clone()).expect("open");
                // Enough begins to roll small segments now and then.
                for i in 0..40 {
                    let key = format!("r{round}-k{i}");
                    match engine.begin("u", &key, Fingerprint::of(b"r")).unwrap() {
                        Begin::Started(lease) => {
                            assert!(
                                lease.token() > highest,
                                "{durability:?} {tear:?} round {round}: token {} reissued (highest before: {highest})",
                                lease.token()
                            );
                            highest = lease.token();
                        }
                        other => panic!("fresh key answered {other:?}"),
                    }
                }
                // Power loss: the engine is not closed.
                disk = disk.crash(tear);
                std::mem::forget(engine);
            }
        }
    }
}

/// Engine finding (the checker in `None` mode, shrunk to these five
/// operations): recovery takes every byte it reads for durable. A restart
/// after a close that could not sync (the engine was poisoned by a failed
/// append) opens on acknowledged records that are only in the page cache;
/// the new engine shows them (the lease answers `InFlight`), but its clean
/// close syncs nothing, because it appended nothing, and a power loss then
/// takes the lease back although the engine that showed it closed cleanly.
/// Ignored until recovery syncs what it replays (or marks it not durable).
#[test]
fn restart_after_a_close_that_could_not_sync_makes_what_it_shows_durable() {
    for durability in [Durability::None, Durability::Periodic(LONG_PERIOD)] {
        let case = Case {
            config: Config {
                small_segments: true,
                one_shard: false,
                restart_after_failed_sync: true,
                durability,
                restart_syncs_what_it_found: true,
            },
            ops: vec![
                begin(1, 0),
                Op::Fault {
                    op: FaultOp::Append,
                    kind: FaultKind::Eio,
                    nth: 0,
                },
                // Fails: the engine is poisoned, its close cannot sync.
                begin(0, 0),
                // The new engine finds the lease in the page cache.
                Op::Reopen,
                // A clean close: what it showed must now be durable.
                Op::Reopen,
            ],
        };
        if let Err(e) = run_case(&case) {
            panic!("{durability:?}: {e}");
        }
    }
}

/// The same finding under `Durability::Sync`: a process killed between the
/// append of a `complete` and its fdatasync leaves the record in the page
/// cache only (here a `None` engine leaves it so, and is dropped without
/// closing, as a kill would). The restarted `Sync` engine replays it to a
/// retry without syncing it first, although under `Sync` no call may be
/// shown a state a crash could take back; a power loss then takes it back,
/// and the next retry starts the work a second time.
#[test]
fn restart_in_sync_mode_shows_no_state_a_power_loss_takes_back() {
    use idemkv::storage::{SimDisk, Storage, Tear};
    use idemkv::{Begin, Engine, Fingerprint, ManualClock, Options, Outcome};
    use std::sync::Arc;

    let disk = SimDisk::new();
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let open = |disk: &SimDisk, durability| {
        let options = Options {
            durability,
            background: false,
            clock: clock.clone(),
            ..Options::default()
        };
        let storage: Arc<dyn Storage> = Arc::new(disk.clone());
        Engine::open_with_storage(storage, options).expect("open")
    };
    let request = Fingerprint::of(b"charge 10 EUR");
    let killed = open(&disk, Durability::None);
    let Ok(Begin::Started(lease)) = killed.begin("u", "order-1", request) else {
        panic!("fresh key not started");
    };
    let outcome = Outcome {
        status: 201,
        body: b"charged".to_vec().into(),
    };
    killed.complete(&lease, outcome).expect("complete");
    // The log buffers appends in memory: a compaction pass writes them to
    // the file first (without a sync), as the flusher's timer would.
    killed.compact_below(0.0).expect("compaction pass");
    assert_eq!(killed.stats().log_pending_bytes, 0);
    // Killed: no close, the page cache keeps the records.
    std::mem::forget(killed);

    let restarted = open(&disk, Durability::Sync);
    let shown = restarted.begin("u", "order-1", request).expect("begin");
    assert!(matches!(shown, Begin::Replay(_)), "{shown:?}");
    // The retry was told the work is done; a power loss must not undo that.
    let after_power_loss = open(&disk.crash(Tear::Clean), Durability::Sync);
    let again = after_power_loss
        .begin("u", "order-1", request)
        .expect("begin");
    assert!(
        matches!(again, Begin::Replay(_)),
        "a Sync engine replayed an outcome that a power loss then took back; the retry now \
         answers {again:?} and runs the work again"
    );
}

/// Engine finding (fuzz target `ops_crash` under `Periodic`, an input
/// shrunk to these nine operations; the same under `None`): a power loss
/// leaves a log that no longer opens. The engine that restarts after a
/// close that could not sync takes the unsynced records it finds in the
/// page cache for durable (see the test above). When its own first fsync
/// then fails, it cuts the segment back only to the end of what it
/// recovered, so the range the failed fsync dropped stays in the file; the
/// cut's own fsync writes zeros there ("fsyncgate": those pages never reach
/// the disk), later records are synced after the zeros, and after the power
/// loss recovery finds a bad frame followed by valid ones:
/// `Corrupt { 000001.log, offset 117, Malformed }`.
#[test]
fn failed_fsync_after_a_restart_on_unsynced_records_leaves_a_log_that_opens() {
    for durability in [Durability::None, Durability::Periodic(LONG_PERIOD)] {
        let case = Case {
            config: Config {
                small_segments: true,
                one_shard: true,
                restart_after_failed_sync: true,
                durability,
                restart_syncs_what_it_found: true,
            },
            ops: vec![
                begin(0, 1),
                Op::Fault {
                    op: FaultOp::Append,
                    kind: FaultKind::Eio,
                    nth: 1,
                },
                complete(3),
                // Its append fails: poisoned, so the close cannot sync.
                Op::Begin {
                    user: 2,
                    key: 1,
                    fp: 1,
                },
                // The new engine finds the begin and the complete in the
                // page cache only.
                Op::Reopen,
                Op::Fault {
                    op: FaultOp::Sync,
                    kind: FaultKind::Eio,
                    nth: 0,
                },
                // Its token reservation's fsync fails.
                Op::Begin {
                    user: 2,
                    key: 1,
                    fp: 1,
                },
                Op::Reopen,
                // Synced after the zeros; then the final power loss.
                begin(1, 0),
            ],
        };
        if let Err(e) = run_case(&case) {
            panic!("{durability:?}: {e}");
        }
    }
}
