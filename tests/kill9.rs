//! A real process killed with SIGKILL never loses an acknowledged write
//! (DESIGN.md invariants 1, 2 and 4 on the real file system).
//!
//! The parent test re-runs this test binary as a child, which opens the
//! engine on a real directory with `Durability::Sync` and writes begin +
//! complete for sequential keys from several threads, printing `B key` to
//! stdout before each `begin` and `A key` only after `complete` returned
//! `Ok`. The parent kills the child at a random moment (after a random
//! number of acks or begins, or a few random ms after start or after the
//! engine opened, which can land inside recovery), reopens the directory at
//! once (the `flock` dies with the process) and checks:
//! - every key acknowledged in any round so far replays byte for byte;
//! - every key begun but not acknowledged is absent, in progress, or
//!   completed with exactly its own body;
//! - the key after each thread's last `B` line was never written.
//!
//! Rounds run on the same directory, so later children recover the torn
//! tails of earlier kills. On odd rounds the parent verifies a copy of the
//! directory, leaving the torn tail for the next child's own recovery.
//!
//! `IDEMKV_KILL9_SEED=<n>` replays a run; the seed is printed on failure.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use idemkv::storage::FsStorage;
use idemkv::{Begin, Durability, Engine, Error, Fingerprint, Options, Outcome, RecordState};

/// Set in the child's environment: the data directory to write into.
const CHILD_DIR_ENV: &str = "IDEMKV_KILL9_CHILD_DIR";
/// Set in the child's environment: the round number (part of every key).
const CHILD_ROUND_ENV: &str = "IDEMKV_KILL9_ROUND";
/// The name of the test function that is the child.
const CHILD_TEST: &str = "kill9_child_writes_until_killed";
/// Writer threads in the child.
const THREADS: usize = 4;
/// Kill rounds.
const ROUNDS: u32 = 40;
/// The longest a child may write in one round before it is killed anyway.
const ROUND_CAP: Duration = Duration::from_millis(1500);
/// A child still alive after this long (its parent is gone) stops itself.
const CHILD_LIFETIME: Duration = Duration::from_secs(60);
/// Largest body the child stores.
const MAX_BODY: usize = 2500;

/// The user id of writer thread `thread`.
fn user_of(thread: usize) -> String {
    format!("user-{thread}")
}

/// The key written by `thread` at `seq` in `round`.
fn key_of(round: u32, thread: usize, seq: u64) -> String {
    format!("r{round:02}-t{thread}-{seq:06}")
}

/// The fingerprint of the request for `key`.
fn fingerprint_of(key: &str) -> Fingerprint {
    Fingerprint::of(format!("POST /charge {key}").as_bytes())
}

/// The outcome stored for `key`: a status and a body of 0 to `MAX_BODY`
/// bytes that spells the key over and over, so a foreign or partial body
/// cannot pass for it.
fn outcome_of(key: &str) -> Outcome {
    let digest = Fingerprint::of(key.as_bytes()).as_u128();
    let len = (digest % (MAX_BODY as u128 + 1)) as usize;
    let body: Vec<u8> = key.bytes().chain(*b"|").cycle().take(len).collect();
    Outcome {
        status: 200 + (digest >> 64) as u16 % 300,
        body: Bytes::from(body),
    }
}

/// The options of the child and of the parent's checks.
fn options() -> Options {
    Options {
        durability: Durability::Sync,
        ..Options::default()
    }
}

/// The child: runs only when the parent set `CHILD_DIR_ENV`, and then
/// writes until it is killed. As a normal test it passes at once.
#[test]
fn kill9_child_writes_until_killed() {
    let Some(dir) = std::env::var_os(CHILD_DIR_ENV) else {
        return;
    };
    let round: u32 = std::env::var(CHILD_ROUND_ENV)
        .expect("round in the child's environment")
        .parse()
        .expect("round is a number");
    let engine = Engine::open(PathBuf::from(dir), options()).expect("child: open");
    let started = Instant::now();
    let stdout = std::io::stdout();
    let say = |line: &str| -> bool {
        let mut out = stdout.lock();
        writeln!(out, "{line}").and_then(|()| out.flush()).is_ok()
    };
    // libtest has printed "test <name> ... " without a newline: end that line.
    if !say("\nR") {
        return;
    }
    std::thread::scope(|s| {
        for thread in 0..THREADS {
            let (engine, say) = (&engine, &say);
            s.spawn(move || {
                let user = user_of(thread);
                for seq in 0.. {
                    if started.elapsed() > CHILD_LIFETIME {
                        return;
                    }
                    let key = key_of(round, thread, seq);
                    if !say(&format!("B {thread} {seq} {key}")) {
                        return;
                    }
                    let lease = match engine.begin(&user, &key, fingerprint_of(&key)) {
                        Ok(Begin::Started(lease)) => lease,
                        other => panic!("child: begin {key} answered {other:?}"),
                    };
                    engine
                        .complete(&lease, outcome_of(&key))
                        .unwrap_or_else(|e| panic!("child: complete {key}: {e:?}"));
                    if !say(&format!("A {thread} {seq} {key}")) {
                        return;
                    }
                }
            });
        }
    });
}

