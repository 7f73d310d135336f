//! The public API: [`Engine`]. This file opens and closes an engine and
//! runs `begin`; `owner.rs` holds the lease owner's calls, `read.rs` the
//! reading calls, `inspect.rs` the operator's views.

mod asynch;
mod backup;
mod ingest;
mod inspect;
mod owner;
mod read;

pub use asynch::{AsyncEngine, AsyncRunContext};
pub use backup::BackupReport;
pub(crate) use owner::Beat;

pub use inspect::{Inspection, RecordDump, SegmentInfo, VerifyReport, verify, verify_storage};

use read::Found;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;

use crate::clock::{EngineClock, millis};
use crate::compact::{Background, CompactionReport, Compactor};
use crate::error::{Error, KeyPart, KeyProblem, Result};
use crate::heartbeat::Heartbeats;
use crate::index::{Entry, Index, KeyId, MAX_DEADLINE_MS};
use crate::log::record::{Kind, Record};
use crate::log::{Chore, Log};
use crate::metrics::{Op, Published};
use crate::notify::Waiters;
use crate::options::Options;
use crate::outcome::{Begin, Fingerprint, Lease, RecordState};
use crate::recovery;
use crate::state::{self, BeginStep, LiveAnswer};
use crate::stats::{Counters, Stats, bump};
use crate::storage::{FsStorage, Storage};

/// How many leases one `begin` may see expire while their records were made
/// durable before it answers `InFlight` (see `Engine::outlived`).
const MAX_OUTLIVED: u32 = 4;

/// An idempotency store on one data directory. `Send + Sync`: share it with
/// an `Arc`; every method takes `&self`.
///
/// Dropping the engine (or [`Engine::close`]) syncs the log and releases the
/// directory lock, so the directory can be reopened at once.
#[derive(Debug)]
pub struct Engine {
    options: Options,
    clock: Arc<EngineClock>,
    /// A number that tells this open of this engine from every other:
    /// leases carry it, and owner calls refuse a lease without it.
    instance: u64,
    index: Arc<Index>,
    log: Arc<Log>,
    compactor: Arc<Compactor>,
    background: Option<Background>,
    storage: Arc<dyn Storage>,
    counters: Arc<Counters>,
    waiters: Arc<Waiters>,
    /// The leases the heartbeat thread keeps alive (`heartbeat.rs`).
    heartbeats: Arc<Heartbeats>,
    /// What the engine last published to the `metrics` recorder.
    published: Arc<Published>,
    closed: AtomicBool,
}

impl Engine {
    /// Opens (creating if needed) the data directory `dir`, takes its lock
    /// and recovers the records in it.
    ///
    /// # Errors
    /// [`Error::InvalidOptions`]; [`Error::Locked`] if another engine holds
    /// `dir`; [`Error::Corrupt`] naming the file and offset of damage that
    /// is not a torn tail ([`salvage`](crate::salvage) is the way back);
    /// [`Error::SalvagePending`] if a salvage of `dir` was interrupted after
    /// its commit point; [`Error::Io`] if the files cannot be read.
    pub fn open(dir: impl AsRef<std::path::Path>, options: Options) -> Result<Engine> {
        options.validate()?;
        let storage: Arc<dyn Storage> = Arc::new(FsStorage::open(dir)?);
        Engine::open_with_storage(storage, options)
    }

    /// Opens an engine on any [`Storage`], such as a simulated disk.
    ///
    /// # Errors
    /// As [`Engine::open`], except for the directory lock, which belongs to
    /// the storage.
    pub fn open_with_storage(storage: Arc<dyn Storage>, options: Options) -> Result<Engine> {
        Engine::open_as(storage, options, instance_id())
    }

