//! The node's metrics, as the control plane sees them: the targets its
//! Prometheus scrapes (every started machine here of an app with
//! `[metrics]`, labelled `org`, `app`, `region`, `node` and `instance`;
//! and the node's own components), and queries of Prometheus's HTTP API
//! confined to the caller's org.
//!
//! Prometheus itself is run by the binary (`hangar_metrics::prometheus`);
//! this module only answers what it asks and forwards what orgs ask it.

use std::collections::BTreeMap;

use hangar_metrics::exposition::Family;
use hangar_metrics::prometheus::{JOB_APPS, JOB_FEDERATE, JOB_HANGAR};
use hangar_metrics::{promql, TargetGroup};

use crate::error::{Error, Result};
use crate::node::Node;
use crate::store::MachineState;

/// Series of other components in the node's process (its registry, its
/// egress proxy), gathered with the node's own at each scrape.
pub type Gather = std::sync::Arc<dyn Fn() -> Vec<Family> + Send + Sync>;

/// Where the node's metrics go.
#[derive(Clone)]
pub struct Metrics {
    /// The Prometheus HTTP API's base (`http://127.0.0.1:9090`).
    pub prometheus: String,
    /// The node's own components' endpoints (job `hangar`): their series
    /// name their org themselves, where they have one.
    pub own: Vec<TargetGroup>,
    /// Served at the node's `/metrics` beside its own series.
    pub also: Vec<Gather>,
    /// Prometheus's directory (its alert rules go under `rules/`).
    pub dir: std::path::PathBuf,
    /// Which addresses alert webhooks may be posted to (none: no webhook
    /// is posted).
    pub webhook_check: Option<crate::alerts::DialCheck>,
}

/// Queries an org may have running in Prometheus at once: fewer than
/// Prometheus runs at once, so one org's heavy queries leave room for the
/// others'. Each is cut off at [`QUERY_TIMEOUT`].
pub const QUERIES_PER_ORG: usize = 4;
pub const QUERY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The running queries' slots, per org.
#[derive(Default)]
pub struct QuerySlots(std::sync::Mutex<BTreeMap<String, std::sync::Arc<tokio::sync::Semaphore>>>);

impl QuerySlots {
    fn of(&self, org: &str) -> std::sync::Arc<tokio::sync::Semaphore> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(org.to_string())
            .or_insert_with(|| std::sync::Arc::new(tokio::sync::Semaphore::new(QUERIES_PER_ORG)))
            .clone()
    }
}

/// Bucket counts and their sum.
type Histogram = (Vec<u64>, f64);

/// Latency histograms of one family, by the values of its labels.
pub struct Timings {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    bounds: &'static [f64],
    /// Per label values: the bucket counts and their sum.
    by: std::sync::Mutex<BTreeMap<Vec<String>, Histogram>>,
}

impl Timings {
    fn new(
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
        bounds: &'static [f64],
    ) -> Timings {
        Timings {
            name,
            help,
            labels,
            bounds,
            by: Default::default(),
        }
    }

    /// Count one event of `values` (one per label) that took `took`.
    pub fn observe(&self, values: &[&str], took: std::time::Duration) {
        let key = values.iter().map(|v| v.to_string()).collect();
        let mut map = self.by.lock().unwrap_or_else(|e| e.into_inner());
        let entry = map
            .entry(key)
            .or_insert_with(|| (vec![0; self.bounds.len() + 1], 0.0));
        let s = took.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(self.bounds.len());
        entry.0[i] += 1;
        entry.1 += s;
    }

    pub fn family(&self) -> Family {
        let mut f = Family::histogram(self.name, self.help, Some("seconds"), self.bounds);
        let map = self.by.lock().unwrap_or_else(|e| e.into_inner());
        for (values, (counts, sum)) in map.iter() {
            let labels: Vec<(&str, &str)> = self
                .labels
                .iter()
                .copied()
                .zip(values.iter().map(String::as_str))
                .collect();
            f.push_histogram(&labels, *sum, counts.clone());
        }
        f
    }
}

