//! Who may do what: repository names, the authorizer's decisions, and the
//! token endpoint.

use hangar_oci::reference::valid_repository;
use hyper::StatusCode;

use crate::auth::{org_of, Action, Caller, Grant};
use crate::error::ApiError;

use super::http::*;
use super::Registry;

impl Registry {
    pub(super) fn check_name(&self, name: &str) -> Result<(), Refusal> {
        if valid_repository(name) && name.contains('/') {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "NAME_INVALID",
                "invalid repository name: use <org>/<repo>, lowercase",
            )
            .into())
        }
    }

    /// The authorizer. Refusals never tell another org's repository from a
    /// missing one: reads get NAME_UNKNOWN, writes DENIED, anonymous callers
    /// a challenge, whatever exists.
    pub(super) fn authorize(
        &self,
        caller: &Caller,
        name: &str,
        action: Action,
    ) -> Result<(), Refusal> {
        let public = self.store.is_public(name);
        let rights = caller.rights(name, public, action);
        if rights && caller.scope_covers(name, action) {
            return Ok(());
        }
        let scope = match action {
            Action::Pull => format!("repository:{name}:pull"),
            Action::Push => format!("repository:{name}:pull,push"),
        };
        if caller.org.is_none() || rights {
            // Anonymous, or a bearer token that lacks this scope: ask for one.
            return Err(Refusal::Challenge(Some(scope)));
        }
        let org = caller.org.as_deref().unwrap_or_default();
        Err(match action {
            Action::Pull => ApiError::name_unknown().into(),
            Action::Push if caller.read_only && org_of(name) == org => Refusal::Denied(
                ApiError::denied(format!(
                    "push refused: this token of {org} is read-only; push with a token made without --read-only"
                )),
                scope,
            ),
            Action::Push => Refusal::Denied(
                ApiError::denied(format!(
                    "push refused: a token of {org} pushes only to {org}/<repo>"
                )),
                scope,
            ),
        })
    }

    pub(super) fn token(&self, caller: &Caller, q: &[(String, String)]) -> Handled {
        let mut grants = Vec::new();
        for (k, scope) in q {
            if k != "scope" {
                continue;
            }
            let mut parts = scope.splitn(3, ':');
            let (Some(kind), Some(name), Some(actions)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if kind != "repository" || !valid_repository(name) {
                continue;
            }
            // The caller's rights on the repository, whatever it asked
            // for: a client that asked for pull and later pushes (oras
            // keeps its first token) is not sent back for another.
            let _ = actions;
            let public = self.store.is_public(name);
            let mut granted = Vec::new();
            if caller.rights(name, public, Action::Pull) {
                granted.push("pull".to_string());
            }
            if caller.rights(name, public, Action::Push) {
                granted.extend(["push".to_string(), "delete".to_string()]);
            }
            grants.push(Grant {
                kind: kind.to_string(),
                name: name.to_string(),
                actions: granted,
            });
        }
        let token = self.auth.issue_bearer(caller, grants);
        Ok(json(
            StatusCode::OK,
            &serde_json::json!({
                "token": token,
                "access_token": token,
                "expires_in": crate::auth::BEARER_TTL_SECS,
                "issued_at": hangar_oci::build::rfc3339(crate::auth::now()),
            }),
            "application/json",
        )?)
    }
}
