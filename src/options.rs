//! Engine configuration: plain public fields with defaults, checked once at
//! open by [`Options::validate`].

use std::sync::Arc;
use std::time::Duration;

use crate::clock::{Clock, SystemClock};
use crate::error::{Error, Result};

/// When acknowledged writes reach the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Durability {
    /// Every acknowledged call is on disk before it returns (fdatasync,
    /// shared by concurrent callers through group commit). The default.
    #[default]
    Sync,
    /// A background thread syncs the log every interval: an acknowledged
    /// call reaches disk within about that interval.
    Periodic(Duration),
    /// The operating system decides when data reaches disk; the engine only
    /// syncs on close and when it rolls to a new segment. For caches and tests.
    None,
}

/// How an engine is configured. Build it as a struct literal over
/// `Options::default()`:
///
/// ```
/// use std::{sync::Arc, time::Duration};
/// use idemkv::{Durability, ManualClock, Options};
///
/// let clock = Arc::new(ManualClock::new(0));
/// let options = Options {
///     durability: Durability::None,
///     lease_ttl: Duration::from_secs(5),
///     clock: clock.clone(),
///     ..Options::default()
/// };
/// assert!(options.validate().is_ok());
/// ```
#[derive(Clone, Debug)]
pub struct Options {
    /// When acknowledged writes reach disk. Default: [`Durability::Sync`].
    pub durability: Durability,
    /// How long a completed record is replayed before it expires.
    /// Default: 24 hours. Per call: `Engine::complete_with_ttl`.
    pub record_ttl: Duration,
    /// How long a `Started` lease lasts before another `begin` may take the
    /// key over. Default: 30 seconds. `Engine::extend` moves it.
    pub lease_ttl: Duration,
    /// Number of index shards (chosen by a hash of the user id); more shards
    /// mean less lock contention and a little more fixed memory.
    /// Default: 64. Range: 1 to 65 536.
    pub shards: usize,
    /// Longest accepted idempotency key in bytes. Default: 255. Range: 1 to 65 535.
    pub max_key_len: usize,
    /// Longest accepted user id in bytes. Default: 255. Range: 0 to 65 535.
    pub max_user_len: usize,
    /// Largest accepted response body in bytes. Default: 1 MiB (1 048 576).
    /// Range: 0 to 256 MiB.
    pub max_response_len: usize,
    /// Size in bytes at which the log rolls to a new segment file; files are
    /// not preallocated. Default: 64 MiB. Range: 4 KiB to 256 MiB (a record
    /// larger than a segment gets a segment of its own).
    pub segment_bytes: u64,
    /// Accept only visible ASCII (`0x21..=0x7e`) in keys. Default: `true`.
    /// When `false`, any non-empty byte string within `max_key_len` is a key.
    pub ascii_keys: bool,
    /// Whether `open` starts the background thread that sweeps expired
    /// records and compacts segments. Default: `true`. When `false`,
    /// reclamation happens only through `Engine::compact`, and without
    /// `Durability::Sync` appends buffered in memory are written to the
    /// file only when the buffer fills (256 KiB), at a sync, a roll, a
    /// compaction or `close` (with it, also every 5 ms).
    pub background: bool,
    /// Wall time between two background passes (sweep, then compaction of
    /// segments below the threshold). Default: 10 seconds.
    pub sweep_interval: Duration,
    /// A closed segment is rewritten once the fraction of its records still
    /// live falls below this. Default: 0.5. Range: 0.0 to 1.0 (0.0 never
    /// rewrites a segment that has a live record; whole-dead segments are
    /// always removed).
    pub compaction_threshold: f64,
    /// The longest a lease heartbeat runs (`Engine::heartbeat`,
    /// `RunOptions::heartbeat`, the HTTP layer): this long after it was
    /// started it stops, and the lease ends at most one `lease_ttl` later,
    /// so work that hangs cannot hold its key forever. Real time, like
    /// `sweep_interval`. Default: 5 minutes. `Duration::ZERO` turns
    /// heartbeats off (their handles do nothing).
    pub heartbeat_limit: Duration,
    /// The engine's source of time for leases and TTLs. Default: [`SystemClock`].
    pub clock: Arc<dyn Clock>,
    /// Serve records (replayed bodies included) from read-only memory maps
    /// of the segment files instead of a `pread` per read. Default: `true`.
    /// A replay of a durable record is then zero-copy (its body shares the
    /// map). Maps never reach past what the engine wrote, and the engine
    /// never cuts a file below what a handed-out body may point at; but a
    /// disk that fails to read a mapped page back kills the process with
    /// `SIGBUS` where a `pread` would have returned `Error::Io`, and so
    /// does another program truncating a segment file. Turn it off to
    /// trade the speed for those cases. Only storages that can map
    /// ([`FsStorage`](crate::storage::FsStorage)) do.
    pub mmap_reads: bool,
    /// Seal stored bodies (the outcome bytes of completed records) with
    /// XChaCha20-Poly1305 under these keys: the current key seals every body
    /// written, older keys open what they sealed, and `Engine::compact`
    /// seals every record it keeps under the current key. Default: `None`
    /// (bodies are stored as given; sealed bodies found in the files answer
    /// [`Error::MissingKey`] when read). Opening an engine never needs a
    /// key: only reading a body does. Cost: about 1.2 µs plus 1 ns per
    /// byte of body on a complete and on each read of the body (a sealed
    /// replay is also a copy, not a zero-copy slice; README, "Encryption at
    /// rest"), and 44 bytes per completed record on disk. Needs the
    /// `encryption` feature; see `docs/OPERATIONS.md` for key handling and
    /// rotation.
    #[cfg(feature = "encryption")]
    pub encryption: Option<crate::encryption::EncryptionKeys>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            durability: Durability::Sync,
            record_ttl: Duration::from_secs(24 * 60 * 60),
            lease_ttl: Duration::from_secs(30),
            shards: 64,
            max_key_len: 255,
            max_user_len: 255,
            max_response_len: 1 << 20,
            segment_bytes: 64 << 20,
            ascii_keys: true,
            background: true,
            sweep_interval: Duration::from_secs(10),
            compaction_threshold: 0.5,
            heartbeat_limit: Duration::from_secs(5 * 60),
            clock: Arc::new(SystemClock),
            mmap_reads: true,
            #[cfg(feature = "encryption")]
            encryption: None,
        }
    }
}

