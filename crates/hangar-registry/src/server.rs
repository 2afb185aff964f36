//! The distribution API over HTTP/1.1: routing, the authorizer's decisions,
//! and the handlers. Bodies stream in and out; nothing but manifests (capped
//! at 4 MiB) is held whole in memory.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hangar_oci::digest::{Hasher, HashingReader};
use hangar_oci::manifest::media;
use hangar_oci::reference::{valid_repository, valid_tag};
use hangar_oci::Digest;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION, RANGE};
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use tokio::sync::Mutex as AsyncMutex;

use crate::auth::{org_of, Action, Auth, Caller, Grant};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::storage::RegistryStore;

/// Manifests larger than this are refused.
pub const MAX_MANIFEST: usize = 4 << 20;
const CHUNK: usize = 256 * 1024;

pub type Body = BoxBody<Bytes, io::Error>;

/// Settings of a running registry.
#[derive(Clone, Debug)]
pub struct Config {
    /// Largest blob accepted, in bytes.
    pub max_blob_size: u64,
    /// Uploads untouched this long are removed.
    pub upload_timeout: Duration,
    /// One JSON line per request on stderr (method, repository, digest,
    /// status, bytes, what it was: upload, mount, manifest, ...).
    pub access_log: bool,
    /// Proxies in front of the registry whose `X-Forwarded-Proto` and
    /// `X-Forwarded-Host` are believed (for the token realm); nobody else's.
    pub trusted_proxies: Vec<std::net::IpAddr>,
}

/// How a request reached the registry.
#[derive(Clone, Copy, Debug)]
pub struct Conn {
    pub peer: std::net::SocketAddr,
    /// Over TLS (the registry's own listener).
    pub tls: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_blob_size: 10 << 30,
            upload_timeout: Duration::from_secs(3600),
            access_log: false,
            trusted_proxies: Vec::new(),
        }
    }
}

/// State of one upload while its requests run.
struct Upload {
    len: u64,
    /// Hash of the first `len` bytes, while it is known; after a restart it
    /// is recomputed from the file at the end.
    hasher: Option<Hasher>,
}

/// A running registry.
pub struct Registry {
    pub store: RegistryStore,
    pub auth: Auth,
    pub config: Config,
    pub metrics: Metrics,
    uploads: std::sync::Mutex<HashMap<String, Arc<AsyncMutex<Upload>>>>,
    _lock: hangar_oci::store::StoreLock,
}

enum Route {
    Ping,
    Token,
    Catalog,
    Tags(String),
    Manifest(String, String),
    Blob(String, String),
    Uploads(String, Option<String>),
    Referrers(String, String),
}

impl Route {
    /// The repository and the tag or digest a request names.
    fn target(&self) -> (Option<&str>, Option<&str>) {
        match self {
            Route::Ping | Route::Token | Route::Catalog => (None, None),
            Route::Tags(n) | Route::Uploads(n, _) => (Some(n), None),
            Route::Manifest(n, r) | Route::Blob(n, r) | Route::Referrers(n, r) => {
                (Some(n), Some(r))
            }
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Route::Ping => "ping",
            Route::Token => "token",
            Route::Catalog => "catalog",
            Route::Tags(_) => "tags",
            Route::Manifest(..) => "manifest",
            Route::Blob(..) => "blob",
            Route::Uploads(..) => "upload",
            Route::Referrers(..) => "referrers",
        }
    }
}

