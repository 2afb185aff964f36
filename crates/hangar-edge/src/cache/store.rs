//! Stored objects: a memory tier and an optional disk tier, each with a
//! byte limit and S3-FIFO eviction. Every object is written through to
//! disk (when there is a disk tier) and kept in memory while it is hot;
//! a disk hit is read back into memory.
//!
//! A disk object is one file, `objects/<2 hex>/<sha256 of key>`:
//! `HGC1`, one flags byte (bit 0: soft-purged), a little-endian u32 length,
//! the metadata as JSON, then the body. It is written under `tmp/` and
//! renamed into place, so a crash leaves either the whole object or none;
//! at start the index is rebuilt from the files and `tmp/` is emptied.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::evict::S3Fifo;
use super::policy::{self, Directives, Times};

const MAGIC: &[u8; 4] = b"HGC1";
const FLAG_INVALIDATED: u8 = 1;

/// What is known about a stored response besides its body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    /// The full key: primary key and the normalized Vary values.
    pub key: String,
    /// `host` + path and query: the primary key.
    pub primary: String,
    pub host: String,
    /// Path and query.
    pub url: String,
    /// The request headers this response varies on (lowercase names).
    pub vary: Vec<String>,
    pub status: u16,
    headers: Vec<(String, String)>,
    pub times: Times,
    /// Freshness lifetime in seconds, as computed when stored.
    pub lifetime: f64,
    /// Surrogate keys (`Surrogate-Key` and `Cache-Tag`).
    pub tags: Vec<String>,
    pub body_len: u64,
    /// Soft-purged: treated as stale.
    #[serde(skip)]
    pub invalidated: bool,
    #[serde(skip)]
    header_map: HeaderMap,
    /// Parsed once: the response's cache directives and its initial age.
    #[serde(skip)]
    pub directives: Directives,
    #[serde(skip)]
    pub initial_age: f64,
}

impl Meta {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        key: String,
        primary: String,
        host: String,
        url: String,
        vary: Vec<String>,
        status: u16,
        header_map: HeaderMap,
        times: Times,
        lifetime: f64,
        tags: Vec<String>,
        body_len: u64,
    ) -> Option<Meta> {
        let mut headers = Vec::with_capacity(header_map.len());
        let mut header_map = header_map;
        // Another tier's entry described that tier's answer then, not this
        // one's hits later.
        header_map.remove("cache-status");
        for (k, v) in &header_map {
            // Header values that are not text are not stored (rare).
            headers.push((k.as_str().to_string(), v.to_str().ok()?.to_string()));
        }
        let directives = Directives::for_edge(&header_map);
        let initial_age = policy::initial_age(&header_map, times);
        Some(Meta {
            directives,
            initial_age,
            key,
            primary,
            host,
            url,
            vary,
            status,
            headers,
            times,
            lifetime,
            tags,
            body_len,
            invalidated: false,
            header_map,
        })
    }

    pub fn headers(&self) -> &HeaderMap {
        &self.header_map
    }

    /// The same object with new headers and times (a 304 merged in).
    pub fn refreshed(&self, header_map: HeaderMap, times: Times, lifetime: f64) -> Option<Meta> {
        let mut m = Meta::new(
            self.key.clone(),
            self.primary.clone(),
            self.host.clone(),
            self.url.clone(),
            self.vary.clone(),
            self.status,
            header_map,
            times,
            lifetime,
            self.tags.clone(),
            self.body_len,
        )?;
        m.invalidated = false;
        Some(m)
    }

    fn rebuild_map(&mut self) -> Option<()> {
        let mut map = HeaderMap::with_capacity(self.headers.len());
        for (k, v) in &self.headers {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).ok()?,
                HeaderValue::from_str(v).ok()?,
            );
        }
        self.directives = Directives::for_edge(&map);
        self.initial_age = policy::initial_age(&map, self.times);
        self.header_map = map;
        Some(())
    }
}

/// A cached object as a lookup returns it.
#[derive(Clone)]
pub struct Object {
    pub meta: Arc<Meta>,
    pub body: Bytes,
}

