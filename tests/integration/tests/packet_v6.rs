//! IPv6 packet tests: the real programs through BPF_PROG_TEST_RUN (see `bed`). IPv6 frames
//! reach `lb_xdp_ingress6` by the tail call of `lb_xdp_ingress` (the program the tests run,
//! as the interface would), through the program array the agent's loader fills. Expected
//! packets are built by etherparse, which computes the checksums from scratch.

use lb_userspace::datapath::Pins;
use std::net::{Ipv6Addr, SocketAddr};

use aya::maps::ProgramArray;
use etherparse::{
    Icmpv6Type, PacketBuilder,
    icmpv6::{DestUnreachableCode, TimeExceededCode},
};
use lb_common::{
    BACKEND_ACTIVE, Backend6, CT_REPLY, Event, Frontend6, HAIRPIN_ADDR6, NatEvent, PROTO_TCP,
    PROTO_UDP, Reason, SERVICE_F_EXTERNAL, SERVICE_F_SHORT_CIRCUIT, SERVICE_F_SOURCE_RANGES, addr6,
    map_names, octets6, prog_slot, tc_prog_slot,
};
use lb_testbed::packet::*;
use lb_userspace::{
    datapath::{
        Datapath,
        explain::{Decision, Explainer, Flow, monotonic_ns},
        maps::DatapathMaps as _,
    },
    model::Ipv6Cidr,
    model::Protocol,
};

fn a6(s: &str) -> [u8; 16] {
    s.parse::<Ipv6Addr>().unwrap().octets()
}

fn client6() -> [u8; 16] {
    a6("fd00:c::2")
}

fn cluster_ip6() -> [u8; 16] {
    a6("fd00:96::10")
}

fn pod6(i: u16) -> [u8; 16] {
    Ipv6Addr::new(0xfd00, 0x244, i, 0, 0, 0, 0, 2).octets()
}

fn frontend6(addr: [u8; 16], port: u16, proto: u8) -> Frontend6 {
    Frontend6::new(addr, port, proto)
}

fn backend6(addr: [u8; 16], port: u16, proto: u8) -> Backend6 {
    Backend6::new(addr, port, proto, BACKEND_ACTIVE)
}

/// The reasons counted between `before` and now, by name.
fn counted(bed: &Bed, before: &[u64]) -> Vec<(&'static str, u64)> {
    changed(Reason::NAMES, before, &bed.reasons())
}

/// Each case's packet passes XDP bit for bit and is counted once, under its reason; no
/// conntrack entry is made.
fn passed_and_counted<const N: usize>(bed: &mut Bed, cases: [(&str, Vec<u8>, Reason); N]) {
    for (name, input, why) in cases {
        let before = bed.reasons();
        assert_eq!(bed.xdp(&input), (XDP_PASS, input.clone()), "{name}");
        assert_eq!(counted(bed, &before), [(why.name(), 1)], "{name}");
    }
    assert_eq!(bed.counters().conntrack().unwrap().entries, 0);
}

/// A TCP service at the ClusterIP's port 8080 and a UDP one at 53, two pods each.
fn two_services(bed: &mut Bed) -> (Vec<u32>, Vec<u32>) {
    let fe = frontend6(cluster_ip6(), 8080, PROTO_TCP);
    let tcp = bed.service6(
        1,
        fe,
        &[
            backend6(pod6(1), 80, PROTO_TCP),
            backend6(pod6(2), 80, PROTO_TCP),
        ],
        0,
    );
    let fe = frontend6(cluster_ip6(), 53, PROTO_UDP);
    let udp = bed.service6(
        2,
        fe,
        &[
            backend6(pod6(1), 5353, PROTO_UDP),
            backend6(pod6(2), 5353, PROTO_UDP),
        ],
        0,
    );
    (tcp, udp)
}

