//! Packet tests of the source NAT of flows to remote backends and of the ICMP translation:
//! the real XDP and TC programs through BPF_PROG_TEST_RUN, run from a thread inside a
//! namespace whose routes and neighbours the FIB lookups see. Every expected packet is built
//! by etherparse with its own checksums; expected NAT ports come from `lb_common::nat::port`
//! of the flow hash, not from the map.

use aya::maps::{HashMap, Map, MapData};
use etherparse::{Icmpv4Type, PacketBuilder, icmpv4::DestUnreachableHeader};
use lb_common::{
    BACKEND_F_REMOTE, NAT_F_CLOSING, NAT_IN, Nat4Entry, Nat4Key, NatEvent, PROTO_TCP, PROTO_UDP,
    map_names, nat,
};
use lb_testbed::Netns;
use lb_testbed::packet::*;
use lb_userspace::datapath::{explain::monotonic_ns, interface_index};

const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

/// Node A: eth0 on the LAN with the client and node B, eth1 on another network.
const NODE: [u8; 4] = [10, 200, 0, 1];
const ETH1_MAC: [u8; 6] = [2, 0, 0, 0, 1, 1];
const NODE_B: [u8; 4] = [10, 200, 0, 3];
const NODE_B_MAC: [u8; 6] = [2, 0, 0, 0, 0, 3];
const GW1_MAC: [u8; 6] = [2, 0, 0, 0, 1, 3];
/// A backend on node B (routed via node B, whose MAC is known).
const REMOTE: [u8; 4] = [10, 245, 1, 2];
/// A backend behind a next hop whose MAC is not known.
const UNRESOLVED: [u8; 4] = [10, 246, 1, 2];
/// A backend reached through eth1.
const BEHIND_ETH1: [u8; 4] = [10, 247, 1, 2];
const NODE_PORT: u16 = 30080;
const CPORT: u16 = 40000;

/// A namespace with node A's interfaces, routes and neighbours; the ifindex of eth0.
struct Net {
    ns: Netns,
    eth0: u32,
}

fn mac(m: [u8; 6]) -> String {
    m.map(|b| format!("{b:02x}")).join(":")
}

fn dotted(a: [u8; 4]) -> String {
    a.map(|b| b.to_string()).join(".")
}

impl Net {
    fn new() -> Self {
        let ns = Netns::new("natbed").unwrap();
        let ip = |args: &[&str]| {
            ns.ip(args).unwrap();
        };
        for (dev, peer, m, addr) in [
            ("eth0", "peer0", NODE_MAC, "10.200.0.1/24"),
            ("eth1", "peer1", ETH1_MAC, "10.201.0.1/24"),
        ] {
            ip(&[
                "link",
                "add",
                dev,
                "address",
                &mac(m),
                "type",
                "veth",
                "peer",
                "name",
                peer,
            ]);
            ip(&["link", "set", peer, "up"]);
            ns.addr(dev, addr).unwrap();
        }
        ns.sysctl("net/ipv4/ip_forward", "1").unwrap();
        for (addr, m, dev) in [
            (CLIENT, CLIENT_MAC, "eth0"),
            (NODE_B, NODE_B_MAC, "eth0"),
            ([10, 201, 0, 3], GW1_MAC, "eth1"),
        ] {
            ip(&[
                "neigh",
                "replace",
                &dotted(addr),
                "lladdr",
                &mac(m),
                "dev",
                dev,
                "nud",
                "permanent",
            ]);
        }
        ip(&["route", "add", "10.245.0.0/16", "via", "10.200.0.3"]);
        ip(&["route", "add", "10.246.0.0/16", "via", "10.200.0.4"]);
        ip(&["route", "add", "10.247.0.0/16", "via", "10.201.0.3"]);
        let eth0 = ns.run(|| interface_index("eth0").unwrap()).unwrap();
        Net { ns, eth0 }
    }
}

fn remote(addr: [u8; 4], port: u16, proto: u8) -> lb_common::Backend4 {
    backend(addr, port, proto).with_flags(BACKEND_F_REMOTE)
}

/// The NAT port of try `i` for a flow given in host order, host order.
fn nat_port(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, proto: u8, i: u32) -> u16 {
    nat::port(hash(src, sport, dst, dport, proto), i)
}