/// A child process that is killed if the parent test gives up early.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// splitmix64: the parent's source of kill moments.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut x = self.0;
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }

    /// A number in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// When the parent kills the child.
#[derive(Clone, Copy, Debug)]
enum KillAt {
    /// After this many `A` lines.
    Acks(u64),
    /// After this many `B` lines (most likely between begin and complete).
    Begins(u64),
    /// This long after the child said the engine is open.
    AfterReady(Duration),
    /// This long after spawning (possibly inside the child's recovery).
    AfterSpawn(Duration),
}

/// What the parent read from one child.
#[derive(Debug, Default)]
struct Round {
    /// Per thread, the seqs announced with `B`.
    begun: BTreeMap<usize, Vec<u64>>,
    /// Per thread, the seqs acknowledged with `A`.
    acked: BTreeMap<usize, Vec<u64>>,
    ready: bool,
}

impl Round {
    fn count(map: &BTreeMap<usize, Vec<u64>>) -> u64 {
        map.values().map(|v| v.len() as u64).sum()
    }

    /// Records one line of the child's stdout (libtest's own lines are skipped).
    fn note(&mut self, line: &str) {
        let mut parts = line.split(' ');
        let tag = parts.next();
        if tag == Some("R") && parts.next().is_none() {
            self.ready = true;
            return;
        }
        let (Some(tag @ ("A" | "B")), Some(thread), Some(seq), Some(_key), None) =
            (tag, parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return;
        };
        let thread: usize = thread.parse().expect("thread number");
        let seq: u64 = seq.parse().expect("seq number");
        let map = if tag == "A" {
            &mut self.acked
        } else {
            &mut self.begun
        };
        let seqs = map.entry(thread).or_default();
        assert_eq!(
            seqs.last().map_or(0, |last| last + 1),
            seq,
            "thread {thread} skipped a key: {line}"
        );
        seqs.push(seq);
    }

    fn due(&self, kill: KillAt, spawned: Instant, ready_at: Option<Instant>) -> bool {
        match kill {
            KillAt::Acks(n) => Round::count(&self.acked) >= n,
            KillAt::Begins(n) => Round::count(&self.begun) >= n,
            KillAt::AfterReady(d) => ready_at.is_some_and(|t| t.elapsed() >= d),
            KillAt::AfterSpawn(d) => spawned.elapsed() >= d,
        }
    }
}

/// Spawns the child for `round`, kills it per `kill`, and returns what it
/// printed, including every line still in the pipe at the kill.
fn run_child(dir: &Path, round: u32, kill: KillAt) -> Round {
    let exe = std::env::current_exe().expect("current test binary");
    let spawned = Instant::now();
    let mut child = ChildGuard(
        Command::new(exe)
            .args(["--exact", CHILD_TEST, "--nocapture", "--test-threads=1"])
            .env(CHILD_DIR_ENV, dir)
            .env(CHILD_ROUND_ENV, round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the child"),
    );
    let stdout = child.0.stdout.take().expect("child stdout");
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });

    let mut seen = Round::default();
    let mut ready_at = None;
    let mut exited_early = false;
    loop {
        if seen.due(kill, spawned, ready_at) || spawned.elapsed() > ROUND_CAP {
            break;
        }
        match rx.recv_timeout(Duration::from_millis(1)) {
            Ok(line) => {
                seen.note(&line);
                if seen.ready && ready_at.is_none() {
                    ready_at = Some(Instant::now());
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                exited_early = true;
                break;
            }
        }
    }
    child.0.kill().expect("SIGKILL the child");
    // Lines already in the pipe were printed before the kill: they count.
    for line in rx.iter() {
        seen.note(&line);
    }
    reader.join().expect("reader thread");
    let status = child.0.wait().expect("wait for the child");
    assert!(
        !exited_early && status.signal() == Some(9),
        "round {round}: the child ended by itself ({status:?}) instead of being killed"
    );
    seen
}

/// Copies the segment files of `from` into a new temporary directory.
fn copy_segments(from: &Path) -> tempfile::TempDir {
    let to = tempfile::tempdir().expect("tempdir for the copy");
    for entry in std::fs::read_dir(from).expect("read the data directory") {
        let entry = entry.expect("directory entry");
        let name = entry.file_name();
        if name.to_string_lossy().ends_with(".log") {
            std::fs::copy(entry.path(), to.path().join(&name)).expect("copy a segment");
        }
    }
    to
}

