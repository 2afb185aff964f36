//! The proxy: HTTP absolute-form requests and CONNECT tunnels, each decided
//! by the ACL (by role) and the IP policy (by the address actually dialed).
//! A name is resolved once; every candidate address is checked; only a
//! checked address is dialed, so a name cannot change its answer between the
//! check and the connection. Redirects are never followed: responses pass
//! back to the client as they are.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use hangar_metrics::exposition::Family;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::acl::Acl;
use crate::dns::Host;
use crate::ip::IpPolicy;

pub type Body = BoxBody<Bytes, hyper::Error>;

/// Everything a running proxy decides with.
pub struct Proxy {
    /// Swapped whole: a request decides by one ACL and one set of roles.
    policy: RwLock<Arc<Policy>>,
    pub ip: IpPolicy,
    /// `password` or `user:password` -> role, for `Proxy-Authorization: Basic`.
    pub roles: Vec<(String, String)>,
    pub connect_timeout: Duration,
    pub dns_timeout: Duration,
    /// A DNS server to ask instead of the system resolver.
    pub resolver: Option<SocketAddr>,
    pub requests: Option<Arc<Semaphore>>,
    pub tunnels: Option<Arc<Semaphore>>,
    pub metrics: Metrics,
    /// Idle upstream HTTP/1 connections by the (checked) address they go to.
    pool: std::sync::Mutex<
        HashMap<SocketAddr, Vec<hyper::client::conn::http1::SendRequest<Incoming>>>,
    >,
    next_id: AtomicU64,
}

/// How a request reaches upstream: a fresh connection, or a pooled one to
/// the same checked address.
enum Upstream {
    Fresh(TcpStream),
    Pooled(hyper::client::conn::http1::SendRequest<Incoming>),
}

/// Idle connections kept per upstream address.
const POOL_PER_ADDR: usize = 8;

/// Counters, gathered for a scrape as `hangar-metrics` families.
#[derive(Default)]
pub struct Metrics {
    /// (decision, role, project) -> requests
    decisions: std::sync::Mutex<std::collections::BTreeMap<(&'static str, String, String), u64>>,
    connect_attempts: AtomicU64,
    connect_errors: AtomicU64,
    dns_lookups: AtomicU64,
    dns_micros: AtomicU64,
    open_tunnels: AtomicU64,
}

impl Metrics {
    fn decision(&self, decision: &'static str, role: &Option<String>, project: &str) {
        let mut map = self.decisions.lock().unwrap_or_else(|e| e.into_inner());
        *map.entry((
            decision,
            role.clone().unwrap_or_default(),
            project.to_string(),
        ))
        .or_default() += 1;
    }

    /// The series, gathered for a scrape (see docs/metrics.md).
    pub fn families(&self) -> Vec<Family> {
        let mut requests = Family::counter(
            "hangar_egress_requests",
            "Requests by decision (allow, report, deny), role and project.",
            None,
        );
        for ((d, role, project), n) in self
            .decisions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            requests.push(
                &[
                    ("decision", d),
                    ("role", role.as_str()),
                    ("project", project.as_str()),
                ],
                *n as f64,
            );
        }
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64;
        let mut out = vec![requests];
        for (name, help, unit, v) in [
            (
                "hangar_egress_connect_attempts",
                "Connections dialed.",
                None,
                get(&self.connect_attempts),
            ),
            (
                "hangar_egress_connect_errors",
                "Connections that failed or timed out.",
                None,
                get(&self.connect_errors),
            ),
            (
                "hangar_egress_dns_lookups",
                "Names resolved.",
                None,
                get(&self.dns_lookups),
            ),
            (
                "hangar_egress_dns_lookup",
                "Time spent resolving names.",
                Some("seconds"),
                get(&self.dns_micros) / 1e6,
            ),
        ] {
            let mut f = Family::counter(name, help, unit);
            f.push(&[], v);
            out.push(f);
        }
        let mut open = Family::gauge(
            "hangar_egress_open_tunnels",
            "CONNECT tunnels open now.",
            None,
        );
        open.push(&[], get(&self.open_tunnels));
        out.push(open);
        out
    }
}

