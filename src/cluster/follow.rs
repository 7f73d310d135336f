//! Local copies of a partition's stream: opening a copy from its directory,
//! copying the stream in (in batches: one round trip and one sync per batch
//! of messages), and standby copies, which follow a partition another node
//! serves so that taking it over needs only the last few messages.
//!
//! # Standby copies
//! A standby is an engine in follow mode on the partition's directory, fed
//! from an ephemeral pull consumer on the stream. It answers nothing: it is
//! there to be handed to [`Served::take_over`](super::partition::Served)
//! when this node claims the partition, which then copies in only what came
//! after the standby's last batch, fences and serves. A standby that falls
//! behind a trim (its next message was purged) starts over from the stream's
//! first message, as a node taking over does.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::jetstream::{Read, Reader, bounds, changelog, stream_of};
use super::partition::{Ctx, blocking, unavailable};
use super::replicate::{ReplicatingStorage, Replication, reconcile};
use crate::error::{Error, IoOp};
use crate::storage::{FsStorage, Storage};
use crate::{Engine, Result};

/// An open copy: its engine and its replication state.
pub(crate) type Copy = (Arc<Engine>, Arc<Replication>);

/// Why copying in stopped short.
#[derive(Debug)]
pub(crate) enum CatchUp {
    /// The stream was trimmed past the copy: it must start over.
    Trimmed,
    /// The stream was unreachable, or the copy failed, or it was stopped.
    Failed,
}

/// Messages asked for at most in one batch.
const BATCH: u64 = 512;

/// The directory of partition `p`'s copy.
pub(crate) fn copy_dir(ctx: &Ctx, p: u32) -> PathBuf {
    ctx.options.data_dir.join(format!("p{p:04}"))
}

/// Removes a copy's files (its records are all in the stream).
pub(crate) fn wipe(dir: &std::path::Path) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(IoOp::List, dir, e))?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_file() {
            std::fs::remove_file(&path).map_err(|e| Error::io(IoOp::Remove, path.clone(), e))?;
        }
    }
    Ok(())
}

/// The instance number every copy of partition `p` opens its engine with,
/// so that a lease stays valid (by its token) when the partition moves.
fn instance_of(name: &str, p: u32) -> u64 {
    xxhash_rust::xxh3::xxh3_64(format!("{name}/{p}").as_bytes())
}

