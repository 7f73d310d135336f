//! redb: one table `user/key -> record`. `begin` first reads in a read
//! transaction (a retry is answered there); a free key is claimed by a write
//! transaction that checks again that it is absent (or expired) and inserts
//! an in-progress record. `complete` is a write transaction that checks the
//! lease's token and stores the outcome. Lookups are read transactions.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::workload::record::{self, COMPLETED, Found, IN_PROGRESS};
use crate::workload::{Claim, Client, LEASE_MS, Reply, Res, System, TTL_MS, next_token, now_ms};

const TABLE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("idempotency");

pub struct Redb {
    db: Arc<Database>,
    durability: Durability,
}

impl Redb {
    /// Creates `dir/redb.db` with the default cache (1 GiB). `durable` picks
    /// `Durability::Immediate` commits, else `Durability::None`.
    pub fn open(dir: &Path, durable: bool) -> Res<Redb> {
        let db = Database::create(dir.join("redb.db"))?;
        let durability = if durable {
            Durability::Immediate
        } else {
            Durability::None
        };
        let mut tx = db.begin_write()?;
        tx.set_durability(Durability::Immediate)?;
        tx.open_table(TABLE)?;
        tx.commit()?;
        Ok(Redb {
            db: Arc::new(db),
            durability,
        })
    }
}

impl System for Redb {
    type Client = RedbClient;

    fn client(&self) -> Res<RedbClient> {
        Ok(RedbClient {
            db: Arc::clone(&self.db),
            durability: self.durability,
        })
    }
}

pub struct RedbClient {
    db: Arc<Database>,
    durability: Durability,
}

pub struct RedbLease {
    key: Vec<u8>,
    fp: u128,
    token: u64,
}

fn claim_of(found: Found) -> Option<Claim<RedbLease>> {
    match found {
        Found::Replay(r) => Some(Claim::Replay(r)),
        Found::InFlight => Some(Claim::InFlight),
        Found::Mismatch => Some(Claim::Mismatch),
        Found::Free => None,
    }
}

impl Client for RedbClient {
    type Lease = RedbLease;

    fn begin(&mut self, user: &[u8], key: &[u8], fp: u128) -> Res<Claim<RedbLease>> {
        let k = record::flat_key(user, key);
        let now = now_ms();
        {
            let tx = self.db.begin_read()?;
            let table = tx.open_table(TABLE)?;
            if let Some(v) = table.get(k.as_slice())?
                && let Some(claim) = claim_of(record::judge(v.value(), fp, now))
            {
                return Ok(claim);
            }
        }
        let mut tx = self.db.begin_write()?;
        tx.set_durability(self.durability)?;
        let token = next_token();
        let found = {
            let mut table = tx.open_table(TABLE)?;
            let found = table
                .get(k.as_slice())?
                .and_then(|v| claim_of(record::judge(v.value(), fp, now)));
            if found.is_none() {
                let rec = record::encode(IN_PROGRESS, fp, token, now + LEASE_MS, 0, b"");
                table.insert(k.as_slice(), rec.as_slice())?;
            }
            found
        };
        if let Some(claim) = found {
            tx.abort()?;
            return Ok(claim);
        }
        tx.commit()?;
        Ok(Claim::Started(RedbLease { key: k, fp, token }))
    }

    fn complete(&mut self, lease: RedbLease, status: u16, body: &Bytes) -> Res<()> {
        let now = now_ms();
        let mut tx = self.db.begin_write()?;
        tx.set_durability(self.durability)?;
        {
            let mut table = tx.open_table(TABLE)?;
            let owned = table.get(lease.key.as_slice())?.is_some_and(|v| {
                record::decode(v.value()).is_some_and(|r| {
                    r.state == IN_PROGRESS && r.token == lease.token && r.deadline_ms > now
                })
            });
            if !owned {
                return Err("lease lost".into());
            }
            let rec = record::encode(COMPLETED, lease.fp, lease.token, now + TTL_MS, status, body);
            table.insert(lease.key.as_slice(), rec.as_slice())?;
        }
        tx.commit()?;
        Ok(())
    }

    fn lookup(&mut self, user: &[u8], key: &[u8], fp: u128) -> Res<Option<Reply>> {
        let k = record::flat_key(user, key);
        let tx = self.db.begin_read()?;
        let table = tx.open_table(TABLE)?;
        Ok(match table.get(k.as_slice())? {
            Some(v) => match record::judge(v.value(), fp, now_ms()) {
                Found::Replay(r) => Some(r),
                _ => None,
            },
            None => None,
        })
    }
}
