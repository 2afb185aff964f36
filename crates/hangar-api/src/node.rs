//! One node's control logic: machine lifecycle operations and the reconcile
//! loop that makes the host match the state store (restart policies,
//! adoption after a restart of `hangar up`, exits and OOM kills recorded).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hangar_init::InitConfig;
use hangar_machine::{MachineSpec, ProcState, Runtime};
use hangar_oci::Reference;

use crate::config::MachineConfig;
use crate::error::{Error, Result};
use crate::state::{Machine, State};

/// The port of the node's egress proxy on the bridge gateway.
pub const EGRESS_PORT: u16 = 4750;

pub struct Node {
    pub state: State,
    pub runtime: Runtime,
    pub checks: crate::checks::Checks,
    /// Opens app secrets for machines' environments.
    pub sealer: crate::apps::Sealer,
    /// Apps with a deploy or scale under way (one at a time per app).
    pub(crate) busy_apps: Mutex<std::collections::HashSet<String>>,
    hangar_exe: PathBuf,
    locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// See [`Node::on_leaving_service`].
    leaving: std::sync::RwLock<Option<LeavingHook>>,
}

type LeavingHook = Arc<dyn Fn(&Machine) + Send + Sync>;

/// Output of `exec`.
#[derive(Debug, serde::Serialize)]
pub struct ExecOutput {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
}

