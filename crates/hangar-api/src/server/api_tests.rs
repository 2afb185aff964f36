//! The API in process, over loopback, against the recording fake driver
//! (no root): the typed client as the CLI uses it, and a hostile second
//! org that tries every route on the first org's things.

use std::sync::Arc;

use super::*;
use crate::client::{Client, ClientError};
use crate::config::MachineConfig;
use crate::node::tests::{config, test_node, TestNode};
use crate::store::MachineState;
use crate::wire::{CreateMachine, DeployRequest, ExecRequest, StopMachine};
use hangar_machine::Driver as _;

struct TestApi {
    base: String,
    t: TestNode,
    _server: tokio::task::JoinHandle<()>,
}

impl TestApi {
    fn client(&self, token: &str) -> Client {
        Client::new(&self.base, token)
    }
}

const ADMIN: &str = "admin-token";
const ACME: &str = "acme-token";
const EVIL: &str = "evil-token";

/// A node with apps `web` (org acme) and `loot` (org evil), serving its
/// API on a loopback port; every image may be pulled.
async fn serve_api() -> TestApi {
    let t = test_node();
    t.node.state.create_app("web", "acme").unwrap();
    t.node.state.create_app("loot", "evil").unwrap();
    let pull: Puller = Arc::new(|_, _, _| Box::pin(async { Ok(()) }));
    let orgs: OrgTokens = Arc::new(|token| match token {
        ACME => Some("acme".into()),
        EVIL => Some("evil".into()),
        _ => None,
    });
    let api = Arc::new(Api {
        node: t.node.clone(),
        token: ADMIN.into(),
        pull,
        orgs: Some(orgs),
        in_flight: Default::default(),
        dashboards: Default::default(),
        streams: Default::default(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(serve(api, listener, std::future::pending()));
    TestApi {
        base,
        t,
        _server: server,
    }
}

fn of_app(app: &str, config: MachineConfig) -> CreateMachine {
    CreateMachine {
        name: None,
        app: Some(app.into()),
        config,
        ..Default::default()
    }
}

fn status<T>(r: Result<T, ClientError>) -> (u16, String) {
    let Err(e) = r else {
        panic!("expected a refusal")
    };
    (e.status().unwrap_or_else(|| panic!("{e}")), e.to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_client_runs_a_machine_through_its_life() {
    let api = serve_api().await;
    let acme = api.client(ACME);
    let m = acme.create_machine(&of_app("web", config())).await.unwrap();
    assert_eq!(m.state, MachineState::Started);
    assert_eq!(m.app.as_deref(), Some("web"));
    assert!(api.t.fake.machines().contains(&m.id));

    let out = acme
        .exec(
            &m.id,
            &ExecRequest {
                cmd: vec!["true".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(out.exit_code, 0, "{out:?}");

    let stopped = acme
        .stop_machine(&m.id, &StopMachine::default())
        .await
        .unwrap();
    assert_eq!(stopped.state, MachineState::Stopped);
    let waited = acme.wait(&m.id, "stopped", 1).await.unwrap();
    assert_eq!(waited.state, MachineState::Stopped);
    // Waiting for a state it does not reach runs out.
    let (code, msg) = status(acme.wait(&m.id, "started", 0).await);
    assert_eq!(code, 408, "{msg}");
    assert!(msg.contains("is stopped, not started"), "{msg}");

    let events: Vec<String> = acme
        .events(&m.id)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert!(events.contains(&"created".to_string()), "{events:?}");

    let gone = acme.destroy_machine(&m.id, false).await.unwrap();
    assert_eq!(gone.state, MachineState::Destroyed);
    assert!(gone.private_ip.is_none());
    assert!(!api.t.fake.machines().contains(&m.id));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_client_deploys_and_streams_the_progress() {
    let api = serve_api().await;
    let acme = api.client(ACME);
    let mut said = Vec::new();
    let req = DeployRequest {
        image: "registry.test/web:1".into(),
        config: config(),
        count: Some(2),
        strategy: Default::default(),
        max_unavailable: 0,
        description: "first".into(),
        primary_region: None,
        observe: Default::default(),
        guard: Default::default(),
    };
    let release = acme
        .deploy("web", &req, |m| said.push(m.to_string()))
        .await
        .unwrap();
    assert_eq!(release.version, 1);
    assert_eq!(release.status, crate::apps::ReleaseStatus::Complete);
    assert!(!said.is_empty(), "no progress was streamed");
    let app = acme.app("web").await.unwrap();
    assert_eq!(app.machines.len(), 2);
    assert!(app.machines.iter().all(|m| m.release == Some(1)));
    assert_eq!(app.release.map(|r| r.version), Some(1));

    acme.scale("web", 1, &[], |_| {}).await.unwrap();
    let summary = acme.apps().await.unwrap();
    assert_eq!(summary.len(), 1, "acme sees only its app: {summary:?}");
    assert_eq!((summary[0].machines, summary[0].release), (1, Some(1)));

    // A deploy that cannot work says why, as the last line of the stream.
    let bad = DeployRequest {
        count: Some(100_000),
        ..req
    };
    let e = acme.deploy("web", &bad, |_| {}).await.unwrap_err();
    assert!(e.to_string().contains("count"), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_org_reaches_nothing_of_the_first() {
    let api = serve_api().await;
    let acme = api.client(ACME);
    let evil = api.client(EVIL);
    let m = acme.create_machine(&of_app("web", config())).await.unwrap();
    acme.set_secrets("web", [("KEY".to_string(), "v".to_string())].into())
        .await
        .unwrap();

    // Lists hold only its own.
    assert!(evil.machines().await.unwrap().is_empty());
    let apps: Vec<String> = evil
        .apps()
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.name)
        .collect();
    assert_eq!(apps, ["loot"]);

    // The first org's machine answers as one that does not exist.
    let (code, msg) = status(evil.machine(&m.id).await);
    let (code_missing, msg_missing) = status(evil.machine("0000000000dead").await);
    assert_eq!((code, code_missing), (404, 404));
    assert_eq!(
        msg.replace(&m.id, "ID"),
        msg_missing.replace("0000000000dead", "ID")
    );
    assert_eq!(status(evil.start_machine(&m.id).await).0, 404);
    let stop = StopMachine::default();
    assert_eq!(status(evil.stop_machine(&m.id, &stop).await).0, 404);
    assert_eq!(status(evil.restart_machine(&m.id, &stop).await).0, 404);
    assert_eq!(status(evil.signal_machine(&m.id, "SIGKILL").await).0, 404);
    let exec = ExecRequest {
        cmd: vec!["cat".into(), "/etc/shadow".into()],
        ..Default::default()
    };
    assert_eq!(status(evil.exec(&m.id, &exec).await).0, 404);
    assert_eq!(status(evil.events(&m.id).await).0, 404);
    assert_eq!(status(evil.wait(&m.id, "stopped", 0).await).0, 404);
    assert_eq!(status(evil.logs(&m.id, false).await).0, 404);
    let update = crate::wire::UpdateMachine {
        app: Some("loot".into()),
        config: config(),
    };
    assert_eq!(status(evil.update_machine(&m.id, &update).await).0, 404);
    assert_eq!(status(evil.destroy_machine(&m.id, true).await).0, 404);

    // The first org's app answers as one that does not exist.
    let (_, msg) = status(evil.app("web").await);
    let (_, msg_missing) = status(evil.app("nope").await);
    assert_eq!(msg.replace("web", "X"), msg_missing.replace("nope", "X"));
    assert_eq!(status(evil.releases("web").await).0, 404);
    assert_eq!(status(evil.secrets("web").await).0, 404);
    assert_eq!(
        status(evil.unset_secrets("web", &["KEY".into()]).await).0,
        404
    );
    assert_eq!(status(evil.scale("web", 0, &[], |_| {}).await).0, 404);
    let deploy = DeployRequest {
        image: "registry.test/evil:1".into(),
        config: config(),
        count: Some(1),
        strategy: Default::default(),
        max_unavailable: 0,
        description: String::new(),
        primary_region: None,
        observe: Default::default(),
        guard: Default::default(),
    };
    assert_eq!(status(evil.deploy("web", &deploy, |_| {}).await).0, 404);
    assert_eq!(status(evil.destroy_app("web").await).0, 404);
    // Nor may it run a machine in the first org's app, or make an app in
    // its org.
    assert_eq!(
        status(evil.create_machine(&of_app("web", config())).await).0,
        400
    );
    assert_eq!(status(evil.create_app("web2", "acme").await).0, 400);

    // All of it left the first org's things as they were.
    let after = acme.machine(&m.id).await.unwrap();
    assert_eq!(after.state, MachineState::Started);
    assert_eq!(after.config.image, config().image);
    assert_eq!(acme.secrets("web").await.unwrap().len(), 1);
    assert_eq!(acme.app("web").await.unwrap().org, "acme");
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_bodies_paths_and_methods_are_refused_clearly() {
    let api = serve_api().await;
    for token in ["", "wrong"] {
        let (code, msg) = status(api.client(token).machines().await);
        assert_eq!(code, 401);
        assert!(msg.contains("API token"), "{msg}");
    }
    let http = reqwest::Client::new();
    let send = |method: reqwest::Method, path: &str, body: Vec<u8>| {
        http.request(method, format!("{}{path}", api.base))
            .bearer_auth(ADMIN)
            .body(body)
            .send()
    };
    let answer = |r: reqwest::Response| async move {
        let status = r.status().as_u16();
        let body: crate::wire::ErrorBody = r.json_body().await;
        (status, body.error)
    };

    let big = vec![b' '; MAX_BODY + 1];
    let (code, msg) = answer(
        send(reqwest::Method::POST, "/v1/machines", big)
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(code, 413, "{msg}");
    assert!(msg.contains("1024 KiB"), "{msg}");

    let typo = br#"{"config": {"image": "registry.test/a:1", "guest": {"memroy_mb": 1}}}"#;
    let (code, msg) = answer(
        send(reqwest::Method::POST, "/v1/machines", typo.to_vec())
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(code, 400);
    assert!(
        msg.contains("config.guest") && msg.contains("memroy_mb"),
        "{msg}"
    );

    let (code, msg) = answer(
        send(reqwest::Method::GET, "/v1/nothing", vec![])
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(code, 404);
    assert!(msg.contains("no such endpoint: /v1/nothing"), "{msg}");

    let (code, msg) = answer(
        send(reqwest::Method::PUT, "/v1/apps", vec![])
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(code, 405);
    assert!(msg.contains("PUT"), "{msg}");

    let (code, msg) = answer(
        send(
            reqwest::Method::GET,
            "/v1/machines/x/wait?timeout=soon",
            vec![],
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(
        code, 404,
        "no machine x comes before the bad timeout: {msg}"
    );
    assert!(api.t.fake.calls().is_empty(), "nothing reached the driver");
}

#[tokio::test(flavor = "multi_thread")]
async fn one_orgs_flood_leaves_the_other_org_served() {
    let api = serve_api().await;
    let evil = api.client(EVIL);
    let own = evil
        .create_machine(&of_app("loot", config()))
        .await
        .unwrap();
    // Requests that stay in flight: waits for a state that never comes.
    let waits: Vec<_> = (0..IN_FLIGHT_PER_CALLER)
        .map(|_| {
            let (evil, id) = (evil.clone(), own.id.clone());
            // Longer than the loop below may take on a loaded machine: the
            // first ones must still be in flight when the last arrive.
            tokio::spawn(async move { evil.wait(&id, "destroyed", 30).await })
        })
        .collect();
    // Until all of them are in.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let refused = loop {
        match evil.machines().await {
            Err(e) if e.status() == Some(429) => break e,
            _ if std::time::Instant::now() > deadline => panic!("never refused"),
            _ => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
        }
    };
    assert!(refused.to_string().contains("retry"), "{refused}");
    // The other org and the admin are served meanwhile.
    assert!(api.client(ACME).apps().await.is_ok());
    assert!(api.client(ADMIN).machines().await.is_ok());
    for w in waits {
        w.abort();
    }
}

/// Reads an error body (the API's JSON).
trait JsonBody {
    async fn json_body<T: serde::de::DeserializeOwned>(self) -> T;
}

impl JsonBody for reqwest::Response {
    async fn json_body<T: serde::de::DeserializeOwned>(self) -> T {
        let bytes = self.bytes().await.unwrap();
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&bytes)))
    }
}
