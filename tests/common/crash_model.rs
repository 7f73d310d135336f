//! Crash checker: random operation sequences with power losses, torn tails
//! and injected I/O faults, run against an [`Engine`] on a [`SimDisk`] and
//! checked against a reference model after every crash, in each durability
//! mode ([`Config::durability`]).
//!
//! Self-contained (it uses only `idemkv` and `std`), so both `tests/crash.rs`
//! and the `ops_crash` fuzz target include it with `#[path]`.
//!
//! Invariants checked (numbers from DESIGN.md):
//! - 1, under `Durability::Sync`: every acknowledged state (a `Started`
//!   lease, a completed outcome, a release, an extend) is present and exact
//!   after each crash;
//! - 1, under `Periodic` and `None` (docs/DURABILITY.md): a clean restart
//!   (close, which syncs, then open) loses nothing acknowledged; a power
//!   loss may take back acknowledged states that no sync covered yet, but
//!   only as a whole suffix: after it every key shows a state it really had
//!   since the last point the model knows was durable (a clean restart, a
//!   recovery, or a moment inside or after an operation when every file on
//!   the disk was synced: a segment roll, a token reservation, a
//!   compaction), and all keys together show the states after one common
//!   prefix of the operations since that point (with a `Periodic` interval
//!   short enough for the flusher to run during a case, below
//!   [`SHORTEST_REPLAYED_PERIOD`], the per-key rule only);
//! - 2: nothing half-written is visible: after recovery every key shows a
//!   state some whole record wrote; an operation that was interrupted or
//!   failed ("maybe applied") shows its old or its new state, never a mix;
//! - 3: at most one live owner (`Started` only where the model has no live
//!   record), stale tokens get `LeaseLost`, and in every mode every token
//!   handed out is above every token handed out before it, crash or not
//!   (including the tokens of acknowledged `begin`s a power loss took
//!   back), and above every token recovered;
//! - 4: replays return exactly the stored status and bytes, and only to the
//!   same fingerprint;
//! - fail-stop: an operation whose append or sync failed returns the I/O
//!   error, every later write is refused with `Poisoned` (without `Sync`,
//!   every call, reads included), and a reopen clears that;
//! - compaction ([`Op::Compact`]) changes no key's state, and a failed one
//!   reports the failed storage call.
//!
//! Crash points: [`Op::Crash`] loses power between operations;
//! [`Op::CrashInNext`] loses power *inside* the next operation that writes,
//! just before one of its storage calls (an append, a sync, a segment
//! creation, a directory sync, a compaction's rename or removal, a truncate
//! during recovery), with unsynced bytes torn as [`Tear`] says. A storage
//! wrapper (`Tap`) takes those images, arms the injected faults, so they
//! fire on an exact call, and (without `Sync`) notes the moments every file
//! is synced.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use idemkv::storage::{Fault, SimDisk, SimOp, Storage, StorageFile, Tear};
use idemkv::{
    Begin, Clock, Durability, Engine, Error, Fingerprint, Lease, LostReason, ManualClock, Options,
    Outcome, RecordState, RecordView,
};

/// User ids; the empty one is allowed. With 64 shards, "u" and "" hash to
/// even shards and "w" to an odd one, so a restart on two or more cores
/// replays them in different recovery lanes.
pub const USERS: [&str; 3] = ["u", "w", ""];
/// Idempotency keys.
pub const KEYS: [&str; 3] = ["k", "k2", "order-7"];
/// Where the manual clock starts.
pub const START_MS: u64 = 1_000_000;
/// The lease TTL of the engine under test.
pub const LEASE_TTL_MS: u64 = 1_000;
/// The record TTL of the engine under test.
pub const RECORD_TTL_MS: u64 = 5_000;
/// The smallest segment size `Options` accepts, so segments roll often.
pub const SMALL_SEGMENT: u64 = 4_096;
/// Body lengths: the last is larger than a small segment.
pub const BODY_LENS: [usize; 5] = [0, 3, 200, 1_500, 5_000];
/// Stored statuses.
pub const STATUSES: [u16; 4] = [200, 201, 422, 0];
/// Per-record TTLs of `complete_with_ttl` (0 is refused with
/// `InvalidArgument`).
pub const COMPLETE_TTLS_MS: [u64; 3] = [RECORD_TTL_MS, 1, 0];
/// Extend amounts (0 is refused with `InvalidArgument`).
pub const EXTEND_MS: [u64; 4] = [0, 500, LEASE_TTL_MS, 3 * LEASE_TTL_MS];
/// Clock moves.
pub const ADVANCE_MS: [u64; 8] = [
    1,
    100,
    LEASE_TTL_MS - 1,
    LEASE_TTL_MS,
    LEASE_TTL_MS + 1,
    RECORD_TTL_MS,
    2 * RECORD_TTL_MS,
    333,
];
/// The most operations a decoded case holds.
pub const MAX_OPS: usize = 256;
/// The interval of the `Durability::Periodic` cases [`decode`] makes: so
/// long that the background flusher never runs during a case, so only
/// segment rolls, token reservations, compactions and close sync, and a run
/// replays exactly.
pub const LONG_PERIOD: Duration = Duration::from_secs(3600);
/// Below this interval the flusher syncs at moments the case does not
/// choose: such a run is checked with the per-key rule only, and its
/// [`Op::Fault`]s are skipped (one could fire in the flusher, where no
/// caller sees it).
pub const SHORTEST_REPLAYED_PERIOD: Duration = Duration::from_secs(60);

/// How a power loss treats bytes written but not synced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TearKind {
    /// All unsynced bytes are lost.
    Clean,
    /// A prefix of the unsynced bytes survives.
    Prefix,
    /// A prefix survives, overwritten with garbage.
    Garbage,
}

/// The storage call a fault is injected into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOp {
    /// `StorageFile::append`.
    Append,
    /// `StorageFile::sync`.
    Sync,
    /// `Storage::create` (a segment roll, a compaction output).
    Create,
    /// `Storage::sync_dir` (a segment roll, a compaction).
    SyncDir,
    /// `Storage::rename` (a compaction publishing its output).
    Rename,
    /// `Storage::remove` (a compaction retiring its input).
    Remove,
}

/// The error an injected fault returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// EIO.
    Eio,
    /// ENOSPC.
    NoSpace,
}

/// One step of a case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `begin(USERS[user], KEYS[key], fingerprint fp)`.
    Begin { user: u8, key: u8, fp: u8 },
    /// `complete_with_ttl` with a lease picked by `lease` (see [`Op::pick`]),
    /// `STATUSES[status]`, body `body` and `COMPLETE_TTLS_MS[ttl]`.
    Complete {
        lease: u8,
        status: u8,
        body: u8,
        ttl: u8,
    },
    /// `release` of a picked lease.
    Release { lease: u8 },
    /// `extend` of a picked lease by `EXTEND_MS[by]`.
    Extend { lease: u8, by: u8 },
    /// Moves the clock by `ADVANCE_MS[by]`.
    Advance { by: u8 },
    /// Compares every key with the model (no crash).
    Check,
    /// `Engine::compact`: a full sweep and rewrite, which changes no
    /// record's state.
    Compact,
    /// `Engine::compact_below(0.5)`: a pass like the background thread's,
    /// which rewrites only mostly-dead segments and so must keep the records
    /// that ended a lease whose begin stays in a segment it leaves alone.
    /// Only [`decode_compaction`] makes it; [`encode`] writes it as `Compact`.
    CompactBelow,
    /// Power loss now: the engine is dropped and reopened on the disk a
    /// power loss leaves, which is then checked.
    Crash { tear: TearKind, seed: u8 },
    /// Power loss inside the next operation that writes to storage, just
    /// before its `point`-th storage call (modulo the calls it makes).
    CrashInNext { point: u8, tear: TearKind, seed: u8 },
    /// A clean restart: the engine is dropped (closing it) and reopened on
    /// the same disk.
    Reopen,
    /// The `nth` next call of `op` fails with `kind`.
    Fault {
        op: FaultOp,
        kind: FaultKind,
        nth: u8,
    },
}

/// Engine settings of a case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Roll segments at 4 KiB instead of the default 64 MiB.
    pub small_segments: bool,
    /// One index shard instead of 64.
    pub one_shard: bool,
    /// Whether [`Op::Reopen`] after a failed file sync is a real restart on
    /// the same disk. A restart reads the page cache, which after a failed
    /// fsync may hold bytes that never reach the disk ("fsyncgate"); the
    /// engine must not show or build on them. [`decode`] sets it; `false`
    /// runs such a reopen as a power loss instead.
    pub restart_after_failed_sync: bool,
    /// The durability mode under test, and so the promise checked (see the
    /// module docs). [`decode`] takes it from bits 3 and 4 of the first
    /// byte: 0 and 3 `Sync` (so inputs written before the mode was encoded
    /// keep their meaning), 1 `Periodic(LONG_PERIOD)`, 2 `None`.
    pub durability: Durability,
    /// Without `Sync`: whether an engine opened on bytes that no sync
    /// covered (a restart after a close that could not sync, because the
    /// engine was poisoned) must make them durable by its own clean close,
    /// as it must everything it shows. Recovery syncs the last segment that
    /// holds records (and the empty ones after it) before it serves, so it
    /// must (`tests/crash.rs`,
    /// `restart_after_a_close_that_could_not_sync_makes_what_it_shows_durable`).
    /// [`decode`] sets `true`; `false` checks such a close by what the files
    /// show only.
    pub restart_syncs_what_it_found: bool,
}

