//! Init's first steps inside a micro-VM, from the initramfs: load the
//! modules the host packed, mount the root disk, configure eth0, and switch
//! to the root disk. Afterwards init goes on as in a container.

use std::ffi::CString;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use hangar_init::VmSetup;

fn cstr(s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{s:?} has a NUL byte"))
}

fn mount(source: &str, target: &str, fstype: &str, flags: libc::c_ulong) -> Result<(), String> {
    let _ = std::fs::create_dir_all(target);
    let (s, t, f) = (cstr(source)?, cstr(target)?, cstr(fstype)?);
    // SAFETY: valid NUL-terminated strings that outlive the call; no data.
    let rc = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, std::ptr::null()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!(
            "mount {source} on {target}: {}",
            std::io::Error::last_os_error()
        ))
    }
}

fn load_module(path: &str) -> Result<(), String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{path}: {e}"))?;
    let params = cstr("")?;
    // SAFETY: finit_module(2) with an open descriptor and an empty
    // parameter string.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
    let err = std::io::Error::last_os_error();
    if rc == 0 || err.raw_os_error() == Some(libc::EEXIST) {
        Ok(())
    } else {
        Err(format!("loading {path}: {err}"))
    }
}

fn wait_for(path: &str, within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    while !std::path::Path::new(path).exists() {
        if Instant::now() > deadline {
            return Err(format!("{path} did not appear within {within:?}"));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// Everything before the usual init: returns once `/` is the root disk.
pub fn boot(setup: &VmSetup) -> Result<(), String> {
    mount("proc", "/proc", "proc", 0)?;
    mount("sysfs", "/sys", "sysfs", 0)?;
    mount("devtmpfs", "/dev", "devtmpfs", 0)?;
    // A module whose symbols come from one not loaded yet fails with
    // ENOENT; passes until nothing more loads settle the order.
    let mut pending: Vec<&String> = setup.modules.iter().collect();
    while !pending.is_empty() {
        let before = pending.len();
        let mut last = String::new();
        pending.retain(|m| match load_module(m) {
            Ok(()) => false,
            Err(e) => {
                last = e;
                true
            }
        });
        if pending.len() == before {
            return Err(last);
        }
    }
    wait_for(&setup.root, Duration::from_secs(60))?;
    network(setup)?;
    mount(&setup.root, "/newroot", "ext4", 0)?;
    // The image's filesystem is as small as the image; the machine's disk
    // is its root filesystem's size. A failure leaves the image's size.
    if let Err(e) = grow(&setup.root, "/newroot") {
        eprintln!("hangar-init: the root filesystem keeps the image's size: {e}");
    }
    // /dev goes along; /proc and /sys are mounted again in the new root.
    let _ = std::fs::create_dir_all("/newroot/dev");
    mount("/dev", "/newroot/dev", "", libc::MS_MOVE)?;
    for m in ["/proc", "/sys"] {
        let t = cstr(m)?;
        // SAFETY: a valid path; a lazy unmount of our own mount.
        unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
    }
    std::env::set_current_dir("/newroot").map_err(|e| format!("chdir /newroot: {e}"))?;
    mount(".", "/", "", libc::MS_MOVE)?;
    let dot = cstr(".")?;
    // SAFETY: chroot(2) into the current directory, a valid path.
    if unsafe { libc::chroot(dot.as_ptr()) } != 0 {
        return Err(format!("chroot: {}", std::io::Error::last_os_error()));
    }
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))
}

/// Grow the ext4 filesystem mounted at `mountpoint` to fill `device`
/// (online, as resize2fs does: the kernel's EXT4_IOC_RESIZE_FS).
fn grow(device: &str, mountpoint: &str) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    const EXT4_IOC_RESIZE_FS: libc::c_ulong = 0x4008_6610;
    let dev = std::fs::File::open(device).map_err(|e| format!("{device}: {e}"))?;
    let mut bytes: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
    if unsafe { libc::ioctl(dev.as_raw_fd(), BLKGETSIZE64, &mut bytes) } != 0 {
        return Err(format!(
            "size of {device}: {}",
            std::io::Error::last_os_error()
        ));
    }
    let root = std::fs::File::open(mountpoint).map_err(|e| format!("{mountpoint}: {e}"))?;
    // SAFETY: an all-zero statvfs is valid; fstatvfs fills it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and a pointer to a statvfs.
    if unsafe { libc::fstatvfs(root.as_raw_fd(), &mut st) } != 0 || st.f_bsize == 0 {
        return Err(format!(
            "statvfs {mountpoint}: {}",
            std::io::Error::last_os_error()
        ));
    }
    let blocks: u64 = bytes / st.f_bsize;
    // SAFETY: EXT4_IOC_RESIZE_FS reads one u64 (the new block count).
    if unsafe { libc::ioctl(root.as_raw_fd(), EXT4_IOC_RESIZE_FS, &blocks) } != 0 {
        return Err(format!(
            "resize to {blocks} blocks: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

struct Socket(libc::c_int);

impl Socket {
    fn new(family: libc::c_int) -> Result<Socket, String> {
        // SAFETY: socket(2) with constant arguments.
        let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(format!("socket: {}", std::io::Error::last_os_error()));
        }
        Ok(Socket(fd))
    }

    fn ioctl<T>(&self, request: libc::c_ulong, arg: &mut T, what: &str) -> Result<(), String> {
        // SAFETY: `arg` is the structure `request` expects, valid for the call.
        let rc = unsafe { libc::ioctl(self.0, request as _, arg as *mut T) };
        if rc == 0 {
            Ok(())
        } else {
            Err(format!("{what}: {}", std::io::Error::last_os_error()))
        }
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: our own descriptor, closed once.
        unsafe { libc::close(self.0) };
    }
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data; zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *d = s as libc::c_char;
    }
    req
}

fn sockaddr_v4(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; sockaddr is the
    // generic view the ioctls take.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn split(cidr: &str) -> Result<(&str, u32), String> {
    let (a, p) = cidr
        .split_once('/')
        .ok_or_else(|| format!("{cidr:?} is not address/prefix"))?;
    Ok((a, p.parse().map_err(|_| format!("{cidr:?}: bad prefix"))?))
}

fn set_up(sock: &Socket, name: &str) -> Result<(), String> {
    let mut req = ifreq(name);
    sock.ioctl(libc::SIOCGIFFLAGS, &mut req, "get flags")?;
    // SAFETY: the flags member was just filled in by the kernel.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    sock.ioctl(libc::SIOCSIFFLAGS, &mut req, &format!("{name} up"))
}

/// The IPv6 default route (`in6_rtmsg`, whose fields libc keeps private).
#[repr(C)]
struct In6Rtmsg {
    dst: libc::in6_addr,
    src: libc::in6_addr,
    gateway: libc::in6_addr,
    kind: u32,
    dst_len: u16,
    src_len: u16,
    metric: u32,
    info: libc::c_ulong,
    flags: u32,
    ifindex: libc::c_int,
}

/// eth0's addresses, MTU and default routes; lo up.
fn network(setup: &VmSetup) -> Result<(), String> {
    wait_for("/sys/class/net/eth0", Duration::from_secs(60))?;
    let v4 = Socket::new(libc::AF_INET)?;
    set_up(&v4, "lo")?;
    let (addr, prefix) = split(&setup.ipv4)?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| format!("{addr:?} is not IPv4"))?;
    let mut req = ifreq("eth0");
    req.ifr_ifru.ifru_addr = sockaddr_v4(addr);
    v4.ioctl(libc::SIOCSIFADDR, &mut req, "eth0 address")?;
    let mask = Ipv4Addr::from(u32::MAX.checked_shl(32 - prefix.min(32)).unwrap_or(0));
    req.ifr_ifru.ifru_netmask = sockaddr_v4(mask);
    v4.ioctl(libc::SIOCSIFNETMASK, &mut req, "eth0 netmask")?;
    if setup.mtu > 0 {
        req.ifr_ifru.ifru_mtu = setup.mtu as libc::c_int;
        v4.ioctl(libc::SIOCSIFMTU, &mut req, "eth0 mtu")?;
    }
    set_up(&v4, "eth0")?;
    if let Ok(gw) = setup.gateway4.parse::<Ipv4Addr>() {
        // SAFETY: rtentry is plain data; zero is a valid value.
        let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
        rt.rt_dst = sockaddr_v4(Ipv4Addr::UNSPECIFIED);
        rt.rt_genmask = sockaddr_v4(Ipv4Addr::UNSPECIFIED);
        rt.rt_gateway = sockaddr_v4(gw);
        rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
        v4.ioctl(libc::SIOCADDRT, &mut rt, "IPv4 default route")?;
    }
    if !setup.ipv6.is_empty() {
        let v6 = Socket::new(libc::AF_INET6)?;
        let mut idx = ifreq("eth0");
        v4.ioctl(libc::SIOCGIFINDEX, &mut idx, "eth0 index")?;
        // SAFETY: the index member was just filled in by the kernel.
        let ifindex = unsafe { idx.ifr_ifru.ifru_ifindex };
        let (addr, prefix) = split(&setup.ipv6)?;
        let addr: Ipv6Addr = addr.parse().map_err(|_| format!("{addr:?} is not IPv6"))?;
        let mut req = libc::in6_ifreq {
            ifr6_addr: libc::in6_addr {
                s6_addr: addr.octets(),
            },
            ifr6_prefixlen: prefix,
            ifr6_ifindex: ifindex,
        };
        v6.ioctl(libc::SIOCSIFADDR, &mut req, "eth0 IPv6 address")?;
        if let Ok(gw) = setup.gateway6.parse::<Ipv6Addr>() {
            let mut rt = In6Rtmsg {
                dst: libc::in6_addr { s6_addr: [0; 16] },
                src: libc::in6_addr { s6_addr: [0; 16] },
                gateway: libc::in6_addr {
                    s6_addr: gw.octets(),
                },
                kind: 0,
                dst_len: 0,
                src_len: 0,
                metric: 1,
                info: 0,
                flags: (libc::RTF_UP | libc::RTF_GATEWAY) as u32,
                ifindex,
            };
            v6.ioctl(libc::SIOCADDRT, &mut rt, "IPv6 default route")?;
        }
    }
    Ok(())
}

/// Write the exit line on the console, flush the disks, power off.
pub fn power_off(code: u8, oom: bool) -> ! {
    use std::io::Write;
    let line = format!("\n{}{code}:{}\n", hangar_init::EXIT_MARKER, u8::from(oom));
    let _ = std::io::stdout().write_all(line.as_bytes());
    let _ = std::io::stdout().flush();
    // SAFETY: sync(2) and reboot(2) take no pointers.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    std::process::exit(code as i32)
}

/// OOM kills so far (the kernel's counter), to tell whether the app's
/// SIGKILL was the OOM killer's.
pub fn oom_kills() -> u64 {
    std::fs::read_to_string("/proc/vmstat")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// `cmd`'s output, with `input` as its standard input (written beside the
/// readers, so neither side waits on the other).
fn run_with_input(
    cmd: &mut std::process::Command,
    input: &[u8],
) -> std::io::Result<std::process::Output> {
    use std::process::Stdio;
    if input.is_empty() {
        return cmd.stdin(Stdio::null()).output();
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut w) = child.stdin.take() {
        let bytes = input.to_vec();
        std::thread::spawn(move || {
            let _ = std::io::Write::write_all(&mut w, &bytes);
        });
    }
    child.wait_with_output()
}

/// Run a command the host asked for (`<n>:<hex json>`) in the background
/// and print its result on the console for the host's shim.
fn exec(request: &str) {
    let Some((n, hex)) = request.split_once(':') else {
        return;
    };
    let n = n.to_string();
    let req: Option<hangar_init::ExecRequest> =
        hangar_init::hex_decode(hex).and_then(|b| serde_json::from_slice(&b).ok());
    std::thread::spawn(move || {
        let result = match req {
            Some(req) if !req.argv.is_empty() => {
                let mut cmd = std::process::Command::new(&req.argv[0]);
                cmd.args(&req.argv[1..]).env_clear();
                for kv in &req.env {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    cmd.env(k, v);
                }
                match run_with_input(&mut cmd, req.stdin.as_bytes()) {
                    Ok(out) => hangar_init::ExecResult {
                        code: out.status.code().unwrap_or_else(|| {
                            128 + std::os::unix::process::ExitStatusExt::signal(&out.status)
                                .unwrap_or(0)
                        }),
                        stdout: out.stdout.into_iter().take(64 << 10).collect(),
                        stderr: out.stderr.into_iter().take(64 << 10).collect(),
                    },
                    Err(e) => hangar_init::ExecResult {
                        code: 127,
                        stdout: Vec::new(),
                        stderr: format!("hangar-init: cannot run {}: {e}\n", req.argv[0])
                            .into_bytes(),
                    },
                }
            }
            _ => hangar_init::ExecResult {
                code: 126,
                stdout: Vec::new(),
                stderr: b"hangar-init: unreadable exec request\n".to_vec(),
            },
        };
        let json = serde_json::to_vec(&result).unwrap_or_default();
        println!(
            "\n{}{n}:{}",
            hangar_init::EXEC_RESULT_MARKER,
            hangar_init::hex_encode(&json)
        );
    });
}

/// Pass signals the host writes on the console (`hangar-signal:N`) to the
/// app, whose pid is in `app` once it runs.
pub fn listen_for_signals(app: &'static std::sync::atomic::AtomicI32) {
    std::thread::spawn(move || {
        use std::io::BufRead;
        let Ok(console) = std::fs::File::open("/dev/console") else {
            return;
        };
        // The host's lines must not be echoed into the machine's log.
        // SAFETY: termios is plain data, filled in by tcgetattr before use.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(console.as_raw_fd(), &mut t) == 0 {
                t.c_lflag &= !(libc::ECHO | libc::ECHOE | libc::ECHOK | libc::ECHONL);
                libc::tcsetattr(console.as_raw_fd(), libc::TCSANOW, &t);
            }
        }
        for line in std::io::BufReader::new(console)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(rest) = line.trim().strip_prefix(hangar_init::EXEC_MARKER) {
                exec(rest);
                continue;
            }
            let Some(n) = line.trim().strip_prefix(hangar_init::SIGNAL_MARKER) else {
                continue;
            };
            let (Ok(sig), pid) = (
                n.parse::<libc::c_int>(),
                app.load(std::sync::atomic::Ordering::SeqCst),
            ) else {
                continue;
            };
            if pid > 0 {
                // SAFETY: kill(2) of the app, our child.
                unsafe { libc::kill(pid, sig) };
            }
        }
    });
}

