//! The distribution API over HTTP/1.1. Bodies stream in and out; nothing
//! but manifests (capped at 4 MiB) is held whole in memory.
//!
//! - `mod.rs`: the server (open, the connection handler, metrics, the
//!   dispatch from a route to its handler);
//! - `routes.rs`: request paths as [`routes::Route`]s, parsed from the right
//!   (repository names have slashes);
//! - `http.rs`: bodies, responses, errors as responses, query parameters,
//!   ranges and pagination;
//! - `access.rs`: who may do what (names, authorization, the token
//!   endpoint);
//! - `manifests.rs`: the catalog, tags, manifests and referrers;
//! - `blobs.rs`: blobs and uploads (chunked, resumable, mounts).

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hangar_oci::digest::Hasher;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_LENGTH};
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::Mutex as AsyncMutex;

use crate::auth::{Action, Auth};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::storage::RegistryStore;

/// Manifests larger than this are refused.
pub const MAX_MANIFEST: usize = 4 << 20;
const CHUNK: usize = 256 * 1024;

pub type Body = BoxBody<Bytes, io::Error>;

mod access;
mod blobs;
mod http;
mod manifests;
mod routes;

use http::{
    build, empty_body, error_response, json, param, parse_digest, query, response, Handled, Refusal,
};
use routes::{parse_route, Route};

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
}
