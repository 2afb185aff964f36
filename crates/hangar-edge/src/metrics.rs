//! Per-host counters, a latency histogram and backend health, rendered in
//! the Prometheus text format.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::backend::Routes;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 10] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
];

#[derive(Default)]
pub struct HostMetrics {
    pub requests: AtomicU64,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub stale: AtomicU64,
    /// Requests that bypassed the cache (method, policy, uncacheable).
    pub passes: AtomicU64,
    pub origin_fetches: AtomicU64,
    pub coalesced: AtomicU64,
    pub bytes_out: AtomicU64,
    pub errors: AtomicU64,
    pub ejections: AtomicU64,
    last_request: AtomicU64,
    latency: [AtomicU64; BUCKETS.len() + 1],
    latency_sum_us: AtomicU64,
}

impl HostMetrics {
    /// Note a request now (for idle detection).
    pub fn touch(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if self.last_request.load(Ordering::Relaxed) != now {
            self.last_request.store(now, Ordering::Relaxed);
        }
    }

    /// When the last request came (Unix seconds; 0: never).
    pub fn last_request(&self) -> u64 {
        self.last_request.load(Ordering::Relaxed)
    }

    pub fn observe(&self, took: Duration) {
        let s = took.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(BUCKETS.len());
        self.latency[i].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }
}

type Field = fn(&HostMetrics) -> &AtomicU64;

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// The whole exposition for every host.
pub fn render(routes: &Routes, cache_bytes: (u64, u64), cache_objects: usize) -> String {
    let sites = routes.all();
    let mut names: Vec<&String> = sites.keys().collect();
    names.sort();
    let mut out = String::new();
    let counters: [(&str, &str, Field); 10] = [
        ("requests_total", "Requests received", |m| &m.requests),
        (
            "cache_hits_total",
            "Requests served fresh from the cache",
            |m| &m.hits,
        ),
        (
            "cache_misses_total",
            "Requests not found in the cache",
            |m| &m.misses,
        ),
        (
            "cache_stale_total",
            "Requests served stale (while revalidating or on error)",
            |m| &m.stale,
        ),
        (
            "cache_passes_total",
            "Requests that bypassed the cache",
            |m| &m.passes,
        ),
        ("origin_fetches_total", "Requests sent to backends", |m| {
            &m.origin_fetches
        }),
        (
            "coalesced_total",
            "Requests that waited for another request's origin fetch",
            |m| &m.coalesced,
        ),
        ("response_bytes_total", "Body bytes sent to clients", |m| {
            &m.bytes_out
        }),
        (
            "errors_total",
            "Responses with status 5xx made by the edge",
            |m| &m.errors,
        ),
        (
            "backend_ejections_total",
            "Backends ejected by passive health checks",
            |m| &m.ejections,
        ),
    ];
    for (name, help, field) in counters {
        let _ = writeln!(
            out,
            "# HELP hangar_edge_{name} {help}.\n# TYPE hangar_edge_{name} counter"
        );
        for host in &names {
            let _ = writeln!(
                out,
                "hangar_edge_{name}{{host=\"{host}\"}} {}",
                get(field(&sites[*host].metrics))
            );
        }
    }
    let _ = writeln!(out, "# HELP hangar_edge_cache_hit_ratio Hits (fresh and stale) over cacheable lookups.\n# TYPE hangar_edge_cache_hit_ratio gauge");
    for host in &names {
        let m = &sites[*host].metrics;
        let served = get(&m.hits) + get(&m.stale);
        let total = served + get(&m.misses);
        let ratio = if total == 0 {
            0.0
        } else {
            served as f64 / total as f64
        };
        let _ = writeln!(
            out,
            "hangar_edge_cache_hit_ratio{{host=\"{host}\"}} {ratio:.4}"
        );
    }
    let _ = writeln!(out, "# HELP hangar_edge_request_duration_seconds Time to the response head.\n# TYPE hangar_edge_request_duration_seconds histogram");
    for host in &names {
        let m = &sites[*host].metrics;
        let mut cum = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cum += get(&m.latency[i]);
            let _ = writeln!(
                out,
                "hangar_edge_request_duration_seconds_bucket{{host=\"{host}\",le=\"{b}\"}} {cum}"
            );
        }
        cum += get(&m.latency[BUCKETS.len()]);
        let _ = writeln!(
            out,
            "hangar_edge_request_duration_seconds_bucket{{host=\"{host}\",le=\"+Inf\"}} {cum}"
        );
        let _ = writeln!(
            out,
            "hangar_edge_request_duration_seconds_sum{{host=\"{host}\"}} {}",
            get(&m.latency_sum_us) as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "hangar_edge_request_duration_seconds_count{{host=\"{host}\"}} {cum}"
        );
    }
    let _ = writeln!(out, "# HELP hangar_edge_backend_up 1 when the backend passes its checks and is not ejected.\n# TYPE hangar_edge_backend_up gauge");
    for host in &names {
        for b in &sites[*host].backends {
            let up = u8::from(b.healthy() && !b.ejected());
            let _ = writeln!(
                out,
                "hangar_edge_backend_up{{host=\"{host}\",backend=\"{}\"}} {up}",
                b.addr
            );
        }
    }
    let _ = writeln!(out, "# HELP hangar_edge_backend_outstanding Requests in flight to the backend.\n# TYPE hangar_edge_backend_outstanding gauge");
    for host in &names {
        for b in &sites[*host].backends {
            let _ = writeln!(
                out,
                "hangar_edge_backend_outstanding{{host=\"{host}\",backend=\"{}\"}} {}",
                b.addr,
                b.outstanding()
            );
        }
    }
    let _ = writeln!(out, "# HELP hangar_edge_cache_bytes Bytes stored per tier.\n# TYPE hangar_edge_cache_bytes gauge");
    let _ = writeln!(
        out,
        "hangar_edge_cache_bytes{{tier=\"memory\"}} {}",
        cache_bytes.0
    );
    let _ = writeln!(
        out,
        "hangar_edge_cache_bytes{{tier=\"disk\"}} {}",
        cache_bytes.1
    );
    let _ = writeln!(out, "# HELP hangar_edge_cache_objects Objects stored.\n# TYPE hangar_edge_cache_objects gauge\nhangar_edge_cache_objects {cache_objects}");
    out
}
