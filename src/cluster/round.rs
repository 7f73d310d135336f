//! A node's background round: renewing what it serves, membership,
//! hand-offs, claims, standby copies, and answering forwarded calls. See
//! `node.rs` for how ownership works.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures_util::StreamExt;

use super::follow::Standby;
use super::node::{Inner, owner_key};
use super::partition::Served;
use super::wire::{Call, Reply};
use crate::error::{Error, Unavailable};

/// The live nodes in their order of preference for partition `p`
/// (rendezvous hashing): the first is its preferred owner, the next ones
/// keep its standby copies.
fn ranked(live: &[String], p: u32) -> Vec<&str> {
    let mut ranked: Vec<(u64, &str)> = live
        .iter()
        .map(|id| {
            (
                xxhash_rust::xxh3::xxh3_64(format!("{id}/{p}").as_bytes()),
                id.as_str(),
            )
        })
        .collect();
    ranked.sort_unstable_by(|a, b| b.cmp(a));
    ranked.into_iter().map(|(_, id)| id).collect()
}

/// The node's background work: a round every quarter of the ownership TTL.
pub(super) async fn background(weak: Weak<Inner>) {
    loop {
        let tick = {
            let Some(inner) = weak.upgrade() else { return };
            if inner.stopped.load(Ordering::SeqCst) {
                return;
            }
            round(&inner).await;
            inner.ctx.options.ownership_ttl / 4
        };
        tokio::time::sleep(tick).await;
    }
}

/// One round: renew what this node serves (first, all at once: a renewal
/// must not wait behind slower work), then membership, hand-offs and
/// claims. Every NATS call has a deadline well inside the ownership TTL,
/// so a slow or failing JetStream (a server lost, a leader being elected)
/// costs renewals, never a stuck round.
async fn round(inner: &Arc<Inner>) {
    let options = &inner.ctx.options;
    let me = options.node_id.as_str();
    let started = Instant::now();
    let until = started + options.ownership_ttl * 3 / 4;
    let patience = options.ownership_ttl / 2;
    let served: Vec<Arc<Served>> = inner.served.read().values().cloned().collect();
    let renewals = served.iter().filter(|s| !s.is_lost()).map(|s| async move {
        let rev = s.revision.load(Ordering::SeqCst);
        let update = inner
            .owners
            .update(owner_key(s.partition), Bytes::from(me.to_owned()), rev);
        (s, tokio::time::timeout(patience, update).await)
    });
    for (s, renewed) in futures_util::future::join_all(renewals).await {
        match renewed {
            Ok(Ok(rev)) => {
                s.renew(until, rev);
                let (s, ctx) = (Arc::clone(s), inner.ctx.clone());
                tokio::spawn(async move {
                    let _ = s.trim_if_due(&ctx).await;
                });
            }
            // Refused (another node wrote the entry, or it expired) or
            // too slow to count on: give the partition up.
            _ => s.lose(),
        }
    }
    for s in served.iter().filter(|s| s.is_lost()) {
        give_up(inner, s, false);
    }
    if !options.serve {
        return; // a client-only member: nothing to claim or follow
    }
    let put = inner.members.put(me, Bytes::new());
    if !matches!(tokio::time::timeout(patience, put).await, Ok(Ok(_))) {
        return; // NATS is unreachable or slow: claim nothing now
    }
    let Some(mut live) = live_members(inner, patience, options.ownership_ttl).await else {
        return;
    };
    let mut relisted = false;
    for p in 0..options.partitions {
        let served = inner.served.read().get(&p).cloned();
        match served {
            Some(s) if preferred(&live, p) != Some(me) && s.valid() => give_up(inner, &s, true),
            Some(_) => {}
            None => {
                let entry = tokio::time::timeout(patience, inner.owners.entry(owner_key(p))).await;
                let free = match entry {
                    Ok(Ok(None)) => true,
                    Ok(Ok(Some(entry))) => entry.operation != kv::Operation::Put,
                    _ => false,
                };
                if !free {
                    inner.free_since.lock().remove(&p);
                    continue;
                }
                // A partition whose owner stopped is free once its entry
                // expired, and so is that owner's membership by then: list
                // the members again (once a round), so the node ranked
                // next (its standby) claims it now, not a TTL later.
                if !relisted && preferred(&live, p) != Some(me) {
                    relisted = true;
                    if let Some(fresh) =
                        live_members(inner, patience, options.ownership_ttl / 4).await
                    {
                        live = fresh;
                    }
                }
                // The preferred node claims a free partition; if it has not
                // within a TTL (it is stuck, or cannot open its copy), any
                // node does.
                let since = *inner.free_since.lock().entry(p).or_insert(started);
                if preferred(&live, p) == Some(me)
                    || started.duration_since(since) > options.ownership_ttl
                {
                    inner.free_since.lock().remove(&p);
                    claim(inner, p, until).await;
                }
            }
        }
    }
    keep_standbys(inner, &live);
}

/// The live node that prefers partition `p`.
fn preferred(live: &[String], p: u32) -> Option<&str> {
    ranked(live, p).first().copied()
}

