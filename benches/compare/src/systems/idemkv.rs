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
