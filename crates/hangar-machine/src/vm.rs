//! The micro-VM driver's host half: QEMU's `microvm` machine (no firmware,
//! direct kernel boot, virtio-mmio devices), under KVM when a probe guest
//! really boots there and under software emulation otherwise.
//!
//! Per image, the layer snapshots become one ext4 disk (`vmdisks/`, built
//! once with `mkfs.ext4 -d`); per machine, a qcow2 overlay backed by it
//! (`qemu-img`), an initramfs (hangar-init as `/init`, the virtio modules,
//! the init config) and a tap device on the machines' bridge. The guest's
//! console is the machine's log; init reports the app's end there and
//! takes signals from it (`hangar_init::EXIT_MARKER`, `SIGNAL_MARKER`).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::dir::MachineDir;
use crate::error::{Error, IoContext, Result};
use crate::network;
use crate::runtime::{Created, MachineSpec};
use hangar_init::InitConfig;
use hangar_oci::Digest;

/// Loaded in this order (init retries any whose dependencies come later).
pub const MODULES: [&str; 7] = [
    "virtio",
    "virtio_ring",
    "virtio_mmio",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
];

const QEMU: &str = "qemu-system-x86_64";
/// Every QEMU run: nothing but what is asked for, the serial console on
/// stdio, and an exit instead of a reboot.
const QEMU_COMMON: [&str; 6] = [
    "-nodefaults",
    "-no-user-config",
    "-nographic",
    "-serial",
    "stdio",
    "-no-reboot",
];

/// How guests run.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization.
    Kvm,
    /// QEMU's software emulation (TCG): slow, but works anywhere.
    Tcg,
}

impl Accel {
    pub fn describe(&self) -> &'static str {
        match self {
            Accel::Kvm => "KVM",
            Accel::Tcg => "software emulation (TCG)",
        }
    }
}

/// The guest kernel and the accelerator, probed once per process.
pub struct Vmm {
    /// `vmlinuz` and `modules/*.ko` (scripts/fetch-kernel makes it).
    pub kernel_dir: PathBuf,
    accel: OnceLock<(Accel, String)>,
}

/// What `vm.json` in a machine's directory holds: how to launch it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Launch {
    pub argv: Vec<String>,
    pub accel: Accel,
    pub memory_mb: u64,
    /// Whether the image's base disk existed already (it was not built).
    pub base_disk_reused: bool,
}

impl Vmm {
    pub fn new(kernel_dir: PathBuf) -> Vmm {
        Vmm {
            kernel_dir,
            accel: OnceLock::new(),
        }
    }

    /// Everything a VM needs on this host, or what to do about it.
    pub fn check(&self) -> Result<()> {
        if !self.kernel_dir.join("vmlinuz").is_file() {
            return Err(Error::Host(format!(
                "no guest kernel in {}; fetch it with scripts/fetch-kernel (or set HANGAR_VM_KERNEL)",
                self.kernel_dir.display()
            )));
        }
        for tool in [QEMU, "qemu-img", "mkfs.ext4"] {
            if Command::new(tool).arg("--version").output().is_err() {
                return Err(Error::Host(format!(
                    "{tool} is not installed; install qemu-system-x86, qemu-utils and e2fsprogs"
                )));
            }
        }
        Ok(())
    }

    /// KVM if a guest really boots under it, else software emulation, and
    /// why. Probed once per process (a few seconds at most).
    pub fn accel(&self) -> (Accel, String) {
        self.accel
            .get_or_init(|| probe(&self.kernel_dir.join("vmlinuz")))
            .clone()
    }
}

