//! Whatever a caller sends goes through what the API does with it
//! before the node acts (parsing, validation, every duration and limit
//! made from the numbers) without a panic, and every refusal is a 4xx.

use std::time::{Duration, Instant};

use super::machines::{stop_timeout, wait_timeout};
use super::parse_json;
use crate::config::MachineConfig;
use crate::error::Error;
use crate::wire::*;
use proptest::prelude::*;
use serde_json::{json, Value};

fn config() -> Value {
    json!({
        "image": "127.0.0.1:5000/acme/app:v1",
        "env": {"A": "b"},
        "init": {"exec": ["/bin/sh"], "entrypoint": ["sh"], "cmd": ["-c", "true"], "user": "app"},
        "guest": {"cpus": 1, "memory_mb": 256, "driver": "container"},
        "rootfs": {"size_gb": 1},
        "restart": {"policy": "on-failure", "max_retries": 3},
        "services": [{"internal_port": 8080, "protocol": "tcp", "autostop": true,
            "autostart": true, "min_machines_running": 0, "idle_timeout": 60,
            "soft_limit": 10, "hard_limit": 20}],
        "metadata": {"app": "web"},
        "auto_destroy": false,
        "egress": {"action": "enforce", "allowed_domains": ["example.com"]},
        "checks": {"http": {"port": 8080, "path": "/", "interval": 1.0,
            "timeout": 1.0, "grace_period": 1.0}},
        "kill_signal": "SIGTERM",
        "kill_timeout": 5
    })
}

/// A body of each kind that passes, with every field set.
fn valid() -> Vec<Value> {
    vec![
        json!({"name": "m1", "config": config()}),
        json!({"config": config()}),
        json!({"image": "127.0.0.1:5000/acme/app:v2", "config": config(), "count": 2,
            "strategy": "bluegreen", "max_unavailable": 1, "description": "v2"}),
        json!({"signal": "SIGTERM", "timeout": 10}),
        json!({"count": 3}),
        json!({"cmd": ["true"], "user": "app", "stdin": "input"}),
        json!({"values": {"A": "b"}}),
        json!({"names": ["A"]}),
    ]
}

/// JSON pointers to every node of `v` below the root.
fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    let children: Vec<(String, &Value)> = match v {
        Value::Object(m) => m.iter().map(|(k, v)| (k.clone(), v)).collect(),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .map(|(i, v)| (i.to_string(), v))
            .collect(),
        _ => Vec::new(),
    };
    for (key, child) in children {
        let p = format!("{at}/{key}");
        out.push(p.clone());
        pointers(child, p, out);
    }
}

/// Values at the edges: the limits of every integer type, huge, tiny,
/// negative and fractional numbers, odd strings, wrong shapes.
fn edge_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::from),
        6 => prop_oneof![
            Just(0u64),
            Just(1),
            Just(u64::from(u16::MAX) + 1),
            Just(u64::from(u32::MAX)),
            Just(u64::from(u32::MAX) + 1),
            Just(1 << 44),
            Just(i64::MAX as u64 + 1),
            Just(u64::MAX),
            any::<u64>(),
        ]
        .prop_map(Value::from),
        2 => prop_oneof![Just(-1i64), Just(i64::MIN), any::<i64>()].prop_map(Value::from),
        4 => prop_oneof![
            Just(1e300f64),
            Just(f64::MAX),
            Just(-0.0),
            Just(1e-300),
            Just(0.5),
            Just(-5.0),
            Just(3600.0000001),
            any::<f64>().prop_filter("JSON has finite numbers", |f| f.is_finite()),
        ]
        .prop_map(Value::from),
        2 => "[a-zA-Z0-9/:.@_ -]{0,12}".prop_map(Value::from),
        1 => Just(Value::from("x".repeat(70_000))),
        1 => Just(Value::from("\u{0}\u{202e}\u{ffff}")),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,12}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A body of `valid()` with a few nodes replaced or removed.
fn mutated() -> impl Strategy<Value = Value> {
    // Bodies with a machine config (the first three) have the most
    // fields, so they get the most cases.
    let bodies: Vec<(u32, BoxedStrategy<Value>)> = valid()
        .into_iter()
        .enumerate()
        .map(|(i, body)| (if i < 3 { 6 } else { 1 }, mutations(body)))
        .collect();
    prop::strategy::Union::new_weighted(bodies)
}

fn mutations(body: Value) -> BoxedStrategy<Value> {
    let mut all = Vec::new();
    pointers(&body, String::new(), &mut all);
    let edit = (
        prop::sample::select(all),
        prop::option::weighted(0.9, edge_value()),
    );
    prop::collection::vec(edit, 1..3)
        .prop_map(move |edits| {
            let mut v = body.clone();
            for (pointer, value) in edits {
                let Some((parent, key)) = pointer.rsplit_once('/') else {
                    continue;
                };
                match (v.pointer_mut(parent), value) {
                    (Some(Value::Object(m)), Some(value)) => {
                        m.insert(key.to_string(), value);
                    }
                    (Some(Value::Object(m)), None) => {
                        m.remove(key);
                    }
                    (Some(Value::Array(a)), value) => {
                        if let Ok(i) = key.parse::<usize>() {
                            if i < a.len() {
                                match value {
                                    Some(value) => a[i] = value,
                                    None => {
                                        a.remove(i);
                                    }
                                }
                            }
                        }
                    }
                    _ => {}
                }
            }
            v
        })
        .boxed()
}

