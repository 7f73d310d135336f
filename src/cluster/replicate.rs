//! Replication at the storage door: a [`Storage`] that sends every record
//! the engine appends to the partition's changelog (a JetStream stream)
//! when the engine syncs, and fails the sync if the changelog refuses.
//!
//! The engine is unchanged: a sync that fails poisons its log, so a call
//! whose record did not reach the changelog is never acknowledged (the
//! crash-tested path of a failed fdatasync). What one sync sends is one
//! message (or a few, split at frame boundaries): group commit carries over
//! to the changelog, one round trip per round.
//!
//! # The copy's mark
//! A file named [`MARK`] beside the segments says how far the local files
//! agree with the changelog: `(file, len, seq)`, "segment `file` up to byte
//! `len` (and the segments before it) hold only frames of the changelog,
//! and every frame of its messages up to `seq`". It is written after every
//! successful sync (a rename, not synced itself: an older or missing mark
//! only means more is copied in again). Before the engine opens a copy,
//! [`reconcile`] cuts every byte the mark does not vouch for (frames
//! appended but never sent, or sent and refused), and the copy catches up
//! from `seq + 1`; frames copied in twice leave the same state
//! (`Engine::ingest`).
//!
//! # Invariants
//! - Own mode: a sync sends the frames appended since the last send, fenced
//!   on the changelog's last sequence, before it syncs the file; a refusal
//!   fails this sync and every later one.
//! - Follow mode: frames come from the changelog (`Engine::ingest`) and are
//!   never sent back; a sync marks the sequence last copied in
//!   ([`Replication::copied`]), which is set only once all of that
//!   message's frames were appended.
//! - The mark never claims more than is synced, nor bytes that are not in
//!   the changelog.

use std::fmt::Debug;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use parking_lot::Mutex;

use crate::log::parse_name;
use crate::log::record::{FRAME_HEADER, HEADER_LEN, SegmentHeader, frame_header};
use crate::storage::{Storage, StorageFile};

/// The name of the copy's mark file.
pub(crate) const MARK: &str = "REPLICATED";
/// Its magic.
const MARK_MAGIC: &[u8; 8] = b"IDEMKVRM";

/// The largest message one send makes: JetStream's default maximum payload
/// is 1 MiB. A single frame larger than this goes alone (and the server
/// refuses it if it is over its limit: a failed sync).
pub(crate) const MAX_MESSAGE: usize = 768 * 1024;

/// The partition's changelog, as the storage sees it: a fenced append.
/// Blocking: called on the thread that syncs (the engine's syncer, a group
/// commit leader, a roll), never on an executor's.
pub(crate) trait Changelog: Send + Sync + Debug + 'static {
    /// Appends `frames` as one message if the changelog's last sequence is
    /// `expected_last`, returning the message's sequence.
    ///
    /// # Errors
    /// Any failure, the fence included: the caller cannot tell whether the
    /// message landed, and acts as if it did not.
    fn append(&self, frames: Bytes, expected_last: u64) -> io::Result<u64>;
}

/// Where the local copy agrees with the changelog.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Mark {
    /// The segment's file number.
    pub file: u64,
    /// Bytes of that segment vouched for.
    pub len: u64,
    /// The changelog sequence whose frames are all in.
    pub seq: u64,
}

impl Mark {
    fn encode(&self) -> Vec<u8> {
        let mut out = MARK_MAGIC.to_vec();
        for v in [self.file, self.len, self.seq] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    fn decode(buf: &[u8]) -> Option<Mark> {
        if buf.len() != 8 + 24 + 4 || buf.get(..8) != Some(&MARK_MAGIC[..]) {
            return None;
        }
        let (body, crc) = buf.split_at(32);
        if crc32fast::hash(body).to_le_bytes() != crc {
            return None;
        }
        let u = |i: usize| {
            body.get(8 + 8 * i..16 + 8 * i)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes)
        };
        Some(Mark {
            file: u(0)?,
            len: u(1)?,
            seq: u(2)?,
        })
    }
}

