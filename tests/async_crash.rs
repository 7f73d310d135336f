//! The crash checker for the syncer thread (issue 12): futures of an
//! [`AsyncEngine`], and blocking calls racing them on the same engine and
//! the same keys, wait on group commits whose fdatasync a gate holds; power
//! is lost ([`SimDisk::crash`]) while the sync is held (after the round's
//! write, before its sync), between rounds and at random moments, and some
//! syncs fail.
//!
//! Invariants checked (DESIGN.md):
//! - 1: no answer is given before the sync that covers the state it shows
//!   returned `Ok`: every crash image taken after a call answered shows the
//!   state that answer acknowledged (a `Started` lease, an extended
//!   deadline, a completion, a release, a `Replay`, an `InFlight`, a state
//!   `get` showed) or a later state of the same key;
//! - 2: every state an image shows was written, whole, by a call that had
//!   begun before the image was taken (a completed record holds exactly the
//!   outcome its `complete` stored);
//! - fail-stop: after a failed sync every waiting future and blocked caller
//!   answers `Io`, `NoSpace` or `Poisoned`, none `Ok`, no write is
//!   acknowledged after the first error, and a reopen after a crash shows
//!   their keys as they were before (their last durable state).
//!
//! The order of a key's states is known without a model of the
//! interleaving: fencing tokens strictly increase, and on a stopped clock
//! every extend here asks for a later deadline than the one before, so a
//! state is placed by `(token, stage, deadline)` (see [`Order`]).

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::gate::{Call, Gated, Gates};
use idemkv::storage::{Fault, SimDisk, SimOp, Storage, Tear};
use idemkv::{
    AsyncEngine, Begin, Durability, Engine, Error, Fingerprint, Lease, ManualClock, Options,
    Outcome, RecordState, RecordView,
};

/// Where every engine's manual clock starts (it never moves here).
const START_MS: u64 = 1_700_000_000_000;
/// The lease TTL; extend `e` of a lease asks for `LEASE_TTL + e + 1 s`.
const LEASE_TTL: Duration = Duration::from_secs(30);
/// User ids (keys alternate between them, so they spread over shards).
const USERS: [&str; 2] = ["u", "w"];
/// How long any wait of a case may take before the case counts as hung.
const HUNG: Duration = Duration::from_secs(10);

fn options(clock: &Arc<ManualClock>) -> Options {
    Options {
        durability: Durability::Sync,
        background: false,
        lease_ttl: LEASE_TTL,
        clock: clock.clone(),
        ..Options::default()
    }
}

/// A deterministic xorshift64 generator.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }

    fn tear(&mut self) -> Tear {
        match self.below(3) {
            0 => Tear::Clean,
            1 => Tear::Prefix(self.next()),
            _ => Tear::Garbage(self.next()),
        }
    }

    /// Nothing, a yield, or a sleep of up to 0.8 ms.
    fn pause(&mut self) {
        match self.below(3) {
            0 => {}
            1 => std::thread::yield_now(),
            _ => std::thread::sleep(Duration::from_micros(self.below(800))),
        }
    }
}

/// The stages of one lease's life, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    Absent,
    InProgress,
    Completed,
    Released,
}

/// Where a state stands in its key's history, compared as a tuple: tokens
/// strictly increase per key; within a token the lease's deadline only
/// grows, then the lease is completed or released.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Order {
    token: u64,
    stage: Stage,
    deadline: u64,
}

/// The key before anything was written.
const ABSENT: Order = Order {
    token: 0,
    stage: Stage::Absent,
    deadline: 0,
};

/// What an `InFlight` answer acknowledges: some lease is in progress.
const IN_FLIGHT: Order = Order {
    token: 0,
    stage: Stage::InProgress,
    deadline: 0,
};

fn in_progress(token: u64, deadline: u64) -> Order {
    Order {
        token,
        stage: Stage::InProgress,
        deadline,
    }
}

fn completed(token: u64) -> Order {
    Order {
        token,
        stage: Stage::Completed,
        deadline: 0,
    }
}

fn released(token: u64) -> Order {
    Order {
        token,
        stage: Stage::Released,
        deadline: 0,
    }
}

/// The place of a state a `get` shows.
fn order_of(view: &RecordView) -> Order {
    match view.state {
        RecordState::InProgress => in_progress(
            view.token,
            view.lease_expires_at_ms
                .expect("an in-progress record has a deadline"),
        ),
        RecordState::Completed => completed(view.token),
    }
}

/// The outcome the lease with `token` stores for key `key`: its body names
/// the token, so a replay tells which completion it shows.
fn outcome_for(key: usize, token: u64, status: u16) -> Outcome {
    Outcome {
        status,
        body: Bytes::from(format!("key-{key}/t{token}")),
    }
}

/// The token named by a body of [`outcome_for`].
fn token_in(outcome: &Outcome) -> u64 {
    let body = std::str::from_utf8(&outcome.body).expect("a body of outcome_for");
    let (_, token) = body.rsplit_once("/t").expect("a body of outcome_for");
    token.parse().expect("a body of outcome_for")
}

/// One fingerprint per key, so no call is a `Mismatch`.
fn fingerprint(key: usize) -> Fingerprint {
    Fingerprint::of(format!("request-{key}").as_bytes())
}

/// The `(user, key)` of every key id.
fn key_names(n: usize) -> Arc<Vec<(String, String)>> {
    Arc::new(
        (0..n)
            .map(|i| (USERS[i % USERS.len()].to_owned(), format!("key-{i}")))
            .collect(),
    )
}

/// What a call tried (for "every state shown was written by some call").
#[derive(Clone, Debug)]
enum Tried {
    Begin,
    Extend { token: u64 },
    Complete { token: u64, outcome: Outcome },
    Release { token: u64 },
    Read,
}

/// One answered call.
#[derive(Clone, Debug)]
struct Op {
    key: usize,
    /// Journal ticks taken before the call and after its answer.
    start: u64,
    end: u64,
    tried: Tried,
    /// The state the answer acknowledged, or the error.
    acked: Result<Order, String>,
    /// The outcome a `Replay` answer showed.
    shown: Option<Outcome>,
    /// Whether the call was made through the blocking API.
    blocking: bool,
}

impl Op {
    /// Whether the answer acknowledged a write of this call (not a read).
    fn acked_a_write(&self) -> bool {
        match (&self.tried, &self.acked) {
            (Tried::Begin, Ok(order)) => order.stage == Stage::InProgress && order.token > 0,
            (Tried::Read, _) | (_, Err(_)) => false,
            (_, Ok(_)) => true,
        }
    }
}

/// Every answer of a case, on one clock of ticks shared with the crash
/// images: an answer whose `end` is below an image's `before` was given
/// before that image was taken.
#[derive(Debug, Default)]
struct Journal {
    ticks: AtomicU64,
    ops: Mutex<Vec<Op>>,
    /// Workers not finished yet.
    running: AtomicUsize,
}

