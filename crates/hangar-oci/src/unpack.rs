//! Apply image layers to a directory: OCI whiteouts, hardlinks, symlinks,
//! modes, ownership, mtimes, xattrs and device nodes.
//!
//! The one rule that matters most: nothing is ever written outside the target
//! directory. Entry paths are normalized and refused when absolute or when
//! they contain `..`; every ancestor of a path is checked with `lstat` and a
//! symlink there is refused; files are created with `O_EXCL | O_NOFOLLOW`
//! after the old entry is removed; hardlink targets obey the same rules.
//! Ancestors already checked are remembered, and forgotten when an entry
//! replaces them, so the common case costs one hash lookup per entry.
//!
//! Decompression (and hashing) runs on its own thread, feeding the thread
//! that writes files, so the two overlap on a multi-core machine.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;

use rustix::fs::{AtFlags, FileType, Mode, Timespec, Timestamps, CWD};

use crate::digest::{Digest, Hasher};
use crate::error::{Error, IoContext, Result};
use crate::layer::{decompress, ChannelReader};
use crate::store::{staging_sibling, Image, Store};

/// Decompressed chunks handed between threads. They are recycled: fresh
/// buffers for every chunk cost a page fault per 4 KiB, which doubled the
/// unpack's system time in a VM.
const CHUNK: usize = 256 * 1024;
/// How far (in chunks, 16 MiB) the next layer may decompress ahead.
const LOOKAHEAD_CHUNKS: usize = 64;
/// Bytes written to a file per `write` call.
const WRITE_BUF: usize = 1 << 20;

/// What an unpack did, for the caller to report.
#[derive(Debug, Default, Clone)]
pub struct UnpackReport {
    pub layers: usize,
    pub entries: u64,
    pub warnings: Vec<String>,
}

