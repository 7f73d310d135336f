//! idemkv itself: `begin`, `complete`, and a retry's `begin` (a replay).

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use idemkv::{Begin, Durability, Engine, Fingerprint, Lease, Options, Outcome};

use crate::workload::{Claim, Client, Reply, Res, STATUS, System};

pub struct Idemkv {
    engine: Arc<Engine>,
}

impl Idemkv {
    /// Opens an engine in `dir`; `durable` picks `Durability::Sync`, else
    /// `Durability::None`. No background thread (no sweeping or compaction
    /// during the run).
    pub fn open(dir: &Path, durable: bool) -> Res<Idemkv> {
        let options = Options {
            durability: if durable {
                Durability::Sync
            } else {
                Durability::None
            },
            background: false,
            ..Options::default()
        };
        Ok(Idemkv {
            engine: Arc::new(Engine::open(dir, options)?),
        })
    }
}

/// `get`: the record's state and status from memory only (no body).
pub fn get_hit(engine: &mut Arc<Engine>, user: &[u8], key: &[u8], _fp: u128) -> Res<bool> {
    Ok(engine
        .get(user, key)?
        .is_some_and(|v| v.status == Some(STATUS)))
}

impl System for Idemkv {
    type Client = Arc<Engine>;

    fn client(&self) -> Res<Arc<Engine>> {
        Ok(Arc::clone(&self.engine))
    }
}

impl Client for Arc<Engine> {
    type Lease = Lease;

    fn begin(&mut self, user: &[u8], key: &[u8], fp: u128) -> Res<Claim<Lease>> {
        Ok(
            match Engine::begin(self, user, key, Fingerprint::from_u128(fp))? {
                Begin::Started(lease) => Claim::Started(lease),
                Begin::Replay(o) => Claim::Replay(Reply {
                    status: o.status,
                    body: o.body,
                }),
                Begin::InFlight { .. } => Claim::InFlight,
                Begin::Mismatch => Claim::Mismatch,
            },
        )
    }

    fn complete(&mut self, lease: Lease, status: u16, body: &Bytes) -> Res<()> {
        let outcome = Outcome {
            status,
            body: body.clone(),
        };
        Ok(Engine::complete(self, &lease, outcome)?)
    }

    /// A retry is a `begin` that finds the completed record and replays it
    /// (the body is read back from the log).
    fn lookup(&mut self, user: &[u8], key: &[u8], fp: u128) -> Res<Option<Reply>> {
        Ok(match Client::begin(self, user, key, fp)? {
            Claim::Replay(r) => Some(r),
            _ => None,
        })
    }
}

/// The durable phase through `AsyncEngine`: `tasks` tasks on a 2-worker
/// tokio runtime each claim fresh keys and complete them for `secs`.
/// Returns pairs per second.
pub fn async_durable(
    dir: &Path,
    work: Arc<crate::workload::Workload>,
    tasks: usize,
    secs: f64,
) -> Res<f64> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let options = Options {
        durability: Durability::Sync,
        background: false,
        ..Options::default()
    };
    let engine = idemkv::AsyncEngine::new(Arc::new(Engine::open(dir, options)?));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()?;
    let stop = Arc::new(AtomicBool::new(false));
    let (elapsed, total) = rt.block_on(async {
        let handles: Vec<_> = (0..tasks)
            .map(|t| {
                let (engine, work, stop) = (engine.clone(), Arc::clone(&work), Arc::clone(&stop));
                tokio::spawn(async move {
                    let mut done = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        // Keys beyond the loaded range, a disjoint block per task.
                        let i = (1 << 40) + ((t as u64) << 32) + done;
                        let key = crate::workload::uuid(i);
                        let fp = Fingerprint::from_u128(crate::workload::fingerprint(i));
                        let Begin::Started(lease) =
                            engine.begin(work.user(i), &key[..], fp).await?
                        else {
                            return Err::<u64, idemkv::Error>(idemkv::Error::Closed);
                        };
                        let outcome = Outcome {
                            status: STATUS,
                            body: crate::workload::body(i),
                        };
                        engine.complete(&lease, outcome).await?;
                        done += 1;
                    }
                    Ok(done)
                })
            })
            .collect();
        let t0 = std::time::Instant::now();
        tokio::time::sleep(std::time::Duration::from_secs_f64(secs)).await;
        stop.store(true, Ordering::Relaxed);
        let mut total = 0u64;
        for h in handles {
            total += h
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        }
        Ok::<_, String>((t0.elapsed(), total))
    })?;
    Ok(total as f64 / elapsed.as_secs_f64())
}
