//! The etcd store against the [`Store`] contract, on a real etcd (Debian's,
//! on 127.0.0.1), and what only a shared store shows: two nodes on one
//! cluster see each other's writes through their read models, a
//! compare-and-set decides between them, and a read model whose revision
//! was compacted reloads.

use hangar_cluster::members::Members;

use super::EtcdStore;
use crate::error::Error;
use crate::store::contract::{self, machine, site};
use crate::store::{Changes, Desired, Expect, MachineChange, MachineState, Store};

fn cluster() -> (tempfile::TempDir, Members) {
    let dir = tempfile::tempdir().unwrap();
    let members = Members::start(&dir.path().join("etcd"), 1).unwrap();
    (dir, members)
}

#[test]
fn apps_releases_and_secrets_in_etcd() {
    let (dir, members) = cluster();
    let store = EtcdStore::open(&members.endpoints()).unwrap();
    contract::apps_releases_and_secrets(&store, dir.path());
}

#[test]
fn a_write_that_expects_an_old_revision_is_refused_in_etcd() {
    let (_dir, members) = cluster();
    let store = EtcdStore::open(&members.endpoints()).unwrap();
    contract::a_stale_write_is_refused_and_writes_nothing(&store);
}

#[test]
fn the_change_feed_of_etcd_names_every_write_in_order() {
    let (dir, members) = cluster();
    let store = EtcdStore::open(&members.endpoints()).unwrap();
    contract::the_feed_names_every_write_in_order(&store, dir.path());
}

#[test]
fn two_nodes_see_each_others_writes_and_one_compare_and_set_wins() {
    let (_dir, members) = cluster();
    let a = EtcdStore::open(&members.endpoints()).unwrap();
    let b = EtcdStore::open(&members.endpoints()).unwrap();
    let m = machine(&a, "web-1");
    // b's read model has it within a watch event.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let seen = loop {
        match b.get("web-1") {
            Ok(seen) => break seen,
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(5))
            }
            Err(e) => panic!("b never saw the machine: {e}"),
        }
    };
    assert_eq!(
        (seen.id.as_str(), seen.revision),
        (m.id.as_str(), m.revision)
    );
    // A name and an address are the cluster's: b cannot take either.
    assert!(matches!(
        b.insert_machine(
            "other",
            "web-1",
            &site(),
            &Default::default(),
            &Default::default()
        ),
        Err(Error::Conflict(_))
    ));
    let other = machine(&b, "web-2");
    assert_ne!(other.slot, m.slot);
    // Both decide on the same row; one write lands, the other is refused.
    let stop = MachineChange::Desired(Desired::Stopped);
    let start = MachineChange::State(MachineState::Started);
    let first = a.update_machine(&m.id, Expect::Revision(m.revision), stop);
    let second = b.update_machine(&m.id, Expect::Revision(m.revision), start);
    assert!(first.is_ok(), "{first:?}");
    assert!(matches!(second, Err(Error::Conflict(_))), "{second:?}");
    // A destroyed machine gives its name and address back.
    a.mark_destroyed(&m.id).unwrap();
    let again = a
        .insert_machine(
            "id-2",
            "web-1",
            &site(),
            &Default::default(),
            &Default::default(),
        )
        .unwrap();
    assert_eq!(again.slot, m.slot);
    assert_eq!(a.get(&m.id).unwrap().state, MachineState::Destroyed);
    let events = {
        a.event(&again.id, "created", serde_json::json!({}))
            .unwrap();
        a.event(&again.id, "started", serde_json::json!({}))
            .unwrap();
        a.events(&again.id).unwrap()
    };
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["created", "started"]);
}

#[test]
fn a_read_model_behind_a_compaction_reloads_and_tells_the_feed_readers() {
    let dir = tempfile::tempdir().unwrap();
    let mut members = Members::start(&dir.path().join("etcd"), 3).unwrap();
    // This node talks to the first member only; the others keep quorum
    // while it is gone.
    let mine = format!("http://127.0.0.1:{}", members.members()[0].client_port);
    let store = EtcdStore::open(&mine).unwrap();
    let m = machine(&store, "web-1");
    let before = store.revision().unwrap();
    members.kill(0);
    // Meanwhile another node changes the machine, and etcd is compacted
    // past the change: this node's watch cannot resume from where it was.
    let others = format!(
        "http://127.0.0.1:{},http://127.0.0.1:{}",
        members.members()[1].client_port,
        members.members()[2].client_port
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = hangar_cluster::connect(&others, std::time::Duration::from_secs(2))
            .await
            .unwrap();
        // The killed member may have led: the first tries meet an election.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let key = format!("/hangar/machines/{}", m.id);
        let row = loop {
            match c.get(key.clone(), None).await {
                Ok(row) => break row,
                Err(e) => assert!(std::time::Instant::now() < deadline, "{e}"),
            }
        };
        let mut v: serde_json::Value = serde_json::from_slice(row.kvs()[0].value()).unwrap();
        v["desired"] = "stopped".into();
        c.put(key.clone(), v.to_string(), None).await.unwrap();
        let app = r#"{"name":"x","org":"o","created_at":0}"#;
        let done = c.put("/hangar/apps/x", app, None).await.unwrap();
        c.compact(done.header().unwrap().revision(), None)
            .await
            .unwrap();
    });
    members.restart(0).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while store.get(&m.id).unwrap().desired != Desired::Stopped {
        assert!(std::time::Instant::now() < deadline, "never caught up");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(store.app("x").unwrap().org, "o");
    // The feed cannot say what happened in between: a reader from before
    // is told to reload.
    assert!(
        matches!(store.changes(before).unwrap(), Changes::Compacted { .. }),
        "{:?}",
        store.changes(before)
    );
}

