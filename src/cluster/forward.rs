//! [`Node::call`]: a call answered by the owner of its user's partition,
//! this node's own copy or another node's through NATS request/reply.
//!
//! # Sending again
//! A forwarded read or begin that has no answer after an ownership TTL is
//! sent again (a killed owner answers nothing, and its subscription
//! outlives it for a moment, so no "no responders" comes): by then the
//! partition has moved, and the new owner answers. The first request is
//! not given up: the owner may only have been slow (a round waiting for a
//! JetStream election), and the first answer to come, from either, is the
//! call's. A `begin` granted to a request whose answer came second is
//! released (no caller holds that lease), so the key is free again rather
//! than held until the lease expires.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;

use super::node::Node;
use super::wire::{Call, Reply};
use crate::error::{Error, Result, Unavailable};
use crate::outcome::Begin;

type Answer = std::result::Result<async_nats::Message, async_nats::RequestError>;

/// Forwarded requests still out, and what to do with their answers once
/// nobody waits for them.
struct Outstanding {
    requests: FuturesUnordered<Pin<Box<dyn Future<Output = Answer> + Send>>>,
    /// Releases a `begin` granted to one of them.
    node: Node,
    claims: bool,
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        if !self.claims || self.requests.is_empty() {
            return;
        }
        let mut requests = std::mem::take(&mut self.requests);
        let node = self.node.clone();
        self.node.inner.ctx.runtime.spawn(async move {
            while let Some(answer) = requests.next().await {
                let granted = answer.ok().and_then(|m| Reply::decode(&m.payload));
                if let Some(Reply::Begin(Begin::Started(lease))) = granted {
                    // Best effort: if it fails the lease expires.
                    let _ = node.release(&lease).await;
                }
            }
        });
    }
}

impl Node {
    /// Runs `call` on the owner of its user's partition (`waits`: how long
    /// the call itself may wait there, beyond its round trip).
    pub(super) async fn call(&self, call: Call, waits: Duration) -> Result<Reply> {
        let inner = &self.inner;
        if inner.stopped.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        let options = &inner.ctx.options;
        let p = self.partition_of(call.user());
        let deadline = Instant::now() + options.forward_timeout;
        let resend = call.safe_to_resend();
        // How long a forwarded call waits for its answer before it is sent
        // again, if it may be: a live owner answers in milliseconds; a dead
        // one's partition moves within about an ownership TTL.
        let patience = if resend {
            options.forward_timeout.min(options.ownership_ttl)
        } else {
            options.forward_timeout
        };
        let mut out = Outstanding {
            requests: FuturesUnordered::new(),
            node: self.clone(),
            claims: matches!(call, Call::Begin { .. } | Call::BeginWait { .. }),
        };
        let payload = call.encode();
        let subject = inner.ctx.names.call_subject(p);
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
                    .timeout(Some(options.forward_timeout + waits));
                let (client, subject) = (inner.client.clone(), subject.clone());
                out.requests.push(Box::pin(async move {
                    client.send_request(subject, request).await
                }));
                let again = tokio::time::sleep(patience + waits);
                tokio::pin!(again);
                // Wait for an answer from any request out, until it is time
                // to send again (a call that may not be sent again waits
                // for its one request's answer or timeout).
                loop {
                    tokio::select! {
                        answer = out.requests.next() => match answer {
                            Some(Ok(message)) => match Reply::decode(&message.payload) {
                                Some(Reply::NotOwner) => break,
                                Some(reply) => return Ok(reply),
                                None => return Err(no_answer(p)),
                            },
                            Some(Err(e)) => {
                                let kind = e.kind();
                                let look_again = kind == async_nats::RequestErrorKind::NoResponders
                                    || (kind == async_nats::RequestErrorKind::TimedOut && resend);
                                if !look_again {
                                    return Err(no_answer(p));
                                }
                                if out.requests.is_empty() {
                                    break;
                                }
                            }
                            None => break,
                        },
                        () = &mut again, if resend => break,
                    }
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
