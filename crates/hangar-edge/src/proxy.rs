//! One request through the edge: route by host, check limits, answer from
//! the cache or fetch (coalesced) from a backend, pass upgrades through,
//! and put the forwarding and cache headers on.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Method, Request, Response, StatusCode, Version};

use crate::backend::{InFlight, Routes, Site};
use crate::cache::fill::{Head, Join, Waited};
use crate::cache::policy::{self, Directives, Times, Use};
use crate::cache::store::{Meta, Object};
use crate::cache::{self, Cache, Purge};
use crate::config::{Config, Limits};
use crate::metrics::HostMetrics;
use crate::upstream::{self, BoxError, UpBody, UpstreamError};

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
        Ok(Edge {
            routes,
            cache: Cache::open(config.cache.clone())?,
            limits: config.limits.clone(),
            next_id: AtomicU64::new(0),
            credential_hasher: Default::default(),
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
        req: Request<Incoming>,
        peer: SocketAddr,
        tls: bool,
    ) -> Result<Response<Body>, std::convert::Infallible> {
        let start = Instant::now();
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
            return Ok(page(
                StatusCode::BAD_REQUEST,
                "",
                "the request names no host (send a Host header)",
            ));
        };
        let Some(site) = self.routes.get(&host) else {
            return Ok(page(
                StatusCode::NOT_FOUND,
                &host,
                &format!(
                    "no app is served at {host}: check the name, or add it to the edge's hosts"
                ),
            ));
        };
        if let (true, false, Some(port)) = (site.config.force_https, tls, self.https_port.get()) {
            return Ok(redirect_to_https(&req, &host, *port));
        }
        let metrics = site.metrics.clone();
        metrics.requests.fetch_add(1, Ordering::Relaxed);
        metrics.touch();
        let client = Client { peer, tls, id: &id };
        let mut resp = self.route(req, &site, &host, client).await;
        metrics.observe(start.elapsed());
        if resp.status().is_server_error() && resp.headers().contains_key("x-hangar-error") {
            metrics.errors.fetch_add(1, Ordering::Relaxed);
        }
        let h = resp.headers_mut();
        h.append(header::VIA, HeaderValue::from_static("1.1 hangar"));
        h.insert("x-request-id", id);
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
                return page(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    host,
                    &format!(
                        "the request body ({len} bytes) is above the limit of {} bytes",
                        self.limits.max_body_bytes
                    ),
                );
            }
        }
        if is_upgrade(&req) {
            return self.upgrade(req, site, host, client).await;
        }
        let cacheable =
            matches!(*req.method(), Method::GET | Method::HEAD) && site.config.cache.enabled;
        let (mut parts, body) = req.into_parts();
        if cacheable {
            // Forwarding headers go on only if the request goes upstream.
            return self.cached(parts, site, host, client).await;
        }
        forwarding_headers(&mut parts, client);
        site.metrics.passes.fetch_add(1, Ordering::Relaxed);
        let method = parts.method.clone();
        let path = path_of(&parts);
        let flag = Arc::new(AtomicU8::new(0));
        let body = ClientBody::new(
            body,
            self.limits.max_body_bytes,
            self.limits.client_timeout,
            flag.clone(),
        )
        .boxed_unsync();
        let resp = self.forward(site, parts, body, &flag).await;
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

    /// Send a request to a backend of `site`, retrying another backend
    /// when one cannot be reached. Errors become pages.
    async fn forward(
        &self,
        site: &Arc<Site>,
        parts: Parts,
        body: Body,
        flag: &AtomicU8,
    ) -> Response<Body> {
        match self.send(site, parts, body).await {
            Ok((resp, guard)) => {
                let (parts, body) = resp.into_parts();
                let mut resp = Response::from_parts(
                    parts,
                    hold(body.map_err(BoxError::from).boxed_unsync(), guard),
                );
                strip_hop_by_hop(resp.headers_mut());
                resp
            }
            Err((status, why)) => match flag.load(Ordering::Relaxed) {
                BODY_TOO_LARGE => page(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &site.config.name,
                    &format!(
                        "the request body is above the limit of {} bytes",
                        self.limits.max_body_bytes
                    ),
                ),
                BODY_TIMEOUT => page(
                    StatusCode::REQUEST_TIMEOUT,
                    &site.config.name,
                    &format!(
                        "the request body stalled for {:?}",
                        self.limits.client_timeout
                    ),
                ),
                _ => page(status, &site.config.name, &why),
            },
        }
    }

    async fn send(
        &self,
        site: &Arc<Site>,
        parts: Parts,
        body: Body,
    ) -> Result<(Response<Incoming>, InFlight), (StatusCode, String)> {
        use hyper::body::Body as _;
        let mut tried = Vec::new();
        // An idempotent request without a body can be sent again elsewhere
        // when its backend fails before answering (a machine killed with
        // the request in flight), as nginx's proxy_next_upstream does.
        let replayable = body.is_end_stream() && idempotent(&parts.method);
        let mut body = Some(body);
        let mut last = String::new();
        let mut site = site.clone();
        let mut woken = false;
        let mut queued_until: Option<Instant> = None;
        loop {
            let picked = site.pick(&tried);
            // Nothing started (or nothing that answers): wake the app
            // (once), then route again.
            if picked.is_none() && !woken && site.config.autostart {
                if let Some(wake) = self.wake(&site.config.name) {
                    woken = true;
                    if let Err(why) = wake.await {
                        return Err((
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("the app could not be started: {why}"),
                        ));
                    }
                    site = self
                        .routes
                        .get(&site.config.name.to_ascii_lowercase())
                        .unwrap_or(site);
                    tried.clear();
                    continue;
                }
            }
            // Busy past the soft limit: start another machine meanwhile.
            if let Some(b) = &picked {
                let limit = site.config.soft_limit;
                if site.config.autostart && limit > 0 && b.outstanding() >= limit {
                    if let Some(wake) = self.wake(&site.config.name) {
                        tokio::spawn(async move {
                            // Best effort: the request goes on meanwhile.
                            let _ = wake.await;
                        });
                    }
                }
            }
            let Some(backend) = picked else {
                if !last.is_empty() {
                    return Err((
                        StatusCode::BAD_GATEWAY,
                        format!("no backend could be reached: {last}"),
                    ));
                }
                let limit = site.config.hard_limit;
                if limit > 0
                    && site
                        .backends
                        .iter()
                        .any(|b| b.healthy() && b.outstanding() >= limit)
                {
                    // Full: wait in line for a request to finish.
                    let wait = site.config.queue_timeout;
                    let until = *queued_until.get_or_insert_with(|| Instant::now() + wait);
                    if Instant::now() < until {
                        let s = site.clone();
                        site.slots
                            .wait(until, move || {
                                s.backends
                                    .iter()
                                    .any(|b| b.healthy() && b.outstanding() < limit)
                            })
                            .await;
                        // The table may have changed meanwhile (a machine
                        // added): route again on the current one.
                        site = self
                            .routes
                            .get(&site.config.name.to_ascii_lowercase())
                            .unwrap_or(site);
                        continue;
                    }
                    return Err((
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("every machine is at its hard limit of {limit} requests in flight (waited {wait:?} for one to finish); raise [http_service.concurrency] hard_limit or add machines"),
                    ));
                }
                let reasons: Vec<String> = site
                    .backends
                    .iter()
                    .map(|b| format!("{}: {}", b.addr, b.reason()))
                    .collect();
                return Err((
                    StatusCode::SERVICE_UNAVAILABLE,
                    if site.backends.is_empty() {
                        "the app has no backends (no machine is running)".to_string()
                    } else {
                        format!("no healthy backend ({})", reasons.join("; "))
                    },
                ));
            };
            tried.push(backend.addr);
            let guard = backend.begin();
            site.metrics.origin_fetches.fetch_add(1, Ordering::Relaxed);
            let started = Instant::now();
            let conn = match upstream::checkout(
                &backend.pool,
                &backend.addrs,
                self.limits.connect_timeout,
            )
            .await
            {
                Ok(c) => c,
                Err(e) => {
                    site.record_failure(&backend, &e.to_string());
                    last = e.to_string();
                    // Nothing was sent: another backend may take it.
                    if tried.len() < 3 && tried.len() < site.backends.len() {
                        continue;
                    }
                    return Err((StatusCode::BAD_GATEWAY, e.to_string()));
                }
            };
            let req = Request::from_parts(
                clone_parts(&parts),
                body.take().unwrap_or_else(upstream::empty),
            );
            return match conn
                .send(
                    req,
                    self.limits.upstream_timeout,
                    self.limits.connect_timeout,
                )
                .await
            {
                Ok(resp) => {
                    site.record_success(&backend, started.elapsed());
                    Ok((resp, guard))
                }
                Err(e) => {
                    site.record_failure(&backend, &e.to_string());
                    let status = match e {
                        UpstreamError::Timeout(..) => StatusCode::GATEWAY_TIMEOUT,
                        _ => StatusCode::BAD_GATEWAY,
                    };
                    if status == StatusCode::BAD_GATEWAY
                        && replayable
                        && tried.len() < 3
                        && tried.len() < site.backends.len()
                    {
                        last = e.to_string();
                        continue;
                    }
                    Err((status, e.to_string()))
                }
            };
        }
    }

    /// GET and HEAD through the cache.
    async fn cached(
        self: &Arc<Self>,
        parts: Parts,
        site: &Arc<Site>,
        host: &str,
        client: Client<'_>,
    ) -> Response<Body> {
        let m = &site.metrics;
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let primary = cache::primary_key(host, path);
        let (key, mut stored) = self.cache.store.lookup(&primary, &parts.headers).await;
        // A request with credentials is answered from the cache only when
        // the stored response allows it (RFC 9111 section 3.5), and shares
        // a fill only with requests carrying the same credentials.
        let credentials = parts.headers.get(header::AUTHORIZATION);
        if credentials.is_some() {
            if let Some(obj) = &stored {
                let d = &obj.meta.directives;
                if !(d.public || d.must_revalidate || d.s_maxage.is_some()) {
                    stored = None;
                }
            }
        }
        let mut stale_if_error = false;
        if let Some(obj) = &stored {
            let meta = &obj.meta;
            let age = policy::age_at(meta.initial_age, meta.times, SystemTime::now());
            let lifetime = Duration::from_secs_f64(meta.lifetime);
            match policy::decide_parsed(
                &parts.headers,
                &meta.directives,
                lifetime,
                age,
                meta.invalidated,
            ) {
                Use::Fresh => {
                    m.hits.fetch_add(1, Ordering::Relaxed);
                    return serve_object(&parts, obj, age, "hit");
                }
                Use::StaleWhileRevalidate => {
                    m.stale.fetch_add(1, Ordering::Relaxed);
                    if let Join::Lead(fill, reg) = self.cache.fills.join(&key) {
                        let job = FillJob {
                            site: site.clone(),
                            parts: origin_parts(&parts, Some(obj), client),
                            key: key.clone(),
                            fill_key: key.clone(),
                            primary,
                            stored: stored.clone(),
                            host: host.into(),
                            path: path.to_string(),
                        };
                        let edge = self.clone();
                        tokio::spawn(async move { edge.run_fill(job, fill, reg, None).await });
                    }
                    return serve_object(&parts, obj, age, "hit; detail=stale-while-revalidate");
                }
                Use::Validate {
                    stale_if_error: sie,
                } => stale_if_error = sie,
            }
        }
        if Directives::parse(&parts.headers).only_if_cached {
            return page(
                StatusCode::GATEWAY_TIMEOUT,
                host,
                "only-if-cached: the response is not in the cache",
            );
        }
        let fill_key = match credentials {
            Some(c) => {
                use std::hash::BuildHasher;
                let h = self.credential_hasher.hash_one(c.as_bytes());
                format!("{key}\ncredentials={h:x}")
            }
            None => key.clone(),
        };
        let fwd = if stored.is_some() {
            "fwd=stale"
        } else {
            "fwd=miss"
        };
        let (fill, wait) = match self.cache.fills.join(&fill_key) {
            Join::Bypass => {
                m.passes.fetch_add(1, Ordering::Relaxed);
                return self
                    .pass(&parts, site, client, "fwd=miss; detail=uncacheable")
                    .await;
            }
            Join::Wait(fill) => {
                m.coalesced.fetch_add(1, Ordering::Relaxed);
                (fill, Some(self.cache.config.lock_timeout))
            }
            Join::Lead(fill, reg) => {
                m.misses.fetch_add(1, Ordering::Relaxed);
                let (tx, rx) = tokio::sync::oneshot::channel();
                let job = FillJob {
                    site: site.clone(),
                    parts: origin_parts(&parts, stored.as_ref(), client),
                    key: key.clone(),
                    fill_key: fill_key.clone(),
                    primary,
                    stored: stored.clone(),
                    host: host.into(),
                    path: path.to_string(),
                };
                let edge = self.clone();
                let f = fill.clone();
                tokio::spawn(async move { edge.run_fill(job, f, reg, Some(tx)).await });
                match fill.wait(None).await {
                    Waited::Pass => {
                        return match rx.await {
                            Ok((resp, note)) => with_status(resp, &format!("{fwd}; detail={note}")),
                            Err(_) => {
                                page(StatusCode::BAD_GATEWAY, host, "the origin request ended")
                            }
                        }
                    }
                    waited => {
                        return self
                            .answer(
                                waited,
                                fill,
                                &parts,
                                (site, host, client),
                                stored.as_ref(),
                                stale_if_error,
                                fwd,
                            )
                            .await
                    }
                }
            }
        };
        let waited = fill.wait(wait).await;
        self.answer(
            waited,
            fill,
            &parts,
            (site, host, client),
            stored.as_ref(),
            stale_if_error,
            "fwd=miss; collapsed",
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn answer(
        &self,
        waited: Waited,
        fill: Arc<crate::cache::fill::Fill>,
        parts: &Parts,
        (site, host, client): (&Arc<Site>, &str, Client<'_>),
        stored: Option<&Object>,
        stale_if_error: bool,
        note: &str,
    ) -> Response<Body> {
        match waited {
            Waited::Shared(head) => {
                // Another request's variant (Vary): fetch our own.
                let vary = cache::vary_names(&head.headers);
                let primary = cache::primary_key(host, &path_of(parts));
                if cache::full_key(&primary, &vary, &parts.headers) != head.key {
                    return self
                        .pass(parts, site, client, "fwd=miss; detail=vary")
                        .await;
                }
                let body = if parts.method == Method::HEAD {
                    upstream::empty()
                } else {
                    match fill.body() {
                        Some(body) => StreamBody::new(body).map_err(BoxError::from).boxed_unsync(),
                        // Too big to share, and its start is gone already.
                        None => {
                            return self
                                .pass(parts, site, client, "fwd=miss; detail=too-big")
                                .await
                        }
                    }
                };
                let mut resp = Response::new(body);
                *resp.status_mut() = head.status;
                *resp.headers_mut() = head.headers.clone();
                let note = if head.status == StatusCode::NOT_MODIFIED {
                    note.to_string()
                } else {
                    format!("{note}; stored")
                };
                with_status(resp, &note)
            }
            Waited::Failed(status, why) => match stored {
                Some(obj) if stale_if_error => {
                    site.metrics.stale.fetch_add(1, Ordering::Relaxed);
                    let age =
                        policy::age_at(obj.meta.initial_age, obj.meta.times, SystemTime::now());
                    serve_object(parts, obj, age, "hit; fwd=stale; detail=stale-if-error")
                }
                _ => page(status, host, &why),
            },
            Waited::Pass => {
                self.pass(parts, site, client, "fwd=miss; detail=uncacheable")
                    .await
            }
            Waited::TimedOut => {
                self.pass(parts, site, client, "fwd=miss; detail=lock-timeout")
                    .await
            }
        }
    }

    /// Go to the origin for this request alone, storing nothing.
    async fn pass(
        &self,
        parts: &Parts,
        site: &Arc<Site>,
        client: Client<'_>,
        note: &str,
    ) -> Response<Body> {
        let mut parts = clone_parts(parts);
        forwarding_headers(&mut parts, client);
        let flag = AtomicU8::new(0);
        with_status(
            self.forward(site, parts, upstream::empty(), &flag).await,
            note,
        )
    }

    /// The leader's origin fetch, detached from the client so a client
    /// that leaves does not fail the waiters.
    async fn run_fill(
        self: Arc<Self>,
        job: FillJob,
        fill: Arc<crate::cache::fill::Fill>,
        reg: crate::cache::fill::Registration,
        pass_to: Option<tokio::sync::oneshot::Sender<(Response<Body>, String)>>,
    ) {
        let request_time = SystemTime::now();
        let req_headers = job.parts.headers.clone();
        let result = self.send(&job.site, job.parts, upstream::empty()).await;
        let (resp, guard) = match result {
            Ok(r) => r,
            Err((status, why)) => return fill.fail(status, &why),
        };
        let response_time = SystemTime::now();
        let times = Times {
            request: policy::unix(request_time),
            response: policy::unix(response_time),
        };
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let default_ttl = job.site.config.cache.default_ttl;

        // 304: refresh the stored object.
        if parts.status == StatusCode::NOT_MODIFIED {
            if let Some(obj) = &job.stored {
                let mut headers = obj.meta.headers().clone();
                policy::merge_304(&mut headers, &parts.headers);
                let lifetime = policy::freshness_lifetime(
                    StatusCode::from_u16(obj.meta.status).unwrap_or(StatusCode::OK),
                    &headers,
                    default_ttl,
                );
                if let Some(meta) =
                    obj.meta
                        .refreshed(headers.clone(), times, lifetime.as_secs_f64())
                {
                    self.cache.store.put(meta, obj.body.clone());
                }
                let status = StatusCode::from_u16(obj.meta.status).unwrap_or(StatusCode::OK);
                fill.share(Arc::new(Head {
                    status,
                    headers,
                    key: job.key.clone(),
                    len: Some(obj.body.len() as u64),
                }));
                fill.push(obj.body.clone());
                fill.finish();
                return;
            }
        }
        // An origin error with a stored response that may serve instead.
        if parts.status.is_server_error() && job.stored.is_some() {
            return fill.fail(
                parts.status,
                &format!("the origin answered {}", parts.status),
            );
        }
        let len = content_length(&parts.headers);
        let verdict = policy::storable(&Method::GET, &req_headers, parts.status, &parts.headers)
            .and_then(|()| {
                if len.is_some_and(|l| l > self.cache.config.max_object) {
                    Err("too-big")
                } else {
                    Ok(())
                }
            });
        if let Err(why) = verdict {
            if why != "too-big" {
                self.cache
                    .fills
                    .mark_uncacheable(&job.fill_key, self.cache.config.uncacheable_ttl);
            }
            fill.pass();
            if let Some(tx) = pass_to {
                let body = hold(body.map_err(BoxError::from).boxed_unsync(), guard);
                let _ = tx.send((Response::from_parts(parts, body), why.to_string()));
            }
            return;
        }
        let vary = cache::vary_names(&parts.headers);
        let primary = job.primary.clone();
        let key = cache::full_key(&primary, &vary, &req_headers);
        fill.share(Arc::new(Head {
            status: parts.status,
            headers: parts.headers.clone(),
            key: key.clone(),
            len,
        }));
        let mut body = body;
        let mut total = 0u64;
        let max = self.cache.config.max_object;
        let mut streaming = false;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => {
                    if let Ok(data) = f.into_data() {
                        total += data.len() as u64;
                        fill.push(data);
                        // Past the largest object (its length was not
                        // said): a stream paced by its readers, no longer
                        // joined by new requests.
                        if total > max && !streaming {
                            streaming = true;
                            fill.stream();
                            reg.unlist();
                        }
                        if streaming && !fill.room().await {
                            return; // every reader left
                        }
                    }
                }
                Err(e) => {
                    return fill.fail(
                        StatusCode::BAD_GATEWAY,
                        &format!("the origin's body broke off: {e}"),
                    )
                }
            }
        }
        drop(guard);
        fill.finish();
        if total > self.cache.config.max_object || len.is_some_and(|l| l != total) {
            return;
        }
        let lifetime = policy::freshness_lifetime(parts.status, &parts.headers, default_ttl);
        let tags = cache::tags(&parts.headers);
        if let Some(meta) = Meta::new(
            key,
            primary,
            job.host,
            job.path,
            vary,
            parts.status.as_u16(),
            parts.headers,
            times,
            lifetime.as_secs_f64(),
            tags,
            total,
        ) {
            self.cache.store.put(meta, fill.collected());
        }
    }

    /// WebSocket and other upgrades: forward the handshake on a fresh
    /// connection, then splice the two upgraded streams.
    async fn upgrade(
        &self,
        mut req: Request<Incoming>,
        site: &Arc<Site>,
        host: &str,
        client: Client<'_>,
    ) -> Response<Body> {
        let downstream = hyper::upgrade::on(&mut req);
        let (mut parts, _) = req.into_parts();
        let upgrade = parts.headers.get(header::UPGRADE).cloned();
        forwarding_headers(&mut parts, client);
        if let Some(u) = upgrade {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(header::UPGRADE, u);
        }
        let Some(backend) = site.pick(&[]) else {
            return page(
                StatusCode::SERVICE_UNAVAILABLE,
                host,
                "no healthy backend for the upgrade",
            );
        };
        let guard = backend.begin();
        let mut sender = match upstream::connect(&backend.addrs, self.limits.connect_timeout).await
        {
            Ok(s) => s,
            Err(e) => return page(StatusCode::BAD_GATEWAY, host, &e.to_string()),
        };
        let mut resp = match sender
            .send_request(Request::from_parts(parts, upstream::empty()))
            .await
        {
            Ok(r) => r,
            Err(e) => {
                return page(
                    StatusCode::BAD_GATEWAY,
                    host,
                    &format!("{}: {e}", backend.addr),
                )
            }
        };
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            let (parts, body) = resp.into_parts();
            return Response::from_parts(parts, body.map_err(BoxError::from).boxed_unsync());
        }
        let server = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            let _guard = guard;
            if let (Ok(c), Ok(s)) = (downstream.await, server.await) {
                let mut c = hyper_util::rt::TokioIo::new(c);
                let mut s = hyper_util::rt::TokioIo::new(s);
                let _ = tokio::io::copy_bidirectional(&mut c, &mut s).await;
            }
        });
        let (parts, _) = resp.into_parts();
        Response::from_parts(parts, upstream::empty())
    }
}

