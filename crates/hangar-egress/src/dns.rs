//! Name resolution for the proxy: what a request's host denotes (`Host`):
//! an address literal in any form a client or resolver would read as one,
//! judged as that address, or a normalized name, or a 400; the classic
//! numeric IPv4 forms that C resolvers accept (`127.1`, `0x7f000001`,
//! `017700000001`, `2130706433`); and a small DNS client
//! (A and AAAA over UDP) for `--resolver-address`. Without one, the system
//! resolver is used.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

/// What a request's host denotes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    /// An address literal: the proxy dials exactly it (once checked).
    Ip(IpAddr),
    /// A DNS name: lower case, no trailing dot, each label checked.
    Name(String),
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Host::Ip(ip) => write!(f, "{ip}"),
            Host::Name(n) => f.write_str(n),
        }
    }
}

/// Read a URL's or CONNECT authority's host the way resolvers and URL
/// parsers would, so that whatever it denotes is what gets judged:
/// percent-escapes decoded; `[v6]` literals with any zone id (`%25eth0`)
/// dropped; one trailing dot (the DNS root) removed, so `127.0.0.1.` is an
/// address and `localhost.` the name `localhost`; the numeric IPv4 forms.
/// A host whose last label is a number but which is no IPv4 address (as
/// `6425673729`, past 2^32), or that is no valid DNS name, is an error:
/// no URL parser would accept it, and nothing is resolved for it.
pub fn parse_host(raw: &str) -> Result<Host, String> {
    if let Some(inner) = raw.strip_prefix('[') {
        let inner = inner.strip_suffix(']').ok_or_else(|| {
            format!("host {raw:?} opens an IPv6 literal with '[' but does not close it")
        })?;
        // A zone id follows `%25` (RFC 6874), or a bare `%` as some clients send it.
        let (addr, zone) = match inner.split_once('%') {
            Some((a, z)) => (a, Some(z.strip_prefix("25").unwrap_or(z))),
            None => (inner, None),
        };
        if zone.is_some_and(|z| {
            z.is_empty()
                || !z
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        }) {
            return Err(format!("host {raw:?} has an invalid IPv6 zone id"));
        }
        return addr
            .parse::<std::net::Ipv6Addr>()
            .map(|ip| Host::Ip(IpAddr::V6(ip)))
            .map_err(|_| format!("host {raw:?} is not a valid IPv6 literal"));
    }
    let decoded =
        percent_decode(raw).ok_or_else(|| format!("host {raw:?} has a bad percent-escape"))?;
    let host = decoded.to_ascii_lowercase();
    if host.contains(':') || host.contains('[') {
        return Err(format!(
            "host {raw:?}: an IPv6 address must be in brackets ([::1])"
        ));
    }
    let name = host.strip_suffix('.').unwrap_or(&host);
    if name.is_empty() {
        return Err("the request names no host".into());
    }
    if let Some(v4) = numeric_ipv4(name) {
        return Ok(Host::Ip(IpAddr::V4(v4)));
    }
    let labels: Vec<&str> = name.split('.').collect();
    let numeric = |l: &str| {
        let hex = l
            .strip_prefix("0x")
            .map(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
        hex.unwrap_or_else(|| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()))
    };
    if labels.last().is_some_and(|l| numeric(l)) {
        return Err(format!(
            "host {raw:?} ends in a number but is no IPv4 address (at most 4 parts, each part at most 255, the last at most what is left of 32 bits)"
        ));
    }
    if name.len() > 253
        || labels.iter().any(|l| {
            l.is_empty()
                || l.len() > 63
                || l.starts_with('-')
                || l.ends_with('-')
                || !l
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
    {
        return Err(format!(
            "host {raw:?} is not a valid DNS name (labels of 1-63 letters, digits, '-' or '_'; international names in their xn-- form)"
        ));
    }
    Ok(Host::Name(name.to_string()))
}

/// `%XX` escapes decoded; `None` for a bad escape or bytes that are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    if !s.contains('%') {
        return Some(s.to_string());
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `inet_aton`'s forms: 1 to 4 parts, each decimal, octal (leading 0) or hex (0x).
pub fn numeric_ipv4(host: &str) -> Option<Ipv4Addr> {
    let parts: Vec<&str> = host.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let mut nums = Vec::new();
    for p in &parts {
        let n = if let Some(hex) = p.strip_prefix("0x").or_else(|| p.strip_prefix("0X")) {
            u64::from_str_radix(hex, 16).ok()?
        } else if p.len() > 1 && p.starts_with('0') {
            u64::from_str_radix(&p[1..], 8).ok()?
        } else if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) {
            p.parse().ok()?
        } else {
            return None;
        };
        nums.push(n);
    }
    let last = *nums.last()?;
    let head = &nums[..nums.len() - 1];
    if head.iter().any(|n| *n > 255) || last >= 1u64 << (8 * (4 - head.len())) {
        return None;
    }
    let mut v: u32 = 0;
    for (i, n) in head.iter().enumerate() {
        v |= (*n as u32) << (24 - 8 * i);
    }
    Some(Ipv4Addr::from(v | last as u32))
}

fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = Vec::with_capacity(32 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len().min(63) as u8);
        q.extend_from_slice(&label.as_bytes()[..label.len().min(63)]);
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&[0, 1]);
    q
}

fn skip_name(msg: &[u8], mut i: usize) -> Option<usize> {
    loop {
        let len = *msg.get(i)? as usize;
        if len == 0 {
            return Some(i + 1);
        }
        if len & 0xc0 == 0xc0 {
            return Some(i + 2);
        }
        i += len + 1;
    }
}

