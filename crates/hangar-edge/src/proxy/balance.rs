//! Balancing with retry, wake and queue: which backend gets a request,
//! another one when it may, a stopped app woken, a full one waited for.

use super::*;

impl Edge {
    /// Send a request to a backend of `site` (see [`Edge::send`]); the
    /// answer holds the backend's in-flight count until its body is done.
    pub(super) async fn forward(
        &self,
        site: &Arc<Site>,
        parts: Parts,
        body: Body,
        role: Role,
    ) -> Result<Response<Body>, ProxyError> {
        let (resp, guard) = self.send(site, parts, body, role).await?;
        let (parts, body) = resp.into_parts();
        let mut resp = Response::from_parts(
            parts,
            hold(body.map_err(BoxError::from).boxed_unsync(), guard),
        );
        strip_hop_by_hop(resp.headers_mut());
        Ok(resp)
    }

    /// Send a request to a backend of `site`: another backend when one
    /// fails in a way [`ProxyError::retry`] allows (at most three, each
    /// once), the app woken (once) when nothing is started, and a wait in
    /// line when every backend is at its hard limit. In a cluster (unless
    /// this edge is the `Origin` hop itself), when no machine here has
    /// room, the nearest other edge with machines in service takes the
    /// request; when none is started anywhere and none here can start, the
    /// nearest edge that can start one is asked.
    pub(super) async fn send(
        &self,
        site: &Arc<Site>,
        parts: Parts,
        body: Body,
        role: Role,
    ) -> Result<(Response<Incoming>, InFlight), ProxyError> {
        use hyper::body::Body as _;
        let mut tried = Vec::new();
        // An idempotent request without a body can be sent again elsewhere
        // when its backend fails before answering (a machine killed with
        // the request in flight).
        let replayable = body.is_end_stream() && idempotent(&parts.method);
        let mut body = Some(body);
        let mut last: Option<ProxyError> = None;
        let mut site = site.clone();
        let mut woken = false;
        let mut queued_until: Option<Instant> = None;
        let view = self.mesh.view();
        let may_hop = role != Role::Origin && view.clustered();
        loop {
            let mut picked = site.pick(&tried);
            let mut via = None;
            let room = |b: &Backend| {
                site.config.soft_limit == 0 || b.outstanding() < site.config.soft_limit
            };
            if may_hop && !picked.as_deref().is_some_and(room) {
                if let Some(p) = view
                    .nearest(&site.config.elsewhere)
                    .into_iter()
                    .find(|p| !tried.contains(&p.config.addr))
                {
                    picked = Some(p.backend.clone());
                    via = Some(p);
                }
            }
            // Nothing started (or nothing that answers): wake the app
            // (once), then route again.
            if picked.is_none() && !woken && site.config.autostart {
                if let Some(wake) = self.wake(&site.config.name) {
                    woken = true;
                    if let Err(why) = wake.await {
                        return Err(ProxyError::new(
                            Kind::WakeFailed,
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
            // Nothing here can start: the nearest edge that can.
            if picked.is_none() && may_hop {
                if let Some(p) = view
                    .nearest(&site.config.asleep_elsewhere)
                    .into_iter()
                    .find(|p| !tried.contains(&p.config.addr))
                {
                    picked = Some(p.backend.clone());
                    via = Some(p);
                }
            }
            let Some(backend) = picked else {
                if let Some(last) = last {
                    return Err(ProxyError {
                        cause: format!("no backend could be reached: {}", last.cause).into(),
                        ..last
                    });
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
                    return Err(ProxyError::new(
                        Kind::AtLimit,
                        format!("every machine is at its hard limit of {limit} requests in flight (waited {wait:?} for one to finish); raise [http_service.concurrency] hard_limit or add machines"),
                    ));
                }
                let reasons: Vec<String> = site
                    .backends
                    .iter()
                    .map(|b| format!("{}: {}", b.addr, b.reason()))
                    .collect();
                return Err(ProxyError::new(
                    Kind::NoBackend,
                    if site.backends.is_empty() {
                        "the app has no backends (no machine is running)".to_string()
                    } else {
                        format!("no healthy backend ({})", reasons.join("; "))
                    },
                ));
            };
            tried.push(backend.addr);
            let guard = backend.begin();
            let started = Instant::now();
            let mut req_parts = clone_parts(&parts);
            if let Some(p) = &via {
                if let Some(v) = mesh::hop_value(&view.config.token, Role::Origin) {
                    req_parts.headers.insert(mesh::HOP, v);
                }
                if !p.config.delay.is_zero() {
                    tokio::time::sleep(p.config.delay).await;
                }
            } else {
                site.metrics.origin_fetches.fetch_add(1, Ordering::Relaxed);
            }
            // A failed checkout has sent nothing; a failed send may have.
            let attempt = async {
                let conn =
                    upstream::checkout(&backend.pool, &backend.addrs, self.limits.connect_timeout)
                        .await?;
                let req =
                    Request::from_parts(req_parts, body.take().unwrap_or_else(upstream::empty));
                conn.send(
                    req,
                    self.limits.upstream_timeout,
                    self.limits.connect_timeout,
                )
                .await
            };
            let hops_left = tried.len() < 3;
            return match (attempt.await, &via) {
                // The other edge had nothing to serve with: nothing reached
                // an app, so the next one may take the request.
                (Ok(resp), Some(p))
                    if hops_left
                        && replayable
                        && resp
                            .headers()
                            .get(crate::error::ERROR_HEADER)
                            .is_some_and(|k| Kind::nothing_here(k.as_bytes())) =>
                {
                    last = Some(ProxyError::new(
                        Kind::NoBackend,
                        format!("{} had no machine to serve with", p.config.name),
                    ));
                    continue;
                }
                (Ok(resp), via) => {
                    if via.is_none() {
                        site.record_success(&backend, started.elapsed());
                    }
                    Ok((resp, guard))
                }
                (Err(e), via) => {
                    match via {
                        Some(p) => p.failed(),
                        None => site.record_failure(&backend, &e.to_string()),
                    }
                    let e = ProxyError::upstream(&e, replayable);
                    if elsewhere(&e, &tried, &site) || (via.is_some() && e.retry && hops_left) {
                        last = Some(e);
                        continue;
                    }
                    Err(e)
                }
            };
        }
    }
}

/// RFC 9110 section 9.2.2.
pub(super) fn idempotent(m: &Method) -> bool {
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

/// The retry rule: a failed attempt goes to another backend when the error
/// allows it, at most three backends in all, none twice.
fn elsewhere(e: &ProxyError, tried: &[SocketAddr], site: &Site) -> bool {
    e.retry && tried.len() < 3 && tried.len() < site.backends.len()
}
