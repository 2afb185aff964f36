//! Debian's `prometheus`, run for the node: its configuration written
//! here, its data under the node's home, its targets read from the node's
//! HTTP service-discovery endpoint (so targets follow machines with no
//! reload), and the process started again when it exits.
//!
//! Prometheus is started under util-linux's `setpriv --pdeathsig KILL`, so
//! it ends with the node, even one killed with `kill -9`. Should one
//! outlive its node anyway, the next start finds it by its pid file and
//! stops it (Prometheus also locks its data directory, so two never share
//! it).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

/// How often targets are scraped and rules evaluated.
pub const SCRAPE_INTERVAL: Duration = Duration::from_secs(5);

/// The jobs the node's service discovery serves, by `?job=`.
pub const JOB_APPS: &str = "apps";
pub const JOB_HANGAR: &str = "hangar";
/// The cluster's other nodes: each one's own series (`node="<it>"`),
/// federated through its API, so a query on any node sees the cluster.
pub const JOB_FEDERATE: &str = "federate";
/// Where a node serves its own series for the others' Prometheus.
pub const FEDERATE_PATH: &str = "/v1/internal/metrics/federate";

/// Where to find the binary, where to keep things, where targets come
/// from.
#[derive(Clone, Debug)]
pub struct Settings {
    pub binary: PathBuf,
    /// Configuration, data, pid file, logs: all under here.
    pub dir: PathBuf,
    /// The node's service-discovery URL, without `?job=`.
    pub targets_url: String,
    /// The bearer token for it (and for the node's own metrics).
    pub token: String,
    /// Loopback port Prometheus listens on.
    pub port: u16,
    pub scrape_interval: Duration,
    /// How long samples are kept.
    pub retention: Duration,
    /// Where firing alerts go: the node's Alertmanager API
    /// (`http://127.0.0.1:4280/v1/internal/alertmanager`), with the token.
    pub alertmanager: Option<String>,
}