#[test]
fn tcp_and_udp_to_an_ipv6_cluster_ip_are_translated_to_the_selected_backend() {
    let mut bed = Bed::new();
    two_services(&mut bed);
    let (client, vip) = (client6(), cluster_ip6());
    let mut used = std::collections::BTreeSet::new();
    for sport in 40000..40016 {
        let input = tcp6(client, sport, vip, 8080, b"GET / HTTP/1.1\r\n\r\n");
        let id = bed.maglev_pick6(1, client, sport, vip, 8080, PROTO_TCP);
        used.insert(id);
        let (action, out) = bed.xdp(&input);
        assert_eq!(action, XDP_PASS, "TCP from {sport}");
        assert_eq!(
            out,
            rewritten6(&input, Some((bed.addr6(id), 80)), None),
            "TCP from {sport}"
        );

        let input = udp6(client, sport, vip, 53, b"query");
        let id = bed.maglev_pick6(2, client, sport, vip, 53, PROTO_UDP);
        let (action, out) = bed.xdp(&input);
        assert_eq!(action, XDP_PASS, "UDP from {sport}");
        assert_eq!(
            out,
            rewritten6(&input, Some((bed.addr6(id), 5353)), None),
            "UDP from {sport}"
        );
    }
    assert_eq!(used.len(), 2, "both backends are used");
    let counters = bed.counters();
    let stats = counters.service(1).unwrap();
    assert_eq!((stats.packets, stats.new_flows), (16, 16));
    let len = tcp6(client, 1, vip, 1, b"GET / HTTP/1.1\r\n\r\n").len() as u64;
    assert_eq!(stats.bytes, 16 * len);
    assert_eq!(counters.service(2).unwrap().new_flows, 16);
    assert_eq!(
        bed.reasons().iter().sum::<u64>(),
        0,
        "nothing passed or dropped"
    );
    let events = bed.events();
    assert_eq!(events[Event::SelectMaglev as usize], 32);
    assert_eq!(events[Event::CtInserts as usize], 64);
    // IPv6 entries count as conntrack entries (the insert counter is shared): none evicted.
    let counters = bed.counters();
    let ct = counters.conntrack().unwrap();
    assert_eq!((ct.entries, ct.evictions), (64, 0));
    let conntrack = &counters.tables(&ct).unwrap()[0];
    assert_eq!((conntrack.entries, conntrack.evictions), (64, 0));
    // Both directions of a flow are in the IPv6 conntrack.
    let key = ct6_key(client, 40000, vip, 8080, PROTO_TCP);
    let entry = bed.conntrack6(&key).expect("forward entry");
    let pod = bed.backends6[&entry.backend_id];
    assert_eq!((entry.service_id, entry.nat_addr), (1, pod.addr));
    let reply = lb_common::Ct6Key {
        saddr: pod.addr,
        daddr: key.saddr,
        sport: pod.port,
        dport: key.sport,
        dir: CT_REPLY,
        ..key
    };
    let entry = bed.conntrack6(&reply).expect("reply entry");
    assert_eq!(
        (entry.nat_addr, entry.nat_port),
        (addr6(vip), 8080u16.to_be())
    );
}

#[test]
fn an_established_ipv6_flow_keeps_its_backend() {
    let mut bed = Bed::new();
    let (ids, _) = two_services(&mut bed);
    let (client, vip) = (client6(), cluster_ip6());
    let syn = tcp6(client, 40000, vip, 8080, b"");
    let first = bed.maglev_pick6(1, client, 40000, vip, 8080, PROTO_TCP);
    let other = *ids.iter().find(|&&id| id != first).unwrap();
    assert_eq!(
        bed.xdp(&syn).1,
        rewritten6(&syn, Some((bed.addr6(first), 80)), None)
    );
    // New flows now go to the other backend only; the established flow stays.
    let fe = frontend6(vip, 8080, PROTO_TCP);
    bed.program6(1, fe, &[other], 0, 0);
    let selections = bed.events()[Event::SelectMaglev as usize];
    for i in 0..3 {
        let ack = tcp6_ack(client, 40000, vip, 8080, b"data");
        let (action, out) = bed.xdp(&ack);
        assert_eq!(action, XDP_PASS);
        assert_eq!(
            out,
            rewritten6(&ack, Some((bed.addr6(first), 80)), None),
            "packet {i} of the established flow"
        );
    }
    assert_eq!(
        bed.events()[Event::SelectMaglev as usize],
        selections,
        "conntrack decided"
    );
    let syn = tcp6(client, 40001, vip, 8080, b"");
    assert_eq!(
        bed.xdp(&syn).1,
        rewritten6(&syn, Some((bed.addr6(other), 80)), None),
        "a new flow uses the new table"
    );
}