    /// [`Engine::open_with_storage`] with a chosen instance number: the
    /// copies of one cluster partition share one, so that a lease granted by
    /// one owner stays valid (by its token) under the next.
    pub(crate) fn open_as(
        storage: Arc<dyn Storage>,
        options: Options,
        instance: u64,
    ) -> Result<Engine> {
        options.validate()?;
        let counters = Arc::new(Counters::default());
        let index = Arc::new(Index::new(options.shards));
        let clock = Arc::new(EngineClock::new(Arc::clone(&options.clock)));
        let recovering = std::time::Instant::now();
        let log = match recovery::recover(
            Arc::clone(&storage),
            &options,
            &clock,
            Arc::clone(&counters),
            &index,
        ) {
            Ok(log) => log,
            Err(e) => {
                storage.close();
                return Err(e);
            }
        };
        counters
            .histograms
            .recovery(recovering.elapsed().as_secs_f64());
        let compactor = Arc::new(Compactor::new(
            Arc::clone(&log),
            Arc::clone(&index),
            Arc::clone(&clock),
            Arc::clone(&counters),
            options.compaction_threshold,
        ));
        let published: Arc<Published> = Arc::default();
        let background = options.background.then(|| {
            Background::start(
                Arc::clone(&compactor),
                options.sweep_interval,
                Arc::clone(&published),
            )
        });
        Ok(Engine {
            clock,
            instance,
            options,
            index,
            log,
            compactor,
            background,
            storage,
            counters,
            waiters: Arc::default(),
            heartbeats: Arc::default(),
            published,
            closed: AtomicBool::new(false),
        })
    }

    /// Claims `(user, key)` for a request with fingerprint `fingerprint`.
    ///
    /// Returns [`Begin::Started`] with a lease when the key is absent or
    /// expired, [`Begin::Replay`] with the stored outcome when it was
    /// completed for the same fingerprint, [`Begin::InFlight`] while another
    /// live lease holds it, and [`Begin::Mismatch`] when a live record has
    /// another fingerprint. Under `Durability::Sync`, `Started` is returned
    /// only once the lease is on disk, and no answer reflects a state that
    /// is not yet on disk.
    ///
    /// # Errors
    /// [`Error::InvalidKey`] for a bad user id or key (nothing changes);
    /// [`Error::Closed`]; [`Error::Poisoned`], [`Error::Io`] or
    /// [`Error::NoSpace`] if the log cannot be written; for a replay of a
    /// sealed body, as [`Engine::outcome`] ([`Error::MissingKey`], or
    /// [`Error::Corrupt`] if it fails authentication).
    pub fn begin(
        &self,
        user: impl AsRef<[u8]>,
        key: impl AsRef<[u8]>,
        fingerprint: Fingerprint,
    ) -> Result<Begin> {
        let _timer = self.counters.histograms.time(Op::Begin);
        let (user, key) = (user.as_ref(), key.as_ref());
        self.check_open()?;
        self.validate(user, key)?;
        bump(&self.counters.begins);
        let mut now = self.clock.now()?;
        let mut foreign = None;
        let mut outlived = 0;
        loop {
            match self.begin_step(user, key, fingerprint, now, &mut foreign)? {
                BeginStep2::Started(lease, pos, count) => {
                    let waited = !self.log.is_durable_enough(pos);
                    self.log.wait_durable(pos)?;
                    if let Some(answer) = self.outlived(&lease, waited, &mut now, &mut outlived)? {
                        match answer {
                            Some(answer) => return Ok(answer),
                            None => continue,
                        }
                    }
                    self.count_started(count);
                    return Ok(Begin::Started(lease));
                }
                BeginStep2::Answer(answer) => return Ok(answer),
                BeginStep2::NotDurable(pos) => {
                    self.log.wait_durable(pos)?;
                    now = self.clock.now()?;
                }
                BeginStep2::Chore(chore) => self.log.chore(chore)?,
                BeginStep2::Again => {}
            }
        }
    }

