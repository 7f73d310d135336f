//! Salvage (issue 14, section 4): a store with known contents, damaged on
//! purpose (bit flips, zeroed and garbage ranges, headers, cuts in the
//! middle of a segment that is not the last), salvaged, then reopened:
//! every record no damage touched is answered exactly as before, every
//! other key answers a state it really had, nothing the salvage kept is a
//! phantom, and fencing tokens keep growing (DESIGN.md invariants 1-5).

#[path = "common/salvage_store.rs"]
mod salvage_store;

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use idemkv::storage::{SimDisk, Tear};
use idemkv::{Affected, CorruptKind, Error, HeaderRepair, salvage_storage};
use salvage_store::{
    File, HEADER, Rng, State, Store, USER, big_file, build, check, files, open, snapshot, touched,
};

/// The seeded cases of the random-damage test.
const SEEDS: u64 = 1000;

/// Damages 1 to 3 places of the store's files; returns the damaged byte
/// ranges (a cut: from the cut to the old end).
fn damage(disk: &SimDisk, files: &[File], rng: &mut Rng) -> Vec<(String, Range<usize>)> {
    let last = files.iter().max_by_key(|f| (f.order, f.number)).unwrap();
    let mut out = Vec::new();
    for _ in 0..1 + rng.below(3) {
        let file = &files[rng.below(files.len())];
        let mut bytes = disk.read_file(&file.name).unwrap();
        let len = bytes.len();
        if len == 0 {
            continue;
        }
        let mut what = rng.below(7);
        if what == 6 && file.name == last.name {
            what = 2;
        }
        match what {
            0 | 1 => {
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(len);
                    bytes[at] ^= 1 << rng.below(8);
                    out.push((file.name.clone(), at..at + 1));
                }
            }
            2 | 3 => {
                let at = rng.below(len);
                let end = (at + 1 + rng.below(300)).min(len);
                for b in &mut bytes[at..end] {
                    *b = if what == 2 { 0 } else { rng.next() as u8 };
                }
                out.push((file.name.clone(), at..end));
            }
            4 | 5 => {
                // The header: its magic and version, or its fields.
                let at = if what == 4 {
                    rng.below(12)
                } else {
                    12 + rng.below(HEADER - 12)
                };
                let at = at.min(len - 1);
                bytes[at] ^= 1 << rng.below(8);
                out.push((file.name.clone(), at..at + 1));
            }
            _ => {
                let cut = 1 + rng.below(len - 1);
                bytes.truncate(cut);
                out.push((file.name.clone(), cut..len));
            }
        }
        disk.write_file(&file.name, &bytes);
    }
    out
}

/// Every quarantine file the report names holds exactly the bytes its
/// range held in `damaged` (the files before the salvage).
fn check_quarantine(
    disk: &SimDisk,
    report: &idemkv::SalvageReport,
    damaged: &BTreeMap<String, Vec<u8>>,
) {
    for range in report.ranges() {
        let segment = range.file.file_name().unwrap().to_str().unwrap();
        let name = range.quarantine.file_name().unwrap().to_str().unwrap();
        assert!(
            name.starts_with(segment) && name.ends_with(".quarantine"),
            "{name}"
        );
        let (at, len) = (range.offset as usize, range.len as usize);
        assert_eq!(
            disk.read_file(name).unwrap(),
            damaged[segment][at..at + len],
            "{name}"
        );
    }
}

