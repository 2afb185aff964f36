//! The state store on etcd: the cluster's, shared by every node started
//! with `--etcd`.
//!
//! Reads never wait on a quorum round trip: they come from a read model in
//! memory, loaded once and then fed by a watch from the revision it was
//! loaded at (a watch cut short resumes from its last revision; one told the
//! revision was compacted reloads). Writes are transactions that compare
//! what they were decided on (`mod_revision` for a change, "absent" for a
//! new name, slot, net or app), and return once the read model has seen
//! them, so a node reads its own writes. A write whose answer never came
//! (no quorum) may still land: it is an error to the caller, who reads
//! again before retrying; the compare makes the retry safe.
//!
//! Keys, under `/hangar/`: `machines/<id>` (JSON; its revision is its
//! `mod_revision`), `names/<name>` and `slots/<slot>` (a machine's, taken
//! with it), `events/<id>/<seq>`, `apps/<name>`, `releases/<app>/<version>`
//! (zero-padded), `secrets/<app>/<name>`, `logins/<org>/<registry>`,
//! `nets/<org>` and `net-owners/<net>`, `purges/<id>` (the purge log, see
//! [`crate::purge`]) and `acks/purges/<node>`.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use hangar_cluster::etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, Txn, TxnOp, TxnOpResponse, TxnResponse,
    WatchOptions,
};

mod cluster;
pub use cluster::LEASE_TTL;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::{
    no_app, no_machine, now, Change, Changes, Desired, Event, Expect, Kind, Machine, MachineChange,
    MachineState, Placement, SealedLogin, SealedSecret, Site, Store,
};
use crate::apps::{valid_name, App, Interrupted, Release, ReleaseStatus};
use crate::config::MachineConfig;
use crate::error::{Error, Result};

const PREFIX: &str = "/hangar/";
/// How many changes the feed keeps (as the SQLite store's).
const KEEP_CHANGES: usize = 10_000;
/// How long a write waits for its answer, and then for the read model.
const TIMEOUT: Duration = Duration::from_secs(5);
/// How often a write decided on a read model that was behind is retried.
const RETRIES: usize = 20;
/// How often the model proves it is current (see `View::current_at`).
const SYNC_EVERY: Duration = Duration::from_millis(250);

/// One key of the read model.
#[derive(Clone, Debug)]
struct Kv {
    value: Vec<u8>,
    mod_revision: i64,
    create_revision: i64,
    /// The lease it lives under (0: none).
    lease: i64,
}

#[derive(Default)]
struct View {
    /// The store's revision the model is at.
    revision: i64,
    /// Keys without [`PREFIX`].
    kvs: BTreeMap<String, Kv>,
    feed: VecDeque<Change>,
    /// The feed reaches back to here (a reload starts it again).
    feed_from: i64,
    /// Why the model is not following etcd now, if it is not.
    trouble: Option<String>,
    /// The model holds every write made before this moment (a quorum read
    /// gave the revision then, and the watch said it had reached it);
    /// none: not known (a node cut off from a quorum stays so).
    current_at: Option<std::time::Instant>,
}

struct Model {
    view: Mutex<View>,
    moved: Condvar,
}

impl Model {
    fn view(&self) -> std::sync::MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wait until the model has seen `revision`.
    fn reach(&self, revision: i64) -> Result<()> {
        let view = self.view();
        let (view, timeout) = self
            .moved
            .wait_timeout_while(view, TIMEOUT, |v| v.revision < revision)
            .unwrap_or_else(|e| e.into_inner());
        if timeout.timed_out() && view.revision < revision {
            return Err(Error::Internal(format!(
                "etcd: this node's view is at revision {} and did not reach {revision} within {}s ({})",
                view.revision,
                TIMEOUT.as_secs(),
                view.trouble.as_deref().unwrap_or("no error seen")
            )));
        }
        Ok(())
    }
}

/// What a key of the feed is, and its key there (see [`Change`]).
fn feed_entry(key: &str) -> Option<(Kind, String)> {
    let (head, rest) = key.split_once('/')?;
    let kind = match head {
        "machines" => Kind::Machine,
        "apps" => Kind::App,
        "releases" => {
            let (app, version) = rest.split_once('/')?;
            let version: u32 = version.parse().ok()?;
            return Some((Kind::Release, format!("{app}/{version}")));
        }
        "secrets" => Kind::Secret,
        "logins" => Kind::RegistryLogin,
        "nets" => Kind::OrgNet,
        _ => return None,
    };
    Some((kind, rest.to_string()))
}

