//! One private network per org across the nodes of a cluster: each org's
//! bridge (`hangar<net>`, see [`crate::network`]) is joined to the same
//! org's bridge on every other node by a VXLAN device (`hvx<net>`, VNI =
//! the net), so an org's machines on different nodes share one link and
//! reach each other by address, with nothing routed.
//!
//! No flooding and no learning: the node knows where every machine is
//! (the cluster's read model), so it writes, for each machine of another
//! node, the bridge's forwarding entry (its MAC on the VXLAN port), the
//! VXLAN's (that MAC at that node's underlay address) and the bridge's
//! neighbor entries (its IPv4 and IPv6 addresses at that MAC), and turns
//! neighbor suppression on for the port: ARP and neighbor solicitations are
//! answered on the node and never cross, so each node's gateway address on
//! the bridge stays its own. An org's VXLAN carries only its own net, and
//! only from the cluster's members: a firewall chain (`HANGAR-VXLAN`)
//! accepts the VXLAN port from their underlay addresses and drops it from
//! anyone else.
//!
//! Uses iproute2's `ip` and `bridge` and `iptables`, as the rest of the
//! host's network does.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::process::Command;
use std::sync::Mutex;

use crate::error::{run, Error, Result};
use crate::network::{address, bridge, ensure_bridge, ip_batch, mac, net_of};

/// The UDP port of the VXLAN between nodes (IANA's).
pub const VXLAN_PORT: u16 = 4789;
const CHAIN: &str = "HANGAR-VXLAN";

/// A machine of another node, as this node's bridges must know it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Peer {
    pub slot: u32,
    /// Where its node takes VXLAN traffic.
    pub underlay: IpAddr,
}

fn vxlan(net: u32) -> String {
    format!("hvx{net}")
}

/// This node's part of the overlay: what it wrote, so the next
/// [`Overlay::apply`] changes only what changed.
pub struct Overlay {
    /// This node's underlay address (the VXLAN's local end).
    local: IpAddr,
    applied: Mutex<Applied>,
}

#[derive(Default)]
struct Applied {
    nets: BTreeSet<u32>,
    peers: BTreeSet<Peer>,
    members: BTreeSet<IpAddr>,
    /// Whether the firewall chain is in place.
    chain: bool,
}

impl Overlay {
    pub fn new(local: IpAddr) -> Overlay {
        Overlay {
            local,
            applied: Mutex::new(Applied::default()),
        }
    }

    /// Make the host's overlay match: a VXLAN port on the bridge of each
    /// net with a peer, an entry per peer, and the VXLAN port open to the
    /// underlay addresses of `members` (the other nodes) only.
    pub fn apply(&self, peers: &[Peer], members: &[IpAddr]) -> Result<()> {
        let mut applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
        let members: BTreeSet<IpAddr> = members.iter().copied().collect();
        if !applied.chain || applied.members != members {
            firewall(&members)?;
            applied.chain = true;
            applied.members = members;
        }
        let want: BTreeSet<Peer> = peers.iter().cloned().collect();
        let nets: BTreeSet<u32> = want.iter().map(|p| net_of(p.slot)).collect();
        for net in nets.difference(&applied.nets.clone()) {
            self.add_net(*net)?;
            applied.nets.insert(*net);
        }
        let (mut ip, mut fdb) = (String::new(), String::new());
        for gone in applied.peers.difference(&want) {
            peer_lines(gone, false, &mut ip, &mut fdb);
        }
        for new in want.difference(&applied.peers) {
            peer_lines(new, true, &mut ip, &mut fdb);
        }
        // Removals of entries already gone fail: the batch goes on (-force).
        if !fdb.is_empty() {
            bridge_batch(&fdb)?;
        }
        if !ip.is_empty() {
            ip_batch(&["-force"], &ip)?;
        }
        applied.peers = want;
        // A net with no peer left keeps its port: it costs nothing idle.
        Ok(())
    }

    fn add_net(&self, net: u32) -> Result<()> {
        ensure_bridge(net)?;
        let (dev, br) = (vxlan(net), bridge(net));
        let _ = run(Command::new("ip").args(["link", "del", &dev]));
        run(Command::new("ip").args([
            "link",
            "add",
            &dev,
            "type",
            "vxlan",
            "id",
            &net.to_string(),
            "dstport",
            &VXLAN_PORT.to_string(),
            "local",
            &self.local.to_string(),
            "nolearning",
        ]))?;
        run(Command::new("ip").args(["link", "set", &dev, "master", &br, "up"]))?;
        run(Command::new("ip").args([
            "link",
            "set",
            &dev,
            "type",
            "bridge_slave",
            "neigh_suppress",
            "on",
            "learning",
            "off",
        ]))?;
        Ok(())
    }
}

/// The `ip` and `bridge` batch lines that add (or remove) one peer.
fn peer_lines(p: &Peer, add: bool, ip: &mut String, fdb: &mut String) {
    let net = net_of(p.slot);
    let (dev, br, mac, addr) = (vxlan(net), bridge(net), mac(p.slot), address(p.slot));
    if add {
        fdb.push_str(&format!(
            "fdb replace {mac} dev {dev} master static\nfdb append {mac} dev {dev} dst {} self permanent\n",
            p.underlay
        ));
        for a in [IpAddr::from(addr.v4), IpAddr::from(addr.v6)] {
            ip.push_str(&format!(
                "neigh replace {a} lladdr {mac} dev {br} nud permanent\n"
            ));
        }
    } else {
        fdb.push_str(&format!(
            "fdb del {mac} dev {dev} master\nfdb del {mac} dev {dev} dst {} self\n",
            p.underlay
        ));
        for a in [IpAddr::from(addr.v4), IpAddr::from(addr.v6)] {
            ip.push_str(&format!("neigh del {a} dev {br}\n"));
        }
    }
}

fn bridge_batch(commands: &str) -> Result<()> {
    use std::io::Write;
    let mut child = Command::new("bridge")
        .args(["-force", "-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| Error::Command {
            command: "bridge -batch".into(),
            detail: e.to_string(),
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(commands.as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| Error::Command {
        command: "bridge -batch".into(),
        detail: e.to_string(),
    })?;
    // With -force a failed line (the removal of an entry already gone)
    // does not stop the rest.
    let _ = out;
    Ok(())
}

/// The VXLAN port open to `members` only, for IPv4 and IPv6 underlays.
fn firewall(members: &BTreeSet<IpAddr>) -> Result<()> {
    let port = VXLAN_PORT.to_string();
    for (tool, v6) in [("iptables", false), ("ip6tables", true)] {
        let ipt = |args: &[&str]| run(Command::new(tool).arg("-w").arg("5").args(args));
        let _ = ipt(&["-N", CHAIN]);
        ipt(&["-F", CHAIN])?;
        let jump = ["INPUT", "-p", "udp", "--dport", &port, "-j", CHAIN];
        if ipt(&[&["-C"][..], &jump[..]].concat()).is_err() {
            ipt(&[&["-I"][..], &jump[..]].concat())?;
        }
        for m in members.iter().filter(|m| m.is_ipv6() == v6) {
            ipt(&["-A", CHAIN, "-s", &m.to_string(), "-j", "ACCEPT"])?;
        }
        ipt(&["-A", CHAIN, "-j", "DROP"])?;
    }
    Ok(())
}
