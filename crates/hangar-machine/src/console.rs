//! An interactive terminal in a running container: `runc exec -t` with a
//! pseudo-terminal made here as its stdio. runc gives the command a
//! terminal of its own inside the container (its controlling terminal, so
//! Ctrl-C reaches it as SIGINT) and copies between it and ours; a resize
//! is our terminal's size changed and SIGWINCH sent to runc, which passes
//! it in. The exit code is runc's, which is the command's.

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
    let mut cmd = crate::runtime::runc(runc_root);
    cmd.args(["exec", "-t", "--env", "TERM=xterm-256color"]);
    crate::container::exec_args(&mut cmd, id, argv, env, user);
    let child = spawn_on(&mut cmd, &slave).map_err(|e| Error::Command {
        command: "runc exec -t".into(),
        detail: e.to_string(),
    })?;
    Ok(Console { master, child })
}

fn spawn_on(cmd: &mut Command, tty: &File) -> std::io::Result<Child> {
    cmd.stdin(Stdio::from(tty.try_clone()?))
        .stdout(Stdio::from(tty.try_clone()?))
        .stderr(Stdio::from(tty.try_clone()?))
        .spawn()
}
