//! A lease that expires while its record is being made durable (a sync
//! slower than the lease TTL) is never handed out: found by the cluster's
//! failover test, where a sync waits on a JetStream quorum that lost a
//! server, and several `begin`s of one key each got `Started`.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use crate::clock::Clock;
use crate::storage::{SimDisk, Storage, StorageFile};
use crate::{AsyncEngine, Begin, Durability, Engine, Fingerprint, Lease, ManualClock, Options};

/// Syncs wait while the gate is shut.
#[derive(Debug, Default)]
struct Gate {
    shut: Mutex<bool>,
    opened: Condvar,
}

impl Gate {
    fn set(&self, shut: bool) {
        *self.shut.lock() = shut;
        self.opened.notify_all();
    }

    fn pass(&self) {
        let mut shut = self.shut.lock();
        while *shut {
            self.opened.wait(&mut shut);
        }
    }
}

#[derive(Debug)]
struct Gated {
    disk: SimDisk,
    gate: Arc<Gate>,
}

#[derive(Debug)]
struct GatedFile {
    file: Arc<dyn StorageFile>,
    gate: Arc<Gate>,
}

impl StorageFile for GatedFile {
    fn append(&self, data: &[u8]) -> io::Result<()> {
        self.file.append(data)
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_at(offset, buf)
    }
    fn len(&self) -> io::Result<u64> {
        self.file.len()
    }
    fn sync(&self) -> io::Result<()> {
        self.gate.pass();
        self.file.sync()
    }
    fn truncate(&self, len: u64) -> io::Result<()> {
        self.file.truncate(len)
    }
}

impl Gated {
    fn wrap(&self, file: Arc<dyn StorageFile>) -> Arc<dyn StorageFile> {
        Arc::new(GatedFile {
            file,
            gate: Arc::clone(&self.gate),
        })
    }
}

impl Storage for Gated {
    fn create(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        Ok(self.wrap(self.disk.create(name)?))
    }
    fn open(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        Ok(self.wrap(self.disk.open(name)?))
    }
    fn list(&self) -> io::Result<Vec<String>> {
        self.disk.list()
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        self.disk.remove(name)
    }
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.disk.rename(from, to)
    }
    fn sync_dir(&self) -> io::Result<()> {
        self.disk.sync_dir()
    }
    fn path(&self, name: &str) -> PathBuf {
        self.disk.path(name)
    }
    fn close(&self) {
        self.disk.close();
    }
}

fn engine(gate: &Arc<Gate>, clock: &Arc<ManualClock>) -> Arc<Engine> {
    let storage = Gated {
        disk: SimDisk::new(),
        gate: Arc::clone(gate),
    };
    let options = Options {
        durability: Durability::Sync,
        background: false,
        lease_ttl: Duration::from_secs(2),
        clock: clock.clone(),
        ..Options::default()
    };
    Arc::new(Engine::open_with_storage(Arc::new(storage), options).unwrap())
}

/// Two begins of one key across a sync that outlives the first's lease:
/// `asynch` runs them through `AsyncEngine`, else through `Engine`.
fn two_begins_across_a_stalled_sync(asynch: bool) -> (Arc<ManualClock>, [Begin; 2]) {
    let (gate, clock) = (Arc::new(Gate::default()), Arc::new(ManualClock::new(1_000)));
    let engine = engine(&gate, &clock);
    let fp = Fingerprint::of(b"charge");
    let begin = {
        let engine = Arc::clone(&engine);
        move || {
            if asynch {
                futures_executor_block_on(AsyncEngine::new(Arc::clone(&engine)).begin("u", "k", fp))
            } else {
                engine.begin("u", "k", fp)
            }
        }
    };
    // A first claim reserves fencing tokens (a sync): before the gate.
    let Begin::Started(warm) = engine.begin("u", "warm", fp).unwrap() else {
        panic!("fresh key")
    };
    engine.release(&warm).unwrap();
    gate.set(true);
    let first = std::thread::spawn(begin.clone());
    // Time for the first begin to claim (a claim is not visible before its
    // sync). Should the machine be slower than this, the first lease is
    // simply granted after the clock moves, and the test checks less but
    // still holds.
    std::thread::sleep(Duration::from_millis(100));
    // The first lease expires while its record waits for the sync: the
    // second begin takes the key over.
    clock.advance(Duration::from_secs(3));
    let second = std::thread::spawn(begin);
    // (Whether the second begin waits behind the first's record or runs
    // after it, it finds the first lease expired.)
    std::thread::sleep(Duration::from_millis(20));
    gate.set(false);
    let answers = [
        first.join().unwrap().unwrap(),
        second.join().unwrap().unwrap(),
    ];
    (clock, answers)
}

/// A minimal `block_on` (the crate's tests do not depend on an executor).
fn futures_executor_block_on<F: std::future::Future>(f: F) -> F::Output {
    struct Wake(std::thread::Thread);
    impl std::task::Wake for Wake {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(Arc::new(Wake(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        if let std::task::Poll::Ready(out) = f.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::park();
    }
}

#[test]
fn a_lease_that_expired_before_its_record_was_durable_is_not_handed_out() {
    for asynch in [false, true] {
        let (clock, answers) = two_begins_across_a_stalled_sync(asynch);
        // Exactly one holder, and its lease is live: the first begin's
        // lease expired before its record was durable, so it was not handed
        // out (the first begin looked again: it took the key over itself,
        // or found the second's claim in flight).
        let started: Vec<&Lease> = answers
            .iter()
            .filter_map(|a| match a {
                Begin::Started(lease) => Some(lease),
                _ => None,
            })
            .collect();
        assert_eq!(started.len(), 1, "asynch {asynch}: {answers:?}");
        assert!(
            started[0].expires_at_ms > clock.now_ms(),
            "asynch {asynch}: an expired lease was handed out: {answers:?}"
        );
    }
}
