//! The container driver: a machine as a runc bundle over an overlay root
//! filesystem (its image's snapshots below, its own sparse ext4 disk on top),
//! in its own network namespace. `runtime.rs` is the front that dispatches
//! here or to the micro-VM driver (`vm.rs`); the shim (`shim.rs`) runs runc.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::Ordering;

use hangar_init::InitConfig;

use crate::bundle;
use crate::dir::MachineDir;
use crate::error::{run, Error, IoContext, Result};
use crate::network;
use crate::runtime::{output_capped, runc, Created, MachineSpec, Runtime, EXEC_OUTPUT_CAP};

impl Runtime {
    /// The container's network, init config, bundle, disk and root mount.
    pub(crate) fn create_container(
        &self,
        spec: &MachineSpec,
        mut init: InitConfig,
        lowers: &[PathBuf],
        unpacked: bool,
    ) -> Result<Created> {
        let dir = self.dir(&spec.id);
        let addresses = network::attach(&spec.id, spec.slot)?;
        init.hosts
            .push((addresses.v4.to_string(), vec![spec.hostname.clone()]));
        init.hosts
            .push((addresses.v6.to_string(), vec![spec.hostname.clone()]));
        let init_path = dir.init_config();
        let bytes = serde_json::to_vec_pretty(&init).map_err(|e| Error::Host(e.to_string()))?;
        fs::write(&init_path, bytes).at(&init_path)?;

        let config = bundle::config(
            &spec.id,
            &spec.hostname,
            &dir.rootfs(),
            &self.init_bin,
            &init_path,
            &network::netns_path(&spec.id),
            spec.limits,
        );
        let bundle_path = dir.bundle_config();
        fs::write(
            &bundle_path,
            serde_json::to_vec_pretty(&config).unwrap_or_default(),
        )
        .at(&bundle_path)?;
        make_disk(&self.machines, &dir, spec.limits.disk_mb)?;
        mount_rootfs(&dir, &spec.id, lowers)?;
        Ok(Created {
            addresses,
            unpacked,
        })
    }
}

/// Mount the machine's root filesystem: its image's snapshots below, its
/// own writable layer (on its disk) on top. Nothing to do when mounted.
pub(crate) fn mount_rootfs(dir: &MachineDir, id: &str, lowers: &[PathBuf]) -> Result<()> {
    let rootfs = dir.rootfs();
    if is_mountpoint(&rootfs) {
        return Ok(());
    }
    let layer = mount_disk(dir, id)?;
    let lower: Vec<String> = lowers
        .iter()
        .rev()
        .map(|p| p.display().to_string())
        .collect();
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.join(":"),
        layer.join("upper").display(),
        layer.join("work").display()
    );
    let options = std::ffi::CString::new(options).map_err(|e| Error::Host(e.to_string()))?;
    rustix::mount::mount(
        "overlay",
        &rootfs,
        "overlay",
        rustix::mount::MountFlags::empty(),
        Some(options.as_c_str()),
    )
    .map_err(|e| {
        Error::Host(format!(
            "cannot mount the overlay for machine {id}: {e} (machines need root)"
        ))
    })
}

/// Run `argv` in the running container with runc, as `user` when given.
pub(crate) fn exec(
    runc_root: &Path,
    id: &str,
    argv: &[String],
    env: &[String],
    user: Option<&hangar_init::RunAs>,
    stdin: &[u8],
) -> Result<Output> {
    let mut cmd = runc(runc_root);
    cmd.args(["exec"]);
    exec_args(&mut cmd, id, argv, env, user);
    output_capped(&mut cmd, stdin, EXEC_OUTPUT_CAP).map_err(|e| Error::Command {
        command: "runc exec".into(),
        detail: e.to_string(),
    })
}

/// The rest of a `runc exec` line: the user (and its groups and home),
/// the environment, the container and the command.
pub(crate) fn exec_args(
    cmd: &mut Command,
    id: &str,
    argv: &[String],
    env: &[String],
    user: Option<&hangar_init::RunAs>,
) {
    if let Some(who) = user {
        cmd.arg("--user").arg(format!("{}:{}", who.uid, who.gid));
        for g in &who.groups {
            cmd.arg("--additional-gids").arg(g.to_string());
        }
        cmd.arg("--env").arg(format!("HOME={}", who.home));
    }
    for e in env {
        cmd.arg("--env").arg(e);
    }
    cmd.arg(id).args(argv);
}

