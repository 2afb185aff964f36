//! Balancing with retry, wake and queue: which backend gets a request,
//! another one when it may, a stopped app woken, a full one waited for;
//! and replays: a response with `hangar-replay` (`region=`, `instance=`,
//! `elsewhere=true`, as Fly's `fly-replay`) sends the request again there,
//! once.

use super::*;

/// The app's answer that asks for the request to be replayed elsewhere.
pub const REPLAY: &str = "hangar-replay";
/// On a replayed request: the node that replayed it (the app may read it;
/// a response asking to replay it again is refused, so nothing loops).
pub const REPLAYED: &str = "hangar-replayed";
/// A request for one machine of the app, by id (a client's, or a replay's).
pub const FORCE_INSTANCE: &str = "hangar-force-instance-id";
/// The largest request body kept whole so that the request can be
/// replayed (Fly keeps 1 MiB too).
const REPLAY_BODY: u64 = 1 << 20;

/// Which backends a request may go to.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Target {
    Any,
    /// One machine, by id.
    Instance(String),
    /// A machine in this region.
    Region(String),
    /// Any backend but the one that answered.
    Elsewhere(SocketAddr),
}

impl Target {
    /// What a `hangar-replay` value asks for (`answered`: the backend
    /// that sent it).
    fn from_replay(v: &str, answered: SocketAddr) -> Option<Target> {
        for item in v.split([';', ',']) {
            let (k, val) = item.split_once('=')?;
            let val = val.trim().trim_matches('"');
            match k.trim().to_ascii_lowercase().as_str() {
                "instance" if !val.is_empty() => return Some(Target::Instance(val.into())),
                "region" if !val.is_empty() => return Some(Target::Region(val.into())),
                "elsewhere" if val == "true" => return Some(Target::Elsewhere(answered)),
                _ => {}
            }
        }
        None
    }
}

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
        let forced = parts
            .headers
            .get(FORCE_INSTANCE)
            .and_then(|v| v.to_str().ok())
            .map(|id| Target::Instance(id.to_string()))
            .unwrap_or(Target::Any);
        // An origin hop passes a replay back to the edge that sent it,
        // which can reach the other regions.
        if role == Role::Origin {
            return self.send_to(site, parts, body, role, &forced).await;
        }
        // A small body is kept whole, so the request can be sent again.
        let (kept, body) = match body.size_hint().exact() {
            Some(n) if n <= REPLAY_BODY => {
                let whole = body
                    .collect()
                    .await
                    .map_err(|e| ProxyError::client_body(&*e))?
                    .to_bytes();
                let again = Full::new(whole.clone())
                    .map_err(|e| match e {})
                    .boxed_unsync();
                (Some(whole), again)
            }
            _ => (None, body),
        };
        let (resp, guard) = self
            .send_to(site, clone_parts(&parts), body, role, &forced)
            .await?;
        let Some(target) = resp
            .headers()
            .get(REPLAY)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Target::from_replay(v, guard.addr()))
        else {
            return Ok((resp, guard));
        };
        if parts.headers.contains_key(REPLAYED) {
            return Err(ProxyError::new(
                Kind::ReplayLoop,
                "the app asked to replay a request that was replayed already (once is the limit)",
            ));
        }
        let Some(kept) = kept else {
            return Err(ProxyError::new(
                Kind::Request,
                "the app asked to replay the request, but its body (over 1 MiB, or of no stated length) was not kept",
            ));
        };
        drop((resp, guard));
        let view = self.mesh.view();
        let mut again = clone_parts(&parts);
        let by = if view.clustered() {
            view.config.node.as_str()
        } else {
            "edge"
        };
        if let Ok(v) = HeaderValue::from_str(by) {
            again.headers.insert(REPLAYED, v);
        }
        if let Target::Instance(id) = &target {
            if let Ok(v) = HeaderValue::from_str(id) {
                again.headers.insert(FORCE_INSTANCE, v);
            }
        }
        let body = Full::new(kept).map_err(|e| match e {}).boxed_unsync();
        let (resp, guard) = self.send_to(site, again, body, role, &target).await?;
        if resp.headers().contains_key(REPLAY) {
            return Err(ProxyError::new(
                Kind::ReplayLoop,
                "the app asked to replay a request that was replayed already (once is the limit)",
            ));
        }
        Ok((resp, guard))
    }

    /// [`Edge::send`] to the backends `target` allows.
    async fn send_to(
        &self,
        site: &Arc<Site>,
        parts: Parts,
        body: Body,
        role: Role,
        target: &Target,
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
            if *target != Target::Any {
                let Some((backend, via)) = self.pick_target(&site, &view, target, &tried, may_hop)
                else {
                    return Err(last.unwrap_or_else(|| {
                        ProxyError::new(
                            Kind::NoBackend,
                            match target {
                                Target::Instance(id) => {
                                    format!("no machine {id:?} of the app is in service")
                                }
                                Target::Region(r) => {
                                    format!("no machine of the app is in service in region {r}")
                                }
                                _ => "no other machine of the app is in service".to_string(),
                            },
                        )
                    }));
                };
                tried.push(backend.addr);
                match self
                    .attempt(
                        &site,
                        &view,
                        &backend,
                        via.as_deref(),
                        &parts,
                        &mut body,
                        replayable,
                    )
                    .await
                {
                    Err(e) if e.retry && tried.len() < 3 => last = Some(e),
                    answer => return answer,
                }
                continue;
            }
            let mut picked = site.pick(&tried);
            let mut via = None;
            let room = |b: &Backend| {
                site.config.soft_limit == 0 || b.outstanding() < site.config.soft_limit
            };
            if may_hop && !picked.as_deref().is_some_and(room) {
                // The nearest edge serving the app well; when none does,
                // the nearest at all (a bad signal must not take it down).
                let nearest = view.nearest(&site.config.elsewhere);
                let untried = |p: &&Arc<mesh::Peer>| !tried.contains(&p.config.addr);
                if let Some(p) = nearest
                    .iter()
                    .filter(untried)
                    .find(|p| site.remote_usable(&p.config.region))
                    .or_else(|| nearest.iter().find(untried))
                    .cloned()
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
                    site.metrics.cold_starts.fetch_add(1, Ordering::Relaxed);
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
            let hops_left = tried.len() < 3;
            match self
                .attempt(
                    site.as_ref(),
                    &view,
                    &backend,
                    via.as_deref(),
                    &parts,
                    &mut body,
                    replayable,
                )
                .await
            {
                Ok(answer) => return Ok(answer),
                Err(e) => {
                    // Another machine here, or (all tried) another node's.
                    let remote = may_hop && !site.config.elsewhere.is_empty();
                    if elsewhere(&e, &tried, &site)
                        || (e.retry && hops_left && (via.is_some() || remote))
                    {
                        last = Some(e);
                        continue;
                    }
                    return Err(e);
                }
            }
        }
    }

    /// The backends of `site` that `target` (not `Any`) allows, first not
    /// yet `tried`: a local one, or another node's edge (`may_hop`).
    fn pick_target(
        &self,
        site: &Site,
        view: &mesh::View,
        target: &Target,
        tried: &[SocketAddr],
        may_hop: bool,
    ) -> Option<(Arc<Backend>, Option<Arc<mesh::Peer>>)> {
        let local = |addr: &SocketAddr| {
            site.backends
                .iter()
                .find(|b| b.addr == *addr && !tried.contains(&b.addr) && b.healthy())
                .cloned()
        };
        let peer = |pred: &dyn Fn(&mesh::Peer) -> bool, nodes: &[String]| {
            if !may_hop {
                return None;
            }
            view.nearest(nodes)
                .into_iter()
                .find(|p| !tried.contains(&p.config.addr) && pred(p))
                .map(|p| (p.backend.clone(), Some(p)))
        };
        match target {
            Target::Any => None,
            Target::Instance(id) => {
                if let Some(addr) = site.config.instances.get(id) {
                    return local(addr).map(|b| (b, None));
                }
                let node = site.config.instances_elsewhere.get(id)?;
                peer(&|p| p.config.name == *node, std::slice::from_ref(node))
            }
            Target::Region(r) if !view.clustered() || *r == view.config.region => {
                site.pick(tried).map(|b| (b, None))
            }
            Target::Region(r) => peer(&|p| p.config.region == *r, &site.config.elsewhere),
            Target::Elsewhere(not) => {
                let mut skip = tried.to_vec();
                skip.push(*not);
                site.pick(&skip)
                    .map(|b| (b, None))
                    .or_else(|| peer(&|p| p.config.addr != *not, &site.config.elsewhere))
            }
        }
    }

    /// One try at `backend` (through the edge `via`, as an origin hop).
    /// A failure's `retry` says whether another may take the request: a
    /// connect error, a replayable request that broke, or another edge that
    /// had nothing to serve with.
    #[allow(clippy::too_many_arguments)]
    async fn attempt(
        &self,
        site: &Site,
        view: &mesh::View,
        backend: &Arc<Backend>,
        via: Option<&mesh::Peer>,
        parts: &Parts,
        body: &mut Option<Body>,
        replayable: bool,
    ) -> Result<(Response<Incoming>, InFlight), ProxyError> {
        let guard = backend.begin();
        let started = Instant::now();
        let mut req_parts = clone_parts(parts);
        if let Some(p) = via {
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
            // Taken only once connected: a refused connection keeps the
            // body for the next backend.
            let req = Request::from_parts(req_parts, body.take().unwrap_or_else(upstream::empty));
            conn.send(
                req,
                self.limits.upstream_timeout,
                self.limits.connect_timeout,
            )
            .await
        };
        match (attempt.await, via) {
            // The other edge had nothing to serve with: nothing reached an
            // app, so the next one may take the request.
            (Ok(resp), Some(p))
                if replayable
                    && resp
                        .headers()
                        .get(crate::error::ERROR_HEADER)
                        .is_some_and(|k| Kind::nothing_here(k.as_bytes())) =>
            {
                site.remote_result(&p.config.region, None);
                Err(ProxyError {
                    retry: true,
                    ..ProxyError::new(
                        Kind::NoBackend,
                        format!("{} had no machine to serve with", p.config.name),
                    )
                })
            }
            (Ok(resp), via) => {
                match via {
                    None => {
                        site.record_success(backend, started.elapsed());
                        backend
                            .answers
                            .answered(resp.status().as_u16(), started.elapsed());
                    }
                    Some(p) => site.remote_result(&p.config.region, Some(started.elapsed())),
                }
                Ok((resp, guard))
            }
            (Err(e), via) => {
                match via {
                    Some(p) => {
                        site.remote_result(&p.config.region, None);
                        p.failed()
                    }
                    None => {
                        site.record_failure(backend, &e.to_string());
                        backend.answers.failed();
                    }
                }
                Err(ProxyError::upstream(&e, replayable))
            }
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
