//! A cluster on one host, as root: three etcd members and three nodes
//! (`n1` in ams, `n2` and `n3` in fra), each node in a network namespace of
//! its own, joined by a bridge in another ("the wire", 10.77.0.0/24), with
//! its etcd member beside it. Nothing is sent outside these namespaces.
//! Machines of one org on different nodes reach each other over the
//! private network; another org's machine and a host on the wire that is
//! no node reach nothing; a lost etcd member stops nothing, a lost quorum
//! stops writes with an error that says so; a node killed with `kill -9`
//! has its app's machines replaced in its region, and removes them from
//! its host when it comes back.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::machine::{announced, busybox_image, host_lock, require_root, vm_kernel};
use crate::support::*;

/// The lease a node's membership lives under (`LEASE_TTL`).
const LEASE: Duration = Duration::from_secs(5);

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The namespaces and the wire; removed on drop.
pub(crate) struct Wire {
    wire: String,
    nodes: Vec<String>,
    pub(crate) stranger: String,
}

impl Wire {
    fn new(n: usize) -> Wire {
        let tag = std::process::id() % 100_000;
        let w = Wire {
            wire: format!("hcw{tag}"),
            nodes: (1..=n).map(|i| format!("hcn{tag}-{i}")).collect(),
            stranger: format!("hcx{tag}"),
        };
        ip(&["netns", "add", &w.wire]);
        ip(&["-n", &w.wire, "link", "add", "w0", "type", "bridge"]);
        ip(&["-n", &w.wire, "link", "set", "w0", "up"]);
        let hosts = w
            .nodes
            .iter()
            .enumerate()
            .map(|(i, ns)| (ns.clone(), i + 1))
            .chain([(w.stranger.clone(), 9)]);
        for (ns, host) in hosts {
            ip(&["netns", "add", &ns]);
            let port = format!("v{host}");
            ip(&[
                "-n", &w.wire, "link", "add", &port, "type", "veth", "peer", "name", "u0", "netns",
                &ns,
            ]);
            ip(&["-n", &w.wire, "link", "set", &port, "master", "w0", "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.77.0.{host}/24"),
                "dev",
                "u0",
            ]);
            ip(&["-n", &ns, "link", "set", "u0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        w
    }
}

impl Drop for Wire {
    fn drop(&mut self) {
        for ns in self.nodes.iter().chain([&self.wire, &self.stranger]) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// One node of the cluster: `hangar up` in its namespace.
pub(crate) struct ClusterNode {
    pub(crate) h: Hangar,
    args: Vec<String>,
    child: Option<Child>,
}

impl ClusterNode {
    fn start(netns: &str, i: usize, region: &str, etcd: &str) -> ClusterNode {
        let mut h = Hangar::new();
        h.netns = Some(netns.to_string());
        let addr = format!("10.77.0.{i}:4280");
        let args = [
            "up",
            "--listen",
            &addr,
            "--advertise",
            &format!("http://{addr}"),
            "--registry-listen",
            &format!("10.77.0.{i}:5000"),
            "--edge-listen",
            &format!("10.77.0.{i}:8080"),
            "--edge-admin-listen",
            "127.0.0.1:0",
            "--etcd",
            etcd,
            "--node",
            &format!("n{i}"),
            "--region",
            region,
            "--memory-mb",
            "4096",
        ]
        .map(String::from)
        .to_vec();
        let mut node = ClusterNode {
            h,
            args,
            child: None,
        };
        node.up();
        node
    }

    fn up(&mut self) {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let mut child = self
            .h
            .command(&args)
            .env("HANGAR_VM_KERNEL", vm_kernel())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        announced(&mut child);
        self.child = Some(child);
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A field of machine `id`'s status, as text.
    fn addr(&self, id: &str, field: &str) -> String {
        self.status(id)[field].as_str().unwrap().to_string()
    }

    fn status(&self, id: &str) -> Value {
        serde_json::from_str(&self.h.ok(&["machine", "status", id, "--json"])).unwrap()
    }

    /// Wait (60 s at most) until `f` holds of machine `id`.
    fn wait_for(&self, id: &str, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = self.status(id);
            if f(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "machine {id} never got {what}: {s}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Create app `app` of `org` (busybox), its hangar.toml in the home.
    fn launch(&self, app: &str, org: &str) {
        let path = self.h.dir.path().join(app);
        std::fs::create_dir_all(&path).unwrap();
        self.h.ok(&[
            "launch",
            "--image",
            "localhost/busybox:test",
            "--name",
            app,
            "--org",
            org,
            "--path",
            path.to_str().unwrap(),
        ]);
    }

    /// A machine of `app` in `region` serving /www on port 8080; its id.
    fn run(&self, app: &str, region: &str) -> String {
        self.run_image("localhost/busybox:test", app, region)
    }

    /// The same, of `image`.
    fn run_image(&self, image: &str, app: &str, region: &str) -> String {
        self.h
            .ok(&[
                "machine", "run", image, "--app", app, "--region", region, "--", "httpd", "-f",
                "-p", "8080", "-h", "/www",
            ])
            .trim()
            .to_string()
    }

    /// A GET of port 8080 at `addr` from inside machine `id` with nc (not
    /// through the egress proxy); the page, or None.
    fn fetch(&self, id: &str, addr: &str) -> Option<String> {
        let script = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {addr} 8080");
        let out = self
            .h
            .run(&["machine", "exec", id, "--", "/bin/sh", "-c", &script]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (head, body) = text.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.1 200").then(|| body.to_string())
    }
}

impl Drop for ClusterNode {
    /// Its machines go with it (the others' nodes see to theirs).
    fn drop(&mut self) {
        if self.child.is_none() {
            self.up();
        }
        let name = self.args[self.args.iter().position(|a| a == "--node").unwrap() + 1].clone();
        let list = self.h.run(&["machine", "list", "--json"]);
        let list: Value = serde_json::from_slice(&list.stdout).unwrap_or_default();
        for m in list.as_array().into_iter().flatten() {
            if m["node"] == name.as_str() {
                let id = m["id"].as_str().unwrap_or("");
                let _ = self.h.run(&["machine", "destroy", id, "--force"]);
            }
        }
        self.kill9();
    }
}

const PAGE: &str = "hello from a machine\n";

/// Three nodes, n1 in ams, n2 and n3 in fra, each in its namespace with its
/// etcd member beside it, busybox loaded at each. Bind them in this order:
/// the nodes go first, the namespaces last.
pub(crate) fn three_nodes() -> (
    Wire,
    tempfile::TempDir,
    hangar_cluster::members::Members,
    Vec<ClusterNode>,
) {
    let wire = Wire::new(3);
    let dir = tempfile::tempdir().unwrap();
    let at: Vec<(String, String)> = wire
        .nodes
        .iter()
        .enumerate()
        .map(|(i, ns)| (ns.clone(), format!("10.77.0.{}", i + 1)))
        .collect();
    let etcd = hangar_cluster::members::Members::start_in(dir.path(), &at).unwrap();
    let endpoints = etcd.endpoints();
    let regions = ["ams", "fra", "fra"];
    let nodes: Vec<ClusterNode> = wire
        .nodes
        .iter()
        .enumerate()
        .map(|(i, ns)| ClusterNode::start(ns, i + 1, regions[i], &endpoints))
        .collect();
    for n in &nodes {
        busybox_image(&n.h);
    }
    (wire, dir, etcd, nodes)
}

/// A GET of `path` on `host` at node `i`'s edge, from the host on the wire
/// that is no node (a client): status and body.
fn edge_get(wire: &Wire, i: usize, host: &str, path: &str) -> (u16, String) {
    let out = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", wire.stranger))
        .args(["curl", "-s", "-m", "10", "-w", "\n%{http_code}", "-H"])
        .arg(format!("Host: {host}"))
        .arg(format!("http://10.77.0.{i}:8080{path}"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (status.trim().parse().unwrap_or(0), body.to_string())
}

#[test]
fn three_nodes_in_two_regions_share_one_private_network_per_org_and_survive_losses() {
    require_root();
    require("etcd");
    require("curl");
    let _lock = host_lock();
    let (wire, _dir, mut etcd, mut nodes) = three_nodes();
    let n1 = &nodes[0];
    for (app, org) in [("web", "acme"), ("loot", "evil")] {
        n1.launch(app, org);
    }

    // acme's machines: one in ams (on n1), two in fra, spread over n2 and n3.
    let here = n1.run("web", "ams");
    let (f1, f2) = (n1.run("web", "fra"), n1.run("web", "fra"));
    let loot = n1.run("loot", "fra");
    let mut placed = Vec::new();
    for id in [&here, &f1, &f2, &loot] {
        let s = n1.wait_for(id, "start", |s| s["state"] == "started");
        placed.push(s["node"].as_str().unwrap().to_string());
    }
    assert_eq!(placed[0], "n1");
    let mut fra = vec![placed[1].clone(), placed[2].clone()];
    fra.sort();
    assert_eq!(
        fra,
        ["n2", "n3"],
        "the app's machines spread over fra's nodes"
    );
    // A machine's IPv6 address says its node: n2's have 2 as its node part.
    let v6 = n1.addr(&f1, "private_ip");
    let node_part = format!(":{}::", &placed[1][1..]);
    assert!(v6.contains(&node_part), "{v6} on {}", placed[1]);

    // Across nodes, by IPv6 and by IPv4, from ams to fra and back.
    for target in [&f1, &f2] {
        for field in ["private_ip", "ipv4"] {
            let a = n1.addr(target, field);
            assert_eq!(n1.fetch(&here, &a).as_deref(), Some(PAGE), "{here} to {a}");
        }
    }
    let back = n1.addr(&here, "private_ip");
    assert_eq!(
        n1.fetch(&f1, &back).as_deref(),
        Some(PAGE),
        "back to {back}"
    );

    // A console at n1 in a machine on n2 or n3: the connection is carried
    // to its node (the image has no hostname applet; busybox has).
    let out = n1.h.run(&[
        "ssh",
        "console",
        "-a",
        "web",
        "--machine",
        &f1,
        "-C",
        "echo in-$(busybox hostname); exit 4",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(4),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!("in-{}", n1.addr(&f1, "name"))),
        "{text}"
    );

    // `.internal` names, from inside the machines (busybox's resolver
    // reads the resolv.conf the node wrote): every node answers for the
    // whole cluster, each org its own.
    let lookup = |id: &str, rtype: &str, name: &str| -> Option<Vec<String>> {
        let out = n1.h.run(&[
            "machine",
            "exec",
            id,
            "--",
            "nslookup",
            &format!("-type={rtype}"),
            name,
        ]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut found: Vec<String> = text
            .lines()
            .skip_while(|l| !l.trim().is_empty())
            .filter_map(|l| {
                l.split_once("ddress: ")
                    .map(|(_, a)| a.trim().to_string())
                    .or_else(|| {
                        l.split_once("text = ")
                            .map(|(_, t)| t.trim_matches('"').to_string())
                    })
            })
            .collect();
        found.sort();
        out.status.success().then_some(found)
    };
    let v6_of = |ids: &[&String]| {
        let mut v: Vec<String> = ids.iter().map(|id| n1.addr(id, "private_ip")).collect();
        v.sort();
        v
    };
    assert_eq!(
        lookup(&here, "aaaa", "web.internal"),
        Some(v6_of(&[&here, &f1, &f2]))
    );
    assert_eq!(
        lookup(&f1, "aaaa", "fra.web.internal"),
        Some(v6_of(&[&f1, &f2]))
    );
    assert_eq!(
        lookup(&f2, "aaaa", "ams.web.internal"),
        Some(v6_of(&[&here]))
    );
    assert_eq!(
        lookup(&f1, "aaaa", "top1.nearest.of.web.internal"),
        Some(v6_of(&[&f1]))
    );
    // From ams: its own machine, then fra's first (by id: no latency known).
    let first_fra = (&f1).min(&f2);
    assert_eq!(
        lookup(&here, "aaaa", "top2.nearest.of.web.internal"),
        Some(v6_of(&[&here, first_fra]))
    );
    assert_eq!(
        lookup(&f2, "txt", "regions.web.internal"),
        Some(vec!["ams,fra".to_string()])
    );
    assert_eq!(
        lookup(&loot, "txt", "_apps.internal"),
        Some(vec!["loot".to_string()])
    );
    assert_eq!(
        lookup(&loot, "aaaa", "web.internal"),
        None,
        "evil resolved acme's app"
    );
    assert_eq!(
        lookup(&loot, "aaaa", &format!("{here}.vm.web.internal")),
        None
    );

    let token = |org: &str| {
        n1.h.ok(&["auth", "token", "create", "--org", org])
            .trim()
            .to_string()
    };

    // Metrics are cluster-wide: n1's Prometheus federates n2's and n3's
    // own series, so acme's query at n1 sees its machines on every node
    // (and their `.internal` queries); evil's sees none of them.
    {
        require("prometheus");
        let query = |org: &str, expr: &str| -> String {
            let out =
                n1.h.command(&["metrics", "query", expr])
                    .env("HANGAR_API_TOKEN", token(org))
                    .output()
                    .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let by_node = query(
                "acme",
                r#"count by (node) (hangar_machine_memory_bytes{app="web"})"#,
            );
            let dns = query("acme", "sum by (node) (hangar_dns_queries_total)");
            if ["n1", "n2", "n3"]
                .iter()
                .all(|n| by_node.contains(&format!("node=\"{n}\"")))
                && dns.contains("node=\"n2\"")
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "n1 never saw the cluster's series: {by_node} / {dns}"
            );
            std::thread::sleep(Duration::from_secs(1));
        }
        let theirs = query("evil", r#"{app="web"}"#);
        assert!(
            theirs.trim().is_empty(),
            "evil sees acme's series: {theirs}"
        );
    }

    // An image pushed to n1's registry, private to acme, runs in fra (on
    // n2 or n3, which pull it from n1 as the cluster, for acme); evil's
    // token asks for it in vain, wherever its machine would go.
    let pushed = "10.77.0.1:5000/acme/box:v1";
    n1.h.ok(&[
        "image",
        "push",
        "localhost/busybox:test",
        pushed,
        "--insecure",
        "--creds",
        &format!("acme:{}", token("acme")),
    ]);
    let boxed =
        n1.h.ok(&[
            "machine", "run", pushed, "--app", "web", "--region", "fra", "--", "httpd", "-f", "-p",
            "8080", "-h", "/www",
        ])
        .trim()
        .to_string();
    let s = n1.wait_for(&boxed, "start", |s| s["state"] == "started");
    assert_ne!(s["node"], "n1", "placed in fra: {s}");
    // And on n1 itself, from its own registry at its wire address.
    let at_home = n1.run_image(pushed, "web", "ams");
    let s = n1.wait_for(&at_home, "start", |s| s["state"] == "started");
    assert_eq!(s["node"], "n1", "placed in ams: {s}");
    n1.h.ok(&["machine", "destroy", &at_home, "--force"]);
    assert_eq!(
        n1.fetch(&here, &n1.addr(&boxed, "private_ip")).as_deref(),
        Some(PAGE)
    );
    let evil_token = token("evil");
    for region in ["fra", "ams"] {
        let out =
            n1.h.command(&[
                "machine", "run", pushed, "--app", "loot", "--region", region, "--", "sleep", "60",
            ])
            .env("HANGAR_API_TOKEN", &evil_token)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "evil ran acme's private image in {region}"
        );
        assert!(
            err.contains("was not found, or org evil may not pull it"),
            "{region}: {err}"
        );
    }
    n1.h.ok(&["machine", "destroy", &boxed, "--force"]);

    // A deploy, then two machines in each region: the release is built at
    // n1 and pushed to n1's registry, and runs wherever it is placed.
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/hello");
    let hello = n1.h.dir.path().join("hello");
    assert!(Command::new("cp")
        .arg("-a")
        .arg(&src)
        .arg(&hello)
        .status()
        .unwrap()
        .success());
    let toml = std::fs::read_to_string(hello.join("hangar.toml")).unwrap();
    let toml = toml
        .replace(
            "base = \"localhost/busybox:demo\"",
            "base = \"localhost/busybox:test\"",
        )
        .replace("interval = \"2s\"", "interval = \"300ms\"")
        .replace(
            "app = \"hello\"",
            "app = \"hello\"\nprimary_region = \"ams\"",
        );
    std::fs::write(hello.join("hangar.toml"), toml).unwrap();
    let in_hello = |args: &[&str]| {
        let out = n1.h.command(args).current_dir(&hello).output().unwrap();
        assert!(
            out.status.success(),
            "hangar {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    in_hello(&["launch", "--org", "acme"]);
    let out = in_hello(&["deploy", "--count", "1"]);
    assert!(out.contains("release v1 is complete"), "{out}");
    // Every node's edge serves the app, asked from outside the cluster:
    // n2 and n3 (fra) have no machine of it and reach n1's (ams) through
    // n1's edge, each edge's Cache-Status entry naming it.
    for i in 1..=3 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = Command::new("nsenter")
                .arg(format!("--net=/var/run/netns/{}", wire.stranger))
                .args(["curl", "-s", "-i", "-m", "5", "-H", "Host: hello.localhost"])
                .arg(format!("http://10.77.0.{i}:8080/"))
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if text.starts_with("HTTP/1.1 200") && text.contains(&format!("hangar/n{i}/front;")) {
                assert!(text.contains("hello"), "edge of n{i}: {text}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the edge of n{i} does not serve hello: {text}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    in_hello(&["scale", "count", "2", "--region", "ams,fra"]);
    let all: Value = serde_json::from_str(&n1.h.ok(&["machine", "list", "--json"])).unwrap();
    let mut by_region: Vec<(String, String, String)> = all
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["app"] == "hello" && m["state"] == "started")
        .map(|m| {
            let field = |f: &str| m[f].as_str().unwrap().to_string();
            (field("region"), field("node"), field("private_ip"))
        })
        .collect();
    by_region.sort();
    let where_: Vec<(&str, &str)> = by_region
        .iter()
        .map(|(r, n, _)| (r.as_str(), n.as_str()))
        .collect();
    assert_eq!(
        where_,
        [("ams", "n1"), ("ams", "n1"), ("fra", "n2"), ("fra", "n3")],
        "{by_region:?}"
    );
    for (_, node, addr) in &by_region {
        assert!(
            n1.fetch(&here, addr).is_some(),
            "hello on {node} at {addr} does not answer"
        );
    }
    n1.h.ok(&["apps", "destroy", "hello", "--yes"]);

    // Org tokens are the cluster's: acme's, made at n1, works at n2 (its
    // API shows acme's machines and no others; its registry takes a push),
    // and a revoke at n1 ends it at n2.
    let acme_token = token("acme");
    let n2 = &nodes[1];
    let as_acme = |args: &[&str]| {
        n2.h.command(args)
            .env("HANGAR_API_TOKEN", &acme_token)
            .output()
            .unwrap()
    };
    let listed = as_acme(&["machine", "list", "--json"]);
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let listed: Value = serde_json::from_slice(&listed.stdout).unwrap();
    let apps: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["app"].as_str().unwrap_or(""))
        .collect();
    assert!(apps.contains(&"web") && !apps.contains(&"loot"), "{apps:?}");
    n2.h.ok(&[
        "image",
        "push",
        "localhost/busybox:test",
        "10.77.0.2:5000/acme/box:v2",
        "--insecure",
        "--creds",
        &format!("acme:{acme_token}"),
    ]);
    let id = acme_token
        .strip_prefix("hgr_")
        .unwrap()
        .split('_')
        .next()
        .unwrap();
    n1.h.ok(&["auth", "token", "revoke", id]);
    let refused = as_acme(&["machine", "list", "--json"]);
    assert!(
        !refused.status.success(),
        "a revoked token still works at n2"
    );

    // evil's machine reaches none of acme's, nor does a host on the wire
    // that is no node, even with routes to the machines' networks.
    for target in [&here, &f1, &f2] {
        for field in ["private_ip", "ipv4"] {
            let a = n1.addr(target, field);
            assert_eq!(n1.fetch(&loot, &a), None, "evil reached {a}");
        }
    }
    let fra_node = if placed[1] == "n2" { 2 } else { 3 };
    let via = format!("10.77.0.{fra_node}");
    ip(&[
        "-n",
        &wire.stranger,
        "route",
        "add",
        "10.213.0.0/16",
        "via",
        &via,
    ]);
    let stranger = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", wire.stranger))
        .args(["busybox", "wget", "-q", "-T", "2", "-O", "-"])
        .arg(format!("http://{}:8080/", n1.addr(&f1, "ipv4")))
        .output()
        .unwrap();
    assert!(
        !stranger.status.success(),
        "a stranger on the wire reached a machine"
    );

    // One etcd member lost: nothing stops (once the other two have a
    // leader, should it have been the lost one's: well under a second).
    etcd.kill(2);
    etcd.wait_healthy(0).unwrap();
    let more = n1.run("web", "ams");
    n1.wait_for(&more, "start", |s| s["state"] == "started");
    // Quorum lost: machines keep serving, writes fail saying why.
    etcd.kill(1);
    let refused = n1.h.fails(&[
        "machine",
        "run",
        "localhost/busybox:test",
        "--app",
        "web",
        "--",
        "sleep",
        "1",
    ]);
    assert!(
        refused.contains("etcd") && refused.contains("quorum"),
        "{refused}"
    );
    assert_eq!(
        n1.fetch(&here, &n1.addr(&f2, "ipv4")).as_deref(),
        Some(PAGE)
    );
    // Quorum back: writes again, and no node was taken for dead.
    etcd.restart(1).unwrap();
    etcd.restart(2).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let again = loop {
        let out = n1.h.run(&[
            "machine",
            "run",
            "localhost/busybox:test",
            "--app",
            "web",
            "--region",
            "ams",
            "--",
            "sleep",
            "3600",
        ]);
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        assert!(Instant::now() < deadline, "writes never came back");
        std::thread::sleep(Duration::from_millis(200));
    };
    n1.wait_for(&again, "start", |s| s["state"] == "started");
    assert_eq!(
        n1.status(&f1)["state"],
        "started",
        "f1 was not taken for lost"
    );

    // f1's node killed: its machine of web is replaced on the other fra node
    // within twice the lease, and reachable over the private network.
    let (dead, on_dead) = (fra_node - 1, &f1);
    let killed = Instant::now();
    nodes[dead].kill9();
    let n1 = &nodes[0];
    n1.wait_for(on_dead, "replacement", |s| s["state"] == "destroyed");
    let list: Value = serde_json::from_str(&n1.h.ok(&["machine", "list", "--json"])).unwrap();
    let new = list
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"].as_str().is_some_and(|n| n.starts_with("web-r")))
        .unwrap_or_else(|| panic!("no replacement in {list}"))
        .clone();
    let new_id = new["id"].as_str().unwrap().to_string();
    n1.wait_for(&new_id, "start", |s| s["state"] == "started");
    let took = killed.elapsed();
    assert!(
        took < LEASE * 2 + Duration::from_secs(3),
        "replaced after {took:?}"
    );
    let survivor = if fra_node == 2 { "n3" } else { "n2" };
    assert_eq!(
        (new["node"].as_str(), new["region"].as_str()),
        (Some(survivor), Some("fra"))
    );
    let new_v6 = n1.addr(&new_id, "private_ip");
    assert_eq!(n1.fetch(&here, &new_v6).as_deref(), Some(PAGE));
    eprintln!("node death to a replacement serving: {took:?} (lease {LEASE:?})");

    // The dead node comes back, takes its name again at once, and removes
    // the replaced machine from its host.
    nodes[dead].up();
    let gone = format!("/var/run/netns/hangar-{}", &on_dead[..12]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::path::Path::new(&gone).exists() {
        assert!(
            Instant::now() < deadline,
            "the replaced machine stayed on its node"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let list: Value = serde_json::from_str(&nodes[0].h.ok(&["machine", "list", "--json"])).unwrap();
    for m in list.as_array().into_iter().flatten() {
        let _ = nodes[0]
            .h
            .run(&["machine", "destroy", m["id"].as_str().unwrap(), "--force"]);
    }
}

/// A cached response of an app with one machine (on n1, ams), at every
/// node's edge: `/cgi-bin/t` answers a new body each time the origin is
/// asked, cacheable for 5 minutes with surrogate key `news`.
const NEWS_CGI: &str = r#"mkdir -p /www/cgi-bin && cat > /www/cgi-bin/t <<'END'
#!/bin/sh
printf 'Content-Type: text/plain\r\nCache-Control: max-age=300\r\nSurrogate-Key: news\r\n\r\n'
cat /proc/uptime
END
chmod +x /www/cgi-bin/t"#;

/// iptables in node `i`'s namespace: a partition between it and the
/// other nodes (their APIs, edges and etcd members; its own member is
/// left in a minority); clients on the wire still reach it.
fn partition(wire: &Wire, i: usize, cut: bool) {
    let ns = format!("--net=/var/run/netns/{}", wire.nodes[i - 1]);
    for other in (1..=wire.nodes.len()).filter(|j| *j != i) {
        let addr = format!("10.77.0.{other}");
        for rule in [["INPUT", "-s"], ["OUTPUT", "-d"]] {
            let out = Command::new("nsenter")
                .arg(&ns)
                .arg("iptables")
                .arg(if cut { "-A" } else { "-D" })
                .args(rule)
                .args([addr.as_str(), "-j", "DROP"])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[test]
fn a_purge_reaches_every_region_in_order_and_a_cut_off_node_catches_up_first() {
    require_root();
    require("etcd");
    require("curl");
    require("iptables");
    let _lock = host_lock();
    let (wire, _dir, _etcd, nodes) = three_nodes();
    let (n1, n2) = (&nodes[0], &nodes[1]);
    n1.launch("news", "acme");
    let id =
        n1.h.ok(&[
            "machine",
            "run",
            "localhost/busybox:test",
            "--app",
            "news",
            "--region",
            "ams",
            "--port",
            "8080",
            "--",
            "httpd",
            "-f",
            "-p",
            "8080",
            "-h",
            "/www",
        ])
        .trim()
        .to_string();
    n1.wait_for(&id, "started", |s| s["state"] == "started");
    n1.h.ok(&["machine", "exec", &id, "--", "/bin/sh", "-c", NEWS_CGI]);
    let get = |i: usize| edge_get(&wire, i, "news.localhost", "/cgi-bin/t");
    // Cached at every edge (the same body twice).
    let cached = |i: usize| -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (status, body) = get(i);
            if status == 200 && get(i) == (200, body.clone()) {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "n{i} never cached /cgi-bin/t: {status} {body}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let before: Vec<String> = (1..=3).map(cached).collect();

    // A purge by tag at n2 reaches every region before it is answered.
    let out: Value = serde_json::from_str(
        &n2.h
            .ok(&["cache", "purge", "-a", "news", "--tag", "news", "--json"]),
    )
    .unwrap();
    assert_eq!(out["complete"], true, "{out}");
    assert_eq!(out["applied"], serde_json::json!(["ams", "fra"]), "{out}");
    for i in 1..=3 {
        let (status, body) = get(i);
        assert_eq!(status, 200);
        assert_ne!(body, before[i - 1], "n{i} served the purged response");
    }
    // Another org cannot purge acme's app (nor learn it exists).
    let evil = n1.h.ok(&["auth", "token", "create", "--org", "evil"]);
    let refused =
        n1.h.command(&["cache", "purge", "-a", "news", "--tag", "news"])
            .env("HANGAR_API_TOKEN", evil.trim())
            .output()
            .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("no app \"news\""),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    // n3 cut off from the other nodes (its clients still reach it), then
    // a purge: the region that has not applied it is named (n3 is still a
    // member: its lease has not run out)...
    let held = cached(3);
    partition(&wire, 3, true);
    let cut_at = Instant::now();
    let raw =
        n1.h.command(&[
            "cache", "purge", "-a", "news", "--tag", "news", "--json", "--wait", "2.5",
        ])
        .output()
        .unwrap();
    assert_eq!(
        raw.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&raw.stderr)
    );
    let out: Value = serde_json::from_slice(&raw.stdout).unwrap();
    assert_eq!(out["complete"], false, "{out}");
    assert_eq!(out["pending"], serde_json::json!(["fra (n3)"]), "{out}");
    // ...and past the horizon (3 s after it last knew it was current, well
    // before its lease ends) n3 serves nothing from its cache as fresh: not
    // the purged response (it cannot revalidate, so it fails instead).
    std::thread::sleep(Duration::from_millis(3500).saturating_sub(cut_at.elapsed()));
    let during = get(3);
    assert!(
        during.0 != 200 || during.1 != held,
        "n3 served the purged response while cut off"
    );
    // Once back, it applies the purge it missed before it serves from its
    // cache as fresh again.
    partition(&wire, 3, false);
    let after = cached(3);
    assert_ne!(
        after, held,
        "n3 served the purged response after it came back"
    );
    let acked = Instant::now() + Duration::from_secs(20);
    loop {
        let out: Value = serde_json::from_str(
            &n2.h
                .ok(&["cache", "purge", "-a", "news", "--url", "/none", "--json"]),
        )
        .unwrap();
        if out["complete"] == true && out["applied"] == serde_json::json!(["ams", "fra"]) {
            break;
        }
        assert!(Instant::now() < acked, "n3 never caught up: {out}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
