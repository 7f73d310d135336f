//! The public API: [`Engine`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::clock::{Clock, millis};
use crate::compact::{Background, CompactionReport, Compactor};
use crate::error::{CorruptKind, Error, KeyPart, KeyProblem, Result};
use crate::index::{Entry, Index, KeyId, MAX_DEADLINE_MS};
use crate::log::record::{Kind, Record};
use crate::log::{Log, ReadRecord};
use crate::notify::Waiters;
use crate::options::Options;
use crate::outcome::{Begin, Fingerprint, Lease, Outcome, RecordState, RecordView};
use crate::recovery;
use crate::state::{self, BeginStep, LiveAnswer};
use crate::stats::{Counters, Stats, bump};
use crate::storage::{FsStorage, Storage};

/// How often `wait` looks again at a lease whose expiry only the engine's
/// clock can tell.
const WAIT_POLL: Duration = Duration::from_millis(10);

/// An idempotency store on one data directory. `Send + Sync`: share it with
/// an `Arc`; every method takes `&self`.
///
/// Dropping the engine (or [`Engine::close`]) syncs the log and releases the
/// directory lock, so the directory can be reopened at once.
#[derive(Debug)]
pub struct Engine {
    options: Options,
    clock: Arc<dyn Clock>,
    index: Arc<Index>,
    log: Arc<Log>,
    compactor: Arc<Compactor>,
    background: Option<Background>,
    storage: Arc<dyn Storage>,
    counters: Arc<Counters>,
    waiters: Waiters,
    closed: AtomicBool,
}

