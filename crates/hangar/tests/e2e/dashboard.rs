//! The dashboard page in a real browser (Debian's headless Chromium):
//! `hangar dashboard -a APP` opens it, its panels show the series the
//! test made, it redraws live, and the console stays clean; then the
//! page's sessions are attacked as a hostile org would (another org's
//! app, a ticket used twice, a forged cookie).

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::operate::TwoOrgs;
use crate::support::browser::Browser;
use crate::support::*;

/// A machine of `app` answering HTTP on 8080 (and 404 for other paths).
fn web_machine(t: &TwoOrgs, app: &str) -> String {
    let (id, _) = t.machine(
        app,
        &[
            "sh",
            "-c",
            "mkdir -p /www && echo hello > /www/index.html && exec httpd -f -p 8080 -h /www",
        ],
        json!({"services": [{"internal_port": 8080}]}),
    );
    id
}

/// `hangar dashboard` with `token`: the link it prints.
fn dashboard_link(t: &TwoOrgs, token: &str, args: &[&str]) -> Result<String, String> {
    let mut argv = vec!["dashboard", "--print"];
    argv.extend_from_slice(args);
    let out = t
        .node
        .h
        .command(&argv)
        .env("HANGAR_API_TOKEN", token)
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).to_string());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// The path and query of a link (`http://host/p?q` to `/p?q`).
fn target_of(link: &str) -> String {
    let rest = link.split_once("://").unwrap().1;
    format!("/{}", rest.split_once('/').unwrap().1)
}

/// Trade a link's ticket for the session cookie (`name=value`).
fn session_of(t: &TwoOrgs, link: &str) -> String {
    let r = http("GET", &t.api, &target_of(link), &[], b"");
    assert_eq!(r.status, 303, "{}", String::from_utf8_lossy(&r.body));
    let cookie = r.header("set-cookie").unwrap();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    cookie.split(';').next().unwrap().to_string()
}

