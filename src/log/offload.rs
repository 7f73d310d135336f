//! The log's slow chores for async callers: a segment roll and a token
//! reservation each take an fdatasync, which an `AsyncEngine` call must not
//! run on its executor's thread. [`Log::offload`] runs the chore on a short
//! lived thread of its own and returns a future that resolves when it ends;
//! callers that ask while one runs wait for it and then try again (so a
//! crowd of callers that all find the segment full starts one roll, not one
//! thread each). Rolls happen once per segment and reservations once per
//! 2^20 leases, so a thread per chore costs nothing that shows.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use parking_lot::Mutex;

use super::Log;
use crate::error::Result;

/// A chore that needs an fdatasync.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Chore {
    /// Make room for a record of this many bytes ([`Log::make_room`]).
    Room(usize),
    /// Reserve the next block of fencing tokens ([`Log::reserve_tokens`]).
    Tokens,
}

/// Which chore runs, and who waits for it.
#[derive(Debug, Default)]
pub(crate) struct Offload {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// A chore's thread is running.
    running: bool,
    /// Chores finished so far.
    finished: u64,
    /// Futures waiting for the running chore.
    waiting: Vec<Waker>,
}

/// Where a chore's thread leaves its result for the call that started it.
type ResultSlot = Arc<Mutex<Option<Result<()>>>>;

/// The future of [`Log::offload`]: `Ok` once the chore ran (its own error if
/// this call started it, `Ok` for a caller that waited for another's: it
/// tries its write again and meets any lasting failure itself).
#[derive(Debug)]
pub(crate) struct Offloaded {
    log: Arc<Log>,
    chore: Chore,
    /// Set once polled: the number of finished chores after which this one
    /// is done, and the result slot if this call started the chore.
    started: Option<(u64, Option<ResultSlot>)>,
}

impl Log {
    /// Runs `chore` on the calling thread (the blocking API's way).
    pub(crate) fn chore(&self, chore: Chore) -> Result<()> {
        match chore {
            Chore::Room(len) => self.make_room(len),
            Chore::Tokens => self.reserve_tokens(),
        }
    }

    /// Runs `chore` off the caller's thread (see the module docs).
    pub(crate) fn offload(self: &Arc<Self>, chore: Chore) -> Offloaded {
        Offloaded {
            log: Arc::clone(self),
            chore,
            started: None,
        }
    }
}

impl Offloaded {
    /// Starts the chore, or joins the running one; returns what to wait for.
    fn start(&self, s: &mut State) -> (u64, Option<ResultSlot>) {
        let done_after = s.finished + 1;
        if s.running {
            return (done_after, None);
        }
        let slot: ResultSlot = Arc::default();
        let (log, chore, out) = (Arc::clone(&self.log), self.chore, Arc::clone(&slot));
        let spawned = std::thread::Builder::new()
            .name("idemkv-chore".into())
            .spawn(move || {
                let result = log.chore(chore);
                *out.lock() = Some(result);
                let waiting = {
                    let mut s = log.offload.state.lock();
                    s.running = false;
                    s.finished += 1;
                    std::mem::take(&mut s.waiting)
                };
                for w in waiting {
                    w.wake();
                }
            });
        match spawned {
            Ok(_) => {
                s.running = true;
                (done_after, Some(slot))
            }
            Err(_) => {
                // No thread to be had: do it here (rare, and correct).
                let result = self.log.chore(self.chore);
                *slot.lock() = Some(result);
                (s.finished, Some(slot))
            }
        }
    }
}

impl Future for Offloaded {
    type Output = Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let this = self.get_mut();
        let log = Arc::clone(&this.log);
        let mut s = log.offload.state.lock();
        if this.started.is_none() {
            this.started = Some(this.start(&mut s));
        }
        let Some((done_after, slot)) = &this.started else {
            return Poll::Pending; // not reached: set just above
        };
        if s.finished >= *done_after {
            drop(s);
            let result = slot.as_ref().and_then(|slot| slot.lock().take());
            return Poll::Ready(result.unwrap_or(Ok(())));
        }
        if !s.waiting.iter().any(|w| w.will_wake(cx.waker())) {
            s.waiting.push(cx.waker().clone());
        }
        Poll::Pending
    }
}