fn parse_route(path: &str) -> Option<Route> {
    let rest = path.strip_prefix("/v2")?;
    match rest {
        "" | "/" => return Some(Route::Ping),
        "/token" => return Some(Route::Token),
        "/_catalog" => return Some(Route::Catalog),
        _ => {}
    }
    let rest = rest.strip_prefix('/')?;
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Some(Route::Tags(name.to_string()));
    }
    let markers = ["/manifests/", "/blobs/uploads/", "/blobs/", "/referrers/"];
    let (pos, marker) = markers
        .iter()
        .filter_map(|m| rest.rfind(m).map(|p| (p, *m)))
        .max_by_key(|(p, m)| (*p, m.len()))?;
    let name = rest[..pos].to_string();
    let tail = rest[pos + marker.len()..].to_string();
    if tail.contains('/') && marker != "/blobs/uploads/" {
        return None;
    }
    Some(match marker {
        "/manifests/" => Route::Manifest(name, tail),
        "/blobs/uploads/" if tail.is_empty() => Route::Uploads(name, None),
        "/blobs/uploads/" => Route::Uploads(name, Some(tail)),
        "/blobs/" => Route::Blob(name, tail),
        _ => Route::Referrers(name, tail),
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 3 <= b.len() => match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                Ok(v) => {
                    out.push(v);
                    i += 3;
                }
                Err(_) => {
                    out.push(b'%');
                    i += 1;
                }
            },
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query(q: Option<&str>) -> Vec<(String, String)> {
    q.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn param<'a>(q: &'a [(String, String)], key: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

fn empty_body() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

fn full_body(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

fn response(status: StatusCode) -> hyper::http::response::Builder {
    Response::builder()
        .status(status)
        .header("Docker-Distribution-API-Version", "registry/2.0")
}

type Http<T = Response<Body>> = Result<T, ApiError>;

fn build(b: hyper::http::response::Builder, body: Body) -> Http {
    b.body(body).map_err(ApiError::internal)
}

fn json(status: StatusCode, value: &serde_json::Value, content_type: &str) -> Http {
    let bytes = serde_json::to_vec(value).map_err(ApiError::internal)?;
    build(
        response(status)
            .header(CONTENT_TYPE, content_type)
            .header(CONTENT_LENGTH, bytes.len()),
        full_body(bytes),
    )
}

fn error_response(e: &ApiError, challenge: Option<String>) -> Response<Body> {
    let body = e.body();
    let mut b = response(e.status)
        .header(CONTENT_TYPE, "application/json")
        .header(CONTENT_LENGTH, body.len());
    if let Some(c) = challenge {
        b = b.header("WWW-Authenticate", c);
    }
    b.body(full_body(body))
        .unwrap_or_else(|_| Response::new(empty_body()))
}

/// Why a request was refused, before it becomes an answer.
enum Refusal {
    Api(ApiError),
    /// 401 with a bearer challenge for this scope (None: no scope).
    Challenge(Option<String>),
    /// 403 DENIED for a write, with the challenge for its scope marked
    /// `insufficient_scope`: clients that renew their token on a 403
    /// (oras) do so once, are refused again, and stop, instead of
    /// retrying with backoff for minutes.
    Denied(ApiError, String),
}

impl From<ApiError> for Refusal {
    fn from(e: ApiError) -> Self {
        Refusal::Api(e)
    }
}

type Handled = Result<Response<Body>, Refusal>;

impl Registry {
    /// Open the registry under `home` and hold its store lock shared (so
    /// `hangar registry gc` refuses to run underneath it).
    pub fn open(home: &Path, config: Config) -> crate::error::Result<Registry> {
        let store = RegistryStore::open(home)?;
        let auth = Auth::open(store.root())?;
        let lock = store.blobs.lock_shared()?;
        Ok(Registry {
            store,
            auth,
            config,
            metrics: Metrics::default(),
            uploads: std::sync::Mutex::new(HashMap::new()),
            _lock: lock,
        })
    }

    /// Answer one request. Never fails: every error becomes a spec error body.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        conn: Conn,
    ) -> Result<Response<Body>, Infallible> {
        let method = req.method().clone();
        let route = parse_route(req.uri().path());
        let label = route.as_ref().map_or("other", Route::label);
        let realm = self.realm(&req, conn);
        let started = std::time::Instant::now();
        let (repo, reference) = route
            .as_ref()
            .map(|r| {
                let (n, r) = r.target();
                (n.map(str::to_string), r.map(str::to_string))
            })
            .unwrap_or_default();
        let asks_mount = req
            .uri()
            .query()
            .is_some_and(|q| q.split('&').any(|p| p.starts_with("mount=")));
        let request_bytes = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .unwrap_or(0);
        let result = match route {
            None => Err(Refusal::Api(ApiError::new(
                StatusCode::NOT_FOUND,
                "NAME_INVALID",
                "no such endpoint",
            ))),
            Some(route) => self.route(route, req).await,
        };
        let resp = match result {
            Ok(r) => r,
            Err(Refusal::Api(e)) => error_response(&e, None),
            Err(Refusal::Denied(e, scope)) => {
                let c = format!("Bearer realm=\"{realm}\",service=\"hangar-registry\",scope=\"{scope}\",error=\"insufficient_scope\"");
                error_response(&e, Some(c))
            }
            Err(Refusal::Challenge(scope)) => {
                let mut c = format!("Bearer realm=\"{realm}\",service=\"hangar-registry\"");
                let detail = match &scope {
                    Some(s) => {
                        c.push_str(&format!(",scope=\"{s}\""));
                        format!("{s} needs credentials: log in with an org token (docker login, skopeo --creds x:TOKEN), or get a bearer token for this scope from the realm")
                    }
                    None => "credentials missing or not valid (revoked, expired, or not a Hangar token): log in with an org token (hangar registry token create --org ORG)".to_string(),
                };
                let e = ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "UNAUTHORIZED",
                    "authentication required",
                )
                .with_detail(detail);
                error_response(&e, Some(c))
            }
        };
        if let Some(len) = resp
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        {
            if method != Method::HEAD {
                self.metrics.bytes_out.fetch_add(len, Ordering::Relaxed);
            }
        }
        self.metrics
            .request(label, method.as_str(), resp.status().as_u16());
        if self.config.access_log {
            let status = resp.status().as_u16();
            let kind = match label {
                "upload" if method == Method::POST && asks_mount && status == 201 => "mount",
                other => other,
            };
            let response_bytes = resp
                .headers()
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                .unwrap_or(0);
            let digest = resp
                .headers()
                .get("Docker-Content-Digest")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
                .or(reference);
            let line = serde_json::json!({
                "method": method.as_str(),
                "repository": repo,
                "digest": digest,
                "status": status,
                "bytes": if method == Method::GET { response_bytes } else { request_bytes },
                "kind": kind,
                "ms": (started.elapsed().as_secs_f64() * 1000.0 * 100.0).round() / 100.0,
            });
            eprintln!("{line}");
        }
        Ok(resp)
    }

    /// The token endpoint's URL as the client reached the registry: its
    /// scheme (TLS here, or a trusted proxy's `X-Forwarded-Proto`) and host.
    fn realm(&self, req: &Request<Incoming>, conn: Conn) -> String {
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|h| h.to_str().ok())
                .map(|v| v.split(',').next().unwrap_or("").trim().to_string())
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_graphic() && b != b'"'))
        };
        let trusted = self.config.trusted_proxies.contains(&conn.peer.ip());
        let forwarded_proto = header("x-forwarded-proto").filter(|p| p == "http" || p == "https");
        let scheme = match (conn.tls, trusted, forwarded_proto) {
            (true, _, _) => "https".to_string(),
            (false, true, Some(p)) => p,
            _ => "http".to_string(),
        };
        let host = trusted
            .then(|| header("x-forwarded-host"))
            .flatten()
            .or_else(|| header("host"))
            .unwrap_or_else(|| "localhost".into());
        format!("{scheme}://{host}/v2/token")
    }

    async fn route(&self, route: Route, req: Request<Incoming>) -> Handled {
        let auth_header = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let Some(caller) = self.auth.identify(auth_header) else {
            return Err(Refusal::Challenge(None));
        };
        let method = req.method().clone();
        let q = query(req.uri().query());
        match route {
            Route::Ping => {
                if caller.org.is_none() {
                    return Err(Refusal::Challenge(None));
                }
                Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({}),
                    "application/json",
                )?)
            }
            Route::Token => self.token(&caller, &q),
            Route::Catalog => self.catalog(&caller, &q),
            Route::Tags(name) => {
                self.check_name(&name)?;
                self.authorize(&caller, &name, Action::Pull)?;
                self.tags(&name, &q)
            }
            Route::Manifest(name, reference) => {
                self.check_name(&name)?;
                match method {
                    Method::GET | Method::HEAD => {
                        self.authorize(&caller, &name, Action::Pull)?;
                        self.get_manifest(&name, &reference, method == Method::HEAD)
                    }
                    Method::PUT => {
                        self.authorize(&caller, &name, Action::Push)?;
                        self.put_manifest(&name, &reference, req).await
                    }
                    Method::DELETE => {
                        self.authorize(&caller, &name, Action::Push)?;
                        self.delete_manifest(&name, &reference)
                    }
                    _ => Err(ApiError::unsupported().into()),
                }
            }
            Route::Blob(name, digest) => {
                self.check_name(&name)?;
                match method {
                    Method::GET | Method::HEAD => {
                        self.authorize(&caller, &name, Action::Pull)?;
                        self.get_blob(&name, &digest, method == Method::HEAD, req.headers())
                    }
                    Method::DELETE => {
                        self.authorize(&caller, &name, Action::Push)?;
                        let d = parse_digest(&digest)?;
                        if !self.store.unlink_blob(&name, &d).map_err(ApiError::from)? {
                            return Err(ApiError::blob_unknown().into());
                        }
                        Ok(build(
                            response(StatusCode::ACCEPTED).header(CONTENT_LENGTH, 0),
                            empty_body(),
                        )?)
                    }
                    _ => Err(ApiError::unsupported().into()),
                }
            }
            Route::Uploads(name, id) => {
                self.check_name(&name)?;
                self.authorize(&caller, &name, Action::Push)?;
                match (method, id) {
                    (Method::POST, None) => self.start_upload(&caller, &name, &q, req).await,
                    (m, Some(id)) => {
                        if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                            return Err(ApiError::upload_unknown().into());
                        }
                        let state = param(&q, "_state").unwrap_or("");
                        if !self.auth.check_upload_state(&name, &id, state)
                            || self.store.upload(&id).is_none()
                        {
                            return Err(ApiError::upload_unknown().into());
                        }
                        match m {
                            Method::PATCH => self.patch_upload(&name, &id, req).await,
                            Method::PUT => self.put_upload(&name, &id, &q, req).await,
                            Method::GET => self.upload_status(&name, &id).await,
                            Method::DELETE => {
                                self.uploads_map().remove(&id);
                                self.store.cancel_upload(&id).map_err(ApiError::from)?;
                                Ok(build(response(StatusCode::NO_CONTENT), empty_body())?)
                            }
                            _ => Err(ApiError::unsupported().into()),
                        }
                    }
                    _ => Err(ApiError::unsupported().into()),
                }
            }
            Route::Referrers(name, digest) => {
                self.check_name(&name)?;
                self.authorize(&caller, &name, Action::Pull)?;
                self.referrers(&name, &digest, &q)
            }
        }
    }

    fn check_name(&self, name: &str) -> Result<(), Refusal> {
        if valid_repository(name) && name.contains('/') {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "NAME_INVALID",
                "invalid repository name: use <org>/<repo>, lowercase",
            )
            .into())
        }
    }

    /// The authorizer. Refusals never tell another org's repository from a
    /// missing one: reads get NAME_UNKNOWN, writes DENIED, anonymous callers
    /// a challenge, whatever exists.
    fn authorize(&self, caller: &Caller, name: &str, action: Action) -> Result<(), Refusal> {
        let public = self.store.is_public(name);
        let rights = caller.rights(name, public, action);
        if rights && caller.scope_covers(name, action) {
            return Ok(());
        }
        let scope = match action {
            Action::Pull => format!("repository:{name}:pull"),
            Action::Push => format!("repository:{name}:pull,push"),
        };
        if caller.org.is_none() || rights {
            // Anonymous, or a bearer token that lacks this scope: ask for one.
            return Err(Refusal::Challenge(Some(scope)));
        }
        let org = caller.org.as_deref().unwrap_or_default();
        Err(match action {
            Action::Pull => ApiError::name_unknown().into(),
            Action::Push if caller.read_only && org_of(name) == org => Refusal::Denied(
                ApiError::denied(format!(
                    "push refused: this token of {org} is read-only; push with a token made without --read-only"
                )),
                scope,
            ),
            Action::Push => Refusal::Denied(
                ApiError::denied(format!(
                    "push refused: a token of {org} pushes only to {org}/<repo>"
                )),
                scope,
            ),
        })
    }

    fn token(&self, caller: &Caller, q: &[(String, String)]) -> Handled {
        let mut grants = Vec::new();
        for (k, scope) in q {
            if k != "scope" {
                continue;
            }
            let mut parts = scope.splitn(3, ':');
            let (Some(kind), Some(name), Some(actions)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if kind != "repository" || !valid_repository(name) {
                continue;
            }
            // The caller's rights on the repository, whatever it asked
            // for: a client that asked for pull and later pushes (oras
            // keeps its first token) is not sent back for another.
            let _ = actions;
            let public = self.store.is_public(name);
            let mut granted = Vec::new();
            if caller.rights(name, public, Action::Pull) {
                granted.push("pull".to_string());
            }
            if caller.rights(name, public, Action::Push) {
                granted.extend(["push".to_string(), "delete".to_string()]);
            }
            grants.push(Grant {
                kind: kind.to_string(),
                name: name.to_string(),
                actions: granted,
            });
        }
        let token = self.auth.issue_bearer(caller, grants);
        Ok(json(
            StatusCode::OK,
            &serde_json::json!({
                "token": token,
                "access_token": token,
                "expires_in": crate::auth::BEARER_TTL_SECS,
                "issued_at": hangar_oci::build::rfc3339(crate::auth::now()),
            }),
            "application/json",
        )?)
    }

    fn catalog(&self, caller: &Caller, q: &[(String, String)]) -> Handled {
        let visible: Vec<String> = self
            .store
            .repos()
            .map_err(ApiError::from)?
            .into_iter()
            .filter(|r| caller.org.as_deref() == Some(org_of(r)) || self.store.is_public(r))
            .collect();
        let (page, link) = paginate(visible, q, "/v2/_catalog")?;
        let mut b = response(StatusCode::OK).header(CONTENT_TYPE, "application/json");
        if let Some(l) = link {
            b = b.header("Link", l);
        }
        let body = serde_json::to_vec(&serde_json::json!({ "repositories": page }))
            .map_err(ApiError::internal)?;
        Ok(build(
            b.header(CONTENT_LENGTH, body.len()),
            full_body(body),
        )?)
    }

    fn tags(&self, name: &str, q: &[(String, String)]) -> Handled {
        if !self.store.repo_exists(name) {
            return Err(ApiError::name_unknown().into());
        }
        let tags = self.store.tags(name).map_err(ApiError::from)?;
        let (page, link) = paginate(tags, q, &format!("/v2/{name}/tags/list"))?;
        let mut b = response(StatusCode::OK).header(CONTENT_TYPE, "application/json");
        if let Some(l) = link {
            b = b.header("Link", l);
        }
        let body = serde_json::to_vec(&serde_json::json!({ "name": name, "tags": page }))
            .map_err(ApiError::internal)?;
        Ok(build(
            b.header(CONTENT_LENGTH, body.len()),
            full_body(body),
        )?)
    }

    fn resolve(&self, name: &str, reference: &str) -> Result<(Digest, String), Refusal> {
        if !self.store.repo_exists(name) {
            return Err(ApiError::name_unknown().into());
        }
        let digest = if reference.starts_with("sha256:") || reference.contains(':') {
            parse_digest(reference)?
        } else if valid_tag(reference) {
            self.store
                .tag(name, reference)
                .ok_or_else(ApiError::manifest_unknown)?
        } else {
            return Err(
                ApiError::new(StatusCode::BAD_REQUEST, "TAG_INVALID", "invalid tag").into(),
            );
        };
        let media_type = self
            .store
            .manifest_media_type(name, &digest)
            .ok_or_else(ApiError::manifest_unknown)?;
        Ok((digest, media_type))
    }

    fn get_manifest(&self, name: &str, reference: &str, head: bool) -> Handled {
        let (digest, media_type) = self.resolve(name, reference)?;
        let bytes = self
            .store
            .blobs
            .read_blob(&digest)
            .map_err(ApiError::from)?;
        let b = response(StatusCode::OK)
            .header(CONTENT_TYPE, media_type)
            .header(CONTENT_LENGTH, bytes.len())
            .header("Docker-Content-Digest", digest.to_string())
            .header("ETag", format!("\"{digest}\""));
        Ok(build(
            b,
            if head { empty_body() } else { full_body(bytes) },
        )?)
    }

    async fn put_manifest(&self, name: &str, reference: &str, req: Request<Incoming>) -> Handled {
        let content_type = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let bytes = read_capped(req.into_body(), MAX_MANIFEST, &self.metrics).await?;
        let invalid = |m: String| ApiError::new(StatusCode::BAD_REQUEST, "MANIFEST_INVALID", m);
        let doc: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| invalid(format!("manifest is not JSON: {e}")))?;
        let media_type = doc
            .get("mediaType")
            .and_then(|m| m.as_str())
            .map(str::to_string)
            .unwrap_or_else(|| {
                content_type
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_string()
            });
        if !media::is_manifest(&media_type) && !media::is_index(&media_type) {
            return Err(invalid(format!("unsupported manifest media type {media_type:?}")).into());
        }
        if doc.get("schemaVersion").and_then(|v| v.as_u64()) != Some(2) {
            return Err(invalid("schemaVersion must be 2".into()).into());
        }
        // Pushed by digest: hashed with that digest's algorithm (sha512
        // too); by tag: sha256, as clients expect.
        let by_digest = if reference.contains(':') {
            Some(parse_digest(reference)?)
        } else {
            None
        };
        let digest = Digest::of_with(
            by_digest
                .as_ref()
                .map(Digest::algorithm)
                .unwrap_or_default(),
            &bytes,
        );
        let tag = if let Some(want) = &by_digest {
            if *want != digest {
                return Err(ApiError::digest_invalid(format!(
                    "manifest hashes to {digest}, not {reference}"
                ))
                .into());
            }
            None
        } else if valid_tag(reference) {
            Some(reference)
        } else {
            return Err(
                ApiError::new(StatusCode::BAD_REQUEST, "TAG_INVALID", "invalid tag").into(),
            );
        };
        // Everything it points at must already be in this repository
        // (children of an index are manifests; the rest are blobs).
        let is_index = media::is_index(&media_type);
        let check = |d: &Digest| {
            if is_index {
                self.store.manifest_media_type(name, d).is_some()
            } else {
                self.store.has_blob(name, d)
            }
        };
        for key in ["config", "layers", "manifests"] {
            let items: Vec<&serde_json::Value> = match doc.get(key) {
                Some(serde_json::Value::Array(a)) => a.iter().collect(),
                Some(v @ serde_json::Value::Object(_)) => vec![v],
                _ => continue,
            };
            for item in items {
                let d = item
                    .get("digest")
                    .and_then(|d| d.as_str())
                    .ok_or_else(|| invalid(format!("a {key} entry has no digest")))?;
                let d = parse_digest(d)?;
                // Non-distributable (foreign) layers live elsewhere (their
                // `urls`): a manifest may name them without pushing them.
                let foreign = key == "layers"
                    && item
                        .get("mediaType")
                        .and_then(|m| m.as_str())
                        .is_some_and(media::is_foreign_layer);
                if !foreign && !check(&d) {
                    return Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "MANIFEST_BLOB_UNKNOWN",
                        format!("{d} is not in {name}; push it first"),
                    )
                    .into());
                }
            }
        }
        let subject = match doc
            .get("subject")
            .and_then(|s| s.get("digest"))
            .and_then(|d| d.as_str())
        {
            Some(s) => Some(parse_digest(s)?),
            None => None,
        };
        self.store
            .blobs
            .put_bytes_with(digest.algorithm(), &bytes)
            .map_err(ApiError::from)?;
        self.store
            .link_manifest(name, &digest, &media_type)
            .map_err(ApiError::from)?;
        if let Some(s) = &subject {
            self.store
                .add_referrer(name, s, &digest)
                .map_err(ApiError::from)?;
        }
        if let Some(t) = tag {
            self.store
                .set_tag(name, t, &digest)
                .map_err(ApiError::from)?;
        }
        let mut b = response(StatusCode::CREATED)
            .header(LOCATION, format!("/v2/{name}/manifests/{digest}"))
            .header("Docker-Content-Digest", digest.to_string())
            .header(CONTENT_LENGTH, 0);
        if let Some(s) = subject {
            b = b.header("OCI-Subject", s.to_string());
        }
        Ok(build(b, empty_body())?)
    }

    fn delete_manifest(&self, name: &str, reference: &str) -> Handled {
        if !self.store.repo_exists(name) {
            return Err(ApiError::name_unknown().into());
        }
        let found = if reference.contains(':') {
            let d = parse_digest(reference)?;
            self.store
                .unlink_manifest(name, &d)
                .map_err(ApiError::from)?
        } else {
            self.store
                .delete_tag(name, reference)
                .map_err(ApiError::from)?
        };
        if !found {
            return Err(ApiError::manifest_unknown().into());
        }
        Ok(build(
            response(StatusCode::ACCEPTED).header(CONTENT_LENGTH, 0),
            empty_body(),
        )?)
    }

    fn get_blob(&self, name: &str, digest: &str, head: bool, headers: &HeaderMap) -> Handled {
        if !self.store.repo_exists(name) {
            return Err(ApiError::name_unknown().into());
        }
        let d = parse_digest(digest)?;
        if !self.store.has_blob(name, &d) {
            return Err(ApiError::blob_unknown().into());
        }
        let mut file = self.store.blobs.open_blob(&d).map_err(ApiError::from)?;
        let size = file.metadata().map_err(ApiError::internal)?.len();
        let mut b = response(StatusCode::OK)
            .header("Docker-Content-Digest", d.to_string())
            .header("Accept-Ranges", "bytes")
            .header(CONTENT_TYPE, "application/octet-stream")
            .header("ETag", format!("\"{d}\""));
        let (start, len) = match headers.get(RANGE).and_then(|r| r.to_str().ok()) {
            None => (0, size),
            Some(r) => match parse_range(r, size) {
                Some((s, e)) => {
                    b = b
                        .status(StatusCode::PARTIAL_CONTENT)
                        .header("Content-Range", format!("bytes {s}-{e}/{size}"));
                    (s, e - s + 1)
                }
                None => {
                    let e = ApiError::new(
                        StatusCode::RANGE_NOT_SATISFIABLE,
                        "BLOB_UNKNOWN",
                        "range not satisfiable",
                    );
                    return Ok(build(
                        response(e.status)
                            .header("Content-Range", format!("bytes */{size}"))
                            .header(CONTENT_LENGTH, 0),
                        empty_body(),
                    )?);
                }
            },
        };
        b = b.header(CONTENT_LENGTH, len);
        if head {
            return Ok(build(b, empty_body())?);
        }
        file.seek(SeekFrom::Start(start))
            .map_err(ApiError::internal)?;
        Ok(build(b, file_body(file, len))?)
    }

    fn uploads_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<AsyncMutex<Upload>>>> {
        self.uploads.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn upload_state(&self, id: &str) -> Result<Arc<AsyncMutex<Upload>>, ApiError> {
        let mut map = self.uploads_map();
        if let Some(u) = map.get(id) {
            return Ok(u.clone());
        }
        // Not seen since a restart: what is on disk is what we have.
        let path = self.store.upload(id).ok_or_else(ApiError::upload_unknown)?;
        let len = std::fs::metadata(&path).map_err(ApiError::internal)?.len();
        let u = Arc::new(AsyncMutex::new(Upload { len, hasher: None }));
        map.insert(id.to_string(), u.clone());
        Ok(u)
    }

    fn upload_location(&self, name: &str, id: &str) -> String {
        format!(
            "/v2/{name}/blobs/uploads/{id}?_state={}",
            self.auth.upload_state(name, id)
        )
    }

    fn upload_accepted(&self, name: &str, id: &str, len: u64, status: StatusCode) -> Http {
        let range = if len == 0 {
            "0-0".to_string()
        } else {
            format!("0-{}", len - 1)
        };
        build(
            response(status)
                .header(LOCATION, self.upload_location(name, id))
                .header(RANGE, range)
                .header("Docker-Upload-UUID", id)
                .header(CONTENT_LENGTH, 0),
            empty_body(),
        )
    }

    fn blob_created(&self, name: &str, digest: &Digest) -> Http {
        build(
            response(StatusCode::CREATED)
                .header(LOCATION, format!("/v2/{name}/blobs/{digest}"))
                .header("Docker-Content-Digest", digest.to_string())
                .header(CONTENT_LENGTH, 0),
            empty_body(),
        )
    }

    async fn start_upload(
        &self,
        caller: &Caller,
        name: &str,
        q: &[(String, String)],
        req: Request<Incoming>,
    ) -> Handled {
        if let Some(Ok(d)) = param(q, "mount").map(str::parse::<Digest>) {
            // Mount only what the caller could read anyway; otherwise fall
            // through to a normal upload and reveal nothing. A repository
            // of the caller's own org is readable whatever the bearer
            // token's scope names (clients rarely ask for `from`'s scope);
            // without `from`, any repository of the org that has the blob.
            let own_org = caller.org.as_deref();
            let readable = |from: &str| {
                valid_repository(from)
                    && caller.rights(from, self.store.is_public(from), Action::Pull)
                    && (caller.scope_covers(from, Action::Pull) || own_org == Some(org_of(from)))
                    && self.store.has_blob(from, &d)
            };
            let source = match param(q, "from") {
                Some(from) => readable(from).then(|| from.to_string()),
                None => self
                    .store
                    .repos()
                    .map_err(ApiError::from)?
                    .into_iter()
                    .filter(|r| own_org == Some(org_of(r)))
                    .find(|r| readable(r)),
            };
            if source.is_some() {
                self.store.link_blob(name, &d).map_err(ApiError::from)?;
                return Ok(self.blob_created(name, &d)?);
            }
        }
        // A bad digest is refused before anything is written.
        let monolithic = param(q, "digest").map(parse_digest).transpose()?;
        let id = crate::auth::random_hex(16).map_err(ApiError::from)?;
        let path = self.store.start_upload(&id).map_err(ApiError::from)?;
        let upload = Arc::new(AsyncMutex::new(Upload {
            len: 0,
            hasher: Some(Hasher::new()),
        }));
        self.uploads_map().insert(id.clone(), upload.clone());
        if let Some(digest) = monolithic {
            // Monolithic: the blob is this request's body. Refused (too
            // big, cut short, wrong digest), it leaves nothing behind: no
            // client can resume an upload it never got the location of.
            let mut u = upload.lock().await;
            let result = match self.append(&path, &mut u, req.into_body(), None).await {
                Ok(_) => self.finish_upload(name, &id, &path, &mut u, &digest).await,
                Err(e) => Err(e.into()),
            };
            if result.is_err() {
                drop(u);
                self.uploads_map().remove(&id);
                let _ = self.store.cancel_upload(&id);
            }
            return result;
        }
        Ok(self.upload_accepted(name, &id, 0, StatusCode::ACCEPTED)?)
    }

    async fn patch_upload(&self, name: &str, id: &str, req: Request<Incoming>) -> Handled {
        let path = self.store.upload(id).ok_or_else(ApiError::upload_unknown)?;
        let upload = self.upload_state(id)?;
        let mut u = upload.lock().await;
        let range = req
            .headers()
            .get("Content-Range")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let expected = match range {
            Some(r) => {
                let (start, end) = parse_content_range(&r).ok_or_else(|| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "BLOB_UPLOAD_INVALID",
                        format!("bad Content-Range {r:?}"),
                    )
                })?;
                if start != u.len || end < start {
                    // Out of order: say where the upload stands.
                    let e = ApiError::new(
                        StatusCode::RANGE_NOT_SATISFIABLE,
                        "BLOB_UPLOAD_INVALID",
                        format!("chunk starts at {start}, upload is at {}", u.len),
                    );
                    let mut resp = error_response(&e, None);
                    if let Ok(v) = HeaderValue::from_str(&self.upload_location(name, id)) {
                        resp.headers_mut().insert(LOCATION, v);
                    }
                    let range = if u.len == 0 {
                        "0-0".into()
                    } else {
                        format!("0-{}", u.len - 1)
                    };
                    if let Ok(v) = HeaderValue::from_str(&range) {
                        resp.headers_mut().insert(RANGE, v);
                    }
                    return Ok(resp);
                }
                Some(end - start + 1)
            }
            None => None,
        };
        self.append(&path, &mut u, req.into_body(), expected)
            .await?;
        Ok(self.upload_accepted(name, id, u.len, StatusCode::ACCEPTED)?)
    }

    async fn put_upload(
        &self,
        name: &str,
        id: &str,
        q: &[(String, String)],
        req: Request<Incoming>,
    ) -> Handled {
        let digest = parse_digest(param(q, "digest").unwrap_or(""))?;
        let path = self.store.upload(id).ok_or_else(ApiError::upload_unknown)?;
        let upload = self.upload_state(id)?;
        let mut u = upload.lock().await;
        self.append(&path, &mut u, req.into_body(), None).await?;
        self.finish_upload(name, id, &path, &mut u, &digest).await
    }

    async fn upload_status(&self, name: &str, id: &str) -> Handled {
        let upload = self.upload_state(id)?;
        let u = upload.lock().await;
        Ok(self.upload_accepted(name, id, u.len, StatusCode::NO_CONTENT)?)
    }

    /// Stream `body` onto the end of the upload file. With `expected`, the
    /// body must be exactly that long; on any failure the file is cut back.
    async fn append(
        &self,
        path: &Path,
        u: &mut Upload,
        mut body: Incoming,
        expected: Option<u64>,
    ) -> Result<(), ApiError> {
        let start = u.len;
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(ApiError::internal)?;
        let mut out = io::BufWriter::with_capacity(1 << 20, file);
        let mut hasher = u.hasher.take();
        let mut written = 0u64;
        let result: Result<(), ApiError> = async {
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "BLOB_UPLOAD_INVALID",
                        format!("reading the body failed: {e}"),
                    )
                })?;
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                written += data.len() as u64;
                self.metrics
                    .bytes_in
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                if start + written > self.config.max_blob_size {
                    return Err(ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "SIZE_INVALID",
                        format!(
                            "blob larger than this registry's limit of {} bytes",
                            self.config.max_blob_size
                        ),
                    ));
                }
                if expected.is_some_and(|e| written > e) {
                    break;
                }
                if let Some(h) = hasher.as_mut() {
                    h.update(&data);
                }
                tokio::task::block_in_place(|| out.write_all(&data)).map_err(ApiError::internal)?;
            }
            if expected.is_some_and(|e| written != e) {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "BLOB_UPLOAD_INVALID",
                    "body length does not match Content-Range",
                ));
            }
            tokio::task::block_in_place(|| out.flush()).map_err(ApiError::internal)
        }
        .await;
        match result {
            Ok(()) => {
                u.len = start + written;
                u.hasher = hasher;
                Ok(())
            }
            Err(e) => {
                drop(out);
                let _ = OpenOptions::new()
                    .write(true)
                    .open(path)
                    .and_then(|f| f.set_len(start));
                u.len = start;
                u.hasher = None;
                Err(e)
            }
        }
    }

    async fn finish_upload(
        &self,
        name: &str,
        id: &str,
        path: &Path,
        u: &mut Upload,
        want: &Digest,
    ) -> Handled {
        // The running hash is sha256; a blob named by another algorithm
        // (sha512) is hashed again from the file, as after a restart.
        let got = match u.hasher.take() {
            Some(h) if h.len() == u.len && h.algorithm() == want.algorithm() => h.finish().0,
            _ => {
                let file = File::open(path).map_err(ApiError::internal)?;
                tokio::task::block_in_place(|| {
                    HashingReader::with(want.algorithm(), io::BufReader::with_capacity(CHUNK, file))
                        .finish()
                })
                .map_err(ApiError::internal)?
                .0
            }
        };
        self.uploads_map().remove(id);
        if got != *want {
            let _ = self.store.cancel_upload(id);
            return Err(
                ApiError::digest_invalid(format!("upload hashes to {got}, not {want}")).into(),
            );
        }
        if self.store.blobs.has_blob(want) {
            let _ = self.store.cancel_upload(id);
        } else {
            tokio::task::block_in_place(|| self.store.blobs.adopt_file(path, want))
                .map_err(ApiError::from)?;
        }
        self.store.link_blob(name, want).map_err(ApiError::from)?;
        Ok(self.blob_created(name, want)?)
    }

    fn referrers(&self, name: &str, digest: &str, q: &[(String, String)]) -> Handled {
        let subject = parse_digest(digest)?;
        let filter = param(q, "artifactType");
        let mut manifests = Vec::new();
        for d in self
            .store
            .referrers(name, &subject)
            .map_err(ApiError::from)?
        {
            let Some(media_type) = self.store.manifest_media_type(name, &d) else {
                continue;
            };
            let Ok(bytes) = self.store.blobs.read_blob(&d) else {
                continue;
            };
            let Ok(doc) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
                continue;
            };
            let artifact_type = doc
                .get("artifactType")
                .or_else(|| doc.get("config").and_then(|c| c.get("mediaType")))
                .and_then(|a| a.as_str())
                .unwrap_or("")
                .to_string();
            if filter.is_some_and(|f| f != artifact_type) {
                continue;
            }
            let mut desc = serde_json::json!({
                "mediaType": media_type, "digest": d.to_string(), "size": bytes.len(), "artifactType": artifact_type,
            });
            if let Some(a) = doc.get("annotations") {
                desc["annotations"] = a.clone();
            }
            manifests.push(desc);
        }
        let index = serde_json::json!({"schemaVersion": 2, "mediaType": media::OCI_INDEX, "manifests": manifests});
        let mut resp = json(StatusCode::OK, &index, media::OCI_INDEX)?;
        if filter.is_some() {
            resp.headers_mut().insert(
                "OCI-Filters-Applied",
                HeaderValue::from_static("artifactType"),
            );
        }
        Ok(resp)
    }
}

