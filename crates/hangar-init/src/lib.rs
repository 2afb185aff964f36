//! `hangar-init`: PID 1 inside every Hangar machine.
//!
//! The host writes an [`InitConfig`] (JSON) into the machine; init reads it,
//! finishes the root filesystem (mounts what is not mounted yet), sets the
//! hostname, writes `/etc/resolv.conf` and `/etc/hosts`, works out the
//! command, environment, working directory and user from the image config
//! and the machine's overrides, starts the app, forwards signals to it, reaps
//! every zombie, and exits with the app's exit code (128+signal when it was
//! killed by a signal).
//!
//! Key design decision: one static binary that assumes nothing about being in
//! a container, so the same init serves micro-VMs: every mount is attempted
//! only where nothing is mounted yet, and failures to mount (no privilege in
//! a container) are not fatal. In a VM ([`VmSetup`]) it first loads the
//! virtio modules, mounts the root disk and configures eth0, and it talks
//! to the host over the console ([`EXIT_MARKER`], [`SIGNAL_MARKER`]).
//!
//! This crate depends on no other Hangar crate; the host crates depend on its
//! library half (this file) for the config format. It must stay small and
//! static: no async runtime, no network protocols (eth0 is set by ioctl).

pub mod vmconsole;

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Where the host puts the config inside the machine.
pub const CONFIG_PATH: &str = "/.hangar/config.json";

/// What the image's config says about running it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct ImageProcess {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub workdir: String,
    pub user: String,
}

/// `/etc/resolv.conf` of a machine with no resolver of its own.
pub const NO_RESOLVER: &str =
    "# Written by Hangar: this machine has no DNS resolver of its own (yet).
# Names still work through the egress proxy: HTTP_PROXY and HTTPS_PROXY are
# set, and the proxy resolves them.
options timeout:1 attempts:1
";

/// Everything init needs, written by the host.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct InitConfig {
    pub hostname: String,
    pub image: ImageProcess,
    /// Replaces entrypoint and cmd together.
    pub exec: Option<Vec<String>>,
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    /// Added to (and overriding) the image's environment.
    pub env: BTreeMap<String, String>,
    pub user: Option<String>,
    pub nameservers: Vec<String>,
    pub search: Vec<String>,
    /// Extra `/etc/hosts` lines: address and names.
    pub hosts: Vec<(String, Vec<String>)>,
    /// Set inside a micro-VM: what init does before the usual (modules,
    /// root disk, network).
    pub vm: Option<VmSetup>,
}

/// In a micro-VM, init starts from the initramfs: it loads the kernel
/// modules the host put there, mounts the root disk, switches to it and
/// configures eth0. It then reports the app's end on the console
/// ([`EXIT_MARKER`]) and powers off; the host sends signals as console
/// lines ([`SIGNAL_MARKER`]).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct VmSetup {
    /// Module files in the initramfs, in load order.
    pub modules: Vec<String>,
    /// The root disk's device, e.g. `/dev/vda`, with an ext4 filesystem.
    pub root: String,
    /// `address/prefix` for eth0, IPv4 and IPv6.
    pub ipv4: String,
    pub ipv6: String,
    pub gateway4: String,
    pub gateway6: String,
    pub mtu: u32,
}

/// Where the config sits in a VM's initramfs.
pub const VM_CONFIG_PATH: &str = "/hangar/config.json";
/// `hangar-exit:<code>:<oom 0|1>` on the console: how the app ended.
pub const EXIT_MARKER: &str = "hangar-exit:";
/// `hangar-signal:<number>` from the host on the console: pass it on.
pub const SIGNAL_MARKER: &str = "hangar-signal:";

/// `hangar-exec:<n>:<hex of ExecRequest JSON>` from the host: run a command.
pub const EXEC_MARKER: &str = "hangar-exec:";
/// `hangar-exec-result:<n>:<hex of ExecResult JSON>` from the guest.
pub const EXEC_RESULT_MARKER: &str = "hangar-exec-result:";

/// A command to run inside a VM (what `runc exec` does for containers).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    pub env: Vec<String>,
    /// Given to the command as its standard input.
    #[serde(default)]
    pub stdin: String,
}

/// How it went: exit code and output (each cut at 64 KiB).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ExecResult {
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

