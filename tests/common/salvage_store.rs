//! A store with known contents for the salvage tests (`tests/salvage.rs`,
//! `tests/salvage_crash.rs`): completed records with bodies, leases in
//! progress (one extended), releases, expired records, several segments
//! (4 KiB each) and compaction outputs, some of whose keys have newer
//! records in segments that replay between the compacted file's order and
//! its file number. Every state each key ever had is kept, and the answer
//! each key gives at the end; records are located in the files by parsing
//! the frames as `docs/FORMAT.md` lays them out.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use idemkv::storage::{SimDisk, Storage, Tear};
use idemkv::{Begin, Durability, Engine, Fingerprint, ManualClock, Options, Outcome, RecordState};

/// The one user of every key.
pub const USER: &str = "shop-1";
/// Bytes of a segment header.
pub const HEADER: usize = 56;

/// What a key answers: completed with a body, in progress under a token,
/// or nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    Done(Outcome),
    Leased(u64),
    Absent,
}

/// The pristine store and what it holds.
pub struct Store {
    /// Closed, reopened once (no file a compaction output replaces is
    /// left), every byte durable.
    pub disk: SimDisk,
    pub clock: Arc<ManualClock>,
    /// What each key answers.
    pub now: BTreeMap<String, State>,
    /// Every state each key had (`Absent` first).
    pub history: BTreeMap<String, Vec<State>>,
    /// The highest fencing token handed out.
    pub max_token: u64,
}

pub fn options(clock: &Arc<ManualClock>) -> Options {
    Options {
        durability: Durability::Sync,
        background: false,
        segment_bytes: 4096,
        lease_ttl: Duration::from_secs(3600),
        record_ttl: Duration::from_secs(24 * 3600),
        clock: clock.clone(),
        ..Options::default()
    }
}

pub fn open(disk: &SimDisk, clock: &Arc<ManualClock>) -> idemkv::Result<Engine> {
    let storage: Arc<dyn Storage> = Arc::new(disk.clone());
    Engine::open_with_storage(storage, options(clock))
}

pub fn fingerprint(key: &str) -> Fingerprint {
    Fingerprint::of(key.as_bytes())
}

fn body(i: usize) -> Outcome {
    Outcome {
        status: 200 + (i % 3) as u16,
        body: format!("receipt {i} {}", "z".repeat(i * 37 % 240)).into(),
    }
}

struct Writer<'a> {
    engine: &'a Engine,
    history: BTreeMap<String, Vec<State>>,
    leases: BTreeMap<String, idemkv::Lease>,
    max_token: u64,
}

impl Writer<'_> {
    fn begin(&mut self, key: &str) {
        let Begin::Started(lease) = self.engine.begin(USER, key, fingerprint(key)).unwrap() else {
            panic!("{key}: not started");
        };
        self.max_token = self.max_token.max(lease.token());
        let states = self
            .history
            .entry(key.into())
            .or_insert(vec![State::Absent]);
        states.push(State::Leased(lease.token()));
        self.leases.insert(key.into(), lease);
    }

    fn complete(&mut self, key: &str, outcome: Outcome, ttl: Option<Duration>) {
        let lease = self.leases.remove(key).unwrap();
        match ttl {
            Some(ttl) => self.engine.complete_with_ttl(&lease, outcome.clone(), ttl),
            None => self.engine.complete(&lease, outcome.clone()),
        }
        .unwrap();
        self.history
            .get_mut(key)
            .unwrap()
            .push(State::Done(outcome));
    }

    fn release(&mut self, key: &str) {
        let lease = self.leases.remove(key).unwrap();
        self.engine.release(&lease).unwrap();
        self.history.get_mut(key).unwrap().push(State::Absent);
    }
}

/// What a key answers in `engine`.
pub fn answer(engine: &Engine, key: &str) -> State {
    match engine.get(USER, key).unwrap() {
        None => State::Absent,
        Some(view) if view.state == RecordState::InProgress => State::Leased(view.token),
        Some(_) => match engine.outcome(USER, key).unwrap() {
            Some(outcome) => State::Done(outcome),
            None => State::Absent,
        },
    }
}

