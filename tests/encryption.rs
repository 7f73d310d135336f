//! Encryption at rest (issue 14, section 2; feature `encryption`): stored
//! bodies are sealed under the current key and never reach the files in
//! the clear; older keys still open what they sealed, and a compaction
//! seals every record it keeps under the current key; a missing key, a
//! wrong key and a tampered record each give their own typed error, never
//! garbage bytes; opening and `verify` need no key.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use idemkv::{
    AsyncEngine, Begin, CorruptKind, EncryptionKeys, Engine, Error, Fingerprint, KeyError,
    ManualClock, Options, Outcome, RecordState,
};

#[path = "common/files.rs"]
mod files;
use files::{SEALED, all_frames, holding, tamper};

/// The bytes of key `id` (a wrong key is `wrong_key(id)`).
fn key(id: u32) -> [u8; 32] {
    std::array::from_fn(|i| (id as u8).wrapping_mul(37) ^ (i as u8))
}

fn wrong_key(id: u32) -> [u8; 32] {
    let mut k = key(id);
    k[7] ^= 1;
    k
}

/// Keys with `current` sealing and `old` opening.
fn keys(current: u32, old: &[u32]) -> EncryptionKeys {
    old.iter().fold(
        EncryptionKeys::new(current, &key(current)).unwrap(),
        |k, &id| k.with_old_key(id, &key(id)).unwrap(),
    )
}

/// Small segments (several files), no background thread.
fn options(keys: Option<EncryptionKeys>) -> Options {
    Options {
        segment_bytes: 4096,
        background: false,
        encryption: keys,
        ..Options::default()
    }
}

fn open(dir: &Path, keys: Option<EncryptionKeys>) -> Engine {
    Engine::open(dir, options(keys)).unwrap()
}

/// What the files are grepped for: it starts every body of record `i`.
fn needle(i: usize) -> Vec<u8> {
    format!("SECRET-BODY-{i:04}:").into_bytes()
}

/// Record `i`'s body: its needle, then filler, `len` bytes at least.
fn body(i: usize, len: usize) -> Vec<u8> {
    let mut b = needle(i);
    while b.len() < len {
        b.extend_from_slice(b"card 4242 4242 4242 4242; ");
    }
    b
}

fn key_of(i: usize) -> String {
    format!("order-{i}")
}

/// Begins and completes record `i` with `body`.
fn store(engine: &Engine, i: usize, body: &[u8]) {
    let key = key_of(i);
    let Begin::Started(lease) = engine
        .begin("u", &key, Fingerprint::of(key.as_bytes()))
        .unwrap()
    else {
        panic!("record {i} was not started");
    };
    let outcome = Outcome {
        status: 201,
        body: body.to_vec().into(),
    };
    engine.complete(&lease, outcome).unwrap();
}

/// What a retry of record `i` gets back: its outcome, or the error.
fn replay(engine: &Engine, i: usize) -> Result<Outcome, Error> {
    let key = key_of(i);
    match engine.begin("u", &key, Fingerprint::of(key.as_bytes()))? {
        Begin::Replay(outcome) => Ok(outcome),
        other => panic!("record {i}: expected a replay, got {other:?}"),
    }
}

fn assert_replays(engine: &Engine, records: impl IntoIterator<Item = (usize, Vec<u8>)>) {
    for (i, body) in records {
        let got = replay(engine, i).unwrap_or_else(|e| panic!("record {i}: {e}"));
        assert_eq!((got.status, &got.body[..]), (201, &body[..]), "record {i}");
    }
}

/// Fails if any file in `dir` holds the start of a body of `records`.
fn assert_nowhere(dir: &Path, records: impl IntoIterator<Item = usize>, when: &str) {
    for i in records {
        let found = holding(dir, &needle(i));
        assert!(
            found.is_empty(),
            "{when}: body {i} in the clear in {found:?}"
        );
    }
}

