//! `hangar-egress`: the egress proxy, so app code need not be vigilant about
//! every URL it fetches (server-side request forgery).
//!
//! Smokescreen-compatible: its v1 ACL ([`acl`]) decides by role and host; an
//! IP policy ([`ip`]) of hand-written special-purpose tables decides by the
//! address actually dialed; [`dns`] reads numeric forms and asks a configured
//! resolver; the [`proxy`] speaks HTTP absolute-form (pooling upstream
//! connections per checked address) and CONNECT. Roles come from
//! `Proxy-Authorization: Basic`, a client certificate's CN on the [`tls`]
//! listener, or, inside `hangar up`, a machine's source address.
//!
//! Key design decision: resolve once, check every candidate address, dial
//! only a checked one; nothing is ever dialed by name after the check.
//!
//! A data plane: it is handed an ACL, an IP policy and roles, and knows
//! nothing of the control plane.

#![forbid(unsafe_code)]

pub mod acl;
pub mod dns;
pub mod ip;
pub mod proxy;
pub mod splice;
pub mod tls;

pub use acl::Acl;
pub use ip::IpPolicy;
pub use proxy::Proxy;