/// What a worker does after a `begin`.
enum Next {
    Own(Lease),
    Retry,
    Stop,
}

impl Journal {
    fn tick(&self) -> u64 {
        self.ticks.fetch_add(1, Ordering::SeqCst)
    }

    fn note(&self, op: Op) {
        let end = self.tick();
        self.ops.lock().unwrap().push(Op { end, ..op });
    }

    fn op(&self, key: usize, start: u64, tried: Tried, blocking: bool) -> Op {
        Op {
            key,
            start,
            end: 0,
            tried,
            acked: Ok(ABSENT),
            shown: None,
            blocking,
        }
    }

    fn note_error(&self, mut op: Op, e: &Error) {
        let expected = matches!(
            e,
            Error::Io { .. } | Error::NoSpace { .. } | Error::Poisoned { .. }
        );
        op.acked = Err(format!(
            "{}{e:?}",
            if expected { "" } else { "UNEXPECTED " }
        ));
        self.note(op);
    }

    fn note_begin(
        &self,
        key: usize,
        start: u64,
        answer: idemkv::Result<Begin>,
        blocking: bool,
    ) -> Next {
        let mut op = self.op(key, start, Tried::Begin, blocking);
        let next = match answer {
            Ok(Begin::Started(lease)) => {
                op.acked = Ok(in_progress(lease.token(), lease.expires_at_ms()));
                Next::Own(lease)
            }
            Ok(Begin::Replay(outcome)) => {
                op.acked = Ok(completed(token_in(&outcome)));
                op.shown = Some(outcome);
                Next::Stop
            }
            Ok(Begin::InFlight { .. }) => {
                op.acked = Ok(IN_FLIGHT);
                Next::Retry
            }
            Ok(Begin::Mismatch) => panic!("one fingerprint per key, yet Mismatch"),
            Err(e) => {
                self.note_error(op, &e);
                return Next::Stop;
            }
        };
        self.note(op);
        next
    }

    /// Notes the answer of an owner call; returns whether it was `Ok`.
    fn note_owner<T>(
        &self,
        key: usize,
        start: u64,
        tried: Tried,
        answer: &idemkv::Result<T>,
        acks: Order,
        blocking: bool,
    ) -> bool {
        let mut op = self.op(key, start, tried, blocking);
        match answer {
            Ok(_) => {
                op.acked = Ok(acks);
                self.note(op);
                true
            }
            Err(e) => {
                self.note_error(op, e);
                false
            }
        }
    }

    fn note_read(
        &self,
        key: usize,
        start: u64,
        answer: idemkv::Result<Option<RecordView>>,
        blocking: bool,
    ) {
        let mut op = self.op(key, start, Tried::Read, blocking);
        match answer {
            Ok(view) => {
                op.acked = Ok(view.as_ref().map_or(ABSENT, order_of));
                self.note(op);
            }
            Err(e) => self.note_error(op, &e),
        }
    }

    fn ops(&self) -> Vec<Op> {
        self.ops.lock().unwrap().clone()
    }
}

