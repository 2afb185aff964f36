//! Machines end to end, as root: `hangar up` with the container driver
//! (runc) and hangar-init, driven through `hangar machine`. Tests of this
//! file run one at a time (they share the host bridge and its addresses).

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

/// Just enough of `$HANGAR_HOME/config.toml` (two string keys) for tests.
mod toml_like {
    pub struct Config {
        pub api: String,
        pub token: String,
    }

    pub fn read(path: &std::path::Path) -> Config {
        let text = std::fs::read_to_string(path).unwrap();
        let get = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{key} = ")))
                .map(|v| v.trim_matches('"').to_string())
                .unwrap()
        };
        Config {
            api: get("api"),
            token: get("token"),
        }
    }
}

/// Serializes machine tests across test processes (nextest) and threads.
pub(crate) struct HostLock(#[allow(dead_code)] fs::File);

pub(crate) fn host_lock() -> HostLock {
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/tmp/hangar-machine-tests.lock")
        .unwrap();
    rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive).unwrap();
    HostLock(f)
}

pub(crate) fn require_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "machine tests need root (CI runs as root)"
    );
    require("runc");
    require("busybox");
}

/// The guest kernel scripts/fetch-kernel put in target/vm.
pub(crate) fn vm_kernel() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/vm");
    assert!(
        dir.join("vmlinuz").is_file(),
        "{} has no guest kernel: scripts/test fetches it with scripts/fetch-kernel",
        dir.display()
    );
    dir
}

/// A busybox image with a user, a workdir and a web page.
pub(crate) fn busybox_image(h: &Hangar) -> String {
    let dir = h.dir.path().join("image");
    fs::create_dir_all(dir.join("bin")).unwrap();
    fs::copy(which("busybox"), dir.join("bin/busybox")).unwrap();
    for applet in [
        "sh", "echo", "cat", "ps", "hostname", "sleep", "id", "env", "ls", "pwd", "wget", "httpd",
        "dd", "trap", "kill", "grep", "true", "false", "nc", "printf", "date", "df", "rm", "sync",
        "wc", "nslookup",
    ] {
        let _ = symlink("busybox", dir.join("bin").join(applet));
    }
    fs::create_dir_all(dir.join("etc")).unwrap();
    fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
    )
    .unwrap();
    fs::write(
        dir.join("etc/group"),
        "root:x:0:\napp:x:1000:\nstaff:x:50:app\n",
    )
    .unwrap();
    fs::create_dir_all(dir.join("www")).unwrap();
    fs::write(dir.join("www/index.html"), "hello from a machine\n").unwrap();
    fs::create_dir_all(dir.join("home/app")).unwrap();
    let reference = "localhost/busybox:test";
    h.ok(&[
        "image",
        "build",
        dir.to_str().unwrap(),
        "-t",
        reference,
        "--workdir",
        "/home/app",
        "-e",
        "FROM_IMAGE=yes",
        "-e",
        "GREETING=image",
        "--cmd",
        "/bin/sh -c 'echo default cmd'",
    ]);
    reference.to_string()
}

pub(crate) fn which(tool: &str) -> PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap())
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .unwrap()
}

/// `hangar up` with every listener on a free port.
const UP_ON_FREE_PORTS: [&str; 9] = [
    "up",
    "--listen",
    "127.0.0.1:0",
    "--registry-listen",
    "127.0.0.1:0",
    "--edge-listen",
    "127.0.0.1:0",
    "--edge-admin-listen",
    "127.0.0.1:0",
];

/// Start `hangar up` for `h` on free ports, its edge also on TLS (a
/// self-signed certificate); returns it and the lines it printed up to
/// announcing its API (the rest are drained).
fn spawn_up(h: &Hangar, extra: &[String]) -> (Child, Vec<String>) {
    let (cert, key) = self_signed(h.dir.path(), "hello.localhost");
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let mut args = UP_ON_FREE_PORTS.to_vec();
    args.extend(extra.iter().map(String::as_str));
    args.extend([
        "--edge-tls-listen",
        "127.0.0.1:0",
        "--edge-tls-cert",
        &cert,
        "--edge-tls-key",
        &key,
    ]);
    let mut child = h
        .command(&args)
        .env("HANGAR_VM_KERNEL", vm_kernel())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let seen = announced(&mut child);
    (child, seen)
}

/// What a `hangar up` started with its stderr piped printed up to
/// announcing its API (the last thing it does once started); the rest goes
/// to the test's stderr, so a failing test shows it.
pub(crate) fn announced(child: &mut Child) -> Vec<String> {
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = Vec::new();
    loop {
        let line = lines.next().expect("hangar up exited early").unwrap();
        let last = line.contains("Machines API on");
        seen.push(line);
        if last {
            break;
        }
    }
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            eprintln!("hangar up: | {line}");
        }
    });
    seen
}

/// `hangar up` on free ports with its own home; destroys its machines and
/// stops on drop.
pub(crate) struct Node {
    pub(crate) h: Hangar,
    child: Option<Child>,
    /// Where the node's edge proxy listens, and its TLS listener.
    pub(crate) edge: String,
    pub(crate) edge_tls: String,
    /// More flags for `hangar up`.
    up_args: Vec<String>,
    _lock: HostLock,
}

