//! The edge's configuration: `edge.toml` for `hangar edge serve`, or built
//! by `hangar up` from its state. Everything but `listen` and the hosts has
//! a default; unknown keys are errors with their line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub listen: SocketAddr,
    pub tls: Option<Tls>,
    pub admin: Option<Admin>,
    pub limits: Limits,
    pub cache: CacheConfig,
    pub hosts: Vec<Host>,
    /// The other edges of a cluster (`hangar up` sets it from the
    /// cluster's members; `hangar edge serve` reads `[mesh]`).
    pub mesh: Option<crate::mesh::MeshConfig>,
    /// Serve nothing from the cache as fresh until `Edge::set_fresh_until`
    /// says so (a cluster's node, which first applies the purges it
    /// missed, then keeps moving the horizon on).
    pub await_purges: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            tls: None,
            admin: None,
            limits: Limits::default(),
            cache: CacheConfig::default(),
            hosts: Vec::new(),
            mesh: None,
            await_purges: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The admin endpoint: `/metrics` and `/purge`, both behind the bearer token.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    pub listen: SocketAddr,
    pub token: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    #[serde(deserialize_with = "size")]
    pub max_header_bytes: u64,
    #[serde(deserialize_with = "size")]
    pub max_body_bytes: u64,
    /// Longest wait for the next piece of a request (headers or body).
    #[serde(deserialize_with = "duration")]
    pub client_timeout: Duration,
    #[serde(deserialize_with = "duration")]
    pub connect_timeout: Duration,
    /// Longest wait for a backend's response head.
    #[serde(deserialize_with = "duration")]
    pub upstream_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 64 << 10,
            max_body_bytes: 100 << 20,
            client_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(3),
            upstream_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    #[serde(deserialize_with = "size")]
    pub memory: u64,
    /// The disk tier's directory; none: memory only.
    pub dir: Option<PathBuf>,
    #[serde(deserialize_with = "size")]
    pub disk: u64,
    /// Larger objects stream through without being stored.
    #[serde(deserialize_with = "size")]
    pub max_object: u64,
    /// Longest a request waits for another request's origin fetch.
    #[serde(deserialize_with = "duration")]
    pub lock_timeout: Duration,
    /// How long a key found uncacheable skips coalescing.
    #[serde(deserialize_with = "duration")]
    pub uncacheable_ttl: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            memory: 256 << 20,
            dir: None,
            disk: 1 << 30,
            max_object: 16 << 20,
            lock_timeout: Duration::from_secs(5),
            uncacheable_ttl: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Host {
    pub name: String,
    pub backends: Vec<SocketAddr>,
    /// Other addresses of a backend (a machine's IPv6 address beside its
    /// IPv4 one), tried in order when it refuses a connection.
    pub alternates: std::collections::BTreeMap<SocketAddr, Vec<SocketAddr>>,
    pub health: Health,
    pub cache: HostCache,
    /// When no backend is started, ask the node to start one (scale to
    /// zero; needs a node: `hangar up` sets it).
    pub autostart: bool,
    /// Requests in flight per backend above which another is started.
    pub soft_limit: u32,
    /// Requests in flight a backend takes at most (0: no limit).
    pub hard_limit: u32,
    /// How long a request waits for room when every backend is at its
    /// hard limit, before a 503.
    #[serde(deserialize_with = "duration")]
    pub queue_timeout: Duration,
    /// Answer plain HTTP with a redirect to HTTPS (when TLS is on).
    pub force_https: bool,
    /// Other edge nodes (by name, see [`crate::mesh`]) with machines of
    /// this app in service: when none here has room, the nearest of them
    /// serves.
    pub elsewhere: Vec<String>,
    /// Other edge nodes that can start a stopped machine of this app: when
    /// none is started anywhere and none here can start, the nearest of
    /// them is asked.
    pub asleep_elsewhere: Vec<String>,
    /// Its machines by id (for `hangar-force-instance-id` and replays to
    /// an instance): the backends here...
    pub instances: std::collections::BTreeMap<String, SocketAddr>,
    /// ...and the nodes the others are on.
    pub instances_elsewhere: std::collections::BTreeMap<String, String>,
    pub rate_limit: RateLimit,
    /// Labels on every series of this host (a node sets `org` and `app`).
    pub labels: std::collections::BTreeMap<String, String>,
}

