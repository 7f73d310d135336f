//! The partition's changelog on JetStream: one stream per partition (so
//! partitions spread their Raft leaders over the servers), appends fenced
//! with `Nats-Expected-Last-Sequence`, reads by sequence.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::context::{PublishError, PublishErrorKind};
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
    publish(js, subject, frames, expected_last, fence, None)
        .await
        .map_err(io::Error::other)
}

/// One publish of an append, `id` its `Nats-Msg-Id` (JetStream answers a
/// second publish with the same id, within the stream's duplicate window,
/// with the first one's acknowledgement rather than storing it again).
async fn publish(
    js: &jetstream::Context,
    subject: String,
    frames: Bytes,
    expected_last: u64,
    fence: Option<&str>,
    id: Option<&str>,
) -> Result<u64, PublishError> {
    let mut headers = HeaderMap::new();
    headers.insert(
        async_nats::header::NATS_EXPECTED_LAST_SEQUENCE,
        expected_last.to_string().as_str(),
    );
    if let Some(node) = fence {
        headers.insert(FENCE, node);
    }
    if let Some(id) = id {
        headers.insert(async_nats::header::NATS_MESSAGE_ID, id);
    }
    let ack = js
        .publish_with_headers(subject, headers, frames)
        .await?
        .await?;
    Ok(ack.sequence)
}

/// How long one publish of a record round waits for its acknowledgement
/// before it is sent again.
const ATTEMPT: Duration = Duration::from_millis(1000);

/// Appends a record round, sending it again until it is acknowledged,
/// refused, or `deadline` passes: a stream that lost its leader (a
/// JetStream server killed) drops the publish without an answer, and
/// elects a successor within seconds. Every publish carries the same
/// message id (`id`, unique to this append), so one that landed is
/// acknowledged again, at the sequence it got, and never stored twice; the
/// expected last sequence still fences each.
async fn append_round(
    js: &jetstream::Context,
    subject: String,
    frames: Bytes,
    expected_last: u64,
    id: String,
    deadline: tokio::time::Instant,
) -> io::Result<u64> {
    loop {
        let now = tokio::time::Instant::now();
        let attempt = ATTEMPT.min(deadline.saturating_duration_since(now));
        let publish = publish(
            js,
            subject.clone(),
            frames.clone(),
            expected_last,
            None,
            Some(&id),
        );
        match tokio::time::timeout(attempt, publish).await {
            Ok(Ok(seq)) => return Ok(seq),
            // No answer, no responder (a stream between leaders), or a
            // connection being re-made: nothing says the fence failed.
            Ok(Err(e))
                if matches!(
                    e.kind(),
                    PublishErrorKind::TimedOut
                        | PublishErrorKind::StreamNotFound
                        | PublishErrorKind::BrokenPipe
                ) => {}
            Ok(Err(e)) => return Err(io::Error::other(e)),
            Err(_) => {}
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the partition's stream did not acknowledge an append in time",
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The [`Changelog`] of one partition: appends run on the node's runtime;
/// the syncing thread waits for their acknowledgement.
#[derive(Debug)]
pub(crate) struct StreamLog {
    pub runtime: Handle,
    pub js: jetstream::Context,
    pub subject: String,
    /// How long an append may take (its publishes sent again meanwhile)
    /// before the sync fails.
    pub timeout: Duration,
    /// Unique to this log: with an append's expected sequence, its message
    /// id (this log appends once per expected sequence: a failed append
    /// fails the copy).
    pub incarnation: u64,
}

impl Changelog for StreamLog {
    fn append(&self, frames: Bytes, expected_last: u64) -> io::Result<u64> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let js = self.js.clone();
        let subject = self.subject.clone();
        let id = format!("{:016x}-{expected_last}", self.incarnation);
        let deadline = tokio::time::Instant::now() + self.timeout;
        self.runtime.spawn(async move {
            let _ = tx.send(append_round(&js, subject, frames, expected_last, id, deadline).await);
        });
        // The task answers by its deadline; the margin covers a runtime
        // too busy to run it.
        match rx.recv_timeout(self.timeout + ATTEMPT) {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the partition's stream did not acknowledge an append in time",
            )),
        }
    }
}