/// Boot the kernel alone under KVM: it prints its banner within seconds
/// and panics for want of a root, and QEMU exits. Some nested hosts expose
/// /dev/kvm yet fail on the first emulated instruction: then no banner.
fn probe(kernel: &Path) -> (Accel, String) {
    if !Path::new("/dev/kvm").exists() {
        return (Accel::Tcg, "no /dev/kvm".into());
    }
    let child = Command::new(QEMU)
        .args([
            "-M",
            "microvm,acpi=on",
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-m",
            "64",
        ])
        .args(QEMU_COMMON)
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", "console=ttyS0 panic=-1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let Ok(child) = child else {
        return (Accel::Tcg, format!("{QEMU} did not start"));
    };
    let pid = child.id();
    let waiter = std::thread::spawn(move || child.wait_with_output());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !waiter.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if !waiter.is_finished() {
        // SAFETY: kill(2) of the probe child we started.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    let out = waiter.join().ok().and_then(|r| r.ok());
    let text = out
        .map(|o| {
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
        })
        .unwrap_or_default();
    if text.contains("Linux version") {
        (Accel::Kvm, "a probe guest booted under KVM".into())
    } else {
        let why = text
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no output")
            .trim()
            .to_string();
        (
            Accel::Tcg,
            format!("/dev/kvm is there but a probe guest did not boot under it ({why})"),
        )
    }
}

pub fn tap_name(id: &str) -> String {
    format!("ht{}", &id[..id.len().min(12)])
}

/// The machine's tap device on the bridge, with its slot's MAC on the
/// guest side (set by QEMU).
pub fn attach_tap(id: &str, slot: u32) -> Result<()> {
    let net = network::net_of(slot);
    network::ensure_bridge(net)?;
    let tap = tap_name(id);
    detach_tap(id);
    let batch = format!(
        "tuntap add dev {tap} mode tap\nlink set {tap} master {} up\n",
        network::bridge(net)
    );
    network::ip_batch(&[], &batch)
}

pub fn detach_tap(id: &str) {
    let _ = Command::new("ip")
        .args(["link", "del", &tap_name(id)])
        .output();
}

pub fn tap_exists(id: &str) -> bool {
    Path::new("/sys/class/net").join(tap_name(id)).exists()
}

/// The image's base disk: the merged layers as one ext4 filesystem, built
/// once (under a lock; written aside and renamed) and reused. `lowers` are
/// the layer snapshots, bottom first. Returns the path and whether it
/// existed already.
pub fn base_disk(machines: &Path, key: &str, lowers: &[PathBuf]) -> Result<(PathBuf, bool)> {
    let dir = machines.join("vmdisks");
    fs::create_dir_all(&dir).at(&dir)?;
    let disk = dir.join(format!("{key}.ext4"));
    if disk.is_file() {
        return Ok((disk, true));
    }
    let lock_path = dir.join(format!("{key}.lock"));
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .at(&lock_path)?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| Error::Host(format!("lock {}: {e}", lock_path.display())))?;
    if disk.is_file() {
        return Ok((disk, true));
    }
    // One layer is its own tree; several are merged by a read-only overlay.
    let merged = dir.join(format!("{key}.mnt"));
    let source = if lowers.len() == 1 {
        lowers[0].clone()
    } else {
        fs::create_dir_all(&merged).at(&merged)?;
        let lower: Vec<String> = lowers
            .iter()
            .rev()
            .map(|p| p.display().to_string())
            .collect();
        let options = std::ffi::CString::new(format!("lowerdir={}", lower.join(":")))
            .map_err(|e| Error::Host(e.to_string()))?;
        rustix::mount::mount(
            "overlay",
            &merged,
            "overlay",
            rustix::mount::MountFlags::RDONLY,
            Some(options.as_c_str()),
        )
        .map_err(|e| Error::Host(format!("cannot merge the layers for a VM disk: {e}")))?;
        merged.clone()
    };
    let bytes = tree_bytes(&source);
    // Room for the filesystem's own structures and for the app's writes
    // (which land in the machine's overlay, but need free blocks to exist).
    let mb = (bytes * 5 / 4) / (1 << 20) + 256;
    let tmp = dir.join(format!("{key}.ext4.tmp"));
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "root", "-E", "root_owner=0:0", "-d"])
        .arg(&source)
        .arg(&tmp)
        .arg(format!("{mb}M"))
        .output();
    if lowers.len() > 1 {
        let _ = rustix::mount::unmount(&merged, rustix::mount::UnmountFlags::DETACH);
        let _ = fs::remove_dir(&merged);
    }
    let out = out.map_err(|e| Error::Host(format!("mkfs.ext4: {e}")))?;
    if !out.status.success() {
        let _ = fs::remove_file(&tmp);
        return Err(Error::Command {
            command: "mkfs.ext4 -d".into(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    fs::rename(&tmp, &disk).at(&disk)?;
    Ok((disk, false))
}

fn tree_bytes(root: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(entries) = fs::read_dir(&p) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = e.metadata() else { continue };
            total += m.len().max(4096);
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    total
}

/// A copy-on-write overlay of the base disk for one machine.
pub fn overlay(dir: &MachineDir, base: &Path, size_mb: u64) -> Result<PathBuf> {
    let disk = dir.vm_disk();
    // The guest grows the image's filesystem to the disk's size at boot
    // (hangar-init), so the disk's size is the root filesystem's.
    let base_mb = fs::metadata(base).at(base)?.len().div_ceil(1 << 20);
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(base)
        .arg(&disk)
        .arg(format!("{}M", size_mb.max(base_mb)))
        .output()
        .map_err(|e| Error::Host(format!("qemu-img: {e}")))?;
    if !out.status.success() {
        return Err(Error::Command {
            command: "qemu-img create".into(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(disk)
}

/// The initramfs: `/init` (hangar-init), the modules, the config.
pub fn initramfs(path: &Path, init_bin: &Path, kernel_dir: &Path, config: &[u8]) -> Result<()> {
    let mut cpio = Cpio::default();
    cpio.dir("hangar");
    cpio.dir("hangar/modules");
    cpio.file("init", 0o755, &fs::read(init_bin).at(init_bin)?);
    cpio.file("hangar/config.json", 0o600, config);
    for m in MODULES {
        let p = kernel_dir.join("modules").join(format!("{m}.ko"));
        cpio.file(
            &format!("hangar/modules/{m}.ko"),
            0o644,
            &fs::read(&p).at(&p)?,
        );
    }
    let bytes = cpio.finish();
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, bytes).at(&tmp)?;
    fs::rename(&tmp, path).at(path)
}

/// The `newc` cpio format the kernel unpacks an initramfs from.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | perm, data);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.out
    }
}

/// QEMU's command line for a machine.
#[allow(clippy::too_many_arguments)]
pub fn argv(
    kernel_dir: &Path,
    accel: &Accel,
    dir: &MachineDir,
    id: &str,
    slot: u32,
    cpus: u32,
    memory_mb: u64,
) -> Vec<String> {
    let s = |p: &Path| p.display().to_string();
    let mut a: Vec<String> = vec![QEMU.into(), "-M".into(), "microvm,acpi=on".into()];
    match accel {
        Accel::Kvm => a.extend(["-accel", "kvm", "-cpu", "host"].map(String::from)),
        Accel::Tcg => a.extend(["-accel", "tcg", "-cpu", "max"].map(String::from)),
    }
    a.extend([
        "-smp".into(),
        cpus.max(1).to_string(),
        "-m".into(),
        memory_mb.to_string(),
    ]);
    a.extend(QEMU_COMMON.map(String::from));
    a.extend([
        "-kernel".into(),
        s(&kernel_dir.join("vmlinuz")),
        "-initrd".into(),
        s(&dir.initrd()),
    ]);
    // Under emulation the kernel's timer calibration depends on the host's
    // load: on a busy host it can fail to calibrate the TSC and hang before
    // init. Preset values take the host's timing out of the boot.
    let mut cmdline = "console=ttyS0 quiet loglevel=1 panic=-1".to_string();
    if *accel == Accel::Tcg {
        cmdline.push_str(" lpj=4000000 tsc_early_khz=2000000 no_timer_check");
    }
    a.extend(["-append".into(), cmdline]);
    a.extend([
        "-drive".into(),
        format!("id=root,file={},format=qcow2,if=none", s(&dir.vm_disk())),
    ]);
    a.extend(["-device".into(), "virtio-blk-device,drive=root".into()]);
    a.extend([
        "-netdev".into(),
        format!(
            "tap,id=net0,ifname={},script=no,downscript=no",
            tap_name(id)
        ),
    ]);
    a.extend([
        "-device".into(),
        format!("virtio-net-device,netdev=net0,mac={}", network::mac(slot)),
    ]);
    // The second serial port (the guest's ttyS1): console sessions.
    a.extend([
        "-chardev".into(),
        format!(
            "socket,id=sessions,path={},server=on,wait=off",
            s(&dir.console_socket())
        ),
        "-device".into(),
        "isa-serial,chardev=sessions,index=1".into(),
    ]);
    a
}

/// The VMM's own memory: the QEMU process's resident memory outside the
/// guest's RAM mapping, in KiB.
pub fn overhead_kib(qemu_pid: i32, memory_mb: u64) -> Option<u64> {
    let smaps = fs::read_to_string(format!("/proc/{qemu_pid}/smaps")).ok()?;
    let guest_kb = memory_mb * 1024;
    let (mut total, mut guest) = (0u64, 0u64);
    let mut size = 0u64;
    for line in smaps.lines() {
        if let Some(v) = line.strip_prefix("Size:") {
            size = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
        } else if let Some(v) = line.strip_prefix("Rss:") {
            let rss: u64 = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
            total += rss;
            // The guest's RAM is one mapping of its size (QEMU may round
            // it up a little). Not "at least its size": under emulation
            // the translation cache is a 1 GiB mapping, and it is the
            // VMM's own memory.
            if (guest_kb..=guest_kb + 2048).contains(&size) {
                guest += rss;
            }
        }
    }
    Some(total.saturating_sub(guest))
}

/// Send a signal (by number) to the guest's init over the console.
pub fn signal(dir: &MachineDir, number: i32) -> Result<()> {
    console_line(dir, &format!("{}{number}\n", hangar_init::SIGNAL_MARKER))
}

/// Write one line into the guest's console (through the shim's FIFO).
fn console_line(dir: &MachineDir, line: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let ctl = dir.ctl();
    let mut f = fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&ctl)
        .map_err(|e| {
            Error::Host(format!(
                "the machine at {} is not running (its console is closed: {e})",
                dir.display()
            ))
        })?;
    f.write_all(line.as_bytes()).at(&ctl)
}

/// Run a command inside the VM: init runs it and prints the result on the
/// console, where the shim files it as `exec-<n>.json`.
pub fn exec(
    dir: &MachineDir,
    argv: &[String],
    env: &[String],
    stdin: &[u8],
) -> Result<std::process::Output> {
    use std::os::unix::process::ExitStatusExt;
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let req = hangar_init::ExecRequest {
        argv: argv.to_vec(),
        env: env.to_vec(),
        stdin: String::from_utf8(stdin.to_vec()).map_err(|_| {
            Error::Host("a VM's exec takes text as its standard input, not bytes".into())
        })?,
    };
    let json = serde_json::to_vec(&req).map_err(|e| Error::Host(e.to_string()))?;
    // The console reads lines of at most 4 KiB.
    let line = format!(
        "{}{n}:{}\n",
        hangar_init::EXEC_MARKER,
        hangar_init::hex_encode(&json)
    );
    if line.len() > 4000 {
        return Err(Error::Host(
            "the command, its environment and its input are too long for a VM's console (4 KiB)"
                .into(),
        ));
    }
    console_line(dir, &line)?;
    let result = dir.exec_result(n);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !result.is_file() {
        if Instant::now() > deadline {
            return Err(Error::Host(
                "the VM did not answer the exec within 120 s".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let bytes = fs::read(&result).at(&result)?;
    let _ = fs::remove_file(&result);
    let r: hangar_init::ExecResult =
        serde_json::from_slice(&bytes).map_err(|e| Error::Host(format!("exec result: {e}")))?;
    Ok(std::process::Output {
        status: std::process::ExitStatus::from_raw((r.code & 0xff) << 8),
        stdout: r.stdout,
        stderr: r.stderr,
    })
}

/// File an exec result line (`<n>:<hex json>`) the guest printed.
pub fn file_exec_result(dir: &MachineDir, rest: &str) {
    let Some((n, hex)) = rest.trim().split_once(':') else {
        return;
    };
    if !n.bytes().all(|b| b.is_ascii_digit() || b == b'-') {
        return;
    }
    let Some(json) = hangar_init::hex_decode(hex) else {
        return;
    };
    let tmp = dir.tmp(&dir.exec_result(n));
    if fs::write(&tmp, json).is_ok() {
        let _ = fs::rename(&tmp, dir.exec_result(n));
    }
}

/// The shim's control FIFO: what the host writes into the guest console.
pub fn make_fifo(path: &Path) -> Result<()> {
    let _ = fs::remove_file(path);
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| Error::Host(e.to_string()))?;
    // SAFETY: mkfifo(3) with a valid NUL-terminated path.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(Error::Host(format!(
            "mkfifo {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

impl crate::runtime::Runtime {
    /// A VM's disk overlay, initramfs, tap and launch line.
    pub(crate) fn create_vm(
        &self,
        spec: &MachineSpec,
        mut init: InitConfig,
        lowers: &[PathBuf],
        unpacked: bool,
        chain: &[Digest],
    ) -> Result<Created> {
        let vmm = self.vmm()?;
        let dir = self.dir(&spec.id);
        let top = chain
            .last()
            .map(|d| d.to_string().replace(':', "-"))
            .unwrap_or_default();
        let (base, reused) = crate::vm::base_disk(&self.machines, &top, lowers)?;
        crate::vm::overlay(&dir, &base, spec.limits.disk_mb)?;
        let addresses = network::address(spec.slot);
        let gw = network::gateway_of(spec.slot);
        init.hosts
            .push((addresses.v4.to_string(), vec![spec.hostname.clone()]));
        init.hosts
            .push((addresses.v6.to_string(), vec![spec.hostname.clone()]));
        init.vm = Some(hangar_init::VmSetup {
            modules: crate::vm::MODULES
                .iter()
                .map(|m| format!("/hangar/modules/{m}.ko"))
                .collect(),
            root: "/dev/vda".into(),
            ipv4: format!("{}/24", addresses.v4),
            ipv6: format!("{}/64", addresses.v6),
            gateway4: gw.v4.to_string(),
            gateway6: gw.v6.to_string(),
            mtu: 1500,
        });
        let config = serde_json::to_vec(&init).map_err(|e| Error::Host(e.to_string()))?;
        crate::vm::initramfs(&dir.initrd(), &self.init_bin, &vmm.kernel_dir, &config)?;
        crate::vm::attach_tap(&spec.id, spec.slot)?;
        let (accel, _) = vmm.accel();
        let launch = crate::vm::Launch {
            argv: crate::vm::argv(
                &vmm.kernel_dir,
                &accel,
                &dir,
                &spec.id,
                spec.slot,
                spec.limits.cpus,
                spec.limits.memory_mb,
            ),
            accel,
            memory_mb: spec.limits.memory_mb,
            base_disk_reused: reused,
        };
        let path = dir.vm_launch();
        fs::write(
            &path,
            serde_json::to_vec_pretty(&launch).unwrap_or_default(),
        )
        .at(&path)?;
        Ok(Created {
            addresses,
            unpacked: unpacked || !reused,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_entries_are_newc_and_aligned() {
        let mut c = Cpio::default();
        c.dir("hangar");
        c.file("init", 0o755, b"abc");
        let out = c.finish();
        assert!(out.starts_with(b"070701"));
        assert_eq!(out.len() % 4, 0);
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.contains("init\0") && text.contains("abc") && text.ends_with("TRAILER!!!\0\0\0\0")
                || text.contains("TRAILER!!!")
        );
        // The file's mode: regular, 0755.
        assert!(text.contains(&format!("{:08X}", 0o100755)));
    }

    #[test]
    fn qemu_gets_the_slot_mac_and_the_tap() {
        let a = argv(
            Path::new("/k"),
            &Accel::Tcg,
            &MachineDir::new("/m/x"),
            "0123456789abcdef",
            258,
            2,
            256,
        );
        let line = a.join(" ");
        assert!(line.contains("-accel tcg") && line.contains("-smp 2") && line.contains("-m 256"));
        assert!(line.contains("ifname=ht0123456789ab") && line.contains("mac=02:68:61:6e:01:02"));
        assert!(line.contains("file=/m/x/disk.qcow2,format=qcow2"));
    }
}
