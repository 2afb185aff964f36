//! The state store in SQLite (`$HANGAR_HOME/state.db`, WAL): one node's.
//! Revisions and the change feed come from triggers on every table
//! (migration v3), so no write can forget them.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};

use super::{
    no_app, no_machine, now, Change, Changes, Desired, Event, Expect, Machine, MachineChange,
    MachineState, Placement, SealedLogin, SealedSecret, Site, Store,
};
use crate::apps::{valid_name, App, Interrupted, Release, ReleaseStatus};
use crate::config::MachineConfig;
use crate::error::{Error, Result};

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
sql_text!(MachineState, Desired, ReleaseStatus, super::Kind);

pub struct SqliteStore {
    db: Mutex<Connection>,
}

const COLUMNS: &str = "id, name, state, desired, config, slot, exit_code, oom_killed, restarts, created_at, updated_at, app, release, revision, node, region";

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
            revision: r.get(13)?,
            node: r.get(14)?,
            region: r.get(15)?,
        },
        config,
    ))
}

fn finish(rows: Vec<(Machine, String)>) -> Result<Vec<Machine>> {
    rows.into_iter()
        .map(|(mut m, config)| {
            m.config = serde_json::from_str(&config)
                .map_err(|e| Error::Internal(format!("stored config of {}: {e}", m.id)))?;
            Ok(m)
        })
        .collect()
}

fn json<T: serde::Serialize + ?Sized>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::Internal(e.to_string()))
}

/// See [`Store::net_for`].
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
    let taken: HashSet<u32> = db
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

impl SqliteStore {
    pub fn open(home: &Path) -> Result<SqliteStore> {
        std::fs::create_dir_all(home)
            .map_err(|e| Error::Internal(format!("{}: {e}", home.display())))?;
        let mut db = Connection::open(home.join("state.db"))?;
        db.execute_batch(
            "PRAGMA journal_mode=WAL;
             PRAGMA synchronous=NORMAL;
             PRAGMA busy_timeout=5000;",
        )?;
        super::migrations::migrate(&mut db).map_err(|e| {
            Error::Internal(format!(
                "{}: cannot bring the state store up to date: {e}",
                home.join("state.db").display()
            ))
        })?;
        Ok(SqliteStore { db: Mutex::new(db) })
    }

