//! Model test: random sequences of `begin`, `complete`, `complete_with_ttl`,
//! `release`, `extend`, `get`/`outcome`, clock moves and reopens, each answer
//! checked against a small in-memory model of the state machine in
//! DESIGN.md.
//!
//! Invariants checked (numbers from DESIGN.md):
//! - the transition table: `Started` on an absent or expired record,
//!   `Replay` / `InFlight { retry_after }` / `Mismatch` on a live one;
//! - 1: every acknowledged state survives a reopen (clean drop syncs, so in
//!   every durability mode);
//! - 3: fencing: every `Started` carries a token above every earlier one,
//!   across takeovers and restarts, and a stale lease gets `LeaseLost` from
//!   `complete`, `extend` and `release`;
//! - 4: a replay returns exactly the stored status and bytes, and only to
//!   the same fingerprint;
//! - 5: an oversize response is refused with a typed error and changes
//!   nothing.
//!
//! Every lease ever handed out is kept ("lease slots") so that stale leases
//! are presented again long after they lost their record.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use idemkv::{
    Begin, Clock, Durability, Engine, Error, Fingerprint, Lease, LostReason, ManualClock, Options,
    Outcome, RecordState, RecordView,
};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;
use tempfile::TempDir;

const START_MS: u64 = 1_000_000;
const LEASE_TTL_MS: u64 = 10_000;
const RECORD_TTL_MS: u64 = 60_000;
/// `max_response_len`: above the segment size, so one record can outgrow a
/// whole segment, and below the largest body, so `ResponseTooLarge` happens.
const MAX_RESPONSE: usize = 8_192;
/// The smallest segment size `Options` accepts: rotation happens often.
const SMALL_SEGMENT: u64 = 4_096;

/// User ids: `("u", "1k")` and `("u1", "k")` must stay unrelated records,
/// and the empty user id is allowed.
const USERS: [&[u8]; 3] = [b"u", b"u1", b""];
const KEYS: [&[u8]; 4] = [b"1k", b"k", b"k2", b"order-7"];
const STATUSES: [u16; 6] = [0, 200, 201, 422, 500, u16::MAX];
/// Body sizes: empty, tiny, small, half a small segment, more than a whole
/// small segment, and more than `MAX_RESPONSE`.
const BODY_LENS: [usize; 6] = [0, 2, 100, 2_000, 6_000, 9_000];

fn fingerprint(i: usize) -> Fingerprint {
    [Fingerprint::of(b"request A"), Fingerprint::of(b"request B")][i]
}

/// Body `i`: a pattern that differs per body, so a replay of the wrong
/// body cannot pass.
fn body(i: usize) -> Bytes {
    if i == 1 {
        return Bytes::from_static(b"ok");
    }
    (0..BODY_LENS[i])
        .map(|j| (j.wrapping_mul(31) + i * 7) as u8)
        .collect()
}

/// Which lease slot an owner call presents.
#[derive(Clone, Debug)]
enum Pick {
    /// The `n`-th most recent lease (0 is the newest).
    Recent(usize),
    /// Any lease ever handed out (index modulo the number of slots).
    Any(Index),
}

#[derive(Clone, Debug)]
enum Op {
    Begin {
        user: usize,
        key: usize,
        fp: usize,
    },
    Complete {
        pick: Pick,
        status: u16,
        body: usize,
    },
    CompleteWithTtl {
        pick: Pick,
        status: u16,
        body: usize,
        ttl_ms: u64,
    },
    Release {
        pick: Pick,
    },
    Extend {
        pick: Pick,
        by_ms: u64,
    },
    Get {
        user: usize,
        key: usize,
    },
    Advance {
        ms: u64,
    },
    Reopen,
}

#[derive(Clone, Debug)]
struct Case {
    sync: bool,
    small_segments: bool,
    one_shard: bool,
    ops: Vec<Op>,
}

// ---------------------------------------------------------------------------
// The reference model.

#[derive(Clone, Debug)]
struct ModelRecord {
    in_progress: bool,
    fp: usize,
    token: u64,
    deadline: u64,
    status: u16,
    body: Bytes,
}

