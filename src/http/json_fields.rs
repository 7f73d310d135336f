//! [`json_fields`]: a request fingerprint over chosen fields of a JSON
//! body (feature `json`).

use std::sync::Arc;

use bytes::Bytes;
use http::request::Parts;
use serde_json::Value;

use super::FingerprintError;
use crate::Fingerprint;

/// The first line of the bytes a [`json_fields`] fingerprint hashes: the
/// encoding's name and version.
const TAG: &[u8] = b"idemkv json_fields v1\n";

/// A fingerprint function for [`IdempotencyLayer::fingerprint_with`](super::IdempotencyLayer::fingerprint_with)
/// over the request's method, path and query, and the fields of its JSON
/// body named by `paths`; every other field is left out, so a retry whose
/// body differs only in, say, a timestamp or a trace id is the same
/// request.
///
/// ```no_run
/// # use std::sync::Arc;
/// # use idemkv::{Engine, Options, http::{IdempotencyLayer, json_fields}};
/// # let engine = Arc::new(Engine::open("/tmp/idem", Options::default()).unwrap());
/// let layer = IdempotencyLayer::new(engine)
///     .fixed_user("tenant")
///     .fingerprint_with(json_fields(&["amount", "currency", "customer.id"]));
/// ```
///
/// - **Paths** are dotted: `customer.id` is the member `id` of the
///   member `customer` of the body (an object). A segment that is a
///   decimal number also indexes an array (`items.0.sku`). A member whose
///   name holds a `.` cannot be named.
/// - **A body that is not JSON**, or is JSON but not an object, is refused:
///   the request gets `400` (a problem body) and its key is not claimed
///   ([`FingerprintError::NotJson`], [`FingerprintError::NotJsonObject`]).
/// - **Canonical**: the order of members and the whitespace of the body do
///   not matter, nor how a string is escaped (`"\u00e9"` is `"é"`). A
///   member given twice counts with its last value. Numbers count as
///   written by type: `10` and `10.0` differ.
/// - **Absent is not null**: a path the body does not reach and a path
///   whose value is `null` give different fingerprints, and so do each of
///   them and any other value.
/// - **The request target counts**: the method and the path with its query
///   (as in [`request_fingerprint`](super::request_fingerprint)) are part
///   of the fingerprint, so two endpoints that take the same fields never
///   share a record, and neither do two queries.
/// - The order of `paths` does not matter, and a path listed twice counts
///   once: the fingerprint does not change when the list is reordered.
///
/// The fingerprint is `Fingerprint::of` these bytes (integers unsigned
/// 32-bit little-endian):
///
/// ```text
/// "idemkv json_fields v1" ␤
/// METHOD ␠ PATH-AND-QUERY ␤
/// for each path, in byte order of the path:
///   len(path) path
///   0x00                         if the body has no value there
///   0x01 len(value) value        else: the value as canonical JSON
/// ```
///
/// where canonical JSON has no whitespace, object members sorted by name
/// (byte order), and strings and numbers as `serde_json` writes them.
pub fn json_fields(
    paths: &[&str],
) -> impl Fn(&Parts, &Bytes) -> Result<Fingerprint, FingerprintError> + Clone + Send + Sync + 'static
{
    let mut paths: Vec<String> = paths.iter().map(|&path| path.to_owned()).collect();
    paths.sort_unstable();
    paths.dedup();
    let paths: Arc<[String]> = paths.into();
    move |parts: &Parts, body: &Bytes| fingerprint(&paths, parts, body)
}

/// The [`json_fields`] fingerprint of a request over `paths` (sorted,
/// without duplicates).
fn fingerprint(
    paths: &[String],
    parts: &Parts,
    body: &Bytes,
) -> Result<Fingerprint, FingerprintError> {
    let root: Value = serde_json::from_slice(body).map_err(|e| FingerprintError::NotJson {
        line: e.line(),
        column: e.column(),
    })?;
    if !root.is_object() {
        return Err(FingerprintError::NotJsonObject);
    }
    let target = parts
        .uri
        .path_and_query()
        .map_or(parts.uri.path(), |pq| pq.as_str());
    let mut bytes = Vec::with_capacity(TAG.len() + target.len() + 64);
    bytes.extend_from_slice(TAG);
    bytes.extend_from_slice(parts.method.as_str().as_bytes());
    bytes.push(b' ');
    bytes.extend_from_slice(target.as_bytes());
    bytes.push(b'\n');
    let mut value_bytes = Vec::new();
    for path in paths {
        put_len(&mut bytes, path.len());
        bytes.extend_from_slice(path.as_bytes());
        match lookup(&root, path) {
            None => bytes.push(0),
            Some(value) => {
                value_bytes.clear();
                canonical(value, &mut value_bytes);
                bytes.push(1);
                put_len(&mut bytes, value_bytes.len());
                bytes.extend_from_slice(&value_bytes);
            }
        }
    }
    Ok(Fingerprint::of(&bytes))
}

/// Appends `len` as an unsigned 32-bit little-endian integer (saturating:
/// a body is far smaller than 4 GiB, `max_body_bytes` sees to that).
fn put_len(out: &mut Vec<u8>, len: usize) {
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
}

