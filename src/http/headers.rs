//! Which response headers are stored and replayed.

use http::HeaderMap;
use http::header::{
    CONNECTION, CONTENT_TYPE, DATE, ETAG, HeaderName, HeaderValue, LAST_MODIFIED, SET_COOKIE,
};

use super::{IDEMPOTENT_BODY_NOT_KEPT, IDEMPOTENT_REPLAYED};

/// The hop-by-hop headers (RFC 9110 section 7.6.1, plus the legacy
/// `keep-alive`, `proxy-connection` and `trailers`): they describe one
/// connection, never a stored response, so they are never kept.
const HOP_BY_HOP: [&str; 11] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
    // Not hop-by-hop, but never kept either: a replay's body is sent
    // whole, and hyper writes its length.
    "content-length",
];

/// Which response headers a stored response keeps.
///
/// # Invariants
/// A name is in at most one of `allow` and `deny`: the later of
/// [`HeaderPolicy::allow`] and [`HeaderPolicy::deny`] for a name wins.
#[derive(Clone, Debug, Default)]
pub(super) struct HeaderPolicy {
    /// Headers dropped by default that are kept anyway (`keep_header`).
    allow: Vec<HeaderName>,
    /// Headers kept by default that are dropped (`drop_header`).
    deny: Vec<HeaderName>,
}

impl HeaderPolicy {
    /// Keeps `name` (unless it is never kept).
    pub(super) fn allow(&mut self, name: HeaderName) {
        self.deny.retain(|n| *n != name);
        if !self.allow.contains(&name) {
            self.allow.push(name);
        }
    }

    /// Drops `name`.
    pub(super) fn deny(&mut self, name: HeaderName) {
        self.allow.retain(|n| *n != name);
        if !self.deny.contains(&name) {
            self.deny.push(name);
        }
    }

    /// Whether a header called `name` is kept, before the `Connection`
    /// header of the response is taken into account.
    pub(super) fn keeps(&self, name: &HeaderName) -> bool {
        if never_kept(name) || self.deny.contains(name) {
            return false;
        }
        self.allow.contains(name) || !dropped_by_default(name)
    }

    /// The header fields of `headers` this policy keeps, in the response's
    /// order. Headers named in the response's `Connection` header are
    /// hop-by-hop too and are left out.
    pub(super) fn kept(&self, headers: &HeaderMap) -> Vec<(HeaderName, HeaderValue)> {
        let connection = connection_named(headers);
        headers
            .iter()
            .filter(|(name, _)| self.keeps(name) && !connection.contains(name))
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect()
    }
}

/// Hop-by-hop headers, `content-length`, and the layer's own markers.
fn never_kept(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name.as_str())
        || *name == IDEMPOTENT_REPLAYED
        || *name == IDEMPOTENT_BODY_NOT_KEPT
}

/// `date` (a replay is a new message; hyper dates it) and `set-cookie` (a
/// session must not be handed to whoever replays the key).
fn dropped_by_default(name: &HeaderName) -> bool {
    *name == DATE || *name == SET_COOKIE
}

/// The header names listed in the `Connection` header(s).
fn connection_named(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|list| list.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect()
}

/// The headers stored with a body that was not kept: `kept` without the
/// ones that describe the original body (`content-*`, `etag`,
/// `last-modified`), then `content-type: application/problem+json` and
/// `Idempotent-Body-Not-Kept: true`.
pub(super) fn not_kept_headers(
    kept: &[(HeaderName, HeaderValue)],
) -> Vec<(HeaderName, HeaderValue)> {
    let mut headers: Vec<(HeaderName, HeaderValue)> = kept
        .iter()
        .filter(|(name, _)| {
            !(name.as_str().starts_with("content-") || *name == ETAG || *name == LAST_MODIFIED)
        })
        .cloned()
        .collect();
    headers.push((
        CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    ));
    headers.push(not_kept_marker());
    headers
}

/// `Idempotent-Body-Not-Kept: true`.
pub(super) fn not_kept_marker() -> (HeaderName, HeaderValue) {
    (IDEMPOTENT_BODY_NOT_KEPT, HeaderValue::from_static("true"))
}
