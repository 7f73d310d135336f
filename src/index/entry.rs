//! The compact per-record entry the index keeps in memory.

use crate::outcome::{RecordState, RecordView};

/// What the index knows of one live record. The body, the full key and the
/// fingerprint stay in the log at `pos`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    /// The fencing token of the lease that wrote the current state.
    pub token: u64,
    /// The lease deadline (in progress) or expiry (completed), engine clock ms.
    pub deadline_ms: u64,
    /// Log position of the record that wrote the current state.
    pub pos: u64,
    /// The stored status, when completed.
    pub status: u16,
    /// In progress or completed.
    pub state: RecordState,
}

impl Entry {
    /// Whether the record still exists at `now_ms`; an expired lease or
    /// record is absent.
    pub fn is_live(&self, now_ms: u64) -> bool {
        now_ms < self.deadline_ms
    }

    /// The public view of the entry.
    pub fn view(&self) -> RecordView {
        let (lease, expiry, status) = match self.state {
            RecordState::InProgress => (Some(self.deadline_ms), None, None),
            RecordState::Completed => (None, Some(self.deadline_ms), Some(self.status)),
        };
        RecordView {
            state: self.state,
            token: self.token,
            lease_expires_at_ms: lease,
            expires_at_ms: expiry,
            status,
        }
    }
}
