//! Smokescreen's ACL, v1 YAML read as is, and its decision order:
//! global deny list, then the role's rule (or `default`), global allow list,
//! the rule's `allowed_domains`, and finally the rule's action (`open`
//! allows, `report` allows and logs that enforce would deny, `enforce`
//! denies). Domain globs are exact names or a leading `*.`, which matches
//! subdomains only (`*.x.com` does not match `x.com`).

use std::path::Path;

use serde::Deserialize;

/// What a rule does with hosts not on its list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Open,
    Report,
    Enforce,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub project: String,
    pub action: Action,
    #[serde(default)]
    pub allowed_domains: Vec<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    version: String,
    #[serde(default)]
    services: Vec<Rule>,
    default: Option<Rule>,
    #[serde(default)]
    global_allow_list: Vec<String>,
    #[serde(default)]
    global_deny_list: Vec<String>,
}

/// A loaded, validated ACL.
#[derive(Clone, Debug)]
pub struct Acl {
    services: Vec<Rule>,
    default: Option<Rule>,
    global_allow: Vec<String>,
    global_deny: Vec<String>,
}

/// The outcome for one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allow: bool,
    /// Allowed only because the rule reports instead of enforcing.
    pub enforce_would_deny: bool,
    pub project: String,
    pub reason: &'static str,
}

