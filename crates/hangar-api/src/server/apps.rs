//! The Apps API's handlers: `/v1/apps/...` (releases, deploys, scaling,
//! secrets) and an org's `/v1/registry-logins`.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::machines::view;
use super::{blocking, ApiState, Caller, Json, OwnApp};
use crate::apps::{App, Release};
use crate::error::Error;
use crate::wire::{
    AppSummary, AppView, CreateApp, DeployRequest, Done, ProgressLine, RegistryLogin,
    RegistryLoginRequest, Removed, ScaleRequest, SecretInfo, SetSecrets, Unset, UnsetSecrets,
};

type Answer<T> = Result<axum::Json<T>, Error>;

pub(super) async fn list(State(api): ApiState, caller: Caller) -> Answer<Vec<AppSummary>> {
    let node = &api.node;
    let mut list = Vec::new();
    let visible = node
        .state
        .apps()?
        .into_iter()
        .filter(|a| caller.org().is_none_or(|org| org == a.org));
    for app in visible {
        list.push(AppSummary {
            machines: crate::deploy::app_machines(node, &app.name)?.len(),
            release: node.state.current_release(&app.name)?.map(|r| r.version),
            name: app.name,
            org: app.org,
        });
    }
    Ok(axum::Json(list))
}

pub(super) async fn create(
    State(api): ApiState,
    caller: Caller,
    Json(body): Json<CreateApp>,
) -> Answer<App> {
    let org = match (&caller, body.org.as_str()) {
        (Caller::Org(org), o) if o.is_empty() || o == org => org.clone(),
        (Caller::Org(org), o) => {
            return Err(Error::Invalid(format!(
                "this token is for org {org}, not {o}"
            )))
        }
        (Caller::Admin, "") => "personal".to_string(),
        (Caller::Admin, o) => o.to_string(),
    };
    Ok(axum::Json(api.node.state.create_app(&body.name, &org)?))
}

pub(super) async fn show(State(api): ApiState, OwnApp(app): OwnApp) -> Answer<AppView> {
    let node = &api.node;
    let machines = crate::deploy::app_machines(node, &app.name)?
        .iter()
        .map(|m| view(node, m))
        .collect();
    Ok(axum::Json(AppView {
        release: node.state.current_release(&app.name)?,
        name: app.name,
        org: app.org,
        machines,
    }))
}

pub(super) async fn destroy(State(api): ApiState, OwnApp(app): OwnApp) -> Answer<Done> {
    let node = &api.node;
    for m in crate::deploy::app_machines(node, &app.name)? {
        let n = node.clone();
        blocking(move || n.destroy(&m.id, true)).await?;
    }
    node.state.delete_app(&app.name)?;
    Ok(axum::Json(Done { ok: true }))
}

pub(super) async fn releases(State(api): ApiState, OwnApp(app): OwnApp) -> Answer<Vec<Release>> {
    Ok(axum::Json(api.node.state.releases(&app.name)?))
}

pub(super) async fn deploy(
    State(api): ApiState,
    caller: Caller,
    OwnApp(app): OwnApp,
    Json(body): Json<DeployRequest>,
) -> Result<Response, Error> {
    // Refused before anything streams, so the answer is a 400.
    body.observe.check(&app.org)?;
    body.guard.check()?;
    api.fetch_image(&caller, &body.image).await?;
    let node = api.node.clone();
    Ok(progress(move |progress| async move {
        let release = crate::deploy::deploy(node, app.name, body, progress).await?;
        Ok(Some(release))
    }))
}

pub(super) async fn scale(
    State(api): ApiState,
    OwnApp(app): OwnApp,
    Json(body): Json<ScaleRequest>,
) -> Result<Response, Error> {
    let node = api.node.clone();
    Ok(progress(move |progress| async move {
        crate::deploy::scale_count(node, app.name, body.count, body.regions, progress).await?;
        Ok(None)
    }))
}

/// Purge the app's cached responses at every edge of the cluster.
pub(super) async fn purge(
    State(api): ApiState,
    OwnApp(app): OwnApp,
    Json(body): Json<crate::wire::PurgeRequest>,
) -> Answer<crate::purge::PurgeOutcome> {
    use crate::purge::{PurgeSpec, What};
    let what = match (body.url, body.prefix, body.tag) {
        (Some(u), None, None) => What::Url(u),
        (None, Some(p), None) => What::Prefix(p),
        (None, None, Some(t)) => What::Tag(t),
        (None, None, None) => What::All,
        _ => {
            return Err(Error::Invalid(
                "give one of url, prefix or tag (or none, for the whole app)".into(),
            ))
        }
    };
    if let What::Url(p) | What::Prefix(p) = &what {
        if !p.starts_with('/') {
            return Err(Error::Invalid(format!(
                "{p:?} must start with / (a path on the app, not a full URL)"
            )));
        }
    }
    let wait = body.wait.unwrap_or(10.0);
    if !(0.0..=300.0).contains(&wait) {
        return Err(Error::Invalid(format!(
            "wait {wait} is not between 0 and 300 seconds"
        )));
    }
    let node = api.node.clone();
    let spec = PurgeSpec {
        host: node.app_host(&app.name),
        what,
        soft: body.soft,
        id: String::new(),
    };
    let outcome = node
        .purge(spec, std::time::Duration::from_secs_f64(wait))
        .await?;
    Ok(axum::Json(outcome))
}

