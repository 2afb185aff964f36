//! A typed client of the Machines and Apps API: one method per route of
//! [`crate::server::router`], reading and writing the types of
//! [`crate::wire`]. The CLI calls the node through it, and the API's tests
//! and the benches do too.
//!
//! It owns no configuration: the caller gives the base URL and the token.

use futures_util::{Stream, StreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::apps::{App, Release};
use crate::config::MachineConfig;
use crate::wire::*;

/// What a call can end in besides its answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the node at {base}; is `hangar up` running?")]
    Unreachable {
        base: String,
        #[source]
        source: reqwest::Error,
    },
    /// The node refused: its status and its message (which names the way
    /// out).
    #[error("{message}")]
    Api { status: u16, message: String },
    /// A streamed operation (a deploy) ran and failed: why.
    #[error("{0}")]
    Failed(String),
    /// The answer broke off, or is not what this client reads (a node of
    /// another version?).
    #[error("the node's answer to {what}: {detail}")]
    Answer { what: String, detail: String },
}

impl ClientError {
    /// The HTTP status of a refusal.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// A connection to one node's API as one caller (the admin or an org).
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
    headers: reqwest::header::HeaderMap,
    /// Waited before every request: a round trip between regions, where
    /// one is injected (see [`crate::cluster::Latency`]).
    delay: std::time::Duration,
}

/// No body.
const NONE: Option<&()> = None;

impl Client {
    /// `base` is the API's URL (`http://127.0.0.1:4280`), `token` the admin
    /// token or an org's.
    pub fn new(base: &str, token: &str) -> Client {
        Client::with_http(reqwest::Client::new(), base, token)
    }

    /// The same, over an HTTP client the caller keeps (and its pool).
    pub fn with_http(http: reqwest::Client, base: &str, token: &str) -> Client {
        Client {
            http,
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
            headers: Default::default(),
            delay: std::time::Duration::ZERO,
        }
    }

    /// Wait `delay` before each request (an injected round trip).
    pub fn with_delay(mut self, delay: std::time::Duration) -> Client {
        self.delay = delay;
        self
    }

    /// Send this header with every request too (a node of a cluster says
    /// so to another; see [`crate::cluster`]).
    pub fn with_header(mut self, name: &'static str, value: &str) -> Client {
        if let Ok(v) = reqwest::header::HeaderValue::from_str(value) {
            self.headers.insert(name, v);
        }
        self
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Send a request; a refusal becomes [`ClientError::Api`].
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<reqwest::Response> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .headers(self.headers.clone());
        if let Some(b) = body {
            let bytes = serde_json::to_vec(b).map_err(|e| ClientError::Answer {
                what: path.to_string(),
                detail: format!("the request does not encode: {e}"),
            })?;
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(bytes);
        }
        let resp = req
            .send()
            .await
            .map_err(|source| ClientError::Unreachable {
                base: self.base.clone(),
                source,
            })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let text = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<ErrorBody>(&text)
            .map(|e| e.error)
            .unwrap_or_else(|_| {
                if text.trim().is_empty() {
                    format!("the node answered {status}")
                } else {
                    text
                }
            });
        Err(ClientError::Api {
            status: status.as_u16(),
            message,
        })
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T> {
        let resp = self.send(method, path, body).await?;
        let bytes = resp.bytes().await.map_err(|e| ClientError::Answer {
            what: path.to_string(),
            detail: format!("it broke off: {e}"),
        })?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Answer {
            what: path.to_string(),
            detail: e.to_string(),
        })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call(reqwest::Method::GET, path, NONE).await
    }

