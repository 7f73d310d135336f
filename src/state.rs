//! The transition table: the one place that decides what a call does to a
//! record, given the entry the index holds and the time.
//!
//! ```text
//! absent ──begin──▶ in-progress(t, L) ──complete(t)──▶ completed(E)
//!    ▲                 │  │ extend(t) moves L              │
//!    │                 │  └─ release(t) ─▶ absent          │
//!    │                 └─ L passes: begin takes over (t+1) │
//!    └────────────────── E passes: absent ◀────────────────┘
//! ```
//! Every function here is pure; the engine calls them under the shard lock.

use std::time::Duration;

use crate::clock::Now;
use crate::error::LostReason;
use crate::index::Entry;
use crate::log::record::{Kind, Record};
use crate::outcome::RecordState;

/// What `begin` does, before the fingerprint is compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BeginStep {
    /// The key is free: grant a new lease.
    Start {
        /// An expired record or lease was there (counted as an expiration).
        expired: bool,
        /// The expired thing was a lease (a takeover).
        takeover: bool,
    },
    /// A live record is there; the answer depends on the fingerprint.
    Live(Entry),
}

/// Decides `begin` on the current entry.
pub(crate) fn begin_step(current: Option<Entry>, now: Now) -> BeginStep {
    match current {
        None => BeginStep::Start {
            expired: false,
            takeover: false,
        },
        Some(e) if !e.is_live(now) => BeginStep::Start {
            expired: true,
            takeover: e.state == RecordState::InProgress,
        },
        Some(e) => BeginStep::Live(e),
    }
}

/// The answer of `begin` on a live record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LiveAnswer {
    /// Completed with the same fingerprint.
    Replay,
    /// In progress with the same fingerprint.
    InFlight { retry_after: Duration },
    /// Another fingerprint, whatever the state.
    Mismatch,
}

/// Decides `begin` on a live record, once its fingerprint was read.
pub(crate) fn live_answer(entry: &Entry, same_fingerprint: bool, now: Now) -> LiveAnswer {
    match (same_fingerprint, entry.state) {
        (false, _) => LiveAnswer::Mismatch,
        (true, RecordState::Completed) => LiveAnswer::Replay,
        (true, RecordState::InProgress) => LiveAnswer::InFlight {
            retry_after: Duration::from_millis(entry.deadline_ms.saturating_sub(now.lease)),
        },
    }
}

/// Checks that the lease with `token`, whose deadline as its holder knows
/// it is `lease_deadline_ms`, owns the record now: the precondition of
/// `complete`, `extend` and `release`.
///
/// The reason for a refusal does not depend on whether the sweeper has run:
/// an expired entry counts exactly as an absent one, and an absent record
/// is `Expired` once the lease's own deadline has passed, `Gone` before
/// (released, or its record expired early).
pub(crate) fn check_owner(
    current: Option<Entry>,
    token: u64,
    lease_deadline_ms: u64,
    now: Now,
) -> Result<Entry, LostReason> {
    let absent = if now.lease >= lease_deadline_ms {
        LostReason::Expired
    } else {
        LostReason::Gone
    };
    let e = match current {
        Some(e) if e.is_live(now) => e,
        _ => return Err(absent),
    };
    if e.token != token {
        return Err(if e.token > token {
            LostReason::Superseded { current: e.token }
        } else {
            absent
        });
    }
    match e.state {
        RecordState::Completed => Err(LostReason::Completed),
        RecordState::InProgress => Ok(e),
    }
}

