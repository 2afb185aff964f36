//! The lifecycle and the reconcile loop against the recording fake driver:
//! no root, no runc.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hangar_machine::driver::fake::{Call, FakeDriver};
use hangar_machine::{Exit, ProcState};

use super::*;
use crate::config::Restart;
use crate::store::SqliteStore;

pub(crate) struct TestNode {
    pub node: Arc<Node>,
    pub fake: Arc<FakeDriver>,
    /// The node's store, as itself: for reading rows the trait does not show.
    pub store: Arc<SqliteStore>,
    _dir: tempfile::TempDir,
}

pub(crate) fn test_node() -> TestNode {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeDriver::new(dir.path()));
    let store = Arc::new(SqliteStore::open(dir.path()).unwrap());
    let node = Node::new(
        store.clone(),
        fake.clone(),
        hangar_oci::Store::open(dir.path()).unwrap(),
        crate::apps::Sealer::open_or_create(dir.path()).unwrap(),
    );
    TestNode {
        node: Arc::new(node),
        fake,
        store,
        _dir: dir,
    }
}

pub(crate) fn config() -> MachineConfig {
    MachineConfig {
        image: "registry.test/app:1".into(),
        kill_timeout: Some(0),
        ..Default::default()
    }
}

fn machine(state: MachineState, desired: Desired, policy: RestartPolicy, restarts: u32) -> Machine {
    let mut config = config();
    config.restart = Restart {
        policy,
        max_retries: 2,
    };
    Machine {
        id: "m".into(),
        name: "m".into(),
        state,
        desired,
        app: None,
        release: None,
        config,
        slot: 2,
        node: String::new(),
        region: String::new(),
        exit_code: None,
        oom_killed: false,
        restarts,
        created_at: 0,
        updated_at: 0,
        revision: 0,
    }
}

/// A started machine of `app`, as a row.
pub(crate) fn machine_of(app: &str) -> Machine {
    Machine {
        app: Some(app.into()),
        ..machine(
            MachineState::Started,
            Desired::Started,
            RestartPolicy::No,
            0,
        )
    }
}

fn exited(code: i32) -> ProcState {
    ProcState::Exited(Exit {
        code,
        oom: false,
        at: 0,
    })
}

#[test]
fn restart_policies_decide_by_exit_code_and_count() {
    use RestartPolicy::*;
    // (policy, exit code, restarts so far, max 2) -> started again
    let table = [
        (No, 0, 0, false),
        (No, 1, 0, false),
        (OnFailure, 0, 0, false),
        (OnFailure, 1, 0, true),
        (OnFailure, 137, 1, true),
        (OnFailure, 1, 2, false),
        (Always, 0, 0, true),
        (Always, 1, 99, true),
    ];
    for (policy, code, restarts, again) in table {
        let r = Restart {
            policy,
            max_retries: 2,
        };
        assert_eq!(
            restarts_after(&r, code, restarts),
            again,
            "{policy} exit {code} after {restarts} restarts"
        );
    }
}

#[test]
fn reconcile_steps_follow_the_row_and_the_host() {
    use Desired as D;
    use MachineState as S;
    use RestartPolicy::*;
    let table = [
        // A stop the node did not finish.
        (
            S::Started,
            D::Stopped,
            OnFailure,
            ProcState::Running,
            Step::FinishStop,
        ),
        (
            S::Stopping,
            D::Stopped,
            OnFailure,
            ProcState::Running,
            Step::FinishStop,
        ),
        (
            S::Stopping,
            D::Stopped,
            OnFailure,
            exited(0),
            Step::RecordStopped,
        ),
        (
            S::Started,
            D::Stopped,
            OnFailure,
            ProcState::NotRunning,
            Step::RecordStopped,
        ),
        // Stopped as wanted, destroyed, failed: nothing.
        (S::Stopped, D::Stopped, Always, exited(1), Step::Nothing),
        (
            S::Destroying,
            D::Destroyed,
            Always,
            ProcState::Running,
            Step::Nothing,
        ),
        (
            S::Failed,
            D::Started,
            Always,
            ProcState::NotRunning,
            Step::Nothing,
        ),
        // Runs as wanted; adopted after a restart of the node.
        (
            S::Started,
            D::Started,
            No,
            ProcState::Running,
            Step::Nothing,
        ),
        (
            S::Starting,
            D::Started,
            No,
            ProcState::Running,
            Step::MarkStarted,
        ),
        // Should run, and nothing does: started again.
        (
            S::Started,
            D::Started,
            No,
            ProcState::NotRunning,
            Step::Adopt,
        ),
        (
            S::Stopped,
            D::Started,
            No,
            ProcState::NotRunning,
            Step::Adopt,
        ),
        // An exit of the run before this one is not this run's.
        (S::Starting, D::Started, Always, exited(1), Step::Nothing),
        // Exits, by policy.
        (
            S::Started,
            D::Started,
            OnFailure,
            exited(3),
            Step::Exited {
                exit: Exit {
                    code: 3,
                    oom: false,
                    at: 0,
                },
                restart: true,
                destroy: false,
            },
        ),
        (
            S::Started,
            D::Started,
            No,
            exited(3),
            Step::Exited {
                exit: Exit {
                    code: 3,
                    oom: false,
                    at: 0,
                },
                restart: false,
                destroy: false,
            },
        ),
    ];
    for (state, desired, policy, host, step) in table {
        let m = machine(state, desired, policy, 0);
        assert_eq!(
            reconcile_step(&m, host.clone()),
            step,
            "{state} wanted {desired}, {policy}, host {host:?}"
        );
    }
    let mut m = machine(
        MachineState::Started,
        Desired::Started,
        RestartPolicy::No,
        0,
    );
    m.config.auto_destroy = true;
    assert!(matches!(
        reconcile_step(&m, exited(0)),
        Step::Exited {
            restart: false,
            destroy: true,
            ..
        }
    ));
}