struct Entry {
    meta: Arc<Meta>,
    body: Option<Bytes>,
    on_disk: bool,
    /// A disk write of this entry is under way.
    writing: bool,
}

struct Inner {
    entries: HashMap<Arc<str>, Entry>,
    /// Primary key -> the full keys stored under it (its Vary variants):
    /// a URL's invalidation touches only these. Ordered, so that a prefix
    /// (a host, or a host and a path prefix) is a range.
    variants: BTreeMap<String, Vec<Arc<str>>>,
    /// Surrogate key -> the full keys carrying it.
    tags: HashMap<String, HashSet<Arc<str>>>,
    /// Primary key -> the request headers its stored responses vary on.
    vary: HashMap<String, Vec<String>>,
    mem: S3Fifo<Arc<str>>,
    disk: S3Fifo<Arc<str>>,
}

/// Byte limits of the two tiers.
#[derive(Debug, Clone)]
pub struct Limits {
    pub memory: u64,
    /// The disk tier's directory and bytes; `None`: memory only.
    pub disk: Option<(PathBuf, u64)>,
}

pub struct Store {
    inner: Mutex<Inner>,
    dir: Option<PathBuf>,
}

/// A cache directory that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("cache directory {path}: {source}")]
pub struct DiskError {
    path: PathBuf,
    source: std::io::Error,
}

