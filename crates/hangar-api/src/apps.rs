//! Apps, their releases and their secrets: the types, as the store keeps
//! them (see [`crate::store::Store`]), and the sealing of secrets.
//!
//! An app owns the machines whose `app` names it. A release is one
//! deploy: the image and the machine config template, and how it ended.
//! Secrets are sealed at rest with a key in `$HANGAR_HOME/secrets.key`
//! (ChaCha20-Poly1305 from ring, with a format byte; see [`Sealer`]) and are
//! only ever opened to go into a machine's environment.

use std::path::Path;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::config::MachineConfig;
use crate::error::{Error, Result};

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
    /// Its alert rules, webhook and own dashboards.
    #[serde(default)]
    pub observe: crate::observe::Observe,
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

/// The first hex digits of SHA-256 over a secret's value.
pub(crate) fn short_digest(value: &str) -> String {
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
        Sealer::from_key(&Sealer::key_of(home)?)
    }

    /// The bytes of the node's key (`home/secrets.key`), made if missing.
    pub fn key_of(home: &Path) -> Result<Vec<u8>> {
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
        Ok(key)
    }

    /// The sealer of a 64-byte key (in a cluster, the cluster's: every
    /// node opens every app's secrets).
    pub fn from_key(key: &[u8]) -> Result<Sealer> {
        if key.len() != 64 {
            return Err(Error::Internal("a secrets key is 64 bytes".into()));
        }
        // A key of its own for the AEAD, so no key serves two constructions.
        let mut derive = <HmacSha256 as Mac>::new_from_slice(key).expect("any key length");
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
}