/// Who sent a request, for the forwarding headers.
#[derive(Clone, Copy)]
struct Client<'a> {
    peer: SocketAddr,
    tls: bool,
    id: &'a HeaderValue,
}

struct FillJob {
    site: Arc<Site>,
    parts: Parts,
    /// The storage key (primary key and Vary values).
    key: String,
    /// The coalescing key (the storage key, plus credentials when sent).
    fill_key: String,
    primary: String,
    stored: Option<Object>,
    host: String,
    path: String,
}

/// The request the cache sends to fill a key: always GET, never partial,
/// conditional on the stored response's validators (not the client's).
fn origin_parts(parts: &Parts, stored: Option<&Object>, client: Client<'_>) -> Parts {
    let mut p = clone_parts(parts);
    forwarding_headers(&mut p, client);
    p.method = Method::GET;
    for h in [
        header::IF_NONE_MATCH,
        header::IF_MODIFIED_SINCE,
        header::IF_MATCH,
        header::IF_UNMODIFIED_SINCE,
        header::IF_RANGE,
        header::RANGE,
    ] {
        p.headers.remove(h);
    }
    if let Some(obj) = stored {
        if let Some(etag) = obj.meta.headers().get(header::ETAG) {
            p.headers.insert(header::IF_NONE_MATCH, etag.clone());
        }
        if let Some(lm) = obj.meta.headers().get(header::LAST_MODIFIED) {
            p.headers.insert(header::IF_MODIFIED_SINCE, lm.clone());
        }
    }
    p
}

