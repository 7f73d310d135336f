//! The layer's constructors ([`IdempotencyLayer::new`] on an engine,
//! [`IdempotencyLayer::with_store`] on any [`IdempotencyStore`]) and its
//! basic settings: methods, user source, key and body limits, what is
//! stored, waiting, kept headers, response size, heartbeat limit.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderName;
use http::request::Parts;
use http::{Method, StatusCode};

use super::handle::user_from_header;
use super::headers::HeaderPolicy;
use super::rollout::Rollout;
use super::*;
use crate::{AsyncEngine, Engine, IdempotencyStore};

impl IdempotencyLayer {
    /// A layer on `engine` (through its [`AsyncEngine`]) with the defaults: keys required on `POST` and
    /// `PATCH`; **no user source**, so every keyed request gets `400`
    /// until one is set with [`user_from`](IdempotencyLayer::user_from),
    /// [`user_header`](IdempotencyLayer::user_header) or
    /// [`fixed_user`](IdempotencyLayer::fixed_user); request bodies up to
    /// [`DEFAULT_MAX_BODY`]; responses stored as [`stored_by_default`]
    /// says, others released; `409` at once for a key in flight; every
    /// end-to-end header but `date` and `set-cookie` kept on replays;
    /// responses up to [`DEFAULT_MAX_RESPONSE`] buffered and stored; the
    /// lease kept alive for up to [`DEFAULT_HEARTBEAT_LIMIT`].
    pub fn new(engine: Arc<Engine>) -> IdempotencyLayer {
        IdempotencyLayer::with_store(AsyncEngine::new(engine))
    }
}

impl<S: IdempotencyStore> IdempotencyLayer<S> {
    /// A layer on `store` (a cluster `Node`, or any [`IdempotencyStore`]:
    /// a wrapper that counts or injects faults) with the defaults of
    /// [`IdempotencyLayer::new`]. Each request's calls go through `store`'s
    /// methods; its lease is kept alive by the store's own heartbeat
    /// ([`IdempotencyStore::heartbeat`]) or, for a store without one, by a
    /// tokio task that calls [`IdempotencyStore::extend`].
    pub fn with_store(store: S) -> IdempotencyLayer<S> {
        IdempotencyLayer {
            config: Arc::new(Config {
                store,
                methods: vec![Method::POST, Method::PATCH],
                user: None,
                key_required: true,
                max_body: DEFAULT_MAX_BODY,
                store_when: Arc::new(stored_by_default),
                wait: Duration::ZERO,
                headers: HeaderPolicy::default(),
                max_response: DEFAULT_MAX_RESPONSE,
                heartbeat_limit: DEFAULT_HEARTBEAT_LIMIT,
                rollout: Rollout::default(),
                in_flight_status: StatusCode::CONFLICT,
                heartbeat_every: None,
                locations: Arc::default(),
                on_replay: None,
                fingerprint: None,
            }),
        }
    }

    /// The methods the layer handles (replacing the default `POST`,
    /// `PATCH`). Requests with other methods pass through untouched, with
    /// or without a key.
    pub fn methods(self, methods: impl IntoIterator<Item = Method>) -> IdempotencyLayer<S> {
        self.with(|c| c.methods = methods.into_iter().collect())
    }

    /// Takes the user id (the scope of the keys) from each request with
    /// `user`, typically from an identity that authentication middleware
    /// put in the request's extensions. A request for which it returns
    /// `None` or an empty string gets `400`; it is never served from a
    /// shared scope.
    ///
    /// ```no_run
    /// # use std::sync::Arc;
    /// # use idemkv::{Engine, Options, http::IdempotencyLayer};
    /// /// Put in the extensions by the service's authentication middleware.
    /// #[derive(Clone)]
    /// struct Authenticated(String);
    ///
    /// # let engine = Arc::new(Engine::open("/tmp/idem", Options::default()).unwrap());
    /// let layer = IdempotencyLayer::new(engine)
    ///     .user_from(|parts| parts.extensions.get::<Authenticated>().map(|a| a.0.clone()));
    /// ```
    pub fn user_from<F>(self, user: F) -> IdempotencyLayer<S>
    where
        F: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    {
        self.with(|c| c.user = Some(Arc::new(user)))
    }

    /// The former name of [`IdempotencyLayer::user_from`].
    #[deprecated(note = "renamed to `user_from`")]
    pub fn user_id<F>(self, user: F) -> IdempotencyLayer<S>
    where
        F: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    {
        self.user_from(user)
    }

    /// Takes the user id from the request header `name`. A request without
    /// it, with it repeated, empty, or not printable ASCII gets `400`.
    ///
    /// **Only behind a trusted proxy**: the header must be set (and any
    /// client-sent copy removed) by a gateway that authenticated the
    /// client. Otherwise a client picks its own scope, and can replay
    /// another user's stored responses by naming that user and a key.
    pub fn user_header(self, name: HeaderName) -> IdempotencyLayer<S> {
        self.user_from(move |parts| user_from_header(parts, &name))
    }