#[derive(Debug, Default)]
struct Model {
    records: HashMap<(usize, usize), ModelRecord>,
    /// The highest token any `Started` returned so far.
    last_token: u64,
}

/// What `begin` must answer.
#[derive(Debug)]
enum ExpectBegin {
    Started,
    Replay(Outcome),
    InFlight(Duration),
    Mismatch,
}

/// What an owner call (`complete`, `extend`, `release`) must answer.
#[derive(Debug)]
enum ExpectOwner {
    Ok,
    /// `LeaseLost` with exactly this reason (the record is live).
    Lost(LostReason),
    /// `ForeignLease`: an earlier open of the engine issued the lease.
    Foreign,
    /// `InvalidArgument`: a zero TTL or extension.
    Invalid,
}

impl Model {
    fn live(&self, uk: (usize, usize), now: u64) -> Option<&ModelRecord> {
        self.records.get(&uk).filter(|r| now < r.deadline)
    }

    fn expect_begin(&self, uk: (usize, usize), fp: usize, now: u64) -> ExpectBegin {
        match self.live(uk, now) {
            None => ExpectBegin::Started,
            Some(r) if r.fp != fp => ExpectBegin::Mismatch,
            Some(r) if r.in_progress => {
                ExpectBegin::InFlight(Duration::from_millis(r.deadline - now))
            }
            Some(r) => ExpectBegin::Replay(Outcome {
                status: r.status,
                body: r.body.clone(),
            }),
        }
    }

    /// The answer to an owner call of `slot`'s lease, which this open of
    /// the engine issued. The reason of a refusal does not depend on the
    /// sweeper: an expired record counts as absent, and absence is
    /// `Expired` once the presented lease's deadline passed, `Gone` before.
    fn expect_owner(&self, slot: &Slot, now: u64) -> Result<ExpectOwner, String> {
        let token = slot.lease.token();
        let absent = if now >= slot.lease.expires_at_ms() {
            LostReason::Expired
        } else {
            LostReason::Gone
        };
        let Some(r) = self
            .records
            .get(&(slot.user, slot.key))
            .filter(|r| now < r.deadline)
        else {
            return Ok(ExpectOwner::Lost(absent));
        };
        Ok(if r.token > token {
            ExpectOwner::Lost(LostReason::Superseded { current: r.token })
        } else if r.token < token {
            return Err(format!(
                "model: live record token {} below lease token {token}",
                r.token
            ));
        } else if r.in_progress {
            ExpectOwner::Ok
        } else {
            ExpectOwner::Lost(LostReason::Completed)
        })
    }

    fn view(&self, uk: (usize, usize), now: u64) -> Option<RecordView> {
        self.live(uk, now).map(|r| {
            let done = !r.in_progress;
            RecordView {
                state: if done {
                    RecordState::Completed
                } else {
                    RecordState::InProgress
                },
                token: r.token,
                lease_expires_at_ms: (!done).then_some(r.deadline),
                expires_at_ms: done.then_some(r.deadline),
                status: done.then_some(r.status),
            }
        })
    }

    fn outcome(&self, uk: (usize, usize), now: u64) -> Option<Outcome> {
        self.live(uk, now)
            .filter(|r| !r.in_progress)
            .map(|r| Outcome {
                status: r.status,
                body: r.body.clone(),
            })
    }
}

// ---------------------------------------------------------------------------
// The harness: one engine, its model and every lease ever handed out.

#[derive(Clone, Debug)]
struct Slot {
    lease: Lease,
    user: usize,
    key: usize,
    /// The open of the engine that issued the lease.
    epoch: u64,
}

struct Harness {
    dir: TempDir,
    clock: Arc<ManualClock>,
    options: Options,
    engine: Option<Engine>,
    /// Opens of the engine so far.
    epoch: u64,
    model: Model,
    slots: Vec<Slot>,
}

