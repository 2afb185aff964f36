//! The shim: the process (`hangar machine shim`, hidden) that supervises one
//! machine. It runs `runc run` (or QEMU, for a micro-VM) in the foreground
//! in its own session, so machines outlive `hangar up`; copies the app's
//! output into the size-rotated log; watches the memory cgroup for OOM
//! kills; and writes `exit.json` when the app ends, after giving back what
//! the machine held on the host. The control plane never talks to it: it
//! reads the files it leaves (see `runtime.rs` for the layout).

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::dir::MachineDir;
use crate::runtime::{now_secs, release_host, runc, Exit, LOG_ROTATE_BYTES};

/// Appends lines to the machine log, rotating it by size.
struct LogWriter {
    path: PathBuf,
    file: File,
    size: u64,
}

impl LogWriter {
    fn open(path: PathBuf) -> std::io::Result<LogWriter> {
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let size = file.metadata()?.len();
        Ok(LogWriter { path, file, size })
    }

    fn write(&mut self, bytes: &[u8]) {
        if self.size + bytes.len() as u64 > LOG_ROTATE_BYTES {
            let _ = fs::rename(&self.path, self.path.with_extension("log.1"));
            if let Ok(f) = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
            {
                self.file = f;
                self.size = 0;
            }
        }
        if self.file.write_all(bytes).is_ok() {
            self.size += bytes.len() as u64;
        }
    }
}

/// The body of `hangar machine shim DIR ID RUNC_ROOT`: run the container in
/// the foreground, log its output, record how it ended. Returns the app's
/// exit code.
pub fn run_shim(dir: &MachineDir, id: &str, runc_root: &Path) -> i32 {
    let pid_path = dir.shim_pid();
    let log = match LogWriter::open(dir.log()) {
        Ok(l) => Arc::new(Mutex::new(l)),
        Err(_) => {
            write_exit(dir, 125, false);
            return 125;
        }
    };
    // Without its pid on file the node would take the machine for gone and
    // start it again: refuse to run instead, and say why.
    let tmp = dir.tmp(&pid_path);
    let recorded =
        fs::write(&tmp, std::process::id().to_string()).and_then(|()| fs::rename(&tmp, &pid_path));
    if let Err(e) = recorded {
        let line = format!(
            "hangar: cannot record the shim's pid in {}: {e}\n",
            pid_path.display()
        );
        log.lock()
            .unwrap_or_else(|p| p.into_inner())
            .write(line.as_bytes());
        write_exit(dir, 125, false);
        return 125;
    }
    if dir.is_vm() {
        let code = run_vm(dir, id, &log);
        let _ = fs::remove_file(&pid_path);
        return code;
    }
    let mut child = match runc(runc_root)
        .args(["run", "--bundle"])
        .arg(dir.bundle())
        .arg(id)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            if let Ok(mut l) = log.lock() {
                l.write(format!("hangar: cannot start runc: {e}\n").as_bytes());
            }
            release_host(dir, id, runc_root);
            write_exit(dir, 125, false);
            let _ = fs::remove_file(&pid_path);
            return 125;
        }
    };
    let mut copiers = Vec::new();
    let streams = output_streams(&mut child);
    for stream in streams {
        let log = log.clone();
        copiers.push(std::thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut line = Vec::new();
            while reader
                .read_until(b'\n', &mut line)
                .map(|n| n > 0)
                .unwrap_or(false)
            {
                if let Ok(mut l) = log.lock() {
                    l.write(&line);
                }
                line.clear();
            }
        }));
    }
    let oom = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (oom, done, id) = (oom.clone(), done.clone(), id.to_string());
        std::thread::spawn(move || watch_oom(&id, &oom, &done))
    };
    let status = child.wait();
    done.store(true, Ordering::SeqCst);
    for c in copiers {
        let _ = c.join();
    }
    // The watcher wakes when runc removes the cgroup; give it a moment.
    let deadline = Instant::now() + Duration::from_millis(500);
    while !watcher.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    let code = match status {
        Ok(s) => s.code().unwrap_or_else(|| {
            use std::os::unix::process::ExitStatusExt;
            128 + s.signal().unwrap_or(0)
        }),
        Err(_) => 125,
    };
    // A stopped machine holds disk only, and is off the bridge before its
    // exit is told: a start that follows (a restart policy) makes its
    // mount and network again.
    release_host(dir, id, runc_root);
    write_exit(dir, code, oom.load(Ordering::SeqCst));
    let _ = fs::remove_file(&pid_path);
    code
}