#[test]
fn writes_of_others_outside_hangars_keys_do_not_hold_up_a_refused_write() {
    let (_dir, members) = cluster();
    let store = EtcdStore::open(&members.endpoints()).unwrap();
    store.create_app("web", "acme").unwrap();
    // Someone else's key in the same etcd: its revision is one the watch of
    // Hangar's keys never brings.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c =
            hangar_cluster::connect(&members.endpoints(), std::time::Duration::from_secs(2))
                .await
                .unwrap();
        c.put("/elsewhere/x", "1", None).await.unwrap();
    });
    let t = std::time::Instant::now();
    assert!(matches!(
        store.create_app("web", "acme"),
        Err(Error::Conflict(_))
    ));
    assert!(
        t.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        t.elapsed()
    );
}

fn member(name: &str) -> crate::store::Member {
    crate::store::Member {
        name: name.into(),
        region: "ams".into(),
        api: "http://127.0.0.1:1".into(),
        registry: None,
        memory_mb: 1024,
        cpus: 1,
        ..Default::default()
    }
}

fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "never: {what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn a_member_name_is_one_live_nodes_and_a_restart_takes_its_own_back() {
    let (_dir, members) = cluster();
    let ttl = std::time::Duration::from_secs(2);
    let a = EtcdStore::open(&members.endpoints()).unwrap();
    let lease = a.join(&member("n1"), ttl, None).unwrap();
    let b = EtcdStore::open(&members.endpoints()).unwrap();
    eventually("b sees n1", || b.members().unwrap().len() == 1);
    let e = b.join(&member("n1"), ttl, None).unwrap_err();
    assert!(
        matches!(e, Error::Conflict(_)) && e.to_string().contains("another --node"),
        "{e}"
    );
    // The same node after a kill, knowing its lease: it takes it over at
    // once, and the old lease goes.
    drop(a);
    let again = b.join(&member("n1"), ttl, Some(lease)).unwrap();
    assert_ne!(again, lease);
    assert_eq!(b.members().unwrap(), vec![member("n1")]);
    std::thread::sleep(ttl * 2);
    assert_eq!(b.members().unwrap(), vec![member("n1")], "kept alive");
}

#[test]
fn a_leader_that_lost_the_lead_writes_nothing() {
    let (_dir, members) = cluster();
    let ttl = std::time::Duration::from_secs(2);
    let a = EtcdStore::open(&members.endpoints()).unwrap();
    a.join(&member("a"), ttl, None).unwrap();
    eventually("a leads", || a.as_leader().is_some());
    let fenced = a.as_leader().unwrap();
    fenced.create_app("first", "o").unwrap();
    let b = EtcdStore::open(&members.endpoints()).unwrap();
    b.join(&member("b"), ttl, None).unwrap();
    assert_eq!(b.leader().as_deref(), Some("a"));
    // a's lease ends (as when it was paused past its TTL): b leads, and
    // what a writes as the leader is refused.
    let lease = a.lease().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = hangar_cluster::connect(&members.endpoints(), ttl)
            .await
            .unwrap();
        c.lease_revoke(lease).await.unwrap();
    });
    eventually("b leads", || b.as_leader().is_some());
    let e = fenced.create_app("second", "o").unwrap_err();
    assert!(e.to_string().contains("no longer leads"), "{e}");
    assert!(b.app("second").is_err(), "nothing written");
    assert_eq!(b.leader().as_deref(), Some("b"));
    // a is a member again (its keep-alive took a new lease), behind b.
    eventually("a is back", || b.members().unwrap().len() == 2);
    assert!(a.as_leader().is_none());
}

#[test]
fn the_purge_log_is_one_order_acked_per_node_and_trimmed_with_a_floor() {
    let (_dir, members) = cluster();
    let ttl = std::time::Duration::from_secs(2);
    let a = EtcdStore::open(&members.endpoints()).unwrap();
    a.join(&member("n1"), ttl, None).unwrap();
    let b = EtcdStore::open(&members.endpoints()).unwrap();
    let revs: Vec<i64> = (0..5)
        .map(|i| a.add_purge(format!("p{i}").into_bytes()).unwrap())
        .collect();
    assert!(revs.windows(2).all(|w| w[0] < w[1]), "{revs:?}");
    // Another node's model has them, in that order, and knows when it was
    // last current.
    eventually("b has the purges", || b.purges_after(0).1.len() == 5);
    eventually("b is current", || b.purges_after(0).0.is_some());
    let (_, after) = b.purges_after(revs[1]);
    let bodies: Vec<&[u8]> = after.iter().map(|(_, v)| v.as_slice()).collect();
    assert_eq!(bodies, [&b"p2"[..], b"p3", b"p4"]);
    // Acks are per node, under its lease.
    a.ack_purges(revs[4]).unwrap();
    eventually("b sees the ack", || {
        b.purge_acks().get("n1") == Some(&revs[4])
    });
    // Trimmed to the last 2: the floor says up to where.
    eventually("a leads", || a.as_leader().is_some());
    assert_eq!(a.as_leader().unwrap().trim_purges(2).unwrap(), 3);
    eventually("b sees the trim", || b.purges_after(0).1.len() == 2);
    assert_eq!(b.purge_floor(), revs[2]);
}
