//! The state store: the source of truth for what machines, apps, releases,
//! secrets and registry logins exist and what machines should be doing,
//! behind the [`Store`] trait.
//!
//! [`SqliteStore`] keeps it in SQLite under `$HANGAR_HOME/state.db`, its
//! schema in numbered migrations ([`migrations`]); [`EtcdStore`] keeps a
//! cluster's in etcd, shared by its nodes. The trait fits both:
//!
//! - Every write gets a *revision*, one counter for the whole store, as
//!   etcd's are; a machine carries the revision of its last change, and
//!   [`Store::update_machine`] with [`Expect::Revision`] is a compare-and-set
//!   (a `Conflict` when someone else changed it since it was read).
//! - [`Store::changes`] is the change feed: which keys changed after a
//!   revision, for a read model to follow (etcd's watch from a revision);
//!   old entries are compacted, and a reader that fell behind reloads.
//! - Unique allocations (names, addresses) are decided inside the store.
//!
//! Secrets and logins are sealed by the caller ([`crate::apps::Sealer`]):
//! the store holds and returns sealed bytes only.
//!
//! This module must not know the host or the API: it stores rows.

#[cfg(test)]
mod contract;
mod etcd;
mod migrations;
mod sqlite;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::apps::{App, Interrupted, Release, ReleaseStatus, Sealer, SecretInfo};
use crate::config::MachineConfig;
use crate::error::{Error, Result};

pub use etcd::{EtcdStore, LEASE_TTL};
pub use sqlite::SqliteStore;

crate::closed_set! {
    /// A machine's lifecycle state, as Fly names them.
    pub enum MachineState {
        Created,
        Starting,
        Started,
        Stopping,
        Stopped,
        Destroying,
        Destroyed,
        Failed,
        /// Its node left the cluster (its lease ended) with it: its app
        /// gets a replacement elsewhere; it is started again should its
        /// node come back first.
        Lost,
    }
}

crate::closed_set! {
    /// What a machine should be doing: the reconcile loop works towards it.
    pub enum Desired {
        Started,
        Stopped,
        Destroyed,
    }
}

/// One machine row.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Machine {
    pub id: String,
    pub name: String,
    pub state: MachineState,
    pub desired: Desired,
    /// The app it belongs to: its org's network, its host at the edge, its
    /// secrets. `None`: a machine of its own (the admin's).
    pub app: Option<String>,
    /// The release of its app it runs.
    pub release: Option<u32>,
    pub config: MachineConfig,
    pub slot: u32,
    /// The node it runs on (empty: a one-node store's own, before nodes
    /// had names) and that node's region.
    #[serde(default)]
    pub node: String,
    #[serde(default)]
    pub region: String,
    pub exit_code: Option<i32>,
    pub oom_killed: bool,
    pub restarts: u32,
    pub created_at: u64,
    pub updated_at: u64,
    /// The store's revision at its last change: what a compare-and-set
    /// names ([`Expect::Revision`]).
    pub revision: u64,
}

/// One event of a machine's life.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Event {
    pub machine_id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub detail: serde_json::Value,
    pub at: u64,
}

/// Which node runs a machine, and in which region: the node that creates
/// it (in a cluster, the one its create was placed on).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Site {
    pub node: String,
    pub region: String,
    /// The node's number in the cluster (0 alone): the node part of its
    /// machines' addresses (see `hangar_machine::network`).
    #[serde(default)]
    pub index: u32,
}

/// A node of a cluster as it announces itself while it lives (its
/// membership ends with its lease: see [`EtcdStore::join`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    pub region: String,
    /// Its Machines API (`http://host:port`): where calls about its
    /// machines are carried out.
    pub api: String,
    /// Its registry (`host:port`), if it runs one.
    #[serde(default)]
    pub registry: Option<String>,
    /// The memory its machines may have in all, in MB, and its CPUs.
    pub memory_mb: u64,
    pub cpus: u32,
    /// Its number in the cluster (from 1; given at its first join and
    /// kept): the node part of its machines' addresses.
    #[serde(default)]
    pub index: u32,
    /// Where it takes the private network's traffic from the other nodes
    /// (VXLAN); none: its machines are reachable from its own node only.
    #[serde(default)]
    pub underlay: Option<std::net::IpAddr>,
    /// Its edge's HTTP listener (`host:port`) where the other edges reach
    /// it; none: its edge is not part of the cluster's CDN.
    #[serde(default)]
    pub edge: Option<String>,
    /// When it joined (unix seconds): its edge's share of the cache keys
    /// grows from then (0: all of it at once).
    #[serde(default)]
    pub since: u64,
}