/// Opens partition `p`'s copy in follow mode: reconciled with its mark,
/// or started over if the stream was trimmed past the mark.
///
/// # Errors
/// The stream unreachable ([`Error::Unavailable`]); the directory cannot
/// be made, read or cut; the engine does not open (another engine holds
/// the directory: [`Error::Locked`]).
pub(crate) async fn open_copy(ctx: &Ctx, p: u32) -> Result<Copy> {
    let dir = copy_dir(ctx, p);
    let local_sync = ctx.options.local_sync();
    let engine_options = ctx.options.partition_engine();
    let log = changelog(
        &ctx.runtime,
        &ctx.js,
        &ctx.names,
        p,
        ctx.options.forward_timeout,
    );
    let instance = instance_of(&ctx.options.name, p);
    let stream = stream_of(&ctx.js, &ctx.names, p, ctx.options.replicas)
        .await
        .map_err(|_| unavailable(p))?;
    let (first, _) = bounds(&stream).await.map_err(|_| unavailable(p))?;
    blocking(move || {
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
    .await
}

/// Closes a copy's engine (off the runtime's threads: it syncs).
pub(crate) async fn close_copy(copy: &Copy) {
    let engine = Arc::clone(&copy.0);
    let _ = blocking(move || engine.close()).await;
}

/// Reads one batch of at most `max` messages (waiting up to `wait` for
/// them; zero: what the stream has now) and copies it in: the frames of
/// all its messages are ingested as one run, made durable, and then the
/// batch's last sequence is marked copied. Returns how many messages it
/// copied.
async fn copy_batch(
    reader: &mut Reader,
    copy: &Copy,
    max: u64,
    wait: Duration,
) -> std::result::Result<u64, CatchUp> {
    let messages = match reader.batch(max as usize, wait).await {
        Ok(Read::Messages(messages)) => messages,
        Ok(Read::Gap) => return Err(CatchUp::Trimmed),
        Err(_) => return Err(CatchUp::Failed),
    };
    let Some(&(last, _)) = messages.last() else {
        return Ok(0);
    };
    // Fences carry no frames.
    let frames: Vec<u8> = messages
        .iter()
        .flat_map(|(_, payload)| payload.iter().copied())
        .collect();
    if !frames.is_empty() {
        let engine = Arc::clone(&copy.0);
        blocking(move || {
            if let Some(pos) = engine.ingest(&frames)? {
                engine.wait_ingested(pos)?;
            }
            Ok(())
        })
        .await
        .map_err(|_| CatchUp::Failed)?;
    }
    copy.1.copied(last);
    Ok(messages.len() as u64)
}

/// Copies in every message from the copy's next sequence up to `last`,
/// through `reader` if it is at that sequence, else through a new one
/// (left in `reader` for the next call); unless `stop` says to stop.
pub(crate) async fn copy_through(
    reader: &mut Option<Reader>,
    stream: &async_nats::jetstream::stream::Stream,
    copy: &Copy,
    last: u64,
    patience: Duration,
    stop: &(dyn Fn() -> bool + Sync),
) -> std::result::Result<(), CatchUp> {
    let next = copy.1.last_seq() + 1;
    if next > last {
        return Ok(());
    }
    if reader.as_ref().is_none_or(|r| r.next() != next) {
        *reader = None;
        let opened = Reader::open(stream, next, patience).await;
        *reader = Some(opened.map_err(|_| CatchUp::Failed)?);
    }
    match reader.as_mut() {
        Some(reader) => copy_until(reader, copy, last, stop).await,
        None => Err(CatchUp::Failed),
    }
}

/// Copies in every message up to `last` (the reader must start at the
/// copy's next sequence), unless `stop` says to stop.
async fn copy_until(
    reader: &mut Reader,
    copy: &Copy,
    last: u64,
    stop: &(dyn Fn() -> bool + Sync),
) -> std::result::Result<(), CatchUp> {
    while reader.next() <= last {
        if stop() {
            return Err(CatchUp::Failed);
        }
        let want = (last + 1 - reader.next()).min(BATCH);
        if copy_batch(reader, copy, want, Duration::from_secs(1)).await? == 0 {
            // The stream said it had them: it is unreachable or moving.
            return Err(CatchUp::Failed);
        }
    }
    Ok(())
}

/// A standby copy of a partition this node does not serve.
#[derive(Debug)]
pub(crate) struct Standby {
    partition: u32,
    /// The copy while it is open; held across each batch, so that
    /// [`take`](Self::take) gets a copy between batches.
    copy: tokio::sync::Mutex<Option<Copy>>,
    stopped: AtomicBool,
    stop_signal: tokio::sync::Notify,
}

impl Standby {
    /// A standby of partition `p`, following nothing yet (see
    /// [`follow`](Self::follow)).
    pub fn new(p: u32) -> Arc<Standby> {
        Arc::new(Standby {
            partition: p,
            copy: tokio::sync::Mutex::new(None),
            stopped: AtomicBool::new(false),
            stop_signal: tokio::sync::Notify::new(),
        })
    }

    fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// Sleeps for `span`, or until stopped.
    async fn pause(&self, span: Duration) {
        let stopped = self.stop_signal.notified();
        if self.is_stopped() {
            return;
        }
        let _ = tokio::time::timeout(span, stopped).await;
    }

    /// Follows the partition's stream until stopped: opens the copy,
    /// copies in batch after batch, and polls when it has caught up. A
    /// failure (the stream unreachable, the directory still held by a copy
    /// closing) is retried after a pause.
    pub async fn follow(self: Arc<Self>, ctx: Ctx) {
        let p = self.partition;
        let idle = (ctx.options.ownership_ttl / 16)
            .clamp(Duration::from_millis(20), Duration::from_millis(250));
        let retry = ctx.options.ownership_ttl / 2;
        let mut reader: Option<Reader> = None;
        while !self.is_stopped() {
            let mut guard = self.copy.lock().await;
            if self.is_stopped() {
                break;
            }
            if guard.is_none() {
                reader = None;
                match open_copy(&ctx, p).await {
                    Ok(copy) => *guard = Some(copy),
                    Err(_) => {
                        drop(guard);
                        self.pause(retry).await;
                        continue;
                    }
                }
            }
            let Some(copy) = guard.as_ref() else { continue };
            if reader.is_none() {
                let start = copy.1.last_seq() + 1;
                reader = match stream_of(&ctx.js, &ctx.names, p, ctx.options.replicas).await {
                    Ok(stream) => Reader::open(&stream, start, retry).await.ok(),
                    Err(_) => None,
                };
            }
            let copied = match reader.as_mut() {
                Some(reader) => copy_batch(reader, copy, BATCH, Duration::ZERO).await,
                None => Err(CatchUp::Failed),
            };
            match copied {
                Ok(0) => {
                    drop(guard);
                    self.pause(idle).await;
                }
                Ok(_) => {}
                Err(CatchUp::Trimmed) => {
                    // Start over from the stream's first message.
                    if let Some(copy) = guard.take() {
                        close_copy(&copy).await;
                    }
                    let dir = copy_dir(&ctx, p);
                    let _ = blocking(move || wipe(&dir)).await;
                }
                Err(CatchUp::Failed) => {
                    reader = None;
                    if copy.1.failed()
                        && let Some(copy) = guard.take()
                    {
                        close_copy(&copy).await;
                    }
                    drop(guard);
                    self.pause(retry).await;
                }
            }
        }
    }

    /// Stops following and hands the copy over (`None` if none is open),
    /// between two batches.
    pub async fn take(&self) -> Option<Copy> {
        self.stopped.store(true, Ordering::SeqCst);
        self.stop_signal.notify_waiters();
        self.copy.lock().await.take()
    }

    /// Stops following and closes the copy.
    pub async fn close(&self) {
        if let Some(copy) = self.take().await {
            close_copy(&copy).await;
        }
    }
}
