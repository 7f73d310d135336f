//! The one error type of the crate.
//!
//! Normal answers of [`Engine::begin`](crate::Engine::begin) (a replay, a
//! request in flight, a fingerprint mismatch) are variants of
//! [`Begin`](crate::Begin), not errors. An [`Error`] means the call did not do
//! what was asked, and says why with structured data.

use std::io;
use std::path::PathBuf;

/// A `Result` whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why an engine call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The user id or the idempotency key was rejected; nothing was changed.
    #[error("invalid {part}: {problem}")]
    InvalidKey {
        /// Which argument was rejected.
        part: KeyPart,
        /// What is wrong with it.
        problem: KeyProblem,
    },

    /// The response body is larger than `Options::max_response_len`; nothing
    /// was changed, and the lease can still complete with a smaller body.
    #[error("response body of {len} bytes exceeds the limit of {max} bytes")]
    ResponseTooLarge {
        /// Length of the rejected body in bytes.
        len: usize,
        /// The configured limit in bytes.
        max: usize,
    },

    /// The lease is no longer the live owner of its record: it expired, was
    /// released, or was taken over by a newer lease (fencing).
    #[error("lease with token {token} was lost ({reason})")]
    LeaseLost {
        /// The stale token the caller presented.
        token: u64,
        /// Why the lease is no longer valid.
        reason: LostReason,
    },

    /// A log file holds bytes that fail their checksum or do not parse, at a
    /// place where valid records follow (so it is not a torn tail).
    #[error("corrupt log {}: {kind} at offset {offset}", file.display())]
    Corrupt {
        /// The damaged file.
        file: PathBuf,
        /// Byte offset of the first bad byte found.
        offset: u64,
        /// What was wrong.
        kind: CorruptKind,
    },

    /// The disk is full. Nothing acknowledged was lost; the engine refuses
    /// further writes until it is reopened.
    #[error("no space left while trying to {op} {}", path.display())]
    NoSpace {
        /// The operation that failed.
        op: IoOp,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// An I/O operation failed.
    #[error("i/o error while trying to {op} {}", path.display())]
    Io {
        /// The operation that failed.
        op: IoOp,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// An earlier write or fsync failed, so the engine no longer knows what
    /// is on disk. Every write is refused until the engine is reopened
    /// (recovery then decides from the files alone).
    #[error("engine is read-only after an earlier i/o failure ({kind}); reopen it")]
    Poisoned {
        /// The kind of the original failure.
        kind: io::ErrorKind,
    },

    /// Another engine (in this process or another) holds the directory.
    #[error("directory {} is locked by another engine", dir.display())]
    Locked {
        /// The locked data directory.
        dir: PathBuf,
    },

    /// A salvage of the directory (`idemkv::salvage`, `idemkv salvage DIR`)
    /// was interrupted after its commit point: some segment files may be
    /// salvaged and others not yet, so no engine opens it. Nothing was
    /// changed; run the salvage again, which finishes the interrupted one
    /// (its plan is in the directory's `SALVAGE` file).
    #[error("an interrupted salvage of {} is pending; run salvage again to finish it", dir.display())]
    SalvagePending {
        /// The data directory.
        dir: PathBuf,
    },

    /// The engine was closed.
    #[error("engine is closed")]
    Closed,

    /// The call would wait for the calling thread itself: `compact`,
    /// `compact_below`, `close` or `for_each_record` called from inside a
    /// `for_each_record` callback (which holds compaction off). Nothing was
    /// changed; call it after the callback returns.
    #[error("{call} called from inside a for_each_record callback")]
    Reentrant {
        /// The call that was refused.
        call: &'static str,
    },

    /// A counter that has a fixed width on disk or in memory ran out (fencing
    /// tokens past 2^48, more than 2^24 - 1 segment files at once); nothing was
    /// changed.
    #[error("{what} are exhausted")]
    Exhausted {
        /// What ran out.
        what: &'static str,
    },

    /// An argument is accepted by the type but would make the call
    /// meaningless (a zero TTL, a zero extension); nothing was changed.
    #[error("invalid argument {name}: {problem}")]
    InvalidArgument {
        /// The argument.
        name: &'static str,
        /// The accepted range.
        problem: &'static str,
    },

    /// The engine's clock reads a time the index cannot represent (at or
    /// past 2^43 - 1 ms since the Unix epoch, the year 2248): every deadline
    /// would be clamped to it and nothing would ever be live. Nothing was
    /// changed; fix the clock.
    #[error("clock reads {now_ms} ms, past the latest representable time {max_ms} ms")]
    ClockOutOfRange {
        /// What the clock read (the later of wall and lease time).
        now_ms: u64,
        /// The latest time the engine accepts.
        max_ms: u64,
    },

    /// The lease was issued by another engine: one on another directory, or
    /// an earlier open of this one. Nothing was changed.
    #[error("the lease with token {token} was issued by another engine")]
    ForeignLease {
        /// The token of the rejected lease.
        token: u64,
    },

    /// A sealed body (`Options::encryption`) names a key that is not
    /// configured: pass the key with this id (as the current key or an
    /// older one) to open it. Without the `encryption` feature every sealed
    /// body answers this. Nothing was changed.
    #[error(
        "no key with id {key_id} to open the sealed body of the record at offset {offset} of {}",
        file.display()
    )]
    MissingKey {
        /// The id of the key the body was sealed under.
        key_id: u32,
        /// The segment file that holds the record.
        file: PathBuf,
        /// The record's offset in the file.
        offset: u64,
    },

    /// The operating system's random number generator failed, so no nonce
    /// could be drawn to seal a body (`Options::encryption`); nothing was
    /// written.
    #[error("the system random number generator failed")]
    Random {
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// An `Options` field is out of range.
    #[error("invalid option {field}: {problem}")]
    InvalidOptions {
        /// The offending field of `Options`.
        field: &'static str,
        /// The accepted range.
        problem: &'static str,
    },

    /// A cluster node (`cluster::Node`) could not get an answer for the
    /// user's partition: see [`Unavailable`] for what is known of the call.
    #[error("the cluster is unavailable (partition {partition:?}): {reason}")]
    Unavailable {
        /// The user's partition (`None`: the cluster as a whole, as when a
        /// node cannot start).
        partition: Option<u32>,
        /// Why, and whether the call may have happened.
        reason: Unavailable,
    },
}

