//! The Machines and Apps API over HTTP+JSON, shaped like Fly's, on axum.
//!
//! One table of routes ([`router`]); who calls is settled once, by the
//! [`authenticate`] layer (a bearer token: the node's admin token, or an
//! org's), and what an org may reach is settled by the extractors a handler
//! takes: [`OwnApp`] and [`OwnMachine`] answer 404 for anything of another
//! org, as if it did not exist. Bodies are read by [`Json`] under the
//! [`MAX_BODY`] limit layer, and every error is an [`Error`] that answers
//! `{"error": ...}` with its status. The bodies are the types of
//! [`crate::wire`], which the client shares.

#[cfg(test)]
mod api_tests;
mod apps;
mod carry;
pub mod console;
pub mod dashboard;
mod machines;
mod metrics;
#[cfg(test)]
mod tests;
pub mod tunnel;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use bytes::Bytes;
use serde::Deserialize;

use crate::error::Error;
use crate::node::{blocking, Node};
use crate::store::Machine;
use crate::wire::ErrorBody;

/// Makes an image usable by a machine of an org (`None`: the admin), fetching
/// it into the local store, or says why not. For an org, a refusal reads the
/// same as a missing image.
pub type Puller = Arc<
    dyn Fn(
            Option<String>,
            hangar_oci::Reference,
            Option<RegistryLogin>,
        )
            -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>
        + Send
        + Sync,
>;

/// An org's user name and password at another registry.
pub type RegistryLogin = (String, String);

/// Maps an org's API token to its org (the registry's tokens: one set of
/// orgs for images, apps and machines).
pub type OrgTokens = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Requests one caller (an org, or the admin) may have in flight at once;
/// more answer 429, so one tenant's flood never holds the node's workers
/// that another tenant's requests need.
pub const IN_FLIGHT_PER_CALLER: usize = 32;

/// The largest request body the API reads; larger ones answer 413 after
/// reading no more than this.
pub const MAX_BODY: usize = 1 << 20;

/// Tunnels and consoles one caller may have open on this node at once;
/// more answer 429, so one tenant's connections never use up the node's.
pub const STREAMS_PER_CALLER: usize = 64;

/// Permits per caller, up to `N` at once: the requests in flight, or the
/// tunnels and consoles open.
#[derive(Default)]
pub struct Permits<const N: usize>(
    std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Semaphore>>>,
);

/// The requests in flight per caller.
pub type InFlight = Permits<IN_FLIGHT_PER_CALLER>;
/// The tunnels and consoles open per caller.
pub type Streams = Permits<STREAMS_PER_CALLER>;

impl<const N: usize> Permits<N> {
    fn permit(&self, who: &str) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let sem = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(who.to_string())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(N)))
            .clone();
        sem.try_acquire_owned().ok()
    }

    /// A permit for `caller`, or the busy error naming `what`.
    fn take(
        &self,
        caller: &Caller,
        what: &str,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, Error> {
        self.permit(caller.org().unwrap_or_default())
            .ok_or_else(|| {
                Error::Busy(format!(
                    "{} has {N} {what} open on this node; close some and try again",
                    caller
                        .org()
                        .map(|o| format!("org {o}"))
                        .unwrap_or("the admin".into())
                ))
            })
    }
}

pub struct Api {
    pub node: Arc<Node>,
    /// The node's admin token: everything.
    pub token: String,
    pub pull: Puller,
    /// Org tokens: their org's apps and those apps' machines only.
    pub orgs: Option<OrgTokens>,
    pub in_flight: InFlight,
    /// The tunnels and consoles open.
    pub streams: Streams,
    /// The dashboard page's tickets and sessions.
    pub dashboards: dashboard::Sessions,
}

type ApiState = State<Arc<Api>>;

