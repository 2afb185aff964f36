//! OCI image layout (`oci-layout`, `index.json`, `blobs/`), as a directory or
//! a tar: `hangar image save` and `hangar image load`, so images move without
//! a registry. skopeo and umoci read what `save` writes, and `load` reads
//! theirs.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::Path;

use serde_json::json;

use crate::digest::Digest;
use crate::error::{Error, IoContext, Result};
use crate::layer::{ingest_layer, Expected};
use crate::manifest::{media, Descriptor, Document, ImageConfig, Platform};
use crate::reference::Reference;
use crate::store::{staging_sibling, ImageRecord, Store};

/// Annotation containerd (and Hangar) use for the full image name.
const NAME_ANNOTATION: &str = "io.containerd.image.name";
/// The OCI annotation for the tag inside a layout.
const REF_ANNOTATION: &str = "org.opencontainers.image.ref.name";

/// True when `path` should be written as a tar rather than a directory.
fn is_tar_path(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "tar")
}

/// Write `reference` from the store as an OCI layout at `path` (a `.tar`
/// file, or a new directory).
pub fn save(store: &Store, reference: &Reference, path: &Path) -> Result<()> {
    let _lock = store.lock_shared()?;
    let image = store.image(reference)?;
    let tag = reference.tag.clone().unwrap_or_else(|| "latest".into());
    let index = json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_INDEX,
        "manifests": [{
            "mediaType": image.record.media_type,
            "digest": image.record.digest.to_string(),
            "size": image.manifest_bytes.len(),
            "annotations": {NAME_ANNOTATION: image.record.reference, REF_ANNOTATION: tag},
        }],
    });
    let index = serde_json::to_vec(&index).map_err(|e| Error::Invalid(e.to_string()))?;
    let layout = br#"{"imageLayoutVersion":"1.0.0"}"#;
    let blobs: Vec<Digest> = [
        image.record.digest.clone(),
        image.manifest.config.digest.clone(),
    ]
    .into_iter()
    .chain(image.manifest.layers.iter().map(|l| l.digest.clone()))
    .collect();
    let staging = staging_sibling(path, "save");
    let result = (|| {
        if is_tar_path(path) {
            let file = File::create(&staging).at(&staging)?;
            let mut tar = tar::Builder::new(BufWriter::with_capacity(1 << 20, file));
            tar.mode(tar::HeaderMode::Deterministic);
            let add =
                |tar: &mut tar::Builder<_>, name: &str, size: u64, data: &mut dyn io::Read| {
                    let mut h = tar::Header::new_gnu();
                    h.set_mode(0o644);
                    h.set_size(size);
                    tar.append_data(&mut h, name, data).at(&staging)
                };
            add(
                &mut tar,
                "oci-layout",
                layout.len() as u64,
                &mut &layout[..],
            )?;
            for d in &blobs {
                let mut f = store.open_blob(d)?;
                let size = f.metadata().at(store.blob_path(d))?.len();
                add(
                    &mut tar,
                    &format!("blobs/{}/{}", d.algorithm().name(), d.hex()),
                    size,
                    &mut f,
                )?;
            }
            add(&mut tar, "index.json", index.len() as u64, &mut &index[..])?;
            let mut w = tar.into_inner().at(&staging)?;
            w.flush().at(&staging)?;
            w.get_ref().sync_all().at(&staging)?;
        } else {
            if path.exists() {
                return Err(Error::Invalid(format!(
                    "{} already exists; save to a new directory or a .tar file",
                    path.display()
                )));
            }
            fs::create_dir_all(&staging).at(&staging)?;
            fs::write(staging.join("oci-layout"), layout).at(&staging)?;
            for d in &blobs {
                let blob_dir = staging.join("blobs").join(d.algorithm().name());
                fs::create_dir_all(&blob_dir).at(&blob_dir)?;
                let dest = blob_dir.join(d.hex());
                if fs::hard_link(store.blob_path(d), &dest).is_err() {
                    fs::copy(store.blob_path(d), &dest).at(&dest)?;
                }
            }
            fs::write(staging.join("index.json"), &index).at(&staging)?;
        }
        fs::rename(&staging, path).at(path)
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&staging);
        let _ = fs::remove_file(&staging);
    }
    result
}

/// Load every image of the OCI layout at `path` (directory or tar) into the
/// store. `name` names the image when the layout does not, or overrides it
/// when the layout holds exactly one.
pub fn load(store: &Store, path: &Path, name: Option<&Reference>) -> Result<Vec<ImageRecord>> {
    let _lock = store.lock_shared()?;
    if path.is_dir() {
        return load_dir(store, path, name);
    }
    // A tar may list its blobs in any order: unpack it under tmp/ first.
    let file = File::open(path).at(path)?;
    let scratch = store
        .root()
        .join("tmp")
        .join(format!("load-{}", std::process::id()));
    let _ = fs::remove_dir_all(&scratch);
    fs::create_dir_all(&scratch).at(&scratch)?;
    let result = (|| {
        let mut archive = tar::Archive::new(io::BufReader::with_capacity(1 << 20, file));
        for entry in archive.entries().at(path)? {
            let mut entry = entry.at(path)?;
            if entry.header().entry_type() != tar::EntryType::Regular {
                continue;
            }
            let rel = entry.path().at(path)?.into_owned();
            let rel = rel.strip_prefix("./").unwrap_or(&rel).to_path_buf();
            let is_blob = rel.starts_with("blobs")
                && rel.components().count() == 3
                && rel.parent().and_then(Path::file_name).is_some_and(|alg| {
                    rel.file_name().is_some_and(|n| {
                        format!("{}:{}", alg.to_string_lossy(), n.to_string_lossy())
                            .parse::<Digest>()
                            .is_ok()
                    })
                });
            let known = rel == Path::new("index.json") || rel == Path::new("oci-layout") || is_blob;
            if !known {
                continue;
            }
            let dest = scratch.join(&rel);
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent).at(parent)?;
            }
            let mut out = File::create(&dest).at(&dest)?;
            io::copy(&mut entry, &mut out).at(&dest)?;
        }
        load_dir(store, &scratch, name).map_err(|e| match e {
            Error::Io { path: p, source } if p.starts_with(&scratch) => Error::Io {
                path: path.join(p.strip_prefix(&scratch).unwrap_or(&p)),
                source,
            },
            other => other,
        })
    })();
    let _ = fs::remove_dir_all(&scratch);
    result
}

