//! The owner's calls: `complete`, `release`, `extend`, all through
//! [`Engine::owner_write`], which judges the lease and writes under the
//! shard lock; and `heartbeat`, whose extends the heartbeat thread
//! (`heartbeat.rs`) makes through the same write ([`Beat`]).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::{Engine, deadline};
use crate::clock::{EngineClock, Now};
use crate::error::{Error, Result};
use crate::heartbeat::Heartbeat;
use crate::index::{Entry, Index, KeyId};
use crate::log::record::{Kind, Record};
use crate::log::{Chore, Log};
use crate::metrics::Op;
use crate::outcome::{Lease, Outcome, RecordState};
use crate::state;
use crate::stats::{Counters, bump};

/// What an owner write did: written (at a position), or it found the
/// segment full and left a chore for its caller, who runs it holding no
/// shard lock (the blocking calls on their own thread, the futures off
/// their executor's: [`Log::offload`]) and writes again.
#[must_use]
pub(crate) enum Written<T> {
    /// Written; acknowledged once its position is durable.
    Done(T),
    /// Nothing written: run this, then try again.
    Chore(Chore),
}

impl Engine {
    /// Runs `write` until it is done, running its chores on this thread.
    pub(super) fn with_chores<T>(
        &self,
        mut write: impl FnMut() -> Result<Written<T>>,
    ) -> Result<T> {
        loop {
            match write()? {
                Written::Done(t) => return Ok(t),
                Written::Chore(chore) => self.log.chore(chore)?,
            }
        }
    }

    /// Stores `outcome` for the lease's key, with the default `record_ttl`:
    /// later `begin`s with the same fingerprint replay it.
    ///
    /// # Errors
    /// [`Error::ResponseTooLarge`] (nothing changes; the lease can still
    /// complete); [`Error::LeaseLost`] if the lease expired, was released or
    /// taken over; [`Error::ForeignLease`] for a lease another engine (or an
    /// earlier open of this one) issued; [`Error::ClockOutOfRange`];
    /// [`Error::Closed`], [`Error::Poisoned`], [`Error::Io`].
    pub fn complete(&self, lease: &Lease, outcome: Outcome) -> Result<()> {
        self.complete_with_ttl(lease, outcome, self.options.record_ttl)
    }

    /// [`Engine::complete`] with a record TTL for this record only.
    ///
    /// # Errors
    /// As [`Engine::complete`]; [`Error::InvalidArgument`] for a zero `ttl`
    /// (nothing changes).
    pub fn complete_with_ttl(&self, lease: &Lease, outcome: Outcome, ttl: Duration) -> Result<()> {
        let _timer = self.counters.histograms.time(Op::Complete);
        let pos = self.with_chores(|| self.complete_write(lease, outcome.clone(), ttl))?;
        self.log.wait_durable(pos)
    }

    /// The write of `complete_with_ttl`: the record appended and the index
    /// updated; acknowledged once its position is durable.
    pub(super) fn complete_write(
        &self,
        lease: &Lease,
        outcome: Outcome,
        ttl: Duration,
    ) -> Result<Written<u64>> {
        self.check_open()?;
        if outcome.body.len() > self.options.max_response_len {
            return Err(Error::ResponseTooLarge {
                len: outcome.body.len(),
                max: self.options.max_response_len,
            });
        }
        if ttl.is_zero() {
            return Err(Error::InvalidArgument {
                name: "ttl",
                problem: "must be more than zero (the record would be expired when stored)",
            });
        }
        let now = self.clock.now()?;
        let deadline_ms = deadline(now.wall, ttl);
        let written = self.owner_write(lease, now, Kind::Complete, deadline_ms, &outcome)?;
        if let Written::Done(_) = written {
            bump(&self.counters.completions);
            self.waiters.notify();
        }
        Ok(written)
    }

    /// Gives up the lease's key: the record is forgotten, so a retry can
    /// start the work again (use it for retryable failures, such as a 5xx).
    ///
    /// # Errors
    /// [`Error::LeaseLost`] if the lease no longer owns the key;
    /// [`Error::Closed`], [`Error::Poisoned`], [`Error::Io`].
    pub fn release(&self, lease: &Lease) -> Result<()> {
        let pos = self.with_chores(|| self.release_write(lease))?;
        self.log.wait_durable(pos)
    }

    /// Releases without waiting for the record's sync (the HTTP layer's
    /// release of a request dropped before its handler ran: if a crash
    /// takes the release back, the lease expires on its own).
    pub(crate) fn release_unsynced(&self, lease: &Lease) -> Result<()> {
        self.with_chores(|| self.release_write(lease)).map(|_| ())
    }

