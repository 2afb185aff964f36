//! One request through the edge: route by host and check limits (here),
//! then answer from the cache or fetch, coalesced, from a backend
//! ([`cached`]), choose the backend with retry, wake and queue
//! ([`balance`]), pass upgrades through ([`upgrade`]), and put the
//! forwarding and cache headers on ([`headers`]); bodies on the way are in
//! [`body`]. Every failure is a [`ProxyError`], answered by
//! [`ProxyError::respond`].

mod balance;
mod body;
mod cached;
mod headers;
mod tiers;
mod upgrade;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Method, Request, Response, StatusCode, Version};

use crate::backend::{Backend, InFlight, Routes, Site};
use crate::cache::fill::{Head, Join, Waited};
use crate::cache::policy::{self, Directives, Times, Use};
use crate::cache::store::{Meta, Object};
use crate::cache::{self, Cache, Purge};
use crate::config::{Config, Limits};
use crate::error::{ClientBodyError, Kind, ProxyError, Side};
use crate::mesh::{self, Mesh, MeshConfig, Role};
use crate::metrics::HostMetrics;
use crate::upstream::{self, BoxError, UpBody};
use body::{count_bytes, hold, ClientBody};
use headers::*;
use upgrade::is_upgrade;

/// Response bodies (and bodies sent upstream).
pub type Body = UpBody;

/// A request to start a stopped backend of `host` (scale to zero), sent
/// to whoever runs the machines: it answers on `done` once a backend is in
/// the routing table and passes its checks, or says why not. Requests for
/// one host may come several at once; the answerer should share one start.
pub struct Wake {
    pub host: String,
    pub done: tokio::sync::oneshot::Sender<Result<(), String>>,
}

/// Where the edge sends its [`Wake`]s (given to [`crate::start`]).
pub type Wakes = tokio::sync::mpsc::Sender<Wake>;

/// A count of the requests in flight to some backends, which goes on
/// counting after they leave the routing table (see [`Edge::in_flight_at`]).
pub type InFlightGauge = Box<dyn Fn() -> usize + Send + Sync>;

/// The edge: its routing table, cache and limits.
pub struct Edge {
    pub(crate) routes: Routes,
    /// The other edges of the cluster (none alone).
    pub(crate) mesh: Arc<Mesh>,
    pub(crate) cache: Cache,
    pub(crate) limits: Limits,
    next_id: AtomicU64,
    id_prefix: String,
    /// The TLS listener's port, for `force_https` redirects (set once bound).
    pub(crate) https_port: std::sync::OnceLock<u16>,
    /// Starts a stopped backend of a host (the node's: scale to zero).
    wakes: Option<Wakes>,
    /// Keyed per process: credentials never appear in fill keys as such.
    credential_hasher: std::collections::hash_map::RandomState,
    /// Until when (nanoseconds after `born`) stored responses may be
    /// served as fresh; `u64::MAX`: always (no cluster to hear purges from).
    fresh_until: AtomicU64,
    born: Instant,
}

impl Edge {
    /// Must run inside a Tokio runtime (health checks start). With
    /// `wakes`, a host with `autostart` and no started backend asks there
    /// for one.
    pub fn new(config: &Config, wakes: Option<Wakes>) -> Result<Edge, cache::store::DiskError> {
        let routes = Routes::default();
        routes.set(&config.hosts);
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let mesh = Arc::new(Mesh::default());
        if let Some(m) = &config.mesh {
            mesh.set(m.clone());
        }
        tokio::spawn(
            mesh.clone()
                .ping_loop(Duration::from_secs(1), Duration::from_millis(900)),
        );
        Ok(Edge {
            routes,
            mesh,
            cache: Cache::open(config.cache.clone())?,
            limits: config.limits.clone(),
            next_id: AtomicU64::new(0),
            credential_hasher: Default::default(),
            // A cluster's node: nothing is fresh until it says it has
            // applied every purge (see `set_fresh_until`).
            fresh_until: AtomicU64::new(if config.await_purges { 0 } else { u64::MAX }),
            born: Instant::now(),
            https_port: Default::default(),
            wakes,
            id_prefix: format!(
                "{:08x}",
                (nanos as u64 ^ u64::from(std::process::id())) as u32
            ),
        })
    }

