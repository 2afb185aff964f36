//! The dashboard's HTML, its style sheet and its one small script (ours:
//! it refetches the drawings; the page works without it, minus the live
//! refresh).

use std::fmt::Write;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use hangar_metrics::chart::escape;
use hangar_metrics::dashboard::{refresh_of, Dashboard};

use super::RANGES;
use crate::alerts::Firing;
use crate::error::Error;

/// Scripts and styles from this node only; no frames, no inline script.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

const SCRIPT: &str = include_str!("page.js");

fn html(status: StatusCode, body: String) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, POLICY),
            (header::CACHE_CONTROL, "no-store"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

fn head(title: &str) -> String {
    format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1"><title>{} · Hangar</title><link rel="icon" href="data:,"><link rel="stylesheet" href="/dashboard/assets/page.css"><script src="/dashboard/assets/page.js" defer></script></head>"#,
        escape(title)
    )
}

/// A page that says why it cannot show anything, and what to do.
pub(super) fn refused(status: StatusCode, why: &str) -> Response {
    html(
        status,
        format!(
            r#"{}<body><header><a href="/dashboard">Hangar</a></header><main class="message"><p>{}</p></main></body></html>"#,
            head("Dashboard"),
            escape(why)
        ),
    )
}

pub(super) fn error(e: Error) -> Response {
    refused(
        StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &e.to_string(),
    )
}

pub(super) async fn script() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        SCRIPT,
    )
        .into_response()
}

/// The style sheet, with a class per place on Grafana's 24-column grid
/// (the policy allows no inline styles).
pub(super) async fn style() -> Response {
    static CSS: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let css = CSS.get_or_init(|| {
        let mut s = String::from(
            "body{margin:0;font:14px/1.4 system-ui,sans-serif;background:#f4f5f7;color:#222}\
             header{display:flex;flex-wrap:wrap;gap:12px;align-items:center;padding:10px 16px;background:#fff;border-bottom:1px solid #ddd}\
             header a{color:#1f60c4;text-decoration:none;font-weight:600}\
             nav a{margin-right:10px;font-weight:400}nav a.on{font-weight:700;color:#222}\
             form.controls{display:flex;gap:12px;align-items:center;margin-left:auto}\
             #status{font-size:12px;color:#555}#status.stale{color:#c4162a}\
             .alerts{margin:10px 16px}.alerts p{margin:0;padding:6px 10px;border-radius:4px;background:#e8f5e9;color:#1b5e20}\
             .alerts .firing{background:#fdecea;color:#b71c1c;margin-bottom:4px}\
             main.grid{display:grid;grid-template-columns:repeat(24,1fr);grid-auto-rows:30px;gap:8px;padding:8px 16px}\
             figure.panel{margin:0;background:#fff;border:1px solid #ddd;border-radius:4px;padding:6px 8px;overflow:hidden;display:flex;flex-direction:column}\
             figcaption{font-weight:600;font-size:13px;margin-bottom:2px}\
             .body{flex:1;min-height:0}.body svg{width:100%;height:100%}\
             main.message,main.list{padding:24px}\n",
        );
        for i in 0..24 {
            let _ = write!(s, ".x{i}{{grid-column-start:{}}}", i + 1);
            let _ = write!(s, ".w{}{{grid-column-end:span {}}}", i + 1, i + 1);
        }
        for i in 0..200 {
            let _ = write!(s, ".y{i}{{grid-row-start:{}}}", i + 1);
        }
        for i in 1..=40 {
            let _ = write!(s, ".h{i}{{grid-row-end:span {i}}}");
        }
        s
    });
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        css.as_str(),
    )
        .into_response()
}

/// One drawn dashboard.
pub(super) struct Board<'a> {
    pub crumb: &'a str,
    /// The page's path (`/dashboard/apps/shop`).
    pub base: &'a str,
    /// The dashboards to switch between (uid, title).
    pub tabs: &'a [(&'a str, &'a str)],
    pub dash: &'a Dashboard,
    pub range: &'a str,
    /// The app's machines, and the one chosen.
    pub machines: Option<(&'a [String], Option<&'a str>)>,
    pub panels: &'a [(u32, String)],
    pub alerts: &'a [Firing],
}

