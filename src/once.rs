//! The one-call API: [`Engine::run_once`] begins, runs the work only when
//! this caller owns the key, stores or releases, and answers retries from
//! the store; [`Engine::consume_once`] does the same for queue messages.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::engine::Engine;
use crate::error::Error;
use crate::outcome::{Begin, Fingerprint, Lease, Outcome};

/// How the work of [`Engine::run_once`] failed.
#[derive(Debug)]
pub enum WorkError<E> {
    /// Worth retrying (a timeout, a 5xx from a dependency): the key is
    /// released, so a retry runs the work again. `?` on any `E` gives this.
    Retryable(E),
    /// Final: the outcome to store (say, a 402 or 422 response) is replayed
    /// to every retry, and the work does not run again.
    Final(E, Outcome),
}

impl<E> From<E> for WorkError<E> {
    fn from(error: E) -> WorkError<E> {
        WorkError::Retryable(error)
    }
}

/// Why [`Engine::run_once`] returned no outcome.
#[derive(Debug, thiserror::Error)]
pub enum RunError<E> {
    /// Another caller is doing the work now (HTTP 409 with `Retry-After`).
    #[error("the key is in flight; retry after {retry_after:?}")]
    InFlight {
        /// Time until the other caller's lease expires.
        retry_after: Duration,
    },
    /// The key was used for a different request (HTTP 422).
    #[error("the key was used for a different request")]
    Mismatch,
    /// The work failed; `stored` tells whether a final outcome was stored
    /// (retries replay it) or the key was released (retries run again).
    #[error("the work failed (outcome stored: {stored})")]
    Work {
        /// The work's error.
        error: E,
        /// Whether the failure's outcome was stored.
        stored: bool,
    },
    /// The engine failed (I/O, a lost lease, bad input, closed).
    #[error(transparent)]
    Engine(#[from] Error),
}

/// The result of [`Engine::run_once`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Done {
    /// The outcome: fresh from the work, or the stored one.
    pub outcome: Outcome,
    /// Whether it was replayed from the store (the work did not run).
    pub replayed: bool,
}

/// Knobs of [`Engine::run_once_with`] and
/// [`AsyncEngine::run_once_with`](crate::AsyncEngine::run_once_with).
///
/// Build it with struct update syntax,
/// `RunOptions { wait, ..RunOptions::default() }`: fields may be added.
/// (It is `Clone`, not `Copy`: [`RunOptions::on_replay`] holds a closure.)
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunOptions {
    /// While the work runs, extend the lease every `heartbeat` (by
    /// `Options::lease_ttl`), so long work keeps its key: an
    /// [`Engine::heartbeat`] for the work's duration, served by the
    /// engine's heartbeat thread and capped by `Options::heartbeat_limit`.
    /// Default: off (`None`, or a zero interval).
    pub heartbeat: Option<Duration>,
    /// When the key is in flight, wait up to this long for the other
    /// caller's outcome before answering [`RunError::InFlight`]. Default: 0.
    pub wait: Duration,
    /// Called with the stored outcome before `run_once` returns a replay
    /// (a [`Done`] with `replayed: true`), and told whether the replay was
    /// served after waiting for an in-flight key ([`RunOptions::wait`]);
    /// never called when the work runs, nor for any error. For metrics and
    /// logs of replays. Default: none.
    ///
    /// ```
    /// # use std::sync::{Arc, atomic::{AtomicU64, Ordering}};
    /// # use idemkv::{Engine, Options, Outcome, ReplayHook, RunOptions, WorkError};
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let engine = Engine::open(dir.path(), Options::default()).unwrap();
    /// let replays = Arc::new(AtomicU64::new(0));
    /// let seen = Arc::clone(&replays);
    /// let options = RunOptions {
    ///     on_replay: Some(ReplayHook::new(move |replay| {
    ///         assert_eq!(replay.outcome().status, 201);
    ///         seen.fetch_add(1, Ordering::Relaxed);
    ///     })),
    ///     ..RunOptions::default()
    /// };
    /// let charge = |_: &idemkv::RunContext<'_>| -> Result<Outcome, WorkError<()>> {
    ///     Ok(Outcome { status: 201, body: "ch_1".into() })
    /// };
    /// engine.run_once_with("user", "order-1", b"amount=10", options.clone(), charge).unwrap();
    /// engine.run_once_with("user", "order-1", b"amount=10", options, charge).unwrap();
    /// assert_eq!(replays.load(Ordering::Relaxed), 1);
    /// ```
    pub on_replay: Option<ReplayHook>,
}