/// Upper bounds of the API's latency buckets, in seconds.
const API_BUCKETS: [f64; 8] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 10.0];

/// The API's requests, by route and status class, and their latency.
pub struct ApiMetrics(Timings);

impl Default for ApiMetrics {
    fn default() -> Self {
        ApiMetrics(Timings::new(
            "hangar_api_request_duration",
            "Machines and Apps API answers, by route, method and status class: time to the answer's head.",
            &["route", "method", "status"],
            &API_BUCKETS,
        ))
    }
}

impl ApiMetrics {
    /// Count one answer of `route` (the matched path pattern).
    pub fn observe(&self, route: &str, method: &str, status: u16, took: std::time::Duration) {
        let class = format!("{}xx", status / 100);
        self.0.observe(&[route, method, &class], took);
    }

    pub fn families(&self) -> Vec<Family> {
        vec![self.0.family()]
    }
}

/// Upper bounds of the scheduler's buckets, in seconds (a placement
/// includes creating and starting the machine).
const PLACEMENT_BUCKETS: [f64; 8] = [0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0];

/// Where new machines went: `here`, `elsewhere` (another node of the
/// cluster), `no_room` (every node of the region full) or `failed`.
pub struct Placements(Timings);

impl Default for Placements {
    fn default() -> Self {
        Placements(Timings::new(
            "hangar_scheduler_placement_duration",
            "Machines placed by this node (deploys, scaling, creates), by outcome: time to a started machine or the refusal.",
            &["outcome"],
            &PLACEMENT_BUCKETS,
        ))
    }
}

impl Placements {
    pub fn observe<T>(&self, outcome: &Result<T>, here: bool, took: std::time::Duration) {
        let what = match outcome {
            Ok(_) if here => "here",
            Ok(_) => "elsewhere",
            Err(Error::Busy(_)) => "no_room",
            Err(_) => "failed",
        };
        self.0.observe(&[what], took);
    }
}

/// The Prometheus HTTP API endpoints an org may call, under
/// `/v1/metrics/api/v1/`.
pub const ENDPOINTS: &str =
    "query, query_range, query_exemplars, series, labels, label/<name>/values, status/buildinfo";

impl Node {
    /// The scrape targets of `job` on this node (Prometheus's HTTP service
    /// discovery).
    pub fn metric_targets(&self, job: &str) -> Result<Vec<TargetGroup>> {
        match job {
            JOB_APPS => self.app_targets(),
            JOB_HANGAR => Ok(self
                .metrics
                .as_ref()
                .map(|m| m.own.clone())
                .unwrap_or_default()),
            JOB_FEDERATE => {
                if self.cluster.is_none() {
                    return Ok(Vec::new());
                }
                let me = self.node_label();
                Ok(self
                    .state
                    .members()?
                    .into_iter()
                    .filter(|m| m.name != me && !m.api.is_empty())
                    .map(|m| TargetGroup {
                        targets: vec![crate::client::authority_of(&m.api)],
                        labels: Default::default(),
                    })
                    .collect())
            }
            _ => Err(Error::Invalid(format!(
                "no job {job:?}: the jobs are {JOB_APPS}, {JOB_HANGAR} and {JOB_FEDERATE}"
            ))),
        }
    }

