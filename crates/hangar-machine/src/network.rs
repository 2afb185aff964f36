//! The private networks: one per org. On each node it is a host bridge
//! (`hangar<net>`) with an IPv4 /24 (`10.213.<net>.0/24`) and an IPv6 /64
//! (`fdaa:6a6e:6172:<net>::/64`, a ULA prefix like Fly's 6PN); net 0 holds
//! machines of no org and carries the node's own services (the egress proxy
//! on `10.213.0.1`). A machine's slot number says its node (`slot >> 16`,
//! 0 for a node alone), its net (`(slot >> 8) & 0xff`) and its host number
//! (`slot & 0xff`), so its addresses name its org's network and its node
//! (`fdaa:6a6e:6172:<net>:<node>::<host>`, as Fly's 6PN addresses encode
//! the host) and stay the same across restarts; its IPv4 address and MAC
//! are its net's and host's only (host numbers are the cluster's, one per
//! machine of an org). Each node's gateway on a bridge is `.1` and
//! `<net>:<node>::1`. Each machine gets a network namespace and a veth pair
//! into its net's bridge; across nodes, [`crate::overlay`] joins the bridges.
//!
//! Machines of one org reach each other over their bridge; machines of two
//! orgs share no link, and the host routes nothing between them: Hangar never
//! turns on IP forwarding, and firewall rules (IPv4 and IPv6) drop anything
//! routed into or out of each bridge, should the host have forwarding on (the
//! egress proxy is the way out). The host reaches every machine over its
//! bridge. Fail closed: when those rules cannot be checked or put in place,
//! the bridge is not set up and no machine starts on it.
//!
//! Uses iproute2's `ip` and `iptables`: both are on every Debian host, and
//! shelling out keeps this code small and obvious.

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

use crate::error::{run, Error, Result};

/// `fdaa:6a6e:6172::/48`: a ULA prefix, like Fly's 6PN; a /64 per net.
pub const PREFIX6: [u16; 3] = [0xfdaa, 0x6a6e, 0x6172];
pub const SUBNET4: [u8; 2] = [10, 213];
/// Nets on one host (each a /24 of `10.213.0.0/16`).
pub const NETS: u32 = 256;
/// Host numbers of machines in a net: 2 to 254 (1 is the host).
pub const HOSTS: std::ops::RangeInclusive<u32> = 2..=254;

/// A machine's addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Addresses {
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

/// The machine's MAC address, fixed per net and host: a slot reused by a
/// new machine answers under the same MAC, so the host's neighbor cache
/// entry for the address stays true (a new MAC would leave it stale for
/// seconds).
pub fn mac(n: u32) -> String {
    format!("02:68:61:6e:{:02x}:{:02x}", net_of(n), n & 0xff)
}

/// The MAC of this node's bridge of `net`: the node's and the net's.
fn bridge_mac(net: u32) -> String {
    format!("02:68:67:{:02x}:{:02x}:01", local_node(), net & 0xff)
}

/// The net a slot is in.
pub fn net_of(slot: u32) -> u32 {
    (slot >> 8) & 0xff
}

/// The node a slot is on (0: a node alone).
pub fn node_of(slot: u32) -> u32 {
    (slot >> 16) & 0xff
}

/// The first slot of `node`'s part of the address space.
pub fn node_base(node: u32) -> u32 {
    (node & 0xff) << 16
}

/// What two machines of one org may not share, across nodes: their net
/// and host number (their IPv4 address and MAC).
pub fn unique_part(slot: u32) -> u32 {
    slot & 0xffff
}

/// This node's number in its cluster (0 alone): the node part of the
/// gateway addresses it puts on its bridges. Set once, at start.
static LOCAL_NODE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

pub fn set_local_node(node: u32) {
    LOCAL_NODE.store(node & 0xff, std::sync::atomic::Ordering::SeqCst);
}

pub fn local_node() -> u32 {
    LOCAL_NODE.load(std::sync::atomic::Ordering::SeqCst)
}

/// The first slot of `net` (its host address).
pub fn net_base(net: u32) -> u32 {
    net.min(NETS - 1) << 8
}

/// The bridge of `net`.
pub fn bridge(net: u32) -> String {
    format!("hangar{}", net.min(NETS - 1))
}

/// This node's addresses on net 0, where its services listen.
pub fn gateway() -> Addresses {
    gateway_of(node_base(local_node()))
}

