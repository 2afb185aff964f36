//! The dashboards page: the shipped dashboards (and an app's own) drawn
//! by the node, with no Grafana. `hangar dashboard -a APP` asks the API
//! (with the org's token) for a one-time ticket and opens
//! `/dashboard/login?ticket=...`, which trades it for a session cookie
//! (HttpOnly, SameSite=Strict, 12 hours) and redirects to the app's page;
//! the browser never holds the token itself.
//!
//! Every panel is drawn as SVG on the node from queries confined to the
//! session's org, exactly as the org's own queries are
//! ([`crate::node::Node::query_metrics`]); the page's own script only
//! fetches the drawings again every refresh. An app of another org, and
//! one that does not exist, read the same: 404.

mod page;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures_util::{stream, StreamExt};
use hangar_metrics::dashboard::{self, Dashboard, Vars};
use hangar_metrics::{chart, prometheus::SCRAPE_INTERVAL};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::{Api, Caller};
use crate::error::Error;

const COOKIE: &str = "hangar_dashboard";
const TICKET_LIFE: u64 = 120;
const SESSION_LIFE: u64 = 12 * 3600;
/// Queries one drawing of a page runs at once (an org has
/// [`crate::metrics::QUERIES_PER_ORG`]; the rest wait their turn).
const DRAW_CONCURRENCY: usize = 2;

/// The ranges a page offers.
pub const RANGES: [&str; 9] = ["5m", "15m", "1h", "3h", "6h", "12h", "24h", "2d", "7d"];

/// Tickets and sessions of the dashboard page, signed with a key of this
/// process (a restarted node asks for a new `hangar dashboard`).
pub struct Sessions {
    key: [u8; 32],
    /// Tickets redeemed (nonce to expiry): each works once.
    redeemed: std::sync::Mutex<HashMap<String, u64>>,
}

impl Default for Sessions {
    fn default() -> Self {
        let mut key = [0u8; 32];
        getrandom::getrandom(&mut key).expect("the OS's random numbers");
        Sessions {
            key,
            redeemed: Default::default(),
        }
    }
}

type HmacSha256 = Hmac<Sha256>;

impl Sessions {
    fn sign(&self, payload: &str) -> String {
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&self.key).expect("any key length");
        mac.update(payload.as_bytes());
        format!("{payload}.{}", hex::encode(mac.finalize().into_bytes()))
    }

    /// `kind.scope.expiry.nonce`, when its signature holds and it is not
    /// past its expiry.
    fn open(&self, kind: &str, signed: &str) -> Option<(Caller, String)> {
        let (payload, mac) = signed.rsplit_once('.')?;
        let mut check = <HmacSha256 as Mac>::new_from_slice(&self.key).expect("any key length");
        check.update(payload.as_bytes());
        check.verify_slice(&hex::decode(mac).ok()?).ok()?;
        let mut parts = payload.split('.');
        let (k, scope, expiry, nonce) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if k != kind || expiry.parse::<u64>().ok()? < crate::store::now() {
            return None;
        }
        let scope = String::from_utf8(hex::decode(scope).ok()?).ok()?;
        let caller = match scope.strip_prefix("org:") {
            Some(org) => Caller::Org(org.to_string()),
            None if scope == "admin" => Caller::Admin,
            None => return None,
        };
        Some((caller, nonce.to_string()))
    }

    fn mint(&self, kind: &str, caller: &Caller, life: u64) -> String {
        let scope = match caller {
            Caller::Admin => "admin".to_string(),
            Caller::Org(org) => format!("org:{org}"),
        };
        let mut nonce = [0u8; 12];
        getrandom::getrandom(&mut nonce).expect("the OS's random numbers");
        self.sign(&format!(
            "{kind}.{}.{}.{}",
            hex::encode(scope),
            crate::store::now() + life,
            hex::encode(nonce)
        ))
    }

    /// A ticket for `caller`, good once within [`TICKET_LIFE`] seconds.
    pub fn ticket(&self, caller: &Caller) -> String {
        self.mint("t", caller, TICKET_LIFE)
    }

    fn redeem(&self, ticket: &str) -> Option<Caller> {
        let (caller, nonce) = self.open("t", ticket)?;
        let now = crate::store::now();
        let mut redeemed = self.redeemed.lock().unwrap_or_else(|e| e.into_inner());
        redeemed.retain(|_, expiry| *expiry >= now);
        if redeemed.insert(nonce, now + TICKET_LIFE + 1).is_some() {
            return None;
        }
        Some(caller)
    }

    fn session(&self, caller: &Caller) -> String {
        self.mint("s", caller, SESSION_LIFE)
    }

    fn caller(&self, headers: &HeaderMap) -> Option<Caller> {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
            .find_map(|s| self.open("s", s))
            .map(|(caller, _)| caller)
    }
}