pub fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn hex_decode(text: &str) -> Option<Vec<u8>> {
    let text = text.trim();
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Parse an exit line the guest printed: (code, oom).
pub fn parse_exit(line: &str) -> Option<(i32, bool)> {
    let rest = line.trim().strip_prefix(EXIT_MARKER)?;
    let (code, oom) = rest.split_once(':')?;
    Some((code.parse().ok()?, oom == "1"))
}

/// A user to run as, resolved against the image's own passwd and group files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub home: String,
}

impl InitConfig {
    /// The command line, by the OCI image spec's rules: `exec` wins; an
    /// overridden entrypoint drops the image's cmd unless cmd is given too.
    pub fn argv(&self) -> Vec<String> {
        if let Some(exec) = &self.exec {
            return exec.clone();
        }
        let entrypoint = self
            .entrypoint
            .clone()
            .unwrap_or_else(|| self.image.entrypoint.clone());
        let cmd = match (&self.cmd, &self.entrypoint) {
            (Some(c), _) => c.clone(),
            (None, Some(_)) => Vec::new(),
            (None, None) => self.image.cmd.clone(),
        };
        entrypoint.into_iter().chain(cmd).collect()
    }

    /// The environment: the image's, then the machine's overrides, with
    /// PATH, HOME and HOSTNAME defaulted as Docker does.
    pub fn environment(&self, home: &str) -> Vec<String> {
        let mut env: Vec<(String, String)> = Vec::new();
        let mut set = |k: &str, v: &str| match env.iter_mut().find(|(key, _)| key == k) {
            Some(entry) => entry.1 = v.to_string(),
            None => env.push((k.to_string(), v.to_string())),
        };
        for kv in &self.image.env {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            set(k, v);
        }
        for (k, v) in &self.env {
            set(k, v);
        }
        let has = |k: &str, env: &[(String, String)]| env.iter().any(|(key, _)| key == k);
        if !has("PATH", &env) {
            env.push((
                "PATH".into(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            ));
        }
        if !has("HOME", &env) {
            env.push(("HOME".into(), home.to_string()));
        }
        if !has("HOSTNAME", &env) && !self.hostname.is_empty() {
            env.push(("HOSTNAME".into(), self.hostname.clone()));
        }
        env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
    }

    /// The user to run as (`user`, `uid`, `user:group`, `uid:gid`), looked up
    /// in `<root>/etc/passwd` and `<root>/etc/group`.
    pub fn run_as(&self, root: &Path) -> Result<RunAs, String> {
        let spec = self.user.clone().unwrap_or_else(|| self.image.user.clone());
        resolve_user(&spec, root)
    }

    /// The working directory, `/` when the image names none.
    pub fn workdir(&self) -> String {
        if self.image.workdir.is_empty() {
            "/".into()
        } else {
            self.image.workdir.clone()
        }
    }

    /// The contents of `/etc/hosts`.
    pub fn hosts_file(&self) -> String {
        let mut out =
            String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
        for (addr, names) in &self.hosts {
            out.push_str(&format!("{addr}\t{}\n", names.join(" ")));
        }
        out
    }

    /// The contents of `/etc/resolv.conf`. With no nameservers it names
    /// none, and says why: the image's own file (often the build host's)
    /// names resolvers a machine cannot reach, so every lookup would hang
    /// until it timed out; with none, lookups fail at once (the C
    /// libraries then ask 127.0.0.1, where nothing listens).
    pub fn resolv_conf(&self) -> String {
        if self.nameservers.is_empty() {
            return NO_RESOLVER.to_string();
        }
        let mut out = String::new();
        for ns in &self.nameservers {
            out.push_str(&format!("nameserver {ns}\n"));
        }
        if !self.search.is_empty() {
            out.push_str(&format!("search {}\n", self.search.join(" ")));
        }
        out
    }
}

/// One `name:x:id:...` file's records.
fn records(path: &Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split(':').map(str::to_string).collect())
        .collect()
}

