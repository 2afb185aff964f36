//! The node's seams to the data planes, implemented over the real ones:
//! [`hangar_api::routing::Ingress`] over the edge and
//! [`hangar_api::egress::EgressControl`] over the egress proxy. Types
//! change hands here and nothing is decided.

use std::sync::Arc;
use std::time::Duration;

use hangar_api::egress::{EgressControl, EgressPolicy};
use hangar_api::routing::{HostSpec, InFlightGauge, Ingress, MeshSpec};

/// The edge as the node's ingress.
pub struct EdgeIngress {
    pub edge: Arc<hangar_edge::Edge>,
    /// The edge starts a host's health checks on its runtime.
    pub runtime: tokio::runtime::Handle,
}

impl Ingress for EdgeIngress {
    fn set_hosts(&self, hosts: &[HostSpec]) {
        let hosts: Vec<hangar_edge::config::Host> = hosts
            .iter()
            .map(|h| {
                let mut host = hangar_edge::config::Host {
                    name: h.name.clone(),
                    backends: h.backends.iter().map(|(addr, _)| *addr).collect(),
                    alternates: h.backends.iter().cloned().collect(),
                    autostart: h.autostart,
                    force_https: h.force_https,
                    soft_limit: h.soft_limit,
                    hard_limit: h.hard_limit,
                    elsewhere: h.elsewhere.clone(),
                    asleep_elsewhere: h.asleep_elsewhere.clone(),
                    instances: h.instances.iter().cloned().collect(),
                    instances_elsewhere: h.instances_elsewhere.iter().cloned().collect(),
                    rate_limit: h
                        .rate_limit
                        .as_ref()
                        .map(|r| hangar_edge::config::RateLimit {
                            per_app: r.per_app,
                            per_app_burst: r.per_app_burst,
                            per_client: r.per_client,
                            per_client_burst: r.per_client_burst,
                        })
                        .unwrap_or_default(),
                    labels: h.labels.clone(),
                    ..Default::default()
                };
                if let Some(cache) = &h.cache {
                    host.cache.enabled = cache.enabled;
                    if cache.enabled {
                        host.cache.default_ttl = Duration::from_secs(cache.default_ttl);
                        host.cache.shield = cache.shield.clone();
                    }
                }
                host
            })
            .collect();
        let _entered = self.runtime.enter();
        self.edge.set_hosts(&hosts);
    }

    fn last_request(&self, host: &str) -> u64 {
        self.edge.last_request(host)
    }

    fn answers_at(&self, ip: std::net::IpAddr) -> hangar_api::routing::Answers {
        let a = self.edge.answers_at(ip);
        hangar_api::routing::Answers {
            classes: a.classes,
            failed: a.failed,
            latency: a.latency,
        }
    }

    fn answer_bounds(&self) -> Vec<f64> {
        hangar_edge::metrics::BUCKETS.to_vec()
    }

    fn in_flight_at(&self, ip: std::net::IpAddr) -> InFlightGauge {
        self.edge.in_flight_at(ip)
    }

    fn has_room(&self, host: &str, addrs: &[std::net::SocketAddr]) -> bool {
        self.edge.has_room(host, addrs)
    }

    fn purge(&self, p: &hangar_api::purge::PurgeSpec) {
        use hangar_api::purge::What;
        use hangar_edge::cache::Purge;
        let host = p.host.clone();
        let what = match &p.what {
            What::Url(path) => Purge::Url {
                host,
                path: path.clone(),
            },
            What::Prefix(prefix) => Purge::Prefix {
                host,
                prefix: prefix.clone(),
            },
            What::Tag(tag) => Purge::Tag {
                host: Some(host),
                tag: tag.clone(),
            },
            What::All => Purge::Host { host },
        };
        self.edge.purge(&what, p.soft);
    }

    fn purge_all(&self) {
        self.edge.purge_all();
    }

    fn fresh_until(&self, until: std::time::Instant) {
        self.edge.set_fresh_until(until);
    }

