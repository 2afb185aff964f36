//! The JSON documents of an image: manifests, indexes (manifest lists),
//! descriptors, platforms and the image config. Docker schema2 and OCI forms
//! share these types; the media type tells them apart.
//!
//! These types are for reading. Stored manifests are never re-serialized:
//! their digest is the hash of the registry's exact bytes.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::{Error, Result};

/// Media types Hangar reads and writes.
pub mod media {
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
    pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
    pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
    pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

    /// The `Accept` header for manifest requests: every form we can read.
    pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

    pub fn is_index(m: &str) -> bool {
        m == OCI_INDEX || m == DOCKER_LIST
    }

    pub fn is_manifest(m: &str) -> bool {
        m == OCI_MANIFEST || m == DOCKER_MANIFEST
    }

    /// Non-distributable ("foreign") layers: named by manifests, fetched
    /// from their `urls`, never pushed to a registry (OCI's deprecated
    /// `nondistributable` types and Docker's `foreign` one, as Windows
    /// base images use).
    pub fn is_foreign_layer(m: &str) -> bool {
        m.starts_with("application/vnd.oci.image.layer.nondistributable.v1.tar")
            || m == "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
    }
}

/// A pointer to content: media type, digest and size.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// The `platform` object of an index entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// The platform this binary runs on, in Go's naming.
    pub fn host() -> Platform {
        let (architecture, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "aarch64" => ("arm64", Some("v8")),
            "x86" => ("386", None),
            "arm" => ("arm", Some("v7")),
            "powerpc64" => ("ppc64le", None),
            "s390x" => ("s390x", None),
            "riscv64" => ("riscv64", None),
            other => (other, None),
        };
        Platform {
            os: "linux".into(),
            architecture: architecture.into(),
            variant: variant.map(str::to_string),
        }
    }

    /// Whether an index entry for `candidate` serves a request for `self`.
    /// A request without a variant takes any variant; arm64 treats a missing
    /// variant as `v8`, as containerd does.
    pub fn matches(&self, candidate: &Platform) -> bool {
        if self.os != candidate.os || self.architecture != candidate.architecture {
            return false;
        }
        let norm = |p: &Platform| match (p.architecture.as_str(), p.variant.as_deref()) {
            ("arm64", None) => Some("v8".to_string()),
            (_, v) => v.map(str::to_string),
        };
        match norm(self) {
            None => true,
            Some(v) if self.variant.is_none() => norm(candidate).is_none_or(|c| c == v),
            Some(v) => norm(candidate).as_deref() == Some(v.as_str()),
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl FromStr for Platform {
    type Err = Error;
    fn from_str(s: &str) -> Result<Platform> {
        let parts: Vec<&str> = s.split('/').collect();
        let ok =
            |p: &&str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !(2..=3).contains(&parts.len()) || !parts.iter().all(ok) {
            return Err(Error::InvalidPlatform { input: s.into() });
        }
        Ok(Platform {
            os: parts[0].into(),
            architecture: parts[1].into(),
            variant: parts.get(2).map(|v| v.to_string()),
        })
    }
}

/// An image manifest (OCI or Docker schema2).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// An image index (OCI) or manifest list (Docker).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// The parts of an image config Hangar reads. Unknown fields are ignored here
/// and kept in the stored bytes.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ImageConfig {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    #[serde(default)]
    pub config: Option<RunConfig>,
    pub rootfs: RootFs,
}

/// How to run the image: Docker's `config` object.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RunConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
}

/// `rootfs`: the uncompressed digests (DiffIDs) of the layers, in order.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RootFs {
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub diff_ids: Vec<Digest>,
}

/// A manifest or index, told apart by media type (or by shape when the
/// registry omits the type).
pub enum Document {
    Manifest(Manifest),
    Index(Index),
}

