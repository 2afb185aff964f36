//! The state store: SQLite under `$HANGAR_HOME/state.db`, the source of truth
//! for what machines exist and what they should be doing.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::config::MachineConfig;
use crate::error::{Error, Result};

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

macro_rules! sql_text {
    ($($t:ty),*) => {$(
        impl rusqlite::types::ToSql for $t {
            fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
                Ok(<&'static str>::from(*self).into())
            }
        }
        impl rusqlite::types::FromSql for $t {
            fn column_result(v: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
                v.as_str()?
                    .parse()
                    .map_err(|e| rusqlite::types::FromSqlError::Other(Box::new(e)))
            }
        }
    )*};
}
pub(crate) use sql_text;
sql_text!(MachineState, Desired);

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
    pub exit_code: Option<i32>,
    pub oom_killed: bool,
    pub restarts: u32,
    pub created_at: u64,
    pub updated_at: u64,
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

pub struct State {
    db: Mutex<Connection>,
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn row(r: &rusqlite::Row) -> rusqlite::Result<(Machine, String)> {
    let config: String = r.get(4)?;
    Ok((
        Machine {
            id: r.get(0)?,
            name: r.get(1)?,
            state: r.get(2)?,
            desired: r.get(3)?,
            app: r.get(11)?,
            release: r.get(12)?,
            config: MachineConfig::default(),
            slot: u32::try_from(r.get::<_, i64>(5)?).unwrap_or(0),
            exit_code: r.get(6)?,
            oom_killed: r.get::<_, i64>(7)? != 0,
            restarts: r.get(8)?,
            created_at: r.get(9)?,
            updated_at: r.get(10)?,
        },
        config,
    ))
}

/// The net of the org of `app` (given one on first use, kept for good); 0
/// for a machine of no app.
fn net_for(db: &Connection, app: Option<&str>) -> Result<u32> {
    let Some(app) = app else {
        return Ok(0);
    };
    let org: Option<String> = db
        .query_row("SELECT org FROM apps WHERE name = ?1", [app], |r| r.get(0))
        .optional()?;
    let Some(org) = org else {
        return Ok(0);
    };
    if let Some(net) = db
        .query_row("SELECT net FROM org_nets WHERE org = ?1", [&org], |r| {
            r.get(0)
        })
        .optional()?
    {
        return Ok(net);
    }
    let taken: std::collections::HashSet<u32> = db
        .prepare("SELECT net FROM org_nets")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let net = (1..hangar_machine::network::NETS)
        .find(|n| !taken.contains(n))
        .ok_or_else(|| {
            Error::Invalid(format!(
                "this node has a network for {} orgs, all taken; org {org} cannot run machines here",
                hangar_machine::network::NETS - 1
            ))
        })?;
    db.execute(
        "INSERT INTO org_nets (org, net) VALUES (?1, ?2)",
        params![org, net],
    )?;
    Ok(net)
}

const COLUMNS: &str = "id, name, state, desired, config, slot, exit_code, oom_killed, restarts, created_at, updated_at, app, release";

impl State {
    pub fn open(home: &Path) -> Result<State> {
        std::fs::create_dir_all(home)
            .map_err(|e| Error::Internal(format!("{}: {e}", home.display())))?;
        let mut db = Connection::open(home.join("state.db"))?;
        db.execute_batch(
            "PRAGMA journal_mode=WAL;
             PRAGMA synchronous=NORMAL;
             PRAGMA busy_timeout=5000;",
        )?;
        crate::migrations::migrate(&mut db).map_err(|e| {
            Error::Internal(format!(
                "{}: cannot bring the state store up to date: {e}",
                home.join("state.db").display()
            ))
        })?;
        Ok(State { db: Mutex::new(db) })
    }

    pub(crate) fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn finish(&self, rows: Vec<(Machine, String)>) -> Result<Vec<Machine>> {
        rows.into_iter()
            .map(|(mut m, config)| {
                m.config = serde_json::from_str(&config)
                    .map_err(|e| Error::Internal(format!("stored config of {}: {e}", m.id)))?;
                Ok(m)
            })
            .collect()
    }

    /// The net of the org of `app` (see [`net_for`]).
    pub fn net_for(&self, app: Option<&str>) -> Result<u32> {
        net_for(&self.db(), app)
    }

