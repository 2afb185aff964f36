//! `hangar-edge`: the edge proxy in front of apps. It owns routing by
//! `Host`, balancing over backends, their health, and the CDN cache.
//!
//! - [`config`]: `edge.toml` (or the same structure built by `hangar up`).
//! - [`backend`]: the routing table, power-of-two-choices balancing over
//!   least outstanding requests, active checks, passive ejection (failures
//!   and slowness relative to peers).
//! - [`upstream`]: pooled HTTP/1.1 connections to backends.
//! - [`cache`]: RFC 9111 decisions, memory and disk tiers with S3-FIFO
//!   eviction, request coalescing, purges.
//! - [`proxy`]: one request through all of the above.
//! - [`server`] and [`admin`]: the listeners; metrics and purge.
//!
//! A data plane: it is handed hosts and backends and knows nothing of
//! machines, apps or the state store (`hangar up` translates those).

pub mod admin;
pub mod backend;
pub mod cache;
pub mod config;
pub mod metrics;
pub mod proxy;
pub mod server;
pub mod upstream;

pub use config::Config;
pub use proxy::Edge;

use std::sync::Arc;

/// A started edge: the handle to update its hosts, and where it listens.
pub struct Running {
    pub edge: Arc<Edge>,
    pub http: std::net::SocketAddr,
    pub tls: Option<std::net::SocketAddr>,
    pub admin: Option<std::net::SocketAddr>,
}

/// Start everything `config` asks for: the HTTP listener, the TLS one and
/// the admin endpoint. Returns once all listeners are bound; serving goes
/// on in background tasks until `shutdown` resolves.
pub async fn start(
    config: &Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<Running, String> {
    let edge = Arc::new(Edge::new(config).map_err(|e| e.to_string())?);
    let tls = match &config.tls {
        Some(t) => Some((t.listen, server::tls_config(&t.cert, &t.key)?)),
        None => None,
    };
    let (tx, rx) = tokio::sync::watch::channel(false);
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let http = server::spawn_workers(
        edge.clone(),
        config.listen,
        None,
        workers,
        rx.clone(),
        "edge",
    )
    .await;
    let http = match http {
        Ok(a) => a,
        Err(e) => {
            let _ = tx.send(true);
            return Err(e);
        }
    };
    let mut running = Running {
        edge: edge.clone(),
        http,
        tls: None,
        admin: None,
    };
    if let Some((addr, cfg)) = tls {
        match server::spawn_workers(
            edge.clone(),
            addr,
            Some(cfg),
            workers,
            rx.clone(),
            "edge (TLS)",
        )
        .await
        {
            Ok(a) => running.tls = Some(a),
            Err(e) => {
                let _ = tx.send(true);
                return Err(e);
            }
        }
    }
    if let Some(admin) = &config.admin {
        let listener = match server::bind(admin.listen, "edge admin endpoint").await {
            Ok(l) => l,
            Err(e) => {
                let _ = tx.send(true);
                return Err(e);
            }
        };
        running.admin = Some(listener.local_addr().map_err(|e| e.to_string())?);
        tokio::spawn(admin::serve(edge, listener, admin.token.clone()));
    }
    tokio::spawn(async move {
        shutdown.await;
        let _ = tx.send(true);
    });
    Ok(running)
}