/// A whole case: settings and operations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Case {
    /// Engine settings.
    pub config: Config,
    /// The operations, in order.
    pub ops: Vec<Op>,
}

/// What a run did, for the tests' reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunStats {
    /// Operations run.
    pub ops: u64,
    /// Power losses checked (between or inside operations).
    pub crashes: u64,
    /// Of those, power losses inside an operation.
    pub mid_op_crashes: u64,
    /// Clean reopens checked.
    pub reopens: u64,
    /// Injected faults that fired.
    pub faults: u64,
    /// Operations answered with `Poisoned`.
    pub refused: u64,
    /// Power losses after which some key showed an acknowledged state
    /// older than its newest one (never under `Sync`).
    pub rollbacks: u64,
    /// Points (inside or after an operation, or after a recovery) at which
    /// the model learnt that every state so far was durable (not counted
    /// under `Sync`, where every acknowledged state is).
    pub durable_points: u64,
}

impl std::ops::AddAssign for RunStats {
    fn add_assign(&mut self, o: RunStats) {
        self.ops += o.ops;
        self.crashes += o.crashes;
        self.mid_op_crashes += o.mid_op_crashes;
        self.reopens += o.reopens;
        self.faults += o.faults;
        self.refused += o.refused;
        self.rollbacks += o.rollbacks;
        self.durable_points += o.durable_points;
    }
}

// ---------------------------------------------------------------------------
// Bytes to operations, and back.

/// Reads bytes; past the end it reads zeros.
struct Bytes<'a> {
    data: &'a [u8],
    at: usize,
}

impl Bytes<'_> {
    fn done(&self) -> bool {
        self.at >= self.data.len()
    }
    fn u8(&mut self) -> u8 {
        let b = self.data.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }
}

fn tear_kind(b: u8) -> TearKind {
    match b % 3 {
        0 => TearKind::Clean,
        1 => TearKind::Prefix,
        _ => TearKind::Garbage,
    }
}

/// The durability mode bits 3 and 4 of the first input byte name.
fn durability_of(flags: u8) -> Durability {
    match (flags >> 3) % 4 {
        1 => Durability::Periodic(LONG_PERIOD),
        2 => Durability::None,
        _ => Durability::Sync,
    }
}

/// The inverse of [`durability_of`] (any `Periodic` interval is written as
/// [`LONG_PERIOD`]).
fn durability_bits(d: Durability) -> u8 {
    match d {
        Durability::Sync => 0,
        Durability::Periodic(_) => 1 << 3,
        Durability::None => 2 << 3,
    }
}

fn tear_byte(t: TearKind) -> u8 {
    match t {
        TearKind::Clean => 0,
        TearKind::Prefix => 1,
        TearKind::Garbage => 2,
    }
}

/// Decodes any bytes into a case; never panics. The first byte holds the
/// settings (bits 0-1 small segments, 2 one shard, 3-4 the durability
/// mode, see [`Config::durability`]); then each operation is a tag byte and up to three parameter
/// bytes (missing bytes read as zero). Every value is reduced to its range,
/// so [`encode`] of the result decodes to the same case.
pub fn decode(data: &[u8]) -> Case {
    let mut r = Bytes { data, at: 0 };
    let flags = r.u8();
    let config = Config {
        small_segments: flags & 3 != 0,
        one_shard: flags & 4 != 0,
        restart_after_failed_sync: true,
        durability: durability_of(flags),
        restart_syncs_what_it_found: true,
    };
    let mut ops = Vec::new();
    while !r.done() && ops.len() < MAX_OPS {
        let tag = r.u8();
        let op = match tag % 18 {
            0..=3 | 17 => {
                let p = r.u8();
                Op::Begin {
                    user: p % 3,
                    key: (p / 3) % 3,
                    fp: (p / 9) % 2,
                }
            }
            4..=6 => {
                let lease = r.u8();
                let p = r.u8();
                Op::Complete {
                    lease,
                    status: p % 4,
                    body: (p / 4) % 5,
                    ttl: (p / 20) % 3,
                }
            }
            7 => Op::Release { lease: r.u8() },
            8 => {
                let lease = r.u8();
                Op::Extend {
                    lease,
                    by: r.u8() % 4,
                }
            }
            9 => Op::Advance { by: r.u8() % 8 },
            10 => Op::Check,
            11 => {
                let p = r.u8();
                Op::Crash {
                    tear: tear_kind(p),
                    seed: r.u8(),
                }
            }
            12 | 13 => {
                let point = r.u8();
                let p = r.u8();
                Op::CrashInNext {
                    point,
                    tear: tear_kind(p),
                    seed: r.u8(),
                }
            }
            14 => Op::Reopen,
            16 => Op::Compact,
            _ => {
                let p = r.u8();
                Op::Fault {
                    op: match p % 6 {
                        0 => FaultOp::Append,
                        1 => FaultOp::Sync,
                        2 => FaultOp::Create,
                        3 => FaultOp::SyncDir,
                        4 => FaultOp::Rename,
                        _ => FaultOp::Remove,
                    },
                    kind: if (p / 6).is_multiple_of(2) {
                        FaultKind::Eio
                    } else {
                        FaultKind::NoSpace
                    },
                    nth: r.u8() % 4,
                }
            }
        };
        ops.push(op);
    }
    Case { config, ops }
}

/// The bytes that [`decode`] turns into `case` (for values in range).
pub fn encode(case: &Case) -> Vec<u8> {
    let c = case.config;
    let mut out = vec![
        u8::from(c.small_segments) | u8::from(c.one_shard) << 2 | durability_bits(c.durability),
    ];
    for op in &case.ops {
        match *op {
            Op::Begin { user, key, fp } => out.extend([0, user % 3 + 3 * (key % 3) + 9 * (fp % 2)]),
            Op::Complete {
                lease,
                status,
                body,
                ttl,
            } => out.extend([4, lease, status % 4 + 4 * (body % 5) + 20 * (ttl % 3)]),
            Op::Release { lease } => out.extend([7, lease]),
            Op::Extend { lease, by } => out.extend([8, lease, by % 4]),
            Op::Advance { by } => out.extend([9, by % 8]),
            Op::Check => out.push(10),
            Op::Compact | Op::CompactBelow => out.push(16),
            Op::Crash { tear, seed } => out.extend([11, tear_byte(tear), seed]),
            Op::CrashInNext { point, tear, seed } => out.extend([12, point, tear_byte(tear), seed]),
            Op::Reopen => out.push(14),
            Op::Fault { op, kind, nth } => {
                let o = match op {
                    FaultOp::Append => 0,
                    FaultOp::Sync => 1,
                    FaultOp::Create => 2,
                    FaultOp::SyncDir => 3,
                    FaultOp::Rename => 4,
                    FaultOp::Remove => 5,
                };
                let k = match kind {
                    FaultKind::Eio => 0,
                    FaultKind::NoSpace => 6,
                };
                out.extend([15, o + k, nth % 4]);
            }
        }
    }
    out
}

/// Decodes `data` and runs it; the entry point of the `ops_crash` fuzz
/// target.
///
/// # Panics
/// With the failing operation and the whole case when an invariant breaks.
pub fn run_bytes(data: &[u8]) {
    let case = decode(data);
    if let Err(e) = run_case(&case) {
        panic!("crash model: {e}\ncase: {case:#?}");
    }
}

/// Decodes bytes into a case aimed at compaction: small segments, and after
/// every third operation a full compaction with a power loss (clean, torn or
/// garbled) just before one of its storage calls, chosen by the input, or a
/// fault in one of them. The first input byte is the settings, as for
/// [`decode`]; the rest alternates operation bytes and compaction-point
/// bytes.
pub fn decode_compaction(data: &[u8]) -> Case {
    let mut case = decode(data);
    case.config.small_segments = true;
    let mut points = data.iter().rev().copied().cycle();
    let mut ops = Vec::with_capacity(case.ops.len() * 2);
    for (i, op) in case.ops.into_iter().enumerate() {
        ops.push(op);
        if i % 3 != 2 {
            continue;
        }
        let point = points.next().unwrap_or(0);
        let choice = points.next().unwrap_or(0);
        match choice % 4 {
            0 => {}
            1 => ops.push(Op::Fault {
                op: match point % 5 {
                    0 => FaultOp::Create,
                    1 => FaultOp::Sync,
                    2 => FaultOp::Rename,
                    3 => FaultOp::SyncDir,
                    _ => FaultOp::Remove,
                },
                kind: if choice & 8 == 0 {
                    FaultKind::Eio
                } else {
                    FaultKind::NoSpace
                },
                nth: (choice / 16) % 3,
            }),
            _ => ops.push(Op::CrashInNext {
                point,
                tear: tear_kind(choice / 4),
                seed: choice,
            }),
        }
        ops.push(if point % 2 == 0 {
            Op::Compact
        } else {
            Op::CompactBelow
        });
        if ops.len() >= MAX_OPS {
            break;
        }
    }
    ops.push(Op::Check);
    Case {
        config: case.config,
        ops,
    }
}