/// A purge another node sends this one (the cluster's calls only).
pub(super) async fn apply_purge(
    State(api): ApiState,
    caller: Caller,
    Json(spec): Json<crate::purge::PurgeSpec>,
) -> Answer<Done> {
    if !matches!(caller, Caller::Admin) {
        return Err(Error::NotAllowed(
            "only the cluster's nodes send purges here".into(),
        ));
    }
    api.node.apply_purge(&spec);
    Ok(axum::Json(Done { ok: true }))
}

/// Run a long operation, streaming its progress as JSON lines
/// ([`ProgressLine`]); the last line says how it ended.
fn progress<F, Fut>(run: F) -> Response
where
    F: FnOnce(crate::deploy::Progress) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<Option<Release>, Error>> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let done = tx.clone();
    tokio::spawn(async move {
        let last = match run(crate::deploy::Progress(tx)).await {
            Ok(release) => ProgressLine {
                ok: Some(true),
                release,
                ..Default::default()
            },
            Err(e) => ProgressLine {
                ok: Some(false),
                error: Some(e.to_string()),
                ..Default::default()
            },
        };
        // The caller may have gone; the operation's outcome is in the store.
        let _ = done.send(serde_json::to_value(last).unwrap_or_default());
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let line = rx.recv().await?;
        let mut text = serde_json::to_vec(&line).unwrap_or_default();
        text.push(b'\n');
        Some((Ok::<_, std::io::Error>(bytes::Bytes::from(text)), rx))
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response()
}

pub(super) async fn secrets(State(api): ApiState, OwnApp(app): OwnApp) -> Answer<Vec<SecretInfo>> {
    Ok(axum::Json(api.node.state.secret_infos(&app.name)?))
}

pub(super) async fn set_secrets(
    State(api): ApiState,
    OwnApp(app): OwnApp,
    Json(body): Json<SetSecrets>,
) -> Answer<Vec<SecretInfo>> {
    for name in body.values.keys() {
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(Error::Invalid(format!(
                "secret name {name:?}: use letters, digits and _"
            )));
        }
    }
    let node = &api.node;
    node.state
        .set_secrets(&node.sealer, &app.name, &body.values)?;
    Ok(axum::Json(node.state.secret_infos(&app.name)?))
}

pub(super) async fn unset_secrets(
    State(api): ApiState,
    OwnApp(app): OwnApp,
    Json(body): Json<UnsetSecrets>,
) -> Answer<Unset> {
    let unset = api.node.state.unset_secrets(&app.name, &body.names)?;
    Ok(axum::Json(Unset { unset }))
}

/// Registry logins are an org's: the admin pulls with the operator's own.
fn login_org(caller: &Caller) -> Result<&str, Error> {
    caller.org().ok_or_else(|| {
        Error::Invalid(
            "registry logins belong to an org (use an org token); the admin pulls with the operator's ~/.docker/config.json".into(),
        )
    })
}

/// A registry as image references name it: `host` or `host:port`.
fn valid_registry(registry: &str) -> Result<(), Error> {
    let ok = !registry.is_empty()
        && registry.len() <= 255
        && registry
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]_".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "registry {registry:?} must be a host or host:port, as image references name it"
        )))
    }
}

pub(super) async fn registry_logins(
    State(api): ApiState,
    caller: Caller,
) -> Answer<Vec<RegistryLogin>> {
    let org = login_org(&caller)?;
    Ok(axum::Json(
        api.node
            .state
            .registry_logins(org)?
            .into_iter()
            .map(|(registry, username)| RegistryLogin { registry, username })
            .collect(),
    ))
}

pub(super) async fn set_registry_login(
    State(api): ApiState,
    caller: Caller,
    Path(registry): Path<String>,
    Json(body): Json<RegistryLoginRequest>,
) -> Answer<RegistryLogin> {
    let org = login_org(&caller)?;
    valid_registry(&registry)?;
    if body.username.is_empty() || body.password.is_empty() {
        return Err(Error::Invalid(
            "a registry login needs a username and a password".into(),
        ));
    }
    let node = &api.node;
    node.state
        .set_registry_login(&node.sealer, org, &registry, &body.username, &body.password)?;
    Ok(axum::Json(RegistryLogin {
        registry,
        username: body.username,
    }))
}

pub(super) async fn remove_registry_login(
    State(api): ApiState,
    caller: Caller,
    Path(registry): Path<String>,
) -> Answer<Removed> {
    let org = login_org(&caller)?;
    if !api.node.state.remove_registry_login(org, &registry)? {
        return Err(Error::NotFound(format!(
            "org {org} has no login for {registry}"
        )));
    }
    Ok(axum::Json(Removed { removed: registry }))
}
