//! [`Node`]'s calls: [`AsyncEngine`](crate::AsyncEngine)'s, answered by
//! the owner of the user's partition (this node's copy, or another node's
//! through a forwarded call), and the [`IdempotencyStore`] impl that puts
//! a node behind the HTTP layer.
//!
//! Cancellation, as `AsyncEngine`'s wherever the call runs: a `begin` or
//! `begin_wait` future dropped before its answer arrived leaves no claim
//! behind. The call runs on a task of the node's runtime, which drops it
//! once the caller is gone: on this node's copy the engine releases what
//! it granted; a request already forwarded stays out until the owner
//! answers (a forwarded `begin_wait` up to its timeout: the owner cannot
//! be told to stop), and a lease it grants is released through a forwarded
//! `release`. A `complete`, `release` or `extend` either happened or not,
//! never half. What a dropped call cannot undo: a `begin` whose node stops
//! (shut down or killed) before its answer came holds the key until the
//! lease expires, as a caller that dies holding a lease does.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;

use super::node::Node;
use super::wire::{Call, Reply};
use crate::error::{Error, Result, Unavailable};
use crate::outcome::{Begin, Fingerprint, Lease, Outcome, RecordView};
use crate::store::IdempotencyStore;

impl Node {
    /// [`AsyncEngine::begin`](crate::AsyncEngine::begin), on the owner of
    /// `user`'s partition.
    ///
    /// # Errors
    /// As `AsyncEngine::begin`, and [`Error::Unavailable`].
    pub async fn begin(
        &self,
        user: impl AsRef<[u8]>,
        key: impl AsRef<[u8]>,
        fingerprint: Fingerprint,
    ) -> Result<Begin> {
        let call = Call::Begin {
            user: Bytes::copy_from_slice(user.as_ref()),
            key: Bytes::copy_from_slice(key.as_ref()),
            fingerprint,
        };
        match self.claim(call, Duration::ZERO).await? {
            Reply::Begin(b) => Ok(b),
            other => unexpected(other),
        }
    }

    /// [`AsyncEngine::begin_wait`](crate::AsyncEngine::begin_wait), on the
    /// owner.
    ///
    /// # Errors
    /// As `AsyncEngine::begin_wait`, and [`Error::Unavailable`].
    pub async fn begin_wait(
        &self,
        user: impl AsRef<[u8]>,
        key: impl AsRef<[u8]>,
        fingerprint: Fingerprint,
        timeout: Duration,
    ) -> Result<Begin> {
        let call = Call::BeginWait {
            user: Bytes::copy_from_slice(user.as_ref()),
            key: Bytes::copy_from_slice(key.as_ref()),
            fingerprint,
            timeout,
        };
        match self.claim(call, timeout).await? {
            Reply::Begin(b) => Ok(b),
            other => unexpected(other),
        }
    }

    /// [`AsyncEngine::wait`](crate::AsyncEngine::wait), on the owner.
    ///
    /// # Errors
    /// As `AsyncEngine::wait`, and [`Error::Unavailable`].
    pub async fn wait(
        &self,
        user: impl AsRef<[u8]>,
        key: impl AsRef<[u8]>,
        fingerprint: Fingerprint,
        timeout: Duration,
    ) -> Result<Option<Outcome>> {
        let call = Call::Wait {
            user: Bytes::copy_from_slice(user.as_ref()),
            key: Bytes::copy_from_slice(key.as_ref()),
            fingerprint,
            timeout,
        };
        match self.call(call, timeout).await? {
            Reply::Outcome(o) => Ok(o),
            other => unexpected(other),
        }
    }

    /// [`AsyncEngine::complete`](crate::AsyncEngine::complete), on the
    /// owner (any node: a lease from one node completes through another).
    ///
    /// # Errors
    /// As `AsyncEngine::complete`, and [`Error::Unavailable`].
    pub async fn complete(&self, lease: &Lease, outcome: Outcome) -> Result<()> {
        self.complete_inner(lease, outcome, None).await
    }

    /// [`AsyncEngine::complete_with_ttl`](crate::AsyncEngine::complete_with_ttl),
    /// on the owner.
    ///
    /// # Errors
    /// As `AsyncEngine::complete_with_ttl`, and [`Error::Unavailable`].
    pub async fn complete_with_ttl(
        &self,
        lease: &Lease,
        outcome: Outcome,
        ttl: Duration,
    ) -> Result<()> {
        self.complete_inner(lease, outcome, Some(ttl)).await
    }

    async fn complete_inner(
        &self,
        lease: &Lease,
        outcome: Outcome,
        ttl: Option<Duration>,
    ) -> Result<()> {
        let call = Call::Complete {
            lease: lease.clone(),
            outcome,
            ttl,
        };
        match self.call(call, Duration::ZERO).await? {
            Reply::Done => Ok(()),
            other => unexpected(other),
        }
    }

    /// [`AsyncEngine::release`](crate::AsyncEngine::release), on the owner.
    ///
    /// # Errors
    /// As `AsyncEngine::release`, and [`Error::Unavailable`].
    pub async fn release(&self, lease: &Lease) -> Result<()> {
        let call = Call::Release {
            lease: lease.clone(),
        };
        match self.call(call, Duration::ZERO).await? {
            Reply::Done => Ok(()),
            other => unexpected(other),
        }
    }

    /// [`AsyncEngine::extend`](crate::AsyncEngine::extend), on the owner.
    ///
    /// # Errors
    /// As `AsyncEngine::extend`, and [`Error::Unavailable`].
    pub async fn extend(&self, lease: &Lease, by: Duration) -> Result<Lease> {
        let call = Call::Extend {
            lease: lease.clone(),
            by,
        };
        match self.call(call, Duration::ZERO).await? {
            Reply::Lease(l) => Ok(l),
            other => unexpected(other),
        }
    }

