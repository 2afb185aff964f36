//! Alerts: each app's rules (from its current release) written for the
//! node's Prometheus, which evaluates them; the node is the Alertmanager
//! Prometheus sends firing and resolved alerts to, and posts them to the
//! app's webhook (Alertmanager's webhook body, version 4) through the
//! node's egress policy, so a webhook can never reach the node's own
//! services, a private address or a cloud's metadata service.
//!
//! Every rule is confined to its app's org ([`hangar_metrics::promql`]),
//! and the node sets its `org` and `app` labels: an alert names the app
//! it is about and no org sees another's. What fires is read back from
//! Prometheus's `ALERTS` series, confined like any query.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hangar_metrics::prometheus::{Rule, RuleGroup};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::node::Node;

/// Whether the node may post a webhook to an address (the egress
/// policy's check: `Err` says why not).
pub type DialCheck = Arc<dyn Fn(SocketAddr) -> std::result::Result<(), String> + Send + Sync>;

/// A firing alert is posted again after this long, as Alertmanager's
/// default `repeat_interval`.
pub const REPEAT: Duration = Duration::from_secs(4 * 3600);
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);

/// Every app's rules, as Prometheus reads them.
pub fn rule_groups(node: &Node) -> Result<Vec<RuleGroup>> {
    let mut groups = Vec::new();
    for app in node.state.apps()? {
        let Some(release) = node.state.current_release(&app.name)? else {
            continue;
        };
        let mut rules = Vec::new();
        for r in &release.observe.rules {
            // Checked at deploy; one that no longer confines is left out.
            let Ok(expr) = hangar_metrics::promql::confine(&r.expr, &app.org) else {
                tracing::warn!(app = %app.name, alert = %r.alert, "an alert rule no longer confines to its org; left out");
                continue;
            };
            let mut labels = r.labels.clone();
            labels.insert("org".into(), app.org.clone());
            labels.insert("app".into(), app.name.clone());
            rules.push(Rule {
                alert: r.alert.clone(),
                expr,
                for_: r.for_.clone(),
                labels,
                annotations: r.annotations.clone(),
            });
        }
        if !rules.is_empty() {
            groups.push(RuleGroup {
                name: format!("app-{}", app.name),
                rules,
            });
        }
    }
    Ok(groups)
}

impl Node {
    /// Write the apps' rules for Prometheus and have it reload them when
    /// they changed (the binary calls this every few seconds, so rules
    /// follow deploys on any node of the cluster).
    pub async fn sync_alert_rules(self: &Arc<Self>) -> Result<()> {
        let Some(metrics) = &self.metrics else {
            return Ok(());
        };
        let node = self.clone();
        let dir = metrics.dir.clone();
        let changed = crate::node::blocking(move || {
            let groups = rule_groups(&node)?;
            hangar_metrics::prometheus::write_rules(&dir, &groups).map_err(Error::Internal)
        })
        .await?;
        if changed {
            let reloaded = reqwest::Client::new()
                .post(format!("{}/-/reload", metrics.prometheus))
                .timeout(Duration::from_secs(10))
                .send()
                .await
                .and_then(|r| r.error_for_status());
            if let Err(e) = reloaded {
                // Written again, and reloaded, on the next call.
                let _ = std::fs::remove_file(metrics.dir.join("rules").join("hangar.yml"));
                return Err(Error::Unavailable(format!(
                    "Prometheus did not reload the alert rules (tried again in a moment): {e}"
                )));
            }
        }
        Ok(())
    }
}

/// An alert as Prometheus sends it (Alertmanager's API v2).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PromAlert {
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub starts_at: String,
    #[serde(default)]
    pub ends_at: String,
    #[serde(default, rename = "generatorURL")]
    pub generator_url: String,
}

impl PromAlert {
    fn resolved(&self, now: chrono::DateTime<chrono::Utc>) -> bool {
        chrono::DateTime::parse_from_rfc3339(&self.ends_at).is_ok_and(|end| end <= now)
    }

