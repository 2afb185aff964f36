//! `hangar edge serve` against origins written here (for counting and
//! faults) and Debian's nginx: routing, forwarding headers, limits, the
//! cache's HTTP semantics, coalescing, stale serving, purges, health,
//! upgrades, HTTP/2 and the disk tier across restarts.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::{
    free_port, http, read_request, require, respond, self_signed, Hangar, HttpResponse,
};

const TOKEN: &str = "test-admin-token";

/// What a test origin answers: status, headers, body, and a delay first.
#[derive(Clone)]
pub(crate) struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub delay: Duration,
}

pub(crate) fn reply(status: u16, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    Reply {
        status,
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        body: body.to_vec(),
        delay: Duration::ZERO,
    }
}

type Handler = dyn Fn(&crate::support::Request) -> Reply + Send + Sync;

/// An origin on a free loopback port that counts requests by path and
/// records the last request's headers.
pub(crate) struct Origin {
    pub addr: String,
    hits: Arc<Mutex<BTreeMap<String, u64>>>,
    pub last: Arc<Mutex<BTreeMap<String, String>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Origin {
    pub fn start(
        handler: impl Fn(&crate::support::Request) -> Reply + Send + Sync + 'static,
    ) -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let hits: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
        let last: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let handler: Arc<Handler> = Arc::new(handler);
        let (h, l, st) = (hits.clone(), last.clone(), stop.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                if st.load(Ordering::SeqCst) {
                    // Stopped: refuse by closing at once, and stop listening.
                    drop(stream);
                    return;
                }
                let (h, l, handler) = (h.clone(), l.clone(), handler.clone());
                std::thread::spawn(move || {
                    let mut stream = stream;
                    let Some(req) = read_request(&mut stream) else {
                        return;
                    };
                    *h.lock().unwrap().entry(req.target.clone()).or_default() += 1;
                    *l.lock().unwrap() = req.headers.clone();
                    let r = handler(&req);
                    std::thread::sleep(r.delay);
                    let headers: Vec<(&str, &str)> = r
                        .headers
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect();
                    let body = if req.method == "HEAD" {
                        &[][..]
                    } else {
                        &r.body[..]
                    };
                    respond(&mut stream, r.status, &headers, body);
                });
            }
        });
        Origin {
            addr,
            hits,
            last,
            stop,
        }
    }

    pub fn hits(&self, path: &str) -> u64 {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    /// Stop answering: the port then refuses connections.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.addr);
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(&self.addr).is_ok() {
            assert!(Instant::now() < deadline, "origin never stopped");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// `hangar edge serve` with a config written from `body` (plus an admin
/// table), killed on drop.
pub(crate) struct Edge {
    child: Child,
    pub addr: String,
    tls: Option<String>,
    admin: String,
}

impl Edge {
    fn start(h: &Hangar, body: &str) -> Edge {
        Edge::start_at(h, 0, body)
    }

    /// On `port` (0: any), its file named after it: several edges of one
    /// home (a mesh) each have their own.
    pub fn start_at(h: &Hangar, port: u16, body: &str) -> Edge {
        let path = h.dir.path().join(format!("edge-{port}.toml"));
        let config = format!("listen = \"127.0.0.1:{port}\"\n{body}\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n");
        std::fs::write(&path, config).unwrap();
        let mut child = h
            .command(&["edge", "serve", "--config", path.to_str().unwrap()])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let (mut addr, mut tls) = (String::new(), None);
        let admin = loop {
            let line = lines.next().expect("hangar edge exited early").unwrap();
            let after = |p: &str| {
                line.split(p)
                    .nth(1)
                    .map(|r| r.split_whitespace().next().unwrap().to_string())
            };
            if let Some(a) = after("serving on http://") {
                addr = a;
            } else if let Some(a) = after("TLS on https://") {
                tls = Some(a);
            } else if let Some(a) = after("purge) on http://") {
                break a;
            }
        };
        std::thread::spawn(move || for _ in lines {});
        Edge {
            child,
            addr,
            tls,
            admin,
        }
    }

    pub fn get(&self, host: &str, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
        self.request("GET", host, path, headers, b"")
    }

    pub fn request(
        &self,
        method: &str,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> HttpResponse {
        let mut all = vec![("Host", host)];
        all.extend_from_slice(headers);
        http(method, &self.addr, path, &all, body)
    }

    pub fn purge(&self, json: &str) -> HttpResponse {
        http(
            "POST",
            &self.admin,
            "/purge",
            &[("Authorization", &format!("Bearer {TOKEN}"))],
            json.as_bytes(),
        )
    }

    fn metrics(&self) -> String {
        // Anyone else is refused: the metrics name every app.
        assert_eq!(http("GET", &self.admin, "/metrics", &[], b"").status, 401);
        let auth = format!("Bearer {TOKEN}");
        let r = http(
            "GET",
            &self.admin,
            "/metrics",
            &[("Authorization", &auth)],
            b"",
        );
        assert_eq!(r.status, 200);
        String::from_utf8(r.body).unwrap()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn host_config(name: &str, backends: &[&str], extra: &str) -> String {
    let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    format!(
        "[[hosts]]\nname = \"{name}\"\nbackends = [{}]\n{extra}\n",
        list.join(", ")
    )
}

fn status_of(r: &HttpResponse) -> String {
    r.header("cache-status").unwrap_or("").to_string()
}

fn text(r: &HttpResponse) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

#[test]
fn routing_forwarding_headers_limits_and_error_pages() {
    let h = Hangar::new();
    let origin = Origin::start(|req| {
        reply(
            200,
            &[("Cache-Control", "no-store")],
            format!("{} {}", req.method, req.target).as_bytes(),
        )
    });
    let dead = format!("127.0.0.1:{}", free_port());
    let config = host_config("app.localhost", &[&origin.addr], "")
        + &host_config("down.localhost", &[&dead], "");
    let edge = Edge::start(
        &h,
        &(config + "[limits]\nmax_body_bytes = \"1KiB\"\nmax_header_bytes = \"4KiB\"\n"),
    );

    let r = edge.get(
        "app.localhost:8080",
        "/hello?x=1",
        &[("X-Forwarded-For", "203.0.113.9")],
    );
    assert_eq!((r.status, text(&r).as_str()), (200, "GET /hello?x=1"));
    let seen = origin.last.lock().unwrap().clone();
    assert_eq!(seen["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], "app.localhost:8080");
    assert_eq!(seen["host"], "app.localhost:8080");
    assert!(seen["via"].contains("hangar"), "{seen:?}");
    assert_eq!(seen["x-request-id"], r.header("x-request-id").unwrap());
    assert!(r.header("via").unwrap().contains("hangar"));
    assert!(status_of(&r).contains("fwd=miss"), "{r:?}");

    // An unknown host: a 404 page naming it.
    let r = edge.get("nope.localhost", "/", &[]);
    assert_eq!(r.status, 404);
    assert!(text(&r).contains("nope.localhost"), "{}", text(&r));

    // A backend that is not there: 502 saying why.
    let r = edge.get("down.localhost", "/", &[]);
    assert_eq!(r.status, 502);
    assert!(
        text(&r).contains(&dead) && text(&r).contains("refused"),
        "{}",
        text(&r)
    );

    // Limits: 413 for a body above the limit, 431 for huge headers.
    let r = edge.request("POST", "app.localhost", "/upload", &[], &[b'x'; 2000]);
    assert_eq!(r.status, 413, "{}", text(&r));
    let big = "y".repeat(10_000);
    let r = edge.get("app.localhost", "/", &[("X-Big", &big)]);
    assert_eq!(r.status, 431);
    // A body under the limit passes through.
    let r = edge.request("POST", "app.localhost", "/upload", &[], b"small");
    assert_eq!((r.status, text(&r).as_str()), (200, "POST /upload"));
}

#[test]
fn retries_timeouts_large_objects_and_live_reload() {
    let h = Hangar::new();
    let big: Vec<u8> = (0..200 * 1024).map(|i| (i % 199) as u8).collect();
    let b = big.clone();
    let one = Origin::start(move |req| match req.target.as_str() {
        "/big" => reply(200, &[("Cache-Control", "max-age=300")], &b),
        "/slow" => Reply {
            delay: Duration::from_millis(1500),
            ..reply(200, &[("Cache-Control", "no-store")], b"one, slowly")
        },
        _ => reply(200, &[("Cache-Control", "no-store")], b"one"),
    });
    let two = Origin::start(|_| reply(200, &[("Cache-Control", "no-store")], b"two"));
    let dead = format!("127.0.0.1:{}", free_port());
    // Backends that take a connection, read the request and hang up without
    // answering (a machine dying with a request in flight).
    let hangup = || {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let taken = Arc::new(AtomicU64::new(0));
        let t = taken.clone();
        std::thread::spawn(move || {
            for mut s in listener.incoming().flatten() {
                let _ = read_request(&mut s);
                t.fetch_add(1, Ordering::SeqCst);
            }
        });
        (addr, taken)
    };
    let (hangup_get, taken_get) = hangup();
    let (hangup_post, taken_post) = hangup();
    let settings = "[limits]\nclient_timeout = \"1s\"\n[cache]\nmax_object = \"64KiB\"\n";
    let edge = Edge::start(
        &h,
        &(settings.to_string()
            + &host_config("app.localhost", &[&dead, &one.addr], "")
            + &host_config("get.localhost", &[&hangup_get, &one.addr], "")
            + &host_config("post.localhost", &[&hangup_post, &one.addr], "")),
    );

    // A backend that refuses connections: every request lands on the other.
    for _ in 0..20 {
        let r = edge.get("app.localhost", "/", &[]);
        assert_eq!((r.status, text(&r).as_str()), (200, "one"));
    }
    // A GET cut off before its answer is sent again to another backend; a
    // POST is not (it may have done its work), so it answers 502.
    for _ in 0..20 {
        let r = edge.get("get.localhost", "/", &[]);
        assert_eq!((r.status, text(&r).as_str()), (200, "one"));
    }
    assert!(
        taken_get.load(Ordering::SeqCst) > 0,
        "the hang-up backend was tried"
    );
    let mut failed = 0;
    for _ in 0..20 {
        let r = http("POST", &edge.addr, "/", &[("Host", "post.localhost")], b"x");
        match r.status {
            200 => assert_eq!(text(&r), "one"),
            502 => failed += 1,
            s => panic!("POST answered {s}: {}", text(&r)),
        }
    }
    assert!(failed > 0, "no POST met the hang-up backend");
    assert_eq!(
        failed,
        taken_post.load(Ordering::SeqCst),
        "each POST was sent once"
    );

    // Above max_object: streamed whole, never stored.
    for _ in 0..2 {
        let r = edge.get("app.localhost", "/big", &[]);
        assert!(r.body == big, "the large body arrived whole");
        assert!(status_of(&r).contains("too-big"), "{:?}", r.headers);
    }
    assert_eq!(one.hits("/big"), 2);
    // A request body that stalls: 408.
    let mut s = TcpStream::connect(&edge.addr).unwrap();
    s.write_all(
        b"POST /upload HTTP/1.1\r\nHost: app.localhost\r\nContent-Length: 100\r\n\r\n0123456789",
    )
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 408");

    // Live reload: a request in flight to the old backend finishes; new
    // requests go to the new one.
    let addr = edge.addr.clone();
    let inflight =
        std::thread::spawn(move || http("GET", &addr, "/slow", &[("Host", "app.localhost")], b""));
    std::thread::sleep(Duration::from_millis(300));
    let config =
        format!("listen = \"{}\"\n", edge.addr) + &host_config("app.localhost", &[&two.addr], "");
    std::fs::write(h.dir.path().join("edge-0.toml"), config).unwrap();
    let out = Command::new("kill")
        .args(["-HUP", &edge.child.id().to_string()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let deadline = Instant::now() + Duration::from_secs(5);
    while text(&edge.get("app.localhost", "/", &[])) != "two" {
        assert!(Instant::now() < deadline, "the reload never took effect");
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = inflight.join().unwrap();
    assert_eq!((r.status, text(&r).as_str()), (200, "one, slowly"));
}

#[test]
fn cache_semantics_against_an_origin() {
    let h = Hangar::new();
    let origin = Origin::start(|req| {
        let path = req.target.as_str();
        match path {
            "/fresh" => reply(
                200,
                &[("Cache-Control", "max-age=300"), ("ETag", "\"e1\"")],
                b"0123456789",
            ),
            "/private" => reply(200, &[("Cache-Control", "private, max-age=300")], b"mine"),
            "/nostore" => reply(200, &[("Cache-Control", "no-store")], b"never"),
            "/auth" => reply(200, &[("Cache-Control", "max-age=300")], b"secret"),
            "/auth-public" => reply(200, &[("Cache-Control", "public, max-age=300")], b"shared"),
            "/vary" => {
                let lang = req
                    .headers
                    .get("accept-language")
                    .cloned()
                    .unwrap_or_default();
                reply(
                    200,
                    &[
                        ("Cache-Control", "max-age=300"),
                        ("Vary", "Accept-Language"),
                    ],
                    lang.as_bytes(),
                )
            }
            _ => reply(404, &[("Cache-Control", "max-age=300")], b"not here"),
        }
    });
    let edge = Edge::start(&h, &host_config("app.localhost", &[&origin.addr], ""));
    let get = |p: &str, hd: &[(&str, &str)]| edge.get("app.localhost", p, hd);

    // Miss, then hit with Age and Cache-Status.
    let r = get("/fresh", &[]);
    assert_eq!(text(&r), "0123456789");
    assert!(status_of(&r).contains("fwd=miss; stored"), "{r:?}");
    let r = get("/fresh", &[]);
    assert!(status_of(&r).contains("hit"), "{r:?}");
    assert!(r.header("age").is_some());
    assert_eq!(origin.hits("/fresh"), 1);
    // Range and HEAD from the cached object; a conditional request gets 304.
    let r = get("/fresh", &[("Range", "bytes=2-5")]);
    assert_eq!((r.status, text(&r).as_str()), (206, "2345"));
    assert_eq!(r.header("content-range"), Some("bytes 2-5/10"));
    let r = get("/fresh", &[("Range", "bytes=20-")]);
    assert_eq!(r.status, 416);
    let r = edge.request("HEAD", "app.localhost", "/fresh", &[], b"");
    assert_eq!((r.status, r.header("content-length")), (200, Some("10")));
    let r = get("/fresh", &[("If-None-Match", "\"e1\"")]);
    assert_eq!(r.status, 304);
    assert_eq!(origin.hits("/fresh"), 1, "all served from the cache");
    // A request no-cache revalidates (the origin answers in full: it
    // does not do conditionals).
    get("/fresh", &[("Cache-Control", "no-cache")]);
    assert_eq!(origin.hits("/fresh"), 2);
    // Credentials: not answered from an entry that does not allow it.
    get("/fresh", &[("Authorization", "Bearer z")]);
    assert_eq!(origin.hits("/fresh"), 3);

    // private and no-store are never stored.
    for p in ["/private", "/nostore"] {
        get(p, &[]);
        get(p, &[]);
        assert_eq!(origin.hits(p), 2, "{p}");
    }
    // Authorization: not shared unless the response says public.
    get("/auth", &[("Authorization", "Bearer a")]);
    get("/auth", &[("Authorization", "Bearer b")]);
    assert_eq!(origin.hits("/auth"), 2);
    get("/auth-public", &[("Authorization", "Bearer a")]);
    let r = get("/auth-public", &[("Authorization", "Bearer b")]);
    assert_eq!(
        (origin.hits("/auth-public"), text(&r).as_str()),
        (1, "shared")
    );
    // Vary: one entry per normalized Accept-Language.
    assert_eq!(text(&get("/vary", &[("Accept-Language", "fr")])), "fr");
    assert_eq!(text(&get("/vary", &[("Accept-Language", "de")])), "de");
    assert_eq!(text(&get("/vary", &[("Accept-Language", "FR")])), "fr");
    assert_eq!(origin.hits("/vary"), 2);
    // Heuristically cacheable 404 with max-age is cached too.
    get("/missing", &[]);
    assert_eq!(get("/missing", &[]).status, 404);
    assert_eq!(origin.hits("/missing"), 1);
    // An unsafe method invalidates the URL.
    let r = edge.request("POST", "app.localhost", "/fresh", &[], b"x");
    assert_eq!(r.status, 200);
    get("/fresh", &[]);
    // Three GETs and the POST so far; the GET after the POST is a miss.
    assert_eq!(origin.hits("/fresh"), 5, "POST invalidated the cached GET");
}

#[test]
fn a_thousand_concurrent_cold_requests_make_one_origin_request() {
    let h = Hangar::new();
    let body: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    let b = body.clone();
    let origin = Origin::start(move |_| Reply {
        delay: Duration::from_millis(500),
        ..reply(200, &[("Cache-Control", "max-age=300")], &b)
    });
    let edge = Arc::new(Edge::start(
        &h,
        &host_config("app.localhost", &[&origin.addr], ""),
    ));
    let ok = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..1000)
        .map(|_| {
            let (edge, ok, body) = (edge.clone(), ok.clone(), body.clone());
            std::thread::Builder::new()
                .stack_size(128 * 1024)
                .spawn(move || {
                    let r = edge.get("app.localhost", "/cold", &[]);
                    if r.status == 200 && r.body == body {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                })
                .unwrap()
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(
        ok.load(Ordering::SeqCst),
        1000,
        "every request got the full body"
    );
    assert_eq!(
        origin.hits("/cold"),
        1,
        "one origin request for 1,000 concurrent misses"
    );
    let m = edge.metrics();
    assert!(
        m.contains("hangar_edge_origin_fetches_total{host=\"app.localhost\"} 1\n"),
        "{m}"
    );
}

#[test]
fn stale_while_revalidate_and_stale_if_error() {
    let h = Hangar::new();
    let n = Arc::new(AtomicU64::new(0));
    let n2 = n.clone();
    let origin = Origin::start(move |req| {
        let v = n2.fetch_add(1, Ordering::SeqCst);
        match req.target.as_str() {
            "/swr" => reply(
                200,
                &[("Cache-Control", "max-age=1, stale-while-revalidate=60")],
                format!("v{v}").as_bytes(),
            ),
            "/sie" => reply(
                200,
                &[("Cache-Control", "max-age=1, stale-if-error=60")],
                b"kept",
            ),
            _ => reply(200, &[("Cache-Control", "max-age=1")], b"plain"),
        }
    });
    let edge = Edge::start(&h, &host_config("app.localhost", &[&origin.addr], ""));
    let first = text(&edge.get("app.localhost", "/swr", &[]));
    edge.get("app.localhost", "/sie", &[]);
    edge.get("app.localhost", "/plain", &[]);
    std::thread::sleep(Duration::from_millis(1300));
    // Stale: served at once, refreshed in the background.
    let r = edge.get("app.localhost", "/swr", &[]);
    assert_eq!(text(&r), first);
    assert!(status_of(&r).contains("stale-while-revalidate"), "{r:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while origin.hits("/swr") < 2 {
        assert!(Instant::now() < deadline, "no background revalidation");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
    let r = edge.get("app.localhost", "/swr", &[]);
    assert_ne!(text(&r), first, "the refreshed copy is served");
    assert!(status_of(&r).contains("hit"));

    // The origin goes down: stale-if-error serves; without it, an error.
    origin.stop();
    let r = edge.get("app.localhost", "/sie", &[]);
    assert_eq!((r.status, text(&r).as_str()), (200, "kept"));
    assert!(status_of(&r).contains("stale-if-error"), "{r:?}");
    let r = edge.get("app.localhost", "/plain", &[]);
    assert_eq!(r.status, 502, "{r:?}");
}

#[test]
fn purge_by_url_prefix_tag_host_and_soft() {
    let h = Hangar::new();
    let origin = Origin::start(|req| {
        let tag = if req.target.starts_with("/blog") {
            "blog"
        } else {
            "other"
        };
        reply(
            200,
            &[
                ("Cache-Control", "max-age=300, stale-while-revalidate=300"),
                ("Surrogate-Key", tag),
                ("Cache-Tag", "all"),
            ],
            req.target.as_bytes(),
        )
    });
    let edge = Edge::start(&h, &host_config("app.localhost", &[&origin.addr], ""));
    let paths = [
        "/blog/1",
        "/blog/2",
        "/static/a.css",
        "/static/b.css",
        "/index",
    ];
    let warm = || {
        for p in paths {
            edge.get("app.localhost", p, &[]);
        }
    };
    warm();
    warm();
    for p in paths {
        assert_eq!(origin.hits(p), 1, "{p}");
    }
    // The admin API wants the token.
    let r = http("POST", &edge.admin, "/purge", &[], br#"{"tag":"blog"}"#);
    assert_eq!(r.status, 401);
    let r = edge.purge(r#"{"host":"app.localhost","url":"http://x/"}"#);
    assert_eq!(r.status, 400, "a full URL is refused with a reason");
    assert!(text(&r).contains("must start with /"));

    let started = Instant::now();
    let r = edge.purge(r#"{"tag":"blog"}"#);
    assert_eq!((r.status, r.json()["purged"].as_u64()), (200, Some(2)));
    assert!(started.elapsed() < Duration::from_secs(1));
    warm();
    assert_eq!((origin.hits("/blog/1"), origin.hits("/index")), (2, 1));

    assert_eq!(
        edge.purge(r#"{"host":"app.localhost","prefix":"/static/"}"#)
            .json()["purged"],
        2
    );
    assert_eq!(
        edge.purge(r#"{"host":"app.localhost","url":"/index"}"#)
            .json()["purged"],
        1
    );
    warm();
    assert_eq!(
        (origin.hits("/static/a.css"), origin.hits("/index")),
        (2, 2)
    );

    // Soft purge: marked stale, stale-while-revalidate keeps serving.
    assert_eq!(
        edge.purge(r#"{"tag":"all","soft":true}"#).json()["purged"],
        5
    );
    let r = edge.get("app.localhost", "/index", &[]);
    assert_eq!((r.status, text(&r).as_str()), (200, "/index"));
    assert!(status_of(&r).contains("stale-while-revalidate"), "{r:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while origin.hits("/index") < 3 {
        assert!(
            Instant::now() < deadline,
            "the soft-purged entry was not refreshed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The whole host.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        edge.purge(r#"{"host":"app.localhost"}"#).json()["purged"],
        5
    );
}

/// Peak resident memory of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn a_body_of_unknown_length_past_max_object_streams_in_bounded_memory() {
    const TOTAL: u64 = 128 << 20;
    // An origin that sends TOTAL bytes chunked (no Content-Length),
    // counting per connection what it managed to write.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let origin = listener.local_addr().unwrap().to_string();
    let written: Arc<Mutex<Vec<Arc<AtomicU64>>>> = Arc::default();
    let w = written.clone();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let count = Arc::new(AtomicU64::new(0));
            w.lock().unwrap().push(count.clone());
            std::thread::spawn(move || {
                let _ = read_request(&mut s);
                let head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nCache-Control: max-age=60\r\n\r\n";
                if s.write_all(head.as_bytes()).is_err() {
                    return;
                }
                let chunk = vec![b'z'; 64 << 10];
                let mut frame = format!("{:x}\r\n", chunk.len()).into_bytes();
                frame.extend_from_slice(&chunk);
                frame.extend_from_slice(b"\r\n");
                while count.load(Ordering::SeqCst) < TOTAL {
                    if s.write_all(&frame).is_err() {
                        return;
                    }
                    count.fetch_add(chunk.len() as u64, Ordering::SeqCst);
                }
                let _ = s.write_all(b"0\r\n\r\n");
            });
        }
    });
    let h = Hangar::new();
    let edge = Edge::start(
        &h,
        &("[cache]\nmax_object = \"1MiB\"\n".to_string()
            + &host_config("app.localhost", &[&origin], "")),
    );
    let get = |read_at_most: u64| {
        let mut s = TcpStream::connect(&edge.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(b"GET /big HTTP/1.0\r\nHost: app.localhost\r\n\r\n")
            .unwrap();
        let (mut got, mut buf) = (0u64, vec![0u8; 256 << 10]);
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n as u64,
            }
            if got >= read_at_most {
                break;
            }
        }
        got
    };
    // Read whole: every byte arrives, and the edge never held the body.
    let got = get(u64::MAX);
    assert!(
        got > TOTAL && got < TOTAL + 4096,
        "{got} bytes with the head"
    );
    let peak = peak_rss_kib(edge.child.id());
    assert!(
        peak < 64 << 10,
        "the edge peaked at {peak} KiB for a 128 MiB body"
    );
    // A client that leaves early: the edge stops reading from the origin
    // (it would otherwise pull the rest into memory for nobody).
    assert!(get(2 << 20) >= 2 << 20);
    let second = written.lock().unwrap()[1].clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let before = second.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(300));
        if second.load(Ordering::SeqCst) == before {
            break;
        }
        assert!(Instant::now() < deadline, "the origin kept being read");
    }
    let sent = second.load(Ordering::SeqCst);
    assert!(
        sent < 48 << 20,
        "the origin sent {sent} bytes for a reader that left after 2 MiB"
    );
}

#[test]
fn a_slow_backend_is_ejected_and_a_failing_check_takes_one_out() {
    let h = Hangar::new();
    let fast1 = Origin::start(|_| reply(200, &[("Cache-Control", "no-store")], b"fast"));
    let fast2 = Origin::start(|_| reply(200, &[("Cache-Control", "no-store")], b"fast"));
    let slow = Origin::start(|_| Reply {
        delay: Duration::from_millis(300),
        ..reply(200, &[("Cache-Control", "no-store")], b"slow")
    });
    let extra = "[hosts.health]\nslow_ratio = 4.0\nslow_floor = \"50ms\"\neject_for = \"10m\"\n";
    let edge = Arc::new(Edge::start(
        &h,
        &host_config(
            "app.localhost",
            &[&fast1.addr, &fast2.addr, &slow.addr],
            extra,
        ),
    ));
    // Four clients in parallel until the slow one has had its 20 samples.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !edge.metrics().contains(&format!(
        "hangar_edge_backend_up{{host=\"app.localhost\",backend=\"{}\"}} 0",
        slow.addr
    )) {
        assert!(
            Instant::now() < deadline,
            "the slow backend was never ejected: {}",
            edge.metrics()
        );
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let e = edge.clone();
                std::thread::spawn(move || {
                    for _ in 0..10 {
                        assert_eq!(e.get("app.localhost", "/", &[]).status, 200);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }
    let before = slow.hits("/");
    for _ in 0..50 {
        assert_eq!(text(&edge.get("app.localhost", "/", &[])), "fast");
    }
    assert_eq!(slow.hits("/"), before, "no traffic to the ejected backend");

    // Active checks: a backend whose /health fails is taken out, with the
    // reason on the 503 page when nothing is left.
    let bad = Origin::start(|req| {
        if req.target == "/health" {
            reply(500, &[], b"sick")
        } else {
            reply(200, &[], b"bad")
        }
    });
    let h2 = Hangar::new();
    let checks = "[hosts.health]\npath = \"/health\"\ninterval = \"100ms\"\ntimeout = \"1s\"\nunhealthy_threshold = 1\n";
    let edge = Edge::start(
        &h2,
        &(host_config("one.localhost", &[&bad.addr], checks)
            + &host_config("two.localhost", &[&bad.addr, &fast1.addr], checks)),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = edge.get("one.localhost", "/", &[]);
        if r.status == 503 {
            assert!(
                text(&r).contains("failing its health check") && text(&r).contains("500"),
                "{}",
                text(&r)
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the failing backend stayed in: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Each host checks its own backends: wait for two.localhost's checker
    // to take the same backend out before asserting it gets no traffic.
    let down = format!(
        "hangar_edge_backend_up{{host=\"two.localhost\",backend=\"{}\"}} 0",
        bad.addr
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !edge.metrics().contains(&down) {
        assert!(Instant::now() < deadline, "{}", edge.metrics());
        std::thread::sleep(Duration::from_millis(50));
    }
    for _ in 0..20 {
        assert_eq!(text(&edge.get("two.localhost", "/", &[])), "fast");
    }
}

#[test]
fn websocket_upgrades_and_http2() {
    require("curl");
    let h = Hangar::new();
    // A WebSocket echo origin: RFC 6455 handshake, then frames echoed.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let ws_addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let Some(req) = read_request(&mut s) else {
                    return;
                };
                if req.headers.get("upgrade").map(|u| u.to_ascii_lowercase())
                    != Some("websocket".into())
                {
                    return respond(&mut s, 200, &[], b"plain");
                }
                // The accept value for RFC 6455's sample key.
                assert_eq!(req.headers["sec-websocket-key"], "dGhlIHNhbXBsZSBub25jZQ==");
                let _ = s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n");
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    // Unmask the client's frame and send it back unmasked.
                    let len = (buf[1] & 0x7f) as usize;
                    let mask = [buf[2], buf[3], buf[4], buf[5]];
                    let payload: Vec<u8> = (0..len).map(|i| buf[6 + i] ^ mask[i % 4]).collect();
                    let mut frame = vec![0x81, len as u8];
                    frame.extend_from_slice(&payload);
                    let _ = s.write_all(&frame);
                }
            });
        }
    });
    let (cert, key) = self_signed(h.dir.path(), "app.localhost");
    let tls = format!(
        "[tls]\nlisten = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\n",
        cert.display(),
        key.display()
    );
    let secure = host_config("secure.localhost", &[&ws_addr], "force_https = true");
    let edge = Edge::start(
        &h,
        &(tls + &host_config("app.localhost", &[&ws_addr], "") + &secure),
    );
    // force_https: plain HTTP is redirected to the TLS listener.
    let r = edge.get("secure.localhost", "/x?y=1", &[]);
    let tls_port = edge
        .tls
        .as_ref()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    assert_eq!(r.status, 308);
    assert_eq!(
        r.header("location"),
        Some(format!("https://secure.localhost:{tls_port}/x?y=1").as_str())
    );

    let mut s = TcpStream::connect(&edge.addr).unwrap();
    s.write_all(b"GET /chat HTTP/1.1\r\nHost: app.localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(
        head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    for msg in ["hello", "over the edge"] {
        let mask = [1u8, 2, 3, 4];
        let mut frame = vec![0x81, 0x80 | msg.len() as u8];
        frame.extend_from_slice(&mask);
        frame.extend(msg.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        s.write_all(&frame).unwrap();
        let mut reply = vec![0u8; 2 + msg.len()];
        s.read_exact(&mut reply).unwrap();
        assert_eq!(&reply[2..], msg.as_bytes());
    }

    // HTTP/2 over TLS (ALPN) and with prior knowledge on the plain port.
    let out = Command::new("curl")
        .args(["-sS", "--http2", "--cacert"])
        .arg(&cert)
        .args([
            "--resolve",
            &format!("app.localhost:{tls_port}:127.0.0.1"),
            "-w",
            "\n%{http_version} %{http_code}",
            &format!("https://app.localhost:{tls_port}/"),
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "plain\n2 200",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let port = edge.addr.rsplit(':').next().unwrap();
    let out = Command::new("curl")
        .args([
            "-sS",
            "--http2-prior-knowledge",
            "-H",
            "Host: app.localhost",
            "-w",
            "\n%{http_version}",
            &format!("http://127.0.0.1:{port}/"),
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "plain\n2",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_disk_cache_survives_a_restart_and_a_kill() {
    let h = Hangar::new();
    let origin = Origin::start(|req| {
        reply(
            200,
            &[("Cache-Control", "max-age=300")],
            req.target.as_bytes(),
        )
    });
    let dir = h.dir.path().join("cache");
    let config = format!("[cache]\ndir = \"{}\"\nmemory = \"1MiB\"\n", dir.display())
        + &host_config("app.localhost", &[&origin.addr], "");
    let mut edge = Edge::start(&h, &config);
    for i in 0..20 {
        assert_eq!(
            edge.get("app.localhost", &format!("/obj/{i}"), &[]).status,
            200
        );
    }
    // Written through to disk in the background.
    let deadline = Instant::now() + Duration::from_secs(10);
    while count_files(&dir.join("objects")) < 20 {
        assert!(Instant::now() < deadline, "objects never reached the disk");
        std::thread::sleep(Duration::from_millis(20));
    }
    edge.kill9();
    let edge = Edge::start(&h, &config);
    for i in 0..20 {
        let r = edge.get("app.localhost", &format!("/obj/{i}"), &[]);
        assert_eq!(text(&r), format!("/obj/{i}"));
        assert!(status_of(&r).contains("hit"), "{r:?}");
    }
    assert_eq!(
        origin.hits("/obj/0"),
        1,
        "served from disk after the restart"
    );
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|d| std::fs::read_dir(d.path()).map(|r| r.count()).unwrap_or(0))
        .sum()
}

#[test]
fn nginx_as_origin_revalidates_with_304() {
    require("nginx");
    let h = Hangar::new();
    let root = h.dir.path().join("www");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("page.html"), "<h1>from nginx</h1>\n").unwrap();
    let port = free_port();
    let conf = h.dir.path().join("nginx.conf");
    let log = h.dir.path().join("access.log");
    std::fs::write(
        &conf,
        format!(
            "daemon off; master_process off; pid {dir}/nginx.pid; error_log {dir}/error.log;\nevents {{}}\nhttp {{ access_log {log} ; client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir}; uwsgi_temp_path {dir}; scgi_temp_path {dir};\n server {{ listen 127.0.0.1:{port}; root {root}; location / {{ add_header Cache-Control \"max-age=1\"; }} }} }}\n",
            dir = h.dir.path().display(),
            log = log.display(),
            root = root.display()
        ),
    )
    .unwrap();
    let nginx = KillOnDrop(
        Command::new("nginx")
            .args(["-c"])
            .arg(&conf)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nginx did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let edge = Edge::start(
        &h,
        &host_config("site.localhost", &[&format!("127.0.0.1:{port}")], ""),
    );
    let r = edge.get("site.localhost", "/page.html", &[]);
    assert_eq!(text(&r), "<h1>from nginx</h1>\n");
    assert!(r.header("etag").is_some());
    std::thread::sleep(Duration::from_millis(1200));
    // Stale: a conditional request, nginx answers 304, the entry is refreshed.
    let r = edge.get("site.localhost", "/page.html", &[]);
    assert_eq!(
        (r.status, text(&r).as_str()),
        (200, "<h1>from nginx</h1>\n")
    );
    assert!(status_of(&r).contains("fwd=stale"), "{r:?}");
    let r = edge.get("site.localhost", "/page.html", &[]);
    assert!(status_of(&r).contains("hit"), "{r:?}");
    drop(nginx);
    let access = std::fs::read_to_string(&log).unwrap();
    let codes: Vec<&str> = access
        .lines()
        .filter_map(|l| l.split('"').nth(2))
        .map(|s| s.split_whitespace().next().unwrap_or(""))
        .collect();
    assert_eq!(codes, vec!["200", "304"], "{access}");
}

/// A peer process, killed when the test ends (passing or not).
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_backend_at_its_hard_limit_takes_no_more_requests() {
    let h = Hangar::new();
    let slow = Origin::start(|_| Reply {
        delay: Duration::from_millis(1000),
        ..reply(200, &[("Cache-Control", "no-store")], b"done")
    });
    let edge = Arc::new(Edge::start(
        &h,
        &(host_config("app.localhost", &[&slow.addr], "hard_limit = 1")
            + &host_config(
                "short.localhost",
                &[&slow.addr],
                "hard_limit = 1\nqueue_timeout = \"200ms\"",
            )),
    ));
    // One request in flight: the next one waits in line for it, then is
    // served by the same backend.
    let e = edge.clone();
    let first = std::thread::spawn(move || e.get("app.localhost", "/a", &[]));
    std::thread::sleep(Duration::from_millis(300));
    let r = edge.get("app.localhost", "/b", &[]);
    assert_eq!((r.status, text(&r).as_str()), (200, "done"), "{r:?}");
    let r = first.join().unwrap();
    assert_eq!((r.status, text(&r).as_str()), (200, "done"));
    assert_eq!(slow.hits("/a") + slow.hits("/b"), 2);
    // A line that does not move within queue_timeout: 503 saying why.
    let e = edge.clone();
    let first = std::thread::spawn(move || e.get("short.localhost", "/c", &[]));
    std::thread::sleep(Duration::from_millis(300));
    let r = edge.get("short.localhost", "/d", &[]);
    assert_eq!(r.status, 503, "{r:?}");
    assert!(
        text(&r).contains("hard limit of 1") && text(&r).contains("waited 200ms"),
        "{}",
        text(&r)
    );
    assert_eq!(
        slow.hits("/d"),
        0,
        "the refused request never reached the backend"
    );
    assert_eq!(first.join().unwrap().status, 200);
    // With room again, requests are taken at once.
    assert_eq!(text(&edge.get("short.localhost", "/e", &[])), "done");
}

#[test]
fn an_early_hints_interim_response_is_never_stored_nor_mistaken_for_the_final_one() {
    // An origin that sends 103 Early Hints, then the final response.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let origin = listener.local_addr().unwrap().to_string();
    let asked = Arc::new(AtomicU64::new(0));
    let a = asked.clone();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let a = a.clone();
            std::thread::spawn(move || {
                while read_request(&mut s).is_some() {
                    a.fetch_add(1, Ordering::SeqCst);
                    let interim =
                        "HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n";
                    let last = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nCache-Control: max-age=60\r\n\r\nhello";
                    if s.write_all(interim.as_bytes()).is_err()
                        || s.write_all(last.as_bytes()).is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    let h = Hangar::new();
    let edge = Edge::start(&h, &host_config("app.localhost", &[&origin], ""));
    let first = edge.get("app.localhost", "/page", &[]);
    assert_eq!((first.status, text(&first).as_str()), (200, "hello"));
    assert!(
        status_of(&first).contains("stored"),
        "{}",
        status_of(&first)
    );
    // The hint's fields belong to the hint, not to the response (RFC 8297).
    assert_eq!(first.header("link"), None);
    let again = edge.get("app.localhost", "/page", &[]);
    assert_eq!((again.status, text(&again).as_str()), (200, "hello"));
    assert!(status_of(&again).contains("hit"), "{}", status_of(&again));
    assert_eq!(again.header("link"), None);
    assert_eq!(asked.load(Ordering::SeqCst), 1);
}