/// Where a machine belongs: its app and the app's release.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Placement {
    pub app: Option<String>,
    pub release: Option<u32>,
}

impl Machine {
    pub fn placement(&self) -> Placement {
        Placement {
            app: self.app.clone(),
            release: self.release,
        }
    }

    /// Started, wanted started (not on its way to a stop): what may serve,
    /// once its checks pass.
    pub fn running_as_wanted(&self) -> bool {
        self.state == MachineState::Started && self.desired == Desired::Started
    }
}

/// What a write to a machine expects of it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Expect {
    /// Whatever it is now.
    Any,
    /// Unchanged since it was read at this revision; a `Conflict` otherwise.
    Revision(u64),
}

/// One change to a machine row.
#[derive(Clone, Copy, Debug)]
pub enum MachineChange<'a> {
    State(MachineState),
    Desired(Desired),
    /// A new config, and the app and release it belongs to.
    Config(&'a Placement, &'a MachineConfig),
    /// How its app ended.
    Exit {
        code: Option<i32>,
        oom: bool,
    },
    Restarts(u32),
    /// Destroyed: its name and address are free again; the row stays.
    Destroyed,
}

crate::closed_set! {
    /// What kind of thing a change feed entry is about.
    pub enum Kind {
        Machine,
        App,
        Release,
        Secret,
        RegistryLogin,
        OrgNet,
    }
}

/// One entry of the change feed: a key was written (or deleted) at a
/// revision. Keys are `id` (machine), `name` (app), `app/version`,
/// `app/name` (secret), `org/registry` and `org`.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    pub revision: u64,
    pub kind: Kind,
    pub key: String,
    pub deleted: bool,
}

/// What [`Store::changes`] answers.
#[derive(Clone, Debug, PartialEq)]
pub enum Changes {
    /// The changes after the revision asked for, oldest first, and the
    /// store's revision they bring the reader to.
    Since { revision: u64, changes: Vec<Change> },
    /// The feed no longer reaches back there: read everything again (as of
    /// `revision`) and follow from it.
    Compacted { revision: u64 },
}

/// A secret as stored: its value sealed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SealedSecret {
    pub name: String,
    pub sealed: Vec<u8>,
    /// The first hex digits of SHA-256 over the value (see [`SecretInfo`]).
    pub digest: String,
    pub created_at: u64,
}

/// An org's login to another registry, its password sealed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SealedLogin {
    pub registry: String,
    pub username: String,
    pub sealed: Vec<u8>,
}

/// The state store (see the module doc). The required methods are what a
/// store implements; the provided ones are conveniences over them.
pub trait Store: Send + Sync {
    /// Insert a new machine in state `created`, wanted started, with the
    /// lowest free slot of its org's net (see `hangar_machine::network`); a
    /// name in use is a `Conflict`.
    fn insert_machine(
        &self,
        id: &str,
        name: &str,
        site: &Site,
        place: &Placement,
        config: &MachineConfig,
    ) -> Result<Machine>;

    /// A machine by id or name, destroyed ones included.
    fn get(&self, id_or_name: &str) -> Result<Machine>;

    /// Machines that are not destroyed (of one app, when given), oldest
    /// first.
    fn machines(&self, app: Option<&str>) -> Result<Vec<Machine>>;

    /// Change one machine; returns the revision of the change. A machine
    /// that is not there is `NotFound`, one changed since the expected
    /// revision a `Conflict` (and nothing is written).
    fn update_machine(&self, id: &str, expect: Expect, change: MachineChange) -> Result<u64>;

    /// The net of the org of `app` (given one on first use, kept for good);
    /// 0 for a machine of no app.
    fn net_for(&self, app: Option<&str>) -> Result<u32>;

    fn event(&self, id: &str, kind: &str, detail: serde_json::Value) -> Result<()>;

    /// A machine's events, oldest first.
    fn events(&self, id: &str) -> Result<Vec<Event>>;