    /// One try of `begin` that never waits for a sync: grants a lease (its
    /// record appended, durable once `pos` is), answers from a live record
    /// that is durable, or says which position must become durable first.
    /// May block briefly on a segment roll or a token reservation (an
    /// fdatasync once per segment or per 2^20 leases).
    pub(crate) fn begin_step(
        &self,
        user: &[u8],
        key: &[u8],
        fingerprint: Fingerprint,
        now: crate::clock::Now,
        foreign: &mut Option<u64>,
    ) -> Result<BeginStep2> {
        let id = KeyId::new(user, key);
        // `foreign`: the position of an entry found to belong to another key
        // with the same digest; it counts as absent for this key.
        let mut shard = self.index.shard(&id).lock();
        let current = shard
            .get(&id, user, key)
            .filter(|e| Some(e.pos) != *foreign);
        let entry = match state::begin_step(current, now) {
            BeginStep::Live(entry) => entry,
            BeginStep::Start { expired, takeover } => {
                let Some(token) = self.log.next_token()? else {
                    // The reserved tokens are used up: the caller reserves
                    // more (an fsync) without holding the shard lock.
                    drop(shard);
                    return Ok(BeginStep2::Chore(Chore::Tokens));
                };
                let deadline_ms = deadline(now.lease, self.options.lease_ttl);
                let record = Record {
                    kind: Kind::Begin,
                    token,
                    deadline_ms,
                    time_ms: now.wall,
                    lease_ms: deadline_ms,
                    fingerprint: fingerprint.0,
                    user,
                    key,
                    status: 0,
                    body: b"",
                    seal: None,
                };
                let Some(pos) = self.log.append(&record)? else {
                    drop(shard);
                    return Ok(BeginStep2::Chore(Chore::Room(record.encoded_len())));
                };
                let entry = Entry {
                    token,
                    deadline_ms,
                    pos,
                    status: 0,
                    state: RecordState::InProgress,
                };
                shard.start(&id, user, key, entry, now);
                drop(shard);
                let lease = Lease {
                    engine: self.instance,
                    user: Bytes::copy_from_slice(user),
                    key: Bytes::copy_from_slice(key),
                    fingerprint,
                    token,
                    expires_at_ms: deadline_ms,
                };
                return Ok(BeginStep2::Started(
                    lease,
                    pos,
                    StartedCount { expired, takeover },
                ));
            }
        };
        drop(shard);
        if !self.log.is_durable_enough(entry.pos) {
            return Ok(BeginStep2::NotDurable(entry.pos));
        }
        let record = match self.read_record(&entry, user, key)? {
            Found::Own(record) => record,
            Found::Foreign => {
                *foreign = Some(entry.pos);
                return Ok(BeginStep2::Again);
            }
            Found::Moved => return Ok(BeginStep2::Again),
        };
        let same = record.fingerprint == fingerprint.0;
        Ok(BeginStep2::Answer(
            match state::live_answer(&entry, same, now) {
                LiveAnswer::Replay => {
                    let outcome = self.log.outcome(record, entry.pos)?;
                    bump(&self.counters.replays);
                    Begin::Replay(outcome)
                }
                LiveAnswer::InFlight { retry_after } => {
                    bump(&self.counters.in_flight);
                    Begin::InFlight { retry_after }
                }
                LiveAnswer::Mismatch => {
                    bump(&self.counters.mismatches);
                    Begin::Mismatch
                }
            },
        ))
    }

    /// A snapshot of the engine's counters.
    pub fn stats(&self) -> Stats {
        self.compactor.stats()
    }

    /// Publishes the engine's counters and gauges to the recorder of the
    /// [`metrics`](https://docs.rs/metrics) facade: each counter grows by
    /// what it grew since the last publish, each gauge moves by what its
    /// value changed (so several engines in one process add up). See
    /// [`crate::metrics`] for the names. The background thread calls this
    /// every second and `close` a last time; call it before rendering a
    /// scrape for exact numbers. Needs the `metrics` feature. Works after
    /// `close` too (it then publishes nothing new).
    #[cfg(feature = "metrics")]
    pub fn publish_metrics(&self) {
        if !self.closed.load(Ordering::SeqCst) {
            self.published.publish(&self.stats());
        }
    }

