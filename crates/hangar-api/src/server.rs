//! The Machines API over HTTP+JSON, shaped like Fly's, behind a bearer token.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response};
use serde::{Deserialize, Serialize};

use crate::config::MachineConfig;
use crate::error::Error;
use crate::node::Node;
use crate::state::{Machine, MachineState, Placement};

pub type Body = BoxBody<Bytes, std::io::Error>;

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

/// The requests in flight per caller.
#[derive(Default)]
pub struct InFlight(
    std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Semaphore>>>,
);

impl InFlight {
    fn permit(&self, who: &str) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let sem = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(who.to_string())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT_PER_CALLER)))
            .clone();
        sem.try_acquire_owned().ok()
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
}

/// Who calls.
#[derive(Clone, Debug, PartialEq)]
enum Caller {
    Admin,
    Org(String),
}

fn full(status: u16, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("Content-Type", content_type)
        .body(
            Full::new(body.into())
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

fn json(status: u16, v: &serde_json::Value) -> Response<Body> {
    full(status, "application/json", v.to_string())
}

fn error(e: &Error) -> Response<Body> {
    json(e.status(), &serde_json::json!({"error": e.to_string()}))
}

fn machine_json(node: &Node, m: &Machine) -> serde_json::Value {
    serde_json::to_value(MachineView::of(node, m)).unwrap_or_default()
}

/// A machine as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MachineView {
    pub id: String,
    pub name: String,
    pub state: MachineState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<u32>,
    pub config: MachineConfig,
    /// Its IPv6 address (Fly's name for it); none once destroyed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<String>,
    pub restarts: u32,
    pub created_at: u64,
    pub updated_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmm: Option<hangar_machine::runtime::VmInfo>,
    /// Every check of its config, `pending` until the first verdict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checks: Option<Vec<crate::checks::CheckStatus>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oom_killed: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_ref: Option<ImageRef>,
}

/// The image a machine's reference names, as the node's store has it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImageRef {
    pub reference: String,
    pub digest: String,
}

impl MachineView {
    pub fn of(node: &Node, m: &Machine) -> MachineView {
        let addr = hangar_machine::network::address(m.slot);
        let live = m.state != MachineState::Destroyed;
        let checks = (!m.config.checks.is_empty()).then(|| {
            let mut checks = node.checks.status(&m.id);
            for name in m.config.checks.keys() {
                if !checks.iter().any(|c| &c.name == name) {
                    checks.push(crate::checks::CheckStatus {
                        name: name.clone(),
                        status: crate::checks::CheckState::Pending,
                        output: String::new(),
                    });
                }
            }
            checks
        });
        let image_ref = m
            .config
            .image
            .parse::<hangar_oci::Reference>()
            .ok()
            .and_then(|image| node.images.resolve(&image).ok())
            .map(|record| ImageRef {
                reference: record.reference.to_string(),
                digest: record.digest.to_string(),
            });
        MachineView {
            id: m.id.clone(),
            name: m.name.clone(),
            state: m.state,
            app: m.app.clone(),
            release: m.release,
            config: m.config.clone(),
            private_ip: live.then(|| addr.v6.to_string()),
            ipv4: live.then(|| addr.v4.to_string()),
            restarts: m.restarts,
            created_at: m.created_at,
            updated_at: m.updated_at,
            vmm: node.driver.vm_info(&m.id),
            checks,
            exit_code: m.exit_code,
            oom_killed: m.exit_code.map(|_| m.oom_killed),
            image_ref,
        }
    }
}

/// The largest request body the API reads; larger ones answer 413 after
/// reading no more than this.
pub const MAX_BODY: usize = 1 << 20;

async fn read_json<T: for<'de> Deserialize<'de>>(body: Incoming) -> Result<T, Error> {
    let bytes = http_body_util::Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                Error::TooLarge(format!(
                    "the request body is over {} KiB; send less",
                    MAX_BODY >> 10
                ))
            } else {
                Error::Invalid(format!("reading the request body: {e}"))
            }
        })?
        .to_bytes();
    parse_json(&bytes)
}

/// A request body as `T` (an empty body is `{}`); the error names the
/// field (`config.guest.memory_mb: ...`).
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

fn query(req: &Request<Incoming>) -> Vec<(String, String)> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

