//! Tenant isolation on one node, tried as a hostile second org would (as
//! root, on a real node): org `evil` holds its own token and its own app and
//! goes after org `acme`'s images, machines and network.

use std::fs;

use serde_json::{json, Value};

use crate::machine::{busybox_image, which, Node};
use crate::support::*;

/// The node's API and registry addresses, from its config.toml.
fn node_addresses(node: &Node) -> (String, String) {
    let text = fs::read_to_string(node.h.home().join("config.toml")).unwrap();
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key} = ")))
            .map(|v| v.trim_matches('"').to_string())
            .unwrap()
    };
    (
        get("api").trim_start_matches("http://").to_string(),
        get("registry"),
    )
}

/// An org's view of the node: its token and the API's address.
struct Org {
    name: &'static str,
    token: String,
    api: String,
}

impl Org {
    fn new(node: &Node, name: &'static str) -> Org {
        let token = node
            .h
            .ok(&["auth", "token", "create", "--org", name])
            .trim()
            .to_string();
        Org {
            name,
            token,
            api: node_addresses(node).0,
        }
    }

    fn call(&self, method: &str, path: &str, body: &Value) -> HttpResponse {
        let auth = format!("Bearer {}", self.token);
        http(
            method,
            &self.api,
            path,
            &[
                ("Authorization", auth.as_str()),
                ("Content-Type", "application/json"),
            ],
            body.to_string().as_bytes(),
        )
    }

    /// Create a machine of `app` running `image` (a long sleep).
    fn create(&self, app: &str, image: &str) -> HttpResponse {
        self.call(
            "POST",
            "/v1/machines",
            &json!({"config": {"image": image, "metadata": {"app": app},
                    "init": {"cmd": ["sleep", "3600"]}}}),
        )
    }
}

/// Orgs `acme` and `evil`, each with a token and an app (`acme-app`,
/// `evil-app`).
fn two_orgs(node: &Node) -> (Org, Org) {
    let (acme, evil) = (Org::new(node, "acme"), Org::new(node, "evil"));
    for (org, app) in [(&acme, "acme-app"), (&evil, "evil-app")] {
        let r = org.call("POST", "/v1/apps", &json!({"name": app}));
        assert_eq!(
            r.status,
            200,
            "{}: {}",
            org.name,
            String::from_utf8_lossy(&r.body)
        );
    }
    (acme, evil)
}

/// An error body with the image reference taken out, to compare refusals.
fn refusal(r: &HttpResponse, image: &str) -> (u16, String) {
    let text = r.json()["error"]
        .as_str()
        .unwrap_or("")
        .replace(image, "<image>");
    (r.status, text)
}

