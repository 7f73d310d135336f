//! An axum service whose `POST /charge` runs once per `Idempotency-Key`,
//! however often a client retries it; and how to roll that out to a
//! service that already has clients (`IDEMKV_ROLLOUT`, below).
//!
//! ```text
//! cargo run --features http --example axum_service      # PORT=8080 to move it
//! ```
//!
//! Then, in another terminal:
//!
//! ```text
//! # The first request runs the handler: 201 and a new charge id.
//! curl -i -X POST localhost:3000/charge -H 'Authorization: Bearer alice' \
//!      -H 'Idempotency-Key: "order 7"' -H 'Content-Type: application/json' \
//!      -d '{"amount":1000}'
//!
//! # The same request again is replayed: the same 201 and charge id, with
//! # `idempotent-replayed: true`; the handler does not run again.
//! curl -i -X POST ... (the same command)
//!
//! # The same key from another user is another record: a new charge.
//! curl -i -X POST localhost:3000/charge -H 'Authorization: Bearer bob' \
//!      -H 'Idempotency-Key: "order 7"' -d '{"amount":1000}'
//!
//! # The same key with another body: 422. No key at all: 400.
//! # Not authenticated: 401 (from the authentication middleware).
//! curl -i -X POST localhost:3000/charge -H 'Authorization: Bearer alice' \
//!      -H 'Idempotency-Key: "order 7"' -d '{"amount":5}'
//! curl -i -X POST localhost:3000/charge -H 'Authorization: Bearer alice' \
//!      -d '{"amount":1000}'
//! curl -i -X POST localhost:3000/charge -H 'Idempotency-Key: "order 7"' \
//!      -d '{"amount":1000}'
//!
//! # How many times the handler really ran, and what the layer answered
//! # (GET is not idempotency-keyed).
//! curl localhost:3000/executions
//! curl localhost:3000/observed
//! ```
//!
//! # Rolling out: observe, then derive, then enforce
//! `IDEMKV_ROLLOUT` (or `--rollout`, which wins) picks the phase:
//! `observe` ([`IdempotencyLayer::observe_only`]: nothing enforced, keys
//! and outcomes recorded, what enforcement would answer counted),
//! `derive` (enforced, and a request without a key gets a key derived
//! from its user, path and body, kept 60 s:
//! [`IdempotencyLayer::derive_missing_keys`]) or `enforce` (the default,
//! as above). Keep the store across the phases with `--dir`:
//!
//! ```text
//! # Phase 1: observe.
//! IDEMKV_ROLLOUT=observe cargo run --features http --example axum_service -- --dir /tmp/idem-demo
//! curl -i -X POST localhost:3000/charge -H 'Authorization: Bearer alice' \
//!      -H 'Idempotency-Key: "order 7"' -d '{"amount":1000}'
//! # Again: 201 with a NEW charge id and no idempotent-replayed: observe
//! # mode runs every request (the stored response is still the first).
//! curl -i -X POST ... (the same command)
//! # Another body under the key, and no key at all: 201 too.
//! curl -i -X POST localhost:3000/charge -H 'Authorization: Bearer alice' \
//!      -H 'Idempotency-Key: "order 7"' -d '{"amount":5}'
//! curl -i -X POST localhost:3000/charge -H 'Authorization: Bearer alice' \
//!      -d '{"amount":1000}'
//! # What enforcement would have answered: started: 1, replays: 1,
//! # mismatches: 1, missing_key: 1 (and 4 executions).
//! curl localhost:3000/observed
//!
//! # Phase 2: derive (press Enter to stop phase 1, same --dir; charge ids
//! # count from ch_1 again in each run of the service).
//! IDEMKV_ROLLOUT=derive cargo run --features http --example axum_service -- --dir /tmp/idem-demo
//! # "order 7" with its first body is now replayed: the charge id observe
//! # mode stored first, with idempotent-replayed: true.
//! curl -i -X POST localhost:3000/charge -H 'Authorization: Bearer alice' \
//!      -H 'Idempotency-Key: "order 7"' -d '{"amount":1000}'
//! # No key: the first runs, the same request within 60 s is replayed
//! # (a derived key; see the risk in the http module docs). After 60 s it
//! # runs again.
//! curl -i -X POST localhost:3000/charge -H 'Authorization: Bearer alice' -d '{"amount":70}'
//! curl -i -X POST localhost:3000/charge -H 'Authorization: Bearer alice' -d '{"amount":70}'
//! # The derived record, marked "derived":true (after stopping the service):
//! cargo run --features cli --bin idemkv -- dump /tmp/idem-demo
//!
//! # Phase 3: enforce. No key is 400 again; keys as in the first walkthrough.
//! IDEMKV_ROLLOUT=enforce cargo run --features http --example axum_service -- --dir /tmp/idem-demo
//! ```
//!
//! The keys are scoped by the authenticated user: the authentication
//! middleware puts the caller's identity in the request's extensions, and
//! [`IdempotencyLayer::user_from`] reads it from there. (This demo accepts
//! any bearer token as the user's name; a real service verifies it. Behind
//! a gateway that authenticates clients and sets a header, use
//! `user_header` instead, never with a header clients can set.)
//!
//! The engine lives in a temporary directory, removed when the service is
//! stopped with Enter (not when it is killed), unless `--dir` names one; a
//! real service opens a directory it keeps.
//!
//! For the load benchmark (`benches/http_load.sh`), three flags change
//! how it runs; without them it runs as above:
//!
//! ```text
//! --port N         listen on port N (wins over PORT)
//! --dir PATH       keep the engine in PATH (created if missing, never removed)
//! --no-layer       the same router, handler and authentication without the
//!                  idempotency layer (and no engine): the baseline
//! --rollout PHASE  observe, derive or enforce (wins over IDEMKV_ROLLOUT)
//! ```
//!
//! Built with the `metrics` feature as well
//! (`cargo run --features http,metrics --example axum_service`), it serves
//! `GET /metrics`: the engine's counters, gauges and histograms in the
//! Prometheus text format (`curl localhost:3000/metrics`), through
//! `metrics-exporter-prometheus`. The names are in `idemkv::metrics`.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use idemkv::http::IdempotencyLayer;
use idemkv::{Durability, Engine, Options};