#[test]
fn ipv6_replies_leave_from_the_frontend() {
    let mut bed = Bed::new();
    two_services(&mut bed);
    let (client, vip) = (client6(), cluster_ip6());

    let syn = tcp6(client, 40000, vip, 8080, b"");
    let pod = bed.addr6(bed.maglev_pick6(1, client, 40000, vip, 8080, PROTO_TCP));
    assert_eq!(bed.xdp(&syn).0, XDP_PASS);
    let reply = tcp6_ack(pod, 80, client, 40000, b"HTTP/1.1 200 OK\r\n\r\n");
    let (action, out) = bed.tc(&reply);
    assert_eq!(action, TC_ACT_OK);
    assert_eq!(
        out,
        rewritten6(&reply, None, Some((vip, 8080))),
        "TCP reply"
    );

    let query = udp6(client, 40000, vip, 53, b"query");
    let pod = bed.addr6(bed.maglev_pick6(2, client, 40000, vip, 53, PROTO_UDP));
    assert_eq!(bed.xdp(&query).0, XDP_PASS);
    let answer = udp6(pod, 5353, client, 40000, b"answer");
    let (action, out) = bed.tc(&answer);
    assert_eq!(action, TC_ACT_OK);
    assert_eq!(out, rewritten6(&answer, None, Some((vip, 53))), "UDP reply");

    // A packet that is no reply of a translated flow leaves untouched, not counted.
    let before = bed.reasons();
    let other = tcp6_ack(pod, 81, client, 40000, b"x");
    assert_eq!(bed.tc(&other), (TC_ACT_OK, other.clone()));
    let other = tcp6_ack(pod6(9), 80, client, 40000, b"x");
    assert_eq!(bed.tc(&other), (TC_ACT_OK, other.clone()));
    assert_eq!(counted(&bed, &before), []);
}

#[test]
fn ipv6_packets_not_for_a_frontend_pass_bit_for_bit() {
    let mut bed = Bed::new();
    two_services(&mut bed);
    // An IPv4 frontend, whose IPv4-mapped IPv6 address is not one.
    bed.service(
        3,
        frontend([10, 96, 0, 10], 8080, PROTO_TCP),
        &[backend(POD1, 80, PROTO_TCP)],
        0,
    );
    let (client, vip) = (client6(), cluster_ip6());
    let icmp = {
        let builder = etherparse::PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
            .ipv6(client, vip, 64)
            .icmpv6_echo_request(1, 1);
        let mut out = Vec::new();
        builder.write(&mut out, b"ping").unwrap();
        out
    };
    let cases = [
        (
            "other port",
            tcp6(client, 1, vip, 8081, b""),
            Reason::NotFrontend,
        ),
        (
            "other address",
            tcp6(client, 1, a6("fd00:96::11"), 8080, b""),
            Reason::NotFrontend,
        ),
        (
            "UDP to a TCP frontend",
            udp6(client, 1, vip, 8080, b""),
            Reason::NotFrontend,
        ),
        (
            "the IPv4-mapped address of an IPv4 frontend",
            tcp6(client, 1, a6("::ffff:10.96.0.10"), 8080, b""),
            Reason::NotFrontend,
        ),
        ("ICMPv6 to the frontend address", icmp, Reason::NotTcpUdp),
    ];
    passed_and_counted(&mut bed, cases);
}

/// `packet` (Ethernet, IPv6, then TCP or UDP) with the extension header `ext` (its first
/// byte, the next header, is filled in) inserted after the fixed header as `next`.
fn with_extension(packet: &[u8], next: u8, ext: &[u8]) -> Vec<u8> {
    const IP: usize = 14;
    let mut out = packet[..IP + 40].to_vec();
    let transport = out[IP + 6];
    out[IP + 6] = next;
    let len = u16::from_be_bytes([out[IP + 4], out[IP + 5]]) + ext.len() as u16;
    out[IP + 4..IP + 6].copy_from_slice(&len.to_be_bytes());
    out.push(transport);
    out.extend_from_slice(&ext[1..]);
    out.extend_from_slice(&packet[IP + 40..]);
    out
}

