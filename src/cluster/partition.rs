//! One partition this node serves: its local copy (an engine on a
//! replicating storage), taken over from the stream, and the calls it
//! answers.
//!
//! # Taking a partition over
//! 1. The node holds the partition's entry in the owners bucket.
//! 2. The copy's directory is reconciled with its mark (`replicate.rs`)
//!    and opened in follow mode; or the node's standby copy of the
//!    partition, already open and nearly current, is taken (`follow.rs`).
//! 3. Every message past the copy's last is copied in, up to the stream's
//!    last, in batches (one round trip and one sync per batch).
//! 4. A fence message is appended, expecting that last sequence. If another
//!    node appended meanwhile (a former owner that has not stopped yet), the
//!    fence is refused: copy in again and retry. Once the fence is in, no
//!    append that expects an earlier sequence can land: the former owner is
//!    cut off whatever its clock says.
//! 5. The copy switches to own mode and the node answers for the partition.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use parking_lot::Mutex;

use super::follow::{CatchUp, Copy, copy_dir, copy_through, open_copy, wipe};
use super::jetstream::{Names, Reader, append, bounds, stream_of};
use super::options::ClusterOptions;
use super::replicate::Replication;
use super::wire::{Call, Reply};
use crate::Result;
use crate::engine::AsyncEngine;
use crate::error::{Error, Unavailable};

/// What a partition needs from its node.
#[derive(Clone, Debug)]
pub(crate) struct Ctx {
    pub options: Arc<ClusterOptions>,
    pub names: Names,
    pub js: jetstream::Context,
    pub runtime: tokio::runtime::Handle,
}

/// A partition this node serves, or is taking over.
#[derive(Debug)]
pub(crate) struct Served {
    pub partition: u32,
    /// The copy, once opened.
    copy: OnceLock<(AsyncEngine, Arc<Replication>)>,
    /// Set once the fence is in: the node answers for the partition.
    ready: AtomicBool,
    /// Until when this node may answer for the partition: its ownership
    /// entry's last heartbeat plus three quarters of the ownership TTL.
    until: Mutex<Instant>,
    /// The owners-bucket revision of this node's entry.
    pub revision: AtomicU64,
    lost: AtomicBool,
    /// Set while a trim runs.
    trimming: AtomicBool,
    /// Notified when the partition is lost (its call subscription ends).
    pub lost_signal: tokio::sync::Notify,
}

pub(crate) fn unavailable(p: u32) -> Error {
    Error::Unavailable {
        partition: Some(p),
        reason: Unavailable::CopyFailed,
    }
}

/// Runs blocking engine work (opening, copying in, closing: they sync, and
/// a sync waits for the stream) off the runtime's worker threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result,
        Err(_) => Err(Error::Closed),
    }
}

fn io_error(p: u32) -> impl Fn(io::Error) -> Error {
    move |_| unavailable(p)
}

impl Served {
    /// A partition this node has just claimed in the owners bucket (entry
    /// `revision`), answering for nothing yet.
    pub fn claimed(p: u32, revision: u64, until: Instant) -> Served {
        Served {
            partition: p,
            copy: OnceLock::new(),
            ready: AtomicBool::new(false),
            until: Mutex::new(until),
            revision: AtomicU64::new(revision),
            lost: AtomicBool::new(false),
            trimming: AtomicBool::new(false),
            lost_signal: tokio::sync::Notify::new(),
        }
    }

