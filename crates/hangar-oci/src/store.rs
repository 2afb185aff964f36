//! The local content-addressed store under `$HANGAR_HOME/oci`:
//!
//! ```text
//! oci/lock                  flock: shared while writing, exclusive for gc
//! oci/blobs/<alg>/<hex>     every blob, stored once, named by its digest (sha256, sha512)
//! oci/tmp/                  blobs being written; never read as valid
//! oci/images/<name>.json    image records: reference -> manifest digest
//! oci/sources/<hex>         registry repositories a blob is known to be in
//! ```
//!
//! A blob appears under `blobs/` only by `rename` from `tmp/` after its
//! digest and size were verified and the file fsynced, so a crash at any point
//! leaves either nothing or a whole, valid blob. An image record is written the
//! same way, after all of its blobs.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::digest::{Algorithm, Digest, Hasher};
use crate::error::{Error, IoContext, Result};
use crate::manifest::{Document, ImageConfig, Manifest};
use crate::reference::Reference;

/// Handle on the store directory. Cheap to clone; all state is on disk.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

/// A held `flock` on the store; released on drop.
pub struct StoreLock {
    _file: File,
}

/// What the store knows of one named image.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageRecord {
    /// The normalized reference the image is stored under.
    pub reference: String,
    /// Digest of the platform-specific image manifest.
    pub digest: Digest,
    /// Media type of that manifest.
    pub media_type: String,
    /// Digest of the index it was selected from, when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<Digest>,
}

/// An image read back from the store.
pub struct Image {
    pub record: ImageRecord,
    pub manifest: Manifest,
    pub manifest_bytes: Vec<u8>,
    pub config: ImageConfig,
    pub config_bytes: Vec<u8>,
}

impl Image {
    /// Compressed size of config and layers, as registries report image size.
    pub fn size(&self) -> u64 {
        self.manifest.config.size + self.manifest.layers.iter().map(|l| l.size).sum::<u64>()
    }
}

/// What `gc` removed.
#[derive(Debug, Default, Clone, Copy)]
pub struct GcStats {
    pub blobs: u64,
    pub bytes: u64,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn tmp_name(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Make a rename durable by syncing the directory that holds it.
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).at(dir)
}

