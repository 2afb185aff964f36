//! The hangar binary under test: a node's home and commands, `hangar
//! registry serve`, free ports, waits.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::Digest as _;

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Fail loudly when a peer the tests need is missing: a skipped peer would
/// make a test that cannot fail.
pub fn require(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is not installed; run scripts/test, which installs the test peers"
    );
}

/// A temporary `$HANGAR_HOME` and the means to run `hangar` against it.
pub struct Hangar {
    pub dir: tempfile::TempDir,
    pub docker_config: PathBuf,
    /// Run every command inside this network namespace.
    pub netns: Option<String>,
}

impl Hangar {
    pub fn new() -> Hangar {
        let dir = tempfile::tempdir().expect("tempdir");
        let docker_config = dir.path().join("docker-config");
        fs::create_dir(&docker_config).expect("docker config dir");
        Hangar {
            dir,
            docker_config,
            netns: None,
        }
    }

    pub fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = match &self.netns {
            // nsenter, not `ip netns exec`: that remounts /sys, which hides
            // the cgroup mounts runc needs.
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/var/run/netns/{ns}"))
                    .arg("--")
                    .arg(env!("CARGO_BIN_EXE_hangar"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_hangar")),
        };
        c.args(args)
            .env("HANGAR_HOME", self.home())
            .env("DOCKER_CONFIG", &self.docker_config)
            .stdin(Stdio::null());
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run hangar")
    }

    /// Run and require success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "hangar {args:?} failed:\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Run and require failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "hangar {args:?} should have failed; stdout: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub fn inspect(&self, reference: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["image", "inspect", reference, "--json"]))
            .expect("inspect json")
    }

    /// Every file under the store with its size: to show a failure changed nothing.
    pub fn store_snapshot(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        let root = self.home();
        let mut stack = vec![root.clone()];
        while let Some(d) = stack.pop() {
            let Ok(entries) = fs::read_dir(&d) else {
                continue;
            };
            for e in entries.flatten() {
                let p = e.path();
                let m = fs::symlink_metadata(&p).expect("metadata");
                let rel = p
                    .strip_prefix(&root)
                    .expect("under root")
                    .display()
                    .to_string();
                if m.is_dir() {
                    stack.push(p);
                } else if rel != "oci/lock" {
                    out.insert(rel, m.len());
                }
            }
        }
        out
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

pub fn wait_for_port(port: u16, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "peer exited with {status}: {}",
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "peer did not listen on {port}: {}",
        fs::read_to_string(log).unwrap_or_default()
    );
}

/// `hangar registry serve` on a free port, killed on drop.
pub struct HangarRegistry {
    child: Child,
    pub host: String,
    pub admin: String,
    /// Its scheme: http, or https with --tls-cert.
    pub scheme: String,
    /// What it printed on stderr after starting (the access log).
    pub log: Arc<Mutex<Vec<String>>>,
}

impl HangarRegistry {
    pub fn start(h: &Hangar, extra: &[&str]) -> HangarRegistry {
        let mut args = vec![
            "registry",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(extra);
        let mut child = h
            .command(&args)
            .stderr(Stdio::piped())
            .spawn()
            .expect("start hangar registry");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let mut host = String::new();
        let mut admin = String::new();
        let mut scheme = String::new();
        while host.is_empty() || admin.is_empty() {
            let line = lines
                .next()
                .expect("registry exited early")
                .expect("read stderr");
            if let Some((_, rest)) = line.split_once("registry serving ") {
                let (s, rest) = rest.split_once("://").unwrap_or(("http", rest));
                scheme = s.to_string();
                host = rest.split_whitespace().next().unwrap_or("").to_string();
            } else if let Some((_, rest)) = line.split_once("registry metrics on http://") {
                admin = rest.trim_end_matches("/metrics").to_string();
            }
        }
        let log = Arc::new(Mutex::new(Vec::new()));
        let kept = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                kept.lock().unwrap().push(line);
            }
        });
        HangarRegistry {
            child,
            host,
            admin,
            scheme,
            log,
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for HangarRegistry {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The host's architecture in Go's naming, as image configs use.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "arm64",
        _ => "amd64",
    }
}

/// Wait until some file directly in `dir` is larger than `min_bytes`: a
/// transfer is under way, so a kill now lands in the middle of it.
pub fn wait_for_partial_file(dir: &Path, min_bytes: u64, timeout: Duration, what: &str) {
    let deadline = Instant::now() + timeout;
    loop {
        let partial = fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .any(|e| e.metadata().map(|m| m.len() > min_bytes).unwrap_or(false))
            })
            .unwrap_or(false);
        if partial {
            return;
        }
        assert!(Instant::now() < deadline, "waited in vain for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}