/// Counts a worker as finished when dropped (a panicking one too).
struct Running(Arc<Journal>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What one worker does with its key: up to `tries` begins (a shared key's
/// contenders answer `InFlight` while another holds it); as owner, some
/// extends, then a release (while `attempt < release_until`, after which it
/// begins again) or a completion; at the end maybe a `get`.
#[derive(Clone, Debug)]
struct Plan {
    key: usize,
    /// `begin_wait` with this timeout, or a plain `begin` if zero.
    wait_ms: u64,
    tries: u32,
    extends: u32,
    release_until: u32,
    status: u16,
    read_after: bool,
}

/// The deadline extend `e` asks for, as a duration from now.
fn extend_by(e: u32) -> Duration {
    LEASE_TTL + Duration::from_secs(u64::from(e) + 1)
}

async fn async_worker(
    ae: AsyncEngine,
    j: Arc<Journal>,
    keys: Arc<Vec<(String, String)>>,
    plan: Plan,
    running: Running,
) {
    let _running = running;
    let (user, key) = &keys[plan.key];
    let fp = fingerprint(plan.key);
    let k = plan.key;
    for attempt in 0..plan.tries {
        let s = j.tick();
        let answer = if plan.wait_ms == 0 {
            ae.begin(user, key, fp).await
        } else {
            ae.begin_wait(user, key, fp, Duration::from_millis(plan.wait_ms))
                .await
        };
        let mut lease = match j.note_begin(k, s, answer, false) {
            Next::Own(lease) => lease,
            Next::Retry => continue,
            Next::Stop => break,
        };
        let token = lease.token();
        let mut lost = false;
        for e in 0..plan.extends {
            let s = j.tick();
            let answer = ae.extend(&lease, extend_by(e)).await;
            let acks = in_progress(
                token,
                answer
                    .as_ref()
                    .map_or(0, |extended| extended.expires_at_ms()),
            );
            if !j.note_owner(k, s, Tried::Extend { token }, &answer, acks, false) {
                lost = true;
                break;
            }
            lease = answer.expect("noted as Ok");
        }
        if lost {
            return;
        }
        let s = j.tick();
        if attempt < plan.release_until {
            let answer = ae.release(&lease).await;
            let tried = Tried::Release { token };
            if !j.note_owner(k, s, tried, &answer, released(token), false) {
                return;
            }
        } else {
            let outcome = outcome_for(k, token, plan.status);
            let answer = ae.complete(&lease, outcome.clone()).await;
            let tried = Tried::Complete { token, outcome };
            if !j.note_owner(k, s, tried, &answer, completed(token), false) {
                return;
            }
            break;
        }
    }
    if plan.read_after {
        let s = j.tick();
        let answer = ae.get(user, key).await;
        j.note_read(k, s, answer, false);
    }
}

/// [`async_worker`] through the blocking API, on its own thread.
fn blocking_worker(
    engine: &Engine,
    j: &Journal,
    keys: &[(String, String)],
    plan: &Plan,
    running: Running,
) {
    let _running = running;
    let (user, key) = &keys[plan.key];
    let fp = fingerprint(plan.key);
    let k = plan.key;
    for attempt in 0..plan.tries {
        let s = j.tick();
        let answer = if plan.wait_ms == 0 {
            engine.begin(user, key, fp)
        } else {
            engine.begin_wait(user, key, fp, Duration::from_millis(plan.wait_ms))
        };
        let mut lease = match j.note_begin(k, s, answer, true) {
            Next::Own(lease) => lease,
            Next::Retry => continue,
            Next::Stop => break,
        };
        let token = lease.token();
        for e in 0..plan.extends {
            let s = j.tick();
            let answer = engine.extend(&lease, extend_by(e));
            let acks = in_progress(
                token,
                answer
                    .as_ref()
                    .map_or(0, |extended| extended.expires_at_ms()),
            );
            if !j.note_owner(k, s, Tried::Extend { token }, &answer, acks, true) {
                return;
            }
            lease = answer.expect("noted as Ok");
        }
        let s = j.tick();
        if attempt < plan.release_until {
            let answer = engine.release(&lease);
            let tried = Tried::Release { token };
            if !j.note_owner(k, s, tried, &answer, released(token), true) {
                return;
            }
        } else {
            let outcome = outcome_for(k, token, plan.status);
            let answer = engine.complete(&lease, outcome.clone());
            let tried = Tried::Complete { token, outcome };
            if !j.note_owner(k, s, tried, &answer, completed(token), true) {
                return;
            }
            break;
        }
    }
    if plan.read_after {
        let s = j.tick();
        let answer = engine.get(user, key);
        j.note_read(k, s, answer, true);
    }
}

/// A power loss: the disk as a crash at this moment leaves it.
struct Image {
    disk: SimDisk,
    /// Journal ticks taken just before and just after the crash.
    before: u64,
    after: u64,
    label: String,
}

fn take(disk: &SimDisk, j: &Journal, tear: Tear, label: &str) -> Image {
    let before = j.tick();
    let image = disk.crash(tear);
    let after = j.tick();
    Image {
        disk: image,
        before,
        after,
        label: format!("{label} ({tear:?})"),
    }
}

/// The ops of `key`, one a line, for failure messages.
fn history(ops: &[Op], key: usize) -> String {
    ops.iter()
        .filter(|o| o.key == key)
        .map(|o| format!("  {o:?}\n"))
        .collect()
}

/// Reopens the engine on `image` and checks every key against the answers
/// (see the module docs).
fn check_image(image: &Image, ops: &[Op], keys: &[(String, String)], case: &str) {
    let at = format!("{case}: crash {}", image.label);
    let clock = Arc::new(ManualClock::new(START_MS));
    let storage: Arc<dyn Storage> = Arc::new(image.disk.clone());
    let engine = Engine::open_with_storage(storage, options(&clock))
        .unwrap_or_else(|e| panic!("{at}: the image does not open: {e:?}"));
    for (id, (user, key)) in keys.iter().enumerate() {
        let mine: Vec<&Op> = ops.iter().filter(|o| o.key == id).collect();
        let begun: Vec<&&Op> = mine.iter().filter(|o| o.start < image.after).collect();
        let view = engine
            .get(user, key)
            .unwrap_or_else(|e| panic!("{at}: get {user}/{key}: {e:?}"));
        let have = match &view {
            None => begun
                .iter()
                .filter_map(|o| match o.tried {
                    Tried::Release { token } => Some(released(token)),
                    _ => None,
                })
                .max()
                .unwrap_or(ABSENT),
            Some(v) => {
                let order = order_of(v);
                let written = match v.state {
                    RecordState::InProgress => begun.iter().any(|o| {
                        o.acked == Ok(order)
                            || match (&o.tried, &o.acked) {
                                (Tried::Begin, Err(_)) => true,
                                (Tried::Extend { token }, Err(_)) => *token == v.token,
                                _ => false,
                            }
                    }),
                    RecordState::Completed => {
                        let stored = engine
                            .outcome(user, key)
                            .unwrap_or_else(|e| panic!("{at}: outcome {user}/{key}: {e:?}"));
                        begun.iter().any(|o| match &o.tried {
                            Tried::Complete { token, outcome } => {
                                *token == v.token && stored.as_ref() == Some(outcome)
                            }
                            _ => false,
                        })
                    }
                };
                assert!(
                    written,
                    "{at}: {user}/{key} shows {v:?}, which no call begun before the crash \
                     wrote\n{}",
                    history(ops, id)
                );
                order
            }
        };
        let need = mine
            .iter()
            .filter(|o| o.end < image.before)
            .filter_map(|o| o.acked.as_ref().ok())
            .max()
            .copied()
            .unwrap_or(ABSENT);
        assert!(
            have >= need,
            "{at}: {user}/{key} shows {view:?} ({have:?}), but an answer given before the \
             crash acknowledged {need:?}\n{}",
            history(ops, id)
        );
    }
    let _ = engine.close();
}

/// Checks the answers themselves: errors only of the kinds a failed sync
/// gives (none at all without one), no write acknowledged after the first
/// error, and every replay exact.
fn check_answers(ops: &[Op], failed: bool, case: &str) {
    let mut first_error = None;
    for o in ops {
        if let Err(e) = &o.acked {
            assert!(
                failed && !e.starts_with("UNEXPECTED"),
                "{case}: {o:?} failed{}",
                if failed {
                    ""
                } else {
                    " with no fault injected"
                }
            );
            first_error = Some(first_error.map_or(o.end, |f: u64| f.min(o.end)));
        }
    }
    if let Some(first) = first_error {
        for o in ops.iter().filter(|o| o.start > first) {
            assert!(
                !o.acked_a_write(),
                "{case}: {o:?} acknowledged a write after a failed sync poisoned the engine"
            );
        }
    }
    for o in ops {
        if let Some(shown) = &o.shown {
            let token = token_in(shown);
            let stored = ops.iter().any(|c| match &c.tried {
                Tried::Complete { token: t, outcome } => *t == token && outcome == shown,
                _ => false,
            });
            assert!(stored, "{case}: {o:?} replayed an outcome no call stored");
        }
    }
}

/// A boxed worker future, for either executor.
type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The executor a case's futures run on.
#[derive(Clone, Copy, Debug)]
enum Exec {
    /// The shared tokio multi-thread runtime (2 workers).
    Tokio,
    /// A `futures` `LocalPool` on a thread of its own.
    LocalPool,
}

enum Joiner {
    Tokio(Vec<tokio::task::JoinHandle<()>>),
    Thread(std::thread::JoinHandle<()>),
}

fn spawn_all(exec: Exec, rt: &tokio::runtime::Runtime, tasks: Vec<Task>) -> Joiner {
    match exec {
        Exec::Tokio => Joiner::Tokio(tasks.into_iter().map(|t| rt.spawn(t)).collect()),
        Exec::LocalPool => Joiner::Thread(std::thread::spawn(move || {
            use futures::task::LocalSpawnExt;
            let mut pool = futures::executor::LocalPool::new();
            let spawner = pool.spawner();
            for t in tasks {
                spawner.spawn_local(t).expect("spawn on the local pool");
            }
            pool.run();
        })),
    }
}

impl Joiner {
    fn join(self, rt: &tokio::runtime::Runtime) {
        match self {
            Joiner::Tokio(handles) => rt.block_on(async {
                for h in handles {
                    h.await.expect("a worker task panicked");
                }
            }),
            Joiner::Thread(t) => t.join().expect("a worker on the local pool panicked"),
        }
    }
}

/// The tokio runtime of a test. Dropped, it does not wait for its tasks: a
/// future that never yields (an engine broken into answering a loop of
/// `Durable` waits at once) must fail the test by its `HUNG` deadline, not
/// hang it.
struct Runtime(Option<tokio::runtime::Runtime>);

impl std::ops::Deref for Runtime {
    type Target = tokio::runtime::Runtime;
    fn deref(&self) -> &tokio::runtime::Runtime {
        self.0.as_ref().expect("the runtime lives until dropped")
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

fn runtime() -> Runtime {
    Runtime(Some(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap(),
    ))
}

/// An engine on a gated [`SimDisk`] whose first lease (which also reserves
/// tokens, with a sync of its own) is taken and released already.
struct Rig {
    disk: SimDisk,
    gates: Arc<Gates>,
    engine: Arc<Engine>,
}

impl Drop for Rig {
    /// Opens the gate, so that a failing test does not hang in the
    /// engine's drop (its close syncs).
    fn drop(&mut self) {
        self.gates.open(Call::Sync);
    }
}

impl Rig {
    fn new() -> Rig {
        let disk = SimDisk::new();
        let gates = Arc::new(Gates::default());
        let storage: Arc<dyn Storage> = Gated::new(Arc::new(disk.clone()), &gates);
        let clock = Arc::new(ManualClock::new(START_MS));
        let engine = Arc::new(Engine::open_with_storage(storage, options(&clock)).unwrap());
        let Begin::Started(warm) = engine.begin("u", "warm-up", fingerprint(0)).unwrap() else {
            panic!("fresh key")
        };
        engine.release(&warm).unwrap();
        Rig {
            disk,
            gates,
            engine,
        }
    }

    /// Starts the workers: async ones on `exec`, blocking ones on threads.
    fn launch(
        &self,
        j: &Arc<Journal>,
        keys: &Arc<Vec<(String, String)>>,
        exec: Exec,
        rt: &tokio::runtime::Runtime,
        async_plans: &[Plan],
        blocking_plans: &[Plan],
    ) -> (Joiner, Vec<std::thread::JoinHandle<()>>) {
        j.running
            .fetch_add(async_plans.len() + blocking_plans.len(), Ordering::SeqCst);
        let ae = AsyncEngine::new(Arc::clone(&self.engine));
        let tasks: Vec<Task> = async_plans
            .iter()
            .map(|plan| {
                let running = Running(Arc::clone(j));
                Box::pin(async_worker(
                    ae.clone(),
                    Arc::clone(j),
                    Arc::clone(keys),
                    plan.clone(),
                    running,
                )) as Task
            })
            .collect();
        let threads = blocking_plans
            .iter()
            .map(|plan| {
                let (engine, j, keys, plan) = (
                    Arc::clone(&self.engine),
                    Arc::clone(j),
                    Arc::clone(keys),
                    plan.clone(),
                );
                let running = Running(Arc::clone(&j));
                std::thread::spawn(move || blocking_worker(&engine, &j, &keys, &plan, running))
            })
            .collect();
        (spawn_all(exec, rt, tasks), threads)
    }

    /// Waits until the next held sync (number `n`, counting from 1)
    /// reaches the closed gate; false if every worker finished first.
    fn wait_held(&self, j: &Journal, n: u64, case: &str) -> bool {
        let deadline = Instant::now() + HUNG;
        loop {
            if self
                .gates
                .wait_entered(Call::Sync, n, Duration::from_millis(1))
            {
                return true;
            }
            if j.running.load(Ordering::SeqCst) == 0 {
                return false;
            }
            assert!(Instant::now() < deadline, "{case}: hung waiting for a sync");
        }
    }

    /// Opens the gate and waits until the `n` held syncs went on.
    fn let_through(&self, n: u64, case: &str) {
        self.gates.open(Call::Sync);
        assert!(
            self.gates.wait_left(Call::Sync, n, HUNG),
            "{case}: a held sync did not go on"
        );
    }

    /// Waits until every worker finished.
    fn wait_done(&self, j: &Journal, case: &str) {
        let deadline = Instant::now() + HUNG;
        while j.running.load(Ordering::SeqCst) > 0 {
            assert!(
                Instant::now() < deadline,
                "{case}: hung: {} workers never got an answer",
                j.running.load(Ordering::SeqCst)
            );
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Waits until `n` records were written since `base` (the calls made
    /// their in-memory transitions and appended).
    fn wait_records(&self, base: u64, n: u64, case: &str) {
        let deadline = Instant::now() + HUNG;
        while self.engine.stats().records_written < base + n {
            assert!(
                Instant::now() < deadline,
                "{case}: the calls never appended"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

/// How a case's syncs fail, if they do.
#[derive(Clone, Copy, Debug)]
enum Fail {
    None,
    /// The sync held in this gate round fails (EIO or ENOSPC by `kind`).
    HeldRound {
        round: u32,
        no_space: bool,
    },
    /// The `n`-th file sync after the launch fails (no gate needed).
    NthSync {
        n: u64,
        sticky: bool,
    },
}

/// One seeded case (see [`run_case`]).
#[derive(Clone, Debug)]
struct Case {
    seed: u64,
    exec: Exec,
    async_plans: Vec<Plan>,
    blocking_plans: Vec<Plan>,
    keys: usize,
    /// Gate rounds: each holds one sync while crash images are taken.
    rounds: u32,
    fail: Fail,
    /// Crash images taken at random moments after the rounds.
    free_images: u32,
}

fn fault_kind(no_space: bool) -> std::io::ErrorKind {
    if no_space {
        std::io::ErrorKind::StorageFull
    } else {
        std::io::ErrorKind::Other
    }
}

impl Case {
    /// A random case: distinct keys with one worker each, shared keys with
    /// 2-4 contenders, some of the workers blocking threads.
    fn random(seed: u64) -> Case {
        let mut rng = Rng::new(seed);
        let mut plans = Vec::new();
        let distinct = 1 + rng.below(10) as usize;
        for key in 0..distinct {
            let tries = 1 + u32::from(rng.chance(3));
            plans.push(Plan {
                key,
                wait_ms: 0,
                tries,
                extends: rng.below(3) as u32,
                release_until: tries - 1,
                status: [200, 201, 422][rng.below(3) as usize],
                read_after: rng.chance(2),
            });
        }
        let shared = rng.below(3) as usize;
        for key in distinct..distinct + shared {
            for _ in 0..2 + rng.below(3) {
                // A plain `begin` answers `InFlight` at once, also while
                // the owner's record waits for a held sync.
                let wait_ms = if rng.chance(3) { 0 } else { 1 + rng.below(15) };
                plans.push(Plan {
                    key,
                    wait_ms,
                    tries: 3,
                    extends: rng.below(2) as u32,
                    release_until: rng.below(2) as u32,
                    status: 200,
                    read_after: rng.chance(3),
                });
            }
        }
        // Up to three of the workers run on blocking threads.
        let mut blocking_plans = Vec::new();
        for _ in 0..rng.below(4) {
            let i = rng.below(plans.len() as u64) as usize;
            blocking_plans.push(plans.swap_remove(i));
            if plans.is_empty() {
                break;
            }
        }
        let rounds = rng.below(4) as u32;
        let fail = match rng.below(4) {
            0 if rounds > 0 => Fail::HeldRound {
                round: rng.below(u64::from(rounds)) as u32,
                no_space: rng.chance(2),
            },
            1 => Fail::NthSync {
                n: rng.below(4),
                sticky: rng.chance(2),
            },
            _ => Fail::None,
        };
        Case {
            seed,
            exec: if rng.chance(2) {
                Exec::Tokio
            } else {
                Exec::LocalPool
            },
            async_plans: plans,
            blocking_plans,
            keys: distinct + shared,
            rounds,
            fail,
            free_images: rng.below(3) as u32,
        }
    }
}

/// Runs a case: launches the workers, holds `rounds` syncs at the gate
/// (crash images while each is held, one maybe failing), takes images at
/// random moments, one after every answer, and checks them all.
fn run_case(case: &Case, rt: &tokio::runtime::Runtime) -> Vec<Op> {
    let name = format!("case {case:?}");
    let mut rng = Rng::new(case.seed ^ 0x5eed);
    let rig = Rig::new();
    let j = Arc::new(Journal::default());
    let keys = key_names(case.keys);
    let mut images = Vec::new();
    let mut failed = false;
    if let Fail::NthSync { n, sticky } = case.fail {
        // No sync has failed yet, so every sync call so far succeeded.
        rig.disk.inject(Fault {
            op: SimOp::Sync,
            after: rig.disk.syncs() + n,
            kind: fault_kind(false),
            sticky,
        });
        failed = true;
    }
    if case.rounds > 0 {
        rig.gates.close(Call::Sync);
    }
    let (joiner, threads) = rig.launch(
        &j,
        &keys,
        case.exec,
        rt,
        &case.async_plans,
        &case.blocking_plans,
    );
    let mut held = 0;
    for round in 0..case.rounds {
        rig.gates.close(Call::Sync);
        if !rig.wait_held(&j, held + 1, &name) {
            break;
        }
        held += 1;
        // The round's write is in the file; its sync has not run.
        rng.pause();
        images.push(take(&rig.disk, &j, rng.tear(), "while a sync is held"));
        if rng.chance(2) {
            rng.pause();
            images.push(take(&rig.disk, &j, rng.tear(), "later, still held"));
        }
        if let Fail::HeldRound { round: r, no_space } = case.fail
            && r == round
        {
            rig.disk.inject(Fault {
                op: SimOp::Sync,
                after: 0,
                kind: fault_kind(no_space),
                sticky: false,
            });
            failed = true;
        }
        rig.let_through(held, &name);
        rng.pause();
        if rng.chance(2) {
            images.push(take(&rig.disk, &j, rng.tear(), "just after a held sync"));
        }
    }
    rig.gates.open(Call::Sync);
    for _ in 0..case.free_images {
        if j.running.load(Ordering::SeqCst) == 0 {
            break;
        }
        rng.pause();
        images.push(take(&rig.disk, &j, rng.tear(), "at a random moment"));
    }
    rig.wait_done(&j, &name);
    images.push(take(&rig.disk, &j, rng.tear(), "after every answer"));
    joiner.join(rt);
    for t in threads {
        t.join().expect("a blocking worker panicked");
    }
    let ops = j.ops();
    check_answers(&ops, failed, &name);
    for image in &images {
        check_image(image, &ops, &keys, &name);
    }
    let _ = rig.engine.close();
    ops
}

/// 400 cases, about 1.5 s in release. Breaking the engine on purpose made
/// it fail: a `Durable` future resolving at once (seed 0), `Ok` after a
/// failed sync (seed 6), the durable position published before the sync
/// returned or after it failed (seeds 2, 6), a blocking call returning
/// before its sync (seed 0), an async `get` not waiting for durability
/// (seed 1), and the syncer bug of the regression test below (seed 151,
/// as a hang).
#[test]
fn seeded_syncer_crashes_never_lose_an_acknowledged_state() {
    let rt = runtime();
    let started = Instant::now();
    let seeds = match std::env::var("IDEMKV_SEED") {
        Ok(seed) => {
            let seed = seed.parse().expect("IDEMKV_SEED is a number");
            seed..seed + 1
        }
        Err(_) => 0..400,
    };
    let (mut answers, mut errors) = (0, 0);
    for seed in seeds.clone() {
        let ops = run_case(&Case::random(seed), &rt);
        answers += ops.len();
        errors += ops.iter().filter(|o| o.acked.is_err()).count();
    }
    eprintln!(
        "{} cases, {answers} answers ({errors} errors) in {:?}",
        seeds.end - seeds.start,
        started.elapsed()
    );
}

/// Plans of one worker per key, each starting, extending once and
/// completing its own key.
fn owners(keys: std::ops::Range<usize>) -> Vec<Plan> {
    keys.map(|key| Plan {
        key,
        wait_ms: 0,
        tries: 1,
        extends: 1,
        release_until: 0,
        status: 201,
        read_after: false,
    })
    .collect()
}

/// While the sync of the first round is held, no future has answered (not
/// one of their records is durable), and crash images with every kind of
/// tail show none of their acknowledged states missing; once it goes on,
/// every key completes and survives a crash.
#[test]
fn no_future_answers_before_the_sync_that_covers_its_record() {
    let rt = runtime();
    for exec in [Exec::Tokio, Exec::LocalPool] {
        let name = format!("{exec:?}");
        let rig = Rig::new();
        let j = Arc::new(Journal::default());
        let keys = key_names(24);
        rig.gates.close(Call::Sync);
        let base = rig.engine.stats().records_written;
        // Four begins polled by hand: the first one's record is in the
        // held round; polled again while it is held, none may be ready,
        // woken or not.
        let ae = AsyncEngine::new(Arc::clone(&rig.engine));
        let mut by_hand: Vec<_> = (0..4)
            .map(|i| Box::pin(ae.begin("u", format!("by-hand-{i}"), fingerprint(100 + i))))
            .collect();
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        for f in &mut by_hand {
            assert!(f.as_mut().poll(&mut cx).is_pending());
        }
        let (joiner, threads) = rig.launch(&j, &keys, exec, &rt, &owners(0..24), &[]);
        assert!(rig.wait_held(&j, 1, &name));
        // Every begin appends (its transition is in memory) and waits; give
        // a future that would answer early the time to do it.
        rig.wait_records(base, 4 + 24, &name);
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            j.ops().is_empty(),
            "{name}: answered while the only sync that could cover them was held: {:?}",
            j.ops()
        );
        for (i, f) in by_hand.iter_mut().enumerate() {
            let answer = f.as_mut().poll(&mut cx);
            assert!(
                answer.is_pending(),
                "{name}: begin {i}, polled while its sync was held, answered {answer:?}"
            );
        }
        let mut images = vec![
            take(&rig.disk, &j, Tear::Clean, "held"),
            take(&rig.disk, &j, Tear::Prefix(7), "held"),
            take(&rig.disk, &j, Tear::Garbage(9), "held"),
        ];
        rig.let_through(1, &name);
        rig.wait_done(&j, &name);
        for (i, f) in by_hand.iter_mut().enumerate() {
            let deadline = Instant::now() + HUNG;
            let answer = loop {
                if let std::task::Poll::Ready(answer) = f.as_mut().poll(&mut cx) {
                    break answer;
                }
                assert!(
                    Instant::now() < deadline,
                    "{name}: begin {i} never answered"
                );
                std::thread::sleep(Duration::from_millis(1));
            };
            assert!(
                matches!(answer, Ok(Begin::Started(_))),
                "{name}: {answer:?}"
            );
        }
        images.push(take(&rig.disk, &j, Tear::Garbage(3), "after every answer"));
        joiner.join(&rt);
        assert!(threads.is_empty());
        let ops = j.ops();
        check_answers(&ops, false, &name);
        assert_eq!(ops.len(), 24 * 3, "{name}: begin, extend, complete per key");
        for image in &images {
            check_image(image, &ops, &keys, &name);
        }
        // And explicitly: after every answer, every key is completed.
        let clock = Arc::new(ManualClock::new(START_MS));
        let last = images.last().expect("an image");
        let storage: Arc<dyn Storage> = Arc::new(last.disk.clone());
        let reopened = Engine::open_with_storage(storage, options(&clock)).unwrap();
        for (id, (user, key)) in keys.iter().enumerate() {
            let view = reopened.get(user, key).unwrap();
            assert_eq!(
                view.map(|v| v.state),
                Some(RecordState::Completed),
                "{name}: key {id}"
            );
        }
        let _ = rig.engine.close();
    }
}

/// The durable state before the failed sync: keys `0..4` completed, keys
/// `4..8` in progress under leases the test holds, keys `8..` absent.
fn prepare(engine: &Engine, keys: &[(String, String)], j: &Journal) -> Vec<Lease> {
    let mut held = Vec::new();
    for (id, (user, key)) in keys.iter().enumerate().take(8) {
        let s = j.tick();
        let answer = engine.begin(user, key, fingerprint(id));
        let Next::Own(lease) = j.note_begin(id, s, answer, true) else {
            panic!("fresh key")
        };
        if id < 4 {
            let token = lease.token();
            let outcome = outcome_for(id, token, 200);
            let s = j.tick();
            let answer = engine.complete(&lease, outcome.clone());
            let tried = Tried::Complete { token, outcome };
            assert!(j.note_owner(id, s, tried, &answer, completed(token), true));
        } else {
            held.push(lease);
        }
    }
    held
}

/// A failed fdatasync while 16 futures and 4 blocking callers wait on it
/// (begins of new keys; completes, releases and extends of held leases;
/// a replay): every one answers `Io`, `NoSpace` or `Poisoned`, none `Ok`;
/// a crash image (any tail) and a clean restart then show every key as it
/// was before: completed, in progress with its old deadline, or absent.
#[test]
fn a_failed_sync_answers_every_waiter_with_an_error_and_a_reopen_shows_the_durable_states() {
    let rt = runtime();
    for (exec, no_space) in [(Exec::Tokio, false), (Exec::LocalPool, true)] {
        let name = format!("{exec:?}, no_space: {no_space}");
        let rig = Rig::new();
        let keys = key_names(24);
        let j = Arc::new(Journal::default());
        let held = prepare(&rig.engine, &keys, &j);
        let prepared = j.ops().len();
        let before: Vec<Option<RecordView>> = keys
            .iter()
            .map(|(user, key)| rig.engine.get(user, key).unwrap())
            .collect();
        rig.gates.close(Call::Sync);
        let base = rig.engine.stats().records_written;
        // Held leases: complete 4, release 5, extend 6 and 7 (a blocking
        // thread each for 4 and 6).
        let ae = AsyncEngine::new(Arc::clone(&rig.engine));
        j.running.fetch_add(4, Ordering::SeqCst);
        let mut owner_threads = Vec::new();
        let mut owner_tasks: Vec<Task> = Vec::new();
        for lease in held {
            let id = keys
                .iter()
                .position(|(_, k)| k.as_bytes() == lease.key())
                .unwrap();
            let token = lease.token();
            let running = Running(Arc::clone(&j));
            let (j, engine, ae) = (Arc::clone(&j), Arc::clone(&rig.engine), ae.clone());
            match id {
                4 => owner_threads.push(std::thread::spawn(move || {
                    let _running = running;
                    let outcome = outcome_for(id, token, 201);
                    let s = j.tick();
                    let answer = engine.complete(&lease, outcome.clone());
                    let tried = Tried::Complete { token, outcome };
                    j.note_owner(id, s, tried, &answer, completed(token), true);
                })),
                5 => owner_tasks.push(Box::pin(async move {
                    let _running = running;
                    let s = j.tick();
                    let answer = ae.release(&lease).await;
                    let tried = Tried::Release { token };
                    j.note_owner(id, s, tried, &answer, released(token), false);
                })),
                6 => owner_threads.push(std::thread::spawn(move || {
                    let _running = running;
                    let s = j.tick();
                    let answer = engine.extend(&lease, extend_by(0));
                    let acks = in_progress(token, START_MS + 31_000);
                    j.note_owner(id, s, Tried::Extend { token }, &answer, acks, true);
                })),
                _ => owner_tasks.push(Box::pin(async move {
                    let _running = running;
                    let s = j.tick();
                    let answer = ae.extend(&lease, extend_by(0)).await;
                    let acks = in_progress(token, START_MS + 31_000);
                    j.note_owner(id, s, Tried::Extend { token }, &answer, acks, false);
                })),
            }
        }
        // A replay of a completed key needs no sync: it answers even while
        // the sync is held, and before it fails.
        let replay = {
            let (j, ae, keys) = (Arc::clone(&j), ae.clone(), Arc::clone(&keys));
            j.running.fetch_add(1, Ordering::SeqCst);
            let running = Running(Arc::clone(&j));
            let (replayed_tx, replayed) = std::sync::mpsc::channel();
            owner_tasks.push(Box::pin(async move {
                let _running = running;
                let s = j.tick();
                let answer = ae.begin(&keys[0].0, &keys[0].1, fingerprint(0)).await;
                j.note_begin(0, s, answer, false);
                let _ = replayed_tx.send(());
            }));
            replayed
        };
        let owner_joiner = spawn_all(exec, &rt, owner_tasks);
        // New keys: 14 async begins, 2 blocking ones.
        let mut fresh = owners(8..24);
        for plan in &mut fresh {
            plan.extends = 0;
        }
        let blocking = fresh.split_off(14);
        let (joiner, threads) = rig.launch(&j, &keys, exec, &rt, &fresh, &blocking);
        assert!(rig.wait_held(&j, 1, &name));
        rig.wait_records(base, 4 + 16, &name);
        replay
            .recv_timeout(HUNG)
            .expect("the replay answers while the sync is held");
        rig.disk.inject(Fault {
            op: SimOp::Sync,
            after: 0,
            kind: fault_kind(no_space),
            sticky: false,
        });
        rig.let_through(1, &name);
        rig.wait_done(&j, &name);
        owner_joiner.join(&rt);
        joiner.join(&rt);
        for t in owner_threads.into_iter().chain(threads) {
            t.join().unwrap();
        }
        let ops = j.ops();
        check_answers(&ops, true, &name);
        assert_eq!(ops.len(), prepared + 4 + 16 + 1, "{name}: {ops:?}");
        for o in ops.iter().skip(prepared) {
            let replay = matches!(o.tried, Tried::Begin) && o.shown.is_some();
            assert!(
                replay || o.acked.is_err(),
                "{name}: {o:?} answered Ok though its sync failed"
            );
        }
        let images: Vec<Image> = [Tear::Clean, Tear::Prefix(5), Tear::Garbage(11)]
            .into_iter()
            .map(|tear| take(&rig.disk, &j, tear, "after the failed sync"))
            .collect();
        for image in &images {
            check_image(image, &ops, &keys, &name);
        }
        let _ = rig.engine.close();
        // A crash, any tail, and a clean restart on the live files: every
        // key shows its last durable state.
        let clean: Arc<dyn Storage> = Arc::new(rig.disk.clone());
        let crashed = images
            .iter()
            .map(|image| Arc::new(image.disk.clone()) as Arc<dyn Storage>);
        for storage in crashed.chain([clean]) {
            let clock = Arc::new(ManualClock::new(START_MS));
            let reopened = Engine::open_with_storage(storage, options(&clock)).unwrap();
            for (id, (user, key)) in keys.iter().enumerate() {
                assert_eq!(
                    reopened.get(user, key).unwrap(),
                    before[id],
                    "{name}: key {id} is not as it was before the failed sync"
                );
            }
            let stored = reopened.outcome(&keys[0].0, &keys[0].1).unwrap();
            assert_eq!(stored.map(|o| o.status), Some(200));
        }
    }
}

/// Blocking callers (`Engine::begin_wait`, `extend`, `complete`,
/// `release`) and futures contend for the same keys and share each held
/// group commit, over several rounds, one of whose syncs fails in the
/// second half of the cases.
#[test]
fn blocking_calls_racing_futures_on_shared_keys_keep_every_acknowledged_state() {
    let rt = runtime();
    let mut acked = [0u32; 2];
    for seed in 0..24 {
        let mut rng = Rng::new(seed + 1_000);
        let mut async_plans = Vec::new();
        let mut blocking_plans = Vec::new();
        for key in 0..4 {
            for c in 0..4 {
                let wait_ms = if rng.chance(3) { 0 } else { 2 + rng.below(10) };
                let plan = Plan {
                    key,
                    wait_ms,
                    tries: 3,
                    extends: rng.below(2) as u32,
                    release_until: rng.below(2) as u32,
                    status: 200,
                    read_after: rng.chance(2),
                };
                if c % 2 == 0 {
                    blocking_plans.push(plan);
                } else {
                    async_plans.push(plan);
                }
            }
        }
        let case = Case {
            seed,
            exec: if seed % 2 == 0 {
                Exec::Tokio
            } else {
                Exec::LocalPool
            },
            async_plans,
            blocking_plans,
            keys: 4,
            rounds: 3,
            fail: if seed >= 12 {
                Fail::HeldRound {
                    round: (seed % 3) as u32,
                    no_space: seed % 2 == 0,
                }
            } else {
                Fail::None
            },
            free_images: 2,
        };
        for o in run_case(&case, &rt) {
            if o.acked_a_write() {
                acked[usize::from(o.blocking)] += 1;
            }
        }
    }
    // Both APIs were in the race: each had writes acknowledged.
    assert!(
        acked[0] > 0 && acked[1] > 0,
        "acknowledged writes (async, blocking): {acked:?}"
    );
}

/// A waker that, the first time it is woken, blocks the waking thread until
/// the test sends on its channel (to hold the syncer thread between rounds).
struct Stall(Mutex<Option<std::sync::mpsc::Receiver<()>>>);

impl futures::task::ArcWake for Stall {
    fn wake_by_ref(arc_self: &Arc<Self>) {
        let rx = arc_self.0.lock().unwrap().take();
        if let Some(rx) = rx {
            let _ = rx.recv_timeout(HUNG);
        }
    }
}

/// A waker that counts its wake-ups.
struct Count(AtomicUsize);

impl futures::task::ArcWake for Count {
    fn wake_by_ref(arc_self: &Arc<Self>) {
        arc_self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// Regression (found by the seeded cases, which hung): a sync that fails in
/// a round a blocking caller led, while the syncer thread is between
/// rounds, left a future whose record that round dropped waiting forever,
/// and the syncer thread spinning. The failure cut the log back to its
/// durable end, so the syncer's next `sync_past` found everything durable
/// and returned `Ok`, and it woke a waiter only after an error of its own
/// or once the waiter's position was durable.
#[test]
fn a_sync_failed_by_a_blocking_leader_wakes_the_futures_whose_records_it_dropped() {
    use std::pin::pin;
    use std::task::{Context, Poll};

    let name = "blocking leader";
    let rig = Rig::new();
    let ae = AsyncEngine::new(Arc::clone(&rig.engine));
    rig.gates.close(Call::Sync);
    let base = rig.engine.stats().records_written;
    // F1: its record is the syncer thread's round, held at the gate; its
    // waker then holds the syncer thread until the test lets it go.
    let (go, stalled) = std::sync::mpsc::channel();
    let w1 = futures::task::waker(Arc::new(Stall(Mutex::new(Some(stalled)))));
    let mut f1 = pin!(ae.begin("u", "a", fingerprint(1)));
    assert!(f1.as_mut().poll(&mut Context::from_waker(&w1)).is_pending());
    assert!(rig.gates.wait_entered(Call::Sync, 1, HUNG));
    // B: a blocking begin, which leads the next round.
    let engine = Arc::clone(&rig.engine);
    let b = std::thread::spawn(move || engine.begin("u", "b", fingerprint(2)));
    rig.wait_records(base, 2, name);
    // F2: appended before the next round starts, so that round writes it.
    let count = Arc::new(Count(AtomicUsize::new(0)));
    let w2 = futures::task::waker(Arc::clone(&count));
    let mut f2 = pin!(ae.begin("u", "c", fingerprint(3)));
    assert!(f2.as_mut().poll(&mut Context::from_waker(&w2)).is_pending());
    rig.wait_records(base, 3, name);
    // The held sync succeeds; the next one (B's round, holding b and c)
    // fails, while the syncer thread is stalled in F1's waker.
    rig.disk.inject(Fault {
        op: SimOp::Sync,
        after: rig.disk.syncs() + 1,
        kind: std::io::ErrorKind::Other,
        sticky: false,
    });
    rig.gates.open(Call::Sync);
    let answer = b.join().unwrap();
    assert!(matches!(answer, Err(Error::Io { .. })), "B: {answer:?}");
    go.send(()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while count.0.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the future whose record the failed sync dropped was never woken"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    match f2.as_mut().poll(&mut Context::from_waker(&w2)) {
        Poll::Ready(Err(Error::Poisoned { .. })) => {}
        other => panic!("F2, whose record was never synced: {other:?}"),
    }
    match f1.as_mut().poll(&mut Context::from_waker(&w1)) {
        Poll::Ready(Ok(Begin::Started(_))) => {}
        other => panic!("F1, whose record the held sync synced: {other:?}"),
    }
    let image = take(&rig.disk, &Journal::default(), Tear::Clean, "after");
    let clock = Arc::new(ManualClock::new(START_MS));
    let storage: Arc<dyn Storage> = Arc::new(image.disk);
    let reopened = Engine::open_with_storage(storage, options(&clock)).unwrap();
    assert!(reopened.get("u", "a").unwrap().is_some());
    assert_eq!(reopened.get("u", "b").unwrap(), None);
    assert_eq!(reopened.get("u", "c").unwrap(), None);
    let _ = rig.engine.close();
}

/// Polls `f` until it is ready, at most [`HUNG`].
fn poll_until_ready<F: Future + ?Sized>(mut f: Pin<&mut F>, what: &str) -> F::Output {
    let waker = futures::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    let deadline = Instant::now() + HUNG;
    loop {
        if let std::task::Poll::Ready(out) = f.as_mut().poll(&mut cx) {
            return out;
        }
        assert!(Instant::now() < deadline, "{what} never answered");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// An answer that shows a state (`InFlight`, `Replay`, a `get`), async or
/// blocking, waits for the sync of that state's record: while it is held,
/// none is given, and a crash then shows the key as it was before.
#[test]
fn answers_that_show_a_state_wait_for_the_sync_of_its_record() {
    let rig = Rig::new();
    let ae = AsyncEngine::new(Arc::clone(&rig.engine));
    let waker = futures::task::noop_waker();
    let fp = fingerprint(0);
    let lookers = |stage: &str| {
        let mut cx = std::task::Context::from_waker(&waker);
        let engine = Arc::clone(&rig.engine);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(engine.begin("u", "k", fp));
        });
        let mut begin = Box::pin(ae.begin("u", "k", fp));
        let mut get = Box::pin(ae.get("u", "k"));
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            rx.try_recv().is_err(),
            "{stage}: a blocking begin answered while the sync was held"
        );
        let answer = begin.as_mut().poll(&mut cx);
        assert!(
            answer.is_pending(),
            "{stage}: async begin answered {answer:?}"
        );
        let answer = get.as_mut().poll(&mut cx);
        assert!(
            answer.is_pending(),
            "{stage}: async get answered {answer:?}"
        );
        (rx, begin, get)
    };
    let clean_view = |label: &str| {
        let image = take(&rig.disk, &Journal::default(), Tear::Clean, label);
        let clock = Arc::new(ManualClock::new(START_MS));
        let storage: Arc<dyn Storage> = Arc::new(image.disk);
        let reopened = Engine::open_with_storage(storage, options(&clock)).unwrap();
        reopened.get("u", "k").unwrap().map(|v| v.state)
    };
    let mut cx = std::task::Context::from_waker(&waker);

    // In progress: the owner's begin waits on a held sync.
    rig.gates.close(Call::Sync);
    let mut owner = Box::pin(ae.begin("u", "k", fp));
    assert!(owner.as_mut().poll(&mut cx).is_pending());
    assert!(rig.gates.wait_entered(Call::Sync, 1, HUNG));
    let (rx, mut begin, mut get) = lookers("in progress");
    assert_eq!(clean_view("begin held"), None);
    rig.let_through(1, "in progress");
    let lease = started(poll_until_ready(owner.as_mut(), "the owner's begin").unwrap());
    let blocking = rx.recv_timeout(HUNG).unwrap().unwrap();
    assert!(matches!(blocking, Begin::InFlight { .. }), "{blocking:?}");
    let answer = poll_until_ready(begin.as_mut(), "async begin").unwrap();
    assert!(matches!(answer, Begin::InFlight { .. }), "{answer:?}");
    let view = poll_until_ready(get.as_mut(), "async get").unwrap();
    assert_eq!(view.map(|v| v.state), Some(RecordState::InProgress));

    // Completed: the completion waits on a held sync.
    rig.gates.close(Call::Sync);
    let outcome = outcome_for(0, lease.token(), 200);
    let mut complete = Box::pin(ae.complete(&lease, outcome.clone()));
    assert!(complete.as_mut().poll(&mut cx).is_pending());
    assert!(rig.gates.wait_entered(Call::Sync, 2, HUNG));
    let (rx, mut begin, mut get) = lookers("completed");
    assert_eq!(clean_view("complete held"), Some(RecordState::InProgress));
    rig.let_through(2, "completed");
    poll_until_ready(complete.as_mut(), "the completion").unwrap();
    let blocking = rx.recv_timeout(HUNG).unwrap().unwrap();
    assert!(
        matches!(&blocking, Begin::Replay(o) if o == &outcome),
        "{blocking:?}"
    );
    let answer = poll_until_ready(begin.as_mut(), "async begin").unwrap();
    assert!(
        matches!(&answer, Begin::Replay(o) if o == &outcome),
        "{answer:?}"
    );
    let view = poll_until_ready(get.as_mut(), "async get").unwrap();
    assert_eq!(view.map(|v| v.state), Some(RecordState::Completed));
    assert_eq!(clean_view("after"), Some(RecordState::Completed));
    let _ = rig.engine.close();
}

fn started(answer: Begin) -> Lease {
    match answer {
        Begin::Started(lease) => lease,
        other => panic!("expected Started, got {other:?}"),
    }
}