fn json<T: Serialize + ?Sized>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| Error::Internal(e.to_string()))
}

fn parse<T: DeserializeOwned>(key: &str, kv: &Kv) -> Result<T> {
    serde_json::from_slice(&kv.value)
        .map_err(|e| Error::Internal(format!("etcd key {PREFIX}{key}: {e}")))
}

fn k(key: &str) -> String {
    format!("{PREFIX}{key}")
}

/// The key is as it was read: unchanged since `mod_revision`.
fn unchanged(key: &str, mod_revision: i64) -> Compare {
    Compare::mod_revision(k(key), CompareOp::Equal, mod_revision)
}

fn absent(key: &str) -> Compare {
    Compare::create_revision(k(key), CompareOp::Equal, 0)
}

fn put(key: &str, value: Vec<u8>) -> TxnOp {
    TxnOp::put(k(key), value, None)
}

fn delete(key: &str) -> TxnOp {
    TxnOp::delete(k(key), None)
}

fn release_key(app: &str, version: u32) -> String {
    format!("releases/{app}/{version:010}")
}

/// A release as kept: with the machines its deploy replaces.
#[derive(Serialize, Deserialize)]
struct StoredRelease {
    #[serde(flatten)]
    release: Release,
    replaces: Vec<String>,
    /// The node that runs the deploy (empty: from before nodes said so).
    #[serde(default)]
    node: String,
}

/// A transaction in the making: what it compares, and what it does when
/// the compares hold (see [`EtcdStore::txn`]).
#[derive(Default)]
struct Write {
    when: Vec<Compare>,
    then: Vec<TxnOp>,
}

impl Write {
    fn new() -> Write {
        Write::default()
    }

    fn when(mut self, compares: impl IntoIterator<Item = Compare>) -> Write {
        self.when.extend(compares);
        self
    }

    fn and_then(mut self, ops: impl IntoIterator<Item = TxnOp>) -> Write {
        self.then.extend(ops);
        self
    }
}

/// What a node's store shares with its leader's handle.
pub struct Shared {
    client: Client,
    model: Arc<Model>,
    /// Runs the client and the watch; the store's calls wait on it from
    /// any thread (a node's API handlers, its loop).
    rt: Option<tokio::runtime::Runtime>,
    endpoints: String,
    /// This node as a member of the cluster, once it joined.
    joined: Mutex<Option<cluster::Joined>>,
    /// Its key in the leader election while it leads.
    leading: Mutex<Option<Fence>>,
}

/// The leader's election key and its create revision: every write made
/// as the leader compares it, so a node that lost the lead (its lease
/// expired while it was paused) writes nothing.
#[derive(Clone, Debug, PartialEq)]
struct Fence {
    key: String,
    rev: i64,
}

pub struct EtcdStore {
    shared: Arc<Shared>,
    /// Set on the leader's handle ([`EtcdStore::as_leader`]).
    fence: Option<Fence>,
}

impl std::ops::Deref for EtcdStore {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.shared
    }
}