impl RunOptions {
    /// Hands `done` back, first calling [`RunOptions::on_replay`] if it is
    /// a replay.
    pub(crate) fn replayed<E>(
        &self,
        done: Result<Done, RunError<E>>,
        waited: bool,
    ) -> Result<Done, RunError<E>> {
        if let (Some(hook), Ok(done)) = (&self.on_replay, &done)
            && done.replayed
        {
            (hook.0)(&RunReplay {
                outcome: &done.outcome,
                waited,
            });
        }
        done
    }
}

/// A hook for [`RunOptions::on_replay`]: a closure over the
/// [`RunReplay`] of each replay. Cloning shares the closure; two hooks are
/// equal only if they share one closure.
#[derive(Clone)]
pub struct ReplayHook(Arc<dyn Fn(&RunReplay<'_>) + Send + Sync>);

impl ReplayHook {
    /// A hook that calls `hook` on every replay.
    pub fn new<F>(hook: F) -> ReplayHook
    where
        F: Fn(&RunReplay<'_>) + Send + Sync + 'static,
    {
        ReplayHook(Arc::new(hook))
    }
}

impl fmt::Debug for ReplayHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReplayHook(..)")
    }
}

impl PartialEq for ReplayHook {
    fn eq(&self, other: &ReplayHook) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for ReplayHook {}

/// What a [`RunOptions::on_replay`] hook sees of a replay.
#[derive(Debug)]
pub struct RunReplay<'a> {
    outcome: &'a Outcome,
    waited: bool,
}

impl RunReplay<'_> {
    /// The stored outcome, as `run_once` returns it.
    pub fn outcome(&self) -> &Outcome {
        self.outcome
    }

    /// Whether the replay was served after waiting for the key's first
    /// caller ([`RunOptions::wait`]): the key was in flight when this call
    /// began, and its outcome was stored while this call waited. `false`
    /// for a key already completed when the call began.
    pub fn waited(&self) -> bool {
        self.waited
    }
}

/// What the work sees of its claim.
#[derive(Debug)]
pub struct RunContext<'a> {
    lease: &'a Lease,
}

impl RunContext<'_> {
    /// The fencing token of this run: pass it to downstream systems so they
    /// can refuse a late write from an older run of the same key.
    pub fn token(&self) -> u64 {
        self.lease.token()
    }

    /// The lease this run holds.
    pub fn lease(&self) -> &Lease {
        self.lease
    }
}

/// The body stored in place of an outcome's body that is larger than the
/// engine's `Options::max_response_len`: [`Engine::run_once`] stores the
/// work's status with this body, so a retry is replayed that status and
/// this text (and the work does not run again), while the first caller gets
/// the full outcome. (An engine whose limit is below this text's length
/// stores an empty body instead.)
pub const BODY_NOT_KEPT: &[u8] = b"idemkv: the original response body was too large to store";

/// What `run_once` (sync or async) does with `begin`'s answer: the lease to
/// run the work under, or the call's result without running it.
pub(crate) fn lease_or_done<E>(answer: Begin) -> Result<Lease, Result<Done, RunError<E>>> {
    match answer {
        Begin::Started(lease) => Ok(lease),
        Begin::Replay(outcome) => Err(Ok(Done {
            outcome,
            replayed: true,
        })),
        Begin::Mismatch => Err(Err(RunError::Mismatch)),
        Begin::InFlight { retry_after } => Err(Err(RunError::InFlight { retry_after })),
    }
}

/// The outcome stored in place of one with status `status` whose body is
/// larger than `max`: [`BODY_NOT_KEPT`] as the body, or an empty one if
/// even that is larger.
pub(crate) fn not_kept(status: u16, max: usize) -> Outcome {
    let note = if BODY_NOT_KEPT.len() <= max {
        BODY_NOT_KEPT
    } else {
        b""
    };
    Outcome {
        status,
        body: bytes::Bytes::from_static(note),
    }
}

/// Whether [`Engine::consume_once`] handled the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// The handler ran and succeeded; the message id is recorded.
    Processed,
    /// The message id was seen before: the handler did not run.
    Duplicate,
}

