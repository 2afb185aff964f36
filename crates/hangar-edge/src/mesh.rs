//! The edge in a cluster: the other edge nodes (address, region, weight,
//! health and measured round trip), the tiers a cache miss climbs (the
//! key's owner among the region's edges by rendezvous hashing, then the
//! super-region's owner, then the shield region's owner, then the origin),
//! and the `hangar-hop` header that marks a request between edges with the
//! tier it is sent to, so that none goes back down or round in a loop.
//!
//! It is handed the nodes (the node computes them from the cluster's
//! members); it does not know where they come from.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use hyper::header::{HeaderMap, HeaderValue};
use rendezvous_hash::{Capacity, DefaultNodeHasher, KeyValueNode, RendezvousNodes, WeightedNode};

use crate::backend::Backend;
use crate::upstream;

/// How much later than the injected delay a ping may come back before
/// its edge counts as slow (a healthy edge answers in well under 1 ms).
const SLOW_PING: Duration = Duration::from_millis(200);

/// The header a request between edges carries: `<token> <role>`.
pub const HOP: &str = "hangar-hop";

/// What an edge is asked to be for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// A client's request: the whole path is ahead.
    Client,
    /// The key's owner in the region.
    Region,
    /// The key's owner in the super-region.
    Super,
    /// The key's owner in the app's shield region.
    Shield,
    /// Serve from this node's own machines: no cache, no further hop.
    Origin,
    /// Answer at once (the round trip is measured).
    Ping,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Client => "front",
            Role::Region => "edge",
            Role::Super => "super",
            Role::Shield => "shield",
            Role::Origin => "origin",
            Role::Ping => "ping",
        }
    }

    fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "edge" => Role::Region,
            "super" => Role::Super,
            "shield" => Role::Shield,
            "origin" => Role::Origin,
            "ping" => Role::Ping,
            _ => return None,
        })
    }
}

/// The cluster as the node hands it to the edge (or `[mesh]` in
/// `edge.toml`).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MeshConfig {
    /// This node's name and region.
    pub node: String,
    pub region: String,
    /// Shared by the cluster's edges: a hop without it is a client's
    /// request like any other.
    pub token: String,
    /// The other live edge nodes.
    pub peers: Vec<PeerConfig>,
    /// Super-regions: region -> the group it is in.
    pub groups: BTreeMap<String, String>,
    /// This node's own weight in the hashing (see [`PeerConfig::weight`]).
    pub weight: f64,
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            node: String::new(),
            region: String::new(),
            token: String::new(),
            peers: Vec::new(),
            groups: BTreeMap::new(),
            weight: 1.0,
        }
    }
}

impl MeshConfig {
    /// Every region, this one's first.
    pub fn regions(&self) -> Vec<String> {
        let mut r = vec![self.region.clone()];
        for p in &self.peers {
            if !r.contains(&p.region) {
                r.push(p.region.clone());
            }
        }
        r
    }
}

fn one() -> f64 {
    1.0
}

#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub name: String,
    pub region: String,
    /// Its edge's HTTP listener.
    pub addr: SocketAddr,
    /// Its share of the keys, 0 to 1: a node that just joined starts low
    /// and grows, so it takes load gradually.
    #[serde(default = "one")]
    pub weight: f64,
    /// A round trip added to each request to it (simulated regions:
    /// latency injected in user space). Zero in production.
    #[serde(default, deserialize_with = "crate::config::duration")]
    pub delay: Duration,
}

/// One other edge node: its connections, health and round trip.
pub struct Peer {
    pub config: PeerConfig,
    /// Its pool and passive health (failures eject it for a while).
    pub backend: Arc<Backend>,
    /// The last ping's verdict.
    up: AtomicBool,
    /// Pings failed in a row.
    missed: AtomicU32,
    /// Moving average of the ping round trip, in microseconds (0: none yet).
    rtt_us: AtomicU64,
}

impl Peer {
    fn new(config: PeerConfig) -> Peer {
        Peer {
            backend: Arc::new(Backend::new(config.addr, &[], Default::default())),
            config,
            up: AtomicBool::new(true),
            missed: AtomicU32::new(0),
            rtt_us: AtomicU64::new(0),
        }
    }