/// Unpack `image` into `dir`, which must not exist or be empty. The tree is
/// built in a sibling temp directory and renamed into place at the end, so a
/// failure or crash never leaves a half-unpacked `dir`.
pub fn unpack_image(store: &Store, image: &Image, dir: &Path) -> Result<UnpackReport> {
    // Readers hold the store lock too, so `gc` cannot pull blobs from under them.
    let _lock = store.lock_shared()?;
    if let Ok(mut entries) = fs::read_dir(dir) {
        if entries.next().is_some() {
            return Err(Error::Invalid(format!(
                "{} is not empty; unpack into a new or empty directory",
                dir.display()
            )));
        }
    } else if dir.exists() {
        return Err(Error::Invalid(format!(
            "{} exists and is not a directory",
            dir.display()
        )));
    }
    let diff_ids = &image.config.rootfs.diff_ids;
    if diff_ids.len() != image.manifest.layers.len() {
        return Err(Error::Malformed {
            what: "image",
            name: image.record.reference.clone(),
            reason: format!(
                "manifest has {} layers but config lists {} DiffIDs",
                image.manifest.layers.len(),
                diff_ids.len()
            ),
        });
    }
    let staging = staging_sibling(dir, "unpack");
    if let Some(parent) = staging.parent() {
        fs::create_dir_all(parent).at(parent)?;
    }
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir(&staging).at(&staging)?;
    let result = (|| {
        let mut unpacker = Unpacker::new(&staging);
        // Layer n+1 decompresses (into a bounded buffer) while layer n is
        // being written: decompression is the larger cost, and this keeps a
        // second core busy with it.
        let start = |i: usize| -> Result<Option<Decompressor>> {
            match image.manifest.layers.get(i) {
                Some(l) => Ok(Some(Decompressor::spawn(
                    store.open_blob(&l.digest)?,
                    LOOKAHEAD_CHUNKS,
                ))),
                None => Ok(None),
            }
        };
        let mut next = start(0)?;
        for (i, (layer, diff_id)) in image.manifest.layers.iter().zip(diff_ids).enumerate() {
            let current = next
                .take()
                .ok_or_else(|| Error::Invalid("layer stream missing".into()))?;
            next = start(i + 1)?;
            unpacker.apply_decompressed(current, &layer.digest, layer.size, diff_id)?;
        }
        fs::set_permissions(&staging, fs::Permissions::from_mode(0o755)).at(&staging)?;
        fs::rename(&staging, dir).at(dir)?;
        Ok(UnpackReport {
            layers: image.manifest.layers.len(),
            entries: unpacker.entries,
            warnings: unpacker.warnings,
        })
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    result
}

/// A layer being read, hashed and decompressed on its own thread, ahead of
/// the thread that writes its files. Yields the blob's length and the DiffID
/// when done.
///
/// The compressed bytes are counted, not hashed: they were verified when
/// they entered the store, and any later corruption changes (or breaks) the
/// decompressed stream, which the DiffID check catches.
struct Decompressor {
    rx: mpsc::Receiver<io::Result<Vec<u8>>>,
    recycle: std::sync::mpsc::Sender<Vec<u8>>,
    thread: std::thread::JoinHandle<io::Result<(u64, Digest)>>,
}

/// Counts the bytes read through it.
struct Counting<R> {
    inner: R,
    count: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

impl Decompressor {
    /// Start on `blob`, buffering up to `chunks` chunks of decompressed data.
    fn spawn<R: Read + Send + 'static>(blob: R, chunks: usize) -> Decompressor {
        let (tx, rx) = mpsc::channel::<io::Result<Vec<u8>>>(chunks);
        let (recycle, recycled) = std::sync::mpsc::channel::<Vec<u8>>();
        let thread = std::thread::spawn(move || -> io::Result<(u64, Digest)> {
            let mut compressed = Counting {
                inner: io::BufReader::with_capacity(CHUNK, blob),
                count: 0,
            };
            let mut diff = Hasher::new();
            let fail = |tx: &mpsc::Sender<io::Result<Vec<u8>>>, e: io::Error| {
                let _ = tx.blocking_send(Err(io::Error::new(e.kind(), e.to_string())));
                e
            };
            let mut decoder = decompress(&mut compressed).map_err(|e| fail(&tx, e))?;
            loop {
                let mut chunk = recycled.try_recv().unwrap_or_default();
                chunk.resize(CHUNK, 0);
                let n = match decoder.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(fail(&tx, e)),
                };
                chunk.truncate(n);
                diff.update(&chunk);
                if tx.blocking_send(Ok(chunk)).is_err() {
                    break;
                }
            }
            drop(decoder);
            drop(tx);
            io::copy(&mut compressed, &mut io::sink())?;
            Ok((compressed.count, diff.finish().0))
        });
        Decompressor {
            rx,
            recycle,
            thread,
        }
    }
}

/// Applies layers, in order, to one root directory.
pub struct Unpacker {
    root: PathBuf,
    /// Relative paths known to be real directories (not symlinks) under root.
    safe_dirs: HashSet<PathBuf>,
    privileged: bool,
    /// Write whiteouts the way overlayfs reads them, instead of applying them.
    overlay: bool,
    /// The process umask, which `open` applies to new files' modes.
    umask: u32,
    xattr_warned: bool,
    buf: Vec<u8>,
    pub entries: u64,
    pub warnings: Vec<String>,
}

/// Per-layer bookkeeping.
#[derive(Default)]
struct LayerState {
    /// Paths this layer created, with their ancestors: whiteouts spare them.
    paths: HashSet<PathBuf>,
    /// Directory modes and mtimes, applied when the layer is done so that
    /// read-only directories and child writes do not get in the way.
    dirs: Vec<(PathBuf, u32, u64)>,
    /// Mtimes of directories this layer changes without listing them,
    /// taken before the first change and put back at the end, so adding or
    /// whiting out a child does not stamp its parent with today's date (as
    /// umoci and containerd keep them too).
    parent_times: HashMap<PathBuf, Timespec>,
}

/// Normalize a tar path to a relative path under the root, refusing escapes.
fn normalize(raw: &Path) -> std::result::Result<PathBuf, &'static str> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => return Err("path contains '..'"),
            Component::RootDir | Component::Prefix(_) => return Err("absolute path"),
        }
    }
    Ok(out)
}

fn timespec(secs: u64) -> Timespec {
    Timespec {
        tv_sec: secs.min(i64::MAX as u64) as i64,
        tv_nsec: 0,
    }
}

impl Unpacker {
    pub fn new(root: &Path) -> Unpacker {
        Unpacker {
            root: root.to_path_buf(),
            overlay: false,
            safe_dirs: HashSet::new(),
            privileged: rustix::process::geteuid().is_root(),
            umask: current_umask(),
            xattr_warned: false,
            buf: vec![0; WRITE_BUF],
            entries: 0,
            warnings: Vec::new(),
        }
    }

