//! Arbitrary bytes as segment files, salvaged: `idemkv::salvage_storage`
//! must answer `Ok` or a typed error (DESIGN.md invariant 5), never panic;
//! what it leaves must open, keep every record it reports kept, and need no
//! second salvage (after a restart and after a power loss).
//!
//! Input layout: `segment_files.rs` (the one `log_decode` reads).
#![no_main]

use std::sync::Arc;
use std::time::Duration;

use idemkv::storage::{SimDisk, Storage, Tear};
use idemkv::{CorruptKind, Durability, Engine, Error, ManualClock, Options, salvage_storage};
use libfuzzer_sys::fuzz_target;

#[path = "segment_files.rs"]
mod segment_files;
use segment_files::files;

fn options() -> Options {
    Options {
        durability: Durability::Sync,
        segment_bytes: 4096,
        lease_ttl: Duration::from_secs(30),
        record_ttl: Duration::from_secs(60),
        background: false,
        clock: Arc::new(ManualClock::new(1_700_000_000_000)),
        ..Options::default()
    }
}

fn open(disk: &SimDisk) -> Engine {
    let storage: Arc<dyn Storage> = Arc::new(disk.clone());
    match Engine::open_with_storage(storage, options()) {
        Ok(engine) => engine,
        Err(e) => panic!("a salvaged directory does not open: {e:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let disk = SimDisk::new();
    for (name, bytes) in files(data) {
        disk.write_file(&name, &bytes);
    }
    let report = match salvage_storage(&disk) {
        Ok(report) => report,
        // A file of a newer format is left alone.
        Err(Error::Corrupt {
            kind: CorruptKind::UnsupportedVersion(_),
            ..
        }) => return,
        Err(e) => panic!("salvage answered an unexpected error: {e:?}"),
    };
    let kept: u64 = report.segments.iter().map(|s| s.records_kept).sum();
    assert_eq!(kept, report.records_kept);
    // What a power loss leaves is what the salvage left: it synced it all.
    for image in [disk.clone(), disk.crash(Tear::Clean)] {
        let engine = open(&image);
        let stats = engine.stats();
        assert!(stats.segments >= 1, "{stats:?}");
        engine.close().unwrap();
        let again = salvage_storage(&image).unwrap();
        assert!(!again.changed(), "a second salvage changed {again:?}");
        drop(open(&image));
    }
});
