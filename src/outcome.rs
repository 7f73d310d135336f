//! The values that cross the public API: what `begin` answers, what a lease
//! holds, what a completed record stores.

use std::time::Duration;

use bytes::Bytes;

/// The stored result of a request: what a replay returns, byte for byte.
///
/// An HTTP layer that wants to keep headers encodes them inside `body`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The status code (for HTTP, 200, 201, 402 ...).
    pub status: u16,
    /// The response body.
    pub body: Bytes,
}

/// A 128-bit digest of a request's payload (xxh3-128).
///
/// The same key with a different fingerprint is a [`Begin::Mismatch`], never
/// a replay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub(crate) u128);

impl Fingerprint {
    /// The fingerprint of a request body (or of any canonical encoding of
    /// the request the caller chooses).
    pub fn of(bytes: &[u8]) -> Fingerprint {
        Fingerprint(xxhash_rust::xxh3::xxh3_128(bytes))
    }

    /// A fingerprint from a digest the caller computed itself.
    pub fn from_u128(digest: u128) -> Fingerprint {
        Fingerprint(digest)
    }

    /// The 128-bit digest.
    pub fn as_u128(self) -> u128 {
        self.0
    }
}

/// The right to do the work for one `(user, key)`: returned by
/// [`Begin::Started`], presented to `complete`, `extend` and `release`.
///
/// An owned value; dropping it does nothing (an abandoned lease expires).
/// It is valid only with the engine that issued it: another engine (on
/// another directory, or a later open of the same one) refuses it with
/// [`Error::ForeignLease`](crate::Error::ForeignLease).
/// Its fencing [`token`](Lease::token) is strictly greater than every token
/// issued before it for any key, across restarts.
#[derive(Clone, Debug)]
pub struct Lease {
    /// The open of the engine that issued it (see `Engine::instance`).
    pub(crate) engine: u64,
    pub(crate) user: Bytes,
    pub(crate) key: Bytes,
    pub(crate) fingerprint: Fingerprint,
    pub(crate) token: u64,
    pub(crate) expires_at_ms: u64,
}

impl Lease {
    /// The fencing token: strictly increasing per key across takeovers and
    /// restarts. A downstream system can reject writes carrying a token lower
    /// than one it has seen.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// The user id the lease is scoped to.
    pub fn user(&self) -> &[u8] {
        &self.user
    }

    /// The idempotency key.
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// The fingerprint of the request that started the lease.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// When the lease expires, in the engine's lease time: milliseconds since
    /// the Unix epoch as the wall clock read when the engine opened, moved
    /// on by the monotonic clock since (so a step of the wall clock does not
    /// move it). `Engine::extend` returns a lease with a later deadline.
    pub fn expires_at_ms(&self) -> u64 {
        self.expires_at_ms
    }
}

/// What [`Engine::begin`](crate::Engine::begin) found, and what the caller
/// should do.
#[derive(Debug)]
pub enum Begin {
    /// The key was free (absent or expired): this caller owns it now. Do the
    /// work, then `complete` (or `release` on a retryable failure).
    Started(Lease),
    /// The key was completed for the same fingerprint: return this outcome
    /// and do not run the work again.
    Replay(Outcome),
    /// Another caller holds a live lease on the key. Answer 409 with
    /// `Retry-After`, or `wait` for its result.
    InFlight {
        /// Time until the current lease expires.
        retry_after: Duration,
    },
    /// The key is live with a different fingerprint: it was reused for
    /// another request (HTTP 422).
    Mismatch,
}

/// The state of a live record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordState {
    /// Owned by a live lease; the work is running.
    InProgress,
    /// Completed; `begin` with the same fingerprint replays it.
    Completed,
}

/// A look at a record that reads only memory: [`Engine::get`](crate::Engine::get).
/// The body stays on disk; [`Engine::outcome`](crate::Engine::outcome) loads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordView {
    /// In progress or completed.
    pub state: RecordState,
    /// The fencing token of the lease that wrote the record's current state.
    pub token: u64,
    /// For an in-progress record, when its lease expires (engine clock, ms
    /// since the Unix epoch).
    pub lease_expires_at_ms: Option<u64>,
    /// For a completed record, when it expires (engine clock, ms since the
    /// Unix epoch).
    pub expires_at_ms: Option<u64>,
    /// For a completed record, its stored status.
    pub status: Option<u16>,
}
