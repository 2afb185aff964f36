//! The CDN as a cluster: `hangar edge serve` processes joined in a mesh
//! (three regions of two edges on loopback, as `bench/cdn.sh` runs them)
//! in front of a counting origin: one origin request for a URL cold
//! everywhere, the shard owner killed, the tiers named in `Cache-Status`,
//! hops that a client cannot fake, and the targeted cache fields.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::edge::{reply, Edge, Origin, Reply};
use crate::support::{free_port, Hangar};

const MESH_TOKEN: &str = "mesh-token-for-the-tests";

/// Six edges: ams (a1, a2), fra (f1, f2), lon (l1, l2); the origin is a
/// backend of the fra edges only (the app's machines are there), the
/// others reach it through them. `host_extra` goes into the host's table.
struct Mesh {
    edges: Vec<(String, Edge)>,
}

const NODES: [(&str, &str); 6] = [
    ("a1", "ams"),
    ("a2", "ams"),
    ("f1", "fra"),
    ("f2", "fra"),
    ("l1", "lon"),
    ("l2", "lon"),
];

impl Mesh {
    fn start(h: &Hangar, origin: &Origin, host_extra: &str) -> Mesh {
        Mesh::start_hosts(h, |_, region| {
            let (backends, elsewhere) = if region == "fra" {
                (format!("\"{}\"", origin.addr), "")
            } else {
                (String::new(), "elsewhere = [\"f1\", \"f2\"]\n")
            };
            format!(
                "[[hosts]]\nname = \"app.localhost\"\nbackends = [{backends}]\n{elsewhere}{host_extra}\n"
            )
        })
    }

    /// Six edges, each with the hosts `hosts(node, region)` gives.
    fn start_hosts(h: &Hangar, hosts: impl Fn(&str, &str) -> String) -> Mesh {
        Mesh::start_with(h, hosts, |_, _| 0)
    }

    /// The same, with `delay(from, to)` ms injected between regions.
    fn start_with(
        h: &Hangar,
        hosts: impl Fn(&str, &str) -> String,
        delay: impl Fn(&str, &str) -> u64,
    ) -> Mesh {
        let ports: Vec<u16> = NODES.iter().map(|_| free_port()).collect();
        let mut edges = Vec::new();
        for (i, (name, region)) in NODES.iter().enumerate() {
            let mut peers = String::new();
            for (j, (n, r)) in NODES.iter().enumerate() {
                if i != j {
                    peers.push_str(&format!(
                        "[[mesh.peers]]\nname = \"{n}\"\nregion = \"{r}\"\naddr = \"127.0.0.1:{}\"\ndelay = \"{}ms\"\n",
                        ports[j],
                        delay(region, r)
                    ));
                }
            }
            let body = format!(
                "{}[mesh]\nnode = \"{name}\"\nregion = \"{region}\"\ntoken = \"{MESH_TOKEN}\"\n{peers}",
                hosts(name, region)
            );
            edges.push((name.to_string(), Edge::start_at(h, ports[i], &body)));
        }
        // Every edge answers a ping of every other before the test starts.
        std::thread::sleep(Duration::from_millis(1500));
        Mesh { edges }
    }

    fn edge(&self, name: &str) -> &Edge {
        &self.edges.iter().find(|(n, _)| n == name).unwrap().1
    }
}

fn cache_status(r: &crate::support::HttpResponse) -> String {
    r.header("cache-status").unwrap_or("").to_string()
}

