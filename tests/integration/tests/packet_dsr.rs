//! Packet tests of direct server return (`lb_common::SERVICE_F_DSR`, dsr.rs): the real XDP
//! and TC programs through BPF_PROG_TEST_RUN, from a thread inside a namespace whose routes
//! and neighbours the FIB lookups see. Node A carries a flow's packets to its backend on
//! node B; node B unwraps them and rewrites the backend's replies. Every expected carrier is
//! written here from RFC 8926's layout (Geneve) and etherparse's headers and checksums, not
//! from the program's constants.

use std::net::Ipv6Addr;

use etherparse::{
    Icmpv4Type, Icmpv6Type, IpNumber, Ipv4Header, Ipv6Header, PacketBuilder, UdpHeader,
    icmpv4::DestUnreachableHeader,
};
use lb_common::{
    BACKEND_ACTIVE, BACKEND_F_REMOTE, Backend6, Frontend6, NatEvent, PROTO_TCP, PROTO_UDP,
    SERVICE_F_DSR, SERVICE_F_EXTERNAL, addr6, flow_hash6,
};
use lb_testbed::Netns;
use lb_testbed::packet::*;
use lb_userspace::datapath::interface_index;

const XDP_DROP: u32 = 1;
const XDP_TX: u32 = 3;
const TC_ACT_OK: u32 = 0;

/// Node A (the NodePort address) and node B, on the LAN with the client.
const NODE: [u8; 4] = [10, 200, 0, 1];
const NODE_B_MAC: [u8; 6] = [2, 0, 0, 0, 0, 3];
/// A backend on node B (routed via node B).
const REMOTE: [u8; 4] = [10, 245, 1, 2];
const NODE6: &str = "fd00:200::1";
const CLIENT6: &str = "fd00:200::2";
const NODE_B6: &str = "fd00:200::3";
const REMOTE6: &str = "fd00:245:1::2";
const NODE_PORT: u16 = 30080;
const CPORT: u16 = 40000;
const DSR: u32 = SERVICE_F_DSR | SERVICE_F_EXTERNAL;

fn a6(s: &str) -> [u8; 16] {
    s.parse::<Ipv6Addr>().unwrap().octets()
}

fn mac(m: [u8; 6]) -> String {
    m.map(|b| format!("{b:02x}")).join(":")
}

/// Node A's namespace: eth0 (MTU 1500) with both families' addresses, node B's neighbour
/// entries and the routes to node B's pods through it; the ifindex of eth0.
struct Net {
    ns: Netns,
    eth0: u32,
}

