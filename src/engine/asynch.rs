//! [`AsyncEngine`]: the engine's calls as futures.
//!
//! Each call does its work in memory and appends its record like the
//! blocking call, then awaits a [`Durable`](crate::log::syncer::Durable)
//! future instead of parking its thread on the group commit: the log's own
//! syncer thread fdatasyncs (sharing rounds with blocking callers) and wakes
//! the future. No async runtime is involved, so the futures run on any
//! executor.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::owner::Written;
use super::{BeginStep2, Engine};
use crate::error::Result;
use crate::metrics::Op;
use crate::notify::Change;
use crate::once::{Done, RunError, RunOptions, WorkError, lease_or_done, not_kept};
use crate::outcome::{Begin, Fingerprint, Lease, Outcome, RecordView};
use crate::stats::bump;

use super::read::WaitAnswer;

/// The async face of an [`Engine`]: the same calls, the same answers and
/// errors, as futures that never block the thread that polls them on an
/// fsync. `Clone + Send + Sync`; clones share the engine.
///
/// Works on any executor (tokio's current-thread and multi-thread
/// runtimes, smol, a plain `block_on`): the futures are woken by the
/// engine's own syncer thread when their group commit lands. The blocking
/// [`Engine`] and any number of `AsyncEngine`s can be used on one engine at
/// once; they share one index, one log and one group commit.
///
/// ```
/// use std::sync::Arc;
/// use idemkv::{AsyncEngine, Begin, Engine, Fingerprint, Options, Outcome};
///
/// # fn main() -> idemkv::Result<()> {
/// # let dir = tempfile::tempdir().unwrap();
/// let engine = AsyncEngine::new(Arc::new(Engine::open(dir.path(), Options::default())?));
/// let charge = async {
///     let fp = Fingerprint::of(b"amount=10");
///     let Begin::Started(lease) = engine.begin("user", "order-1", fp).await? else {
///         unreachable!("a new key is started")
///     };
///     engine.complete(&lease, Outcome { status: 201, body: "charged".into() }).await?;
///     engine.begin("user", "order-1", fp).await
/// };
/// let replay = futures::executor::block_on(charge)?;
/// assert!(matches!(replay, Begin::Replay(_)));
/// # Ok(()) }
/// ```
///
/// Waiting for an in-flight key ([`AsyncEngine::begin_wait`],
/// [`AsyncEngine::wait`]) holds no thread: the future is woken when any key
/// is completed or released, and by the engine's ticker thread every
/// 10 ms (a lease's expiry on the engine's clock is only seen by looking
/// again), and looks again.
///
/// Long work keeps its key with [`AsyncEngine::run_once_with`]'s heartbeat
/// (or [`Engine::heartbeat`] around any work): the engine's heartbeat
/// thread extends the lease, so no task or timer of the executor is used.
///
/// Not yet async (this release): a segment roll or a token reservation
/// (once per `segment_bytes` of log, once per 2^20 leases) still runs its
/// fdatasync on the calling thread.
#[derive(Clone, Debug)]
pub struct AsyncEngine {
    engine: Arc<Engine>,
}

/// Releases a lease that its `begin` future granted but never handed out
/// (the future was dropped while the lease's record was being synced).
struct ReleaseUnlessTaken<'a> {
    engine: &'a Arc<Engine>,
    lease: Option<Lease>,
}

impl ReleaseUnlessTaken<'_> {
    fn take(mut self) -> Option<Lease> {
        self.lease.take()
    }
}

impl Drop for ReleaseUnlessTaken<'_> {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            // The work never ran: free the key for a retry. Its record
            // becomes durable with the next sync; if it never does, the
            // lease expires on its own. A failure (a closed or poisoned
            // engine) leaves the lease to expire too.
            if let Ok(Written::Chore(_)) = self.engine.release_write(&lease) {
                // The segment is full: roll and release on a thread of its
                // own, not on the executor's (on this one only if no
                // thread can be had).
                let engine = Arc::clone(self.engine);
                let release = move || {
                    let _ = engine.with_chores(|| engine.release_write(&lease));
                };
                let handle = std::thread::Builder::new()
                    .name("idemkv-release".into())
                    .spawn(release.clone());
                if handle.is_err() {
                    release();
                }
            }
        }
    }
}

