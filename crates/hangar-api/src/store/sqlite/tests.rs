//! The SQLite store against the [`Store`] contract: stores from before open
//! and migrate, apps, releases and secrets, compare-and-set, the change feed.

use super::SqliteStore;
use crate::store::contract::{self, machine};
use crate::store::{Change, Changes, Desired, Expect, MachineChange, MachineState, Store};

#[test]
fn a_store_from_before_replaces_opens_and_keeps_its_releases() {
    let dir = tempfile::tempdir().unwrap();
    let db = rusqlite::Connection::open(dir.path().join("state.db")).unwrap();
    db.execute_batch(
        "CREATE TABLE releases (
            app TEXT NOT NULL, version INTEGER NOT NULL, image TEXT NOT NULL, status TEXT NOT NULL,
            description TEXT NOT NULL, config TEXT NOT NULL, created_at INTEGER NOT NULL,
            PRIMARY KEY (app, version));
         INSERT INTO releases VALUES ('hello', 1, 'img:1', 'running', 'old', '{}', 0);",
    )
    .unwrap();
    drop(db);
    let state = SqliteStore::open(dir.path()).unwrap();
    let cut = state.interrupt_releases().unwrap();
    assert_eq!((cut[0].app.as_str(), cut[0].version), ("hello", 1));
    assert!(cut[0].replaces.is_empty());
    drop(state);
    // Opening again finds the column there.
    assert!(SqliteStore::open(dir.path()).is_ok());
}

#[test]
fn a_reader_behind_the_compacted_feed_is_told_to_reload() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    let m = machine(&store, "m1");
    let first = m.revision;
    for i in 0..super::super::migrations::KEEP_CHANGES + 1000 {
        store
            .update_machine(&m.id, Expect::Any, MachineChange::Restarts(i as u32))
            .unwrap();
    }
    let now = store.revision().unwrap();
    assert_eq!(
        store.changes(first - 1).unwrap(),
        Changes::Compacted { revision: now }
    );
    // A recent reader still follows.
    let Changes::Since { changes, .. } = store.changes(now - 3).unwrap() else {
        panic!("compacted");
    };
    assert_eq!(changes.len(), 3);
    assert!(changes.iter().all(|c: &Change| c.key == "m1"));
}

#[test]
fn a_store_of_version_2_opens_with_revisions_and_keeps_its_machines() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut db = rusqlite::Connection::open(dir.path().join("state.db")).unwrap();
        super::super::migrations::migrate_to(&mut db, 2).unwrap();
        db.execute(
            "INSERT INTO machines (id, name, state, desired, config, slot, created_at, updated_at)
             VALUES ('old', 'old', 'stopped', 'stopped', '{}', 2, 0, 0)",
            [],
        )
        .unwrap();
    }
    let store = SqliteStore::open(dir.path()).unwrap();
    let old = store.get("old").unwrap();
    assert_eq!((old.state, old.revision), (MachineState::Stopped, 0));
    let r = store
        .update_machine(
            "old",
            Expect::Revision(0),
            MachineChange::Desired(Desired::Started),
        )
        .unwrap();
    assert_eq!(store.get("old").unwrap().revision, r);
    assert!(r > 0);
}

#[test]
fn apps_releases_and_secrets_in_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    contract::apps_releases_and_secrets(&store, dir.path());
    // Sealed at rest: the value is in none of the store's files.
    for file in ["state.db", "state.db-wal"] {
        let raw = std::fs::read(dir.path().join(file)).unwrap_or_default();
        assert!(
            !raw.windows(12).any(|w| w == b"secret-value"),
            "not in {file}"
        );
    }
}

#[test]
fn a_write_that_expects_an_old_revision_is_refused_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    contract::a_stale_write_is_refused_and_writes_nothing(&store);
}

#[test]
fn the_change_feed_names_every_write_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    contract::the_feed_names_every_write_in_order(&store, dir.path());
}
