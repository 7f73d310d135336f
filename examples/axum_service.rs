//! An axum service whose `POST /charge` runs once per `Idempotency-Key`,
//! however often a client retries it.
//!
//! ```text
//! cargo run --features http --example axum_service      # PORT=8080 to move it
//! ```
//!
//! Then, in another terminal:
//!
//! ```text
//! # The first request runs the handler: 201 and a new charge id.
//! curl -i -X POST localhost:3000/charge -H 'X-User-Id: alice' \
//!      -H 'Idempotency-Key: "order-7"' -H 'Content-Type: application/json' \
//!      -d '{"amount":1000}'
//!
//! # The same request again is replayed: the same 201 and charge id, with
//! # `idempotent-replayed: true`; the handler does not run again.
//! curl -i -X POST ... (the same command)
//!
//! # The same key with another body: 422. No key at all: 400.
//! curl -i -X POST localhost:3000/charge -H 'X-User-Id: alice' \
//!      -H 'Idempotency-Key: "order-7"' -d '{"amount":5}'
//! curl -i -X POST localhost:3000/charge -d '{"amount":1000}'
//!
//! # How many times the handler really ran (GET is not idempotency-keyed).
//! curl localhost:3000/executions
//! ```
//!
//! The engine lives in a temporary directory, removed when the service is
//! stopped with Enter (not when it is killed); a real service opens a
//! directory it keeps.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use idemkv::http::IdempotencyLayer;
use idemkv::{Engine, Options};

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

/// How many times `charge` ran.
async fn executions(State(charges): State<Arc<Charges>>) -> String {
    format!("{}\n", charges.executions.load(Ordering::SeqCst))
}

/// Resolves when a line is read from stdin; never if stdin is closed (so
/// the service also runs in the background, until killed).
async fn enter_pressed() {
    let line = tokio::task::spawn_blocking(|| std::io::stdin().read_line(&mut String::new())).await;
    if !matches!(line, Ok(Ok(n)) if n > 0) {
        std::future::pending::<()>().await;
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let engine = Arc::new(Engine::open(dir.path(), Options::default())?);
    let app = Router::new()
        .route("/charge", post(charge))
        .route("/executions", get(executions))
        .with_state(Arc::new(Charges::default()))
        .layer(IdempotencyLayer::new(Arc::clone(&engine)));

    let port: u16 = match std::env::var("PORT") {
        Ok(port) => port.parse()?,
        Err(_) => 3000,
    };
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("listening on http://{}", listener.local_addr()?);
    println!("press Enter to stop");
    axum::serve(listener, app)
        .with_graceful_shutdown(enter_pressed())
        .await?;
    engine.close()?;
    Ok(())
}
