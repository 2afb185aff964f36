//! A node's part in a cluster (nodes started with `--etcd`): who the live
//! members are, which node a new machine goes to ([`place`]), how a call
//! about another node's machine is carried out there (the node's API,
//! called with the cluster's token), and the leader's work: the machines
//! of a member whose lease ended are marked lost, and those of apps get
//! replacements on live nodes of their region ([`lead`]).
//!
//! Every node reads the cluster from its store's read model; only the
//! leader (etcd's election, see `EtcdStore::join`) replaces machines, and
//! its writes are fenced by its election key, so a leader that lost the
//! lead while paused changes nothing.
//!
//! This module must not touch the host: machines are created, stopped and
//! destroyed by the node that runs them.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use crate::client::Client;
use crate::config::MachineConfig;
use crate::error::{Error, Result};
use crate::node::{blocking, Node};
use crate::store::{
    EtcdStore, Expect, Machine, MachineChange, MachineState, Member, Placement, Site, Store,
};
use crate::wire::{CreateMachine, StopMachine};

/// The header a node sends with a call it carries to another node: its
/// own name. A call that has it is never carried further.
pub const VIA: &str = "hangar-via";
/// The header that names the org a carried call is made for (the call
/// itself bears the cluster's token).
pub const FOR_ORG: &str = "hangar-for-org";

pub struct Cluster {
    /// This node, as it announced itself.
    pub me: Member,
    pub store: Arc<EtcdStore>,
    /// The cluster's admin token: the nodes' calls to each other bear it.
    pub token: String,
    /// One HTTP client for those calls (its connections are kept).
    pub http: reqwest::Client,
    /// Round trips injected into those calls, by region.
    pub latency: Latency,
}

/// Round-trip times between regions, injected in user space into the
/// nodes' calls to each other (this kernel has no netem): a call from a
/// node of one region to a node of another waits that long before it is
/// sent. For clusters tried on one host, and the benchmarks; DNS's
/// `nearest` ranks regions by them too.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Latency(std::collections::BTreeMap<(String, String), Duration>);

impl Latency {
    /// From `A:B=DURATION` items (`ams:fra=30ms`), one per pair, either
    /// order.
    pub fn parse(items: &[String]) -> Result<Latency> {
        let mut map = std::collections::BTreeMap::new();
        for item in items {
            let bad = || {
                Error::Invalid(format!(
                    "latency {item:?} must be REGION:REGION=DURATION, e.g. ams:fra=30ms"
                ))
            };
            let (pair, time) = item.split_once('=').ok_or_else(bad)?;
            let (a, b) = pair.split_once(':').ok_or_else(bad)?;
            let (a, b) = (a.trim(), b.trim());
            if a.is_empty() || b.is_empty() {
                return Err(bad());
            }
            let time = crate::app_toml::parse_duration(time).ok_or_else(bad)?;
            map.insert(Latency::key(a, b), time);
        }
        Ok(Latency(map))
    }

    fn key(a: &str, b: &str) -> (String, String) {
        if a <= b {
            (a.to_string(), b.to_string())
        } else {
            (b.to_string(), a.to_string())
        }
    }

    /// The round trip between two regions (none unless given).
    pub fn between(&self, a: &str, b: &str) -> Duration {
        self.0.get(&Latency::key(a, b)).copied().unwrap_or_default()
    }

    /// Every pair given, with its round trip.
    pub fn pairs(&self) -> impl Iterator<Item = (&str, &str, Duration)> + '_ {
        self.0
            .iter()
            .map(|((a, b), d)| (a.as_str(), b.as_str(), *d))
    }
}

impl Cluster {
    pub fn site(&self) -> Site {
        Site {
            node: self.me.name.clone(),
            region: self.me.region.clone(),
            index: self.me.index,
        }
    }

    /// The live member `name`, or why a call about its machines cannot be
    /// made now.
    pub fn member(&self, name: &str) -> Result<Member> {
        self.store
            .members()?
            .into_iter()
            .find(|m| m.name == name)
            .ok_or_else(|| {
                Error::Unavailable(format!(
                    "node {name:?} is not a live member of the cluster (its lease ended); \
                     its machines are replaced on live nodes of their region, retry with those"
                ))
            })
    }

    /// A client of `member`'s API, as this node (the admin, or on behalf
    /// of `org`).
    /// The round trip injected into calls to `member`.
    pub fn delay_to(&self, member: &Member) -> Duration {
        self.latency.between(&self.me.region, &member.region)
    }

    pub fn client(&self, member: &Member, org: Option<&str>) -> Client {
        let client = Client::with_http(self.http.clone(), &member.api, &self.token)
            .with_header(VIA, &self.me.name)
            .with_delay(self.delay_to(member));
        match org {
            Some(org) => client.with_header(FOR_ORG, org),
            None => client,
        }
    }
}

