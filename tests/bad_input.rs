//! Bad input gets a typed error, never a panic, and changes nothing
//! (DESIGN.md invariant 5): malformed and oversize keys and user ids,
//! oversize responses, a closed engine, a locked directory, invalid options.

mod common;

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::{Harness, closed, fp, invalid_key, outcome, replayed, started};
use idemkv::{
    Durability, Engine, Error, IoOp, KeyPart, KeyProblem, ManualClock, Options, RecordState,
};

const U: &str = "user-1";
const K: &str = "order-7";

/// Checks that `begin`, `get`, `outcome` and `wait` all reject `(user, key)`
/// with `part` and `problem`, and that nothing was counted or written.
fn rejected_everywhere(h: &Harness, user: &[u8], key: &[u8], part: KeyPart, problem: KeyProblem) {
    let before = h.stats();
    assert_eq!(invalid_key(h.begin(user, key, fp("a"))), (part, problem));
    assert_eq!(invalid_key(h.get(user, key)), (part, problem));
    assert_eq!(invalid_key(h.outcome(user, key)), (part, problem));
    assert_eq!(
        invalid_key(h.wait(user, key, fp("a"), Duration::from_secs(5))),
        (part, problem)
    );
    assert_eq!(h.stats(), before, "a rejected call changes nothing");
}

// ---- keys and user ids ------------------------------------------------------

#[test]
fn empty_key_is_rejected_as_empty() {
    let h = Harness::new();
    rejected_everywhere(&h, b"u", b"", KeyPart::Key, KeyProblem::Empty);
}

#[test]
fn key_of_256_bytes_is_too_long_with_the_default_max_of_255() {
    let h = Harness::new();
    let key = vec![b'k'; 256];
    rejected_everywhere(
        &h,
        b"u",
        &key,
        KeyPart::Key,
        KeyProblem::TooLong { len: 256, max: 255 },
    );
}

#[test]
fn key_of_exactly_255_bytes_is_accepted() {
    let h = Harness::new();
    let key = "k".repeat(255);
    let lease = h.start(U, &key, fp("a"));
    h.complete(&lease, outcome(200, "long key")).unwrap();
    assert_eq!(
        replayed(h.begin(U, &key, fp("a")).unwrap()).body,
        "long key"
    );
}

#[test]
fn key_longer_than_a_custom_max_key_len_is_too_long() {
    let h = Harness::with(|o| o.max_key_len = 8);
    started(h.begin(U, "12345678", fp("a")).unwrap());
    rejected_everywhere(
        &h,
        U.as_bytes(),
        b"123456789",
        KeyPart::Key,
        KeyProblem::TooLong { len: 9, max: 8 },
    );
}

#[test]
fn key_with_a_control_char_is_a_bad_byte_at_its_index() {
    let h = Harness::new();
    rejected_everywhere(
        &h,
        b"u",
        b"ab\x01cd",
        KeyPart::Key,
        KeyProblem::BadByte {
            index: 2,
            byte: 0x01,
        },
    );
    rejected_everywhere(
        &h,
        b"u",
        b"\x00",
        KeyPart::Key,
        KeyProblem::BadByte { index: 0, byte: 0 },
    );
    rejected_everywhere(
        &h,
        b"u",
        b"abc\x7f",
        KeyPart::Key,
        KeyProblem::BadByte {
            index: 3,
            byte: 0x7f,
        },
    );
    rejected_everywhere(
        &h,
        b"u",
        b"tab\there",
        KeyPart::Key,
        KeyProblem::BadByte {
            index: 3,
            byte: b'\t',
        },
    );
}

#[test]
fn key_with_a_space_is_a_bad_byte_at_its_index() {
    let h = Harness::new();
    rejected_everywhere(
        &h,
        b"u",
        b"order 7",
        KeyPart::Key,
        KeyProblem::BadByte {
            index: 5,
            byte: b' ',
        },
    );
}

