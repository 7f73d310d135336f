//! [`SimDisk`]: a simulated disk that models what a crash does to files.
//!
//! Every file keeps its *live* bytes (what reads see) apart from its
//! *durable* bytes (what a crash leaves). `sync` makes a file's live bytes
//! durable; new names, renames and removals become durable only with
//! `sync_dir`. [`SimDisk::crash`] returns the disk as it would be found
//! after power loss: durable bytes, durable names, and optionally a torn
//! tail (a random prefix of each file's unsynced bytes, possibly garbled).
//! Faults (EIO, ENOSPC, ...) can be injected on any operation.
//!
//! A failed `sync` follows Linux after "fsyncgate": the unsynced bytes are
//! dropped from the page cache's dirty set, so a later successful sync does
//! not make them durable (they read back as zeros after a crash).

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;

use super::{Storage, StorageFile};

/// The operations a fault can be injected into.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SimOp {
    /// `Storage::create`.
    Create,
    /// `StorageFile::append`.
    Append,
    /// `StorageFile::sync`.
    Sync,
    /// `Storage::sync_dir`.
    SyncDir,
    /// `Storage::rename`.
    Rename,
    /// `Storage::remove`.
    Remove,
    /// `StorageFile::truncate`.
    Truncate,
    /// `StorageFile::read_at`.
    Read,
}

/// A fault waiting to fire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// The operation that fails.
    pub op: SimOp,
    /// The index, among all calls of `op` since the disk was created
    /// (counting from 0), of the first call that fails.
    pub after: u64,
    /// The error kind returned (`StorageFull` for ENOSPC, `Other` for EIO).
    pub kind: io::ErrorKind,
    /// Whether every later call of `op` fails too.
    pub sticky: bool,
}

/// How [`SimDisk::crash`] treats bytes that were written but not synced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tear {
    /// All unsynced bytes are lost.
    Clean,
    /// Each file keeps a prefix of its unsynced bytes; the `u64` picks the
    /// prefix length (taken modulo the unsynced length + 1).
    Prefix(u64),
    /// As `Prefix`, and the kept unsynced bytes are overwritten with
    /// garbage derived from the `u64`.
    Garbage(u64),
}

#[derive(Debug, Default)]
struct Inode {
    live: Vec<u8>,
    durable: Vec<u8>,
    /// Live bytes before this offset were changed by a truncate since the
    /// last sync (so durable is not a prefix of live).
    rewritten: bool,
    /// Unsynced bytes in this range were dropped by a failed sync: a later
    /// sync writes zeros in their place (bytes appended after the failure
    /// are synced normally).
    lost_from: Option<(usize, usize)>,
}

#[derive(Debug, Default)]
struct State {
    inodes: Vec<Arc<Mutex<Inode>>>,
    live_names: HashMap<String, usize>,
    durable_names: HashMap<String, usize>,
    faults: Vec<Fault>,
    counts: HashMap<SimOp, u64>,
    syncs: u64,
}

impl State {
    /// Counts a call of `op` and fires a fault if one is due.
    fn check(&mut self, op: SimOp) -> io::Result<()> {
        let n = self.counts.entry(op).or_insert(0);
        let call = *n;
        *n += 1;
        let mut fired = None;
        self.faults.retain(|f| {
            if f.op == op && call >= f.after && fired.is_none() {
                fired = Some(f.kind);
                return f.sticky;
            }
            true
        });
        match fired {
            Some(kind) => Err(io::Error::new(kind, format!("injected {op:?} fault"))),
            None => Ok(()),
        }
    }
}

/// A simulated disk. Cloning shares the same disk.
#[derive(Clone, Debug, Default)]
pub struct SimDisk {
    state: Arc<Mutex<State>>,
}

impl SimDisk {
    /// An empty disk.
    pub fn new() -> SimDisk {
        SimDisk::default()
    }

    /// Arms a fault. `fault.after` is an index among all calls of
    /// `fault.op` since the disk was created (the first is 0): the first
    /// call at or past it fails.
    pub fn inject(&self, fault: Fault) {
        self.state.lock().faults.push(fault);
    }

