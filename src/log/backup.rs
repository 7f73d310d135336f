//! What an online backup copies: every segment file of the log, each up to
//! a length at which it holds only whole records.

use std::sync::Arc;

use super::{Log, segment_name};
use crate::error::{Error, IoOp, Result};
use crate::storage::StorageFile;

/// One file of a backup: its name in the data directory, the open file,
/// and how many of its bytes to copy.
pub(crate) struct BackupFile {
    pub name: String,
    /// Its path, for errors.
    pub path: std::path::PathBuf,
    pub file: Arc<dyn StorageFile>,
    pub len: u64,
}

impl Log {
    /// The files a backup copies, as of now: every record appended before
    /// this call is in them (the pending buffer is written out first), and
    /// each length ends at a record boundary (a file's length moves only
    /// after a whole buffer of records is written). Only the active segment
    /// grows meanwhile, past the length taken here; the caller holds
    /// compaction off, so no other file changes or goes away while it is
    /// copied.
    ///
    /// # Errors
    /// [`Error::Poisoned`] after a failed write or sync (the files may hold
    /// records that were never acknowledged and memory states that never
    /// reached them: reopen first); [`Error::Closed`]; [`Error::Io`] if the
    /// buffer cannot be written.
    pub fn backup_cut(&self) -> Result<Vec<BackupFile>> {
        self.check_poison()?;
        self.flush()?;
        let segments = self.segments.read();
        segments
            .values()
            .map(|s| {
                let name = segment_name(s.number);
                let len = s
                    .file
                    .len()
                    .map_err(|e| Error::io(IoOp::Read, self.storage.path(&name), e))?;
                Ok(BackupFile {
                    path: self.storage.path(&name),
                    name,
                    file: Arc::clone(&s.file),
                    len,
                })
            })
            .collect()
    }
}