/// The API's routes.
pub fn router(api: Arc<Api>) -> Router {
    // Calls about a machine go to the node that runs it.
    let machine = Router::new()
        .route(
            "/v1/machines/{id}",
            get(machines::show)
                .post(machines::update)
                .delete(machines::destroy),
        )
        .route("/v1/machines/{id}/start", post(machines::start))
        .route("/v1/machines/{id}/stop", post(machines::stop))
        .route("/v1/machines/{id}/restart", post(machines::restart))
        .route("/v1/machines/{id}/signal", post(machines::signal))
        .route("/v1/machines/{id}/exec", post(machines::exec))
        .route("/v1/machines/{id}/events", get(machines::events))
        .route("/v1/machines/{id}/wait", get(machines::wait))
        .route("/v1/machines/{id}/logs", get(machines::logs))
        .route("/v1/machines/{id}/proxy", get(tunnel::proxy))
        .route("/v1/machines/{id}/console", get(console::console))
        .route_layer(axum::middleware::from_fn_with_state(
            api.clone(),
            carry::carry,
        ));
    Router::new()
        .route("/v1/machines", get(machines::list).post(machines::create))
        .merge(machine)
        .route("/v1/apps", get(apps::list).post(apps::create))
        .route("/v1/apps/{app}", get(apps::show).delete(apps::destroy))
        .route("/v1/apps/{app}/releases", get(apps::releases))
        .route("/v1/apps/{app}/deploy", post(apps::deploy))
        .route("/v1/apps/{app}/scale", post(apps::scale))
        .route("/v1/apps/{app}/purge", post(apps::purge))
        .route("/v1/internal/purge", post(apps::apply_purge))
        .route("/v1/internal/metrics/targets", get(metrics::targets))
        .route(
            hangar_metrics::prometheus::FEDERATE_PATH,
            get(metrics::federate),
        )
        .route("/metrics", get(metrics::exposition))
        .route(
            "/v1/internal/alertmanager/api/v2/alerts",
            post(metrics::receive_alerts),
        )
        .route("/v1/apps/{app}/alerts", get(metrics::alerts))
        .route("/v1/dashboard/tickets", post(dashboard::ticket))
        .route(
            "/v1/metrics/api/v1/{*endpoint}",
            get(metrics::query).post(metrics::query),
        )
        .route(
            "/v1/apps/{app}/secrets",
            get(apps::secrets).post(apps::set_secrets),
        )
        .route("/v1/apps/{app}/secrets/unset", post(apps::unset_secrets))
        .route("/v1/registry-logins", get(apps::registry_logins))
        .route(
            "/v1/registry-logins/{registry}",
            put(apps::set_registry_login).delete(apps::remove_registry_login),
        )
        .route_layer(axum::middleware::from_fn_with_state(api.clone(), observe))
        .fallback(no_endpoint)
        .method_not_allowed_fallback(no_method)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(
            api.clone(),
            authenticate,
        ))
        // The dashboard's pages: a session cookie, not a token.
        .merge(dashboard::routes())
        .with_state(api)
}

/// Serve the API until `shutdown` resolves (streams still open, such as a
/// followed log, end with the process).
pub async fn serve(
    api: Arc<Api>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::select! {
        r = axum::serve(listener, router(api)) => {
            if let Err(e) = r {
                tracing::error!("the API stopped serving: {e}");
            }
        }
        () = shutdown => {}
    }
}

/// Count each answer of a route, and its latency, for `/metrics`.
async fn observe(State(api): ApiState, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let method = req.method().to_string();
    let start = std::time::Instant::now();
    let r = next.run(req).await;
    api.node
        .api_requests
        .observe(&route, &method, r.status().as_u16(), start.elapsed());
    r
}

async fn no_endpoint(req: Request) -> Error {
    Error::NotFound(format!("no such endpoint: {}", req.uri().path()))
}

async fn no_method(req: Request) -> Error {
    Error::NotAllowed(format!(
        "{} is not a method of {}",
        req.method(),
        req.uri().path()
    ))
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut r = (
            status,
            axum::Json(ErrorBody {
                error: self.to_string(),
            }),
        )
            .into_response();
        if matches!(self, Error::Busy(_)) {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

/// Who calls: set by [`authenticate`] on every request that gets past it.
#[derive(Clone, Debug, PartialEq)]
pub enum Caller {
    Admin,
    Org(String),
}

impl Caller {
    /// The caller's org (`None`: the admin).
    fn org(&self) -> Option<&str> {
        match self {
            Caller::Admin => None,
            Caller::Org(org) => Some(org),
        }
    }
}

/// The layer in front of every route: the bearer token names the caller
/// (401 without one), and each caller has at most
/// [`IN_FLIGHT_PER_CALLER`] requests in flight (429 beyond).
async fn authenticate(State(api): ApiState, mut req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or_default();
    let via = header_text(&req, crate::cluster::VIA);
    let for_org = header_text(&req, crate::cluster::FOR_ORG);
    // Another node of the cluster, with the cluster's token: for the org
    // it names, if any.
    let mut carried = Carried(None);
    let caller = if !given.is_empty() && given == api.token {
        carried = Carried(via);
        match for_org {
            Some(org) if carried.0.is_some() => Some(Caller::Org(org)),
            _ => Some(Caller::Admin),
        }
    } else {
        api.orgs
            .as_ref()
            .and_then(|check| check(given))
            .map(Caller::Org)
    };
    let Some(caller) = caller else {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(ErrorBody {
                error: "missing or wrong API token; the CLI reads it from $HANGAR_HOME/config.toml or $HANGAR_API_TOKEN (an org token from `hangar auth token create`)".into(),
            }),
        )
            .into_response();
    };
    let who = caller.org().unwrap_or_default().to_string();
    // Held until the answer is ready (a streamed answer's work runs on).
    let Some(_permit) = api.in_flight.permit(&who) else {
        return Error::Busy(format!(
            "more than {IN_FLIGHT_PER_CALLER} requests of {} are in flight; retry after a second",
            if who.is_empty() {
                "the admin"
            } else {
                "this org"
            }
        ))
        .into_response();
    };
    req.extensions_mut().insert(caller);
    req.extensions_mut().insert(carried);
    next.run(req).await
}

fn header_text(req: &Request, name: &str) -> Option<String> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// The node that carried a call here from another (see
/// [`crate::cluster`]): it bore the cluster's token, and it is carried
/// no further.
#[derive(Clone, Debug)]
pub struct Carried(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for Carried {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Error> {
        Ok(parts
            .extensions
            .get::<Carried>()
            .cloned()
            .unwrap_or(Carried(None)))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Error> {
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| Error::Internal("a route outside the authentication layer".into()))
    }
}

/// The `{app}` of the path, when the caller may reach it: the admin any
/// app that exists, an org its own (anything else is "no app").
pub struct OwnApp(pub crate::apps::App);

impl FromRequestParts<Arc<Api>> for OwnApp {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, api: &Arc<Api>) -> Result<Self, Error> {
        let caller = Caller::from_request_parts(parts, api).await?;
        let Path(name) = Path::<String>::from_request_parts(parts, api)
            .await
            .map_err(|e| Error::Invalid(e.body_text()))?;
        let app = api.node.state.app(&name)?;
        match caller.org() {
            Some(org) if org != app.org => Err(crate::store::no_app(&name)),
            _ => Ok(OwnApp(app)),
        }
    }
}

/// The `{id}` of the path, when the caller may reach it: the admin any
/// machine that exists, an org the machines of its apps (anything else is
/// "no machine").
pub struct OwnMachine(pub Machine);

impl FromRequestParts<Arc<Api>> for OwnMachine {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, api: &Arc<Api>) -> Result<Self, Error> {
        let caller = Caller::from_request_parts(parts, api).await?;
        let Path(id) = Path::<String>::from_request_parts(parts, api)
            .await
            .map_err(|e| Error::Invalid(e.body_text()))?;
        let m = api.node.state.get(&id)?;
        if api.sees(&caller, &m) {
            Ok(OwnMachine(m))
        } else {
            Err(crate::store::no_machine(&id))
        }
    }
}