/// Hop-by-hop headers (RFC 9110 section 7.6.1), never forwarded.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn text(status: StatusCode, body: String, error: Option<&str>) -> Response<Body> {
    let mut b = Response::builder()
        .status(status)
        .header("Content-Type", "text/plain");
    if let Some(e) = error {
        if let Ok(v) = HeaderValue::from_str(e) {
            b = b.header("X-Hangar-Egress-Error", v);
        }
    }
    b.body(
        Full::new(Bytes::from(body + "\n"))
            .map_err(|never| match never {})
            .boxed(),
    )
    .unwrap_or_else(|_| {
        Response::new(
            Full::new(Bytes::new())
                .map_err(|never| match never {})
                .boxed(),
        )
    })
}

/// What the log line says about a request.
struct Log {
    id: u64,
    role: Option<String>,
    project: String,
    method: String,
    host: String,
    port: u16,
    resolved: Option<SocketAddr>,
    decision: &'static str,
    reason: String,
    enforce_would_deny: bool,
    started: Instant,
}

impl Log {
    fn emit(&self) {
        let line = serde_json::json!({
            "id": self.id, "role": self.role, "project": self.project, "method": self.method,
            "host": self.host, "port": self.port, "resolved": self.resolved.map(|a| a.to_string()),
            "decision": self.decision, "reason": self.reason, "enforce_would_deny": self.enforce_would_deny,
            "duration_ms": self.started.elapsed().as_secs_f64() * 1000.0,
        });
        eprintln!("{line}");
    }
}

/// What the proxy decides by: the ACL, and the roles of source addresses
/// (machines inside `hangar up`).
struct Policy {
    acl: Acl,
    source_roles: HashMap<IpAddr, String>,
}

impl Proxy {
    pub fn new(acl: Acl, ip: IpPolicy) -> Proxy {
        Proxy {
            policy: RwLock::new(Arc::new(Policy {
                acl,
                source_roles: HashMap::new(),
            })),
            ip,
            roles: Vec::new(),
            connect_timeout: Duration::from_secs(10),
            dns_timeout: Duration::from_secs(5),
            resolver: None,
            requests: None,
            tunnels: None,
            metrics: Metrics::default(),
            pool: std::sync::Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        }
    }

    fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replace the ACL (SIGHUP), keeping the source roles; open tunnels are
    /// not touched.
    pub fn reload(&self, acl: Acl) {
        let source_roles = self.policy().source_roles.clone();
        self.update(acl, source_roles);
    }