/// Counts the charges actually made.
#[derive(Default)]
struct Charges {
    executions: AtomicU64,
}

/// Makes a charge: a new id each time it really runs.
async fn charge(State(charges): State<Arc<Charges>>, body: String) -> impl IntoResponse {
    let n = charges.executions.fetch_add(1, Ordering::SeqCst) + 1;
    let id = format!("ch_{n}");
    (
        StatusCode::CREATED,
        [
            (header::CONTENT_TYPE, "application/json".to_owned()),
            (header::LOCATION, format!("/charges/{id}")),
        ],
        format!(r#"{{"id":"{id}","request_bytes":{}}}"#, body.len()),
    )
}

/// The authenticated caller, put in the request's extensions by
/// [`authenticate`].
#[derive(Clone)]
struct User(String);

/// Authenticates `Authorization: Bearer <token>`: here the token is taken
/// as the user's name (a stand-in for verifying a real token). Anything
/// else is `401`, before the idempotency layer sees the request.
async fn authenticate(mut request: Request, next: Next) -> Response {
    let user = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .filter(|token| !token.is_empty())
        .map(str::to_owned);
    match user {
        Some(user) => {
            request.extensions_mut().insert(User(user));
            next.run(request).await
        }
        None => (StatusCode::UNAUTHORIZED, "a bearer token is required\n").into_response(),
    }
}

/// How many times `charge` ran.
async fn executions(State(charges): State<Arc<Charges>>) -> String {
    format!("{}\n", charges.executions.load(Ordering::SeqCst))
}

/// The Prometheus recorder behind `GET /metrics`: latencies in buckets
/// from 50 µs to 1 s, group-commit sizes from 1 to 4 096 records.
#[cfg(feature = "metrics")]
fn prometheus_recorder()
-> Result<metrics_exporter_prometheus::PrometheusHandle, Box<dyn std::error::Error>> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let seconds = [
        0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
        1.0,
    ];
    let records = [1.0, 2.0, 4.0, 8.0, 16.0, 64.0, 256.0, 1024.0, 4096.0];
    Ok(PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)?
        .set_buckets_for_metric(Matcher::Full("idemkv_fsync_records".into()), &records)?
        .install_recorder()?)
}

/// Resolves when a line is read from stdin; never if stdin is closed (so
/// the service also runs in the background, until killed).
async fn enter_pressed() {
    let line = tokio::task::spawn_blocking(|| std::io::stdin().read_line(&mut String::new())).await;
    if !matches!(line, Ok(Ok(n)) if n > 0) {
        std::future::pending::<()>().await;
    }
}

/// The rollout phase (`IDEMKV_ROLLOUT`, `--rollout`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rollout {
    /// Every request runs; the layer only records and counts.
    Observe,
    /// Enforced, with keys derived for requests that send none.
    Derive,
    /// Enforced, keys required.
    Enforce,
}

impl Rollout {
    /// How long a derived key's response is kept.
    const WINDOW: Duration = Duration::from_secs(60);