impl Engine {
    /// Runs `work` at most once per `(user, key)` and request: begins with
    /// the fingerprint of `request`; if this caller owns the key, runs
    /// `work`, stores its outcome (or a [`WorkError::Final`] outcome), or
    /// releases the key on a [`WorkError::Retryable`] error; if the key was
    /// completed before, returns the stored outcome without running `work`.
    ///
    /// ```
    /// # use idemkv::{Engine, Options, Outcome};
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let engine = Engine::open(dir.path(), Options::default()).unwrap();
    /// let charge = |_: &idemkv::RunContext<'_>| -> Result<Outcome, idemkv::WorkError<std::io::Error>> {
    ///     Ok(Outcome { status: 201, body: "ch_1".into() })
    /// };
    /// let first = engine.run_once("user", "order-1", b"amount=10", charge).unwrap();
    /// let retry = engine.run_once("user", "order-1", b"amount=10", charge).unwrap();
    /// assert!(!first.replayed && retry.replayed);
    /// assert_eq!(first.outcome, retry.outcome);
    /// ```
    ///
    /// If `work` panics, the panic propagates (a heartbeat stops at once) and
    /// the key stays claimed until its lease expires: the work may have had
    /// effects. If the outcome's body is larger than the engine keeps, the
    /// status is stored with [`BODY_NOT_KEPT`] as its body: this caller gets
    /// the full outcome, retries get the status and that text, and the work
    /// never runs twice.
    ///
    /// # Errors
    /// [`RunError::InFlight`], [`RunError::Mismatch`], [`RunError::Work`],
    /// or [`RunError::Engine`] for the engine's own errors.
    pub fn run_once<E>(
        &self,
        user: impl AsRef<[u8]>,
        key: impl AsRef<[u8]>,
        request: &[u8],
        work: impl FnOnce(&RunContext<'_>) -> Result<Outcome, WorkError<E>>,
    ) -> Result<Done, RunError<E>> {
        self.run_once_with(user, key, request, RunOptions::default(), work)
    }

    /// [`Engine::run_once`] with a heartbeat for long work and a wait for
    /// in-flight keys.
    ///
    /// # Errors
    /// As [`Engine::run_once`].
    pub fn run_once_with<E>(
        &self,
        user: impl AsRef<[u8]>,
        key: impl AsRef<[u8]>,
        request: &[u8],
        options: RunOptions,
        work: impl FnOnce(&RunContext<'_>) -> Result<Outcome, WorkError<E>>,
    ) -> Result<Done, RunError<E>> {
        let (user, key) = (user.as_ref(), key.as_ref());
        let fingerprint = Fingerprint::of(request);
        // A zero wait is a plain begin; otherwise, while another caller
        // holds the key, wait for its lease to end and answer as begin
        // would then (its outcome is replayed only for the same
        // fingerprint; if it released or expired, this caller takes over).
        let (answer, waited) = self.begin_waited(user, key, fingerprint, options.wait)?;
        let lease = match lease_or_done(answer) {
            Ok(lease) => lease,
            Err(done) => return options.replayed(done, waited),
        };
        // The heartbeat ends when the work returns, or when its panic
        // unwinds past the handle (the lease is then left to expire).
        let heartbeat = options.heartbeat.map(|every| self.heartbeat(&lease, every));
        let result = work(&RunContext { lease: &lease });
        drop(heartbeat);
        // Once the work has run, its key is never released because of its
        // result's size: an outcome too large to keep is stored with its
        // status and `BODY_NOT_KEPT` as its body (see `store`).
        match result {
            Ok(outcome) => {
                self.store(&lease, &outcome)?;
                Ok(Done {
                    outcome,
                    replayed: false,
                })
            }
            Err(WorkError::Final(error, outcome)) => {
                self.store(&lease, &outcome)?;
                Err(RunError::Work {
                    error,
                    stored: true,
                })
            }
            Err(WorkError::Retryable(error)) => {
                self.release(&lease)?;
                Err(RunError::Work {
                    error,
                    stored: false,
                })
            }
        }
    }

    /// Completes `lease` with `outcome`; if the body is larger than the
    /// engine keeps, completes it with the same status and
    /// [`BODY_NOT_KEPT`] as the body instead, so that retries get a
    /// defined answer and the work never runs again.
    fn store(&self, lease: &Lease, outcome: &Outcome) -> crate::Result<()> {
        match self.complete(lease, outcome.clone()) {
            Err(Error::ResponseTooLarge { max, .. }) => {
                self.complete(lease, not_kept(outcome.status, max))
            }
            other => other,
        }
    }

    /// Processes a queue message at most once: `user` is the topic or
    /// partition, `message_id` the message's id, `payload` its body (a
    /// redelivery with another payload under the same id is a
    /// [`RunError::Mismatch`]). Runs `handler` only for a message not seen
    /// before; a handler error releases the id, so a redelivery runs again.
    ///
    /// # Errors
    /// [`RunError::InFlight`] while another consumer handles the same
    /// message (nack it for redelivery); otherwise as [`Engine::run_once`].
    pub fn consume_once<E>(
        &self,
        topic: impl AsRef<[u8]>,
        message_id: impl AsRef<[u8]>,
        payload: &[u8],
        handler: impl FnOnce() -> Result<(), E>,
    ) -> Result<Delivery, RunError<E>> {
        let done = self.run_once(topic, message_id, payload, |_| {
            handler()?;
            Ok(Outcome {
                status: 0,
                body: bytes::Bytes::new(),
            })
        })?;
        Ok(if done.replayed {
            Delivery::Duplicate
        } else {
            Delivery::Processed
        })
    }
}
