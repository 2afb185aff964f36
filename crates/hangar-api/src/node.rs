//! One node's control logic: machine lifecycle operations and the reconcile
//! loop that makes the host match the state store (restart policies,
//! adoption after a restart of `hangar up`, exits and OOM kills recorded).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hangar_init::InitConfig;
use hangar_machine::{Driver, MachineSpec, ProcState};
use hangar_oci::Reference;

use crate::config::MachineConfig;
use crate::config::{DriverKind, RestartPolicy};
use crate::error::{Error, Result};
use crate::store::{Desired, Expect, Machine, MachineChange, MachineState, Placement, Site, Store};

/// The port of the node's egress proxy on the bridge gateway.
pub const EGRESS_PORT: u16 = 4750;

pub struct Node {
    /// The state store: the source of truth (see [`crate::store`]).
    pub state: Arc<dyn Store>,
    /// Whatever runs the machines on the host (see `hangar_machine::Driver`).
    pub driver: Arc<dyn Driver>,
    /// The node's image store: what machines' images resolve to.
    pub images: hangar_oci::Store,
    pub checks: crate::checks::Checks,
    /// Opens app secrets for machines' environments.
    pub sealer: crate::apps::Sealer,
    /// Apps with a deploy or scale under way (one at a time per app).
    pub(crate) busy_apps: Mutex<std::collections::HashSet<String>>,
    locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// The edge's routes, where the node has an edge (see [`crate::routing`]).
    pub(crate) routing: Option<crate::routing::Routing>,
    /// The egress proxy's policy, where the node has one.
    egress: Option<Arc<dyn crate::egress::EgressControl>>,
    /// This node's name and region: where the machines it creates run.
    pub site: Site,
    /// The cluster it is a member of, if any (see [`crate::cluster`]).
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// The private network across the cluster's nodes, where it has one.
    mesh: Option<Arc<dyn crate::cluster::Mesh>>,
    /// `.internal` DNS for its machines, where it serves it.
    pub(crate) dns: Option<Arc<crate::dns::Dns>>,
    /// Where its metrics are stored and queried, when they are on.
    pub metrics: Option<crate::metrics::Metrics>,
    /// The API's requests, for the node's own exposition.
    pub api_requests: crate::metrics::ApiMetrics,
    /// Orgs' metrics queries running now.
    pub(crate) metric_queries: crate::metrics::QuerySlots,
    /// The machines it placed, for the scheduler's series.
    pub placements: crate::metrics::Placements,
    /// The alerts posted to apps' webhooks.
    pub alert_deliveries: crate::alerts::Deliveries,
    /// Held from the room check of a create to its row: only this node
    /// creates its machines, so two creates at once cannot both take the
    /// last of its memory.
    admitting: Mutex<()>,
}

/// Output of `exec`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ExecOutput {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Run a blocking node operation off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("operation failed: {e}")))?
}

