//! idemkv's cluster (`idemkv::cluster`, feature `cluster`): nodes whose
//! partitions are replicated through NATS JetStream streams.
//!
//! The harness starts its own JetStream cluster: three `nats-server`
//! processes on loopback ports, stores in a temporary directory, killed when
//! [`Nats`] is dropped. On top of it:
//! - [`durable`]: the durable rows (`idemkv-cluster1`, `idemkv-cluster3`);
//! - [`sequential`], [`failover`], [`catch_up`]: the cluster report
//!   (`--cluster-report`).
//!
//! Every measurement checks its answers (a fresh key must start, a
//! completed key must replay its body) and fails otherwise.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use idemkv::cluster::{ClusterOptions, Node};
use idemkv::{Begin, Durability, Fingerprint, Options, Outcome};

use crate::workload::{self, Res, STATUS, Workload};

/// Partitions of every cluster here but the catch-up one.
pub const PARTITIONS: u32 = 16;
/// JetStream servers (and stream replicas).
const SERVERS: usize = 3;

/// Errors inside the runtime, as text (what `block_on` hands back).
type Sres<T> = Result<T, String>;

// ------------------------------------------------------------ nats-server --

/// A JetStream cluster of `nats-server` processes this harness started.
pub struct Nats {
    servers: Vec<Child>,
    ports: Vec<u16>,
    dir: tempfile::TempDir,
}

