//! Online backup: [`Engine::backup_to`] copies the log's segment files to
//! a new directory while calls go on.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::Engine;
use crate::error::{Error, IoOp, Result};
use crate::log::BackupFile;

/// What [`Engine::backup_to`] copied.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct BackupReport {
    /// The backup's directory (the `dest` given).
    pub path: PathBuf,
    /// Segment files copied.
    pub segments: u64,
    /// Bytes copied.
    pub bytes: u64,
    /// How long the backup took, copying and syncing included.
    pub duration: Duration,
}

/// Bytes copied per read.
const CHUNK: usize = 1 << 20;

impl Engine {
    /// Copies the store to `dest`, a directory that must not exist yet (or
    /// be empty), while other calls go on: every record acknowledged before
    /// this call started is in the copy, nothing half-written is, and
    /// [`Engine::open`] opens the copy as it is (it holds only segment
    /// files, each ending at a whole record).
    ///
    /// How: records still in the log's buffer are written out; compaction
    /// is held off until the call returns (so no file is rewritten or
    /// removed meanwhile; a background pass waits, a `compact` call on
    /// another thread waits, and so does `close`); each segment file is
    /// copied up to its length at the start, the active one too (appends go
    /// on past that length). The copy is made in a hidden directory beside
    /// `dest` (`.NAME.backup-PID-N`), each file fsynced, then renamed to
    /// `dest` and the parent directory fsynced: a crash during a backup
    /// leaves no `dest` (it may leave the hidden directory, which is safe
    /// to delete). Under `Durability::Sync` the copy is of what is on disk
    /// plus records not yet synced; without it, also of what a crash could
    /// still have lost.
    ///
    /// This is how to back up a running service: call it from an admin
    /// route or a timer. The CLI's `idemkv backup DIR DEST` does the same
    /// for a directory no engine holds.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if `dest` exists and is not an empty
    /// directory; [`Error::Io`] or [`Error::NoSpace`] if the copy cannot be
    /// made (the hidden directory is removed; the store is untouched);
    /// [`Error::Poisoned`] after a failed write or sync (reopen first);
    /// [`Error::Closed`]; [`Error::Reentrant`] from inside a
    /// `for_each_record` callback.
    pub fn backup_to(&self, dest: impl AsRef<Path>) -> Result<BackupReport> {
        let dest = dest.as_ref();
        self.check_open()?;
        let started = Instant::now();
        check_dest(dest)?;
        let _no_compaction = self.compactor.pause("backup_to")?;
        let files = self.log.backup_cut()?;
        let temp = temp_dir(dest);
        let copied = copy_all(&files, &temp).and_then(|bytes| {
            publish(&temp, dest)?;
            Ok(bytes)
        });
        match copied {
            Ok(bytes) => Ok(BackupReport {
                path: dest.to_owned(),
                segments: files.len() as u64,
                bytes,
                duration: started.elapsed(),
            }),
            Err(e) => {
                let _ = fs::remove_dir_all(&temp);
                Err(e)
            }
        }
    }
}

/// `dest` must be absent or an empty directory.
fn check_dest(dest: &Path) -> Result<()> {
    let taken = Error::InvalidArgument {
        name: "dest",
        problem: "must not exist, or be an empty directory",
    };
    match fs::read_dir(dest) {
        Ok(mut entries) => match entries.next() {
            None => Ok(()),
            Some(_) => Err(taken),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => Err(taken),
        Err(e) => Err(Error::io(IoOp::Open, dest, e)),
    }
}

/// The hidden directory beside `dest` the copy is made in.
fn temp_dir(dest: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let name = dest
        .file_name()
        .map_or_else(|| "backup".into(), |n| n.to_string_lossy().into_owned());
    let n = N.fetch_add(1, Ordering::Relaxed);
    dest.with_file_name(format!(".{name}.backup-{}-{n}", std::process::id()))
}

/// Copies every file into `dir` (created) and syncs each; returns the
/// bytes copied.
fn copy_all(files: &[BackupFile], dir: &Path) -> Result<u64> {
    fs::create_dir(dir).map_err(|e| Error::io(IoOp::Create, dir, e))?;
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    for f in files {
        let path = dir.join(&f.name);
        let mut out = File::create_new(&path).map_err(|e| Error::io(IoOp::Create, &path, e))?;
        let mut at = 0u64;
        while at < f.len {
            let n = usize::try_from(f.len - at).map_or(CHUNK, |left| left.min(CHUNK));
            let chunk = buf.get_mut(..n).unwrap_or_default();
            f.file
                .read_at(at, chunk)
                .map_err(|e| Error::io(IoOp::Read, &f.path, e))?;
            out.write_all(chunk)
                .map_err(|e| Error::io(IoOp::Write, &path, e))?;
            at += n as u64;
        }
        out.sync_all()
            .map_err(|e| Error::io(IoOp::Sync, &path, e))?;
        total += f.len;
    }
    sync_dir(dir)?;
    Ok(total)
}

/// Renames the finished copy to `dest` and makes the name durable.
fn publish(temp: &Path, dest: &Path) -> Result<()> {
    // An empty `dest` directory is replaced by the rename.
    fs::rename(temp, dest).map_err(|e| Error::io(IoOp::Rename, dest, e))?;
    match dest.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent),
        _ => sync_dir(Path::new(".")),
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(IoOp::SyncDir, dir, e))
}
