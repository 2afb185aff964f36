//! Hosts and their backends: the routing table (swapped whole when the
//! configuration changes, keeping each surviving backend's pool and health),
//! least-outstanding-requests balancing by the power of two choices,
//! active health checks, and passive ejection of backends that fail or
//! become slow compared with their peers.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::config::{Health, Host};
use crate::metrics::HostMetrics;
use crate::upstream::{self, Pool};

/// Successful responses needed before latency can eject a backend.
const SLOW_MIN_SAMPLES: u64 = 20;

pub struct Backend {
    /// The backend's address (its name in metrics and pages)...
    pub addr: SocketAddr,
    /// ...first of the addresses a connection tries (see `Host::alternates`).
    pub addrs: Arc<[SocketAddr]>,
    outstanding: AtomicU32,
    pub pool: Arc<Pool>,
    health: Mutex<HealthState>,
    /// The host's: told when a request of this backend finishes.
    slots: Arc<Slots>,
    /// What it answered (a deploy compares a new release's machines with
    /// the old ones' by these).
    pub answers: BackendAnswers,
}

/// A backend's answers by status class, the attempts it never answered,
/// and the time to its response heads (per bucket of
/// [`crate::metrics::BUCKETS`], the last for slower ones).
#[derive(Default)]
pub struct BackendAnswers {
    classes: [AtomicU64; 5],
    failed: AtomicU64,
    latency: [AtomicU64; crate::metrics::BUCKETS.len() + 1],
}

/// A reading of [`BackendAnswers`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Answers {
    /// 1xx to 5xx.
    pub classes: [u64; 5],
    /// Attempts that got no answer (refused, reset, timed out).
    pub failed: u64,
    /// Per bucket of [`crate::metrics::BUCKETS`], then `+Inf`.
    pub latency: Vec<u64>,
}

