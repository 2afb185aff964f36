//! Image references in Docker's grammar, normalized as Docker normalizes them:
//! `alpine` is `docker.io/library/alpine:latest`.

use std::fmt;
use std::str::FromStr;

use crate::digest::Digest;
use crate::error::Error;

/// The registry Docker assumes when a reference names none.
pub const DOCKER_HUB: &str = "docker.io";

/// A parsed, normalized image reference.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Reference {
    /// Registry host, with port when it has one (`docker.io`, `localhost:5000`).
    pub registry: String,
    /// Repository path inside the registry (`library/alpine`).
    pub repository: String,
    /// Tag; `latest` when neither tag nor digest was given.
    pub tag: Option<String>,
    /// Digest; when present it wins over the tag for fetching.
    pub digest: Option<Digest>,
}

impl Reference {
    /// What to ask the registry for: the digest when there is one, else the tag.
    pub fn target(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_string(),
        }
    }

    /// The host the registry API is served from (Docker Hub's differs from its name).
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            "registry-1.docker.io"
        } else {
            &self.registry
        }
    }

    /// `registry/repository`, without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// Whether plain HTTP is acceptable without `--insecure`.
    pub fn is_loopback(&self) -> bool {
        let host = match self.registry.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => &self.registry,
        };
        matches!(host, "localhost" | "127.0.0.1" | "[::1]")
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

fn invalid(input: &str, reason: impl Into<String>) -> Error {
    Error::InvalidReference {
        input: input.to_string(),
        reason: reason.into(),
    }
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`, the distribution spec's path component.
/// Whether `name` is a valid repository path (`org/app`, lowercase
/// components separated by '/'), as the distribution spec defines it.
pub fn valid_repository(name: &str) -> bool {
    !name.is_empty() && name.len() <= 255 && name.split('/').all(valid_component)
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !b[0].is_ascii_alphanumeric() || !b[b.len() - 1].is_ascii_alphanumeric() {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'a'..=b'z' | b'0'..=b'9' => i += 1,
            b'.' => {
                i += 1;
                if !b[i].is_ascii_alphanumeric() {
                    return false;
                }
            }
            b'_' => {
                i += 1;
                if b[i] == b'_' {
                    i += 1;
                }
                if !b[i].is_ascii_alphanumeric() {
                    return false;
                }
            }
            b'-' => {
                while b[i] == b'-' {
                    i += 1;
                }
                if !b[i].is_ascii_alphanumeric() {
                    return false;
                }
            }
            _ => return false,
        }
    }
    true
}

/// Whether `t` is a valid tag: 1-128 of `[A-Za-z0-9_.-]`, not starting with '.' or '-'.
pub fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

fn valid_host(h: &str) -> bool {
    let (host, port) = match h.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || h.starts_with('[') => (host, Some(port)),
        _ => (h, None),
    };
    let host_ok = if let Some(inner) = host.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
        inner.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && host.split('.').all(|label| {
                !label.is_empty()
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label
                        .bytes()
                        .all(|c| c.is_ascii_alphanumeric() || c == b'-')
            })
    };
    let port_ok =
        port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|c| c.is_ascii_digit()));
    host_ok && port_ok
}

impl FromStr for Reference {
    type Err = Error;

    fn from_str(input: &str) -> Result<Self, Error> {
        if input.is_empty() {
            return Err(invalid(input, "empty reference"));
        }
        if input.len() > 255 + 136 + 130 {
            return Err(invalid(input, "too long"));
        }
        let (rest, digest) = match input.split_once('@') {
            Some((rest, d)) => (
                rest,
                Some(d.parse::<Digest>().map_err(|_| {
                    invalid(
                        input,
                        format!("{d:?} is not a sha256:<64 hex> or sha512:<128 hex> digest"),
                    )
                })?),
            ),
            None => (input, None),
        };
        // A tag follows the last ':' that comes after the last '/'.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(t) = tag {
            if !valid_tag(t) {
                return Err(invalid(
                    input,
                    format!(
                        "tag {t:?} must be 1-128 of [A-Za-z0-9_.-], not starting with '.' or '-'"
                    ),
                ));
            }
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, path))
                if first.contains('.')
                    || first.contains(':')
                    || first == "localhost"
                    || first.starts_with('[') =>
            {
                if !valid_host(first) {
                    return Err(invalid(
                        input,
                        format!("registry host {first:?} is not a valid host[:port]"),
                    ));
                }
                (first.to_string(), path.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        let registry = if registry == "index.docker.io" || registry == "registry-1.docker.io" {
            DOCKER_HUB.to_string()
        } else {
            registry
        };
        if path.is_empty() {
            return Err(invalid(input, "missing repository name"));
        }
        for component in path.split('/') {
            if !valid_component(component) {
                let hint = if component.bytes().any(|b| b.is_ascii_uppercase()) {
                    "repository names must be lowercase"
                } else {
                    "each path component must be [a-z0-9] separated by '.', '_', '__' or '-'"
                };
                return Err(invalid(
                    input,
                    format!("{component:?} in the repository name: {hint}"),
                ));
            }
        }
        if registry.len() + 1 + path.len() > 255 {
            return Err(invalid(input, "repository name longer than 255 characters"));
        }
        let repository = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, Some(_)) => None,
            (None, None) => Some("latest".to_string()),
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(s: &str) -> String {
        s.parse::<Reference>().unwrap().to_string()
    }

    #[test]
    fn normalizes_like_docker() {
        assert_eq!(norm("alpine"), "docker.io/library/alpine:latest");
        assert_eq!(norm("library/alpine:3.20"), "docker.io/library/alpine:3.20");
        assert_eq!(norm("docker.io/alpine"), "docker.io/library/alpine:latest");
        assert_eq!(norm("index.docker.io/foo/bar:1"), "docker.io/foo/bar:1");
        assert_eq!(norm("host:5000/org/app:tag"), "host:5000/org/app:tag");
        assert_eq!(norm("localhost/app"), "localhost/app:latest");
        assert_eq!(
            norm("127.0.0.1:5000/a/b/c:v1.2-rc_3"),
            "127.0.0.1:5000/a/b/c:v1.2-rc_3"
        );
        assert_eq!(norm("[::1]:5000/app"), "[::1]:5000/app:latest");
        assert_eq!(
            norm("my-org/my_app__x"),
            "docker.io/my-org/my_app__x:latest"
        );
        let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert_eq!(
            norm(&format!("alpine@{d}")),
            format!("docker.io/library/alpine@{d}")
        );
        assert_eq!(
            norm(&format!("alpine:3@{d}")),
            format!("docker.io/library/alpine:3@{d}")
        );
        let r: Reference = format!("h:1/a@{d}").parse().unwrap();
        assert_eq!(r.target(), d);
        assert!(!r.is_loopback());
        assert!("localhost:5000/a"
            .parse::<Reference>()
            .unwrap()
            .is_loopback());
    }

    #[test]
    fn refuses_malformed() {
        for bad in [
            "",
            "Alpine",
            "alpine:",
            "alpine:-x",
            "alpine@sha256:abc",
            "a//b",
            "a/",
            "-a",
            "a..b",
            "host:5000/",
            "host:port/app",
            "a b",
            "alpine:tag:more",
            "exa_mple.com/app",
        ] {
            let err = bad.parse::<Reference>();
            assert!(err.is_err(), "{bad:?} parsed as {:?}", err);
            assert!(err
                .unwrap_err()
                .to_string()
                .contains("invalid image reference"));
        }
    }
}
