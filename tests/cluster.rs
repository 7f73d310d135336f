//! The cluster against real NATS servers started by the test: calls from
//! any node, leases across nodes, a node that dies and comes back.

mod nats;

use std::path::Path;
use std::time::{Duration, Instant};

use idemkv::cluster::{ClusterOptions, Node};
use idemkv::{Begin, Fingerprint, Outcome};

const PARTITIONS: u32 = 4;

fn options(id: &str, dir: &Path, urls: Vec<String>, replicas: usize) -> ClusterOptions {
    let mut o = ClusterOptions::new(id, dir, urls);
    o.partitions = PARTITIONS;
    o.replicas = replicas;
    o.ownership_ttl = Duration::from_secs(1);
    o.forward_timeout = Duration::from_secs(15);
    o
}

/// Waits until the nodes between them serve every partition, each once.
async fn until_served(nodes: &[&Node]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut all: Vec<u32> = nodes.iter().flat_map(|n| n.serving()).collect();
        all.sort_unstable();
        if all == (0..PARTITIONS).collect::<Vec<_>>() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "partitions never all served: {all:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `a` and `b` each serve a share (once each sees the other in
/// the members bucket) and between them every partition.
async fn until_shared(a: &Node, b: &Node) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while a.serving().is_empty() || b.serving().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the partitions were never shared"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    until_served(&[a, b]).await;
}

fn outcome(i: usize) -> Outcome {
    Outcome {
        status: 201,
        body: format!("charged {i}").into(),
    }
}

/// Nodes `a` and `b` on one standalone server (R1), data in `da` and `db`.
async fn two_nodes(nats: &nats::Nats, da: &Path, db: &Path) -> (Node, Node) {
    let a = Node::start(options("a", da, nats.urls(), 1)).await.unwrap();
    let b = Node::start(options("b", db, nats.urls(), 1)).await.unwrap();
    (a, b)
}

