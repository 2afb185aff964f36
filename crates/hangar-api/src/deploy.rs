//! Deploys and scaling: replace an app's machines with a new release's,
//! by strategy, never leaving the app with fewer healthy machines than it
//! had unless the strategy says so.
//!
//! - `rolling` (default): per batch of `max_unavailable` (at least 1), start
//!   new machines, wait until their checks pass, then stop old ones.
//! - `bluegreen`: start every new machine, wait for all, then stop all old.
//! - `immediate`: start every new machine and stop the old at once, without
//!   waiting for checks.
//!
//! A rolling or blue-green deploy is also watched by its [`guard`]: when
//! the new release's machines answer clearly worse at the edge than the
//! old release's (errors, latency), the deploy stops.
//!
//! When a new machine fails (exits, or a check goes critical, or time runs
//! out), or the guard stops the deploy, it rolls back: the new machines go and the old ones that
//! were stopped come back, and the release is `failed` with the check's
//! output and the machine's last log lines.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::mpsc::UnboundedSender;

use crate::apps::{Release, ReleaseStatus};
use crate::config::{DriverKind, MachineConfig};
use crate::error::{Error, Result};
use crate::node::Node;
use crate::store::{Machine, MachineState, Placement};

crate::closed_set! {
    /// How a deploy replaces an app's machines (see the module's doc).
    #[derive(Default)]
    pub enum Strategy {
        #[default]
        Rolling,
        Bluegreen,
        Immediate,
    }
}

#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeployRequest {
    pub image: String,
    /// The template of every machine of the release.
    pub config: MachineConfig,
    /// How many machines; default: as many as now, at least one.
    #[serde(default)]
    pub count: Option<u32>,
    #[serde(default)]
    pub strategy: Strategy,
    #[serde(default)]
    pub max_unavailable: u32,
    #[serde(default)]
    pub description: String,
    /// Where the app's first machines go (`primary_region` of hangar.toml);
    /// a deploy replaces each machine in its own region. Default: the
    /// node's region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_region: Option<String>,
    /// Alert rules, webhook and dashboards (`[alerts]`, `dashboards`).
    #[serde(default)]
    pub observe: crate::observe::Observe,
    /// The deploy guard (`[deploy.guard]`; on by default).
    #[serde(default)]
    pub guard: guard::GuardSettings,
}

pub mod guard;

/// How long a deploy waits for a new machine to be up: long enough for
/// its checks to pass a few times, at most 5 minutes.
pub(crate) fn wait_budget(config: &MachineConfig) -> Duration {
    // Micro-VMs boot in tens of seconds under emulation.
    let floor = if config.guest.driver == DriverKind::Vm {
        120.0
    } else {
        10.0
    };
    let budget = config
        .checks
        .values()
        .map(|c| c.grace_period + 5.0 * c.interval + c.timeout)
        .fold(floor, f64::max)
        .min(300.0);
    Duration::from_secs_f64(budget)
}

/// The most machines an app can have on this node: its org's network
/// holds that many.
pub fn check_count(count: u32) -> Result<()> {
    let most = hangar_machine::network::HOSTS.count();
    if count as usize > most {
        return Err(Error::Invalid(format!(
            "count {count} is more than an org's network on this node holds ({most} machines)"
        )));
    }
    Ok(())
}

/// Progress lines (JSON) for the caller, as the deploy goes.
#[derive(Clone)]
pub struct Progress(pub UnboundedSender<serde_json::Value>);

impl Progress {
    fn say(&self, message: String) {
        let _ = self.0.send(serde_json::json!({ "message": message }));
    }
}

/// Holds an app for one deploy or scale, on this node and (through the
/// store) on every node of its cluster; released on drop.
struct AppLock<'a> {
    node: &'a Node,
    app: String,
}