fn random_id() -> Result<String> {
    Ok(crate::apps::random_bytes(7)?
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// What the reconcile loop does with one machine, from its row and what
/// the host says of its process.
#[derive(Debug, PartialEq)]
pub enum Step {
    Nothing,
    /// Wanted stopped, no stop under way, yet it runs: a stop the node did
    /// not finish (killed in the middle). Stop it, in the background.
    FinishStop,
    /// Wanted stopped and no longer running, but not recorded so: record
    /// how it ended, and that it is stopped.
    RecordStopped,
    /// It runs: record that it started (after an adoption).
    MarkStarted,
    /// Its app ended on its own: record how, then start it again or leave
    /// it stopped (and destroyed, for `auto_destroy`) as its policy says.
    Exited {
        exit: hangar_machine::Exit,
        restart: bool,
        destroy: bool,
    },
    /// Should run, and nothing runs or says how it ended (a host reboot, a
    /// killed shim): start it again.
    Adopt,
}

/// The reconcile decision for one machine whose lock is free (no
/// operation under way on it).
pub fn reconcile_step(m: &Machine, host: ProcState) -> Step {
    use MachineState as S;
    if m.desired == Desired::Stopped && matches!(m.state, S::Started | S::Stopping) {
        return match host {
            ProcState::Running => Step::FinishStop,
            _ => Step::RecordStopped,
        };
    }
    if m.desired != Desired::Started || m.state == S::Failed {
        return Step::Nothing;
    }
    match host {
        ProcState::Running if m.state != S::Started => Step::MarkStarted,
        ProcState::Running => Step::Nothing,
        // Lost with its node, which is back: its app ended meanwhile.
        ProcState::Exited(_) if m.state == S::Lost => Step::Adopt,
        // An exit seen before the start was recorded is the last run's.
        ProcState::Exited(_) if m.state != S::Started => Step::Nothing,
        ProcState::Exited(exit) => Step::Exited {
            restart: restarts_after(&m.config.restart, exit.code, m.restarts),
            destroy: m.config.auto_destroy,
            exit,
        },
        ProcState::NotRunning => Step::Adopt,
    }
}

/// Whether a machine whose app exited with `code`, restarted `restarts`
/// times so far, is started again.
pub fn restarts_after(restart: &crate::config::Restart, code: i32, restarts: u32) -> bool {
    match restart.policy {
        RestartPolicy::Always => true,
        RestartPolicy::OnFailure => code != 0 && restarts < restart.max_retries,
        RestartPolicy::No => false,
    }
}

impl Node {
    pub fn new(
        state: Arc<dyn Store>,
        driver: Arc<dyn Driver>,
        images: hangar_oci::Store,
        sealer: crate::apps::Sealer,
    ) -> Node {
        Node {
            state,
            driver,
            images,
            checks: Default::default(),
            sealer,
            busy_apps: Default::default(),
            locks: Mutex::new(HashMap::new()),
            routing: None,
            egress: None,
            site: Site::default(),
            cluster: None,
            mesh: None,
            dns: None,
            metrics: None,
            api_requests: Default::default(),
            metric_queries: Default::default(),
            alert_deliveries: Default::default(),
            placements: Default::default(),
            admitting: Mutex::new(()),
        }
    }

    /// Keep the private network across nodes in line with where the
    /// cluster's machines are.
    pub fn with_mesh(mut self, mesh: Arc<dyn crate::cluster::Mesh>) -> Node {
        self.mesh = Some(mesh);
        self
    }

    /// Serve `.internal` names to the machines, and make the DNS their
    /// resolver.
    pub fn with_dns(mut self, dns: Arc<crate::dns::Dns>) -> Node {
        self.dns = Some(dns);
        self
    }

    /// Store metrics in the Prometheus at `metrics.prometheus`, and serve
    /// its targets and the per-org query endpoint.
    pub fn with_metrics(mut self, metrics: crate::metrics::Metrics) -> Node {
        self.metrics = Some(metrics);
        self
    }

    /// Before a machine in `slot` starts: its net's resolver is serving.
    fn serve_dns(&self, slot: u32) -> Result<()> {
        if let Some(dns) = &self.dns {
            let net = hangar_machine::network::net_of(slot);
            hangar_machine::network::ensure_bridge(net)?;
            dns.open(net)?;
        }
        Ok(())
    }

    /// Name the node and its region: what its machines record.
    pub fn with_site(mut self, site: Site) -> Node {
        self.site = site;
        self
    }

    /// Make the node a member of a cluster: it runs only its own machines,
    /// and carries calls about the others' to them.
    pub fn with_cluster(mut self, cluster: Arc<crate::cluster::Cluster>) -> Node {
        self.site = cluster.site();
        self.cluster = Some(cluster);
        self
    }

    /// Whether `m` runs here: its node is this one (a node alone has no
    /// name, nor have the machines of its store).
    pub fn owns(&self, m: &Machine) -> bool {
        m.node == self.site.node || m.node.is_empty()
    }

    /// The machines that run here (not destroyed), oldest first.
    pub fn own_machines(&self) -> Result<Vec<Machine>> {
        let mut all = self.state.list()?;
        all.retain(|m| self.owns(m));
        Ok(all)
    }

    /// Serve apps through an edge: every tick gives it each app's machines
    /// in service, and a machine leaves its routes before it is signalled.
    pub fn with_routing(mut self, routing: crate::routing::Routing) -> Node {
        self.routing = Some(routing);
        self
    }

    /// Keep an egress proxy's roles and rules in line with the machines.
    pub fn with_egress(mut self, egress: Arc<dyn crate::egress::EgressControl>) -> Node {
        self.egress = Some(egress);
        self
    }

    /// One round of the node's loop: reconcile, the mesh, the egress
    /// policy, idle stops, then the routes (which leave the idle stops out).
    pub fn tick(self: &Arc<Self>) {
        self.reconcile();
        if let Some(mesh) = &self.mesh {
            match (self.state.members(), self.state.list()) {
                (Ok(members), Ok(all)) => {
                    let (peers, others) = crate::cluster::mesh_of(&self.site.node, &members, &all);
                    mesh.apply(&peers, &others);
                }
                (Err(e), _) | (_, Err(e)) => tracing::warn!("mesh: {e}"),
            }
        }
        let machines = match self.own_machines() {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("tick: {e}");
                return;
            }
        };
        if let Some(egress) = &self.egress {
            egress.apply(crate::egress::egress_policy(&machines));
        }
        if self.routing.is_some() {
            self.stop_idle(&machines);
            self.refresh_routes();
        }
    }

    /// A running machine is taken out of service (wanted stopped or
    /// destroyed, already in the store): the edge drains it first (no new
    /// requests; those in flight may finish), so no request meets a machine
    /// on its way down.
    fn leaving_service(&self, id: &str) {
        if let Ok(m) = self.state.get(id) {
            self.drain(&m);
        }
    }

    fn lock(&self, id: &str) -> Arc<Mutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.to_string())
            .or_default()
            .clone()
    }

    fn spec(&self, m: &Machine) -> Result<MachineSpec> {
        let c = &m.config;
        // The machine's own environment ([env]), then the app's secrets,
        // which win on a name in both (what `hangar secrets set` says is
        // what the app sees), then the node's egress proxy unless either
        // says otherwise.
        let mut env = c.env.clone();
        if let Some(app) = &m.app {
            env.extend(self.state.open_secrets(&self.sealer, app)?);
        }
        let proxy = format!(
            "http://{}:{}",
            hangar_machine::network::gateway().v4,
            EGRESS_PORT
        );
        let no_proxy = format!(
            "localhost,127.0.0.1,::1,.internal,{}.0.0/16",
            hangar_machine::network::SUBNET4
                .map(|b| b.to_string())
                .join(".")
        );
        // Who the machine is, as Fly's FLY_* variables say it: what an app
        // needs to find itself among its peers on `<app>.internal`.
        let private = hangar_machine::network::address(m.slot).v6.to_string();
        let mut identity = vec![
            ("HANGAR_MACHINE_ID", m.id.clone()),
            ("HANGAR_PRIVATE_IP", private),
            ("HANGAR_REGION", self.site.region.clone()),
        ];
        if let Some(app) = &m.app {
            identity.push(("HANGAR_APP_NAME", app.clone()));
        }
        for (k, v) in identity {
            env.insert(k.to_string(), v);
        }
        for (k, v) in [
            ("HTTP_PROXY", &proxy),
            ("HTTPS_PROXY", &proxy),
            ("http_proxy", &proxy),
            ("https_proxy", &proxy),
            ("NO_PROXY", &no_proxy),
            ("no_proxy", &no_proxy),
        ] {
            env.entry(k.to_string()).or_insert_with(|| v.clone());
        }
        Ok(MachineSpec {
            id: m.id.clone(),
            hostname: m.name.clone(),
            image: c.image.parse::<Reference>()?,
            init: InitConfig {
                exec: c.init.exec.clone(),
                entrypoint: c.init.entrypoint.clone(),
                cmd: c.init.cmd.clone(),
                user: c.init.user.clone(),
                env,
                nameservers: match &self.dns {
                    Some(_) => crate::dns::Dns::resolvers(m.slot),
                    None => Vec::new(),
                },
                ..InitConfig::default()
            },
            limits: c.limits(),
            slot: m.slot,
            vm: c.guest.driver == DriverKind::Vm,
        })
    }

    /// `config.validate()`, and what this node can give: its root
    /// filesystem must fit on the disk that holds the machines.
    pub fn check_config(&self, config: &MachineConfig) -> Result<()> {
        config.validate()?;
        let disk_gb = self.driver.disk_capacity_mb() / 1024;
        if config.rootfs.size_gb > disk_gb {
            return Err(Error::Invalid(format!(
                "config.rootfs.size_gb {} is more than the disk that holds this node's machines ({disk_gb} GB); ask for at most that",
                config.rootfs.size_gb
            )));
        }
        Ok(())
    }

    /// In a cluster: whether this node has the memory for `config` of what
    /// it offers (the placing node chose it from its read model, which a
    /// create at the same moment may have made stale).
    fn check_room(&self, config: &MachineConfig) -> Result<()> {
        let Some(cluster) = &self.cluster else {
            return Ok(());
        };
        let used: u64 = self
            .own_machines()?
            .iter()
            .map(|m| m.config.guest.memory_mb)
            .sum();
        let free = cluster.me.memory_mb.saturating_sub(used);
        if config.guest.memory_mb > free {
            return Err(Error::Busy(format!(
                "node {} has {free} MB free of the {} MB it offers machines, less than this machine's {} MB \
                 (another create took it first); try again, or scale down elsewhere",
                self.site.node, cluster.me.memory_mb, config.guest.memory_mb
            )));
        }
        Ok(())
    }

    /// Create a machine of `place` from `config` (its image already in the
    /// store) and start it.
    pub fn create(
        &self,
        name: Option<String>,
        place: Placement,
        config: MachineConfig,
    ) -> Result<Machine> {
        self.check_config(&config)?;
        let id = random_id()?;
        let name = name.unwrap_or_else(|| id.clone());
        if name.is_empty()
            || name.len() > 63
            || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(Error::Invalid(format!(
                "machine name {name:?} must be 1-63 letters, digits or '-'"
            )));
        }
        let admitting = self.admitting.lock().unwrap_or_else(|e| e.into_inner());
        self.check_room(&config)?;
        let m = self
            .state
            .insert_machine(&id, &name, &self.site, &place, &config)?;
        drop(admitting);
        let lock = self.lock(&id);
        let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        let created = self
            .serve_dns(m.slot)
            .and_then(|()| self.spec(&m))
            .and_then(|spec| Ok(self.driver.create(&spec)?));
        match created {
            Ok(c) => self.state.event(&id, "created", serde_json::json!({"ipv4": c.addresses.v4.to_string(), "ipv6": c.addresses.v6.to_string(), "unpacked": c.unpacked}))?,
            Err(e) => {
                let _ = self.driver.destroy(&id);
                self.state.set_state(&id, MachineState::Failed)?;
                self.state.event(&id, "failed", serde_json::json!({"error": e.to_string()}))?;
                return Err(e);
            }
        }
        self.start_locked(&id)?;
        self.state.get(&id)
    }

    fn start_locked(&self, id: &str) -> Result<()> {
        let m = self.state.get(id)?;
        self.state.set_desired(id, Desired::Started)?;
        self.state.set_state(id, MachineState::Starting)?;
        self.state.set_exit(id, None, false)?;
        match self
            .serve_dns(m.slot)
            .and_then(|()| Ok(self.driver.start(id, m.slot)?))
        {
            Ok(()) => {
                self.state.set_state(id, MachineState::Started)?;
                self.state.event(id, "started", serde_json::json!({}))?;
                Ok(())
            }
            Err(e) => {
                self.state.set_state(id, MachineState::Failed)?;
                self.state
                    .event(id, "failed", serde_json::json!({"error": e.to_string()}))?;
                Err(e)
            }
        }
    }

    pub fn start(&self, id: &str) -> Result<Machine> {
        let m = self.state.get(id)?;
        let lock = self.lock(&m.id);
        let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        if self.driver.state(&m.id) == ProcState::Running {
            return Err(Error::Conflict(format!(
                "machine {} is already running",
                m.id
            )));
        }
        self.start_locked(&m.id)?;
        self.state.get(&m.id)
    }

    fn stop_locked(&self, id: &str, signal: &str, timeout: Duration) -> Result<()> {
        self.state.set_desired(id, Desired::Stopped)?;
        if self.driver.state(id) == ProcState::Running {
            self.leaving_service(id);
            self.state.set_state(id, MachineState::Stopping)?;
            if let Err(e) = self.driver.signal(id, signal) {
                tracing::warn!(machine = %id, "{signal}: {e}");
            }
            let deadline = Instant::now() + timeout;
            while self.driver.state(id) == ProcState::Running && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if self.driver.state(id) == ProcState::Running {
                let _ = self.driver.signal(id, "SIGKILL");
                let deadline = Instant::now() + Duration::from_secs(10);
                while self.driver.state(id) == ProcState::Running && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        self.record_exit(id)?;
        self.state.set_state(id, MachineState::Stopped)?;
        Ok(())
    }

    fn record_exit(&self, id: &str) -> Result<()> {
        if let ProcState::Exited(exit) = self.driver.state(id) {
            self.state.set_exit(id, Some(exit.code), exit.oom)?;
            self.state.event(
                id,
                "exited",
                serde_json::json!({"exit_code": exit.code, "oom_killed": exit.oom}),
            )?;
        }
        Ok(())
    }

    pub fn stop(&self, id: &str, signal: &str, timeout: Duration) -> Result<Machine> {
        let m = self.state.get(id)?;
        let lock = self.lock(&m.id);
        let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        self.stop_locked(&m.id, signal, timeout)?;
        self.state.get(&m.id)
    }

    pub fn restart(&self, id: &str, signal: &str, timeout: Duration) -> Result<Machine> {
        let m = self.state.get(id)?;
        let lock = self.lock(&m.id);
        let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        self.stop_locked(&m.id, signal, timeout)?;
        self.start_locked(&m.id)?;
        self.state
            .event(&m.id, "restarted", serde_json::json!({"by": "request"}))?;
        self.state.get(&m.id)
    }

    pub fn signal(&self, id: &str, signal: &str) -> Result<()> {
        let m = self.state.get(id)?;
        if self.driver.state(&m.id) != ProcState::Running {
            return Err(Error::Conflict(format!("machine {} is not running", m.id)));
        }
        Ok(self.driver.signal(&m.id, signal)?)
    }

    /// New config (and app and release), then a restart onto it (a new
    /// root filesystem from the new image).
    pub fn update(&self, id: &str, place: Placement, config: MachineConfig) -> Result<Machine> {
        self.check_config(&config)?;
        let m = self.state.get(id)?;
        // A machine's addresses are in its org's network: it stays there.
        if self.state.net_for(place.app.as_deref())? != hangar_machine::network::net_of(m.slot) {
            return Err(Error::Invalid(format!(
                "machine {} cannot move to an app of another org (its network is its org's); create a machine in that app instead",
                m.id
            )));
        }
        let lock = self.lock(&m.id);
        let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        self.stop_locked(&m.id, "SIGTERM", Duration::from_secs(10))?;
        self.driver.destroy(&m.id)?;
        self.state.set_config(&m.id, &place, &config)?;
        let m = self.state.get(&m.id)?;
        self.driver.create(&self.spec(&m)?)?;
        self.state
            .event(&m.id, "updated", serde_json::json!({"image": config.image}))?;
        self.start_locked(&m.id)?;
        self.state.get(&m.id)
    }

    pub fn destroy(&self, id: &str, force: bool) -> Result<Machine> {
        let m = self.state.get(id)?;
        if !self.owns(&m) {
            // Its node is gone (a live one destroys its own): forget it;
            // the node removes it from its host should it come back.
            self.state.set_desired(&m.id, Desired::Destroyed)?;
            self.state.mark_destroyed(&m.id)?;
            self.state.event(
                &m.id,
                "destroyed",
                serde_json::json!({"by": self.site.node, "node_gone": m.node}),
            )?;
            return self.state.get(&m.id);
        }
        let lock = self.lock(&m.id);
        let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        if self.driver.state(&m.id) == ProcState::Running {
            if !force {
                return Err(Error::Conflict(format!(
                    "machine {} is running; stop it first, or destroy with force (`hangar machine destroy --force`)",
                    m.id
                )));
            }
            self.state.set_desired(&m.id, Desired::Destroyed)?;
            self.leaving_service(&m.id);
            let _ = self.driver.signal(&m.id, "SIGKILL");
        }
        self.state.set_desired(&m.id, Desired::Destroyed)?;
        self.state.set_state(&m.id, MachineState::Destroying)?;
        self.driver.destroy(&m.id)?;
        self.state.mark_destroyed(&m.id)?;
        self.state
            .event(&m.id, "destroyed", serde_json::json!({}))?;
        // Its snapshots go once neither a machine nor a stored image needs them.
        if let Err(e) = self.driver.gc() {
            tracing::warn!("collecting snapshots after destroying {}: {e}", m.id);
        }
        self.state.get(&m.id)
    }

    pub fn exec(
        &self,
        id: &str,
        cmd: &[String],
        user: Option<&str>,
        stdin: &str,
    ) -> Result<ExecOutput> {
        let m = self.state.get(id)?;
        if cmd.is_empty() {
            return Err(Error::Invalid("exec needs a command".into()));
        }
        if self.driver.state(&m.id) != ProcState::Running {
            return Err(Error::Conflict(format!(
                "machine {} is not running; start it first",
                m.id
            )));
        }
        // The app's own environment (the machine's, plus what the node adds).
        let env: Vec<String> = self
            .spec(&m)?
            .init
            .env
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let out = self.driver.exec(
            &m.id,
            &hangar_machine::Exec {
                argv: cmd,
                env: &env,
                user,
                stdin: stdin.as_bytes(),
            },
        )?;
        Ok(ExecOutput {
            exit_code: out.status.code().unwrap_or(128),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// `argv` on a new terminal in machine `m`, with the app's own
    /// environment (as `exec` has), as `user` or root.
    pub fn console(
        &self,
        m: &Machine,
        argv: &[String],
        user: Option<&str>,
        rows: u16,
        cols: u16,
    ) -> Result<hangar_machine::console::Console> {
        if self.driver.state(&m.id) != ProcState::Running {
            return Err(Error::Conflict(format!(
                "machine {} is not running; start it first",
                m.id
            )));
        }
        let env: Vec<String> = self
            .spec(m)?
            .init
            .env
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        Ok(self.driver.console(&m.id, argv, &env, user, rows, cols)?)
    }

    /// Bring the host in line with the state store, once.
    pub fn reconcile(self: &Arc<Self>) {
        let machines = match self.own_machines() {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("reconcile: {e}");
                return;
            }
        };
        // A machine that does not run holds disk only: its shim gives the
        // rest back when the app ends; this catches what a killed shim (or
        // an older node) left.
        let idle: Vec<&str> = machines
            .iter()
            .map(|m| m.id.as_str())
            .filter(|id| self.driver.state(id) != ProcState::Running)
            .collect();
        let leftovers = self.driver.holding_host_resources(&idle);
        self.remove_strays(&machines);
        for m in machines {
            let lock = self.lock(&m.id);
            let Ok(guard) = lock.try_lock() else {
                continue;
            };
            if leftovers.contains(&m.id) {
                // Checks again that it does not run, under the lock.
                self.driver.release(&m.id);
            }
            match self.apply(&m, reconcile_step(&m, self.driver.state(&m.id)), guard) {
                Ok(()) => {}
                Err(Error::Conflict(e)) => tracing::debug!(machine = %m.id, "reconcile: {e}"),
                Err(e) => tracing::warn!(machine = %m.id, "reconcile: {e}"),
            }
        }
    }

    /// Remove from the host the machines the store says are destroyed (or
    /// does not know): in a cluster, those replaced while this node was
    /// away.
    fn remove_strays(&self, own: &[Machine]) {
        for id in self.driver.machines() {
            if own.iter().any(|m| m.id == id) {
                continue;
            }
            let gone = match self.state.get(&id) {
                Ok(m) => m.state == MachineState::Destroyed,
                Err(Error::NotFound(_)) => true,
                Err(_) => false,
            };
            let lock = self.lock(&id);
            let Ok(_guard) = lock.try_lock() else {
                continue;
            };
            if gone {
                if self.driver.state(&id) == ProcState::Running {
                    let _ = self.driver.signal(&id, "SIGKILL");
                }
                match self.driver.destroy(&id) {
                    Ok(()) => {
                        tracing::info!(machine = %id, "removed from this host: it was destroyed (or replaced) while this node was away")
                    }
                    Err(e) => tracing::warn!(machine = %id, "removing a destroyed machine: {e}"),
                }
            }
        }
    }

    /// Carry out one reconcile step for `m`, holding its lock.
    fn apply(
        self: &Arc<Self>,
        m: &Machine,
        step: Step,
        guard: std::sync::MutexGuard<'_, ()>,
    ) -> Result<()> {
        match step {
            Step::Nothing => {}
            Step::FinishStop => {
                let (node, id) = (self.clone(), m.id.clone());
                let (signal, timeout) = m.config.kill();
                drop(guard);
                std::thread::spawn(move || {
                    if let Err(e) = node.stop(&id, &signal, timeout) {
                        tracing::warn!(machine = %id, "finishing a stop: {e}");
                    }
                });
            }
            Step::RecordStopped => {
                self.record_exit(&m.id)?;
                self.state.set_state(&m.id, MachineState::Stopped)?;
            }
            // The first write of a step is a compare-and-set against the row
            // it was decided on: if an operation changed the machine since
            // (a stop asked for meanwhile), the next tick decides again.
            Step::MarkStarted => {
                let started = MachineChange::State(MachineState::Started);
                self.state
                    .update_machine(&m.id, Expect::Revision(m.revision), started)?;
            }
            Step::Exited {
                exit,
                restart,
                destroy,
            } => {
                let ended = MachineChange::Exit {
                    code: Some(exit.code),
                    oom: exit.oom,
                };
                self.state
                    .update_machine(&m.id, Expect::Revision(m.revision), ended)?;
                self.state.event(
                    &m.id,
                    "exited",
                    serde_json::json!({"exit_code": exit.code, "oom_killed": exit.oom}),
                )?;
                if restart {
                    let count = MachineChange::Restarts(m.restarts + 1);
                    self.state.update_machine(&m.id, Expect::Any, count)?;
                    self.start_locked(&m.id)?;
                    self.state.event(
                        &m.id,
                        "restarted",
                        serde_json::json!({"by": "policy", "count": m.restarts + 1}),
                    )?;
                } else {
                    self.state.set_desired(&m.id, Desired::Stopped)?;
                    self.state.set_state(&m.id, MachineState::Stopped)?;
                    if destroy {
                        drop(guard);
                        self.destroy(&m.id, true)?;
                    }
                }
            }
            Step::Adopt => {
                self.start_locked(&m.id)?;
                self.state
                    .event(&m.id, "restarted", serde_json::json!({"by": "adoption"}))?;
            }
        }
        Ok(())
    }

    /// Stop every machine (for `hangar up --stop-machines`, `hangar node stop`).
    /// Each with its own kill signal and timeout; returns how many ran.
    pub fn stop_all(&self) -> usize {
        let mut stopped = 0;
        for m in self.own_machines().unwrap_or_default() {
            if self.driver.state(&m.id) == ProcState::Running {
                let (signal, timeout) = m.config.kill();
                if let Err(e) = self.stop(&m.id, &signal, timeout) {
                    tracing::warn!(machine = %m.id, "stopping: {e}");
                }
                stopped += 1;
            }
        }
        stopped
    }
}

#[cfg(test)]
pub(crate) mod tests;
