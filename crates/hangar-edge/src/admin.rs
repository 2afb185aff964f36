//! The admin endpoint, every route behind the bearer token: `GET /metrics`
//! (Prometheus text format) and `POST /purge` (JSON):
//! `{"host": "app.localhost", "url": "/a"}`, `{"host": .., "prefix": "/static/"}`,
//! `{"tag": "post-1"}` (optionally with `host`), or `{"host": ..}` alone for
//! the whole host; `"soft": true` marks entries stale instead of removing
//! them. The answer is `{"purged": N}`.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{header, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpListener;

use crate::cache::Purge;
use crate::proxy::Edge;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PurgeRequest {
    host: Option<String>,
    url: Option<String>,
    prefix: Option<String>,
    tag: Option<String>,
    #[serde(default)]
    soft: bool,
}

impl PurgeRequest {
    fn selection(self) -> Result<(Purge, bool), String> {
        let host = self.host.map(|h| h.to_ascii_lowercase());
        let purge = match (host, self.url, self.prefix, self.tag) {
            (host, None, None, Some(tag)) => Purge::Tag { host, tag },
            (Some(host), Some(url), None, None) => Purge::Url { host, path: url },
            (Some(host), None, Some(prefix), None) => Purge::Prefix { host, prefix },
            (Some(host), None, None, None) => Purge::Host { host },
            _ => return Err(
                "give one of: host+url, host+prefix, tag (with an optional host), or host alone"
                    .into(),
            ),
        };
        if let Purge::Url { path, .. } | Purge::Prefix { prefix: path, .. } = &purge {
            if !path.starts_with('/') {
                return Err(format!(
                    "{path:?} must start with / (a path, not a full URL)"
                ));
            }
        }
        Ok((purge, self.soft))
    }
}

fn reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

fn json_error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let mut r = reply(
        status,
        serde_json::json!({ "error": message }).to_string() + "\n",
    );
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

async fn handle(
    edge: Arc<Edge>,
    token: Arc<str>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    // Every route needs the token: the metrics name every app and its
    // traffic, which no one but the operator may see.
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let given = auth.strip_prefix("Bearer ").unwrap_or("");
    if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
        return Ok(json_error(
            StatusCode::UNAUTHORIZED,
            "send Authorization: Bearer <the admin token from the edge config>",
        ));
    }
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            let store = &edge.cache.store;
            let families = crate::metrics::families(&edge.routes, store.bytes(), store.len());
            let accept = req
                .headers()
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok());
            let (content_type, text) = hangar_metrics::exposition::render(families, accept);
            let mut r = reply(StatusCode::OK, text);
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(content_type),
            );
            Ok(r)
        }
        (&Method::POST, "/purge") => {
            let body = match Limited::new(req.into_body(), 64 << 10).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    return Ok(json_error(
                        StatusCode::BAD_REQUEST,
                        &format!("cannot read the body: {e}"),
                    ))
                }
            };
            let parsed: PurgeRequest = match serde_json::from_slice(&body) {
                Ok(p) => p,
                Err(e) => {
                    return Ok(json_error(
                        StatusCode::BAD_REQUEST,
                        &format!("bad purge request: {e}"),
                    ))
                }
            };
            match parsed.selection() {
                Ok((purge, soft)) => {
                    let n = edge.cache.purge(&purge, soft);
                    Ok(reply(
                        StatusCode::OK,
                        serde_json::json!({ "purged": n, "soft": soft }).to_string() + "\n",
                    ))
                }
                Err(e) => Ok(json_error(StatusCode::BAD_REQUEST, &e)),
            }
        }
        _ => Ok(json_error(
            StatusCode::NOT_FOUND,
            "the admin endpoint has GET /metrics and POST /purge",
        )),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub async fn serve(edge: Arc<Edge>, listener: TcpListener, token: String) {
    let token: Arc<str> = Arc::from(token);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (edge, token) = (edge.clone(), token.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(edge.clone(), token.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
