//! The state store's schema, as numbered migrations (`PRAGMA user_version`
//! holds how many ran). A store from any earlier version opens and is
//! brought up to date in one transaction per step; a new step is appended,
//! never edited.

use rusqlite::{params, Connection, Transaction};
use rusqlite_migration::{HookResult, Migrations, M};
use serde_json::Value;

/// Version 1: the schema as it was before migrations were numbered.
/// Stores made then have every table already (`IF NOT EXISTS` keeps them)
/// and maybe not `releases.replaces`, which came later.
fn v1(tx: &Transaction) -> HookResult {
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS machines (
            id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, state TEXT NOT NULL, desired TEXT NOT NULL,
            config TEXT NOT NULL, slot INTEGER NOT NULL UNIQUE, exit_code INTEGER, oom_killed INTEGER NOT NULL DEFAULT 0,
            restarts INTEGER NOT NULL DEFAULT 0, created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, machine_id TEXT NOT NULL, type TEXT NOT NULL,
            detail TEXT NOT NULL, at INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS apps (
            name TEXT PRIMARY KEY, org TEXT NOT NULL, created_at INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS releases (
            app TEXT NOT NULL, version INTEGER NOT NULL, image TEXT NOT NULL, status TEXT NOT NULL,
            description TEXT NOT NULL, config TEXT NOT NULL, created_at INTEGER NOT NULL,
            PRIMARY KEY (app, version));
         CREATE TABLE IF NOT EXISTS org_nets (
            org TEXT PRIMARY KEY, net INTEGER NOT NULL UNIQUE);
         CREATE TABLE IF NOT EXISTS registry_logins (
            org TEXT NOT NULL, registry TEXT NOT NULL, username TEXT NOT NULL,
            sealed BLOB NOT NULL, created_at INTEGER NOT NULL, PRIMARY KEY (org, registry));
         CREATE TABLE IF NOT EXISTS secrets (
            app TEXT NOT NULL, name TEXT NOT NULL, sealed BLOB NOT NULL, digest TEXT NOT NULL,
            created_at INTEGER NOT NULL, PRIMARY KEY (app, name));",
    )?;
    let has_replaces = tx
        .prepare("SELECT 1 FROM pragma_table_info('releases') WHERE name = 'replaces'")?
        .exists([])?;
    if !has_replaces {
        tx.execute_batch("ALTER TABLE releases ADD COLUMN replaces TEXT NOT NULL DEFAULT '[]'")?;
    }
    Ok(())
}

/// What earlier versions kept in a config's `metadata` map, moved to where
/// it is typed now: returns the app and release it named.
fn lift_metadata(config: &mut Value) -> (Option<String>, Option<u32>) {
    let Some(meta) = config.get_mut("metadata").and_then(Value::as_object_mut) else {
        return (None, None);
    };
    let mut take = |k: &str| meta.remove(k).and_then(|v| v.as_str().map(String::from));
    let app = take("app");
    let release = take("release").and_then(|r| r.parse().ok());
    let cache = take("edge_cache");
    let force_https = take("force_https").is_some_and(|v| v == "true");
    let metrics = take("metrics");
    if let Some(service) = config
        .get_mut("services")
        .and_then(Value::as_array_mut)
        .and_then(|s| s.first_mut())
        .and_then(Value::as_object_mut)
    {
        if force_https {
            service.insert("force_https".into(), true.into());
        }
        match cache.as_deref() {
            Some("off") => {
                service.insert("cache".into(), serde_json::json!({"enabled": false}));
            }
            Some(ttl) => {
                if let Some(secs) = ttl.strip_prefix("ttl=").and_then(|s| s.parse::<u64>().ok()) {
                    service.insert(
                        "cache".into(),
                        serde_json::json!({"enabled": true, "default_ttl": secs}),
                    );
                }
            }
            None => {}
        }
    }
    // "9091/metrics": the port, then the path.
    if let Some((port, path)) = metrics.as_deref().and_then(|m| {
        let split = m.find('/')?;
        Some((m[..split].parse::<u16>().ok()?, m[split..].to_string()))
    }) {
        if let Some(c) = config.as_object_mut() {
            c.insert(
                "metrics".into(),
                serde_json::json!({"port": port, "path": path}),
            );
        }
    }
    (app, release)
}

/// Version 2: a machine's app and release are columns, and the edge's
/// policy and the metrics endpoint typed fields of the config, instead of
/// strings in its `metadata`.
fn v2(tx: &Transaction) -> HookResult {
    tx.execute_batch(
        "ALTER TABLE machines ADD COLUMN app TEXT;
         ALTER TABLE machines ADD COLUMN release INTEGER;",
    )?;
    let rows: Vec<(String, String)> = tx
        .prepare("SELECT id, config FROM machines")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for (id, config) in rows {
        let Ok(mut v) = serde_json::from_str::<Value>(&config) else {
            continue;
        };
        let (app, release) = lift_metadata(&mut v);
        tx.execute(
            "UPDATE machines SET config = ?2, app = ?3, release = ?4 WHERE id = ?1",
            params![id, v.to_string(), app, release],
        )?;
    }
    let rows: Vec<(String, u32, String)> = tx
        .prepare("SELECT app, version, config FROM releases")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for (app, version, config) in rows {
        let Ok(mut v) = serde_json::from_str::<Value>(&config) else {
            continue;
        };
        lift_metadata(&mut v);
        tx.execute(
            "UPDATE releases SET config = ?3 WHERE app = ?1 AND version = ?2",
            params![app, version, v.to_string()],
        )?;
    }
    tx.execute_batch("CREATE INDEX machines_by_app ON machines (app);")?;
    Ok(())
}

/// How many changes the feed keeps (older ones are compacted away, a
/// thousand at a time; a reader that far behind reloads).
pub(super) const KEEP_CHANGES: u64 = 10_000;

/// Version 3: revisions and the change feed. Every write to a table is an
/// entry of `changes` (its key, whether it was a delete), made by triggers,
/// and a machine row carries the revision of its last change (for
/// compare-and-set).
fn v3(tx: &Transaction) -> HookResult {
    let mut sql = format!(
        "CREATE TABLE changes (
            revision INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, key TEXT NOT NULL,
            deleted INTEGER NOT NULL DEFAULT 0);
         ALTER TABLE machines ADD COLUMN revision INTEGER NOT NULL DEFAULT 0;
         CREATE TRIGGER changes_compact AFTER INSERT ON changes WHEN NEW.revision % 1000 = 0 BEGIN
            DELETE FROM changes WHERE revision <= NEW.revision - {KEEP_CHANGES};
         END;
         CREATE TRIGGER machines_put AFTER INSERT ON machines BEGIN
            INSERT INTO changes (kind, key) VALUES ('machine', NEW.id);
            UPDATE machines SET revision = last_insert_rowid() WHERE id = NEW.id;
         END;
         -- The revision's own update leaves it changed, so it does not fire this again.
         CREATE TRIGGER machines_set AFTER UPDATE ON machines WHEN NEW.revision = OLD.revision BEGIN
            INSERT INTO changes (kind, key) VALUES ('machine', NEW.id);
            UPDATE machines SET revision = last_insert_rowid() WHERE id = NEW.id;
         END;
         CREATE TRIGGER machines_del AFTER DELETE ON machines BEGIN
            INSERT INTO changes (kind, key, deleted) VALUES ('machine', OLD.id, 1);
         END;"
    );
    for (table, kind, key) in [
        ("apps", "app", "name"),
        ("releases", "release", "app || '/' || {}.version"),
        ("secrets", "secret", "app || '/' || {}.name"),
        (
            "registry_logins",
            "registry-login",
            "org || '/' || {}.registry",
        ),
        ("org_nets", "org-net", "org"),
    ] {
        for (when, row, deleted) in [
            ("INSERT", "NEW", 0),
            ("UPDATE", "NEW", 0),
            ("DELETE", "OLD", 1),
        ] {
            let key = format!("{row}.{}", key.replace("{}", row));
            sql.push_str(&format!(
                "CREATE TRIGGER {table}_{when} AFTER {when} ON {table} BEGIN
                    INSERT INTO changes (kind, key, deleted) VALUES ('{kind}', {key}, {deleted});
                 END;"
            ));
        }
    }
    tx.execute_batch(&sql)?;
    Ok(())
}

