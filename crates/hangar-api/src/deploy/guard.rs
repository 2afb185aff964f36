//! The deploy guard: while a rolling (or blue-green) deploy goes, and for
//! a window after its last batch, it compares what the new release's
//! machines answer at this node's edge with what the old release's
//! answered (their whole time in service before the deploy, and during
//! it). When the new release is clearly worse, the deploy stops and rolls
//! back, and the release says which figure and by how much.
//!
//! "Clearly" is conservative: each side needs [`GuardSettings::min_requests`]
//! answers; errors (5xx, and attempts that got no answer) count when the
//! new ratio is at least `error_margin` above the old and a two-proportion
//! z-test puts the difference past 3 standard errors; latency counts when
//! the new p95 is at least `latency_factor` times the old and
//! `latency_margin_ms` above it. With no traffic there is nothing to
//! compare, and the guard says so and lets the deploy go on.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::node::Node;
use crate::routing::Answers;
use crate::store::Machine;

/// `[deploy]`'s guard settings; on by default.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GuardSettings {
    pub enabled: bool,
    /// How long each batch's new machines are watched (and the whole new
    /// release after the last batch), in seconds.
    pub window: f64,
    pub min_requests: u64,
    pub error_margin: f64,
    pub latency_factor: f64,
    pub latency_margin_ms: f64,
}

impl Default for GuardSettings {
    fn default() -> Self {
        GuardSettings {
            enabled: true,
            window: 20.0,
            min_requests: 20,
            error_margin: 0.05,
            latency_factor: 2.0,
            latency_margin_ms: 250.0,
        }
    }
}

impl GuardSettings {
    pub fn check(&self) -> Result<()> {
        let bad = |what: &str| Err(Error::Invalid(format!("guard.{what}")));
        if !(self.window.is_finite() && (1.0..=3600.0).contains(&self.window)) {
            return bad("window: give 1 to 3600 seconds");
        }
        if self.min_requests == 0 {
            return bad("min_requests: give at least 1");
        }
        if !(self.error_margin > 0.0 && self.error_margin < 1.0) {
            return bad("error_margin: give a ratio above 0 and below 1");
        }
        if !(self.latency_factor.is_finite() && self.latency_factor >= 1.0) {
            return bad("latency_factor: give 1 or more");
        }
        if !(self.latency_margin_ms.is_finite() && self.latency_margin_ms >= 0.0) {
            return bad("latency_margin_ms: give 0 or more");
        }
        Ok(())
    }
}

/// Requests, errors and latency of a set of machines.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Figures {
    pub requests: u64,
    pub errors: u64,
    /// Per bucket of [`Answers::bounds`], then `+Inf`.
    pub latency: Vec<u64>,
}

impl Figures {
    fn of(a: &Answers) -> Figures {
        Figures {
            requests: a.classes.iter().sum::<u64>() + a.failed,
            errors: a.classes[4] + a.failed,
            latency: a.latency.clone(),
        }
    }

    fn add(&mut self, o: &Figures) {
        self.requests += o.requests;
        self.errors += o.errors;
        if self.latency.len() < o.latency.len() {
            self.latency.resize(o.latency.len(), 0);
        }
        for (s, x) in self.latency.iter_mut().zip(&o.latency) {
            *s += x;
        }
    }

    fn ratio(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }

    /// The `q` quantile of the answers' latency in seconds, interpolated
    /// within its bucket as Prometheus's `histogram_quantile` does.
    fn quantile(&self, q: f64, bounds: &[f64]) -> Option<f64> {
        let total: u64 = self.latency.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = q * total as f64;
        let mut seen = 0u64;
        for (i, &c) in self.latency.iter().enumerate() {
            if c > 0 && (seen + c) as f64 >= rank {
                let lo = if i == 0 { 0.0 } else { bounds[i - 1] };
                let Some(&hi) = bounds.get(i) else {
                    return Some(lo);
                };
                return Some(lo + (hi - lo) * ((rank - seen as f64) / c as f64));
            }
            seen += c;
        }
        bounds.last().copied()
    }
}

