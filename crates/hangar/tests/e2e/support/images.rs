//! Test images: layer tars, compression, images written as OCI layouts.

use std::fs;
use std::io::Write;
use std::path::Path;

use super::harness::sha256_hex;

/// One entry of a test layer.
#[derive(Clone)]
pub enum Entry {
    Dir(&'static str, u32),
    File(&'static str, u32, Vec<u8>),
    Symlink(&'static str, &'static str),
    Hardlink(&'static str, &'static str),
    /// A whiteout or opaque marker is just an empty file with a special name.
    Whiteout(&'static str),
    /// A file with an owner other than root.
    Owned(&'static str, u64, u64),
    /// A character device (major, minor).
    CharDevice(&'static str, u32, u32),
    Fifo(&'static str),
}

#[derive(Clone, Copy, PartialEq)]
pub enum Compress {
    Gzip,
    Zstd,
    None,
}

/// Tar bytes for a layer.
pub fn layer_tar(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_600_000_000);
        match e {
            Entry::Dir(p, mode) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                h.set_size(0);
                b.append_data(&mut h, p, std::io::empty()).expect("dir");
            }
            Entry::File(p, mode, data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, p, &data[..]).expect("file");
            }
            Entry::Symlink(p, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, p, target).expect("symlink");
            }
            Entry::Hardlink(p, target) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_mode(0o644);
                h.set_size(0);
                b.append_link(&mut h, p, target).expect("hardlink");
            }
            Entry::Owned(p, uid, gid) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o640);
                h.set_uid(*uid);
                h.set_gid(*gid);
                h.set_size(5);
                b.append_data(&mut h, p, &b"owned"[..]).expect("owned");
            }
            Entry::CharDevice(p, major, minor) => {
                h.set_entry_type(tar::EntryType::Char);
                h.set_mode(0o666);
                h.set_size(0);
                h.set_device_major(*major).expect("major");
                h.set_device_minor(*minor).expect("minor");
                b.append_data(&mut h, p, std::io::empty()).expect("device");
            }
            Entry::Fifo(p) => {
                h.set_entry_type(tar::EntryType::Fifo);
                h.set_mode(0o640);
                h.set_size(0);
                b.append_data(&mut h, p, std::io::empty()).expect("fifo");
            }
            Entry::Whiteout(p) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o600);
                h.set_size(0);
                b.append_data(&mut h, p, std::io::empty())
                    .expect("whiteout");
            }
        }
    }
    b.into_inner().expect("tar")
}

pub fn compress(tar: &[u8], how: Compress) -> Vec<u8> {
    match how {
        Compress::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(tar).expect("gzip");
            e.finish().expect("gzip")
        }
        Compress::Zstd => zstd::encode_all(tar, 3).expect("zstd"),
        Compress::None => tar.to_vec(),
    }
}

/// A test image: its blobs and manifest, ready to serve or write as a layout.
pub struct BuiltImage {
    pub layers: Vec<(Vec<u8>, Compress)>,
    pub config: Vec<u8>,
    pub manifest: Vec<u8>,
}

impl BuiltImage {
    pub fn new(layers: &[(Vec<u8>, Compress)], arch: &str, cmd: &[&str]) -> BuiltImage {
        Self::with_diff_ids(layers, arch, cmd, None)
    }

    /// `diff_ids` overrides the real DiffIDs (to make a lying image).
    pub fn with_diff_ids(
        layers: &[(Vec<u8>, Compress)],
        arch: &str,
        cmd: &[&str],
        diff_ids: Option<Vec<String>>,
    ) -> BuiltImage {
        let blobs: Vec<(Vec<u8>, Compress)> = layers
            .iter()
            .map(|(tar, c)| (compress(tar, *c), *c))
            .collect();
        let diff_ids = diff_ids.unwrap_or_else(|| {
            layers
                .iter()
                .map(|(tar, _)| format!("sha256:{}", sha256_hex(tar)))
                .collect()
        });
        let config = serde_json::json!({
            "architecture": arch, "os": "linux",
            "config": {"Cmd": cmd, "Env": ["PATH=/bin"], "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        })
        .to_string()
        .into_bytes();
        let media = |c: Compress| match c {
            Compress::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compress::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
            Compress::None => "application/vnd.oci.image.layer.v1.tar",
        };
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{}", sha256_hex(&config)), "size": config.len()},
            "layers": blobs.iter().map(|(b, c)| serde_json::json!({"mediaType": media(*c), "digest": format!("sha256:{}", sha256_hex(b)), "size": b.len()})).collect::<Vec<_>>(),
        })
        .to_string()
        .into_bytes();
        BuiltImage {
            layers: blobs,
            config,
            manifest,
        }
    }

    pub fn manifest_hex(&self) -> String {
        sha256_hex(&self.manifest)
    }

    pub fn blobs(&self) -> Vec<Vec<u8>> {
        let mut v: Vec<Vec<u8>> = self.layers.iter().map(|(b, _)| b.clone()).collect();
        v.push(self.config.clone());
        v
    }

    /// Write as an OCI layout holding this image under `tag`.
    pub fn write_layout(&self, dir: &Path, tag: &str) {
        write_layout(dir, &[(self, tag)], None);
    }
}

/// Write an OCI layout with several images; with `index_tag`, they are
/// wrapped in one multi-platform index under that tag instead.
pub fn write_layout(dir: &Path, images: &[(&BuiltImage, &str)], index_tag: Option<&str>) {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).expect("layout dir");
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).expect("oci-layout");
    let mut descs = Vec::new();
    for (image, tag) in images {
        for b in image.blobs().into_iter().chain([image.manifest.clone()]) {
            fs::write(blobs.join(sha256_hex(&b)), &b).expect("blob");
        }
        let config: serde_json::Value = serde_json::from_slice(&image.config).expect("config");
        descs.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{}", image.manifest_hex()),
            "size": image.manifest.len(),
            "platform": {"os": "linux", "architecture": config["architecture"]},
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }));
    }
    let manifests = match index_tag {
        None => descs,
        Some(tag) => {
            let nested = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": descs}).to_string().into_bytes();
            fs::write(blobs.join(sha256_hex(&nested)), &nested).expect("index blob");
            vec![serde_json::json!({
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "digest": format!("sha256:{}", sha256_hex(&nested)),
                "size": nested.len(),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            })]
        }
    };
    let index = serde_json::json!({"schemaVersion": 2, "manifests": manifests});
    fs::write(dir.join("index.json"), index.to_string()).expect("index.json");
}
