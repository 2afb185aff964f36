//! The [`Store`] contract, run against every store: the SQLite one
//! (`sqlite/tests.rs`) and the etcd one (`etcd/tests.rs`).

use std::collections::BTreeMap;
use std::path::Path;

use crate::apps::{ReleaseStatus, Sealer};
use crate::error::Error;
use crate::store::{
    Changes, Desired, Expect, Kind, MachineChange, MachineState, Placement, Site, Store,
};
use crate::MachineConfig;

/// Where the contract's machines run.
pub(crate) fn site() -> Site {
    Site {
        node: "n1".into(),
        region: "ams".into(),
        index: 0,
    }
}

/// A new machine of no app, on [`site`]: it keeps its site.
pub(crate) fn machine(store: &dyn Store, name: &str) -> crate::Machine {
    let m = store
        .insert_machine(
            name,
            name,
            &site(),
            &Placement::default(),
            &MachineConfig::default(),
        )
        .unwrap();
    assert_eq!((m.node.as_str(), m.region.as_str()), ("n1", "ams"));
    m
}

pub(crate) fn apps_releases_and_secrets(state: &dyn Store, dir: &Path) {
    let sealer = Sealer::open_or_create(dir).unwrap();
    assert!(state.create_app("Bad_Name", "o").is_err());
    state.create_app("hello", "personal").unwrap();
    assert!(matches!(
        state.create_app("hello", "personal"),
        Err(Error::Conflict(_))
    ));
    let r1 = state
        .add_release(
            "hello",
            "img:1",
            "first",
            &MachineConfig::default(),
            &[],
            &Default::default(),
        )
        .unwrap();
    let r2 = state
        .add_release(
            "hello",
            "img:2",
            "second",
            &MachineConfig::default(),
            &["m1".to_string(), "m2".to_string()],
            &Default::default(),
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
    assert_eq!(
        state
            .unset_secrets("hello", &["DB".into(), "NOPE".into()])
            .unwrap(),
        vec!["DB"]
    );
    state.delete_app("hello").unwrap();
    assert!(state.app("hello").is_err());
}

pub(crate) fn a_stale_write_is_refused_and_writes_nothing(store: &dyn Store) {
    let m = machine(store, "m1");
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

pub(crate) fn the_feed_names_every_write_in_order(store: &dyn Store, dir: &Path) {
    let start = store.revision().unwrap();
    store.create_app("web", "acme").unwrap();
    let m = store
        .insert_machine(
            "m1",
            "m1",
            &site(),
            &Placement {
                app: Some("web".into()),
                release: None,
            },
            &MachineConfig::default(),
        )
        .unwrap();
    store.set_desired(&m.id, Desired::Stopped).unwrap();
    store
        .add_release(
            "web",
            "img:1",
            "first",
            &MachineConfig::default(),
            &[],
            &Default::default(),
        )
        .unwrap();
    let sealer = Sealer::open_or_create(dir).unwrap();
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
