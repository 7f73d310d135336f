//! The cluster as processes: three `nats-server`s (one JetStream cluster)
//! and idemkv node processes (`examples/cluster_node`: an axum app behind
//! the idempotency layer on a `cluster::Node`), all started and stopped by
//! the test, under load from a generator that retries like a client.

mod client;
mod nats;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

const PARTITIONS: u32 = 8;
const LEASE_MS: u64 = 2000;
const OWNERSHIP_MS: u64 = 1000;

/// `target/<profile>/examples/cluster_node`, which `cargo test` builds.
fn node_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    let bin = profile_dir.join("examples").join("cluster_node");
    assert!(
        bin.exists(),
        "{} missing: run the tests with --all-features (cargo test builds the example)",
        bin.display()
    );
    bin
}

/// One node process; killed on drop.
struct NodeProcess {
    id: String,
    addr: SocketAddr,
    data: PathBuf,
    work_log: PathBuf,
    urls: String,
    slow_ms: u64,
    child: Option<Child>,
}

impl NodeProcess {
    fn start(id: &str, dir: &Path, urls: &[String], slow_ms: u64) -> NodeProcess {
        let port = nats::free_port();
        let mut node = NodeProcess {
            id: id.into(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            data: dir.join(id),
            work_log: dir.join(format!("{id}.work")),
            urls: urls.join(","),
            slow_ms,
            child: None,
        };
        node.spawn();
        node
    }

    fn spawn(&mut self) {
        let child = Command::new(node_binary())
            .args(["--id", &self.id, "--listen", &self.addr.to_string()])
            .args(["--data", self.data.to_str().expect("utf-8")])
            .args(["--nats", &self.urls])
            .args(["--partitions", &PARTITIONS.to_string(), "--replicas", "3"])
            .args(["--lease-ms", &LEASE_MS.to_string()])
            .args(["--ownership-ms", &OWNERSHIP_MS.to_string()])
            .args(["--slow-ms", &self.slow_ms.to_string()])
            .args(["--work-log", self.work_log.to_str().expect("utf-8")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the node example starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(self.addr).is_err() {
            assert!(Instant::now() < deadline, "node {} never listened", self.id);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            let status = Command::new("kill")
                .args([signal, &child.id().to_string()])
                .status()
                .expect("kill runs");
            assert!(status.success());
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.signal("-CONT");
        self.kill();
    }
}

/// `POST /charge` for `user`/`key` on `addr`.
async fn post(addr: SocketAddr, user: &str, key: &str) -> Result<client::Reply, String> {
    let headers = [("x-user-id", user), ("idempotency-key", key)];
    tokio::time::timeout(
        Duration::from_secs(30),
        client::try_post(addr, "/charge", &headers, "amount=10"),
    )
    .await
    .map_err(|_| "timed out".to_owned())?
}

/// Sends `user`/`key` to random nodes until one answers 201 with
/// `Idempotent-Replayed: true`: the response the store acknowledged (a
/// fresh 201 is the handler's answer, which the layer returns even if the
/// store could not keep it). Returns the stored body, and whether the
/// first fresh answer differed from it (its complete failed).
async fn charge_until_stored(
    addrs: &Mutex<Vec<SocketAddr>>,
    user: &str,
    key: &str,
    seed: usize,
) -> (String, bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut attempt = seed;
    let mut fresh: Option<String> = None;
    loop {
        assert!(Instant::now() < deadline, "{user}/{key} never completed");
        let addr = {
            let addrs = addrs.lock();
            addrs[attempt % addrs.len()]
        };
        attempt = attempt.wrapping_mul(31).wrapping_add(7);
        match post(addr, user, key).await {
            Ok(reply)
                if reply.status == 201 && reply.header("idempotent-replayed") == Some("true") =>
            {
                let lost = fresh.is_some_and(|f| f != reply.body);
                return (reply.body, lost);
            }
            Ok(reply) if reply.status == 201 => {
                fresh.get_or_insert(reply.body);
            }
            // 409 in flight, 503 unavailable, connection refused: retry.
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// As [`charge_until_stored`], the body only.
async fn charge_until_done(
    addrs: &Mutex<Vec<SocketAddr>>,
    user: &str,
    key: &str,
    seed: usize,
) -> String {
    charge_until_stored(addrs, user, key, seed).await.0
}

/// Every run of the handler the nodes logged: key -> start times (ms).
fn runs(nodes: &[&NodeProcess]) -> HashMap<String, Vec<(u64, String)>> {
    let mut runs: HashMap<String, Vec<(u64, String)>> = HashMap::new();
    for node in nodes {
        let Ok(text) = std::fs::read_to_string(&node.work_log) else {
            continue;
        };
        for line in text.lines() {
            let parts: Vec<&str> = line.split(' ').collect();
            if let [user, key, at, id] = parts[..] {
                runs.entry(format!("{user}/{key}"))
                    .or_default()
                    .push((at.parse().unwrap_or(0), id.to_owned()));
            }
        }
    }
    for list in runs.values_mut() {
        list.sort();
    }
    runs
}

/// Checks that no key ran twice while a lease was live (two runs of a key
/// start at least a lease TTL apart: only a takeover after expiry runs it
/// again); returns the number of such takeovers.
fn takeovers(runs: &HashMap<String, Vec<(u64, String)>>) -> usize {
    let mut takeovers = 0;
    for (key, list) in runs {
        for pair in list.windows(2) {
            let gap = pair[1].0.saturating_sub(pair[0].0);
            assert!(
                gap + 50 >= LEASE_MS,
                "{key} ran twice {gap} ms apart while its lease was live: {list:?}"
            );
            takeovers += 1;
        }
    }
    takeovers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kills_restarts_and_a_join_under_load_lose_nothing_acknowledged() {
    let keys: usize = std::env::var("IDEMKV_CLUSTER_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let mut nats = nats::Nats::start(3);
    let dir = tempfile::tempdir().unwrap();
    let mut nodes: Vec<NodeProcess> = (0..3)
        .map(|i| NodeProcess::start(&format!("n{i}"), dir.path(), &nats.urls(), 1000))
        .collect();
    let addrs = Arc::new(Mutex::new(nodes.iter().map(|n| n.addr).collect::<Vec<_>>()));
    let done = Arc::new(AtomicUsize::new(0));
    let next = Arc::new(AtomicUsize::new(0));
    let bodies = Arc::new(Mutex::new(HashMap::new()));
    let unstored = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..64)
        .map(|w| {
            let (addrs, done, next, bodies) =
                (addrs.clone(), done.clone(), next.clone(), bodies.clone());
            let unstored = unstored.clone();
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= keys {
                        return;
                    }
                    let (user, key) = (format!("u{}", i % 997), format!("k{i}"));
                    let (body, lost) = charge_until_stored(&addrs, &user, &key, w + i).await;
                    if lost {
                        unstored.fetch_add(1, Ordering::Relaxed);
                    }
                    bodies.lock().insert(format!("{user}/{key}"), body);
                    done.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    // The faults, at points of progress.
    let at = |share: usize| keys * share / 100;
    let wait_for = |n: usize| {
        let done = done.clone();
        async move {
            while done.load(Ordering::SeqCst) < n {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_for(at(20)).await;
    nodes[1].kill(); // SIGKILL mid-load
    wait_for(at(35)).await;
    nats.servers[2].kill();
    wait_for(at(50)).await;
    // (An id that rendezvous hashing prefers for two of the eight
    // partitions, with or without n1: it must be handed a share.)
    let joined = NodeProcess::start("n5", dir.path(), &nats.urls(), 1000);
    addrs.lock().push(joined.addr);
    wait_for(at(60)).await;
    nodes[1].spawn(); // restarted on its directory
    wait_for(at(70)).await;
    nats.servers[2].restart();
    for w in workers {
        w.await.unwrap();
    }
    let load_time = started.elapsed();
    // The node that joined was handed its share.
    let client = async_nats::connect(nats.urls()[0].as_str()).await.unwrap();
    let owners = async_nats::jetstream::new(client)
        .get_key_value("idemkv_owners")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut served = 0;
        for p in 0..PARTITIONS {
            if let Ok(Some(owner)) = owners.get(format!("p{p}")).await {
                served += usize::from(&owner[..] == b"n5");
            }
        }
        if served > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the node that joined serves nothing"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    nodes.push(joined);
    // Every acknowledged completion replays byte for byte from every node.
    let bodies = bodies.lock().clone();
    assert_eq!(bodies.len(), keys);
    let all: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
    let checked = Arc::new(AtomicUsize::new(0));
    let entries: Arc<Vec<(String, String)>> = Arc::new(bodies.into_iter().collect());
    let checkers: Vec<_> = (0..64)
        .map(|c| {
            let (entries, all, checked) = (entries.clone(), all.clone(), checked.clone());
            tokio::spawn(async move {
                let mut i = c;
                while i < entries.len() {
                    let (id, body) = &entries[i];
                    let (user, key) = id.split_once('/').unwrap();
                    for addr in &all {
                        let reply = post(*addr, user, key).await.expect("a node answers");
                        assert_eq!(reply.status, 201, "{id} from {addr}: {reply:?}");
                        assert_eq!(reply.header("idempotent-replayed"), Some("true"), "{id}");
                        assert_eq!(&reply.body, body, "{id} from {addr}");
                        checked.fetch_add(1, Ordering::Relaxed);
                    }
                    i += 64;
                }
            })
        })
        .collect();
    for c in checkers {
        c.await.unwrap();
    }
    let refs: Vec<&NodeProcess> = nodes.iter().collect();
    let runs = runs(&refs);
    let takeovers = takeovers(&runs);
    // The work ran for every key (and, but for takeovers, once).
    assert_eq!(runs.len(), keys, "keys whose work never ran were answered");
    eprintln!(
        "cluster_failover: {keys} keys in {load_time:?} ({:.0}/s), {} replays checked, \
         {takeovers} takeovers after a lease expired, {} first answers not stored \
         (their complete failed; the key ran again after its lease)",
        keys as f64 / load_time.as_secs_f64(),
        checked.load(Ordering::Relaxed),
        unstored.load(Ordering::Relaxed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_former_owner_that_wakes_cannot_complete() {
    let nats = nats::Nats::start(3);
    let dir = tempfile::tempdir().unwrap();
    // a's handler for `slow-` keys takes 4 s: long enough to pause it
    // mid-request, past its ownership and the lease.
    let a = NodeProcess::start("a", dir.path(), &nats.urls(), 4000);
    let b = NodeProcess::start("b", dir.path(), &nats.urls(), 100);
    // Wait until both serve (a fresh key goes through either).
    for i in 0..200 {
        let addrs = Mutex::new(vec![a.addr, b.addr]);
        charge_until_done(&addrs, &format!("warm{i}"), "k", i).await;
    }
    // Slow requests on a, for users of every partition.
    let slow: Vec<_> = (0..32)
        .map(|i| {
            let addr = a.addr;
            tokio::spawn(async move { post(addr, &format!("p{i}"), &format!("slow-{i}")).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = runs(&[&a, &b]);
    assert_eq!(
        (0..32)
            .filter(|i| before.contains_key(&format!("p{i}/slow-{i}")))
            .count(),
        32,
        "the slow requests did not all start on a"
    );
    a.signal("-STOP");
    // b takes a's partitions over once a's entries expire; the slow keys'
    // leases expire too, so b runs them and stores its own answers.
    let only_b = Mutex::new(vec![b.addr]);
    let mut stored = HashMap::new();
    for i in 0..32 {
        let body = charge_until_done(&only_b, &format!("p{i}"), &format!("slow-{i}"), i).await;
        assert!(body.ends_with("by b"), "p{i}: {body}");
        stored.insert(i, body);
    }
    a.signal("-CONT");
    // a's handlers finish now; its completes must fail (fenced), so what
    // is stored stays b's, from both nodes.
    for s in slow {
        let _ = s.await;
    }
    for i in 0..32 {
        for addr in [a.addr, b.addr] {
            let reply = post(addr, &format!("p{i}"), &format!("slow-{i}"))
                .await
                .unwrap();
            assert_eq!(reply.status, 201, "p{i} from {addr}: {reply:?}");
            assert_eq!(Some(&reply.body), stored.get(&i), "p{i} from {addr}");
        }
    }
}
