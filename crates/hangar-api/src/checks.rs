//! Health checks of machines: `GET path` on the machine's address, run by
//! the node on each check's interval. Results live in memory (they are
//! evidence, re-gathered within one interval after a restart) and gate
//! traffic (the edge routes only to machines whose checks pass) and
//! deploys (a new machine must pass before an old one goes).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::Check;
use crate::node::Node;
use crate::store::MachineState;

/// Consecutive failures after the grace period that make a check critical.
pub const FAILURES_TO_CRITICAL: u32 = 2;

crate::closed_set! {
    /// A check's verdict.
    #[derive(Default)]
    pub enum CheckState {
        /// No verdict yet.
        #[default]
        Pending,
        Passing,
        Critical,
    }
}

#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct CheckStatus {
    pub name: String,
    pub status: CheckState,
    pub output: String,
}

#[derive(Default)]
struct Item {
    status: CheckStatus,
    last_run: Option<Instant>,
    failures: u32,
    running: bool,
}

struct MachineChecks {
    /// When the node first saw this run of the machine started.
    since: Instant,
    items: BTreeMap<String, Item>,
}

#[derive(Default)]
pub struct Checks {
    machines: Mutex<HashMap<String, MachineChecks>>,
}

impl Checks {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, MachineChecks>> {
        self.machines.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn status(&self, id: &str) -> Vec<CheckStatus> {
        self.lock()
            .get(id)
            .map(|m| m.items.values().map(|i| i.status.clone()).collect())
            .unwrap_or_default()
    }

    /// All checks pass (or there are none) for a started machine.
    pub fn passing(&self, id: &str, defined: usize) -> bool {
        if defined == 0 {
            return true;
        }
        self.lock().get(id).is_some_and(|m| {
            m.items.len() == defined
                && m.items
                    .values()
                    .all(|i| i.status.status == CheckState::Passing)
        })
    }

    /// Record that checks just passed when probed outside the loop (a
    /// machine woken for a waiting request).
    pub fn mark_passing<'a>(&self, id: &str, names: impl Iterator<Item = &'a String>) {
        let mut table = self.lock();
        let entry = tracked(&mut table, id);
        for name in names {
            let item = entry.items.entry(name.clone()).or_default();
            item.status = CheckStatus {
                name: name.clone(),
                status: CheckState::Passing,
                output: "OK".into(),
            };
            item.failures = 0;
            item.last_run = Some(Instant::now());
        }
    }
}

impl Item {
    /// Count one probe's result: a pass clears the failures; a failure
    /// after the grace period counts, and [`FAILURES_TO_CRITICAL`] in a row
    /// make the check critical (one does not: a blip is not a verdict).
    fn count(&mut self, result: Result<(), String>, in_grace: bool) {
        self.running = false;
        match result {
            Ok(()) => {
                self.failures = 0;
                self.status.status = CheckState::Passing;
                self.status.output = "OK".into();
            }
            Err(why) => {
                if !in_grace {
                    self.failures += 1;
                }
                if self.failures >= FAILURES_TO_CRITICAL {
                    self.status.status = CheckState::Critical;
                }
                self.status.output = why;
            }
        }
    }
}

impl Checks {
    /// Record one probe of check `name` of machine `id` (ignored when the
    /// machine's checks are no longer tracked: it stopped meanwhile).
    pub fn record(&self, id: &str, name: &str, result: Result<(), String>, in_grace: bool) {
        let mut table = self.lock();
        if let Some(item) = table.get_mut(id).and_then(|m| m.items.get_mut(name)) {
            item.count(result, in_grace);
        }
    }

    /// Start tracking check `name` of a started machine `id` (pending).
    pub fn track(&self, id: &str, name: &str) {
        let mut table = self.lock();
        let entry = tracked(&mut table, id);
        entry.items.entry(name.to_string()).or_insert_with(|| Item {
            status: CheckStatus {
                name: name.to_string(),
                status: CheckState::Pending,
                output: String::new(),
            },
            ..Item::default()
        });
    }
}

/// The checks of machine `id`, tracked from now if they were not.
fn tracked<'a>(table: &'a mut HashMap<String, MachineChecks>, id: &str) -> &'a mut MachineChecks {
    table
        .entry(id.to_string())
        .or_insert_with(|| MachineChecks {
            since: Instant::now(),
            items: BTreeMap::new(),
        })
}

