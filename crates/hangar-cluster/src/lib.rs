//! `hangar-cluster`: the cluster's shared state on etcd.
//!
//! A node that runs with `--etcd` keeps the cluster's state (machines,
//! apps, members, leases) in etcd, not in its own SQLite store, and Hangar
//! grows no consensus of its own. This crate owns the way to etcd: the
//! connection ([`connect`]) and, for tests and for trying a cluster on one
//! host, etcd members run from Debian's `etcd` binary ([`members`]).
//!
//! It must not know machines, the API or the host's network: what is kept
//! in etcd and how is the state store's business (`hangar-api`'s `Store`).
//!
//! The etcd it is checked against is Debian bookworm's `etcd-server`
//! (3.4): `tests/etcd_compat.rs` runs the client's every feature Hangar
//! relies on (compare-and-set transactions, watches from a revision and
//! their compaction, leases, elections, quorum loss) against it.

#![forbid(unsafe_code)]

pub mod members;

pub use etcd_client;

/// Why etcd could not be reached or used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("etcd at {endpoints}: {source}")]
    Etcd {
        endpoints: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("{0}")]
    Setup(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A client of the cluster `endpoints` (`http://host:port`, comma
/// separated as `--etcd` takes them), each call bounded by `timeout` so
/// that a lost quorum is an error, not a hang.
pub async fn connect(endpoints: &str, timeout: std::time::Duration) -> Result<etcd_client::Client> {
    let list: Vec<&str> = endpoints
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect();
    if list.is_empty() {
        return Err(Error::Setup(
            "no etcd endpoint given; use --etcd http://HOST:2379[,http://HOST:2379...]".into(),
        ));
    }
    // HTTP/2 pings find a member that went silent (a partition, not a
    // refusal) within two seconds, so calls move to the others.
    let options = etcd_client::ConnectOptions::new()
        .with_connect_timeout(timeout)
        .with_timeout(timeout)
        .with_keep_alive(
            std::time::Duration::from_secs(1),
            std::time::Duration::from_secs(1),
        )
        .with_keep_alive_while_idle(true);
    etcd_client::Client::connect(list, Some(options))
        .await
        .map_err(|source| Error::Etcd {
            endpoints: endpoints.to_string(),
            source,
        })
}