/// What the node derives from an accepted config, none of which may
/// panic or wrap.
fn accepted(c: &MachineConfig) -> usize {
    if let Err(e) = c.validate() {
        assert_eq!(e.status(), 400, "{e}");
        return 0;
    }
    let (host_cpus, host_mb) = crate::config::host_capacity();
    assert!(c.guest.cpus >= 1 && c.guest.cpus <= host_cpus);
    assert!(c.guest.memory_mb >= 16 && c.guest.memory_mb <= host_mb);
    c.image
        .parse::<hangar_oci::Reference>()
        .expect("a validated image reference parses");
    // Every duration is within the stated range, so no deadline made
    // from one can overflow.
    let most = Duration::from_secs(crate::config::MAX_SECONDS);
    let (_, kill) = c.kill();
    assert!(kill <= most);
    let now = Instant::now();
    let _ = now + kill;
    for check in c.checks.values() {
        assert!(check.interval() <= most && check.timeout() <= most);
        assert!(check.grace_period() <= most);
        let _ = now + check.interval() + check.timeout() + check.grace_period();
    }
    for s in &c.services {
        assert!(s.idle_timeout <= crate::config::MAX_SECONDS);
    }
    assert!((1..=crate::config::MAX_ROOTFS_GB).contains(&c.rootfs.size_gb));
    let _ = now + crate::deploy::wait_budget(c);
    let limits = c.limits();
    assert_eq!(limits.disk_mb, c.rootfs.size_gb * 1024);
    let p = std::path::Path::new("/x");
    let bundle = hangar_machine::bundle::config("id", "host", p, p, p, p, limits);
    assert_eq!(
        bundle["linux"]["resources"]["memory"]["limit"].as_u64(),
        Some(c.guest.memory_mb << 20),
        "the cgroup gets the memory asked for"
    );
    1
}

/// Every request type the Machines and Apps API reads from a body;
/// how many machine configs passed validation.
fn through_the_api(body: &[u8]) -> usize {
    let refused = |e: Error| assert!(matches!(e.status(), 400 | 404), "{e}");
    let mut configs = 0;
    match parse_json::<CreateMachine>(body) {
        Ok(r) => configs += accepted(&r.config),
        Err(e) => refused(e),
    }
    match parse_json::<UpdateMachine>(body) {
        Ok(r) => configs += accepted(&r.config),
        Err(e) => refused(e),
    }
    match parse_json::<crate::deploy::DeployRequest>(body) {
        Ok(r) => {
            if let Some(count) = r.count {
                let _ = crate::deploy::check_count(count).map_err(refused);
            }
            configs += accepted(&r.config)
        }
        Err(e) => refused(e),
    }
    match parse_json::<StopMachine>(body) {
        Ok(r) => match stop_timeout(&r) {
            Ok(t) => assert!(t.as_secs() <= crate::config::MAX_SECONDS),
            Err(e) => refused(e),
        },
        Err(e) => refused(e),
    }
    match parse_json::<ScaleRequest>(body) {
        Ok(r) => {
            let _ = crate::deploy::check_count(r.count).map_err(refused);
        }
        Err(e) => refused(e),
    }
    for e in [
        parse_json::<ExecRequest>(body).err(),
        parse_json::<SignalMachine>(body).err(),
        parse_json::<SetSecrets>(body).err(),
        parse_json::<UnsetSecrets>(body).err(),
        parse_json::<RegistryLoginRequest>(body).err(),
    ]
    .into_iter()
    .flatten()
    {
        refused(e);
    }
    configs
}

#[test]
fn the_valid_bodies_are_accepted() {
    let [create, update, deploy, ..] = &valid()[..] else {
        unreachable!()
    };
    for body in [create, update, deploy] {
        assert!(
            through_the_api(&serde_json::to_vec(body).unwrap()) >= 1,
            "{body}"
        );
    }
}

#[test]
fn mutated_bodies_never_panic() {
    use proptest::test_runner::{Config, TestRunner};
    let mut runner = TestRunner::new(Config {
        cases: 10_000,
        failure_persistence: None,
        ..Config::default()
    });
    let configs = std::cell::Cell::new(0);
    runner
        .run(&mutated(), |v| {
            configs.set(configs.get() + through_the_api(&serde_json::to_vec(&v).unwrap()));
            Ok(())
        })
        .unwrap();
    // The edits must often leave a config that passes, or the test
    // would never reach the arithmetic made from accepted numbers.
    assert!(configs.get() > 500, "{} configs passed", configs.get());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn cut_and_random_bytes_never_panic(v in mutated(), cut in any::<prop::sample::Index>(), noise in prop::collection::vec(any::<u8>(), 0..64)) {
        let text = serde_json::to_vec(&v).unwrap();
        through_the_api(&text[..cut.index(text.len() + 1)]);
        through_the_api(&noise);
    }

    #[test]
    fn wait_timeouts_are_bounded_or_refused(t in prop_oneof![
        "[0-9]{1,25}".boxed(),
        "-?[0-9a-z.+_ ]{0,8}".boxed(),
        any::<u64>().prop_map(|n| n.to_string()).boxed(),
    ]) {
        match wait_timeout(Some(&t)) {
            Ok(d) => prop_assert!(d.as_secs() <= crate::config::MAX_SECONDS),
            Err(e) => prop_assert_eq!(e.status(), 400),
        }
    }
}