#[test]
fn the_plaintext_of_a_body_never_appears_in_the_data_files() {
    let bodies: Vec<(usize, Vec<u8>)> = (0..40).map(|i| (i, body(i, 40 + 37 * i))).collect();
    // Without a key the check finds every body: it can fail.
    let plain = tempfile::tempdir().unwrap();
    let engine = open(plain.path(), None);
    for (i, b) in &bodies {
        store(&engine, *i, b);
    }
    drop(engine);
    for (i, _) in &bodies {
        assert!(!holding(plain.path(), &needle(*i)).is_empty(), "body {i}");
    }

    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), Some(keys(1, &[])));
    for (i, b) in &bodies {
        store(&engine, *i, b);
    }
    assert!(engine.inspect().segments.len() > 2, "several segment files");
    assert_nowhere(dir.path(), 0..40, "after the completes");
    let report = engine.compact().unwrap();
    assert!(report.segments_compacted > 0);
    assert_eq!(report.records_resealed, 0, "already under the current key");
    assert_nowhere(dir.path(), 0..40, "after compaction");
    assert_replays(&engine, bodies.clone());
    drop(engine);
    let engine = open(dir.path(), Some(keys(1, &[])));
    assert_nowhere(dir.path(), 0..40, "after reopen");
    assert_replays(&engine, bodies.clone());
    engine.compact().unwrap();
    assert_nowhere(dir.path(), 0..40, "after a second compaction");
    let sealed = all_frames(dir.path())
        .into_iter()
        .filter(|(_, f)| f.kind == SEALED)
        .count();
    assert_eq!(sealed, 40);
}

#[test]
fn records_under_three_key_ids_replay_and_compaction_reseals_them_under_the_current_key() {
    let dir = tempfile::tempdir().unwrap();
    let batch = |n: usize| (n * 5..n * 5 + 5).map(|i| (i, body(i, 100 + i)));
    let all = || batch(0).chain(batch(1)).chain(batch(2));
    // Key 1, then key 2 current with 1 kept, then key 3 with both kept.
    for (n, k) in [keys(1, &[]), keys(2, &[1]), keys(3, &[2, 1])]
        .into_iter()
        .enumerate()
    {
        let engine = open(dir.path(), Some(k));
        for (i, b) in batch(n) {
            store(&engine, i, &b);
        }
        assert_replays(&engine, (0..=n).flat_map(batch));
    }
    let ids = |dir: &Path| {
        let mut ids: Vec<u32> = all_frames(dir)
            .iter()
            .filter_map(|(_, f)| f.key_id)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    };
    assert_eq!(ids(dir.path()), vec![1, 2, 3]);

    // With only the current key, the older records cannot be opened.
    let engine = open(dir.path(), Some(keys(3, &[])));
    assert!(matches!(
        replay(&engine, 0),
        Err(Error::MissingKey { key_id: 1, .. })
    ));
    assert!(matches!(
        replay(&engine, 5),
        Err(Error::MissingKey { key_id: 2, .. })
    ));
    assert_replays(&engine, batch(2));
    // ... nor resealed: the compaction fails and changes nothing.
    assert!(matches!(engine.compact(), Err(Error::MissingKey { .. })));
    drop(engine);

    // With every key, compaction reseals the older records under key 3.
    let engine = open(dir.path(), Some(keys(3, &[2, 1])));
    let report = engine.compact().unwrap();
    assert_eq!(report.records_resealed, 10);
    drop(engine);
    assert_eq!(ids(dir.path()), vec![3]);
    let engine = open(dir.path(), Some(keys(3, &[])));
    assert_replays(&engine, all());
    assert_eq!(engine.compact().unwrap().records_resealed, 0);
    assert_nowhere(dir.path(), 0..15, "after the rotation");
}

