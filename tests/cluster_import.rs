//! Moving a single-node store into a cluster: `Node::import` and
//! `idemkv import-to-cluster`, against a real nats-server.

mod nats;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use idemkv::cluster::{ClusterOptions, Node};
use idemkv::{Begin, Engine, Fingerprint, Options, Outcome};

const PARTITIONS: u32 = 4;

fn options(id: &str, dir: &Path, urls: Vec<String>) -> ClusterOptions {
    let mut o = ClusterOptions::new(id, dir, urls);
    o.partitions = PARTITIONS;
    o.replicas = 1;
    o.ownership_ttl = Duration::from_secs(1);
    o.forward_timeout = Duration::from_secs(15);
    o
}

fn fp(i: usize) -> Fingerprint {
    Fingerprint::of(format!("request {i}").as_bytes())
}

fn outcome(i: usize) -> Outcome {
    Outcome {
        status: 201,
        body: format!("charged {i} on the old store").into(),
    }
}

/// A single-node store: `n` completed keys, user `user-{i % 7}`, key
/// `order-{i}`, and one key (`order-held`) in progress.
fn old_store(dir: &Path, n: usize) -> Arc<Engine> {
    let engine = Engine::open(dir, Options::default()).unwrap();
    for i in 0..n {
        let Begin::Started(lease) = engine
            .begin(format!("user-{}", i % 7), format!("order-{i}"), fp(i))
            .unwrap()
        else {
            panic!("fresh key")
        };
        // A lifetime of its own (the cluster's default is 24 h).
        let ttl = Duration::from_secs(3600 + i as u64);
        engine.complete_with_ttl(&lease, outcome(i), ttl).unwrap();
    }
    let Begin::Started(_held) = engine.begin("user-0", "order-held", fp(9999)).unwrap() else {
        panic!("fresh key")
    };
    Arc::new(engine)
}

async fn until_served(node: &Node) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while node.serving().len() < PARTITIONS as usize {
        assert!(Instant::now() < deadline, "never served every partition");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_copies_completed_records_once_and_keeps_the_clusters_answers() {
    let nats = nats::Nats::start(1);
    let (old, data) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let engine = old_store(old.path(), 300);
    let owner = Node::start(options("a", data.path(), nats.urls()))
        .await
        .unwrap();
    until_served(&owner).await;
    // The cluster already answered one of the keys differently.
    let Begin::Started(lease) = owner.begin("user-3", "order-3", fp(3)).await.unwrap() else {
        panic!("fresh in the cluster")
    };
    let theirs = Outcome {
        status: 409,
        body: "the cluster's own answer".into(),
    };
    owner.complete(&lease, theirs.clone()).await.unwrap();
    // A client-only member imports (it serves nothing).
    let scratch = tempfile::tempdir().unwrap();
    let mut o = options("importer", scratch.path(), nats.urls());
    o.serve = false;
    let importer = Node::start(o).await.unwrap();
    let report = importer.import(Arc::clone(&engine), 16).await.unwrap();
    assert!(importer.serving().is_empty() && importer.following().is_empty());
    assert_eq!(
        (
            report.imported,
            report.already,
            report.conflicts,
            report.in_flight
        ),
        (299, 0, 1, 1),
        "{report:?}"
    );
    for i in 0..300 {
        let (user, key) = (format!("user-{}", i % 7), format!("order-{i}"));
        let want = if i == 3 { theirs.clone() } else { outcome(i) };
        match owner.begin(&user, &key, fp(i)).await.unwrap() {
            Begin::Replay(o) => assert_eq!(o, want, "{user}/{key}"),
            other => panic!("{user}/{key}: {other:?}"),
        }
        // The fingerprint came along: another request under the key is refused.
        assert!(matches!(
            owner.begin(&user, &key, fp(i + 1)).await.unwrap(),
            Begin::Mismatch
        ));
        // So did the lifetime.
        let view = owner.get(&user, &key).await.unwrap().unwrap();
        let old_view = engine.get(&user, &key).unwrap().unwrap();
        if i != 3 {
            let (new, was) = (view.expires_at_ms.unwrap(), old_view.expires_at_ms.unwrap());
            assert!(new.abs_diff(was) < 10_000, "{user}/{key}: {new} vs {was}");
        }
    }
    // The key in progress in the old store was left out.
    assert!(matches!(
        owner.begin("user-0", "order-held", fp(9999)).await.unwrap(),
        Begin::Started(_)
    ));
    // Again: nothing is written twice.
    let again = importer.import(Arc::clone(&engine), 16).await.unwrap();
    assert_eq!(
        (
            again.imported,
            again.already,
            again.conflicts,
            again.in_flight
        ),
        (0, 299, 1, 1),
        "{again:?}"
    );
    importer.shutdown().await;
    owner.shutdown().await;
    engine.close().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_imports_a_data_directory() {
    let nats = nats::Nats::start(1);
    let (old, data) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    old_store(old.path(), 40).close().unwrap();
    let owner = Node::start(options("a", data.path(), nats.urls()))
        .await
        .unwrap();
    until_served(&owner).await;
    let urls = nats.urls().join(",");
    let dir = old.path().to_owned();
    let run = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_idemkv"))
            .arg("import-to-cluster")
            .arg(&dir)
            .args(["--nats", &urls, "--partitions", &PARTITIONS.to_string()])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("imported  40"), "{stdout}");
    assert!(stdout.contains("in flight 1"), "{stdout}");
    for i in 0..40 {
        let (user, key) = (format!("user-{}", i % 7), format!("order-{i}"));
        assert_eq!(owner.outcome(&user, &key).await.unwrap(), Some(outcome(i)));
    }
    // A directory that holds no store is refused, and nothing is joined.
    let empty = tempfile::tempdir().unwrap();
    let refused = Command::new(env!("CARGO_BIN_EXE_idemkv"))
        .arg("import-to-cluster")
        .arg(empty.path())
        .args(["--nats", &nats.urls()[0]])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(1));
    owner.shutdown().await;
}
