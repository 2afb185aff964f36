//! Who is calling, and what they may do.
//!
//! API tokens (`hgr_<id>_<secret>`) belong to one org and may be read-only;
//! only a SHA-256 of the secret is kept, in `tokens.json`. Clients present a
//! token with Basic auth (any user name) or as a bearer token, or trade it at
//! `/v2/token` for a short-lived bearer token scoped to repositories and
//! actions, signed with HMAC-SHA256 under the registry's secret key.
//!
//! In a cluster, nodes pull each other's images for an org with a cluster
//! pull token (`hgc_<org>_<mac>`): read-only, of that one org, made and
//! checked with a key every node derives from the cluster's secret
//! ([`cluster_token`], [`Auth::trust_cluster`]); nothing of it is stored,
//! and an org never sees one.
//!
//! The authorizer's rule: a repository `<org>/<...>` is readable by tokens of
//! `<org>` (and by anyone when public), writable by `<org>`'s read-write
//! tokens, and by nobody else.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};

type HmacSha256 = Hmac<Sha256>;

/// How long a bearer token from `/v2/token` lives.
pub const BEARER_TTL_SECS: u64 = 300;

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `n` random bytes, hex-encoded.
pub fn random_hex(n: usize) -> Result<String> {
    let mut buf = vec![0u8; n];
    getrandom::getrandom(&mut buf).map_err(|e| Error::Io {
        path: PathBuf::from("/dev/urandom"),
        source: io::Error::other(e.to_string()),
    })?;
    Ok(hex::encode(buf))
}

/// An API token as stored (the secret itself is never stored).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub org: String,
    pub read_only: bool,
    pub created: u64,
    /// Seconds since the epoch; none means it never expires.
    pub expires: Option<u64>,
    sha256: String,
}

/// The token store plus the HMAC key.
/// A file's (inode, length, mtime): changes whenever tokens.json is saved.
type FileStamp = (u64, u64, SystemTime);

pub struct Auth {
    path: PathBuf,
    key: Vec<u8>,
    /// Tokens as last read, with the file's stamp then.
    cache: Mutex<Option<(FileStamp, Vec<TokenRecord>)>>,
    /// The key cluster pull tokens are checked with, in a cluster.
    cluster: std::sync::OnceLock<Vec<u8>>,
    /// Where the tokens are kept when not in `tokens.json`: the cluster's
    /// store, so a token made at one node is good at every node.
    shared: Option<std::sync::Arc<dyn TokenStore>>,
}

/// Where a cluster keeps its tokens (implemented over its state store).
pub trait TokenStore: Send + Sync {
    /// Every token, as stored now.
    fn load(&self) -> Result<Vec<TokenRecord>>;

    /// Change the tokens with `f`, atomically: `f` may run again on the
    /// tokens as another writer left them.
    fn edit(&self, f: &mut dyn FnMut(&mut Vec<TokenRecord>) -> Result<()>) -> Result<()>;
}

/// The id cluster pull tokens and the bearer tokens traded for them go by.
const CLUSTER_TOKEN_ID: &str = "cluster";