#[test]
fn ipv6_extension_headers_and_fragments_pass_untouched_and_counted() {
    let mut bed = Bed::new();
    two_services(&mut bed);
    let (client, vip) = (client6(), cluster_ip6());
    let syn = tcp6(client, 40000, vip, 8080, b"");
    let query = udp6(client, 40000, vip, 53, b"query");
    // First fragment (offset 0, more fragments), id 42; a later one (offset 8 octets).
    let first = [0, 0, 0x00, 0x01, 0, 0, 0, 42];
    let later = [0, 0, 0x00, 0x40, 0, 0, 0, 42];
    let hop_by_hop = [0, 0, 1, 4, 0, 0, 0, 0]; // PadN
    let destination = [0, 0, 1, 4, 0, 0, 0, 0];
    let routing = [0, 0, 4, 0, 0, 0, 0, 0]; // type 4, no segments left
    let cases = [
        ("first fragment of TCP", with_extension(&syn, 44, &first)),
        ("later fragment of TCP", with_extension(&syn, 44, &later)),
        ("first fragment of UDP", with_extension(&query, 44, &first)),
        ("hop-by-hop options", with_extension(&syn, 0, &hop_by_hop)),
        (
            "destination options",
            with_extension(&query, 60, &destination),
        ),
        ("routing header", with_extension(&syn, 43, &routing)),
    ];
    let cases = cases.map(|(name, input)| (name, input, Reason::Ipv6Extension));
    passed_and_counted(&mut bed, cases);
}

#[test]
fn malformed_ipv6_packets_pass_untouched_and_counted_by_reason() {
    let mut bed = Bed::new();
    two_services(&mut bed);
    let (client, vip) = (client6(), cluster_ip6());
    let syn = tcp6(client, 40000, vip, 8080, b"payload");
    let short_ip = syn[..14 + 30].to_vec();
    let mut version4 = syn.clone();
    version4[14] = 0x40;
    let mut beyond = syn.clone();
    let len = u16::from_be_bytes([beyond[18], beyond[19]]) + 1;
    beyond[18..20].copy_from_slice(&len.to_be_bytes());
    let mut jumbo = syn.clone();
    jumbo[18..20].copy_from_slice(&[0, 0]);
    let mut below_header = syn.clone();
    below_header[18..20].copy_from_slice(&10u16.to_be_bytes());
    // The TCP header cut short, with a payload length that says so.
    let mut short_l4 = syn[..14 + 40 + 10].to_vec();
    short_l4[18..20].copy_from_slice(&10u16.to_be_bytes());
    let cases = [
        ("shorter than the IPv6 header", short_ip, Reason::ShortIpv6),
        (
            "version 4 in an IPv6 frame",
            version4,
            Reason::BadIpv6Header,
        ),
        (
            "payload length beyond the bytes",
            beyond,
            Reason::BadIpv6Length,
        ),
        ("payload length 0 (jumbogram)", jumbo, Reason::BadIpv6Length),
        (
            "payload shorter than TCP's header",
            below_header,
            Reason::BadIpv6Length,
        ),
        ("TCP header cut short", short_l4, Reason::ShortL4),
    ];
    passed_and_counted(&mut bed, cases);
}

#[test]
fn an_ipv6_udp_checksum_of_zero_is_passed_and_counted() {
    let mut bed = Bed::new();
    two_services(&mut bed);
    let mut query = udp6(client6(), 40000, cluster_ip6(), 53, b"query");
    let check = 14 + 40 + 6;
    query[check..check + 2].fill(0);
    let before = bed.reasons();
    assert_eq!(bed.xdp(&query), (XDP_PASS, query.clone()));
    assert_eq!(counted(&bed, &before), [("ipv6_udp_zero_checksum", 1)]);
    assert_eq!(bed.counters().conntrack().unwrap().entries, 0);
}

