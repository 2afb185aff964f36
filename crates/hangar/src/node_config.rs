//! `$HANGAR_HOME/config.toml`: where the node's API is and the admin token
//! for it. `hangar up` writes it on first start; every client command reads it.

use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Base URL of the Machines API, e.g. `http://127.0.0.1:4280`.
    pub api: String,
    pub token: String,
    /// The node's registry (`host:port`), where deploys push images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<String>,
    /// Where the node's edge serves apps: `http://<app>.<domain>:<port>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edge: Option<String>,
    /// The etcd cluster that keeps the node's state (`--etcd`); none: the
    /// node's own SQLite store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd: Option<String>,
    /// The node's name in that cluster (`--node`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The node's region (`--region`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
}

/// Where a node keeps its state: its own SQLite store, or an etcd cluster
/// under a node name.
#[derive(Clone, Debug, Default)]
pub struct StateAt {
    pub etcd: Option<String>,
    pub node: Option<String>,
    pub region: Option<String>,
}

impl StateAt {
    /// What `config.toml` says (for `hangar node stop` and `destroy`).
    pub fn of_home(home: &Path) -> StateAt {
        load(home)
            .map(|c| StateAt {
                etcd: c.etcd,
                node: c.node,
                region: c.region,
            })
            .unwrap_or_default()
    }

    /// Where the node's machines run: its name (in a cluster; a node alone
    /// has none) and its region (`local` unless given).
    pub fn site(&self) -> hangar_api::store::Site {
        hangar_api::store::Site {
            node: if self.etcd.is_some() {
                self.node_name()
            } else {
                String::new()
            },
            region: self.region.clone().unwrap_or_else(|| "local".into()),
            // Given by the cluster when the node joins it.
            index: 0,
        }
    }

    /// The node's name: as given, else the host's name.
    pub fn node_name(&self) -> String {
        self.node.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "node".into())
        })
    }
}

impl NodeConfig {
    /// The URL an app is served at (the default edge when unknown).
    pub fn app_url(&self, app: &str) -> String {
        self.edge
            .as_deref()
            .unwrap_or("http://<app>.localhost:8080")
            .replace("<app>", app)
    }
}

pub fn path(home: &Path) -> std::path::PathBuf {
    home.join("config.toml")
}

pub fn load(home: &Path) -> Result<NodeConfig> {
    let p = path(home);
    let text = std::fs::read_to_string(&p).with_context(|| {
        format!(
            "no node config at {}; start a node with `hangar up` first",
            p.display()
        )
    })?;
    toml::from_str(&text).with_context(|| format!("{} is not a valid node config", p.display()))
}

pub fn save(home: &Path, config: &NodeConfig) -> Result<()> {
    std::fs::create_dir_all(home).with_context(|| format!("cannot create {}", home.display()))?;
    let text = toml::to_string(config)?;
    let tmp = home.join(".config.toml.tmp");
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    #[allow(clippy::permissions_set_readonly_false)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    }
    std::fs::rename(&tmp, path(home))
        .with_context(|| format!("cannot write {}", path(home).display()))
}