fn random_id() -> Result<String> {
    use std::io::Read;
    let mut buf = [0u8; 7];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|e| Error::Internal(format!("/dev/urandom: {e}")))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Reap a shim in the background when it exits (the machine state is in
/// its files; this only keeps zombies away).
fn reap(mut child: Child) {
    std::thread::spawn(move || {
        let _ = child.wait();
    });
}

impl Node {
    pub fn new(
        state: State,
        runtime: Runtime,
        hangar_exe: PathBuf,
        sealer: crate::apps::Sealer,
    ) -> Node {
        Node {
            state,
            runtime,
            checks: Default::default(),
            sealer,
            busy_apps: Default::default(),
            hangar_exe,
            locks: Mutex::new(HashMap::new()),
            leaving: Default::default(),
        }
    }

    /// Run `hook` whenever a running machine is taken out of service
    /// (wanted stopped or destroyed), after the state store says so and
    /// before the machine gets its signal: the edge drains it first (no new
    /// requests; those in flight may finish), so no request meets a machine
    /// on its way down.
    pub fn on_leaving_service(&self, hook: impl Fn(&Machine) + Send + Sync + 'static) {
        *self.leaving.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(hook));
    }

    fn leaving_service(&self, id: &str) {
        let hook = self
            .leaving
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let (Some(hook), Ok(m)) = (hook, self.state.get(id)) {
            hook(&m);
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
        if let Some(app) = c.metadata.get("app") {
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
                ..InitConfig::default()
            },
            limits: c.limits(),
            slot: m.slot,
            vm: c.guest.driver == "vm",
        })
    }

    /// `config.validate()`, and what this node can give: its root
    /// filesystem must fit on the disk that holds the machines.
    pub fn check_config(&self, config: &MachineConfig) -> Result<()> {
        config.validate()?;
        let disk_gb = self.runtime.disk_capacity_mb() / 1024;
        if config.rootfs.size_gb > disk_gb {
            return Err(Error::Invalid(format!(
                "config.rootfs.size_gb {} is more than the disk that holds this node's machines ({disk_gb} GB); ask for at most that",
                config.rootfs.size_gb
            )));
        }
        Ok(())
    }

    /// Create a machine from `config` (its image already in the store) and start it.
    pub fn create(&self, name: Option<String>, config: MachineConfig) -> Result<Machine> {
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
        let m = self.state.insert(&id, &name, &config)?;
        let lock = self.lock(&id);
        let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        let created = self
            .spec(&m)
            .and_then(|spec| Ok(self.runtime.create(&spec)?));
        match created {
            Ok(c) => self.state.event(&id, "created", serde_json::json!({"ipv4": c.addresses.v4.to_string(), "ipv6": c.addresses.v6.to_string(), "unpacked": c.unpacked}))?,
            Err(e) => {
                let _ = self.runtime.destroy(&id);
                self.state.set_state(&id, "failed")?;
                self.state.event(&id, "failed", serde_json::json!({"error": e.to_string()}))?;
                return Err(e);
            }
        }
        self.start_locked(&id)?;
        self.state.get(&id)
    }

    fn start_locked(&self, id: &str) -> Result<()> {
        let m = self.state.get(id)?;
        self.state.set_desired(id, "started")?;
        self.state.set_state(id, "starting")?;
        self.state.set_exit(id, None, false)?;
        let child = self.runtime.start(id, m.slot, &self.hangar_exe);
        match child {
            Ok(child) => {
                reap(child);
                self.state.set_state(id, "started")?;
                self.state.event(id, "started", serde_json::json!({}))?;
                Ok(())
            }
            Err(e) => {
                self.state.set_state(id, "failed")?;
                self.state
                    .event(id, "failed", serde_json::json!({"error": e.to_string()}))?;
                Err(e.into())
            }
        }
    }

    pub fn start(&self, id: &str) -> Result<Machine> {
        let m = self.state.get(id)?;
        let lock = self.lock(&m.id);
        let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        if self.runtime.state(&m.id) == ProcState::Running {
            return Err(Error::Conflict(format!(
                "machine {} is already running",
                m.id
            )));
        }
        self.start_locked(&m.id)?;
        self.state.get(&m.id)
    }

    fn stop_locked(&self, id: &str, signal: &str, timeout: Duration) -> Result<()> {
        self.state.set_desired(id, "stopped")?;
        if self.runtime.state(id) == ProcState::Running {
            self.leaving_service(id);
            self.state.set_state(id, "stopping")?;
            let _ = self.runtime.signal(id, signal);
            let deadline = Instant::now() + timeout;
            while self.runtime.state(id) == ProcState::Running && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if self.runtime.state(id) == ProcState::Running {
                let _ = self.runtime.signal(id, "SIGKILL");
                let deadline = Instant::now() + Duration::from_secs(10);
                while self.runtime.state(id) == ProcState::Running && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        self.record_exit(id)?;
        self.state.set_state(id, "stopped")?;
        Ok(())
    }

    fn record_exit(&self, id: &str) -> Result<()> {
        if let ProcState::Exited(exit) = self.runtime.state(id) {
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
        if self.runtime.state(&m.id) != ProcState::Running {
            return Err(Error::Conflict(format!("machine {} is not running", m.id)));
        }
        Ok(self.runtime.signal(&m.id, signal)?)
    }

    /// New config, then a restart onto it (a new root filesystem from the new image).
    pub fn update(&self, id: &str, config: MachineConfig) -> Result<Machine> {
        self.check_config(&config)?;
        let m = self.state.get(id)?;
        // A machine's addresses are in its org's network: it stays there.
        if self.state.net_for(&config)? != hangar_machine::network::net_of(m.slot) {
            return Err(Error::Invalid(format!(
                "machine {} cannot move to an app of another org (its network is its org's); create a machine in that app instead",
                m.id
            )));
        }
        let lock = self.lock(&m.id);
        let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        self.stop_locked(&m.id, "SIGTERM", Duration::from_secs(10))?;
        self.runtime.destroy(&m.id)?;
        self.state.set_config(&m.id, &config)?;
        let m = self.state.get(&m.id)?;
        self.runtime.create(&self.spec(&m)?)?;
        self.state
            .event(&m.id, "updated", serde_json::json!({"image": config.image}))?;
        self.start_locked(&m.id)?;
        self.state.get(&m.id)
    }

    pub fn destroy(&self, id: &str, force: bool) -> Result<Machine> {
        let m = self.state.get(id)?;
        let lock = self.lock(&m.id);
        let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        if self.runtime.state(&m.id) == ProcState::Running {
            if !force {
                return Err(Error::Conflict(format!(
                    "machine {} is running; stop it first, or destroy with force (`hangar machine destroy --force`)",
                    m.id
                )));
            }
            self.state.set_desired(&m.id, "destroyed")?;
            self.leaving_service(&m.id);
            let _ = self.runtime.signal(&m.id, "SIGKILL");
        }
        self.state.set_desired(&m.id, "destroyed")?;
        self.state.set_state(&m.id, "destroying")?;
        self.runtime.destroy(&m.id)?;
        self.state.mark_destroyed(&m.id)?;
        self.state
            .event(&m.id, "destroyed", serde_json::json!({}))?;
        // Its snapshots go once neither a machine nor a stored image needs them.
        let _ = self.runtime.gc_snapshots();
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
        if self.runtime.state(&m.id) != ProcState::Running {
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
        let user = user
            .map(|spec| {
                self.runtime
                    .user(&m.id, spec)
                    .map_err(|e| Error::Invalid(format!("exec user {spec:?}: {e}")))
            })
            .transpose()?;
        let out = self
            .runtime
            .exec(&m.id, cmd, &env, user.as_ref(), stdin.as_bytes())?;
        Ok(ExecOutput {
            exit_code: out.status.code().unwrap_or(128),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Bring the host in line with the state store, once.
    pub fn reconcile(self: &Arc<Self>) {
        let Ok(machines) = self.state.list() else {
            return;
        };
        // A machine that does not run holds disk only: its shim gives the
        // rest back when the app ends; this catches what a killed shim (or
        // an older node) left.
        let idle: Vec<&str> = machines
            .iter()
            .map(|m| m.id.as_str())
            .filter(|id| self.runtime.state(id) != ProcState::Running)
            .collect();
        let leftovers: Vec<String> = self
            .runtime
            .holding_host_resources(&idle)
            .into_iter()
            .map(String::from)
            .collect();
        for m in machines {
            let lock = self.lock(&m.id);
            let Ok(_guard) = lock.try_lock() else {
                continue;
            };
            if leftovers.contains(&m.id) {
                // Checks again that it does not run, under the lock.
                self.runtime.release(&m.id);
            }
            // Wanted stopped, with no stop under way (the lock is free), yet
            // not recorded as stopped: a stop the node did not finish (it
            // was killed in the middle). Finish it: in the background if
            // the machine still runs, else by recording how it ended.
            if m.desired == "stopped" && ["started", "stopping"].contains(&m.state.as_str()) {
                if self.runtime.state(&m.id) == ProcState::Running {
                    let (node, id) = (self.clone(), m.id.clone());
                    let (signal, timeout) = m.config.kill();
                    std::thread::spawn(move || {
                        let _ = node.stop(&id, &signal, timeout);
                    });
                } else {
                    let _ = self.record_exit(&m.id);
                    let _ = self.state.set_state(&m.id, "stopped");
                }
                continue;
            }
            if m.desired != "started" || m.state == "failed" {
                continue;
            }
            match self.runtime.state(&m.id) {
                ProcState::Running => {
                    if m.state != "started" {
                        let _ = self.state.set_state(&m.id, "started");
                    }
                }
                ProcState::Exited(exit) => {
                    if m.state != "started" {
                        continue;
                    }
                    let _ = self.state.set_exit(&m.id, Some(exit.code), exit.oom);
                    let _ = self.state.event(
                        &m.id,
                        "exited",
                        serde_json::json!({"exit_code": exit.code, "oom_killed": exit.oom}),
                    );
                    let policy = m.config.restart.policy.as_str();
                    let again = policy == "always"
                        || (policy == "on-failure"
                            && exit.code != 0
                            && m.restarts < m.config.restart.max_retries);
                    if again {
                        let _ = self.state.set_restarts(&m.id, m.restarts + 1);
                        if self.start_locked(&m.id).is_ok() {
                            let _ = self.state.event(
                                &m.id,
                                "restarted",
                                serde_json::json!({"by": "policy", "count": m.restarts + 1}),
                            );
                        }
                    } else {
                        let _ = self.state.set_desired(&m.id, "stopped");
                        let _ = self.state.set_state(&m.id, "stopped");
                        if m.config.auto_destroy {
                            drop(_guard);
                            let _ = self.destroy(&m.id, true);
                        }
                    }
                }
                ProcState::NotRunning => {
                    // Should run, and nothing runs or says how it ended
                    // (a host reboot, a killed shim): start it again.
                    if self.start_locked(&m.id).is_ok() {
                        let _ = self.state.event(
                            &m.id,
                            "restarted",
                            serde_json::json!({"by": "adoption"}),
                        );
                    }
                }
            }
        }
    }

    /// Stop every machine (for `hangar up --stop-machines`, `hangar node stop`).
    /// Each with its own kill signal and timeout; returns how many ran.
    pub fn stop_all(&self) -> usize {
        let mut stopped = 0;
        for m in self.state.list().unwrap_or_default() {
            if self.runtime.state(&m.id) == ProcState::Running {
                let (signal, timeout) = m.config.kill();
                let _ = self.stop(&m.id, &signal, timeout);
                stopped += 1;
            }
        }
        stopped
    }
}