    fn app_targets(&self) -> Result<Vec<TargetGroup>> {
        let node = self.node_label();
        let mut orgs: BTreeMap<String, Option<String>> = BTreeMap::new();
        let mut groups = Vec::new();
        for m in self.own_machines()? {
            let Some(app) = m.app.as_deref() else {
                continue;
            };
            if m.state != MachineState::Started || m.config.metrics.is_empty() {
                continue;
            }
            let org = orgs
                .entry(app.to_string())
                .or_insert_with(|| self.state.app(app).ok().map(|a| a.org))
                .clone();
            // An app gone since its machine was listed: nothing to label.
            let Some(org) = org else { continue };
            let region = if m.region.is_empty() {
                self.site.region.clone()
            } else {
                m.region.clone()
            };
            for endpoint in &m.config.metrics {
                let labels = BTreeMap::from([
                    ("__metrics_path__".to_string(), endpoint.path.clone()),
                    ("org".to_string(), org.clone()),
                    ("app".to_string(), app.to_string()),
                    ("region".to_string(), region.clone()),
                    ("node".to_string(), node.to_string()),
                    ("instance".to_string(), m.id.clone()),
                ]);
                groups.push(TargetGroup {
                    targets: vec![crate::routing::address(&m, endpoint.port).to_string()],
                    labels,
                });
            }
        }
        Ok(groups)
    }

    /// The node's own series, gathered now: its machines (state, and what
    /// each running one uses, from its cgroup or VMM), each labelled with
    /// its `org`, so an org's queries see its own machines' use.
    pub fn metric_families(&self) -> Result<Vec<Family>> {
        let node = self.node_label().to_string();
        let mut states: BTreeMap<(String, String, String, String), u64> = BTreeMap::new();
        let mut cpu = Family::counter(
            "hangar_machine_cpu",
            "CPU time the machine used (container: its cgroup; micro-VM: its QEMU process).",
            Some("seconds"),
        );
        let mut memory = Family::gauge(
            "hangar_machine_memory",
            "Memory the machine uses now (micro-VM: its QEMU process's resident memory).",
            Some("bytes"),
        );
        let mut limit = Family::gauge(
            "hangar_machine_memory_limit",
            "Memory the machine may have.",
            Some("bytes"),
        );
        let mut rx = Family::counter(
            "hangar_machine_network_receive",
            "Bytes the machine received.",
            Some("bytes"),
        );
        let mut tx = Family::counter(
            "hangar_machine_network_transmit",
            "Bytes the machine sent.",
            Some("bytes"),
        );
        let mut restarts = Family::counter(
            "hangar_machine_restarts",
            "Times the node restarted the machine's app.",
            None,
        );
        let mut ooms = Family::counter(
            "hangar_machine_oom_kills",
            "OOM kills in the machine's cgroup.",
            None,
        );
        let mut orgs: BTreeMap<String, Option<String>> = BTreeMap::new();
        let mut nets: BTreeMap<u32, String> = BTreeMap::new();
        for m in self.own_machines()? {
            let app = m.app.clone().unwrap_or_default();
            let org = match &m.app {
                Some(a) => orgs
                    .entry(a.clone())
                    .or_insert_with(|| self.state.app(a).ok().map(|a| a.org))
                    .clone()
                    .unwrap_or_default(),
                None => String::new(),
            };
            if !org.is_empty() {
                nets.insert(hangar_machine::network::net_of(m.slot), org.clone());
            }
            let region = if m.region.is_empty() {
                self.site.region.clone()
            } else {
                m.region.clone()
            };
            *states
                .entry((
                    org.clone(),
                    app.clone(),
                    region.clone(),
                    m.state.to_string(),
                ))
                .or_default() += 1;
            let labels = [
                ("org", org.as_str()),
                ("app", app.as_str()),
                ("region", region.as_str()),
                ("node", node.as_str()),
                ("instance", m.id.as_str()),
            ];
            restarts.push(&labels, f64::from(m.restarts));
            if m.state != MachineState::Started {
                continue;
            }
            let Some(u) = self.driver.usage(&m.id) else {
                continue;
            };
            cpu.push(&labels, u.cpu_seconds);
            memory.push(&labels, u.memory_bytes as f64);
            if let Some(l) = u.memory_limit_bytes {
                limit.push(&labels, l as f64);
            }
            rx.push(&labels, u.received_bytes as f64);
            tx.push(&labels, u.transmitted_bytes as f64);
            ooms.push(&labels, u.oom_kills as f64);
        }
        let mut machines = Family::gauge("hangar_machines", "The node's machines by state.", None);
        for ((org, app, region, state), n) in &states {
            machines.push(
                &[
                    ("org", org),
                    ("app", app),
                    ("region", region),
                    ("node", &node),
                    ("state", state),
                ],
                *n as f64,
            );
        }
        let mut all = vec![machines, cpu, memory, limit, rx, tx, restarts, ooms];
        all.extend(self.api_requests.families());
        all.push(self.placements.0.family());
        if let Some(dns) = &self.dns {
            all.extend(dns.families(&nets, &node));
        }
        for gather in self.metrics.iter().flat_map(|m| m.also.iter()) {
            all.extend(gather());
        }
        Ok(all)
    }

