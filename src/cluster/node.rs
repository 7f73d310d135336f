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
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use parking_lot::{Mutex, RwLock};

use super::follow::Standby;
use super::jetstream::Names;
use super::options::{ClusterOptions, partition_of};
use super::partition::{Ctx, Served};
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
    pub(super) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(super) struct Inner {
    pub(super) ctx: Ctx,
    pub(super) client: async_nats::Client,
    pub(super) owners: kv::Store,
    pub(super) members: kv::Store,
    /// The partitions this node serves or is taking over.
    pub(super) served: RwLock<HashMap<u32, Arc<Served>>>,
    /// The standby copies this node keeps (of partitions it does not serve).
    pub(super) standbys: Mutex<HashMap<u32, Arc<Standby>>>,
    /// When each free partition was first seen free (by this node).
    pub(super) free_since: Mutex<HashMap<u32, Instant>>,
    /// The last listing of the members bucket, and when it was made.
    pub(super) live: Mutex<Option<(Instant, Vec<String>)>>,
    pub(super) stopped: AtomicBool,
    pub(super) runtime: Mutex<Option<tokio::runtime::Runtime>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.lock().take() {
            runtime.shutdown_background();
        }
    }
}

pub(super) fn nats_error<E: std::fmt::Debug>(e: E) -> Error {
    crate::trace::event!(warn, error = ?e, "NATS refused or failed");
    let _ = e;
    Error::Unavailable {
        partition: None,
        reason: Unavailable::Nats,
    }
}

/// How long a JetStream request (stream info, creation, a key-value
/// read or write, an acknowledgement; forwarded calls set their own) waits for its answer. A stream or bucket
/// whose leader was lost (a JetStream server killed) drops requests
/// unanswered until a successor is elected, seconds later: every caller of
/// these requests tries again (next round, next attempt), so a short wait
/// gets through soon after the election instead of up to the client's
/// default 5 s after it.
fn request_timeout(options: &ClusterOptions) -> Duration {
    (options.ownership_ttl / 2)
        .clamp(Duration::from_millis(250), Duration::from_secs(2))
        .min(options.forward_timeout)
}

/// The key of partition `p` in the owners bucket.
pub(super) fn owner_key(p: u32) -> String {
    format!("p{p}")
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
                    .request_timeout(Some(request_timeout(&options)))
                    .connect(addrs)
                    .await
                    .map_err(nats_error)?;
                let mut js = jetstream::new(client.clone());
                js.set_timeout(request_timeout(&options));
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
        handle.spawn(super::round::background(Arc::downgrade(&inner)));
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
}
