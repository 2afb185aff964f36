//! The node's side of the edge: each app's host and backends from the
//! machines (started, wanted started, checks passing), scale to zero (stop
//! machines idle past their `idle_timeout`, keeping `min_machines_running`),
//! waking a stopped machine when a request finds none started, and draining
//! a machine out of the routes before it is signalled.
//!
//! The edge is behind [`Ingress`]: this module says what the routes should
//! be and asks what the edge saw; it does not know how the edge routes.
//! The node owns its [`Routing`]; the edge reaches the node only through
//! the wake requests the binary hands over (no callback from the edge into
//! the node, so no cycle of owners).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::{DriverKind, EdgeCache};
use crate::error::Error;
use crate::node::Node;
use crate::store::{Desired, Expect, Machine, MachineChange, MachineState};

/// One app's host, as the node wants the edge to serve it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostSpec {
    /// `<app>.<domain>`.
    pub name: String,
    /// Each backend's address, with its other addresses (the machine's
    /// IPv6 one) to try when it refuses a connection.
    pub backends: Vec<(SocketAddr, Vec<SocketAddr>)>,
    /// Ask the node for a backend when none is started (scale to zero).
    pub autostart: bool,
    pub force_https: bool,
    /// `None`: the edge's default policy.
    pub cache: Option<EdgeCache>,
    pub soft_limit: u32,
    pub hard_limit: u32,
    /// Other nodes with machines of the app started (their edges serve
    /// when none here has room).
    pub elsewhere: Vec<String>,
    /// Other nodes with a stopped machine of the app that starts on a
    /// request.
    pub asleep_elsewhere: Vec<String>,
    /// The machines in service by id: here (their address), and elsewhere
    /// (their node), for requests and replays to one instance.
    pub instances: Vec<(String, SocketAddr)>,
    pub instances_elsewhere: Vec<(String, String)>,
    pub rate_limit: Option<crate::config::RateLimit>,
    /// Labels on the edge's series of this host: the app's `org` and `app`.
    pub labels: BTreeMap<String, String>,
}

/// The cluster's other edges, as the node wants its edge to see them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MeshSpec {
    pub node: String,
    pub region: String,
    /// Shared by the cluster's edges (derived from its admin token).
    pub token: String,
    /// This node's share of the cache keys, 0 to 1.
    pub weight: f64,
    pub peers: Vec<PeerSpec>,
    /// Super-regions: region -> group.
    pub groups: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PeerSpec {
    pub name: String,
    pub region: String,
    pub addr: SocketAddr,
    pub weight: f64,
    /// The round trip injected to it (see [`crate::cluster::Latency`]).
    pub delay: Duration,
}

/// How long a node that joined takes to reach its full share of the
/// cache keys (it starts at a twentieth).
pub const RAMP: Duration = Duration::from_secs(60);

/// A share of the keys `age` seconds after joining.
pub fn weight(since: u64, now: u64) -> f64 {
    if since == 0 {
        return 1.0;
    }
    let age = now.saturating_sub(since) as f64;
    (age / RAMP.as_secs_f64()).clamp(0.05, 1.0)
}

/// The mesh of `me` among `members`: each other member with an edge.
pub fn mesh_spec(
    me: &crate::store::Member,
    members: &[crate::store::Member],
    token: &str,
    delay: impl Fn(&str) -> Duration,
    now: u64,
) -> MeshSpec {
    use sha2::Digest;
    let token = hex::encode(sha2::Sha256::digest(format!("hangar edge mesh\0{token}")));
    MeshSpec {
        node: me.name.clone(),
        region: me.region.clone(),
        token: token[..32].to_string(),
        weight: weight(me.since, now),
        peers: members
            .iter()
            .filter(|m| m.name != me.name)
            .filter_map(|m| {
                Some(PeerSpec {
                    name: m.name.clone(),
                    region: m.region.clone(),
                    addr: m.edge.as_deref()?.parse().ok()?,
                    weight: weight(m.since, now),
                    delay: delay(&m.region),
                })
            })
            .collect(),
        groups: BTreeMap::new(),
    }
}

