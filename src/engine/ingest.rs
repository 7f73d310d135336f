//! Copying records in from another copy of the log: the follower side of
//! replication (`cluster`). A node that takes a partition over appends the
//! records the partition's former owner wrote, in the order it wrote them,
//! to its own log and applies them to its index, exactly as recovery
//! would have applied them had they been in its own files.
//!
//! # Invariants
//! - A record is appended to this engine's log before its key's entry
//!   changes, under the key's shard lock (as every write is), so a reader
//!   never sees an entry whose record is not in the log.
//! - Applying a record goes by token (`state::replay`), so copying in a run
//!   of records a second time, in order, leaves the same entries as copying
//!   it once: a follower that restarts may copy in again from an earlier
//!   point than it had reached.
//! - Tokens handed out later are above every token copied in, and so is
//!   the floor of every segment created later (`Log::raise_tokens_past`).

// Only the cluster copies records in.
#![cfg_attr(not(feature = "cluster"), allow(dead_code))]

use crate::error::{CorruptKind, Error, Result};
use crate::index::{KeyId, TOKEN_LIMIT};
use crate::log::Chore;
use crate::log::record::{self, Kind, Record};
use crate::recovery;

use super::Engine;

impl Engine {
    /// Appends the whole frames in `frames` (as the log stores them) to this
    /// engine's log and applies each to the index. Returns the position of
    /// the last record appended (`None` for no frames): once it is durable
    /// (`Log::wait_durable` / `Log::durable`), every one of them is.
    ///
    /// Wakes every waiter, as a completion does.
    ///
    /// # Errors
    /// [`Error::Corrupt`] (file `<changelog>`, offset into `frames`) for a
    /// frame that fails its checksum or does not parse, or carries a token
    /// past the limit; the frames before it were applied. As an append:
    /// [`Error::Closed`], [`Error::Poisoned`], [`Error::Io`],
    /// [`Error::NoSpace`].
    pub(crate) fn ingest(&self, frames: &[u8]) -> Result<Option<u64>> {
        self.check_open()?;
        let mut offset = 0;
        let mut last = None;
        let corrupt = |offset: usize, kind| Error::Corrupt {
            file: std::path::PathBuf::from("<changelog>"),
            offset: offset as u64,
            kind,
        };
        while offset < frames.len() {
            let rest = frames.get(offset..).unwrap_or_default();
            let (record, len) = record::check_frame(rest).map_err(|kind| corrupt(offset, kind))?;
            if record.token >= TOKEN_LIMIT
                || (record.kind != Kind::Reserve && record.key.is_empty())
            {
                return Err(corrupt(offset, CorruptKind::Malformed));
            }
            let applied = self.ingest_one(&record);
            if last.is_some() || applied.is_ok() {
                self.waiters.notify();
            }
            last = Some(applied?);
            offset += len;
        }
        Ok(last)
    }

    /// Blocks until the records [`Engine::ingest`] appended up to `pos` are
    /// durable (synced, whatever the mode: a copy marks what it copied in
    /// only once it is on its disk).
    pub(crate) fn wait_ingested(&self, pos: u64) -> Result<()> {
        self.log.sync_past(pos)
    }

    /// What a copy needs to rebuild this engine's records without their
    /// history: a token reservation frame carrying the highest token
    /// handed out (so a copy built from it never hands one out again), then
    /// the frame of every record the index holds (each key's latest).
    /// Compaction is paused meanwhile, so that no record moves.
    ///
    /// # Errors
    /// [`Error::Closed`]; a record that cannot be read back
    /// ([`Error::Io`], [`Error::Corrupt`]).
    pub(crate) fn snapshot_frames(&self) -> Result<Vec<u8>> {
        self.check_open()?;
        let _still = self.compactor.pause("snapshot")?;
        let mut out = Vec::new();
        let reserve = Record {
            kind: Kind::Reserve,
            token: self.log.highest_token(),
            deadline_ms: 0,
            time_ms: self.clock.read().wall,
            lease_ms: 0,
            fingerprint: 0,
            user: b"",
            key: b"",
            status: 0,
            body: b"",
            seal: None,
        };
        reserve.encode(&mut out);
        for shard in self.index.shards() {
            let mut positions = Vec::new();
            shard.lock().for_each(|e| positions.push(e.pos));
            for pos in positions {
                out.extend_from_slice(self.log.read(pos)?.frame());
            }
        }
        Ok(out)
    }

    /// Appends one record and applies it; see [`Engine::ingest`].
    fn ingest_one(&self, record: &Record<'_>) -> Result<u64> {
        self.log.raise_tokens_past(record.token);
        loop {
            if record.kind == Kind::Reserve {
                // Belongs to no key; kept so that this log's own recovery
                // counts its token into the floor.
                match self.log.append(record)? {
                    Some(pos) => return Ok(pos),
                    None => {
                        self.log.chore(Chore::Room(record.encoded_len()))?;
                        continue;
                    }
                }
            }
            let (user, key) = (record.user, record.key);
            let id = KeyId::new(user, key);
            let mut shard = self.index.shard(&id).lock();
            let Some(pos) = self.log.append(record)? else {
                drop(shard);
                self.log.chore(Chore::Room(record.encoded_len()))?;
                continue;
            };
            recovery::apply_in_shard(&mut shard, &id, record, pos, pos, |at| {
                let theirs = self.log.read(at)?;
                Ok(theirs.user() == record.user && theirs.key() == record.key)
            })?;
            return Ok(pos);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use crate::log::record::Kind;
    use crate::outcome::{Begin, Fingerprint, Outcome};
    use crate::{Engine, Options};

    /// The frames of every segment of a closed engine's directory, in file
    /// order (one segment in these tests: no compaction ran).
    fn frames_of(dir: &std::path::Path) -> Vec<u8> {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".log"))
            .collect();
        names.sort();
        let mut frames = Vec::new();
        for name in names {
            let bytes = std::fs::read(dir.join(name)).unwrap();
            frames.extend_from_slice(&bytes[crate::log::record::HEADER_LEN..]);
        }
        frames
    }

