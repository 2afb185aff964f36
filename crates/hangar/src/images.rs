//! Images for machines: whether a caller may run an image, and fetching it
//! into the node's store for that caller.
//!
//! The admin (the node's token) runs anything, with the operator's registry
//! credentials. An org runs an image only when it may pull it, checked on
//! every use, never from what happens to be in the shared store:
//! - from the node's own registry, by the registry's own rules (its own
//!   repositories, or public ones), pulling with a read-only token of the org;
//! - from any other registry, with the org's own login there if it has one
//!   (`/v1/registry-logins`), else anonymously (never with the operator's
//!   credentials), and never at the node's own or private addresses (loopback,
//!   the machine network, the host's interfaces) unless the operator allows
//!   that registry with `hangar up --allow-registry`.
//!
//! In a cluster, an image in another node's registry (a member's, as the
//! store lists them) is pulled from there with a read-only cluster pull
//! token of the calling org, so that registry applies that org's rights as
//! to its own tokens (the admin's replacements use the token of the org
//! whose repository it is): what is pushed at one node runs on every node,
//! and no more.
//!
//! Every refusal an org sees reads the same as a missing image: it tells
//! nothing of what exists in another org or listens on the node.
//! It must not decide anything about machines themselves (the API does).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, Result};
use hangar_oci::client::{AddressFilter, ClientOptions, NoProgress, PullOptions};
use hangar_oci::{Reference, Store};
use hangar_registry::Registry;

pub struct Images {
    store: Store,
    home: PathBuf,
    /// The node's registry and the address it listens on.
    registry: Option<(Arc<Registry>, SocketAddr)>,
    /// `host:port` of registries the operator allows at private addresses.
    allowed: Vec<String>,
    /// In a cluster: its secret, and the registries of its members now.
    cluster: Option<(Vec<u8>, Peers)>,
}

/// The `host:port` of the registries of the cluster's members.
pub type Peers = Arc<dyn Fn() -> Vec<String> + Send + Sync>;

impl Images {
    pub fn new(
        store: Store,
        home: PathBuf,
        registry: Option<(Arc<Registry>, SocketAddr)>,
        allowed: Vec<String>,
    ) -> Images {
        Images {
            store,
            home,
            registry,
            allowed,
            cluster: None,
        }
    }

    /// Pull from the registries of the cluster's members as the cluster.
    pub fn with_cluster(mut self, secret: Vec<u8>, peers: Peers) -> Images {
        self.cluster = Some((secret, peers));
        self
    }

    /// Whether `reference` names this node's own registry.
    fn is_own(&self, reference: &Reference) -> bool {
        self.registry
            .as_ref()
            .is_some_and(|(_, addr)| names_own_registry(&reference.registry, *addr))
    }

    /// How to pull `reference` for `org` when it is in another member's
    /// registry: with `org`'s cluster token, so that registry applies
    /// `org`'s rights (its own repositories, public ones); for the admin
    /// (`None`), with the token of the org whose repository it is.
    fn peer_pull(&self, org: Option<&str>, reference: &Reference) -> Option<ClientOptions> {
        let (secret, peers) = self.cluster.as_ref()?;
        if self.is_own(reference) || !peers().contains(&reference.registry) {
            return None;
        }
        let org = org.unwrap_or_else(|| hangar_registry::auth::org_of(&reference.repository));
        Some(ClientOptions {
            creds: Some(hangar_oci::auth::Credentials {
                username: org.to_string(),
                password: hangar_registry::auth::cluster_token(secret, org),
            }),
            no_docker_config: true,
            insecure: true,
            ..Default::default()
        })
    }

