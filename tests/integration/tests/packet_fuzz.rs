//! The programs fuzzed through BPF_PROG_TEST_RUN: random packets, packets made of random
//! headers, and mutations of a small corpus of real ones (proptest, a bounded number of cases,
//! failing inputs kept in `proptest-regressions/`).
//!
//! What must hold for every packet, whatever it is:
//! - a packet that is not a well-formed IPv4 TCP/UDP packet to a frontend is never rewritten,
//!   and is only passed, never dropped;
//! - a rewritten packet differs from its input only in the destination address and port (XDP)
//!   or the source address and port (TC), which become one of the frontend's backends (or the
//!   frontend), and in the checksums;
//! - checksums that were correct stay correct (checked by a recomputation written here, not
//!   the datapath's incremental update); a UDP checksum of 0 (none) stays 0.
//!
//! The maps are filled through the agent's own `Syncer`, from a desired state.

use lb_userspace::datapath::Pins;
use lb_userspace::model::Protocol;
use std::{
    cell::{Cell, RefCell},
    net::Ipv4Addr,
};

use aya::programs::{SchedClassifier, TestRun, TestRunOptions, TestRunResult, Xdp};
use etherparse::PacketBuilder;
use lb_common::program_names;
use lb_testbed::PinDir;
use lb_userspace::{
    datapath::{BpfMaps, Datapath},
    plan::desired::{Backend, DesiredState, Frontend, FrontendKind, FrontendPlan, ServicePortRef},
    sync::Syncer,
};
use proptest::{
    prelude::*,
    test_runner::{Config, TestCaseError, TestRunner},
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;

const CLIENT: [u8; 4] = [10, 200, 0, 2];
const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 2];
const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 1];
const ETH: usize = 14;

/// The frontends programmed for every case, with their backends.
fn services() -> Vec<(Frontend, Vec<(Ipv4Addr, u16)>)> {
    let pods = |port| {
        vec![
            (Ipv4Addr::new(10, 244, 1, 2), port),
            (Ipv4Addr::new(10, 244, 2, 2), port),
        ]
    };
    vec![
        (frontend([10, 96, 0, 10], 80, Protocol::Tcp), pods(8080)),
        (
            frontend([10, 96, 0, 12], 53, Protocol::Udp),
            pods(5353)[..1].to_vec(),
        ),
        (frontend([10, 200, 0, 1], 30080, Protocol::Tcp), pods(8080)),
    ]
}

fn frontend(addr: [u8; 4], port: u16, proto: Protocol) -> Frontend {
    Frontend {
        addr: addr.into(),
        port,
        proto,
    }
}

/// A loaded datapath, programmed with [`services`], with its own pin directory (removed on
/// drop, also when a case fails).
struct Bed {
    dp: Datapath,
    _syncer: Syncer<BpfMaps>,
    // Last: torn down after the maps are closed.
    _pins: PinDir,
}

impl Bed {
    fn new() -> Self {
        // Removed on drop, also when a panic below leaves no Bed (the maps are pinned first).
        let pins = PinDir::new().expect("a pin directory");
        let mut dp = Datapath::load(&Pins::new(pins.path()))
            .unwrap_or_else(|e| panic!("loading the datapath: {e}"));
        dp.load_programs()
            .unwrap_or_else(|e| panic!("verifying the programs: {e:?}"));
        let mut syncer = Syncer::adopt(dp.take_maps().expect("maps")).expect("adopt");
        let mut desired = DesiredState::default();
        for (frontend, backends) in services() {
            let plan = FrontendPlan {
                service: ServicePortRef {
                    namespace: "fuzz".into(),
                    name: frontend.to_string(),
                    port_name: String::new(),
                },
                kind: if frontend.port >= 30000 {
                    FrontendKind::NodePort
                } else {
                    FrontendKind::ClusterIp
                },
                backends: backends
                    .iter()
                    .map(|&(addr, port)| Backend {
                        addr: addr.into(),
                        port,
                        terminating: false,
                        remote: false,
                    })
                    .collect(),
                reject: false,
                affinity_timeout_secs: None,
                source_ranges: Vec::new(),
                selection: None,
                forwarding: None,
                topology: None,
                short_circuit: None,
            };
            desired.frontends.insert(frontend, plan);
        }
        let report = syncer.apply(&desired);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        Bed {
            dp,
            _syncer: syncer,
            _pins: pins,
        }
    }

