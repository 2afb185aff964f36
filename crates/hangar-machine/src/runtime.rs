//! `Runtime`, the real [`crate::Driver`]: the common front of the drivers.
//! It dispatches on a machine's directory ([`crate::dir::MachineDir`]: a
//! `vm.json` marks a micro-VM) to the container driver (`container.rs`:
//! runc bundles) or the micro-VM driver (`vm.rs`: QEMU), and starts one
//! shim per machine (`shim.rs`), which supervises it and leaves the files
//! a restarted node adopts running machines from.

use std::fs;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use hangar_init::InitConfig;
use hangar_oci::{Digest, Reference, Store};
use serde::{Deserialize, Serialize};

use crate::bundle::Limits;
use crate::dir::MachineDir;
use crate::driver::{Driver, Exec};
use crate::error::{run, Error, IoContext, Result};
use crate::network::{self, Addresses};
use crate::snapshot::{chain_ids, Snapshots};

/// Logs rotate when they pass this size; one older file is kept.
pub const LOG_ROTATE_BYTES: u64 = 8 << 20;

/// What the driver needs to create a machine.
#[derive(Clone, Debug)]
pub struct MachineSpec {
    pub id: String,
    pub hostname: String,
    pub image: Reference,
    /// Machine overrides; the image part is filled in from the image config.
    pub init: InitConfig,
    pub limits: Limits,
    /// Network slot: decides the machine's addresses.
    pub slot: u32,
    /// A micro-VM instead of a container.
    pub vm: bool,
}

/// How a machine's app ended.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Exit {
    pub code: i32,
    pub oom: bool,
    /// Seconds since the epoch.
    pub at: u64,
}

/// What the host sees of a machine's process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProcState {
    Running,
    Exited(Exit),
    /// Never started, or its shim vanished without a word.
    NotRunning,
}

/// The result of creating a machine.
pub struct Created {
    pub addresses: Addresses,
    /// Whether any layer had to be unpacked (false for a second machine).
    pub unpacked: bool,
}

pub struct Runtime {
    pub(crate) machines: PathBuf,
    pub(crate) runc_root: PathBuf,
    pub(crate) store: Store,
    pub(crate) snapshots: Snapshots,
    pub(crate) init_bin: PathBuf,
    /// The `hangar` binary whose hidden `machine shim` command supervises
    /// each machine.
    pub(crate) shim_exe: PathBuf,
    /// The micro-VM driver, where a guest kernel was found.
    pub(crate) vmm: Option<crate::vm::Vmm>,
}

/// What the host sees of a VM machine (for status).
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct VmInfo {
    pub accel: String,
    pub base_disk_reused: bool,
    /// The VMM's own resident memory, while it runs.
    pub overhead_kib: Option<u64>,
}

pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn runc(root: &Path) -> Command {
    let mut c = Command::new("runc");
    c.arg("--root").arg(root);
    c
}

