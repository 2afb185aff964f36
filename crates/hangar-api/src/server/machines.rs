//! The Machines API's handlers: `/v1/machines/...`.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::{blocking, ApiState, Caller, Carried, Json, OwnMachine, Query};
use crate::config::{MachineConfig, MAX_SECONDS};
use crate::error::Error;
use crate::node::Node;
use crate::store::{Machine, MachineState, Placement};
use crate::wire::{
    CreateMachine, Done, Event, ExecOutput, ExecRequest, FlagQuery, ImageRef, MachineView,
    SignalMachine, StopMachine, UpdateMachine, WaitQuery,
};

type Answer<T> = Result<axum::Json<T>, Error>;

/// A machine as the API shows it: its addresses, checks and image digest
/// as the node has them now.
pub fn view(node: &Node, m: &Machine) -> MachineView {
    let addr = hangar_machine::network::address(m.slot);
    let live = m.state != MachineState::Destroyed;
    let checks = (!m.config.checks.is_empty()).then(|| {
        let mut checks = node.checks.status(&m.id);
        for name in m.config.checks.keys() {
            if !checks.iter().any(|c| &c.name == name) {
                checks.push(crate::checks::CheckStatus {
                    name: name.clone(),
                    status: crate::checks::CheckState::Pending,
                    output: String::new(),
                });
            }
        }
        checks
    });
    let image_ref = m
        .config
        .image
        .parse::<hangar_oci::Reference>()
        .ok()
        .and_then(|image| node.images.resolve(&image).ok())
        .map(|record| ImageRef {
            reference: record.reference.to_string(),
            digest: record.digest.to_string(),
        });
    MachineView {
        id: m.id.clone(),
        name: m.name.clone(),
        state: m.state,
        app: m.app.clone(),
        release: m.release,
        node: m.node.clone(),
        region: if m.region.is_empty() {
            node.site.region.clone()
        } else {
            m.region.clone()
        },
        config: m.config.clone(),
        private_ip: live.then(|| addr.v6.to_string()),
        ipv4: live.then(|| addr.v4.to_string()),
        restarts: m.restarts,
        created_at: m.created_at,
        updated_at: m.updated_at,
        vmm: node.driver.vm_info(&m.id),
        checks,
        exit_code: m.exit_code,
        oom_killed: m.exit_code.map(|_| m.oom_killed),
        image_ref,
    }
}

/// The app a create or update names: `app`, or `config.metadata.app` as
/// earlier clients send it (taken out of the metadata, which the node
/// does not read).
fn app_named(app: Option<String>, config: &mut MachineConfig) -> Result<Option<String>, Error> {
    let legacy = config.metadata.remove("app");
    match (app, legacy) {
        (Some(a), Some(b)) if a != b => Err(Error::Invalid(format!(
            "app {a:?} and config.metadata.app {b:?} disagree; give one"
        ))),
        (a, b) => Ok(a.or(b)),
    }
}

/// A stop's or restart's timeout, within the bounds of every duration.
pub(super) fn stop_timeout(r: &StopMachine) -> Result<Duration, Error> {
    if r.timeout > MAX_SECONDS {
        return Err(Error::Invalid(format!(
            "timeout must be at most {MAX_SECONDS} seconds"
        )));
    }
    Ok(Duration::from_secs(r.timeout))
}

/// `wait`'s `timeout` parameter: whole seconds, 60 when not given.
pub(super) fn wait_timeout(given: Option<&str>) -> Result<Duration, Error> {
    let seconds = match given {
        None => 60,
        Some(t) => t
            .parse::<u64>()
            .ok()
            .filter(|t| *t <= MAX_SECONDS)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "timeout {t:?} must be whole seconds, at most {MAX_SECONDS}"
                ))
            })?,
    };
    Ok(Duration::from_secs(seconds))
}

pub(super) async fn list(
    State(api): ApiState,
    caller: Caller,
    carried: Carried,
) -> Answer<Vec<MachineView>> {
    let node = &api.node;
    let mut views: Vec<MachineView> = node
        .state
        .list()?
        .iter()
        .filter(|m| api.sees(&caller, m))
        .map(|m| view(node, m))
        .collect();
    // What only a machine's node knows (its checks, its image's digest)
    // comes from that node: one call to each other node that runs any of
    // these, at once. A node that does not answer leaves its machines as
    // the store has them.
    if let (Some(cluster), None) = (&node.cluster, &carried.0) {
        let others: std::collections::BTreeSet<&str> = views
            .iter()
            .map(|v| v.node.as_str())
            .filter(|n| !n.is_empty() && *n != node.site.node)
            .collect();
        let asks = others.into_iter().filter_map(|name| {
            let member = cluster.member(name).ok()?;
            let client = cluster.client(&member, caller.org());
            Some(async move { (member.name.clone(), client.machines().await) })
        });
        for (name, answer) in futures_util::future::join_all(asks).await {
            let Ok(theirs) = answer else { continue };
            let theirs: std::collections::HashMap<String, MachineView> = theirs
                .into_iter()
                .filter(|v| v.node == name)
                .map(|v| (v.id.clone(), v))
                .collect();
            for v in views.iter_mut().filter(|v| v.node == name) {
                if let Some(t) = theirs.get(&v.id) {
                    *v = t.clone();
                }
            }
        }
    }
    Ok(axum::Json(views))
}