    /// An unpacker that writes one layer as an overlayfs lower directory (a
    /// snapshot): whiteouts become 0:0 character devices and opaque markers
    /// the `trusted.overlay.opaque` xattr, so overlayfs hides what lies below.
    /// Needs root, as overlayfs itself does.
    pub fn for_overlay(root: &Path) -> Unpacker {
        Unpacker {
            overlay: true,
            ..Unpacker::new(root)
        }
    }

    /// Apply a compressed layer blob, checking its digest, size and DiffID.
    /// Decompression runs on a helper thread.
    pub fn apply_verified<R: Read + Send + 'static>(
        &mut self,
        blob: R,
        digest: &Digest,
        size: u64,
        diff_id: &Digest,
    ) -> Result<()> {
        self.apply_decompressed(Decompressor::spawn(blob, 64), digest, size, diff_id)
    }

    /// Apply a layer whose decompression is already under way, then check
    /// what the decompressor measured against `digest`, `size` and `diff_id`.
    fn apply_decompressed(
        &mut self,
        layer_stream: Decompressor,
        digest: &Digest,
        size: u64,
        diff_id: &Digest,
    ) -> Result<()> {
        let layer = digest.to_string();
        let Decompressor {
            rx,
            recycle,
            thread,
        } = layer_stream;
        let mut reader = ChannelReader::recycling(rx, recycle);
        let applied = self.apply(&mut reader, &layer);
        // Let the producer finish whatever the tar end marker left unread.
        let drained = io::copy(&mut reader, &mut io::sink());
        drop(reader);
        let produced = thread
            .join()
            .map_err(|_| Error::Invalid(format!("layer {layer}: decompression thread panicked")))?;
        let verify = |reason: String| Error::Verify {
            digest: layer.clone(),
            source_name: "the local store".into(),
            reason,
        };
        // Report the root cause first: content that is not what the image
        // says explains a tar error better than the tar error does.
        let (len, got_diff) =
            produced.map_err(|e| verify(format!("cannot read or decompress: {e}")))?;
        drained.map_err(|e| verify(format!("cannot read or decompress: {e}")))?;
        if got_diff != *diff_id {
            return Err(verify(format!("uncompressed content hashes to {got_diff}, but the image config lists DiffID {diff_id}")));
        }
        applied?;
        if len != size {
            return Err(verify(format!("stored blob is {len} bytes, the manifest says {size}; run `hangar image gc` and pull again")));
        }
        Ok(())
    }

    fn unsafe_entry(layer: &str, entry: &Path, reason: impl Into<String>) -> Error {
        Error::UnsafeEntry {
            layer: layer.to_string(),
            entry: entry.display().to_string(),
            reason: reason.into(),
        }
    }

    /// Apply one uncompressed layer tar.
    pub fn apply<R: Read>(&mut self, tar_stream: R, layer: &str) -> Result<()> {
        let mut archive = tar::Archive::new(tar_stream);
        let mut state = LayerState::default();
        let bad_tar = |e: io::Error| Error::UnsafeEntry {
            layer: layer.to_string(),
            entry: String::new(),
            reason: format!("not a readable tar stream: {e}"),
        };
        for entry in archive.entries().map_err(bad_tar)? {
            let mut entry = entry.map_err(bad_tar)?;
            let raw = entry.path().map_err(bad_tar)?.into_owned();
            self.entries += 1;
            self.apply_entry(&mut entry, &raw, layer, &mut state)?;
        }
        for (rel, mtime) in &state.parent_times {
            let full = self.root.join(rel);
            if fs::symlink_metadata(&full).is_ok_and(|m| m.is_dir()) {
                utimes(&full, *mtime)?;
            }
        }
        for (rel, mode, mtime) in state.dirs.iter().rev() {
            let full = self.root.join(rel);
            fs::set_permissions(&full, fs::Permissions::from_mode(*mode)).at(&full)?;
            self.set_times(&full, *mtime)?;
        }
        Ok(())
    }

    /// A whiteout in overlay form, in a snapshot holding just this layer.
    fn overlay_whiteout(
        &mut self,
        rel: &Path,
        hidden: &[u8],
        layer: &str,
        raw: &Path,
        state: &mut LayerState,
    ) -> Result<()> {
        self.check_ancestors(rel, layer, raw, state, true)?;
        let parent = rel.parent().unwrap_or(Path::new(""));
        if hidden == b".wh..opq" {
            let dir = self.root.join(parent);
            fs::create_dir_all(&dir).at(&dir)?;
            rustix::fs::lsetxattr(
                &dir,
                "trusted.overlay.opaque",
                b"y",
                rustix::fs::XattrFlags::empty(),
            )
            .map_err(io::Error::from)
            .at(&dir)?;
            return Ok(());
        }
        if hidden.is_empty() || hidden == b"." || hidden == b".." || hidden.contains(&b'/') {
            return Err(Self::unsafe_entry(layer, raw, "whiteout names no file"));
        }
        let target = parent.join(OsStr::from_bytes(hidden));
        self.remove_existing(&target)?;
        let full = self.root.join(&target);
        rustix::fs::mknodat(
            CWD,
            &full,
            FileType::CharacterDevice,
            Mode::empty(),
            rustix::fs::makedev(0, 0),
        )
        .map_err(io::Error::from)
        .at(&full)?;
        state.paths.insert(target);
        Ok(())
    }

    /// Remember `dir`'s mtime before this layer first changes its entries.
    fn keep_parent_time(&self, dir: &Path, state: &mut LayerState) {
        if state.parent_times.contains_key(dir) {
            return;
        }
        if let Ok(m) = fs::symlink_metadata(self.root.join(dir)) {
            if m.is_dir() {
                let t = Timespec {
                    tv_sec: m.mtime(),
                    tv_nsec: m.mtime_nsec() as _,
                };
                state.parent_times.insert(dir.to_path_buf(), t);
            }
        }
    }

    fn apply_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<R>,
        raw: &Path,
        layer: &str,
        state: &mut LayerState,
    ) -> Result<()> {
        use tar::EntryType as T;
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink
        ) {
            return Ok(());
        }
        let rel = normalize(raw).map_err(|r| Self::unsafe_entry(layer, raw, r))?;
        let name = rel.file_name().map(OsStr::as_bytes).unwrap_or(b"");
        if let Some(hidden) = name.strip_prefix(b".wh.") {
            let parent = rel.parent().unwrap_or(Path::new(""));
            if self.overlay {
                return self.overlay_whiteout(&rel, hidden, layer, raw, state);
            }
            if !self.check_ancestors(&rel, layer, raw, state, false)? {
                return Ok(());
            }
            self.keep_parent_time(parent, state);
            if hidden == b".wh..opq" {
                return self.opaque(parent, state);
            }
            if hidden.is_empty() || hidden == b"." || hidden == b".." || hidden.contains(&b'/') {
                return Err(Self::unsafe_entry(layer, raw, "whiteout names no file"));
            }
            let target = parent.join(OsStr::from_bytes(hidden));
            if !state.paths.contains(&target) {
                self.remove_existing(&target)?;
            }
            return Ok(());
        }
        let header = entry.header();
        let bad = |e: io::Error| Self::unsafe_entry(layer, raw, format!("bad header: {e}"));
        let old = header.as_old();
        let mode = numeric(header.mode(), &old.mode).map_err(bad)? & 0o7777;
        let uid = numeric(header.uid(), &old.uid).map_err(bad)?;
        let gid = numeric(header.gid(), &old.gid).map_err(bad)?;
        let mtime = numeric(header.mtime(), &old.mtime).map_err(bad)?;
        if rel.as_os_str().is_empty() {
            if kind == T::Directory {
                state.dirs.push((rel, mode, mtime));
                return Ok(());
            }
            return Err(Self::unsafe_entry(
                layer,
                raw,
                "would replace the root directory itself",
            ));
        }
        self.check_ancestors(&rel, layer, raw, state, true)?;
        self.keep_parent_time(rel.parent().unwrap_or(Path::new("")), state);
        let full = self.root.join(&rel);
        match kind {
            T::Directory => {
                match fs::create_dir(&full) {
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        match fs::symlink_metadata(&full) {
                            Ok(m) if m.is_dir() => {}
                            _ => {
                                self.remove_existing(&rel)?;
                                fs::create_dir(&full).at(&full)?;
                            }
                        }
                    }
                    other => other.at(&full)?,
                }
                self.chown(&full, uid, gid)?;
                self.xattrs(entry, &full)?;
                self.safe_dirs.insert(rel.clone());
                state.dirs.push((rel.clone(), mode, mtime));
            }
            T::Regular | T::Continuous | T::GNUSparse => {
                // Create first and clear the way only if something is there:
                // most paths are new, and each syscall counts on a sandboxed
                // kernel. O_EXCL|O_NOFOLLOW never follows a symlink at `full`.
                let create = || {
                    OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(mode & 0o777)
                        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                        .open(&full)
                };
                let mut file = match create() {
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        self.remove_existing(&rel)?;
                        create()
                    }
                    other => other,
                }
                .at(&full)?;
                loop {
                    // Fill the buffer before writing: one write per MiB,
                    // not one per chunk the decompressor hands over.
                    let mut n = 0;
                    while n < self.buf.len() {
                        match entry.read(&mut self.buf[n..]) {
                            Ok(0) => break,
                            Ok(k) => n += k,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) => {
                                return Err(Self::unsafe_entry(
                                    layer,
                                    raw,
                                    format!("reading contents: {e}"),
                                ))
                            }
                        }
                    }
                    if n == 0 {
                        break;
                    }
                    file.write_all(&self.buf[..n]).at(&full)?;
                }
                if self.privileged {
                    rustix::fs::fchown(&file, Some(uid_of(uid)), Some(gid_of(gid)))
                        .map_err(io::Error::from)
                        .at(&full)?;
                }
                // open() applied the umask and chown cleared set-id bits:
                // fix the mode only when either could have changed it.
                if mode & 0o7000 != 0 || mode & self.umask != 0 {
                    file.set_permissions(fs::Permissions::from_mode(mode))
                        .at(&full)?;
                }
                self.xattrs(entry, &full)?;
                let t = SystemTime::UNIX_EPOCH + Duration::from_secs(mtime);
                file.set_times(fs::FileTimes::new().set_modified(t).set_accessed(t))
                    .at(&full)?;
            }
            T::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(bad)?
                    .ok_or_else(|| Self::unsafe_entry(layer, raw, "symlink without a target"))?;
                match std::os::unix::fs::symlink(&target, &full) {
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        self.remove_existing(&rel)?;
                        std::os::unix::fs::symlink(&target, &full)
                    }
                    other => other,
                }
                .at(&full)?;
                self.chown(&full, uid, gid)?;
                self.xattrs(entry, &full)?;
                self.set_times(&full, mtime)?;
            }
            T::Link => {
                let link = entry
                    .link_name()
                    .map_err(bad)?
                    .ok_or_else(|| Self::unsafe_entry(layer, raw, "hardlink without a target"))?;
                let target = normalize(&link).map_err(|r| {
                    Self::unsafe_entry(
                        layer,
                        raw,
                        format!("hardlink target {}: {r}", link.display()),
                    )
                })?;
                if target.as_os_str().is_empty() {
                    return Err(Self::unsafe_entry(
                        layer,
                        raw,
                        "hardlink to the root directory",
                    ));
                }
                if !self.check_ancestors(&target, layer, raw, state, false)? {
                    return Err(Self::unsafe_entry(
                        layer,
                        raw,
                        format!("hardlink target {} does not exist", link.display()),
                    ));
                }
                let target_full = self.root.join(&target);
                match fs::symlink_metadata(&target_full) {
                    Ok(m) if m.is_dir() => {
                        return Err(Self::unsafe_entry(layer, raw, "hardlink to a directory"))
                    }
                    Ok(_) => {}
                    Err(_) => {
                        return Err(Self::unsafe_entry(
                            layer,
                            raw,
                            format!("hardlink target {} does not exist", link.display()),
                        ))
                    }
                }
                if target != rel {
                    self.remove_existing(&rel)?;
                    fs::hard_link(&target_full, &full).at(&full)?;
                }
            }
            T::Char | T::Block | T::Fifo => {
                let file_type = match kind {
                    T::Char => FileType::CharacterDevice,
                    T::Block => FileType::BlockDevice,
                    _ => FileType::Fifo,
                };
                if file_type != FileType::Fifo && !self.privileged {
                    self.warnings.push(format!(
                        "layer {layer}: skipped device node {} (creating devices needs root)",
                        raw.display()
                    ));
                    return Ok(());
                }
                let (major, minor) = if file_type == FileType::Fifo {
                    (0, 0)
                } else {
                    let (raw_major, raw_minor) = match (header.as_ustar(), header.as_gnu()) {
                        (Some(u), _) => (u.dev_major, u.dev_minor),
                        (None, Some(g)) => (g.dev_major, g.dev_minor),
                        _ => ([0; 8], [0; 8]),
                    };
                    let major = numeric(
                        header.device_major().map(Option::unwrap_or_default),
                        &raw_major,
                    );
                    let minor = numeric(
                        header.device_minor().map(Option::unwrap_or_default),
                        &raw_minor,
                    );
                    (major.map_err(bad)?, minor.map_err(bad)?)
                };
                self.remove_existing(&rel)?;
                rustix::fs::mknodat(
                    CWD,
                    &full,
                    file_type,
                    Mode::from_raw_mode(mode),
                    rustix::fs::makedev(major, minor),
                )
                .map_err(io::Error::from)
                .at(&full)?;
                self.chown(&full, uid, gid)?;
                fs::set_permissions(&full, fs::Permissions::from_mode(mode)).at(&full)?;
                self.set_times(&full, mtime)?;
            }
            other => {
                self.warnings.push(format!(
                    "layer {layer}: skipped {} of unsupported tar type {other:?}",
                    raw.display()
                ));
                return Ok(());
            }
        }
        state.paths.insert(rel);
        Ok(())
    }

    /// Make sure every ancestor of `rel` is a real directory under the root:
    /// refuse symlinks, create missing ones when `create`, and record them as
    /// this layer's. Returns false when an ancestor is missing and not created.
    fn check_ancestors(
        &mut self,
        rel: &Path,
        layer: &str,
        raw: &Path,
        state: &mut LayerState,
        create: bool,
    ) -> Result<bool> {
        let Some(parent) = rel.parent() else {
            return Ok(true);
        };
        if parent.as_os_str().is_empty() {
            return Ok(true);
        }
        // Walk up to the deepest ancestor already known safe, then down again.
        let mut todo = Vec::new();
        let mut cur = Some(parent);
        while let Some(p) = cur {
            if p.as_os_str().is_empty() || self.safe_dirs.contains(p) {
                break;
            }
            todo.push(p);
            cur = p.parent();
        }
        for p in todo.into_iter().rev() {
            let full = self.root.join(p);
            match fs::symlink_metadata(&full) {
                Ok(m) if m.is_dir() => {}
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(Self::unsafe_entry(
                        layer,
                        raw,
                        format!(
                            "{} is a symlink; writing through it could leave the root",
                            p.display()
                        ),
                    ))
                }
                Ok(_) => {
                    return Err(Self::unsafe_entry(
                        layer,
                        raw,
                        format!("{} is not a directory", p.display()),
                    ))
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                    fs::create_dir(&full).at(&full)?;
                    fs::set_permissions(&full, fs::Permissions::from_mode(0o755)).at(&full)?;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
                Err(e) => {
                    return Err(Error::Io {
                        path: full,
                        source: e,
                    })
                }
            }
            self.safe_dirs.insert(p.to_path_buf());
        }
        if create {
            let mut cur = Some(parent);
            while let Some(p) = cur {
                if p.as_os_str().is_empty() || !state.paths.insert(p.to_path_buf()) {
                    break;
                }
                cur = p.parent();
            }
        }
        Ok(true)
    }

    /// Remove whatever is at `rel` (a directory with its contents), if anything.
    fn remove_existing(&mut self, rel: &Path) -> Result<()> {
        let full = self.root.join(rel);
        match fs::symlink_metadata(&full) {
            Ok(m) if m.is_dir() => {
                fs::remove_dir_all(&full).at(&full)?;
                if self.safe_dirs.contains(rel) {
                    self.safe_dirs.retain(|d| !d.starts_with(rel));
                }
            }
            Ok(_) => fs::remove_file(&full).at(&full)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Error::Io {
                    path: full,
                    source: e,
                })
            }
        }
        Ok(())
    }

    /// An opaque whiteout: hide everything under `dir` that lower layers put
    /// there, wherever in the layer the marker appears.
    fn opaque(&mut self, dir: &Path, state: &mut LayerState) -> Result<()> {
        let full = self.root.join(dir);
        match fs::symlink_metadata(&full) {
            Ok(m) if m.is_dir() => {}
            _ => return Ok(()),
        }
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            let full = self.root.join(&d);
            let children: Vec<_> = fs::read_dir(&full)
                .at(&full)?
                .collect::<io::Result<_>>()
                .at(&full)?;
            for child in children {
                let rel = d.join(child.file_name());
                if !state.paths.contains(&rel) {
                    self.keep_parent_time(&d, state);
                    self.remove_existing(&rel)?;
                } else if child.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(rel);
                }
            }
        }
        Ok(())
    }

    fn chown(&self, full: &Path, uid: u64, gid: u64) -> Result<()> {
        if self.privileged {
            rustix::fs::chownat(
                CWD,
                full,
                Some(uid_of(uid)),
                Some(gid_of(gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(io::Error::from)
            .at(full)?;
        }
        Ok(())
    }

    fn set_times(&self, full: &Path, mtime: u64) -> Result<()> {
        utimes(full, timespec(mtime))
    }

    fn xattrs<R: Read>(&mut self, entry: &mut tar::Entry<R>, full: &Path) -> Result<()> {
        let Ok(Some(pax)) = entry.pax_extensions() else {
            return Ok(());
        };
        let mut failed = None;
        for ext in pax.flatten() {
            let Ok(key) = ext.key() else { continue };
            let Some(name) = key.strip_prefix("SCHILY.xattr.") else {
                continue;
            };
            if let Err(e) = rustix::fs::lsetxattr(
                full,
                name,
                ext.value_bytes(),
                rustix::fs::XattrFlags::empty(),
            ) {
                failed = Some(format!(
                    "{name} on {}: {}",
                    full.display(),
                    io::Error::from(e)
                ));
            }
        }
        if let Some(f) = failed {
            if !self.xattr_warned {
                self.xattr_warned = true;
                self.warnings.push(format!("could not set extended attribute {f} (the filesystem may not allow it); later failures are not reported"));
            }
        }
        Ok(())
    }
}

/// Set access and modification time of `full` (not following a symlink).
fn utimes(full: &Path, t: Timespec) -> Result<()> {
    let times = Timestamps {
        last_access: t,
        last_modification: t,
    };
    rustix::fs::utimensat(CWD, full, &times, AtFlags::SYMLINK_NOFOLLOW)
        .map_err(io::Error::from)
        .at(full)
}

/// A numeric header field, where a blank field (all NULs or spaces) counts
/// as zero, as GNU tar and Go's archive/tar read it.
fn numeric<T: Default>(parsed: io::Result<T>, raw: &[u8]) -> io::Result<T> {
    match parsed {
        Err(_) if raw.iter().all(|b| *b == 0 || *b == b' ') => Ok(T::default()),
        other => other,
    }
}

/// The umask, read without changing it (`umask(2)` can only set it, which
/// would race with other threads creating files). When it cannot be read,
/// assume every bit is masked, so modes are always set explicitly.
fn current_umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o777)
}

