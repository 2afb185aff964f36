//! Deploy strategies, rollback and recovery against the recording fake
//! driver, with the checks decided by the test: no root, no runc.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use hangar_machine::driver::fake::Call;
use hangar_machine::Driver;

use super::*;
use crate::config::Check;
use crate::node::tests::{config, test_node, TestNode};

/// A config whose machines have one check.
fn checked() -> MachineConfig {
    let mut c = config();
    c.checks.insert(
        "http".into(),
        Check {
            interval: 0.01,
            ..Check::default()
        },
    );
    c
}

/// Which started machines fail their checks, given all machines now.
type Failing = Arc<dyn Fn(&Machine, &[Machine]) -> bool + Send + Sync>;

/// Stands in for the checks loop: every started machine's check passes,
/// except where `failing` says it is critical, and on machines whose app
/// does not run.
fn checker(t: &TestNode, failing: Failing) -> tokio::task::JoinHandle<()> {
    let (node, fake) = (t.node.clone(), t.fake.clone());
    tokio::spawn(async move {
        loop {
            let all = node.state.list().unwrap_or_default();
            for m in all.iter().filter(|m| m.state == MachineState::Started) {
                for name in m.config.checks.keys() {
                    node.checks.track(&m.id, name);
                    let result = if fake.state(&m.id) != hangar_machine::ProcState::Running {
                        Err("connect: connection refused".to_string())
                    } else if failing(m, &all) {
                        Err("GET / answered 503".to_string())
                    } else {
                        Ok(())
                    };
                    node.checks.record(&m.id, name, result, false);
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
}

/// Machines of these images fail their checks.
fn failing_images(images: Arc<Mutex<HashSet<String>>>) -> Failing {
    Arc::new(move |m, _| images.lock().unwrap().contains(&m.config.image))
}

fn request(image: &str, count: u32, strategy: Strategy) -> DeployRequest {
    DeployRequest {
        image: image.into(),
        config: checked(),
        count: Some(count),
        strategy,
        max_unavailable: 0,
        description: String::new(),
        primary_region: None,
        observe: Default::default(),
        guard: Default::default(),
    }
}

fn progress() -> (
    Progress,
    tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    (Progress(tx), rx)
}

async fn deploy_now(t: &TestNode, image: &str, count: u32, strategy: Strategy) -> Result<Release> {
    deploy(
        t.node.clone(),
        "web".into(),
        request(image, count, strategy),
        progress().0,
    )
    .await
}

/// The calls of the driver as (verb, release of the machine) in order:
/// `("create", 2)`, `("destroy", 1)`.
fn story(
    t: &TestNode,
    releases: &std::collections::HashMap<String, u32>,
) -> Vec<(&'static str, u32)> {
    t.fake
        .calls()
        .into_iter()
        .filter_map(|c| match c {
            Call::Create(id) => Some(("create", releases[&id])),
            Call::Destroy(id) => Some(("destroy", releases[&id])),
            _ => None,
        })
        .collect()
}

/// Every machine ever made, with its release.
fn releases_of(t: &TestNode) -> std::collections::HashMap<String, u32> {
    let db = t.store.db();
    let mut stmt = db
        .prepare("SELECT id, COALESCE(release, 0) FROM machines")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap()
}

fn live(t: &TestNode) -> Vec<(Option<u32>, MachineState)> {
    app_machines(&t.node, "web")
        .unwrap()
        .into_iter()
        .map(|m| (m.release, m.state))
        .collect()
}

async fn with_v1(strategy_of_v1: Strategy, count: u32) -> (TestNode, Arc<Mutex<HashSet<String>>>) {
    let failing: Arc<Mutex<HashSet<String>>> = Arc::default();
    let t = with_v1_checked(strategy_of_v1, count, failing_images(failing.clone())).await;
    (t, failing)
}

async fn with_v1_checked(strategy_of_v1: Strategy, count: u32, failing: Failing) -> TestNode {
    let t = test_node();
    t.node.state.create_app("web", "acme").unwrap();
    checker(&t, failing);
    let r = deploy_now(&t, "registry.test/web:1", count, strategy_of_v1)
        .await
        .unwrap();
    assert_eq!((r.version, r.status), (1, ReleaseStatus::Complete));
    t.fake.clear_calls();
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_sessions_machine_is_left_be_by_deploys_and_scaling() {
    let (t, _) = with_v1(Strategy::Rolling, 2).await;
    let mut console = config();
    console.role = crate::config::MachineRole::Console;
    let place = Placement {
        app: Some("web".into()),
        release: None,
    };
    let c = t.node.create(None, place, console).unwrap();
    deploy_now(&t, "registry.test/web:2", 2, Strategy::Rolling)
        .await
        .unwrap();
    scale_count(t.node.clone(), "web".into(), 1, Vec::new(), progress().0)
        .await
        .unwrap();
    assert_eq!(live(&t), vec![(Some(2), MachineState::Started)]);
    let still = t.node.state.get(&c.id).unwrap();
    assert_ne!(still.state, MachineState::Destroyed, "{still:?}");
    assert!(!t.fake.calls().contains(&Call::Destroy(c.id.clone())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_replaces_one_machine_at_a_time_after_its_checks_pass() {
    let (t, _) = with_v1(Strategy::Rolling, 3).await;
    let r = deploy_now(&t, "registry.test/web:2", 3, Strategy::Rolling)
        .await
        .unwrap();
    assert_eq!((r.version, r.status), (2, ReleaseStatus::Complete));
    let ids = releases_of(&t);
    assert_eq!(
        story(&t, &ids),
        [
            ("create", 2),
            ("destroy", 1),
            ("create", 2),
            ("destroy", 1),
            ("create", 2),
            ("destroy", 1)
        ]
    );
    assert_eq!(live(&t), vec![(Some(2), MachineState::Started); 3]);
    // Each old machine was stopped with its signal before it went.
    let calls = t.fake.calls();
    for (id, release) in &ids {
        if *release == 1 {
            let signal = calls
                .iter()
                .position(|c| c == &Call::Signal(id.clone(), "SIGTERM".into()));
            let destroy = calls.iter().position(|c| c == &Call::Destroy(id.clone()));
            assert!(signal < destroy && signal.is_some(), "{calls:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_in_batches_and_scaling_down_in_a_deploy() {
    let (t, _) = with_v1(Strategy::Rolling, 3).await;
    let mut req = request("registry.test/web:2", 2, Strategy::Rolling);
    req.max_unavailable = 2;
    deploy(t.node.clone(), "web".into(), req, progress().0)
        .await
        .unwrap();
    let ids = releases_of(&t);
    assert_eq!(
        story(&t, &ids),
        [
            ("create", 2),
            ("create", 2),
            ("destroy", 1),
            ("destroy", 1),
            ("destroy", 1)
        ]
    );
    assert_eq!(live(&t).len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bluegreen_starts_every_new_machine_before_any_old_one_goes() {
    let (t, _) = with_v1(Strategy::Rolling, 2).await;
    deploy_now(&t, "registry.test/web:2", 2, Strategy::Bluegreen)
        .await
        .unwrap();
    let ids = releases_of(&t);
    assert_eq!(
        story(&t, &ids),
        [("create", 2), ("create", 2), ("destroy", 1), ("destroy", 1)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immediate_does_not_wait_for_checks() {
    let (t, failing) = with_v1(Strategy::Rolling, 2).await;
    failing.lock().unwrap().insert("registry.test/web:2".into());
    let r = deploy_now(&t, "registry.test/web:2", 2, Strategy::Immediate)
        .await
        .unwrap();
    assert_eq!(r.status, ReleaseStatus::Complete);
    assert_eq!(live(&t), vec![(Some(2), MachineState::Started); 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_check_rolls_back_and_the_old_release_stays_or_comes_back() {
    for strategy in [Strategy::Rolling, Strategy::Bluegreen] {
        let (t, failing) = with_v1(Strategy::Rolling, 2).await;
        let before: Vec<String> = app_machines(&t.node, "web")
            .unwrap()
            .into_iter()
            .map(|m| m.id)
            .collect();
        failing.lock().unwrap().insert("registry.test/web:2".into());
        let e = deploy_now(&t, "registry.test/web:2", 2, strategy)
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("failed its check \"http\": GET / answered 503"),
            "{e}"
        );
        assert!(e.to_string().contains("its last log lines"), "{e}");
        let after: Vec<String> = app_machines(&t.node, "web")
            .unwrap()
            .into_iter()
            .map(|m| m.id)
            .collect();
        // The first new machine failed before any old one went: v1's
        // machines are the same ones.
        assert_eq!(before, after, "{strategy}");
        assert_eq!(live(&t), vec![(Some(1), MachineState::Started); 2]);
        let r = t.node.state.release("web", 2).unwrap();
        assert_eq!(r.status, ReleaseStatus::Failed);
        assert!(r.description.contains("503"), "{}", r.description);
        assert_eq!(
            t.node
                .state
                .current_release("web")
                .unwrap()
                .unwrap()
                .version,
            1
        );
    }
    // A rolling deploy that fails after it retired an old machine brings
    // that machine's release back: v2's second machine (made once one of
    // v1's is gone) fails.
    let t = with_v1_checked(
        Strategy::Rolling,
        2,
        Arc::new(|m, all| {
            m.release == Some(2) && all.iter().filter(|o| o.release == Some(1)).count() < 2
        }),
    )
    .await;
    let e = deploy_now(&t, "registry.test/web:2", 2, Strategy::Rolling)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("503"), "{e}");
    let ids = releases_of(&t);
    assert_eq!(
        story(&t, &ids),
        [
            ("create", 2),
            ("destroy", 1),
            ("create", 2),
            ("destroy", 2),
            ("destroy", 2),
            ("create", 1)
        ]
    );
    assert_eq!(live(&t), vec![(Some(1), MachineState::Started); 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_machine_that_exits_fails_the_deploy_even_when_restarted() {
    let (t, _) = with_v1(Strategy::Rolling, 1).await;
    // The app of v2 exits as soon as it starts; the reconcile loop
    // restarts it.
    t.fake.crash_on_start("registry.test/web:2", 2);
    let node = t.node.clone();
    let reconciler = tokio::spawn(async move {
        loop {
            let n = node.clone();
            tokio::task::spawn_blocking(move || n.reconcile())
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    let e = deploy_now(&t, "registry.test/web:2", 1, Strategy::Rolling)
        .await
        .unwrap_err();
    reconciler.abort();
    assert!(
        e.to_string()
            .contains("exited with code 2 and was restarted"),
        "{e}"
    );
    assert_eq!(live(&t), vec![(Some(1), MachineState::Started)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_deploy_at_a_time_per_app_and_bad_requests_change_nothing() {
    let (t, _) = with_v1(Strategy::Rolling, 1).await;
    let _held = AppLock::take(&t.node, "web").unwrap();
    let e = deploy_now(&t, "registry.test/web:2", 1, Strategy::Rolling)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Conflict(_)), "{e}");
    drop(_held);
    let e = deploy_now(&t, "registry.test/web:2", 10_000, Strategy::Rolling)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Invalid(_)), "{e}");
    let e = deploy(
        t.node.clone(),
        "nope".into(),
        request("x/y:1", 1, Strategy::Rolling),
        progress().0,
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e}");
    assert!(t.fake.calls().is_empty());
    assert_eq!(t.node.state.releases("web").unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_cut_short_by_the_node_is_undone_when_it_starts_again() {
    let (t, _) = with_v1(Strategy::Rolling, 2).await;
    let v1: Vec<Machine> = app_machines(&t.node, "web").unwrap();
    // The node stopped after v2 replaced one of v1's two machines.
    let v2 = t
        .node
        .state
        .add_release(
            "web",
            "registry.test/web:2",
            "",
            &checked(),
            &[v1[0].id.clone(), v1[1].id.clone()],
            &Default::default(),
        )
        .unwrap();
    let place = Placement {
        app: Some("web".into()),
        release: Some(v2.version),
    };
    t.node.create(None, place, checked()).unwrap();
    t.node.destroy(&v1[0].id, true).unwrap();
    let cut = t.node.state.interrupt_releases().unwrap();
    assert_eq!(cut.len(), 1);
    recover(t.node.clone(), cut.into_iter().next().unwrap())
        .await
        .unwrap();
    assert_eq!(live(&t), vec![(Some(1), MachineState::Started); 2]);
    assert!(live(&t).iter().all(|(r, _)| *r == Some(1)));
    assert_eq!(
        t.node.state.release("web", 2).unwrap().status,
        ReleaseStatus::Failed
    );
    // v1's survivor is the same machine; the destroyed one came back.
    assert!(app_machines(&t.node, "web")
        .unwrap()
        .iter()
        .any(|m| m.id == v1[1].id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_adds_healthy_machines_and_removes_the_newest() {
    let (t, _) = with_v1(Strategy::Rolling, 1).await;
    scale_count(t.node.clone(), "web".into(), 3, vec![], progress().0)
        .await
        .unwrap();
    let ms = app_machines(&t.node, "web").unwrap();
    assert_eq!(ms.len(), 3);
    assert!(ms.iter().all(|m| m.release == Some(1)));
    let oldest = ms[0].id.clone();
    scale_count(t.node.clone(), "web".into(), 1, vec![], progress().0)
        .await
        .unwrap();
    let ms = app_machines(&t.node, "web").unwrap();
    assert_eq!(
        ms.iter().map(|m| m.id.clone()).collect::<Vec<_>>(),
        [oldest]
    );
}