/// `prometheus` on `$PATH` (Debian's package installs `/usr/bin/prometheus`).
pub fn find() -> Option<PathBuf> {
    find_in_path("prometheus")
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A running Prometheus, stopped on drop.
pub struct Prometheus {
    url: String,
    stop: Arc<AtomicBool>,
    child: Arc<Mutex<Option<Child>>>,
}

impl Prometheus {
    /// Write the configuration and start Prometheus (again whenever it
    /// exits, until dropped).
    pub fn start(settings: Settings) -> Result<Prometheus, String> {
        let dir = &settings.dir;
        std::fs::create_dir_all(dir.join("data"))
            .and_then(|()| std::fs::create_dir_all(dir.join("rules")))
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        stop_stale(dir);
        write_private(&dir.join("token"), settings.token.as_bytes())?;
        let config = serde_yaml::to_string(&config(&settings))
            .map_err(|e| format!("cannot write Prometheus's configuration: {e}"))?;
        write_private(&dir.join("prometheus.yml"), config.as_bytes())?;
        let stop = Arc::new(AtomicBool::new(false));
        let child: Arc<Mutex<Option<Child>>> = Arc::default();
        let first = spawn(&settings)?;
        *child.lock().unwrap_or_else(|e| e.into_inner()) = Some(first);
        let url = format!("http://127.0.0.1:{}", settings.port);
        let (s, c) = (stop.clone(), child.clone());
        std::thread::Builder::new()
            .name("prometheus".into())
            .spawn(move || supervise(settings, s, c))
            .map_err(|e| format!("cannot start the thread that watches Prometheus: {e}"))?;
        Ok(Prometheus { url, stop, child })
    }

    /// Its HTTP API's base, such as `http://127.0.0.1:9090`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The loopback port it listens on.
    pub fn port(&self) -> u16 {
        self.url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(mut c) = self.child.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn supervise(settings: Settings, stop: Arc<AtomicBool>, child: Arc<Mutex<Option<Child>>>) {
    let mut backoff = Duration::from_millis(500);
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
        let mut guard = child.lock().unwrap_or_else(|e| e.into_inner());
        let exited = match guard.as_mut().map(Child::try_wait) {
            Some(Ok(Some(status))) => Some(status.to_string()),
            Some(Err(e)) => Some(e.to_string()),
            None => Some("not running".into()),
            Some(Ok(None)) => None,
        };
        let Some(why) = exited else {
            backoff = Duration::from_millis(500);
            continue;
        };
        if stop.load(Ordering::SeqCst) {
            return;
        }
        tracing::warn!(
            "Prometheus exited ({why}); starting it again in {backoff:?} (its log: {})",
            settings.dir.join("prometheus.log").display()
        );
        drop(guard);
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(30));
        match spawn(&settings) {
            Ok(c) => *child.lock().unwrap_or_else(|e| e.into_inner()) = Some(c),
            Err(e) => tracing::warn!("{e}"),
        }
    }
}

fn spawn(settings: &Settings) -> Result<Child, String> {
    let dir = &settings.dir;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("prometheus.log"))
        .map_err(|e| format!("cannot open {}: {e}", dir.join("prometheus.log").display()))?;
    let err = log
        .try_clone()
        .map_err(|e| format!("cannot open Prometheus's log: {e}"))?;
    // Prometheus dies with the node, even by `kill -9`: util-linux's
    // setpriv sets its parent-death signal (this thread lives as long as
    // the node does: the first start's caller, then the supervisor). A
    // node killed before setpriv set it is caught by the shell between
    // them: its parent is no longer the node, so it goes no further.
    let mut cmd = match find_in_path("setpriv") {
        Some(setpriv) => {
            let mut c = Command::new(setpriv);
            c.args([
                "--pdeathsig",
                "KILL",
                "--",
                "/bin/sh",
                "-c",
                r#"test "$PPID" = "$1" || exit 70; shift; exec "$@""#,
                "prometheus",
            ])
            .arg(std::process::id().to_string())
            .arg(&settings.binary);
            c
        }
        None => Command::new(&settings.binary),
    };
    let child = cmd
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!(
            "--storage.tsdb.retention.time={}s",
            settings.retention.as_secs()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{}", settings.port))
        .arg("--web.enable-lifecycle")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", settings.binary.display()))?;
    std::fs::write(dir.join("pid"), child.id().to_string())
        .map_err(|e| format!("cannot write Prometheus's pid file: {e}"))?;
    Ok(child)
}

/// Stop a Prometheus left running on `dir` by a node that was killed.
fn stop_stale(dir: &Path) {
    let Some(pid) = std::fs::read_to_string(dir.join("pid"))
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
    else {
        return;
    };
    let ours = std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmd| {
        let needle = format!("--config.file={}", dir.join("prometheus.yml").display());
        cmd.split(|b| *b == 0).any(|a| a == needle.as_bytes())
    });
    if ours {
        let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        for _ in 0..50 {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[derive(Serialize)]
struct Config {
    global: Global,
    rule_files: Vec<String>,
    scrape_configs: Vec<ScrapeConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    alerting: Option<Alerting>,
}

#[derive(Serialize)]
struct Alerting {
    alertmanagers: Vec<Alertmanager>,
}

#[derive(Serialize)]
struct Alertmanager {
    scheme: String,
    path_prefix: String,
    api_version: &'static str,
    authorization: Authorization,
    static_configs: Vec<StaticConfig>,
}

#[derive(Serialize)]
struct StaticConfig {
    targets: Vec<String>,
}

/// An alerting rule as Prometheus reads it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Rule {
    pub alert: String,
    pub expr: String,
    #[serde(rename = "for", skip_serializing_if = "Option::is_none")]
    pub for_: Option<String>,
    pub labels: std::collections::BTreeMap<String, String>,
    pub annotations: std::collections::BTreeMap<String, String>,
}

/// A group of rules (one per app).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RuleGroup {
    pub name: String,
    pub rules: Vec<Rule>,
}

#[derive(Serialize)]
struct RuleFile<'a> {
    groups: &'a [RuleGroup],
}

/// The file of `groups` under `dir/rules/`, written (atomically) only
/// when it changed; whether it did (then Prometheus must reload).
pub fn write_rules(dir: &Path, groups: &[RuleGroup]) -> Result<bool, String> {
    let text = serde_yaml::to_string(&RuleFile { groups })
        .map_err(|e| format!("cannot write the alert rules: {e}"))?;
    let path = dir.join("rules").join("hangar.yml");
    if std::fs::read_to_string(&path).is_ok_and(|old| old == text) {
        return Ok(false);
    }
    std::fs::create_dir_all(dir.join("rules"))
        .map_err(|e| format!("cannot create {}: {e}", dir.join("rules").display()))?;
    write_private(&path, text.as_bytes())?;
    Ok(true)
}

#[derive(Serialize)]
struct Global {
    scrape_interval: String,
    evaluation_interval: String,
}

#[derive(Serialize)]
struct ScrapeConfig {
    job_name: String,
    /// Apps' own labels never override the node's (`app`, `org`, ...:
    /// an app's are kept as `exported_<name>`); the node's own exposition
    /// is trusted to name each series' org.
    honor_labels: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics_path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    authorization: Option<Authorization>,
    http_sd_configs: Vec<HttpSd>,
}

