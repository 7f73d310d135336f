//! The settings for rolling the layer out to a running service (observe
//! mode, derived keys, keys from the body) and their builder methods. What
//! they do is in `rollout.md`, part of the module documentation.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;

use super::IdempotencyLayer;
use super::observe::{Counters, ObservedCounts};
use crate::IdempotencyStore;

/// How a key is read from a request's parts and buffered body.
pub(super) type KeyFromFn = dyn Fn(&Parts, &Bytes) -> Option<String> + Send + Sync;

/// The rollout settings of a layer.
#[derive(Clone, Default)]
pub(super) struct Rollout {
    /// Observe mode: every request runs its handler untouched.
    pub(super) observe: bool,
    /// The record TTL of derived keys; `None`: no key is derived.
    pub(super) derive: Option<Duration>,
    /// Where a request without the header finds its key in the body.
    pub(super) key_from: Option<Arc<KeyFromFn>>,
    /// What the layer answered (or, observing, would have answered):
    /// shared by every clone of the layer.
    pub(super) counts: Arc<Counters>,
}

impl Rollout {
    /// Whether a request without the header may still get a key (from its
    /// body or derived), so its body is read before that is decided.
    pub(super) fn finds_keys(&self) -> bool {
        self.key_from.is_some() || self.derive.is_some()
    }
}

impl fmt::Debug for Rollout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rollout")
            .field("observe", &self.observe)
            .field("derive", &self.derive)
            .field("key_from", &self.key_from.is_some())
            .finish_non_exhaustive()
    }
}

impl<S: IdempotencyStore> IdempotencyLayer<S> {
    /// Observe mode (`true`) or enforcement (`false`, the default).
    ///
    /// In observe mode every handled request runs the inner service and
    /// gets its response unchanged: no replay, no `409`, `422`, `400` or
    /// `413` from the layer, no added header. The engine still records
    /// each key as enforcement would (a new key is begun and completed
    /// with the response, or released), and the layer reports what
    /// enforcement would have answered, in [`observed`](Self::observed)
    /// and in `tracing` events (feature `tracing`). A retry of a completed
    /// key, a duplicate of a key in flight and the reuse of a key for
    /// another request run the handler too and store nothing: the first
    /// stored response stays. A layer without observe mode on the same
    /// engine later enforces on those records. See the module
    /// documentation, "Rolling out".
    pub fn observe_only(self, observe: bool) -> IdempotencyLayer<S> {
        self.with(|c| c.rollout.observe = observe)
    }

    /// What the layer answered, by kind, since it was built: in observe
    /// mode what enforcement would have answered. The counters are shared
    /// by the clones of the layer and the services it made (and by layers
    /// made from it with a builder method); reading them is a few relaxed
    /// atomic loads.
    pub fn observed(&self) -> ObservedCounts {
        self.config.rollout.counts.snapshot()
    }

    /// Derives a key for a request (with a handled method) that carries no
    /// `Idempotency-Key` header and no key in its body
    /// ([`key_from`](Self::key_from)): `derived:` and 32 hex digits, an
    /// xxh3-128 hash of its user id, method, path and query, and its
    /// request fingerprint (the body). The response is stored for
    /// `window` (its record TTL, in place of the engine's `record_ttl`),
    /// so an identical request within `window` of the first one's end is
    /// a replay, and a later one runs again. A derived key is a key: the
    /// request needs a user, and [`key_required`](Self::key_required) no
    /// longer refuses it.
    ///
    /// **The risk**: two legitimate identical requests inside the window
    /// (the same user buying the same item twice on purpose) are taken
    /// for a retry, and the second gets the first's response without
    /// running. Choose `window` as short as a client's retries allow, and
    /// prefer client keys. A zero `window` turns derivation off (the
    /// default).
    pub fn derive_missing_keys(self, window: Duration) -> IdempotencyLayer<S> {
        self.with(|c| c.rollout.derive = (!window.is_zero()).then_some(window))
    }

    /// Reads the key of a request without the `Idempotency-Key` header
    /// from its parts and its buffered body (up to
    /// [`max_body_bytes`](Self::max_body_bytes)), for APIs that carry it in
    /// the payload (a queue message id, a JSON field). `f` returns the key
    /// as its text, which must be printable ASCII (0x20-0x7E), non-empty
    /// and within the engine's `max_key_len` (spaces and `%` encoded as
    /// for the header); another key gets the layer's `400` ("Idempotency-Key
    /// is invalid"). `None`: the body has no key, and the request is
    /// derived a key ([`derive_missing_keys`](Self::derive_missing_keys)),
    /// or else refused or passed through as a request without a key.
    ///
    /// The header wins: `f` is not called for a request that has the
    /// header, valid or not. A body key and a header key with the same
    /// text are the same key.
    ///
    /// ```no_run
    /// # use std::sync::Arc;
    /// # use idemkv::{Engine, Options, http::IdempotencyLayer};
    /// # let engine = Arc::new(Engine::open("/tmp/idem", Options::default()).unwrap());
    /// // {"message_id":"m-17", ...}: the queue's message id is the key.
    /// let layer = IdempotencyLayer::new(engine)
    ///     .fixed_user("queue")
    ///     .key_from(|_parts, body| {
    ///         let text = std::str::from_utf8(body).ok()?;
    ///         let (_, rest) = text.split_once(r#""message_id":""#)?;
    ///         Some(rest.split_once('"')?.0.to_owned())
    ///     });
    /// ```
    pub fn key_from<F>(self, f: F) -> IdempotencyLayer<S>
    where
        F: Fn(&Parts, &Bytes) -> Option<String> + Send + Sync + 'static,
    {
        self.with(|c| c.rollout.key_from = Some(Arc::new(f)))
    }
}
