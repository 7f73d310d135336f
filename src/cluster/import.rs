//! [`Node::import`]: moving a single-node store into a cluster.
//!
//! Every live completed record of the engine is written into the cluster
//! through the ordinary calls (`begin`, then `complete_with_ttl` with the
//! record's remaining lifetime), so each lands in its user's partition,
//! replicated and fenced like any other record, and the import can be run
//! again: a record the cluster already holds with the same outcome is
//! counted, not written twice.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;

use super::node::Node;
use crate::Engine;
use crate::error::{Error, Result};
use crate::outcome::{Begin, Fingerprint, Outcome, RecordState};

/// What [`Node::import`] did, record by record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ImportReport {
    /// Completed records written into the cluster.
    pub imported: u64,
    /// Completed records the cluster already held with the same
    /// fingerprint and outcome (an import run again): left as they are.
    pub already: u64,
    /// Records the cluster holds differently: the key was begun there with
    /// another fingerprint, completed with another outcome, or is in flight
    /// there. Left as the cluster has them (the cluster's answer is the one
    /// its callers have seen).
    pub conflicts: u64,
    /// Records in progress in the engine (a lease, its work maybe still
    /// running against the old store): not imported. Import again once
    /// they have completed (or their leases expired).
    pub in_flight: u64,
    /// Completed records whose lifetime ended before their turn came.
    pub expired: u64,
}

/// One record to import, owned.
struct Item {
    user: Bytes,
    key: Bytes,
    fingerprint: Fingerprint,
    outcome: Outcome,
    expires_at_ms: u64,
}

/// What became of one record.
enum Fate {
    Imported,
    Already,
    Conflict,
    Expired,
}

impl Node {
    /// Copies every live completed record of `engine` (a single-node store,
    /// opened by the caller) into the cluster, with its fingerprint, status,
    /// body and remaining lifetime, `concurrency` records at a time
    /// (at least 1). A retry that reaches the cluster after the import
    /// replays the response the old store gave. Records in progress are not
    /// imported ([`ImportReport::in_flight`]).
    ///
    /// Safe to run again (after an error, or to pick up records completed
    /// since): a record already imported is counted in
    /// [`ImportReport::already`]. Fencing tokens are the cluster's own: a
    /// lease granted by the old store does not complete in the cluster, so
    /// stop writing to the old store (or let its leases expire) first.
    ///
    /// # Errors
    /// The first call that fails ([`Error::Unavailable`] while a partition
    /// has no owner, for instance), or the engine's while it reads its
    /// records back; the records imported before it stay imported.
    pub async fn import(&self, engine: Arc<Engine>, concurrency: usize) -> Result<ImportReport> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Item>(1024);
        let mut report = ImportReport::default();
        let (counted_tx, counted_rx) = std::sync::mpsc::channel::<u64>();
        // The engine's records are read back on a thread of their own (a
        // read per body), handed over through a bounded channel.
        let reader = {
            let engine = Arc::clone(&engine);
            std::thread::Builder::new()
                .name("idemkv-import".into())
                .spawn(move || {
                    let mut in_flight = 0u64;
                    let read = engine.for_each_record(None, |dump| {
                        let (RecordState::Completed, Some(outcome), Some(expires_at_ms)) =
                            (dump.view.state, &dump.outcome, dump.view.expires_at_ms)
                        else {
                            in_flight += 1;
                            return;
                        };
                        // A closed receiver (the import failed) drops the rest.
                        let _ = tx.blocking_send(Item {
                            user: dump.user.clone(),
                            key: dump.key.clone(),
                            fingerprint: dump.fingerprint,
                            outcome: outcome.clone(),
                            expires_at_ms,
                        });
                    });
                    let _ = counted_tx.send(in_flight);
                    read
                })
                .map_err(|e| Error::io(crate::error::IoOp::Create, "idemkv-import thread", e))?
        };
        let items = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let mut fates = items
            .map(|item| {
                let engine = Arc::clone(&engine);
                async move { self.import_one(&engine, item).await }
            })
            .buffer_unordered(concurrency.max(1));
        let mut failed = None;
        while let Some(fate) = fates.next().await {
            match fate {
                Ok(Fate::Imported) => report.imported += 1,
                Ok(Fate::Already) => report.already += 1,
                Ok(Fate::Conflict) => report.conflicts += 1,
                Ok(Fate::Expired) => report.expired += 1,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        drop(fates); // closes the channel: the reader stops sending
        let read = tokio::task::spawn_blocking(move || reader.join())
            .await
            .map_err(|_| Error::Closed)?
            .map_err(|_| Error::Closed)?;
        if let Some(e) = failed {
            return Err(e);
        }
        read?;
        report.in_flight = counted_rx.recv().unwrap_or(0);
        Ok(report)
    }

    async fn import_one(&self, engine: &Engine, item: Item) -> Result<Fate> {
        let left = item.expires_at_ms.saturating_sub(engine.wall_now_ms());
        if left == 0 {
            return Ok(Fate::Expired);
        }
        match self.begin(&item.user, &item.key, item.fingerprint).await? {
            Begin::Started(lease) => {
                let ttl = Duration::from_millis(left);
                match self.complete_with_ttl(&lease, item.outcome, ttl).await {
                    Ok(()) => Ok(Fate::Imported),
                    Err(e) => {
                        let _ = self.release(&lease).await;
                        Err(e)
                    }
                }
            }
            Begin::Replay(stored) if stored == item.outcome => Ok(Fate::Already),
            Begin::Replay(_) | Begin::Mismatch | Begin::InFlight { .. } => Ok(Fate::Conflict),
        }
    }
}