fn parse_digest(s: &str) -> Result<Digest, ApiError> {
    s.parse::<Digest>().map_err(|e| match e {
        hangar_oci::Error::UnsupportedDigest { .. } => ApiError::digest_invalid(format!(
            "{s:?} uses a digest algorithm this registry does not support; use sha256 or sha512"
        )),
        _ => ApiError::digest_invalid(format!(
            "{s:?} is not a digest: sha256:<64 hex> or sha512:<128 hex>"
        )),
    })
}

/// `bytes=a-b`, `bytes=a-` or `bytes=-n` against `size`: inclusive (start, end).
fn parse_range(r: &str, size: u64) -> Option<(u64, u64)> {
    let spec = r.strip_prefix("bytes=")?;
    if spec.contains(',') || size == 0 {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().ok()?;
            (size.saturating_sub(n), size - 1)
        }
        (a, "") => (a.parse().ok()?, size - 1),
        (a, b) => (a.parse().ok()?, b.parse::<u64>().ok()?.min(size - 1)),
    };
    (start <= end && start < size).then_some((start, end))
}

/// `Content-Range: a-b` (the registry form) or `bytes a-b/*`.
fn parse_content_range(r: &str) -> Option<(u64, u64)> {
    let r = r
        .trim()
        .trim_start_matches("bytes")
        .trim_start_matches('=')
        .trim();
    let r = r.split('/').next()?;
    let (a, b) = r.split_once('-')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

fn paginate(
    items: Vec<String>,
    q: &[(String, String)],
    path: &str,
) -> Result<(Vec<String>, Option<String>), ApiError> {
    let last = param(q, "last");
    let mut items: Vec<String> = match last {
        Some(l) => items.into_iter().filter(|i| i.as_str() > l).collect(),
        None => items,
    };
    let n = match param(q, "n") {
        Some(n) => Some(n.parse::<usize>().map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "PAGINATION_NUMBER_INVALID",
                "n must be a number",
            )
        })?),
        None => None,
    };
    match n {
        Some(n) if items.len() > n => {
            items.truncate(n);
            let link = items
                .last()
                .map(|l| format!("<{path}?n={n}&last={l}>; rel=\"next\""));
            Ok((items, link))
        }
        _ => Ok((items, None)),
    }
}