/// Largest `max_response_len` the log format accepts.
pub(crate) const MAX_RESPONSE_LIMIT: usize = 256 << 20;

impl Options {
    /// Checks every field's range; `Engine::open` calls it.
    ///
    /// # Errors
    /// [`Error::InvalidOptions`] naming the first field out of range.
    pub fn validate(&self) -> Result<()> {
        let bad = |field, problem| Err(Error::InvalidOptions { field, problem });
        if !(1..=65_536).contains(&self.shards) {
            return bad("shards", "must be 1 to 65536");
        }
        if !(1..=usize::from(u16::MAX)).contains(&self.max_key_len) {
            return bad("max_key_len", "must be 1 to 65535");
        }
        if self.max_user_len > usize::from(u16::MAX) {
            return bad("max_user_len", "must be at most 65535");
        }
        if self.max_response_len > MAX_RESPONSE_LIMIT {
            return bad("max_response_len", "must be at most 256 MiB");
        }
        if !(4096..=(1 << 28)).contains(&self.segment_bytes) {
            return bad("segment_bytes", "must be 4 KiB to 256 MiB");
        }
        if self.lease_ttl.is_zero() {
            return bad("lease_ttl", "must be more than zero");
        }
        if self.record_ttl.is_zero() {
            return bad("record_ttl", "must be more than zero");
        }
        if !(0.0..=1.0).contains(&self.compaction_threshold) {
            return bad("compaction_threshold", "must be 0.0 to 1.0");
        }
        if self.sweep_interval.is_zero() {
            return bad("sweep_interval", "must be more than zero");
        }
        if self.durability == Durability::Periodic(Duration::ZERO) {
            return bad("durability", "a periodic interval must be more than zero");
        }
        Ok(())
    }
}
