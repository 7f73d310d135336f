//! Shared helpers for the integration tests: an engine in a temporary
//! directory driven by a [`ManualClock`], and unwrappers for the answers of
//! `begin` and the errors of owner calls.
//!
//! Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

pub mod gate;

use std::fmt::Debug;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use idemkv::{
    Begin, Durability, Engine, Error, Fingerprint, KeyPart, KeyProblem, Lease, LostReason,
    ManualClock, Options, Outcome,
};
use tempfile::TempDir;

/// Where every test's manual clock starts, in ms since the Unix epoch.
pub const START_MS: u64 = 1_700_000_000_000;
/// The lease TTL every test engine uses (the default, set explicitly).
pub const LEASE_TTL: Duration = Duration::from_secs(30);
/// The record TTL every test engine uses (the default, set explicitly).
pub const RECORD_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// A duration in whole milliseconds.
pub fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).expect("duration fits in u64 ms")
}

/// The options of a test engine: `Durability::Sync`, the manual clock and
/// the TTLs above.
pub fn options(clock: &Arc<ManualClock>) -> Options {
    Options {
        durability: Durability::Sync,
        lease_ttl: LEASE_TTL,
        record_ttl: RECORD_TTL,
        clock: clock.clone(),
        ..Options::default()
    }
}

/// An engine in its own temporary directory, with the clock that drives it.
///
/// Derefs to the [`Engine`]. Fields drop in order: the engine first (which
/// releases the directory lock), then the directory.
pub struct Harness {
    pub engine: Engine,
    pub clock: Arc<ManualClock>,
    pub options: Options,
    pub dir: TempDir,
}

impl Deref for Harness {
    type Target = Engine;
    fn deref(&self) -> &Engine {
        &self.engine
    }
}

impl Harness {
    /// A fresh engine with the default test options.
    pub fn new() -> Harness {
        Harness::with(|_| {})
    }

    /// A fresh engine with the test options changed by `tweak`.
    pub fn with(tweak: impl FnOnce(&mut Options)) -> Harness {
        let dir = tempfile::tempdir().expect("create tempdir");
        let clock = Arc::new(ManualClock::new(START_MS));
        let mut options = options(&clock);
        tweak(&mut options);
        let engine = Engine::open(dir.path(), options.clone()).expect("open engine");
        Harness {
            engine,
            clock,
            options,
            dir,
        }
    }

    /// Drops the engine and opens a new one on the same directory with the
    /// same options and clock (a clean restart).
    pub fn reopen(self) -> Harness {
        let Harness {
            engine,
            clock,
            options,
            dir,
        } = self;
        drop(engine);
        let engine = Engine::open(dir.path(), options.clone()).expect("reopen engine");
        Harness {
            engine,
            clock,
            options,
            dir,
        }
    }

    /// Moves the engine's clock forward.
    pub fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }

    /// The engine clock's current time.
    pub fn now_ms(&self) -> u64 {
        idemkv::Clock::now_ms(&*self.clock)
    }

    /// `begin`, which must answer `Started`.
    pub fn start(&self, user: &str, key: &str, fp: Fingerprint) -> Lease {
        started(self.begin(user, key, fp).expect("begin"))
    }
}

/// A fingerprint named by a short string.
pub fn fp(request: &str) -> Fingerprint {
    Fingerprint::of(request.as_bytes())
}

/// An outcome from a status and a body.
pub fn outcome(status: u16, body: impl Into<Bytes>) -> Outcome {
    Outcome {
        status,
        body: body.into(),
    }
}

/// The lease of a `Begin::Started`; panics on any other answer.
pub fn started(answer: Begin) -> Lease {
    match answer {
        Begin::Started(lease) => lease,
        other => panic!("expected Started, got {other:?}"),
    }
}

/// The outcome of a `Begin::Replay`; panics on any other answer.
pub fn replayed(answer: Begin) -> Outcome {
    match answer {
        Begin::Replay(outcome) => outcome,
        other => panic!("expected Replay, got {other:?}"),
    }
}

/// The `retry_after` of a `Begin::InFlight`; panics on any other answer.
pub fn in_flight(answer: Begin) -> Duration {
    match answer {
        Begin::InFlight { retry_after } => retry_after,
        other => panic!("expected InFlight, got {other:?}"),
    }
}

/// Panics unless the answer is `Begin::Mismatch`.
pub fn mismatch(answer: Begin) {
    match answer {
        Begin::Mismatch => {}
        other => panic!("expected Mismatch, got {other:?}"),
    }
}

/// The token and reason of an `Error::LeaseLost`; panics on anything else.
pub fn lease_lost<T: Debug>(result: idemkv::Result<T>) -> (u64, LostReason) {
    match result {
        Err(Error::LeaseLost { token, reason }) => (token, reason),
        other => panic!("expected Err(LeaseLost), got {other:?}"),
    }
}

/// The part and problem of an `Error::InvalidKey`; panics on anything else.
pub fn invalid_key<T: Debug>(result: idemkv::Result<T>) -> (KeyPart, KeyProblem) {
    match result {
        Err(Error::InvalidKey { part, problem }) => (part, problem),
        other => panic!("expected Err(InvalidKey), got {other:?}"),
    }
}

/// Panics unless the result is `Err(Error::Closed)`.
pub fn closed<T: Debug>(result: idemkv::Result<T>) {
    match result {
        Err(Error::Closed) => {}
        other => panic!("expected Err(Closed), got {other:?}"),
    }
}
