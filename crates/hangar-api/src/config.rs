//! The machine config of the Machines API, shaped like Fly's.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

crate::closed_set! {
    /// How a machine is isolated.
    #[derive(Default)]
    pub enum DriverKind {
        /// A runc container.
        #[default]
        Container,
        /// A QEMU micro-VM with hangar-init as its init.
        Vm,
    }
}

crate::closed_set! {
    /// What happens when a machine's app exits on its own.
    #[derive(Default)]
    pub enum RestartPolicy {
        /// It stays stopped.
        No,
        /// Started again after a non-zero exit, up to `max_retries` times.
        #[default]
        OnFailure,
        /// Started again after every exit.
        Always,
    }
}

crate::closed_set! {
    /// What the egress proxy does with a machine's requests to hosts outside
    /// its `allowed_domains` (Smokescreen's actions).
    #[derive(Default)]
    pub enum EgressAction {
        /// Allowed.
        #[default]
        Open,
        /// Allowed, and logged as a would-be denial.
        Report,
        /// Denied.
        Enforce,
    }
}

crate::closed_set! {
    /// What a machine of an app is for.
    #[derive(Default)]
    pub enum MachineRole {
        /// It serves the app: deploys replace it, scaling counts it.
        #[default]
        App,
        /// A `hangar console` session's: deploys and scaling leave it be.
        Console,
    }
}

fn is_app(r: &MachineRole) -> bool {
    *r == MachineRole::App
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MachineConfig {
    /// What it is for (default: the app).
    #[serde(skip_serializing_if = "is_app")]
    pub role: MachineRole,
    pub image: String,
    pub env: BTreeMap<String, String>,
    pub init: Init,
    pub guest: Guest,
    /// The root filesystem (Fly's `rootfs`).
    pub rootfs: Rootfs,
    pub restart: Restart,
    pub services: Vec<Service>,
    /// The user's own labels; the node reads none of them.
    pub metadata: BTreeMap<String, String>,
    pub auto_destroy: bool,
    /// What the node's egress proxy lets this machine reach.
    pub egress: Egress,
    /// Health checks by name; a machine serves traffic and counts as
    /// deployed only while they all pass.
    pub checks: BTreeMap<String, Check>,
    /// How the machine is stopped: the signal, then SIGKILL after the
    /// timeout (seconds).
    pub kill_signal: Option<String>,
    pub kill_timeout: Option<u64>,
    /// Where the app serves Prometheus metrics (fly.toml's `[metrics]`;
    /// one table or several): each is scraped on every started machine.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "one_or_many"
    )]
    pub metrics: Vec<Metrics>,
}

/// A list written as one value or as a list (`[metrics]` or
/// `[[metrics]]`; Fly's machine config has one object).
pub fn one_or_many<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany<T> {
        Many(Vec<T>),
        One(T),
    }
    Ok(match Option::<OneOrMany<T>>::deserialize(d)? {
        None => Vec::new(),
        Some(OneOrMany::One(t)) => vec![t],
        Some(OneOrMany::Many(v)) => v,
    })
}

/// An app's Prometheus endpoint inside its machines.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    pub port: u16,
    pub path: String,
}

/// An HTTP health check: `GET path` on the machine's `port`, 2xx or 3xx
/// within `timeout` passes. Durations in seconds.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Check {
    pub port: u16,
    pub path: String,
    pub interval: f64,
    pub timeout: f64,
    /// Failures before this long after the start do not count.
    pub grace_period: f64,
}

impl Check {
    /// How often, how long one may take, and how long after a start
    /// failures do not count (`validate` bounds all three).
    pub fn interval(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.interval)
    }
    pub fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.timeout)
    }
    pub fn grace_period(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.grace_period)
    }
}

impl Default for Check {
    fn default() -> Self {
        Check {
            port: 8080,
            path: "/".into(),
            interval: 10.0,
            timeout: 2.0,
            grace_period: 1.0,
        }
    }
}

