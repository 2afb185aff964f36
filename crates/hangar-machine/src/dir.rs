//! A machine's directory, `$HANGAR_HOME/machines/<id>/`: the one place
//! that names its files. The drivers write them, the shim keeps them up to
//! date, and everything the control plane needs to know survives in them,
//! so a restarted node adopts running machines.
//!
//! ```text
//! bundle/config.json   what runc runs (see bundle.rs)              container
//! rootfs/              overlay: snapshots below, disk/upper on top container
//! disk.ext4            the machine's own filesystem (sparse, its   container
//!                      size is the root filesystem's size; a copy
//!                      of an empty one in machines/disks/),
//!                      loop-mounted on disk/
//! disk/upper disk/work the machine's own writable layer            container
//! init.json            hangar-init's config, bind-mounted          container
//! disk.qcow2           the VM's disk, over its image's base disk   micro-VM
//! initrd               hangar-init and its config for the VM       micro-VM
//! vm.json              how QEMU is launched (marks a VM)           micro-VM
//! qemu.pid, ctl        the QEMU process; the console's control     micro-VM
//!                      fifo (signals, exec)
//! exec-N.json          the result of exec N, filed by the shim     micro-VM
//! lease                ChainIDs of the snapshots it uses           both
//! machine.log[.1]      stdout and stderr, rotated by size          both
//! shim.pid, exit.json  the shim while it runs; how the app ended   both
//! ```
//!
//! Files that must never be seen half-written are written under a
//! temporary name in the same directory and renamed ([`MachineDir::tmp`]).

use std::ops::Deref;
use std::path::{Path, PathBuf};

/// One machine's directory (see the module doc). It derefs to its path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineDir(PathBuf);

impl MachineDir {
    pub fn new(path: impl Into<PathBuf>) -> MachineDir {
        MachineDir(path.into())
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Where `file` (one of this directory's) is written before it is
    /// renamed into place: a dot name beside it.
    pub fn tmp(&self, file: &Path) -> PathBuf {
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.0.join(format!(".{name}.tmp"))
    }

    pub fn bundle(&self) -> PathBuf {
        self.file("bundle")
    }

    pub fn bundle_config(&self) -> PathBuf {
        self.file("bundle/config.json")
    }

    pub fn rootfs(&self) -> PathBuf {
        self.file("rootfs")
    }

    pub fn disk_image(&self) -> PathBuf {
        self.file("disk.ext4")
    }

    /// Where the disk image is mounted.
    pub fn disk(&self) -> PathBuf {
        self.file("disk")
    }

    /// What `release` unmounts, in order: the overlay, then the
    /// filesystem its upper layer is on.
    pub fn mounts(&self) -> [PathBuf; 2] {
        [self.rootfs(), self.disk()]
    }

    pub fn init_config(&self) -> PathBuf {
        self.file("init.json")
    }

    pub fn vm_disk(&self) -> PathBuf {
        self.file("disk.qcow2")
    }

    pub fn initrd(&self) -> PathBuf {
        self.file("initrd")
    }

    /// How the VM is launched; its presence marks a micro-VM.
    pub fn vm_launch(&self) -> PathBuf {
        self.file("vm.json")
    }

    pub fn qemu_pid(&self) -> PathBuf {
        self.file("qemu.pid")
    }

    /// The VM console's control fifo.
    pub fn ctl(&self) -> PathBuf {
        self.file("ctl")
    }

    /// A micro-VM's second serial port, for console sessions (QEMU
    /// listens; see `hangar_init::vmconsole`).
    pub fn console_socket(&self) -> PathBuf {
        self.file("console.sock")
    }

    /// The result of the VM's exec number `n`, filed by the shim.
    pub fn exec_result(&self, n: impl std::fmt::Display) -> PathBuf {
        self.file(&format!("exec-{n}.json"))
    }

    pub fn lease(&self) -> PathBuf {
        self.file("lease")
    }

    pub fn log(&self) -> PathBuf {
        self.file("machine.log")
    }

    pub fn shim_pid(&self) -> PathBuf {
        self.file("shim.pid")
    }

    pub fn exit(&self) -> PathBuf {
        self.file("exit.json")
    }

    pub fn is_vm(&self) -> bool {
        self.vm_launch().is_file()
    }
}

impl Deref for MachineDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for MachineDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_names_sit_beside_the_file_and_are_hidden() {
        let d = MachineDir::new("/m/abc");
        assert_eq!(d.tmp(&d.exit()), Path::new("/m/abc/.exit.json.tmp"));
        assert_eq!(d.tmp(&d.disk_image()), Path::new("/m/abc/.disk.ext4.tmp"));
        assert_eq!(d.bundle_config(), Path::new("/m/abc/bundle/config.json"));
        assert_eq!(d.mounts(), [d.rootfs(), d.disk()]);
    }
}