/// Answer from a stored object: 304 for a matching conditional request,
/// 206 for one byte range, else the whole object.
fn serve_object(parts: &Parts, obj: &Object, age: Duration, note: &str) -> Response<Body> {
    let stored = obj.meta.headers();
    let status = StatusCode::from_u16(obj.meta.status).unwrap_or(StatusCode::OK);
    let mut headers = stored.clone();
    headers.insert(header::AGE, HeaderValue::from(age.as_secs()));
    let full = |headers: HeaderMap, status: StatusCode, body: Bytes| {
        let mut r = Response::new(if parts.method == Method::HEAD {
            upstream::empty()
        } else {
            Full::new(body).map_err(|e| match e {}).boxed_unsync()
        });
        *r.status_mut() = status;
        *r.headers_mut() = headers;
        with_status(r, note)
    };
    if status == StatusCode::OK && policy::not_modified(&parts.headers, stored) {
        headers.remove(header::CONTENT_LENGTH);
        return full(headers, StatusCode::NOT_MODIFIED, Bytes::new());
    }
    if status == StatusCode::OK {
        let len = obj.body.len() as u64;
        headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        match policy::byte_range(&parts.headers, len) {
            Ok(Some((a, b))) => {
                let range = format!("bytes {a}-{b}/{len}");
                headers.insert(
                    header::CONTENT_RANGE,
                    HeaderValue::from_str(&range).unwrap_or(HeaderValue::from_static("")),
                );
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(b - a + 1));
                return full(
                    headers,
                    StatusCode::PARTIAL_CONTENT,
                    obj.body.slice(a as usize..=b as usize),
                );
            }
            Err(()) => {
                headers.insert(
                    header::CONTENT_RANGE,
                    HeaderValue::from_str(&format!("bytes */{len}"))
                        .unwrap_or(HeaderValue::from_static("")),
                );
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(0));
                return full(headers, StatusCode::RANGE_NOT_SATISFIABLE, Bytes::new());
            }
            Ok(None) => {}
        }
    }
    full(headers, status, obj.body.clone())
}

