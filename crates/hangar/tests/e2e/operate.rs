//! Operating running apps on a real node: `hangar proxy` to a TCP service
//! inside a machine, and a hostile second org refused.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::machine::{busybox_image, Node};
use crate::support::*;

/// A node with orgs `acme` and `evil`, each with a token and an app
/// (`acme-app`, `evil-app`): the API's address and the admin's token.
pub(crate) struct TwoOrgs {
    pub node: Node,
    pub api: String,
    pub admin: String,
    pub acme: String,
    pub evil: String,
}

impl TwoOrgs {
    pub fn start() -> TwoOrgs {
        TwoOrgs::start_with(&[])
    }

    /// With more arguments to `hangar up`.
    pub fn start_with(up_args: &[&str]) -> TwoOrgs {
        let node = Node::start_with(up_args);
        let api = node.config("api").trim_start_matches("http://").to_string();
        let admin = node.config("token");
        let token = |org: &str| {
            node.h
                .ok(&["auth", "token", "create", "--org", org])
                .trim()
                .to_string()
        };
        let (acme, evil) = (token("acme"), token("evil"));
        let t = TwoOrgs {
            node,
            api,
            admin,
            acme,
            evil,
        };
        for (app, org) in [("acme-app", "acme"), ("evil-app", "evil")] {
            let r = t.call(
                &t.admin,
                "POST",
                "/v1/apps",
                &json!({"name": app, "org": org}),
            );
            assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        }
        t
    }

    /// A JSON call to the API with `token`.
    pub fn call(&self, token: &str, method: &str, path: &str, body: &Value) -> HttpResponse {
        let auth = format!("Bearer {token}");
        http(
            method,
            &self.api,
            path,
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            body.to_string().as_bytes(),
        )
    }