impl AsyncEngine {
    /// Runs `write` until it is done; its chores (a roll when the segment
    /// is full: an fsync) run off the executor's thread.
    async fn with_chores<T>(&self, mut write: impl FnMut() -> Result<Written<T>>) -> Result<T> {
        loop {
            match write()? {
                Written::Done(t) => return Ok(t),
                Written::Chore(chore) => self.engine.log.offload(chore).await?,
            }
        }
    }
}

impl AsyncEngine {
    /// The async face of `engine`.
    pub fn new(engine: Arc<Engine>) -> AsyncEngine {
        AsyncEngine { engine }
    }

    /// The engine behind it (for the blocking calls, `stats`, `close`).
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// [`Engine::begin`] as a future.
    ///
    /// Cancellation: dropped before it resolves, it leaves nothing behind.
    /// If it had granted a lease whose record was still being synced, the
    /// lease is released (the work cannot have run); if it was waiting to
    /// read a live record, nothing changed.
    ///
    /// # Errors
    /// As [`Engine::begin`].
    pub async fn begin(
        &self,
        user: impl AsRef<[u8]>,
        key: impl AsRef<[u8]>,
        fingerprint: Fingerprint,
    ) -> Result<Begin> {
        let e = &*self.engine;
        let _timer = e.counters.histograms.time(Op::Begin);
        let (user, key) = (user.as_ref(), key.as_ref());
        e.check_open()?;
        e.validate(user, key)?;
        bump(&e.counters.begins);
        let mut now = e.clock.now()?;
        let mut foreign = None;
        let mut outlived = 0;
        loop {
            match e.begin_step(user, key, fingerprint, now, &mut foreign)? {
                BeginStep2::Started(lease, pos, count) => {
                    let guard = ReleaseUnlessTaken {
                        engine: &self.engine,
                        lease: Some(lease),
                    };
                    let waited = !e.log.is_durable_enough(pos);
                    e.log.durable(pos).await?;
                    if let Some(lease) = guard.take() {
                        if let Some(answer) = e.outlived(&lease, waited, &mut now, &mut outlived)? {
                            match answer {
                                Some(answer) => return Ok(answer),
                                None => continue,
                            }
                        }
                        e.count_started(count);
                        return Ok(Begin::Started(lease));
                    }
                }
                BeginStep2::Answer(answer) => return Ok(answer),
                BeginStep2::NotDurable(pos) => {
                    e.log.durable(pos).await?;
                    now = e.clock.now()?;
                }
                BeginStep2::Chore(chore) => e.log.offload(chore).await?,
                BeginStep2::Again => {}
            }
        }
    }

    /// [`Engine::complete`] as a future.
    ///
    /// Cancellation: dropped before its first poll, nothing happened;
    /// dropped later, the outcome was stored (in memory and in the log) and
    /// becomes durable with the next sync, like any unacknowledged write: it
    /// is never half stored.
    ///
    /// # Errors
    /// As [`Engine::complete`].
    pub async fn complete(&self, lease: &Lease, outcome: Outcome) -> Result<()> {
        let ttl = self.engine.options.record_ttl;
        self.complete_with_ttl(lease, outcome, ttl).await
    }

    /// [`Engine::complete_with_ttl`] as a future (cancellation as
    /// [`AsyncEngine::complete`]).
    ///
    /// # Errors
    /// As [`Engine::complete_with_ttl`].
    pub async fn complete_with_ttl(
        &self,
        lease: &Lease,
        outcome: Outcome,
        ttl: Duration,
    ) -> Result<()> {
        let _timer = self.engine.counters.histograms.time(Op::Complete);
        let pos = self
            .with_chores(|| self.engine.complete_write(lease, outcome.clone(), ttl))
            .await?;
        self.engine.log.durable(pos).await
    }

