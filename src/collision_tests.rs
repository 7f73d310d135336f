//! Keys whose 64-bit digests collide must stay apart: the index keeps only
//! digests, so these tests force every key onto one digest and check that
//! `begin` never answers one key with another key's record, live or after
//! recovery.

use std::sync::Arc;
use std::time::Duration;

use crate::index::FORCED_DIGEST;
use crate::{Begin, Durability, Engine, Fingerprint, Lease, ManualClock, Options, Outcome};

fn open(dir: &std::path::Path, clock: &Arc<ManualClock>) -> Engine {
    Engine::open(
        dir,
        Options {
            durability: Durability::None,
            clock: clock.clone(),
            ..Options::default()
        },
    )
    .unwrap()
}

fn started(engine: &Engine, key: &str) -> Lease {
    match engine
        .begin("u", key, Fingerprint::of(key.as_bytes()))
        .unwrap()
    {
        Begin::Started(lease) => lease,
        other => panic!("{key}: expected Started, got {other:?}"),
    }
}

fn replay(engine: &Engine, key: &str) -> Outcome {
    match engine
        .begin("u", key, Fingerprint::of(key.as_bytes()))
        .unwrap()
    {
        Begin::Replay(outcome) => outcome,
        other => panic!("{key}: expected Replay, got {other:?}"),
    }
}

fn done(body: &str) -> Outcome {
    Outcome {
        status: 200,
        body: body.to_owned().into(),
    }
}

#[test]
fn colliding_keys_each_get_their_own_record_live_and_after_reopen() {
    FORCED_DIGEST.with(|d| d.set(Some(7)));
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_000));
    {
        let engine = open(dir.path(), &clock);
        let a = started(&engine, "a");
        // "b" shares the digest of the live "a": it must start, not see InFlight.
        let b = started(&engine, "b");
        let c = started(&engine, "c");
        engine.complete(&a, done("for a")).unwrap();
        engine.complete(&b, done("for b")).unwrap();
        engine.release(&c).unwrap();
        assert_eq!(replay(&engine, "a"), done("for a"));
        assert_eq!(replay(&engine, "b"), done("for b"));
        assert_eq!(engine.get("u", "a").unwrap().unwrap().token, a.token());
        assert_eq!(engine.outcome("u", "b").unwrap(), Some(done("for b")));
        assert_eq!(engine.stats().live_records, 2);
        // The released key starts again; the others are untouched.
        let c2 = started(&engine, "c");
        engine.complete(&c2, done("for c")).unwrap();
    }
    let engine = open(dir.path(), &clock);
    assert_eq!(replay(&engine, "a"), done("for a"));
    assert_eq!(replay(&engine, "b"), done("for b"));
    assert_eq!(replay(&engine, "c"), done("for c"));
    assert_eq!(engine.stats().live_records, 3);
    FORCED_DIGEST.with(|d| d.set(None));
}

#[test]
fn a_colliding_key_takes_over_the_slot_of_an_expired_one() {
    FORCED_DIGEST.with(|d| d.set(Some(9)));
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_000));
    {
        let engine = open(dir.path(), &clock);
        let a = started(&engine, "a");
        engine
            .complete_with_ttl(&a, done("for a"), Duration::from_secs(1))
            .unwrap();
        clock.advance(Duration::from_secs(2));
        let b = started(&engine, "b");
        engine.complete(&b, done("for b")).unwrap();
        assert_eq!(replay(&engine, "b"), done("for b"));
        // "a" expired: it starts again rather than seeing "b".
        let a2 = started(&engine, "a");
        engine.complete(&a2, done("a again")).unwrap();
        assert_eq!(replay(&engine, "b"), done("for b"));
    }
    let engine = open(dir.path(), &clock);
    assert_eq!(replay(&engine, "a"), done("a again"));
    assert_eq!(replay(&engine, "b"), done("for b"));
    FORCED_DIGEST.with(|d| d.set(None));
}