/// A request body as `T`, under the [`MAX_BODY`] limit (413 beyond); an
/// empty body is `{}`, and a refusal names the field
/// (`config.guest.memory_mb: ...`).
pub struct Json<T>(pub T);

impl<S: Send + Sync, T: for<'de> Deserialize<'de>> FromRequest<S> for Json<T> {
    type Rejection = Error;

    async fn from_request(req: Request, state: &S) -> Result<Self, Error> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                Error::TooLarge(format!(
                    "the request body is over {} KiB; send less",
                    MAX_BODY >> 10
                ))
            } else {
                Error::Invalid(format!("reading the request body: {}", e.body_text()))
            }
        })?;
        parse_json(&bytes).map(Json)
    }
}

fn parse_json<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, Error> {
    let bytes = if bytes.is_empty() { b"{}" } else { bytes };
    let mut de = serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            Error::Invalid(format!("request body: {inner}"))
        } else {
            Error::Invalid(format!("request body: {path}: {inner}"))
        }
    })
}

/// A query as `T`; a refusal is a 400 naming it.
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: for<'de> Deserialize<'de>> FromRequestParts<S> for Query<T> {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Error> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Query(q.0))
            .map_err(|e| Error::Invalid(format!("query: {}", e.body_text())))
    }
}

impl Api {
    /// An org token's machines belong to its org's apps.
    fn org_may_use(&self, caller: &Caller, app: Option<&str>) -> Result<(), Error> {
        let Caller::Org(org) = caller else {
            return Ok(());
        };
        let app = app.and_then(|a| self.node.state.app(a).ok());
        if app.is_some_and(|a| &a.org == org) {
            Ok(())
        } else {
            Err(Error::Invalid(format!("an org token runs machines of its org's apps only: set app (or config.metadata.app) to an app of {org}")))
        }
    }

    /// Make `image` usable by the caller's machines: checked on every use
    /// for an org, fetched when the store lacks it.
    async fn fetch_image(&self, caller: &Caller, image: &str) -> Result<(), Error> {
        let image: hangar_oci::Reference = image.parse()?;
        let org = caller.org().map(str::to_string);
        let login = match &org {
            Some(org) => {
                self.node
                    .state
                    .open_registry_login(&self.node.sealer, org, &image.registry)?
            }
            None => None,
        };
        (self.pull)(org, image, login).await.map_err(Error::Invalid)
    }

    /// Whether `caller` may see machine `m`.
    fn sees(&self, caller: &Caller, m: &Machine) -> bool {
        match caller.org() {
            None => true,
            Some(org) => m
                .app
                .as_ref()
                .and_then(|a| self.node.state.app(a).ok())
                .is_some_and(|a| a.org == org),
        }
    }
}