#[test]
fn an_org_runs_only_images_it_may_pull_and_learns_nothing_of_others() {
    let node = Node::start();
    let (api, registry) = node_addresses(&node);
    let (acme, evil) = two_orgs(&node);

    // acme's private image carries a secret; acme pushes it, and a second
    // image it makes public; evil pushes its own.
    let base = busybox_image(&node.h);
    let dir = node.h.dir.path().join("secret-image");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("secret.txt"), "acme's secret\n").unwrap();
    node.h.ok(&[
        "image",
        "build",
        dir.to_str().unwrap(),
        "-t",
        "localhost/secret:test",
        "--base",
        &base,
    ]);
    let push = |src: &str, dest: &str, org: &Org| {
        node.h.ok(&[
            "image",
            "push",
            src,
            dest,
            "--creds",
            &format!("{}:{}", org.name, org.token),
        ]);
    };
    let private = format!("{registry}/acme/private:v1");
    let shared = format!("{registry}/acme/shared:v1");
    let own = format!("{registry}/evil/mine:v1");
    push("localhost/secret:test", &private, &acme);
    push(&base, &shared, &acme);
    push(&base, &own, &evil);
    node.h.ok(&["registry", "public", "acme/shared"]);
    let secret_digest = node.h.inspect("localhost/secret:test")["digest"]
        .as_str()
        .unwrap()
        .to_string();

    // acme runs its private image: the node now holds it in its store.
    let r = acme.create("acme-app", &private);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let acme_machine = r.json()["id"].as_str().unwrap().to_string();

    // evil's attempts at acme's image, by every name for it, and at things
    // that are not images at all: each is the same refusal as an image that
    // does not exist.
    let port = registry.rsplit_once(':').unwrap().1;
    let closed = free_port();
    let attempts = [
        private.clone(),
        format!("localhost:{port}/acme/private:v1"),
        format!("[::1]:{port}/acme/private:v1"),
        format!("{registry}/acme/private@{secret_digest}"),
        // The digest under evil's own name: the store holds it, under acme's.
        format!("{registry}/evil/mine@{secret_digest}"),
        // Images the node built or pulled for the operator.
        "localhost/secret:test".to_string(),
        base.clone(),
        // The node's own services and a closed port, as registries.
        format!("{api}/acme/private:v1"),
        format!("{}/x/y:1", node.edge),
        format!("127.0.0.1:{closed}/x/y:1"),
        format!("localhost:{closed}/x/y:1"),
        format!("0x7f000001:{closed}/x/y:1"),
    ];
    let missing = format!("{registry}/acme/nothing:v1");
    let expected = refusal(&evil.create("evil-app", &missing), &missing);
    assert_eq!(expected.0, 400, "{expected:?}");
    assert!(expected.1.contains("not found"), "{expected:?}");
    for image in &attempts {
        let r = evil.create("evil-app", image);
        assert_eq!(refusal(&r, image), expected, "create with {image}");
    }

    // evil's own image and acme's public one run.
    let r = evil.create("evil-app", &own);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let evil_machine = r.json()["id"].as_str().unwrap().to_string();
    let r = evil.create("evil-app", &shared);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

    // Update and deploy refuse alike.
    for image in [
        &private,
        &format!("{registry}/acme/private@{secret_digest}"),
    ] {
        let r = evil.call(
            "POST",
            &format!("/v1/machines/{evil_machine}"),
            &json!({"config": {"image": image, "metadata": {"app": "evil-app"}}}),
        );
        assert_eq!(refusal(&r, image), expected, "update to {image}");
        let r = evil.call(
            "POST",
            "/v1/apps/evil-app/deploy",
            &json!({"image": image, "config": {"image": image}}),
        );
        assert_eq!(refusal(&r, image), expected, "deploy of {image}");
    }
    // Nor does evil reach acme's machine to exec in it.
    let r = evil.call(
        "POST",
        &format!("/v1/machines/{acme_machine}/exec"),
        &json!({"cmd": ["cat", "/secret.txt"]}),
    );
    assert_eq!(r.status, 404, "{}", String::from_utf8_lossy(&r.body));
    assert!(!String::from_utf8_lossy(&r.body).contains("secret"));
    // And no machine of evil's runs acme's private image.
    let list = evil.call("GET", "/v1/machines", &json!({})).json();
    for m in list.as_array().unwrap() {
        let image = m["config"]["image"].as_str().unwrap_or("");
        assert!(!image.contains("acme/private"), "{m}");
        let (code, out) = node.exec(m["id"].as_str().unwrap(), &["cat", "/secret.txt"]);
        assert_ne!(code, 0, "{out}");
    }
    // acme still runs its own, and reads its secret.
    let (code, out) = node.exec(&acme_machine, &["cat", "/secret.txt"]);
    assert_eq!((code, out.as_str()), (0, "acme's secret\n"));
}

/// Run inside a machine's network namespace (`nsenter --net`): try each
/// target address over TCP (port 8080, reads what answers), UDP (a datagram
/// to port 9000 tagged `tag`) and ICMP (busybox ping); prints one JSON line.
const PROBE: &str = r#"
import json, socket, subprocess, sys
tag, targets = sys.argv[1], sys.argv[2:]
out = {}
for t in targets:
    fam = socket.AF_INET6 if ":" in t else socket.AF_INET
    r = {}
    try:
        s = socket.socket(fam, socket.SOCK_STREAM); s.settimeout(1.5)
        s.connect((t, 8080)); s.sendall(b"GET /who HTTP/1.0\r\n\r\n")
        got = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
        r["tcp"] = got.decode(errors="replace").split("\r\n\r\n")[-1].strip()
    except OSError as e:
        r["tcp"] = None
    try:
        u = socket.socket(fam, socket.SOCK_DGRAM); u.sendto((tag + " " + t).encode(), (t, 9000))
    except OSError:
        pass
    p = subprocess.run(["busybox", "ping", "-c", "1", "-W", "1", t], capture_output=True)
    r["icmp"] = p.returncode == 0
    out[t] = r
print(json.dumps(out))
"#;

/// Listens for UDP on port 9000 inside a namespace for at most the given
/// seconds (the test kills it sooner); prints what came, a datagram a line.
const UDP_SINK: &str = r#"
import socket, sys, time
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", 9000)); s.settimeout(0.2)
print("ready", flush=True)
end = time.time() + float(sys.argv[1])
while time.time() < end:
    try:
        print(s.recv(512).decode(errors="replace"), flush=True)
    except socket.timeout:
        pass