async fn read_capped(
    mut body: Incoming,
    cap: usize,
    metrics: &Metrics,
) -> Result<Vec<u8>, ApiError> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "MANIFEST_INVALID",
                format!("reading the body failed: {e}"),
            )
        })?;
        if let Ok(data) = frame.into_data() {
            metrics
                .bytes_in
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            out.extend_from_slice(&data);
            if out.len() > cap {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "MANIFEST_INVALID",
                    format!("manifest larger than {cap} bytes"),
                ));
            }
        }
    }
    Ok(out)
}

/// Stream `len` bytes of `file` from its current position.
fn file_body(file: File, len: u64) -> Body {
    let stream = futures_util::stream::unfold((file, len), |(mut file, remaining)| async move {
        if remaining == 0 {
            return None;
        }
        let n = remaining.min(CHUNK as u64) as usize;
        let mut buf = vec![0u8; n];
        match tokio::task::block_in_place(|| file.read_exact(&mut buf)) {
            Ok(()) => Some((
                Ok(Frame::data(Bytes::from(buf))),
                (file, remaining - n as u64),
            )),
            Err(e) => Some((Err(e), (file, 0))),
        }
    });
    StreamBody::new(stream).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse_from_the_right() {
        assert!(matches!(parse_route("/v2/"), Some(Route::Ping)));
        assert!(matches!(parse_route("/v2/_catalog"), Some(Route::Catalog)));
        match parse_route("/v2/org/blobs/manifests/latest") {
            Some(Route::Manifest(n, r)) => {
                assert_eq!((n.as_str(), r.as_str()), ("org/blobs", "latest"))
            }
            _ => panic!("manifest route"),
        }
        match parse_route("/v2/a/b/blobs/uploads/") {
            Some(Route::Uploads(n, None)) => assert_eq!(n, "a/b"),
            _ => panic!("uploads route"),
        }
        match parse_route("/v2/a/b/blobs/uploads/xyz") {
            Some(Route::Uploads(n, Some(id))) => {
                assert_eq!((n.as_str(), id.as_str()), ("a/b", "xyz"))
            }
            _ => panic!("upload route"),
        }
        match parse_route("/v2/a/b/blobs/sha256:00") {
            Some(Route::Blob(n, d)) => assert_eq!((n.as_str(), d.as_str()), ("a/b", "sha256:00")),
            _ => panic!("blob route"),
        }
        match parse_route("/v2/a/b/tags/list") {
            Some(Route::Tags(n)) => assert_eq!(n, "a/b"),
            _ => panic!("tags route"),
        }
        assert!(parse_route("/v3/x").is_none());
        assert!(parse_route("/v2/a/manifests/x/y").is_none());
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Some((0, 9)));
        assert_eq!(parse_range("bytes=90-", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=-10", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=50-500", 100), Some((50, 99)));
        assert_eq!(parse_range("bytes=100-", 100), None);
        assert_eq!(parse_range("bytes=5-1", 100), None);
        assert_eq!(parse_content_range("0-99"), Some((0, 99)));
        assert_eq!(parse_content_range("bytes 100-199/*"), Some((100, 199)));
        assert_eq!(percent_decode("org%2Fapp%3Ax"), "org/app:x");
    }

    #[test]
    fn pagination_links() {
        let items: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let q = vec![("n".to_string(), "2".to_string())];
        let (page, link) = paginate(items.clone(), &q, "/v2/x/tags/list").unwrap();
        assert_eq!(page, ["a", "b"]);
        assert_eq!(link.unwrap(), "</v2/x/tags/list?n=2&last=b>; rel=\"next\"");
        let q = vec![
            ("n".to_string(), "2".to_string()),
            ("last".to_string(), "b".to_string()),
        ];
        let (page, link) = paginate(items, &q, "/p").unwrap();
        assert_eq!((page, link), (vec!["c".to_string()], None));
    }
}
