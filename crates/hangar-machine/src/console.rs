//! An interactive terminal in a running machine, on a pseudo-terminal made
//! here. In a container: `runc exec -t` on it; runc gives the command a
//! terminal of its own inside the container (its controlling terminal, so
//! Ctrl-C reaches it as SIGINT) and copies between it and ours; a resize
//! is our terminal's size changed and SIGWINCH sent to runc, which passes
//! it in. The exit code is runc's, which is the command's.
//!
//! In a micro-VM: `hangar machine vm-console` on it ([`relay_vm`]), which
//! opens a session on the VM's second serial port, where the guest's init
//! runs the command on a terminal of its own
//! (`hangar_init::vmconsole`), and relays bytes, resizes (SIGWINCH), the
//! hangup (SIGHUP) and the exit code.

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
use rustix::termios::{tcsetwinsize, Winsize};

use crate::{Error, Result};

/// A command running on a terminal: write its input to `master`, read its
/// output from it.
pub struct Console {
    pub master: File,
    pub child: Child,
}

impl Console {
    /// Give the terminal `rows` x `cols`, and tell the command.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        tcsetwinsize(&self.master, size(rows, cols))
            .map_err(|e| Error::Host(format!("cannot resize the console: {e}")))?;
        self.signal(rustix::process::Signal::WINCH);
        Ok(())
    }

    /// The client went: runc passes the hangup on to the command.
    pub fn hang_up(&self) {
        self.signal(rustix::process::Signal::HUP);
    }

    fn signal(&self, signal: rustix::process::Signal) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, signal);
        }
    }

    /// Wait for the command; its exit code (128 + the signal that ended
    /// it, as a shell says).
    pub fn wait(mut self) -> i32 {
        use std::os::unix::process::ExitStatusExt as _;
        match self.child.wait() {
            Ok(s) => s.code().unwrap_or(128 + s.signal().unwrap_or(0)),
            Err(_) => -1,
        }
    }
}

fn size(rows: u16, cols: u16) -> Winsize {
    Winsize {
        ws_row: rows.max(1),
        ws_col: cols.max(1),
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// A new terminal of `rows` x `cols`: its master and the other end.
fn terminal(rows: u16, cols: u16) -> Result<(File, File)> {
    let host = |what: &str, e: std::io::Error| {
        Error::Host(format!("cannot make a terminal ({what}): {e}"))
    };
    let master =
        openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).map_err(|e| host("openpt", e.into()))?;
    grantpt(&master).map_err(|e| host("grantpt", e.into()))?;
    unlockpt(&master).map_err(|e| host("unlockpt", e.into()))?;
    let name = ptsname(&master, Vec::new()).map_err(|e| host("ptsname", e.into()))?;
    let name = std::path::PathBuf::from(
        <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(name.to_bytes()),
    );
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&name)
        .map_err(|e| host("open the terminal's other end", e))?;
    let master = File::from(master);
    tcsetwinsize(&master, size(rows, cols)).map_err(|e| host("set its size", e.into()))?;
    Ok((master, slave))
}

/// `argv` in container `id` on a new terminal of `rows` x `cols`, as
/// `user` (root when none), with `env` (`KEY=value`) and `TERM`.
pub(crate) fn open(
    runc_root: &Path,
    id: &str,
    argv: &[String],
    env: &[String],
    user: Option<&hangar_init::RunAs>,
    rows: u16,
    cols: u16,
) -> Result<Console> {
    let (master, slave) = terminal(rows, cols)?;
    let mut cmd = crate::runtime::runc(runc_root);
    cmd.args(["exec", "-t", "--env", "TERM=xterm-256color"]);
    crate::container::exec_args(&mut cmd, id, argv, env, user);
    let child = spawn_on(&mut cmd, &slave).map_err(|e| Error::Command {
        command: "runc exec -t".into(),
        detail: e.to_string(),
    })?;
    Ok(Console { master, child })
}