    pub(crate) fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Store for SqliteStore {
    fn insert_machine(
        &self,
        id: &str,
        name: &str,
        site: &Site,
        place: &Placement,
        config: &MachineConfig,
    ) -> Result<Machine> {
        let db = self.db();
        let net = net_for(&db, place.app.as_deref())?;
        let base = hangar_machine::network::net_base(net);
        let taken: HashSet<u32> = db
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
        match db.execute(
            "INSERT INTO machines (id, name, state, desired, config, slot, exit_code, oom_killed, restarts, created_at, updated_at, app, release, node, region)
             VALUES (?1, ?2, 'created', 'started', ?3, ?4, NULL, 0, 0, ?5, ?5, ?6, ?7, ?8, ?9)",
            params![id, name, json(config)?, slot, t, place.app, place.release, site.node, site.region],
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

    fn get(&self, id_or_name: &str) -> Result<Machine> {
        let rows = {
            let db = self.db();
            let mut stmt = db.prepare(&format!(
                "SELECT {COLUMNS} FROM machines WHERE (id = ?1 OR name = ?1)"
            ))?;
            let r = stmt.query_row(params![id_or_name], row).optional()?;
            r.into_iter().collect::<Vec<_>>()
        };
        finish(rows)?.pop().ok_or_else(|| no_machine(id_or_name))
    }

    fn machines(&self, app: Option<&str>) -> Result<Vec<Machine>> {
        let rows = {
            let db = self.db();
            let mut stmt = db.prepare(&format!(
                "SELECT {COLUMNS} FROM machines WHERE state != 'destroyed' AND (?1 IS NULL OR app = ?1)
                 ORDER BY created_at, id"
            ))?;
            let r = stmt
                .query_map([app], row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            r
        };
        finish(rows)
    }

    fn update_machine(&self, id: &str, expect: Expect, change: MachineChange) -> Result<u64> {
        use rusqlite::ToSql;
        let t = now();
        // ?1 is the id, ?2 the expected revision; the change's from ?3.
        let (set, values): (&str, Vec<Box<dyn ToSql>>) = match change {
            MachineChange::State(s) => (
                "state = ?3, updated_at = ?4",
                vec![Box::new(s), Box::new(t)],
            ),
            MachineChange::Desired(d) => (
                "desired = ?3, updated_at = ?4",
                vec![Box::new(d), Box::new(t)],
            ),
            MachineChange::Config(place, config) => (
                "config = ?3, app = ?4, release = ?5, updated_at = ?6",
                vec![
                    Box::new(json(config)?),
                    Box::new(place.app.clone()),
                    Box::new(place.release),
                    Box::new(t),
                ],
            ),
            MachineChange::Exit { code, oom } => (
                "exit_code = ?3, oom_killed = ?4, updated_at = ?5",
                vec![Box::new(code), Box::new(oom as i64), Box::new(t)],
            ),
            MachineChange::Restarts(n) => ("restarts = ?3", vec![Box::new(n)]),
            MachineChange::Destroyed => (
                "state = 'destroyed', desired = 'destroyed', name = id || '.destroyed',
                 slot = (SELECT MIN(COALESCE(MIN(slot), 0), 0) - 1 FROM machines), updated_at = ?3",
                vec![Box::new(t)],
            ),
        };
        let expected = match expect {
            Expect::Any => None,
            Expect::Revision(r) => Some(r),
        };
        let mut args: Vec<&dyn ToSql> = vec![&id, &expected];
        args.extend(values.iter().map(|v| v.as_ref()));
        let mut db = self.db();
        let tx = db.transaction()?;
        let changed = tx.execute(
            &format!("UPDATE machines SET {set} WHERE id = ?1 AND (?2 IS NULL OR revision = ?2)"),
            args.as_slice(),
        )?;
        let revision: Option<u64> = tx
            .query_row("SELECT revision FROM machines WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?;
        let Some(revision) = revision else {
            return Err(no_machine(id));
        };
        if changed == 0 {
            return Err(Error::Conflict(format!(
                "machine {id} changed meanwhile (now at revision {revision}); read it again and retry"
            )));
        }
        tx.commit()?;
        Ok(revision)
    }

    fn net_for(&self, app: Option<&str>) -> Result<u32> {
        net_for(&self.db(), app)
    }

    fn event(&self, id: &str, kind: &str, detail: serde_json::Value) -> Result<()> {
        self.db().execute(
            "INSERT INTO events (machine_id, type, detail, at) VALUES (?1, ?2, ?3, ?4)",
            params![id, kind, detail.to_string(), now()],
        )?;
        Ok(())
    }

    fn events(&self, id: &str) -> Result<Vec<Event>> {
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

    fn create_app(&self, name: &str, org: &str) -> Result<App> {
        valid_name(name)?;
        let done = self.db().execute(
            "INSERT OR IGNORE INTO apps (name, org, created_at) VALUES (?1, ?2, ?3)",
            params![name, org, now()],
        )?;
        if done == 0 {
            return Err(Error::Conflict(format!(
                "app {name} exists already; deploy to it, or pick another name"
            )));
        }
        self.app(name)
    }

    fn app(&self, name: &str) -> Result<App> {
        self.db()
            .query_row(
                "SELECT name, org, created_at FROM apps WHERE name = ?1",
                params![name],
                |r| {
                    Ok(App {
                        name: r.get(0)?,
                        org: r.get(1)?,
                        created_at: r.get(2)?,
                    })
                },
            )
            .optional()?
            .ok_or_else(|| no_app(name))
    }

    fn apps(&self) -> Result<Vec<App>> {
        let db = self.db();
        let mut stmt = db.prepare("SELECT name, org, created_at FROM apps ORDER BY name")?;
        let rows = stmt
            .query_map([], |r| {
                Ok(App {
                    name: r.get(0)?,
                    org: r.get(1)?,
                    created_at: r.get(2)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    fn delete_app(&self, name: &str) -> Result<()> {
        let mut db = self.db();
        let tx = db.transaction()?;
        for table in ["secrets", "releases", "apps"] {
            let key = if table == "apps" { "name" } else { "app" };
            tx.execute(
                &format!("DELETE FROM {table} WHERE {key} = ?1"),
                params![name],
            )?;
        }
        tx.commit()?;
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
        let version: u32 = {
            let db = self.db();
            let version = db.query_row(
                "SELECT COALESCE(MAX(version), 0) + 1 FROM releases WHERE app = ?1",
                params![app],
                |r| r.get(0),
            )?;
            db.execute(
                "INSERT INTO releases (app, version, image, status, description, config, created_at, replaces, observe) VALUES (?1, ?2, ?3, 'running', ?4, ?5, ?6, ?7, ?8)",
                params![app, version, image, description, json(config)?, now(), json(replaces)?, json(observe)?],
            )?;
            version
        };
        self.release(app, version)
    }

    fn set_release_status(
        &self,
        app: &str,
        version: u32,
        status: ReleaseStatus,
        description: &str,
    ) -> Result<()> {
        self.db().execute(
            "UPDATE releases SET status = ?3, description = ?4 WHERE app = ?1 AND version = ?2",
            params![app, version, status, description],
        )?;
        Ok(())
    }

    fn interrupt_releases(&self) -> Result<Vec<Interrupted>> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let cut = tx
            .prepare("SELECT app, version, replaces FROM releases WHERE status = 'running'")?
            .query_map([], |r| {
                let replaces: String = r.get(2)?;
                Ok(Interrupted {
                    app: r.get(0)?,
                    version: r.get(1)?,
                    replaces: serde_json::from_str(&replaces).unwrap_or_default(),
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        tx.execute(
            "UPDATE releases SET status = 'interrupted', description = description || ' (the node stopped during the deploy)' WHERE status = 'running'",
            [],
        )?;
        tx.commit()?;
        Ok(cut)
    }

    fn releases(&self, app: &str) -> Result<Vec<Release>> {
        let db = self.db();
        let mut stmt = db.prepare(
            "SELECT app, version, image, status, description, config, created_at, observe FROM releases WHERE app = ?1 ORDER BY version DESC",
        )?;
        let rows = stmt
            .query_map([app], |r| {
                let config: String = r.get(5)?;
                let observe: String = r.get(7)?;
                Ok((
                    Release {
                        app: r.get(0)?,
                        version: r.get(1)?,
                        image: r.get(2)?,
                        status: r.get(3)?,
                        description: r.get(4)?,
                        config: MachineConfig::default(),
                        created_at: r.get(6)?,
                        observe: Default::default(),
                    },
                    config,
                    observe,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter()
            .map(|(mut rel, config, observe)| {
                rel.config = serde_json::from_str(&config)
                    .map_err(|e| Error::Internal(format!("stored release config: {e}")))?;
                rel.observe = serde_json::from_str(&observe).map_err(|e| {
                    Error::Internal(format!("stored release alerts and dashboards: {e}"))
                })?;
                Ok(rel)
            })
            .collect()
    }

    fn put_secrets(&self, app: &str, secrets: &[SealedSecret]) -> Result<()> {
        let mut db = self.db();
        let tx = db.transaction()?;
        for s in secrets {
            tx.execute(
                "INSERT OR REPLACE INTO secrets (app, name, sealed, digest, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![app, s.name, s.sealed, s.digest, s.created_at],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn unset_secrets(&self, app: &str, names: &[String]) -> Result<Vec<String>> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let mut gone = Vec::new();
        for name in names {
            if tx.execute(
                "DELETE FROM secrets WHERE app = ?1 AND name = ?2",
                params![app, name],
            )? > 0
            {
                gone.push(name.clone());
            }
        }
        tx.commit()?;
        Ok(gone)
    }

    fn sealed_secrets(&self, app: &str) -> Result<Vec<SealedSecret>> {
        let db = self.db();
        let mut stmt = db.prepare(
            "SELECT name, sealed, digest, created_at FROM secrets WHERE app = ?1 ORDER BY name",
        )?;
        let rows = stmt
            .query_map(params![app], |r| {
                Ok(SealedSecret {
                    name: r.get(0)?,
                    sealed: r.get(1)?,
                    digest: r.get(2)?,
                    created_at: r.get(3)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    fn put_registry_login(&self, org: &str, login: &SealedLogin) -> Result<()> {
        self.db().execute(
            "INSERT OR REPLACE INTO registry_logins (org, registry, username, sealed, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![org, login.registry, login.username, login.sealed, now()],
        )?;
        Ok(())
    }

    fn remove_registry_login(&self, org: &str, registry: &str) -> Result<bool> {
        Ok(self.db().execute(
            "DELETE FROM registry_logins WHERE org = ?1 AND registry = ?2",
            params![org, registry],
        )? > 0)
    }

    fn sealed_logins(&self, org: &str) -> Result<Vec<SealedLogin>> {
        let db = self.db();
        let mut stmt = db.prepare(
            "SELECT registry, username, sealed FROM registry_logins WHERE org = ?1 ORDER BY registry",
        )?;
        let rows = stmt
            .query_map(params![org], |r| {
                Ok(SealedLogin {
                    registry: r.get(0)?,
                    username: r.get(1)?,
                    sealed: r.get(2)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    fn revision(&self) -> Result<u64> {
        Ok(self.db().query_row(
            "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'changes'), 0)",
            [],
            |r| r.get(0),
        )?)
    }

    fn changes(&self, since: u64) -> Result<Changes> {
        let db = self.db();
        let tx = db.unchecked_transaction()?;
        let revision: u64 = tx.query_row(
            "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'changes'), 0)",
            [],
            |r| r.get(0),
        )?;
        let oldest: Option<u64> =
            tx.query_row("SELECT MIN(revision) FROM changes", [], |r| r.get(0))?;
        if since < revision && oldest.is_none_or(|o| o > since + 1) {
            return Ok(Changes::Compacted { revision });
        }
        let changes = tx
            .prepare(
                "SELECT revision, kind, key, deleted FROM changes WHERE revision > ?1 ORDER BY revision",
            )?
            .query_map([since], |r| {
                Ok(Change {
                    revision: r.get(0)?,
                    kind: r.get(1)?,
                    key: r.get(2)?,
                    deleted: r.get::<_, i64>(3)? != 0,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(Changes::Since {
            revision: changes.last().map_or(revision.max(since), |c| c.revision),
            changes,
        })
    }
}

#[cfg(test)]
mod tests;
