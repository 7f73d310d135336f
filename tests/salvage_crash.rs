//! A salvage is safe to interrupt (issue 14, section 4): a crash at any
//! storage call of a salvage, or a failed call, leaves the segment files
//! either as they were or as the salvage leaves them, or a directory that
//! every open refuses (`Error::SalvagePending`) until the next salvage
//! finishes it; never a mix an engine could open. The mechanism (temporary
//! files, the `SALVAGE` manifest as the commit point) is in
//! `docs/DURABILITY.md`.

#[path = "common/salvage_store.rs"]
mod salvage_store;

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use idemkv::storage::{Fault, SimDisk, SimOp, Storage, StorageFile, Tear};
use idemkv::{Error, salvage_storage, verify_storage};
use parking_lot::Mutex;
use salvage_store::{File, HEADER, Store, build, check, files, open, touched};

/// How many more storage calls may go through (`None`: all), and how many
/// went through.
#[derive(Debug, Default)]
struct Counter {
    left: Mutex<Option<u64>>,
    calls: Mutex<u64>,
}

impl Counter {
    /// One call: fails once the budget is spent (the machine is gone: no
    /// later call reaches the disk either).
    fn spend(&self) -> io::Result<()> {
        let mut left = self.left.lock();
        match left.as_mut() {
            Some(0) => return Err(io::Error::other("crashed")),
            Some(n) => *n -= 1,
            None => {}
        }
        *self.calls.lock() += 1;
        Ok(())
    }
}

/// A [`SimDisk`] whose calls stop at a chosen one.
#[derive(Debug)]
struct Budget {
    disk: SimDisk,
    counter: Arc<Counter>,
}

impl Budget {
    fn new(disk: &SimDisk, left: Option<u64>) -> Budget {
        Budget {
            disk: disk.clone(),
            counter: Arc::new(Counter {
                left: Mutex::new(left),
                calls: Mutex::new(0),
            }),
        }
    }

    fn wrap(&self, file: Arc<dyn StorageFile>) -> Arc<dyn StorageFile> {
        Arc::new(BudgetFile {
            file,
            counter: Arc::clone(&self.counter),
        })
    }
}

impl Storage for Budget {
    fn create(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        self.counter.spend()?;
        Ok(self.wrap(self.disk.create(name)?))
    }
    fn open(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        self.counter.spend()?;
        Ok(self.wrap(self.disk.open(name)?))
    }
    fn list(&self) -> io::Result<Vec<String>> {
        self.counter.spend()?;
        self.disk.list()
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        self.counter.spend()?;
        self.disk.remove(name)
    }
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.counter.spend()?;
        self.disk.rename(from, to)
    }
    fn sync_dir(&self) -> io::Result<()> {
        self.counter.spend()?;
        self.disk.sync_dir()
    }
    fn path(&self, name: &str) -> PathBuf {
        self.disk.path(name)
    }
}

#[derive(Debug)]
struct BudgetFile {
    file: Arc<dyn StorageFile>,
    counter: Arc<Counter>,
}

impl StorageFile for BudgetFile {
    fn append(&self, data: &[u8]) -> io::Result<()> {
        self.counter.spend()?;
        self.file.append(data)
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.counter.spend()?;
        self.file.read_at(offset, buf)
    }
    fn len(&self) -> io::Result<u64> {
        self.counter.spend()?;
        self.file.len()
    }
    fn sync(&self) -> io::Result<()> {
        self.counter.spend()?;
        self.file.sync()
    }
    fn truncate(&self, len: u64) -> io::Result<()> {
        self.counter.spend()?;
        self.file.truncate(len)
    }
}

/// The files whose names end with `suffix`, with their bytes.
fn with_suffix(disk: &SimDisk, suffix: &str) -> BTreeMap<String, Vec<u8>> {
    disk.names()
        .into_iter()
        .filter(|n| n.ends_with(suffix))
        .map(|n| {
            let bytes = disk.read_file(&n).unwrap();
            (n, bytes)
        })
        .collect()
}

