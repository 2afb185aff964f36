//! Purges of an app's cached responses, at every edge of the cluster.
//!
//! A purge made at any node is sent straight to every member (applied on
//! arrival: one round trip) and appended to the cluster's purge log in etcd
//! (`purges/<id>`; its create revision is its place in the one order all
//! nodes apply them in). Each node follows the log ([`follow`]): it applies
//! every purge after the last it applied (kept in a file, so a node that
//! was down catches up when it returns), then acks the revision it reached
//! (`acks/purges/<node>`, under its lease). The caller is answered when
//! every live member has acked the purge, or when its wait ends, naming
//! the regions (and nodes) that have not.
//!
//! A node that cannot show its read model is current must not serve what a
//! purge it has not seen removed: the edge serves cached responses as
//! fresh only until [`HORIZON`] after the model was last known current,
//! and only once every purge before that moment is applied; after it,
//! every hit is revalidated. `HORIZON` is shorter than the membership
//! lease, so by the time a cut-off node's lease ends (and a purge's wait
//! stops counting it), it has stopped serving anything as fresh.
//!
//! A node alone (no cluster) purges its own edge and answers at once.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::node::Node;

/// How many purges the log keeps; a node that was away for more drops its
/// whole cache when it comes back.
pub const KEEP: usize = 10_000;

/// How long after the read model was last known current the edge may
/// serve cached responses as fresh.
pub const HORIZON: Duration = Duration::from_secs(3);
const _: () = assert!(HORIZON.as_secs() < crate::store::LEASE_TTL.as_secs());

/// What a purge removes, on one app's host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum What {
    /// One URL (path and query), every variant of it.
    Url(String),
    /// Every URL whose path starts with this.
    Prefix(String),
    /// Every response with this surrogate key (`Surrogate-Key`, `Cache-Tag`).
    Tag(String),
    /// All of the host.
    All,
}

/// One purge, as the log keeps it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PurgeSpec {
    /// The app's host, `<app>.<domain>`: an org purges its own apps only.
    pub host: String,
    pub what: What,
    /// Mark stale (revalidated next time) instead of removing.
    #[serde(default)]
    pub soft: bool,
    /// Unique in the cluster: a node that got it directly skips the log's
    /// copy.
    #[serde(default)]
    pub id: String,
}

/// How a purge went: its place in the order, and who has applied it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PurgeOutcome {
    /// Its revision in the cluster's purge log (0: a node alone).
    pub revision: i64,
    /// Every live node has applied it.
    pub complete: bool,
    /// The regions whose every live node applied it.
    pub applied: Vec<String>,
    /// Those with a node that has not yet, as `region (node, ...)`.
    pub pending: Vec<String>,
}