#[test]
fn random_damage_over_many_seeds_keeps_every_untouched_record_exactly() {
    let store = build();
    let files = files(&store.disk);
    let (mut corrupt, mut opened, mut rebuilt, mut restored, mut unplaced, mut dropped) =
        (0, 0, 0, 0, 0, 0u64);
    for seed in 0..SEEDS {
        let label = format!("seed {seed}");
        let disk = store.disk.crash(Tear::Clean);
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let damaged = damage(&disk, &files, &mut rng);
        match open(&disk.crash(Tear::Clean), &store.clock) {
            Ok(_) => opened += 1,
            Err(Error::Corrupt { .. }) => corrupt += 1,
            Err(e) => panic!("{label}: open failed with {e:?}"),
        }
        let before = snapshot(&disk);
        let report = salvage_storage(&disk).unwrap_or_else(|e| panic!("{label}: {e:?}"));
        check_quarantine(&disk, &report, &before);
        rebuilt += report
            .segments
            .iter()
            .filter(|s| s.header == HeaderRepair::Rebuilt)
            .count();
        restored += report
            .segments
            .iter()
            .filter(|s| s.header == HeaderRepair::Restored)
            .count();
        unplaced += report
            .affected()
            .filter(|a| a.why == Affected::OrderUnknown)
            .count();
        dropped += report.records_dropped;
        let engine = open(&disk, &store.clock).unwrap_or_else(|e| panic!("{label}: {e:?}"));
        check(&engine, &store, &touched(&files, &damaged), &label);
        drop(engine);
        let again = salvage_storage(&disk).unwrap();
        assert!(
            !again.changed(),
            "{label}: a second salvage changed {again:?}"
        );
    }
    eprintln!(
        "{SEEDS} seeds: open refused {corrupt}, opened {opened}; headers rebuilt {rebuilt}, \
         restored {restored}; {dropped} records dropped, {unplaced} for a lost place"
    );
    assert!(
        corrupt > SEEDS / 2,
        "only {corrupt} damaged stores were refused"
    );
    assert!(rebuilt > 10 && restored > 10 && unplaced > 0 && dropped > SEEDS);
}

#[test]
fn a_healthy_store_is_left_exactly_as_it_is() {
    let store = build();
    let disk = store.disk.crash(Tear::Clean);
    let before = snapshot(&disk);
    let report = salvage_storage(&disk).unwrap();
    assert!(
        !report.changed() && report.ranges().count() == 0,
        "{report:?}"
    );
    assert_eq!(report.token_floor, None);
    assert_eq!(snapshot(&disk), before);
    let frames: usize = files(&disk).iter().map(|f| f.frames.len()).sum();
    assert_eq!(report.records_kept, frames as u64);
    let engine = open(&disk, &store.clock).unwrap();
    check(&engine, &store, &BTreeSet::new(), "healthy");
}

/// The file, frame range and key of the first completed record in a file
/// that is not the last.
fn some_record(files: &[File]) -> (&File, Range<usize>, String) {
    for f in &files[..files.len() - 1] {
        for (range, key) in &f.frames {
            if let Some(key) = key
                && f.bytes[range.start + 8] == 2
            {
                return (f, range.clone(), key.clone());
            }
        }
    }
    panic!("no completed record");
}