fn param<'a>(q: &'a [(String, String)], k: &str) -> Option<&'a str> {
    q.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str())
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct CreateApp {
    name: String,
    org: String,
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct RegistryLoginRequest {
    username: String,
    password: String,
}

/// Registry logins are an org's: the admin pulls with the operator's own.
fn login_org(caller: &Caller) -> Result<&str, Error> {
    match caller {
        Caller::Org(org) => Ok(org),
        Caller::Admin => Err(Error::Invalid(
            "registry logins belong to an org (use an org token); the admin pulls with the operator's ~/.docker/config.json".into(),
        )),
    }
}

/// A registry as image references name it: `host` or `host:port`.
fn valid_registry(registry: &str) -> Result<(), Error> {
    let ok = !registry.is_empty()
        && registry.len() <= 255
        && registry
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]_".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "registry {registry:?} must be a host or host:port, as image references name it"
        )))
    }
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct ScaleRequest {
    count: u32,
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct SetSecrets {
    values: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct UnsetSecrets {
    names: Vec<String>,
}

/// Run a long operation, streaming its progress as JSON lines; the last
/// line is `{"ok": true, ...result}` or `{"ok": false, "error": ...}`.
fn progress_response<F, Fut>(run: F) -> Response<Body>
where
    F: FnOnce(crate::deploy::Progress) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<serde_json::Value, Error>> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let done = tx.clone();
    tokio::spawn(async move {
        let last = match run(crate::deploy::Progress(tx)).await {
            Ok(mut v) => {
                v["ok"] = true.into();
                v
            }
            Err(e) => serde_json::json!({"ok": false, "error": e.to_string()}),
        };
        let _ = done.send(last);
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let v = rx.recv().await?;
        Some((Ok(Frame::data(Bytes::from(format!("{v}\n")))), rx))
    });
    Response::builder()
        .status(200)
        .header("Content-Type", "application/x-ndjson")
        .body(StreamBody::new(stream).boxed())
        .unwrap_or_else(|_| full(500, "text/plain", "stream"))
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct CreateRequest {
    name: Option<String>,
    /// The app the machine belongs to (or `config.metadata.app`, as
    /// earlier clients name it).
    app: Option<String>,
    config: MachineConfig,
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct UpdateRequest {
    /// Its app, when it changes (or `config.metadata.app`).
    app: Option<String>,
    config: MachineConfig,
}

/// The app a create or update names: `app`, or `config.metadata.app` as
/// earlier clients send it (taken out of the metadata, which the node
/// does not read).
fn app_named(app: Option<String>, config: &mut MachineConfig) -> Result<Option<String>, Error> {
    let legacy = config.metadata.remove("app");
    match (app, legacy) {
        (Some(a), Some(b)) if a != b => Err(Error::Invalid(format!(
            "app {a:?} and config.metadata.app {b:?} disagree; give one"
        ))),
        (a, b) => Ok(a.or(b)),
    }
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct StopRequest {
    signal: String,
    /// Seconds.
    timeout: u64,
}

impl StopRequest {
    fn timeout(&self) -> Result<Duration, Error> {
        if self.timeout > crate::config::MAX_SECONDS {
            return Err(Error::Invalid(format!(
                "timeout must be at most {} seconds",
                crate::config::MAX_SECONDS
            )));
        }
        Ok(Duration::from_secs(self.timeout))
    }
}

/// `wait`'s `timeout` parameter: whole seconds, 60 when not given.
fn wait_timeout(given: Option<&str>) -> Result<Duration, Error> {
    let seconds = match given {
        None => 60,
        Some(t) => t
            .parse::<u64>()
            .ok()
            .filter(|t| *t <= crate::config::MAX_SECONDS)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "timeout {t:?} must be whole seconds, at most {}",
                    crate::config::MAX_SECONDS
                ))
            })?,
    };
    Ok(Duration::from_secs(seconds))
}