#[test]
fn a_plaintext_store_opened_with_a_key_replays_and_compaction_seals_it() {
    let dir = tempfile::tempdir().unwrap();
    let old: Vec<_> = (0..10).map(|i| (i, body(i, 300))).collect();
    let new: Vec<_> = (10..20).map(|i| (i, body(i, 300))).collect();
    let engine = open(dir.path(), None);
    for (i, b) in &old {
        store(&engine, *i, b);
    }
    drop(engine);
    let engine = open(dir.path(), Some(keys(4, &[])));
    assert_replays(&engine, old.clone());
    for (i, b) in &new {
        store(&engine, *i, b);
    }
    assert!(!holding(dir.path(), &needle(0)).is_empty());
    assert_nowhere(dir.path(), 10..20, "new records");
    let report = engine.compact().unwrap();
    assert_eq!(report.records_resealed, 10);
    assert_nowhere(dir.path(), 0..20, "after compaction");
    assert_replays(&engine, old.iter().chain(&new).cloned());
    drop(engine);
    // Sealed now: an engine without the key cannot read them.
    let engine = open(dir.path(), None);
    assert!(matches!(
        replay(&engine, 3),
        Err(Error::MissingKey { key_id: 4, .. })
    ));
}

#[test]
fn a_missing_key_is_a_typed_error_naming_its_id_and_opening_needs_no_key() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), Some(keys(7, &[])));
    store(&engine, 0, &body(0, 50));
    let fp = Fingerprint::of(b"in flight");
    assert!(matches!(
        engine.begin("u", "held", fp).unwrap(),
        Begin::Started(_)
    ));
    drop(engine);

    let report = idemkv::verify(dir.path()).unwrap();
    assert_eq!(report.records, 4, "verify needs no key");
    for (new_key, keys) in [(false, None), (true, Some(keys(8, &[])))] {
        let engine = open(dir.path(), keys);
        let view = engine.get("u", key_of(0)).unwrap().unwrap();
        assert_eq!(view.state, RecordState::Completed);
        let missing = |e: Error| match e {
            Error::MissingKey {
                key_id,
                file,
                offset,
            } => {
                assert_eq!(key_id, 7);
                assert!(file.starts_with(dir.path()) && file.is_file(), "{file:?}");
                assert!(offset >= 56);
                let text = Error::MissingKey {
                    key_id,
                    file,
                    offset,
                }
                .to_string();
                assert!(text.contains("key with id 7"), "{text}");
            }
            other => panic!("expected MissingKey, got {other:?}"),
        };
        missing(replay(&engine, 0).unwrap_err());
        missing(engine.outcome("u", key_of(0)).unwrap_err());
        let fp0 = Fingerprint::of(key_of(0).as_bytes());
        missing(
            engine
                .wait("u", key_of(0), fp0, Duration::ZERO)
                .unwrap_err(),
        );
        missing(engine.for_each_record(None, |_| {}).unwrap_err());
        // What needs no body works.
        assert!(matches!(
            engine.begin("u", "held", fp).unwrap(),
            Begin::InFlight { .. }
        ));
        let i = 1 + usize::from(new_key);
        store(&engine, i, b"new");
        assert_eq!(&replay(&engine, i).unwrap().body[..], b"new");
    }
}

#[test]
fn a_wrong_key_under_the_same_id_fails_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), Some(keys(5, &[])));
    store(&engine, 0, &body(0, 80));
    drop(engine);
    let wrong = EncryptionKeys::new(5, &wrong_key(5)).unwrap();
    let engine = open(dir.path(), Some(wrong));
    for err in [
        replay(&engine, 0).unwrap_err(),
        engine.outcome("u", key_of(0)).unwrap_err(),
    ] {
        assert!(
            matches!(
                err,
                Error::Corrupt {
                    kind: CorruptKind::Authentication { key_id: 5 },
                    ..
                }
            ),
            "{err:?}"
        );
    }
    drop(engine);
    // Nothing changed: the right key still opens it.
    let engine = open(dir.path(), Some(keys(5, &[])));
    assert_replays(&engine, [(0, body(0, 80))]);
}

/// Where [`tampering_with_a_sealed_record_is_corrupt_never_garbage`]
/// changes a byte: from the sealed body's start, or back from the frame's
/// end.
enum Where {
    Body(isize),
    End(usize),
}