#[test]
fn ipv6_sources_outside_the_source_ranges_are_dropped() {
    let mut bed = Bed::new();
    let (vip, port) = (a6("2001:db8:1::1"), 443);
    let fe = frontend6(vip, port, PROTO_TCP);
    let ids = bed.service6(
        1,
        fe,
        &[backend6(pod6(1), 8443, PROTO_TCP)],
        SERVICE_F_SOURCE_RANGES,
    );
    bed.source_range6(1, Ipv6Cidr::new("fd00:c::".parse().unwrap(), 64).unwrap());
    bed.source_range6(
        1,
        Ipv6Cidr::new("2001:db8:ff::7".parse().unwrap(), 128).unwrap(),
    );
    for allowed in [client6(), a6("fd00:c::ffff:1"), a6("2001:db8:ff::7")] {
        let syn = tcp6(allowed, 40000, vip, port, b"");
        assert_eq!(
            bed.xdp(&syn),
            (
                XDP_PASS,
                rewritten6(&syn, Some((bed.addr6(ids[0]), 8443)), None)
            ),
            "{allowed:?} is allowed"
        );
    }
    for denied in [a6("fd00:d::2"), a6("fd00:c:0:1::2"), a6("2001:db8:ff::8")] {
        let before = bed.reasons();
        let syn = tcp6(denied, 40000, vip, port, b"");
        assert_eq!(bed.xdp(&syn).0, XDP_DROP, "{denied:?} is denied");
        assert_eq!(counted(&bed, &before), [("source_range_denied", 1)]);
        assert!(
            bed.conntrack6(&ct6_key(denied, 40000, vip, port, PROTO_TCP))
                .is_none()
        );
    }
}

#[test]
fn ipv6_client_affinity_sends_every_new_flow_of_a_client_to_one_backend() {
    let mut bed = Bed::new();
    let vip = cluster_ip6();
    let fe = frontend6(vip, 8080, PROTO_TCP);
    let ids: Vec<u32> = (1..=3)
        .map(|i| bed.backend6(backend6(pod6(i), 80, PROTO_TCP)))
        .collect();
    bed.program6(1, fe, &ids, 0, 600);
    let client = client6();
    let first = bed.maglev_pick6(1, client, 40000, vip, 8080, PROTO_TCP);
    let mut table_picks = std::collections::BTreeSet::new();
    for sport in 40000..40010 {
        table_picks.insert(bed.maglev_pick6(1, client, sport, vip, 8080, PROTO_TCP));
        let syn = tcp6(client, sport, vip, 8080, b"");
        assert_eq!(
            bed.xdp(&syn).1,
            rewritten6(&syn, Some((bed.addr6(first), 80)), None),
            "flow from {sport}"
        );
    }
    assert!(
        table_picks.len() > 1,
        "the table alone would have spread them"
    );
    let events = bed.events();
    assert_eq!(events[Event::SelectMaglev as usize], 1);
    assert_eq!(events[Event::SelectAffinity as usize], 9);
    let key = lb_common::Affinity6Key {
        service_id: 1,
        client: addr6(client),
    };
    assert_eq!(bed.affinity6().get(&key, 0).unwrap().backend_id, first);
    // Another client has a choice of its own, recorded too.
    let other = a6("fd00:c::3");
    let syn = tcp6(other, 40000, vip, 8080, b"");
    let pick = bed.maglev_pick6(1, other, 40000, vip, 8080, PROTO_TCP);
    assert_eq!(
        bed.xdp(&syn).1,
        rewritten6(&syn, Some((bed.addr6(pick), 80)), None)
    );
    let key = lb_common::Affinity6Key {
        service_id: 1,
        client: addr6(other),
    };
    assert_eq!(bed.affinity6().get(&key, 0).unwrap().backend_id, pick);
    // Two affinity entries inserted, two there: none evicted.
    let counters = bed.counters();
    let tables = counters.tables(&counters.conntrack().unwrap()).unwrap();
    let affinity = tables
        .iter()
        .find(|t| t.map == map_names::AFFINITY)
        .unwrap();
    assert_eq!((affinity.entries, affinity.evictions), (2, 0));
}

#[test]
fn an_ipv6_frontend_without_backends_drops_and_counts() {
    let mut bed = Bed::new();
    let vip = cluster_ip6();
    bed.program6(1, frontend6(vip, 8080, PROTO_TCP), &[], 0, 0);
    let before = bed.reasons();
    let syn = tcp6(client6(), 40000, vip, 8080, b"");
    assert_eq!(bed.xdp(&syn).0, XDP_DROP);
    assert_eq!(counted(&bed, &before), [("no_backend", 1)]);
}

