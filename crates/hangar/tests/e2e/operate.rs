//! Operating running apps on a real node: `hangar proxy` to a TCP service
//! inside a machine, and a hostile second org refused.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::machine::{busybox_image, Node};
use crate::support::*;

fn config_value(node: &Node, key: &str) -> String {
    std::fs::read_to_string(node.h.home().join("config.toml"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key} = ")))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap()
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
    let node = Node::start();
    let api = config_value(&node, "api")
        .trim_start_matches("http://")
        .to_string();
    let admin = config_value(&node, "token");
    let call = |token: &str, method: &str, path: &str, body: &Value| {
        let auth = format!("Bearer {token}");
        http(
            method,
            &api,
            path,
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            body.to_string().as_bytes(),
        )
    };
    let token = |org: &str| {
        node.h
            .ok(&["auth", "token", "create", "--org", org])
            .trim()
            .to_string()
    };
    let (acme, evil) = (token("acme"), token("evil"));
    for (app, org) in [("acme-app", "acme"), ("evil-app", "evil")] {
        let r = call(
            &admin,
            "POST",
            "/v1/apps",
            &json!({"name": app, "org": org}),
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }
    // A service that answers the SHA-256 of whatever a connection sends.
    let image = busybox_image(&node.h);
    let script = "printf '#!/bin/sh\\nexec busybox sha256sum\\n' > /h.sh; busybox chmod +x /h.sh; exec nc -ll -p 7000 -e /h.sh";
    let r = call(
        &admin,
        "POST",
        "/v1/machines",
        &json!({"config": {"image": image, "metadata": {"app": "acme-app"},
            "init": {"cmd": ["sh", "-c", script]}}}),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let id = r.json()["id"].as_str().unwrap().to_string();
    let r = call(
        &admin,
        "GET",
        &format!("/v1/machines/{id}/wait?state=started&timeout=60"),
        &json!({}),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

    let port = free_port();
    let mut proxy = node
        .h
        .command(&["proxy", &format!("{port}:7000"), "-a", "acme-app"])
        .env("HANGAR_API_TOKEN", &acme)
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
        .env("HANGAR_API_TOKEN", &evil)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("no machine"), "{text}");
    let auth = format!("Bearer {evil}");
    let r = http(
        "GET",
        &api,
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
        .env("HANGAR_API_TOKEN", &acme)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("nothing answers on port 7999"), "{text}");

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