/// Starts following the partitions this node is a standby of (ranked just
/// after their preferred owner) and does not serve; stops following the
/// others.
fn keep_standbys(inner: &Arc<Inner>, live: &[String]) {
    let options = &inner.ctx.options;
    let me = options.node_id.as_str();
    for p in 0..options.partitions {
        let serves = inner.served.read().contains_key(&p);
        let wanted = !serves
            && ranked(live, p)
                .iter()
                .skip(1)
                .take(options.standbys)
                .any(|id| *id == me);
        let mut standbys = inner.standbys.lock();
        match (wanted, standbys.contains_key(&p)) {
            (true, false) => {
                let standby = Standby::new(p);
                standbys.insert(p, Arc::clone(&standby));
                tokio::spawn(standby.follow(inner.ctx.clone()));
            }
            (false, true) => {
                if let Some(standby) = standbys.remove(&p) {
                    tokio::spawn(async move { standby.close().await });
                }
            }
            _ => {}
        }
    }
}

/// The live nodes (this one too), from the members bucket; listed only if
/// the last listing is older than `max_age` (a listing creates a
/// consumer), the last listing otherwise.
async fn live_members(
    inner: &Arc<Inner>,
    patience: Duration,
    max_age: Duration,
) -> Option<Vec<String>> {
    let me = inner.ctx.options.node_id.as_str();
    {
        let cached = inner.live.lock();
        if let Some((at, live)) = &*cached
            && at.elapsed() < max_age
        {
            return Some(live.clone());
        }
    }
    let listing = async {
        let keys = inner.members.keys().await.ok()?;
        Some(
            keys.filter_map(|k| async move { k.ok() })
                .collect::<Vec<String>>()
                .await,
        )
    };
    let mut live = match tokio::time::timeout(patience, listing).await {
        Ok(Some(live)) => live,
        _ => return inner.live.lock().as_ref().map(|(_, live)| live.clone()),
    };
    if !live.iter().any(|id| id == me) {
        live.push(me.to_owned());
    }
    live.sort_unstable();
    *inner.live.lock() = Some((Instant::now(), live.clone()));
    Some(live)
}

/// Stops serving `s` now and closes its copy in the background; with
/// `hand_off`, frees its entry too, so that the node preferred for it
/// claims it at once (else the entry expires).
fn give_up(inner: &Arc<Inner>, s: &Arc<Served>, hand_off: bool) {
    s.lose();
    inner.served.write().remove(&s.partition);
    let (s, inner) = (Arc::clone(s), Arc::clone(inner));
    tokio::spawn(async move {
        s.close().await;
        if hand_off {
            let rev = s.revision.load(Ordering::SeqCst);
            let _ = inner
                .owners
                .delete_expect_revision(owner_key(s.partition), Some(rev))
                .await;
        }
    });
}

/// Claims free partition `p` and takes it over in the background.
async fn claim(inner: &Arc<Inner>, p: u32, until: Instant) {
    let me = inner.ctx.options.node_id.clone();
    let create = inner.owners.create(owner_key(p), Bytes::from(me));
    let patience = inner.ctx.options.ownership_ttl / 2;
    let Ok(Ok(rev)) = tokio::time::timeout(patience, create).await else {
        return; // another node was quicker (or NATS is slow: next round)
    };
    let served = Arc::new(Served::claimed(p, rev, until));
    inner.served.write().insert(p, Arc::clone(&served));
    let inner = Arc::clone(inner);
    // This node's standby copy, if it keeps one, is nearly current (taken
    // out of the map now, so no round closes it meanwhile).
    let standby = inner.standbys.lock().remove(&p);
    tokio::spawn(async move {
        let warm = match standby {
            Some(standby) => standby.take().await,
            None => None,
        };
        if served.take_over(&inner.ctx, warm).await.is_err() {
            inner.served.write().remove(&p);
            let rev = served.revision.load(Ordering::SeqCst);
            let _ = inner
                .owners
                .delete_expect_revision(owner_key(p), Some(rev))
                .await;
            return;
        }
        let (client, subject) = (inner.client.clone(), inner.ctx.names.call_subject(p));
        drop(inner);
        answer_calls(client, subject, served).await;
    });
}

/// Answers the calls forwarded to partition `p` while this node serves it.
/// (It holds no reference to the node, so that dropping the node stops it.)
async fn answer_calls(client: async_nats::Client, subject: String, served: Arc<Served>) {
    let Ok(mut calls) = client.queue_subscribe(subject, "owner".into()).await else {
        served.lose();
        return;
    };
    loop {
        let message = tokio::select! {
            message = calls.next() => message,
            () = served.lost_signal.notified() => None,
        };
        let Some(message) = message else { break };
        if served.is_lost() {
            break;
        }
        let (served, client) = (Arc::clone(&served), client.clone());
        tokio::spawn(async move {
            let reply = match Call::decode(&message.payload) {
                Some(call) => served.execute(call).await,
                None => Reply::Failed(Error::Unavailable {
                    partition: Some(served.partition),
                    reason: Unavailable::NoAnswer,
                }),
            };
            if let Some(to) = message.reply {
                let _ = client.publish(to, reply.encode()).await;
            }
        });
    }
    let _ = calls.unsubscribe().await;
}