/// Console sessions the host opens on the second serial port (see
/// [`hangar_init::vmconsole`]): each runs its command on a new terminal
/// of its own (session leader, controlling terminal: Ctrl-C reaches it as
/// SIGINT) and relays the terminal both ways; a new session ends the one
/// before it.
pub fn serve_consoles() {
    use hangar_init::vmconsole::{Kind, Reader, GUEST_DEVICE};
    use std::io::{Read, Write};
    use std::sync::{Arc, Mutex};
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        let port = loop {
            match std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(GUEST_DEVICE)
            {
                Ok(p) => break p,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(_) => return,
            }
        };
        raw(&port);
        let Ok(writer) = port.try_clone() else {
            return;
        };
        let writer = Arc::new(Mutex::new(writer));
        let mut session: Option<Session> = None;
        let mut reader = Reader::default();
        let mut buf = [0u8; 4096];
        let mut port = port;
        loop {
            let n = match port.read(&mut buf) {
                Ok(0) | Err(_) => {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                Ok(n) => n,
            };
            for (kind, payload) in reader.push(&buf[..n]) {
                match kind {
                    Kind::Open => {
                        if let Some(old) = session.take() {
                            old.signal(libc::SIGHUP);
                        }
                        let open: Option<hangar_init::vmconsole::Open> =
                            serde_json::from_slice(&payload).ok();
                        session = open.and_then(|o| Session::start(&o, writer.clone()));
                    }
                    Kind::Data => {
                        if let Some(s) = &session {
                            let _ = (&s.master).write_all(&payload);
                        }
                    }
                    Kind::Resize if payload.len() == 4 => {
                        if let Some(s) = &session {
                            let rows = u16::from_be_bytes([payload[0], payload[1]]);
                            let cols = u16::from_be_bytes([payload[2], payload[3]]);
                            s.resize(rows, cols);
                        }
                    }
                    Kind::HangUp => {
                        if let Some(s) = session.take() {
                            s.signal(libc::SIGHUP);
                        }
                    }
                    _ => {}
                }
            }
        }
    });
}