fn pid_alive(pid: i32) -> bool {
    // A shim that exited but was not reaped yet is a zombie: not alive.
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

/// What the container driver runs on the host, and the Debian package of each.
const HOST_COMMANDS: [(&str, &str); 5] = [
    ("runc", "runc"),
    ("ip", "iproute2"),
    ("iptables", "iptables"),
    ("mkfs.ext4", "e2fsprogs"),
    ("mount", "mount"),
];

/// Whether `command` is an executable file on `$PATH`.
fn on_path(command: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| {
            fs::metadata(dir.join(command))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// Machines need root and a few host commands: one error that says what
/// to run when something is missing.
pub fn check_host() -> Result<()> {
    if !rustix::process::geteuid().is_root() {
        return Err(Error::Host(
            "machines need root (mounts, namespaces, the bridge): run `hangar up` as root, e.g. with sudo".into(),
        ));
    }
    let missing: Vec<&str> = HOST_COMMANDS
        .iter()
        .filter(|(cmd, _)| !on_path(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    if !missing.is_empty() {
        return Err(Error::Host(format!(
            "machines need {} (not installed): apt-get install {} (scripts/demo installs everything a node needs)",
            missing.join(", "),
            missing.join(" ")
        )));
    }
    Ok(())
}

impl Runtime {
    /// `init_bin` is the static hangar-init binary to put in every machine.
    /// The driver for machines under `home`, putting `init_bin` in each and
    /// supervising each with `shim_exe machine shim`.
    pub fn open(home: &Path, init_bin: PathBuf, shim_exe: PathBuf) -> Result<Runtime> {
        let machines = home.join("machines");
        let runc_root = machines.join("runc");
        fs::create_dir_all(&runc_root).at(&runc_root)?;
        if !init_bin.is_file() {
            return Err(Error::Host(format!(
                "hangar-init not found at {}; unset HANGAR_INIT to use the one the hangar binary carries",
                init_bin.display()
            )));
        }
        Ok(Runtime {
            store: Store::open(home)?,
            snapshots: Snapshots::open(home)?,
            machines,
            runc_root,
            init_bin,
            shim_exe,
            vmm: None,
        })
    }

    /// Enable micro-VMs with the guest kernel in `kernel_dir`.
    pub fn with_vms(mut self, kernel_dir: PathBuf) -> Runtime {
        self.vmm = Some(crate::vm::Vmm::new(kernel_dir));
        self
    }

    /// The VM driver, or what to do to get it.
    pub fn vmm(&self) -> Result<&crate::vm::Vmm> {
        let vmm = self.vmm.as_ref().ok_or_else(|| {
            Error::Host("micro-VMs are off: no guest kernel was found; fetch it with scripts/fetch-kernel (or set HANGAR_VM_KERNEL)".into())
        })?;
        vmm.check()?;
        Ok(vmm)
    }

    fn is_vm(&self, id: &str) -> bool {
        self.dir(id).is_vm()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn dir(&self, id: &str) -> MachineDir {
        MachineDir::new(self.machines.join(id))
    }

    /// Start the machine's shim (which runs runc). The returned child is the
    /// shim: the caller reaps it; the machine outlives the caller.
    fn spawn_machine(&self, id: &str, slot: u32) -> Result<Child> {
        let hangar_exe = &self.shim_exe;
        let dir = self.dir(id);
        if self.is_vm(id) {
            if !crate::vm::tap_exists(id) {
                crate::vm::attach_tap(id, slot)?;
            }
            crate::vm::make_fifo(&dir.ctl())?;
            return self.spawn_shim(id, hangar_exe);
        }
        if !dir.bundle_config().is_file() {
            return Err(Error::NoMachine(id.to_string()));
        }
        // A stopped machine holds no namespace (see `release`): it gets
        // its network again, at its slot's addresses. One created just now
        // has it already.
        if !network::attached(id) {
            network::attach(id, slot)?;
        }
        if !crate::container::is_mountpoint(&dir.rootfs()) {
            let lease = fs::read_to_string(dir.lease()).unwrap_or_default();
            let lowers: Vec<PathBuf> = lease
                .lines()
                .filter_map(|l| l.parse::<Digest>().ok())
                .map(|d| self.snapshots.path(&d))
                .collect();
            crate::container::mount_rootfs(&dir, id, &lowers)?;
        }
        let _ = fs::remove_file(dir.exit());
        // A container of that id left by a crash would make `runc run` fail.
        let _ = runc(&self.runc_root)
            .args(["delete", "--force", id])
            .output();
        self.spawn_shim(id, hangar_exe)
    }

    fn spawn_shim(&self, id: &str, hangar_exe: &Path) -> Result<Child> {
        let dir = self.dir(id);
        let _ = fs::remove_file(dir.exit());
        let mut cmd = Command::new(hangar_exe);
        cmd.args(["machine", "shim"])
            .arg(dir.path())
            .arg(id)
            .arg(&self.runc_root);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: setsid is async-signal-safe; it detaches the shim from our
        // session so signals to `hangar up` do not reach machines.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let child = cmd.spawn().at(hangar_exe)?;
        // Wait until the shim has said it runs, so state() is right at once.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !dir.shim_pid().exists() && !dir.exit().exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(child)
    }

    /// Run a command inside the running machine; its output and status back.
    fn exec_as(
        &self,
        id: &str,
        argv: &[String],
        env: &[String],
        user: Option<&hangar_init::RunAs>,
        stdin: &[u8],
    ) -> Result<Output> {
        if self.is_vm(id) {
            if user.is_some() {
                return Err(Error::Host(
                    "exec --user is for containers; in a micro-VM run `su` or `setpriv` from the command".into(),
                ));
            }
            return crate::vm::exec(&self.dir(id), argv, env, stdin);
        }
        crate::container::exec(&self.runc_root, id, argv, env, user, stdin)
    }

    /// `spec` (`name`, `uid`, `name:group`, `uid:gid`) as a user of the
    /// machine's own passwd and group files.
    pub fn user(&self, id: &str, spec: &str) -> std::result::Result<hangar_init::RunAs, String> {
        hangar_init::resolve_user(spec, &self.dir(id).rootfs())
    }

    /// Which of `ids` hold anything `release` gives back (the mount table
    /// is read once for all of them).
    fn holding<'a>(&self, ids: &[&'a str]) -> Vec<&'a str> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mounted: std::collections::HashSet<&str> = mountinfo
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .collect();
        ids.iter()
            .copied()
            .filter(|id| {
                network::attached(id)
                    || crate::vm::tap_exists(id)
                    || self.runc_root.join(id).exists()
                    || self
                        .dir(id)
                        .mounts()
                        .iter()
                        .any(|m| mounted.contains(m.to_string_lossy().as_ref()))
            })
            .collect()
    }
}

impl Driver for Runtime {
    /// How a VM machine runs (None for containers).
    fn vm_info(&self, id: &str) -> Option<VmInfo> {
        let launch: crate::vm::Launch =
            serde_json::from_slice(&fs::read(self.dir(id).vm_launch()).ok()?).ok()?;
        let overhead_kib = fs::read_to_string(self.dir(id).qemu_pid())
            .ok()
            .and_then(|p| p.trim().parse().ok())
            .filter(|p| pid_alive(*p))
            .and_then(|p| crate::vm::overhead_kib(p, launch.memory_mb));
        Some(VmInfo {
            accel: launch.accel.describe().into(),
            base_disk_reused: launch.base_disk_reused,
            overhead_kib,
        })
    }

    fn log_path(&self, id: &str) -> PathBuf {
        self.dir(id).log()
    }

    fn usage(&self, id: &str) -> Option<crate::usage::Usage> {
        let dir = self.dir(id);
        match fs::read(dir.vm_launch()) {
            Ok(bytes) => {
                let launch: crate::vm::Launch = serde_json::from_slice(&bytes).ok()?;
                let pid = fs::read_to_string(dir.qemu_pid())
                    .ok()?
                    .trim()
                    .parse()
                    .ok()
                    .filter(|p| pid_alive(*p))?;
                crate::usage::vm(pid as u32, launch.memory_mb, &crate::vm::tap_name(id))
            }
            Err(_) => crate::usage::container(
                std::path::Path::new("/sys/fs/cgroup"),
                id,
                &crate::network::host_veth(id),
            ),
        }
    }

    /// Build everything a machine needs short of starting it: snapshots,
    /// its own layer, the overlay mount, its network, the bundle.
    fn create(&self, spec: &MachineSpec) -> Result<Created> {
        if spec.vm {
            self.vmm()?;
        }
        let image = self.store.image(&spec.image)?;
        let (lowers, unpacked) = self.snapshots.prepare(&self.store, &image)?;
        let dir = self.dir(&spec.id);
        for sub in [dir.rootfs(), dir.bundle()] {
            fs::create_dir_all(&sub).at(&sub)?;
        }
        let lease: Vec<String> = chain_ids(&image.config.rootfs.diff_ids)
            .iter()
            .map(|d| d.to_string())
            .collect();
        fs::write(dir.lease(), lease.join("\n")).at(dir.lease())?;

        let run = image.config.config.clone().unwrap_or_default();
        let mut init = spec.init.clone();
        init.hostname = spec.hostname.clone();
        init.image = hangar_init::ImageProcess {
            entrypoint: run.entrypoint.unwrap_or_default(),
            cmd: run.cmd.unwrap_or_default(),
            env: run.env.unwrap_or_default(),
            workdir: run.working_dir.unwrap_or_default(),
            user: run.user.unwrap_or_default(),
        };
        if spec.vm {
            return self.create_vm(
                spec,
                init,
                &lowers,
                unpacked,
                &chain_ids(&image.config.rootfs.diff_ids),
            );
        }
        self.create_container(spec, init, &lowers, unpacked)
    }

    fn state(&self, id: &str) -> ProcState {
        let dir = self.dir(id);
        if let Ok(pid) = fs::read_to_string(dir.shim_pid()) {
            if pid.trim().parse().is_ok_and(pid_alive) {
                return ProcState::Running;
            }
        }
        match fs::read(dir.exit())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
        {
            Some(exit) => ProcState::Exited(exit),
            None => ProcState::NotRunning,
        }
    }

    /// Send `signal` (a name like `SIGTERM` or a number) to the machine's init.
    fn signal(&self, id: &str, signal: &str) -> Result<()> {
        if self.is_vm(id) {
            let number = crate::shim::signal_number(signal)
                .ok_or_else(|| Error::Host(format!("unknown signal {signal:?}")))?;
            if number == libc::SIGKILL {
                // Nothing inside can refuse it: the VM goes, as a killed
                // process would.
                if let Some(pid) = fs::read_to_string(self.dir(id).qemu_pid())
                    .ok()
                    .and_then(|p| p.trim().parse::<i32>().ok())
                {
                    // SAFETY: kill(2) of the machine's QEMU process.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                return Ok(());
            }
            return crate::vm::signal(&self.dir(id), number);
        }
        run(runc(&self.runc_root).args(["kill", id, signal])).map(|_| ())
    }

    /// Remove every trace of the machine: process, container state, mount,
    /// network namespace, cgroup, files. Idempotent.
    fn destroy(&self, id: &str) -> Result<()> {
        let dir = self.dir(id);
        if self.is_vm(id) {
            let _ = self.signal(id, "SIGKILL");
        }
        let _ = runc(&self.runc_root).args(["kill", id, "SIGKILL"]).output();
        if let Ok(pid) = fs::read_to_string(dir.shim_pid()) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                let deadline = Instant::now() + Duration::from_secs(5);
                while pid_alive(pid) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        release_host(&dir, id, &self.runc_root);
        // Its files go only once nothing is mounted over them.
        for mounted in dir.mounts() {
            if crate::container::is_mountpoint(&mounted) {
                return Err(Error::Host(format!(
                    "cannot unmount {}; machine {id} is kept (run `hangar machine destroy {id} --force` again)",
                    mounted.display()
                )));
            }
        }
        if dir.exists() {
            fs::remove_dir_all(&dir).at(dir.path())?;
        }
        Ok(())
    }

    /// Give back what only a running machine needs: runc's container
    /// state and cgroup, the root filesystem's mount, the network namespace
    /// and veth pair (or a VM's tap). Its files stay, and `start` makes the
    /// rest again (same addresses). The shim does this when the app ends;
    /// the node calls it for machines found stopped that still hold any of
    /// it (a shim killed, an older node). Idempotent; a running machine is
    /// left alone.
    fn release(&self, id: &str) {
        if self.state(id) != ProcState::Running {
            release_host(&self.dir(id), id, &self.runc_root);
        }
    }

    /// The size (MB) of the filesystem that holds the machines: no
    /// machine's root filesystem can be larger.
    fn disk_capacity_mb(&self) -> u64 {
        rustix::fs::statvfs(&self.machines)
            .map(|s| s.f_blocks.saturating_mul(s.f_frsize) >> 20)
            .unwrap_or(u64::MAX)
    }

    /// Remove snapshots no machine leases and no stored image needs.
    fn gc(&self) -> Result<usize> {
        let home = self.machines.parent().unwrap_or(Path::new("/"));
        crate::snapshot::gc(home, &self.store)
    }

    fn start(&self, id: &str, slot: u32) -> Result<()> {
        let mut shim = self.spawn_machine(id, slot)?;
        // The machine's state is in its files; this only keeps zombies away.
        std::thread::spawn(move || {
            let _ = shim.wait();
        });
        Ok(())
    }

    fn exec(&self, id: &str, exec: &Exec<'_>) -> Result<Output> {
        let user = exec
            .user
            .map(|spec| {
                self.user(id, spec)
                    .map_err(|e| Error::Invalid(format!("exec user {spec:?}: {e}")))
            })
            .transpose()?;
        self.exec_as(id, exec.argv, exec.env, user.as_ref(), exec.stdin)
    }

    fn console(
        &self,
        id: &str,
        argv: &[String],
        env: &[String],
        user: Option<&str>,
        rows: u16,
        cols: u16,
    ) -> Result<crate::console::Console> {
        if self.is_vm(id) {
            // The image's users are on its disk: by number only.
            let (uid, gid) = match user {
                None => (0, 0),
                Some(spec) => {
                    let (u, g) = spec.split_once(':').unwrap_or((spec, spec));
                    match (u.parse(), g.parse()) {
                        (Ok(u), Ok(g)) => (u, g),
                        _ => {
                            return Err(Error::Invalid(format!(
                                "console user {spec:?}: in a micro-VM give a uid or uid:gid"
                            )))
                        }
                    }
                }
            };
            let mut env = env.to_vec();
            env.push("TERM=xterm-256color".into());
            let open = hangar_init::vmconsole::Open {
                argv: argv.to_vec(),
                env,
                uid,
                gid,
                rows,
                cols,
            };
            return crate::console::open_vm(&self.shim_exe, &self.dir(id).console_socket(), &open);
        }
        let user = user
            .map(|spec| {
                self.user(id, spec)
                    .map_err(|e| Error::Invalid(format!("console user {spec:?}: {e}")))
            })
            .transpose()?;
        // A machine just started may not have its container yet: runc
        // makes it after `start` returns.
        let made = self.runc_root.join(id).join("state.json");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !made.exists() {
            if std::time::Instant::now() > deadline || self.state(id) != ProcState::Running {
                return Err(Error::Invalid(format!(
                    "machine {id} has no running container (it may be stopping): start it and try again"
                )));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        crate::console::open(&self.runc_root, id, argv, env, user.as_ref(), rows, cols)
    }

    fn holding_host_resources(&self, ids: &[&str]) -> Vec<String> {
        self.holding(ids).into_iter().map(String::from).collect()
    }

    /// The directories below `machines/` with a snapshot lease: a machine
    /// is one from its create to its destroy.
    fn machines(&self) -> Vec<String> {
        let mut ids: Vec<String> = std::fs::read_dir(&self.machines)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|id| self.dir(id).lease().exists())
            .collect();
        ids.sort();
        ids
    }
}

/// See `Runtime::release`.
pub(crate) fn release_host(dir: &MachineDir, id: &str, runc_root: &Path) {
    if runc_root.join(id).exists() {
        let _ = runc(runc_root).args(["delete", "--force", id]).output();
    }
    // The overlay first, then the filesystem its upper layer is on (the
    // loop device goes with the last unmount: `mount` set it to autoclear).
    for mounted in dir.mounts() {
        if crate::container::is_mountpoint(&mounted) {
            let _ = rustix::mount::unmount(&mounted, rustix::mount::UnmountFlags::DETACH);
        }
    }
    if network::attached(id) {
        network::detach(id);
    }
    if crate::vm::tap_exists(id) {
        crate::vm::detach_tap(id);
    }
}

/// The most of each of stdout and stderr an exec keeps; the rest is read
/// and dropped (so the command never blocks on a full pipe), and counted.
pub const EXEC_OUTPUT_CAP: usize = 1 << 20;

/// `cmd`'s output like `Command::output`, keeping at most `cap` bytes of each
/// stream. Bytes past the cap are counted in the returned `Output`'s place:
/// the text `[... N more bytes not shown]` ends a stream that was cut.
pub fn output_capped(
    cmd: &mut Command,
    stdin: &[u8],
    cap: usize,
) -> std::io::Result<std::process::Output> {
    use std::io::Read;
    let mut child = cmd
        .stdin(if stdin.is_empty() {
            Stdio::null()
        } else {
            Stdio::piped()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    fn keep(mut r: impl Read, cap: usize) -> Vec<u8> {
        let mut kept = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        let mut dropped: u64 = 0;
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let room = cap.saturating_sub(kept.len()).min(n);
                    kept.extend_from_slice(&buf[..room]);
                    dropped += (n - room) as u64;
                }
            }
        }
        if dropped > 0 {
            kept.extend_from_slice(format!("\n[... {dropped} more bytes not shown]\n").as_bytes());
        }
        kept
    }
    // Written beside the readers, so a command that answers before it has
    // read everything cannot deadlock; a command that never reads it ends
    // the writing with EPIPE when it exits.
    let input = child.stdin.take().map(|mut w| {
        let bytes = stdin.to_vec();
        std::thread::spawn(move || {
            let _ = w.write_all(&bytes);
        })
    });
    let out = child
        .stdout
        .take()
        .map(|r| std::thread::spawn(move || keep(r, cap)));
    let err = child
        .stderr
        .take()
        .map(|r| std::thread::spawn(move || keep(r, cap)));
    let status = child.wait()?;
    // Not joined: a process the command left behind may hold the pipe
    // open; the writer ends when it does.
    drop(input);
    let join = |h: Option<std::thread::JoinHandle<Vec<u8>>>| {
        h.and_then(|h| h.join().ok()).unwrap_or_default()
    };
    Ok(std::process::Output {
        status,
        stdout: join(out),
        stderr: join(err),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_output_is_capped_and_says_how_much_was_cut() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "head -c 300000 /dev/zero; echo err >&2"]);
        let out = output_capped(&mut cmd, &[], 1000).unwrap();
        assert!(out.status.success());
        assert_eq!(&out.stdout[..1000], &[0u8; 1000][..]);
        assert!(
            String::from_utf8_lossy(&out.stdout[1000..]).contains("299000 more bytes not shown")
        );
        assert_eq!(out.stderr, b"err\n");
    }
}
