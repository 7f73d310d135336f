//! fjall: one keyspace `user/key -> record` in a `SingleWriterTxDatabase`.
//! `begin` first reads the keyspace (a retry is answered there); a free key
//! is claimed by a write transaction that checks again that it is absent (or
//! expired) and inserts an in-progress record. `complete` is a write
//! transaction that checks the lease's token and stores the outcome.
//! Lookups read the keyspace.

use std::path::Path;

use bytes::Bytes;
use fjall::{
    KeyspaceCreateOptions, PersistMode, Readable, SingleWriterTxDatabase, SingleWriterTxKeyspace,
};

use crate::workload::record::{self, COMPLETED, Found, IN_PROGRESS};
use crate::workload::{Claim, Client, LEASE_MS, Reply, Res, System, TTL_MS, next_token, now_ms};

pub struct Fjall {
    db: SingleWriterTxDatabase,
    records: SingleWriterTxKeyspace,
    persist: PersistMode,
}

impl Fjall {
    /// Opens a database in `dir` with default settings. `durable` commits
    /// with `PersistMode::SyncData` (fdatasync of the journal), else with
    /// fjall's default `PersistMode::Buffer` (written to the OS, no sync).
    pub fn open(dir: &Path, durable: bool) -> Res<Fjall> {
        let db = SingleWriterTxDatabase::builder(dir).open()?;
        let records = db.keyspace("idempotency", KeyspaceCreateOptions::default)?;
        let persist = if durable {
            PersistMode::SyncData
        } else {
            PersistMode::Buffer
        };
        Ok(Fjall {
            db,
            records,
            persist,
        })
    }
}

impl System for Fjall {
    type Client = FjallClient;

    fn client(&self) -> Res<FjallClient> {
        Ok(FjallClient {
            db: self.db.clone(),
            records: self.records.clone(),
            persist: self.persist,
        })
    }
}

pub struct FjallClient {
    db: SingleWriterTxDatabase,
    records: SingleWriterTxKeyspace,
    persist: PersistMode,
}

pub struct FjallLease {
    key: Vec<u8>,
    fp: u128,
    token: u64,
}

fn claim_of(found: Found) -> Option<Claim<FjallLease>> {
    match found {
        Found::Replay(r) => Some(Claim::Replay(r)),
        Found::InFlight => Some(Claim::InFlight),
        Found::Mismatch => Some(Claim::Mismatch),
        Found::Free => None,
    }
}

impl Client for FjallClient {
    type Lease = FjallLease;

    fn begin(&mut self, user: &[u8], key: &[u8], fp: u128) -> Res<Claim<FjallLease>> {
        let k = record::flat_key(user, key);
        let now = now_ms();
        if let Some(v) = self.records.get(&k)?
            && let Some(claim) = claim_of(record::judge(&v, fp, now))
        {
            return Ok(claim);
        }
        let mut tx = self.db.write_tx().durability(Some(self.persist));
        if let Some(v) = tx.get(&self.records, &k)?
            && let Some(claim) = claim_of(record::judge(&v, fp, now))
        {
            tx.rollback();
            return Ok(claim);
        }
        let token = next_token();
        let rec = record::encode(IN_PROGRESS, fp, token, now + LEASE_MS, 0, b"");
        tx.insert(&self.records, k.as_slice(), rec);
        tx.commit()?;
        Ok(Claim::Started(FjallLease { key: k, fp, token }))
    }

    fn complete(&mut self, lease: FjallLease, status: u16, body: &Bytes) -> Res<()> {
        let now = now_ms();
        let mut tx = self.db.write_tx().durability(Some(self.persist));
        let owned = tx.get(&self.records, &lease.key)?.is_some_and(|v| {
            record::decode(&v).is_some_and(|r| {
                r.state == IN_PROGRESS && r.token == lease.token && r.deadline_ms > now
            })
        });
        if !owned {
            tx.rollback();
            return Err("lease lost".into());
        }
        let rec = record::encode(COMPLETED, lease.fp, lease.token, now + TTL_MS, status, body);
        tx.insert(&self.records, lease.key, rec);
        tx.commit()?;
        Ok(())
    }

    fn lookup(&mut self, user: &[u8], key: &[u8], fp: u128) -> Res<Option<Reply>> {
        let k = record::flat_key(user, key);
        Ok(match self.records.get(&k)? {
            Some(v) => match record::judge(&v, fp, now_ms()) {
                Found::Replay(r) => Some(r),
                _ => None,
            },
            None => None,
        })
    }
}
