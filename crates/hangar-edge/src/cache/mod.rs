//! The cache: keys ([`primary_key`], Vary secondary keys), HTTP decisions
//! ([`policy`]), storage tiers ([`store`] with [`evict`]), coalesced fills
//! ([`fill`]) and purges.
//!
//! The proxy asks the cache by key and, on a miss, fetches through a fill;
//! where the fetch goes is the proxy's business. That is the seam for
//! sharding: a node that does not own a key will fill from the owning peer
//! instead of the origin, with the same lookup, coalescing and storage.

pub mod evict;
pub mod fill;
pub mod policy;
pub mod store;

use std::sync::Arc;

use hyper::header::{HeaderMap, HeaderName};

use crate::config::CacheConfig;
use fill::Fills;
use store::{Limits, Store};

pub struct Cache {
    pub store: Arc<Store>,
    pub fills: Arc<Fills>,
    pub config: CacheConfig,
}

impl Cache {
    pub fn open(config: CacheConfig) -> Result<Cache, store::DiskError> {
        let limits = Limits {
            memory: config.memory,
            disk: config.dir.clone().map(|d| (d, config.disk)),
        };
        Ok(Cache {
            store: Arc::new(Store::open(limits)?),
            fills: Arc::default(),
            config,
        })
    }

    /// Apply a purge; returns how many objects it touched. Every kind
    /// reads an index (URL, ordered primary keys, surrogate keys): none
    /// scans the store.
    pub fn purge(&self, what: &Purge, soft: bool) -> usize {
        match what {
            Purge::Url { host, path } => {
                let primary = primary_key(host, path);
                self.fills.forget(&primary);
                self.store.purge_primary(&primary, soft)
            }
            Purge::Prefix { host, prefix } => {
                self.store.purge_prefix(&primary_key(host, prefix), soft)
            }
            // Every path starts with "/", and no host name holds one.
            Purge::Host { host } => self.store.purge_prefix(&primary_key(host, "/"), soft),
            Purge::Tag { host, tag } => self.store.purge_tag(tag, host.as_deref(), soft),
        }
    }
}

/// What a purge selects.
#[derive(Debug, Clone, PartialEq)]
pub enum Purge {
    /// One URL (every Vary variant of it).
    Url { host: String, path: String },
    /// Every URL of `host` whose path starts with `prefix`.
    Prefix { host: String, prefix: String },
    /// Every object carrying this surrogate key (on any host, or one).
    Tag { host: Option<String>, tag: String },
    /// A whole host.
    Host { host: String },
}

/// The primary key: host and path with query.
pub fn primary_key(host: &str, path_and_query: &str) -> String {
    let mut k = String::with_capacity(host.len() + path_and_query.len());
    k.push_str(host);
    k.push_str(path_and_query);
    k
}

/// The full key: the primary key plus the normalized values of the
/// request headers the response varies on.
pub fn full_key(primary: &str, vary: &[String], req: &HeaderMap) -> String {
    if vary.is_empty() {
        return primary.to_string();
    }
    let mut k = primary.to_string();
    for name in vary {
        k.push('\n');
        k.push_str(name);
        k.push('=');
        let values: Vec<&str> = req
            .get_all(name.as_str())
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        k.push_str(&normalize(name, &values.join(",")));
    }
    k
}

/// Normalize a header value for matching (RFC 9111 section 4.1): case and
/// whitespace do not matter, nor the order of list items.
fn normalize(name: &str, value: &str) -> String {
    let value = value.to_ascii_lowercase();
    let mut items: Vec<String> = policy::split_list(&value)
        .into_iter()
        .map(|i| i.split_whitespace().collect::<Vec<_>>().join(""))
        .collect();
    if name.starts_with("accept") {
        items.sort();
        items.dedup();
    }
    items.join(",")
}

/// The lowercase, sorted header names of a response's Vary.
pub fn vary_names(resp: &HeaderMap) -> Vec<String> {
    let mut names: Vec<String> = resp
        .get_all(hyper::header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty() && HeaderName::from_bytes(n.as_bytes()).is_ok())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Surrogate keys: `Surrogate-Key` (space-separated) and `Cache-Tag`
/// (comma-separated).
pub fn tags(resp: &HeaderMap) -> Vec<String> {
    let mut tags = Vec::new();
    for v in resp
        .get_all("surrogate-key")
        .iter()
        .filter_map(|v| v.to_str().ok())
    {
        tags.extend(v.split_whitespace().map(str::to_string));
    }
    for v in resp
        .get_all("cache-tag")
        .iter()
        .filter_map(|v| v.to_str().ok())
    {
        tags.extend(
            v.split(',')
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty()),
        );
    }
    tags.sort();
    tags.dedup();
    tags
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    #[test]
    fn vary_keys_are_normalized() {
        let mut resp = HeaderMap::new();
        resp.append(
            "vary",
            HeaderValue::from_static("Accept-Encoding, accept-language"),
        );
        resp.append("vary", HeaderValue::from_static("Accept-Encoding"));
        let vary = vary_names(&resp);
        assert_eq!(vary, vec!["accept-encoding", "accept-language"]);
        let mut a = HeaderMap::new();
        a.insert("accept-encoding", HeaderValue::from_static("gzip, br"));
        let mut b = HeaderMap::new();
        b.insert("accept-encoding", HeaderValue::from_static("BR,gzip"));
        assert_eq!(full_key("h/p", &vary, &a), full_key("h/p", &vary, &b));
        let mut c = HeaderMap::new();
        c.insert("accept-encoding", HeaderValue::from_static("gzip"));
        assert_ne!(full_key("h/p", &vary, &a), full_key("h/p", &vary, &c));
        assert_eq!(full_key("h/p", &[], &a), "h/p");
    }

    #[test]
    fn surrogate_keys_from_both_headers() {
        let mut resp = HeaderMap::new();
        resp.insert("surrogate-key", HeaderValue::from_static("post-1  user-2"));
        resp.insert("cache-tag", HeaderValue::from_static("post-1, blog"));
        assert_eq!(tags(&resp), vec!["blog", "post-1", "user-2"]);
    }
}