/// Whether `new` is clearly worse than `old`: why, in figures.
pub fn verdict(new: &Figures, old: &Figures, bounds: &[f64], s: &GuardSettings) -> Option<String> {
    if new.requests < s.min_requests || old.requests < s.min_requests {
        return None;
    }
    let (p1, p0) = (new.ratio(), old.ratio());
    let (n1, n0) = (new.requests as f64, old.requests as f64);
    let pooled = (new.errors + old.errors) as f64 / (n1 + n0);
    let se = (pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n0)).sqrt();
    let z = if se > 0.0 { (p1 - p0) / se } else { 0.0 };
    if p1 - p0 >= s.error_margin && z >= 3.0 {
        return Some(format!(
            "error ratio (5xx and no answer): {:.1}% of {} requests, against {:.1}% of {} for the old release",
            p1 * 100.0,
            new.requests,
            p0 * 100.0,
            old.requests
        ));
    }
    if let (Some(l1), Some(l0)) = (new.quantile(0.95, bounds), old.quantile(0.95, bounds)) {
        if l1 >= l0 * s.latency_factor && (l1 - l0) * 1000.0 >= s.latency_margin_ms {
            return Some(format!(
                "latency p95: {:.0} ms over {} requests, against {:.0} ms over {} for the old release",
                l1 * 1000.0,
                new.requests,
                l0 * 1000.0,
                old.requests
            ));
        }
    }
    None
}

/// A deploy's guard: what each machine has answered, as last read.
pub struct Guard {
    settings: GuardSettings,
    bounds: Vec<f64>,
    seen: HashMap<String, Figures>,
    /// The old machines' answers at the deploy's start.
    old_at_start: Figures,
    old_version: String,
    new_version: String,
}

impl Guard {
    /// A guard for a deploy replacing `old`, when it is on and the node
    /// has an edge to read (else `None`: nothing to watch).
    pub fn start(
        node: &Node,
        old: &[Machine],
        new_version: u32,
        settings: &GuardSettings,
    ) -> Option<Guard> {
        if !settings.enabled || old.is_empty() {
            return None;
        }
        let routing = node.routing.as_ref()?;
        let mut g = Guard {
            settings: settings.clone(),
            bounds: routing.ingress.answer_bounds(),
            seen: HashMap::new(),
            old_at_start: Figures::default(),
            old_version: old
                .iter()
                .filter_map(|m| m.release)
                .max()
                .map(|v| format!("v{v}"))
                .unwrap_or_else(|| "the old release".into()),
            new_version: format!("v{new_version}"),
        };
        g.read(node, old);
        g.old_at_start = g.total(old);
        Some(g)
    }

    /// Read `machines`' answers (kept as they were for one that left the
    /// edge: its figures stay counted).
    fn read(&mut self, node: &Node, machines: &[Machine]) {
        let Some(routing) = &node.routing else {
            return;
        };
        for m in machines {
            if !node.owns(m) {
                continue;
            }
            let addr = hangar_machine::network::address(m.slot);
            let mut f = Figures::of(&routing.ingress.answers_at(addr.v4.into()));
            f.add(&Figures::of(&routing.ingress.answers_at(addr.v6.into())));
            let keep = self
                .seen
                .get(&m.id)
                .is_none_or(|was| f.requests >= was.requests);
            if keep {
                self.seen.insert(m.id.clone(), f);
            }
        }
    }

    fn total(&self, machines: &[Machine]) -> Figures {
        let mut t = Figures::default();
        for m in machines {
            if let Some(f) = self.seen.get(&m.id) {
                t.add(f);
            }
        }
        t
    }