impl Net {
    fn new() -> Self {
        let ns = Netns::new("dsrbed").unwrap();
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
        ns.addr("eth0", "10.200.0.1/24").unwrap();
        ip(&[
            "addr",
            "add",
            &format!("{NODE6}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        ns.sysctl("net/ipv4/ip_forward", "1").unwrap();
        ns.sysctl("net/ipv6/conf/all/forwarding", "1").unwrap();
        for addr in ["10.200.0.3", NODE_B6] {
            ip(&[
                "neigh",
                "replace",
                addr,
                "lladdr",
                &mac(NODE_B_MAC),
                "dev",
                "eth0",
                "nud",
                "permanent",
            ]);
        }
        ip(&["route", "add", "10.245.0.0/16", "via", "10.200.0.3"]);
        ip(&["-6", "route", "add", "fd00:245::/32", "via", NODE_B6]);
        let eth0 = ns.run(|| interface_index("eth0").unwrap()).unwrap();
        Net { ns, eth0 }
    }
}

/// RFC 8926: version 0 and the options' length (3 or 6 words), C (critical option present),
/// the protocol (an ethertype), VNI 0; one option of class 0xff4c, type 0x81 (critical)
/// and the data's length in words: the frontend's port, two zero bytes, its address.
fn geneve(ether_type: u16, frontend: &[u8], port: u16) -> Vec<u8> {
    let data_words = (4 + frontend.len()) / 4;
    let mut out = vec![(1 + data_words) as u8, 0x40];
    out.extend_from_slice(&ether_type.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0, 0xff, 0x4c, 0x81, data_words as u8]);
    out.extend_from_slice(&port.to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(frontend);
    out
}

/// The carrier's UDP source port for a flow hash: 49152 + its low 14 bits.
fn carrier_port(hash: u32) -> u16 {
    49152 + (hash & 0x3fff) as u16
}

/// The IPv4 carrier node A sends to `backend` for `inner` (an IPv4 packet, no Ethernet):
/// TTL 63 (64, one hop), don't fragment, UDP checksum 0.
fn carrier4(inner: &[u8], backend: [u8; 4], frontend: ([u8; 4], u16), hash: u32) -> Vec<u8> {
    let mut payload = geneve(0x0800, &frontend.0, frontend.1);
    payload.extend_from_slice(inner);
    let udp = UdpHeader {
        source_port: carrier_port(hash),
        destination_port: 6081,
        length: (8 + payload.len()) as u16,
        checksum: 0,
    };
    let mut ip = Ipv4Header::new(udp.length, 63, IpNumber::UDP, NODE, backend).unwrap();
    ip.dont_fragment = true;
    ip.header_checksum = ip.calc_header_checksum();
    let mut out = Vec::new();
    out.extend_from_slice(&NODE_B_MAC);
    out.extend_from_slice(&NODE_MAC);
    out.extend_from_slice(&0x0800u16.to_be_bytes());
    ip.write(&mut out).unwrap();
    udp.write(&mut out).unwrap();
    out.extend_from_slice(&payload);
    out
}

/// The IPv6 carrier: hop limit 63, the flow label from the flow hash, the UDP checksum
/// computed by etherparse over everything.
fn carrier6(inner: &[u8], backend: [u8; 16], frontend: ([u8; 16], u16), hash: u32) -> Vec<u8> {
    let mut payload = geneve(0x86dd, &frontend.0, frontend.1);
    payload.extend_from_slice(inner);
    let ip = Ipv6Header {
        traffic_class: 0,
        flow_label: (hash & 0xf_ffff).try_into().unwrap(),
        payload_length: (8 + payload.len()) as u16,
        next_header: IpNumber::UDP,
        hop_limit: 63,
        source: a6(NODE6),
        destination: backend,
    };
    let udp = UdpHeader::with_ipv6_checksum(carrier_port(hash), 6081, &ip, &payload).unwrap();
    let mut out = Vec::new();
    out.extend_from_slice(&NODE_B_MAC);
    out.extend_from_slice(&NODE_MAC);
    out.extend_from_slice(&0x86ddu16.to_be_bytes());
    ip.write(&mut out).unwrap();
    udp.write(&mut out).unwrap();
    out.extend_from_slice(&payload);
    out
}

fn nat_events(bed: &Bed) -> Vec<u64> {
    bed.counters().nat_events().unwrap()
}

fn nat_since(bed: &Bed, before: &[u64]) -> Vec<(&'static str, u64)> {
    changed(NatEvent::NAMES, before, &nat_events(bed))
}

/// A frame as node B's XDP passes it on after unwrapping: the carrier's Ethernet header and
/// the carried packet.
fn unwrapped(carrier: &[u8], inner: &[u8]) -> Vec<u8> {
    let mut out = carrier[..14].to_vec();
    out.extend_from_slice(inner);
    out
}

#[test]
fn a_flow_to_a_remote_backend_is_carried_there_with_the_client_address_and_answered_from_there() {
    let net = Net::new();
    let mut node_a = Bed::new();
    let tcp_fe = frontend(NODE, NODE_PORT, PROTO_TCP);
    let udp_fe = frontend(NODE, NODE_PORT, PROTO_UDP);
    node_a.service(
        1,
        tcp_fe,
        &[backend(REMOTE, 80, PROTO_TCP).with_flags(BACKEND_F_REMOTE)],
        DSR,
    );
    node_a.service(
        2,
        udp_fe,
        &[backend(REMOTE, 53, PROTO_UDP).with_flags(BACKEND_F_REMOTE)],
        DSR,
    );
    let before = nat_events(&node_a);

    // Node A: translated to the backend (the client's address kept), then carried to it.
    let mut carriers = Vec::new();
    for (proto, port, packets) in [
        (
            PROTO_TCP,
            80,
            vec![
                tcp(CLIENT, CPORT, NODE, NODE_PORT, b""),
                tcp_ack(CLIENT, CPORT, NODE, NODE_PORT, b"more"),
            ],
        ),
        (
            PROTO_UDP,
            53,
            vec![udp(CLIENT, CPORT, NODE, NODE_PORT, b"question")],
        ),
    ] {
        let hash = hash(CLIENT, CPORT, NODE, NODE_PORT, proto);
        for packet in packets {
            let (action, out) = node_a.xdp_in(&net.ns, net.eth0, &packet);
            assert_eq!(action, XDP_TX, "out of the interface it came in by");
            let inner = rewritten(&packet, Some((REMOTE, port)), None)[14..].to_vec();
            let want = carrier4(&inner, REMOTE, (NODE, NODE_PORT), hash);
            assert_eq!(out, want);
            carriers.push((out, inner));
        }
    }
    // No source NAT, and no reply entry here: the replies never come back this way.
    assert_eq!(
        nat_since(&node_a, &before),
        [("fwd_tx", 3), ("dsr_sent", 3)]
    );
    let reply_key = lb_common::Ct4Key {
        dir: lb_common::CT_REPLY,
        ..ct_key(REMOTE, 80, CLIENT, CPORT, PROTO_TCP)
    };
    assert!(node_a.conntrack(&reply_key).is_none());

    // Node B (no Service of its own needed): unwrapped and passed on to the backend, with
    // the flow's reply entry recorded.
    let mut node_b = Bed::new();
    let before = nat_events(&node_b);
    for (carrier, inner) in &carriers {
        let (action, out) = node_b.xdp(carrier);
        assert_eq!(action, XDP_PASS);
        assert_eq!(out, unwrapped(carrier, inner));
    }
    assert_eq!(nat_since(&node_b, &before), [("dsr_received", 3)]);
    // The backend's replies leave node B from the frontend, straight to the client.
    for (proto, port) in [(PROTO_TCP, 80), (PROTO_UDP, 53)] {
        let answer = if proto == PROTO_TCP {
            tcp_ack(REMOTE, port, CLIENT, CPORT, b"answer")
        } else {
            udp(REMOTE, port, CLIENT, CPORT, b"answer")
        };
        let (action, out) = node_b.tc(&answer);
        assert_eq!(action, TC_ACT_OK);
        assert_eq!(
            out,
            rewritten(&answer, None, Some((NODE, NODE_PORT))),
            "{proto}"
        );
    }

    // Not ours: a Geneve packet without lb's option is passed untouched.
    let (mut foreign, _) = carriers[0].clone();
    foreign[14 + 20 + 8 + 8] = 0x01;
    assert_eq!(node_b.xdp(&foreign), (XDP_PASS, foreign.clone()));
    // A carrier whose packet is addressed elsewhere than the carrier is dropped, counted.
    let elsewhere = rewritten(
        &tcp(CLIENT, CPORT, NODE, NODE_PORT, b""),
        Some(([10, 245, 9, 9], 80)),
        None,
    );
    let bad = carrier4(&elsewhere[14..], REMOTE, (NODE, NODE_PORT), 7);
    let before = nat_events(&node_b);
    assert_eq!(node_b.xdp(&bad).0, XDP_DROP);
    assert_eq!(nat_since(&node_b, &before), [("dsr_invalid", 1)]);
}

#[test]
fn a_packet_too_large_for_the_carrier_is_answered_with_the_mtu_left_for_it() {
    let net = Net::new();
    let mut bed = Bed::new();
    let fe = frontend(NODE, NODE_PORT, PROTO_TCP);
    bed.service(
        1,
        fe,
        &[backend(REMOTE, 80, PROTO_TCP).with_flags(BACKEND_F_REMOTE)],
        DSR,
    );
    // 1500 bytes of IPv4 on a 1500-byte MTU: no room for the carrier's 48.
    let big = tcp_ack(CLIENT, CPORT, NODE, NODE_PORT, &[7; 1460]);
    let before = nat_events(&bed);
    let (action, out) = bed.xdp_in(&net.ns, net.eth0, &big);
    assert_eq!(action, XDP_TX, "back to the client");
    let mut want = Vec::new();
    PacketBuilder::ethernet2(NODE_MAC, CLIENT_MAC)
        .ipv4(NODE, CLIENT, 64)
        .icmpv4(Icmpv4Type::DestinationUnreachable(
            DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1452 },
        ))
        .write(&mut want, &big[14..14 + 20 + 8])
        .unwrap();
    // etherparse sets don't fragment; the reply's IP header has it clear.
    assert_eq!(out[14 + 20..], want[14 + 20..]);
    assert_eq!((out[14 + 12..14 + 20]).to_vec(), [NODE, CLIENT].concat());
    assert_eq!(nat_since(&bed, &before), [("dsr_too_big", 1)]);
    // One that fits is carried.
    let fits = tcp_ack(CLIENT, CPORT, NODE, NODE_PORT, &[7; 1412]);
    assert_eq!(bed.xdp_in(&net.ns, net.eth0, &fits).0, XDP_TX);
    assert_eq!(
        bed.counters().nat_events().unwrap()[NatEvent::DsrSent as usize],
        1
    );
}

fn remote6(addr: &str, port: u16, proto: u8) -> Backend6 {
    Backend6 {
        flags: BACKEND_F_REMOTE,
        ..Backend6::new(a6(addr), port, proto, BACKEND_ACTIVE)
    }
}

#[test]
fn an_ipv6_flow_to_a_remote_backend_is_carried_there_and_answered_from_there() {
    let net = Net::new();
    let mut node_a = Bed::new();
    let (node, client, remote) = (a6(NODE6), a6(CLIENT6), a6(REMOTE6));
    for (id, proto, port) in [(1, PROTO_TCP, 80), (2, PROTO_UDP, 53)] {
        let b = node_a.backend6(remote6(REMOTE6, port, proto));
        node_a.program6(id, Frontend6::new(node, NODE_PORT, proto), &[b], DSR, 0);
    }
    let before = nat_events(&node_a);
    let mut carriers = Vec::new();
    for (proto, port, packet) in [
        (PROTO_TCP, 80, tcp6(client, CPORT, node, NODE_PORT, b"")),
        (
            PROTO_UDP,
            53,
            udp6(client, CPORT, node, NODE_PORT, b"question"),
        ),
    ] {
        let hash = flow_hash6(
            addr6(client),
            addr6(node),
            CPORT.to_be(),
            NODE_PORT.to_be(),
            proto,
        );
        let (action, out) = node_a.xdp_in(&net.ns, net.eth0, &packet);
        assert_eq!(action, XDP_TX);
        let inner = rewritten6(&packet, Some((remote, port)), None)[14..].to_vec();
        assert_eq!(out, carrier6(&inner, remote, (node, NODE_PORT), hash));
        carriers.push((out, inner));
    }
    assert_eq!(
        nat_since(&node_a, &before),
        [("fwd_tx", 2), ("dsr_sent", 2)]
    );

    let mut node_b = Bed::new();
    for (carrier, inner) in &carriers {
        assert_eq!(node_b.xdp(carrier), (XDP_PASS, unwrapped(carrier, inner)));
    }
    let answer = udp6(remote, 53, client, CPORT, b"answer");
    let (action, out) = node_b.tc(&answer);
    assert_eq!(action, TC_ACT_OK);
    assert_eq!(out, rewritten6(&answer, None, Some((node, NODE_PORT))));

    // Too large for the carrier's 80 bytes: packet too big, with the MTU left.
    let big = udp6(client, CPORT, node, NODE_PORT, &[7; 1452]);
    let (action, out) = node_a.xdp_in(&net.ns, net.eth0, &big);
    assert_eq!(action, XDP_TX);
    let mut want = Vec::new();
    PacketBuilder::ethernet2(NODE_MAC, CLIENT_MAC)
        .ipv6(node, client, 64)
        .icmpv6(Icmpv6Type::PacketTooBig { mtu: 1420 })
        .write(&mut want, &big[14..14 + 40 + 8])
        .unwrap();
    assert_eq!(out, want);
}