/// The private network across nodes on this host (implemented by the
/// binary with `hangar_machine::overlay`): where the other nodes' machines
/// are, and the other nodes' underlay addresses.
pub trait Mesh: Send + Sync {
    fn apply(&self, peers: &[hangar_machine::overlay::Peer], members: &[std::net::IpAddr]);
}

/// What the mesh must know now: every machine of another node that has
/// an org's net and an underlay address, and those nodes' addresses.
pub fn mesh_of(
    me: &str,
    members: &[Member],
    machines: &[Machine],
) -> (Vec<hangar_machine::overlay::Peer>, Vec<std::net::IpAddr>) {
    let underlay = |node: &str| {
        members
            .iter()
            .find(|m| m.name == node)
            .and_then(|m| m.underlay)
    };
    let peers = machines
        .iter()
        .filter(|m| m.node != me && hangar_machine::network::net_of(m.slot) > 0)
        .filter(|m| m.state != MachineState::Destroyed)
        .filter_map(|m| {
            Some(hangar_machine::overlay::Peer {
                slot: m.slot,
                underlay: underlay(&m.node)?,
            })
        })
        .collect();
    let others = members
        .iter()
        .filter(|m| m.name != me)
        .filter_map(|m| m.underlay)
        .collect();
    (peers, others)
}

/// What a new machine needs of the node it goes to.
#[derive(Clone, Copy, Debug)]
pub struct Want<'a> {
    pub app: Option<&'a str>,
    /// The region it must run in; `None`: any.
    pub region: Option<&'a str>,
    pub memory_mb: u64,
}

/// The member a new machine goes to: one of its region with the memory
/// free (what the member offers, less its machines' memory), the fewest
/// machines of its app first (spread), then the most memory free, then the
/// fewest CPUs asked per CPU it has, then by name. Decided from the read
/// model: the chosen node creates the machine, and refuses when it has not
/// the room after all (`Node::create`).
pub fn place(members: &[Member], machines: &[Machine], want: Want) -> Result<Member> {
    let in_region: Vec<&Member> = members
        .iter()
        .filter(|m| want.region.is_none_or(|r| m.region == r))
        .collect();
    if in_region.is_empty() {
        let mut regions: Vec<&str> = members.iter().map(|m| m.region.as_str()).collect();
        regions.sort();
        regions.dedup();
        return Err(Error::Invalid(format!(
            "no live node in region {}; regions with nodes: {}",
            want.region.unwrap_or("(any)"),
            if regions.is_empty() {
                "none".to_string()
            } else {
                regions.join(", ")
            }
        )));
    }
    let score = |member: &Member| {
        let on: Vec<&Machine> = machines.iter().filter(|m| m.node == member.name).collect();
        let used: u64 = on.iter().map(|m| m.config.guest.memory_mb).sum();
        let of_app = on
            .iter()
            .filter(|m| want.app.is_some() && m.app.as_deref() == want.app)
            .count();
        let cpus: u64 = on.iter().map(|m| u64::from(m.config.guest.cpus)).sum();
        let cpu_load = cpus * 1000 / u64::from(member.cpus.max(1));
        (of_app, member.memory_mb.saturating_sub(used), cpu_load)
    };
    let best = in_region
        .iter()
        .filter(|m| score(m).1 >= want.memory_mb)
        .min_by(|a, b| {
            let (sa, sb) = (score(a), score(b));
            (sa.0, std::cmp::Reverse(sa.1), sa.2, &a.name).cmp(&(
                sb.0,
                std::cmp::Reverse(sb.1),
                sb.2,
                &b.name,
            ))
        });
    match best {
        Some(m) => Ok((*m).clone()),
        None => {
            let most = in_region
                .iter()
                .map(|m| (score(m).1, m.name.as_str()))
                .max()
                .unwrap_or_default();
            Err(Error::Conflict(format!(
                "no node in region {} has {} MB free for the machine (the most: {} MB on node {}); \
                 give it less memory, or add a node there",
                want.region.unwrap_or("(any)"),
                want.memory_mb,
                most.0,
                most.1
            )))
        }
    }
}

impl Node {
    /// Where a new machine goes ([`place`]): `None` here (always, for a
    /// node alone), else the member that is to create it.
    pub fn place_new(
        &self,
        app: Option<&str>,
        config: &MachineConfig,
        region: Option<&str>,
    ) -> Result<Option<(Arc<Cluster>, Member)>> {
        self.place_new_except(app, config, region, &[])
    }