    fn fingerprint(&self) -> String {
        self.labels
            .iter()
            .map(|(k, v)| format!("{k}={v:?}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// How the last post to an app's webhook went.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    pub at: u64,
    pub url: String,
    /// `delivered (HTTP 200)`, or why not.
    pub outcome: String,
    pub ok: bool,
}

/// What the node has posted (in memory: after a restart, firing alerts
/// are posted once more, as a restarted Alertmanager does).
#[derive(Default)]
pub struct Deliveries {
    /// An alert's fingerprint: whether it was firing when last posted,
    /// and when.
    sent: Mutex<HashMap<String, (bool, u64)>>,
    /// The last post per app.
    last: Mutex<HashMap<String, Delivery>>,
}

impl Deliveries {
    pub fn last(&self, app: &str) -> Option<Delivery> {
        self.last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(app)
            .cloned()
    }
}

/// Take the alerts Prometheus sent: those new, resolved, or due again go
/// to their app's webhook (in the background).
pub fn receive(node: &Arc<Node>, alerts: Vec<PromAlert>) {
    let now = chrono::Utc::now();
    let unix = crate::store::now();
    let mut by_app: BTreeMap<String, Vec<PromAlert>> = BTreeMap::new();
    {
        let mut sent = node
            .alert_deliveries
            .sent
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for a in alerts {
            let Some(app) = a.labels.get("app").cloned() else {
                continue;
            };
            let firing = !a.resolved(now);
            let key = a.fingerprint();
            let due = match sent.get(&key) {
                None => firing,
                Some(&(was, at)) => was != firing || firing && unix >= at + REPEAT.as_secs(),
            };
            if due {
                sent.insert(key, (firing, unix));
                by_app.entry(app).or_default().push(a);
            }
        }
        // Resolved long ago: forgotten.
        sent.retain(|_, (firing, at)| *firing || unix < *at + REPEAT.as_secs());
    }
    for (app, alerts) in by_app {
        let node = node.clone();
        tokio::spawn(async move {
            let delivery = post(&node, &app, alerts).await;
            if let Some(d) = delivery {
                if !d.ok {
                    tracing::warn!(app = %app, url = %d.url, "alert webhook: {}", d.outcome);
                }
                node.alert_deliveries
                    .last
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(app, d);
            }
        });
    }
}

/// Post `alerts` of `app` to its webhook, if it has one.
async fn post(node: &Node, app: &str, alerts: Vec<PromAlert>) -> Option<Delivery> {
    let url = node
        .state
        .current_release(app)
        .ok()
        .flatten()?
        .observe
        .webhook?;
    let now = chrono::Utc::now();
    let firing = alerts.iter().any(|a| !a.resolved(now));
    let common = |pick: fn(&PromAlert) -> &BTreeMap<String, String>| -> BTreeMap<String, String> {
        let mut common = alerts.first().map(pick).cloned().unwrap_or_default();
        common.retain(|k, v| alerts.iter().all(|a| pick(a).get(k) == Some(v)));
        common
    };
    let body = serde_json::json!({
        "version": "4",
        "groupKey": format!("{{}}:{{app=\"{app}\"}}"),
        "truncatedAlerts": 0,
        "status": if firing { "firing" } else { "resolved" },
        "receiver": "hangar",
        "groupLabels": {"app": app},
        "commonLabels": common(|a| &a.labels),
        "commonAnnotations": common(|a| &a.annotations),
        "externalURL": "",
        "alerts": alerts.iter().map(|a| serde_json::json!({
            "status": if a.resolved(now) { "resolved" } else { "firing" },
            "labels": a.labels,
            "annotations": a.annotations,
            "startsAt": a.starts_at,
            "endsAt": a.ends_at,
            "generatorURL": a.generator_url,
            "fingerprint": format!("{:016x}", fnv(&a.fingerprint())),
        })).collect::<Vec<_>>(),
    });
    let check = node.metrics.as_ref().and_then(|m| m.webhook_check.clone());
    let outcome = send(&url, &body, check).await;
    Some(Delivery {
        at: crate::store::now(),
        ok: outcome.is_ok(),
        outcome: outcome.unwrap_or_else(|e| e),
        url,
    })
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}

/// Post `body` to `url` at an address the egress policy allows (the name
/// resolved once and the connection pinned to it, so a second lookup
/// cannot point elsewhere); no redirects are followed.
async fn send(
    url: &str,
    body: &serde_json::Value,
    check: Option<DialCheck>,
) -> std::result::Result<String, String> {
    let check = check.ok_or("this node has no egress policy for webhooks")?;
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
    let host = parsed.host_str().ok_or("the URL has no host")?.to_string();
    let port = parsed
        .port_or_known_default()
        .ok_or("the URL has no port")?;
    let bare = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((bare.as_str(), port))
        .await
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .collect();
    let mut refused = Vec::new();
    let Some(addr) = addrs.into_iter().find(|a| match check(*a) {
        Ok(()) => true,
        Err(why) => {
            refused.push(why);
            false
        }
    }) else {
        return Err(format!(
            "refused by the egress policy: {}",
            refused.join("; ")
        ));
    };
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .resolve(&bare, addr)
        .timeout(WEBHOOK_TIMEOUT)
        .build()
        .map_err(|e| e.to_string())?;
    let r = client
        .post(parsed)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body.to_string())
        .send()
        .await
        .map_err(|e| format!("the webhook did not answer: {e}"))?;
    let status = r.status();
    if status.is_success() {
        Ok(format!("delivered (HTTP {})", status.as_u16()))
    } else {
        Err(format!("the webhook answered HTTP {}", status.as_u16()))
    }
}

/// An alert firing now.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Firing {
    pub name: String,
    pub app: String,
    /// Since when (UTC, `2026-12-03 16:20:05`).
    pub since: String,
    /// Its `summary` annotation, if the rule has one.
    #[serde(default)]
    pub summary: String,
    pub labels: BTreeMap<String, String>,
}

/// What fires now of `app` (or of every app the caller sees), from
/// Prometheus's `ALERTS` series, confined to `org`.
pub async fn firing(node: &Node, org: Option<&str>, app: Option<&str>) -> Result<Vec<Firing>> {
    if node.metrics.is_none() {
        return Ok(Vec::new());
    }
    let app_matcher = app.map(|a| format!(",app=\"{a}\"")).unwrap_or_default();
    let ask = |expr: String| async move {
        let (_, body) = node
            .query_metrics_queued(org, "query", vec![("query".into(), expr)])
            .await?;
        hangar_metrics::dashboard::series_of(&body, None).map_err(Error::Unavailable)?;
        let v: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| Error::Unavailable(format!("Prometheus's answer: {e}")))?;
        Ok::<_, Error>(v["data"]["result"].as_array().cloned().unwrap_or_default())
    };
    let labels_of = |s: &serde_json::Value| -> BTreeMap<String, String> {
        s["metric"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter(|(k, _)| *k != "__name__" && *k != "alertstate")
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect()
            })
            .unwrap_or_default()
    };
    let active = ask(format!("ALERTS{{alertstate=\"firing\"{app_matcher}}}")).await?;
    let since: HashMap<BTreeMap<String, String>, f64> =
        ask(format!("ALERTS_FOR_STATE{{alertname!=\"\"{app_matcher}}}"))
            .await?
            .iter()
            .filter_map(|s| {
                let v: f64 = s["value"][1].as_str()?.parse().ok()?;
                Some((labels_of(s), v))
            })
            .collect();
    let mut out = Vec::new();
    for s in &active {
        let labels = labels_of(s);
        let name = labels.get("alertname").cloned().unwrap_or_default();
        let app = labels.get("app").cloned().unwrap_or_default();
        let summary = node
            .state
            .current_release(&app)
            .ok()
            .flatten()
            .and_then(|r| {
                r.observe
                    .rules
                    .into_iter()
                    .find(|r| r.alert == name)
                    .and_then(|r| r.annotations.get("summary").cloned())
            })
            .unwrap_or_default();
        let at = since.get(&labels).copied().unwrap_or(0.0);
        out.push(Firing {
            since: chrono::DateTime::from_timestamp(at as i64, 0)
                .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
                .unwrap_or_default(),
            name,
            app,
            summary,
            labels,
        });
    }
    out.sort_by(|a, b| (&a.app, &a.name).cmp(&(&b.app, &b.name)));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_webhook_the_policy_refuses_is_never_dialed() {
        // A listener that would see the post, refused by the check.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let check: DialCheck = Arc::new(|a: SocketAddr| {
            if a.ip().is_loopback() {
                Err(format!("{a} is a loopback address"))
            } else {
                Ok(())
            }
        });
        let body = serde_json::json!({"version": "4"});
        let e = send(&format!("http://{addr}/hook"), &body, Some(check.clone()))
            .await
            .unwrap_err();
        assert!(
            e.contains("refused by the egress policy") && e.contains("loopback"),
            "{e}"
        );
        let e = send(
            &format!("http://localhost:{}/hook", addr.port()),
            &body,
            Some(check),
        )
        .await
        .unwrap_err();
        assert!(e.contains("refused"), "{e}");
        assert!(
            tokio::time::timeout(Duration::from_millis(200), listener.accept())
                .await
                .is_err(),
            "the refused webhook was dialed"
        );
        let e = send(&format!("http://{addr}/hook"), &body, None)
            .await
            .unwrap_err();
        assert!(e.contains("no egress policy"), "{e}");
    }

    #[test]
    fn an_alert_ended_in_the_past_is_resolved() {
        let now = chrono::Utc::now();
        let mut a = PromAlert {
            labels: [("alertname".to_string(), "Down".to_string())].into(),
            annotations: Default::default(),
            starts_at: "2026-12-03T10:00:00Z".into(),
            ends_at: "2000-01-01T00:00:00Z".into(),
            generator_url: String::new(),
        };
        assert!(a.resolved(now));
        a.ends_at = (now + chrono::Duration::minutes(4)).to_rfc3339();
        assert!(!a.resolved(now));
        a.ends_at = String::new();
        assert!(!a.resolved(now));
    }
}
