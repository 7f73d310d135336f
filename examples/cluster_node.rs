//! One service replica on an idemkv cluster: an axum app whose `POST
//! /charge` runs behind the idempotency layer on a `cluster::Node`, so a
//! retry answered by any replica gets the first request's response.
//!
//! ```text
//! cargo run --release --features cluster,http --example cluster_node -- \
//!     --id a --data /tmp/idem-a --nats nats://127.0.0.1:4222 --listen 127.0.0.1:3001
//! ```
//!
//! Options: `--partitions N` (16), `--replicas R` (3), `--lease-ms MS`
//! (the engine's lease TTL), `--ownership-ms MS`, `--work-log FILE` (every
//! run of the handler appends `user key start_ms node` to it before it
//! answers: the cluster tests count the runs), `--slow-ms MS` (how long
//! the handler takes for a key that starts with `slow-`; default 1 s). The
//! body names the node that ran the handler. Prints `listening ADDR`
//! once it serves. Users come from the `X-User-Id` header (a test setup:
//! behind a real proxy, take the authenticated identity instead).

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use idemkv::cluster::{ClusterOptions, Node};
use idemkv::http::{IdempotencyLayer, X_USER_ID};

struct App {
    id: String,
    /// How long a key starting with `slow-` takes (`--slow-ms`).
    slow: Duration,
    log: Option<parking_lot::Mutex<std::fs::File>>,
}

async fn charge(State(app): State<Arc<App>>, headers: HeaderMap) -> (StatusCode, String) {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned()
    };
    let (user, key) = (header("x-user-id"), header("idempotency-key"));
    if let Some(log) = &app.log {
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        // Written before the answer (and kept by the OS if the process is
        // killed right after).
        let _ = writeln!(log.lock(), "{user} {key} {started} {}", app.id);
    }
    if key.starts_with("slow-") {
        tokio::time::sleep(app.slow).await;
    }
    (
        StatusCode::CREATED,
        format!("charged {user}/{key} by {}", app.id),
    )
}

fn usage(problem: &str) -> ! {
    eprintln!(
        "{problem}\nusage: cluster_node --id ID --data DIR --nats URL[,URL...] --listen ADDR \
         [--partitions N] [--replicas R] [--lease-ms MS] [--ownership-ms MS] [--work-log FILE] \
         [--slow-ms MS]"
    );
    std::process::exit(2)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (mut id, mut data, mut nats, mut listen) = (None, None, None, None);
    let (mut partitions, mut replicas, mut lease, mut ownership, mut work_log) =
        (16u32, 3usize, None, None, None);
    let mut slow = Duration::from_secs(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        let number = || -> u64 {
            value
                .parse()
                .unwrap_or_else(|_| usage(&format!("{flag}: not a number")))
        };
        match flag.as_str() {
            "--id" => id = Some(value),
            "--data" => data = Some(value),
            "--nats" => nats = Some(value),
            "--listen" => listen = Some(value),
            "--partitions" => partitions = number() as u32,
            "--replicas" => replicas = number() as usize,
            "--lease-ms" => lease = Some(Duration::from_millis(number())),
            "--ownership-ms" => ownership = Some(Duration::from_millis(number())),
            "--work-log" => work_log = Some(value),
            "--slow-ms" => slow = Duration::from_millis(number()),
            _ => usage(&format!("unknown option {flag}")),
        }
    }
    let (Some(id), Some(data), Some(nats), Some(listen)) = (id, data, nats, listen) else {
        usage("--id, --data, --nats and --listen are required")
    };
    let mut options = ClusterOptions::new(id.clone(), data, nats.split(','));
    options.partitions = partitions;
    options.replicas = replicas;
    if let Some(lease) = lease {
        options.engine.lease_ttl = lease;
    }
    if let Some(ownership) = ownership {
        options.ownership_ttl = ownership;
    }
    let node = match Node::start(options).await {
        Ok(node) => node,
        Err(e) => {
            eprintln!("cannot start the node: {e}");
            std::process::exit(1)
        }
    };
    let log = work_log.map(|path| {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| usage(&format!("--work-log {path}: {e}")));
        parking_lot::Mutex::new(file)
    });
    let app = Arc::new(App { id, slow, log });
    let router = Router::new()
        .route("/charge", post(charge))
        .with_state(app)
        .layer(IdempotencyLayer::with_store(node.clone()).user_header(X_USER_ID));
    let listener = match tokio::net::TcpListener::bind(&listen).await {
        Ok(l) => l,
        Err(e) => usage(&format!("--listen {listen}: {e}")),
    };
    println!(
        "listening {}",
        listener.local_addr().map_or(listen, |a| a.to_string())
    );
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let _ = axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await;
    node.shutdown().await;
}