impl Node {
    /// A value of its `config.toml` (`api`, `token`, ...).
    pub(crate) fn config(&self, key: &str) -> String {
        fs::read_to_string(self.h.home().join("config.toml"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key} = ")))
            .map(|v| v.trim_matches('"').to_string())
            .unwrap_or_else(|| panic!("no {key} in the node's config.toml"))
    }

    pub(crate) fn start() -> Node {
        Node::start_in(None, &[])
    }

    /// A node whose `hangar up` gets these flags too.
    pub(crate) fn start_with(up_args: &[&str]) -> Node {
        Node::start_in(None, up_args)
    }

    /// A node whose every process runs inside network namespace `netns`.
    fn start_in(netns: Option<String>, up_args: &[&str]) -> Node {
        require_root();
        let lock = host_lock();
        let mut h = Hangar::new();
        h.netns = netns;
        let mut node = Node {
            h,
            child: None,
            edge: String::new(),
            edge_tls: String::new(),
            up_args: up_args.iter().map(|a| a.to_string()).collect(),
            _lock: lock,
        };
        node.up();
        node
    }

    pub(crate) fn up(&mut self) {
        let (child, lines) = spawn_up(&self.h, &self.up_args);
        let after = |marker: &str| {
            lines
                .iter()
                .find_map(|l| l.split(marker).nth(1))
                .map(|rest| rest.split_whitespace().next().unwrap().to_string())
        };
        self.edge = after("edge on http://").expect("the edge's address");
        self.edge_tls = after("edge TLS on https://").expect("the edge's TLS address");
        self.child = Some(child);
    }

    pub(crate) fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn run(&self, args: &[&str]) -> String {
        let mut all = vec!["machine", "run"];
        all.extend_from_slice(args);
        self.h.ok(&all).trim().to_string()
    }

    fn status(&self, id: &str) -> serde_json::Value {
        serde_json::from_str(&self.h.ok(&["machine", "status", id, "--json"])).unwrap()
    }

    fn wait_for(
        &self,
        id: &str,
        what: &str,
        f: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let s = self.status(id);
            if f(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "machine {id} never got {what}: {s}\nits log:\n{}",
                self.logs(id)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn logs(&self, id: &str) -> String {
        self.h.ok(&["machine", "logs", id])
    }

    pub(crate) fn exec(&self, id: &str, cmd: &[&str]) -> (i32, String) {
        let mut args = vec!["machine", "exec", id, "--"];
        args.extend_from_slice(cmd);
        let out = self.h.run(&args);
        if !out.status.success() {
            eprintln!("exec {cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.child.is_none() {
            self.up();
        }
        if let Ok(list) =
            serde_json::from_str::<serde_json::Value>(&self.h.ok(&["machine", "list", "--json"]))
        {
            for m in list.as_array().into_iter().flatten() {
                let _ = self.h.run(&[
                    "machine",
                    "destroy",
                    m["id"].as_str().unwrap_or(""),
                    "--force",
                ]);
            }
        }
        self.kill9();
    }
}

/// What of machine `id` the host still holds: mounts, its network
/// namespace, veth or tap, cgroups. Empty for a stopped or destroyed one.
fn host_traces(id: &str) -> Vec<String> {
    let short = &id[..12];
    let mut found = Vec::new();
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    found.extend(
        mounts
            .lines()
            .filter(|l| l.contains(id))
            .map(|l| format!("mount {l}")),
    );
    let netns = String::from_utf8(
        Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    found.extend(
        netns
            .lines()
            .filter(|l| l.contains(short))
            .map(|l| format!("netns {l}")),
    );
    let links = String::from_utf8(
        Command::new("ip")
            .args(["-o", "link", "show"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    found.extend(
        links
            .lines()
            .filter(|l| l.contains(&format!("hv{short}")) || l.contains(&format!("ht{short}")))
            .map(|l| format!("link {l}")),
    );
    let loops =
        String::from_utf8(Command::new("losetup").arg("-a").output().unwrap().stdout).unwrap();
    found.extend(
        loops
            .lines()
            .filter(|l| l.contains(id))
            .map(|l| format!("loop {l}")),
    );
    for controller in ["memory", "pids", "cpu", "unified", ""] {
        let dir = Path::new("/sys/fs/cgroup")
            .join(controller)
            .join("hangar")
            .join(id);
        if dir.exists() {
            found.push(format!("cgroup {}", dir.display()));
        }
    }
    found
}

#[test]
fn a_stopped_machine_holds_disk_only_and_node_stop_and_destroy_end_everything() {
    let mut node = Node::start();
    let image = busybox_image(&node.h);
    let id = node.run(&[
        &image, "--name", "holder", "--port", "8080", "--", "httpd", "-f", "-p", "8080", "-h",
        "/www",
    ]);
    let s = node.wait_for(&id, "start", |s| s["state"] == "started");
    let v4 = s["ipv4"].as_str().unwrap().to_string();
    assert!(
        !host_traces(&id).is_empty(),
        "a running machine has its mount and network"
    );
    // Stopped: disk only; `rm -rf` of its directory would work.
    node.h.ok(&["machine", "stop", &id, "--timeout", "5"]);
    node.wait_for(&id, "stop", |s| s["state"] == "stopped");
    let traces = host_traces(&id);
    assert!(traces.is_empty(), "a stopped machine holds {traces:?}");
    assert!(
        node.h
            .home()
            .join(format!("machines/{id}/disk.ext4"))
            .is_file(),
        "its disk stays"
    );
    // Started again: the same addresses, serving.
    node.h.ok(&["machine", "start", &id]);
    let s = node.wait_for(&id, "start again", |s| s["state"] == "started");
    assert_eq!(s["ipv4"].as_str().unwrap(), v4);
    let (code, page) = node.exec(
        &id,
        &["wget", "-Y", "off", "-qO-", &format!("http://{v4}:8080/")],
    );
    assert_eq!(code, 0);
    assert!(page.contains("hello from a machine"), "{page}");

    // `hangar node stop`: the node and its machines end; nothing is held.
    let out = node.h.ok(&["node", "stop"]);
    assert!(out.contains("stopped the node"), "{out}");
    assert!(out.contains("stopped 1 machine"), "{out}");
    if let Some(mut c) = node.child.take() {
        let status = c.wait().unwrap();
        assert!(status.success() || status.code().is_some(), "{status}");
    }
    assert!(
        !node
            .h
            .home()
            .join(format!("machines/{id}/shim.pid"))
            .exists(),
        "its shim still runs"
    );
    let traces = host_traces(&id);
    assert!(traces.is_empty(), "after node stop: {traces:?}");
    let again = node.h.ok(&["node", "stop"]);
    assert!(again.contains("no node runs"), "{again}");
    // `hangar node destroy`: asks for --yes, then removes the home; twice is fine.
    let refused = node.h.run(&["node", "destroy"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--yes"));
    assert!(node.h.home().exists());
    let out = node.h.ok(&["node", "destroy", "--yes"]);
    assert!(out.contains("destroyed 1 machine"), "{out}");
    assert!(!node.h.home().exists(), "the home is gone");
    assert!(host_traces(&id).is_empty());
    let again = node.h.ok(&["node", "destroy", "--yes"]);
    assert!(again.contains("nothing to destroy"), "{again}");
    // A HANGAR_HOME that is no Hangar home is never removed.
    let other = tempfile::tempdir().unwrap();
    fs::write(other.path().join("thesis.txt"), "years of work").unwrap();
    let out = node
        .h
        .command(&["node", "destroy", "--yes"])
        .env("HANGAR_HOME", other.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not look like a Hangar home"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(other.path().join("thesis.txt").is_file());
}

#[test]
fn isolation_and_image_config_semantics() {
    let node = Node::start();
    let image = busybox_image(&node.h);
    let id = node.run(&[&image, "--name", "semantics", "--restart", "no", "-e", "GREETING=machine", "--user", "app", "--", "/bin/sh", "-c", "echo user=$(id -u):$(id -g) groups=$(id -G); echo cwd=$(pwd); echo env=$FROM_IMAGE,$GREETING,$HOME; echo host=$(hostname); ps -o pid,comm | grep -v ps; sleep 1000"]);
    node.wait_for(&id, "output", |_| node.logs(&id).contains("host="));
    let logs = node.logs(&id);
    assert!(logs.contains("user=1000:1000 groups=1000 50"), "{logs}");
    assert!(logs.contains("cwd=/home/app"), "{logs}");
    assert!(logs.contains("env=yes,machine,/home/app"), "{logs}");
    assert!(logs.contains("host=semantics"), "{logs}");
    // PID namespace: init is 1, the app is there, nothing of the host.
    let (code, ps) = node.exec(&id, &["ps", "-o", "pid,comm"]);
    assert_eq!(code, 0);
    let pids: Vec<&str> = ps.lines().skip(1).collect();
    assert!(
        pids.iter()
            .any(|l| l.trim().starts_with("1 ") && l.contains("init")),
        "{ps}"
    );
    assert!(pids.len() <= 5, "the machine sees host processes: {ps}");
    // Hardening: no_new_privs, a seccomp filter, the default capability set
    // (bounding set 0x00000000a80425fb), masked /proc paths.
    let (_, status) = node.exec(&id, &["cat", "/proc/1/status"]);
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    assert!(status.contains("Seccomp:\t2"), "{status}");
    assert!(status.contains("CapBnd:\t00000000a80425fb"), "{status}");
    let (_, kcore) = node.exec(&id, &["/bin/sh", "-c", "wc -c < /proc/kcore || true"]);
    assert!(
        kcore.trim().is_empty() || kcore.trim() == "0",
        "/proc/kcore is not masked: {kcore}"
    );
    // The image's Cmd runs when the machine gives none.
    let id2 = node.run(&[&image, "--restart", "no"]);
    node.wait_for(&id2, "exit", |s| s["state"] == "stopped");
    assert!(node.logs(&id2).contains("default cmd"));
    assert_eq!(node.status(&id2)["exit_code"], 0);
    // A new entrypoint drops the image's Cmd.
    let id3 = node.run(&[&image, "--restart", "no", "--entrypoint", "/bin/echo"]);
    node.wait_for(&id3, "exit", |s| s["state"] == "stopped");
    assert_eq!(node.logs(&id3), "\n");
}

#[test]
fn exit_codes_signals_zombies_and_oom() {
    let node = Node::start();
    let image = busybox_image(&node.h);
    let exits = node.run(&[&image, "--restart", "no", "--", "/bin/sh", "-c", "exit 3"]);
    let s = node.wait_for(&exits, "exit", |s| s["state"] == "stopped");
    assert_eq!(
        (s["exit_code"].as_i64(), s["oom_killed"].as_bool()),
        (Some(3), Some(false))
    );

    // SIGTERM handled: the app's trap runs and it exits 0 quickly.
    let polite = node.run(&[
        &image,
        "--restart",
        "no",
        "--",
        "/bin/sh",
        "-c",
        "trap 'echo got TERM; exit 0' TERM; echo ready; while true; do sleep 0.1; done",
    ]);
    node.wait_for(&polite, "ready", |_| node.logs(&polite).contains("ready"));
    let t = Instant::now();
    node.h.ok(&["machine", "stop", &polite, "--timeout", "10"]);
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(node.status(&polite)["exit_code"], 0);
    assert!(node.logs(&polite).contains("got TERM"));

    // SIGTERM ignored: SIGKILL after the timeout, exit 137.
    let stubborn = node.run(&[
        &image,
        "--restart",
        "no",
        "--",
        "/bin/sh",
        "-c",
        "trap '' TERM; echo ready; while true; do sleep 0.1; done",
    ]);
    node.wait_for(&stubborn, "ready", |_| {
        node.logs(&stubborn).contains("ready")
    });
    let t = Instant::now();
    node.h.ok(&["machine", "stop", &stubborn, "--timeout", "1"]);
    assert!(t.elapsed() >= Duration::from_secs(1));
    assert_eq!(node.status(&stubborn)["exit_code"], 137);

    // Orphans are reaped by init: no zombies pile up.
    let orphans = node.run(&[
        &image,
        "--restart",
        "no",
        "--",
        "/bin/sh",
        "-c",
        "for i in 1 2 3 4 5; do sh -c 'sleep 0.2 & exit 0'; done; echo spawned; sleep 1000",
    ]);
    node.wait_for(&orphans, "spawned", |_| {
        node.logs(&orphans).contains("spawned")
    });
    std::thread::sleep(Duration::from_millis(800));
    let (_, states) = node.exec(&orphans, &["/bin/sh", "-c", "cat /proc/[0-9]*/stat"]);
    assert!(!states.contains(") Z "), "zombies left: {states}");

    // A memory limit ends in a reported OOM kill.
    let hog = node.run(&[
        &image,
        "--restart",
        "no",
        "--memory",
        "32",
        "--",
        "/bin/sh",
        "-c",
        "exec dd if=/dev/zero of=/dev/null bs=128M count=1",
    ]);
    let s = node.wait_for(&hog, "OOM", |s| s["state"] == "stopped");
    assert_eq!(
        (s["exit_code"].as_i64(), s["oom_killed"].as_bool()),
        (Some(137), Some(true)),
        "{s}"
    );
}

#[test]
fn restart_policies_logs_and_exec() {
    let node = Node::start();
    let image = busybox_image(&node.h);
    let flaky = node.run(&[
        &image,
        "--restart",
        "on-failure",
        "--max-retries",
        "2",
        "--",
        "/bin/sh",
        "-c",
        "echo run; exit 1",
    ]);
    let s = node.wait_for(&flaky, "give up", |s| {
        s["state"] == "stopped" && s["restarts"] == 2
    });
    assert_eq!(s["exit_code"], 1);
    assert_eq!(
        node.logs(&flaky).matches("run").count(),
        3,
        "one run and two restarts"
    );
    let ok = node.run(&[
        &image,
        "--restart",
        "on-failure",
        "--",
        "/bin/sh",
        "-c",
        "exit 0",
    ]);
    let s = node.wait_for(&ok, "exit", |s| s["state"] == "stopped");
    assert_eq!(s["restarts"], 0);
    // `always` restarts even a clean exit; `logs -f` follows across restarts.
    let always = node.run(&[
        &image,
        "--restart",
        "always",
        "--",
        "/bin/sh",
        "-c",
        "echo tick; sleep 0.3; exit 0",
    ]);
    let mut follow = node
        .h
        .command(&["machine", "logs", &always, "-f"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = follow.stdout.take().unwrap();
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.matches("tick").count() < 3 {
        let mut buf = [0u8; 64];
        let n = out.read(&mut buf).unwrap();
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        assert!(Instant::now() < deadline, "logs -f saw {seen:?}");
    }
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(node.status(&always)["restarts"].as_u64().unwrap() >= 2);
    // The API's update: a new config, then a restart onto it; events tell the story.
    let config: toml_like::Config = toml_like::read(&node.h.home().join("config.toml"));
    let api = config.api.trim_start_matches("http://").to_string();
    let auth = format!("Bearer {}", config.token);
    let updated = http(
        "POST",
        &api,
        &format!("/v1/machines/{ok}"),
        &[("Authorization", &auth), ("Content-Type", "application/json")],
        serde_json::json!({"config": {"image": image, "restart": {"policy": "no"}, "init": {"cmd": ["/bin/sh", "-c", "echo updated; sleep 1000"]}}}).to_string().as_bytes(),
    );
    assert_eq!(
        updated.status,
        200,
        "{}",
        String::from_utf8_lossy(&updated.body)
    );
    node.wait_for(&ok, "the new config", |_| {
        node.logs(&ok).contains("updated")
    });
    let events = http(
        "GET",
        &api,
        &format!("/v1/machines/{ok}/events"),
        &[("Authorization", &auth)],
        b"",
    )
    .json();
    let kinds: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert!(
        kinds.starts_with(&["created", "started", "exited"]) && kinds.contains(&"updated"),
        "{kinds:?}"
    );
    assert_eq!(
        http(
            "GET",
            &api,
            "/v1/machines",
            &[("Authorization", "Bearer wrong")],
            b""
        )
        .status,
        401
    );
    // exec: output and exit code back.
    let long = node.run(&[&image, "--", "sleep", "1000"]);
    node.wait_for(&long, "start", |s| s["state"] == "started");
    let (code, out) = node.exec(&long, &["/bin/sh", "-c", "echo inside; exit 7"]);
    assert_eq!((code, out.as_str()), (7, "inside\n"));
    // exec -i: the command reads what the CLI read from its stdin (here
    // 300 KB, more than a pipe holds, and a first line it answers).
    let input = format!("first line\n{}", "x".repeat(300_000));
    let out = exec_with_input(
        &node,
        &long,
        &input,
        &["sh", "-c", "read l; echo \"got $l\"; wc -c"],
    );
    assert_eq!(out, format!("got first line\n{}\n", 300_000));
    // Without -i, a command that reads stdin gets its end at once.
    let (code, out) = node.exec(&long, &["sh", "-c", "read l || echo no input"]);
    assert_eq!((code, out.as_str()), (0, "no input\n"));
}

/// `hangar machine exec -i` with `input` on its stdin; its stdout.
fn exec_with_input(node: &Node, id: &str, input: &str, cmd: &[&str]) -> String {
    let mut args = vec!["machine", "exec", "-i", id, "--"];
    args.extend_from_slice(cmd);
    let mut child = node
        .h
        .command(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "exec -i {cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `GET /` (with a Host header when `host` is not empty) at `addr` until
/// the answer contains `needle` (10 s at most); the answer.
fn get_until(addr: &str, host: &str, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    let host = if host.is_empty() {
        String::new()
    } else {
        format!("Host: {host}\r\n")
    };
    loop {
        let mut resp = String::new();
        if let Ok(mut conn) = TcpStream::connect(addr) {
            let _ = write!(conn, "GET / HTTP/1.0\r\n{host}\r\n");
            let _ = conn.read_to_string(&mut resp);
        }
        if resp.contains(needle) {
            return resp;
        }
        assert!(
            Instant::now() < deadline,
            "{addr} never answered {needle:?}: {resp}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn private_network_host_ports_and_no_way_out() {
    let node = Node::start();
    let image = busybox_image(&node.h);
    let web = node.run(&[
        &image, "--name", "web", "--port", "8080", "--", "httpd", "-f", "-p", "8080", "-h", "/www",
    ]);
    let s = node.wait_for(&web, "start", |s| s["state"] == "started");
    let v4 = s["ipv4"].as_str().unwrap().to_string();
    let v6 = s["private_ip"].as_str().unwrap().to_string();
    assert!(v6.starts_with("fdaa:"), "{v6}");
    // host -> machine port
    let page = get_until(&format!("{v4}:8080"), "", "hello");
    assert!(page.contains("hello from a machine"));
    // host -> edge -> machine: the machine's name is its app
    let resp = get_until(&node.edge, "web.localhost", "hello from a machine");
    assert!(
        resp.to_ascii_lowercase().contains("cache-status: hangar"),
        "{resp}"
    );
    // Stopped, the machine keeps its address but has no link on the
    // bridge (a stale one cannot answer for anybody); started, it serves
    // again at the same address.
    let id = s["id"].as_str().unwrap().to_string();
    let link = || {
        let out = Command::new("ip")
            .args(["-br", "link", "show", &format!("hv{}", &id[..12])])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(link().contains(" UP "), "{}", link());
    node.h.ok(&["machine", "stop", &web, "--timeout", "5"]);
    assert!(
        link().is_empty(),
        "a stopped machine keeps its veth: {}",
        link()
    );
    node.h.ok(&["machine", "start", &web]);
    node.wait_for(&web, "start", |s| s["state"] == "started");
    get_until(&format!("{v4}:8080"), "", "hello from a machine");
    // machine -> machine, over IPv4 and IPv6 (directly: busybox wget does
    // not read CIDRs in NO_PROXY, so -Y off)
    let client = node.run(&[&image, "--", "sleep", "1000"]);
    node.wait_for(&client, "start", |s| s["state"] == "started");
    let (code, out) = node.exec(
        &client,
        &["wget", "-Y", "off", "-qO-", &format!("http://{v4}:8080/")],
    );
    assert_eq!((code, out.as_str()), (0, "hello from a machine\n"));
    let (code, out) = node.exec(
        &client,
        &["wget", "-Y", "off", "-qO-", &format!("http://[{v6}]:8080/")],
    );
    assert_eq!((code, out.as_str()), (0, "hello from a machine\n"));
    // machine -> outside: a listener in a namespace this test makes, which
    // the host reaches and a machine must not.
    let ns = format!("hgtest-{}", std::process::id());
    let ip = |args: &[&str]| {
        assert!(
            Command::new("ip").args(args).status().unwrap().success(),
            "ip {args:?}"
        )
    };
    ip(&["netns", "add", &ns]);
    let cleanup = scopeguard(ns.clone());
    ip(&[
        "link", "add", "hgto0", "type", "veth", "peer", "name", "eth0", "netns", &ns,
    ]);
    ip(&["addr", "add", "198.18.7.1/24", "dev", "hgto0"]);
    ip(&["link", "set", "hgto0", "up"]);
    ip(&["-n", &ns, "addr", "add", "198.18.7.2/24", "dev", "eth0"]);
    ip(&["-n", &ns, "link", "set", "eth0", "up"]);
    let mut listener = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns,
            "python3",
            "-m",
            "http.server",
            "9000",
            "--bind",
            "198.18.7.2",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("198.18.7.2", 9000)).is_err() {
        assert!(Instant::now() < deadline, "test listener never came up");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, _) = node.exec(
        &client,
        &[
            "wget",
            "-Y",
            "off",
            "-q",
            "-T",
            "2",
            "-O-",
            "http://198.18.7.2:9000/",
        ],
    );
    assert_ne!(code, 0, "a machine reached outside the private network");
    let _ = listener.kill();
    let _ = listener.wait();
    drop(cleanup);
}

struct NsGuard(String);
impl Drop for NsGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        let _ = Command::new("ip").args(["link", "del", "hgto0"]).status();
    }
}
fn scopeguard(ns: String) -> NsGuard {
    NsGuard(ns)
}

#[test]
fn a_killed_node_adopts_its_machines_and_destroy_leaves_nothing() {
    let mut node = Node::start();
    let image = busybox_image(&node.h);
    let keeper = node.run(&[&image, "--", "/bin/sh", "-c", "echo up; sleep 1000"]);
    let quitter = node.run(&[
        &image,
        "--restart",
        "always",
        "--",
        "/bin/sh",
        "-c",
        "echo once; sleep 2; exit 0",
    ]);
    node.wait_for(&keeper, "start", |s| s["state"] == "started");
    node.wait_for(&quitter, "output", |_| node.logs(&quitter).contains("once"));
    let pid_before =
        fs::read_to_string(node.h.home().join(format!("machines/{keeper}/shim.pid"))).unwrap();
    node.kill9();
    // While the node is down, the quitter exits; the keeper keeps running.
    // A node of another home started meanwhile warns that the keeper is
    // on the bridge without being its machine.
    let other = Hangar::new();
    let (mut stranger, lines) = spawn_up(&other, &[]);
    let _ = stranger.kill();
    let _ = stranger.wait();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("machines this node does not know") && l.contains(&keeper[..12])),
        "{lines:?}"
    );
    std::thread::sleep(Duration::from_secs(2));
    node.up();
    let s = node.wait_for(&keeper, "adoption", |s| s["state"] == "started");
    assert_eq!(
        s["restarts"], 0,
        "the running machine was adopted, not restarted"
    );
    assert_eq!(
        fs::read_to_string(node.h.home().join(format!("machines/{keeper}/shim.pid"))).unwrap(),
        pid_before
    );
    assert_eq!(node.exec(&keeper, &["true"]).0, 0);
    node.wait_for(&quitter, "restart by policy", |s| {
        s["restarts"].as_u64().unwrap_or(0) >= 1
    });

    // A stop cut short by a kill of the node is finished when it is back:
    // the machine ignores SIGTERM, so the node is killed while it waits.
    let stubborn = node.run(&[
        &image,
        "--",
        "/bin/sh",
        "-c",
        "trap '' TERM; echo up; while :; do sleep 1; done",
    ]);
    node.wait_for(&stubborn, "output", |_| node.logs(&stubborn).contains("up"));
    let mut stop = node
        .h
        .command(&["machine", "stop", &stubborn, "--timeout", "60"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    node.wait_for(&stubborn, "stopping", |s| s["state"] == "stopping");
    node.kill9();
    let _ = stop.wait();
    node.up();
    let s = node.wait_for(&stubborn, "its stop finished", |s| s["state"] == "stopped");
    assert_eq!(s["exit_code"], 137, "killed after its kill timeout: {s}");

    // Destroy leaves no process, mount, namespace, veth, cgroup or file.
    node.h.ok(&["machine", "destroy", &keeper, "--force"]);
    let dir = node.h.home().join(format!("machines/{keeper}"));
    assert!(!dir.exists());
    let traces = host_traces(&keeper);
    assert!(traces.is_empty(), "a destroyed machine left {traces:?}");
    let procs = String::from_utf8(
        Command::new("ps")
            .args(["-eo", "args"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(!procs.contains(&keeper), "a process of the machine remains");
    assert_eq!(node.status(&keeper)["state"], "destroyed");

    // Snapshots stay while the image is stored, and go with it.
    node.h.ok(&["machine", "destroy", &quitter, "--force"]);
    node.h.ok(&["machine", "destroy", &stubborn, "--force"]);
    let snapshots = node.h.home().join("machines/snapshots");
    assert_eq!(
        fs::read_dir(&snapshots).unwrap().count(),
        1,
        "one layer, one snapshot, shared"
    );
    node.h.ok(&["image", "rm", &image]);
    let out = node.h.ok(&["image", "gc"]);
    assert!(out.contains("removed 1 layer snapshots"), "{out}");
    assert_eq!(fs::read_dir(&snapshots).unwrap().count(), 0);
}

/// Two namespaces this test makes: one for the node (only loopback and a
/// veth, no route to the real network) and one for a public-looking origin
/// behind that veth. Machines' traffic and any leak stay between the two.
struct Sandbox {
    node_ns: String,
    origin_ns: String,
    server: Option<Child>,
}

impl Sandbox {
    const ORIGIN: &'static str = "93.184.216.34";

    fn start(dir: &Path) -> Sandbox {
        let (node_ns, origin_ns) = (
            format!("hgnode-{}", std::process::id()),
            format!("hgorig-{}", std::process::id()),
        );
        let ip = |args: &[&str]| {
            assert!(
                Command::new("ip").args(args).status().unwrap().success(),
                "ip {args:?}"
            )
        };
        ip(&["netns", "add", &node_ns]);
        let mut sb = Sandbox {
            node_ns: node_ns.clone(),
            origin_ns: origin_ns.clone(),
            server: None,
        };
        ip(&["netns", "add", &origin_ns]);
        ip(&["-n", &node_ns, "link", "set", "lo", "up"]);
        ip(&[
            "-n", &node_ns, "link", "add", "a0", "type", "veth", "peer", "name", "o0", "netns",
            &origin_ns,
        ]);
        ip(&["-n", &node_ns, "addr", "add", "198.18.9.1/30", "dev", "a0"]);
        ip(&["-n", &node_ns, "link", "set", "a0", "up"]);
        ip(&[
            "-n",
            &node_ns,
            "route",
            "add",
            &format!("{}/32", Self::ORIGIN),
            "via",
            "198.18.9.2",
        ]);
        ip(&[
            "-n",
            &origin_ns,
            "addr",
            "add",
            "198.18.9.2/30",
            "dev",
            "o0",
        ]);
        ip(&[
            "-n",
            &origin_ns,
            "addr",
            "add",
            &format!("{}/32", Self::ORIGIN),
            "dev",
            "lo",
        ]);
        ip(&["-n", &origin_ns, "link", "set", "lo", "up"]);
        ip(&["-n", &origin_ns, "link", "set", "o0", "up"]);
        ip(&[
            "-n",
            &origin_ns,
            "route",
            "add",
            "default",
            "via",
            "198.18.9.1",
        ]);
        fs::write(dir.join("index.html"), "public origin\n").unwrap();
        sb.server = Some(
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &origin_ns,
                    "python3",
                    "-m",
                    "http.server",
                    "8080",
                    "--bind",
                    Self::ORIGIN,
                    "--directory",
                    dir.to_str().unwrap(),
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        // Wait from inside the node's namespace, so nothing tries the real network.
        let deadline = Instant::now() + Duration::from_secs(15);
        let probe = format!(
            "import socket; socket.create_connection(('{}', 8080), 1)",
            Self::ORIGIN
        );
        while !Command::new("ip")
            .args(["netns", "exec", &node_ns, "python3", "-c", &probe])
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
        {
            assert!(Instant::now() < deadline, "the test origin never listened");
            std::thread::sleep(Duration::from_millis(100));
        }
        sb
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.origin_ns])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.node_ns])
            .status();
    }
}

#[test]
fn machines_go_out_only_through_the_egress_proxy() {
    let www = tempfile::tempdir().unwrap();
    let sandbox = Sandbox::start(www.path());
    let node = Node::start_in(Some(sandbox.node_ns.clone()), &[]);
    let image = busybox_image(&node.h);
    let app = node.run(&[&image, "--name", "fetcher", "--", "sleep", "1000"]);
    node.wait_for(&app, "start", |s| s["state"] == "started");
    let (code, env) = node.exec(&app, &["env"]);
    assert!(
        env.contains("http_proxy=http://10.213.0.1:4750"),
        "exit {code}: {env}"
    );
    let origin = format!("http://{}:8080/", Sandbox::ORIGIN);
    // Through the proxy, by hand with nc (what $http_proxy makes clients do).
    let via_proxy = |id: &str, url: &str| {
        // stdin stays open until the proxy closes: busybox nc stops reading at EOF.
        let script = format!("(printf 'GET {url} HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n'; sleep 1) | nc 10.213.0.1 4750 2>&1; echo rc=$?");
        let raw = node
            .h
            .run(&["machine", "exec", id, "--", "/bin/sh", "-c", &script]);
        let out = String::from_utf8_lossy(&raw.stdout).into_owned();
        assert!(
            out.contains("rc="),
            "exec gave nothing: {:?} {}",
            raw.status,
            String::from_utf8_lossy(&raw.stderr)
        );
        out.trim_end()
            .strip_suffix("rc=0")
            .unwrap_or(&out)
            .to_string()
    };
    let out = via_proxy(&app, &origin);
    assert!(
        out.starts_with("HTTP/1.0 200") && out.ends_with("public origin\n"),
        "{out}"
    );
    // Directly: no route out of the private network.
    let (code, _) = node.exec(
        &app,
        &["wget", "-q", "-Y", "off", "-T", "2", "-O-", &origin],
    );
    assert_ne!(code, 0, "a machine reached the origin without the proxy");
    // Metadata and the node's own services: refused by the proxy, unreachable directly.
    let config = toml_like::read(&node.h.home().join("config.toml"));
    for target in [
        "http://169.254.169.254/latest/meta-data/".to_string(),
        format!("{}/v1/machines", config.api),
        "http://10.213.0.1:4750/".into(),
    ] {
        let out = via_proxy(&app, &target);
        assert!(
            out.starts_with("HTTP/1.1 407")
                && out.to_ascii_lowercase().contains("x-hangar-egress-error"),
            "{target} through the proxy: {out}"
        );
        let (code, _) = node.exec(
            &app,
            &["wget", "-q", "-Y", "off", "-T", "2", "-O-", &target],
        );
        assert_ne!(code, 0, "{target} directly");
    }
    // Per-machine policy: enforce, with a list the origin is not on.
    let strict = node.run(&[&image, "--name", "strict", "--", "sleep", "1000"]);
    let body = serde_json::json!({"config": {"image": image, "egress": {"action": "enforce", "allowed_domains": ["example.org"]}, "init": {"cmd": ["sleep", "1000"]}}});
    let script = "import sys, urllib.request; r = urllib.request.Request(sys.argv[1], data=sys.argv[2].encode(), method='POST', headers={'Authorization': 'Bearer ' + sys.argv[3], 'Content-Type': 'application/json'}); print(urllib.request.urlopen(r).status)";
    let url = format!("{}/v1/machines/{strict}", config.api);
    let r = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", sandbox.node_ns))
        .args([
            "--",
            "python3",
            "-c",
            script,
            &url,
            &body.to_string(),
            &config.token,
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&r.stdout).contains("200"),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    node.wait_for(&strict, "restart", |s| s["state"] == "started");
    std::thread::sleep(Duration::from_millis(300));
    let out = via_proxy(&strict, &origin);
    assert!(
        out.starts_with("HTTP/1.1 407"),
        "an enforce policy let an unlisted host through: {out}"
    );
    assert!(
        via_proxy(&app, &origin).starts_with("HTTP/1.0 200"),
        "the open machine still gets out"
    );
    drop(node);
    drop(sandbox);
}

/// Micro-VMs (under software emulation here: each boot takes seconds, so
/// few of them): served through the edge, talking with a container, exit
/// codes, stop with SIGTERM then SIGKILL, the base disk built once, and
/// nothing left after destroy.
/// The size of machine `id`'s root filesystem, as `df` inside it says.
fn root_size_mb(node: &Node, id: &str) -> u64 {
    let (code, out) = node.exec(id, &["df", "-k", "/"]);
    assert_eq!(code, 0, "{out}");
    let kb: u64 = out
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("df: {out}"));
    kb / 1024
}

#[test]
fn a_machine_that_fills_its_disk_finds_it_full_and_the_host_does_not() {
    let node = Node::start();
    let image = busybox_image(&node.h);
    let id = node.run(&[&image, "--rootfs-size", "1", "--", "sleep", "3600"]);
    node.wait_for(&id, "start", |s| s["state"] == "started");
    let deadline = Instant::now() + Duration::from_secs(30);
    while node.exec(&id, &["true"]).0 != 0 {
        assert!(Instant::now() < deadline, "machine {id} never ran");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The root filesystem is the size asked for (less ext4's own blocks).
    let size = root_size_mb(&node, &id);
    assert!((900..=1024).contains(&size), "{size} MB");
    // 1.2 GB into a 1 GB root: the machine sees a full disk...
    let out = node.h.run(&[
        "machine",
        "exec",
        &id,
        "--",
        "dd",
        "if=/dev/zero",
        "of=/fill",
        "bs=1000000",
        "count=1200",
    ]);
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "dd filled 1.2 GB: {said}");
    assert!(said.contains("No space left on device"), "{said}");
    // ...and the host holds no more than the machine's disk.
    let disk = node.h.home().join("machines").join(&id).join("disk.ext4");
    let held = std::os::unix::fs::MetadataExt::blocks(&fs::metadata(&disk).unwrap()) * 512;
    assert!(held <= 1 << 30, "the host holds {held} bytes for it");
    // What the machine deletes, the host gets back (discard).
    assert_eq!(node.exec(&id, &["rm", "/fill"]).0, 0);
    assert_eq!(node.exec(&id, &["sync"]).0, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let held = std::os::unix::fs::MetadataExt::blocks(&fs::metadata(&disk).unwrap()) * 512;
        if held < 200 << 20 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the host still holds {held} bytes after the delete"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The files survive a stop and start (the disk is mounted again); a
    // stopped machine holds no mount and no loop device.
    assert_eq!(node.exec(&id, &["sh", "-c", "echo kept > /note"]).0, 0);
    node.h.ok(&["machine", "stop", &id]);
    node.wait_for(&id, "stop", |s| s["state"] == "stopped");
    assert_eq!(host_traces(&id), Vec::<String>::new());
    node.h.ok(&["machine", "start", &id]);
    node.wait_for(&id, "start", |s| s["state"] == "started");
    let deadline = Instant::now() + Duration::from_secs(30);
    while node.exec(&id, &["true"]).0 != 0 {
        assert!(Instant::now() < deadline, "machine {id} never ran again");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(node.exec(&id, &["cat", "/note"]), (0, "kept\n".to_string()));
    node.h.ok(&["machine", "destroy", &id, "--force"]);
    assert_eq!(host_traces(&id), Vec::<String>::new());
    assert!(!disk.exists());
}

#[test]
fn micro_vms_boot_serve_talk_stop_and_leave_nothing() {
    require("qemu-system-x86_64");
    require("qemu-img");
    require("mkfs.ext4");
    let node = Node::start();
    let image = busybox_image(&node.h);
    let vm = node.run(&[
        &image,
        "--name",
        "vmweb",
        "--driver",
        "vm",
        "--rootfs-size",
        "2",
        "--port",
        "8080",
        "--",
        "httpd",
        "-f",
        "-p",
        "8080",
        "-h",
        "/www",
    ]);
    let s = node.wait_for(&vm, "start", |s| s["state"] == "started");
    let vm_ip = s["ipv4"].as_str().unwrap().to_string();
    assert!(s["vmm"]["accel"].as_str().is_some(), "{s}");
    assert_eq!(
        s["vmm"]["base_disk_reused"], false,
        "the first VM of an image builds its disk"
    );
    // Through the edge, once the guest has booted.
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let mut conn = TcpStream::connect(&node.edge).unwrap();
        conn.write_all(b"GET / HTTP/1.0\r\nHost: vmweb.localhost\r\n\r\n")
            .unwrap();
        let mut resp = String::new();
        let _ = conn.read_to_string(&mut resp);
        if resp.contains("hello from a machine") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the VM never answered through the edge: {resp}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let s = node.status(&vm);
    assert!(
        s["vmm"]["overhead_kib"].as_u64().is_some_and(|k| k > 0),
        "{s}"
    );
    // exec into the VM, as into a container.
    let (code, out) = node.exec(&vm, &["sh", "-c", "hostname; cat /www/index.html"]);
    // The image's small filesystem was grown to the disk's 2 GB at boot.
    assert_eq!(
        root_size_mb(&node, &vm) / 100,
        19,
        "{}",
        node.exec(&vm, &["df", "-k", "/"]).1
    );
    assert_eq!((code, out.as_str()), (0, "vmweb\nhello from a machine\n"));
    assert_eq!(node.exec(&vm, &["sh", "-c", "exit 3"]).0, 3);
    assert_eq!(
        exec_with_input(&node, &vm, "to the guest\n", &["cat"]),
        "to the guest\n"
    );
    // A console in the VM: a real terminal (the guest's init runs the
    // shell on one of its own, over the VM's second serial port).
    crate::operate::drive_console(
        &node,
        &node.config("token"),
        &["ssh", "console", "--machine", &vm],
        "vmweb",
    );

    // Container -> VM, and VM -> container (the VM's log says what it got).
    let ctr = node.run(&[
        &image, "--name", "ctr", "--port", "8080", "--", "httpd", "-f", "-p", "8080", "-h", "/www",
    ]);
    let c = node.wait_for(&ctr, "start", |s| s["state"] == "started");
    let ctr_ip = c["ipv4"].as_str().unwrap().to_string();
    let (code, out) = node.exec(
        &ctr,
        &[
            "wget",
            "-Y",
            "off",
            "-qO-",
            &format!("http://{vm_ip}:8080/"),
        ],
    );
    assert_eq!((code, out.as_str()), (0, "hello from a machine\n"));
    let getter = node.run(&[
        &image,
        "--name",
        "vmget",
        "--driver",
        "vm",
        "--restart",
        "no",
        "--",
        "sh",
        "-c",
        &format!("sleep 1; wget -Y off -qO- http://{ctr_ip}:8080/; exit 7"),
    ]);
    let g = node.wait_for(&getter, "exit", |s| s["state"] == "stopped");
    assert_eq!(
        g["exit_code"], 7,
        "the app's exit code crosses the VM boundary: {g}"
    );
    assert_eq!(
        g["vmm"]["base_disk_reused"], true,
        "a second VM of the image builds nothing: {g}"
    );
    assert!(
        node.logs(&getter).contains("hello from a machine"),
        "{}",
        node.logs(&getter)
    );

    // Stop: SIGTERM first (httpd ends: 143), then SIGKILL after the timeout.
    node.h.ok(&["machine", "stop", &vm, "--timeout", "10"]);
    assert_eq!(node.status(&vm)["exit_code"], 143);
    let stubborn = node.run(&[
        &image,
        "--name",
        "vmstub",
        "--driver",
        "vm",
        "--",
        "sh",
        "-c",
        "trap '' TERM; echo ready; sleep 1000",
    ]);
    let deadline = Instant::now() + Duration::from_secs(180);
    while !node.logs(&stubborn).contains("ready") {
        assert!(
            Instant::now() < deadline,
            "the stubborn VM never booted: {}\n{}",
            node.status(&stubborn),
            node.logs(&stubborn)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let started = Instant::now();
    node.h.ok(&["machine", "stop", &stubborn, "--timeout", "2"]);
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert_eq!(node.status(&stubborn)["exit_code"], 137);

    // Destroy: no tap, overlay, process or directory left.
    for id in [&vm, &getter, &stubborn] {
        node.h.ok(&["machine", "destroy", id, "--force"]);
        let tap = format!("ht{}", &id[..12]);
        assert!(
            !Path::new("/sys/class/net").join(&tap).exists(),
            "{tap} left behind"
        );
        assert!(
            !node.h.home().join("machines").join(id).exists(),
            "machine dir of {id} left behind"
        );
    }
    let qemus = Command::new("pgrep")
        .args(["-f", &node.h.home().display().to_string()])
        .output()
        .unwrap();
    let left: Vec<String> = String::from_utf8_lossy(&qemus.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    let ps = Command::new("ps")
        .args(["-o", "args=", "-p", &left.join(",")])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    assert!(!ps.contains("qemu-system"), "a VMM is left: {ps}");
    // The image's base disk goes with the image.
    let disks = || {
        fs::read_dir(node.h.home().join("machines/vmdisks"))
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".ext4"))
                    .count()
            })
            .unwrap_or(0)
    };
    assert_eq!(disks(), 1);
    node.h.ok(&["machine", "destroy", &ctr, "--force"]);
    node.h.ok(&["image", "rm", &image]);
    node.h.ok(&["image", "gc"]);
    assert_eq!(disks(), 0, "the base disk outlived its image");
}

/// The README's main job, as a user runs it: `hangar demo`, then Ctrl-C.
/// Nothing of it may stay running or mounted, so its home can go.
#[test]
fn the_demo_serves_and_ctrl_c_leaves_nothing_behind() {
    require_root();
    let _lock = host_lock();
    let h = Hangar::new();
    let mut demo = h
        .command(&["demo"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(demo.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("the demo ended early: {seen:#?}"))
            .unwrap();
        let serving = line.contains("Serving until Ctrl-C");
        seen.push(line);
        if serving {
            break;
        }
    }
    let page = get_until("127.0.0.1:8080", "hello.localhost", "200 OK");
    assert!(page.contains("Hangar"), "{page}");
    let ids: Vec<String> = fs::read_dir(h.home().join("machines"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().join("lease").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(ids.len(), 2, "the demo runs two machines: {ids:?}");

    // Ctrl-C.
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(demo.id() as i32).unwrap(),
        rustix::process::Signal::INT,
    )
    .unwrap();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(demo.wait().unwrap().success());
    let said = rest.join("\n");
    assert!(said.contains("hangar node destroy --yes"), "{said}");
    for id in &ids {
        let traces = host_traces(id);
        assert!(traces.is_empty(), "machine {id} left {traces:?}");
    }
    let home = h.home().display().to_string();
    let procs = String::from_utf8(
        Command::new("ps")
            .args(["-eo", "args"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(
        !procs.lines().any(|l| l.contains(&home)),
        "a process of the demo still runs: {procs}"
    );
    fs::remove_dir_all(h.home()).expect("the demo's home can be removed");
}

/// Fail closed: a host where the rule that keeps machine traffic from being
/// forwarded out cannot be checked (here ip6tables fails, as it does where
/// the kernel lacks its tables) gets no node, and a line that says why.
#[test]
fn a_node_that_cannot_make_sure_nothing_is_forwarded_out_refuses_to_start() {
    require_root();
    let _lock = host_lock();
    let h = Hangar::new();
    let bin = h.dir.path().join("bin");
    fs::create_dir_all(&bin).unwrap();
    fs::write(
        bin.join("ip6tables"),
        "#!/bin/sh\necho \"ip6tables v1.8.9: can't initialize ip6tables table 'filter': Table does not exist\" >&2\nexit 3\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(bin.join("ip6tables"), fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let child = h
        .command(&UP_ON_FREE_PORTS)
        .env("PATH", path)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (status, stderr) = refused(child, "it cannot check its forward rule");
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("cannot make sure nothing is forwarded out")
            && stderr.contains("ip6tables"),
        "{stderr}"
    );
    assert!(!stderr.contains("Machines API on"), "{stderr}");
}

/// `hangar up --etcd`: the node's state lives in etcd (Debian's, on
/// loopback), not in its home; a `kill -9` of the node and a start again
/// adopt the running machine from there; a second node on the same
/// cluster is refused, saying why, until nodes have membership.
#[test]
fn a_node_on_etcd_keeps_its_state_there_and_its_name_is_its_own() {
    let etcd_dir = tempfile::tempdir().unwrap();
    let members = hangar_cluster::members::Members::start(etcd_dir.path(), 1).unwrap();
    let endpoints = members.endpoints();
    let mut node = Node::start_with(&["--etcd", &endpoints, "--node", "n1"]);
    let image = busybox_image(&node.h);
    let id = node.run(&[&image, "--", "/bin/sh", "-c", "echo up; sleep 1000"]);
    node.wait_for(&id, "start", |s| s["state"] == "started");
    assert!(
        !node.h.home().join("state.db").exists(),
        "the state went to SQLite"
    );
    let config = fs::read_to_string(node.h.home().join("config.toml")).unwrap();
    assert!(
        config.contains(&endpoints) && config.contains("\"n1\""),
        "{config}"
    );
    node.kill9();
    node.up();
    let s = node.wait_for(&id, "adoption", |s| s["state"] == "started");
    assert_eq!(s["restarts"], 0, "adopted from etcd's state, not restarted");
    assert_eq!(node.exec(&id, &["true"]).0, 0);

    assert_eq!(s["node"], "n1", "{s}");

    // Another node of the same name, while n1 lives, is refused.
    let other = Hangar::new();
    let mut args = UP_ON_FREE_PORTS.to_vec();
    args.extend(["--etcd", &endpoints, "--node", "n1"]);
    let child = other.command(&args).stderr(Stdio::piped()).spawn().unwrap();
    let (status, err) = refused(child, "a live member has its name");
    assert!(!status.success());
    assert!(
        err.contains("\"n1\" is a live member") && err.contains("another --node"),
        "{err}"
    );
}

/// Wait (30 s at most) for a `hangar up` that must refuse to start; its
/// exit status and what it said. One that keeps running fails the test.
fn refused(mut child: Child, why: &str) -> (std::process::ExitStatus, String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("hangar up started although {why}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (status, stderr)
}
