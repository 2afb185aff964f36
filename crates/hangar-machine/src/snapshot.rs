//! Layer snapshots, the containerd idea from the seed: each layer unpacked
//! once into a read-only directory keyed by its ChainID (the digest of the
//! layer stack up to it), so every machine of an image, and every image
//! sharing a base, reuses the same directories as overlayfs lower layers.
//!
//! A snapshot is unpacked into a temp directory and renamed into place, so
//! a crash leaves none half-made. Machines hold leases (a file listing the
//! ChainIDs they use); `gc` removes snapshots neither a lease nor a stored
//! image needs.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

use hangar_oci::unpack::Unpacker;
use hangar_oci::{Digest, Image, Store};

use crate::error::{IoContext, Result};

/// ChainIDs of an image's layers, bottom first (OCI image spec).
pub fn chain_ids(diff_ids: &[Digest]) -> Vec<Digest> {
    let mut out: Vec<Digest> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => Digest::of(format!("{prev} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

pub struct Snapshots {
    root: PathBuf,
}

impl Snapshots {
    pub fn open(home: &Path) -> Result<Snapshots> {
        let root = home.join("machines/snapshots");
        fs::create_dir_all(&root).at(&root)?;
        Ok(Snapshots { root })
    }

    pub fn path(&self, chain: &Digest) -> PathBuf {
        self.root.join(chain.hex())
    }

    /// Make sure every layer of `image` has its snapshot; returns the
    /// snapshot directories bottom first and whether any had to be unpacked.
    pub fn prepare(&self, store: &Store, image: &Image) -> Result<(Vec<PathBuf>, bool)> {
        let chains = chain_ids(&image.config.rootfs.diff_ids);
        let mut dirs = Vec::new();
        let mut unpacked = false;
        for ((layer, diff_id), chain) in image
            .manifest
            .layers
            .iter()
            .zip(&image.config.rootfs.diff_ids)
            .zip(&chains)
        {
            let dir = self.path(chain);
            if !dir.is_dir() {
                let tmp = self
                    .root
                    .join(format!(".{}.tmp-{}", chain.hex(), std::process::id()));
                let _ = fs::remove_dir_all(&tmp);
                fs::create_dir_all(&tmp).at(&tmp)?;
                let result = Unpacker::for_overlay(&tmp).apply_verified(
                    store.open_blob(&layer.digest)?,
                    &layer.digest,
                    layer.size,
                    diff_id,
                );
                if let Err(e) = result {
                    let _ = fs::remove_dir_all(&tmp);
                    return Err(e.into());
                }
                if fs::rename(&tmp, &dir).is_err() {
                    // Someone else made it meanwhile: theirs is as good.
                    let _ = fs::remove_dir_all(&tmp);
                }
                unpacked = true;
            }
            dirs.push(dir);
        }
        Ok((dirs, unpacked))
    }

    /// Remove snapshots that no lease in `leases` and no image in `store` uses.
    pub fn gc(&self, store: &Store, leases: &HashSet<Digest>) -> Result<usize> {
        let mut keep = leases.clone();
        for record in store.list_images()? {
            if let Ok(image) = store.load(record) {
                keep.extend(chain_ids(&image.config.rootfs.diff_ids));
            }
        }
        let mut removed = 0;
        for entry in fs::read_dir(&self.root).at(&self.root)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let live = format!("sha256:{name}")
                .parse::<Digest>()
                .is_ok_and(|d| keep.contains(&d));
            if !live {
                fs::remove_dir_all(entry.path()).at(entry.path())?;
                removed += 1;
            }
        }
        // Micro-VM base disks go with the last snapshot of their image.
        let disks = self
            .root
            .parent()
            .map(|m| m.join("vmdisks"))
            .unwrap_or_default();
        for entry in fs::read_dir(&disks).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(hex) = name
                .strip_prefix("sha256-")
                .and_then(|n| n.strip_suffix(".ext4"))
            else {
                continue;
            };
            if !format!("sha256:{hex}")
                .parse::<Digest>()
                .is_ok_and(|d| keep.contains(&d))
            {
                fs::remove_file(entry.path()).at(entry.path())?;
                let _ = fs::remove_file(
                    disks.join(format!("{name}.lock").replace(".ext4.lock", ".lock")),
                );
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// ChainIDs leased by the machines under `home`.
pub fn leases(home: &Path) -> HashSet<Digest> {
    let mut out = HashSet::new();
    for entry in fs::read_dir(home.join("machines"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let lease = fs::read_to_string(entry.path().join("lease")).unwrap_or_default();
        out.extend(lease.lines().filter_map(|l| l.parse().ok()));
    }
    out
}

/// Remove the snapshots under `home` that no machine leases and no image in
/// `store` uses.
pub fn gc(home: &Path, store: &Store) -> Result<usize> {
    if !home.join("machines/snapshots").is_dir() {
        return Ok(0);
    }
    Snapshots::open(home)?.gc(store, &leases(home))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_spec() {
        let a = Digest::of(b"a");
        let b = Digest::of(b"b");
        let chains = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(chains[0], a);
        assert_eq!(chains[1], Digest::of(format!("{a} {b}").as_bytes()));
    }
}
