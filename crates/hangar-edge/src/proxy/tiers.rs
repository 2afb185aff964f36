//! A fill's way up in a cluster: to the key's owner in the region, then
//! the super-region's, then the shield's (the tiers above what this edge
//! is for the request, [`crate::mesh::View::tiers`]), each owner falling
//! over to the next in hash order when it cannot be reached, and the
//! origin last. Each tier's edge coalesces its own misses, so a key cold
//! everywhere costs one origin request.

use super::*;
use crate::mesh::{Owner, Peer};

impl Edge {
    /// Fetch for a fill of `key` (its primary key) as `role`.
    pub(super) async fn climb(
        &self,
        site: &Arc<Site>,
        parts: Parts,
        role: Role,
        key: &str,
    ) -> Result<(Response<Incoming>, InFlight), ProxyError> {
        let view = self.mesh.view();
        let shield = site.config.cache.shield.as_deref();
        for tier in view.tiers(key, role, shield) {
            for owner in &tier.owners {
                let Owner::Peer(p) = owner else { break };
                match self.hop(p, &parts, tier.role, &view.config.token).await {
                    Ok(answer) => return Ok(answer),
                    Err(why) => {
                        tracing::debug!(peer = %p.config.name, tier = tier.role.name(), "hop failed: {why}");
                        p.failed();
                    }
                }
            }
        }
        self.send(site, parts, upstream::empty(), role).await
    }

    /// One request to another edge, marked as `role`. An error: nothing
    /// came back (the caller tries the next owner).
    async fn hop(
        &self,
        p: &Peer,
        parts: &Parts,
        role: Role,
        token: &str,
    ) -> Result<(Response<Incoming>, InFlight), String> {
        let mut parts = clone_parts(parts);
        let hop = mesh::hop_value(token, role).ok_or("the mesh token is not a header value")?;
        parts.headers.insert(mesh::HOP, hop);
        if !p.config.delay.is_zero() {
            tokio::time::sleep(p.config.delay).await;
        }
        let guard = p.backend.begin();
        let conn = upstream::checkout(
            &p.backend.pool,
            &p.backend.addrs,
            self.limits.connect_timeout,
        )
        .await
        .map_err(|e| e.to_string())?;
        let resp = conn
            .send(
                Request::from_parts(parts, upstream::empty()),
                self.limits.upstream_timeout,
                self.limits.connect_timeout,
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok((resp, guard))
    }
}