/// Write `bytes` to `path` atomically: temp file in `tmp_dir` (on the same
/// filesystem), fsync, rename, fsync the directory.
pub fn write_atomic(tmp_dir: &Path, path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_dir.join(tmp_name("write"));
    let result = (|| {
        let mut f = File::create(&tmp).at(&tmp)?;
        f.write_all(bytes).at(&tmp)?;
        f.sync_all().at(&tmp)?;
        fs::rename(&tmp, path).at(path)?;
        sync_dir(path.parent().unwrap_or(Path::new(".")))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// A hidden temp path beside `path` (same directory, so same filesystem):
/// build there, then `rename` onto `path`, and `path` is never half-made.
pub(crate) fn staging_sibling(path: &Path, purpose: &str) -> PathBuf {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    parent.join(format!(".{name}.hangar-{purpose}-{}", std::process::id()))
}

/// Block until `file` holds an exclusive `flock` (released when it closes).
pub fn flock_exclusive(file: &File) -> io::Result<()> {
    rustix::fs::flock(file, rustix::fs::FlockOperation::LockExclusive).map_err(io::Error::from)
}

/// File name for an image record: the reference with unsafe bytes escaped.
fn record_file_name(reference: &str) -> String {
    let mut out = String::with_capacity(reference.len() + 5);
    for b in reference.bytes() {
        if b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out.push_str(".json");
    out
}

impl Store {
    /// Open (creating if needed) the store under `home`.
    pub fn open(home: &Path) -> Result<Store> {
        let root = home.join("oci");
        for dir in ["blobs/sha256", "blobs/sha512", "tmp", "images", "sources"] {
            let path = root.join(dir);
            fs::create_dir_all(&path).at(&path)?;
        }
        Ok(Store { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn lock(&self, op: rustix::fs::FlockOperation) -> Result<StoreLock> {
        let path = self.root.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .at(&path)?;
        rustix::fs::flock(&file, op)
            .map_err(io::Error::from)
            .at(&path)?;
        Ok(StoreLock { _file: file })
    }

    /// Held by everything that adds to the store, so `gc` never runs under it.
    pub fn lock_shared(&self) -> Result<StoreLock> {
        self.lock(rustix::fs::FlockOperation::LockShared)
    }

    /// Held by `gc`: no writer is active while it decides what is unreferenced.
    pub fn lock_exclusive(&self) -> Result<StoreLock> {
        self.lock(rustix::fs::FlockOperation::LockExclusive)
    }

    /// The exclusive lock if nobody holds the lock now, else `None`.
    pub fn try_lock_exclusive(&self) -> Result<Option<StoreLock>> {
        match self.lock(rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(l) => Ok(Some(l)),
            Err(Error::Io { source, .. }) if source.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("blobs")
            .join(digest.algorithm().name())
            .join(digest.hex())
    }

    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Open a blob for reading.
    pub fn open_blob(&self, digest: &Digest) -> Result<File> {
        File::open(self.blob_path(digest)).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => Error::MissingBlob(digest.to_string()),
            _ => Error::Io {
                path: self.blob_path(digest),
                source: e,
            },
        })
    }

    /// Read a (small) blob whole and check it still hashes to its name.
    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>> {
        let mut bytes = Vec::new();
        self.open_blob(digest)?
            .read_to_end(&mut bytes)
            .at(self.blob_path(digest))?;
        if Digest::of_with(digest.algorithm(), &bytes) != *digest {
            return Err(Error::Verify {
                digest: digest.to_string(),
                source_name: self.blob_path(digest).display().to_string(),
                reason: "stored content no longer matches its digest; run `hangar image gc` and pull again".into(),
            });
        }
        Ok(bytes)
    }

    /// Start writing a new blob into `tmp/`, named by its sha256.
    pub fn new_blob(&self) -> Result<BlobWriter> {
        self.new_blob_for(Algorithm::Sha256)
    }

    /// Start writing a new blob hashed with `alg` (the algorithm of the
    /// digest it will be checked against).
    pub fn new_blob_for(&self, alg: Algorithm) -> Result<BlobWriter> {
        let path = self.root.join("tmp").join(tmp_name("blob"));
        let file = File::create(&path).at(&path)?;
        Ok(BlobWriter {
            file: io::BufWriter::with_capacity(256 * 1024, file),
            tmp: Some(path),
            hasher: Hasher::with(alg),
            blobs_dir: self.root.join("blobs"),
        })
    }

    /// Store `bytes` as a blob and return its (sha256) digest.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<Digest> {
        self.put_bytes_with(Algorithm::Sha256, bytes)
    }

    /// Store `bytes` as a blob named by its `alg` digest.
    pub fn put_bytes_with(&self, alg: Algorithm, bytes: &[u8]) -> Result<Digest> {
        let digest = Digest::of_with(alg, bytes);
        if !self.has_blob(&digest) {
            let mut w = self.new_blob_for(alg)?;
            w.write_all(bytes).at(self.root.join("tmp"))?;
            w.finish(None, "memory")?.commit()?;
        }
        Ok(digest)
    }

    fn record_path(&self, reference: &str) -> PathBuf {
        self.root.join("images").join(record_file_name(reference))
    }

    /// Name an image. Call only after all of its blobs are committed.
    pub fn set_image(&self, record: &ImageRecord) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(record).map_err(|e| Error::Invalid(e.to_string()))?;
        write_atomic(
            &self.root.join("tmp"),
            &self.record_path(&record.reference),
            &bytes,
        )
    }

    /// The record stored under `reference`, if any.
    pub fn image_record(&self, reference: &Reference) -> Result<Option<ImageRecord>> {
        let path = self.record_path(&reference.to_string());
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Error::Malformed {
                    what: "image record",
                    name: path.display().to_string(),
                    reason: e.to_string(),
                }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::Io { path, source: e }),
        }
    }

    /// Resolve a reference to a stored image. A reference by digest alone also
    /// finds an image whose manifest (or index) has that digest.
    pub fn resolve(&self, reference: &Reference) -> Result<ImageRecord> {
        if let Some(record) = self.image_record(reference)? {
            return Ok(record);
        }
        if let Some(digest) = &reference.digest {
            for record in self.list_images()? {
                // The same repository exactly: a digest stored under
                // another name (another org's) is not this reference's.
                let same_name = record
                    .reference
                    .parse::<Reference>()
                    .is_ok_and(|r| r.name() == reference.name());
                if (record.digest == *digest || record.index.as_ref() == Some(digest)) && same_name
                {
                    return Ok(record);
                }
            }
        }
        Err(Error::NotFound(reference.to_string()))
    }

    /// Load a stored image: manifest and config, verified against their digests.
    pub fn image(&self, reference: &Reference) -> Result<Image> {
        let record = self.resolve(reference)?;
        self.load(record)
    }

    pub fn load(&self, record: ImageRecord) -> Result<Image> {
        let manifest_bytes = self.read_blob(&record.digest)?;
        let manifest =
            match Document::parse(&manifest_bytes, &record.media_type, &record.reference)? {
                (Document::Manifest(m), _) => m,
                (Document::Index(_), _) => {
                    return Err(Error::Malformed {
                        what: "image record",
                        name: record.reference,
                        reason: "points at an index, not an image manifest".into(),
                    })
                }
            };
        let config_bytes = self.read_blob(&manifest.config.digest)?;
        let config = ImageConfig::parse(&config_bytes, &manifest.config.digest)?;
        Ok(Image {
            record,
            manifest,
            manifest_bytes,
            config,
            config_bytes,
        })
    }

    /// Every image record, sorted by reference.
    pub fn list_images(&self) -> Result<Vec<ImageRecord>> {
        let dir = self.root.join("images");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).at(&dir)? {
            let path = entry.at(&dir)?.path();
            if path.extension().is_some_and(|e| e == "json") {
                let bytes = fs::read(&path).at(&path)?;
                match serde_json::from_slice(&bytes) {
                    Ok(record) => out.push(record),
                    Err(e) => {
                        return Err(Error::Malformed {
                            what: "image record",
                            name: path.display().to_string(),
                            reason: format!("{e}; remove the file to forget that image"),
                        })
                    }
                }
            }
        }
        out.sort_by(|a: &ImageRecord, b| a.reference.cmp(&b.reference));
        Ok(out)
    }

    /// Forget the name `reference`. Its blobs stay until `gc`.
    pub fn remove_image(&self, reference: &Reference) -> Result<ImageRecord> {
        let record = self.resolve(reference)?;
        let path = self.record_path(&record.reference);
        fs::remove_file(&path).at(&path)?;
        sync_dir(&self.root.join("images"))?;
        Ok(record)
    }

    /// Remember that `digest` exists in `repository` of `registry`, for cross-repository mounts.
    pub fn add_source(&self, digest: &Digest, registry: &str, repository: &str) -> Result<()> {
        let line = format!("{registry}/{repository}");
        if self.sources(digest).contains(&line) {
            return Ok(());
        }
        let path = self.root.join("sources").join(digest.hex());
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .at(&path)?;
        f.write_all(format!("{line}\n").as_bytes()).at(&path)
    }

    /// `registry/repository` names the blob is known to be in.
    pub fn sources(&self, digest: &Digest) -> Vec<String> {
        fs::read_to_string(self.root.join("sources").join(digest.hex()))
            .map(|s| s.lines().map(str::to_string).collect())
            .unwrap_or_default()
    }

    /// Digests reachable from the image records.
    fn live_blobs(&self) -> Result<HashSet<Digest>> {
        let mut live = HashSet::new();
        for record in self.list_images()? {
            live.insert(record.digest.clone());
            if let Some(index) = &record.index {
                live.insert(index.clone());
            }
            if let Ok(image) = self.load(record) {
                live.insert(image.manifest.config.digest.clone());
                live.extend(image.manifest.layers.iter().map(|l| l.digest.clone()));
            }
        }
        Ok(live)
    }

    /// Move a finished file (on this filesystem) in as the blob `digest`.
    /// The caller has verified that the file hashes to `digest`.
    pub fn adopt_file(&self, path: &Path, digest: &Digest) -> Result<()> {
        File::open(path).and_then(|f| f.sync_all()).at(path)?;
        let dest = self.blob_path(digest);
        fs::rename(path, &dest).at(&dest)?;
        sync_dir(&self.root.join("blobs").join(digest.algorithm().name()))
    }

    /// Remove every blob no image needs, and every leftover temp file.
    pub fn gc(&self) -> Result<GcStats> {
        let _lock = self.lock_exclusive()?;
        let live = self.live_blobs()?;
        self.sweep(&live)
    }

    /// Delete every blob not in `live`, and every temp file. The caller holds
    /// the exclusive lock.
    pub fn sweep(&self, live: &HashSet<Digest>) -> Result<GcStats> {
        self.sweep_or_count(live, false)
    }

    /// What `sweep` would remove, or (`dry_run` false) removing it.
    pub fn sweep_or_count(&self, live: &HashSet<Digest>, dry_run: bool) -> Result<GcStats> {
        let mut stats = GcStats::default();
        for alg in Algorithm::ALL {
            let blobs = self.root.join("blobs").join(alg.name());
            if !blobs.is_dir() {
                continue;
            }
            for entry in fs::read_dir(&blobs).at(&blobs)? {
                let entry = entry.at(&blobs)?;
                let name = entry.file_name();
                let name = name.to_string_lossy();
                let keep = format!("{}:{name}", alg.name())
                    .parse::<Digest>()
                    .is_ok_and(|d| live.contains(&d));
                if !keep {
                    let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
                    if !dry_run {
                        fs::remove_file(entry.path()).at(entry.path())?;
                        let _ = fs::remove_file(self.root.join("sources").join(&*name));
                    }
                    stats.blobs += 1;
                    stats.bytes += size;
                }
            }
        }
        let tmp = self.root.join("tmp");
        for entry in fs::read_dir(&tmp).at(&tmp)? {
            let entry = entry.at(&tmp)?;
            stats.bytes += entry.metadata().map(|m| m.len()).unwrap_or(0);
            if !dry_run {
                fs::remove_file(entry.path()).at(entry.path())?;
            }
        }
        Ok(stats)
    }
}

/// A blob being written to `tmp/`. Dropped without [`BlobWriter::finish`],
/// it removes its temp file.
pub struct BlobWriter {
    file: io::BufWriter<File>,
    tmp: Option<PathBuf>,
    hasher: Hasher,
    blobs_dir: PathBuf,
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl BlobWriter {
    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.hasher.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hasher.is_empty()
    }

    /// Verify against `expected` (digest, size) when given, fsync, and hand
    /// back a blob that is ready to be committed. `source_name` names where the
    /// bytes came from in errors.
    pub fn finish(
        mut self,
        expected: Option<(&Digest, u64)>,
        source_name: &str,
    ) -> Result<StagedBlob> {
        let tmp = self.tmp.clone().unwrap_or_default();
        self.file.flush().at(&tmp)?;
        let hasher = std::mem::take(&mut self.hasher);
        let (digest, size) = hasher.finish();
        if let Some((want, want_size)) = expected {
            if size != want_size {
                return Err(Error::Verify {
                    digest: want.to_string(),
                    source_name: source_name.to_string(),
                    reason: format!("expected {want_size} bytes, got {size}"),
                });
            }
            if digest != *want {
                return Err(Error::Verify {
                    digest: want.to_string(),
                    source_name: source_name.to_string(),
                    reason: format!("content hashes to {digest}"),
                });
            }
        }
        self.file.get_ref().sync_all().at(&tmp)?;
        Ok(StagedBlob {
            tmp: self.tmp.take(),
            digest,
            size,
            blobs_dir: self.blobs_dir.clone(),
        })
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if let Some(tmp) = &self.tmp {
            let _ = fs::remove_file(tmp);
        }
    }
}

/// A verified, fsynced blob still in `tmp/`. [`StagedBlob::commit`] moves it
/// into place; dropping it removes it.
pub struct StagedBlob {
    tmp: Option<PathBuf>,
    pub digest: Digest,
    pub size: u64,
    blobs_dir: PathBuf,
}

impl StagedBlob {
    pub fn commit(mut self) -> Result<Digest> {
        if let Some(tmp) = self.tmp.take() {
            let dir = self.blobs_dir.join(self.digest.algorithm().name());
            let dest = dir.join(self.digest.hex());
            fs::rename(&tmp, &dest).at(&dest)?;
            sync_dir(&dir)?;
        }
        Ok(self.digest.clone())
    }
}

impl Drop for StagedBlob {
    fn drop(&mut self) {
        if let Some(tmp) = &self.tmp {
            let _ = fs::remove_file(tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_blobs_appear_only_on_commit() {
        let home = tempfile::tempdir().unwrap();
        let store = Store::open(home.path()).unwrap();
        let mut w = store.new_blob().unwrap();
        w.write_all(b"hello").unwrap();
        let want = Digest::of(b"hello");
        let staged = w.finish(Some((&want, 5)), "test").unwrap();
        assert!(!store.has_blob(&want));
        staged.commit().unwrap();
        assert_eq!(store.read_blob(&want).unwrap(), b"hello");
    }

    #[test]
    fn a_mismatch_leaves_nothing() {
        let home = tempfile::tempdir().unwrap();
        let store = Store::open(home.path()).unwrap();
        let mut w = store.new_blob().unwrap();
        w.write_all(b"hello").unwrap();
        let wrong = Digest::of(b"other");
        let err = w
            .finish(Some((&wrong, 5)), "http://x/blob")
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("http://x/blob") && err.contains(&wrong.to_string()),
            "{err}"
        );
        assert_eq!(fs::read_dir(store.root().join("tmp")).unwrap().count(), 0);
        assert_eq!(
            fs::read_dir(store.root().join("blobs/sha256"))
                .unwrap()
                .count(),
            0
        );
    }

    #[test]
    fn record_names_escape_slashes() {
        assert_eq!(
            record_file_name("h:5000/a/b:t"),
            "h%3A5000%2Fa%2Fb%3At.json"
        );
    }
}
