//! [`Node`]: one member of a cluster. It answers every call: from its own
//! copy when it serves the user's partition, else by forwarding the call to
//! the partition's owner over NATS request/reply.
//!
//! # Ownership
//! The owners bucket (a JetStream key-value bucket whose entries expire
//! `ownership_ttl` after their last write) holds, per partition, the id of
//! the node that serves it. A node claims a free partition with `create`
//! (which fails if the entry exists), renews it with `update` expecting its
//! last revision (which fails if anyone else wrote it), and answers for the
//! partition only until three quarters of the TTL after its last renewal
//! started: an owner that stops renewing (killed, paused, cut off) stops
//! answering before anyone else may claim. Appends do not rely on that
//! timing: they are fenced on the stream (`partition.rs`).
//!
//! Which partitions a node claims: the members bucket lists the live nodes;
//! each partition has a preferred node (rendezvous hashing over the live
//! ids), which claims it when it is free; a node that serves a partition
//! another live node prefers hands it off (closes its copy, deletes its
//! entry). A free partition whose preferred node is not live is claimed by
//! any node.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::{Mutex, RwLock};

use super::follow::Standby;
use super::jetstream::Names;
use super::options::{ClusterOptions, partition_of};
use super::partition::{Ctx, Served};
use super::wire::{Call, Reply};
use crate::error::{Error, Result, Unavailable};

/// A member of a cluster: the same calls as [`AsyncEngine`](crate::AsyncEngine),
/// answered for any user from any node. `Clone + Send + Sync`; clones share
/// the node.
///
/// A node runs its NATS connection and background work on a small runtime
/// of its own (two threads), so its calls can be made from any tokio
/// runtime, current-thread or multi-thread.
#[derive(Clone, Debug)]
pub struct Node {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    ctx: Ctx,
    client: async_nats::Client,
    owners: kv::Store,
    members: kv::Store,
    /// The partitions this node serves or is taking over.
    served: RwLock<HashMap<u32, Arc<Served>>>,
    /// The standby copies this node keeps (of partitions it does not serve).
    standbys: Mutex<HashMap<u32, Arc<Standby>>>,
    /// When each free partition was first seen free (by this node).
    free_since: Mutex<HashMap<u32, Instant>>,
    /// The last listing of the members bucket, and when it was made.
    live: Mutex<Option<(Instant, Vec<String>)>>,
    stopped: AtomicBool,
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.lock().take() {
            runtime.shutdown_background();
        }
    }
}

fn nats_error<E: std::fmt::Debug>(e: E) -> Error {
    crate::trace::event!(warn, error = ?e, "NATS refused or failed");
    let _ = e;
    Error::Unavailable {
        partition: None,
        reason: Unavailable::Nats,
    }
}

/// The key of partition `p` in the owners bucket.
fn owner_key(p: u32) -> String {
    format!("p{p}")
}

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

/// Finds or creates a key-value bucket. The bucket's stream is made here
/// with the key-value conventions (the client's own `create_key_value`
/// first asks for account information in a form nats-server 2.9 does not
/// send).
async fn bucket(
    js: &jetstream::Context,
    name: String,
    options: &ClusterOptions,
) -> Result<kv::Store> {
    if let Ok(store) = js.get_key_value(&name).await {
        return Ok(store);
    }
    let config = jetstream::stream::Config {
        name: format!("KV_{name}"),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: 1,
        max_age: options.ownership_ttl,
        duplicate_window: options.ownership_ttl,
        discard: jetstream::stream::DiscardPolicy::New,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        num_replicas: options.replicas,
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    };
    // Another node may create it meanwhile: then it is there to get.
    let _ = js.get_or_create_stream(config).await;
    js.get_key_value(&name).await.map_err(nats_error)
}

impl Node {
    /// Joins the cluster: connects to NATS, creates the cluster's buckets
    /// if they are missing, and starts claiming partitions in the
    /// background (calls made before this node or another serves a
    /// partition wait for it, up to `forward_timeout`).
    ///
    /// # Errors
    /// [`Error::InvalidOptions`]; [`Error::Unavailable`] with
    /// [`Unavailable::Nats`] if NATS cannot be reached or refuses the
    /// buckets; [`Error::Io`] if the data directory cannot be made.
    pub async fn start(options: ClusterOptions) -> Result<Node> {
        options.validate()?;
        std::fs::create_dir_all(&options.data_dir)
            .map_err(|e| Error::io(crate::error::IoOp::Create, options.data_dir.clone(), e))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("idemkv-cluster")
            .enable_all()
            .build()
            .map_err(|e| Error::io(crate::error::IoOp::Create, options.data_dir.clone(), e))?;
        let handle = runtime.handle().clone();
        let options = Arc::new(options);
        let setup = {
            let options = Arc::clone(&options);
            handle.spawn(async move {
                let addrs: Vec<async_nats::ServerAddr> = options
                    .nats_urls
                    .iter()
                    .map(|u| u.parse())
                    .collect::<std::result::Result<_, _>>()
                    .map_err(nats_error)?;
                let client = async_nats::ConnectOptions::new()
                    .retry_on_initial_connect()
                    .connection_timeout(options.forward_timeout)
                    .connect(addrs)
                    .await
                    .map_err(nats_error)?;
                let js = jetstream::new(client.clone());
                let names = Names::new(&options.name);
                // A JetStream cluster that is just starting has no meta
                // leader for a few seconds: try again until it has.
                let ready = Instant::now() + options.forward_timeout * 2;
                loop {
                    let buckets = async {
                        let owners = bucket(&js, names.owners(), &options).await?;
                        let members = bucket(&js, names.members(), &options).await?;
                        Ok::<_, Error>((owners, members))
                    };
                    match buckets.await {
                        Ok((owners, members)) => {
                            break Ok::<_, Error>((client, js, owners, members));
                        }
                        Err(e) if Instant::now() >= ready => break Err(e),
                        Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
                    }
                }
            })
        };
        let (client, js, owners, members) =
            match tokio::time::timeout(options.forward_timeout * 3, setup).await {
                Ok(Ok(Ok(setup))) => setup,
                failed => {
                    // Dropping a runtime may block: not on the caller's.
                    runtime.shutdown_background();
                    return Err(match failed {
                        Ok(Ok(Err(e))) => e,
                        _ => nats_error(()),
                    });
                }
            };
        let inner = Arc::new(Inner {
            ctx: Ctx {
                names: Names::new(&options.name),
                options,
                js,
                runtime: handle.clone(),
            },
            client,
            owners,
            members,
            served: RwLock::default(),
            standbys: Mutex::default(),
            free_since: Mutex::default(),
            live: Mutex::default(),
            stopped: AtomicBool::new(false),
            runtime: Mutex::new(Some(runtime)),
        });
        handle.spawn(background(Arc::downgrade(&inner)));
        Ok(Node { inner })
    }

