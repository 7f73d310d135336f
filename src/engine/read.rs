//! The reading calls: `get` (memory only), `outcome` and `wait` (which read
//! the body back from the log), and the lookup helpers `begin` shares.

use std::time::{Duration, Instant};

use super::Engine;
use crate::error::{CorruptKind, Error, Result};
use crate::index::{Entry, KeyId};
use crate::log::ReadRecord;
use crate::metrics::Op;
use crate::outcome::{Begin, Fingerprint, Outcome, RecordState, RecordView};

/// How often `wait` looks again at a lease whose expiry only the engine's
/// clock can tell.
const WAIT_POLL: Duration = Duration::from_millis(10);

impl Engine {
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
    /// [`Error::Corrupt`] if the body cannot be read back (or, sealed, fails
    /// authentication); [`Error::MissingKey`] for a sealed body whose key is
    /// not configured.
    pub fn outcome(
        &self,
        user: impl AsRef<[u8]>,
        key: impl AsRef<[u8]>,
    ) -> Result<Option<Outcome>> {
        let (user, key) = (user.as_ref(), key.as_ref());
        self.check_open()?;
        self.validate(user, key)?;
        loop {
            if let Some(answer) = self.outcome_of(self.lookup(user, key)?, user, key)? {
                return Ok(answer);
            }
        }
    }

    /// `outcome`'s answer on the entry a (durable) lookup found: `None` to
    /// look again (compaction moved the record).
    pub(super) fn outcome_of(
        &self,
        entry: Option<Entry>,
        user: &[u8],
        key: &[u8],
    ) -> Result<Option<Option<Outcome>>> {
        Ok(match entry {
            Some(e) if e.state == RecordState::Completed => {
                match self.read_record(&e, user, key)? {
                    Found::Own(record) => Some(Some(self.log.outcome(record, e.pos)?)),
                    Found::Foreign => Some(None),
                    Found::Moved => None,
                }
            }
            _ => Some(None),
        })
    }

    /// `wait`'s answer on the entry a (durable) lookup found.
    pub(super) fn wait_answer(
        &self,
        entry: Option<Entry>,
        user: &[u8],
        key: &[u8],
        fingerprint: Fingerprint,
    ) -> Result<WaitAnswer> {
        let Some(e) = entry else {
            return Ok(WaitAnswer::Done(None));
        };
        let record = match self.read_record(&e, user, key)? {
            Found::Own(record) => record,
            Found::Foreign => return Ok(WaitAnswer::Done(None)),
            Found::Moved => return Ok(WaitAnswer::Again),
        };
        Ok(if record.fingerprint != fingerprint.0 {
            WaitAnswer::Done(None)
        } else if e.state == RecordState::Completed {
            WaitAnswer::Done(Some(self.log.outcome(record, e.pos)?))
        } else {
            WaitAnswer::InFlight
        })
    }