#[test]
fn without_the_ipv6_program_ipv6_frames_pass_untouched_and_counted() {
    let mut bed = Bed::new();
    two_services(&mut bed);
    let (client, vip) = (client6(), cluster_ip6());
    let syn = tcp6(client, 40000, vip, 8080, b"");
    let pod = bed.addr6(bed.maglev_pick6(1, client, 40000, vip, 8080, PROTO_TCP));
    let translated = rewritten6(&syn, Some((pod, 80)), None);
    assert_eq!(bed.xdp(&syn), (XDP_PASS, translated.clone()), "slot filled");

    let map = bed.dp.ebpf_mut().map_mut(map_names::PROGRAMS).unwrap();
    ProgramArray::try_from(map)
        .unwrap()
        .clear_index(&prog_slot::XDP_INGRESS6)
        .unwrap();
    for input in [syn.clone(), udp6(client, 1, a6("fd00::1"), 53, b"x")] {
        let before = bed.reasons();
        assert_eq!(bed.xdp(&input), (XDP_PASS, input.clone()));
        assert_eq!(counted(&bed, &before), [("ipv6_program_missing", 1)]);
    }
    // IPv4 is not affected.
    bed.service(
        3,
        frontend([10, 96, 0, 10], 8080, PROTO_TCP),
        &[backend(POD1, 80, PROTO_TCP)],
        0,
    );
    let syn4 = tcp(CLIENT, 40000, [10, 96, 0, 10], 8080, b"");
    assert_eq!(
        bed.xdp(&syn4),
        (XDP_PASS, rewritten(&syn4, Some((POD1, 80)), None))
    );

    // An agent that starts (loads its programs on the pinned maps) fills the slot again:
    // the XDP program already attached tail-calls the new agent's IPv6 program.
    let mut agent = Datapath::load(&Pins::new(&bed.pin)).unwrap();
    agent.load_programs().unwrap();
    assert_eq!(bed.xdp(&syn), (XDP_PASS, translated), "slot filled again");
}

/// The IPv6 packet (no Ethernet header) an ICMPv6 error quotes: a UDP question or a TCP SYN
/// from `src` to `dst`, its checksum computed by etherparse.
fn quoted6(proto: u8, src: ([u8; 16], u16), dst: ([u8; 16], u16)) -> Vec<u8> {
    quoted_over(PacketBuilder::ipv6(src.0, dst.0, 63), proto, src.1, dst.1)
}

/// An ICMPv6 error from `from` to `to` quoting `quote`, leaving towards the client; its
/// checksum (over the pseudo-header and the quote) computed by etherparse.
fn icmp6_error(from: [u8; 16], to: [u8; 16], kind: Icmpv6Type, quote: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(NODE_MAC, CLIENT_MAC)
        .ipv6(from, to, 64)
        .icmpv6(kind)
        .write(&mut out, quote)
        .unwrap();
    out
}

#[test]
fn icmpv6_errors_from_a_local_backend_leave_about_the_frontend() {
    let mut bed = Bed::new();
    two_services(&mut bed);
    let (client, vip) = (client6(), cluster_ip6());
    // A UDP flow and a TCP flow, through XDP.
    assert_eq!(
        bed.xdp(&udp6(client, 40001, vip, 53, b"question")).0,
        XDP_PASS
    );
    assert_eq!(bed.xdp(&tcp6(client, 40000, vip, 8080, b"")).0, XDP_PASS);
    let udp_pod = bed.addr6(bed.maglev_pick6(2, client, 40001, vip, 53, PROTO_UDP));
    let tcp_pod = bed.addr6(bed.maglev_pick6(1, client, 40000, vip, 8080, PROTO_TCP));
    let router = a6("fd00:244:7::1");
    let unreachable = Icmpv6Type::DestinationUnreachable(DestUnreachableCode::Port);
    let too_big = Icmpv6Type::PacketTooBig { mtu: 1280 };
    let hop_limit = Icmpv6Type::TimeExceeded(TimeExceededCode::HopLimitExceeded);
    // (what, error type, reporter, the flow: protocol, client port, backend, its port,
    // frontend port; the error's source as the client must see it)
    let cases = [
        (
            "port unreachable from the backend",
            unreachable,
            udp_pod,
            (PROTO_UDP, 40001, udp_pod, 5353, 53),
            vip,
        ),
        (
            "packet too big from the backend",
            too_big,
            tcp_pod,
            (PROTO_TCP, 40000, tcp_pod, 80, 8080),
            vip,
        ),
        (
            "hop limit exceeded at a router",
            hop_limit,
            router,
            (PROTO_UDP, 40001, udp_pod, 5353, 53),
            router,
        ),
    ];
    for (what, kind, from, (proto, cport, pod, pport, fport), source) in cases {
        let before = bed.counters().nat_events().unwrap();
        let sent = quoted6(proto, (client, cport), (pod, pport));
        let error = icmp6_error(from, client, kind, &sent);
        let (action, out) = bed.tc(&error);
        assert_eq!(action, TC_ACT_OK, "{what}");
        let about = quoted6(proto, (client, cport), (vip, fport));
        assert_eq!(out, icmp6_error(source, client, kind, &about), "{what}");
        let after = bed.counters().nat_events().unwrap();
        assert_eq!(
            changed(NatEvent::NAMES, &before, &after),
            [("icmp_local", 1)],
            "{what}"
        );
    }

    // Not about a translated flow (another client port, another backend): untouched.
    for (cport, pod) in [(40002, udp_pod), (40001, pod6(9))] {
        let sent = quoted6(PROTO_UDP, (client, cport), (pod, 5353));
        let error = icmp6_error(pod, client, unreachable, &sent);
        assert_eq!(bed.tc(&error), (TC_ACT_OK, error));
    }
    // Not an error (an echo reply from the backend): untouched.
    let mut echo = Vec::new();
    PacketBuilder::ethernet2(NODE_MAC, CLIENT_MAC)
        .ipv6(udp_pod, client, 64)
        .icmpv6_echo_reply(1, 1)
        .write(
            &mut echo,
            &quoted6(PROTO_UDP, (client, 40001), (udp_pod, 5353)),
        )
        .unwrap();
    assert_eq!(bed.tc(&echo), (TC_ACT_OK, echo));
}