impl<'a> AppLock<'a> {
    fn take(node: &'a Node, app: &str) -> Result<AppLock<'a>> {
        let mut busy = node.busy_apps.lock().unwrap_or_else(|e| e.into_inner());
        let busy_msg = || {
            Error::Conflict(format!(
                "a deploy or scale of {app} is under way; wait for it (`hangar status -a {app}`) and try again"
            ))
        };
        if !busy.insert(app.to_string()) {
            return Err(busy_msg());
        }
        match node.state.hold_app(app) {
            Ok(true) => {}
            Ok(false) => {
                busy.remove(app);
                return Err(busy_msg());
            }
            Err(e) => {
                busy.remove(app);
                return Err(e);
            }
        }
        Ok(AppLock {
            node,
            app: app.to_string(),
        })
    }
}

impl Drop for AppLock<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.node.state.let_go_app(&self.app) {
            // Its lease lets go of it when this node ends, at the latest.
            tracing::warn!("app {}: the deploy lock stays held: {e}", self.app);
        }
        self.node
            .busy_apps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.app);
    }
}

/// The app's machines that serve it (not destroyed, and not a console
/// session's), oldest first: what deploys replace and scaling counts.
pub fn app_machines(node: &Node, app: &str) -> Result<Vec<Machine>> {
    let mut all = node.state.app_machines(app)?;
    all.retain(|m| m.config.role == crate::config::MachineRole::App);
    Ok(all)
}

fn suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() ^ (d.as_secs() as u32).rotate_left(16))
        .unwrap_or(0);
    format!(
        "{:06x}",
        (nanos ^ std::process::id().rotate_left(8)) & 0xff_ffff
    )
}

/// A new machine of the app's release, placed in `region` (see
/// [`Node::create_placed`]).
async fn create(
    node: &Arc<Node>,
    app: &str,
    release: Option<u32>,
    config: &MachineConfig,
    region: Option<&str>,
) -> Result<Machine> {
    let place = Placement {
        app: Some(app.to_string()),
        release,
    };
    let name = format!("{app}-{}", suffix());
    let org = node.state.app(app).ok().map(|a| a.org);
    node.create_placed(Some(name), place, config.clone(), region, org.as_deref())
        .await
}

/// The region of `m`: its own, or (a machine from before regions) its
/// node's.
fn region_of<'a>(node: &'a Node, m: &'a Machine) -> &'a str {
    if m.region.is_empty() {
        &node.site.region
    } else {
        &m.region
    }
}

/// `v3`, or `v?` for a machine of no release.
fn version(m: &Machine) -> String {
    m.release
        .map(|r| format!("v{r}"))
        .unwrap_or_else(|| "v?".into())
}

/// Stop (with the machine's kill signal and timeout) and destroy,
/// wherever it runs.
async fn retire(node: &Arc<Node>, m: &Machine) -> Result<()> {
    node.retire(m).await
}

/// The last `n` lines of a machine's log.
pub fn last_log_lines(node: &Node, id: &str, n: usize) -> String {
    let text = std::fs::read(node.driver.log_path(id)).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        return "(none: it printed nothing yet)".into();
    }
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// How long a machine of no checks must stay started, without a restart,
/// before a deploy counts it as up.
pub const UP_GRACE: Duration = Duration::from_secs(2);

