//! The etcd client against Debian's etcd (3.4 in bookworm), feature by
//! feature as the cluster state relies on them: compare-and-set
//! transactions, watches from a revision (replay, and the answer for a
//! compacted one), leases that take their keys with them, elections, and a
//! three-member cluster that loses a member, then its quorum, and gets it
//! back. Everything runs on 127.0.0.1.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use hangar_cluster::etcd_client::{
    Compare, CompareOp, EventType, GetOptions, PutOptions, ResignOptions, Txn, TxnOp, WatchOptions,
};
use hangar_cluster::members::Members;

const TIMEOUT: Duration = Duration::from_secs(2);

fn one_member() -> (tempfile::TempDir, Members) {
    let dir = tempfile::tempdir().unwrap();
    let members = Members::start(dir.path(), 1).unwrap();
    (dir, members)
}

#[tokio::test]
async fn the_server_is_the_3_4_the_tests_are_written_for() {
    let (_dir, members) = one_member();
    let mut c = hangar_cluster::connect(&members.endpoints(), TIMEOUT)
        .await
        .unwrap();
    let status = c.status().await.unwrap();
    assert!(status.version().starts_with("3.4."), "{}", status.version());
}

#[tokio::test]
async fn a_transaction_on_a_stale_revision_writes_nothing() {
    let (_dir, members) = one_member();
    let mut c = hangar_cluster::connect(&members.endpoints(), TIMEOUT)
        .await
        .unwrap();
    c.put("/m/a", "v1", None).await.unwrap();
    let read = c.get("/m/a", None).await.unwrap();
    let seen = read.kvs()[0].mod_revision();
    // Someone else writes after the read...
    c.put("/m/a", "theirs", None).await.unwrap();
    // ...so a write that expects the revision it read fails, and writes nothing.
    let cas = |rev: i64, value: &'static str| {
        Txn::new()
            .when([Compare::mod_revision("/m/a", CompareOp::Equal, rev)])
            .and_then([TxnOp::put("/m/a", value, None)])
    };
    let stale = c.txn(cas(seen, "mine")).await.unwrap();
    assert!(!stale.succeeded());
    let now = c.get("/m/a", None).await.unwrap();
    assert_eq!(now.kvs()[0].value(), b"theirs");
    let fresh = c
        .txn(cas(now.kvs()[0].mod_revision(), "mine"))
        .await
        .unwrap();
    assert!(fresh.succeeded());
    // A unique name taken by create-if-absent: the second taker loses.
    let take = |owner: &'static str| {
        Txn::new()
            .when([Compare::create_revision(
                "/names/web-1",
                CompareOp::Equal,
                0,
            )])
            .and_then([TxnOp::put("/names/web-1", owner, None)])
    };
    assert!(c.txn(take("first")).await.unwrap().succeeded());
    assert!(!c.txn(take("second")).await.unwrap().succeeded());
    let owner = c.get("/names/web-1", None).await.unwrap();
    assert_eq!(owner.kvs()[0].value(), b"first");
}