#[test]
fn explain_follows_ipv6_flows_from_the_ipv6_maps() {
    let mut bed = Bed::new();
    two_services(&mut bed);
    let (client, vip) = (client6(), cluster_ip6());
    let flow = |sport: u16, dport: u16, syn: bool| Flow {
        src: SocketAddr::from((Ipv6Addr::from(client), sport)),
        dst: SocketAddr::from((Ipv6Addr::from(vip), dport)),
        proto: Protocol::Tcp,
        syn,
    };
    let explain = |bed: &Bed, flow: Flow| {
        Explainer::open_pinned(&Pins::new(&bed.pin))
            .unwrap()
            .explain(&flow, monotonic_ns())
            .unwrap()
    };

    // A new flow: the Maglev entry of its hash, which is where XDP sends the packet.
    let before = explain(&bed, flow(40000, 8080, true));
    assert_eq!(before.decision, Decision::Maglev, "{:?}", before.steps);
    let id = bed.maglev_pick6(1, client, 40000, vip, 8080, PROTO_TCP);
    let pod = bed.addr6(id);
    assert_eq!(before.service_id, Some(1));
    assert_eq!(before.backend_id, Some(id));
    assert_eq!(
        before.backend,
        Some(SocketAddr::from((Ipv6Addr::from(pod), 80)))
    );
    let syn = tcp6(client, 40000, vip, 8080, b"");
    assert_eq!(
        bed.xdp(&syn),
        (XDP_PASS, rewritten6(&syn, Some((pod, 80)), None))
    );
    // Then the flow's IPv6 conntrack entry decides.
    let after = explain(&bed, flow(40000, 8080, false));
    assert_eq!(
        (after.decision, after.backend_id, after.backend),
        (Decision::Conntrack, Some(id), before.backend),
        "{:?}",
        after.steps
    );
    // Another port of the address is no frontend.
    assert_eq!(
        explain(&bed, flow(40000, 9999, true)).decision,
        Decision::NotFrontend
    );
    // Nor is a flow whose addresses are of different families.
    let mixed = Flow {
        src: SocketAddr::from(([10, 0, 0, 1], 40000)),
        ..flow(40000, 8080, true)
    };
    assert_eq!(explain(&bed, mixed).decision, Decision::NotFrontend);
}

