//! The `hangar-init` binary: see the library's docs for what it does.

use std::ffi::CString;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitCode};

use hangar_init::{InitConfig, CONFIG_PATH, VM_CONFIG_PATH};

mod vm;

/// The app's pid once it runs (for the VM's signal listener).
static APP: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// Signals passed on to the app.
const FORWARDED: [libc::c_int; 9] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGWINCH,
    libc::SIGCONT,
    libc::SIGALRM,
];

fn say(msg: &str) {
    eprintln!("hangar-init: {msg}");
}

fn mounted_targets() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .collect()
}

/// Mount the pseudo filesystems a Linux program expects, where nothing is
/// mounted yet. In a container the runtime did this and we lack the
/// privilege anyway; in a VM nobody did.
fn ensure_mounts() {
    let table: [(&str, &str, libc::c_ulong, &str); 7] = [
        (
            "/proc",
            "proc",
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            "",
        ),
        (
            "/sys",
            "sysfs",
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            "",
        ),
        ("/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755"),
        (
            "/dev/pts",
            "devpts",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            "newinstance,ptmxmode=0666,mode=0620",
        ),
        (
            "/dev/shm",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            "mode=1777",
        ),
        (
            "/run",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            "mode=0755",
        ),
        (
            "/tmp",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            "mode=1777",
        ),
    ];
    for (target, fstype, flags, data) in table {
        if mounted_targets().iter().any(|m| m == target) {
            continue;
        }
        let _ = std::fs::create_dir_all(target);
        let (Ok(t), Ok(f), Ok(d)) = (
            CString::new(target),
            CString::new(fstype),
            CString::new(data),
        ) else {
            continue;
        };
        // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
        let rc =
            unsafe { libc::mount(f.as_ptr(), t.as_ptr(), f.as_ptr(), flags, d.as_ptr().cast()) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EPERM) {
                say(&format!("cannot mount {fstype} on {target}: {err}"));
            }
        }
    }
}

fn set_hostname(name: &str) {
    if name.is_empty() {
        return;
    }
    let current = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    if current.trim() == name {
        return;
    }
    // SAFETY: the pointer and length describe `name`'s bytes.
    let rc = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    if rc != 0 {
        say(&format!(
            "cannot set hostname: {}",
            std::io::Error::last_os_error()
        ));
    }
}

fn sigset(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initializes it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for s in signals {
        // SAFETY: `set` is initialized and `s` is a valid signal number.
        unsafe { libc::sigaddset(&mut set, *s) };
    }
    set
}

fn exit_code(status: libc::c_int) -> u8 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status) as u8
    } else if libc::WIFSIGNALED(status) {
        (128 + libc::WTERMSIG(status)) as u8
    } else {
        255
    }
}

fn main() -> ExitCode {
    // PID 1 of a micro-VM starts in the initramfs, where the host put its
    // config; in a container the runtime passes the config's path.
    let in_vm = std::process::id() == 1 && Path::new(VM_CONFIG_PATH).exists();
    let code = run(in_vm);
    if in_vm {
        let oom = code == 137 && vm::oom_kills() > 0;
        vm::power_off(code, oom);
    }
    ExitCode::from(code)
}

fn run(in_vm: bool) -> u8 {
    let path = if in_vm {
        VM_CONFIG_PATH.to_string()
    } else {
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| CONFIG_PATH.to_string())
    };
    let config: InitConfig = match std::fs::read(&path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(c) => c,
        Err(e) => {
            say(&format!("cannot read {path}: {e}"));
            return 127;
        }
    };
    if let Some(setup) = config.vm.as_ref().filter(|_| in_vm) {
        if let Err(e) = vm::boot(setup) {
            say(&format!("cannot boot the machine: {e}"));
            return 125;
        }
        vm::listen_for_signals(&APP);
        vm::serve_consoles();
    }
    ensure_mounts();
    set_hostname(&config.hostname);
    // An image may have no /etc at all (a single static binary): its
    // resolver and hosts file are still the machine's.
    let _ = std::fs::create_dir_all("/etc");
    let _ = std::fs::write("/etc/resolv.conf", config.resolv_conf());
    if !config.hosts.is_empty() {
        let _ = std::fs::write("/etc/hosts", config.hosts_file());
    }
    let argv = config.argv();
    if argv.is_empty() {
        say("the image has no Entrypoint or Cmd and the machine sets no command; give one (init.cmd)");
        return 127;
    }
    let user = match config.run_as(Path::new("/")) {
        Ok(u) => u,
        Err(e) => {
            say(&e);
            return 126;
        }
    };
    let workdir = config.workdir();
    let _ = std::fs::create_dir_all(&workdir);

    // Block the signals we forward (and SIGCHLD) and take them with sigwait.
    let mut watched = FORWARDED.to_vec();
    watched.push(libc::SIGCHLD);
    let blocked = sigset(&watched);
    // SAFETY: `blocked` is a valid set; a null old-set pointer is allowed.
    unsafe { libc::sigprocmask(libc::SIG_BLOCK, &blocked, std::ptr::null_mut()) };

    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]).env_clear().current_dir(&workdir);
    if in_vm {
        // The console's input carries the host's signals, not the app's stdin.
        cmd.stdin(std::process::Stdio::null());
    }
    for kv in config.environment(&user.home) {
        let (k, v) = kv.split_once('=').unwrap_or((&kv, ""));
        cmd.env(k, v);
    }
    let groups: Vec<libc::gid_t> = user.groups.clone();
    let (uid, gid) = (user.uid, user.gid);
    // SAFETY: between fork and exec we only make async-signal-safe syscalls.
    unsafe {
        cmd.pre_exec(move || {
            let empty = sigset(&[]);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            libc::setsid();
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0 && libc::getuid() == 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setgid(gid) != 0 || libc::setuid(uid) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            say(&format!("cannot run {}: {e}", argv[0]));
            return if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            };
        }
    };
    let app = child.id() as libc::pid_t;
    APP.store(app, std::sync::atomic::Ordering::SeqCst);
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: `blocked` is a valid set and `sig` a valid out-pointer.
        if unsafe { libc::sigwait(&blocked, &mut sig) } != 0 {
            continue;
        }
        if sig != libc::SIGCHLD {
            // SAFETY: plain kill(2) of our own child.
            unsafe { libc::kill(app, sig) };
            continue;
        }
        // Reap everything: the app, and orphans re-parented to us.
        loop {
            let mut status: libc::c_int = 0;
            // SAFETY: `status` is a valid out-pointer.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            if pid == app {
                return exit_code(status);
            }
        }
    }
}
