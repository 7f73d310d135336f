//! Unit tests of the stored-response encoding, header parsing, the kept
//! headers, the store policy, the not-kept fallbacks and a dropped claim.

use super::handle::*;
use super::headers::*;
use super::lease::Claim;
use super::respond::{Stored, not_kept_body};
use super::stored::*;
use super::*;
use crate::{AsyncEngine, Begin, Durability, Engine, Fingerprint, Options};
use bytes::Bytes;
use http::header::{CONTENT_TYPE, LOCATION};
use http::{HeaderMap, HeaderValue};
use proptest::prelude::*;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

#[test]
fn retry_after_rounds_up_to_whole_seconds() {
    assert_eq!(retry_after_secs(Duration::ZERO), 1);
    assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
    assert_eq!(retry_after_secs(Duration::from_millis(1000)), 1);
    assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
    assert_eq!(retry_after_secs(Duration::from_secs(30)), 30);
}

#[test]
fn stored_response_round_trips_with_exact_bytes() {
    let stored = StoredResponse {
        headers: vec![
            (CONTENT_TYPE, HeaderValue::from_static("text/plain")),
            (LOCATION, HeaderValue::from_static("/c/1")),
        ],
        body: Bytes::from_static(b"hi"),
    };
    let bytes = stored.encode();
    let mut expected = b"IKH1\x00\x02".to_vec();
    expected.extend_from_slice(b"\x00\x0ccontent-type\x00\x00\x00\x0atext/plain");
    expected.extend_from_slice(b"\x00\x08location\x00\x00\x00\x04/c/1");
    expected.extend_from_slice(b"hi");
    assert_eq!(&bytes[..], &expected[..]);
    assert_eq!(StoredResponse::decode(&bytes), Some(stored));
    // Every prefix that cuts into the magic or a header field fails
    // to decode (one that ends after them is a shorter body).
    for cut in 0..expected.len() - 2 {
        assert_eq!(
            StoredResponse::decode(&bytes.slice(..cut)),
            None,
            "cut {cut}"
        );
    }
    assert_eq!(
        StoredResponse::decode(&Bytes::from_static(b"XKH1\0\0")),
        None
    );
}

#[test]
fn fingerprint_is_method_target_newline_body() {
    let uri: http::Uri = "/charge?x=1".parse().unwrap();
    assert_eq!(
        request_fingerprint(&Method::POST, &uri, b"{}"),
        Fingerprint::of(b"POST /charge?x=1\n{}")
    );
    let uri: http::Uri = "http://h/charge".parse().unwrap();
    assert_eq!(
        request_fingerprint(&Method::PATCH, &uri, b""),
        Fingerprint::of(b"PATCH /charge\n")
    );
}