    /// Answers pings and is not ejected.
    pub fn usable(&self) -> bool {
        self.up.load(Ordering::Relaxed) && self.backend.available()
    }

    /// A request to it failed to connect or broke: down until it answers
    /// a ping again.
    pub fn failed(&self) {
        self.missed.store(2, Ordering::Relaxed);
        self.up.store(false, Ordering::Relaxed);
        self.backend.pool.clear();
    }

    /// Its pings take this much longer than the injected delay: an edge
    /// that answers a ping so late is overloaded or stuck, and owns keys
    /// only after the others.
    pub fn slow(&self) -> bool {
        self.rtt() > self.config.delay + SLOW_PING
    }

    /// The measured round trip (the injected delay until a ping is back).
    pub fn rtt(&self) -> Duration {
        match self.rtt_us.load(Ordering::Relaxed) {
            0 => self.config.delay,
            us => Duration::from_micros(us),
        }
    }
}

/// Where a tier's owner is: this node, or a peer.
#[derive(Clone)]
pub enum Owner {
    Me,
    Peer(Arc<Peer>),
}

/// One tier of a miss's path: its role and its nodes in hash order for the
/// key (usable ones only; the first is the owner, the rest take over).
pub struct Tier {
    pub role: Role,
    pub owners: Vec<Owner>,
}

/// The mesh: swapped whole when the cluster changes; a peer that stays
/// keeps its connections, health and round trip.
#[derive(Default)]
pub struct Mesh {
    view: RwLock<Arc<View>>,
    /// Whether the view is of a cluster: read on every request, so that a
    /// node alone never touches the shared view.
    clustered: AtomicBool,
}

#[derive(Default)]
pub struct View {
    pub config: MeshConfig,
    pub peers: Vec<Arc<Peer>>,
}

impl Mesh {
    pub fn view(&self) -> Arc<View> {
        self.view.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether this edge is part of a cluster (see [`View::clustered`]).
    pub fn clustered(&self) -> bool {
        self.clustered.load(Ordering::Relaxed)
    }

    pub fn set(&self, config: MeshConfig) {
        let old = self.view();
        if old.config == config {
            return;
        }
        let peers = config
            .peers
            .iter()
            .map(|p| {
                match old
                    .peers
                    .iter()
                    .find(|o| o.config.name == p.name && o.config.addr == p.addr)
                {
                    Some(o) if o.config == *p => o.clone(),
                    Some(o) => {
                        let n = Peer::new(p.clone());
                        n.rtt_us
                            .store(o.rtt_us.load(Ordering::Relaxed), Ordering::Relaxed);
                        Arc::new(n)
                    }
                    None => Arc::new(Peer::new(p.clone())),
                }
            })
            .collect();
        let view = View { config, peers };
        self.clustered.store(view.clustered(), Ordering::Relaxed);
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(view);
    }

    /// Measure every peer's round trip each `every`, and mark a peer that
    /// misses two pings in a row down until it answers again.
    pub async fn ping_loop(self: Arc<Self>, every: Duration, timeout: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let view = self.view();
            let pings = view.peers.iter().map(|p| {
                let token = view.config.token.clone();
                async move {
                    let started = Instant::now();
                    let ok = tokio::time::timeout(timeout, ping(p, &token))
                        .await
                        .is_ok_and(|r| r.is_ok());
                    if ok {
                        let us = started.elapsed().as_micros().max(1) as u64;
                        let old = p.rtt_us.load(Ordering::Relaxed);
                        let new = if old == 0 { us } else { (old * 7 + us) / 8 };
                        p.rtt_us.store(new, Ordering::Relaxed);
                        p.missed.store(0, Ordering::Relaxed);
                        p.up.store(true, Ordering::Relaxed);
                    } else if p.missed.fetch_add(1, Ordering::Relaxed) + 1 >= 2 {
                        p.up.store(false, Ordering::Relaxed);
                        p.backend.pool.clear();
                    }
                }
            });
            futures_util::future::join_all(pings).await;
        }
    }
}