#[test]
fn create_starts_and_a_failed_create_leaves_a_failed_row_and_nothing_on_the_host() {
    let t = test_node();
    let m = t
        .node
        .create(Some("web".into()), Placement::default(), config())
        .unwrap();
    assert_eq!(
        (m.state, m.desired),
        (MachineState::Started, Desired::Started)
    );
    assert_eq!(
        t.fake.calls(),
        [Call::Create(m.id.clone()), Call::Start(m.id.clone())]
    );
    let e = t
        .node
        .create(Some("web".into()), Placement::default(), config())
        .unwrap_err();
    assert!(e.to_string().contains("exists already"), "{e}");
    t.fake.clear_calls();
    t.fake.fail_next_create("the disk is full");
    let e = t
        .node
        .create(Some("other".into()), Placement::default(), config())
        .unwrap_err();
    assert!(e.to_string().contains("the disk is full"), "{e}");
    let failed = t.node.state.get("other").unwrap();
    assert_eq!(failed.state, MachineState::Failed);
    assert_eq!(
        t.fake.calls(),
        [
            Call::Create(failed.id.clone()),
            Call::Destroy(failed.id.clone())
        ]
    );
    // A failed machine is left alone by the reconcile loop.
    t.fake.clear_calls();
    t.node.reconcile();
    assert!(t.fake.calls().is_empty(), "{:?}", t.fake.calls());
}

#[test]
fn a_restart_decided_on_a_row_that_changed_meanwhile_does_not_happen() {
    let t = test_node();
    let m = t.node.create(None, Placement::default(), config()).unwrap();
    t.fake.exit(&m.id, 1, false);
    // The loop read the row and decided on a restart; before it acted, the
    // machine was asked to stop.
    let read = t.node.state.get(&m.id).unwrap();
    let step = reconcile_step(&read, t.fake.state(&m.id));
    assert!(
        matches!(step, Step::Exited { restart: true, .. }),
        "{step:?}"
    );
    t.node.state.set_desired(&m.id, Desired::Stopped).unwrap();
    t.fake.clear_calls();
    let lock = t.node.lock(&m.id);
    let e = t.node.apply(&read, step, lock.lock().unwrap()).unwrap_err();
    assert!(matches!(e, Error::Conflict(_)), "{e}");
    assert!(t.fake.calls().is_empty(), "{:?}", t.fake.calls());
    assert_eq!(t.node.state.get(&m.id).unwrap().restarts, 0);
    // The next pass decides on the row as it is: wanted stopped, so it is
    // recorded stopped, not started again.
    t.node.reconcile();
    let now = t.node.state.get(&m.id).unwrap();
    assert_eq!(
        (now.state, now.desired, now.restarts),
        (MachineState::Stopped, Desired::Stopped, 0)
    );
    assert!(!t.fake.calls().contains(&Call::Start(m.id.clone())));
}