/// A count of requests in flight that goes on counting after its backends
/// leave the routes.
pub type InFlightGauge = Box<dyn Fn() -> usize + Send + Sync>;

/// What the backends at an address answered since they were first routed
/// to: by status class (1xx to 5xx), attempts with no answer, and time to
/// the response head per bucket of [`Ingress::answer_bounds`] (then
/// slower ones).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Answers {
    pub classes: [u64; 5],
    pub failed: u64,
    pub latency: Vec<u64>,
}

/// What the node needs of the edge.
pub trait Ingress: Send + Sync {
    /// What the backends at `ip` answered (see [`Answers`]).
    fn answers_at(&self, ip: IpAddr) -> Answers;
    /// The upper bounds (seconds) of [`Answers::latency`]'s buckets.
    fn answer_bounds(&self) -> Vec<f64>;
    /// Replace every host (live; requests in flight finish).
    fn set_hosts(&self, hosts: &[HostSpec]);
    /// When `host` last had a request (unix seconds; 0: never).
    fn last_request(&self, host: &str) -> u64;
    /// The requests in flight to the backends at `ip` now (see
    /// [`InFlightGauge`]).
    fn in_flight_at(&self, ip: IpAddr) -> InFlightGauge;
    /// Whether one of `addrs`, backends of `host`, is available and below
    /// the host's soft limit.
    fn has_room(&self, host: &str, addrs: &[SocketAddr]) -> bool;
    /// Replace the cluster's other edges (a node alone has none).
    fn set_mesh(&self, _mesh: MeshSpec) {}
    /// Remove (or mark stale) what `purge` names from the edge's cache.
    fn purge(&self, _purge: &crate::purge::PurgeSpec) {}
    /// Remove everything from the edge's cache.
    fn purge_all(&self) {}
    /// Serve cached responses as fresh until `until` only (see
    /// [`crate::purge`]).
    fn fresh_until(&self, _until: std::time::Instant) {}
}

/// The node's routing state (see the module's doc).
pub struct Routing {
    pub(crate) ingress: Arc<dyn Ingress>,
    domain: String,
    /// Every update of the routes goes through one lock, so a table
    /// computed from an older listing never replaces one computed from a
    /// newer listing (the tick, the waker and drains all refresh).
    one_at_a_time: Mutex<()>,
    /// When each machine the waker started was first ready to serve (unix
    /// seconds): its idle time counts from then, not from its start, so a
    /// slow boot is not idle time.
    ready_at: Mutex<HashMap<String, u64>>,
    /// One wake per app at a time; callers that arrive meanwhile wait.
    waking: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The ids of purges applied as they were sent here (see
    /// [`crate::purge`]).
    pub(crate) purged: Mutex<std::collections::HashSet<String>>,
    /// Super-regions of the edges' CDN: region -> its group.
    groups: BTreeMap<String, String>,
}

/// `NAME=REGION,REGION` items into region -> group; a region in two
/// groups, or an item without regions, is an error naming it.
pub fn parse_groups(items: &[String]) -> Result<BTreeMap<String, String>, Error> {
    let mut groups = BTreeMap::new();
    for item in items {
        let bad = || {
            Error::Invalid(format!(
                "--region-group {item:?}: give NAME=REGION,REGION (e.g. eu=ams,fra)"
            ))
        };
        let (name, regions) = item.split_once('=').ok_or_else(bad)?;
        let regions: Vec<&str> = regions
            .split(',')
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .collect();
        if name.trim().is_empty() || regions.is_empty() {
            return Err(bad());
        }
        for r in regions {
            if let Some(other) = groups.insert(r.to_string(), name.trim().to_string()) {
                return Err(Error::Invalid(format!(
                    "--region-group: region {r} is in {other} and {} (one group each)",
                    name.trim()
                )));
            }
        }
    }
    Ok(groups)
}

impl Routing {
    /// Apps are served at `<app>.<domain>` through `ingress`.
    pub fn new(ingress: Arc<dyn Ingress>, domain: &str) -> Routing {
        Routing {
            ingress,
            domain: domain.to_string(),
            one_at_a_time: Mutex::new(()),
            ready_at: Mutex::default(),
            waking: Mutex::default(),
            purged: Mutex::default(),
            groups: BTreeMap::new(),
        }
    }