fn uid_of(uid: u64) -> rustix::fs::Uid {
    rustix::fs::Uid::from_raw(uid.min(u32::MAX as u64 - 1) as u32)
}

fn gid_of(gid: u64) -> rustix::fs::Gid {
    rustix::fs::Gid::from_raw(gid.min(u32::MAX as u64 - 1) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar of (path, kind, data-or-link-target) entries.
    fn tar_of(entries: &[(&str, char, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o755);
            h.set_mtime(1_000_000);
            h.set_uid(0);
            h.set_gid(0);
            match kind {
                'd' => h.set_entry_type(tar::EntryType::Directory),
                'f' => h.set_entry_type(tar::EntryType::Regular),
                'l' => h.set_entry_type(tar::EntryType::Symlink),
                'h' => h.set_entry_type(tar::EntryType::Link),
                _ => unreachable!(),
            }
            // Write names raw so tests can carry '..' and absolute paths.
            let name = h.as_old_mut();
            name.name[..path.len()].copy_from_slice(path.as_bytes());
            if *kind == 'l' || *kind == 'h' {
                name.linkname[..data.len()].copy_from_slice(data.as_bytes());
                h.set_size(0);
                h.set_cksum();
                b.append(&h, io::empty()).unwrap();
            } else {
                h.set_size(if *kind == 'f' { data.len() as u64 } else { 0 });
                h.set_cksum();
                b.append(&h, data.as_bytes()).unwrap();
            }
        }
        b.into_inner().unwrap()
    }

    fn apply(root: &Path, layers: &[Vec<u8>]) -> Result<()> {
        let mut u = Unpacker::new(root);
        for l in layers {
            u.apply(&l[..], "sha256:test")?;
        }
        Ok(())
    }

    #[test]
    fn whiteouts_and_opaque_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let lower = tar_of(&[
            ("a/", 'd', ""),
            ("a/old", 'f', "1"),
            ("a/sub/", 'd', ""),
            ("a/sub/x", 'f', "x"),
            ("b", 'f', "b"),
            ("c", 'f', "c"),
        ]);
        // The opaque marker comes after a/new, which must survive it.
        let upper = tar_of(&[
            ("a/", 'd', ""),
            ("a/new", 'f', "2"),
            ("a/.wh..wh..opq", 'f', ""),
            ("./.wh.b", 'f', ""),
            ("c", 'f', "C"),
        ]);
        apply(root, &[lower, upper]).unwrap();
        assert!(!root.join("a/old").exists());
        assert!(!root.join("a/sub").exists());
        assert_eq!(fs::read_to_string(root.join("a/new")).unwrap(), "2");
        assert!(!root.join("b").exists());
        assert!(!root.join(".wh.b").exists());
        assert_eq!(fs::read_to_string(root.join("c")).unwrap(), "C");
    }

    #[test]
    fn never_writes_outside_the_root() {
        let cases: &[&[(&str, char, &str)]] = &[
            &[("../evil", 'f', "x")],
            &[("/abs", 'f', "x")],
            &[("a/../../evil", 'f', "x")],
            &[("link", 'l', "/tmp"), ("link/evil", 'f', "x")],
            &[("link", 'l', ".."), ("link/evil", 'f', "x")],
            &[(".", 'l', "/tmp")],
            &[("./", 'l', "/tmp"), ("evil", 'f', "x")],
            &[("d/", 'd', ""), ("d", 'l', "/tmp"), ("d/evil", 'f', "x")],
            &[("h", 'h', "../../etc/passwd")],
            &[("h", 'h', "/etc/passwd")],
            &[("l", 'l', "/etc"), ("h", 'h', "l/passwd")],
        ];
        for case in cases {
            let outer = tempfile::tempdir().unwrap();
            let root = outer.path().join("root");
            fs::create_dir(&root).unwrap();
            let err = apply(&root, &[tar_of(case)]).expect_err(&format!("{case:?} was accepted"));
            let msg = err.to_string();
            assert!(msg.contains("layer sha256:test: entry"), "{msg}");
            assert!(!outer.path().join("evil").exists());
            assert_eq!(
                fs::read_dir(outer.path()).unwrap().count(),
                1,
                "{case:?} wrote outside"
            );
        }
    }

    #[test]
    fn hardlinks_and_replacement_do_not_alias() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let l1 = tar_of(&[("f", 'f', "one"), ("g", 'h', "f")]);
        let l2 = tar_of(&[("g", 'f', "two")]);
        apply(root, &[l1, l2]).unwrap();
        assert_eq!(fs::read_to_string(root.join("f")).unwrap(), "one");
        assert_eq!(fs::read_to_string(root.join("g")).unwrap(), "two");
    }

    #[test]
    fn xattrs_from_pax_records_are_applied() {
        // Pick the length that includes its own digits.
        let rec = {
            let body = " SCHILY.xattr.user.hangar=yes\n";
            let mut n = body.len() + 1;
            while format!("{n}{body}").len() != n {
                n += 1;
            }
            format!("{n}{body}")
        };
        let mut b = tar::Builder::new(Vec::new());
        let mut pax = tar::Header::new_ustar();
        pax.set_entry_type(tar::EntryType::XHeader);
        pax.set_size(rec.len() as u64);
        pax.set_path("PaxHeaders/f").unwrap();
        pax.set_mode(0o644);
        pax.set_uid(0);
        pax.set_gid(0);
        pax.set_mtime(0);
        pax.set_cksum();
        b.append(&pax, rec.as_bytes()).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_path("f").unwrap();
        h.set_size(1);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_cksum();
        b.append(&h, &b"x"[..]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut u = Unpacker::new(dir.path());
        u.apply(&b.into_inner().unwrap()[..], "sha256:test")
            .unwrap();
        let mut value = [0u8; 16];
        match rustix::fs::lgetxattr(dir.path().join("f"), "user.hangar", &mut value[..]) {
            Ok(n) => assert_eq!(&value[..n], b"yes"),
            // Filesystems without user xattrs (tmpfs on older kernels) warn instead.
            Err(_) => assert!(
                u.warnings.iter().any(|w| w.contains("user.hangar")),
                "{:?}",
                u.warnings
            ),
        }
    }
}
