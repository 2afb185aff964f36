//! Apps, their releases and their secrets, in the state store.
//!
//! An app owns the machines whose `app` names it. A release is one
//! deploy: the image and the machine config template, and how it ended.
//! Secrets are sealed at rest with a key in `$HANGAR_HOME/secrets.key`
//! (ChaCha20-Poly1305 from ring, with a format byte; see [`Sealer`]) and are
//! only ever opened to go into a machine's environment.

use std::collections::BTreeMap;
use std::path::Path;

use hmac::{Hmac, Mac};
use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::config::MachineConfig;
use crate::error::{Error, Result};
use crate::state::{now, State};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct App {
    pub name: String,
    pub org: String,
    pub created_at: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Release {
    pub app: String,
    pub version: u32,
    pub image: String,
    pub status: ReleaseStatus,
    pub description: String,
    pub config: MachineConfig,
    pub created_at: u64,
}

crate::closed_set! {
    /// How a release's deploy went.
    pub enum ReleaseStatus {
        /// Under way.
        Running,
        /// Its machines replaced the old ones: what the app runs.
        Complete,
        /// It failed and was rolled back.
        Failed,
        /// The node stopped during it (rolled back when the node starts).
        Interrupted,
    }
}
crate::state::sql_text!(ReleaseStatus);

/// A deploy the node's stop cut short: what [`crate::deploy::recover`] undoes.
#[derive(Clone, Debug)]
pub struct Interrupted {
    pub app: String,
    pub version: u32,
    /// The machines the deploy was replacing.
    pub replaces: Vec<String>,
}

/// A secret as the API shows it: never its value.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SecretInfo {
    pub name: String,
    /// The first hex digits of SHA-256 over the value, to tell versions apart.
    pub digest: String,
    pub created_at: u64,
}

/// App names are DNS labels: they become `<app>.<domain>`.
pub fn valid_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "app name {name:?}: use lowercase letters, digits and dashes (at most 63), e.g. \"hello-world\""
        )))
    }
}

impl State {
    pub fn create_app(&self, name: &str, org: &str) -> Result<App> {
        valid_name(name)?;
        let done = self.db().execute(
            "INSERT OR IGNORE INTO apps (name, org, created_at) VALUES (?1, ?2, ?3)",
            params![name, org, now()],
        )?;
        if done == 0 {
            return Err(Error::Conflict(format!(
                "app {name} exists already; deploy to it, or pick another name"
            )));
        }
        self.app(name)
    }

    pub fn app(&self, name: &str) -> Result<App> {
        self.db()
            .query_row("SELECT name, org, created_at FROM apps WHERE name = ?1", params![name], |r| {
                Ok(App { name: r.get(0)?, org: r.get(1)?, created_at: r.get(2)? })
            })
            .optional()?
            .ok_or_else(|| Error::NotFound(format!("no app {name:?}; create it with `hangar launch` or list them with `hangar apps list`")))
    }