fn with_status(mut resp: Response<Body>, note: &str) -> Response<Body> {
    let value = if note == "hit" {
        Ok(HeaderValue::from_static("hangar; hit")) // the hot path: no allocation
    } else {
        HeaderValue::from_str(&format!("hangar; {note}"))
    };
    if let Ok(v) = value {
        resp.headers_mut().append("cache-status", v);
    }
    resp
}

/// 308 to the same URL over HTTPS.
fn redirect_to_https<B>(req: &Request<B>, host: &str, port: u16) -> Response<Body> {
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let port = if port == 443 {
        String::new()
    } else {
        format!(":{port}")
    };
    let mut r = Response::new(upstream::empty());
    *r.status_mut() = StatusCode::PERMANENT_REDIRECT;
    if let Ok(v) = HeaderValue::from_str(&format!("https://{host}{port}{path}")) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// An error page that says what happened and where.
pub fn page(status: StatusCode, host: &str, why: &str) -> Response<Body> {
    let title = format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    let escaped = why
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    let host_line = if host.is_empty() {
        String::new()
    } else {
        format!("<p>Host: <code>{}</code></p>", host.replace('<', "&lt;"))
    };
    let html = format!(
        "<!doctype html><html><head><title>{title}</title></head><body><h1>{title}</h1>{host_line}<p>{escaped}</p><hr><p>hangar edge</p></body></html>\n"
    );
    let mut r = Response::new(
        Full::new(Bytes::from(html))
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(v) = HeaderValue::from_str(&why.replace(['\r', '\n'], " ")) {
        h.insert("x-hangar-error", v);
    }
    r
}

/// The host a request is for, lowercase, without a port.
fn request_host<B>(req: &Request<B>) -> Option<String> {
    let raw = match req.uri().host() {
        Some(h) => h,
        None => req.headers().get(header::HOST)?.to_str().ok()?,
    };
    let host = match raw.strip_prefix('[') {
        // An IPv6 literal keeps its brackets.
        Some(rest) => &raw[..rest.find(']')? + 2],
        None => raw.split(':').next()?,
    };
    let host = host.trim().trim_end_matches('.');
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

fn path_of(parts: &Parts) -> String {
    parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into())
}

fn same_host_path(location: &str, host: &str) -> Option<String> {
    if location.starts_with('/') {
        return Some(location.to_string());
    }
    let uri: hyper::Uri = location.parse().ok()?;
    (uri.host()?.eq_ignore_ascii_case(host)).then(|| {
        uri.path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_else(|| "/".into())
    })
}

fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// RFC 9110 section 9.2.2.
fn idempotent(m: &Method) -> bool {
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::TRACE,
        Method::PUT,
        Method::DELETE,
    ]
    .contains(m)
}

pub fn clone_parts(p: &Parts) -> Parts {
    let mut r = Request::new(());
    *r.method_mut() = p.method.clone();
    *r.uri_mut() = p.uri.clone();
    *r.version_mut() = p.version;
    *r.headers_mut() = p.headers.clone();
    r.into_parts().0
}

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in HOP_BY_HOP {
        h.remove(n);
    }
}

