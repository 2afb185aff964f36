//! etcd members run from Debian's `etcd` binary, for tests and for a
//! cluster tried on one host: one or more members, each with its data under
//! a directory of the caller's, on free loopback ports ([`Members::start`])
//! or each in a network namespace of the caller's at an address there
//! ([`Members::start_in`], on etcd's own ports). Members can be killed
//! (`kill -9`) and started again with their data, to lose and regain
//! quorum.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// One member: its name, ports and process (when running).
pub struct Member {
    pub name: String,
    /// Where it listens: 127.0.0.1, or its address in its namespace.
    pub host: String,
    pub client_port: u16,
    pub peer_port: u16,
    /// The network namespace it runs in (`/var/run/netns/<name>`), if any.
    netns: Option<String>,
    data: PathBuf,
    child: Option<Child>,
}

impl Member {
    fn url(&self, port: u16) -> String {
        format!("http://{}:{port}", self.host)
    }
}

/// A cluster of members started together. Dropping it kills them.
pub struct Members {
    members: Vec<Member>,
    initial_cluster: String,
}

fn free_port() -> Result<u16> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error::Setup(format!("no free loopback port: {e}")))
}

impl Members {
    /// Start `n` members under `dir` and wait until the cluster answers.
    pub fn start(dir: &Path, n: usize) -> Result<Members> {
        let mut members = Vec::new();
        for i in 1..=n {
            members.push(Member {
                name: format!("m{i}"),
                host: "127.0.0.1".into(),
                client_port: free_port()?,
                peer_port: free_port()?,
                netns: None,
                data: dir.join(format!("m{i}")),
                child: None,
            });
        }
        Members::run(members)
    }

    /// Start one member in each network namespace of `at` (a name under
    /// `/var/run/netns`, and the member's address there), on ports 2379 and
    /// 2380, and wait until the cluster answers.
    pub fn start_in(dir: &Path, at: &[(String, String)]) -> Result<Members> {
        let members = at
            .iter()
            .enumerate()
            .map(|(i, (netns, host))| Member {
                name: format!("m{}", i + 1),
                host: host.clone(),
                client_port: 2379,
                peer_port: 2380,
                netns: Some(netns.clone()),
                data: dir.join(format!("m{}", i + 1)),
                child: None,
            })
            .collect();
        Members::run(members)
    }

    fn run(members: Vec<Member>) -> Result<Members> {
        let n = members.len();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.url(m.peer_port)))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Members {
            members,
            initial_cluster,
        };
        for i in 0..n {
            cluster.spawn(i)?;
        }
        for i in 0..n {
            cluster.wait_listening(i)?;
        }
        cluster.wait_healthy(0)?;
        Ok(cluster)
    }

    /// `http://HOST:PORT,...`: what `--etcd` takes.
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| m.url(m.client_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn members(&self) -> &[Member] {
        &self.members
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let initial = self.initial_cluster.clone();
        let m = &mut self.members[i];
        let state = if m.data.join("member").exists() {
            "existing"
        } else {
            "new"
        };
        std::fs::create_dir_all(&m.data)
            .map_err(|e| Error::Setup(format!("{}: {e}", m.data.display())))?;
        let client = m.url(m.client_port);
        let peer = m.url(m.peer_port);
        let log = std::fs::File::create(m.data.with_extension("log"))
            .map_err(|e| Error::Setup(format!("{}: {e}", m.data.display())))?;
        let mut command = in_netns(m.netns.as_deref(), "etcd");
        let child = command
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial])
            .args(["--initial-cluster-state", state])
            .args(["--initial-cluster-token", "hangar"])
            .args(["--logger", "zap", "--log-level", "warn"])
            // Elections in tens of milliseconds: the members share a host.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| {
                Error::Setup(format!(
                    "cannot run etcd ({e}); install Debian's etcd-server (scripts/test does)"
                ))
            })?;
        m.child = Some(child);
        Ok(())
    }

    /// What member `i`'s `/health` endpoint answers, if it answers:
    /// over plain HTTP/1.0 on loopback, or with curl in its namespace.
    fn health(&self, i: usize) -> Option<String> {
        use std::io::{Read, Write};
        let m = &self.members[i];
        if let Some(ns) = &m.netns {
            let out = in_netns(Some(ns), "curl")
                .args(["-s", "--max-time", "2"])
                .arg(format!("{}/health", m.url(m.client_port)))
                .output()
                .ok()?;
            return out
                .status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned());
        }
        let mut s = std::net::TcpStream::connect(("127.0.0.1", m.client_port)).ok()?;
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut answer = String::new();
        s.write_all(b"GET /health HTTP/1.0\r\n\r\n").ok()?;
        let _ = s.read_to_string(&mut answer);
        Some(answer)
    }

    fn wait_listening(&mut self, i: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.health(i).is_some() {
                return Ok(());
            }
            let m = &mut self.members[i];
            if let Some(child) = &mut m.child {
                if let Ok(Some(status)) = child.try_wait() {
                    let log =
                        std::fs::read_to_string(m.data.with_extension("log")).unwrap_or_default();
                    return Err(Error::Setup(format!(
                        "etcd member {} exited ({status}): {}",
                        m.name,
                        log.lines().last().unwrap_or("")
                    )));
                }
            }
            if Instant::now() > deadline {
                return Err(Error::Setup(format!(
                    "etcd member {} did not listen on {} within 20 s",
                    m.name,
                    m.url(m.client_port)
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait until member `i` says the cluster is healthy (it has a leader
    /// and a quorum): after a member is lost, once the rest have elected
    /// a leader if it was the lost one.
    pub fn wait_healthy(&self, i: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let answer = self.health(i).unwrap_or_default();
            if answer.contains("\"health\":\"true\"") {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::Setup(format!(
                    "the etcd cluster was not healthy within 20 s (member {} answered {:?})",
                    self.members[i].name,
                    answer.lines().last().unwrap_or("")
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `kill -9` member `i`; its data stays.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start member `i` again from its data (it listens on return; the
    /// cluster is healthy again once a quorum is back).
    pub fn restart(&mut self, i: usize) -> Result<()> {
        self.kill(i);
        self.spawn(i)?;
        self.wait_listening(i)
    }
}

/// `program`, run in network namespace `netns` when one is given (through
/// nsenter, which leaves the host's /sys as it is).
fn in_netns(netns: Option<&str>, program: &str) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/var/run/netns/{ns}")).arg(program);
            c
        }
        None => Command::new(program),
    }
}

impl Drop for Members {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