#[tokio::test]
async fn a_watch_from_a_revision_replays_then_follows_and_a_compacted_one_says_so() {
    let (_dir, members) = one_member();
    let mut c = hangar_cluster::connect(&members.endpoints(), TIMEOUT)
        .await
        .unwrap();
    let first = c.put("/w/1", "a", None).await.unwrap();
    let from = first.header().unwrap().revision();
    c.put("/w/2", "b", None).await.unwrap();
    c.delete("/w/1", None).await.unwrap();
    let mut stream = c
        .watch(
            "/w/",
            Some(WatchOptions::new().with_prefix().with_start_revision(from)),
        )
        .await
        .unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while seen.len() < 4 && Instant::now() < deadline {
        let Ok(Ok(Some(resp))) = tokio::time::timeout(TIMEOUT, stream.message()).await else {
            continue;
        };
        for e in resp.events() {
            let kv = e.kv().unwrap();
            seen.push((e.event_type(), kv.key_str().unwrap().to_string()));
        }
        if seen.len() == 3 {
            // Replayed what happened before the watch; now a new write.
            c.put("/w/3", "c", None).await.unwrap();
        }
    }
    assert_eq!(
        seen,
        [
            (EventType::Put, "/w/1".to_string()),
            (EventType::Put, "/w/2".to_string()),
            (EventType::Delete, "/w/1".to_string()),
            (EventType::Put, "/w/3".to_string()),
        ]
    );
    // After a compaction, a watch from before it is cancelled with the
    // revision the reader must reload from.
    let now = c
        .get("/w/3", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    c.compact(now, None).await.unwrap();
    let mut old = c
        .watch(
            "/w/",
            Some(WatchOptions::new().with_prefix().with_start_revision(from)),
        )
        .await
        .unwrap();
    let mut compacted = 0;
    while let Ok(Ok(Some(resp))) = tokio::time::timeout(TIMEOUT, old.message()).await {
        if resp.compact_revision() > 0 || resp.canceled() {
            compacted = resp.compact_revision();
            break;
        }
    }
    assert_eq!(compacted, now);
}

#[tokio::test]
async fn a_lease_left_to_expire_takes_its_keys_and_one_kept_alive_keeps_them() {
    let (_dir, members) = one_member();
    let mut c = hangar_cluster::connect(&members.endpoints(), TIMEOUT)
        .await
        .unwrap();
    let dying = c.lease_grant(2, None).await.unwrap().id();
    let living = c.lease_grant(2, None).await.unwrap().id();
    c.put(
        "/nodes/dead",
        "x",
        Some(PutOptions::new().with_lease(dying)),
    )
    .await
    .unwrap();
    c.put(
        "/nodes/alive",
        "x",
        Some(PutOptions::new().with_lease(living)),
    )
    .await
    .unwrap();
    let (mut keeper, mut answers) = c.lease_keep_alive(living).await.unwrap();
    let start = Instant::now();
    let gone = loop {
        keeper.keep_alive().await.unwrap();
        let _ = tokio::time::timeout(TIMEOUT, answers.message()).await;
        let dead = c.get("/nodes/dead", None).await.unwrap().count();
        if dead == 0 || start.elapsed() > Duration::from_secs(10) {
            break start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(gone < Duration::from_secs(10), "the expired key stayed");
    // etcd expires a 2 s lease no sooner than 2 s.
    assert!(gone >= Duration::from_millis(1500), "{gone:?}");
    let alive = c
        .get("/nodes/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(alive.kvs().len(), 1);
    assert_eq!(alive.kvs()[0].key(), b"/nodes/alive");
}

#[tokio::test]
async fn one_campaigner_leads_until_it_resigns() {
    let (_dir, members) = one_member();
    let mut a = hangar_cluster::connect(&members.endpoints(), TIMEOUT)
        .await
        .unwrap();
    let mut b = hangar_cluster::connect(&members.endpoints(), TIMEOUT)
        .await
        .unwrap();
    let lease_a = a.lease_grant(10, None).await.unwrap().id();
    let lease_b = b.lease_grant(10, None).await.unwrap().id();
    let won = a.campaign("/leader", "node-a", lease_a).await.unwrap();
    let leader = won.leader().unwrap().clone();
    // b campaigns too, and waits while a leads.
    let b_campaign =
        tokio::spawn(async move { b.campaign("/leader", "node-b", lease_b).await.map(drop) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!b_campaign.is_finished());
    let now = a.leader("/leader").await.unwrap();
    assert_eq!(now.kv().unwrap().value(), b"node-a");
    a.resign(Some(ResignOptions::new().with_leader(leader)))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), b_campaign)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let now = a.leader("/leader").await.unwrap();
    assert_eq!(now.kv().unwrap().value(), b"node-b");
}

#[tokio::test]
async fn three_members_lose_one_then_quorum_and_catch_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut members = Members::start(dir.path(), 3).unwrap();
    let mut c = hangar_cluster::connect(&members.endpoints(), TIMEOUT)
        .await
        .unwrap();
    c.put("/q/before", "1", None).await.unwrap();
    // One member of three gone: writes go on.
    members.kill(2);
    let mut ok = false;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok && Instant::now() < deadline {
        ok = c.put("/q/one-down", "1", None).await.is_ok();
    }
    assert!(ok, "no write with two of three members");
    // Two gone: a write fails, within the timeout, with an error.
    members.kill(1);
    let t = Instant::now();
    let lost = c.put("/q/no-quorum", "1", None).await;
    assert!(lost.is_err(), "a write without quorum succeeded");
    assert!(t.elapsed() < TIMEOUT * 3, "{:?}", t.elapsed());
    // Back: everything written before is there, and writes work again.
    members.restart(1).unwrap();
    members.restart(2).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut back = false;
    while !back && Instant::now() < deadline {
        back = c.put("/q/after", "1", None).await.is_ok();
        if !back {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert!(back, "writes did not come back with the quorum");
    // A member that came back may still be starting: the client tries the
    // next one.
    let mut all = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while all.is_none() && Instant::now() < deadline {
        all = c
            .get("/q/", Some(GetOptions::new().with_prefix()))
            .await
            .ok();
    }
    let all = all.unwrap();
    let keys: Vec<&str> = all.kvs().iter().map(|kv| kv.key_str().unwrap()).collect();
    // The write that timed out without quorum had an unknown outcome: etcd
    // may have taken the proposal and committed it once the quorum was
    // back. So a store must read again before it retries (a
    // compare-and-set makes the retry safe), never assume "not written".
    let known: Vec<&str> = keys
        .iter()
        .copied()
        .filter(|k| *k != "/q/no-quorum")
        .collect();
    assert_eq!(known, ["/q/after", "/q/before", "/q/one-down"]);
}