/// The store with damage in four files: a record's body, a zeroed range
/// across records, a compaction output's header fields, another file's
/// magic. Returns the damaged disk and the damaged ranges.
fn damaged(store: &Store) -> (SimDisk, Vec<(String, std::ops::Range<usize>)>) {
    let files = files(&store.disk);
    let disk = store.disk.crash(Tear::Clean);
    let mut ranges = Vec::new();
    let mut hit = |f: &File, range: std::ops::Range<usize>, f_byte: &dyn Fn(u8) -> u8| {
        let mut bytes = disk.read_file(&f.name).unwrap();
        for b in &mut bytes[range.clone()] {
            *b = f_byte(*b);
        }
        disk.write_file(&f.name, &bytes);
        ranges.push((f.name.clone(), range));
    };
    let big: Vec<&File> = files
        .iter()
        .filter(|f| f.frames.len() >= 8 && f.order == f.number)
        .collect();
    let output = files.iter().find(|f| f.order < f.number).unwrap();
    let (a, b, c) = (big[0], big[1], big[2]);
    hit(a, a.frames[3].0.end - 2..a.frames[3].0.end - 1, &|b| b ^ 1);
    hit(
        b,
        b.frames[2].0.start + 20..b.frames[4].0.start + 30,
        &|_| 0,
    );
    hit(output, 20..HEADER, &|_| 0);
    hit(c, 0..1, &|b| b ^ 0x80);
    (disk, ranges)
}

/// What a salvage of the damaged store leaves: the segment files and the
/// quarantine files.
struct Reference {
    original: BTreeMap<String, Vec<u8>>,
    logs: BTreeMap<String, Vec<u8>>,
    quarantine: BTreeMap<String, Vec<u8>>,
    calls: u64,
}

fn reference(damaged: &SimDisk) -> Reference {
    let disk = damaged.crash(Tear::Clean);
    let budget = Budget::new(&disk, None);
    let report = salvage_storage(&budget).unwrap();
    assert!(
        report.changed() && report.ranges().count() >= 4,
        "{report:?}"
    );
    let calls = *budget.counter.calls.lock();
    Reference {
        original: with_suffix(damaged, ".log"),
        logs: with_suffix(&disk, ".log"),
        quarantine: with_suffix(&disk, ".quarantine"),
        calls,
    }
}

/// What `disk` shows an engine: the original files, the salvaged ones, or
/// a pending salvage that every open refuses. Panics on a mix.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord, Clone, Copy)]
enum Seen {
    Original,
    Pending,
    Salvaged,
}

fn classify(disk: &SimDisk, store: &Store, reference: &Reference, label: &str) -> Seen {
    if disk.names().iter().any(|n| n == "SALVAGE") {
        match open(disk, &store.clock) {
            Err(Error::SalvagePending { .. }) => {}
            other => panic!("{label}: an open of a pending salvage gave {other:?}"),
        }
        assert!(
            matches!(verify_storage(disk), Err(Error::SalvagePending { .. })),
            "{label}"
        );
        return Seen::Pending;
    }
    let logs = with_suffix(disk, ".log");
    if logs == reference.original {
        Seen::Original
    } else if logs == reference.logs {
        Seen::Salvaged
    } else {
        panic!("{label}: a mix of original and salvaged segment files an engine could open");
    }
}

/// Runs the salvage again on `disk` and checks that it leaves exactly
/// what an uninterrupted one does, and an engine that answers as it must.
fn finish(
    disk: &SimDisk,
    store: &Store,
    reference: &Reference,
    touched: &std::collections::BTreeSet<String>,
    label: &str,
) {
    let report = salvage_storage(disk).unwrap_or_else(|e| panic!("{label}: rerun failed: {e:?}"));
    assert_eq!(
        with_suffix(disk, ".log"),
        reference.logs,
        "{label}: {report:?}"
    );
    assert_eq!(
        with_suffix(disk, ".quarantine"),
        reference.quarantine,
        "{label}"
    );
    let left: Vec<String> = disk
        .names()
        .into_iter()
        .filter(|n| n.ends_with(".salvage") || n.starts_with("SALVAGE"))
        .collect();
    assert!(left.is_empty(), "{label}: left behind {left:?}");
    let engine = open(disk, &store.clock).unwrap_or_else(|e| panic!("{label}: {e:?}"));
    check(&engine, store, touched, label);
}

