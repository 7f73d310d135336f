//! One partition this node serves: its local copy (an engine on a
//! replicating storage), taken over from the stream, and the calls it
//! answers.
//!
//! # Taking a partition over
//! 1. The node holds the partition's entry in the owners bucket.
//! 2. The copy's directory is reconciled with its mark (`replicate.rs`)
//!    and opened in follow mode.
//! 3. Every message past the mark is copied in, up to the stream's last.
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

use super::jetstream::{Names, append, bounds, changelog, frames_at, stream_of};
use super::options::ClusterOptions;
use super::replicate::{ReplicatingStorage, Replication, reconcile};
use super::wire::{Call, Reply};
use crate::engine::AsyncEngine;
use crate::error::{Error, IoOp, Unavailable};
use crate::storage::{FsStorage, Storage};
use crate::{Engine, Result};

/// Why a catch-up did not end with the fence in.
#[derive(Debug)]
enum CatchUp {
    /// The stream was trimmed under it: the copy must start over.
    Trimmed,
    /// The stream was unreachable, or kept moving, or the copy failed.
    Failed,
}

/// Removes a copy's files (its records are all in the stream).
fn wipe(dir: &std::path::Path) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(IoOp::List, dir, e))?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_file() {
            std::fs::remove_file(&path).map_err(|e| Error::io(IoOp::Remove, path.clone(), e))?;
        }
    }
    Ok(())
}

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

/// The instance number every copy of partition `p` opens its engine with,
/// so that a lease stays valid (by its token) when the partition moves.
fn instance_of(name: &str, p: u32) -> u64 {
    xxhash_rust::xxh3::xxh3_64(format!("{name}/{p}").as_bytes())
}

fn unavailable(p: u32) -> Error {
    Error::Unavailable {
        partition: Some(p),
        reason: Unavailable::CopyFailed,
    }
}

/// Runs blocking engine work (opening, copying in, closing: they sync, and
/// a sync waits for the stream) off the runtime's worker threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
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
    /// copy, copies in, fences. On an error the copy is closed again.
    pub async fn take_over(&self, ctx: &Ctx) -> Result<()> {
        let p = self.partition;
        let dir = ctx.options.data_dir.join(format!("p{p:04}"));
        let local_sync = ctx.options.local_sync();
        let engine_options = ctx.options.partition_engine();
        let timeout = ctx.options.forward_timeout;
        let log = changelog(&ctx.runtime, &ctx.js, &ctx.names, p, timeout);
        let instance = instance_of(&ctx.options.name, p);
        let stream = stream_of(&ctx.js, &ctx.names, p, ctx.options.replicas)
            .await
            .map_err(io_error(p))?;
        let (first, _) = bounds(&stream).await.map_err(io_error(p))?;
        let home = dir.clone();
        let (engine, replication) = blocking(move || {
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(IoOp::Create, dir.clone(), e))?;
            let mut seq = {
                let inner = FsStorage::open(&dir)?;
                let seq = reconcile(&inner).map_err(|e| Error::io(IoOp::Truncate, dir.clone(), e));
                inner.close();
                seq?
            };
            if first > seq + 1 {
                // The stream was trimmed past this copy's mark: the records
                // in between are gone, and the snapshot after them holds the
                // state. Start the copy over from the stream's first message.
                wipe(&dir)?;
                seq = first - 1;
            }
            let inner: Arc<dyn Storage> = Arc::new(FsStorage::open(&dir)?);
            let replication = Replication::new(log, Arc::clone(&inner), local_sync, seq);
            let storage = ReplicatingStorage::new(inner, Arc::clone(&replication));
            let engine = Engine::open_as(Arc::new(storage), engine_options, instance)?;
            Ok((Arc::new(engine), replication))
        })
        .await?;
        let _ = self.copy.set((AsyncEngine::new(engine), replication));
        let fenced = self.catch_up_and_fence(ctx).await;
        if fenced.is_err() || self.lost.load(Ordering::SeqCst) {
            self.close().await;
            if let Err(CatchUp::Trimmed) = fenced {
                // Trimmed while it was copied in: start over next time.
                let _ = blocking(move || wipe(&home)).await;
            }
            return Err(unavailable(p));
        }
        self.ready.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Steps 3 and 4 of the module docs.
    async fn catch_up_and_fence(&self, ctx: &Ctx) -> std::result::Result<(), CatchUp> {
        let p = self.partition;
        let Some((_, replication)) = self.copy.get() else {
            return Err(CatchUp::Failed);
        };
        let stream = stream_of(&ctx.js, &ctx.names, p, ctx.options.replicas)
            .await
            .map_err(|_| CatchUp::Failed)?;
        for _ in 0..16 {
            let (_, last) = bounds(&stream).await.map_err(|_| CatchUp::Failed)?;
            if self.lost.load(Ordering::SeqCst) {
                return Err(CatchUp::Failed);
            }
            let mut seq = replication.last_seq();
            while seq < last {
                seq += 1;
                match frames_at(&stream, seq).await.map_err(|_| CatchUp::Failed)? {
                    Some(frames) => self.copy_in(frames).await.map_err(|_| CatchUp::Failed)?,
                    // Only a trim removes messages: what was between is in
                    // the snapshot after it, but this copy already holds
                    // part of the older history, so it starts over.
                    None => return Err(CatchUp::Trimmed),
                }
                replication.copied(seq);
            }
            let fence = append(
                &ctx.js,
                ctx.names.log_subject(p),
                Bytes::new(),
                last,
                Some(&ctx.options.node_id),
            )
            .await;
            if let Ok(fence) = fence {
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

    async fn copy_in(&self, frames: Bytes) -> Result<()> {
        if frames.is_empty() {
            return Ok(()); // a fence
        }
        let Some((engine, _)) = self.copy.get() else {
            return Err(unavailable(self.partition));
        };
        let engine = Arc::clone(engine.engine());
        blocking(move || {
            if let Some(last) = engine.ingest(&frames)? {
                engine.wait_ingested(last)?;
            }
            Ok(())
        })
        .await
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
