//! The [`tower::Layer`] and [`tower::Service`] impls: each request goes to
//! [`handle`].

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::{Body, HttpBody};
use bytes::Bytes;
use http::{Request, Response};

use super::handle::handle;
use super::{BoxError, Config, IdempotencyLayer};
use crate::{AsyncEngine, IdempotencyStore};

impl<S, St: IdempotencyStore> tower::Layer<S> for IdempotencyLayer<St> {
    type Service = IdempotencyService<S, St>;

    fn layer(&self, inner: S) -> IdempotencyService<S, St> {
        IdempotencyService {
            inner,
            config: Arc::clone(&self.config),
        }
    }
}

/// The [`tower::Service`] made by [`IdempotencyLayer`] around `S`, on the
/// store `St` (the layer's).
///
/// It takes requests with any body and hands the inner service an
/// [`axum::body::Body`]; its responses have an `axum::body::Body`. Its
/// error is the inner service's.
#[derive(Clone)]
pub struct IdempotencyService<S, St: IdempotencyStore = AsyncEngine> {
    inner: S,
    config: Arc<Config<St>>,
}

impl<S: fmt::Debug, St: IdempotencyStore> fmt::Debug for IdempotencyService<S, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyService")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, St, B, ResBody> tower::Service<Request<B>> for IdempotencyService<S, St>
where
    St: IdempotencyStore,
    S: tower::Service<Request<Body>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    ResBody: HttpBody<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // The clone that was polled ready goes with the request.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(handle(Arc::clone(&self.config), inner, request))
    }
}
