//! A [`Storage`] wrapper for race tests: it can hold chosen storage calls
//! (syncs, renames, reads, creations) at a gate until the test opens it, and
//! delay every call by a pseudo-random few microseconds, so that a test can
//! put a `close`, a `compact`, a roll or a `get` exactly inside another
//! call's I/O.
#![allow(dead_code)]

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use idemkv::storage::{Storage, StorageFile};

/// The storage calls a gate can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Call {
    /// `StorageFile::sync`.
    Sync,
    /// `Storage::rename`.
    Rename,
    /// `StorageFile::read_at`.
    Read,
    /// `Storage::create`.
    Create,
    /// `Storage::remove`.
    Remove,
    /// `Storage::sync_dir`.
    SyncDir,
}

#[derive(Debug, Default)]
struct GateState {
    /// Calls held while closed.
    closed: Vec<Call>,
    /// How many calls entered a closed gate, per kind.
    entered: Vec<(Call, u64)>,
    /// How many of those went on once their gate opened, per kind.
    left: Vec<(Call, u64)>,
}

/// Shared control of the gates and delays of a [`Gated`] storage.
#[derive(Debug, Default)]
pub struct Gates {
    state: Mutex<GateState>,
    changed: Condvar,
    /// Upper bound of the random delay of every call, in microseconds (0: none).
    jitter_us: AtomicU64,
    rng: AtomicU64,
    /// Set once any call ran after `fence` was raised (a call after close).
    fenced: AtomicBool,
    late_calls: AtomicU64,
}

impl Gates {
    /// Holds every later `call` until [`Gates::open`].
    pub fn close(&self, call: Call) {
        let mut s = self.state.lock().unwrap();
        if !s.closed.contains(&call) {
            s.closed.push(call);
        }
    }

    /// Lets `call` through again, releasing the held ones.
    pub fn open(&self, call: Call) {
        self.state.lock().unwrap().closed.retain(|c| *c != call);
        self.changed.notify_all();
    }

    /// Waits until at least `n` calls of `call` are held at its gate (or
    /// went through it), at most `limit`; returns whether they did.
    pub fn wait_entered(&self, call: Call, n: u64, limit: Duration) -> bool {
        let s = self.state.lock().unwrap();
        let (s, _) = self
            .changed
            .wait_timeout_while(s, limit, |s| entered(s, call) < n)
            .unwrap();
        entered(&s, call) >= n
    }

    /// Waits until at least `n` calls of `call` that were held at its gate
    /// went on after [`Gates::open`], at most `limit`; returns whether they
    /// did. A test that closes the gate again must wait for this first, or
    /// it may hold the same call again.
    pub fn wait_left(&self, call: Call, n: u64, limit: Duration) -> bool {
        let s = self.state.lock().unwrap();
        let (s, _) = self
            .changed
            .wait_timeout_while(s, limit, |s| count(&s.left, call) < n)
            .unwrap();
        count(&s.left, call) >= n
    }

    /// Delays every call by up to `us` microseconds (pseudo-random).
    pub fn jitter(&self, us: u64) {
        self.jitter_us.store(us, Ordering::SeqCst);
    }

    /// From now on, every storage call is counted as late (see
    /// [`Gates::late_calls`]): for "nothing touches the directory after
    /// close".
    pub fn fence(&self) {
        self.fenced.store(true, Ordering::SeqCst);
    }

    /// Calls that changed the directory (create, rename, remove, sync_dir)
    /// after [`Gates::fence`].
    pub fn late_calls(&self) -> u64 {
        self.late_calls.load(Ordering::SeqCst)
    }

    fn pass(&self, call: Call) {
        if matches!(
            call,
            Call::Create | Call::Rename | Call::Remove | Call::SyncDir
        ) && self.fenced.load(Ordering::SeqCst)
        {
            self.late_calls.fetch_add(1, Ordering::SeqCst);
        }
        let max = self.jitter_us.load(Ordering::Relaxed);
        if max > 0 {
            let r = self
                .rng
                .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
                .wrapping_mul(0xbf58_476d_1ce4_e5b9);
            std::thread::sleep(Duration::from_micros((r >> 33) % max));
        }
        let mut s = self.state.lock().unwrap();
        if !s.closed.contains(&call) {
            return;
        }
        match s.entered.iter_mut().find(|(c, _)| *c == call) {
            Some((_, n)) => *n += 1,
            None => s.entered.push((call, 1)),
        }
        self.changed.notify_all();
        let mut s = self
            .changed
            .wait_while(s, |s| s.closed.contains(&call))
            .unwrap();
        match s.left.iter_mut().find(|(c, _)| *c == call) {
            Some((_, n)) => *n += 1,
            None => s.left.push((call, 1)),
        }
        self.changed.notify_all();
    }
}

fn entered(s: &GateState, call: Call) -> u64 {
    count(&s.entered, call)
}

fn count(counts: &[(Call, u64)], call: Call) -> u64 {
    counts
        .iter()
        .find(|(c, _)| *c == call)
        .map_or(0, |(_, n)| *n)
}

/// A storage whose calls pass through [`Gates`].
#[derive(Debug)]
pub struct Gated {
    pub inner: Arc<dyn Storage>,
    pub gates: Arc<Gates>,
}

impl Gated {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Storage>, gates: &Arc<Gates>) -> Arc<Gated> {
        Arc::new(Gated {
            inner,
            gates: Arc::clone(gates),
        })
    }

    fn file(&self, inner: Arc<dyn StorageFile>) -> Arc<dyn StorageFile> {
        Arc::new(GatedFile {
            inner,
            gates: Arc::clone(&self.gates),
        })
    }
}

impl Storage for Gated {
    fn create(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        self.gates.pass(Call::Create);
        Ok(self.file(self.inner.create(name)?))
    }
    fn open(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        Ok(self.file(self.inner.open(name)?))
    }
    fn list(&self) -> io::Result<Vec<String>> {
        self.inner.list()
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        self.gates.pass(Call::Remove);
        self.inner.remove(name)
    }
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.gates.pass(Call::Rename);
        self.inner.rename(from, to)
    }
    fn sync_dir(&self) -> io::Result<()> {
        self.gates.pass(Call::SyncDir);
        self.inner.sync_dir()
    }
    fn path(&self, name: &str) -> PathBuf {
        self.inner.path(name)
    }
    fn close(&self) {
        self.inner.close();
    }
}

#[derive(Debug)]
struct GatedFile {
    inner: Arc<dyn StorageFile>,
    gates: Arc<Gates>,
}

impl StorageFile for GatedFile {
    fn append(&self, data: &[u8]) -> io::Result<()> {
        self.inner.append(data)
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.gates.pass(Call::Read);
        self.inner.read_at(offset, buf)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn sync(&self) -> io::Result<()> {
        self.gates.pass(Call::Sync);
        self.inner.sync()
    }
    fn truncate(&self, len: u64) -> io::Result<()> {
        self.inner.truncate(len)
    }
}