    /// Ask for a started backend of `host` and wait for the answer; `None`
    /// when nothing starts backends here.
    fn wake(
        &self,
        host: &str,
    ) -> Option<impl std::future::Future<Output = Result<(), String>> + Send + 'static> {
        let wakes = self.wakes.clone()?;
        let host = host.to_string();
        Some(async move {
            let (done, answer) = tokio::sync::oneshot::channel();
            wakes
                .send(Wake { host, done })
                .await
                .map_err(|_| "the node is not running".to_string())?;
            answer
                .await
                .unwrap_or_else(|_| Err("the node gave no answer".into()))
        })
    }

    /// Replace the cluster's other edges (live; a peer that stays keeps
    /// its connections and measured round trip).
    pub fn set_mesh(&self, config: MeshConfig) {
        self.mesh.set(config);
    }

    /// Remove (or, `soft`, mark stale) what `what` names; how many objects.
    pub fn purge(&self, what: &Purge, soft: bool) -> usize {
        self.cache.purge(what, soft)
    }

    /// Remove every stored object, of every host.
    pub fn purge_all(&self) -> usize {
        self.cache.store.purge_prefix("", false)
    }

    /// Serve stored responses as fresh until `until` only; after it every
    /// hit is revalidated first. A cluster's node moves it on as long as it
    /// knows it has applied every purge (a node cut off from the cluster
    /// stops serving from its cache as fresh when it runs out).
    pub fn set_fresh_until(&self, until: Instant) {
        let nanos = until.saturating_duration_since(self.born).as_nanos();
        self.fresh_until
            .store(nanos.min(u64::MAX as u128 - 1) as u64, Ordering::Relaxed);
    }

    /// Whether stored responses may be served as fresh now.
    pub(crate) fn within_horizon(&self) -> bool {
        match self.fresh_until.load(Ordering::Relaxed) {
            u64::MAX => true,
            until => (self.born.elapsed().as_nanos() as u64) < until,
        }
    }

    /// Replace the hosts (live; open connections are kept).
    pub fn set_hosts(&self, hosts: &[crate::config::Host]) {
        self.routes.set(hosts);
    }

    /// When `host` last had a request (unix seconds; 0: never, or no such
    /// host).
    pub fn last_request(&self, host: &str) -> u64 {
        self.routes
            .get(host)
            .map(|s| s.metrics.last_request())
            .unwrap_or(0)
    }

    /// A gauge of the requests in flight to the backends at `ip` now, in
    /// any host; it keeps counting them after they leave the routing table
    /// (to drain a backend: take it out, then wait for the gauge to reach 0).
    pub fn in_flight_at(&self, ip: std::net::IpAddr) -> InFlightGauge {
        let mine: Vec<Arc<crate::backend::Backend>> = self
            .routes
            .all()
            .values()
            .flat_map(|site| site.backends.iter().filter(|b| b.addr.ip() == ip).cloned())
            .collect();
        Box::new(move || mine.iter().map(|b| b.outstanding() as usize).sum())
    }

    /// What the backends at `ip` answered, in every host, since they were
    /// first routed to.
    pub fn answers_at(&self, ip: std::net::IpAddr) -> crate::backend::Answers {
        let mut sum = crate::backend::Answers {
            latency: vec![0; crate::metrics::BUCKETS.len() + 1],
            ..Default::default()
        };
        for site in self.routes.all().values() {
            for b in site.backends.iter().filter(|b| b.addr.ip() == ip) {
                let a = b.answers.read();
                for (s, x) in sum.classes.iter_mut().zip(a.classes) {
                    *s += x;
                }
                sum.failed += a.failed;
                for (s, x) in sum.latency.iter_mut().zip(a.latency) {
                    *s += x;
                }
            }
        }
        sum
    }

    /// Whether one of `addrs`, backends of `host`, is available and below
    /// the host's soft limit (1 when it has none).
    pub fn has_room(&self, host: &str, addrs: &[SocketAddr]) -> bool {
        self.routes.get(host).is_some_and(|site| {
            let room = site.config.soft_limit.max(1);
            site.backends
                .iter()
                .any(|b| addrs.contains(&b.addr) && b.available() && b.outstanding() < room)
        })
    }

    pub async fn handle(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        tls: bool,
    ) -> Result<Response<Body>, std::convert::Infallible> {
        let start = Instant::now();
        // A node alone never reads the shared view (its reference count
        // would be one more cache line every request touches).
        let shared = self.mesh.clustered().then(|| self.mesh.view());
        let alone = mesh::View::default();
        let view = shared.as_deref().unwrap_or(&alone);
        let role = if view.clustered() {
            mesh::role_of(req.headers(), &view.config.token)
        } else {
            Role::Client
        };
        if role == Role::Ping {
            let mut r = Response::new(upstream::empty());
            *r.status_mut() = StatusCode::NO_CONTENT;
            return Ok(r);
        }
        // Never passed on: a hop is marked again by the edge that sends it.
        req.headers_mut().remove(mesh::HOP);
        // The client's request id when it sent a sane one, else ours.
        let id = match req.headers().get("x-request-id") {
            Some(v) if !v.is_empty() && v.len() <= 128 && v.to_str().is_ok() => v.clone(),
            _ => HeaderValue::from_str(&format!(
                "{}-{:x}",
                self.id_prefix,
                self.next_id.fetch_add(1, Ordering::Relaxed)
            ))
            .unwrap_or(HeaderValue::from_static("hangar")),
        };
        let Some(host) = request_host(&req) else {
            let e = ProxyError::new(
                Kind::NoHost,
                "the request names no host (send a Host header)",
            );
            return Ok(e.respond(""));
        };
        let Some(site) = self.routes.get(&host) else {
            let e = ProxyError::new(
                Kind::UnknownHost,
                format!(
                    "no app is served at {host}: check the name, or add it to the edge's hosts"
                ),
            );
            return Ok(e.respond(&host));
        };
        if let (true, false, Some(port)) = (site.config.force_https, tls, self.https_port.get()) {
            return Ok(redirect_to_https(&req, &host, *port));
        }
        let metrics = site.metrics.clone();
        metrics.requests.fetch_add(1, Ordering::Relaxed);
        metrics.touch();
        if role == Role::Client && site.config.rate_limit != crate::config::RateLimit::default() {
            if let Err(wait) = site.limiters(view.region_edges()).check(peer.ip()) {
                let e = ProxyError::new(
                    Kind::RateLimited,
                    format!(
                        "too many requests: past the app's rate limit; try again in {wait:.1?}"
                    ),
                );
                let mut r = e.respond(&host);
                metrics.answered(r.status().as_u16());
                let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs));
                return Ok(r);
            }
        }
        let client = Client {
            peer,
            tls,
            id: &id,
            role,
            region: view.clustered().then_some(view.config.region.as_str()),
        };
        let mut resp = self.route(req, &site, &host, client).await;
        metrics.observe(start.elapsed());
        metrics.answered(resp.status().as_u16());
        if resp
            .extensions()
            .get::<Side>()
            .is_some_and(|side| *side != Side::Client)
        {
            metrics.errors.fetch_add(1, Ordering::Relaxed);
        }
        let h = resp.headers_mut();
        h.append(header::VIA, HeaderValue::from_static("1.1 hangar"));
        h.insert("x-request-id", id);
        if view.clustered() {
            name_cache_status(h, &view.config.node, role);
        }
        if role == Role::Client {
            for name in policy::EDGE_ONLY {
                h.remove(name);
            }
        }
        let (parts, body) = resp.into_parts();
        Ok(Response::from_parts(parts, count_bytes(body, metrics)))
    }

    async fn route(
        self: &Arc<Self>,
        req: Request<Incoming>,
        site: &Arc<Site>,
        host: &str,
        client: Client<'_>,
    ) -> Response<Body> {
        if let Some(len) = content_length(req.headers()) {
            if len > self.limits.max_body_bytes {
                let e = ProxyError::new(
                    Kind::BodyTooLarge,
                    format!(
                        "the request body ({len} bytes) is above the limit of {} bytes",
                        self.limits.max_body_bytes
                    ),
                );
                return e.respond(host);
            }
        }
        if is_upgrade(&req) {
            return self.upgrade(req, site, host, client).await;
        }
        // An origin hop is served by this node's machines as it is: the
        // edges that asked cache it.
        let cacheable = matches!(*req.method(), Method::GET | Method::HEAD)
            && site.config.cache.enabled
            && client.role != Role::Origin;
        let (mut parts, body) = req.into_parts();
        if cacheable {
            // Forwarding headers go on only if the request goes upstream.
            return self.cached(parts, site, host, client).await;
        }
        forwarding_headers(&mut parts, client);
        site.metrics.passes.fetch_add(1, Ordering::Relaxed);
        let method = parts.method.clone();
        let path = path_of(&parts);
        let body = ClientBody::new(body, self.limits.max_body_bytes, self.limits.client_timeout)
            .boxed_unsync();
        let resp = self
            .forward(site, parts, body, client.role)
            .await
            .unwrap_or_else(|e| e.respond(host));
        if policy::invalidates(&method, resp.status()) && site.config.cache.enabled {
            self.cache.purge(
                &Purge::Url {
                    host: host.into(),
                    path,
                },
                false,
            );
            for name in [header::LOCATION, header::CONTENT_LOCATION] {
                if let Some(p) = resp
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| same_host_path(v, host))
                {
                    self.cache.purge(
                        &Purge::Url {
                            host: host.into(),
                            path: p,
                        },
                        false,
                    );
                }
            }
        }
        with_status(resp, "fwd=method")
    }
}

/// Who sent a request, for the forwarding headers, and what this edge is
/// for it.
#[derive(Clone, Copy)]
struct Client<'a> {
    peer: SocketAddr,
    tls: bool,
    id: &'a HeaderValue,
    /// A client's request, or a hop from another edge (see [`mesh`]).
    role: Role,
    /// This edge's region, in a cluster.
    region: Option<&'a str>,
}
