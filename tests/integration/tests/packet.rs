//! Packet tests: the real programs, run by the kernel through BPF_PROG_TEST_RUN on hand-built
//! packets, with maps filled by hand (see `bed`). Every expected output packet is built
//! independently by etherparse (which computes its own checksums), and compared byte for
//! byte. The decisions of the flow rules (conntrack, affinity, source ranges, selection) are
//! in `packet_flows.rs`.

use etherparse::PacketBuilder;
use lb_common::{
    Event, PROTO_TCP, PROTO_UDP, Reason, SERVICE_F_EXTERNAL, SERVICE_F_SHORT_CIRCUIT, Service,
};
use lb_testbed::packet::*;
use lb_userspace::{
    datapath::{
        Pins,
        explain::{Decision, Explainer, Flow, monotonic_ns},
        maps::DatapathMaps as _,
    },
    model::Protocol,
};

/// The examples' frontends: (name, address, port, flags), one of each kind.
const KINDS: [(&str, [u8; 4], u16, u32); 4] = [
    ("ClusterIP", [10, 96, 0, 10], 8080, 0),
    ("NodePort", [10, 200, 0, 1], 30080, SERVICE_F_EXTERNAL),
    ("ExternalIP", [10, 97, 0, 1], 80, SERVICE_F_EXTERNAL),
    ("LoadBalancer", [10, 98, 0, 1], 80, SERVICE_F_EXTERNAL),
];

#[test]
fn every_frontend_kind_translates_tcp_and_udp_to_the_selected_backend() {
    let mut bed = Bed::new();
    for (i, (_, addr, port, flags)) in KINDS.iter().enumerate() {
        let id = i as u32 + 1;
        let pods = [backend(POD1, 80, PROTO_TCP), backend(POD2, 80, PROTO_TCP)];
        bed.service(id, frontend(*addr, *port, PROTO_TCP), &pods, *flags);
        let pods = [
            backend(POD1, 5353, PROTO_UDP),
            backend(POD2, 5353, PROTO_UDP),
        ];
        bed.service(id + 10, frontend(*addr, *port, PROTO_UDP), &pods, *flags);
    }
    for (i, (kind, addr, port, _)) in KINDS.into_iter().enumerate() {
        let id = i as u32 + 1;
        // Source ports differ between frontends: flows from one client port to one backend
        // port through two frontends would be one flow at the backend.
        for sport in (0..4).map(|j| 40000 + 10 * i as u16 + j) {
            let input = tcp(CLIENT, sport, addr, port, b"GET / HTTP/1.1\r\n\r\n");
            let pod = bed.addr(bed.maglev_pick(id, CLIENT, sport, addr, port, PROTO_TCP));
            let (action, out) = bed.xdp(&input);
            assert_eq!(action, XDP_PASS, "{kind} TCP");
            assert_eq!(
                out,
                rewritten(&input, Some((pod, 80)), None),
                "{kind} TCP from {sport}"
            );

            let input = udp(CLIENT, sport, addr, port, b"ping");
            let pod = bed.addr(bed.maglev_pick(id + 10, CLIENT, sport, addr, port, PROTO_UDP));
            let (action, out) = bed.xdp(&input);
            assert_eq!(action, XDP_PASS, "{kind} UDP");
            assert_eq!(
                out,
                rewritten(&input, Some((pod, 5353)), None),
                "{kind} UDP from {sport}"
            );
        }
    }
    let counters = bed.counters();
    let stats = counters.service(1).unwrap();
    assert_eq!((stats.packets, stats.new_flows), (4, 4));
    assert_eq!(
        stats.bytes,
        4 * tcp(CLIENT, 1, [0; 4], 1, b"GET / HTTP/1.1\r\n\r\n").len() as u64
    );
    assert_eq!(
        bed.reasons().iter().sum::<u64>(),
        0,
        "nothing passed or dropped"
    );
    // Every new flow came from the Maglev table and made two conntrack entries.
    let events = bed.events();
    assert_eq!(events[Event::SelectMaglev as usize], 32);
    assert_eq!(events[Event::CtInserts as usize], 64);
    let ct = bed.counters().conntrack().unwrap();
    assert_eq!((ct.entries, ct.evictions), (64, 0));
}

