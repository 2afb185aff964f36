//! `hangar image build`: one new layer from a directory, on an optional base
//! image, with config overrides. Reproducible: entries sorted by name, owner
//! root, every mtime set to the build epoch (`SOURCE_DATE_EPOCH`, default 0),
//! gzip without a timestamp, JSON with sorted keys. The same input gives the
//! same digest.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::digest::{Digest, Hasher};
use crate::error::{Error, IoContext, Result};
use crate::manifest::{media, Platform};
use crate::reference::Reference;
use crate::store::{ImageRecord, Store};

/// Config overrides and the base to build on.
#[derive(Clone, Debug, Default)]
pub struct BuildOptions {
    /// Base image, already in the store.
    pub base: Option<Reference>,
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    /// `KEY=VALUE`; replaces the base's value for the same key.
    pub env: Vec<String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    /// `PORT[/proto]`.
    pub expose: Vec<String>,
    /// Seconds since the epoch for every timestamp.
    pub epoch: u64,
}

/// Writer that hashes the uncompressed tar (the DiffID) on its way to gzip.
struct DiffTee<W: Write> {
    hasher: Hasher,
    inner: W,
}

impl<W: Write> Write for DiffTee<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// RFC 3339 UTC time for `secs` since the epoch.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The files of the build directory that stay out of the image:
/// `.hangarignore`, else `.dockerignore`, in `.gitignore` syntax (`!`
/// re-includes; a matched directory leaves out all it holds).
fn ignore_rules(root: &Path) -> Result<Option<ignore::gitignore::Gitignore>> {
    for name in [".hangarignore", ".dockerignore"] {
        let path = root.join(name);
        if !path.is_file() {
            continue;
        }
        let mut builder = ignore::gitignore::GitignoreBuilder::new(root);
        if let Some(e) = builder.add(&path) {
            return Err(Error::Invalid(format!(
                "{}: {e}; fix the pattern",
                path.display()
            )));
        }
        let rules = builder
            .build()
            .map_err(|e| Error::Invalid(format!("{}: {e}; fix the pattern", path.display())))?;
        return Ok(Some(rules));
    }
    Ok(None)
}

/// Append the tree at `root`, leaving out what its ignore file names;
/// returns the paths left out because they cannot be image content
/// (sockets).
fn append_tree<W: Write>(
    tar: &mut tar::Builder<W>,
    root: &Path,
    epoch: u64,
) -> Result<Vec<PathBuf>> {
    let ignored = ignore_rules(root)?;
    let mut skipped = Vec::new();
    let mut seen: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let mut names: Vec<_> = fs::read_dir(&dir)
            .at(&dir)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()
            .at(&dir)?;
        names.sort();
        let mut subdirs = Vec::new();
        for name in names {
            let rel = rel.join(&name);
            let full = root.join(&rel);
            let meta = fs::symlink_metadata(&full).at(&full)?;
            if ignored
                .as_ref()
                .is_some_and(|g| g.matched(&rel, meta.is_dir()).is_ignore())
            {
                continue;
            }
            let mut h = tar::Header::new_gnu();
            h.set_mode(meta.mode() & 0o7777);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(epoch);
            let ft = meta.file_type();
            let io_err = |e: io::Error| Error::Io {
                path: full.clone(),
                source: e,
            };
            if ft.is_dir() {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                tar.append_data(&mut h, &rel, io::empty()).map_err(io_err)?;
                subdirs.push(rel);
            } else if ft.is_symlink() {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                let target = fs::read_link(&full).at(&full)?;
                tar.append_link(&mut h, &rel, target).map_err(io_err)?;
            } else if ft.is_file() {
                if meta.nlink() > 1 {
                    if let Some(first) = seen.get(&(meta.dev(), meta.ino())) {
                        h.set_entry_type(tar::EntryType::Link);
                        h.set_size(0);
                        tar.append_link(&mut h, &rel, first).map_err(io_err)?;
                        continue;
                    }
                    seen.insert((meta.dev(), meta.ino()), rel.clone());
                }
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(meta.len());
                let file = fs::File::open(&full).at(&full)?;
                tar.append_data(&mut h, &rel, file).map_err(io_err)?;
            } else if ft.is_fifo() {
                h.set_entry_type(tar::EntryType::Fifo);
                h.set_size(0);
                tar.append_data(&mut h, &rel, io::empty()).map_err(io_err)?;
            } else if ft.is_char_device() || ft.is_block_device() {
                // As the tar format allows: the node itself, by number. (A
                // debootstrap root has them under dev/.)
                h.set_entry_type(if ft.is_char_device() {
                    tar::EntryType::Char
                } else {
                    tar::EntryType::Block
                });
                h.set_size(0);
                let rdev = meta.rdev();
                let major = ((rdev >> 32) & 0xffff_f000) | ((rdev >> 8) & 0xfff);
                let minor = ((rdev >> 12) & 0xffff_ff00) | (rdev & 0xff);
                h.set_device_major(major as u32).map_err(io_err)?;
                h.set_device_minor(minor as u32).map_err(io_err)?;
                tar.append_data(&mut h, &rel, io::empty()).map_err(io_err)?;
            } else {
                // Sockets mean nothing in an image: left out, counted.
                skipped.push(rel);
            }
        }
        // Depth-first in name order: push in reverse so the first pops first.
        stack.extend(subdirs.into_iter().rev());
    }
    Ok(skipped)
}

