//! The workload every system runs, the interface each system implements for
//! it, and the three timed phases.

use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

/// Errors from any system, as text.
pub type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Length of a response body.
pub const BODY_LEN: usize = 160;
/// The status every completed request stores.
pub const STATUS: u16 = 201;
/// How long a lease lasts.
pub const LEASE_MS: u64 = 30_000;
/// How long a completed record is kept.
pub const TTL_MS: u64 = 24 * 60 * 60 * 1000;

/// What `begin` found.
pub enum Claim<L> {
    /// The key was free: the caller owns it until it completes.
    Started(L),
    /// A completed record with the same fingerprint: its outcome.
    Replay(Reply),
    /// Another caller holds a live lease.
    InFlight,
    /// A live record with another fingerprint.
    Mismatch,
}

/// A stored outcome, as a retry receives it.
pub struct Reply {
    pub status: u16,
    pub body: Bytes,
}

/// One caller's handle on a system (a connection for Redis, a shared
/// reference for the in-process stores).
pub trait Client: Send {
    /// What `begin` hands to the caller who owns the key.
    type Lease: Send;
    /// Claims `(user, key)`, or answers from the record already there.
    fn begin(&mut self, user: &[u8], key: &[u8], fp: u128) -> Res<Claim<Self::Lease>>;
    /// Stores the outcome of an owned key.
    fn complete(&mut self, lease: Self::Lease, status: u16, body: &Bytes) -> Res<()>;
    /// A retry's read: the stored outcome if the record is completed with
    /// this fingerprint.
    fn lookup(&mut self, user: &[u8], key: &[u8], fp: u128) -> Res<Option<Reply>>;
}

/// A system under test.
pub trait System: Sync {
    type Client: Client;
    /// A new caller's handle.
    fn client(&self) -> Res<Self::Client>;
    /// Bytes the system reports using, when it is not this process's RSS
    /// (Redis's `used_memory`).
    fn used_memory(&self) -> Res<Option<u64>> {
        Ok(None)
    }
}

/// The records and requests: record `i` belongs to user `i % users`, has a
/// UUID v4-style key, a request fingerprint and a 160-byte response.
pub struct Workload {
    users: Vec<String>,
    keys: Vec<[u8; 36]>,
}