/// Requests per second the edge lets through, as token buckets (0: no
/// limit); past them a 429 with `Retry-After`. Counted per region: the
/// app's rate is shared evenly by the region's edges; a client's is
/// counted at each edge it reaches (by its address).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimit {
    pub per_app: u32,
    /// Requests above the rate taken at once (default: one second's).
    pub per_app_burst: u32,
    pub per_client: u32,
    pub per_client_burst: u32,
}

impl Default for Host {
    fn default() -> Self {
        Host {
            name: String::new(),
            backends: Vec::new(),
            alternates: Default::default(),
            health: Health::default(),
            cache: HostCache::default(),
            autostart: false,
            soft_limit: 0,
            hard_limit: 0,
            queue_timeout: Duration::from_secs(5),
            force_https: false,
            elsewhere: Vec::new(),
            asleep_elsewhere: Vec::new(),
            instances: Default::default(),
            instances_elsewhere: Default::default(),
            rate_limit: RateLimit::default(),
            labels: Default::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Health {
    /// Active checks: `GET path` on each backend; none: passive only.
    pub path: Option<String>,
    #[serde(deserialize_with = "duration")]
    pub interval: Duration,
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
    /// Consecutive passes that bring a backend back.
    pub healthy_threshold: u32,
    /// Consecutive failures that take it out.
    pub unhealthy_threshold: u32,
    /// Passive: consecutive request failures that eject a backend.
    pub max_failures: u32,
    /// Passive: how long an ejection lasts.
    #[serde(deserialize_with = "duration")]
    pub eject_for: Duration,
    /// Passive: eject a backend whose latency is this many times its
    /// peers' median (and above `slow_floor`).
    pub slow_ratio: f64,
    #[serde(deserialize_with = "duration")]
    pub slow_floor: Duration,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            path: None,
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            healthy_threshold: 1,
            unhealthy_threshold: 2,
            max_failures: 3,
            eject_for: Duration::from_secs(30),
            slow_ratio: 5.0,
            slow_floor: Duration::from_millis(100),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HostCache {
    pub enabled: bool,
    /// Freshness for responses that state none (and have no Last-Modified).
    #[serde(deserialize_with = "duration")]
    pub default_ttl: Duration,
    /// In a cluster, the region whose edges alone fetch from the origin:
    /// misses elsewhere go through it (see [`crate::mesh`]).
    pub shield: Option<String>,
}

impl Default for HostCache {
    fn default() -> Self {
        HostCache {
            enabled: true,
            default_ttl: Duration::ZERO,
            shield: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl Config {
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Config::parse(&text)
            .map_err(|message| ConfigError::Parse {
                path: path.into(),
                message,
            })
            .and_then(|c| {
                c.validate()
                    .map(|()| c)
                    .map_err(|message| ConfigError::Invalid {
                        path: path.into(),
                        message,
                    })
            })
    }

    /// Parse TOML text; the error names the line.
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str::<Config>(text).map_err(|e| {
            let line = e.span().map(|s| text[..s.start].matches('\n').count() + 1);
            match line {
                Some(l) => format!("line {l}: {}", e.message()),
                None => e.message().to_string(),
            }
        })
    }

    pub fn validate(&self) -> Result<(), String> {
        let mut seen = std::collections::HashSet::new();
        for h in &self.hosts {
            let name = h.name.to_ascii_lowercase();
            if name.is_empty() || name.contains(['/', ' ', ':']) {
                return Err(format!(
                    "hosts: {:?} is not a host name (e.g. \"app.localhost\")",
                    h.name
                ));
            }
            if !seen.insert(name) {
                return Err(format!("hosts: {} is listed twice", h.name));
            }
            if let Some(p) = &h.health.path {
                if !p.starts_with('/') {
                    return Err(format!(
                        "hosts.{}: health.path {p:?} must start with /",
                        h.name
                    ));
                }
            }
            if h.health.interval.is_zero() || h.health.timeout.is_zero() {
                return Err(format!(
                    "hosts.{}: health interval and timeout must be above zero",
                    h.name
                ));
            }
        }
        if let Some(m) = &self.mesh {
            if m.node.is_empty() || m.region.is_empty() || m.token.len() < 16 {
                return Err(
                    "mesh: node, region and a token of at least 16 characters are needed".into(),
                );
            }
            for h in &self.hosts {
                if let Some(s) = &h.cache.shield {
                    if s != &m.region && !m.peers.iter().any(|p| &p.region == s) {
                        return Err(format!("hosts.{}: cache.shield {s:?} is no region of the mesh (its regions: {})", h.name, m.regions().join(", ")));
                    }
                }
            }
        }
        if self.limits.max_header_bytes < 1024 {
            return Err("limits.max_header_bytes must be at least 1KiB".into());
        }
        Ok(())
    }
}

/// `"5s"`, `"250ms"`, `"1.5s"`, `"2m"`, `"1h"`, `"1d"`, or a number of
/// seconds: the grammar of every duration in Hangar (the `fundu` crate's).
pub fn parse_duration(s: &str) -> Option<Duration> {
    fundu::DurationParser::new()
        .parse(s.trim())
        .ok()?
        .try_into()
        .ok()
}

/// `"256MiB"`, `"1GiB"`, `"1gb"`, `"64K"`, `"512B"`, or a number of bytes:
/// every size in Hangar is binary (K = 1024, as nginx and Docker read
/// them), case aside (the `parse-size` crate's).
pub fn parse_size(s: &str) -> Option<u64> {
    parse_size::Config::new()
        .with_binary()
        .parse_size(s.trim())
        .ok()
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NumOrStr {
    Num(u64),
    Str(String),
}

pub(crate) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    match NumOrStr::deserialize(d)? {
        NumOrStr::Num(n) => Ok(Duration::from_secs(n)),
        NumOrStr::Str(s) => parse_duration(&s).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "{s:?} is not a duration (e.g. \"5s\", \"250ms\", \"2m\")"
            ))
        }),
    }
}

fn size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match NumOrStr::deserialize(d)? {
        NumOrStr::Num(n) => Ok(n),
        NumOrStr::Str(s) => parse_size(&s).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "{s:?} is not a size (e.g. \"64KiB\", \"256MiB\", \"1GiB\")"
            ))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_minimal_file_works_and_defaults_apply() {
        let c = Config::parse(
            "listen = \"127.0.0.1:8080\"\n[[hosts]]\nname = \"app.localhost\"\nbackends = [\"127.0.0.1:9000\"]\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.hosts[0].backends.len(), 1);
        assert!(c.hosts[0].cache.enabled);
        assert_eq!(c.cache.lock_timeout, Duration::from_secs(5));
    }

    #[test]
    fn errors_name_the_line() {
        let e =
            Config::parse("listen = \"127.0.0.1:8080\"\n[[hosts]]\nname = \"a\"\nbakends = []\n")
                .unwrap_err();
        assert!(e.starts_with("line 4:") && e.contains("bakends"), "{e}");
        let e = Config::parse("[cache]\nmemory = \"12 parsecs\"\n").unwrap_err();
        assert!(e.contains("line 2") && e.contains("not a size"), "{e}");
        let c = Config::parse("[[hosts]]\nname = \"a\"\n[[hosts]]\nname = \"A\"\n").unwrap();
        assert!(c.validate().unwrap_err().contains("twice"));
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("5 fortnights"), None);
        assert_eq!(parse_size("64KiB"), Some(65536));
        assert_eq!(parse_size("1GiB"), Some(1 << 30));
        assert_eq!(parse_size("99999999999999999999GiB"), None);
        // One meaning for each: the same as hangar.toml's.
        assert_eq!(parse_size("1gb"), Some(1 << 30));
        assert_eq!(parse_size("1GB"), Some(1 << 30));
        assert_eq!(parse_duration("1d"), Some(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_duration("-1s"), None);
    }
}
