use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

use crate::{Asker, Instance, Server, Transport, Zone};

fn instance(id: &str, region: &str, node: &str, host: u8) -> Instance {
    Instance {
        id: id.into(),
        region: region.into(),
        node: node.into(),
        v4: Ipv4Addr::new(10, 213, 1, host),
        v6: Ipv6Addr::new(0xfdaa, 0x6a6e, 0x6172, 1, 0, 0, 0, host as u16),
    }
}

/// Net 1: app `web` with machines in ams (node a) and fra (nodes b, c);
/// app `db`, with none started. Net 2: another org's `secret`.
fn zone() -> Zone {
    let mut z = Zone::new("a", "ams");
    z.add_instance(1, "web", instance("m3", "fra", "c", 4));
    z.add_instance(1, "web", instance("m1", "ams", "a", 2));
    z.add_instance(1, "web", instance("m2", "fra", "b", 3));
    z.add_app(1, "db");
    let mut other = instance("s1", "ams", "a", 9);
    other.v4 = Ipv4Addr::new(10, 213, 2, 9);
    z.add_instance(2, "secret", other);
    z
}

fn query(name: &str, rtype: RecordType) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    m.to_vec().unwrap()
}

fn ask(z: &Zone, net: u32, from: IpAddr, name: &str, rtype: RecordType) -> Message {
    let bytes = z
        .answer(
            &query(name, rtype),
            Asker { net, addr: from },
            Transport::Udp,
        )
        .expect("an answer");
    Message::from_vec(&bytes).unwrap()
}

fn outside() -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 213, 1, 1))
}

/// The answer's addresses or texts, as strings, in order.
fn data(m: &Message) -> Vec<String> {
    m.answers
        .iter()
        .map(|r| match &r.data {
            RData::A(a) => a.0.to_string(),
            RData::AAAA(a) => a.0.to_string(),
            RData::TXT(t) => t
                .txt_data
                .iter()
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect::<String>(),
            other => format!("{other:?}"),
        })
        .collect()
}

#[test]
fn an_app_name_answers_its_started_machines_by_family() {
    let z = zone();
    let aaaa = ask(&z, 1, outside(), "web.internal.", RecordType::AAAA);
    assert_eq!(aaaa.metadata.response_code, ResponseCode::NoError);
    assert!(aaaa.metadata.authoritative);
    assert_eq!(
        data(&aaaa),
        [
            "fdaa:6a6e:6172:1::2",
            "fdaa:6a6e:6172:1::3",
            "fdaa:6a6e:6172:1::4"
        ]
    );
    let a = ask(&z, 1, outside(), "WEB.Internal", RecordType::A);
    assert_eq!(data(&a), ["10.213.1.2", "10.213.1.3", "10.213.1.4"]);
    // The question comes back as it was asked (0x20 case).
    assert_eq!(a.queries[0].name().to_ascii(), "WEB.Internal.");
    // An app with none started: the name is there, with no addresses.
    let db = ask(&z, 1, outside(), "db.internal", RecordType::AAAA);
    assert_eq!(db.metadata.response_code, ResponseCode::NoError);
    assert!(db.answers.is_empty());
    assert_eq!(db.authorities.len(), 1, "an SOA says how long to remember");
}

#[test]
fn region_machine_and_txt_names() {
    let z = zone();
    let fra = ask(&z, 1, outside(), "fra.web.internal", RecordType::A);
    assert_eq!(data(&fra), ["10.213.1.3", "10.213.1.4"]);
    let vm = ask(&z, 1, outside(), "m2.vm.web.internal", RecordType::AAAA);
    assert_eq!(data(&vm), ["fdaa:6a6e:6172:1::3"]);
    let apps = ask(&z, 1, outside(), "_apps.internal", RecordType::TXT);
    assert_eq!(data(&apps), ["db,web"]);
    let vms = ask(&z, 1, outside(), "vms.web.internal", RecordType::TXT);
    assert_eq!(data(&vms), ["m1 ams,m2 fra,m3 fra"]);
    let regions = ask(&z, 1, outside(), "regions.web.internal", RecordType::TXT);
    assert_eq!(data(&regions), ["ams,fra"]);
    // A TXT name asked for addresses: there, with none of that type.
    let none = ask(&z, 1, outside(), "vms.web.internal", RecordType::A);
    assert_eq!(none.metadata.response_code, ResponseCode::NoError);
    assert!(none.answers.is_empty());
}