impl Workload {
    /// Generates `records` keys (deterministic: every system gets the same).
    pub fn new(records: usize, users: usize) -> Workload {
        Workload {
            users: (0..users.max(1)).map(|u| format!("user-{u:07}")).collect(),
            keys: (0..records as u64).map(uuid).collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn user(&self, i: u64) -> &[u8] {
        self.users[(i % self.users.len() as u64) as usize].as_bytes()
    }

    pub fn key(&self, i: u64) -> &[u8] {
        &self.keys[i as usize]
    }
}

/// The fingerprint of request `i`'s body.
pub fn fingerprint(i: u64) -> u128 {
    let mut request = *b"POST /payments amount=1000 order=........";
    let tail = request.len() - 8;
    request[tail..].copy_from_slice(&i.to_le_bytes());
    xxhash_rust::xxh3::xxh3_128(&request)
}

/// The response body of request `i`: 160 bytes.
pub fn body(i: u64) -> Bytes {
    let mut b = [b'.'; BODY_LEN];
    let head = format!(r#"{{"charge":"ch_{i:016x}","status":"succeeded"}}"#);
    b[..head.len()].copy_from_slice(head.as_bytes());
    Bytes::copy_from_slice(&b)
}

/// A UUID v4-formatted key derived from `i` (random-looking, deterministic).
pub fn uuid(i: u64) -> [u8; 36] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let hi = splitmix(i.wrapping_mul(2));
    let lo = splitmix(i.wrapping_mul(2) + 1);
    let mut v = (u128::from(hi) << 64) | u128::from(lo);
    v = (v & !(0xf << 76)) | (0x4 << 76); // version 4
    v = (v & !(0x3 << 62)) | (0x2 << 62); // variant 10
    let mut out = [b'-'; 36];
    let mut nibble = 32;
    for (pos, slot) in out.iter_mut().enumerate() {
        if matches!(pos, 8 | 13 | 18 | 23) {
            continue;
        }
        nibble -= 1;
        *slot = HEX[((v >> (nibble * 4)) & 0xf) as usize];
    }
    out
}

/// SplitMix64: a fast, well-mixed generator step.
pub fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Wall-clock milliseconds, for lease and TTL deadlines.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A fresh fencing token for the stores that do not make their own.
pub fn next_token() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Anonymous resident memory of this process (`RssAnon` in
/// `/proc/self/status`): the heap and the like, without file-backed pages.
/// idemkv serves records from read-only maps of its segment files, whose
/// resident pages are the kernel's page cache (shared, clean, reclaimable:
/// the same pages a `pread` reads through, which RSS never counted), so
/// counting them would charge the index with the page cache.
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Runs `work(thread, client, stop)` on `threads` threads, each with its
/// own client, from a common start until `secs` have passed; returns the
/// operations the threads counted per second of wall time.
fn timed<S, F>(system: &S, threads: usize, secs: f64, work: F) -> Res<f64>
where
    S: System,
    F: Fn(usize, &mut S::Client, &AtomicBool) -> Res<u64> + Sync,
{
    let clients = (0..threads)
        .map(|_| system.client())
        .collect::<Res<Vec<_>>>()?;
    let start = Barrier::new(threads + 1);
    let stop = AtomicBool::new(false);
    let (elapsed, counts) = thread::scope(|s| {
        let handles: Vec<_> = clients
            .into_iter()
            .enumerate()
            .map(|(t, mut client)| {
                let (start, stop, work) = (&start, &stop, &work);
                s.spawn(move || {
                    start.wait();
                    work(t, &mut client, stop)
                })
            })
            .collect();
        start.wait();
        let t0 = Instant::now();
        thread::sleep(Duration::from_secs_f64(secs));
        stop.store(true, Ordering::Relaxed);
        let counts: Vec<Res<u64>> = handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("a worker panicked".into())))
            .collect();
        (t0.elapsed(), counts)
    });
    let mut total = 0;
    for c in counts {
        total += c?;
    }
    Ok(total as f64 / elapsed.as_secs_f64())
}

/// Durable phase: `callers` threads each claim fresh keys and complete them
/// (begin + complete) for `secs`. Returns pairs per second.
pub fn durable<S: System>(system: &S, work: &Workload, callers: usize, secs: f64) -> Res<f64> {
    timed(system, callers, secs, |t, client, stop| {
        let mut done = 0u64;
        while !stop.load(Ordering::Relaxed) {
            // Keys beyond the loaded range, a disjoint block per caller.
            let i = (1 << 40) + ((t as u64) << 32) + done;
            let key = uuid(i);
            let fp = fingerprint(i);
            let Claim::Started(lease) = client.begin(work.user(i), &key, fp)? else {
                return Err("a fresh key was not started".into());
            };
            client.complete(lease, STATUS, &body(i))?;
            done += 1;
        }
        Ok(done)
    })
}

/// A latency histogram: 10 ns buckets up to 200 µs, slower calls counted in
/// the last bucket. The counts are zero-initialised on demand (calloc), so
/// an untouched bucket costs no resident memory.
pub struct Hist(Vec<u32>);

impl Hist {
    const BUCKET_NS: u128 = 10;
    const BUCKETS: usize = 20_000;

    pub fn new() -> Hist {
        Hist(vec![0; Self::BUCKETS + 1])
    }

    pub fn record(&mut self, took: Duration) {
        let b = (took.as_nanos() / Self::BUCKET_NS).min(Self::BUCKETS as u128) as usize;
        self.0[b] += 1;
    }

    pub fn merge(&mut self, other: &Hist) {
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            *a += b;
        }
    }

    /// The `q` quantile (0..=1) in microseconds: the upper edge of the
    /// bucket that holds it.
    pub fn quantile_us(&self, q: f64) -> f64 {
        let total: u64 = self.0.iter().map(|&c| u64::from(c)).sum();
        let want = (q * total as f64).ceil() as u64;
        let mut seen = 0;
        for (i, &c) in self.0.iter().enumerate() {
            seen += u64::from(c);
            if seen >= want.max(1) {
                return ((i as u128 + 1) * Self::BUCKET_NS) as f64 / 1000.0;
            }
        }
        f64::NAN
    }
}

/// Load phase: every record of the workload goes through begin → complete
/// → replay (a retry's begin), spread over `threads` threads. Returns
/// records per second and the latencies of the first `begin` of each record
/// (a fresh claim), each call timed on its own.
pub fn load<S: System>(system: &S, work: &Workload, threads: usize) -> Res<(f64, Hist)> {
    let clients = (0..threads)
        .map(|_| system.client())
        .collect::<Res<Vec<_>>>()?;
    let n = work.len() as u64;
    let t0 = Instant::now();
    thread::scope(|s| {
        let handles: Vec<_> = clients
            .into_iter()
            .enumerate()
            .map(|(t, mut client)| {
                s.spawn(move || -> Res<Hist> {
                    let mut hist = Hist::new();
                    let mut i = t as u64;
                    while i < n {
                        let (user, key, fp) = (work.user(i), work.key(i), fingerprint(i));
                        let response = body(i);
                        let began = Instant::now();
                        let claim = client.begin(user, key, fp)?;
                        hist.record(began.elapsed());
                        let Claim::Started(lease) = claim else {
                            return Err("a fresh key was not started".into());
                        };
                        client.complete(lease, STATUS, &response)?;
                        match client.begin(user, key, fp)? {
                            Claim::Replay(r) if r.status == STATUS && r.body == response => {}
                            _ => return Err("a retry did not replay the stored outcome".into()),
                        }
                        i += threads as u64;
                    }
                    Ok(hist)
                })
            })
            .collect();
        let mut all = Hist::new();
        for h in handles {
            all.merge(
                &h.join()
                    .unwrap_or_else(|_| Err("a worker panicked".into()))?,
            );
        }
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(all)
    })
    .map(|hist| (n as f64 / t0.elapsed().as_secs_f64(), hist))
}

