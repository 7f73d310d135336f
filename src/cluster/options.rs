//! [`ClusterOptions`]: what a node needs to join a cluster.

use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::options::{Durability, Options};

/// How a [`Node`](super::Node) joins its cluster.
///
/// ```
/// use idemkv::cluster::ClusterOptions;
///
/// let options = ClusterOptions::new("node-a", "/var/lib/idem", ["nats://10.0.0.1:4222"]);
/// assert_eq!(options.partitions, 16);
/// assert_eq!(options.replicas, 3);
/// assert_eq!(options.standbys, 1);
/// ```
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// This node's id: unique in the cluster and stable across restarts
    /// (its data directory holds the copies it owned).
    pub node_id: String,
    /// Where this node keeps its copies: one engine directory per
    /// partition it serves (`p0000`, `p0001`, ...).
    pub data_dir: PathBuf,
    /// NATS server URLs (any of the JetStream cluster's servers).
    pub nats_urls: Vec<String>,
    /// The cluster's name: the prefix of its streams, buckets and
    /// subjects, so that several clusters can share one NATS system.
    /// Letters, digits, `-` and `_`.
    pub name: String,
    /// Number of partitions, fixed for the cluster's life (every node must
    /// be given the same). A user id maps to partition
    /// `xxh3_64(user) % partitions`. Default 16.
    pub partitions: u32,
    /// Replicas of each partition's stream and of the ownership buckets
    /// (JetStream's `num_replicas`: 1, or 3 or 5 for a JetStream cluster).
    /// Default 3.
    pub replicas: usize,
    /// Options of every partition's engine (lease and record TTLs, key
    /// limits, compaction). Its `durability` says whether the local copy
    /// is fdatasynced before a call is acknowledged (`Sync`, the default)
    /// or only replicated (`None` / `Periodic`: the stream alone holds the
    /// record when the call returns; the local file is synced at segment
    /// rolls and close). Either way a call is acknowledged only once the
    /// stream has its record.
    pub engine: Options,
    /// How long a partition's ownership lasts without a heartbeat: a node
    /// that stops (killed, paused, cut off) loses its partitions this long
    /// after its last heartbeat, and stops answering for them a quarter of
    /// it before. Default 3 s.
    pub ownership_ttl: Duration,
    /// How many messages a partition's owner appends to its stream before
    /// it trims the stream: it appends a snapshot of its live records and
    /// purges every message before the snapshot, so the stream (and a new
    /// owner's catch-up) stays proportional to the live records, not the
    /// history. `0`: never trim. Default 10 000.
    pub trim_after: u64,
    /// How long a call waits for the user's partition to have an owner
    /// (forwarded calls, a partition that is moving) before it fails with
    /// [`Error::Unavailable`]. Default 5 s.
    pub forward_timeout: Duration,
    /// How many nodes besides the owner keep a standby copy of each
    /// partition: they follow its stream as it grows, so the one that takes
    /// the partition over when its owner fails copies in only the last few
    /// messages rather than the whole stream. The standbys of a partition
    /// are the nodes ranked next after its preferred owner. Each costs a
    /// copy of the partition on that node (its index in memory, its files
    /// on disk) and a poll of the stream while it is idle. `0`: none (a new
    /// owner copies in from its own copy's mark, or from the start). At
    /// most 4. Default 1.
    pub standbys: usize,
    /// Whether this node serves partitions. `false`: a client-only member,
    /// which forwards every call to the partitions' owners and claims,
    /// follows and stores nothing (it is not listed among the live nodes,
    /// so joining and leaving moves no partition): a stateless front tier,
    /// or a one-off job such as [`Node::import`](super::Node::import).
    /// Default `true`.
    pub serve: bool,
}

impl ClusterOptions {
    /// Options with the defaults, for node `node_id` keeping its data in
    /// `data_dir` and reaching NATS at `nats_urls`.
    pub fn new(
        node_id: impl Into<String>,
        data_dir: impl Into<PathBuf>,
        nats_urls: impl IntoIterator<Item = impl Into<String>>,
    ) -> ClusterOptions {
        ClusterOptions {
            node_id: node_id.into(),
            data_dir: data_dir.into(),
            nats_urls: nats_urls.into_iter().map(Into::into).collect(),
            name: "idemkv".into(),
            partitions: 16,
            replicas: 3,
            engine: Options::default(),
            ownership_ttl: Duration::from_secs(3),
            trim_after: 10_000,
            forward_timeout: Duration::from_secs(5),
            standbys: 1,
            serve: true,
        }
    }

    /// Checks the fields.
    ///
    /// # Errors
    /// [`Error::InvalidOptions`] naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field, problem| Err(Error::InvalidOptions { field, problem });
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 64
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if !name_ok(&self.node_id) {
            return bad("node_id", "1 to 64 letters, digits, '-' or '_'");
        }
        if !name_ok(&self.name) {
            return bad("name", "1 to 64 letters, digits, '-' or '_'");
        }
        if self.nats_urls.is_empty() {
            return bad("nats_urls", "at least one URL");
        }
        if !(1..=4096).contains(&self.partitions) {
            return bad("partitions", "1 to 4096");
        }
        if !(1..=5).contains(&self.replicas) {
            return bad("replicas", "1 to 5");
        }
        if self.ownership_ttl < Duration::from_millis(400) {
            return bad("ownership_ttl", "at least 400 ms");
        }
        if self.standbys > 4 {
            return bad("standbys", "0 to 4");
        }
        if self.forward_timeout.is_zero() {
            return bad("forward_timeout", "more than zero");
        }
        self.engine.validate()
    }

    /// The options a partition's engine opens with: always `Sync` at the
    /// engine (so every call waits for its sync, which is what sends it to
    /// the stream), no background thread of its own beyond the engine's.
    pub(crate) fn partition_engine(&self) -> Options {
        Options {
            durability: Durability::Sync,
            ..self.engine.clone()
        }
    }

    /// Whether the local copy is fdatasynced at each sync.
    pub(crate) fn local_sync(&self) -> bool {
        self.engine.durability == Durability::Sync
    }
}

/// The partition of `user` among `partitions`.
pub(crate) fn partition_of(user: &[u8], partitions: u32) -> u32 {
    (xxhash_rust::xxh3::xxh3_64(user) % u64::from(partitions.max(1))) as u32
}