/// Turn a client's request into the one a backend gets: origin-form,
/// HTTP/1.1, Host kept, the forwarding headers added.
fn forwarding_headers(parts: &mut Parts, client: Client<'_>) {
    let Client { peer, tls, id } = client;
    let original_host = parts.headers.get(header::HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    let version = parts.version;
    strip_hop_by_hop(&mut parts.headers);
    if let Ok(uri) = path_of(parts).parse() {
        parts.uri = uri;
    }
    parts.version = Version::HTTP_11;
    let h = &mut parts.headers;
    if let Some(v) = original_host {
        h.insert(header::HOST, v.clone());
        h.insert("x-forwarded-host", v);
    }
    let xff = match h.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {}", peer.ip()),
        None => peer.ip().to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        h.insert("x-forwarded-for", v);
    }
    h.insert(
        "x-forwarded-proto",
        HeaderValue::from_static(if tls { "https" } else { "http" }),
    );
    h.append(
        header::VIA,
        HeaderValue::from_static(if version == Version::HTTP_2 {
            "2 hangar"
        } else {
            "1.1 hangar"
        }),
    );
    h.insert("x-request-id", id.clone());
}

/// Keep `guard` (an outstanding-request count) until the body is done.
fn hold(body: Body, guard: InFlight) -> Body {
    body.map_frame(move |f| {
        let _held = &guard;
        f
    })
    .boxed_unsync()
}