    /// Insert a new machine in state `created`, with the lowest free slot of
    /// its org's net (see `hangar_machine::network`).
    pub fn insert(
        &self,
        id: &str,
        name: &str,
        place: &Placement,
        config: &MachineConfig,
    ) -> Result<Machine> {
        let db = self.db();
        let net = net_for(&db, place.app.as_deref())?;
        let base = hangar_machine::network::net_base(net);
        let taken: std::collections::HashSet<u32> = db
            .prepare("SELECT slot FROM machines WHERE slot >= ?1 AND slot < ?2")?
            .query_map(params![base, base + 256], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let slot = hangar_machine::network::HOSTS
            .map(|h| base + h)
            .find(|s| !taken.contains(s))
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "this org's network on this node is full ({} machines); destroy some first",
                    hangar_machine::network::HOSTS.count()
                ))
            })?;
        let t = now();
        let json = serde_json::to_string(config).map_err(|e| Error::Internal(e.to_string()))?;
        match db.execute(
            &format!("INSERT INTO machines ({COLUMNS}) VALUES (?1, ?2, 'created', 'started', ?3, ?4, NULL, 0, 0, ?5, ?5, ?6, ?7)"),
            params![id, name, json, slot, t, place.app, place.release],
        ) {
            Ok(_) => {}
            Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::ConstraintViolation => {
                return Err(Error::Conflict(format!("a machine named {name:?} exists already; choose another --name")));
            }
            Err(e) => return Err(e.into()),
        }
        drop(db);
        self.get(id)
    }

    pub fn get(&self, id_or_name: &str) -> Result<Machine> {
        let rows = {
            let db = self.db();
            let mut stmt = db.prepare(&format!(
                "SELECT {COLUMNS} FROM machines WHERE (id = ?1 OR name = ?1)"
            ))?;
            let r = stmt.query_row(params![id_or_name], row).optional()?;
            r.into_iter().collect::<Vec<_>>()
        };
        self.finish(rows)?.pop().ok_or_else(|| {
            Error::NotFound(format!(
                "no machine {id_or_name:?}; list them with `hangar machine list`"
            ))
        })
    }

    /// Machines that are not destroyed, oldest first.
    pub fn list(&self) -> Result<Vec<Machine>> {
        self.live_where("", [])
    }

    /// The app's machines that are not destroyed, oldest first.
    pub fn app_machines(&self, app: &str) -> Result<Vec<Machine>> {
        self.live_where("AND app = ?1", [app])
    }

    fn live_where(&self, filter: &str, args: impl rusqlite::Params) -> Result<Vec<Machine>> {
        let rows = {
            let db = self.db();
            let mut stmt = db.prepare(&format!(
                "SELECT {COLUMNS} FROM machines WHERE state != 'destroyed' {filter} ORDER BY created_at, id"
            ))?;
            let r = stmt
                .query_map(args, row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            r
        };
        self.finish(rows)
    }

    pub fn set_state(&self, id: &str, state: MachineState) -> Result<()> {
        self.db().execute(
            "UPDATE machines SET state = ?2, updated_at = ?3 WHERE id = ?1",
            params![id, state, now()],
        )?;
        Ok(())
    }

    pub fn set_desired(&self, id: &str, desired: Desired) -> Result<()> {
        self.db().execute(
            "UPDATE machines SET desired = ?2, updated_at = ?3 WHERE id = ?1",
            params![id, desired, now()],
        )?;
        Ok(())
    }

    /// A new config (and app and release) for a machine.
    pub fn set_config(&self, id: &str, place: &Placement, config: &MachineConfig) -> Result<()> {
        let json = serde_json::to_string(config).map_err(|e| Error::Internal(e.to_string()))?;
        self.db().execute(
            "UPDATE machines SET config = ?2, app = ?4, release = ?5, updated_at = ?3 WHERE id = ?1",
            params![id, json, now(), place.app, place.release],
        )?;
        Ok(())
    }

    /// Record how the app ended.
    pub fn set_exit(&self, id: &str, code: Option<i32>, oom: bool) -> Result<()> {
        self.db().execute(
            "UPDATE machines SET exit_code = ?2, oom_killed = ?3, updated_at = ?4 WHERE id = ?1",
            params![id, code, oom as i64, now()],
        )?;
        Ok(())
    }

    pub fn set_restarts(&self, id: &str, restarts: u32) -> Result<()> {
        self.db().execute(
            "UPDATE machines SET restarts = ?2 WHERE id = ?1",
            params![id, restarts],
        )?;
        Ok(())
    }

    /// Free the name and slot of a destroyed machine, keeping its row.
    pub fn mark_destroyed(&self, id: &str) -> Result<()> {
        self.db().execute(
            "UPDATE machines SET state = 'destroyed', desired = 'destroyed', name = id || '.destroyed',
             slot = (SELECT MIN(COALESCE(MIN(slot), 0), 0) - 1 FROM machines), updated_at = ?2 WHERE id = ?1",
            params![id, now()],
        )?;
        Ok(())
    }

    pub fn event(&self, id: &str, kind: &str, detail: serde_json::Value) -> Result<()> {
        self.db().execute(
            "INSERT INTO events (machine_id, type, detail, at) VALUES (?1, ?2, ?3, ?4)",
            params![id, kind, detail.to_string(), now()],
        )?;
        Ok(())
    }

    pub fn events(&self, id: &str) -> Result<Vec<Event>> {
        let db = self.db();
        let mut stmt = db.prepare(
            "SELECT machine_id, type, detail, at FROM events WHERE machine_id = ?1 ORDER BY seq",
        )?;
        let rows = stmt
            .query_map(params![id], |r| {
                let detail: String = r.get(2)?;
                Ok(Event {
                    machine_id: r.get(0)?,
                    kind: r.get(1)?,
                    detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::Null),
                    at: r.get(3)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }
}
