//! # idemkv: an embedded, crash-safe idempotency store
//!
//! A retried request (a network timeout, a double click, a redelivered
//! message) must be processed exactly once. The first request for a
//! `(user, key)` **begins** it and gets a lease; it does the work and
//! **completes** the lease with its outcome. Every retry with the same
//! request gets the stored outcome back instead of running the work again.
//!
//! ```
//! use idemkv::{Begin, Durability, Engine, Fingerprint, Options, Outcome};
//!
//! # fn main() -> idemkv::Result<()> {
//! let dir = tempfile::tempdir().unwrap();
//! let engine = Engine::open(dir.path(), Options::default())?;
//! let request = br#"{"amount": 1000, "currency": "EUR"}"#;
//!
//! // The first attempt claims the key and does the work.
//! let Begin::Started(lease) = engine.begin("user-42", "order-7", Fingerprint::of(request))? else {
//!     unreachable!("a new key is always started");
//! };
//! engine.complete(&lease, Outcome { status: 201, body: "charged".into() })?;
//!
//! // A retry of the same request is answered from the store.
//! match engine.begin("user-42", "order-7", Fingerprint::of(request))? {
//!     Begin::Replay(outcome) => assert_eq!((outcome.status, &outcome.body[..]), (201, &b"charged"[..])),
//!     other => panic!("expected a replay, got {other:?}"),
//! }
//!
//! // The same key with another payload is refused, never replayed.
//! assert!(matches!(engine.begin("user-42", "order-7", Fingerprint::of(b"other"))?, Begin::Mismatch));
//! # Ok(()) }
//! ```
//!
//! ## What it promises
//! - With [`Durability::Sync`] (the default), once `begin` returns
//!   `Started` or `complete` returns `Ok`, that state survives a crash,
//!   power loss included. Concurrent callers share fsyncs (group commit).
//! - At most one live lease per `(user, key)`; every lease carries a fencing
//!   token greater than all earlier ones, and a stale token gets
//!   [`Error::LeaseLost`].
//! - A replay returns the exact bytes stored, and only to a request with
//!   the same [`Fingerprint`].
//! - Bad input, corrupt files and full disks give a typed [`Error`], never
//!   a panic.
//!
//! ## Async
//! [`AsyncEngine`] offers the same calls as futures that never block the
//! thread polling them on an fsync (the engine's own syncer thread wakes
//! them), on any executor. [`IdempotencyStore`] (`store.rs`) is those calls
//! as a trait: the HTTP layer runs on any store that implements it (the
//! engine's `AsyncEngine`, a cluster node).
//!
//! ## Cargo features
//! None is on by default: a service that links only the engine compiles only
//! the engine.
//! - `http`: [`http::IdempotencyLayer`], a tower layer for the IETF
//!   *Idempotency-Key* header (axum, tokio, tower).
//! - `json` (implies `http`): `http::json_fields`, request fingerprints
//!   over chosen fields of a JSON body (serde_json).
//! - `cli`: the `idemkv` operator binary (clap).
//! - `tracing`: events at recovery, torn tails, compaction and I/O failures.
//! - `encryption`: `Options::encryption` seals stored bodies with
//!   XChaCha20-Poly1305 under rotatable keys (`EncryptionKeys`);
//!   chacha20poly1305, getrandom.
//! - `metrics`: counters, gauges and histograms through the `metrics`
//!   facade (see [`metrics`]).
//! - `cluster`: `cluster::Node`, partitions replicated through NATS
//!   JetStream streams and served by one node at a time, calls forwarded to
//!   the owner (async-nats, tokio); see docs/CLUSTER.md.
//!
//! ## Layout
//! [`Engine`] (`engine.rs`) validates input, asks the transition table
//! (`state.rs`) what to do with the entry the sharded index (`index/`)
//! holds, appends the transition to the write-ahead log (`log/`), and
//! waits for its group commit. All file access goes through
//! [`storage::Storage`]. `docs/ARCHITECTURE.md` traces a call end to end.
//! [`salvage`] brings back a directory that `open` refuses as corrupt,
//! keeping every valid record.

#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::indexing_slicing))]

mod clock;
#[cfg(feature = "cluster")]
pub mod cluster;
#[cfg(test)]
mod collision_tests;
mod compact;
#[cfg(test)]
mod compact_tests;
#[cfg(feature = "encryption")]
mod encryption;
mod engine;
mod error;
mod heartbeat;
#[cfg(feature = "http")]
pub mod http;
mod index;
mod log;
pub mod metrics;
mod notify;
mod once;
mod options;
mod outcome;
mod recovery;
mod salvage;
mod state;
mod stats;
pub mod storage;
pub mod store;
mod trace;

pub use clock::{Clock, ManualClock, SystemClock};
pub use compact::CompactionReport;
#[cfg(feature = "encryption")]
pub use encryption::{EncryptionKeys, KeyError};
pub use engine::{
    AsyncEngine, AsyncRunContext, BackupReport, Engine, Inspection, RecordDump, SegmentInfo,
    VerifyReport, verify, verify_storage,
};
pub use error::{CorruptKind, Error, IoOp, KeyPart, KeyProblem, LostReason, Result, Unavailable};
pub use heartbeat::Heartbeat;
pub use once::{
    BODY_NOT_KEPT, Delivery, Done, ReplayHook, RunContext, RunError, RunOptions, RunReplay,
    WorkError,
};
pub use options::{Durability, Options};
pub use outcome::{Begin, Fingerprint, Lease, Outcome, RecordState, RecordView};
pub use salvage::{
    Affected, AffectedKey, HeaderRepair, QuarantinedRange, SalvageReport, SegmentSalvage, salvage,
    salvage_storage,
};
pub use stats::{INDEX_SLOT_BYTES, Stats};
pub use store::IdempotencyStore;