/// Reads the copy's mark (the default, "nothing vouched for", if it is
/// missing or damaged).
pub(crate) fn read_mark(storage: &dyn Storage) -> Mark {
    let read = || -> io::Result<Option<Mark>> {
        if !storage.list()?.iter().any(|n| n == MARK) {
            return Ok(None);
        }
        let file = storage.open(MARK)?;
        let mut buf = vec![0; file.len()?.min(64) as usize];
        file.read_at(0, &mut buf)?;
        Ok(Mark::decode(&buf))
    };
    read().ok().flatten().unwrap_or_default()
}

fn write_mark(storage: &dyn Storage, mark: Mark) -> io::Result<()> {
    let tmp = format!("{MARK}.tmp");
    let _ = storage.remove(&tmp);
    let file = storage.create(&tmp)?;
    file.append(&mark.encode())?;
    storage.rename(&tmp, MARK)
}

/// Cuts every byte of the local segments that `mark` does not vouch for,
/// before the engine opens them: the tail of the marked segment past its
/// length, and the records of every later segment the writer made (not the
/// compaction outputs: they copy closed, and so sent, segments). Returns
/// the changelog sequence to catch up after.
///
/// # Errors
/// An I/O failure listing, reading or cutting a file.
pub(crate) fn reconcile(storage: &dyn Storage) -> io::Result<u64> {
    let mark = read_mark(storage);
    for name in storage.list()? {
        let Some(number) = parse_name(&name, ".log") else {
            continue;
        };
        let keep = match number.cmp(&mark.file) {
            std::cmp::Ordering::Less => continue,
            std::cmp::Ordering::Equal => mark.len.max(HEADER_LEN as u64),
            std::cmp::Ordering::Greater => HEADER_LEN as u64,
        };
        let file = storage.open(&name)?;
        let len = file.len()?;
        if len <= keep {
            continue;
        }
        let mut head = [0u8; HEADER_LEN];
        file.read_at(0, &mut head)?;
        if SegmentHeader::decode(&head).is_ok_and(|h| h.replaces != 0) {
            continue; // a compaction output
        }
        file.truncate(keep)?;
        file.sync()?;
    }
    Ok(mark.seq)
}

/// The replication state of one partition's local copy.
#[derive(Debug)]
pub(crate) struct Replication {
    changelog: Arc<dyn Changelog>,
    /// The copy's files (the mark is written here).
    inner: Arc<dyn Storage>,
    /// Whether syncs fdatasync the local file (`Durability::Sync` of the
    /// cluster's options); they always send.
    local_sync: bool,
    /// Whether this copy owns the partition (sends its appends).
    own: AtomicBool,
    /// Set by a refused or failed send: every later sync fails.
    failed: AtomicBool,
    /// Held across a send (a network round trip): never taken on an async
    /// runtime's thread, which the send itself may need. The atomics below
    /// mirror what such a thread may read.
    state: Mutex<State>,
    /// Messages sent since the last snapshot.
    sent: AtomicU64,
    /// `State::last_seq`, as of the last change.
    seen: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    /// The last changelog sequence the local files reflect.
    last_seq: u64,
    /// Follow mode: the last sequence whose frames were all appended.
    copied: u64,
}

impl Replication {
    /// A copy in follow mode whose files reflect the changelog up to
    /// `seq`.
    pub fn new(
        changelog: Arc<dyn Changelog>,
        inner: Arc<dyn Storage>,
        local_sync: bool,
        seq: u64,
    ) -> Arc<Replication> {
        Arc::new(Replication {
            changelog,
            inner,
            local_sync,
            own: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            state: Mutex::new(State {
                last_seq: seq,
                copied: seq,
            }),
            sent: AtomicU64::new(0),
            seen: AtomicU64::new(seq),
        })
    }

    /// Follow mode: every frame of message `seq` was appended (through
    /// `Engine::ingest`) and is durable; the next sync may mark it.
    pub fn copied(&self, seq: u64) {
        let mut s = self.state.lock();
        s.copied = s.copied.max(seq);
        s.last_seq = s.last_seq.max(seq);
        self.seen.store(s.last_seq, Ordering::SeqCst);
    }

    /// The last changelog sequence the copy reflects.
    pub fn last_seq(&self) -> u64 {
        self.seen.load(Ordering::SeqCst)
    }