/// Why a cluster node could not answer ([`Error::Unavailable`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Unavailable {
    /// No node served the partition within the forwarding timeout (it is
    /// moving, or its owner is down and its ownership has not expired yet).
    /// The call did not happen.
    #[error("no node serves it")]
    NoOwner,
    /// The NATS connection failed or timed out while the call was
    /// forwarded: the call may or may not have happened (a retry with the
    /// same key is safe: that is what the key is for).
    #[error("the forwarded call got no answer")]
    NoAnswer,
    /// The owner's copy of the partition failed (its changelog refused an
    /// append, or its disk failed): the call was not acknowledged; the
    /// partition moves or reopens.
    #[error("the owner's copy of the partition failed")]
    CopyFailed,
    /// The NATS system could not be reached, or refused the cluster's
    /// streams or buckets.
    #[error("NATS JetStream could not be reached or refused the request")]
    Nats,
}

/// Which argument an [`Error::InvalidKey`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyPart {
    /// The user id (the scope of the key).
    User,
    /// The idempotency key itself.
    Key,
}

impl std::fmt::Display for KeyPart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeyPart::User => "user id",
            KeyPart::Key => "idempotency key",
        })
    }
}

/// What is wrong with a rejected user id or key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyProblem {
    /// The key is empty.
    #[error("it is empty")]
    Empty,
    /// The value is longer than allowed.
    #[error("{len} bytes is more than the limit of {max}")]
    TooLong {
        /// Actual length in bytes.
        len: usize,
        /// Allowed length in bytes.
        max: usize,
    },
    /// The key holds a byte outside visible ASCII (`0x21..=0x7e`).
    #[error("byte {byte:#04x} at index {index} is not visible ASCII")]
    BadByte {
        /// Position of the byte.
        index: usize,
        /// The byte.
        byte: u8,
    },
}

/// Why a lease was lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LostReason {
    /// The lease deadline passed.
    Expired,
    /// The record was taken over by a newer lease; carries its token.
    Superseded {
        /// The token of the record's current owner (or of its completion).
        current: u64,
    },
    /// The record was completed (by this lease or its successor).
    Completed,
    /// The record no longer exists (released, or swept).
    Gone,
}

impl std::fmt::Display for LostReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LostReason::Expired => f.write_str("the lease expired"),
            LostReason::Superseded { current } => {
                write!(f, "taken over by token {current}")
            }
            LostReason::Completed => f.write_str("the record is already completed"),
            LostReason::Gone => f.write_str("the record no longer exists"),
        }
    }
}

/// What kind of damage an [`Error::Corrupt`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CorruptKind {
    /// The file does not start with the segment magic.
    #[error("bad segment magic")]
    BadMagic,
    /// The segment header was written by an unknown format version.
    #[error("unsupported format version {0}")]
    UnsupportedVersion(u32),
    /// The segment header fails its checksum or names another segment.
    #[error("bad segment header")]
    BadHeader,
    /// A record's checksum does not match its bytes.
    #[error("record checksum mismatch")]
    Checksum,
    /// A record's length or fields do not parse.
    #[error("malformed record")]
    Malformed,
    /// A record refers to a log position that does not exist.
    #[error("dangling log position")]
    Dangling,
    /// The index points at a record of another key or token.
    #[error("record belongs to another key")]
    WrongRecord,
    /// A sealed body fails authentication under the key it names: the
    /// record was altered (its CRC recomputed to match), or the configured
    /// key with that id has other bytes than the key that sealed it.
    #[error("sealed body fails authentication under key {key_id} (altered, or the wrong key)")]
    Authentication {
        /// The id of the key the body names.
        key_id: u32,
    },
}

/// The I/O operation named by [`Error::Io`] and [`Error::NoSpace`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoOp {
    /// Creating the data directory or a file.
    Create,
    /// Opening a file or the directory.
    Open,
    /// Reading.
    Read,
    /// Appending a record.
    Write,
    /// fdatasync of a file.
    Sync,
    /// fsync of the directory.
    SyncDir,
    /// Truncating a torn tail.
    Truncate,
    /// Listing the directory.
    List,
    /// Renaming a file.
    Rename,
    /// Removing a file.
    Remove,
    /// Taking the directory lock.
    Lock,
}

impl std::fmt::Display for IoOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IoOp::Create => "create",
            IoOp::Open => "open",
            IoOp::Read => "read",
            IoOp::Write => "write",
            IoOp::Sync => "sync",
            IoOp::SyncDir => "sync the directory of",
            IoOp::Truncate => "truncate",
            IoOp::List => "list",
            IoOp::Rename => "rename",
            IoOp::Remove => "remove",
            IoOp::Lock => "lock",
        })
    }
}

impl Error {
    /// Wraps an I/O error with its operation and path; a full disk becomes
    /// [`Error::NoSpace`].
    pub(crate) fn io(op: IoOp, path: impl Into<PathBuf>, source: io::Error) -> Error {
        let path = path.into();
        if source.kind() == io::ErrorKind::StorageFull {
            Error::NoSpace { op, path, source }
        } else {
            Error::Io { op, path, source }
        }
    }
}