/// `packet` as it leaves by XDP: new MAC addresses and one hop less.
fn hop(packet: Vec<u8>, src_mac: [u8; 6], dst_mac: [u8; 6]) -> Vec<u8> {
    let mut out = packet;
    out[0..6].copy_from_slice(&dst_mac);
    out[6..12].copy_from_slice(&src_mac);
    out[22] -= 1;
    // The header checksum, from scratch, over the new TTL.
    out[24..26].fill(0);
    let header = etherparse::Ipv4HeaderSlice::from_slice(&out[14..34]).unwrap();
    let check = header.to_header().calc_header_checksum();
    out[24..26].copy_from_slice(&check.to_be_bytes());
    out
}

fn nat_map(bed: &Bed) -> HashMap<MapData, Nat4Key, Nat4Entry> {
    let data = MapData::from_pin(bed.pin.join(map_names::NAT)).unwrap();
    HashMap::try_from(Map::LruHashMap(data)).unwrap()
}

fn in_key(backend: [u8; 4], bport: u16, port: u16, proto: u8) -> Nat4Key {
    Nat4Key {
        saddr: u32::from_ne_bytes(backend),
        daddr: u32::from_ne_bytes(NODE),
        sport: bport.to_be(),
        dport: port.to_be(),
        proto,
        dir: NAT_IN,
        _pad: [0; 2],
    }
}

fn nat_events(bed: &Bed) -> Vec<u64> {
    bed.counters().nat_events().unwrap()
}

fn nat_since(bed: &Bed, before: &[u64]) -> Vec<(&'static str, u64)> {
    changed(NatEvent::NAMES, before, &nat_events(bed))
}

/// A reply from `backend:bport` to node A's `port`, arriving from node B.
fn reply_tcp(backend: [u8; 4], bport: u16, port: u16) -> Vec<u8> {
    let mut p = tcp_ack(backend, bport, NODE, port, b"answer");
    p[0..6].copy_from_slice(&NODE_MAC);
    p[6..12].copy_from_slice(&NODE_B_MAC);
    p
}

#[test]
fn a_flow_to_a_remote_backend_leaves_from_a_nat_port_and_its_replies_return_to_the_client() {
    let net = Net::new();
    let mut bed = Bed::new();
    let fe = frontend(NODE, NODE_PORT, PROTO_TCP);
    bed.service(1, fe, &[remote(REMOTE, 80, PROTO_TCP)], 0);
    let before = nat_events(&bed);

    let port = nat_port(CLIENT, CPORT, NODE, NODE_PORT, PROTO_TCP, 0);
    assert!((nat::PORT_MIN..=nat::PORT_MAX).contains(&port));
    let syn = tcp(CLIENT, CPORT, NODE, NODE_PORT, b"");
    let (action, out) = bed.xdp_in(&net.ns, net.eth0, &syn);
    assert_eq!(action, XDP_TX, "out of the interface it came in by");
    let want = rewritten(&syn, Some((REMOTE, 80)), Some((NODE, port)));
    assert_eq!(out, hop(want, NODE_MAC, NODE_B_MAC));

    // The backend's answer goes back to the client, from the frontend.
    let answer = reply_tcp(REMOTE, 80, port);
    let (action, out) = bed.xdp_in(&net.ns, net.eth0, &answer);
    assert_eq!(action, XDP_TX);
    let want = rewritten(&answer, Some((CLIENT, CPORT)), Some((NODE, NODE_PORT)));
    assert_eq!(out, hop(want, NODE_MAC, CLIENT_MAC));

    // The next packets of the flow keep the port.
    let more = tcp_ack(CLIENT, CPORT, NODE, NODE_PORT, b"more");
    let (_, out) = bed.xdp_in(&net.ns, net.eth0, &more);
    let want = rewritten(&more, Some((REMOTE, 80)), Some((NODE, port)));
    assert_eq!(out, hop(want, NODE_MAC, NODE_B_MAC));

    let entry = nat_map(&bed)
        .get(&in_key(REMOTE, 80, port, PROTO_TCP), 0)
        .unwrap();
    assert_eq!(
        (entry.addr, entry.port, entry.peer_addr, entry.peer_port),
        (
            u32::from_ne_bytes(CLIENT),
            CPORT.to_be(),
            u32::from_ne_bytes(NODE),
            NODE_PORT.to_be()
        )
    );
    assert_eq!(
        nat_since(&bed, &before),
        [("nat_allocated", 1), ("nat_replies", 1), ("fwd_tx", 3)]
    );
    // A packet to a NAT port that no flow holds is not ours: passed untouched.
    let stray = reply_tcp(REMOTE, 80, port.wrapping_add(1).max(nat::PORT_MIN));
    assert_eq!(bed.xdp_in(&net.ns, net.eth0, &stray), (XDP_PASS, stray));
}