fn fp(i: usize) -> Fingerprint {
    Fingerprint::of(format!("request {i}").as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_node_answers_and_a_lease_completes_through_another() {
    let nats = nats::Nats::start(1);
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = two_nodes(&nats, da.path(), db.path()).await;
    // Both serve a share, so about half the calls below are forwarded.
    until_shared(&a, &b).await;
    for i in 0..40 {
        let user = format!("user-{i}");
        let Begin::Started(lease) = a.begin(&user, "order", fp(i)).await.unwrap() else {
            panic!("a fresh key starts")
        };
        // In flight, from either node.
        for n in [&a, &b] {
            assert!(matches!(
                n.begin(&user, "order", fp(i)).await.unwrap(),
                Begin::InFlight { .. }
            ));
        }
        // The lease from a completes through b.
        b.complete(&lease, outcome(i)).await.unwrap();
        for n in [&a, &b] {
            match n.begin(&user, "order", fp(i)).await.unwrap() {
                Begin::Replay(o) => assert_eq!(o, outcome(i)),
                other => panic!("user {i}: {other:?}"),
            }
            assert!(matches!(
                n.begin(&user, "order", fp(i + 1)).await.unwrap(),
                Begin::Mismatch
            ));
            assert_eq!(n.outcome(&user, "order").await.unwrap(), Some(outcome(i)));
        }
        // A completed lease cannot complete again, from anywhere.
        assert!(a.complete(&lease, outcome(0)).await.is_err());
    }
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_dies_loses_its_partitions_but_no_acknowledged_record() {
    let nats = nats::Nats::start(1);
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = two_nodes(&nats, da.path(), db.path()).await;
    until_served(&[&a, &b]).await;
    let mut leases = Vec::new();
    for i in 0..60 {
        let user = format!("user-{i}");
        let Begin::Started(lease) = a.begin(&user, "order", fp(i)).await.unwrap() else {
            panic!("a fresh key starts")
        };
        if i % 3 == 0 {
            leases.push((i, lease)); // left in flight
        } else {
            a.complete(&lease, outcome(i)).await.unwrap();
        }
    }
    // a dies without handing anything off: its entries expire.
    drop(a);
    until_served(&[&b]).await;
    for i in (0..60).filter(|i| i % 3 != 0) {
        match b.begin(format!("user-{i}"), "order", fp(i)).await.unwrap() {
            Begin::Replay(o) => assert_eq!(o, outcome(i)),
            other => panic!("user {i} after failover: {other:?}"),
        }
    }
    // The in-flight leases are still live, and complete through b.
    for (i, lease) in &leases {
        let user = format!("user-{i}");
        assert!(matches!(
            b.begin(&user, "order", fp(*i)).await.unwrap(),
            Begin::InFlight { .. }
        ));
        b.complete(lease, outcome(*i)).await.unwrap();
    }
    // a comes back on its directory, catches up, and takes its share again.
    let a = Node::start(options("a", da.path(), nats.urls(), 1))
        .await
        .unwrap();
    // b hands a its share (the partitions a is preferred for) once a shows
    // up in the members bucket.
    let deadline = Instant::now() + Duration::from_secs(30);
    while a.serving().is_empty() {
        assert!(
            Instant::now() < deadline,
            "a rejoined but was never handed a partition"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    until_served(&[&a, &b]).await;
    for i in 0..60 {
        match a.begin(format!("user-{i}"), "order", fp(i)).await.unwrap() {
            Begin::Replay(o) => assert_eq!(o, outcome(i)),
            other => panic!("user {i} after rejoin: {other:?}"),
        }
    }
    a.shutdown().await;
    b.shutdown().await;
}

/// Begins and completes `user`'s key through `node`, retrying through
/// failures (a retry is what the key is for) until it is completed or
/// replayed; returns what the store holds for it.
async fn charge(node: &Node, user: &str, i: usize) -> Outcome {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "{user} never completed");
        match node
            .begin_wait(user, "order", fp(i), Duration::from_secs(5))
            .await
        {
            Ok(Begin::Started(lease)) => {
                if node.complete(&lease, outcome(i)).await.is_ok() {
                    return outcome(i);
                }
            }
            Ok(Begin::Replay(o)) => return o,
            Ok(Begin::Mismatch) => panic!("{user}: mismatch"),
            Ok(Begin::InFlight { .. }) | Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jetstream_server_killed_and_restarted_loses_no_acknowledged_record() {
    let mut nats = nats::Nats::start(3);
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut oa = options("a", da.path(), nats.urls(), 3);
    oa.engine.lease_ttl = Duration::from_secs(2);
    let mut ob = options("b", db.path(), nats.urls(), 3);
    ob.engine.lease_ttl = Duration::from_secs(2);
    let a = Node::start(oa).await.unwrap();
    let b = Node::start(ob).await.unwrap();
    until_served(&[&a, &b]).await;
    let mut done = Vec::new();
    // The longest a charge took, and which: what a lost server costs.
    let mut slowest = (Duration::ZERO, 0);
    for i in 0..240 {
        if i == 80 {
            nats.servers[1].kill();
        }
        if i == 160 {
            nats.servers[1].restart();
        }
        let node = if i % 2 == 0 { &a } else { &b };
        let started = Instant::now();
        done.push(charge(node, &format!("user-{i}"), i).await);
        slowest = slowest.max((started.elapsed(), i));
    }
    eprintln!(
        "a JetStream server of three killed at charge 80, restarted at 160: \
         the slowest charge took {:?} (charge {})",
        slowest.0, slowest.1
    );
    for (i, want) in done.iter().enumerate() {
        for n in [&a, &b] {
            assert_eq!(
                n.outcome(format!("user-{i}"), "order")
                    .await
                    .unwrap()
                    .as_ref(),
                Some(want)
            );
        }
    }
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trimmed_streams_stay_short_and_still_rebuild_every_record() {
    let nats = nats::Nats::start(1);
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let trimmed = |id: &str, dir: &Path| {
        let mut o = options(id, dir, nats.urls(), 1);
        o.trim_after = 40;
        o
    };
    let a = Node::start(trimmed("a", da.path())).await.unwrap();
    until_served(&[&a]).await;
    for i in 0..600 {
        charge(&a, &format!("user-{i}"), i).await;
    }
    // Give the rounds time to trim, then look at the streams from outside.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let client = async_nats::connect(nats.urls()[0].as_str()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut trimmed_any = false;
    for p in 0..PARTITIONS {
        let mut stream = js.get_stream(format!("idemkv_P{p:04}")).await.unwrap();
        let info = stream.info().await.unwrap();
        // 600 keys, two records each, over 4 partitions: ~300 messages
        // each untrimmed; with a snapshot every 40 sends far fewer stay.
        assert!(info.state.messages < 200, "partition {p}: {:?}", info.state);
        trimmed_any |= info.state.first_sequence > 1;
    }
    assert!(trimmed_any, "no stream was trimmed");
    // b starts with an empty directory and a's copies are gone: it
    // rebuilds every partition from the trimmed streams alone.
    drop(a);
    let b = Node::start(trimmed("b", db.path())).await.unwrap();
    until_served(&[&b]).await;
    for i in 0..600 {
        assert_eq!(
            b.outcome(format!("user-{i}"), "order").await.unwrap(),
            Some(outcome(i)),
            "user {i}"
        );
    }
    // a comes back with copies older than the trims: they are started over.
    for i in 600..700 {
        charge(&b, &format!("user-{i}"), i).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    b.shutdown().await;
    let a = Node::start(trimmed("a", da.path())).await.unwrap();
    until_served(&[&a]).await;
    for i in 0..700 {
        assert_eq!(
            a.outcome(format!("user-{i}"), "order").await.unwrap(),
            Some(outcome(i)),
            "user {i}"
        );
    }
    a.shutdown().await;
}

/// Waits until every partition has exactly one standby copy, on a node
/// that does not serve it.
async fn until_followed(nodes: &[&Node]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = (0..PARTITIONS).all(|p| {
            let followers: Vec<&&Node> = nodes
                .iter()
                .filter(|n| n.following().contains(&p))
                .collect();
            followers.len() == 1 && !followers.iter().any(|n| n.serving().contains(&p))
        });
        if ok {
            return;
        }
        let state: Vec<(String, Vec<u32>, Vec<u32>)> = nodes
            .iter()
            .map(|n| (n.id().to_owned(), n.serving(), n.following()))
            .collect();
        assert!(
            Instant::now() < deadline,
            "standbys never settled: {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Bytes of segment files in a copy's directory.
fn segment_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_copies_follow_through_trims_and_take_over_a_dead_owner() {
    let nats = nats::Nats::start(1);
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let node = |id: &str, dir: &Path| {
        let mut o = options(id, dir, nats.urls(), 1);
        o.standbys = 1;
        o.trim_after = 40;
        Node::start(o)
    };
    let a = node("a", dirs[0].path()).await.unwrap();
    let b = node("b", dirs[1].path()).await.unwrap();
    let c = node("c", dirs[2].path()).await.unwrap();
    let nodes = [&a, &b, &c];
    until_served(&nodes).await;
    until_followed(&nodes).await;
    for i in 0..400 {
        charge(nodes[i % 3], &format!("user-{i}"), i).await;
    }
    // Every standby copied records in, across the owners' trims.
    let deadline = Instant::now() + Duration::from_secs(20);
    for (n, dir) in nodes.iter().zip(&dirs) {
        for p in n.following() {
            let copy = dir.path().join(format!("p{p:04}"));
            while segment_bytes(&copy) < 4096 {
                assert!(
                    Instant::now() < deadline,
                    "{}'s standby of partition {p} copied nothing in",
                    n.id()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    // The node serving the most dies without handing anything off.
    let dead = nodes
        .iter()
        .max_by_key(|n| n.serving().len())
        .map(|n| n.id().to_owned())
        .unwrap();
    // Its last records go in just before it dies: its standbys may not
    // have copied them yet; the new owners copy them in before serving.
    for n in nodes.iter().filter(|n| n.id() == dead) {
        for i in 400..440 {
            charge(n, &format!("user-{i}"), i).await;
        }
    }
    let mut survivors = Vec::new();
    for n in [a, b, c] {
        if n.id() == dead {
            drop(n);
        } else {
            survivors.push(n);
        }
    }
    let survivors: Vec<&Node> = survivors.iter().collect();
    until_served(&survivors).await;
    for i in 0..440 {
        for n in &survivors {
            assert_eq!(
                n.outcome(format!("user-{i}"), "order").await.unwrap(),
                Some(outcome(i)),
                "user {i} from {}",
                n.id()
            );
        }
    }
    // The two survivors are each other's standbys now.
    until_followed(&survivors).await;
    for n in survivors {
        n.shutdown().await;
    }
}

/// The first `user-{i}` (from `from` on) whose partition `node` serves.
fn user_served_by(node: &Node, from: usize) -> (usize, String) {
    let serving = node.serving();
    (from..)
        .map(|i| (i, format!("user-{i}")))
        .find(|(_, u)| serving.contains(&node.partition_of(u)))
        .expect("node serves a partition")
}

/// Begins `user`'s key on `node` until it starts (a dropped begin's lease
/// being released meanwhile), and releases it; fails if the key stays
/// claimed `within` (the lease TTL is far longer).
async fn until_free(node: &Node, user: &str, i: usize, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        match node.begin(user, "order", fp(i)).await.unwrap() {
            Begin::Started(lease) => return node.release(&lease).await.unwrap(),
            Begin::InFlight { .. } => assert!(
                Instant::now() < deadline,
                "{user}: still claimed {within:?} after its begin was dropped"
            ),
            other => panic!("{user}: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_begin_leaves_no_claim_behind_even_when_forwarded() {
    let nats = nats::Nats::start(1);
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = two_nodes(&nats, da.path(), db.path()).await;
    until_shared(&a, &b).await;
    // The engines' lease TTL is 30 s: a claim left behind by a dropped
    // future would outlast every wait below.
    assert!(a.lease_ttl() >= Duration::from_secs(30));

    // A begin_wait forwarded from a to b's partition, dropped while it
    // waits for another lease: b grants it when that lease is released,
    // to a caller that is gone.
    let (i, user) = user_served_by(&b, 0);
    let Begin::Started(held) = b.begin(&user, "order", fp(i)).await.unwrap() else {
        panic!("a fresh key starts")
    };
    let waiting = a.begin_wait(&user, "order", fp(i), Duration::from_secs(20));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), waiting)
            .await
            .is_err(),
        "the key is held: begin_wait waits"
    );
    b.release(&held).await.unwrap();
    until_free(&b, &user, i, Duration::from_secs(3)).await;

    // Plain begins, local and forwarded, dropped at points spread over a
    // round trip (before the request is out, while the owner runs it,
    // after it granted the key).
    let mut from = i + 1;
    for round in 0..60u64 {
        let (i, user) = user_served_by(&b, from);
        from = i + 1;
        let node = if round % 2 == 0 { &a } else { &b };
        let begin = node.begin(&user, "order", fp(i));
        let cut = Duration::from_micros(round * 50);
        if let Ok(answer) = tokio::time::timeout(cut, begin).await {
            let Begin::Started(lease) = answer.unwrap() else {
                panic!("a fresh key starts")
            };
            node.release(&lease).await.unwrap();
        }
        until_free(&b, &user, i, Duration::from_secs(3)).await;
    }
    a.shutdown().await;
    b.shutdown().await;
}