#[test]
fn a_url_cold_in_every_region_makes_one_origin_request_through_the_shield() {
    let h = Hangar::new();
    let origin = Origin::start(|_| Reply {
        delay: Duration::from_millis(400),
        ..reply(200, &[("Cache-Control", "max-age=300")], b"shared")
    });
    let mesh = Arc::new(Mesh::start(&h, &origin, "cache.shield = \"fra\"\n"));

    // Every edge of every region asked at once, four times each.
    let ok = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..24)
        .map(|i| {
            let (mesh, ok) = (mesh.clone(), ok.clone());
            std::thread::spawn(move || {
                let r = mesh.edges[i % 6].1.get("app.localhost", "/cold", &[]);
                if r.status == 200 && r.body == b"shared" {
                    ok.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(ok.load(Ordering::SeqCst), 24);
    assert_eq!(
        origin.hits("/cold"),
        1,
        "one origin request for the cluster"
    );

    // A miss at a lon edge names each tier that answered: the shield (a
    // fra node) fetched, lon's owner and the front edge stored.
    let r = mesh.edge("l1").get("app.localhost", "/path-2", &[]);
    let status = cache_status(&r);
    assert!(
        status.contains("/shield; fwd=miss") && status.contains("hangar/l1/front;"),
        "{status}"
    );
    let shield = status
        .split(", ")
        .find(|e| e.contains("/shield;"))
        .and_then(|e| e.split('/').nth(1))
        .unwrap();
    assert!(shield.starts_with('f'), "the shield is in fra: {status}");
    // Then a hit at the front, named so.
    let r = mesh.edge("l1").get("app.localhost", "/path-2", &[]);
    assert_eq!(cache_status(&r), "hangar/l1/front; hit");
    assert_eq!(origin.hits("/path-2"), 1);
}

#[test]
fn the_owner_of_a_key_killed_the_next_in_hash_order_fills() {
    let h = Hangar::new();
    let origin = Origin::start(|_| reply(200, &[("Cache-Control", "max-age=300")], b"x"));
    let mut mesh = Mesh::start(&h, &origin, "cache.shield = \"fra\"\n");
    // Kill f1 (-9): half the keys had it as their shield owner.
    let (_, f1) = mesh.edges.iter_mut().find(|(n, _)| n == "f1").unwrap();
    f1.kill9();
    for i in 0..30 {
        let path = format!("/after-kill/{i}");
        let r = mesh.edge("a1").get("app.localhost", &path, &[]);
        assert_eq!(r.status, 200, "{path}: {}", cache_status(&r));
        let status = cache_status(&r);
        assert!(!status.contains("/f1/"), "{path}: {status}");
        assert!(
            status.contains("hangar/f2/shield; fwd=miss"),
            "{path}: {status}"
        );
        assert_eq!(origin.hits(&path), 1, "{path}");
    }
}

#[test]
fn hops_cannot_be_faked_and_the_app_learns_the_client_and_region() {
    let h = Hangar::new();
    let origin = Origin::start(|_| reply(200, &[("Cache-Control", "no-store")], b"fresh"));
    let mesh = Mesh::start(&h, &origin, "");
    // A client that claims to be another edge's origin hop, with the
    // wrong token, and that names a region and an address of its choice.
    let r = mesh.edge("l2").get(
        "app.localhost",
        "/who",
        &[
            ("Hangar-Hop", "guessed-token origin"),
            ("Hangar-Region", "evil"),
            ("Hangar-Client-IP", "10.9.9.9"),
        ],
    );
    assert_eq!(r.status, 200);
    let seen = origin.last.lock().unwrap().clone();
    assert_eq!(seen.get("hangar-region").map(String::as_str), Some("lon"));
    assert_eq!(
        seen.get("hangar-client-ip").map(String::as_str),
        Some("127.0.0.1")
    );
    assert!(
        !seen.contains_key("hangar-hop"),
        "the hop header never reaches an app: {seen:?}"
    );
    // And it went to fra (the only machines), uncached.
    assert_eq!(origin.hits("/who"), 1);
}

#[test]
fn targeted_cache_fields_rule_the_edge_and_stay_between_edges() {
    let h = Hangar::new();
    let origin = Origin::start(|req| match req.target.as_str() {
        // The browser must not store it; the edges may, for a minute.
        "/targeted" => reply(
            200,
            &[
                ("Cache-Control", "no-store"),
                ("Hangar-CDN-Cache-Control", "max-age=60"),
                ("CDN-Cache-Control", "no-store"),
            ],
            b"t",
        ),
        // Surrogate-Control's max-age beats Cache-Control's 0 here.
        "/surrogate" => reply(
            200,
            &[
                ("Cache-Control", "max-age=0"),
                ("Surrogate-Control", "max-age=60"),
            ],
            b"s",
        ),
        _ => reply(404, &[], b""),
    });
    let mesh = Mesh::start(&h, &origin, "");
    for path in ["/targeted", "/surrogate"] {
        for _ in 0..3 {
            let r = mesh.edge("a1").get("app.localhost", path, &[]);
            assert_eq!(r.status, 200);
            // Meant for Hangar's edges alone: never handed to a client.
            assert!(
                r.header("hangar-cdn-cache-control").is_none(),
                "{:?}",
                r.headers
            );
            assert!(r.header("surrogate-control").is_none(), "{:?}", r.headers);
        }
        assert_eq!(origin.hits(path), 1, "{path} is cached by the edges");
    }
    // CDN-Cache-Control is for every CDN: passed on to the client.
    let r = mesh.edge("a1").get("app.localhost", "/targeted", &[]);
    assert_eq!(r.header("cdn-cache-control"), Some("no-store"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
}

#[test]
fn a_replay_header_sends_the_request_to_the_region_or_instance_it_names_once() {
    let h = Hangar::new();
    // The app's machine in ams is a read replica: writes go to fra, where
    // the primary is; fra answers what it got.
    let replica = Origin::start(|req| match req.target.as_str() {
        "/write" | "/loop" => reply(200, &[("Hangar-Replay", "region=fra")], b"not here"),
        "/pin" => reply(200, &[("Hangar-Replay", "instance=fra-m1")], b"not here"),
        _ => reply(200, &[("Cache-Control", "no-store")], b"replica"),
    });
    let primary = Origin::start(|req| {
        let body = format!(
            "primary got {} {} ({} bytes) replayed by {}",
            req.method,
            req.target,
            req.body.len(),
            req.headers
                .get("hangar-replayed")
                .map(String::as_str)
                .unwrap_or("-")
        );
        if req.target == "/loop" {
            return reply(200, &[("Hangar-Replay", "region=ams")], b"and back");
        }
        reply(200, &[("Cache-Control", "no-store")], body.as_bytes())
    });
    let (r, p) = (replica.addr.clone(), primary.addr.clone());
    let mesh = Mesh::start_hosts(&h, move |_, region| {
        let (backends, instances, elsewhere) = match region {
            "ams" => (
                format!("\"{r}\""),
                format!("instances = {{ \"ams-m1\" = \"{r}\" }}\ninstances_elsewhere = {{ \"fra-m1\" = \"f1\" }}\n"),
                "elsewhere = [\"f1\", \"f2\"]\n",
            ),
            "fra" => (
                format!("\"{p}\""),
                format!("instances = {{ \"fra-m1\" = \"{p}\" }}\n"),
                "elsewhere = [\"a1\", \"a2\"]\n",
            ),
            _ => (
                String::new(),
                "instances_elsewhere = { \"fra-m1\" = \"f1\" }\n".to_string(),
                "elsewhere = [\"a1\", \"a2\", \"f1\", \"f2\"]\n",
            ),
        };
        format!("[[hosts]]\nname = \"app.localhost\"\nbackends = [{backends}]\n{elsewhere}{instances}\n")
    });
    // A POST with a body at an ams edge, replayed to fra, body and all.
    let a1 = mesh.edge("a1");
    let r = a1.request("POST", "app.localhost", "/write", &[], b"0123456789");
    assert_eq!(r.status, 200);
    assert_eq!(
        String::from_utf8_lossy(&r.body),
        "primary got POST /write (10 bytes) replayed by a1"
    );
    assert!(r.header("hangar-replay").is_none(), "{:?}", r.headers);
    // To one instance, by its id.
    let r = a1.get("app.localhost", "/pin", &[]);
    assert_eq!(
        (r.status, String::from_utf8_lossy(&r.body).into_owned()),
        (
            200,
            "primary got GET /pin (0 bytes) replayed by a1".to_string()
        )
    );
    // A client may ask for an instance too, at any edge.
    let r = mesh.edge("l2").get(
        "app.localhost",
        "/read",
        &[("Hangar-Force-Instance-Id", "fra-m1")],
    );
    assert!(
        String::from_utf8_lossy(&r.body).starts_with("primary got GET /read"),
        "{:?}",
        r.body
    );
    let r = mesh.edge("l2").get(
        "app.localhost",
        "/read",
        &[("Hangar-Force-Instance-Id", "nope")],
    );
    assert_eq!(r.status, 503);
    assert!(String::from_utf8_lossy(&r.body).contains("no machine \"nope\""));
    // Asked to replay a replayed request: once is the limit.
    let r = a1.get("app.localhost", "/loop", &[]);
    assert_eq!(r.status, 508, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(primary.hits("/loop"), 1);
    assert_eq!(replica.hits("/loop"), 1);
}

#[test]
fn rate_limits_per_client_and_per_app_counted_per_region_and_per_tenant() {
    let h = Hangar::new();
    let origin = Origin::start(|_| reply(200, &[("Cache-Control", "no-store")], b"ok"));
    let o = origin.addr.clone();
    let mesh = Mesh::start_hosts(&h, move |_, _| {
        format!(
            "[[hosts]]\nname = \"greedy.localhost\"\nbackends = [\"{o}\"]\nrate_limit = {{ per_client = 1, per_client_burst = 5 }}\n\
             [[hosts]]\nname = \"busy.localhost\"\nbackends = [\"{o}\"]\nrate_limit = {{ per_app = 2, per_app_burst = 20 }}\n\
             [[hosts]]\nname = \"calm.localhost\"\nbackends = [\"{o}\"]\n"
        )
    });
    let a1 = mesh.edge("a1");
    let statuses = |edge: &Edge, host: &str, n: usize| -> Vec<u16> {
        (0..n).map(|_| edge.get(host, "/", &[]).status).collect()
    };
    // A client past its burst of 5 (1/s after it): 429, told when to come
    // back. (Slow rates: a slow machine refills a token a second at most.)
    let got = statuses(a1, "greedy.localhost", 5);
    assert_eq!(got, [200; 5]);
    let r = (0..3)
        .map(|_| a1.get("greedy.localhost", "/", &[]))
        .find(|r| r.status == 429)
        .expect("no 429 past the burst");
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert_eq!(retry, 1);
    assert!(String::from_utf8_lossy(&r.body).contains("rate limit"));
    // Another tenant's app at the same edge, same client: not slowed.
    assert!(statuses(a1, "calm.localhost", 30).iter().all(|s| *s == 200));
    // The app's burst of 20 is the region's: each of ams's two edges lets
    // 10 by (and 1/s after).
    let ams: Vec<u16> = [
        statuses(a1, "busy.localhost", 12),
        statuses(mesh.edge("a2"), "busy.localhost", 12),
    ]
    .concat();
    let passed = ams.iter().filter(|s| **s == 200).count();
    assert!((20..=22).contains(&passed), "{ams:?}");
    // Another region counts its own.
    let lon = statuses(mesh.edge("l1"), "busy.localhost", 10);
    assert!(lon.iter().all(|s| *s == 200), "{lon:?}");
}

#[test]
fn a_region_that_dies_or_gets_slow_is_avoided_without_errors() {
    let h = Hangar::new();
    let slow = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = slow.clone();
    let ams = Origin::start(move |_| Reply {
        delay: if s.load(Ordering::SeqCst) {
            Duration::from_millis(800)
        } else {
            Duration::ZERO
        },
        ..reply(200, &[("Cache-Control", "no-store")], b"ams")
    });
    let fra = Origin::start(|_| reply(200, &[("Cache-Control", "no-store")], b"fra"));
    let (a, f) = (ams.addr.clone(), fra.addr.clone());
    // lon has no machine: ams is nearer (10 ms) than fra (30 ms).
    let mesh = Mesh::start_with(
        &h,
        move |_, region| {
            let (backends, elsewhere) = match region {
                "ams" => (format!("\"{a}\""), "[\"f1\", \"f2\"]"),
                "fra" => (format!("\"{f}\""), "[\"a1\", \"a2\"]"),
                _ => (String::new(), "[\"a1\", \"a2\", \"f1\", \"f2\"]"),
            };
            format!("[[hosts]]\nname = \"app.localhost\"\nbackends = [{backends}]\nelsewhere = {elsewhere}\n")
        },
        |from, to| match (from, to) {
            (x, y) if x == y => 0,
            ("lon", "ams") | ("ams", "lon") => 10,
            _ => 30,
        },
    );
    let body = |r: &crate::support::HttpResponse| String::from_utf8_lossy(&r.body).into_owned();
    let l1 = mesh.edge("l1");
    // Traffic as usual first: each lon edge learns how fast ams answers.
    for edge in ["l1", "l2"] {
        for _ in 0..5 {
            let r = mesh.edge(edge).get("app.localhost", "/", &[]);
            assert_eq!(body(&r), "ams", "the nearest region");
        }
    }
    // ams gets slow: within a few answers lon goes to fra, with no error.
    slow.store(true, Ordering::SeqCst);
    let answers: Vec<(u16, String, Duration)> = (0..12)
        .map(|_| {
            let t = std::time::Instant::now();
            let r = l1.get("app.localhost", "/", &[]);
            (r.status, body(&r), t.elapsed())
        })
        .collect();
    assert!(answers.iter().all(|(s, _, _)| *s == 200), "{answers:?}");
    let slow_ones = answers
        .iter()
        .filter(|(_, _, t)| *t > Duration::from_millis(600))
        .count();
    assert!(
        slow_ones <= 4,
        "lon kept going to the slow region: {answers:?}"
    );
    assert!(
        answers[6..].iter().all(|(_, b, _)| b == "fra"),
        "{answers:?}"
    );
    // ams's machines all die while its own clients send requests: every
    // request is still answered (from fra).
    slow.store(false, Ordering::SeqCst);
    let a1 = mesh.edge("a1");
    assert_eq!(body(&a1.get("app.localhost", "/", &[])), "ams");
    ams.stop();
    let after: Vec<(u16, String)> = (0..20)
        .map(|_| {
            let r = a1.get("app.localhost", "/", &[]);
            (r.status, body(&r))
        })
        .collect();
    assert!(
        after.iter().all(|(s, b)| *s == 200 && b == "fra"),
        "{after:?}"
    );
}