    /// This node's own series from its Prometheus (`node="<it>"`), in the
    /// text format, for the cluster's other nodes to federate.
    pub async fn federate(&self) -> Result<(String, bytes::Bytes)> {
        let Some(metrics) = &self.metrics else {
            return Err(Error::Unavailable("metrics are off on this node".into()));
        };
        let selector = format!("{{node=\"{}\"}}", self.node_label());
        let sent = reqwest::Client::new()
            .get(format!("{}/federate", metrics.prometheus))
            .query(&[("match[]", selector.as_str())])
            .timeout(QUERY_TIMEOUT)
            .send()
            .await
            .map_err(|e| {
                Error::Unavailable(format!("the node's Prometheus did not answer: {e}"))
            })?;
        let kind = sent
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("text/plain; version=0.0.4")
            .to_string();
        let body = sent
            .bytes()
            .await
            .map_err(|e| Error::Unavailable(format!("the node's Prometheus broke off: {e}")))?;
        Ok((kind, body))
    }

    pub(crate) fn node_label(&self) -> &str {
        if self.site.node.is_empty() {
            "local"
        } else {
            &self.site.node
        }
    }

    /// Call Prometheus's HTTP API at `endpoint` (one of [`ENDPOINTS`])
    /// with `params`, confined to `org` (`None`: the admin, unconfined).
    /// Returns Prometheus's status and JSON body as they are.
    pub async fn query_metrics(
        &self,
        org: Option<&str>,
        endpoint: &str,
        params: Vec<(String, String)>,
    ) -> Result<(u16, bytes::Bytes)> {
        self.query_metrics_with(org, endpoint, params, false).await
    }

    /// [`Node::query_metrics`], waiting (up to [`QUERY_TIMEOUT`]) for one
    /// of the org's slots instead of answering busy: the node's own pages
    /// and checks, which run their queries in turn.
    pub async fn query_metrics_queued(
        &self,
        org: Option<&str>,
        endpoint: &str,
        params: Vec<(String, String)>,
    ) -> Result<(u16, bytes::Bytes)> {
        self.query_metrics_with(org, endpoint, params, true).await
    }

    async fn query_metrics_with(
        &self,
        org: Option<&str>,
        endpoint: &str,
        params: Vec<(String, String)>,
        wait: bool,
    ) -> Result<(u16, bytes::Bytes)> {
        let Some(metrics) = &self.metrics else {
            return Err(Error::Unavailable(
                "metrics are off on this node: install Debian's prometheus (apt-get install prometheus) and restart `hangar up`".into(),
            ));
        };
        let (params, _slot) = match org {
            None => (params, None),
            Some(org) => {
                let mut params = confine(endpoint, params, org)?;
                // Prometheus stops the query at this, whatever was asked.
                params.retain(|(k, _)| k != "timeout");
                params.push(("timeout".into(), format!("{}s", QUERY_TIMEOUT.as_secs())));
                let busy = || {
                    Error::Busy(format!(
                        "this org has {QUERIES_PER_ORG} metrics queries running; retry after a second"
                    ))
                };
                let slots = self.metric_queries.of(org);
                let slot = if wait {
                    tokio::time::timeout(QUERY_TIMEOUT, slots.acquire_owned())
                        .await
                        .ok()
                        .and_then(|s| s.ok())
                        .ok_or_else(busy)?
                } else {
                    slots.try_acquire_owned().map_err(|_| busy())?
                };
                (params, Some(slot))
            }
        };
        let url = format!("{}/api/v1/{endpoint}", metrics.prometheus);
        let form = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(&params)
            .finish();
        // Prometheus takes a form where it can (queries can be long); its
        // label values and build info are GET only.
        let http = reqwest::Client::new();
        let req = if endpoint.starts_with("label/") || endpoint.starts_with("status/") {
            http.get(format!("{url}?{form}"))
        } else {
            http.post(&url)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(form)
        };
        let sent = req
            .timeout(QUERY_TIMEOUT + std::time::Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| {
                Error::Unavailable(format!(
                    "the node's Prometheus did not answer ({e}); see $HANGAR_HOME/prometheus/prometheus.log"
                ))
            })?;
        let status = sent.status().as_u16();
        let body = sent
            .bytes()
            .await
            .map_err(|e| Error::Unavailable(format!("the node's Prometheus broke off: {e}")))?;
        Ok((status, body))
    }
}