fn check_lost(got: Result<(), Error>, expect: &ExpectOwner, token: u64) -> Result<(), String> {
    let fail = |got: &dyn std::fmt::Debug| {
        Err(format!(
            "engine answered {got:?}, model expected {expect:?}"
        ))
    };
    match (&got, expect) {
        (Ok(()), ExpectOwner::Ok) => Ok(()),
        (Err(Error::LeaseLost { token: t, reason }), ExpectOwner::Lost(want))
            if *t == token && reason == want =>
        {
            Ok(())
        }
        (Err(Error::ForeignLease { token: t }), ExpectOwner::Foreign) if *t == token => Ok(()),
        (Err(Error::InvalidArgument { .. }), ExpectOwner::Invalid) => Ok(()),
        _ => fail(&got),
    }
}

impl Harness {
    fn new(sync: bool, small_segments: bool, one_shard: bool) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(ManualClock::new(START_MS));
        let options = Options {
            durability: if sync {
                Durability::Sync
            } else {
                Durability::None
            },
            lease_ttl: Duration::from_millis(LEASE_TTL_MS),
            record_ttl: Duration::from_millis(RECORD_TTL_MS),
            shards: if one_shard { 1 } else { 64 },
            max_response_len: MAX_RESPONSE,
            segment_bytes: if small_segments {
                SMALL_SEGMENT
            } else {
                Options::default().segment_bytes
            },
            clock: clock.clone(),
            ..Options::default()
        };
        let engine = Engine::open(dir.path(), options.clone()).expect("open a fresh engine");
        Harness {
            dir,
            clock,
            options,
            engine: Some(engine),
            epoch: 0,
            model: Model::default(),
            slots: Vec::new(),
        }
    }

    fn engine(&self) -> &Engine {
        self.engine.as_ref().expect("engine is open")
    }

    fn pick(&self, pick: &Pick) -> Option<Slot> {
        let n = self.slots.len();
        if n == 0 {
            return None;
        }
        let i = match pick {
            Pick::Recent(back) => n - 1 - back.min(&(n - 1)),
            Pick::Any(index) => index.index(n),
        };
        Some(self.slots[i].clone())
    }

    fn step(&mut self, op: &Op) -> Result<(), String> {
        let now = self.clock.now_ms();
        match *op {
            Op::Begin { user, key, fp } => self.begin(user, key, fp, now),
            Op::Complete {
                ref pick,
                status,
                body,
            } => self.complete(pick, status, body, None, now),
            Op::CompleteWithTtl {
                ref pick,
                status,
                body,
                ttl_ms,
            } => self.complete(pick, status, body, Some(ttl_ms), now),
            Op::Release { ref pick } => self.release(pick, now),
            Op::Extend { ref pick, by_ms } => self.extend(pick, by_ms, now),
            Op::Get { user, key } => self.get(user, key, now),
            Op::Advance { ms } => {
                self.clock.advance(Duration::from_millis(ms));
                Ok(())
            }
            Op::Reopen => self.reopen(),
        }
    }

    fn begin(&mut self, user: usize, key: usize, fp: usize, now: u64) -> Result<(), String> {
        let got = self
            .engine()
            .begin(USERS[user], KEYS[key], fingerprint(fp))
            .map_err(|e| format!("begin failed: {e:?}"))?;
        let expect = self.model.expect_begin((user, key), fp, now);
        match (got, &expect) {
            (Begin::Started(lease), ExpectBegin::Started) => {
                let token = lease.token();
                if token <= self.model.last_token {
                    return Err(format!(
                        "Started with token {token}, not above the earlier token {}",
                        self.model.last_token
                    ));
                }
                let deadline = now + LEASE_TTL_MS;
                if lease.user() != USERS[user]
                    || lease.key() != KEYS[key]
                    || lease.fingerprint() != fingerprint(fp)
                    || lease.expires_at_ms() != deadline
                {
                    return Err(format!(
                        "Started with a wrong lease {lease:?} (expected deadline {deadline})"
                    ));
                }
                self.model.last_token = token;
                self.model.records.insert(
                    (user, key),
                    ModelRecord {
                        in_progress: true,
                        fp,
                        token,
                        deadline,
                        status: 0,
                        body: Bytes::new(),
                    },
                );
                self.slots.push(Slot {
                    lease,
                    user,
                    key,
                    epoch: self.epoch,
                });
                Ok(())
            }
            (Begin::Replay(got), ExpectBegin::Replay(want)) if got == *want => Ok(()),
            (Begin::InFlight { retry_after }, ExpectBegin::InFlight(want))
                if retry_after == *want =>
            {
                Ok(())
            }
            (Begin::Mismatch, ExpectBegin::Mismatch) => Ok(()),
            (got, _) => Err(format!("begin answered {got:?}, model expected {expect:?}")),
        }
    }

    fn complete(
        &mut self,
        pick: &Pick,
        status: u16,
        body_index: usize,
        ttl_ms: Option<u64>,
        now: u64,
    ) -> Result<(), String> {
        let Some(slot) = self.pick(pick) else {
            return Ok(());
        };
        let outcome = Outcome {
            status,
            body: body(body_index),
        };
        let len = outcome.body.len();
        let got = match ttl_ms {
            Some(ms) => self.engine().complete_with_ttl(
                &slot.lease,
                outcome.clone(),
                Duration::from_millis(ms),
            ),
            None => self.engine().complete(&slot.lease, outcome.clone()),
        };
        if len > MAX_RESPONSE {
            return match got {
                Err(Error::ResponseTooLarge { len: l, max }) if l == len && max == MAX_RESPONSE => {
                    Ok(())
                }
                other => Err(format!(
                    "complete answered {other:?}, expected ResponseTooLarge {{ len: {len}, max: {MAX_RESPONSE} }}"
                )),
            };
        }
        let expect = self.expect(&slot, now, ttl_ms == Some(0))?;
        check_lost(got, &expect, slot.lease.token())?;
        if let ExpectOwner::Ok = expect {
            let r = self
                .model
                .records
                .get_mut(&(slot.user, slot.key))
                .expect("model record of a live lease");
            r.in_progress = false;
            r.deadline = now + ttl_ms.unwrap_or(RECORD_TTL_MS);
            r.status = outcome.status;
            r.body = outcome.body;
        }
        Ok(())
    }

    fn release(&mut self, pick: &Pick, now: u64) -> Result<(), String> {
        let Some(slot) = self.pick(pick) else {
            return Ok(());
        };
        let got = self.engine().release(&slot.lease);
        let expect = self.expect(&slot, now, false)?;
        check_lost(got, &expect, slot.lease.token())?;
        if let ExpectOwner::Ok = expect {
            self.model.records.remove(&(slot.user, slot.key));
        }
        Ok(())
    }

    fn extend(&mut self, pick: &Pick, by_ms: u64, now: u64) -> Result<(), String> {
        let Some(slot) = self.pick(pick) else {
            return Ok(());
        };
        let got = self
            .engine()
            .extend(&slot.lease, Duration::from_millis(by_ms));
        let expect = self.expect(&slot, now, by_ms == 0)?;
        let deadline = now + by_ms;
        let lease = match got {
            Ok(lease) => {
                check_lost(Ok(()), &expect, slot.lease.token())?;
                lease
            }
            Err(e) => return check_lost(Err(e), &expect, slot.lease.token()),
        };
        if lease.token() != slot.lease.token()
            || lease.user() != slot.lease.user()
            || lease.key() != slot.lease.key()
            || lease.fingerprint() != slot.lease.fingerprint()
            || lease.expires_at_ms() != deadline
        {
            return Err(format!(
                "extend returned {lease:?} for {:?}; expected the same lease with deadline {deadline}",
                slot.lease
            ));
        }
        self.model
            .records
            .get_mut(&(slot.user, slot.key))
            .expect("model record of a live lease")
            .deadline = deadline;
        self.slots.push(Slot { lease, ..slot });
        Ok(())
    }

    fn get(&self, user: usize, key: usize, now: u64) -> Result<(), String> {
        let engine = self.engine();
        let got = engine
            .get(USERS[user], KEYS[key])
            .map_err(|e| format!("get failed: {e:?}"))?;
        let want = self.model.view((user, key), now);
        if got != want {
            return Err(format!(
                "get({user}, {key}) answered {got:?}, model expected {want:?}"
            ));
        }
        let got = engine
            .outcome(USERS[user], KEYS[key])
            .map_err(|e| format!("outcome failed: {e:?}"))?;
        let want = self.model.outcome((user, key), now);
        if got != want {
            return Err(format!(
                "outcome({user}, {key}) answered {got:?}, model expected {want:?}"
            ));
        }
        Ok(())
    }

    /// Checks every `(user, key)` against the model.
    fn get_all(&self) -> Result<(), String> {
        let now = self.clock.now_ms();
        for user in 0..USERS.len() {
            for key in 0..KEYS.len() {
                self.get(user, key, now)?;
            }
        }
        Ok(())
    }

    /// Drops the engine (a clean close, which syncs) and opens the same
    /// directory again with the same clock and options.
    fn reopen_engine(&mut self) -> Result<(), String> {
        drop(self.engine.take());
        let engine = Engine::open(self.dir.path(), self.options.clone())
            .map_err(|e| format!("reopen failed: {e:?}"))?;
        self.engine = Some(engine);
        self.epoch += 1;
        Ok(())
    }

    /// What an owner call of `slot` must answer; `zero` for a zero TTL or
    /// extension (refused before the lease is judged, as is a lease of an
    /// earlier open).
    fn expect(&self, slot: &Slot, now: u64, zero: bool) -> Result<ExpectOwner, String> {
        if zero {
            Ok(ExpectOwner::Invalid)
        } else if slot.epoch != self.epoch {
            Ok(ExpectOwner::Foreign)
        } else {
            self.model.expect_owner(slot, now)
        }
    }

    /// Reopens without a model check (for the deterministic tests).
    fn reopen_plain(&mut self) {
        self.reopen_engine().expect("reopen");
    }

    /// Reopens, then checks every `(user, key)` against the model, which a
    /// reopen leaves unchanged.
    fn reopen(&mut self) -> Result<(), String> {
        self.reopen_engine()?;
        self.get_all().map_err(|e| format!("after reopen: {e}"))
    }
}

