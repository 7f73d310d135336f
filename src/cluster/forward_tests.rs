//! A forwarded call sent again (`forward.rs`): against a stand-in owner on
//! a real NATS server that answers the first `begin` late.

#[path = "../../tests/nats/mod.rs"]
mod nats;

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;

use super::jetstream::Names;
use super::wire::{Call, Reply};
use super::{ClusterOptions, Node};
use crate::outcome::{Begin, Fingerprint, Lease};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_begin_granted_to_the_request_answered_second_is_released() {
    let server = nats::Nats::start(1);
    let dir = tempfile::tempdir().unwrap();
    let mut o = ClusterOptions::new("client", dir.path(), server.urls());
    o.partitions = 1;
    o.replicas = 1;
    o.serve = false; // claims nothing: the stand-in below owns partition 0
    o.ownership_ttl = Duration::from_millis(500);
    o.forward_timeout = Duration::from_secs(5);
    let node = Node::start(o).await.unwrap();

    // The owner: slow with the first begin (it grants it 1.5 s later, three
    // ownership TTLs, so the node sends the begin again meanwhile), quick
    // with the second (the key is taken: InFlight). It returns every call
    // it got, up to a release.
    let client = async_nats::connect(server.urls()[0].as_str())
        .await
        .unwrap();
    let mut calls = client
        .subscribe(Names::new("idemkv").call_subject(0))
        .await
        .unwrap();
    client.flush().await.unwrap();
    let granted = Lease {
        engine: 7,
        user: Bytes::from_static(b"u"),
        key: Bytes::from_static(b"k"),
        fingerprint: Fingerprint::of(b"r"),
        token: 42,
        expires_at_ms: u64::MAX,
    };
    let owner = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some(message) = calls.next().await {
            let call = Call::decode(&message.payload).expect("a call");
            let to = message.reply.clone().expect("a request");
            let reply = match &call {
                Call::Begin { .. } if seen.is_empty() => {
                    let (client, lease, to) = (client.clone(), granted.clone(), to.clone());
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(1500)).await;
                        let answer = Reply::Begin(Begin::Started(lease)).encode();
                        client.publish(to, answer).await.unwrap();
                    });
                    None
                }
                Call::Begin { .. } => Some(Reply::Begin(Begin::InFlight {
                    retry_after: Duration::from_secs(30),
                })),
                _ => Some(Reply::Done),
            };
            if let Some(reply) = reply {
                client.publish(to, reply.encode()).await.unwrap();
            }
            let released = matches!(call, Call::Release { .. });
            seen.push(call);
            if released {
                break;
            }
        }
        seen
    });

    let answer = node.begin("u", "k", Fingerprint::of(b"r")).await.unwrap();
    assert!(
        matches!(answer, Begin::InFlight { .. }),
        "the second request answered first: {answer:?}"
    );
    let seen = tokio::time::timeout(Duration::from_secs(5), owner)
        .await
        .expect("the lease granted to the first request was never released")
        .unwrap();
    let begins = seen
        .iter()
        .filter(|c| matches!(c, Call::Begin { .. }))
        .count();
    assert!(begins >= 2, "sent again: {seen:?}");
    match seen.last() {
        Some(Call::Release { lease }) => assert_eq!(lease.token(), 42),
        other => panic!("the last call was {other:?}"),
    }
    node.shutdown().await;
}