    /// Blocks until the record of `(user, key)` is completed for the request
    /// with `fingerprint` (returns its outcome), or ends otherwise (released,
    /// expired, or completed or started by a request with another
    /// fingerprint: returns `None`), or `timeout` of wall time passes
    /// (returns `None`). `Some` is only ever the outcome stored by a request
    /// with this fingerprint, so a retry of one request never receives
    /// another request's body. The timeout does not follow the engine's
    /// clock. Returns at once if the record is absent, completed, or held
    /// for another fingerprint.
    ///
    /// To claim the key when its holder gives up, use
    /// [`Engine::begin_wait`] instead.
    ///
    /// # Errors
    /// [`Error::InvalidKey`]; [`Error::Closed`] (also if the engine is
    /// closed while waiting); [`Error::Poisoned`]; [`Error::Io`] or
    /// [`Error::Corrupt`]; [`Error::MissingKey`] (as [`Engine::outcome`]).
    pub fn wait(
        &self,
        user: impl AsRef<[u8]>,
        key: impl AsRef<[u8]>,
        fingerprint: Fingerprint,
        timeout: Duration,
    ) -> Result<Option<Outcome>> {
        let _timer = self.counters.histograms.time(Op::Wait);
        let (user, key) = (user.as_ref(), key.as_ref());
        self.check_open()?;
        self.validate(user, key)?;
        let start = Instant::now();
        let _waiting = self.waiters.enter();
        loop {
            let seen = self.waiters.generation();
            self.check_open()?;
            match self.wait_answer(self.lookup(user, key)?, user, key, fingerprint)? {
                WaitAnswer::Done(answer) => return Ok(answer),
                WaitAnswer::Again => continue,
                WaitAnswer::InFlight => {}
            }
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Ok(None);
            }
            self.waiters.wait(seen, left.min(WAIT_POLL));
        }
    }

    /// [`Engine::begin`], except that while another live lease holds the
    /// key it waits up to `timeout` (wall time) for that lease to end, then
    /// answers as `begin` would at that moment: [`Begin::Replay`] if the
    /// holder completed it for the same fingerprint, [`Begin::Mismatch`]
    /// for another fingerprint, [`Begin::Started`] if the holder released
    /// the key or its lease expired. [`Begin::InFlight`] only once
    /// `timeout` has passed with the lease still live. A zero `timeout` is
    /// `begin`.
    ///
    /// This is the answer to a retry that arrives while the first request
    /// is still being worked on: it subscribes to the first request's
    /// result instead of failing with a conflict.
    ///
    /// # Errors
    /// As [`Engine::begin`].
    pub fn begin_wait(
        &self,
        user: impl AsRef<[u8]>,
        key: impl AsRef<[u8]>,
        fingerprint: Fingerprint,
        timeout: Duration,
    ) -> Result<Begin> {
        Ok(self.begin_waited(user, key, fingerprint, timeout)?.0)
    }

    /// [`Engine::begin_wait`], and whether it waited: `true` once a `begin`
    /// found the key in flight and the call waited for it (a replay served
    /// after a wait, for `RunOptions::on_replay`).
    pub(crate) fn begin_waited(
        &self,
        user: impl AsRef<[u8]>,
        key: impl AsRef<[u8]>,
        fingerprint: Fingerprint,
        timeout: Duration,
    ) -> Result<(Begin, bool)> {
        // A zero timeout is `begin` (timed as one, not as a wait).
        let histograms = &self.counters.histograms;
        let _timer = (!timeout.is_zero()).then(|| histograms.time(Op::Wait));
        let (user, key) = (user.as_ref(), key.as_ref());
        let start = Instant::now();
        let _waiting = self.waiters.enter();
        let mut waited = false;
        loop {
            let seen = self.waiters.generation();
            let answer = self.begin(user, key, fingerprint)?;
            let Begin::InFlight { retry_after } = answer else {
                return Ok((answer, waited));
            };
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Ok((Begin::InFlight { retry_after }, waited));
            }
            waited = true;
            self.waiters.wait(seen, left.min(WAIT_POLL));
        }
    }

    /// The live entry of `(user, key)`, once the state it shows is durable.
    pub(super) fn lookup(&self, user: &[u8], key: &[u8]) -> Result<Option<Entry>> {
        let (entry, pos) = self.lookup_step(user, key)?;
        self.log.wait_durable(pos)?;
        Ok(entry)
    }

    /// The live entry of `(user, key)` and the position that must be
    /// durable before it (or its absence) may be shown.
    pub(super) fn lookup_step(&self, user: &[u8], key: &[u8]) -> Result<(Option<Entry>, u64)> {
        let id = KeyId::new(user, key);
        let now = self.clock.now()?;
        let shard = self.index.shard(&id).lock();
        Ok(match shard.get(&id, user, key) {
            Some(e) if e.is_live(now) => (Some(e), e.pos),
            _ => (None, shard.removed_pos()),
        })
    }

    /// Reads the record an entry points at, once durable, and tells whether
    /// it is this key's.
    pub(super) fn read_record(&self, entry: &Entry, user: &[u8], key: &[u8]) -> Result<Found> {
        self.log.wait_durable(entry.pos)?;
        // Whether the key's entry still points where `entry` did: if not,
        // compaction moved it since (and the slot may hold another segment
        // now), so look again.
        let still_here = || {
            let id = KeyId::new(user, key);
            self.index
                .shard(&id)
                .lock()
                .get(&id, user, key)
                .map(|e| e.pos)
                == Some(entry.pos)
        };
        let record = match self.log.read(entry.pos) {
            Ok(record) => record,
            // Compaction moved the record and retired its segment since the
            // entry was read: look again, unless the entry still points
            // there (then the segment is truly missing).
            Err(
                e @ Error::Corrupt {
                    kind: CorruptKind::Dangling | CorruptKind::Checksum | CorruptKind::Malformed,
                    ..
                },
            ) => {
                return if still_here() {
                    Err(e)
                } else {
                    Ok(Found::Moved)
                };
            }
            Err(e) => return Err(e),
        };
        if record.user() != user || record.key() != key {
            return Ok(if still_here() {
                Found::Foreign
            } else {
                Found::Moved
            });
        }
        if record.token != entry.token {
            if !still_here() {
                return Ok(Found::Moved);
            }
            return Err(Error::Corrupt {
                file: self.log.path_of(entry.pos),
                offset: self.log.offset_of(entry.pos),
                kind: CorruptKind::WrongRecord,
            });
        }
        Ok(Found::Own(record))
    }
}

/// What a look at a key tells a `wait`.
pub(super) enum WaitAnswer {
    /// The wait is over, with this answer.
    Done(Option<Outcome>),
    /// In progress for this request: keep waiting.
    InFlight,
    /// Compaction moved the record: look again.
    Again,
}

/// What reading an entry's record found.
pub(super) enum Found {
    /// The record, which belongs to the key asked about.
    Own(ReadRecord),
    /// A record of another key whose digest collides with this key's.
    Foreign,
    /// Nothing: compaction moved the record; look the entry up again.
    Moved,
}