/// Build an image from `dir` and store it under `tag`.
pub fn build(
    store: &Store,
    dir: &Path,
    tag: &Reference,
    opts: &BuildOptions,
) -> Result<ImageRecord> {
    if !dir.is_dir() {
        return Err(Error::Invalid(format!(
            "{}: not a directory; pass the directory to build",
            dir.display()
        )));
    }
    let _lock = store.lock_shared()?;
    let base = opts.base.as_ref().map(|b| store.image(b)).transpose()?;

    let mut writer = store.new_blob()?;
    let diff_id = {
        let gz = flate2::GzBuilder::new().write(&mut writer, flate2::Compression::default());
        let mut tar = tar::Builder::new(DiffTee {
            hasher: Hasher::new(),
            inner: gz,
        });
        tar.mode(tar::HeaderMode::Deterministic);
        let skipped = append_tree(&mut tar, dir, opts.epoch)?;
        if let Some(first) = skipped.first() {
            // One line for all of them: a socket is never image content.
            eprintln!(
                "build: left out {} socket(s) of {} (first: {}); sockets cannot go into an image",
                skipped.len(),
                dir.display(),
                first.display()
            );
        }
        let tmp = store.root().join("tmp");
        let tee = tar.into_inner().at(&tmp)?;
        tee.inner.finish().at(&tmp)?;
        tee.hasher.finish().0
    };
    let layer = writer.finish(None, &dir.display().to_string())?;

    let created = rfc3339(opts.epoch);
    let mut config: Value = match &base {
        Some(b) => serde_json::from_slice(&b.config_bytes).map_err(|e| Error::Malformed {
            what: "image config",
            name: b.manifest.config.digest.to_string(),
            reason: e.to_string(),
        })?,
        None => {
            let host = Platform::host();
            let mut v = json!({"architecture": host.architecture, "os": host.os, "config": {}, "rootfs": {"type": "layers", "diff_ids": []}});
            if let Some(variant) = host.variant {
                v["variant"] = json!(variant);
            }
            v
        }
    };
    let obj = config
        .as_object_mut()
        .ok_or_else(|| Error::Invalid("base image config is not a JSON object".into()))?;
    obj.insert("created".into(), json!(created));
    let run = obj.entry("config").or_insert_with(|| json!({}));
    if !run.is_object() {
        *run = json!({});
    }
    let run = run
        .as_object_mut()
        .ok_or_else(|| Error::Invalid("config is not an object".into()))?;
    apply_overrides(run, opts);
    let rootfs = obj
        .entry("rootfs")
        .or_insert_with(|| json!({"type": "layers", "diff_ids": []}));
    match rootfs.get_mut("diff_ids").and_then(Value::as_array_mut) {
        Some(ids) => ids.push(json!(diff_id.to_string())),
        None => rootfs["diff_ids"] = json!([diff_id.to_string()]),
    }
    let history = obj.entry("history").or_insert_with(|| json!([]));
    if let Some(h) = history.as_array_mut() {
        h.push(json!({"created": created, "created_by": format!("hangar image build {}", dir.file_name().map(|n| n.to_string_lossy()).unwrap_or_default())}));
    }
    let config_bytes = serde_json::to_vec(&config).map_err(|e| Error::Invalid(e.to_string()))?;
    let config_digest = Digest::of(&config_bytes);

    let mut layers: Vec<Value> = base
        .as_ref()
        .map(|b| {
            b.manifest
                .layers
                .iter()
                .map(|l| {
                    let media_type = match l.media_type.as_str() {
                        media::DOCKER_LAYER_GZIP => media::OCI_LAYER_GZIP,
                        "application/vnd.docker.image.rootfs.diff.tar" => media::OCI_LAYER,
                        other => other,
                    };
                    json!({"mediaType": media_type, "digest": l.digest.to_string(), "size": l.size})
                })
                .collect()
        })
        .unwrap_or_default();
    layers.push(json!({"mediaType": media::OCI_LAYER_GZIP, "digest": layer.digest.to_string(), "size": layer.size}));
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_MANIFEST,
        "config": {"mediaType": media::OCI_CONFIG, "digest": config_digest.to_string(), "size": config_bytes.len()},
        "layers": layers,
    });
    let manifest_bytes =
        serde_json::to_vec(&manifest).map_err(|e| Error::Invalid(e.to_string()))?;

    layer.commit()?;
    store.put_bytes(&config_bytes)?;
    let digest = store.put_bytes(&manifest_bytes)?;
    let record = ImageRecord {
        reference: tag.to_string(),
        digest,
        media_type: media::OCI_MANIFEST.into(),
        index: None,
    };
    store.set_image(&record)?;
    Ok(record)
}

