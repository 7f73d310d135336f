//! The partition's changelog on JetStream: one stream per partition (so
//! partitions spread their Raft leaders over the servers), appends fenced
//! with `Nats-Expected-Last-Sequence`, reads by sequence.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use tokio::runtime::Handle;

use super::replicate::Changelog;

/// The names one cluster uses on the NATS system.
#[derive(Clone, Debug)]
pub(crate) struct Names {
    name: String,
}

impl Names {
    pub fn new(name: &str) -> Names {
        Names { name: name.into() }
    }

    /// The stream of partition `p`.
    pub fn stream(&self, p: u32) -> String {
        format!("{}_P{p:04}", self.name)
    }

    /// The subject partition `p`'s records are appended on.
    pub fn log_subject(&self, p: u32) -> String {
        format!("{}.log.{p}", self.name)
    }

    /// The subject calls for partition `p` are forwarded on (its owner
    /// subscribes).
    pub fn call_subject(&self, p: u32) -> String {
        format!("{}.call.{p}", self.name)
    }

    /// The bucket that says who owns each partition.
    pub fn owners(&self) -> String {
        format!("{}_owners", self.name)
    }

    /// The bucket of live nodes.
    pub fn members(&self) -> String {
        format!("{}_members", self.name)
    }
}

/// The header that marks an owner's fence message (no frames).
pub(crate) const FENCE: &str = "Idemkv-Fence";

/// Creates (or finds) partition `p`'s stream.
pub(crate) async fn stream_of(
    js: &jetstream::Context,
    names: &Names,
    p: u32,
    replicas: usize,
) -> io::Result<stream::Stream> {
    js.get_or_create_stream(stream::Config {
        name: names.stream(p),
        subjects: vec![names.log_subject(p)],
        num_replicas: replicas,
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(io::Error::other)
}

/// Appends `frames` to `subject` if the stream's last sequence is
/// `expected_last`; returns the new message's sequence.
pub(crate) async fn append(
    js: &jetstream::Context,
    subject: String,
    frames: Bytes,
    expected_last: u64,
    fence: Option<&str>,
) -> io::Result<u64> {
    let mut headers = HeaderMap::new();
    headers.insert(
        async_nats::header::NATS_EXPECTED_LAST_SEQUENCE,
        expected_last.to_string().as_str(),
    );
    if let Some(node) = fence {
        headers.insert(FENCE, node);
    }
    let ack = js
        .publish_with_headers(subject, headers, frames)
        .await
        .map_err(io::Error::other)?
        .await
        .map_err(io::Error::other)?;
    Ok(ack.sequence)
}

/// The [`Changelog`] of one partition: appends run on the node's runtime;
/// the syncing thread waits for their acknowledgement.
#[derive(Debug)]
pub(crate) struct StreamLog {
    pub runtime: Handle,
    pub js: jetstream::Context,
    pub subject: String,
    /// How long an append may take before the sync fails.
    pub timeout: Duration,
}

impl Changelog for StreamLog {
    fn append(&self, frames: Bytes, expected_last: u64) -> io::Result<u64> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let js = self.js.clone();
        let subject = self.subject.clone();
        self.runtime.spawn(async move {
            let _ = tx.send(append(&js, subject, frames, expected_last, None).await);
        });
        match rx.recv_timeout(self.timeout) {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the partition's stream did not acknowledge an append in time",
            )),
        }
    }
}

/// The changelog a copy of partition `p` sends to.
pub(crate) fn changelog(
    runtime: &Handle,
    js: &jetstream::Context,
    names: &Names,
    p: u32,
    timeout: Duration,
) -> Arc<dyn Changelog> {
    Arc::new(StreamLog {
        runtime: runtime.clone(),
        js: js.clone(),
        subject: names.log_subject(p),
        timeout,
    })
}

/// The stream's first and last sequence.
pub(crate) async fn bounds(stream: &stream::Stream) -> io::Result<(u64, u64)> {
    let info = stream.get_info().await.map_err(io::Error::other)?;
    Ok((info.state.first_sequence, info.state.last_sequence))
}

/// Message `seq` of the stream: its frames, or `None` if it was deleted
/// (or is a fence).
pub(crate) async fn frames_at(stream: &stream::Stream, seq: u64) -> io::Result<Option<Bytes>> {
    match stream.get_raw_message(seq).await {
        Ok(message) => Ok(Some(message.payload)),
        Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(io::Error::other(e)),
    }
}