/// What `POST /v1/dashboard/tickets` answers: the path that opens the
/// page (on the node that answered).
#[derive(Debug, Serialize, Deserialize)]
pub struct TicketAnswer {
    pub path: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TicketRequest {
    /// The app whose page opens; none: the list of the caller's apps.
    #[serde(default)]
    pub app: Option<String>,
    /// A dashboard of the node (`edge`, `egress`, `registry`), the
    /// admin's only.
    #[serde(default)]
    pub node: Option<String>,
}

/// `POST /v1/dashboard/tickets` (behind the token layer).
pub(super) async fn ticket(
    State(api): State<Arc<Api>>,
    caller: Caller,
    super::Json(req): super::Json<TicketRequest>,
) -> Result<axum::Json<TicketAnswer>, Error> {
    let to = match (&req.app, &req.node) {
        (Some(app), _) => {
            let a = api.node.state.app(app)?;
            if caller.org().is_some_and(|org| org != a.org) {
                return Err(crate::store::no_app(app));
            }
            format!("/dashboard/apps/{app}")
        }
        (None, Some(name)) => {
            if caller != Caller::Admin {
                return Err(Error::NotAllowed(
                    "the node's dashboards show every org's traffic: the admin token's only".into(),
                ));
            }
            node_dashboard(name)?;
            format!("/dashboard/node/{name}")
        }
        (None, None) => "/dashboard".into(),
    };
    let ticket = api.dashboards.ticket(&caller);
    Ok(axum::Json(TicketAnswer {
        path: format!(
            "/dashboard/login?ticket={ticket}&to={}",
            form_urlencoded::byte_serialize(to.as_bytes()).collect::<String>()
        ),
    }))
}

/// The page's routes, outside the token layer: a session cookie (or a
/// ticket, at `login`) says who calls.
pub(super) fn routes() -> Router<Arc<Api>> {
    Router::new()
        .route("/dashboard/login", get(login))
        .route("/dashboard", get(index))
        .route("/dashboard/apps/{app}", get(app_page))
        .route("/dashboard/apps/{app}/panels", get(app_panels))
        .route("/dashboard/node/{name}", get(node_page))
        .route("/dashboard/node/{name}/panels", get(node_panels))
        .route("/dashboard/assets/page.js", get(page::script))
        .route("/dashboard/assets/page.css", get(page::style))
}

#[derive(Deserialize)]
struct Login {
    ticket: String,
    #[serde(default)]
    to: String,
}

async fn login(
    State(api): State<Arc<Api>>,
    axum::extract::Query(q): axum::extract::Query<Login>,
) -> Response {
    let Some(caller) = api.dashboards.redeem(&q.ticket) else {
        return page::refused(
            StatusCode::UNAUTHORIZED,
            "This link has expired or was used already: run `hangar dashboard -a APP` again.",
        );
    };
    // Only a page of the dashboard, never another site.
    let to = if q.to.starts_with("/dashboard") && !q.to.contains("//") && !q.to.contains('\\') {
        q.to
    } else {
        "/dashboard".into()
    };
    let cookie = format!(
        "{COOKIE}={}; Path=/dashboard; Max-Age={SESSION_LIFE}; HttpOnly; SameSite=Strict",
        api.dashboards.session(&caller)
    );
    (
        StatusCode::SEE_OTHER,
        [(header::SET_COOKIE, cookie), (header::LOCATION, to)],
    )
        .into_response()
}

/// The session's caller, or the page that says how to get one.
struct Session(Caller);

impl axum::extract::FromRequestParts<Arc<Api>> for Session {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        api: &Arc<Api>,
    ) -> Result<Self, Response> {
        api.dashboards
            .caller(&parts.headers)
            .map(Session)
            .ok_or_else(|| {
                page::refused(
                    StatusCode::UNAUTHORIZED,
                    "This page needs a session: open it with `hangar dashboard -a APP`.",
                )
            })
    }
}

/// What a page shows: which dashboard, over what range, which machine.
#[derive(Clone, Debug, Default, Deserialize)]
struct View {
    #[serde(default)]
    dash: Option<String>,
    #[serde(default)]
    range: Option<String>,
    #[serde(default)]
    instance: Option<String>,
}

impl View {
    fn range(&self) -> (&'static str, Duration) {
        let r = RANGES
            .iter()
            .find(|r| Some(**r) == self.range.as_deref())
            .copied()
            .unwrap_or("1h");
        (
            r,
            dashboard::parse_duration(r).unwrap_or(Duration::from_secs(3600)),
        )
    }
}

