//! Registry credentials and `WWW-Authenticate` challenges.

use std::collections::BTreeMap;
use std::path::PathBuf;

use base64::Engine as _;

use crate::reference::DOCKER_HUB;

/// A username and password (or token) for a registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <redacted>)", self.username)
    }
}

impl Credentials {
    /// Parse `user:password` (the password may itself contain ':').
    pub fn parse(s: &str) -> Option<Credentials> {
        let (u, p) = s.split_once(':')?;
        Some(Credentials {
            username: u.to_string(),
            password: p.to_string(),
        })
    }

    /// The value of an `Authorization: Basic` header.
    pub fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }

    /// Credentials for `registry` from Docker's `config.json` (`auths`), in
    /// `$DOCKER_CONFIG` or `~/.docker`. Credential helpers are not consulted.
    pub fn from_docker_config(registry: &str) -> Option<Credentials> {
        let dir = std::env::var_os("DOCKER_CONFIG")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")))?;
        let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
        Self::from_docker_config_text(&text, registry)
    }

    fn from_docker_config_text(text: &str, registry: &str) -> Option<Credentials> {
        #[derive(serde::Deserialize)]
        struct Entry {
            auth: Option<String>,
            username: Option<String>,
            password: Option<String>,
        }
        #[derive(serde::Deserialize)]
        struct Config {
            #[serde(default)]
            auths: BTreeMap<String, Entry>,
        }
        let config: Config = serde_json::from_str(text).ok()?;
        let mut keys = vec![
            registry.to_string(),
            format!("https://{registry}"),
            format!("http://{registry}"),
        ];
        if registry == DOCKER_HUB {
            keys.extend(
                [
                    "https://index.docker.io/v1/",
                    "index.docker.io",
                    "registry-1.docker.io",
                ]
                .map(String::from),
            );
        }
        let host_of = |k: &str| {
            k.trim_start_matches("https://")
                .trim_start_matches("http://")
                .split('/')
                .next()
                .unwrap_or("")
                .to_string()
        };
        let entry = keys.iter().find_map(|k| config.auths.get(k)).or_else(|| {
            config
                .auths
                .iter()
                .find(|(k, _)| host_of(k) == registry)
                .map(|(_, v)| v)
        })?;
        if let Some(auth) = &entry.auth {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .ok()?;
            return Credentials::parse(&String::from_utf8(raw).ok()?);
        }
        Some(Credentials {
            username: entry.username.clone()?,
            password: entry.password.clone()?,
        })
    }
}

/// A parsed `WWW-Authenticate` header.
#[derive(Debug, PartialEq, Eq)]
pub struct Challenge {
    /// `basic` or `bearer`, lower-cased.
    pub scheme: String,
    pub params: BTreeMap<String, String>,
}

impl Challenge {
    /// Parse `Scheme k="v", k2=v2`. Quoted values may contain commas.
    pub fn parse(header: &str) -> Option<Challenge> {
        let header = header.trim();
        let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
        if scheme.is_empty() {
            return None;
        }
        let mut params = BTreeMap::new();
        let mut chars = rest.chars().peekable();
        loop {
            while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
                chars.next();
            }
            let key: String =
                std::iter::from_fn(|| chars.next_if(|c| *c != '=' && *c != ',')).collect();
            if key.is_empty() {
                break;
            }
            if chars.next() != Some('=') {
                break;
            }
            let mut value = String::new();
            if chars.peek() == Some(&'"') {
                chars.next();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => value.extend(chars.next()),
                        '"' => break,
                        c => value.push(c),
                    }
                }
            } else {
                value = std::iter::from_fn(|| chars.next_if(|c| *c != ','))
                    .collect::<String>()
                    .trim()
                    .to_string();
            }
            params.insert(key.trim().to_ascii_lowercase(), value);
        }
        Some(Challenge {
            scheme: scheme.to_ascii_lowercase(),
            params,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_challenges() {
        let c = Challenge::parse(r#"Bearer realm="https://auth.example/token",service="reg",scope="repository:a/b:pull,push""#).unwrap();
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.params["realm"], "https://auth.example/token");
        assert_eq!(c.params["service"], "reg");
        assert_eq!(c.params["scope"], "repository:a/b:pull,push");
        let c = Challenge::parse(r#"Basic realm="Registry Realm""#).unwrap();
        assert_eq!(c.scheme, "basic");
        assert_eq!(c.params["realm"], "Registry Realm");
        assert!(Challenge::parse("").is_none());
    }

    #[test]
    fn reads_docker_config() {
        let text = r#"{"auths":{"https://index.docker.io/v1/":{"auth":"dTpwOng="},"localhost:5000":{"username":"a","password":"b"}}}"#;
        let hub = Credentials::from_docker_config_text(text, "docker.io").unwrap();
        assert_eq!((hub.username.as_str(), hub.password.as_str()), ("u", "p:x"));
        let local = Credentials::from_docker_config_text(text, "localhost:5000").unwrap();
        assert_eq!(local.basic_header(), "Basic YTpi");
        assert!(Credentials::from_docker_config_text(text, "other:1").is_none());
    }
}