#[test]
fn the_pod_interfaces_program_translates_ipv6_by_its_tail_calls() {
    let mut bed = Bed::new();
    two_services(&mut bed);
    let (client, vip) = (client6(), cluster_ip6());
    // A pod's SYN to the ClusterIP goes to the Maglev entry's backend.
    let syn = tcp6(client, 40000, vip, 8080, b"");
    let pod = bed.addr6(bed.maglev_pick6(1, client, 40000, vip, 8080, PROTO_TCP));
    assert_eq!(
        bed.pod(&syn),
        (TC_ACT_OK, rewritten6(&syn, Some((pod, 80)), None))
    );
    // The backend pod's reply comes from the frontend.
    let reply = tcp6_ack(pod, 80, client, 40000, b"answer");
    assert_eq!(
        bed.pod(&reply),
        (TC_ACT_OK, rewritten6(&reply, None, Some((vip, 8080))))
    );
    // An ICMPv6 error the backend pod sends about the flow is about the frontend
    // (`lb_tc_egress`'s rewrite, by the second tail call).
    let too_big = Icmpv6Type::PacketTooBig { mtu: 1280 };
    let sent = quoted6(PROTO_TCP, (client, 40000), (pod, 80));
    let about = quoted6(PROTO_TCP, (client, 40000), (vip, 8080));
    assert_eq!(
        bed.pod(&icmp6_error(pod, client, too_big, &sent)),
        (TC_ACT_OK, icmp6_error(vip, client, too_big, &about))
    );

    // Hairpin: pod1 to a frontend whose only backend is pod1 sees the flow come from
    // HAIRPIN_ADDR6, and its replies to that address go back to pod1 from the frontend.
    let own = a6("fd00:96::33");
    bed.service6(
        3,
        frontend6(own, 80, PROTO_TCP),
        &[backend6(pod6(1), 80, PROTO_TCP)],
        0,
    );
    let hairpin = octets6(HAIRPIN_ADDR6);
    let syn = tcp6(pod6(1), 40001, own, 80, b"");
    assert_eq!(
        bed.pod(&syn),
        (
            TC_ACT_OK,
            rewritten6(&syn, Some((pod6(1), 80)), Some((hairpin, 40001)))
        )
    );
    let reply = tcp6_ack(pod6(1), 80, hairpin, 40001, b"answer");
    assert_eq!(
        bed.pod(&reply),
        (TC_ACT_OK, tcp6_ack(own, 80, pod6(1), 40001, b"answer"))
    );
    // Not for a frontend: untouched.
    let other = tcp6(client, 40002, a6("fd00:96::99"), 80, b"");
    assert_eq!(bed.pod(&other), (TC_ACT_OK, other.clone()));

    // Without `lb_tc_egress` in its slot, the error passes untouched, counted.
    let map = bed.dp.ebpf_mut().map_mut(map_names::TC_PROGRAMS).unwrap();
    ProgramArray::try_from(map)
        .unwrap()
        .clear_index(&tc_prog_slot::EGRESS)
        .unwrap();
    let error = icmp6_error(pod, client, too_big, &sent);
    let before = bed.reasons();
    assert_eq!(bed.pod(&error), (TC_ACT_OK, error.clone()));
    assert_eq!(counted(&bed, &before), [("ipv6_program_missing", 1)]);
}

/// [`a_pods_flow_to_a_local_policy_node_port_short_circuits_to_the_cluster_ip`] (packet.rs)
/// for IPv6, through `lb_tc_pod_in6` and `lb_xdp_ingress6`: a pod's flow to a node port
/// under externalTrafficPolicy Local without a local backend goes to the cluster IP's
/// backends; from outside it is dropped.
#[test]
fn a_pods_ipv6_flow_to_a_local_policy_node_port_short_circuits_to_the_cluster_ip() {
    let mut bed = Bed::new();
    two_services(&mut bed);
    let node_port = a6("fd00:200::1");
    let flags = SERVICE_F_EXTERNAL | SERVICE_F_SHORT_CIRCUIT;
    bed.program6(3, frontend6(node_port, 30080, PROTO_TCP), &[], flags, 0);
    bed.maps.put_short_circuit(3, 1).unwrap();
    let client = client6();
    let syn = tcp6(client, 40000, node_port, 30080, b"");
    assert_eq!(bed.xdp(&syn).0, XDP_DROP, "outside: no local endpoint");
    for sport in 40000..40004 {
        let syn = tcp6(client, sport, node_port, 30080, b"");
        let pod = bed.addr6(bed.maglev_pick6(1, client, sport, node_port, 30080, PROTO_TCP));
        assert_eq!(
            bed.pod(&syn),
            (TC_ACT_OK, rewritten6(&syn, Some((pod, 80)), None)),
            "from {sport}"
        );
    }
    assert_eq!(bed.counters().service(3).unwrap().new_flows, 4);
}
