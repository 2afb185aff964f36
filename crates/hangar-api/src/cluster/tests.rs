//! Three nodes of one cluster in this process, each with its own fake
//! driver and API on loopback, sharing a real etcd (Debian's): machines are
//! placed by region and spread, calls about a machine are carried to its
//! node, a hostile org reaches nothing through another node, and when a
//! node dies its apps' machines are replaced on a live node of its region.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hangar_machine::driver::fake::{Call, FakeDriver};
use hangar_machine::Driver as _;

use super::*;
use crate::client::Client;
use crate::server::{Api, OrgTokens, Puller};
use crate::store::Desired;
use crate::wire::CreateMachine;

const ACME: &str = "acme-token";
/// The round trip injected between the two regions.
const AMS_FRA: Duration = Duration::from_millis(100);
const EVIL: &str = "evil-token";
/// The members' lease here: a dead node is noticed this long after.
const TTL: Duration = Duration::from_secs(2);

struct TestMember {
    node: Arc<Node>,
    fake: Arc<FakeDriver>,
    base: String,
    admin: String,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl TestMember {
    fn client(&self, token: &str) -> Client {
        Client::new(&self.base, token)
    }

    /// As a `kill -9`: its loops and API stop, its store and lease go.
    fn kill(self) {
        drop(self)
    }
}

impl Drop for TestMember {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn member(endpoints: &str, name: &str, region: &str) -> TestMember {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeDriver::new(dir.path()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (endpoints, home) = (endpoints.to_string(), dir.path().to_path_buf());
    let me = Member {
        name: name.into(),
        region: region.into(),
        api: base.clone(),
        registry: None,
        memory_mb: 4096,
        cpus: 2,
        ..Default::default()
    };
    let (store, token, sealer, me) = tokio::task::spawn_blocking({
        let mut me = me;
        move || {
            let store = Arc::new(EtcdStore::open(&endpoints).unwrap());
            me.index = store.node_index(&me.name).unwrap();
            let key = crate::apps::Sealer::key_of(&home).unwrap();
            let key = store.cluster_value("secrets-key", &key).unwrap();
            let token = store
                .cluster_value("admin-token", format!("admin-of-{}", me.name).as_bytes())
                .unwrap();
            store.join(&me, TTL, None).unwrap();
            (
                store,
                String::from_utf8(token).unwrap(),
                crate::apps::Sealer::from_key(&key).unwrap(),
                me,
            )
        }
    })
    .await
    .unwrap();
    let cluster = Arc::new(Cluster {
        me,
        store: store.clone(),
        token: token.clone(),
        http: reqwest::Client::new(),
        latency: Latency::parse(&[format!("ams:fra={}ms", AMS_FRA.as_millis())]).unwrap(),
    });
    let node = Arc::new(
        Node::new(
            store,
            fake.clone(),
            hangar_oci::Store::open(dir.path()).unwrap(),
            sealer,
        )
        .with_cluster(cluster),
    );
    let pull: Puller = Arc::new(|_, _, _| Box::pin(async { Ok(()) }));
    let orgs: OrgTokens = Arc::new(|token| match token {
        ACME => Some("acme".into()),
        EVIL => Some("evil".into()),
        _ => None,
    });
    let api = Arc::new(Api {
        node: node.clone(),
        token: token.clone(),
        pull,
        orgs: Some(orgs),
        in_flight: Default::default(),
        dashboards: Default::default(),
        streams: Default::default(),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let ticks = {
        let (node, stop) = (node.clone(), stop.clone());
        tokio::task::spawn_blocking(move || {
            while !stop.load(Ordering::SeqCst) {
                node.tick();
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let tasks = vec![
        tokio::spawn(crate::server::serve(api, listener, std::future::pending())),
        tokio::spawn(lead(node.clone())),
        tokio::spawn(async move {
            let _ = ticks.await;
        }),
    ];
    TestMember {
        node,
        fake,
        base,
        admin: token,
        stop,
        tasks,
        _dir: dir,
    }
}

/// One etcd, and nodes a (ams, started first: the leader), b and c (fra),
/// with apps `web` of acme and `loot` of evil.
async fn cluster() -> (
    tempfile::TempDir,
    hangar_cluster::members::Members,
    Vec<TestMember>,
) {
    let dir = tempfile::tempdir().unwrap();
    let etcd = {
        let path = dir.path().join("etcd");
        tokio::task::spawn_blocking(move || hangar_cluster::members::Members::start(&path, 1))
            .await
            .unwrap()
            .unwrap()
    };
    let a = member(&etcd.endpoints(), "a", "ams").await;
    wait_for("a leads", || {
        a.node.cluster.as_ref().unwrap().store.as_leader().is_some()
    })
    .await;
    let b = member(&etcd.endpoints(), "b", "fra").await;
    let c = member(&etcd.endpoints(), "c", "fra").await;
    let admin = a.client(&a.admin);
    admin.create_app("web", "acme").await.unwrap();
    admin.create_app("loot", "evil").await.unwrap();
    (dir, etcd, vec![a, b, c])
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn create(app: &str, region: &str) -> CreateMachine {
    CreateMachine {
        app: Some(app.into()),
        config: crate::node::tests::config(),
        region: Some(region.into()),
        ..Default::default()
    }
}

#[test]
fn placement_takes_the_region_then_spreads_the_app_then_the_memory_free() {
    let member = |name: &str, region: &str, memory_mb| Member {
        name: name.into(),
        region: region.into(),
        api: String::new(),
        registry: None,
        memory_mb,
        cpus: 1,
        ..Default::default()
    };
    let members = [
        member("a", "ams", 4096),
        member("b", "fra", 1024),
        member("c", "fra", 2048),
    ];
    let on = |node: &str, app: &str, memory_mb| {
        let mut m = crate::node::tests::machine_of(app);
        m.node = node.into();
        m.config.guest.memory_mb = memory_mb;
        m
    };
    let want = |app, region, memory_mb| Want {
        app: Some(app),
        region: Some(region),
        memory_mb,
    };
    // The most memory free in the region, when no node has the app.
    let chosen = place(&members, &[], want("web", "fra", 256)).unwrap();
    assert_eq!(chosen.name, "c");
    // Spread first: c has a machine of web, b none.
    let machines = [on("c", "web", 256)];
    assert_eq!(
        place(&members, &machines, want("web", "fra", 256))
            .unwrap()
            .name,
        "b"
    );
    // Another app does not count against c's spread, only its memory.
    let machines = [on("c", "other", 1536)];
    assert_eq!(
        place(&members, &machines, want("web", "fra", 256))
            .unwrap()
            .name,
        "b"
    );
    // Too big for every node of the region: refused, saying the most free.
    let e = place(&members, &[], want("web", "fra", 3000)).unwrap_err();
    assert!(
        matches!(e, Error::Conflict(_)) && e.to_string().contains("2048 MB on node c"),
        "{e}"
    );
    // A region with no node names the regions there are.
    let e = place(&members, &[], want("web", "syd", 256)).unwrap_err();
    assert!(e.to_string().contains("ams, fra"), "{e}");
    // Memory alike: the node with fewer CPUs asked of each it has.
    let mut twins = [member("x", "syd", 2048), member("y", "syd", 2048)];
    twins[1].cpus = 4;
    let mut busy = on("x", "other", 512);
    busy.config.guest.cpus = 2;
    let mut light = on("y", "other", 512);
    light.config.guest.cpus = 2;
    // x: 2 CPUs asked of 1; y: 2 of 4 (y wins though x comes first by name).
    assert_eq!(
        place(&twins, &[busy, light], want("web", "syd", 256))
            .unwrap()
            .name,
        "y"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_refuses_a_machine_it_has_not_the_memory_for() {
    let (_dir, _etcd, nodes) = cluster().await;
    let b = nodes[1].node.clone();
    tokio::task::spawn_blocking(move || {
        let mut config = crate::node::tests::config();
        config.guest.memory_mb = 3072;
        b.create(None, Placement::default(), config.clone())
            .unwrap();
        // 1024 MB of b's 4096 are left.
        let e = b.create(None, Placement::default(), config).unwrap_err();
        assert!(
            matches!(e, Error::Busy(_)) && e.to_string().contains("1024 MB free of the 4096 MB"),
            "{e}"
        );
        let mut small = crate::node::tests::config();
        small.guest.memory_mb = 1024;
        b.create(None, Placement::default(), small).unwrap();
    })
    .await
    .unwrap();
}

#[test]
fn the_mesh_knows_the_other_nodes_machines_of_an_org() {
    let member = |name: &str, underlay: Option<&str>| Member {
        name: name.into(),
        underlay: underlay.map(|u| u.parse().unwrap()),
        ..Default::default()
    };
    let members = [
        member("a", Some("10.9.0.1")),
        member("b", Some("10.9.0.2")),
        member("c", None),
    ];
    let at = |node: &str, slot: u32| {
        let mut m = crate::node::tests::machine_of("web");
        (m.node, m.slot) = (node.into(), slot);
        m
    };
    let machines = [
        at("a", 0x1_0102),
        at("b", 0x2_0103),
        at("b", 0x2_0004),
        at("c", 0x3_0105),
    ];
    let (peers, others) = mesh_of("a", &members, &machines);
    // Not a's own, not one of net 0 (the admin's), not one of a node with
    // no underlay.
    assert_eq!(
        peers,
        [hangar_machine::overlay::Peer {
            slot: 0x2_0103,
            underlay: "10.9.0.2".parse().unwrap()
        }]
    );
    assert_eq!(others, ["10.9.0.2".parse::<std::net::IpAddr>().unwrap()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_machine_is_made_and_run_by_a_node_of_its_region_and_calls_go_there() {
    let (_dir, _etcd, nodes) = cluster().await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let acme = a.client(ACME);
    // Made through a, in fra: on b or c, and the two spread.
    let first = acme.create_machine(&create("web", "fra")).await.unwrap();
    let second = acme.create_machine(&create("web", "fra")).await.unwrap();
    let on = |id: &str| {
        [a, b, c]
            .iter()
            .filter(|n| n.fake.machines().contains(&id.to_string()))
            .map(|n| n.node.site.node.clone())
            .collect::<Vec<_>>()
    };
    let (n1, n2) = (on(&first.id), on(&second.id));
    assert!(n1 == ["b"] || n1 == ["c"], "{n1:?}");
    assert!(n2 == ["b"] || n2 == ["c"], "{n2:?}");
    assert_ne!(n1, n2, "the app's machines spread over fra's nodes");
    let owner = if n1 == ["b"] { b } else { c };
    // Its IPv6 address says its node (a 1, b 2, c 3); its IPv4 address is
    // its org's net's.
    let node_part = if n1 == ["b"] { 2 } else { 3 };
    let v6: std::net::Ipv6Addr = first.private_ip.as_deref().unwrap().parse().unwrap();
    assert_eq!(v6.segments()[4], node_part, "{v6}");
    let v4s: Vec<String> = [&first, &second]
        .iter()
        .map(|m| m.ipv4.clone().unwrap())
        .collect();
    assert_ne!(
        v4s[0], v4s[1],
        "one IPv4 address per machine of the org, across nodes"
    );
    // Seen alike through every node.
    for n in [a, b, c] {
        let seen = n.client(ACME).machine(&first.id).await.unwrap();
        assert_eq!(seen.state, MachineState::Started);
    }
    // A call carried from ams to fra waits out the injected round trip.
    let began = Instant::now();
    a.client(ACME).machine(&first.id).await.unwrap();
    assert!(began.elapsed() >= AMS_FRA, "{:?}", began.elapsed());
    // A stop through a is carried out by its node.
    owner.fake.clear_calls();
    let stopped = acme
        .stop_machine(
            &first.id,
            &crate::wire::StopMachine {
                signal: "SIGTERM".into(),
                timeout: 1,
            },
        )
        .await
        .unwrap();
    assert_eq!(stopped.state, MachineState::Stopped);
    assert!(
        owner
            .fake
            .calls()
            .iter()
            .any(|c| matches!(c, Call::Signal(id, s) if id == &first.id && s == "SIGTERM")),
        "{:?}",
        owner.fake.calls()
    );
    // Without a region, a machine goes to the node's own.
    let here = acme
        .create_machine(&CreateMachine {
            region: None,
            ..create("web", "fra")
        })
        .await
        .unwrap();
    assert_eq!(on(&here.id), ["a"]);
    // Destroyed through a: gone from its node's host.
    acme.destroy_machine(&first.id, true).await.unwrap();
    assert!(!owner.fake.machines().contains(&first.id));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hostile_org_reaches_nothing_of_another_through_any_node() {
    let (_dir, _etcd, nodes) = cluster().await;
    let m = nodes[0]
        .client(ACME)
        .create_machine(&create("web", "fra"))
        .await
        .unwrap();
    let missing = nodes[0]
        .client(EVIL)
        .machine("no-such-machine")
        .await
        .unwrap_err();
    for n in &nodes {
        // Its own token, and the headers a node sends another, change nothing.
        let evil = n
            .client(EVIL)
            .with_header(VIA, "b")
            .with_header(FOR_ORG, "acme");
        let e = evil.machine(&m.id).await.unwrap_err();
        assert_eq!(e.status(), Some(404));
        assert_eq!(
            e.to_string().replace(&m.id, "X"),
            missing.to_string().replace("no-such-machine", "X"),
            "another org's machine reads as a missing one"
        );
        let stop = crate::wire::StopMachine {
            signal: "SIGKILL".into(),
            timeout: 0,
        };
        assert_eq!(
            evil.stop_machine(&m.id, &stop).await.unwrap_err().status(),
            Some(404)
        );
        assert_eq!(
            evil.destroy_machine(&m.id, true)
                .await
                .unwrap_err()
                .status(),
            Some(404)
        );
        assert!(evil.machines().await.unwrap().is_empty());
        // It cannot place a machine in acme's app from any node either.
        let e = evil
            .create_machine(&create("web", "fra"))
            .await
            .unwrap_err();
        assert_eq!(e.status(), Some(400), "{e}");
    }
    let seen = nodes[2].client(ACME).machine(&m.id).await.unwrap();
    assert_eq!(seen.state, MachineState::Started, "untouched");
}

#[tokio::test(flavor = "multi_thread")]
async fn when_a_node_dies_its_apps_machines_are_replaced_in_its_region() {
    let (_dir, _etcd, mut nodes) = cluster().await;
    let c = nodes.pop().unwrap();
    let b = nodes.pop().unwrap();
    let a = nodes.pop().unwrap();
    let admin = a.client(&a.admin);
    let web = b
        .node
        .create(
            None,
            Placement {
                app: Some("web".into()),
                release: Some(3),
            },
            crate::node::tests::config(),
        )
        .unwrap();
    let alone = b
        .node
        .create(None, Placement::default(), crate::node::tests::config())
        .unwrap();
    let scaled_to_zero = b
        .node
        .create(
            None,
            Placement {
                app: Some("web".into()),
                release: Some(3),
            },
            crate::node::tests::config(),
        )
        .unwrap();
    b.node
        .state
        .set_desired(&scaled_to_zero.id, Desired::Stopped)
        .unwrap();
    let died = Instant::now();
    b.kill();
    let store = a.node.state.clone();
    let replaced = |id: &str| {
        let store = store.clone();
        let id = id.to_string();
        move || {
            store
                .get(&id)
                .is_ok_and(|m| m.state == MachineState::Destroyed)
        }
    };
    wait_for("web's machine replaced", replaced(&web.id)).await;
    wait_for("the stopped one replaced", replaced(&scaled_to_zero.id)).await;
    // The leader goes through the machines in the store's order (by
    // creation second, then id): the one of no app may come last.
    let marked = {
        let (store, id) = (store.clone(), alone.id.clone());
        move || store.get(&id).is_ok_and(|m| m.state == MachineState::Lost)
    };
    wait_for("the machine of no app marked lost", marked).await;
    let took = died.elapsed();
    assert!(
        took < TTL * 2 + Duration::from_secs(1),
        "replaced after {took:?}"
    );
    // On c, the only live node of fra, with the same release and config.
    let mine: Vec<Machine> = c.node.own_machines().unwrap();
    let new = mine
        .iter()
        .find(|m| m.name == replacement_name(&web))
        .expect("a replacement on c");
    assert_eq!((new.release, new.region.as_str()), (Some(3), "fra"));
    assert_eq!(new.state, MachineState::Started);
    assert!(c.fake.machines().contains(&new.id));
    let idle = mine
        .iter()
        .find(|m| m.name == replacement_name(&scaled_to_zero))
        .expect("a replacement of the stopped one");
    assert_eq!(idle.desired, Desired::Stopped);
    // The machine of no app waits for its node, marked lost.
    let lost = admin.machine(&alone.id).await.unwrap();
    assert_eq!(lost.state, MachineState::Lost);
    let events = admin.events(&web.id).await.unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert!(kinds.ends_with(&["lost", "replaced"]), "{kinds:?}");
    // Calls about the lost one say where it was, and why nothing is done.
    let e = admin.start_machine(&alone.id).await.unwrap_err();
    assert_eq!(e.status(), Some(503), "{e}");
    assert!(e.to_string().contains("node \"b\""), "{e}");
    // Destroying it forgets it.
    let gone = admin.destroy_machine(&alone.id, true).await.unwrap();
    assert_eq!(gone.state, MachineState::Destroyed);
}

#[test]
fn latency_between_regions_is_parsed_either_way_round_and_named_when_bad() {
    let l = Latency::parse(&["ams:fra=30ms".into(), " syd : ams = 1.5s".into()]).unwrap();
    assert_eq!(l.between("fra", "ams"), Duration::from_millis(30));
    assert_eq!(l.between("ams", "syd"), Duration::from_millis(1500));
    assert_eq!(l.between("fra", "syd"), Duration::ZERO);
    assert_eq!(l.pairs().count(), 2);
    for bad in ["ams-fra=30ms", "ams:fra", "ams:=3ms", "ams:fra=soon"] {
        let e = Latency::parse(&[bad.into()]).unwrap_err().to_string();
        assert!(
            e.contains(bad) && e.contains("REGION:REGION=DURATION"),
            "{e}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_deploy_at_a_time_per_app_across_the_nodes() {
    let (_dir, _etcd, nodes) = cluster().await;
    let (a, b) = (nodes[0].node.state.clone(), nodes[1].node.state.clone());
    tokio::task::spawn_blocking(move || {
        assert!(a.hold_app("web").unwrap());
        assert!(!b.hold_app("web").unwrap(), "b deploys web while a does");
        assert!(!a.hold_app("web").unwrap(), "held once, not twice");
        assert!(b.hold_app("loot").unwrap(), "another app is free");
        // Only its holder lets go of it.
        b.let_go_app("web").unwrap();
        assert!(!b.hold_app("web").unwrap());
        a.let_go_app("web").unwrap();
        assert!(b.hold_app("web").unwrap());
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_list_at_any_node_shows_what_each_machines_node_knows_of_its_checks() {
    let (_dir, _etcd, nodes) = cluster().await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let mut req = create("web", "fra");
    req.config.checks.insert(
        "alive".into(),
        crate::config::Check {
            port: 8080,
            path: "/".into(),
            interval: 10.0,
            timeout: 1.0,
            grace_period: 1.0,
        },
    );
    let m = a.client(ACME).create_machine(&req).await.unwrap();
    let owner = [b, c]
        .into_iter()
        .find(|n| n.fake.machines().contains(&m.id))
        .unwrap();
    // Only its node probes it: a has the check pending, its node passing.
    owner
        .node
        .checks
        .mark_passing(&m.id, ["alive".to_string()].iter());
    for n in [a, b, c] {
        let listed = n.client(ACME).machines().await.unwrap();
        let seen = listed.iter().find(|v| v.id == m.id).unwrap();
        let checks = seen.checks.as_ref().unwrap();
        assert_eq!(
            checks[0].status,
            crate::checks::CheckState::Passing,
            "listed at {}",
            n.node.site.node
        );
    }
    // What the org may not see stays out of every list.
    let evil = a.client(EVIL).machines().await.unwrap();
    assert!(
        evil.iter().all(|v| v.app.as_deref() != Some("web")),
        "{evil:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn when_every_chosen_node_turns_out_full_the_caller_hears_why_and_nothing_is_made() {
    let (_dir, _etcd, nodes) = cluster().await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    // A machine of no node's (a row from before nodes had names) counts
    // against every node's own room, and against no node in placement:
    // each fra node placement picks turns out full.
    let state = a.node.state.clone();
    tokio::task::spawn_blocking(move || {
        let mut big = crate::node::tests::config();
        big.guest.memory_mb = 3900;
        state
            .insert_machine(
                "nodeless0000001",
                "nodeless",
                &Site::default(),
                &Placement::default(),
                &big,
            )
            .unwrap();
    })
    .await
    .unwrap();
    let e = a
        .client(ACME)
        .create_machine(&create("web", "fra"))
        .await
        .unwrap_err();
    let e = Error::from(e);
    assert!(matches!(e, Error::Busy(_)), "{e}");
    // The nodes' own refusal (after both fra nodes were tried in turn),
    // not that the region has no node left; and neither made anything.
    assert!(e.to_string().contains("free of the 4096 MB"), "{e}");
    for n in [b, c] {
        assert!(
            n.fake.machines().iter().all(|id| id == "nodeless0000001"),
            "{:?}",
            n.fake.machines()
        );
    }
}