    /// Replace the ACL and the roles of source addresses together: no
    /// request sees the new roles with the old ACL or the other way round.
    pub fn update(&self, acl: Acl, source_roles: HashMap<IpAddr, String>) {
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) =
            Arc::new(Policy { acl, source_roles });
    }

    fn role(
        &self,
        policy: &Policy,
        req: &Request<Incoming>,
        peer: SocketAddr,
        cert_role: Option<&str>,
    ) -> Option<String> {
        let header = req
            .headers()
            .get("proxy-authorization")
            .and_then(|v| v.to_str().ok());
        if let Some(basic) = header.and_then(|h| h.strip_prefix("Basic ")) {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(basic.trim())
                .ok()?;
            let raw = String::from_utf8(raw).ok()?;
            let password = raw.split_once(':').map_or(raw.as_str(), |(_, p)| p);
            let mut found = None;
            // Compare against every entry, in constant time each.
            for (secret, role) in &self.roles {
                let hit = if secret.contains(':') {
                    same(secret.as_bytes(), raw.as_bytes())
                } else {
                    same(secret.as_bytes(), password.as_bytes())
                };
                if hit && found.is_none() {
                    found = Some(role.clone());
                }
            }
            return found;
        }
        if let Some(cn) = cert_role {
            return Some(cn.to_string());
        }
        policy.source_roles.get(&peer.ip()).cloned()
    }

    /// Answer one proxied request.
    /// `cert_role` is the client certificate's common name on a TLS listener.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
        cert_role: Option<Arc<str>>,
    ) -> Result<Response<Body>, Infallible> {
        let _permit = match &self.requests {
            Some(s) => match s.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    return Ok(text(
                        StatusCode::TOO_MANY_REQUESTS,
                        "hangar egress: too many concurrent requests; retry later".into(),
                        Some("too many concurrent requests"),
                    ))
                }
            },
            None => None,
        };
        let policy = self.policy();
        let role = self.role(&policy, &req, peer, cert_role.as_deref());
        let (host, port) =
            match target(&req).and_then(|(raw, port)| Ok((crate::dns::parse_host(&raw)?, port))) {
                Ok(t) => t,
                Err(e) => {
                    return Ok(text(
                        StatusCode::BAD_REQUEST,
                        format!("hangar egress: {e}"),
                        Some(&e),
                    ))
                }
            };
        let mut log = Log {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            role: role.clone(),
            project: String::new(),
            method: req.method().to_string(),
            host: host.to_string(),
            port,
            resolved: None,
            decision: "deny",
            reason: String::new(),
            enforce_would_deny: false,
            started: Instant::now(),
        };
        let decision = policy.acl.decide(role.as_deref(), &host.to_string());
        log.project = decision.project.clone();
        log.enforce_would_deny = decision.enforce_would_deny;
        if !decision.allow {
            log.reason = decision.reason.to_string();
            self.metrics.decision("deny", &log.role, &log.project);
            log.emit();
            return Ok(text(
                StatusCode::PROXY_AUTHENTICATION_REQUIRED,
                format!(
                    "hangar egress: request to {host} denied: {}",
                    decision.reason
                ),
                Some(decision.reason),
            ));
        }
        let pooled = req.method() != Method::CONNECT;
        let upstream = match self.dial(&host, port, &mut log, pooled).await {
            Ok(s) => s,
            Err(resp) => {
                self.metrics.decision("deny", &log.role, &log.project);
                log.emit();
                return Ok(resp);
            }
        };
        log.decision = if decision.enforce_would_deny {
            "report"
        } else {
            "allow"
        };
        log.reason = decision.reason.to_string();
        self.metrics.decision(log.decision, &log.role, &log.project);
        log.emit();
        if req.method() == Method::CONNECT {
            let permit = match &self.tunnels {
                Some(s) => match s.clone().try_acquire_owned() {
                    Ok(p) => Some(p),
                    Err(_) => {
                        return Ok(text(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "hangar egress: too many open tunnels; retry later".into(),
                            Some("too many open tunnels"),
                        ))
                    }
                },
                None => None,
            };
            let proxy = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let Upstream::Fresh(mut upstream) = upstream else {
                    return;
                };
                if let Ok(upgraded) = hyper::upgrade::on(req).await {
                    proxy.metrics.open_tunnels.fetch_add(1, Ordering::Relaxed);
                    let _ = upstream.set_nodelay(true);
                    match upgraded.downcast::<TokioIo<TcpStream>>() {
                        // A plain TCP client: splice(2) both ways, after
                        // what the client sent behind its CONNECT.
                        Ok(parts) => {
                            let client = parts.io.into_inner();
                            use tokio::io::AsyncWriteExt;
                            if parts.read_buf.is_empty()
                                || upstream.write_all(&parts.read_buf).await.is_ok()
                            {
                                let _ = crate::splice::relay(&client, &upstream).await;
                            }
                        }
                        // TLS to the proxy: the bytes must be decrypted, so
                        // they are copied, with large buffers (8 KiB copies
                        // cost most of a tunnel's throughput).
                        Err(upgraded) => {
                            let mut client = TokioIo::new(upgraded);
                            let _ = tokio::io::copy_bidirectional_with_sizes(
                                &mut client,
                                &mut upstream,
                                256 * 1024,
                                256 * 1024,
                            )
                            .await;
                        }
                    }
                    proxy.metrics.open_tunnels.fetch_sub(1, Ordering::Relaxed);
                }
            });
            return Ok(Response::new(
                Full::new(Bytes::new())
                    .map_err(|never| match never {})
                    .boxed(),
            ));
        }
        let addr = log.resolved;
        Ok(self.forward(req, upstream, addr, &host.to_string()).await)
    }

    /// Resolve `host` once, check each address, dial the first allowed one.
    async fn dial(
        &self,
        target: &Host,
        port: u16,
        log: &mut Log,
        pooled: bool,
    ) -> Result<Upstream, Response<Body>> {
        let host = &target.to_string();
        let candidates: Vec<SocketAddr> = match target {
            Host::Ip(ip) => vec![SocketAddr::new(*ip, port)],
            Host::Name(host) => {
                let started = Instant::now();
                let lookup: Result<Vec<SocketAddr>, String> = match self.resolver {
                    Some(server) => crate::dns::resolve(server, host, self.dns_timeout)
                        .await
                        .map(|ips| {
                            ips.into_iter()
                                .map(|ip| SocketAddr::new(ip, port))
                                .collect()
                        }),
                    None => match tokio::time::timeout(
                        self.dns_timeout,
                        tokio::net::lookup_host((host.as_str(), port)),
                    )
                    .await
                    {
                        Ok(Ok(addrs)) => Ok(addrs.collect()),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err("timed out".into()),
                    },
                };
                self.metrics.dns_lookups.fetch_add(1, Ordering::Relaxed);
                self.metrics
                    .dns_micros
                    .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                match lookup {
                    Ok(addrs) => addrs,
                    Err(e) => {
                        log.reason = format!("DNS lookup failed: {e}");
                        return Err(text(
                            StatusCode::BAD_GATEWAY,
                            format!("hangar egress: cannot resolve {host}: {e}"),
                            Some("DNS lookup failed"),
                        ));
                    }
                }
            }
        };
        let mut first_denial = None;
        for addr in candidates {
            if let Err(why) = self.ip.check(addr) {
                first_denial.get_or_insert(why);
                continue;
            }
            log.resolved = Some(addr);
            if pooled {
                if let Some(sender) = self.take_pooled(addr) {
                    return Ok(Upstream::Pooled(sender));
                }
            }
            self.metrics
                .connect_attempts
                .fetch_add(1, Ordering::Relaxed);
            let result = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await;
            if !matches!(result, Ok(Ok(_))) {
                self.metrics.connect_errors.fetch_add(1, Ordering::Relaxed);
            }
            return match result {
                Ok(Ok(s)) => Ok(Upstream::Fresh(s)),
                Ok(Err(e)) => {
                    log.reason = format!("connect failed: {e}");
                    Err(text(
                        StatusCode::BAD_GATEWAY,
                        format!("hangar egress: cannot connect to {host} ({addr}): {e}"),
                        Some("connect failed"),
                    ))
                }
                Err(_) => {
                    log.reason = "connect timed out".into();
                    Err(text(
                        StatusCode::GATEWAY_TIMEOUT,
                        format!("hangar egress: connecting to {host} ({addr}) timed out"),
                        Some("connect timed out"),
                    ))
                }
            };
        }
        let why = first_denial.unwrap_or_else(|| "the name has no addresses".into());
        log.reason = why.clone();
        Err(text(
            StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            format!("hangar egress: request to {host} denied: {why}"),
            Some(&why),
        ))
    }
}

