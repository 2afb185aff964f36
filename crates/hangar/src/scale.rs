//! The node's side of the edge, inside `hangar up`: each app's hosts and
//! backends from the machines (started, checks passing), scale to zero
//! (stop machines idle past their `idle_timeout`, keeping
//! `min_machines_running`), and the waker the edge calls to start a stopped
//! machine when a request finds none started or all past their soft limit.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hangar_api::state::Machine;
use hangar_api::{Desired, MachineState, Node};

fn app_of(m: &Machine) -> String {
    m.app.clone().unwrap_or_else(|| m.name.clone())
}

fn address(m: &Machine, port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::new(hangar_machine::network::address(m.slot).v4.into(), port)
}

/// Keeps the edge's routes in line with the state store. Every update goes
/// through [`Router::refresh`] under one lock, so a table computed from an
/// older listing never replaces one computed from a newer listing (the
/// reconcile tick, the waker and machines leaving service all refresh).
pub struct Router {
    pub node: Arc<Node>,
    pub edge: Arc<hangar_edge::Edge>,
    pub domain: String,
    runtime: tokio::runtime::Handle,
    one_at_a_time: Mutex<()>,
    /// When each machine the waker started was first ready to serve (unix
    /// seconds): its idle time counts from then, not from its start, so a
    /// slow boot is not idle time.
    ready_at: Mutex<HashMap<String, u64>>,
}

impl Router {
    /// A router for `edge`; the node drains a machine through it before
    /// signalling it (see [`Router::drain`]). Call inside the runtime.
    pub fn new(node: Arc<Node>, edge: Arc<hangar_edge::Edge>, domain: String) -> Arc<Router> {
        let router = Arc::new(Router {
            node: node.clone(),
            edge,
            domain,
            runtime: tokio::runtime::Handle::current(),
            one_at_a_time: Mutex::new(()),
            ready_at: Mutex::default(),
        });
        let weak = Arc::downgrade(&router);
        node.on_leaving_service(move |m| {
            if let Some(router) = weak.upgrade() {
                router.drain(m);
            }
        });
        router
    }