#[test]
fn two_frontends_sharing_a_backend_never_share_a_port_even_from_one_client_port() {
    let net = Net::new();
    let mut bed = Bed::new();
    let shared = bed.backend(remote(REMOTE, 5353, PROTO_UDP));
    let fronts = [30053u16, 30054];
    for (i, &p) in fronts.iter().enumerate() {
        bed.program(i as u32 + 1, frontend(NODE, p, PROTO_UDP), &[shared], 0, 0);
    }
    let mut ports = Vec::new();
    for &p in &fronts {
        let q = udp(CLIENT, CPORT, NODE, p, b"q");
        let (action, out) = bed.xdp_in(&net.ns, net.eth0, &q);
        assert_eq!(action, XDP_TX);
        let sport = u16::from_be_bytes([out[34], out[35]]);
        assert_eq!(
            out,
            hop(
                rewritten(&q, Some((REMOTE, 5353)), Some((NODE, sport))),
                NODE_MAC,
                NODE_B_MAC
            )
        );
        ports.push(sport);
    }
    assert_ne!(ports[0], ports[1], "one backend, two flows: two ports");
    // Each reply returns from its own frontend.
    for (&p, &port) in fronts.iter().zip(&ports) {
        let mut answer = udp(REMOTE, 5353, NODE, port, b"a");
        answer[0..12].copy_from_slice(&[NODE_MAC, NODE_B_MAC].concat());
        let (action, out) = bed.xdp_in(&net.ns, net.eth0, &answer);
        assert_eq!(action, XDP_TX);
        let want = rewritten(&answer, Some((CLIENT, CPORT)), Some((NODE, p)));
        assert_eq!(out, hop(want, NODE_MAC, CLIENT_MAC));
    }
}

#[test]
fn taken_ports_are_skipped_expired_ones_reused_and_a_flow_that_lost_its_port_gets_another() {
    let net = Net::new();
    let mut bed = Bed::new();
    bed.service(
        1,
        frontend(NODE, NODE_PORT, PROTO_TCP),
        &[remote(REMOTE, 80, PROTO_TCP)],
        0,
    );
    let mut map = nat_map(&bed);
    let now = monotonic_ns();
    let other = |last_seen_ns: u64, flags: u16| Nat4Entry {
        addr: u32::from_ne_bytes([10, 200, 0, 9]),
        port: 1234u16.to_be(),
        flags,
        peer_addr: u32::from_ne_bytes(NODE),
        peer_port: 30999u16.to_be(),
        _pad: 0,
        last_seen_ns,
    };
    let send = |bed: &mut Bed, sport: u16| {
        let syn = tcp(CLIENT, sport, NODE, NODE_PORT, b"");
        let (action, out) = bed.xdp_in(&net.ns, net.eth0, &syn);
        assert_eq!(action, XDP_TX);
        u16::from_be_bytes([out[34], out[35]])
    };

    // The first two tries are held by live flows: the third is taken.
    let sport = 41000;
    for i in 0..2 {
        let p = nat_port(CLIENT, sport, NODE, NODE_PORT, PROTO_TCP, i);
        map.insert(in_key(REMOTE, 80, p, PROTO_TCP), other(now, 0), 0)
            .unwrap();
    }
    let before = nat_events(&bed);
    let got = send(&mut bed, sport);
    assert_eq!(got, nat_port(CLIENT, sport, NODE, NODE_PORT, PROTO_TCP, 2));
    assert_eq!(
        nat_since(&bed, &before),
        [("nat_allocated", 1), ("nat_port_taken", 2), ("fwd_tx", 1)]
    );

    // A closed flow's port is free after the closing timeout; an idle TCP flow's after two
    // hours.
    for (sport, entry) in [
        (
            42000,
            other(
                now.wrapping_sub(nat::CLOSING_TIMEOUT_NS + 1_000_000_000),
                NAT_F_CLOSING,
            ),
        ),
        (
            43000,
            other(now.wrapping_sub(nat::TCP_TIMEOUT_NS + 1_000_000_000), 0),
        ),
    ] {
        let p = nat_port(CLIENT, sport, NODE, NODE_PORT, PROTO_TCP, 0);
        map.insert(in_key(REMOTE, 80, p, PROTO_TCP), entry, 0)
            .unwrap();
        let before = nat_events(&bed);
        assert_eq!(send(&mut bed, sport), p);
        assert_eq!(
            nat_since(&bed, &before),
            [
                ("nat_allocated", 1),
                ("nat_reused_expired", 1),
                ("fwd_tx", 1)
            ]
        );
        let owner = map.get(&in_key(REMOTE, 80, p, PROTO_TCP), 0).unwrap();
        assert_eq!(owner.port, sport.to_be(), "the new flow owns it");
    }

    // A flow whose port was taken over (here: by hand) is given another one.
    let p = nat_port(CLIENT, sport, NODE, NODE_PORT, PROTO_TCP, 2);
    map.insert(in_key(REMOTE, 80, p, PROTO_TCP), other(now, 0), 0)
        .unwrap();
    let before = nat_events(&bed);
    let again = send(&mut bed, sport);
    assert_ne!(again, p);
    assert_eq!(
        nat_since(&bed, &before),
        [
            ("nat_allocated", 1),
            ("nat_port_taken", 3),
            ("nat_port_lost", 1),
            ("fwd_tx", 1)
        ],
        "tries 0 and 1 are still held, try 2 too now"
    );

    // Every try held: the flow is dropped.
    let sport = 44000;
    for i in 0..nat::TRIES {
        let p = nat_port(CLIENT, sport, NODE, NODE_PORT, PROTO_TCP, i);
        map.insert(in_key(REMOTE, 80, p, PROTO_TCP), other(now, 0), 0)
            .unwrap();
    }
    let before = nat_events(&bed);
    let syn = tcp(CLIENT, sport, NODE, NODE_PORT, b"");
    assert_eq!(bed.xdp_in(&net.ns, net.eth0, &syn).0, XDP_DROP);
    assert_eq!(
        nat_since(&bed, &before),
        [("nat_port_taken", nat::TRIES as u64), ("nat_exhausted", 1)]
    );
}