/// Runs `ops` with small segments and 64 shards under `Durability::Sync`.
///
/// # Errors
/// A description of the first broken invariant.
pub fn run(ops: &[Op]) -> Result<(), String> {
    run_in(Durability::Sync, ops).map(|_| ())
}

/// Runs `ops` with small segments and 64 shards under `durability`.
///
/// # Errors
/// A description of the first broken invariant.
pub fn run_in(durability: Durability, ops: &[Op]) -> Result<RunStats, String> {
    run_case(&Case {
        config: Config {
            small_segments: true,
            one_shard: false,
            restart_after_failed_sync: true,
            durability,
            restart_syncs_what_it_found: true,
        },
        ops: ops.to_vec(),
    })
}

/// Removes operations from a failing case while it still fails (greedy
/// delta debugging), for readable reports. Returns `case` if it passes.
pub fn shrink(case: &Case) -> Case {
    let mut best = case.clone();
    if run_case(&best).is_ok() {
        return best;
    }
    let mut chunk = best.ops.len().max(1);
    while chunk >= 1 {
        let mut i = 0;
        while i < best.ops.len() {
            let mut trial = best.clone();
            let end = (i + chunk).min(trial.ops.len());
            trial.ops.drain(i..end);
            if run_case(&trial).is_err() {
                best = trial;
            } else {
                i += chunk;
            }
        }
        if chunk == 1 {
            break;
        }
        chunk /= 2;
    }
    best
}

/// Runs a case, checking every answer and every crash against the model.
///
/// # Errors
/// A description of the first broken invariant, naming the operation.
pub fn run_case(case: &Case) -> Result<RunStats, String> {
    run_case_with(case, &|_, _| {})
}

/// [`run_case`] with `tweak(options, opens_before)` applied to the options
/// of every open (the first has `opens_before == 0`), such as keys that
/// rotate at every restart (`tests/crash_encryption.rs`).
///
/// # Errors
/// As [`run_case`].
pub fn run_case_with(case: &Case, tweak: &dyn Fn(&mut Options, u64)) -> Result<RunStats, String> {
    let mut h = Harness::new(case.config, tweak)?;
    let with_trace = |h: &Harness, e: String| {
        let keep = std::env::var("CRASH_TRACE")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(60);
        let from = h.trace.len().saturating_sub(keep);
        let trace = h.trace.get(from..).unwrap_or_default().join("\n  ");
        format!("{e}\ntrace (last answers):\n  {trace}")
    };
    for (i, op) in case.ops.iter().enumerate() {
        let now = h.clock.now_ms();
        h.trace.push(format!("#{i} t={now} {op:?}"));
        if let Err(e) = h.step(op) {
            return Err(with_trace(&h, format!("op #{i} {op:?} at t={now}: {e}")));
        }
    }
    // A last power loss: everything acknowledged must survive it.
    if let Err(e) = h.power_loss(Tear::Clean, "final") {
        return Err(with_trace(&h, format!("final crash: {e}")));
    }
    Ok(h.stats)
}

// ---------------------------------------------------------------------------
// The storage wrapper: crash images inside operations, faults on exact calls.

/// A fault waiting for its call.
#[derive(Clone, Copy, Debug)]
struct PendingFault {
    op: SimOp,
    kind: io::ErrorKind,
    /// Calls of `op` to let through first.
    skip: u8,
}

#[derive(Debug, Default)]
struct TapState {
    /// Take a crash image before each storage call that changes the disk.
    capturing: bool,
    tear: Option<Tear>,
    images: Vec<SimDisk>,
    pending: Option<PendingFault>,
    /// The kind of the last storage call that failed, if any since taken.
    failed: Option<io::ErrorKind>,
    /// A file sync failed since the last power loss: the page cache holds
    /// bytes that may never reach the disk.
    sync_failed: bool,
    /// Without `Sync`: watch for moments at which every file is synced.
    watch_durable: bool,
    /// Successful file and directory syncs since taken.
    syncs: u64,
    /// The number of crash images taken when, after a successful sync and
    /// before any failed call, every file on the disk was first found
    /// synced (since taken): images from that index on were taken after it.
    all_synced_at: Option<usize>,
}

/// The shared state of every `Tap` of one run.
#[derive(Clone, Debug, Default)]
struct TapHandle(Arc<Mutex<TapState>>);

impl TapHandle {
    fn lock(&self) -> MutexGuard<'_, TapState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called before a storage call that changes `disk`.
    fn before(&self, disk: &SimDisk, op: SimOp) {
        let mut s = self.lock();
        if s.capturing {
            let tear = s.tear.unwrap_or(Tear::Clean);
            s.images.push(disk.crash(tear));
        }
        if let Some(f) = s.pending.as_mut()
            && f.op == op
        {
            if f.skip == 0 {
                disk.inject(Fault {
                    op,
                    after: 0,
                    kind: f.kind,
                    sticky: false,
                });
                s.pending = None;
            } else {
                f.skip -= 1;
            }
        }
    }

    fn after<T>(&self, result: io::Result<T>) -> io::Result<T> {
        if let Err(e) = &result {
            self.lock().failed = Some(e.kind());
        }
        result
    }

    fn after_sync(&self, disk: &SimDisk, result: io::Result<()>) -> io::Result<()> {
        match &result {
            Ok(()) => self.synced(disk),
            Err(_) => self.lock().sync_failed = true,
        }
        self.after(result)
    }

    /// After a successful file or directory sync: notes whether every file
    /// of `disk` is now synced.
    fn synced(&self, disk: &SimDisk) {
        {
            let mut s = self.lock();
            s.syncs += 1;
            // After a failed call the engine may have cut acknowledged
            // records off the live files (and syncs that cut).
            if !s.watch_durable || s.all_synced_at.is_some() || s.failed.is_some() {
                return;
            }
        }
        if all_synced(disk) {
            let mut s = self.lock();
            if s.all_synced_at.is_none() {
                s.all_synced_at = Some(s.images.len());
            }
        }
    }
}

/// Whether a power loss now would keep every file of `disk` as it is: every
/// name durable, every file's bytes synced. (A removal that is not durable
/// yet may be undone: compaction removes only files whose records are dead
/// or copied, so that changes no state, and if it did, the checks would
/// find it in every mode.)
fn all_synced(disk: &SimDisk) -> bool {
    unsynced(disk).is_empty()
}

/// What a power loss now would change in the files of `disk`: names that
/// would vanish, files whose bytes would change.
fn unsynced(disk: &SimDisk) -> Vec<String> {
    let image = disk.crash(Tear::Clean);
    let mut out = Vec::new();
    for name in disk.names() {
        match (disk.read_file(&name), image.read_file(&name)) {
            (_, None) => out.push(format!("{name} (name not durable)")),
            (Some(l), Some(d)) if l != d => out.push(format!(
                "{name} ({} bytes, {} of them durable)",
                l.len(),
                d.len()
            )),
            _ => {}
        }
    }
    out.sort();
    out
}

/// A [`Storage`] over a [`SimDisk`] that reports to a [`TapHandle`].
#[derive(Debug)]
struct Tap {
    disk: SimDisk,
    handle: TapHandle,
}

#[derive(Debug)]
struct TapFile {
    inner: Arc<dyn StorageFile>,
    disk: SimDisk,
    handle: TapHandle,
}

impl Tap {
    fn file(&self, inner: Arc<dyn StorageFile>) -> Arc<dyn StorageFile> {
        Arc::new(TapFile {
            inner,
            disk: self.disk.clone(),
            handle: self.handle.clone(),
        })
    }
}

impl Storage for Tap {
    fn create(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        self.handle.before(&self.disk, SimOp::Create);
        let file = self.handle.after(self.disk.create(name))?;
        Ok(self.file(file))
    }
    fn open(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        let file = self.handle.after(self.disk.open(name))?;
        Ok(self.file(file))
    }
    fn list(&self) -> io::Result<Vec<String>> {
        self.handle.after(self.disk.list())
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        self.handle.before(&self.disk, SimOp::Remove);
        self.handle.after(self.disk.remove(name))
    }
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.handle.before(&self.disk, SimOp::Rename);
        self.handle.after(self.disk.rename(from, to))
    }
    fn sync_dir(&self) -> io::Result<()> {
        self.handle.before(&self.disk, SimOp::SyncDir);
        let result = self.disk.sync_dir();
        if result.is_ok() {
            self.handle.synced(&self.disk);
        }
        self.handle.after(result)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.disk.path(name)
    }
    fn close(&self) {
        self.disk.close();
    }
}

