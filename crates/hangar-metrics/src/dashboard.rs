//! Dashboards in a subset of Grafana's JSON model: the files under
//! `dashboards/` (shipped with Hangar) and an app's own, importable into
//! Grafana as they are and drawn by the node without it.
//!
//! The subset: `timeseries` and `stat` panels placed on Grafana's 24-column
//! grid, each with PromQL targets (`expr`, `legendFormat`, `instant`); the
//! variables `$app` and `$instance` (a machine, `All` being `.+`), and
//! Grafana's `$__rate_interval`, `$__interval` and `$__range`. Everything
//! else in a file is kept for Grafana and ignored here. [`parse`] refuses
//! a file outside the subset, naming the panel and what to change.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

/// The dashboards shipped with Hangar: per app, then the node's edge,
/// egress proxy and registry.
pub const BUILTIN: [(&str, &str); 4] = [
    ("app", include_str!("../../../dashboards/app.json")),
    ("edge", include_str!("../../../dashboards/edge.json")),
    ("egress", include_str!("../../../dashboards/egress.json")),
    (
        "registry",
        include_str!("../../../dashboards/registry.json"),
    ),
];

/// The largest dashboard file the node takes.
pub const MAX_BYTES: usize = 256 << 10;
const MAX_PANELS: usize = 40;
const MAX_TARGETS: usize = 8;

/// Variables a dashboard may use: the app and one machine of it.
pub const VARIABLES: [&str; 2] = ["app", "instance"];

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Dashboard {
    pub uid: String,
    pub title: String,
    #[serde(default)]
    pub description: String,
    /// How often a live page refreshes (`10s`, `1m`).
    #[serde(default)]
    pub refresh: Option<String>,
    #[serde(default)]
    pub panels: Vec<Panel>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Panel {
    pub id: u32,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub title: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub grid_pos: GridPos,
    #[serde(default)]
    pub field_config: FieldConfig,
    #[serde(default)]
    pub targets: Vec<Target>,
}

impl Panel {
    pub fn is_stat(&self) -> bool {
        self.kind == "stat"
    }

    /// The panel's unit (`s`, `bytes`, `percentunit`, ...; Grafana's ids).
    pub fn unit(&self) -> &str {
        self.field_config
            .defaults
            .unit
            .as_deref()
            .unwrap_or("short")
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize)]
pub struct GridPos {
    pub x: u32,
    pub y: u32,
    pub w: u32,
    pub h: u32,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct FieldConfig {
    #[serde(default)]
    pub defaults: FieldDefaults,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct FieldDefaults {
    #[serde(default)]
    pub unit: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Target {
    #[serde(default)]
    pub ref_id: String,
    pub expr: String,
    #[serde(default)]
    pub legend_format: Option<String>,
    /// One value at the range's end, not a range.
    #[serde(default)]
    pub instant: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    #[error("the dashboard is over {} KiB", MAX_BYTES >> 10)]
    TooLarge,
    #[error("the dashboard is not Grafana dashboard JSON: {0}")]
    Json(String),
    #[error("the dashboard's uid {0:?} must be 1 to 40 letters, digits, '-' or '_'")]
    Uid(String),
    #[error("the dashboard has {0} panels; at most {MAX_PANELS} are drawn")]
    Panels(usize),
    #[error("panel {id} ({title:?}): {why}")]
    Panel { id: u32, title: String, why: String },
}

/// A dashboard file, checked against the subset the node draws.
pub fn parse(text: &str) -> Result<Dashboard, DashboardError> {
    if text.len() > MAX_BYTES {
        return Err(DashboardError::TooLarge);
    }
    let d: Dashboard =
        serde_json::from_str(text).map_err(|e| DashboardError::Json(e.to_string()))?;
    if d.uid.is_empty()
        || d.uid.len() > 40
        || !d
            .uid
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(DashboardError::Uid(d.uid));
    }
    if d.panels.len() > MAX_PANELS {
        return Err(DashboardError::Panels(d.panels.len()));
    }
    let sample = Vars {
        app: "app".into(),
        instance: None,
        range: Duration::from_secs(3600),
        step: Duration::from_secs(15),
        scrape: Duration::from_secs(5),
    };
    for p in &d.panels {
        let bad = |why: String| DashboardError::Panel {
            id: p.id,
            title: p.title.clone(),
            why,
        };
        if p.kind != "timeseries" && p.kind != "stat" {
            return Err(bad(format!(
                "type {:?} is not drawn by the node; use \"timeseries\" or \"stat\"",
                p.kind
            )));
        }
        if p.targets.is_empty() || p.targets.len() > MAX_TARGETS {
            return Err(bad(format!(
                "it has {} targets; give it 1 to {MAX_TARGETS}",
                p.targets.len()
            )));
        }
        for t in &p.targets {
            let expr = sample.expand(&t.expr).map_err(&bad)?;
            promql_parser::parser::parse(&expr)
                .map_err(|e| bad(format!("target {}: {e}", t.ref_id)))?;
        }
    }
    Ok(d)
}

/// What a dashboard's variables stand for in one drawing.
#[derive(Clone, Debug)]
pub struct Vars {
    pub app: String,
    /// One machine's id; `None`: all of them.
    pub instance: Option<String>,
    pub range: Duration,
    pub step: Duration,
    /// The scrape interval (for `$__rate_interval`).
    pub scrape: Duration,
}

impl Vars {
    /// `expr` with every variable replaced; an unknown variable is an
    /// error naming it.
    pub fn expand(&self, expr: &str) -> Result<String, String> {
        let rate = self.step.max(self.scrape * 4).max(self.step + self.scrape);
        let values: BTreeMap<&str, String> = [
            ("app", self.app.clone()),
            (
                "instance",
                self.instance.clone().unwrap_or_else(|| ".+".into()),
            ),
            ("__rate_interval", seconds(rate)),
            ("__interval", seconds(self.step)),
            ("__range", seconds(self.range)),
        ]
        .into();
        let mut out = String::with_capacity(expr.len());
        let mut rest = expr;
        while let Some(at) = rest.find('$') {
            out.push_str(&rest[..at]);
            let after = &rest[at + 1..];
            let (name, len) = if let Some(braced) = after.strip_prefix('{') {
                let end = braced
                    .find('}')
                    .ok_or_else(|| format!("`${{` without a closing `}}` in {expr:?}"))?;
                (&braced[..end], end + 2)
            } else {
                let end = after
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(after.len());
                (&after[..end], end)
            };
            let value = values.get(name).ok_or_else(|| {
                format!(
                    "unknown variable ${name}; the node knows $app, $instance, $__rate_interval, $__interval and $__range"
                )
            })?;
            out.push_str(value);
            rest = &after[len..];
        }
        out.push_str(rest);
        Ok(out)
    }
}

fn seconds(d: Duration) -> String {
    format!("{}s", d.as_secs().max(1))
}

/// The step of a range drawn about 200 points wide, never finer than the
/// scrape interval.
pub fn step_for(range: Duration, scrape: Duration) -> Duration {
    Duration::from_secs((range.as_secs() / 200).max(scrape.as_secs()).max(1))
}

/// A refresh interval (`10s`, `1m`); default 10 s, never under 5 s.
pub fn refresh_of(d: &Dashboard) -> Duration {
    d.refresh
        .as_deref()
        .and_then(parse_duration)
        .unwrap_or(Duration::from_secs(10))
        .max(Duration::from_secs(5))
}

/// `30s`, `15m`, `6h`, `7d`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = n.parse().ok()?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return None,
    };
    Some(Duration::from_secs(n.checked_mul(mult)?))
}

/// One line of a chart.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub name: String,
    /// (Unix seconds, value)
    pub points: Vec<(f64, f64)>,
}