/// The smallest root filesystem a machine can have (ext4's own structures
/// and a small app fit).
pub const MIN_DISK_MB: u64 = 256;

/// Make the machine's own filesystem: a sparse ext4 image of `mb` MB (only
/// what is written takes host disk; the kernel says "No space left on
/// device" inside the machine when it is full). It is a copy of an empty
/// filesystem of that size made once (`machines/disks/<mb>.ext4`), which
/// is faster than `mkfs` for every machine. Made under temp names and
/// renamed, so a crash leaves none half-made.
fn make_disk(machines: &Path, dir: &MachineDir, mb: u64) -> Result<()> {
    let image = dir.disk_image();
    if image.is_file() {
        return Ok(());
    }
    let mb = mb.max(MIN_DISK_MB);
    let templates = machines.join("disks");
    let template = templates.join(format!("{mb}.ext4"));
    if !template.is_file() {
        fs::create_dir_all(&templates).at(&templates)?;
        // Unique per call: two creates of one size may race here (the
        // loser's rename replaces an equal template).
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let tmp = templates.join(format!(
            ".{mb}.ext4.tmp-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let file = File::create(&tmp).at(&tmp)?;
        file.set_len(mb.saturating_mul(1 << 20)).at(&tmp)?;
        drop(file);
        // No reserved blocks (the machine's root is its only user), a small
        // journal, and nothing written up front that the kernel can do lazily.
        let made = run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0", "-J", "size=4", "-L", "machine"])
            .args(["-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"])
            .arg(&tmp));
        if let Err(e) = made {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        fs::rename(&tmp, &template).at(&template)?;
    }
    let tmp = dir.tmp(&image);
    if let Err(e) = copy_sparse(&template, &tmp) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, &image).at(&image)
}

/// Copy `from` to `to` leaving its holes holes (a plain copy would write
/// every zero of a mostly empty filesystem).
fn copy_sparse(from: &Path, to: &Path) -> Result<()> {
    use rustix::fs::SeekFrom;
    use std::os::unix::fs::FileExt;
    let src = File::open(from).at(from)?;
    let dst = File::create(to).at(to)?;
    let len = src.metadata().at(from)?.len();
    dst.set_len(len).at(to)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < len {
        // ENXIO: no data after `at`.
        let Ok(data) = rustix::fs::seek(&src, SeekFrom::Data(at)) else {
            break;
        };
        let hole = rustix::fs::seek(&src, SeekFrom::Hole(data))
            .map_err(|e| Error::Host(format!("{}: {e}", from.display())))?;
        let mut pos = data;
        while pos < hole {
            let n = buf.len().min((hole - pos) as usize);
            src.read_exact_at(&mut buf[..n], pos).at(from)?;
            dst.write_all_at(&buf[..n], pos).at(to)?;
            pos += n as u64;
        }
        at = hole;
    }
    Ok(())
}

/// Mount the machine's filesystem (when it has one) and return the
/// directory its writable layer is in: `disk/`, or the machine's own
/// directory for machines made before disks had a size.
fn mount_disk(dir: &MachineDir, id: &str) -> Result<PathBuf> {
    let image = dir.disk_image();
    if !image.is_file() {
        for sub in ["upper", "work"] {
            fs::create_dir_all(dir.join(sub)).at(dir.join(sub))?;
        }
        return Ok(dir.to_path_buf());
    }
    let disk = dir.disk();
    if !is_mountpoint(&disk) {
        fs::create_dir_all(&disk).at(&disk)?;
        // `discard` gives the host back what the machine deletes.
        run(Command::new("mount")
            .args(["-t", "ext4", "-o", "loop,discard,nodev,nosuid"])
            .arg(&image)
            .arg(&disk))
        .map_err(|e| Error::Host(format!("cannot mount the disk of machine {id}: {e}")))?;
    }
    for sub in ["upper", "work"] {
        fs::create_dir_all(disk.join(sub)).at(disk.join(sub))?;
    }
    Ok(disk)
}

pub(crate) fn is_mountpoint(path: &Path) -> bool {
    let target = path.display().to_string();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(target.as_str()))
}