/// Builds the store.
pub fn build() -> Store {
    let disk = SimDisk::new();
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let engine = open(&disk, &clock).unwrap();
    let mut w = Writer {
        engine: &engine,
        history: BTreeMap::new(),
        leases: BTreeMap::new(),
        max_token: 0,
    };
    for i in 0..160 {
        let key = format!("k{i:03}");
        w.begin(&key);
        match i % 8 {
            0..=3 => w.complete(&key, body(i), None),
            4 => w.release(&key),
            5 => w.complete(&key, body(i), Some(Duration::from_secs(1))),
            // 6: in progress, finished after the compaction (7 extended).
            7 => {
                let lease = w.leases.remove(&key).unwrap();
                let lease = engine.extend(&lease, Duration::from_secs(7200)).unwrap();
                w.leases.insert(key, lease);
            }
            _ => {}
        }
    }
    // The 1 s records expire (and go from memory); released ones are
    // dead: the compaction rewrites their segments.
    clock.advance(Duration::from_secs(2));
    for i in (0..160).filter(|i| i % 8 == 5) {
        let key = format!("k{i:03}");
        w.history.get_mut(&key).unwrap().push(State::Absent);
    }
    let report = engine.compact().unwrap();
    assert!(report.segments_compacted >= 2, "{report:?}");
    // Finish half of the leases begun before the compaction (their begin
    // is now in a compaction output), and write more.
    for i in (0..160).filter(|i| i % 8 == 6 && i % 16 == 6) {
        let key = format!("k{i:03}");
        w.complete(&key, body(i + 1), None);
    }
    // A response body that holds a whole valid frame (of a key that never
    // existed): no damage to the record around it may bring it out.
    w.begin("nested");
    let ghost = frame("ghost", b"forged", w.max_token + 1_000_000);
    w.complete(
        "nested",
        Outcome {
            status: 200,
            body: ghost.into(),
        },
        None,
    );
    for i in 160..220 {
        let key = format!("k{i:03}");
        w.begin(&key);
        if i % 5 != 0 {
            w.complete(&key, body(i), None);
        }
    }
    let max_token = w.max_token;
    let history = w.history;
    engine.close().unwrap();
    drop(engine);
    // Reopen once: removes what the compaction replaced.
    let disk = disk.crash(Tear::Clean);
    open(&disk, &clock).unwrap().close().unwrap();
    let disk = disk.crash(Tear::Clean);
    let engine = open(&disk.crash(Tear::Clean), &clock).unwrap();
    let now: BTreeMap<String, State> = history
        .keys()
        .map(|k| (k.clone(), answer(&engine, k)))
        .collect();
    for (key, state) in &now {
        assert!(history[key].contains(state), "{key}: {state:?}");
    }
    drop(engine);
    let store = Store {
        disk,
        clock,
        now,
        history,
        max_token,
    };
    let files = files(&store.disk);
    assert!(
        files.iter().any(|f| f.order < f.number),
        "no compaction output"
    );
    store
}