    fn set_mesh(&self, m: MeshSpec) {
        self.edge.set_mesh(hangar_edge::mesh::MeshConfig {
            node: m.node,
            region: m.region,
            token: m.token,
            weight: m.weight,
            peers: m
                .peers
                .into_iter()
                .map(|p| hangar_edge::mesh::PeerConfig {
                    name: p.name,
                    region: p.region,
                    addr: p.addr,
                    weight: p.weight,
                    delay: p.delay,
                })
                .collect(),
            groups: m.groups,
        });
    }
}

/// The egress proxy as the node's egress control.
pub struct EgressProxy(pub Arc<hangar_egress::Proxy>);

impl EgressControl for EgressProxy {
    fn apply(&self, policy: EgressPolicy) {
        use hangar_api::config::EgressAction;
        use hangar_egress::acl::{Action, Rule};
        let rules: Vec<Rule> = policy
            .rules
            .into_iter()
            .map(|r| Rule {
                name: r.role.clone(),
                project: r.role,
                action: match r.action {
                    EgressAction::Enforce => Action::Enforce,
                    EgressAction::Report => Action::Report,
                    EgressAction::Open => Action::Open,
                },
                allowed_domains: r.allowed_domains,
            })
            .collect();
        // A source the node does not know reaches nothing outside.
        let unknown = Rule {
            name: String::new(),
            project: "unknown".into(),
            action: Action::Enforce,
            allowed_domains: Vec::new(),
        };
        match hangar_egress::Acl::from_rules(rules, Some(unknown)) {
            Ok(acl) => self.0.update(acl, policy.roles),
            Err(e) => tracing::warn!("egress rules not updated: {e}"),
        }
    }
}

/// The host's VXLAN overlay as the node's mesh.
pub struct Overlay(pub hangar_machine::overlay::Overlay);

impl hangar_api::cluster::Mesh for Overlay {
    fn apply(&self, peers: &[hangar_machine::overlay::Peer], members: &[std::net::IpAddr]) {
        if let Err(e) = self.0.apply(peers, members) {
            tracing::warn!("the private network across nodes: {e}");
        }
    }
}

/// The registry's tokens in the cluster's etcd: a token made at one node
/// is good at every node, and a revoke ends it everywhere.
pub struct ClusterTokens(pub Arc<hangar_api::store::EtcdStore>);

/// The document they are kept in.
const TOKENS_DOC: &str = "registry-tokens";

impl ClusterTokens {
    fn read(&self) -> hangar_registry::Result<(Vec<hangar_registry::auth::TokenRecord>, i64)> {
        match self.0.doc(TOKENS_DOC) {
            None => Ok((Vec::new(), 0)),
            Some((bytes, rev)) => serde_json::from_slice(&bytes)
                .map(|t| (t, rev))
                .map_err(|e| {
                    hangar_registry::Error::Invalid(format!(
                        "the cluster's registry tokens in etcd do not read: {e}"
                    ))
                }),
        }
    }
}

impl hangar_registry::auth::TokenStore for ClusterTokens {
    fn load(&self) -> hangar_registry::Result<Vec<hangar_registry::auth::TokenRecord>> {
        self.read().map(|(t, _)| t)
    }

    fn edit(
        &self,
        f: &mut dyn FnMut(
            &mut Vec<hangar_registry::auth::TokenRecord>,
        ) -> hangar_registry::Result<()>,
    ) -> hangar_registry::Result<()> {
        for _ in 0..10 {
            let (mut tokens, rev) = self.read()?;
            f(&mut tokens)?;
            let bytes = serde_json::to_vec(&tokens)
                .map_err(|e| hangar_registry::Error::Invalid(e.to_string()))?;
            match self.0.put_doc(TOKENS_DOC, bytes, rev) {
                Ok(true) => return Ok(()),
                Ok(false) => continue,
                Err(e) => {
                    return Err(hangar_registry::Error::Invalid(format!(
                        "the cluster's registry tokens were not written: {e}"
                    )))
                }
            }
        }
        Err(hangar_registry::Error::Invalid(
            "the cluster's registry tokens kept changing under this edit; try again".into(),
        ))
    }
}