/// The key for cluster pull tokens, from the cluster's secret.
fn cluster_key(secret: &[u8]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    mac.update(b"hangar-registry: pulls between the nodes of a cluster");
    HmacSha256::new_from_slice(&mac.finalize().into_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"))
}

/// The read-only token a node of the cluster with `secret` pulls `org`'s
/// images with from another node's registry.
pub fn cluster_token(secret: &[u8], org: &str) -> String {
    let mut mac = cluster_key(secret);
    mac.update(org.as_bytes());
    format!("hgc_{org}_{}", hex::encode(mac.finalize().into_bytes()))
}

/// An authenticated caller, or nobody.
#[derive(Clone, Debug, Default)]
pub struct Caller {
    /// The caller's org; `None` for anonymous callers.
    pub org: Option<String>,
    pub read_only: bool,
    /// For bearer tokens from `/v2/token`: what they were granted.
    pub scope: Option<Vec<Grant>>,
    /// The API token the caller showed (or the bearer token was minted
    /// from): a bearer token lives only as long as it does.
    pub token_id: Option<String>,
}

/// One `repository:<name>:<actions>` grant inside a bearer token.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Grant {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub actions: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct Claims {
    org: Option<String>,
    ro: bool,
    exp: u64,
    access: Vec<Grant>,
    /// The API token this was minted from: revoking it ends this too.
    #[serde(default)]
    tid: Option<String>,
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// Constant-time equality for secrets.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Auth {
    /// Open the tokens of the registry at `root`, creating its secret key on first use.
    pub fn open(root: &Path) -> Result<Auth> {
        let key_path = root.join("secret");
        let key = match fs::read(&key_path) {
            Ok(k) if k.len() >= 32 => k,
            _ => {
                let key = random_hex(32)?.into_bytes();
                let tmp = root.join(format!(".secret.{}", std::process::id()));
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)
                    .map_err(|source| Error::Io {
                        path: tmp.clone(),
                        source,
                    })?;
                f.write_all(&key)
                    .and_then(|_| f.sync_all())
                    .map_err(|source| Error::Io {
                        path: tmp.clone(),
                        source,
                    })?;
                // Two first starts at once: the first rename wins, both read it back.
                let _ = fs::hard_link(&tmp, &key_path);
                let _ = fs::remove_file(&tmp);
                fs::read(&key_path).map_err(|source| Error::Io {
                    path: key_path.clone(),
                    source,
                })?
            }
        };
        Ok(Auth {
            path: root.join("tokens.json"),
            key,
            cache: Mutex::new(None),
            cluster: std::sync::OnceLock::new(),
            shared: None,
        })
    }

    /// Keep the tokens in `store` instead of `tokens.json` (a node of a
    /// cluster; the HMAC key for bearer tokens stays the registry's own).
    pub fn with_tokens(mut self, store: std::sync::Arc<dyn TokenStore>) -> Auth {
        self.share_tokens(store);
        self
    }

    /// The same, in place.
    pub fn share_tokens(&mut self, store: std::sync::Arc<dyn TokenStore>) {
        self.shared = Some(store);
    }

    fn load(&self) -> Result<Vec<TokenRecord>> {
        if let Some(shared) = &self.shared {
            return shared.load();
        }
        match fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                Error::Invalid(format!(
                    "{}: {e}; fix or remove the file",
                    self.path.display()
                ))
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(source) => Err(Error::Io {
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// Tokens, re-read when the file changed (the CLI edits it while the
    /// server runs).
    fn tokens(&self) -> Result<Vec<TokenRecord>> {
        if self.shared.is_some() {
            return self.load();
        }
        // Every save is a rename: a new inode, and usually a new length.
        // The modification time alone is too coarse: a revoke right after
        // a create could share it and leave the revoked token valid.
        let stamp = fs::metadata(&self.path).ok().map(|m| {
            use std::os::unix::fs::MetadataExt;
            (m.ino(), m.len(), m.modified().unwrap_or(UNIX_EPOCH))
        });
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let (Some((t, tokens)), Some(now)) = (cache.as_ref(), stamp) {
            if *t == now {
                return Ok(tokens.clone());
            }
        }
        let tokens = self.load()?;
        if let Some(now) = stamp {
            *cache = Some((now, tokens.clone()));
        }
        Ok(tokens)
    }

    fn save(&self, tokens: &[TokenRecord]) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(tokens).map_err(|e| Error::Invalid(e.to_string()))?;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let tmp_dir = dir.join("oci/tmp");
        hangar_oci::store::write_atomic(&tmp_dir, &self.path, &bytes)?;
        Ok(())
    }

    fn edit<T>(&self, mut f: impl FnMut(&mut Vec<TokenRecord>) -> Result<T>) -> Result<T> {
        if let Some(shared) = &self.shared {
            let mut out = None;
            shared.edit(&mut |tokens| {
                out = Some(f(tokens)?);
                Ok(())
            })?;
            return out.ok_or_else(|| Error::Invalid("the token store changed nothing".into()));
        }
        let lock_path = self.path.with_extension("lock");
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| Error::Io {
                path: lock_path.clone(),
                source,
            })?;
        hangar_oci::store::flock_exclusive(&lock).map_err(|source| Error::Io {
            path: lock_path.clone(),
            source,
        })?;
        let mut tokens = self.load()?;
        let out = f(&mut tokens)?;
        self.save(&tokens)?;
        Ok(out)
    }

    /// Create a token; returns its record and the secret token string.
    pub fn create(
        &self,
        org: &str,
        read_only: bool,
        ttl_secs: Option<u64>,
    ) -> Result<(TokenRecord, String)> {
        if !hangar_oci::reference::valid_repository(org) || org.contains('/') {
            return Err(Error::Invalid(format!(
                "org {org:?} must be one lowercase name of [a-z0-9] separated by '.', '_' or '-'"
            )));
        }
        let id = random_hex(6)?;
        let secret = random_hex(24)?;
        let token = format!("hgr_{id}_{secret}");
        let created = now();
        let record = TokenRecord {
            id: id.clone(),
            org: org.to_string(),
            read_only,
            created,
            expires: ttl_secs.map(|t| created + t),
            sha256: sha256_hex(&token),
        };
        let r = record.clone();
        self.edit(move |tokens| {
            tokens.push(r.clone());
            Ok(())
        })?;
        Ok((record, token))
    }

    pub fn list(&self) -> Result<Vec<TokenRecord>> {
        self.load()
    }

    pub fn revoke(&self, id: &str) -> Result<TokenRecord> {
        self.edit(|tokens| {
            let pos = tokens
                .iter()
                .position(|t| t.id == id)
                .ok_or_else(|| Error::NoSuchToken(id.to_string()))?;
            Ok(tokens.remove(pos))
        })
    }

    /// Take cluster pull tokens made with the cluster's `secret` (once; a
    /// second call changes nothing).
    pub fn trust_cluster(&self, secret: &[u8]) {
        let _ = self.cluster.set(secret.to_vec());
    }

    /// The org of a valid cluster pull token.
    fn verify_cluster_token(&self, token: &str) -> Option<TokenRecord> {
        let secret = self.cluster.get()?;
        let (org, _) = token.strip_prefix("hgc_")?.rsplit_once('_')?;
        if !same(cluster_token(secret, org).as_bytes(), token.as_bytes()) {
            return None;
        }
        Some(TokenRecord {
            id: CLUSTER_TOKEN_ID.into(),
            org: org.to_string(),
            read_only: true,
            created: 0,
            expires: None,
            sha256: String::new(),
        })
    }

    /// The record of a valid, unexpired API token (or cluster pull token).
    pub fn verify_api_token(&self, token: &str) -> Option<TokenRecord> {
        if token.starts_with("hgc_") {
            return self.verify_cluster_token(token);
        }
        let id = token.strip_prefix("hgr_")?.split('_').next()?;
        let want = sha256_hex(token);
        let record = self.tokens().ok()?.into_iter().find(|t| t.id == id)?;
        if !same(record.sha256.as_bytes(), want.as_bytes()) {
            return None;
        }
        if record.expires.is_some_and(|e| e <= now()) {
            return None;
        }
        Some(record)
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC takes keys of any length.
        HmacSha256::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"))
    }

    /// A short-lived bearer token for `caller`, granting `access`. It is
    /// checked against the API token it came from on every use, so a
    /// revoke or an expiry ends it at once (not after its 5 minutes).
    pub fn issue_bearer(&self, caller: &Caller, access: Vec<Grant>) -> String {
        let claims = Claims {
            org: caller.org.clone(),
            ro: caller.read_only,
            exp: now() + BEARER_TTL_SECS,
            access,
            tid: caller.token_id.clone(),
        };
        let body = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(&claims).unwrap_or_default());
        let mut mac = self.mac();
        mac.update(body.as_bytes());
        let sig =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{body}.{sig}")
    }

    fn verify_bearer(&self, token: &str) -> Option<Caller> {
        let (body, sig) = token.split_once('.')?;
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(sig)
            .ok()?;
        let mut mac = self.mac();
        mac.update(body.as_bytes());
        mac.verify_slice(&sig).ok()?;
        let claims: Claims = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(body)
                .ok()?,
        )
        .ok()?;
        if claims.exp <= now() {
            return None;
        }
        if claims.tid.as_deref() == Some(CLUSTER_TOKEN_ID) {
            // Minted here from a cluster pull token: read-only, and only
            // while this registry is a cluster's.
            if self.cluster.get().is_none() || !claims.ro {
                return None;
            }
        } else if let Some(id) = &claims.tid {
            // tokens() re-reads tokens.json whenever it changed.
            let alive = self
                .tokens()
                .ok()?
                .into_iter()
                .any(|t| &t.id == id && t.expires.is_none_or(|e| e > now()));
            if !alive {
                return None;
            }
        } else if claims.org.is_some() {
            // Every bearer token of an org is minted from an API token.
            return None;
        }
        Some(Caller {
            org: claims.org,
            read_only: claims.ro,
            scope: Some(claims.access),
            token_id: claims.tid,
        })
    }

    /// HMAC tag binding an upload id to its repository.
    pub fn upload_state(&self, name: &str, id: &str) -> String {
        let mut mac = self.mac();
        mac.update(b"upload\0");
        mac.update(name.as_bytes());
        mac.update(b"\0");
        mac.update(id.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    pub fn check_upload_state(&self, name: &str, id: &str, state: &str) -> bool {
        same(self.upload_state(name, id).as_bytes(), state.as_bytes())
    }

    /// Identify the caller from an `Authorization` header value: anonymous
    /// without one, `None` when credentials were given and are not valid.
    pub fn identify(&self, authorization: Option<&str>) -> Option<Caller> {
        let Some(value) = authorization else {
            return Some(Caller::default());
        };
        let (scheme, rest) = value.split_once(' ')?;
        let rest = rest.trim();
        let from_record = |record: TokenRecord| Caller {
            org: Some(record.org),
            read_only: record.read_only,
            scope: None,
            token_id: Some(record.id),
        };
        if scheme.eq_ignore_ascii_case("basic") {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(rest)
                .ok()?;
            let raw = String::from_utf8(raw).ok()?;
            let (_, password) = raw.split_once(':')?;
            self.verify_api_token(password).map(from_record)
        } else if scheme.eq_ignore_ascii_case("bearer") {
            if rest.starts_with("hgr_") || rest.starts_with("hgc_") {
                return self.verify_api_token(rest).map(from_record);
            }
            self.verify_bearer(rest)
        } else {
            None
        }
    }
}

/// What a request wants to do to a repository.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Pull,
    Push,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Pull => "pull",
            Action::Push => "push",
        }
    }
}