#[derive(Serialize)]
struct HttpSd {
    url: String,
    refresh_interval: String,
    authorization: Authorization,
}

#[derive(Serialize)]
struct Authorization {
    /// Said, or Prometheus sends the bare token.
    #[serde(rename = "type")]
    kind: &'static str,
    credentials_file: String,
}

fn config(s: &Settings) -> Config {
    let every = format!("{}s", s.scrape_interval.as_secs().max(1));
    let auth = || Authorization {
        kind: "Bearer",
        credentials_file: s.dir.join("token").display().to_string(),
    };
    let job = |name: &str, honor: bool, scrape_auth: bool| ScrapeConfig {
        job_name: name.into(),
        honor_labels: honor,
        metrics_path: (name == JOB_FEDERATE).then(|| FEDERATE_PATH.to_string()),
        authorization: scrape_auth.then(auth),
        http_sd_configs: vec![HttpSd {
            url: format!("{}?job={name}", s.targets_url),
            refresh_interval: every.clone(),
            authorization: auth(),
        }],
    };
    Config {
        global: Global {
            scrape_interval: every.clone(),
            evaluation_interval: every.clone(),
        },
        rule_files: vec![s.dir.join("rules").join("*.yml").display().to_string()],
        scrape_configs: vec![
            job(JOB_APPS, false, false),
            job(JOB_HANGAR, true, true),
            job(JOB_FEDERATE, true, true),
        ],
        alerting: s.alertmanager.as_deref().and_then(|url| {
            let (scheme, rest) = url.split_once("://")?;
            let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
            Some(Alerting {
                alertmanagers: vec![Alertmanager {
                    scheme: scheme.into(),
                    path_prefix: format!("/{path}"),
                    api_version: "v2",
                    authorization: auth(),
                    static_configs: vec![StaticConfig {
                        targets: vec![host.into()],
                    }],
                }],
            })
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configuration_names_both_jobs_and_keeps_the_token_out_of_it() {
        let s = Settings {
            binary: "prometheus".into(),
            dir: "/h/prometheus".into(),
            targets_url: "http://127.0.0.1:4280/v1/internal/metrics/targets".into(),
            token: "secret".into(),
            port: 9090,
            scrape_interval: SCRAPE_INTERVAL,
            retention: Duration::from_secs(86400),
            alertmanager: Some("http://127.0.0.1:4280/v1/internal/alertmanager".into()),
        };
        let text = serde_yaml::to_string(&config(&s)).unwrap();
        assert!(!text.contains("secret"), "{text}");
        let v: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        let jobs = v["scrape_configs"].as_sequence().unwrap();
        assert_eq!(jobs[0]["job_name"], "apps");
        assert_eq!(jobs[0]["honor_labels"], false);
        assert_eq!(
            jobs[0]["http_sd_configs"][0]["url"],
            "http://127.0.0.1:4280/v1/internal/metrics/targets?job=apps"
        );
        assert_eq!(jobs[1]["honor_labels"], true);
        assert_eq!(jobs[2]["job_name"], "federate");
        assert_eq!(jobs[2]["metrics_path"], FEDERATE_PATH);
        assert_eq!(jobs[2]["authorization"]["type"], "Bearer");
        assert_eq!(v["global"]["scrape_interval"], "5s");
        let am = &v["alerting"]["alertmanagers"][0];
        assert_eq!(am["path_prefix"], "/v1/internal/alertmanager");
        assert_eq!(am["static_configs"][0]["targets"][0], "127.0.0.1:4280");
        assert_eq!(am["authorization"]["type"], "Bearer");
    }

    #[test]
    fn rules_are_written_when_they_change() {
        let dir = tempfile::tempdir().unwrap();
        let groups = vec![RuleGroup {
            name: "app-shop".into(),
            rules: vec![Rule {
                alert: "Down".into(),
                expr: r#"up{org="acme"} == 0"#.into(),
                for_: Some("1m".into()),
                labels: [("org".to_string(), "acme".to_string())].into(),
                annotations: Default::default(),
            }],
        }];
        assert!(write_rules(dir.path(), &groups).unwrap());
        assert!(!write_rules(dir.path(), &groups).unwrap());
        let text = std::fs::read_to_string(dir.path().join("rules/hangar.yml")).unwrap();
        let v: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        assert_eq!(v["groups"][0]["rules"][0]["for"], "1m");
        assert!(write_rules(dir.path(), &[]).unwrap());
    }
}