/// The value at dotted `path` in `root`, if the body reaches it.
fn lookup<'a>(root: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.')
        .try_fold(root, |value, segment| match value {
            Value::Object(members) => members.get(segment),
            Value::Array(items) => segment
                .parse::<usize>()
                .ok()
                .filter(|_| segment.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|index| items.get(index)),
            _ => None,
        })
}

/// Writes `value` as canonical JSON: no whitespace, members sorted by name.
/// (Recursion is bounded by `serde_json`'s nesting limit of 128.)
fn canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(number) => out.extend_from_slice(number.to_string().as_bytes()),
        Value::String(string) => string_to(string, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical(item, out);
            }
            out.push(b']');
        }
        Value::Object(members) => {
            let mut members: Vec<(&String, &Value)> = members.iter().collect();
            members.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (name, member)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                string_to(name, out);
                out.push(b':');
                canonical(member, out);
            }
            out.push(b'}');
        }
    }
}

/// Writes `string` as a JSON string, escaped as `serde_json` escapes it.
fn string_to(string: &str, out: &mut Vec<u8>) {
    // Writing to a `Vec` cannot fail; a failure would only shorten the
    // fingerprint's input, never panic.
    let _ = serde_json::to_writer(&mut *out, string);
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn parts(method: &str, uri: &str) -> Parts {
        Request::builder()
            .method(method)
            .uri(uri)
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    fn fp(paths: &[&str], uri: &str, body: &str) -> Result<Fingerprint, FingerprintError> {
        json_fields(paths)(&parts("POST", uri), &Bytes::from(body.to_owned()))
    }

    #[test]
    fn member_order_whitespace_and_escapes_do_not_matter() {
        let paths = ["a", "b"];
        let one = fp(&paths, "/x", r#"{"a":{"y":1,"x":"é"},"b":[1,2]}"#).unwrap();
        let two = fp(
            &paths,
            "/x",
            "{ \"b\" : [1, 2],\n \"a\": {\"x\": \"\\u00e9\", \"y\": 1}, \"t\": 9 }",
        )
        .unwrap();
        assert_eq!(one, two);
    }

    #[test]
    fn absent_null_and_values_all_differ() {
        let paths = ["a.b"];
        let absent = fp(&paths, "/x", r#"{"a":{}}"#).unwrap();
        let not_reached = fp(&paths, "/x", r#"{"a":3}"#).unwrap();
        let null = fp(&paths, "/x", r#"{"a":{"b":null}}"#).unwrap();
        let zero = fp(&paths, "/x", r#"{"a":{"b":0}}"#).unwrap();
        let string = fp(&paths, "/x", r#"{"a":{"b":"null"}}"#).unwrap();
        assert_eq!(absent, not_reached);
        assert_ne!(absent, null);
        assert_ne!(null, zero);
        assert_ne!(null, string);
    }

    #[test]
    fn method_path_and_query_count_but_the_order_of_paths_does_not() {
        let body = r#"{"a":1}"#;
        let base = fp(&["a", "b"], "/x", body).unwrap();
        assert_eq!(base, fp(&["b", "a", "a"], "/x", body).unwrap());
        assert_ne!(base, fp(&["a", "b"], "/y", body).unwrap());
        assert_ne!(base, fp(&["a", "b"], "/x?q=1", body).unwrap());
        let put = json_fields(&["a", "b"])(&parts("PUT", "/x"), &Bytes::from(body)).unwrap();
        assert_ne!(base, put);
        // The list of paths is part of the fingerprint.
        assert_ne!(base, fp(&["a"], "/x", body).unwrap());
    }

    #[test]
    fn numeric_segments_index_arrays() {
        let paths = ["items.1.sku"];
        let one = fp(&paths, "/x", r#"{"items":[{"sku":"a"},{"sku":"b"}]}"#).unwrap();
        let two = fp(&paths, "/x", r#"{"items":[{"sku":"z"},{"sku":"b"}]}"#).unwrap();
        let three = fp(&paths, "/x", r#"{"items":[{"sku":"a"},{"sku":"c"}]}"#).unwrap();
        assert_eq!(one, two);
        assert_ne!(one, three);
        let signed = fp(
            &["items.+1.sku"],
            "/x",
            r#"{"items":[{"sku":"a"},{"sku":"b"}]}"#,
        );
        let absent = fp(&["items.+1.sku"], "/x", r#"{"items":[]}"#);
        assert_eq!(signed.unwrap(), absent.unwrap());
    }

    #[test]
    fn bodies_that_are_not_json_objects_are_refused() {
        assert!(matches!(
            fp(&["a"], "/x", ""),
            Err(FingerprintError::NotJson { .. })
        ));
        assert!(matches!(
            fp(&["a"], "/x", "a=1"),
            Err(FingerprintError::NotJson { .. })
        ));
        assert!(matches!(
            fp(&["a"], "/x", r#"{"a":1"#),
            Err(FingerprintError::NotJson { .. })
        ));
        assert_eq!(
            fp(&["a"], "/x", "[1]"),
            Err(FingerprintError::NotJsonObject)
        );
        assert_eq!(fp(&["a"], "/x", "7"), Err(FingerprintError::NotJsonObject));
    }
}