    /// Make `reference` usable by a machine of `org` (`None`: the admin), or
    /// say why not (for an org: the same words whatever the reason).
    pub async fn fetch(
        &self,
        org: Option<String>,
        reference: Reference,
        login: Option<(String, String)>,
    ) -> Result<(), String> {
        // The admin runs what the store has; an org's right is checked on
        // every use.
        if org.is_none() && self.store.resolve(&reference).is_ok() {
            return Ok(());
        }
        if let Some(opts) = self.peer_pull(org.as_deref(), &reference) {
            return pull(&self.store, &reference, opts)
                .await
                .map_err(|e| match &org {
                    Some(o) => {
                        tracing::warn!(
                            "image {reference} from a member's registry refused for org {o}: {e:#}"
                        );
                        not_found(o, &reference, None)
                    }
                    None => format!(
                        "cannot get image {reference} from the cluster member's registry: {e:#}"
                    ),
                });
        }
        let Some(org) = org else {
            // The node's own registry: as the org whose repository it is.
            if self.is_own(&reference) {
                let owner = hangar_registry::auth::org_of(&reference.repository).to_string();
                return self.fetch_for(&owner, &reference, None).await.map_err(
                    |(Refusal::Quiet(e) | Refusal::Remote(e))| {
                        format!("cannot get image {reference} from this node's registry: {e:#}")
                    },
                );
            }
            return pull(&self.store, &reference, ClientOptions::default())
                .await
                .map_err(|e| format!("cannot get image {reference}: {e:#}"));
        };
        match self.fetch_for(&org, &reference, login).await {
            Ok(()) => Ok(()),
            Err(Refusal::Quiet(why)) => {
                tracing::warn!("image {reference} refused for org {org}: {why:#}");
                Err(not_found(&org, &reference, None))
            }
            Err(Refusal::Remote(why)) => Err(not_found(&org, &reference, Some(why))),
        }
    }

    async fn fetch_for(
        &self,
        org: &str,
        reference: &Reference,
        login: Option<(String, String)>,
    ) -> Result<(), Refusal> {
        if let Some((registry, addr)) = &self.registry {
            if names_own_registry(&reference.registry, *addr) {
                let token = pull_token(registry, &self.home, org).map_err(Refusal::Quiet)?;
                let opts = ClientOptions {
                    creds: Some(hangar_oci::auth::Credentials {
                        username: org.to_string(),
                        password: token,
                    }),
                    no_docker_config: true,
                    // The node's own registry speaks plain HTTP, at
                    // whatever address it listens on.
                    insecure: true,
                    ..Default::default()
                };
                return pull(&self.store, reference, opts)
                    .await
                    .map_err(Refusal::Quiet);
            }
        }
        // The org's own login there, if it has one (`hangar registry
        // login --org`), checked by that registry on every use.
        let mut opts = ClientOptions {
            creds: login
                .map(|(username, password)| hangar_oci::auth::Credentials { username, password }),
            no_docker_config: true,
            ..Default::default()
        };
        if !self.allowed.contains(&reference.registry) {
            // Judge the addresses before any connection, so a refusal costs
            // the node nothing and tells nothing; the filter then holds for
            // every connection the pull makes (redirects, token realms).
            let (host, port) = host_port(reference.api_host());
            let local = local_addresses();
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
                .await
                .map_err(|e| Refusal::Quiet(anyhow!("cannot resolve {host}: {e}")))?
                .collect();
            if let Some(bad) = found.iter().find(|a| refused(a.ip(), &local).is_some()) {
                return Err(Refusal::Quiet(anyhow!(
                    "{host} is at {} ({})",
                    bad.ip(),
                    refused(bad.ip(), &local).unwrap_or_default()
                )));
            }
            opts.addresses = Some(AddressFilter(Arc::new(move |ip| {
                match refused(ip, &local) {
                    Some(why) => Err(why),
                    None => Ok(()),
                }
            })));
        }
        pull(&self.store, reference, opts)
            .await
            .map_err(Refusal::Remote)
    }
}

enum Refusal {
    /// Nothing of it may reach the org.
    Quiet(anyhow::Error),
    /// What another registry said: the org may see it.
    Remote(anyhow::Error),
}

fn not_found(org: &str, reference: &Reference, remote: Option<anyhow::Error>) -> String {
    let mut msg = format!(
        "image {reference} was not found, or org {org} may not pull it: push it to the node's registry under {org}/ (or make it public there), or name a public registry's image"
    );
    if let Some(e) = remote {
        msg.push_str(&format!(" (the registry said: {e:#})"));
    }
    msg
}

async fn pull(store: &Store, reference: &Reference, client: ClientOptions) -> Result<()> {
    let opts = PullOptions {
        client,
        ..Default::default()
    };
    hangar_oci::client::pull(store, reference, &opts, Arc::new(NoProgress)).await?;
    Ok(())
}