#[test]
fn key_header_forms() {
    let parse = |values: &[&[u8]]| {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(IDEMPOTENCY_KEY, HeaderValue::from_bytes(v).unwrap());
        }
        match idempotency_key(&headers) {
            KeyHeader::Missing => "missing".to_owned(),
            KeyHeader::Invalid => "invalid".to_owned(),
            KeyHeader::Key(k) => String::from_utf8(k.to_vec()).unwrap(),
        }
    };
    assert_eq!(parse(&[]), "missing");
    assert_eq!(parse(&[b"abc"]), "abc");
    assert_eq!(parse(&[b"\"8e03978e-40d5\""]), "8e03978e-40d5");
    assert_eq!(parse(&[br#""a\"b\\c""#]), r#"a"b\c"#);
    // A space or `%` in a key reaches the engine percent-encoded.
    assert_eq!(parse(&[b"\"order 7\""]), "order%207");
    assert_eq!(parse(&[b"\" x \""]), "%20x%20");
    assert_eq!(parse(&[b"100%"]), "100%25");
    assert_eq!(parse(&[b"\"abc"]), "invalid");
    assert_eq!(parse(&[b"\"a\"b"]), "invalid");
    assert_eq!(parse(&[br#""a\x""#]), "invalid");
    assert_eq!(parse(&[b"\"\""]), "invalid");
    assert_eq!(parse(&[b"a b"]), "invalid");
    assert_eq!(parse(&[b"\"\xe9\""]), "invalid");
    assert_eq!(parse(&[b"\xe9"]), "invalid");
    assert_eq!(parse(&[b"\"a\tb\""]), "invalid");
    assert_eq!(parse(&[b"a", b"b"]), "invalid");
}

proptest! {
    #[test]
    fn engine_key_is_visible_ascii_and_injective(
        a in "[ -~]{1,12}",
        b in "[ -~]{1,12}",
    ) {
        let (ka, kb) = (engine_key(a.as_bytes()), engine_key(b.as_bytes()));
        prop_assert!(ka.iter().all(u8::is_ascii_graphic));
        prop_assert_eq!(a == b, ka == kb);
    }
}

#[test]
fn engine_key_keeps_keys_without_space_or_percent() {
    let key = "k\"\\".repeat(85);
    assert_eq!(&engine_key(key.as_bytes())[..], key.as_bytes());
}

#[test]
fn user_header_is_one_printable_value() {
    let user = |values: &[&[u8]]| {
        let mut request = http::Request::new(());
        for v in values {
            request
                .headers_mut()
                .append(X_USER_ID, HeaderValue::from_bytes(v).unwrap());
        }
        user_from_header(&request.into_parts().0, &X_USER_ID)
    };
    assert_eq!(user(&[b"alice"]), Some("alice".to_owned()));
    assert_eq!(user(&[]), None);
    assert_eq!(user(&[b"alice", b"bob"]), None);
    assert_eq!(user(&[b"\xffalice"]), None);
}

/// A header map from `(name, value)` pairs.
fn header_map(fields: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in fields {
        headers.append(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    headers
}

/// The names of kept fields, in order.
fn names(fields: &[(HeaderName, HeaderValue)]) -> Vec<&str> {
    fields.iter().map(|(name, _)| name.as_str()).collect()
}

#[test]
fn default_policy_keeps_end_to_end_headers_only() {
    let headers = header_map(&[
        ("content-type", "application/json"),
        ("connection", "close, x-hop"),
        ("keep-alive", "timeout=5"),
        ("x-hop", "1"),
        ("transfer-encoding", "chunked"),
        ("te", "trailers"),
        ("trailer", "x-checksum"),
        ("upgrade", "h2c"),
        ("proxy-authenticate", "Basic"),
        ("proxy-authorization", "Basic abc"),
        ("content-length", "12"),
        ("date", "Tue, 01 Jan 2030 00:00:00 GMT"),
        ("set-cookie", "a=1"),
        ("set-cookie", "b=2"),
        ("idempotent-replayed", "true"),
        ("idempotent-body-not-kept", "true"),
        ("content-encoding", "gzip"),
        ("x-request-id", "r1"),
        ("vary", "accept"),
        ("vary", "accept-encoding"),
    ]);
    let kept = HeaderPolicy::default().kept(&headers);
    assert_eq!(
        names(&kept),
        [
            "content-type",
            "content-encoding",
            "x-request-id",
            "vary",
            "vary"
        ]
    );
}

#[test]
fn keep_and_drop_header_adjust_the_policy_but_never_keep_hop_by_hop() {
    let headers = header_map(&[
        ("date", "Tue, 01 Jan 2030 00:00:00 GMT"),
        ("set-cookie", "a=1"),
        ("x-request-id", "r1"),
        ("transfer-encoding", "chunked"),
        ("content-length", "3"),
        ("connection", "x-hop"),
        ("x-hop", "1"),
    ]);
    let mut policy = HeaderPolicy::default();
    for name in [
        "date",
        "set-cookie",
        "transfer-encoding",
        "content-length",
        "x-hop",
    ] {
        policy.allow(HeaderName::from_static(name));
    }
    policy.deny(HeaderName::from_static("x-request-id"));
    assert_eq!(names(&policy.kept(&headers)), ["date", "set-cookie"]);
    policy.allow(HeaderName::from_static("x-request-id"));
    policy.deny(HeaderName::from_static("set-cookie"));
    assert_eq!(names(&policy.kept(&headers)), ["date", "x-request-id"]);
}

#[test]
fn not_kept_headers_leave_out_what_described_the_body() {
    let kept = HeaderPolicy::default().kept(&header_map(&[
        ("content-type", "application/json"),
        ("content-encoding", "gzip"),
        ("content-language", "en"),
        ("etag", "\"v1\""),
        ("last-modified", "Tue, 01 Jan 2030 00:00:00 GMT"),
        ("location", "/c/1"),
        ("cache-control", "no-store"),
    ]));
    let headers = not_kept_headers(&kept);
    assert_eq!(
        names(&headers),
        [
            "location",
            "cache-control",
            "content-type",
            "idempotent-body-not-kept"
        ]
    );
    assert_eq!(headers[2].1, "application/problem+json");
    assert_eq!(headers[3].1, "true");
}

#[test]
fn default_store_policy_releases_retry_later_statuses() {
    for code in [200, 201, 204, 301, 303, 400, 402, 404, 410, 412, 413, 422] {
        assert!(
            stored_by_default(StatusCode::from_u16(code).unwrap()),
            "{code}"
        );
    }
    for code in [100, 401, 403, 408, 409, 425, 429, 500, 502, 503, 504] {
        assert!(
            !stored_by_default(StatusCode::from_u16(code).unwrap()),
            "{code}"
        );
    }
}

#[test]
fn encoded_len_is_the_length_of_encode() {
    let stored = StoredResponse {
        headers: vec![
            (CONTENT_TYPE, HeaderValue::from_static("text/plain")),
            (LOCATION, HeaderValue::from_static("/c/1")),
        ],
        body: Bytes::from_static(b"hello"),
    };
    assert_eq!(
        StoredResponse::encoded_len(&stored.headers, stored.body.len()),
        stored.encode().len()
    );
}

/// An engine keeping at most `max_response_len` bytes per outcome, and a
/// lease on `("u", "k")`.
fn engine_and_lease(max_response_len: usize) -> (tempfile::TempDir, Arc<Engine>, crate::Lease) {
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        durability: Durability::None,
        background: false,
        max_response_len,
        ..Options::default()
    };
    let engine = Arc::new(Engine::open(dir.path(), options).unwrap());
    let Begin::Started(lease) = engine.begin("u", "k", Fingerprint::of(b"r")).unwrap() else {
        panic!("a new key starts");
    };
    (dir, engine, lease)
}

#[test]
fn too_large_outcome_is_stored_in_the_largest_not_kept_form_that_fits() {
    let kept = vec![(LOCATION, HeaderValue::from_static("/c/1"))];
    let note = StoredResponse {
        headers: not_kept_headers(&kept),
        body: not_kept_body(201),
    }
    .encode();
    let marker = StoredResponse {
        headers: vec![not_kept_marker()],
        body: Bytes::new(),
    }
    .encode();
    for (max, stored) in [
        (note.len(), note.clone()),
        (note.len() - 1, marker.clone()),
        (marker.len() - 1, Bytes::new()),
        (0, Bytes::new()),
    ] {
        let (_dir, engine, lease) = engine_and_lease(max);
        let stored_response = Stored {
            store: AsyncEngine::new(Arc::clone(&engine)),
            lease,
            status: 201,
            kept: kept.clone(),
            record_ttl: None,
        };
        futures::executor::block_on(
            stored_response.store_forms(Some(Bytes::from(vec![b'x'; 4096]))),
        )
        .unwrap();
        let Begin::Replay(outcome) = engine.begin("u", "k", Fingerprint::of(b"r")).unwrap() else {
            panic!("completed");
        };
        assert_eq!((outcome.status, &outcome.body), (201, &stored), "max {max}");
        let replayed = replay(&outcome);
        assert_eq!(replayed.status(), StatusCode::CREATED);
        assert_eq!(replayed.headers()[&IDEMPOTENT_BODY_NOT_KEPT], "true");
        assert_eq!(replayed.headers()[&IDEMPOTENT_REPLAYED], "true");
    }
}

#[test]
fn claim_dropped_outside_a_runtime_releases_the_key_at_once() {
    let (_dir, engine, lease) = engine_and_lease(1 << 20);
    drop(Claim::new(AsyncEngine::new(Arc::clone(&engine)), lease));
    assert!(engine.get("u", "k").unwrap().is_none());
    // Disarmed, it leaves the lease alone.
    let Begin::Started(lease) = engine.begin("u", "k", Fingerprint::of(b"r")).unwrap() else {
        panic!("released");
    };
    let _lease = Claim::new(AsyncEngine::new(Arc::clone(&engine)), lease).into_lease();
    assert!(engine.get("u", "k").unwrap().is_some());
}

/// The engine as a store that can release only asynchronously (the
/// trait's provided `release_now`, `heartbeat` and `begin_waited`), as a
/// remote store does.
#[derive(Clone)]
struct AsyncOnly(AsyncEngine);

impl IdempotencyStore for AsyncOnly {
    fn begin(
        &self,
        user: &[u8],
        key: &[u8],
        fingerprint: Fingerprint,
    ) -> impl Future<Output = crate::Result<Begin>> + Send {
        IdempotencyStore::begin(&self.0, user, key, fingerprint)
    }

    fn begin_wait(
        &self,
        user: &[u8],
        key: &[u8],
        fingerprint: Fingerprint,
        timeout: Duration,
    ) -> impl Future<Output = crate::Result<Begin>> + Send {
        IdempotencyStore::begin_wait(&self.0, user, key, fingerprint, timeout)
    }

    fn wait(
        &self,
        user: &[u8],
        key: &[u8],
        fingerprint: Fingerprint,
        timeout: Duration,
    ) -> impl Future<Output = crate::Result<Option<crate::Outcome>>> + Send {
        IdempotencyStore::wait(&self.0, user, key, fingerprint, timeout)
    }

    fn complete(
        &self,
        lease: &crate::Lease,
        outcome: crate::Outcome,
    ) -> impl Future<Output = crate::Result<()>> + Send {
        IdempotencyStore::complete(&self.0, lease, outcome)
    }

    fn complete_with_ttl(
        &self,
        lease: &crate::Lease,
        outcome: crate::Outcome,
        ttl: Duration,
    ) -> impl Future<Output = crate::Result<()>> + Send {
        IdempotencyStore::complete_with_ttl(&self.0, lease, outcome, ttl)
    }

    fn release(&self, lease: &crate::Lease) -> impl Future<Output = crate::Result<()>> + Send {
        IdempotencyStore::release(&self.0, lease)
    }

    fn extend(
        &self,
        lease: &crate::Lease,
        by: Duration,
    ) -> impl Future<Output = crate::Result<crate::Lease>> + Send {
        IdempotencyStore::extend(&self.0, lease, by)
    }

    fn outcome(
        &self,
        user: &[u8],
        key: &[u8],
    ) -> impl Future<Output = crate::Result<Option<crate::Outcome>>> + Send {
        IdempotencyStore::outcome(&self.0, user, key)
    }

    fn get(
        &self,
        user: &[u8],
        key: &[u8],
    ) -> impl Future<Output = crate::Result<Option<crate::RecordView>>> + Send {
        IdempotencyStore::get(&self.0, user, key)
    }

    fn lease_ttl(&self) -> Duration {
        IdempotencyStore::lease_ttl(&self.0)
    }
}

#[test]
fn claim_dropped_on_a_store_without_release_now_is_released_on_a_task() {
    let (_dir, engine, lease) = engine_and_lease(1 << 20);
    let store = AsyncOnly(AsyncEngine::new(Arc::clone(&engine)));
    // Outside a runtime nothing can run the release: the lease expires.
    drop(Claim::new(store.clone(), lease.clone()));
    assert!(engine.get("u", "k").unwrap().is_some());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        drop(Claim::new(store, lease));
        for _ in 0..1000 {
            if engine.get("u", "k").unwrap().is_none() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("the dropped claim's key was never released");
    });
}
