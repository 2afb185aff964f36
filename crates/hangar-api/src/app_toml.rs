//! `hangar.toml`, the file an app is described by (in the spirit of
//! fly.toml), read strictly (unknown keys are errors with file and line),
//! and turned into the node's deploy request: the machine config template,
//! the count and the strategy.
//!
//! It owns the file format and its defaults; it does not build, push or
//! deploy (the CLI and the node do).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};

use crate::config::{
    Check, DriverKind, EdgeCache, Guest, MachineConfig, Restart, RestartPolicy, Service,
};
use crate::deploy::{DeployRequest, Strategy};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AppToml {
    pub app: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kill_signal: Option<String>,
    /// The user the app runs as (`name`, `uid`, `name:group`, `uid:gid`),
    /// looked up in the image; default: the image's, else root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "opt_seconds"
    )]
    pub kill_timeout: Option<u64>,
    #[serde(default)]
    pub build: Build,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_service: Option<HttpService>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<Cache>,
    /// `[metrics]`, or several `[[metrics]]`.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "crate::config::one_or_many"
    )]
    pub metrics: Vec<Metrics>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vm: Vec<Vm>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deploy: Option<Deploy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<RestartSection>,
    /// What `hangar console` runs in its machine (default: the image's
    /// shell).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console_command: Option<String>,
    /// `[alerts]`: rules the node's Prometheus evaluates, and the webhook
    /// firing alerts are posted to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alerts: Option<Alerts>,
    /// Dashboard files (Grafana JSON, relative to hangar.toml) shown
    /// beside the shipped one by `hangar dashboard`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dashboards: Vec<String>,
    /// fly.toml's process groups: read only to say they are not supported.
    #[serde(default, skip_serializing)]
    pub processes: Option<toml::Value>,
}

/// `[alerts]`: `webhook`, and `[[alerts.rules]]` in Prometheus's fields
/// (`alert`, `expr`, `for`, `labels`, `annotations`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Alerts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<crate::observe::AlertRule>,
}

/// Where the image comes from: `image`, or a directory to build.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Build {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// A directory (relative to hangar.toml) whose files become the top layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
    /// The image the directory is layered on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpService {
    pub internal_port: u16,
    #[serde(default)]
    pub force_https: bool,
    /// fly.toml's `true`/`false` mean `stop`/`off`.
    #[serde(default, deserialize_with = "stop_mode")]
    pub auto_stop_machines: AutoStop,
    #[serde(default)]
    pub auto_start_machines: bool,
    #[serde(default)]
    pub min_machines_running: u32,
    /// How long without requests before a machine stops (with `stop`).
    #[serde(default = "five_minutes", deserialize_with = "seconds")]
    pub idle_timeout: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<Concurrency>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<HttpCheck>,
    /// `[http_service.rate_limit]`: per_app, per_client (requests per
    /// second) and their bursts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<crate::config::RateLimit>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Concurrency {
    #[serde(default = "requests", rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub soft_limit: u32,
    #[serde(default)]
    pub hard_limit: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpCheck {
    #[serde(default = "slash")]
    pub path: String,
    #[serde(default = "ten", deserialize_with = "seconds_f")]
    pub interval: f64,
    #[serde(default = "two", deserialize_with = "seconds_f")]
    pub timeout: f64,
    #[serde(default = "one", deserialize_with = "seconds_f")]
    pub grace_period: f64,
    #[serde(default = "get")]
    pub method: String,
}

/// The app's edge cache policy.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Cache {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default, deserialize_with = "seconds")]
    pub default_ttl: u64,
    /// The shield region (see the edge's `cache.shield`).
    #[serde(default)]
    pub shield: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    pub port: u16,
    #[serde(default = "metrics_path")]
    pub path: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    #[serde(default = "one_cpu")]
    pub cpus: u32,
    /// MB, or text like "512mb" / "1gb".
    #[serde(default = "memory_default", deserialize_with = "megabytes")]
    pub memory: u64,
    #[serde(default)]
    pub driver: DriverKind,
    /// fly.toml's `shared` or `performance`: accepted, and the same here
    /// (a machine's `cpus` are a quota of the node's CPUs either way).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_kind: Option<String>,
    /// fly.toml's other spelling of `memory` (MB); it wins when both are given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    /// The root filesystem's size (the machines' `rootfs.size_gb`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs_size_gb: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Deploy {
    #[serde(default)]
    pub strategy: Strategy,
    #[serde(default)]
    pub max_unavailable: u32,
    /// `[deploy.guard]`: `enabled`, `window` (seconds), `min_requests`,
    /// `error_margin`, `latency_factor`, `latency_margin_ms`.
    #[serde(default)]
    pub guard: crate::deploy::guard::GuardSettings,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RestartSection {
    pub policy: RestartPolicy,
    #[serde(default = "three")]
    pub retries: u32,
}