/// Resolve a Docker user spec against the image's passwd and group files.
pub fn resolve_user(spec: &str, root: &Path) -> Result<RunAs, String> {
    let passwd = records(&root.join("etc/passwd"));
    let group = records(&root.join("etc/group"));
    let (user, grp) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let user = if user.is_empty() { "0" } else { user };
    let entry = passwd
        .iter()
        .find(|r| r.len() >= 4 && (r[0] == user || r[2] == user));
    let uid: u32 = match (entry, user.parse()) {
        (Some(r), _) => r[2]
            .parse()
            .map_err(|_| format!("bad uid for {user:?} in /etc/passwd"))?,
        (None, Ok(n)) => n,
        (None, Err(_)) => return Err(format!("user {user:?} is not in the image's /etc/passwd")),
    };
    let name = entry.map(|r| r[0].clone());
    let gid: u32 = match grp {
        Some(g) => match group
            .iter()
            .find(|r| r.len() >= 3 && (r[0] == g || r[2] == g))
        {
            Some(r) => r[2]
                .parse()
                .map_err(|_| format!("bad gid for {g:?} in /etc/group"))?,
            None => g
                .parse()
                .map_err(|_| format!("group {g:?} is not in the image's /etc/group"))?,
        },
        None => entry.and_then(|r| r[3].parse().ok()).unwrap_or(0),
    };
    let mut groups = vec![gid];
    if let Some(n) = &name {
        for r in &group {
            if r.len() >= 4 && r[3].split(',').any(|m| m == n) {
                if let Ok(g) = r[2].parse() {
                    if !groups.contains(&g) {
                        groups.push(g);
                    }
                }
            }
        }
    }
    let home = entry
        .and_then(|r| r.get(5).cloned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| if uid == 0 { "/root".into() } else { "/".into() });
    Ok(RunAs {
        uid,
        gid,
        groups,
        home,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> InitConfig {
        InitConfig {
            image: ImageProcess {
                entrypoint: vec!["/ep".into()],
                cmd: vec!["a".into()],
                env: vec!["PATH=/bin".into(), "A=1".into()],
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn hex_round_trips() {
        let bytes = b"{\"argv\":[\"cat\",\"/etc/hosts\"]}\n\x00\xff";
        assert_eq!(hex_decode(&hex_encode(bytes)).as_deref(), Some(&bytes[..]));
        assert_eq!(hex_decode("abc"), None);
        assert_eq!(hex_decode("zz"), None);
    }

    #[test]
    fn exit_lines_parse() {
        assert_eq!(parse_exit("hangar-exit:7:0\n"), Some((7, false)));
        assert_eq!(parse_exit("hangar-exit:137:1"), Some((137, true)));
        assert_eq!(parse_exit("hello hangar-exit:1:0"), None);
        assert_eq!(parse_exit("hangar-exit:x:0"), None);
    }

    #[test]
    fn argv_follows_the_image_spec() {
        let mut c = config();
        assert_eq!(c.argv(), ["/ep", "a"]);
        c.cmd = Some(vec!["b".into()]);
        assert_eq!(c.argv(), ["/ep", "b"]);
        c.cmd = None;
        c.entrypoint = Some(vec!["/other".into()]);
        assert_eq!(
            c.argv(),
            ["/other"],
            "a new entrypoint drops the image's cmd"
        );
        c.exec = Some(vec!["/x".into(), "y".into()]);
        assert_eq!(c.argv(), ["/x", "y"]);
    }

    #[test]
    fn env_overrides_and_defaults() {
        let mut c = config();
        c.env.insert("A".into(), "2".into());
        c.hostname = "m1".into();
        let env = c.environment("/root");
        assert_eq!(env, ["PATH=/bin", "A=2", "HOME=/root", "HOSTNAME=m1"]);
    }

    #[test]
    fn resolv_conf_names_no_unreachable_resolver() {
        let none = InitConfig::default().resolv_conf();
        assert!(!none.contains("nameserver"), "{none}");
        assert!(none.contains("egress proxy"), "{none}");
        let some = InitConfig {
            nameservers: vec!["10.213.0.1".into()],
            search: vec!["internal".into()],
            ..Default::default()
        };
        assert_eq!(
            some.resolv_conf(),
            "nameserver 10.213.0.1\nsearch internal\n"
        );
    }

    #[test]
    fn users_resolve_in_the_image() {
        let root = std::env::temp_dir().join(format!("hangar-init-test-{}", std::process::id()));
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(
            root.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            root.join("etc/group"),
            "root:x:0:\napp:x:1000:\nwheel:x:10:app\n",
        )
        .unwrap();
        let app = resolve_user("app", &root).unwrap();
        assert_eq!(
            (app.uid, app.gid, app.groups.clone(), app.home.as_str()),
            (1000, 1000, vec![1000, 10], "/home/app")
        );
        assert_eq!(resolve_user("app:wheel", &root).unwrap().gid, 10);
        assert_eq!(resolve_user("1234:5", &root).unwrap().uid, 1234);
        assert_eq!(resolve_user("", &root).unwrap().uid, 0);
        assert!(resolve_user("nobody-here", &root).is_err());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