impl Engine {
    /// Opens (creating if needed) the data directory `dir`, takes its lock
    /// and recovers the records in it.
    ///
    /// # Errors
    /// [`Error::InvalidOptions`]; [`Error::Locked`] if another engine holds
    /// `dir`; [`Error::Corrupt`] naming the file and offset of damage that
    /// is not a torn tail; [`Error::Io`] if the files cannot be read.
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
        options.validate()?;
        let counters = Arc::new(Counters::default());
        let index = Arc::new(Index::new(options.shards));
        let log = match recovery::recover(
            Arc::clone(&storage),
            &options,
            Arc::clone(&counters),
            &index,
        ) {
            Ok(log) => log,
            Err(e) => {
                storage.close();
                return Err(e);
            }
        };
        let compactor = Arc::new(Compactor::new(
            Arc::clone(&log),
            Arc::clone(&index),
            Arc::clone(&options.clock),
            Arc::clone(&counters),
            options.compaction_threshold,
        ));
        let background = options
            .background
            .then(|| Background::start(Arc::clone(&compactor), options.sweep_interval));
        Ok(Engine {
            clock: Arc::clone(&options.clock),
            options,
            index,
            log,
            compactor,
            background,
            storage,
            counters,
            waiters: Waiters::default(),
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
    /// [`Error::NoSpace`] if the log cannot be written.
    pub fn begin(
        &self,
        user: impl AsRef<[u8]>,
        key: impl AsRef<[u8]>,
        fingerprint: Fingerprint,
    ) -> Result<Begin> {
        let (user, key) = (user.as_ref(), key.as_ref());
        self.check_open()?;
        self.validate(user, key)?;
        bump(&self.counters.begins);
        let id = KeyId::new(user, key);
        let now = self.clock.now_ms();
        // The position of an entry found to belong to another key with the
        // same digest: it counts as absent for this key.
        let mut foreign = None;
        loop {
            let mut shard = self.index.shard(&id).lock();
            let current = shard.get(&id, user, key).filter(|e| Some(e.pos) != foreign);
            let entry = match state::begin_step(current, now) {
                BeginStep::Live(entry) => entry,
                BeginStep::Start { expired, takeover } => {
                    let token = self.log.next_token()?;
                    let deadline_ms = deadline(now, self.options.lease_ttl);
                    let record = Record {
                        kind: Kind::Begin,
                        token,
                        deadline_ms,
                        time_ms: now,
                        lease_ms: deadline_ms,
                        fingerprint: fingerprint.0,
                        user,
                        key,
                        status: 0,
                        body: b"",
                    };
                    let Some(pos) = self.log.append(&record)? else {
                        drop(shard);
                        self.log.make_room(record.encoded_len())?;
                        continue;
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
                    self.log.wait_durable(pos)?;
                    bump(&self.counters.started);
                    if expired {
                        bump(&self.counters.expirations);
                    }
                    if takeover {
                        bump(&self.counters.takeovers);
                    }
                    return Ok(Begin::Started(Lease {
                        user: Bytes::copy_from_slice(user),
                        key: Bytes::copy_from_slice(key),
                        fingerprint,
                        token,
                        expires_at_ms: deadline_ms,
                    }));
                }
            };
            drop(shard);
            let record = match self.read_record(&entry, user, key)? {
                Found::Own(record) => record,
                Found::Foreign => {
                    foreign = Some(entry.pos);
                    continue;
                }
                Found::Moved => continue,
            };
            let same = record.fingerprint == fingerprint.0;
            return Ok(match state::live_answer(&entry, same, now) {
                LiveAnswer::Replay => {
                    bump(&self.counters.replays);
                    Begin::Replay(Outcome {
                        status: record.status,
                        body: record.body,
                    })
                }
                LiveAnswer::InFlight { retry_after } => {
                    bump(&self.counters.in_flight);
                    Begin::InFlight { retry_after }
                }
                LiveAnswer::Mismatch => {
                    bump(&self.counters.mismatches);
                    Begin::Mismatch
                }
            });
        }
    }

    /// Stores `outcome` for the lease's key, with the default `record_ttl`:
    /// later `begin`s with the same fingerprint replay it.
    ///
    /// # Errors
    /// [`Error::ResponseTooLarge`] (nothing changes; the lease can still
    /// complete); [`Error::LeaseLost`] if the lease expired, was released or
    /// taken over; [`Error::Closed`], [`Error::Poisoned`], [`Error::Io`].
    pub fn complete(&self, lease: &Lease, outcome: Outcome) -> Result<()> {
        self.complete_with_ttl(lease, outcome, self.options.record_ttl)
    }

    /// [`Engine::complete`] with a record TTL for this record only.
    ///
    /// # Errors
    /// As [`Engine::complete`].
    pub fn complete_with_ttl(&self, lease: &Lease, outcome: Outcome, ttl: Duration) -> Result<()> {
        self.check_open()?;
        if outcome.body.len() > self.options.max_response_len {
            return Err(Error::ResponseTooLarge {
                len: outcome.body.len(),
                max: self.options.max_response_len,
            });
        }
        let now = self.clock.now_ms();
        let deadline_ms = deadline(now, ttl);
        let pos = self.owner_write(lease, now, Kind::Complete, deadline_ms, &outcome)?;
        bump(&self.counters.completions);
        self.waiters.notify();
        self.log.wait_durable(pos)
    }

    /// Gives up the lease's key: the record is forgotten, so a retry can
    /// start the work again (use it for retryable failures, such as a 5xx).
    ///
    /// # Errors
    /// [`Error::LeaseLost`] if the lease no longer owns the key;
    /// [`Error::Closed`], [`Error::Poisoned`], [`Error::Io`].
    pub fn release(&self, lease: &Lease) -> Result<()> {
        self.check_open()?;
        let now = self.clock.now_ms();
        let none = Outcome {
            status: 0,
            body: Bytes::new(),
        };
        let pos = self.owner_write(lease, now, Kind::Release, 0, &none)?;
        bump(&self.counters.releases);
        self.waiters.notify();
        self.log.wait_durable(pos)
    }

    /// Heartbeat: moves the lease's deadline to now + `by` and returns the
    /// updated lease (same token).
    ///
    /// # Errors
    /// [`Error::LeaseLost`] if the lease already expired or was taken over;
    /// [`Error::Closed`], [`Error::Poisoned`], [`Error::Io`].
    pub fn extend(&self, lease: &Lease, by: Duration) -> Result<Lease> {
        self.check_open()?;
        let now = self.clock.now_ms();
        let deadline_ms = deadline(now, by);
        let none = Outcome {
            status: 0,
            body: Bytes::new(),
        };
        let pos = self.owner_write(lease, now, Kind::Extend, deadline_ms, &none)?;
        self.log.wait_durable(pos)?;
        Ok(Lease {
            expires_at_ms: deadline_ms,
            ..lease.clone()
        })
    }

    /// Looks at a record without touching the disk: its state, token,
    /// deadlines and status. `None` if absent or expired.
    ///
    /// # Errors
    /// [`Error::InvalidKey`]; [`Error::Closed`].
    pub fn get(&self, user: impl AsRef<[u8]>, key: impl AsRef<[u8]>) -> Result<Option<RecordView>> {
        let (user, key) = (user.as_ref(), key.as_ref());
        self.check_open()?;
        self.validate(user, key)?;
        Ok(self.lookup(user, key)?.map(|e| e.view()))
    }

    /// Loads the stored outcome of a completed, live record (reads the body
    /// from the log). `None` if the record is absent, expired or in progress.
    ///
    /// # Errors
    /// [`Error::InvalidKey`]; [`Error::Closed`]; [`Error::Io`] or
    /// [`Error::Corrupt`] if the body cannot be read back.
    pub fn outcome(
        &self,
        user: impl AsRef<[u8]>,
        key: impl AsRef<[u8]>,
    ) -> Result<Option<Outcome>> {
        let (user, key) = (user.as_ref(), key.as_ref());
        self.check_open()?;
        self.validate(user, key)?;
        loop {
            return match self.lookup(user, key)? {
                Some(e) if e.state == RecordState::Completed => {
                    match self.read_record(&e, user, key)? {
                        Found::Own(record) => Ok(Some(Outcome {
                            status: record.status,
                            body: record.body,
                        })),
                        Found::Foreign => Ok(None),
                        Found::Moved => continue,
                    }
                }
                _ => Ok(None),
            };
        }
    }

    /// Blocks until the record of `(user, key)` is completed (returns its
    /// outcome), released or expired (returns `None`), or `timeout` of wall
    /// time passes (returns `None`). The timeout does not follow the
    /// engine's clock. Returns at once if the record is absent or completed.
    ///
    /// # Errors
    /// [`Error::InvalidKey`]; [`Error::Closed`] (also if the engine is
    /// closed while waiting); [`Error::Io`] or [`Error::Corrupt`].
    pub fn wait(
        &self,
        user: impl AsRef<[u8]>,
        key: impl AsRef<[u8]>,
        timeout: Duration,
    ) -> Result<Option<Outcome>> {
        let (user, key) = (user.as_ref(), key.as_ref());
        self.check_open()?;
        self.validate(user, key)?;
        let start = Instant::now();
        let _waiting = self.waiters.enter();
        loop {
            let seen = self.waiters.generation();
            self.check_open()?;
            match self.lookup(user, key)? {
                None => return Ok(None),
                Some(e) if e.state == RecordState::Completed => {
                    match self.read_record(&e, user, key)? {
                        Found::Own(record) => {
                            return Ok(Some(Outcome {
                                status: record.status,
                                body: record.body,
                            }));
                        }
                        Found::Foreign => return Ok(None),
                        Found::Moved => continue,
                    }
                }
                Some(_) => {
                    let left = timeout.saturating_sub(start.elapsed());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    self.waiters.wait(seen, left.min(WAIT_POLL));
                }
            }
        }
    }

    /// A snapshot of the engine's counters.
    pub fn stats(&self) -> Stats {
        let mut stats = self.counters.snapshot();
        stats.live_records = self.index.len() as u64;
        stats.segments = self.log.segment_count() as u64;
        stats.disk_bytes = self.log.disk_bytes();
        stats
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
        self.compactor.run(true)
    }

    /// One background pass (only segments below the threshold), for tests.
    #[cfg(test)]
    pub(crate) fn compact_below_threshold(&self) -> Result<CompactionReport> {
        self.compactor.run(false)
    }

    /// Syncs the log, stops background work and releases the directory
    /// lock. Later calls fail with [`Error::Closed`]. Closing twice is fine.
    ///
    /// # Errors
    /// The final sync's error ([`Error::Io`]), or [`Error::Poisoned`]; the
    /// lock is released either way.
    pub fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        if let Some(background) = &self.background {
            background.stop();
        }
        let result = self.log.close();
        self.storage.close();
        self.waiters.notify();
        result
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            Err(Error::Closed)
        } else {
            Ok(())
        }
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
        if self.options.ascii_keys
            && let Some((index, &byte)) =
                key.iter().enumerate().find(|(_, b)| !b.is_ascii_graphic())
        {
            return bad(KeyPart::Key, KeyProblem::BadByte { index, byte });
        }
        Ok(())
    }

    /// The live entry of `(user, key)`, once the state it shows is durable.
    fn lookup(&self, user: &[u8], key: &[u8]) -> Result<Option<Entry>> {
        let id = KeyId::new(user, key);
        let now = self.clock.now_ms();
        let (entry, pos) = {
            let shard = self.index.shard(&id).lock();
            match shard.get(&id, user, key) {
                Some(e) if e.is_live(now) => (Some(e), e.pos),
                _ => (None, shard.removed_pos()),
            }
        };
        self.log.wait_durable(pos)?;
        Ok(entry)
    }

    /// Reads the record an entry points at, once durable, and tells whether
    /// it is this key's.
    fn read_record(&self, entry: &Entry, user: &[u8], key: &[u8]) -> Result<Found> {
        self.log.wait_durable(entry.pos)?;
        let record = match self.log.read(entry.pos) {
            Ok(record) => record,
            // Compaction moved the record and retired its segment since the
            // entry was read: look again, unless the entry still points
            // there (then the segment is truly missing).
            Err(
                e @ Error::Corrupt {
                    kind: CorruptKind::Dangling,
                    ..
                },
            ) => {
                let id = KeyId::new(user, key);
                let now_at = self
                    .index
                    .shard(&id)
                    .lock()
                    .get(&id, user, key)
                    .map(|e| e.pos);
                return if now_at == Some(entry.pos) {
                    Err(e)
                } else {
                    Ok(Found::Moved)
                };
            }
            Err(e) => return Err(e),
        };
        if record.user != user || record.key != key {
            return Ok(Found::Foreign);
        }
        if record.token != entry.token {
            return Err(Error::Corrupt {
                file: self.log.path_of(entry.pos),
                offset: self.log.offset_of(entry.pos),
                kind: CorruptKind::WrongRecord,
            });
        }
        Ok(Found::Own(record))
    }

    /// The write of an owner call: checks the lease owns the record, appends
    /// the record and updates the index, all under the shard lock. Returns
    /// the record's log position; the caller waits for durability.
    fn owner_write(
        &self,
        lease: &Lease,
        now: u64,
        kind: Kind,
        deadline_ms: u64,
        outcome: &Outcome,
    ) -> Result<u64> {
        // A poisoned log refuses writes before anything else is judged: the
        // index may show a state that never reached the disk.
        self.log.check_poison()?;
        let id = KeyId::new(&lease.user, &lease.key);
        let (user, key) = (&lease.user[..], &lease.key[..]);
        loop {
            let mut shard = self.index.shard(&id).lock();
            let entry = match state::check_owner(shard.get(&id, user, key), lease.token, now) {
                Ok(entry) => entry,
                Err(reason) => {
                    bump(&self.counters.lease_lost);
                    return Err(Error::LeaseLost {
                        token: lease.token,
                        reason,
                    });
                }
            };
            // A complete or release records the deadline the lease had, so that
            // compaction keeps it while the lease could still look live.
            let (deadline_ms, lease_ms) = match kind {
                Kind::Release => (entry.deadline_ms, entry.deadline_ms),
                Kind::Complete => (deadline_ms, entry.deadline_ms),
                Kind::Extend | Kind::Begin => (deadline_ms, deadline_ms),
            };
            let record = Record {
                kind,
                token: lease.token,
                deadline_ms,
                time_ms: now,
                lease_ms,
                fingerprint: lease.fingerprint.0,
                user,
                key,
                status: outcome.status,
                body: &outcome.body,
            };
            let Some(pos) = self.log.append(&record)? else {
                // The segment is full: roll it without holding the shard lock
                // (a roll fsyncs), then judge the lease again.
                drop(shard);
                self.log.make_room(record.encoded_len())?;
                continue;
            };
            match kind {
                Kind::Release => shard.remove(&id, user, key, pos),
                Kind::Complete => shard.update(
                    &id,
                    user,
                    key,
                    Entry {
                        token: lease.token,
                        deadline_ms,
                        pos,
                        status: outcome.status,
                        state: RecordState::Completed,
                    },
                ),
                Kind::Extend | Kind::Begin => shard.update(
                    &id,
                    user,
                    key,
                    Entry {
                        deadline_ms,
                        pos,
                        ..entry
                    },
                ),
            }
            return Ok(pos);
        }
    }
}

/// What reading an entry's record found.
enum Found {
    /// The record, which belongs to the key asked about.
    Own(ReadRecord),
    /// A record of another key whose digest collides with this key's.
    Foreign,
    /// Nothing: compaction moved the record; look the entry up again.
    Moved,
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
