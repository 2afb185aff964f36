//! Per-host counters, a latency histogram and backend health, gathered
//! for a scrape as `hangar-metrics` families (documented in
//! docs/metrics.md).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hangar_metrics::exposition::Family;

use crate::backend::Routes;

/// Upper bounds of the latency buckets, in seconds (0.5 and 2 are the
/// Apdex thresholds of the app dashboard: T and 4T).
pub const BUCKETS: [f64; 13] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0,
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
    /// Requests that found no machine started and woke the app.
    pub cold_starts: AtomicU64,
    /// Responses by status class, 1xx to 5xx.
    pub status: [AtomicU64; 5],
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

    /// Count a response to a client by its status class.
    pub fn answered(&self, status: u16) {
        if let Some(c) = self.status.get(usize::from(status / 100).wrapping_sub(1)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
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

/// Every host's series, gathered now, each labelled with its `host` and
/// the host's own labels (a node gives each app's `org` and `app`).
pub fn families(routes: &Routes, cache_bytes: (u64, u64), cache_objects: usize) -> Vec<Family> {
    let sites = routes.all();
    let mut names: Vec<&String> = sites.keys().collect();
    names.sort();
    let labels_of = |host: &str| -> Vec<(String, String)> {
        let mut l = vec![("host".to_string(), host.to_string())];
        if let Some(site) = sites.get(host) {
            l.extend(
                site.config
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone())),
            );
        }
        l
    };
    let borrowed = |l: &[(String, String)]| -> Vec<(String, String)> { l.to_vec() };
    let mut out = Vec::new();
    let counters: [(&str, &str, Option<&'static str>, Field); 11] = [
        ("hangar_edge_requests", "Requests received.", None, |m| {
            &m.requests
        }),
        (
            "hangar_edge_cache_hits",
            "Requests served fresh from the cache.",
            None,
            |m| &m.hits,
        ),
        (
            "hangar_edge_cache_misses",
            "Requests not found in the cache.",
            None,
            |m| &m.misses,
        ),
        (
            "hangar_edge_cache_stale",
            "Requests served stale (while revalidating or on error).",
            None,
            |m| &m.stale,
        ),
        (
            "hangar_edge_cache_passes",
            "Requests that bypassed the cache.",
            None,
            |m| &m.passes,
        ),
        (
            "hangar_edge_origin_fetches",
            "Requests sent to backends.",
            None,
            |m| &m.origin_fetches,
        ),
        (
            "hangar_edge_coalesced",
            "Requests that waited for another request's origin fetch.",
            None,
            |m| &m.coalesced,
        ),
        (
            "hangar_edge_response",
            "Body bytes sent to clients.",
            Some("bytes"),
            |m| &m.bytes_out,
        ),
        (
            "hangar_edge_errors",
            "Responses with status 5xx made by the edge.",
            None,
            |m| &m.errors,
        ),
        (
            "hangar_edge_backend_ejections",
            "Backends ejected by passive health checks.",
            None,
            |m| &m.ejections,
        ),
        (
            "hangar_edge_cold_starts",
            "Requests that found no machine started and woke the app.",
            None,
            |m| &m.cold_starts,
        ),
    ];
    for (name, help, unit, field) in counters {
        let mut f = Family::counter(name, help, unit);
        for host in &names {
            f.samples
                .push((labels_of(host), get(field(&sites[*host].metrics)) as f64));
        }
        out.push(f);
    }
    let mut by_status = Family::counter(
        "hangar_edge_responses",
        "Responses sent to clients, by status class (1xx to 5xx).",
        None,
    );
    let mut ratio = Family::gauge(
        "hangar_edge_cache_hit",
        "Hits (fresh and stale) over cacheable lookups.",
        Some("ratio"),
    );
    let mut latency = Family::histogram(
        "hangar_edge_request_duration",
        "Time to the response head.",
        Some("seconds"),
        &BUCKETS,
    );
    let mut up = Family::gauge(
        "hangar_edge_backend_up",
        "1 when the backend passes its checks and is not ejected.",
        None,
    );
    let mut outstanding = Family::gauge(
        "hangar_edge_backend_outstanding",
        "Requests in flight to the backend.",
        None,
    );
    for host in &names {
        let m = &sites[*host].metrics;
        let labels = labels_of(host);
        for (i, class) in ["1xx", "2xx", "3xx", "4xx", "5xx"].iter().enumerate() {
            let mut l = borrowed(&labels);
            l.push(("status".into(), (*class).into()));
            by_status.samples.push((l, get(&m.status[i]) as f64));
        }
        let served = get(&m.hits) + get(&m.stale);
        let total = served + get(&m.misses);
        let r = if total == 0 {
            0.0
        } else {
            served as f64 / total as f64
        };
        ratio.samples.push((borrowed(&labels), r));
        let counts = m.latency.iter().map(get).collect();
        latency.histograms.push((
            borrowed(&labels),
            get(&m.latency_sum_us) as f64 / 1e6,
            counts,
        ));
        for b in &sites[*host].backends {
            let mut l = borrowed(&labels);
            l.push(("backend".into(), b.addr.to_string()));
            up.samples
                .push((l.clone(), f64::from(u8::from(b.healthy() && !b.ejected()))));
            outstanding.samples.push((l, b.outstanding() as f64));
        }
    }
    let mut bytes = Family::gauge("hangar_edge_cache", "Bytes stored per tier.", Some("bytes"));
    bytes.push(&[("tier", "memory")], cache_bytes.0 as f64);
    bytes.push(&[("tier", "disk")], cache_bytes.1 as f64);
    let mut objects = Family::gauge("hangar_edge_cache_objects", "Objects stored.", None);
    objects.push(&[], cache_objects as f64);
    out.extend([by_status, ratio, latency, up, outstanding, bytes, objects]);
    out
}