/// The bytes of a frame holding a completed record of `key` (user
/// [`USER`]) with `body` and `token`, laid out as `docs/FORMAT.md` says.
pub fn frame(key: &str, body: &[u8], token: u64) -> Vec<u8> {
    let mut content = vec![2u8];
    for field in [token, u64::MAX / 2, 1_700_000_000_000, u64::MAX / 2] {
        content.extend_from_slice(&field.to_le_bytes());
    }
    content.extend_from_slice(&7u128.to_le_bytes());
    content.extend_from_slice(&(USER.len() as u16).to_le_bytes());
    content.extend_from_slice(&(key.len() as u16).to_le_bytes());
    content.extend_from_slice(USER.as_bytes());
    content.extend_from_slice(key.as_bytes());
    content.extend_from_slice(&200u16.to_le_bytes());
    content.extend_from_slice(&(body.len() as u32).to_le_bytes());
    content.extend_from_slice(body);
    let mut out = (content.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(&crc32fast::hash(&content).to_le_bytes());
    out.extend_from_slice(&content);
    out
}

/// One segment file as its bytes show it.
#[derive(Clone, Debug)]
pub struct File {
    pub name: String,
    pub number: u64,
    pub order: u64,
    pub bytes: Vec<u8>,
    /// Each frame's byte range and key (`None` for a token reservation).
    pub frames: Vec<(Range<usize>, Option<String>)>,
}

fn u16_at(b: &[u8], at: usize) -> usize {
    usize::from(u16::from_le_bytes([b[at], b[at + 1]]))
}

/// Every segment file of `disk`, by file number, with its frames (assumed
/// valid: parsed by their length fields).
pub fn files(disk: &SimDisk) -> Vec<File> {
    let mut out: Vec<File> = disk
        .names()
        .into_iter()
        .filter_map(|name| {
            let hex = name.strip_suffix(".log")?;
            let number = u64::from_str_radix(hex, 16).ok()?;
            let bytes = disk.read_file(&name)?;
            let order = u64::from_le_bytes(bytes.get(24..32)?.try_into().ok()?);
            let mut frames = Vec::new();
            let mut at = HEADER;
            while at + 8 <= bytes.len() {
                let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
                let c = at + 8;
                let (u, k) = (u16_at(&bytes, c + 49), u16_at(&bytes, c + 51));
                let key = &bytes[c + 53 + u..c + 53 + u + k];
                let key = (!key.is_empty()).then(|| String::from_utf8(key.to_vec()).unwrap());
                frames.push((at..c + len, key));
                at = c + len;
            }
            assert_eq!(at, bytes.len(), "{name}");
            Some(File {
                name,
                number,
                order,
                bytes,
                frames,
            })
        })
        .collect();
    out.sort_by_key(|f| f.number);
    out
}

/// The keys with a record in bytes `damaged` touches (file name, byte
/// range), or in a file whose header it touches (a salvage may then drop
/// any record of the file).
pub fn touched(files: &[File], damaged: &[(String, Range<usize>)]) -> BTreeSet<String> {
    let hits = |f: &File, r: &Range<usize>| {
        damaged
            .iter()
            .any(|(name, d)| *name == f.name && d.start < r.end && r.start < d.end)
    };
    let mut out = BTreeSet::new();
    for f in files {
        let header_hit = hits(f, &(0..HEADER));
        for (range, key) in &f.frames {
            if let Some(key) = key
                && (header_hit || hits(f, range))
            {
                out.insert(key.clone());
            }
        }
    }
    out
}

/// The bytes of every file on `disk`, by name.
pub fn snapshot(disk: &SimDisk) -> BTreeMap<String, Vec<u8>> {
    disk.names()
        .into_iter()
        .map(|n| {
            let bytes = disk.read_file(&n).unwrap();
            (n, bytes)
        })
        .collect()
}

/// The `n`-th file (by number) that holds at least 8 frames and is not the
/// last one.
pub fn big_file(files: &[File], n: usize) -> &File {
    files[..files.len() - 1]
        .iter()
        .filter(|f| f.frames.len() >= 8)
        .nth(n)
        .expect("not enough segment files")
}

/// A small deterministic random source (xorshift64*).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Checks `engine` (opened on the salvaged store) against the store: every
/// key no damage touched answers exactly as before (and a completed one
/// replays its body to its fingerprint), every other key answers a state it
/// once had, no key that never existed appears, and a new lease's token is
/// above every token handed out before.
pub fn check(engine: &Engine, store: &Store, touched: &BTreeSet<String>, label: &str) {
    for (key, before) in &store.now {
        let got = answer(engine, key);
        if touched.contains(key) {
            assert!(
                store.history[key].contains(&got),
                "{label}: {key} answers {got:?}, a state it never had"
            );
            continue;
        }
        assert_eq!(&got, before, "{label}: {key} (untouched) changed");
        if let State::Done(outcome) = before {
            match engine.begin(USER, key, fingerprint(key)).unwrap() {
                Begin::Replay(o) => assert_eq!(&o, outcome, "{label}: {key}"),
                other => panic!("{label}: {key}: expected a replay, got {other:?}"),
            }
        }
    }
    let mut seen = 0;
    engine
        .for_each_record(None, |r| {
            seen += 1;
            let key = std::str::from_utf8(&r.key).unwrap();
            assert_eq!(&r.user[..], USER.as_bytes(), "{label}");
            // The one phantom the rules allow (src/log/resync.rs): the frame
            // inside the body of "nested", once damage destroyed its lengths.
            let inner = key == "ghost" && touched.contains("nested");
            assert!(
                store.history.contains_key(key) || inner,
                "{label}: phantom key {key}"
            );
        })
        .unwrap();
    assert!(seen <= store.now.len(), "{label}");
    let Begin::Started(lease) = engine
        .begin(USER, "a-new-key", fingerprint("a-new-key"))
        .unwrap()
    else {
        panic!("{label}: a new key was not started");
    };
    assert!(
        lease.token() > store.max_token,
        "{label}: token {} handed out again (max before {})",
        lease.token(),
        store.max_token
    );
}
