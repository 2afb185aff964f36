//! Per-app rate limits at the edge: token buckets (the `governor` crate's
//! GCRA) for the app as a whole and for each client address, refusing past
//! them with how long until a request would pass (a 429's `Retry-After`).
//!
//! Counted per region: a region's edges share the app's rate evenly, so
//! the region as a whole lets about that rate through; a client's rate is
//! counted at each edge it reaches. Only a client's request is counted,
//! at the first edge (a hop between edges was counted there).

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::RateLimit;

/// How many checks between sweeps of clients whose buckets are full again.
const SWEEP_EVERY: u64 = 4096;

pub struct Limiters {
    app: Option<DefaultDirectRateLimiter>,
    clients: Option<DefaultKeyedRateLimiter<IpAddr>>,
    checks: AtomicU64,
}

/// `rate` per second with `burst` (0: one second's worth); none for 0.
fn quota(rate: u32, burst: u32) -> Option<Quota> {
    let rate = NonZeroU32::new(rate)?;
    Some(Quota::per_second(rate).allow_burst(NonZeroU32::new(burst).unwrap_or(rate)))
}

impl Limiters {
    /// The limits of `limit` at one of `share` edges of a region.
    pub fn new(limit: &RateLimit, share: u32) -> Limiters {
        let share = share.max(1);
        let part = |n: u32| n.div_ceil(share);
        Limiters {
            app: quota(part(limit.per_app), part(limit.per_app_burst)).map(RateLimiter::direct),
            clients: quota(limit.per_client, limit.per_client_burst).map(RateLimiter::keyed),
            checks: AtomicU64::new(0),
        }
    }

    /// Let a request of `client` through, or say how long until one would
    /// pass.
    pub fn check(&self, client: IpAddr) -> Result<(), Duration> {
        let clock = DefaultClock::default();
        if let Some(clients) = &self.clients {
            if self.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
                clients.retain_recent();
            }
            clients
                .check_key(&client)
                .map_err(|no| no.wait_time_from(clock.now()))?;
        }
        if let Some(app) = &self.app {
            app.check().map_err(|no| no.wait_time_from(clock.now()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_for_the_app_and_each_client_with_the_regions_share() {
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let l = Limiters::new(
            &RateLimit {
                per_client: 2,
                per_client_burst: 3,
                ..Default::default()
            },
            1,
        );
        for _ in 0..3 {
            assert!(l.check(a).is_ok(), "the burst passes");
        }
        let wait = l.check(a).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        assert!(l.check(b).is_ok(), "another client has its own bucket");
        // The app's 10/s shared by 2 edges: 5 here.
        let l = Limiters::new(
            &RateLimit {
                per_app: 10,
                ..Default::default()
            },
            2,
        );
        let passed = (0..20)
            .filter(|i| l.check([10, 0, 1, *i as u8].into()).is_ok())
            .count();
        assert_eq!(passed, 5);
        // No limits: everything passes.
        let l = Limiters::new(&RateLimit::default(), 3);
        assert!((0..1000).all(|_| l.check(a).is_ok()));
    }
}
