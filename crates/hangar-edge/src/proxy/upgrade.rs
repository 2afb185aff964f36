//! Upgrades (WebSocket and others): the handshake on a fresh connection,
//! then the two upgraded streams spliced.

use super::*;

impl Edge {
    /// WebSocket and other upgrades: forward the handshake on a fresh
    /// connection, then splice the two upgraded streams.
    pub(super) async fn upgrade(
        &self,
        mut req: Request<Incoming>,
        site: &Arc<Site>,
        host: &str,
        client: Client<'_>,
    ) -> Response<Body> {
        let downstream = hyper::upgrade::on(&mut req);
        let (mut parts, _) = req.into_parts();
        let upgrade = parts.headers.get(header::UPGRADE).cloned();
        forwarding_headers(&mut parts, client);
        if let Some(u) = upgrade {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(header::UPGRADE, u);
        }
        let Some(backend) = site.pick(&[]) else {
            return ProxyError::new(Kind::NoBackend, "no healthy backend for the upgrade")
                .respond(host);
        };
        let guard = backend.begin();
        let mut sender = match upstream::connect(&backend.addrs, self.limits.connect_timeout).await
        {
            Ok(s) => s,
            Err(e) => return ProxyError::upstream(&e, false).respond(host),
        };
        let mut resp = match sender
            .send_request(Request::from_parts(parts, upstream::empty()))
            .await
        {
            Ok(r) => r,
            Err(e) => {
                return ProxyError::new(Kind::Request, format!("{}: {e}", backend.addr))
                    .respond(host)
            }
        };
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            let (parts, body) = resp.into_parts();
            return Response::from_parts(parts, body.map_err(BoxError::from).boxed_unsync());
        }
        let server = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            let _guard = guard;
            if let (Ok(c), Ok(s)) = (downstream.await, server.await) {
                let mut c = hyper_util::rt::TokioIo::new(c);
                let mut s = hyper_util::rt::TokioIo::new(s);
                let _ = tokio::io::copy_bidirectional(&mut c, &mut s).await;
            }
        });
        let (parts, _) = resp.into_parts();
        Response::from_parts(parts, upstream::empty())
    }
}

pub(super) fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}
