//! Packet tests of the IPv6 source NAT of flows to remote backends (`lb_xdp_nat6`, which
//! `lb_xdp_ingress6` tail-calls): the real XDP programs through BPF_PROG_TEST_RUN, run from
//! a thread inside a namespace whose IPv6 routes and neighbours the FIB lookups see. Every
//! expected packet is built by etherparse with its own checksums; expected NAT ports come
//! from `lb_common::nat::port` of the flow hash, not from the map.

use std::net::Ipv6Addr;

use aya::maps::{HashMap, Map, MapData, ProgramArray};
use etherparse::{Icmpv6Type, PacketBuilder, icmpv6::DestUnreachableCode};
use lb_common::{
    BACKEND_ACTIVE, BACKEND_F_REMOTE, Backend6, Frontend6, NAT_IN, Nat6Entry, Nat6Key, NatEvent,
    PROTO_TCP, PROTO_UDP, Reason, addr6, flow_hash6, map_names, nat, prog_slot,
};
use lb_testbed::Netns;
use lb_testbed::packet::*;
use lb_userspace::datapath::{explain::monotonic_ns, interface_index};

const XDP_TX: u32 = 3;

fn a6(s: &str) -> [u8; 16] {
    s.parse::<Ipv6Addr>().unwrap().octets()
}

/// Node A's address on eth0 (the NodePort address), the client's and node B's on its LAN.
const NODE6: &str = "fd00:200::1";
const CLIENT6: &str = "fd00:200::2";
const NODE_B6: &str = "fd00:200::3";
const NODE_B_MAC: [u8; 6] = [2, 0, 0, 0, 0, 3];
/// A backend on node B (routed via node B, whose MAC is known).
const REMOTE6: &str = "fd00:245:1::2";
/// A backend behind a next hop whose MAC is not known.
const UNRESOLVED6: &str = "fd00:246:1::2";
const NODE_PORT: u16 = 30080;
const CPORT: u16 = 40000;

fn mac(m: [u8; 6]) -> String {
    m.map(|b| format!("{b:02x}")).join(":")
}

/// A namespace with node A's eth0, IPv6 routes and neighbours; the ifindex of eth0.
struct Net {
    ns: Netns,
    eth0: u32,
}

