//! Membership and the leader election, on the etcd store.
//!
//! A node that joins announces itself at `members/<name>` under a lease it
//! keeps alive; when the node dies (or is cut off longer than the lease),
//! etcd deletes the key, and every read model sees it go within one watch
//! event. The same lease backs the node's campaign in etcd's election
//! (`/hangar/leader`): the leader is the oldest live campaigner, and it
//! leads until its lease ends. Its writes as the leader go through
//! [`EtcdStore::as_leader`], which compares its election key on every one.

use std::sync::Weak;

use hangar_cluster::etcd_client::PutOptions;

use super::*;
use crate::store::Member;

/// How long a node stays a member after its last keep-alive: a node that
/// died is noticed (and its machines replaced) this long after.
pub const LEASE_TTL: Duration = Duration::from_secs(5);

/// The election's name: candidates' keys are `leader/<lease>` below it.
const ELECTION: &str = "/hangar/leader";

pub(crate) struct Joined {
    me: Member,
    lease: i64,
    ttl: Duration,
}

fn member_key(name: &str) -> String {
    format!("members/{name}")
}

fn with_lease(key: &str, value: Vec<u8>, lease: i64) -> TxnOp {
    TxnOp::put(k(key), value, Some(PutOptions::new().with_lease(lease)))
}

impl EtcdStore {
    /// Join the cluster as `me`, under a lease of `ttl` kept alive from now
    /// on (taken again should it ever lapse), and stand in the leader
    /// election. A live member of the same name is refused, unless its
    /// lease is `earlier`: this node's own from before a restart, which the
    /// new one takes over. Returns the lease, for the next restart.
    pub fn join(&self, me: &Member, ttl: Duration, earlier: Option<i64>) -> Result<i64> {
        let key = member_key(&me.name);
        let lease = self.grant(ttl)?;
        let live = self.read::<Member>(&key)?;
        let write = match &live {
            None => Write::new()
                .when([absent(&key)])
                .and_then([with_lease(&key, json(me)?, lease)]),
            Some((_, kv)) if Some(kv.lease) == earlier => Write::new()
                .when([unchanged(&key, kv.mod_revision)])
                .and_then([with_lease(&key, json(me)?, lease)]),
            Some(_) => {
                return Err(Error::Conflict(format!(
                    "a node named {:?} is a live member of the cluster at {} already; start this one with another --node \
                     (or, if that was this node before a kill, wait {}s for its lease to end)",
                    me.name,
                    self.endpoints,
                    ttl.as_secs()
                )))
            }
        };
        if !self.txn(write, &[&key])?.0 {
            return Err(Error::Conflict(format!(
                "node {:?} joined the cluster at the same moment from elsewhere; start this one with another --node",
                me.name
            )));
        }
        if let Some(old) = earlier.filter(|_| live.is_some()) {
            let mut client = self.client.clone();
            let _ = self.run(async move { Ok(client.lease_revoke(old).await) });
        }
        *self.joined.lock().unwrap_or_else(|e| e.into_inner()) = Some(Joined {
            me: me.clone(),
            lease,
            ttl,
        });
        let shared = Arc::downgrade(&self.shared);
        if let Some(rt) = &self.rt {
            rt.spawn(keep_alive(shared.clone()));
            rt.spawn(campaign(shared));
        }
        Ok(lease)
    }