/// The dashboards of an app: the shipped one, then its own.
fn app_dashboards(api: &Api, app: &str) -> Result<Vec<Dashboard>, Error> {
    let mut out = vec![dashboard::parse(dashboard::BUILTIN[0].1)
        .map_err(|e| Error::Internal(format!("the shipped app dashboard: {e}")))?];
    if let Some(release) = api.node.state.current_release(app)? {
        for text in &release.observe.dashboards {
            // Checked when deployed; a file that no longer reads is left out.
            if let Ok(d) = dashboard::parse(text) {
                out.push(d);
            }
        }
    }
    Ok(out)
}

fn node_dashboard(name: &str) -> Result<Dashboard, Error> {
    let text = dashboard::BUILTIN
        .iter()
        .skip(1)
        .find(|(n, _)| *n == name)
        .map(|(_, t)| *t)
        .ok_or_else(|| {
            Error::NotFound(format!(
                "no node dashboard {name:?}: there are edge, egress and registry"
            ))
        })?;
    dashboard::parse(text)
        .map_err(|e| Error::Internal(format!("the shipped {name} dashboard: {e}")))
}

/// The app `name` when `caller` may see it (else 404, as for none).
fn own_app(api: &Api, caller: &Caller, name: &str) -> Result<crate::apps::App, Error> {
    let app = api.node.state.app(name)?;
    match caller.org() {
        Some(org) if org != app.org => Err(crate::store::no_app(name)),
        _ => Ok(app),
    }
}

/// Everything one drawing of an app's page needs.
struct Drawing {
    dashboards: Vec<Dashboard>,
    chosen: usize,
    vars: Vars,
    range: &'static str,
    machines: Vec<String>,
}

fn app_drawing(api: &Api, caller: &Caller, app: &str, view: &View) -> Result<Drawing, Error> {
    own_app(api, caller, app)?;
    let dashboards = app_dashboards(api, app)?;
    let chosen = view
        .dash
        .as_deref()
        .and_then(|uid| dashboards.iter().position(|d| d.uid == uid))
        .unwrap_or(0);
    let machines: Vec<String> = crate::deploy::app_machines(&api.node, app)?
        .into_iter()
        .map(|m| m.id)
        .collect();
    // Only a machine of the app stands for $instance: nothing else
    // reaches the query.
    let instance = view.instance.clone().filter(|i| machines.contains(i));
    let (range, span) = view.range();
    Ok(Drawing {
        dashboards,
        chosen,
        vars: Vars {
            app: app.to_string(),
            instance,
            range: span,
            step: dashboard::step_for(span, SCRAPE_INTERVAL),
            scrape: SCRAPE_INTERVAL,
        },
        range,
        machines,
    })
}

async fn app_page(
    State(api): State<Arc<Api>>,
    Session(caller): Session,
    Path(app): Path<String>,
    axum::extract::Query(view): axum::extract::Query<View>,
) -> Response {
    let d = match app_drawing(&api, &caller, &app, &view) {
        Ok(d) => d,
        Err(e) => return page::error(e),
    };
    let dash = &d.dashboards[d.chosen];
    let panels = draw(&api, caller.org(), dash, &d.vars).await;
    let alerts = crate::alerts::firing(&api.node, caller.org(), Some(&app))
        .await
        .unwrap_or_default();
    page::board(page::Board {
        crumb: &app,
        base: &format!("/dashboard/apps/{app}"),
        tabs: &d
            .dashboards
            .iter()
            .map(|x| (x.uid.as_str(), x.title.as_str()))
            .collect::<Vec<_>>(),
        dash,
        range: d.range,
        machines: Some((&d.machines, d.vars.instance.as_deref())),
        panels: &panels,
        alerts: &alerts,
    })
}

async fn app_panels(
    State(api): State<Arc<Api>>,
    Session(caller): Session,
    Path(app): Path<String>,
    axum::extract::Query(view): axum::extract::Query<View>,
) -> Result<Response, Error> {
    let d = app_drawing(&api, &caller, &app, &view)?;
    let panels = draw(&api, caller.org(), &d.dashboards[d.chosen], &d.vars).await;
    let alerts = crate::alerts::firing(&api.node, caller.org(), Some(&app))
        .await
        .unwrap_or_default();
    Ok(panels_json(panels, &alerts))
}

