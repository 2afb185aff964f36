//! The private network: a host bridge (`hangar0`) with a ULA IPv6 prefix and
//! an IPv4 subnet; each machine gets a network namespace, a veth pair into
//! the bridge, and addresses derived from its slot number, so they are stable
//! across restarts. Machines reach each other and the host over the bridge;
//! the host reaches their ports. Nothing is forwarded out: Hangar never turns
//! on IP forwarding, and a firewall rule (IPv4 and IPv6) drops traffic
//! routed from the bridge to anywhere else, should the host have it on (the
//! egress proxy is the way out). Fail closed: when that rule cannot be
//! checked or put in place, the bridge is not set up and no machine starts.
//!
//! Uses iproute2's `ip` and `iptables`: both are on every Debian host, and
//! shelling out keeps this code small and obvious.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::Command;

use crate::error::{run, Error, Result};

pub const BRIDGE: &str = "hangar0";
/// `fdaa:6a6e:6172::/64`: a ULA prefix, like Fly's 6PN.
pub const PREFIX6: [u16; 3] = [0xfdaa, 0x6a6e, 0x6172];
pub const SUBNET4: [u8; 2] = [10, 213];

/// A machine's addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Addresses {
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

/// The machine's MAC address, fixed per slot: a slot reused by a new
/// machine answers under the same MAC, so the host's neighbor cache entry
/// for the address stays true (a new MAC would leave it stale for seconds).
pub fn mac(n: u32) -> String {
    let n = n.clamp(1, 65_000);
    format!("02:68:61:6e:{:02x}:{:02x}", n >> 8, n & 0xff)
}

pub fn gateway() -> Addresses {
    address(1)
}

/// The addresses of slot `n` (2 and up; 1 is the host).
pub fn address(n: u32) -> Addresses {
    let n = n.clamp(1, 65_000);
    Addresses {
        v4: Ipv4Addr::new(SUBNET4[0], SUBNET4[1], (n >> 8) as u8, (n & 0xff) as u8),
        v6: Ipv6Addr::new(PREFIX6[0], PREFIX6[1], PREFIX6[2], 0, 0, 0, 0, n as u16),
    }
}

fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