#[test]
fn both_backends_are_used_and_a_flow_keeps_its_backend() {
    let mut bed = Bed::new();
    let fe = frontend([10, 96, 0, 10], 8080, PROTO_TCP);
    let ids = bed.service(
        1,
        fe,
        &[backend(POD1, 80, PROTO_TCP), backend(POD2, 80, PROTO_TCP)],
        0,
    );
    let mut seen = [0; 2];
    for sport in 30000..30064u16 {
        let input = tcp(CLIENT, sport, [10, 96, 0, 10], 8080, b"");
        let (_, out) = bed.xdp(&input);
        let dst = &out[30..34];
        seen[usize::from(dst == POD2)] += 1;
    }
    assert!(
        seen[0] > 10 && seen[1] > 10,
        "spread over both backends: {seen:?}"
    );

    // Established flow: a new table without its backend is swapped in, the flow keeps its
    // backend (ACTIVE: it serves other services, or is back).
    let input = tcp_ack(CLIENT, 30000, [10, 96, 0, 10], 8080, b"data");
    let (_, before) = bed.xdp(&input);
    let first = <[u8; 4]>::try_from(&before[30..34]).unwrap();
    let (other, other_id) = if first == POD1 {
        (POD2, ids[1])
    } else {
        (POD1, ids[0])
    };
    bed.program(1, fe, &[other_id], 0, 0);
    let (_, after) = bed.xdp(&input);
    assert_eq!(after, before, "conntrack keeps the flow on {first:?}");
    // A new flow goes to the only backend left.
    let input = tcp(CLIENT, 50000, [10, 96, 0, 10], 8080, b"");
    let (_, out) = bed.xdp(&input);
    assert_eq!(&out[30..34], &other);
}

#[test]
fn udp_checksum_zero_stays_zero() {
    let mut bed = Bed::new();
    let fe = frontend([10, 96, 0, 12], 5353, PROTO_UDP);
    bed.service(1, fe, &[backend(POD1, 5353, PROTO_UDP)], 0);
    let mut input = udp(CLIENT, 40000, [10, 96, 0, 12], 5353, b"no checksum");
    input[40..42].copy_from_slice(&[0, 0]); // UDP checksum "not computed"
    let (action, out) = bed.xdp(&input);
    assert_eq!(action, XDP_PASS);
    assert_eq!(&out[40..42], &[0, 0]);
    assert_eq!(out, rewritten(&input, Some((POD1, 5353)), None));
}

#[test]
fn replies_leave_from_the_frontend() {
    let mut bed = Bed::new();
    for (i, (kind, addr, port, flags)) in KINDS.iter().enumerate() {
        let id = i as u32 + 1;
        bed.service(
            id,
            frontend(*addr, *port, PROTO_TCP),
            &[backend(POD1, 80, PROTO_TCP)],
            *flags,
        );
        bed.service(
            id + 10,
            frontend(*addr, *port, PROTO_UDP),
            &[backend(POD2, 53, PROTO_UDP)],
            *flags,
        );

        let sport = 45000 + i as u16;
        assert_eq!(bed.xdp(&tcp(CLIENT, sport, *addr, *port, b"")).0, XDP_PASS);
        let reply = tcp(POD1, 80, CLIENT, sport, b"HTTP/1.1 200 OK\r\n");
        let (action, out) = bed.tc(&reply);
        assert_eq!(action, TC_ACT_OK, "{kind}");
        assert_eq!(
            out,
            rewritten(&reply, None, Some((*addr, *port))),
            "{kind} TCP reply"
        );

        assert_eq!(bed.xdp(&udp(CLIENT, sport, *addr, *port, b"q")).0, XDP_PASS);
        let reply = udp(POD2, 53, CLIENT, sport, b"answer");
        let (_, out) = bed.tc(&reply);
        assert_eq!(
            out,
            rewritten(&reply, None, Some((*addr, *port))),
            "{kind} UDP reply"
        );
    }
    // A packet from a backend that belongs to no translated flow leaves untouched.
    let other = tcp(POD1, 80, CLIENT, 1, b"");
    assert_eq!(bed.tc(&other), (TC_ACT_OK, other.clone()));
}

