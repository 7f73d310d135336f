//! Which requests are "the same request": the default fingerprint
//! ([`request_fingerprint`]), a caller's own
//! ([`IdempotencyLayer::fingerprint_with`]), and, with the `json` feature,
//! one over chosen fields of a JSON body (`json_fields`).

use std::sync::Arc;

use axum::body::Body;
use bytes::Bytes;
use http::request::Parts;
use http::{Response, StatusCode};

use super::stored::problem;
use super::{Config, IdempotencyLayer, request_fingerprint};
use crate::{Fingerprint, IdempotencyStore};

/// How the layer fingerprints a request when told to by `fingerprint_with`.
pub(super) type FingerprintFn =
    dyn Fn(&Parts, &Bytes) -> Result<Fingerprint, FingerprintError> + Send + Sync;

impl<S: IdempotencyStore> IdempotencyLayer<S> {
    /// Fingerprints each request with `fingerprint` instead of the default
    /// [`request_fingerprint`] (method, path and query, and the whole
    /// body): two requests with one key are the same request (a retry is
    /// replayed) when their fingerprints are equal, and a `422` mismatch
    /// otherwise. `fingerprint` gets the request's parts and its whole body
    /// (as buffered, up to [`max_body_bytes`](Self::max_body_bytes)), and
    /// returns a [`Fingerprint`]; or, to refuse a request it cannot read, a
    /// `Result<Fingerprint, FingerprintError>`, whose error is answered
    /// `400` with a problem body before the key is claimed (see
    /// [`IntoFingerprint`]).
    ///
    /// Use it to leave out what changes on every retry (a timestamp or a
    /// trace id in the body): a fingerprint over less than the whole
    /// request treats requests that differ elsewhere as the same request,
    /// so include everything that makes two requests different operations,
    /// the method and path included. For JSON bodies,
    /// `json_fields` (feature `json`) is ready made.
    ///
    /// ```no_run
    /// # use std::sync::Arc;
    /// # use idemkv::{Engine, Fingerprint, Options, http::{IdempotencyLayer, request_fingerprint}};
    /// # let engine = Arc::new(Engine::open("/tmp/idem", Options::default()).unwrap());
    /// // Form bodies whose last line is a client timestamp: leave it out.
    /// let layer = IdempotencyLayer::new(engine)
    ///     .fixed_user("tenant")
    ///     .fingerprint_with(|parts, body| {
    ///         let end = body.iter().rposition(|&b| b == b'\n').unwrap_or(body.len());
    ///         request_fingerprint(&parts.method, &parts.uri, &body[..end])
    ///     });
    /// ```
    pub fn fingerprint_with<F, R>(self, fingerprint: F) -> IdempotencyLayer<S>
    where
        F: Fn(&Parts, &Bytes) -> R + Send + Sync + 'static,
        R: IntoFingerprint,
    {
        let fingerprint: Arc<FingerprintFn> = Arc::new(move |parts: &Parts, body: &Bytes| {
            fingerprint(parts, body).into_fingerprint()
        });
        self.with(|c| c.fingerprint = Some(fingerprint))
    }
}

/// What a [`IdempotencyLayer::fingerprint_with`] function returns: a
/// [`Fingerprint`], or a `Result<Fingerprint, FingerprintError>` for a
/// function that may refuse a request (as `json_fields`
/// refuses a body that is not JSON).
///
/// `fingerprint_with` takes any `Fn(&Parts, &Bytes) -> R` with `R:
/// IntoFingerprint`, rather than a trait of its own for fingerprinters, so
/// that a plain closure `|parts, body| ...` has its argument types
/// inferred, and a function that can fail is still a function.
pub trait IntoFingerprint {
    /// The fingerprint, or why the request is refused.
    ///
    /// # Errors
    /// The [`FingerprintError`] the function returned: the request gets
    /// `400`.
    fn into_fingerprint(self) -> Result<Fingerprint, FingerprintError>;
}

impl IntoFingerprint for Fingerprint {
    fn into_fingerprint(self) -> Result<Fingerprint, FingerprintError> {
        Ok(self)
    }
}

impl IntoFingerprint for Result<Fingerprint, FingerprintError> {
    fn into_fingerprint(self) -> Result<Fingerprint, FingerprintError> {
        self
    }
}

/// Why a fingerprint function refused a request: the layer answers `400`
/// with a problem body and does not claim the key or run the handler.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FingerprintError {
    /// The body is not JSON (it is empty, truncated, or not JSON syntax).
    #[error("the request body is not JSON (at line {line}, column {column})")]
    NotJson {
        /// The line of the body where parsing failed (1-based).
        line: usize,
        /// The column in that line (1-based; 0 at the end of the body).
        column: usize,
    },
    /// The body is JSON, but not an object, so it has no fields.
    #[error("the request body is JSON but not an object")]
    NotJsonObject,
}

impl FingerprintError {
    /// The `400` problem answered for this refusal.
    pub(super) fn response(&self) -> Response<Body> {
        match self {
            FingerprintError::NotJson { .. } => problem(
                StatusCode::BAD_REQUEST,
                "Request body is not JSON",
                "This operation identifies a request by fields of its JSON body, and the body is not valid JSON.",
            ),
            FingerprintError::NotJsonObject => problem(
                StatusCode::BAD_REQUEST,
                "Request body is not a JSON object",
                "This operation identifies a request by fields of its JSON body, and the body is not a JSON object.",
            ),
        }
    }
}

/// The fingerprint of a request: the configured function's, else
/// [`request_fingerprint`]'s.
pub(super) fn fingerprint<St: IdempotencyStore>(
    config: &Config<St>,
    parts: &Parts,
    body: &Bytes,
) -> Result<Fingerprint, FingerprintError> {
    match &config.fingerprint {
        None => Ok(request_fingerprint(&parts.method, &parts.uri, body)),
        Some(fingerprint) => fingerprint(parts, body),
    }
}