    /// With super-regions (see [`parse_groups`]).
    pub fn with_groups(mut self, groups: BTreeMap<String, String>) -> Routing {
        self.groups = groups;
        self
    }

    fn host_of(&self, app: &str) -> String {
        format!("{app}.{}", self.domain)
    }
}

/// The app a machine is served as: its app, else its name.
pub fn app_of(m: &Machine) -> String {
    m.app.clone().unwrap_or_else(|| m.name.clone())
}

/// The address of `m`'s `port` (IPv4, the edge's first try).
pub(crate) fn address(m: &Machine, port: u16) -> SocketAddr {
    SocketAddr::new(hangar_machine::network::address(m.slot).v4.into(), port)
}

/// The edge's hosts: `<app>.<domain>` for each app with a service; its
/// machines `here` that are `in_service` are the backends, the other
/// nodes' started ones make `elsewhere`, their stopped ones that start on
/// a request `asleep_elsewhere`.
pub fn edge_hosts(
    machines: &[Machine],
    in_service: impl Fn(&Machine) -> bool,
    here: impl Fn(&Machine) -> bool,
    domain: &str,
) -> Vec<HostSpec> {
    let mut hosts: BTreeMap<String, HostSpec> = BTreeMap::new();
    for m in machines {
        if m.state == MachineState::Destroyed {
            continue;
        }
        let Some(service) = m.config.services.first() else {
            continue;
        };
        let name = format!("{}.{domain}", app_of(m));
        let host = hosts.entry(name.clone()).or_insert_with(|| HostSpec {
            name,
            ..Default::default()
        });
        if host.rate_limit.is_none() {
            host.rate_limit = service.rate_limit.clone();
        }
        if !here(m) {
            if host.cache.is_none() && service.cache.is_some() {
                host.cache = service.cache.clone();
            }
            let list = if m.running_as_wanted() {
                let at = (m.id.clone(), m.node.clone());
                if !host.instances_elsewhere.contains(&at) {
                    host.instances_elsewhere.push(at);
                }
                &mut host.elsewhere
            } else if service.autostart
                && (m.state == MachineState::Stopped || m.desired == Desired::Stopped)
            {
                &mut host.asleep_elsewhere
            } else {
                continue;
            };
            if !list.contains(&m.node) {
                list.push(m.node.clone());
            }
            continue;
        }
        host.autostart |= service.autostart;
        host.force_https |= service.force_https;
        if service.cache.is_some() {
            host.cache = service.cache.clone();
        }
        host.soft_limit = host.soft_limit.max(service.soft_limit);
        host.hard_limit = host.hard_limit.max(service.hard_limit);
        if in_service(m) {
            // An app that listens on IPv6 only is reached there.
            let v6 = hangar_machine::network::address(m.slot).v6;
            host.instances
                .push((m.id.clone(), address(m, service.internal_port)));
            host.backends.push((
                address(m, service.internal_port),
                vec![SocketAddr::new(v6.into(), service.internal_port)],
            ));
        }
    }
    hosts.into_values().collect()
}

/// Of the machines in service of one app (all with `autostop`), those to
/// stop for idleness now, newest first: each idle for `idle_timeout` since
/// the app's last request, its own last change and the moment it was woken
/// (`ready_at`), keeping `min_machines_running`.
pub fn idle_stops<'a>(
    in_service: &[&'a Machine],
    last_request: u64,
    ready_at: &HashMap<String, u64>,
    now: u64,
) -> Vec<&'a Machine> {
    let Some(service) = in_service.first().and_then(|m| m.config.services.first()) else {
        return Vec::new();
    };
    let keep = service.min_machines_running as usize;
    let idle_timeout = service.idle_timeout.max(1);
    let mut idle: Vec<&Machine> = in_service
        .iter()
        .copied()
        .filter(|m| {
            let woke = ready_at.get(&m.id).copied().unwrap_or(0);
            now.saturating_sub(last_request.max(m.updated_at).max(woke)) >= idle_timeout
        })
        .collect();
    idle.sort_by_key(|m| std::cmp::Reverse(m.created_at));
    idle.truncate(in_service.len().saturating_sub(keep));
    idle
}