/// `(host, port)` of a CONNECT authority or an absolute-form URI.
fn target(req: &Request<Incoming>) -> Result<(String, u16), String> {
    let uri = req.uri();
    if req.method() == Method::CONNECT {
        let auth = uri
            .authority()
            .ok_or("CONNECT needs host:port (authority form)")?;
        let port = auth
            .port_u16()
            .ok_or("CONNECT needs host:port (authority form)")?;
        return Ok((auth.host().to_ascii_lowercase(), port));
    }
    if uri.scheme_str() != Some("http") {
        return Err("proxy requests need an absolute http:// URL; use CONNECT for https".into());
    }
    let host = uri.host().ok_or("the URL has no host")?;
    Ok((host.to_ascii_lowercase(), uri.port_u16().unwrap_or(80)))
}

fn strip_hop_by_hop(headers: &mut hyper::HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all("connection")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for h in HOP_BY_HOP.iter().copied() {
        headers.remove(h);
    }
    for h in listed {
        headers.remove(h);
    }
}

impl Proxy {
    /// An idle pooled connection to `addr` that can take a request now.
    fn take_pooled(
        &self,
        addr: SocketAddr,
    ) -> Option<hyper::client::conn::http1::SendRequest<Incoming>> {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        let idle = pool.get_mut(&addr)?;
        while let Some(sender) = idle.pop() {
            if sender.is_ready() {
                return Some(sender);
            }
        }
        None
    }