    /// [`Engine::release`] as a future (cancellation as
    /// [`AsyncEngine::complete`]: released or not, never half).
    ///
    /// # Errors
    /// As [`Engine::release`].
    pub async fn release(&self, lease: &Lease) -> Result<()> {
        let pos = self
            .with_chores(|| self.engine.release_write(lease))
            .await?;
        self.engine.log.durable(pos).await
    }

    /// [`Engine::extend`] as a future (cancellation as
    /// [`AsyncEngine::complete`]: a dropped future may have moved the
    /// deadline; the caller's lease is still valid either way).
    ///
    /// # Errors
    /// As [`Engine::extend`].
    pub async fn extend(&self, lease: &Lease, by: Duration) -> Result<Lease> {
        let (extended, pos) = self
            .with_chores(|| self.engine.extend_write(lease, by))
            .await?;
        self.engine.log.durable(pos).await?;
        Ok(extended)
    }

    /// [`Engine::get`] as a future: it awaits only the durability of the
    /// state it shows (under `Sync`). Cancellation: nothing changes.
    ///
    /// # Errors
    /// As [`Engine::get`].
    pub async fn get(
        &self,
        user: impl AsRef<[u8]>,
        key: impl AsRef<[u8]>,
    ) -> Result<Option<RecordView>> {
        let e = &*self.engine;
        let (user, key) = (user.as_ref(), key.as_ref());
        e.check_open()?;
        e.validate(user, key)?;
        Ok(self.lookup(user, key).await?.map(|entry| entry.view()))
    }

    /// [`Engine::outcome`] as a future: it may do one positional read of
    /// the body. Cancellation: nothing changes.
    ///
    /// # Errors
    /// As [`Engine::outcome`].
    pub async fn outcome(
        &self,
        user: impl AsRef<[u8]>,
        key: impl AsRef<[u8]>,
    ) -> Result<Option<Outcome>> {
        let e = &*self.engine;
        let (user, key) = (user.as_ref(), key.as_ref());
        e.check_open()?;
        e.validate(user, key)?;
        loop {
            if let Some(answer) = e.outcome_of(self.lookup(user, key).await?, user, key)? {
                return Ok(answer);
            }
        }
    }

    /// [`Engine::begin_wait`] as a future: while another live lease holds
    /// the key it waits (holding no thread) up to `timeout` of wall time for
    /// that lease to end, then answers as `begin` would; `InFlight` only
    /// once `timeout` has passed. Cancellation: as [`AsyncEngine::begin`]
    /// (a lease it granted but never handed out is released).
    ///
    /// # Errors
    /// As [`Engine::begin_wait`].
    pub async fn begin_wait(
        &self,
        user: impl AsRef<[u8]>,
        key: impl AsRef<[u8]>,
        fingerprint: Fingerprint,
        timeout: Duration,
    ) -> Result<Begin> {
        Ok(self.begin_waited(user, key, fingerprint, timeout).await?.0)
    }

    /// [`AsyncEngine::begin_wait`], and whether it waited: `true` once a
    /// `begin` found the key in flight and the call waited for it (a replay
    /// served after a wait, for the replay hooks).
    pub(crate) async fn begin_waited(
        &self,
        user: impl AsRef<[u8]>,
        key: impl AsRef<[u8]>,
        fingerprint: Fingerprint,
        timeout: Duration,
    ) -> Result<(Begin, bool)> {
        // A zero timeout is `begin` (timed as one, not as a wait).
        let histograms = &self.engine.counters.histograms;
        let _timer = (!timeout.is_zero()).then(|| histograms.time(Op::Wait));
        let (user, key) = (user.as_ref(), key.as_ref());
        let start = Instant::now();
        let deadline = start
            .checked_add(timeout)
            .unwrap_or(start + Duration::from_secs(1 << 30));
        let waiters = &self.engine.waiters;
        let _waiting = waiters.enter();
        let mut waited = false;
        loop {
            let seen = waiters.generation();
            let answer = self.begin(user, key, fingerprint).await?;
            let Begin::InFlight { retry_after } = answer else {
                return Ok((answer, waited));
            };
            if Instant::now() >= deadline {
                return Ok((Begin::InFlight { retry_after }, waited));
            }
            waited = true;
            Change::new(waiters, seen, deadline).await;
        }
    }

