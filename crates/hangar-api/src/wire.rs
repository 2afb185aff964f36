//! The Machines and Apps API's request and response bodies: one set of
//! types that the server ([`crate::server`]) reads and writes and the
//! client ([`crate::client`]) writes and reads, so the two cannot drift.
//!
//! Request bodies refuse unknown fields (a typo is a 400 naming it, not a
//! setting silently ignored); responses add fields freely.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::apps::Release;
use crate::config::MachineConfig;
use crate::store::MachineState;

pub use crate::apps::{App, SecretInfo};
pub use crate::checks::CheckStatus;
pub use crate::deploy::DeployRequest;
pub use crate::node::ExecOutput;
pub use crate::store::Event;

/// `POST /v1/machines`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CreateMachine {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The app the machine belongs to (or `config.metadata.app`, as
    /// earlier clients name it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    pub config: MachineConfig,
    /// The region to run it in (a cluster's; default: the node's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// The release of its app it belongs to: set by the nodes of a cluster
    /// for a deploy's machines (the admin's only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<u32>,
}

/// `POST /v1/machines/{id}`: a new config (the machine is replaced).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpdateMachine {
    /// Its app, when it changes (or `config.metadata.app`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    pub config: MachineConfig,
}

/// `POST /v1/machines/{id}/stop` and `/restart`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StopMachine {
    pub signal: String,
    /// Seconds before SIGKILL.
    pub timeout: u64,
}

impl Default for StopMachine {
    fn default() -> Self {
        StopMachine {
            signal: "SIGTERM".into(),
            timeout: 10,
        }
    }
}

/// `POST /v1/machines/{id}/signal`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SignalMachine {
    pub signal: String,
}

/// `POST /v1/machines/{id}/exec`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExecRequest {
    pub cmd: Vec<String>,
    /// A user of the machine's image; default root.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The command's standard input (as Fly's exec takes it).
    pub stdin: String,
}

/// `GET /v1/machines/{id}/wait`'s query.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WaitQuery {
    /// `started` (default), `stopped` or `destroyed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Whole seconds; 60 when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
}

/// A flag in a query (`?force=true`, `?follow=true`): only `true` sets it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FlagQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub follow: Option<String>,
}

impl FlagQuery {
    pub fn force(&self) -> bool {
        self.force.as_deref() == Some("true")
    }
    pub fn follow(&self) -> bool {
        self.follow.as_deref() == Some("true")
    }
}

/// A machine as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MachineView {
    pub id: String,
    pub name: String,
    pub state: MachineState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<u32>,
    /// The node it runs on (a cluster's; empty for a node alone) and its
    /// region.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
    #[serde(default)]
    pub region: String,
    pub config: MachineConfig,
    /// Its IPv6 address (Fly's name for it); none once destroyed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<String>,
    pub restarts: u32,
    pub created_at: u64,
    pub updated_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmm: Option<hangar_machine::runtime::VmInfo>,
    /// Every check of its config, `pending` until the first verdict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checks: Option<Vec<CheckStatus>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oom_killed: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_ref: Option<ImageRef>,
}

/// The image a machine's reference names, as the node's store has it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImageRef {
    pub reference: String,
    pub digest: String,
}

/// `POST /v1/apps`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CreateApp {
    pub name: String,
    /// Default: the token's org (`personal` for the admin).
    pub org: String,
}

/// An app in `GET /v1/apps`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AppSummary {
    pub name: String,
    pub org: String,
    /// How many machines it has.
    pub machines: usize,
    /// Its current release's version.
    pub release: Option<u32>,
}

/// `GET /v1/apps/{app}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AppView {
    pub name: String,
    pub org: String,
    pub machines: Vec<MachineView>,
    /// The release it runs.
    pub release: Option<Release>,
}

/// `POST /v1/apps/{app}/scale`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScaleRequest {
    /// Machines per region.
    pub count: u32,
    /// The regions to scale in; none: each the app has machines in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<String>,
}

/// `POST /v1/apps/{app}/purge`: one of `url`, `prefix`, `tag`, or none of
/// them for the whole app; `wait` seconds at most for every live node to
/// have applied it (10 by default).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PurgeRequest {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    pub soft: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wait: Option<f64>,
}

/// `POST /v1/apps/{app}/secrets`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SetSecrets {
    pub values: BTreeMap<String, String>,
}

/// `POST /v1/apps/{app}/secrets/unset`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UnsetSecrets {
    pub names: Vec<String>,
}

/// The answer to an unset: the names that were set.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Unset {
    pub unset: Vec<String>,
}

/// `PUT /v1/registry-logins/{registry}`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryLoginRequest {
    pub username: String,
    pub password: String,
}

/// An org's login to another registry, as the API shows it (never the
/// password).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RegistryLogin {
    pub registry: String,
    pub username: String,
}

/// The answer to a logout.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Removed {
    pub removed: String,
}

/// The answer to an operation that returns nothing else.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Done {
    pub ok: bool,
}

/// One line of a streamed operation (deploy, scale): a `message` as it
/// goes, then a last line with `ok` and the `error` or the result.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ProgressLine {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ok: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A deploy's release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<Release>,
}

/// An error answer: `{"error": "..."}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// `GET /v1/apps/{app}/alerts`: the current release's rules, what fires
/// now, and how the last post to the webhook went.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AppAlerts {
    pub rules: Vec<String>,
    #[serde(default)]
    pub webhook: Option<String>,
    pub firing: Vec<crate::alerts::Firing>,
    #[serde(default)]
    pub last_delivery: Option<crate::alerts::Delivery>,
}

pub use crate::server::dashboard::{TicketAnswer, TicketRequest};