/// A machine's egress policy (Smokescreen's rule fields). The IP policy
/// (no private, loopback or metadata addresses) applies whatever this says.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Egress {
    pub action: EgressAction,
    pub allowed_domains: Vec<String>,
}

impl Default for Egress {
    fn default() -> Self {
        Egress {
            action: EgressAction::Open,
            allowed_domains: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Init {
    pub exec: Option<Vec<String>>,
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub user: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Guest {
    pub cpus: u32,
    pub memory_mb: u64,
    pub driver: DriverKind,
}

impl Default for Guest {
    fn default() -> Self {
        Guest {
            cpus: 1,
            memory_mb: 256,
            driver: DriverKind::Container,
        }
    }
}

/// The size of a machine's root filesystem: what the image does not hold
/// and the app writes must fit in it, and a machine that fills it sees
/// "No space left on device" (the host's disk is not touched).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Rootfs {
    pub size_gb: u64,
}

/// Fly's default root filesystem size.
pub const DEFAULT_ROOTFS_GB: u64 = 8;

impl Default for Rootfs {
    fn default() -> Self {
        Rootfs {
            size_gb: DEFAULT_ROOTFS_GB,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Restart {
    pub policy: RestartPolicy,
    pub max_retries: u32,
}

impl Default for Restart {
    fn default() -> Self {
        Restart {
            policy: RestartPolicy::OnFailure,
            max_retries: 3,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Service {
    pub internal_port: u16,
    pub protocol: String,
    /// Stop this machine after `idle_timeout` seconds without requests
    /// (keeping `min_machines_running` of the app started).
    pub autostop: bool,
    /// Start a stopped machine when a request finds none started.
    pub autostart: bool,
    pub min_machines_running: u32,
    pub idle_timeout: u64,
    /// Requests in flight above which the edge prefers other machines and
    /// starts another stopped one (0: no limit).
    pub soft_limit: u32,
    /// Requests in flight a machine takes at most (0: no limit).
    pub hard_limit: u32,
    /// The edge answers plain HTTP with a redirect to HTTPS.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub force_https: bool,
    /// The edge's cache for this app's host (default: on, with the edge's
    /// default TTL).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<EdgeCache>,
    /// Requests per second the edge lets through (see [`RateLimit`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

/// The edge's rate limits for an app, in requests per second (0: none):
/// the app's, shared by a region's edges, and each client address's;
/// past them a 429 with `Retry-After`. Bursts default to one second's.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimit {
    pub per_app: u32,
    pub per_app_burst: u32,
    pub per_client: u32,
    pub per_client_burst: u32,
}

/// The edge's cache policy for an app's host.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EdgeCache {
    pub enabled: bool,
    /// Seconds a response without freshness headers stays fresh.
    #[serde(default)]
    pub default_ttl: u64,
    /// In a cluster, the region whose edges alone ask the app's machines:
    /// the other regions' misses go through it.
    #[serde(default)]
    pub shield: Option<String>,
}

impl MachineConfig {
    /// How to stop it: the kill signal (SIGTERM by default), and how long
    /// to wait before SIGKILL (5 s by default).
    pub fn kill(&self) -> (String, std::time::Duration) {
        let signal = self.kill_signal.clone().unwrap_or_else(|| "SIGTERM".into());
        (
            signal,
            std::time::Duration::from_secs(self.kill_timeout.unwrap_or(5)),
        )
    }

    /// What the machine's host gets: its cgroup and disk limits.
    pub fn limits(&self) -> hangar_machine::bundle::Limits {
        hangar_machine::bundle::Limits {
            cpus: self.guest.cpus,
            memory_mb: self.guest.memory_mb,
            pids: 4096,
            disk_mb: self.rootfs.size_gb.saturating_mul(1024),
        }
    }

    /// Check what the API cannot accept, with a message that says what to fix.
    pub fn validate(&self) -> Result<()> {
        // Every duration a request can name is bounded, so deadlines made
        // from them can never overflow.
        if self.image.is_empty() {
            return Err(Error::Invalid("config.image is required".into()));
        }
        self.image
            .parse::<hangar_oci::Reference>()
            .map_err(|e| Error::Invalid(format!("config.image: {e}")))?;
        let (host_cpus, host_mb) = host_capacity();
        if self.guest.cpus == 0 || self.guest.cpus > host_cpus {
            return Err(Error::Invalid(format!(
                "config.guest.cpus {} must be 1 to {host_cpus} (the CPUs of this node)",
                self.guest.cpus
            )));
        }
        if self.guest.memory_mb > host_mb {
            return Err(Error::Invalid(format!(
                "config.guest.memory_mb {} is more than this node has ({host_mb} MB); ask for at most that",
                self.guest.memory_mb
            )));
        }
        if self.rootfs.size_gb == 0 || self.rootfs.size_gb > MAX_ROOTFS_GB {
            return Err(Error::Invalid(format!(
                "config.rootfs.size_gb {} must be 1 to {MAX_ROOTFS_GB}",
                self.rootfs.size_gb
            )));
        }
        for (i, m) in self.metrics.iter().enumerate() {
            if m.port == 0 || !m.path.starts_with('/') || m.path.len() > 1024 {
                return Err(Error::Invalid(format!(
                    "config.metrics[{i}]: port {} and path {:?}: give a port from 1 to 65535 and a path that starts with /",
                    m.port, m.path
                )));
            }
        }
        if self.kill_timeout.is_some_and(|t| t > MAX_SECONDS) {
            return Err(Error::Invalid(format!(
                "config.kill_timeout must be at most {MAX_SECONDS} seconds"
            )));
        }
        for s in &self.services {
            if s.cache.as_ref().is_some_and(|c| c.default_ttl > MAX_TTL) {
                return Err(Error::Invalid(format!(
                    "config.services cache.default_ttl must be at most {MAX_TTL} seconds (a year)"
                )));
            }
            if s.idle_timeout > MAX_SECONDS {
                return Err(Error::Invalid(format!(
                    "config.services idle_timeout must be at most {MAX_SECONDS} seconds"
                )));
            }
        }
        if self.guest.memory_mb < 16 {
            return Err(Error::Invalid(
                "config.guest.memory_mb must be at least 16".into(),
            ));
        }
        for (name, c) in &self.checks {
            let seconds = |x: f64| x.is_finite() && x > 0.0 && x <= MAX_SECONDS as f64;
            if !c.path.starts_with('/')
                || c.port == 0
                || !seconds(c.interval)
                || !seconds(c.timeout)
                || !(c.grace_period == 0.0 || seconds(c.grace_period))
            {
                return Err(Error::Invalid(format!(
                    "config.checks.{name}: path must start with /, port be set, interval and timeout be above 0 and grace_period at least 0, all at most {MAX_SECONDS} seconds"
                )));
            }
        }
        if let Some(exec) = &self.init.exec {
            if exec.is_empty() {
                return Err(Error::Invalid("config.init.exec must not be empty".into()));
            }
        }
        Ok(())
    }
}

/// The largest root filesystem a machine may ask for (GB); the node also
/// checks it against the disk that holds its machines.
pub const MAX_ROOTFS_GB: u64 = 16 * 1024;

/// The longest default TTL (seconds) an app's edge cache may have.
pub const MAX_TTL: u64 = 365 * 24 * 3600;

/// The longest duration (seconds) any timeout or interval may name.
pub const MAX_SECONDS: u64 = 3600;

/// This node's CPUs and memory (MB): what a machine may ask for at most.
pub fn host_capacity() -> (u32, u64) {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let mb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map(|kb| kb / 1024)
        .unwrap_or(u64::MAX);
    (cpus, mb)
}