pub(super) async fn create(
    State(api): ApiState,
    caller: Caller,
    carried: Carried,
    Json(mut body): Json<CreateMachine>,
) -> Answer<MachineView> {
    let app = app_named(body.app.take(), &mut body.config)?;
    api.node.check_config(&body.config)?;
    api.org_may_use(&caller, app.as_deref())?;
    if body.release.is_some() && caller != Caller::Admin && carried.0.is_none() {
        return Err(Error::Invalid(
            "release is set by deploys; leave it out".into(),
        ));
    }
    // A create another node placed here is made here (that node counts
    // the placement); any other is placed, and counted.
    let placing = carried.0.is_none();
    let started = std::time::Instant::now();
    let mut here = true;
    let made: Result<MachineView, Error> = async {
        if placing {
            let region = body.region.take();
            let mut req = body.clone();
            req.app = app.clone();
            if let Some(made) = api
                .node
                .create_elsewhere(req, region.as_deref(), caller.org())
                .await?
            {
                here = false;
                return Ok(made);
            }
        }
        api.fetch_image(&caller, &body.config.image).await?;
        let node = api.node.clone();
        let place = Placement {
            app,
            release: body.release,
        };
        let m = blocking(move || node.create(body.name, place, body.config)).await?;
        Ok(view(&api.node, &m))
    }
    .await;
    if placing {
        api.node.placements.observe(&made, here, started.elapsed());
    }
    made.map(axum::Json)
}

pub(super) async fn show(State(api): ApiState, OwnMachine(m): OwnMachine) -> Answer<MachineView> {
    Ok(axum::Json(view(&api.node, &m)))
}

pub(super) async fn update(
    State(api): ApiState,
    caller: Caller,
    OwnMachine(current): OwnMachine,
    Json(mut body): Json<UpdateMachine>,
) -> Answer<MachineView> {
    // Its app (and release) stay unless the update names another app.
    let app = app_named(body.app, &mut body.config)?.or(current.app.clone());
    let release = current.release.filter(|_| app == current.app);
    api.node.check_config(&body.config)?;
    api.org_may_use(&caller, app.as_deref())?;
    api.fetch_image(&caller, &body.config.image).await?;
    let node = api.node.clone();
    let place = Placement { app, release };
    let m = blocking(move || node.update(&current.id, place, body.config)).await?;
    Ok(axum::Json(view(&api.node, &m)))
}

pub(super) async fn destroy(
    State(api): ApiState,
    OwnMachine(m): OwnMachine,
    Query(q): Query<FlagQuery>,
) -> Answer<MachineView> {
    let node = api.node.clone();
    let m = blocking(move || node.destroy(&m.id, q.force())).await?;
    Ok(axum::Json(view(&api.node, &m)))
}

pub(super) async fn start(State(api): ApiState, OwnMachine(m): OwnMachine) -> Answer<MachineView> {
    let node = api.node.clone();
    let m = blocking(move || node.start(&m.id)).await?;
    Ok(axum::Json(view(&api.node, &m)))
}

pub(super) async fn stop(
    State(api): ApiState,
    OwnMachine(m): OwnMachine,
    Json(body): Json<StopMachine>,
) -> Answer<MachineView> {
    stop_or_restart(api, m, body, false).await
}

pub(super) async fn restart(
    State(api): ApiState,
    OwnMachine(m): OwnMachine,
    Json(body): Json<StopMachine>,
) -> Answer<MachineView> {
    stop_or_restart(api, m, body, true).await
}

/// A stop (the signal, SIGKILL after the timeout), then a start when
/// `restart`.
async fn stop_or_restart(
    api: std::sync::Arc<super::Api>,
    m: Machine,
    body: StopMachine,
    restart: bool,
) -> Answer<MachineView> {
    let timeout = stop_timeout(&body)?;
    let node = api.node.clone();
    let m = blocking(move || {
        if restart {
            node.restart(&m.id, &body.signal, timeout)
        } else {
            node.stop(&m.id, &body.signal, timeout)
        }
    })
    .await?;
    Ok(axum::Json(view(&api.node, &m)))
}

