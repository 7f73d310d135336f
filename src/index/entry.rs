//! The per-record entry the index keeps in memory, and its packed form.

use crate::clock::Now;
use crate::outcome::{RecordState, RecordView};

/// The latest deadline an entry can hold: 2^43 - 1 ms after the Unix epoch
/// (the year 2248). Later deadlines are clamped to it.
pub(crate) const MAX_DEADLINE_MS: u64 = (1 << 43) - 1;
/// Tokens must stay below 2^48 to fit an entry.
pub(crate) const TOKEN_LIMIT: u64 = 1 << 48;
/// Record offsets inside a segment stay below 2^28 (256 MiB).
pub(crate) const OFFSET_LIMIT: u64 = 1 << 28;

/// What the index knows of one live record. The body, the full key and the
/// fingerprint stay in the log at `pos`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    /// The fencing token of the lease that wrote the current state (< 2^48).
    pub token: u64,
    /// The lease deadline (in progress) or expiry (completed), engine clock
    /// ms, at most [`MAX_DEADLINE_MS`].
    pub deadline_ms: u64,
    /// Log position of the record that wrote the current state.
    pub pos: u64,
    /// The stored status, when completed.
    pub status: u16,
    /// In progress or completed.
    pub state: RecordState,
}

impl Entry {
    /// Whether the record still exists at `now`; an expired lease or
    /// record is absent. A lease's deadline is judged in lease time, a
    /// completed record's expiry in wall time (see `clock.rs`).
    pub fn is_live(&self, now: Now) -> bool {
        let t = match self.state {
            RecordState::InProgress => now.lease,
            RecordState::Completed => now.wall,
        };
        t < self.deadline_ms
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

/// An [`Entry`] in 20 bytes, aligned to 4 so that a table slot (8-byte
/// digest + entry) takes 28 bytes.
///
/// Bits, low to high: offset in segment (28), segment id (24), deadline
/// (43), token (48), status (16), state (1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Packed([u32; 5]);

const OFFSET_BITS: u32 = 28;
const SEGMENT_BITS: u32 = 24;
const DEADLINE_BITS: u32 = 43;
const TOKEN_LO_BITS: u32 = 128 - OFFSET_BITS - SEGMENT_BITS - DEADLINE_BITS;
/// Bits of a log position that hold the offset (see `log::pos`).
const LOG_OFFSET_BITS: u32 = 40;

fn mask(bits: u32) -> u128 {
    (1u128 << bits) - 1
}

impl Packed {
    /// Packs an entry. Fields beyond their width are truncated; the engine
    /// keeps them in range (deadlines clamped, tokens and positions checked).
    pub fn pack(e: &Entry) -> Packed {
        let offset = u128::from(e.pos) & mask(OFFSET_BITS);
        let segment = (u128::from(e.pos) >> LOG_OFFSET_BITS) & mask(SEGMENT_BITS);
        let deadline = u128::from(e.deadline_ms.min(MAX_DEADLINE_MS));
        let token = u128::from(e.token);
        let lo = offset
            | segment << OFFSET_BITS
            | deadline << (OFFSET_BITS + SEGMENT_BITS)
            | (token & mask(TOKEN_LO_BITS)) << (OFFSET_BITS + SEGMENT_BITS + DEADLINE_BITS);
        let token_hi = (e.token >> TOKEN_LO_BITS) as u32 & 0x7fff;
        let state = u32::from(e.state == RecordState::Completed);
        let hi = token_hi | u32::from(e.status) << 15 | state << 31;
        Packed([
            lo as u32,
            (lo >> 32) as u32,
            (lo >> 64) as u32,
            (lo >> 96) as u32,
            hi,
        ])
    }

    /// The entry back.
    pub fn unpack(self) -> Entry {
        let [a, b, c, d, hi] = self.0;
        let lo = u128::from(a) | u128::from(b) << 32 | u128::from(c) << 64 | u128::from(d) << 96;
        let offset = (lo & mask(OFFSET_BITS)) as u64;
        let segment = ((lo >> OFFSET_BITS) & mask(SEGMENT_BITS)) as u64;
        let deadline_ms = ((lo >> (OFFSET_BITS + SEGMENT_BITS)) & mask(DEADLINE_BITS)) as u64;
        let token_lo = (lo >> (OFFSET_BITS + SEGMENT_BITS + DEADLINE_BITS)) as u64;
        let token = token_lo | u64::from(hi & 0x7fff) << TOKEN_LO_BITS;
        Entry {
            token,
            deadline_ms,
            pos: segment << LOG_OFFSET_BITS | offset,
            status: (hi >> 15) as u16,
            state: if hi >> 31 == 1 {
                RecordState::Completed
            } else {
                RecordState::InProgress
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_round_trips_at_every_field_limit() {
        let cases = [
            (0, 0, 0, 0, RecordState::InProgress),
            (
                TOKEN_LIMIT - 1,
                MAX_DEADLINE_MS,
                ((1 << 24) - 1) << 40 | (OFFSET_LIMIT - 1),
                u16::MAX,
                RecordState::Completed,
            ),
            (
                0x1234_5678_9abc,
                1_800_000_000_000,
                7 << 40 | 4096,
                201,
                RecordState::Completed,
            ),
            (1 << 33, 1, 1 << 40, 1, RecordState::InProgress),
        ];
        for (token, deadline_ms, pos, status, state) in cases {
            let e = Entry {
                token,
                deadline_ms,
                pos,
                status,
                state,
            };
            assert_eq!(Packed::pack(&e).unpack(), e);
        }
    }

    #[test]
    fn a_table_slot_is_28_bytes() {
        assert_eq!(std::mem::size_of::<Packed>(), 20);
        assert_eq!(
            std::mem::size_of::<(super::super::shard::Digest, Packed)>(),
            28
        );
    }
}
