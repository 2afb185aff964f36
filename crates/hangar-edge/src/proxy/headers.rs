//! Headers: the host of a request, the forwarding headers a backend
//! gets, hop-by-hop headers removed, `Cache-Status`, HTTPS redirects.

use super::*;

pub(super) fn with_status(mut resp: Response<Body>, note: &str) -> Response<Body> {
    let value = if note == "hit" {
        Ok(HeaderValue::from_static("hangar; hit")) // the hot path: no allocation
    } else {
        HeaderValue::from_str(&format!("hangar; {note}"))
    };
    if let Ok(v) = value {
        resp.headers_mut().append("cache-status", v);
    }
    resp
}

/// In a cluster, this edge's `Cache-Status` entry (the last) names its
/// node and the tier it served as: `hangar/<node>/<tier>`, tiers `front`,
/// `region`, `super`, `shield`, `origin`.
pub(super) fn name_cache_status(h: &mut HeaderMap, node: &str, role: Role) {
    let entries: Vec<HeaderValue> = h.get_all("cache-status").iter().cloned().collect();
    let Some(last) = entries.last().and_then(|v| v.to_str().ok()) else {
        return;
    };
    let Some(rest) = last.strip_prefix("hangar;") else {
        return;
    };
    let Ok(named) = HeaderValue::from_str(&format!("hangar/{node}/{};{rest}", role.name())) else {
        return;
    };
    h.remove("cache-status");
    for v in &entries[..entries.len() - 1] {
        h.append("cache-status", v.clone());
    }
    h.append("cache-status", named);
}

/// 308 to the same URL over HTTPS.
pub(super) fn redirect_to_https<B>(req: &Request<B>, host: &str, port: u16) -> Response<Body> {
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let port = if port == 443 {
        String::new()
    } else {
        format!(":{port}")
    };
    let mut r = Response::new(upstream::empty());
    *r.status_mut() = StatusCode::PERMANENT_REDIRECT;
    if let Ok(v) = HeaderValue::from_str(&format!("https://{host}{port}{path}")) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// The host a request is for, lowercase, without a port.
pub(super) fn request_host<B>(req: &Request<B>) -> Option<String> {
    let raw = match req.uri().host() {
        Some(h) => h,
        None => req.headers().get(header::HOST)?.to_str().ok()?,
    };
    let host = match raw.strip_prefix('[') {
        // An IPv6 literal keeps its brackets.
        Some(rest) => &raw[..rest.find(']')? + 2],
        None => raw.split(':').next()?,
    };
    let host = host.trim().trim_end_matches('.');
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

pub(super) fn path_of(parts: &Parts) -> String {
    parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into())
}

pub(super) fn same_host_path(location: &str, host: &str) -> Option<String> {
    if location.starts_with('/') {
        return Some(location.to_string());
    }
    let uri: hyper::Uri = location.parse().ok()?;
    (uri.host()?.eq_ignore_ascii_case(host)).then(|| {
        uri.path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_else(|| "/".into())
    })
}

pub(super) fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

pub(super) fn clone_parts(p: &Parts) -> Parts {
    let mut r = Request::new(());
    *r.method_mut() = p.method.clone();
    *r.uri_mut() = p.uri.clone();
    *r.version_mut() = p.version;
    *r.headers_mut() = p.headers.clone();
    r.into_parts().0
}

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

pub(super) fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in HOP_BY_HOP {
        h.remove(n);
    }
}

/// Turn a client's request into the one a backend gets: origin-form,
/// HTTP/1.1, Host kept, the forwarding headers added.
pub(super) fn forwarding_headers(parts: &mut Parts, client: Client<'_>) {
    let Client {
        peer,
        tls,
        id,
        role,
        region,
    } = client;
    let original_host = parts.headers.get(header::HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    let version = parts.version;
    strip_hop_by_hop(&mut parts.headers);
    if let Ok(uri) = path_of(parts).parse() {
        parts.uri = uri;
    }
    parts.version = Version::HTTP_11;
    let h = &mut parts.headers;
    if let Some(v) = original_host {
        h.insert(header::HOST, v.clone());
        h.insert("x-forwarded-host", v);
    }
    let xff = match h.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {}", peer.ip()),
        None => peer.ip().to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        h.insert("x-forwarded-for", v);
    }
    h.insert(
        "x-forwarded-proto",
        HeaderValue::from_static(if tls { "https" } else { "http" }),
    );
    h.append(
        header::VIA,
        HeaderValue::from_static(if version == Version::HTTP_2 {
            "2 hangar"
        } else {
            "1.1 hangar"
        }),
    );
    h.insert("x-request-id", id.clone());
    // The client's address and the region it came in at, as the first
    // edge saw them: set there (whatever the client sent), kept by hops.
    if role == Role::Client {
        if let Ok(v) = HeaderValue::from_str(&peer.ip().to_string()) {
            h.insert(CLIENT_IP, v);
        }
        match region.and_then(|r| HeaderValue::from_str(r).ok()) {
            Some(r) => h.insert(REGION, r),
            None => h.remove(REGION),
        };
    }
}

/// The client's address, as the edge it connected to saw it.
pub const CLIENT_IP: &str = "hangar-client-ip";
/// The region of the edge the client connected to.
pub const REGION: &str = "hangar-region";

#[cfg(test)]
mod tests {
    use super::*;

    fn host_of(uri: &str, host: Option<&str>) -> Option<String> {
        let mut b = Request::builder().uri(uri);
        if let Some(h) = host {
            b = b.header(header::HOST, h);
        }
        request_host(&b.body(()).unwrap())
    }

    #[test]
    fn hosts_are_lowercase_without_port_or_trailing_dot() {
        assert_eq!(
            host_of("/", Some("App.Localhost:8080")).as_deref(),
            Some("app.localhost")
        );
        assert_eq!(
            host_of("/", Some("app.localhost.")).as_deref(),
            Some("app.localhost")
        );
        assert_eq!(host_of("/", Some("[::1]:8080")).as_deref(), Some("[::1]"));
        assert_eq!(
            host_of("https://h2.localhost/x", None).as_deref(),
            Some("h2.localhost")
        );
        assert_eq!(host_of("/", None), None);
        assert_eq!(host_of("/", Some(":80")), None);
    }

    #[test]
    fn hop_by_hop_headers_go_including_those_connection_names() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(
            h.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
            vec!["x-kept"]
        );
    }
}