/// The series of a Prometheus query answer (`matrix` or `vector`),
/// named by `legend` (`{{label}}` replaced by the label's value) or by
/// their labels.
pub fn series_of(answer: &[u8], legend: Option<&str>) -> Result<Vec<Series>, String> {
    let v: serde_json::Value =
        serde_json::from_slice(answer).map_err(|e| format!("not JSON: {e}"))?;
    if v["status"] != "success" {
        return Err(v["error"]
            .as_str()
            .unwrap_or("the query failed")
            .to_string());
    }
    let empty = Vec::new();
    let results = v["data"]["result"].as_array().unwrap_or(&empty);
    let mut out = Vec::with_capacity(results.len());
    for r in results {
        let labels: BTreeMap<String, String> = r["metric"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect()
            })
            .unwrap_or_default();
        let point = |p: &serde_json::Value| -> Option<(f64, f64)> {
            let t = p[0].as_f64()?;
            let v: f64 = p[1].as_str()?.parse().ok()?;
            Some((t, v))
        };
        let points: Vec<(f64, f64)> = match r["values"].as_array() {
            Some(values) => values.iter().filter_map(point).collect(),
            None => point(&r["value"]).into_iter().collect(),
        };
        out.push(Series {
            name: name_of(&labels, legend),
            points,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

fn name_of(labels: &BTreeMap<String, String>, legend: Option<&str>) -> String {
    match legend.filter(|l| !l.is_empty() && *l != "__auto") {
        Some(legend) => {
            let mut out = String::new();
            let mut rest = legend;
            while let Some(at) = rest.find("{{") {
                out.push_str(&rest[..at]);
                let after = &rest[at + 2..];
                let Some(end) = after.find("}}") else {
                    out.push_str(&rest[at..]);
                    rest = "";
                    break;
                };
                out.push_str(
                    labels
                        .get(after[..end].trim())
                        .map(String::as_str)
                        .unwrap_or_default(),
                );
                rest = &after[end + 2..];
            }
            out.push_str(rest);
            out
        }
        None => {
            let name = labels.get("__name__").cloned().unwrap_or_default();
            let rest: Vec<String> = labels
                .iter()
                .filter(|(k, _)| *k != "__name__")
                .map(|(k, v)| format!("{k}=\"{v}\""))
                .collect();
            if rest.is_empty() {
                if name.is_empty() {
                    "value".into()
                } else {
                    name
                }
            } else {
                format!("{name}{{{}}}", rest.join(", "))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_dashboards_are_in_the_subset() {
        for (name, text) in BUILTIN {
            let d = parse(text).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(d.uid.starts_with("hangar-"), "{name}");
            assert!(!d.panels.is_empty(), "{name}");
            // Grafana imports them with their data source as an input.
            let v: serde_json::Value = serde_json::from_str(text).unwrap();
            assert_eq!(v["__inputs"][0]["pluginId"], "prometheus", "{name}");
            let mut ids: Vec<u32> = d.panels.iter().map(|p| p.id).collect();
            ids.sort();
            ids.dedup();
            assert_eq!(ids.len(), d.panels.len(), "{name}: panel ids repeat");
            for p in &d.panels {
                assert!(p.grid_pos.x + p.grid_pos.w <= 24, "{name}: {}", p.title);
                assert!(p.grid_pos.w > 0 && p.grid_pos.h > 0, "{name}: {}", p.title);
            }
        }
        let app = parse(BUILTIN[0].1).unwrap();
        let titles: Vec<&str> = app.panels.iter().map(|p| p.title.as_str()).collect();
        for wanted in [
            "Requests/s by status",
            "Latency at the edge",
            "Apdex (T = 0.5 s)",
            "Error ratio",
            "Machines by state",
            "Cold starts",
            "CPU per machine",
            "Memory per machine",
            "Cache hit ratio",
        ] {
            assert!(titles.contains(&wanted), "{wanted}: {titles:?}");
        }
    }

    #[test]
    fn variables_expand_and_unknown_ones_are_named() {
        let v = Vars {
            app: "shop".into(),
            instance: Some("abc123".into()),
            range: Duration::from_secs(900),
            step: Duration::from_secs(5),
            scrape: Duration::from_secs(5),
        };
        assert_eq!(
            v.expand(r#"rate(x{app="$app",instance=~"${instance}"}[$__rate_interval]) / $__range"#)
                .unwrap(),
            r#"rate(x{app="shop",instance=~"abc123"}[20s]) / 900s"#
        );
        let all = Vars {
            instance: None,
            ..v.clone()
        };
        assert_eq!(all.expand("$instance").unwrap(), ".+");
        let e = v.expand("x{a=\"$tenant\"}").unwrap_err();
        assert!(e.contains("$tenant"), "{e}");
        assert!(v.expand("${app").is_err());
        assert_eq!(
            step_for(Duration::from_secs(3600), Duration::from_secs(5)),
            Duration::from_secs(18)
        );
        assert_eq!(
            step_for(Duration::from_secs(300), Duration::from_secs(5)),
            Duration::from_secs(5)
        );
        assert_eq!(parse_duration("15m"), Some(Duration::from_secs(900)));
        assert_eq!(parse_duration("15"), None);
        assert_eq!(parse_duration("m"), None);
    }

    #[test]
    fn files_outside_the_subset_are_refused_with_the_panel_named() {
        let one = |panel: &str| format!(r#"{{"uid":"mine","title":"Mine","panels":[{panel}]}}"#);
        let e = parse(&one(
            r#"{"id":3,"type":"piechart","title":"Pie","targets":[{"expr":"up"}]}"#,
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("panel 3") && e.contains("piechart"), "{e}");
        let e = parse(&one(
            r#"{"id":4,"type":"stat","title":"Bad","targets":[{"refId":"A","expr":"sum("}]}"#,
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("panel 4") && e.contains("target A"), "{e}");
        let e = parse(&one(
            r#"{"id":5,"type":"stat","targets":[{"expr":"x{o=\"$org\"}"}]}"#,
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("$org"), "{e}");
        assert!(matches!(
            parse(r#"{"uid":"../x","title":"t"}"#),
            Err(DashboardError::Uid(_))
        ));
        assert!(matches!(parse("[]"), Err(DashboardError::Json(_))));
        assert!(parse(&one(r#"{"id":1,"type":"stat","targets":[]}"#)).is_err());
    }

    #[test]
    fn answers_become_named_series() {
        let matrix = br#"{"status":"success","data":{"resultType":"matrix","result":[
            {"metric":{"status":"5xx"},"values":[[100,"1"],[105,"2.5"]]},
            {"metric":{"status":"2xx"},"values":[[100,"7"]]}]}}"#;
        let s = series_of(matrix, Some("{{status}} answers")).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].name, "2xx answers");
        assert_eq!(s[1].points, vec![(100.0, 1.0), (105.0, 2.5)]);
        let vector = br#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"__name__":"up","job":"apps"},"value":[100,"1"]}]}}"#;
        let s = series_of(vector, None).unwrap();
        assert_eq!(s[0].name, r#"up{job="apps"}"#);
        assert_eq!(s[0].points, vec![(100.0, 1.0)]);
        let e = series_of(br#"{"status":"error","error":"bad query"}"#, None).unwrap_err();
        assert_eq!(e, "bad query");
    }
}