#[test]
fn the_dashboard_page_draws_an_apps_series_live_in_chromium() {
    require("prometheus");
    let t = TwoOrgs::start();
    // acme's app is deployed with a dashboard of its own.
    let own = json!({
        "uid": "acme-orders", "title": "Orders", "schemaVersion": 39,
        "panels": [{"id": 1, "type": "stat", "title": "Machines up",
            "gridPos": {"x": 0, "y": 0, "w": 6, "h": 4},
            "targets": [{"refId": "A", "expr": "sum(hangar_machines{app=\"$app\",state=\"started\"})"}]}],
    });
    let r = deploy_with(&t, "acme-app", json!({"dashboards": [own.to_string()]}));
    assert!(
        String::from_utf8_lossy(&r.body).contains("\"ok\":true"),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let machines = t.call(&t.admin, "GET", "/v1/machines", &json!({})).json();
    let acme_id = machines
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["app"] == "acme-app")
        .map(|m| m["id"].as_str().unwrap().to_string())
        .expect("acme's machine");
    let evil_id = web_machine(&t, "evil-app");
    // Traffic through the edge all along: answers of two classes.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let (edge, stop) = (t.node.edge.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let path = if i.is_multiple_of(4) { "/missing" } else { "/" };
                let r = http("GET", &edge, path, &[("Host", "acme-app.localhost")], b"");
                assert!(r.status == 200 || r.status == 404, "{}", r.status);
                http("GET", &edge, "/", &[("Host", "evil-app.localhost")], b"");
                i += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    // Scraped, twice at least (a rate needs two samples).
    let acme_query = |expr: &str| -> Vec<Value> {
        let r = http(
            "GET",
            &t.api,
            &format!(
                "/v1/metrics/api/v1/query?query={}",
                url::form_urlencoded::byte_serialize(expr.as_bytes()).collect::<String>()
            ),
            &[("Authorization", &format!("Bearer {}", t.acme))],
            b"",
        );
        r.json()["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    while acme_query(
        r#"count_over_time(hangar_edge_responses_total{app="acme-app",status="2xx"}[1m]) >= 2"#,
    )
    .is_empty()
        || acme_query(r#"count_over_time(hangar_machine_memory_bytes{app="acme-app"}[1m]) >= 2"#)
            .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "the app's series were never scraped twice"
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // The page, opened as `hangar dashboard` opens it.
    let link = dashboard_link(&t, &t.acme, &["-a", "acme-app"]).unwrap();
    assert!(link.contains("/dashboard/login?ticket="), "{link}");
    let browser = Browser::start();
    browser.goto(&link);
    browser.wait_for(
        "return location.pathname === '/dashboard/apps/acme-app' && document.querySelectorAll('figure.panel').length > 0",
        Duration::from_secs(30),
        "the ticket did not open the app's page",
    );
    let page = browser.eval(
        r#"const panel = t => document.querySelector(`figure.panel[data-title="${t}"] .body`);
        const names = t => [...(panel(t)?.querySelectorAll('path.series') ?? [])]
            .filter(p => p.getAttribute('d')).map(p => p.dataset.name);
        return {
          title: document.title,
          panels: document.querySelectorAll('figure.panel').length,
          status: names('Requests/s by status'),
          latency: names('Latency at the edge'),
          memory: names('Memory per machine'),
          states: names('Machines by state'),
          requests: panel('Requests')?.querySelector('svg')?.dataset.value,
          apdex: panel('Apdex (T = 0.5 s)')?.querySelector('svg')?.dataset.value,
          failed: document.querySelectorAll('svg.failed').length,
          machines: [...document.querySelectorAll('select[name=instance] option')].map(o => o.value),
          text: document.body.innerText + document.body.innerHTML,
        };"#,
    );
    assert!(
        page["title"].as_str().unwrap().contains("acme-app"),
        "{}",
        page["title"]
    );
    assert_eq!(page["panels"], 14, "{page}");
    assert_eq!(
        page["failed"], 0,
        "a panel's query failed: {}",
        page["text"]
    );
    let has = |key: &str, name: &str| {
        page[key]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n.as_str() == Some(name))
    };
    assert!(
        has("status", "2xx") && has("status", "4xx"),
        "{}",
        page["status"]
    );
    assert!(has("latency", "p99"), "{}", page["latency"]);
    assert!(has("memory", &acme_id), "{}", page["memory"]);
    assert!(has("states", "started"), "{}", page["states"]);
    let requests: f64 = page["requests"].as_str().unwrap().parse().unwrap();
    assert!(requests > 0.0, "{page}");
    // Every answer came well within 0.5 s.
    let apdex: f64 = page["apdex"]
        .as_str()
        .unwrap_or_default()
        .parse()
        .unwrap_or(0.0);
    assert!(apdex > 0.9 && apdex <= 1.0, "apdex {}", page["apdex"]);
    assert_eq!(page["machines"], json!(["", acme_id]));
    // Nothing of the other org's app, anywhere on the page.
    let text = page["text"].as_str().unwrap();
    assert!(
        !text.contains(&evil_id) && !text.contains("evil-app"),
        "evil shows"
    );

    // It redraws by itself.
    browser.wait_for(
        "return Number(document.body.dataset.drawn || 0) >= 1 && document.getElementById('status').className === 'live'",
        Duration::from_secs(40),
        "the page never redrew itself",
    );
    // One machine, over the last 15 minutes: the choice applies at once.
    browser.eval(&format!(
        r#"const m = document.querySelector('select[name=instance]'); m.value = '{acme_id}';
        m.dispatchEvent(new Event('change')); return true;"#
    ));
    browser.wait_for(
        &format!("return location.search.includes('instance={acme_id}')"),
        Duration::from_secs(20),
        "choosing a machine did not apply",
    );
    browser.eval(
        "const r = document.querySelector('select[name=range]'); r.value = '15m'; r.dispatchEvent(new Event('change')); return true;",
    );
    browser.wait_for(
        "return location.search.includes('range=15m') && document.querySelectorAll('figure.panel').length === 14",
        Duration::from_secs(20),
        "choosing a range did not apply",
    );
    let cpu = browser.eval(
        r#"return [...document.querySelectorAll('figure.panel[data-title="CPU per machine"] path.series')].map(p => p.dataset.name);"#,
    );
    assert_eq!(cpu, json!([acme_id]), "{cpu}");
    let errors = browser.console_errors();
    assert!(errors.is_empty(), "console errors: {errors:?}");
    let shot = browser.screenshot("dashboard-app");
    // The app's own dashboard is a tab.
    browser
        .eval("document.querySelector('nav a[href*=\"dash=acme-orders\"]').click(); return true;");
    browser.wait_for(
        r#"return location.search.includes('dash=acme-orders') && document.querySelector('figure.panel[data-title="Machines up"] svg')?.dataset.value === '1'"#,
        Duration::from_secs(20),
        "the app's own dashboard did not draw",
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    traffic.join().unwrap();
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 10_000,
        "{}",
        shot.display()
    );

    // The admin's node dashboards draw too.
    let link = dashboard_link(&t, &t.admin, &["--node", "edge"]).unwrap();
    browser.goto(&link);
    browser.wait_for(
        "return location.pathname === '/dashboard/node/edge' && document.querySelectorAll('figure.panel svg').length === 8",
        Duration::from_secs(30),
        "the edge dashboard did not draw",
    );
    assert!(browser.console_errors().is_empty());
    browser.screenshot("dashboard-edge");

    // Hostile: evil asks for acme's app, and for the node's dashboards.
    let e = dashboard_link(&t, &t.evil, &["-a", "acme-app"]).unwrap_err();
    assert!(e.contains("no app") || e.contains("404"), "{e}");
    let e = dashboard_link(&t, &t.evil, &["--node", "edge"]).unwrap_err();
    assert!(e.contains("admin"), "{e}");
    // Evil's own session shows evil's app, and 404 for acme's, as for
    // an app that does not exist.
    let evil_link = dashboard_link(&t, &t.evil, &["-a", "evil-app"]).unwrap();
    let cookie = session_of(&t, &evil_link);
    let page = |path: &str, cookie: &str| http("GET", &t.api, path, &[("Cookie", cookie)], b"");
    let mine = page("/dashboard/apps/evil-app", &cookie);
    assert_eq!(mine.status, 200);
    let theirs = page("/dashboard/apps/acme-app", &cookie);
    let none = page("/dashboard/apps/no-such-app", &cookie);
    assert_eq!((theirs.status, none.status), (404, 404));
    assert_eq!(
        String::from_utf8_lossy(&theirs.body).replace("acme-app", "X"),
        String::from_utf8_lossy(&none.body).replace("no-such-app", "X"),
        "another org's app reads differently from none"
    );
    assert_eq!(page("/dashboard/node/edge", &cookie).status, 404);
    // Asking evil's page for acme's machine changes nothing: only the
    // app's own machines stand for $instance.
    let r = page(
        &format!("/dashboard/apps/evil-app/panels?instance={acme_id}&range=5m"),
        &cookie,
    );
    assert_eq!(r.status, 200);
    let drawn = String::from_utf8_lossy(&r.body).to_string();
    assert!(
        !drawn.contains(&acme_id) && drawn.contains(&evil_id),
        "{drawn}"
    );
    // The index lists evil's apps only.
    let index = String::from_utf8_lossy(&page("/dashboard", &cookie).body).to_string();
    assert!(
        index.contains("evil-app") && !index.contains("acme-app"),
        "{index}"
    );
    // A ticket works once; a forged or missing cookie opens nothing.
    let r = http("GET", &t.api, &target_of(&evil_link), &[], b"");
    assert_eq!(r.status, 401, "a ticket worked twice");
    let forged = format!(
        "{}0",
        cookie.trim_end_matches(|c: char| c.is_ascii_hexdigit())
    );
    assert_eq!(page("/dashboard/apps/evil-app", &forged).status, 401);
    assert_eq!(page("/dashboard/apps/evil-app", "").status, 401);
    // A session cookie is no API token, and the page takes no token.
    let r = http("GET", &t.api, "/v1/apps", &[("Cookie", &cookie)], b"");
    assert_eq!(r.status, 401);
    let r = http(
        "GET",
        &t.api,
        "/dashboard/apps/acme-app",
        &[("Authorization", &format!("Bearer {}", t.acme))],
        b"",
    );
    assert_eq!(r.status, 401);
    // A link may only lead to the dashboard, never elsewhere.
    let link = dashboard_link(&t, &t.evil, &["-a", "evil-app"]).unwrap();
    let ticket = link
        .split("ticket=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap();
    let r = http(
        "GET",
        &t.api,
        &format!("/dashboard/login?ticket={ticket}&to=//attacker.example/x"),
        &[],
        b"",
    );
    assert_eq!(r.status, 303);
    assert_eq!(r.header("location"), Some("/dashboard"));
}

/// Every request a listener gets: (path, JSON body), answered 200.
fn webhook_receiver(listener: std::net::TcpListener) -> std::sync::mpsc::Receiver<(String, Value)> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            if let Some(req) = read_request(&mut stream) {
                let body = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
                respond(&mut stream, 200, &[], b"ok");
                if tx.send((req.target, body)).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

/// Deploy one web machine of `app` with `observe` (rules, webhook), as
/// the admin (the test image is the node's own; the rules still confine
/// to the app's org): the streamed answer.
fn deploy_with(t: &TwoOrgs, app: &str, observe: Value) -> HttpResponse {
    let image = crate::machine::busybox_image(&t.node.h);
    t.call(
        &t.admin,
        "POST",
        &format!("/v1/apps/{app}/deploy"),
        &json!({
            "image": image,
            "count": 1,
            "config": {
                "init": {"cmd": ["sh", "-c", "mkdir -p /www && echo hi > /www/index.html && exec httpd -f -p 8080 -h /www"]},
                "services": [{"internal_port": 8080}],
            },
            "observe": observe,
        }),
    )
}

/// `hangar alerts -a APP` as `token`: (success, output).
fn alerts_cli(t: &TwoOrgs, token: &str, app: &str) -> (bool, String) {
    let out = t
        .node
        .h
        .command(&["alerts", "-a", app])
        .env("HANGAR_API_TOKEN", token)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn alert_rules_fire_reach_the_webhook_and_resolve_and_stay_in_their_org() {
    require("prometheus");
    let hook = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hook_port = hook.local_addr().unwrap().port();
    let posts = webhook_receiver(hook);
    // What evil aims its webhook at: another loopback address, outside
    // the range the operator allowed.
    let trap = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
    let trap_addr = trap.local_addr().unwrap();
    let trapped = webhook_receiver(trap);
    let t = TwoOrgs::start_with(&["--webhook-allow-range", "127.0.0.1/32"]);

    // Evil's rules may not set the labels the node sets, nor fail to parse.
    let r = deploy_with(
        &t,
        "evil-app",
        json!({"rules": [{"alert": "Forged", "expr": "vector(1)", "labels": {"org": "acme"}}]}),
    );
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert!(String::from_utf8_lossy(&r.body).contains("set by the node"));

    let r = deploy_with(
        &t,
        "acme-app",
        json!({
            "rules": [{
                "alert": "NotFoundAnswers",
                "expr": r#"sum(rate(hangar_edge_responses_total{app="acme-app",status="4xx"}[20s])) > 0"#,
                "for": "5s",
                "labels": {"severity": "ticket"},
                "annotations": {"summary": "acme-app answers 404s"},
            }],
            "webhook": format!("http://127.0.0.1:{hook_port}/acme-hook"),
        }),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(
        String::from_utf8_lossy(&r.body).contains("\"ok\":true"),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    // Evil's rules try to watch acme's app, fire always, and post to an
    // address the policy refuses.
    let r = deploy_with(
        &t,
        "evil-app",
        json!({
            "rules": [
                {"alert": "SpyOnAcme", "expr": r#"sum(rate(hangar_edge_responses_total{app="acme-app"}[20s])) > 0"#},
                {"alert": "Always", "expr": "vector(1)"},
            ],
            "webhook": format!("http://{trap_addr}/steal"),
        }),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

    // 404s through the edge make acme's alert fire.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let (edge, stop) = (t.node.edge.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                http(
                    "GET",
                    &edge,
                    "/missing",
                    &[("Host", "acme-app.localhost")],
                    b"",
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let (path, body) = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (path, body) = posts
            .recv_timeout(left)
            .expect("acme's webhook never got the alert");
        if body["status"] == "firing" {
            break (path, body);
        }
    };
    assert_eq!(path, "/acme-hook");
    assert_eq!(body["version"], "4");
    let alert = &body["alerts"][0];
    assert_eq!(alert["labels"]["alertname"], "NotFoundAnswers");
    assert_eq!(alert["labels"]["org"], "acme");
    assert_eq!(alert["labels"]["app"], "acme-app");
    assert_eq!(alert["labels"]["severity"], "ticket");
    assert_eq!(alert["annotations"]["summary"], "acme-app answers 404s");
    assert_eq!(body["alerts"].as_array().unwrap().len(), 1, "{body}");

    // The CLI shows it firing, and the delivery.
    let (ok, text) = alerts_cli(&t, &t.acme, "acme-app");
    assert!(ok, "{text}");
    assert!(text.contains("FIRING NotFoundAnswers since 20"), "{text}");
    assert!(text.contains("acme-app answers 404s"), "{text}");
    assert!(text.contains("delivered (HTTP 200)"), "{text}");
    assert!(
        !text.contains("SpyOnAcme") && !text.contains("Always"),
        "{text}"
    );
    // And so does the dashboard page.
    let link = dashboard_link(&t, &t.acme, &["-a", "acme-app"]).unwrap();
    let cookie = session_of(&t, &link);
    let page = http(
        "GET",
        &t.api,
        "/dashboard/apps/acme-app",
        &[("Cookie", &cookie)],
        b"",
    );
    let page = String::from_utf8_lossy(&page.body).to_string();
    assert!(page.contains(r#"data-alert="NotFoundAnswers""#), "{page}");
    assert!(!page.contains("Always"), "{page}");

    // Evil sees its own alert only; its spy never fires; its webhook is
    // refused without a connection.
    let deadline = Instant::now() + Duration::from_secs(60);
    let text = loop {
        let (ok, text) = alerts_cli(&t, &t.evil, "evil-app");
        assert!(ok, "{text}");
        if text.contains("refused by the egress policy") {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "evil's webhook was never tried: {text}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(text.contains("FIRING Always"), "{text}");
    assert!(
        !text.contains("FIRING SpyOnAcme") && !text.contains("NotFoundAnswers"),
        "{text}"
    );
    assert!(
        trapped.try_recv().is_err(),
        "the refused webhook was dialed"
    );
    let (ok, text) = alerts_cli(&t, &t.evil, "acme-app");
    assert!(!ok && text.contains("no app"), "{text}");

    // The 404s stop: the alert resolves and the webhook hears it.
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    traffic.join().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (_, body) = posts
            .recv_timeout(left)
            .expect("the webhook never heard the alert resolve");
        if body["status"] == "resolved" {
            assert_eq!(body["alerts"][0]["labels"]["alertname"], "NotFoundAnswers");
            break;
        }
    }
    let (_, text) = alerts_cli(&t, &t.acme, "acme-app");
    assert!(text.contains("no alerts firing"), "{text}");
}