impl StorageFile for TapFile {
    fn append(&self, data: &[u8]) -> io::Result<()> {
        self.handle.before(&self.disk, SimOp::Append);
        self.handle.after(self.inner.append(data))
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.handle.after(self.inner.read_at(offset, buf))
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn sync(&self) -> io::Result<()> {
        self.handle.before(&self.disk, SimOp::Sync);
        self.handle.after_sync(&self.disk, self.inner.sync())
    }
    fn truncate(&self, len: u64) -> io::Result<()> {
        self.handle.before(&self.disk, SimOp::Truncate);
        self.handle.after(self.inner.truncate(len))
    }
}

// ---------------------------------------------------------------------------
// The reference model.

type Uk = (u8, u8);

/// A record's fencing token as the model knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tok {
    Known(u64),
    /// A `begin` that failed or was interrupted: its token was never seen,
    /// but it is above this one.
    Above(u64),
}

impl Tok {
    fn admits(self, token: u64) -> bool {
        match self {
            Tok::Known(t) => t == token,
            Tok::Above(t) => token > t,
        }
    }
}

/// A stored body; its `Debug` shows the length and the first bytes.
#[derive(Clone, PartialEq, Eq)]
struct Body(Vec<u8>);

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let head = self.0.get(..4).unwrap_or(&self.0);
        write!(f, "{} bytes {head:?}..", self.0.len())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Rec {
    Lease {
        token: Tok,
        fp: u8,
        deadline: u64,
    },
    Done {
        token: u64,
        fp: u8,
        expiry: u64,
        status: u16,
        body: Body,
    },
}

impl Rec {
    fn deadline(&self) -> u64 {
        match self {
            Rec::Lease { deadline, .. } => *deadline,
            Rec::Done { expiry, .. } => *expiry,
        }
    }
    fn fp(&self) -> u8 {
        match self {
            Rec::Lease { fp, .. } | Rec::Done { fp, .. } => *fp,
        }
    }
    fn live(&self, now: u64) -> bool {
        now < self.deadline()
    }
}

/// The live part of a state at `now`.
fn live(state: &Option<Rec>, now: u64) -> Option<&Rec> {
    state.as_ref().filter(|r| r.live(now))
}

/// Whether the engine's view (and stored outcome) show `state` at `now`.
fn shows(
    state: &Option<Rec>,
    view: &Option<RecordView>,
    outcome: &Option<Outcome>,
    now: u64,
) -> bool {
    match (live(state, now), view) {
        (None, None) => outcome.is_none(),
        (
            Some(Rec::Lease {
                token, deadline, ..
            }),
            Some(v),
        ) => {
            v.state == RecordState::InProgress
                && token.admits(v.token)
                && v.lease_expires_at_ms == Some(*deadline)
                && v.expires_at_ms.is_none()
                && v.status.is_none()
                && outcome.is_none()
        }
        (
            Some(Rec::Done {
                token,
                expiry,
                status,
                body,
                ..
            }),
            Some(v),
        ) => {
            v.state == RecordState::Completed
                && v.token == *token
                && v.expires_at_ms == Some(*expiry)
                && v.lease_expires_at_ms.is_none()
                && v.status == Some(*status)
                && outcome
                    .as_ref()
                    .is_some_and(|o| o.status == *status && o.body[..] == body.0[..])
        }
        _ => false,
    }
}

/// What `begin` must answer on a key whose state is known.
#[derive(Debug)]
enum ExpectBegin {
    Started,
    Replay { status: u16, body: Body },
    InFlight(Duration),
    Mismatch,
}

fn expect_begin(state: &Option<Rec>, fp: u8, now: u64) -> ExpectBegin {
    match live(state, now) {
        None => ExpectBegin::Started,
        Some(r) if r.fp() != fp => ExpectBegin::Mismatch,
        Some(Rec::Lease { deadline, .. }) => {
            ExpectBegin::InFlight(Duration::from_millis(deadline - now))
        }
        Some(Rec::Done { status, body, .. }) => ExpectBegin::Replay {
            status: *status,
            body: body.clone(),
        },
    }
}

/// What an owner call must answer.
#[derive(Debug)]
enum ExpectOwner {
    Ok,
    /// `LeaseLost` with one of these reasons.
    Lost(Vec<LostReason>),
}

/// The answer of an owner call of a lease with `token` whose deadline (as
/// the presented lease says) is `lease_deadline`. The reason of a refusal
/// does not depend on whether the sweeper ran: an expired record counts as
/// an absent one, which is `Expired` once the lease's deadline passed and
/// `Gone` before.
fn expect_owner(
    state: &Option<Rec>,
    token: u64,
    lease_deadline: u64,
    now: u64,
) -> Result<ExpectOwner, String> {
    let absent = if now >= lease_deadline {
        LostReason::Expired
    } else {
        LostReason::Gone
    };
    let Some(r) = state.as_ref().filter(|r| r.live(now)) else {
        return Ok(ExpectOwner::Lost(vec![absent]));
    };
    let (rtoken, in_progress) = match r {
        Rec::Lease {
            token: Tok::Known(t),
            ..
        } => (*t, true),
        Rec::Done { token, .. } => (*token, false),
        Rec::Lease { token, .. } => return Err(format!("model: unresolved token {token:?}")),
    };
    Ok(if rtoken > token {
        ExpectOwner::Lost(vec![LostReason::Superseded { current: rtoken }])
    } else if rtoken < token {
        return Err(format!(
            "model: live record token {rtoken} below the acknowledged lease token {token}"
        ));
    } else if in_progress {
        ExpectOwner::Ok
    } else {
        ExpectOwner::Lost(vec![LostReason::Completed])
    })
}

/// A key's possible states: one when certain; two while an operation that
/// failed or was interrupted may or may not have reached the disk.
type States = Vec<Option<Rec>>;

/// The states of the keys (a key not in the map is absent).
type KeyStates = BTreeMap<Uk, States>;

/// The states of `uk` in `map`.
fn states_in(map: &KeyStates, uk: Uk) -> &[Option<Rec>] {
    const ABSENT: &[Option<Rec>] = &[None];
    map.get(&uk).map_or(ABSENT, Vec::as_slice)
}

/// How a power loss may change the acknowledged states, by mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Promise {
    /// `Sync`: it changes none.
    Exact,
    /// `Periodic` with a long interval, `None`: it keeps the durable states
    /// and one prefix of the changes since, the same for every key.
    Prefix,
    /// `Periodic` with a short interval (the flusher syncs when it likes):
    /// each key shows a state it had since the durable point.
    PerKey,
}

impl Promise {
    fn of(durability: Durability) -> Promise {
        match durability {
            Durability::Sync => Promise::Exact,
            Durability::Periodic(d) if d < SHORTEST_REPLAYED_PERIOD => Promise::PerKey,
            Durability::Periodic(_) | Durability::None => Promise::Prefix,
        }
    }
}

/// The model: per key, the states it may be in now, and without `Sync` the
/// states a power loss may go back to.
#[derive(Debug)]
struct Model {
    /// What a power loss may do to acknowledged states.
    promise: Promise,
    /// The states now (what reads must show).
    keys: KeyStates,
    /// Without `Sync`: the states as of the last point known durable.
    durable: KeyStates,
    /// Without `Sync`: every change to `keys` since that point, oldest
    /// first. The log is append-only and only its active segment holds
    /// unsynced bytes, so a power loss keeps `durable` and a prefix of
    /// these changes. Always empty under `Sync`.
    unsynced: Vec<(Uk, States)>,
    /// Above every token handed out (a `Started` the caller saw) or seen on
    /// disk. A power loss never lowers it: a token handed out after a
    /// restart must be above it in every mode, even if the `begin` that
    /// had the token was taken back. Only an operation the power loss
    /// interrupted (so the caller never saw its token) is taken out again.
    max_token: u64,
    /// Set by the first failed write: later writes must be refused.
    poisoned: Option<io::ErrorKind>,
    /// Set by a failed compaction, which poisons the engine or not
    /// depending on the step that failed: later writes may be refused.
    maybe_poisoned: Option<io::ErrorKind>,
}

impl Model {
    fn new(durability: Durability) -> Model {
        Model {
            promise: Promise::of(durability),
            keys: KeyStates::new(),
            durable: KeyStates::new(),
            unsynced: Vec::new(),
            max_token: 0,
            poisoned: None,
            maybe_poisoned: None,
        }
    }

    /// Whether a power loss may take back acknowledged states.
    fn loses_unsynced(&self) -> bool {
        self.promise != Promise::Exact
    }

    /// Whether the engine may refuse reads and writes with `Poisoned`.
    fn may_refuse(&self) -> bool {
        self.poisoned.is_some() || self.maybe_poisoned.is_some()
    }

    /// The state of `uk` if certain.
    fn sure(&self, uk: Uk) -> Option<&Option<Rec>> {
        match self.keys.get(&uk) {
            None => Some(&None),
            Some(c) if c.len() == 1 => c.first(),
            Some(_) => None,
        }
    }

    fn put(&mut self, uk: Uk, states: States) {
        if self.loses_unsynced() {
            self.unsynced.push((uk, states.clone()));
        }
        self.keys.insert(uk, states);
    }

    fn set(&mut self, uk: Uk, state: Option<Rec>) {
        self.put(uk, vec![state]);
    }