/// The addresses of the gateway of `slot`'s node on its net.
pub fn gateway_of(slot: u32) -> Addresses {
    address((slot & !0xff) | 1)
}

/// The addresses of slot `n`.
pub fn address(n: u32) -> Addresses {
    let (net, host, node) = (net_of(n), (n & 0xff).max(1), node_of(n));
    Addresses {
        v4: Ipv4Addr::new(SUBNET4[0], SUBNET4[1], net as u8, host as u8),
        v6: Ipv6Addr::new(
            PREFIX6[0],
            PREFIX6[1],
            PREFIX6[2],
            net as u16,
            node as u16,
            0,
            0,
            host as u16,
        ),
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

/// The machine's end of its veth pair on the host.
pub fn host_veth(id: &str) -> String {
    format!("hv{}", &id[..id.len().min(12)])
}

/// The path runc joins for the machine's network namespace.
pub fn netns_path(id: &str) -> PathBuf {
    PathBuf::from("/var/run/netns").join(netns(id))
}

/// Create the bridge of `net` (once per host boot) and its no-forwarding
/// rules; a process does the work once per net.
pub fn ensure_bridge(net: u32) -> Result<()> {
    static DONE: Mutex<Option<HashSet<u32>>> = Mutex::new(None);
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if done.as_ref().is_some_and(|d| d.contains(&net)) {
        return Ok(());
    }
    setup_bridge(net)?;
    done.get_or_insert_with(HashSet::new).insert(net);
    Ok(())
}

fn setup_bridge(net: u32) -> Result<()> {
    if Command::new("ip").arg("-V").output().is_err() {
        return Err(Error::Host(
            "`ip` (iproute2) is not installed; install iproute2".into(),
        ));
    }
    let name = bridge(net);
    let exists = Command::new("ip")
        .args(["link", "show", &name])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !exists {
        ip(&["link", "add", &name, "type", "bridge"])?;
    }
    // A MAC of its own, set: a bridge left to pick its ports' lowest would
    // change it as machines come, and each change flushes the bridge's
    // neighbor entries (the overlay's among them).
    ip(&["link", "set", &name, "address", &bridge_mac(net)])?;
    let gw = gateway_of(node_base(local_node()) | net_base(net));
    // Before nets per org, hangar0 had all of 10.213.0.0/16.
    let _ = ip(&["addr", "del", &format!("{}/16", gw.v4), "dev", &name]);
    let _ = ip(&["addr", "add", &format!("{}/24", gw.v4), "dev", &name]);
    let _ = ip(&[
        "-6",
        "addr",
        "add",
        &format!("{}/64", gw.v6),
        "dev",
        &name,
        "nodad",
    ]);
    ip(&["link", "set", &name, "up"])?;
    // Drop anything routed out of the bridge or into it, should forwarding
    // be on. Fail closed: no machine starts unless the rules are known to be
    // in place, for IPv4 and IPv6 alike.
    for tool in ["iptables", "ip6tables"] {
        for rule in drop_rules(&name) {
            ensure_drop_rule(tool, &rule)?;
        }
    }
    Ok(())
}

/// The rules that drop traffic routed from `bridge` elsewhere and from
/// elsewhere into it (traffic within the bridge is bridged, not routed).
fn drop_rules(bridge: &str) -> [Vec<String>; 2] {
    let rule = |a: &str, b: &str| {
        ["FORWARD", a, bridge, "!", b, bridge, "-j", "DROP"]
            .map(String::from)
            .to_vec()
    };
    [rule("-i", "-o"), rule("-o", "-i")]
}

/// Make sure `tool` (iptables or ip6tables) has `rule`: checked, inserted
/// when absent, checked again. Anything else is an error that says machines
/// cannot start, and why.
fn ensure_drop_rule(tool: &str, rule: &[String]) -> Result<()> {
    let refuse = |why: String| {
        Error::Host(format!(
            "cannot make sure nothing is forwarded out of the machine network ({tool}: {why}); \
             machines are not started: install iptables and run as root (`{tool} -I {}` must work)",
            rule.join(" ")
        ))
    };
    let check = || -> Result<bool> {
        let out = Command::new(tool)
            .args(["-w", "5", "-C"])
            .args(rule)
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
        .args(rule)
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
    let net = net_of(slot);
    ensure_bridge(net)?;
    if attached(id) {
        detach(id);
    }
    let ns = netns(id);
    let veth = host_veth(id);
    let addr = address(slot);
    let gw = gateway_of(slot);
    let bridge = bridge(net);
    // Two `ip -batch` runs, host side then inside the namespace: every
    // process started here is time a machine waits for.
    let host = format!(
        "netns add {ns}\nlink add {veth} type veth peer name eth0 address {} netns {ns}\nlink set {veth} master {bridge} up\n",
        mac(slot)
    );
    let inside = format!(
        "link set lo up\naddr add {}/24 dev eth0\naddr add {}/64 dev eth0 nodad\nlink set eth0 up\n\
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

/// The TCP sockets listening inside a container machine's namespace (read
/// from its `/proc/net/tcp{,6}` through `nsenter`), to explain a port that
/// refuses the host. Empty when it cannot tell (a micro-VM has no namespace
/// here).
pub fn listeners(id: &str) -> Vec<std::net::SocketAddr> {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns_path(id).display()))
        .args(["cat", "/proc/net/tcp", "/proc/net/tcp6"])
        .output();
    let Ok(out) = out else {
        return Vec::new();
    };
    parse_listeners(&String::from_utf8_lossy(&out.stdout))
}

/// Listening sockets (`st` 0A) of `/proc/net/tcp` and `tcp6` text.
fn parse_listeners(text: &str) -> Vec<std::net::SocketAddr> {
    let mut found = Vec::new();
    for line in text.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 4 || cols[3] != "0A" {
            continue;
        }
        let Some((ip, port)) = cols[1].split_once(':') else {
            continue;
        };
        let Ok(port) = u16::from_str_radix(port, 16) else {
            continue;
        };
        // The kernel prints each 32-bit word in host (little-endian) order.
        let words: Option<Vec<u32>> = (0..ip.len() / 8)
            .map(|i| u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16).ok())
            .collect();
        let Some(words) = words else {
            continue;
        };
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let ip = match bytes.len() {
            4 => std::net::IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]]),
            16 => {
                let mut b = [0u8; 16];
                b.copy_from_slice(&bytes);
                std::net::IpAddr::from(b)
            }
            _ => continue,
        };
        found.push(std::net::SocketAddr::new(ip, port));
    }
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
    fn listeners_are_read_from_proc_net() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0100007F:1F90 0200007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0
   0: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3 1 0 100 0 0 10 0
   1: 00000000000000000000000001000000:0051 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4 1 0 100 0 0 10 0