    /// A started machine of `app` running `cmd` (with `more` config),
    /// created by the admin: its id and name.
    pub fn machine(&self, app: &str, cmd: &[&str], more: Value) -> (String, String) {
        let image = busybox_image(&self.node.h);
        let mut config = json!({"image": image, "metadata": {"app": app}, "init": {"cmd": cmd}});
        if let (Some(c), Some(m)) = (config.as_object_mut(), more.as_object()) {
            c.extend(m.clone());
        }
        let r = self.call(
            &self.admin,
            "POST",
            "/v1/machines",
            &json!({ "config": config }),
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let (id, name) = (
            r.json()["id"].as_str().unwrap().to_string(),
            r.json()["name"].as_str().unwrap().to_string(),
        );
        let r = self.call(
            &self.admin,
            "GET",
            &format!("/v1/machines/{id}/wait?state=started&timeout=60"),
            &json!({}),
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        (id, name)
    }
}

/// `n` bytes that are not all the same (xorshift).
fn bytes(n: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(n);
    out
}

/// Send `data` to the service at `addr` (it answers the SHA-256 of what it
/// read), close the sending half, and return its answer.
fn hash_through(addr: &str, data: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut w = s.try_clone().unwrap();
    let data = data.to_vec();
    let writer = std::thread::spawn(move || {
        w.write_all(&data).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    writer.join().unwrap();
    out.split_whitespace().next().unwrap_or("").to_string()
}

#[test]
fn hangar_proxy_carries_streams_to_a_machine_and_refuses_another_org() {
    let t = TwoOrgs::start();
    let (node, api, acme, evil) = (&t.node, &t.api, &t.acme, &t.evil);
    // A service that answers the SHA-256 of whatever a connection sends.
    let script = "printf '#!/bin/sh\\nexec busybox sha256sum\\n' > /h.sh; busybox chmod +x /h.sh; exec nc -ll -p 7000 -e /h.sh";
    let (id, _) = t.machine("acme-app", &["sh", "-c", script], json!({}));
    // `hangar proxy` refuses a port nothing listens on: wait until the
    // service does (the node reaches the machine's address).
    let status = t.call(&t.admin, "GET", &format!("/v1/machines/{id}"), &json!({}));
    let service = format!("{}:7000", status.json()["ipv4"].as_str().unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect_timeout(&service.parse().unwrap(), Duration::from_secs(1)).is_err() {
        assert!(
            Instant::now() < deadline,
            "the service in the machine never listened"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let port = free_port();
    let mut proxy = node
        .h
        .command(&["proxy", &format!("{port}:7000"), "-a", "acme-app"])
        .env("HANGAR_API_TOKEN", acme)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = String::new();
    let mut err = BufReader::new(proxy.stderr.take().unwrap());
    err.read_line(&mut said).unwrap();
    assert!(
        said.contains(&format!("to port 7000 of machine {id}")),
        "{said}"
    );
    let local = format!("127.0.0.1:{port}");
    // The service may still be starting: retry the first small one.
    let deadline = Instant::now() + Duration::from_secs(30);
    while hash_through(&local, b"hello") != sha256_hex(b"hello") {
        assert!(
            Instant::now() < deadline,
            "the service never answered through the proxy"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // 100 MB intact, and ten streams at once.
    let big = bytes(100 << 20, 7);
    assert_eq!(hash_through(&local, &big), sha256_hex(&big));
    let many: Vec<_> = (0..10u64)
        .map(|i| {
            let local = local.clone();
            std::thread::spawn(move || {
                let data = bytes(1 << 20, i + 1);
                hash_through(&local, &data) == sha256_hex(&data)
            })
        })
        .collect();
    for t in many {
        assert!(t.join().unwrap());
    }

    // Another org: the machine does not exist for it, by the CLI or the API.
    let out = node
        .h
        .command(&[
            "proxy",
            &format!("{}:7000", free_port()),
            "-a",
            "acme-app",
            "--machine",
            &id,
        ])
        .env("HANGAR_API_TOKEN", evil)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("no machine"), "{text}");
    let auth = format!("Bearer {evil}");
    let r = http(
        "GET",
        api,
        &format!("/v1/machines/{id}/proxy?port=7000"),
        &[
            ("Authorization", &auth),
            ("Connection", "upgrade"),
            ("Upgrade", "hangar-tcp"),
        ],
        b"",
    );
    assert_eq!(r.status, 404, "{}", String::from_utf8_lossy(&r.body));
    // A port nothing listens on is refused with the reason, before any stream.
    let out = node
        .h
        .command(&["proxy", &format!("{}:7999", free_port()), "-a", "acme-app"])
        .env("HANGAR_API_TOKEN", acme)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("nothing answers on port 7999"), "{text}");

    // A flood of tunnels: evil's stop at its limit on the node, and acme
    // opens its own meanwhile.
    let (evil_id, _) = t.machine(
        "evil-app",
        &["nc", "-ll", "-p", "7000", "-e", "cat"],
        json!({}),
    );
    // A tunnel, or the answer's head.
    let open = |token: &str, machine: &str| -> Result<TcpStream, String> {
        let mut c = TcpStream::connect(api).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            c,
            "GET /v1/machines/{machine}/proxy?port=7000 HTTP/1.1\r\nHost: n\r\nAuthorization: Bearer {token}\r\nConnection: upgrade\r\nUpgrade: hangar-tcp\r\n\r\n"
        )
        .unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if c.read(&mut b).unwrap_or(0) == 0 {
                break;
            }
            head.push(b[0]);
        }
        let head = String::from_utf8_lossy(&head).to_string();
        if head.starts_with("HTTP/1.1 101") {
            Ok(c)
        } else {
            Err(head)
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while open(evil, &evil_id).is_err() {
        assert!(Instant::now() < deadline, "evil's service never listened");
        std::thread::sleep(Duration::from_millis(200));
    }
    // (the one just opened closes; the node notices within a moment)
    std::thread::sleep(Duration::from_millis(300));
    let held: Vec<TcpStream> = (0..64)
        .map(|i| open(evil, &evil_id).unwrap_or_else(|head| panic!("tunnel {i}: {head}")))
        .collect();
    let refused = open(evil, &evil_id).expect_err("evil opened a 65th tunnel");
    assert!(
        refused.starts_with("HTTP/1.1 429"),
        "the 65th tunnel: {refused}"
    );
    let mine = open(acme, &id).expect("acme's tunnel, while evil's are at their limit");
    drop(mine);
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    while open(evil, &evil_id).is_err() {
        assert!(
            Instant::now() < deadline,
            "closed tunnels were never given back"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Ctrl-C stops it cleanly.
    let pid = proxy.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = proxy.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "hangar proxy did not stop on Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
}

/// A pseudo-terminal: the master for the test, the slave for the CLI.
fn pty() -> (std::fs::File, std::fs::File) {
    use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).unwrap();
    grantpt(&master).unwrap();
    unlockpt(&master).unwrap();
    let name = ptsname(&master, Vec::new()).unwrap();
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(name.to_str().unwrap())
        .unwrap();
    (std::fs::File::from(master), slave)
}

/// What the terminal has shown so far, read on a thread.
struct Screen(std::sync::Arc<std::sync::Mutex<String>>);

impl Screen {
    fn watch(mut master: std::fs::File) -> Screen {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let s = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = master.read(&mut buf) {
                if n == 0 {
                    break;
                }
                s.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Screen(seen)
    }

    fn wait_for(&self, text: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.0.lock().unwrap().contains(text) {
            assert!(
                Instant::now() < deadline,
                "the terminal never showed {text:?}; it shows:\n{}",
                self.0.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `hangar <args>` (an `ssh console`) with `token`, driven from a terminal
/// the test holds, as a user would: a command (in the machine named
/// `hostname`), the terminal's size and a resize, Ctrl-C, and the exit
/// code of the shell.
pub(crate) fn drive_console(node: &Node, token: &str, args: &[&str], hostname: &str) {
    let (master, slave) = pty();
    rustix::termios::tcsetwinsize(
        &master,
        rustix::termios::Winsize {
            ws_row: 24,
            ws_col: 80,
            ws_xpixel: 0,
            ws_ypixel: 0,
        },
    )
    .unwrap();
    let mut cli = node
        .h
        .command(args)
        .env("HANGAR_API_TOKEN", token)
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave))
        .spawn()
        .unwrap();
    let mut keys = master.try_clone().unwrap();
    let screen = Screen::watch(master.try_clone().unwrap());
    let mut type_in = |s: &str| keys.write_all(s.as_bytes()).unwrap();
    type_in("echo hi-$((6*7)) $(hostname)\r");
    screen.wait_for("hi-42", Duration::from_secs(30));
    // It runs in the machine: its hostname is the machine's.
    screen.wait_for(&format!("hi-42 {hostname}"), Duration::from_secs(5));
    // The size follows the terminal's.
    type_in("busybox stty size\r");
    screen.wait_for("24 80", Duration::from_secs(10));
    rustix::termios::tcsetwinsize(
        &master,
        rustix::termios::Winsize {
            ws_row: 50,
            ws_col: 132,
            ws_xpixel: 0,
            ws_ypixel: 0,
        },
    )
    .unwrap();
    let pid = cli.id().to_string();
    // What a terminal emulator's resize makes the kernel do.
    assert!(std::process::Command::new("kill")
        .args(["-WINCH", &pid])
        .status()
        .unwrap()
        .success());
    std::thread::sleep(Duration::from_millis(500));
    type_in("busybox stty size\r");
    screen.wait_for("50 132", Duration::from_secs(10));
    // Ctrl-C interrupts what runs, not the session.
    type_in("sleep 60\r");
    std::thread::sleep(Duration::from_millis(700));
    type_in("\x03");
    type_in("echo after-$((1+1))\r");
    screen.wait_for("after-2", Duration::from_secs(10));
    // The exit code is the shell's.
    type_in("exit 7\r");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = cli.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the console did not end with the shell"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(7));
}

#[test]
fn ssh_console_is_a_real_terminal_in_the_machine_and_refuses_another_org() {
    let t = TwoOrgs::start();
    let (node, api, acme, evil) = (&t.node, &t.api, &t.acme, &t.evil);
    let (id, name) = t.machine("acme-app", &["sleep", "3600"], json!({}));

    // An interactive shell on a terminal the test holds.
    drive_console(node, acme, &["ssh", "console", "-a", "acme-app"], &name);

    // One command, no terminal of its own.
    let out = node
        .h
        .command(&[
            "ssh",
            "console",
            "-a",
            "acme-app",
            "-C",
            "echo one-$((2*3)); exit 3",
        ])
        .env("HANGAR_API_TOKEN", acme)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("one-6"));

    // Another org: no such machine, by the CLI or the API.
    let out = node
        .h
        .command(&[
            "ssh",
            "console",
            "-a",
            "acme-app",
            "--machine",
            &id,
            "-C",
            "id",
        ])
        .env("HANGAR_API_TOKEN", evil)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("no machine"), "{text}");
    let auth = format!("Bearer {evil}");
    let r = http(
        "GET",
        api,
        &format!("/v1/machines/{id}/console"),
        &[
            ("Authorization", &auth),
            ("Connection", "upgrade"),
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
        b"",
    );
    assert_eq!(r.status, 404, "{}", String::from_utf8_lossy(&r.body));
}