    /// Takes the partition over (see the module docs): opens the local
    /// copy (or takes `warm`, a standby's), copies in, fences. On an error
    /// the copy is closed again.
    pub async fn take_over(&self, ctx: &Ctx, warm: Option<Copy>) -> Result<()> {
        let p = self.partition;
        let copy = match warm.filter(|(_, r)| !r.failed()) {
            Some(copy) => copy,
            None => open_copy(ctx, p).await?,
        };
        let (engine, replication) = copy;
        let _ = self.copy.set((AsyncEngine::new(engine), replication));
        let fenced = self.catch_up_and_fence(ctx).await;
        if fenced.is_err() || self.lost.load(Ordering::SeqCst) {
            self.close().await;
            if let Err(CatchUp::Trimmed) = fenced {
                // Trimmed while it was copied in: start over next time.
                let dir = copy_dir(ctx, p);
                let _ = blocking(move || wipe(&dir)).await;
            }
            return Err(unavailable(p));
        }
        self.ready.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Steps 3 and 4 of the module docs.
    async fn catch_up_and_fence(&self, ctx: &Ctx) -> std::result::Result<(), CatchUp> {
        let p = self.partition;
        let Some((engine, replication)) = self.copy.get() else {
            return Err(CatchUp::Failed);
        };
        let copy: Copy = (Arc::clone(engine.engine()), Arc::clone(replication));
        let stream = stream_of(&ctx.js, &ctx.names, p, ctx.options.replicas)
            .await
            .map_err(|_| CatchUp::Failed)?;
        let mut reader: Option<Reader> = None;
        let lost = || self.lost.load(Ordering::SeqCst);
        let patience = ctx.options.forward_timeout;
        for _ in 0..16 {
            let (first, last) = bounds(&stream).await.map_err(|_| CatchUp::Failed)?;
            if lost() {
                return Err(CatchUp::Failed);
            }
            let next = replication.last_seq() + 1;
            if next < first {
                // Only a trim removes messages: what was between is in the
                // snapshot after it, but this copy already holds part of
                // the older history, so it starts over.
                return Err(CatchUp::Trimmed);
            }
            copy_through(&mut reader, &stream, &copy, last, patience, &lost).await?;
            let fence = append(
                &ctx.js,
                ctx.names.log_subject(p),
                Bytes::new(),
                last,
                Some(&ctx.options.node_id),
            )
            .await;
            if let Ok(fence) = fence {
                if fence != last + 1 {
                    // Another writer's messages landed before the fence,
                    // although it expected `last` (see `replicate::interleaved`):
                    // they are in the stream, so copy them in too. Anything
                    // that lands after the fence is caught by the first
                    // append (it must land right after the fence).
                    copy_through(&mut reader, &stream, &copy, fence - 1, patience, &lost).await?;
                }
                replication.take_ownership(fence);
                return Ok(());
            }
            // Another node appended since `last` (or the stream is
            // unreachable): copy in what came, then fence again.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(CatchUp::Failed)
    }

    /// Trims the stream if the copy sent `trim_after` messages since its
    /// last snapshot: appends a snapshot of the live records, then purges
    /// every message before it. Returns whether it trimmed.
    ///
    /// # Errors
    /// A failed snapshot send fails the copy (the partition is given up, as
    /// after a failed sync); a failed purge is retried next time.
    pub async fn trim_if_due(&self, ctx: &Ctx) -> Result<bool> {
        let every = ctx.options.trim_after;
        let Some((engine, replication)) = self.copy.get() else {
            return Ok(false);
        };
        if every == 0 || !self.valid() || replication.sent_since_snapshot() < every {
            return Ok(false);
        }
        if self.trimming.swap(true, Ordering::SeqCst) {
            return Ok(false); // one at a time
        }
        let trimmed = self.trim(ctx, engine, replication).await;
        self.trimming.store(false, Ordering::SeqCst);
        trimmed.map(|()| true)
    }

    async fn trim(
        &self,
        ctx: &Ctx,
        engine: &AsyncEngine,
        replication: &Arc<Replication>,
    ) -> Result<()> {
        let p = self.partition;
        let (engine, replication) = (Arc::clone(engine.engine()), Arc::clone(replication));
        let first = blocking(move || {
            replication
                .send_snapshot(|| engine.snapshot_frames().map_err(io::Error::other))
                .map_err(|_| unavailable(p))
        })
        .await?;
        let stream = stream_of(&ctx.js, &ctx.names, p, ctx.options.replicas)
            .await
            .map_err(io_error(p))?;
        stream
            .purge()
            .sequence(first)
            .await
            .map_err(|_| unavailable(p))?;
        Ok(())
    }

    /// Whether this node may answer for the partition now.
    pub fn valid(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
            && !self.lost.load(Ordering::SeqCst)
            && self.copy.get().is_some_and(|(_, r)| !r.failed())
            && Instant::now() < *self.until.lock()
    }

    /// Whether the partition was lost (or handed off).
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst) || self.copy.get().is_some_and(|(_, r)| r.failed())
    }