/// The org that owns repository `name`.
pub fn org_of(name: &str) -> &str {
    name.split('/').next().unwrap_or(name)
}

impl Caller {
    /// What the caller's identity allows on `name`, before bearer scopes.
    pub fn rights(&self, name: &str, public: bool, action: Action) -> bool {
        let own = self.org.as_deref() == Some(org_of(name));
        match action {
            Action::Pull => own || public,
            Action::Push => own && !self.read_only,
        }
    }

    /// Whether a bearer token's scope covers `action` on `name` (always true
    /// for API tokens, which carry no scope).
    pub fn scope_covers(&self, name: &str, action: Action) -> bool {
        match &self.scope {
            None => true,
            Some(grants) => grants.iter().any(|g| {
                g.kind == "repository"
                    && g.name == name
                    && g.actions.iter().any(|a| a == action.as_str() || a == "*")
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_expire_and_revoke() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("oci/tmp")).unwrap();
        let auth = Auth::open(dir.path()).unwrap();
        let (rec, token) = auth.create("acme", false, None).unwrap();
        assert_eq!(auth.verify_api_token(&token).unwrap().org, "acme");
        assert!(auth.verify_api_token(&format!("{token}x")).is_none());
        let (_, expired) = auth.create("acme", true, Some(0)).unwrap();
        assert!(auth.verify_api_token(&expired).is_none());
        auth.revoke(&rec.id).unwrap();
        assert!(auth.verify_api_token(&token).is_none());
        assert!(auth.create("Acme", false, None).is_err());
    }

    #[test]
    fn cluster_pull_tokens_read_one_org_and_only_in_a_cluster_of_that_secret() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("oci/tmp")).unwrap();
        let auth = Auth::open(dir.path()).unwrap();
        let token = cluster_token(b"the cluster's secret", "acme-corp_x");
        // Not a cluster's registry: no such token is taken.
        assert!(auth.verify_api_token(&token).is_none());
        auth.trust_cluster(b"the cluster's secret");
        let record = auth.verify_api_token(&token).unwrap();
        assert_eq!(
            (record.org.as_str(), record.read_only),
            ("acme-corp_x", true)
        );
        let caller = auth.identify(Some(&format!("Bearer {token}"))).unwrap();
        assert_eq!(caller.org.as_deref(), Some("acme-corp_x"));
        assert!(caller.read_only);
        // Another cluster's, another org's name on this one's mac, a changed mac.
        assert!(auth
            .verify_api_token(&cluster_token(b"another secret", "acme-corp_x"))
            .is_none());
        let mac = token.rsplit_once('_').unwrap().1;
        assert!(auth.verify_api_token(&format!("hgc_evil_{mac}")).is_none());
        let mut changed = token.clone();
        changed.pop();
        changed.push(if token.ends_with('0') { '1' } else { '0' });
        assert!(auth.verify_api_token(&changed).is_none());
        // A bearer token traded for it reads, and never writes.
        let grant = Grant {
            kind: "repository".into(),
            name: "acme-corp_x/app".into(),
            actions: vec!["pull".into()],
        };
        let bearer = auth.issue_bearer(&caller, vec![grant]);
        let back = auth.identify(Some(&format!("Bearer {bearer}"))).unwrap();
        assert!(back.read_only);
        assert!(back.scope_covers("acme-corp_x/app", Action::Pull));
        // A registry that was never the cluster's takes none of its bearers.
        let other = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(other.path().join("oci/tmp")).unwrap();
        let lone = Auth::open(other.path()).unwrap();
        assert!(lone.identify(Some(&format!("Bearer {bearer}"))).is_none());
    }

