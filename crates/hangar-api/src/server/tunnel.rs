//! `GET /v1/machines/{id}/proxy?port=N` with `Upgrade: hangar-tcp`: the
//! connection becomes a TCP stream to port N of the machine (on its
//! private address, from the node), for `hangar proxy`. The port is
//! dialed before the upgrade is agreed, so a port nothing listens on is a
//! clear error, not a stream that closes at once.

use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use serde::Deserialize;

use super::{ApiState, OwnMachine, Query};
use crate::error::Error;
use crate::store::MachineState;

/// The protocol name of the upgrade.
pub const PROTOCOL: &str = "hangar-tcp";

#[derive(Deserialize)]
pub(super) struct Port {
    port: u16,
}

pub(super) async fn proxy(
    State(api): ApiState,
    caller: super::Caller,
    OwnMachine(m): OwnMachine,
    Query(Port { port }): Query<Port>,
    mut req: Request,
) -> Result<Response, Error> {
    let asked = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(PROTOCOL));
    if !asked {
        return Err(Error::Invalid(format!(
            "a tunnel needs `Connection: upgrade` and `Upgrade: {PROTOCOL}` (hangar proxy sends them)"
        )));
    }
    if m.state != MachineState::Started {
        return Err(Error::Conflict(format!(
            "machine {} is {}: start it first (hangar machine start {})",
            m.id, m.state, m.id
        )));
    }
    if port == 0 {
        return Err(Error::Invalid("port 0 is no port: give 1 to 65535".into()));
    }
    let permit = api.streams.take(&caller, "tunnels and consoles")?;
    let addr = crate::routing::address(&m, port);
    let upstream = match tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return Err(Error::Unavailable(format!(
                "nothing answers on port {port} of machine {} ({e}): is the app listening on 0.0.0.0:{port}?",
                m.id
            )))
        }
        Err(_) => {
            return Err(Error::Timeout(format!(
                "port {port} of machine {} did not answer within 5 s",
                m.id
            )))
        }
    };
    let _ = upstream.set_nodelay(true);
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        // Held while the tunnel is open.
        let _permit = permit;
        let Ok(upgraded) = upgrade.await else { return };
        let mut client = TokioIo::new(upgraded);
        let mut upstream = upstream;
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    });
    let mut r = StatusCode::SWITCHING_PROTOCOLS.into_response();
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    r.headers_mut()
        .insert(header::UPGRADE, HeaderValue::from_static(PROTOCOL));
    Ok(r)
}
