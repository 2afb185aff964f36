//! Metrics on a real node with Debian's Prometheus: `[metrics]` targets
//! scraped with the node's labels, and the per-org query endpoint tried as
//! a hostile org would (real PromQL, regex matchers, `{__name__=~".+"}`,
//! the series and labels endpoints, a forged `org` label).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::machine::busybox_image;
use crate::support::*;

/// Form encoding of `pairs` (every byte but letters and digits escaped).
fn form(pairs: &[(&str, &str)]) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect::<String>()
    };
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

struct Caller {
    api: String,
    token: String,
}

impl Caller {
    /// POST a form to the metrics API's `endpoint`, as Grafana does.
    fn prom(&self, endpoint: &str, pairs: &[(&str, &str)]) -> HttpResponse {
        let auth = format!("Bearer {}", self.token);
        http(
            "POST",
            &self.api,
            &format!("/v1/metrics/api/v1/{endpoint}"),
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/x-www-form-urlencoded"),
            ],
            form(pairs).as_bytes(),
        )
    }

    /// The series an instant query returns.
    fn query(&self, expr: &str) -> Vec<Value> {
        let r = self.prom("query", &[("query", expr)]);
        assert_eq!(
            r.status,
            200,
            "{expr}: {}",
            String::from_utf8_lossy(&r.body)
        );
        r.json()["data"]["result"].as_array().unwrap().clone()
    }

    fn label_values(&self, name: &str) -> BTreeSet<String> {
        let r = self.prom(&format!("label/{name}/values"), &[]);
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        r.json()["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    }
}

#[test]
fn an_org_queries_its_own_series_only() {
    require("prometheus");
    let mut t = crate::operate::TwoOrgs::start();
    let (node, api) = (&t.node, t.api.clone());
    let caller = |token: &str| Caller {
        api: api.clone(),
        token: token.to_string(),
    };
    let (admin, acme, evil) = (caller(&t.admin), caller(&t.acme), caller(&t.evil));
    let admin_call = |method: &str, path: &str, body: &Value| t.call(&t.admin, method, path, body);
    // Each app's machine serves a static exposition. acme's forges the
    // labels the node sets, claiming to be evil's.
    let image = busybox_image(&node.h);
    let machine = |app: &str, exposition: &str| -> String {
        let script = format!("printf '{exposition}' > /www/metrics; exec httpd -f -p 9100 -h /www");
        let r = admin_call(
            "POST",
            "/v1/machines",
            &json!({"config": {"image": image, "metadata": {"app": app},
                "metrics": {"port": 9100, "path": "/metrics"},
                "services": [{"internal_port": 9100}],
                "init": {"cmd": ["sh", "-c", script]}}}),
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        r.json()["id"].as_str().unwrap().to_string()
    };
    let acme_id = machine(
        "acme-app",
        r#"# TYPE acme_jobs_total counter\nacme_jobs_total{org="evil",app="evil-app",instance="forged"} 7\n"#,
    );
    let evil_id = machine(
        "evil-app",
        r#"# TYPE evil_secret_total counter\nevil_secret_total{kind="payroll"} 42\n"#,
    );

    // Scraped within a few intervals (service discovery, then a scrape).
    let deadline = Instant::now() + Duration::from_secs(90);
    while acme.query("acme_jobs_total").is_empty() || evil.query("evil_secret_total").is_empty() {
        assert!(
            Instant::now() < deadline,
            "the apps' metrics were never scraped"
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // The node's labels win over the app's; the app's are kept apart.
    let own = acme.query("acme_jobs_total");
    assert_eq!(own.len(), 1, "{own:?}");
    let m = &own[0]["metric"];
    assert_eq!(m["org"], "acme");
    assert_eq!(m["app"], "acme-app");
    assert_eq!(m["instance"], acme_id.as_str());
    assert_eq!(m["node"], "local");
    assert!(m["region"].as_str().is_some_and(|r| !r.is_empty()), "{m}");
    assert_eq!(m["exported_org"], "evil");
    assert_eq!(own[0]["value"][1], "7");

    // Whatever acme asks, it sees acme's series only.
    for expr in [
        r#"{__name__=~".+"}"#,
        r#"{org=~".+"}"#,
        r#"{org=~"ev.*"}"#,
        r#"{__name__=~"evil.*"} or acme_jobs_total"#,
        r#"count by (org, app, instance) ({__name__=~".+"})"#,
        r#"label_replace(acme_jobs_total, "org", "evil", "", "")"#,
        r#"absent(evil_secret_total{org="evil"})"#,
    ] {
        for s in acme.query(expr) {
            let m = &s["metric"];
            assert!(
                m.get("__name__").is_none_or(|n| n != "evil_secret_total"),
                "{expr}: {s}"
            );
            assert_ne!(m["instance"], evil_id.as_str(), "{expr}: {s}");
            if expr.starts_with("label_replace") || expr.starts_with("absent") {
                continue;
            }
            assert_eq!(m["org"], "acme", "{expr}: {s}");
        }
    }
    assert!(acme.query("evil_secret_total").is_empty());
    assert!(acme.query(r#"up{org="evil"}"#).is_empty());
    assert!(acme.query(r#"sum(evil_secret_total) > 0"#).is_empty());
    // And evil does not get acme's series through the forged label.
    assert!(evil.query("acme_jobs_total").is_empty());
    assert!(evil.query(r#"{exported_org="evil"}"#).is_empty());

    // The node's own series of each machine's use carry its org: acme
    // sees its machine's, never evil's.
    let deadline = Instant::now() + Duration::from_secs(60);
    while acme.query("hangar_machine_memory_bytes").is_empty() {
        assert!(
            Instant::now() < deadline,
            "the node's own metrics were never scraped"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    for name in [
        "hangar_machine_memory_bytes",
        "hangar_machine_cpu_seconds_total",
        "hangar_machines",
    ] {
        let seen = acme.query(name);
        assert!(!seen.is_empty(), "{name}");
        for s in &seen {
            assert_eq!(s["metric"]["org"], "acme", "{name}: {s}");
            assert_ne!(s["metric"]["instance"], evil_id.as_str(), "{name}: {s}");
        }
    }
    let mem = acme.query(&format!(
        r#"hangar_machine_memory_bytes{{instance="{acme_id}"}}"#
    ));
    assert!(
        mem[0]["value"][1].as_str().unwrap().parse::<f64>().unwrap() > 0.0,
        "{mem:?}"
    );
    assert!(acme
        .query(&format!(
            r#"hangar_machine_cpu_seconds_total{{instance="{evil_id}"}}"#
        ))
        .is_empty());
    let started = acme.query(r#"hangar_machines{state="started"}"#);
    assert_eq!(started.len(), 1, "{started:?}");
    assert_eq!(started[0]["value"][1], "1");
    let r = http(
        "GET",
        &api,
        "/metrics",
        &[("Authorization", &format!("Bearer {}", acme.token))],
        b"",
    );
    assert_eq!(r.status, 405, "an org reads the node's whole exposition");

    // The edge's series of an app carry its org too.
    for _ in 0..5 {
        let r = http(
            "GET",
            &node.edge,
            "/metrics",
            &[("Host", "acme-app.localhost")],
            b"",
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let served = loop {
        let s = acme.query(r#"hangar_edge_responses_total{app="acme-app",status="2xx"}"#);
        if s.first().is_some_and(|s| s["value"][1] == "5") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the edge's series of acme-app never showed: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(served[0]["metric"]["org"], "acme");
    assert!(evil
        .query(r#"hangar_edge_responses_total{app="acme-app"}"#)
        .is_empty());
    assert!(evil
        .query(r#"{__name__=~"hangar_edge_.+"}"#)
        .iter()
        .all(|s| s["metric"]["org"] == "evil" && s["metric"]["app"] != "acme-app"));

    // The series and labels endpoints are confined the same way.
    let r = acme.prom("series", &[("match[]", r#"{__name__=~".+"}"#)]);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let series = r.json()["data"].as_array().unwrap().clone();
    assert!(!series.is_empty());
    assert!(series.iter().all(|s| s["org"] == "acme"), "{series:?}");
    assert_eq!(
        acme.label_values("org"),
        BTreeSet::from(["acme".to_string()])
    );
    assert!(!acme.label_values("__name__").contains("evil_secret_total"));
    assert!(!acme.label_values("instance").contains(&evil_id));
    assert!(!acme.label_values("kind").contains("payroll"));
    let r = acme.prom("labels", &[]);
    assert_eq!(r.status, 200);
    assert!(!r.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|l| l == "kind"));

    // What an org may not call, and what does not parse.
    for refused in [
        "metadata",
        "targets",
        "status/config",
        "admin/tsdb/snapshot",
    ] {
        let r = acme.prom(refused, &[]);
        assert_eq!(
            r.status,
            404,
            "{refused}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    let r = acme.prom("query", &[("query", "sum(")]);
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]
        .as_str()
        .unwrap()
        .contains("does not parse"));
    let auth = format!("Bearer {}", acme.token);
    let r = http(
        "GET",
        &api,
        "/v1/internal/metrics/targets?job=apps",
        &[("Authorization", &auth)],
        b"",
    );
    assert_eq!(r.status, 405);
    let r = http("GET", &api, "/v1/metrics/api/v1/query?query=up", &[], b"");
    assert_eq!(r.status, 401);

    // The node's process serves its API's, its registry's and its egress
    // proxy's series too: the admin's to see, no org's.
    let deadline = Instant::now() + Duration::from_secs(60);
    let node_own =
        r#"hangar_api_request_duration_seconds_count{route="/v1/machines",method="POST"}"#;
    while admin.query(node_own).is_empty() || admin.query("hangar_egress_open_tunnels").is_empty() {
        assert!(
            Instant::now() < deadline,
            "the node's API and egress series never showed"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // The scheduler's: both machines were placed here.
    let placed =
        admin.query(r#"hangar_scheduler_placement_duration_seconds_count{outcome="here"}"#);
    assert_eq!(placed.len(), 1, "{placed:?}");
    assert!(
        placed[0]["value"][1]
            .as_str()
            .unwrap()
            .parse::<f64>()
            .unwrap()
            >= 2.0,
        "{placed:?}"
    );
    assert!(acme
        .query("hangar_scheduler_placement_duration_seconds_count")
        .is_empty());
    assert!(acme.query("hangar_egress_open_tunnels").is_empty());
    assert!(acme
        .query("hangar_api_request_duration_seconds_count")
        .is_empty());

    // The admin sees both orgs, and the CLI prints an org's series.
    let orgs: BTreeSet<String> = admin
        .query("count by (org) (up)")
        .iter()
        .filter_map(|s| s["metric"]["org"].as_str().map(str::to_string))
        .collect();
    assert!(orgs.is_superset(&BTreeSet::from(["acme".to_string(), "evil".to_string()])));
    let out = node
        .h
        .command(&["metrics", "query", r#"{__name__=~".+_total"}"#])
        .env("HANGAR_API_TOKEN", &acme.token)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("acme_jobs_total{") && text.contains(" 7"),
        "{text}"
    );
    assert!(!text.contains("evil_secret_total"), "{text}");

    // Prometheus ends with its node, even one killed with kill -9.
    let pid = std::fs::read_to_string(t.node.h.home().join("prometheus/pid")).unwrap();
    let proc_dir = format!("/proc/{}", pid.trim());
    assert!(
        std::path::Path::new(&proc_dir).exists(),
        "Prometheus is not running"
    );
    t.node.kill9();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&proc_dir).exists() {
        assert!(Instant::now() < deadline, "Prometheus outlived its node");
        std::thread::sleep(Duration::from_millis(50));
    }
}
