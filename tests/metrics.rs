//! The `metrics` feature: what the engine publishes through the `metrics`
//! facade, read back from a Prometheus recorder's text output, in process
//! and over a real socket from `examples/axum_service`'s `GET /metrics`.

use std::io::{BufRead, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use idemkv::{Begin, Engine, Fingerprint, Options, Outcome};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// The value of the sample `series` (name and labels exactly as rendered)
/// in a Prometheus text exposition; `None` if absent.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

fn must(text: &str, series: &str) -> f64 {
    sample(text, series).unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
}

fn recorder() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| PrometheusBuilder::new().install_recorder().unwrap())
        .clone()
}

fn options() -> Options {
    Options {
        background: false,
        ..Options::default()
    }
}

fn outcome(body: &'static str) -> Outcome {
    Outcome {
        status: 200,
        body: Bytes::from_static(body.as_bytes()),
    }
}

/// Counters and gauges of two engines add up; histograms count each timed
/// call; a closed engine takes its gauges back out; compactions and their
/// failures are counted.
#[test]
fn two_engines_publish_their_sums_and_a_closed_one_withdraws_its_gauges() {
    let prometheus = recorder();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Engine::open(dir_a.path(), options()).unwrap();
    let b = Engine::open(dir_b.path(), options()).unwrap();
    let fp = Fingerprint::of(b"request");
    let other = Fingerprint::of(b"another request");

    // a: 3 started and completed, 2 replays, 1 mismatch, 1 in flight.
    for k in ["k1", "k2", "k3"] {
        let Begin::Started(lease) = a.begin("u", k, fp).unwrap() else {
            panic!("fresh key not started")
        };
        a.complete(&lease, outcome("done")).unwrap();
    }
    assert!(matches!(a.begin("u", "k1", fp).unwrap(), Begin::Replay(_)));
    assert!(matches!(a.begin("u", "k2", fp).unwrap(), Begin::Replay(_)));
    assert!(matches!(
        a.begin("u", "k3", other).unwrap(),
        Begin::Mismatch
    ));
    let Begin::Started(held) = a.begin("u", "k4", fp).unwrap() else {
        panic!()
    };
    assert!(matches!(
        a.begin("u", "k4", fp).unwrap(),
        Begin::InFlight { .. }
    ));
    // b: 2 started, 1 completed, 1 released.
    let Begin::Started(l1) = b.begin("u", "k1", fp).unwrap() else {
        panic!()
    };
    let Begin::Started(l2) = b.begin("u", "k2", fp).unwrap() else {
        panic!()
    };
    b.complete(&l1, outcome("b")).unwrap();
    b.release(&l2).unwrap();
    b.compact().unwrap();

    a.publish_metrics();
    b.publish_metrics();
    // Publishing twice adds nothing.
    a.publish_metrics();
    let text = prometheus.render();
    assert_eq!(must(&text, r#"idemkv_begins_total{answer="started"}"#), 6.0);
    assert_eq!(must(&text, r#"idemkv_begins_total{answer="replay"}"#), 2.0);
    assert_eq!(
        must(&text, r#"idemkv_begins_total{answer="mismatch"}"#),
        1.0
    );
    assert_eq!(
        must(&text, r#"idemkv_begins_total{answer="in_flight"}"#),
        1.0
    );
    assert_eq!(must(&text, "idemkv_completions_total"), 4.0);
    assert_eq!(must(&text, "idemkv_releases_total"), 1.0);
    assert_eq!(must(&text, "idemkv_compactions_total"), 1.0);
    assert_eq!(sample(&text, "idemkv_compaction_failures_total"), None);
    // 4 live records in a (k1..k4), 1 in b (k1; k2 was released).
    assert_eq!(must(&text, "idemkv_live_records"), 5.0);
    let (sa, sb) = (a.stats(), b.stats());
    assert_eq!(
        must(&text, "idemkv_disk_bytes"),
        (sa.disk_bytes + sb.disk_bytes) as f64
    );
    assert_eq!(
        must(&text, "idemkv_segments"),
        (sa.segments + sb.segments) as f64
    );
    assert_eq!(
        must(&text, "idemkv_fsyncs_total"),
        (sa.fsyncs + sb.fsyncs) as f64
    );
    // Every begin above was timed (8 on a, 2 on b), every complete (4),
    // each open's recovery (2), every segment sync.
    assert_eq!(must(&text, "idemkv_begin_seconds_count"), 10.0);
    assert_eq!(must(&text, "idemkv_complete_seconds_count"), 4.0);
    assert_eq!(must(&text, "idemkv_recovery_seconds_count"), 2.0);
    assert_eq!(
        must(&text, "idemkv_fsync_seconds_count"),
        (sa.fsyncs + sb.fsyncs) as f64
    );
    // The group sizes sum to the records synced (all of them: every call
    // above was acknowledged under `Sync`).
    assert_eq!(
        must(&text, "idemkv_fsync_records_sum"),
        (sa.records_written + sb.records_written) as f64
    );

    // A wait that finds the record completed is timed too.
    let waited = a.wait("u", "k1", fp, Duration::from_secs(1)).unwrap();
    assert!(waited.is_some());
    a.complete(&held, outcome("late")).unwrap();
    assert_eq!(must(&prometheus.render(), "idemkv_wait_seconds_count"), 1.0);

    // Closing b publishes its last counts and takes its gauges out.
    let b_disk = b.stats().disk_bytes;
    b.close().unwrap();
    a.publish_metrics();
    let text = prometheus.render();
    assert_eq!(must(&text, "idemkv_live_records"), 4.0);
    assert_eq!(
        must(&text, "idemkv_disk_bytes"),
        a.stats().disk_bytes as f64
    );
    assert!(b_disk > 0);
    assert_eq!(must(&text, "idemkv_completions_total"), 5.0);
    // After close, publishing is a no-op.
    b.publish_metrics();
    assert_eq!(must(&prometheus.render(), "idemkv_live_records"), 4.0);
    a.close().unwrap();
    let text = prometheus.render();
    assert_eq!(must(&text, "idemkv_live_records"), 0.0);
    assert_eq!(must(&text, "idemkv_segments"), 0.0);
}

/// A running `examples/axum_service`, killed on drop.
struct Service {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `target/<profile>/examples/axum_service`, which `cargo test` builds
/// beside this test (with the features the test was built with).
fn example_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let bin = profile_dir.join("examples").join("axum_service");
    assert!(
        bin.exists(),
        "{} is missing: `cargo test --all-features` builds it (or `cargo build --release --features http,metrics --example axum_service`)",
        bin.display()
    );
    bin
}

fn start_service() -> Service {
    let dir = tempfile::tempdir().unwrap();
    // A free port: bind 0, read it, let it go.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(example_binary())
        .args(["--port", &port.to_string(), "--dir"])
        .arg(dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut service = Service {
        child,
        port,
        _dir: dir,
    };
    // Its banner, up to "press Enter": a binary built without the
    // `metrics` feature (a later `cargo build --features http` overwrites
    // the one `cargo test` made) says nothing of /metrics.
    let stdout = service.child.stdout.take().unwrap();
    let banner: Vec<String> = std::io::BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .take_while(|l| !l.starts_with("press Enter"))
        .collect();
    assert!(
        banner.iter().any(|l| l == "metrics: GET /metrics"),
        "{} was built without the metrics feature (banner {banner:?}): \
         cargo build --release --features http,metrics --example axum_service",
        example_binary().display()
    );
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the example did not listen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    service
}

/// One HTTP/1.1 request (`Connection: close`): the status and the body.
fn request(port: u16, method: &str, path: &str, headers: &[&str], body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    stream.write_all(head.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// `GET /metrics` of the example, after known traffic through its layer.
#[test]
fn the_example_serves_prometheus_metrics_that_count_its_traffic() {
    let service = start_service();
    let charge = |key: &str, body: &str| {
        request(
            service.port,
            "POST",
            "/charge",
            &[
                "Authorization: Bearer alice",
                &format!("Idempotency-Key: \"{key}\""),
            ],
            body,
        )
        .0
    };
    // 3 charges, 2 replays, 1 key reused with another body.
    assert_eq!(charge("a", "amount=1"), 201);
    assert_eq!(charge("b", "amount=2"), 201);
    assert_eq!(charge("c", "amount=3"), 201);
    assert_eq!(charge("a", "amount=1"), 201);
    assert_eq!(charge("b", "amount=2"), 201);
    assert_eq!(charge("c", "amount=4"), 422);
    assert_eq!(
        request(service.port, "GET", "/executions", &[], "")
            .1
            .trim(),
        "3"
    );

    let (status, text) = request(service.port, "GET", "/metrics", &[], "");
    assert_eq!(status, 200);
    assert_eq!(must(&text, r#"idemkv_begins_total{answer="started"}"#), 3.0);
    assert_eq!(must(&text, r#"idemkv_begins_total{answer="replay"}"#), 2.0);
    assert_eq!(
        must(&text, r#"idemkv_begins_total{answer="mismatch"}"#),
        1.0
    );
    assert_eq!(must(&text, "idemkv_completions_total"), 3.0);
    assert_eq!(must(&text, "idemkv_live_records"), 3.0);
    assert!(must(&text, "idemkv_disk_bytes") > 0.0);
    assert!(must(&text, "idemkv_segments") >= 1.0);
    // Histograms in buckets (the example sets them), each call counted.
    assert_eq!(must(&text, "idemkv_begin_seconds_count"), 6.0);
    assert_eq!(must(&text, "idemkv_complete_seconds_count"), 3.0);
    assert_eq!(must(&text, "idemkv_recovery_seconds_count"), 1.0);
    assert!(must(&text, "idemkv_fsync_seconds_count") >= 1.0);
    assert!(text.contains(r#"idemkv_begin_seconds_bucket{le="0.001"}"#));
    assert!(text.contains("# TYPE idemkv_begins_total counter"));
    assert!(text.contains("# HELP idemkv_begins_total"));
}
