//! Directory trees as the comparison with umoci sees them.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use super::harness::sha256_hex;

/// One node of a directory tree, as the comparison with umoci sees it.
#[derive(Debug, PartialEq, Eq)]
pub struct Node {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub content: String,
    pub mtime: i64,
    /// For files with several links: the first path (sorted) of the inode.
    pub link_group: Option<String>,
}

/// Walk `root` into path -> node, excluding the root itself.
pub fn tree(root: &Path) -> BTreeMap<String, Node> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).expect("read_dir").flatten() {
            let p = e.path();
            let rel = p
                .strip_prefix(root)
                .expect("under root")
                .display()
                .to_string();
            let m = fs::symlink_metadata(&p).expect("metadata");
            let ft = m.file_type();
            let (kind, content) = if ft.is_dir() {
                stack.push(p.clone());
                ("dir", String::new())
            } else if ft.is_symlink() {
                (
                    "symlink",
                    fs::read_link(&p).expect("readlink").display().to_string(),
                )
            } else if ft.is_file() {
                if m.nlink() > 1 {
                    inodes.entry(m.ino()).or_default().push(rel.clone());
                }
                ("file", sha256_hex(&fs::read(&p).expect("read")))
            } else if ft.is_char_device() {
                (
                    "char",
                    format!("{}:{}", rdev_major(m.rdev()), rdev_minor(m.rdev())),
                )
            } else if ft.is_fifo() {
                ("fifo", String::new())
            } else {
                ("other", String::new())
            };
            out.insert(
                rel,
                Node {
                    kind,
                    mode: m.permissions().mode() & 0o7777,
                    uid: m.uid(),
                    gid: m.gid(),
                    content,
                    mtime: m.mtime(),
                    link_group: None,
                },
            );
        }
    }
    for paths in inodes.values() {
        let mut sorted = paths.clone();
        sorted.sort();
        for p in paths {
            if let Some(n) = out.get_mut(p) {
                n.link_group = Some(sorted[0].clone());
            }
        }
    }
    out
}

pub fn rdev_major(rdev: u64) -> u64 {
    ((rdev >> 32) & 0xffff_f000) | ((rdev >> 8) & 0xfff)
}

pub fn rdev_minor(rdev: u64) -> u64 {
    ((rdev >> 12) & 0xffff_ff00) | (rdev & 0xff)
}