    /// Runs a full sweep and compaction now: drops every expired record from
    /// memory, rolls the active segment if it holds records, and rewrites
    /// every segment that holds a dead record, keeping only live records
    /// (and, for at most a lease's lifetime, the records that ended a
    /// lease). When it returns, the files it made dead are deleted.
    /// Foreground calls keep running meanwhile.
    ///
    /// # Errors
    /// [`Error::Closed`]; [`Error::Io`] or [`Error::NoSpace`] if a file
    /// cannot be written (every file is then as it was, or replaced by its
    /// complete rewrite); [`Error::Poisoned`].
    pub fn compact(&self) -> Result<CompactionReport> {
        self.check_open()?;
        self.compactor.run(true, None)
    }

    /// Runs one pass like the background thread's, now: sweeps expired
    /// records from memory and rewrites the closed segments whose live
    /// fraction is below `threshold` (0.0 to 1.0; `Options::compaction_threshold`
    /// is the background's), leaving the active segment alone.
    ///
    /// # Errors
    /// [`Error::InvalidOptions`] for a threshold outside 0.0 to 1.0;
    /// otherwise as [`Engine::compact`].
    pub fn compact_below(&self, threshold: f64) -> Result<CompactionReport> {
        self.check_open()?;
        if !(0.0..=1.0).contains(&threshold) {
            return Err(Error::InvalidOptions {
                field: "threshold",
                problem: "must be 0.0 to 1.0",
            });
        }
        self.compactor.run(false, Some(threshold))
    }

    /// Syncs the log, stops background work (heartbeats included), waits for a `compact` running
    /// on another thread (it stops at its next segment, leaving every file
    /// as it was or replaced by its complete rewrite) and releases the
    /// directory lock. Once it returns, no call that started before it
    /// touches the directory, so the directory can be reopened at once.
    /// Later calls fail with [`Error::Closed`]. Closing twice is fine.
    ///
    /// # Errors
    /// The final sync's error ([`Error::Io`]), or [`Error::Poisoned`]; the
    /// lock is released either way. [`Error::Reentrant`] (and the engine
    /// stays open) when called from inside a `for_each_record` callback.
    pub fn close(&self) -> Result<()> {
        if self.compactor.held_here() && !self.closed.load(Ordering::SeqCst) {
            return Err(Error::Reentrant { call: "close" });
        }
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        // No extend runs once this returns (an extend under way ends
        // first), and every heartbeat handle reports it stopped.
        self.heartbeats.stop();
        // A pass under way (background or another thread's compact) stops
        // at its next segment rather than finishing.
        self.compactor.request_stop();
        if let Some(background) = &self.background {
            background.stop();
        }
        // Wait for a compaction another thread runs (it stops at its next
        // segment) and refuse later ones: after close returns, nothing this
        // engine started renames or removes a file in the directory.
        self.compactor.shut();
        let result = self.log.close();
        // The last counts, then this engine's gauges out of the sums.
        self.published.publish(&self.compactor.stats());
        self.published.withdraw();
        self.log.release_files();
        self.storage.close();
        self.waiters.notify();
        self.waiters.stop();
        result
    }

    /// A lease granted by `begin` that expired while its record was made
    /// durable (a sync slower than the lease TTL: a stalled disk, a
    /// replicated log waiting for its quorum) is never handed out: another
    /// `begin` may already have taken the key over, and its holder could do
    /// no work within it anyway. `waited`: whether the caller waited for the
    /// record to be made durable; only then is `now` read again (a lease
    /// granted without a wait is as fresh as `now`). `None`: the lease is
    /// live, hand it out. `Some(None)`: look again (the key's record is as
    /// the log has it now). `Some(Some(answer))`: after [`MAX_OUTLIVED`]
    /// such leases, answer `InFlight` (retry after zero): this store cannot
    /// make a claim durable within a lease now.
    ///
    /// # Errors
    /// The clock out of range, as `begin`.
    pub(crate) fn outlived(
        &self,
        lease: &Lease,
        waited: bool,
        now: &mut crate::clock::Now,
        tries: &mut u32,
    ) -> Result<Option<Option<Begin>>> {
        if !waited {
            return Ok(None);
        }
        *now = self.clock.now()?;
        if now.lease < lease.expires_at_ms {
            return Ok(None);
        }
        *tries += 1;
        if *tries >= MAX_OUTLIVED {
            bump(&self.counters.in_flight);
            return Ok(Some(Some(Begin::InFlight {
                retry_after: Duration::ZERO,
            })));
        }
        Ok(Some(None))
    }