/// Run `ip [global] -batch -` with `commands` on stdin.
pub(crate) fn ip_batch(global: &[&str], commands: &str) -> Result<()> {
    use std::io::Write;
    let shown = format!("ip {} -batch", global.join(" "));
    let mut child = Command::new("ip")
        .args(global)
        .args(["-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| Error::Command {
            command: shown.clone(),
            detail: e.to_string(),
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(commands.as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| Error::Command {
        command: shown.clone(),
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(Error::Command {
            command: shown,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

fn netns(id: &str) -> String {
    format!("hangar-{}", &id[..id.len().min(12)])
}

fn host_veth(id: &str) -> String {
    format!("hv{}", &id[..id.len().min(12)])
}

/// The path runc joins for the machine's network namespace.
pub fn netns_path(id: &str) -> PathBuf {
    PathBuf::from("/var/run/netns").join(netns(id))
}

/// Create the bridge (once per host boot) and the no-forwarding rule; a
/// process does the work once.
pub fn ensure_bridge() -> Result<()> {
    static DONE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    if DONE.get().is_some() {
        return Ok(());
    }
    setup_bridge()?;
    let _ = DONE.set(());
    Ok(())
}

fn setup_bridge() -> Result<()> {
    if Command::new("ip").arg("-V").output().is_err() {
        return Err(Error::Host(
            "`ip` (iproute2) is not installed; install iproute2".into(),
        ));
    }
    let exists = Command::new("ip")
        .args(["link", "show", BRIDGE])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !exists {
        ip(&["link", "add", BRIDGE, "type", "bridge"])?;
    }
    let gw = gateway();
    let _ = ip(&["addr", "add", &format!("{}/16", gw.v4), "dev", BRIDGE]);
    let _ = ip(&[
        "-6",
        "addr",
        "add",
        &format!("{}/64", gw.v6),
        "dev",
        BRIDGE,
        "nodad",
    ]);
    ip(&["link", "set", BRIDGE, "up"])?;
    // Drop anything routed from the bridge elsewhere, should forwarding be
    // on. Fail closed: no machine starts unless the rule is known to be in
    // place, for IPv4 and IPv6 alike.
    for tool in ["iptables", "ip6tables"] {
        ensure_drop_rule(tool)?;
    }
    Ok(())
}

/// The rule that drops traffic routed from the bridge to anywhere else.
const DROP_RULE: [&str; 8] = ["FORWARD", "-i", BRIDGE, "!", "-o", BRIDGE, "-j", "DROP"];

/// Make sure `tool` (iptables or ip6tables) has `DROP_RULE`: checked,
/// inserted when absent, checked again. Anything else is an error that
/// says machines cannot start, and why.
fn ensure_drop_rule(tool: &str) -> Result<()> {
    let refuse = |why: String| {
        Error::Host(format!(
            "cannot make sure nothing is forwarded out of the machine network ({tool}: {why}); \
             machines are not started: install iptables and run as root (`{tool} -I {}` must work)",
            DROP_RULE.join(" ")
        ))
    };
    let check = || -> Result<bool> {
        let out = Command::new(tool)
            .args(["-w", "5", "-C"])
            .args(DROP_RULE)
            .output()
            .map_err(|e| refuse(e.to_string()))?;
        match out.status.code() {
            Some(0) => Ok(true),
            // 1: the rule is not there (the chain and table are).
            Some(1) => Ok(false),
            _ => Err(refuse(
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            )),
        }
    };
    if check()? {
        return Ok(());
    }
    let out = Command::new(tool)
        .args(["-w", "5", "-I"])
        .args(DROP_RULE)
        .output()
        .map_err(|e| refuse(e.to_string()))?;
    if !out.status.success() {
        return Err(refuse(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    if !check()? {
        return Err(refuse("the rule is not there after inserting it".into()));
    }
    Ok(())
}

/// Give machine `id` its namespace, veth and addresses in slot `slot`.
pub fn attach(id: &str, slot: u32) -> Result<Addresses> {
    ensure_bridge()?;
    if attached(id) {
        detach(id);
    }
    let ns = netns(id);
    let veth = host_veth(id);
    let addr = address(slot);
    let gw = gateway();
    // Two `ip -batch` runs, host side then inside the namespace: every
    // process started here is time a machine waits for.
    let host = format!(
        "netns add {ns}\nlink add {veth} type veth peer name eth0 address {} netns {ns}\nlink set {veth} master {BRIDGE} up\n",
        mac(slot)
    );
    let inside = format!(
        "link set lo up\naddr add {}/16 dev eth0\naddr add {}/64 dev eth0 nodad\nlink set eth0 up\n\
         route add default via {}\nroute add default via {}\n",
        addr.v4, addr.v6, gw.v4, gw.v6
    );
    let result = ip_batch(&[], &host)
        .and_then(|_| ip_batch(&["-n", &ns], &inside))
        .map(|_| addr.clone());
    if result.is_err() {
        detach(id);
    }
    result
}

/// Remove the machine's namespace (its veth pair goes with it). Idempotent.
pub fn detach(id: &str) {
    let _ = ip(&["netns", "del", &netns(id)]);
    let _ = ip(&["link", "del", &host_veth(id)]);
}

/// Machines on this host's bridge whose ids `mine` does not know, with
/// their link up: another Hangar home's, whose addresses may be the same
/// as this node's machines'. Their 12-character id prefixes.
pub fn strangers(mine: &[String]) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return Vec::new();
    };
    let mut found: Vec<String> = dir
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("hangar-")
                .map(String::from)
        })
        .filter(|short| !mine.iter().any(|id| id.starts_with(short.as_str())))
        .filter(|short| {
            std::fs::read_to_string(format!("/sys/class/net/hv{short}/operstate"))
                .is_ok_and(|s| s.trim() != "down")
        })
        .collect();
    found.sort();
    found
}

/// Whether the machine's namespace exists (for tests of cleanup).
pub fn attached(id: &str) -> bool {
    netns_path(id).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_stable_per_slot() {
        assert_eq!(address(2).v4, Ipv4Addr::new(10, 213, 0, 2));
        assert_eq!(address(258).v4, Ipv4Addr::new(10, 213, 1, 2));
        assert_eq!(address(2).v6.to_string(), "fdaa:6a6e:6172::2");
        assert_eq!(gateway().v4, Ipv4Addr::new(10, 213, 0, 1));
        assert_eq!(mac(258), "02:68:61:6e:01:02");
    }
}
