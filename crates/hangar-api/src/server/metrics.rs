//! Metrics routes: the service discovery the node's Prometheus reads
//! (the admin only), and Prometheus's HTTP API confined to the caller's
//! org, which Grafana can be pointed at
//! (`http://<node>:4280/v1/metrics`, the org's token as a bearer).

use axum::extract::{Path, Query, RawQuery};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;

use super::{ApiState, Caller};
use crate::error::Error;

#[derive(Deserialize)]
pub(super) struct Job {
    job: String,
}

pub(super) async fn targets(
    axum::extract::State(api): ApiState,
    caller: Caller,
    Query(Job { job }): Query<Job>,
) -> Result<axum::Json<Vec<hangar_metrics::TargetGroup>>, Error> {
    if caller != Caller::Admin {
        return Err(Error::NotAllowed(
            "only the node's Prometheus reads the scrape targets".into(),
        ));
    }
    let node = api.node.clone();
    Ok(axum::Json(
        crate::node::blocking(move || node.metric_targets(&job)).await?,
    ))
}

/// `GET` or `POST` (a form, as Grafana sends) of a Prometheus API call.
pub(super) async fn query(
    axum::extract::State(api): ApiState,
    caller: Caller,
    Path(endpoint): Path<String>,
    RawQuery(raw): RawQuery,
    body: Bytes,
) -> Result<Response, Error> {
    let mut params: Vec<(String, String)> =
        form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    params.extend(form_urlencoded::parse(&body).into_owned());
    let (status, body) = api
        .node
        .query_metrics(caller.org(), &endpoint, params)
        .await?;
    Ok((
        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response())
}

/// This node's own series, for the other nodes' Prometheus.
pub(super) async fn federate(
    axum::extract::State(api): ApiState,
    caller: Caller,
) -> Result<Response, Error> {
    if caller != Caller::Admin {
        return Err(Error::NotAllowed(
            "only the cluster's nodes federate a node's series".into(),
        ));
    }
    let (kind, body) = api.node.federate().await?;
    Ok(([(header::CONTENT_TYPE, kind)], body).into_response())
}

/// What Prometheus sends the node as its Alertmanager.
pub(super) async fn receive_alerts(
    axum::extract::State(api): ApiState,
    caller: Caller,
    super::Json(alerts): super::Json<Vec<crate::alerts::PromAlert>>,
) -> Result<StatusCode, Error> {
    if caller != Caller::Admin {
        return Err(Error::NotAllowed(
            "only the node's Prometheus sends alerts".into(),
        ));
    }
    crate::alerts::receive(&api.node, alerts);
    Ok(StatusCode::OK)
}

/// An app's firing alerts and its webhook's last delivery.
pub(super) async fn alerts(
    axum::extract::State(api): ApiState,
    caller: Caller,
    super::OwnApp(app): super::OwnApp,
) -> Result<axum::Json<crate::wire::AppAlerts>, Error> {
    let firing = crate::alerts::firing(&api.node, caller.org(), Some(&app.name)).await?;
    let release = api.node.state.current_release(&app.name)?;
    Ok(axum::Json(crate::wire::AppAlerts {
        rules: release
            .as_ref()
            .map(|r| r.observe.rules.iter().map(|r| r.alert.clone()).collect())
            .unwrap_or_default(),
        webhook: release.and_then(|r| r.observe.webhook),
        firing,
        last_delivery: api.node.alert_deliveries.last(&app.name),
    }))
}

/// The node's own exposition (its Prometheus scrapes it with the admin
/// token): OpenMetrics when asked, else the text format.
pub(super) async fn exposition(
    axum::extract::State(api): ApiState,
    caller: Caller,
    headers: axum::http::HeaderMap,
) -> Result<Response, Error> {
    if caller != Caller::Admin {
        return Err(Error::NotAllowed(
            "the node's own metrics name every org: query yours at /v1/metrics/api/v1/query".into(),
        ));
    }
    let node = api.node.clone();
    let families = crate::node::blocking(move || node.metric_families()).await?;
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let (content_type, body) = hangar_metrics::exposition::render(families, accept);
    Ok(([(header::CONTENT_TYPE, content_type)], body).into_response())
}