fn node_drawing(
    caller: &Caller,
    name: &str,
    view: &View,
) -> Result<(Dashboard, Vars, &'static str), Error> {
    if *caller != Caller::Admin {
        return Err(Error::NotFound(format!("no node dashboard {name:?}")));
    }
    let dash = node_dashboard(name)?;
    let (range, span) = view.range();
    let vars = Vars {
        app: String::new(),
        instance: None,
        range: span,
        step: dashboard::step_for(span, SCRAPE_INTERVAL),
        scrape: SCRAPE_INTERVAL,
    };
    Ok((dash, vars, range))
}

async fn node_page(
    State(api): State<Arc<Api>>,
    Session(caller): Session,
    Path(name): Path<String>,
    axum::extract::Query(view): axum::extract::Query<View>,
) -> Response {
    let (dash, vars, range) = match node_drawing(&caller, &name, &view) {
        Ok(x) => x,
        Err(e) => return page::error(e),
    };
    let panels = draw(&api, None, &dash, &vars).await;
    let alerts = crate::alerts::firing(&api.node, None, None)
        .await
        .unwrap_or_default();
    page::board(page::Board {
        crumb: &format!("node · {name}"),
        base: &format!("/dashboard/node/{name}"),
        tabs: &[],
        dash: &dash,
        range,
        machines: None,
        panels: &panels,
        alerts: &alerts,
    })
}

async fn node_panels(
    State(api): State<Arc<Api>>,
    Session(caller): Session,
    Path(name): Path<String>,
    axum::extract::Query(view): axum::extract::Query<View>,
) -> Result<Response, Error> {
    let (dash, vars, _) = node_drawing(&caller, &name, &view)?;
    let panels = draw(&api, None, &dash, &vars).await;
    let alerts = crate::alerts::firing(&api.node, None, None)
        .await
        .unwrap_or_default();
    Ok(panels_json(panels, &alerts))
}

fn panels_json(panels: Vec<(u32, String)>, alerts: &[crate::alerts::Firing]) -> Response {
    let panels: serde_json::Map<String, serde_json::Value> = panels
        .into_iter()
        .map(|(id, svg)| (id.to_string(), svg.into()))
        .collect();
    (
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(serde_json::json!({
            "panels": panels,
            "alerts": page::alerts_html(alerts),
        })),
    )
        .into_response()
}

async fn index(State(api): State<Arc<Api>>, Session(caller): Session) -> Response {
    let apps: Vec<String> = match api.node.state.apps() {
        Ok(apps) => apps
            .into_iter()
            .filter(|a| caller.org().is_none_or(|org| org == a.org))
            .map(|a| a.name)
            .collect(),
        Err(e) => return page::error(e),
    };
    page::index(&apps, caller == Caller::Admin)
}

/// Every panel of `dash` drawn now, by id.
async fn draw(
    api: &Arc<Api>,
    org: Option<&str>,
    dash: &Dashboard,
    vars: &Vars,
) -> Vec<(u32, String)> {
    let end = crate::store::now() as f64;
    let org = org.map(str::to_string);
    let drawings: Vec<_> = dash
        .panels
        .iter()
        .cloned()
        .map(|p| {
            let (api, org, vars) = (api.clone(), org.clone(), vars.clone());
            async move { (p.id, draw_panel(api, org, p, vars, end).await) }
        })
        .collect();
    stream::iter(drawings)
        .buffered(DRAW_CONCURRENCY)
        .collect()
        .await
}

async fn draw_panel(
    api: Arc<Api>,
    org: Option<String>,
    p: dashboard::Panel,
    vars: Vars,
    end: f64,
) -> String {
    let start = end - vars.range.as_secs_f64();
    let step = vars.step.as_secs_f64();
    let mut all = Vec::new();
    for t in &p.targets {
        let expr = match vars.expand(&t.expr) {
            Ok(e) => e,
            Err(why) => return chart::failed(&why),
        };
        let (endpoint, params) = if p.is_stat() || t.instant {
            ("query", vec![("query", expr), ("time", end.to_string())])
        } else {
            (
                "query_range",
                vec![
                    ("query", expr),
                    ("start", start.to_string()),
                    ("end", end.to_string()),
                    ("step", step.to_string()),
                ],
            )
        };
        let params = params
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let answer = api
            .node
            .query_metrics_queued(org.as_deref(), endpoint, params)
            .await;
        match answer {
            Ok((_, body)) => match dashboard::series_of(&body, t.legend_format.as_deref()) {
                Ok(series) => all.extend(series),
                Err(why) => return chart::failed(&why),
            },
            Err(e) => return chart::failed(&e.to_string()),
        }
    }
    if p.is_stat() {
        chart::stat(&all, p.unit())
    } else {
        chart::timeseries(&all, p.unit(), start, end, step)
    }
}
