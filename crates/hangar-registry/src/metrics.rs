//! Request counters, gathered for a scrape as `hangar-metrics` families.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use hangar_metrics::exposition::Family;

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, String, u16), u64>>,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
}

impl Metrics {
    pub fn request(&self, route: &'static str, method: &str, status: u16) {
        let mut map = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *map.entry((route, method.to_string(), status)).or_default() += 1;
    }

    /// The series, gathered for a scrape (see docs/metrics.md).
    pub fn families(&self) -> Vec<Family> {
        let mut requests = Family::counter(
            "hangar_registry_requests",
            "Requests answered, by route, method and status.",
            None,
        );
        let map = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        for ((route, method, status), n) in map.iter() {
            requests.push(
                &[
                    ("route", route),
                    ("method", method),
                    ("status", &status.to_string()),
                ],
                *n as f64,
            );
        }
        let mut out = vec![requests];
        for (name, help, v) in [
            (
                "hangar_registry_received",
                "Request body bytes received.",
                &self.bytes_in,
            ),
            (
                "hangar_registry_sent",
                "Response body bytes sent.",
                &self.bytes_out,
            ),
        ] {
            let mut f = Family::counter(name, help, Some("bytes"));
            f.push(&[], v.load(Ordering::Relaxed) as f64);
            out.push(f);
        }
        out
    }
}