    fn parse(phase: &str) -> Result<Rollout, String> {
        match phase {
            "observe" => Ok(Rollout::Observe),
            "derive" => Ok(Rollout::Derive),
            "enforce" => Ok(Rollout::Enforce),
            other => Err(format!(
                "unknown rollout phase {other:?} (observe, derive or enforce)"
            )),
        }
    }

    /// `layer` configured for this phase.
    fn configure(self, layer: IdempotencyLayer) -> IdempotencyLayer {
        match self {
            Rollout::Observe => layer.observe_only(true),
            Rollout::Derive => layer.derive_missing_keys(Rollout::WINDOW),
            Rollout::Enforce => layer,
        }
    }
}

/// How the service runs: the flags of the module documentation.
struct Args {
    /// `--rollout`, else `IDEMKV_ROLLOUT`, else enforce.
    rollout: Rollout,
    /// `false` with `--no-layer`.
    layer: bool,
    /// `--port`, else `PORT`, else 3000.
    port: u16,
    /// `--dir`, else a temporary directory.
    dir: Option<PathBuf>,
}

impl Args {
    /// Reads the flags and `PORT`; an unknown flag is an error.
    fn parse() -> Result<Args, Box<dyn std::error::Error>> {
        let mut args = Args {
            rollout: match std::env::var("IDEMKV_ROLLOUT") {
                Ok(phase) => Rollout::parse(&phase)?,
                Err(_) => Rollout::Enforce,
            },
            layer: true,
            port: match std::env::var("PORT") {
                Ok(port) => port.parse()?,
                Err(_) => 3000,
            },
            dir: None,
        };
        let mut flags = std::env::args().skip(1);
        while let Some(flag) = flags.next() {
            match flag.as_str() {
                "--no-layer" => args.layer = false,
                "--rollout" => {
                    args.rollout = Rollout::parse(&flags.next().ok_or("--rollout needs a phase")?)?;
                }
                "--port" => args.port = flags.next().ok_or("--port needs a number")?.parse()?,
                "--dir" => args.dir = Some(flags.next().ok_or("--dir needs a path")?.into()),
                other => return Err(format!("unknown argument {other:?}").into()),
            }
        }
        Ok(args)
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse()?;
    let temp = tempfile::tempdir()?;
    let dir = args.dir.as_deref().unwrap_or(temp.path());
    // `Sync` is the default: a key's claim and its stored response are on
    // disk (fdatasync, group-committed) before the service goes on.
    let options = Options {
        durability: Durability::Sync,
        ..Options::default()
    };
    // With the `metrics` feature, a Prometheus recorder, installed before
    // the engine opens (its histograms register with the recorder installed
    // then).
    #[cfg(feature = "metrics")]
    let prometheus = prometheus_recorder()?;
    let engine = if args.layer {
        Some(Arc::new(Engine::open(dir, options)?))
    } else {
        None
    };
    let mut app = Router::new().route("/charge", post(charge));
    let mut layer = None;
    if let Some(engine) = &engine {
        // Keys are scoped by the authenticated user...
        let idempotency = args.rollout.configure(
            IdempotencyLayer::new(Arc::clone(engine))
                .user_from(|parts| parts.extensions.get::<User>().map(|user| user.0.clone())),
        );
        app = app.layer(idempotency.clone());
        layer = Some(idempotency);
    }
    // What the layer answered (observing: would have answered). A clone of
    // the layer shares its counters.
    let observed = move || {
        let counts = match &layer {
            Some(layer) => format!("{:?}\n", layer.observed()),
            None => "no idempotency layer (--no-layer)\n".to_owned(),
        };
        async move { counts }
    };
    let app = app
        // ...so authentication runs first (the last layer added is the
        // outermost).
        .layer(middleware::from_fn(authenticate))
        // Added after the layers: not keyed, not authenticated.
        .route("/executions", get(executions))
        .route("/observed", get(observed));
    // `GET /metrics`: the engine's metrics in the Prometheus text format,
    // its counters and gauges published right before rendering.
    #[cfg(feature = "metrics")]
    let app = {
        let engine = engine.clone();
        app.route(
            "/metrics",
            get(move || async move {
                if let Some(engine) = &engine {
                    engine.publish_metrics();
                }
                prometheus.render()
            }),
        )
    };
    let app = app.with_state(Arc::new(Charges::default()));

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.port)).await?;
    println!("listening on http://{}", listener.local_addr()?);
    if engine.is_none() {
        println!("without the idempotency layer (--no-layer)");
    } else {
        println!("rollout phase: {:?}", args.rollout);
    }
    if cfg!(feature = "metrics") {
        println!("metrics: GET /metrics");
    }
    println!("press Enter to stop");
    axum::serve(listener, app)
        .with_graceful_shutdown(enter_pressed())
        .await?;
    if let Some(engine) = engine {
        engine.close()?;
    }
    Ok(())
}
