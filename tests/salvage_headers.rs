//! Salvage of damaged segment headers (issue 14, section 4): a header
//! whose magic or version bytes were hit is restored with its own fields;
//! one whose fields are lost is rebuilt from the file name, and keeps only
//! the records whose place in the replay order cannot change an answer (a
//! compaction output replays at the order of the file it replaced, not at
//! its number); a file of a newer format is refused, untouched.

#[path = "common/salvage_store.rs"]
mod salvage_store;

use std::collections::BTreeSet;

use idemkv::storage::Tear;
use idemkv::{Affected, CorruptKind, Error, HeaderRepair, salvage_storage};
use salvage_store::{HEADER, State, big_file, build, check, files, open, snapshot, touched};

#[test]
fn a_header_with_damaged_magic_or_version_is_restored_and_keeps_every_record() {
    let store = build();
    let files = files(&store.disk);
    for at in [0, 7, 8, 11] {
        let disk = store.disk.crash(Tear::Clean);
        let file = big_file(&files, 2);
        let mut bytes = file.bytes.clone();
        bytes[at] ^= 0x40;
        disk.write_file(&file.name, &bytes);
        let report = salvage_storage(&disk).unwrap();
        let segment = report
            .segments
            .iter()
            .find(|s| s.path.ends_with(&file.name))
            .unwrap();
        assert_eq!(segment.header, HeaderRepair::Restored, "byte {at}");
        assert_eq!(segment.records_kept, file.frames.len() as u64);
        assert_eq!(report.records_dropped, 0);
        let engine = open(&disk, &store.clock).unwrap();
        check(
            &engine,
            &store,
            &BTreeSet::new(),
            &format!("header byte {at}"),
        );
    }
}

/// A compaction output whose header is lost must not replay at its file
/// number: it holds the begin of a lease completed after the compaction
/// (in a segment that replays before that number), and replaying the
/// begin after the completion would bring the lease back.
#[test]
fn a_lost_header_on_a_compaction_output_never_brings_a_finished_lease_back() {
    let store = build();
    let files = files(&store.disk);
    let mut cases = 0;
    for output in files.iter().filter(|f| f.order < f.number) {
        // Keys begun in this output and completed in a file replaying
        // between its order and its number.
        let later: BTreeSet<&String> = files
            .iter()
            .filter(|g| g.order > output.order && g.order < output.number)
            .flat_map(|g| g.frames.iter().filter_map(|(_, k)| k.as_ref()))
            .collect();
        let finished: Vec<&String> = output
            .frames
            .iter()
            .filter(|(r, k)| {
                output.bytes[r.start + 8] == 1 && k.as_ref().is_some_and(|k| later.contains(k))
            })
            .filter_map(|(_, k)| k.as_ref())
            .filter(|k| matches!(store.now[*k], State::Done(_)))
            .collect();
        if finished.is_empty() {
            continue;
        }
        cases += 1;
        let disk = store.disk.crash(Tear::Clean);
        let mut bytes = output.bytes.clone();
        for b in &mut bytes[16..HEADER] {
            *b = 0;
        }
        disk.write_file(&output.name, &bytes);
        let report = salvage_storage(&disk).unwrap();
        let segment = report
            .segments
            .iter()
            .find(|s| s.path.ends_with(&output.name))
            .unwrap();
        assert_eq!(segment.header, HeaderRepair::Rebuilt);
        let engine = open(&disk, &store.clock).unwrap();
        for key in &finished {
            assert_eq!(
                salvage_store::answer(&engine, key),
                store.now[*key],
                "{key} came back"
            );
            assert!(
                segment
                    .affected
                    .iter()
                    .any(|a| a.key == key.as_bytes() && a.why == Affected::OrderUnknown),
                "{key} not reported"
            );
        }
        let damaged = vec![(output.name.clone(), 16..HEADER)];
        check(&engine, &store, &touched(&files, &damaged), &output.name);
    }
    assert!(
        cases > 0,
        "no compaction output holds a lease finished after it"
    );
}

/// An ordinary segment whose header is lost keeps, at its file number (its
/// real place), every record of a key found in no file replaying before it.
#[test]
fn a_lost_header_on_an_ordinary_segment_keeps_the_records_whose_place_cannot_matter() {
    let store = build();
    let files = files(&store.disk);
    let file = files
        .iter()
        .rev()
        .find(|f| f.order == f.number && f.frames.len() > 4)
        .unwrap();
    let before: BTreeSet<&String> = files
        .iter()
        .filter(|g| g.order < file.number)
        .flat_map(|g| g.frames.iter().filter_map(|(_, k)| k.as_ref()))
        .collect();
    let disk = store.disk.crash(Tear::Clean);
    let mut bytes = file.bytes.clone();
    bytes[30] ^= 1;
    disk.write_file(&file.name, &bytes);
    let report = salvage_storage(&disk).unwrap();
    let segment = report
        .segments
        .iter()
        .find(|s| s.path.ends_with(&file.name))
        .unwrap();
    assert_eq!(segment.header, HeaderRepair::Rebuilt);
    let own: Vec<&String> = file.frames.iter().filter_map(|(_, k)| k.as_ref()).collect();
    let lost: BTreeSet<String> = own
        .iter()
        .filter(|k| before.contains(**k))
        .map(|k| (*k).clone())
        .collect();
    assert!(
        own.len() > lost.len(),
        "every key of {} is elsewhere too",
        file.name
    );
    assert_eq!(
        segment.records_dropped as usize,
        own.iter().filter(|k| lost.contains(**k)).count()
    );
    let engine = open(&disk, &store.clock).unwrap();
    check(&engine, &store, &lost, "ordinary");
}

#[test]
fn a_file_of_a_newer_format_is_refused_and_nothing_changes() {
    let store = build();
    let files = files(&store.disk);
    let file = big_file(&files, 0);
    let disk = store.disk.crash(Tear::Clean);
    let mut bytes = file.bytes.clone();
    // Version 2, and no version-1 frame in it.
    bytes[8] = 2;
    for b in &mut bytes[HEADER..] {
        *b = b.wrapping_add(1);
    }
    disk.write_file(&file.name, &bytes);
    let before = snapshot(&disk);
    match salvage_storage(&disk) {
        Err(Error::Corrupt {
            file: f,
            offset: 8,
            kind: CorruptKind::UnsupportedVersion(2),
        }) => {
            assert!(f.ends_with(&file.name));
        }
        other => panic!("expected UnsupportedVersion, got {other:?}"),
    }
    assert_eq!(snapshot(&disk), before);
}