/// Checks every acknowledged key of every round so far, and the keys the
/// last round began without acknowledging.
fn verify(engine: &Engine, acked: &[(usize, String)], round: u32, last: &Round) {
    for (thread, key) in acked {
        let expected = outcome_of(key);
        let user = user_of(*thread);
        match engine.begin(&user, key, fingerprint_of(key)) {
            Ok(Begin::Replay(got)) => assert_eq!(got, expected, "replay of {key}"),
            other => panic!("acknowledged {key} answered {other:?} after the kill"),
        }
        assert_eq!(
            engine.outcome(&user, key).expect("outcome"),
            Some(expected),
            "outcome of {key}"
        );
    }
    for (&thread, begun) in &last.begun {
        let user = user_of(thread);
        let acked_here = last.acked.get(&thread).map_or(0, Vec::len);
        for &seq in begun.iter().skip(acked_here) {
            let key = key_of(round, thread, seq);
            match engine.get(&user, &key).expect("get") {
                None => {}
                Some(view) if view.state == RecordState::InProgress => {}
                Some(_) => assert_eq!(
                    engine.outcome(&user, &key).expect("outcome"),
                    Some(outcome_of(&key)),
                    "unacknowledged {key} completed with another body"
                ),
            }
        }
        // The key after the last announced one was never begun.
        let next = key_of(round, thread, begun.len() as u64);
        assert_eq!(
            engine.get(&user, &next).expect("get"),
            None,
            "{next} exists but was never begun"
        );
    }
}

#[test]
fn sigkill_at_random_moments_never_loses_an_acknowledged_write() {
    if std::env::var_os(CHILD_DIR_ENV).is_some() {
        return;
    }
    let seed = std::env::var("IDEMKV_KILL9_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .expect("clock after 1970")
                .as_nanos() as u64
        });
    eprintln!("kill9 seed: IDEMKV_KILL9_SEED={seed}");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let started = Instant::now();
    let mut acked: Vec<(usize, String)> = Vec::new();
    let (mut unacked_begins, mut mid_write_kills) = (0, 0);
    let mut last = Round::default();

    for round in 0..ROUNDS {
        let kill = match rng.range(0, 3) {
            0 => KillAt::Acks(rng.range(1, 400)),
            1 => KillAt::Begins(rng.range(1, 200)),
            2 => KillAt::AfterReady(Duration::from_millis(rng.range(0, 60))),
            _ => KillAt::AfterSpawn(Duration::from_millis(rng.range(0, 25))),
        };
        let seen = run_child(dir.path(), round, kill);
        for (&thread, seqs) in &seen.acked {
            let begun = seen.begun.get(&thread).map_or(0, Vec::len);
            assert!(seqs.len() <= begun, "acked before begun");
            acked.extend(seqs.iter().map(|&seq| (thread, key_of(round, thread, seq))));
        }
        let pending = Round::count(&seen.begun) - Round::count(&seen.acked);
        unacked_begins += pending;
        mid_write_kills += u64::from(pending > 0);

        if round % 2 == 0 {
            // The lock died with the child: the directory opens at once.
            let engine = match Engine::open(dir.path(), options()) {
                Ok(engine) => engine,
                Err(e) => panic!("round {round} ({kill:?}): reopen after SIGKILL: {e:?}"),
            };
            verify(&engine, &acked, round, &seen);
        } else {
            // Check the lock, then verify a copy so that the next child
            // recovers this kill's torn tail itself.
            match FsStorage::open(dir.path()) {
                Ok(lock) => drop(lock),
                Err(Error::Locked { .. }) => panic!("round {round}: lock held after SIGKILL"),
                Err(e) => panic!("round {round}: lock the directory: {e:?}"),
            }
            let copy = copy_segments(dir.path());
            let engine = Engine::open(copy.path(), options())
                .unwrap_or_else(|e| panic!("round {round} ({kill:?}): open the copy: {e:?}"));
            verify(&engine, &acked, round, &seen);
        }
        last = seen;
    }
    // The last child's kill, recovered in place.
    let engine = Engine::open(dir.path(), options()).expect("final reopen");
    verify(&engine, &acked, ROUNDS - 1, &last);
    eprintln!(
        "kill9: {ROUNDS} rounds, {} acknowledged writes checked, {unacked_begins} \
         unacknowledged begins, {mid_write_kills} kills mid-write, {:?}",
        acked.len(),
        started.elapsed()
    );
    // The run exercised what it claims to.
    assert!(
        acked.len() >= 100,
        "only {} writes acknowledged",
        acked.len()
    );
    assert!(mid_write_kills >= 1, "no kill landed between begin and ack");
}