    fn xdp(&mut self, packet: &[u8]) -> (u32, Vec<u8>) {
        let prog: &Xdp = self
            .dp
            .ebpf_mut()
            .program(program_names::XDP_INGRESS)
            .expect("XDP program")
            .try_into()
            .expect("an XDP program");
        run(prog, packet).unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN on {packet:02x?}: {e:?}"))
    }

    /// `None` when the kernel refuses to build an skb of the packet (it checks the network
    /// header of some protocols, such as IPv6, before it runs the program): such a packet
    /// never reaches TC.
    fn tc(&mut self, packet: &[u8]) -> Option<(u32, Vec<u8>)> {
        let prog: &SchedClassifier = self
            .dp
            .ebpf_mut()
            .program(program_names::TC_EGRESS)
            .expect("TC program")
            .try_into()
            .expect("a TC program");
        match run(prog, packet) {
            Ok(result) => Some(result),
            Err(aya::programs::ProgramError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EINVAL) =>
            {
                None
            }
            Err(e) => panic!("BPF_PROG_TEST_RUN on {packet:02x?}: {e:?}"),
        }
    }
}

fn run<P>(prog: &P, packet: &[u8]) -> Result<(u32, Vec<u8>), aya::programs::ProgramError>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let (result, out) = lb_testbed::packet::test_run(prog, packet, 1)?;
    Ok((result.return_value, out))
}

/// The IPv4 TCP or UDP packet inside an Ethernet frame, as far as a datapath may translate it:
/// no IP options, not a fragment, total length within the frame and covering the L4 header.
struct L4View {
    src: [u8; 4],
    dst: [u8; 4],
    proto: Protocol,
    sport: u16,
    dport: u16,
    /// Offset of the L4 checksum in the frame.
    csum_at: usize,
    /// The frame's bytes that the IP total length covers, from the IP header on.
    ip_end: usize,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

///
/// On egress (`from_stack`), the kernel has already checked the total length against the
/// packet (ip_rcv for forwarded packets; the stack itself for local ones), so a view is taken
/// whatever the IP total length says, and covers the bytes present, as far as the checksum.
fn l4_view(frame: &[u8], from_stack: bool) -> Option<L4View> {
    if frame.len() < ETH + 20 || be16(frame, 12) != 0x0800 {
        return None;
    }
    let ip = &frame[ETH..];
    let mut total = usize::from(be16(ip, 2));
    let fragment = be16(ip, 6) & 0x3fff != 0;
    if from_stack {
        total = ip.len();
    }
    if ip[0] != 0x45 || fragment || total > ip.len() {
        return None;
    }
    let (proto, header, csum) = match ip[9] {
        6 => (Protocol::Tcp, 20, 16),
        17 => (Protocol::Udp, 8, 6),
        _ => return None,
    };
    // Ingress needs the whole L4 header; egress translates once the checksum is there.
    let needed = if from_stack { csum + 2 } else { header };
    if total < 20 + needed {
        return None;
    }
    let l4 = ETH + 20;
    Some(L4View {
        src: ip[12..16].try_into().ok()?,
        dst: ip[16..20].try_into().ok()?,
        proto,
        sport: be16(frame, l4),
        dport: be16(frame, l4 + 2),
        csum_at: l4 + csum,
        ip_end: ETH + total,
    })
}

/// One's-complement sum of 16-bit big-endian words.
fn ones_sum(bytes: &[u8], mut sum: u32) -> u32 {
    for chunk in bytes.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    sum
}

fn folds_to_ffff(mut sum: u32) -> bool {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum == 0xffff
}

/// Whether the IP header checksum is right.
fn ip_csum_ok(frame: &[u8]) -> bool {
    folds_to_ffff(ones_sum(&frame[ETH..ETH + 20], 0))
}

/// Whether the L4 checksum is right (`None`: a UDP packet without a checksum).
fn l4_csum_ok(frame: &[u8], v: &L4View) -> Option<bool> {
    if v.proto == Protocol::Udp && be16(frame, v.csum_at) == 0 {
        return None;
    }
    let segment = &frame[ETH + 20..v.ip_end];
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&frame[ETH + 12..ETH + 20]);
    pseudo.extend_from_slice(&[0, frame[ETH + 9]]);
    pseudo.extend_from_slice(&(segment.len() as u16).to_be_bytes());
    Some(folds_to_ffff(ones_sum(segment, ones_sum(&pseudo, 0))))
}