#[test]
fn key_with_a_non_ascii_byte_is_a_bad_byte_at_its_index() {
    let h = Harness::new();
    rejected_everywhere(
        &h,
        b"u",
        b"ab\xffc",
        KeyPart::Key,
        KeyProblem::BadByte {
            index: 2,
            byte: 0xff,
        },
    );
    // "é" in UTF-8 is 0xc3 0xa9: the first byte is reported.
    rejected_everywhere(
        &h,
        b"u",
        "caf\u{e9}".as_bytes(),
        KeyPart::Key,
        KeyProblem::BadByte {
            index: 3,
            byte: 0xc3,
        },
    );
}

#[test]
fn every_visible_ascii_byte_is_accepted_in_a_key() {
    let h = Harness::new();
    let key: Vec<u8> = (0x21..=0x7e).collect();
    started(h.begin(U, &key, fp("a")).unwrap());
}

#[test]
fn user_id_longer_than_max_user_len_is_too_long() {
    let h = Harness::new();
    let user = vec![b'u'; 256];
    rejected_everywhere(
        &h,
        &user,
        b"k",
        KeyPart::User,
        KeyProblem::TooLong { len: 256, max: 255 },
    );
    started(h.begin(&user[..255], "k", fp("a")).unwrap());
}

#[test]
fn owner_calls_on_a_valid_lease_never_see_key_errors() {
    // A lease carries a key that passed validation; there is nothing to
    // reject on complete, extend or release.
    let h = Harness::with(|o| o.max_key_len = 4);
    let lease = h.start(U, "abcd", fp("a"));
    let lease = h.extend(&lease, Duration::from_secs(60)).unwrap();
    h.complete(&lease, outcome(200, "ok")).unwrap();
}

// ---- responses --------------------------------------------------------------

#[test]
fn oversize_response_is_rejected_and_the_same_lease_still_completes() {
    let h = Harness::new();
    let max = 1 << 20;
    let lease = h.start(U, K, fp("a"));
    let before = h.stats();
    match h.complete(&lease, outcome(200, vec![0u8; max + 1])) {
        Err(Error::ResponseTooLarge { len, max: limit }) => {
            assert_eq!((len, limit), (max + 1, max));
        }
        other => panic!("expected ResponseTooLarge, got {other:?}"),
    }
    match h.complete_with_ttl(
        &lease,
        outcome(200, vec![0u8; 2 * max]),
        Duration::from_secs(1),
    ) {
        Err(Error::ResponseTooLarge { len, max: limit }) => {
            assert_eq!((len, limit), (2 * max, max));
        }
        other => panic!("expected ResponseTooLarge, got {other:?}"),
    }
    assert_eq!(h.stats(), before, "a rejected response changes nothing");
    let view = h.get(U, K).unwrap().unwrap();
    assert_eq!(view.state, RecordState::InProgress);
    assert_eq!(view.token, lease.token());

    h.complete(&lease, outcome(413, "too big, sorry")).unwrap();
    assert_eq!(
        replayed(h.begin(U, K, fp("a")).unwrap()),
        outcome(413, "too big, sorry")
    );
}

#[test]
fn response_of_exactly_max_response_len_is_accepted_and_replayed_exactly() {
    let h = Harness::new();
    let body: Vec<u8> = (0..1usize << 20).map(|i| (i % 251) as u8).collect();
    let lease = h.start(U, K, fp("a"));
    h.complete(&lease, outcome(200, body.clone())).unwrap();
    let replay = replayed(h.begin(U, K, fp("a")).unwrap());
    assert_eq!(replay.body.len(), body.len());
    assert!(replay.body == body, "the replayed body differs");
}

#[test]
fn custom_max_response_len_of_zero_accepts_only_empty_bodies() {
    let h = Harness::with(|o| o.max_response_len = 0);
    let lease = h.start(U, K, fp("a"));
    assert!(matches!(
        h.complete(&lease, outcome(200, "x")),
        Err(Error::ResponseTooLarge { len: 1, max: 0 })
    ));
    h.complete(&lease, outcome(204, "")).unwrap();
}

