//! `hangar node stop` and `hangar node destroy`: end what a node runs on
//! this host, and remove a `$HANGAR_HOME` for good. Both work whether or
//! not the node is running, and both are safe to repeat.
//!
//! `hangar up` writes its pid to `$HANGAR_HOME/node.pid` (see `PidFile`), so
//! `node stop` finds the node of this home and no other.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Subcommand;

#[derive(Subcommand)]
pub enum NodeCommand {
    /// Stop the node of this HANGAR_HOME and every machine it runs (they keep their disk; `hangar up` brings the node back)
    Stop,
    /// Stop everything, destroy every machine and remove HANGAR_HOME with all its data (images, apps, secrets, registry)
    Destroy {
        /// Really remove it (without: say what would go)
        #[arg(long)]
        yes: bool,
    },
}

pub fn run(command: NodeCommand) -> Result<()> {
    let home = crate::home()?;
    match command {
        NodeCommand::Stop => stop(&home),
        NodeCommand::Destroy { yes } => destroy(&home, yes),
    }
}

/// `$HANGAR_HOME/node.pid` while `hangar up` runs; removed when it ends.
pub struct PidFile(PathBuf);

impl PidFile {
    pub fn create(home: &Path) -> Result<PidFile> {
        if let Some(pid) = node_pid(home) {
            if pid != std::process::id() as i32 {
                bail!(
                    "a node runs on {} already (pid {pid}); stop it with `hangar node stop`, or give this one another HANGAR_HOME",
                    home.display()
                );
            }
        }
        let path = home.join("node.pid");
        let tmp = home.join(".node.pid.tmp");
        std::fs::write(&tmp, std::process::id().to_string())
            .and_then(|()| std::fs::rename(&tmp, &path))
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(PidFile(path))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let ours = std::fs::read_to_string(&self.0)
            .is_ok_and(|p| p.trim() == std::process::id().to_string());
        if ours {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// The pid of this home's running `hangar up`, if one runs (a pid file
/// left by a killed node, or naming another process now, does not count).
fn node_pid(home: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(home.join("node.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let is_up =
        args.get(1) == Some(&&b"up"[..]) && args.first().is_some_and(|a| a.ends_with(b"hangar"));
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    });
    (is_up && !zombie).then_some(pid)
}

fn stop(home: &Path) -> Result<()> {
    if let Some(pid) = node_pid(home) {
        // SAFETY: kill(2) of the node's process, found by its pid file.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while node_pid(home) == Some(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if node_pid(home) == Some(pid) {
            // SAFETY: as above; it did not stop within 30 s.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        println!("stopped the node (pid {pid})");
    } else {
        println!("no node runs on {}", home.display());
    }
    let at = crate::node_config::StateAt::of_home(home);
    if at.etcd.is_none() && !home.join("state.db").is_file() {
        return Ok(());
    }
    let node = crate::up::open_node(home, &at)?.node;
    let stopped = node.stop_all();
    for m in node.own_machines()? {
        node.driver.release(&m.id);
    }
    println!(
        "stopped {stopped} machine(s); nothing of {} runs or is mounted (remove it with `hangar node destroy --yes`)",
        home.display()
    );
    Ok(())
}

/// Whether `home` is a Hangar home (so removing it is what was meant).
fn looks_like_home(home: &Path) -> bool {
    let empty = std::fs::read_dir(home).is_ok_and(|mut d| d.next().is_none());
    empty
        || ["state.db", "config.toml", "oci", "registry", "machines"]
            .iter()
            .any(|e| home.join(e).exists())
}

fn destroy(home: &Path, yes: bool) -> Result<()> {
    if !home.exists() {
        println!("nothing to destroy: {} does not exist", home.display());
        return Ok(());
    }
    let canonical = home
        .canonicalize()
        .with_context(|| format!("cannot read {}", home.display()))?;
    let user_home = std::env::var_os("HOME").and_then(|h| PathBuf::from(h).canonicalize().ok());
    if canonical == Path::new("/")
        || Some(&canonical) == user_home.as_ref()
        || !looks_like_home(home)
    {
        bail!(
            "{} does not look like a Hangar home (no state.db, config.toml, oci, registry or machines in it); not removing it",
            home.display()
        );
    }
    if !yes {
        bail!(
            "this removes {} and everything in it: its machines, images, apps, secrets and registry; run again with --yes",
            home.display()
        );
    }
    let machines = home.join("machines");
    if home.join("state.db").is_file() || machines.is_dir() {
        stop(home)?;
        let at = crate::node_config::StateAt::of_home(home);
        let node = crate::up::open_node(home, &at)?.node;
        let mut ids: Vec<String> = node.own_machines()?.into_iter().map(|m| m.id).collect();
        // Machines on disk that the state store does not know (a crash
        // between the two) go as well.
        for id in node.driver.machines() {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        for id in &ids {
            node.driver
                .destroy(id)
                .with_context(|| format!("cannot destroy machine {id}"))?;
        }
        println!("destroyed {} machine(s)", ids.len());
    }
    // Anything still mounted below the home (nothing should be) would
    // make the removal fail half-way.
    let prefix = format!("{}/", canonical.display());
    for line in std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
    {
        if let Some(point) = line.split(' ').nth(4).filter(|p| p.starts_with(&prefix)) {
            let _ = rustix::mount::unmount(point, rustix::mount::UnmountFlags::DETACH);
        }
    }
    std::fs::remove_dir_all(home).with_context(|| format!("cannot remove {}", home.display()))?;
    println!("removed {}", home.display());
    Ok(())
}
