//! The machines' own protocol, over the org's private network on the peer
//! port (which the edge never routes to): JSON over HTTP/1 with
//! keep-alive.
//!
//! - `POST /peer/op/{code}`: make a change as the owner (421: not mine).
//! - `PUT /peer/copy/{code}`: take a copy if newer (409 with the version
//!   held otherwise); `GET` the same path: this machine's copy.
//! - `GET /peer/state/{code}?after=V&wait_ms=W`: as the owner, the record
//!   once its version is above V, waiting at most W (204: not yet).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use hangar_games::record::{Op, Record};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

use crate::cluster::{Attempt, Cluster, WATCH_WAIT};

#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerError {
    #[error("{message}")]
    Rejected { status: u16, message: String },
    #[error("holds a newer copy (version {0})")]
    Newer(u64),
    #[error("does not own the game")]
    NotOwner,
    #[error("{0}")]
    Down(String),
}

#[derive(Clone)]
pub struct PeerClient {
    http: Client<HttpConnector, Full<Bytes>>,
}

impl PeerClient {
    pub fn new() -> PeerClient {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_millis(500)));
        PeerClient {
            http: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(connector),
        }
    }

    async fn call(
        &self,
        method: http::Method,
        url: String,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<(u16, Bytes), PeerError> {
        let req = http::Request::builder()
            .method(method)
            .uri(&url)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| PeerError::Down(e.to_string()))?;
        let go = async {
            let resp = self
                .http
                .request(req)
                .await
                .map_err(|e| PeerError::Down(format!("{url}: {e}")))?;
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| PeerError::Down(e.to_string()))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(timeout, go)
            .await
            .map_err(|_| PeerError::Down(format!("{url}: no answer within {timeout:?}")))?
    }

    pub async fn op(&self, peer: &str, code: &str, op: &Op) -> Result<Record, PeerError> {
        let body = serde_json::to_vec(op).map_err(|e| PeerError::Down(e.to_string()))?;
        let (status, body) = self
            .call(
                http::Method::POST,
                format!("http://{peer}/peer/op/{code}"),
                Some(body),
                Duration::from_secs(4),
            )
            .await?;
        match status {
            200 => parse(&body),
            421 | 503 => Err(PeerError::NotOwner),
            status => Err(PeerError::Rejected {
                status,
                message: String::from_utf8_lossy(&body).into_owned(),
            }),
        }
    }

    pub async fn put_copy(&self, peer: &str, r: &Record) -> Result<(), PeerError> {
        let body = serde_json::to_vec(r).map_err(|e| PeerError::Down(e.to_string()))?;
        let (status, body) = self
            .call(
                http::Method::PUT,
                format!("http://{peer}/peer/copy/{}", r.code),
                Some(body),
                Duration::from_secs(1),
            )
            .await?;
        match status {
            200 => Ok(()),
            409 => Err(PeerError::Newer(
                String::from_utf8_lossy(&body)
                    .trim()
                    .parse()
                    .unwrap_or(u64::MAX),
            )),
            s => Err(PeerError::Down(format!("answered {s}"))),
        }
    }

    pub async fn get_copy(&self, peer: &str, code: &str) -> Result<Option<Record>, PeerError> {
        let (status, body) = self
            .call(
                http::Method::GET,
                format!("http://{peer}/peer/copy/{code}"),
                None,
                Duration::from_millis(500),
            )
            .await?;
        match status {
            200 => parse(&body).map(Some),
            404 => Ok(None),
            s => Err(PeerError::Down(format!("answered {s}"))),
        }
    }

    pub async fn state(
        &self,
        peer: &str,
        code: &str,
        after: u64,
        wait: Duration,
    ) -> Result<Option<Record>, PeerError> {
        let (status, body) = self
            .call(
                http::Method::GET,
                format!(
                    "http://{peer}/peer/state/{code}?after={after}&wait_ms={}",
                    wait.as_millis()
                ),
                None,
                wait + Duration::from_secs(2),
            )
            .await?;
        match status {
            200 => parse(&body).map(Some),
            204 | 404 => Ok(None),
            421 | 503 => Err(PeerError::NotOwner),
            s => Err(PeerError::Down(format!("answered {s}"))),
        }
    }
}

fn parse(body: &[u8]) -> Result<Record, PeerError> {
    serde_json::from_slice(body).map_err(|e| PeerError::Down(format!("an unreadable record: {e}")))
}

pub fn routes(cluster: Arc<Cluster>) -> Router {
    Router::new()
        .route("/peer/op/{code}", post(op))
        .route("/peer/copy/{code}", get(copy).put(take))
        .route("/peer/state/{code}", get(state))
        .with_state(cluster)
}

async fn op(
    State(c): State<Arc<Cluster>>,
    Path(code): Path<String>,
    Json(op): Json<Op>,
) -> Response {
    let v = c.view();
    match c.own_op(&code, &op, &v).await {
        Attempt::Done(r) => Json(&*r).into_response(),
        Attempt::Failed(f) => (
            StatusCode::from_u16(f.status()).unwrap_or(StatusCode::CONFLICT),
            f.message(),
        )
            .into_response(),
        Attempt::Again(why) => (StatusCode::MISDIRECTED_REQUEST, why).into_response(),
    }
}

async fn take(State(c): State<Arc<Cluster>>, Json(r): Json<Record>) -> Response {
    match c.take_copy(r).await {
        Ok(()) => StatusCode::OK.into_response(),
        Err(held) => (StatusCode::CONFLICT, held.to_string()).into_response(),
    }
}

async fn copy(State(c): State<Arc<Cluster>>, Path(code): Path<String>) -> Response {
    match c.copy(&code).await {
        Some(r) => Json(&*r).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

#[derive(Deserialize)]
struct After {
    #[serde(default)]
    after: u64,
    #[serde(default)]
    wait_ms: u64,
}

async fn state(
    State(c): State<Arc<Cluster>>,
    Path(code): Path<String>,
    Query(q): Query<After>,
) -> Response {
    let wait = Duration::from_millis(q.wait_ms).min(WATCH_WAIT);
    match c.owned_after(&code, q.after, wait).await {
        Ok(Some(r)) => Json(&*r).into_response(),
        Ok(None) if q.after == 0 => StatusCode::NOT_FOUND.into_response(),
        Ok(None) => StatusCode::NO_CONTENT.into_response(),
        Err(why) => (StatusCode::MISDIRECTED_REQUEST, why).into_response(),
    }
}
