//! The sockets: each private net gets its own UDP and TCP sockets on the
//! node's gateway address of that net, bound to the net's bridge, and its
//! own threads. Which org asks is the socket's net, never anything in the
//! packet (a source address can be forged; the device a packet came in on
//! cannot), and one org's flood of queries waits on its own threads only.

use std::collections::{HashMap, HashSet};
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::zone::{Asker, Transport, Zone};

/// How often a blocked socket looks whether the server is stopping.
const POLL: Duration = Duration::from_millis(200);
/// How long a TCP client may take between its queries.
const TCP_IDLE: Duration = Duration::from_secs(5);
/// TCP connections served at once per socket; more wait in the backlog.
const TCP_CONNECTIONS: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot serve DNS on {addr}{device}: {detail}")]
    Bind {
        addr: SocketAddr,
        device: String,
        detail: String,
    },
}

/// A DNS server for every net of one node: [`Server::listen`] opens a net's
/// sockets, [`Server::set`] swaps in a new zone. Stops on drop.
pub struct Server {
    zone: Arc<RwLock<Arc<Zone>>>,
    stop: Arc<AtomicBool>,
    open: Mutex<HashSet<(u32, SocketAddr)>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    counters: Mutex<std::collections::BTreeMap<u32, Arc<Counters>>>,
}

/// The response codes counted apart (anything else is `OTHER`).
pub const RCODES: [&str; 7] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "OTHER",
];

/// One net's queries: answered, by transport (UDP, TCP) and response
/// code; and dropped (too short or malformed to answer).
#[derive(Default)]
pub struct Counters {
    answered: [[AtomicU64; RCODES.len()]; 2],
    dropped: AtomicU64,
}

impl Counters {
    fn count(&self, transport: Transport, answer: Option<&[u8]>) {
        let Some(out) = answer else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let code = out
            .get(3)
            .map(|b| usize::from(b & 0x0f))
            .unwrap_or(RCODES.len() - 1)
            .min(RCODES.len() - 1);
        let t = usize::from(transport == Transport::Tcp);
        self.answered[t][code].fetch_add(1, Ordering::Relaxed);
    }
}

/// A reading of one net's [`Counters`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counts {
    pub net: u32,
    /// (`udp` or `tcp`, response code, answers)
    pub answered: Vec<(&'static str, &'static str, u64)>,
    pub dropped: u64,
}

impl Server {
    pub fn new(zone: Zone) -> Server {
        Server {
            zone: Arc::new(RwLock::new(Arc::new(zone))),
            stop: Arc::new(AtomicBool::new(false)),
            open: Mutex::new(HashSet::new()),
            threads: Mutex::new(Vec::new()),
            counters: Mutex::default(),
        }
    }

    /// Every open net's queries so far.
    pub fn counts(&self) -> Vec<Counts> {
        self.counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(net, c)| Counts {
                net: *net,
                answered: ["udp", "tcp"]
                    .iter()
                    .zip(&c.answered)
                    .flat_map(|(t, codes)| {
                        RCODES
                            .iter()
                            .zip(codes)
                            .map(|(code, n)| (*t, *code, n.load(Ordering::Relaxed)))
                    })
                    .collect(),
                dropped: c.dropped.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Answer from `zone` from now on.
    pub fn set(&self, zone: Zone) {
        *self.zone.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(zone);
    }

    /// The zone answered from now.
    pub fn zone(&self) -> Arc<Zone> {
        self.zone.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Serve `net`'s queries on `addr` (UDP and TCP), taking only packets
    /// that came in on `device` when one is named. Returns the address
    /// bound (its port, when `addr` asked for any). Opening one twice is a
    /// no-op.
    pub fn listen(
        &self,
        net: u32,
        addr: SocketAddr,
        device: Option<&str>,
    ) -> Result<SocketAddr, Error> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if addr.port() != 0 && open.contains(&(net, addr)) {
            return Ok(addr);
        }
        let fail = |detail: String| Error::Bind {
            addr,
            device: device.map(|d| format!(" (device {d})")).unwrap_or_default(),
            detail,
        };
        let udp =
            socket(addr, Type::DGRAM, Protocol::UDP, device).map_err(|e| fail(e.to_string()))?;
        let bound = udp
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .ok_or_else(|| fail("no local address".into()))?;
        let tcp = socket(bound, Type::STREAM, Protocol::TCP, device)
            .and_then(|s| s.listen(128).map(|()| s))
            .map_err(|e| fail(e.to_string()))?;
        let udp: UdpSocket = udp.into();
        let tcp: std::net::TcpListener = tcp.into();
        let counters = self
            .counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(net)
            .or_default()
            .clone();
        let mut threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        for (kind, work) in [
            (
                "udp",
                Box::new(serve_udp(
                    udp,
                    net,
                    self.zone.clone(),
                    self.stop.clone(),
                    counters.clone(),
                )) as Box<dyn FnOnce() + Send>,
            ),
            (
                "tcp",
                Box::new(serve_tcp(
                    tcp,
                    net,
                    self.zone.clone(),
                    self.stop.clone(),
                    counters.clone(),
                )),
            ),
        ] {
            let t = std::thread::Builder::new()
                .name(format!("dns-{kind}-{net}"))
                .spawn(work)
                .map_err(|e| fail(e.to_string()))?;
            threads.push(t);
        }
        open.insert((net, bound));
        Ok(bound)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self
            .threads
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = t.join();
        }
    }
}

fn socket(
    addr: SocketAddr,
    kind: Type,
    protocol: Protocol,
    device: Option<&str>,
) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), kind, Some(protocol))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    if let Some(d) = device {
        s.bind_device(Some(d.as_bytes()))?;
    }
    s.bind(&SockAddr::from(addr))?;
    s.set_read_timeout(Some(POLL))?;
    Ok(s)
}