    /// The tokens two registries share, as a cluster's store keeps them.
    #[derive(Default)]
    struct Shared(Mutex<Vec<TokenRecord>>);

    impl TokenStore for Shared {
        fn load(&self) -> Result<Vec<TokenRecord>> {
            Ok(self.0.lock().unwrap().clone())
        }

        fn edit(&self, f: &mut dyn FnMut(&mut Vec<TokenRecord>) -> Result<()>) -> Result<()> {
            f(&mut self.0.lock().unwrap())
        }
    }

    #[test]
    fn registries_sharing_a_token_store_take_each_others_tokens_and_revokes() {
        let shared = std::sync::Arc::new(Shared::default());
        let open = || {
            let dir = tempfile::tempdir().unwrap();
            let auth = Auth::open(dir.path()).unwrap().with_tokens(shared.clone());
            (dir, auth)
        };
        let ((_da, a), (db, b)) = (open(), open());
        let (record, token) = a.create("acme", false, None).unwrap();
        assert_eq!(b.verify_api_token(&token).unwrap().org, "acme");
        assert_eq!(b.list().unwrap().len(), 1);
        assert!(
            !db.path().join("tokens.json").exists(),
            "nothing in the file"
        );
        // A bearer token b minted lives as long as the token a made.
        let caller = b.identify(Some(&format!("Bearer {token}"))).unwrap();
        let bearer = b.issue_bearer(&caller, Vec::new());
        assert!(b.identify(Some(&format!("Bearer {bearer}"))).is_some());
        b.revoke(&record.id).unwrap();
        assert!(a.verify_api_token(&token).is_none());
        assert!(b.identify(Some(&format!("Bearer {bearer}"))).is_none());
    }