fn run(case: &Case) -> Result<(), String> {
    let mut h = Harness::new(case.sync, case.small_segments, case.one_shard);
    for (i, op) in case.ops.iter().enumerate() {
        let now = h.clock.now_ms();
        h.step(op)
            .map_err(|e| format!("op #{i} {op:?} at t={now}: {e}"))?;
    }
    h.get_all().map_err(|e| format!("at the end: {e}"))?;
    h.reopen().map_err(|e| format!("final reopen: {e}"))
}

// ---------------------------------------------------------------------------
// Strategies.

fn pick_strategy() -> impl Strategy<Value = Pick> {
    prop_oneof![
        4 => (0..3usize).prop_map(Pick::Recent),
        1 => any::<Index>().prop_map(Pick::Any),
    ]
}

fn body_strategy() -> impl Strategy<Value = usize> {
    prop_oneof![
        3 => 0..3usize,
        2 => Just(3usize),
        1 => Just(4usize),
        1 => Just(5usize),
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    // Skewed towards a few pairs, so that one key sees many transitions.
    let user = prop_oneof![3 => Just(0usize), 2 => Just(1), 1 => Just(2)];
    let key = prop_oneof![4 => Just(0usize), 2 => Just(1), 1 => Just(2), 1 => Just(3)];
    let status = proptest::sample::select(STATUSES.to_vec());
    prop_oneof![
        8 => (user.clone(), key.clone(), 0..2usize)
            .prop_map(|(user, key, fp)| Op::Begin { user, key, fp }),
        4 => (pick_strategy(), status.clone(), body_strategy())
            .prop_map(|(pick, status, body)| Op::Complete { pick, status, body }),
        2 => (
            pick_strategy(),
            status,
            body_strategy(),
            prop_oneof![Just(0u64), Just(1), 1..=2 * RECORD_TTL_MS],
        )
            .prop_map(|(pick, status, body, ttl_ms)| Op::CompleteWithTtl {
                pick,
                status,
                body,
                ttl_ms
            }),
        2 => pick_strategy().prop_map(|pick| Op::Release { pick }),
        2 => (
            pick_strategy(),
            prop_oneof![Just(0u64), Just(LEASE_TTL_MS), 1..=2 * LEASE_TTL_MS],
        )
            .prop_map(|(pick, by_ms)| Op::Extend { pick, by_ms }),
        3 => (user, key).prop_map(|(user, key)| Op::Get { user, key }),
        3 => prop_oneof![
            6 => 0..2_000u64,
            2 => LEASE_TTL_MS - 10..=LEASE_TTL_MS + 10,
            1 => Just(LEASE_TTL_MS),
            1 => Just(1u64),
            1 => Just(RECORD_TTL_MS),
            1 => 0..=RECORD_TTL_MS + 10_000,
        ]
        .prop_map(|ms| Op::Advance { ms }),
        1 => Just(Op::Reopen),
    ]
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        proptest::bool::weighted(0.125),
        any::<bool>(),
        proptest::bool::weighted(0.25),
        proptest::collection::vec(op_strategy(), 1..=60),
    )
        .prop_map(|(sync, small_segments, one_shard, ops)| Case {
            sync,
            small_segments,
            one_shard,
            ops,
        })
}