/// Version 5: a release's alert rules, webhook and dashboards.
const V5: &str = "ALTER TABLE releases ADD COLUMN observe TEXT NOT NULL DEFAULT '{}';";

/// Version 4: the node a machine runs on and its region (a one-node
/// store's machines before it: empty, the node's own).
const V4: &str = "ALTER TABLE machines ADD COLUMN node TEXT NOT NULL DEFAULT '';
                  ALTER TABLE machines ADD COLUMN region TEXT NOT NULL DEFAULT '';";

fn migrations() -> Migrations<'static> {
    Migrations::new(vec![
        M::up_with_hook("", v1),
        M::up_with_hook("", v2),
        M::up_with_hook("", v3),
        M::up(V4),
        M::up(V5),
    ])
}

/// Bring a store to an earlier schema: for tests of stores made then.
#[cfg(test)]
pub(super) fn migrate_to(
    db: &mut Connection,
    version: usize,
) -> Result<(), rusqlite_migration::Error> {
    migrations().to_version(db, version)
}

/// Bring the store up to the schema this build uses.
pub fn migrate(db: &mut Connection) -> Result<(), rusqlite_migration::Error> {
    migrations().to_latest(db)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_migrations_are_valid() {
        assert!(migrations().validate().is_ok());
    }

    #[test]
    fn metadata_of_earlier_versions_moves_to_typed_fields() {
        let mut v = serde_json::json!({
            "image": "x",
            "services": [{"internal_port": 8080}],
            "metadata": {"app": "web", "release": "3", "edge_cache": "ttl=30",
                "force_https": "true", "metrics": "9091/metrics", "region": "ams"}
        });
        assert_eq!(lift_metadata(&mut v), (Some("web".into()), Some(3)));
        assert_eq!(v["metadata"], serde_json::json!({"region": "ams"}));
        assert_eq!(
            v["services"][0]["cache"],
            serde_json::json!({"enabled": true, "default_ttl": 30})
        );
        assert_eq!(v["services"][0]["force_https"], true);
        assert_eq!(
            v["metrics"],
            serde_json::json!({"port": 9091, "path": "/metrics"})
        );
        let c: crate::MachineConfig = serde_json::from_value(v).unwrap();
        assert!(c.services[0].force_https);
        let mut off = serde_json::json!({"services": [{}], "metadata": {"edge_cache": "off"}});
        lift_metadata(&mut off);
        assert_eq!(off["services"][0]["cache"]["enabled"], false);
    }
}