    /// The same, among the members not named in `except`.
    fn place_new_except(
        &self,
        app: Option<&str>,
        config: &MachineConfig,
        region: Option<&str>,
        except: &[String],
    ) -> Result<Option<(Arc<Cluster>, Member)>> {
        let Some(cluster) = self.cluster.clone() else {
            return Ok(None);
        };
        let mut members = self.state.members()?;
        members.retain(|m| !except.contains(&m.name));
        let want = Want {
            app,
            region: Some(region.unwrap_or(&cluster.me.region)),
            memory_mb: config.guest.memory_mb,
        };
        let target = place(&members, &self.state.list()?, want)?;
        Ok((target.name != cluster.me.name).then_some((cluster, target)))
    }

    /// Create `req` (its region in `region`) on the node placement chooses
    /// when that is another node, for `org`: the machine as that node made
    /// it, once this node's read model has it; `None`: it is to be made
    /// here. A chosen node that turns out full (a create at the same moment
    /// took its room) is passed over for the next choice, twice at most.
    pub async fn create_elsewhere(
        &self,
        mut req: CreateMachine,
        region: Option<&str>,
        org: Option<&str>,
    ) -> Result<Option<crate::wire::MachineView>> {
        let mut full = Vec::new();
        let mut refusal = None;
        loop {
            let placed = self.place_new_except(req.app.as_deref(), &req.config, region, &full);
            let Some((cluster, target)) = (match (placed, refusal) {
                // Every node of the region tried and full: say so.
                (Err(_), Some(busy)) => return Err(busy),
                (placed, _) => placed?,
            }) else {
                return Ok(None);
            };
            req.region = None;
            match cluster.client(&target, org).create_machine(&req).await {
                Ok(made) => {
                    self.seen(&made.id).await?;
                    return Ok(Some(made));
                }
                Err(e) => match Error::from(e) {
                    Error::Busy(why) if full.len() < 2 => {
                        tracing::info!(
                            "node {} had no room after all ({why}); placing again",
                            target.name
                        );
                        full.push(target.name);
                        refusal = Some(Error::Busy(why));
                    }
                    e => return Err(e),
                },
            }
        }
    }

    /// Create a machine where [`place`] puts it and start it: here, or
    /// carried out by the chosen node (for `org`, whose images it may use).
    pub async fn create_placed(
        self: &Arc<Self>,
        name: Option<String>,
        place: Placement,
        config: MachineConfig,
        region: Option<&str>,
        org: Option<&str>,
    ) -> Result<Machine> {
        let req = CreateMachine {
            name,
            app: place.app.clone(),
            config,
            region: None,
            release: place.release,
        };
        let started = std::time::Instant::now();
        let (made, here) = match self.create_elsewhere(req.clone(), region, org).await {
            Ok(Some(made)) => (self.seen(&made.id).await, false),
            Ok(None) => {
                let node = self.clone();
                (
                    blocking(move || node.create(req.name, place, req.config)).await,
                    true,
                )
            }
            Err(e) => (Err(e), true),
        };
        self.placements.observe(&made, here, started.elapsed());
        made
    }

    /// The machine `id` once this node's read model has it (another node
    /// just wrote it).
    pub async fn seen(&self, id: &str) -> Result<Machine> {
        let (state, id) = (self.state.clone(), id.to_string());
        blocking(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            loop {
                // The revision first: a change after it wakes the wait.
                let revision = state.revision()?;
                match state.get(&id) {
                    Ok(m) => return Ok(m),
                    Err(e) => {
                        let left = deadline.saturating_duration_since(std::time::Instant::now());
                        if left.is_zero() {
                            return Err(e);
                        }
                        state.wait_change(revision, left)?;
                    }
                }
            }
        })
        .await
    }

    /// The member that runs `m`, when that is another node; `None`: here.
    pub fn elsewhere(&self, m: &Machine) -> Result<Option<(Arc<Cluster>, Member)>> {
        match &self.cluster {
            Some(cluster) if !self.owns(m) => Ok(Some((cluster.clone(), cluster.member(&m.node)?))),
            _ => Ok(None),
        }
    }

    /// Stop `m` (its kill signal and timeout) and destroy it, wherever it
    /// runs.
    pub async fn retire(self: &Arc<Self>, m: &Machine) -> Result<()> {
        let (signal, timeout) = m.config.kill();
        if let Some((cluster, member)) = self.elsewhere(m)? {
            let client = cluster.client(&member, None);
            let stop = StopMachine {
                signal,
                timeout: timeout.as_secs(),
            };
            client.stop_machine(&m.id, &stop).await?;
            client.destroy_machine(&m.id, true).await?;
            return Ok(());
        }
        let (node, id) = (self.clone(), m.id.clone());
        blocking(move || {
            node.stop(&id, &signal, timeout)?;
            node.destroy(&id, true).map(drop)
        })
        .await
    }

    /// Wait until `m` is up as a deploy counts it
    /// ([`crate::deploy::wait_healthy`]), waited for by the node that runs
    /// it.
    pub async fn wait_up(self: &Arc<Self>, m: &Machine, checks: bool) -> Result<()> {
        let Some((cluster, member)) = self.elsewhere(m)? else {
            return crate::deploy::wait_healthy(self, m, checks).await;
        };
        let budget = crate::deploy::wait_budget(&m.config).as_secs() + 1;
        let state = if checks { "healthy" } else { "started" };
        cluster
            .client(&member, None)
            .wait(&m.id, state, budget)
            .await?;
        Ok(())
    }
}