#[test]
fn packets_not_for_a_frontend_pass_bit_for_bit() {
    let mut bed = Bed::new();
    bed.service(
        1,
        frontend([10, 96, 0, 10], 8080, PROTO_TCP),
        &[backend(POD1, 80, PROTO_TCP)],
        0,
    );
    let arp = {
        let mut p = vec![0xffu8; 6];
        p.extend_from_slice(&CLIENT_MAC);
        p.extend_from_slice(&[0x08, 0x06]);
        p.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        p.extend_from_slice(&[0u8; 20]);
        p
    };
    let ipv6 = {
        let builder = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
            .ipv6([0xfd; 16], [0xfe; 16], 64)
            .tcp(1, 8080, 0, 0);
        let mut out = Vec::new();
        builder.write(&mut out, b"").unwrap();
        out
    };
    let icmp = {
        let builder = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
            .ipv4(CLIENT, [10, 96, 0, 10], 64)
            .icmpv4_echo_request(1, 1);
        let mut out = Vec::new();
        builder.write(&mut out, b"ping").unwrap();
        out
    };
    let cases: [(&str, Vec<u8>, Reason); 6] = [
        (
            "other port",
            tcp(CLIENT, 1, [10, 96, 0, 10], 8081, b""),
            Reason::NotFrontend,
        ),
        (
            "other address",
            tcp(CLIENT, 1, [10, 96, 0, 11], 8080, b""),
            Reason::NotFrontend,
        ),
        (
            "UDP to a TCP frontend",
            udp(CLIENT, 1, [10, 96, 0, 10], 8080, b""),
            Reason::NotFrontend,
        ),
        ("ARP", arp, Reason::NotIp),
        // The IPv6 program (tail-called) finds no IPv6 frontend there.
        ("IPv6", ipv6, Reason::NotFrontend),
        ("ICMP to the frontend address", icmp, Reason::NotTcpUdp),
    ];
    for (name, input, why) in cases {
        let before = bed.reasons();
        assert_eq!(bed.xdp(&input), (XDP_PASS, input.clone()), "{name}");
        let after = bed.reasons();
        assert_eq!(
            after[why as usize],
            before[why as usize] + 1,
            "{name} counted"
        );
        assert_eq!(
            after.iter().sum::<u64>(),
            before.iter().sum::<u64>() + 1,
            "{name} counted once"
        );
    }
}

#[test]
fn the_prefilter_passes_destinations_of_empty_buckets_before_any_lookup() {
    let mut bed = Bed::new();
    let addr = [10, 96, 0, 10];
    let fe = frontend(addr, 8080, PROTO_TCP);
    let pod = bed.service(1, fe, &[backend(POD1, 80, PROTO_TCP)], 0)[0];
    assert!(bed.prefilter(&fe));
    let syn = tcp(CLIENT, 40000, addr, 8080, b"");
    let ack = tcp_ack(CLIENT, 40000, addr, 8080, b"x");
    let pod_addr = bed.addr(pod);
    let translated = |input: &[u8]| rewritten(input, Some((pod_addr, 80)), None);
    assert_eq!(bed.xdp(&syn), (XDP_PASS, translated(&syn)), "new flow");
    assert_eq!(bed.xdp(&ack), (XDP_PASS, translated(&ack)), "established");

    // A destination whose bucket is empty: passed untouched and counted once.
    let other = frontend([10, 96, 0, 11], 8080, PROTO_TCP);
    assert!(!bed.prefilter(&other));
    let input = tcp(CLIENT, 1, [10, 96, 0, 11], 8080, b"");
    let before = bed.reasons();
    assert_eq!(bed.xdp(&input), (XDP_PASS, input.clone()));
    assert_eq!(counted_as(&before, &bed.reasons()), ["not_frontend"]);
    assert_eq!(bed.reasons()[Reason::NotFrontend as usize], 1);

    // The bit is read before conntrack: with the frontend's bit clear, even its established
    // flow passes untouched (which the agent never lets happen while the frontend exists).
    bed.set_prefilter(&fe, false);
    assert_eq!(bed.xdp(&ack), (XDP_PASS, ack.clone()));
    assert_eq!(bed.reasons()[Reason::NotFrontend as usize], 2);
    bed.set_prefilter(&fe, true);
    assert_eq!(bed.xdp(&ack), (XDP_PASS, translated(&ack)), "back");

    // A destination in a set bucket that is not a frontend: the lookups decide.
    let shared = (1..=u16::MAX)
        .flat_map(|port| (0..=255u8).map(move |last| ([10, 96, 1, last], port)))
        .find(|(a, p)| bed_bucket(*a, *p) == bed_bucket(addr, 8080))
        .expect("a destination in the frontend's bucket");
    let input = tcp(CLIENT, 1, shared.0, shared.1, b"");
    assert_eq!(bed.xdp(&input), (XDP_PASS, input.clone()), "{shared:?}");
    assert_eq!(bed.reasons()[Reason::NotFrontend as usize], 3);
}