fn normalize(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

fn matches(host: &str, globs: &[String]) -> bool {
    let host = normalize(host);
    globs.iter().any(|g| match g.strip_prefix("*.") {
        Some(suffix) => {
            host.len() > suffix.len() + 1
                && host.ends_with(suffix)
                && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
        }
        None => host == *g,
    })
}

/// The 1-based line of the first occurrence of `needle` in `text`.
fn line_of(text: &str, needle: &str) -> usize {
    text.find(needle)
        .map(|i| text[..i].lines().count().max(1))
        .unwrap_or(1)
}

fn check_glob(text: &str, path: &str, glob: &str) -> Result<String, String> {
    let g = normalize(glob);
    let body = g.strip_prefix("*.").unwrap_or(&g);
    let ok = !body.is_empty()
        && !body.contains('*')
        && body.split('.').all(|l| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if ok {
        Ok(g)
    } else {
        Err(format!(
            "{path}:{}: domain {glob:?}: globs may only be a leading \"*.\" before a full domain, like *.example.com",
            line_of(text, glob)
        ))
    }
}

impl Acl {
    /// Parse an ACL file's text; `path` names it in errors (with the line).
    pub fn parse(text: &str, path: &str) -> Result<Acl, String> {
        let file: File = serde_yaml::from_str(text).map_err(|e| match e.location() {
            Some(l) => format!("{path}:{}: {e}", l.line()),
            None => format!("{path}: {e}"),
        })?;
        if file.version != "v1" {
            return Err(format!(
                "{path}:{}: version {:?} is not supported; use v1",
                line_of(text, "version"),
                file.version
            ));
        }
        let fix = |globs: &[String]| {
            globs
                .iter()
                .map(|g| check_glob(text, path, g))
                .collect::<Result<Vec<_>, _>>()
        };
        let mut services = Vec::new();
        for rule in &file.services {
            if rule.name.is_empty() {
                return Err(format!(
                    "{path}:{}: a service has no name",
                    line_of(text, "services")
                ));
            }
            if services.iter().any(|r: &Rule| r.name == rule.name) {
                return Err(format!(
                    "{path}:{}: service {:?} is listed twice",
                    line_of(text, &rule.name),
                    rule.name
                ));
            }
            services.push(Rule {
                allowed_domains: fix(&rule.allowed_domains)?,
                ..rule.clone()
            });
        }
        let default = match &file.default {
            Some(r) => Some(Rule {
                allowed_domains: fix(&r.allowed_domains)?,
                ..r.clone()
            }),
            None => None,
        };
        Ok(Acl {
            services,
            default,
            global_allow: fix(&file.global_allow_list)?,
            global_deny: fix(&file.global_deny_list)?,
        })
    }

    /// An ACL from rules built in code (by `hangar up`, from machine configs).
    pub fn from_rules(services: Vec<Rule>, default: Option<Rule>) -> Result<Acl, String> {
        let fix = |r: Rule| -> Result<Rule, String> {
            let allowed_domains = r
                .allowed_domains
                .iter()
                .map(|g| check_glob("", &format!("rule {}", r.name), g))
                .collect::<Result<_, _>>()?;
            Ok(Rule {
                allowed_domains,
                ..r
            })
        };
        Ok(Acl {
            services: services.into_iter().map(fix).collect::<Result<_, _>>()?,
            default: default.map(fix).transpose()?,
            global_allow: Vec::new(),
            global_deny: Vec::new(),
        })
    }

    pub fn load(path: &Path) -> Result<Acl, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Acl::parse(&text, &path.display().to_string())
    }

    /// An ACL that lets everything through (no file given).
    pub fn open() -> Acl {
        Acl {
            services: Vec::new(),
            default: Some(Rule {
                name: String::new(),
                project: String::new(),
                action: Action::Open,
                allowed_domains: Vec::new(),
            }),
            global_allow: Vec::new(),
            global_deny: Vec::new(),
        }
    }

    /// Decide for `role` (None: no or unknown identity) requesting `host`.
    pub fn decide(&self, role: Option<&str>, host: &str) -> Decision {
        let deny = |project: &str, reason| Decision {
            allow: false,
            enforce_would_deny: false,
            project: project.to_string(),
            reason,
        };
        if matches(host, &self.global_deny) {
            return deny("", "host matched rule in global deny list");
        }
        let rule = role
            .and_then(|r| self.services.iter().find(|s| s.name == r))
            .or(self.default.as_ref());
        let Some(rule) = rule else {
            return deny("", "role has no rule and the ACL has no default");
        };
        let allow = |reason| Decision {
            allow: true,
            enforce_would_deny: false,
            project: rule.project.clone(),
            reason,
        };
        if matches(host, &self.global_allow) {
            return allow("host matched rule in global allow list");
        }
        if matches(host, &rule.allowed_domains) {
            return allow("host matched allowed domain in rule");
        }
        match rule.action {
            Action::Open => allow("rule has open policy"),
            Action::Report => Decision {
                allow: true,
                enforce_would_deny: true,
                project: rule.project.clone(),
                reason: "rule has report policy; not on the list",
            },
            Action::Enforce => deny(
                &rule.project,
                "host is not on the rule's allowed domains (enforce)",
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACL: &str = "---
version: v1
services:
  - name: authed
    project: users
    action: report
  - name: strict
    project: payments
    action: enforce
    allowed_domains:
      - api.stripe.com
      - \"*.example.com\"
default:
    project: other
    action: enforce
global_allow_list:
  - status.example.org
global_deny_list:
  - evil.example.com
";

    #[test]
    fn decisions_follow_smokescreens_order() {
        let acl = Acl::parse(ACL, "acl.yaml").unwrap();
        let d = acl.decide(Some("strict"), "api.stripe.com");
        assert!(d.allow && d.project == "payments");
        assert!(acl.decide(Some("strict"), "a.b.example.com").allow);
        assert!(
            !acl.decide(Some("strict"), "example.com").allow,
            "*.x.com does not match x.com"
        );
        assert!(!acl.decide(Some("strict"), "notexample.com").allow);
        assert!(
            !acl.decide(Some("strict"), "evil.example.com").allow,
            "global deny beats the rule"
        );
        assert!(
            acl.decide(Some("strict"), "status.example.org").allow,
            "global allow"
        );
        let r = acl.decide(Some("authed"), "anything.net");
        assert!(r.allow && r.enforce_would_deny);
        let d = acl.decide(None, "anything.net");
        assert!(!d.allow && d.project == "other");
        assert!(
            !acl.decide(Some("nobody"), "anything.net").allow,
            "unknown roles fall to default"
        );
        assert!(
            acl.decide(None, "STATUS.example.org.").allow,
            "names are compared normalized"
        );
    }

    #[test]
    fn invalid_files_name_the_line() {
        let bad_glob = ACL.replace("\"*.example.com\"", "\"api.*.com\"");
        let err = Acl::parse(&bad_glob, "acl.yaml").unwrap_err();
        assert!(err.starts_with("acl.yaml:12:"), "{err}");
        let bad_action = ACL.replace("action: report", "action: maybe");
        let err = Acl::parse(&bad_action, "acl.yaml").unwrap_err();
        assert!(
            err.starts_with("acl.yaml:6:") && err.contains("maybe"),
            "{err}"
        );
        let unknown = ACL.replace("project: users", "projekt: users");
        assert!(Acl::parse(&unknown, "acl.yaml")
            .unwrap_err()
            .contains("projekt"));
        assert!(Acl::parse("version: v2\n", "a").unwrap_err().contains("v2"));
    }
}
