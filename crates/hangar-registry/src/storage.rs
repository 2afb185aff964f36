//! The registry's data on disk, under `$HANGAR_HOME/registry`:
//!
//! ```text
//! oci/...                              a hangar-oci Store: every blob once, all orgs
//! repos/<name>/_repo/blobs/<hex>       this repository links the blob
//! repos/<name>/_repo/manifests/<hex>   ... links the manifest (content: its media type)
//! repos/<name>/_repo/tags/<tag>        tag -> manifest digest
//! repos/<name>/_repo/referrers/<subject hex>/<hex>   manifest <hex> has that subject
//! repos/<name>/_repo/public            anonymous pull is on
//! uploads/<id>                         upload data in progress (+ <id>.json)
//! tokens.json, secret                  API tokens (hashed), the HMAC key
//! ```
//!
//! `_repo` cannot clash with a repository path component: those start with a
//! letter or digit. Every link, tag and blob is written by atomic rename, and
//! a tag only after the manifest it names, so a crash never leaves a tag
//! pointing at nothing.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use hangar_oci::store::write_atomic;
use hangar_oci::{Digest, Store};

use crate::error::{Error, Result};

/// What `gc` removed (or, in a dry run, would remove).
#[derive(Debug, Default)]
pub struct RegistryGc {
    pub blobs: hangar_oci::store::GcStats,
    pub uploads: u64,
    pub upload_bytes: u64,
    pub empty_repos: Vec<String>,
}