    /// Switches to own mode: appends are sent from now on, the first
    /// fenced on `seq` (the owner's fence message, already in). Call it
    /// with every copied frame synced and nothing else appended.
    pub fn take_ownership(&self, seq: u64) {
        let mut s = self.state.lock();
        s.last_seq = seq;
        s.copied = seq;
        self.seen.store(seq, Ordering::SeqCst);
        self.own.store(true, Ordering::SeqCst);
    }

    /// Messages this copy sent since its last snapshot (or since it took
    /// ownership).
    pub fn sent_since_snapshot(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }

    /// Sends a snapshot of the copy (own mode): `frames` (called with the
    /// send lock held, so every record appended after it reads the index
    /// is sent after the snapshot) gives every live record; they are sent
    /// fenced like any append. Returns the sequence of the snapshot's first
    /// message: every message before it may then be purged, since the
    /// snapshot and what follows it hold the whole state.
    ///
    /// # Errors
    /// A copy not in own mode, or one whose send failed; `frames`' error; a
    /// refused send (which fails the copy, as a refused sync does).
    pub fn send_snapshot(&self, frames: impl FnOnce() -> io::Result<Vec<u8>>) -> io::Result<u64> {
        let mut s = self.state.lock();
        if self.failed.load(Ordering::SeqCst) || !self.own.load(Ordering::SeqCst) {
            return Err(refused());
        }
        let frames = frames()?;
        let first = s.last_seq + 1;
        if let Err(e) = self.send(&mut s, &frames) {
            self.failed.store(true, Ordering::SeqCst);
            return Err(e);
        }
        self.sent.store(0, Ordering::SeqCst);
        Ok(first)
    }

    /// Whether a send failed (the copy must be reopened).
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// Sends `frames` (whole frames), split into messages of at most
    /// [`MAX_MESSAGE`] bytes at frame boundaries.
    fn send(&self, s: &mut State, frames: &[u8]) -> io::Result<()> {
        let mut rest = frames;
        while !rest.is_empty() {
            let mut cut = 0;
            while cut < rest.len() {
                let len = rest
                    .get(cut..)
                    .and_then(frame_header)
                    .map_or(rest.len() - cut, |(len, _)| FRAME_HEADER + len);
                if cut > 0 && cut + len > MAX_MESSAGE {
                    break;
                }
                cut = (cut + len).min(rest.len());
            }
            let (chunk, tail) = rest.split_at(cut);
            let expected = s.last_seq;
            let seq = self
                .changelog
                .append(Bytes::copy_from_slice(chunk), expected)?;
            if seq != expected + 1 {
                // Another writer's message landed between: this copy lacks
                // it, so nothing more may be appended or acknowledged from
                // here (see `interleaved`).
                return Err(interleaved(expected, seq));
            }
            s.last_seq = seq;
            self.seen.store(s.last_seq, Ordering::SeqCst);
            self.sent.fetch_add(1, Ordering::SeqCst);
            rest = tail;
        }
        Ok(())
    }
}

/// A [`Storage`] whose segment files send their appended records to the
/// changelog at each sync.
#[derive(Debug)]
pub(crate) struct ReplicatingStorage {
    inner: Arc<dyn Storage>,
    replication: Arc<Replication>,
}

impl ReplicatingStorage {
    /// Wraps `inner` (already [`reconcile`]d).
    pub fn new(inner: Arc<dyn Storage>, replication: Arc<Replication>) -> ReplicatingStorage {
        ReplicatingStorage { inner, replication }
    }

    fn wrap(&self, name: &str, file: Arc<dyn StorageFile>) -> io::Result<Arc<dyn StorageFile>> {
        let Some(number) = parse_name(name, ".log") else {
            return Ok(file);
        };
        let end = file.len()?;
        Ok(Arc::new(ReplicatingFile {
            inner: file,
            number,
            replication: Arc::clone(&self.replication),
            pending: Mutex::new(Pending {
                frames: Vec::new(),
                end,
            }),
        }))
    }
}

impl Storage for ReplicatingStorage {
    fn create(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        let file = self.inner.create(name)?;
        self.wrap(name, file)
    }

    fn open(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        let file = self.inner.open(name)?;
        self.wrap(name, file)
    }

    fn list(&self) -> io::Result<Vec<String>> {
        self.inner.list()
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        self.inner.remove(name)
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.inner.rename(from, to)
    }