    /// [`AsyncEngine::outcome`](crate::AsyncEngine::outcome), on the owner.
    ///
    /// # Errors
    /// As `AsyncEngine::outcome`, and [`Error::Unavailable`].
    pub async fn outcome(
        &self,
        user: impl AsRef<[u8]>,
        key: impl AsRef<[u8]>,
    ) -> Result<Option<Outcome>> {
        let call = Call::Outcome {
            user: Bytes::copy_from_slice(user.as_ref()),
            key: Bytes::copy_from_slice(key.as_ref()),
        };
        match self.call(call, Duration::ZERO).await? {
            Reply::Outcome(o) => Ok(o),
            other => unexpected(other),
        }
    }

    /// [`AsyncEngine::get`](crate::AsyncEngine::get), on the owner.
    ///
    /// # Errors
    /// As `AsyncEngine::get`, and [`Error::Unavailable`].
    pub async fn get(
        &self,
        user: impl AsRef<[u8]>,
        key: impl AsRef<[u8]>,
    ) -> Result<Option<RecordView>> {
        let call = Call::Get {
            user: Bytes::copy_from_slice(user.as_ref()),
            key: Bytes::copy_from_slice(key.as_ref()),
        };
        match self.call(call, Duration::ZERO).await? {
            Reply::View(v) => Ok(v),
            other => unexpected(other),
        }
    }
}

impl Node {
    /// Runs a call that may grant a lease (`begin`, `begin_wait`) on a task
    /// of the node's runtime, so that a caller that drops its future before
    /// the answer arrives leaves no claim behind: the task releases a lease
    /// that nobody received. (Forwarded, the request is out once sent; the
    /// owner grants whether or not the caller still waits.)
    async fn claim(&self, call: Call, waits: Duration) -> Result<Reply> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let node = self.clone();
        self.inner.ctx.runtime.spawn(async move {
            let mut tx = tx;
            let running = node.call(call, waits);
            tokio::pin!(running);
            // A caller gone before the answer: the call is dropped (on this
            // node's copy the engine releases what it granted; requests
            // forwarded are left to `Outstanding`, which releases a grant
            // that arrives later), so a dropped `begin_wait` stops waiting.
            let reply = tokio::select! {
                reply = &mut running => reply,
                () = tx.closed() => return,
            };
            if let Err(Ok(Reply::Begin(Begin::Started(lease)))) = tx.send(reply) {
                // Best effort: a release that fails leaves the lease to
                // expire, as a caller that died holding it would.
                let _ = node.release(&lease).await;
            }
        });
        // The task is gone only if the node's runtime stopped.
        rx.await.unwrap_or(Err(Error::Closed))
    }
}

/// A reply of the wrong shape (or a failure) as the call's result.
fn unexpected<T>(reply: Reply) -> Result<T> {
    match reply {
        Reply::Failed(e) => Err(e),
        _ => Err(Error::Unavailable {
            partition: None,
            reason: Unavailable::NoAnswer,
        }),
    }
}

impl IdempotencyStore for Node {
    fn begin(
        &self,
        user: &[u8],
        key: &[u8],
        fingerprint: Fingerprint,
    ) -> impl Future<Output = Result<Begin>> + Send {
        Node::begin(
            self,
            Bytes::copy_from_slice(user),
            Bytes::copy_from_slice(key),
            fingerprint,
        )
    }

    fn begin_wait(
        &self,
        user: &[u8],
        key: &[u8],
        fingerprint: Fingerprint,
        timeout: Duration,
    ) -> impl Future<Output = Result<Begin>> + Send {
        Node::begin_wait(
            self,
            Bytes::copy_from_slice(user),
            Bytes::copy_from_slice(key),
            fingerprint,
            timeout,
        )
    }

    fn wait(
        &self,
        user: &[u8],
        key: &[u8],
        fingerprint: Fingerprint,
        timeout: Duration,
    ) -> impl Future<Output = Result<Option<Outcome>>> + Send {
        Node::wait(
            self,
            Bytes::copy_from_slice(user),
            Bytes::copy_from_slice(key),
            fingerprint,
            timeout,
        )
    }

    fn complete(&self, lease: &Lease, outcome: Outcome) -> impl Future<Output = Result<()>> + Send {
        Node::complete(self, lease, outcome)
    }

    fn complete_with_ttl(
        &self,
        lease: &Lease,
        outcome: Outcome,
        ttl: Duration,
    ) -> impl Future<Output = Result<()>> + Send {
        Node::complete_with_ttl(self, lease, outcome, ttl)
    }

    fn release(&self, lease: &Lease) -> impl Future<Output = Result<()>> + Send {
        Node::release(self, lease)
    }

    fn extend(&self, lease: &Lease, by: Duration) -> impl Future<Output = Result<Lease>> + Send {
        Node::extend(self, lease, by)
    }

    fn outcome(
        &self,
        user: &[u8],
        key: &[u8],
    ) -> impl Future<Output = Result<Option<Outcome>>> + Send {
        Node::outcome(
            self,
            Bytes::copy_from_slice(user),
            Bytes::copy_from_slice(key),
        )
    }

    fn get(
        &self,
        user: &[u8],
        key: &[u8],
    ) -> impl Future<Output = Result<Option<RecordView>>> + Send {
        Node::get(
            self,
            Bytes::copy_from_slice(user),
            Bytes::copy_from_slice(key),
        )
    }

    fn lease_ttl(&self) -> Duration {
        Node::lease_ttl(self)
    }
}
