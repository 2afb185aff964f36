//! `hangar-registry`: Hangar's own multi-tenant OCI registry.
//!
//! It serves the OCI distribution API (v1.1) over a `hangar-oci` content
//! store, so every blob is stored once across all orgs, while each
//! repository links the blobs and manifests it may serve. Central types:
//! [`Registry`] (a running registry and its request handler),
//! [`storage::RegistryStore`] (repositories, tags, links, uploads on disk) and
//! [`auth::Auth`] (API tokens, bearer tokens, the authorizer's rules).
//!
//! Key design decision: the authorizer answers a refused read exactly as it
//! answers a missing repository, and a refused cross-repository mount by
//! opening an ordinary upload, so one org learns nothing about another's
//! repositories. Upload URLs carry an HMAC binding the upload to its
//! repository.
//!
//! This crate must not run images or know about machines; it only stores and
//! serves them.

#![forbid(unsafe_code)]

pub mod auth;
pub mod error;
pub mod metrics;
mod server;
pub mod storage;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

pub use error::{ApiError, Error, Result};
pub use server::{Config, Conn, Registry, MAX_MANIFEST};

/// Serve the distribution API on `listener` until `shutdown` resolves; also
/// removes abandoned uploads, at start and then every minute.
pub async fn serve(
    registry: Arc<Registry>,
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let cleaner = {
        let registry = registry.clone();
        tokio::spawn(async move {
            loop {
                let timeout = registry.config.upload_timeout;
                let store = registry.store.clone();
                let _ = tokio::task::spawn_blocking(move || store.clean_uploads(timeout)).await;
                tokio::time::sleep(Duration::from_secs(60).min(timeout)).await;
            }
        })
    };
    tokio::pin!(shutdown);
    loop {
        let (stream, peer): (_, SocketAddr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => continue,
            },
            () = &mut shutdown => break,
        };
        let registry = registry.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let conn = Conn {
                peer,
                tls: tls.is_some(),
            };
            let service = service_fn(move |req| registry.clone().handle(req, conn));
            match tls {
                None => {
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
                Some(config) => {
                    let Ok(stream) = tokio_rustls::TlsAcceptor::from(config).accept(stream).await
                    else {
                        return;
                    };
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
            }
        });
    }
    cleaner.abort();
}

/// Serve `/metrics` (OpenMetrics or the text format) on the admin listener.
pub async fn serve_admin(registry: Arc<Registry>, listener: TcpListener) {
    use http_body_util::Full;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let registry = registry.clone();
                async move {
                    let accept = req
                        .headers()
                        .get(hyper::header::ACCEPT)
                        .and_then(|v| v.to_str().ok());
                    let (status, (content_type, body)) = if req.uri().path() == "/metrics" {
                        let families = registry.metrics.families();
                        (
                            hyper::StatusCode::OK,
                            hangar_metrics::exposition::render(families, accept),
                        )
                    } else {
                        (
                            hyper::StatusCode::NOT_FOUND,
                            ("text/plain", "only /metrics is served here\n".to_string()),
                        )
                    };
                    hyper::Response::builder()
                        .status(status)
                        .header("Content-Type", content_type)
                        .body(Full::new(bytes::Bytes::from(body)))
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