/// Handle on the registry's directory.
#[derive(Clone)]
pub struct RegistryStore {
    root: PathBuf,
    /// Blob contents, shared by all repositories and orgs.
    pub blobs: Store,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn read_dir_names(dir: &Path) -> Result<Vec<String>> {
    match fs::read_dir(dir) {
        Ok(entries) => {
            let mut names = Vec::new();
            for e in entries {
                let e = e.map_err(io_err(dir))?;
                names.push(e.file_name().to_string_lossy().into_owned());
            }
            names.sort();
            Ok(names)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io_err(dir)(e)),
    }
}

impl RegistryStore {
    pub fn open(home: &Path) -> Result<RegistryStore> {
        let root = home.join("registry");
        let blobs = Store::open(&root)?;
        for d in ["repos", "uploads"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        Ok(RegistryStore { root, blobs })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn tmp(&self) -> PathBuf {
        self.blobs.root().join("tmp")
    }

    fn repo(&self, name: &str) -> PathBuf {
        self.root.join("repos").join(name).join("_repo")
    }

    fn write_link(&self, path: PathBuf, content: &[u8]) -> Result<()> {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        Ok(write_atomic(&self.tmp(), &path, content)?)
    }

    fn remove(&self, path: PathBuf) -> Result<bool> {
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// A repository exists once anything was pushed to it.
    pub fn repo_exists(&self, name: &str) -> bool {
        self.repo(name).is_dir()
    }

    pub fn link_blob(&self, name: &str, digest: &Digest) -> Result<()> {
        self.write_link(self.repo(name).join("blobs").join(digest.hex()), b"")
    }

    /// Whether `name` links `digest` and the store still has it.
    pub fn has_blob(&self, name: &str, digest: &Digest) -> bool {
        self.repo(name).join("blobs").join(digest.hex()).is_file() && self.blobs.has_blob(digest)
    }

    pub fn unlink_blob(&self, name: &str, digest: &Digest) -> Result<bool> {
        self.remove(self.repo(name).join("blobs").join(digest.hex()))
    }

    pub fn link_manifest(&self, name: &str, digest: &Digest, media_type: &str) -> Result<()> {
        self.write_link(
            self.repo(name).join("manifests").join(digest.hex()),
            media_type.as_bytes(),
        )
    }

    /// The media type of manifest `digest` in `name`, if linked.
    pub fn manifest_media_type(&self, name: &str, digest: &Digest) -> Option<String> {
        if !self.blobs.has_blob(digest) {
            return None;
        }
        fs::read_to_string(self.repo(name).join("manifests").join(digest.hex())).ok()
    }

    pub fn unlink_manifest(&self, name: &str, digest: &Digest) -> Result<bool> {
        let removed = self.remove(self.repo(name).join("manifests").join(digest.hex()))?;
        for tag in self.tags(name)? {
            if self.tag(name, &tag).as_ref() == Some(digest) {
                self.remove(self.repo(name).join("tags").join(&tag))?;
            }
        }
        let referrers = self.repo(name).join("referrers");
        for subject in read_dir_names(&referrers)? {
            self.remove(referrers.join(subject).join(digest.hex()))?;
        }
        Ok(removed)
    }

    pub fn manifests(&self, name: &str) -> Result<Vec<Digest>> {
        Ok(read_dir_names(&self.repo(name).join("manifests"))?
            .into_iter()
            .filter_map(|h| Digest::from_hex(&h))
            .collect())
    }

    pub fn set_tag(&self, name: &str, tag: &str, digest: &Digest) -> Result<()> {
        self.write_link(
            self.repo(name).join("tags").join(tag),
            digest.to_string().as_bytes(),
        )
    }

    pub fn tag(&self, name: &str, tag: &str) -> Option<Digest> {
        fs::read_to_string(self.repo(name).join("tags").join(tag))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    pub fn delete_tag(&self, name: &str, tag: &str) -> Result<bool> {
        self.remove(self.repo(name).join("tags").join(tag))
    }

    /// Tags, sorted.
    pub fn tags(&self, name: &str) -> Result<Vec<String>> {
        read_dir_names(&self.repo(name).join("tags"))
    }

    pub fn add_referrer(&self, name: &str, subject: &Digest, referrer: &Digest) -> Result<()> {
        self.write_link(
            self.repo(name)
                .join("referrers")
                .join(subject.hex())
                .join(referrer.hex()),
            b"",
        )
    }

    pub fn referrers(&self, name: &str, subject: &Digest) -> Result<Vec<Digest>> {
        Ok(
            read_dir_names(&self.repo(name).join("referrers").join(subject.hex()))?
                .into_iter()
                .filter_map(|h| Digest::from_hex(&h))
                .collect(),
        )
    }

    pub fn set_public(&self, name: &str, public: bool) -> Result<()> {
        let marker = self.repo(name).join("public");
        if public {
            self.write_link(marker, b"")
        } else {
            self.remove(marker).map(|_| ())
        }
    }

    pub fn is_public(&self, name: &str) -> bool {
        self.repo(name).join("public").is_file()
    }

    /// Every repository name, sorted.
    pub fn repos(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let base = self.root.join("repos");
        let mut stack = vec![String::new()];
        while let Some(prefix) = stack.pop() {
            let dir = if prefix.is_empty() {
                base.clone()
            } else {
                base.join(&prefix)
            };
            for child in read_dir_names(&dir)? {
                if child == "_repo" {
                    out.push(prefix.clone());
                } else {
                    stack.push(if prefix.is_empty() {
                        child
                    } else {
                        format!("{prefix}/{child}")
                    });
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// With the registry stopped: every upload goes (none can be in
    /// progress: an interrupted push left it), repositories with no
    /// manifest and no tag go (an interrupted first push left them; one
    /// made public stays), blobs no manifest needs lose their links, then
    /// every blob no repository's manifest needs is deleted. With
    /// `dry_run`, nothing is removed and the figures say what would be.
    pub fn gc(&self, dry_run: bool) -> Result<RegistryGc> {
        let Some(_lock) = self.blobs.try_lock_exclusive()? else {
            return Err(Error::Busy);
        };
        let mut report = RegistryGc::default();
        let uploads = self.root.join("uploads");
        for name in read_dir_names(&uploads)? {
            let path = uploads.join(&name);
            if !name.ends_with(".json") {
                report.uploads += 1;
            }
            report.upload_bytes += fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            if !dry_run {
                self.remove(path)?;
            }
        }
        let mut live = HashSet::new();
        for name in self.repos()? {
            let manifests = self.manifests(&name)?;
            if manifests.is_empty() && self.tags(&name)?.is_empty() && !self.is_public(&name) {
                report.empty_repos.push(name.clone());
                if !dry_run {
                    self.remove_repo(&name)?;
                }
                continue;
            }
            for m in manifests {
                live.insert(m.clone());
                let Ok(bytes) = self.blobs.read_blob(&m) else {
                    continue;
                };
                if let Ok(doc) = serde_json::from_slice::<serde_json::Value>(&bytes) {
                    for d in referenced(&doc) {
                        live.insert(d);
                    }
                }
            }
        }
        if !dry_run {
            for name in self.repos()? {
                for hex in read_dir_names(&self.repo(&name).join("blobs"))? {
                    if let Some(d) = Digest::from_hex(&hex) {
                        if !live.contains(&d) {
                            self.unlink_blob(&name, &d)?;
                        }
                    }
                }
            }
        }
        report.blobs = self.blobs.sweep_or_count(&live, dry_run)?;
        Ok(report)
    }

    /// Remove repository `name` and the directories it leaves empty.
    fn remove_repo(&self, name: &str) -> Result<()> {
        let dir = self.root.join("repos").join(name);
        fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
        let base = self.root.join("repos");
        let mut parent = dir.parent();
        while let Some(p) = parent.filter(|p| *p != base) {
            if fs::remove_dir(p).is_err() {
                break;
            }
            parent = p.parent();
        }
        Ok(())
    }

    fn upload_path(&self, id: &str) -> PathBuf {
        self.root.join("uploads").join(id)
    }

    /// Start an upload: an empty data file.
    pub fn start_upload(&self, id: &str) -> Result<PathBuf> {
        let path = self.upload_path(id);
        fs::File::create(&path).map_err(io_err(&path))?;
        Ok(path)
    }

    /// The data file of upload `id`, if it exists.
    pub fn upload(&self, id: &str) -> Option<PathBuf> {
        let path = self.upload_path(id);
        path.is_file().then_some(path)
    }

    pub fn cancel_upload(&self, id: &str) -> Result<bool> {
        self.remove(self.upload_path(id))
    }

    /// Remove uploads untouched for longer than `max_age`.
    pub fn clean_uploads(&self, max_age: std::time::Duration) -> Result<usize> {
        let dir = self.root.join("uploads");
        let mut removed = 0;
        for name in read_dir_names(&dir)? {
            let path = dir.join(&name);
            let old = fs::metadata(&path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > max_age);
            if old && self.remove(path)? {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// Digests a manifest or index points at: config, layers, child manifests, subject.
pub fn referenced(doc: &serde_json::Value) -> Vec<Digest> {
    let mut out = Vec::new();
    let mut add = |v: &serde_json::Value| {
        if let Some(d) = v
            .get("digest")
            .and_then(|d| d.as_str())
            .and_then(|d| d.parse().ok())
        {
            out.push(d);
        }
    };
    if let Some(c) = doc.get("config") {
        add(c);
    }
    for key in ["layers", "manifests", "blobs"] {
        for item in doc
            .get(key)
            .and_then(|l| l.as_array())
            .into_iter()
            .flatten()
        {
            add(item);
        }
    }
    out
}