    /// A heartbeat landed: answer until `until`.
    pub fn renew(&self, until: Instant, revision: u64) {
        *self.until.lock() = until;
        self.revision.store(revision, Ordering::SeqCst);
    }

    /// Stops answering (ownership lost or handed off).
    pub fn lose(&self) {
        self.lost.store(true, Ordering::SeqCst);
        self.lost_signal.notify_waiters();
    }

    /// Closes the copy (syncing what it holds; after a fence that fails,
    /// which is fine: nothing unsent was acknowledged).
    pub async fn close(&self) {
        self.lose();
        if let Some((engine, _)) = self.copy.get() {
            let engine = Arc::clone(engine.engine());
            let _ = blocking(move || engine.close()).await;
        }
    }

    /// Answers one call. A write that the stream acknowledged is answered
    /// even if ownership was lost meanwhile (it is in the stream: the next
    /// owner has it); a read is answered only if this node still owns the
    /// partition when it is done, else the caller asks again.
    pub async fn execute(&self, call: Call) -> Reply {
        let Some((e, _)) = self.copy.get().filter(|_| self.valid()) else {
            return Reply::NotOwner;
        };
        let (result, read) = match call {
            Call::Begin {
                user,
                key,
                fingerprint,
            } => match e.begin(&user, &key, fingerprint).await {
                Ok(crate::Begin::Started(lease)) => {
                    (Ok(Reply::Begin(crate::Begin::Started(lease))), false)
                }
                other => (other.map(Reply::Begin), true),
            },
            Call::BeginWait {
                user,
                key,
                fingerprint,
                timeout,
            } => match e.begin_wait(&user, &key, fingerprint, timeout).await {
                Ok(crate::Begin::Started(lease)) => {
                    (Ok(Reply::Begin(crate::Begin::Started(lease))), false)
                }
                other => (other.map(Reply::Begin), true),
            },
            Call::Wait {
                user,
                key,
                fingerprint,
                timeout,
            } => (
                e.wait(&user, &key, fingerprint, timeout)
                    .await
                    .map(Reply::Outcome),
                true,
            ),
            Call::Complete {
                lease,
                outcome,
                ttl,
            } => {
                let done = match ttl {
                    Some(ttl) => e.complete_with_ttl(&lease, outcome, ttl).await,
                    None => e.complete(&lease, outcome).await,
                };
                (done.map(|()| Reply::Done), false)
            }
            Call::Release { lease } => (e.release(&lease).await.map(|()| Reply::Done), false),
            Call::Extend { lease, by } => (e.extend(&lease, by).await.map(Reply::Lease), false),
            Call::Outcome { user, key } => (e.outcome(&user, &key).await.map(Reply::Outcome), true),
            Call::Get { user, key } => (e.get(&user, &key).await.map(Reply::View), true),
        };
        match result {
            Ok(_) if read && !self.valid() => Reply::NotOwner,
            Ok(reply) => reply,
            Err(Error::Closed) => Reply::NotOwner,
            Err(
                Error::Io { .. }
                | Error::NoSpace { .. }
                | Error::Poisoned { .. }
                | Error::Corrupt { .. },
            ) => {
                self.lose();
                Reply::Failed(unavailable(self.partition))
            }
            Err(err) => Reply::Failed(err),
        }
    }
}