#[test]
fn tampering_with_a_sealed_record_is_corrupt_never_garbage() {
    // Before the body: status (2), key id (4), nonce (24), length (4).
    let cases = [
        ("a ciphertext byte", Where::Body(3), 0x01),
        ("the tag", Where::End(1), 0x80),
        ("a nonce byte", Where::Body(-4 - 24 + 5), 0x04),
        ("the status", Where::Body(-4 - 24 - 4 - 2), 0x01),
        (
            "the key id, to another configured key",
            Where::Body(-4 - 24 - 4),
            0x03,
        ),
    ];
    for (what, at, mask) in cases {
        let dir = tempfile::tempdir().unwrap();
        let engine = open(dir.path(), Some(keys(1, &[2])));
        store(&engine, 0, &body(0, 40));
        drop(engine);
        let (file, frame) = all_frames(dir.path())
            .into_iter()
            .find(|(_, f)| f.kind == SEALED)
            .unwrap();
        let at = match at {
            Where::Body(n) => frame.body_at.unwrap().checked_add_signed(n).unwrap(),
            Where::End(n) => frame.len - n,
        };
        tamper(&file, frame, at, mask);
        // The CRC matches: verify and open see nothing wrong.
        idemkv::verify(dir.path()).unwrap();
        let engine = open(dir.path(), Some(keys(1, &[2])));
        let err = replay(&engine, 0).unwrap_err();
        match &err {
            Error::Corrupt {
                file: named,
                offset,
                kind: CorruptKind::Authentication { key_id },
            } => {
                assert_eq!((named, *offset), (&file, frame.offset as u64), "{what}");
                let want = if what.starts_with("the key id") { 2 } else { 1 };
                assert_eq!(*key_id, want, "{what}");
            }
            other => panic!("{what}: expected an authentication failure, got {other:?}"),
        }
        // A compaction must open the body to reseal it: it fails too.
        drop(engine);
        let engine = open(dir.path(), Some(keys(3, &[1, 2])));
        assert!(
            matches!(engine.compact(), Err(Error::Corrupt { .. })),
            "{what}"
        );
    }
}

#[test]
fn every_read_path_opens_sealed_bodies_of_any_length() {
    let dir = tempfile::tempdir().unwrap();
    // Empty, one byte, just under and over a first read, over a segment.
    let bodies: Vec<_> = [0usize, 1, 500, 513, 5000]
        .into_iter()
        .enumerate()
        .map(|(i, len)| (i, body(i, len).into_iter().take(len).collect::<Vec<u8>>()))
        .collect();
    for mmap_reads in [true, false] {
        let engine = Engine::open(
            dir.path(),
            Options {
                mmap_reads,
                ..options(Some(keys(1, &[])))
            },
        )
        .unwrap();
        for (i, b) in &bodies {
            if engine.get("u", key_of(*i)).unwrap().is_none() {
                store(&engine, *i, b);
            }
        }
        assert_replays(&engine, bodies.clone());
        for (i, b) in &bodies {
            let fp = Fingerprint::of(key_of(*i).as_bytes());
            let waited = engine.wait("u", key_of(*i), fp, Duration::ZERO).unwrap();
            assert_eq!(&waited.unwrap().body[..], &b[..]);
            assert_eq!(
                &engine.outcome("u", key_of(*i)).unwrap().unwrap().body[..],
                &b[..]
            );
        }
        let mut dumped = Vec::new();
        engine
            .for_each_record(Some(b"u"), |r| {
                dumped.push((r.key.clone(), r.outcome.clone().unwrap().body));
            })
            .unwrap();
        dumped.sort();
        let mut want: Vec<_> = bodies
            .iter()
            .map(|(i, b)| (key_of(*i).into_bytes(), b.clone()))
            .collect();
        want.sort();
        let dumped: Vec<_> = dumped
            .into_iter()
            .map(|(k, b)| (k.to_vec(), b.to_vec()))
            .collect();
        assert_eq!(dumped, want);
        let engine = Arc::new(engine);
        let asynch = AsyncEngine::new(Arc::clone(&engine));
        let fp = Fingerprint::of(key_of(4).as_bytes());
        match futures::executor::block_on(asynch.begin("u", key_of(4), fp)).unwrap() {
            Begin::Replay(o) => assert_eq!(&o.body[..], &bodies[4].1[..]),
            other => panic!("async begin: {other:?}"),
        }
        engine.close().unwrap();
    }
}