    /// A new app of `org`; a taken name is a `Conflict`.
    fn create_app(&self, name: &str, org: &str) -> Result<App>;

    fn app(&self, name: &str) -> Result<App>;

    /// Every app, by name.
    fn apps(&self) -> Result<Vec<App>>;

    /// Forget an app, its releases and secrets (its machines are the
    /// caller's to destroy first).
    fn delete_app(&self, name: &str) -> Result<()>;

    /// Record a new release (status `running`) that replaces the machines
    /// `replaces`; returns it with its version, the app's next.
    fn add_release(
        &self,
        app: &str,
        image: &str,
        description: &str,
        config: &MachineConfig,
        replaces: &[String],
        observe: &crate::observe::Observe,
    ) -> Result<Release>;

    fn set_release_status(
        &self,
        app: &str,
        version: u32,
        status: ReleaseStatus,
        description: &str,
    ) -> Result<()>;

    /// Releases still `running` when the node starts were cut short: mark
    /// them `interrupted` and return them. In a cluster, those of this node
    /// and of nodes that are no longer members (a live node's deploy is
    /// its own).
    fn interrupt_releases(&self) -> Result<Vec<Interrupted>>;

    /// Hold `app` for one deploy or scale across every node that shares
    /// this store; false when another node holds it. A store of one node
    /// has nothing to hold (the node's own lock is enough).
    fn hold_app(&self, app: &str) -> Result<bool> {
        let _ = app;
        Ok(true)
    }

    /// Let go of what [`Store::hold_app`] took.
    fn let_go_app(&self, app: &str) -> Result<()> {
        let _ = app;
        Ok(())
    }

    /// The app's releases, newest first.
    fn releases(&self, app: &str) -> Result<Vec<Release>>;

    /// Add or replace the app's secrets of these names.
    fn put_secrets(&self, app: &str, secrets: &[SealedSecret]) -> Result<()>;

    /// Remove secrets; returns the names that existed.
    fn unset_secrets(&self, app: &str, names: &[String]) -> Result<Vec<String>>;

    /// The app's secrets, by name.
    fn sealed_secrets(&self, app: &str) -> Result<Vec<SealedSecret>>;

    fn put_registry_login(&self, org: &str, login: &SealedLogin) -> Result<()>;

    /// Whether the org had a login there (now gone).
    fn remove_registry_login(&self, org: &str, registry: &str) -> Result<bool>;

    /// The org's logins, by registry.
    fn sealed_logins(&self, org: &str) -> Result<Vec<SealedLogin>>;

    /// The store's revision now: the last write's.
    fn revision(&self) -> Result<u64>;