#[test]
fn a_crash_at_every_storage_call_of_a_salvage_leaves_the_original_or_the_salvaged_files() {
    let store = build();
    let (damaged, ranges) = damaged(&store);
    let touched = touched(&files(&store.disk), &ranges);
    let reference = reference(&damaged);
    let mut seen = BTreeMap::new();
    for n in 0..reference.calls {
        let disk = damaged.crash(Tear::Clean);
        let result = salvage_storage(&Budget::new(&disk, Some(n)));
        assert!(
            result.is_err(),
            "call {n} of {}: {result:?}",
            reference.calls
        );
        // Right after the failure, before any crash, and after power losses.
        let live = classify(&disk, &store, &reference, &format!("call {n}, live"));
        *seen.entry(live).or_insert(0) += 1;
        for tear in [Tear::Clean, Tear::Prefix(n), Tear::Garbage(n)] {
            let label = format!("call {n}, {tear:?}");
            let image = disk.crash(tear);
            *seen
                .entry(classify(&image, &store, &reference, &label))
                .or_insert(0) += 1;
            finish(&image, &store, &reference, &touched, &label);
        }
    }
    eprintln!("{} calls: {seen:?}", reference.calls);
    assert!(reference.calls > 50, "{}", reference.calls);
    assert_eq!(seen.len(), 3, "{seen:?}");
}

#[test]
fn a_failed_call_at_every_step_of_a_salvage_leaves_the_original_or_the_salvaged_files() {
    let store = build();
    let (damaged, ranges) = damaged(&store);
    let touched = touched(&files(&store.disk), &ranges);
    let reference = reference(&damaged);
    let mut cases = 0;
    for op in [
        SimOp::Create,
        SimOp::Append,
        SimOp::Sync,
        SimOp::SyncDir,
        SimOp::Rename,
        SimOp::Remove,
        SimOp::Read,
    ] {
        for after in 0.. {
            let disk = damaged.crash(Tear::Clean);
            let kind = if after % 2 == 0 {
                io::ErrorKind::Other
            } else {
                io::ErrorKind::StorageFull
            };
            disk.inject(Fault {
                op,
                after,
                kind,
                sticky: false,
            });
            let label = format!("{op:?} #{after}");
            if salvage_storage(&disk).is_ok() {
                // The fault never fired: every call of `op` was passed.
                break;
            }
            disk.clear_faults();
            cases += 1;
            classify(&disk, &store, &reference, &label);
            let image = disk.crash(Tear::Clean);
            classify(&image, &store, &reference, &format!("{label}, crashed"));
            finish(
                &image,
                &store,
                &reference,
                &touched,
                &format!("{label}, crashed"),
            );
            finish(&disk, &store, &reference, &touched, &label);
        }
    }
    eprintln!("{cases} failed calls");
    assert!(cases > 40, "{cases}");
}

/// Run a salvage to just past its commit point: the first rename after the
/// manifest's fails.
fn pending(store: &Store) -> SimDisk {
    let (disk, _) = damaged(store);
    disk.inject(Fault {
        op: SimOp::Rename,
        after: 1,
        kind: io::ErrorKind::Other,
        sticky: false,
    });
    match salvage_storage(&disk) {
        Err(Error::Io {
            op: idemkv::IoOp::Rename,
            ..
        }) => {}
        other => panic!("expected a failed rename, got {other:?}"),
    }
    assert!(disk.names().iter().any(|n| n == "SALVAGE"));
    disk
}