/// The VM's half of the shim: QEMU in the foreground, its console into
/// the log (less init's exit line, which gives the exit code), the control
/// FIFO's lines into the console.
fn run_vm(dir: &MachineDir, id: &str, log: &Arc<Mutex<LogWriter>>) -> i32 {
    let say = |msg: String| {
        if let Ok(mut l) = log.lock() {
            l.write(msg.as_bytes());
        }
    };
    let launch: crate::vm::Launch = match fs::read(dir.vm_launch())
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
    {
        Some(l) => l,
        None => {
            say("hangar: the machine's vm.json is unreadable\n".into());
            crate::vm::detach_tap(id);
            write_exit(dir, 125, false);
            return 125;
        }
    };
    let mut child = match Command::new(&launch.argv[0])
        .args(&launch.argv[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            say(format!("hangar: cannot start {}: {e}\n", launch.argv[0]));
            crate::vm::detach_tap(id);
            write_exit(dir, 125, false);
            return 125;
        }
    };
    if let Err(e) = fs::write(dir.qemu_pid(), child.id().to_string()) {
        say(format!(
            "hangar: cannot record QEMU's pid ({e}): a kill of this machine will not reach it\n"
        ));
    }
    // Control: lines written to the FIFO go to the guest's console.
    if let Some(mut stdin) = child.stdin.take() {
        let ctl = dir.ctl();
        std::thread::spawn(move || {
            // Read-write, so the FIFO never reports end-of-file between writers.
            let Ok(fifo) = OpenOptions::new().read(true).write(true).open(&ctl) else {
                return;
            };
            let mut reader = BufReader::new(fifo);
            let mut line = Vec::new();
            while reader
                .read_until(b'\n', &mut line)
                .map(|n| n > 0)
                .unwrap_or(false)
            {
                if stdin.write_all(&line).and_then(|()| stdin.flush()).is_err() {
                    return;
                }
                line.clear();
            }
        });
    }
    let reported: Arc<Mutex<Option<(i32, bool)>>> = Arc::default();
    let mut copiers = Vec::new();
    let streams = output_streams(&mut child);
    for stream in streams {
        let (log, reported, dir) = (log.clone(), reported.clone(), dir.clone());
        copiers.push(std::thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut line = Vec::new();
            // Init starts its exit line on a line of its own: an empty line
            // just before it is init's, not the app's.
            let mut held_empty = false;
            while reader
                .read_until(b'\n', &mut line)
                .map(|n| n > 0)
                .unwrap_or(false)
            {
                // The console speaks CRLF.
                let text = String::from_utf8_lossy(&line).replace('\r', "");
                line.clear();
                if let Some(exit) = hangar_init::parse_exit(&text) {
                    *reported.lock().unwrap_or_else(|e| e.into_inner()) = Some(exit);
                    held_empty = false;
                    continue;
                }
                if let Some(rest) = text.trim().strip_prefix(hangar_init::EXEC_RESULT_MARKER) {
                    crate::vm::file_exec_result(&dir, rest);
                    held_empty = false;
                    continue;
                }
                // The kernel's last word after init powers off.
                if text.contains("] reboot: Power down") {
                    continue;
                }
                let Ok(mut l) = log.lock() else { continue };
                if held_empty {
                    l.write(b"\n");
                    held_empty = false;
                }
                if text == "\n" {
                    held_empty = true;
                } else {
                    l.write(text.as_bytes());
                }
            }
        }));
    }
    let status = child.wait();
    for c in copiers {
        let _ = c.join();
    }
    let reported = *reported.lock().unwrap_or_else(|e| e.into_inner());
    let (code, oom) = match (reported, status) {
        (Some(r), _) => r,
        // Killed from outside (SIGKILL): as a killed process.
        (None, Ok(s))
            if std::os::unix::process::ExitStatusExt::signal(&s) == Some(libc::SIGKILL) =>
        {
            (137, false)
        }
        (None, s) => {
            say(format!(
                "hangar: the VM ended without an exit report ({s:?})\n"
            ));
            (125, false)
        }
    };
    let _ = fs::remove_file(dir.qemu_pid());
    crate::vm::detach_tap(id);
    write_exit(dir, code, oom);
    code
}

