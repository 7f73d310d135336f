//! The HTTP layer on an engine that seals bodies (issue 14, section 2;
//! features `http` and `encryption`), over a real socket: the layer stores
//! through the engine, so a retry replays the exact response while the
//! data files never hold it in the clear, after a restart too; and a
//! restart without the key answers the retry `503` (the store cannot
//! serve it), never another run of the handler or garbage.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use idemkv::http::{IdempotencyLayer, X_USER_ID};
use idemkv::{EncryptionKeys, Engine, Options};
use tokio::net::TcpListener;

mod client;
use client::post as send;

#[path = "common/files.rs"]
mod files;
use files::holding;

/// `201` with a body that names the charge and its card.
async fn charge(State(runs): State<Arc<AtomicU64>>, amount: String) -> impl IntoResponse {
    let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
    (
        StatusCode::CREATED,
        format!(r#"{{"id":"ch_{n}","amount":{amount},"card":"CARD-4242-SECRET"}}"#),
    )
}

/// Serves the layer over `dir` with `keys`; returns the address, the
/// engine and the handler's run count.
async fn serve(
    dir: &Path,
    keys: Option<EncryptionKeys>,
) -> (SocketAddr, Arc<Engine>, Arc<AtomicU64>) {
    let options = Options {
        background: false,
        encryption: keys,
        ..Options::default()
    };
    let engine = Arc::new(Engine::open(dir, options).unwrap());
    let runs = Arc::new(AtomicU64::new(0));
    let app = Router::new()
        .route("/charge", post(charge))
        .with_state(Arc::clone(&runs))
        .layer(IdempotencyLayer::new(Arc::clone(&engine)).user_header(X_USER_ID));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, engine, runs)
}

const HEADERS: [(&str, &str); 2] = [("x-user-id", "alice"), ("idempotency-key", "pay-1")];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_layer_replays_sealed_responses_that_the_files_never_hold() {
    let dir = tempfile::tempdir().unwrap();
    let keys = || Some(EncryptionKeys::new(1, &[0x42; 32]).unwrap());
    let (addr, engine, runs) = serve(dir.path(), keys()).await;
    let first = send(addr, "/charge", &HEADERS, "100").await;
    assert_eq!(first.status, 201);
    assert!(first.body.contains("CARD-4242-SECRET"));
    let retry = send(addr, "/charge", &HEADERS, "100").await;
    assert_eq!((retry.status, &retry.body), (201, &first.body));
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(holding(dir.path(), b"CARD-4242-SECRET").is_empty());
    engine.close().unwrap();

    // After a restart with the key: the same replay.
    let (addr, engine, runs) = serve(dir.path(), keys()).await;
    let again = send(addr, "/charge", &HEADERS, "100").await;
    assert_eq!((again.status, &again.body), (201, &first.body));
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    engine.compact().unwrap();
    assert!(holding(dir.path(), b"CARD-4242-SECRET").is_empty());
    engine.close().unwrap();

    // Without it the store cannot answer: 503, and the handler never runs.
    let (addr, _engine, runs) = serve(dir.path(), None).await;
    let blind = send(addr, "/charge", &HEADERS, "100").await;
    assert_eq!(blind.status, 503, "{blind:?}");
    assert!(!blind.body.contains("CARD-4242-SECRET"));
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}