    /// `uk` is now either `before` or `after`.
    fn maybe(&mut self, uk: Uk, before: Option<Rec>, after: Option<Rec>) {
        let mut states = vec![before];
        if !states.contains(&after) {
            states.push(after);
        }
        self.put(uk, states);
    }

    /// The first `n` unsynced changes are durable now.
    fn durable_through(&mut self, n: usize) {
        let n = n.min(self.unsynced.len());
        for (uk, states) in self.unsynced.drain(..n) {
            self.durable.insert(uk, states);
        }
    }

    /// Every state so far is durable.
    fn all_durable(&mut self) {
        self.durable = self.keys.clone();
        self.unsynced.clear();
    }

    /// What the states may be after a power loss (or, with `exact`, after a
    /// clean restart): the states after the first `j` of the returned
    /// changes applied to the returned states, for some `j`.
    fn after_power_loss(&self, exact: bool) -> (KeyStates, Vec<(Uk, States)>) {
        if exact || !self.loses_unsynced() {
            (self.keys.clone(), Vec::new())
        } else {
            (self.durable.clone(), self.unsynced.clone())
        }
    }

    /// After a recovery found `found`: those are the states now; with
    /// `durable`, known durable too. Otherwise a later power loss may still
    /// go back to any state a power loss now could have shown.
    fn recovered(&mut self, found: BTreeMap<Uk, Option<Rec>>, durable: bool) {
        for (uk, state) in found {
            if self.keys.get(&uk) != Some(&vec![state.clone()]) {
                self.set(uk, state);
            }
        }
        if durable && self.loses_unsynced() {
            self.all_durable();
        }
    }
}

// ---------------------------------------------------------------------------
// The harness.

/// A lease the caller holds (acknowledged).
#[derive(Clone, Debug)]
struct Slot {
    lease: Lease,
    uk: Uk,
    fp: u8,
    /// The open of the engine that issued it: a later open refuses it
    /// with `ForeignLease`.
    epoch: u64,
}

/// What an operation did to the model, so that an interruption can turn
/// it into "maybe applied".
struct Effect {
    uk: Uk,
    before: Option<Rec>,
    after: Option<Rec>,
    /// The slot the operation added, if any (a lease the caller never got
    /// if the power went out first).
    slot_added: bool,
    max_token_before: u64,
}

fn fingerprint(fp: u8) -> Fingerprint {
    Fingerprint::of(if fp == 0 { b"request A" } else { b"request B" })
}

/// Body `i`: a pattern that differs per body, so a wrong body cannot pass.
fn body(i: u8) -> Vec<u8> {
    let len = BODY_LENS.get(usize::from(i)).copied().unwrap_or(0);
    (0..len)
        .map(|j| (j.wrapping_mul(31) + usize::from(i) * 7) as u8)
        .collect()
}

fn tear_of(kind: TearKind, seed: u8) -> Tear {
    let r = u64::from(seed).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5555;
    match kind {
        TearKind::Clean => Tear::Clean,
        TearKind::Prefix => Tear::Prefix(r),
        TearKind::Garbage => Tear::Garbage(r),
    }
}

/// The I/O error kind inside an engine error, for the I/O variants.
fn io_kind(e: &Error) -> Option<io::ErrorKind> {
    match e {
        Error::Io { source, .. } | Error::NoSpace { source, .. } => Some(source.kind()),
        _ => None,
    }
}

struct Harness<'t> {
    config: Config,
    clock: Arc<ManualClock>,
    options: Options,
    disk: SimDisk,
    tap: TapHandle,
    engine: Option<Engine>,
    /// Opens so far; the current engine's leases carry this epoch.
    epoch: u64,
    model: Model,
    slots: Vec<Slot>,
    /// A power loss armed for inside the next operation that writes.
    armed: Option<(u8, Tear)>,
    /// Without `Sync`: the engine was opened on files that were not all
    /// synced (see [`Config::restart_syncs_what_it_found`]).
    opened_on_unsynced: bool,
    stats: RunStats,
    /// What each operation answered, for failure reports.
    trace: Vec<String>,
    /// Applied to the options of every open ([`run_case_with`]).
    tweak: &'t dyn Fn(&mut Options, u64),
}

