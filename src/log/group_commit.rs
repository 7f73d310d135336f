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

use super::{Log, segment_name};
use crate::error::{Error, IoOp, Result};

/// The state shared by the callers of one log's syncs.
#[derive(Debug, Default)]
pub(super) struct GroupCommit {
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
            let result = file.sync();
            self.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
            match &result {
                Ok(()) => {
                    self.durable.fetch_max(end, Ordering::AcqRel);
                }
                Err(e) => self.set_poison(e.kind()),
            }
            *self.commit.leading.lock() = false;
            self.commit.done.notify_all();
            if let Err(e) = result {
                return Err(Error::io(
                    IoOp::Sync,
                    self.storage.path(&segment_name(id)),
                    e,
                ));
            }
        }
    }
}