/// Where an OCI layout keeps blob `d`: `blobs/<alg>/<hex>`.
fn blob_in(dir: &Path, d: &Digest) -> std::path::PathBuf {
    dir.join("blobs").join(d.algorithm().name()).join(d.hex())
}

fn read_layout_blob(dir: &Path, d: &Descriptor) -> Result<Vec<u8>> {
    let path = blob_in(dir, &d.digest);
    let bytes = fs::read(&path).at(&path)?;
    if Digest::of_with(d.digest.algorithm(), &bytes) != d.digest || bytes.len() as u64 != d.size {
        return Err(Error::Verify {
            digest: d.digest.to_string(),
            source_name: path.display().to_string(),
            reason: "content does not match its descriptor".into(),
        });
    }
    Ok(bytes)
}

fn load_dir(store: &Store, dir: &Path, name: Option<&Reference>) -> Result<Vec<ImageRecord>> {
    let index_path = dir.join("index.json");
    let index_bytes = fs::read(&index_path).map_err(|e| Error::Io {
        path: index_path.clone(),
        source: io::Error::new(e.kind(), format!("{e} (is this an OCI image layout?)")),
    })?;
    let index = match Document::parse(
        &index_bytes,
        media::OCI_INDEX,
        &index_path.display().to_string(),
    )? {
        (Document::Index(i), _) => i,
        _ => {
            return Err(Error::Malformed {
                what: "layout index",
                name: index_path.display().to_string(),
                reason: "index.json is not an image index".into(),
            })
        }
    };
    if index.manifests.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: the layout holds no images",
            dir.display()
        )));
    }
    if name.is_some() && index.manifests.len() > 1 {
        return Err(Error::Invalid(format!(
            "{}: the layout holds {} images; --tag names only a layout with one",
            dir.display(),
            index.manifests.len()
        )));
    }
    let mut records = Vec::new();
    for entry in &index.manifests {
        let annotations = entry.annotations.clone().unwrap_or_default();
        let reference = match name {
            Some(n) => n.clone(),
            None => {
                let from = annotations.get(NAME_ANNOTATION).or_else(|| {
                    annotations
                        .get(REF_ANNOTATION)
                        .filter(|r| r.contains('/') || r.contains(':'))
                });
                match from {
                    Some(r) => r.parse()?,
                    None => {
                        return Err(Error::Invalid(format!(
                            "{}: image {} has no full name (tag {:?}); name it with --tag REF",
                            dir.display(),
                            entry.digest,
                            annotations
                                .get(REF_ANNOTATION)
                                .map(String::as_str)
                                .unwrap_or("")
                        )))
                    }
                }
            }
        };
        let mut desc = entry.clone();
        let mut index_digest = None;
        let mut bytes = read_layout_blob(dir, &desc)?;
        if media::is_index(&desc.media_type) {
            let (doc, _) = Document::parse(&bytes, &desc.media_type, &desc.digest.to_string())?;
            let Document::Index(nested) = doc else {
                return Err(Error::Malformed {
                    what: "index",
                    name: desc.digest.to_string(),
                    reason: "declared an index but is not one".into(),
                });
            };
            store.put_bytes(&bytes)?;
            index_digest = Some(desc.digest.clone());
            desc = nested
                .select(&Platform::host(), &reference.to_string())?
                .clone();
            bytes = read_layout_blob(dir, &desc)?;
        }
        let (doc, media_type) =
            Document::parse(&bytes, &desc.media_type, &desc.digest.to_string())?;
        let Document::Manifest(manifest) = doc else {
            return Err(Error::Malformed {
                what: "manifest",
                name: desc.digest.to_string(),
                reason: "expected an image manifest".into(),
            });
        };
        let config_bytes = read_layout_blob(dir, &manifest.config)?;
        let config = ImageConfig::parse(&config_bytes, &manifest.config.digest)?;
        if config.rootfs.diff_ids.len() != manifest.layers.len() {
            return Err(Error::Malformed {
                what: "image config",
                name: manifest.config.digest.to_string(),
                reason: "DiffIDs and layers differ in number".into(),
            });
        }
        let mut staged = Vec::new();
        for (layer, diff_id) in manifest.layers.iter().zip(&config.rootfs.diff_ids) {
            if store.has_blob(&layer.digest) {
                continue;
            }
            let path = blob_in(dir, &layer.digest);
            let file = File::open(&path).at(&path)?;
            let want = Expected {
                digest: &layer.digest,
                size: layer.size,
                diff_id: Some(diff_id),
            };
            staged.push(ingest_layer(
                store,
                io::BufReader::with_capacity(1 << 20, file),
                &want,
                &path.display().to_string(),
            )?);
        }
        for s in staged {
            s.commit()?;
        }
        store.put_bytes(&config_bytes)?;
        store.put_bytes(&bytes)?;
        let record = ImageRecord {
            reference: reference.to_string(),
            digest: desc.digest.clone(),
            media_type,
            index: index_digest,
        };
        store.set_image(&record)?;
        records.push(record);
    }
    Ok(records)
}