#[test]
fn unresolved_next_hops_go_to_the_kernel_and_other_interfaces_by_redirect() {
    let net = Net::new();
    let mut bed = Bed::new();
    bed.service(
        1,
        frontend(NODE, 30001, PROTO_TCP),
        &[remote(UNRESOLVED, 80, PROTO_TCP)],
        0,
    );
    bed.service(
        2,
        frontend(NODE, 30002, PROTO_TCP),
        &[remote(BEHIND_ETH1, 80, PROTO_TCP)],
        0,
    );
    let before = nat_events(&bed);
    // Translated, MACs and TTL as they were: the kernel forwards it (and resolves the hop).
    let syn = tcp(CLIENT, CPORT, NODE, 30001, b"");
    let port = nat_port(CLIENT, CPORT, NODE, 30001, PROTO_TCP, 0);
    assert_eq!(
        bed.xdp_in(&net.ns, net.eth0, &syn),
        (
            XDP_PASS,
            rewritten(&syn, Some((UNRESOLVED, 80)), Some((NODE, port)))
        )
    );
    // Through eth1: redirected, from eth1's address and MAC.
    let syn = tcp(CLIENT, CPORT, NODE, 30002, b"");
    let (action, out) = bed.xdp_in(&net.ns, net.eth0, &syn);
    assert_eq!(action, XDP_REDIRECT);
    let eth1_addr = [10, 201, 0, 1];
    let port = u16::from_be_bytes([out[34], out[35]]);
    let want = rewritten(&syn, Some((BEHIND_ETH1, 80)), Some((eth1_addr, port)));
    assert_eq!(out, hop(want, ETH1_MAC, GW1_MAC));
    assert_eq!(
        nat_since(&bed, &before),
        [
            ("nat_allocated", 2),
            ("fwd_redirect", 1),
            ("fwd_no_neigh", 1)
        ]
    );
}

/// An IPv4 packet (no Ethernet) of UDP or TCP from `src` to `dst`, as it was sent.
fn quoted(proto: u8, src: ([u8; 4], u16), dst: ([u8; 4], u16), ttl: u8) -> Vec<u8> {
    quoted_over(PacketBuilder::ipv4(src.0, dst.0, ttl), proto, src.1, dst.1)
}

/// A port unreachable error from `from` to `to` quoting `quote`.
fn port_unreachable(
    macs: ([u8; 6], [u8; 6]),
    from: [u8; 4],
    to: [u8; 4],
    ttl: u8,
    quote: &[u8],
) -> Vec<u8> {
    icmp(macs, from, to, ttl, DestUnreachableHeader::Port, quote)
}

/// An ICMP error from `from` to `to` quoting `quote`.
fn icmp(
    macs: ([u8; 6], [u8; 6]),
    from: [u8; 4],
    to: [u8; 4],
    ttl: u8,
    kind: DestUnreachableHeader,
    quote: &[u8],
) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv4(from, to, ttl)
        .icmpv4(Icmpv4Type::DestinationUnreachable(kind))
        .write(&mut out, quote)
        .unwrap();
    out
}