impl Store {
    /// Open the store; with a disk tier, index the objects already there.
    pub fn open(limits: Limits) -> Result<Store, DiskError> {
        let mut inner = Inner {
            entries: HashMap::new(),
            variants: BTreeMap::new(),
            tags: HashMap::new(),
            vary: HashMap::new(),
            mem: S3Fifo::new(limits.memory),
            disk: S3Fifo::new(limits.disk.as_ref().map(|d| d.1).unwrap_or(0)),
        };
        let dir = match limits.disk {
            None => None,
            Some((dir, _)) => {
                let err = |path: &Path| {
                    let path = path.to_path_buf();
                    move |source| DiskError { path, source }
                };
                let tmp = dir.join("tmp");
                let _ = std::fs::remove_dir_all(&tmp);
                std::fs::create_dir_all(&tmp).map_err(err(&tmp))?;
                let objects = dir.join("objects");
                std::fs::create_dir_all(&objects).map_err(err(&objects))?;
                for sub in std::fs::read_dir(&objects)
                    .map_err(err(&objects))?
                    .flatten()
                {
                    for file in std::fs::read_dir(sub.path())
                        .into_iter()
                        .flatten()
                        .flatten()
                    {
                        let path = file.path();
                        match read_meta(&path) {
                            Some(meta)
                                if file_name(&meta.key)
                                    == path.file_name().and_then(|n| n.to_str()).unwrap_or("") =>
                            {
                                let key: Arc<str> = Arc::from(meta.key.as_str());
                                inner.vary.insert(meta.primary.clone(), meta.vary.clone());
                                for gone in inner.disk.insert(key.clone(), meta.body_len) {
                                    inner.remove_entry(&gone);
                                    let _ = std::fs::remove_file(object_path(&dir, &gone));
                                }
                                if inner.disk.contains(&key) {
                                    inner.insert_entry(
                                        key,
                                        Entry {
                                            meta: Arc::new(meta),
                                            body: None,
                                            on_disk: true,
                                            writing: false,
                                        },
                                    );
                                }
                            }
                            _ => {
                                let _ = std::fs::remove_file(&path);
                            }
                        }
                    }
                }
                Some(dir)
            }
        };
        Ok(Store {
            inner: Mutex::new(inner),
            dir,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// (memory bytes, disk bytes)
    pub fn bytes(&self) -> (u64, u64) {
        let inner = self.lock();
        (inner.mem.bytes(), inner.disk.bytes())
    }

    /// Find what is stored for a request: the full key (the primary key
    /// with the request's values of the headers stored responses vary on)
    /// and the object, if any.
    pub async fn lookup(&self, primary: &str, req: &HeaderMap) -> (String, Option<Object>) {
        let (key, meta) = {
            let mut inner = self.lock();
            let key = match inner.vary.get(primary) {
                Some(vary) if !vary.is_empty() => super::full_key(primary, vary, req),
                _ => primary.to_string(),
            };
            match Self::memory_hit(&mut inner, &key) {
                Some(Ok(obj)) => return (key, Some(obj)),
                Some(Err(meta)) => (key, meta),
                None => return (key, None),
            }
        };
        let obj = self.read_back(&key, meta).await;
        (key, obj)
    }

    /// The object in memory (`Ok`), or its metadata when only the disk has
    /// the body (`Err`); `None` when not stored.
    fn memory_hit(inner: &mut Inner, key: &str) -> Option<Result<Object, Arc<Meta>>> {
        let entry = inner.entries.get(key)?;
        let meta = entry.meta.clone();
        let Some(body) = entry.body.clone() else {
            return Some(Err(meta));
        };
        inner.mem.touch(key);
        inner.disk.touch(key);
        Some(Ok(Object { meta, body }))
    }

    /// Look `key` up in memory, then on disk.
    pub async fn get(&self, key: &str) -> Option<Object> {
        let meta = match Self::memory_hit(&mut self.lock(), key)? {
            Ok(obj) => return Some(obj),
            Err(meta) => meta,
        };
        self.read_back(key, meta).await
    }

    /// Read a body from disk back into the memory tier.
    async fn read_back(&self, key: &str, meta: Arc<Meta>) -> Option<Object> {
        let dir = self.dir.clone()?;
        let path = object_path(&dir, key);
        let want = meta.body_len;
        let body = tokio::task::spawn_blocking(move || read_body(&path, want))
            .await
            .ok()
            .flatten()?;
        let body = Bytes::from(body);
        let mut inner = self.lock();
        let k: Arc<str> = Arc::from(key);
        let same = inner
            .entries
            .get(key)
            .is_some_and(|e| Arc::ptr_eq(&e.meta, &meta));
        if same {
            inner.disk.touch(&k);
            let evicted = inner.mem.insert(k.clone(), meta.body_len);
            if let Some(e) = inner.entries.get_mut(key) {
                e.body = Some(body.clone());
            }
            drop_from_memory(&mut inner, evicted);
        }
        Some(Object { meta, body })
    }

    /// Store (or replace) an object. The memory tier has it at once; the
    /// disk copy is written in the background.
    pub fn put(self: &Arc<Self>, meta: Meta, body: Bytes) {
        let key: Arc<str> = Arc::from(meta.key.as_str());
        let meta = Arc::new(meta);
        let mut inner = self.lock();
        inner.vary.insert(meta.primary.clone(), meta.vary.clone());
        let was_on_disk = inner.entries.get(&key).is_some_and(|e| e.on_disk);
        let writing = self.dir.is_some();
        inner.insert_entry(
            key.clone(),
            Entry {
                meta: meta.clone(),
                body: Some(body.clone()),
                on_disk: was_on_disk,
                writing,
            },
        );
        let evicted = inner.mem.insert(key.clone(), meta.body_len);
        drop_from_memory(&mut inner, evicted);
        drop(inner);
        if let Some(dir) = self.dir.clone() {
            let store = self.clone();
            tokio::task::spawn_blocking(move || store.write_disk(&dir, key, meta, &body));
        }
    }

    fn write_disk(&self, dir: &Path, key: Arc<str>, meta: Arc<Meta>, body: &[u8]) {
        let path = object_path(dir, &key);
        let written = match write_object(dir, &path, &meta, body) {
            Ok(()) => true,
            Err(e) => {
                // Still served from memory; only the disk tier misses it.
                tracing::warn!("disk cache: {}: {e}", path.display());
                false
            }
        };
        let mut inner = self.lock();
        if let Some(e) = inner.entries.get_mut(&key) {
            if Arc::ptr_eq(&e.meta, &meta) {
                e.writing = false;
                if !written && e.body.is_none() && !e.on_disk {
                    inner.remove_entry(&key);
                }
            }
        }
        if !written {
            return;
        }
        // Purged or replaced while being written: this file is not current.
        if !inner
            .entries
            .get(&key)
            .is_some_and(|e| Arc::ptr_eq(&e.meta, &meta))
        {
            if !inner.entries.contains_key(&key) {
                let _ = std::fs::remove_file(&path);
            }
            return;
        }
        if let Some(e) = inner.entries.get_mut(&key) {
            e.on_disk = true;
        }
        let evicted = inner.disk.insert(key, meta.body_len);
        let mut gone = Vec::new();
        for k in evicted {
            let in_memory = inner.entries.get_mut(&k).map(|e| {
                e.on_disk = false;
                e.body.is_some()
            });
            if in_memory == Some(false) {
                inner.remove_entry(&k);
            }
            gone.push(object_path(dir, &k));
        }
        drop(inner);
        for p in gone {
            let _ = std::fs::remove_file(p);
        }
    }

    /// Remove (or with `soft`, mark stale) every variant of one URL.
    /// Returns how many objects. Like every purge, it reads an index: the
    /// store lock is held for the objects purged, not for all objects.
    pub fn purge_primary(&self, primary: &str, soft: bool) -> usize {
        let inner = self.lock();
        let keys = inner.variants.get(primary).cloned().unwrap_or_default();
        self.purge_keys(inner, keys, soft)
    }

    /// Every object whose primary key starts with `prefix`.
    pub fn purge_prefix(&self, prefix: &str, soft: bool) -> usize {
        let inner = self.lock();
        let keys: Vec<Arc<str>> = inner
            .variants
            .range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(primary, _)| primary.starts_with(prefix))
            .flat_map(|(_, keys)| keys.iter().cloned())
            .collect();
        self.purge_keys(inner, keys, soft)
    }

    /// Every object carrying the surrogate key `tag` (of `host` only, if given).
    pub fn purge_tag(&self, tag: &str, host: Option<&str>, soft: bool) -> usize {
        let inner = self.lock();
        let keys: Vec<Arc<str>> = inner
            .tags
            .get(tag)
            .into_iter()
            .flatten()
            .filter(|k| {
                host.is_none_or(|h| inner.entries.get(*k).is_some_and(|e| e.meta.host == h))
            })
            .cloned()
            .collect();
        self.purge_keys(inner, keys, soft)
    }

    fn purge_keys(
        &self,
        mut inner: std::sync::MutexGuard<'_, Inner>,
        keys: Vec<Arc<str>>,
        soft: bool,
    ) -> usize {
        let mut files = Vec::new();
        for key in &keys {
            if soft {
                if let Some(e) = inner.entries.get_mut(key) {
                    let mut meta = (*e.meta).clone();
                    meta.invalidated = true;
                    e.meta = Arc::new(meta);
                    if e.on_disk {
                        files.push((key.clone(), true));
                    }
                }
            } else if let Some(e) = inner.remove_entry(key) {
                inner.mem.remove(key);
                inner.disk.remove(key);
                if e.on_disk {
                    files.push((key.clone(), false));
                }
            }
        }
        drop(inner);
        if let Some(dir) = &self.dir {
            for (key, soft) in files {
                let path = object_path(dir, &key);
                // Gone from memory either way; on disk, a file that stays
                // fresh would be served again after a restart.
                let done = if soft {
                    mark_invalidated(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                match done {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => tracing::warn!(
                        "purge: {}: {e}; it may be served again after a restart",
                        path.display()
                    ),
                }
            }
        }
        keys.len()
    }
}

impl Inner {
    fn insert_entry(&mut self, key: Arc<str>, entry: Entry) {
        let primary = entry.meta.primary.clone();
        let tags = entry.meta.tags.clone();
        match self.entries.insert(key.clone(), entry) {
            None => self.variants.entry(primary).or_default().push(key.clone()),
            Some(old) => self.untag(&key, &old.meta.tags),
        }
        for tag in tags {
            self.tags.entry(tag).or_default().insert(key.clone());
        }
    }

    fn untag(&mut self, key: &str, tags: &[String]) {
        for tag in tags {
            if let Some(keys) = self.tags.get_mut(tag) {
                keys.remove(key);
                if keys.is_empty() {
                    self.tags.remove(tag);
                }
            }
        }
    }

    fn remove_entry(&mut self, key: &str) -> Option<Entry> {
        let e = self.entries.remove(key)?;
        self.untag(key, &e.meta.tags);
        if let Some(keys) = self.variants.get_mut(&e.meta.primary) {
            keys.retain(|k| &**k != key);
            if keys.is_empty() {
                self.variants.remove(&e.meta.primary);
            }
        }
        Some(e)
    }
}

fn drop_from_memory(inner: &mut Inner, evicted: Vec<Arc<str>>) {
    for k in evicted {
        let kept = inner.entries.get_mut(&k).map(|e| {
            e.body = None;
            e.on_disk || e.writing
        });
        if kept == Some(false) {
            inner.remove_entry(&k);
        }
    }
}

fn file_name(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

fn object_path(dir: &Path, key: &str) -> PathBuf {
    let name = file_name(key);
    dir.join("objects").join(&name[..2]).join(name)
}

fn write_object(dir: &Path, path: &Path, meta: &Meta, body: &[u8]) -> std::io::Result<()> {
    let json = serde_json::to_vec(meta).map_err(std::io::Error::other)?;
    let tmp = dir.join("tmp").join(format!(
        "{}.{}",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("object"),
        std::process::id()
    ));
    let mut f = std::fs::File::create(&tmp)?;
    let mut head = Vec::with_capacity(9 + json.len());
    head.extend_from_slice(MAGIC);
    head.push(if meta.invalidated {
        FLAG_INVALIDATED
    } else {
        0
    });
    head.extend_from_slice(&(json.len() as u32).to_le_bytes());
    head.extend_from_slice(&json);
    f.write_all(&head)?;
    f.write_all(body)?;
    drop(f);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::rename(&tmp, path)
}

fn read_header(f: &mut std::fs::File) -> Option<(u8, Meta)> {
    let mut head = [0u8; 9];
    f.read_exact(&mut head).ok()?;
    if &head[..4] != MAGIC {
        return None;
    }
    let len = u32::from_le_bytes([head[5], head[6], head[7], head[8]]) as usize;
    if len > 1 << 20 {
        return None;
    }
    let mut json = vec![0u8; len];
    f.read_exact(&mut json).ok()?;
    let mut meta: Meta = serde_json::from_slice(&json).ok()?;
    meta.rebuild_map()?;
    meta.invalidated = head[4] & FLAG_INVALIDATED != 0;
    let total = f.metadata().ok()?.len();
    (total == 9 + len as u64 + meta.body_len).then_some((head[4], meta))
}

fn read_meta(path: &Path) -> Option<Meta> {
    let mut f = std::fs::File::open(path).ok()?;
    read_header(&mut f).map(|(_, m)| m)
}

fn read_body(path: &Path, want: u64) -> Option<Vec<u8>> {
    let mut f = std::fs::File::open(path).ok()?;
    let (_, meta) = read_header(&mut f)?;
    if meta.body_len != want {
        return None;
    }
    let mut body = Vec::with_capacity(want as usize);
    f.read_to_end(&mut body).ok()?;
    (body.len() as u64 == want).then_some(body)
}

fn mark_invalidated(path: &Path) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    f.seek(SeekFrom::Start(4))?;
    f.write_all(&[FLAG_INVALIDATED])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(key: &str, tag: &str, len: u64) -> Meta {
        let mut h = HeaderMap::new();
        h.insert("cache-control", HeaderValue::from_static("max-age=60"));
        Meta::new(
            key.into(),
            key.into(),
            "app.localhost".into(),
            key.into(),
            Vec::new(),
            200,
            h,
            Times {
                request: 1.0,
                response: 2.0,
            },
            60.0,
            vec![tag.into()],
            len,
        )
        .unwrap()
    }

    async fn settle(store: &Store, key: &str) {
        for _ in 0..200 {
            if store.lock().entries.get(key).is_some_and(|e| e.on_disk) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        panic!("{key} never reached the disk");
    }

    #[tokio::test]
    async fn disk_tier_survives_reopen_and_purges() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            memory: 10,
            disk: Some((dir.path().to_path_buf(), 1000)),
        };
        let store = Arc::new(Store::open(limits.clone()).unwrap());
        store.put(meta("/a", "t1", 8), Bytes::from_static(b"aaaaaaaa"));
        store.put(meta("/b", "t2", 8), Bytes::from_static(b"bbbbbbbb"));
        settle(&store, "/a").await;
        settle(&store, "/b").await;
        // Memory holds 10 bytes: /a was evicted from memory, read from disk.
        assert_eq!(store.get("/a").await.unwrap().body, &b"aaaaaaaa"[..]);
        assert_eq!(store.purge_tag("t2", None, true), 1);
        drop(store);

        let store = Store::open(limits).unwrap();
        assert_eq!(store.len(), 2);
        let b = store.get("/b").await.unwrap();
        assert!(b.meta.invalidated, "a soft purge is kept across restarts");
        assert_eq!(b.meta.headers()["cache-control"], "max-age=60");
        assert_eq!(store.purge_prefix("/a", false), 1);
        assert_eq!(
            store.purge_tag("t1", None, false),
            0,
            "the tag went with /a"
        );
        assert!(store.get("/a").await.is_none());
        // A truncated file is dropped at open.
        let victim = object_path(dir.path(), "/b");
        let len = std::fs::metadata(&victim).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&victim)
            .unwrap()
            .set_len(len - 1)
            .unwrap();
        let store = Store::open(Limits {
            memory: 10,
            disk: Some((dir.path().to_path_buf(), 1000)),
        })
        .unwrap();
        assert!(store.is_empty());
        assert!(!victim.exists());
    }

    #[tokio::test]
    async fn a_url_purge_takes_its_variants_and_nothing_else() {
        let store = Arc::new(
            Store::open(Limits {
                memory: 1000,
                disk: None,
            })
            .unwrap(),
        );
        for key in ["/a", "/b"] {
            for variant in ["gzip", "br"] {
                let mut m = meta(&format!("{key}\naccept-encoding={variant}"), "t", 1);
                m.primary = key.to_string();
                store.put(m, Bytes::from_static(b"x"));
            }
        }
        assert_eq!(store.purge_primary("/a", false), 2);
        assert_eq!(store.purge_primary("/a", false), 0);
        assert_eq!(store.len(), 2);
        assert!(store.get("/b\naccept-encoding=br").await.is_some());
    }

    #[tokio::test]
    async fn prefix_and_tag_purges_read_their_indexes() {
        let store = Arc::new(
            Store::open(Limits {
                memory: 1000,
                disk: None,
            })
            .unwrap(),
        );
        for (primary, tag) in [
            ("app.localhost/a", "x"),
            ("app.localhost/ab", "y"),
            ("app.localhost/b", "x"),
            ("app.localhost2/a", "x"),
        ] {
            let mut m = meta(primary, tag, 1);
            m.primary = primary.to_string();
            m.host = primary.split('/').next().unwrap().to_string();
            store.put(m, Bytes::from_static(b"x"));
        }
        // A new version of a key with another tag leaves the old tag.
        let mut m = meta("app.localhost/b", "z", 1);
        m.primary = "app.localhost/b".into();
        store.put(m, Bytes::from_static(b"x"));
        assert_eq!(store.purge_prefix("app.localhost/a", false), 2);
        assert_eq!(store.purge_tag("x", Some("app.localhost"), false), 0);
        assert_eq!(store.purge_tag("x", None, false), 1, "app.localhost2/a");
        assert_eq!(store.purge_tag("z", None, true), 1);
        assert_eq!(store.len(), 1);
        assert_eq!(store.purge_prefix("app.localhost/", false), 1);
        assert!(store.lock().tags.is_empty() && store.lock().variants.is_empty());
    }

    #[tokio::test]
    async fn memory_only_evicts_by_bytes() {
        let store = Arc::new(
            Store::open(Limits {
                memory: 20,
                disk: None,
            })
            .unwrap(),
        );
        for i in 0..5 {
            store.put(
                meta(&format!("/{i}"), "t", 8),
                Bytes::from_static(b"12345678"),
            );
        }
        assert!(store.bytes().0 <= 20);
        assert_eq!(store.len(), 2);
        assert!(store.get("/4").await.is_some());
        assert!(store.get("/0").await.is_none());
    }
}
