//! The deploy guard on a real node: a new release that answers 500 on one
//! route, under live traffic through the edge, is stopped mid-rollout and
//! rolled back, the release naming the figures; a good one goes through.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::operate::TwoOrgs;
use crate::support::*;

/// A release of a web app whose `/cgi-bin/api` answers `api_status`.
fn release(t: &TwoOrgs, api_status: &str, window: f64) -> (u16, String) {
    let image = crate::machine::busybox_image(&t.node.h);
    let script = format!(
        "mkdir -p /www/cgi-bin && echo home > /www/index.html && \
         printf '#!/bin/sh\\necho \"Status: {api_status}\"\\necho \"Content-Type: text/plain\"\\necho\\necho api\\n' > /www/cgi-bin/api && \
         chmod +x /www/cgi-bin/api && exec httpd -f -p 8080 -h /www"
    );
    let r = t.call(
        &t.admin,
        "POST",
        "/v1/apps/acme-app/deploy",
        &json!({
            "image": image,
            "count": 2,
            "max_unavailable": 1,
            "config": {"init": {"cmd": ["sh", "-c", script]}, "services": [{"internal_port": 8080}]},
            "guard": {"window": window},
        }),
    );
    (r.status, String::from_utf8_lossy(&r.body).to_string())
}

#[test]
fn a_release_that_answers_500_on_one_route_is_stopped_and_rolled_back() {
    let t = TwoOrgs::start();
    let (status, body) = release(&t, "200 OK", 5.0);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"ok\":true"), "{body}");

    // Users all along: the home page and the API, in turn.
    let answers: Arc<Mutex<Vec<(bool, u16)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (edge, answers, stop) = (t.node.edge.clone(), answers.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut api = false;
            while !stop.load(Ordering::Relaxed) {
                let path = if api { "/cgi-bin/api" } else { "/" };
                let r = http("GET", &edge, path, &[("Host", "acme-app.localhost")], b"");
                answers.lock().unwrap().push((api, r.status));
                api = !api;
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while answers
        .lock()
        .unwrap()
        .iter()
        .filter(|a| a.1 == 200)
        .count()
        < 100
    {
        assert!(Instant::now() < deadline, "the first release never served");
        std::thread::sleep(Duration::from_millis(100));
    }

    // v2 breaks the API: the guard stops it and names the figures.
    let (status, body) = release(&t, "500 Internal Server Error", 15.0);
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("\"ok\":false"),
        "the broken release went through: {body}"
    );
    assert!(
        body.contains("the deploy guard stopped v2") && body.contains("error ratio"),
        "{body}"
    );
    let releases = t
        .call(&t.admin, "GET", "/v1/apps/acme-app/releases", &json!({}))
        .json();
    let v2 = releases
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["version"] == 2)
        .unwrap()
        .clone();
    assert_eq!(v2["status"], "failed", "{v2}");
    let why = v2["description"].as_str().unwrap();
    eprintln!("v2: {why}");
    assert!(
        why.contains("% of") && why.contains("for the old release"),
        "the release does not name the figures: {why}"
    );
    // The app runs v1 again, on two machines, and the API answers 200.
    let machines: Vec<Value> = t
        .call(&t.admin, "GET", "/v1/machines", &json!({}))
        .json()
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["app"] == "acme-app" && m["state"] != "destroyed")
        .cloned()
        .collect();
    assert_eq!(machines.len(), 2, "{machines:?}");
    assert!(machines.iter().all(|m| m["release"] == 1), "{machines:?}");
    let seen = answers.lock().unwrap().len();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let tail: Vec<(bool, u16)> = answers.lock().unwrap()[seen..].to_vec();
        let api: Vec<u16> = tail.iter().filter(|a| a.0).map(|a| a.1).collect();
        if api.len() >= 20 && api[api.len() - 20..].iter().all(|s| *s == 200) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the API did not recover: {api:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // A good release goes through, the guard saying what it saw.
    let (status, body) = release(&t, "200 OK", 5.0);
    stop.store(true, Ordering::Relaxed);
    traffic.join().unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"ok\":true"), "{body}");
    assert!(body.contains("deploy guard: v3 answered"), "{body}");
    assert!(body.contains("no worse"), "{body}");
}