    /// Counts a `Started` answer, once its lease is acknowledged.
    pub(crate) fn count_started(&self, count: StartedCount) {
        bump(&self.counters.started);
        if count.expired {
            bump(&self.counters.expirations);
        }
        if count.takeover {
            bump(&self.counters.takeovers);
        }
    }

    /// The lease TTL this engine grants.
    pub(crate) fn lease_ttl(&self) -> Duration {
        self.options.lease_ttl
    }

    /// Fails once the engine is closed; and, without `Durability::Sync`,
    /// once a failed write or sync poisoned the log: the index may then show
    /// acknowledged states that never reached the disk (and the active
    /// segment was cut back to what was synced), so every call, reads
    /// included, answers [`Error::Poisoned`] until the engine is reopened.
    /// Under `Sync` every state the index shows is durable or waited for
    /// (which then fails with `Poisoned`), so reads of durable records keep
    /// being served and only writes are refused.
    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        if self.options.durability != crate::options::Durability::Sync {
            self.log.check_poison()?;
        }
        Ok(())
    }

    /// Checks a user id and key against the options.
    fn validate(&self, user: &[u8], key: &[u8]) -> Result<()> {
        let bad = |part, problem| Err(Error::InvalidKey { part, problem });
        if user.len() > self.options.max_user_len {
            return bad(
                KeyPart::User,
                KeyProblem::TooLong {
                    len: user.len(),
                    max: self.options.max_user_len,
                },
            );
        }
        if key.is_empty() {
            return bad(KeyPart::Key, KeyProblem::Empty);
        }
        if key.len() > self.options.max_key_len {
            return bad(
                KeyPart::Key,
                KeyProblem::TooLong {
                    len: key.len(),
                    max: self.options.max_key_len,
                },
            );
        }
        // A fold over a plain range check (no early exit) compiles to a
        // vector loop; the byte-by-byte search runs only to report a bad
        // key.
        if self.options.ascii_keys
            && key
                .iter()
                .fold(false, |bad, b| bad | (b.wrapping_sub(0x21) >= 0x5e))
            && let Some((index, &byte)) =
                key.iter().enumerate().find(|(_, b)| !b.is_ascii_graphic())
        {
            return bad(KeyPart::Key, KeyProblem::BadByte { index, byte });
        }
        Ok(())
    }
}

/// A number for one open of one engine: random (std's per-process hash
/// keys) mixed with a process-wide counter, so that no two opens share it.
fn instance_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static OPENS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(OPENS.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    h.finish()
}

/// What one try of `begin` did (see [`Engine::begin_step`]).
pub(crate) enum BeginStep2 {
    /// A lease was granted; it is acknowledged once `pos` is durable, and
    /// counted (with what it replaced) only then.
    Started(Lease, u64, StartedCount),
    /// The answer, from a live record that is durable.
    Answer(Begin),
    /// The live record's state is not durable yet: wait for `pos`, then try
    /// again.
    NotDurable(u64),
    /// Run this chore (a roll or a token reservation: an fsync, so not
    /// under a shard lock, and for a future not on its executor's thread),
    /// then try again.
    Chore(Chore),
    /// Try again (a moved or colliding record).
    Again,
}

/// What a granted lease replaced, for the counters.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StartedCount {
    /// An expired record or lease was there.
    expired: bool,
    /// The expired thing was a lease.
    takeover: bool,
}

/// `now + by` in ms, clamped to the latest deadline an entry can hold.
fn deadline(now_ms: u64, by: Duration) -> u64 {
    now_ms.saturating_add(millis(by)).min(MAX_DEADLINE_MS)
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.close();
    }
}
