//! The live peers: the app's started machines, as `<app>.internal` (AAAA)
//! answers them, asked every `poll` of the resolvers in
//! `/etc/resolv.conf` (Hangar's, on the org's private network). A fixed
//! list (`GAMES_PEERS`) stands in for DNS when the server runs outside
//! Hangar. Every change raises the view's epoch: owners check their games
//! again after one.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::sync::watch;

/// The peers as this machine sees them: each a peer address (`ip:port`),
/// sorted, with this machine's own always in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct View {
    pub epoch: u64,
    pub peers: Vec<String>,
}

pub enum Source {
    Fixed(Vec<String>),
    Dns { name: String, port: u16 },
}

/// Watches the peers from `source`; `me` is always one of them.
pub fn follow(source: Source, me: String, poll: Duration) -> watch::Receiver<Arc<View>> {
    let first = View {
        epoch: 1,
        peers: with(&me, Vec::new()),
    };
    let (tx, rx) = watch::channel(Arc::new(first));
    tokio::spawn(async move {
        let mut misses = 0u32;
        loop {
            let found = match &source {
                Source::Fixed(list) => Ok(list.clone()),
                Source::Dns { name, port } => lookup(name, *port).await,
            };
            match found {
                Ok(found) => {
                    misses = 0;
                    let peers = with(&me, found);
                    tx.send_if_modified(|v| {
                        if v.peers == peers {
                            return false;
                        }
                        tracing::info!(peers = ?peers, "peers changed");
                        *v = Arc::new(View {
                            epoch: v.epoch + 1,
                            peers,
                        });
                        true
                    });
                }
                Err(e) => {
                    misses += 1;
                    if misses == 3 {
                        tracing::warn!("cannot look up the peers: {e}");
                    }
                }
            }
            tokio::time::sleep(poll).await;
        }
    });
    rx
}

fn with(me: &str, mut peers: Vec<String>) -> Vec<String> {
    peers.push(me.to_string());
    peers.sort();
    peers.dedup();
    peers
}

/// The nameservers of `/etc/resolv.conf`.
fn nameservers() -> Vec<IpAddr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse().ok())
        .collect()
}

/// `name`'s AAAA addresses, each as a peer address on `port`.
async fn lookup(name: &str, port: u16) -> Result<Vec<String>, String> {
    let fqdn = Name::from_ascii(format!("{}.", name.trim_end_matches('.')))
        .map_err(|e| format!("{name} is not a DNS name: {e}"))?;
    let mut last = "no nameserver in /etc/resolv.conf".to_string();
    for server in nameservers() {
        match ask(&fqdn, server).await {
            Ok(ips) => {
                return Ok(ips
                    .into_iter()
                    .map(|ip| SocketAddr::new(ip, port).to_string())
                    .collect())
            }
            Err(e) => last = format!("{server}: {e}"),
        }
    }
    Err(last)
}

async fn ask(name: &Name, server: IpAddr) -> Result<Vec<IpAddr>, String> {
    let mut m = Message::query();
    m.metadata.id = rand_u16();
    m.metadata.recursion_desired = false;
    m.add_query(Query::query(name.clone(), RecordType::AAAA));
    let bytes = m.to_vec().map_err(|e| e.to_string())?;
    let bind: SocketAddr = match server {
        IpAddr::V4(_) => "0.0.0.0:0".parse().expect("an address"),
        IpAddr::V6(_) => "[::]:0".parse().expect("an address"),
    };
    let sock = tokio::net::UdpSocket::bind(bind)
        .await
        .map_err(|e| e.to_string())?;
    sock.connect(SocketAddr::new(server, 53))
        .await
        .map_err(|e| e.to_string())?;
    sock.send(&bytes).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(1), sock.recv(&mut buf))
        .await
        .map_err(|_| "no answer within 1 s".to_string())?
        .map_err(|e| e.to_string())?;
    let answer = Message::from_vec(&buf[..n]).map_err(|e| e.to_string())?;
    if answer.metadata.id != m.metadata.id {
        return Err("an answer to another query".into());
    }
    Ok(answer
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect())
}

fn rand_u16() -> u16 {
    let mut b = [0u8; 2];
    let _ = getrandom::getrandom(&mut b);
    u16::from_le_bytes(b)
}
