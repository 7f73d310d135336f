//! `idemkv backup DIR DEST`: an offline copy that opens as is, refused for a
//! directory a running engine holds.

use std::process::Command;
use std::sync::Arc;

use idemkv::{Begin, Durability, Engine, Fingerprint, ManualClock, Options, Outcome};

const T0: u64 = 4_102_444_800_000;

fn options() -> Options {
    Options {
        durability: Durability::Sync,
        background: false,
        clock: Arc::new(ManualClock::new(T0)),
        ..Options::default()
    }
}

fn run(args: &[&std::path::Path]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_idemkv"))
        .args(args)
        .output()
        .unwrap()
}

fn dump(dir: &std::path::Path) -> Vec<String> {
    let out = run(&["dump".as_ref(), dir]);
    assert!(out.status.success(), "{out:?}");
    let mut lines: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    lines.sort();
    lines
}

#[test]
fn backup_copies_a_directory_that_dumps_the_same_and_refuses_a_locked_one() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path(), options()).unwrap();
    for i in 0..20 {
        let key = format!("k{i}");
        let Begin::Started(lease) = engine
            .begin("u", &key, Fingerprint::of(key.as_bytes()))
            .unwrap()
        else {
            panic!()
        };
        if i % 5 != 4 {
            let body = format!("body {i}").into();
            engine
                .complete(&lease, Outcome { status: 200, body })
                .unwrap();
        }
    }
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("copy");

    // Held by a running engine: refused, nothing made.
    let locked = run(&["backup".as_ref(), dir.path(), &dest]);
    assert_eq!(locked.status.code(), Some(1), "{locked:?}");
    assert_eq!(
        String::from_utf8_lossy(&locked.stderr),
        format!(
            "error: {} is locked by a running engine\n",
            dir.path().display()
        )
    );
    assert!(!dest.exists());
    engine.close().unwrap();

    let ok = run(&["backup".as_ref(), dir.path(), &dest]);
    assert!(ok.status.success(), "{ok:?}");
    let stdout = String::from_utf8(ok.stdout).unwrap();
    assert!(
        stdout.starts_with(&format!(
            "backed up {} to {}: 1 segment files, ",
            dir.path().display(),
            dest.display()
        )),
        "{stdout}"
    );
    let original = dump(dir.path());
    assert_eq!(original.len(), 20);
    assert_eq!(dump(&dest), original);

    // Again onto the now full copy: refused.
    let again = run(&["backup".as_ref(), dir.path(), &dest]);
    assert_eq!(again.status.code(), Some(1), "{again:?}");
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("dest"),
        "{again:?}"
    );
}