impl Node {
    /// The host the edge serves `app` at.
    pub fn app_host(&self, app: &str) -> String {
        match &self.routing {
            Some(r) => r.host_of(app),
            None => format!("{app}.localhost"),
        }
    }

    /// Whether `m` may take requests: started, wanted started (not on its
    /// way to a stop) and its checks pass.
    pub fn in_service(&self, m: &Machine) -> bool {
        m.running_as_wanted() && self.checks.passing(&m.id, m.config.checks.len())
    }

    /// Recompute every host's backends from the machines now.
    pub fn refresh_routes(&self) {
        let Some(routing) = &self.routing else {
            return;
        };
        let _one = routing
            .one_at_a_time
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // In a cluster, every app is served here, the others' machines
        // through their edges.
        let machines = match &self.cluster {
            Some(_) => self.state.list(),
            None => self.own_machines(),
        };
        match machines {
            Ok(machines) => {
                let mut hosts = edge_hosts(
                    &machines,
                    |m| self.in_service(m),
                    |m| self.owns(m),
                    &routing.domain,
                );
                // The edge's series of each app carry its org, so the org
                // can query them.
                let orgs: BTreeMap<String, String> = self
                    .state
                    .apps()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|a| (format!("{}.{}", a.name, routing.domain), a.org))
                    .collect();
                for h in &mut hosts {
                    if let Some(org) = orgs.get(&h.name) {
                        let app = h.name.trim_end_matches(&format!(".{}", routing.domain));
                        h.labels = BTreeMap::from([
                            ("org".to_string(), org.clone()),
                            ("app".to_string(), app.to_string()),
                        ]);
                    }
                }
                routing.ingress.set_hosts(&hosts)
            }
            Err(e) => tracing::warn!("routes not refreshed: {e}"),
        }
        if let Some(c) = &self.cluster {
            match self.state.members() {
                Ok(members) => {
                    let now = crate::store::now();
                    let me = members
                        .iter()
                        .find(|m| m.name == c.me.name)
                        .unwrap_or(&c.me);
                    routing.ingress.set_mesh(MeshSpec {
                        groups: routing.groups.clone(),
                        ..mesh_spec(
                            me,
                            &members,
                            &c.token,
                            |r| c.latency.between(&c.me.region, r),
                            now,
                        )
                    })
                }
                Err(e) => tracing::warn!("edge mesh not refreshed: {e}"),
            }
        }
    }

    /// Take a machine wanted stopped or destroyed out of the routes, then
    /// wait (up to its kill timeout) until the requests in flight to it have
    /// finished.
    pub(crate) fn drain(&self, m: &Machine) {
        let Some(routing) = &self.routing else {
            return;
        };
        let ip = IpAddr::from(hangar_machine::network::address(m.slot).v4);
        let in_flight = routing.ingress.in_flight_at(ip);
        self.refresh_routes();
        let deadline = Instant::now() + m.config.kill().1;
        while in_flight() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stop machines of apps with `autostop` that had no request for their
    /// `idle_timeout` (see [`idle_stops`]). Stops run in the background; a
    /// machine already stopping is left alone.
    pub fn stop_idle(self: &Arc<Self>, machines: &[Machine]) {
        let Some(routing) = &self.routing else {
            return;
        };
        let now = crate::store::now();
        let ready_at = {
            let mut map = routing.ready_at.lock().unwrap_or_else(|e| e.into_inner());
            map.retain(|id, _| machines.iter().any(|m| &m.id == id && self.in_service(m)));
            // Idle time counts from when a machine came into service, by
            // whatever way (a wake, a deploy, a restart): a slow boot is not
            // idleness.
            for m in machines.iter().filter(|m| self.in_service(m)) {
                map.entry(m.id.clone()).or_insert(now);
            }
            map.clone()
        };
        let mut by_app: HashMap<String, Vec<&Machine>> = HashMap::new();
        // Only machines in service count: one still coming up (a deploy's
        // new machine) is starting, not idle.
        for m in machines.iter().filter(|m| self.in_service(m)) {
            if m.config.services.first().is_some_and(|s| s.autostop) {
                by_app.entry(app_of(m)).or_default().push(m);
            }
        }
        for (app, in_service) in by_app {
            let last = routing.ingress.last_request(&routing.host_of(&app));
            for m in idle_stops(&in_service, last, &ready_at, now) {
                // Wanted stopped from now: the next tick leaves it alone. Only
                // if nothing changed it since it was found idle (a wake, a
                // deploy): then it is not idle, or the next tick decides.
                let stop = MachineChange::Desired(Desired::Stopped);
                match self
                    .state
                    .update_machine(&m.id, Expect::Revision(m.revision), stop)
                {
                    Ok(_) => {}
                    Err(Error::Conflict(e)) => {
                        tracing::debug!(machine = %m.id, "idle stop: {e}");
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(machine = %m.id, "idle stop: {e}");
                        continue;
                    }
                }
                let (node, id) = (self.clone(), m.id.clone());
                let (signal, timeout) = m.config.kill();
                std::thread::spawn(move || {
                    if let Err(e) = node.stop(&id, &signal, timeout) {
                        tracing::warn!(machine = %id, "idle stop: {e}");
                    }
                });
            }
        }
    }

    /// Answer the edge's request for a started machine of `host`'s app:
    /// start a stopped one that allows it, wait until it is started and
    /// answers its checks (probed directly, every 5 ms), and put it in the
    /// routes. One start per app at a time; callers that arrive meanwhile
    /// wait for it, and return at once if it left a machine with room.
    pub async fn wake(self: &Arc<Self>, host: &str) -> Result<(), String> {
        let Some(routing) = &self.routing else {
            return Err("this node does not route requests".into());
        };
        let app = host
            .strip_suffix(&format!(".{}", routing.domain))
            .unwrap_or(host)
            .to_string();
        let lock = routing
            .waking
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(app.clone())
            .or_default()
            .clone();
        let _one_at_a_time = lock.lock().await;
        let machines = self.own_machines().map_err(|e| e.to_string())?;
        let mine: Vec<&Machine> = machines
            .iter()
            .filter(|m| app_of(m) == app && !m.config.services.is_empty())
            .collect();
        // Someone else's start may have landed while this one waited: a
        // machine in service whose backend has room is enough.
        let ready: Vec<SocketAddr> = mine
            .iter()
            .filter(|m| self.in_service(m))
            .filter_map(|m| Some(address(m, m.config.services.first()?.internal_port)))
            .collect();
        if routing.ingress.has_room(host, &ready) {
            return Ok(());
        }
        // A stopped machine, or one on its way to an idle stop (it is
        // started again once the stop is done).
        let stopped = |m: &&&Machine| {
            m.config.services.first().is_some_and(|s| s.autostart)
                && (m.state == MachineState::Stopped || m.desired == Desired::Stopped)
        };
        let Some(m) = mine.iter().find(stopped) else {
            if !ready.is_empty() {
                return Ok(());
            }
            return Err(format!("app {app} has no stopped machine to start"));
        };
        let stop_deadline =
            Instant::now() + Duration::from_secs(m.config.kill_timeout.unwrap_or(5) + 15);
        while self
            .state
            .get(&m.id)
            .map(|m| m.state != MachineState::Stopped)
            .unwrap_or(false)
        {
            if Instant::now() > stop_deadline {
                return Err(format!("machine {} did not finish stopping", m.id));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (node, id) = (self.clone(), m.id.clone());
        tokio::task::spawn_blocking(move || node.start(&id))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let started = self.state.get(&m.id).map_err(|e| e.to_string())?;
        let port = started
            .config
            .services
            .first()
            .map(|s| s.internal_port)
            .ok_or_else(|| format!("machine {} has no service any more", started.id))?;
        // Micro-VMs boot in tens of seconds under emulation.
        let limit = if started.config.guest.driver == DriverKind::Vm {
            180
        } else {
            30
        };
        let deadline = Instant::now() + Duration::from_secs(limit);
        // Ready when every check passes; with none, when the port answers.
        loop {
            let mut ok = true;
            if started.config.checks.is_empty() {
                ok = tokio::net::TcpStream::connect(address(&started, port))
                    .await
                    .is_ok();
            } else {
                for check in started.config.checks.values() {
                    if crate::checks::probe(address(&started, check.port), check)
                        .await
                        .is_err()
                    {
                        ok = false;
                        break;
                    }
                }
            }
            if ok {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "machine {} did not become ready within {limit}s; its last log lines:\n{}",
                    started.id,
                    crate::deploy::last_log_lines(self, &started.id, 10)
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.checks
            .mark_passing(&started.id, started.config.checks.keys());
        routing
            .ready_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(started.id.clone(), crate::store::now());
        self.refresh_routes();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Service;

    fn machine(id: &str, app: &str, created_at: u64, updated_at: u64, service: Service) -> Machine {
        Machine {
            id: id.into(),
            name: id.into(),
            state: MachineState::Started,
            desired: Desired::Started,
            app: Some(app.into()),
            release: Some(1),
            config: crate::MachineConfig {
                services: vec![service],
                ..Default::default()
            },
            slot: 258 + created_at as u32,
            node: String::new(),
            region: String::new(),
            exit_code: None,
            oom_killed: false,
            restarts: 0,
            created_at,
            updated_at,
            revision: 0,
        }
    }

    fn web(min: u32, idle: u64) -> Service {
        Service {
            internal_port: 8080,
            autostop: true,
            autostart: true,
            min_machines_running: min,
            idle_timeout: idle,
            ..Default::default()
        }
    }

    #[test]
    fn hosts_carry_the_apps_policy_and_only_machines_in_service() {
        let mut a = machine("a", "web", 1, 0, web(0, 60));
        a.config.services[0].force_https = true;
        a.config.services[0].soft_limit = 5;
        a.config.services[0].cache = Some(EdgeCache {
            enabled: true,
            default_ttl: 30,
            shield: None,
        });
        let mut b = machine("b", "web", 2, 0, web(0, 60));
        b.config.services[0].hard_limit = 9;
        let mut lone = machine("c", "x", 3, 0, web(0, 60));
        lone.app = None;
        let mut quiet = machine("d", "svc", 4, 0, web(0, 60));
        quiet.config.services.clear();
        let hosts = edge_hosts(
            &[a.clone(), b.clone(), lone, quiet],
            |m| m.id != "b",
            |_| true,
            "example.test",
        );
        let names: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["c.example.test", "web.example.test"]);
        let host = &hosts[1];
        assert!(host.force_https && host.autostart);
        assert_eq!((host.soft_limit, host.hard_limit), (5, 9));
        assert_eq!(host.cache.as_ref().map(|c| c.default_ttl), Some(30));
        // b is not in service: one backend, with its IPv6 address to try.
        assert_eq!(host.backends.len(), 1);
        let (v4, others) = &host.backends[0];
        assert_eq!(*v4, address(&a, 8080));
        assert!(others[0].is_ipv6() && others[0].port() == 8080);
    }

    #[test]
    fn other_nodes_machines_are_served_through_their_edges() {
        let mut far = machine("far", "web", 1, 0, web(0, 60));
        far.node = "n2".into();
        let mut asleep = machine("asleep", "web", 2, 0, web(0, 60));
        asleep.node = "n3".into();
        (asleep.state, asleep.desired) = (MachineState::Stopped, Desired::Stopped);
        let mut gone = machine("gone", "web", 3, 0, web(0, 60));
        gone.node = "n4".into();
        gone.state = MachineState::Destroyed;
        let hosts = edge_hosts(
            &[far.clone(), asleep, gone, far],
            |_| true,
            |m| m.node.is_empty(),
            "example.test",
        );
        let web = &hosts[0];
        assert!(web.backends.is_empty(), "none of them is here");
        assert_eq!(web.elsewhere, ["n2"], "once per node");
        assert_eq!(web.asleep_elsewhere, ["n3"]);
        assert_eq!(
            web.instances_elsewhere,
            [("far".to_string(), "n2".to_string())]
        );
        assert!(!web.autostart, "nothing here to start");
    }

    #[test]
    fn region_groups_parse_and_a_region_is_in_one_only() {
        let g = parse_groups(&["eu=ams,fra".into(), "us = iad".into()]).unwrap();
        assert_eq!(g["ams"], "eu");
        assert_eq!(g["fra"], "eu");
        assert_eq!(g["iad"], "us");
        let e = parse_groups(&["eu=ams".into(), "west=ams".into()]).unwrap_err();
        assert!(e.to_string().contains("ams is in eu and west"), "{e}");
        let e = parse_groups(&["eu".into()]).unwrap_err();
        assert!(e.to_string().contains("NAME=REGION"), "{e}");
        assert!(parse_groups(&["eu=".into()]).is_err());
    }

    #[test]
    fn a_new_member_takes_a_growing_share_of_the_keys() {
        assert_eq!(weight(0, 1_000), 1.0, "a member from before: all of it");
        assert_eq!(weight(1_000, 1_000), 0.05);
        assert_eq!(weight(1_000, 1_030), 0.5);
        assert_eq!(weight(1_000, 1_100), 1.0);
    }

    #[test]
    fn idle_stops_take_the_newest_idle_machines_above_the_minimum() {
        let now = 1_000;
        let ms = [
            machine("old", "web", 1, 100, web(1, 60)),
            machine("mid", "web", 2, 100, web(1, 60)),
            machine("new", "web", 3, 100, web(1, 60)),
        ];
        let all: Vec<&Machine> = ms.iter().collect();
        let ids = |v: Vec<&Machine>| v.into_iter().map(|m| m.id.clone()).collect::<Vec<_>>();
        let none = HashMap::new();
        // (last request, woken at) -> stopped
        assert_eq!(ids(idle_stops(&all, 0, &none, now)), ["new", "mid"]);
        assert_eq!(
            ids(idle_stops(&all, now - 59, &none, now)),
            Vec::<String>::new()
        );
        assert_eq!(ids(idle_stops(&all, now - 60, &none, now)), ["new", "mid"]);
        // A machine woken recently is not idle, whatever its start.
        let woke = HashMap::from([("new".to_string(), now - 5)]);
        assert_eq!(ids(idle_stops(&all, 0, &woke, now)), ["mid", "old"]);
        // A change of the machine (its start) counts as activity.
        let mut fresh = ms.clone();
        fresh[1].updated_at = now - 10;
        let all: Vec<&Machine> = fresh.iter().collect();
        assert_eq!(ids(idle_stops(&all, 0, &none, now)), ["new", "old"]);
        // The minimum is kept; a timeout of 0 counts as 1 s.
        let keep_all: Vec<Machine> = ms
            .iter()
            .map(|m| machine(&m.id, "web", m.created_at, 100, web(3, 0)))
            .collect();
        let all: Vec<&Machine> = keep_all.iter().collect();
        assert!(idle_stops(&all, 0, &none, now).is_empty());
        let zero: Vec<Machine> = ms
            .iter()
            .map(|m| machine(&m.id, "web", m.created_at, now - 1, web(0, 0)))
            .collect();
        let all: Vec<&Machine> = zero.iter().collect();
        assert_eq!(idle_stops(&all, 0, &none, now).len(), 3);
        assert!(idle_stops(&[], 0, &none, now).is_empty());
    }
}