    /// Scopes every key to the one user id `user` (a service with a single
    /// tenant, or one engine per tenant). An empty `user` refuses every
    /// keyed request.
    pub fn fixed_user(self, user: impl Into<String>) -> IdempotencyLayer<S> {
        let user = user.into();
        self.user_from(move |_| Some(user.clone()))
    }

    /// Whether a request with a handled method but no `Idempotency-Key`
    /// gets `400` (`true`, the default) or passes through untouched.
    pub fn key_required(self, required: bool) -> IdempotencyLayer<S> {
        self.with(|c| c.key_required = required)
    }

    /// The largest request body the layer buffers, in bytes; a larger one
    /// gets `413`. Default: [`DEFAULT_MAX_BODY`].
    pub fn max_body_bytes(self, max: usize) -> IdempotencyLayer<S> {
        self.with(|c| c.max_body = max)
    }

    /// Which response statuses are stored and replayed; for the others the
    /// key is released so that a retry runs the work again. Default:
    /// [`stored_by_default`].
    pub fn store_when<F>(self, store: F) -> IdempotencyLayer<S>
    where
        F: Fn(StatusCode) -> bool + Send + Sync + 'static,
    {
        self.with(|c| c.store_when = Arc::new(store))
    }

    /// How long a request whose key is in flight waits for the first
    /// request's lease to end (it then gets that request's answer, a `422`
    /// if it differs, or runs itself if the key was released or expired)
    /// before it is answered `409`. Default: zero, `409` at once.
    pub fn wait_in_flight(self, wait: Duration) -> IdempotencyLayer<S> {
        self.with(|c| c.wait = wait)
    }

    /// Keeps the response header `name` (every value of it) in stored
    /// responses and on replays: re-allows a header dropped by default
    /// (`date`, `set-cookie`) or by [`drop_header`](Self::drop_header).
    /// Hop-by-hop headers and `content-length` are never kept.
    pub fn keep_header(self, name: HeaderName) -> IdempotencyLayer<S> {
        self.with(|c| c.headers.allow(name))
    }

    /// Leaves the response header `name` out of stored responses and
    /// replays (the first response still carries it). Undoes an earlier
    /// [`keep_header`](Self::keep_header) of the same name, and the other
    /// way round.
    pub fn drop_header(self, name: HeaderName) -> IdempotencyLayer<S> {
        self.with(|c| c.headers.deny(name))
    }

    /// The largest response the layer buffers to store, in bytes, counted
    /// as stored (the kept headers, encoded, plus the body). A larger
    /// response is streamed to the client as it is produced and stored
    /// with its body not kept (see the module documentation). Default:
    /// [`DEFAULT_MAX_RESPONSE`]; set it to the engine's
    /// `Options::max_response_len` if you change that (a response the
    /// engine finds too large is stored as not kept too, after buffering).
    pub fn max_response_bytes(self, max: usize) -> IdempotencyLayer<S> {
        self.with(|c| c.max_response = max)
    }

    /// How long the layer keeps a running request's lease alive: from the
    /// moment the handler is called, the lease is extended (by the store's
    /// `lease_ttl`, every third of it; on an engine by its heartbeat
    /// thread) while the handler runs and its response body streams, until
    /// `limit` has passed (on an engine, or the engine's
    /// `Options::heartbeat_limit` if that is shorter); the lease then ends at most one `lease_ttl` later, and a
    /// retry may run the work again. `Duration::ZERO` turns the heartbeat
    /// off (the lease lasts `lease_ttl`). Default:
    /// [`DEFAULT_HEARTBEAT_LIMIT`].
    pub fn heartbeat_limit(self, limit: Duration) -> IdempotencyLayer<S> {
        self.with(|c| c.heartbeat_limit = limit)
    }

    /// Applies `change` to the configuration (copied if shared).
    pub(super) fn with(mut self, change: impl FnOnce(&mut Config<S>)) -> IdempotencyLayer<S> {
        change(Arc::make_mut(&mut self.config));
        self
    }
}

impl<S: IdempotencyStore> fmt::Debug for IdempotencyLayer<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("methods", &self.config.methods)
            .field("key_required", &self.config.key_required)
            .field("max_body", &self.config.max_body)
            .field("user_source", &self.config.user.is_some())
            .field("wait", &self.config.wait)
            .field("headers", &self.config.headers)
            .field("max_response", &self.config.max_response)
            .field("heartbeat_limit", &self.config.heartbeat_limit)
            .field("rollout", &self.config.rollout)
            .finish_non_exhaustive()
    }
}