#[test]
fn an_app_that_exits_is_restarted_by_policy_until_its_retries_run_out() {
    let t = test_node();
    let mut c = config();
    c.restart.max_retries = 2;
    let m = t.node.create(None, Placement::default(), c).unwrap();
    for n in 1..=2 {
        t.fake.exit(&m.id, 1, false);
        t.node.reconcile();
        let now = t.node.state.get(&m.id).unwrap();
        assert_eq!((now.state, now.restarts), (MachineState::Started, n));
        assert_eq!(t.fake.state(&m.id), ProcState::Running);
    }
    t.fake.exit(&m.id, 1, true);
    t.node.reconcile();
    let now = t.node.state.get(&m.id).unwrap();
    assert_eq!(
        (now.state, now.desired),
        (MachineState::Stopped, Desired::Stopped)
    );
    assert_eq!(
        (now.exit_code, now.oom_killed, now.restarts),
        (Some(1), true, 2)
    );
    let kinds: Vec<String> = t
        .node
        .state
        .events(&m.id)
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        [
            "created",
            "started",
            "exited",
            "started",
            "restarted",
            "exited",
            "started",
            "restarted",
            "exited"
        ]
    );
    // Stopped as wanted: later ticks do nothing.
    t.fake.clear_calls();
    t.node.reconcile();
    assert!(t.fake.calls().is_empty());
}

#[test]
fn an_auto_destroy_machine_goes_when_its_app_ends() {
    let t = test_node();
    let mut c = config();
    c.auto_destroy = true;
    c.restart.policy = RestartPolicy::No;
    let m = t.node.create(None, Placement::default(), c).unwrap();
    t.fake.exit(&m.id, 0, false);
    t.node.reconcile();
    assert_eq!(
        t.node.state.get(&m.id).unwrap().state,
        MachineState::Destroyed
    );
    assert!(t.fake.machines().is_empty());
    assert!(t.node.state.list().unwrap().is_empty());
}

#[test]
fn a_machine_the_host_lost_is_adopted_and_started_again() {
    let t = test_node();
    let m = t.node.create(None, Placement::default(), config()).unwrap();
    // A reboot: the shim and its files are gone.
    t.fake.set_state(&m.id, ProcState::NotRunning);
    t.fake.clear_calls();
    t.node.reconcile();
    assert_eq!(t.fake.calls(), [Call::Start(m.id.clone())]);
    let last = t.node.state.events(&m.id).unwrap().pop().unwrap();
    assert_eq!(
        (last.kind.as_str(), &last.detail["by"]),
        ("restarted", &serde_json::json!("adoption"))
    );
}

/// An edge that records the hosts it is given, with the driver's calls at
/// that moment.
struct FakeIngress {
    fake: Arc<FakeDriver>,
    seen: Mutex<Vec<(Vec<crate::routing::HostSpec>, Vec<Call>)>>,
}

impl crate::routing::Ingress for FakeIngress {
    fn set_hosts(&self, hosts: &[crate::routing::HostSpec]) {
        self.seen
            .lock()
            .unwrap()
            .push((hosts.to_vec(), self.fake.calls()));
    }
    fn last_request(&self, _host: &str) -> u64 {
        0
    }
    fn answers_at(&self, _ip: std::net::IpAddr) -> crate::routing::Answers {
        crate::routing::Answers::default()
    }
    fn answer_bounds(&self) -> Vec<f64> {
        Vec::new()
    }
    fn in_flight_at(&self, _ip: std::net::IpAddr) -> crate::routing::InFlightGauge {
        Box::new(|| 0)
    }
    fn has_room(&self, _host: &str, _addrs: &[std::net::SocketAddr]) -> bool {
        false
    }
}

#[test]
fn a_stop_drains_first_then_signals_then_kills_what_ignores_the_signal() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeDriver::new(dir.path()));
    let ingress = Arc::new(FakeIngress {
        fake: fake.clone(),
        seen: Mutex::default(),
    });
    let node = Node::new(
        Arc::new(SqliteStore::open(dir.path()).unwrap()),
        fake.clone(),
        hangar_oci::Store::open(dir.path()).unwrap(),
        crate::apps::Sealer::open_or_create(dir.path()).unwrap(),
    )
    .with_routing(crate::routing::Routing::new(ingress.clone(), "test"));
    let node = Arc::new(node);
    let mut c = config();
    c.services.push(crate::config::Service {
        internal_port: 8080,
        ..Default::default()
    });
    let m = node
        .create(Some("web".into()), Placement::default(), c)
        .unwrap();
    node.refresh_routes();
    let backends = |hosts: &[crate::routing::HostSpec]| -> usize {
        hosts.iter().map(|h| h.backends.len()).sum()
    };
    assert_eq!(backends(&ingress.seen.lock().unwrap()[0].0), 1);
    ingress.seen.lock().unwrap().clear();
    fake.stubborn(&m.id);
    fake.clear_calls();
    let stopped = node
        .stop(&m.id, "SIGINT", Duration::from_millis(30))
        .unwrap();
    assert_eq!(stopped.state, MachineState::Stopped);
    assert_eq!(stopped.exit_code, Some(137));
    // The routes lost it before any signal.
    {
        let seen = ingress.seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(backends(&seen[0].0), 0);
        assert!(seen[0].1.is_empty(), "{:?}", seen[0].1);
    }
    assert_eq!(
        fake.calls(),
        [
            Call::Signal(m.id.clone(), "SIGINT".into()),
            Call::Signal(m.id.clone(), "SIGKILL".into())
        ]
    );
    // A start after a stop; a destroy of a running machine needs force,
    // and drains first too.
    node.start(&m.id).unwrap();
    assert!(matches!(
        node.destroy(&m.id, false),
        Err(Error::Conflict(_))
    ));
    ingress.seen.lock().unwrap().clear();
    fake.clear_calls();
    let gone = node.destroy(&m.id, true).unwrap();
    assert_eq!(gone.state, MachineState::Destroyed);
    assert!(fake.machines().is_empty());
    let seen = ingress.seen.lock().unwrap();
    assert_eq!(backends(&seen[0].0), 0);
    assert!(seen[0].1.is_empty(), "{:?}", seen[0].1);
}