    /// Disarms every pending fault.
    pub fn clear_faults(&self) {
        self.state.lock().faults.clear();
    }

    /// How many successful file syncs the disk has seen.
    pub fn syncs(&self) -> u64 {
        self.state.lock().syncs
    }

    /// The disk as found after a power loss now: a new, independent disk
    /// holding the durable names and bytes, plus unsynced bytes per `tear`.
    pub fn crash(&self, tear: Tear) -> SimDisk {
        let state = self.state.lock();
        let mut files = Vec::new();
        let mut salt = 0u64;
        for (name, &ino) in &state.durable_names {
            let Some(inode) = state.inodes.get(ino) else {
                continue;
            };
            let inode = inode.lock();
            let mut bytes = inode.durable.clone();
            if !inode.rewritten && inode.lost_from.is_none() && inode.live.len() > bytes.len() {
                let unsynced = inode.live.get(bytes.len()..).unwrap_or_default();
                salt = salt.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let keep = match tear {
                    Tear::Clean => 0,
                    Tear::Prefix(r) | Tear::Garbage(r) => {
                        (mix(r ^ salt) % (unsynced.len() as u64 + 1)) as usize
                    }
                };
                let kept = unsynced.get(..keep).unwrap_or_default();
                match tear {
                    Tear::Garbage(r) => bytes.extend(
                        kept.iter()
                            .enumerate()
                            .map(|(i, _)| mix(r ^ salt ^ i as u64) as u8),
                    ),
                    _ => bytes.extend_from_slice(kept),
                }
            }
            files.push((name.clone(), bytes));
        }
        SimDisk::holding(files.into_iter())
    }

    /// The live bytes of `name`, if it exists (for tests that corrupt files).
    pub fn read_file(&self, name: &str) -> Option<Vec<u8>> {
        let state = self.state.lock();
        let ino = *state.live_names.get(name)?;
        Some(state.inodes.get(ino)?.lock().live.clone())
    }

    /// Replaces the live and durable bytes of `name` (for tests that corrupt
    /// files); creates it, durably, if missing.
    pub fn write_file(&self, name: &str, bytes: &[u8]) {
        let mut state = self.state.lock();
        let ino = match state.live_names.get(name) {
            Some(&ino) => ino,
            None => {
                state.inodes.push(Arc::default());
                let ino = state.inodes.len() - 1;
                state.live_names.insert(name.to_owned(), ino);
                state.durable_names.insert(name.to_owned(), ino);
                ino
            }
        };
        if let Some(inode) = state.inodes.get(ino) {
            let mut inode = inode.lock();
            inode.live = bytes.to_vec();
            inode.durable = bytes.to_vec();
            inode.rewritten = false;
            inode.lost_from = None;
        }
    }

    /// The disk as a process that dies now (`kill -9`) leaves it: a new,
    /// independent disk holding every live name and byte, synced or not
    /// (the operating system still has them), and made durable there.
    pub fn kill(&self) -> SimDisk {
        let state = self.state.lock();
        let files = state.live_names.iter().filter_map(|(name, &ino)| {
            let bytes = state.inodes.get(ino)?.lock().live.clone();
            Some((name.clone(), bytes))
        });
        SimDisk::holding(files)
    }

    /// A new disk holding `files`, every byte durable.
    fn holding(files: impl Iterator<Item = (String, Vec<u8>)>) -> SimDisk {
        let mut inodes = Vec::new();
        let mut names = HashMap::new();
        for (name, bytes) in files {
            names.insert(name, inodes.len());
            inodes.push(Arc::new(Mutex::new(Inode {
                live: bytes.clone(),
                durable: bytes,
                ..Inode::default()
            })));
        }
        SimDisk {
            state: Arc::new(Mutex::new(State {
                inodes,
                durable_names: names.clone(),
                live_names: names,
                ..State::default()
            })),
        }
    }

    /// The names of the live files.
    pub fn names(&self) -> Vec<String> {
        self.state.lock().live_names.keys().cloned().collect()
    }
}

/// A cheap 64-bit mixer (splitmix64's finaliser) for tear choices.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn not_found(name: &str) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("no file {name}"))
}