/// The name of the machine that replaces `lost`: one per lost machine, so
/// a leader that takes over halfway finds the replacement made already.
fn replacement_name(lost: &Machine) -> String {
    let app = lost.app.as_deref().unwrap_or("machine");
    let app = &app[..app.len().min(48)];
    format!("{app}-r{}", &lost.id[..lost.id.len().min(12)])
}

/// The leader's loop: while this node leads, the machines of members that
/// are gone are marked lost and replaced (see [`replace_lost`]).
pub async fn lead(node: Arc<Node>) {
    let Some(cluster) = node.cluster.clone() else {
        return;
    };
    let mut round = 0u64;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Some(fenced) = cluster.store.as_leader() else {
            continue;
        };
        if let Err(e) = replace_lost(&node, &fenced).await {
            tracing::warn!("leader: {e}");
        }
        // Every 10 s: the purge log keeps its last `crate::purge::KEEP`.
        round += 1;
        if round.is_multiple_of(100) {
            let trim = tokio::task::spawn_blocking(move || fenced.trim_purges(crate::purge::KEEP));
            if let Ok(Err(e)) = trim.await {
                tracing::warn!("leader: trimming the purge log: {e}");
            }
        }
    }
}

/// One round of the leader's work: every machine of a node that is no
/// live member is marked lost (once); one of an app gets a replacement
/// (same release and config, same region) on a live node and is then
/// destroyed; a machine of no app waits for its node. Writes go through
/// `leader`, the fenced store.
pub async fn replace_lost(node: &Arc<Node>, leader: &EtcdStore) -> Result<()> {
    let live: HashSet<String> = leader.members()?.into_iter().map(|m| m.name).collect();
    for lost in leader.list()? {
        if lost.node.is_empty() || live.contains(&lost.node) {
            continue;
        }
        if lost.state != MachineState::Lost {
            leader.update_machine(
                &lost.id,
                Expect::Revision(lost.revision),
                MachineChange::State(MachineState::Lost),
            )?;
            leader.event(
                &lost.id,
                "lost",
                serde_json::json!({"node": lost.node, "why": "its node's lease ended"}),
            )?;
            tracing::warn!(machine = %lost.id, node = %lost.node, "lost with its node");
        }
        if lost.app.is_none() {
            continue;
        }
        let name = replacement_name(&lost);
        let made = match leader.get(&name) {
            Ok(r) if r.state != MachineState::Destroyed => r,
            _ => {
                let place = Placement {
                    app: lost.app.clone(),
                    release: lost.release,
                };
                match node
                    .create_placed(
                        Some(name.clone()),
                        place,
                        lost.config.clone(),
                        Some(&lost.region),
                        // As the admin: its config, image included, was
                        // admitted when it was made.
                        None,
                    )
                    .await
                {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(machine = %lost.id, "no replacement yet: {e}");
                        continue;
                    }
                }
            }
        };
        if lost.desired == crate::store::Desired::Stopped {
            // It was stopped (scaled to zero): so is its replacement.
            let (signal, timeout) = made.config.kill();
            if let Some((cluster, member)) = node.elsewhere(&made)? {
                let stop = StopMachine {
                    signal,
                    timeout: timeout.as_secs(),
                };
                cluster
                    .client(&member, None)
                    .stop_machine(&made.id, &stop)
                    .await?;
            } else {
                let (n, id) = (node.clone(), made.id.clone());
                blocking(move || n.stop(&id, &signal, timeout).map(drop)).await?;
            }
        }
        leader.mark_destroyed(&lost.id)?;
        leader.event(
            &lost.id,
            "replaced",
            serde_json::json!({"by": made.id, "on": made.node}),
        )?;
        tracing::info!(machine = %lost.id, by = %made.id, on = %made.node, "replaced a lost machine");
    }
    Ok(())
}

#[cfg(test)]
mod tests;
