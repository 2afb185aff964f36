//! What the names say: a [`Zone`] holds, per private net (one per org),
//! the apps and their started machines, and [`Zone::answer`] turns one DNS
//! query into its response. Pure: no sockets, no clock, no store.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, SOA, TXT};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

/// How long answers may be kept: short, as they follow machines' starts
/// and stops.
pub const TTL: u32 = 1;

/// The largest UDP answer sent, whatever a client offers (the size DNS
/// flag day 2020 settled on).
pub const MAX_UDP: u16 = 1232;

/// One started machine of an app.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    pub id: String,
    pub region: String,
    /// The node it runs on (empty for a node alone).
    pub node: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

/// One org's names.
#[derive(Clone, Debug, Default)]
struct Net {
    /// Apps by lowercase name, each with its started machines (by id).
    apps: BTreeMap<String, Vec<Instance>>,
    /// Whose machine an address is (its id, node and region), for
    /// `nearest`.
    askers: HashMap<IpAddr, Here>,
}

/// Every org's names as one node serves them. Built whole and swapped in;
/// never changed while it answers.
#[derive(Clone, Debug, Default)]
pub struct Zone {
    nets: HashMap<u32, Net>,
    /// The serving node and its region: the asker when the address is not
    /// a machine's.
    here: Here,
    /// Measured or configured round-trip times between regions, in
    /// microseconds, when known (key: the two names, in order).
    rtt: HashMap<(String, String), u64>,
}

/// Where a query comes from: a machine (its id), its node and region.
#[derive(Clone, Debug, Default)]
struct Here {
    id: String,
    node: String,
    region: String,
}

/// What asked, as the server saw it: the net its socket serves and the
/// source address.
#[derive(Clone, Copy, Debug)]
pub struct Asker {
    pub net: u32,
    pub addr: IpAddr,
}

