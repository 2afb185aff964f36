//! The app workflow as a new user lives it, on a real node (as root):
//! launch and deploy the bundled example, HTTP through the edge, a broken
//! release rolled back, scale, secrets, scale to zero and back, and a node
//! restart that keeps it all.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::machine::{busybox_image, Node};

/// The example app, copied, on the test's busybox image.
fn example_app(node: &Node, base: &str) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/hello");
    let dir = node.h.dir.path().join("hello");
    let out = std::process::Command::new("cp")
        .arg("-a")
        .arg(&src)
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    let toml = fs::read_to_string(dir.join("hangar.toml")).unwrap();
    let toml = toml.replace(
        "base = \"localhost/busybox:demo\"",
        &format!("base = \"{base}\""),
    );
    // Quicker checks than the example's, for a quicker test.
    let toml = toml.replace("interval = \"2s\"", "interval = \"300ms\"");
    fs::write(dir.join("hangar.toml"), toml).unwrap();
    dir
}

fn hangar_in(node: &Node, dir: &Path, args: &[&str]) -> Output {
    node.h.command(args).current_dir(dir).output().unwrap()
}

fn ok_in(node: &Node, dir: &Path, args: &[&str]) -> String {
    let out = hangar_in(node, dir, args);
    assert!(
        out.status.success(),
        "hangar {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// GET through the node's edge; (status, body).
fn get(node: &Node, path: &str) -> (u16, String) {
    get_at(&node.edge, path)
}

fn get_at(edge: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(edge).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: hello.localhost\r\n\r\n").unwrap();
    let mut raw = String::new();
    let _ = s.read_to_string(&mut raw);
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn status_json(node: &Node, dir: &Path) -> Value {
    serde_json::from_str(&ok_in(node, dir, &["status", "--json"])).unwrap()
}

fn all_stopped(node: &Node, dir: &Path) -> bool {
    machines(&status_json(node, dir))
        .iter()
        .all(|m| m["state"] == "stopped")
}

fn machines(v: &Value) -> Vec<Value> {
    v["machines"].as_array().cloned().unwrap_or_default()
}

fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Run `f` while another thread GETs through the edge without pause; every
/// answer must be a 200.
fn without_errors_under_load(node: &Node, f: impl FnOnce()) {
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (stop, edge) = (stop.clone(), node.edge.clone());
        std::thread::spawn(move || {
            let (mut n, mut failed) = (0, Vec::new());
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let (code, body) = get_at(&edge, &format!("/healthz?load={n}"));
                if code != 200 {
                    failed.push(format!("{code}: {body}"));
                }
            }
            (n, failed)
        })
    };
    f();
    stop.store(true, Ordering::SeqCst);
    let (n, failed) = load.join().unwrap();
    assert!(n > 10, "only {n} requests during the deploy");
    assert!(
        failed.is_empty(),
        "{} of {n} requests failed during a deploy: {failed:?}",
        failed.len()
    );
}

#[test]
fn launch_deploy_rollback_scale_secrets_scale_to_zero_and_restart() {
    let mut node = Node::start();
    let base = busybox_image(&node.h);
    let dir = example_app(&node, &base);

    // Launch (the example brings its hangar.toml) and deploy.
    let out = ok_in(&node, &dir, &["launch"]);
    assert!(out.contains("Created app hello"), "{out}");
    let out = ok_in(&node, &dir, &["deploy", "--count", "2"]);
    assert!(out.contains("release v1 is complete"), "{out}");
    let v = status_json(&node, &dir);
    assert_eq!(machines(&v).len(), 2);
    assert!(
        machines(&v)
            .iter()
            .all(|m| m["state"] == "started" && m["checks"][0]["status"] == "passing"),
        "{v}"
    );
    let (code, body) = get(&node, "/");
    assert_eq!(code, 200);
    assert!(body.contains("Hello from a Hangar machine"), "{body}");
    let (code, body) = get(&node, "/cgi-bin/info");
    assert_eq!(code, 200);
    assert!(body.contains("\"app\": \"hello\""), "{body}");

    // A broken version (its health path is gone) is rolled back, and the
    // old one keeps serving.
    fs::rename(dir.join("www/healthz"), dir.join("healthz.away")).unwrap();
    let out = hangar_in(&node, &dir, &["deploy"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("failed its check") && stderr.contains("404"),
        "{stderr}"
    );
    assert!(
        stderr.contains("last log lines") && stderr.contains("hello from"),
        "{stderr}"
    );
    fs::rename(dir.join("healthz.away"), dir.join("www/healthz")).unwrap();
    let releases: Value =
        serde_json::from_str(&ok_in(&node, &dir, &["releases", "--json"])).unwrap();
    assert_eq!(releases[0]["status"], "failed");
    assert_eq!(releases[1]["status"], "complete");
    let v = status_json(&node, &dir);
    assert_eq!(v["release"]["version"], 1);
    assert_eq!(machines(&v).len(), 2);
    assert!(machines(&v).iter().all(|m| m["release"] == 1));
    assert_eq!(get(&node, "/healthz"), (200, "ok\n".to_string()));

    // The deploy token the CLI keeps, revoked: the next deploy makes a
    // new one instead of failing its push.
    let kept = fs::read_dir(node.h.home())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("deploy-token-")
        })
        .expect("a kept deploy token");
    let old = fs::read_to_string(&kept).unwrap();
    let id = old
        .trim()
        .strip_prefix("hgr_")
        .unwrap()
        .split('_')
        .next()
        .unwrap()
        .to_string();
    node.h.ok(&["auth", "token", "revoke", &id]);

    // A rolling deploy of an app on one machine, under load: the new
    // machine takes the traffic before the old one is signalled.
    ok_in(&node, &dir, &["scale", "count", "1"]);
    without_errors_under_load(&node, || {
        ok_in(&node, &dir, &["deploy"]);
    });
    assert_ne!(
        fs::read_to_string(&kept).unwrap(),
        old,
        "a new deploy token"
    );

    // Scale to three: three healthy backends answer.
    ok_in(&node, &dir, &["scale", "count", "3"]);
    assert_eq!(machines(&status_json(&node, &dir)).len(), 3);
    // The edge takes the new machine in within a reconcile tick.
    let mut seen = std::collections::BTreeSet::new();
    let mut i = 0;
    wait_until("requests reach all three machines", 10, || {
        i += 1;
        let (code, body) = get(&node, &format!("/cgi-bin/info?n={i}"));
        assert_eq!(code, 200);
        let info: Value = serde_json::from_str(body.trim()).unwrap();
        seen.insert(info["machine"].as_str().unwrap().to_string());
        seen.len() == 3
    });

    // The other strategies: bluegreen replaces all three at once after
    // they pass; immediate does not wait for checks.
    for strategy in ["bluegreen", "immediate"] {
        let toml = fs::read_to_string(dir.join("hangar.toml")).unwrap();
        let toml = toml.replace(
            "strategy = \"rolling\"",
            &format!("strategy = \"{strategy}\""),
        );
        let toml = toml.replace(
            "strategy = \"bluegreen\"",
            &format!("strategy = \"{strategy}\""),
        );
        fs::write(dir.join("hangar.toml"), toml).unwrap();
        let out = ok_in(&node, &dir, &["deploy"]);
        assert!(
            out.contains(&format!("3 machine(s), {strategy} strategy")),
            "{out}"
        );
        let v = status_json(&node, &dir);
        let version = &v["release"]["version"];
        assert_eq!(machines(&v).len(), 3, "{v}");
        assert!(machines(&v).iter().all(|m| &m["release"] == version), "{v}");
    }
    wait_until("the edge serves the immediate release", 10, || {
        get(&node, "/healthz?after-immediate").0 == 200
    });
    let toml = fs::read_to_string(dir.join("hangar.toml")).unwrap();
    fs::write(
        dir.join("hangar.toml"),
        toml.replace("strategy = \"immediate\"", "strategy = \"rolling\""),
    )
    .unwrap();

    // A secret: in the app's environment, in no API or CLI output. Setting
    // it redeploys the three machines one by one; a client requesting all
    // the while sees no error (the edge drops a machine before it is
    // signalled, and a request cut off by a dying machine goes elsewhere).
    let secret = "s3cr3t-v4lue-9731";
    without_errors_under_load(&node, || {
        ok_in(
            &node,
            &dir,
            &[
                "secrets",
                "set",
                &format!("DB_PASSWORD={secret}"),
                "GREETING=from-a-secret",
            ],
        );
    });
    let v = status_json(&node, &dir);
    let id = machines(&v)[0]["id"].as_str().unwrap().to_string();
    let (code, env) = node.exec(&id, &["sh", "-c", "echo $DB_PASSWORD"]);
    assert_eq!((code, env.trim()), (0, secret));
    // A secret wins over [env] on the same name.
    let (_, greeting) = node.exec(&id, &["sh", "-c", "echo $GREETING"]);
    assert_eq!(greeting.trim(), "from-a-secret");
    let outputs = vec![
        ok_in(&node, &dir, &["status", "--json"]),
        ok_in(&node, &dir, &["releases", "--json"]),
        ok_in(&node, &dir, &["secrets", "list", "--json"]),
        ok_in(&node, &dir, &["machine", "status", &id, "--json"]),
        ok_in(&node, &dir, &["machine", "list", "--json"]),
    ];
    for o in &outputs {
        assert!(!o.contains(secret), "the secret leaked: {o}");
    }
    for file in ["state.db", "state.db-wal"] {
        let raw = fs::read(node.h.home().join(file)).unwrap_or_default();
        assert!(
            !raw.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "the secret is in {file} in the clear"
        );
    }
    assert!(node.h.home().join("state.db").exists());
    assert!(outputs[2].contains("DB_PASSWORD"));

    // `hangar console`: a short-lived machine of the release, with its
    // secrets, running hangar.toml's console_command, gone when it ends.
    let app_machines = |node: &Node| -> Vec<String> {
        let list: serde_json::Value =
            serde_json::from_str(&node.h.ok(&["machine", "list", "--json"])).unwrap();
        let mut ids: Vec<String> = list
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["app"] == "hello" && m["state"] != "destroyed")
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    };
    let before = app_machines(&node);
    let toml = fs::read_to_string(dir.join("hangar.toml")).unwrap();
    fs::write(
        dir.join("hangar.toml"),
        toml.replacen(
            "app = \"hello\"\n",
            "app = \"hello\"\nconsole_command = \"echo console-$DB_PASSWORD-$(busybox hostname); exit 5\"\n",
            1,
        ),
    )
    .unwrap();
    let out = node
        .h
        .command(&["console"])
        .current_dir(&dir)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(5),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(&format!("console-{secret}-")), "{text}");
    let said = String::from_utf8_lossy(&out.stderr);
    let console_id = said
        .split_whitespace()
        .nth(2)
        .unwrap_or_default()
        .to_string();
    assert!(
        !before.contains(&console_id) && !console_id.is_empty(),
        "{said}"
    );
    assert_eq!(app_machines(&node), before, "the console machine stayed");
    fs::write(dir.join("hangar.toml"), toml).unwrap();

    // Scale to zero: idle machines stop; the next request starts one.
    let toml = fs::read_to_string(dir.join("hangar.toml")).unwrap();
    let toml = toml
        .replace(
            "auto_stop_machines = \"off\"",
            "auto_stop_machines = \"stop\"\nidle_timeout = \"2s\"",
        )
        .replace("min_machines_running = 1", "min_machines_running = 0");
    fs::write(dir.join("hangar.toml"), toml).unwrap();
    ok_in(&node, &dir, &["deploy", "--count", "1"]);
    wait_until("the idle machine stops", 30, || all_stopped(&node, &dir));
    let started = Instant::now();
    let (code, body) = get(&node, "/healthz?wake");
    assert_eq!(
        (code, body.as_str()),
        (200, "ok\n"),
        "a request to a stopped app is served"
    );
    eprintln!("cold start through the edge: {:?}", started.elapsed());
    assert!(machines(&status_json(&node, &dir))
        .iter()
        .any(|m| m["state"] == "started"));

    // The node restarts (killed): the same app, release and machines.
    let before = status_json(&node, &dir);
    node.kill9();
    node.up();
    let after = status_json(&node, &dir);
    assert_eq!(before["release"]["version"], after["release"]["version"]);
    let ids = |v: &Value| {
        machines(v)
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&before), ids(&after));
    wait_until("the edge serves again", 30, || {
        get(&node, "/healthz?again").0 == 200
    });

    // The node killed in the middle of a deploy: when it starts again,
    // the deploy is rolled back and the app is as it was.
    let before = status_json(&node, &dir);
    let old_release = before["release"]["version"].clone();
    let count = machines(&before).len();
    fs::write(dir.join("www/next.html"), "next\n").unwrap();
    let mut deploy = node
        .h
        .command(&["deploy"])
        .current_dir(&dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the deploy has created a machine", 30, || {
        machines(&status_json(&node, &dir)).len() > count
    });
    node.kill9();
    let _ = deploy.wait();
    node.up();
    wait_until("the cut-short deploy is rolled back", 60, || {
        let v = status_json(&node, &dir);
        let ms = machines(&v);
        ms.len() == count && ms.iter().all(|m| m["release"] == old_release)
    });
    let releases: Value =
        serde_json::from_str(&ok_in(&node, &dir, &["releases", "--json"])).unwrap();
    assert_eq!(releases[0]["status"], "failed", "{releases}");
    assert!(
        releases[0]["description"]
            .as_str()
            .is_some_and(|d| d.contains("node stopped")),
        "{releases}"
    );
    assert_eq!(status_json(&node, &dir)["release"]["version"], old_release);
    // HTTPS at the edge's TLS listener (HTTP/2); with force_https, plain
    // HTTP is redirected there.
    let https = |path: &str| {
        let port = node.edge_tls.rsplit(':').next().unwrap().to_string();
        let out = std::process::Command::new("curl")
            .args([
                "-sk",
                "--max-time",
                "10",
                "--http2",
                "-o",
                "-",
                "-w",
                "\n%{http_version} %{http_code}",
            ])
            .args(["--resolve", &format!("hello.localhost:{port}:127.0.0.1")])
            .arg(format!("https://hello.localhost:{port}{path}"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut tries = 0;
    wait_until("the app answers over HTTPS", 30, || {
        tries += 1;
        https(&format!("/healthz?tls={tries}")).ends_with("2 200")
    });
    let toml = fs::read_to_string(dir.join("hangar.toml")).unwrap();
    fs::write(
        dir.join("hangar.toml"),
        toml.replace(
            "internal_port = 8080",
            "internal_port = 8080\nforce_https = true",
        ),
    )
    .unwrap();
    ok_in(&node, &dir, &["deploy"]);
    wait_until("plain HTTP is redirected to HTTPS", 30, || {
        let mut s = TcpStream::connect(&node.edge).unwrap();
        write!(
            s,
            "GET /healthz?plain HTTP/1.0\r\nHost: hello.localhost\r\n\r\n"
        )
        .unwrap();
        let mut raw = String::new();
        let _ = s.read_to_string(&mut raw);
        raw.starts_with("HTTP/1.0 308")
            && raw.to_ascii_lowercase().contains(&format!(
                "location: https://hello.localhost:{}/healthz?plain",
                node.edge_tls.rsplit(':').next().unwrap()
            ))
    });
    assert!(https("/healthz?secure").ends_with("2 200"));

    let apps: Value =
        serde_json::from_str(&ok_in(&node, &dir, &["apps", "list", "--json"])).unwrap();
    assert_eq!(apps[0]["name"], "hello");

    // A reader that goes away early (`| grep -q`, `| head`) ends the
    // command quietly. (A 4 KiB pipe, so that the writer meets it.)
    let whole = ok_in(&node, &dir, &["releases", "--json"]);
    assert!(
        whole.len() > 8192,
        "{} bytes is too little to test",
        whole.len()
    );
    let (mut reader, writer) = std::io::pipe().unwrap();
    // SAFETY: a valid descriptor; F_SETPIPE_SZ takes an int.
    unsafe {
        use std::os::fd::AsRawFd;
        libc::fcntl(reader.as_raw_fd(), libc::F_SETPIPE_SZ, 4096);
    }
    let child = node
        .h
        .command(&["releases", "--json"])
        .current_dir(&dir)
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 1];
    reader.read_exact(&mut first).unwrap();
    drop(reader);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");

    let current = status_json(&node, &dir);
    // Org tokens: another org's token sees nothing of the app; its own
    // org's token sees it all.
    let other = ok_in(&node, &dir, &["auth", "token", "create", "--org", "other"])
        .trim()
        .to_string();
    let mine = ok_in(
        &node,
        &dir,
        &["auth", "token", "create", "--org", "personal"],
    )
    .trim()
    .to_string();
    let as_org = |token: &str, args: &[&str]| {
        node.h
            .command(args)
            .current_dir(&dir)
            .env("HANGAR_API_TOKEN", token)
            .output()
            .unwrap()
    };
    let out = as_org(&other, &["apps", "list", "--json"]);
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout).unwrap(),
        serde_json::json!([])
    );
    let out = as_org(&other, &["status", "-a", "hello"]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no app \"hello\"")
    );
    let out = as_org(&other, &["machine", "list", "--json"]);
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout).unwrap(),
        serde_json::json!([])
    );
    let out = as_org(&other, &["machine", "status", &ids(&current)[0], "--json"]);
    assert!(!out.status.success());
    let out = as_org(&mine, &["status", "-a", "hello", "--json"]);
    assert!(out.status.success());
    assert_eq!(
        ids(&serde_json::from_slice(&out.stdout).unwrap()),
        ids(&current)
    );
    let out = as_org("hgr_bogus_token", &["apps", "list"]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("wrong API token")
    );

    // Destroying the app takes its machines.
    ok_in(&node, &dir, &["apps", "destroy", "hello", "--yes"]);
    let list: Value =
        serde_json::from_str(&ok_in(&node, &dir, &["machine", "list", "--json"])).unwrap();
    assert_eq!(list.as_array().map(Vec::len), Some(0));
}