/// Checks one translated packet: only the bytes at `changed` (the rewritten address and port)
/// and the checksums may differ, and correct checksums stay correct.
fn check_rewrite(
    input: &[u8],
    output: &[u8],
    v: &L4View,
    changed: [usize; 2],
) -> Result<(), TestCaseError> {
    prop_assert_eq!(input.len(), output.len(), "the length changed");
    let (addr_at, port_at) = (changed[0], changed[1]);
    let may_change = |i: usize| {
        (addr_at..addr_at + 4).contains(&i)
            || (port_at..port_at + 2).contains(&i)
            || (ETH + 10..ETH + 12).contains(&i)
            || (v.csum_at..v.csum_at + 2).contains(&i)
    };
    for (i, (a, b)) in input.iter().zip(output).enumerate() {
        prop_assert!(
            a == b || may_change(i),
            "byte {} changed from {:#04x} to {:#04x}",
            i,
            a,
            b
        );
    }
    if ip_csum_ok(input) {
        prop_assert!(ip_csum_ok(output), "the IP checksum went bad");
    }
    let out_view = l4_view(output, true).expect("a rewritten packet stays well-formed");
    match l4_csum_ok(input, v) {
        Some(true) => prop_assert_eq!(
            l4_csum_ok(output, &out_view),
            Some(true),
            "the L4 checksum went bad"
        ),
        None => prop_assert_eq!(
            be16(output, v.csum_at),
            0,
            "a UDP packet without checksum got one"
        ),
        Some(false) => {}
    }
    Ok(())
}

/// Runs XDP on one packet and checks it; returns whether it was rewritten.
fn xdp_case(bed: &mut Bed, packet: &[u8]) -> Result<bool, TestCaseError> {
    let (action, output) = bed.xdp(packet);
    let view = l4_view(packet, false);
    let hit = view.as_ref().and_then(|v| {
        services().into_iter().find(|(f, _)| {
            f.addr == std::net::IpAddr::from(v.dst) && f.port == v.dport && f.proto == v.proto
        })
    });
    prop_assert!(
        action == XDP_PASS || action == XDP_DROP,
        "action {}",
        action
    );
    let Some((_, backends)) = hit else {
        prop_assert_eq!(action, XDP_PASS, "a packet for no frontend was dropped");
        prop_assert!(output == packet, "a packet for no frontend was rewritten");
        return Ok(false);
    };
    if output == packet {
        return Ok(false);
    }
    prop_assert_eq!(action, XDP_PASS, "a rewritten packet was dropped");
    let v = view.expect("a frontend hit has a view");
    let new_dst: [u8; 4] = output[ETH + 16..ETH + 20].try_into().unwrap();
    let new_port = be16(&output, ETH + 22);
    prop_assert!(
        backends
            .iter()
            .any(|&(a, p)| a.octets() == new_dst && p == new_port),
        "rewritten to {:?}:{}, not a backend",
        new_dst,
        new_port
    );
    check_rewrite(packet, &output, &v, [ETH + 16, ETH + 22])?;
    Ok(true)
}