    pub fn apps(&self) -> Result<Vec<App>> {
        let db = self.db();
        let mut stmt = db.prepare("SELECT name, org, created_at FROM apps ORDER BY name")?;
        let rows = stmt
            .query_map([], |r| {
                Ok(App {
                    name: r.get(0)?,
                    org: r.get(1)?,
                    created_at: r.get(2)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// Forget an app, its releases and secrets (its machines are the
    /// caller's to destroy first).
    pub fn delete_app(&self, name: &str) -> Result<()> {
        let db = self.db();
        for table in ["secrets", "releases"] {
            db.execute(
                &format!("DELETE FROM {table} WHERE app = ?1"),
                params![name],
            )?;
        }
        db.execute("DELETE FROM apps WHERE name = ?1", params![name])?;
        Ok(())
    }

    /// Record a new release (status `running`) that replaces the machines
    /// `replaces`; returns it with its version.
    pub fn add_release(
        &self,
        app: &str,
        image: &str,
        description: &str,
        config: &MachineConfig,
        replaces: &[String],
    ) -> Result<Release> {
        let json = serde_json::to_string(config).map_err(|e| Error::Internal(e.to_string()))?;
        let replaces =
            serde_json::to_string(replaces).map_err(|e| Error::Internal(e.to_string()))?;
        let db = self.db();
        let version: u32 = db.query_row(
            "SELECT COALESCE(MAX(version), 0) + 1 FROM releases WHERE app = ?1",
            params![app],
            |r| r.get(0),
        )?;
        db.execute(
            "INSERT INTO releases (app, version, image, status, description, config, created_at, replaces) VALUES (?1, ?2, ?3, 'running', ?4, ?5, ?6, ?7)",
            params![app, version, image, description, json, now(), replaces],
        )?;
        drop(db);
        self.release(app, version)
    }

    pub fn set_release_status(
        &self,
        app: &str,
        version: u32,
        status: ReleaseStatus,
        description: &str,
    ) -> Result<()> {
        self.db().execute(
            "UPDATE releases SET status = ?3, description = ?4 WHERE app = ?1 AND version = ?2",
            params![app, version, status, description],
        )?;
        Ok(())
    }

    /// Releases still `running` when the node starts were cut short: mark
    /// them `interrupted` and return them.
    pub fn interrupt_releases(&self) -> Result<Vec<Interrupted>> {
        let db = self.db();
        let cut = db
            .prepare("SELECT app, version, replaces FROM releases WHERE status = 'running'")?
            .query_map([], |r| {
                let replaces: String = r.get(2)?;
                Ok(Interrupted {
                    app: r.get(0)?,
                    version: r.get(1)?,
                    replaces: serde_json::from_str(&replaces).unwrap_or_default(),
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        db.execute(
            "UPDATE releases SET status = 'interrupted', description = description || ' (the node stopped during the deploy)' WHERE status = 'running'",
            [],
        )?;
        Ok(cut)
    }

    pub fn release(&self, app: &str, version: u32) -> Result<Release> {
        self.releases_where("app = ?1 AND version = ?2", params![app, version])?
            .pop()
            .ok_or_else(|| Error::NotFound(format!("app {app} has no release v{version}")))
    }

    /// Newest first.
    pub fn releases(&self, app: &str) -> Result<Vec<Release>> {
        self.releases_where("app = ?1", params![app])
    }

    /// The newest release that completed: what machines should run.
    pub fn current_release(&self, app: &str) -> Result<Option<Release>> {
        Ok(self
            .releases_where("app = ?1 AND status = 'complete'", params![app])?
            .into_iter()
            .next())
    }

    fn releases_where(&self, filter: &str, args: impl rusqlite::Params) -> Result<Vec<Release>> {
        let db = self.db();
        let mut stmt = db.prepare(&format!(
            "SELECT app, version, image, status, description, config, created_at FROM releases WHERE {filter} ORDER BY version DESC"
        ))?;
        let rows = stmt
            .query_map(args, |r| {
                let config: String = r.get(5)?;
                Ok((
                    Release {
                        app: r.get(0)?,
                        version: r.get(1)?,
                        image: r.get(2)?,
                        status: r.get(3)?,
                        description: r.get(4)?,
                        config: MachineConfig::default(),
                        created_at: r.get(6)?,
                    },
                    config,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter()
            .map(|(mut rel, config)| {
                rel.config = serde_json::from_str(&config)
                    .map_err(|e| Error::Internal(format!("stored release config: {e}")))?;
                Ok(rel)
            })
            .collect()
    }

    pub fn set_secrets(
        &self,
        sealer: &Sealer,
        app: &str,
        values: &BTreeMap<String, String>,
    ) -> Result<()> {
        let db = self.db();
        for (name, value) in values {
            let digest = short_digest(value);
            db.execute(
                "INSERT OR REPLACE INTO secrets (app, name, sealed, digest, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![app, name, sealer.seal(value.as_bytes())?, digest, now()],
            )?;
        }
        Ok(())
    }

    /// An org's login to another registry (the password sealed): what the
    /// node pulls that org's images from there with.
    pub fn set_registry_login(
        &self,
        sealer: &Sealer,
        org: &str,
        registry: &str,
        username: &str,
        password: &str,
    ) -> Result<()> {
        self.db().execute(
            "INSERT OR REPLACE INTO registry_logins (org, registry, username, sealed, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![org, registry, username, sealer.seal(password.as_bytes())?, now()],
        )?;
        Ok(())
    }

    /// Whether the org had a login there (now gone).
    pub fn remove_registry_login(&self, org: &str, registry: &str) -> Result<bool> {
        Ok(self.db().execute(
            "DELETE FROM registry_logins WHERE org = ?1 AND registry = ?2",
            params![org, registry],
        )? > 0)
    }

    /// The registries an org has logins for, with their user names.
    pub fn registry_logins(&self, org: &str) -> Result<Vec<(String, String)>> {
        let db = self.db();
        let mut stmt = db.prepare(
            "SELECT registry, username FROM registry_logins WHERE org = ?1 ORDER BY registry",
        )?;
        let rows = stmt
            .query_map(params![org], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// The org's login to `registry`, opened: for the node's pulls only.
    pub fn open_registry_login(
        &self,
        sealer: &Sealer,
        org: &str,
        registry: &str,
    ) -> Result<Option<(String, String)>> {
        let db = self.db();
        let row: Option<(String, Vec<u8>)> = db
            .query_row(
                "SELECT username, sealed FROM registry_logins WHERE org = ?1 AND registry = ?2",
                params![org, registry],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        row.map(|(user, sealed)| {
            let password = sealer.open(&sealed).map_err(|e| {
                Error::Internal(format!("registry login of {org} for {registry}: {e}"))
            })?;
            Ok((user, String::from_utf8_lossy(&password).into_owned()))
        })
        .transpose()
    }

    /// Remove secrets; returns the names that existed.
    pub fn unset_secrets(&self, app: &str, names: &[String]) -> Result<Vec<String>> {
        let db = self.db();
        let mut gone = Vec::new();
        for name in names {
            if db.execute(
                "DELETE FROM secrets WHERE app = ?1 AND name = ?2",
                params![app, name],
            )? > 0
            {
                gone.push(name.clone());
            }
        }
        Ok(gone)
    }

    pub fn secret_infos(&self, app: &str) -> Result<Vec<SecretInfo>> {
        let db = self.db();
        let mut stmt = db
            .prepare("SELECT name, digest, created_at FROM secrets WHERE app = ?1 ORDER BY name")?;
        let rows = stmt
            .query_map(params![app], |r| {
                Ok(SecretInfo {
                    name: r.get(0)?,
                    digest: r.get(1)?,
                    created_at: r.get(2)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// The app's secrets, opened: for a machine's environment only.
    pub fn open_secrets(&self, sealer: &Sealer, app: &str) -> Result<BTreeMap<String, String>> {
        let db = self.db();
        let mut stmt = db.prepare("SELECT name, sealed FROM secrets WHERE app = ?1")?;
        let rows = stmt
            .query_map(params![app], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter()
            .map(|(name, sealed)| {
                let plain = sealer
                    .open(&sealed)
                    .map_err(|e| Error::Internal(format!("secret {name} of {app}: {e}")))?;
                Ok((name, String::from_utf8_lossy(&plain).into_owned()))
            })
            .collect()
    }
}

fn short_digest(value: &str) -> String {
    use sha2::Digest;
    hex(&Sha256::digest(value.as_bytes())[..6])
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

type HmacSha256 = Hmac<Sha256>;

/// The first byte of a value sealed with ChaCha20-Poly1305 (format 1).
const SEALED_V1: u8 = 1;

/// Seals secrets with a node key, as `SEALED_V1 || nonce (12) ||
/// ChaCha20-Poly1305(ciphertext || tag)` (ring's AEAD), the AEAD key
/// derived from the node key. Values sealed before format 1 (a 16-byte
/// nonce, an HMAC-SHA256 keystream and an HMAC tag) still open.
pub struct Sealer {
    aead: ring::aead::LessSafeKey,
    /// The halves of the node key, for values of the earlier format.
    legacy_enc: [u8; 32],
    legacy_mac: [u8; 32],
}

impl Sealer {
    /// The node's key from `home/secrets.key`, made (mode 0600) if missing.
    pub fn open_or_create(home: &Path) -> Result<Sealer> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = home.join("secrets.key");
        let err = |e: std::io::Error| Error::Internal(format!("{}: {e}", path.display()));
        let key = match std::fs::read(&path) {
            Ok(k) if k.len() == 64 => k,
            Ok(_) => return Err(Error::Internal(format!("{} is not a 64-byte key; restore it from a backup (secrets cannot be opened without it)", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let k = random_bytes(64)?;
                let tmp = home.join("secrets.key.tmp");
                let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(err)?;
                f.write_all(&k).and_then(|()| f.sync_all()).map_err(err)?;
                std::fs::rename(&tmp, &path).map_err(err)?;
                k
            }
            Err(e) => return Err(err(e)),
        };
        // A key of its own for the AEAD, so no key serves two constructions.
        let mut derive = <HmacSha256 as Mac>::new_from_slice(&key).expect("any key length");
        derive.update(b"hangar secrets, format 1: chacha20-poly1305");
        let aead_key = derive.finalize().into_bytes();
        let unbound = ring::aead::UnboundKey::new(&ring::aead::CHACHA20_POLY1305, &aead_key)
            .map_err(|_| Error::Internal("the secrets key cannot be used".into()))?;
        let mut s = Sealer {
            aead: ring::aead::LessSafeKey::new(unbound),
            legacy_enc: [0; 32],
            legacy_mac: [0; 32],
        };
        s.legacy_enc.copy_from_slice(&key[..32]);
        s.legacy_mac.copy_from_slice(&key[32..]);
        Ok(s)
    }

    pub fn seal(&self, plain: &[u8]) -> Result<Vec<u8>> {
        let nonce_bytes: [u8; 12] = random_bytes(12)?
            .try_into()
            .map_err(|_| Error::Internal("nonce".into()))?;
        let mut data = plain.to_vec();
        self.aead
            .seal_in_place_append_tag(
                ring::aead::Nonce::assume_unique_for_key(nonce_bytes),
                ring::aead::Aad::from([SEALED_V1]),
                &mut data,
            )
            .map_err(|_| Error::Internal("sealing a secret failed".into()))?;
        let mut out = Vec::with_capacity(1 + 12 + data.len());
        out.push(SEALED_V1);
        out.extend_from_slice(&nonce_bytes);
        out.extend_from_slice(&data);
        Ok(out)
    }

    pub fn open(&self, sealed: &[u8]) -> std::result::Result<Vec<u8>, &'static str> {
        if sealed.first() == Some(&SEALED_V1) && sealed.len() >= 1 + 12 + 16 {
            let nonce: [u8; 12] = sealed[1..13].try_into().map_err(|_| "bad nonce")?;
            let mut data = sealed[13..].to_vec();
            if let Ok(plain) = self.aead.open_in_place(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::from([SEALED_V1]),
                &mut data,
            ) {
                return Ok(plain.to_vec());
            }
            // An earlier value whose random nonce began with that byte.
        }
        self.open_legacy(sealed)
    }

    /// A value of the format before 1 (see the type's doc).
    fn open_legacy(&self, sealed: &[u8]) -> std::result::Result<Vec<u8>, &'static str> {
        if sealed.len() < 48 {
            return Err("sealed value too short");
        }
        let (body, tag) = sealed.split_at(sealed.len() - 32);
        let mut m = <HmacSha256 as Mac>::new_from_slice(&self.legacy_mac).map_err(|_| "bad key")?;
        m.update(body);
        m.verify_slice(tag)
            .map_err(|_| "the sealed value does not match the node key")?;
        let (nonce, ct) = body.split_at(16);
        let mut plain = ct.to_vec();
        for (i, chunk) in plain.chunks_mut(32).enumerate() {
            let mut k =
                <HmacSha256 as Mac>::new_from_slice(&self.legacy_enc).map_err(|_| "bad key")?;
            k.update(nonce);
            k.update(&(i as u64).to_be_bytes());
            let block = k.finalize().into_bytes();
            for (d, b) in chunk.iter_mut().zip(block.iter()) {
                *d ^= b;
            }
        }
        Ok(plain)
    }
}

/// `n` bytes from the kernel's random source.
pub(crate) fn random_bytes(n: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; n];
    getrandom::getrandom(&mut buf)
        .map_err(|e| Error::Internal(format!("no random bytes from the kernel: {e}")))?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealing_round_trips_and_detects_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let s = Sealer::open_or_create(dir.path()).unwrap();
        let sealed = s
            .seal(b"postgres://user:hunter2@db/app, longer than one 32-byte block")
            .unwrap();
        assert!(
            !sealed.windows(7).any(|w| w == b"hunter2"),
            "no plaintext at rest"
        );
        assert_eq!(
            s.open(&sealed).unwrap(),
            b"postgres://user:hunter2@db/app, longer than one 32-byte block"
        );
        let mut bad = sealed.clone();
        bad[20] ^= 1;
        assert!(s.open(&bad).is_err());
        // The same key next time; a different key opens nothing.
        let again = Sealer::open_or_create(dir.path()).unwrap();
        assert!(again.open(&sealed).is_ok());
        let other = Sealer::open_or_create(tempfile::tempdir().unwrap().path()).unwrap();
        assert!(other.open(&sealed).is_err());
        assert_eq!(sealed[0], SEALED_V1);
        assert!(s.open(&sealed[..20]).is_err());
    }

    #[test]
    fn a_value_sealed_before_format_1_still_opens() {
        // Sealed by the earlier construction with this key (all 7s).
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secrets.key"), [7u8; 64]).unwrap();
        let s = Sealer::open_or_create(dir.path()).unwrap();
        let legacy = |nonce: [u8; 16], plain: &[u8]| {
            let mut out = nonce.to_vec();
            let mut ct = plain.to_vec();
            for (i, chunk) in ct.chunks_mut(32).enumerate() {
                let mut k = <HmacSha256 as Mac>::new_from_slice(&[7u8; 32]).unwrap();
                k.update(&nonce);
                k.update(&(i as u64).to_be_bytes());
                let block = k.finalize().into_bytes();
                chunk
                    .iter_mut()
                    .zip(block.iter())
                    .for_each(|(d, b)| *d ^= b);
            }
            out.extend_from_slice(&ct);
            let mut m = <HmacSha256 as Mac>::new_from_slice(&[7u8; 32]).unwrap();
            m.update(&out);
            out.extend_from_slice(&m.finalize().into_bytes());
            out
        };
        let text = b"a secret from before, longer than one 32-byte block";
        // Even one whose nonce begins like a format-1 value.
        for first in [0u8, SEALED_V1, 0xff] {
            let old = legacy([first; 16], text);
            assert_eq!(s.open(&old).unwrap(), text);
            let mut bad = old.clone();
            bad[30] ^= 1;
            assert!(s.open(&bad).is_err());
        }
        // What it seals now is format 1.
        assert_eq!(s.seal(b"x").unwrap()[0], SEALED_V1);
    }

    #[test]
    fn a_store_from_before_replaces_opens_and_keeps_its_releases() {
        let dir = tempfile::tempdir().unwrap();
        let db = rusqlite::Connection::open(dir.path().join("state.db")).unwrap();
        db.execute_batch(
            "CREATE TABLE releases (
                app TEXT NOT NULL, version INTEGER NOT NULL, image TEXT NOT NULL, status TEXT NOT NULL,
                description TEXT NOT NULL, config TEXT NOT NULL, created_at INTEGER NOT NULL,
                PRIMARY KEY (app, version));
             INSERT INTO releases VALUES ('hello', 1, 'img:1', 'running', 'old', '{}', 0);",
        )
        .unwrap();
        drop(db);
        let state = State::open(dir.path()).unwrap();
        let cut = state.interrupt_releases().unwrap();
        assert_eq!((cut[0].app.as_str(), cut[0].version), ("hello", 1));
        assert!(cut[0].replaces.is_empty());
        drop(state);
        // Opening again finds the column there.
        assert!(State::open(dir.path()).is_ok());
    }

    #[test]
    fn apps_releases_and_secrets_in_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let sealer = Sealer::open_or_create(dir.path()).unwrap();
        assert!(state.create_app("Bad_Name", "o").is_err());
        state.create_app("hello", "personal").unwrap();
        assert!(matches!(
            state.create_app("hello", "personal"),
            Err(Error::Conflict(_))
        ));
        let r1 = state
            .add_release("hello", "img:1", "first", &MachineConfig::default(), &[])
            .unwrap();
        let r2 = state
            .add_release(
                "hello",
                "img:2",
                "second",
                &MachineConfig::default(),
                &["m1".to_string(), "m2".to_string()],
            )
            .unwrap();
        assert_eq!((r1.version, r2.version), (1, 2));
        state
            .set_release_status("hello", 1, ReleaseStatus::Complete, "ok")
            .unwrap();
        assert_eq!(state.current_release("hello").unwrap().unwrap().version, 1);
        let cut = state.interrupt_releases().unwrap();
        assert_eq!(
            state.release("hello", 2).unwrap().status,
            ReleaseStatus::Interrupted
        );
        assert_eq!(cut.len(), 1);
        assert_eq!((cut[0].version, cut[0].replaces.len()), (2, 2));
        assert!(state.interrupt_releases().unwrap().is_empty());
        let mut v = BTreeMap::new();
        v.insert("DB".to_string(), "secret-value".to_string());
        state.set_secrets(&sealer, "hello", &v).unwrap();
        assert_eq!(state.open_secrets(&sealer, "hello").unwrap(), v);
        assert_eq!(state.secret_infos("hello").unwrap()[0].name, "DB");
        for file in ["state.db", "state.db-wal"] {
            let raw = std::fs::read(dir.path().join(file)).unwrap_or_default();
            assert!(
                !raw.windows(12).any(|w| w == b"secret-value"),
                "not in {file}"
            );
        }
        assert_eq!(
            state
                .unset_secrets("hello", &["DB".into(), "NOPE".into()])
                .unwrap(),
            vec!["DB"]
        );
        state.delete_app("hello").unwrap();
        assert!(state.app("hello").is_err());
    }
}