    fn sync_dir(&self) -> io::Result<()> {
        self.inner.sync_dir()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.inner.path(name)
    }

    fn close(&self) {
        self.inner.close();
    }
}

/// One segment file: appends are kept until the next sync sends them.
#[derive(Debug)]
struct ReplicatingFile {
    inner: Arc<dyn StorageFile>,
    number: u64,
    replication: Arc<Replication>,
    pending: Mutex<Pending>,
}

#[derive(Debug)]
struct Pending {
    /// Frames appended since the last sync took them.
    frames: Vec<u8>,
    /// The file's length after the last append.
    end: u64,
}

/// An append acknowledged at `seq` although it expected the changelog's
/// last sequence to be `expected`: a message the appender never saw landed
/// between.
///
/// JetStream checks `Nats-Expected-Last-Sequence` before it proposes a
/// message to the stream's Raft group, not when the group applies it
/// (nats-server issues #4320 and #8469): around a stream leader change, a
/// message checked by the old leader and one checked by the new can both
/// land. So an acknowledgement alone does not prove the fence held; an
/// acknowledgement at exactly `expected + 1` does (nothing else is in the
/// stream between the appender's view and its message).
fn interleaved(expected: u64, seq: u64) -> io::Error {
    io::Error::other(format!(
        "the changelog acknowledged an append at {seq}, expecting {}: another writer's message landed between",
        expected + 1
    ))
}

fn refused() -> io::Error {
    io::Error::other("the partition's changelog refused an earlier append")
}

impl StorageFile for ReplicatingFile {
    fn append(&self, data: &[u8]) -> io::Result<()> {
        let mut p = self.pending.lock();
        let result = self.inner.append(data);
        if result.is_err() {
            // An unknown prefix was written: nothing later may be sent
            // (the engine is poisoned now anyway).
            self.replication.failed.store(true, Ordering::SeqCst);
            return result;
        }
        let start = p.end;
        p.end += data.len() as u64;
        // The segment header is the writer's own, not a record.
        let skip = (HEADER_LEN as u64)
            .saturating_sub(start)
            .min(data.len() as u64) as usize;
        p.frames
            .extend_from_slice(data.get(skip..).unwrap_or_default());
        Ok(())
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_at(offset, buf)
    }

    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn sync(&self) -> io::Result<()> {
        let r = &self.replication;
        // One sync at a time per partition, in the order they send.
        let mut s = r.state.lock();
        if r.failed.load(Ordering::SeqCst) {
            return Err(refused());
        }
        let (frames, end) = {
            let mut p = self.pending.lock();
            (std::mem::take(&mut p.frames), p.end)
        };
        if r.own.load(Ordering::SeqCst) {
            if let Err(e) = r.send(&mut s, &frames) {
                r.failed.store(true, Ordering::SeqCst);
                return Err(e);
            }
        } else {
            s.last_seq = s.last_seq.max(s.copied);
        }
        // Without `Durability::Sync` the changelog is what makes a record
        // durable: the file is synced only when it holds no new frames (a
        // segment header, a roll's or close's last sync of sent frames).
        let fsync = r.local_sync || frames.is_empty();
        if fsync && let Err(e) = self.inner.sync() {
            r.failed.store(true, Ordering::SeqCst);
            return Err(e);
        }
        // Only the writer's handle appends frames; a sync of another handle
        // (a reader's) vouches for nothing, nor does an unsynced file.
        if fsync && !frames.is_empty() {
            let seq = if r.own.load(Ordering::SeqCst) {
                s.last_seq
            } else {
                s.copied
            };
            let mark = Mark {
                file: self.number,
                len: end,
                seq,
            };
            // Best effort: a mark that is not written only means more is
            // copied in again after a restart.
            let _ = write_mark(&*r.inner, mark);
        }
        Ok(())
    }

    fn truncate(&self, len: u64) -> io::Result<()> {
        let mut p = self.pending.lock();
        self.inner.truncate(len)?;
        let kept = p.frames.len() as u64 - p.end.saturating_sub(len).min(p.frames.len() as u64);
        p.frames.truncate(kept as usize);
        p.end = p.end.min(len);
        Ok(())
    }

    fn map(&self, len: u64) -> io::Result<Option<Bytes>> {
        self.inner.map(len)
    }
}