    /// This node's name and lease, once it has joined.
    fn joined_as(&self) -> Option<(String, i64)> {
        self.joined
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|j| (j.me.name.clone(), j.lease))
    }

    /// Hold `app` for one deploy or scale, cluster-wide: `locks/apps/<app>`
    /// made if absent, under this node's lease (a node that dies lets go
    /// with its lease). False when another node holds it.
    pub(crate) fn hold_app_lock(&self, app: &str) -> Result<bool> {
        let Some((name, lease)) = self.joined_as() else {
            return Ok(true);
        };
        let key = format!("locks/apps/{app}");
        let write = Write::new().when([absent(&key)]).and_then([with_lease(
            &key,
            name.into_bytes(),
            lease,
        )]);
        Ok(self.txn(write, &[&key])?.0)
    }

    /// Let go of `app` when this node holds it.
    pub(crate) fn let_go_app_lock(&self, app: &str) -> Result<()> {
        let Some((name, _)) = self.joined_as() else {
            return Ok(());
        };
        let key = format!("locks/apps/{app}");
        let held = self
            .model
            .view()
            .kvs
            .get(&key)
            .filter(|kv| kv.value == name.as_bytes())
            .map(|kv| kv.mod_revision);
        if let Some(rev) = held {
            let write = Write::new()
                .when([unchanged(&key, rev)])
                .and_then([delete(&key)]);
            self.txn(write, &[&key])?;
        }
        Ok(())
    }

    /// This node's name in the cluster, once it has joined.
    pub(crate) fn joined_name(&self) -> Option<String> {
        self.joined_as().map(|(name, _)| name)
    }

    /// A document the cluster keeps whole (`docs/<name>`, e.g. the
    /// registry's tokens): its bytes and revision, from the read model.
    pub fn doc(&self, name: &str) -> Option<(Vec<u8>, i64)> {
        self.model
            .view()
            .kvs
            .get(&format!("docs/{name}"))
            .map(|kv| (kv.value.clone(), kv.mod_revision))
    }

    /// Write document `name` if it is still at `revision` (0: absent);
    /// false when another writer came first (read it again and retry).
    pub fn put_doc(&self, name: &str, bytes: Vec<u8>, revision: i64) -> Result<bool> {
        let key = format!("docs/{name}");
        let when = if revision == 0 {
            absent(&key)
        } else {
            unchanged(&key, revision)
        };
        let write = Write::new().when([when]).and_then([put(&key, bytes)]);
        Ok(self.txn(write, &[&key])?.0)
    }

    fn grant(&self, ttl: Duration) -> Result<i64> {
        let mut client = self.client.clone();
        let endpoints = self.endpoints.clone();
        self.run(async move {
            client
                .lease_grant(ttl.as_secs().max(1) as i64, None)
                .await
                .map(|r| r.id())
                .map_err(|e| Error::Internal(format!("etcd at {endpoints}: no lease: {e}")))
        })
    }

    /// The number of node `name` in the cluster: its own from an earlier
    /// join, else the lowest free one from 1 (`node-index/<n>`, kept for
    /// good). It is the node part of its machines' addresses.
    pub fn node_index(&self, name: &str) -> Result<u32> {
        let most = hangar_machine::network::NETS - 1;
        for _ in 0..RETRIES {
            let (mine, free) = {
                let view = self.model.view();
                let mine = (1..=most).find(|n| {
                    view.kvs
                        .get(&format!("node-index/{n}"))
                        .is_some_and(|kv| kv.value == name.as_bytes())
                });
                let free = (1..=most).find(|n| !view.kvs.contains_key(&format!("node-index/{n}")));
                (mine, free)
            };
            if let Some(n) = mine {
                return Ok(n);
            }
            let Some(n) = free else {
                return Err(Error::Invalid(format!(
                    "the cluster at {} has {most} nodes, all it can number; remove one first",
                    self.endpoints
                )));
            };
            let key = format!("node-index/{n}");
            let write = Write::new()
                .when([absent(&key)])
                .and_then([put(&key, name.as_bytes().to_vec())]);
            if self.txn(write, &[&key])?.0 {
                return Ok(n);
            }
        }
        Err(Error::Conflict(format!(
            "node {name}: no number could be taken after {RETRIES} tries; try again"
        )))
    }

    /// The cluster's value of `cluster/<name>`, set once: `proposed` when
    /// it had none (the first node's), else what the first node set. For
    /// what every node must share, such as the admin token.
    pub fn cluster_value(&self, name: &str, proposed: &[u8]) -> Result<Vec<u8>> {
        let key = format!("cluster/{name}");
        let write = Write::new()
            .when([absent(&key)])
            .and_then([put(&key, proposed.to_vec())]);
        self.txn(write, &[&key])?;
        self.model
            .view()
            .kvs
            .get(&key)
            .map(|kv| kv.value.clone())
            .ok_or_else(|| Error::Internal(format!("etcd at {}: {key} vanished", self.endpoints)))
    }

    /// The lease this node's membership lives under now.
    pub fn lease(&self) -> Option<i64> {
        self.joined
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|j| j.lease)
    }

    /// The name of the node that leads the cluster now, if any.
    pub fn leader(&self) -> Option<String> {
        let view = self.model.view();
        view.kvs
            .range("leader/".to_string()..)
            .take_while(|(key, _)| key.starts_with("leader/"))
            .min_by_key(|(_, kv)| kv.create_revision)
            .map(|(_, kv)| String::from_utf8_lossy(&kv.value).into_owned())
    }

    /// This store as the leader writes through it, while this node leads:
    /// each of its writes is refused once the lead is lost.
    pub fn as_leader(&self) -> Option<EtcdStore> {
        let fence = self
            .leading
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()?;
        Some(EtcdStore {
            shared: self.shared.clone(),
            fence: Some(fence),
        })
    }
}