/// Lookup phase: `threads` threads read random loaded records for `secs`
/// with `op`, which tells whether it found the record. Returns lookups per
/// second.
pub fn lookups<S, F>(system: &S, work: &Workload, threads: usize, secs: f64, op: F) -> Res<f64>
where
    S: System,
    F: Fn(&mut S::Client, &[u8], &[u8], u128) -> Res<bool> + Sync,
{
    let n = work.len() as u64;
    timed(system, threads, secs, |t, client, stop| {
        let mut done = 0u64;
        let mut rng = splitmix(t as u64 + 0x5eed);
        while !stop.load(Ordering::Relaxed) {
            for _ in 0..64 {
                rng = splitmix(rng);
                let i = rng % n;
                if !op(client, work.user(i), work.key(i), fingerprint(i))? {
                    return Err("a lookup missed a loaded record".into());
                }
            }
            done += 64;
        }
        Ok(done)
    })
}

/// A retry's lookup: the stored outcome, with its body.
pub fn replay_hit<C: Client>(client: &mut C, user: &[u8], key: &[u8], fp: u128) -> Res<bool> {
    Ok(client
        .lookup(user, key, fp)?
        .is_some_and(|r| r.status == STATUS && r.body.len() == BODY_LEN))
}

/// The record layout of the stores that keep opaque values (redb, fjall,
/// Redis): state, fingerprint, token, deadline, status, body.
pub mod record {
    use super::{Bytes, Reply};

    pub const IN_PROGRESS: u8 = 0;
    pub const COMPLETED: u8 = 1;
    const HEAD: usize = 1 + 16 + 8 + 8 + 2;

    /// Encodes a record.
    pub fn encode(
        state: u8,
        fp: u128,
        token: u64,
        deadline_ms: u64,
        status: u16,
        body: &[u8],
    ) -> Vec<u8> {
        let mut v = Vec::with_capacity(HEAD + body.len());
        v.push(state);
        v.extend_from_slice(&fp.to_le_bytes());
        v.extend_from_slice(&token.to_le_bytes());
        v.extend_from_slice(&deadline_ms.to_le_bytes());
        v.extend_from_slice(&status.to_le_bytes());
        v.extend_from_slice(body);
        v
    }

    /// A decoded record, borrowing the body.
    pub struct View<'a> {
        pub state: u8,
        pub fp: u128,
        pub token: u64,
        pub deadline_ms: u64,
        pub status: u16,
        pub body: &'a [u8],
    }

    /// Decodes a record; `None` if it is too short.
    pub fn decode(v: &[u8]) -> Option<View<'_>> {
        if v.len() < HEAD {
            return None;
        }
        let u64_at = |at: usize| u64::from_le_bytes(v[at..at + 8].try_into().unwrap_or([0; 8]));
        Some(View {
            state: v[0],
            fp: u128::from_le_bytes(v[1..17].try_into().unwrap_or([0; 16])),
            token: u64_at(17),
            deadline_ms: u64_at(25),
            status: u16::from_le_bytes([v[33], v[34]]),
            body: &v[HEAD..],
        })
    }

    /// What a `begin` makes of an existing record.
    pub enum Found {
        Replay(Reply),
        InFlight,
        Mismatch,
        /// Expired (or unreadable): the key may be claimed again.
        Free,
    }

    /// Judges an existing record for a request with fingerprint `fp`.
    pub fn judge(v: &[u8], fp: u128, now_ms: u64) -> Found {
        match decode(v) {
            Some(r) if r.deadline_ms > now_ms => {
                if r.fp != fp {
                    Found::Mismatch
                } else if r.state == COMPLETED {
                    Found::Replay(Reply {
                        status: r.status,
                        body: Bytes::copy_from_slice(r.body),
                    })
                } else {
                    Found::InFlight
                }
            }
            _ => Found::Free,
        }
    }

    /// The key under which the flat stores keep `(user, key)`.
    pub fn flat_key(user: &[u8], key: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(user.len() + 1 + key.len());
        k.extend_from_slice(user);
        k.push(b'/');
        k.extend_from_slice(key);
        k
    }
}