    #[test]
    fn bearer_tokens_are_signed_and_scoped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("oci/tmp")).unwrap();
        let auth = Auth::open(dir.path()).unwrap();
        let (record, secret) = auth.create("acme", false, None).unwrap();
        let caller = auth.identify(Some(&format!("Bearer {secret}"))).unwrap();
        assert_eq!(caller.token_id.as_deref(), Some(record.id.as_str()));
        let grant = Grant {
            kind: "repository".into(),
            name: "acme/app".into(),
            actions: vec!["pull".into()],
        };
        let token = auth.issue_bearer(&caller, vec![grant]);
        let back = auth.identify(Some(&format!("Bearer {token}"))).unwrap();
        assert!(back.scope_covers("acme/app", Action::Pull));
        assert!(!back.scope_covers("acme/app", Action::Push));
        assert!(!back.scope_covers("acme/other", Action::Pull));
        let mut forged = token.clone();
        forged.insert(3, 'x');
        assert!(auth.identify(Some(&format!("Bearer {forged}"))).is_none());
        assert!(auth.check_upload_state("acme/app", "id1", &auth.upload_state("acme/app", "id1")));
        assert!(!auth.check_upload_state("evil/app", "id1", &auth.upload_state("acme/app", "id1")));
        // Revoking the API token ends the bearer token minted from it.
        auth.revoke(&record.id).unwrap();
        assert!(auth.identify(Some(&format!("Bearer {token}"))).is_none());
    }
}