    async fn post<T: DeserializeOwned>(&self, path: &str, body: &impl Serialize) -> Result<T> {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    // Machines.

    pub async fn machines(&self) -> Result<Vec<MachineView>> {
        self.get("/v1/machines").await
    }

    pub async fn machine(&self, id: &str) -> Result<MachineView> {
        self.get(&format!("/v1/machines/{id}")).await
    }

    pub async fn create_machine(&self, req: &CreateMachine) -> Result<MachineView> {
        self.post("/v1/machines", req).await
    }

    pub async fn update_machine(&self, id: &str, req: &UpdateMachine) -> Result<MachineView> {
        self.post(&format!("/v1/machines/{id}"), req).await
    }

    pub async fn destroy_machine(&self, id: &str, force: bool) -> Result<MachineView> {
        self.call(
            reqwest::Method::DELETE,
            &format!("/v1/machines/{id}?force={force}"),
            NONE,
        )
        .await
    }

    pub async fn start_machine(&self, id: &str) -> Result<MachineView> {
        self.call(
            reqwest::Method::POST,
            &format!("/v1/machines/{id}/start"),
            NONE,
        )
        .await
    }

    pub async fn stop_machine(&self, id: &str, req: &StopMachine) -> Result<MachineView> {
        self.post(&format!("/v1/machines/{id}/stop"), req).await
    }

    pub async fn restart_machine(&self, id: &str, req: &StopMachine) -> Result<MachineView> {
        self.post(&format!("/v1/machines/{id}/restart"), req).await
    }

    pub async fn signal_machine(&self, id: &str, signal: &str) -> Result<()> {
        let _: Done = self
            .post(
                &format!("/v1/machines/{id}/signal"),
                &SignalMachine {
                    signal: signal.into(),
                },
            )
            .await?;
        Ok(())
    }

    pub async fn exec(&self, id: &str, req: &ExecRequest) -> Result<ExecOutput> {
        self.post(&format!("/v1/machines/{id}/exec"), req).await
    }

    pub async fn events(&self, id: &str) -> Result<Vec<Event>> {
        self.get(&format!("/v1/machines/{id}/events")).await
    }

    /// Wait until the machine is in `state` (started, stopped or
    /// destroyed), at most `timeout_secs`.
    pub async fn wait(&self, id: &str, state: &str, timeout_secs: u64) -> Result<MachineView> {
        self.get(&format!(
            "/v1/machines/{id}/wait?state={state}&timeout={timeout_secs}"
        ))
        .await
    }

    /// The machine's log as it comes; with `follow`, until the machine is
    /// destroyed.
    pub async fn logs(
        &self,
        id: &str,
        follow: bool,
    ) -> Result<impl Stream<Item = Result<bytes::Bytes>>> {
        let resp = self
            .send(
                reqwest::Method::GET,
                &format!("/v1/machines/{id}/logs?follow={follow}"),
                NONE,
            )
            .await?;
        let what = format!("the log of {id}");
        Ok(resp.bytes_stream().map(move |chunk| {
            chunk.map_err(|e| ClientError::Answer {
                what: what.clone(),
                detail: format!("it broke off: {e}"),
            })
        }))
    }

    // Apps.

    pub async fn apps(&self) -> Result<Vec<AppSummary>> {
        self.get("/v1/apps").await
    }

    pub async fn create_app(&self, name: &str, org: &str) -> Result<App> {
        self.post(
            "/v1/apps",
            &CreateApp {
                name: name.into(),
                org: org.into(),
            },
        )
        .await
    }

    pub async fn app(&self, name: &str) -> Result<AppView> {
        self.get(&format!("/v1/apps/{name}")).await
    }

    pub async fn destroy_app(&self, name: &str) -> Result<()> {
        let _: Done = self
            .call(reqwest::Method::DELETE, &format!("/v1/apps/{name}"), NONE)
            .await?;
        Ok(())
    }

    pub async fn releases(&self, app: &str) -> Result<Vec<Release>> {
        self.get(&format!("/v1/apps/{app}/releases")).await
    }

    /// Deploy a release; `say` hears each progress message as it comes.
    pub async fn deploy(
        &self,
        app: &str,
        req: &DeployRequest,
        say: impl FnMut(&str),
    ) -> Result<Release> {
        let path = format!("/v1/apps/{app}/deploy");
        self.follow(&path, req, say)
            .await?
            .release
            .ok_or_else(|| ClientError::Answer {
                what: path,
                detail: "the deploy ended without its release".into(),
            })
    }

    /// Purge the app's cached responses at every edge of the cluster.
    pub async fn purge(
        &self,
        app: &str,
        req: &crate::wire::PurgeRequest,
    ) -> Result<crate::purge::PurgeOutcome> {
        self.post(&format!("/v1/apps/{app}/purge"), req).await
    }

    /// Call the node's Prometheus HTTP API (`query`, `series`, ...;
    /// confined to the token's org) and return Prometheus's answer.
    pub async fn metrics(
        &self,
        endpoint: &str,
        params: &[(&str, &str)],
    ) -> Result<serde_json::Value> {
        let query = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(params)
            .finish();
        self.get(&format!("/v1/metrics/api/v1/{endpoint}?{query}"))
            .await
    }

    /// A one-time ticket that opens the dashboard page (the path to open
    /// on this node's API).
    pub async fn dashboard_ticket(
        &self,
        req: &crate::wire::TicketRequest,
    ) -> Result<crate::wire::TicketAnswer> {
        self.post("/v1/dashboard/tickets", req).await
    }

    /// What fires now of `app`, and its webhook's last delivery.
    pub async fn alerts(&self, app: &str) -> Result<crate::wire::AppAlerts> {
        self.get(&format!("/v1/apps/{app}/alerts")).await
    }

    /// A TCP stream to `port` of machine `id`, through the node (see
    /// `server::tunnel`).
    pub async fn tunnel(&self, id: &str, port: u16) -> Result<hyper::upgrade::Upgraded> {
        let unreachable = |detail: String| ClientError::Answer {
            what: format!("a tunnel to port {port} of machine {id}"),
            detail,
        };
        let authority = self.authority();
        let mut send = upgrading(&authority)
            .await
            .map_err(|e| unreachable(format!("the node at {authority}: {e}")))?;
        let req = hyper::Request::get(format!("/v1/machines/{id}/proxy?port={port}"))
            .header(hyper::header::HOST, &authority)
            .header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", self.token),
            )
            .header(hyper::header::CONNECTION, "upgrade")
            .header(hyper::header::UPGRADE, crate::server::tunnel::PROTOCOL)
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .map_err(|e| unreachable(e.to_string()))?;
        let mut resp = send
            .send_request(req)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        if resp.status() != hyper::StatusCode::SWITCHING_PROTOCOLS {
            use http_body_util::BodyExt as _;
            let status = resp.status().as_u16();
            let body = resp
                .body_mut()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let message = serde_json::from_slice::<ErrorBody>(&body)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
            return Err(ClientError::Api { status, message });
        }
        hyper::upgrade::on(resp)
            .await
            .map_err(|e| unreachable(e.to_string()))
    }