impl Node {
    /// Purge `spec` at every edge of the cluster; wait up to `wait` for
    /// every live node to have applied it. In a cluster the purge goes to
    /// the log and, at the same time, straight to every other member's
    /// API (one round trip, in parallel): a member counts once it answered
    /// or acked the purge in the log.
    pub async fn purge(
        self: &Arc<Self>,
        mut spec: PurgeSpec,
        wait: Duration,
    ) -> Result<PurgeOutcome> {
        let Some(cluster) = self.cluster.clone() else {
            self.apply_purge(&spec);
            return Ok(PurgeOutcome {
                revision: 0,
                complete: true,
                applied: vec![self.site.region.clone()],
                pending: Vec::new(),
            });
        };
        let deadline = Instant::now() + wait;
        spec.id = format!("{}-{}", crate::store::now_nanos(), cluster.me.name);
        self.apply_purge(&spec);
        let bytes = serde_json::to_vec(&spec).map_err(|e| Error::Internal(e.to_string()))?;
        let store = cluster.store.clone();
        let logged = crate::node::blocking(move || store.add_purge(bytes));
        let members = self.state.members()?;
        let direct = members
            .iter()
            .filter(|m| m.name != cluster.me.name)
            .map(|m| {
                let (client, spec, name) = (cluster.client(m, None), spec.clone(), m.name.clone());
                async move {
                    let sent = tokio::time::timeout(wait, client.apply_purge(&spec)).await;
                    matches!(sent, Ok(Ok(()))).then_some(name)
                }
            });
        let (revision, answered) = tokio::join!(logged, futures_util::future::join_all(direct));
        let revision = revision?;
        let mut done: std::collections::HashSet<String> = answered.into_iter().flatten().collect();
        done.insert(cluster.me.name.clone());
        loop {
            let members = self.state.members()?;
            let acks = cluster.store.purge_acks();
            let mut regions: std::collections::BTreeMap<String, Vec<String>> = Default::default();
            for m in &members {
                let behind = regions.entry(m.region.clone()).or_default();
                if !done.contains(&m.name) && acks.get(&m.name).copied().unwrap_or(0) < revision {
                    behind.push(m.name.clone());
                }
            }
            let complete = regions.values().all(Vec::is_empty);
            if complete || Instant::now() >= deadline {
                let (applied, pending): (Vec<_>, Vec<_>) = regions
                    .into_iter()
                    .partition(|(_, behind)| behind.is_empty());
                return Ok(PurgeOutcome {
                    revision,
                    complete,
                    applied: applied.into_iter().map(|(r, _)| r).collect(),
                    pending: pending
                        .into_iter()
                        .map(|(r, nodes)| format!("{r} ({})", nodes.join(", ")))
                        .collect(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Apply a purge to this node's edge now (the log's copy of it is then
    /// skipped, by its id).
    pub fn apply_purge(&self, spec: &PurgeSpec) {
        if let Some(routing) = &self.routing {
            routing.ingress.purge(spec);
            if !spec.id.is_empty() {
                let mut seen = routing.purged.lock().unwrap_or_else(|e| e.into_inner());
                if seen.len() > 10_000 {
                    seen.clear();
                }
                seen.insert(spec.id.clone());
            }
        }
    }
}

/// Follow the cluster's purge log for this node's edge, forever (a thread
/// of its own): apply each purge in order, remember the last one in
/// `file`, ack it, and keep the edge's freshness horizon (see the module's
/// doc). Returns at once for a node alone or without an edge.
pub fn follow(node: Arc<Node>, file: PathBuf) {
    let (Some(cluster), Some(routing)) = (node.cluster.clone(), node.routing.as_ref()) else {
        return;
    };
    let mut applied = read_applied(&file);
    let mut acked = None;
    let mut seen = 0;
    loop {
        // Purges this node never applied are gone from the log: nothing it
        // holds can be trusted.
        let floor = cluster.store.purge_floor();
        if applied < floor {
            tracing::warn!("missed purges were trimmed from the log (up to revision {floor}, this node had applied {applied}): dropping the whole edge cache");
            routing.ingress.purge_all();
            applied = floor;
        }
        let (current_at, purges) = cluster.store.purges_after(applied);
        for (revision, bytes) in purges {
            match serde_json::from_slice::<PurgeSpec>(&bytes) {
                // Applied already when it was sent here directly.
                Ok(spec)
                    if routing
                        .purged
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&spec.id) => {}
                Ok(spec) => routing.ingress.purge(&spec),
                Err(e) => tracing::warn!("purge at revision {revision} skipped, unreadable: {e}"),
            }
            applied = revision;
        }
        if acked != Some(applied) {
            if let Err(e) = write_applied(&file, applied) {
                tracing::warn!("{}: {e}", file.display());
            }
            match cluster.store.ack_purges(applied) {
                Ok(()) => acked = Some(applied),
                Err(e) => tracing::debug!("purge ack: {e}"),
            }
        }
        if let Some(at) = current_at {
            routing.ingress.fresh_until(at + HORIZON);
        }
        seen = cluster.store.wait_model(seen, Duration::from_millis(250));
    }
}

fn read_applied(file: &Path) -> i64 {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn write_applied(file: &Path, revision: i64) -> std::io::Result<()> {
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, format!("{revision}\n"))?;
    std::fs::rename(tmp, file)
}
