//! Request paths as routes, parsed from the right: repository names have
//! slashes, so `/v2/a/b/manifests/x` is repository `a/b`.

pub(super) enum Route {
    Ping,
    Token,
    Catalog,
    Tags(String),
    Manifest(String, String),
    Blob(String, String),
    Uploads(String, Option<String>),
    Referrers(String, String),
}

impl Route {
    /// The repository and the tag or digest a request names.
    pub(super) fn target(&self) -> (Option<&str>, Option<&str>) {
        match self {
            Route::Ping | Route::Token | Route::Catalog => (None, None),
            Route::Tags(n) | Route::Uploads(n, _) => (Some(n), None),
            Route::Manifest(n, r) | Route::Blob(n, r) | Route::Referrers(n, r) => {
                (Some(n), Some(r))
            }
        }
    }

    pub(super) fn label(&self) -> &'static str {
        match self {
            Route::Ping => "ping",
            Route::Token => "token",
            Route::Catalog => "catalog",
            Route::Tags(_) => "tags",
            Route::Manifest(..) => "manifest",
            Route::Blob(..) => "blob",
            Route::Uploads(..) => "upload",
            Route::Referrers(..) => "referrers",
        }
    }
}

pub(super) fn parse_route(path: &str) -> Option<Route> {
    let rest = path.strip_prefix("/v2")?;
    match rest {
        "" | "/" => return Some(Route::Ping),
        "/token" => return Some(Route::Token),
        "/_catalog" => return Some(Route::Catalog),
        _ => {}
    }
    let rest = rest.strip_prefix('/')?;
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Some(Route::Tags(name.to_string()));
    }
    let markers = ["/manifests/", "/blobs/uploads/", "/blobs/", "/referrers/"];
    let (pos, marker) = markers
        .iter()
        .filter_map(|m| rest.rfind(m).map(|p| (p, *m)))
        .max_by_key(|(p, m)| (*p, m.len()))?;
    let name = rest[..pos].to_string();
    let tail = rest[pos + marker.len()..].to_string();
    if tail.contains('/') && marker != "/blobs/uploads/" {
        return None;
    }
    Some(match marker {
        "/manifests/" => Route::Manifest(name, tail),
        "/blobs/uploads/" if tail.is_empty() => Route::Uploads(name, None),
        "/blobs/uploads/" => Route::Uploads(name, Some(tail)),
        "/blobs/" => Route::Blob(name, tail),
        _ => Route::Referrers(name, tail),
    })
}

pub(super) fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 3 <= b.len() => match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                Ok(v) => {
                    out.push(v);
                    i += 3;
                }
                Err(_) => {
                    out.push(b'%');
                    i += 1;
                }
            },
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse_from_the_right() {
        assert!(matches!(parse_route("/v2/"), Some(Route::Ping)));
        assert!(matches!(parse_route("/v2/_catalog"), Some(Route::Catalog)));
        match parse_route("/v2/org/blobs/manifests/latest") {
            Some(Route::Manifest(n, r)) => {
                assert_eq!((n.as_str(), r.as_str()), ("org/blobs", "latest"))
            }
            _ => panic!("manifest route"),
        }
        match parse_route("/v2/a/b/blobs/uploads/") {
            Some(Route::Uploads(n, None)) => assert_eq!(n, "a/b"),
            _ => panic!("uploads route"),
        }
        match parse_route("/v2/a/b/blobs/uploads/xyz") {
            Some(Route::Uploads(n, Some(id))) => {
                assert_eq!((n.as_str(), id.as_str()), ("a/b", "xyz"))
            }
            _ => panic!("upload route"),
        }
        match parse_route("/v2/a/b/blobs/sha256:00") {
            Some(Route::Blob(n, d)) => assert_eq!((n.as_str(), d.as_str()), ("a/b", "sha256:00")),
            _ => panic!("blob route"),
        }
        match parse_route("/v2/a/b/tags/list") {
            Some(Route::Tags(n)) => assert_eq!(n, "a/b"),
            _ => panic!("tags route"),
        }
        assert!(parse_route("/v3/x").is_none());
        assert!(parse_route("/v2/a/manifests/x/y").is_none());
    }
}