fn current(zone: &RwLock<Arc<Zone>>) -> Arc<Zone> {
    zone.read().unwrap_or_else(|e| e.into_inner()).clone()
}

fn idle(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
    )
}

/// The answers a UDP thread gave lately, for the zone they came from: an
/// answer depends only on the zone, the asker's address and the query's
/// bytes after its ID, so a query seen before costs a lookup and a copy,
/// not a parse and an encoding. Emptied when the zone changes or it fills.
struct Recent {
    zone: Option<Arc<Zone>>,
    answers: HashMap<Vec<u8>, Vec<u8>>,
    key: Vec<u8>,
}

/// Answers kept per UDP thread.
const RECENT: usize = 4096;

impl Recent {
    fn new() -> Recent {
        Recent {
            zone: None,
            answers: HashMap::new(),
            key: Vec::new(),
        }
    }

    fn answer(&mut self, zone: Arc<Zone>, request: &[u8], asker: Asker) -> Option<Vec<u8>> {
        if request.len() < 12 {
            return zone.answer(request, asker, Transport::Udp);
        }
        if !self.zone.as_ref().is_some_and(|z| Arc::ptr_eq(z, &zone)) {
            self.answers.clear();
            self.zone = Some(zone.clone());
        }
        self.key.clear();
        match asker.addr {
            IpAddr::V4(a) => self.key.extend_from_slice(&a.octets()),
            IpAddr::V6(a) => self.key.extend_from_slice(&a.octets()),
        }
        self.key.extend_from_slice(&request[2..]);
        if let Some(known) = self.answers.get(&self.key[..]) {
            let mut out = known.clone();
            out[..2].copy_from_slice(&request[..2]);
            return Some(out);
        }
        let out = zone.answer(request, asker, Transport::Udp)?;
        if out.len() >= 2 {
            if self.answers.len() >= RECENT {
                self.answers.clear();
            }
            self.answers.insert(self.key.clone(), out.clone());
        }
        Some(out)
    }
}

fn serve_udp(
    sock: UdpSocket,
    net: u32,
    zone: Arc<RwLock<Arc<Zone>>>,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
) -> impl FnOnce() + Send {
    move || {
        let mut buf = [0u8; 4096];
        let mut recent = Recent::new();
        while !stop.load(Ordering::Relaxed) {
            match sock.recv_from(&mut buf) {
                Ok((n, from)) => {
                    let asker = Asker {
                        net,
                        addr: from.ip(),
                    };
                    let out = recent.answer(current(&zone), &buf[..n], asker);
                    counters.count(Transport::Udp, out.as_deref());
                    if let Some(out) = out {
                        let _ = sock.send_to(&out, from);
                    }
                }
                Err(e) if idle(&e) => {}
                Err(e) => {
                    tracing::warn!("dns: net {net}: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
}

fn serve_tcp(
    listener: std::net::TcpListener,
    net: u32,
    zone: Arc<RwLock<Arc<Zone>>>,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
) -> impl FnOnce() + Send {
    move || {
        let busy = Arc::new(AtomicUsize::new(0));
        while !stop.load(Ordering::Relaxed) {
            let (conn, from) = match listener.accept() {
                Ok(c) => c,
                Err(e) if idle(&e) => continue,
                Err(e) => {
                    tracing::warn!("dns: net {net}: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            if busy.fetch_add(1, Ordering::SeqCst) >= TCP_CONNECTIONS {
                busy.fetch_sub(1, Ordering::SeqCst);
                continue;
            }
            let (zone, stop, counters) = (zone.clone(), stop.clone(), counters.clone());
            let asker = Asker {
                net,
                addr: from.ip(),
            };
            let spawned = std::thread::Builder::new()
                .name(format!("dns-conn-{net}"))
                .spawn({
                    let busy = busy.clone();
                    move || {
                        let _ = serve_conn(conn, asker, &zone, &stop, &counters);
                        busy.fetch_sub(1, Ordering::SeqCst);
                    }
                });
            if spawned.is_err() {
                busy.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

/// Queries of one TCP connection, each a 2-byte length and the message.
fn serve_conn(
    mut conn: TcpStream,
    asker: Asker,
    zone: &RwLock<Arc<Zone>>,
    stop: &AtomicBool,
    counters: &Counters,
) -> std::io::Result<()> {
    conn.set_read_timeout(Some(TCP_IDLE))?;
    conn.set_write_timeout(Some(TCP_IDLE))?;
    let mut len = [0u8; 2];
    let mut msg = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        conn.read_exact(&mut len)?;
        msg.resize(u16::from_be_bytes(len) as usize, 0);
        conn.read_exact(&mut msg)?;
        let out = current(zone).answer(&msg, asker, Transport::Tcp);
        counters.count(Transport::Tcp, out.as_deref());
        let Some(out) = out else {
            return Ok(());
        };
        let mut framed = Vec::with_capacity(out.len() + 2);
        framed.extend_from_slice(&(out.len() as u16).to_be_bytes());
        framed.extend_from_slice(&out);
        conn.write_all(&framed)?;
    }
    Ok(())
}
