//! `hangar-edge`: the edge proxy in front of apps. It owns routing by
//! `Host`, balancing over backends, their health, and the CDN cache.
//!
//! - [`config`]: `edge.toml` (or the same structure built by `hangar up`).
//! - [`backend`]: the routing table, power-of-two-choices balancing over
//!   least outstanding requests, active checks, passive ejection (failures
//!   and slowness relative to peers).
//! - [`upstream`]: pooled HTTP/1.1 connections to backends.
//! - [`cache`]: RFC 9111 decisions (RFC 9213's targeted fields first),
//!   memory and disk tiers with S3-FIFO eviction, request coalescing,
//!   purges.
//! - [`limit`]: per-app and per-client rate limits (token buckets).
//! - [`mesh`]: the other edges of a cluster, and the tiers (region owner,
//!   super-region, shield) a cache miss climbs through them.
//! - [`proxy`]: one request through all of the above; [`error`]: its one
//!   error type, mapped to a status and an error page in one place.
//! - [`server`] and [`admin`]: the listeners; metrics and purge.
//!
//! A data plane: it is handed hosts, backends and the other edges, and
//! knows nothing of machines, apps or the state store (`hangar up`
//! translates those).

#![forbid(unsafe_code)]

pub mod admin;
pub mod backend;
pub mod cache;
pub mod config;
pub mod error;
pub mod limit;
pub mod mesh;
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
/// on in background tasks until `shutdown` resolves. With `wakes`, hosts
/// with `autostart` ask there for a backend when none is started.
pub async fn start(
    config: &Config,
    wakes: Option<proxy::Wakes>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<Running, String> {
    let edge = Arc::new(Edge::new(config, wakes).map_err(|e| e.to_string())?);
    let (tx, rx) = tokio::sync::watch::channel(false);
    match listen(config, &edge, rx).await {
        Ok(running) => {
            tokio::spawn(async move {
                shutdown.await;
                let _ = tx.send(true);
            });
            Ok(running)
        }
        Err(e) => {
            // Stop the workers already started.
            let _ = tx.send(true);
            Err(e)
        }
    }
}

async fn listen(
    config: &Config,
    edge: &Arc<Edge>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<Running, String> {
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let http = server::spawn_workers(
        edge.clone(),
        config.listen,
        None,
        workers,
        stop.clone(),
        "edge",
    )
    .await?;
    let mut running = Running {
        edge: edge.clone(),
        http,
        tls: None,
        admin: None,
    };
    if let Some(t) = &config.tls {
        let tls = server::tls_config(&t.cert, &t.key)?;
        let addr = server::spawn_workers(
            edge.clone(),
            t.listen,
            Some(tls),
            workers,
            stop,
            "edge (TLS)",
        )
        .await?;
        running.tls = Some(addr);
        let _ = edge.https_port.set(addr.port());
    }
    if let Some(admin) = &config.admin {
        let listener = server::bind(admin.listen, "edge admin endpoint").await?;
        running.admin = Some(listener.local_addr().map_err(|e| e.to_string())?);
        tokio::spawn(admin::serve(edge.clone(), listener, admin.token.clone()));
    }
    Ok(running)
}