/// How the answer is carried: UDP answers are cut to what the client can
/// take (and say so), TCP ones are not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// What a name is, once parsed.
enum Query<'a> {
    Apps,
    Addresses { app: &'a str, pick: Pick<'a> },
    Vms(&'a str),
    Regions(&'a str),
}

enum Pick<'a> {
    All,
    Region(&'a str),
    Machine(&'a str),
    Nearest(usize),
}

impl Zone {
    /// An empty zone served by `node` of `region`.
    pub fn new(node: &str, region: &str) -> Zone {
        Zone {
            here: Here {
                id: String::new(),
                node: node.to_string(),
                region: region.to_string(),
            },
            ..Zone::default()
        }
    }

    /// Make `app` known in `net` (with no machines yet: it is listed in
    /// `_apps.internal`, and its names answer with no addresses).
    pub fn add_app(&mut self, net: u32, app: &str) {
        self.nets
            .entry(net)
            .or_default()
            .apps
            .entry(app.to_ascii_lowercase())
            .or_default();
    }

    /// Add a started machine of `app` in `net`.
    pub fn add_instance(&mut self, net: u32, app: &str, instance: Instance) {
        let n = self.nets.entry(net).or_default();
        for addr in [IpAddr::V4(instance.v4), IpAddr::V6(instance.v6)] {
            let here = Here {
                id: instance.id.clone(),
                node: instance.node.clone(),
                region: instance.region.clone(),
            };
            n.askers.insert(addr, here);
        }
        let list = n.apps.entry(app.to_ascii_lowercase()).or_default();
        list.push(instance);
        list.sort_by(|a, b| a.id.cmp(&b.id));
    }

    /// The round-trip time between two regions, for `nearest`.
    pub fn set_rtt(&mut self, a: &str, b: &str, micros: u64) {
        let key = if a <= b { (a, b) } else { (b, a) };
        self.rtt
            .insert((key.0.to_string(), key.1.to_string()), micros);
    }

    /// The nets that have names.
    pub fn nets(&self) -> impl Iterator<Item = u32> + '_ {
        self.nets.keys().copied()
    }

    /// The response to `request` (the bytes of one DNS message) from
    /// `asker`, or `None` when it deserves none (not a query, or too broken
    /// to answer).
    pub fn answer(&self, request: &[u8], asker: Asker, transport: Transport) -> Option<Vec<u8>> {
        let req = match Message::from_vec(request) {
            Ok(m) => m,
            Err(_) => return formerr(request),
        };
        if req.metadata.message_type != MessageType::Query {
            return None;
        }
        let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
        resp.metadata.recursion_desired = req.metadata.recursion_desired;
        resp.metadata.authoritative = true;
        if req.edns.is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(MAX_UDP);
            resp.set_edns(edns);
        }
        let code = if req.metadata.op_code != OpCode::Query {
            ResponseCode::NotImp
        } else if req.queries.len() != 1 {
            ResponseCode::FormErr
        } else {
            let q = &req.queries[0];
            resp.add_query(q.clone());
            self.resolve(q.name(), q.query_type(), q.query_class(), asker, &mut resp)
        };
        resp.metadata.response_code = code;
        let bytes = resp.to_vec().ok()?;
        let limit = match transport {
            Transport::Udp => req.max_payload().min(MAX_UDP) as usize,
            Transport::Tcp => u16::MAX as usize,
        };
        if bytes.len() <= limit {
            return Some(bytes);
        }
        let mut cut = resp.truncate();
        cut.metadata.truncation = true;
        cut.to_vec().ok()
    }

    /// Fill `resp`'s answer for one question; returns its response code.
    fn resolve(
        &self,
        name: &Name,
        rtype: RecordType,
        class: DNSClass,
        asker: Asker,
        resp: &mut Message,
    ) -> ResponseCode {
        let lower = name.to_lowercase().to_ascii();
        let lower = lower.trim_end_matches('.');
        let Some(rest) = lower
            .strip_suffix(".internal")
            .or((lower == "internal").then_some(""))
        else {
            // Not ours, and no recursion: names outside go through the
            // egress proxy, which resolves them itself.
            return ResponseCode::Refused;
        };
        if class != DNSClass::IN {
            return ResponseCode::Refused;
        }
        let net = self.nets.get(&asker.net);
        let empty = Net::default();
        let net = net.unwrap_or(&empty);
        let labels: Vec<&str> = if rest.is_empty() {
            Vec::new()
        } else {
            rest.split('.').collect()
        };
        let Some(query) = parse(&labels) else {
            return self.negative(true, resp);
        };
        match query {
            Query::Apps => {
                let apps: Vec<&str> = net.apps.keys().map(String::as_str).collect();
                self.txt(name, rtype, &apps.join(","), resp)
            }
            Query::Vms(app) => match net.apps.get(app) {
                None => self.negative(true, resp),
                Some(list) => {
                    let vms: Vec<String> = list
                        .iter()
                        .map(|i| format!("{} {}", i.id, i.region))
                        .collect();
                    self.txt(name, rtype, &vms.join(","), resp)
                }
            },
            Query::Regions(app) => match net.apps.get(app) {
                None => self.negative(true, resp),
                Some(list) => {
                    let mut regions: Vec<&str> = list.iter().map(|i| i.region.as_str()).collect();
                    regions.sort_unstable();
                    regions.dedup();
                    self.txt(name, rtype, &regions.join(","), resp)
                }
            },
            Query::Addresses { app, pick } => {
                let Some(list) = net.apps.get(app) else {
                    return self.negative(true, resp);
                };
                let chosen: Vec<&Instance> = match pick {
                    Pick::All => list.iter().collect(),
                    Pick::Region(r) => list.iter().filter(|i| i.region == r).collect(),
                    Pick::Machine(id) => list.iter().filter(|i| i.id == id).collect(),
                    Pick::Nearest(n) => self.nearest(net, list, asker, n),
                };
                if chosen.is_empty() && !matches!(pick, Pick::All | Pick::Nearest(_)) {
                    // A region or machine the app has none of (started).
                    return self.negative(true, resp);
                }
                let mut found = false;
                for i in chosen {
                    let data = match rtype {
                        RecordType::A => vec![RData::A(A(i.v4))],
                        RecordType::AAAA => vec![RData::AAAA(AAAA(i.v6))],
                        RecordType::ANY => vec![RData::AAAA(AAAA(i.v6)), RData::A(A(i.v4))],
                        _ => Vec::new(),
                    };
                    for d in data {
                        found = true;
                        resp.add_answer(Record::from_rdata(name.clone(), TTL, d));
                    }
                }
                if !found {
                    return self.negative(false, resp);
                }
                ResponseCode::NoError
            }
        }
    }

    /// The app's machines nearest the asker: itself, then on its node, then
    /// in its region, then by region round-trip time (when known) and name.
    fn nearest<'a>(
        &self,
        net: &Net,
        list: &'a [Instance],
        asker: Asker,
        n: usize,
    ) -> Vec<&'a Instance> {
        let from = net.askers.get(&asker.addr).unwrap_or(&self.here);
        let region = &from.region;
        let mut ranked: Vec<&Instance> = list.iter().collect();
        ranked.sort_by_key(|i| {
            let tier = if i.id == from.id {
                0
            } else if i.node == from.node {
                1
            } else if &i.region == region {
                2
            } else {
                3
            };
            let key = if region.as_str() <= i.region.as_str() {
                (region.clone(), i.region.clone())
            } else {
                (i.region.clone(), region.clone())
            };
            let rtt = self.rtt.get(&key).copied().unwrap_or(u64::MAX);
            (tier, rtt, i.region.clone(), i.id.clone())
        });
        ranked.truncate(n);
        ranked
    }

    /// A TXT answer (for a TXT or ANY question; none for others).
    fn txt(&self, name: &Name, rtype: RecordType, text: &str, resp: &mut Message) -> ResponseCode {
        if !matches!(rtype, RecordType::TXT | RecordType::ANY) {
            return self.negative(false, resp);
        }
        // One string holds at most 255 bytes: a longer text is split into
        // several, which readers join.
        let mut parts = Vec::new();
        let mut rest = text;
        while rest.len() > 255 {
            let mut at = 255;
            while !rest.is_char_boundary(at) {
                at -= 1;
            }
            parts.push(rest[..at].to_string());
            rest = &rest[at..];
        }
        parts.push(rest.to_string());
        resp.add_answer(Record::from_rdata(
            name.clone(),
            TTL,
            RData::TXT(TXT::new(parts)),
        ));
        ResponseCode::NoError
    }

    /// No such name (NXDOMAIN), or no records of the type asked for
    /// (NOERROR, empty), with the zone's SOA so resolvers know how long to
    /// remember it.
    fn negative(&self, nxdomain: bool, resp: &mut Message) -> ResponseCode {
        let origin = Name::from_ascii("internal.").unwrap_or_else(|_| Name::root());
        let soa = SOA::new(
            origin.clone(),
            Name::from_ascii("hostmaster.internal.").unwrap_or_else(|_| Name::root()),
            1,
            60,
            10,
            600,
            TTL,
        );
        resp.add_authority(Record::from_rdata(origin, TTL, RData::SOA(soa)));
        if nxdomain {
            ResponseCode::NXDomain
        } else {
            ResponseCode::NoError
        }
    }
}

/// Fly's names, below `.internal` (labels from the left).
fn parse<'a>(labels: &[&'a str]) -> Option<Query<'a>> {
    Some(match *labels {
        ["_apps"] => Query::Apps,
        ["vms", app] => Query::Vms(app),
        ["regions", app] => Query::Regions(app),
        [app] => Query::Addresses {
            app,
            pick: Pick::All,
        },
        [id, "vm", app] => Query::Addresses {
            app,
            pick: Pick::Machine(id),
        },
        [top, "nearest", "of", app] => {
            let n: usize = top.strip_prefix("top")?.parse().ok()?;
            if n == 0 {
                return None;
            }
            Query::Addresses {
                app,
                pick: Pick::Nearest(n),
            }
        }
        [region, app] => Query::Addresses {
            app,
            pick: Pick::Region(region),
        },
        _ => return None,
    })
}

/// A FORMERR for a message whose header could be read, so the client
/// stops waiting; nothing for less than a header.
fn formerr(request: &[u8]) -> Option<Vec<u8>> {
    if request.len() < 12 || request[2] & 0x80 != 0 {
        return None;
    }
    let id = u16::from_be_bytes([request[0], request[1]]);
    Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)
        .to_vec()
        .ok()
}
