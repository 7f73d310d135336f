//! [`FsStorage`]: the real file system, with an OS lock on the directory.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use super::{Storage, StorageFile};
use crate::error::{Error, IoOp, Result};

/// The name of the lock file inside the data directory.
const LOCK_FILE: &str = "LOCK";

/// A data directory on the real file system.
///
/// [`FsStorage::open`] takes an exclusive `flock` on `DIR/LOCK`. The lock
/// dies with the process (a kill -9 frees it at once) and is released by
/// [`Storage::close`] or drop.
#[derive(Debug)]
pub struct FsStorage {
    dir: PathBuf,
    lock: Mutex<Option<File>>,
}

impl FsStorage {
    /// Creates `dir` if needed and locks it.
    ///
    /// # Errors
    /// [`Error::Locked`] if another engine holds the directory;
    /// [`Error::Io`] if it cannot be created or locked.
    pub fn open(dir: impl AsRef<Path>) -> Result<FsStorage> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).map_err(|e| Error::io(IoOp::Create, &dir, e))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io(IoOp::Open, &lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(Error::Locked { dir }),
            Err(fs::TryLockError::Error(e)) => return Err(Error::io(IoOp::Lock, lock_path, e)),
        }
        Ok(FsStorage {
            dir,
            lock: Mutex::new(Some(lock)),
        })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn check_name(name: &str) -> io::Result<()> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad file name"));
    }
    Ok(())
}

impl Storage for FsStorage {
    fn create(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        check_name(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(self.dir.join(name))?;
        Ok(Arc::new(FsFile::new(file, 0)))
    }

    fn open(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        check_name(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.dir.join(name))?;
        let len = file.metadata()?.len();
        Ok(Arc::new(FsFile::new(file, len)))
    }

    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            if !entry.file_type()?.is_file() {
                continue;
            }
            if let Ok(name) = entry.file_name().into_string()
                && name != LOCK_FILE
            {
                names.push(name);
            }
        }
        Ok(names)
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        check_name(name)?;
        fs::remove_file(self.dir.join(name))
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        check_name(from)?;
        check_name(to)?;
        fs::rename(self.dir.join(from), self.dir.join(to))
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn close(&self) {
        // Closing the descriptor releases the flock.
        self.lock.lock().take();
    }
}

/// An open file; its length is tracked so appends need no seek.
#[derive(Debug)]
struct FsFile {
    file: File,
    len: AtomicU64,
}

impl FsFile {
    fn new(file: File, len: u64) -> FsFile {
        FsFile {
            file,
            len: AtomicU64::new(len),
        }
    }
}

impl StorageFile for FsFile {
    fn append(&self, data: &[u8]) -> io::Result<()> {
        // The engine appends under its writer lock, so no two appends race.
        let at = self.len.load(Ordering::Acquire);
        self.file.write_all_at(data, at)?;
        self.len.store(at + data.len() as u64, Ordering::Release);
        Ok(())
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.len.load(Ordering::Acquire))
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn truncate(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)?;
        self.len.store(len, Ordering::Release);
        Ok(())
    }

    fn map(&self, len: u64) -> io::Result<Option<bytes::Bytes>> {
        let len = usize::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
        if len == 0 {
            return Ok(None);
        }
        // SAFETY: the map is read-only and shared. The file is appended to
        // by this process only (the directory's flock keeps other engines
        // out) and its bytes are never changed in place: appends go past
        // what was written, and a cut (`truncate`) is made only below bytes
        // no reader can reach (the engine's contract in `StorageFile::map`).
        // So the bytes a reader is allowed to see do not change under it.
        // Another program truncating the file could still fault the
        // process; `Options::mmap_reads` documents that.
        let map = unsafe { memmap2::MmapOptions::new().len(len).map(&self.file)? };
        Ok(Some(bytes::Bytes::from_owner(map)))
    }
}
