//! Observe mode's `tracing` events (feature `tracing`): one per request,
//! at target `idemkv::http::observe`, with the answer enforcement would
//! have given; `debug` when it would have run the request, else `info`.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::routing::post;
use http::Request;
use parking_lot::Mutex;
use tower::ServiceExt;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

use super::IdempotencyLayer;
use crate::{Durability, Engine, Options};

/// The observe events seen: level and `answer`.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<(Level, String)>>>);

/// Reads the `answer` field.
struct Answer(String);

impl Visit for Answer {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "answer" {
            self.0 = value.to_owned();
        }
    }

    fn record_debug(&mut self, _: &Field, _: &dyn std::fmt::Debug) {}
}

impl Subscriber for Seen {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        if event.metadata().target() == "idemkv::http::observe" {
            let mut answer = Answer(String::new());
            event.record(&mut answer);
            self.0.lock().push((*event.metadata().level(), answer.0));
        }
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

#[test]
fn observe_mode_emits_one_event_per_request_with_what_enforcement_would_answer() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        durability: Durability::None,
        background: false,
        ..Options::default()
    };
    let engine = Arc::new(Engine::open(dir.path(), options).unwrap());
    let layer = IdempotencyLayer::new(engine)
        .fixed_user("u")
        .observe_only(true);
    let app = Router::new()
        .route("/c", post(|| async { "ok" }))
        .layer(layer);
    let seen = Seen::default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tracing::subscriber::with_default(seen.clone(), || {
        runtime.block_on(async {
            for (key, body) in [
                (Some("k"), "1"),
                (Some("k"), "1"),
                (Some("k"), "2"),
                (None, "1"),
            ] {
                let mut request = Request::post("/c");
                if let Some(key) = key {
                    request = request.header("idempotency-key", key);
                }
                let response = app
                    .clone()
                    .oneshot(request.body(Body::from(body)).unwrap())
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200);
            }
        });
    });
    let seen = seen.0.lock().clone();
    assert_eq!(
        seen,
        [
            (Level::DEBUG, "started".to_owned()),
            (Level::INFO, "replay".to_owned()),
            (Level::INFO, "mismatch".to_owned()),
            (Level::INFO, "missing_key".to_owned()),
        ]
    );
}