impl BackendAnswers {
    pub fn answered(&self, status: u16, took: Duration) {
        if let Some(c) = self.classes.get(usize::from(status / 100).wrapping_sub(1)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        let s = took.as_secs_f64();
        let i = crate::metrics::BUCKETS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(crate::metrics::BUCKETS.len());
        self.latency[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn failed(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }

    pub fn read(&self) -> Answers {
        Answers {
            classes: std::array::from_fn(|i| self.classes[i].load(Ordering::Relaxed)),
            failed: self.failed.load(Ordering::Relaxed),
            latency: self
                .latency
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
        }
    }
}

/// Requests waiting for a backend of a host to have room (all at their
/// hard limit), woken when any request of the host finishes.
#[derive(Default)]
pub struct Slots {
    freed: tokio::sync::Notify,
    waiting: AtomicU32,
}

impl Slots {
    /// Wait until a request of the host finishes or `until` passes; returns
    /// at once if `room()` already holds once this waiter is registered (so
    /// a request finishing in between is not missed).
    pub async fn wait(&self, until: Instant, room: impl Fn() -> bool) {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let freed = self.freed.notified();
        tokio::pin!(freed);
        freed.as_mut().enable();
        if !room() {
            let _ = tokio::time::timeout_at(until.into(), freed).await;
        }
        self.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Debug)]
struct HealthState {
    /// The active checks' verdict (true when there are none).
    active_ok: bool,
    passes: u32,
    fails: u32,
    consecutive_failures: u32,
    ejected_until: Option<Instant>,
    /// Moving average of the time to a response head, in ms.
    ewma_ms: f64,
    samples: u64,
    /// Why the backend is out, for error pages and metrics.
    reason: String,
}

impl Backend {
    pub(crate) fn new(addr: SocketAddr, alternates: &[SocketAddr], slots: Arc<Slots>) -> Backend {
        Backend {
            addr,
            addrs: std::iter::once(addr)
                .chain(alternates.iter().copied())
                .collect(),
            slots,
            answers: BackendAnswers::default(),
            outstanding: AtomicU32::new(0),
            pool: Arc::new(Pool::default()),
            health: Mutex::new(HealthState {
                active_ok: true,
                passes: 0,
                fails: 0,
                consecutive_failures: 0,
                ejected_until: None,
                ewma_ms: 0.0,
                samples: 0,
                reason: String::new(),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.health.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn outstanding(&self) -> u32 {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// Passes active checks.
    pub fn healthy(&self) -> bool {
        self.state().active_ok
    }

    /// Healthy and not ejected.
    pub fn available(&self) -> bool {
        let mut s = self.state();
        if let Some(until) = s.ejected_until {
            if Instant::now() < until {
                return false;
            }
            // Back on probation with a clean slate.
            s.ejected_until = None;
            s.consecutive_failures = 0;
            s.samples = 0;
            s.ewma_ms = 0.0;
        }
        s.active_ok
    }

    pub fn ejected(&self) -> bool {
        self.state()
            .ejected_until
            .is_some_and(|u| Instant::now() < u)
    }

    pub fn latency_ms(&self) -> f64 {
        self.state().ewma_ms
    }

    pub fn reason(&self) -> String {
        self.state().reason.clone()
    }

    /// Count a request as outstanding until the guard drops.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }
}

pub struct InFlight(Arc<Backend>);

impl InFlight {
    /// The backend the request went to.
    pub fn addr(&self) -> SocketAddr {
        self.0.addr
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::SeqCst);
        if self.0.slots.waiting.load(Ordering::SeqCst) > 0 {
            self.0.slots.freed.notify_waiters();
        }
    }
}

/// How one other region's edges serve one app: a fast and a slow moving
/// average of its answers' latency, failures in a row, and an ejection
/// with a gradual return.
#[derive(Debug, Default, Clone)]
pub struct RemoteHealth {
    fast_ms: f64,
    slow_ms: f64,
    samples: u64,
    failures: u32,
    ejected_until: Option<Instant>,
    /// Ejections in a row: each lasts twice the last (up to a minute).
    ejections: u32,
    /// When it came back: its share of requests grows over `RAMP`.
    back_at: Option<Instant>,
}

/// A region whose answers for an app fail this many times in a row is
/// avoided for a while.
const REMOTE_FAILURES: u32 = 3;
/// Answers needed before latency can eject a node.
const REMOTE_MIN_SAMPLES: u64 = 3;
/// The first ejection; later ones double, up to `REMOTE_EJECT_MAX`.
const REMOTE_EJECT: Duration = Duration::from_secs(5);
const REMOTE_EJECT_MAX: Duration = Duration::from_secs(60);
/// After an ejection a node's share of requests grows from none to all
/// over this long (no thundering return).
const RAMP: Duration = Duration::from_secs(10);

/// One host: its configuration, backends and counters.
pub struct Site {
    pub config: Host,
    pub backends: Vec<Arc<Backend>>,
    pub metrics: Arc<HostMetrics>,
    /// Kept across table swaps, like the metrics and the backends.
    pub slots: Arc<Slots>,
    /// The rate limiters, for the share of the region's edges they were
    /// made for (kept across swaps while the limits stay the same).
    pub limiters: Mutex<Option<(u32, Arc<crate::limit::Limiters>)>>,
    /// How the other regions' edges serve this app, by region (see
    /// [`Site::remote_usable`]); kept across swaps.
    pub remote: Arc<Mutex<HashMap<String, RemoteHealth>>>,
    checks: Option<tokio::task::AbortHandle>,
}

impl Drop for Site {
    fn drop(&mut self) {
        if let Some(c) = &self.checks {
            c.abort();
        }
    }
}

static SEED: AtomicU64 = AtomicU64::new(0x9E37_79B9_7F4A_7C15);

fn random() -> u64 {
    // xorshift on a shared seed: fast, good enough to pick two backends.
    let mut x = SEED.load(Ordering::Relaxed);
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    SEED.store(x, Ordering::Relaxed);
    x
}

impl Site {
    /// Whether a request may go to an edge of `region` now: not ejected,
    /// and while it returns from an ejection, a growing share of requests.
    /// Regions fail by getting slow, so they are judged whole.
    pub fn remote_usable(&self, region: &str) -> bool {
        let node = region;
        let mut all = self.remote.lock().unwrap_or_else(|e| e.into_inner());
        let Some(h) = all.get_mut(node) else {
            return true;
        };
        let now = Instant::now();
        if let Some(until) = h.ejected_until {
            if now < until {
                return false;
            }
            h.ejected_until = None;
            h.back_at = Some(now);
            h.samples = 0;
            h.failures = 0;
        }
        match h.back_at {
            Some(at) if now.duration_since(at) < RAMP => {
                let share = now.duration_since(at).as_secs_f64() / RAMP.as_secs_f64();
                (random() % 1000) as f64 / 1000.0 < share.max(0.05)
            }
            Some(_) => {
                h.back_at = None;
                h.ejections = 0;
                true
            }
            None => true,
        }
    }

    /// How a request through an edge of `region` went: its latency to the
    /// answer, or `None` when it failed (or that edge had nothing to serve
    /// with). A region much slower than it was (or than the app's other
    /// regions), or failing, is ejected: within a few answers.
    pub fn remote_result(&self, region: &str, latency: Option<Duration>) {
        let node = region;
        let h_cfg = &self.config.health;
        let mut all = self.remote.lock().unwrap_or_else(|e| e.into_inner());
        let others: Vec<f64> = all
            .iter()
            .filter(|(n, h)| {
                n.as_str() != node && h.samples >= REMOTE_MIN_SAMPLES && h.ejected_until.is_none()
            })
            .map(|(_, h)| h.fast_ms)
            .collect();
        let h = all.entry(node.to_string()).or_default();
        let slow = match latency {
            None => {
                h.failures += 1;
                h.failures >= REMOTE_FAILURES
            }
            Some(l) => {
                let ms = l.as_secs_f64() * 1000.0;
                h.failures = 0;
                if h.samples == 0 {
                    (h.fast_ms, h.slow_ms) = (ms, ms);
                } else {
                    h.fast_ms = h.fast_ms * 0.7 + ms * 0.3;
                    h.slow_ms = h.slow_ms * 0.98 + ms * 0.02;
                }
                h.samples += 1;
                let baseline = others.iter().copied().fold(h.slow_ms, f64::min);
                h.samples >= REMOTE_MIN_SAMPLES
                    && h.fast_ms > h_cfg.slow_floor.as_secs_f64() * 1000.0
                    && h.fast_ms > baseline * h_cfg.slow_ratio
            }
        };
        if slow {
            let eject = REMOTE_EJECT
                .saturating_mul(1 << h.ejections.min(4))
                .min(REMOTE_EJECT_MAX);
            h.ejected_until = Some(Instant::now() + eject);
            h.ejections += 1;
            h.back_at = None;
            h.samples = 0;
            h.failures = 0;
            self.metrics.ejections.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Its rate limiters at one of `share` edges of the region.
    pub fn limiters(&self, share: u32) -> Arc<crate::limit::Limiters> {
        let mut l = self.limiters.lock().unwrap_or_else(|e| e.into_inner());
        match &*l {
            Some((s, lim)) if *s == share => lim.clone(),
            _ => {
                let lim = Arc::new(crate::limit::Limiters::new(&self.config.rate_limit, share));
                *l = Some((share, lim.clone()));
                lim
            }
        }
    }

    /// Pick a backend: of two random available ones, the one with fewer
    /// outstanding requests. Backends below the soft
    /// limit come first; one at or above it gets a request only when all
    /// are; one at its hard limit gets none. `exclude` holds backends
    /// already tried for this request. When every backend is ejected but
    /// some pass their checks, those are used anyway (a bad signal must not
    /// take the whole app down). `None`: nothing healthy.
    pub fn pick(&self, exclude: &[SocketAddr]) -> Option<Arc<Backend>> {
        let (soft, hard) = (self.config.soft_limit, self.config.hard_limit);
        let room = |b: &Backend| hard == 0 || b.outstanding() < hard;
        let candidates = |f: &dyn Fn(&Backend) -> bool| -> Vec<&Arc<Backend>> {
            self.backends
                .iter()
                .filter(|b| !exclude.contains(&b.addr) && room(b) && f(b))
                .collect()
        };
        let mut c = Vec::new();
        if soft > 0 {
            c = candidates(&|b| b.available() && b.outstanding() < soft);
        }
        if c.is_empty() {
            c = candidates(&|b| b.available());
        }
        if c.is_empty() {
            c = candidates(&|b| b.healthy());
        }
        match c.len() {
            0 => None,
            1 => Some(c[0].clone()),
            n => {
                let r = random();
                let i = (r % n as u64) as usize;
                let mut j = ((r >> 32) % (n as u64 - 1)) as usize;
                if j >= i {
                    j += 1;
                }
                // `a` is the first of a random pair: a tie goes either way.
                // (Not to the lower latency: at low load that would starve
                // whichever backend happened to answer slowest once, since
                // its average only moves when it serves; slow backends are
                // ejected instead, relative to their peers.)
                let (a, b) = (c[i], c[j]);
                Some(
                    if a.outstanding() <= b.outstanding() {
                        a
                    } else {
                        b
                    }
                    .clone(),
                )
            }
        }
    }

    /// Passive health: a request to `backend` succeeded in `latency`.
    pub fn record_success(&self, backend: &Backend, latency: Duration) {
        let h = &self.config.health;
        let ms = latency.as_secs_f64() * 1000.0;
        let ewma = {
            let mut s = backend.state();
            s.consecutive_failures = 0;
            s.ewma_ms = if s.samples == 0 {
                ms
            } else {
                s.ewma_ms * 0.9 + ms * 0.1
            };
            s.samples += 1;
            if s.samples < SLOW_MIN_SAMPLES {
                return;
            }
            s.ewma_ms
        };
        if ewma < h.slow_floor.as_secs_f64() * 1000.0 {
            return;
        }
        // Compare with the peers that are in service.
        let mut peers: Vec<f64> = self
            .backends
            .iter()
            .filter(|b| b.addr != backend.addr && b.available())
            .map(|b| b.latency_ms())
            .filter(|l| *l > 0.0)
            .collect();
        if peers.is_empty() {
            return;
        }
        peers.sort_by(|a, b| a.total_cmp(b));
        let median = peers[peers.len() / 2];
        if ewma > median * h.slow_ratio {
            eject(
                backend,
                h,
                format!("slow: {ewma:.0} ms against its peers' {median:.0} ms"),
            );
            self.metrics.ejections.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Passive health: a request to `backend` failed (connect error,
    /// timeout, broken response).
    pub fn record_failure(&self, backend: &Backend, why: &str) {
        let h = &self.config.health;
        let n = {
            let mut s = backend.state();
            s.consecutive_failures += 1;
            s.consecutive_failures
        };
        if n >= h.max_failures.max(1) {
            eject(backend, h, format!("{n} failures in a row, last: {why}"));
            self.metrics.ejections.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn eject(backend: &Backend, h: &Health, reason: String) {
    let mut s = backend.state();
    s.ejected_until = Some(Instant::now() + h.eject_for);
    s.reason = reason;
    drop(s);
    backend.pool.clear();
}

/// The routing table: host name -> site.
#[derive(Default)]
pub struct Routes {
    sites: RwLock<Arc<HashMap<String, Arc<Site>>>>,
}

impl Routes {
    pub fn get(&self, host: &str) -> Option<Arc<Site>> {
        self.sites
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(host)
            .cloned()
    }

    pub fn all(&self) -> Arc<HashMap<String, Arc<Site>>> {
        self.sites.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replace the table. Unchanged hosts are kept as they are; a backend
    /// that stays keeps its pool, counters and health. Requests in flight
    /// finish on the table they started with. Must run inside a Tokio
    /// runtime (it starts the active health checks).
    pub fn set(&self, hosts: &[Host]) {
        let old = self.all();
        let mut new = HashMap::with_capacity(hosts.len());
        for host in hosts {
            let name = host.name.to_ascii_lowercase();
            if let Some(site) = old.get(&name) {
                if site.config == *host {
                    new.insert(name, site.clone());
                    continue;
                }
            }
            let previous = old.get(&name);
            let slots = previous.map(|s| s.slots.clone()).unwrap_or_default();
            let backends: Vec<Arc<Backend>> = host
                .backends
                .iter()
                .map(|addr| {
                    let alternates = host.alternates.get(addr).map(Vec::as_slice).unwrap_or(&[]);
                    previous
                        .and_then(|s| {
                            s.backends
                                .iter()
                                .find(|b| b.addr == *addr && b.addrs[1..] == *alternates)
                                .cloned()
                        })
                        .unwrap_or_else(|| Arc::new(Backend::new(*addr, alternates, slots.clone())))
                })
                .collect();
            let metrics = previous.map(|s| s.metrics.clone()).unwrap_or_default();
            let remote = previous.map(|s| s.remote.clone()).unwrap_or_default();
            let limiters = previous
                .filter(|s| s.config.rate_limit == host.rate_limit)
                .and_then(|s| s.limiters.lock().unwrap_or_else(|e| e.into_inner()).clone());
            let checks = host.health.path.as_ref().map(|path| {
                tokio::spawn(check_loop(
                    backends.clone(),
                    host.health.clone(),
                    path.clone(),
                    name.clone(),
                ))
                .abort_handle()
            });
            new.insert(
                name,
                Arc::new(Site {
                    config: host.clone(),
                    backends,
                    metrics,
                    slots,
                    checks,
                    limiters: Mutex::new(limiters),
                    remote,
                }),
            );
        }
        let changed: Vec<Arc<Slots>> = new
            .iter()
            .filter(|(name, site)| old.get(*name).is_none_or(|o| !Arc::ptr_eq(o, site)))
            .map(|(_, site)| site.slots.clone())
            .collect();
        *self.sites.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
        // Requests waiting for room may find it among new backends.
        for slots in changed {
            slots.freed.notify_waiters();
        }
    }
}

/// Active checks: `GET path` on every backend each interval.
async fn check_loop(backends: Vec<Arc<Backend>>, h: Health, path: String, host: String) {
    let mut tick = tokio::time::interval(h.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let checks = backends.iter().map(|b| {
            let (path, host) = (path.clone(), host.clone());
            async move {
                let result = check(b, &path, &host, h.timeout).await;
                let mut s = b.state();
                match result {
                    Ok(()) => {
                        s.fails = 0;
                        s.passes += 1;
                        if !s.active_ok && s.passes >= h.healthy_threshold.max(1) {
                            s.active_ok = true;
                            s.reason.clear();
                        }
                    }
                    Err(why) => {
                        s.passes = 0;
                        s.fails += 1;
                        if s.active_ok && s.fails >= h.unhealthy_threshold.max(1) {
                            s.active_ok = false;
                        }
                        if !s.active_ok {
                            s.reason = format!("failing its health check: {why}");
                        }
                    }
                }
            }
        });
        futures_util::future::join_all(checks).await;
    }
}

async fn check(b: &Backend, path: &str, host: &str, timeout: Duration) -> Result<(), String> {
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, host)
        .header(hyper::header::USER_AGENT, "hangar-edge-health")
        .body(upstream::empty())
        .map_err(|e| e.to_string())?;
    let conn = upstream::checkout(&b.pool, &b.addrs, timeout)
        .await
        .map_err(|e| e.to_string())?;
    let resp = conn
        .send(req, timeout, timeout)
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    // Drain the body so the connection can be reused.
    let _ = tokio::time::timeout(timeout, http_body_util::BodyExt::collect(resp.into_body())).await;
    if status.is_success() || status.is_redirection() {
        Ok(())
    } else {
        Err(format!("GET {path} answered {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(n: usize) -> Site {
        let mut config = Host {
            name: "a".into(),
            ..Default::default()
        };
        config.health.eject_for = Duration::from_secs(60);
        Site {
            backends: (0..n)
                .map(|i| {
                    Arc::new(Backend::new(
                        SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16)),
                        &[],
                        Default::default(),
                    ))
                })
                .collect(),
            config,
            metrics: Default::default(),
            slots: Default::default(),
            checks: None,
            limiters: Default::default(),
            remote: Default::default(),
        }
    }

    #[test]
    fn a_slow_or_failing_node_is_avoided_then_comes_back_gradually() {
        let s = site(0);
        let ms = Duration::from_millis;
        for _ in 0..10 {
            s.remote_result("fra-1", Some(ms(20)));
        }
        assert!(s.remote_usable("fra-1"));
        // Slow: out within two answers.
        s.remote_result("fra-1", Some(ms(600)));
        s.remote_result("fra-1", Some(ms(600)));
        assert!(!s.remote_usable("fra-1"), "{:?}", s.remote.lock().unwrap());
        // Failing: out after three in a row.
        s.remote_result("ams-1", None);
        s.remote_result("ams-1", None);
        assert!(s.remote_usable("ams-1"));
        s.remote_result("ams-1", None);
        assert!(!s.remote_usable("ams-1"));
        // Back: a small share at first, a growing one, then all of it.
        let share = |back: Duration| {
            {
                let mut all = s.remote.lock().unwrap();
                let h = all.get_mut("ams-1").unwrap();
                h.ejected_until = None;
                h.back_at = Some(Instant::now() - back);
            }
            (0..2000).filter(|_| s.remote_usable("ams-1")).count() as f64 / 2000.0
        };
        let (early, mid) = (share(Duration::ZERO), share(Duration::from_secs(5)));
        assert!(early < 0.15, "{early}");
        assert!((0.35..0.65).contains(&mid), "{mid}");
        assert_eq!(share(Duration::from_secs(11)), 1.0);
        // A node not seen yet is usable.
        assert!(s.remote_usable("lon-1"));
    }

    #[test]
    fn two_choices_prefer_fewer_outstanding() {
        let s = site(2);
        let _busy: Vec<_> = (0..5).map(|_| s.backends[0].begin()).collect();
        for _ in 0..20 {
            assert_eq!(s.pick(&[]).unwrap().addr, s.backends[1].addr);
        }
        assert_eq!(
            s.pick(&[s.backends[1].addr]).unwrap().addr,
            s.backends[0].addr,
            "exclusion"
        );
        assert!(s.pick(&[s.backends[0].addr, s.backends[1].addr]).is_none());
    }

    #[test]
    fn at_equal_load_every_backend_gets_requests() {
        let s = site(3);
        // One answered slowly once; at no load it still gets its share.
        s.record_success(&s.backends[0], Duration::from_millis(90));
        s.record_success(&s.backends[1], Duration::from_millis(1));
        s.record_success(&s.backends[2], Duration::from_millis(2));
        let mut counts = [0; 3];
        for _ in 0..300 {
            let b = s.pick(&[]).unwrap();
            counts[s.backends.iter().position(|x| x.addr == b.addr).unwrap()] += 1;
        }
        assert!(counts.iter().all(|&n| n > 50), "{counts:?}");
    }

    #[test]
    fn a_backend_at_its_hard_limit_takes_no_more() {
        let mut s = site(2);
        s.config.hard_limit = 2;
        let _a: Vec<_> = (0..2).map(|_| s.backends[0].begin()).collect();
        for _ in 0..20 {
            assert_eq!(s.pick(&[]).unwrap().addr, s.backends[1].addr);
        }
        let _b: Vec<_> = (0..2).map(|_| s.backends[1].begin()).collect();
        assert!(s.pick(&[]).is_none(), "every backend is full");
    }

    #[test]
    fn backends_under_the_soft_limit_come_first() {
        let mut s = site(3);
        s.config.soft_limit = 2;
        // 0 and 1 at or past the soft limit, 2 under it: two random choices
        // alone would often pick between 0 and 1.
        let _a: Vec<_> = (0..2).map(|_| s.backends[0].begin()).collect();
        let _b: Vec<_> = (0..3).map(|_| s.backends[1].begin()).collect();
        let _c = s.backends[2].begin();
        for _ in 0..50 {
            assert_eq!(s.pick(&[]).unwrap().addr, s.backends[2].addr);
        }
        // All at the soft limit: fewer outstanding of two random ones.
        let _c2 = s.backends[2].begin();
        let picked: std::collections::HashSet<_> =
            (0..100).map(|_| s.pick(&[]).unwrap().addr).collect();
        assert!(picked.contains(&s.backends[0].addr), "{picked:?}");
        assert!(picked.contains(&s.backends[2].addr), "{picked:?}");
    }

    #[test]
    fn failures_eject_and_all_ejected_still_serves() {
        let s = site(2);
        for _ in 0..3 {
            s.record_failure(&s.backends[0], "refused");
        }
        assert!(s.backends[0].ejected());
        for _ in 0..20 {
            assert_eq!(s.pick(&[]).unwrap().addr, s.backends[1].addr);
        }
        for _ in 0..3 {
            s.record_failure(&s.backends[1], "refused");
        }
        assert!(
            s.pick(&[]).is_some(),
            "all ejected: still try the healthy ones"
        );
        s.backends[0].state().active_ok = false;
        s.backends[1].state().active_ok = false;
        assert!(s.pick(&[]).is_none(), "nothing passes its checks");
    }

    #[test]
    fn a_slow_backend_is_ejected_relative_to_its_peers() {
        let s = site(3);
        for _ in 0..30 {
            s.record_success(&s.backends[1], Duration::from_millis(5));
            s.record_success(&s.backends[2], Duration::from_millis(6));
        }
        for _ in 0..19 {
            s.record_success(&s.backends[0], Duration::from_millis(400));
        }
        assert!(!s.backends[0].ejected(), "not before enough samples");
        s.record_success(&s.backends[0], Duration::from_millis(400));
        assert!(s.backends[0].ejected());
        assert!(s.backends[0].reason().starts_with("slow"));
        // Uniformly slow peers eject nobody.
        let s = site(2);
        for _ in 0..30 {
            s.record_success(&s.backends[0], Duration::from_millis(400));
            s.record_success(&s.backends[1], Duration::from_millis(400));
        }
        assert!(!s.backends[0].ejected() && !s.backends[1].ejected());
    }
}
