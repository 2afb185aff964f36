//! The SQLite store against the [`Store`] contract: stores from before open
//! and migrate, apps, releases and secrets, compare-and-set, the change feed.

use std::collections::BTreeMap;

use super::SqliteStore;
use crate::apps::{ReleaseStatus, Sealer};
use crate::error::Error;
use crate::store::{
    Change, Changes, Desired, Expect, Kind, MachineChange, MachineState, Placement, Store,
};
use crate::MachineConfig;

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
fn apps_releases_and_secrets_in_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let state = SqliteStore::open(dir.path()).unwrap();
    let sealer = Sealer::open_or_create(dir.path()).unwrap();
    assert!(state.create_app("Bad_Name", "o").is_err());
    state.create_app("hello", "personal").unwrap();
    assert!(matches!(
        state.create_app("hello", "personal"),
        Err(Error::Conflict(_))
    ));
    let r1 = state
        .add_release("hello", "img:1", "first", &MachineConfig::default(), &[])
        .unwrap();
    let r2 = state
        .add_release(
            "hello",
            "img:2",
            "second",
            &MachineConfig::default(),
            &["m1".to_string(), "m2".to_string()],
        )
        .unwrap();
    assert_eq!((r1.version, r2.version), (1, 2));
    state
        .set_release_status("hello", 1, ReleaseStatus::Complete, "ok")
        .unwrap();
    assert_eq!(state.current_release("hello").unwrap().unwrap().version, 1);
    let cut = state.interrupt_releases().unwrap();
    assert_eq!(
        state.release("hello", 2).unwrap().status,
        ReleaseStatus::Interrupted
    );
    assert_eq!(cut.len(), 1);
    assert_eq!((cut[0].version, cut[0].replaces.len()), (2, 2));
    assert!(state.interrupt_releases().unwrap().is_empty());
    let mut v = BTreeMap::new();
    v.insert("DB".to_string(), "secret-value".to_string());
    state.set_secrets(&sealer, "hello", &v).unwrap();
    assert_eq!(state.open_secrets(&sealer, "hello").unwrap(), v);
    assert_eq!(state.secret_infos("hello").unwrap()[0].name, "DB");
    for file in ["state.db", "state.db-wal"] {
        let raw = std::fs::read(dir.path().join(file)).unwrap_or_default();
        assert!(
            !raw.windows(12).any(|w| w == b"secret-value"),
            "not in {file}"
        );
    }
    assert_eq!(
        state
            .unset_secrets("hello", &["DB".into(), "NOPE".into()])
            .unwrap(),
        vec!["DB"]
    );
    state.delete_app("hello").unwrap();
    assert!(state.app("hello").is_err());
}
fn machine(store: &SqliteStore, name: &str) -> crate::Machine {
    store
        .insert_machine(name, name, &Placement::default(), &MachineConfig::default())
        .unwrap()
}

#[test]
fn a_write_that_expects_an_old_revision_is_refused_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    let m = machine(&store, "m1");
    assert!(m.revision > 0);
    // Someone else changes it after it was read...
    let theirs = store
        .update_machine(
            &m.id,
            Expect::Any,
            MachineChange::State(MachineState::Started),
        )
        .unwrap();
    assert!(theirs > m.revision);
    // ...so a decision taken on the old row does not land.
    let stale = store.update_machine(
        &m.id,
        Expect::Revision(m.revision),
        MachineChange::Desired(Desired::Stopped),
    );
    assert!(matches!(stale, Err(Error::Conflict(_))), "{stale:?}");
    let now = store.get(&m.id).unwrap();
    assert_eq!((now.desired, now.revision), (Desired::Started, theirs));
    // Read again, it does.
    let mine = store
        .update_machine(
            &m.id,
            Expect::Revision(now.revision),
            MachineChange::Desired(Desired::Stopped),
        )
        .unwrap();
    assert_eq!(store.get(&m.id).unwrap().revision, mine);
    assert_eq!(store.get(&m.id).unwrap().desired, Desired::Stopped);
    assert!(matches!(
        store.set_state("nope", MachineState::Started),
        Err(Error::NotFound(_))
    ));
}

#[test]
fn the_change_feed_names_every_write_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    let start = store.revision().unwrap();
    store.create_app("web", "acme").unwrap();
    let m = store
        .insert_machine(
            "m1",
            "m1",
            &Placement {
                app: Some("web".into()),
                release: None,
            },
            &MachineConfig::default(),
        )
        .unwrap();
    store.set_desired(&m.id, Desired::Stopped).unwrap();
    store
        .add_release("web", "img:1", "first", &MachineConfig::default(), &[])
        .unwrap();
    let sealer = Sealer::open_or_create(dir.path()).unwrap();
    let v: BTreeMap<_, _> = [("K".to_string(), "v".to_string())].into();
    store.set_secrets(&sealer, "web", &v).unwrap();
    store.unset_secrets("web", &["K".into()]).unwrap();
    let Changes::Since { revision, changes } = store.changes(start).unwrap() else {
        panic!("compacted");
    };
    let seen: Vec<(Kind, &str, bool)> = changes
        .iter()
        .map(|c| (c.kind, c.key.as_str(), c.deleted))
        .collect();
    assert_eq!(
        seen,
        [
            (Kind::App, "web", false),
            (Kind::OrgNet, "acme", false),
            (Kind::Machine, "m1", false),
            (Kind::Machine, "m1", false),
            (Kind::Release, "web/1", false),
            (Kind::Secret, "web/K", false),
            (Kind::Secret, "web/K", true),
        ]
    );
    assert!(changes.windows(2).all(|w| w[0].revision < w[1].revision));
    assert_eq!(revision, store.revision().unwrap());
    // The machine's revision is that of its last change.
    assert_eq!(store.get("m1").unwrap().revision, changes[3].revision);
    // Nothing new: nothing, at the same revision.
    assert_eq!(
        store.changes(revision).unwrap(),
        Changes::Since {
            revision,
            changes: vec![]
        }
    );
    // From the middle: the rest.
    let Changes::Since { changes: rest, .. } = store.changes(changes[4].revision).unwrap() else {
        panic!("compacted");
    };
    assert_eq!(rest, changes[5..].to_vec());
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
