//! Shared by the rollout tests (`http_observe`, `http_derive`,
//! `http_key_from`): an axum app served on 127.0.0.1 (port 0), and an
//! ordinary HTTP/1.1 client (hyper-util's pooled client) that talks to it.
#![allow(dead_code)]

use std::net::SocketAddr;

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;

/// 2100-01-01T00:00:00Z: the manual clocks start here, so that records are
/// still live when the CLI (on the system clock) reads them.
pub const T0: u64 = 4_102_444_800_000;

/// Serves `app` on a new port of 127.0.0.1 until the test ends.
pub async fn serve(app: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// A client of one server.
#[derive(Clone)]
pub struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
    addr: SocketAddr,
}

/// A response, read whole.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: String,
}

impl Reply {
    /// The single value of header `name`, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    /// Whether the layer marked this a replay.
    pub fn replayed(&self) -> bool {
        self.header("idempotent-replayed") == Some("true")
    }

    /// The `title` of a problem body, if it is one.
    pub fn problem_title(&self) -> Option<&str> {
        if self.header("content-type") != Some("application/problem+json") {
            return None;
        }
        let rest = self.body.strip_prefix(r#"{"title":""#)?;
        Some(rest.split_once('"')?.0)
    }
}

impl Http {
    pub fn new(addr: SocketAddr) -> Http {
        Http {
            client: Client::builder(TokioExecutor::new()).build_http(),
            addr,
        }
    }

    /// `POST path` with `headers` and `body`.
    pub async fn post(&self, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
        let mut request = Request::post(format!("http://{}{path}", self.addr));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap();
        let response = self.client.request(request).await.unwrap();
        let (parts, body) = response.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: String::from_utf8(body.to_vec()).unwrap(),
        }
    }
}