/// Whether registry `host:port` of a reference is the node's registry
/// listening at `addr`.
fn names_own_registry(registry: &str, addr: SocketAddr) -> bool {
    let (host, port) = host_port(registry);
    if port != addr.port() {
        return false;
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match host.parse::<IpAddr>() {
        Ok(ip) => ip == addr.ip() || (ip.is_loopback() && addr.ip().is_loopback()),
        Err(_) => host == "localhost" && addr.ip().is_loopback(),
    }
}

/// `host` and port of a registry host (443 when it names none).
fn host_port(registry: &str) -> (String, u16) {
    match registry.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(':') && p.bytes().all(|b| b.is_ascii_digit()) => {
            (h.to_string(), p.parse().unwrap_or(443))
        }
        _ => (registry.to_string(), 443),
    }
}

/// Why a tenant's pull may not connect to `ip`: the host's own addresses and
/// every special-purpose range (loopback, private, link-local, the machine
/// network); `None` for an ordinary public address.
fn refused(ip: IpAddr, local: &[IpAddr]) -> Option<String> {
    let ip = hangar_egress::ip::canonical(ip);
    if local.contains(&ip) {
        return Some("an address of this node".into());
    }
    hangar_egress::ip::special(ip).map(|(why, _)| why.to_string())
}

/// The addresses of the host's interfaces.
fn local_addresses() -> Vec<IpAddr> {
    let mut found = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we walk read-only and free
    // once with freeifaddrs; every sockaddr is read by its family.
    unsafe {
        if libc::getifaddrs(&mut head) != 0 {
            return found;
        }
        let mut cur = head;
        while !cur.is_null() {
            let sa = (*cur).ifa_addr;
            if !sa.is_null() {
                match i32::from((*sa).sa_family) {
                    libc::AF_INET => {
                        let v4 = &*(sa as *const libc::sockaddr_in);
                        found.push(IpAddr::from(u32::from_be(v4.sin_addr.s_addr).to_be_bytes()));
                    }
                    libc::AF_INET6 => {
                        let v6 = &*(sa as *const libc::sockaddr_in6);
                        found.push(IpAddr::from(v6.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    found
}

/// A read-only token of `org` for the node's own pulls from its registry,
/// kept in `$HANGAR_HOME` and made again when revoked.
fn pull_token(registry: &Registry, home: &std::path::Path, org: &str) -> Result<String> {
    let path = home.join(format!("pull-token-{org}"));
    if let Ok(t) = std::fs::read_to_string(&path) {
        let t = t.trim().to_string();
        if registry.auth.verify_api_token(&t).is_some() {
            return Ok(t);
        }
    }
    let (_, token) = registry.auth.create(org, true, None)?;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| f.write_all(token.as_bytes()))
        .map_err(|e| anyhow!("cannot write {}: {e}", path.display()))?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_own_registry_is_known_by_any_loopback_name() {
        let addr: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        assert!(names_own_registry("127.0.0.1:5000", addr));
        assert!(names_own_registry("localhost:5000", addr));
        assert!(names_own_registry("[::1]:5000", addr));
        assert!(!names_own_registry("127.0.0.1:5001", addr));
        assert!(!names_own_registry("example.com:5000", addr));
        assert!(!names_own_registry("localhost", addr));
    }

    #[test]
    fn private_and_own_addresses_are_refused() {
        for ip in [
            "127.0.0.1",
            "10.213.0.5",
            "::1",
            "169.254.169.254",
            "::ffff:127.0.0.1",
        ] {
            assert!(refused(ip.parse().unwrap(), &[]).is_some(), "{ip}");
        }
        // An ordinary address is refused only when it is the node's own
        // (no traffic is sent: this only classifies).
        let public: IpAddr = "1.2.3.4".parse().unwrap();
        assert_eq!(refused(public, &[]), None);
        assert!(refused(public, &[public]).is_some());
        assert_eq!(
            host_port("registry.example:5000"),
            ("registry.example".into(), 5000)
        );
        assert_eq!(host_port("[::1]:5000"), ("[::1]".into(), 5000));
        assert_eq!(
            host_port("registry-1.docker.io"),
            ("registry-1.docker.io".into(), 443)
        );
    }
}