/// The serial port passes bytes as they are: no echo, no line editing, no
/// signals, no flow control, no newline translation.
fn raw(port: &std::fs::File) {
    // SAFETY: termios is plain data, filled in by tcgetattr before use.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(port.as_raw_fd(), &mut t) == 0 {
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(port.as_raw_fd(), libc::TCSANOW, &t);
        }
    }
}

/// The session whose output goes to the host: a session ended by a new
/// one sends nothing more.
static CURRENT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// One console session: its terminal's master side and its command.
struct Session {
    master: std::fs::File,
    pid: i32,
}

impl Session {
    fn start(
        open: &hangar_init::vmconsole::Open,
        out: std::sync::Arc<std::sync::Mutex<std::fs::File>>,
    ) -> Option<Session> {
        use hangar_init::vmconsole::{frame, Kind};
        use std::io::{Read, Write};
        use std::os::fd::FromRawFd;
        use std::os::unix::process::CommandExt;
        let say = |text: String| {
            let mut o = out.lock().unwrap_or_else(|e| e.into_inner());
            let _ = o.write_all(&frame(Kind::Data, text.as_bytes()));
            let _ = o.write_all(&frame(Kind::Exit, &127i32.to_be_bytes()));
        };
        if open.argv.is_empty() {
            say("hangar-init: a console needs a command\r\n".into());
            return None;
        }
        // SAFETY: plain libc calls on descriptors this function owns.
        let (master, slave) = unsafe {
            let m = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
            if m < 0 || libc::grantpt(m) != 0 || libc::unlockpt(m) != 0 {
                say("hangar-init: cannot make a terminal\r\n".into());
                return None;
            }
            let name = libc::ptsname(m);
            if name.is_null() {
                say("hangar-init: cannot name the terminal\r\n".into());
                return None;
            }
            let s = libc::open(name, libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
            if s < 0 {
                say("hangar-init: cannot open the terminal\r\n".into());
                return None;
            }
            (std::fs::File::from_raw_fd(m), std::fs::File::from_raw_fd(s))
        };
        use std::sync::atomic::Ordering;
        let me = CURRENT.fetch_add(1, Ordering::SeqCst) + 1;
        let current = move || CURRENT.load(Ordering::SeqCst) == me;
        let session = Session { master, pid: 0 };
        session.resize(open.rows, open.cols);
        let stdio = |f: &std::fs::File| f.try_clone().map(std::process::Stdio::from);
        let (Ok(i), Ok(o), Ok(e)) = (stdio(&slave), stdio(&slave), stdio(&slave)) else {
            say("hangar-init: cannot open the terminal\r\n".into());
            return None;
        };
        let mut cmd = std::process::Command::new(&open.argv[0]);
        cmd.args(&open.argv[1..])
            .env_clear()
            .stdin(i)
            .stdout(o)
            .stderr(e)
            .uid(open.uid)
            .gid(open.gid);
        for kv in &open.env {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            cmd.env(k, v);
        }
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                say(format!("hangar-init: cannot run {}: {e}\r\n", open.argv[0]));
                return None;
            }
        };
        drop(slave);
        let pid = child.id() as i32;
        let Ok(mut from) = session.master.try_clone() else {
            return None;
        };
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Until the terminal closes (EIO once the command and all it
            // started are gone).
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let mut o = out.lock().unwrap_or_else(|e| e.into_inner());
                if !current() || o.write_all(&frame(Kind::Data, &buf[..n])).is_err() {
                    break;
                }
            }
            let code = match child.wait() {
                Ok(s) => s.code().unwrap_or_else(|| {
                    128 + std::os::unix::process::ExitStatusExt::signal(&s).unwrap_or(0)
                }),
                Err(_) => -1,
            };
            let mut o = out.lock().unwrap_or_else(|e| e.into_inner());
            if current() {
                let _ = o.write_all(&frame(Kind::Exit, &code.to_be_bytes()));
            }
        });
        Some(Session { pid, ..session })
    }

    fn resize(&self, rows: u16, cols: u16) {
        let size = libc::winsize {
            ws_row: rows.max(1),
            ws_col: cols.max(1),
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a winsize; the kernel tells the
        // terminal's foreground group (SIGWINCH).
        unsafe {
            libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &size);
        }
    }

    fn signal(&self, sig: libc::c_int) {
        if self.pid > 0 {
            // SAFETY: a signal to the session's process group.
            unsafe {
                libc::kill(-self.pid, sig);
            }
        }
    }
}