/// Wait until `m` is up: started, and its checks pass; with no checks,
/// started for [`UP_GRACE`] without a restart and its services' ports
/// accepting connections. With `checks` false (the immediate strategy),
/// started is enough. A machine that exits, restarts or is OOM-killed
/// meanwhile is not up. The error says what happened and ends with the
/// machine's last log lines.
pub async fn wait_healthy(node: &Arc<Node>, m: &Machine, checks: bool) -> Result<()> {
    let budget = wait_budget(&m.config);
    let deadline = Instant::now() + budget;
    let budget = budget.as_secs();
    let failed = |why: String| {
        Error::Conflict(format!(
            "machine {} ({}) {why}; its last log lines:\n{}",
            m.name,
            m.id,
            last_log_lines(node, &m.id, 10)
        ))
    };
    let mut up_since: Option<Instant> = None;
    let mut port_trouble: Option<String> = None;
    loop {
        let now = node.state.get(&m.id)?;
        let code = now
            .exit_code
            .map(|c| format!(" with code {c}"))
            .unwrap_or_default();
        let oom_text = |killed: bool| {
            if killed {
                format!(
                    " (killed for using more than its {} MB of memory: give it more with [[vm]] memory)",
                    now.config.guest.memory_mb
                )
            } else {
                String::new()
            }
        };
        let oom = oom_text(now.oom_killed);
        if now.restarts > m.restarts {
            // The exit that caused the restart, from the machine's events.
            let last = node
                .state
                .events(&m.id)?
                .into_iter()
                .rev()
                .find(|e| e.kind == "exited");
            let (code, oom) = last
                .map(|e| {
                    let code = e.detail["exit_code"]
                        .as_i64()
                        .map(|c| format!(" with code {c}"))
                        .unwrap_or_default();
                    (code, oom_text(e.detail["oom_killed"] == true))
                })
                .unwrap_or((code, oom));
            return Err(failed(format!(
                "exited{code}{oom} and was restarted while the deploy waited for it"
            )));
        }
        match now.state {
            MachineState::Started if !checks => return Ok(()),
            MachineState::Started if now.config.checks.is_empty() => {
                let since = *up_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= UP_GRACE {
                    match ports_accept(&now).await {
                        Ok(()) => return Ok(()),
                        Err(why) => port_trouble = Some(why),
                    }
                }
            }
            MachineState::Started => {
                if node.checks.passing(&m.id, now.config.checks.len()) {
                    return Ok(());
                }
                // A micro-VM is "started" while it still boots (tens of
                // seconds under emulation): its checks fail until then,
                // which says nothing of the release; it has until the
                // deadline to pass them.
                let booting = now.config.guest.driver == DriverKind::Vm;
                if let Some(c) = node
                    .checks
                    .status(&m.id)
                    .into_iter()
                    .find(|c| c.status == crate::checks::CheckState::Critical)
                    .filter(|_| !booting)
                {
                    return Err(failed(format!(
                        "failed its check {:?}: {}",
                        c.name, c.output
                    )));
                }
            }
            MachineState::Stopped
            | MachineState::Failed
            | MachineState::Destroyed
            | MachineState::Lost => {
                return Err(failed(format!("exited{code}{oom} before it was up")));
            }
            _ => up_since = None,
        }
        if Instant::now() > deadline {
            if let Some(why) = port_trouble {
                return Err(failed(why));
            }
            let pending: Vec<String> = node
                .checks
                .status(&m.id)
                .into_iter()
                .map(|c| format!("{}: {} {}", c.name, c.status, c.output))
                .collect();
            return Err(failed(format!(
                "was not up within {budget}s (state {}; checks: {})",
                now.state,
                pending.join("; ")
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether every service port of `m` accepts a connection from the host,
/// on the machine's IPv4 or IPv6 address; if not, why, in words that say
/// how to fix it.
async fn ports_accept(m: &Machine) -> std::result::Result<(), String> {
    let addr = hangar_machine::network::address(m.slot);
    for service in &m.config.services {
        let port = service.internal_port;
        let mut refused = Vec::new();
        let mut ok = false;
        for ip in [
            std::net::IpAddr::from(addr.v4),
            std::net::IpAddr::from(addr.v6),
        ] {
            let target = std::net::SocketAddr::new(ip, port);
            match tokio::time::timeout(
                Duration::from_millis(500),
                tokio::net::TcpStream::connect(target),
            )
            .await
            {
                Ok(Ok(_)) => {
                    ok = true;
                    break;
                }
                Ok(Err(e)) => refused.push(format!("{target}: {e}")),
                Err(_) => refused.push(format!("{target}: no answer in 500 ms")),
            }
        }
        if ok {
            continue;
        }
        let id = m.id.clone();
        let listening =
            tokio::task::spawn_blocking(move || hangar_machine::network::listeners(&id))
                .await
                .unwrap_or_default();
        let on_port: Vec<String> = listening
            .iter()
            .filter(|a| a.port() == port)
            .map(|a| a.ip().to_string())
            .collect();
        return Err(if on_port.is_empty() {
            format!(
                "accepts no connection on its internal_port {port} ({}); nothing listens there: start the app on port {port} or set internal_port to the port it uses",
                refused.join("; ")
            )
        } else {
            format!(
                "listens on port {port} only at {} inside the machine, which the edge cannot reach; make the app bind 0.0.0.0 (or ::) instead",
                on_port.join(" and ")
            )
        });
    }
    Ok(())
}

/// Run a deploy to the end; the release records how it ended.
pub async fn deploy(
    node: Arc<Node>,
    app: String,
    req: DeployRequest,
    progress: Progress,
) -> Result<Release> {
    let org = node.state.app(&app)?.org;
    req.observe.check(&org)?;
    req.guard.check()?;
    let _one_at_a_time = AppLock::take(&node, &app)?;
    if let Some(count) = req.count {
        check_count(count)?;
    }
    let mut config = req.config;
    config.image = req.image.clone();
    node.check_config(&config)?;
    let old = app_machines(&node, &app)?;
    let count = req.count.map(|c| c as usize).unwrap_or(old.len().max(1));
    // The i-th new machine goes where the i-th old one is, the rest to the
    // primary region.
    let regions: Vec<Option<String>> = (0..count)
        .map(|i| {
            old.get(i)
                .map(|m| region_of(&node, m).to_string())
                .or(req.primary_region.clone())
        })
        .collect();
    let replaces: Vec<String> = old.iter().map(|m| m.id.clone()).collect();
    let release = node.state.add_release(
        &app,
        &req.image,
        &req.description,
        &config,
        &replaces,
        &req.observe,
    )?;
    let v = Some(release.version);
    progress.say(format!(
        "release v{} of {app}: {} machine(s), {} strategy, image {}",
        release.version, count, req.strategy, req.image
    ));

    let mut created: Vec<Machine> = Vec::new();
    let mut retired: Vec<Machine> = Vec::new();
    let mut guard = match req.strategy {
        Strategy::Immediate => None,
        _ => guard::Guard::start(&node, &old, release.version, &req.guard),
    };
    let say = |m: String| progress.say(m);
    let outcome: Result<()> = async {
        match req.strategy {
            Strategy::Rolling => {
                let batch = req.max_unavailable.max(1) as usize;
                let mut remaining_old = old.clone();
                while created.len() < count {
                    let n = batch.min(count - created.len());
                    let mut fresh = Vec::new();
                    for _ in 0..n {
                        let region = regions[created.len()].as_deref();
                        let m = create(&node, &app, v, &config, region).await?;
                        progress.say(format!("machine {} started, waiting for its checks", m.id));
                        created.push(m.clone());
                        fresh.push(m);
                    }
                    for m in &fresh {
                        node.wait_up(m, true).await?;
                        progress.say(format!("machine {} is healthy", m.id));
                    }
                    if let Some(g) = &mut guard {
                        g.watch(&node, &created, &old, &say).await?;
                    }
                    for _ in 0..n {
                        if remaining_old.is_empty() {
                            break;
                        }
                        let o = remaining_old.remove(0);
                        retire(&node, &o).await?;
                        progress.say(format!(
                            "machine {} ({}) stopped and destroyed",
                            o.id,
                            version(&o)
                        ));
                        retired.push(o);
                    }
                }
                for o in remaining_old {
                    retire(&node, &o).await?;
                    progress.say(format!(
                        "machine {} stopped and destroyed (scaled down)",
                        o.id
                    ));
                    retired.push(o);
                }
                // And a window with the new release alone.
                if let Some(g) = &mut guard {
                    g.watch(&node, &created, &old, &say).await?;
                }
            }
            strategy => {
                for region in &regions {
                    let m = create(&node, &app, v, &config, region.as_deref()).await?;
                    progress.say(format!("machine {} started", m.id));
                    created.push(m);
                }
                for m in &created {
                    node.wait_up(m, strategy == Strategy::Bluegreen).await?;
                    progress.say(format!(
                        "machine {} is {}",
                        m.id,
                        if strategy == Strategy::Bluegreen {
                            "healthy"
                        } else {
                            "started"
                        }
                    ));
                }
                if let Some(g) = &mut guard {
                    g.watch(&node, &created, &old, &say).await?;
                }
                for o in &old {
                    retire(&node, o).await?;
                    progress.say(format!("machine {} stopped and destroyed", o.id));
                    retired.push(o.clone());
                }
                if let Some(g) = &mut guard {
                    g.watch(&node, &created, &old, &say).await?;
                }
            }
        }
        Ok(())
    }
    .await;

    match outcome {
        Ok(()) => {
            let note = format!("deployed {} machine(s)", created.len());
            node.state
                .set_release_status(&app, release.version, ReleaseStatus::Complete, &note)?;
            progress.say(format!("release v{} is complete", release.version));
        }
        Err(e) => {
            progress.say(format!("deploy failed, rolling back: {e}"));
            for m in &created {
                if let Err(e) = retire(&node, m).await {
                    progress.say(format!("could not remove new machine {}: {e}", m.id));
                    tracing::warn!(machine = %m.id, "rollback: {e}");
                }
            }
            for o in &retired {
                // The old release comes back as it was.
                let region = region_of(&node, o).to_string();
                match create(&node, &app, o.release, &o.config, Some(&region)).await {
                    Ok(m) => progress.say(format!("machine {} restored ({})", m.id, version(o))),
                    Err(e) => progress.say(format!(
                        "could not restore a machine of the old release: {e}"
                    )),
                }
            }
            node.state.set_release_status(
                &app,
                release.version,
                ReleaseStatus::Failed,
                &e.to_string(),
            )?;
            progress.say(format!(
                "release v{} failed and was rolled back",
                release.version
            ));
            return Err(e);
        }
    }
    node.state.release(&app, release.version)
}

/// Undo a deploy that a stop of the node cut short, when the node starts
/// again: the machines it had already replaced come back (from their
/// stored configs), the ones it had created go, and the release is marked
/// failed. The app is then as it was before the deploy.
pub async fn recover(node: Arc<Node>, cut: crate::apps::Interrupted) -> Result<()> {
    let _one_at_a_time = AppLock::take(&node, &cut.app)?;
    for id in &cut.replaces {
        let old = node.state.get(id)?;
        if old.state == MachineState::Destroyed {
            let region = region_of(&node, &old).to_string();
            create(&node, &cut.app, old.release, &old.config, Some(&region)).await?;
        }
    }
    for m in app_machines(&node, &cut.app)? {
        if m.release == Some(cut.version) {
            retire(&node, &m).await?;
        }
    }
    node.state.set_release_status(
        &cut.app,
        cut.version,
        ReleaseStatus::Failed,
        "the node stopped during this deploy; it was rolled back when the node started again",
    )
}

/// Set the number of machines of an app's current release in each of
/// `regions` (none given: each region the app has machines in, or the
/// node's own), as `fly scale count N --region a,b` does: new ones must
/// pass their checks; extra ones go, newest first.
pub async fn scale_count(
    node: Arc<Node>,
    app: String,
    count: u32,
    regions: Vec<String>,
    progress: Progress,
) -> Result<()> {
    check_count(count)?;
    let _one_at_a_time = AppLock::take(&node, &app)?;
    let release = node.state.current_release(&app)?.ok_or_else(|| {
        Error::Conflict(format!(
            "app {app} has no complete release yet; run `hangar deploy` first"
        ))
    })?;
    let config = release.config.clone();
    let v = Some(release.version);
    let machines = app_machines(&node, &app)?;
    let mut regions = regions;
    if regions.is_empty() {
        regions = machines
            .iter()
            .map(|m| region_of(&node, m).to_string())
            .collect();
        regions.sort();
        regions.dedup();
    }
    if regions.is_empty() {
        regions.push(node.site.region.clone());
    }
    let count = count as usize;
    for region in &regions {
        let here: Vec<&Machine> = machines
            .iter()
            .filter(|m| region_of(&node, m) == region)
            .collect();
        for _ in here.len()..count {
            let m = create(&node, &app, v, &config, Some(region)).await?;
            progress.say(format!("machine {} started, waiting for its checks", m.id));
            if let Err(e) = node.wait_up(&m, true).await {
                if let Err(e) = retire(&node, &m).await {
                    tracing::warn!(machine = %m.id, "scale: removing a machine that failed: {e}");
                }
                return Err(e);
            }
            progress.say(format!("machine {} is healthy", m.id));
        }
        for m in here.iter().rev().take(here.len().saturating_sub(count)) {
            retire(&node, m).await?;
            progress.say(format!("machine {} stopped and destroyed", m.id));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