/// One check, once: `Ok` or why it failed.
pub async fn probe(addr: SocketAddr, check: &Check) -> Result<(), String> {
    let timeout = check.timeout();
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let req = format!(
            "GET {} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: hangar-check\r\n\r\n",
            check.path
        );
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut head = vec![0u8; 64];
        let n = s.read(&mut head).await.map_err(|e| e.to_string())?;
        let line = String::from_utf8_lossy(&head[..n])
            .lines()
            .next()
            .unwrap_or("")
            .to_string();
        let code: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        if (200..400).contains(&code) {
            Ok(())
        } else if code == 0 {
            Err(format!("GET {}: no HTTP answer", check.path))
        } else {
            Err(format!("GET {} answered {code}", check.path))
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("GET {}: no answer within {timeout:?}", check.path)),
    }
}

/// Run every started machine's checks on their intervals, forever.
pub async fn run(node: Arc<Node>) {
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tick.tick().await;
        let machines = match node.own_machines() {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("checks: {e}");
                continue;
            }
        };
        let now = Instant::now();
        let mut table = node.checks.lock();
        table.retain(|id, _| {
            machines
                .iter()
                .any(|m| &m.id == id && m.state == MachineState::Started)
        });
        for m in machines
            .iter()
            .filter(|m| m.state == MachineState::Started && !m.config.checks.is_empty())
        {
            let entry = table.entry(m.id.clone()).or_insert_with(|| MachineChecks {
                since: now,
                items: BTreeMap::new(),
            });
            for (name, check) in &m.config.checks {
                let item = entry.items.entry(name.clone()).or_insert_with(|| Item {
                    status: CheckStatus {
                        name: name.clone(),
                        status: CheckState::Pending,
                        output: String::new(),
                    },
                    ..Item::default()
                });
                let due = item.last_run.is_none_or(|t| now >= t + check.interval());
                if item.running || !due {
                    continue;
                }
                item.running = true;
                item.last_run = Some(now);
                let addr = SocketAddr::new(
                    hangar_machine::network::address(m.slot).v4.into(),
                    check.port,
                );
                let (node, id, name, check, since) = (
                    node.clone(),
                    m.id.clone(),
                    name.clone(),
                    check.clone(),
                    entry.since,
                );
                tokio::spawn(async move {
                    let result = probe(addr, &check).await;
                    let in_grace = since.elapsed() < check.grace_period();
                    node.checks.record(&id, &name, result, in_grace);
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_opens_on_a_pass_and_closes_on_failures_after_the_grace_period() {
        // (probes as (passed, in grace), the verdict after them)
        let table: &[(&[(bool, bool)], CheckState)] = &[
            (&[], CheckState::Pending),
            (&[(true, true)], CheckState::Passing),
            (
                &[(false, true), (false, true), (false, true)],
                CheckState::Pending,
            ),
            (&[(false, false)], CheckState::Pending),
            (&[(false, false), (false, false)], CheckState::Critical),
            (&[(true, false), (false, false)], CheckState::Passing),
            (
                &[(true, false), (false, false), (false, false)],
                CheckState::Critical,
            ),
            (
                &[(false, false), (false, false), (true, false)],
                CheckState::Passing,
            ),
            (
                &[(false, false), (true, false), (false, false)],
                CheckState::Passing,
            ),
        ];
        for (probes, verdict) in table {
            let checks = Checks::default();
            checks.track("m", "http");
            assert!(!checks.passing("m", 1));
            for (passed, in_grace) in probes.iter() {
                let result = if *passed {
                    Ok(())
                } else {
                    Err("GET / answered 500".into())
                };
                checks.record("m", "http", result, *in_grace);
            }
            let status = &checks.status("m")[0];
            assert_eq!(status.status, *verdict, "after {probes:?}");
            assert_eq!(checks.passing("m", 1), *verdict == CheckState::Passing);
            if probes.last().is_some_and(|p| !p.0) {
                assert_eq!(status.output, "GET / answered 500");
            }
        }
        // Checks of a machine not tracked are ignored; no checks pass.
        let checks = Checks::default();
        checks.record("gone", "http", Ok(()), false);
        assert!(checks.status("gone").is_empty());
        assert!(checks.passing("gone", 0));
        assert!(!checks.passing("gone", 1));
    }
}