#[test]
fn response_larger_than_a_segment_is_stored_and_replayed_across_reopen() {
    let h = Harness::with(|o| o.segment_bytes = 4096);
    let body: Vec<u8> = (0..100_000usize).map(|i| (i % 253) as u8).collect();
    let big = h.start(U, "big", fp("a"));
    let small = h.start(U, "small", fp("a"));
    h.complete(&big, outcome(200, body.clone())).unwrap();
    h.complete(&small, outcome(200, "small")).unwrap();
    assert!(replayed(h.begin(U, "big", fp("a")).unwrap()).body == body);
    let h = h.reopen();
    assert!(replayed(h.begin(U, "big", fp("a")).unwrap()).body == body);
    assert_eq!(
        replayed(h.begin(U, "small", fp("a")).unwrap()).body,
        "small"
    );
}

#[test]
fn longest_user_id_and_key_the_format_allows_are_accepted() {
    let h = Harness::with(|o| {
        o.max_key_len = 65_535;
        o.max_user_len = 65_535;
    });
    let user = vec![b'u'; 65_535];
    let key = vec![b'k'; 65_535];
    let lease = started(h.begin(&user, &key, fp("a")).unwrap());
    h.complete(&lease, outcome(200, "huge key")).unwrap();
    let h = h.reopen();
    assert_eq!(
        replayed(h.begin(&user, &key, fp("a")).unwrap()).body,
        "huge key"
    );
    assert_eq!(
        invalid_key(h.begin(&user, vec![b'k'; 65_536], fp("a"))),
        (
            KeyPart::Key,
            KeyProblem::TooLong {
                len: 65_536,
                max: 65_535
            }
        )
    );
}

// ---- a closed engine --------------------------------------------------------

#[test]
fn every_call_after_close_fails_with_closed() {
    let h = Harness::new();
    let lease = h.start(U, K, fp("a"));
    let done = h.start(U, "done", fp("a"));
    h.complete(&done, outcome(200, "x")).unwrap();
    h.close().unwrap();

    closed(h.begin(U, "new", fp("a")));
    closed(h.begin(U, "done", fp("a")));
    closed(h.complete(&lease, outcome(200, "x")));
    closed(h.complete_with_ttl(&lease, outcome(200, "x"), Duration::from_secs(1)));
    closed(h.release(&lease));
    closed(h.extend(&lease, Duration::from_secs(1)));
    closed(h.get(U, K));
    closed(h.outcome(U, "done"));
    closed(h.wait(U, "done", fp("a"), Duration::from_secs(1)));
    // Closing twice is fine; stats still answer.
    h.close().unwrap();
    assert_eq!(h.stats().completions, 1);
}

#[test]
fn wait_fails_with_closed_when_the_engine_closes_while_waiting() {
    let h = Harness::new();
    let _lease = h.start(U, K, fp("a"));
    thread::scope(|s| {
        let waiter = s.spawn(|| h.wait(U, K, fp("a"), Duration::from_secs(30)));
        thread::sleep(Duration::from_millis(50));
        h.close().unwrap();
        closed(waiter.join().unwrap());
    });
}

// ---- the directory lock -------------------------------------------------------

#[test]
fn second_open_of_a_locked_dir_is_locked_and_the_first_engine_keeps_working() {
    let h = Harness::new();
    match Engine::open(h.dir.path(), h.options.clone()) {
        Err(Error::Locked { dir }) => assert_eq!(dir, h.dir.path()),
        other => panic!("expected Locked, got {other:?}"),
    }
    let lease = h.start(U, K, fp("a"));
    h.complete(&lease, outcome(200, "still mine")).unwrap();
}

#[test]
fn dir_opens_at_once_after_the_first_engine_is_dropped() {
    let h = Harness::new();
    let lease = h.start(U, K, fp("a"));
    h.complete(&lease, outcome(200, "kept")).unwrap();
    let Harness {
        engine,
        options,
        dir,
        ..
    } = h;
    drop(engine);
    let again = Engine::open(dir.path(), options).unwrap();
    assert_eq!(replayed(again.begin(U, K, fp("a")).unwrap()).body, "kept");
}