/// 256 cases unless `PROPTEST_CASES` asks for more (or fewer). No
/// regression files: findings become deterministic tests below.
fn config() -> ProptestConfig {
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
    #![proptest_config(config())]

    #[test]
    fn engine_matches_the_model(case in case_strategy()) {
        run(&case).map_err(TestCaseError::fail)?;
    }
}

// ---------------------------------------------------------------------------
// Deterministic sequences.

fn started(answer: Begin) -> Lease {
    match answer {
        Begin::Started(lease) => lease,
        other => panic!("expected Started, got {other:?}"),
    }
}

fn lost_reason(result: Result<impl std::fmt::Debug, Error>) -> LostReason {
    match result {
        Err(Error::LeaseLost { reason, .. }) => reason,
        other => panic!("expected LeaseLost, got {other:?}"),
    }
}

fn ok_outcome(status: u16, body: &'static [u8]) -> Outcome {
    Outcome {
        status,
        body: Bytes::from_static(body),
    }
}

#[test]
fn takeover_then_stale_complete_is_fenced() {
    let h = Harness::new(false, false, false);
    let (e, clock) = (h.engine(), &h.clock);
    let fp = fingerprint(0);
    let old = started(e.begin("u", "k", fp).unwrap());
    clock.advance(Duration::from_millis(LEASE_TTL_MS));
    let new = started(e.begin("u", "k", fp).unwrap());
    assert!(new.token() > old.token());

    let current = LostReason::Superseded {
        current: new.token(),
    };
    assert_eq!(
        lost_reason(e.complete(&old, ok_outcome(200, b"late"))),
        current
    );
    assert_eq!(lost_reason(e.extend(&old, Duration::from_secs(5))), current);
    assert_eq!(lost_reason(e.release(&old)), current);

    e.complete(&new, ok_outcome(201, b"fresh")).unwrap();
    assert_eq!(
        lost_reason(e.complete(&old, ok_outcome(200, b"late"))),
        LostReason::Superseded {
            current: new.token()
        }
    );
    assert_eq!(
        lost_reason(e.complete(&new, ok_outcome(200, b"again"))),
        LostReason::Completed
    );
    match e.begin("u", "k", fp).unwrap() {
        Begin::Replay(outcome) => assert_eq!(outcome, ok_outcome(201, b"fresh")),
        other => panic!("expected a replay, got {other:?}"),
    }
}

