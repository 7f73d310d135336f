//! Online backup (`Engine::backup_to`): a copy taken while calls go on holds
//! every record acknowledged before it started, and opens as it is.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use idemkv::{Begin, Durability, Engine, Error, Fingerprint, Options, Outcome};
use parking_lot::Mutex;

fn body(key: &str) -> Outcome {
    Outcome {
        status: 201,
        body: format!("receipt for {key} {}", "x".repeat(key.len() * 13 % 200)).into(),
    }
}

fn fp(key: &str) -> Fingerprint {
    Fingerprint::of(key.as_bytes())
}

/// Opens `dir` (a backup) and checks that every key in `acked` replays its
/// body; returns how many were checked.
fn replays_all(dir: &Path, acked: &[String]) -> usize {
    let engine = Engine::open(
        dir,
        Options {
            background: false,
            ..Options::default()
        },
    )
    .unwrap_or_else(|e| panic!("{}: the backup does not open: {e}", dir.display()));
    for key in acked {
        match engine.begin("u", key, fp(key)).unwrap() {
            Begin::Replay(outcome) => assert_eq!(outcome, body(key), "{key}"),
            other => panic!(
                "{}: {key} acknowledged before the backup: {other:?}",
                dir.display()
            ),
        }
    }
    acked.len()
}

/// 8 threads claim, complete (and some release) keys while backups are
/// taken in a loop and compaction runs beside them, on segments small
/// enough to roll during a copy. Every backup opens and replays every
/// completion acknowledged before it began.
#[test]
fn backups_taken_under_load_hold_every_record_acknowledged_before_them() {
    let dir = tempfile::tempdir().unwrap();
    let backups = tempfile::tempdir().unwrap();
    let engine = Arc::new(
        Engine::open(
            dir.path(),
            Options {
                durability: Durability::Sync,
                segment_bytes: 64 * 1024,
                sweep_interval: Duration::from_millis(5),
                ..Options::default()
            },
        )
        .unwrap(),
    );
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..8)
        .map(|_| {
            let (engine, acked, stop, next) = (
                Arc::clone(&engine),
                Arc::clone(&acked),
                Arc::clone(&stop),
                Arc::clone(&next),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let key = format!("key-{i}");
                    let Begin::Started(lease) = engine.begin("u", &key, fp(&key)).unwrap() else {
                        panic!("{key}: a fresh key was not started");
                    };
                    if i % 3 == 0 {
                        // Dead records for compaction to drop.
                        engine.release(&lease).unwrap();
                    } else {
                        engine.complete(&lease, body(&key)).unwrap();
                        acked.lock().push(key);
                    }
                }
            })
        })
        .collect();
    let compactor = {
        let (engine, stop) = (Arc::clone(&engine), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut passes = 0u64;
            while !stop.load(Ordering::Relaxed) {
                engine.compact().unwrap();
                passes += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            passes
        })
    };

    let mut taken: Vec<(PathBuf, Vec<String>)> = Vec::new();
    for n in 0..12 {
        std::thread::sleep(Duration::from_millis(20));
        let before = acked.lock().clone();
        let dest = backups.path().join(format!("b{n}"));
        let report = engine.backup_to(&dest).unwrap();
        assert_eq!(report.path, dest);
        assert!(report.segments >= 1 && report.bytes > 0, "{report:?}");
        taken.push((dest, before));
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    let passes = compactor.join().unwrap();
    let stats = engine.stats();
    assert!(passes > 0 && stats.segments_compacted > 0, "{stats:?}");

    let mut checked = 0;
    for (dest, before) in &taken {
        checked += replays_all(dest, before);
    }
    let last = taken.last().map_or(0, |(_, before)| before.len());
    assert!(
        last > 100,
        "too little traffic to mean anything: {last} completions"
    );
    println!(
        "{} backups, {checked} acknowledged completions replayed from them, {passes} compaction passes beside",
        taken.len()
    );
    // The source goes on as before.
    let key = "after";
    let Begin::Started(lease) = engine.begin("u", key, fp(key)).unwrap() else {
        panic!()
    };
    engine.complete(&lease, body(key)).unwrap();
}

/// Without `Sync`, an acknowledged record may still be in the log's buffer:
/// the backup writes it out first.
#[test]
fn a_backup_holds_records_still_in_the_log_buffer() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(
        dir.path(),
        Options {
            durability: Durability::None,
            background: false,
            ..Options::default()
        },
    )
    .unwrap();
    let keys: Vec<String> = (0..50).map(|i| format!("k{i}")).collect();
    for key in &keys {
        let Begin::Started(lease) = engine.begin("u", key, fp(key)).unwrap() else {
            panic!()
        };
        engine.complete(&lease, body(key)).unwrap();
    }
    assert!(engine.stats().log_pending_bytes > 0, "nothing was buffered");
    let dest = dir.path().with_extension("backup");
    engine.backup_to(&dest).unwrap();
    assert_eq!(replays_all(&dest, &keys), 50);
    std::fs::remove_dir_all(&dest).unwrap();
}

#[test]
fn the_destination_must_be_new_or_empty_and_a_closed_engine_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(
        dir.path(),
        Options {
            background: false,
            ..Options::default()
        },
    )
    .unwrap();
    let key = "k";
    let Begin::Started(lease) = engine.begin("u", key, fp(key)).unwrap() else {
        panic!()
    };
    engine.complete(&lease, body(key)).unwrap();
    let out = tempfile::tempdir().unwrap();

    // A directory with a file in it: refused, and left alone.
    let full = out.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("keep"), b"mine").unwrap();
    assert!(matches!(
        engine.backup_to(&full),
        Err(Error::InvalidArgument { name: "dest", .. })
    ));
    assert_eq!(std::fs::read(full.join("keep")).unwrap(), b"mine");
    // A file: refused.
    let file = out.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    assert!(matches!(
        engine.backup_to(&file),
        Err(Error::InvalidArgument { .. })
    ));
    // An empty directory: used.
    let empty = out.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    engine.backup_to(&empty).unwrap();
    assert_eq!(replays_all(&empty, &[key.to_owned()]), 1);
    // A parent that does not exist: an I/O error, and nothing left behind.
    let orphan = out.path().join("no/such/parent");
    assert!(matches!(engine.backup_to(&orphan), Err(Error::Io { .. })));
    let mut left: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, ["empty", "file", "full"]);

    engine.close().unwrap();
    let later = out.path().join("later");
    assert!(matches!(engine.backup_to(&later), Err(Error::Closed)));
    assert!(!later.exists());
}