/// `params` for `endpoint`, with every query and series selector confined
/// to `org`; endpoints an org may not call are refused.
fn confine(
    endpoint: &str,
    params: Vec<(String, String)>,
    org: &str,
) -> Result<Vec<(String, String)>> {
    let selectors = match endpoint {
        "query" | "query_range" | "query_exemplars" => false,
        "series" | "labels" => true,
        "status/buildinfo" => return Ok(Vec::new()),
        other => match other
            .strip_prefix("label/")
            .and_then(|r| r.strip_suffix("/values"))
        {
            Some(name) if !name.is_empty() && !name.contains('/') => true,
            _ => {
                return Err(Error::NotFound(format!(
                    "no metrics endpoint {other}: an org may call {ENDPOINTS}"
                )))
            }
        },
    };
    let bad = |e: promql::ConfineError| Error::Invalid(e.to_string());
    let mut out = Vec::with_capacity(params.len() + 1);
    let mut matched = false;
    for (k, v) in params {
        match k.as_str() {
            "query" => out.push((k, promql::confine(&v, org).map_err(bad)?)),
            "match[]" => {
                matched = true;
                out.push((k, promql::confine_selector(&v, org).map_err(bad)?));
            }
            _ => out.push((k, v)),
        }
    }
    if selectors && !matched {
        out.push(("match[]".into(), promql::org_selector(org)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn one_org_holding_its_query_slots_leaves_the_others_theirs() {
        let slots = QuerySlots::default();
        let held: Vec<_> = (0..QUERIES_PER_ORG)
            .map(|_| slots.of("acme").try_acquire_owned().unwrap())
            .collect();
        assert!(slots.of("acme").try_acquire_owned().is_err());
        assert!(slots.of("evil").try_acquire_owned().is_ok());
        drop(held);
        assert!(slots.of("acme").try_acquire_owned().is_ok());
    }

    #[test]
    fn an_orgs_parameters_are_confined_and_other_endpoints_refused() {
        let out = confine("query", p(&[("query", "up"), ("time", "1")]), "acme").unwrap();
        assert_eq!(out, p(&[("query", r#"up{org="acme"}"#), ("time", "1")]));
        let out = confine("labels", p(&[]), "acme").unwrap();
        assert_eq!(out, p(&[("match[]", r#"{org="acme"}"#)]));
        let out = confine("label/__name__/values", p(&[("match[]", "up")]), "acme").unwrap();
        assert_eq!(out, p(&[("match[]", r#"up{org="acme"}"#)]));
        for refused in [
            "metadata",
            "targets",
            "label//values",
            "admin/tsdb/delete_series",
        ] {
            assert!(
                matches!(confine(refused, p(&[]), "acme"), Err(Error::NotFound(_))),
                "{refused}"
            );
        }
        assert!(matches!(
            confine("query", p(&[("query", "sum(")]), "acme"),
            Err(Error::Invalid(_))
        ));
    }
}
