//! `hangar egress serve` end to end. Everything runs inside a network
//! namespace this test creates, holding only loopback (with one
//! public-looking test address on it): a proxy that failed open could reach
//! nothing on this machine's real network.

use std::fs;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

struct Sandbox {
    ns: String,
    children: Vec<Child>,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = fs::remove_dir_all(format!("/etc/netns/{}", self.ns));
    }
}

/// A public-looking address that exists only on the sandbox's loopback.
const ORIGIN: &str = "93.184.216.34";

impl Sandbox {
    fn new() -> Sandbox {
        assert!(
            rustix::process::geteuid().is_root(),
            "egress tests need root to make a network namespace"
        );
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ns = format!("hgegress-{}-{n}", std::process::id());
        let ip = |args: &[&str]| {
            assert!(
                Command::new("ip").args(args).status().unwrap().success(),
                "ip {args:?}"
            )
        };
        ip(&["netns", "add", &ns]);
        let sb = Sandbox {
            ns: ns.clone(),
            children: Vec::new(),
        };
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{ORIGIN}/32"),
            "dev",
            "lo",
        ]);
        // `ip netns exec` puts this file over /etc/hosts inside the namespace.
        fs::create_dir_all(format!("/etc/netns/{ns}")).unwrap();
        fs::write(
            format!("/etc/netns/{ns}/hosts"),
            format!("127.0.0.1 localhost\n{ORIGIN} origin.test other.test\n127.0.0.1 internal.test\n169.254.169.254 metadata.test\n10.1.2.3 private.test\n"),
        )
        .unwrap();
        sb
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, program]);
        c
    }

    fn spawn(&mut self, mut c: Command) {
        self.children.push(
            c.stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
    }

    fn wait_port(&self, addr: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ok = self
                .command("python3")
                .args([
                    "-c",
                    &format!(
                        "import socket; socket.create_connection(('{}', {}), 1)",
                        addr.rsplit_once(':').unwrap().0,
                        addr.rsplit_once(':').unwrap().1
                    ),
                ])
                .stderr(Stdio::null())
                .status()
                .unwrap()
                .success();
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{addr} never listened in the sandbox"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Run the client matrix inside the namespace: each case is (method,
    /// target, password or ""), the answer its status line.
    fn requests(&self, cases: &[(&str, &str, &str)]) -> Vec<String> {
        let script = r#"
import base64, json, socket, sys
out = []
for method, target, password in json.loads(sys.argv[1]):
    s = socket.create_connection(("127.0.0.1", 4750), 5)
    auth = "Proxy-Authorization: Basic %s\r\n" % base64.b64encode(("user:" + password).encode()).decode() if password else ""
    if method == "CONNECT":
        s.sendall(("CONNECT %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (target, target, auth)).encode())
        head = s.recv(4096).decode(errors="replace")
        if head.startswith("HTTP/1.1 200"):
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            body = b""
            while True:
                chunk = s.recv(4096)
                if not chunk: break
                body += chunk
            head = head.split("\r\n")[0] + " tunnel:" + body.decode(errors="replace").split("\r\n")[0]
    else:
        s.sendall(("GET %s HTTP/1.1\r\nHost: x\r\n%sConnection: close\r\n\r\n" % (target, auth)).encode())
        head = b""
        while True:
            chunk = s.recv(4096)
            if not chunk: break
            head += chunk
        head = head.decode(errors="replace")
        err = [l for l in head.split("\r\n") if l.lower().startswith("x-hangar-egress-error")]
        head = head.split("\r\n")[0] + ((" | " + err[0]) if err else "")
    out.append(head.split("\r\n")[0])
    s.close()
print(json.dumps(out))
"#;
        let cases_json = serde_json::to_string(cases).unwrap();
        let out = self
            .command("python3")
            .args(["-c", script, &cases_json])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "client: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

const ACL: &str = "version: v1
services:
  - name: authed
    project: users
    action: enforce
    allowed_domains:
      - origin.test
  - name: reporter
    project: audit
    action: report
  - name: opener
    project: anything
    action: open
default:
  project: other
  action: enforce
global_deny_list:
  - denied.example.com
";

#[test]
fn proxy_matrix_ip_policy_and_reload() {
    let h = Hangar::new();
    let mut sb = Sandbox::new();
    let www = h.dir.path().join("www");
    fs::create_dir_all(&www).unwrap();
    fs::write(www.join("index.html"), "origin page").unwrap();
    let mut origin = sb.command("python3");
    origin.args([
        "-m",
        "http.server",
        "8080",
        "--bind",
        ORIGIN,
        "--directory",
        www.to_str().unwrap(),
    ]);
    sb.spawn(origin);
    let mut internal = sb.command("python3");
    internal.args([
        "-m",
        "http.server",
        "8081",
        "--bind",
        "127.0.0.1",
        "--directory",
        www.to_str().unwrap(),
    ]);
    sb.spawn(internal);
    let acl = h.dir.path().join("acl.yaml");
    fs::write(&acl, ACL).unwrap();
    // An invalid ACL is refused at start, naming file and line.
    let bad = h.dir.path().join("bad.yaml");
    fs::write(&bad, ACL.replace("action: report", "action: sometimes")).unwrap();
    let out = sb
        .command(env!("CARGO_BIN_EXE_hangar"))
        .args([
            "egress",
            "serve",
            "--egress-acl-file",
            bad.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("bad.yaml:10:") && err.contains("sometimes"),
        "{err}"
    );

    let mut proxy = sb.command(env!("CARGO_BIN_EXE_hangar"));
    proxy.args([
        "egress",
        "serve",
        "--egress-acl-file",
        acl.to_str().unwrap(),
        "--role",
        "s3cret=authed",
        "--role",
        "r3p=reporter",
        "--role",
        "op3n=opener",
        "--expose-prometheus-metrics",
    ]);
    let proxy_child = proxy
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let proxy_pid = proxy_child.id();
    sb.children.push(proxy_child);
    sb.wait_port(&format!("{ORIGIN}:8080"));
    sb.wait_port("127.0.0.1:4750");

    let origin = "origin.test:8080".to_string();
    let other = "other.test:8080".to_string();
    let url = |host: &str| format!("http://{host}/");
    let cases: Vec<(&str, String, &str, &str)> = vec![
        // method, target, password, expected status line prefix
        ("GET", url(&origin), "s3cret", "HTTP/1.0 200"),
        (
            "CONNECT",
            origin.clone(),
            "s3cret",
            "HTTP/1.1 200 OK tunnel:HTTP/1.0 200",
        ),
        ("GET", url(&other), "s3cret", "HTTP/1.1 407"),
        ("CONNECT", other.clone(), "s3cret", "HTTP/1.1 407"),
        ("GET", url(&origin), "", "HTTP/1.1 407"),
        ("CONNECT", origin.clone(), "", "HTTP/1.1 407"),
        ("GET", url(&origin), "wrong", "HTTP/1.1 407"),
        ("GET", url(&other), "r3p", "HTTP/1.0 200"),
        (
            "CONNECT",
            other.clone(),
            "r3p",
            "HTTP/1.1 200 OK tunnel:HTTP/1.0 200",
        ),
        ("GET", url(&other), "op3n", "HTTP/1.0 200"),
        ("GET", url("denied.example.com"), "op3n", "HTTP/1.1 407"),
        // The IP policy, whatever the ACL says (the open role passes the ACL):
        ("GET", url("internal.test:8081"), "op3n", "HTTP/1.1 407"),
        ("GET", url("metadata.test"), "op3n", "HTTP/1.1 407"),
        ("GET", url("private.test"), "op3n", "HTTP/1.1 407"),
        ("CONNECT", "127.0.0.1:8081".into(), "op3n", "HTTP/1.1 407"),
        ("CONNECT", "127.1:8081".into(), "op3n", "HTTP/1.1 407"),
        ("CONNECT", "2130706433:8081".into(), "op3n", "HTTP/1.1 407"),
        ("CONNECT", "0x7f000001:8081".into(), "op3n", "HTTP/1.1 407"),
        ("CONNECT", "0177.0.0.1:8081".into(), "op3n", "HTTP/1.1 407"),
        ("CONNECT", "[::1]:8081".into(), "op3n", "HTTP/1.1 407"),
        (
            "CONNECT",
            "[::ffff:127.0.0.1]:8081".into(),
            "op3n",
            "HTTP/1.1 407",
        ),
        (
            "CONNECT",
            "[::ffff:169.254.169.254]:80".into(),
            "op3n",
            "HTTP/1.1 407",
        ),
        (
            "CONNECT",
            "169.254.169.254:80".into(),
            "op3n",
            "HTTP/1.1 407",
        ),
        ("CONNECT", "127.0.0.1:4750".into(), "op3n", "HTTP/1.1 407"),
        // Every other spelling of a denied address is judged as that
        // address (407), never resolved or dialed as a name (502); a host
        // no URL parser accepts is a 400.
        ("GET", url("127.0.0.1.:8081"), "op3n", "HTTP/1.1 407"),
        ("CONNECT", "127.0.0.1.:8081".into(), "op3n", "HTTP/1.1 407"),
        ("GET", url("169.254.169.254."), "op3n", "HTTP/1.1 407"),
        ("GET", url("localhost.:8081"), "op3n", "HTTP/1.1 407"),
        ("GET", url("LOCALHOST:8081"), "op3n", "HTTP/1.1 407"),
        ("GET", url("metadata.test."), "op3n", "HTTP/1.1 407"),
        ("CONNECT", "[::1%25lo]:8081".into(), "op3n", "HTTP/1.1 407"),
        ("GET", url("[::1%25lo]:8081"), "op3n", "HTTP/1.1 407"),
        (
            "CONNECT",
            "[fe80::1%25eth0]:80".into(),
            "op3n",
            "HTTP/1.1 407",
        ),
        (
            "CONNECT",
            "[::ffff:0:127.0.0.1]:8081".into(),
            "op3n",
            "HTTP/1.1 407",
        ),
        ("GET", url("[::ffff:0:7f00:1]:8081"), "op3n", "HTTP/1.1 407"),
        (
            "CONNECT",
            "[::ffff:7f00:1]:8081".into(),
            "op3n",
            "HTTP/1.1 407",
        ),
        (
            "CONNECT",
            "[::127.0.0.1]:8081".into(),
            "op3n",
            "HTTP/1.1 407",
        ),
        (
            "CONNECT",
            "[64:ff9b::127.0.0.1]:8081".into(),
            "op3n",
            "HTTP/1.1 407",
        ),
        (
            "CONNECT",
            "[2002:7f00:1::]:8081".into(),
            "op3n",
            "HTTP/1.1 407",
        ),
        ("CONNECT", "[::]:8081".into(), "op3n", "HTTP/1.1 407"),
        ("CONNECT", "0.0.0.0:8081".into(), "op3n", "HTTP/1.1 407"),
        ("CONNECT", "0:8081".into(), "op3n", "HTTP/1.1 407"),
        ("CONNECT", "0x7f.1:8081".into(), "op3n", "HTTP/1.1 407"),
        (
            "CONNECT",
            "127.000.000.001:8081".into(),
            "op3n",
            "HTTP/1.1 407",
        ),
        ("GET", url("0x7F000001:8081"), "op3n", "HTTP/1.1 407"),
        ("GET", url("%31%32%37.0.0.1:8081"), "op3n", "HTTP/1.1 4"),
        ("CONNECT", "6425673729:8081".into(), "op3n", "HTTP/1.1 400"),
        ("GET", url("6425673729:8081"), "op3n", "HTTP/1.1 400"),
        ("CONNECT", "4294967296:8081".into(), "op3n", "HTTP/1.1 400"),
        ("CONNECT", "1.2.3.4.5:80".into(), "op3n", "HTTP/1.1 400"),
        ("CONNECT", "256.0.0.1:80".into(), "op3n", "HTTP/1.1 400"),
        ("CONNECT", "127.0.0.1..:8081".into(), "op3n", "HTTP/1.1 4"),
        ("CONNECT", "[::1:8081".into(), "op3n", "HTTP/1.1 400"),
        ("CONNECT", "[zz::1]:8081".into(), "op3n", "HTTP/1.1 400"),
        (
            "CONNECT",
            "nosuchname.invalid:80".into(),
            "op3n",
            "HTTP/1.1 502",
        ),
        ("GET", "/not-absolute".into(), "op3n", "HTTP/1.1 400"),
        (
            "CONNECT",
            format!("{ORIGIN}:8080"),
            "op3n",
            "HTTP/1.1 200 OK tunnel:HTTP/1.0 200",
        ),
    ];
    let asked: Vec<(&str, &str, &str)> = cases
        .iter()
        .map(|(m, t, p, _)| (*m, t.as_str(), *p))
        .collect();
    let got = sb.requests(&asked);
    for ((method, target, password, want), got) in cases.iter().zip(&got) {
        assert!(
            got.starts_with(want),
            "{method} {target} as {password:?}: got {got:?}, want {want:?}"
        );
    }
    let denial = &got[2];
    assert!(
        denial.contains("x-hangar-egress-error") || denial.contains("X-Hangar-Egress-Error"),
        "{denial}"
    );

    // Metrics count what happened, by decision, role and project.
    let metrics = sb
        .command("python3")
        .args(["-c", "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9810/metrics').read().decode())"])
        .output()
        .unwrap();
    assert!(
        metrics.status.success(),
        "metrics: {}",
        String::from_utf8_lossy(&metrics.stderr)
    );
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    assert!(
        metrics.contains(
            "hangar_egress_requests_total{decision=\"allow\",role=\"authed\",project=\"users\"} 2"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("hangar_egress_requests_total{decision=\"report\",role=\"reporter\",project=\"audit\"} 2"), "{metrics}");
    assert!(
        metrics.contains("hangar_egress_open_tunnels 0"),
        "{metrics}"
    );

    // SIGHUP reloads the ACL.
    fs::write(
        &acl,
        ACL.replace(
            "      - origin.test",
            "      - origin.test\n      - other.test",
        ),
    )
    .unwrap();
    assert!(Command::new("kill")
        .args(["-HUP", &proxy_pid.to_string()])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = sb.requests(&[("GET", &url(&other), "s3cret")]);
        if got[0].starts_with("HTTP/1.0 200") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the reloaded ACL never applied: {got:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A DNS server for the sandbox: fixed answers, one private, one public,
/// one that alternates between the public origin and 127.0.0.1 with TTL 0.
const DNS_SERVER: &str = r#"
import socket, struct, sys
origin = sys.argv[1]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.53", 53))
flips = 0
while True:
    data, addr = s.recvfrom(512)
    i, labels = 12, []
    while data[i]:
        labels.append(data[i + 1:i + 1 + data[i]].decode())
        i += data[i] + 1
    qtype = struct.unpack(">H", data[i + 1:i + 3])[0]
    name = ".".join(labels).lower()
    answers = []
    if qtype == 1:
        if name == "private.test": answers = ["10.0.0.1"]
        elif name == "meta.test": answers = ["169.254.169.254"]
        elif name == "public.test": answers = [origin]
        elif name == "mixed.test": answers = ["127.0.0.1", origin]
        elif name == "flip.test":
            flips += 1
            answers = [origin if flips % 2 else "127.0.0.1"]
    rcode = 0 if name.endswith(".test") else 3
    out = data[:2] + struct.pack(">HHHHH", 0x8180 | rcode, 1, len(answers), 0, 0) + data[12:i + 5]
    for a in answers:
        out += b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 0, 4) + socket.inet_aton(a)
    s.sendto(out, addr)
"#;

/// Answers every connection on 127.0.0.1:8080 with a status no origin uses.
const TRAP: &str = r#"
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 8080)); s.listen(64)
while True:
    c, _ = s.accept()
    c.recv(4096)
    c.sendall(b"HTTP/1.0 418 TRAPPED\r\nContent-Length: 0\r\n\r\n")
    c.close()
"#;

#[test]
fn dns_answers_are_checked_and_rebinding_cannot_win() {
    let h = Hangar::new();
    let mut sb = Sandbox::new();
    let www = h.dir.path().join("www");
    fs::create_dir_all(&www).unwrap();
    fs::write(www.join("index.html"), "origin page").unwrap();
    let mut origin = sb.command("python3");
    origin.args([
        "-m",
        "http.server",
        "8080",
        "--bind",
        ORIGIN,
        "--directory",
        www.to_str().unwrap(),
    ]);
    sb.spawn(origin);
    let mut trap = sb.command("python3");
    trap.args(["-c", TRAP]);
    sb.spawn(trap);
    let mut dns = sb.command("python3");
    dns.args(["-c", DNS_SERVER, ORIGIN]);
    sb.spawn(dns);
    let mut proxy = sb.command(env!("CARGO_BIN_EXE_hangar"));
    proxy.args([
        "egress",
        "serve",
        "--resolver-address",
        "127.0.0.53:53",
        "--dns-timeout",
        "2s",
    ]);
    sb.spawn(proxy);
    sb.wait_port(&format!("{ORIGIN}:8080"));
    sb.wait_port("127.0.0.1:8080");
    sb.wait_port("127.0.0.1:4750");

    let fixed = sb.requests(&[
        ("CONNECT", "private.test:8080", ""),
        ("CONNECT", "meta.test:80", ""),
        ("CONNECT", "public.test:8080", ""),
        ("CONNECT", "mixed.test:8080", ""),
        ("CONNECT", "nxdomain.example:80", ""),
    ]);
    assert!(fixed[0].starts_with("HTTP/1.1 407"), "{fixed:?}");
    assert!(fixed[1].starts_with("HTTP/1.1 407"), "{fixed:?}");
    assert!(
        fixed[2].starts_with("HTTP/1.1 200 OK tunnel:HTTP/1.0 200"),
        "{fixed:?}"
    );
    assert!(
        fixed[3].starts_with("HTTP/1.1 200 OK tunnel:HTTP/1.0 200"),
        "only the checked address is dialed: {fixed:?}"
    );
    assert!(fixed[4].starts_with("HTTP/1.1 502"), "{fixed:?}");

    // The flipping name: every answer is either the origin or a refusal,
    // never the loopback trap.
    let mut cases = Vec::new();
    for _ in 0..10 {
        cases.push(("CONNECT", "flip.test:8080", ""));
        cases.push(("GET", "http://flip.test:8080/", ""));
    }
    let got = sb.requests(&cases);
    assert!(
        got.iter().all(|g| !g.contains("418")),
        "rebinding reached loopback: {got:?}"
    );
    assert!(got.iter().any(|g| g.contains(" 200")), "{got:?}");
    assert!(got.iter().any(|g| g.starts_with("HTTP/1.1 407")), "{got:?}");
}

#[test]
fn tls_listener_takes_the_role_from_the_client_certificate() {
    require("openssl");
    let h = Hangar::new();
    let mut sb = Sandbox::new();
    let d = h.dir.path();
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(d)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=hangar-test-ca",
    ]);
    fs::write(
        d.join("server.ext"),
        "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1\n",
    )
    .unwrap();
    fs::write(
        d.join("client.ext"),
        "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    for (name, cn) in [("server", "localhost"), ("client", "billing")] {
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={cn}"),
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            "1",
            "-extfile",
            &format!("{name}.ext"),
        ]);
    }
    let bundle = [
        fs::read_to_string(d.join("server.pem")).unwrap(),
        fs::read_to_string(d.join("server.key")).unwrap(),
    ]
    .concat();
    fs::write(d.join("bundle.pem"), bundle).unwrap();
    fs::write(
        d.join("acl.yaml"),
        "version: v1\nservices:\n  - name: billing\n    project: payments\n    action: enforce\n    allowed_domains: [origin.test]\ndefault:\n  project: other\n  action: enforce\n",
    )
    .unwrap();
    let www = d.join("www");
    fs::create_dir_all(&www).unwrap();
    fs::write(www.join("index.html"), "origin page").unwrap();
    let mut origin = sb.command("python3");
    origin.args([
        "-m",
        "http.server",
        "8080",
        "--bind",
        ORIGIN,
        "--directory",
        www.to_str().unwrap(),
    ]);
    sb.spawn(origin);
    let mut proxy = sb.command(env!("CARGO_BIN_EXE_hangar"));
    proxy.args([
        "egress",
        "serve",
        "--egress-acl-file",
        d.join("acl.yaml").to_str().unwrap(),
    ]);
    proxy
        .arg("--tls-server-bundle-file")
        .arg(d.join("bundle.pem"));
    proxy.arg("--tls-client-ca-file").arg(d.join("ca.pem"));
    sb.spawn(proxy);
    sb.wait_port(&format!("{ORIGIN}:8080"));
    sb.wait_port("127.0.0.1:4750");
    let client = r#"
import socket, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[1])
ctx.check_hostname = False
if sys.argv[2]:
    ctx.load_cert_chain(sys.argv[2], sys.argv[3])
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", 4750), 5))
s.sendall(b"CONNECT origin.test:8080 HTTP/1.1\r\nHost: origin.test\r\n\r\n")
print(s.recv(4096).decode().split("\r\n")[0])
"#;
    let ask = |cert: &str, key: &str| {
        let out = sb
            .command("python3")
            .args(["-c", client, d.join("ca.pem").to_str().unwrap(), cert, key])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "client: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let with_cert = ask(
        d.join("client.pem").to_str().unwrap(),
        d.join("client.key").to_str().unwrap(),
    );
    assert!(
        with_cert.starts_with("HTTP/1.1 200"),
        "CN=billing may reach origin.test: {with_cert}"
    );
    let without = ask("", "");
    assert!(
        without.starts_with("HTTP/1.1 407"),
        "no certificate falls to the default rule: {without}"
    );
}

#[test]
fn limits_answer_429_and_503() {
    let mut sb = Sandbox::new();
    // An origin that holds each request for two seconds.
    let slow = r#"
import socket, threading, time, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 8080)); s.listen(64)
def serve(c):
    c.recv(4096); time.sleep(2)
    c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 4\r\n\r\nslow"); c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;
    let mut origin = sb.command("python3");
    origin.args(["-c", slow, ORIGIN]);
    sb.spawn(origin);
    let mut proxy = sb.command(env!("CARGO_BIN_EXE_hangar"));
    proxy.args([
        "egress",
        "serve",
        "--max-concurrent-requests",
        "1",
        "--max-concurrent-connect-tunnels",
        "1",
    ]);
    sb.spawn(proxy);
    sb.wait_port(&format!("{ORIGIN}:8080"));
    sb.wait_port("127.0.0.1:4750");
    let client = format!(
        r#"
import socket, threading, time
results = {{}}
def get(name, delay):
    time.sleep(delay)
    s = socket.create_connection(("127.0.0.1", 4750), 10)
    s.sendall(b"GET http://{ORIGIN}:8080/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    results[name] = s.recv(4096).decode().split("\r\n")[0]
threads = [threading.Thread(target=get, args=("first", 0)), threading.Thread(target=get, args=("second", 0.5))]
[t.start() for t in threads]; [t.join() for t in threads]
held = socket.create_connection(("127.0.0.1", 4750), 10)
held.sendall(b"CONNECT {ORIGIN}:8080 HTTP/1.1\r\nHost: x\r\n\r\n")
results["tunnel1"] = held.recv(4096).decode().split("\r\n")[0]
time.sleep(0.3)
other = socket.create_connection(("127.0.0.1", 4750), 10)
other.sendall(b"CONNECT {ORIGIN}:8080 HTTP/1.1\r\nHost: x\r\n\r\n")
results["tunnel2"] = other.recv(4096).decode().split("\r\n")[0]
print(results)
"#
    );
    let out = sb
        .command("python3")
        .args(["-c", &client])
        .output()
        .unwrap();
    let got = String::from_utf8_lossy(&out.stdout);
    assert!(
        got.contains("'first': 'HTTP/1.0 200 OK'"),
        "{got} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(got.contains("'second': 'HTTP/1.1 429"), "{got}");
    assert!(got.contains("'tunnel1': 'HTTP/1.1 200"), "{got}");
    assert!(got.contains("'tunnel2': 'HTTP/1.1 503"), "{got}");
}
