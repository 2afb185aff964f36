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
    let http = server::bind(config.listen, "edge").await?;
    let tls = match &config.tls {
        Some(t) => Some((
            server::tls_config(&t.cert, &t.key)?,
            server::bind(t.listen, "edge (TLS)").await?,
        )),
        None => None,
    };
    let local = |l: &tokio::net::TcpListener| l.local_addr().map_err(|e| e.to_string());
    let mut running = Running {
        edge: edge.clone(),
        http: local(&http)?,
        tls: None,
        admin: None,
    };
    if let Some((_, l)) = &tls {
        running.tls = Some(local(l)?);
    }
    if let Some(admin) = &config.admin {
        let listener = server::bind(admin.listen, "edge admin endpoint").await?;
        running.admin = Some(local(&listener)?);
        tokio::spawn(admin::serve(edge.clone(), listener, admin.token.clone()));
    }
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = tx.send(true);
    });
    let stop = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    if let Some((cfg, listener)) = tls {
        tokio::spawn(server::serve(
            edge.clone(),
            listener,
            Some(cfg),
            stop(rx.clone()),
        ));
    }
    tokio::spawn(server::serve(edge, http, None, stop(rx)));
    Ok(running)
}
