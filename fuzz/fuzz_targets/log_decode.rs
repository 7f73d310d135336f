//! Arbitrary bytes as log segments: recovery must answer `Ok` or a typed
//! error (DESIGN.md invariant 5), never panic, hang or allocate hugely; an
//! engine it opens must work, a full compaction of what it accepted must
//! succeed, and what it then holds must reopen (after a restart and after a
//! power loss).
//!
//! Input layout: `segment_files.rs`.
//!
//! Sealed complete records (type 6) parse without a key: reading one's body
//! answers `MissingKey`. With this crate's `encryption` feature the engine
//! holds key 1 (`[7; 32]`, the key of the `one-segment-sealed` seed), so
//! fuzzed sealed records reach the AEAD: a body that fails authentication
//! is `Corrupt`, and a compaction that must reseal such a record (or one
//! under another key) fails with that typed error instead of succeeding.
#![no_main]

use std::sync::Arc;
use std::time::Duration;

use idemkv::storage::{SimDisk, Storage, Tear};
use idemkv::{Begin, Durability, Engine, Error, Fingerprint, ManualClock, Options, Outcome};
use libfuzzer_sys::fuzz_target;

#[path = "segment_files.rs"]
mod segment_files;
use segment_files::files;

/// The engine clock: the fuzzer's records carry arbitrary times.
const NOW_MS: u64 = 1_700_000_000_000;

fn options(clock: &Arc<ManualClock>) -> Options {
    Options {
        durability: Durability::Sync,
        segment_bytes: 4096,
        lease_ttl: Duration::from_secs(30),
        record_ttl: Duration::from_secs(60),
        background: false,
        clock: clock.clone(),
        #[cfg(feature = "encryption")]
        encryption: Some(idemkv::EncryptionKeys::new(1, &[7; 32]).expect("a 32-byte key")),
        ..Options::default()
    }
}

/// Whether an error is one recovery may give for bad files.
fn typed(e: &Error) -> bool {
    matches!(
        e,
        Error::Corrupt { .. }
            | Error::Exhausted { .. }
            | Error::Io { .. }
            | Error::NoSpace { .. }
            | Error::MissingKey { .. }
    )
}

/// Whether a compaction may fail with `e` on files recovery accepted: only
/// on a sealed body the engine's keys cannot open (with a key configured,
/// compaction reseals every complete record it keeps).
fn unopenable(e: &Error) -> bool {
    cfg!(feature = "encryption")
        && matches!(
            e,
            Error::MissingKey { .. }
                | Error::Corrupt {
                    kind: idemkv::CorruptKind::Authentication { .. },
                    ..
                }
        )
}

fuzz_target!(|data: &[u8]| {
    let disk = SimDisk::new();
    for (name, bytes) in files(data) {
        disk.write_file(&name, &bytes);
    }
    let clock = Arc::new(ManualClock::new(NOW_MS));
    let storage: Arc<dyn Storage> = Arc::new(disk.clone());
    let engine = match Engine::open_with_storage(storage, options(&clock)) {
        Ok(engine) => engine,
        Err(e) => {
            assert!(typed(&e), "open answered an unexpected error: {e:?}");
            return;
        }
    };

    // Keys the fuzzer may have written records for, and fresh ones.
    let mut keys: Vec<(Vec<u8>, Vec<u8>)> = vec![
        (b"u".to_vec(), b"k".to_vec()),
        (b"".to_vec(), b"order-7".to_vec()),
    ];
    if let Some(&b) = data.get(1) {
        keys.push((vec![b'u'], vec![b'a' + b % 26]));
    }
    for (i, (user, key)) in keys.iter().enumerate() {
        let fp = Fingerprint::of(&[i as u8]);
        match engine.begin(user, key, fp) {
            Ok(Begin::Started(lease)) => {
                let body = vec![i as u8; 100 + 1500 * i];
                let done = engine.complete(
                    &lease,
                    Outcome {
                        status: 200,
                        body: body.into(),
                    },
                );
                if let Err(e) = done {
                    assert!(typed(&e), "complete answered {e:?}");
                }
            }
            Ok(_) => {}
            Err(e) => assert!(typed(&e), "begin answered {e:?}"),
        }
        if let Err(e) = engine.get(user, key) {
            assert!(typed(&e), "get answered {e:?}");
        }
        if let Err(e) = engine.outcome(user, key) {
            assert!(typed(&e), "outcome answered {e:?}");
        }
    }
    // Recovery accepted every segment (cutting a torn tail off the last),
    // and the disk injects no faults: compaction must succeed (unless it
    // must reseal a body its keys cannot open).
    if let Err(e) = engine.compact() {
        assert!(
            unopenable(&e),
            "compaction of files recovery accepted failed: {e:?}"
        );
    }
    drop(engine);

    // What the engine accepted and wrote must reopen, after a clean restart
    // and after a power loss. (Whether it shows the same state is checked
    // on logs the engine wrote, by `ops_crash`: crafted files, such as a
    // key whose tokens go down, replay by rules made for the engine's own.)
    for image in [disk.clone(), disk.crash(Tear::Clean)] {
        let storage: Arc<dyn Storage> = Arc::new(image);
        let engine = Engine::open_with_storage(storage, options(&clock))
            .unwrap_or_else(|e| panic!("reopen of what the engine wrote failed: {e:?}"));
        for (user, key) in &keys {
            if let Err(e) = engine
                .get(user, key)
                .and_then(|_| engine.outcome(user, key))
            {
                assert!(typed(&e), "get or outcome answered {e:?} after reopen");
            }
        }
    }
});
