//! Keys that do not come from the `Idempotency-Key` header: derived from
//! the request ([`derived_key`]), or read from its body by the service's
//! `key_from` ([`body_key`]).

use bytes::Bytes;
use http::request::Parts;

use super::handle::engine_key;
use crate::Fingerprint;

/// The prefix of every derived key
/// ([`IdempotencyLayer::derive_missing_keys`](super::IdempotencyLayer::derive_missing_keys)):
/// a derived key is `derived:` and 32 lowercase hex digits, as the engine
/// stores it and as the CLI's `dump` and `get` show it (`dump` adds
/// `"derived":true`). No key a client sends is stored with this prefix: a
/// client key that starts with `derived:` has its `d` written `%64`.
pub const DERIVED_KEY_PREFIX: &str = "derived:";

/// The derived key of a request of `user`: [`DERIVED_KEY_PREFIX`] and the
/// xxh3-128 hash, as 32 lowercase hex digits, of
///
/// ```text
/// user length (u64 LE) ‖ user ‖ METHOD ␠ PATH-AND-QUERY ␤ ‖ fingerprint (u128 LE)
/// ```
///
/// where the fingerprint is the request's (by default it covers the
/// method, the target and the whole body). Stable across versions and
/// restarts; the same for identical requests of one user, different when
/// the user, method, path, query or body differ.
pub(super) fn derived_key(user: &str, parts: &Parts, fingerprint: Fingerprint) -> Bytes {
    let target = parts
        .uri
        .path_and_query()
        .map_or(parts.uri.path(), |pq| pq.as_str());
    let method = parts.method.as_str();
    let mut bytes = Vec::with_capacity(8 + user.len() + method.len() + target.len() + 2 + 16);
    bytes.extend_from_slice(&(user.len() as u64).to_le_bytes());
    bytes.extend_from_slice(user.as_bytes());
    bytes.extend_from_slice(method.as_bytes());
    bytes.push(b' ');
    bytes.extend_from_slice(target.as_bytes());
    bytes.push(b'\n');
    bytes.extend_from_slice(&fingerprint.as_u128().to_le_bytes());
    let digest = xxhash_rust::xxh3::xxh3_128(&bytes);
    Bytes::from(format!("{DERIVED_KEY_PREFIX}{digest:032x}"))
}

/// A key `key_from` found in the body, as the engine is given it
/// ([`engine_key`], as for a header key): `None` if it is empty or not
/// printable ASCII (0x20-0x7E). Its length is the engine's to check.
pub(super) fn body_key(key: &str) -> Option<Bytes> {
    let bytes = key.as_bytes();
    let printable = bytes.iter().all(|b| (0x20..=0x7e).contains(b));
    (!bytes.is_empty() && printable).then(|| engine_key(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Method, Request};

    fn parts(method: Method, uri: &str) -> Parts {
        Request::builder()
            .method(method)
            .uri(uri)
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    #[test]
    fn derived_key_is_prefixed_hex_and_separates_user_method_target_and_body() {
        let fp = Fingerprint::of(b"body");
        let key = derived_key("alice", &parts(Method::POST, "/charge"), fp);
        let text = std::str::from_utf8(&key).unwrap();
        let hex = text.strip_prefix(DERIVED_KEY_PREFIX).unwrap();
        assert_eq!(hex.len(), 32);
        assert!(
            hex.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        // Stable: the same inputs, the same key.
        assert_eq!(
            key,
            derived_key("alice", &parts(Method::POST, "/charge"), fp)
        );
        let others = [
            derived_key("bob", &parts(Method::POST, "/charge"), fp),
            derived_key("alice", &parts(Method::PATCH, "/charge"), fp),
            derived_key("alice", &parts(Method::POST, "/refund"), fp),
            derived_key("alice", &parts(Method::POST, "/charge?x=1"), fp),
            derived_key(
                "alice",
                &parts(Method::POST, "/charge"),
                Fingerprint::of(b"x"),
            ),
            // The user's length is part of the hash: no shift between
            // user and method collides.
            derived_key("aliceP", &parts(Method::OPTIONS, "/charge"), fp),
        ];
        for other in others {
            assert_ne!(key, other);
        }
    }

    #[test]
    fn body_keys_are_printable_ascii_encoded_as_header_keys() {
        assert_eq!(body_key("m-17").as_deref(), Some(&b"m-17"[..]));
        assert_eq!(body_key("order 7").as_deref(), Some(&b"order%207"[..]));
        assert_eq!(body_key(""), None);
        assert_eq!(body_key("a\tb"), None);
        assert_eq!(body_key("é"), None);
    }

    #[test]
    fn a_client_key_never_looks_derived() {
        let derived = derived_key("u", &parts(Method::POST, "/"), Fingerprint::of(b""));
        let spoof = std::str::from_utf8(&derived).unwrap();
        for key in [engine_key(spoof.as_bytes()), body_key(spoof).unwrap()] {
            assert!(!key.starts_with(DERIVED_KEY_PREFIX.as_bytes()));
            assert!(key.starts_with(b"%64erived:"));
        }
        // Only a leading prefix is escaped.
        assert_eq!(&engine_key(b"x-derived:1")[..], b"x-derived:1");
        assert_eq!(&engine_key(b"derive")[..], b"derive");
    }
}