/// Keep the membership's lease alive; when it lapsed anyway (the node was
/// cut off longer than its TTL), take a new one and announce the node again.
async fn keep_alive(shared: Weak<Shared>) {
    loop {
        let Some((client, lease, ttl)) = shared.upgrade().and_then(|s| {
            let j = s.joined.lock().unwrap_or_else(|e| e.into_inner());
            j.as_ref().map(|j| (s.client.clone(), j.lease, j.ttl))
        }) else {
            return;
        };
        let mut c = client.clone();
        let lapsed = match c.lease_keep_alive(lease).await {
            Ok((mut keeper, mut answers)) => loop {
                if shared.strong_count() == 0 {
                    return;
                }
                if keeper.keep_alive().await.is_err() {
                    break false;
                }
                match tokio::time::timeout(ttl, answers.message()).await {
                    Ok(Ok(Some(r))) if r.ttl() > 0 => {}
                    Ok(Ok(Some(_))) => break true,
                    _ => break false,
                }
                tokio::time::sleep(ttl / 3).await;
            },
            Err(_) => false,
        };
        if lapsed {
            if let Err(e) = announce_again(&shared, client).await {
                tracing::warn!(
                    "etcd: the node's membership lapsed and could not be taken again: {e}"
                );
            }
        } else {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

async fn announce_again(shared: &Weak<Shared>, mut client: Client) -> Result<()> {
    let Some((me, ttl)) = shared.upgrade().and_then(|s| {
        let j = s.joined.lock().unwrap_or_else(|e| e.into_inner());
        j.as_ref().map(|j| (j.me.clone(), j.ttl))
    }) else {
        return Ok(());
    };
    let internal = |e: hangar_cluster::etcd_client::Error| Error::Internal(format!("etcd: {e}"));
    let lease = client
        .lease_grant(ttl.as_secs().max(1) as i64, None)
        .await
        .map_err(internal)?
        .id();
    let key = member_key(&me.name);
    let txn = Txn::new()
        .when([absent(&key)])
        .and_then([with_lease(&key, json(&me)?, lease)]);
    let resp = client.txn(txn).await.map_err(internal)?;
    if !resp.succeeded() {
        return Err(Error::Conflict(format!(
            "another node took the name {:?} meanwhile",
            me.name
        )));
    }
    tracing::warn!(
        "etcd: this node's membership had lapsed (cut off longer than {}s); it is a member again",
        ttl.as_secs()
    );
    if let Some(s) = shared.upgrade() {
        if let Some(j) = s.joined.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            j.lease = lease;
        }
    }
    Ok(())
}

/// Stand in the election with the membership's lease, lead while the
/// election key lives, and stand again after.
async fn campaign(shared: Weak<Shared>) {
    loop {
        let Some((client, model, name, lease)) = shared.upgrade().and_then(|s| {
            let j = s.joined.lock().unwrap_or_else(|e| e.into_inner());
            j.as_ref().map(|j| {
                (
                    s.client.clone(),
                    s.model.clone(),
                    j.me.name.clone(),
                    j.lease,
                )
            })
        }) else {
            return;
        };
        // etcd's election, as its concurrency package runs it: each
        // candidate's key under the election's prefix, with its lease; the
        // oldest live key leads. Taken here through the read model, so no
        // call waits on the server.
        let key = format!("{ELECTION}/{lease:x}");
        let local = key.strip_prefix(PREFIX).unwrap_or_default().to_string();
        let standing = model.view().kvs.contains_key(&local);
        let mut c = client.clone();
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                name.as_bytes().to_vec(),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        if !standing {
            if let Err(e) = c.txn(txn).await {
                tracing::debug!("campaign: {e}");
            }
        }
        let won = {
            let view = model.view();
            let oldest = view
                .kvs
                .range("leader/".to_string()..)
                .take_while(|(k, _)| k.starts_with("leader/"))
                .min_by_key(|(_, kv)| kv.create_revision)
                .map(|(k, kv)| (k.clone(), kv.create_revision));
            oldest.filter(|(k, _)| *k == local).map(|(_, rev)| Fence {
                key: key.clone(),
                rev,
            })
        };
        let Some(fence) = won else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        tracing::info!("this node leads the cluster");
        if let Some(s) = shared.upgrade() {
            *s.leading.lock().unwrap_or_else(|e| e.into_inner()) = Some(fence.clone());
        }
        let local = fence
            .key
            .strip_prefix(PREFIX)
            .unwrap_or_default()
            .to_string();
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let Some(s) = shared.upgrade() else { return };
            let lease_now = s
                .joined
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .map(|j| j.lease);
            let held = model
                .view()
                .kvs
                .get(&local)
                .is_some_and(|kv| kv.create_revision == fence.rev);
            if !held || lease_now != Some(lease) {
                let mut leading = s.leading.lock().unwrap_or_else(|e| e.into_inner());
                if leading.as_ref() == Some(&fence) {
                    *leading = None;
                }
                tracing::warn!("this node no longer leads the cluster");
                break;
            }
        }
    }
}

/// The cluster's purge log: `purges/<id>`, each in the order of its create
/// revision (one order for every node), and each node's progress through it,
/// `acks/purges/<node>` (under its lease: a node that is gone acks nothing).
impl EtcdStore {
    /// Append a purge; its revision (its place in the order).
    pub fn add_purge(&self, bytes: Vec<u8>) -> Result<i64> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let who = self.joined_name().unwrap_or_default();
        let key = format!("purges/{nanos:032}-{who}");
        // A write whose answer was lost (an etcd member cut off mid-call)
        // is sent again; if the first one landed, its revision stands.
        let mut tries = 0;
        loop {
            let write = Write::new()
                .when([absent(&key)])
                .and_then([put(&key, bytes.clone())]);
            match self.txn(write, &[&key]) {
                Ok((true, rev)) => return Ok(rev),
                Ok((false, _)) => {
                    let view = self.model.view();
                    return view
                        .kvs
                        .get(&key)
                        .map(|kv| kv.create_revision)
                        .ok_or_else(|| {
                            Error::Conflict(format!("purge {key} was refused by etcd; try again"))
                        });
                }
                Err(Error::Unavailable(_)) if tries < 2 => tries += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// The purges after revision `after`, in order, with when the read
    /// model was last known current (read together: every purge made
    /// before that moment is among them).
    pub fn purges_after(&self, after: i64) -> (Option<std::time::Instant>, Vec<(i64, Vec<u8>)>) {
        let view = self.model.view();
        let mut purges: Vec<(i64, Vec<u8>)> = view
            .kvs
            .range("purges/".to_string()..)
            .take_while(|(k, _)| k.starts_with("purges/"))
            .filter(|(_, kv)| kv.create_revision > after)
            .map(|(_, kv)| (kv.create_revision, kv.value.clone()))
            .collect();
        purges.sort_by_key(|(rev, _)| *rev);
        (view.current_at, purges)
    }

    /// Keep the last `keep` purges of the log (on the leader's handle): the
    /// older ones go, and `docs/purge-floor` says up to which revision
    /// they went (a node that had not applied them drops its whole cache).
    pub fn trim_purges(&self, keep: usize) -> Result<usize> {
        let old: Vec<(String, i64)> = {
            let view = self.model.view();
            let mut all: Vec<(String, i64)> = view
                .kvs
                .range("purges/".to_string()..)
                .take_while(|(k, _)| k.starts_with("purges/"))
                .map(|(k, kv)| (k.clone(), kv.create_revision))
                .collect();
            all.sort_by_key(|(_, rev)| *rev);
            let n = all.len().saturating_sub(keep);
            all.truncate(n);
            all
        };
        let mut trimmed = 0;
        // etcd takes at most 128 operations in one transaction.
        for chunk in old.chunks(100) {
            let floor = chunk.iter().map(|(_, rev)| *rev).max().unwrap_or(0);
            let (_, at) = self.doc("purge-floor").unwrap_or_default();
            let ops = chunk
                .iter()
                .map(|(k, _)| delete(k))
                .chain([put("docs/purge-floor", floor.to_string().into_bytes())]);
            let when = if at == 0 {
                absent("docs/purge-floor")
            } else {
                unchanged("docs/purge-floor", at)
            };
            if !self
                .txn(
                    Write::new().when([when]).and_then(ops),
                    &["docs/purge-floor"],
                )?
                .0
            {
                break;
            }
            trimmed += chunk.len();
        }
        Ok(trimmed)
    }

    /// Up to which revision purges were trimmed from the log (0: none).
    pub fn purge_floor(&self) -> i64 {
        self.doc("purge-floor")
            .and_then(|(v, _)| std::str::from_utf8(&v).ok()?.parse().ok())
            .unwrap_or(0)
    }

    /// This node has applied every purge up to `revision`.
    pub fn ack_purges(&self, revision: i64) -> Result<()> {
        let Some((name, lease)) = self.joined_as() else {
            return Ok(());
        };
        let key = format!("acks/purges/{name}");
        let write =
            Write::new().and_then([with_lease(&key, revision.to_string().into_bytes(), lease)]);
        self.txn(write, &[])?;
        Ok(())
    }

    /// Each node's last applied purge revision.
    pub fn purge_acks(&self) -> BTreeMap<String, i64> {
        let view = self.model.view();
        view.kvs
            .range("acks/purges/".to_string()..)
            .take_while(|(k, _)| k.starts_with("acks/purges/"))
            .filter_map(|(k, kv)| {
                let node = k.strip_prefix("acks/purges/")?;
                let rev = std::str::from_utf8(&kv.value).ok()?.parse().ok()?;
                Some((node.to_string(), rev))
            })
            .collect()
    }

    /// Wait (up to `timeout`) for the read model to change; its revision.
    pub fn wait_model(&self, since: i64, timeout: Duration) -> i64 {
        let view = self.model.view();
        let (view, _) = self
            .model
            .moved
            .wait_timeout_while(view, timeout, |v| v.revision == since)
            .unwrap_or_else(|e| e.into_inner());
        view.revision
    }
}