    /// The write of `release`; acknowledged once its position is durable.
    pub(super) fn release_write(&self, lease: &Lease) -> Result<Written<u64>> {
        self.check_open()?;
        let now = self.clock.now()?;
        let none = Outcome {
            status: 0,
            body: Bytes::new(),
        };
        let written = self.owner_write(lease, now, Kind::Release, 0, &none)?;
        if let Written::Done(_) = written {
            bump(&self.counters.releases);
            self.waiters.notify();
        }
        Ok(written)
    }

    /// Heartbeat: moves the lease's deadline to now + `by` and returns the
    /// updated lease (same token).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a zero `by` (nothing changes);
    /// [`Error::LeaseLost`] if the lease already expired or was taken over;
    /// [`Error::Closed`], [`Error::Poisoned`], [`Error::Io`].
    pub fn extend(&self, lease: &Lease, by: Duration) -> Result<Lease> {
        let (extended, pos) = self.with_chores(|| self.extend_write(lease, by))?;
        self.log.wait_durable(pos)?;
        Ok(extended)
    }

    /// The write of `extend`: the extended lease, acknowledged once the
    /// position is durable.
    pub(super) fn extend_write(
        &self,
        lease: &Lease,
        by: Duration,
    ) -> Result<Written<(Lease, u64)>> {
        self.check_open()?;
        if by.is_zero() {
            return Err(Error::InvalidArgument {
                name: "by",
                problem: "must be more than zero (the lease would end at once; use release)",
            });
        }
        let now = self.clock.now()?;
        let deadline_ms = deadline(now.lease, by);
        let none = Outcome {
            status: 0,
            body: Bytes::new(),
        };
        Ok(
            match self.owner_write(lease, now, Kind::Extend, deadline_ms, &none)? {
                Written::Done(pos) => Written::Done((
                    Lease {
                        expires_at_ms: deadline_ms,
                        ..lease.clone()
                    },
                    pos,
                )),
                Written::Chore(chore) => Written::Chore(chore),
            },
        )
    }

    /// The write of an owner call: checks the lease owns the record, appends
    /// the record and updates the index, all under the shard lock. Returns
    /// the record's log position; the caller waits for durability.
    pub(super) fn owner_write(
        &self,
        lease: &Lease,
        now: Now,
        kind: Kind,
        deadline_ms: u64,
        outcome: &Outcome,
    ) -> Result<Written<u64>> {
        let parts = OwnerParts {
            instance: self.instance,
            index: &self.index,
            log: &self.log,
            counters: &self.counters,
        };
        parts.write(lease, now, kind, deadline_ms, outcome)
    }

    /// Keeps `lease` alive while long work runs: every `every`, the
    /// engine's heartbeat thread extends it by `Options::lease_ttl`, until
    /// the returned handle is stopped or dropped, an extend fails (the
    /// lease was lost, completed or released; the engine closed or
    /// failed), or `Options::heartbeat_limit` has passed since this call.
    /// The lease then ends at most one `lease_ttl` after the last extend.
    ///
    /// One thread serves every heartbeat of the engine (started by the
    /// first one, joined by [`Engine::close`]), so a heartbeat costs a
    /// timer entry, not a thread or a task: sync, async and HTTP callers
    /// alike. `every` and the limit are measured in real time
    /// ([`std::time::Instant`]), like `sweep_interval`; the lease's own
    /// deadline follows the engine's clock. An extend does not wait for
    /// its record's fsync (a crash ends the work anyway).
    ///
    /// A zero `every` or a zero `Options::heartbeat_limit` gives a handle
    /// that does nothing, and so does a closed engine. Choose `every` well
    /// under `lease_ttl` (a third of it, say): a beat that comes after the
    /// lease expired fails, and the heartbeat stops.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use idemkv::{Begin, Engine, Fingerprint, Options, Outcome};
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let engine = Engine::open(dir.path(), Options::default()).unwrap();
    /// let Begin::Started(lease) = engine.begin("user", "report-9", Fingerprint::of(b"q")).unwrap() else {
    ///     unreachable!()
    /// };
    /// let heartbeat = engine.heartbeat(&lease, Duration::from_secs(10));
    /// // ... long work: the key stays this caller's past `lease_ttl` ...
    /// heartbeat.stop();
    /// engine.complete(&lease, Outcome { status: 200, body: "done".into() }).unwrap();
    /// ```
    pub fn heartbeat(&self, lease: &Lease, every: Duration) -> Heartbeat {
        self.heartbeat_within(lease, every, self.options.heartbeat_limit)
    }