crate::closed_set! {
    /// What happens to an app's machines with no requests for `idle_timeout`.
    #[derive(Default)]
    pub enum AutoStop {
        /// They keep running.
        #[default]
        Off,
        /// They stop (and start again on a request, with `auto_start_machines`).
        Stop,
        /// fly.toml's suspend: refused with a way out, as machines cannot be
        /// suspended here.
        Suspend,
    }
}
fn requests() -> String {
    "requests".into()
}
fn slash() -> String {
    "/".into()
}
fn get() -> String {
    "GET".into()
}
fn metrics_path() -> String {
    "/metrics".into()
}
fn five_minutes() -> u64 {
    300
}
fn ten() -> f64 {
    10.0
}
fn two() -> f64 {
    2.0
}
fn one() -> f64 {
    1.0
}
fn one_cpu() -> u32 {
    1
}
fn three() -> u32 {
    3
}
fn yes() -> bool {
    true
}
fn memory_default() -> u64 {
    256
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NumOrText {
    Num(f64),
    Text(String),
}

/// A duration of Hangar's grammar (`"10s"`, `"500ms"`, `"1.5s"`, `"5m"`).
pub fn parse_duration(text: &str) -> Option<std::time::Duration> {
    fundu::DurationParser::new()
        .parse(text.trim())
        .ok()
        .and_then(|d| std::time::Duration::try_from(d).ok())
}

/// Seconds from `10`, `"10s"`, `"500ms"`, `"1.5s"`, `"5m"`, `"1h"`: the
/// grammar of every duration in Hangar (the `fundu` crate's).
fn parse_seconds(v: NumOrText) -> Result<f64, String> {
    match v {
        NumOrText::Num(n) if n >= 0.0 && n.is_finite() => Ok(n),
        NumOrText::Num(n) => Err(format!("{n} is not a duration of 0 seconds or more")),
        NumOrText::Text(t) => parse_duration(&t)
            .map(|d| d.as_secs_f64())
            .ok_or_else(|| format!("{t:?} is not a duration (e.g. \"10s\", \"500ms\", \"5m\")")),
    }
}

fn seconds_f<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    parse_seconds(NumOrText::deserialize(d)?).map_err(serde::de::Error::custom)
}

/// `auto_stop_machines`: `"off"`/`"stop"`, or fly.toml's booleans.
fn stop_mode<'de, D: Deserializer<'de>>(d: D) -> Result<AutoStop, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Mode {
        Bool(bool),
        Text(String),
    }
    match Mode::deserialize(d)? {
        Mode::Bool(true) => Ok(AutoStop::Stop),
        Mode::Bool(false) => Ok(AutoStop::Off),
        Mode::Text(t) => t.parse().map_err(|_| {
            serde::de::Error::custom(format!(
                "auto_stop_machines {t:?} must be \"off\", \"stop\", true or false"
            ))
        }),
    }
}

fn seconds<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    seconds_f(d).map(|s| s.round() as u64)
}

fn opt_seconds<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    seconds(d).map(Some)
}

/// MB from `512`, or a size: `"512mb"`, `"1gb"`, `"1GiB"` (binary, as
/// every size in Hangar; see `parse-size`).
fn megabytes<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match NumOrText::deserialize(d)? {
        NumOrText::Num(n) if n >= 0.0 => Ok(n as u64),
        NumOrText::Num(n) => Err(serde::de::Error::custom(format!("memory {n} is negative"))),
        NumOrText::Text(t) => parse_size::Config::new()
            .with_binary()
            .parse_size(t.trim())
            .map(|bytes| bytes >> 20)
            .map_err(|_| {
                serde::de::Error::custom(format!(
                    "{t:?} is not a memory size (e.g. 512, \"512mb\", \"1gb\")"
                ))
            }),
    }
}

/// The name of the file, in the app's directory.
pub const FILE: &str = "hangar.toml";