pub(super) async fn signal(
    State(api): ApiState,
    OwnMachine(m): OwnMachine,
    Json(body): Json<SignalMachine>,
) -> Answer<Done> {
    if body.signal.is_empty() {
        return Err(Error::Invalid(
            "signal is required, e.g. {\"signal\": \"SIGUSR1\"}".into(),
        ));
    }
    api.node.signal(&m.id, &body.signal)?;
    Ok(axum::Json(Done { ok: true }))
}

pub(super) async fn exec(
    State(api): ApiState,
    OwnMachine(m): OwnMachine,
    Json(body): Json<ExecRequest>,
) -> Answer<ExecOutput> {
    let node = api.node.clone();
    let out =
        blocking(move || node.exec(&m.id, &body.cmd, body.user.as_deref(), &body.stdin)).await?;
    Ok(axum::Json(out))
}

pub(super) async fn events(State(api): ApiState, OwnMachine(m): OwnMachine) -> Answer<Vec<Event>> {
    Ok(axum::Json(api.node.state.events(&m.id)?))
}

pub(super) async fn wait(
    State(api): ApiState,
    OwnMachine(m): OwnMachine,
    Query(q): Query<WaitQuery>,
) -> Answer<MachineView> {
    let timeout = wait_timeout(q.timeout.as_deref())?;
    let want = match q.state.as_deref().unwrap_or("started") {
        "started" => MachineState::Started,
        "stopped" => MachineState::Stopped,
        "destroyed" => MachineState::Destroyed,
        // Up as a deploy counts it: started, its checks passing (or, with
        // none, its ports accepting connections).
        "healthy" => {
            return match tokio::time::timeout(
                timeout,
                crate::deploy::wait_healthy(&api.node, &m, true),
            )
            .await
            {
                Ok(r) => {
                    r?;
                    Ok(axum::Json(view(&api.node, &api.node.state.get(&m.id)?)))
                }
                Err(_) => Err(Error::Timeout(format!(
                    "machine {} was not healthy after {}s",
                    m.id,
                    timeout.as_secs()
                ))),
            }
        }
        _ => {
            return Err(Error::Invalid(
                "state must be started, stopped, destroyed or healthy".into(),
            ))
        }
    };
    let deadline = Instant::now() + timeout;
    loop {
        let m = api.node.state.get(&m.id)?;
        if m.state == want {
            return Ok(axum::Json(view(&api.node, &m)));
        }
        if Instant::now() > deadline {
            return Err(Error::Timeout(format!(
                "machine {} is {}, not {want}, after {}s",
                m.id,
                m.state,
                timeout.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The machine's log; with `follow`, keeps streaming as it grows, across
/// restarts and rotations, until the machine is destroyed.
pub(super) async fn logs(
    State(api): ApiState,
    OwnMachine(m): OwnMachine,
    Query(q): Query<FlagQuery>,
) -> Response {
    let node = api.node.clone();
    let path = node.driver.log_path(&m.id);
    let rotated = path.with_extension("log.1");
    let mut initial = std::fs::read(&rotated).unwrap_or_default();
    initial.extend(std::fs::read(&path).unwrap_or_default());
    let text = [(header::CONTENT_TYPE, "text/plain")];
    if !q.follow() {
        return (text, initial).into_response();
    }
    struct Cursor {
        node: std::sync::Arc<Node>,
        id: String,
        path: std::path::PathBuf,
        offset: u64,
        first: Option<Vec<u8>>,
    }
    let offset = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let cursor = Cursor {
        node,
        id: m.id,
        path,
        offset,
        first: Some(initial),
    };
    let stream = futures_util::stream::unfold(cursor, |mut c| async move {
        if let Some(first) = c.first.take() {
            return Some((Ok::<_, std::io::Error>(bytes::Bytes::from(first)), c));
        }
        loop {
            let len = std::fs::metadata(&c.path).map(|m| m.len()).unwrap_or(0);
            if len < c.offset {
                c.offset = 0; // rotated or recreated: start the new file
            }
            if len > c.offset {
                use std::io::{Read, Seek, SeekFrom};
                let mut buf = Vec::new();
                let read = std::fs::File::open(&c.path).and_then(|mut f| {
                    f.seek(SeekFrom::Start(c.offset))?;
                    f.take(1 << 20).read_to_end(&mut buf)
                });
                if let Err(e) = read {
                    tracing::debug!(machine = %c.id, "reading the log: {e}");
                }
                c.offset += buf.len() as u64;
                return Some((Ok(bytes::Bytes::from(buf)), c));
            }
            let gone = c
                .node
                .state
                .get(&c.id)
                .map(|m| m.state == MachineState::Destroyed)
                .unwrap_or(true);
            if gone {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    (text, Body::from_stream(stream)).into_response()
}