#[test]
fn dir_opens_at_once_after_the_first_engine_is_closed() {
    let h = Harness::new();
    let lease = h.start(U, K, fp("a"));
    h.complete(&lease, outcome(200, "kept")).unwrap();
    h.close().unwrap();
    // `h.engine` is still alive, but closed: the lock is free.
    let again = Engine::open(h.dir.path(), h.options.clone()).unwrap();
    assert_eq!(replayed(again.begin(U, K, fp("a")).unwrap()).body, "kept");
    closed(h.begin(U, K, fp("a")));
    // The closed engine's drop must not disturb the new owner.
    drop(h.engine);
    assert_eq!(replayed(again.begin(U, K, fp("a")).unwrap()).body, "kept");
    let l2 = started(again.begin(U, "after", fp("a")).unwrap());
    again.complete(&l2, outcome(200, "x")).unwrap();
}

#[test]
fn failed_open_on_a_locked_dir_does_not_release_the_lock_of_the_first() {
    let h = Harness::new();
    assert!(matches!(
        Engine::open(h.dir.path(), h.options.clone()),
        Err(Error::Locked { .. })
    ));
    assert!(matches!(
        Engine::open(h.dir.path(), h.options.clone()),
        Err(Error::Locked { .. })
    ));
}

#[test]
fn opening_a_path_that_is_a_file_is_a_typed_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"hello").unwrap();
    match Engine::open(&file, base()) {
        Err(Error::Io { op, path, .. }) => {
            assert_eq!(op, IoOp::Create);
            assert_eq!(path, file);
        }
        other => panic!("expected Io, got {other:?}"),
    }
}

// ---- options ----------------------------------------------------------------

fn invalid_field(options: Options) -> &'static str {
    let dir = tempfile::tempdir().unwrap();
    let from_validate = match options.validate() {
        Err(Error::InvalidOptions { field, .. }) => field,
        other => panic!("expected InvalidOptions from validate, got {other:?}"),
    };
    match Engine::open(dir.path(), options) {
        Err(Error::InvalidOptions { field, .. }) => {
            assert_eq!(field, from_validate);
            field
        }
        other => panic!("expected InvalidOptions from open, got {other:?}"),
    }
}

fn base() -> Options {
    common::options(&Arc::new(ManualClock::new(common::START_MS)))
}

#[test]
fn zero_shards_are_invalid_options() {
    assert_eq!(
        invalid_field(Options {
            shards: 0,
            ..base()
        }),
        "shards"
    );
    assert_eq!(
        invalid_field(Options {
            shards: 65_537,
            ..base()
        }),
        "shards"
    );
}

#[test]
fn tiny_segment_bytes_are_invalid_options() {
    assert_eq!(
        invalid_field(Options {
            segment_bytes: 100,
            ..base()
        }),
        "segment_bytes"
    );
    assert_eq!(
        invalid_field(Options {
            segment_bytes: 4095,
            ..base()
        }),
        "segment_bytes"
    );
}

#[test]
fn out_of_range_limits_and_ttls_are_invalid_options() {
    let cases: Vec<(Options, &str)> = vec![
        (
            Options {
                max_key_len: 0,
                ..base()
            },
            "max_key_len",
        ),
        (
            Options {
                max_key_len: 65_536,
                ..base()
            },
            "max_key_len",
        ),
        (
            Options {
                max_user_len: 65_536,
                ..base()
            },
            "max_user_len",
        ),
        (
            Options {
                max_response_len: (256 << 20) + 1,
                ..base()
            },
            "max_response_len",
        ),
        (
            Options {
                lease_ttl: Duration::ZERO,
                ..base()
            },
            "lease_ttl",
        ),
        (
            Options {
                record_ttl: Duration::ZERO,
                ..base()
            },
            "record_ttl",
        ),
        (
            Options {
                durability: Durability::Periodic(Duration::ZERO),
                ..base()
            },
            "durability",
        ),
    ];
    for (options, field) in cases {
        assert_eq!(invalid_field(options), field);
    }
}

