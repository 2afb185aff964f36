//! The IP policy: which addresses the proxy may dial. Hand-written tables of
//! IANA's special-purpose registries (IPv4 and IPv6) plus the ranges every
//! SSRF defence needs; everything in them is denied unless an operator's
//! allow list says otherwise. Applied to each address a name resolved to,
//! before dialing that very address, so DNS rebinding has nothing to race.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// A CIDR range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(self.prefix))
                };
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(self.prefix))
                };
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Cidr, String> {
        let (a, p) = s.split_once('/').unwrap_or((s, ""));
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("{s:?} is not a CIDR range like 10.0.0.0/8"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if p.is_empty() {
            max
        } else {
            p.parse().map_err(|_| format!("{s:?}: bad prefix length"))?
        };
        if prefix > max {
            return Err(format!("{s:?}: prefix longer than {max}"));
        }
        Ok(Cidr { addr, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Special-purpose IPv4 ranges (RFC 6890 and IANA's registry), each with why.
pub const V4_DENIED: [(u32, u8, &str, bool); 20] = [
    // (network, prefix, name, counts as a private range for --unsafe-allow-private-ranges)
    (0x0000_0000, 8, "this network (0.0.0.0/8)", false),
    (0x0A00_0000, 8, "private range (10.0.0.0/8)", true),
    (
        0x6440_0000,
        10,
        "shared address space, CGNAT (100.64.0.0/10)",
        true,
    ),
    (0x7F00_0000, 8, "loopback (127.0.0.0/8)", false),
    (
        0xA9FE_0000,
        16,
        "link-local, cloud metadata (169.254.0.0/16)",
        false,
    ),
    (0xAC10_0000, 12, "private range (172.16.0.0/12)", true),
    (
        0xC000_0000,
        24,
        "IETF protocol assignments (192.0.0.0/24)",
        false,
    ),
    (
        0xC000_0200,
        24,
        "documentation, TEST-NET-1 (192.0.2.0/24)",
        false,
    ),
    (0xC01F_C400, 24, "AS112 (192.31.196.0/24)", false),
    (0xC034_C100, 24, "AMT (192.52.193.0/24)", false),
    (
        0xC058_6300,
        24,
        "deprecated 6to4 relay anycast (192.88.99.0/24)",
        false,
    ),
    (0xC0A8_0000, 16, "private range (192.168.0.0/16)", true),
    (
        0xC0AF_3000,
        24,
        "AS112 direct delegation (192.175.48.0/24)",
        false,
    ),
    (0xC612_0000, 15, "benchmarking (198.18.0.0/15)", false),
    (
        0xC633_6400,
        24,
        "documentation, TEST-NET-2 (198.51.100.0/24)",
        false,
    ),
    (
        0xCB00_7100,
        24,
        "documentation, TEST-NET-3 (203.0.113.0/24)",
        false,
    ),
    (0xE000_0000, 4, "multicast (224.0.0.0/4)", false),
    (0xF000_0000, 4, "reserved (240.0.0.0/4)", false),
    (
        0xFFFF_FFFF,
        32,
        "limited broadcast (255.255.255.255/32)",
        false,
    ),
    (
        0xC000_00AA,
        31,
        "NAT64/DNS64 discovery (192.0.0.170/31)",
        false,
    ),
];

/// Special-purpose IPv6 ranges (IANA's registry) beyond the mapped forms.
pub const V6_DENIED: [(u128, u8, &str, bool); 16] = [
    (0, 128, "unspecified (::/128)", false),
    (1, 128, "loopback (::1/128)", false),
    (
        0x0064_ff9b_0000_0000_0000_0000_0000_0000,
        96,
        "NAT64 (64:ff9b::/96)",
        false,
    ),
    (
        0x0064_ff9b_0001_0000_0000_0000_0000_0000,
        48,
        "local-use NAT64 (64:ff9b:1::/48)",
        false,
    ),
    (
        0x0100_0000_0000_0000_0000_0000_0000_0000,
        64,
        "discard-only (100::/64)",
        false,
    ),
    (
        0x2001_0000_0000_0000_0000_0000_0000_0000,
        32,
        "Teredo (2001::/32)",
        false,
    ),
    (
        0x2001_0000_0000_0000_0000_0000_0000_0000,
        23,
        "IETF protocol assignments (2001::/23)",
        false,
    ),
    (
        0x2001_0db8_0000_0000_0000_0000_0000_0000,
        32,
        "documentation (2001:db8::/32)",
        false,
    ),
    (
        0x2002_0000_0000_0000_0000_0000_0000_0000,
        16,
        "6to4 (2002::/16)",
        false,
    ),
    (
        0x2620_004f_8000_0000_0000_0000_0000_0000,
        48,
        "AS112-v6 (2620:4f:8000::/48)",
        false,
    ),
    (
        0x3fff_0000_0000_0000_0000_0000_0000_0000,
        20,
        "documentation (3fff::/20)",
        false,
    ),
    (
        0x5f00_0000_0000_0000_0000_0000_0000_0000,
        16,
        "segment routing SIDs (5f00::/16)",
        false,
    ),
    (
        0xfc00_0000_0000_0000_0000_0000_0000_0000,
        7,
        "unique local addresses (fc00::/7)",
        true,
    ),
    (
        0xfe80_0000_0000_0000_0000_0000_0000_0000,
        10,
        "link-local (fe80::/10)",
        false,
    ),
    (
        0xfec0_0000_0000_0000_0000_0000_0000_0000,
        10,
        "deprecated site-local (fec0::/10)",
        false,
    ),
    (
        0xff00_0000_0000_0000_0000_0000_0000_0000,
        8,
        "multicast (ff00::/8)",
        false,
    ),
];

/// Why `ip` is special, and whether it is a private range, or `None` for an
/// ordinary public address. IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible
/// (`::a.b.c.d`) and IPv4-translated (`::ffff:0:a.b.c.d`) addresses are judged
/// as the IPv4 address they carry.
pub fn special(ip: IpAddr) -> Option<(&'static str, bool)> {
    match ip {
        IpAddr::V4(a) => {
            let n = u32::from(a);
            V4_DENIED
                .iter()
                .find(|(net, prefix, _, _)| {
                    let mask = if *prefix == 0 {
                        0
                    } else {
                        u32::MAX << (32 - u32::from(*prefix))
                    };
                    n & mask == *net & mask
                })
                .map(|(_, _, why, private)| (*why, *private))
        }
        IpAddr::V6(a) => {
            let n = u128::from(a);
            // The exact ::, ::1 first; then the embedded-IPv4 forms.
            if let Some(hit) = V6_DENIED.iter().take(2).find(|(net, _, _, _)| n == *net) {
                return Some((hit.2, hit.3));
            }
            if let Some(v4) = embedded_v4(a) {
                return special(IpAddr::V4(v4));
            }
            V6_DENIED
                .iter()
                .find(|(net, prefix, _, _)| {
                    let mask = if *prefix == 0 {
                        0
                    } else {
                        u128::MAX << (128 - u32::from(*prefix))
                    };
                    n & mask == *net & mask
                })
                .map(|(_, _, why, private)| (*why, *private))
        }
    }
}

/// The IPv4 address inside an IPv4-mapped (`::ffff:a.b.c.d`),
/// IPv4-compatible (`::a.b.c.d`) or IPv4-translated (`::ffff:0:a.b.c.d`,
/// RFC 2765) IPv6 address.
fn embedded_v4(a: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = a.segments();
    let low = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    let mapped_or_compatible = s[..5] == [0, 0, 0, 0, 0] && (s[5] == 0xffff || s[5] == 0);
    let translated = s[..6] == [0, 0, 0, 0, 0xffff, 0];
    (mapped_or_compatible || translated).then_some(low)
}

/// An operator's `--allow-address`/`--deny-address` entry: an IP, maybe a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddressRule {
    pub ip: IpAddr,
    pub port: Option<u16>,
}

impl std::str::FromStr for AddressRule {
    type Err = String;
    fn from_str(s: &str) -> Result<AddressRule, String> {
        if let Ok(sa) = s.parse::<SocketAddr>() {
            return Ok(AddressRule {
                ip: sa.ip(),
                port: Some(sa.port()),
            });
        }
        let bare = s.trim_start_matches('[').trim_end_matches(']');
        bare.parse::<IpAddr>()
            .map(|ip| AddressRule { ip, port: None })
            .map_err(|_| format!("{s:?} is not IP or IP:PORT ([IPv6]:PORT)"))
    }
}

impl AddressRule {
    fn matches(&self, addr: SocketAddr) -> bool {
        self.ip == addr.ip() && self.port.is_none_or(|p| p == addr.port())
    }
}

/// The operator's overrides and the proxy's own addresses.
#[derive(Clone, Debug, Default)]
pub struct IpPolicy {
    pub deny_ranges: Vec<Cidr>,
    pub allow_ranges: Vec<Cidr>,
    pub deny_addresses: Vec<AddressRule>,
    pub allow_addresses: Vec<AddressRule>,
    pub unsafe_allow_private_ranges: bool,
    /// The proxy's listen addresses (and the node's own services).
    pub own_addresses: Vec<SocketAddr>,
}

impl IpPolicy {
    /// `Ok(())` when `addr` may be dialed, else why not. Order, as in
    /// Smokescreen: the proxy itself, operator denies, operator allows,
    /// then the special-purpose tables.
    pub fn check(&self, addr: SocketAddr) -> Result<(), String> {
        let ip = canonical(addr.ip());
        let addr = SocketAddr::new(ip, addr.port());
        if self.own_addresses.iter().any(|own| {
            canonical(own.ip()) == ip && own.port() == addr.port()
                || own.ip().is_unspecified() && own.port() == addr.port() && special(ip).is_some()
        }) {
            return Err(format!("{addr} is the proxy itself"));
        }
        if self.deny_addresses.iter().any(|r| r.matches(addr))
            || self.deny_ranges.iter().any(|c| c.contains(ip))
        {
            return Err(format!(
                "{ip} is in a denied range or address (--deny-range/--deny-address)"
            ));
        }
        if self.allow_addresses.iter().any(|r| r.matches(addr))
            || self.allow_ranges.iter().any(|c| c.contains(ip))
        {
            return Ok(());
        }
        match special(ip) {
            Some((_, true)) if self.unsafe_allow_private_ranges => Ok(()),
            Some((why, _)) => Err(format!("{ip} is {why}")),
            None => Ok(()),
        }
    }
}

/// IPv6 forms that carry an IPv4 address compared as that address (`::`
/// and `::1` stay themselves).
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(a) if u128::from(a) > 1 => match embedded_v4(a) {
            Some(v4) => IpAddr::V4(v4),
            None => ip,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denied(s: &str) -> bool {
        IpPolicy::default()
            .check(SocketAddr::new(s.parse().unwrap(), 80))
            .is_err()
    }

    #[test]
    fn every_table_entry_is_denied_at_both_ends() {
        for (net, prefix, why, _) in V4_DENIED {
            let first = Ipv4Addr::from(net);
            let last = Ipv4Addr::from(net | if prefix == 32 { 0 } else { u32::MAX >> prefix });
            for ip in [first, last] {
                assert!(denied(&ip.to_string()), "{ip} ({why}) was allowed");
                // and in its mapped and compatible IPv6 forms
                assert!(
                    denied(
                        &Ipv6Addr::from(0xffff_0000_0000u128 | u128::from(u32::from(ip)))
                            .to_string()
                    ),
                    "mapped {ip}"
                );
                assert!(
                    denied(
                        &Ipv6Addr::from(0xffff_0000_0000_0000u128 | u128::from(u32::from(ip)))
                            .to_string()
                    ),
                    "translated {ip}"
                );
            }
        }
        for (net, prefix, why, _) in V6_DENIED {
            let last = net
                | if prefix == 128 {
                    0
                } else {
                    u128::MAX >> prefix
                };
            for n in [net, last] {
                let ip = Ipv6Addr::from(n);
                assert!(denied(&ip.to_string()), "{ip} ({why}) was allowed");
            }
        }
    }

    #[test]
    fn public_addresses_pass_and_neighbours_of_ranges_too() {
        for ok in [
            "8.8.8.8",
            "1.1.1.1",
            "9.255.255.255",
            "11.0.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "192.167.255.255",
            "192.169.0.0",
            "198.17.255.255",
            "198.20.0.0",
            "223.255.255.255",
            "2606:4700::1111",
            "2a00:1450::1",
            "::ffff:8.8.8.8",
            "64:ff9a:ffff::1",
            "2003::1",
        ] {
            assert!(!denied(ok), "{ok} was denied");
        }
        for bad in [
            "169.254.169.254",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "::10.0.0.1",
            "64:ff9b::808:808",
            "64:ff9b:1::1",
            "2002:7f00:1::",
            "2001:0:4136:e378::1",
            "fd00::1",
            "fdaa:6a6e:6172::2",
            "fe80::1",
            "ff02::1",
            "0.1.2.3",
            "::",
        ] {
            assert!(denied(bad), "{bad} was allowed");
        }
    }

    #[test]
    fn operator_overrides_in_smokescreens_order() {
        let mut p = IpPolicy::default();
        p.allow_ranges.push("10.1.0.0/16".parse().unwrap());
        p.deny_ranges.push("8.8.8.0/24".parse().unwrap());
        p.deny_addresses.push("1.1.1.1:443".parse().unwrap());
        p.allow_addresses.push("127.0.0.1:9000".parse().unwrap());
        p.own_addresses.push("127.0.0.1:4750".parse().unwrap());
        let check = |s: &str| p.check(s.parse().unwrap());
        assert!(check("10.1.2.3:80").is_ok());
        assert!(check("10.2.0.1:80").is_err());
        assert!(check("8.8.8.8:53").is_err());
        assert!(check("1.1.1.1:443").is_err());
        assert!(check("1.1.1.1:80").is_ok());
        assert!(check("127.0.0.1:9000").is_ok());
        assert!(check("127.0.0.1:4750")
            .unwrap_err()
            .contains("proxy itself"));
        p.unsafe_allow_private_ranges = true;
        assert!(p.check("192.168.1.1:80".parse().unwrap()).is_ok());
        assert!(
            p.check("127.0.0.2:80".parse().unwrap()).is_err(),
            "loopback is not a private range"
        );
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("[::1]:80".parse::<AddressRule>().is_ok());
    }
}
