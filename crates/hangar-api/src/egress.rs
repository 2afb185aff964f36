//! What the node's egress proxy should enforce: each machine's role (its
//! app, else its name) by its addresses, and each role's rule from its
//! machines' `egress` config. Handed to an [`EgressControl`] as one value,
//! so the proxy swaps roles and rules together.

use std::collections::HashMap;
use std::net::IpAddr;

use crate::config::EgressAction;
use crate::routing::app_of;
use crate::store::Machine;

/// One role's rule (Smokescreen's fields).
#[derive(Clone, Debug, PartialEq)]
pub struct EgressRule {
    pub role: String,
    pub action: EgressAction,
    pub allowed_domains: Vec<String>,
}

/// The roles of the machines' addresses and the rules of the roles. A
/// source with no role here is unknown: the proxy enforces an empty allow
/// list for it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EgressPolicy {
    pub roles: HashMap<IpAddr, String>,
    pub rules: Vec<EgressRule>,
}

/// What the node needs of the egress proxy.
pub trait EgressControl: Send + Sync {
    /// Enforce `policy` from now on (requests in flight keep theirs).
    fn apply(&self, policy: EgressPolicy);
}

/// The policy of `machines`: a role's rule is its first machine's.
pub fn egress_policy(machines: &[Machine]) -> EgressPolicy {
    let mut policy = EgressPolicy::default();
    for m in machines {
        let role = app_of(m);
        let addr = hangar_machine::network::address(m.slot);
        policy.roles.insert(IpAddr::V4(addr.v4), role.clone());
        policy.roles.insert(IpAddr::V6(addr.v6), role.clone());
        if policy.rules.iter().any(|r| r.role == role) {
            continue;
        }
        policy.rules.push(EgressRule {
            role,
            action: m.config.egress.action,
            allowed_domains: m.config.egress.allowed_domains.clone(),
        });
    }
    policy
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Desired, MachineState};

    #[test]
    fn a_role_per_app_or_lone_machine_at_both_its_addresses() {
        let m = |id: &str, app: Option<&str>, slot: u32, action: EgressAction| Machine {
            id: id.into(),
            name: format!("{id}-name"),
            state: MachineState::Started,
            desired: Desired::Started,
            app: app.map(String::from),
            release: None,
            config: crate::MachineConfig {
                egress: crate::config::Egress {
                    action,
                    allowed_domains: vec![format!("{id}.test")],
                },
                ..Default::default()
            },
            slot,
            node: String::new(),
            region: String::new(),
            exit_code: None,
            oom_killed: false,
            restarts: 0,
            created_at: 0,
            updated_at: 0,
            revision: 0,
        };
        let policy = egress_policy(&[
            m("a", Some("web"), 258, EgressAction::Enforce),
            m("b", Some("web"), 259, EgressAction::Open),
            m("c", None, 2, EgressAction::Report),
        ]);
        assert_eq!(policy.roles.len(), 6);
        let a = hangar_machine::network::address(258);
        assert_eq!(policy.roles[&IpAddr::V4(a.v4)], "web");
        assert_eq!(policy.roles[&IpAddr::V6(a.v6)], "web");
        assert_eq!(
            policy.roles[&IpAddr::V4(hangar_machine::network::address(2).v4)],
            "c-name"
        );
        // The app's rule is its first machine's.
        assert_eq!(
            policy.rules,
            [
                EgressRule {
                    role: "web".into(),
                    action: EgressAction::Enforce,
                    allowed_domains: vec!["a.test".into()]
                },
                EgressRule {
                    role: "c-name".into(),
                    action: EgressAction::Report,
                    allowed_domains: vec!["c.test".into()]
                }
            ]
        );
    }
}