#[test]
fn a_stop_cut_short_by_the_node_is_finished_by_the_reconcile_loop() {
    let t = test_node();
    let m = t.node.create(None, Placement::default(), config()).unwrap();
    // The node was killed after recording the wish, before the signal.
    t.node.state.set_desired(&m.id, Desired::Stopped).unwrap();
    t.node.reconcile();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while t.node.state.get(&m.id).unwrap().state != MachineState::Stopped {
        assert!(std::time::Instant::now() < deadline, "not stopped");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(t
        .fake
        .calls()
        .contains(&Call::Signal(m.id.clone(), "SIGTERM".into())));
}

#[test]
fn exec_and_signal_need_a_running_machine() {
    let t = test_node();
    let m = t.node.create(None, Placement::default(), config()).unwrap();
    let out = t
        .node
        .exec(&m.id, &["echo".into(), "hi".into()], None, "")
        .unwrap();
    assert_eq!((out.exit_code, out.stdout.as_str()), (0, "echo hi"));
    assert!(matches!(
        t.node.exec(&m.id, &[], None, ""),
        Err(Error::Invalid(_))
    ));
    t.node
        .stop(&m.id, "SIGTERM", Duration::from_secs(1))
        .unwrap();
    assert!(matches!(
        t.node.exec(&m.id, &["true".into()], None, ""),
        Err(Error::Conflict(_))
    ));
    assert!(matches!(
        t.node.signal(&m.id, "SIGUSR1"),
        Err(Error::Conflict(_))
    ));
}

/// The node's loop on the cluster's store: a restart by policy, and the
/// stale-restart race decided by etcd's compare-and-set.
#[test]
fn the_reconcile_loop_works_the_same_on_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let members = hangar_cluster::members::Members::start(&dir.path().join("etcd"), 1).unwrap();
    let fake = Arc::new(FakeDriver::new(dir.path()));
    let node = Arc::new(Node::new(
        Arc::new(crate::store::EtcdStore::open(&members.endpoints()).unwrap()),
        fake.clone(),
        hangar_oci::Store::open(dir.path()).unwrap(),
        crate::apps::Sealer::open_or_create(dir.path()).unwrap(),
    ));
    let m = node.create(None, Placement::default(), config()).unwrap();
    assert_eq!(node.state.get(&m.id).unwrap().state, MachineState::Started);
    fake.exit(&m.id, 1, false);
    node.reconcile();
    let now = node.state.get(&m.id).unwrap();
    assert_eq!((now.state, now.restarts), (MachineState::Started, 1));
    // Decided on a row that changed before it acted: not restarted.
    fake.exit(&m.id, 1, false);
    let read = node.state.get(&m.id).unwrap();
    let step = reconcile_step(&read, fake.state(&m.id));
    node.state.set_desired(&m.id, Desired::Stopped).unwrap();
    let lock = node.lock(&m.id);
    let e = node.apply(&read, step, lock.lock().unwrap()).unwrap_err();
    assert!(matches!(e, Error::Conflict(_)), "{e}");
    node.reconcile();
    let now = node.state.get(&m.id).unwrap();
    assert_eq!(
        (now.state, now.desired, now.restarts),
        (MachineState::Stopped, Desired::Stopped, 1)
    );
    let kinds: Vec<String> = node
        .state
        .events(&m.id)
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        [
            "created",
            "started",
            "exited",
            "started",
            "restarted",
            "exited"
        ]
    );
}