    /// [`Engine::wait`] as a future (holding no thread): resolves with the
    /// outcome once the record is completed for `fingerprint`, with `None`
    /// once it ends otherwise or `timeout` of wall time passes.
    /// Cancellation: nothing changes.
    ///
    /// # Errors
    /// As [`Engine::wait`].
    pub async fn wait(
        &self,
        user: impl AsRef<[u8]>,
        key: impl AsRef<[u8]>,
        fingerprint: Fingerprint,
        timeout: Duration,
    ) -> Result<Option<Outcome>> {
        let e = &*self.engine;
        let _timer = e.counters.histograms.time(Op::Wait);
        let (user, key) = (user.as_ref(), key.as_ref());
        e.check_open()?;
        e.validate(user, key)?;
        let start = Instant::now();
        let deadline = start
            .checked_add(timeout)
            .unwrap_or(start + Duration::from_secs(1 << 30));
        let _waiting = e.waiters.enter();
        loop {
            let seen = e.waiters.generation();
            e.check_open()?;
            let entry = self.lookup(user, key).await?;
            match e.wait_answer(entry, user, key, fingerprint)? {
                WaitAnswer::Done(answer) => return Ok(answer),
                WaitAnswer::Again => continue,
                WaitAnswer::InFlight => {}
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            Change::new(&e.waiters, seen, deadline).await;
        }
    }

    /// [`Engine::lookup`] as a future: the live entry of `(user, key)`, once
    /// the state it shows is durable.
    async fn lookup(&self, user: &[u8], key: &[u8]) -> Result<Option<crate::index::Entry>> {
        let e = &*self.engine;
        loop {
            let (entry, pos) = e.lookup_step(user, key)?;
            if e.log.is_durable_enough(pos) {
                return Ok(entry);
            }
            e.log.durable(pos).await?;
        }
    }

    /// [`Engine::run_once`] for async work: begins with the fingerprint of
    /// `request`; if this caller owns the key, awaits `work(ctx)`, stores
    /// its outcome (or a [`WorkError::Final`] outcome; an outcome too large
    /// to keep is stored with its status and [`BODY_NOT_KEPT`](crate::BODY_NOT_KEPT)) or releases
    /// the key on a [`WorkError::Retryable`] error; a key completed before
    /// returns the stored outcome without running `work`.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use idemkv::{AsyncEngine, Engine, Options, Outcome, WorkError};
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let engine = AsyncEngine::new(Arc::new(Engine::open(dir.path(), Options::default()).unwrap()));
    /// let charge = |ctx: idemkv::AsyncRunContext| async move {
    ///     let _token = ctx.token(); // pass it downstream for fencing
    ///     Ok::<_, WorkError<std::io::Error>>(Outcome { status: 201, body: "ch_1".into() })
    /// };
    /// futures::executor::block_on(async {
    ///     let first = engine.run_once("user", "order-1", b"amount=10", charge).await.unwrap();
    ///     let retry = engine.run_once("user", "order-1", b"amount=10", charge).await.unwrap();
    ///     assert!(!first.replayed && retry.replayed);
    /// });
    /// ```
    ///
    /// Cancellation: dropped before the key is claimed, nothing happened (a
    /// lease granted but not handed to `work` is released); dropped while
    /// `work` runs or its outcome is stored, the work may have had effects,
    /// so the key stays claimed until its lease expires (as after a panic).
    ///
    /// # Errors
    /// As [`Engine::run_once`].
    pub async fn run_once<E, F, Fut>(
        &self,
        user: impl AsRef<[u8]>,
        key: impl AsRef<[u8]>,
        request: &[u8],
        work: F,
    ) -> std::result::Result<Done, RunError<E>>
    where
        F: FnOnce(AsyncRunContext) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<Outcome, WorkError<E>>>,
    {
        self.run_once_with(user, key, request, RunOptions::default(), work)
            .await
    }

    /// [`AsyncEngine::run_once`] with a heartbeat for long work and a wait
    /// for in-flight keys, as [`Engine::run_once_with`]: with
    /// `options.heartbeat`, the engine's heartbeat thread extends the lease
    /// while `work` runs (no task is spawned; see [`Engine::heartbeat`]);
    /// with `options.wait`, a key in flight is waited for (holding no
    /// thread, as [`AsyncEngine::begin_wait`]) before answering
    /// [`RunError::InFlight`].
    ///
    /// ```
    /// # use std::{sync::Arc, time::Duration};
    /// # use idemkv::{AsyncEngine, Engine, Options, Outcome, RunOptions, WorkError};
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let engine = AsyncEngine::new(Arc::new(Engine::open(dir.path(), Options::default()).unwrap()));
    /// let options = RunOptions { heartbeat: Some(Duration::from_secs(10)), ..RunOptions::default() };
    /// let report = |_ctx: idemkv::AsyncRunContext| async move {
    ///     // ... work that may outlast `lease_ttl` ...
    ///     Ok::<_, WorkError<std::io::Error>>(Outcome { status: 200, body: "report".into() })
    /// };
    /// let done = futures::executor::block_on(engine.run_once_with("user", "report-1", b"q", options, report));
    /// assert!(!done.unwrap().replayed);
    /// ```
    ///
    /// Cancellation: as [`AsyncEngine::run_once`]; dropped while `work`
    /// runs, the heartbeat stops with it and the lease is left to expire.
    ///
    /// # Errors
    /// As [`Engine::run_once`].
    pub async fn run_once_with<E, F, Fut>(
        &self,
        user: impl AsRef<[u8]>,
        key: impl AsRef<[u8]>,
        request: &[u8],
        options: RunOptions,
        work: F,
    ) -> std::result::Result<Done, RunError<E>>
    where
        F: FnOnce(AsyncRunContext) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<Outcome, WorkError<E>>>,
    {
        let fingerprint = Fingerprint::of(request);
        let (answer, waited) = if options.wait.is_zero() {
            (self.begin(user, key, fingerprint).await?, false)
        } else {
            self.begin_waited(user, key, fingerprint, options.wait)
                .await?
        };
        let lease = match lease_or_done(answer) {
            Ok(lease) => lease,
            Err(done) => return options.replayed(done, waited),
        };
        // Held across the work's awaits; dropped (the heartbeat stopped)
        // before the outcome is stored, or with this future.
        let heartbeat = options
            .heartbeat
            .map(|every| self.engine.heartbeat(&lease, every));
        let result = work(AsyncRunContext {
            lease: lease.clone(),
        })
        .await;
        drop(heartbeat);
        match result {
            Ok(outcome) => {
                self.store(&lease, &outcome).await?;
                Ok(Done {
                    outcome,
                    replayed: false,
                })
            }
            Err(WorkError::Final(error, outcome)) => {
                self.store(&lease, &outcome).await?;
                Err(RunError::Work {
                    error,
                    stored: true,
                })
            }
            Err(WorkError::Retryable(error)) => {
                self.release(&lease).await?;
                Err(RunError::Work {
                    error,
                    stored: false,
                })
            }
        }
    }

    /// Completes `lease` with `outcome`, or with its status and
    /// [`BODY_NOT_KEPT`](crate::BODY_NOT_KEPT) if the body is too large to keep.
    async fn store(&self, lease: &Lease, outcome: &Outcome) -> Result<()> {
        match self.complete(lease, outcome.clone()).await {
            Err(crate::Error::ResponseTooLarge { max, .. }) => {
                self.complete(lease, not_kept(outcome.status, max)).await
            }
            other => other,
        }
    }
}

/// What async work run by [`AsyncEngine::run_once`] gets of its claim: an
/// owned value, so the work's future can keep it across awaits.
#[derive(Clone, Debug)]
pub struct AsyncRunContext {
    lease: Lease,
}

impl AsyncRunContext {
    /// The fencing token of this run: pass it to downstream systems so they
    /// can refuse a late write from an older run of the same key.
    pub fn token(&self) -> u64 {
        self.lease.token()
    }

    /// The lease this run holds.
    pub fn lease(&self) -> &Lease {
        &self.lease
    }
}