impl Default for StopRequest {
    fn default() -> Self {
        StopRequest {
            signal: "SIGTERM".into(),
            timeout: 10,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct SignalRequest {
    signal: String,
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct ExecRequest {
    cmd: Vec<String>,
    /// A user of the machine's image; default root.
    user: Option<String>,
    /// The command's standard input (as Fly's exec takes it).
    stdin: String,
}

/// Run a blocking node operation off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("operation failed: {e}")))?
}

impl Api {
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, Infallible> {
        let given = req
            .headers()
            .get("Authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| t.trim().to_string())
            .unwrap_or_default();
        let caller = if !given.is_empty() && given == self.token {
            Some(Caller::Admin)
        } else {
            self.orgs
                .as_ref()
                .and_then(|check| check(&given))
                .map(Caller::Org)
        };
        let Some(caller) = caller else {
            return Ok(json(
                401,
                &serde_json::json!({"error": "missing or wrong API token; the CLI reads it from $HANGAR_HOME/config.toml or $HANGAR_API_TOKEN (an org token from `hangar auth token create`)"}),
            ));
        };
        if let Err(e) = self.authorize(&caller, &req) {
            return Ok(error(&e));
        }
        let who = match &caller {
            Caller::Admin => String::new(),
            Caller::Org(org) => org.clone(),
        };
        // Held until the answer is ready (a streamed answer's work runs on).
        let Some(_permit) = self.in_flight.permit(&who) else {
            let mut r = error(&Error::Busy(format!(
                "more than {IN_FLIGHT_PER_CALLER} requests of {} are in flight; retry after a second",
                if who.is_empty() { "the admin" } else { "this org" }
            )));
            r.headers_mut()
                .insert("Retry-After", hyper::header::HeaderValue::from_static("1"));
            return Ok(r);
        };
        Ok(match self.route(req, &caller).await {
            Ok(r) => r,
            Err(e) => error(&e),
        })
    }

    /// An org token reaches its org's apps and their machines; anything
    /// else answers as if it did not exist.
    fn authorize(&self, caller: &Caller, req: &Request<Incoming>) -> Result<(), Error> {
        let Caller::Org(org) = caller else {
            return Ok(());
        };
        let path = req.uri().path().trim_end_matches('/');
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        let node = &self.node;
        let app_of_org = |app: &str| node.state.app(app).ok().is_some_and(|a| &a.org == org);
        match parts.as_slice() {
            ["v1", "apps"] | ["v1", "machines"] | ["v1", "registry-logins", ..] => Ok(()),
            ["v1", "apps", app, ..] if app_of_org(app) => Ok(()),
            ["v1", "apps", app, ..] => Err(Error::NotFound(format!("no app {app:?}; create it with `hangar launch` or list them with `hangar apps list`"))),
            ["v1", "machines", id, ..] => {
                let visible = node
                    .state
                    .get(id)
                    .ok()
                    .and_then(|m| m.app)
                    .is_some_and(|app| app_of_org(&app));
                if visible {
                    Ok(())
                } else {
                    Err(Error::NotFound(format!("no machine {id:?}; list them with `hangar machine list`")))
                }
            }
            _ => Err(Error::NotFound(format!("no such endpoint: {path}"))),
        }
    }

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
        let org = match caller {
            Caller::Admin => None,
            Caller::Org(org) => Some(org.clone()),
        };
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

    /// Whether `caller` may see machine `m` (in lists).
    fn sees(&self, caller: &Caller, m: &Machine) -> bool {
        match caller {
            Caller::Admin => true,
            Caller::Org(org) => m
                .app
                .as_ref()
                .and_then(|a| self.node.state.app(a).ok())
                .is_some_and(|a| &a.org == org),
        }
    }

    async fn route(
        &self,
        req: Request<Incoming>,
        caller: &Caller,
    ) -> Result<Response<Body>, Error> {
        let path = req.uri().path().trim_end_matches('/').to_string();
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        let method = req.method().clone();
        let q = query(&req);
        let node = self.node.clone();
        match (method, parts.as_slice()) {
            (Method::GET, ["v1", "machines"]) => {
                let list: Vec<serde_json::Value> = node
                    .state
                    .list()?
                    .iter()
                    .filter(|m| self.sees(caller, m))
                    .map(|m| machine_json(&node, m))
                    .collect();
                Ok(json(200, &serde_json::Value::Array(list)))
            }
            (Method::POST, ["v1", "machines"]) => {
                let mut body: CreateRequest = read_json(req.into_body()).await?;
                let app = app_named(body.app, &mut body.config)?;
                node.check_config(&body.config)?;
                self.org_may_use(caller, app.as_deref())?;
                self.fetch_image(caller, &body.config.image).await?;
                let place = Placement { app, release: None };
                let m = blocking(move || node.create(body.name, place, body.config)).await?;
                Ok(json(200, &machine_json(&self.node, &m)))
            }
            (Method::GET, ["v1", "machines", id]) => {
                Ok(json(200, &machine_json(&node, &node.state.get(id)?)))
            }
            (Method::POST, ["v1", "machines", id]) => {
                let mut body: UpdateRequest = read_json(req.into_body()).await?;
                let current = node.state.get(id)?;
                // Its app (and release) stay unless the update names
                // another app.
                let app = app_named(body.app, &mut body.config)?.or(current.app.clone());
                let release = current.release.filter(|_| app == current.app);
                node.check_config(&body.config)?;
                self.org_may_use(caller, app.as_deref())?;
                self.fetch_image(caller, &body.config.image).await?;
                let id = id.to_string();
                let place = Placement { app, release };
                let m = blocking(move || node.update(&id, place, body.config)).await?;
                Ok(json(200, &machine_json(&self.node, &m)))
            }
            (Method::DELETE, ["v1", "machines", id]) => {
                let force = param(&q, "force") == Some("true");
                let id = id.to_string();
                let m = blocking(move || node.destroy(&id, force)).await?;
                Ok(json(200, &machine_json(&self.node, &m)))
            }
            (Method::POST, ["v1", "machines", id, "start"]) => {
                let id = id.to_string();
                let m = blocking(move || node.start(&id)).await?;
                Ok(json(200, &machine_json(&self.node, &m)))
            }
            (Method::POST, ["v1", "machines", id, op @ ("stop" | "restart")]) => {
                let body: StopRequest = read_json(req.into_body()).await?;
                let timeout = body.timeout()?;
                let (id, op) = (id.to_string(), op.to_string());
                let m = blocking(move || {
                    if op == "stop" {
                        node.stop(&id, &body.signal, timeout)
                    } else {
                        node.restart(&id, &body.signal, timeout)
                    }
                })
                .await?;
                Ok(json(200, &machine_json(&self.node, &m)))
            }
            (Method::POST, ["v1", "machines", id, "signal"]) => {
                let body: SignalRequest = read_json(req.into_body()).await?;
                if body.signal.is_empty() {
                    return Err(Error::Invalid(
                        "signal is required, e.g. {\"signal\": \"SIGUSR1\"}".into(),
                    ));
                }
                node.signal(id, &body.signal)?;
                Ok(json(200, &serde_json::json!({"ok": true})))
            }
            (Method::POST, ["v1", "machines", id, "exec"]) => {
                let body: ExecRequest = read_json(req.into_body()).await?;
                let id = id.to_string();
                let out =
                    blocking(move || node.exec(&id, &body.cmd, body.user.as_deref(), &body.stdin))
                        .await?;
                Ok(json(200, &serde_json::to_value(out).unwrap_or_default()))
            }
            (Method::GET, ["v1", "machines", id, "events"]) => {
                let m = node.state.get(id)?;
                Ok(json(
                    200,
                    &serde_json::to_value(node.state.events(&m.id)?).unwrap_or_default(),
                ))
            }
            (Method::GET, ["v1", "machines", id, "wait"]) => {
                let want = match param(&q, "state").unwrap_or("started") {
                    "started" => MachineState::Started,
                    "stopped" => MachineState::Stopped,
                    "destroyed" => MachineState::Destroyed,
                    _ => {
                        return Err(Error::Invalid(
                            "state must be started, stopped or destroyed".into(),
                        ))
                    }
                };
                let timeout = wait_timeout(param(&q, "timeout"))?;
                let deadline = Instant::now() + timeout;
                loop {
                    let m = node.state.get(id)?;
                    if m.state == want {
                        return Ok(json(200, &machine_json(&node, &m)));
                    }
                    if Instant::now() > deadline {
                        return Ok(json(
                            408,
                            &serde_json::json!({"error": format!("machine {} is {}, not {want}, after {}s", m.id, m.state, timeout.as_secs())}),
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            (Method::GET, ["v1", "apps"]) => {
                let mut list = Vec::new();
                let visible = node.state.apps()?.into_iter().filter(|a| match caller {
                    Caller::Admin => true,
                    Caller::Org(org) => &a.org == org,
                });
                for app in visible {
                    let machines = crate::deploy::app_machines(&node, &app.name)?;
                    let current = node.state.current_release(&app.name)?.map(|r| r.version);
                    list.push(serde_json::json!({"name": app.name, "org": app.org, "machines": machines.len(), "release": current}));
                }
                Ok(json(200, &serde_json::Value::Array(list)))
            }
            (Method::POST, ["v1", "apps"]) => {
                let body: CreateApp = read_json(req.into_body()).await?;
                let org = match (caller, body.org.as_str()) {
                    (Caller::Org(org), o) if o.is_empty() || o == org => org.clone(),
                    (Caller::Org(org), o) => {
                        return Err(Error::Invalid(format!(
                            "this token is for org {org}, not {o}"
                        )))
                    }
                    (Caller::Admin, "") => "personal".to_string(),
                    (Caller::Admin, o) => o.to_string(),
                };
                let app = node.state.create_app(&body.name, &org)?;
                Ok(json(200, &serde_json::to_value(app).unwrap_or_default()))
            }
            (Method::GET, ["v1", "apps", app]) => {
                let a = node.state.app(app)?;
                let machines: Vec<serde_json::Value> = crate::deploy::app_machines(&node, app)?
                    .iter()
                    .map(|m| machine_json(&node, m))
                    .collect();
                let release = node.state.current_release(app)?;
                Ok(json(
                    200,
                    &serde_json::json!({"name": a.name, "org": a.org, "machines": machines, "release": release}),
                ))
            }
            (Method::DELETE, ["v1", "apps", app]) => {
                node.state.app(app)?;
                for m in crate::deploy::app_machines(&node, app)? {
                    let n = node.clone();
                    blocking(move || n.destroy(&m.id, true)).await?;
                }
                node.state.delete_app(app)?;
                Ok(json(200, &serde_json::json!({"ok": true})))
            }
            (Method::GET, ["v1", "apps", app, "releases"]) => {
                node.state.app(app)?;
                Ok(json(
                    200,
                    &serde_json::to_value(node.state.releases(app)?).unwrap_or_default(),
                ))
            }
            (Method::POST, ["v1", "apps", app, "deploy"]) => {
                let body: crate::deploy::DeployRequest = read_json(req.into_body()).await?;
                self.fetch_image(caller, &body.image).await?;
                let app = app.to_string();
                Ok(progress_response(move |progress| async move {
                    crate::deploy::deploy(node, app, body, progress)
                        .await
                        .map(|r| serde_json::json!({"release": r}))
                }))
            }
            (Method::POST, ["v1", "apps", app, "scale"]) => {
                let body: ScaleRequest = read_json(req.into_body()).await?;
                node.state.app(app)?;
                let app = app.to_string();
                Ok(progress_response(move |progress| async move {
                    crate::deploy::scale_count(node, app, body.count, progress)
                        .await
                        .map(|()| serde_json::json!({}))
                }))
            }
            (Method::GET, ["v1", "registry-logins"]) => {
                let org = login_org(caller)?;
                let list: Vec<serde_json::Value> = node
                    .state
                    .registry_logins(org)?
                    .into_iter()
                    .map(|(registry, username)| serde_json::json!({"registry": registry, "username": username}))
                    .collect();
                Ok(json(200, &serde_json::Value::Array(list)))
            }
            (Method::PUT, ["v1", "registry-logins", registry]) => {
                let org = login_org(caller)?;
                let body: RegistryLoginRequest = read_json(req.into_body()).await?;
                valid_registry(registry)?;
                if body.username.is_empty() || body.password.is_empty() {
                    return Err(Error::Invalid(
                        "a registry login needs a username and a password".into(),
                    ));
                }
                node.state.set_registry_login(
                    &node.sealer,
                    org,
                    registry,
                    &body.username,
                    &body.password,
                )?;
                Ok(json(
                    200,
                    &serde_json::json!({"registry": registry, "username": body.username}),
                ))
            }
            (Method::DELETE, ["v1", "registry-logins", registry]) => {
                let org = login_org(caller)?;
                if !node.state.remove_registry_login(org, registry)? {
                    return Err(Error::NotFound(format!(
                        "org {org} has no login for {registry}"
                    )));
                }
                Ok(json(200, &serde_json::json!({"removed": registry})))
            }
            (Method::GET, ["v1", "apps", app, "secrets"]) => {
                node.state.app(app)?;
                Ok(json(
                    200,
                    &serde_json::to_value(node.state.secret_infos(app)?).unwrap_or_default(),
                ))
            }
            (Method::POST, ["v1", "apps", app, "secrets"]) => {
                let body: SetSecrets = read_json(req.into_body()).await?;
                node.state.app(app)?;
                for name in body.values.keys() {
                    if name.is_empty()
                        || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                    {
                        return Err(Error::Invalid(format!(
                            "secret name {name:?}: use letters, digits and _"
                        )));
                    }
                }
                node.state.set_secrets(&node.sealer, app, &body.values)?;
                Ok(json(
                    200,
                    &serde_json::to_value(node.state.secret_infos(app)?).unwrap_or_default(),
                ))
            }
            (Method::POST, ["v1", "apps", app, "secrets", "unset"]) => {
                let body: UnsetSecrets = read_json(req.into_body()).await?;
                node.state.app(app)?;
                let gone = node.state.unset_secrets(app, &body.names)?;
                Ok(json(200, &serde_json::json!({"unset": gone})))
            }
            (Method::GET, ["v1", "machines", id, "logs"]) => {
                let m = node.state.get(id)?;
                let follow = param(&q, "follow") == Some("true");
                Ok(logs_response(node, m.id, follow))
            }
            _ => Err(Error::NotFound(format!("no such endpoint: {path}"))),
        }
    }
}

/// The machine's log; with `follow`, keeps streaming as it grows, across
/// restarts and rotations, until the machine is destroyed.
fn logs_response(node: Arc<Node>, id: String, follow: bool) -> Response<Body> {
    let path = node.driver.log_path(&id);
    let rotated = path.with_extension("log.1");
    let mut initial = std::fs::read(&rotated).unwrap_or_default();
    initial.extend(std::fs::read(&path).unwrap_or_default());
    if !follow {
        return full(200, "text/plain", initial);
    }
    struct Cursor {
        node: Arc<Node>,
        id: String,
        path: std::path::PathBuf,
        offset: u64,
        first: Option<Vec<u8>>,
    }
    let offset = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let cursor = Cursor {
        node,
        id,
        path,
        offset,
        first: Some(initial),
    };
    let stream = futures_util::stream::unfold(cursor, |mut c| async move {
        if let Some(first) = c.first.take() {
            return Some((Ok(Frame::data(Bytes::from(first))), c));
        }
        loop {
            let len = std::fs::metadata(&c.path).map(|m| m.len()).unwrap_or(0);
            if len < c.offset {
                c.offset = 0; // rotated or recreated: start the new file
            }
            if len > c.offset {
                use std::io::{Read, Seek, SeekFrom};
                let mut buf = Vec::new();
                if let Ok(mut f) = std::fs::File::open(&c.path) {
                    let _ = f.seek(SeekFrom::Start(c.offset));
                    let _ = f.take(1 << 20).read_to_end(&mut buf);
                }
                c.offset += buf.len() as u64;
                return Some((Ok(Frame::data(Bytes::from(buf))), c));
            }
            let gone = c
                .node
                .state
                .get(&c.id)
                .map(|m| m.state == MachineState::Destroyed)
                .unwrap_or(true);
            if gone {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    Response::builder()
        .status(200)
        .header("Content-Type", "text/plain")
        .body(StreamBody::new(stream).boxed())
        .unwrap_or_else(|_| full(500, "text/plain", "stream"))
}

/// Serve the API until `shutdown` resolves.
pub async fn serve(
    api: Arc<Api>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) {
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            a = listener.accept() => match a { Ok((s, _)) => s, Err(_) => continue },
            () = &mut shutdown => break,
        };
        let api = api.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| api.clone().handle(req));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    //! Whatever a caller sends goes through what the API does with it
    //! before the node acts (parsing, validation, every duration and limit
    //! made from the numbers) without a panic, and every refusal is a 4xx.
    use super::*;
    use proptest::prelude::*;
    use serde_json::{json, Value};

    fn config() -> Value {
        json!({
            "image": "127.0.0.1:5000/acme/app:v1",
            "env": {"A": "b"},
            "init": {"exec": ["/bin/sh"], "entrypoint": ["sh"], "cmd": ["-c", "true"], "user": "app"},
            "guest": {"cpus": 1, "memory_mb": 256, "driver": "container"},
            "rootfs": {"size_gb": 1},
            "restart": {"policy": "on-failure", "max_retries": 3},
            "services": [{"internal_port": 8080, "protocol": "tcp", "autostop": true,
                "autostart": true, "min_machines_running": 0, "idle_timeout": 60,
                "soft_limit": 10, "hard_limit": 20}],
            "metadata": {"app": "web"},
            "auto_destroy": false,
            "egress": {"action": "enforce", "allowed_domains": ["example.com"]},
            "checks": {"http": {"port": 8080, "path": "/", "interval": 1.0,
                "timeout": 1.0, "grace_period": 1.0}},
            "kill_signal": "SIGTERM",
            "kill_timeout": 5
        })
    }

    /// A body of each kind that passes, with every field set.
    fn valid() -> Vec<Value> {
        vec![
            json!({"name": "m1", "config": config()}),
            json!({"config": config()}),
            json!({"image": "127.0.0.1:5000/acme/app:v2", "config": config(), "count": 2,
                "strategy": "bluegreen", "max_unavailable": 1, "description": "v2"}),
            json!({"signal": "SIGTERM", "timeout": 10}),
            json!({"count": 3}),
            json!({"cmd": ["true"], "user": "app", "stdin": "input"}),
            json!({"values": {"A": "b"}}),
            json!({"names": ["A"]}),
        ]
    }

    /// JSON pointers to every node of `v` below the root.
    fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
        let children: Vec<(String, &Value)> = match v {
            Value::Object(m) => m.iter().map(|(k, v)| (k.clone(), v)).collect(),
            Value::Array(a) => a
                .iter()
                .enumerate()
                .map(|(i, v)| (i.to_string(), v))
                .collect(),
            _ => Vec::new(),
        };
        for (key, child) in children {
            let p = format!("{at}/{key}");
            out.push(p.clone());
            pointers(child, p, out);
        }
    }

    /// Values at the edges: the limits of every integer type, huge, tiny,
    /// negative and fractional numbers, odd strings, wrong shapes.
    fn edge_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            1 => Just(Value::Null),
            1 => any::<bool>().prop_map(Value::from),
            6 => prop_oneof![
                Just(0u64),
                Just(1),
                Just(u64::from(u16::MAX) + 1),
                Just(u64::from(u32::MAX)),
                Just(u64::from(u32::MAX) + 1),
                Just(1 << 44),
                Just(i64::MAX as u64 + 1),
                Just(u64::MAX),
                any::<u64>(),
            ]
            .prop_map(Value::from),
            2 => prop_oneof![Just(-1i64), Just(i64::MIN), any::<i64>()].prop_map(Value::from),
            4 => prop_oneof![
                Just(1e300f64),
                Just(f64::MAX),
                Just(-0.0),
                Just(1e-300),
                Just(0.5),
                Just(-5.0),
                Just(3600.0000001),
                any::<f64>().prop_filter("JSON has finite numbers", |f| f.is_finite()),
            ]
            .prop_map(Value::from),
            2 => "[a-zA-Z0-9/:.@_ -]{0,12}".prop_map(Value::from),
            1 => Just(Value::from("x".repeat(70_000))),
            1 => Just(Value::from("\u{0}\u{202e}\u{ffff}")),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("[a-z_]{1,12}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// A body of `valid()` with a few nodes replaced or removed.
    fn mutated() -> impl Strategy<Value = Value> {
        // Bodies with a machine config (the first three) have the most
        // fields, so they get the most cases.
        let bodies: Vec<(u32, BoxedStrategy<Value>)> = valid()
            .into_iter()
            .enumerate()
            .map(|(i, body)| (if i < 3 { 6 } else { 1 }, mutations(body)))
            .collect();
        prop::strategy::Union::new_weighted(bodies)
    }

    fn mutations(body: Value) -> BoxedStrategy<Value> {
        let mut all = Vec::new();
        pointers(&body, String::new(), &mut all);
        let edit = (
            prop::sample::select(all),
            prop::option::weighted(0.9, edge_value()),
        );
        prop::collection::vec(edit, 1..3)
            .prop_map(move |edits| {
                let mut v = body.clone();
                for (pointer, value) in edits {
                    let Some((parent, key)) = pointer.rsplit_once('/') else {
                        continue;
                    };
                    match (v.pointer_mut(parent), value) {
                        (Some(Value::Object(m)), Some(value)) => {
                            m.insert(key.to_string(), value);
                        }
                        (Some(Value::Object(m)), None) => {
                            m.remove(key);
                        }
                        (Some(Value::Array(a)), value) => {
                            if let Ok(i) = key.parse::<usize>() {
                                if i < a.len() {
                                    match value {
                                        Some(value) => a[i] = value,
                                        None => {
                                            a.remove(i);
                                        }
                                    }
                                }
                            }
                        }
                        _ => {}
                    }
                }
                v
            })
            .boxed()
    }

    /// What the node derives from an accepted config, none of which may
    /// panic or wrap.
    fn accepted(c: &MachineConfig) -> usize {
        if let Err(e) = c.validate() {
            assert_eq!(e.status(), 400, "{e}");
            return 0;
        }
        let (host_cpus, host_mb) = crate::config::host_capacity();
        assert!(c.guest.cpus >= 1 && c.guest.cpus <= host_cpus);
        assert!(c.guest.memory_mb >= 16 && c.guest.memory_mb <= host_mb);
        c.image
            .parse::<hangar_oci::Reference>()
            .expect("a validated image reference parses");
        // Every duration is within the stated range, so no deadline made
        // from one can overflow.
        let most = Duration::from_secs(crate::config::MAX_SECONDS);
        let (_, kill) = c.kill();
        assert!(kill <= most);
        let now = Instant::now();
        let _ = now + kill;
        for check in c.checks.values() {
            assert!(check.interval() <= most && check.timeout() <= most);
            assert!(check.grace_period() <= most);
            let _ = now + check.interval() + check.timeout() + check.grace_period();
        }
        for s in &c.services {
            assert!(s.idle_timeout <= crate::config::MAX_SECONDS);
        }
        assert!((1..=crate::config::MAX_ROOTFS_GB).contains(&c.rootfs.size_gb));
        let _ = now + crate::deploy::wait_budget(c);
        let limits = c.limits();
        assert_eq!(limits.disk_mb, c.rootfs.size_gb * 1024);
        let p = std::path::Path::new("/x");
        let bundle = hangar_machine::bundle::config("id", "host", p, p, p, p, limits);
        assert_eq!(
            bundle["linux"]["resources"]["memory"]["limit"].as_u64(),
            Some(c.guest.memory_mb << 20),
            "the cgroup gets the memory asked for"
        );
        1
    }

    /// Every request type the Machines and Apps API reads from a body;
    /// how many machine configs passed validation.
    fn through_the_api(body: &[u8]) -> usize {
        let refused = |e: Error| assert!(matches!(e.status(), 400 | 404), "{e}");
        let mut configs = 0;
        match parse_json::<CreateRequest>(body) {
            Ok(r) => configs += accepted(&r.config),
            Err(e) => refused(e),
        }
        match parse_json::<UpdateRequest>(body) {
            Ok(r) => configs += accepted(&r.config),
            Err(e) => refused(e),
        }
        match parse_json::<crate::deploy::DeployRequest>(body) {
            Ok(r) => {
                if let Some(count) = r.count {
                    let _ = crate::deploy::check_count(count).map_err(refused);
                }
                configs += accepted(&r.config)
            }
            Err(e) => refused(e),
        }
        match parse_json::<StopRequest>(body) {
            Ok(r) => match r.timeout() {
                Ok(t) => assert!(t.as_secs() <= crate::config::MAX_SECONDS),
                Err(e) => refused(e),
            },
            Err(e) => refused(e),
        }
        match parse_json::<ScaleRequest>(body) {
            Ok(r) => {
                let _ = crate::deploy::check_count(r.count).map_err(refused);
            }
            Err(e) => refused(e),
        }
        for e in [
            parse_json::<ExecRequest>(body).err(),
            parse_json::<SignalRequest>(body).err(),
            parse_json::<SetSecrets>(body).err(),
            parse_json::<UnsetSecrets>(body).err(),
            parse_json::<RegistryLoginRequest>(body).err(),
        ]
        .into_iter()
        .flatten()
        {
            refused(e);
        }
        configs
    }

    #[test]
    fn the_valid_bodies_are_accepted() {
        let [create, update, deploy, ..] = &valid()[..] else {
            unreachable!()
        };
        for body in [create, update, deploy] {
            assert!(
                through_the_api(&serde_json::to_vec(body).unwrap()) >= 1,
                "{body}"
            );
        }
    }

    #[test]
    fn mutated_bodies_never_panic() {
        use proptest::test_runner::{Config, TestRunner};
        let mut runner = TestRunner::new(Config {
            cases: 10_000,
            failure_persistence: None,
            ..Config::default()
        });
        let configs = std::cell::Cell::new(0);
        runner
            .run(&mutated(), |v| {
                configs.set(configs.get() + through_the_api(&serde_json::to_vec(&v).unwrap()));
                Ok(())
            })
            .unwrap();
        // The edits must often leave a config that passes, or the test
        // would never reach the arithmetic made from accepted numbers.
        assert!(configs.get() > 500, "{} configs passed", configs.get());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn cut_and_random_bytes_never_panic(v in mutated(), cut in any::<prop::sample::Index>(), noise in prop::collection::vec(any::<u8>(), 0..64)) {
            let text = serde_json::to_vec(&v).unwrap();
            through_the_api(&text[..cut.index(text.len() + 1)]);
            through_the_api(&noise);
        }

        #[test]
        fn wait_timeouts_are_bounded_or_refused(t in prop_oneof![
            "[0-9]{1,25}".boxed(),
            "-?[0-9a-z.+_ ]{0,8}".boxed(),
            any::<u64>().prop_map(|n| n.to_string()).boxed(),
        ]) {
            match wait_timeout(Some(&t)) {
                Ok(d) => prop_assert!(d.as_secs() <= crate::config::MAX_SECONDS),
                Err(e) => prop_assert_eq!(e.status(), 400),
            }
        }
    }
}