impl EtcdStore {
    /// Connect to `endpoints` and load the read model.
    pub fn open(endpoints: &str) -> Result<EtcdStore> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("hangar-etcd")
            .enable_all()
            .build()
            .map_err(|e| Error::Internal(format!("etcd client runtime: {e}")))?;
        let client = run(&rt, {
            let endpoints = endpoints.to_string();
            async move {
                hangar_cluster::connect(&endpoints, TIMEOUT)
                    .await
                    .map_err(|e| Error::Internal(e.to_string()))
            }
        })?;
        let model = Arc::new(Model {
            view: Mutex::new(View::default()),
            moved: Condvar::new(),
        });
        let revision = run(&rt, load(client.clone(), model.clone()))?;
        rt.spawn(follow(client.clone(), model.clone(), revision));
        Ok(EtcdStore {
            shared: Arc::new(Shared {
                client,
                model,
                rt: Some(rt),
                endpoints: endpoints.to_string(),
                joined: Mutex::new(None),
                leading: Mutex::new(None),
            }),
            fence: None,
        })
    }

    fn run<T: Send + 'static>(
        &self,
        f: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        match &self.rt {
            Some(rt) => run(rt, f),
            None => Err(Error::Internal("etcd store closed".into())),
        }
    }

    fn etcd(&self, e: hangar_cluster::etcd_client::Error) -> Error {
        Error::Unavailable(format!(
            "etcd at {}: {e} (with no quorum, writes fail until it is back; the outcome of this one is unknown)",
            self.endpoints
        ))
    }

    /// Run a transaction whose compares are on the keys `compared`, and
    /// wait until the read model has what it saw: the write, when it
    /// succeeded; the compared keys as they are now, when it failed (so a
    /// retry decides on them). Returns whether it succeeded and its revision.
    /// On the leader's handle it also compares the leader's election key:
    /// a leader that lost the lead is refused, whatever else holds.
    fn txn(&self, write: Write, compared: &[&str]) -> Result<(bool, i64)> {
        let mut when = write.when;
        let mut reads: Vec<TxnOp> = compared
            .iter()
            .map(|key| TxnOp::get(k(key), None))
            .collect();
        if let Some(fence) = &self.fence {
            when.push(Compare::create_revision(
                fence.key.clone(),
                CompareOp::Equal,
                fence.rev,
            ));
            reads.push(TxnOp::get(fence.key.clone(), None));
        }
        let txn = Txn::new().when(when).and_then(write.then).or_else(reads);
        let mut client = self.client.clone();
        // A member that is down refuses the connection: the transaction
        // never reached etcd, so it goes to another member (the client
        // picks one per call) until the time is up.
        let resp: TxnResponse = match self.run(async move {
            Ok(tokio::time::timeout(TIMEOUT, async move {
                loop {
                    match client.txn(txn.clone()).await {
                        Err(e) if e.to_string().contains("tcp connect error") => {
                            tokio::time::sleep(Duration::from_millis(20)).await
                        }
                        r => return r,
                    }
                }
            })
            .await)
        })? {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(self.etcd(e)),
            Err(_) => {
                return Err(Error::Unavailable(format!(
                    "etcd at {}: no answer within {}s (no quorum?); the outcome of this write is unknown",
                    self.endpoints,
                    TIMEOUT.as_secs()
                )))
            }
        };
        let revision = resp.header().map_or(0, |h| h.revision());
        if resp.succeeded() {
            self.model.reach(revision)?;
            return Ok((true, revision));
        }
        let gets: Vec<_> = resp
            .op_responses()
            .into_iter()
            .filter_map(|r| match r {
                TxnOpResponse::Get(g) => Some(g),
                _ => None,
            })
            .collect();
        if let Some(fence) = &self.fence {
            let still = gets
                .last()
                .and_then(|g| g.kvs().first())
                .is_some_and(|kv| kv.create_revision() == fence.rev);
            if !still {
                let mut leading = self.leading.lock().unwrap_or_else(|e| e.into_inner());
                if leading.as_ref() == Some(fence) {
                    *leading = None;
                }
                return Err(Error::Conflict(
                    "this node no longer leads the cluster (its election key is gone); the new leader carries on".into(),
                ));
            }
        }
        // Not the header's revision: that may be of a write outside
        // Hangar's keys, which the watch never brings.
        let seen = gets
            .iter()
            .filter_map(|g| g.kvs().iter().map(|kv| kv.mod_revision()).max())
            .max()
            .unwrap_or(0);
        self.model.reach(seen)?;
        Ok((false, revision))
    }

    fn read<T: DeserializeOwned>(&self, key: &str) -> Result<Option<(T, Kv)>> {
        let view = self.model.view();
        view.kvs
            .get(key)
            .map(|kv| Ok((parse(key, kv)?, kv.clone())))
            .transpose()
    }

    /// Every key under `prefix`, in key order.
    fn scan<T: DeserializeOwned>(&self, prefix: &str) -> Result<Vec<(String, T, Kv)>> {
        let view = self.model.view();
        view.kvs
            .range(prefix.to_string()..)
            .take_while(|(key, _)| key.starts_with(prefix))
            .map(|(key, kv)| Ok((key.clone(), parse(key, kv)?, kv.clone())))
            .collect()
    }

    fn machine_row(&self, id: &str) -> Result<Option<Machine>> {
        Ok(self
            .read::<Machine>(&format!("machines/{id}"))?
            .map(|(mut m, kv)| {
                m.revision = kv.mod_revision as u64;
                m
            }))
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Run `f` on `rt` and wait for it, from any thread (in an async context
/// or not).
fn run<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    f: impl Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    rt.spawn(async move {
        let _ = tx.send(f.await);
    });
    rx.recv()
        .map_err(|_| Error::Internal("the etcd client stopped".into()))?
}

/// Load every key into the model; returns the revision it is at.
async fn load(mut client: Client, model: Arc<Model>) -> Result<i64> {
    let resp = client
        .get(PREFIX, Some(GetOptions::new().with_prefix()))
        .await
        .map_err(|e| Error::Internal(format!("etcd: loading the cluster state: {e}")))?;
    let revision = resp.header().map_or(0, |h| h.revision());
    let mut kvs = BTreeMap::new();
    for kv in resp.kvs() {
        let Some(key) = kv.key_str().ok().and_then(|k| k.strip_prefix(PREFIX)) else {
            continue;
        };
        kvs.insert(
            key.to_string(),
            Kv {
                value: kv.value().to_vec(),
                mod_revision: kv.mod_revision(),
                create_revision: kv.create_revision(),
                lease: kv.lease(),
            },
        );
    }
    let mut view = model.view();
    view.kvs = kvs;
    view.revision = revision;
    view.feed.clear();
    view.feed_from = revision;
    view.trouble = None;
    drop(view);
    model.moved.notify_all();
    Ok(revision)
}

/// Keep the model up to date: a watch from the revision after `from`,
/// resumed where it stopped when it breaks, and a reload when etcd says
/// that revision was compacted.
async fn follow(client: Client, model: Arc<Model>, mut from: i64) {
    loop {
        let mut c = client.clone();
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(from + 1);
        let mut stream = match c.watch(PREFIX, Some(options)).await {
            Ok(s) => s,
            Err(e) => {
                model.view().trouble = Some(format!("watch: {e}"));
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        // A quorum read of the revision, then a progress request: once the
        // watch's progress reaches that revision, every write made before
        // the read is in the model (a member cut off from the quorum
        // cannot answer the read, so such a node never looks current).
        let mut sync = tokio::time::interval(SYNC_EVERY);
        sync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pending: Option<(i64, std::time::Instant)> = None;
        loop {
            let message = tokio::select! {
                m = stream.message() => m,
                _ = sync.tick() => {
                    let asked = std::time::Instant::now();
                    let mut c = client.clone();
                    let read = c.get(PREFIX, Some(GetOptions::new().with_prefix().with_count_only()));
                    if let Ok(Ok(r)) = tokio::time::timeout(SYNC_EVERY * 4, read).await {
                        if let Some(h) = r.header() {
                            pending = Some((h.revision(), asked));
                            let _ = stream.request_progress().await;
                        }
                    }
                    continue;
                }
            };
            match message {
                Ok(Some(resp)) => {
                    let progress = resp.events().is_empty() && !resp.created() && !resp.canceled();
                    if let (true, Some((wanted, asked)), Some(h)) =
                        (progress, pending, resp.header())
                    {
                        if h.revision() >= wanted {
                            model.view().current_at = Some(asked);
                            pending = None;
                            model.moved.notify_all();
                        }
                        continue;
                    }
                    if resp.compact_revision() > 0 {
                        tracing::warn!(
                            "etcd compacted past revision {from}: reloading the cluster state"
                        );
                        match load(client.clone(), model.clone()).await {
                            Ok(r) => from = r,
                            Err(e) => model.view().trouble = Some(e.to_string()),
                        }
                        break;
                    }
                    if resp.canceled() {
                        break;
                    }
                    let mut view = model.view();
                    for e in resp.events() {
                        let Some(kv) = e.kv() else { continue };
                        let Some(key) = kv.key_str().ok().and_then(|k| k.strip_prefix(PREFIX))
                        else {
                            continue;
                        };
                        let deleted = e.event_type() == EventType::Delete;
                        if deleted {
                            view.kvs.remove(key);
                        } else {
                            view.kvs.insert(
                                key.to_string(),
                                Kv {
                                    value: kv.value().to_vec(),
                                    mod_revision: kv.mod_revision(),
                                    create_revision: kv.create_revision(),
                                    lease: kv.lease(),
                                },
                            );
                        }
                        if let Some((kind, key)) = feed_entry(key) {
                            view.feed.push_back(Change {
                                revision: kv.mod_revision() as u64,
                                kind,
                                key,
                                deleted,
                            });
                            if view.feed.len() > KEEP_CHANGES {
                                if let Some(gone) = view.feed.pop_front() {
                                    view.feed_from = gone.revision as i64;
                                }
                            }
                        }
                        view.revision = view.revision.max(kv.mod_revision());
                    }
                    from = view.revision;
                    view.trouble = None;
                    drop(view);
                    model.moved.notify_all();
                }
                Ok(None) => break,
                Err(e) => {
                    model.view().trouble = Some(format!("watch: {e}"));
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Store for EtcdStore {
    fn insert_machine(
        &self,
        id: &str,
        name: &str,
        site: &Site,
        place: &Placement,
        config: &MachineConfig,
    ) -> Result<Machine> {
        let net = self.net_for(place.app.as_deref())?;
        let base = hangar_machine::network::net_base(net);
        for _ in 0..RETRIES {
            // Host numbers are the cluster's: one machine of an org has each.
            let free = {
                let view = self.model.view();
                hangar_machine::network::HOSTS
                    .map(|h| base + h)
                    .find(|s| !view.kvs.contains_key(&format!("slots/{s}")))
            };
            let slot = free.map(|s| hangar_machine::network::node_base(site.index) | s);
            let Some(slot) = slot else {
                return Err(Error::Invalid(format!(
                    "this org's network on this node is full ({} machines); destroy some first",
                    hangar_machine::network::HOSTS.count()
                )));
            };
            let t = now();
            let m = Machine {
                id: id.into(),
                name: name.into(),
                state: MachineState::Created,
                desired: Desired::Started,
                app: place.app.clone(),
                release: place.release,
                config: config.clone(),
                slot,
                node: site.node.clone(),
                region: site.region.clone(),
                exit_code: None,
                oom_killed: false,
                restarts: 0,
                created_at: t,
                updated_at: t,
                revision: 0,
            };
            let (names, slots, machines) = (
                format!("names/{name}"),
                format!("slots/{}", hangar_machine::network::unique_part(slot)),
                format!("machines/{id}"),
            );
            let txn = Write::new()
                .when([absent(&names), absent(&slots), absent(&machines)])
                .and_then([
                    put(&names, json(id)?),
                    put(&slots, json(id)?),
                    put(&machines, json(&m)?),
                ]);
            if self.txn(txn, &[&names, &slots, &machines])?.0 {
                return self.get(id);
            }
            let view = self.model.view();
            if view.kvs.contains_key(&names) || view.kvs.contains_key(&machines) {
                return Err(Error::Conflict(format!(
                    "a machine named {name:?} exists already; choose another --name"
                )));
            }
            // The slot went to another machine meanwhile: the next one.
        }
        Err(Error::Conflict(format!(
            "machine {name:?}: no free address could be taken after {RETRIES} tries; try again"
        )))
    }

    fn get(&self, id_or_name: &str) -> Result<Machine> {
        if let Some(m) = self.machine_row(id_or_name)? {
            return Ok(m);
        }
        let id = self.read::<String>(&format!("names/{id_or_name}"))?;
        id.and_then(|(id, _)| self.machine_row(&id).transpose())
            .transpose()?
            .ok_or_else(|| no_machine(id_or_name))
    }

    fn machines(&self, app: Option<&str>) -> Result<Vec<Machine>> {
        let mut all: Vec<Machine> = self
            .scan::<Machine>("machines/")?
            .into_iter()
            .map(|(_, mut m, kv)| {
                m.revision = kv.mod_revision as u64;
                m
            })
            .filter(|m| m.state != MachineState::Destroyed)
            .filter(|m| app.is_none() || m.app.as_deref() == app)
            .collect();
        all.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(all)
    }

    fn update_machine(&self, id: &str, expect: Expect, change: MachineChange) -> Result<u64> {
        for _ in 0..RETRIES {
            let Some(now_row) = self.machine_row(id)? else {
                return Err(no_machine(id));
            };
            if let Expect::Revision(r) = expect {
                if r != now_row.revision {
                    return Err(Error::Conflict(format!(
                        "machine {id} changed meanwhile (now at revision {}); read it again and retry",
                        now_row.revision
                    )));
                }
            }
            let mut m = now_row.clone();
            let t = now();
            let mut extra = Vec::new();
            match change {
                MachineChange::State(s) => (m.state, m.updated_at) = (s, t),
                MachineChange::Desired(d) => (m.desired, m.updated_at) = (d, t),
                MachineChange::Config(place, config) => {
                    m.config = config.clone();
                    m.app = place.app.clone();
                    m.release = place.release;
                    m.updated_at = t;
                }
                MachineChange::Exit { code, oom } => {
                    (m.exit_code, m.oom_killed, m.updated_at) = (code, oom, t);
                }
                MachineChange::Restarts(n) => m.restarts = n,
                MachineChange::Destroyed => {
                    m.state = MachineState::Destroyed;
                    m.desired = Desired::Destroyed;
                    if m.name != format!("{id}.destroyed") {
                        extra.push(delete(&format!("names/{}", m.name)));
                        extra.push(delete(&format!(
                            "slots/{}",
                            hangar_machine::network::unique_part(m.slot)
                        )));
                    }
                    m.name = format!("{id}.destroyed");
                    m.slot = 0;
                    m.updated_at = t;
                }
            }
            let key = format!("machines/{id}");
            let mut ops = vec![put(&key, json(&m)?)];
            ops.extend(extra);
            let txn = Write::new()
                .when([unchanged(&key, now_row.revision as i64)])
                .and_then(ops);
            let (done, revision) = self.txn(txn, &[&key])?;
            if done {
                return Ok(revision as u64);
            }
            if matches!(expect, Expect::Revision(_)) {
                return Err(Error::Conflict(format!(
                    "machine {id} changed meanwhile; read it again and retry"
                )));
            }
        }
        Err(Error::Conflict(format!(
            "machine {id} kept changing; the change was not made after {RETRIES} tries"
        )))
    }

    fn net_for(&self, app: Option<&str>) -> Result<u32> {
        let Some(app) = app else { return Ok(0) };
        let Some((app, _)) = self.read::<App>(&format!("apps/{app}"))? else {
            return Ok(0);
        };
        let org = app.org;
        for _ in 0..RETRIES {
            if let Some((net, _)) = self.read::<u32>(&format!("nets/{org}"))? {
                return Ok(net);
            }
            let free = {
                let view = self.model.view();
                (1..hangar_machine::network::NETS)
                    .find(|n| !view.kvs.contains_key(&format!("net-owners/{n}")))
            };
            let Some(net) = free else {
                return Err(Error::Invalid(format!(
                    "this node has a network for {} orgs, all taken; org {org} cannot run machines here",
                    hangar_machine::network::NETS - 1
                )));
            };
            let (nets, owners) = (format!("nets/{org}"), format!("net-owners/{net}"));
            let txn = Write::new()
                .when([absent(&nets), absent(&owners)])
                .and_then([put(&nets, json(&net)?), put(&owners, json(&org)?)]);
            if self.txn(txn, &[&nets, &owners])?.0 {
                return Ok(net);
            }
        }
        Err(Error::Conflict(format!(
            "org {org}: no network could be taken after {RETRIES} tries; try again"
        )))
    }

    fn event(&self, id: &str, kind: &str, detail: serde_json::Value) -> Result<()> {
        let event = Event {
            machine_id: id.into(),
            kind: kind.into(),
            detail,
            at: now(),
        };
        let seq = hex::encode(crate::apps::random_bytes(8)?);
        let key = format!("events/{id}/{seq}");
        self.txn(Write::new().and_then([put(&key, json(&event)?)]), &[])?;
        Ok(())
    }

    fn events(&self, id: &str) -> Result<Vec<Event>> {
        let mut events = self.scan::<Event>(&format!("events/{id}/"))?;
        events.sort_by_key(|(_, _, kv)| kv.create_revision);
        Ok(events.into_iter().map(|(_, e, _)| e).collect())
    }

    fn create_app(&self, name: &str, org: &str) -> Result<App> {
        valid_name(name)?;
        let app = App {
            name: name.into(),
            org: org.into(),
            created_at: now(),
        };
        let key = format!("apps/{name}");
        let txn = Write::new()
            .when([absent(&key)])
            .and_then([put(&key, json(&app)?)]);
        if !self.txn(txn, &[&key])?.0 {
            return Err(Error::Conflict(format!(
                "app {name} exists already; deploy to it, or pick another name"
            )));
        }
        Ok(app)
    }

    fn app(&self, name: &str) -> Result<App> {
        self.read::<App>(&format!("apps/{name}"))?
            .map(|(app, _)| app)
            .ok_or_else(|| no_app(name))
    }

    fn apps(&self) -> Result<Vec<App>> {
        Ok(self
            .scan::<App>("apps/")?
            .into_iter()
            .map(|(_, app, _)| app)
            .collect())
    }

    fn delete_app(&self, name: &str) -> Result<()> {
        let txn = Write::new().and_then([
            delete(&format!("apps/{name}")),
            TxnOp::delete(
                k(&format!("releases/{name}/")),
                Some(hangar_cluster::etcd_client::DeleteOptions::new().with_prefix()),
            ),
            TxnOp::delete(
                k(&format!("secrets/{name}/")),
                Some(hangar_cluster::etcd_client::DeleteOptions::new().with_prefix()),
            ),
        ]);
        self.txn(txn, &[])?;
        Ok(())
    }

    fn add_release(
        &self,
        app: &str,
        image: &str,
        description: &str,
        config: &MachineConfig,
        replaces: &[String],
        observe: &crate::observe::Observe,
    ) -> Result<Release> {
        for _ in 0..RETRIES {
            let version = self.releases(app)?.first().map_or(0, |r| r.version) + 1;
            let release = Release {
                app: app.into(),
                version,
                image: image.into(),
                status: ReleaseStatus::Running,
                description: description.into(),
                config: config.clone(),
                created_at: now(),
                observe: observe.clone(),
            };
            let key = release_key(app, version);
            let stored = StoredRelease {
                release: release.clone(),
                replaces: replaces.to_vec(),
                node: self.joined_name().unwrap_or_default(),
            };
            let txn = Write::new()
                .when([absent(&key)])
                .and_then([put(&key, json(&stored)?)]);
            if self.txn(txn, &[&key])?.0 {
                return Ok(release);
            }
        }
        Err(Error::Conflict(format!(
            "app {app}: no release number could be taken after {RETRIES} tries; try again"
        )))
    }

    fn set_release_status(
        &self,
        app: &str,
        version: u32,
        status: ReleaseStatus,
        description: &str,
    ) -> Result<()> {
        let key = release_key(app, version);
        for _ in 0..RETRIES {
            let Some((mut stored, kv)) = self.read::<StoredRelease>(&key)? else {
                // As SQLite's UPDATE of no row: nothing to change.
                return Ok(());
            };
            stored.release.status = status;
            stored.release.description = description.into();
            let txn = Write::new()
                .when([unchanged(&key, kv.mod_revision)])
                .and_then([put(&key, json(&stored)?)]);
            if self.txn(txn, &[&key])?.0 {
                return Ok(());
            }
        }
        Err(Error::Conflict(format!(
            "release v{version} of {app} kept changing; try again"
        )))
    }

    fn interrupt_releases(&self) -> Result<Vec<Interrupted>> {
        let mut cut = Vec::new();
        let me = self.joined_name().unwrap_or_default();
        let live: HashSet<String> = self.members()?.into_iter().map(|m| m.name).collect();
        for (key, stored, kv) in self.scan::<StoredRelease>("releases/")? {
            if stored.release.status != ReleaseStatus::Running {
                continue;
            }
            // Another live node's deploy goes on there.
            if !stored.node.is_empty() && stored.node != me && live.contains(&stored.node) {
                continue;
            }
            let mut now_stored = stored;
            now_stored.release.status = ReleaseStatus::Interrupted;
            now_stored
                .release
                .description
                .push_str(" (the node stopped during the deploy)");
            let txn = Write::new()
                .when([unchanged(&key, kv.mod_revision)])
                .and_then([put(&key, json(&now_stored)?)]);
            // Lost to another writer: that one decided its fate.
            if self.txn(txn, &[&key])?.0 {
                cut.push(Interrupted {
                    app: now_stored.release.app,
                    version: now_stored.release.version,
                    replaces: now_stored.replaces,
                });
            }
        }
        Ok(cut)
    }

    fn releases(&self, app: &str) -> Result<Vec<Release>> {
        let mut all: Vec<Release> = self
            .scan::<StoredRelease>(&format!("releases/{app}/"))?
            .into_iter()
            .map(|(_, s, _)| s.release)
            .collect();
        all.reverse();
        Ok(all)
    }

    fn put_secrets(&self, app: &str, secrets: &[SealedSecret]) -> Result<()> {
        let ops = secrets
            .iter()
            .map(|s| Ok(put(&format!("secrets/{app}/{}", s.name), json(s)?)))
            .collect::<Result<Vec<_>>>()?;
        self.txn(Write::new().and_then(ops), &[])?;
        Ok(())
    }

    fn unset_secrets(&self, app: &str, names: &[String]) -> Result<Vec<String>> {
        let there: Vec<String> = {
            let view = self.model.view();
            names
                .iter()
                .filter(|n| view.kvs.contains_key(&format!("secrets/{app}/{n}")))
                .cloned()
                .collect()
        };
        if !there.is_empty() {
            let ops: Vec<TxnOp> = there
                .iter()
                .map(|n| delete(&format!("secrets/{app}/{n}")))
                .collect();
            self.txn(Write::new().and_then(ops), &[])?;
        }
        Ok(there)
    }

    fn sealed_secrets(&self, app: &str) -> Result<Vec<SealedSecret>> {
        Ok(self
            .scan::<SealedSecret>(&format!("secrets/{app}/"))?
            .into_iter()
            .map(|(_, s, _)| s)
            .collect())
    }

    fn put_registry_login(&self, org: &str, login: &SealedLogin) -> Result<()> {
        let key = format!("logins/{org}/{}", login.registry);
        self.txn(Write::new().and_then([put(&key, json(login)?)]), &[])?;
        Ok(())
    }

    fn remove_registry_login(&self, org: &str, registry: &str) -> Result<bool> {
        let key = format!("logins/{org}/{registry}");
        let txn = Write::new()
            .when([Compare::create_revision(k(&key), CompareOp::Greater, 0)])
            .and_then([delete(&key)]);
        Ok(self.txn(txn, &[&key])?.0)
    }

    fn sealed_logins(&self, org: &str) -> Result<Vec<SealedLogin>> {
        Ok(self
            .scan::<SealedLogin>(&format!("logins/{org}/"))?
            .into_iter()
            .map(|(_, l, _)| l)
            .collect())
    }

    fn revision(&self) -> Result<u64> {
        Ok(self.model.view().revision as u64)
    }

    fn hold_app(&self, app: &str) -> Result<bool> {
        self.hold_app_lock(app)
    }

    fn let_go_app(&self, app: &str) -> Result<()> {
        self.let_go_app_lock(app)
    }

    fn wait_change(&self, since: u64, timeout: Duration) -> Result<u64> {
        let view = self.model.view();
        let (view, _) = self
            .model
            .moved
            .wait_timeout_while(view, timeout, |v| v.revision as u64 == since)
            .unwrap_or_else(|e| e.into_inner());
        Ok(view.revision as u64)
    }

    fn members(&self) -> Result<Vec<crate::store::Member>> {
        Ok(self
            .scan::<crate::store::Member>("members/")?
            .into_iter()
            .map(|(_, m, _)| m)
            .collect())
    }

    fn changes(&self, since: u64) -> Result<Changes> {
        let view = self.model.view();
        let revision = view.revision as u64;
        if since < view.feed_from as u64 && since < revision {
            return Ok(Changes::Compacted { revision });
        }
        Ok(Changes::Since {
            revision,
            changes: view
                .feed
                .iter()
                .filter(|c| c.revision > since)
                .cloned()
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests;