#[test]
fn icmp_errors_about_a_nated_flow_reach_the_client_about_the_frontend() {
    let net = Net::new();
    let mut bed = Bed::new();
    bed.service(
        1,
        frontend(NODE, 30053, PROTO_UDP),
        &[remote(REMOTE, 5353, PROTO_UDP)],
        0,
    );
    bed.service(
        2,
        frontend(NODE, NODE_PORT, PROTO_TCP),
        &[remote(REMOTE, 80, PROTO_TCP)],
        0,
    );
    let q = udp(CLIENT, CPORT, NODE, 30053, b"question");
    assert_eq!(bed.xdp_in(&net.ns, net.eth0, &q).0, XDP_TX);
    let udp_port = nat_port(CLIENT, CPORT, NODE, 30053, PROTO_UDP, 0);
    let syn = tcp(CLIENT, CPORT, NODE, NODE_PORT, b"");
    assert_eq!(bed.xdp_in(&net.ns, net.eth0, &syn).0, XDP_TX);
    let tcp_port = nat_port(CLIENT, CPORT, NODE, NODE_PORT, PROTO_TCP, 0);
    let before = nat_events(&bed);

    // Port unreachable from the backend itself: the outer source becomes the frontend.
    let sent = quoted(PROTO_UDP, (NODE, udp_port), (REMOTE, 5353), 63);
    let error = port_unreachable((NODE_B_MAC, NODE_MAC), REMOTE, NODE, 64, &sent);
    let (action, out) = bed.xdp_in(&net.ns, net.eth0, &error);
    assert_eq!(action, XDP_TX);
    let about = quoted(PROTO_UDP, (CLIENT, CPORT), (NODE, 30053), 63);
    let want = port_unreachable((NODE_MAC, CLIENT_MAC), NODE, CLIENT, 63, &about);
    assert_eq!(out, want);

    // Fragmentation needed from a router on the way: its address stays.
    let router = [10, 200, 0, 254];
    let frag = DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 };
    let sent = quoted(PROTO_TCP, (NODE, tcp_port), (REMOTE, 80), 63);
    let error = icmp(
        (NODE_B_MAC, NODE_MAC),
        router,
        NODE,
        64,
        frag.clone(),
        &sent,
    );
    let (action, out) = bed.xdp_in(&net.ns, net.eth0, &error);
    assert_eq!(action, XDP_TX);
    let about = quoted(PROTO_TCP, (CLIENT, CPORT), (NODE, NODE_PORT), 63);
    let want = icmp((NODE_MAC, CLIENT_MAC), router, CLIENT, 63, frag, &about);
    assert_eq!(out, want);
    assert_eq!(nat_since(&bed, &before), [("fwd_tx", 2), ("icmp_nat", 2)]);

    // An error about a flow nobody translated is not ours.
    let sent = quoted(PROTO_UDP, (NODE, 33333), (REMOTE, 5353), 63);
    let error = port_unreachable((NODE_B_MAC, NODE_MAC), REMOTE, NODE, 64, &sent);
    assert_eq!(bed.xdp_in(&net.ns, net.eth0, &error), (XDP_PASS, error));
}

#[test]
fn icmp_errors_from_a_local_backend_leave_about_the_frontend() {
    let mut bed = Bed::new();
    let vip = [10, 96, 0, 53];
    bed.service(
        1,
        frontend(vip, 53, PROTO_UDP),
        &[backend(POD1, 5353, PROTO_UDP)],
        0,
    );
    let q = udp(CLIENT, CPORT, vip, 53, b"question");
    assert_eq!(bed.xdp(&q).0, XDP_PASS);
    let before = nat_events(&bed);

    let sent = quoted(PROTO_UDP, (CLIENT, CPORT), (POD1, 5353), 63);
    let error = port_unreachable((NODE_MAC, CLIENT_MAC), POD1, CLIENT, 63, &sent);
    let (action, out) = bed.tc(&error);
    assert_eq!(action, TC_ACT_OK);
    let about = quoted(PROTO_UDP, (CLIENT, CPORT), (vip, 53), 63);
    let want = port_unreachable((NODE_MAC, CLIENT_MAC), vip, CLIENT, 63, &about);
    assert_eq!(out, want);
    assert_eq!(nat_since(&bed, &before), [("icmp_local", 1)]);

    // Not about a translated flow: untouched.
    let sent = quoted(PROTO_UDP, (CLIENT, CPORT + 1), (POD1, 5353), 63);
    let error = port_unreachable((NODE_MAC, CLIENT_MAC), POD1, CLIENT, 63, &sent);
    assert_eq!(bed.tc(&error), (TC_ACT_OK, error));
}
