//! The node's `.internal` DNS: a [`hangar_dns::Server`] kept in line with
//! the store. Every change of the store's revision rebuilds the zone from
//! the machines (started and wanted started) and apps, so an answer follows
//! a start or stop within one change; each org net with a machine on this
//! node is served on the node's gateway of that net, port 53, and machines
//! are given those addresses as their resolvers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hangar_dns::{Instance, Zone};
use hangar_machine::network;

use crate::error::{Error, Result};
use crate::store::{Desired, MachineState, Site, Store};

/// The port resolvers are asked on (resolv.conf cannot name another).
pub const PORT: u16 = 53;

pub struct Dns {
    server: hangar_dns::Server,
    port: u16,
    stop: Arc<AtomicBool>,
    /// Round trips between regions, for `nearest`.
    latency: crate::cluster::Latency,
}

impl Dns {
    pub fn new(port: u16) -> Dns {
        Dns {
            server: hangar_dns::Server::new(Zone::default()),
            port,
            stop: Arc::new(AtomicBool::new(false)),
            latency: Default::default(),
        }
    }

    /// Rank other regions in `top<N>.nearest` by these round trips.
    pub fn with_latency(mut self, latency: crate::cluster::Latency) -> Dns {
        self.latency = latency;
        self
    }

    /// Serve `net` on this node's gateway addresses of it (its bridge must
    /// be up); once per net, later calls do nothing.
    pub fn open(&self, net: u32) -> Result<()> {
        let gw =
            network::gateway_of(network::node_base(network::local_node()) | network::net_base(net));
        let bridge = network::bridge(net);
        for ip in [std::net::IpAddr::V6(gw.v6), std::net::IpAddr::V4(gw.v4)] {
            self.server
                .listen(net, (ip, self.port).into(), Some(&bridge))
                .map_err(|e| {
                    Error::Unavailable(format!(
                        "{e}; machines of this net would have no .internal names. If something else \
                         listens on port {} of every address (a dnsmasq or named bound to 0.0.0.0), \
                         bind it to its own addresses only (dnsmasq --bind-interfaces), or start \
                         `hangar up --no-dns`",
                        self.port
                    ))
                })?;
        }
        Ok(())
    }

    /// The resolvers of a machine in `slot`: its node's gateway of its net.
    pub fn resolvers(slot: u32) -> Vec<String> {
        let gw = network::gateway_of(slot);
        vec![gw.v6.to_string(), gw.v4.to_string()]
    }

    /// The zone answered now.
    pub fn zone(&self) -> Arc<Zone> {
        self.server.zone()
    }

    /// The queries of each net with an org (`nets`: net to org), labelled
    /// with the org and this `node`.
    pub fn families(
        &self,
        nets: &std::collections::BTreeMap<u32, String>,
        node: &str,
    ) -> Vec<hangar_metrics::exposition::Family> {
        use hangar_metrics::exposition::Family;
        let mut answered = Family::counter(
            "hangar_dns_queries",
            "`.internal` queries answered, by transport and response code.",
            None,
        );
        let mut dropped = Family::counter(
            "hangar_dns_dropped",
            "`.internal` queries too short or malformed to answer.",
            None,
        );
        for c in self.server.counts() {
            let Some(org) = nets.get(&c.net) else {
                continue;
            };
            for (transport, rcode, n) in &c.answered {
                if *n > 0 {
                    answered.push(
                        &[
                            ("org", org.as_str()),
                            ("node", node),
                            ("transport", *transport),
                            ("rcode", *rcode),
                        ],
                        *n as f64,
                    );
                }
            }
            dropped.push(&[("org", org.as_str()), ("node", node)], c.dropped as f64);
        }
        vec![answered, dropped]
    }

    /// Keep the zone in line with `store` from now on, on a thread of its
    /// own; stops when the `Dns` is dropped.
    pub fn follow(self: &Arc<Self>, store: Arc<dyn Store>, site: Site) {
        let dns = Arc::downgrade(self);
        let stop = self.stop.clone();
        let _ = std::thread::Builder::new()
            .name("dns-zone".into())
            .spawn(move || {
                let mut seen = None;
                while !stop.load(Ordering::Relaxed) {
                    let Some(dns) = dns.upgrade() else { return };
                    let now = match seen {
                        None => store.revision(),
                        Some(rev) => store.wait_change(rev, Duration::from_millis(500)),
                    };
                    match now {
                        Ok(rev) if Some(rev) == seen => {}
                        Ok(rev) => match zone(store.as_ref(), &site) {
                            Ok((mut zone, own_nets)) => {
                                for (a, b, rtt) in dns.latency.pairs() {
                                    zone.set_rtt(a, b, rtt.as_micros() as u64);
                                }
                                dns.server.set(zone);
                                // Nets of machines adopted at start.
                                for net in own_nets {
                                    if let Err(e) = network::ensure_bridge(net)
                                        .map_err(Error::from)
                                        .and_then(|()| dns.open(net))
                                    {
                                        tracing::warn!("dns: {e}");
                                    }
                                }
                                seen = Some(rev);
                            }
                            Err(e) => {
                                tracing::warn!("dns: {e}");
                                std::thread::sleep(Duration::from_millis(200));
                            }
                        },
                        Err(e) => {
                            tracing::warn!("dns: {e}");
                            std::thread::sleep(Duration::from_millis(200));
                        }
                    }
                }
            });
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The zone of everything in `store` as `site` serves it, and the nets of
/// the started machines on this node.
pub fn zone(store: &dyn Store, site: &Site) -> Result<(Zone, Vec<u32>)> {
    let mut zone = Zone::new(&site.node, &site.region);
    let machines = store.list()?;
    // An org's net is its machines' (an org with none has nobody to ask).
    let mut org_net = std::collections::HashMap::new();
    let apps: std::collections::HashMap<String, String> =
        store.apps()?.into_iter().map(|a| (a.name, a.org)).collect();
    let mut own = std::collections::BTreeSet::new();
    for m in &machines {
        let Some(app) = &m.app else { continue };
        let net = network::net_of(m.slot);
        if let Some(org) = apps.get(app) {
            org_net.insert(org.clone(), net);
        }
        if m.state != MachineState::Started || m.desired != Desired::Started {
            continue;
        }
        if m.node == site.node || m.node.is_empty() {
            own.insert(net);
        }
        let addr = network::address(m.slot);
        zone.add_instance(
            net,
            app,
            Instance {
                id: m.id.clone(),
                region: if m.region.is_empty() {
                    site.region.clone()
                } else {
                    m.region.clone()
                },
                node: m.node.clone(),
                v4: addr.v4,
                v6: addr.v6,
            },
        );
    }
    for (app, org) in &apps {
        if let Some(net) = org_net.get(org) {
            zone.add_app(*net, app);
        }
    }
    Ok((zone, own.into_iter().collect()))
}