    /// Take a machine wanted stopped or destroyed out of the routes, then
    /// wait (up to its kill timeout) until the requests in flight to it have
    /// finished.
    pub fn drain(&self, m: &Machine) {
        let ip = std::net::IpAddr::from(hangar_machine::network::address(m.slot).v4);
        let mine: Vec<Arc<hangar_edge::backend::Backend>> = self
            .edge
            .routes
            .all()
            .values()
            .flat_map(|site| site.backends.iter().filter(|b| b.addr.ip() == ip).cloned())
            .collect();
        self.refresh();
        let deadline = Instant::now() + m.config.kill().1;
        while mine.iter().any(|b| b.outstanding() > 0) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Recompute every host's backends from the machines now.
    pub fn refresh(&self) {
        let _one = self.one_at_a_time.lock().unwrap_or_else(|e| e.into_inner());
        // The edge starts a host's health checks on the runtime.
        let _entered = self.runtime.enter();
        if let Ok(machines) = self.node.state.list() {
            self.edge
                .set_hosts(&edge_hosts(&self.node, &machines, &self.domain));
        }
    }
}

/// The edge's hosts: `<app>.<domain>` for each app with a service; its
/// started machines whose checks pass are the backends.
pub fn edge_hosts(
    node: &Node,
    machines: &[Machine],
    domain: &str,
) -> Vec<hangar_edge::config::Host> {
    let mut hosts: BTreeMap<String, hangar_edge::config::Host> = BTreeMap::new();
    for m in machines {
        let Some(service) = m.config.services.first() else {
            continue;
        };
        let name = format!("{}.{domain}", app_of(m));
        let host = hosts
            .entry(name.clone())
            .or_insert_with(|| hangar_edge::config::Host {
                name,
                ..Default::default()
            });
        host.autostart |= service.autostart;
        host.force_https |= service.force_https;
        match &service.cache {
            Some(c) if !c.enabled => host.cache.enabled = false,
            Some(c) => host.cache.default_ttl = Duration::from_secs(c.default_ttl),
            None => {}
        }
        host.soft_limit = host.soft_limit.max(service.soft_limit);
        host.hard_limit = host.hard_limit.max(service.hard_limit);
        // Started, wanted started (not on its way to an idle stop), healthy.
        if m.running_as_wanted() && node.checks.passing(&m.id, m.config.checks.len()) {
            let addr = address(m, service.internal_port);
            host.backends.push(addr);
            // An app that listens on IPv6 only is reached there.
            let v6 = hangar_machine::network::address(m.slot).v6;
            host.alternates.insert(
                addr,
                vec![std::net::SocketAddr::new(v6.into(), service.internal_port)],
            );
        }
    }
    hosts.into_values().collect()
}

/// Stop machines of apps with `autostop` that had no request for their
/// `idle_timeout`, keeping `min_machines_running` started. Stops run in the
/// background; a machine already stopping is left alone.
pub fn stop_idle(router: &Router, machines: &[Machine]) {
    let (node, edge, domain) = (&router.node, &router.edge, &router.domain);
    let now = hangar_api::state::now();
    let ready_at = {
        let mut map = router.ready_at.lock().unwrap_or_else(|e| e.into_inner());
        // Forget machines that are gone.
        map.retain(|id, _| {
            machines
                .iter()
                .any(|m| &m.id == id && m.state != MachineState::Destroyed)
        });
        map.clone()
    };
    let mut by_app: HashMap<String, Vec<&Machine>> = HashMap::new();
    for m in machines
        .iter()
        // Only machines in service count: one still coming up (a deploy's
        // new machine) is starting, not idle.
        .filter(|m| m.running_as_wanted() && node.checks.passing(&m.id, m.config.checks.len()))
    {
        if m.config.services.first().is_some_and(|s| s.autostop) {
            by_app.entry(app_of(m)).or_default().push(m);
        }
    }
    for (app, started) in by_app {
        let service = &started[0].config.services[0];
        let last_request = edge
            .routes
            .get(&format!("{app}.{domain}"))
            .map(|s| s.metrics.last_request())
            .unwrap_or(0);
        let keep = service.min_machines_running as usize;
        let idle_timeout = service.idle_timeout.max(1);
        // Newest first go; a machine's own start (or, when woken, the
        // moment it was first ready) counts as activity.
        let mut candidates: Vec<&&Machine> = started
            .iter()
            .filter(|m| {
                let woke = ready_at.get(&m.id).copied().unwrap_or(0);
                now.saturating_sub(last_request.max(m.updated_at).max(woke)) >= idle_timeout
            })
            .collect();
        candidates.sort_by_key(|m| std::cmp::Reverse(m.created_at));
        let excess = started.len().saturating_sub(keep);
        for m in candidates.into_iter().take(excess) {
            let (node, id) = (node.clone(), m.id.clone());
            let (signal, timeout) = m.config.kill();
            // Wanted stopped from now: the next tick leaves it alone.
            let _ = node.state.set_desired(&id, Desired::Stopped);
            std::thread::spawn(move || {
                let _ = node.stop(&id, &signal, timeout);
            });
        }
    }
}

/// The edge's waker: start a stopped machine of the host's app that allows
/// it, wait until it is started and answers its check (probed directly,
/// every 5 ms), and put it in the routing table. One start per app at a
/// time; callers that arrive meanwhile wait for it.
pub fn waker(router: Arc<Router>) -> hangar_edge::proxy::Waker {
    let locks: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>> = Arc::default();
    Arc::new(move |host: String| {
        let (router, locks) = (router.clone(), locks.clone());
        Box::pin(async move {
            let (node, edge, domain) = (&router.node, &router.edge, &router.domain);
            let app = host
                .strip_suffix(&format!(".{domain}"))
                .unwrap_or(&host)
                .to_string();
            let lock = locks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(app.clone())
                .or_default()
                .clone();
            let _one_at_a_time = lock.lock().await;
            let machines = node.state.list().map_err(|e| e.to_string())?;
            let mine: Vec<&Machine> = machines
                .iter()
                .filter(|m| app_of(m) == app && !m.config.services.is_empty())
                .collect();
            // Someone else's start may have landed while this one waited:
            // a healthy machine whose backend has room is enough.
            let ready = |m: &Machine| {
                m.running_as_wanted() && node.checks.passing(&m.id, m.config.checks.len())
            };
            let ready_addrs: Vec<std::net::SocketAddr> = mine
                .iter()
                .filter(|m| ready(m))
                .map(|m| address(m, m.config.services[0].internal_port))
                .collect();
            if let Some(site) = edge.routes.get(&host) {
                let room = site.config.soft_limit.max(1);
                if site.backends.iter().any(|b| {
                    ready_addrs.contains(&b.addr) && b.available() && b.outstanding() < room
                }) {
                    return Ok(());
                }
            }
            // A stopped machine, or one on its way to an idle stop (it is
            // started again once the stop is done).
            let stopped = |m: &&&Machine| {
                m.config.services[0].autostart
                    && (m.state == MachineState::Stopped || m.desired == Desired::Stopped)
            };
            let Some(m) = mine.iter().find(stopped) else {
                if mine.iter().any(|m| ready(m)) {
                    return Ok(());
                }
                return Err(format!("app {app} has no stopped machine to start"));
            };
            let stop_deadline =
                Instant::now() + Duration::from_secs(m.config.kill_timeout.unwrap_or(5) + 15);
            while node
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
            let id = m.id.clone();
            let n = node.clone();
            tokio::task::spawn_blocking(move || n.start(&id))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            let started = node.state.get(&m.id).map_err(|e| e.to_string())?;
            let service = &started.config.services[0];
            // Micro-VMs boot in tens of seconds under emulation.
            let limit = if started.config.guest.driver == hangar_api::config::DriverKind::Vm {
                180
            } else {
                30
            };
            let deadline = Instant::now() + Duration::from_secs(limit);
            // Ready when every check passes; with none, when the port answers.
            loop {
                let mut ok = true;
                if started.config.checks.is_empty() {
                    ok = tokio::net::TcpStream::connect(address(&started, service.internal_port))
                        .await
                        .is_ok();
                } else {
                    for check in started.config.checks.values() {
                        if hangar_api::checks::probe(address(&started, check.port), check)
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
                        hangar_api::deploy::last_log_lines(node, &started.id, 10)
                    ));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            node.checks
                .mark_passing(&started.id, started.config.checks.keys());
            router
                .ready_at
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(started.id.clone(), hangar_api::state::now());
            router.refresh();
            Ok(())
        })
    })
}