pub(super) fn board(b: Board) -> Response {
    let mut s = head(&format!("{} · {}", b.crumb, b.dash.title));
    let query = {
        let mut q = form_urlencoded::Serializer::new(String::new());
        q.append_pair("dash", &b.dash.uid)
            .append_pair("range", b.range);
        if let Some((_, Some(one))) = b.machines {
            q.append_pair("instance", one);
        }
        q.finish()
    };
    let _ = write!(
        s,
        r#"<body data-panels="{}/panels?{}" data-refresh="{}"><header><a href="/dashboard">Hangar</a><span>{}</span>"#,
        escape(b.base),
        escape(&query),
        refresh_of(b.dash).as_secs(),
        escape(b.crumb)
    );
    if b.tabs.len() > 1 {
        s.push_str("<nav>");
        for (uid, title) in b.tabs {
            let _ = write!(
                s,
                r#"<a href="{}?dash={}&amp;range={}"{}>{}</a>"#,
                escape(b.base),
                escape(uid),
                b.range,
                if *uid == b.dash.uid {
                    r#" class="on""#
                } else {
                    ""
                },
                escape(title)
            );
        }
        s.push_str("</nav>");
    }
    let _ = write!(
        s,
        r#"<form class="controls" method="get" action="{}"><input type="hidden" name="dash" value="{}"><label>Time range <select name="range">"#,
        escape(b.base),
        escape(&b.dash.uid)
    );
    for r in RANGES {
        let _ = write!(
            s,
            r#"<option value="{r}"{}>last {r}</option>"#,
            if r == b.range { " selected" } else { "" }
        );
    }
    s.push_str("</select></label>");
    if let Some((machines, chosen)) = b.machines {
        s.push_str(r#"<label>Machine <select name="instance"><option value="">all</option>"#);
        for m in machines {
            let _ = write!(
                s,
                r#"<option value="{0}"{1}>{0}</option>"#,
                escape(m),
                if Some(m.as_str()) == chosen {
                    " selected"
                } else {
                    ""
                }
            );
        }
        s.push_str("</select></label>");
    }
    s.push_str(r#"<noscript><button>Show</button></noscript><span id="status">drawn now</span></form></header>"#);
    let _ = write!(
        s,
        r#"<section class="alerts" id="alerts">{}</section><main class="grid">"#,
        alerts_html(b.alerts)
    );
    for p in &b.dash.panels {
        let svg = b
            .panels
            .iter()
            .find(|(id, _)| *id == p.id)
            .map(|(_, svg)| svg.as_str())
            .unwrap_or_default();
        let g = p.grid_pos;
        let _ = write!(
            s,
            r#"<figure class="panel x{} w{} y{} h{}" id="panel-{}" data-title="{}"><figcaption title="{}">{}</figcaption><div class="body">{svg}</div></figure>"#,
            g.x.min(23),
            g.w.clamp(1, 24),
            g.y.min(199),
            g.h.clamp(1, 40),
            p.id,
            escape(&p.title),
            escape(&p.description),
            escape(&p.title)
        );
    }
    s.push_str("</main></body></html>");
    html(StatusCode::OK, s)
}

/// The alerts box: each firing alert, or that none fires.
pub(super) fn alerts_html(alerts: &[Firing]) -> String {
    if alerts.is_empty() {
        return "<p>No alerts firing.</p>".into();
    }
    let mut s = String::new();
    for a in alerts {
        let _ = write!(
            s,
            r#"<p class="firing" data-alert="{}"><strong>{}</strong> firing since {} ({}){}</p>"#,
            escape(&a.name),
            escape(&a.name),
            escape(&a.since),
            escape(&a.app),
            if a.summary.is_empty() {
                String::new()
            } else {
                format!(": {}", escape(&a.summary))
            }
        );
    }
    s
}

pub(super) fn index(apps: &[String], admin: bool) -> Response {
    let mut s = head("Dashboards");
    s.push_str(r#"<body><header><a href="/dashboard">Hangar</a><span>dashboards</span></header><main class="list"><h2>Apps</h2><ul>"#);
    for a in apps {
        let _ = write!(
            s,
            r#"<li><a href="/dashboard/apps/{0}">{0}</a></li>"#,
            escape(a)
        );
    }
    if apps.is_empty() {
        s.push_str("<li>No apps yet: `hangar launch` makes one.</li>");
    }
    s.push_str("</ul>");
    if admin {
        s.push_str("<h2>This node</h2><ul>");
        for n in ["edge", "egress", "registry"] {
            let _ = write!(s, r#"<li><a href="/dashboard/node/{n}">{n}</a></li>"#);
        }
        s.push_str("</ul>");
    }
    s.push_str("</main></body></html>");
    html(StatusCode::OK, s)
}