    /// This node's id.
    pub fn id(&self) -> &str {
        &self.inner.ctx.options.node_id
    }

    /// The partition of `user`.
    pub fn partition_of(&self, user: impl AsRef<[u8]>) -> u32 {
        partition_of(user.as_ref(), self.inner.ctx.options.partitions)
    }

    /// The lease TTL of the partitions' engines.
    pub fn lease_ttl(&self) -> Duration {
        self.inner.ctx.options.engine.lease_ttl
    }

    /// The partitions this node answers for now, in order.
    pub fn serving(&self) -> Vec<u32> {
        let mut served: Vec<u32> = self
            .inner
            .served
            .read()
            .values()
            .filter(|s| s.valid())
            .map(|s| s.partition)
            .collect();
        served.sort_unstable();
        served
    }

    /// The partitions this node keeps a standby copy of (see
    /// [`ClusterOptions::standbys`]), in order.
    pub fn following(&self) -> Vec<u32> {
        let mut following: Vec<u32> = self.inner.standbys.lock().keys().copied().collect();
        following.sort_unstable();
        following
    }

    /// Leaves the cluster: stops claiming, hands every partition it serves
    /// off (closing its copy and freeing its entry, so another node claims
    /// it at once), and leaves the members bucket. Calls made after it fail
    /// with [`Error::Closed`].
    pub async fn shutdown(&self) {
        let inner = Arc::clone(&self.inner);
        if inner.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        let work = {
            let inner = Arc::clone(&inner);
            inner.ctx.runtime.clone().spawn(async move {
                let standbys: Vec<_> = inner.standbys.lock().drain().collect();
                for (_, standby) in standbys {
                    standby.close().await;
                }
                let served: Vec<_> = inner.served.write().drain().collect();
                for (p, s) in served {
                    s.close().await;
                    let rev = s.revision.load(Ordering::SeqCst);
                    let _ = inner
                        .owners
                        .delete_expect_revision(owner_key(p), Some(rev))
                        .await;
                }
                let _ = inner.members.delete(&inner.ctx.options.node_id).await;
            })
        };
        let _ = work.await;
    }

    /// Runs `call` on the owner of its user's partition.
    pub(super) async fn call(&self, call: Call, waits: Duration) -> Result<Reply> {
        let inner = &self.inner;
        if inner.stopped.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        let p = self.partition_of(call.user());
        let deadline = Instant::now() + inner.ctx.options.forward_timeout;
        // How long a forwarded call waits for its answer (beyond what the
        // call itself waits) before it is sent again, if it may be: a live
        // owner answers in milliseconds; a dead one's partition moves
        // within about an ownership TTL.
        let patience = if call.safe_to_resend() {
            inner
                .ctx
                .options
                .forward_timeout
                .min(inner.ctx.options.ownership_ttl)
        } else {
            inner.ctx.options.forward_timeout
        };
        let payload = call.encode();
        loop {
            let local = inner.served.read().get(&p).cloned();
            let mut forward = true;
            if let Some(served) = local.filter(|s| s.valid()) {
                match served.execute(call.clone()).await {
                    Reply::NotOwner => {}
                    reply => return Ok(reply),
                }
                forward = !served.valid();
            }
            if forward {
                let request = async_nats::Request::new()
                    .payload(payload.clone())
                    .timeout(Some(patience + waits));
                match inner
                    .client
                    .send_request(inner.ctx.names.call_subject(p), request)
                    .await
                {
                    Ok(message) => match Reply::decode(&message.payload) {
                        Some(Reply::NotOwner) => {}
                        Some(reply) => return Ok(reply),
                        None => return Err(no_answer(p)),
                    },
                    Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {}
                    // The owner may have died with the request in hand (a
                    // killed process answers nothing, and its subscription
                    // outlives it for a moment): a call that is safe to send
                    // again looks for the new owner.
                    Err(e)
                        if e.kind() == async_nats::RequestErrorKind::TimedOut
                            && call.safe_to_resend() => {}
                    Err(_) => return Err(no_answer(p)),
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::Unavailable {
                    partition: Some(p),
                    reason: Unavailable::NoOwner,
                });
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

fn no_answer(p: u32) -> Error {
    Error::Unavailable {
        partition: Some(p),
        reason: Unavailable::NoAnswer,
    }
}

/// The node's background work: a round every quarter of the ownership TTL.
async fn background(weak: Weak<Inner>) {
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