    /// Watch `new` against the old release (`old`: its machines still in
    /// service, `all_old`: every one the deploy replaces) for a window;
    /// an error when the new release is clearly worse.
    pub async fn watch(
        &mut self,
        node: &Node,
        new: &[Machine],
        all_old: &[Machine],
        say: &(dyn Fn(String) + Send + Sync),
    ) -> Result<()> {
        let window = Duration::from_secs_f64(self.settings.window);
        let started = Instant::now();
        let traffic_before = self.total(all_old).requests + self.total(new).requests;
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            self.read(node, new);
            self.read(node, all_old);
            let fresh = self.total(new);
            let old = self.total(all_old);
            if let Some(why) = verdict(&fresh, &old, &self.bounds, &self.settings) {
                return Err(Error::Conflict(format!(
                    "the deploy guard stopped {}: its {why} ({} of watching)",
                    self.new_version,
                    secs(started.elapsed())
                )));
            }
            let traffic = old.requests + fresh.requests;
            // Nothing reached the app at all: nothing to compare.
            if traffic == traffic_before && started.elapsed() >= Duration::from_secs(3) {
                say(format!(
                    "deploy guard: no requests reached the app in {}; nothing to compare",
                    secs(started.elapsed())
                ));
                return Ok(());
            }
            if started.elapsed() >= window {
                let since = fresh.requests;
                let old_during = old.requests.saturating_sub(self.old_at_start.requests);
                say(format!(
                    "deploy guard: {} answered {since} requests ({:.1}% errors) in {}; {} {} ({:.1}%; {old_during} during the deploy): no worse",
                    self.new_version,
                    fresh.ratio() * 100.0,
                    secs(window),
                    self.old_version,
                    old.requests,
                    old.ratio() * 100.0,
                ));
                return Ok(());
            }
        }
    }
}

fn secs(d: Duration) -> String {
    format!("{:.0} s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: [f64; 4] = [0.01, 0.1, 0.5, 2.0];

    fn figures(requests: u64, errors: u64, latency: [u64; 5]) -> Figures {
        Figures {
            requests,
            errors,
            latency: latency.to_vec(),
        }
    }

    #[test]
    fn a_release_with_many_more_errors_is_stopped_and_the_figures_named() {
        let s = GuardSettings::default();
        let old = figures(500, 1, [500, 0, 0, 0, 0]);
        let new = figures(60, 30, [60, 0, 0, 0, 0]);
        let why = verdict(&new, &old, &BOUNDS, &s).unwrap();
        assert!(
            why.contains("50.0% of 60") && why.contains("0.2% of 500"),
            "{why}"
        );
        // A few errors more, within the margin: no verdict.
        let new = figures(60, 2, [60, 0, 0, 0, 0]);
        assert_eq!(verdict(&new, &old, &BOUNDS, &s), None);
        // Too few requests to tell.
        let new = figures(10, 10, [10, 0, 0, 0, 0]);
        assert_eq!(verdict(&new, &old, &BOUNDS, &s), None);
        // The old release was as bad: no verdict.
        let old = figures(500, 240, [500, 0, 0, 0, 0]);
        let new = figures(60, 30, [60, 0, 0, 0, 0]);
        assert_eq!(verdict(&new, &old, &BOUNDS, &s), None);
    }

    #[test]
    fn a_much_slower_release_is_stopped_and_a_bit_slower_one_is_not() {
        let s = GuardSettings::default();
        let old = figures(200, 0, [200, 0, 0, 0, 0]);
        let slow = figures(100, 0, [0, 0, 10, 90, 0]);
        let why = verdict(&slow, &old, &BOUNDS, &s).unwrap();
        assert!(why.starts_with("latency p95"), "{why}");
        let a_bit = figures(100, 0, [0, 100, 0, 0, 0]);
        assert_eq!(verdict(&a_bit, &old, &BOUNDS, &s), None);
        let f = figures(100, 0, [50, 50, 0, 0, 0]);
        let p50 = f.quantile(0.5, &BOUNDS).unwrap();
        assert!((p50 - 0.01).abs() < 1e-9, "{p50}");
        assert_eq!(Figures::default().quantile(0.5, &BOUNDS), None);
    }

    #[test]
    fn settings_out_of_range_are_refused() {
        let bad = |f: fn(&mut GuardSettings)| {
            let mut s = GuardSettings::default();
            f(&mut s);
            s.check().unwrap_err().to_string()
        };
        assert!(bad(|s| s.window = 0.0).contains("guard.window"));
        assert!(bad(|s| s.min_requests = 0).contains("guard.min_requests"));
        assert!(bad(|s| s.error_margin = 1.5).contains("guard.error_margin"));
        GuardSettings::default().check().unwrap();
    }
}