#[test]
fn compaction_without_a_key_copies_sealed_records_as_they_are() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let at = |keys| Options {
        clock: clock.clone(),
        ..options(keys)
    };
    let engine = Engine::open(dir.path(), at(Some(keys(1, &[])))).unwrap();
    for i in 0..20 {
        store(&engine, i, &body(i, 200));
    }
    drop(engine);
    // The begin records' leases are over: compaction drops them.
    clock.advance(Duration::from_secs(60));
    let engine = Engine::open(dir.path(), at(None)).unwrap();
    let report = engine.compact().unwrap();
    // Dropped: the 20 begins and the token reservation.
    assert_eq!((report.records_dropped, report.records_kept), (21, 20));
    assert_eq!(report.records_resealed, 0);
    drop(engine);
    assert_nowhere(dir.path(), 0..20, "after a compaction without keys");
    let engine = Engine::open(dir.path(), at(Some(keys(1, &[])))).unwrap();
    assert_replays(&engine, (0..20).map(|i| (i, body(i, 200))));
}

#[test]
fn keys_and_options_never_show_key_bytes_and_bad_keys_are_typed_errors() {
    let k = EncryptionKeys::new(9, &[0xab; 32])
        .unwrap()
        .with_old_key(3, &[0xcd; 32])
        .unwrap();
    let shown = format!("{:?}", options(Some(k.clone())));
    assert!(
        shown.contains("EncryptionKeys { current: 9, old: [3] }"),
        "{shown}"
    );
    for byte in ["171", "205", "ab", "cd"] {
        assert!(!shown.contains(&format!("{byte}, {byte}")), "{shown}");
    }
    assert!(matches!(
        EncryptionKeys::new(1, b"short"),
        Err(KeyError::WrongLength { id: 1, len: 5 })
    ));
    assert!(matches!(
        k.with_old_key(9, &[0; 32]),
        Err(KeyError::DuplicateId { id: 9 })
    ));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys");
    assert!(matches!(
        EncryptionKeys::from_file(&path),
        Err(KeyError::Io { .. })
    ));
    let hex: String = key(2).iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(&path, format!("# current first\n2 {hex}\n")).unwrap();
    let from_file = EncryptionKeys::from_file(&path).unwrap();
    assert_eq!(from_file.ids(), vec![2]);
    // The file's key is key(2): it opens what keys(2) sealed.
    let data = tempfile::tempdir().unwrap();
    store(&open(data.path(), Some(keys(2, &[]))), 0, b"abc");
    assert_eq!(
        &replay(&open(data.path(), Some(from_file)), 0).unwrap().body[..],
        b"abc"
    );
}

/// A rotation completes even for segments in which every record is live
/// (a full compaction rewrites them only to reseal them).
#[test]
fn a_full_compaction_reseals_segments_that_hold_no_dead_record() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let at = |keys| Options {
        clock: clock.clone(),
        ..options(keys)
    };
    let engine = Engine::open(dir.path(), at(Some(keys(1, &[])))).unwrap();
    for i in 0..10 {
        store(&engine, i, &body(i, 1000));
    }
    // Leases over: this compaction leaves only the live completes.
    clock.advance(Duration::from_secs(60));
    engine.compact().unwrap();
    assert_eq!(engine.compact().unwrap().segments_compacted, 0, "all live");
    drop(engine);
    let engine = Engine::open(dir.path(), at(Some(keys(2, &[1])))).unwrap();
    let report = engine.compact().unwrap();
    assert_eq!((report.records_resealed, report.records_dropped), (10, 0));
    let ids: Vec<u32> = all_frames(dir.path())
        .iter()
        .filter_map(|(_, f)| f.key_id)
        .collect();
    assert_eq!(ids, vec![2; 10]);
    assert_eq!(engine.compact().unwrap().segments_compacted, 0, "resealed");
}