impl AppToml {
    pub fn load(path: &Path) -> Result<AppToml, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.into(),
            source,
        })?;
        let m = AppToml::parse(&text).map_err(|(line, message)| Error::Parse {
            path: path.into(),
            line,
            message,
        })?;
        m.validate().map_err(|message| Error::Invalid {
            path: path.into(),
            message,
        })?;
        Ok(m)
    }

    /// Parse TOML; an error is (line, message).
    pub fn parse(text: &str) -> Result<AppToml, (usize, String)> {
        toml::from_str::<AppToml>(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start].matches('\n').count() + 1)
                .unwrap_or(1);
            (line, e.message().to_string())
        })
    }

    pub fn validate(&self) -> Result<(), String> {
        crate::apps::valid_name(&self.app).map_err(|e| e.to_string())?;
        if self.build.image.is_some() == self.build.dir.is_some() {
            return Err("[build] needs exactly one of image = \"...\" or dir = \"...\"".into());
        }
        if self.processes.is_some() {
            return Err("[processes] (process groups) is not supported: an app here runs one process; give its command as [build] cmd, or make each group its own app".into());
        }
        if let Some(vm) = self.vm.first() {
            if let Some(kind) = &vm.cpu_kind {
                if !["shared", "performance"].contains(&kind.as_str()) {
                    return Err(format!(
                        "[[vm]] cpu_kind {kind:?} must be \"shared\" or \"performance\" (both mean the same here)"
                    ));
                }
            }
        }
        if let Some(s) = &self.http_service {
            if s.auto_stop_machines == AutoStop::Suspend {
                return Err("[http_service] auto_stop_machines = \"suspend\" is not supported (machines cannot be suspended here); use \"stop\" (or true)".into());
            }
            for c in &s.checks {
                if c.method != "GET" || !c.path.starts_with('/') {
                    return Err(format!("[[http_service.checks]] path {:?}: checks are GET requests to a path starting with /", c.path));
                }
            }
        }
        Ok(())
    }

    /// The file's text: what `hangar launch` writes.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }

    /// The machine config template of a release of `image`.
    pub fn machine_config(&self, image: &str) -> MachineConfig {
        let mut c = MachineConfig {
            image: image.to_string(),
            env: self.env.clone(),
            ..Default::default()
        };
        if let Some(vm) = self.vm.first() {
            c.guest = Guest {
                cpus: vm.cpus,
                memory_mb: vm.memory_mb.unwrap_or(vm.memory),
                driver: vm.driver,
            };
            if let Some(gb) = vm.rootfs_size_gb {
                c.rootfs.size_gb = gb;
            }
        }
        if let Some(r) = &self.restart {
            c.restart = Restart {
                policy: r.policy,
                max_retries: r.retries,
            };
        }
        c.kill_signal = self.kill_signal.clone();
        c.kill_timeout = self.kill_timeout;
        c.init.user = self.user.clone();
        if let Some(s) = &self.http_service {
            c.services.push(Service {
                internal_port: s.internal_port,
                protocol: "tcp".into(),
                autostop: s.auto_stop_machines == AutoStop::Stop,
                autostart: s.auto_start_machines,
                min_machines_running: s.min_machines_running,
                idle_timeout: s.idle_timeout,
                soft_limit: s.concurrency.as_ref().map(|c| c.soft_limit).unwrap_or(0),
                hard_limit: s.concurrency.as_ref().map(|c| c.hard_limit).unwrap_or(0),
                force_https: s.force_https,
                rate_limit: s.rate_limit.clone(),
                cache: self.cache.as_ref().map(|c| EdgeCache {
                    enabled: c.enabled,
                    default_ttl: c.default_ttl,
                    shield: c.shield.clone(),
                }),
            });
            for (i, check) in s.checks.iter().enumerate() {
                c.checks.insert(
                    format!("http-{i}"),
                    Check {
                        port: s.internal_port,
                        path: check.path.clone(),
                        interval: check.interval,
                        timeout: check.timeout,
                        grace_period: check.grace_period,
                    },
                );
            }
        }
        if let Some(region) = &self.primary_region {
            c.metadata.insert("region".into(), region.clone());
        }
        c.metrics = self
            .metrics
            .iter()
            .map(|m| crate::config::Metrics {
                port: m.port,
                path: m.path.clone(),
            })
            .collect();
        c
    }

    /// The deploy request for `image`; `count` overrides the machine count.
    pub fn deploy_request(
        &self,
        image: &str,
        count: Option<u32>,
        description: &str,
    ) -> DeployRequest {
        let d = self.deploy.clone().unwrap_or(Deploy {
            strategy: Strategy::Rolling,
            max_unavailable: 0,
            guard: Default::default(),
        });
        DeployRequest {
            image: image.to_string(),
            config: self.machine_config(image),
            count,
            strategy: d.strategy,
            max_unavailable: d.max_unavailable,
            description: description.to_string(),
            primary_region: self.primary_region.clone(),
            guard: d.guard,
            observe: crate::observe::Observe {
                rules: self.alerts.clone().unwrap_or_default().rules,
                webhook: self.alerts.as_ref().and_then(|a| a.webhook.clone()),
                dashboards: Vec::new(),
            },
        }
    }

    /// The contents of the `dashboards` files, read relative to `dir`
    /// (hangar.toml's directory).
    pub fn dashboard_files(
        &self,
        dir: &std::path::Path,
    ) -> std::result::Result<Vec<String>, String> {
        self.dashboards
            .iter()
            .map(|f| {
                let path = dir.join(f);
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| format!("dashboards: cannot read {}: {e}", path.display()))?;
                hangar_metrics::dashboard::parse(&text)
                    .map_err(|e| format!("dashboards: {}: {e}", path.display()))?;
                Ok(text)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fly_toml_forms_are_read_where_they_mean_the_same() {
        let base = "app = \"a\"\n[build]\nimage = \"x/y\"\n";
        let with = |extra: &str| {
            AppToml::parse(&format!("{base}{extra}"))
                .map_err(|e| e.1)
                .and_then(|m| m.validate().map(|()| m))
        };
        let stop = |v: &str| {
            with(&format!(
                "[http_service]\ninternal_port = 80\nauto_stop_machines = {v}\n"
            ))
            .map(|m| m.http_service.unwrap().auto_stop_machines)
        };
        assert_eq!(stop("true").unwrap(), AutoStop::Stop);
        assert_eq!(stop("false").unwrap(), AutoStop::Off);
        assert_eq!(stop("\"stop\"").unwrap(), AutoStop::Stop);
        let e = stop("\"suspend\"").unwrap_err();
        assert!(e.contains("suspend") && e.contains("use \"stop\""), "{e}");
        let user = AppToml::parse(&format!("user = \"app\"\n{base}")).unwrap();
        assert_eq!(user.machine_config("x/y").init.user.as_deref(), Some("app"));
        let vm = with("[[vm]]\ncpu_kind = \"shared\"\ncpus = 1\n").unwrap();
        assert_eq!(vm.vm[0].cpu_kind.as_deref(), Some("shared"));
        let sized =
            with("[[vm]]\nmemory = \"1gb\"\nmemory_mb = 512\nrootfs_size_gb = 2\n").unwrap();
        let c = sized.machine_config("x/y");
        assert_eq!((c.guest.memory_mb, c.rootfs.size_gb), (512, 2));
        for (text, mb) in [
            ("512", 512),
            ("\"512mb\"", 512),
            ("\"512m\"", 512),
            ("\"2GiB\"", 2048),
            ("\"1gb\"", 1024),
        ] {
            let c = with(&format!("[[vm]]\nmemory = {text}\n"))
                .unwrap()
                .machine_config("x/y");
            assert_eq!(c.guest.memory_mb, mb, "{text}");
        }
        for (text, seconds) in [
            ("\"1.5s\"", 1.5),
            ("\"500ms\"", 0.5),
            ("\"2m\"", 120.0),
            ("3", 3.0),
        ] {
            let m = with(&format!(
                "[http_service]\ninternal_port = 80\n[[http_service.checks]]\ninterval = {text}\n"
            ))
            .unwrap();
            assert_eq!(
                m.http_service.unwrap().checks[0].interval,
                seconds,
                "{text}"
            );
        }
        let e = with("[[vm]]\ncpu_kind = \"gpu\"\n").unwrap_err();
        assert!(e.contains("cpu_kind") && e.contains("performance"), "{e}");
        let e = with("[processes]\napp = \"run\"\nworker = \"work\"\n").unwrap_err();
        assert!(
            e.contains("[processes]") && e.contains("[build] cmd"),
            "{e}"
        );
    }

    const FULL: &str = r#"
app = "hello"
primary_region = "local"
kill_signal = "SIGINT"
kill_timeout = "5s"

[build]
dir = "."
base = "busybox"
cmd = ["/bin/httpd", "-f", "-p", "8080"]

[env]
GREETING = "hi"

[http_service]
internal_port = 8080
auto_stop_machines = "stop"
auto_start_machines = true
min_machines_running = 0
idle_timeout = "2m"
[http_service.rate_limit]
per_client = 10
per_app = 500
[http_service.concurrency]
soft_limit = 20
hard_limit = 25
[[http_service.checks]]
path = "/healthz"
interval = "500ms"
timeout = "1s"
grace_period = "2s"

[cache]
default_ttl = "30s"
shield = "fra"

[metrics]
port = 9091

[[vm]]
cpus = 2
memory = "1gb"

[deploy]
strategy = "bluegreen"

[restart]
policy = "always"
"#;

    #[test]
    fn a_full_file_becomes_a_machine_config() {
        let m = AppToml::parse(FULL).unwrap();
        m.validate().unwrap();
        let c = m.machine_config("localhost:5000/personal/hello:1");
        assert_eq!(c.guest.memory_mb, 1024);
        assert_eq!(c.kill_timeout, Some(5));
        assert_eq!(c.services[0].idle_timeout, 120);
        assert!(c.services[0].autostop && c.services[0].autostart);
        assert_eq!(c.services[0].soft_limit, 20);
        assert_eq!(c.services[0].hard_limit, 25);
        let rl = c.services[0].rate_limit.clone().unwrap();
        assert_eq!(
            (rl.per_client, rl.per_app, rl.per_client_burst),
            (10, 500, 0)
        );
        assert_eq!(c.checks["http-0"].interval, 0.5);
        assert_eq!(c.checks["http-0"].path, "/healthz");
        assert_eq!(c.env["GREETING"], "hi");
        assert_eq!(c.restart.policy, RestartPolicy::Always);
        assert_eq!(
            c.services[0].cache,
            Some(EdgeCache {
                enabled: true,
                default_ttl: 30,
                shield: Some("fra".into()),
            })
        );
        assert_eq!(c.metrics.iter().map(|m| m.port).collect::<Vec<_>>(), [9091]);
        c.validate().unwrap();
        assert_eq!(
            m.deploy_request("x", None, "").strategy,
            Strategy::Bluegreen
        );
        // What launch writes reads back the same.
        assert_eq!(AppToml::parse(&m.to_toml()).unwrap(), m);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_line() {
        let (line, msg) = AppToml::parse("app = \"a\"\n[build]\nimage = \"x\"\n[http_service]\ninternal_port = 80\nauto_stop = \"stop\"\n").unwrap_err();
        assert_eq!(line, 6, "{msg}");
        assert!(msg.contains("auto_stop"), "{msg}");
        let (line, msg) = AppToml::parse("app = \"a\"\n\n[[vm]]\nmemory = \"lots\"\n").unwrap_err();
        assert_eq!(line, 4);
        assert!(msg.contains("memory size"), "{msg}");
        let (line, msg) = AppToml::parse(
            "app = \"a\"\n[build]\nimage = \"x\"\n[[vm]]\ndriver = \"firecracker\"\n",
        )
        .unwrap_err();
        assert_eq!(line, 5);
        assert!(msg.contains("`container` or `vm`"), "{msg}");
        for (key, value, options) in [
            (
                "[deploy]\nstrategy",
                "canary",
                "`rolling`, `bluegreen`, `immediate`",
            ),
            (
                "[restart]\npolicy",
                "sometimes",
                "`no`, `on-failure`, `always`",
            ),
            (
                "[http_service]\ninternal_port = 80\nauto_stop_machines",
                "nap",
                "\"off\", \"stop\"",
            ),
        ] {
            let (_, msg) = AppToml::parse(&format!(
                "app = \"a\"\n[build]\nimage = \"x\"\n{key} = \"{value}\"\n"
            ))
            .unwrap_err();
            assert!(msg.contains(value) && msg.contains(options), "{key}: {msg}");
        }
        let m = AppToml::parse("app = \"Bad App\"\n[build]\nimage = \"x\"\n").unwrap();
        assert!(m.validate().is_err());
        let m = AppToml::parse("app = \"a\"\n").unwrap();
        assert!(m.validate().unwrap_err().contains("[build]"));
    }
}