    /// Wait until the revision is past `since`, for at most `timeout`;
    /// returns the revision then (still `since` when nothing changed).
    /// This default looks every 20 ms; a store that is told of changes
    /// waits to be told.
    fn wait_change(&self, since: u64, timeout: std::time::Duration) -> Result<u64> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let now = self.revision()?;
            if now != since || std::time::Instant::now() >= deadline {
                return Ok(now);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// The live members of the cluster, by name; none for a store of one
    /// node.
    fn members(&self) -> Result<Vec<Member>> {
        Ok(Vec::new())
    }

    /// What changed after `since` (see [`Changes`]).
    fn changes(&self, since: u64) -> Result<Changes>;

    /// Machines that are not destroyed, oldest first.
    fn list(&self) -> Result<Vec<Machine>> {
        self.machines(None)
    }

    /// The app's machines that are not destroyed, oldest first.
    fn app_machines(&self, app: &str) -> Result<Vec<Machine>> {
        self.machines(Some(app))
    }

    fn set_state(&self, id: &str, state: MachineState) -> Result<()> {
        self.update_machine(id, Expect::Any, MachineChange::State(state))
            .map(drop)
    }

    fn set_desired(&self, id: &str, desired: Desired) -> Result<()> {
        self.update_machine(id, Expect::Any, MachineChange::Desired(desired))
            .map(drop)
    }

    /// A new config (and app and release) for a machine.
    fn set_config(&self, id: &str, place: &Placement, config: &MachineConfig) -> Result<()> {
        self.update_machine(id, Expect::Any, MachineChange::Config(place, config))
            .map(drop)
    }

    /// Record how the app ended.
    fn set_exit(&self, id: &str, code: Option<i32>, oom: bool) -> Result<()> {
        self.update_machine(id, Expect::Any, MachineChange::Exit { code, oom })
            .map(drop)
    }

    /// Free the name and slot of a destroyed machine, keeping its row.
    fn mark_destroyed(&self, id: &str) -> Result<()> {
        self.update_machine(id, Expect::Any, MachineChange::Destroyed)
            .map(drop)
    }

    fn release(&self, app: &str, version: u32) -> Result<Release> {
        self.releases(app)?
            .into_iter()
            .find(|r| r.version == version)
            .ok_or_else(|| Error::NotFound(format!("app {app} has no release v{version}")))
    }

    /// The newest release that completed: what machines should run.
    fn current_release(&self, app: &str) -> Result<Option<Release>> {
        Ok(self
            .releases(app)?
            .into_iter()
            .find(|r| r.status == ReleaseStatus::Complete))
    }

    /// Seal and store secrets.
    fn set_secrets(
        &self,
        sealer: &Sealer,
        app: &str,
        values: &BTreeMap<String, String>,
    ) -> Result<()> {
        let secrets = values
            .iter()
            .map(|(name, value)| {
                Ok(SealedSecret {
                    name: name.clone(),
                    sealed: sealer.seal(value.as_bytes())?,
                    digest: crate::apps::short_digest(value),
                    created_at: now(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        self.put_secrets(app, &secrets)
    }

    /// The app's secrets as the API shows them: never their values.
    fn secret_infos(&self, app: &str) -> Result<Vec<SecretInfo>> {
        Ok(self
            .sealed_secrets(app)?
            .into_iter()
            .map(|s| SecretInfo {
                name: s.name,
                digest: s.digest,
                created_at: s.created_at,
            })
            .collect())
    }

    /// The app's secrets, opened: for a machine's environment only.
    fn open_secrets(&self, sealer: &Sealer, app: &str) -> Result<BTreeMap<String, String>> {
        self.sealed_secrets(app)?
            .into_iter()
            .map(|s| {
                let plain = sealer
                    .open(&s.sealed)
                    .map_err(|e| Error::Internal(format!("secret {} of {app}: {e}", s.name)))?;
                Ok((s.name, String::from_utf8_lossy(&plain).into_owned()))
            })
            .collect()
    }

    /// An org's login to another registry (the password sealed): what the
    /// node pulls that org's images from there with.
    fn set_registry_login(
        &self,
        sealer: &Sealer,
        org: &str,
        registry: &str,
        username: &str,
        password: &str,
    ) -> Result<()> {
        let login = SealedLogin {
            registry: registry.into(),
            username: username.into(),
            sealed: sealer.seal(password.as_bytes())?,
        };
        self.put_registry_login(org, &login)
    }

    /// The registries an org has logins for, with their user names.
    fn registry_logins(&self, org: &str) -> Result<Vec<(String, String)>> {
        Ok(self
            .sealed_logins(org)?
            .into_iter()
            .map(|l| (l.registry, l.username))
            .collect())
    }

    /// The org's login to `registry`, opened: for the node's pulls only.
    fn open_registry_login(
        &self,
        sealer: &Sealer,
        org: &str,
        registry: &str,
    ) -> Result<Option<(String, String)>> {
        let Some(login) = self
            .sealed_logins(org)?
            .into_iter()
            .find(|l| l.registry == registry)
        else {
            return Ok(None);
        };
        let password = sealer
            .open(&login.sealed)
            .map_err(|e| Error::Internal(format!("registry login of {org} for {registry}: {e}")))?;
        Ok(Some((
            login.username,
            String::from_utf8_lossy(&password).into_owned(),
        )))
    }
}

/// What a missing machine answers. The API answers the same for another
/// org's, so the two must not differ: both come from here.
pub fn no_machine(id: &str) -> Error {
    Error::NotFound(format!(
        "no machine {id:?}; list them with `hangar machine list`"
    ))
}

/// What a missing app answers (and, through the API, another org's).
pub fn no_app(name: &str) -> Error {
    Error::NotFound(format!(
        "no app {name:?}; create it with `hangar launch` or list them with `hangar apps list`"
    ))
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Unix time in nanoseconds (for ids that sort by time).
pub fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}