/// A number no other [`StreamLog`] (of any node, any run) is likely to
/// have: the message ids of its appends.
fn incarnation() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
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
        incarnation: incarnation(),
    })
}

/// The stream's first and last sequence.
pub(crate) async fn bounds(stream: &stream::Stream) -> io::Result<(u64, u64)> {
    let info = stream.get_info().await.map_err(io::Error::other)?;
    Ok((info.state.first_sequence, info.state.last_sequence))
}

/// Reads a partition's stream in order from a sequence on: an ephemeral
/// pull consumer (no acks, one replica, removed by the server once idle),
/// asked for batches, so that copying in costs a round trip per batch of
/// messages rather than one per message.
pub(crate) struct Reader {
    consumer: jetstream::consumer::Consumer<jetstream::consumer::pull::Config>,
    /// The sequence the next message must have (a gap means a trim).
    next: u64,
    /// How long a batch may take beyond its wait before it fails (a
    /// server lost mid-request never answers).
    patience: Duration,
}

/// What [`Reader::batch`] read.
pub(crate) enum Read {
    /// Messages `(sequence, payload)` in order, without gaps (maybe none).
    Messages(Vec<(u64, Bytes)>),
    /// A message the reader expected was purged (the stream was trimmed
    /// past it): the rest of the history is in a snapshot further on.
    Gap,
}

impl Reader {
    /// Bytes asked for at most in one batch.
    const MAX_BYTES: usize = 8 << 20;

    /// A reader of `stream` from sequence `start` on, whose every request
    /// fails after `patience` (plus a batch's wait) without an answer.
    pub async fn open(
        stream: &stream::Stream,
        start: u64,
        patience: Duration,
    ) -> io::Result<Reader> {
        use jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
        let create = stream.create_consumer(pull::Config {
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: start.max(1),
            },
            ack_policy: AckPolicy::None,
            inactive_threshold: Duration::from_secs(30),
            num_replicas: 1,
            memory_storage: true,
            ..Default::default()
        });
        let consumer = tokio::time::timeout(patience, create)
            .await
            .map_err(|_| timed_out())?
            .map_err(io::Error::other)?;
        Ok(Reader {
            consumer,
            next: start.max(1),
            patience,
        })
    }

    /// The sequence the next message read must have.
    pub fn next(&self) -> u64 {
        self.next
    }

    /// Up to `max` messages from [`next`](Self::next) on: what the stream
    /// has now (`wait` zero), or waiting up to `wait` for `max` of them.
    ///
    /// # Errors
    /// The stream's answer, or none within the reader's patience. After an
    /// error the reader must be dropped (open another from the copy's next
    /// sequence).
    pub async fn batch(&mut self, max: usize, wait: Duration) -> io::Result<Read> {
        let limit = self.patience + wait;
        tokio::time::timeout(limit, self.read(max, wait))
            .await
            .map_err(|_| timed_out())?
    }

    async fn read(&mut self, max: usize, wait: Duration) -> io::Result<Read> {
        let max = max.max(1);
        let batch = if wait.is_zero() {
            self.consumer
                .fetch()
                .max_messages(max)
                .max_bytes(Self::MAX_BYTES)
                .messages()
                .await
        } else {
            self.consumer
                .batch()
                .max_messages(max)
                .max_bytes(Self::MAX_BYTES)
                .expires(wait)
                .messages()
                .await
        };
        let mut batch = batch.map_err(io::Error::other)?;
        let mut out = Vec::new();
        // `self.next` moves only once the whole batch is in: a batch that
        // fails part way leaves a reader its caller must not use again (its
        // consumer has delivered messages the caller never saw).
        let mut next = self.next;
        while let Some(message) = futures_util::StreamExt::next(&mut batch).await {
            let message = message.map_err(io::Error::other)?;
            let seq = message.info().map_err(io::Error::other)?.stream_sequence;
            if seq != next {
                return Ok(Read::Gap);
            }
            next = seq + 1;
            out.push((seq, message.payload.clone()));
        }
        self.next = next;
        Ok(Read::Messages(out))
    }
}

fn timed_out() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "the partition's stream did not answer in time",
    )
}