#[test]
fn nearest_is_own_node_then_region_then_others() {
    let mut z = zone();
    // Asked from m2 (fra, node b): itself, then m3 in fra, then ams.
    let from_m2 = IpAddr::V6(Ipv6Addr::new(0xfdaa, 0x6a6e, 0x6172, 1, 0, 0, 0, 3));
    let top = ask(
        &z,
        1,
        from_m2,
        "top3.nearest.of.web.internal",
        RecordType::AAAA,
    );
    assert_eq!(
        data(&top),
        [
            "fdaa:6a6e:6172:1::3",
            "fdaa:6a6e:6172:1::4",
            "fdaa:6a6e:6172:1::2"
        ]
    );
    let top1 = ask(
        &z,
        1,
        from_m2,
        "top1.nearest.of.web.internal",
        RecordType::AAAA,
    );
    assert_eq!(data(&top1), ["fdaa:6a6e:6172:1::3"]);
    // On one node the asker itself comes first, then by id.
    let mut one = Zone::new("", "local");
    for (id, host) in [("a", 2), ("b", 3), ("c", 4)] {
        one.add_instance(1, "web", instance(id, "local", "", host));
    }
    let from_c = IpAddr::V4(Ipv4Addr::new(10, 213, 1, 4));
    let top2 = ask(
        &one,
        1,
        from_c,
        "top2.nearest.of.web.internal",
        RecordType::A,
    );
    assert_eq!(data(&top2), ["10.213.1.4", "10.213.1.2"]);
    // From an address no machine has: the serving node's (a, ams) view.
    let top1 = ask(
        &z,
        1,
        outside(),
        "top1.nearest.of.web.internal",
        RecordType::A,
    );
    assert_eq!(data(&top1), ["10.213.1.2"]);
    // Other regions go by round-trip time when it is known.
    z.add_instance(1, "web", instance("m4", "syd", "d", 5));
    z.set_rtt("ams", "syd", 5_000);
    z.set_rtt("ams", "fra", 20_000);
    let top2 = ask(
        &z,
        1,
        outside(),
        "top2.nearest.of.web.internal",
        RecordType::A,
    );
    assert_eq!(data(&top2), ["10.213.1.2", "10.213.1.5"]);
}