    /// [`Engine::heartbeat`] capped at `limit` as well as the engine's
    /// `heartbeat_limit` (the HTTP layer's own cap).
    pub(crate) fn heartbeat_within(
        &self,
        lease: &Lease,
        every: Duration,
        limit: Duration,
    ) -> Heartbeat {
        let limit = limit.min(self.options.heartbeat_limit);
        if every.is_zero() || limit.is_zero() || self.check_open().is_err() {
            return Heartbeat::inert();
        }
        let beat = || Beat {
            instance: self.instance,
            clock: Arc::clone(&self.clock),
            index: Arc::clone(&self.index),
            log: Arc::clone(&self.log),
            counters: Arc::clone(&self.counters),
            ttl: self.options.lease_ttl,
        };
        self.heartbeats.register(lease, every, limit, beat)
    }
}

/// What the heartbeat thread needs of its engine to extend a lease: its own
/// handles on the engine's layers (the engine is not shared with the
/// thread; [`Engine::close`] joins the thread before it closes the log).
#[derive(Debug)]
pub(crate) struct Beat {
    instance: u64,
    clock: Arc<EngineClock>,
    index: Arc<Index>,
    log: Arc<Log>,
    counters: Arc<Counters>,
    ttl: Duration,
}

impl Beat {
    /// Extends `lease` by the engine's `lease_ttl` from now: the write of
    /// `Engine::extend_write`, without waiting for the record's sync.
    ///
    /// The extend record need not be durable. If a crash takes it back,
    /// the work it kept alive ended with the process anyway, and every
    /// lease issued before a restart is refused as `ForeignLease`, so no
    /// one can act on the extension; recovery then sees the lease's earlier
    /// deadline, which is only sooner. A `begin` of the same key that finds
    /// the extended state still waits for it to be durable before it
    /// answers (`BeginStep2::NotDurable`), as for any record.
    ///
    /// # Errors
    /// As [`Engine::extend`] (the heartbeat stops on any).
    pub(crate) fn extend(&self, lease: &Lease) -> Result<()> {
        let now = self.clock.now()?;
        let deadline_ms = deadline(now.lease, self.ttl);
        let none = Outcome {
            status: 0,
            body: Bytes::new(),
        };
        let parts = OwnerParts {
            instance: self.instance,
            index: &self.index,
            log: &self.log,
            counters: &self.counters,
        };
        // A full segment is rolled here, on the heartbeat thread.
        while let Written::Chore(chore) =
            parts.write(lease, now, Kind::Extend, deadline_ms, &none)?
        {
            self.log.chore(chore)?;
        }
        bump(&self.counters.heartbeats);
        Ok(())
    }
}

/// The layers an owner write touches: the engine's, or a [`Beat`]'s.
struct OwnerParts<'a> {
    instance: u64,
    index: &'a Index,
    log: &'a Log,
    counters: &'a Counters,
}

impl OwnerParts<'_> {
    /// See [`Engine::owner_write`].
    fn write(
        &self,
        lease: &Lease,
        now: Now,
        kind: Kind,
        deadline_ms: u64,
        outcome: &Outcome,
    ) -> Result<Written<u64>> {
        // A poisoned log refuses writes before anything else is judged: the
        // index may show a state that never reached the disk.
        self.log.check_poison()?;
        if lease.engine != self.instance {
            return Err(Error::ForeignLease { token: lease.token });
        }
        let id = KeyId::new(&lease.user, &lease.key);
        let (user, key) = (&lease.user[..], &lease.key[..]);
        let mut shard = self.index.shard(&id).lock();
        let current = shard.get(&id, user, key);
        let entry = match state::check_owner(current, lease.token, lease.expires_at_ms, now) {
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
            // An extend may shorten the lease: it records the later of
            // the old and new deadlines, so that compaction keeps it as
            // long as the records it overrode could still look live.
            Kind::Extend | Kind::Begin | Kind::Reserve => {
                (deadline_ms, deadline_ms.max(entry.deadline_ms))
            }
        };
        let record = Record {
            kind,
            token: lease.token,
            deadline_ms,
            time_ms: now.wall,
            lease_ms,
            fingerprint: lease.fingerprint.0,
            user,
            key,
            status: outcome.status,
            body: &outcome.body,
            seal: None,
        };
        // A complete's body is sealed here (with `Options::encryption`),
        // under the shard lock but outside the writer's.
        let mut sealed = Vec::new();
        let record = self.log.seal(record, &mut sealed)?;
        let Some(pos) = self.log.append(&record)? else {
            // The segment is full: the caller rolls it without holding
            // the shard lock (a roll fsyncs), then judges the lease again.
            drop(shard);
            return Ok(Written::Chore(Chore::Room(record.encoded_len())));
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
            Kind::Extend | Kind::Begin | Kind::Reserve => shard.update(
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
        Ok(Written::Done(pos))
    }
}