impl Nats {
    /// `nats-server --version`, if it is on `PATH`.
    pub fn version() -> Option<String> {
        let out = Command::new("nats-server").arg("--version").output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Starts `n` servers with JetStream (`-js`), routed to each other as
    /// one cluster when `n > 1`, each with its store and log in a temporary
    /// directory; returns once every client port accepts connections.
    /// (JetStream elects its meta leader a few seconds later:
    /// `Node::start` waits for that.)
    pub fn start(n: usize) -> Res<Nats> {
        let dir = tempfile::Builder::new()
            .prefix("idemkv-compare-nats-")
            .tempdir()?;
        // Hold every listener until all ports are picked, so none repeats.
        let listeners = (0..3 * n)
            .map(|_| TcpListener::bind("127.0.0.1:0"))
            .collect::<std::io::Result<Vec<_>>>()?;
        let picked = listeners
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<std::io::Result<Vec<_>>>()?;
        drop(listeners);
        let (ports, rest) = picked.split_at(n);
        let (cluster_ports, monitor_ports) = rest.split_at(n);
        let routes: Vec<String> = cluster_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect();
        let mut nats = Nats {
            servers: Vec::new(),
            ports: ports.to_vec(),
            dir,
        };
        for s in 0..n {
            let mut cmd = Command::new("nats-server");
            cmd.args(["-a", "127.0.0.1", "-p", &ports[s].to_string(), "-js"])
                .arg("-sd")
                .arg(nats.dir.path().join(format!("s{s}")))
                .arg("-l")
                .arg(nats.dir.path().join(format!("s{s}.log")))
                .args(["-m", &monitor_ports[s].to_string()])
                .args(["--server_name", &format!("s{s}")]);
            if n > 1 {
                cmd.args(["--cluster_name", "idemkv-compare"])
                    .args(["--cluster", &routes[s]])
                    .args(["--routes", &routes.join(",")]);
            }
            let child = cmd
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot start nats-server: {e}"))?;
            nats.servers.push(child);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for (s, &port) in ports.iter().enumerate() {
            while TcpStream::connect(("127.0.0.1", port)).is_err() {
                if let Some(status) = nats.servers[s].try_wait()? {
                    return Err(format!("nats-server s{s} exited at start-up ({status})").into());
                }
                if Instant::now() > deadline {
                    return Err(format!("nats-server s{s} did not listen within 10 s").into());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // Then until every server reports itself healthy (`/healthz`: with
        // JetStream, once it has a meta leader and is current with it).
        // `Node::start` would wait for that too, but on a cluster this
        // young its first JetStream requests can take their full timeouts.
        let deadline = Instant::now() + Duration::from_secs(60);
        for &port in monitor_ports {
            while !healthy(port) {
                if Instant::now() > deadline {
                    return Err("nats-server /healthz not ok within 60 s".into());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(nats)
    }

    /// Every server's client URL.
    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect()
    }

    /// A directory under the servers' temporary directory, for node data.
    pub fn scratch(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Whether the monitoring port answers `GET /healthz` with 200.
fn healthy(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut reply = String::new();
    let _ = std::io::Read::read_to_string(&mut s, &mut reply);
    reply.starts_with("HTTP/1.0 200") || reply.starts_with("HTTP/1.1 200")
}

impl Drop for Nats {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
    }
}

// ---------------------------------------------------------------- options --

/// A node's options as every measurement here starts them: 16 partitions,
/// R3 streams, `Durability::Sync`, the other fields at their defaults
/// (ownership TTL 3 s, trimming every 10 000 messages, forward timeout 5 s).
pub fn options(id: &str, dir: &Path, urls: &[String]) -> ClusterOptions {
    let mut o = ClusterOptions::new(id, dir, urls.iter().cloned());
    o.partitions = PARTITIONS;
    o.replicas = SERVERS;
    o.engine = Options {
        durability: Durability::Sync,
        ..Options::default()
    };
    o
}

/// A variant of the failover measurement: a change applied to every node's
/// options (in-process and in the child process alike, which is why it is
/// named: the child looks it up by name).
pub struct Variant {
    pub name: &'static str,
    pub setting: &'static str,
    pub configure: fn(&mut ClusterOptions),
}

/// The failover variants the report runs, one row group each.
pub const FAILOVER_VARIANTS: &[Variant] = &[
    Variant {
        name: "no-standbys",
        setting: "ownership TTL 3 s, no standbys",
        configure: |o| o.standbys = 0,
    },
    Variant {
        name: "standbys",
        setting: "ownership TTL 3 s, 1 standby per partition (the default)",
        configure: |o| o.standbys = 1,
    },
    Variant {
        name: "ttl-1s-no-standbys",
        setting: "ownership TTL 1 s, no standbys",
        configure: |o| {
            o.ownership_ttl = Duration::from_secs(1);
            o.standbys = 0;
        },
    },
    Variant {
        name: "ttl-1s-standbys",
        setting: "ownership TTL 1 s, 1 standby per partition",
        configure: |o| {
            o.ownership_ttl = Duration::from_secs(1);
            o.standbys = 1;
        },
    },
];

/// The variant called `name`.
pub fn variant(name: &str) -> Res<&'static Variant> {
    FAILOVER_VARIANTS
        .iter()
        .find(|v| v.name == name)
        .ok_or_else(|| format!("unknown failover variant {name}").into())
}

/// A 2-worker tokio runtime for the callers (each node runs its NATS work
/// on a runtime of its own).
fn runtime() -> Res<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Starts the nodes `ids` concurrently, each on a data directory under
/// `nats` named after it, with `configure` applied to its options.
async fn start_nodes(
    nats: &Nats,
    ids: &[&str],
    configure: &dyn Fn(&mut ClusterOptions),
) -> Sres<Vec<Node>> {
    let starts: Vec<_> = ids
        .iter()
        .map(|id| {
            let mut o = options(id, &nats.scratch(id), &nats.urls());
            configure(&mut o);
            start_node(o)
        })
        .collect();
    // The first alone: it creates the cluster's buckets. (Nodes started
    // together on a fresh JetStream cluster: one of them often took 10 s,
    // see README.md.)
    let mut starts = starts.into_iter();
    let mut nodes = Vec::new();
    if let Some(first) = starts.next() {
        nodes.push(first.await?);
    }
    for node in futures_join(starts).await {
        nodes.push(node?);
    }
    Ok(nodes)
}

/// `Node::start`, tried again until 90 s have passed. `Node::start` itself
/// waits up to twice `forward_timeout` for a starting JetStream cluster to
/// elect its meta leader; on this shared 2-core machine, with the harness
/// at `nice 19`, that can take longer.
async fn start_node(o: ClusterOptions) -> Sres<Node> {
    let t0 = Instant::now();
    loop {
        match Node::start(o.clone()).await {
            Ok(node) => {
                if t0.elapsed() > Duration::from_secs(5) {
                    eprintln!(
                        "  node {}: started after {:.1} s",
                        o.node_id,
                        t0.elapsed().as_secs_f64()
                    );
                }
                return Ok(node);
            }
            Err(e) if t0.elapsed() < Duration::from_secs(90) => {
                eprintln!(
                    "  node {}: Node::start failed after {:.1} s ({e}); trying again",
                    o.node_id,
                    t0.elapsed().as_secs_f64()
                );
            }
            Err(e) => return Err(format!("Node::start ({}): {e}", o.node_id)),
        }
    }
}

/// Awaits every future, concurrently (as tasks on the current runtime).
async fn futures_join<F>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("a task panicked"));
    }
    out
}

/// Waits until the nodes' serving lists (from `view`) cover partitions
/// `0..partitions` once each, every node serving at least one, and stay
/// unchanged for `stable` (a node that started first claims everything and
/// hands partitions off once it lists the others: at most a TTL or two).
/// Returns the lists.
async fn until_served(
    view: &dyn Fn() -> Vec<Vec<u32>>,
    partitions: u32,
    stable: Duration,
    timeout: Duration,
) -> Sres<Vec<Vec<u32>>> {
    let deadline = Instant::now() + timeout;
    let mut since: Option<(Instant, Vec<Vec<u32>>)> = None;
    loop {
        let now = view();
        let mut all: Vec<u32> = now.iter().flatten().copied().collect();
        all.sort_unstable();
        let complete =
            all == (0..partitions).collect::<Vec<_>>() && now.iter().all(|s| !s.is_empty());
        if !complete {
            since = None;
        } else {
            match &since {
                Some((at, was)) if *was == now => {
                    if at.elapsed() >= stable {
                        return Ok(now);
                    }
                }
                _ => since = Some((Instant::now(), now.clone())),
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the partitions were not all served, once each, within {timeout:?}: {now:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Stops the nodes (hands their partitions off), giving up after 20 s.
async fn shutdown(nodes: &[Node]) {
    let all = nodes.iter().map(|n| {
        let n = n.clone();
        async move { n.shutdown().await }
    });
    let _ = tokio::time::timeout(Duration::from_secs(20), futures_join(all)).await;
}

// --------------------------------------------------------------- latency --

/// A latency histogram for calls that take microseconds to seconds: 100
/// logarithmic buckets per decade (each 2.3 % wider than the last) from
/// 1 µs to 1 000 s.
#[derive(Clone)]
pub struct LogHist(Vec<u64>);

impl LogHist {
    const PER_DECADE: f64 = 100.0;
    const BUCKETS: usize = 900;

    pub fn new() -> LogHist {
        LogHist(vec![0; Self::BUCKETS + 1])
    }

    pub fn record(&mut self, took: Duration) {
        let us = took.as_secs_f64() * 1e6;
        let b = if us <= 1.0 {
            0
        } else {
            ((us.log10() * Self::PER_DECADE).floor() as usize + 1).min(Self::BUCKETS)
        };
        self.0[b] += 1;
    }

    pub fn merge(&mut self, other: &LogHist) {
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            *a += b;
        }
    }

    pub fn count(&self) -> u64 {
        self.0.iter().sum()
    }

    /// The `q` quantile (0..=1) in microseconds: the upper edge of the
    /// bucket that holds it.
    pub fn quantile_us(&self, q: f64) -> f64 {
        let want = ((q * self.count() as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &c) in self.0.iter().enumerate() {
            seen += c;
            if seen >= want {
                return 10f64.powf(i as f64 / Self::PER_DECADE);
            }
        }
        f64::NAN
    }
}

// ---------------------------------------------------------------- calls --

fn fp(i: u64) -> Fingerprint {
    Fingerprint::from_u128(workload::fingerprint(i))
}

/// Begins record `i` of `work` (which must be fresh) and completes it;
/// returns how long each of the two calls took.
async fn pair(node: &Node, work: &Workload, i: u64, key: &[u8]) -> Sres<(Duration, Duration)> {
    let t0 = Instant::now();
    let began = node
        .begin(work.user(i), key, fp(i))
        .await
        .map_err(|e| format!("begin: {e}"))?;
    let t1 = Instant::now();
    let Begin::Started(lease) = began else {
        return Err(format!("a fresh key was not started: {began:?}"));
    };
    let outcome = Outcome {
        status: STATUS,
        body: workload::body(i),
    };
    node.complete(&lease, outcome)
        .await
        .map_err(|e| format!("complete: {e}"))?;
    Ok((t1 - t0, t1.elapsed()))
}

/// Whether record `i` replays its stored outcome through `node` (a retry's
/// `begin`); an error if the key was free (the record is lost) or holds
/// something else.
async fn replays(node: &Node, work: &Workload, i: u64) -> Sres<bool> {
    Ok(try_replay(node, work, i).await?.is_none())
}

/// As [`replays`], with the call's error if it failed (`Some`).
async fn try_replay(node: &Node, work: &Workload, i: u64) -> Sres<Option<String>> {
    match node.begin(work.user(i), work.key(i), fp(i)).await {
        Ok(Begin::Replay(o)) if o.status == STATUS && o.body == workload::body(i) => Ok(None),
        Ok(Begin::Started(_)) => Err(format!("record {i} is lost: its key started afresh")),
        Ok(other) => Err(format!("record {i} did not replay: {other:?}")),
        Err(e) => Ok(Some(e.to_string())),
    }
}

/// Loads records `0..work.len()` (begin + complete each) from `tasks`
/// tasks, task `t` calling node `t % nodes.len()`.
async fn load(nodes: &[Node], work: &Arc<Workload>, tasks: usize) -> Sres<()> {
    let n = work.len() as u64;
    let jobs = (0..tasks).map(|t| {
        let (node, work) = (nodes[t % nodes.len()].clone(), Arc::clone(work));
        async move {
            let mut i = t as u64;
            while i < n {
                pair(&node, &work, i, work.key(i)).await?;
                i += tasks as u64;
            }
            Ok::<_, String>(())
        }
    });
    futures_join(jobs).await.into_iter().collect()
}

/// Checks that every record in `indices` replays through `node`, from
/// `tasks` tasks.
async fn verify(node: &Node, work: &Arc<Workload>, indices: Vec<u64>, tasks: usize) -> Sres<usize> {
    let indices = Arc::new(indices);
    let jobs = (0..tasks).map(|t| {
        let (node, work, indices) = (node.clone(), Arc::clone(work), Arc::clone(&indices));
        async move {
            for &i in indices.iter().skip(t).step_by(tasks) {
                if !replays(&node, &work, i).await? {
                    // One more try: a partition may be moving.
                    if !replays(&node, &work, i).await? {
                        return Err(format!("record {i} did not answer"));
                    }
                }
            }
            Ok::<_, String>(())
        }
    });
    futures_join(jobs).await.into_iter().collect::<Sres<()>>()?;
    Ok(indices.len())
}

// --------------------------------------------------------- durable rows --

/// The durable rows: 3 JetStream servers (R3 streams), `nodes` in-process
/// nodes, `tasks` tasks on a 2-worker tokio runtime; task `t` calls node
/// `t % nodes`, beginning fresh keys and completing them, for `secs`.
/// Returns pairs per second and the latencies of the begins.
pub fn durable(nodes: usize, work: Arc<Workload>, tasks: usize, secs: f64) -> Res<(f64, LogHist)> {
    let nats = Nats::start(SERVERS)?;
    let rt = runtime()?;
    let ids: Vec<String> = (0..nodes).map(|n| format!("n{n}")).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let result = rt.block_on(async {
        let nodes = start_nodes(&nats, &ids, &|_| {}).await?;
        let view = || -> Vec<Vec<u32>> { nodes.iter().map(Node::serving).collect() };
        let ttl = options("x", Path::new("."), &[]).ownership_ttl;
        until_served(&view, PARTITIONS, ttl * 3 / 2, Duration::from_secs(90)).await?;
        let stop = Arc::new(AtomicBool::new(false));
        let handles: Vec<_> = (0..tasks)
            .map(|t| {
                let node = nodes[t % nodes.len()].clone();
                let (work, stop) = (Arc::clone(&work), Arc::clone(&stop));
                tokio::spawn(async move {
                    let mut hist = LogHist::new();
                    let mut done = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        // Keys beyond any loaded range, a disjoint block per task.
                        let i = (1 << 40) + ((t as u64) << 32) + done;
                        let key = workload::uuid(i);
                        let (began, _) = pair(&node, &work, i, &key).await?;
                        hist.record(began);
                        done += 1;
                    }
                    Ok::<_, String>((done, hist))
                })
            })
            .collect();
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        stop.store(true, Ordering::Relaxed);
        let (mut total, mut hist) = (0u64, LogHist::new());
        let mut failed = None;
        for h in handles {
            match h.await.map_err(|e| e.to_string()).and_then(|r| r) {
                Ok((done, h)) => {
                    total += done;
                    hist.merge(&h);
                }
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        let elapsed = t0.elapsed();
        shutdown(&nodes).await;
        match failed {
            Some(e) => Err(e),
            None => Ok((total as f64 / elapsed.as_secs_f64(), hist)),
        }
    });
    drop(rt);
    Ok(result?)
}

// ------------------------------------------------------- the report: (a) --

/// Latencies of a single sequential caller (report (a)).
pub struct Sequential {
    pub local_begin: LogHist,
    pub local_complete: LogHist,
    pub forwarded_begin: LogHist,
    pub forwarded_complete: LogHist,
}

/// 3 JetStream servers, 3 in-process nodes; one caller on node `n0` runs
/// `pairs` begin+complete pairs of fresh keys for users whose partition
/// `n0` serves (local), then `pairs` for users it does not (forwarded),
/// one call at a time.
pub fn sequential(pairs: usize, users: usize) -> Res<Sequential> {
    let nats = Nats::start(SERVERS)?;
    let rt = runtime()?;
    let work = Workload::new(0, users);
    let result = rt.block_on(async {
        let nodes = start_nodes(&nats, &["n0", "n1", "n2"], &|_| {}).await?;
        let view = || -> Vec<Vec<u32>> { nodes.iter().map(Node::serving).collect() };
        let ttl = options("x", Path::new("."), &[]).ownership_ttl;
        until_served(&view, PARTITIONS, ttl * 3 / 2, Duration::from_secs(90)).await?;
        let caller = &nodes[0];
        let mut out = Sequential {
            local_begin: LogHist::new(),
            local_complete: LogHist::new(),
            forwarded_begin: LogHist::new(),
            forwarded_complete: LogHist::new(),
        };
        let mut i: u64 = 1 << 40;
        for local in [true, false] {
            let mut done = 0;
            while done < pairs {
                i += 1;
                let p = caller.partition_of(work.user(i));
                if caller.serving().contains(&p) != local {
                    continue;
                }
                let key = workload::uuid(i);
                let (b, c) = pair(caller, &work, i, &key).await?;
                let (hb, hc) = if local {
                    (&mut out.local_begin, &mut out.local_complete)
                } else {
                    (&mut out.forwarded_begin, &mut out.forwarded_complete)
                };
                hb.record(b);
                hc.record(c);
                done += 1;
            }
        }
        shutdown(&nodes).await;
        Ok::<_, String>(out)
    });
    drop(rt);
    Ok(result?)
}

// ------------------------------------------------------- the report: (b) --

/// A node in a child process of the harness (`--child
/// cluster-node:VARIANT:ID:DIR:URLS`), which can be SIGKILLed. Its serving
/// list arrives on its stdout; closing its stdin (the harness exiting) ends
/// it. Killed on drop.
pub struct NodeProcess {
    child: Child,
    _stdin: Option<ChildStdin>,
    serving: Arc<Mutex<Vec<u32>>>,
}

impl NodeProcess {
    fn spawn(variant: &str, id: &str, dir: &Path, urls: &[String]) -> Res<NodeProcess> {
        let dir = dir
            .to_str()
            .filter(|d| !d.contains(':'))
            .ok_or("data dir path with ':'")?;
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .args([
                "--child",
                &format!("cluster-node:{variant}:{id}:{dir}:{}", urls.join(",")),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().ok_or("no child stdout")?;
        let serving = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        {
            let serving = Arc::clone(&serving);
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if line == "READY" {
                        let _ = ready_tx.send(());
                    } else if let Some(list) = line.strip_prefix("SERVING\t") {
                        *serving.lock().expect("serving lock") =
                            list.split(',').filter_map(|p| p.parse().ok()).collect();
                    }
                }
            });
        }
        let mut node = NodeProcess {
            child,
            _stdin: stdin,
            serving,
        };
        if ready_rx.recv_timeout(Duration::from_secs(60)).is_err() {
            let _ = node.child.kill();
            return Err("the child node did not print READY within 60 s".into());
        }
        Ok(node)
    }

    fn serving(&self) -> Vec<u32> {
        self.serving.lock().expect("serving lock").clone()
    }

    /// SIGKILL (reaped on drop).
    fn kill(&self) -> Res<()> {
        // SAFETY: kill(2) on our own child's pid, not yet reaped (so not
        // reused).
        if unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGKILL) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(())
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The hidden child mode: starts node `id` (options as [`options`], then
/// the variant's change), prints `READY`, then `SERVING\t<list>` each time
/// its serving list changes, until its stdin closes (or it is killed).
pub fn run_node_child(spec: &str) -> Res<()> {
    let mut parts = spec.splitn(4, ':');
    let (Some(variant_name), Some(id), Some(dir), Some(urls)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("--child cluster-node:VARIANT:ID:DIR:URLS".into());
    };
    let urls: Vec<String> = urls.split(',').map(str::to_owned).collect();
    let mut o = options(id, Path::new(dir), &urls);
    (variant(variant_name)?.configure)(&mut o);
    // The parent gone (its end of our stdin closed): stop.
    std::thread::spawn(|| {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        std::process::exit(0);
    });
    let rt = runtime()?;
    rt.block_on(async {
        let node = Node::start(o)
            .await
            .map_err(|e| format!("Node::start: {e}"))?;
        let mut out = std::io::stdout();
        writeln!(out, "READY").map_err(|e| e.to_string())?;
        let mut last = None;
        loop {
            let now = node.serving();
            if last.as_ref() != Some(&now) {
                let list: Vec<String> = now.iter().map(u32::to_string).collect();
                writeln!(out, "SERVING\t{}", list.join(",")).map_err(|e| e.to_string())?;
                out.flush().map_err(|e| e.to_string())?;
                last = Some(now);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
}

/// The result of one failover run (report (b)).
pub struct Failover {
    pub ownership_ttl: Duration,
    /// The partitions the killed node served.
    pub moved: Vec<u32>,
    /// Kill → first answer for each moved partition, fastest first, from a
    /// prober whose every attempt gives up after [`PROBE_ATTEMPT`].
    pub times: Vec<Duration>,
    /// The same from a plain caller (each call waits as long as the node
    /// lets it: up to `forward_timeout` for an owner or an answer).
    pub plain_times: Vec<Duration>,
    /// Probe attempts that gave up after [`PROBE_ATTEMPT`].
    pub probe_timeouts: u64,
    /// Loaded records of the moved partitions, all checked to replay after.
    pub checked: usize,
    /// Calls that failed while the partitions moved (then retried), plain
    /// caller and prober together.
    pub failed_calls: u64,
    /// The distinct errors of those calls.
    pub errors: Vec<String>,
}

/// How long one attempt of the failover prober waits before it gives up
/// and tries again (a healthy forwarded call takes a few ms).
pub const PROBE_ATTEMPT: Duration = Duration::from_millis(100);

/// Failover of a killed node: 3 JetStream servers, nodes `n0`, `n1` in
/// process and `n2` in a child process, every node's options changed by
/// `configure` (the child's by the variant of the same name). Loads
/// `records` records (over `users` users, so over every partition), then
/// SIGKILLs `n2`; for each partition it served, a task retries a replay of
/// one of its records until it answers. Then every loaded record of those
/// partitions must replay.
pub fn failover(
    variant_name: &str,
    configure: &dyn Fn(&mut ClusterOptions),
    records: usize,
    users: usize,
) -> Res<Failover> {
    let nats = Nats::start(SERVERS)?;
    let mut probe = options("x", Path::new("."), &[]);
    configure(&mut probe);
    let ttl = probe.ownership_ttl;
    let rt = runtime()?;
    let work = Arc::new(Workload::new(records, users));
    let child = NodeProcess::spawn(variant_name, "n2", &nats.scratch("n2"), &nats.urls())?;
    let result = rt.block_on(async {
        let nodes = start_nodes(&nats, &["n0", "n1"], configure).await?;
        let view = || {
            let mut v: Vec<Vec<u32>> = nodes.iter().map(Node::serving).collect();
            v.push(child.serving());
            v
        };
        until_served(&view, PARTITIONS, ttl * 3 / 2, Duration::from_secs(90)).await?;
        load(&nodes, &work, 128).await?;
        // Who serves what now, at the kill.
        let now = until_served(&view, PARTITIONS, Duration::ZERO, Duration::from_secs(30)).await?;
        let moved = now[2].clone();
        let of = |i: u64| nodes[0].partition_of(work.user(i));
        let probes: Vec<(u32, u64)> = moved
            .iter()
            .filter_map(|&p| (0..records as u64).find(|&i| of(i) == p).map(|i| (p, i)))
            .collect();
        let failed_calls = Arc::new(AtomicU64::new(0));
        let probe_timeouts = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(Mutex::new(Vec::<String>::new()));
        let killed = Instant::now();
        child.kill().map_err(|e| format!("kill: {e}"))?;
        // Per moved partition, two callers: a prober (attempts of
        // PROBE_ATTEMPT) and a plain caller.
        let waits = probes
            .iter()
            .flat_map(|&(p, i)| [(p, i, true), (p, i, false)])
            .map(|(p, i, probe)| {
                let node = nodes[p as usize % nodes.len()].clone();
                let (work, failed_calls, probe_timeouts, errors) = (
                    Arc::clone(&work),
                    Arc::clone(&failed_calls),
                    Arc::clone(&probe_timeouts),
                    Arc::clone(&errors),
                );
                async move {
                    let give_up = killed + Duration::from_secs(120);
                    loop {
                        let attempt = try_replay(&node, &work, i);
                        let result = if probe {
                            tokio::time::timeout(PROBE_ATTEMPT, attempt).await
                        } else {
                            Ok(attempt.await)
                        };
                        match result {
                            Ok(Ok(None)) => return Ok::<_, String>((probe, killed.elapsed())),
                            Ok(Ok(Some(e))) => {
                                failed_calls.fetch_add(1, Ordering::Relaxed);
                                // One of each kind (partition numbers aside).
                                let kind = |e: &str| e.replace(|c: char| c.is_ascii_digit(), "");
                                let mut errors = errors.lock().expect("errors lock");
                                if !errors.iter().any(|seen| kind(seen) == kind(&e)) {
                                    errors.push(e);
                                }
                            }
                            Ok(Err(wrong)) => return Err(wrong),
                            Err(_) => {
                                probe_timeouts.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        if Instant::now() > give_up {
                            return Err(format!("partition {p} did not answer within 120 s"));
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            });
        let answered = futures_join(waits)
            .await
            .into_iter()
            .collect::<Sres<Vec<_>>>()?;
        let pick = |probe: bool| {
            let mut t: Vec<Duration> = answered
                .iter()
                .filter(|(p, _)| *p == probe)
                .map(|(_, t)| *t)
                .collect();
            t.sort();
            t
        };
        let (times, plain_times) = (pick(true), pick(false));
        let indices: Vec<u64> = (0..records as u64)
            .filter(|&i| moved.contains(&of(i)))
            .collect();
        let checked = verify(&nodes[0], &work, indices, 64).await?;
        shutdown(&nodes).await;
        Ok::<_, String>(Failover {
            ownership_ttl: ttl,
            moved,
            times,
            plain_times,
            probe_timeouts: probe_timeouts.load(Ordering::Relaxed),
            checked,
            failed_calls: failed_calls.load(Ordering::Relaxed),
            errors: errors.lock().expect("errors lock").clone(),
        })
    });
    drop(rt);
    Ok(result?)
}

// ------------------------------------------------------- the report: (c) --

/// The result of one catch-up run (report (c)).
pub struct CatchUp {
    pub records: usize,
    /// A fresh node (empty data dir): start → serving and one replay.
    pub fresh: Duration,
    /// The former owner again, on its own (current) copy.
    pub restart: Duration,
    /// Records checked to replay on the fresh node.
    pub checked: usize,
}

/// Catch-up: 3 JetStream servers, 1 partition, `trim_after` as given. Node
/// `a` completes `records` records (from 128 tasks) and shuts down; node
/// `b`, on an empty data directory, starts: the time from its start until
/// it serves the partition and answers one replay. Then `b` shuts down and
/// `a` starts again on its own copy, timed the same way.
pub fn catch_up(records: usize, users: usize, trim_after: u64) -> Res<CatchUp> {
    let nats = Nats::start(SERVERS)?;
    let rt = runtime()?;
    let work = Arc::new(Workload::new(records, users));
    let configure = move |o: &mut ClusterOptions| {
        o.partitions = 1;
        o.trim_after = trim_after;
    };
    let result = rt.block_on(async {
        let a = start_nodes(&nats, &["a"], &configure).await?;
        until_served(
            &|| vec![a[0].serving()],
            1,
            Duration::ZERO,
            Duration::from_secs(90),
        )
        .await?;
        load(&a, &work, 128).await?;
        shutdown(&a).await;
        drop(a);
        let last = records as u64 - 1;
        let timed = |id: &'static str| {
            let (nats, work) = (&nats, Arc::clone(&work));
            async move {
                let t0 = Instant::now();
                let node = start_nodes(nats, &[id], &configure).await?;
                let node = node.into_iter().next().ok_or("no node")?;
                while node.serving() != [0] {
                    if t0.elapsed() > Duration::from_secs(300) {
                        return Err(format!("{id} did not serve the partition within 300 s"));
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                if !replays(&node, &work, last).await? {
                    return Err(format!("{id}: the first replay failed"));
                }
                Ok::<_, String>((t0.elapsed(), node))
            }
        };
        let (fresh, b) = timed("b").await?;
        let checked = verify(&b, &work, (0..records as u64).collect(), 64).await?;
        shutdown(std::slice::from_ref(&b)).await;
        drop(b);
        let (restart, a) = timed("a").await?;
        shutdown(std::slice::from_ref(&a)).await;
        Ok::<_, String>(CatchUp {
            records,
            fresh,
            restart,
            checked,
        })
    });
    drop(rt);
    Ok(result?)
}