    /// A terminal in machine `id` running `args` (none: its shell), as
    /// `user`, of `rows` x `cols` (see `server::console` for the messages).
    pub async fn console(
        &self,
        id: &str,
        args: &[String],
        user: Option<&str>,
        rows: u16,
        cols: u16,
    ) -> Result<tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>> {
        let failed = |detail: String| ClientError::Answer {
            what: format!("a console in machine {id}"),
            detail,
        };
        let mut query = form_urlencoded::Serializer::new(String::new());
        for a in args {
            query.append_pair("arg", a);
        }
        if let Some(u) = user {
            query.append_pair("user", u);
        }
        query.append_pair("rows", &rows.to_string());
        query.append_pair("cols", &cols.to_string());
        let authority = self.authority();
        let url = format!(
            "ws://{authority}/v1/machines/{id}/console?{}",
            query.finish()
        );
        let mut req =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                url.as_str(),
            )
            .map_err(|e| failed(e.to_string()))?;
        let bearer = format!("Bearer {}", self.token)
            .parse()
            .map_err(|_| failed("the token is not a header value".into()))?;
        req.headers_mut()
            .insert(hyper::header::AUTHORIZATION, bearer);
        let stream = tokio::net::TcpStream::connect(&authority)
            .await
            .map_err(|e| failed(format!("cannot reach the node at {authority}: {e}")))?;
        let _ = stream.set_nodelay(true);
        match tokio_tungstenite::client_async(req, stream).await {
            Ok((ws, _)) => Ok(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let status = resp.status().as_u16();
                let body = resp.body().clone().unwrap_or_default();
                let message = serde_json::from_slice::<ErrorBody>(&body)
                    .map(|e| e.error)
                    .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
                Err(ClientError::Api { status, message })
            }
            Err(e) => Err(failed(e.to_string())),
        }
    }

    /// `host:port` of the base URL.
    fn authority(&self) -> String {
        authority_of(&self.base)
    }

    /// Apply a purge at this node now (a node's call to another).
    pub async fn apply_purge(&self, spec: &crate::purge::PurgeSpec) -> Result<()> {
        let _: Done = self.post("/v1/internal/purge", spec).await?;
        Ok(())
    }

    /// Scale the app's current release to `count` machines.
    /// `count` machines in each of `regions` (none: each region the app
    /// has machines in).
    pub async fn scale(
        &self,
        app: &str,
        count: u32,
        regions: &[String],
        say: impl FnMut(&str),
    ) -> Result<()> {
        let path = format!("/v1/apps/{app}/scale");
        let regions = regions.to_vec();
        self.follow(&path, &ScaleRequest { count, regions }, say)
            .await?;
        Ok(())
    }

    /// A streamed operation's lines: messages to `say`, the last line
    /// returned (or its error).
    async fn follow(
        &self,
        path: &str,
        body: &impl Serialize,
        mut say: impl FnMut(&str),
    ) -> Result<ProgressLine> {
        let resp = self.send(reqwest::Method::POST, path, Some(body)).await?;
        let broke = |detail: String| ClientError::Answer {
            what: path.to_string(),
            detail,
        };
        let mut stream = resp.bytes_stream();
        let mut buf = Vec::new();
        let mut last = None;
        while let Some(chunk) = stream.next().await {
            buf.extend_from_slice(&chunk.map_err(|e| broke(format!("it broke off: {e}")))?);
            while let Some(i) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=i).collect();
                let line: ProgressLine =
                    serde_json::from_slice(&line).map_err(|e| broke(e.to_string()))?;
                match &line.message {
                    Some(m) => say(m),
                    None => last = Some(line),
                }
            }
        }
        let last = last.ok_or_else(|| broke("the operation ended without an answer".into()))?;
        match last.ok {
            Some(true) => Ok(last),
            _ => Err(ClientError::Failed(last.error.unwrap_or_else(|| {
                "the operation failed without saying why".into()
            }))),
        }
    }

    /// The current release's config and image, to deploy again with a
    /// change (memory, secrets): `None` when no release is complete.
    pub async fn current_release(&self, app: &str) -> Result<Option<Release>> {
        Ok(self
            .releases(app)
            .await?
            .into_iter()
            .find(|r| r.status == crate::apps::ReleaseStatus::Complete))
    }

    pub async fn secrets(&self, app: &str) -> Result<Vec<SecretInfo>> {
        self.get(&format!("/v1/apps/{app}/secrets")).await
    }

    pub async fn set_secrets(
        &self,
        app: &str,
        values: std::collections::BTreeMap<String, String>,
    ) -> Result<Vec<SecretInfo>> {
        self.post(&format!("/v1/apps/{app}/secrets"), &SetSecrets { values })
            .await
    }

    /// Unset secrets; the names that were set.
    pub async fn unset_secrets(&self, app: &str, names: &[String]) -> Result<Vec<String>> {
        let r: Unset = self
            .post(
                &format!("/v1/apps/{app}/secrets/unset"),
                &UnsetSecrets {
                    names: names.to_vec(),
                },
            )
            .await?;
        Ok(r.unset)
    }

    // An org's logins to other registries.

    pub async fn registry_logins(&self) -> Result<Vec<RegistryLogin>> {
        self.get("/v1/registry-logins").await
    }

    pub async fn set_registry_login(
        &self,
        registry: &str,
        username: &str,
        password: &str,
    ) -> Result<RegistryLogin> {
        self.call(
            reqwest::Method::PUT,
            &format!("/v1/registry-logins/{registry}"),
            Some(&RegistryLoginRequest {
                username: username.into(),
                password: password.into(),
            }),
        )
        .await
    }

    pub async fn remove_registry_login(&self, registry: &str) -> Result<()> {
        let _: Removed = self
            .call(
                reqwest::Method::DELETE,
                &format!("/v1/registry-logins/{registry}"),
                NONE,
            )
            .await?;
        Ok(())
    }
}

/// A machine config for a deploy of `release` with `change` applied.
pub fn changed(release: &Release, change: impl FnOnce(&mut MachineConfig)) -> DeployRequest {
    let mut config = release.config.clone();
    change(&mut config);
    DeployRequest {
        image: release.image.clone(),
        config,
        count: None,
        strategy: Default::default(),
        max_unavailable: 0,
        description: String::new(),
        primary_region: release.config.metadata.get("region").cloned(),
        observe: release.observe.clone(),
        guard: Default::default(),
    }
}

/// `host:port` of a URL such as `http://10.0.0.1:4280/`.
pub(crate) fn authority_of(url: &str) -> String {
    url.split_once("://")
        .map_or(url, |(_, rest)| rest)
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string()
}

/// An HTTP/1 connection to `authority` that can be upgraded (a tunnel,
/// a carried console).
pub(crate) async fn upgrading(
    authority: &str,
) -> std::result::Result<
    hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    String,
> {
    let stream = tokio::net::TcpStream::connect(authority)
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn.with_upgrades());
    Ok(send)
}
