//! The ceiling: 64 shards of `parking_lot::RwLock<HashMap>` holding every
//! record (fingerprint, state, token, deadline, status, body) in memory,
//! with the same begin/complete/replay rules and no disk at all. Its tables
//! hash with xxh3 (as idemkv's index does) rather than std's SipHash, so
//! the ceiling is not lowered by a slow hasher.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::RwLock;
use xxhash_rust::xxh3::{Xxh3DefaultBuilder, xxh3_64};

use crate::workload::{
    Claim, Client, LEASE_MS, Reply, Res, STATUS, System, TTL_MS, next_token, now_ms,
};

const SHARDS: usize = 64;

struct Rec {
    fp: u128,
    completed: bool,
    token: u64,
    deadline_ms: u64,
    status: u16,
    body: Bytes,
}

type Shard = RwLock<HashMap<Box<[u8]>, Rec, Xxh3DefaultBuilder>>;

/// Calls `f` with `user/key` laid out in a stack buffer.
fn with_key<T>(user: &[u8], key: &[u8], f: impl FnOnce(&[u8], usize) -> T) -> T {
    let mut buf = [0u8; 512];
    let len = user.len() + 1 + key.len();
    buf[..user.len()].copy_from_slice(user);
    buf[user.len()] = b'/';
    buf[user.len() + 1..len].copy_from_slice(key);
    let k = &buf[..len];
    f(k, (xxh3_64(k) % SHARDS as u64) as usize)
}

pub struct Sharded {
    shards: Arc<[Shard]>,
}

impl Sharded {
    pub fn new() -> Sharded {
        Sharded {
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
        }
    }
}

impl System for Sharded {
    type Client = ShardedClient;

    fn client(&self) -> Res<ShardedClient> {
        Ok(ShardedClient(Arc::clone(&self.shards)))
    }
}

pub struct ShardedClient(Arc<[Shard]>);

/// `get`, as `Engine::get` answers it: whether the record is there and
/// completed, and its status; the body is not touched.
pub fn get_hit(client: &mut ShardedClient, user: &[u8], key: &[u8], _fp: u128) -> Res<bool> {
    let now = now_ms();
    with_key(user, key, |k, shard| {
        let map = client.0[shard].read();
        Ok(map
            .get(k)
            .is_some_and(|r| r.completed && r.deadline_ms > now && r.status == STATUS))
    })
}

pub struct ShardedLease {
    key: Box<[u8]>,
    shard: usize,
    token: u64,
}

impl Client for ShardedClient {
    type Lease = ShardedLease;

    fn begin(&mut self, user: &[u8], key: &[u8], fp: u128) -> Res<Claim<ShardedLease>> {
        let now = now_ms();
        with_key(user, key, |k, shard| {
            let mut map = self.0[shard].write();
            if let Some(r) = map.get(k).filter(|r| r.deadline_ms > now) {
                return Ok(if r.fp != fp {
                    Claim::Mismatch
                } else if r.completed {
                    Claim::Replay(Reply {
                        status: r.status,
                        body: r.body.clone(),
                    })
                } else {
                    Claim::InFlight
                });
            }
            let token = next_token();
            let rec = Rec {
                fp,
                completed: false,
                token,
                deadline_ms: now + LEASE_MS,
                status: 0,
                body: Bytes::new(),
            };
            let key: Box<[u8]> = k.into();
            map.insert(key.clone(), rec);
            Ok(Claim::Started(ShardedLease { key, shard, token }))
        })
    }

    fn complete(&mut self, lease: ShardedLease, status: u16, body: &Bytes) -> Res<()> {
        let now = now_ms();
        let mut map = self.0[lease.shard].write();
        match map.get_mut(&lease.key) {
            Some(r) if !r.completed && r.token == lease.token && r.deadline_ms > now => {
                r.completed = true;
                r.status = status;
                r.body = Bytes::copy_from_slice(body);
                r.deadline_ms = now + TTL_MS;
                Ok(())
            }
            _ => Err("lease lost".into()),
        }
    }

    fn lookup(&mut self, user: &[u8], key: &[u8], fp: u128) -> Res<Option<Reply>> {
        let now = now_ms();
        with_key(user, key, |k, shard| {
            let map = self.0[shard].read();
            Ok(map
                .get(k)
                .filter(|r| r.completed && r.fp == fp && r.deadline_ms > now)
                .map(|r| Reply {
                    status: r.status,
                    body: r.body.clone(),
                }))
        })
    }
}