"#;

fn netns_path(id: &str) -> String {
    format!("/run/netns/hangar-{}", &id[..12])
}

fn in_netns(id: &str, script: &str, args: &[&str]) -> std::process::Command {
    let mut c = std::process::Command::new("nsenter");
    c.arg(format!("--net={}", netns_path(id)))
        .args(["python3", "-c", script])
        .args(args);
    c
}

/// Restores a sysctl on drop.
struct Sysctl(&'static str, String);

impl Sysctl {
    fn set(path: &'static str, value: &str) -> Sysctl {
        let old = fs::read_to_string(path).unwrap();
        fs::write(path, value).unwrap();
        Sysctl(path, old)
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        let _ = fs::write(self.0, self.1.trim());
    }
}

/// `dig` from inside machine `id`'s network: the answer's records (`+short`),
/// or the status line when `status` (NOERROR, NXDOMAIN...; empty: none came).
fn dig(id: &str, server: &str, args: &[&str]) -> String {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", netns_path(id)))
        .args(["dig", "+time=1", "+tries=1", &format!("@{server}")])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The status of a `dig` answer (NOERROR, NXDOMAIN...), or "" when none came.
fn dig_status(id: &str, server: &str, args: &[&str]) -> String {
    dig(id, server, args)
        .lines()
        .find_map(|l| l.split("status: ").nth(1))
        .map(|rest| rest.split(',').next().unwrap_or("").to_string())
        .unwrap_or_default()
}

/// `.internal` names as acme's machines and evil's see them: each org its
/// own apps only, whichever gateway evil asks and whatever it asks for; a
/// stopped machine leaves the answers at once.
fn internal_dns(node: &Node, acme: [&Value; 2], evil: &Value) {
    let id = |m: &Value| m["id"].as_str().unwrap().to_string();
    // The machine's resolvers are its gateway's two addresses.
    let (code, resolv) = node.exec(&id(acme[0]), &["cat", "/etc/resolv.conf"]);
    assert_eq!(code, 0);
    let servers: Vec<&str> = resolv
        .lines()
        .filter_map(|l| l.strip_prefix("nameserver "))
        .collect();
    let prefix4 = acme[0]["ipv4"]
        .as_str()
        .unwrap()
        .rsplit_once('.')
        .unwrap()
        .0;
    assert_eq!(servers.len(), 2, "{resolv}");
    assert!(
        servers[0].starts_with("fdaa:") && servers[0].ends_with("::1"),
        "{resolv}"
    );
    assert_eq!(servers[1], format!("{prefix4}.1"), "{resolv}");
    let (acme_v6, acme_v4) = (servers[0].to_string(), servers[1].to_string());

    // Inside the machine, through its own resolv.conf (busybox's resolver).
    let (code, out) = node.exec(
        &id(acme[0]),
        &["nslookup", "-type=aaaa", "acme-app.internal"],
    );
    assert_eq!(code, 0, "{out}");
    for m in acme {
        assert!(out.contains(m["private_ip"].as_str().unwrap()), "{out}");
    }
    let (code, out) = node.exec(
        &id(acme[0]),
        &[
            "wget",
            "-Y",
            "off",
            "-q",
            "-O",
            "-",
            &format!("http://{}.vm.acme-app.internal:8080/who", id(acme[1])),
        ],
    );
    assert_eq!((code, out.trim()), (0, "acme-two"));

    let mut want: Vec<String> = acme
        .iter()
        .map(|m| m["ipv4"].as_str().unwrap().to_string())
        .collect();
    want.sort();
    let short = |from: &Value, server: &str, args: &[&str]| {
        let mut lines: Vec<String> = dig(&id(from), server, &[&["+short"], args].concat())
            .lines()
            .map(|l| l.trim_matches('"').to_string())
            .collect();
        lines.sort();
        lines
    };
    assert_eq!(short(acme[0], &acme_v4, &["A", "acme-app.internal"]), want);
    assert_eq!(
        short(acme[0], &acme_v6, &["TXT", "_apps.internal"]),
        ["acme-app"]
    );
    let vms = short(acme[0], &acme_v4, &["TXT", "vms.acme-app.internal"]);
    assert_eq!(vms.len(), 1);
    for m in acme {
        assert!(vms[0].contains(&format!("{} local", id(m))), "{vms:?}");
    }
    assert_eq!(
        short(acme[0], &acme_v4, &["TXT", "regions.acme-app.internal"]),
        ["local"]
    );
    assert_eq!(
        short(
            acme[0],
            &acme_v4,
            &["A", "top1.nearest.of.acme-app.internal"]
        )
        .len(),
        1
    );
    assert_eq!(
        dig_status(&id(acme[0]), &acme_v4, &["evil-app.internal"]),
        "NXDOMAIN"
    );
    // Over TCP as over UDP.
    assert_eq!(
        short(acme[0], &acme_v4, &["+tcp", "A", "acme-app.internal"]),
        want
    );
    // No recursion: outside names are the egress proxy's to resolve.
    assert_eq!(
        dig_status(&id(acme[0]), &acme_v4, &["example.com"]),
        "REFUSED"
    );

    // Evil: its own gateway knows only evil's app, and acme's names are
    // no names at all there.
    let evil_v4 = format!(
        "{}.1",
        evil["ipv4"].as_str().unwrap().rsplit_once('.').unwrap().0
    );
    assert_eq!(
        short(evil, &evil_v4, &["TXT", "_apps.internal"]),
        ["evil-app"]
    );
    for name in [
        "acme-app.internal".to_string(),
        format!("{}.vm.acme-app.internal", id(acme[0])),
        "vms.acme-app.internal".into(),
        "top1.nearest.of.acme-app.internal".into(),
    ] {
        for rtype in ["A", "AAAA", "TXT", "ANY"] {
            assert_eq!(
                dig_status(&id(evil), &evil_v4, &[rtype, &name]),
                "NXDOMAIN",
                "{rtype} {name}"
            );
        }
    }
    // Acme's resolver, asked by evil at acme's gateway addresses, over UDP
    // and TCP: no answer at all (its sockets take only what comes in on
    // acme's bridge).
    for server in [&acme_v4, &acme_v6] {
        for proto in ["+notcp", "+tcp"] {
            let out = dig(&id(evil), server, &[proto, "A", "acme-app.internal"]);
            assert!(
                !out.contains("status:"),
                "evil got an answer from {server} {proto}: {out}"
            );
        }
    }

    // A stopped machine leaves the answers as soon as it is wanted stopped
    // (measured from the stop call, which waits for the machine to exit).
    let began = std::time::Instant::now();
    node.h
        .ok(&["machine", "stop", &id(acme[1]), "--timeout", "5"]);
    let stopped = began.elapsed();
    let one = vec![acme[0]["ipv4"].as_str().unwrap().to_string()];
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(100);
    loop {
        let now = short(acme[0], &acme_v4, &["A", "acme-app.internal"]);
        if now == one {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the stopped machine was still answered 100 ms after its stop ({stopped:?}) returned: {now:?}"
        );
    }
    assert_eq!(
        dig_status(
            &id(acme[0]),
            &acme_v4,
            &[&format!("{}.vm.acme-app.internal", id(acme[1]))]
        ),
        "NXDOMAIN"
    );
    node.h.ok(&["machine", "start", &id(acme[1])]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while short(acme[0], &acme_v4, &["A", "acme-app.internal"]) != want {
        assert!(
            std::time::Instant::now() < deadline,
            "the started machine never came back to the answers"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

    // An image with no /etc at all still gets its resolver.
    let bare = node.h.dir.path().join("bare");
    fs::create_dir_all(bare.join("bin")).unwrap();
    fs::copy(which("busybox"), bare.join("bin/busybox")).unwrap();
    node.h.ok(&[
        "image",
        "build",
        bare.to_str().unwrap(),
        "-t",
        "localhost/bare:test",
        "--cmd",
        "/bin/busybox sleep 3600",
    ]);
    let bare_id = node
        .h
        .ok(&[
            "machine",
            "run",
            "localhost/bare:test",
            "--app",
            "acme-app",
            "--",
            "/bin/busybox",
            "sleep",
            "3600",
        ])
        .trim()
        .to_string();
    // Until its container is there to exec in (it is being started).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let (code, out) = loop {
        let (code, out) = node.exec(
            &bare_id,
            &["/bin/busybox", "nslookup", "-type=a", "acme-app.internal"],
        );
        if code == 0 || std::time::Instant::now() > deadline {
            break (code, out);
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(acme[0]["ipv4"].as_str().unwrap()), "{out}");
    node.h.ok(&["machine", "destroy", &bare_id, "--force"]);
}

#[test]
fn machines_of_two_orgs_reach_nothing_of_each_other() {
    require("nsenter");
    let node = Node::start();
    let (api, _) = node_addresses(&node);
    let admin = fs::read_to_string(node.h.home().join("config.toml"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("token = ")
                .map(|t| t.trim_matches('"').to_string())
        })
        .unwrap();
    let call = |method: &str, path: &str, body: &Value| {
        let auth = format!("Bearer {admin}");
        http(
            method,
            &api,
            path,
            &[
                ("Authorization", auth.as_str()),
                ("Content-Type", "application/json"),
            ],
            body.to_string().as_bytes(),
        )
    };
    let image = busybox_image(&node.h);
    for (app, org) in [("acme-app", "acme"), ("evil-app", "evil")] {
        let r = call("POST", "/v1/apps", &json!({"name": app, "org": org}));
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }
    // Each machine serves its own name at /who on port 8080.
    let machine = |app: &str, name: &str| -> Value {
        let r = call(
            "POST",
            "/v1/machines",
            &json!({"name": name, "config": {"image": image, "metadata": {"app": app},
                "init": {"cmd": ["sh", "-c", "hostname > /www/who; exec httpd -f -p 8080 -h /www"]}}}),
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        r.json()
    };
    let a1 = machine("acme-app", "acme-one");
    let a2 = machine("acme-app", "acme-two");
    let e = machine("evil-app", "evil-one");
    let id = |m: &Value| m["id"].as_str().unwrap().to_string();
    let addrs = |m: &Value| {
        [
            m["ipv4"].as_str().unwrap().to_string(),
            m["private_ip"].as_str().unwrap().to_string(),
        ]
    };
    // The address plan names the org: acme's two share a /24, evil's differs.
    let net = |m: &Value| {
        m["ipv4"]
            .as_str()
            .unwrap()
            .rsplit_once('.')
            .unwrap()
            .0
            .to_string()
    };
    assert_eq!(net(&a1), net(&a2));
    assert_ne!(net(&a1), net(&e));
    // The node reaches every machine, on both addresses.
    for m in [&a1, &a2, &e] {
        for a in addrs(m) {
            let host = if a.contains(':') {
                format!("[{a}]:8080")
            } else {
                format!("{a}:8080")
            };
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            loop {
                let ok = std::net::TcpStream::connect_timeout(
                    &host.parse().unwrap(),
                    std::time::Duration::from_secs(1),
                )
                .is_ok();
                if ok {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "the node cannot reach {host}"
                );
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            let r = http("GET", &host, "/who", &[], b"");
            assert_eq!(
                String::from_utf8_lossy(&r.body).trim(),
                m["name"].as_str().unwrap()
            );
        }
    }

    internal_dns(&node, [&a1, &a2], &e);

    let probe = |from: &Value, tag: &str, targets: &[String]| -> Value {
        let mut args = vec![tag];
        args.extend(targets.iter().map(String::as_str));
        let out = in_netns(&id(from), PROBE, &args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    // Every address of acme's machines and their gateway, tried by evil,
    // with the host's forwarding off and then on (a host that routes, as
    // Docker's do, must still route nothing between orgs).
    let mut acme_targets: Vec<String> = addrs(&a1).into_iter().chain(addrs(&a2)).collect();
    for round in ["forwarding off", "forwarding on"] {
        let _forward = (round == "forwarding on").then(|| {
            (
                Sysctl::set("/proc/sys/net/ipv4/ip_forward", "1"),
                Sysctl::set("/proc/sys/net/ipv6/conf/all/forwarding", "1"),
            )
        });
        let mut sink = in_netns(&id(&a1), UDP_SINK, &["120"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines =
            std::io::BufRead::lines(std::io::BufReader::new(sink.stdout.take().unwrap()));
        assert_eq!(lines.next().unwrap().unwrap(), "ready");
        let seen = probe(&e, "evil", &acme_targets);
        for t in &acme_targets {
            assert_eq!(
                seen[t]["tcp"],
                Value::Null,
                "{round}: evil reached {t} over TCP: {seen}"
            );
            assert_eq!(seen[t]["icmp"], false, "{round}: evil pinged {t}: {seen}");
        }
        // The control: acme's other machine reaches acme-one every way.
        let own = probe(&a2, "acme", &addrs(&a1));
        for t in addrs(&a1) {
            assert_eq!(own[&t]["tcp"], "acme-one", "{round}: {own}");
            assert_eq!(own[&t]["icmp"], true, "{round}: {own}");
        }
        // Datagrams in flight have landed by the time the probes' pings
        // came back; the sink printed each at once.
        std::thread::sleep(std::time::Duration::from_millis(300));
        let _ = sink.kill();
        let _ = sink.wait();
        let got: Vec<String> = lines.map_while(Result::ok).collect();
        assert!(
            got.iter().all(|l| !l.starts_with("evil")),
            "{round}: UDP from evil arrived: {got:?}"
        );
        for t in addrs(&a1) {
            assert!(
                got.contains(&format!("acme {t}")),
                "{round}: acme's own UDP to {t} was lost: {got:?}"
            );
        }
    }

    // Neighbour spoofing: evil takes acme-one's addresses on its own link
    // and announces them; acme's machines and the node still reach the real
    // acme-one, and evil still reaches nothing of acme's.
    let [a1v4, a1v6] = addrs(&a1);
    let prefix = net(&a1);
    let spoof = format!(
        "ip addr add {a1v4}/24 dev eth0; ip -6 addr add {a1v6}/64 dev eth0 nodad; \
         busybox arping -c 2 -U -I eth0 -s {a1v4} {a1v4}; busybox arping -c 2 -A -I eth0 -s {a1v4} {prefix}.1; true"
    );
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", netns_path(&id(&e))))
        .args(["sh", "-c", &spoof])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    acme_targets.retain(|t| t != &a1v4 && t != &a1v6);
    let seen = probe(&e, "evil", &acme_targets);
    for t in &acme_targets {
        assert_eq!(seen[t]["tcp"], Value::Null, "after spoofing: {seen}");
    }
    for a in addrs(&a1) {
        let host = if a.contains(':') {
            format!("[{a}]:8080")
        } else {
            format!("{a}:8080")
        };
        let r = http("GET", &host, "/who", &[], b"");
        assert_eq!(
            String::from_utf8_lossy(&r.body).trim(),
            "acme-one",
            "the node reached {host}"
        );
    }
    let own = probe(&a2, "acme", &addrs(&a1));
    for t in addrs(&a1) {
        assert_eq!(own[&t]["tcp"], "acme-one", "after spoofing: {own}");
    }
}

/// The node's resident memory, MB.
fn node_rss_mb(node: &Node) -> u64 {
    let pid = fs::read_to_string(node.h.home().join("node.pid")).unwrap();
    let status = fs::read_to_string(format!("/proc/{}/status", pid.trim())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap()
        / 1024
}

#[test]
fn limits_hold_against_a_hostile_org() {
    let node = Node::start();
    let (api, registry) = node_addresses(&node);
    let (acme, evil) = two_orgs(&node);
    let base = busybox_image(&node.h);
    let run = |org: &Org, app: &str, cmd: &str| -> String {
        let image = format!("{registry}/{}/base:v1", org.name);
        node.h.ok(&[
            "image",
            "push",
            &base,
            &image,
            "--creds",
            &format!("{}:{}", org.name, org.token),
        ]);
        let r = org.call(
            "POST",
            "/v1/machines",
            &json!({"config": {"image": image, "metadata": {"app": app},
                    "init": {"cmd": ["sh", "-c", cmd]}}}),
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let id = r.json()["id"].as_str().unwrap().to_string();
        let r = org.call(
            "GET",
            &format!("/v1/machines/{id}/wait?state=started"),
            &json!({}),
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        // Until its app runs, `runc exec` finds no container.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while node.exec(&id, &["true"]).0 != 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "machine {id} never ran"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        id
    };
    let acme_m = run(&acme, "acme-app", "sleep 3600");
    // evil's machine ignores SIGTERM, so each stop waits out its timeout.
    let evil_m = run(
        &evil,
        "evil-app",
        "trap '' TERM; while true; do sleep 1; done",
    );
    let rss_before = node_rss_mb(&node);

    // A 500 MB body: refused with 413 after at most the cap is read.
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&api).unwrap();
        let head = format!(
            "POST /v1/machines HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 524288000\r\n\r\n",
            evil.token
        );
        s.write_all(head.as_bytes()).unwrap();
        let chunk = vec![b' '; 1 << 20];
        let mut sent = 0;
        while sent < 64 {
            if s.write_all(&chunk).is_err() {
                break;
            }
            sent += 1;
        }
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut answer = vec![0u8; 4096];
        let n = s.read(&mut answer).unwrap_or(0);
        let answer = String::from_utf8_lossy(&answer[..n]);
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert!(answer.contains("send less"), "{answer}");
    }

    // exec output: 100 MB of zeros come back cut, and say so (the probe
    // of the issue used `head -c`, which this image lacks).
    let r = evil.call(
        "POST",
        &format!("/v1/machines/{evil_m}/exec"),
        &json!({"cmd": ["dd", "if=/dev/zero", "bs=1000000", "count=100"]}),
    );
    assert_eq!(r.status, 200);
    assert!(
        r.body.len() < 8 << 20,
        "{} bytes of exec output",
        r.body.len()
    );
    let stdout = r.json()["stdout"].as_str().unwrap().to_string();
    assert!(
        stdout.contains("more bytes not shown"),
        "{} bytes of stdout, stderr {}, exit {}",
        stdout.len(),
        r.json()["stderr"],
        r.json()["exit_code"]
    );
    // exec as a user of the image, by name; an unknown one is a 400.
    let out = node
        .h
        .ok(&["machine", "exec", &evil_m, "--user", "app", "--", "id"]);
    assert!(
        out.contains("uid=1000") && out.contains("gid=1000"),
        "{out}"
    );
    let r = evil.call(
        "POST",
        &format!("/v1/machines/{evil_m}/exec"),
        &json!({"cmd": ["id"], "user": "nobody-here"}),
    );
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert!(String::from_utf8_lossy(&r.body).contains("nobody-here"));
    let rss_after = node_rss_mb(&node);
    assert!(
        rss_after < rss_before + 100,
        "the node grew from {rss_before} MB to {rss_after} MB"
    );

    // Numbers out of range: each a 400 that names the field, never a 5xx
    // or a dropped connection.
    let create = |config: Value| {
        let mut config = config;
        config["image"] = json!(format!("{registry}/evil/base:v1"));
        config["metadata"] = json!({"app": "evil-app"});
        evil.call("POST", "/v1/machines", &json!({ "config": config }))
    };
    for (config, field) in [
        (
            json!({"guest": {"memory_mb": 17592186044416u64}}),
            "memory_mb",
        ),
        (json!({"guest": {"memory_mb": u64::MAX}}), "memory_mb"),
        (json!({"guest": {"cpus": 100000}}), "cpus"),
        (json!({"guest": {"cpus": 0}}), "cpus"),
        (json!({"kill_timeout": u64::MAX}), "kill_timeout"),
        (
            json!({"checks": {"c": {"port": 8080, "path": "/", "interval": 1e300, "timeout": 1}}}),
            "checks",
        ),
        (
            json!({"checks": {"c": {"port": 8080, "path": "/", "interval": 1, "timeout": 1, "grace_period": -5}}}),
            "checks",
        ),
        (
            json!({"services": [{"internal_port": 8080, "idle_timeout": u64::MAX}]}),
            "idle_timeout",
        ),
        (json!({"guest": {"memory_mb": -1}}), "memory_mb"),
        (json!({"guest": {"cpus": 1.5}}), "cpus"),
        (json!({"restart": {"max_retries": 1e20}}), "max_retries"),
    ] {
        let r = create(config.clone());
        let text = String::from_utf8_lossy(&r.body).into_owned();
        assert_eq!(r.status, 400, "{config}: {text}");
        assert!(text.contains(field), "{config}: {text}");
    }
    for (method, path, body) in [
        (
            "GET",
            format!("/v1/machines/{evil_m}/wait?timeout=18446744073709551615"),
            json!({}),
        ),
        (
            "GET",
            format!("/v1/machines/{evil_m}/wait?timeout=-1"),
            json!({}),
        ),
        (
            "GET",
            format!("/v1/machines/{evil_m}/wait?timeout=abc"),
            json!({}),
        ),
        (
            "POST",
            format!("/v1/machines/{evil_m}/stop"),
            json!({"timeout": u64::MAX}),
        ),
        (
            "POST",
            format!("/v1/machines/{evil_m}/stop"),
            json!({"timeout": -1}),
        ),
        (
            "POST",
            "/v1/apps/evil-app/scale".to_string(),
            json!({"count": 1e30}),
        ),
    ] {
        let r = evil.call(method, &path, &body);
        let text = String::from_utf8_lossy(&r.body).into_owned();
        assert_eq!(r.status, 400, "{method} {path} {body}: {text}");
    }

    // A flood of stops on its own machine: evil gets 429s with
    // Retry-After, and acme's exec answers as fast as ever meanwhile.
    let flood: Vec<_> = (0..600)
        .map(|_| {
            let (api, token, id) = (api.clone(), evil.token.clone(), evil_m.clone());
            std::thread::spawn(move || {
                let auth = format!("Bearer {token}");
                http(
                    "POST",
                    &api,
                    &format!("/v1/machines/{id}/stop"),
                    &[
                        ("Authorization", auth.as_str()),
                        ("Content-Type", "application/json"),
                    ],
                    br#"{"timeout": 8}"#,
                )
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(500));
    for _ in 0..3 {
        let t = std::time::Instant::now();
        let r = acme.call(
            "POST",
            &format!("/v1/machines/{acme_m}/exec"),
            &json!({"cmd": ["true"]}),
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        // Unloaded this is well under a second; before per-org limits it
        // took 52 s under such a flood.
        assert!(
            t.elapsed() < std::time::Duration::from_secs(5),
            "acme's exec took {:?}",
            t.elapsed()
        );
    }
    let answers: Vec<HttpResponse> = flood.into_iter().map(|t| t.join().unwrap()).collect();
    let busy: Vec<&HttpResponse> = answers.iter().filter(|r| r.status == 429).collect();
    assert!(!busy.is_empty(), "no 429 among {} stops", answers.len());
    assert!(busy.iter().all(|r| r.header("retry-after") == Some("1")));
    assert!(
        answers.iter().all(|r| r.status < 500),
        "a stop answered 5xx"
    );
    // The node is alive and well.
    assert_eq!(acme.call("GET", "/v1/apps", &json!({})).status, 200);
}

#[test]
fn an_org_pulls_from_a_private_registry_with_its_own_login_only() {
    // A private registry (Debian's docker-registry, htpasswd) that the
    // operator allows at its loopback address.
    let private = Registry::start(RegistryAuth::Basic("acme-robot", "acme-pw-7f3e9"));
    let host = private.host();
    let node = Node::start_with(&["--allow-registry", &host]);
    let (acme, evil) = two_orgs(&node);
    let base = busybox_image(&node.h);
    let image = format!("{host}/acme/app:v1");
    node.h.ok(&[
        "image",
        "push",
        &base,
        &image,
        "--creds",
        "acme-robot:acme-pw-7f3e9",
    ]);
    let create = |org: &Org, app: &str| {
        org.call(
            "POST",
            "/v1/machines",
            &json!({"config": {"image": image, "metadata": {"app": app},
                    "init": {"cmd": ["sleep", "3600"]}}}),
        )
    };
    let logins = |org: &Org| org.call("GET", "/v1/registry-logins", &json!({})).json();
    let login_path = format!("/v1/registry-logins/{host}");

    // Without a login the registry refuses acme, as any org (the
    // operator's own credentials are never used).
    let r = create(&acme, "acme-app");
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert!(String::from_utf8_lossy(&r.body).contains("was not found, or org acme may not pull it"));

    // acme logs in (through the CLI, the password on stdin) and runs it.
    let mut login = node
        .h
        .command(&[
            "auth",
            "registry-login",
            &host,
            "-u",
            "acme-robot",
            "--password-stdin",
        ])
        .env("HANGAR_API_TOKEN", &acme.token)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut login.stdin.take().unwrap(), b"acme-pw-7f3e9\n").unwrap();
    let out = login.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = create(&acme, "acme-app");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let listed = logins(&acme);
    assert_eq!(
        listed,
        json!([{"registry": host, "username": "acme-robot"}])
    );
    assert!(!listed.to_string().contains("acme-pw"), "{listed}");

    // evil sees no login of acme's, cannot remove it, and cannot use it:
    // the image is in the node's store now, and still refused.
    assert_eq!(logins(&evil), json!([]));
    let r = evil.call("DELETE", &login_path, &json!({}));
    assert_eq!(r.status, 404, "{}", String::from_utf8_lossy(&r.body));
    let r = create(&evil, "evil-app");
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert!(String::from_utf8_lossy(&r.body).contains("org evil may not pull it"));
    // A wrong password of its own does not help either.
    let r = evil.call(
        "PUT",
        &login_path,
        &json!({"username": "acme-robot", "password": "guess"}),
    );
    assert_eq!(r.status, 200);
    let r = create(&evil, "evil-app");
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));

    // Logins are an org's: the admin (the CLI with the node's token) has none.
    let out = node
        .h
        .command(&["auth", "registry-login", &host, "-u", "u"])
        .env("HANGAR_REGISTRY_PASSWORD", "p")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("use an org token"),
        "{said}"
    );

    // Every use asks the registry again: once acme logs out, its next
    // machine of the image is refused although the node has it stored.
    let r = acme.call("DELETE", &login_path, &json!({}));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = create(&acme, "acme-app");
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
}