/// A signal by name (`SIGTERM`, `TERM`) or number.
pub(crate) fn signal_number(signal: &str) -> Option<i32> {
    if let Ok(n) = signal.parse::<i32>() {
        return Some(n);
    }
    let name = signal.trim().to_ascii_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name);
    Some(match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "TERM" => libc::SIGTERM,
        "ALRM" => libc::SIGALRM,
        "CONT" => libc::SIGCONT,
        "STOP" => libc::SIGSTOP,
        "WINCH" => libc::SIGWINCH,
        _ => return None,
    })
}

/// A child's stdout and stderr, to copy into the log.
fn output_streams(child: &mut Child) -> Vec<Box<dyn Read + Send>> {
    let out = child
        .stdout
        .take()
        .map(|s| Box::new(s) as Box<dyn Read + Send>);
    let err = child
        .stderr
        .take()
        .map(|s| Box::new(s) as Box<dyn Read + Send>);
    out.into_iter().chain(err).collect()
}

fn write_exit(dir: &MachineDir, code: i32, oom: bool) {
    let exit = Exit {
        code,
        oom,
        at: now_secs(),
    };
    let tmp = dir.tmp(&dir.exit());
    if fs::write(&tmp, serde_json::to_vec(&exit).unwrap_or_default()).is_ok() {
        let _ = fs::rename(&tmp, dir.exit());
    }
}

/// Flag an OOM kill in the machine's memory cgroup, without starting any
/// process (machines start faster with nothing else competing for the CPU).
/// cgroup v1 (and hybrid hosts): an eventfd registered on
/// `memory.oom_control`, which the kernel signals on OOM (and on removal). cgroup v2: `memory.events`,
/// read every 10 ms.
fn watch_oom(id: &str, oom: &AtomicBool, done: &AtomicBool) {
    let v1 = Path::new("/sys/fs/cgroup/memory").join("hangar").join(id);
    let v2 = Path::new("/sys/fs/cgroup/hangar").join(id);
    let v1_host = Path::new("/sys/fs/cgroup/memory/memory.oom_control").exists();
    let oom_kills = |file: &Path| -> u64 {
        fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    };
    // The cgroup appears once runc has created the container.
    let control = if v1_host {
        v1.join("memory.oom_control")
    } else {
        v2.join("memory.events")
    };
    while !control.exists() {
        if done.load(Ordering::SeqCst) {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    if v1_host {
        use std::os::fd::AsRawFd;
        let Ok(efd) = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC) else {
            return;
        };
        let Ok(ofd) = File::open(&control) else {
            return;
        };
        let registration = format!("{} {}", efd.as_raw_fd(), ofd.as_raw_fd());
        if fs::write(v1.join("cgroup.event_control"), registration).is_err() {
            return;
        }
        // An OOM kill before the registration took effect counts too.
        if oom_kills(&control) > 0 {
            oom.store(true, Ordering::SeqCst);
            return;
        }
        // The kernel signals the eventfd when the cgroup hits OOM (before
        // the kill is counted) and again when the cgroup is removed. A wake
        // with the cgroup still there, or with two signals, is an OOM.
        let mut buf = [0u8; 8];
        if rustix::io::read(&efd, &mut buf).is_ok() {
            let signals = u64::from_ne_bytes(buf);
            if control.exists() || signals >= 2 || oom_kills(&control) > 0 {
                oom.store(true, Ordering::SeqCst);
            }
        }
    } else {
        while !done.load(Ordering::SeqCst) {
            if oom_kills(&control) > 0 {
                oom.store(true, Ordering::SeqCst);
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shim_that_cannot_record_its_pid_refuses_to_run_and_says_why() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = MachineDir::new(tmp.path());
        // Nothing can be renamed onto a directory that is not empty.
        fs::create_dir_all(dir.shim_pid().join("x")).unwrap();
        let code = run_shim(&dir, "m1", Path::new("/nonexistent-runc-root"));
        assert_eq!(code, 125);
        let exit: Exit = serde_json::from_slice(&fs::read(dir.exit()).unwrap()).unwrap();
        assert_eq!((exit.code, exit.oom), (125, false));
        let log = fs::read_to_string(dir.log()).unwrap();
        assert!(log.contains("cannot record the shim's pid"), "{log}");
    }
}