/// The entry after replaying one log record during recovery, given the
/// key's current entry.
///
/// Tokens only grow per key, and compaction may have dropped a lease's
/// earlier records (its begin, when the complete or an extend is the live
/// one), so the rules go by token: a record of an older lease than the
/// current entry's is stale; a record of a newer lease replaces the entry
/// whatever it was; a release removes the entry of its lease or an older
/// one (a newer lease could only start once the older one was over).
pub(crate) fn replay(current: Option<Entry>, record: &Record<'_>, pos: u64) -> Option<Entry> {
    let entry = |state| Entry {
        token: record.token,
        deadline_ms: record.deadline_ms,
        pos,
        status: record.status,
        state,
    };
    let newer = current.is_none_or(|e| e.token < record.token);
    let same = current.is_some_and(|e| e.token == record.token);
    match record.kind {
        Kind::Begin => Some(entry(RecordState::InProgress)),
        Kind::Complete if newer || same => Some(entry(RecordState::Completed)),
        Kind::Extend if newer => Some(entry(RecordState::InProgress)),
        Kind::Extend if same && current.is_some_and(|e| e.state == RecordState::InProgress) => {
            Some(entry(RecordState::InProgress))
        }
        Kind::Release if newer || same => None,
        _ => current,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(state: RecordState, token: u64, deadline_ms: u64) -> Entry {
        Entry {
            token,
            deadline_ms,
            pos: 0,
            status: 200,
            state,
        }
    }

    fn at(ms: u64) -> Now {
        Now::at(ms)
    }

    #[test]
    fn begin_on_nothing_or_expired_starts() {
        assert_eq!(
            begin_step(None, at(5)),
            BeginStep::Start {
                expired: false,
                takeover: false
            }
        );
        let lease = entry(RecordState::InProgress, 1, 10);
        assert_eq!(
            begin_step(Some(lease), at(10)),
            BeginStep::Start {
                expired: true,
                takeover: true
            }
        );
        let done = entry(RecordState::Completed, 1, 10);
        assert_eq!(
            begin_step(Some(done), at(11)),
            BeginStep::Start {
                expired: true,
                takeover: false
            }
        );
        assert_eq!(begin_step(Some(done), at(9)), BeginStep::Live(done));
    }

    #[test]
    fn live_answers_follow_the_design_table() {
        let lease = entry(RecordState::InProgress, 1, 10);
        let done = entry(RecordState::Completed, 1, 10);
        assert_eq!(live_answer(&done, true, at(3)), LiveAnswer::Replay);
        assert_eq!(live_answer(&done, false, at(3)), LiveAnswer::Mismatch);
        assert_eq!(live_answer(&lease, false, at(3)), LiveAnswer::Mismatch);
        assert_eq!(
            live_answer(&lease, true, at(3)),
            LiveAnswer::InFlight {
                retry_after: Duration::from_millis(7)
            }
        );
    }

    #[test]
    fn only_the_live_current_token_owns_the_record() {
        let lease = entry(RecordState::InProgress, 5, 10);
        assert_eq!(check_owner(Some(lease), 5, 10, at(9)), Ok(lease));
        assert_eq!(
            check_owner(Some(lease), 5, 10, at(10)),
            Err(LostReason::Expired)
        );
        assert_eq!(
            check_owner(Some(lease), 4, 8, at(9)),
            Err(LostReason::Superseded { current: 5 })
        );
        assert_eq!(check_owner(None, 5, 10, at(0)), Err(LostReason::Gone));
        let done = entry(RecordState::Completed, 5, 10);
        assert_eq!(
            check_owner(Some(done), 5, 10, at(0)),
            Err(LostReason::Completed)
        );
    }

    #[test]
    fn the_reason_a_lease_was_lost_does_not_depend_on_the_sweep() {
        // An expired entry still in the index answers as a swept one.
        let lease = entry(RecordState::InProgress, 5, 10);
        for now in [10, 11, 500] {
            assert_eq!(
                check_owner(Some(lease), 5, 10, at(now)),
                check_owner(None, 5, 10, at(now))
            );
        }
        // A completed record that expired before the lease's deadline.
        let done = entry(RecordState::Completed, 5, 3);
        assert_eq!(
            check_owner(Some(done), 5, 10, at(4)),
            check_owner(None, 5, 10, at(4))
        );
        // A successor that expired in turn.
        let next = entry(RecordState::InProgress, 6, 20);
        assert_eq!(
            check_owner(Some(next), 5, 10, at(25)),
            check_owner(None, 5, 10, at(25))
        );
    }

    fn record(kind: Kind, token: u64, deadline_ms: u64) -> Record<'static> {
        Record {
            kind,
            token,
            deadline_ms,
            time_ms: 0,
            lease_ms: deadline_ms,
            fingerprint: 0,
            user: b"u",
            key: b"k",
            status: 200,
            body: b"",
            seal: None,
        }
    }

    #[test]
    fn replay_goes_by_token_so_a_dropped_begin_loses_nothing() {
        // An extend whose begin was compacted away still recreates the lease.
        let got = replay(None, &record(Kind::Extend, 4, 50), 9);
        assert_eq!(
            got,
            Some(Entry {
                token: 4,
                deadline_ms: 50,
                pos: 9,
                status: 200,
                state: RecordState::InProgress
            })
        );
        // A record of an older lease is stale.
        let current = entry(RecordState::Completed, 7, 100);
        assert_eq!(
            replay(Some(current), &record(Kind::Complete, 6, 10), 1),
            Some(current)
        );
        assert_eq!(
            replay(Some(current), &record(Kind::Release, 6, 10), 1),
            Some(current)
        );
        // A newer lease's records replace an older state.
        let old = entry(RecordState::Completed, 3, 100);
        assert_eq!(replay(Some(old), &record(Kind::Release, 4, 10), 1), None);
        assert_eq!(
            replay(Some(old), &record(Kind::Complete, 4, 10), 1).map(|e| e.token),
            Some(4)
        );
        // An extend of a completed lease changes nothing.
        assert_eq!(
            replay(Some(old), &record(Kind::Extend, 3, 500), 1),
            Some(old)
        );
    }
}