";
        let found = parse_listeners(text);
        let want: Vec<std::net::SocketAddr> = ["127.0.0.1:8080", "[::]:80", "[::1]:81"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(found, want);
    }

    #[test]
    fn addresses_are_stable_per_slot() {
        assert_eq!(address(2).v4, Ipv4Addr::new(10, 213, 0, 2));
        assert_eq!(address(258).v4, Ipv4Addr::new(10, 213, 1, 2));
        assert_eq!(address(2).v6.to_string(), "fdaa:6a6e:6172::2");
        assert_eq!(address(258).v6.to_string(), "fdaa:6a6e:6172:1::2");
        assert_eq!(gateway().v4, Ipv4Addr::new(10, 213, 0, 1));
        assert_eq!(gateway_of(258).v4, Ipv4Addr::new(10, 213, 1, 1));
        assert_eq!(gateway_of(258).v6.to_string(), "fdaa:6a6e:6172:1::1");
        assert_eq!(
            (net_of(258), bridge(net_of(258))),
            (1, "hangar1".to_string())
        );
        assert_eq!(mac(258), "02:68:61:6e:01:02");
    }

    #[test]
    fn a_slot_of_a_cluster_names_its_node_in_ipv6_only() {
        let on_3 = node_base(3) | 258;
        assert_eq!((node_of(on_3), net_of(on_3)), (3, 1));
        assert_eq!(address(on_3).v4, Ipv4Addr::new(10, 213, 1, 2));
        assert_eq!(address(on_3).v6.to_string(), "fdaa:6a6e:6172:1:3::2");
        assert_eq!(gateway_of(on_3).v4, Ipv4Addr::new(10, 213, 1, 1));
        assert_eq!(gateway_of(on_3).v6.to_string(), "fdaa:6a6e:6172:1:3::1");
        assert_eq!((mac(on_3), unique_part(on_3)), (mac(258), 258));
    }
}
