//! The only door to the disk.
//!
//! The engine reads and writes through [`Storage`] (a directory of files) and
//! [`StorageFile`] (one open file). [`FsStorage`] is the real file system;
//! [`SimDisk`] is a simulated disk for tests and fuzzers: it loses unsynced
//! writes in a crash and injects I/O errors.
//! File names are flat names inside the data directory (no separators).

mod fs;
mod sim;

use std::fmt::Debug;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

pub use fs::FsStorage;
pub use sim::{Fault, SimDisk, SimOp, Tear};

/// A directory of files: the data directory of one engine.
///
/// What a failed call may leave behind: `create` may leave an empty file;
/// `rename` either happened or not; nothing is durable in the directory (new
/// names, renames, removals) until `sync_dir` returns `Ok`.
pub trait Storage: Send + Sync + Debug + 'static {
    /// Creates a new, empty file; fails if `name` exists.
    fn create(&self, name: &str) -> io::Result<Arc<dyn StorageFile>>;
    /// Opens an existing file for reading and appending.
    fn open(&self, name: &str) -> io::Result<Arc<dyn StorageFile>>;
    /// The names of the files in the directory, in no particular order.
    fn list(&self) -> io::Result<Vec<String>>;
    /// Removes a file.
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Renames a file, replacing `to` if it exists.
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    /// Makes creations, renames and removals in the directory durable.
    fn sync_dir(&self) -> io::Result<()>;
    /// The path of `name`, for error messages.
    fn path(&self, name: &str) -> PathBuf;
    /// Releases whatever claim the storage holds on the directory (the
    /// directory lock). Called once by `Engine::close`.
    fn close(&self) {}
}

/// One open file.
///
/// Writes go only to the end ([`append`](StorageFile::append)); reads are
/// positional and may run concurrently with an append.
pub trait StorageFile: Send + Sync + Debug + 'static {
    /// Appends all of `data` at the end of the file. On error, an unknown
    /// prefix of `data` may have been written.
    fn append(&self, data: &[u8]) -> io::Result<()>;
    /// Fills `buf` from `offset`; reading past the end is an error
    /// (`UnexpectedEof`).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// The current length in bytes (appended data included, synced or not).
    /// An append still under way is not counted until it returns: an
    /// online backup ([`Engine::backup_to`](crate::Engine::backup_to))
    /// copies the active segment up to this length and relies on it ending
    /// at a whole append.
    fn len(&self) -> io::Result<u64>;
    /// Whether the file is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Makes the file's data durable (fdatasync). After an error, nothing
    /// appended since the last successful sync may be assumed durable, and a
    /// later successful sync does not change that.
    fn sync(&self) -> io::Result<()>;
    /// Cuts the file to `len` bytes.
    fn truncate(&self, len: u64) -> io::Result<()>;
    /// A read-only memory map of the file's first `len` bytes, as a
    /// zero-copy buffer, or `None` if this storage cannot map (the default).
    /// `len` may exceed the file, which may grow into it: the caller must
    /// only read bytes the file holds (a page wholly past the end faults
    /// with `SIGBUS`), and must not cut the file below bytes it still reads.
    fn map(&self, len: u64) -> io::Result<Option<bytes::Bytes>> {
        let _ = len;
        Ok(None)
    }
}
