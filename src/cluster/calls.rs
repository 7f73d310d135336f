//! [`Node`]'s calls: [`AsyncEngine`](crate::AsyncEngine)'s, answered by
//! the owner of the user's partition (this node's copy, or another node's
//! through a forwarded call), and the [`IdempotencyStore`] impl that puts
//! a node behind the HTTP layer.
//!
//! Cancellation: a call's future dropped while its call is forwarded leaves
//! the call to run on the owner (the request is out): a `begin` granted
//! there holds its key until the lease expires, a `complete` either
//! completed or not. Dropped while the call runs on this node's own copy,
//! it is as `AsyncEngine`'s (a granted `begin` is released).

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
        match self.call(call, Duration::ZERO).await? {
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
        match self.call(call, timeout).await? {
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