#[test]
fn an_interrupted_salvage_is_refused_by_every_open_and_finished_by_the_next_salvage() {
    let store = build();
    let disk = pending(&store);
    assert!(matches!(
        open(&disk, &store.clock),
        Err(Error::SalvagePending { .. })
    ));
    assert!(matches!(
        verify_storage(&disk),
        Err(Error::SalvagePending { .. })
    ));
    let report = salvage_storage(&disk).unwrap();
    assert!(report.resumed && !report.changed(), "{report:?}");
    let (_, ranges) = damaged(&store);
    let reference = reference(&damaged(&store).0);
    finish(
        &disk,
        &store,
        &reference,
        &touched(&files(&store.disk), &ranges),
        "resumed",
    );
}

#[test]
fn a_damaged_manifest_or_a_file_that_does_not_match_it_is_reported_never_guessed() {
    let store = build();
    let disk = pending(&store);
    let manifest = disk.read_file("SALVAGE").unwrap();
    let mut bad = manifest.clone();
    bad[20] ^= 1;
    disk.write_file("SALVAGE", &bad);
    match salvage_storage(&disk) {
        Err(Error::Corrupt { file, .. }) => assert!(file.ends_with("SALVAGE"), "{file:?}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert!(matches!(
        open(&disk, &store.clock),
        Err(Error::SalvagePending { .. })
    ));
    // The manifest intact, a file it names changed: refused before any
    // rename.
    disk.write_file("SALVAGE", &manifest);
    // The last salvaged segment file the manifest names (with records), so
    // that the files before it would be renamed if the check came late.
    let temp = with_suffix(&disk, ".log.salvage")
        .into_iter()
        .filter(|(_, b)| b.len() > HEADER + 3)
        .map(|(n, _)| n)
        .next_back()
        .unwrap();
    let mut bytes = disk.read_file(&temp).unwrap();
    bytes[HEADER + 3] ^= 1;
    disk.write_file(&temp, &bytes);
    let before = with_suffix(&disk, "");
    match salvage_storage(&disk) {
        Err(Error::Corrupt { file, .. }) => assert!(file.ends_with(&temp), "{file:?}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    let after = with_suffix(&disk, "");
    let changed: Vec<(&String, usize)> = after
        .iter()
        .filter(|(n, b)| before.get(*n) != Some(b))
        .map(|(n, b)| (n, b.len()))
        .collect();
    let gone: Vec<&String> = before.keys().filter(|n| !after.contains_key(*n)).collect();
    assert!(
        changed.is_empty() && gone.is_empty(),
        "changed {changed:?}, gone {gone:?}"
    );
}

/// The roll-forward is as safe to interrupt as the salvage: a crash at any
/// of its calls leaves the pending directory (or the finished one), and a
/// salvage after it still finishes.
#[test]
fn a_crash_at_every_call_of_a_resumed_salvage_still_leaves_a_pending_or_salvaged_directory() {
    let store = build();
    let (damaged, ranges) = damaged(&store);
    let touched = touched(&files(&store.disk), &ranges);
    let reference = reference(&damaged);
    let pending = pending(&store);
    let counting = Budget::new(&pending.crash(Tear::Clean), None);
    assert!(salvage_storage(&counting).unwrap().resumed);
    let calls = *counting.counter.calls.lock();
    let mut seen = BTreeMap::new();
    for n in 0..calls {
        let disk = pending.crash(Tear::Clean);
        assert!(
            salvage_storage(&Budget::new(&disk, Some(n))).is_err(),
            "call {n}"
        );
        for (label, image) in [("live", disk.clone()), ("crashed", disk.crash(Tear::Clean))] {
            let label = format!("resume call {n}, {label}");
            let got = classify(&image, &store, &reference, &label);
            assert_ne!(got, Seen::Original, "{label}");
            *seen.entry(got).or_insert(0) += 1;
            finish(&image, &store, &reference, &touched, &label);
        }
    }
    eprintln!("{calls} calls: {seen:?}");
    assert!(seen.contains_key(&Seen::Pending) && calls > 10, "{seen:?}");
}