fn count_bytes(body: Body, metrics: Arc<HostMetrics>) -> Body {
    use hyper::body::Body as _;
    if let Some(n) = body.size_hint().exact() {
        // A whole body (cache hits, pages): count it now, no wrapper.
        metrics.bytes_out.fetch_add(n, Ordering::Relaxed);
        return body;
    }
    body.map_frame(move |f| {
        if let Some(d) = f.data_ref() {
            metrics
                .bytes_out
                .fetch_add(d.len() as u64, Ordering::Relaxed);
        }
        f
    })
    .boxed_unsync()
}

const BODY_TOO_LARGE: u8 = 1;
const BODY_TIMEOUT: u8 = 2;

/// A client's request body with the size limit and an idle timeout; which
/// one tripped is left in `flag` so the answer can be 413 or 408.
struct ClientBody {
    inner: Incoming,
    left: u64,
    idle: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
    flag: Arc<AtomicU8>,
}

impl ClientBody {
    fn new(inner: Incoming, limit: u64, idle: Duration, flag: Arc<AtomicU8>) -> ClientBody {
        ClientBody {
            inner,
            left: limit,
            idle,
            sleep: Box::pin(tokio::time::sleep(idle)),
            flag,
        }
    }
}

impl hyper::body::Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    if d.len() as u64 > this.left {
                        this.flag.store(BODY_TOO_LARGE, Ordering::Relaxed);
                        return Poll::Ready(Some(Err("request body too large".into())));
                    }
                    this.left -= d.len() as u64;
                }
                let deadline = tokio::time::Instant::now() + this.idle;
                this.sleep.as_mut().reset(deadline);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if std::future::Future::poll(this.sleep.as_mut(), cx).is_ready() {
                    this.flag.store(BODY_TIMEOUT, Ordering::Relaxed);
                    return Poll::Ready(Some(Err("request body timed out".into())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host_of(uri: &str, host: Option<&str>) -> Option<String> {
        let mut b = Request::builder().uri(uri);
        if let Some(h) = host {
            b = b.header(header::HOST, h);
        }
        request_host(&b.body(()).unwrap())
    }

    #[test]
    fn hosts_are_lowercase_without_port_or_trailing_dot() {
        assert_eq!(
            host_of("/", Some("App.Localhost:8080")).as_deref(),
            Some("app.localhost")
        );
        assert_eq!(
            host_of("/", Some("app.localhost.")).as_deref(),
            Some("app.localhost")
        );
        assert_eq!(host_of("/", Some("[::1]:8080")).as_deref(), Some("[::1]"));
        assert_eq!(
            host_of("https://h2.localhost/x", None).as_deref(),
            Some("h2.localhost")
        );
        assert_eq!(host_of("/", None), None);
        assert_eq!(host_of("/", Some(":80")), None);
    }

    #[test]
    fn hop_by_hop_headers_go_including_those_connection_names() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(
            h.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
            vec!["x-kept"]
        );
    }
}
