//! Several instances, one answer: idemkv partitions replicated through
//! NATS JetStream (the cargo feature `cluster`). See docs/CLUSTER.md.
//!
//! Users map to a fixed number of partitions by a stable hash of the user
//! id. Each partition is a local [`Engine`](crate::Engine) (its own data
//! directory) on the node that owns it, whose every record also goes to the
//! partition's changelog, a JetStream stream: the engine's sync sends the
//! round's records, fenced on the stream's last sequence, before it
//! fdatasyncs (`replicate.rs`), so a call is acknowledged only once the
//! stream (a quorum of JetStream servers) and, per `Durability`, the local
//! log hold its record, and a former owner can never append after another
//! node fenced the stream.

mod calls;
mod follow;
mod forward;
#[cfg(test)]
mod forward_tests;
mod import;
mod jetstream;
mod node;
mod options;
mod partition;
mod replicate;
#[cfg(test)]
mod replicate_tests;
mod round;
mod wire;

pub use import::ImportReport;
pub use node::Node;
pub use options::ClusterOptions;