#[test]
fn a_damaged_record_is_dropped_alone_reported_by_key_and_quarantined_byte_for_byte() {
    let store = build();
    let files = files(&store.disk);
    let (file, range, key) = some_record(&files);
    let disk = store.disk.crash(Tear::Clean);
    let mut bytes = file.bytes.clone();
    bytes[range.end - 1] ^= 0x20; // the last byte of the body
    disk.write_file(&file.name, &bytes);
    match open(&disk.crash(Tear::Clean), &store.clock) {
        Err(Error::Corrupt {
            file: f,
            offset,
            kind,
        }) => {
            assert!(f.ends_with(&file.name));
            assert_eq!((offset, kind), (range.start as u64, CorruptKind::Checksum));
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    let report = salvage_storage(&disk).unwrap();
    let ranges: Vec<_> = report.ranges().collect();
    assert_eq!(ranges.len(), 1, "{report:?}");
    let r = ranges[0];
    assert_eq!(
        (r.offset, r.len, r.kind, r.records),
        (
            range.start as u64,
            range.len() as u64,
            CorruptKind::Checksum,
            1
        )
    );
    let name = format!("{}.{:x}.quarantine", file.name, range.start);
    assert!(r.quarantine.ends_with(&name), "{r:?}");
    assert_eq!(disk.read_file(&name).unwrap(), bytes[range.clone()]);
    let affected: Vec<_> = report.affected().collect();
    assert_eq!(affected.len(), 1);
    assert_eq!(
        (&affected[0].key[..], affected[0].why),
        (key.as_bytes(), Affected::Damaged)
    );
    assert_eq!(report.records_dropped, 1);
    let segment = report
        .segments
        .iter()
        .find(|s| s.path.ends_with(&file.name))
        .unwrap();
    assert_eq!(segment.records_kept, file.frames.len() as u64 - 1);
    assert_eq!(segment.bytes_kept, (file.bytes.len() - range.len()) as u64);
    let engine = open(&disk, &store.clock).unwrap();
    let touched = BTreeSet::from([key.clone()]);
    check(&engine, &store, &touched, "one record");
    assert_ne!(salvage_store::answer(&engine, &key), store.now[&key]);
}

#[test]
fn zeroed_bytes_across_records_resynchronise_on_the_next_whole_frame() {
    let store = build();
    let files = files(&store.disk);
    let file = big_file(&files, 0);
    let (a, c) = (file.frames[2].0.clone(), file.frames[5].0.clone());
    let disk = store.disk.crash(Tear::Clean);
    let mut bytes = file.bytes.clone();
    // From inside the third frame to inside the sixth.
    for b in &mut bytes[a.start + 3..c.start + 9] {
        *b = 0;
    }
    disk.write_file(&file.name, &bytes);
    let report = salvage_storage(&disk).unwrap();
    let ranges: Vec<_> = report.ranges().collect();
    assert_eq!(ranges.len(), 1, "{report:?}");
    assert_eq!(ranges[0].offset as usize, a.start);
    assert_eq!((ranges[0].offset + ranges[0].len) as usize, c.end);
    let damaged = vec![(file.name.clone(), a.start + 3..c.start + 9)];
    let engine = open(&disk, &store.clock).unwrap();
    check(&engine, &store, &touched(&files, &damaged), "zeroed");
}

#[test]
fn a_segment_cut_short_that_is_not_the_last_opens_after_salvage() {
    let store = build();
    let files = files(&store.disk);
    let file = big_file(&files, 1);
    let cut = file.frames[4].0.start + 17;
    let disk = store.disk.crash(Tear::Clean);
    disk.write_file(&file.name, &file.bytes[..cut]);
    assert!(matches!(
        open(&disk.crash(Tear::Clean), &store.clock),
        Err(Error::Corrupt { .. })
    ));
    let report = salvage_storage(&disk).unwrap();
    let r: Vec<_> = report.ranges().collect();
    assert_eq!(
        (r.len(), r[0].offset as usize, r[0].len),
        (1, file.frames[4].0.start, 17)
    );
    let damaged = vec![(file.name.clone(), cut..file.bytes.len())];
    let engine = open(&disk, &store.clock).unwrap();
    check(&engine, &store, &touched(&files, &damaged), "cut");
}

#[test]
fn quarantine_names_never_collide_with_an_earlier_salvage() {
    let store = build();
    let files = files(&store.disk);
    let (file, range, _) = some_record(&files);
    let disk = store.disk.crash(Tear::Clean);
    let mut bytes = file.bytes.clone();
    bytes[range.end - 1] ^= 1;
    disk.write_file(&file.name, &bytes);
    salvage_storage(&disk).unwrap();
    // The same offset damaged again (now another record).
    let mut bytes = disk.read_file(&file.name).unwrap();
    bytes[range.start + 20] ^= 1;
    disk.write_file(&file.name, &bytes);
    let report = salvage_storage(&disk).unwrap();
    let q = &report.ranges().next().unwrap().quarantine;
    assert!(
        q.ends_with(format!("{}.{:x}-1.quarantine", file.name, range.start)),
        "{q:?}"
    );
    let first = format!("{}.{:x}.quarantine", file.name, range.start);
    assert!(disk.read_file(&first).is_some());
}

#[test]
fn a_directory_without_segment_files_is_refused() {
    let disk = SimDisk::new();
    disk.write_file("notes.txt", b"not a store");
    assert!(matches!(
        salvage_storage(&disk),
        Err(Error::InvalidArgument { name: "dir", .. })
    ));
    assert_eq!(disk.names(), ["notes.txt"]);
}

#[test]
fn salvage_of_a_real_directory_refuses_a_locked_or_missing_one() {
    let dir = tempfile::tempdir().unwrap();
    let store: Store = build();
    for f in files(&store.disk) {
        std::fs::write(dir.path().join(&f.name), &f.bytes).unwrap();
    }
    let engine = idemkv::Engine::open(dir.path(), salvage_store::options(&store.clock)).unwrap();
    assert!(matches!(
        idemkv::salvage(dir.path()),
        Err(Error::Locked { .. })
    ));
    drop(engine);
    assert!(!idemkv::salvage(dir.path()).unwrap().changed());
    let missing = dir.path().join("missing");
    assert!(matches!(idemkv::salvage(&missing), Err(Error::Io { .. })));
    assert!(!missing.exists());
}

/// The nested frame of the store: damage to the record whose body holds it
/// (its CRC, its length field, its fields' lengths, its body) never brings
/// it out as a record.
#[test]
fn a_frame_inside_a_damaged_response_body_never_becomes_a_record() {
    let store = build();
    let files = files(&store.disk);
    let (file, range) = files
        .iter()
        .find_map(|f| {
            let (r, _) = f
                .frames
                .iter()
                .find(|(r, k)| k.as_deref() == Some("nested") && f.bytes[r.start + 8] == 2)?;
            Some((f, r.clone()))
        })
        .unwrap();
    // Its CRC, token, fingerprint, key, a byte of the inner frame, its
    // body's last byte: every byte but its lengths.
    let key_at = range.start + 8 + 53 + USER.len();
    let inner = range.end - 80;
    for at in [
        range.start + 5,
        range.start + 10,
        range.start + 50,
        key_at,
        inner,
        range.end - 1,
    ] {
        let disk = store.disk.crash(Tear::Clean);
        let mut bytes = file.bytes.clone();
        bytes[at] ^= 0x11;
        disk.write_file(&file.name, &bytes);
        let report = salvage_storage(&disk).unwrap();
        assert_eq!(report.records_dropped, 1, "byte {at}: {report:?}");
        let engine = open(&disk, &store.clock).unwrap();
        assert_eq!(
            salvage_store::answer(&engine, "ghost"),
            State::Absent,
            "byte {at}"
        );
        let touched = BTreeSet::from(["nested".to_owned()]);
        check(&engine, &store, &touched, &format!("nested, byte {at}"));
    }
}

/// The store written before token reservations existed: its highest token
/// is in its last records. A salvage that drops them must still keep the
/// next open from handing that token out again.
#[test]
fn fencing_tokens_lost_with_damaged_records_are_not_handed_out_again() {
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/v1-written-by-c974420");
    let disk = SimDisk::new();
    for name in ["000004.log", "000005.log", "000006.log", "000007.log"] {
        disk.write_file(name, &std::fs::read(fixture.join(name)).unwrap());
    }
    let fixture_files = files(&disk);
    // The file that replays last.
    let last = fixture_files.iter().max_by_key(|f| f.order).unwrap();
    let max_token = fixture_files
        .iter()
        .flat_map(|f| {
            f.frames.iter().map(|(r, _)| {
                u64::from_le_bytes(f.bytes[r.start + 9..r.start + 17].try_into().unwrap())
            })
        })
        .max()
        .unwrap();
    // The last two records (the begin and the complete of the highest
    // token), and one record in the middle of another file.
    let mut bytes = last.bytes.clone();
    let n = last.frames.len();
    let token_of = |r: &Range<usize>| {
        u64::from_le_bytes(last.bytes[r.start + 9..r.start + 17].try_into().unwrap())
    };
    assert!(
        last.frames[n - 2..]
            .iter()
            .all(|(r, _)| token_of(r) == max_token)
    );
    for (r, _) in &last.frames[n - 2..] {
        bytes[r.end - 1] ^= 1;
    }
    disk.write_file(&last.name, &bytes);
    let other = fixture_files.iter().find(|f| f.name != last.name).unwrap();
    let mut bytes = other.bytes.clone();
    bytes[other.frames[3].0.end - 1] ^= 1;
    disk.write_file(&other.name, &bytes);
    let clock = std::sync::Arc::new(idemkv::ManualClock::new(4_102_444_800_000));
    assert!(matches!(open(&disk, &clock), Err(Error::Corrupt { .. })));
    let report = salvage_storage(&disk).unwrap();
    assert_eq!(report.records_dropped, 3, "{report:?}");
    assert!(report.token_floor.unwrap() > max_token);
    let engine = open(&disk, &clock).unwrap();
    let idemkv::Begin::Started(lease) = engine
        .begin("u", "fresh", idemkv::Fingerprint::of(b"req"))
        .unwrap()
    else {
        panic!("not started");
    };
    assert!(
        lease.token() > max_token,
        "token {} handed out again",
        lease.token()
    );
}
