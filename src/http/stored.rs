//! Stored responses (status, kept headers, body) and the canned answers.

use crate::Outcome;
use axum::body::Body;
use bytes::{BufMut, Bytes, BytesMut};
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue, RETRY_AFTER};
use http::{Response, StatusCode};
use std::time::Duration;

use super::*;

/// A response as the layer stores it: the kept headers and the body (the
/// status is [`Outcome::status`](crate::Outcome::status)). See the module documentation for the
/// byte format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredResponse {
    /// The kept header fields, in order; a name may repeat.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The response body.
    pub body: Bytes,
}

/// The first bytes of an encoded [`StoredResponse`]: magic and version 1.
pub(super) const MAGIC: &[u8; 4] = b"IKH1";

impl StoredResponse {
    /// The length of [`StoredResponse::encode`]'s output for `headers` and
    /// a body of `body_len` bytes.
    pub(super) fn encoded_len(headers: &[(HeaderName, HeaderValue)], body_len: usize) -> usize {
        let fields: usize = headers
            .iter()
            .filter(|(name, value)| {
                u16::try_from(name.as_str().len()).is_ok() && u32::try_from(value.len()).is_ok()
            })
            .take(usize::from(u16::MAX))
            .map(|(name, value)| 6 + name.as_str().len() + value.len())
            .sum();
        MAGIC.len() + 2 + fields + body_len
    }

    /// Encodes the response into the bytes stored as [`Outcome::body`](crate::Outcome::body).
    /// Header fields past the 65 535th, and any whose name or value does
    /// not fit its length field, are left out.
    pub fn encode(&self) -> Bytes {
        let fields: Vec<(&[u8], &[u8], u16, u32)> = self
            .headers
            .iter()
            .filter_map(|(name, value)| {
                let (name, value) = (name.as_str().as_bytes(), value.as_bytes());
                let name_len = u16::try_from(name.len()).ok()?;
                let value_len = u32::try_from(value.len()).ok()?;
                Some((name, value, name_len, value_len))
            })
            .take(usize::from(u16::MAX))
            .collect();
        let size = MAGIC.len()
            + 2
            + fields
                .iter()
                .map(|(name, value, _, _)| 6 + name.len() + value.len())
                .sum::<usize>()
            + self.body.len();
        let mut out = BytesMut::with_capacity(size);
        out.put_slice(MAGIC);
        out.put_u16(u16::try_from(fields.len()).unwrap_or(u16::MAX));
        for (name, value, name_len, value_len) in fields {
            out.put_u16(name_len);
            out.put_slice(name);
            out.put_u32(value_len);
            out.put_slice(value);
        }
        out.put_slice(&self.body);
        out.freeze()
    }

    /// Decodes bytes made by [`StoredResponse::encode`]; `None` if they are
    /// not such bytes (wrong magic, truncated, an invalid header). The body
    /// shares `bytes`' memory.
    pub fn decode(bytes: &Bytes) -> Option<StoredResponse> {
        let mut reader = Reader { bytes, at: 0 };
        if reader.take(MAGIC.len())? != MAGIC {
            return None;
        }
        let count = reader.u16()?;
        let mut headers = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let name_len = usize::from(reader.u16()?);
            let name = HeaderName::from_bytes(reader.take(name_len)?).ok()?;
            let value_len = usize::try_from(reader.u32()?).ok()?;
            let value = HeaderValue::from_bytes(reader.take(value_len)?).ok()?;
            headers.push((name, value));
        }
        Some(StoredResponse {
            headers,
            body: bytes.slice(reader.at..),
        })
    }
}

/// A cursor over encoded bytes.
pub(super) struct Reader<'a> {
    bytes: &'a Bytes,
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let slice = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(slice)
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
}

/// The stored response, with `Idempotent-Replayed: true`. An empty stored
/// body (a response too large to keep even as a note) is the status with
/// `Idempotent-Body-Not-Kept: true`.
pub(super) fn replay(outcome: &Outcome) -> Response<Body> {
    let stored = if outcome.body.is_empty() {
        let (name, value) = super::headers::not_kept_marker();
        Some(StoredResponse {
            headers: vec![(name, value)],
            body: Bytes::new(),
        })
    } else {
        StoredResponse::decode(&outcome.body)
    };
    let (Ok(status), Some(stored)) = (StatusCode::from_u16(outcome.status), stored) else {
        return problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Stored response is unreadable",
            "The response stored for this Idempotency-Key could not be decoded.",
        );
    };
    let mut response = Response::new(Body::from(stored.body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    for (name, value) in stored.headers {
        headers.append(name, value);
    }
    headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    response
}

/// `409` with `Retry-After`.
pub(super) fn conflict(retry_after: Duration) -> Response<Body> {
    let mut response = problem(
        StatusCode::CONFLICT,
        "Request in progress",
        "A request with this Idempotency-Key is still being processed; retry after Retry-After seconds.",
    );
    response.headers_mut().insert(
        RETRY_AFTER,
        HeaderValue::from(retry_after_secs(retry_after)),
    );
    response
}

/// Whole seconds for `Retry-After`: rounded up, at least 1.
pub(super) fn retry_after_secs(retry_after: Duration) -> u64 {
    let secs = retry_after
        .as_secs()
        .saturating_add(u64::from(retry_after.subsec_nanos() > 0));
    secs.max(1)
}

/// `400` for a malformed key.
pub(super) fn bad_key() -> Response<Body> {
    problem(
        StatusCode::BAD_REQUEST,
        "Idempotency-Key is invalid",
        "The Idempotency-Key header must occur once and hold a non-empty string (printable ASCII) within the length limit.",
    )
}

/// An `application/problem+json` response. `title` and `detail` are
/// constants without characters that need JSON escaping.
pub(super) fn problem(
    status: StatusCode,
    title: &'static str,
    detail: &'static str,
) -> Response<Body> {
    let body = format!(
        r#"{{"title":"{title}","status":{},"detail":"{detail}"}}"#,
        status.as_u16()
    );
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    response
}