#[test]
fn boundary_options_are_valid() {
    let h = Harness::with(|o| {
        o.shards = 1;
        o.segment_bytes = 4096;
        o.max_key_len = 1;
        o.max_user_len = 0;
    });
    let lease = h.start("", "k", fp("a"));
    h.complete(&lease, outcome(200, "one shard")).unwrap();
    assert_eq!(
        replayed(h.begin("", "k", fp("a")).unwrap()).body,
        "one shard"
    );
}

// ---- binary keys ------------------------------------------------------------

#[test]
fn binary_keys_are_accepted_when_ascii_keys_is_false() {
    let h = Harness::with(|o| o.ascii_keys = false);
    let a: &[u8] = b"\x00\x01 \xff\n";
    let b: &[u8] = b"\x00\x01 \xff\r";
    let la = started(h.begin(U, a, fp("a")).unwrap());
    let lb = started(h.begin(U, b, fp("a")).unwrap());
    assert_eq!(la.key(), a);
    h.complete(&la, outcome(200, "a")).unwrap();
    h.complete(&lb, outcome(200, "b")).unwrap();
    assert_eq!(replayed(h.begin(U, a, fp("a")).unwrap()).body, "a");
    assert_eq!(replayed(h.begin(U, b, fp("a")).unwrap()).body, "b");
    assert_eq!(h.get(U, a).unwrap().unwrap().token, la.token());
    // Length limits and emptiness still apply.
    assert_eq!(
        invalid_key(h.begin(U, b"", fp("a"))),
        (KeyPart::Key, KeyProblem::Empty)
    );
    assert_eq!(
        invalid_key(h.begin(U, vec![0u8; 256], fp("a"))),
        (KeyPart::Key, KeyProblem::TooLong { len: 256, max: 255 })
    );
    // And they survive a restart.
    let h = h.reopen();
    assert_eq!(replayed(h.begin(U, a, fp("a")).unwrap()).body, "a");
    assert_eq!(replayed(h.begin(U, b, fp("a")).unwrap()).body, "b");
}

// ---- arguments that would make a call meaningless (issue 11, item 9) -------

#[test]
fn a_zero_record_ttl_or_extension_is_refused_and_changes_nothing() {
    let h = Harness::new();
    let lease = started(h.begin(U, K, fp("a")).unwrap());
    let before = h.get(U, K).unwrap();
    assert!(matches!(
        h.complete_with_ttl(&lease, outcome(200, "x"), Duration::ZERO),
        Err(Error::InvalidArgument { name: "ttl", .. })
    ));
    assert!(matches!(
        h.extend(&lease, Duration::ZERO),
        Err(Error::InvalidArgument { name: "by", .. })
    ));
    assert_eq!(
        h.get(U, K).unwrap(),
        before,
        "a refused call changed the record"
    );
    h.complete_with_ttl(&lease, outcome(200, "x"), Duration::from_millis(1))
        .unwrap();
}

#[test]
fn a_clock_past_what_the_index_can_hold_is_a_typed_error_not_a_fresh_start() {
    // Regression: at or above 2^43 ms every begin silently answered Started.
    let h = Harness::new();
    let lease = started(h.begin(U, K, fp("a")).unwrap());
    h.clock.set(1 << 43);
    let out_of_range = |r: idemkv::Result<()>| match r {
        Err(Error::ClockOutOfRange { now_ms, max_ms }) => {
            assert_eq!(now_ms, 1 << 43);
            assert!(max_ms < now_ms);
        }
        other => panic!("expected ClockOutOfRange, got {other:?}"),
    };
    out_of_range(h.begin(U, K, fp("a")).map(|_| ()));
    out_of_range(h.begin(U, "other", fp("a")).map(|_| ()));
    out_of_range(h.get(U, K).map(|_| ()));
    out_of_range(h.complete(&lease, outcome(200, "x")));
    out_of_range(h.extend(&lease, Duration::from_secs(1)).map(|_| ()));
    out_of_range(h.release(&lease));
}
