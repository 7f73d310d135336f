//! The segment table, kept once per reader slot so that reads on different
//! cores touch no shared cache line.
//!
//! Every read of a record looks its segment up in this table, so one
//! `RwLock` around one table made every read, on every core, write the
//! same lock word (a read lock is an atomic add): on two cores that line
//! moved between them on each replay. Here the table is copied
//! [`COPIES`] times, each copy under its own lock on its own cache line. A
//! thread reads the copy of its slot (threads take slots round-robin as
//! they first read); the rare changes (a roll, a compaction's new file or
//! retired one, the cut after a failed sync) take every copy's lock, in
//! order, and change all of them alike.
//!
//! Each copy of a segment also wraps the segment's map in a buffer of its
//! own ([`Segment::map`]), so the reference count a zero-copy replay takes
//! is the copy's, not one count that every core's replays of the segment
//! share.
//!
//! # Invariants
//! - Every copy holds the same slots with the same segments (file,
//!   number, order, counters, shared map) between two `write`s.
//! - A writer holds every copy's lock, so a holder of any read guard sees
//!   no change until it lets go (the cut after a failed sync relies on it).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::Segment;

/// Copies of the table. Readers on more cores than this share copies
/// (still correct, only contended again).
const COPIES: usize = 8;

/// One copy of the table, alone on its cache lines.
#[repr(align(128))]
#[derive(Debug, Default)]
struct Padded(RwLock<BTreeMap<u64, Segment>>);

/// Every segment on disk by slot, once per reader slot.
#[derive(Debug)]
pub(crate) struct SegmentTable {
    copies: [Padded; COPIES],
}

/// The next reader slot to hand out.
static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's reader slot, taken on its first read.
    static SLOT: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The calling thread's copy.
fn slot() -> usize {
    SLOT.with(|s| {
        s.get().unwrap_or_else(|| {
            let taken = NEXT_SLOT.fetch_add(1, Ordering::Relaxed) % COPIES;
            s.set(Some(taken));
            taken
        })
    })
}

impl SegmentTable {
    /// A table holding `segments`.
    pub fn new(segments: &BTreeMap<u64, Segment>) -> SegmentTable {
        SegmentTable {
            copies: std::array::from_fn(|_| {
                Padded(RwLock::new(
                    segments.iter().map(|(&k, s)| (k, s.copy())).collect(),
                ))
            }),
        }
    }

    /// The calling thread's copy, for reading.
    pub fn read(&self) -> RwLockReadGuard<'_, BTreeMap<u64, Segment>> {
        // `slot() < COPIES`: the fallback is never taken.
        let [first, ..] = &self.copies;
        self.copies.get(slot()).unwrap_or(first).0.read()
    }

    /// Every copy, for changing: readers wait until it is dropped.
    pub fn write(&self) -> TableWrite<'_> {
        TableWrite {
            copies: self.copies.iter().map(|c| c.0.write()).collect(),
        }
    }
}

/// Every copy of the table, locked for changing.
pub(crate) struct TableWrite<'a> {
    copies: Vec<RwLockWriteGuard<'a, BTreeMap<u64, Segment>>>,
}

impl TableWrite<'_> {
    /// Adds (or replaces) the segment in `slot`, in every copy.
    pub fn insert(&mut self, slot: u64, segment: Segment) {
        for copy in &mut self.copies {
            copy.insert(slot, segment.copy());
        }
    }

    /// Removes the segment in `slot` from every copy; returns it.
    pub fn remove(&mut self, slot: u64) -> Option<Segment> {
        let mut removed = None;
        for copy in &mut self.copies {
            removed = copy.remove(&slot).or(removed);
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::{COPIES, SegmentTable, slot};
    use crate::log::Segment;
    use crate::storage::{FsStorage, Storage};

    fn table_with_one_file() -> (tempfile::TempDir, SegmentTable) {
        let dir = tempfile::tempdir().unwrap();
        let storage = FsStorage::open(dir.path()).unwrap();
        let file = storage.create("a").unwrap();
        file.append(b"the bytes of a segment").unwrap();
        let mut segments = BTreeMap::new();
        segments.insert(1, Segment::active(&file, 1));
        (dir, SegmentTable::new(&segments))
    }

    #[test]
    fn threads_take_different_copies_round_robin() {
        let here = slot();
        // A thread keeps its slot.
        assert_eq!(slot(), here);
        // Threads that start one after another spread over the copies
        // (other tests' threads may take slots in between, so only ask
        // that they do not all share one).
        let slots: Vec<usize> = (0..COPIES)
            .map(|_| std::thread::spawn(slot).join().unwrap())
            .collect();
        assert!(slots.iter().all(|&s| s < COPIES));
        assert!(slots.iter().any(|&s| s != slots[0]), "{slots:?}");
    }

    #[test]
    fn every_copy_sees_every_change_and_maps_the_same_bytes() {
        let (_dir, table) = table_with_one_file();
        let table = Arc::new(table);
        let map_of = |table: &SegmentTable, s: u64| {
            let copy = table.read();
            copy.get(&s).and_then(|seg| seg.map(64)).map(|b| b.to_vec())
        };
        let here = map_of(&table, 1).unwrap();
        let t = Arc::clone(&table);
        let there = std::thread::spawn(move || map_of(&t, 1)).join().unwrap();
        assert_eq!(here.get(..22), Some(&b"the bytes of a segment"[..]));
        assert_eq!(Some(here), there);

        let first = table.read().get(&1).map(Segment::copy).unwrap();
        table.write().insert(7, first);
        let removed = table.write().remove(1).unwrap();
        assert_eq!(removed.number, 1);
        assert!(table.write().remove(1).is_none());
        for copy in &table.copies {
            let copy = copy.0.read();
            assert_eq!(copy.keys().copied().collect::<Vec<_>>(), vec![7]);
        }
    }
}
