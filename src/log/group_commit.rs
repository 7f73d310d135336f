//! Group commit: one leader fdatasyncs for everyone waiting.
//!
//! A caller that needs its record durable becomes the leader if nobody is
//! syncing; otherwise it waits for the current leader, then checks again.
//! The leader reads the end of what was appended, syncs the active file
//! outside every lock, and publishes the new durable position. Records
//! appended while a sync runs are covered by the next leader's sync, so
//! concurrent callers share syncs instead of queueing one each.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use super::writer::Writer;
use super::{Log, segment_name};
use crate::error::{Error, IoOp, Result};
use crate::storage::StorageFile;

/// The state shared by the callers of one log's syncs.
#[derive(Debug, Default)]
pub(super) struct GroupCommit {
    /// Held across every fdatasync of a segment (group commit and roll), so
    /// that a sync that succeeds after another one failed is never taken to
    /// cover the data the failed one dropped.
    serial: Mutex<()>,
    /// Whether a leader is syncing now.
    leading: Mutex<bool>,
    /// Signalled when a leader finishes.
    done: Condvar,
    /// The periodic flusher, if the mode has one.
    flusher: Mutex<Option<JoinHandle<()>>>,
    /// Set to stop the flusher; signalled through `stop_cv`.
    stop: Mutex<bool>,
    stop_cv: Condvar,
}

impl GroupCommit {
    /// Starts the background thread of `Durability::Periodic`.
    pub fn start_flusher(log: &Arc<Log>, every: Duration) {
        let weak = Arc::downgrade(log);
        let handle = std::thread::Builder::new()
            .name("idemkv-flush".into())
            .spawn(move || {
                loop {
                    let Some(log) = weak.upgrade() else { return };
                    {
                        let mut stop = log.commit.stop.lock();
                        if *stop {
                            return;
                        }
                        let _ = log.commit.stop_cv.wait_for(&mut stop, every);
                        if *stop {
                            return;
                        }
                    }
                    let end = log.written.load(Ordering::Acquire);
                    if end > 0 && !log.is_durable(end - 1) && log.poison.get().is_none() {
                        // A failure poisons the log; callers see it on their next write.
                        let _ = log.sync_past(end - 1);
                    }
                }
            });
        if let Ok(handle) = handle {
            *log.commit.flusher.lock() = Some(handle);
        }
    }

    /// Stops and joins the flusher, if any.
    pub fn stop_flusher(&self) {
        *self.stop.lock() = true;
        self.stop_cv.notify_all();
        if let Some(handle) = self.flusher.lock().take() {
            let _ = handle.join();
        }
    }
}

impl Log {
    /// fdatasyncs segment `id` and, on success, publishes `end` as durable.
    /// Serialized with every other segment sync; refuses to sync once the
    /// log is poisoned (after a failed fsync, a later successful one proves
    /// nothing about the pages the failure dropped).
    pub(super) fn sync_segment(
        &self,
        file: &Arc<dyn StorageFile>,
        id: u64,
        end: u64,
    ) -> Result<()> {
        let _serial = self.commit.serial.lock();
        self.check_poison()?;
        let result = file.sync();
        self.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(()) => {
                self.durable.fetch_max(end, Ordering::AcqRel);
                Ok(())
            }
            Err(e) => {
                self.set_poison(e.kind());
                Err(Error::io(
                    IoOp::Sync,
                    self.storage.path(&segment_name(id)),
                    e,
                ))
            }
        }
    }

    /// After a failed sync: cuts the active segment back to what is known
    /// durable, so that a restart without a crash does not read (and build
    /// on) records whose pages the failed sync may have dropped. Best
    /// effort: if this fails too, recovery still treats what follows the
    /// last durable record as a torn tail or reports it.
    pub(super) fn drop_unsynced(&self, w: &mut Writer) {
        let durable = self.durable.load(Ordering::Acquire);
        if super::file_of(durable) == w.id() {
            let keep = durable & ((1 << 40) - 1);
            let _ = w.truncate_to(keep);
        }
    }

    /// Returns once the byte at position `at` is durable, leading or joining
    /// a group commit as needed.
    ///
    /// # Errors
    /// The leader's sync error for the leader; [`Error::Poisoned`] for every
    /// caller after a failed sync.
    pub(super) fn sync_past(&self, at: u64) -> Result<()> {
        loop {
            if self.is_durable(at) {
                return Ok(());
            }
            self.check_poison()?;
            {
                let mut leading = self.commit.leading.lock();
                if *leading {
                    self.commit.done.wait(&mut leading);
                    continue;
                }
                *leading = true;
            }
            let (file, id, end) = self.writer.lock().tail();
            let result = self.sync_segment(&file, id, end);
            *self.commit.leading.lock() = false;
            self.commit.done.notify_all();
            if result.is_err() {
                let mut w = self.writer.lock();
                self.drop_unsynced(&mut w);
            }
            result?;
        }
    }
}