impl Net {
    fn new() -> Self {
        let ns = Netns::new("nat6bed").unwrap();
        let ip = |args: &[&str]| {
            ns.ip(args).unwrap();
        };
        ip(&[
            "link",
            "add",
            "eth0",
            "address",
            &mac(NODE_MAC),
            "type",
            "veth",
            "peer",
            "name",
            "peer0",
        ]);
        ip(&["link", "set", "peer0", "up"]);
        ip(&["link", "set", "eth0", "up"]);
        ip(&[
            "addr",
            "add",
            &format!("{NODE6}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        ns.sysctl("net/ipv6/conf/all/forwarding", "1").unwrap();
        for (addr, m) in [(CLIENT6, CLIENT_MAC), (NODE_B6, NODE_B_MAC)] {
            ip(&[
                "neigh",
                "replace",
                addr,
                "lladdr",
                &mac(m),
                "dev",
                "eth0",
                "nud",
                "permanent",
            ]);
        }
        ip(&["-6", "route", "add", "fd00:245::/32", "via", NODE_B6]);
        ip(&["-6", "route", "add", "fd00:246::/32", "via", "fd00:200::4"]);
        let eth0 = ns.run(|| interface_index("eth0").unwrap()).unwrap();
        Net { ns, eth0 }
    }
}

fn remote6(addr: &str, port: u16, proto: u8) -> Backend6 {
    Backend6 {
        flags: BACKEND_F_REMOTE,
        ..Backend6::new(a6(addr), port, proto, BACKEND_ACTIVE)
    }
}

/// The NAT port of try `i` for a flow given in host order, host order.
fn nat_port(src: &str, sport: u16, dst: &str, dport: u16, proto: u8, i: u32) -> u16 {
    let hash = flow_hash6(
        addr6(a6(src)),
        addr6(a6(dst)),
        sport.to_be(),
        dport.to_be(),
        proto,
    );
    nat::port(hash, i)
}

/// `packet` as it leaves by XDP: new MAC addresses and one hop less (no header checksum).
fn hop(packet: Vec<u8>, src_mac: [u8; 6], dst_mac: [u8; 6]) -> Vec<u8> {
    let mut out = packet;
    out[0..6].copy_from_slice(&dst_mac);
    out[6..12].copy_from_slice(&src_mac);
    out[21] -= 1;
    out
}

/// The source port of an IPv6 TCP or UDP frame.
fn sport_of(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[54], frame[55]])
}

fn nat6_map(bed: &Bed) -> HashMap<MapData, Nat6Key, Nat6Entry> {
    let data = MapData::from_pin(bed.pin.join(map_names::NAT6)).unwrap();
    HashMap::try_from(Map::LruHashMap(data)).unwrap()
}

fn in_key(backend: &str, bport: u16, port: u16, proto: u8) -> Nat6Key {
    Nat6Key {
        saddr: addr6(a6(backend)),
        daddr: addr6(a6(NODE6)),
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

/// `frame` as if it arrived from node B.
fn from_node_b(mut frame: Vec<u8>) -> Vec<u8> {
    frame[0..6].copy_from_slice(&NODE_MAC);
    frame[6..12].copy_from_slice(&NODE_B_MAC);
    frame
}

#[test]
fn an_ipv6_flow_to_a_remote_backend_leaves_from_a_nat_port_and_its_replies_return() {
    let net = Net::new();
    let mut bed = Bed::new();
    let (node, client, backend) = (a6(NODE6), a6(CLIENT6), a6(REMOTE6));
    let fe = Frontend6::new(node, NODE_PORT, PROTO_TCP);
    bed.service6(1, fe, &[remote6(REMOTE6, 80, PROTO_TCP)], 0);
    let before = nat_events(&bed);

    let port = nat_port(CLIENT6, CPORT, NODE6, NODE_PORT, PROTO_TCP, 0);
    let syn = tcp6(client, CPORT, node, NODE_PORT, b"");
    let (action, out) = bed.xdp_in(&net.ns, net.eth0, &syn);
    assert_eq!(action, XDP_TX, "out of the interface it came in by");
    let want = rewritten6(&syn, Some((backend, 80)), Some((node, port)));
    assert_eq!(out, hop(want, NODE_MAC, NODE_B_MAC));

    // The backend's answer goes back to the client, from the frontend.
    let answer = from_node_b(tcp6_ack(backend, 80, node, port, b"answer"));
    let (action, out) = bed.xdp_in(&net.ns, net.eth0, &answer);
    assert_eq!(action, XDP_TX);
    let want = rewritten6(&answer, Some((client, CPORT)), Some((node, NODE_PORT)));
    assert_eq!(out, hop(want, NODE_MAC, CLIENT_MAC));

    // The next packets of the flow (established in conntrack) keep the port.
    let more = tcp6_ack(client, CPORT, node, NODE_PORT, b"more");
    let (_, out) = bed.xdp_in(&net.ns, net.eth0, &more);
    let want = rewritten6(&more, Some((backend, 80)), Some((node, port)));
    assert_eq!(out, hop(want, NODE_MAC, NODE_B_MAC));

    let entry = nat6_map(&bed)
        .get(&in_key(REMOTE6, 80, port, PROTO_TCP), 0)
        .unwrap();
    assert_eq!(
        (entry.addr, entry.port, entry.peer_addr, entry.peer_port),
        (addr6(client), CPORT.to_be(), addr6(node), NODE_PORT.to_be())
    );
    assert_eq!(
        nat_since(&bed, &before),
        [("nat_allocated", 1), ("nat_replies", 1), ("fwd_tx", 3)]
    );
    assert_eq!(bed.counters().service(1).unwrap().packets, 2);
    // A packet to a NAT port that no flow holds is not ours: passed untouched, counted.
    let stray = from_node_b(tcp6_ack(
        backend,
        80,
        node,
        port.wrapping_add(1).max(nat::PORT_MIN),
        b"x",
    ));
    let reasons = bed.reasons();
    assert_eq!(bed.xdp_in(&net.ns, net.eth0, &stray), (XDP_PASS, stray));
    assert_eq!(
        changed(Reason::NAMES, &reasons, &bed.reasons()),
        [("not_frontend", 1)]
    );
}

#[test]
fn two_ipv6_frontends_sharing_a_backend_never_share_a_port_even_from_one_client_port() {
    let net = Net::new();
    let mut bed = Bed::new();
    let (node, client, backend) = (a6(NODE6), a6(CLIENT6), a6(REMOTE6));
    let shared = bed.backend6(remote6(REMOTE6, 5353, PROTO_UDP));
    let fronts = [30053u16, 30054];
    for (i, &p) in fronts.iter().enumerate() {
        let fe = Frontend6::new(node, p, PROTO_UDP);
        bed.program6(i as u32 + 1, fe, &[shared], 0, 0);
    }
    let mut ports = Vec::new();
    for &p in &fronts {
        let q = udp6(client, CPORT, node, p, b"q");
        let (action, out) = bed.xdp_in(&net.ns, net.eth0, &q);
        assert_eq!(action, XDP_TX);
        let sport = sport_of(&out);
        let want = rewritten6(&q, Some((backend, 5353)), Some((node, sport)));
        assert_eq!(out, hop(want, NODE_MAC, NODE_B_MAC));
        ports.push(sport);
    }
    assert_ne!(ports[0], ports[1], "one backend, two flows: two ports");
    // Each reply returns from its own frontend.
    for (&p, &port) in fronts.iter().zip(&ports) {
        let answer = from_node_b(udp6(backend, 5353, node, port, b"a"));
        let (action, out) = bed.xdp_in(&net.ns, net.eth0, &answer);
        assert_eq!(action, XDP_TX);
        let want = rewritten6(&answer, Some((client, CPORT)), Some((node, p)));
        assert_eq!(out, hop(want, NODE_MAC, CLIENT_MAC));
    }
}

#[test]
fn taken_ipv6_nat_ports_are_skipped_and_a_flow_with_every_try_taken_is_dropped() {
    let net = Net::new();
    let mut bed = Bed::new();
    let (node, client) = (a6(NODE6), a6(CLIENT6));
    let fe = Frontend6::new(node, NODE_PORT, PROTO_TCP);
    bed.service6(1, fe, &[remote6(REMOTE6, 80, PROTO_TCP)], 0);
    let mut map = nat6_map(&bed);
    let now = monotonic_ns();
    let other = Nat6Entry {
        addr: addr6(a6("fd00:200::9")),
        port: 1234u16.to_be(),
        flags: 0,
        peer_addr: addr6(node),
        peer_port: 30999u16.to_be(),
        _pad: 0,
        last_seen_ns: now,
    };
    // The first two tries are held by live flows: the third is taken.
    let sport = 41000;
    for i in 0..2 {
        let p = nat_port(CLIENT6, sport, NODE6, NODE_PORT, PROTO_TCP, i);
        map.insert(in_key(REMOTE6, 80, p, PROTO_TCP), other, 0)
            .unwrap();
    }
    let before = nat_events(&bed);
    let syn = tcp6(client, sport, node, NODE_PORT, b"");
    let (action, out) = bed.xdp_in(&net.ns, net.eth0, &syn);
    assert_eq!(action, XDP_TX);
    assert_eq!(
        sport_of(&out),
        nat_port(CLIENT6, sport, NODE6, NODE_PORT, PROTO_TCP, 2)
    );
    assert_eq!(
        nat_since(&bed, &before),
        [("nat_allocated", 1), ("nat_port_taken", 2), ("fwd_tx", 1)]
    );

    // Every try held: the flow is dropped.
    let sport = 44000;
    for i in 0..nat::TRIES {
        let p = nat_port(CLIENT6, sport, NODE6, NODE_PORT, PROTO_TCP, i);
        map.insert(in_key(REMOTE6, 80, p, PROTO_TCP), other, 0)
            .unwrap();
    }
    let before = nat_events(&bed);
    let syn = tcp6(client, sport, node, NODE_PORT, b"");
    assert_eq!(bed.xdp_in(&net.ns, net.eth0, &syn).0, XDP_DROP);
    assert_eq!(
        nat_since(&bed, &before),
        [("nat_port_taken", nat::TRIES as u64), ("nat_exhausted", 1)]
    );
}

#[test]
fn an_unresolved_ipv6_next_hop_goes_to_the_kernel_translated() {
    let net = Net::new();
    let mut bed = Bed::new();
    let (node, client) = (a6(NODE6), a6(CLIENT6));
    let fe = Frontend6::new(node, 30001, PROTO_TCP);
    bed.service6(1, fe, &[remote6(UNRESOLVED6, 80, PROTO_TCP)], 0);
    let before = nat_events(&bed);
    // Translated, MACs and hop limit as they were: the kernel forwards it.
    let syn = tcp6(client, CPORT, node, 30001, b"");
    let port = nat_port(CLIENT6, CPORT, NODE6, 30001, PROTO_TCP, 0);
    let want = rewritten6(&syn, Some((a6(UNRESOLVED6), 80)), Some((node, port)));
    assert_eq!(bed.xdp_in(&net.ns, net.eth0, &syn), (XDP_PASS, want));
    assert_eq!(
        nat_since(&bed, &before),
        [("nat_allocated", 1), ("fwd_no_neigh", 1)]
    );
}

#[test]
fn without_the_nat6_program_a_remote_ipv6_flow_is_dropped_and_counted() {
    let net = Net::new();
    let mut bed = Bed::new();
    let (node, client) = (a6(NODE6), a6(CLIENT6));
    let fe = Frontend6::new(node, NODE_PORT, PROTO_TCP);
    bed.service6(1, fe, &[remote6(REMOTE6, 80, PROTO_TCP)], 0);
    let map = bed.dp.ebpf_mut().map_mut(map_names::PROGRAMS).unwrap();
    ProgramArray::try_from(map)
        .unwrap()
        .clear_index(&prog_slot::XDP_NAT6)
        .unwrap();
    let before = bed.reasons();
    let syn = tcp6(client, CPORT, node, NODE_PORT, b"");
    assert_eq!(bed.xdp_in(&net.ns, net.eth0, &syn).0, XDP_DROP);
    assert_eq!(
        changed(Reason::NAMES, &before, &bed.reasons()),
        [("nat6_program_missing", 1)]
    );
}

/// An IPv6 packet (no Ethernet) of UDP or TCP from `src` to `dst`, as it was sent.
fn quoted6(proto: u8, src: ([u8; 16], u16), dst: ([u8; 16], u16), hops: u8) -> Vec<u8> {
    quoted_over(PacketBuilder::ipv6(src.0, dst.0, hops), proto, src.1, dst.1)
}

/// An ICMPv6 error of `kind` from `from` to `to` quoting `quote`, checksum by etherparse.
fn icmp6(
    macs: ([u8; 6], [u8; 6]),
    from: [u8; 16],
    to: [u8; 16],
    hops: u8,
    kind: Icmpv6Type,
    quote: &[u8],
) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv6(from, to, hops)
        .icmpv6(kind)
        .write(&mut out, quote)
        .unwrap();
    out
}

#[test]
fn icmpv6_errors_about_a_nated_flow_reach_the_client_about_the_frontend() {
    let net = Net::new();
    let mut bed = Bed::new();
    let (node, client, backend) = (a6(NODE6), a6(CLIENT6), a6(REMOTE6));
    let fe = Frontend6::new(node, 30053, PROTO_UDP);
    bed.service6(1, fe, &[remote6(REMOTE6, 5353, PROTO_UDP)], 0);
    let fe = Frontend6::new(node, NODE_PORT, PROTO_TCP);
    bed.service6(2, fe, &[remote6(REMOTE6, 80, PROTO_TCP)], 0);
    let q = udp6(client, CPORT, node, 30053, b"question");
    assert_eq!(bed.xdp_in(&net.ns, net.eth0, &q).0, XDP_TX);
    let udp_port = nat_port(CLIENT6, CPORT, NODE6, 30053, PROTO_UDP, 0);
    let syn = tcp6(client, CPORT, node, NODE_PORT, b"");
    assert_eq!(bed.xdp_in(&net.ns, net.eth0, &syn).0, XDP_TX);
    let tcp_port = nat_port(CLIENT6, CPORT, NODE6, NODE_PORT, PROTO_TCP, 0);
    let before = nat_events(&bed);

    // Port unreachable from the backend itself: the outer source becomes the frontend.
    let unreachable = Icmpv6Type::DestinationUnreachable(DestUnreachableCode::Port);
    let sent = quoted6(PROTO_UDP, (node, udp_port), (backend, 5353), 63);
    let error = icmp6(
        (NODE_B_MAC, NODE_MAC),
        backend,
        node,
        64,
        unreachable,
        &sent,
    );
    let (action, out) = bed.xdp_in(&net.ns, net.eth0, &error);
    assert_eq!(action, XDP_TX);
    let about = quoted6(PROTO_UDP, (client, CPORT), (node, 30053), 63);
    let want = icmp6(
        (NODE_MAC, CLIENT_MAC),
        node,
        client,
        63,
        unreachable,
        &about,
    );
    assert_eq!(out, want);

    // Packet too big from a router on the way: its address stays.
    let router = a6("fd00:200::fe");
    let too_big = Icmpv6Type::PacketTooBig { mtu: 1400 };
    let sent = quoted6(PROTO_TCP, (node, tcp_port), (backend, 80), 63);
    let error = icmp6((NODE_B_MAC, NODE_MAC), router, node, 64, too_big, &sent);
    let (action, out) = bed.xdp_in(&net.ns, net.eth0, &error);
    assert_eq!(action, XDP_TX);
    let about = quoted6(PROTO_TCP, (client, CPORT), (node, NODE_PORT), 63);
    let want = icmp6((NODE_MAC, CLIENT_MAC), router, client, 63, too_big, &about);
    assert_eq!(out, want);
    assert_eq!(nat_since(&bed, &before), [("fwd_tx", 2), ("icmp_nat", 2)]);

    // An error about a flow nobody translated is not ours: untouched, counted.
    let unreachable = Icmpv6Type::DestinationUnreachable(DestUnreachableCode::Port);
    let sent = quoted6(PROTO_UDP, (node, 33333), (backend, 5353), 63);
    let error = icmp6(
        (NODE_B_MAC, NODE_MAC),
        backend,
        node,
        64,
        unreachable,
        &sent,
    );
    let reasons = bed.reasons();
    assert_eq!(bed.xdp_in(&net.ns, net.eth0, &error), (XDP_PASS, error));
    assert_eq!(
        changed(Reason::NAMES, &reasons, &bed.reasons()),
        [("not_tcp_udp", 1)]
    );
}
