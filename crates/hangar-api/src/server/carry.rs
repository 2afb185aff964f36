//! Calls about another node's machine, carried out there: the layer in
//! front of every `/v1/machines/{id}` route. The call goes to the node
//! that runs the machine as it came (method, path, query, body), bearing
//! the cluster's token and naming the org it is made for, and its answer
//! comes back as that node gave it (streamed: a followed log stays live).
//! A carried call is never carried again. An upgrade (a tunnel, a
//! console) is carried as a connection: once the other node agrees, the
//! two are joined byte for byte.

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiState, Caller, Carried, MAX_BODY};
use crate::cluster::{Cluster, FOR_ORG, VIA};
use crate::error::Error;
use crate::store::Member;

pub(super) async fn carry(
    State(api): ApiState,
    caller: Caller,
    carried: Carried,
    Path(params): Path<HashMap<String, String>>,
    req: Request,
    next: Next,
) -> Response {
    let Some(id) = params.get("id") else {
        return next.run(req).await;
    };
    // What is not there, or not the caller's, the handler refuses here.
    let found = api.node.state.get(id).ok().filter(|m| api.sees(&caller, m));
    let Some(m) = found.filter(|_| carried.0.is_none()) else {
        return next.run(req).await;
    };
    match api.node.elsewhere(&m) {
        Ok(None) => next.run(req).await,
        Ok(Some((cluster, member))) => {
            // A look at it is answered here, from the store, when its node
            // does not answer (it may have just died).
            let again = (req.method() == Method::GET).then(|| {
                let mut r = Request::new(Body::empty());
                *r.method_mut() = Method::GET;
                *r.uri_mut() = req.uri().clone();
                *r.headers_mut() = req.headers().clone();
                *r.extensions_mut() = req.extensions().clone();
                r
            });
            // A tunnel or a console: the connection itself is carried.
            if req.headers().contains_key(header::UPGRADE) {
                return match forward_upgrade(&cluster, &member, caller.org(), req).await {
                    Ok(r) => r,
                    Err(e) => e.into_response(),
                };
            }
            match forward(&cluster, &member, caller.org(), req).await {
                Ok(r) => r,
                Err(Error::Unavailable(_)) if again.is_some() => {
                    next.run(again.unwrap_or_default()).await
                }
                Err(e) => e.into_response(),
            }
        }
        // Its node is gone: what the store knows is answered here (a look
        // at it, its events, a destroy that forgets it); nothing else can
        // be done to it.
        Err(e) => {
            if matches!(*req.method(), Method::GET | Method::DELETE) {
                next.run(req).await
            } else {
                e.into_response()
            }
        }
    }
}

async fn forward(
    cluster: &Cluster,
    member: &Member,
    org: Option<&str>,
    req: Request,
) -> Result<Response, Error> {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, MAX_BODY).await.map_err(|_| {
        Error::TooLarge(format!(
            "the request body is over {} KiB; send less",
            MAX_BODY >> 10
        ))
    })?;
    let delay = cluster.delay_to(member);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let url = format!("{}{path}", member.api.trim_end_matches('/'));
    let mut out = cluster
        .http
        .request(parts.method.clone(), url)
        .bearer_auth(&cluster.token)
        .header(VIA, &cluster.me.name);
    if let Some(org) = org {
        out = out.header(FOR_ORG, org);
    }
    if let Some(ct) = parts.headers.get(header::CONTENT_TYPE) {
        out = out.header(header::CONTENT_TYPE, ct);
    }
    let resp = out.body(body).send().await.map_err(|e| {
        Error::Unavailable(format!(
            "node {} ({}), which runs the machine, did not answer: {e}; try again",
            member.name, member.api
        ))
    })?;
    let mut answer = Response::builder().status(resp.status());
    for name in [header::CONTENT_TYPE, header::RETRY_AFTER] {
        if let Some(v) = resp.headers().get(&name) {
            answer = answer.header(name, v);
        }
    }
    answer
        .body(Body::from_stream(resp.bytes_stream()))
        .map_err(|e| Error::Internal(format!("carrying an answer: {e}")))
}

/// Carry an upgrade (`hangar proxy`'s tunnel, `ssh console`'s WebSocket)
/// to the node that runs the machine: the request goes there as it came,
/// and once that node agrees, the two upgraded connections are joined.
async fn forward_upgrade(
    cluster: &Cluster,
    member: &Member,
    org: Option<&str>,
    mut req: Request,
) -> Result<Response, Error> {
    let gone = |e: String| {
        Error::Unavailable(format!(
            "node {} ({}), which runs the machine, did not answer: {e}; try again",
            member.name, member.api
        ))
    };
    let delay = cluster.delay_to(member);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let authority = crate::client::authority_of(&member.api);
    let mut send = crate::client::upgrading(&authority).await.map_err(gone)?;
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let mut out = hyper::Request::get(path).header(header::HOST, &authority);
    for (name, value) in req.headers() {
        let hop = name == header::AUTHORIZATION || name == header::HOST;
        if !hop {
            out = out.header(name, value);
        }
    }
    out = out
        .header(header::AUTHORIZATION, format!("Bearer {}", cluster.token))
        .header(VIA, &cluster.me.name);
    if let Some(org) = org {
        out = out.header(FOR_ORG, org);
    }
    let out = out
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| Error::Internal(format!("carrying an upgrade: {e}")))?;
    let mut resp = send
        .send_request(out)
        .await
        .map_err(|e| gone(e.to_string()))?;
    let mut answer = Response::builder().status(resp.status());
    for (name, value) in resp.headers() {
        answer = answer.header(name, value);
    }
    if resp.status() != axum::http::StatusCode::SWITCHING_PROTOCOLS {
        use http_body_util::BodyExt as _;
        let body = resp
            .body_mut()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        return answer
            .body(Body::from(body))
            .map_err(|e| Error::Internal(format!("carrying an answer: {e}")));
    }
    let theirs = hyper::upgrade::on(resp);
    let ours = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let (Ok(a), Ok(b)) = (ours.await, theirs.await) {
            let (mut a, mut b) = (
                hyper_util::rt::TokioIo::new(a),
                hyper_util::rt::TokioIo::new(b),
            );
            let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
        }
    });
    answer
        .body(Body::empty())
        .map_err(|e| Error::Internal(format!("carrying an answer: {e}")))
}
