//! Reads from read-only maps of the segment files (`Options::mmap_reads`):
//! the same answers as `pread`, zero-copy replays of durable records, and
//! bodies that stay valid after compaction removes their file.

use std::path::Path;

use idemkv::{Begin, Durability, Engine, Error, Fingerprint, Options, Outcome};

fn outcome(i: usize) -> Outcome {
    Outcome {
        status: 200 + (i % 3) as u16,
        body: format!("{i}:{}", "b".repeat(i % 700)).into_bytes().into(),
    }
}

fn open(dir: &Path, durability: Durability, mmap_reads: bool) -> Engine {
    Engine::open(
        dir,
        Options {
            durability,
            mmap_reads,
            segment_bytes: 16 << 10,
            background: false,
            ..Options::default()
        },
    )
    .expect("open")
}

fn write(engine: &Engine, n: usize) {
    for i in 0..n {
        let key = format!("k{i}");
        let Begin::Started(lease) = engine.begin("u", &key, Fingerprint::of(b"r")).unwrap() else {
            panic!("{key} not started");
        };
        engine.complete(&lease, outcome(i)).unwrap();
    }
}

fn replay(engine: &Engine, i: usize) -> Outcome {
    match engine
        .begin("u", format!("k{i}"), Fingerprint::of(b"r"))
        .unwrap()
    {
        Begin::Replay(o) => o,
        other => panic!("k{i}: {other:?}"),
    }
}

/// Every record, in closed segments, the active one, a compaction's output
/// and after a reopen, reads back the same through maps as through pread.
#[test]
fn mapped_reads_answer_exactly_what_pread_answers() {
    for durability in [Durability::Sync, Durability::None] {
        let n = 400;
        let dir = tempfile::tempdir().unwrap();
        let engine = open(dir.path(), durability, true);
        write(&engine, n);
        assert!(engine.stats().segments > 3, "{:?}", engine.stats());
        for i in 0..n {
            assert_eq!(replay(&engine, i), outcome(i), "{durability:?} k{i}");
        }
        engine.compact().unwrap();
        for i in 0..n {
            assert_eq!(replay(&engine, i), outcome(i), "{durability:?} k{i}");
        }
        engine.close().unwrap();
        for mmap in [true, false] {
            let engine = open(dir.path(), durability, mmap);
            for i in 0..n {
                assert_eq!(replay(&engine, i), outcome(i), "{durability:?} {mmap} k{i}");
                assert_eq!(
                    engine.outcome("u", format!("k{i}")).unwrap(),
                    Some(outcome(i))
                );
            }
            engine.close().unwrap();
        }
    }
}

/// A replay of a durable record shares the map (two replays hand out the
/// same bytes, not two copies); with maps off, each read is a new buffer.
#[test]
fn durable_replays_are_zero_copy() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), Durability::Sync, true);
    write(&engine, 50);
    let (a, b) = (replay(&engine, 7), replay(&engine, 7));
    assert_eq!(a, b);
    assert_eq!(a.body.as_ptr(), b.body.as_ptr(), "replays were copied");
    engine.close().unwrap();

    let engine = open(dir.path(), Durability::Sync, false);
    let (a, b) = (replay(&engine, 7), replay(&engine, 7));
    assert_eq!(a, b);
    assert_ne!(a.body.as_ptr(), b.body.as_ptr());
}

/// A body handed out keeps its bytes after compaction removed the file it
/// was mapped from, after close, and after the directory is gone.
#[test]
fn a_body_outlives_its_segment_file() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), Durability::Sync, true);
    write(&engine, 200);
    let held: Vec<Outcome> = (0..200).map(|i| replay(&engine, i)).collect();
    // The begin records are dead now: compaction rewrites every segment
    // and removes the old files.
    let before: Vec<String> = names(dir.path());
    engine.compact().unwrap();
    let after = names(dir.path());
    assert!(
        before.iter().any(|n| !after.contains(n)),
        "compaction removed no file: {before:?} -> {after:?}"
    );
    engine.close().unwrap();
    drop(engine);
    drop(dir);
    for (i, o) in held.iter().enumerate() {
        assert_eq!(*o, outcome(i), "k{i}");
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".log"))
        .collect();
    names.sort();
    names
}

/// A byte flipped in a mapped segment after the engine read it is caught by
/// the record's checksum: a typed error, never another body.
#[test]
fn a_corrupted_mapped_record_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), Durability::Sync, true);
    write(&engine, 100);
    assert_eq!(replay(&engine, 3), outcome(3)); // the first segment is mapped now
    let first = names(dir.path()).into_iter().next().unwrap();
    let path = dir.path().join(&first);
    let bytes = std::fs::read(&path).unwrap();
    let needle = b"3:bbb";
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("k3's body in the first segment");
    // In place, as a bad disk or a stray write would.
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.write_at(&[bytes[at] ^ 0x20], at as u64).unwrap();
    match engine.begin("u", "k3", Fingerprint::of(b"r")) {
        Err(Error::Corrupt { .. }) => {}
        other => panic!("expected Corrupt, got {other:?}"),
    }
}