impl<'t> Harness<'t> {
    fn new(config: Config, tweak: &'t dyn Fn(&mut Options, u64)) -> Result<Harness<'t>, String> {
        let clock = Arc::new(ManualClock::new(START_MS));
        let options = Options {
            durability: config.durability,
            lease_ttl: Duration::from_millis(LEASE_TTL_MS),
            record_ttl: Duration::from_millis(RECORD_TTL_MS),
            shards: if config.one_shard { 1 } else { 64 },
            segment_bytes: if config.small_segments {
                SMALL_SEGMENT
            } else {
                Options::default().segment_bytes
            },
            // Compaction runs only through `Op::Compact`, so runs replay.
            background: false,
            clock: clock.clone(),
            ..Options::default()
        };
        let model = Model::new(config.durability);
        let tap = TapHandle::default();
        tap.lock().watch_durable = model.loses_unsynced();
        let mut h = Harness {
            config,
            clock,
            options,
            disk: SimDisk::new(),
            tap,
            engine: None,
            epoch: 0,
            model,
            slots: Vec::new(),
            armed: None,
            opened_on_unsynced: false,
            stats: RunStats::default(),
            trace: Vec::new(),
            tweak,
        };
        h.open().map_err(|e| format!("open a fresh engine: {e}"))?;
        Ok(h)
    }

    fn open(&mut self) -> Result<(), String> {
        let storage: Arc<dyn Storage> = Arc::new(Tap {
            disk: self.disk.clone(),
            handle: self.tap.clone(),
        });
        let mut options = self.options.clone();
        (self.tweak)(&mut options, self.epoch);
        let engine = Engine::open_with_storage(storage, options)
            .map_err(|e| format!("open failed: {e:?}"))?;
        self.engine = Some(engine);
        self.epoch += 1;
        Ok(())
    }

    fn engine(&self) -> Result<&Engine, String> {
        self.engine.as_ref().ok_or_else(|| "no engine".to_owned())
    }

    fn now(&self) -> u64 {
        self.clock.now_ms()
    }

    /// The slot a lease byte picks: 0..4 the most recent leases, otherwise
    /// any lease ever acknowledged.
    fn pick(&self, lease: u8) -> Option<Slot> {
        let n = self.slots.len();
        if n == 0 {
            return None;
        }
        let i = if lease < 4 {
            n - 1 - usize::from(lease).min(n - 1)
        } else {
            usize::from(lease) % n
        };
        self.slots.get(i).cloned()
    }

    fn step(&mut self, op: &Op) -> Result<(), String> {
        self.stats.ops += 1;
        match *op {
            Op::CrashInNext { point, tear, seed } => {
                self.armed = Some((point, tear_of(tear, seed)));
                return Ok(());
            }
            Op::Fault { .. } if self.model.promise == Promise::PerKey => {
                // The flusher could meet it, and no caller would see it.
                self.trace
                    .push("   skipped: the flusher syncs at any time".into());
                return Ok(());
            }
            Op::Fault { op, kind, nth } => {
                self.tap.lock().pending = Some(PendingFault {
                    op: match op {
                        FaultOp::Append => SimOp::Append,
                        FaultOp::Sync => SimOp::Sync,
                        FaultOp::Create => SimOp::Create,
                        FaultOp::SyncDir => SimOp::SyncDir,
                        FaultOp::Rename => SimOp::Rename,
                        FaultOp::Remove => SimOp::Remove,
                    },
                    kind: match kind {
                        FaultKind::Eio => io::ErrorKind::Other,
                        FaultKind::NoSpace => io::ErrorKind::StorageFull,
                    },
                    skip: nth,
                });
                return Ok(());
            }
            Op::Advance { by } => {
                let ms = ADVANCE_MS.get(usize::from(by)).copied().unwrap_or(1);
                self.clock.advance(Duration::from_millis(ms));
                return Ok(());
            }
            _ => {}
        }
        if let Some((_, tear)) = self.armed {
            let mut s = self.tap.lock();
            s.capturing = true;
            s.tear = Some(tear);
            s.images.clear();
        }
        {
            let mut s = self.tap.lock();
            s.failed = None;
            s.syncs = 0;
            s.all_synced_at = None;
        }
        // Where this operation's changes start, for a durable point inside
        // it: a sync that found every file synced covered every operation
        // before this one.
        let before_op = self.model.unsynced.len();
        // Only if the engine was consistent with its files at the start.
        let may_have_diverged = self.model.may_refuse();
        let restarts = matches!(op, Op::Crash { .. } | Op::Reopen);
        // A power loss inside a clean restart's close may come before its
        // sync: it goes back to the states of before the restart.
        let saved = (*op == Op::Reopen && self.armed.is_some() && self.model.loses_unsynced())
            .then(|| {
                (
                    self.model.keys.clone(),
                    self.model.durable.clone(),
                    self.model.unsynced.clone(),
                )
            });
        let effect = match *op {
            Op::Begin { user, key, fp } => self.begin((user % 3, key % 3), fp % 2)?,
            Op::Complete {
                lease,
                status,
                body,
                ttl,
            } => self.complete(lease, status, body, ttl)?,
            Op::Release { lease } => self.release(lease)?,
            Op::Extend { lease, by } => self.extend(lease, by)?,
            Op::Check => {
                self.check_all()?;
                None
            }
            Op::Compact => {
                self.compact(true)?;
                None
            }
            Op::CompactBelow => {
                self.compact(false)?;
                None
            }
            Op::Crash { tear, seed } => {
                self.power_loss(tear_of(tear, seed), "crash")?;
                None
            }
            Op::Reopen => {
                self.reopen()?;
                None
            }
            Op::CrashInNext { .. } | Op::Fault { .. } | Op::Advance { .. } => None,
        };
        let (images, unreported, syncs, all_synced_at) = {
            let mut s = self.tap.lock();
            s.capturing = false;
            (
                std::mem::take(&mut s.images),
                s.failed.take(),
                std::mem::take(&mut s.syncs),
                s.all_synced_at.take(),
            )
        };
        // A restart's recovery judged durability itself.
        let all_synced_at = all_synced_at.filter(|_| !restarts);
        if let Some(kind) = unreported {
            return Err(format!(
                "a storage call failed ({kind:?}) but the operation did not report it"
            ));
        }
        if let Some((point, _)) = self.armed
            && !images.is_empty()
        {
            self.armed = None;
            let i = usize::from(point) % images.len();
            let Some(image) = images.into_iter().nth(i) else {
                return Err("no crash image".into());
            };
            if all_synced_at.is_some_and(|at| at <= i) && !may_have_diverged {
                self.durable_point(Some(before_op));
            }
            if let Some((keys, durable, unsynced)) = saved {
                self.model.keys = keys;
                self.model.durable = durable;
                self.model.unsynced = unsynced;
            }
            if let Some(e) = effect {
                // The power went out before the operation returned: the
                // caller saw no answer, so it may or may not have happened.
                if e.slot_added {
                    self.slots.pop();
                }
                self.model.max_token = e.max_token_before;
                if e.before != e.after {
                    self.model.maybe(e.uk, e.before, e.after);
                }
            }
            self.stats.mid_op_crashes += 1;
            self.trace
                .push(format!("   power lost before storage call {i}"));
            self.crash_into(image)
                .map_err(|e| format!("power loss before storage call {i}: {e}"))?;
            return Ok(());
        }
        if restarts || !self.model.loses_unsynced() {
            return Ok(());
        }
        if all_synced_at.is_some() && !may_have_diverged {
            self.durable_point(Some(before_op));
        }
        // The files alone do not tell: appends wait in the log's buffer
        // until a round, a roll, a compaction or the flusher writes them.
        let nothing_pending = self
            .engine
            .as_ref()
            .is_some_and(|e| e.stats().log_pending_bytes == 0);
        if syncs > 0 && !self.model.may_refuse() && nothing_pending && all_synced(&self.disk) {
            self.durable_point(None);
        }
        Ok(())
    }

    /// Without `Sync`: the model learnt that the states before the change
    /// `before` (all states, for `None`) are durable.
    fn durable_point(&mut self, before: Option<usize>) {
        self.stats.durable_points += 1;
        self.trace.push(match before {
            Some(n) => format!(
                "   durable up to change {n} of {}",
                self.model.unsynced.len()
            ),
            None => "   everything durable".into(),
        });
        match before {
            Some(n) => self.model.durable_through(n),
            None => self.model.all_durable(),
        }
    }

    /// Without `Sync`, a poisoned engine refuses every call, reads
    /// included: whether the model knows it is poisoned.
    fn must_refuse(&self) -> bool {
        self.config.durability != Durability::Sync && self.model.poisoned.is_some()
    }

    /// Fails unless `got` is `Poisoned` when [`Harness::must_refuse`].
    fn check_refused<T: std::fmt::Debug>(
        &self,
        must: bool,
        what: &str,
        got: &Result<T, Error>,
    ) -> Result<(), String> {
        if must && !matches!(got, Err(Error::Poisoned { .. })) {
            return Err(format!(
                "without Durability::Sync a poisoned engine must refuse every call; \
                 {what} answered {got:?}"
            ));
        }
        Ok(())
    }

    /// Checks an operation's error when the model expected success: it
    /// must be the injected fault (which poisons the engine) or, once
    /// poisoned, `Poisoned` with the same kind. Returns whether the write
    /// may have happened.
    fn expected_refusal(&mut self, got: &Error) -> Result<bool, String> {
        let failed = self.tap.lock().failed.take();
        if let Some(kind) = failed {
            if self.model.poisoned.is_some() {
                return Err(format!(
                    "storage was called and failed ({kind:?}) although the engine is poisoned"
                ));
            }
            if io_kind(got) != Some(kind) {
                return Err(format!(
                    "a storage call failed with {kind:?} but the call answered {got:?}"
                ));
            }
            if kind == io::ErrorKind::StorageFull && !matches!(got, Error::NoSpace { .. }) {
                return Err(format!("ENOSPC must be Error::NoSpace, got {got:?}"));
            }
            self.stats.faults += 1;
            self.model.poisoned = Some(kind);
            return Ok(true);
        }
        match (self.model.poisoned.or(self.model.maybe_poisoned), got) {
            (Some(kind), Error::Poisoned { kind: k }) if *k == kind => {
                self.stats.refused += 1;
                self.model.poisoned = Some(kind);
                self.model.maybe_poisoned = None;
                Ok(false)
            }
            _ => Err(format!(
                "unexpected error {got:?} (poisoned: {:?})",
                self.model.poisoned
            )),
        }
    }

    /// Fails if a storage call failed during an operation that succeeded.
    fn no_failure(&self, what: &str) -> Result<(), String> {
        match self.tap.lock().failed.take() {
            Some(kind) => Err(format!(
                "{what} was acknowledged although a storage call failed ({kind:?})"
            )),
            None => Ok(()),
        }
    }

    fn begin(&mut self, uk: Uk, fp: u8) -> Result<Option<Effect>, String> {
        let now = self.now();
        let must_refuse = self.must_refuse();
        let got = self.engine()?.begin(
            USERS[usize::from(uk.0)],
            KEYS[usize::from(uk.1)],
            fingerprint(fp),
        );
        self.trace.push(match &got {
            Ok(Begin::Replay(o)) => format!("   -> Replay {} + {} bytes", o.status, o.body.len()),
            other => format!("   -> {other:?}"),
        });
        self.check_refused(must_refuse, "begin", &got)?;
        let Some(state) = self.model.sure(uk).cloned() else {
            // Only while poisoned: any refusal or non-writing answer.
            return match got {
                Ok(Begin::Started(l)) => Err(format!("Started {l:?} while poisoned")),
                Ok(_) | Err(Error::Poisoned { .. }) => Ok(None),
                Err(e) => Err(format!("begin on an undecided key answered {e:?}")),
            };
        };
        let expect = expect_begin(&state, fp, now);
        let max_token_before = self.model.max_token;
        match (got, &expect) {
            (Ok(Begin::Started(lease)), ExpectBegin::Started) => {
                self.no_failure("begin")?;
                if let Some(kind) = self.model.poisoned {
                    return Err(format!("Started {lease:?} while poisoned ({kind:?})"));
                }
                self.model.maybe_poisoned = None;
                let token = lease.token();
                if token <= self.model.max_token {
                    return Err(format!(
                        "Started with token {token}, not above {}, the highest token handed \
                         out or recovered before (a reissued fencing token)",
                        self.model.max_token
                    ));
                }
                let deadline = now + LEASE_TTL_MS;
                if lease.expires_at_ms() != deadline || lease.fingerprint() != fingerprint(fp) {
                    return Err(format!("Started with a wrong lease {lease:?}"));
                }
                let after = Some(Rec::Lease {
                    token: Tok::Known(token),
                    fp,
                    deadline,
                });
                self.model.max_token = token;
                self.model.set(uk, after.clone());
                self.slots.push(Slot {
                    lease,
                    uk,
                    fp,
                    epoch: self.epoch,
                });
                Ok(Some(Effect {
                    uk,
                    before: state,
                    after,
                    slot_added: true,
                    max_token_before,
                }))
            }
            (Err(e), ExpectBegin::Started) => {
                if self.expected_refusal(&e)? {
                    let after = Some(Rec::Lease {
                        token: Tok::Above(self.model.max_token),
                        fp,
                        deadline: now + LEASE_TTL_MS,
                    });
                    self.model.maybe(uk, state.clone(), after.clone());
                    return Ok(Some(Effect {
                        uk,
                        before: state,
                        after,
                        slot_added: false,
                        max_token_before,
                    }));
                }
                Ok(None)
            }
            (Ok(Begin::Replay(o)), ExpectBegin::Replay { status, body })
                if o.status == *status && o.body[..] == body.0[..] =>
            {
                Ok(None)
            }
            (Ok(Begin::InFlight { retry_after }), ExpectBegin::InFlight(want))
                if retry_after == *want =>
            {
                Ok(None)
            }
            (Ok(Begin::Mismatch), ExpectBegin::Mismatch) => Ok(None),
            (Err(Error::Poisoned { .. }), _) if self.model.may_refuse() => Ok(None),
            (got, _) => Err(format!("begin answered {got:?}, model expected {expect:?}")),
        }
    }

    /// Runs an owner call (`complete`, `release`, `extend`) of `slot` and
    /// checks its answer; `after` is the key's state if it succeeds.
    /// Returns the effect and whether it succeeded.
    fn owner_call(
        &mut self,
        slot: &Slot,
        what: &str,
        got: Result<(), Error>,
        after: Option<Rec>,
        now: u64,
        zero_duration: bool,
    ) -> Result<(Option<Effect>, bool), String> {
        self.trace
            .push(format!("   {what} token {} -> {got:?}", slot.lease.token()));
        // The model has not changed since the call.
        self.check_refused(self.must_refuse(), what, &got)?;
        // Refused before the lease is judged, changing nothing: a zero TTL
        // or extension, then a lease of an earlier open of the engine.
        if zero_duration || slot.epoch != self.epoch {
            return match got {
                Err(Error::InvalidArgument { .. }) if zero_duration => Ok((None, false)),
                Err(Error::ForeignLease { token })
                    if !zero_duration && token == slot.lease.token() =>
                {
                    Ok((None, false))
                }
                Err(Error::Poisoned { .. }) if self.model.may_refuse() => Ok((None, false)),
                got => Err(format!(
                    "{what} answered {got:?} for a {} lease",
                    if zero_duration {
                        "zero-duration"
                    } else {
                        "foreign (earlier open)"
                    }
                )),
            };
        }
        let Some(state) = self.model.sure(slot.uk).cloned() else {
            return match got {
                Ok(()) => Err(format!("{what} acknowledged while poisoned")),
                Err(_) => Ok((None, false)),
            };
        };
        let expect = expect_owner(&state, slot.lease.token(), slot.lease.expires_at_ms(), now)?;
        let effect = |before: Option<Rec>, after: Option<Rec>, model: &Model| Effect {
            uk: slot.uk,
            before,
            after,
            slot_added: false,
            max_token_before: model.max_token,
        };
        match (got, &expect) {
            (Ok(()), ExpectOwner::Ok) => {
                self.no_failure(what)?;
                if let Some(kind) = self.model.poisoned {
                    return Err(format!("{what} acknowledged while poisoned ({kind:?})"));
                }
                self.model.maybe_poisoned = None;
                self.model.set(slot.uk, after.clone());
                Ok((Some(effect(state, after, &self.model)), true))
            }
            (Err(e), ExpectOwner::Ok) => {
                if self.expected_refusal(&e)? {
                    self.model.maybe(slot.uk, state.clone(), after.clone());
                    return Ok((Some(effect(state, after, &self.model)), false));
                }
                Ok((None, false))
            }
            (Err(Error::LeaseLost { token, reason }), ExpectOwner::Lost(reasons))
                if token == slot.lease.token() && reasons.contains(&reason) =>
            {
                Ok((None, false))
            }
            (Err(Error::Poisoned { .. }), _) if self.model.may_refuse() => Ok((None, false)),
            (got, _) => Err(format!(
                "{what} answered {got:?}, model expected {expect:?}"
            )),
        }
    }

    fn complete(
        &mut self,
        lease: u8,
        status: u8,
        body_i: u8,
        ttl: u8,
    ) -> Result<Option<Effect>, String> {
        let Some(slot) = self.pick(lease) else {
            return Ok(None);
        };
        let now = self.now();
        let status = STATUSES[usize::from(status % 4)];
        let body = body(body_i % 5);
        let ttl = COMPLETE_TTLS_MS[usize::from(ttl % 3)];
        let got = self.engine()?.complete_with_ttl(
            &slot.lease,
            Outcome {
                status,
                body: body.clone().into(),
            },
            Duration::from_millis(ttl),
        );
        let after = Some(Rec::Done {
            token: slot.lease.token(),
            fp: slot.fp,
            expiry: now + ttl,
            status,
            body: Body(body),
        });
        Ok(self
            .owner_call(&slot, "complete", got, after, now, ttl == 0)?
            .0)
    }

    fn release(&mut self, lease: u8) -> Result<Option<Effect>, String> {
        let Some(slot) = self.pick(lease) else {
            return Ok(None);
        };
        let now = self.now();
        let got = self.engine()?.release(&slot.lease);
        Ok(self.owner_call(&slot, "release", got, None, now, false)?.0)
    }

    fn extend(&mut self, lease: u8, by: u8) -> Result<Option<Effect>, String> {
        let Some(slot) = self.pick(lease) else {
            return Ok(None);
        };
        let now = self.now();
        let by = EXTEND_MS[usize::from(by % 4)];
        let got = self
            .engine()?
            .extend(&slot.lease, Duration::from_millis(by));
        let deadline = now + by;
        let (got, new_lease) = match got {
            Ok(l) => (Ok(()), Some(l)),
            Err(e) => (Err(e), None),
        };
        let after = Some(Rec::Lease {
            token: Tok::Known(slot.lease.token()),
            fp: slot.fp,
            deadline,
        });
        let (effect, ok) = self.owner_call(&slot, "extend", got, after, now, by == 0)?;
        if ok && let Some(l) = new_lease {
            if l.token() != slot.lease.token()
                || l.expires_at_ms() != deadline
                || l.fingerprint() != slot.lease.fingerprint()
                || l.user() != slot.lease.user()
                || l.key() != slot.lease.key()
            {
                return Err(format!(
                    "extend returned {l:?} for {:?}, expected deadline {deadline}",
                    slot.lease
                ));
            }
            self.slots.push(Slot { lease: l, ..slot });
            if let Some(mut e) = effect {
                e.slot_added = true;
                return Ok(Some(e));
            }
        }
        Ok(effect)
    }

    /// Reads `uk` from the engine: its view and stored outcome.
    fn read(&self, uk: Uk) -> Result<(Option<RecordView>, Option<Outcome>), idemkv::Error> {
        let engine = self.engine.as_ref().ok_or(Error::Closed)?;
        let (user, key) = (USERS[usize::from(uk.0)], KEYS[usize::from(uk.1)]);
        Ok((engine.get(user, key)?, engine.outcome(user, key)?))
    }

    /// Asks `begin` about a live record (which changes nothing) with its
    /// own and the other fingerprint: exact replay or in-flight, and
    /// mismatch.
    fn probe(&self, uk: Uk, rec: &Rec, now: u64) -> Result<(), String> {
        let engine = self.engine()?;
        let (user, key) = (USERS[usize::from(uk.0)], KEYS[usize::from(uk.1)]);
        let same = engine
            .begin(user, key, fingerprint(rec.fp()))
            .map_err(|e| format!("probe begin failed: {e:?}"))?;
        let ok = match (rec, &same) {
            (Rec::Lease { deadline, .. }, Begin::InFlight { retry_after }) => {
                *retry_after == Duration::from_millis(deadline - now)
            }
            (Rec::Done { status, body, .. }, Begin::Replay(o)) => {
                o.status == *status && o.body[..] == body.0[..]
            }
            _ => false,
        };
        if !ok {
            return Err(format!(
                "begin with the same fingerprint on {uk:?} answered {same:?}; model has {rec:?}"
            ));
        }
        let other = engine
            .begin(user, key, fingerprint(1 - rec.fp()))
            .map_err(|e| format!("probe begin failed: {e:?}"))?;
        if !matches!(other, Begin::Mismatch) {
            return Err(format!(
                "begin with another fingerprint on {uk:?} answered {other:?}; model has {rec:?}"
            ));
        }
        Ok(())
    }

    /// The `Compact` operation: a full compaction changes no state. A
    /// failed one must report the failed storage call; whether it poisons
    /// the engine depends on the step, so later writes may be refused.
    fn compact(&mut self, full: bool) -> Result<(), String> {
        let must_refuse = self.must_refuse();
        let engine = self.engine()?;
        let got = if full {
            engine.compact()
        } else {
            engine.compact_below(0.5)
        };
        self.trace.push(format!("   -> {got:?}"));
        self.check_refused(must_refuse, "compact", &got)?;
        let failed = self.tap.lock().failed.take();
        match (got, failed) {
            (Ok(_), None) => {}
            (Ok(report), Some(kind)) => {
                return Err(format!(
                    "compaction answered {report:?} although a storage call failed ({kind:?})"
                ));
            }
            (Err(e), Some(kind)) => {
                if io_kind(&e) != Some(kind) {
                    return Err(format!(
                        "a storage call failed with {kind:?} but compaction answered {e:?}"
                    ));
                }
                self.stats.faults += 1;
                if self.model.poisoned.is_none() {
                    self.model.maybe_poisoned = Some(kind);
                }
            }
            (Err(Error::Poisoned { kind }), None) if self.model.may_refuse() => {
                self.stats.refused += 1;
                self.model.poisoned = Some(kind);
                self.model.maybe_poisoned = None;
            }
            (Err(e), None) => return Err(format!("compaction failed: {e:?}")),
        }
        self.check_all()
            .map_err(|e| format!("after compaction: {e}"))
    }

    /// The `Check` operation: every certain key must show its state (or,
    /// while poisoned, reads may be refused).
    fn check_all(&mut self) -> Result<(), String> {
        let now = self.now();
        let must_refuse = self.must_refuse();
        for uk in all_keys() {
            if must_refuse {
                let got = self.read(uk);
                self.check_refused(true, &format!("reading {uk:?}"), &got)?;
                continue;
            }
            let Some(state) = self.model.sure(uk).cloned() else {
                continue;
            };
            match self.read(uk) {
                Ok((view, outcome)) => {
                    if !shows(&state, &view, &outcome, now) {
                        return Err(format!(
                            "{uk:?} shows {view:?} / {outcome:?}, model has {state:?}"
                        ));
                    }
                }
                Err(Error::Poisoned { .. }) if self.model.may_refuse() => continue,
                Err(e) => return Err(format!("reading {uk:?} failed: {e:?}")),
            }
            if !self.model.may_refuse()
                && let Some(rec) = live(&state, now)
            {
                self.probe(uk, rec, now)?;
            }
        }
        Ok(())
    }

    /// After a reopen: every key must show a state it may have (see
    /// [`Model::after_power_loss`]; `exact` after a clean restart of an
    /// engine that was not poisoned, whose close synced everything); the
    /// model then keeps that one. Checks fingerprints with probes.
    fn resolve_all(&mut self, exact: bool) -> Result<(), String> {
        let now = self.now();
        let mut views = BTreeMap::new();
        for uk in all_keys() {
            let view = self
                .read(uk)
                .map_err(|e| format!("reading {uk:?} failed: {e:?}"))?;
            if let Some(v) = &view.0 {
                self.model.max_token = self.model.max_token.max(v.token);
            }
            views.insert(uk, view);
        }
        let shown = |map: &KeyStates, uk: Uk| -> Vec<Option<Rec>> {
            let (view, outcome) = views.get(&uk).cloned().unwrap_or_default();
            states_in(map, uk)
                .iter()
                .filter(|s| shows(s, &view, &outcome, now))
                .cloned()
                .collect()
        };
        // The states after each prefix of the unsynced changes: for each
        // key, whether it shows one of them, and which prefixes explain
        // every key at once.
        let (base, changes) = self.model.after_power_loss(exact);
        let mut prefix = base.clone();
        let mut fits: BTreeMap<Uk, bool> = all_keys()
            .map(|uk| (uk, !shown(&prefix, uk).is_empty()))
            .collect();
        let mut ever = fits.clone();
        let mut common = Vec::new();
        if fits.values().all(|&f| f) {
            common.push(0);
        }
        for (j, (uk, states)) in changes.iter().enumerate() {
            prefix.insert(*uk, states.clone());
            let fit = !shown(&prefix, *uk).is_empty();
            fits.insert(*uk, fit);
            if fit {
                ever.insert(*uk, true);
            }
            if fits.values().all(|&f| f) {
                common.push(j + 1);
            }
        }
        for uk in all_keys() {
            if ever.get(&uk) == Some(&true) {
                continue;
            }
            let (view, outcome) = views.get(&uk).cloned().unwrap_or_default();
            let mut had: Vec<Option<Rec>> = states_in(&base, uk).to_vec();
            for (_, states) in changes.iter().filter(|(k, _)| *k == uk) {
                for state in states {
                    if !had.contains(state) {
                        had.push(state.clone());
                    }
                }
            }
            let what = if !changes.is_empty() {
                "a state the key never had since the last point known durable \
                 (a state no whole operation wrote, or an acknowledged one lost \
                 although a sync covered it)"
            } else if had.len() == 1 {
                "an acknowledged state was lost or changed"
            } else {
                "neither the old nor the new state of an unacknowledged write"
            };
            return Err(format!(
                "{what}: {uk:?} shows {view:?} / {outcome:?}, model has one of {had:?}"
            ));
        }
        let per_key = self.model.promise == Promise::PerKey && !exact;
        if common.is_empty() && !per_key {
            return Err(format!(
                "every key shows a state it had, but no prefix of the {} changes since the \
                 last point known durable explains all of them together (the log keeps a \
                 prefix): durable {base:?}, changes {changes:?}, shown {views:?}",
                changes.len()
            ));
        }
        // The states each key may have recovered as: those it shows in the
        // prefixes that explain every key (any prefix, for the per-key rule).
        let mut found: BTreeMap<Uk, Vec<Option<Rec>>> = BTreeMap::new();
        let mut prefix = base;
        let mut collect = |prefix: &KeyStates| {
            for uk in all_keys() {
                let states = found.entry(uk).or_default();
                for state in shown(prefix, uk) {
                    // Expired at open: the engine dropped it; a lease takes
                    // its token from the engine.
                    let resolved = match (state, &views.get(&uk).and_then(|v| v.0)) {
                        (Some(r), _) if !r.live(now) => None,
                        (Some(Rec::Lease { fp, deadline, .. }), Some(v)) => Some(Rec::Lease {
                            token: Tok::Known(v.token),
                            fp,
                            deadline,
                        }),
                        (other, _) => other,
                    };
                    if !states.contains(&resolved) {
                        states.push(resolved);
                    }
                }
            }
        };
        if per_key || common.first() == Some(&0) {
            collect(&prefix);
        }
        for (j, (uk, states)) in changes.iter().enumerate() {
            prefix.insert(*uk, states.clone());
            if per_key || common.contains(&(j + 1)) {
                collect(&prefix);
            }
        }
        let mut rolled_back = false;
        let mut recovered = BTreeMap::new();
        for (uk, candidates) in found {
            // A fingerprint is not in the view: the probe tells candidates
            // that differ only in it apart.
            let mut chosen = None;
            let mut failure = None;
            for candidate in candidates {
                match &candidate {
                    Some(rec) => match self.probe(uk, rec, now) {
                        Ok(()) => {
                            chosen = Some(candidate);
                            break;
                        }
                        Err(e) => failure = Some(e),
                    },
                    None => {
                        chosen = Some(None);
                        break;
                    }
                }
            }
            let Some(state) = chosen else {
                return Err(failure.unwrap_or_else(|| format!("{uk:?}: no state to recover")));
            };
            if shown(&self.model.keys, uk).is_empty() {
                rolled_back = true;
            }
            self.trace.push(format!("   {uk:?} recovered as {state:?}"));
            recovered.insert(uk, state);
        }
        if rolled_back {
            self.stats.rollbacks += 1;
            self.trace
                .push("   (acknowledged states taken back by the power loss)".into());
        }
        // A clean close must have synced everything (`reopen` checks it).
        let durable = self.model.loses_unsynced() && all_synced(&self.disk);
        if durable {
            self.stats.durable_points += 1;
        }
        self.opened_on_unsynced = self.model.loses_unsynced() && !durable;
        self.model.recovered(recovered, durable);
        // Leases of records that did not survive can never be used again,
        // but they stay as stale leases to present.
        self.model.poisoned = None;
        self.model.maybe_poisoned = None;
        Ok(())
    }

    /// A power loss now with `tear`, then the checks.
    fn power_loss(&mut self, tear: Tear, what: &str) -> Result<(), String> {
        let image = self.disk.crash(tear);
        self.crash_into(image)
            .map_err(|e| format!("{what} ({tear:?}): {e}"))
    }

    /// Drops the engine, opens one on `image` (the disk a power loss left)
    /// and checks every key against the model.
    fn crash_into(&mut self, image: SimDisk) -> Result<(), String> {
        self.stats.crashes += 1;
        let capturing = {
            let mut s = self.tap.lock();
            s.pending = None;
            s.sync_failed = false;
            std::mem::take(&mut s.capturing)
        };
        // The power is already out: what the old engine's close does to the
        // old disk (without `Sync` it syncs) is no crash point of the run.
        drop(self.engine.take());
        self.tap.lock().capturing = capturing;
        self.disk = image;
        self.open()
            .map_err(|e| format!("reopen after power loss: {e}"))?;
        self.resolve_all(false)
    }

    /// A clean restart on the same disk.
    fn reopen(&mut self) -> Result<(), String> {
        if !self.config.restart_after_failed_sync && self.tap.lock().sync_failed {
            self.trace
                .push("   a sync failed earlier: power loss instead".into());
            return self.power_loss(Tear::Clean, "reopen after a failed sync");
        }
        self.stats.reopens += 1;
        self.tap.lock().pending = None;
        // Unless poisoned, close syncs: nothing acknowledged may be lost.
        let exact = !self.model.may_refuse();
        drop(self.engine.take());
        let must_sync = !self.opened_on_unsynced || self.config.restart_syncs_what_it_found;
        if exact && self.model.loses_unsynced() && must_sync {
            let left = unsynced(&self.disk);
            if !left.is_empty() {
                return Err(format!(
                    "a clean close left {left:?} unsynced: a power loss now could take \
                     acknowledged states back"
                ));
            }
        }
        self.disk.clear_faults();
        self.open().map_err(|e| format!("clean reopen: {e}"))?;
        self.resolve_all(exact)
    }
}

fn all_keys() -> impl Iterator<Item = Uk> {
    (0..USERS.len() as u8).flat_map(|u| (0..KEYS.len() as u8).map(move |k| (u, k)))
}
