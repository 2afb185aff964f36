//! etcd members run from Debian's `etcd` binary on 127.0.0.1, for tests
//! and for a cluster tried on one host: one or more members, each with its
//! data under a directory of the caller's, on free loopback ports. Members
//! can be killed (`kill -9`) and started again with their data, to lose
//! and regain quorum.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// One member: its name, ports and process (when running).
pub struct Member {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    data: PathBuf,
    child: Option<Child>,
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
                client_port: free_port()?,
                peer_port: free_port()?,
                data: dir.join(format!("m{i}")),
                child: None,
            });
        }
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
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

    /// `http://127.0.0.1:PORT,...`: what `--etcd` takes.
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client_port))
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
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let log = std::fs::File::create(m.data.with_extension("log"))
            .map_err(|e| Error::Setup(format!("{}: {e}", m.data.display())))?;
        let child = Command::new("etcd")
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

    fn wait_listening(&mut self, i: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let m = &mut self.members[i];
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", m.client_port)).is_ok() {
                return Ok(());
            }
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
                    m.name, m.client_port
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait until member `i` says the cluster is healthy (it has a leader
    /// and a quorum): its `/health` endpoint, over plain HTTP/1.0.
    fn wait_healthy(&self, i: usize) -> Result<()> {
        use std::io::{Read, Write};
        let port = self.members[i].client_port;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut answer = String::new();
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                if s.write_all(b"GET /health HTTP/1.0\r\n\r\n").is_ok() {
                    let _ = s.read_to_string(&mut answer);
                }
            }
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

impl Drop for Members {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