    fn options() -> Options {
        Options {
            background: false,
            ..Options::default()
        }
    }

    fn outcome(body: &str) -> Outcome {
        Outcome {
            status: 201,
            body: body.to_owned().into(),
        }
    }

    /// Writes: k1 completed, k2 in flight, k3 released, k4 completed after
    /// an extend. Returns the highest token handed out.
    fn write_history(engine: &Engine) -> u64 {
        let fp = Fingerprint::of(b"r");
        let mut top = 0;
        for (key, end) in [("k1", "c"), ("k2", "-"), ("k3", "r"), ("k4", "e")] {
            let Begin::Started(lease) = engine.begin("u", key, fp).unwrap() else {
                panic!("fresh key")
            };
            top = top.max(lease.token());
            match end {
                "c" => engine.complete(&lease, outcome(key)).unwrap(),
                "r" => engine.release(&lease).unwrap(),
                "e" => {
                    let lease = engine.extend(&lease, Duration::from_secs(60)).unwrap();
                    engine.complete(&lease, outcome(key)).unwrap();
                }
                _ => {}
            }
        }
        top
    }

    /// The frames of [`write_history`] on a fresh engine, and its top token.
    fn history() -> (Vec<u8>, u64) {
        let original = tempfile::tempdir().unwrap();
        let engine = Engine::open(original.path(), options()).unwrap();
        let top = write_history(&engine);
        engine.close().unwrap();
        (frames_of(original.path()), top)
    }

    fn assert_copy_of_history(copy: &Engine, top: u64) {
        let fp = Fingerprint::of(b"r");
        for key in ["k1", "k4"] {
            assert_eq!(copy.outcome("u", key).unwrap(), Some(outcome(key)));
            assert!(
                matches!(copy.begin("u", key, fp).unwrap(), Begin::Replay(o) if o == outcome(key))
            );
        }
        assert!(matches!(
            copy.begin("u", "k2", fp).unwrap(),
            Begin::InFlight { .. }
        ));
        assert!(matches!(
            copy.begin("u", "k1", Fingerprint::of(b"x")).unwrap(),
            Begin::Mismatch
        ));
        // k3 was released: a new lease, with a token above every copied one.
        let Begin::Started(lease) = copy.begin("u", "k3", fp).unwrap() else {
            panic!("k3 was released")
        };
        assert!(
            lease.token() > top,
            "token {} reissued (top {top})",
            lease.token()
        );
    }

    #[test]
    fn ingested_records_answer_as_the_original_and_tokens_go_past_them() {
        let (frames, top) = history();
        let copy_dir = tempfile::tempdir().unwrap();
        {
            let copy = Engine::open(copy_dir.path(), options()).unwrap();
            let last = copy.ingest(&frames).unwrap().expect("frames were given");
            copy.wait_ingested(last).unwrap();
            assert_copy_of_history(&copy, top);
            copy.close().unwrap();
        }
        // The copy's own recovery sees the same (and its new begin of k3).
        let copy = Engine::open(copy_dir.path(), options()).unwrap();
        assert!(matches!(copy.outcome("u", "k1").unwrap(), Some(o) if o == outcome("k1")));
        let Begin::Started(lease) = copy.begin("u", "k5", Fingerprint::of(b"r")).unwrap() else {
            panic!("fresh key")
        };
        assert!(lease.token() > top + 1);
    }

    #[test]
    fn ingesting_the_same_run_twice_leaves_what_once_did() {
        let (frames, top) = history();
        let copy_dir = tempfile::tempdir().unwrap();
        let copy = Arc::new(Engine::open(copy_dir.path(), options()).unwrap());
        copy.ingest(&frames).unwrap();
        // A restart from an earlier point copies a suffix in again: here
        // from the second record on, then the whole run once more.
        let (_, first) = crate::log::record::check_frame(&frames).unwrap();
        copy.ingest(&frames[first..]).unwrap();
        copy.ingest(&frames).unwrap();
        assert_copy_of_history(&copy, top);
    }

    #[test]
    fn a_damaged_frame_is_corrupt_and_the_frames_before_it_stay() {
        let (mut frames, _) = history();
        // Where the frame after k1's complete starts.
        let mut at = 0;
        let cut = loop {
            let (record, len) = crate::log::record::check_frame(&frames[at..]).unwrap();
            at += len;
            if record.kind == Kind::Complete {
                break at;
            }
        };
        frames[cut + 12] ^= 0x40; // inside that frame
        let copy_dir = tempfile::tempdir().unwrap();
        let copy = Engine::open(copy_dir.path(), options()).unwrap();
        let err = copy.ingest(&frames).unwrap_err();
        assert!(
            matches!(err, crate::Error::Corrupt { offset, .. } if offset == cut as u64),
            "{err:?}"
        );
        // k1's begin and complete (the frames before it) are in.
        assert!(matches!(copy.outcome("u", "k1").unwrap(), Some(o) if o == outcome("k1")));
        // A truncated frame is refused too, without panicking.
        let (_, first) = crate::log::record::check_frame(&frames).unwrap();
        assert!(copy.ingest(&frames[..first - 3]).is_err());
        copy.close().unwrap();
        assert!(matches!(
            copy.ingest(&frames[..first]),
            Err(crate::Error::Closed)
        ));
    }
}