#[test]
fn extend_survives_reopen_then_expires() {
    // Sync mode, small segments: the extend record must be on disk.
    let mut h = Harness::new(true, true, false);
    let fp = fingerprint(1);
    let lease = started(h.engine().begin("u1", "order-7", fp).unwrap());
    let t0 = h.clock.now_ms();
    h.clock.advance(Duration::from_millis(5_000));
    let lease = h
        .engine()
        .extend(&lease, Duration::from_millis(3 * LEASE_TTL_MS))
        .unwrap();
    let deadline = t0 + 5_000 + 3 * LEASE_TTL_MS;
    assert_eq!(lease.expires_at_ms(), deadline);

    h.reopen_plain();
    // Past the original lease, before the extended one.
    h.clock.advance(Duration::from_millis(2 * LEASE_TTL_MS));
    let now = h.clock.now_ms();
    let view = h
        .engine()
        .get("u1", "order-7")
        .unwrap()
        .expect("live lease");
    assert_eq!(view.state, RecordState::InProgress);
    assert_eq!(view.token, lease.token());
    assert_eq!(view.lease_expires_at_ms, Some(deadline));
    match h.engine().begin("u1", "order-7", fp).unwrap() {
        Begin::InFlight { retry_after } => {
            assert_eq!(retry_after, Duration::from_millis(deadline - now));
        }
        other => panic!("expected InFlight, got {other:?}"),
    }
    assert!(matches!(
        h.engine().begin("u1", "order-7", fingerprint(0)).unwrap(),
        Begin::Mismatch
    ));

    h.reopen_plain();
    // Exactly at the extended deadline the lease is gone.
    h.clock.set(deadline);
    assert_eq!(h.engine().get("u1", "order-7").unwrap(), None);
    // An earlier open's lease is refused by this one.
    assert!(matches!(
        h.engine().complete(&lease, ok_outcome(200, b"late")),
        Err(Error::ForeignLease { .. })
    ));
    let next = started(h.engine().begin("u1", "order-7", fingerprint(0)).unwrap());
    assert!(next.token() > lease.token());
}