impl Document {
    /// Parse `bytes`, served with `content_type` (may be empty), naming `name` in errors.
    pub fn parse(bytes: &[u8], content_type: &str, name: &str) -> Result<(Document, String)> {
        let malformed = |reason: String| Error::Malformed {
            what: "manifest",
            name: name.to_string(),
            reason,
        };
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| malformed(format!("not JSON: {e}")))?;
        let declared = value
            .get("mediaType")
            .and_then(|v| v.as_str())
            .map(str::to_string);
        let content_type = content_type.split(';').next().unwrap_or("").trim();
        let media_type = match declared {
            Some(m) => m,
            None if media::is_index(content_type) || media::is_manifest(content_type) => {
                content_type.to_string()
            }
            None if value.get("manifests").is_some() => media::OCI_INDEX.to_string(),
            None if value.get("config").is_some() => media::OCI_MANIFEST.to_string(),
            None => return Err(malformed("neither a manifest nor an index".into())),
        };
        if value.get("schemaVersion").and_then(|v| v.as_u64()) != Some(2) {
            return Err(malformed(
                "schemaVersion is not 2 (schema1 manifests are not supported)".into(),
            ));
        }
        let doc = if media::is_index(&media_type) {
            Document::Index(serde_json::from_value(value).map_err(|e| malformed(e.to_string()))?)
        } else if media::is_manifest(&media_type) {
            Document::Manifest(serde_json::from_value(value).map_err(|e| malformed(e.to_string()))?)
        } else {
            return Err(malformed(format!("unsupported media type {media_type:?}")));
        };
        Ok((doc, media_type))
    }
}

impl Index {
    /// The entry for `wanted`, or an error listing the platforms there are.
    pub fn select(&self, wanted: &Platform, reference: &str) -> Result<&Descriptor> {
        let images = || {
            self.manifests
                .iter()
                .filter(|d| media::is_manifest(&d.media_type))
                .filter(|d| d.platform.as_ref().is_some_and(|p| p.os != "unknown"))
        };
        images()
            .find(|d| d.platform.as_ref().is_some_and(|p| wanted.matches(p)))
            .ok_or_else(|| {
                let mut available: Vec<String> = images()
                    .filter_map(|d| d.platform.as_ref().map(|p| p.to_string()))
                    .collect();
                available.dedup();
                Error::NoPlatform {
                    reference: reference.to_string(),
                    wanted: wanted.to_string(),
                    available: if available.is_empty() {
                        "none".into()
                    } else {
                        available.join(", ")
                    },
                }
            })
    }
}

impl ImageConfig {
    pub fn parse(bytes: &[u8], digest: &Digest) -> Result<ImageConfig> {
        serde_json::from_slice(bytes).map_err(|e| Error::Malformed {
            what: "image config",
            name: digest.to_string(),
            reason: e.to_string(),
        })
    }

    pub fn platform(&self) -> Platform {
        Platform {
            os: self.os.clone(),
            architecture: self.architecture.clone(),
            variant: self.variant.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Platform {
        s.parse().unwrap()
    }

    #[test]
    fn platform_matching() {
        assert!(p("linux/amd64").matches(&p("linux/amd64")));
        assert!(!p("linux/amd64").matches(&p("linux/arm64")));
        assert!(p("linux/arm64").matches(&p("linux/arm64/v8")));
        assert!(p("linux/arm64/v8").matches(&p("linux/arm64")));
        assert!(p("linux/arm").matches(&p("linux/arm/v6")));
        assert!(!p("linux/arm/v7").matches(&p("linux/arm/v6")));
        assert!("linux".parse::<Platform>().is_err());
        assert!("linux/amd64/v2/x".parse::<Platform>().is_err());
    }

    #[test]
    fn no_platform_error_lists_what_there_is() {
        let d = Digest::of(b"x");
        let entry = |plat: &str| Descriptor {
            media_type: media::OCI_MANIFEST.into(),
            digest: d.clone(),
            size: 1,
            platform: Some(p(plat)),
            annotations: None,
        };
        let index = Index {
            schema_version: 2,
            media_type: None,
            manifests: vec![entry("linux/arm64/v8"), entry("linux/s390x")],
            annotations: None,
        };
        let err = index
            .select(&p("linux/amd64"), "x/y:z")
            .unwrap_err()
            .to_string();
        assert!(err.contains("linux/arm64/v8, linux/s390x"), "{err}");
        assert!(index.select(&p("linux/s390x"), "x").is_ok());
    }
}