async fn ping(p: &Peer, token: &str) -> Result<(), String> {
    tokio::time::sleep(p.config.delay).await;
    let req = hyper::Request::get("/")
        .header(HOP, format!("{token} ping"))
        .header(hyper::header::HOST, "hangar-ping")
        .body(upstream::empty())
        .map_err(|e| e.to_string())?;
    let t = Duration::from_secs(2);
    let conn = upstream::checkout(&p.backend.pool, &p.backend.addrs, t)
        .await
        .map_err(|e| e.to_string())?;
    let resp = conn.send(req, t, t).await.map_err(|e| e.to_string())?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(resp.status().to_string())
    }
}

/// The role a request's hop header gives it, when its token is the mesh's;
/// anything else is a client's request.
pub fn role_of(headers: &HeaderMap, token: &str) -> Role {
    let Some(v) = headers.get(HOP).and_then(|v| v.to_str().ok()) else {
        return Role::Client;
    };
    let Some((t, role)) = v.split_once(' ') else {
        return Role::Client;
    };
    if token.is_empty() || !constant_time_eq(t.as_bytes(), token.as_bytes()) {
        return Role::Client;
    }
    Role::parse(role).unwrap_or(Role::Client)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The hop header for a request sent as `role`.
pub fn hop_value(token: &str, role: Role) -> Option<HeaderValue> {
    HeaderValue::from_str(&format!("{token} {}", role.name())).ok()
}

/// Which regions a tier spans.
type InTier<'a> = Box<dyn Fn(&str) -> bool + 'a>;

impl View {
    /// Whether this edge is part of a cluster at all.
    pub fn clustered(&self) -> bool {
        !self.config.token.is_empty() && !self.config.node.is_empty()
    }

    /// The tiers above `role` that a miss for `key` climbs, for an app
    /// with `shield` (a region): the region's, the super-region's, the
    /// shield's. A tier whose owner is this node is climbed here (its
    /// lookup was this one), so it is left out; so is one with no usable
    /// node, and the super-region when the shield is in it.
    pub fn tiers(&self, key: &str, role: Role, shield: Option<&str>) -> Vec<Tier> {
        if !self.clustered() {
            return Vec::new();
        }
        let me = &self.config;
        let group = me.groups.get(&me.region);
        let shield = shield.filter(|s| self.has_region(s));
        let mut wanted: Vec<(Role, InTier<'_>)> = Vec::new();
        if role < Role::Region {
            wanted.push((Role::Region, Box::new(|r: &str| r == me.region)));
        }
        if let Some(g) = group {
            let shield_in_group = shield.is_some_and(|s| me.groups.get(s) == Some(g));
            if role < Role::Super && !shield_in_group && shield != Some(me.region.as_str()) {
                wanted.push((
                    Role::Super,
                    Box::new(move |r: &str| me.groups.get(r) == Some(g)),
                ));
            }
        }
        if let Some(s) = shield {
            if role < Role::Shield {
                wanted.push((Role::Shield, Box::new(move |r: &str| r == s)));
            }
        }
        let mut tiers = Vec::new();
        for (role, in_tier) in wanted {
            let owners = self.owners(key, &in_tier);
            match owners.first() {
                None | Some(Owner::Me) => continue,
                Some(Owner::Peer(_)) => {
                    // Failing over stops at this node: past it, the tier
                    // is this node's.
                    let owners = owners
                        .into_iter()
                        .take_while(|o| matches!(o, Owner::Peer(_)))
                        .collect();
                    tiers.push(Tier { role, owners })
                }
            }
        }
        tiers
    }

    /// How many edges the region has, this one among them (the share of
    /// a region-wide rate each takes).
    pub fn region_edges(&self) -> u32 {
        1 + self
            .peers
            .iter()
            .filter(|p| p.config.region == self.config.region)
            .count() as u32
    }

    fn has_region(&self, region: &str) -> bool {
        self.config.region == region || self.peers.iter().any(|p| p.config.region == region)
    }

    /// The usable nodes of the regions `in_tier` accepts, this one among
    /// them when its region is, in rendezvous order for `key` (weighted).
    fn owners(&self, key: &str, in_tier: &dyn Fn(&str) -> bool) -> Vec<Owner> {
        let mut nodes = RendezvousNodes::new(DefaultNodeHasher::new());
        let weight = |w: f64| capacity(if w.is_nan() { 1.0 } else { w.clamp(0.001, 1.0) });
        if in_tier(&self.config.region) {
            nodes.insert(WeightedNode::new(
                KeyValueNode::new(self.config.node.clone(), usize::MAX),
                weight(self.config.weight),
            ));
        }
        for (i, p) in self.peers.iter().enumerate() {
            if in_tier(&p.config.region) && p.usable() {
                nodes.insert(WeightedNode::new(
                    KeyValueNode::new(p.config.name.clone(), i),
                    weight(p.config.weight),
                ));
            }
        }
        let ordered: Vec<Owner> = nodes
            .calc_candidates(&key)
            .map(|n| match n.node.value {
                usize::MAX => Owner::Me,
                i => Owner::Peer(self.peers[i].clone()),
            })
            .collect();
        // A slow owner's keys go to the next in hash order while it is slow.
        let (fast, slow): (Vec<Owner>, Vec<Owner>) = ordered
            .into_iter()
            .partition(|o| !matches!(o, Owner::Peer(p) if p.slow()));
        fast.into_iter().chain(slow).collect()
    }

    /// The peers of `nodes` (by name) usable now, nearest first.
    pub fn nearest(&self, nodes: &[String]) -> Vec<Arc<Peer>> {
        let mut v: Vec<Arc<Peer>> = self
            .peers
            .iter()
            .filter(|p| nodes.contains(&p.config.name) && p.usable())
            .cloned()
            .collect();
        v.sort_by_key(|p| p.rtt());
        v
    }
}

/// `w` is normal and positive (clamped by the caller).
fn capacity(w: f64) -> Capacity {
    match Capacity::new(w) {
        Some(c) => c,
        None => capacity(1.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str, region: &str, port: u16) -> PeerConfig {
        PeerConfig {
            name: name.into(),
            region: region.into(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            weight: 1.0,
            delay: Duration::ZERO,
        }
    }

    fn mesh(me: &str, region: &str, peers: &[(&str, &str)]) -> Arc<View> {
        let config = MeshConfig {
            node: me.into(),
            region: region.into(),
            token: "t".into(),
            peers: peers
                .iter()
                .enumerate()
                .map(|(i, (n, r))| peer(n, r, 9000 + i as u16))
                .collect(),
            groups: [("ams", "eu"), ("fra", "eu")]
                .into_iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
            weight: 1.0,
        };
        let m = Mesh::default();
        m.set(config);
        m.view()
    }

    fn names(t: &Tier) -> Vec<String> {
        t.owners
            .iter()
            .map(|o| match o {
                Owner::Me => "me".into(),
                Owner::Peer(p) => p.config.name.clone(),
            })
            .collect()
    }

    #[test]
    fn hop_header_needs_the_token() {
        let mut h = HeaderMap::new();
        assert_eq!(role_of(&h, "t"), Role::Client);
        h.insert(HOP, HeaderValue::from_static("t shield"));
        assert_eq!(role_of(&h, "t"), Role::Shield);
        assert_eq!(role_of(&h, "u"), Role::Client, "a wrong token is a client");
        assert_eq!(role_of(&h, ""), Role::Client, "no mesh, no hops");
        h.insert(HOP, HeaderValue::from_static("t sideways"));
        assert_eq!(role_of(&h, "t"), Role::Client);
    }

    #[test]
    fn every_node_of_a_region_agrees_on_each_key_owner() {
        let a = mesh("a1", "ams", &[("a2", "ams"), ("f1", "fra")]);
        let b = mesh("a2", "ams", &[("a1", "ams"), ("f1", "fra")]);
        let (mut mine_a, mut mine_b) = (0, 0);
        for k in 0..200 {
            let key = format!("app.localhost/{k}");
            let edge = |v: &View| -> Vec<Tier> {
                let mut t = v.tiers(&key, Role::Client, None);
                t.retain(|t| t.role == Role::Region);
                t
            };
            let (ta, tb) = (edge(&a), edge(&b));
            // One of the two owns it; the other's region tier names it.
            match (ta.first().map(|t| t.role), tb.first().map(|t| t.role)) {
                (None, Some(Role::Region)) => {
                    mine_a += 1;
                    assert_eq!(names(&tb[0]), ["a1"]);
                }
                (Some(Role::Region), None) => {
                    mine_b += 1;
                    assert_eq!(names(&ta[0]), ["a2"]);
                }
                other => panic!("key {key}: {other:?}"),
            }
        }
        assert!(mine_a > 60 && mine_b > 60, "{mine_a} / {mine_b}");
    }

    #[test]
    fn tiers_climb_region_super_region_shield_and_never_down() {
        let v = mesh(
            "l1",
            "lon",
            &[("l2", "lon"), ("a1", "ams"), ("f1", "fra"), ("f2", "fra")],
        );
        // lon is in no group: region, then the shield.
        for k in 0..50 {
            let key = format!("k{k}");
            let tiers = v.tiers(&key, Role::Client, Some("fra"));
            let roles: Vec<Role> = tiers.iter().map(|t| t.role).collect();
            assert!(
                roles == [Role::Region, Role::Shield] || roles == [Role::Shield],
                "{roles:?}"
            );
            let shield = tiers.last().unwrap();
            assert!(names(shield).iter().all(|n| n.starts_with('f')));
            assert_eq!(names(shield).len(), 2, "the other fra node takes over");
            // Asked as the shield, there is nothing above.
            assert!(v.tiers(&key, Role::Shield, Some("fra")).is_empty());
            assert!(v.tiers(&key, Role::Region, Some("fra")).len() == 1);
        }
        // ams is in eu with fra: with a shield elsewhere, the super tier.
        let v = mesh("a1", "ams", &[("f1", "fra"), ("l1", "lon"), ("l2", "lon")]);
        let mut supers = 0;
        for k in 0..50 {
            let tiers = v.tiers(&format!("k{k}"), Role::Client, Some("lon"));
            let roles: Vec<Role> = tiers.iter().map(|t| t.role).collect();
            assert_eq!(*roles.last().unwrap(), Role::Shield);
            if roles.contains(&Role::Super) {
                supers += 1;
                assert_eq!(names(&tiers[0]), ["f1"]);
            }
        }
        assert!(supers > 10 && supers < 40, "{supers}");
        // A shield in the same super-region: no super tier.
        for k in 0..20 {
            let tiers = v.tiers(&format!("k{k}"), Role::Client, Some("fra"));
            assert!(tiers.iter().all(|t| t.role != Role::Super));
        }
        // No shield, no group: only the region's owner.
        assert!(v
            .tiers("k", Role::Client, Some("nowhere"))
            .iter()
            .all(|t| t.role == Role::Super));
    }

    #[test]
    fn a_down_owner_is_passed_over_and_a_new_node_takes_keys_gradually() {
        let v = mesh("a1", "ams", &[("a2", "ams"), ("a3", "ams")]);
        let owned_by = |v: &View, name: &str| {
            (0..300)
                .filter(|k| {
                    v.tiers(&format!("k{k}"), Role::Client, None)
                        .first()
                        .is_some_and(|t| names(t)[0] == name)
                })
                .count()
        };
        let before = owned_by(&v, "a2");
        assert!(before > 60, "{before}");
        v.peers[0].up.store(false, Ordering::Relaxed);
        assert_eq!(owned_by(&v, "a2"), 0, "a down node owns nothing");
        // Its keys went to the others, the rest stayed where they were.
        v.peers[0].up.store(true, Ordering::Relaxed);
        let m = Mesh::default();
        let mut config = v.config.clone();
        config.peers[0].weight = 0.1;
        m.set(config.clone());
        let light = owned_by(&m.view(), "a2");
        config.peers[0].weight = 0.5;
        m.set(config);
        let heavier = owned_by(&m.view(), "a2");
        assert!(
            light < heavier && heavier < before,
            "{light} < {heavier} < {before}"
        );
        // A slow one (its pings 200 ms late) is passed over, not dropped.
        let v = mesh("a1", "ams", &[("a2", "ams")]);
        v.peers[0].rtt_us.store(900_000, Ordering::Relaxed);
        for k in 0..50 {
            let tiers = v.tiers(&format!("k{k}"), Role::Client, None);
            assert!(tiers.is_empty(), "a1 owns every key while a2 is slow");
        }
    }
}