#[test]
fn release_then_begin_with_another_fingerprint_starts_afresh() {
    let mut h = Harness::new(false, false, true);
    let first = started(h.engine().begin("", "k2", fingerprint(0)).unwrap());
    h.engine().release(&first).unwrap();
    assert_eq!(h.engine().get("", "k2").unwrap(), None);
    assert_eq!(lost_reason(h.engine().release(&first)), LostReason::Gone);

    let second = started(h.engine().begin("", "k2", fingerprint(1)).unwrap());
    assert!(second.token() > first.token());
    assert_eq!(
        lost_reason(h.engine().complete(&first, ok_outcome(200, b"stale"))),
        LostReason::Superseded {
            current: second.token()
        }
    );
    h.engine().complete(&second, ok_outcome(422, b"")).unwrap();

    h.reopen_plain();
    assert!(matches!(
        h.engine().begin("", "k2", fingerprint(0)).unwrap(),
        Begin::Mismatch
    ));
    match h.engine().begin("", "k2", fingerprint(1)).unwrap() {
        Begin::Replay(outcome) => assert_eq!(outcome, ok_outcome(422, b"")),
        other => panic!("expected a replay, got {other:?}"),
    }
    // Another user's same key is unrelated.
    let other_user = started(h.engine().begin("u", "k2", fingerprint(0)).unwrap());
    assert!(other_user.token() > second.token());
}

#[test]
fn small_segments_rotate_and_everything_survives_reopen() {
    let mut h = Harness::new(false, true, false);
    let mut leases = Vec::new();
    for (i, key) in KEYS.iter().enumerate() {
        let lease = started(h.engine().begin("u", key, fingerprint(0)).unwrap());
        let outcome = Outcome {
            status: 200,
            body: body(3 + i % 2),
        };
        h.engine().complete(&lease, outcome.clone()).unwrap();
        leases.push((key, outcome));
    }
    assert!(h.engine().stats().segments > 1, "{:?}", h.engine().stats());
    h.reopen_plain();
    for (key, outcome) in leases {
        assert_eq!(h.engine().outcome("u", key).unwrap(), Some(outcome));
    }
}
