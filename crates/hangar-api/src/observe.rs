//! What a release says about watching its app, beside its machines: its
//! alert rules, where firing alerts are sent, and its own dashboards
//! (`[alerts]` and `dashboards` of hangar.toml). Stored with the release
//! and checked before it is: a rule must confine to the app's org, a
//! dashboard must be in the subset the node draws.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The most rules and dashboards one release may have.
pub const MAX_RULES: usize = 50;
pub const MAX_DASHBOARDS: usize = 10;

/// Labels a rule may not set: the node sets them.
pub const RESERVED_LABELS: [&str; 3] = ["org", "app", "alertname"];

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Observe {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<AlertRule>,
    /// Where firing and resolved alerts are posted (Alertmanager's
    /// webhook body), through the node's egress policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
    /// Dashboard files (Grafana JSON), as they are.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dashboards: Vec<String>,
}

/// One alerting rule, in Prometheus's fields.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertRule {
    pub alert: String,
    pub expr: String,
    /// How long the expression must hold before the alert fires (`1m`).
    #[serde(default, rename = "for", skip_serializing_if = "Option::is_none")]
    pub for_: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && s.len() <= 100
}

impl Observe {
    /// Refuse what the node could not run or draw for `org`, naming it.
    pub fn check(&self, org: &str) -> Result<()> {
        let bad = |what: String| Err(Error::Invalid(what));
        if self.rules.len() > MAX_RULES {
            return bad(format!(
                "alerts.rules: {} rules; at most {MAX_RULES}",
                self.rules.len()
            ));
        }
        for (i, r) in self.rules.iter().enumerate() {
            let at = format!("alerts.rules[{i}]");
            if !is_name(&r.alert) {
                return bad(format!(
                    "{at}.alert: {:?} is not a name (letters, digits and '_', not starting with a digit)",
                    r.alert
                ));
            }
            hangar_metrics::promql::confine(&r.expr, org)
                .map_err(|e| Error::Invalid(format!("{at}.expr ({}): {e}", r.alert)))?;
            if let Some(f) = &r.for_ {
                match hangar_metrics::dashboard::parse_duration(f) {
                    Some(d) if d.as_secs() <= 86400 => {}
                    _ => {
                        return bad(format!(
                            "{at}.for: {f:?} is not a duration of at most a day (such as \"30s\", \"5m\")"
                        ))
                    }
                }
            }
            for (field, map) in [("labels", &r.labels), ("annotations", &r.annotations)] {
                for (k, v) in map {
                    if !is_name(k) || k.starts_with("__") {
                        return bad(format!("{at}.{field}: {k:?} is not a label name"));
                    }
                    if field == "labels" && RESERVED_LABELS.contains(&k.as_str()) {
                        return bad(format!(
                            "{at}.labels: {k} is set by the node; choose another name"
                        ));
                    }
                    if v.len() > 4096 {
                        return bad(format!("{at}.{field}.{k}: over 4096 bytes"));
                    }
                }
            }
        }
        if let Some(url) = &self.webhook {
            let ok = reqwest::Url::parse(url)
                .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some());
            if !ok {
                return bad(format!(
                    "alerts.webhook: {url:?} is not an http:// or https:// URL"
                ));
            }
        }
        if self.dashboards.len() > MAX_DASHBOARDS {
            return bad(format!(
                "dashboards: {} files; at most {MAX_DASHBOARDS}",
                self.dashboards.len()
            ));
        }
        let mut uids = vec!["hangar-app".to_string()];
        for (i, text) in self.dashboards.iter().enumerate() {
            let d = hangar_metrics::dashboard::parse(text)
                .map_err(|e| Error::Invalid(format!("dashboards[{i}]: {e}")))?;
            if uids.contains(&d.uid) {
                return bad(format!(
                    "dashboards[{i}]: the uid {:?} is taken; give the dashboard another",
                    d.uid
                ));
            }
            uids.push(d.uid);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(alert: &str, expr: &str) -> AlertRule {
        AlertRule {
            alert: alert.into(),
            expr: expr.into(),
            ..Default::default()
        }
    }

    #[test]
    fn rules_and_dashboards_are_checked_naming_the_field() {
        let ok = Observe {
            rules: vec![AlertRule {
                for_: Some("1m".into()),
                labels: [("severity".to_string(), "page".to_string())].into(),
                ..rule("Errors", "rate(x_total[1m]) > 1")
            }],
            webhook: Some("https://hooks.example.com/a".into()),
            dashboards: vec![],
        };
        ok.check("acme").unwrap();
        let err = |o: Observe| o.check("acme").unwrap_err().to_string();
        let e = err(Observe {
            rules: vec![rule("9lives", "up")],
            ..Default::default()
        });
        assert!(e.contains("alerts.rules[0].alert"), "{e}");
        let e = err(Observe {
            rules: vec![rule("Bad", "sum(")],
            ..Default::default()
        });
        assert!(e.contains("alerts.rules[0].expr (Bad)"), "{e}");
        let mut r = rule("Org", "up");
        r.labels.insert("org".into(), "evil".into());
        let e = err(Observe {
            rules: vec![r],
            ..Default::default()
        });
        assert!(e.contains("set by the node"), "{e}");
        let mut r = rule("Slow", "up");
        r.for_ = Some("forever".into());
        assert!(err(Observe {
            rules: vec![r],
            ..Default::default()
        })
        .contains("alerts.rules[0].for"));
        for url in ["file:///etc/passwd", "not a url", "http://"] {
            let e = err(Observe {
                webhook: Some(url.into()),
                ..Default::default()
            });
            assert!(e.contains("alerts.webhook"), "{url}: {e}");
        }
        let e = err(Observe {
            dashboards: vec![hangar_metrics::dashboard::BUILTIN[0].1.to_string()],
            ..Default::default()
        });
        assert!(e.contains("uid \"hangar-app\" is taken"), "{e}");
        let e = err(Observe {
            dashboards: vec!["{}".into()],
            ..Default::default()
        });
        assert!(e.contains("dashboards[0]"), "{e}");
    }
}