impl Storage for SimDisk {
    fn create(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        let mut state = self.state.lock();
        state.check(SimOp::Create)?;
        if state.live_names.contains_key(name) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                name.to_owned(),
            ));
        }
        let inode: Arc<Mutex<Inode>> = Arc::default();
        state.inodes.push(Arc::clone(&inode));
        let ino = state.inodes.len() - 1;
        state.live_names.insert(name.to_owned(), ino);
        Ok(Arc::new(SimFile {
            disk: self.clone(),
            inode,
        }))
    }

    fn open(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        let state = self.state.lock();
        let ino = *state.live_names.get(name).ok_or_else(|| not_found(name))?;
        let inode = state
            .inodes
            .get(ino)
            .cloned()
            .ok_or_else(|| not_found(name))?;
        Ok(Arc::new(SimFile {
            disk: self.clone(),
            inode,
        }))
    }

    fn list(&self) -> io::Result<Vec<String>> {
        Ok(self.names())
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        let mut state = self.state.lock();
        state.check(SimOp::Remove)?;
        state
            .live_names
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| not_found(name))
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let mut state = self.state.lock();
        state.check(SimOp::Rename)?;
        let ino = state
            .live_names
            .remove(from)
            .ok_or_else(|| not_found(from))?;
        state.live_names.insert(to.to_owned(), ino);
        Ok(())
    }

    fn sync_dir(&self) -> io::Result<()> {
        let mut state = self.state.lock();
        state.check(SimOp::SyncDir)?;
        state.durable_names = state.live_names.clone();
        Ok(())
    }

    fn path(&self, name: &str) -> PathBuf {
        PathBuf::from("sim").join(name)
    }
}

/// An open file of a [`SimDisk`].
#[derive(Debug)]
struct SimFile {
    disk: SimDisk,
    inode: Arc<Mutex<Inode>>,
}

impl SimFile {
    fn check(&self, op: SimOp) -> io::Result<()> {
        self.disk.state.lock().check(op)
    }
}

impl StorageFile for SimFile {
    fn append(&self, data: &[u8]) -> io::Result<()> {
        if let Err(e) = self.check(SimOp::Append) {
            // A failed write may leave a prefix behind.
            let mut inode = self.inode.lock();
            let half = data.get(..data.len() / 2).unwrap_or_default();
            inode.live.extend_from_slice(half);
            return Err(e);
        }
        self.inode.lock().live.extend_from_slice(data);
        Ok(())
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(SimOp::Read)?;
        let inode = self.inode.lock();
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let src = inode
            .live
            .get(start..)
            .and_then(|rest| rest.get(..buf.len()))
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.inode.lock().live.len() as u64)
    }

    fn sync(&self) -> io::Result<()> {
        let result = self.check(SimOp::Sync);
        let mut inode = self.inode.lock();
        if result.is_err() {
            if inode.lost_from.is_none() && !inode.rewritten {
                inode.lost_from = Some((inode.durable.len(), inode.live.len()));
            }
            return result;
        }
        let node = &mut *inode;
        match node.lost_from.take() {
            Some((lost, lost_end)) => {
                // fsyncgate: the dropped range never reaches the disk.
                let mut bytes = node.live.clone();
                let end = lost_end.min(bytes.len());
                for b in bytes.get_mut(lost..end).unwrap_or_default() {
                    *b = 0;
                }
                node.durable = bytes;
            }
            None if node.rewritten => node.durable = node.live.clone(),
            None => {
                let new = node.live.get(node.durable.len()..).unwrap_or_default();
                node.durable.extend_from_slice(new);
            }
        }
        node.rewritten = false;
        drop(inode);
        self.disk.state.lock().syncs += 1;
        Ok(())
    }

    fn truncate(&self, len: u64) -> io::Result<()> {
        self.check(SimOp::Truncate)?;
        let mut inode = self.inode.lock();
        let len = usize::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
        if len < inode.durable.len() {
            inode.rewritten = true;
        }
        inode.lost_from = match inode.lost_from {
            Some((from, _)) if len <= from => None,
            Some((from, to)) => Some((from, to.min(len))),
            None => None,
        };
        inode.live.resize(len, 0);
        Ok(())
    }
}