fn apply_overrides(run: &mut Map<String, Value>, opts: &BuildOptions) {
    if let Some(ep) = &opts.entrypoint {
        run.insert("Entrypoint".into(), json!(ep));
        // As in Docker: a new entrypoint drops the base's default arguments.
        if opts.cmd.is_none() {
            run.remove("Cmd");
        }
    }
    if let Some(cmd) = &opts.cmd {
        run.insert("Cmd".into(), json!(cmd));
    }
    if let Some(w) = &opts.workdir {
        run.insert("WorkingDir".into(), json!(w));
    }
    if let Some(u) = &opts.user {
        run.insert("User".into(), json!(u));
    }
    if !opts.env.is_empty() {
        let mut env: Vec<String> = run
            .get("Env")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        for kv in &opts.env {
            let key = kv.split('=').next().unwrap_or("");
            env.retain(|e| e.split('=').next() != Some(key));
            env.push(kv.clone());
        }
        run.insert("Env".into(), json!(env));
    }
    if !opts.expose.is_empty() {
        let ports = run.entry("ExposedPorts").or_insert_with(|| json!({}));
        if let Some(p) = ports.as_object_mut() {
            for port in &opts.expose {
                let key = if port.contains('/') {
                    port.clone()
                } else {
                    format!("{port}/tcp")
                };
                p.insert(key, json!({}));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn device_nodes_go_in_and_sockets_are_left_out() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: making device nodes needs root (CI runs as root)");
            return;
        }
        let src = tempfile::tempdir().unwrap();
        fs::create_dir(src.path().join("dev")).unwrap();
        let null = src.path().join("dev/null");
        let ok = std::process::Command::new("mknod")
            .args([null.to_str().unwrap(), "c", "1", "3"])
            .status()
            .unwrap();
        assert!(ok.success());
        let _socket = std::os::unix::net::UnixListener::bind(src.path().join("app.sock")).unwrap();
        let home = tempfile::tempdir().unwrap();
        let store = Store::open(home.path()).unwrap();
        let tag: Reference = "localhost/dev:1".parse().unwrap();
        build(&store, src.path(), &tag, &BuildOptions::default()).unwrap();
        let out = tempfile::tempdir().unwrap();
        let dest = out.path().join("root");
        crate::unpack::unpack_image(&store, &store.image(&tag).unwrap(), &dest).unwrap();
        let meta = fs::symlink_metadata(dest.join("dev/null")).unwrap();
        assert!(meta.file_type().is_char_device());
        assert_eq!(meta.rdev(), fs::symlink_metadata(&null).unwrap().rdev());
        assert!(!dest.join("app.sock").exists());
    }

    #[test]
    fn the_ignore_file_keeps_files_out() {
        let src = tempfile::tempdir().unwrap();
        for f in [
            "hangar.toml",
            "app.py",
            "notes.log",
            "keep.log",
            "target/big",
            "src/x.log",
        ] {
            let p = src.path().join(f);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, b"x").unwrap();
        }
        // .dockerignore counts only without a .hangarignore.
        fs::write(src.path().join(".dockerignore"), "app.py\n").unwrap();
        fs::write(
            src.path().join(".hangarignore"),
            "hangar.toml\n*.log\n!keep.log\ntarget/\n",
        )
        .unwrap();
        let home = tempfile::tempdir().unwrap();
        let store = Store::open(home.path()).unwrap();
        let tag: Reference = "localhost/ign:1".parse().unwrap();
        build(&store, src.path(), &tag, &BuildOptions::default()).unwrap();
        let out = tempfile::tempdir().unwrap();
        let dest = out.path().join("root");
        crate::unpack::unpack_image(&store, &store.image(&tag).unwrap(), &dest).unwrap();
        for kept in ["app.py", "keep.log", ".hangarignore", "src"] {
            assert!(dest.join(kept).exists(), "{kept} should be in the image");
        }
        for gone in ["hangar.toml", "notes.log", "target", "src/x.log"] {
            assert!(!dest.join(gone).exists(), "{gone} should be left out");
        }
        fs::write(src.path().join(".hangarignore"), "[z-a]\n").unwrap();
        let e = build(&store, src.path(), &tag, &BuildOptions::default()).unwrap_err();
        assert!(e.to_string().contains(".hangarignore"), "{e}");
    }

    #[test]
    fn builds_are_reproducible() {
        let src = tempfile::tempdir().unwrap();
        fs::create_dir(src.path().join("bin")).unwrap();
        fs::write(src.path().join("bin/app"), b"#!/bin/sh\necho hi\n").unwrap();
        fs::hard_link(src.path().join("bin/app"), src.path().join("bin/app2")).unwrap();
        std::os::unix::fs::symlink("app", src.path().join("bin/link")).unwrap();
        let tag: Reference = "localhost/t:1".parse().unwrap();
        let opts = BuildOptions {
            cmd: Some(vec!["/bin/app".into()]),
            env: vec!["A=1".into()],
            expose: vec!["8080".into()],
            ..Default::default()
        };
        let mut digests = Vec::new();
        for _ in 0..2 {
            let home = tempfile::tempdir().unwrap();
            let store = Store::open(home.path()).unwrap();
            digests.push(build(&store, src.path(), &tag, &opts).unwrap().digest);
            let image = store.image(&tag).unwrap();
            let run = image.config.config.unwrap();
            assert_eq!(run.cmd.unwrap(), vec!["/bin/app"]);
            assert!(run.exposed_ports.unwrap().contains_key("8080/tcp"));
        }
        assert_eq!(digests[0], digests[1]);
    }
}