fn bed_bucket(addr: [u8; 4], port: u16) -> u32 {
    let fe = frontend(addr, port, PROTO_TCP);
    lb_common::prefilter::bucket(fe.addr, fe.port, fe.proto)
}

#[test]
fn malformed_packets_are_passed_untouched_and_counted_by_reason() {
    let mut bed = Bed::new();
    let fe = [10, 96, 0, 10];
    bed.service(
        1,
        frontend(fe, 8080, PROTO_TCP),
        &[backend(POD1, 80, PROTO_TCP)],
        0,
    );
    let good = tcp(CLIENT, 40000, fe, 8080, b"payload");
    let with = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut p = good.clone();
        f(&mut p);
        p
    };
    // Cut to `len` bytes, with an IP total length that agrees with the cut.
    let cut = |p: &[u8], len: usize| {
        let mut p = p[..len].to_vec();
        p[16..18].copy_from_slice(&(len as u16 - 14).to_be_bytes());
        p
    };
    let cases: Vec<(&str, Vec<u8>, Reason)> = vec![
        // BPF_PROG_TEST_RUN refuses packets shorter than an Ethernet header, so the
        // SHORT_ETHERNET branch is only reachable from a real device.
        (
            "Ethernet header only",
            good[..14].to_vec(),
            Reason::ShortIpv4,
        ),
        (
            "IPv4 header cut short",
            good[..30].to_vec(),
            Reason::ShortIpv4,
        ),
        (
            "IHL below 5",
            with(&|p| p[14] = 0x44),
            Reason::BadIpv4Header,
        ),
        (
            "IP version 6 in an IPv4 frame",
            with(&|p| p[14] = 0x65),
            Reason::BadIpv4Header,
        ),
        (
            "IP options (IHL 6)",
            with(&|p| p[14] = 0x46),
            Reason::Ipv4Options,
        ),
        (
            "more fragments",
            with(&|p| p[20] |= 0x20),
            Reason::Ipv4Fragment,
        ),
        (
            "fragment offset",
            with(&|p| p[21] = 1),
            Reason::Ipv4Fragment,
        ),
        (
            "total length beyond the packet",
            with(&|p| p[16..18].copy_from_slice(&200u16.to_be_bytes())),
            Reason::BadIpv4Length,
        ),
        (
            "total length shorter than the headers",
            with(&|p| p[16..18].copy_from_slice(&30u16.to_be_bytes())),
            Reason::BadIpv4Length,
        ),
        ("TCP header cut short", cut(&good, 44), Reason::ShortL4),
        (
            "UDP header cut short",
            cut(&udp(CLIENT, 1, fe, 8080, b""), 38),
            Reason::ShortL4,
        ),
    ];
    for (name, input, why) in cases {
        let before = bed.reasons();
        assert_eq!(bed.xdp(&input), (XDP_PASS, input.clone()), "{name}");
        let after = bed.reasons();
        assert_eq!(
            after[why as usize],
            before[why as usize] + 1,
            "{name}: counted as {}, not as {:?}",
            why.name(),
            counted_as(&before, &after)
        );
        assert_eq!(
            after.iter().sum::<u64>(),
            before.iter().sum::<u64>() + 1,
            "{name} counted once"
        );
    }
    // The well-formed original is still translated.
    assert_eq!(bed.xdp(&good).1, rewritten(&good, Some((POD1, 80)), None));
}