/// Runs TC on one packet and checks it; returns whether it was rewritten.
fn tc_case(bed: &mut Bed, packet: &[u8]) -> Result<bool, TestCaseError> {
    let Some((action, output)) = bed.tc(packet) else {
        return Err(TestCaseError::reject("the kernel builds no skb of it"));
    };
    if action == TC_ACT_SHOT {
        // Deliberate and counted (REPLY_REWRITE_FAILED): a reply of a translated flow whose
        // L4 header is cut before its checksum cannot be translated, and passing it would
        // show the client a backend address.
        let ip_ok = packet.len() >= ETH + 20 && be16(packet, 12) == 0x0800 && packet[ETH] == 0x45;
        let csum_end = match packet.get(ETH + 9) {
            Some(6) => ETH + 20 + 18,
            Some(17) => ETH + 20 + 8,
            _ => 0,
        };
        let from_backend = ip_ok
            && packet.len() >= ETH + 24
            && services().iter().flat_map(|(_, b)| b).any(|&(a, p)| {
                a.octets() == packet[ETH + 12..ETH + 16] && p == be16(packet, ETH + 20)
            });
        prop_assert!(
            from_backend && csum_end > 0 && packet.len() < csum_end,
            "TC dropped a packet that is not a truncated reply"
        );
        return Ok(false);
    }
    prop_assert_eq!(action, TC_ACT_OK, "TC returns OK or SHOT");
    if output == packet {
        return Ok(false);
    }
    let Some(v) = l4_view(packet, true) else {
        return Err(TestCaseError::fail(
            "a packet that is not IPv4 TCP/UDP was rewritten",
        ));
    };
    let from_backend = services().into_iter().find(|(f, backends)| {
        f.proto == v.proto
            && backends
                .iter()
                .any(|&(a, p)| a.octets() == v.src && p == v.sport)
    });
    prop_assert!(
        from_backend.is_some(),
        "a packet not from a backend was rewritten"
    );
    let new_src: [u8; 4] = output[ETH + 12..ETH + 16].try_into().unwrap();
    let new_port = be16(&output, ETH + 20);
    prop_assert!(
        services()
            .iter()
            .any(|(f, _)| f.addr == std::net::IpAddr::from(new_src)
                && f.port == new_port
                && f.proto == v.proto),
        "reply source rewritten to {:?}:{}, not a frontend",
        new_src,
        new_port
    );
    check_rewrite(packet, &output, &v, [ETH + 12, ETH + 20])?;
    Ok(true)
}

fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, syn: bool, payload: &[u8]) -> Vec<u8> {
    let mut builder = PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(src, dst, 64)
        .tcp(sport, dport, 1000, 64240);
    if syn {
        builder = builder.syn();
    } else {
        builder = builder.ack(1);
    }
    let mut out = Vec::new();
    builder.write(&mut out, payload).expect("build TCP");
    out
}

fn udp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(src, dst, 64)
        .udp(sport, dport)
        .write(&mut out, payload)
        .expect("build UDP");
    out
}

/// Packets to mutate: to each frontend, near misses, other protocols, and replies.
fn corpus() -> Vec<Vec<u8>> {
    let mut udp_no_csum = udp(CLIENT, 40002, [10, 96, 0, 12], 53, b"query");
    udp_no_csum[ETH + 20 + 6..ETH + 20 + 8].copy_from_slice(&[0, 0]);
    let mut icmp = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(CLIENT, [10, 96, 0, 10], 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut icmp, b"ping")
        .expect("build ICMP");
    let mut ipv6 = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv6([0xfd; 16], [0xfe; 16], 64)
        .tcp(40000, 80, 1, 100)
        .write(&mut ipv6, b"")
        .expect("build IPv6");
    vec![
        tcp(CLIENT, 40000, [10, 96, 0, 10], 80, true, b""),
        tcp(
            CLIENT,
            40000,
            [10, 96, 0, 10],
            80,
            false,
            b"GET / HTTP/1.1\r\n\r\n",
        ),
        tcp(CLIENT, 40001, [10, 200, 0, 1], 30080, false, b"x"),
        udp(CLIENT, 40002, [10, 96, 0, 12], 53, b"query"),
        udp_no_csum,
        tcp(CLIENT, 40003, [10, 96, 0, 10], 81, true, b""),
        udp(CLIENT, 40004, [10, 96, 0, 10], 80, b"wrong protocol"),
        tcp(CLIENT, 40005, [10, 96, 0, 11], 80, true, b""),
        icmp,
        ipv6,
        tcp(
            [10, 244, 1, 2],
            8080,
            CLIENT,
            40000,
            false,
            b"HTTP/1.1 200 OK\r\n\r\n",
        ),
        tcp([10, 244, 2, 2], 8080, CLIENT, 40000, false, b""),
        tcp([10, 244, 2, 2], 8080, CLIENT, 40001, false, b""),
        udp([10, 244, 1, 2], 5353, CLIENT, 40002, b"answer"),
    ]
}