/// Addresses in a DNS answer for query `id`.
fn parse(msg: &[u8], id: u16) -> Option<Vec<IpAddr>> {
    if msg.len() < 12 || u16::from_be_bytes([msg[0], msg[1]]) != id {
        return None;
    }
    let qd = u16::from_be_bytes([msg[4], msg[5]]) as usize;
    let an = u16::from_be_bytes([msg[6], msg[7]]) as usize;
    let mut i = 12;
    for _ in 0..qd {
        i = skip_name(msg, i)? + 4;
    }
    let mut out = Vec::new();
    for _ in 0..an {
        i = skip_name(msg, i)?;
        let rtype = u16::from_be_bytes([*msg.get(i)?, *msg.get(i + 1)?]);
        let rdlen = u16::from_be_bytes([*msg.get(i + 8)?, *msg.get(i + 9)?]) as usize;
        let data = msg.get(i + 10..i + 10 + rdlen)?;
        match (rtype, rdlen) {
            (1, 4) => out.push(IpAddr::from([data[0], data[1], data[2], data[3]])),
            (28, 16) => {
                let mut b = [0u8; 16];
                b.copy_from_slice(data);
                out.push(IpAddr::from(b));
            }
            _ => {}
        }
        i += 10 + rdlen;
    }
    Some(out)
}

/// Ask `server` for the A and AAAA records of `name`.
pub async fn resolve(
    server: SocketAddr,
    name: &str,
    timeout: Duration,
) -> Result<Vec<IpAddr>, String> {
    let bind: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .map_err(|_| "bind")?;
    let sock = tokio::net::UdpSocket::bind(bind)
        .await
        .map_err(|e| e.to_string())?;
    sock.connect(server).await.map_err(|e| e.to_string())?;
    let seed = std::process::id() as u16
        ^ (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0) as u16);
    let mut out = Vec::new();
    let work = async {
        for (k, qtype) in [(0u16, 1u16), (1, 28)] {
            let id = seed.wrapping_add(k);
            sock.send(&query(id, name, qtype))
                .await
                .map_err(|e| e.to_string())?;
            let mut buf = [0u8; 1500];
            loop {
                let n = sock.recv(&mut buf).await.map_err(|e| e.to_string())?;
                if let Some(addrs) = parse(&buf[..n], id) {
                    out.extend(addrs);
                    break;
                }
            }
        }
        Ok::<_, String>(())
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| "timed out".to_string())??;
    if out.is_empty() {
        return Err(format!("{name} has no A or AAAA records"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_read_as_what_they_denote() {
        let ip = |s: &str| Host::Ip(s.parse().unwrap());
        for (raw, want) in [
            ("127.0.0.1.", ip("127.0.0.1")),
            ("169.254.169.254.", ip("169.254.169.254")),
            ("LOCALHOST.", Host::Name("localhost".into())),
            ("[::1%25lo]", ip("::1")),
            ("[fe80::1%25eth0]", ip("fe80::1")),
            ("[fe80::1%eth0]", ip("fe80::1")),
            ("[::ffff:0:127.0.0.1]", ip("::ffff:0:7f00:1")),
            ("[::FFFF:127.0.0.1]", ip("::ffff:127.0.0.1")),
            ("%31%32%37.0.0.1", ip("127.0.0.1")),
            ("0x7f.1", ip("127.0.0.1")),
            ("2130706433.", ip("127.0.0.1")),
            ("example.com.", Host::Name("example.com".into())),
            ("a_b.example", Host::Name("a_b.example".into())),
        ] {
            assert_eq!(parse_host(raw), Ok(want), "{raw}");
        }
        for raw in [
            "6425673729",
            "4294967296",
            "1.2.3.4.5",
            "256.1.1.1",
            "127.0.0.1..",
            "..",
            ".",
            "",
            "a..b",
            "[::1",
            "[::1%]",
            "[zz::1]",
            "[::1%25lo/x]",
            "::1",
            "exa mple.com",
            "%zz.com",
            "%ff.com",
            "-a.com",
            "0x",
            "bücher.de",
        ] {
            assert!(
                parse_host(raw).is_err(),
                "{raw} was accepted: {:?}",
                parse_host(raw)
            );
        }
    }

    #[test]
    fn classic_numeric_forms() {
        for (s, ip) in [
            ("127.1", "127.0.0.1"),
            ("0x7f000001", "127.0.0.1"),
            ("017700000001", "127.0.0.1"),
            ("2130706433", "127.0.0.1"),
            ("0177.0.0.1", "127.0.0.1"),
            ("10.0.258", "10.0.1.2"),
            ("169.254.43518", "169.254.169.254"),
            ("0xa9.0xfe.0xa9.0xfe", "169.254.169.254"),
        ] {
            assert_eq!(numeric_ipv4(s), Some(ip.parse().unwrap()), "{s}");
        }
        for s in [
            "example.com",
            "1.2.3.4.5",
            "256.1.1.1",
            "08.1.1.1",
            "",
            "1..2",
            "4294967296",
        ] {
            assert_eq!(numeric_ipv4(s), None, "{s}");
        }
    }

    #[test]
    fn parses_answers_with_compression() {
        let mut msg = query(7, "a.test", 1);
        msg[2] = 0x81;
        msg[7] = 1; // one answer
        msg.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 0, 0, 4, 10, 0, 0, 1]);
        assert_eq!(parse(&msg, 7), Some(vec!["10.0.0.1".parse().unwrap()]));
        assert_eq!(parse(&msg, 8), None);
    }
}
