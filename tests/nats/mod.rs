//! NATS servers for the cluster tests, started and stopped by the tests
//! (`nats-server` from Debian's package, on loopback ports).

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free loopback port (bound and released; the servers bind it next).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// One `nats-server` process with JetStream.
pub struct Server {
    pub port: u16,
    pub cluster_port: u16,
    pub name: String,
    store: PathBuf,
    routes: Vec<u16>,
    child: Option<Child>,
}

impl Server {
    fn spawn(&mut self) {
        assert!(self.try_spawn(), "nats-server did not start");
    }

    /// Starts the server; `false` if it exited (a port another process
    /// took meanwhile: ports are picked free, then bound by the server) or
    /// did not listen within 10 s.
    fn try_spawn(&mut self) -> bool {
        let mut cmd = Command::new("nats-server");
        cmd.args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js"])
            .args(["-sd", self.store.to_str().expect("utf-8 path")])
            .args(["--server_name", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if !self.routes.is_empty() {
            let routes: Vec<String> = self
                .routes
                .iter()
                .map(|p| format!("nats://127.0.0.1:{p}"))
                .collect();
            cmd.args(["--cluster_name", "idemkv-test"])
                .args([
                    "--cluster",
                    &format!("nats://127.0.0.1:{}", self.cluster_port),
                ])
                .args(["--routes", &routes.join(",")]);
        }
        self.child = Some(
            cmd.spawn()
                .expect("nats-server is installed (.ci/run installs it)"),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            let exited = self
                .child
                .as_mut()
                .is_none_or(|c| c.try_wait().ok().flatten().is_some());
            if exited || Instant::now() >= deadline {
                self.kill();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// The client URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same ports and store.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A JetStream system of `n` servers (one: standalone; three: a cluster
/// with routes between them), in a temporary directory.
pub struct Nats {
    pub servers: Vec<Server>,
    _dir: tempfile::TempDir,
}

impl Nats {
    pub fn start(n: usize) -> Nats {
        // A server that cannot bind its ports (taken by another test's
        // process between picking and binding) fails the attempt: start
        // them all again on other ports.
        for _ in 0..5 {
            if let Some(nats) = Nats::try_start(n) {
                return nats;
            }
        }
        panic!("nats-server did not start (5 attempts)");
    }

    fn try_start(n: usize) -> Option<Nats> {
        let dir = tempfile::tempdir().expect("temp dir");
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let mut servers: Vec<Server> = ports
            .iter()
            .enumerate()
            .map(|(i, &(port, cluster_port))| Server {
                port,
                cluster_port,
                name: format!("s{i}"),
                store: dir.path().join(format!("s{i}")),
                routes: if n > 1 {
                    ports.iter().map(|&(_, c)| c).collect()
                } else {
                    Vec::new()
                },
                child: None,
            })
            .collect();
        for s in &mut servers {
            if !s.try_spawn() {
                return None; // the others are killed as they drop
            }
        }
        Some(Nats { servers, _dir: dir })
    }

    /// Every server's client URL.
    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(Server::url).collect()
    }
}