#[test]
fn unknown_names_are_nxdomain_and_outside_names_refused() {
    let z = zone();
    for name in [
        "nope.internal",
        "m9.vm.web.internal",
        "syd.web.internal",
        "a.b.c.d.e.internal",
        "top0.nearest.of.web.internal",
        "vms.nope.internal",
    ] {
        let m = ask(&z, 1, outside(), name, RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{name}");
        assert!(m.answers.is_empty(), "{name}");
    }
    for name in ["example.com", "internal.example.com", "web.internal.evil"] {
        let m = ask(&z, 1, outside(), name, RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::Refused, "{name}");
    }
}

#[test]
fn an_org_sees_only_its_own_names() {
    let z = zone();
    // Org 1 asking for org 2's app, even from org 2's machine address: the
    // net is the socket's, and net 1 has no such app.
    let from_theirs = IpAddr::V4(Ipv4Addr::new(10, 213, 2, 9));
    let m = ask(&z, 1, from_theirs, "secret.internal", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    let m = ask(&z, 1, outside(), "s1.vm.secret.internal", RecordType::AAAA);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    let apps = ask(&z, 2, outside(), "_apps.internal", RecordType::TXT);
    assert_eq!(data(&apps), ["secret"]);
    // A net with no apps at all.
    let m = ask(&z, 7, outside(), "web.internal", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    let apps = ask(&z, 7, outside(), "_apps.internal", RecordType::TXT);
    assert_eq!(data(&apps), [""]);
}

#[test]
fn bad_messages_get_formerr_or_nothing() {
    let z = zone();
    let asker = Asker {
        net: 1,
        addr: outside(),
    };
    assert!(z.answer(b"short", asker, Transport::Udp).is_none());
    // A header, then garbage.
    let mut junk = query("web.internal", RecordType::A);
    junk.truncate(16);
    let m = Message::from_vec(&z.answer(&junk, asker, Transport::Udp).unwrap()).unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    // A response is never answered (no loops between servers).
    let mut resp = Message::from_vec(&query("web.internal", RecordType::A)).unwrap();
    resp.metadata.message_type = hickory_proto::op::MessageType::Response;
    assert!(z
        .answer(&resp.to_vec().unwrap(), asker, Transport::Udp)
        .is_none());
}

/// An app with 200 machines: its answer is cut over UDP (and says so),
/// whole over TCP.
#[test]
fn big_answers_are_truncated_over_udp_and_whole_over_tcp() {
    let mut z = Zone::new("a", "ams");
    for h in 0..200u32 {
        let mut i = instance(&format!("m{h:03}"), "ams", "a", (h % 250) as u8);
        i.v6 = Ipv6Addr::new(0xfdaa, 0x6a6e, 0x6172, 1, 0, 0, 1, h as u16);
        z.add_instance(1, "big", i);
    }
    let asker = Asker {
        net: 1,
        addr: outside(),
    };
    let q = query("big.internal", RecordType::AAAA);
    let udp = Message::from_vec(&z.answer(&q, asker, Transport::Udp).unwrap()).unwrap();
    assert!(udp.metadata.truncation);
    assert!(udp.answers.is_empty());
    let tcp = Message::from_vec(&z.answer(&q, asker, Transport::Tcp).unwrap()).unwrap();
    assert!(!tcp.metadata.truncation);
    assert_eq!(tcp.answers.len(), 200);
    // With EDNS a client can take more than 512 bytes over UDP, up to
    // MAX_UDP: 40 AAAA records fit.
    let mut m = Message::from_vec(&query("big.internal", RecordType::AAAA)).unwrap();
    let mut edns = Edns::new();
    edns.set_max_payload(4096);
    m.set_edns(edns);
    let small = {
        let mut z = Zone::new("a", "ams");
        for h in 0..40u32 {
            let mut i = instance(&format!("m{h}"), "ams", "a", h as u8);
            i.v6 = Ipv6Addr::new(0xfdaa, 0x6a6e, 0x6172, 1, 0, 0, 1, h as u16);
            z.add_instance(1, "big", i);
        }
        z
    };
    let out = small
        .answer(&m.to_vec().unwrap(), asker, Transport::Udp)
        .unwrap();
    assert!(out.len() > 512 && out.len() <= crate::MAX_UDP as usize);
    let out = Message::from_vec(&out).unwrap();
    assert!(!out.metadata.truncation);
    assert_eq!(out.answers.len(), 40);
    assert!(out.edns.is_some());
}

fn udp_ask(server: SocketAddr, name: &str, rtype: RecordType) -> Message {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let q = query(name, rtype);
    s.send_to(&q, server).unwrap();
    let mut buf = [0u8; 4096];
    let (n, _) = s.recv_from(&mut buf).unwrap();
    let m = Message::from_vec(&buf[..n]).unwrap();
    // Each answer carries its own query's ID, remembered answers too.
    assert_eq!(m.metadata.id, u16::from_be_bytes([q[0], q[1]]));
    m
}

#[test]
fn the_server_answers_each_socket_from_its_own_net_and_follows_new_zones() {
    let server = Server::new(zone());
    let one = server
        .listen(1, "127.0.0.1:0".parse().unwrap(), None)
        .unwrap();
    let two = server
        .listen(2, "127.0.0.2:0".parse().unwrap(), None)
        .unwrap();
    for _ in 0..3 {
        assert_eq!(data(&udp_ask(one, "web.internal", RecordType::A)).len(), 3);
    }
    let m = udp_ask(two, "web.internal", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(
        data(&udp_ask(two, "secret.internal", RecordType::A)),
        ["10.213.2.9"]
    );
    // Opening a net's address again is a no-op.
    assert_eq!(server.listen(1, one, None).unwrap(), one);
    // A new zone: m2 stopped.
    let mut z = Zone::new("a", "ams");
    z.add_instance(1, "web", instance("m1", "ams", "a", 2));
    server.set(z);
    assert_eq!(
        data(&udp_ask(one, "web.internal", RecordType::A)),
        ["10.213.1.2"]
    );
    // TCP, on the same port.
    let mut c = std::net::TcpStream::connect(one).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    use std::io::{Read, Write};
    for _ in 0..2 {
        let q = query("vms.web.internal", RecordType::TXT);
        let mut framed = (q.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&q);
        c.write_all(&framed).unwrap();
        let mut len = [0u8; 2];
        c.read_exact(&mut len).unwrap();
        let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
        c.read_exact(&mut msg).unwrap();
        assert_eq!(data(&Message::from_vec(&msg).unwrap()), ["m1 ams"]);
    }
}