#[test]
fn a_frontend_without_backends_drops_and_counts() {
    let mut bed = Bed::new();
    let fe = frontend([10, 96, 0, 10], 8080, PROTO_TCP);
    bed.service(1, fe, &[], 0);
    let input = tcp(CLIENT, 40000, [10, 96, 0, 10], 8080, b"");
    assert_eq!(bed.xdp(&input).0, XDP_DROP);
    assert_eq!(bed.reasons()[Reason::NoBackend as usize], 1);
    // A service entry with backends but no table (never written by the agent: it writes
    // the table first).
    let svc = Service {
        id: 1,
        backend_count: 1,
        flags: 0,
        affinity_timeout_secs: 0,
    };
    bed.set_prefilter(&fe, true);
    bed.maps.services.insert(fe, svc, 0).unwrap();
    assert_eq!(bed.xdp(&input).0, XDP_DROP);
    assert_eq!(bed.reasons()[Reason::BackendMissing as usize], 1);
    // A table that names a backend id the backends map does not have.
    bed.table(1, &[999; 7], 1);
    assert_eq!(bed.xdp(&input).0, XDP_DROP);
    assert_eq!(bed.reasons()[Reason::BackendMissing as usize], 2);
    assert_eq!(bed.counters().conntrack().unwrap().entries, 0);
}

/// The names of the reasons whose counters differ.
fn counted_as(before: &[u64], after: &[u64]) -> Vec<&'static str> {
    (0..before.len())
        .filter(|&i| before[i] != after[i])
        .map(|i| Reason::NAMES[i])
        .collect()
}

/// kube-proxy's "short-circuit pod traffic" through the pod interfaces' program: a node
/// port under externalTrafficPolicy Local without a local backend (service 2, short-circuited
/// to the cluster IP, service 1). A pod's new flow to it goes to the cluster IP's Maglev
/// entry for the flow, counted under the node port; the same packet from outside (XDP) is
/// dropped, no backend; without the short-circuit entry the pod's is dropped too.
#[test]
fn a_pods_flow_to_a_local_policy_node_port_short_circuits_to_the_cluster_ip() {
    let mut bed = Bed::new();
    let (cluster, node_port) = (([10, 96, 0, 10], 8080), ([10, 200, 0, 1], 30080));
    let pods = [backend(POD1, 80, PROTO_TCP), backend(POD2, 80, PROTO_TCP)];
    bed.service(1, frontend(cluster.0, cluster.1, PROTO_TCP), &pods, 0);
    let flags = SERVICE_F_EXTERNAL | SERVICE_F_SHORT_CIRCUIT;
    bed.program(
        2,
        frontend(node_port.0, node_port.1, PROTO_TCP),
        &[],
        flags,
        0,
    );
    bed.maps.put_short_circuit(2, 1).unwrap();

    let syn = |src, sport| tcp(src, sport, node_port.0, node_port.1, b"");
    let (action, _) = bed.xdp(&syn(CLIENT, 40000));
    assert_eq!(action, XDP_DROP, "outside: local endpoints only, none");
    // `lb explain` (a client from outside) says so, and what local clients get.
    let flow = Flow {
        src: (CLIENT, 40000).into(),
        dst: node_port.into(),
        proto: Protocol::Tcp,
        syn: true,
    };
    let why = (Explainer::open_pinned(&Pins::new(&bed.pin)).unwrap())
        .explain(&flow, monotonic_ns())
        .unwrap();
    assert_eq!(why.decision, Decision::NoBackend, "{:?}", why.steps);
    assert!(
        why.steps.iter().any(|s| s.contains("(short-circuit)")),
        "{:?}",
        why.steps
    );
    for sport in 40000..40008 {
        let input = syn(POD3, sport);
        let pod = bed.addr(bed.maglev_pick(1, POD3, sport, node_port.0, node_port.1, PROTO_TCP));
        assert_eq!(
            bed.pod(&input),
            (TC_ACT_OK, rewritten(&input, Some((pod, 80)), None)),
            "from {sport}"
        );
    }
    let counters = bed.counters();
    assert_eq!(counters.service(2).unwrap().new_flows, 8);
    assert_eq!(counters.service(1).unwrap().new_flows, 0);

    // An entry that names an id no frontend holds: the node port's own (no) backends.
    bed.maps.put_short_circuit(2, 9).unwrap();
    let before = bed.reasons();
    // TC_ACT_SHOT.
    assert_eq!(bed.pod(&syn(POD3, 41000)).0, 2);
    assert_eq!(counted_as(&before, &bed.reasons()), ["no_backend"]);
}