/// A corpus packet with a few bytes overwritten, maybe truncated (never below an Ethernet
/// header, which BPF_PROG_TEST_RUN requires).
fn mutated() -> impl Strategy<Value = Vec<u8>> {
    let corpus = corpus();
    (
        0..corpus.len(),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        prop::option::weighted(0.2, any::<prop::sample::Index>()),
    )
        .prop_map(move |(seed, edits, cut)| {
            let mut p = corpus[seed].clone();
            for (at, byte) in edits {
                let i = at.index(p.len());
                p[i] = byte;
            }
            if let Some(cut) = cut {
                p.truncate(ETH + cut.index(p.len() - ETH + 1));
            }
            p
        })
}

/// Well-formed headers with addresses, ports and protocols drawn near the frontends.
fn structured() -> impl Strategy<Value = Vec<u8>> {
    let addrs = prop::sample::select(vec![
        [10, 96, 0, 10],
        [10, 96, 0, 12],
        [10, 200, 0, 1],
        [10, 244, 1, 2],
        CLIENT,
        [10, 96, 0, 13],
    ]);
    let ports = prop_oneof![
        prop::sample::select(vec![80u16, 53, 30080, 8080, 5353, 40000]),
        any::<u16>()
    ];
    (
        addrs.clone(),
        addrs,
        ports.clone(),
        ports,
        any::<bool>(),
        any::<bool>(),
        prop::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(src, dst, sport, dport, is_tcp, syn, payload)| {
            if is_tcp {
                tcp(src, sport, dst, dport, syn, &payload)
            } else {
                udp(src, sport, dst, dport, &payload)
            }
        })
}

fn any_packet() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        2 => mutated(),
        1 => structured(),
        1 => prop::collection::vec(any::<u8>(), ETH..160),
    ]
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::WithSource("regressions"),
        )),
        source_file: Some(file!()),
        ..Config::default()
    })
}

/// Runs `case` on the corpus, then on `cases` generated packets; returns how many of the
/// generated ones were rewritten.
fn fuzz(
    bed: &mut Bed,
    cases: u32,
    case: fn(&mut Bed, &[u8]) -> Result<bool, TestCaseError>,
) -> u32 {
    for seed in corpus() {
        case(bed, &seed).unwrap_or_else(|e| panic!("corpus packet {seed:02x?}: {e}"));
    }
    let bed = RefCell::new(bed);
    let rewritten = Cell::new(0);
    let result = runner(cases).run(&any_packet(), |packet| {
        if case(&mut bed.borrow_mut(), &packet)? {
            rewritten.set(rewritten.get() + 1);
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    rewritten.get()
}

#[test]
fn xdp_never_rewrites_what_is_not_a_frontend_and_keeps_checksums_right() {
    let mut bed = Bed::new();
    let rewritten = fuzz(&mut bed, 4000, xdp_case);
    eprintln!("{rewritten} of 4000 packets were translated");
    // The generators must reach the translation, or the checks above prove nothing.
    assert!(
        rewritten > 200,
        "only {rewritten} of 4000 packets were translated"
    );
}

#[test]
fn tc_only_translates_replies_and_keeps_checksums_right() {
    let mut bed = Bed::new();
    // Flows through the frontends first, so that replies have conntrack entries to find.
    for seed in corpus() {
        xdp_case(&mut bed, &seed).unwrap_or_else(|e| panic!("corpus packet {seed:02x?}: {e}"));
    }
    let rewritten = fuzz(&mut bed, 3000, tc_case);
    eprintln!("{rewritten} of 3000 replies were translated");
    assert!(
        rewritten > 100,
        "only {rewritten} of 3000 replies were translated"
    );
}