/// With no checks in hangar.toml, a release counts as up only when its
/// machines stay started and their port answers: a release that exits, or
/// listens where the edge cannot reach it, is rolled back, the deploy exits
/// non-zero with the reason and the machine's last lines, and the old
/// release keeps serving.
#[test]
fn a_deploy_without_checks_tells_the_truth() {
    let node = Node::start();
    let base = busybox_image(&node.h);
    let dir = example_app(&node, &base);
    let toml = fs::read_to_string(dir.join("hangar.toml")).unwrap();
    let cut = toml.find("[[http_service.checks]]").unwrap();
    let rest = &toml[cut..];
    let end = rest.find("\n\n").map(|i| cut + i).unwrap_or(toml.len());
    fs::write(
        dir.join("hangar.toml"),
        format!("{}{}", &toml[..cut], &toml[end..]),
    )
    .unwrap();
    assert!(!fs::read_to_string(dir.join("hangar.toml"))
        .unwrap()
        .contains("checks"));
    ok_in(&node, &dir, &["launch"]);
    let out = ok_in(&node, &dir, &["deploy", "--count", "2"]);
    assert!(out.contains("release v1 is complete"), "{out}");
    let v1: Vec<String> = machines(&status_json(&node, &dir))
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(get(&node, "/healthz"), (200, "ok\n".to_string()));

    let hello = dir.join("bin/hello");
    let original = fs::read_to_string(&hello).unwrap();
    let broken = [
        // Exits at once.
        (
            "echo about to fail; exit 1\n",
            vec!["exited with code 1", "about to fail"],
        ),
        // Serves, but only on the machine's loopback.
        (
            "echo serving on loopback; exec httpd -f -p 127.0.0.1:8080 -h /www\n",
            vec!["only at 127.0.0.1", "bind 0.0.0.0", "serving on loopback"],
        ),
        // Serves nothing on its internal_port.
        (
            "echo on the wrong port; exec httpd -f -p 9090 -h /www\n",
            vec!["nothing listens there", "on the wrong port"],
        ),
    ];
    for (script, wanted) in broken {
        fs::write(&hello, format!("#!/bin/sh\n{script}")).unwrap();
        let out = hangar_in(&node, &dir, &["deploy"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{script}: {stdout}");
        assert!(!stdout.contains("is complete"), "{script}: {stdout}");
        assert!(stderr.contains("last log lines"), "{script}: {stderr}");
        for w in wanted {
            assert!(stderr.contains(w), "{script}: wanted {w:?} in {stderr}");
        }
        // The old release is still the app, on the same machines.
        let v = status_json(&node, &dir);
        assert_eq!(v["release"]["version"], 1, "{v}");
        let now: Vec<String> = machines(&v)
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(now, v1, "{v}");
        assert_eq!(get(&node, "/healthz"), (200, "ok\n".to_string()));
    }
    // Serving on the machine's IPv6 address only is up, and the edge
    // reaches it there.
    fs::write(
        &hello,
        "#!/bin/sh\nline=$(grep -m1 fdaa /etc/hosts)\necho serving on ${line%%\t*} only\nexec httpd -f -p \"[${line%%\t*}]:8080\" -h /www\n",
    )
    .unwrap();
    let out = ok_in(&node, &dir, &["deploy"]);
    assert!(out.contains("release v5 is complete"), "{out}");
    // (A URL not asked for before: the edge's cache cannot answer it.)
    assert_eq!(get(&node, "/healthz?v6"), (200, "ok\n".to_string()));
    let v2 = machines(&status_json(&node, &dir));
    let id = v2[0]["id"].as_str().unwrap();
    let logs = node.h.ok(&["machine", "logs", id]);
    assert!(logs.contains("serving on fdaa:"), "{logs}");
    fs::write(&hello, original).unwrap();
    let out = ok_in(&node, &dir, &["deploy"]);
    assert!(out.contains("is complete"), "{out}");
}

#[test]
fn a_woken_micro_vm_serves_and_its_idle_time_counts_from_when_it_was_ready() {
    let node = Node::start();
    let base = busybox_image(&node.h);
    let dir = example_app(&node, &base);
    // A micro-VM boots for longer than its idle timeout here (software
    // emulation): idle time counted from the wake would stop it as soon as
    // it had served.
    let toml = fs::read_to_string(dir.join("hangar.toml"))
        .unwrap()
        .replace(
            "auto_stop_machines = \"off\"",
            "auto_stop_machines = \"stop\"\nidle_timeout = \"4s\"",
        )
        .replace("min_machines_running = 1", "min_machines_running = 0")
        + "\n[[vm]]\ndriver = \"vm\"\nmemory = \"256mb\"\n";
    fs::write(dir.join("hangar.toml"), toml).unwrap();
    ok_in(&node, &dir, &["launch"]);
    ok_in(&node, &dir, &["deploy", "--count", "1"]);
    wait_until("the idle VM stops", 120, || all_stopped(&node, &dir));
    let woken = Instant::now();
    let (code, body) = get(&node, "/healthz?wake");
    let boot = woken.elapsed();
    assert_eq!((code, body.as_str()), (200, "ok\n"), "woken after {boot:?}");
    // Served; still started a while later, although the boot alone may
    // have taken longer than the idle timeout.
    std::thread::sleep(Duration::from_secs(2));
    let v = status_json(&node, &dir);
    assert!(
        machines(&v).iter().any(|m| m["state"] == "started"),
        "stopped {:?} after a wake of {boot:?}: {v}",
        woken.elapsed()
    );
    // And it does stop once idle.
    wait_until("the woken VM stops when idle", 60, || {
        all_stopped(&node, &dir)
    });
}