/// The session `open` in the micro-VM whose console socket is `socket`,
/// relayed by `hangar_exe machine vm-console` on a new terminal.
pub(crate) fn open_vm(
    hangar_exe: &Path,
    socket: &Path,
    open: &hangar_init::vmconsole::Open,
) -> Result<Console> {
    let (master, slave) = terminal(open.rows, open.cols)?;
    let json = serde_json::to_string(open).map_err(|e| Error::Host(e.to_string()))?;
    let mut cmd = Command::new(hangar_exe);
    cmd.args(["machine", "vm-console"]).arg(socket).arg(json);
    let child = spawn_on(&mut cmd, &slave).map_err(|e| Error::Command {
        command: "hangar machine vm-console".into(),
        detail: e.to_string(),
    })?;
    Ok(Console { master, child })
}

/// `hangar machine vm-console SOCKET OPEN`: open the session `open` (an
/// `hangar_init::vmconsole::Open` as JSON) on the VM's console socket and
/// relay it with this process's terminal (its stdin), raw; SIGWINCH sends
/// the terminal's new size, SIGHUP the hangup. Returns the command's exit
/// code.
pub fn relay_vm(socket: &Path, open: &str) -> i32 {
    use hangar_init::vmconsole::{frame, Kind, Reader};
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    // The signals are taken by a thread of their own (blocked here, before
    // any thread starts, so every thread inherits the mask).
    // SAFETY: plain libc calls on a local signal set.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGWINCH);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let stdin = std::io::stdin();
    if let Ok(mut t) = rustix::termios::tcgetattr(&stdin) {
        t.make_raw();
        let _ = rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &t);
    }
    let fail = |why: String| {
        let _ = std::io::stdout().write_all(format!("hangar: {why}\r\n").as_bytes());
        125
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let sock = loop {
        match UnixStream::connect(socket) {
            Ok(s) => break s,
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(100))
            }
            Err(e) => {
                return fail(format!(
                "the micro-VM's console socket {} does not answer ({e}); is the machine running?",
                socket.display()
            ))
            }
        }
    };
    let Ok(request) = serde_json::from_str::<hangar_init::vmconsole::Open>(open) else {
        return fail("the console session's request is not JSON of a session".into());
    };
    let Ok(json) = serde_json::to_vec(&request) else {
        return fail("cannot write the session's request".into());
    };
    let out = std::sync::Arc::new(std::sync::Mutex::new(match sock.try_clone() {
        Ok(s) => s,
        Err(e) => return fail(e.to_string()),
    }));
    let send = {
        let out = out.clone();
        move |kind: Kind, payload: &[u8]| -> bool {
            out.lock()
                .unwrap_or_else(|e| e.into_inner())
                .write_all(&frame(kind, payload))
                .is_ok()
        }
    };
    if !send(Kind::Open, &json) {
        return fail("the micro-VM's console socket closed".into());
    }
    {
        let send = send.clone();
        std::thread::spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: waits on the set blocked above.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                return;
            }
            if sig == libc::SIGHUP {
                send(Kind::HangUp, b"");
                std::process::exit(129);
            }
            if let Ok(w) = rustix::termios::tcgetwinsize(std::io::stdin()) {
                let mut p = w.ws_row.to_be_bytes().to_vec();
                p.extend(w.ws_col.to_be_bytes());
                send(Kind::Resize, &p);
            }
        });
    }
    {
        let send = send.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let mut input = std::io::stdin();
            loop {
                match input.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        // The terminal closed: the client went.
                        send(Kind::HangUp, b"");
                        std::process::exit(129);
                    }
                    Ok(n) => {
                        if !send(Kind::Data, &buf[..n]) {
                            return;
                        }
                    }
                }
            }
        });
    }
    let mut reader = Reader::default();
    let mut buf = [0u8; 4096];
    let mut sock = sock;
    let mut stdout = std::io::stdout();
    loop {
        let n = match sock.read(&mut buf) {
            Ok(0) | Err(_) => {
                return fail("the micro-VM's console closed (the machine stopped?)".into())
            }
            Ok(n) => n,
        };
        for (kind, payload) in reader.push(&buf[..n]) {
            match kind {
                Kind::Data => {
                    let _ = stdout.write_all(&payload);
                    let _ = stdout.flush();
                }
                Kind::Exit if payload.len() == 4 => {
                    return i32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                }
                _ => {}
            }
        }
    }
}

fn spawn_on(cmd: &mut Command, tty: &File) -> std::io::Result<Child> {
    cmd.stdin(Stdio::from(tty.try_clone()?))
        .stdout(Stdio::from(tty.try_clone()?))
        .stderr(Stdio::from(tty.try_clone()?))
        .spawn()
}
