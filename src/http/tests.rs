//! Unit tests of the stored-response encoding and header parsing.

use super::handle::*;
use super::stored::*;
use super::*;
use crate::Fingerprint;
use http::{HeaderMap, HeaderValue};

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
    let parse = |values: &[&'static str]| {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(IDEMPOTENCY_KEY, HeaderValue::from_static(v));
        }
        match idempotency_key(&headers) {
            KeyHeader::Missing => "missing".to_owned(),
            KeyHeader::Invalid => "invalid".to_owned(),
            KeyHeader::Key(k) => String::from_utf8(k.to_vec()).unwrap(),
        }
    };
    assert_eq!(parse(&[]), "missing");
    assert_eq!(parse(&["abc"]), "abc");
    assert_eq!(parse(&["\"8e03978e-40d5\""]), "8e03978e-40d5");
    assert_eq!(parse(&[r#""a\"b\\c""#]), r#"a"b\c"#);
    assert_eq!(parse(&["\"abc"]), "invalid");
    assert_eq!(parse(&["\"a\"b"]), "invalid");
    assert_eq!(parse(&[r#""a\x""#]), "invalid");
    assert_eq!(parse(&["a", "b"]), "invalid");
}