    /// Send an absolute-form request on as origin-form; the connection goes
    /// back to the pool once its response is done.
    async fn forward(
        self: &Arc<Self>,
        req: Request<Incoming>,
        upstream: Upstream,
        addr: Option<SocketAddr>,
        host: &str,
    ) -> Response<Body> {
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        parts
            .headers
            .append("via", HeaderValue::from_static("1.1 hangar-egress"));
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        parts.uri = match path.parse() {
            Ok(u) => u,
            Err(_) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    "hangar egress: bad request path".into(),
                    Some("bad request path"),
                )
            }
        };
        let mut sender = match upstream {
            Upstream::Pooled(sender) => sender,
            Upstream::Fresh(stream) => {
                let _ = stream.set_nodelay(true);
                match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
                    Ok((sender, conn)) => {
                        tokio::spawn(conn);
                        sender
                    }
                    Err(e) => {
                        return text(
                            StatusCode::BAD_GATEWAY,
                            format!("hangar egress: {host}: {e}"),
                            Some("upstream handshake failed"),
                        )
                    }
                }
            }
        };
        match sender.send_request(Request::from_parts(parts, body)).await {
            Ok(resp) => {
                if let Some(addr) = addr {
                    let proxy = self.clone();
                    tokio::spawn(async move {
                        if sender.ready().await.is_ok() {
                            let mut pool = proxy.pool.lock().unwrap_or_else(|e| e.into_inner());
                            let idle = pool.entry(addr).or_default();
                            if idle.len() < POOL_PER_ADDR {
                                idle.push(sender);
                            }
                        }
                    });
                }
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                parts
                    .headers
                    .append("via", HeaderValue::from_static("1.1 hangar-egress"));
                Response::from_parts(parts, body.boxed())
            }
            Err(e) => text(
                StatusCode::BAD_GATEWAY,
                format!("hangar egress: {host}: {e}"),
                Some("upstream request failed"),
            ),
        }
    }
}

/// Serve until `shutdown` resolves.
/// With `tls`, the listener speaks TLS and a client certificate's common
/// name is the caller's role.
pub async fn serve(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            a = listener.accept() => match a { Ok(x) => x, Err(_) => continue },
            () = &mut shutdown => break,
        };
        // Small writes (response heads, the last piece of a body) must not
        // wait on Nagle's algorithm.
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => {
                    let service = service_fn(move |req| proxy.clone().handle(req, peer, None));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                }
                Some(config) => {
                    let Ok(stream) = tokio_rustls::TlsAcceptor::from(config).accept(stream).await
                    else {
                        return;
                    };
                    let cn: Option<Arc<str>> = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|certs| certs.first())
                        .and_then(|c| crate::tls::subject_cn(c))
                        .map(Arc::from);
                    let service =
                        service_fn(move |req| proxy.clone().handle(req, peer, cn.clone()));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                }
            }
        });
    }
}

/// Serve the metrics at `endpoint` (OpenMetrics or the text format) on `listener`.
pub async fn serve_metrics(proxy: Arc<Proxy>, listener: TcpListener, endpoint: String) {
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (proxy, endpoint) = (proxy.clone(), endpoint.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let body = (req.uri().path() == endpoint).then(|| {
                    let accept = req
                        .headers()
                        .get(hyper::header::ACCEPT)
                        .and_then(|v| v.to_str().ok());
                    hangar_metrics::exposition::render(proxy.metrics.families(), accept)
                });
                async move {
                    Ok::<_, Infallible>(match body {
                        Some((content_type, b)) => {
                            let mut r = text(StatusCode::OK, b, None);
                            r.headers_mut().insert(
                                hyper::header::CONTENT_TYPE,
                                HeaderValue::from_static(content_type),
                            );
                            r
                        }
                        None => text(StatusCode::NOT_FOUND, "not found".into(), None),
                    })
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
